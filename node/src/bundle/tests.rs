//! The bundle reader against hostile and damaged files: each is refused with a reason that
//! names the part, and nothing is staged for it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer, SigningKey};
use outpost_protocol::{
    BUNDLE_FORMAT, BundleManifest, BundlePart, MANIFEST_MEMBER, PartKind, PublicKey, SignedEnvelope,
};
use sha2::{Digest, Sha256};

use super::BundleError;
use super::read::{Expect, verify_and_stage};

const NODE: &str = "node-a";
const ORG: &str = "org-1";

fn key(seed: u8) -> (SigningKey, PublicKey) {
    let key = SigningKey::from_bytes(&[seed; 32]);
    let public =
        PublicKey { key_id: format!("key{seed}"), ed25519_hex: hex::encode(key.verifying_key().to_bytes()) };
    (key, public)
}

fn sign(key: &SigningKey, key_id: &str, m: &BundleManifest) -> Vec<u8> {
    let payload = serde_json::to_string(m).expect("manifest");
    let env = SignedEnvelope {
        signature_hex: hex::encode(key.sign(payload.as_bytes()).to_bytes()),
        payload,
        key_id: key_id.into(),
    };
    serde_json::to_vec(&env).expect("envelope")
}

fn part(i: usize, kind: PartKind, body: &[u8], node: Option<&str>) -> BundlePart {
    BundlePart {
        name: BundleManifest::part_name(i, kind),
        kind,
        size: body.len() as u64,
        sha256: hex::encode(Sha256::digest(body)),
        node_id: node.map(str::to_owned),
        label: format!("label{i}"),
    }
}

fn manifest(parts: Vec<BundlePart>, counter: u64) -> BundleManifest {
    BundleManifest {
        format: BUNDLE_FORMAT,
        bundle_id: "b1".into(),
        org_id: ORG.into(),
        counters: BTreeMap::from([(NODE.to_owned(), counter)]),
        selector: None,
        created_unix_ms: 1,
        expires_unix_ms: 10_000,
        parts,
    }
}

/// A member as written: name, body, and how its header lies.
struct Member {
    name: String,
    body: Vec<u8>,
    kind: tar::EntryType,
    link: Option<String>,
}

fn file(name: &str, body: &[u8]) -> Member {
    Member { name: name.into(), body: body.to_vec(), kind: tar::EntryType::Regular, link: None }
}

fn write(path: &Path, members: &[Member]) {
    let f = std::fs::File::create(path).expect("create");
    let mut enc = zstd::stream::write::Encoder::new(f, 1).expect("zstd");
    enc.include_checksum(true).expect("checksum");
    {
        let mut tar = tar::Builder::new(&mut enc);
        for m in members {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(m.kind);
            h.set_size(m.body.len() as u64);
            h.set_mode(0o644);
            // Written raw so that hostile names reach the reader as they are.
            let name = m.name.as_bytes();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            if let Some(l) = &m.link {
                h.set_link_name(l).expect("link");
            }
            h.set_cksum();
            tar.append(&h, m.body.as_slice()).expect("append");
        }
        tar.finish().expect("finish");
    }
    enc.finish().expect("finish").flush().expect("flush");
}

struct Case {
    _dir: tempfile::TempDir,
    path: PathBuf,
    staging: PathBuf,
    public: PublicKey,
}

fn case(members: &[Member]) -> Case {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("x.bundle");
    write(&path, members);
    let staging = dir.path().join("staging");
    Case { path, staging, public: key(7).1, _dir: dir }
}

fn good(counter: u64) -> (Vec<Member>, BundleManifest) {
    let image = b"an image tarball".to_vec();
    let job = br#"{"job":"for node-a"}"#.to_vec();
    let other = br#"{"job":"for node-b"}"#.to_vec();
    let m = manifest(
        vec![
            part(0, PartKind::Image, &image, None),
            part(1, PartKind::Job, &job, Some(NODE)),
            part(2, PartKind::Job, &other, Some("node-b")),
        ],
        counter,
    );
    let (k, public) = key(7);
    let members = vec![
        file(MANIFEST_MEMBER, &sign(&k, &public.key_id, &m)),
        file(&m.parts[0].name, &image),
        file(&m.parts[1].name, &job),
        file(&m.parts[2].name, &other),
    ];
    (members, m)
}

