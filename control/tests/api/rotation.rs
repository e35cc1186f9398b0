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
    let node = TestNode::enroll_current(&server, server.ca_pem(), &token).await;
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
    // The switch, once seen, is stored: the organisation shows the new key, and a clock set
    // back afterwards does not bring the old one back.
    let shown = op.list_orgs().await.expect("orgs").into_iter().find(|o| o.id == org).expect("org");
    assert_eq!(shown.signing_key, new);
    server.clock().rewind(std::time::Duration::from_secs(3601));
    let rewound = node.poll(&[], 0).await;
    assert!(rewound.jobs.iter().all(|a| signed_by(&a.envelope, &new)), "still the new key after a step back");
    assert!(trust(&node).await.org_keys[0].retired);
    server.clock().advance(std::time::Duration::from_secs(3601));

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

/// Whether the CA certificate `ca_pem` signed `message` (ECDSA P-256 SHA-256, DER).
fn ca_signed(ca_pem: &str, message: &[u8], signature_hex: &str) -> bool {
    let (_, pem) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes()).expect("PEM");
    let cert = pem.parse_x509().expect("cert");
    let public = cert.public_key().subject_public_key.data.to_vec();
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, public)
        .verify(message, &hex::decode(signature_hex).expect("hex"))
        .is_ok()
}

fn issuer_of(cert_pem: &str) -> String {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).expect("PEM");
    pem.parse_x509().expect("cert").issuer().to_string()
}

fn subject_of(cert_pem: &str) -> String {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).expect("PEM");
    pem.parse_x509().expect("cert").subject().to_string()
}

