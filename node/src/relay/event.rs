//! What the relay produces: one event per new or changed object, and the figures it reports.
//! Events carry metadata only; an object's body never leaves the relay, and of its content
//! only the short scalar fields that both its watch and the node's egress policy name.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// An object that landed (or changed) under a watch, with the verdict of its rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayEvent {
    /// Monotonic per node, persisted: never reused, never skipped by a crash.
    pub seq: u64,
    pub watch: String,
    pub key: String,
    pub size: u64,
    /// The ETag the listing showed; the index remembers it to spot overwrites.
    pub etag: String,
    /// SHA-256 of the body as read; `None` when the object was refused on its metadata
    /// (size, suffix, content type) and its body never read.
    pub sha256: Option<String>,
    /// Inferred from the key's suffix (the object store keeps no content type).
    pub content_type: Option<String>,
    pub accepted: bool,
    /// Why the object was rejected; `None` when accepted.
    pub reason: Option<String>,
    /// The ETag this object replaced, when the event is for an overwrite.
    pub replaces_etag: Option<String>,
    /// When the relay evented the object (Unix ms); the outbox lag is measured from it.
    pub observed_unix_ms: u64,
    /// Top-level fields of an accepted JSON object that its watch asked for and the node's
    /// egress policy allows (scalars only).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, serde_json::Value>,
    /// Fields the watch asked for that were withheld: not allowed by the egress policy, or
    /// not a short scalar in this object. Names only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields_denied: Vec<String>,
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassReport {
    pub events: u64,
    pub accepted: u64,
    pub rejected: u64,
    /// Objects listed as new or changed that were gone before their body could be read.
    pub vanished: u64,
    /// Object-store listing calls made.
    pub list_calls: u64,
    /// Atomic state batches applied.
    pub batches: u64,
    /// The pass stopped early because the outbox reached `outbox_bound`.
    pub backpressure: bool,
}

impl PassReport {
    pub(crate) fn add(&mut self, other: PassReport) {
        self.events += other.events;
        self.accepted += other.accepted;
        self.rejected += other.rejected;
        self.vanished += other.vanished;
        self.list_calls += other.list_calls;
        self.batches += other.batches;
        self.backpressure |= other.backpressure;
    }
}

/// The relay's figures for status and metrics endpoints. Counters run since the relay was
/// built; depth and lag are read from the persisted outbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayMetrics {
    /// New or changed objects the relay evaluated.
    pub objects_seen: u64,
    pub objects_accepted: u64,
    pub objects_rejected: u64,
    /// Events waiting to be sent.
    pub pending_depth: u64,
    /// Age of the oldest unsent event in milliseconds; `None` when the outbox is empty.
    pub lag_ms: Option<u64>,
    /// Whether the last pass stopped at the outbox bound.
    pub backpressure: bool,
    /// The last event number handed out.
    pub last_seq: u64,
    /// Object-store listing calls made by scans and reconciliations.
    pub list_calls: u64,
    /// Events the control plane acknowledged (`mark_sent`).
    pub events_sent: u64,
    /// Event fields withheld (each field of each event counts once).
    #[serde(default)]
    pub fields_denied: u64,
}

impl From<RelayMetrics> for outpost_protocol::RelayStats {
    fn from(m: RelayMetrics) -> Self {
        Self {
            objects_seen: m.objects_seen,
            objects_accepted: m.objects_accepted,
            objects_rejected: m.objects_rejected,
            pending_depth: m.pending_depth,
            lag_ms: m.lag_ms,
            backpressure: m.backpressure,
            last_seq: m.last_seq,
            list_calls: m.list_calls,
            events_sent: m.events_sent,
        }
    }
}

impl RelayEvent {
    /// The wire form, with the store's bucket name added.
    pub fn to_wire(&self, bucket: &str) -> outpost_protocol::ObjectEvent {
        outpost_protocol::ObjectEvent {
            seq: self.seq,
            watch: self.watch.clone(),
            bucket: bucket.to_string(),
            key: self.key.clone(),
            size: self.size,
            etag: self.etag.clone(),
            sha256: self.sha256.clone(),
            content_type: self.content_type.clone(),
            accepted: self.accepted,
            reason: self.reason.clone(),
            replaces_etag: self.replaces_etag.clone(),
            observed_unix_ms: self.observed_unix_ms,
            fields: self.fields.clone(),
            fields_denied: self.fields_denied.clone(),
        }
    }
}