fn check(c: &Case, last: u64, now: u64) -> Result<super::read::Verified, BundleError> {
    let expect =
        Expect { org_id: ORG, org_keys: std::slice::from_ref(&c.public), node_id: NODE, now_unix_ms: now };
    verify_and_stage(&c.path, &expect, last, Some(&c.staging), &|_| {})
}

#[test]
fn a_good_bundle_verifies_and_stages_only_this_nodes_parts() {
    let (members, m) = good(5);
    let c = case(&members);
    let v = check(&c, 4, 100).expect("verified");
    assert_eq!(v.counter, 5);
    let staged: Vec<&str> = v.parts.iter().map(|(p, _)| p.name.as_str()).collect();
    assert_eq!(staged, [m.parts[0].name.as_str(), m.parts[1].name.as_str()], "node-b's job is not staged");
    assert_eq!(std::fs::read(&v.parts[1].1).expect("staged"), br#"{"job":"for node-a"}"#);
}

fn refused(members: &[Member], last: u64, now: u64) -> String {
    let c = case(members);
    let err = check(&c, last, now).expect_err("refused").to_string();
    // Nothing of a refused bundle is left staged beyond what the caller removes; the reader
    // never writes outside its staging directory.
    let outside: Vec<_> = std::fs::read_dir(c._dir.path()).expect("dir").filter_map(Result::ok).collect();
    assert!(outside.len() <= 2, "{outside:?}");
    err
}

#[test]
fn replayed_expired_wrong_node_and_foreign_signatures_are_refused() {
    let (members, _) = good(5);
    assert!(refused(&members, 5, 100).contains("replayed"), "same counter");
    assert!(refused(&members, 9, 100).contains("replayed"), "older");
    assert!(refused(&members, 0, 10_000).contains("expired"));

    let (mut other_node, mut m) = good(5);
    m.counters = BTreeMap::from([("node-z".to_owned(), 5)]);
    let (k, public) = key(7);
    other_node[0] = file(MANIFEST_MEMBER, &sign(&k, &public.key_id, &m));
    assert!(refused(&other_node, 0, 100).contains("not this node"));

    let (mut foreign, m) = good(5);
    let (k, _) = key(9);
    foreign[0] = file(MANIFEST_MEMBER, &sign(&k, "key7", &m));
    assert!(refused(&foreign, 0, 100).contains("signature"));
}

#[test]
fn a_flipped_byte_a_missing_or_added_part_and_a_truncated_file_are_refused() {
    let (mut flipped, _) = good(5);
    flipped[2].body[0] ^= 1;
    let err = refused(&flipped, 0, 100);
    assert!(err.contains("parts/0001-job") && err.contains("SHA-256"), "{err}");

    let (mut missing, _) = good(5);
    missing.pop();
    let err = refused(&missing, 0, 100);
    assert!(err.contains("missing") && err.contains("parts/0002-job"), "{err}");

    let (mut added, _) = good(5);
    added.push(file("parts/0003-image", b"extra"));
    let err = refused(&added, 0, 100);
    assert!(err.contains("parts/0003-image") && err.contains("not listed"), "{err}");

    let (members, _) = good(5);
    let c = case(&members);
    let bytes = std::fs::read(&c.path).expect("read");
    std::fs::write(&c.path, &bytes[..bytes.len() / 2]).expect("truncate");
    let err = check(&c, 0, 100).expect_err("truncated").to_string();
    assert!(err.contains("truncated") || err.contains("not a readable bundle"), "{err}");
}

#[test]
fn links_escaping_paths_and_oversized_members_are_refused() {
    let (members, m) = good(5);
    let mut symlink = members;
    symlink[1] = Member {
        name: m.parts[0].name.clone(),
        body: Vec::new(),
        kind: tar::EntryType::Symlink,
        link: Some("/etc/passwd".into()),
    };
    assert!(refused(&symlink, 0, 100).contains("link"));

    let (mut hard, m) = good(5);
    hard[1] = Member {
        name: m.parts[0].name.clone(),
        body: Vec::new(),
        kind: tar::EntryType::Link,
        link: Some("x".into()),
    };
    assert!(refused(&hard, 0, 100).contains("link"));

    let (mut dots, _) = good(5);
    dots[1].name = "../escape".into();
    assert!(refused(&dots, 0, 100).contains("leaves the bundle"));

    let (mut abs, _) = good(5);
    abs[1].name = "/abs".into();
    assert!(refused(&abs, 0, 100).contains("leaves the bundle"));

    let (mut big, _) = good(5);
    big[1].body.extend_from_slice(b"more than declared");
    let err = refused(&big, 0, 100);
    assert!(err.contains("parts/0000-image") && err.contains("bytes"), "{err}");
}

#[test]
fn a_decompression_bomb_stops_at_the_declared_size() {
    // A part that declares 16 bytes but whose member is 64 MiB of zeros (a few KiB compressed):
    // refused on its header, before anything past the bound is read or written.
    let (mut bomb, _) = good(5);
    bomb[1].body = vec![0u8; 64 * 1024 * 1024];
    let c = case(&bomb);
    assert!(std::fs::metadata(&c.path).expect("meta").len() < 1024 * 1024, "compressed small");
    let err = check(&c, 0, 100).expect_err("refused").to_string();
    assert!(err.contains("parts/0000-image"), "{err}");
    let staged: u64 = std::fs::read_dir(&c.staging)
        .map(|d| d.filter_map(Result::ok).filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0);
    assert!(staged < 1024, "nothing past the bound was written: {staged}");
}

#[test]
fn an_empty_or_foreign_file_is_not_a_bundle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("x.bundle");
    std::fs::write(&path, b"").expect("write");
    let (_, public) = key(7);
    let expect =
        Expect { org_id: ORG, org_keys: std::slice::from_ref(&public), node_id: NODE, now_unix_ms: 1 };
    assert!(verify_and_stage(&path, &expect, 0, None, &|_| {}).is_err());
    std::fs::write(&path, b"just some text, not zstd").expect("write");
    let err = verify_and_stage(&path, &expect, 0, None, &|_| {}).expect_err("refused").to_string();
    assert!(err.contains("not a readable bundle"), "{err}");
}

