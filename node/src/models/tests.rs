use ed25519_dalek::{Signer, SigningKey};
use outpost_protocol::{ModelFile, ModelFormat, ModelManifest, PublicKey, SignedModelManifest};

use super::copy::check_magic;
use super::*;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn manifest() -> ModelManifest {
    ModelManifest {
        name: "tiny".into(),
        version: "1.0".into(),
        format: ModelFormat::Gguf,
        engine: "llama".into(),
        license: "MIT".into(),
        files: vec![ModelFile { path: "model.gguf".into(), size: 4, sha256: sha256_hex(b"GGUF") }],
        embedding_dimensions: Vec::new(),
    }
}

fn sign(k: &SigningKey, m: &ModelManifest) -> SignedModelManifest {
    let payload = serde_json::to_string(m).expect("encode");
    SignedModelManifest {
        key_id: key_id_of(&k.verifying_key()),
        signature_hex: hex::encode(k.sign(payload.as_bytes()).to_bytes()),
        payload,
    }
}

fn trusting(k: &SigningKey) -> Publishers {
    Publishers::new(&[], &[hex::encode(k.verifying_key().as_bytes())]).expect("trust")
}

#[test]
fn a_manifest_signed_by_a_trusted_publisher_verifies_and_its_digest_is_the_payload_hash() {
    let signed = sign(&key(1), &manifest());
    let (m, digest) = verify_manifest(&signed, &trusting(&key(1))).expect("verifies");
    assert_eq!(m, manifest());
    assert_eq!(digest, sha256_hex(signed.payload.as_bytes()));
}

#[test]
fn the_org_key_from_the_identity_is_trusted_by_its_key_id() {
    let k = key(2);
    let org = PublicKey {
        key_id: key_id_of(&k.verifying_key()),
        ed25519_hex: hex::encode(k.verifying_key().as_bytes()),
    };
    let trust = Publishers::new(std::slice::from_ref(&org), &[]).expect("trust");
    assert_eq!(trust.key_ids(), vec![org.key_id.as_str()]);
    assert!(verify_manifest(&sign(&k, &manifest()), &trust).is_ok());
}

#[test]
fn an_altered_payload_an_unknown_key_and_no_trust_are_refused() {
    let mut signed = sign(&key(1), &manifest());
    signed.payload = signed.payload.replace("tiny", "tinx");
    assert!(matches!(verify_manifest(&signed, &trusting(&key(1))), Err(ModelError::BadSignature { .. })));
    let other = sign(&key(3), &manifest());
    assert!(matches!(verify_manifest(&other, &trusting(&key(1))), Err(ModelError::UnknownPublisher { .. })));
    assert!(matches!(verify_manifest(&other, &Publishers::default()), Err(ModelError::NoTrust)));
}

#[test]
fn manifest_claims_are_checked_after_the_signature() {
    let trust = trusting(&key(1));
    type Edit = fn(&mut ModelManifest);
    let cases: Vec<(Edit, &str)> = vec![
        (|m| m.files[0].path = "../model.gguf".into(), "'..'"),
        (|m| m.files[0].path = "/abs/model.gguf".into(), "absolute"),
        (|m| m.files[0].sha256 = "ABC".into(), "sha256"),
        (|m| m.engine = "onnx".into(), "engine"),
        (|m| m.name = "a b".into(), "name"),
        (|m| m.files[0].path = "model.bin".into(), "no file ends in .gguf"),
        (|m| m.files.push(m.files[0].clone()), "twice"),
        (|m| m.files[0].path = MANIFEST_FILE.into(), "reserved"),
        (|m| m.embedding_dimensions = vec![64], "embedding models"),
        (
            |m| {
                m.engine = "candle".into();
                m.embedding_dimensions = vec![128, 64];
            },
            "ascending",
        ),
        (
            |m| {
                m.engine = "candle".into();
                m.embedding_dimensions = vec![0];
            },
            "1 to 65536",
        ),
    ];
    for (edit, want) in cases {
        let mut m = manifest();
        edit(&mut m);
        let err = verify_manifest(&sign(&key(1), &m), &trust).expect_err(want).to_string();
        assert!(err.contains(want), "{err} should mention {want}");
    }
}

#[test]
fn relative_paths_must_stay_inside_the_model() {
    assert!(check_relative_path("a/b.safetensors").is_ok());
    for bad in ["", "/a", "a//b", "a/./b", "a/../b", "..", "a\\b", "a/", "a\nb"] {
        assert!(check_relative_path(bad).is_err(), "{bad:?} must be refused");
    }
}

#[test]
fn weight_files_are_recognised_by_their_first_bytes() {
    assert!(check_magic("m.gguf", ModelFormat::Gguf, b"GGUF\x03\0\0\0\0", 100).is_ok());
    let err =
        check_magic("m.gguf", ModelFormat::Gguf, b"GGML\x03\0\0\0\0", 100).expect_err("magic").to_string();
    assert!(err.contains("m.gguf") && err.contains("GGUF"), "{err}");
    let mut st = 2u64.to_le_bytes().to_vec();
    st.push(b'{');
    assert!(check_magic("m.safetensors", ModelFormat::Safetensors, &st, 10).is_ok());
    assert!(check_magic("m.safetensors", ModelFormat::Safetensors, &st, 9).is_err(), "header past the end");
    st[8] = b'[';
    assert!(check_magic("m.safetensors", ModelFormat::Safetensors, &st, 10).is_err());
    assert!(check_magic("m.safetensors", ModelFormat::Safetensors, b"{}", 2).is_err(), "too short");
}
