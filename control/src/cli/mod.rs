//! `outpost-control` subcommands: `serve` runs the API; the others are operator clients of a
//! running server (they read the admin token and CA from the data directory unless given).
//! Human-readable tables by default, `--json` for scripts. `main.rs` only calls [`run`].

mod bundle;
mod deploy;
mod doctor;
mod ops;
mod relay;
mod serve;
mod show;
mod submit;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use outpost_protocol::JobState;

use crate::data_dir::DataDir;
pub use relay::{EventsCommand, TriggerCommand, TriggerCreateArgs};
pub use submit::{SpecArgs, SubmitArgs};

/// Outpost control plane: enrollment CA, signed jobs by long-poll, fleet deployments, results, audit.
///
/// `serve` runs the API (TLS 1.3 only; nodes authenticate with the client certificate they got
/// at enrollment). Every other command is an operator client of a running server: it reads the
/// admin token and the CA certificate from --data-dir unless --token and --ca-file are given.
#[derive(Debug, Parser)]
#[command(name = "outpost-control", version, after_help = EXAMPLES)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

const EXAMPLES: &str = "\
Examples:
  # run the server (creates the CA, server certificate and admin token on first start)
  outpost-control serve --data-dir /var/lib/outpost-control --listen 0.0.0.0:8443 --san control.example
  # ... or with the settings in a file, as the packaged unit does
  outpost-control serve --config /etc/outpost-control/config.toml

  # what a node pins when it enrolls
  outpost-control ca fingerprint

  # an organisation, then a one-time token for one node
  ORG=$(outpost-control org create clinic-a)
  outpost-control token create --org \"$ORG\" --ttl 2h

  # a read-only API token for a dashboard, an operator token for CI
  outpost-control api-token create --org \"$ORG\" --name grafana --role viewer
  outpost-control api-token create --org \"$ORG\" --name ci --role operator --ttl 30d

  # run a container on a node and wait for its result
  JOB=$(outpost-control job submit --node node-… --image sha256:… --memory 256m -- sh -c 'echo hello')
  outpost-control job wait \"$JOB\" --timeout 10m

  # run a job on the node for every .jpg its relay stores under incoming/, then watch events
  outpost-control trigger create --org \"$ORG\" --name thumbs --prefix incoming/ --suffix .jpg \\
      --image sha256:… --output-prefix thumbs/ -- /bin/thumb
  outpost-control events tail

  # scripts: JSON instead of tables
  outpost-control --json node list

Exit status: 0 success; 1 an error (the message says which), or a failed doctor check;
2 bad arguments.";

