//! `outpost-control` subcommands: `serve`, and the operator commands that call the API.
//! Human-readable output by default, `--json` for scripts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use outpost_protocol::{ContainerSpec, JobInfo, JobState, Outcome, SubmitJobRequest};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::client::Client;
use crate::data_dir::DataDir;
use crate::server::{self, ServerConfig};

/// Outpost control plane: enrollment CA, signed job dispatch by long-poll, results and audit.
///
/// `serve` runs the API (TLS 1.3; nodes authenticate with client certificates). Every other
/// command is an operator client of a running server: it reads the admin token and CA from
/// --data-dir unless --token and --ca-file are given.
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
  outpost-control serve --data-dir /var/lib/outpost-control --listen 0.0.0.0:8443 --san control.example
  outpost-control org create clinic-a
  outpost-control token create --org org-… --ttl 2h
  outpost-control job submit --node node-… --image sha256:… -- sh -c 'echo hello'
  outpost-control job wait JOB_ID
  outpost-control --json node list";

#[derive(Debug, Args)]
pub struct Global {
    /// The control plane's URL (operator commands).
    #[arg(long, global = true, env = "OUTPOST_CONTROL_URL", default_value = "https://localhost:8443")]
    pub url: String,
    /// Data directory: CA, server certificate, admin token, database.
    #[arg(long, global = true, env = "OUTPOST_CONTROL_DATA_DIR", default_value = "/var/lib/outpost-control")]
    pub data_dir: PathBuf,
    /// Admin token (default: read from DATA_DIR/admin.token).
    #[arg(long, global = true, env = "OUTPOST_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate to trust (default: DATA_DIR/ca.crt).
    #[arg(long, global = true, value_name = "PEM")]
    pub ca_file: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the API server (creates the CA and certificates on first start).
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
        /// Extra DNS name or IP address for the server certificate (repeatable).
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
    },
    /// The CA that nodes pin.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Organisations (each has its own job-signing key).
    #[command(subcommand)]
    Org(OrgCommand),
    /// One-time enrollment tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Submit jobs and read their results.
    #[command(subcommand)]
    Job(JobCommand),
    /// Enrolled nodes and their last heartbeat.
    #[command(subcommand)]
    Node(NodeCommand),
    /// The control plane's audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Print the CA certificate's SHA-256 (what `outpost enroll --ca-fingerprint` takes).
    Fingerprint,
}

#[derive(Debug, Subcommand)]
pub enum OrgCommand {
    Create { name: String },
    List,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a one-time enrollment token and print it.
    Create {
        #[arg(long)]
        org: String,
        /// Lifetime, e.g. 30m, 2h, 7d (default 1h, at most 7d).
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Submit a container job, from a TOML/JSON file and/or flags.
    Submit(SubmitArgs),
    Get {
        job_id: String,
    },
    List {
        #[arg(long)]
        node: Option<String>,
        #[arg(long, value_parser = parse_state)]
        state: Option<JobState>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Wait for a job's result and print it. Exit status: 0 if the job succeeded, 2 if it
    /// ended otherwise (failed, timed out, rejected, error), 1 if no result came in time.
    Wait {
        job_id: String,
        /// Give up after this long (e.g. 90s, 10m).
        #[arg(long, value_parser = parse_duration, default_value = "5m")]
        timeout: Duration,
    },
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// A file (.toml or .json) with `node_id`, `spec` and optionally `expires_in_secs`; flags
    /// given as well override it.
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    #[arg(long)]
    node: Option<String>,
    /// Image id (`sha256:…`); nodes never pull by name.
    #[arg(long)]
    image: Option<String>,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Kill the job after this long (e.g. 90s, 1h).
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    #[arg(long, value_name = "MB")]
    memory_mb: Option<u64>,
    /// CPU limit in thousandths of a core.
    #[arg(long, value_name = "MILLIS")]
    cpu_millis: Option<u64>,
    #[arg(long)]
    pids: Option<u64>,
    /// Give the container a network (off by default).
    #[arg(long)]
    network: bool,
    /// How long the signed manifest stays valid if the node is offline (e.g. 1d).
    #[arg(long, value_parser = parse_duration)]
    expires: Option<Duration>,
    /// The command, after `--`.
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    List,
    Get { node_id: String },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration like 90s, 30m, 2h, 7d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("unknown unit in {s:?}; use s, m, h or d")),
    };
    Ok(Duration::from_secs(secs))
}

