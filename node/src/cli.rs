//! The subcommands of `outpost`: each loads the configuration, opens only what it needs and
//! calls into the library. Errors bubble up as `anyhow` with context and end as one
//! `error: ...` line and a non-zero exit status.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use outpost_node::agent::Agent;
use outpost_node::config::{Config, LogFormat};
use outpost_node::identity::{self, EnrollOptions, Identity};
use outpost_node::ledger::Ledger;
use outpost_node::runtime::Runtime;
use outpost_node::runtime::docker::DockerRuntime;
use outpost_node::store::sled_store::SledStore;
use outpost_node::tls::CaTrust;
use outpost_node::{audit, status};
use tokio_util::sync::CancellationToken;

/// Appended to `outpost --help`.
pub const ENV_HELP: &str = "\
Configuration: /etc/outpost/config.toml (or --config), then config.d/*.toml beside it in name
order, then these environment variables. Unknown keys are errors; see `outpost check-config`.
  OUTPOST_PROFILE              profile (cloud | hybrid | on-prem | air-gapped)
  OUTPOST_DATA_DIR             data_dir (ledger, identity, status; default /var/lib/outpost)
  OUTPOST_CONTROL_URL          control.url (default: the URL used at enrollment)
  OUTPOST_POLL_WAIT_SECS       control.poll_wait_secs
  OUTPOST_HEARTBEAT_SECS       agent.heartbeat_secs
  OUTPOST_MAX_CONCURRENT_JOBS  agent.max_concurrent_jobs
  OUTPOST_DOCKER_SOCKET        docker.socket
  OUTPOST_LOG_FORMAT           log.format (text | json)
  OUTPOST_LOG_LEVEL            log.level (RUST_LOG, when set, wins)
  OUTPOST_STORAGE_BACKEND      storage.backend (fs | s3)

Typical first start:
  outpost enroll --control https://control.example:8443 --token-file /etc/outpost/token \\
      --ca-fingerprint 3f2a...
  outpost run
  outpost doctor        # when something does not work

Exit status: 0 success; 1 an error, or a failed doctor check; 2 bad arguments; 3 `status`: not
enrolled or the agent is not running.";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: long-poll for signed jobs, run them, report each result once.
    Run,
    /// Enroll this node with a control plane (once; creates the node's key and certificate).
    Enroll(EnrollArgs),
    /// Show enrollment, connection, queue and outbox depth, and running jobs.
    Status {
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Load and validate the configuration, print the merged result, and exit.
    CheckConfig,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell), e.g.
    /// `outpost completions bash > /usr/share/bash-completion/completions/outpost`.
    Completions { shell: clap_complete::Shell },
    /// Write man pages (outpost.1 and one per subcommand) into DIR.
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Check everything this node needs and say how to fix what is wrong: configuration,
    /// identity and certificate expiry, the control plane over TLS with the pinned CA, clock
    /// skew, the Docker engine (version, storage driver, cgroup v2), free space, the object
    /// store (writes, reads back and removes a probe under `.outpost/`), models, inference
    /// engines and the running agent's hardening.
    ///
    /// Each check prints ✔ (fine), ⚠ (works, look at it) or ✘ (broken) with a fix.
    /// Exit status: 0 when nothing failed (warnings allowed), 1 when a check failed.
    Doctor {
        /// Print the checks as JSON (`{"ok": bool, "checks": [{name, verdict, detail, fix}]}`).
        #[arg(long)]
        json: bool,
    },
    /// Manage container images (no registry is ever used).
    #[command(subcommand)]
    Images(ImagesCommand),
    /// Put, get, list and remove objects in the local object store ([storage]).
    #[command(subcommand)]
    Objects(crate::objects_cli::ObjectsCommand),
    /// Air-gapped bundles: inspect and import signed bundles from the control plane, export
    /// this node's results for it (see docs/air-gap.md).
    #[command(subcommand)]
    Bundle(crate::bundle_cli::BundleCommand),
    /// Import, list, verify and remove signed models in the local model store ([models]).
    #[command(subcommand)]
    Models(crate::models_cli::ModelsCommand),
    /// Generate and embed with models of the store, list the engines, or serve the local
    /// OpenAI-compatible endpoint ([inference]).
    #[command(subcommand)]
    Inference(crate::inference_cli::InferenceCommand),
    /// Inspect the node's tamper-evident audit log (stop the agent first: it holds the ledger).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The site policy: what may run on this node's data, whoever signed it; check, show,
    /// explain a spec, print a template (see docs/site-policy.md).
    #[command(subcommand)]
    Policy(crate::policy_cli::PolicyCommand),
    /// The site's approval queue: list, show, approve or deny the jobs the site policy holds
    /// for a person (root and [policy] approvers_group; the agent must run).
    #[command(subcommand)]
    Approvals(crate::approvals_cli::ApprovalsCommand),
    /// This node's identity: its key pair and client certificate.
    #[command(subcommand)]
    Identity(IdentityCommand),
}

