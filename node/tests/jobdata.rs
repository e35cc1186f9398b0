//! Job data end to end: `outpost-control` and `outpost` as real processes, jobs in the real
//! Docker engine reading inputs staged from the node's local object store at `/in` and leaving
//! outputs at `/out`, and the egress policy deciding which output bodies may leave the site.
//! The fs store allows one process at a time, so the tests fill it before the agent starts and
//! read it after the agent stopped.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;
mod harness;

use std::path::PathBuf;
use std::time::Duration;

use harness::{Control, Node, container_starts, docker_inspect, eventually, sh, unix_now_s};
use outpost_node::objstore::fs::FsStore;
use outpost_node::objstore::{ObjectStore, ObjectStoreError};
use outpost_protocol::{ContainerSpec, MAX_EGRESS_BODY_BYTES, Outcome};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

const TEST_CONFIG: &str =
    "[control]\npoll_wait_secs = 5\n[agent]\nheartbeat_secs = 2\nshutdown_grace_secs = 3\n";
const RESULT_WAIT: Duration = Duration::from_secs(90);

struct Site {
    _tmp: tempfile::TempDir,
    control: Control,
    node: Node,
}

/// A control plane and one enrolled node (not started); `extra` is appended to the node's config.
async fn site(extra: &str) -> Site {
    let tmp = tempfile::tempdir().expect("tempdir");
    let control = Control::start(&tmp.path().join("control"), None);
    let org = control.create_org("jobdata").await;
    let node =
        Node::enroll(&tmp.path().join("node"), &control, &org.id, &format!("{TEST_CONFIG}{extra}\n")).await;
    Site { _tmp: tmp, control, node }
}

/// The node's fs object store (the default root, `data_dir/objects`).
fn objects_root(node: &Node) -> PathBuf {
    node.dir.join("data/objects")
}

/// Put objects into the node's store; the agent must not be running.
async fn seed(node: &Node, objects: &[(&str, &[u8])]) {
    let store = FsStore::open(objects_root(node)).await.expect("open the node's store");
    for (key, body) in objects {
        store.put(key, *body).await.expect("put");
    }
}

