//! `outpost-control job logs --follow` against real agents and the real engine: a node whose
//! egress policy allows live logs streams a running container's output, every line once and
//! in order; a node with the default policy refuses (audited on both sides) and the operator
//! gets the result's output tails when the job ends.

#![allow(clippy::expect_used)]

mod common;
mod harness;

use std::process::Command;
use std::time::Duration;

use harness::{Control, Node, control_bin, eventually, sh};

const CONFIG: &str = "[control]\npoll_wait_secs = 5\n[agent]\nheartbeat_secs = 1\nshutdown_grace_secs = 3\n";

/// `outpost-control job logs JOB --follow` run to its end: (exit success, stdout, stderr).
async fn follow_logs(control: &Control, job_id: &str) -> (bool, String, String) {
    let (url, dir, job_id) = (control.url.clone(), control.dir.clone(), job_id.to_owned());
    tokio::task::spawn_blocking(move || {
        let out = Command::new(control_bin())
            .args(["--url", &url, "--data-dir"])
            .arg(&dir)
            .args(["job", "logs", &job_id, "--follow"])
            .output()
            .expect("run outpost-control job logs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .expect("join")
}

async fn wait_accepted(control: &Control, job_id: &str) {
    eventually("the job accepted", Duration::from_secs(60), async || {
        control.job(job_id).await.accepted_unix_ms.is_some()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_jobs_output_streams_where_the_node_allows_it_and_tails_where_it_does_not() {
    let _image = common::test_image();
    let tmp = tempfile::tempdir().expect("tempdir");
    let control = Control::start(&tmp.path().join("control"), None);
    let org = control.create_org("logs").await;
    let mut open = Node::enroll(
        &tmp.path().join("open"),
        &control,
        &org.id,
        &format!("{CONFIG}[egress]\nallow_logs = true\n"),
    )
    .await;
    let mut closed = Node::enroll(&tmp.path().join("closed"), &control, &org.id, CONFIG).await;
    open.start();
    closed.start();

    // Allowed: every line once, in order, while the job runs, and the stream ends with it.
    let script = "for i in $(seq 1 40); do echo line-$i; sleep 0.2; done; echo to-stderr >&2; echo finished";
    let job = control.submit(&open.node_id, sh(script)).await;
    wait_accepted(&control, &job.job_id).await;
    let (ok, stdout, stderr) = follow_logs(&control, &job.job_id).await;
    assert!(ok, "job logs failed: {stderr}");
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("line-")).collect();
    let expected: Vec<String> = (1..=40).map(|i| format!("line-{i}")).collect();
    // The stream starts with what the container wrote so far (its last 1000 lines): all of it.
    assert_eq!(lines, expected, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("to-stderr") && stdout.contains("finished"), "{stdout}");
    assert!(!stderr.contains("does not send live logs"), "{stderr}");
    let r = control.wait_result(&job.job_id, Duration::from_secs(60)).await;
    assert_eq!(r.outcome, outpost_protocol::Outcome::Succeeded, "{r:?}");

    // Refused by default: said and audited; the result's tails once the job ends.
    let job = control.submit(&closed.node_id, sh("echo first-words; sleep 3; echo last-words")).await;
    wait_accepted(&control, &job.job_id).await;
    let (ok, stdout, stderr) = follow_logs(&control, &job.job_id).await;
    assert!(ok, "job logs failed: {stderr}");
    assert!(stderr.contains("does not send live logs") && stderr.contains("allow_logs"), "{stderr}");
    assert!(stderr.contains("output tails"), "{stderr}");
    assert_eq!(stdout, "first-words\nlast-words\n");
    let audit = control.audit().await;
    assert!(
        audit.entries.iter().any(|e| e.action == "job.logs.refused" && e.detail.contains(&job.job_id)),
        "no control-plane audit entry: {audit:?}"
    );
    closed.stop();
    let out = closed.cli(&["audit", "list"]);
    let local = String::from_utf8_lossy(&out.stdout);
    assert!(
        local.lines().any(|l| l.contains("logs.refused") && l.contains(&job.job_id)),
        "no audit entry on the node:\n{local}"
    );

    // A finished job: its tails at once, without asking the node.
    let (ok, stdout, _) = follow_logs(&control, &job.job_id).await;
    assert!(ok);
    assert_eq!(stdout, "first-words\nlast-words\n");
    open.stop();
}
