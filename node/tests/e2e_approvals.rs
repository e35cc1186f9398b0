//! The site's approval queue end to end, with the real control plane, agent and Docker engine:
//! a job the policy holds for approval waits (through a kill -9 of the agent), the site sees it
//! in `approvals list` and `show`, approves it with `--remember`, it runs; the next job with the
//! same image runs without asking; a denied job reaches the operator as `not_approved` with its
//! reason; approving twice, an unknown id and a user outside the approvers group are refused.

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

fn waiting(node: &Node) -> Vec<serde_json::Value> {
    let out = node.cli(&["approvals", "list", "--json"]);
    assert!(out.status.success(), "approvals list: {}", text(&out));
    serde_json::from_slice(&out.stdout).expect("json list")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_held_job_waits_for_the_site_and_runs_or_ends_as_the_approver_says() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let control = Control::start(&tmp.path().join("control"), None);
    let org = control.create_org("hospital").await;
    let config = "[control]\npoll_wait_secs = 5\n[agent]\nheartbeat_secs = 1\nshutdown_grace_secs = 3\n\
                  [policy]\napproval = \"new-image\"\n";
    let mut node = Node::enroll(&tmp.path().join("node"), &control, &org.id, config).await;
    let _containers = common::RemoveNodeContainers(node.node_id.clone());
    node.start();

    // Sealed for the operator who asks: the whole way is the issue's, from submit to `age -d`.
    let (recipient, keys) = common::age_keygen(tmp.path(), "operator");
    let first = control
        .submit_request(&outpost_protocol::SubmitJobRequest {
            recipients: vec![recipient],
            ..outpost_protocol::SubmitJobRequest::for_node(&node.node_id, sh("echo approved-$((1 + 1))-run"))
        })
        .await;
    eventually("the job waiting for approval", Duration::from_secs(60), async || {
        waiting(&node).iter().any(|w| w["id"] == format!("{}/1", first.job_id))
    })
    .await;
    // The operator sees it waiting for the site (from the node's heartbeat).
    eventually("the control plane showing the wait", Duration::from_secs(30), async || {
        control.job(&first.job_id).await.awaiting_site_approval_since_unix_ms.is_some()
    })
    .await;
    // It survives a kill -9 of the agent, still waiting, never run.
    node.kill9();
    node.start();
    let list = waiting(&node);
    assert_eq!(list.len(), 1, "{list:?}");
    assert!(common::containers_labelled("outpost.job", &first.job_id).is_empty(), "not run before approval");
    let show = node.cli(&["approvals", "show", &first.job_id]);
    assert!(show.status.success(), "{}", text(&show));
    for needle in [
        "submitter:     org:",
        "role:owner",
        "image:",
        "bytes, created",
        "relaxations:   none",
        "echo approved-$((1 + 1))-run",
    ] {
        assert!(text(&show).contains(needle), "{needle}: {}", text(&show));
    }

    // Refused: an unknown id; a user outside the approvers group cannot even reach the socket.
    let unknown = node.cli(&["approvals", "approve", "no-such-job"]);
    assert!(!unknown.status.success() && text(&unknown).contains("no job no-such-job"), "{}", text(&unknown));
    let outsider = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(harness::node_bin())
        .arg("--config")
        .arg(&node.config)
        .args(["approvals", "approve", &first.job_id])
        .output()
        .expect("setpriv");
    assert!(!outsider.status.success(), "{}", text(&outsider));

    let ok = node.cli(&["approvals", "approve", &first.job_id, "--remember"]);
    assert!(ok.status.success() && text(&ok).contains("remembered"), "{}", text(&ok));
    let twice = node.cli(&["approvals", "approve", &first.job_id]);
    assert!(!twice.status.success() && text(&twice).contains("not waiting for approval"), "{}", text(&twice));
    let r = control.wait_result(&first.job_id, RESULT_WAIT).await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
    let sealed = tmp.path().join("result.age");
    std::fs::write(&sealed, r.sealed.as_deref().expect("a sealed result")).expect("write");
    let opened = Command::new("age").arg("-d").arg("-i").arg(&keys).arg(&sealed).output().expect("run age");
    assert!(opened.status.success(), "age -d: {}", text(&opened));
    assert!(String::from_utf8_lossy(&opened.stdout).contains("approved-2-run"), "{}", text(&opened));

    // The image is remembered: the next job runs without asking.
    let second = control.submit(&node.node_id, sh("echo no-question")).await;
    let r = control.wait_result(&second.job_id, RESULT_WAIT).await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
    let show = node.cli(&["policy", "show"]);
    let image = common::test_image();
    assert!(
        text(&show).contains("approved at this site") && text(&show).contains(&format!("{image}: no inputs")),
        "{}",
        text(&show)
    );
    // Its approval covered no inputs: the same image reading the store asks again.
    let mut reads = sh("cat /in/scans/a.dcm");
    reads.inputs = vec!["scans/a.dcm".into()];
    let reading = control.submit(&node.node_id, reads).await;
    eventually("the job reading an input waiting", Duration::from_secs(60), async || {
        waiting(&node).iter().any(|w| w["id"] == format!("{}/1", reading.job_id))
    })
    .await;
    let deny = node.cli(&["approvals", "deny", &reading.job_id, "--reason", "inputs not reviewed"]);
    assert!(deny.status.success(), "{}", text(&deny));
    assert_eq!(control.wait_result(&reading.job_id, RESULT_WAIT).await.outcome, Outcome::NotApproved);

    // A job with another image waits; denied, it reaches the operator with the reason.
    let mut other = sh("echo never");
    other.image = format!("sha256:{}", "1".repeat(64));
    let third = control.submit(&node.node_id, other).await;
    eventually("the other image waiting", Duration::from_secs(60), async || {
        waiting(&node).iter().any(|w| w["id"] == format!("{}/1", third.job_id))
    })
    .await;
    let deny =
        node.cli(&["approvals", "deny", &third.job_id, "--reason", "not reviewed by the ethics board"]);
    assert!(deny.status.success(), "{}", text(&deny));
    let r = control.wait_result(&third.job_id, RESULT_WAIT).await;
    assert_eq!(r.outcome, Outcome::NotApproved, "{r:?}");
    assert!(r.error.as_deref().is_some_and(|e| e.contains("not reviewed by the ethics board")), "{r:?}");

    // One whose manifest expires while it waits cannot be approved: it ends as not_approved.
    let mut brief = sh("echo too-late");
    brief.image = format!("sha256:{}", "2".repeat(64));
    let req = outpost_protocol::SubmitJobRequest {
        expires_in_secs: Some(3),
        ..outpost_protocol::SubmitJobRequest::for_node(node.node_id.clone(), brief)
    };
    let fourth = control.submit_request(&req).await;
    eventually("the brief job waiting", Duration::from_secs(30), async || {
        waiting(&node).iter().any(|w| w["id"] == format!("{}/1", fourth.job_id))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let late = node.cli(&["approvals", "approve", &fourth.job_id]);
    assert!(!late.status.success() && text(&late).contains("expired while it waited"), "{}", text(&late));
    let r = control.wait_result(&fourth.job_id, RESULT_WAIT).await;
    assert_eq!(r.outcome, Outcome::NotApproved, "{r:?}");
    node.stop();
    let audit = node.cli(&["audit", "list"]);
    let log = String::from_utf8_lossy(&audit.stdout);
    assert!(
        log.contains("job.approved") && log.contains("approved by root") && log.contains("remembered"),
        "{log}"
    );
    assert!(log.contains("job.not_approved") && log.contains("denied at the site by root"), "{log}");
}

/// An approval is one ledger batch: a kill -9 of the agent at any moment of it leaves the job
/// either still waiting or approved, never lost, never run twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_kill_9_during_an_approval_leaves_the_job_waiting_or_approved_and_it_runs_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let control = Control::start(&tmp.path().join("control"), None);
    let org = control.create_org("hospital").await;
    let config = "[control]\npoll_wait_secs = 5\n[agent]\nheartbeat_secs = 1\nshutdown_grace_secs = 3\n\
                  [policy]\napproval = \"every-job\"\n";
    let mut node = Node::enroll(&tmp.path().join("node"), &control, &org.id, config).await;
    let _containers = common::RemoveNodeContainers(node.node_id.clone());
    node.start();
    let since = harness::unix_now_s();
    let mut still_waiting = 0;
    for i in 0..4u64 {
        let job = control.submit(&node.node_id, sh(&format!("echo run-{i}"))).await;
        eventually("the job waiting", Duration::from_secs(60), async || {
            waiting(&node).iter().any(|w| w["id"] == format!("{}/1", job.job_id))
        })
        .await;
        // Approve, and kill the agent at a different moment each time.
        let mut approve = Command::new(harness::node_bin())
            .arg("--config")
            .arg(&node.config)
            .args(["approvals", "approve", &job.job_id])
            .spawn()
            .expect("outpost approvals approve");
        std::thread::sleep(Duration::from_millis(15 * i));
        node.kill9();
        let _ = approve.wait();
        node.start();
        if waiting(&node).iter().any(|w| w["id"] == format!("{}/1", job.job_id)) {
            still_waiting += 1;
            let again = node.cli(&["approvals", "approve", &job.job_id]);
            assert!(again.status.success(), "{}", text(&again));
        }
        let r = control.wait_result(&job.job_id, RESULT_WAIT).await;
        assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
        assert_eq!(control.results_recorded(&job.job_id).await, 1, "one result for {}", job.job_id);
        assert_eq!(harness::container_starts(&job.job_id, since), 1, "{} ran once", job.job_id);
    }
    eprintln!("{still_waiting} of 4 approvals were cut off by the kill and given again");
}
