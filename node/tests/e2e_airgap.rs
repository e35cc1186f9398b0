//! The sneakernet end to end, with the real control plane, agent and Docker engine: a node
//! enrolled offline (request file, enrollment file) that never reaches the control plane runs a
//! job from a signed bundle, its result
//! reaches the control plane through a results bundle exactly once (however often it is
//! imported), the acknowledgement bundle clears the node's outbox, and when the node later gets
//! a network link nothing is duplicated; a bundle handed over while the agent runs goes through
//! the agent. Damaged and replayed bundles change nothing and say why.

#![allow(clippy::expect_used)]

mod common;
mod harness;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use harness::{Control, Node, control_bin, eventually};
use outpost_protocol::{JobState, Outcome};

const CONFIG: &str = "[control]\npoll_wait_secs = 5\nrequest_timeout_secs = 3\n[agent]\nheartbeat_secs = 1\nshutdown_grace_secs = 3\n";

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn operator(control: &Control, args: &[&str]) -> Output {
    Command::new(control_bin())
        .args(["--url", &control.url, "--data-dir"])
        .arg(&control.dir)
        .args(args)
        .output()
        .expect("run outpost-control")
}

fn job_file(dir: &Path, name: &str, script: &str) -> PathBuf {
    let path = dir.join(format!("{name}.json"));
    let spec =
        serde_json::json!({ "spec": { "image": common::test_image(), "command": ["sh", "-c", script] } });
    std::fs::write(&path, spec.to_string()).expect("write job file");
    path
}

fn build(control: &Control, org: &str, node: &str, extra: &[&str], out: &Path) -> String {
    let mut args = vec![
        "bundle",
        "build",
        "--org",
        org,
        "--node",
        node,
        "--out",
        out.to_str().expect("utf8"),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    let o = operator(control, &args);
    assert!(o.status.success(), "bundle build: {}", text(&o));
    // stdout: `JOB_ID<TAB>NODE_ID` per job.
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .next()
        .and_then(|l| l.split('\t').next())
        .unwrap_or("")
        .to_owned()
}

/// Points the node at an address where nothing listens: the site has no link.
fn cut_off(node: &Node) {
    let text = std::fs::read_to_string(&node.config).expect("config");
    std::fs::write(&node.config, text.replace("[control]\n", "[control]\nurl = \"https://127.0.0.1:9\"\n"))
        .expect("write config");
}

/// A node's enrollment file is for that node's request only.
#[tokio::test(flavor = "multi_thread")]
async fn an_enrollment_file_for_another_nodes_request_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let control = Control::start(&tmp.path().join("control"), None);
    let org = control.create_org("airgap").await;
    let other = Node::enroll_offline(&tmp.path().join("other"), &control, &org.id, CONFIG).await;
    let dir = tmp.path().join("node");
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("config.toml");
    std::fs::write(&config, format!("data_dir = \"{}\"\n", dir.join("data").display())).expect("config");
    let outpost = |args: &[&str]| {
        Command::new(harness::node_bin()).arg("--config").arg(&config).args(args).output().expect("outpost")
    };
    let none = outpost(&["enroll", "--from", other.dir.join("enrollment.json").to_str().expect("utf8")]);
    assert!(
        !none.status.success() && text(&none).contains("no offline enrollment request is pending"),
        "{}",
        text(&none)
    );
    let req = dir.join("request.json");
    assert!(outpost(&["enroll", "--offline", "--out", req.to_str().expect("utf8")]).status.success());
    let wrong = outpost(&["enroll", "--from", other.dir.join("enrollment.json").to_str().expect("utf8")]);
    assert!(
        !wrong.status.success() && text(&wrong).contains("not this node's pending request"),
        "{}",
        text(&wrong)
    );
    assert!(!dir.join("data/identity/node.json").exists(), "no identity written");
}

