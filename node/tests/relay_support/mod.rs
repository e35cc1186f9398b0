//! Shared by the relay integration tests: a real fs object store in a temp dir, a relay over
//! it, and a StateStore wrapper that "crashes" at a chosen batch.

#![allow(clippy::expect_used, dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::StreamExt;
use outpost_node::objstore::ObjectStore;
use outpost_node::objstore::fs::FsStore;
use outpost_node::relay::{Relay, RelayConfig, RelayEvent, Rules, Watch};
use outpost_node::store::{Op, StateStore, StoreError, Tree};

pub async fn fs_store(dir: &tempfile::TempDir) -> FsStore {
    FsStore::open(dir.path().join("objects")).await.expect("open fs store")
}

pub fn watch(name: &str, prefix: &str, rules: Rules) -> Watch {
    Watch { name: name.into(), prefix: prefix.into(), rules, event_fields: Vec::new() }
}

pub fn config(watches: Vec<Watch>) -> RelayConfig {
    RelayConfig { batch_size: 100, watches, ..RelayConfig::default() }
}

pub fn relay(objects: &FsStore, state: Arc<dyn StateStore>, config: RelayConfig) -> Relay<FsStore> {
    Relay::new(objects.clone(), state, config).expect("valid relay config")
}

pub async fn put(objects: &FsStore, key: &str, body: &[u8]) -> String {
    objects.put(key, body).await.expect("put").etag
}

/// Put many small objects, 16 at a time.
pub async fn put_many(objects: &FsStore, keys: &[String]) {
    let results: Vec<_> = futures_util::stream::iter(keys.iter().map(|k| objects.put(k, k.as_bytes())))
        .buffer_unordered(16)
        .collect()
        .await;
    for r in results {
        r.expect("put");
    }
}

/// Every pending event, oldest first.
pub fn pending<S: ObjectStore>(relay: &Relay<S>) -> Vec<RelayEvent> {
    relay.pending_events(usize::MAX).expect("pending events")
}

pub fn keys(events: &[RelayEvent]) -> Vec<String> {
    events.iter().map(|e| e.key.clone()).collect()
}

/// Sequence numbers must run 1, 2, 3, … with no gap and no repeat.
pub fn assert_gapless(events: &[RelayEvent], first: u64) {
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    let want: Vec<u64> = (first..first + events.len() as u64).collect();
    assert_eq!(seqs, want, "event numbers have a gap or a repeat");
}

/// How a [`CrashingStore`] fails the chosen batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crash {
    /// The process dies before the batch reaches the disk.
    BeforeWrite,
    /// The batch is on disk but the process dies before `apply` returns.
    AfterWrite,
}

/// Passes everything through to `inner` until the `at`-th batch touching relay state, which
/// it fails as `crash` says; every later call fails too, as a dead process would.
pub struct CrashingStore {
    pub inner: Arc<dyn StateStore>,
    pub at: usize,
    pub crash: Crash,
    applied: AtomicUsize,
}

impl CrashingStore {
    pub fn new(inner: Arc<dyn StateStore>, at: usize, crash: Crash) -> Self {
        Self { inner, at, crash, applied: AtomicUsize::new(0) }
    }

    fn dead() -> StoreError {
        StoreError::Backend { path: "crash".into(), message: "simulated kill -9".into() }
    }

    fn is_dead(&self) -> bool {
        self.applied.load(Ordering::SeqCst) >= self.at
    }
}

impl StateStore for CrashingStore {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if self.is_dead() { Err(Self::dead()) } else { self.inner.get(tree, key) }
    }

    fn scan(&self, tree: Tree) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        if self.is_dead() { Err(Self::dead()) } else { self.inner.scan(tree) }
    }

    fn last(&self, tree: Tree) -> Result<Option<(Vec<u8>, Vec<u8>)>, StoreError> {
        if self.is_dead() { Err(Self::dead()) } else { self.inner.last(tree) }
    }

    fn apply(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        if self.is_dead() {
            return Err(Self::dead());
        }
        let n = self.applied.fetch_add(1, Ordering::SeqCst) + 1;
        if n < self.at {
            return self.inner.apply(ops);
        }
        if self.crash == Crash::AfterWrite {
            self.inner.apply(ops)?;
        }
        Err(Self::dead())
    }
}
