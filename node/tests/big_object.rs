//! A multi-GiB object end to end on the embedded fs store: streamed in by `put`, hashed while
//! it streams, read back and evented by the relay (which hashes the whole body) — with memory
//! that does not grow with the object. Runs in its own binary so the RSS figures are its own.

#![allow(clippy::expect_used)]

mod relay_support;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use outpost_node::objstore::ObjectStore;
use outpost_node::relay::{RelayConfig, Rules};
use outpost_node::store::StateStore;
use outpost_node::store::sled_store::SledStore;
use relay_support::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// 2 GiB and a bit: past every 32-bit size boundary.
const LEN: u64 = 2 * 1024 * 1024 * 1024 + 4099;

/// Deterministic bytes, produced on demand (never held whole): a 1 MiB block of pseudo-random
/// bytes, each copy stamped with its index so no two MiB are alike.
struct Pattern {
    remaining: u64,
    block: Arc<Vec<u8>>,
    produced: u64,
}

impl Pattern {
    fn new(len: u64) -> Self {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let block = (0..1 << 20)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        Pattern { remaining: len, block: Arc::new(block), produced: 0 }
    }
}

impl AsyncRead for Pattern {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let offset = (self.produced % (1 << 20)) as usize;
        let n = (buf.remaining() as u64).min(self.remaining).min(((1 << 20) - offset) as u64) as usize;
        let stamp = (self.produced >> 20).to_le_bytes();
        let block = Arc::clone(&self.block);
        let start = buf.filled().len();
        buf.put_slice(&block[offset..offset + n]);
        if offset == 0 && n >= 8 {
            buf.filled_mut()[start..start + 8].copy_from_slice(&stamp);
        }
        self.remaining -= n as u64;
        self.produced += n as u64;
        Poll::Ready(Ok(()))
    }
}

fn rss_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status.lines().find(|l| l.starts_with(field)).expect("field");
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("kB")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_gib_object_is_stored_read_and_evented_in_bounded_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = fs_store(&dir).await;
    let mut expected = Sha256::new();
    let mut src = Pattern::new(LEN);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = src.read(&mut buf).await.expect("pattern");
        if n == 0 {
            break;
        }
        expected.update(&buf[..n]);
    }
    let expected = hex::encode(expected.finalize());

    std::fs::write("/proc/self/clear_refs", "5").expect("reset peak RSS");
    let base = rss_kib("VmRSS:");
    let t = Instant::now();
    let put = objects.put("big/scan.bin", Pattern::new(LEN)).await.expect("put");
    let put_s = t.elapsed().as_secs_f64();
    assert_eq!((put.size, put.sha256.as_str()), (LEN, expected.as_str()));

    let t = Instant::now();
    let mut body = objects.get("big/scan.bin").await.expect("get");
    let mut h = Sha256::new();
    let mut total = 0u64;
    loop {
        let n = body.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        total += n as u64;
        h.update(&buf[..n]);
    }
    let get_s = t.elapsed().as_secs_f64();
    assert_eq!((total, hex::encode(h.finalize())), (LEN, expected.clone()));

    let state: Arc<dyn StateStore> = Arc::new(SledStore::open(&dir.path().join("state")).expect("sled"));
    let relay =
        relay(&objects, state, RelayConfig { ..config(vec![watch("big", "big/", Rules::default())]) });
    let t = Instant::now();
    let report = relay.scan_pass().await.expect("scan");
    let scan_s = t.elapsed().as_secs_f64();
    assert_eq!((report.events, report.accepted), (1, 1));
    let events = pending(&relay);
    assert_eq!((events[0].size, events[0].sha256.as_deref()), (LEN, Some(expected.as_str())));

    let grew_mib = rss_kib("VmHWM:").saturating_sub(base) / 1024;
    eprintln!(
        "[figures] 2 GiB on the fs store: put {put_s:.1} s, get {get_s:.1} s, relay scan {scan_s:.1} s, peak RSS +{grew_mib} MiB"
    );
    assert!(grew_mib < 64, "memory grew {grew_mib} MiB for a 2 GiB object: something buffered it");
}
