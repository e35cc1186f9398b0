//! The relay's persisted state and the one batch shape that changes it. Everything a pass
//! learns (new events, the next event number, a watch's cursor and index) goes into a single
//! [`Batch`] applied atomically, so a crash leaves either all of a batch or none of it: an
//! object is never evented twice nor skipped.
//!
//! ```text
//! Tree::Relay   seq                   last event number handed out (u64 big-endian)
//!               c/<watch>             cursor: {"prefix": …, "after": last key scanned}
//!               i/<watch>/<key>       index: the ETag last evented for that key
//! Tree::Events  <seq u64 big-endian>  an event waiting to be sent (the outbox)
//! ```
//! Watch names hold no `/`, so `i/<watch>/` never matches another watch's entries.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::event::RelayEvent;
use crate::store::{Op, StateStore, StoreError, Tree};

const SEQ: &[u8] = b"seq";

#[derive(Debug, Serialize, Deserialize)]
struct Cursor {
    /// The watch's prefix when the cursor was written: a changed prefix starts the watch over.
    prefix: String,
    after: String,
}

#[derive(Clone)]
pub(crate) struct State {
    store: Arc<dyn StateStore>,
}

fn cursor_key(watch: &str) -> Vec<u8> {
    format!("c/{watch}").into_bytes()
}

fn index_prefix(watch: &str) -> Vec<u8> {
    format!("i/{watch}/").into_bytes()
}

fn index_key(watch: &str, key: &str) -> Vec<u8> {
    let mut k = index_prefix(watch);
    k.extend_from_slice(key.as_bytes());
    k
}

fn corrupt(tree: Tree, key: &[u8], message: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        tree: tree.name(),
        key: String::from_utf8_lossy(key).chars().take(80).collect(),
        message: message.to_string(),
    }
}

impl State {
    pub(crate) fn new(store: Arc<dyn StateStore>) -> Self {
        Self { store }
    }

    pub(crate) fn last_seq(&self) -> Result<u64, StoreError> {
        match self.store.get(Tree::Relay, SEQ)? {
            None => Ok(0),
            Some(v) => {
                let bytes: [u8; 8] = v.try_into().map_err(|_| corrupt(Tree::Relay, SEQ, "not 8 bytes"))?;
                Ok(u64::from_be_bytes(bytes))
            }
        }
    }

    /// The last key scanned for this watch, or `None` when it has not started, or started under
    /// another prefix (the caller then resets it with [`State::reset_ops`]).
    pub(crate) fn cursor(&self, watch: &str, prefix: &str) -> Result<CursorState, StoreError> {
        let key = cursor_key(watch);
        let Some(v) = self.store.get(Tree::Relay, &key)? else {
            return Ok(CursorState::Fresh);
        };
        let c: Cursor = serde_json::from_slice(&v).map_err(|e| corrupt(Tree::Relay, &key, e))?;
        if c.prefix == prefix { Ok(CursorState::At(c.after)) } else { Ok(CursorState::PrefixChanged) }
    }

    pub(crate) fn indexed_etag(&self, watch: &str, key: &str) -> Result<Option<String>, StoreError> {
        let k = index_key(watch, key);
        self.store
            .get(Tree::Relay, &k)?
            .map(|v| String::from_utf8(v).map_err(|e| corrupt(Tree::Relay, &k, e)))
            .transpose()
    }

    /// The watch's whole index, key → ETag, in key order.
    pub(crate) fn index(&self, watch: &str) -> Result<BTreeMap<String, String>, StoreError> {
        let prefix = index_prefix(watch);
        let mut out = BTreeMap::new();
        for (k, v) in self.store.scan(Tree::Relay)? {
            let Some(rest) = k.strip_prefix(prefix.as_slice()) else { continue };
            let key = String::from_utf8(rest.to_vec()).map_err(|e| corrupt(Tree::Relay, &k, e))?;
            let etag = String::from_utf8(v).map_err(|e| corrupt(Tree::Relay, &k, e))?;
            out.insert(key, etag);
        }
        Ok(out)
    }

    /// Ops that forget a watch's cursor and index, for a watch whose prefix changed.
    pub(crate) fn reset_ops(&self, watch: &str) -> Result<Vec<Op>, StoreError> {
        let prefix = index_prefix(watch);
        let mut ops: Vec<Op> = self
            .store
            .scan(Tree::Relay)?
            .into_iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| Op::Delete(Tree::Relay, k))
            .collect();
        ops.push(Op::Delete(Tree::Relay, cursor_key(watch)));
        Ok(ops)
    }

    pub(crate) fn apply(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        self.store.apply(ops)
    }

    /// The oldest `limit` unsent events (only those are decoded).
    pub(crate) fn pending_first(&self, limit: usize) -> Result<Vec<RelayEvent>, StoreError> {
        self.store
            .scan(Tree::Events)?
            .into_iter()
            .take(limit)
            .map(|(k, v)| serde_json::from_slice(&v).map_err(|e| corrupt(Tree::Events, &k, e)))
            .collect()
    }

    pub(crate) fn pending_keys(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(self.store.scan(Tree::Events)?.into_iter().map(|(k, _)| k).collect())
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CursorState {
    Fresh,
    PrefixChanged,
    At(String),
}

/// One atomic step of a pass: events numbered from the persisted counter, and the cursor and
/// index changes that say those objects have been evented.
pub(crate) struct Batch {
    ops: Vec<Op>,
    next_seq: u64,
    events: Vec<RelayEvent>,
}

impl Batch {
    pub(crate) fn new(last_seq: u64) -> Self {
        Self { ops: Vec::new(), next_seq: last_seq + 1, events: Vec::new() }
    }

    /// Number the event, queue it, and record its ETag in the watch's index.
    pub(crate) fn event(&mut self, mut event: RelayEvent) {
        event.seq = self.next_seq;
        self.next_seq += 1;
        self.ops.push(Op::Put(
            Tree::Relay,
            index_key(&event.watch, &event.key),
            event.etag.clone().into_bytes(),
        ));
        // Serialising plain strings and numbers cannot fail.
        self.ops.push(Op::Put(
            Tree::Events,
            event.seq.to_be_bytes().to_vec(),
            serde_json::to_vec(&event).unwrap_or_default(),
        ));
        self.events.push(event);
    }

    pub(crate) fn unindex(&mut self, watch: &str, key: &str) {
        self.ops.push(Op::Delete(Tree::Relay, index_key(watch, key)));
    }

    pub(crate) fn cursor(&mut self, watch: &str, prefix: &str, after: &str) {
        let c = Cursor { prefix: prefix.to_owned(), after: after.to_owned() };
        self.ops.push(Op::Put(Tree::Relay, cursor_key(watch), serde_json::to_vec(&c).unwrap_or_default()));
    }

    pub(crate) fn event_count(&self) -> u64 {
        self.events.len() as u64
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The ops to apply (with the counter advanced when events were added) and the events.
    pub(crate) fn finish(mut self) -> (Vec<Op>, Vec<RelayEvent>) {
        if let Some(last) = self.events.last() {
            self.ops.push(Op::Put(Tree::Relay, SEQ.to_vec(), last.seq.to_be_bytes().to_vec()));
        }
        (self.ops, self.events)
    }
}
