//! Deployment profiles as a running agent sees them: `[control] uplink = false` (what the
//! `air-gapped` profile sets) keeps a real agent from ever dialling its control plane, while it
//! still runs; `check-config` names what came from the profile.

#![allow(clippy::expect_used)]

mod common;
mod harness;

use std::time::Duration;

use harness::{Control, Node, sh};
use outpost_protocol::JobState;

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_without_uplink_never_dials_its_control_plane() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let control = Control::start(&tmp.path().join("control"), None);
    let org = control.create_org("gapped").await;
    let config = "[control]\nuplink = false\npoll_wait_secs = 1\n[agent]\nheartbeat_secs = 1\nshutdown_grace_secs = 3\n";
    let mut node = Node::enroll(&tmp.path().join("node"), &control, &org.id, config).await;
    node.start();
    let job = control.submit(&node.node_id, sh("echo never")).await;
    // Several heartbeat and poll periods: nothing arrives.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(node.log.contains("uplink = false"), "the agent says why it stays silent");
    assert_eq!(control.job(&job.job_id).await.state, JobState::Queued, "no poll ever took the job");
    let seen = control.nodes(None).await.nodes.into_iter().find(|n| n.node_id == node.node_id).expect("node");
    assert!(seen.last_heartbeat.is_none(), "no heartbeat ever arrived: {seen:?}");
    let status = node.status_json();
    assert_eq!(status["agent"]["ready"], true, "the agent runs: {status}");
    assert_eq!(status["agent"]["connected"], false);
    node.stop();

    let out = node.cli(&["check-config"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("# from profile on-prem (set them to override): trust.max_offline, egress.allow_logs"),
        "{text}"
    );
}

/// The organisation's settings reach a real agent in a poll answer before the jobs of the same
/// answer: work of a feature turned off after it was queued is refused by the node itself, the
/// settings survive a restart, and the default profile applies where the file names none.
#[tokio::test(flavor = "multi_thread")]
async fn an_organisations_settings_reach_the_node_and_gate_its_work() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let control = Control::start(&tmp.path().join("control"), None);
    let org = control.create_org("settings").await;
    let config = "[control]\npoll_wait_secs = 1\n[agent]\nheartbeat_secs = 1\nshutdown_grace_secs = 3\n";
    let mut node = Node::enroll(&tmp.path().join("node"), &control, &org.id, config).await;
    // This node's file names no profile, so the organisation's default may apply.
    let file = std::fs::read_to_string(&node.config).expect("config");
    std::fs::write(&node.config, file.replace("profile = \"on-prem\"\n", "")).expect("config");

    // Queued while containers were on; turned off before the node ever polled.
    let job = control.submit(&node.node_id, sh("echo never")).await;
    let out =
        control.cli(&["org", "settings", &org.id, "--disable", "containers", "--default-profile", "hybrid"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}{}", String::from_utf8_lossy(&out.stderr));
    assert!(shown.contains("containers       off") && shown.contains("default profile  hybrid"), "{shown}");

    node.start();
    let r = control.wait_result(&job.job_id, Duration::from_secs(60)).await;
    assert_eq!(r.outcome, outpost_protocol::Outcome::Refused, "{r:?}");
    let why = r.error.clone().unwrap_or_default();
    assert!(why.contains("organisation's settings") && why.contains("containers"), "{why}");
    node.stop();
    assert!(node.dir.join("data/org-settings.json").is_file(), "kept for the next start");
    let audit = node.cli(&["audit", "list"]);
    assert!(String::from_utf8_lossy(&audit.stdout).contains("org.settings"), "audited on the node");

    // At the next start the default profile is in force, and says where it came from.
    let out = node.cli(&["check-config"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("# profile hybrid: the organisation's default"), "{text}");
    assert!(text.contains("profile = \"hybrid\""), "{text}");

    // Turned back on: the agent hears it and runs the next job.
    let out = control.cli(&["org", "settings", &org.id, "--enable", "containers"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    node.start();
    let job = control.submit(&node.node_id, sh("echo back on")).await;
    let r = control.wait_result(&job.job_id, Duration::from_secs(120)).await;
    assert_eq!(r.outcome, outpost_protocol::Outcome::Succeeded, "{r:?}");
    node.stop();
}
