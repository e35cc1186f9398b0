//! End to end for the relay: objects land in the node's local store (the fs adapter, the
//! embedded default), the agent's relay turns them into events, the uplink delivers them, and
//! the control plane stores each exactly once, in seq order — across a SIGKILL of the agent in
//! the middle of its work and a control plane that is down while events pile up.

#![allow(clippy::expect_used)]

mod common;
mod harness;

use std::collections::BTreeSet;
use std::time::Duration;

use harness::{Control, Node, eventually};
use outpost_node::objstore::ObjectStore;
use outpost_node::objstore::fs::FsStore;

const EVENTS_WAIT: Duration = Duration::from_secs(120);

fn config(batch_size: usize) -> String {
    format!(
        "[control]\npoll_wait_secs = 5\n[agent]\nheartbeat_secs = 2\nshutdown_grace_secs = 3\n\
         [relay]\npoll_interval_ms = 200\nbatch_size = {batch_size}\nreconcile_every = 5\n\
         [[relay.watches]]\nname = \"fhir\"\nprefix = \"incoming/\"\n\
         [relay.watches.rules]\njson_well_formed = true\nfhir_resource_types = [\"Patient\"]\n"
    )
}

async fn objects(node: &Node) -> FsStore {
    FsStore::open(node.dir.join("data/objects")).await.expect("the node's fs store")
}

/// What the node's status file says about its relay.
fn relay_status(node: &Node) -> Option<serde_json::Value> {
    let out = node.cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let r = v["agent"]["relay"].clone();
    (!r.is_null()).then_some(r)
}

