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

/// Every key of a whole configuration (dotted, as an operator writes it) with its default value:
/// what an empty file loads to.
fn config_keys() -> &'static Vec<(String, toml::Value)> {
    static KEYS: std::sync::OnceLock<Vec<(String, toml::Value)>> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        let loaded =
            crate::config::Config::load_with_env(Some(file.path()), &Default::default()).expect("defaults");
        let mut keys = Vec::new();
        fn flatten(prefix: &str, table: &toml::Table, out: &mut Vec<(String, toml::Value)>) {
            for (k, v) in table {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                match v {
                    toml::Value::Table(t) => flatten(&key, t, out),
                    v => out.push((key, v.clone())),
                }
            }
        }
        let table = toml::Table::try_from(&loaded.config).expect("a config serialises");
        flatten("", &table, &mut keys);
        keys
    })
}

/// A value for a key whose default is `like`: mostly of its type, sometimes of another.
fn toml_value(like: toml::Value) -> BoxedStrategy<toml::Value> {
    let same: BoxedStrategy<toml::Value> = match like {
        toml::Value::Boolean(_) => any::<bool>().prop_map(toml::Value::Boolean).boxed(),
        toml::Value::Integer(_) => {
            prop_oneof![0i64..100_000, any::<i64>()].prop_map(toml::Value::Integer).boxed()
        }
        toml::Value::Float(_) => any::<f64>().prop_map(toml::Value::Float).boxed(),
        toml::Value::Array(_) => {
            prop::collection::vec("[a-z0-9/:._*=-]{0,16}".prop_map(toml::Value::String), 0..4)
                .prop_map(toml::Value::Array)
                .boxed()
        }
        // The default itself (an enum's name, a path) half the time.
        toml::Value::String(s) => prop_oneof![
            4 => Just(s),
            2 => "[a-z0-9/._-]{1,16}",
            2 => "[0-9]{1,4}[smhd]",
            1 => any::<String>()
        ]
        .prop_map(toml::Value::String)
        .boxed(),
        other => Just(other).boxed(),
    };
    prop_oneof![
        24 => same,
        1 => any::<String>().prop_map(toml::Value::String),
        1 => any::<i64>().prop_map(toml::Value::Integer),
        1 => any::<bool>().prop_map(toml::Value::Boolean),
    ]
    .boxed()
}

/// A configuration file: known keys with generated values, now and then an unknown one.
fn config_file() -> impl Strategy<Value = toml::Table> {
    let known = prop::sample::select(config_keys().clone())
        .prop_flat_map(|(key, like)| (Just(key), toml_value(like)));
    let unknown = ("[a-z]{1,8}(\\.[a-z]{1,8})?", any::<i64>().prop_map(toml::Value::Integer));
    prop::collection::vec(prop_oneof![30 => known, 1 => unknown], 0..8).prop_map(|pairs| {
        let mut table = toml::Table::new();
        for (key, value) in pairs {
            let mut at = &mut table;
            let mut parts: Vec<&str> = key.split('.').collect();
            let last = parts.pop().unwrap_or_default();
            for p in parts {
                let entry = at.entry(p).or_insert_with(|| toml::Value::Table(toml::Table::new()));
                if !entry.is_table() {
                    *entry = toml::Value::Table(toml::Table::new());
                }
                let toml::Value::Table(next) = entry else { unreachable!("made a table just above") };
                at = next;
            }
            at.insert(last.to_owned(), value);
        }
        table
    })
}

proptest! {
    #![proptest_config(config(500))]

    /// A whole configuration file is accepted or refused with a reason, never a panic; an
    /// accepted one, written out as the node understood it, loads back to the same.
    #[test]
    fn configuration_files_load_or_are_refused_and_round_trip(
        table in config_file(),
        garbage in prop::bool::weighted(0.25),
        noise in any::<String>(),
    ) {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("outpost.toml");
        let mut text = toml::to_string(&table).expect("a table serialises");
        if garbage {
            text.push_str(&noise);
        }
        std::fs::write(&path, &text).expect("write");
        match crate::config::Config::load_with_env(Some(&path), &Default::default()) {
            Err(e) => prop_assert!(!e.to_string().is_empty()),
            Ok(loaded) => {
                let again = toml::to_string(&loaded.config).expect("a loaded config serialises");
                std::fs::write(&path, &again).expect("write");
                let reloaded = crate::config::Config::load_with_env(Some(&path), &Default::default());
                prop_assert!(reloaded.is_ok(), "written out, it no longer loads: {again}\n{:?}", reloaded.err());
                prop_assert_eq!(reloaded.map(|l| l.config).ok(), Some(loaded.config));
            }
        }
    }
}

