//! The node's identity over time, with real processes: a running agent renews a short-lived
//! client certificate two thirds into its life (a new key each time) and goes on working; the
//! certificate it started with is retired; `outpost identity rotate` does the same by hand; the
//! agent mirrors its audit log to the control plane, whose copy verifies.

#![allow(clippy::expect_used)]

mod common;
mod harness;

use std::time::{Duration, Instant};

use harness::{Control, Node, sh};

/// The node's certificate as the control plane holds it: (current, previous).
async fn certs(control: &Control, node_id: &str) -> (String, Option<String>) {
    let n = control.nodes(None).await.nodes.into_iter().find(|n| n.node_id == node_id).expect("node");
    (n.cert_sha256, n.previous_cert_sha256)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_agent_renews_its_short_lived_certificate_and_keeps_working() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // 30 s certificates: due for renewal 20 s after each issue.
    let control = Control::start_args(
        &harness::control_bin(),
        &tmp.path().join("control"),
        None,
        None,
        &["--node-cert-lifetime", "30s"],
    );
    let org = control.create_org("renewal").await;
    let config = "[control]\npoll_wait_secs = 1\n[agent]\nheartbeat_secs = 1\nshutdown_grace_secs = 3\n";
    let mut node = Node::enroll(&tmp.path().join("node"), &control, &org.id, config).await;
    let identity = node.dir.join("data/identity");
    let first_cert = std::fs::read_to_string(identity.join("node.crt")).expect("node.crt");
    let first_key = std::fs::read_to_string(identity.join("node.key")).expect("node.key");
    let (enrolled, _) = certs(&control, &node.node_id).await;
    node.start();

    // Two renewals, each taken into use (the control plane retires the certificate before it).
    let mut seen = vec![enrolled.clone()];
    let deadline = Instant::now() + Duration::from_secs(90);
    while seen.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "renewals seen: {seen:?}; agent log:\n{}",
            node.log.snapshot().join("\n")
        );
        let (current, previous) = certs(&control, &node.node_id).await;
        if previous.is_none() && !seen.contains(&current) {
            seen.push(current);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Well past the end of the enrollment certificate, work still flows.
    let job = control.submit(&node.node_id, sh("echo after renewal")).await;
    let r = control.wait_result(&job.job_id, Duration::from_secs(60)).await;
    assert_eq!(r.stdout_tail, "after renewal\n", "{r:?}");
    node.stop();

    assert_ne!(std::fs::read_to_string(identity.join("node.crt")).expect("node.crt"), first_cert);
    assert_ne!(std::fs::read_to_string(identity.join("node.key")).expect("node.key"), first_key, "a new key");
    assert!(!identity.join("node.next.json").exists(), "nothing left half done");
    assert!(node.log.contains("renewed this node's certificate"), "the agent says so");
    let audit = node.cli(&["audit", "list"]);
    assert!(String::from_utf8_lossy(&audit.stdout).contains("identity.renewed"), "audited on the node");
    let trail = control.audit().await;
    assert!(trail.entries.iter().filter(|e| e.action == "node.certificate_renewed").count() >= 2);
}

/// By hand: `outpost identity rotate` with the agent stopped, then the agent starts on the new
/// pair and the control plane retires the old certificate at its first call.
#[tokio::test(flavor = "multi_thread")]
async fn identity_rotate_replaces_the_key_and_the_agent_starts_on_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let control = Control::start(&tmp.path().join("control"), None);
    let org = control.create_org("rotation").await;
    let config = "[control]\npoll_wait_secs = 1\n[agent]\nheartbeat_secs = 1\nshutdown_grace_secs = 3\n";
    let mut node = Node::enroll(&tmp.path().join("node"), &control, &org.id, config).await;
    let identity = node.dir.join("data/identity");
    let (enrolled, _) = certs(&control, &node.node_id).await;
    let before = std::fs::read_to_string(identity.join("node.key")).expect("node.key");
    let out = node.cli(&["identity", "rotate"]);
    assert!(out.status.success(), "rotate: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("restart the agent"));
    assert_ne!(std::fs::read_to_string(identity.join("node.key")).expect("node.key"), before);
    let (current, previous) = certs(&control, &node.node_id).await;
    assert_ne!(current, enrolled);
    assert_eq!(previous.as_deref(), Some(enrolled.as_str()), "accepted until the new one is used");
    node.start();
    let job = control.submit(&node.node_id, sh("echo after rotation")).await;
    let r = control.wait_result(&job.job_id, Duration::from_secs(60)).await;
    assert_eq!(r.stdout_tail, "after rotation\n", "{r:?}");
    assert_eq!(certs(&control, &node.node_id).await, (current, None), "the old one retired");

    // The agent mirrors its audit log as it grows: the control plane's copy verifies from the
    // first entry, and is the node's own log as far as it goes.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = control.cli(&["audit", "verify", "--node", &node.node_id, "--json"]);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if report["whole"] == true && report["entries"].as_u64().unwrap_or_default() >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the control plane's copy: {report}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    node.stop();
    let copy: serde_json::Value =
        serde_json::from_str(&node_audit_text(&control, &node.node_id)).expect("JSON");
    let copy = copy["entries"].as_array().expect("entries").clone();
    let out = node.cli(&["audit", "list", "--json"]);
    let own: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert!(own.len() >= copy.len() && copy.len() >= 2, "node {} entries, copy {}", own.len(), copy.len());
    for (mine, theirs) in own.iter().zip(&copy) {
        assert_eq!((&mine["seq"], &mine["sha256"]), (&theirs["seq"], &theirs["sha256"]));
    }
}

