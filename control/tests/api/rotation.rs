//! Rotations: an organisation's job-signing key is announced to its nodes endorsed by the
//! current one, the current one signs through the overlap, and from its end the new one signs
//! everything handed to a node (work submitted before included). The node's trust document
//! carries the chain; a rotation that would strand old agents is refused unless forced.

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use outpost_control::testing::TestServer;
use outpost_protocol::{NodeTrust, PublicKey, RotateRequest, SignedEnvelope, key_rotation_message, paths};
use reqwest::StatusCode;

use crate::support::{TestNode, answer, assert_error, op_post, org_and_token, submit};

fn verifies(key: &PublicKey, message: &[u8], signature_hex: &str) -> bool {
    let bytes: [u8; 32] = hex::decode(&key.ed25519_hex).expect("hex").try_into().expect("32");
    let sig: [u8; 64] = hex::decode(signature_hex).expect("hex").try_into().expect("64");
    VerifyingKey::from_bytes(&bytes).expect("key").verify(message, &Signature::from_bytes(&sig)).is_ok()
}

fn signed_by(env: &SignedEnvelope, key: &PublicKey) -> bool {
    env.key_id == key.key_id && verifies(key, env.payload.as_bytes(), &env.signature_hex)
}

async fn trust(node: &TestNode) -> NodeTrust {
    let resp = node.http.get(format!("{}{}", node.base, paths::NODE_TRUST)).send().await.expect("sent");
    let (status, body) = answer(resp).await;
    assert_eq!(status, StatusCode::OK, "trust: {body}");
    serde_json::from_value(body).expect("a NodeTrust")
}

fn rotate_path(org: &str) -> String {
    paths::fill(paths::ORG_KEY_ROTATE, "org_id", org)
}

