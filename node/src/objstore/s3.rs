//! The `s3` adapter: any S3-compatible server (Garage, MinIO, Ceph RGW, AWS) through rust-s3
//! over rustls, path-style, with a custom endpoint and region. It is the only module that
//! imports rust-s3. It must never log or format the secret key, and never hold a whole body:
//! puts go up in [`PART_SIZE`] parts (one uploading while the next is read), gets come back
//! as a stream.
//!
//! Two kinds of key are refused with `InvalidKey` rather than risk addressing another object:
//! keys with a `.` or `..` segment (rust-s3 builds request URLs with the `url` crate, which
//! resolves dot segments: `a/../b` would address `b`), and keys starting with `/` (servers such
//! as Garage strip leading slashes from path-style keys: `/x` would address `x`). Such keys
//! written by other clients still appear in `list`.

use std::time::Duration;

use futures_util::StreamExt;
use s3::Bucket;
use s3::creds::Credentials;
use s3::error::S3Error;
use s3::region::Region;
use s3::serde_types::Part;
use tokio::io::AsyncRead;

use super::body::{Digest, fill};
use super::{
    ListPage, ObjectMeta, ObjectReader, ObjectStore, ObjectStoreError, PutResult, Result, key, page_limit,
};

mod credentials;
mod wire;

pub use credentials::{ENV_ACCESS_KEY_ID, ENV_SECRET_ACCESS_KEY, S3Credentials};

/// Multipart part size: objects up to this size go up in one request. S3 allows at most
/// 10,000 parts, so with 8 MiB parts the largest object is about 78 GiB.
pub const PART_SIZE: usize = 8 * 1024 * 1024;
const MAX_PARTS: u32 = 10_000;
/// Limit for each request that is not a streamed body (head, list, one part).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// A streamed get fails when no byte arrives for this long.
const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const CONTENT_TYPE: &str = "application/octet-stream";

/// Where the bucket is and who we are.
#[derive(Debug, Clone)]
pub struct S3Settings {
    /// `http://` or `https://` URL of the server, e.g. `http://127.0.0.1:3900`.
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub credentials: S3Credentials,
}

#[derive(Clone)]
pub struct S3Store {
    /// For requests with bounded bodies; each has [`REQUEST_TIMEOUT`].
    bucket: Box<Bucket>,
    /// For streamed gets: no overall limit, an idle timeout per chunk instead.
    streaming: Box<Bucket>,
    endpoint: String,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket.name())
            .finish()
    }
}

