//! `bench-control`: the control plane's load generator (driven by `scripts/bench-control`).
//!
//! `load` simulates N nodes against a running server: each node enrolls with a token of its own
//! (its own key pair and certificate), then holds one mutual-TLS connection on which it
//! long-polls, heartbeats at its interval (the first at a random point of it, so they spread)
//! and reports a result for every job it is handed. With the nodes connected it measures the
//! server process (its RSS before and after they connect; its CPU over a window of heartbeats),
//! the dispatch latency (submit through the operator API → the simulated node has the job) and
//! the operator API's latency under a fixed rate of mixed reads. It prints one JSON object.
//!
//! `baseline` is the ceiling to compare with: a minimal axum + rustls server on the same TLS
//! (1.3, client certificates checked against a CA) that holds each poll for the time asked and
//! answers every request with a fixed body. `load --baseline DIR` runs the same nodes against
//! it, minting their certificates locally from the CA it wrote to DIR.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use outpost_protocol::{
    Announce, ContainerSpec, CreateOrgRequest, CreateTokenRequest, EnrollRequest, EnrollResponse,
    EnrollmentToken, Heartbeat, JobInfo, Org, Outcome, PollRequest, PollResponse, ResultReport,
    SubmitJobRequest, Timings, paths,
};
use rand::Rng;
use serde::Serialize;

/// How long one request may take before it counts as an error (a held poll adds its hold).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Kernel clock ticks a second in /proc/PID/stat (USER_HZ, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

#[derive(Parser)]
#[command(
    name = "bench-control",
    about = "Load generator for the Outpost control plane (see scripts/bench-control)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Simulate nodes and an operator against a server; print one JSON object of figures.
    Load(LoadArgs),
    /// A minimal axum + rustls server with fixed answers: the ceiling on this machine. It
    /// writes its CA (certificate and key) to DIR, prints `listening on https://ADDR` and runs
    /// until it is stopped.
    Baseline {
        /// Where to write ca.crt and ca.key (the load generator signs node certificates with it).
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
}

#[derive(clap::Args)]
struct LoadArgs {
    /// The server, e.g. https://127.0.0.1:8443; several replicas: their URLs, comma-separated
    /// (node i talks to URL i mod n; the operator to the first).
    #[arg(long, value_delimiter = ',', required = true)]
    url: Vec<String>,
    /// The control plane's data directory (its CA and admin token are read from it).
    #[arg(long, conflicts_with = "baseline")]
    data_dir: Option<PathBuf>,
    /// Run against `bench-control baseline` instead, whose CA is in this directory.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// How many nodes to simulate.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// How long each poll asks to be held (the server's --max-hold caps it).
    #[arg(long, default_value_t = 30)]
    hold_secs: u64,
    /// Each node's heartbeat interval.
    #[arg(long, default_value_t = 30)]
    heartbeat_secs: u64,
    /// Enrollments (and certificate mints) in flight at once.
    #[arg(long, default_value_t = 32)]
    enroll_concurrency: usize,
    /// Nodes connecting at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Length of the window over which the server's CPU is measured, nodes connected and idle.
    #[arg(long, default_value_t = 30)]
    window_secs: u64,
    /// Jobs submitted for the dispatch latency (control plane only), one node each at random.
    #[arg(long, default_value_t = 200)]
    dispatches: usize,
    /// Submissions a second.
    #[arg(long, default_value_t = 20.0)]
    dispatch_rate: f64,
    /// Operator reads a second: in turn a filtered node listing, the last 20 jobs, one node,
    /// and health.
    #[arg(long, default_value_t = 1000)]
    operator_rps: u32,
    /// How long the operator load runs.
    #[arg(long, default_value_t = 10)]
    operator_secs: u64,
    /// The server's process id, to read its RSS and CPU time from /proc; several replicas:
    /// their ids, comma-separated (their figures are summed).
    #[arg(long, value_delimiter = ',', required = true)]
    server_pid: Vec<u32>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Load(args) => {
                let figures = load(args).await?;
                println!("{}", serde_json::to_string(&figures)?);
                Ok(())
            }
            Command::Baseline { dir, listen } => baseline::serve(&dir, listen).await,
        }
    })
}

// ------------------------------------------------------------------------------ measuring

