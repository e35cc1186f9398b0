//! The agent's status file: a small JSON document the running agent rewrites atomically every
//! few seconds, read by `outpost status`. A file rather than a socket, so that status needs
//! neither the ledger's lock nor any listening endpoint.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::ledger::Depths;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub agent_version: String,
    pub node_id: String,
    pub org_id: String,
    pub control_url: String,
    pub ready: bool,
    /// Whether the container runtime answered and the last run's containers were reconciled:
    /// jobs are fetched and run only then. A status file of an older agent lacks it.
    #[serde(default)]
    pub runtime_ready: bool,
    /// Why the runtime is not ready, or, once jobs run, why the engine did not answer the last
    /// heartbeat's query.
    #[serde(default)]
    pub runtime_error: Option<String>,
    /// Whether the last call to the control plane succeeded.
    pub connected: bool,
    pub last_contact_unix_ms: Option<u64>,
    pub last_error: Option<String>,
    pub depths: Depths,
    pub running_jobs: Vec<String>,
    /// The relay's figures, when it runs.
    #[serde(default)]
    pub relay: Option<crate::relay::RelayMetrics>,
    /// The inference manager's figures, when an engine is built in.
    #[serde(default)]
    pub inference: Option<outpost_inference::Metrics>,
    pub started_unix_ms: u64,
    pub updated_unix_ms: u64,
    /// The trust window: when the node last heard from its control plane, and whether the
    /// window has expired. A status file of an older agent lacks it.
    #[serde(default)]
    pub trust: Option<crate::trust::TrustState>,
    /// The last bundle imported (air-gapped sites); absent before the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<crate::bundle::apply::LastBundle>,
    /// Where the metrics endpoint listens (`127.0.0.1:PORT`), when it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
}

pub fn write(path: &Path, status: &Status) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(status).unwrap_or_default())?;
    std::fs::rename(&tmp, path)
}

pub fn read(path: &Path) -> std::io::Result<Status> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Whether the process that wrote the status is still alive.
pub fn is_alive(pid: u32) -> bool {
    pid != 0 && Path::new(&format!("/proc/{pid}")).exists()
}
