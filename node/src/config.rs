//! Agent configuration: a base TOML, then `config.d/*.toml` merged in name order, then a fixed
//! set of `OUTPOST_*` environment overrides. Unknown keys anywhere are errors, so a typo never
//! silently falls back to a default. This module reads files; it never starts anything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the base file is looked for when no `--config` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/outpost/config.toml";

/// The configuration the last bundle brought, in the data directory.
pub const BUNDLE_CONFIG_FILE: &str = "bundle-config.toml";

/// Parses a bundle's configuration part and checks it names only [`outpost_protocol::BUNDLE_CONFIG_KEYS`].
pub fn parse_bundle_config(text: &str) -> Result<toml::Table, String> {
    let table: toml::Table =
        text.parse().map_err(|e: toml::de::Error| format!("not TOML: {}", e.message()))?;
    check_bundle_table(&table)?;
    Ok(table)
}

fn check_bundle_table(table: &toml::Table) -> Result<(), String> {
    outpost_protocol::check_bundle_config(&serde_json::to_value(table).map_err(|e| e.to_string())?)
}

/// Environment variables that override a config key (and nothing else is read from the env).
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("OUTPOST_PROFILE", "profile"),
    ("OUTPOST_DATA_DIR", "data_dir"),
    ("OUTPOST_CONTROL_URL", "control.url"),
    ("OUTPOST_POLL_WAIT_SECS", "control.poll_wait_secs"),
    ("OUTPOST_HEARTBEAT_SECS", "agent.heartbeat_secs"),
    ("OUTPOST_MAX_CONCURRENT_JOBS", "agent.max_concurrent_jobs"),
    ("OUTPOST_DOCKER_SOCKET", "docker.socket"),
    ("OUTPOST_LOG_FORMAT", "log.format"),
    ("OUTPOST_LOG_LEVEL", "log.level"),
    ("OUTPOST_STORAGE_BACKEND", "storage.backend"),
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Deployment profile (the seed's configuration matrix).
    #[serde(default)]
    pub profile: Profile,
    /// Ledger, identity and status live here.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// What this node says about itself to the fleet (labels).
    #[serde(default)]
    pub node: NodeConfig,
    /// What services from the control plane may do on this node (see docs/fleet.md).
    #[serde(default)]
    pub services: ServicesConfig,
    /// Air-gapped bundles (see docs/air-gap.md).
    #[serde(default)]
    pub bundles: BundlesConfig,
    /// How long the node trusts what its control plane signed without hearing from it.
    #[serde(default)]
    pub trust: TrustConfig,
    #[serde(default)]
    pub control: ControlConfig,
    #[serde(default)]
    pub agent: AgentConfig,
    #[serde(default)]
    pub docker: DockerConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    /// Watches on the local store that turn new objects into events (see docs/relay.md).
    /// No watches: the relay does not run.
    #[serde(default)]
    pub relay: crate::relay::RelayConfig,
    /// What may leave the site besides metadata (see docs/storage.md). Default: nothing.
    #[serde(default)]
    pub egress: EgressConfig,
    /// The signed model store (see models/README.md).
    #[serde(default)]
    pub models: ModelsConfig,
    /// Inference: model memory budget, request queue, local endpoint (see docs/inference.md).
    #[serde(default)]
    pub inference: crate::inference::InferenceSettings,
    /// The site policy: what may run here, whoever signed it (see docs/site-policy.md). Only
    /// the node's own files set it; never a bundle.
    #[serde(default)]
    pub policy: crate::policy::Policy,
    /// Prometheus metrics on 127.0.0.1 (see docs/operators.md).
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The base file given with `--config` (none: the default path); not a key.
    #[serde(skip)]
    pub base_file: Option<PathBuf>,
}

/// The node's own description of itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Labels sent with every heartbeat, e.g. `{ site = "icu", gpu = "l4" }` (Kubernetes label
    /// rules). Operators' labels on the control plane win where both set a key; deployments and
    /// jobs choose nodes by selectors over them.
    #[serde(default)]
    pub labels: outpost_protocol::Labels,
}

/// Prometheus metrics: `GET /metrics` on 127.0.0.1 only, never another address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve them (default true).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Port on 127.0.0.1 (default 9465; 0 picks a free one, which `outpost status` shows).
    #[serde(default = "default_metrics_port")]
    pub port: u16,
}

fn default_true() -> bool {
    true
}

pub const DEFAULT_METRICS_PORT: u16 = 9465;

