//! Streaming helpers shared by the adapters: hashing bodies as they pass, filling bounded part
//! buffers, and checking a body against its recorded size and SHA-256 while it is read.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// SHA-256 and byte count of everything fed to it.
#[derive(Default)]
pub(crate) struct Digest {
    hasher: Sha256,
    bytes: u64,
}

impl Digest {
    pub(crate) fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.bytes += data.len() as u64;
    }

    /// `(size, lowercase hex SHA-256)`.
    pub(crate) fn finish(self) -> (u64, String) {
        (self.bytes, hex::encode(self.hasher.finalize()))
    }
}

/// Read from `reader` into `buf` (cleared first) until it holds `cap` bytes or the reader
/// ends, feeding `digest`. Returns `true` when the reader has ended. `buf` never grows past
/// `cap`, so a caller's memory is bounded by the buffers it owns.
pub(crate) async fn fill<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    cap: usize,
    digest: &mut Digest,
) -> io::Result<bool> {
    buf.clear();
    buf.reserve_exact(cap);
    let mut ended = false;
    // `read_buf` writes into spare capacity: no zero-filling of a part buffer per call.
    while buf.len() < cap {
        let want = (cap - buf.len()) as u64;
        if (&mut *reader).take(want).read_buf(buf).await? == 0 {
            ended = true;
            break;
        }
    }
    digest.update(buf);
    Ok(ended)
}

/// Passes bytes through and fails the read that reaches the end (or goes past `size`) when
/// the bytes differ from what was recorded: bit rot or a tampered file never reads as good data.
pub(crate) struct VerifyingReader<R> {
    inner: R,
    expected_size: u64,
    expected_sha256: String,
    digest: Option<Digest>,
}

impl<R> VerifyingReader<R> {
    pub(crate) fn new(inner: R, expected_size: u64, expected_sha256: String) -> Self {
        Self { inner, expected_size, expected_sha256, digest: Some(Digest::default()) }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for VerifyingReader<R> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let fresh = &buf.filled()[before..];
        let Some(digest) = this.digest.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        if !fresh.is_empty() {
            digest.update(fresh);
            if digest.bytes > this.expected_size {
                this.digest = None;
                // A failed read must not hand out bytes.
                buf.set_filled(before);
                return Poll::Ready(Err(corrupt(format!(
                    "object body is longer than its recorded {} bytes",
                    this.expected_size
                ))));
            }
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        // End of the body: check it once.
        let (size, sha256) = this.digest.take().map(Digest::finish).unwrap_or_default();
        if size != this.expected_size || sha256 != this.expected_sha256 {
            return Poll::Ready(Err(corrupt(format!(
                "object body has {size} bytes with SHA-256 {sha256}, but {} bytes with {} were recorded",
                this.expected_size, this.expected_sha256
            ))));
        }
        Poll::Ready(Ok(()))
    }
}

fn corrupt(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("integrity check failed: {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fill_stops_at_the_cap_and_reports_the_end() {
        let data = vec![7u8; 10];
        let mut reader = &data[..];
        let mut digest = Digest::default();
        let mut buf = Vec::new();
        assert!(!fill(&mut reader, &mut buf, 4, &mut digest).await.expect("read"));
        assert_eq!(buf.len(), 4);
        assert!(!fill(&mut reader, &mut buf, 4, &mut digest).await.expect("read"));
        assert!(fill(&mut reader, &mut buf, 4, &mut digest).await.expect("read"));
        assert_eq!(buf.len(), 2);
        let (size, sha) = digest.finish();
        assert_eq!(size, 10);
        assert_eq!(sha, hex::encode(Sha256::digest(&data)));
    }

    #[tokio::test]
    async fn a_verifying_reader_fails_on_changed_bytes_and_passes_good_ones() {
        let good = b"hello".to_vec();
        let sha = hex::encode(Sha256::digest(&good));
        let mut out = Vec::new();
        VerifyingReader::new(&good[..], 5, sha.clone()).read_to_end(&mut out).await.expect("good body");
        assert_eq!(out, good);

        let err = VerifyingReader::new(&b"hellO"[..], 5, sha.clone())
            .read_to_end(&mut Vec::new())
            .await
            .expect_err("changed byte");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let err = VerifyingReader::new(&b"hello!"[..], 5, sha)
            .read_to_end(&mut Vec::new())
            .await
            .expect_err("longer");
        assert!(err.to_string().contains("longer"), "{err}");
    }
}