fn reconnect(node: &Node) {
    let text = std::fs::read_to_string(&node.config).expect("config");
    std::fs::write(&node.config, text.replace("url = \"https://127.0.0.1:9\"\n", "")).expect("write config");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_site_without_a_link_runs_a_bundled_job_and_its_result_comes_back_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let image_tar = tmp.path().join("image.tar");
    common::build_test_image(Some(&image_tar));
    let control = Control::start(&tmp.path().join("control"), None);
    let org = control.create_org("airgap").await;
    // Enrolled without a link, and kept without one; its relay watches `incoming/`. Its labels
    // travel in the enrollment request, so the deployment's selector finds it.
    let config = format!(
        "{CONFIG}[node]\nlabels = {{ site = \"icu\" }}\n[[relay.watches]]\nname = \"in\"\nprefix = \"incoming/\"\n"
    );
    let mut node = Node::enroll_offline(&tmp.path().join("node"), &control, &org.id, &config).await;
    let _containers = common::RemoveNodeContainers(node.node_id.clone());
    cut_off(&node);
    let spec = common::ready_service("touch /tmp/ready", 60);
    control.deploy(&org.id, &common::web_deployment(&org.id, "site=icu", spec, 60)).await;
    let object = tmp.path().join("scan.txt");
    std::fs::write(&object, "an object the relay reports").expect("write");
    let put = node.cli(&["objects", "put", "incoming/scan-1.txt", object.to_str().expect("utf8")]);
    assert!(put.status.success(), "objects put: {}", text(&put));

    let bundle = tmp.path().join("site.bundle");
    let job = job_file(tmp.path(), "job", "echo carried-by-hand");
    let site_config = tmp.path().join("site.toml");
    std::fs::write(&site_config, "[node]\nlabels = { site = \"icu\", ward = \"7\" }\n").expect("write");
    let job_id = build(
        &control,
        &org.id,
        &node.node_id,
        &[
            "--image",
            image_tar.to_str().expect("utf8"),
            "--job",
            job.to_str().expect("utf8"),
            "--deployment",
            "web",
            "--config",
            site_config.to_str().expect("utf8"),
        ],
        &bundle,
    );
    assert!(!job_id.is_empty());
    assert_eq!(control.job(&job_id).await.state, JobState::Queued);

    // Damaged copies are refused, naming what is wrong, and change nothing.
    let bytes = std::fs::read(&bundle).expect("read");
    let truncated = tmp.path().join("truncated.bundle");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).expect("write");
    let out = node.cli(&["bundle", "import", truncated.to_str().expect("utf8")]);
    assert!(!out.status.success(), "a truncated bundle was imported: {}", text(&out));
    assert!(text(&out).contains("nothing changed"), "{}", text(&out));

    // A configuration the node would not start with is refused before anything changes.
    let bad_config = tmp.path().join("bad.toml");
    std::fs::write(&bad_config, "[agent]\nmax_concurrent_jobs = 0\n").expect("write");
    let bad = tmp.path().join("bad-config.bundle");
    build(&control, &org.id, &node.node_id, &["--config", bad_config.to_str().expect("utf8")], &bad);
    let out = node.cli(&["bundle", "import", bad.to_str().expect("utf8")]);
    assert!(!out.status.success() && text(&out).contains("would not load"), "{}", text(&out));
    assert!(text(&out).contains("nothing changed"), "{}", text(&out));
    let foreign = tmp.path().join("foreign.toml");
    std::fs::write(&foreign, "[egress]\nallow_logs = true\n").expect("write");
    let never = tmp.path().join("never.bundle");
    let (never, foreign) = (never.to_str().expect("utf8"), foreign.to_str().expect("utf8"));
    let args =
        ["bundle", "build", "--org", &org.id, "--node", &node.node_id, "--out", never, "--config", foreign];
    let out = operator(&control, &args);
    assert!(!out.status.success() && text(&out).contains("is the site's own"), "{}", text(&out));

    // Inspect verifies everything and changes nothing; import applies it.
    let out = node.cli(&["bundle", "inspect", bundle.to_str().expect("utf8")]);
    assert!(out.status.success(), "inspect: {}", text(&out));
    assert!(text(&out).contains("importable here"), "{}", text(&out));
    let out = node.cli(&["bundle", "import", bundle.to_str().expect("utf8")]);
    assert!(out.status.success(), "import: {}", text(&out));
    assert!(text(&out).contains(&format!("job accepted    {job_id}")), "{}", text(&out));
    assert!(text(&out).contains("service         web revision 1"), "{}", text(&out));
    assert!(text(&out).contains("configuration   written"), "{}", text(&out));
    let merged = node.cli(&["check-config"]);
    assert!(
        text(&merged).contains("(from a bundle)") && text(&merged).contains("ward = \"7\""),
        "{}",
        text(&merged)
    );
    let again = node.cli(&["bundle", "import", bundle.to_str().expect("utf8")]);
    assert!(again.status.success() && text(&again).contains("imported already"), "{}", text(&again));

    // The agent runs the job and the service without any link; the result waits in the outbox.
    node.start();
    eventually("the result and the relay event in the outbox", Duration::from_secs(90), async || {
        let st = node.status_json();
        st["agent"]["depths"]["outbox"].as_u64() == Some(1)
            && st["agent"]["relay"]["pending_depth"].as_u64() == Some(1)
    })
    .await;
    eventually("the service healthy", Duration::from_secs(90), async || {
        node.log.snapshot().iter().any(|l| l.contains("service state") && l.contains("Healthy"))
    })
    .await;
    // Exported while the agent runs: it writes the bundle on the command's behalf.
    let results = tmp.path().join("results.bundle");
    let out = node.cli(&["bundle", "export-results", "--out", results.to_str().expect("utf8")]);
    assert!(out.status.success() && text(&out).contains("1 result(s), 1 relay event(s)"), "{}", text(&out));
    assert!(text(&out).contains("asked it to write"), "{}", text(&out));
    // `--since last` carries only what that export did not: no result, no event again.
    let since = tmp.path().join("since.bundle");
    let out =
        node.cli(&["bundle", "export-results", "--out", since.to_str().expect("utf8"), "--since", "last"]);
    assert!(out.status.success() && text(&out).contains("0 result(s), 0 relay event(s)"), "{}", text(&out));
    let out = node.cli(&["bundle", "export-results", "--out", "/dev/null", "--since", "some-other-id"]);
    assert!(
        !out.status.success() && text(&out).contains("the last results bundle written is"),
        "{}",
        text(&out)
    );
    node.stop();

    let ack = tmp.path().join("ack.bundle");
    let args =
        ["bundle", "import-results", results.to_str().expect("utf8"), "--out", ack.to_str().expect("utf8")];
    let out = operator(&control, &args);
    assert!(out.status.success() && text(&out).contains("1 result(s) stored"), "{}", text(&out));
    assert!(text(&out).contains("1 relay event(s) stored"), "{}", text(&out));
    // The node's service reports and audit log came with it.
    // The configuration from the bundle is in force: the node's description says so.
    let ward = control.nodes(Some("ward=7")).await;
    assert_eq!(ward.nodes.len(), 1, "{ward:?}");
    let web = control.deployment(&org.id, "web").await;
    let row = web.nodes.iter().find(|n| n.node_id == node.node_id).expect("the node in the deployment");
    // Offline, as a node with no link is (or, within a lease of the control plane's own start,
    // given the benefit of the doubt): either way its report is the bundle's.
    let report = row.report.as_ref().expect("the service report from the results bundle");
    assert_eq!((report.state, report.revision), (outpost_protocol::ServiceState::Healthy, 1), "{row:?}");
    match row.phase {
        outpost_protocol::NodePhase::Healthy => {}
        outpost_protocol::NodePhase::Offline => {
            assert!(row.reason.as_deref().is_some_and(|r| r.contains("its last report: healthy")), "{row:?}");
        }
        _ => panic!("{row:?}"),
    }
    let verify = operator(&control, &["audit", "verify", "--node", &node.node_id]);
    assert!(
        verify.status.success() && text(&verify).contains("each following the one before"),
        "{}",
        text(&verify)
    );
    let ack_since = tmp.path().join("ack-since.bundle");
    let since_args = [
        "bundle",
        "import-results",
        since.to_str().expect("utf8"),
        "--out",
        ack_since.to_str().expect("utf8"),
    ];
    let out = operator(&control, &since_args);
    assert!(out.status.success() && text(&out).contains("0 result(s) stored"), "{}", text(&out));
    let events = control.all_events(&node.node_id).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].event.key, "incoming/scan-1.txt");
    let r = control.job(&job_id).await.result.expect("result stored");
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
    assert!(r.stdout_tail.contains("carried-by-hand"));
    let out = operator(&control, &args);
    assert!(
        out.status.success() && text(&out).contains("0 result(s) stored, 1 already stored"),
        "{}",
        text(&out)
    );
    assert_eq!(control.results_recorded(&job_id).await, 1, "stored once");

    // The acknowledgement clears the outbox; the first bundle is now an older one.
    let out = node.cli(&["bundle", "import", ack.to_str().expect("utf8")]);
    assert!(out.status.success() && text(&out).contains("1 result(s) acknowledged"), "{}", text(&out));
    assert!(text(&out).contains("1 relay event(s) acknowledged"), "{}", text(&out));
    let out = node.cli(&["bundle", "export-results", "--out", results.to_str().expect("utf8")]);
    assert!(text(&out).contains("0 result(s), 0 relay event(s)"), "{}", text(&out));
    let out = node.cli(&["bundle", "import", bundle.to_str().expect("utf8")]);
    assert!(text(&out).contains("imported already"), "{}", text(&out));

    // The site gets a link: nothing is run or stored twice.
    reconnect(&node);
    node.start();
    let second = tmp.path().join("second.bundle");
    let job2 = job_file(tmp.path(), "job2", "echo through-the-agent");
    let job2_id = build(&control, &org.id, &node.node_id, &["--job", job2.to_str().expect("utf8")], &second);
    // While the agent runs, the command hands the bundle to it. The connected node may have
    // been offered the job over the network first: either way it holds it once.
    let out = node.cli(&["bundle", "import", second.to_str().expect("utf8")]);
    assert!(out.status.success(), "import via the agent: {}", text(&out));
    assert!(text(&out).contains("handed") && text(&out).contains("imported bundle"), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("job accepted    {job2_id}"))
            || text(&out).contains(&format!("job known       {job2_id}")),
        "{}",
        text(&out)
    );
    let r = control.wait_result(&job2_id, Duration::from_secs(90)).await;
    assert!(r.stdout_tail.contains("through-the-agent"), "{r:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(control.results_recorded(&job_id).await, 1, "the first job's result is not stored again");
    assert_eq!(control.results_recorded(&job2_id).await, 1);
    assert_eq!(control.all_events(&node.node_id).await.len(), 1, "the event is not stored twice");
    assert_eq!(common_runs(&job_id), 0, "the first job did not run again");
    node.stop();
    let audit = node.cli(&["audit", "list"]);
    let log = String::from_utf8_lossy(&audit.stdout);
    assert!(log.contains("bundle.imported") && log.contains("bundle.refused"), "{log}");
}