/// Read an object back from the node's store; the agent must not be running.
async fn read_object(store: &FsStore, key: &str) -> Result<Vec<u8>, ObjectStoreError> {
    let mut reader = store.get(key).await?;
    let mut body = Vec::new();
    reader
        .read_to_end(&mut body)
        .await
        .map_err(|e| ObjectStoreError::Io { context: key.into(), source: e })?;
    Ok(body)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn with_data(script: &str, inputs: &[&str], output_prefix: Option<&str>, egress: &[&str]) -> ContainerSpec {
    let mut spec = sh(script);
    spec.inputs = inputs.iter().map(|s| (*s).to_owned()).collect();
    spec.output_prefix = output_prefix.map(str::to_owned);
    spec.egress_bodies = egress.iter().map(|s| (*s).to_owned()).collect();
    spec
}

fn node_audit(node: &Node) -> String {
    let out = node.cli(&["audit", "list"]);
    assert!(out.status.success(), "outpost audit list: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_reads_its_inputs_from_the_store_and_its_outputs_land_there() {
    let mut s = site("").await;
    let input = b"site data that never leaves\n";
    seed(
        &s.node,
        &[
            ("datasets/input.txt", input),
            ("batch/1.txt", b"one\n"),
            ("batch/sub/2.txt", b"two\n"),
            ("batchmates.txt", b"not under the prefix\n"),
        ],
    )
    .await;
    s.node.start();
    let script = "sha256sum /in/datasets/input.txt; cat /in/batch/1.txt /in/batch/sub/2.txt; ls /in; \
                  if echo x > /in/new 2>/dev/null; then echo in-writable; else echo in-read-only; fi; \
                  mkdir -p /out/sub && echo report > /out/report.txt && printf abc > /out/sub/data.bin; \
                  ln -s /etc/passwd /out/passwd-link; sleep 3";
    let spec = with_data(script, &["datasets/input.txt", "batch/"], Some("results/run/"), &[]);
    let job = s.control.submit(&s.node.node_id, spec).await;

    // While it runs: /in is a read-only bind mount, /out a writable one, the rest still hardened.
    let name = format!("outpost-{}-1", job.job_id);
    let mut inspected = None;
    eventually("the job's container to run", Duration::from_secs(30), async || {
        inspected = docker_inspect(&name).filter(|c| c["State"]["Running"] == true);
        inspected.is_some()
    })
    .await;
    let c = inspected.expect("inspected");
    let mounts = c["Mounts"].as_array().cloned().unwrap_or_default();
    let rw = |dest: &str| mounts.iter().find(|m| m["Destination"] == dest).map(|m| m["RW"].clone());
    assert_eq!(rw("/in"), Some(serde_json::Value::Bool(false)), "mounts: {mounts:?}");
    assert_eq!(rw("/out"), Some(serde_json::Value::Bool(true)), "mounts: {mounts:?}");
    assert_eq!(c["HostConfig"]["ReadonlyRootfs"], true);

    let result = s.control.wait_result(&job.job_id, RESULT_WAIT).await;
    assert_eq!(result.outcome, Outcome::Succeeded, "{result:?}");
    let stdout = &result.stdout_tail;
    assert!(stdout.contains(&format!("{}  /in/datasets/input.txt", sha256_hex(input))), "{stdout}");
    assert!(
        stdout.contains("one\ntwo\nbatch\ndatasets\n"),
        "the prefix staged everything under it, nothing else: {stdout}"
    );
    assert!(stdout.contains("in-read-only") && !stdout.contains("in-writable"), "{stdout}");

    let keys: Vec<&str> = result.outputs.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(keys, ["results/run/report.txt", "results/run/sub/data.bin"], "the link is not an output");
    assert_eq!((result.outputs[0].size, result.outputs[1].size), (7, 3));
    assert_eq!(result.outputs[0].sha256, sha256_hex(b"report\n"));
    assert_eq!(result.outputs[1].sha256, sha256_hex(b"abc"));
    assert!(result.outputs.iter().all(|o| o.body.is_none()), "no body leaves by default");
    assert!(result.egress_denied.is_empty());
    let error = result.error.clone().unwrap_or_default();
    assert!(error.contains("/out/passwd-link") && error.contains("symbolic link"), "{error}");

    eventually("the container to be removed", Duration::from_secs(20), async || {
        docker_inspect(&name).is_none()
    })
    .await;
    s.node.stop();
    let store = FsStore::open(objects_root(&s.node)).await.expect("open store");
    for output in &result.outputs {
        let body = read_object(&store, &output.key).await.expect("the output is in the store");
        assert_eq!(
            (body.len() as u64, sha256_hex(&body)),
            (output.size, output.sha256.clone()),
            "{}",
            output.key
        );
    }
    assert!(matches!(
        read_object(&store, "results/run/passwd-link").await,
        Err(ObjectStoreError::NotFound { .. })
    ));
    let job_dir = s.node.dir.join("data/jobdata").join(&job.job_id);
    assert!(!job_dir.exists(), "the job's data directory is removed once its result is persisted");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_input_ends_the_job_with_an_error_naming_it_and_nothing_runs() {
    let mut s = site("").await;
    seed(&s.node, &[("present.txt", b"here\n")]).await;
    s.node.start();
    let since = unix_now_s();
    let missing_key = s
        .control
        .submit(
            &s.node.node_id,
            with_data("echo must-not-run", &["present.txt", "absent/file.txt"], None, &[]),
        )
        .await;
    let empty_prefix = s
        .control
        .submit(&s.node.node_id, with_data("echo must-not-run", &["nothing-here/"], None, &[]))
        .await;

    for (job, named) in [(&missing_key, "absent/file.txt"), (&empty_prefix, "nothing-here/")] {
        let result = s.control.wait_result(&job.job_id, RESULT_WAIT).await;
        assert_eq!(result.outcome, Outcome::Error, "{result:?}");
        let error = result.error.unwrap_or_default();
        assert!(error.contains(&format!("{named:?}")) && error.contains("store"), "{error}");
        assert_eq!(result.exit_code, None);
        assert_eq!(container_starts(&job.job_id, since), 0, "the job never ran");
        assert!(docker_inspect(&format!("outpost-{}-1", job.job_id)).is_none(), "no container was created");
        let job_dir = s.node.dir.join("data/jobdata").join(&job.job_id);
        eventually("the job's data directory to go", Duration::from_secs(10), async || !job_dir.exists())
            .await;
    }
}

/// Hostile keys are refused twice: by the control plane at submit (400, nothing queued) and,
/// should a manifest reach the node without that check, by the node's own verification (unit
/// tests in `verify/tests.rs` feed it signed manifests directly).
#[tokio::test(flavor = "multi_thread")]
async fn hostile_job_data_keys_are_refused_before_anything_runs() {
    let mut s = site("").await;
    s.node.start();
    for (spec, field, why) in [
        (with_data("echo no", &["../../etc/shadow"], None, &[]), "inputs", "'..'"),
        (with_data("echo no", &["/etc/shadow"], None, &[]), "inputs", "'/'"),
        (with_data("echo no", &[], Some("res//x/"), &[]), "output_prefix", "empty"),
    ] {
        let (status, body) = s.control.try_submit(&s.node.node_id, spec).await;
        assert_eq!(status, 400, "{body}");
        assert!(
            body.contains("bad_object_key") && body.contains(field) && body.contains(why),
            "{field} / {why}: {body}"
        );
    }
    let jobs: outpost_protocol::JobList = serde_json::from_str(
        &s.control.try_get(&format!("{}?node_id={}", outpost_protocol::paths::JOBS, s.node.node_id)).await,
    )
    .expect("job list");
    assert!(jobs.jobs.is_empty(), "nothing was queued");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_output_body_asked_for_is_refused_by_default_and_audited() {
    let mut s = site("").await;
    s.node.start();
    let spec = with_data("echo total=3 > /out/summary.txt", &[], Some("res/"), &["res/summary.txt"]);
    let job = s.control.submit(&s.node.node_id, spec).await;
    let result = s.control.wait_result(&job.job_id, RESULT_WAIT).await;
    assert_eq!(result.outcome, Outcome::Succeeded, "{result:?}");
    assert_eq!(result.egress_denied, ["res/summary.txt"]);
    assert_eq!(result.outputs.len(), 1);
    assert_eq!(result.outputs[0].key, "res/summary.txt");
    assert_eq!(result.outputs[0].body, None, "the body stays on site");
    assert_eq!(result.outputs[0].sha256, sha256_hex(b"total=3\n"), "its metadata is reported");
    assert!(s.node.log.contains("egress refused"), "the refusal is logged");

    s.node.stop();
    let audit = node_audit(&s.node);
    let line = audit
        .lines()
        .find(|l| l.contains("egress.denied"))
        .unwrap_or_else(|| panic!("no egress.denied in: {audit}"));
    assert!(
        line.contains(&job.job_id) && line.contains("res/summary.txt") && line.contains("allows no bodies"),
        "{line}"
    );
    let verify = s.node.cli(&["audit", "verify"]);
    assert!(verify.status.success(), "audit chain intact: {}", String::from_utf8_lossy(&verify.stdout));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_output_body_leaves_only_where_the_node_policy_and_the_manifest_both_allow_it() {
    let mut s = site("[egress]\nallow_body_prefixes = [\"res/public/\"]").await;
    s.node.start();
    let script = format!(
        "mkdir -p /out/public /out/private; echo 'mean=4.2' > /out/public/summary.txt; \
         echo secret > /out/private/x.txt; echo kept-local > /out/public-not-asked.txt; \
         head -c {} /dev/zero | tr '\\0' a > /out/public/big.txt; printf '\\377\\376' > /out/public/bin",
        MAX_EGRESS_BODY_BYTES + 1
    );
    let spec = with_data(&script, &[], Some("res/"), &["res/public/", "res/private/x.txt"]);
    let job = s.control.submit(&s.node.node_id, spec).await;
    let result = s.control.wait_result(&job.job_id, RESULT_WAIT).await;
    assert_eq!(result.outcome, Outcome::Succeeded, "{result:?}");

    let body = |key: &str| {
        result
            .outputs
            .iter()
            .find(|o| o.key == key)
            .unwrap_or_else(|| panic!("no output {key}: {result:?}"))
            .body
            .clone()
    };
    assert_eq!(body("res/public/summary.txt").as_deref(), Some("mean=4.2\n"), "asked for and allowed");
    assert_eq!(body("res/private/x.txt"), None, "asked for, but outside the node's policy");
    assert_eq!(body("res/public/big.txt"), None, "allowed, but too large");
    assert_eq!(body("res/public/bin"), None, "allowed, but not text");
    assert_eq!(body("res/public-not-asked.txt"), None, "never asked for");
    let mut denied = result.egress_denied.clone();
    denied.sort();
    assert_eq!(denied, ["res/private/x.txt", "res/public/big.txt", "res/public/bin"]);

    s.node.stop();
    let audit = node_audit(&s.node);
    let line = audit
        .lines()
        .find(|l| l.contains("egress.denied"))
        .unwrap_or_else(|| panic!("no egress.denied in: {audit}"));
    assert!(
        line.contains("limit") && line.contains("not UTF-8") && line.contains("allow_body_prefixes"),
        "{line}"
    );
    assert!(!line.contains("summary.txt"), "the allowed body is not a refusal: {line}");
}

/// SIGKILL while the job runs: the restarted agent adopts the container and still collects
/// what it leaves in /out, from inputs staged before the crash.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_while_running_still_collects_the_outputs_once() {
    let mut s = site("").await;
    seed(&s.node, &[("in.txt", b"survives\n")]).await;
    s.node.start();
    let since = unix_now_s();
    let spec = with_data("sleep 4; cp /in/in.txt /out/copy.txt", &["in.txt"], Some("crash/"), &[]);
    let job = s.control.submit(&s.node.node_id, spec).await;
    let name = format!("outpost-{}-1", job.job_id);
    eventually("the container to run", Duration::from_secs(30), async || {
        docker_inspect(&name).is_some_and(|c| c["State"]["Running"] == true)
    })
    .await;
    s.node.kill9();
    s.node.start();
    let result = s.control.wait_result(&job.job_id, RESULT_WAIT).await;
    assert_eq!(result.outcome, Outcome::Succeeded, "{result:?}");
    assert_eq!(result.outputs.len(), 1, "{result:?}");
    assert_eq!(result.outputs[0].key, "crash/copy.txt");
    assert_eq!(result.outputs[0].sha256, sha256_hex(b"survives\n"));
    assert_eq!(container_starts(&job.job_id, since), 1, "the job ran once");
    assert_eq!(s.control.results_recorded(&job.job_id).await, 1);
}

/// One result carries at most MAX_RESULT_BODIES_BYTES of bodies in all, so it always fits
/// the control plane's request limit: bodies beyond are withheld, named, and audited.
#[tokio::test(flavor = "multi_thread")]
async fn bodies_beyond_the_results_total_are_withheld_and_the_result_is_delivered() {
    let mut s = site("[egress]\nallow_body_prefixes = [\"res/\"]").await;
    s.node.start();
    let each = MAX_EGRESS_BODY_BYTES - 1;
    let count = outpost_protocol::MAX_RESULT_BODIES_BYTES / each + 2;
    let script = format!(
        "for i in $(seq -w 1 {count}); do head -c {each} /dev/zero | tr '\\0' b > /out/part-$i.txt; done"
    );
    let spec = with_data(&script, &[], Some("res/"), &["res/"]);
    let job = s.control.submit(&s.node.node_id, spec).await;
    let result = s.control.wait_result(&job.job_id, RESULT_WAIT).await;
    assert_eq!(result.outcome, Outcome::Succeeded, "{result:?}");
    assert_eq!(result.outputs.len(), count, "{result:?}");
    let sent: usize = result.outputs.iter().filter_map(|o| o.body.as_ref()).map(String::len).sum();
    assert!(sent > 0 && sent <= outpost_protocol::MAX_RESULT_BODIES_BYTES, "{sent} bytes of bodies");
    let withheld = result.outputs.iter().filter(|o| o.body.is_none()).count();
    assert!(withheld >= 2, "{withheld} withheld");
    assert_eq!(result.egress_denied.len(), withheld, "{:?}", result.egress_denied);
    s.node.stop();
    let audit = node_audit(&s.node);
    assert!(audit.contains("bodies would pass"), "{audit}");
}
