//! Property tests of the node's parsers of untrusted input: signed job envelopes and their
//! specs, bundle files, a bundle's configuration part and object keys. Each property holds for
//! generated inputs, hostile ones included: no panic, a clear refusal, and a round trip to the
//! same bytes where a serialiser exists.
//!
//! The suite runs as a bounded smoke in `cargo test` (the case counts below). A longer run:
//! `PROPTEST_CASES=200000 cargo test -p outpost-node --lib parsers_props` (every property
//! then runs that many cases).

use std::io::Write;

use ed25519_dalek::{Signer, SigningKey};
use outpost_protocol::{ContainerSpec, JobAssignment, JobEnvelope, PublicKey, SignedEnvelope};
use proptest::prelude::*;

use crate::bundle::read::{Expect, manifest};
use crate::objstore::key;
use crate::verify::{ManifestVerifier, Rejection};

const NODE: &str = "node-1";

/// `default` cases, or `PROPTEST_CASES` for a longer run.
fn config(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

fn org_key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

fn public() -> PublicKey {
    PublicKey { key_id: "org-key".into(), ed25519_hex: hex::encode(org_key().verifying_key().to_bytes()) }
}

fn verifier() -> ManifestVerifier {
    ManifestVerifier::new(NODE, &public()).expect("verifier")
}

fn signed(job_id: &str, attempt: u32, payload: String) -> JobAssignment {
    let signature_hex = hex::encode(org_key().sign(payload.as_bytes()).to_bytes());
    JobAssignment {
        job_id: job_id.into(),
        attempt,
        envelope: SignedEnvelope { payload, key_id: "org-key".into(), signature_hex },
    }
}

/// Text that is mostly JSON-shaped, with the field names of an envelope, so the parser gets
/// past its first byte, plus any unicode.
fn jsonish() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("{".to_owned()),
        Just("}".to_owned()),
        Just("[".to_owned()),
        Just("]".to_owned()),
        Just(",".to_owned()),
        Just(":".to_owned()),
        Just("\"job_id\"".to_owned()),
        Just("\"node_id\"".to_owned()),
        Just("\"spec\"".to_owned()),
        Just("\"container\"".to_owned()),
        Just("\"image\"".to_owned()),
        Just("\"seq\"".to_owned()),
        Just("null".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("-1".to_owned()),
        Just("\"\\u0000\"".to_owned()),
        "\"[^\"\\\\]{0,12}\"",
        any::<String>(),
    ];
    prop::collection::vec(token, 0..24).prop_map(|parts| parts.concat())
}

prop_compose! {
    fn container_spec()(
        digest in "[0-9a-f]{64}",
        command in prop::collection::vec(any::<String>(), 0..4),
        env in prop::collection::btree_map("[A-Z_][A-Z0-9_]{0,8}", any::<String>(), 0..3),
        timeout in 1u64..86_400,
    ) -> ContainerSpec {
        serde_json::from_value(serde_json::json!({
            "image": format!("sha256:{digest}"),
            "command": command,
            "env": env,
            "timeout_secs": timeout,
        }))
        .expect("a generated spec is a spec")
    }
}

prop_compose! {
    fn job_envelope()(
        job_id in "[a-z0-9][a-z0-9-]{0,30}",
        attempt in 1u32..5,
        seq in 1u64..u64::MAX,
        issued in 0u64..u64::MAX / 2,
        ttl in 1u64..u64::MAX / 2,
        spec in container_spec(),
    ) -> JobEnvelope {
        JobEnvelope {
            job_id,
            attempt,
            org_id: "org".into(),
            node_id: NODE.into(),
            seq,
            issued_unix_ms: issued,
            expires_unix_ms: issued + ttl,
            spec: spec.into(),
            submitter: None,
            recipients: Vec::new(),
        }
    }
}

proptest! {
    #![proptest_config(config(400))]

    /// Whatever the org signs, the node parses it only as a job that names this node, the
    /// assignment and a usable spec: correctly signed junk is refused as malformed, not a panic.
    #[test]
    fn signed_junk_is_refused_not_run(payload in jsonish()) {
        match verifier().verify(&signed("job-1", 1, payload), 0, 0) {
            Err(Rejection::Malformed(_) | Rejection::WrongNode { .. } | Rejection::Mismatch { .. }
                | Rejection::Expired { .. } | Rejection::Replayed { .. } | Rejection::BadSpec(_)) => {}
            other => prop_assert!(false, "junk was not refused as such: {other:?}"),
        }
    }

    /// A signed envelope round-trips, verifies, and fails its signature when any one byte of
    /// the payload changes.
    #[test]
    fn one_changed_byte_breaks_the_signature(env in job_envelope(), at in any::<prop::sample::Index>()) {
        let payload = serde_json::to_string(&env).expect("serialise");
        let a = signed(&env.job_id, env.attempt, payload.clone());
        let ok = verifier().verify(&a, env.seq - 1, env.issued_unix_ms).expect("the signed job verifies");
        prop_assert_eq!(&ok, &env);
        let mut bytes = payload.into_bytes();
        // An ASCII byte, so the payload stays text (the envelope carries it as a string).
        let ascii: Vec<usize> = (0..bytes.len()).filter(|i| bytes[*i].is_ascii()).collect();
        let i = ascii[at.index(ascii.len())];
        bytes[i] = if bytes[i] == b'x' { b'y' } else { b'x' };
        let mut tampered = a.clone();
        tampered.envelope.payload = String::from_utf8(bytes).expect("still text");
        let refused = verifier().verify(&tampered, 0, 0);
        prop_assert!(matches!(refused, Err(Rejection::BadSignature { .. })), "{refused:?}");
    }
}

