//! Results sealed for their requester, end to end with the real control plane, agent, Docker
//! engine and Debian's `age`: a site that requires sealing refuses a job without recipients;
//! a sealed job's output tails reach the control plane only as an age file, which the
//! requester opens with `outpost-control job result --identity`, the site with its own key
//! (`seal_also_to`), and Debian's `age -d` opens the same bytes; one flipped byte and it opens
//! for nobody.

#![allow(clippy::expect_used)]

mod common;
mod harness;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use harness::{Control, Node, sh};
use outpost_protocol::Outcome;

const RESULT_WAIT: Duration = Duration::from_secs(120);
const CONFIG: &str = "[control]\npoll_wait_secs = 5\n[agent]\nheartbeat_secs = 1\nshutdown_grace_secs = 3\n\
                      [egress]\nallow_logs = true\n";

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Every file under `dir` that holds `needle` byte for byte.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if std::fs::read(&path).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)) {
                found.push(path);
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sealed_result_opens_for_its_requester_the_site_and_debians_age_and_is_never_stored_in_clear() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let keys = tmp.path().join("keys");
    std::fs::create_dir_all(&keys).expect("mkdir");
    let (requester, requester_key) = common::age_keygen(&keys, "requester");
    let (site, site_key) = common::age_keygen(&keys, "site");
    let (_, stranger_key) = common::age_keygen(&keys, "stranger");

    let control = Control::start(&tmp.path().join("control"), None);
    let org = control.create_org("hospital").await;
    let policy = format!("[policy]\nrequire_sealed = true\nseal_also_to = [\"{site}\"]\n");
    let mut node =
        Node::enroll(&tmp.path().join("node"), &control, &org.id, &format!("{CONFIG}{policy}")).await;
    let _containers = common::RemoveNodeContainers(node.node_id.clone());
    node.start();

    // The site requires sealing: a job without recipients is refused, naming the rule.
    let plain = control.submit(&node.node_id, sh("echo never")).await;
    let r = control.wait_result(&plain.job_id, RESULT_WAIT).await;
    assert_eq!(r.outcome, Outcome::Refused, "{r:?}");
    assert!(r.error.as_deref().is_some_and(|e| e.contains("policy.require_sealed")), "{r:?}");

    // A malformed recipient is refused by the operator's CLI before anything is sent.
    let image = common::test_image();
    let bad = control.cli(&[
        "job",
        "submit",
        "--node",
        &node.node_id,
        "--image",
        &image,
        "--recipient",
        "age1nope",
    ]);
    assert!(!bad.status.success() && text(&bad).contains("not an age X25519 public key"), "{}", text(&bad));

    // Sealed for the requester, submitted through the CLI.
    let submitted = control.cli(&[
        "job",
        "submit",
        "--node",
        &node.node_id,
        "--image",
        &image,
        "--recipient",
        &requester,
        "--",
        "sh",
        "-c",
        // What it prints is not in its command: the control plane keeps the spec in clear.
        "echo patient-$((4700 + 11)) benign; echo low-contrast-$(echo warning) >&2",
    ]);
    assert!(submitted.status.success(), "{}", text(&submitted));
    let job_id = String::from_utf8_lossy(&submitted.stdout).trim().to_owned();
    let r = control.wait_result(&job_id, RESULT_WAIT).await;
    assert_eq!((r.outcome, r.exit_code), (Outcome::Succeeded, Some(0)), "{r:?}");
    assert!(r.stdout_tail.is_empty() && r.stderr_tail.is_empty(), "tails in clear: {r:?}");
    assert!(r.sealed.is_some(), "{r:?}");

    // The control plane never held the output in clear: not in its store, not in its log.
    for secret in ["patient-4711", "low-contrast-warning"] {
        let found = files_holding(&control.dir, secret.as_bytes());
        assert!(found.is_empty(), "{secret} in clear in {found:?}");
        assert!(!control.log.contains(secret), "{secret} in the control plane's log");
    }

    // The requester opens it with the operator's CLI; a stranger cannot.
    let opened =
        control.cli(&["job", "result", &job_id, "--identity", requester_key.to_str().expect("utf8")]);
    assert!(opened.status.success(), "{}", text(&opened));
    assert!(text(&opened).contains("patient-4711 benign") && text(&opened).contains("low-contrast-warning"));
    let refused =
        control.cli(&["job", "result", &job_id, "--identity", stranger_key.to_str().expect("utf8")]);
    assert!(!refused.status.success() && text(&refused).contains("cannot be opened"), "{}", text(&refused));
    let unopened = control.cli(&["job", "result", &job_id]);
    assert!(
        text(&unopened).contains("sealed") && !text(&unopened).contains("patient-4711"),
        "{}",
        text(&unopened)
    );

    // Debian's age opens the same bytes, with the site's key too (seal_also_to).
    let armoured = control.cli(&["job", "result", &job_id, "--sealed"]);
    assert!(armoured.status.success(), "{}", text(&armoured));
    let file = tmp.path().join("result.age");
    std::fs::write(&file, &armoured.stdout).expect("write");
    for key in [&requester_key, &site_key] {
        let age = Command::new("age").arg("-d").arg("-i").arg(key).arg(&file).output().expect("run age");
        assert!(age.status.success(), "age -d: {}", text(&age));
        let part: serde_json::Value = serde_json::from_slice(&age.stdout).expect("the sealed part is JSON");
        assert_eq!(part["stdout_tail"], "patient-4711 benign\n", "{part}");
        assert_eq!(part["stderr_tail"], "low-contrast-warning\n", "{part}");
    }

    // One flipped byte in the body and it opens for nobody, saying so.
    let mut bytes = armoured.stdout.clone();
    let body_at = bytes.iter().position(|&b| b == b'\n').expect("header line") + 10;
    bytes[body_at] = if bytes[body_at] == b'A' { b'B' } else { b'A' };
    std::fs::write(&file, &bytes).expect("write");
    let age =
        Command::new("age").arg("-d").arg("-i").arg(&requester_key).arg(&file).output().expect("run age");
    assert!(!age.status.success() && !age.stderr.is_empty(), "a flipped byte opened: {}", text(&age));

    // After the end, `job logs` has only the sealed tails: closed without the identity.
    let logs = control.cli(&["job", "logs", &job_id]);
    assert!(!text(&logs).contains("patient-4711"), "{}", text(&logs));
    assert!(text(&logs).contains("sealed"), "{}", text(&logs));
    let logs = control.cli(&["job", "logs", &job_id, "--identity", requester_key.to_str().expect("utf8")]);
    assert!(text(&logs).contains("patient-4711 benign"), "{}", text(&logs));

    // Live output of a sealed job leaves sealed too, piece by piece, and opens as it arrives.
    let live = control
        .submit_request(&outpost_protocol::SubmitJobRequest {
            recipients: vec![requester.clone()],
            ..outpost_protocol::SubmitJobRequest::for_node(
                &node.node_id,
                sh("echo live-$((40 + 2))-secret; sleep 4; echo done-$((1 + 1))"),
            )
        })
        .await;
    let (ctl, key, id) = (control.cli_command(), requester_key.clone(), live.job_id.clone());
    let followed = tokio::task::spawn_blocking(move || {
        let mut c = ctl;
        c.args(["job", "logs", &id, "--follow", "--identity"]).arg(&key).output().expect("job logs")
    })
    .await
    .expect("join");
    assert!(followed.status.success(), "{}", text(&followed));
    let out = String::from_utf8_lossy(&followed.stdout);
    assert!(out.contains("live-42-secret") && out.contains("done-2"), "{}", text(&followed));
    assert!(!out.contains("BEGIN AGE"), "ciphertext printed: {out}");
    assert_eq!(control.wait_result(&live.job_id, RESULT_WAIT).await.outcome, Outcome::Succeeded);
    for secret in ["live-42-secret", "done-2"] {
        let found = files_holding(&control.dir, secret.as_bytes());
        assert!(found.is_empty(), "{secret} in clear in {found:?}");
        assert!(!control.log.contains(secret), "{secret} in the control plane's log");
    }

    // The node's ledger keeps the sealed result it sent, and its audit says nothing in clear.
    node.stop();
    let audit = node.cli(&["audit", "list"]);
    assert!(!String::from_utf8_lossy(&audit.stdout).contains("patient-4711"));
}
