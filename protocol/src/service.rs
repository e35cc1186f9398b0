//! Services (long-running containers kept in a desired state by the node) and deployments (how
//! the control plane rolls a service revision out over the nodes a selector matches).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Resources, SecurityOverrides};

/// Longest service or deployment name.
pub const MAX_SERVICE_NAME: usize = 48;
/// Longest a health probe may take (the node's reconciler waits for it).
pub const MAX_PROBE_TIMEOUT_MS: u64 = 30_000;
/// Longest pause between health probes.
pub const MAX_PROBE_INTERVAL_MS: u64 = 3_600_000;
/// Most bytes of health-check output a status report carries.
pub const MAX_HEALTH_OUTPUT_BYTES: usize = 4096;

/// A long-running container. Hardened like a container job (read-only root, no capabilities,
/// non-root user, no network) unless the signed spec relaxes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Image by content digest `sha256:<64 hex>`; never pulled.
    pub image: String,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub security: SecurityOverrides,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// How the node tells that the service works; without one, running counts as healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    #[serde(default)]
    pub network: ServiceNetwork,
    /// Host ports to publish (needs `network = "bridge"`); the node's `[services]
    /// publish_allow` must cover each one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<PublishedPort>,
    /// Mount point of the service's named volume, which survives updates and restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// Objects of the node's local store, copied out for each revision and mounted read-only
    /// at `/in`, as a job's: exact keys, or prefixes ending in `/`. Only sent to agents that
    /// announce the `service-inputs` capability.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<String>,
    /// A new revision that is not healthy within this many seconds is rolled back on the node
    /// to the last healthy one.
    #[serde(default = "default_health_timeout_secs")]
    pub health_timeout_secs: u64,
}

pub fn default_health_timeout_secs() -> u64 {
    120
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum RestartMode {
    /// Restart whenever the container stops.
    #[default]
    Always,
    /// Restart only after a non-zero exit.
    OnFailure,
    /// Never restart.
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RestartPolicy {
    #[serde(default)]
    pub mode: RestartMode,
    /// The first wait before a restart; doubled after each one up to `backoff_max_ms`, reset
    /// once the container stays healthy for a while.
    #[serde(default = "default_backoff_initial_ms")]
    pub backoff_initial_ms: u64,
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
}

fn default_backoff_initial_ms() -> u64 {
    100
}
fn default_backoff_max_ms() -> u64 {
    30_000
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            mode: RestartMode::Always,
            backoff_initial_ms: default_backoff_initial_ms(),
            backoff_max_ms: default_backoff_max_ms(),
        }
    }
}

/// One of `exec`, `tcp_port` or `http` says how to probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// A command run inside the container: healthy when it exits 0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exec: Vec<String>,
    /// A TCP connection to this port of the container on its network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_port: Option<u16>,
    /// An HTTP GET against the container on its network: healthy on 2xx/3xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpProbe>,
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_probe_timeout_ms")]
    pub timeout_ms: u64,
    /// Failed probes in a row before the service counts as unhealthy.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Failures in the first this many ms after a start do not count.
    #[serde(default)]
    pub start_period_ms: u64,
}

