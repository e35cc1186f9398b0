//! The site policy end to end, with the real control plane, agent and Docker engine: a job the
//! policy allows runs; jobs with an image, a relaxation, an input or a submitter it does not
//! allow end as `refused` with the rule and the value, are audited on the node and never run; a
//! service revision and a local trigger's job are held to the same policy; a policy that cannot
//! apply as written stops the agent.

#![allow(clippy::expect_used)]

mod common;
mod harness;

use std::process::Command;
use std::time::Duration;

use harness::{Control, Node, eventually, sh};
use outpost_protocol::Outcome;

const RESULT_WAIT: Duration = Duration::from_secs(120);

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn config(policy: &str) -> String {
    format!(
        "[node]\nlabels = {{ site = \"icu\" }}\n[control]\npoll_wait_secs = 5\n[agent]\nheartbeat_secs = 1\nshutdown_grace_secs = 3\n\
         [[relay.watches]]\nname = \"in\"\nprefix = \"scans/\"\n\
         [[relay.triggers]]\nname = \"net\"\nwatch = \"in\"\nkey_prefix = \"scans/\"\nresults_prefix = \"results/\"\n\
         [relay.triggers.job]\nimage = \"{image}\"\ncommand = [\"true\"]\nnetwork = true\n{policy}",
        image = common::test_image()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn work_the_site_policy_does_not_allow_is_refused_on_every_path_and_never_runs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let control = Control::start(&tmp.path().join("control"), None);
    let org = control.create_org("hospital").await;
    let image = common::test_image();
    let policy = format!(
        "[policy]\nimages = [ {{ digest = \"{image}\", name = \"busybox\", input_prefixes = [\"scans/\"] }} ]\n\
         relaxations = []\nsubmitters = [\"role:owner\", \"deployment:viewer\", \"local-trigger:net\"]\nmax_timeout_secs = 300\n"
    );
    let mut node = Node::enroll(&tmp.path().join("node"), &control, &org.id, &config(&policy)).await;
    let _containers = common::RemoveNodeContainers(node.node_id.clone());

    // What the site's IT team sees before anything runs.
    let out = node.cli(&["policy", "check"]);
    assert!(out.status.success() && text(&out).contains("policy OK"), "{}", text(&out));
    let out = node.cli(&["policy", "show"]);
    assert!(text(&out).contains("images") && text(&out).contains("busybox"), "{}", text(&out));
    let spec_file = tmp.path().join("net.json");
    std::fs::write(
        &spec_file,
        serde_json::json!({ "spec": { "image": image, "network": true } }).to_string(),
    )
    .expect("write");
    let out =
        node.cli(&["policy", "explain", spec_file.to_str().expect("utf8"), "--submitter", "role:owner"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("refused: policy.relaxations does not allow network"), "{}", text(&out));
    let template = node.cli(&["policy", "template", "strict"]);
    assert!(text(&template).contains("images = []"), "{}", text(&template));

    node.start();
    // Allowed: the listed image, reading an allowed prefix, submitted by the admin (owner).
    let ok = control.submit(&node.node_id, sh("echo allowed")).await;
    let r = control.wait_result(&ok.job_id, RESULT_WAIT).await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");

    // Refused, each naming its rule: a relaxation, an input, a ceiling, an unlisted image.
    let mut net = sh("echo never");
    net.network = true;
    let mut notes = sh("echo never");
    notes.inputs = vec!["notes/a.txt".into()];
    let mut sneaky = sh("echo never");
    sneaky.inputs = vec!["scans/%2e%2e/notes/a.txt".into()];
    let mut long = sh("echo never");
    long.timeout_secs = 3600;
    let mut other = sh("echo never");
    other.image = format!("sha256:{}", "0".repeat(64));
    let cases = [
        (net, "policy.relaxations does not allow network"),
        (notes, "policy.images[busybox].input_prefixes does not allow input \"notes/a.txt\""),
        (sneaky, "percent-encoded"),
        (long, "policy.max_timeout_secs does not allow timeout_secs = 3600"),
        (other, "policy.images does not allow image sha256:0000"),
    ];
    let mut refused = Vec::new();
    for (spec, _) in &cases {
        refused.push(control.submit(&node.node_id, spec.clone()).await.job_id);
    }
    for (job_id, (_, why)) in refused.iter().zip(&cases) {
        let r = control.wait_result(job_id, RESULT_WAIT).await;
        assert_eq!(r.outcome, Outcome::Refused, "{r:?}");
        let error = r.error.clone().unwrap_or_default();
        assert!(error.contains("refused by the site policy") && error.contains(why), "{why}: {error}");
        assert!(r.timings.started_unix_ms.is_none(), "never started: {r:?}");
        assert!(common::containers_labelled("outpost.job", job_id).is_empty(), "no container for {job_id}");
    }

    // A service revision asking for a network: refused on the node, reported with the rule
    // (the deployment is not a submitter the policy names either; the first rule that fails is
    // the one named).
    control.deploy(&org.id, &common::web_deployment(&org.id, "site=icu", bridged(), 30)).await;
    eventually("the service revision refused", Duration::from_secs(60), async || {
        let d = control.deployment(&org.id, "web").await;
        d.status == outpost_protocol::RolloutStatus::RolledBack
            && d.reason.as_deref().is_some_and(|r| r.contains("policy.relaxations does not allow network"))
    })
    .await;

    // A local trigger whose job asks for a network: its job is refused before it runs.
    let object = tmp.path().join("scan.dcm");
    std::fs::write(&object, "a scan").expect("write");
    let put = node.cli(&["objects", "put", "scans/1.dcm", object.to_str().expect("utf8")]);
    assert!(put.status.success(), "{}", text(&put));
    eventually("the trigger's job refused", Duration::from_secs(60), async || {
        let got = node.cli(&["objects", "ls", "results/", "--json"]);
        !String::from_utf8_lossy(&got.stdout).trim().is_empty()
    })
    .await;
    node.stop();
    let audit = node.cli(&["audit", "list"]);
    let log = String::from_utf8_lossy(&audit.stdout);
    assert!(log.contains("policy.loaded"), "{log}");
    assert_eq!(log.matches("job.refused").count(), cases.len() + 1, "{log}");
    assert!(log.contains("service.refused") && log.contains("trigger.local.result"), "{log}");
    let results = node.cli(&["objects", "ls", "results/", "--json"]);
    let first: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&results.stdout).lines().next().expect("a result object"),
    )
    .expect("json");
    let key = first["key"].as_str().expect("key").to_owned();
    let body = node.cli(&["objects", "get", &key]);
    assert!(text(&body).contains("\"refused\""), "{}", text(&body));

    // A policy that cannot apply as written stops the agent, naming the key.
    let dir = node.config.parent().expect("dir").join("config.d");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("policy.toml"), "[policy]\ninput_prefixes = [\"\"]\n").expect("write");
    let run = Command::new(harness::node_bin())
        .arg("--config")
        .arg(&node.config)
        .arg("run")
        .output()
        .expect("outpost run");
    assert!(!run.status.success(), "the agent started on a broken policy");
    assert!(text(&run).contains("policy.input_prefixes"), "{}", text(&run));
}

