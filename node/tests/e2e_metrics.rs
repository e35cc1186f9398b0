//! Both binaries' Prometheus metrics, scraped from real processes after a real job: every
//! metric the Grafana dashboard (docs/grafana/outpost.json) queries exists, `promtool check
//! metrics` accepts both expositions, and the agent's endpoint listens on loopback only.

#![allow(clippy::expect_used)]

mod common;
mod harness;

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

use harness::{Control, Node, eventually, sh};

const CONFIG: &str = "[control]\npoll_wait_secs = 5\n[agent]\nheartbeat_secs = 1\nshutdown_grace_secs = 3\n";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// `GET /metrics` over plain HTTP/1.0, the body.
fn scrape(addr: &str) -> String {
    let (head, body) = harness::scrape_metrics(addr);
    assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    body
}

/// Names of the samples an exposition holds (`name{labels} value` → `name`).
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_owned))
        .collect()
}

/// Every `outpost_…` metric name the dashboard's queries use.
fn dashboard_metrics() -> BTreeSet<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/grafana/outpost.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard")).expect("dashboard JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 20, "the dashboard has {} queries", exprs.len());
    let mut names = BTreeSet::new();
    for expr in exprs {
        let mut rest = expr.as_str();
        while let Some(at) = rest.find("outpost_") {
            let tail = &rest[at..];
            let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
            names.insert(tail[..end].to_owned());
            rest = &tail[end..];
        }
    }
    names
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

fn promtool_accepts(who: &str, text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is missing; scripts/test installs Debian's `prometheus`"
        );
        eprintln!(
            "SKIPPED the promtool check of {who}: promtool is not installed (Debian package `prometheus`)"
        );
        return;
    };
    use std::io::Write as _;
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("written");
    let out = child.wait_with_output().expect("promtool ran");
    assert!(
        out.status.success(),
        "promtool check metrics refused {who}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An address of this machine other than loopback, if it has one (no packet is sent).
fn outside_address() -> Option<std::net::IpAddr> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test(flavor = "multi_thread")]
async fn both_binaries_expose_every_metric_the_dashboard_queries() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let metrics_port = free_port();
    let control_metrics = format!("127.0.0.1:{metrics_port}");
    let control = Control::start_args(
        &harness::control_bin(),
        &tmp.path().join("control"),
        None,
        None,
        &["--metrics-listen", &control_metrics],
    );
    let org = control.create_org("metrics").await;
    let mut node = Node::enroll(&tmp.path().join("node"), &control, &org.id, CONFIG).await;
    node.start();
    let job = control.submit(&node.node_id, sh("echo measured")).await;
    let result = control.wait_result(&job.job_id, Duration::from_secs(90)).await;
    assert_eq!(result.outcome, outpost_protocol::Outcome::Succeeded, "{result:?}");

    let mut node_addr = String::new();
    eventually("the agent reports its metrics address", Duration::from_secs(30), async || {
        node_addr = node.status_json()["agent"]["metrics"].as_str().unwrap_or_default().to_owned();
        !node_addr.is_empty()
    })
    .await;
    assert!(node_addr.starts_with("127.0.0.1:"), "{node_addr}");
    // The result is delivered once the control plane acknowledged it.
    let delivered = "outpost_node_results_delivered_total{outcome=\"succeeded\"} 1";
    eventually("the node counts the delivered result", Duration::from_secs(30), async || {
        scrape(&node_addr).contains(delivered)
    })
    .await;

    let node_text = scrape(&node_addr);
    let control_text = scrape(&control_metrics);
    assert!(control_text.contains("outpost_jobs_total{outcome=\"succeeded\"} 1"), "{control_text}");
    assert!(node_text.contains("outpost_node_connected 1"), "{node_text}");
    assert!(
        !node_text.contains(&job.job_id) && !control_text.contains(&job.job_id),
        "no job id in any label"
    );
    assert!(!control_text.contains(&node.node_id), "no node id in the control plane's labels");

    let exposed: BTreeSet<String> =
        sample_names(&node_text).union(&sample_names(&control_text)).cloned().collect();
    let wanted = dashboard_metrics();
    let missing: Vec<&String> = wanted.iter().filter(|m| !exposed.contains(*m)).collect();
    assert!(missing.is_empty(), "the dashboard queries metrics neither binary exposes: {missing:?}");
    promtool_accepts("the agent", &node_text);
    promtool_accepts("the control plane", &control_text);

    // Loopback only: the agent's port is not open on the machine's other address.
    let port: u16 = node_addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
    match outside_address() {
        Some(ip) => {
            let outside = SocketAddr::new(ip, port);
            assert!(
                TcpStream::connect_timeout(&outside, Duration::from_secs(2)).is_err(),
                "the agent's metrics answer on {outside}"
            );
        }
        None => eprintln!("SKIPPED the outside-address check: this machine has no address but loopback"),
    }
    node.stop();
}
