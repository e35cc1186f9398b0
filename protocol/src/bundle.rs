//! Signed bundles: the sneakernet uplink of an air-gapped site. What the control plane would
//! send a node over the network travels as one file (a zstd-compressed tar whose first member
//! is `manifest.json`, a [`crate::SignedEnvelope`] of a [`BundleManifest`] signed by the
//! organisation's key, followed by its parts in the manifest's order); what the node would
//! report comes back as a [`ResultsBundle`] signed by the node's own key, and its receipt goes
//! to the node as a bundle carrying a [`ResultsAck`]. Jobs and services inside are the same
//! signed envelopes as on the network, so the node verifies them with the same code.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The bundle format this build writes and reads.
pub const BUNDLE_FORMAT: u32 = 1;
/// The first member of every bundle.
pub const MANIFEST_MEMBER: &str = "manifest.json";
/// Largest `manifest.json` a reader accepts.
pub const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;
/// Most parts one bundle may carry.
pub const MAX_BUNDLE_PARTS: usize = 4096;
/// Largest job, service or acknowledgement part (a signed envelope); images and models may be
/// as large as the bundle.
pub const MAX_ENVELOPE_PART_BYTES: u64 = 1024 * 1024;

/// What a part is, and so what the node does with it once everything verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum PartKind {
    /// An image tarball (`docker save`), loaded into the engine.
    Image,
    /// A model directory as an uncompressed tar, imported into the signed model store.
    Model,
    /// A [`crate::JobAssignment`] (JSON) for the part's node, handed to its ledger.
    Job,
    /// A signed [`crate::ServiceEnvelope`] (a [`crate::SignedEnvelope`], JSON) for the part's node.
    Service,
    /// A [`crate::SignedEnvelope`] of a [`ResultsAck`]: clears the node's outbox up to it.
    ResultsAck,
    /// A TOML drop-in for every target node, naming only [`BUNDLE_CONFIG_KEYS`]; it sits
    /// under the node's own configuration files, which win where both set a key.
    Config,
}

/// The top-level tables a bundle's configuration part may set: what the node says about itself
/// (`node`), how much work it takes (`agent`), what its relay watches (`relay`), how it serves
/// models (`inference`). Where it keeps data, whom it talks to, what may leave the site, which
/// ports services publish and what it trusts stay the site's own.
pub const BUNDLE_CONFIG_KEYS: &[&str] = &["node", "agent", "relay", "inference"];
/// Largest configuration part.
pub const MAX_CONFIG_PART_BYTES: u64 = 64 * 1024;

/// Whether a configuration part (its TOML as a JSON value) sets only what a bundle may: the
/// tables [`BUNDLE_CONFIG_KEYS`], without `relay.triggers` (a local trigger starts work as the
/// site's own). The operator's CLI and the node both ask this.
pub fn check_bundle_config(doc: &serde_json::Value) -> Result<(), String> {
    let Some(doc) = doc.as_object() else { return Err("the configuration is not a table".into()) };
    for (k, v) in doc {
        if !BUNDLE_CONFIG_KEYS.contains(&k.as_str()) {
            return Err(format!(
                "a bundle may not set `{k}` (only {}: the rest of the configuration is the site's own)",
                BUNDLE_CONFIG_KEYS.join(", ")
            ));
        }
        if !v.is_object() {
            return Err(format!("`{k}` must be a table"));
        }
    }
    if doc.get("relay").and_then(serde_json::Value::as_object).is_some_and(|r| r.contains_key("triggers")) {
        return Err(
            "a bundle may not set `relay.triggers`: local triggers start work as the site's own".into()
        );
    }
    Ok(())
}

/// One part: a tar member after the manifest, in this order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundlePart {
    /// The member's path in the tar: `parts/<index>-<kind>`, nothing else.
    pub name: String,
    pub kind: PartKind,
    /// Exact size in bytes.
    pub size: u64,
    /// Lowercase hex SHA-256 of the member's bytes.
    pub sha256: String,
    /// The node a job, service or acknowledgement part is for (others skip it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// For the operator: the file or name it was built from.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub label: String,
}

/// The signed table of contents of a bundle for nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleManifest {
    pub format: u32,
    pub bundle_id: String,
    pub org_id: String,
    /// Per target node, a counter higher than that of every earlier bundle for it: a node
    /// refuses a bundle whose counter is at or below the last it imported (a replay).
    pub counters: BTreeMap<String, u64>,
    /// The selector the nodes were chosen by, when one was (for the operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    pub created_unix_ms: u64,
    pub expires_unix_ms: u64,
    pub parts: Vec<BundlePart>,
}

impl BundleManifest {
    /// The part member name for index `i`.
    pub fn part_name(i: usize, kind: PartKind) -> String {
        format!("parts/{i:04}-{}", crate::wire_name(&kind))
    }

    /// The checks every reader makes before trusting anything else in the manifest.
    pub fn check(&self) -> Result<(), String> {
        if self.format != BUNDLE_FORMAT {
            return Err(format!("bundle format {} (this build reads format {BUNDLE_FORMAT})", self.format));
        }
        if self.counters.is_empty() {
            return Err("the manifest names no target node".into());
        }
        if self.parts.len() > MAX_BUNDLE_PARTS {
            return Err(format!("{} parts, more than {MAX_BUNDLE_PARTS}", self.parts.len()));
        }
        for (i, p) in self.parts.iter().enumerate() {
            if p.name != Self::part_name(i, p.kind) {
                return Err(format!(
                    "part {i} is named {:?}; expected {:?}",
                    p.name,
                    Self::part_name(i, p.kind)
                ));
            }
            if p.sha256.len() != 64
                || !p.sha256.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            {
                return Err(format!("part {}: sha256 is not 64 lowercase hex digits", p.name));
            }
            let per_node = matches!(p.kind, PartKind::Job | PartKind::Service | PartKind::ResultsAck);
            if per_node != p.node_id.is_some() {
                return Err(format!(
                    "part {}: a node id is required for job, service and ack parts only",
                    p.name
                ));
            }
            if per_node && p.size > MAX_ENVELOPE_PART_BYTES {
                return Err(format!(
                    "part {}: {} bytes, more than {MAX_ENVELOPE_PART_BYTES}",
                    p.name, p.size
                ));
            }
            if p.kind == PartKind::Config && p.size > MAX_CONFIG_PART_BYTES {
                return Err(format!("part {}: {} bytes, more than {MAX_CONFIG_PART_BYTES}", p.name, p.size));
            }
        }
        if self.parts.iter().filter(|p| p.kind == PartKind::Config).count() > 1 {
            return Err("more than one configuration part".into());
        }
        Ok(())
    }
}

