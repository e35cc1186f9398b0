//! Version skew between the build of the commit before protocol revision 2 (fleet: labels,
//! cancellation, services) and this one, both ways:
//! - a control plane is upgraded before its nodes: the previous agent against this control
//!   plane must keep running jobs, including jobs placed by selector, and must never be sent a
//!   message or a field it would refuse (its wire types refuse unknown fields), while operators
//!   are told clearly what it cannot do;
//! - this agent against the previous control plane (which refuses fields it does not know) runs
//!   jobs, and gains labels and cancellation once that control plane is upgraded in place.
//!
//! - this agent enrolls with a control plane of revision 3 from before agents announced
//!   themselves at enrollment (it refuses that field).
//!
//! The previous binaries are built by `scripts/test` (stage "previous release") into the cache
//! and named by `OUTPOST_PREVIOUS_AGENT`, `OUTPOST_PREVIOUS_CONTROL` and `OUTPOST_REV3_CONTROL`.

#![allow(clippy::expect_used)]

mod common;
mod harness;

use std::path::PathBuf;
use std::time::Duration;

use harness::{Control, Node, eventually, sh};
use outpost_protocol::{NodePhase, Outcome, Placement, SubmitJobRequest};

const CONFIG: &str = "[control]\npoll_wait_secs = 5\n[agent]\nheartbeat_secs = 1\nshutdown_grace_secs = 3\n";

/// A binary of the previous release named by the environment variable `var`.
fn previous(var: &str) -> PathBuf {
    let path = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!(
            "{var} is not set: it names a binary built from an earlier commit; scripts/test builds it \
             (stage \"previous release\")"
        )
    });
    assert!(path.is_file(), "{var}={} is not a file", path.display());
    path
}

fn previous_agent() -> PathBuf {
    previous("OUTPOST_PREVIOUS_AGENT")
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

#[tokio::test(flavor = "multi_thread")]
async fn this_agent_works_with_a_control_plane_from_before_fleet_and_after_its_upgrade() {
    let old = previous("OUTPOST_PREVIOUS_CONTROL");
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut control = Control::start_bin(&old, &tmp.path().join("control"), None, None);
    let org = control.create_org("reverse-skew").await;
    let config = format!("{CONFIG}[node]\nlabels = {{ site = \"icu\" }}\n");
    let mut node = Node::enroll(&tmp.path().join("node"), &control, &org.id, &config).await;
    node.start();

    // The old control plane refuses the agent's announcement and labels; the agent notices,
    // says so once, and leaves them out: jobs run and heartbeats are stored.
    let before = control.submit(&node.node_id, sh("echo from-the-new-agent")).await;
    let r = control.wait_result(&before.job_id, Duration::from_secs(90)).await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
    assert!(r.stdout_tail.contains("from-the-new-agent"));
    assert!(
        node.log.wait_for("older than this agent", Duration::from_secs(30)),
        "the agent did not say that the control plane is older"
    );
    eventually("a heartbeat stored by the old control plane", Duration::from_secs(30), async || {
        control
            .nodes(None)
            .await
            .nodes
            .iter()
            .any(|n| n.node_id == node.node_id && n.last_heartbeat.is_some())
    })
    .await;

    // Upgraded in place (same data dir and port): the new control plane reads the old one's
    // store, the agent sees the new revision on the next answer and sends what it left out.
    control.replace_with(&harness::control_bin());
    eventually("the node's own labels arrive after the upgrade", Duration::from_secs(60), async || {
        control.nodes(Some("site=icu")).await.nodes.iter().any(|n| n.node_id == node.node_id)
    })
    .await;
    assert_eq!(control.results_recorded(&before.job_id).await, 1, "the earlier result is stored once");

    // Now it announces cancellation: a running job is stopped on request.
    let long = control.submit(&node.node_id, sh("sleep 60")).await;
    eventually("the long job accepted", Duration::from_secs(60), async || {
        control.job(&long.job_id).await.accepted_unix_ms.is_some()
    })
    .await;
    let cancelled = control.cancel(&long.job_id).await;
    assert!(cancelled.cancel_requested_unix_ms.is_some(), "{cancelled:?}");
    let r = control.wait_result(&long.job_id, Duration::from_secs(60)).await;
    assert_eq!(r.outcome, Outcome::Cancelled, "{r:?}");
    assert!(!node.log.contains("panicked"), "the agent panicked");
}

/// This agent against a control plane of protocol revision 3 from before agents announced
/// themselves at enrollment (it refuses the field while stating a revision that knows
/// announcements): the agent enrolls without it, then announces in its heartbeats, and its
/// jobs run with the submitter its site policy checks.
#[tokio::test(flavor = "multi_thread")]
async fn this_agent_enrolls_with_a_revision_3_control_plane_that_refuses_the_announcement() {
    let rev3 = previous("OUTPOST_REV3_CONTROL");
    let tmp = tempfile::tempdir().expect("tempdir");
    let control = Control::start_bin(&rev3, &tmp.path().join("control"), None, None);
    let org = control.create_org("skew").await;
    let policy = "[policy]\nsubmitters = [\"role:owner\"]\n";
    let mut node =
        Node::enroll(&tmp.path().join("node"), &control, &org.id, &format!("{CONFIG}{policy}")).await;
    let _containers = common::RemoveNodeContainers(node.node_id.clone());
    node.start();
    eventually("the agent's announcement heard", Duration::from_secs(30), async || {
        control
            .nodes(None)
            .await
            .nodes
            .iter()
            .any(|n| n.node_id == node.node_id && n.announce().has(outpost_protocol::capability::SITE_POLICY))
    })
    .await;
    let job = control.submit(&node.node_id, sh("echo with-a-revision-3-control-plane")).await;
    let r = control.wait_result(&job.job_id, Duration::from_secs(90)).await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
    assert!(r.stdout_tail.contains("with-a-revision-3-control-plane"), "{r:?}");
}