fn default_interval_ms() -> u64 {
    1000
}
fn default_probe_timeout_ms() -> u64 {
    2000
}
fn default_retries() -> u32 {
    3
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpProbe {
    pub port: u16,
    #[serde(default = "default_http_path")]
    pub path: String,
}

fn default_http_path() -> String {
    "/".into()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ServiceNetwork {
    /// No network at all (the default).
    #[default]
    None,
    /// A network of its own with no route out (TCP/HTTP health checks reach it from the node).
    Internal,
    /// A network of its own with a route out, needed to publish ports.
    Bridge,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PublishedPort {
    /// Host address to bind, e.g. `127.0.0.1`.
    pub host_ip: String,
    pub host_port: u16,
    pub container_port: u16,
}

impl ServiceSpec {
    /// The checks every side makes (control plane on create, node on receipt); the error says
    /// what is wrong.
    pub fn check(&self) -> Result<(), String> {
        let digest = self.image.strip_prefix("sha256:").unwrap_or("");
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "image {:?} must be an image id `sha256:<64 hex>`; nodes never pull by name",
                self.image
            ));
        }
        if let Some(h) = &self.health {
            let probes = usize::from(!h.exec.is_empty())
                + usize::from(h.tcp_port.is_some())
                + usize::from(h.http.is_some());
            if probes != 1 {
                return Err("health needs exactly one of exec, tcp_port or http".into());
            }
            if h.interval_ms == 0 || h.timeout_ms == 0 || h.retries == 0 {
                return Err("health.interval_ms, timeout_ms and retries must be at least 1".into());
            }
            if h.timeout_ms > MAX_PROBE_TIMEOUT_MS || h.interval_ms > MAX_PROBE_INTERVAL_MS {
                return Err(format!(
                    "health.timeout_ms is at most {MAX_PROBE_TIMEOUT_MS} and interval_ms at most {MAX_PROBE_INTERVAL_MS}"
                ));
            }
            if (h.tcp_port.is_some() || h.http.is_some()) && self.network == ServiceNetwork::None {
                return Err(
                    "a tcp_port or http health check needs network = \"internal\" or \"bridge\"".into()
                );
            }
            if let Some(http) = &h.http
                && !http.path.starts_with('/')
            {
                return Err(format!("health.http.path {:?} must start with '/'", http.path));
            }
        }
        if !self.publish.is_empty() && self.network != ServiceNetwork::Bridge {
            return Err("publish needs network = \"bridge\"".into());
        }
        if let Some(v) = &self.volume
            && (!v.starts_with('/') || v == "/" || v.split('/').any(|s| s == ".."))
        {
            return Err(format!("volume {v:?} must be an absolute mount point inside the container"));
        }
        if self.restart.backoff_initial_ms == 0
            || self.restart.backoff_max_ms < self.restart.backoff_initial_ms
        {
            return Err("restart.backoff_initial_ms must be at least 1 and at most backoff_max_ms".into());
        }
        if self.health_timeout_secs == 0 {
            return Err("health_timeout_secs must be at least 1".into());
        }
        if self.inputs.len() > MAX_SERVICE_INPUTS {
            return Err(format!(
                "inputs lists {} entries, more than {MAX_SERVICE_INPUTS}; name a prefix ending in '/' instead",
                self.inputs.len()
            ));
        }
        for entry in &self.inputs {
            check_input_entry(entry).map_err(|why| format!("inputs entry {entry:?} {why}"))?;
        }
        Ok(())
    }
}

/// Most entries a service's `inputs` may list.
pub const MAX_SERVICE_INPUTS: usize = 256;

/// An object key or a prefix ending in '/': relative, no empty, `.` or `..` segment, no control
/// character, at most 1024 bytes. The error completes "entry … ".
fn check_input_entry(entry: &str) -> Result<(), String> {
    if entry.is_empty() || entry.len() > 1024 {
        return Err("must be 1 to 1024 bytes".into());
    }
    if entry.starts_with('/') {
        return Err("must not start with '/'".into());
    }
    if entry.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    let body = entry.strip_suffix('/').unwrap_or(entry);
    if body.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
        return Err("must not have an empty, '.' or '..' path segment".into());
    }
    Ok(())
}

/// A service or deployment name: 1-48 characters, lowercase letters, digits and '-', starting
/// with a letter. The error completes "name … ".
pub fn check_service_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SERVICE_NAME
        && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} must be 1-{MAX_SERVICE_NAME} lowercase letters, digits and '-', starting with a letter"
        ))
    }
}

/// The signed statement "node N shall run revision R of service S" (or, with no spec, shall
/// run no service S). Its JSON is the payload of a [`crate::SignedEnvelope`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ServiceEnvelope {
    pub org_id: String,
    pub node_id: String,
    pub service: String,
    /// The deployment this desired state comes from.
    pub deployment: String,
    /// The deployment's revision; the node refuses one below the revision it runs unless
    /// `rollback` is set.
    pub revision: u64,
    /// Per node and service, strictly increasing: a lower or equal one is a replay.
    pub seq: u64,
    pub issued_unix_ms: u64,
    /// The control plane rolls this service back to an earlier revision.
    #[serde(default)]
    pub rollback: bool,
    /// `None`: remove the service from the node.
    pub spec: Option<ServiceSpec>,
}

/// A node acknowledges that it persisted the desired state with this `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ServiceAck {
    pub service: String,
    pub seq: u64,
}

/// Where a service stands on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ServiceState {
    /// Received, container not started yet (image check, backoff).
    Pending,
    /// Started; health not established yet.
    Starting,
    Healthy,
    /// Running, but its health check fails.
    Unhealthy,
    /// Stopped and waiting for its restart backoff.
    Restarting,
    /// Cannot run (image missing, refused spec, restart policy exhausted); `message` says why.
    Failed,
    /// Exited and not restarted (restart policy `never`/`on-failure`).
    Stopped,
    /// This revision did not become healthy in time: the node went back to the last healthy one.
    RolledBack,
    /// The node refused the desired state (policy, replay); `message` says why.
    Refused,
    /// Removed on the control plane's word.
    Removed,
}

/// One change of a service's state on a node, sent like results: ordered by `seq` (per node),
/// persisted until acknowledged, stored once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ServiceReport {
    pub seq: u64,
    pub service: String,
    pub deployment: String,
    pub revision: u64,
    pub state: ServiceState,
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<i64>,
    /// The last health-check output (at most [`MAX_HEALTH_OUTPUT_BYTES`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub health_output: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub unix_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ServiceReportBatch {
    pub reports: Vec<ServiceReport>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ServiceReportAck {
    /// Every report up to this seq is stored (now or before).
    pub up_to_seq: u64,
}

