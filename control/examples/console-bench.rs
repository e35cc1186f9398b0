//! Console pages with a large fleet, for `scripts/bench-console`: enrolls N nodes through the
//! real enrollment API (each with its own key and certificate), submits M jobs spread over
//! them, logs in to the console as a browser does, then times each page (and, as the floor on
//! the same server and connection, `GET /v1/health`) R times, one request at a time.
//!
//! Usage: console-bench --url URL --data-dir DIR [--nodes 10000] [--jobs 10000] [--rounds 20]
//!                      [--parallel 8]
//! Prints one JSON object on stdout; progress on stderr.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_control::client::Client;
use outpost_protocol::{EnrollRequest, EnrollResponse, SubmitJobRequest, paths};
use tokio::task::JoinSet;

/// Requests in flight while the fleet and its jobs are made (`--parallel`).
static PARALLEL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(8);

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn csr() -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(rcgen::DnType::CommonName, "console-bench");
    params.serialize_request(&key).expect("csr").pem().expect("pem")
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((p / 100.0) * (sorted.len() - 1) as f64).round() as usize]
}

/// Runs `n` tasks made by `make`, `PARALLEL` at a time; their results in completion order.
async fn parallel<T, F, Fut>(n: usize, make: F) -> anyhow::Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let mut set = JoinSet::new();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        if set.len() >= PARALLEL.load(std::sync::atomic::Ordering::Relaxed) {
            out.push(set.join_next().await.expect("a task")??);
        }
        set.spawn(make(i));
        if (i + 1) % 1000 == 0 {
            eprintln!("[console-bench] {}/{n}", i + 1);
        }
    }
    while let Some(r) = set.join_next().await {
        out.push(r??);
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let url = arg(&args, "--url").ok_or_else(|| anyhow::anyhow!("--url URL is required"))?;
    let dir = std::path::PathBuf::from(
        arg(&args, "--data-dir").ok_or_else(|| anyhow::anyhow!("--data-dir DIR is required"))?,
    );
    let nodes: usize = arg(&args, "--nodes").map_or(Ok(10_000), |v| v.parse())?;
    let jobs: usize = arg(&args, "--jobs").map_or(Ok(10_000), |v| v.parse())?;
    let rounds: usize = arg(&args, "--rounds").map_or(Ok(20), |v| v.parse())?;
    let parallel_requests: usize = arg(&args, "--parallel").map_or(Ok(8), |v| v.parse())?;
    PARALLEL.store(parallel_requests.max(1), std::sync::atomic::Ordering::Relaxed);
    anyhow::ensure!(nodes >= 1 && rounds >= 1, "--nodes and --rounds must be at least 1");
    let ca_pem = std::fs::read_to_string(dir.join("ca.crt"))?;
    let admin = std::fs::read_to_string(dir.join("admin.token"))?.trim().to_owned();
    let op = Arc::new(Client::new(&url, &ca_pem, &admin)?);
    let org = op.create_org("console-bench").await?;
    let tls = || outpost_control::tls::client_config(&ca_pem, None);
    let anonymous = reqwest::Client::builder().use_preconfigured_tls(tls()?).build()?;

    eprintln!("[console-bench] enrolling {nodes} nodes");
    let started = Instant::now();
    let node_ids = parallel(nodes, |i| {
        let (op, anonymous, url, org_id) = (Arc::clone(&op), anonymous.clone(), url.clone(), org.id.clone());
        async move {
            let token = op.create_token(&org_id, None).await?;
            let req = EnrollRequest {
                token: token.token,
                csr_pem: csr(),
                hostname: format!("ward-{i}"),
                agent_version: "console-bench".into(),
                announce: None,
            };
            let resp = anonymous.post(format!("{url}{}", paths::ENROLL)).json(&req).send().await?;
            anyhow::ensure!(resp.status().is_success(), "enroll: HTTP {}", resp.status());
            Ok(resp.json::<EnrollResponse>().await?.node_id)
        }
    })
    .await?;
    let enroll_s = started.elapsed().as_secs_f64();

    eprintln!("[console-bench] submitting {jobs} jobs");
    let node_ids = Arc::new(node_ids);
    let spec: outpost_protocol::ContainerSpec = serde_json::from_value(serde_json::json!({
        "image": format!("sha256:{}", "ab".repeat(32)),
        "command": ["true"],
    }))?;
    let started = Instant::now();
    let job_ids = parallel(jobs, |i| {
        let (op, node_ids, spec) = (Arc::clone(&op), Arc::clone(&node_ids), spec.clone());
        async move {
            let node = &node_ids[i % node_ids.len()];
            Ok(op.submit(&SubmitJobRequest::for_node(node.clone(), spec)).await?.job_id)
        }
    })
    .await?;
    let submit_s = started.elapsed().as_secs_f64();

    // Logged in as a browser is: the login form's nonce (cookie and field), then the token.
    let browser = reqwest::Client::builder()
        .use_preconfigured_tls(tls()?)
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let form = browser.get(format!("{url}/console/login")).send().await?;
    let nonce_cookie =
        form.headers()["set-cookie"].to_str()?.split(';').next().unwrap_or_default().to_owned();
    let page = form.text().await?;
    let nonce = page
        .split("name=\"nonce\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .ok_or_else(|| anyhow::anyhow!("no nonce in the login form"))?
        .to_owned();
    let login = browser
        .post(format!("{url}/console/login"))
        .header("cookie", nonce_cookie)
        .form(&[("nonce", nonce.as_str()), ("token", admin.as_str())])
        .send()
        .await?;
    let session = login
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("outpost_session="))
        .and_then(|c| c.split(';').next())
        .ok_or_else(|| anyhow::anyhow!("the login gave no session cookie"))?
        .to_owned();

    let last_page = nodes.saturating_sub(1) / outpost_control::console::PAGE;
    let pages: Vec<(&str, String)> = vec![
        ("GET /v1/health (floor)", paths::HEALTH.to_owned()),
        ("overview", "/console".into()),
        ("nodes, first page", "/console/nodes".into()),
        ("nodes, last page", format!("/console/nodes?page={last_page}")),
        ("a node", format!("/console/nodes/{}", node_ids[node_ids.len() / 2])),
        ("jobs, first page", "/console/jobs".into()),
        ("jobs of one node", format!("/console/jobs?node={}", node_ids[node_ids.len() / 3])),
        ("jobs finished (none yet)", "/console/jobs?state=finished".into()),
        ("a job", format!("/console/jobs/{}", job_ids.get(job_ids.len() / 2).cloned().unwrap_or_default())),
        ("audit", "/console/audit".into()),
        ("settings", format!("/console/settings?org={}", org.id)),
        ("GET /v1/nodes (API, all)", paths::NODES.to_owned()),
    ];
    let mut rows = Vec::new();
    for (name, path) in &pages {
        let mut ms = Vec::with_capacity(rounds);
        let mut bytes = 0;
        for _ in 0..=rounds {
            let t = Instant::now();
            let resp = browser
                .get(format!("{url}{path}"))
                .header("cookie", &session)
                .bearer_auth(&admin)
                .timeout(Duration::from_secs(120))
                .send()
                .await?;
            let status = resp.status();
            let body = resp.bytes().await?;
            anyhow::ensure!(status.is_success(), "{path}: HTTP {status}");
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
            bytes = body.len();
        }
        ms.remove(0); // the first request warms caches and the connection
        ms.sort_by(f64::total_cmp);
        eprintln!("[console-bench] {name}: p50 {:.1} ms", pct(&ms, 50.0));
        rows.push(serde_json::json!({
            "page": name, "path": path, "p50_ms": pct(&ms, 50.0), "p95_ms": pct(&ms, 95.0), "bytes": bytes,
        }));
    }
    println!(
        "{}",
        serde_json::json!({
            "nodes": nodes, "jobs": jobs, "rounds": rounds,
            "enroll_per_s": nodes as f64 / enroll_s, "submit_per_s": jobs as f64 / submit_s,
            "pages": rows,
        })
    );
    Ok(())
}
