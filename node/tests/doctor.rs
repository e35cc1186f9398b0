//! `outpost doctor` against a real control plane, the real Docker engine and a real object
//! store: a healthy node passes, and each broken part is named with a fix — the engine down, an
//! unwritable store, a control plane whose CA is not the pinned one, a revoked node, a clock far
//! off and an expired certificate (the clock moved with libfaketime, as a wrong clock would be).

#![allow(clippy::expect_used)]

mod common;
mod harness;

use std::path::{Path, PathBuf};
use std::process::Command;

use harness::{Control, Node};
use serde_json::Value;

/// `outpost doctor --json` for `node`, with `env` added; the exit code and the report.
fn doctor(node: &Node, env: &[(&str, String)]) -> (i32, Value) {
    let out = Command::new(harness::node_bin())
        .arg("--config")
        .arg(&node.config)
        .args(["doctor", "--json"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("outpost doctor runs");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json prints JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().expect("exit code"), report)
}

/// The named check: (verdict, detail, fix).
fn check(report: &Value, name: &str) -> (String, String, String) {
    let c = report["checks"].as_array().expect("checks").iter().find(|c| c["name"] == name).expect(name);
    let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
    (s("verdict"), s("detail"), s("fix"))
}

async fn site(tmp: &Path, extra: &str) -> (Control, Node) {
    let control = Control::start(&tmp.join("control"), None);
    let org = control.create_org("doctor").await;
    let node = Node::enroll(&tmp.join("node"), &control, &org.id, extra).await;
    (control, node)
}

fn libfaketime() -> Option<PathBuf> {
    let found =
        ["/usr/lib/x86_64-linux-gnu/faketime", "/usr/lib/aarch64-linux-gnu/faketime", "/usr/lib/faketime"]
            .iter()
            .map(|d| Path::new(d).join("libfaketime.so.1"))
            .find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "libfaketime is missing; scripts/test installs Debian's `libfaketime`"
        );
        eprintln!("SKIPPED: libfaketime is not installed (Debian package `libfaketime`)");
    }
    found
}