fn default_metrics_port() -> u16 {
    DEFAULT_METRICS_PORT
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { enabled: true, port: DEFAULT_METRICS_PORT }
    }
}

/// The trust window (see docs/air-gap.md, "Trust that expires").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// After this long without hearing from the control plane (network or bundle), accept only
    /// bundles signed within it: `90d`, `36h`, …; `off` for no window.
    #[serde(default = "default_max_offline")]
    pub max_offline: String,
}

fn default_max_offline() -> String {
    "90d".into()
}

impl Default for TrustConfig {
    fn default() -> Self {
        Self { max_offline: default_max_offline() }
    }
}

/// Air-gapped bundles: a directory the agent watches (a mounted USB disk, say) for `*.bundle`
/// files to import, besides its own inbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundlesConfig {
    /// Absolute path of a directory to watch (it may come and go).
    #[serde(default)]
    pub watch: Option<PathBuf>,
}

/// The node's own limits on services: nothing the control plane signs can widen them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicesConfig {
    /// Host addresses and ports a service may publish, as `IP:PORT` or `IP:FIRST-LAST`
    /// (e.g. `127.0.0.1:8000-8100`). Empty: no service publishes a port.
    #[serde(default)]
    pub publish_allow: Vec<String>,
}

impl ServicesConfig {
    /// Whether `ip:port` may be published; the error of an entry that does not parse.
    pub fn allows(&self, ip: &str, port: u16) -> bool {
        self.publish_allow
            .iter()
            .filter_map(|e| parse_publish_allow(e).ok())
            .any(|(a, lo, hi)| a == ip && (lo..=hi).contains(&port))
    }
}

/// `IP:PORT` or `IP:FIRST-LAST` → (ip, first, last).
pub fn parse_publish_allow(entry: &str) -> Result<(String, u16, u16), String> {
    let bad = || format!("services.publish_allow entry {entry:?} must be IP:PORT or IP:FIRST-LAST");
    let (ip, ports) = entry.rsplit_once(':').ok_or_else(bad)?;
    ip.parse::<std::net::IpAddr>().map_err(|_| bad())?;
    let (lo, hi) = match ports.split_once('-') {
        Some((a, b)) => (a.parse::<u16>().map_err(|_| bad())?, b.parse::<u16>().map_err(|_| bad())?),
        None => {
            let p = ports.parse::<u16>().map_err(|_| bad())?;
            (p, p)
        }
    };
    if lo == 0 || hi < lo {
        return Err(bad());
    }
    Ok((ip.to_owned(), lo, hi))
}

/// The model store: where imported models live and whose signatures the node accepts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsConfig {
    /// The store's directory; `data_dir/models` when absent.
    #[serde(default)]
    pub store_dir: Option<PathBuf>,
    /// ed25519 public keys (64 hex digits) of model publishers trusted besides the org key
    /// pinned at enrollment.
    #[serde(default)]
    pub trusted_publishers: Vec<String>,
}