#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// Renew the client certificate now, with a new key pair, over mutual TLS with the current
    /// one. The running agent renews on its own two thirds into the certificate's life; this is
    /// for a key you no longer trust. Restart the agent afterwards (`systemctl restart outpost`):
    /// the control plane refuses the old certificate from the first call made with the new one.
    #[command(after_help = "Example:\n  outpost identity rotate && systemctl restart outpost")]
    Rotate,
}

#[derive(Debug, Args)]
pub struct EnrollArgs {
    /// The control plane's URL, e.g. https://control.example:8443
    #[arg(long, value_name = "URL", required_unless_present_any = ["offline", "from"])]
    control: Option<String>,
    /// The one-time enrollment token (prefer --token-file: arguments are visible in `ps`).
    #[arg(
        long,
        value_name = "TOKEN",
        conflicts_with = "token_file",
        required_unless_present_any = ["token_file", "offline", "from"]
    )]
    token: Option<String>,
    /// A file holding the one-time enrollment token.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// SHA-256 of the control plane's CA certificate (hex, colons allowed), as printed by
    /// `outpost-control ca fingerprint`.
    #[arg(
        long,
        value_name = "SHA256",
        conflicts_with = "ca_file",
        required_unless_present_any = ["ca_file", "offline", "from"]
    )]
    ca_fingerprint: Option<String>,
    /// The control plane's CA certificate (PEM), copied over out of band.
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// The name this node asks for in its certificate (default: the host name).
    #[arg(long)]
    hostname: Option<String>,
    /// Replace an existing identity with a new one.
    #[arg(long)]
    force: bool,
    /// No link to the control plane: make this node's key and write an enrollment request to
    /// --out, for `outpost-control node enroll-offline` (then `outpost enroll --from`).
    #[arg(long, requires = "out", conflicts_with_all = ["control", "token", "token_file", "from"])]
    offline: bool,
    /// Where `--offline` writes the request.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Enroll from the enrollment file the operator made for this node's offline request
    /// (pin its CA with --ca-fingerprint).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["control", "token", "token_file"])]
    from: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum ImagesCommand {
    /// Load an image tarball (`docker save` format) into the local engine.
    Load {
        /// The tarball, e.g. from a USB disk or a signed bundle.
        file: PathBuf,
        /// No progress bar (there is none either when standard error is not a terminal).
        #[arg(long, short)]
        quiet: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain of the audit log; fails if an entry was edited or removed.
    Verify,
    /// Print the audit log.
    List {
        /// Print entries as JSON lines.
        #[arg(long)]
        json: bool,
    },
}

/// `config`: the path given with --config / OUTPOST_CONFIG, if any.
pub fn dispatch(config: Option<&Path>, command: Command) -> anyhow::Result<ExitCode> {
    let loaded = match (Config::load(config), &command) {
        (Ok(loaded), _) => loaded,
        // The doctor's first finding: say it in its own format, not as a bare error.
        (Err(e), Command::Doctor { json }) => {
            return print_doctor(&outpost_node::doctor::config_failed(&e.into()), *json);
        }
        (Err(e), _) => return Err(e.into()),
    };
    let cfg = loaded.config;
    init_tracing(&cfg);
    match command {
        Command::CheckConfig => {
            println!(
                "# configuration OK, merged from: {}",
                if loaded.sources.is_empty() {
                    "built-in defaults".to_string()
                } else {
                    loaded.sources.join(", ")
                }
            );
            let profile = cfg.profile.name();
            if loaded.org_profile.is_some() {
                println!("# profile {profile}: the organisation's default (this configuration names none)");
            }
            if loaded.from_profile.is_empty() {
                println!("# profile {profile}: every key it sets was set explicitly");
            } else {
                println!(
                    "# from profile {profile} (set them to override): {}",
                    loaded.from_profile.join(", ")
                );
            }
            print!("{}", toml::to_string_pretty(&cfg).context("cannot render the configuration")?);
            // Not a configuration error, but what a new install most often lacks: say so.
            block_on(check_engine(&cfg))
        }
        Command::Status { json } => show_status(&cfg, json),
        Command::Doctor { json } => {
            block_on(async { print_doctor(&outpost_node::doctor::run(&cfg, &loaded.sources).await, json) })
        }
        Command::Audit(cmd) => audit_command(&cfg, cmd),
        Command::Enroll(args) => block_on(enroll(&cfg, args)),
        Command::Images(ImagesCommand::Load { file, quiet }) => block_on(load_image(&cfg, &file, quiet)),
        Command::Objects(cmd) => block_on(crate::objects_cli::run(&cfg, cmd)),
        Command::Models(cmd) => crate::models_cli::run(&cfg, cmd),
        Command::Bundle(cmd) => block_on(crate::bundle_cli::run(&cfg, cmd)),
        Command::Inference(cmd) => block_on(crate::inference_cli::run(&cfg, cmd)),
        Command::Policy(cmd) => crate::policy_cli::run(&cfg, &loaded.sources, cmd),
        Command::Approvals(cmd) => crate::approvals_cli::run(&cfg, cmd),
        Command::Identity(IdentityCommand::Rotate) => block_on(rotate_identity(&cfg)),
        Command::Run => block_on(run(cfg, config.map(Path::to_path_buf))),
        // Answered in main before the configuration is read.
        Command::Completions { .. } | Command::Man { .. } => Ok(ExitCode::SUCCESS),
    }
}

async fn rotate_identity(cfg: &Config) -> anyhow::Result<ExitCode> {
    let dir = cfg.identity_dir();
    let mut identity = Identity::load(&dir)?;
    anyhow::ensure!(
        cfg.control.uplink,
        "[control] uplink = false: this node never dials its control plane, so it cannot renew its certificate; \
         enroll it again with an offline enrollment bundle instead"
    );
    let timeout = Duration::from_secs(cfg.control.request_timeout_secs);
    let uplink = identity.uplink(cfg.control.url.as_deref(), timeout)?;
    identity.renew(&dir, &uplink).await?;
    let until = outpost_node::identity::not_after(&identity.cert_pem).unwrap_or_default();
    println!(
        "node {}: new key pair and certificate (valid until {until}, Unix seconds) in {}",
        identity.node.node_id,
        dir.display()
    );
    println!(
        "restart the agent to use them (systemctl restart outpost); the old certificate is then refused"
    );
    Ok(ExitCode::SUCCESS)
}

fn print_doctor(report: &outpost_node::doctor::Report, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        report.print();
    }
    Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `check-config`'s word on the container engine, on stderr (the merged configuration on stdout
/// stays valid TOML): its version, or exactly what is missing. Never a failure: a node can be
/// configured before Docker is installed.
async fn check_engine(cfg: &Config) -> anyhow::Result<ExitCode> {
    let probe = DockerRuntime::connect("check-config", cfg.docker.socket.as_deref());
    match tokio::time::timeout(std::time::Duration::from_secs(5), probe).await {
        Ok(Ok(runtime)) => match runtime.info().await {
            Ok(info) => eprintln!("# Docker engine {} reachable; container jobs can run", info.version),
            Err(e) => eprintln!("warning: the Docker engine answered but not its version: {e}"),
        },
        Ok(Err(e)) => eprintln!("warning: {e}\nwarning: container jobs and services cannot run until it is"),
        Err(_) => {
            eprintln!("warning: the Docker engine did not answer within 5 s; container jobs cannot run")
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One thread: the agent spends its life waiting on the network and the engine, and a single
/// thread keeps its memory small. Blocking work (sled, files) is short and bounded.
fn block_on<F: std::future::Future<Output = anyhow::Result<ExitCode>>>(f: F) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(f)
}

fn init_tracing(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cfg.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: under systemd stderr is the journal, which would keep the escapes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    let _ = match cfg.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

async fn run(cfg: Config, config_path: Option<std::path::PathBuf>) -> anyhow::Result<ExitCode> {
    let identity = Identity::load(&cfg.identity_dir())?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data_dir {}", cfg.data_dir.display()))?;
    let store = SledStore::open(&cfg.ledger_dir())?;
    let ledger = Ledger::new(Arc::new(store));
    // Not dialled yet: the engine may come up after the agent (boot order), and the agent is
    // ready without it; jobs start once it answers.
    let runtime = DockerRuntime::new(&identity.node.node_id, cfg.docker.socket.as_deref())?
        .with_apparmor_profile(cfg.docker.apparmor_profile.clone());
    let env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
    let objects = outpost_node::objstore::AnyStore::open(&cfg, &env)
        .await
        .context("cannot open the local object store ([storage])")?;
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone())?;
    Agent::new(cfg, identity, ledger, runtime, objects)?.reloading_from(config_path).run(shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

fn spawn_signal_handler(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        shutdown.cancel();
    });
    Ok(())
}

/// `--ca-fingerprint`: a SHA-256 in hex, colons allowed; lowercase, without colons.
fn parse_fingerprint(fp: &str) -> anyhow::Result<String> {
    let clean = fp.to_lowercase().replace(':', "");
    if clean.len() != 64 || !clean.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("--ca-fingerprint must be a SHA-256 in hex (64 digits, colons allowed), got {fp:?}");
    }
    Ok(clean)
}

async fn enroll(cfg: &Config, args: EnrollArgs) -> anyhow::Result<ExitCode> {
    let hostname = args.hostname.clone().unwrap_or_else(|| {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "outpost-node".into())
    });
    let dir = cfg.identity_dir();
    if args.offline {
        let out = args.out.as_deref().context("--offline needs --out FILE")?;
        // What the box is (labels, capabilities), so the operator's selectors see it at once.
        let facts = outpost_node::inventory::heartbeat(cfg, None, Default::default());
        let req = {
            let _owner = AsDataDirOwner::enter(cfg)?;
            outpost_node::offline_enroll::request(&dir, &hostname, args.force, Some(facts))?
        };
        let tmp = out.with_extension("partial");
        std::fs::write(&tmp, serde_json::to_string_pretty(&req)?)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
        println!(
            "wrote enrollment request {} to {}; the operator runs `outpost-control node enroll-offline --org ORG \
             --request FILE --out FILE`, then run `outpost enroll --from FILE --ca-fingerprint SHA256` here",
            req.request_id,
            out.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(from) = &args.from {
        let fp = args.ca_fingerprint.as_deref().map(parse_fingerprint).transpose()?;
        // Read here, with the caller's rights: the file may be where only they can read it.
        let text =
            std::fs::read_to_string(from).with_context(|| format!("cannot read {}", from.display()))?;
        let id = {
            let _owner = AsDataDirOwner::enter(cfg)?;
            outpost_node::offline_enroll::complete(&dir, from, &text, fp.as_deref())?
        };
        println!(
            "enrolled as node {} in org {} from {} (identity in {})",
            id.node.node_id,
            id.node.org_id,
            from.display(),
            dir.display()
        );
        if fp.is_none() {
            println!(
                "note: the CA was not pinned by fingerprint (--ca-fingerprint); it is the one the file carries"
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let Some(control) = args.control.clone() else {
        bail!("give --control URL (or --offline, or --from FILE)")
    };
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => t.trim().to_string(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the token file {}", f.display()))?
            .trim()
            .to_string(),
        (None, None) => bail!("give the enrollment token with --token or --token-file"),
    };
    if token.is_empty() {
        bail!("the enrollment token is empty");
    }
    let trust = match (&args.ca_fingerprint, &args.ca_file) {
        (Some(fp), _) => CaTrust::Fingerprint(parse_fingerprint(fp)?),
        (None, Some(f)) => CaTrust::Pem(
            std::fs::read_to_string(f).with_context(|| format!("cannot read the CA file {}", f.display()))?,
        ),
        (None, None) => bail!("pin the control plane's CA with --ca-fingerprint or --ca-file"),
    };
    if !control.starts_with("https://") {
        bail!("--control {control:?} must start with https:// (the agent speaks TLS 1.3 only)");
    }
    let opts = EnrollOptions { control_url: control, token, trust, hostname, force: args.force };
    let id = {
        let _owner = AsDataDirOwner::enter(cfg)?;
        identity::enroll(&dir, &opts).await?
    };
    println!(
        "enrolled as node {} in org {} (identity in {})",
        id.node.node_id,
        id.node.org_id,
        dir.display()
    );
    if args.token_file.is_some() {
        println!("the token is spent; you may delete the token file");
    }
    Ok(ExitCode::SUCCESS)
}

/// `sudo outpost enroll` on a packaged install: the agent runs as the user that owns `data_dir`
/// (the packages' `outpost`) and must own its identity. While this guard lives, root acts with
/// that user's effective ids, so what enrollment writes is theirs from the start, and root
/// never writes into (or follows links in) a directory another user controls. Nothing changes
/// when not root, or when root owns `data_dir` (or it does not exist yet).
struct AsDataDirOwner {
    switched: bool,
}

impl AsDataDirOwner {
    fn enter(cfg: &Config) -> anyhow::Result<AsDataDirOwner> {
        use std::os::unix::fs::MetadataExt;
        let keep = AsDataDirOwner { switched: false };
        if !nix::unistd::geteuid().is_root() {
            return Ok(keep);
        }
        let Ok(owner) = std::fs::metadata(&cfg.data_dir) else { return Ok(keep) };
        if owner.uid() == 0 {
            return Ok(keep);
        }
        nix::unistd::setegid(nix::unistd::Gid::from_raw(owner.gid())).with_context(|| {
            format!("cannot act as group {} (the owner of {})", owner.gid(), cfg.data_dir.display())
        })?;
        if let Err(e) = nix::unistd::seteuid(nix::unistd::Uid::from_raw(owner.uid())) {
            let _ = nix::unistd::setegid(nix::unistd::Gid::from_raw(0));
            return Err(e).with_context(|| {
                format!("cannot act as uid {} (the owner of {})", owner.uid(), cfg.data_dir.display())
            });
        }
        Ok(AsDataDirOwner { switched: true })
    }
}

impl Drop for AsDataDirOwner {
    fn drop(&mut self) {
        if self.switched {
            // Back to root: the saved set-user-ID is still 0.
            let _ = nix::unistd::seteuid(nix::unistd::Uid::from_raw(0));
            let _ = nix::unistd::setegid(nix::unistd::Gid::from_raw(0));
        }
    }
}

async fn load_image(cfg: &Config, file: &Path, quiet: bool) -> anyhow::Result<ExitCode> {
    if !file.is_file() {
        bail!("{} is not a file", file.display());
    }
    let node_id =
        Identity::load(&cfg.identity_dir()).map(|i| i.node.node_id).unwrap_or_else(|_| "unenrolled".into());
    let runtime = DockerRuntime::connect(&node_id, cfg.docker.socket.as_deref()).await?;
    let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    let bar = outpost_protocol::progress::Bar::bytes(&format!("loading {}", file.display()), size, quiet);
    let sent = bar.clone();
    let ids = runtime.load_image_reporting(file, Arc::new(move |n| sent.inc(n))).await;
    bar.finish();
    let ids = ids?;
    if ids.is_empty() {
        bail!("{} held no image", file.display());
    }
    for id in ids {
        println!("loaded {id}");
    }
    Ok(ExitCode::SUCCESS)
}

fn show_status(cfg: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let identity = Identity::load(&cfg.identity_dir());
    let file = cfg.status_file();
    let st = status::read(&file).ok().filter(|s| status::is_alive(s.pid));
    if json {
        let doc = serde_json::json!({
            "enrolled": identity.is_ok(),
            "node_id": identity.as_ref().ok().map(|i| i.node.node_id.clone()),
            "org_id": identity.as_ref().ok().map(|i| i.node.org_id.clone()),
            "control_url": identity.as_ref().ok().map(|i| i.node.control_url.clone()),
            "agent_running": st.is_some(),
            "agent": st,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(if identity.is_ok() && st.as_ref().is_some_and(|s| s.ready) {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(3)
        });
    }
    match &identity {
        Ok(id) => {
            println!("node:        {} (org {})", id.node.node_id, id.node.org_id);
            println!("control:     {}", cfg.control.url.as_deref().unwrap_or(&id.node.control_url));
        }
        Err(e) => println!("enrollment:  not enrolled ({e})"),
    }
    let Some(st) = st else {
        println!("agent:       not running (no live status in {})", file.display());
        return Ok(ExitCode::from(3));
    };
    let age_s = outpost_node::clock::now_unix_ms().saturating_sub(st.updated_unix_ms) / 1000;
    println!(
        "agent:       pid {} v{} {} (status {age_s} s old)",
        st.pid,
        st.agent_version,
        if st.ready { "ready" } else { "starting" }
    );
    let contact = st
        .last_contact_unix_ms
        .map(|t| format!("{} s ago", outpost_node::clock::now_unix_ms().saturating_sub(t) / 1000))
        .unwrap_or_else(|| "never".into());
    if st.runtime_ready {
        match &st.runtime_error {
            None => println!("runtime:     ready"),
            Some(e) => println!("runtime:     jobs started, but the engine is not answering now: {e}"),
        }
    } else {
        println!(
            "runtime:     not ready: no job is fetched until it is{}",
            st.runtime_error.as_deref().map(|e| format!("; last error: {e}")).unwrap_or_default()
        );
    }
    println!(
        "connection:  {} (last contact {contact}){}",
        if st.connected { "connected" } else { "disconnected" },
        st.last_error.as_deref().map(|e| format!("; last error: {e}")).unwrap_or_default()
    );
    println!(
        "queue:       {} staged, {} running, {} in outbox, {} awaiting the site's approval",
        st.depths.staged, st.depths.running, st.depths.outbox, st.depths.awaiting_approval
    );
    if let Some(t) = &st.trust {
        let ago = st.updated_unix_ms.saturating_sub(t.last_heard_unix_ms) / 1000;
        match t.window_secs {
            None => println!("trust:       last heard from the control plane {ago} s ago; no window"),
            Some(w) if t.expired => println!(
                "trust:       EXPIRED: last heard from the control plane {ago} s ago, more than [trust] max_offline \
                 ({w} s); only bundles signed within the window are accepted: ask for a new bundle or reconnect"
            ),
            Some(w) => println!("trust:       last heard from the control plane {ago} s ago (window {w} s)"),
        }
    }
    if let Some(m) = &st.metrics {
        println!("metrics:     http://{m}/metrics (Prometheus, loopback only)");
    }
    if let Some(b) = &st.bundle {
        let ago = st.updated_unix_ms.saturating_sub(b.imported_unix_ms) / 1000;
        println!("bundles:     last imported {} (counter {}) {ago} s ago", b.bundle_id, b.counter);
    }
    if st.running_jobs.is_empty() {
        println!("running:     none");
    } else {
        println!("running:     {}", st.running_jobs.join(", "));
    }
    match &st.relay {
        None => println!("relay:       off (no [relay] watches)"),
        Some(r) => println!(
            "relay:       {} seen ({} accepted, {} rejected), {} sent, {} waiting{}{}",
            r.objects_seen,
            r.objects_accepted,
            r.objects_rejected,
            r.events_sent,
            r.pending_depth,
            r.lag_ms.map(|l| format!(", oldest {l} ms")).unwrap_or_default(),
            if r.backpressure { "; PAUSED: outbox full" } else { "" }
        ),
    }
    match &st.inference {
        None => println!("inference:   no engines built in"),
        Some(m) => {
            let loaded: Vec<String> = m
                .loaded
                .iter()
                .map(|l| format!("{} ({} MiB)", l.label, (l.ram_bytes + l.vram_bytes) >> 20))
                .collect();
            println!(
                "inference:   {} loaded ({} of {} MiB), queue {}/{}, {} running, {} refused; last {:.1} tokens/s, first token {:.0} ms",
                if loaded.is_empty() { "none".to_string() } else { loaded.join(", ") },
                m.ram_used_bytes >> 20,
                m.ram_budget_bytes >> 20,
                m.queue_depth,
                m.queue_bound,
                m.running,
                m.refused_queue_full_total,
                m.last_tokens_per_s,
                m.last_time_to_first_token_ms
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn audit_command(cfg: &Config, cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    let store = SledStore::open(&cfg.ledger_dir())?;
    match cmd {
        AuditCommand::Verify => match audit::verify(&store) {
            Ok(n) => {
                println!("audit log intact: {n} entries");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                println!("audit log BROKEN: {e}");
                Ok(ExitCode::FAILURE)
            }
        },
        AuditCommand::List { json } => {
            for e in audit::entries(&store)? {
                if json {
                    println!("{}", serde_json::to_string(&e)?);
                } else {
                    println!("{:>6}  {}  {:<22} {}", e.seq, e.unix_ms, e.action, e.detail);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