/// Containers of `job_id` that exist now (a finished job's container is removed).
fn common_runs(job_id: &str) -> usize {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label=outpost.job={job_id}")])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// Past `[trust] max_offline` without word from the control plane, a bundle signed before the
/// window is refused and says why; nothing changes.
#[tokio::test(flavor = "multi_thread")]
async fn a_bundle_signed_before_an_expired_trust_window_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let control = Control::start(&tmp.path().join("control"), None);
    let org = control.create_org("airgap").await;
    let config = format!("{CONFIG}[trust]\nmax_offline = \"2s\"\n");
    let node = Node::enroll_offline(&tmp.path().join("node"), &control, &org.id, &config).await;
    let bundle = tmp.path().join("old.bundle");
    let job = job_file(tmp.path(), "job", "echo too-late");
    let job_id = build(&control, &org.id, &node.node_id, &["--job", job.to_str().expect("utf8")], &bundle);
    // Longer than the window since enrollment (the last word) and since the bundle was signed.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let out = node.cli(&["bundle", "import", bundle.to_str().expect("utf8")]);
    assert!(!out.status.success(), "imported past the trust window: {}", text(&out));
    assert!(
        text(&out).contains("trust window has expired") && text(&out).contains("nothing changed"),
        "{}",
        text(&out)
    );
    let audit = node.cli(&["audit", "list"]);
    let log = String::from_utf8_lossy(&audit.stdout);
    assert!(log.contains("bundle.refused") && log.contains("trust window"), "{log}");
    assert!(!log.contains(&job_id), "the job never reached the ledger: {log}");
}

