//! The control plane's Prometheus metrics: served on their own listener, in the text format
//! Prometheus reads, counting what happened, with no label that grows with the fleet.

use std::process::Command;

use outpost_control::testing::TestServer;
use outpost_protocol::Outcome;
use reqwest::StatusCode;

use crate::support::{TestNode, org_and_token, report_for, submit};

async fn scrape(server: &TestServer) -> String {
    // Plain HTTP, but reqwest still wants a TLS provider chosen.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let resp = reqwest::get(server.metrics_url()).await.expect("scraped");
    assert_eq!(resp.status(), StatusCode::OK);
    let kind = resp.headers()["content-type"].to_str().expect("ascii").to_owned();
    assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    resp.text().await.expect("body")
}

/// The value of the sample `series` (name and labels exactly as exposed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test]
async fn metrics_count_jobs_results_polls_and_requests() {
    let server = TestServer::start().await.expect("server");
    let op = server.operator().expect("operator");
    let (_, token) = org_and_token(&server).await;
    let node = TestNode::enroll(&server, &token).await;
    let job = submit(&op, node.id()).await;
    let polled = node.poll(&[], 0).await;
    let assignment = polled.jobs.iter().find(|a| a.job_id == job.job_id).expect("the job");
    let (status, body) = node.report(&report_for(assignment, Outcome::Succeeded)).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let text = scrape(&server).await;
    assert_eq!(sample(&text, "outpost_control_jobs_submitted_total"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "outpost_jobs_total{outcome=\"succeeded\"}"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "outpost_dispatch_seconds_count"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "outpost_control_nodes{state=\"online\"}"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "outpost_control_jobs{state=\"finished\"}"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "outpost_control_longpoll_connections"), Some(0.0), "{text}");
    let submits = "outpost_control_http_requests_total{route=\"/v1/jobs\",method=\"POST\",status=\"2xx\"}";
    assert_eq!(sample(&text, submits), Some(1.0), "{text}");
    assert!(text.contains("outpost_control_store_seconds_bucket{op=\"insert_job\""), "{text}");
    // Bounded cardinality: route templates, never a node id, job id or key.
    assert!(!text.contains(&job.job_id) && !text.contains(node.id()), "{text}");

    // A poll held open shows while it waits.
    let held = {
        let node = &node;
        async move { node.poll(&[&job.job_id], 2).await }
    };
    let watch = async {
        for _ in 0..40 {
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            if sample(&scrape(&server).await, "outpost_control_longpoll_connections") == Some(1.0) {
                return true;
            }
        }
        false
    };
    let (_, seen) = tokio::join!(held, watch);
    assert!(seen, "a held poll is counted while it waits");
    // Any method name reaches the counter before authentication: it is labelled `other`.
    let odd = reqwest::Method::from_bytes(b"FROBNICATE").expect("a method");
    let _ = crate::support::https(server.ca_pem(), None)
        .request(odd, format!("{}/v1/nodes", server.url()))
        .send()
        .await;
    let text = scrape(&server).await;
    assert!(!text.contains("FROBNICATE"), "{text}");
    assert!(text.contains("method=\"other\""), "{text}");
    promtool_accepts(&text);
}

/// `promtool check metrics` (Debian's `prometheus` package) reads the exposition as Prometheus
/// would, and lints names and help texts.
pub fn promtool_accepts(text: &str) {
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is not installed; scripts/test installs Debian's `prometheus` package"
        );
        eprintln!("SKIPPED the promtool check: promtool is not installed (Debian package `prometheus`)");
        return;
    };
    use std::io::Write as _;
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("written");
    let out = child.wait_with_output().expect("promtool ran");
    assert!(
        out.status.success(),
        "promtool check metrics refused the exposition:\n{}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