/// A poll over a fresh connection trusting `ca_pem` with the client identity `(cert, key)`.
async fn poll_with(server: &TestServer, ca_pem: &str, cert: &str, key: &str) -> Result<StatusCode, String> {
    let http = crate::support::https(ca_pem, Some((cert, key)));
    let req = outpost_protocol::PollRequest { wait_secs: Some(0), ..Default::default() };
    http.post(format!("{}{}", server.url(), paths::NODE_POLL))
        .json(&req)
        .send()
        .await
        .map(|r| r.status())
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test]
async fn a_ca_rotation_is_announced_by_the_old_ca_and_switches_at_the_end_of_the_overlap() {
    let server = TestServer::start().await.expect("server");
    let old_ca = server.ca_pem().to_owned();
    let (org, token) = org_and_token(&server).await;
    let node = TestNode::enroll_current(&server, &old_ca, &token).await;
    let before = node.poll(&[], 0).await.trust.expect("a tag");

    // Only the admin token rotates the CA.
    let op = server.operator().expect("operator");
    let viewer =
        op.create_api_token(&org, "viewer", outpost_protocol::Role::Admin, None).await.expect("API token");
    let as_org = outpost_control::client::Client::new(&server.url(), &old_ca, &viewer.token).expect("client");
    let refused = as_org.rotate_ca(&RotateRequest::default()).await.expect_err("owner only");
    assert!(
        refused.to_string().contains("owner_only") || refused.to_string().contains("admin token"),
        "{refused}"
    );

    let rotated =
        op.rotate_ca(&RotateRequest { overlap_secs: Some(600), force: false }).await.expect("rotated");
    assert_ne!(rotated.new_id, server.ca_fingerprint());
    let again = op_post(&server, paths::CA_ROTATE, &RotateRequest::default()).await;
    assert_error(&again, StatusCode::CONFLICT, "rotation_in_progress");

    // The node hears of it, and the new CA is announced with the old CA's signature.
    assert_ne!(node.poll(&[], 0).await.trust.expect("a tag"), before);
    let doc = trust(&node).await;
    let rotation = doc.ca_rotation.clone().expect("a rotation under way");
    assert_eq!(rotation.switch_unix_ms, rotated.switch_unix_ms);
    assert_eq!(doc.ca_pem.matches("BEGIN CERTIFICATE").count(), 2, "both CAs through the overlap");
    let message = outpost_protocol::ca_rotation_message(&rotated.new_id, rotation.switch_unix_ms);
    assert!(ca_signed(&old_ca, message.as_bytes(), &rotation.signature_hex), "signed by the old CA");
    assert!(!ca_signed(&rotation.new_ca_pem, message.as_bytes(), &rotation.signature_hex));
    let new_ca = rotation.new_ca_pem.clone();

    // During the overlap the server still presents the old CA's certificate, and a renewal
    // comes from the new CA.
    assert_eq!(poll_with(&server, &old_ca, &node.enrolled.cert_pem, &node.key_pem).await, Ok(StatusCode::OK));
    let (csr_pem, key_pem) = crate::support::csr();
    let (status, body) =
        node.post(paths::NODE_CERTIFICATE, &outpost_protocol::RenewCertificateRequest { csr_pem }).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let renewed: outpost_protocol::RenewCertificateResponse = serde_json::from_value(body).expect("renewed");
    assert_eq!(issuer_of(&renewed.cert_pem), subject_of(&new_ca));
    // A node enrolling now pins both CAs.
    let token2 = op.create_token(&org, None).await.expect("token");
    let fresh = TestNode::enroll_announcing(&server.url(), &old_ca, &token2.token, None).await;
    assert_eq!(fresh.enrolled.ca_pem.matches("BEGIN CERTIFICATE").count(), 2);
    assert_eq!(issuer_of(&fresh.enrolled.cert_pem), subject_of(&new_ca), "new certificates: the new CA");
    // The server presents the old CA's certificate through the overlap.
    assert_eq!(
        poll_with(&server, &old_ca, &fresh.enrolled.cert_pem, &fresh.key_pem).await,
        Ok(StatusCode::OK)
    );

    // From the switch: the new CA's server certificate, and only its client certificates.
    server.clock().advance(std::time::Duration::from_secs(601));
    let err = poll_with(&server, &old_ca, &renewed.cert_pem, &key_pem).await.expect_err("old CA only");
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert_eq!(poll_with(&server, &new_ca, &renewed.cert_pem, &key_pem).await, Ok(StatusCode::OK));
    let both = format!("{old_ca}{new_ca}");
    assert!(
        poll_with(&server, &both, &node.enrolled.cert_pem, &node.key_pem).await.is_err(),
        "a client certificate of the old CA is refused after the switch"
    );
    let renewed_node = crate::support::https(&new_ca, Some((&renewed.cert_pem, &key_pem)));
    let resp =
        renewed_node.get(format!("{}{}", server.url(), paths::NODE_TRUST)).send().await.expect("trust");
    let doc: NodeTrust = resp.json().await.expect("a NodeTrust");
    assert!(doc.ca_rotation.is_none());
    assert_eq!(doc.ca_pem, new_ca, "the new CA alone");

    let audit = outpost_control::client::Client::new(&server.url(), &both, server.admin_token())
        .expect("client")
        .audit(20)
        .await
        .expect("audit");
    assert!(audit.entries.iter().any(|e| e.action == "ca.rotated" && e.detail.contains(&rotated.new_id)));

    // A clock set back after the switch does not bring the old CA back.
    server.clock().rewind(std::time::Duration::from_secs(601));
    let err = poll_with(&server, &old_ca, &renewed.cert_pem, &key_pem).await.expect_err("still the new CA");
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert_eq!(poll_with(&server, &new_ca, &renewed.cert_pem, &key_pem).await, Ok(StatusCode::OK));
}

#[tokio::test]
async fn a_rotation_under_way_survives_a_restart() {
    let server = TestServer::start().await.expect("server");
    let op = server.operator().expect("operator");
    let rotated =
        op.rotate_ca(&RotateRequest { overlap_secs: Some(3600), force: false }).await.expect("rotated");
    let old_fingerprint = server.ca_fingerprint().to_owned();
    let server = server.restart().await.expect("restarted");
    // Still in the overlap: the old CA is presented, the rotation is still announced.
    assert_eq!(server.ca_fingerprint(), old_fingerprint);
    let again = op_post(&server, paths::CA_ROTATE, &RotateRequest::default()).await;
    assert_error(&again, StatusCode::CONFLICT, "rotation_in_progress");
    assert!(again.1["message"].as_str().is_some_and(|m| m.contains(&rotated.new_id)), "{}", again.1);
}
