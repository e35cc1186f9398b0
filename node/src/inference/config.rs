//! `[inference]`: the model memory budget, the request queue, and the local OpenAI-compatible
//! endpoint (off by default; loopback or a unix socket only; an API key always required).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceSettings {
    /// RAM loaded models may take, in MiB. Default: half of the machine's memory.
    #[serde(default)]
    pub ram_budget_mb: Option<u64>,
    /// GPU memory loaded models may take, in MiB (0: none; models load on the CPU).
    #[serde(default)]
    pub vram_budget_mb: u64,
    /// Requests that may wait while others compute; one more is refused (HTTP 429).
    #[serde(default = "default_queue_bound")]
    pub queue_bound: usize,
    /// Requests that compute at the same time.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Compute threads per request. Default: the number of CPUs divided by `concurrency` (at least 1).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Context window for text generation, in tokens; 0: the model's own, at most 4096.
    #[serde(default)]
    pub context: u32,
    /// Offload models to the GPU (agents built with the `cuda` feature; needs vram_budget_mb).
    #[serde(default)]
    pub gpu: bool,
    #[serde(default)]
    pub api: ApiSettings,
}

impl Default for InferenceSettings {
    fn default() -> Self {
        Self {
            ram_budget_mb: None,
            vram_budget_mb: 0,
            queue_bound: default_queue_bound(),
            concurrency: default_concurrency(),
            threads: None,
            context: 0,
            gpu: false,
            api: ApiSettings::default(),
        }
    }
}

/// The local endpoint for on-site applications (`/v1/chat/completions`, `/v1/completions`,
/// `/v1/embeddings`, `/v1/models`, `/metrics`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    #[serde(default)]
    pub enabled: bool,
    /// `127.0.0.1:PORT` (any loopback address) or `unix:/absolute/path.sock`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// A file holding the API key clients send as `Authorization: Bearer KEY` (one key per
    /// line; blank lines and `#` comments ignored). Required when enabled.
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self { enabled: false, listen: default_listen(), api_key_file: None }
    }
}

/// Where the endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

fn default_queue_bound() -> usize {
    16
}
fn default_concurrency() -> usize {
    1
}
fn default_listen() -> String {
    "127.0.0.1:11435".into()
}

impl ApiSettings {
    /// The listen address, refusing anything but loopback and unix sockets: the node never
    /// accepts connections from the network.
    pub fn listen_addr(&self) -> Result<Listen, String> {
        if let Some(path) = self.listen.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            if !path.is_absolute() {
                return Err(format!(
                    "inference.api.listen {:?}: a unix socket path must be absolute",
                    self.listen
                ));
            }
            return Ok(Listen::Unix(path));
        }
        let addr: SocketAddr = self.listen.parse().map_err(|_| {
            format!("inference.api.listen {:?} must be 127.0.0.1:PORT or unix:/path.sock", self.listen)
        })?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "inference.api.listen {:?} is not a loopback address; the node never listens on the network \
                 (use 127.0.0.1:PORT or a unix socket)",
                self.listen
            ));
        }
        Ok(Listen::Tcp(addr))
    }
}

impl InferenceSettings {
    pub fn validate(&self) -> Result<(), String> {
        if self.queue_bound > 10_000 {
            return Err("inference.queue_bound must be at most 10000".into());
        }
        if self.concurrency == 0 || self.concurrency > 64 {
            return Err("inference.concurrency must be 1 to 64".into());
        }
        if self.threads == Some(0) {
            return Err("inference.threads must be at least 1".into());
        }
        if self.gpu && self.vram_budget_mb == 0 {
            return Err("inference.gpu needs inference.vram_budget_mb".into());
        }
        if self.api.enabled {
            self.api.listen_addr()?;
            match &self.api.api_key_file {
                None => return Err("inference.api.enabled needs inference.api.api_key_file".into()),
                Some(p) if !p.is_absolute() => {
                    return Err(format!("inference.api.api_key_file {p:?} must be an absolute path"));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The manager's settings, with defaults filled from the machine.
    pub fn manager_config(&self) -> outpost_inference::InferenceConfig {
        let total = {
            let mut sys = sysinfo::System::new();
            sys.refresh_memory();
            sys.total_memory()
        };
        outpost_inference::InferenceConfig {
            ram_budget_bytes: self.ram_budget_mb.map_or(total / 2, |mb| mb << 20),
            vram_budget_bytes: self.vram_budget_mb << 20,
            queue_bound: self.queue_bound,
            concurrency: self.concurrency,
            load: outpost_inference::LoadOptions {
                // By default the CPUs are shared between the requests computing at once, so that
                // their compute threads together do not outnumber the CPUs.
                threads: self.threads.unwrap_or_else(|| {
                    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
                    (cpus / self.concurrency.max(1)).max(1)
                }),
                context: self.context,
                gpu: self.gpu,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_listens_only_on_loopback_or_a_unix_socket() {
        let api = |listen: &str| ApiSettings { listen: listen.into(), ..ApiSettings::default() };
        assert!(matches!(api("127.0.0.1:8080").listen_addr(), Ok(Listen::Tcp(_))));
        assert!(matches!(api("[::1]:8080").listen_addr(), Ok(Listen::Tcp(_))));
        assert!(matches!(api("unix:/run/outpost/infer.sock").listen_addr(), Ok(Listen::Unix(_))));
        assert!(api("0.0.0.0:8080").listen_addr().unwrap_err().contains("not a loopback"));
        assert!(api("10.1.2.3:8080").listen_addr().unwrap_err().contains("not a loopback"));
        assert!(api("unix:rel.sock").listen_addr().unwrap_err().contains("absolute"));
        assert!(api("localhost").listen_addr().is_err());
    }

    #[test]
    fn an_enabled_endpoint_needs_a_key_file() {
        let mut s = InferenceSettings::default();
        assert_eq!(s.validate(), Ok(()));
        s.api.enabled = true;
        assert!(s.validate().unwrap_err().contains("api_key_file"));
        s.api.api_key_file = Some("/etc/outpost/inference.key".into());
        assert_eq!(s.validate(), Ok(()));
        s.gpu = true;
        assert!(s.validate().unwrap_err().contains("vram_budget_mb"));
    }
}