#[derive(Debug, Args)]
pub struct Global {
    /// The control plane's URL (operator commands).
    #[arg(long, global = true, env = "OUTPOST_CONTROL_URL", default_value = "https://127.0.0.1:8443")]
    pub url: String,
    /// Data directory: CA, server certificate, admin token, database.
    #[arg(long, global = true, env = "OUTPOST_CONTROL_DATA_DIR", default_value = "/var/lib/outpost-control")]
    pub data_dir: PathBuf,
    /// Bearer token: an API token (`api-token create`; its role decides what the commands may
    /// do) or the admin token (default: read from DATA_DIR/admin.token).
    #[arg(long, global = true, env = "OUTPOST_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) to trust for the server (default: DATA_DIR/ca.crt).
    #[arg(long, global = true, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the API server until SIGTERM or SIGINT.
    ///
    /// Prints one line to stdout once it accepts connections:
    /// `outpost-control listening on https://ADDR (CA sha256 HEX)`. Logs go to stderr
    /// (RUST_LOG sets the level).
    Serve {
        /// A TOML file with the settings below (`listen`, `san`, `lease`); flags given on the
        /// command line win over it. Unknown keys are errors. The packages install a commented
        /// one at /etc/outpost-control/config.toml.
        #[arg(long, value_name = "FILE", env = "OUTPOST_CONTROL_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        flags: serve::Flags,
    },
    /// Bring a PostgreSQL store's schema to this binary's version.
    ///
    /// The embedded sled store needs none. Run it before starting upgraded replicas; it is
    /// safe to repeat and to run from two places at once. A database a newer binary migrated
    /// is refused.
    Migrate {
        /// The settings file whose `[store]` names the database (the `serve` one).
        #[arg(long, value_name = "FILE", env = "OUTPOST_CONTROL_CONFIG")]
        config: Option<PathBuf>,
        /// The database, instead of the file's `[store] url` (password: OUTPOST_STORE_PASSWORD).
        #[arg(long, value_name = "URL", env = "OUTPOST_STORE_URL", hide_env_values = true)]
        store_url: Option<String>,
    },
    /// Copy the embedded sled store into a PostgreSQL store and verify the copy.
    ///
    /// Everything is copied in one transaction, read back and compared record for record,
    /// and the audit chains are checked. Stop `outpost-control serve` first (the sled database is one process's). The target's
    /// schema is migrated first; a target holding other data is refused, one holding this very
    /// data already is left alone, so the command is safe to repeat. Afterwards set `[store]
    /// url` in the settings and start the replicas (docs/scaling.md).
    MigrateStore {
        /// The store to copy, `sled:DIR` [default: sled:DATA_DIR/db].
        #[arg(long, value_name = "sled:DIR")]
        from: Option<String>,
        /// The PostgreSQL database to copy into [default: the settings' `[store] url`]; its
        /// password from OUTPOST_STORE_PASSWORD or `[store] password_file`.
        #[arg(long, value_name = "URL")]
        to: Option<String>,
        /// The settings file whose `[store]` names the target (the `serve` one).
        #[arg(long, value_name = "FILE", env = "OUTPOST_CONTROL_CONFIG")]
        config: Option<PathBuf>,
    },
    /// The certificate authority nodes pin.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Organisations (each has its own job-signing key).
    #[command(subcommand)]
    Org(OrgCommand),
    /// One-time enrollment tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// API tokens: named, per organisation, with a role (viewer, operator, admin) and an expiry.
    #[command(subcommand)]
    ApiToken(ApiTokenCommand),
    /// Submit jobs, read and wait for their results.
    #[command(subcommand)]
    Job(JobCommand),
    /// Enrolled nodes: labels, online or not, last heartbeat; operator labels.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Relay events the nodes delivered: list them or follow them as they arrive.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Org-level triggers: run a job on the node whenever a matching event arrives.
    #[command(subcommand)]
    Trigger(TriggerCommand),
    /// The control plane's audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Services kept running on the nodes a selector matches, rolled out in batches.
    #[command(subcommand)]
    Deploy(deploy::DeployCommand),
    /// Air-gapped sites: build signed bundles for nodes, import their results bundles.
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
    /// Check this control plane: CA and server certificate expiry, the admin token's
    /// permissions, the store, free space, and the server answering over TLS at --url.
    ///
    /// Each check prints ✔ (fine), ⚠ (works, look at it) or ✘ (broken) with a fix.
    /// Exit status: 0 when nothing failed (warnings allowed), 1 when a check failed.
    Doctor {
        /// Print the checks as JSON (`{"ok": bool, "checks": [{name, verdict, detail, fix}]}`).
        #[arg(long)]
        json: bool,
        /// The `serve` settings file: its `[store]` says which store to check (the sled one
        /// in --data-dir unless it names a PostgreSQL database).
        #[arg(long, value_name = "FILE", env = "OUTPOST_CONTROL_CONFIG")]
        config: Option<PathBuf>,
        /// Check this PostgreSQL store instead of the file's (password: OUTPOST_STORE_PASSWORD).
        #[arg(long, value_name = "URL", env = "OUTPOST_STORE_URL", hide_env_values = true)]
        store_url: Option<String>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell), e.g.
    /// `outpost-control completions bash > /usr/share/bash-completion/completions/outpost-control`.
    Completions { shell: clap_complete::Shell },
    /// Write man pages (outpost-control.1 and one per subcommand) into DIR.
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Print the CA certificate's SHA-256 (what `outpost enroll --ca-fingerprint` takes): the
    /// CA whose certificate the server presents now (the new one once a rotation has switched).
    /// Reads DATA_DIR; the server need not be running.
    Fingerprint,
    /// Rotate the CA (admin token). A new CA is announced to every node, signed by the current
    /// one; new node certificates come from it at once and nodes renew theirs. At the end of the
    /// overlap the server presents its certificate of the new CA and refuses client certificates
    /// of the old one: a node offline through the whole overlap must enroll again. Operators'
    /// copies of the CA certificate (--ca-file) need the new one by then (DATA_DIR/ca.next.crt).
    Rotate {
        /// How long nodes trust both CAs before the switch: 60s to 365d.
        #[arg(long, value_parser = submit::parse_duration, default_value = "7d")]
        overlap: Duration,
        /// Rotate although some nodes run agents too old to learn of it.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum OrgCommand {
    /// Create an organisation with a new job-signing key; prints its id.
    Create {
        /// Display name, e.g. `clinic-a`.
        name: String,
    },
    /// List organisations.
    List,
    /// Show an organisation's settings, or change them (admin role): features turned off for
    /// all its nodes, and the profile of nodes whose configuration names none. Nodes hear of a
    /// change in their next poll answer; a new default profile applies at a node's next start.
    Settings {
        /// Organisation id.
        org: String,
        /// Profile for nodes that name none: cloud, hybrid or on-prem.
        #[arg(long, value_name = "PROFILE", conflicts_with = "clear_default_profile")]
        default_profile: Option<String>,
        /// No organisation default: each node's own (on-prem unless its file says otherwise).
        #[arg(long)]
        clear_default_profile: bool,
        /// Turn a feature off for every node of the organisation: containers, inference,
        /// services (repeatable).
        #[arg(long, value_name = "FEATURE")]
        disable: Vec<String>,
        /// Turn a feature back on (repeatable).
        #[arg(long, value_name = "FEATURE")]
        enable: Vec<String>,
    },
    /// Rotate the organisation's job-signing key (admin role). The new key is announced to the
    /// nodes at once, endorsed by the current one, which keeps signing through the overlap; from
    /// its end the new key signs everything a node is handed. A node offline through the whole
    /// overlap learns the new key from the endorsement chain when it is back.
    RotateKey {
        /// Organisation id.
        org: String,
        /// How long nodes trust both keys before the new one signs: 60s to 365d.
        #[arg(long, value_parser = submit::parse_duration, default_value = "7d")]
        overlap: Duration,
        /// Rotate although some nodes run agents too old to learn of it (they stop taking work
        /// at the switch and must enroll again).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a one-time enrollment token and print it (it is shown only this once).
    Create {
        /// Organisation id (from `org create` or `org list`).
        #[arg(long)]
        org: String,
        /// Lifetime, e.g. 30m, 2h, 7d (default 1h, at most 7d).
        #[arg(long, value_parser = submit::parse_duration)]
        ttl: Option<Duration>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApiTokenCommand {
    /// Create an API token and print it (it is shown only this once; only its hash is kept).
    ///
    /// Roles: viewer reads the organisation's nodes, jobs, deployments, events, triggers and
    /// audit; operator also submits and cancels jobs, deploys, labels nodes and builds bundles;
    /// admin also manages API and enrollment tokens. Needs the admin role (or the admin token).
    Create {
        /// Organisation id (from `org create` or `org list`).
        #[arg(long)]
        org: String,
        /// A name for people and the audit trail, e.g. `ci` or `alice` ([A-Za-z0-9._-], unique in
        /// the organisation among tokens not revoked).
        #[arg(long)]
        name: String,
        /// viewer, operator or admin.
        #[arg(long)]
        role: outpost_protocol::Role,
        /// Lifetime, e.g. 30d, 12h (default 90d, at most 400d).
        #[arg(long, value_parser = submit::parse_duration)]
        ttl: Option<Duration>,
    },
    /// List the organisation's API tokens, revoked ones included (never their secrets).
    List {
        #[arg(long)]
        org: String,
    },
    /// Revoke an API token: every later call with it is refused.
    Revoke {
        #[arg(long)]
        org: String,
        /// The token's id (`tok-…`, from `api-token list`).
        token_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Submit a container job from a TOML/JSON file and/or flags; prints the job id.
    Submit(Box<SubmitArgs>),
    /// Show one job and its result.
    Get { job_id: String },
    /// Show a job's result, opening a sealed one (a job submitted with --recipient).
    ///
    /// The control plane holds a sealed result's output tails and bodies only as an age file
    /// for the job's recipients; this opens it on this machine with --identity (a file as
    /// age-keygen writes it). With --sealed, prints that age file as it is stored, for
    /// `age -d -i KEY`. Exit status 1 when the job has no result yet.
    Result {
        job_id: String,
        /// The age identity file (`AGE-SECRET-KEY-1…`) of one of the job's recipients.
        #[arg(long, value_name = "FILE", conflicts_with = "sealed")]
        identity: Option<PathBuf>,
        /// Print the sealed part as stored (ASCII-armoured age), nothing else.
        #[arg(long)]
        sealed: bool,
    },
    /// List jobs, newest first.
    List {
        /// Only this node's jobs.
        #[arg(long)]
        node: Option<String>,
        /// Only jobs in this state: queued, accepted, finished or cancelled.
        #[arg(long, value_parser = parse_state)]
        state: Option<JobState>,
        /// Only the jobs of this group (`job submit --each`).
        #[arg(long, value_name = "GROUP_ID")]
        group: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Wait until the node reports the job's result (or every job of a group has ended), then
    /// print it.
    ///
    /// Exit status 0 once a result is stored or the job is cancelled (whatever the job's
    /// outcome: read it from the output or `--json`), 1 when it has not ended within --timeout
    /// or the job is unknown.
    #[command(group(clap::ArgGroup::new("what").required(true).args(["job_id", "group"])))]
    Wait {
        job_id: Option<String>,
        /// Wait for every job of this group instead.
        #[arg(long, value_name = "GROUP_ID")]
        group: Option<String>,
        /// Give up after this long (e.g. 90s, 10m).
        #[arg(long, value_parser = submit::parse_duration, default_value = "5m")]
        timeout: Duration,
    },
    /// Print a job's output: live from its node while it runs (only where the node's egress
    /// policy allows log egress, `[egress] allow_logs`), else the result's output tails once
    /// the job has ended.
    ///
    /// Without --follow: what the container has written so far (its last 1000 lines). With
    /// --follow: then everything it writes until the job ends. Logs are not stored anywhere;
    /// a refusal by the node is audited on both sides.
    ///
    /// A sealed job's output (submitted with --recipient) arrives sealed, live or as its
    /// result's tails: --identity opens it here.
    Logs {
        job_id: String,
        /// Keep printing until the job ends.
        #[arg(long, short)]
        follow: bool,
        /// The age identity file of one of a sealed job's recipients.
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
    },
    /// Cancel a job: a queued one at once; one a node has is stopped by the node, which
    /// reports `cancelled`. A job that has ended is left as it is (exit status 1).
    Cancel { job_id: String },
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List enrolled nodes: labels, whether online (heartbeat within the lease), last seen.
    List {
        /// Only nodes whose labels this selector matches, e.g. `site=icu,gpu in (a100,l4),!maintenance`.
        #[arg(long, value_name = "SELECTOR")]
        selector: Option<String>,
        /// Only nodes of this organisation.
        #[arg(long)]
        org: Option<String>,
    },
    /// Show one node with its labels and inventory.
    Get { node_id: String },
    /// Set operator labels of a node (they win over the labels in the node's own config).
    #[command(
        after_help = "Examples:\n  outpost-control node label node-… site=icu rack=2\n  outpost-control node label node-… --remove rack"
    )]
    Label {
        node_id: String,
        /// KEY=VALUE to set (Kubernetes label rules; `KEY=` sets an empty value).
        #[arg(value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// A label key to remove (repeatable).
        #[arg(long = "remove", value_name = "KEY")]
        remove: Vec<String>,
    },
    /// Revoke a node (admin): its certificate is refused from now on, on every connection; a
    /// poll it holds ends; its queued jobs are cancelled (jobs placed by selector move to
    /// another node); nothing new is placed on it. For a stolen or retired machine. To bring
    /// the machine back, enroll it again with a new token: it gets a new node id.
    #[command(after_help = "Example:\n  outpost-control node revoke node-…")]
    Revoke { node_id: String },
    /// Enroll a node that cannot reach the control plane, from the request file its
    /// `outpost enroll --offline` wrote; writes the enrollment file for `outpost enroll --from`.
    /// Each request enrolls once.
    EnrollOffline {
        /// The organisation the node joins.
        #[arg(long)]
        org: String,
        /// The node's request file.
        #[arg(long, value_name = "FILE")]
        request: PathBuf,
        /// Where to write the enrollment file.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// The URL the node is to use should it ever get a link (default: --url).
        #[arg(long, value_name = "URL")]
        control_url: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// The most recent audit entries, oldest first; with --node, that node's own audit log
    /// (as its results bundles brought it).
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long, value_name = "NODE_ID")]
        node: Option<String>,
    },
    /// Check a node's audit log as stored here, link by link from its first entry; names the
    /// first entry that does not follow the one before (exit 1).
    Verify {
        #[arg(long, value_name = "NODE_ID")]
        node: String,
    },
}

fn parse_state(s: &str) -> Result<JobState, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("{s:?} is not a job state (queued, accepted, finished)"))
}