#[test]
fn a_part_of_an_unknown_kind_is_refused() {
    // A manifest from a newer control plane with a part this build cannot apply: refused as a
    // whole (never applied in part), saying what it did not understand.
    let (k, public) = key(7);
    let mut m = serde_json::to_value(manifest(vec![part(0, PartKind::Image, b"x", None)], 5)).expect("json");
    m["parts"][0]["kind"] = "firmware".into();
    m["parts"][0]["name"] = "parts/0000-firmware".into();
    let payload = m.to_string();
    let env = SignedEnvelope {
        signature_hex: hex::encode(k.sign(payload.as_bytes()).to_bytes()),
        payload,
        key_id: public.key_id.clone(),
    };
    let members = vec![
        file(MANIFEST_MEMBER, &serde_json::to_vec(&env).expect("env")),
        file("parts/0000-firmware", b"x"),
    ];
    let err = refused(&members, 0, 100);
    assert!(err.contains("firmware"), "{err}");
}

#[test]
fn a_flipped_byte_in_a_part_of_every_kind_is_refused_naming_it() {
    let kinds = [PartKind::Image, PartKind::Model, PartKind::Job, PartKind::Service, PartKind::ResultsAck];
    let bodies: Vec<Vec<u8>> =
        kinds.iter().map(|k| format!("the body of a {k:?} part").into_bytes()).collect();
    let parts: Vec<BundlePart> = kinds
        .iter()
        .zip(&bodies)
        .enumerate()
        .map(|(i, (k, b))| {
            let node = matches!(k, PartKind::Job | PartKind::Service | PartKind::ResultsAck).then_some(NODE);
            part(i, *k, b, node)
        })
        .collect();
    let m = manifest(parts, 5);
    let (k, public) = key(7);
    let signed = sign(&k, &public.key_id, &m);
    for (flip, kind) in kinds.iter().enumerate() {
        let mut members = vec![file(MANIFEST_MEMBER, &signed)];
        for (i, (p, b)) in m.parts.iter().zip(&bodies).enumerate() {
            let mut body = b.clone();
            if i == flip {
                body[3] ^= 0x20;
            }
            members.push(file(&p.name, &body));
        }
        let err = refused(&members, 0, 100);
        assert!(err.contains(&m.parts[flip].name) && err.contains("SHA-256"), "{kind:?}: {err}");
    }
    // Unflipped, every kind verifies.
    let mut members = vec![file(MANIFEST_MEMBER, &signed)];
    members.extend(m.parts.iter().zip(&bodies).map(|(p, b)| file(&p.name, b)));
    let c = case(&members);
    assert_eq!(check(&c, 0, 100).expect("verified").parts.len(), kinds.len());
}
