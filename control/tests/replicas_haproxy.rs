//! Three `outpost-control` replicas (real processes) over one real PostgreSQL, behind a real
//! HAProxy in TCP mode (TLS passes through, so nodes still authenticate with their client
//! certificates). Simulated nodes long-poll, run and report jobs and deliver relay events
//! through the balancer while an operator submits jobs through it, and replicas are killed
//! with SIGKILL and started again, then restarted one at a time. Afterwards every job the
//! store holds finished with exactly one result, each ran once on its node, every node saw its
//! jobs in sequence order, and every event is stored exactly once.

// Helpers outside #[test] fns panic on purpose: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::panic)]

#[allow(dead_code)]
#[path = "api/support.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use outpost_control::client::{Client, EventsQuery, JobsQuery};
use outpost_protocol::{
    EnrollResponse, EventAck, EventBatch, JobEnvelope, JobState, Outcome, PollRequest, PollResponse,
    ResultReport, SubmitJobRequest, paths,
};
use support::{csr, enroll_request, https, object_event, spec, succeeded};
use tokio::sync::Mutex;

const BIN: &str = env!("CARGO_BIN_EXE_outpost-control");
const NODES: usize = 4;
const EVENTS_PER_NODE: u64 = 60;

struct Replica {
    dir: PathBuf,
    port: u16,
    log: PathBuf,
    child: Option<Child>,
}

impl Replica {
    fn start(&mut self, store_url: &str) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log");
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{}", self.port), "--max-hold", "5s"])
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--store-url", store_url])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("outpost-control starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("ready line");
        assert!(line.starts_with("outpost-control listening on"), "{line:?}; see {}", self.log.display());
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = child.wait();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Balancer(Child);

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port()
}

fn haproxy() -> Option<PathBuf> {
    ["/usr/sbin/haproxy", "/usr/bin/haproxy"].iter().map(PathBuf::from).find(|p| p.is_file())
}