/// RSS (MB) and CPU time (ms) of a process, from /proc.
/// RSS (MB) and CPU time (ms) of the server processes, summed.
fn process_figures(pids: &[u32]) -> anyhow::Result<(f64, f64)> {
    let mut sum = (0.0, 0.0);
    for pid in pids {
        let (rss, cpu) = one_process_figures(*pid)?;
        sum = (sum.0 + rss, sum.1 + cpu);
    }
    Ok(sum)
}

fn one_process_figures(pid: u32) -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status: is the server running?"))?;
    let rss_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/PID/status")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces; the fields after it are plain.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).context("unreadable /proc/PID/stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: f64 = fields
        .get(11..13)
        .context("short /proc/PID/stat")?
        .iter()
        .filter_map(|f| f.parse::<f64>().ok())
        .sum();
    Ok((rss_kb / 1024.0, ticks / TICKS_PER_SEC * 1000.0))
}

#[derive(Debug, Default, Serialize)]
struct Latencies {
    samples: usize,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn latencies(mut ms: Vec<f64>) -> Latencies {
    ms.sort_by(f64::total_cmp);
    let at = |p: f64| {
        if ms.is_empty() {
            return f64::NAN;
        }
        let i = ((p / 100.0) * (ms.len() - 1) as f64).round() as usize;
        ms[i.min(ms.len() - 1)]
    };
    Latencies { samples: ms.len(), p50_ms: at(50.0), p95_ms: at(95.0), p99_ms: at(99.0), max_ms: at(100.0) }
}

// ------------------------------------------------------------------------------ TLS

fn certs(pem: &str) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    rustls_pemfile::certs(&mut pem.as_bytes()).collect::<Result<Vec<_>, _>>().context("read PEM certificates")
}

fn key(pem: &str) -> anyhow::Result<rustls::pki_types::PrivateKeyDer<'static>> {
    rustls_pemfile::private_key(&mut pem.as_bytes())?.context("no private key in the PEM")
}

fn roots(ca_pem: &str) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(ca_pem)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// A TLS 1.3 client trusting `ca_pem`, presenting `identity` (certificate and key PEM) if given.
fn client(ca_pem: &str, identity: Option<(&str, &str)>, pool: usize) -> anyhow::Result<reqwest::Client> {
    let builder = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_root_certificates(roots(ca_pem)?);
    let tls = match identity {
        Some((cert, k)) => builder.with_client_auth_cert(certs(cert)?, key(k)?)?,
        None => builder.with_no_client_auth(),
    };
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .pool_max_idle_per_host(pool)
        .connect_timeout(Duration::from_secs(10))
        .build()?)
}

// ------------------------------------------------------------------------------ identities

struct SimNode {
    id: String,
    http: reqwest::Client,
}

/// The operator: the admin token over TLS, no client certificate.
struct Operator {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Operator {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base)).timeout(REQUEST_TIMEOUT);
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn post<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> anyhow::Result<T> {
        let resp = self.request(reqwest::Method::POST, path).json(body).send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("POST {path}: {status}: {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("POST {path}: unexpected answer {text}"))
    }
}