/// The control plane's copy of the node's audit log, as `outpost-control` prints it.
fn node_audit_text(control: &Control, node_id: &str) -> String {
    let out = control.cli(&["audit", "list", "--node", node_id, "--json"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The certificates of `pem`.
fn cert_count(pem: &str) -> usize {
    pem.matches("BEGIN CERTIFICATE").count()
}

fn rotate(control: &Control, args: &[&str]) -> outpost_protocol::RotateResponse {
    let out = control.cli(&[&["--json"], args].concat());
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("a RotateResponse")
}

/// Waits until `what` holds, or fails with the agent's log.
async fn until(node: &Node, what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}; agent log:\n{}",
            node.log.snapshot().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rotations_reach_a_running_agent_and_a_node_offline_through_them_is_told_to_enroll_again() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut control = Control::start(&tmp.path().join("control"), None);
    let org = control.create_org("rotation").await;
    let config = "[control]\npoll_wait_secs = 1\n[agent]\nheartbeat_secs = 1\nshutdown_grace_secs = 3\n";
    let mut online = Node::enroll(&tmp.path().join("online"), &control, &org.id, config).await;
    // Enrolled with an agent that follows rotations, then away through both of them.
    let mut away = Node::enroll(&tmp.path().join("away"), &control, &org.id, config).await;
    online.start();
    let job = control.submit(&online.node_id, sh("echo before")).await;
    assert_eq!(control.wait_result(&job.job_id, Duration::from_secs(60)).await.stdout_tail, "before\n");
    let (enrolled_cert, _) = certs(&control, &online.node_id).await;

    // Both rotations at once, with the shortest overlap there is.
    let key = rotate(&control, &["org", "rotate-key", &org.id, "--overlap", "60s"]);
    let ca = rotate(&control, &["ca", "rotate", "--overlap", "60s"]);
    assert!(key.nodes_left_behind.is_empty() && ca.nodes_left_behind.is_empty(), "{key:?} {ca:?}");
    let rotated_at = Instant::now();
    control.op = harness::Operator::for_data_dir(&control.url, &control.dir);

    // The running agent learns the endorsed key and the signed CA, and renews from the new CA.
    let identity = online.dir.join("data/identity");
    let read = |name: &str| std::fs::read_to_string(identity.join(name)).unwrap_or_default();
    until(&online, "both keys and both CAs trusted", Duration::from_secs(30), || {
        read("trust.json").contains(&key.new_id) && cert_count(&read("ca.crt")) == 2
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while certs(&control, &online.node_id).await.0 == enrolled_cert {
        assert!(
            Instant::now() < deadline,
            "no renewal from the new CA:\n{}",
            online.log.snapshot().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let job = control.submit(&online.node_id, sh("echo during")).await;
    assert_eq!(control.wait_result(&job.job_id, Duration::from_secs(60)).await.stdout_tail, "during\n");

    // Past the switch: the new key signs, the server presents the new CA, and the agent
    // trusts only the new ones.
    let switch = Duration::from_secs(62);
    tokio::time::sleep(switch.saturating_sub(rotated_at.elapsed())).await;
    let job = control.submit(&online.node_id, sh("echo after")).await;
    assert_eq!(control.wait_result(&job.job_id, Duration::from_secs(60)).await.stdout_tail, "after\n");
    until(&online, "the old key and CA dropped", Duration::from_secs(30), || {
        let trust: serde_json::Value = serde_json::from_str(&read("trust.json")).unwrap_or_default();
        trust["org_keys"].as_array().is_some_and(|k| k.len() == 1 && k[0]["key_id"] == key.new_id.as_str())
            && cert_count(&read("ca.crt")) == 1
    })
    .await;
    assert!(online.log.contains("took the control plane's trust rotation"));

    // The node that was away through the whole overlap cannot connect, and says what to do.
    away.start();
    assert!(
        away.log.wait_for("enroll this node again", Duration::from_secs(30)),
        "the agent says what to do:\n{}",
        away.log.snapshot().join("\n")
    );
    away.stop();
    control.fingerprint = ca.new_id.clone();
    away.enroll_again(&control, &org.id).await;
    away.start();
    let job = control.submit(&away.node_id, sh("echo back")).await;
    assert_eq!(control.wait_result(&job.job_id, Duration::from_secs(60)).await.stdout_tail, "back\n");
}