#[tokio::test]
async fn a_signing_key_rotation_is_endorsed_overlaps_and_then_signs_everything() {
    let server = TestServer::start().await.expect("server");
    let op = server.operator().expect("operator");
    let (org, token) = org_and_token(&server).await;
    let node = TestNode::enroll_announcing(
        &server.url(),
        server.ca_pem(),
        &token,
        Some(outpost_protocol::Announce::this_build()),
    )
    .await;
    let old = node.enrolled.org_signing_key.clone();
    let before = submit(&op, node.id()).await;
    let first = node.poll(&[], 0).await;
    let tag = first.trust.clone().expect("a trust tag for an agent that takes it");
    assert!(signed_by(&first.jobs[0].envelope, &old));
    let doc = trust(&node).await;
    assert_eq!(doc.tag, tag);
    assert_eq!(doc.org_keys.len(), 1);
    assert!(doc.ca_pem.contains("BEGIN CERTIFICATE") && doc.ca_rotation.is_none());

    // Bad overlaps are refused with a clear error.
    let bad = RotateRequest { overlap_secs: Some(5), force: false };
    assert_error(&op_post(&server, &rotate_path(&org), &bad).await, StatusCode::BAD_REQUEST, "bad_overlap");

    let rotated = op
        .rotate_org_key(&org, &RotateRequest { overlap_secs: Some(3600), force: false })
        .await
        .expect("rotated");
    assert!(rotated.nodes_left_behind.is_empty(), "{rotated:?}");
    assert_ne!(rotated.new_id, old.key_id);
    // A second rotation during the overlap is refused.
    let again = RotateRequest { overlap_secs: Some(60), force: false };
    assert_error(
        &op_post(&server, &rotate_path(&org), &again).await,
        StatusCode::CONFLICT,
        "rotation_in_progress",
    );

    // The node hears of it in its next poll answer, and the document endorses the new key.
    let during = node.poll(&[], 0).await;
    assert_ne!(during.trust.as_deref(), Some(tag.as_str()), "a new tag");
    let doc = trust(&node).await;
    assert_eq!(doc.org_keys.len(), 2, "{doc:?}");
    let (k1, k2) = (&doc.org_keys[0], &doc.org_keys[1]);
    assert_eq!(k1.key, old);
    assert!(!k1.retired && !k2.retired, "both trusted through the overlap");
    assert_eq!(k2.key.key_id, rotated.new_id);
    assert_eq!(k2.signs_from_unix_ms, rotated.switch_unix_ms);
    let message = key_rotation_message(&org, &k2.key, k2.signs_from_unix_ms);
    assert!(verifies(&old, message.as_bytes(), k2.endorsement_hex.as_deref().expect("endorsed")));
    // A forged endorsement would not verify: the message binds the organisation.
    assert!(!verifies(
        &old,
        key_rotation_message("org-other", &k2.key, k2.signs_from_unix_ms).as_bytes(),
        k2.endorsement_hex.as_deref().expect("endorsed")
    ));
    // Through the overlap the current key still signs.
    let during_job = submit(&op, node.id()).await;
    let jobs = node.poll(&[], 0).await.jobs;
    assert!(jobs.iter().all(|a| signed_by(&a.envelope, &old)), "{jobs:?}");
    assert_eq!(jobs.len(), 2);

    // At the end of the overlap the new key signs everything handed out, the old jobs too,
    // with the payload unchanged byte for byte.
    server.clock().advance(std::time::Duration::from_secs(3601));
    let new = k2.key.clone();
    let after = node.poll(&[], 0).await;
    assert_eq!(after.jobs.len(), 2);
    for (a, b) in after.jobs.iter().zip(&jobs) {
        assert!(signed_by(&a.envelope, &new), "re-signed with the new key: {a:?}");
        assert_eq!(a.envelope.payload, b.envelope.payload, "the same signed statement");
    }
    assert!(after.jobs.iter().any(|a| a.job_id == before.job_id));
    assert!(after.jobs.iter().any(|a| a.job_id == during_job.job_id));
    let doc = trust(&node).await;
    assert!(doc.org_keys[0].retired && !doc.org_keys[1].retired, "{doc:?}");
    assert_eq!(Some(doc.tag.clone()), after.trust);

    // A node enrolled now pins the new key; the next rotation is endorsed by it.
    let token2 = op.create_token(&org, None).await.expect("token");
    let fresh = TestNode::enroll(&server, &token2.token).await;
    assert_eq!(fresh.enrolled.org_signing_key, new);
    let third = op
        .rotate_org_key(&org, &RotateRequest { overlap_secs: Some(60), force: true })
        .await
        .expect("rotated");
    let doc = trust(&node).await;
    assert_eq!(doc.org_keys.len(), 3, "the chain keeps the old keys: {doc:?}");
    assert_eq!(doc.org_keys[2].key.key_id, third.new_id);
    let message = key_rotation_message(&org, &doc.org_keys[2].key, doc.org_keys[2].signs_from_unix_ms);
    assert!(verifies(
        &new,
        message.as_bytes(),
        doc.org_keys[2].endorsement_hex.as_deref().expect("endorsed")
    ));

    let audit = op.audit(50).await.expect("audit");
    assert_eq!(audit.entries.iter().filter(|e| e.action == "org.key_rotated").count(), 2);
}

#[tokio::test]
async fn a_rotation_that_would_strand_old_agents_is_refused_unless_forced() {
    let server = TestServer::start().await.expect("server");
    let op = server.operator().expect("operator");
    let (org, token) = org_and_token(&server).await;
    // An agent from before trust rotation announces nothing of it.
    let old = TestNode::enroll(&server, &token).await;
    let refused = op_post(&server, &rotate_path(&org), &RotateRequest::default()).await;
    assert_error(&refused, StatusCode::CONFLICT, "nodes_left_behind");
    assert!(refused.1["message"].as_str().is_some_and(|m| m.contains(old.id())), "{}", refused.1);
    let forced =
        op.rotate_org_key(&org, &RotateRequest { overlap_secs: None, force: true }).await.expect("forced");
    assert_eq!(forced.nodes_left_behind, vec![old.id().to_owned()]);
    let week = outpost_protocol::DEFAULT_OVERLAP_SECS * 1000;
    let now = server.clock().now_ms();
    assert!(forced.switch_unix_ms > now + week - 60_000 && forced.switch_unix_ms <= now + week);
}