fn parse_state(s: &str) -> Result<JobState, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("{s:?} is not a job state (queued, accepted, finished)"))
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let g = cli.global;
    match cli.command {
        Command::Serve { listen, sans } => serve(&g, listen, sans).await,
        Command::Ca(CaCommand::Fingerprint) => {
            let ca = DataDir::new(&g.data_dir).read_ca()?;
            println!("{}", ca.fingerprint());
            Ok(ExitCode::SUCCESS)
        }
        command => operator(&g, command).await,
    }
}

async fn serve(g: &Global, listen: SocketAddr, extra_sans: Vec<String>) -> anyhow::Result<ExitCode> {
    let shutdown = CancellationToken::new();
    let cfg = ServerConfig { listen, data_dir: g.data_dir.clone(), extra_sans };
    let server = server::start(cfg, shutdown.clone()).await?;
    println!("outpost-control listening on https://{} (CA sha256 {})", server.addr, server.ca_fingerprint);
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    server.stop().await;
    Ok(ExitCode::SUCCESS)
}

fn client(g: &Global) -> anyhow::Result<Client> {
    let token = match &g.token {
        Some(t) => t.clone(),
        None => {
            let p = g.data_dir.join("admin.token");
            std::fs::read_to_string(&p)
                .with_context(|| format!("no --token given and cannot read {}", p.display()))?
                .trim()
                .to_owned()
        }
    };
    let ca_path = g.ca_file.clone().unwrap_or_else(|| g.data_dir.join("ca.crt"));
    let ca = std::fs::read_to_string(&ca_path)
        .with_context(|| format!("cannot read the CA certificate {} (give --ca-file)", ca_path.display()))?;
    Client::new(&g.url, &ca, &token)
}

fn print<T: Serialize>(json: bool, value: &T, human: impl FnOnce(&T)) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        human(value);
    }
    Ok(())
}