/// A key made from `seed`, as the protocol names it.
fn chain_key(seed: u8) -> (SigningKey, PublicKey) {
    let sk = SigningKey::from_bytes(&[seed; 32]);
    let public = sk.verifying_key();
    let key_id = crate::models::key_id_of(&public);
    (sk, PublicKey { key_id, ed25519_hex: hex::encode(public.to_bytes()) })
}

fn pinned_ca() -> &'static String {
    static CA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CA.get_or_init(|| {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.self_signed(&key).expect("CA").pem()
    })
}

proptest! {
    #![proptest_config(config(1_000))]

    /// Whatever chain a trust document lists (keys endorsed properly or not, by the key before
    /// them or by another, retired or not), the node ends up trusting exactly the listed keys,
    /// not retired, that an unbroken chain of valid endorsements links to a key it held, or
    /// changes nothing and says why.
    #[test]
    fn a_trust_document_adds_only_endorsed_keys(
        entries in prop::collection::vec((1u8..12, 0u8..4, any::<bool>(), 0u64..10_000), 1..7),
        held in prop::collection::vec(1u8..12, 1..3),
    ) {
        let held: Vec<PublicKey> = held.iter().map(|s| chain_key(*s).1).collect();
        let mut doc_keys = Vec::new();
        let mut previous: Option<(SigningKey, PublicKey)> = None;
        for (seed, how, retired, signs_from) in &entries {
            let (sk, public) = chain_key(*seed);
            // 0: endorsed by the key before; 1: by a stranger; 2: over another org; 3: not at all.
            let endorsement = previous.as_ref().and_then(|(prev, _)| {
                let message = outpost_protocol::key_rotation_message("org", &public, *signs_from);
                match how {
                    0 => Some(hex::encode(prev.sign(message.as_bytes()).to_bytes())),
                    1 => Some(hex::encode(chain_key(99).0.sign(message.as_bytes()).to_bytes())),
                    2 => {
                        let other = outpost_protocol::key_rotation_message("org-2", &public, *signs_from);
                        Some(hex::encode(prev.sign(other.as_bytes()).to_bytes()))
                    }
                    _ => None,
                }
            });
            doc_keys.push(outpost_protocol::OrgKey {
                key: public.clone(),
                signs_from_unix_ms: *signs_from,
                endorsement_hex: endorsement,
                retired: *retired,
            });
            previous = Some((sk, public));
        }
        // What the node may trust: walk the chain as the rules say.
        let mut trusted: Vec<String> = held.iter().map(|k| k.key_id.clone()).collect();
        let mut poisoned = false;
        for (i, (_, how, _, _)) in entries.iter().enumerate() {
            let id = doc_keys[i].key.key_id.clone();
            if trusted.contains(&id) || i == 0 {
                continue;
            }
            let prev = &doc_keys[i - 1].key.key_id;
            if trusted.contains(prev) {
                if *how == 0 {
                    trusted.push(id);
                } else if *how != 3 {
                    poisoned = true; // a bad signature by a trusted key's successor: refused outright
                }
            }
        }
        let expected: Vec<PublicKey> = doc_keys
            .iter()
            .filter(|e| !e.retired && trusted.contains(&e.key.key_id))
            .map(|e| e.key.clone())
            .collect();
        let doc = outpost_protocol::NodeTrust {
            tag: "t".into(),
            ca_pem: pinned_ca().clone(),
            ca_rotation: None,
            org_keys: doc_keys,
        };
        match crate::rotation::apply("org", &held, pinned_ca(), &doc) {
            Ok(applied) => {
                prop_assert!(!poisoned, "a forged endorsement was let through");
                prop_assert_eq!(applied.org_keys, expected);
            }
            Err(e) => prop_assert!(poisoned || expected.is_empty(), "refused a good document: {}", e),
        }
    }
}

/// An object key as a site's object store may list it: ordinary paths, hostile ones (`..`,
/// control characters, very long) and any unicode.
fn listed_key() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9/_.-]{0,40}(\\.json|\\.JSON|\\.dcm|\\.txt|)",
        "(\\.\\./|/|%2e%2e/|\\x00|\\n|\\\\){1,6}[a-z.]{0,8}",
        any::<String>(),
        "[a-z]{1,8}".prop_map(|s| format!("{}.json", s.repeat(200))),
    ]
}

