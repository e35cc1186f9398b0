use serde::{Deserialize, Serialize};

/// Sent every few seconds by a node: proof of life and what the box has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub agent_version: String,
    pub inventory: Inventory,
    pub running_jobs: u32,
    pub outbox_depth: u64,
    /// The relay's figures, when the node has watches configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayStats>,
    /// Models in the node's store, by manifest digest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<crate::ModelSummary>,
}

/// What a node's relay has done since the agent started, and how far behind it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RelayStats {
    pub objects_seen: u64,
    pub objects_accepted: u64,
    pub objects_rejected: u64,
    /// Events waiting in the node's outbox.
    pub pending_depth: u64,
    /// Age of the oldest unsent event (ms); absent when the outbox is empty.
    #[serde(default)]
    pub lag_ms: Option<u64>,
    /// Scanning is paused because the outbox is full.
    pub backpressure: bool,
    /// The last event number handed out.
    pub last_seq: u64,
    /// Object-store listing calls made.
    pub list_calls: u64,
    /// Events the control plane has acknowledged.
    pub events_sent: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    pub hostname: String,
    pub os: String,
    pub kernel: String,
    pub cpu_model: String,
    pub cpu_count: u32,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    #[serde(default)]
    pub disks: Vec<Disk>,
    #[serde(default)]
    pub gpus: Vec<Gpu>,
    #[serde(default)]
    pub docker_version: Option<String>,
    /// Image ids (`sha256:...`) present in the local Docker engine.
    #[serde(default)]
    pub images: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Disk {
    pub mount_point: String,
    pub total_bytes: u64,
    pub available_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Gpu {
    pub vendor: String,
    pub name: String,
    /// Device node or PCI address it was found at.
    pub device: String,
}

/// A node as the control plane knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NodeInfo {
    pub node_id: String,
    pub org_id: String,
    pub hostname: String,
    pub enrolled_unix_ms: u64,
    /// SHA-256 of the node's client certificate (DER), hex.
    pub cert_sha256: String,
    #[serde(default)]
    pub last_seen_unix_ms: Option<u64>,
    #[serde(default)]
    pub last_heartbeat: Option<Heartbeat>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NodeList {
    pub nodes: Vec<NodeInfo>,
}

/// One entry of the control plane's audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    pub seq: u64,
    pub unix_ms: u64,
    /// Who acted: `operator`, `node:<id>`, `anonymous`.
    pub actor: String,
    /// What happened, e.g. `enroll.rejected`, `job.submitted`.
    pub action: String,
    pub detail: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AuditList {
    pub entries: Vec<AuditEntry>,
}
