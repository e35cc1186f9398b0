//! Relay events: "an object landed in the node's local store", validated and numbered by the
//! node, delivered through its outbox, stored once per (node, seq) by the control plane; and
//! the org-level triggers that turn matching events into jobs on the same node.
//!
//! An event carries metadata only. Object bodies never travel in an event; of an object's
//! content, only the short scalar fields its node's egress policy allows (`fields`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ContainerSpec;

/// Most events one [`EventBatch`] may carry.
pub const MAX_EVENTS_PER_BATCH: usize = 500;

/// One object the relay saw, accepted or rejected by its watch's rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ObjectEvent {
    /// Per node, starting at 1, gapless and never reused: the delivery and dedupe key.
    pub seq: u64,
    /// Name of the node's watch that saw the object.
    pub watch: String,
    /// The local store's bucket (`[storage.s3] bucket`, or `local` for the fs store).
    pub bucket: String,
    pub key: String,
    pub size: u64,
    /// The store's entity tag, without quotes.
    pub etag: String,
    /// Lowercase hex SHA-256 of the body; absent when the object was refused on metadata alone.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Inferred from the key's suffix.
    #[serde(default)]
    pub content_type: Option<String>,
    /// True when the object passed every rule of its watch.
    pub accepted: bool,
    /// Why the object was rejected (absent when accepted).
    #[serde(default)]
    pub reason: Option<String>,
    /// Set when the object overwrote one already evented: the ETag it replaced.
    #[serde(default)]
    pub replaces_etag: Option<String>,
    /// When the node saw it (Unix ms).
    pub observed_unix_ms: u64,
    /// Top-level scalar fields of the object that its watch asked for and the node's egress
    /// policy (`[egress] allow_event_fields`) allows; absent when none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub fields: BTreeMap<String, serde_json::Value>,
    /// Names of fields the watch asked for that the node withheld (not allowed by its egress
    /// policy, or not a short scalar); absent when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields_denied: Vec<String>,
}

/// Node → control plane: the oldest unsent events, in seq order. The node is named by its
/// client certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EventBatch {
    pub events: Vec<ObjectEvent>,
}

/// The control plane's answer to an [`EventBatch`]: every event up to `up_to_seq` is stored
/// (now or before), so the node may drop them from its outbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EventAck {
    pub up_to_seq: u64,
    /// Events of this batch stored now.
    pub stored: u32,
    /// Events of this batch stored before (a resend); not stored again.
    pub duplicates: u32,
}

/// An event as the control plane keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct StoredEvent {
    /// Global arrival order across every node, starting at 1 and never reused: the `cursor`
    /// of [`crate::paths::EVENTS`] (list the events after the last one seen).
    #[serde(default)]
    pub cursor: u64,
    pub node_id: String,
    pub org_id: String,
    pub received_unix_ms: u64,
    pub event: ObjectEvent,
    /// Jobs that triggers started for this event.
    #[serde(default)]
    pub triggered_jobs: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EventList {
    pub events: Vec<StoredEvent>,
}

/// Which events a trigger fires on. Every set field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EventMatch {
    /// Only events of this node; any node of the org when absent.
    #[serde(default)]
    pub node_id: Option<String>,
    #[serde(default)]
    pub bucket: Option<String>,
    #[serde(default)]
    pub watch: Option<String>,
    /// The key must start with this.
    #[serde(default)]
    pub key_prefix: String,
    /// The key must end with this.
    #[serde(default)]
    pub key_suffix: Option<String>,
    /// Fire on rejected objects too (default: accepted ones only).
    #[serde(default)]
    pub include_rejected: bool,
}

/// Operator: "an event matching `on` → run `job` on the node that saw it, with the object as
/// its input". The object's key is appended to the job's `inputs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateTriggerRequest {
    pub org_id: String,
    /// 1 to 64 of `A-Z a-z 0-9 _ . -`, unique in the org.
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[A-Za-z0-9_.-]{1,64}$"))]
    pub name: String,
    pub on: EventMatch,
    /// The job template.
    pub job: ContainerSpec,
    /// How long each triggered job's signed manifest stays valid (default one day, at most 30 days).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 2592000))]
    pub expires_in_secs: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    pub trigger_id: String,
    pub org_id: String,
    pub name: String,
    pub on: EventMatch,
    pub job: ContainerSpec,
    #[serde(default)]
    pub expires_in_secs: Option<u64>,
    pub created_unix_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TriggerList {
    pub triggers: Vec<Trigger>,
}
