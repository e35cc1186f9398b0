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

impl JobSpec {
    /// The organisation feature ([`crate::feature`]) this work needs.
    pub fn feature(&self) -> &'static str {
        match self {
            JobSpec::Container(_) => crate::feature::CONTAINERS,
            JobSpec::Inference(_) => crate::feature::INFERENCE,
        }
    }
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
    /// Who asked for the job, for the site's policy. Sent only to agents that announce the
    /// `site-policy` capability (an older agent refuses fields it does not know).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitter: Option<Submitter>,
    /// age X25519 public keys the result is sealed for (see [`crate::seal`]). Sent only to
    /// agents that announce the `sealed-results` capability.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<String>,
}

/// Who asked for a piece of work: stamped by the control plane into the signed envelope (so the
/// site's policy can allow by organisation, role or name), or made by the node for work it
/// starts itself (a local trigger) or from a deployment (a service).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Submitter {
    pub org_id: String,
    /// The operator's token name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The operator's role (`owner` for the bootstrap admin token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The deployment a service revision comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    /// The control plane's org trigger that made the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// The node's own local relay trigger that made the job (never sent by a control plane).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_trigger: Option<String>,
}

impl Submitter {
    /// Someone of `org_id`, nothing more said yet (fill the rest with struct update syntax).
    pub fn in_org(org_id: &str) -> Self {
        Self {
            org_id: org_id.to_owned(),
            name: None,
            role: None,
            deployment: None,
            trigger: None,
            local_trigger: None,
        }
    }

    /// The ways a site policy can name this submitter: `org:ID`, `role:NAME`, `name:TOKEN`,
    /// `deployment:NAME`, `trigger:NAME`, `local-trigger:NAME`.
    pub fn identities(&self) -> Vec<String> {
        let mut out = vec![format!("org:{}", self.org_id)];
        for (k, v) in [
            ("role", &self.role),
            ("name", &self.name),
            ("deployment", &self.deployment),
            ("trigger", &self.trigger),
            ("local-trigger", &self.local_trigger),
        ] {
            if let Some(v) = v {
                out.push(format!("{k}:{v}"));
            }
        }
        out
    }
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
    /// How long the server may hold the request when no job is waiting (capped by the
    /// server's `--max-hold`, 30 s by default).
    #[serde(default)]
    pub wait_secs: Option<u64>,
    /// Most jobs to hand out in one answer.
    #[serde(default)]
    pub max_jobs: Option<u32>,
    /// What the polling agent understands (absent from agents before protocol revision 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce: Option<crate::Announce>,
    /// Service desired states the node has persisted since its last poll.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_acks: Vec<crate::ServiceAck>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PollResponse {
    pub jobs: Vec<JobAssignment>,
    /// Attempts the node must stop and report as `cancelled` (or leave be, when already
    /// finished). Sent only to agents that announce the `cancel` capability.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cancel: Vec<CancelAttempt>,
    /// Signed [`crate::ServiceEnvelope`]s: the desired state of the node's services, offered
    /// until acknowledged. Sent only to agents that announce the `services` capability.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<SignedEnvelope>,
    /// Job output the control plane asks the node to send (`/v1/node/logs`). Sent only to
    /// agents that announce the `logs` capability.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logs: Vec<crate::LogRequest>,
    /// The organisation's settings, in every answer to agents that announce the
    /// `org-settings` capability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_settings: Option<crate::OrgSettings>,
    /// The tag of the node's trust ([`crate::NodeTrust::tag`]), in every answer to agents that
    /// announce the `trust-rotation` capability: a new tag sends the node to fetch it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<String>,
}

/// One job attempt to stop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CancelAttempt {
    pub job_id: String,
    pub attempt: u32,
    /// Why: `cancelled by operator` or `superseded by attempt N on node M`.
    pub reason: String,
}

/// Operator: run `spec` on `node_id`, or on nodes of `org_id` that `selector` matches (with a
/// `placement`). The control plane signs each job with the org key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SubmitJobRequest {
    /// The one node to run on; empty when a selector places the job.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node_id: String,
    pub spec: JobSpec,
    /// How long the signed manifest stays valid if the node is offline (default one day, at
    /// most 30 days).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 2592000))]
    pub expires_in_secs: Option<u64>,
    /// A label selector (Kubernetes grammar) over the nodes of `org_id`, instead of `node_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// The organisation whose nodes a selector chooses from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_id: Option<String>,
    /// With a selector: `any` (one node, re-placed when it dies; `POST /v1/jobs`) or `each`
    /// (one job per node, a group; `POST /v1/job-groups`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// age X25519 public keys (`age1…`) to seal the result for: the control plane then sees
    /// only bookkeeping (see [`crate::seal`]). Only nodes announcing `sealed-results` take it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<String>,
}

impl SubmitJobRequest {
    /// A job for one named node.
    pub fn for_node(node_id: impl Into<String>, spec: impl Into<JobSpec>) -> Self {
        Self {
            node_id: node_id.into(),
            spec: spec.into(),
            expires_in_secs: None,
            selector: None,
            org_id: None,
            placement: None,
            recipients: Vec::new(),
        }
    }

    /// A job placed by a selector over an organisation's nodes.
    pub fn for_selector(
        org_id: impl Into<String>,
        selector: impl Into<String>,
        placement: Placement,
        spec: impl Into<JobSpec>,
    ) -> Self {
        Self {
            node_id: String::new(),
            spec: spec.into(),
            expires_in_secs: None,
            selector: Some(selector.into()),
            org_id: Some(org_id.into()),
            placement: Some(placement),
            recipients: Vec::new(),
        }
    }
}

/// How a job with a selector is placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// On one matching node that is online, the least loaded; if its lease expires before it
    /// reports, the job is offered to another matching node as a new attempt.
    Any,
    /// One job on every matching node (a job group).
    Each,
}

/// A job group: one job per node a selector matched at submission.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct JobGroup {
    pub group_id: String,
    pub org_id: String,
    pub selector: String,
    pub jobs: Vec<JobInfo>,
}

/// An attempt of a job that was replaced by a later one (its node's lease expired): a result
/// it reports late is kept here and never counted as the job's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SupersededAttempt {
    pub attempt: u32,
    pub node_id: String,
    pub seq: u64,
    pub superseded_unix_ms: u64,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_result: Option<ResultReport>,
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
    /// Cancelled by an operator: before the node took it, or stopped by the node.
    Cancelled,
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
    /// The job group (`--each`) this job belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// The selector that placed this job, and how.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// Earlier attempts on nodes whose lease expired (`any` placement), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub superseded: Vec<SupersededAttempt>,
    /// When an operator asked to cancel the job while its node had it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_requested_unix_ms: Option<u64>,
    /// The node holds the job for its site's approval, since then (as its last heartbeat said).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub awaiting_site_approval_since_unix_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct JobList {
    pub jobs: Vec<JobInfo>,
}
