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
    /// The labels of the node's own configuration (`[node] labels`). Operator labels set on
    /// the control plane win over these where both name a key.
    #[serde(default, skip_serializing_if = "crate::Labels::is_empty")]
    pub labels: crate::Labels,
    /// What the agent understands: [`PROTOCOL_REVISION`] and [`capability`] names. Absent
    /// from agents older than revision 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce: Option<Announce>,
    /// Jobs the node's site policy holds for an approver (at most [`MAX_AWAITING_LISTED`]),
    /// sent to control planes of protocol revision 3 or later.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub awaiting_approval: Vec<AwaitingApproval>,
}

/// Most jobs awaiting approval one heartbeat lists.
pub const MAX_AWAITING_LISTED: usize = 256;

/// A job held at the site for an approver, as a heartbeat reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AwaitingApproval {
    pub job_id: String,
    pub attempt: u32,
    pub since_unix_ms: u64,
}

/// The additive revision of API v1 a peer speaks. 1: everything before fleet placement;
/// 2: node labels, capabilities, cancellation, jobs placed by selector; 3: site policy
/// (outcomes `refused` and `not_approved`, the job's submitter).
pub const PROTOCOL_REVISION: u32 = 3;

/// The response header in which a control plane of revision 2 or later states its
/// [`PROTOCOL_REVISION`] on every answer. A control plane older than that sends none, and an
/// agent then leaves out what such a control plane would refuse (announce, labels).
pub const PROTOCOL_HEADER: &str = "outpost-protocol";

/// Capability names an agent announces. The control plane never sends a node a message or a
/// field that needs a capability the node has not announced.
pub mod capability {
    /// Takes `cancel` entries in a poll answer: stops the attempt and reports `cancelled`.
    pub const CANCEL: &str = "cancel";
    /// Sends `[node] labels` in heartbeats.
    pub const LABELS: &str = "labels";
    /// Runs services: takes `services` in a poll answer, reports to `/v1/node/services`.
    pub const SERVICES: &str = "services";
    /// Takes `logs` requests in a poll answer and answers on `/v1/node/logs`.
    pub const LOGS: &str = "logs";
    /// Runs services whose spec names `inputs` from the local object store.
    pub const SERVICE_INPUTS: &str = "service-inputs";
    /// Holds work to a site policy: takes a job envelope's `submitter`.
    pub const SITE_POLICY: &str = "site-policy";
    /// Takes a configuration part in a bundle.
    pub const BUNDLE_CONFIG: &str = "bundle-config";
    /// Takes a job envelope's `recipients` and seals the result for them.
    pub const SEALED_RESULTS: &str = "sealed-results";
    /// Takes `org_settings` in a poll answer: features off, the default profile.
    pub const ORG_SETTINGS: &str = "org-settings";
    /// Renews its client certificate over mutual TLS before it expires
    /// ([`crate::paths::NODE_CERTIFICATE`]), so it may be given a short-lived one.
    pub const CERT_RENEWAL: &str = "cert-renewal";
    /// Sends its audit log to [`crate::paths::NODE_AUDIT_UPLINK`] as it grows.
    pub const AUDIT_UPLINK: &str = "audit-uplink";
    /// Takes `trust` in a poll answer and fetches [`crate::paths::NODE_TRUST`] when it changes:
    /// learns new CAs and signing keys during a rotation's overlap.
    pub const TRUST_ROTATION: &str = "trust-rotation";
    /// Every capability this build has.
    pub const ALL: &[&str] = &[
        CANCEL,
        LABELS,
        SERVICES,
        LOGS,
        SERVICE_INPUTS,
        SITE_POLICY,
        BUNDLE_CONFIG,
        SEALED_RESULTS,
        ORG_SETTINGS,
        CERT_RENEWAL,
        AUDIT_UPLINK,
        TRUST_ROTATION,
    ];
}

/// A peer's protocol revision and capabilities, sent by the agent in every heartbeat and poll.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Announce {
    pub protocol: u32,
    #[serde(default)]
    pub capabilities: Vec<String>,
}

impl Announce {
    /// What this build announces.
    pub fn this_build() -> Self {
        Self {
            protocol: PROTOCOL_REVISION,
            capabilities: capability::ALL.iter().map(|c| (*c).to_owned()).collect(),
        }
    }

    pub fn has(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }
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
    /// What the agent announced when it enrolled; the announcement of its heartbeats wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrolled_announce: Option<Announce>,
    /// Labels set by operators (`outpost-control node label`); stored centrally.
    #[serde(default, skip_serializing_if = "crate::Labels::is_empty")]
    pub operator_labels: crate::Labels,
    /// The effective labels selectors match: the node's own, overridden by the operator's.
    /// Filled in by the control plane on every answer; not stored.
    #[serde(default, skip_serializing_if = "crate::Labels::is_empty")]
    pub labels: crate::Labels,
    /// Whether the node's last heartbeat is within the control plane's lease. Filled in on
    /// every answer; not stored.
    #[serde(default)]
    pub online: bool,
    /// When an operator revoked the node (`outpost-control node revoke`): from then on its
    /// certificate is refused on every connection and no work is placed on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_unix_ms: Option<u64>,
    /// The certificate the node renewed from (SHA-256 of its DER, hex): still accepted until
    /// the node first connects with the new one, so a renewal lost on the way locks nobody out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_cert_sha256: Option<String>,
}

impl NodeInfo {
    /// The node's own labels (from its last heartbeat) overridden by the operator's.
    pub fn effective_labels(&self) -> crate::Labels {
        let mut labels = self.last_heartbeat.as_ref().map(|h| h.labels.clone()).unwrap_or_default();
        labels.extend(self.operator_labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        labels
    }

    /// What the node announced in its last heartbeat (before the first one: when it
    /// enrolled); revision 1 with no capabilities for an agent that announced nothing.
    pub fn announce(&self) -> Announce {
        match &self.last_heartbeat {
            Some(h) => h.announce.clone(),
            None => self.enrolled_announce.clone(),
        }
        .unwrap_or(Announce { protocol: 1, capabilities: Vec::new() })
    }
}

/// Operator: change a node's operator labels. `set` is applied, then `remove`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LabelNodeRequest {
    #[serde(default)]
    pub set: crate::Labels,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NodeList {
    pub nodes: Vec<NodeInfo>,
    /// Set when the listing was asked for a page (`limit`) and more nodes follow: pass it as
    /// `after` for the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<String>,
}

/// One entry of the control plane's audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    pub seq: u64,
    pub unix_ms: u64,
    /// Who acted: `owner` (the admin token), `token:<name>@<org>` (an API token), `node:<id>`,
    /// `anonymous`; entries written before roles existed say `operator`.
    pub actor: String,
    /// What happened, e.g. `enroll.rejected`, `job.submitted`.
    pub action: String,
    pub detail: String,
    /// The organisation the action concerned, where it concerned one: what that organisation's
    /// tokens see of the trail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_id: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AuditList {
    pub entries: Vec<AuditEntry>,
}
