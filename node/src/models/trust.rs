//! Who may publish models to this node, and what a manifest must say before any file is
//! touched: the signature over the exact payload bytes first (nothing unsigned is parsed),
//! then names, paths and digests.

use std::collections::{BTreeMap, BTreeSet};

use ed25519_dalek::{Signature, Verifier as _, VerifyingKey};
use outpost_protocol::{ModelManifest, PublicKey, SignedModelManifest};

use super::{KNOWN_ENGINES, MAX_FILES, ModelError, Result, is_sha256_hex, sha256_hex};

/// The file a model directory or archive carries its signed manifest in.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The publisher keys this node accepts, by key id.
#[derive(Debug, Clone, Default)]
pub struct Publishers {
    keys: BTreeMap<String, VerifyingKey>,
}

/// A key's id: the first 16 hex digits of SHA-256 of its 32 bytes (as for the org key).
pub fn key_id_of(key: &VerifyingKey) -> String {
    let mut id = sha256_hex(key.as_bytes());
    id.truncate(16);
    id
}

impl Publishers {
    /// The org key pinned at enrollment (if any) plus the configured publisher keys (hex).
    pub fn new(org_keys: &[PublicKey], configured: &[String]) -> Result<Self, String> {
        let mut keys = BTreeMap::new();
        let org = org_keys.iter().map(|k| (format!("org key {}", k.key_id), k.ed25519_hex.as_str()));
        let listed = configured.iter().map(|k| (format!("models.trusted_publishers {k:?}"), k.as_str()));
        for (what, hex_key) in org.into_iter().chain(listed) {
            let bytes: [u8; 32] = hex::decode(hex_key)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| format!("{what} is not 32 bytes of hex"))?;
            let key = VerifyingKey::from_bytes(&bytes).map_err(|e| format!("{what}: {e}"))?;
            keys.insert(key_id_of(&key), key);
        }
        Ok(Self { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn key_ids(&self) -> Vec<&str> {
        self.keys.keys().map(String::as_str).collect()
    }
}

/// Checks the signature, then parses the payload and checks its claims. Returns the manifest
/// and its digest (SHA-256 of the payload).
pub fn verify_manifest(signed: &SignedModelManifest, trust: &Publishers) -> Result<(ModelManifest, String)> {
    if trust.is_empty() {
        return Err(ModelError::NoTrust);
    }
    let Some(key) = trust.keys.get(&signed.key_id) else {
        return Err(ModelError::UnknownPublisher {
            key_id: signed.key_id.clone(),
            trusted: trust.key_ids().join(", "),
        });
    };
    let bad = || ModelError::BadSignature { key_id: signed.key_id.clone() };
    let sig: [u8; 64] =
        hex::decode(&signed.signature_hex).ok().and_then(|b| b.try_into().ok()).ok_or_else(bad)?;
    key.verify(signed.payload.as_bytes(), &Signature::from_bytes(&sig)).map_err(|_| bad())?;
    let manifest: ModelManifest = serde_json::from_str(&signed.payload)
        .map_err(|e| ModelError::InvalidManifest(format!("signed payload is malformed: {e}")))?;
    check_claims(&manifest).map_err(ModelError::InvalidManifest)?;
    Ok((manifest, sha256_hex(signed.payload.as_bytes())))
}

fn check_claims(m: &ModelManifest) -> Result<(), String> {
    check_label("name", &m.name)?;
    check_label("version", &m.version)?;
    if !KNOWN_ENGINES.contains(&m.engine.as_str()) {
        return Err(format!("engine {:?} is not one of {}", m.engine, KNOWN_ENGINES.join(", ")));
    }
    if m.license.trim().is_empty() || m.license.len() > 256 || m.license.chars().any(char::is_control) {
        return Err("license must be a short non-empty line (an SPDX identifier)".into());
    }
    if m.files.is_empty() || m.files.len() > MAX_FILES {
        return Err(format!("files must list 1 to {MAX_FILES} files, not {}", m.files.len()));
    }
    let mut seen = BTreeSet::new();
    for f in &m.files {
        check_relative_path(&f.path).map_err(|reason| format!("file path {:?} {reason}", f.path))?;
        if f.path == super::MANIFEST_FILE {
            return Err(format!("{:?} is reserved for the manifest itself", f.path));
        }
        if !seen.insert(f.path.as_str()) {
            return Err(format!("file path {:?} is listed twice", f.path));
        }
        if !is_sha256_hex(&f.sha256) {
            return Err(format!("{}: sha256 {:?} is not 64 lowercase hex digits", f.path, f.sha256));
        }
    }
    if !m.embedding_dimensions.is_empty() {
        if m.engine != "candle" {
            return Err("embedding_dimensions is for embedding models (engine candle)".into());
        }
        let ascending = m.embedding_dimensions.windows(2).all(|w| w[0] < w[1]);
        let in_range = m.embedding_dimensions.iter().all(|d| (1..=65_536).contains(d));
        if m.embedding_dimensions.len() > 32 || !ascending || !in_range {
            return Err("embedding_dimensions must be at most 32 ascending sizes of 1 to 65536".into());
        }
    }
    let ext = format!(".{}", m.format.as_str());
    if !m.files.iter().any(|f| f.path.ends_with(&ext)) {
        return Err(format!("format is {} but no file ends in {ext}", m.format.as_str()));
    }
    Ok(())
}

/// Names and versions appear in commands (`NAME@VERSION`) and listings.
fn check_label(what: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'));
    if ok { Ok(()) } else { Err(format!("{what} {s:?} must be 1-128 characters of [A-Za-z0-9._+-]")) }
}

/// A path inside a model: relative, `/`-separated, no empty, `.` or `..` segments, no
/// backslash or control characters. Returns why it is refused.
pub fn check_relative_path(p: &str) -> Result<(), &'static str> {
    if p.is_empty() || p.len() > 1024 {
        return Err("must be 1-1024 bytes long");
    }
    if p.starts_with('/') {
        return Err("is absolute");
    }
    if p.contains('\\') || p.chars().any(char::is_control) {
        return Err("contains a backslash or a control character");
    }
    for seg in p.split('/') {
        match seg {
            "" => return Err("has an empty segment"),
            "." | ".." => return Err("has a '.' or '..' segment"),
            _ => {}
        }
    }
    Ok(())
}
