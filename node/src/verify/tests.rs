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
        .expect("spec")
        .into(),
        submitter: None,
        recipients: Vec::new(),
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
    container(&mut env).image = "busybox:latest".into();
    let err = verifier().verify(&sign(&key(), &env), 0, 50).expect_err("tag");
    assert!(err.to_string().contains("sha256:"), "{err}");
}

#[test]
fn a_garbage_signature_is_refused_not_panicked_on() {
    let mut a = sign(&key(), &envelope(5, 100));
    a.envelope.signature_hex = "zz".into();
    assert!(matches!(verifier().verify(&a, 0, 50), Err(Rejection::BadSignature { .. })));
}

fn with_data(inputs: &[&str], output_prefix: Option<&str>, egress: &[&str]) -> JobEnvelope {
    let mut env = envelope(5, 100);
    container(&mut env).inputs = inputs.iter().map(|s| (*s).to_owned()).collect();
    container(&mut env).output_prefix = output_prefix.map(str::to_owned);
    container(&mut env).egress_bodies = egress.iter().map(|s| (*s).to_owned()).collect();
    env
}

#[test]
fn job_data_keys_that_map_onto_safe_paths_are_accepted() {
    let env = with_data(&["data/a.csv", "batch/"], Some("results/run-1/"), &["results/run-1/summary.txt"]);
    assert!(verifier().verify(&sign(&key(), &env), 4, 50).is_ok());
}

#[test]
fn hostile_job_data_keys_are_refused_with_the_field_and_the_reason() {
    for (env, field, why) in [
        (with_data(&["../etc/passwd"], None, &[]), "inputs", "'..'"),
        (with_data(&["/abs"], None, &[]), "inputs", "'/'"),
        (with_data(&["a//b"], None, &[]), "inputs", "empty path segment"),
        (with_data(&["a\0b"], None, &[]), "inputs", "U+0000"),
        (with_data(&[], Some("out/../../x/"), &[]), "output_prefix", "'..'"),
        (with_data(&[], Some(""), &[]), "output_prefix", "empty"),
        (with_data(&[], Some("o/"), &["o/./x"]), "egress_bodies", "'.'"),
        (with_data(&[], None, &["o/x"]), "egress_bodies", "no output_prefix"),
    ] {
        let err = verifier().verify(&sign(&key(), &env), 4, 50).expect_err(why);
        let text = err.to_string();
        assert!(matches!(err, Rejection::BadSpec(_)), "{text}");
        assert!(text.contains(field) && text.contains(why), "{field}/{why}: {text}");
    }
    let many: Vec<String> = (0..=MAX_INPUT_ENTRIES).map(|i| format!("k{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let err = verifier().verify(&sign(&key(), &with_data(&many, None, &[])), 4, 50).expect_err("too many");
    assert!(err.to_string().contains("65 entries"), "{err}");
}

fn container(env: &mut JobEnvelope) -> &mut ContainerSpec {
    match &mut env.spec {
        JobSpec::Container(c) => c,
        JobSpec::Inference(_) => panic!("not a container spec"),
    }
}

fn inference_envelope(spec: serde_json::Value) -> JobEnvelope {
    let mut env = envelope(1, u64::MAX);
    env.spec = JobSpec::Inference(serde_json::from_value(spec).expect("inference spec"));
    env
}

#[test]
fn inference_specs_are_checked_like_container_specs() {
    let model = "b".repeat(64);
    let ok = inference_envelope(serde_json::json!({"kind": "generate", "model": model, "prompt": "hi"}));
    assert_eq!(check_spec(&ok), Ok(()));
    let ok =
        inference_envelope(serde_json::json!({"kind": "embed", "model": model, "texts_key": "in/t.jsonl"}));
    assert_eq!(check_spec(&ok), Ok(()));
    for (spec, want) in [
        (serde_json::json!({"kind": "generate", "model": "tiny", "prompt": "hi"}), "model digest"),
        (serde_json::json!({"kind": "generate", "model": model}), "exactly one of prompt"),
        (
            serde_json::json!({"kind": "generate", "model": model, "prompt": "x", "max_tokens": 0}),
            "max_tokens",
        ),
        (
            serde_json::json!({"kind": "generate", "model": model, "prompt": "x", "temperature": 9.0}),
            "temperature",
        ),
        (serde_json::json!({"kind": "generate", "model": model, "prompt_key": "../etc/passwd"}), "input key"),
        (
            serde_json::json!({"kind": "embed", "model": model, "texts": ["a"], "output_prefix": "/abs"}),
            "output_prefix",
        ),
        (serde_json::json!({"kind": "embed", "model": model, "texts_key": "dir/"}), "names a prefix"),
        (
            serde_json::json!({"kind": "embed", "model": model, "texts": ["a"], "prompt": "x"}),
            "generate jobs",
        ),
    ] {
        let err = check_spec(&inference_envelope(spec.clone())).expect_err("refused");
        assert!(err.contains(want), "{spec}: {err}");
    }
}