/// The control plane's receipt of a results bundle, for one node: everything listed is stored,
/// so the node may drop it from its outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultsAck {
    pub node_id: String,
    /// The results bundle this answers.
    pub results_bundle_id: String,
    /// `job_id/attempt` of every result stored (now or before).
    pub results: Vec<String>,
    /// `job_id/attempt` of results refused for good (not this node's job): the node drops them
    /// from its outbox as undeliverable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<String>,
    /// Relay events stored up to this seq.
    #[serde(default)]
    pub events_up_to_seq: u64,
    /// Service reports stored up to this seq.
    #[serde(default)]
    pub service_reports_up_to_seq: u64,
    /// The node's acknowledgements of desired service states that were recorded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_acks: Vec<crate::ServiceAck>,
    /// Audit entries stored up to this seq (the node may then forget which it carried).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub audit_up_to_seq: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What a node carries out: every result, relay event and service report its outbox holds
/// that the control plane has not acknowledged. Signed by the node's key ([`ResultsBundle`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultsPayload {
    pub format: u32,
    pub bundle_id: String,
    pub node_id: String,
    pub org_id: String,
    pub created_unix_ms: u64,
    #[serde(default)]
    pub results: Vec<crate::ResultReport>,
    #[serde(default)]
    pub events: Vec<crate::ObjectEvent>,
    #[serde(default)]
    pub service_reports: Vec<crate::ServiceReport>,
    /// The desired service states the node persisted (as a poll would acknowledge them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_acks: Vec<crate::ServiceAck>,
    /// What the box has and says about itself now, as a heartbeat would (labels, models,
    /// capabilities); the control plane keeps it as the node's last heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<crate::Heartbeat>,
    /// The node's audit log from the entry after the last one the control plane stored, in
    /// order: each links to the one before by its hash.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audit: Vec<crate::AuditRecord>,
}

/// A results bundle (zstd-compressed JSON): the payload exactly as signed, the node's
/// certificate and its signature (ECDSA P-256 with SHA-256, ASN.1 DER, hex) over the payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ResultsBundle {
    pub payload: String,
    pub cert_pem: String,
    pub signature_hex: String,
}

/// A file the operator's machine puts in a bundle (an image tarball, a model tar): only its
/// size and digest travel to the control plane, which signs them into the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BundleFile {
    pub kind: PartKind,
    pub size: u64,
    pub sha256: String,
    #[serde(default)]
    pub label: String,
}

/// Operator (`POST /v1/orgs/{org_id}/bundles`): sign a bundle for `nodes`, or for the org's
/// nodes that `selector` matches. Each job is created for each target node as if submitted
/// (queued, so a node that later connects is offered it too and knows it already).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BundleRequest {
    #[serde(default)]
    pub nodes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default)]
    pub files: Vec<BundleFile>,
    #[serde(default)]
    pub jobs: Vec<crate::JobSpec>,
    /// Deployments (by name) whose desired state for each target node goes in the bundle, as
    /// the rollout signed it for that node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deployments: Vec<String>,
    /// How long the bundle (and its jobs) stay valid; default 30 days, at most a year.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 31536000))]
    pub expires_in_secs: Option<u64>,
    /// age X25519 public keys every job of the bundle seals its result for (see
    /// [`crate::seal`]); every target node must announce `sealed-results`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<String>,
}

/// The signed manifest and the bytes of the parts the control plane made (jobs,
/// acknowledgements), in manifest order; `None` where the part is one of the request's files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BundleResponse {
    pub manifest: crate::SignedEnvelope,
    pub parts: Vec<Option<String>>,
    /// The jobs created, per node.
    #[serde(default)]
    pub jobs: Vec<crate::JobInfo>,
}

/// Operator (`POST /v1/bundles/results`): what a results bundle brought.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ResultsImport {
    pub node_id: String,
    pub results_bundle_id: String,
    /// `job_id/attempt` stored now.
    pub stored: Vec<String>,
    /// Stored before (this bundle, or the network, brought them already).
    pub duplicates: Vec<String>,
    /// Late results of attempts a later one replaced: kept, not counted.
    pub superseded: Vec<String>,
    /// Refused, with the reason (a job not sent to this node, unknown).
    pub refused: Vec<(String, String)>,
    /// Relay events stored now, and the seq up to which all are stored.
    #[serde(default)]
    pub events_stored: u32,
    #[serde(default)]
    pub events_up_to_seq: u64,
    /// Service reports stored up to this seq.
    #[serde(default)]
    pub service_reports_up_to_seq: u64,
    /// Audit entries stored now, and the seq up to which the node's audit log is stored.
    #[serde(default)]
    pub audit_stored: u32,
    #[serde(default)]
    pub audit_up_to_seq: u64,
    /// The acknowledgement bundle to carry back to the node.
    pub ack: BundleResponse,
}