/// The node's egress policy. By default only metadata (event metadata, output keys, sizes and
/// SHA-256) leaves the site. A body leaves only when its key is under one of these prefixes
/// AND the signed job manifest asks for it (`egress_bodies`); a field of an object rides in
/// its relay event only when named here AND by its watch (`event_fields`). Every refusal is
/// logged and audited. Keep it in its own drop-in (`config.d/egress.toml`) so it is reviewed on its own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressConfig {
    /// Key prefixes of the local store whose object bodies may be reported to the control
    /// plane. Empty: none.
    #[serde(default)]
    pub allow_body_prefixes: Vec<String>,
    /// Top-level JSON fields of accepted objects that relay events may carry, when a watch
    /// also asks for them (`event_fields`); only short scalars are ever carried. Empty: none.
    #[serde(default)]
    pub allow_event_fields: Vec<String>,
    /// Whether a running job's container output may be streamed to the control plane when an
    /// operator asks (`outpost-control job logs`). Off: only the result's output tails leave
    /// the site, and each request is refused and audited.
    #[serde(default)]
    pub allow_logs: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    Cloud,
    Hybrid,
    #[default]
    OnPrem,
    AirGapped,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// The control plane's URL; when absent, the one given at enrollment is used.
    #[serde(default)]
    pub url: Option<String>,
    /// How long the control plane may hold a long-poll open (at most 30 s: the agent asks for no
    /// more, and a control plane run with a shorter `--max-hold` holds it that long at most).
    #[serde(default = "default_poll_wait_secs")]
    pub poll_wait_secs: u64,
    /// Limit for every other request to the control plane.
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
    /// Dial the control plane at all (default true; the `air-gapped` profile says false): when
    /// false the agent never connects, and results, events, service reports and its audit log
    /// leave only in results bundles (`outpost bundle export`).
    #[serde(default = "default_true")]
    pub uplink: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    #[serde(default = "default_heartbeat_secs")]
    pub heartbeat_secs: u64,
    /// Containers run at the same time.
    #[serde(default = "default_max_concurrent_jobs")]
    pub max_concurrent_jobs: u32,
    /// Jobs accepted but not finished; the agent stops fetching at this bound.
    #[serde(default = "default_queue_limit")]
    pub queue_limit: u32,
    /// Results waiting for the control plane; the agent stops fetching at this bound.
    #[serde(default = "default_outbox_limit")]
    pub outbox_limit: u32,
    /// On SIGTERM, how long to let in-flight reports finish. Running containers are left
    /// running and adopted by the next start.
    #[serde(default = "default_shutdown_grace_secs")]
    pub shutdown_grace_secs: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerConfig {
    /// Docker socket path or URL; the engine's defaults (DOCKER_HOST, /var/run/docker.sock)
    /// when absent.
    #[serde(default)]
    pub socket: Option<String>,
    /// An AppArmor profile every job and service container runs under (`apparmor=NAME`), in
    /// place of the engine's default (`docker-default`). The profile must be loaded in the
    /// kernel (the packages and the appliance install `outpost-container` under
    /// /etc/apparmor.d/). Set, it is required: on an engine without AppArmor, or with the
    /// profile not loaded, no container is started (fail closed).
    #[serde(default)]
    pub apparmor_profile: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `outpost_node=debug` (RUST_LOG wins when set).
    #[serde(default = "default_log_level")]
    pub level: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Where objects (job inputs and outputs, data watched by the relay) are kept on site.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    #[serde(default)]
    pub backend: StorageBackend,
    #[serde(default)]
    pub fs: FsStorageConfig,
    /// Required when `backend = "s3"`.
    #[serde(default)]
    pub s3: Option<S3StorageConfig>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// A local directory (the embedded default).
    #[default]
    Fs,
    /// An S3-compatible server (Garage, MinIO, Ceph RGW, AWS).
    S3,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsStorageConfig {
    /// The store's directory; `data_dir/objects` when absent.
    #[serde(default)]
    pub root: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3StorageConfig {
    /// `http://` or `https://` URL of the server, without a path (path-style addressing).
    pub endpoint: String,
    /// The server's region name (Garage: its `s3_region`, often `garage`).
    pub region: String,
    pub bucket: String,
    /// TOML with `access_key_id` and `secret_access_key`, not readable by others. When absent,
    /// `OUTPOST_S3_ACCESS_KEY_ID` and `OUTPOST_S3_SECRET_ACCESS_KEY` are read instead.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/outpost")
}
fn default_poll_wait_secs() -> u64 {
    25
}
fn default_request_timeout_secs() -> u64 {
    15
}
fn default_heartbeat_secs() -> u64 {
    30
}
fn default_max_concurrent_jobs() -> u32 {
    4
}
fn default_queue_limit() -> u32 {
    64
}
fn default_outbox_limit() -> u32 {
    10_000
}
fn default_shutdown_grace_secs() -> u64 {
    10
}
fn default_log_level() -> String {
    "info".into()
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            url: None,
            poll_wait_secs: default_poll_wait_secs(),
            request_timeout_secs: default_request_timeout_secs(),
            uplink: true,
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            heartbeat_secs: default_heartbeat_secs(),
            max_concurrent_jobs: default_max_concurrent_jobs(),
            queue_limit: default_queue_limit(),
            outbox_limit: default_outbox_limit(),
            shutdown_grace_secs: default_shutdown_grace_secs(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Text, level: default_log_level() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("invalid configuration (merged from {sources}): {message}")]
    Invalid { sources: String, message: String },
}

/// Where each layer of a configuration came from, for error messages and `check-config`.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub sources: Vec<String>,
    /// Keys whose value is the profile's default (no file or variable set them).
    pub from_profile: Vec<String>,
    /// The profile, when it is the organisation's default (the configuration names none).
    pub org_profile: Option<String>,
}

impl Profile {
    pub fn name(self) -> &'static str {
        match self {
            Profile::Cloud => "cloud",
            Profile::Hybrid => "hybrid",
            Profile::OnPrem => "on-prem",
            Profile::AirGapped => "air-gapped",
        }
    }

    /// The defaults this profile sets, beneath every file and variable (each still overridable).
    /// See docs/configuration.md, "Deployment profiles".
    pub fn defaults(self) -> Vec<(&'static str, toml::Value)> {
        use toml::Value::{Boolean, String as Text};
        match self {
            // A node in a cloud VM: always online; a long silence is suspicious; operators may
            // follow job logs.
            Profile::Cloud => {
                vec![("trust.max_offline", Text("7d".into())), ("egress.allow_logs", Boolean(true))]
            }
            // Data on site, compute coordinated from the cloud over a link that may drop.
            Profile::Hybrid => {
                vec![("trust.max_offline", Text("30d".into())), ("egress.allow_logs", Boolean(false))]
            }
            // Everything on site; metadata only leaves; weeks without the control plane are normal.
            Profile::OnPrem => {
                vec![("trust.max_offline", Text("90d".into())), ("egress.allow_logs", Boolean(false))]
            }
            // No link at all: bundles carried in on removable media are the only way in and out.
            Profile::AirGapped => vec![
                ("control.uplink", Boolean(false)),
                ("bundles.watch", Text("/media/outpost".into())),
                ("trust.max_offline", Text("180d".into())),
                ("egress.allow_logs", Boolean(false)),
            ],
        }
    }
}