proptest! {
    #![proptest_config(config(3_000))]

    /// Envelopes are signed as bytes: parsing and serialising again gives the same bytes, so
    /// what the node stores and re-verifies after a restart is what the org signed.
    #[test]
    fn job_envelopes_round_trip_to_the_same_bytes(env in job_envelope()) {
        let text = serde_json::to_string(&env).expect("serialise");
        let back: JobEnvelope = serde_json::from_str(&text).expect("parse");
        prop_assert_eq!(serde_json::to_string(&back).expect("serialise"), text);
        prop_assert_eq!(back, env);
    }

    /// Object keys from a listing or a job: accepted keys keep the rules (non-empty, at most
    /// 1,024 bytes, no control character); any key prints as a bounded, escaped line.
    #[test]
    fn object_keys_are_checked_and_shown_safely(k in prop_oneof![
        any::<String>(),
        "[a-z./]{0,12}",
        prop::collection::vec(prop_oneof![Just(".."), Just("."), Just("/"), Just("a"), Just("\u{0}"), Just("é")], 0..300)
            .prop_map(|p| p.concat()),
    ]) {
        match key::validate(&k) {
            Ok(()) => {
                prop_assert!(!k.is_empty() && k.len() <= key::MAX_KEY_BYTES);
                prop_assert!(!k.chars().any(char::is_control));
            }
            Err(e) => prop_assert!(e.to_string().contains("key"), "{e}"),
        }
        let shown = key::display(&k);
        prop_assert!(shown.chars().count() <= 80 * 10 + 40, "{} chars shown", shown.chars().count());
        prop_assert!(!shown.chars().any(char::is_control));
        prop_assert_eq!(key::has_dot_segment(&k), k.split('/').any(|s| s == "." || s == ".."));
    }

    /// A bundle's configuration part: any text is refused or accepted with a reason, and an
    /// accepted table reads back the same after it is written out again.
    #[test]
    fn bundle_configuration_parts_parse_or_are_refused(text in prop_oneof![
        any::<String>(),
        prop::collection::vec(prop_oneof![
            Just("[node]\n".to_owned()),
            Just("[relay]\n".to_owned()),
            Just("[policy]\n".to_owned()),
            Just("profile = \"edge\"\n".to_owned()),
            Just("labels = { site = \"icu\" }\n".to_owned()),
            Just("poll_interval_secs = 5\n".to_owned()),
            "[a-z_]{1,10} = [0-9]{1,3}\n",
            "[a-z_]{1,10} = \"[^\"\\\\\n]{0,8}\"\n",
        ], 0..8).prop_map(|p| p.concat()),
    ]) {
        if let Ok(table) = crate::config::parse_bundle_config(&text) {
            let again = toml::to_string(&table).expect("an accepted table serialises");
            prop_assert_eq!(crate::config::parse_bundle_config(&again).expect("reads back"), table);
        }
    }
}

fn zstd(bytes: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(bytes, 1).expect("zstd")
}

/// A tar archive of the given members (names set raw, so hostile ones stay as they are).
fn tar_of(members: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, body) in members {
        let mut header = tar::Header::new_gnu();
        let n = name.len().min(100);
        header.as_old_mut().name[..n].copy_from_slice(&name[..n]);
        header.set_size(body.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(body);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

proptest! {
    #![proptest_config(config(2_000))]

    /// Bundle files that are not a bundle signed for this node (random bytes, compressed
    /// random bytes, archives of hostile members and truncations of them) are refused with a
    /// reason.
    #[test]
    fn bundle_files_that_are_not_bundles_are_refused(
        shape in 0u8..3,
        raw in prop::collection::vec(any::<u8>(), 0..2048),
        members in prop::collection::vec(
            (prop_oneof![
                Just(b"manifest.json".to_vec()),
                Just(b"../../etc/passwd".to_vec()),
                Just(b"/abs".to_vec()),
                prop::collection::vec(any::<u8>(), 1..40),
            ], prop::collection::vec(any::<u8>(), 0..300)),
            0..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let bytes = match shape {
            0 => raw,
            1 => zstd(&raw),
            _ => {
                let whole = zstd(&tar_of(&members));
                let keep = cut.index(whole.len() + 1);
                whole[..keep.max(whole.len() / 2)].to_vec()
            }
        };
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(&bytes).expect("write");
        let key = public();
        let expect = Expect { org_id: "org", org_keys: std::slice::from_ref(&key), node_id: NODE, now_unix_ms: 1 };
        let err = manifest(file.path(), &expect).expect_err("not a bundle signed for this node");
        prop_assert!(!err.to_string().is_empty());
    }
}