fn shifted(lib: &Path, by: &str) -> Vec<(&'static str, String)> {
    vec![
        ("LD_PRELOAD", lib.display().to_string()),
        ("FAKETIME", by.to_owned()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_healthy_node_passes_and_says_what_it_found() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_control, node) = site(tmp.path(), "").await;
    let (code, report) = doctor(&node, &[]);
    for name in ["config", "identity", "control", "clock", "disk", "object_store", "models"] {
        assert_eq!(check(&report, name).0, "ok", "{name}: {report:#}");
    }
    // A 30-day certificate, renewed by the agent two thirds in.
    let identity = check(&report, "identity").1;
    let days = |d: [&str; 2]| d.iter().any(|d| identity.contains(d));
    assert!(days(["expires in 29 days", "expires in 30 days"]), "{identity}");
    assert!(days(["renews it in 19 days", "renews it in 20 days"]), "{identity}");
    assert!(check(&report, "control").1.contains("pinned CA"), "{report:#}");
    let (docker, detail, _) = check(&report, "docker");
    assert_ne!(docker, "fail", "{report:#}");
    assert!(detail.contains("storage driver") && detail.contains("cgroup"), "{detail}");
    assert_eq!(check(&report, "hardening").0, "warn", "the agent is not running");
    assert_eq!((code, report["ok"].as_bool()), (0, Some(true)), "{report:#}");

    // The human form: one line per check with its mark, fixes under warnings.
    let out = node.cli(&["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.starts_with("✔ identity")), "{text}");
    assert!(text.contains("fix: start it"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_engine_down_and_an_unwritable_store_are_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let blocker = tmp.path().join("not-a-dir");
    std::fs::write(&blocker, "a file where the store's directory should be").expect("file");
    let extra = format!(
        "[docker]\nsocket = \"{}\"\n[storage.fs]\nroot = \"{}\"\n",
        tmp.path().join("no-such-docker.sock").display(),
        blocker.join("objects").display()
    );
    let (_control, node) = site(tmp.path(), &extra).await;
    let (code, report) = doctor(&node, &[]);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["ok"], false);
    let (verdict, detail, fix) = check(&report, "docker");
    assert_eq!(verdict, "fail", "{report:#}");
    assert!(detail.contains("no-such-docker.sock"), "{detail}");
    assert!(fix.contains("[docker] socket"), "{fix}");
    let (verdict, detail, fix) = check(&report, "object_store");
    assert_eq!(verdict, "fail", "{report:#}");
    assert!(detail.contains("not-a-dir"), "{detail}");
    assert!(fix.contains("[storage]"), "{fix}");
    assert_eq!(check(&report, "control").0, "ok", "the rest is still checked");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_control_plane_with_another_ca_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_control, node) = site(tmp.path(), "").await;
    // Another control plane's CA where the pinned one was: the real server no longer verifies.
    let other = Control::start(&tmp.path().join("other"), None);
    let pinned = node.dir.join("data/identity/ca.crt");
    std::fs::copy(other.dir.join("ca.crt"), &pinned).expect("CA replaced");
    let (code, report) = doctor(&node, &[]);
    assert_eq!(code, 1, "{report:#}");
    let (verdict, detail, fix) = check(&report, "control");
    assert_eq!(verdict, "fail", "{report:#}");
    assert!(detail.contains("cannot be reached over TLS"), "{detail}");
    assert!(fix.contains("CA pinned at enrollment"), "{fix}");
    assert_eq!(check(&report, "clock").0, "warn", "not checked without an answer");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_node_is_told_to_enroll_again() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (control, node) = site(tmp.path(), "").await;
    let out = control.cli(&["node", "revoke", &node.node_id]);
    assert!(out.status.success(), "revoke: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("revoked"));
    let (code, report) = doctor(&node, &[]);
    assert_eq!(code, 1, "{report:#}");
    let (verdict, detail, fix) = check(&report, "control");
    assert_eq!(verdict, "fail", "{report:#}");
    assert!(detail.contains("CertificateRevoked"), "{detail}");
    assert!(fix.contains("revoked this node") && fix.contains("new enrollment token"), "{fix}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clock_far_off_and_an_expired_certificate_fail() {
    let Some(lib) = libfaketime() else { return };
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_control, node) = site(tmp.path(), "").await;

    let (code, report) = doctor(&node, &shifted(&lib, "+10m"));
    assert_eq!(code, 1, "{report:#}");
    let (verdict, detail, fix) = check(&report, "clock");
    assert_eq!(verdict, "fail", "{report:#}");
    assert!(detail.contains("ahead of the control plane's"), "{detail}");
    assert!(detail.starts_with("this clock is 6") || detail.starts_with("this clock is 5"), "{detail}");
    assert!(fix.contains("chrony"), "{fix}");
    assert_eq!(check(&report, "identity").0, "ok");

    // 25 days on, the agent (not running here) should have renewed the 30-day certificate.
    let (_, report) = doctor(&node, &shifted(&lib, "+25d"));
    let (verdict, detail, fix) = check(&report, "identity");
    assert_eq!(verdict, "warn", "{report:#}");
    assert!(detail.contains("expires in 4 days") || detail.contains("expires in 5 days"), "{detail}");
    assert!(detail.contains("overdue for renewal"), "{detail}");
    assert!(fix.contains("outpost identity rotate"), "{fix}");

    // Later still, the node's certificate has expired.
    let (code, report) = doctor(&node, &shifted(&lib, "+40d"));
    assert_eq!(code, 1, "{report:#}");
    let (verdict, detail, fix) = check(&report, "identity");
    assert_eq!(verdict, "fail", "{report:#}");
    assert!(detail.contains("expired"), "{detail}");
    assert!(fix.contains("enroll again"), "{fix}");

    // A skew under the warning threshold passes.
    let (_, report) = doctor(&node, &shifted(&lib, "+5s"));
    assert_eq!(check(&report, "clock").0, "ok", "{report:#}");
}

/// The control plane's `/v1/health` requests so far, from its metrics.
fn health_requests(metrics: &str) -> f64 {
    harness::scrape_metrics(metrics)
        .1
        .lines()
        .filter(|l| l.starts_with("outpost_control_http_requests_total{route=\"/v1/health\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_air_gapped_node_is_not_dialled_by_its_doctor() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let metrics = format!("127.0.0.1:{port}");
    let control = Control::start_args(
        &harness::control_bin(),
        &tmp.path().join("control"),
        None,
        None,
        &["--metrics-listen", &metrics],
    );
    let org = control.create_org("doctor").await;
    let online = Node::enroll(&tmp.path().join("online"), &control, &org.id, "").await;
    let gapped =
        Node::enroll(&tmp.path().join("gapped"), &control, &org.id, "[control]\nuplink = false\n").await;

    // The doctor of a connected node does ask: the count moves, so it would show a dial.
    let before = health_requests(&metrics);
    doctor(&online, &[]);
    let asked = health_requests(&metrics);
    assert!(asked > before, "{before} -> {asked}");

    let (_, report) = doctor(&gapped, &[]);
    let (verdict, detail, _) = check(&report, "control");
    assert_eq!(verdict, "ok", "{report:#}");
    assert!(detail.contains("uplink = false"), "{detail}");
    assert_eq!(check(&report, "clock").0, "ok", "{report:#}");
    assert_eq!(
        health_requests(&metrics),
        asked,
        "the control plane heard nothing from the air-gapped doctor"
    );
}