impl Config {
    /// Load `path` (or the default path, which may be absent), its `config.d/`, then the env.
    pub fn load(path: Option<&Path>) -> Result<Loaded, ConfigError> {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        Self::load_with_env(path, &env)
    }

    pub fn load_with_env(path: Option<&Path>, env: &BTreeMap<String, String>) -> Result<Loaded, ConfigError> {
        Self::load_layers(path, env, None)
    }

    /// Loads as [`Config::load_with_env`] would with `bundle` (a bundle's configuration part)
    /// in place of the one the node holds: whether the node would start with it.
    pub fn load_with_bundle(
        path: Option<&Path>,
        env: &BTreeMap<String, String>,
        bundle: toml::Table,
    ) -> Result<Loaded, ConfigError> {
        Self::load_layers(path, env, Some(bundle))
    }

    /// Layers, each over the one before: the base file; the configuration the last bundle
    /// brought (`data_dir/bundle-config.toml`, only [`outpost_protocol::BUNDLE_CONFIG_KEYS`]); `config.d/*.toml`
    /// in name order; the environment. Local files and the environment always win.
    fn load_layers(
        path: Option<&Path>,
        env: &BTreeMap<String, String>,
        bundle_override: Option<toml::Table>,
    ) -> Result<Loaded, ConfigError> {
        let explicit = path.is_some();
        let base = path.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
        let mut local: Vec<(String, toml::Table)> = Vec::new();

        if base.exists() || explicit {
            local.push((base.display().to_string(), read_table(&base)?));
        }
        let dropins = base.parent().map(|p| p.join("config.d"));
        if let Some(dir) = dropins.filter(|d| d.is_dir()) {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(|source| ConfigError::Read { path: dir.clone(), source })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            files.sort();
            for f in files {
                local.push((f.display().to_string(), read_table(&f)?));
            }
        }
        let mut env_layer = toml::Table::new();
        let mut env_sources = Vec::new();
        for (var, key) in ENV_OVERRIDES {
            if let Some(value) = env.get(*var) {
                set_dotted(&mut env_layer, key, env_value(value));
                env_sources.push(format!("${var}"));
            }
        }
        let stack = |bundle: Option<(String, toml::Table)>| {
            let mut merged = toml::Table::new();
            let mut sources = Vec::new();
            let mut layers = local.iter().cloned();
            if (explicit || base.exists())
                && let Some((source, table)) = layers.next()
            {
                merge(&mut merged, table);
                sources.push(source);
            }
            if let Some((source, table)) = bundle {
                merge(&mut merged, table);
                sources.push(source);
            }
            for (source, table) in layers {
                merge(&mut merged, table);
                sources.push(source);
            }
            merge(&mut merged, env_layer.clone());
            sources.extend(env_sources.iter().cloned());
            (merged, sources)
        };
        let (mut merged, mut sources) = stack(None);
        // Where the data directory is decides whether a bundle's configuration applies.
        let data_dir = merged
            .get("data_dir")
            .and_then(toml::Value::as_str)
            .map(PathBuf::from)
            .unwrap_or_else(default_data_dir);
        let bundle_file = data_dir.join(BUNDLE_CONFIG_FILE);
        let bundle = match bundle_override {
            Some(table) => Some(("(the bundle's configuration)".to_owned(), table)),
            None if bundle_file.is_file() => {
                let table = read_table(&bundle_file)?;
                check_bundle_table(&table).map_err(|message| ConfigError::Invalid {
                    sources: bundle_file.display().to_string(),
                    message,
                })?;
                Some((format!("{} (from a bundle)", bundle_file.display()), table))
            }
            None => None,
        };
        if bundle.is_some() {
            (merged, sources) = stack(bundle);
        }
        // A node whose configuration names no profile takes its organisation's default, as the
        // agent last heard it from the control plane.
        let mut org_profile = None;
        if !merged.contains_key("profile") {
            let org = crate::org_settings::load(&data_dir)
                .map_err(|message| ConfigError::Invalid { sources: sources.join(", "), message })?;
            if let Some(p) = org.and_then(|o| o.default_profile) {
                merged.insert("profile".into(), toml::Value::String(p.clone()));
                sources.push(format!(
                    "{} (the organisation's default profile)",
                    data_dir.join(crate::org_settings::ORG_SETTINGS_FILE).display()
                ));
                org_profile = Some(p);
            }
        }
        let describe = if sources.is_empty() { "built-in defaults".to_string() } else { sources.join(", ") };
        // The profile's defaults go beneath everything that was set.
        let profile: Profile = match merged.get("profile") {
            Some(v) => v.clone().try_into().map_err(|e: toml::de::Error| ConfigError::Invalid {
                sources: describe.clone(),
                message: format!("profile: {}", e.message()),
            })?,
            None => Profile::default(),
        };
        let mut from_profile = Vec::new();
        let mut defaults = toml::Table::new();
        for (key, value) in profile.defaults() {
            if !has_dotted(&merged, key) {
                from_profile.push(key.to_owned());
            }
            set_dotted(&mut defaults, key, value);
        }
        merge(&mut defaults, merged);
        let merged = defaults;
        let config: Config = toml::Value::Table(merged).try_into().map_err(|e: toml::de::Error| {
            ConfigError::Invalid { sources: describe.clone(), message: e.message().to_string() }
        })?;
        config.validate().map_err(|message| ConfigError::Invalid { sources: describe, message })?;
        let config = Config { base_file: path.map(Path::to_path_buf), ..config };
        Ok(Loaded { config, sources, from_profile, org_profile })
    }