/// Runs one command; the exit code is the command's answer (see `job wait`).
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let g = cli.global;
    match cli.command {
        Command::Serve { config, flags } => {
            let settings = serve::Settings::resolve(config.as_deref(), flags)?;
            serve::serve(&g, settings).await
        }
        Command::Migrate { config, store_url } => {
            let flags = serve::Flags { store_url, ..Default::default() };
            serve::migrate(serve::Settings::resolve(config.as_deref(), flags)?).await
        }
        Command::MigrateStore { from, to, config } => {
            let flags = serve::Flags { store_url: to, ..Default::default() };
            let settings = serve::Settings::resolve(config.as_deref(), flags)?;
            serve::migrate_store(&g, from.as_deref(), settings).await
        }
        Command::Doctor { json, config, store_url } => {
            let flags = serve::Flags { store_url, ..Default::default() };
            let settings = serve::Settings::resolve(config.as_deref(), flags)?;
            doctor::run(&g, json, settings.store).await
        }
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(shell, &mut Cli::command(), "outpost-control", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => {
            use anyhow::Context as _;
            use clap::CommandFactory as _;
            std::fs::create_dir_all(&dir)
                .and_then(|()| clap_mangen::generate_to(Cli::command(), &dir))
                .with_context(|| format!("cannot write man pages into {}", dir.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca(CaCommand::Fingerprint) => {
            let ca = DataDir::new(&g.data_dir).presented_ca(crate::clock::Clock::system().now_ms())?;
            println!("{}", ca.fingerprint());
            Ok(ExitCode::SUCCESS)
        }
        command => ops::operator(&g, command).await,
    }
}
