use ed25519_dalek::{Signer, SigningKey};
use outpost_protocol::{ContainerSpec, SignedEnvelope};

use super::*;

const NODE: &str = "node-1";

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

fn public(k: &SigningKey) -> PublicKey {
    PublicKey { key_id: "org-key".into(), ed25519_hex: hex::encode(k.verifying_key().to_bytes()) }
}

fn envelope(seq: u64, expires: u64) -> JobEnvelope {
    JobEnvelope {
        job_id: "job-1".into(),
        attempt: 1,
        org_id: "org".into(),
        node_id: NODE.into(),
        seq,
        issued_unix_ms: 1,
        expires_unix_ms: expires,
        spec: serde_json::from_value::<ContainerSpec>(
            serde_json::json!({ "image": format!("sha256:{}", "a".repeat(64)) }),
        )
        .expect("spec"),
    }
}

fn sign_payload(k: &SigningKey, payload: String) -> JobAssignment {
    let signature_hex = hex::encode(k.sign(payload.as_bytes()).to_bytes());
    JobAssignment {
        job_id: "job-1".into(),
        attempt: 1,
        envelope: SignedEnvelope { payload, key_id: "org-key".into(), signature_hex },
    }
}

fn sign(k: &SigningKey, env: &JobEnvelope) -> JobAssignment {
    sign_payload(k, serde_json::to_string(env).expect("ser"))
}

fn verifier() -> ManifestVerifier {
    ManifestVerifier::new(NODE, &public(&key())).expect("verifier")
}

#[test]
fn a_correctly_signed_fresh_manifest_is_accepted() {
    let env = verifier().verify(&sign(&key(), &envelope(5, 100)), 4, 50).expect("accepted");
    assert_eq!(env.seq, 5);
}

#[test]
fn a_manifest_signed_by_another_key_is_refused() {
    let other = SigningKey::from_bytes(&[9u8; 32]);
    let err = verifier().verify(&sign(&other, &envelope(5, 100)), 0, 50).expect_err("forged");
    assert_eq!(err, Rejection::BadSignature { key_id: "org-key".into() });
}

#[test]
fn an_altered_payload_is_refused() {
    let mut a = sign(&key(), &envelope(5, 100));
    a.envelope.payload = a.envelope.payload.replace("\"seq\":5", "\"seq\":6");
    assert!(matches!(verifier().verify(&a, 0, 50), Err(Rejection::BadSignature { .. })));
}

#[test]
fn an_unknown_key_id_is_refused_by_name() {
    let mut a = sign(&key(), &envelope(5, 100));
    a.envelope.key_id = "someone-else".into();
    let err = verifier().verify(&a, 0, 50).expect_err("unknown key");
    assert!(err.to_string().contains("someone-else"), "{err}");
}

#[test]
fn an_expired_manifest_is_refused() {
    let err = verifier().verify(&sign(&key(), &envelope(5, 100)), 0, 100).expect_err("expired");
    assert!(matches!(err, Rejection::Expired { .. }));
}

#[test]
fn a_replayed_sequence_is_refused() {
    let err = verifier().verify(&sign(&key(), &envelope(5, 100)), 5, 50).expect_err("replay");
    assert_eq!(err, Rejection::Replayed { seq: 5, last: 5 });
}

#[test]
fn unknown_fields_in_a_signed_payload_are_refused() {
    let mut v = serde_json::to_value(envelope(5, 100)).expect("value");
    v["spec"]["privileged"] = serde_json::json!(true);
    let err = verifier().verify(&sign_payload(&key(), v.to_string()), 0, 50).expect_err("unknown field");
    assert!(matches!(&err, Rejection::Malformed(m) if m.contains("privileged")), "{err}");
}

#[test]
fn a_manifest_for_another_node_is_refused() {
    let mut env = envelope(5, 100);
    env.node_id = "node-2".into();
    assert!(matches!(verifier().verify(&sign(&key(), &env), 0, 50), Err(Rejection::WrongNode { .. })));
}

#[test]
fn an_image_by_tag_is_refused() {
    let mut env = envelope(5, 100);
    env.spec.image = "busybox:latest".into();
    let err = verifier().verify(&sign(&key(), &env), 0, 50).expect_err("tag");
    assert!(err.to_string().contains("sha256:"), "{err}");
}

#[test]
fn a_garbage_signature_is_refused_not_panicked_on() {
    let mut a = sign(&key(), &envelope(5, 100));
    a.envelope.signature_hex = "zz".into();
    assert!(matches!(verifier().verify(&a, 0, 50), Err(Rejection::BadSignature { .. })));
}
