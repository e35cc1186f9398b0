//! A fleet of simulated nodes for `scripts/bench-fleet`: each one enrolls with its own key and
//! certificate and speaks the real node protocol over mutual TLS (heartbeats with labels,
//! long-polls, acknowledgements, service reports, job results). Services and jobs "run" at
//! once, so what is measured is the control plane's dispatch and rollout, not containers.
//!
//! It then measures, in one run: a deployment to every simulated node until all report healthy,
//! against the same nodes each sent one job, one at a time (submit → result → next).
//!
//! Usage: fleet-sim --url URL --data-dir DIR [--nodes N] [--batch 10%]
//! Prints one JSON object on stdout; progress on stderr.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use outpost_control::client::Client;
use outpost_protocol::{
    Announce, BatchSize, DeployRequest, EnrollRequest, EnrollResponse, Heartbeat, Inventory, NodePhase,
    Outcome, PollRequest, PollResponse, ResultReport, RolloutPolicy, RolloutStatus, ServiceAck,
    ServiceEnvelope, ServiceReport, ServiceReportBatch, ServiceState, SubmitJobRequest, Timings, paths,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

struct SimNode {
    id: String,
    http: reqwest::Client,
    base: String,
    report_seq: AtomicU64,
}

impl SimNode {
    async fn post<B: Serialize, R: DeserializeOwned>(&self, path: &str, body: &B) -> anyhow::Result<R> {
        let resp = self.http.post(format!("{}{path}", self.base)).json(body).send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        anyhow::ensure!(status.is_success(), "{path}: HTTP {status}: {text}");
        Ok(serde_json::from_str(&text)?)
    }

    async fn heartbeat(&self) -> anyhow::Result<()> {
        let hb = Heartbeat {
            agent_version: "fleet-sim".into(),
            inventory: Inventory { hostname: self.id.clone(), cpu_count: 2, ..Inventory::default() },
            running_jobs: 0,
            outbox_depth: 0,
            relay: None,
            models: Vec::new(),
            labels: [("sim".to_owned(), "yes".to_owned())].into(),
            announce: Some(Announce::this_build()),
            awaiting_approval: Vec::new(),
        };
        let _: serde_json::Value = self.post(paths::NODE_HEARTBEAT, &hb).await?;
        Ok(())
    }

    async fn report_service(&self, svc: &ServiceEnvelope, state: ServiceState) -> anyhow::Result<()> {
        let seq = self.report_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let report = ServiceReport {
            seq,
            service: svc.service.clone(),
            deployment: svc.deployment.clone(),
            revision: svc.revision,
            state,
            restarts: 0,
            last_exit: None,
            health_output: String::new(),
            message: None,
            unix_ms: 0,
        };
        let _: serde_json::Value =
            self.post(paths::NODE_SERVICES, &ServiceReportBatch { reports: vec![report] }).await?;
        Ok(())
    }

    /// Polls for ever: acknowledges what it took, "runs" it at once and reports.
    async fn serve(self: Arc<Self>) {
        let mut acks: Vec<String> = Vec::new();
        let mut service_acks: Vec<ServiceAck> = Vec::new();
        loop {
            let req = PollRequest {
                ack_job_ids: std::mem::take(&mut acks),
                wait_secs: Some(25),
                max_jobs: Some(16),
                announce: Some(Announce::this_build()),
                service_acks: std::mem::take(&mut service_acks),
            };
            let resp: PollResponse = match self.post(paths::NODE_POLL, &req).await {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("[sim] {}: poll failed: {e}", self.id);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            for env in resp.services {
                let svc: ServiceEnvelope = serde_json::from_str(&env.payload).expect("service envelope");
                service_acks.push(ServiceAck { service: svc.service.clone(), seq: svc.seq });
                if svc.spec.is_some() {
                    let _ = self.report_service(&svc, ServiceState::Starting).await;
                    let _ = self.report_service(&svc, ServiceState::Healthy).await;
                }
            }
            for job in resp.jobs {
                acks.push(job.job_id.clone());
                let report = ResultReport {
                    job_id: job.job_id.clone(),
                    attempt: job.attempt,
                    idempotency_key: ResultReport::key_for(&job.job_id, job.attempt),
                    outcome: Outcome::Succeeded,
                    exit_code: Some(0),
                    error: None,
                    stdout_tail: "sim".into(),
                    stderr_tail: String::new(),
                    output_truncated: false,
                    timings: Timings::default(),
                    outputs: Vec::new(),
                    egress_denied: Vec::new(),
                    inference: None,
                    sealed: None,
                };
                let _: anyhow::Result<serde_json::Value> = self.post(paths::NODE_RESULTS, &report).await;
            }
        }
    }
}

fn csr() -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(rcgen::DnType::CommonName, "fleet-sim");
    let csr = params.serialize_request(&key).expect("csr");
    (csr.pem().expect("pem"), key.serialize_pem())
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((p / 100.0) * (sorted.len() - 1) as f64).round() as usize]
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let url = arg(&args, "--url").ok_or_else(|| anyhow::anyhow!("--url URL is required"))?;
    let dir = std::path::PathBuf::from(
        arg(&args, "--data-dir").ok_or_else(|| anyhow::anyhow!("--data-dir DIR is required"))?,
    );
    let n: usize = arg(&args, "--nodes").map_or(Ok(100), |v| v.parse())?;
    let batch = BatchSize::parse(&arg(&args, "--batch").unwrap_or_else(|| "10%".into()))
        .map_err(|e| anyhow::anyhow!(e))?;
    let ca_pem = std::fs::read_to_string(dir.join("ca.crt"))?;
    let token = std::fs::read_to_string(dir.join("admin.token"))?.trim().to_owned();
    let op = Client::new(&url, &ca_pem, &token)?;
    let org = op.create_org("fleet-sim").await?;

    eprintln!("[sim] enrolling {n} nodes");
    let anonymous = reqwest::Client::builder()
        .use_preconfigured_tls(outpost_control::tls::client_config(&ca_pem, None)?)
        .build()?;
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        let token = op.create_token(&org.id, None).await?;
        let (csr_pem, key_pem) = csr();
        let req = EnrollRequest {
            token: token.token,
            csr_pem,
            hostname: format!("sim-{i}"),
            agent_version: "fleet-sim".into(),
            announce: None,
        };
        let resp = anonymous.post(format!("{url}{}", paths::ENROLL)).json(&req).send().await?;
        anyhow::ensure!(resp.status().is_success(), "enroll: HTTP {}", resp.status());
        let enrolled: EnrollResponse = resp.json().await?;
        let tls =
            outpost_control::tls::client_config(&enrolled.ca_pem, Some((&enrolled.cert_pem, &key_pem)))?;
        let http =
            reqwest::Client::builder().use_preconfigured_tls(tls).timeout(Duration::from_secs(60)).build()?;
        nodes.push(Arc::new(SimNode {
            id: enrolled.node_id,
            http,
            base: url.clone(),
            report_seq: AtomicU64::new(0),
        }));
    }
    for node in &nodes {
        node.heartbeat().await?;
        tokio::spawn(Arc::clone(node).serve());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // (a) One deployment to every node, until the rollout is complete.
    let spec = serde_json::from_value(serde_json::json!({ "image": format!("sha256:{}", "ab".repeat(32)) }))?;
    let req = DeployRequest {
        name: "sim".into(),
        org_id: org.id.clone(),
        selector: "sim=yes".into(),
        service: None,
        spec,
        priority: 0,
        rollout: RolloutPolicy {
            batch,
            health_timeout_secs: 60,
            abort_on_failures: 1,
            max_unavailable: None,
        },
    };
    eprintln!("[sim] deploying to {n} nodes in batches of {batch}");
    let started = Instant::now();
    op.deploy(&org.id, &req).await?;
    let mut healthy_at: HashMap<String, f64> = HashMap::new();
    loop {
        let d = op.deployment(&org.id, "sim").await?;
        let t = started.elapsed().as_secs_f64() * 1000.0;
        for row in d.nodes.iter().filter(|r| r.phase == NodePhase::Healthy) {
            healthy_at.entry(row.node_id.clone()).or_insert(t);
        }
        if d.status == RolloutStatus::Complete && healthy_at.len() == n {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the deployment did not complete: {:?}",
            d.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deploy_total = started.elapsed().as_secs_f64() * 1000.0;
    let mut per_node: Vec<f64> = healthy_at.values().copied().collect();
    per_node.sort_by(f64::total_cmp);

    // (b) The same nodes, one job each, one at a time.
    eprintln!("[sim] dispatching {n} jobs one at a time");
    let job_spec: outpost_protocol::ContainerSpec = serde_json::from_value(
        serde_json::json!({ "image": format!("sha256:{}", "ab".repeat(32)), "command": ["true"] }),
    )?;
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(n);
    for node in &nodes {
        let t0 = Instant::now();
        let job = op.submit(&SubmitJobRequest::for_node(node.id.clone(), job_spec.clone())).await?;
        loop {
            if op.job(&job.job_id).await?.result.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        latencies.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    let jobs_total = started.elapsed().as_secs_f64() * 1000.0;
    latencies.sort_by(f64::total_cmp);

    let out = serde_json::json!({
        "nodes": n,
        "batch": batch.to_string(),
        "deploy_total_ms": deploy_total,
        "deploy_node_healthy_p50_ms": pct(&per_node, 50.0),
        "deploy_node_healthy_p99_ms": pct(&per_node, 99.0),
        "jobs_total_ms": jobs_total,
        "job_p50_ms": pct(&latencies, 50.0),
        "job_p99_ms": pct(&latencies, 99.0),
    });
    println!("{out}");
    Ok(())
}