/// A `kill -9` at any moment of `outpost bundle import` leaves the node, once it starts again,
/// as before the import or as after it: never some of the bundle's jobs without the rest or
/// without its counter. The kills are spread over the length of one whole import, measured
/// first, from before it starts to after it ended.
#[tokio::test(flavor = "multi_thread")]
async fn an_import_killed_at_any_moment_leaves_the_node_as_before_or_as_after() {
    const JOBS: usize = 30;
    let tmp = tempfile::tempdir().expect("tempdir");
    let image_tar = tmp.path().join("image.tar");
    common::build_test_image(Some(&image_tar));
    let control = Control::start(&tmp.path().join("control"), None);
    let org = control.create_org("airgap").await;
    let config = CONFIG.replace("[agent]\n", "[agent]\nmax_concurrent_jobs = 1\n");
    let mut node = Node::enroll_offline(&tmp.path().join("node"), &control, &org.id, &config).await;
    cut_off(&node);
    let mut args = vec!["--image".to_owned(), image_tar.display().to_string()];
    for i in 0..JOBS {
        args.push("--job".into());
        args.push(job_file(tmp.path(), &format!("job{i}"), "true").display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let bundle = tmp.path().join("many.bundle");
    build(&control, &org.id, &node.node_id, &args, &bundle);
    let data = node.dir.join("data");
    let pristine = tmp.path().join("pristine");
    let copy = |from: &Path, to: &Path| {
        let _ = std::fs::remove_dir_all(to);
        let ok = Command::new("cp").arg("-a").arg(from).arg(to).status().expect("cp").success();
        assert!(ok, "copy {} to {}", from.display(), to.display());
    };
    copy(&data, &pristine);
    let node_config = node.config.clone();
    let import = || {
        Command::new(harness::node_bin())
            .arg("--config")
            .arg(&node_config)
            .args(["bundle", "import", bundle.to_str().expect("utf8")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn outpost bundle import")
    };
    // One whole import, to know how long one takes.
    let started = std::time::Instant::now();
    assert!(import().wait().expect("wait").success(), "an uninterrupted import fails");
    let whole = started.elapsed();
    let mut delays: Vec<Duration> = (0..=6).map(|i| whole * i / 6).collect();
    delays.push(whole * 3);
    let mut seen = Vec::new();
    for delay in delays {
        copy(&pristine, &data);
        let mut child = import();
        tokio::time::sleep(delay).await;
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        // The agent's start finishes an interrupted import before it runs anything.
        node.start();
        let mut state = String::new();
        let mut found = None;
        for _ in 0..100 {
            let st = node.status_json();
            let d = &st["agent"]["depths"];
            let held = ["staged", "running", "outbox"].iter().filter_map(|k| d[*k].as_u64()).sum::<u64>();
            let counter = st["agent"]["bundle"]["counter"].as_u64();
            state = format!("counter {counter:?}, {held} job(s) held");
            match (counter, held) {
                (None, 0) => {
                    found = Some("before");
                    break;
                }
                (Some(c), h) if c > 0 && h == JOBS as u64 => {
                    found = Some("after");
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        let finished = node.log.contains("finished the bundle import a restart interrupted");
        node.stop();
        harness::remove_node_containers(&node.node_id);
        let Some(found) = found else {
            panic!(
                "killed {delay:?} into an import of {whole:?}: the node is between before and after ({state})"
            )
        };
        let by = if finished { " (finished from its journal on restart)" } else { "" };
        eprintln!("killed {delay:?} into an import of {whole:?}: as {found} it{by}");
        seen.push(found);
    }
    assert_eq!(seen.first(), Some(&"before"), "killed at once, nothing was imported: {seen:?}");
    assert_eq!(seen.last(), Some(&"after"), "killed after it ended, all was imported: {seen:?}");
}

/// Bundles dropped on the watched directory (a USB disk, say) are imported by the running
/// agent in the order they were built, whatever their names, and left where they are.
#[tokio::test(flavor = "multi_thread")]
async fn bundles_in_the_watched_directory_are_imported_in_the_order_they_were_built() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let control = Control::start(&tmp.path().join("control"), None);
    let org = control.create_org("airgap").await;
    let usb = tmp.path().join("usb");
    std::fs::create_dir(&usb).expect("mkdir");
    let config = format!("{CONFIG}[bundles]\nwatch = \"{}\"\n", usb.display());
    let mut node = Node::enroll_offline(&tmp.path().join("node"), &control, &org.id, &config).await;
    let _containers = common::RemoveNodeContainers(node.node_id.clone());
    cut_off(&node);
    // Built first, named last: a scan by name alone would refuse it as older.
    let first = job_file(tmp.path(), "first", "echo first");
    build(&control, &org.id, &node.node_id, &["--job", first.to_str().expect("utf8")], &usb.join("z.bundle"));
    let second = job_file(tmp.path(), "second", "echo second");
    build(
        &control,
        &org.id,
        &node.node_id,
        &["--job", second.to_str().expect("utf8")],
        &usb.join("a.bundle"),
    );
    node.start();
    eventually("both results in the outbox", Duration::from_secs(90), async || {
        node.status_json()["agent"]["depths"]["outbox"].as_u64() == Some(2)
    })
    .await;
    assert!(usb.join("z.bundle").exists() && usb.join("a.bundle").exists(), "the medium is left as it was");
    node.stop();
    let audit = node.cli(&["audit", "list"]);
    let log = String::from_utf8_lossy(&audit.stdout);
    assert_eq!(log.matches("bundle.imported").count(), 2, "{log}");
    assert!(!log.contains("bundle.refused"), "{log}");
}
