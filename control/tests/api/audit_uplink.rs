//! A node's audit log mirrored over the uplink: stored where it continues the copy held for the
//! node, and an entry edited, deleted or moved on the node is refused centrally and recorded.

use outpost_control::testing::TestServer;
use outpost_protocol::{AuditAck, AuditBatch, AuditRecord, paths};
use reqwest::StatusCode;

use crate::support::{TestNode, assert_error, org_and_token};

fn chain(n: u64) -> Vec<AuditRecord> {
    let mut out: Vec<AuditRecord> = Vec::new();
    for i in 0..n {
        out.push(AuditRecord::following(out.last(), 1_000 + i, "job.accepted", &format!("job {i}")));
    }
    out
}

async fn send(node: &TestNode, entries: &[AuditRecord]) -> AuditAck {
    let (status, body) = node.post(paths::NODE_AUDIT_UPLINK, &AuditBatch { entries: entries.to_vec() }).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    serde_json::from_value(body).expect("an AuditAck")
}

#[tokio::test]
async fn the_audit_log_is_mirrored_and_tampering_is_refused_centrally() {
    let server = TestServer::start().await.expect("server");
    let (_, token) = org_and_token(&server).await;
    let node = TestNode::enroll(&server, &token).await;
    let log = chain(6);

    let ack = send(&node, &log[..3]).await;
    assert_eq!((ack.stored, ack.up_to_seq, ack.refused), (3, 3, None));
    let ack = send(&node, &log[1..4]).await;
    assert_eq!((ack.stored, ack.up_to_seq, ack.refused), (1, 4, None), "a resend stores only what is new");

    let mut edited = log[4..].to_vec();
    edited[0].detail = "nothing happened".into();
    let deleted = log[5..].to_vec();
    let reordered = vec![log[5].clone(), log[4].clone()];
    for (what, batch, says) in [
        ("edited", edited, "was modified"),
        ("deleted", deleted, "missing"),
        ("reordered", reordered, "missing"),
    ] {
        let ack = send(&node, &batch).await;
        assert_eq!((ack.stored, ack.up_to_seq), (0, 4), "{what}");
        assert!(ack.refused.as_deref().is_some_and(|w| w.contains(says)), "{what}: {:?}", ack.refused);
    }
    let op = server.operator().expect("operator");
    let trail = op.audit(100).await.expect("audit");
    let refusals = trail.entries.iter().filter(|e| e.action == "node.audit.refused").count();
    assert_eq!(refusals, 3, "each refusal is in the control plane's trail");

    let ack = send(&node, &log[4..]).await;
    assert_eq!((ack.stored, ack.up_to_seq, ack.refused), (2, 6, None));
    let stored = op.node_audit(node.id(), 0).await.expect("node audit").entries;
    assert_eq!(stored, log);
    let mut walk = outpost_protocol::AuditWalk::new();
    assert_eq!(walk.step(&stored), Ok(true));

    let too_many = chain(outpost_protocol::MAX_AUDIT_BATCH as u64 + 1);
    let got = node.post(paths::NODE_AUDIT_UPLINK, &AuditBatch { entries: too_many }).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "batch_too_large");
}
