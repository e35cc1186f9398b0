//! A real Garage stopped and resumed under the node: while the relay polls it (the relay
//! backs off, then carries on where it stopped, with no event lost or repeated) and while a
//! job's outputs are due to be uploaded (the agent retries; the result arrives once, with them).
//!
//! The test starts its own Garage in a temp dir with `scripts/s3-server start DIR` (so stopping
//! it disturbs no other suite) and needs the garage binary that `scripts/test` installs; like
//! the other s3 suites it fails, never skips, without it.

#![allow(clippy::expect_used, clippy::panic)]

mod common;
mod harness;
mod relay_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_node::objstore::ObjectStore;
use outpost_node::objstore::s3::{S3Credentials, S3Settings, S3Store};
use outpost_node::relay::{Relay, RelayConfig, Rules};
use outpost_node::store::StateStore;
use outpost_node::store::sled_store::SledStore;
use tokio_util::sync::CancellationToken;

/// A private Garage, stopped when dropped.
struct Garage {
    dir: PathBuf,
}

impl Garage {
    fn script() -> PathBuf {
        common::workspace_root().join("scripts/s3-server")
    }

    fn run(cmd: &str, dir: &Path) {
        let out = Command::new(Self::script()).arg(cmd).arg(dir).output().expect("run scripts/s3-server");
        assert!(
            out.status.success(),
            "scripts/s3-server {cmd} failed (is garage installed? scripts/test installs it): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start(dir: &Path) -> Self {
        if std::env::var_os("OUTPOST_TEST_S3_ENV").is_none() {
            panic!(
                "OUTPOST_TEST_S3_ENV is not set: the s3 fault tests need the garage binary that \
                 scripts/test installs (see scripts/s3-server)"
            );
        }
        Self::run("start", dir);
        Self { dir: dir.to_path_buf() }
    }

    fn stop(&self) {
        Self::run("stop", &self.dir);
    }

    fn resume(&self) {
        Self::run("resume", &self.dir);
    }

    /// The server's `s3.env`: endpoint, region, bucket and credentials file.
    fn env(&self) -> BTreeMap<String, String> {
        std::fs::read_to_string(self.dir.join("s3.env"))
            .expect("s3.env")
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn store(&self) -> S3Store {
        let env = self.env();
        let var = |k: &str| env.get(k).cloned().unwrap_or_else(|| panic!("{k} missing from s3.env"));
        S3Store::new(S3Settings {
            endpoint: var("OUTPOST_TEST_S3_ENDPOINT"),
            region: var("OUTPOST_TEST_S3_REGION"),
            bucket: var("OUTPOST_TEST_S3_BUCKET"),
            credentials: S3Credentials::from_file(var("OUTPOST_TEST_S3_CREDENTIALS_FILE").as_ref())
                .expect("credentials"),
        })
        .expect("s3 store")
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = Command::new(Self::script()).arg("stop").arg(&self.dir).output();
    }
}

async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garage_stopped_mid_poll_then_resumed_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let garage = Garage::start(&dir.path().join("garage"));
    let store = garage.store();
    let first: Vec<String> = (0..30).map(|i| format!("in/a-{i:03}.json")).collect();
    for k in &first {
        store.put(k, &br#"{"ok":true}"#[..]).await.expect("put");
    }

    let state: Arc<dyn StateStore> = Arc::new(SledStore::open(&dir.path().join("state")).expect("sled"));
    let cfg = RelayConfig {
        poll_interval_ms: 100,
        batch_size: 7,
        reconcile_every: 3,
        watches: vec![relay_support::watch(
            "in",
            "in/",
            Rules { json_well_formed: true, ..Rules::default() },
        )],
        ..RelayConfig::default()
    };
    let relay = Arc::new(Relay::new(store.clone(), state, cfg).expect("relay"));
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (relay, stop) = (Arc::clone(&relay), stop.clone());
        async move { relay.run(stop).await }
    });

