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