/// A body as an object may hold it: FHIR-ish JSON, other JSON, broken JSON or raw bytes.
fn listed_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        ("[A-Za-z]{0,12}", any::<i64>(), "[ -~]{0,20}").prop_map(|(rt, n, s)| {
            serde_json::json!({"resourceType": rt, "id": n, "status": s}).to_string().into_bytes()
        }),
        any::<i64>().prop_map(|n| serde_json::json!({"resourceType": n}).to_string().into_bytes()),
        jsonish().prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..512),
    ]
}

fn relay_rules() -> impl Strategy<Value = crate::relay::config::Rules> {
    (
        prop::option::of(0u64..1024),
        prop::collection::vec(
            prop_oneof![Just(".json".to_owned()), Just(".DCM".to_owned()), "[a-z.]{0,4}"],
            0..3,
        ),
        prop::option::of(prop::collection::vec(
            prop_oneof![Just("application/json".to_owned()), "[a-z/]{0,12}"],
            0..3,
        )),
        any::<bool>(),
        prop::option::of(prop::collection::vec(
            prop_oneof![Just("Patient".to_owned()), "[A-Za-z]{0,8}"],
            0..3,
        )),
    )
        .prop_map(|(max_size_bytes, allowed_suffixes, allowed_content_types, json_well_formed, fhir)| {
            crate::relay::config::Rules {
                max_size_bytes,
                allowed_suffixes,
                allowed_content_types,
                json_well_formed,
                fhir_resource_types: fhir,
                json_schema: None,
            }
        })
}

proptest! {
    #![proptest_config(config(3_000))]

    /// One entry of a relay listing (key, listed size, body) is judged without a panic; the
    /// verdict's hash and size are the body's own, an accepted FHIR object names an allowed
    /// resource type, an accepted object obeys every metadata rule, and the event it makes
    /// round-trips through the wire form.
    #[test]
    fn relay_listing_entries_are_judged_and_evented_faithfully(
        key in listed_key(),
        body in listed_body(),
        listed_extra in 0u64..64,
        rules in relay_rules(),
        cap in 0u64..1024,
        fields in prop::collection::vec(prop_oneof![Just("status".to_owned()), Just("id".to_owned()), "[a-z]{0,6}"], 0..3),
    ) {
        use crate::relay::validate::{Checks, check_body, check_metadata};
        use sha2::{Digest as _, Sha256};
        // A listing may show a size other than the body's (the object changed since).
        let listed = body.len() as u64 + listed_extra;
        let verdict = match check_metadata(&rules, &key, listed, cap) {
            Some(reason) => crate::relay::validate::Verdict {
                sha256: None,
                size: listed,
                content_type: None,
                rejection: Some(reason),
                fields: Default::default(),
                fields_denied: Vec::new(),
            },
            None => {
                let checks = Checks { rules: &rules, schema: None, fields: &fields };
                let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
                let v = rt.block_on(check_body(&checks, &key, &body[..], cap)).expect("reading a slice");
                let digest = hex::encode(Sha256::digest(&body));
                prop_assert_eq!(v.sha256.as_deref(), Some(digest.as_str()));
                prop_assert_eq!(v.size, body.len() as u64);
                if v.rejection.is_none() {
                    if let Some(max) = rules.max_size_bytes {
                        prop_assert!(listed <= max);
                    }
                    if let Some(allowed) = &rules.fhir_resource_types {
                        let value: serde_json::Value = serde_json::from_slice(&body).expect("accepted as FHIR: JSON");
                        let rt = value.get("resourceType").and_then(|v| v.as_str()).expect("a resourceType string");
                        prop_assert!(allowed.iter().any(|a| a == rt), "{} is not allowed", rt);
                    }
                    if rules.json_well_formed {
                        prop_assert!(serde_json::from_slice::<serde_json::Value>(&body).is_ok());
                    }
                    for name in v.fields.keys() {
                        prop_assert!(fields.contains(name), "field {} was not asked for", name);
                    }
                }
                v
            }
        };
        let event = crate::relay::event::RelayEvent {
            seq: 1,
            watch: "w".into(),
            key: key.clone(),
            size: verdict.size,
            etag: "\"e\"".into(),
            sha256: verdict.sha256.clone(),
            content_type: verdict.content_type.clone(),
            accepted: verdict.rejection.is_none(),
            reason: verdict.rejection.clone(),
            replaces_etag: None,
            observed_unix_ms: 1,
            fields: verdict.fields.clone(),
            fields_denied: verdict.fields_denied.iter().map(|(n, _)| n.clone()).collect(),
        };
        let wire = event.to_wire("bucket");
        let text = serde_json::to_string(&wire).expect("an event serialises");
        let back: outpost_protocol::ObjectEvent = serde_json::from_str(&text).expect("and parses back");
        prop_assert_eq!(back, wire);
    }
}