    wait_for("the first events", Duration::from_secs(30), || relay.metrics().expect("metrics").last_seq > 0)
        .await;
    // Pull the server away while the relay is polling it.
    garage.stop();
    let at_stop = relay.metrics().expect("metrics").last_seq;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!run.is_finished(), "the relay must back off and keep running while the store is down");
    let during = relay.metrics().expect("metrics").last_seq;
    assert!(during <= first.len() as u64, "no events can appear from nowhere: {during}");

    garage.resume();
    let second: Vec<String> = (0..30).map(|i| format!("in/b-{i:03}.json")).collect();
    for k in &second {
        store.put(k, &br#"{"ok":true}"#[..]).await.expect("put after resume");
    }
    // One object lands behind the cursor while nobody looks: reconciliation must find it.
    store.put("in/a-000-late.json", &br#"{"late":true}"#[..]).await.expect("put late");
    let total = (first.len() + second.len() + 1) as u64;
    wait_for("every object evented", Duration::from_secs(60), || {
        relay.metrics().expect("metrics").last_seq >= total
    })
    .await;
    // A few more passes must not repeat anything.
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.cancel();
    run.await.expect("join").expect("relay run ends cleanly");

    let events = relay_support::pending(&relay);
    relay_support::assert_gapless(&events, 1);
    let mut keys = relay_support::keys(&events);
    keys.sort();
    let mut want: Vec<String> = first.iter().chain(second.iter()).cloned().collect();
    want.push("in/a-000-late.json".into());
    want.sort();
    assert_eq!(keys, want, "every object exactly once (stopped after seq {at_stop})");
    assert!(events.iter().all(|e| e.accepted && e.sha256.is_some()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garage_stopped_while_a_job_finishes_delays_its_upload_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let garage = Garage::start(&dir.path().join("garage"));
    let env = garage.env();
    let storage = format!(
        "[storage]\nbackend = \"s3\"\n[storage.s3]\nendpoint = \"{}\"\nregion = \"{}\"\nbucket = \"{}\"\n\
         credentials_file = \"{}\"\n",
        env["OUTPOST_TEST_S3_ENDPOINT"],
        env["OUTPOST_TEST_S3_REGION"],
        env["OUTPOST_TEST_S3_BUCKET"],
        env["OUTPOST_TEST_S3_CREDENTIALS_FILE"]
    );
    let control = harness::Control::start(&dir.path().join("control"), None);
    let org = control.create_org("s3-faults").await;
    let config = format!("[control]\npoll_wait_secs = 5\n[agent]\nheartbeat_secs = 2\n{storage}");
    let mut node = harness::Node::enroll(&dir.path().join("node"), &control, &org.id, &config).await;
    node.start();

    // The job writes its output, then lingers; the store goes away before it exits.
    let mut spec =
        harness::sh("echo report > /out/report.txt; mkdir -p /out/d; echo x > /out/d/x.txt; sleep 4");
    spec.output_prefix = Some("results/fault/".into());
    let job = control.submit(&node.node_id, spec).await;
    harness::eventually("the job running", Duration::from_secs(60), async || {
        control.job(&job.job_id).await.state == outpost_protocol::JobState::Accepted
    })
    .await;
    garage.stop();
    // The container exits while the store is down; the upload fails and is retried.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(control.job(&job.job_id).await.result.is_none(), "no result before the outputs are stored");
    assert!(node.log.contains("retrying"), "the agent says it is retrying");
    garage.resume();

    let result = control.wait_result(&job.job_id, Duration::from_secs(120)).await;
    assert_eq!(result.outcome, outpost_protocol::Outcome::Succeeded, "{result:?}");
    let keys: Vec<&str> = result.outputs.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(keys, ["results/fault/d/x.txt", "results/fault/report.txt"]);
    let store = garage.store();
    let meta = store.head("results/fault/report.txt").await.expect("the output is in the store");
    assert_eq!(meta.size, 7);
    assert!(result.outputs.iter().all(|o| o.body.is_none()), "no body leaves the site by default");
    assert_eq!(control.results_recorded(&job.job_id).await, 1);
    node.stop();
}
