//! Version skew: a control plane is upgraded before its nodes. The agent built from the commit
//! before protocol revision 2 (fleet: labels, cancellation, services) runs against this control
//! plane: it must keep running jobs, including jobs placed by selector, and must never be sent a
//! message or a field it would refuse (its wire types refuse unknown fields), while operators
//! are told clearly what it cannot do.
//!
//! The previous agent is built by `scripts/test` (stage "previous agent") into the cache and
//! named by `OUTPOST_PREVIOUS_AGENT`.

#![allow(clippy::expect_used)]

mod common;
mod harness;

use std::path::PathBuf;
use std::time::Duration;

use harness::{Control, Node, eventually, sh};
use outpost_protocol::{NodePhase, Outcome, Placement, SubmitJobRequest};

const CONFIG: &str = "[control]\npoll_wait_secs = 5\n[agent]\nheartbeat_secs = 1\nshutdown_grace_secs = 3\n";

fn previous_agent() -> PathBuf {
    let path = std::env::var_os("OUTPOST_PREVIOUS_AGENT").map(PathBuf::from).unwrap_or_else(|| {
        panic!(
            "OUTPOST_PREVIOUS_AGENT is not set: it names the agent built from the commit before protocol \
             revision 2; scripts/test builds it (stage \"previous agent\")"
        )
    });
    assert!(path.is_file(), "OUTPOST_PREVIOUS_AGENT={} is not a file", path.display());
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_from_before_fleet_keeps_working_and_is_sent_nothing_it_cannot_read() {
    let old = previous_agent();
    let tmp = tempfile::tempdir().expect("tempdir");
    let control = Control::start_with_lease(&tmp.path().join("control"), None, Some("3s"));
    let org = control.create_org("skew").await;
    let mut node = Node::enroll_with(&old, &tmp.path().join("node"), &control, &org.id, CONFIG).await;
    node.start();

    let job = control.submit(&node.node_id, sh("echo from-the-old-agent")).await;
    let r = control.wait_result(&job.job_id, Duration::from_secs(90)).await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
    assert!(r.stdout_tail.contains("from-the-old-agent"));

    // It announces nothing, so it shows as too old for services and is never sent one.
    control.label(&node.node_id, &[("site", "icu")], &[]).await;
    let spec = serde_json::from_value(
        serde_json::json!({ "image": common::test_image(), "command": ["sh", "-c", "sleep 3600"] }),
    )
    .expect("service spec");
    let req = outpost_protocol::DeployRequest {
        name: "web".into(),
        org_id: org.id.clone(),
        selector: "site=icu".into(),
        service: None,
        spec,
        priority: 0,
        rollout: Default::default(),
    };
    control.deploy(&org.id, &req).await;
    let mut phase = None;
    eventually("the old node listed as too old", Duration::from_secs(30), async || {
        let d = control.deployment(&org.id, "web").await;
        phase = d.nodes.first().map(|n| (n.phase, n.reason.clone()));
        phase.as_ref().is_some_and(|(p, _)| *p == NodePhase::AgentTooOld)
    })
    .await;
    assert!(phase.and_then(|(_, r)| r).is_some_and(|r| r.contains("agent too old")));

    // Jobs placed by selector reach it, and its polls still parse: nothing new was sent.
    let any = SubmitJobRequest::for_selector(&org.id, "site=icu", Placement::Any, sh("echo placed"));
    let placed = control.submit_request(&any).await;
    assert_eq!(placed.node_id, node.node_id);
    let r = control.wait_result(&placed.job_id, Duration::from_secs(90)).await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
    assert!(
        !node.log.contains("cannot parse") && !node.log.contains("unknown field"),
        "the old agent choked on an answer"
    );

    // A running job cannot be cancelled on it: the operator hears why, and nothing changes.
    let long = control.submit(&node.node_id, sh("sleep 20")).await;
    eventually("the long job accepted", Duration::from_secs(60), async || {
        control.job(&long.job_id).await.accepted_unix_ms.is_some()
    })
    .await;
    let (status, body) = control
        .try_post(&outpost_protocol::paths::fill(outpost_protocol::paths::JOB_CANCEL, "job_id", &long.job_id))
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("cannot_cancel"), "{body}");
}