/// A service asking for a bridge network, deployed as `web` (not a submitter the policy names).
fn bridged() -> outpost_protocol::ServiceSpec {
    let mut spec = common::ready_service("touch /tmp/ready", 30);
    spec.network = outpost_protocol::ServiceNetwork::Bridge;
    spec
}

/// SIGHUP puts an edited policy in force without a restart and records its hash; a policy
/// that does not load keeps the one in force (never fail open) and says why.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_policy_and_a_broken_one_keeps_the_policy_in_force() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let control = Control::start(&tmp.path().join("control"), None);
    let org = control.create_org("hospital").await;
    let image = common::test_image();
    let conf = "[control]\npoll_wait_secs = 5\n[agent]\nheartbeat_secs = 1\nshutdown_grace_secs = 3\n";
    let mut node = Node::enroll(&tmp.path().join("node"), &control, &org.id, conf).await;
    let _containers = common::RemoveNodeContainers(node.node_id.clone());
    let dir = node.config.parent().expect("dir").join("config.d");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let policy_file = dir.join("policy.toml");
    std::fs::write(&policy_file, format!("[policy]\nimages = [ {{ digest = \"{image}\" }} ]\n"))
        .expect("write");
    node.start();
    let ok = control.submit(&node.node_id, sh("echo allowed")).await;
    assert_eq!(control.wait_result(&ok.job_id, RESULT_WAIT).await.outcome, Outcome::Succeeded);

    // Narrowed: nothing may run. In force once the agent has recorded it.
    std::fs::write(&policy_file, "[policy]\nimages = []\n").expect("write");
    node.sighup();
    assert!(node.log.wait_for("[policy] reloaded", Duration::from_secs(30)), "no reload logged");
    let narrowed = control.submit(&node.node_id, sh("echo never")).await;
    let r = control.wait_result(&narrowed.job_id, RESULT_WAIT).await;
    assert_eq!(r.outcome, Outcome::Refused, "{r:?}");
    assert!(r.error.as_deref().is_some_and(|e| e.contains("policy.images")), "{r:?}");

    // Broken: the agent keeps running under the narrowed policy and says why.
    std::fs::write(&policy_file, "[policy]\nimages = [ { digest = \"sha256:nope\" } ]\n").expect("write");
    node.sighup();
    assert!(node.log.wait_for("the policy in force stays", Duration::from_secs(30)), "no refusal logged");
    assert!(node.is_running(), "a broken policy on SIGHUP stopped the agent");
    let still = control.submit(&node.node_id, sh("echo never")).await;
    assert_eq!(control.wait_result(&still.job_id, RESULT_WAIT).await.outcome, Outcome::Refused);

    node.stop();
    // (The CLI, like the agent at start, refuses a configuration that does not load.)
    std::fs::write(&policy_file, "[policy]\nimages = []\n").expect("write");
    let audit = node.cli(&["audit", "list"]);
    let log = text(&audit);
    assert_eq!(log.matches("policy.loaded").count(), 2, "at start and on the first SIGHUP: {log}");
    assert!(log.contains("policy.reload_refused") && log.contains("policy.images[0].digest"), "{log}");
}