impl S3Store {
    /// Build the client; no request is made (the first operation shows whether the server,
    /// bucket and credentials are right).
    pub fn new(settings: S3Settings) -> Result<Self> {
        let endpoint = settings.endpoint.trim_end_matches('/').to_string();
        let url = reqwest::Url::parse(&endpoint)
            .map_err(|e| ObjectStoreError::Config(format!("s3 endpoint {endpoint:?} is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.path() != "/" {
            return Err(ObjectStoreError::Config(format!(
                "s3 endpoint {endpoint:?} must be http:// or https:// with no path (the bucket is configured separately)"
            )));
        }
        let region = Region::Custom { region: settings.region.clone(), endpoint: endpoint.clone() };
        let credentials = Credentials::new(
            Some(settings.credentials.access_key_id()),
            Some(settings.credentials.secret_access_key()),
            None,
            None,
            None,
        )
        .map_err(|e| ObjectStoreError::Config(format!("s3 credentials: {e}")))?;
        let mut bucket = Bucket::new(&settings.bucket, region, credentials)
            .map_err(|e| ObjectStoreError::Config(format!("s3 bucket {:?}: {e}", settings.bucket)))?
            .with_path_style();
        bucket.set_request_timeout(Some(REQUEST_TIMEOUT));
        let mut streaming = bucket.clone();
        streaming.set_request_timeout(None);
        Ok(S3Store { bucket, streaming, endpoint })
    }

    pub fn bucket_name(&self) -> String {
        self.bucket.name()
    }

    async fn put_multipart<R>(
        &self,
        key: &str,
        body: &mut R,
        first: Vec<u8>,
        digest: &mut Digest,
    ) -> Result<String>
    where
        R: AsyncRead + Unpin + Send,
    {
        let path = path(key);
        let upload = self
            .bucket
            .initiate_multipart_upload(&path, CONTENT_TYPE)
            .await
            .map_err(|e| wire::error(Some(key), "starting a multipart upload", e))?;
        let id = upload.upload_id;
        let result = self.upload_parts(key, &id, body, first, digest).await;
        let parts = match result {
            Ok(parts) => parts,
            Err(e) => {
                // Best effort: a server keeps unfinished parts until aborted (or its lifecycle rule).
                let _ = self.bucket.abort_upload(&path, &id).await;
                return Err(e);
            }
        };
        match self.bucket.complete_multipart_upload(&path, &id, parts).await {
            Ok(response) => match wire::etag_in_xml(response.as_slice()) {
                Some(etag) => Ok(etag),
                // Some servers leave the ETag out of the completion answer.
                None => Ok(self.head(key).await?.etag),
            },
            Err(e) => {
                let _ = self.bucket.abort_upload(&path, &id).await;
                Err(wire::error(Some(key), "completing a multipart upload", e))
            }
        }
    }

    /// Upload `first`, then the rest of `body`, reading the next part while one uploads.
    async fn upload_parts<R>(
        &self,
        key: &str,
        upload_id: &str,
        body: &mut R,
        first: Vec<u8>,
        digest: &mut Digest,
    ) -> Result<Vec<Part>>
    where
        R: AsyncRead + Unpin + Send,
    {
        let path = path(key);
        let mut parts = Vec::new();
        let mut current = first;
        let mut number = 1u32;
        loop {
            if number > MAX_PARTS {
                return Err(ObjectStoreError::Unavailable {
                    message: format!(
                        "{} is larger than {MAX_PARTS} parts of {PART_SIZE} bytes allow",
                        key::display(key)
                    ),
                    retryable: false,
                });
            }
            let mut next = Vec::with_capacity(PART_SIZE);
            let upload = self.bucket.put_multipart_chunk(current, &path, number, upload_id, CONTENT_TYPE);
            let (uploaded, read) = tokio::join!(upload, fill(body, &mut next, PART_SIZE, digest));
            parts.push(uploaded.map_err(|e| wire::error(Some(key), "uploading a part", e))?);
            read.map_err(|e| ObjectStoreError::io("reading the object body", e))?;
            if next.is_empty() {
                return Ok(parts);
            }
            current = next;
            number += 1;
        }
    }
}

/// rust-s3 strips one leading `/` from a path: add one so a key's own leading `/` survives.
fn path(key: &str) -> String {
    format!("/{key}")
}

/// The key rules, plus this adapter's limits (see the module docs).
fn addressable(key: &str) -> Result<()> {
    key::validate(key)?;
    let reason = if key::has_dot_segment(key) {
        "the s3 adapter cannot address keys with a `.` or `..` segment: URL normalisation would turn it into another key"
    } else if key.starts_with('/') {
        "the s3 adapter cannot address keys starting with `/`: S3 servers such as Garage strip it, which would alias another key"
    } else {
        return Ok(());
    };
    Err(ObjectStoreError::InvalidKey { key: key.to_string(), reason: reason.into() })
}

impl ObjectStore for S3Store {
    async fn put<R>(&self, key: &str, mut body: R) -> Result<PutResult>
    where
        R: AsyncRead + Unpin + Send,
    {
        addressable(key)?;
        let mut digest = Digest::default();
        let mut first = Vec::with_capacity(PART_SIZE);
        let ended = fill(&mut body, &mut first, PART_SIZE, &mut digest)
            .await
            .map_err(|e| ObjectStoreError::io("reading the object body", e))?;
        let etag = if ended {
            let response = self
                .bucket
                .put_object(path(key), &first)
                .await
                .map_err(|e| wire::error(Some(key), "putting an object", e))?;
            drop(first);
            match wire::unquote(&String::from_utf8_lossy(response.as_slice())) {
                etag if etag.is_empty() => self.head(key).await?.etag,
                etag => etag,
            }
        } else {
            self.put_multipart(key, &mut body, first, &mut digest).await?
        };
        let (size, sha256) = digest.finish();
        Ok(PutResult { size, sha256, etag })
    }

    async fn get(&self, key: &str) -> Result<ObjectReader> {
        addressable(key)?;
        let response = self
            .streaming
            .get_object_stream(path(key))
            .await
            .map_err(|e| wire::error(Some(key), "getting an object", e))?;
        let chunks = futures_util::stream::unfold(response.bytes, |mut s| async move {
            let item = match tokio::time::timeout(STREAM_IDLE_TIMEOUT, s.next()).await {
                Ok(None) => return None,
                Ok(Some(Ok(bytes))) => Ok(bytes),
                Ok(Some(Err(e))) => Err(std::io::Error::other(format!("object body stream: {e}"))),
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no object body bytes for {} s", STREAM_IDLE_TIMEOUT.as_secs()),
                )),
            };
            Some((item, s))
        });
        Ok(Box::pin(tokio_util::io::StreamReader::new(chunks)))
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta> {
        addressable(key)?;
        let (head, _) = self
            .bucket
            .head_object(path(key))
            .await
            .map_err(|e| wire::error(Some(key), "reading object metadata", e))?;
        let size = head.content_length.and_then(|n| u64::try_from(n).ok()).ok_or_else(|| {
            ObjectStoreError::Integrity {
                key: key.to_string(),
                message: "HEAD answer has no Content-Length".into(),
            }
        })?;
        Ok(ObjectMeta {
            key: key.to_string(),
            size,
            etag: head.e_tag.as_deref().map(wire::unquote).unwrap_or_default(),
            last_modified_unix_ms: head.last_modified.as_deref().and_then(wire::http_date_unix_ms),
        })
    }

    async fn delete(&self, key: &str) -> Result<()> {
        addressable(key)?;
        match self.bucket.delete_object(path(key)).await {
            Ok(_) => Ok(()),
            Err(S3Error::HttpFailWithBody(404, body)) if !body.contains("NoSuchBucket") => Ok(()),
            Err(e) => Err(wire::error(Some(key), "deleting an object", e)),
        }
    }

    async fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Result<ListPage> {
        key::validate_prefix(prefix)?;
        let (result, _) = self
            .bucket
            .list_page(
                prefix.to_string(),
                None,
                None,
                start_after.map(str::to_string),
                Some(page_limit(limit)),
            )
            .await
            .map_err(|e| wire::error(None, "listing objects", e))?;
        wire::list_page(result, prefix, start_after, page_limit(limit))
    }

    async fn copy(&self, from: &str, to: &str) -> Result<ObjectMeta> {
        addressable(from)?;
        addressable(to)?;
        // The copy source is a header that the server percent-decodes, so `%` and `+` in
        // keys must be encoded.
        let source = format!("/{}", wire::encode_copy_source(from));
        self.bucket
            .copy_object_internal(source, path(to))
            .await
            .map_err(|e| wire::error(Some(from), "copying", e))?;
        self.head(to).await
    }
}
