//! The signed, content-addressed model store: manifests signed by a trusted publisher key,
//! files kept once by SHA-256 under `blobs/sha256/`, and a manifest made visible only after
//! every file it names is in place. It owns files under its own directory and never loads a
//! model into memory or runs an engine.

mod copy;
mod import;
mod store;
mod trust;

use std::path::PathBuf;

pub use copy::Progress;
pub use store::{Damage, InstalledModel, ModelCheck, ModelStore, StoreWriter};
pub use trust::{MANIFEST_FILE, Publishers, check_relative_path, key_id_of, verify_manifest};

/// Engines a manifest may name.
pub const KNOWN_ENGINES: &[&str] = &["llama", "candle"];

/// Most files one model may list.
pub const MAX_FILES: usize = 10_000;

/// Largest `manifest.json` accepted, in bytes.
pub const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has no manifest.json; sign the model directory with `models/sign` first")]
    NoManifest { path: PathBuf },
    #[error("{path} is not a signed manifest ({message}); sign it with `models/sign`")]
    Unsigned { path: String, message: String },
    #[error(
        "manifest is signed by key {key_id}, which this node does not trust (trusted: {trusted}); add the publisher's public key to models.trusted_publishers"
    )]
    UnknownPublisher { key_id: String, trusted: String },
    #[error(
        "manifest signature does not verify against publisher key {key_id}: the manifest was altered or forged"
    )]
    BadSignature { key_id: String },
    #[error(
        "no model publisher is trusted: enroll the node (its org key is trusted) or set models.trusted_publishers"
    )]
    NoTrust,
    #[error("manifest is not acceptable: {0}")]
    InvalidManifest(String),
    #[error("{path}: listed in the manifest but not found in the source")]
    MissingFile { path: String },
    #[error("{path}: truncated: {got} bytes, the manifest says {want}")]
    Truncated { path: String, want: u64, got: u64 },
    #[error("{path}: larger than the {want} bytes the manifest says")]
    TooLarge { path: String, want: u64 },
    #[error("{path}: SHA-256 is {got}, the manifest says {want}: the file was altered or damaged")]
    HashMismatch { path: String, want: String, got: String },
    #[error("{path}: not a {format} file: {reason}")]
    BadFormat { path: String, format: &'static str, reason: String },
    #[error("archive entry {entry:?} refused: {reason}")]
    UnexpectedEntry { entry: String, reason: String },
    #[error("no model matches {selector:?}; see `outpost models list`")]
    NotFound { selector: String },
    #[error("{selector:?} matches several models ({candidates}); give NAME@VERSION or the digest")]
    Ambiguous { selector: String, candidates: String },
    #[error("stored manifest {path} is damaged: {message}; remove it or import the model again")]
    StoreDamaged { path: PathBuf, message: String },
}

impl ModelError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { what: what.into(), source }
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// 64 lowercase hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests;