    fn validate(&self) -> Result<(), String> {
        if let Some(url) = &self.control.url
            && !url.starts_with("https://")
        {
            return Err(format!(
                "control.url {url:?} must start with https:// (the agent speaks TLS 1.3 only)"
            ));
        }
        if self.agent.max_concurrent_jobs == 0 {
            return Err("agent.max_concurrent_jobs must be at least 1".into());
        }
        if self.agent.heartbeat_secs == 0 {
            return Err("agent.heartbeat_secs must be at least 1".into());
        }
        if self.agent.queue_limit < self.agent.max_concurrent_jobs {
            return Err("agent.queue_limit must be at least agent.max_concurrent_jobs".into());
        }
        if !self.data_dir.is_absolute() {
            return Err(format!("data_dir {:?} must be an absolute path", self.data_dir));
        }
        outpost_protocol::selector::check_labels(&self.node.labels)
            .map_err(|why| format!("node.labels: {why}"))?;
        if let Some(profile) = &self.docker.apparmor_profile
            && !crate::runtime::docker::is_profile_name(profile)
        {
            return Err(format!(
                "docker.apparmor_profile {profile:?} is not a profile name: use 1-64 characters \
                 [A-Za-z0-9_.-], starting with a letter or digit (and not `unconfined`)"
            ));
        }
        self.validate_storage()?;
        self.validate_models()?;
        self.policy.validate()?;
        self.inference.validate()?;
        self.validate_relay()
    }