async fn operator(g: &Global, command: Command) -> anyhow::Result<ExitCode> {
    let c = client(g)?;
    match command {
        Command::Org(OrgCommand::Create { name }) => {
            let org = c.create_org(&name).await?;
            print(g.json, &org, |o| {
                println!("created organisation {} ({}), signing key {}", o.id, o.name, o.signing_key.key_id)
            })?;
        }
        Command::Org(OrgCommand::List) => {
            let orgs = c.list_orgs().await?;
            print(g.json, &orgs, |orgs| {
                println!("{:<40} {:<24} {}", "ID", "NAME", "SIGNING KEY");
                for o in orgs {
                    println!("{:<40} {:<24} {}", o.id, o.name, o.signing_key.key_id);
                }
            })?;
        }
        Command::Token(TokenCommand::Create { org, ttl }) => {
            let t = c.create_token(&org, ttl.map(|d| d.as_secs())).await?;
            print(g.json, &t, |t| println!("{}", t.token))?;
        }
        Command::Job(JobCommand::Submit(args)) => {
            let req = submit_request(args)?;
            let job = c.submit(&req).await?;
            print(g.json, &job, |j| println!("{}", j.job_id))?;
        }
        Command::Job(JobCommand::Get { job_id }) => {
            let job = c.job(&job_id).await?;
            print(g.json, &job, print_job)?;
        }
        Command::Job(JobCommand::List { node, state, limit }) => {
            let jobs = c.jobs(node.as_deref(), state, limit).await?;
            print(g.json, &jobs, |l| {
                println!("{:<34} {:<38} {:<9} {:<10} {}", "JOB", "NODE", "STATE", "OUTCOME", "EXIT");
                for j in &l.jobs {
                    let (outcome, exit) = j.result.as_ref().map_or((String::new(), String::new()), |r| {
                        (
                            format!("{:?}", r.outcome).to_lowercase(),
                            r.exit_code.map(|c| c.to_string()).unwrap_or_default(),
                        )
                    });
                    println!(
                        "{:<34} {:<38} {:<9} {:<10} {}",
                        j.job_id,
                        j.node_id,
                        state_name(j.state),
                        outcome,
                        exit
                    );
                }
            })?;
        }
        Command::Job(JobCommand::Wait { job_id, timeout }) => {
            let deadline = Instant::now() + timeout;
            loop {
                let job = c.job(&job_id).await?;
                if let Some(r) = &job.result {
                    let ok = r.outcome == Outcome::Succeeded;
                    print(g.json, &job, print_job)?;
                    return Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(2) });
                }
                if Instant::now() >= deadline {
                    bail!("no result for job {job_id} after {timeout:?} (state: {})", state_name(job.state));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        Command::Node(NodeCommand::List) => {
            let nodes = c.nodes().await?;
            print(g.json, &nodes, |l| {
                println!("{:<38} {:<40} {:<20} {}", "NODE", "ORG", "HOSTNAME", "LAST SEEN");
                for n in &l.nodes {
                    println!(
                        "{:<38} {:<40} {:<20} {}",
                        n.node_id,
                        n.org_id,
                        n.hostname,
                        ago(n.last_seen_unix_ms)
                    );
                }
            })?;
        }
        Command::Node(NodeCommand::Get { node_id }) => {
            let node = c.node(&node_id).await?;
            print(g.json, &node, |n| {
                println!("node:      {} ({})", n.node_id, n.hostname);
                println!("org:       {}", n.org_id);
                println!("last seen: {}", ago(n.last_seen_unix_ms));
                if let Some(hb) = &n.last_heartbeat {
                    let inv = &hb.inventory;
                    println!(
                        "agent:     v{}, {} running, outbox {}",
                        hb.agent_version, hb.running_jobs, hb.outbox_depth
                    );
                    println!(
                        "host:      {} {} ({}), {} CPUs {}",
                        inv.os, inv.kernel, inv.hostname, inv.cpu_count, inv.cpu_model
                    );
                    println!(
                        "memory:    {} MiB total, {} MiB available",
                        inv.memory_total_bytes >> 20,
                        inv.memory_available_bytes >> 20
                    );
                    println!("docker:    {}", inv.docker_version.as_deref().unwrap_or("unavailable"));
                    println!("images:    {}", inv.images.len());
                    println!(
                        "gpus:      {}",
                        inv.gpus.iter().map(|g| g.name.clone()).collect::<Vec<_>>().join(", ")
                    );
                }
            })?;
        }
        Command::Audit(AuditCommand::List { limit }) => {
            let audit = c.audit(limit).await?;
            print(g.json, &audit, |l| {
                for e in &l.entries {
                    println!("{:>6} {} {:<28} {:<20} {}", e.seq, e.unix_ms, e.actor, e.action, e.detail);
                }
            })?;
        }
        Command::Serve { .. } | Command::Ca(_) => return Err(anyhow!("not an operator command")),
    }
    Ok(ExitCode::SUCCESS)
}

fn submit_request(a: SubmitArgs) -> anyhow::Result<SubmitJobRequest> {
    let mut base: serde_json::Value = match &a.file {
        Some(path) => read_job_file(path)?,
        None => serde_json::json!({}),
    };
    let obj = base.as_object_mut().ok_or_else(|| anyhow!("the job file must hold a table/object"))?;
    if let Some(n) = a.node {
        obj.insert("node_id".into(), n.into());
    }
    if let Some(e) = a.expires {
        obj.insert("expires_in_secs".into(), e.as_secs().into());
    }
    let spec = obj.entry("spec").or_insert_with(|| serde_json::json!({}));
    let spec = spec.as_object_mut().ok_or_else(|| anyhow!("`spec` must be a table/object"))?;
    if let Some(i) = a.image {
        spec.insert("image".into(), i.into());
    }
    if !a.command.is_empty() {
        spec.insert("command".into(), serde_json::to_value(&a.command)?);
    }
    if !a.env.is_empty() {
        let mut env: BTreeMap<String, String> =
            spec.get("env").map(|v| serde_json::from_value(v.clone())).transpose()?.unwrap_or_default();
        for kv in &a.env {
            let (k, v) = kv.split_once('=').ok_or_else(|| anyhow!("--env {kv:?} must be KEY=VALUE"))?;
            env.insert(k.into(), v.into());
        }
        spec.insert("env".into(), serde_json::to_value(env)?);
    }
    if let Some(t) = a.timeout {
        spec.insert("timeout_secs".into(), t.as_secs().into());
    }
    if a.network {
        spec.insert("network".into(), true.into());
    }
    if a.memory_mb.is_some() || a.cpu_millis.is_some() || a.pids.is_some() {
        let res = spec.entry("resources").or_insert_with(|| serde_json::json!({}));
        let res = res.as_object_mut().ok_or_else(|| anyhow!("`resources` must be a table/object"))?;
        for (k, v) in [("memory_mb", a.memory_mb), ("cpu_millis", a.cpu_millis), ("pids", a.pids)] {
            if let Some(v) = v {
                res.insert(k.into(), v.into());
            }
        }
    }
    if !obj.contains_key("node_id") {
        bail!("say which node runs the job: --node NODE_ID (or node_id in the file)");
    }
    let req: SubmitJobRequest = serde_json::from_value(base).context("invalid job")?;
    let _: &ContainerSpec = &req.spec;
    Ok(req)
}

fn read_job_file(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "toml") {
        let v: toml::Value =
            toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
        Ok(serde_json::to_value(v)?)
    } else {
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
    }
}