/// How many nodes a rollout batch takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum BatchSize {
    Nodes(u32),
    Percent(u8),
}

impl BatchSize {
    /// Nodes per batch out of `targets` (at least one).
    pub fn of(self, targets: usize) -> usize {
        match self {
            BatchSize::Nodes(n) => (n as usize).max(1),
            BatchSize::Percent(p) => (targets * usize::from(p)).div_ceil(100).max(1),
        }
    }

    /// `10%` or `5`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("batch {text:?} must be a node count like 5 or a share like 10%");
        match text.strip_suffix('%') {
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p @ 1..=100) => Ok(BatchSize::Percent(p)),
                _ => Err(bad()),
            },
            None => match text.trim().parse::<u32>() {
                Ok(n @ 1..) => Ok(BatchSize::Nodes(n)),
                _ => Err(bad()),
            },
        }
    }
}

impl std::fmt::Display for BatchSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchSize::Nodes(n) => write!(f, "{n}"),
            BatchSize::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// How a revision rolls out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RolloutPolicy {
    #[serde(default = "default_batch")]
    pub batch: BatchSize,
    /// Seconds a batch's node has to report the new revision healthy.
    #[serde(default = "default_rollout_health_timeout")]
    pub health_timeout_secs: u64,
    /// Failed nodes in one batch that stop the rollout and roll the updated nodes back.
    #[serde(default = "default_abort_on_failures")]
    pub abort_on_failures: u32,
    /// Most nodes that may be updating (not yet healthy on the new revision) at once; caps the
    /// batch. None: the batch alone decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<u32>,
}

fn default_batch() -> BatchSize {
    BatchSize::Percent(25)
}
fn default_rollout_health_timeout() -> u64 {
    120
}
fn default_abort_on_failures() -> u32 {
    1
}

impl Default for RolloutPolicy {
    fn default() -> Self {
        Self {
            batch: default_batch(),
            health_timeout_secs: default_rollout_health_timeout(),
            abort_on_failures: default_abort_on_failures(),
            max_unavailable: None,
        }
    }
}

/// Operator: create a deployment, or a new revision of one (same name), which supersedes any
/// rollout in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    /// 1-48 lowercase letters, digits and '-', starting with a letter, not ending with '-'.
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[a-z]([a-z0-9-]{0,46}[a-z0-9])?$"))]
    pub name: String,
    pub org_id: String,
    pub selector: String,
    /// The service name on the nodes (default: the deployment's name). Deployments of one
    /// service compose by priority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[a-z]([a-z0-9-]{0,46}[a-z0-9])?$"))]
    pub service: Option<String>,
    pub spec: ServiceSpec,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub rollout: RolloutPolicy,
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RolloutStatus {
    InProgress,
    Paused,
    /// Every online target runs the revision healthy.
    Complete,
    /// Stopped by its abort criteria or an operator; updated nodes rolled back.
    RolledBack,
    /// Replaced by a newer revision before it completed.
    Superseded,
}

/// A node's place in a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum NodePhase {
    /// Not in a batch yet, or the desired state not acknowledged yet.
    Pending,
    /// Told to run the new revision; not healthy yet.
    Updating,
    Healthy,
    Failed,
    RolledBack,
    /// Silent past its lease: gets the desired state when it comes back.
    Offline,
    /// Runs a higher-priority deployment of the same service.
    Overridden,
    /// The agent does not understand services.
    AgentTooOld,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DeploymentNode {
    pub node_id: String,
    pub phase: NodePhase,
    /// The revision the node is told to run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_revision: Option<u64>,
    /// What the node last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<ServiceReport>,
    /// Why the node is failed, rolled back, overridden or waiting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DeploymentInfo {
    pub name: String,
    pub org_id: String,
    pub service: String,
    pub selector: String,
    pub priority: i32,
    pub rollout: RolloutPolicy,
    /// The newest revision.
    pub revision: u64,
    /// The revision nodes outside the rollout keep (the last one that completed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_revision: Option<u64>,
    pub status: RolloutStatus,
    /// Why the rollout stopped, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Nodes of the current rollout that were given the new revision, in batch order.
    #[serde(default)]
    pub updated: Vec<String>,
    pub spec: ServiceSpec,
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
    /// Filled in by `deploy status`: every target node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<DeploymentNode>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DeploymentList {
    pub deployments: Vec<DeploymentInfo>,
}

/// Operator: act on a deployment's rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DeployAction {
    Pause,
    Resume,
    /// Stop the rollout and roll the updated nodes back.
    Abort,
    /// Roll every node back to the previous stable revision.
    Rollback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DeployActionRequest {
    pub action: DeployAction,
}