    fn validate_models(&self) -> Result<(), String> {
        if let Some(dir) = &self.models.store_dir
            && !dir.is_absolute()
        {
            return Err(format!("models.store_dir {dir:?} must be an absolute path"));
        }
        for key in &self.models.trusted_publishers {
            if key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "models.trusted_publishers: {key:?} is not an ed25519 public key (64 hex digits)"
                ));
            }
        }
        Ok(())
    }

    fn validate_relay(&self) -> Result<(), String> {
        self.relay.validate().map_err(|e| e.to_string())?;
        crate::trust::parse_window(&self.trust.max_offline).map_err(|e| format!("trust.max_offline: {e}"))?;
        if self.bundles.watch.as_ref().is_some_and(|w| !w.is_absolute()) {
            return Err("bundles.watch must be an absolute path".into());
        }
        if self.egress.allow_body_prefixes.iter().any(String::is_empty) {
            return Err(
                "egress.allow_body_prefixes: an empty prefix would allow every body; name the prefixes"
                    .into(),
            );
        }
        if self.egress.allow_event_fields.iter().any(String::is_empty) {
            return Err("egress.allow_event_fields: an empty field name allows nothing; remove it".into());
        }
        Ok(())
    }

    fn validate_storage(&self) -> Result<(), String> {
        if let Some(root) = &self.storage.fs.root
            && !root.is_absolute()
        {
            return Err(format!("storage.fs.root {root:?} must be an absolute path"));
        }
        match (&self.storage.backend, &self.storage.s3) {
            (StorageBackend::S3, None) => {
                return Err(
                    "storage.backend = \"s3\" needs a [storage.s3] section with endpoint, region and bucket"
                        .into(),
                );
            }
            (_, Some(s3)) => {
                if !(s3.endpoint.starts_with("http://") || s3.endpoint.starts_with("https://")) {
                    return Err(format!(
                        "storage.s3.endpoint {:?} must start with http:// or https://",
                        s3.endpoint
                    ));
                }
                if s3.region.is_empty() || s3.bucket.is_empty() {
                    return Err("storage.s3.region and storage.s3.bucket must not be empty".into());
                }
                if let Some(f) = &s3.credentials_file
                    && !f.is_absolute()
                {
                    return Err(format!("storage.s3.credentials_file {f:?} must be an absolute path"));
                }
            }
            (StorageBackend::Fs, None) => {}
        }
        Ok(())
    }

    /// The bucket name events carry: the S3 bucket, or `local` for the fs store.
    pub fn bucket_name(&self) -> &str {
        match (&self.storage.backend, &self.storage.s3) {
            (StorageBackend::S3, Some(s3)) => &s3.bucket,
            _ => "local",
        }
    }

    pub fn identity_dir(&self) -> PathBuf {
        self.data_dir.join("identity")
    }
    pub fn ledger_dir(&self) -> PathBuf {
        self.data_dir.join("ledger")
    }
    pub fn status_file(&self) -> PathBuf {
        self.data_dir.join("status.json")
    }
    /// The model store's directory: `models.store_dir`, or `data_dir/models`.
    /// The trust window (`[trust] max_offline`), checked at load.
    pub fn trust_window(&self) -> Option<std::time::Duration> {
        crate::trust::parse_window(&self.trust.max_offline).ok().flatten()
    }

    pub fn models_dir(&self) -> PathBuf {
        self.models.store_dir.clone().unwrap_or_else(|| self.data_dir.join("models"))
    }
    /// The fs object store's directory: `storage.fs.root`, or `data_dir/objects`.
    pub fn objects_root(&self) -> PathBuf {
        self.storage.fs.root.clone().unwrap_or_else(|| self.data_dir.join("objects"))
    }
}

fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    text.parse::<toml::Table>()
        .map_err(|e| ConfigError::Syntax { path: path.into(), message: e.message().to_string() })
}

/// Later tables win key by key; nested tables merge instead of replacing each other.
fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

fn has_dotted(table: &toml::Table, dotted: &str) -> bool {
    let mut cur = table;
    let mut parts = dotted.split('.').peekable();
    while let Some(p) = parts.next() {
        match cur.get(p) {
            None => return false,
            Some(toml::Value::Table(t)) if parts.peek().is_some() => cur = t,
            Some(_) => return parts.peek().is_none(),
        }
    }
    false
}

fn set_dotted(table: &mut toml::Table, dotted: &str, value: toml::Value) {
    let mut parts: Vec<&str> = dotted.split('.').collect();
    let last = parts.pop().unwrap_or(dotted);
    let mut cur = table;
    for p in parts {
        let entry = cur.entry(p.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(t) = entry else { return };
        cur = t;
    }
    cur.insert(last.to_string(), value);
}

fn env_value(s: &str) -> toml::Value {
    if let Ok(i) = s.parse::<i64>() {
        toml::Value::Integer(i)
    } else if let Ok(b) = s.parse::<bool>() {
        toml::Value::Boolean(b)
    } else {
        toml::Value::String(s.to_string())
    }
}

#[cfg(test)]
mod tests;