/// Enrolls `n` nodes with the control plane, `concurrency` at a time, each with a token and a
/// key pair of its own.
async fn enroll(
    op: Arc<Operator>,
    ca_pem: &str,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<SimNode>> {
    let org: Org = op
        .post(paths::ORGS, &CreateOrgRequest { name: format!("bench-{}", rand::thread_rng().r#gen::<u32>()) })
        .await?;
    let tokens_path = paths::ORG_TOKENS.replace("{org_id}", &org.id);
    let gate = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let anonymous = client(ca_pem, None, 4)?;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (op, gate, anonymous, tokens_path, ca_pem) =
            (op.clone(), gate.clone(), anonymous.clone(), tokens_path.clone(), ca_pem.to_owned());
        tasks.spawn(async move {
            let _permit = gate.acquire().await?;
            let token: EnrollmentToken =
                op.post(&tokens_path, &CreateTokenRequest { ttl_secs: Some(3600) }).await?;
            let key = rcgen::KeyPair::generate()?;
            let params = rcgen::CertificateParams::new(Vec::<String>::new())?;
            let csr_pem = params.serialize_request(&key)?.pem()?;
            let req = EnrollRequest {
                token: token.token,
                csr_pem,
                hostname: format!("sim-{i}"),
                agent_version: "0.0.0-bench".into(),
                announce: Some(Announce::this_build()),
            };
            let resp = anonymous
                .post(format!("{}{}", op.base, paths::ENROLL))
                .timeout(REQUEST_TIMEOUT)
                .json(&req)
                .send()
                .await?;
            let status = resp.status();
            let text = resp.text().await?;
            if !status.is_success() {
                bail!("enroll: {status}: {text}");
            }
            let enrolled: EnrollResponse = serde_json::from_str(&text)?;
            let http = client(&ca_pem, Some((&enrolled.cert_pem, &key.serialize_pem())), 1)?;
            anyhow::Ok(SimNode { id: enrolled.node_id, http })
        });
    }
    let mut nodes = Vec::with_capacity(n);
    while let Some(joined) = tasks.join_next().await {
        nodes.push(joined??);
    }
    Ok(nodes)
}

/// Mints `n` node certificates from the baseline's CA in `dir`.
fn mint(dir: &Path, n: usize) -> anyhow::Result<(String, Vec<SimNode>)> {
    let ca_pem = std::fs::read_to_string(dir.join("ca.crt")).context("the baseline's ca.crt")?;
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca.key"))?)?;
    let ca = rcgen::CertificateParams::from_ca_cert_pem(&ca_pem)?.self_signed(&ca_key)?;
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        let id = format!("node-sim-{i}");
        params.distinguished_name.push(rcgen::DnType::CommonName, id.clone());
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        let http = client(&ca_pem, Some((&cert.pem(), &key.serialize_pem())), 1)?;
        nodes.push(SimNode { id, http });
    }
    Ok((ca_pem, nodes))
}

// ------------------------------------------------------------------------------ the nodes

#[derive(Default)]
struct Counters {
    /// Nodes that have sent their first poll.
    connected: AtomicUsize,
    polls: AtomicU64,
    poll_errors: AtomicU64,
    heartbeats: AtomicU64,
    heartbeat_errors: AtomicU64,
    reports: AtomicU64,
    report_errors: AtomicU64,
}

struct Shared {
    hold: Duration,
    heartbeat: Duration,
    counters: Counters,
    /// When each job reached its node.
    received: Mutex<HashMap<String, Instant>>,
    stop: tokio::sync::watch::Receiver<bool>,
}

fn heartbeat_body() -> Heartbeat {
    Heartbeat {
        agent_version: "0.0.0-bench".into(),
        inventory: Default::default(),
        running_jobs: 0,
        outbox_depth: 0,
        relay: None,
        models: Vec::new(),
        labels: Default::default(),
        announce: Some(Announce::this_build()),
        awaiting_approval: Vec::new(),
    }
}

fn report(job_id: &str, attempt: u32) -> ResultReport {
    ResultReport {
        job_id: job_id.into(),
        attempt,
        idempotency_key: ResultReport::key_for(job_id, attempt),
        outcome: Outcome::Succeeded,
        exit_code: Some(0),
        error: None,
        stdout_tail: "bench".into(),
        stderr_tail: String::new(),
        output_truncated: false,
        timings: Timings { received_unix_ms: 1, started_unix_ms: Some(2), finished_unix_ms: Some(3) },
        outputs: Vec::new(),
        egress_denied: Vec::new(),
        inference: None,
        sealed: None,
    }
}

async fn post_ok(
    http: &reqwest::Client,
    url: String,
    body: &impl Serialize,
    timeout: Duration,
) -> anyhow::Result<String> {
    let resp = http.post(url).timeout(timeout).json(body).send().await?;
    let status = resp.status();
    let text = resp.text().await?;
    if !status.is_success() {
        bail!("{status}: {text}");
    }
    Ok(text)
}

/// One node: poll (held until a job comes, the hold ends or a heartbeat is due), heartbeat when
/// due, report what it was handed; one connection throughout.
async fn run_node(node: SimNode, shared: Arc<Shared>, base: String, first_heartbeat: Duration) {
    let c = &shared.counters;
    let mut stop = shared.stop.clone();
    let mut next_heartbeat = Instant::now() + first_heartbeat;
    let mut acks: Vec<String> = Vec::new();
    let mut connected = false;
    let heartbeat = heartbeat_body();
    while !*stop.borrow() {
        let now = Instant::now();
        if now >= next_heartbeat {
            let url = format!("{base}{}", paths::NODE_HEARTBEAT);
            match post_ok(&node.http, url, &heartbeat, REQUEST_TIMEOUT).await {
                Ok(_) => c.heartbeats.fetch_add(1, Ordering::Relaxed),
                Err(_) => c.heartbeat_errors.fetch_add(1, Ordering::Relaxed),
            };
            next_heartbeat += shared.heartbeat;
            continue;
        }
        let wait = shared.hold.min(next_heartbeat - now).as_secs().max(1);
        let req = PollRequest {
            ack_job_ids: std::mem::take(&mut acks),
            wait_secs: Some(wait),
            max_jobs: Some(8),
            announce: Some(Announce::this_build()),
            ..Default::default()
        };
        if !connected {
            connected = true;
            c.connected.fetch_add(1, Ordering::Relaxed);
        }
        let url = format!("{base}{}", paths::NODE_POLL);
        let polled = tokio::select! {
            r = post_ok(&node.http, url, &req, REQUEST_TIMEOUT + Duration::from_secs(wait)) => r,
            _ = stop.changed() => break,
        };
        let answer = match polled.and_then(|t| Ok(serde_json::from_str::<PollResponse>(&t)?)) {
            Ok(a) => a,
            Err(_) => {
                c.poll_errors.fetch_add(1, Ordering::Relaxed);
                acks = req.ack_job_ids;
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        c.polls.fetch_add(1, Ordering::Relaxed);
        if answer.jobs.is_empty() {
            continue;
        }
        let now = Instant::now();
        if let Ok(mut received) = shared.received.lock() {
            for job in &answer.jobs {
                received.entry(job.job_id.clone()).or_insert(now);
            }
        }
        for job in answer.jobs {
            let url = format!("{base}{}", paths::NODE_RESULTS);
            match post_ok(&node.http, url, &report(&job.job_id, job.attempt), REQUEST_TIMEOUT).await {
                Ok(_) => c.reports.fetch_add(1, Ordering::Relaxed),
                Err(_) => c.report_errors.fetch_add(1, Ordering::Relaxed),
            };
            acks.push(job.job_id);
        }
    }
}

// ------------------------------------------------------------------------------ the run

#[derive(Serialize)]
struct Figures {
    target: &'static str,
    nodes: usize,
    enroll_s: f64,
    connect_s: f64,
    rss_before_mb: f64,
    rss_connected_mb: f64,
    rss_per_1000_nodes_mb: f64,
    window_s: f64,
    heartbeats_in_window: u64,
    polls_in_window: u64,
    cpu_ms_in_window: f64,
    /// The server's CPU time per heartbeat in the window (each comes with a poll re-armed).
    cpu_ms_per_heartbeat: f64,
    cpu_percent_of_one_core: f64,
    dispatch: Option<Dispatch>,
    /// One unfiltered `GET /v1/nodes` with every node connected (control plane only).
    node_list_all: Option<NodeListAll>,
    route_ms: RouteCosts,
    operator: OperatorFigures,
    poll_errors: u64,
    heartbeat_errors: u64,
    report_errors: u64,
}

#[derive(Serialize)]
struct Dispatch {
    submitted: usize,
    submit_errors: usize,
    /// Submitted jobs no node had 15 s after the last submission.
    missing: usize,
    latency: Latencies,
}

/// Median milliseconds of each operator read alone (see [`route_costs`]).
#[derive(Serialize)]
struct RouteCosts {
    node_listing_filtered: f64,
    jobs_last_20: f64,
    one_node: f64,
    health: f64,
}

#[derive(Serialize)]
struct NodeListAll {
    bytes: usize,
    ms: f64,
}

#[derive(Serialize)]
struct OperatorFigures {
    target_rps: u32,
    achieved_rps: f64,
    errors: u64,
    latency: Latencies,
}

async fn load(args: LoadArgs) -> anyhow::Result<Figures> {
    let bases: Vec<String> = args.url.iter().map(|u| u.trim_end_matches('/').to_owned()).collect();
    let base = bases.first().cloned().context("no --url")?;
    let started = Instant::now();
    let (target, ca_pem, nodes, op) = match (&args.data_dir, &args.baseline) {
        (Some(dir), None) => {
            let ca_pem = std::fs::read_to_string(dir.join("ca.crt")).context("the control plane's ca.crt")?;
            let token = std::fs::read_to_string(dir.join("admin.token")).context("the admin token")?;
            let op = Arc::new(Operator {
                http: client(&ca_pem, None, 64)?,
                base: base.clone(),
                token: Some(token.trim().to_owned()),
            });
            let nodes = enroll(op.clone(), &ca_pem, args.nodes, args.enroll_concurrency).await?;
            ("control", ca_pem, nodes, op)
        }
        (None, Some(dir)) => {
            let (ca_pem, nodes) = mint(dir, args.nodes)?;
            let op = Arc::new(Operator { http: client(&ca_pem, None, 64)?, base: base.clone(), token: None });
            ("baseline", ca_pem, nodes, op)
        }
        _ => bail!("give --data-dir (a control plane) or --baseline DIR"),
    };
    drop(ca_pem);
    let enroll_s = started.elapsed().as_secs_f64();
    eprintln!("[bench-control] {target}: {} nodes ready in {enroll_s:.1} s; connecting", nodes.len());
    // Let the server settle after the enrollment burst before the baseline figure.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_before_mb, _) = process_figures(&args.server_pid)?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let shared = Arc::new(Shared {
        hold: Duration::from_secs(args.hold_secs),
        heartbeat: Duration::from_secs(args.heartbeat_secs),
        counters: Counters::default(),
        received: Mutex::new(HashMap::new()),
        stop: stop_rx,
    });
    let node_ids: Arc<Vec<String>> = Arc::new(nodes.iter().map(|n| n.id.clone()).collect());
    let connecting = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let period_ms = u64::try_from(shared.heartbeat.as_millis()).unwrap_or(u64::MAX).max(1);
    for (i, node) in nodes.into_iter().enumerate() {
        // A first heartbeat right away, as an agent sends one at start; then spread over the period.
        let first = Duration::from_millis(rand::thread_rng().gen_range(0..period_ms));
        let node_base = bases[i % bases.len()].clone();
        tasks.spawn(run_node(
            node,
            shared.clone(),
            node_base,
            if i % 2 == 0 { Duration::ZERO } else { first },
        ));
        if (i + 1) % args.connect_concurrency == 0 {
            // Let the handshakes of this wave finish before the next.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let c = &shared.counters;
    while c.connected.load(Ordering::Relaxed) < args.nodes {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every node has sent its first poll; give the last ones time to be held.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let connect_s = connecting.elapsed().as_secs_f64();
    let (rss_connected_mb, _) = process_figures(&args.server_pid)?;
    eprintln!(
        "[bench-control] {target}: {} nodes connected in {connect_s:.1} s; measuring {} s of heartbeats",
        args.nodes, args.window_secs
    );

    let (_, cpu_start) = process_figures(&args.server_pid)?;
    let (hb_start, polls_start) = (c.heartbeats.load(Ordering::Relaxed), c.polls.load(Ordering::Relaxed));
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.window_secs)).await;
    let window_s = window.elapsed().as_secs_f64();
    let (_, cpu_end) = process_figures(&args.server_pid)?;
    let heartbeats_in_window = c.heartbeats.load(Ordering::Relaxed) - hb_start;
    let polls_in_window = c.polls.load(Ordering::Relaxed) - polls_start;
    let cpu_ms_in_window = cpu_end - cpu_start;

    let dispatch = if target == "control" {
        eprintln!("[bench-control] {target}: {} dispatches at {}/s", args.dispatches, args.dispatch_rate);
        Some(dispatch(&op, &node_ids, &shared, args.dispatches, args.dispatch_rate).await)
    } else {
        None
    };
    let node_list_all = if target == "control" {
        let at = Instant::now();
        let body =
            op.request(reqwest::Method::GET, paths::NODES).send().await?.error_for_status()?.bytes().await?;
        Some(NodeListAll { bytes: body.len(), ms: at.elapsed().as_secs_f64() * 1000.0 })
    } else {
        None
    };
    let route_ms = route_costs(&op, &node_ids).await?;
    eprintln!(
        "[bench-control] {target}: operator reads at {}/s for {} s",
        args.operator_rps, args.operator_secs
    );
    let operator = operator_load(op.clone(), node_ids.clone(), args.operator_rps, args.operator_secs).await;

    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    let nodes_f = args.nodes as f64;
    Ok(Figures {
        target,
        nodes: args.nodes,
        enroll_s,
        connect_s,
        rss_before_mb,
        rss_connected_mb,
        rss_per_1000_nodes_mb: (rss_connected_mb - rss_before_mb) / nodes_f * 1000.0,
        window_s,
        heartbeats_in_window,
        polls_in_window,
        cpu_ms_in_window,
        cpu_ms_per_heartbeat: if heartbeats_in_window == 0 {
            f64::NAN
        } else {
            cpu_ms_in_window / heartbeats_in_window as f64
        },
        cpu_percent_of_one_core: cpu_ms_in_window / (window_s * 1000.0) * 100.0,
        dispatch,
        node_list_all,
        route_ms,
        operator,
        poll_errors: c.poll_errors.load(Ordering::Relaxed),
        heartbeat_errors: c.heartbeat_errors.load(Ordering::Relaxed),
        report_errors: c.report_errors.load(Ordering::Relaxed),
    })
}

/// Submits `count` jobs, one at a time at `rate` a second, each to a node at random; the
/// latency is from just before the submission to the moment the node's poll brought the job.
async fn dispatch(op: &Operator, node_ids: &[String], shared: &Shared, count: usize, rate: f64) -> Dispatch {
    let spec: ContainerSpec = serde_json::from_value(serde_json::json!({
        "image": format!("sha256:{}", "b".repeat(64)),
        "command": ["true"],
    }))
    .unwrap_or_else(|e| unreachable!("a fixed valid spec: {e}"));
    let gap = Duration::from_secs_f64(1.0 / rate.max(0.1));
    let mut submitted: HashMap<String, Instant> = HashMap::new();
    let mut submit_errors = 0;
    for _ in 0..count {
        let node = &node_ids[rand::thread_rng().gen_range(0..node_ids.len())];
        let at = Instant::now();
        match op.post::<JobInfo>(paths::JOBS, &SubmitJobRequest::for_node(node.clone(), spec.clone())).await {
            Ok(job) => {
                submitted.insert(job.job_id, at);
            }
            Err(e) => {
                submit_errors += 1;
                eprintln!("[bench-control] submit failed: {e:#}");
            }
        }
        tokio::time::sleep(gap.saturating_sub(at.elapsed())).await;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let all =
            shared.received.lock().map(|r| submitted.keys().all(|id| r.contains_key(id))).unwrap_or(true);
        if all || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let received = shared.received.lock().map(|r| r.clone()).unwrap_or_default();
    let ms: Vec<f64> = submitted
        .iter()
        .filter_map(|(id, at)| {
            received.get(id).map(|got| got.saturating_duration_since(*at).as_secs_f64() * 1000.0)
        })
        .collect();
    Dispatch {
        submitted: submitted.len(),
        submit_errors,
        missing: submitted.len() - ms.len(),
        latency: latencies(ms),
    }
}

/// The operator's `i`th read: in turn a filtered node listing (the unfiltered one is measured
/// once, on its own: its size grows with the fleet), the last 20 jobs, one node, health.
fn operator_path(i: u64, node_ids: &[String]) -> String {
    match i % 4 {
        0 => format!("{}?selector=bench%3Dnone", paths::NODES),
        1 => format!("{}?limit=20", paths::JOBS),
        2 => {
            paths::NODE.replace("{node_id}", &node_ids[usize::try_from(i / 4).unwrap_or(0) % node_ids.len()])
        }
        _ => paths::HEALTH.to_owned(),
    }
}

/// Where an operator read's time goes: each read of the mix alone, one after another on one
/// kept-alive connection (no handshake, no queueing), median of 50.
async fn route_costs(op: &Operator, node_ids: &[String]) -> anyhow::Result<RouteCosts> {
    let mut median = [0.0; 4];
    for (kind, slot) in median.iter_mut().enumerate() {
        let mut ms = Vec::new();
        for round in 0..50u64 {
            let path = operator_path(round * 4 + kind as u64, node_ids);
            let at = Instant::now();
            op.request(reqwest::Method::GET, &path).send().await?.error_for_status()?.bytes().await?;
            ms.push(at.elapsed().as_secs_f64() * 1000.0);
        }
        *slot = latencies(ms).p50_ms;
    }
    Ok(RouteCosts {
        node_listing_filtered: median[0],
        jobs_last_20: median[1],
        one_node: median[2],
        health: median[3],
    })
}

/// `rps` reads a second for `secs` seconds, open loop (a slow answer does not slow the rate).
async fn operator_load(
    op: Arc<Operator>,
    node_ids: Arc<Vec<String>>,
    rps: u32,
    secs: u64,
) -> OperatorFigures {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(AtomicU64::new(0));
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rps.max(1))));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let total = u64::from(rps) * secs;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        ticker.tick().await;
        let (op, node_ids, samples, errors) = (op.clone(), node_ids.clone(), samples.clone(), errors.clone());
        tasks.spawn(async move {
            let path = operator_path(i, &node_ids);
            let at = Instant::now();
            let ok = match op.request(reqwest::Method::GET, &path).send().await {
                Ok(resp) => resp.status().is_success() && resp.bytes().await.is_ok(),
                Err(_) => false,
            };
            if ok {
                if let Ok(mut s) = samples.lock() {
                    s.push(at.elapsed().as_secs_f64() * 1000.0);
                }
            } else {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        });
        // Reap as we go so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed().as_secs_f64();
    let ms = samples.lock().map(|s| s.clone()).unwrap_or_default();
    OperatorFigures {
        target_rps: rps,
        achieved_rps: ms.len() as f64 / elapsed,
        errors: errors.load(Ordering::Relaxed),
        latency: latencies(ms),
    }
}

// ------------------------------------------------------------------------------ the baseline

mod baseline {
    use std::net::SocketAddr;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use anyhow::Context;
    use axum::Json;
    use axum::routing::{get, post};
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    use outpost_protocol::{PollRequest, PollResponse, paths};

    /// The longest the baseline holds a poll, as the control plane's default.
    const MAX_HOLD: Duration = Duration::from_secs(30);

    async fn poll(Json(req): Json<PollRequest>) -> Json<PollResponse> {
        tokio::time::sleep(Duration::from_secs(req.wait_secs.unwrap_or(0)).min(MAX_HOLD)).await;
        Json(PollResponse::default())
    }

    pub async fn serve(dir: &Path, listen: SocketAddr) -> anyhow::Result<()> {
        // A CA, written for the load generator, and a server certificate from it.
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "bench baseline CA");
        let ca = ca_params.self_signed(&ca_key)?;
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("ca.crt"), ca.pem())?;
        std::fs::write(dir.join("ca.key"), ca_key.serialize_pem())?;
        let server_key = rcgen::KeyPair::generate()?;
        let server_params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        let server_cert = server_params.signed_by(&server_key, &ca, &ca_key)?;

        let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(super::roots(&ca.pem())?))
            .allow_unauthenticated()
            .build()?;
        let tls = rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
            .with_client_cert_verifier(verifier)
            .with_single_cert(super::certs(&server_cert.pem())?, super::key(&server_key.serialize_pem())?)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let app = axum::Router::new()
            .route(paths::NODE_POLL, post(poll))
            .route(paths::NODE_HEARTBEAT, post(|| async { axum::http::StatusCode::NO_CONTENT }))
            .route(paths::NODE_RESULTS, post(|| async { Json(serde_json::json!({})) }))
            .fallback(get(|| async { Json(serde_json::json!({ "ok": true })) }));
        let listener = tokio::net::TcpListener::bind(listen).await.context("bind")?;
        println!("listening on https://{}", listener.local_addr()?);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            let (tcp, _) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = term.recv() => return Ok(()),
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app))
                    .await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::latencies;

    #[test]
    fn percentiles_come_from_the_sorted_samples() {
        let l = latencies((1..=100).rev().map(f64::from).collect());
        assert_eq!((l.samples, l.p50_ms, l.p99_ms, l.max_ms), (100, 51.0, 99.0, 100.0));
        assert!(latencies(Vec::new()).p50_ms.is_nan());
    }
}