fn state_name(s: JobState) -> &'static str {
    match s {
        JobState::Queued => "queued",
        JobState::Accepted => "accepted",
        JobState::Finished => "finished",
    }
}

fn ago(ms: Option<u64>) -> String {
    match ms {
        None => "never".into(),
        Some(t) => format!("{} s ago", crate::clock::Clock::system().now_ms().saturating_sub(t) / 1000),
    }
}

fn print_job(j: &JobInfo) {
    println!("job:      {} (attempt {}, seq {})", j.job_id, j.attempt, j.seq);
    println!("node:     {}", j.node_id);
    println!("image:    {}", j.spec.image);
    println!("command:  {}", j.spec.command.join(" "));
    println!("state:    {}", state_name(j.state));
    if let Some(r) = &j.result {
        println!("outcome:  {}", format!("{:?}", r.outcome).to_lowercase());
        if let Some(code) = r.exit_code {
            println!("exit:     {code}");
        }
        if let Some(e) = &r.error {
            println!("error:    {e}");
        }
        if let (Some(s), Some(f)) = (r.timings.started_unix_ms, r.timings.finished_unix_ms) {
            println!("ran for:  {} ms", f.saturating_sub(s));
        }
        if !r.stdout_tail.is_empty() {
            println!(
                "--- stdout{} ---\n{}",
                if r.output_truncated { " (tail)" } else { "" },
                r.stdout_tail.trim_end()
            );
        }
        if !r.stderr_tail.is_empty() {
            println!(
                "--- stderr{} ---\n{}",
                if r.output_truncated { " (tail)" } else { "" },
                r.stderr_tail.trim_end()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("2w").is_err());
        assert!(parse_duration("h").is_err());
    }

    #[test]
    fn flags_build_a_submit_request() {
        let cli = Cli::try_parse_from([
            "outpost-control",
            "job",
            "submit",
            "--node",
            "n1",
            "--image",
            "sha256:ab",
            "--env",
            "A=1",
            "--timeout",
            "30s",
            "--memory-mb",
            "64",
            "--",
            "sh",
            "-c",
            "echo hi",
        ])
        .expect("parse");
        let Command::Job(JobCommand::Submit(args)) = cli.command else { panic!("not submit") };
        let req = submit_request(args).expect("request");
        assert_eq!(req.node_id, "n1");
        assert_eq!(req.spec.command, ["sh", "-c", "echo hi"]);
        assert_eq!(req.spec.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(req.spec.timeout_secs, 30);
        assert_eq!(req.spec.resources.memory_mb, 64);
    }

    #[test]
    fn a_submit_without_a_node_says_so() {
        let cli =
            Cli::try_parse_from(["outpost-control", "job", "submit", "--image", "sha256:ab"]).expect("parse");
        let Command::Job(JobCommand::Submit(args)) = cli.command else { panic!("not submit") };
        let err = submit_request(args).expect_err("no node");
        assert!(err.to_string().contains("--node"), "{err}");
    }
}