#[tokio::test(flavor = "multi_thread")]
async fn events_survive_a_sigkill_mid_batch_and_are_stored_once_in_order() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let control = Control::start(&tmp.path().join("control"), None);
    let org = control.create_org("relay").await;
    let mut node = Node::enroll(&tmp.path().join("node"), &control, &org.id, &config(25)).await;

    // 600 objects wait before the agent starts; one in ten is FHIR of the wrong type.
    let store = objects(&node).await;
    let n = 600usize;
    for i in 0..n {
        let kind = if i % 10 == 3 { "Observation" } else { "Patient" };
        let body = format!("{{\"resourceType\":\"{kind}\",\"id\":\"{i}\"}}");
        store.put(&format!("incoming/p-{i:04}.json"), body.as_bytes()).await.expect("put");
    }

    node.start();
    // Kill the agent as soon as the first events reached the control plane: it is in the
    // middle of scanning pages and sending batches.
    eventually("the first events at the control plane", EVENTS_WAIT, async || {
        !control.events_page(&node.node_id, 0, 1).await.events.is_empty()
    })
    .await;
    node.kill9();
    let before = control.all_events(&node.node_id).await.len();
    assert!(before < n, "the kill came too late to be mid-batch ({before} of {n} already stored)");

    // More objects land while the agent is down, one of them overwriting an evented key.
    store.put("incoming/zz-late.json", br#"{"resourceType":"Patient"}"#.as_slice()).await.expect("put");
    store.put("incoming/p-0000.json", br#"{"resourceType":"Patient","v":2}"#.as_slice()).await.expect("put");
    node.start();
    let total = n + 2;
    eventually("every event stored", EVENTS_WAIT, async || {
        control.all_events(&node.node_id).await.len() >= total
    })
    .await;
    // Let a few more scans and a reconciliation run: nothing more may appear.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events = control.all_events(&node.node_id).await;
    assert_eq!(events.len(), total, "no event lost, none stored twice");
    let seqs: Vec<u64> = events.iter().map(|e| e.event.seq).collect();
    assert_eq!(seqs, (1..=total as u64).collect::<Vec<_>>(), "seq order with no gap");
    let keys: BTreeSet<&str> = events.iter().map(|e| e.event.key.as_str()).collect();
    assert_eq!(keys.len(), n + 1, "each key once, plus one event for the overwrite");
    let overwrite: Vec<_> = events.iter().filter(|e| e.event.key == "incoming/p-0000.json").collect();
    assert_eq!(overwrite.len(), 2);
    assert!(overwrite[1].event.replaces_etag.is_some(), "the second event names the replaced ETag");
    let rejected: Vec<_> = events.iter().filter(|e| !e.event.accepted).collect();
    assert_eq!(rejected.len(), n / 10);
    assert!(rejected.iter().all(|e| e.event.reason.as_deref().is_some_and(|r| r.contains("Observation"))));
    assert!(events.iter().all(|e| e.node_id == node.node_id && e.event.bucket == "local"));
    assert!(
        events.iter().filter(|e| e.event.accepted).all(|e| e
            .event
            .sha256
            .as_deref()
            .is_some_and(|h| h.len() == 64))
    );

    eventually("the outbox drained", Duration::from_secs(30), async || {
        relay_status(&node).is_some_and(|r| r["pending_depth"] == 0 && r["last_seq"] == total as u64)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn events_wait_in_the_outbox_while_the_control_plane_is_down() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut control = Control::start(&tmp.path().join("control"), None);
    let org = control.create_org("relay").await;
    let mut node = Node::enroll(&tmp.path().join("node"), &control, &org.id, &config(10)).await;
    let store = objects(&node).await;
    node.start();

    store.put("incoming/a.json", br#"{"resourceType":"Patient"}"#.as_slice()).await.expect("put");
    eventually("the first event stored", EVENTS_WAIT, async || {
        control.all_events(&node.node_id).await.len() == 1
    })
    .await;

    control.kill();
    for i in 0..25 {
        store
            .put(&format!("incoming/b-{i:02}.json"), br#"{"resourceType":"Patient"}"#.as_slice())
            .await
            .expect("put");
    }
    eventually("events waiting in the node's outbox", Duration::from_secs(60), async || {
        relay_status(&node).is_some_and(|r| r["pending_depth"] == 25)
    })
    .await;

    control.restart();
    eventually("the waiting events delivered", EVENTS_WAIT, async || {
        control.all_events(&node.node_id).await.len() == 26
    })
    .await;
    let events = control.all_events(&node.node_id).await;
    assert_eq!(events.iter().map(|e| e.event.seq).collect::<Vec<_>>(), (1..=26).collect::<Vec<_>>());
    eventually("the outbox drained", Duration::from_secs(30), async || {
        relay_status(&node).is_some_and(|r| r["pending_depth"] == 0)
    })
    .await;
}

/// sha256 of `body`, hex.
fn sha256_hex(body: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(body))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_org_trigger_runs_a_job_on_the_node_with_the_object_mounted_once_per_event() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let control = Control::start(&tmp.path().join("control"), None);
    let org = control.create_org("relay").await;
    let mut node = Node::enroll(&tmp.path().join("node"), &control, &org.id, &config(10)).await;
    let store = objects(&node).await;
    let trigger = control
        .create_trigger(&outpost_protocol::CreateTriggerRequest {
            org_id: org.id.clone(),
            name: "digest".into(),
            on: outpost_protocol::EventMatch {
                key_prefix: "incoming/".into(),
                key_suffix: Some(".json".into()),
                ..Default::default()
            },
            job: harness::sh("sha256sum \"/in/$OUTPOST_EVENT_KEY\"; echo \"seq=$OUTPOST_EVENT_SEQ\""),
            expires_in_secs: None,
        })
        .await;
    node.start();

    let body = br#"{"resourceType":"Patient","id":"t1"}"#;
    store.put("incoming/t1.json", body.as_slice()).await.expect("put");
    // A rejected object (wrong FHIR type) fires nothing: triggers take accepted objects only.
    store.put("incoming/t2.json", br#"{"resourceType":"Observation"}"#.as_slice()).await.expect("put");
    eventually("both events stored", EVENTS_WAIT, async || {
        control.all_events(&node.node_id).await.len() == 2
    })
    .await;
    // The control plane stores a batch, then fires its triggers, then acks: the events can be
    // listed before their jobs are recorded. The node's outbox empties on the ack (a status
    // that already counts both events, not one written before them).
    eventually("the batch acked", EVENTS_WAIT, async || {
        relay_status(&node).is_some_and(|r| r["pending_depth"] == 0 && r["last_seq"] == 2)
    })
    .await;
    let events = control.all_events(&node.node_id).await;
    assert_eq!(events[0].triggered_jobs.len(), 1, "one job for the accepted object");
    assert!(events[1].triggered_jobs.is_empty(), "none for the rejected one");
    let job_id = events[0].triggered_jobs[0].clone();
    let result = control.wait_result(&job_id, Duration::from_secs(90)).await;
    assert_eq!(result.outcome, outpost_protocol::Outcome::Succeeded, "{result:?}");
    assert!(
        result.stdout_tail.contains(&sha256_hex(body)),
        "the job read the object: {}",
        result.stdout_tail
    );
    assert!(result.stdout_tail.contains("seq=1"));
    let job = control.job(&job_id).await;
    assert_eq!(job.spec.container().expect("container").inputs, ["incoming/t1.json"]);
    assert!(!trigger.trigger_id.is_empty());

    // The agent restarts (events already delivered are not resent, new ones are): still one job.
    node.kill9();
    node.start();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fired: usize = control.all_events(&node.node_id).await.iter().map(|e| e.triggered_jobs.len()).sum();
    assert_eq!(fired, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_local_trigger_runs_the_job_without_the_control_plane_and_keeps_the_result_on_site() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut control = Control::start(&tmp.path().join("control"), None);
    let org = control.create_org("relay").await;
    let local = format!(
        "{}[[relay.triggers]]\nname = \"digest-local\"\nwatch = \"fhir\"\nkey_suffix = \".json\"\n\
         [relay.triggers.job]\nimage = \"{}\"\ncommand = [\"sh\", \"-c\", \"sha256sum /in/$OUTPOST_EVENT_KEY\"]\n",
        config(10),
        harness::test_image()
    );
    let mut node = Node::enroll(&tmp.path().join("node"), &control, &org.id, &local).await;
    let store = objects(&node).await;
    node.start();
    // No round trip: the control plane is gone before the objects land.
    control.kill();
    let bodies: Vec<Vec<u8>> =
        (0..3).map(|i| format!("{{\"resourceType\":\"Patient\",\"id\":\"{i}\"}}").into_bytes()).collect();
    for (i, b) in bodies.iter().enumerate() {
        store.put(&format!("incoming/l{i}.json"), b.as_slice()).await.expect("put");
    }
    eventually("three local results in the store", Duration::from_secs(120), async || {
        store.list("outpost-results/", None, 100).await.expect("list").objects.len() == 3
    })
    .await;
    // Kill the agent and start it again: no trigger fires twice.
    node.kill9();
    node.start();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let results = store.list("outpost-results/", None, 100).await.expect("list").objects;
    assert_eq!(results.len(), 3, "one result per event, no repeat after a restart");
    let mut seen = Vec::new();
    for r in &results {
        let mut body = Vec::new();
        let mut rd = store.get(&r.key).await.expect("get");
        tokio::io::AsyncReadExt::read_to_end(&mut rd, &mut body).await.expect("read");
        let doc: serde_json::Value = serde_json::from_slice(&body).expect("result JSON");
        assert_eq!(doc["trigger"], "digest-local");
        assert_eq!(doc["result"]["outcome"], "succeeded", "{doc}");
        seen.push(doc["result"]["stdout_tail"].as_str().expect("stdout").to_string());
    }
    for b in &bodies {
        assert!(seen.iter().any(|s| s.contains(&sha256_hex(b))), "a job read each object");
    }
    let audit = node.cli(&["status"]);
    assert!(audit.status.success());
    // The node audit log records each run (read with the agent stopped: it holds the ledger).
    node.stop();
    let out = node.cli(&["audit", "list", "--json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("trigger.local.result").count(), 3, "{text}");
    control.restart();
}
