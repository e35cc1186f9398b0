//! The ObjectStore port: where the node keeps bulk data on site. The core speaks only this
//! trait; `fs.rs` (a local directory, the embedded default) and `s3.rs` (rust-s3, for Garage,
//! MinIO, Ceph RGW, AWS) are its adapters and nothing else imports rust-s3.
//!
//! Contract every adapter keeps (checked by `node/tests/objstore_contract.rs` against both):
//! - bodies are streams both ways: no adapter holds a whole object in memory, and `put`
//!   computes the SHA-256 while the bytes pass;
//! - keys are validated by [`key::validate`] before any I/O, and a key is stored and listed
//!   byte for byte as given: `a b/ü/../x` is its own key, never an alias of `a b/x`;
//! - `list` returns keys in ascending byte order (S3's order), at most [`MAX_LIST_PAGE`] per
//!   call, strictly after `start_after`;
//! - `delete` of a missing key succeeds; `head`/`get` of a missing key is
//!   [`ObjectStoreError::NotFound`].

use std::future::Future;
use std::pin::Pin;

use tokio::io::AsyncRead;

pub mod any;
mod body;
pub mod fs;
pub mod key;
pub mod s3;

pub use any::AnyStore;

/// The most objects one `list` call returns (S3's own limit for ListObjectsV2).
pub const MAX_LIST_PAGE: usize = 1000;

/// What a completed `put` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutResult {
    pub size: u64,
    /// Lowercase hex SHA-256 of the body, computed while it streamed.
    pub sha256: String,
    /// The store's entity tag, without quotes. It changes when the content changes; it is not
    /// a content hash on every backend (S3 multipart ETags are not).
    pub etag: String,
}

/// What `head` and `list` know about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    /// Entity tag without quotes.
    pub etag: String,
    /// Milliseconds since the Unix epoch; `None` when the server sent a date we cannot read.
    pub last_modified_unix_ms: Option<u64>,
}

/// One page of a listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListPage {
    pub objects: Vec<ObjectMeta>,
    /// Set when more keys follow: pass it as `start_after` to get the next page. It is the
    /// last key of this page, so a cursor persisted from it resumes exactly here.
    pub next_start_after: Option<String>,
}

/// An object's body as a byte stream. The fs adapter checks size and SHA-256 as it reads and
/// fails the final read with `InvalidData` if the bytes on disk no longer match.
pub type ObjectReader = Pin<Box<dyn AsyncRead + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum ObjectStoreError {
    #[error("object {} not found", key::display(.key))]
    NotFound { key: String },
    /// The key breaks the port's rules or cannot be addressed safely by this adapter.
    #[error("invalid object key {}: {reason}", key::display(.key))]
    InvalidKey { key: String, reason: String },
    /// The store could not be reached or refused the request. `retryable` says whether the
    /// same request may succeed later (network cut, 5xx, throttling) or will not (denied,
    /// bad request): callers back off on the first and report the second.
    #[error("object store unavailable: {message}")]
    Unavailable { message: String, retryable: bool },
    /// Stored bytes do not match what was recorded for them, or a server answered
    /// inconsistently.
    #[error("integrity check failed for {}: {message}", key::display(.key))]
    Integrity { key: String, message: String },
    /// Local I/O: reading the body handed to `put`, or the fs adapter's own files.
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    /// The adapter's configuration is unusable (missing credentials, bad endpoint).
    #[error("object store configuration: {0}")]
    Config(String),
}

impl ObjectStoreError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, ObjectStoreError::Unavailable { retryable: true, .. })
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ObjectStoreError::Io { context: context.into(), source }
    }
}

pub type Result<T> = std::result::Result<T, ObjectStoreError>;

/// The storage port. Methods return `Send` futures so the agent and the relay can drive them
/// from spawned tasks.
pub trait ObjectStore: Send + Sync + 'static {
    /// Store `body` under `key`, replacing any object there. The new object becomes visible
    /// all at once when the call returns `Ok`; on error the previous object (if any) is kept.
    fn put<R>(&self, key: &str, body: R) -> impl Future<Output = Result<PutResult>> + Send
    where
        R: AsyncRead + Unpin + Send;

    /// The object's body as a stream. `NotFound` is returned before any byte is read.
    fn get(&self, key: &str) -> impl Future<Output = Result<ObjectReader>> + Send;

    fn head(&self, key: &str) -> impl Future<Output = Result<ObjectMeta>> + Send;

    /// Remove the object; removing a missing key succeeds.
    fn delete(&self, key: &str) -> impl Future<Output = Result<()>> + Send;

    /// Objects whose key starts with `prefix` and sorts strictly after `start_after`, in
    /// ascending byte order, at most `limit` (clamped to `1..=MAX_LIST_PAGE`).
    fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<ListPage>> + Send;

    /// Copy `from` to `to` inside the store (server side where the backend can).
    fn copy(&self, from: &str, to: &str) -> impl Future<Output = Result<ObjectMeta>> + Send;
}

/// Clamp a caller's page size into what every backend accepts.
pub(crate) fn page_limit(limit: usize) -> usize {
    limit.clamp(1, MAX_LIST_PAGE)
}