/// HAProxy in TCP mode (TLS passes through), checking each replica's `/v1/health` over TLS
/// with the control plane's CA: a replica that is up but cannot reach its database is out.
fn start_haproxy(dir: &Path, front: u16, replicas: &[u16], ca_file: &Path) -> Balancer {
    let ca = ca_file.display();
    let servers: String = replicas
        .iter()
        .enumerate()
        .map(|(i, port)| {
            format!("    server r{i} 127.0.0.1:{port} check check-ssl verify required ca-file {ca}\n")
        })
        .collect();
    let config = format!(
        "global\n    maxconn 4096\n\
         defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 60s\n    timeout server 60s\n    \
         retries 3\n    option redispatch\n\
         frontend outpost\n    bind 127.0.0.1:{front}\n    default_backend replicas\n\
         backend replicas\n    balance roundrobin\n    option httpchk GET /v1/health\n    \
         http-check expect status 200\n    default-server inter 300ms fall 2 rise 1\n{servers}"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config).expect("haproxy.cfg");
    let child = Command::new(haproxy().expect("haproxy"))
        .args(["-db", "-f"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("haproxy starts");
    Balancer(child)
}

/// What a simulated node keeps across its own calls, as the agent's ledger does.
#[derive(Default)]
struct Ledger {
    /// Job id → how many times it was run (must end at exactly 1).
    ran: BTreeMap<String, u32>,
    /// Jobs run whose result is not acknowledged yet.
    unreported: BTreeMap<String, ResultReport>,
    /// Jobs persisted, to acknowledge on the next poll.
    to_ack: BTreeSet<String>,
    /// The highest sequence number accepted: a lower or equal one is refused, as the agent does.
    highest_seq: u64,
    refused_seqs: Vec<(u64, u64)>,
    /// Events delivered and acknowledged up to this seq.
    events_acked: u64,
}

struct SimNode {
    id: String,
    http: reqwest::Client,
    base: String,
    ledger: Mutex<Ledger>,
    /// Calls that got no answer or an error (a replica killed under them).
    failed_calls: AtomicU64,
}

impl SimNode {
    async fn post<T: serde::Serialize>(&self, path: &str, body: &T) -> Option<serde_json::Value> {
        let answer = async {
            let resp = self.http.post(format!("{}{path}", self.base)).json(body).send().await.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            resp.json().await.ok()
        };
        let got = answer.await;
        if got.is_none() {
            self.failed_calls.fetch_add(1, Ordering::Relaxed);
        }
        got
    }

    /// One round: report what is unreported, deliver the next events, poll (acknowledging what
    /// was persisted), run what is new. Every call may fail (a replica killed under it); what
    /// failed is retried next round.
    async fn round(&self) {
        let unreported: Vec<ResultReport> = self.ledger.lock().await.unreported.values().cloned().collect();
        for report in unreported {
            if self.post(paths::NODE_RESULTS, &report).await.is_some() {
                self.ledger.lock().await.unreported.remove(&report.job_id);
            }
        }
        let next = self.ledger.lock().await.events_acked + 1;
        if next <= EVENTS_PER_NODE {
            let batch: Vec<_> = (next..=(next + 4).min(EVENTS_PER_NODE))
                .map(|seq| object_event(seq, &format!("incoming/{}-{seq}.bin", self.id)))
                .collect();
            if let Some(ack) = self.post(paths::NODE_EVENTS, &EventBatch { events: batch }).await {
                let ack: EventAck = serde_json::from_value(ack).expect("an EventAck");
                let mut ledger = self.ledger.lock().await;
                ledger.events_acked = ledger.events_acked.max(ack.up_to_seq);
            }
        }
        let acks: Vec<String> = self.ledger.lock().await.to_ack.iter().cloned().collect();
        let req = PollRequest {
            ack_job_ids: acks.clone(),
            wait_secs: Some(2),
            announce: Some(outpost_protocol::Announce::this_build()),
            ..Default::default()
        };
        let Some(body) = self.post(paths::NODE_POLL, &req).await else { return };
        let resp: PollResponse = serde_json::from_value(body).expect("a PollResponse");
        let mut ledger = self.ledger.lock().await;
        for id in &acks {
            ledger.to_ack.remove(id);
        }
        for assignment in resp.jobs {
            let envelope: JobEnvelope = serde_json::from_str(&assignment.envelope.payload).expect("envelope");
            if ledger.ran.contains_key(&assignment.job_id) {
                // Offered again (the acknowledgement was lost): acknowledge, never run twice.
                ledger.to_ack.insert(assignment.job_id);
                continue;
            }
            if envelope.seq <= ledger.highest_seq {
                let highest = ledger.highest_seq;
                ledger.refused_seqs.push((envelope.seq, highest));
                continue;
            }
            ledger.highest_seq = envelope.seq;
            ledger.ran.insert(assignment.job_id.clone(), 1);
            let mut report = succeeded(&assignment.job_id, &format!("ran on {}", self.id));
            report.attempt = assignment.attempt;
            report.idempotency_key = ResultReport::key_for(&assignment.job_id, assignment.attempt);
            ledger.unreported.insert(assignment.job_id.clone(), report);
            ledger.to_ack.insert(assignment.job_id);
        }
    }
}

async fn enroll(base: &str, ca_pem: &str, token: &str) -> SimNode {
    let (csr_pem, key_pem) = csr();
    for _ in 0..50 {
        let anonymous = https(ca_pem, None);
        let sent = anonymous
            .post(format!("{base}{}", paths::ENROLL))
            .json(&enroll_request(token, &csr_pem))
            .send()
            .await;
        if let Ok(resp) = sent
            && resp.status().is_success()
        {
            let enrolled: EnrollResponse = resp.json().await.expect("an EnrollResponse");
            let http = https(&enrolled.ca_pem, Some((&enrolled.cert_pem, &key_pem)));
            return SimNode {
                id: enrolled.node_id,
                http,
                base: base.to_owned(),
                ledger: Mutex::default(),
                failed_calls: AtomicU64::new(0),
            };
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("could not enroll through the balancer");
}

/// Retries an operator call through the balancer until it is answered.
async fn retried<T, F: std::future::Future<Output = anyhow::Result<T>>>(mut call: impl FnMut() -> F) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match call().await {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                eprintln!("retrying: {e:#}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("gave up: {e:#}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_behind_haproxy_lose_nothing_when_killed_or_restarted() {
    let test = "replicas_behind_haproxy_lose_nothing_when_killed_or_restarted";
    if haproxy().is_none() {
        assert!(std::env::var_os("CI").is_none(), "{test}: haproxy is not installed; CI must run it");
        eprintln!("skipped {test}: haproxy is not installed (apt-get install haproxy)");
        return;
    }
    let Some(pg) = outpost_control::testing::postgres::start_or_skip(test).await.expect("postgres") else {
        return;
    };
    let options = pg.database().await.expect("database");
    outpost_control::store::PgStore::migrate(options.clone()).await.expect("migrate");
    let work = tempfile::tempdir().expect("tempdir");

    // Replica 0 creates the CA and admin token; the others get a copy of its data directory.
    let mut replicas: Vec<Replica> = (0..3)
        .map(|i| Replica {
            dir: work.path().join(format!("replica-{i}")),
            port: free_port(),
            log: work.path().join(format!("replica-{i}.log")),
            child: None,
        })
        .collect();
    replicas[0].start(&options.url);
    let first = replicas[0].dir.clone();
    for replica in &mut replicas[1..] {
        outpost_control::testing::copy_data_dir(&first, &replica.dir).expect("copy of the data directory");
        replica.start(&options.url);
    }
    let front = free_port();
    let ports: Vec<u16> = replicas.iter().map(|r| r.port).collect();
    let _balancer = start_haproxy(work.path(), front, &ports, &replicas[0].dir.join("ca.crt"));
    let base = format!("https://127.0.0.1:{front}");
    let ca_pem = std::fs::read_to_string(replicas[0].dir.join("ca.crt")).expect("ca");
    let admin = std::fs::read_to_string(replicas[0].dir.join("admin.token")).expect("token");
    let op = Arc::new(Client::new(&base, &ca_pem, admin.trim()).expect("operator"));

    let org = retried(|| op.create_org("ha")).await;
    let mut nodes = Vec::new();
    for _ in 0..NODES {
        let token = retried(|| op.create_token(&org.id, None)).await;
        nodes.push(Arc::new(enroll(&base, &ca_pem, &token.token).await));
    }

    // The nodes run until told to stop.
    let stop_nodes = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut running = tokio::task::JoinSet::new();
    for node in &nodes {
        let (node, stop) = (Arc::clone(node), Arc::clone(&stop_nodes));
        running.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                node.round().await;
            }
        });
    }
    // The operator submits through the balancer; a submit whose answer was lost may or may
    // not have stored its job: the check below counts the jobs the store holds.
    let submitted = Arc::new(AtomicU64::new(0));
    let submitting = {
        let (op, stop, submitted) = (Arc::clone(&op), Arc::clone(&stop), Arc::clone(&submitted));
        let ids: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let req = SubmitJobRequest::for_node(&ids[i % ids.len()], spec());
                if op.submit(&req).await.is_ok() {
                    submitted.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };

    // Faults: each replica killed with SIGKILL and started again, one after another, twice;
    // then a rolling restart (SIGTERM, start) of all three.
    for round in 0..2 {
        for (i, replica) in replicas.iter_mut().enumerate() {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            eprintln!("round {round}: SIGKILL replica {i}");
            replica.kill();
            tokio::time::sleep(Duration::from_millis(800)).await;
            replica.start(&options.url);
        }
    }
    for (i, replica) in replicas.iter_mut().enumerate() {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        eprintln!("rolling restart: replica {i}");
        replica.terminate();
        replica.start(&options.url);
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    submitting.await.expect("submitter");
    // Let the nodes drain: run, report and deliver what is left.
    let drain = async {
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut done = true;
            for node in &nodes {
                let ledger = node.ledger.lock().await;
                done &= ledger.unreported.is_empty() && ledger.events_acked == EVENTS_PER_NODE;
            }
            let queued =
                JobsQuery { node_id: None, state: Some(JobState::Queued), group_id: None, limit: 10 };
            let queued = retried(|| op.jobs(&queued)).await;
            let accepted =
                JobsQuery { node_id: None, state: Some(JobState::Accepted), group_id: None, limit: 10 };
            let accepted = retried(|| op.jobs(&accepted)).await;
            if done && queued.jobs.is_empty() && accepted.jobs.is_empty() {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), drain)
        .await
        .expect("every job finished and every event stored");
    stop_nodes.store(true, Ordering::Relaxed);
    while running.join_next().await.is_some() {}

    let everything = JobsQuery { node_id: None, state: None, group_id: None, limit: 100_000 };
    let all = retried(|| op.jobs(&everything)).await;
    let acknowledged = submitted.load(Ordering::Relaxed);
    let failed: u64 = nodes.iter().map(|n| n.failed_calls.load(Ordering::Relaxed)).sum();
    eprintln!("{} jobs stored, {acknowledged} submits answered, {failed} node calls failed", all.jobs.len());
    assert!(failed > 0, "no node call failed: the kills never hit work in flight");
    assert!(all.jobs.len() as u64 >= acknowledged, "a job whose submit was answered is missing");
    assert!(acknowledged > 20, "the run submitted too little to mean anything: {acknowledged}");
    let mut ran: BTreeMap<String, u32> = BTreeMap::new();
    for node in &nodes {
        let ledger = node.ledger.lock().await;
        assert!(
            ledger.refused_seqs.is_empty(),
            "node {} saw numbers out of order: {:?}",
            node.id,
            ledger.refused_seqs
        );
        for (id, n) in &ledger.ran {
            *ran.entry(id.clone()).or_default() += n;
        }
    }
    for job in &all.jobs {
        assert_eq!(job.state, JobState::Finished, "job {} is {:?}", job.job_id, job.state);
        let result = job.result.as_ref().expect("a result");
        assert_eq!(result.outcome, Outcome::Succeeded);
        assert_eq!(ran.get(&job.job_id), Some(&1), "job {} ran {:?} times", job.job_id, ran.get(&job.job_id));
    }
    assert_eq!(ran.len(), all.jobs.len(), "a node ran a job the store does not hold");
    for node in &nodes {
        let query = EventsQuery {
            node_id: Some(node.id.clone()),
            after_seq: Some(0),
            limit: Some(1000),
            ..Default::default()
        };
        let events = retried(|| op.events(&query)).await;
        let seqs: Vec<u64> = events.events.iter().map(|e| e.event.seq).collect();
        assert_eq!(seqs, (1..=EVENTS_PER_NODE).collect::<Vec<_>>(), "node {}: each event once", node.id);
    }
}
