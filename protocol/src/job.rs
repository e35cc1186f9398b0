use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use crate::{InferenceSpec, ResultReport};

/// What to run: a container job. Everything the node enforces comes from here, and this is
/// covered by the org's signature, so nothing between operator and node can relax it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ContainerSpec {
    /// Image by content digest: `sha256:<64 hex>` (the image id `docker load` preserves).
    /// The node never pulls: the image must already be present.
    pub image: String,
    /// Command and arguments (replaces the image's CMD; the image's ENTRYPOINT is kept).
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub resources: Resources,
    /// Give the container a network (bridge). Off by default: `network none`.
    #[serde(default)]
    pub network: bool,
    /// Wall-clock limit; the container is killed when it runs longer.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Relaxations of the hardened defaults; empty means fully hardened.
    #[serde(default)]
    pub security: SecurityOverrides,
    /// Keys of the node's local object store (a key ending in `/` names every object under
    /// that prefix) copied into a read-only mount at `/in` before the container starts, each
    /// at `/in/<key>`. Bulk data stays on site.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<String>,
    /// Files the job writes under `/out` are uploaded to the local store under this prefix
    /// (`<prefix><path under /out>`) when it ends; the result lists their keys, sizes and
    /// SHA-256, never their bodies. No `/out` mount when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_prefix: Option<String>,
    /// Output keys (or prefixes ending in `/`) whose bodies the job asks to report to the
    /// control plane. Granted only where the node's egress policy also allows them; each
    /// refusal is logged, audited and listed in the result's `egress_denied`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_bodies: Vec<String>,
}

pub fn default_timeout_secs() -> u64 {
    600
}

/// What a job runs: a container, or inference on a model of the node's store. On the wire a
/// container spec is the `ContainerSpec` object itself (so manifests signed before inference
/// jobs existed read the same); an inference spec is recognised by its `kind` field.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(untagged)]
pub enum JobSpec {
    Container(ContainerSpec),
    Inference(InferenceSpec),
}

impl<'de> Deserialize<'de> for JobSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let value = serde_json::Value::deserialize(d)?;
        if value.get("kind").is_some() {
            serde_json::from_value(value).map(JobSpec::Inference).map_err(D::Error::custom)
        } else {
            serde_json::from_value(value).map(JobSpec::Container).map_err(D::Error::custom)
        }
    }
}

impl From<ContainerSpec> for JobSpec {
    fn from(spec: ContainerSpec) -> Self {
        Self::Container(spec)
    }
}

impl From<InferenceSpec> for JobSpec {
    fn from(spec: InferenceSpec) -> Self {
        Self::Inference(spec)
    }
}

impl JobSpec {
    pub fn container(&self) -> Option<&ContainerSpec> {
        match self {
            Self::Container(c) => Some(c),
            Self::Inference(_) => None,
        }
    }

    pub fn inference(&self) -> Option<&InferenceSpec> {
        match self {
            Self::Container(_) => None,
            Self::Inference(i) => Some(i),
        }
    }

    pub fn timeout_secs(&self) -> u64 {
        match self {
            Self::Container(c) => c.timeout_secs,
            Self::Inference(i) => i.timeout_secs,
        }
    }

    /// `container`, `generate` or `embed`.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Self::Container(_) => "container",
            Self::Inference(i) => match i.kind {
                crate::InferenceKind::Generate => "generate",
                crate::InferenceKind::Embed => "embed",
            },
        }
    }
}

/// Resource limits applied to the container (cgroups).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU limit in thousandths of a core.
    #[serde(default = "default_cpu_millis")]
    pub cpu_millis: u64,
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    #[serde(default = "default_pids")]
    pub pids: u64,
}

impl Default for Resources {
    fn default() -> Self {
        Self { cpu_millis: default_cpu_millis(), memory_mb: default_memory_mb(), pids: default_pids() }
    }
}

fn default_cpu_millis() -> u64 {
    1000
}
fn default_memory_mb() -> u64 {
    256
}
fn default_pids() -> u64 {
    64
}

/// Each field relaxes one hardened default. They exist for workloads that truly need them and
/// are visible in the signed manifest, so relaxing is an operator's signed decision.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SecurityOverrides {
    /// Mount the root filesystem read-write (default: read-only with a tmpfs on /tmp).
    #[serde(default)]
    pub writable_rootfs: bool,
    /// Run as this `uid[:gid]` instead of the unprivileged default 65534:65534.
    #[serde(default)]
    pub user: Option<String>,
    /// Capabilities to add back after dropping all of them.
    #[serde(default)]
    pub cap_add: Vec<String>,
}

/// The signed statement "node N may run this job, as the seq-th job it receives".
/// Its serde_json serialization is the canonical byte string that is signed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct JobEnvelope {
    pub job_id: String,
    pub attempt: u32,
    pub org_id: String,
    pub node_id: String,
    /// Per-node sequence number, strictly increasing: a lower or equal one is a replay.
    pub seq: u64,
    pub issued_unix_ms: u64,
    pub expires_unix_ms: u64,
    pub spec: JobSpec,
}

/// A payload and an ed25519 signature over exactly its bytes.
///
/// The payload travels as the very string that was signed, so that verification never depends
/// on re-serialising: the node verifies these bytes, then parses them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SignedEnvelope {
    /// The JSON of a [`JobEnvelope`].
    pub payload: String,
    /// Id of the signing key ([`crate::PublicKey::key_id`]).
    pub key_id: String,
    /// ed25519 signature over the payload's UTF-8 bytes, hex.
    pub signature_hex: String,
}

/// One job handed to a node by a poll.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct JobAssignment {
    pub job_id: String,
    pub attempt: u32,
    pub envelope: SignedEnvelope,
}

/// Long-poll request. The node lists the jobs it has persisted since its last poll; the control
/// plane re-offers every assignment that was not acknowledged, so a job given to a node that
/// died before persisting it is never lost.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PollRequest {
    #[serde(default)]
    pub ack_job_ids: Vec<String>,
    /// How long the server may hold the request when no job is waiting (capped at 30 s).
    #[serde(default)]
    pub wait_secs: Option<u64>,
    /// Most jobs to hand out in one answer.
    #[serde(default)]
    pub max_jobs: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PollResponse {
    pub jobs: Vec<JobAssignment>,
}

/// Operator: run `spec` on `node_id`. The control plane signs it with the org key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SubmitJobRequest {
    pub node_id: String,
    pub spec: JobSpec,
    /// How long the signed manifest stays valid if the node is offline (default one day).
    #[serde(default)]
    pub expires_in_secs: Option<u64>,
}

/// Where a job stands, as the control plane sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Signed and waiting for the node to take it.
    Queued,
    /// The node has persisted it.
    Accepted,
    /// A result is stored.
    Finished,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct JobInfo {
    pub job_id: String,
    pub attempt: u32,
    pub org_id: String,
    pub node_id: String,
    pub seq: u64,
    pub state: JobState,
    pub spec: JobSpec,
    pub submitted_unix_ms: u64,
    #[serde(default)]
    pub accepted_unix_ms: Option<u64>,
    #[serde(default)]
    pub result: Option<ResultReport>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct JobList {
    pub jobs: Vec<JobInfo>,
}