/// `max_jobs_per_submitter`: one submitter's jobs beyond the ceiling wait their turn (they are
/// not refused), so with a ceiling of one they run one after the other.
#[tokio::test(flavor = "multi_thread")]
async fn one_submitters_jobs_beyond_the_ceiling_wait_their_turn() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let control = Control::start(&tmp.path().join("control"), None);
    let org = control.create_org("hospital").await;
    let conf = "[control]\npoll_wait_secs = 5\n[agent]\nheartbeat_secs = 1\nshutdown_grace_secs = 3\n\
                max_concurrent_jobs = 4\n[policy]\nmax_jobs_per_submitter = 1\n";
    let mut node = Node::enroll(&tmp.path().join("node"), &control, &org.id, conf).await;
    let _containers = common::RemoveNodeContainers(node.node_id.clone());
    node.start();
    let mut jobs = Vec::new();
    for i in 0..3 {
        jobs.push(control.submit(&node.node_id, sh(&format!("sleep 1; echo {i}"))).await.job_id);
    }
    let mut ran = Vec::new();
    for id in &jobs {
        let r = control.wait_result(id, RESULT_WAIT).await;
        assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
        ran.push((
            r.timings.started_unix_ms.expect("started"),
            r.timings.finished_unix_ms.expect("finished"),
        ));
    }
    ran.sort();
    for pair in ran.windows(2) {
        assert!(pair[1].0 >= pair[0].1, "two jobs of one submitter overlapped: {ran:?}");
    }

    // A job waiting its turn is not stuck there for a cancel: it ends before the running one.
    let long = control.submit(&node.node_id, sh("sleep 8")).await;
    eventually("the long job running", Duration::from_secs(60), async || {
        control.job(&long.job_id).await.accepted_unix_ms.is_some()
    })
    .await;
    let waiting = control.submit(&node.node_id, sh("echo never")).await;
    eventually("the waiting job on the node", Duration::from_secs(60), async || {
        control.job(&waiting.job_id).await.accepted_unix_ms.is_some()
    })
    .await;
    control.cancel(&waiting.job_id).await;
    let cancelled = control.wait_result(&waiting.job_id, RESULT_WAIT).await;
    assert_eq!(cancelled.outcome, Outcome::Cancelled, "{cancelled:?}");
    let finished = control.wait_result(&long.job_id, RESULT_WAIT).await;
    assert_eq!(finished.outcome, Outcome::Succeeded, "{finished:?}");
    assert!(
        cancelled.timings.finished_unix_ms < finished.timings.finished_unix_ms,
        "the cancel waited for the running job: {cancelled:?} {finished:?}"
    );
}
