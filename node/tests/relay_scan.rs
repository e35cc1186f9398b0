//! The relay over a real fs object store: what becomes an event, exactly once and in order,
//! what is rejected and why, and how the outbox bound stops scanning.

#![allow(clippy::expect_used)]

mod relay_support;

use std::sync::Arc;

use outpost_node::objstore::ObjectStore;
use outpost_node::relay::{RelayConfig, Rules};
use outpost_node::store::memory::MemoryStore;
use outpost_node::store::sled_store::SledStore;
use outpost_node::store::{StateStore, Tree};
use relay_support::*;

const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn memory() -> Arc<dyn StateStore> {
    Arc::new(MemoryStore::new())
}

#[tokio::test]
async fn new_objects_become_ordered_events_and_a_rerun_finds_nothing_new() {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = fs_store(&dir).await;
    for k in ["in/c", "in/a", "in/b/1", "elsewhere/x", "in"] {
        put(&objects, k, k.as_bytes()).await;
    }
    let relay = relay(&objects, memory(), config(vec![watch("w", "in/", Rules::default())]));
    let report = relay.scan_pass().await.expect("scan");
    assert_eq!((report.events, report.accepted, report.rejected), (3, 3, 0));
    let events = pending(&relay);
    assert_eq!(keys(&events), ["in/a", "in/b/1", "in/c"], "listing order, prefix only");
    assert_gapless(&events, 1);
    for e in &events {
        assert!(e.accepted && e.reason.is_none());
        assert_eq!(e.watch, "w");
        assert_eq!(e.size, e.key.len() as u64);
        assert_eq!(e.sha256.as_deref(), Some(e.etag.as_str()), "the fs adapter's ETag is the SHA-256");
        assert_eq!(e.replaces_etag, None);
    }

    let again = relay.scan_pass().await.expect("rescan");
    assert_eq!(again.events, 0);
    assert_eq!(relay.reconcile_pass().await.expect("reconcile").events, 0, "nothing behind the cursor");
    assert_eq!(pending(&relay), events);
    let m = relay.metrics().expect("metrics");
    assert_eq!(
        (m.objects_seen, m.objects_accepted, m.objects_rejected, m.pending_depth, m.last_seq),
        (3, 3, 0, 3, 3)
    );
}

#[tokio::test]
async fn an_object_landing_behind_the_cursor_is_found_by_reconciliation_exactly_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = fs_store(&dir).await;
    put(&objects, "in/m", b"m").await;
    put(&objects, "in/z", b"z").await;
    let relay = relay(&objects, memory(), config(vec![watch("w", "in/", Rules::default())]));
    relay.scan_pass().await.expect("scan");
    put(&objects, "in/a-late", b"late").await;
    assert_eq!(relay.scan_pass().await.expect("scan").events, 0, "behind the cursor: the scan cannot see it");
    assert_eq!(relay.reconcile_pass().await.expect("reconcile").events, 1);
    assert_eq!(relay.reconcile_pass().await.expect("reconcile").events, 0, "and only once");
    assert_eq!(relay.scan_pass().await.expect("scan").events, 0);
    let events = pending(&relay);
    assert_eq!(keys(&events), ["in/m", "in/z", "in/a-late"]);
    assert_gapless(&events, 1);
}

#[tokio::test]
async fn an_overwritten_key_yields_one_new_event_naming_the_etag_it_replaces() {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = fs_store(&dir).await;
    let first = put(&objects, "in/a", b"one").await;
    put(&objects, "in/b", b"b").await;
    let relay = relay(&objects, memory(), config(vec![watch("w", "in/", Rules::default())]));
    relay.scan_pass().await.expect("scan");
    let second = put(&objects, "in/a", b"two").await;
    put(&objects, "in/b", b"b").await; // same bytes, same ETag: not a change
    assert_eq!(relay.scan_pass().await.expect("scan").events, 0);
    assert_eq!(relay.reconcile_pass().await.expect("reconcile").events, 1);
    assert_eq!(relay.reconcile_pass().await.expect("reconcile").events, 0);
    let events = pending(&relay);
    let last = events.last().expect("overwrite event");
    assert_eq!((last.seq, last.key.as_str(), last.etag.as_str()), (3, "in/a", second.as_str()));
    assert_eq!(last.replaces_etag.as_deref(), Some(first.as_str()));
}

#[tokio::test]
async fn deleted_keys_leave_the_index_and_a_key_that_returns_is_new_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = fs_store(&dir).await;
    for k in ["in/a", "in/b", "in/c"] {
        put(&objects, k, b"x").await;
    }
    let state = memory();
    let relay = relay(&objects, state.clone(), config(vec![watch("w", "in/", Rules::default())]));
    relay.scan_pass().await.expect("scan");
    let indexed = |state: &Arc<dyn StateStore>| -> Vec<String> {
        let mut out = Vec::new();
        for (k, _) in state.scan(Tree::Relay).expect("scan") {
            if let Some(rest) = k.strip_prefix(b"i/w/") {
                out.push(String::from_utf8(rest.to_vec()).expect("utf-8"));
            }
        }
        out
    };
    assert_eq!(indexed(&state), ["in/a", "in/b", "in/c"]);
    objects.delete("in/b").await.expect("delete");
    objects.delete("in/c").await.expect("delete");
    assert_eq!(relay.reconcile_pass().await.expect("reconcile").events, 0, "a deletion is not an event");
    assert_eq!(indexed(&state), ["in/a"], "the index holds only what exists");
    put(&objects, "in/b", b"x").await;
    assert_eq!(relay.reconcile_pass().await.expect("reconcile").events, 1);
    let last = pending(&relay).pop().expect("event");
    assert_eq!((last.key.as_str(), last.replaces_etag.as_deref()), ("in/b", None));
}

#[tokio::test]
async fn rejected_objects_become_events_with_their_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = fs_store(&dir).await;
    let fhir = Rules {
        max_size_bytes: Some(100),
        allowed_suffixes: vec![".json".into()],
        allowed_content_types: Some(vec!["application/json".into()]),
        json_well_formed: true,
        fhir_resource_types: Some(vec!["Patient".into()]),
        json_schema: None,
    };
    let json = Rules { json_well_formed: true, ..Rules::default() };
    let mut cfg = config(vec![watch("fhir", "fhir/", fhir), watch("json", "json/", json)]);
    cfg.json_check_cap_bytes = 64;
    put(&objects, "fhir/1-ok.json", br#"{"resourceType":"Patient","id":"p1"}"#).await;
    put(&objects, "fhir/2-big.json", &[b' '; 101]).await;
    put(&objects, "fhir/3-table.csv", b"a,b").await;
    put(&objects, "fhir/4-broken.json", br#"{"resourceType":"Patient""#).await;
    put(&objects, "fhir/5-obs.json", br#"{"resourceType":"Observation"}"#).await;
    put(&objects, "json/over-cap", format!("[{}]", "1,".repeat(40) + "1").as_bytes()).await;
    put(&objects, "json/zero", b"").await;
    let relay = relay(&objects, memory(), cfg);
    let report = relay.scan_pass().await.expect("scan");
    assert_eq!((report.events, report.accepted, report.rejected), (7, 1, 6));
    let events = pending(&relay);
    let reason = |key: &str| -> String {
        let e = events.iter().find(|e| e.key == key).expect("event for key");
        assert!(!e.accepted, "{key} should be rejected");
        e.reason.clone().expect("a rejection has a reason")
    };
    assert!(events[0].accepted && events[0].key == "fhir/1-ok.json");
    assert_eq!(events[0].content_type.as_deref(), Some("application/json"));
    assert!(reason("fhir/2-big.json").contains("101 bytes, over this watch's max_size_bytes of 100"));
    assert!(reason("fhir/3-table.csv").contains("allowed suffix"));
    assert!(reason("fhir/4-broken.json").starts_with("not well-formed JSON"));
    assert_eq!(
        reason("fhir/5-obs.json"),
        r#"FHIR resourceType "Observation" is not allowed (allowed: Patient)"#
    );
    assert!(reason("json/over-cap").contains("json_check_cap_bytes"));
    assert!(reason("json/zero").starts_with("not well-formed JSON"), "an empty body is not JSON");
    let big = events.iter().find(|e| e.key == "fhir/2-big.json").expect("big");
    assert_eq!(big.sha256, None, "refused on its size: the body was never read");
    let m = relay.metrics().expect("metrics");
    assert_eq!((m.objects_seen, m.objects_accepted, m.objects_rejected), (7, 1, 6));
}

#[tokio::test]
async fn hostile_keys_and_zero_byte_objects_are_evented_byte_for_byte() {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = fs_store(&dir).await;
    let long = format!("in/{}", "é".repeat(510)) + "x"; // 3 + 1,020 + 1 = 1,024 bytes
    assert_eq!(long.len(), 1024);
    let hostile = ["in/a b", "in/ü/../x", "in/./dot", "in//double", "in/a\\b", "in/%41?#&"];
    for k in hostile {
        put(&objects, k, k.as_bytes()).await;
    }
    put(&objects, &long, b"long").await;
    put(&objects, "in/zero", b"").await;
    let state: Arc<dyn StateStore> =
        Arc::new(SledStore::open(&dir.path().join("state")).expect("sled state"));
    let relay = relay(&objects, state, config(vec![watch("w", "in/", Rules::default())]));
    assert_eq!(relay.scan_pass().await.expect("scan").events, 8);
    let events = pending(&relay);
    let mut want: Vec<String> = hostile.iter().map(|s| s.to_string()).collect();
    want.push(long.clone());
    want.push("in/zero".into());
    want.sort();
    assert_eq!(keys(&events), want, "keys come back exactly, in byte order");
    let zero = events.iter().find(|e| e.key == "in/zero").expect("zero-byte event");
    assert_eq!((zero.size, zero.sha256.as_deref(), zero.accepted), (0, Some(EMPTY_SHA256), true));
    assert_eq!(relay.scan_pass().await.expect("scan").events, 0);
    assert_eq!(
        relay.reconcile_pass().await.expect("reconcile").events,
        0,
        "the index matches hostile keys too"
    );
}

#[tokio::test]
async fn scanning_stops_at_the_outbox_bound_and_resumes_as_events_are_sent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = fs_store(&dir).await;
    let all: Vec<String> = (0..12).map(|i| format!("in/{i:02}")).collect();
    put_many(&objects, &all).await;
    let cfg =
        RelayConfig { batch_size: 3, outbox_bound: 5, ..config(vec![watch("w", "in/", Rules::default())]) };
    let now = Arc::new(std::sync::atomic::AtomicU64::new(1_000));
    let clock = now.clone();
    let relay =
        relay(&objects, memory(), cfg).with_clock(move || clock.load(std::sync::atomic::Ordering::SeqCst));

    let first = relay.scan_pass().await.expect("scan");
    assert_eq!((first.events, first.backpressure), (5, true), "never more than the bound pending");
    now.store(1_750, std::sync::atomic::Ordering::SeqCst);
    let m = relay.metrics().expect("metrics");
    assert_eq!((m.pending_depth, m.backpressure, m.lag_ms), (5, true, Some(750)));
    let stalled = relay.scan_pass().await.expect("scan");
    assert_eq!(
        (stalled.events, stalled.backpressure, stalled.list_calls),
        (0, true, 0),
        "no listing while full"
    );

    let mut sent = Vec::new();
    while sent.len() < all.len() {
        let batch = relay.pending_events(2).expect("pending");
        assert!(!batch.is_empty(), "events pending");
        let up_to = batch.last().expect("last").seq;
        assert_eq!(relay.mark_sent(up_to).expect("sent"), batch.len());
        assert_eq!(relay.mark_sent(up_to).expect("sent again"), 0, "idempotent");
        sent.extend(batch);
        let r = relay.scan_pass().await.expect("scan");
        assert!(relay.metrics().expect("metrics").pending_depth <= 5, "bound holds: {r:?}");
    }
    assert_eq!(keys(&sent), all, "every object once, in order");
    assert_gapless(&sent, 1);
    let m = relay.metrics().expect("metrics");
    assert_eq!((m.pending_depth, m.lag_ms, m.backpressure), (0, None, false));
}

#[tokio::test]
async fn a_watch_whose_prefix_changes_starts_over_from_its_new_prefix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = fs_store(&dir).await;
    put(&objects, "a/1", b"1").await;
    put(&objects, "b/1", b"1").await;
    let state = memory();
    let first = relay(&objects, state.clone(), config(vec![watch("w", "b/", Rules::default())]));
    first.scan_pass().await.expect("scan");
    let second = relay(&objects, state, config(vec![watch("w", "a/", Rules::default())]));
    assert_eq!(second.scan_pass().await.expect("scan").events, 1, "a/1 sorts before the old cursor b/1");
    assert_eq!(keys(&pending(&second)), ["b/1", "a/1"]);
    assert_eq!(second.reconcile_pass().await.expect("reconcile").events, 0);
}

#[tokio::test]
async fn the_run_loop_events_objects_until_shut_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = fs_store(&dir).await;
    let cfg = RelayConfig { poll_interval_ms: 20, ..config(vec![watch("w", "in/", Rules::default())]) };
    let relay = Arc::new(relay(&objects, memory(), cfg));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn({
        let (relay, shutdown) = (relay.clone(), shutdown.clone());
        async move { relay.run(shutdown).await }
    });
    put(&objects, "in/x", b"x").await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while pending(&relay).is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the loop never evented in/x");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    task.await.expect("join").expect("a clean stop");
    assert_eq!(keys(&pending(&relay)), ["in/x"]);
}

#[tokio::test]
async fn a_key_landing_behind_the_cursor_during_activity_is_found_within_a_few_scans() {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = fs_store(&dir).await;
    // Periodic reconciliation practically off: only the activity rule can find in/a.
    let cfg = RelayConfig {
        poll_interval_ms: 20,
        reconcile_every: 100_000,
        reconcile_after_activity: 2,
        ..config(vec![watch("w", "in/", Rules::default())])
    };
    let relay = Arc::new(relay(&objects, memory(), cfg));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn({
        let (relay, shutdown) = (relay.clone(), shutdown.clone());
        async move { relay.run(shutdown).await }
    });
    let wait_for = async |n: usize, what: &str| {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while pending(&relay).len() < n {
            assert!(tokio::time::Instant::now() < deadline, "never evented {what}");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    put(&objects, "in/b", b"b").await;
    wait_for(1, "in/b").await;
    // Lands after the cursor moved past it, as with several puts in flight.
    put(&objects, "in/a", b"a").await;
    wait_for(2, "in/a (behind the cursor)").await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    shutdown.cancel();
    task.await.expect("join").expect("a clean stop");
    assert_eq!(keys(&pending(&relay)), ["in/b", "in/a"], "each once");
}

#[tokio::test]
async fn a_json_schema_rule_rejects_objects_that_do_not_match_naming_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = fs_store(&dir).await;
    let schema = dir.path().join("patient.schema.json");
    std::fs::write(
        &schema,
        r#"{"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
            "required": ["resourceType", "id"],
            "properties": {"id": {"type": "string"}, "birthDate": {"type": "string", "pattern": "^[0-9]{4}-"}}}"#,
    )
    .expect("write schema");
    let rules = Rules { json_schema: Some(schema), ..Rules::default() };
    put(&objects, "in/1-ok.json", br#"{"resourceType":"Patient","id":"p1","birthDate":"1970-01-01"}"#).await;
    put(&objects, "in/2-bad.json", br#"{"resourceType":"Patient","id":12,"birthDate":"01/01/1970"}"#).await;
    put(&objects, "in/3-text.json", b"not json").await;
    let relay = relay(&objects, memory(), config(vec![watch("w", "in/", rules)]));
    let report = relay.scan_pass().await.expect("scan");
    assert_eq!((report.accepted, report.rejected), (1, 2));
    let events = pending(&relay);
    assert!(events[0].accepted, "{:?}", events[0].reason);
    let bad = events[1].reason.clone().expect("rejected");
    assert!(bad.starts_with("does not match the watch's JSON Schema"), "{bad}");
    assert!(bad.contains("/id") && bad.contains("/birthDate"), "{bad}");
    assert!(!bad.contains("01/01/1970"), "no value of the object in the reason: {bad}");
    assert!(events[2].reason.clone().expect("rejected").starts_with("not well-formed JSON"));
}

/// A watch asking for `resourceType` and `name`, on a node whose egress policy allows
/// `resourceType` only (or nothing), with audit entries written to a real ledger.
async fn fields_scenario(
    allowed: &[&str],
) -> (Vec<outpost_node::relay::RelayEvent>, Vec<(String, String)>, u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = fs_store(&dir).await;
    put(&objects, "in/1.json", br#"{"resourceType":"Patient","name":"Alice Example","id":"p1"}"#).await;
    put(&objects, "in/2.json", br#"{"resourceType":{"nested":true},"name":"Bob Example"}"#).await;
    put(&objects, "in/3.json", br#"{"resourceType":["Patient"]}"#).await;
    let state = memory();
    let ledger = outpost_node::ledger::Ledger::new(state.clone());
    let mut w = watch("fhir-in", "in/", Rules::default());
    w.event_fields = vec!["resourceType".into(), "name".into()];
    let cfg = RelayConfig {
        allowed_event_fields: allowed.iter().map(|s| s.to_string()).collect(),
        ..config(vec![w])
    };
    let audit_ledger = ledger.clone();
    let relay =
        relay(&objects, state.clone(), cfg).with_audit(Arc::new(move |action: &str, detail: &str| {
            audit_ledger.audit(action, detail).expect("audit");
        }));
    relay.scan_pass().await.expect("scan");
    relay.reconcile_pass().await.expect("reconcile");
    let audit = outpost_node::audit::entries(state.as_ref())
        .expect("audit entries")
        .into_iter()
        .map(|e| (e.action, e.detail))
        .collect();
    outpost_node::audit::verify(state.as_ref()).expect("the audit chain holds");
    (pending(&relay), audit, relay.metrics().expect("metrics").fields_denied)
}

#[tokio::test]
async fn events_carry_only_fields_the_egress_policy_allows_and_every_denial_is_audited() {
    let (events, audit, denied) = fields_scenario(&["resourceType"]).await;
    assert_eq!(events.len(), 3);
    assert!(events.iter().all(|e| e.accepted));
    assert_eq!(events[0].fields.len(), 1, "{:?}", events[0].fields);
    assert_eq!(events[0].fields["resourceType"], serde_json::json!("Patient"));
    assert_eq!(events[0].fields_denied, ["name"]);
    assert!(events.iter().all(|e| !e.fields.contains_key("name")), "name never leaves the node");
    let wire = serde_json::to_string(&events[0].to_wire("local")).expect("wire");
    assert!(wire.contains(r#""fields":{"resourceType":"Patient"}"#), "{wire}");
    assert!(!wire.contains("Alice"), "{wire}");
    assert!(events[1].fields.is_empty() && events[2].fields.is_empty(), "only scalars are carried");
    assert_eq!(events[1].fields_denied, ["name", "resourceType"]);
    assert_eq!(denied, 5, "name three times, two non-scalar resourceTypes");

    let denials: Vec<&String> =
        audit.iter().filter(|(action, _)| action == "egress.denied").map(|(_, d)| d).collect();
    assert_eq!(denials.len(), 2, "once for the policy, once for the first non-scalar value: {audit:?}");
    assert!(denials[0].contains(r#""fhir-in""#) && denials[0].contains(r#""name""#), "{}", denials[0]);
    assert!(denials[0].contains("allow_event_fields"), "{}", denials[0]);
    assert!(denials[1].contains(r#""resourceType""#) && denials[1].contains("an object"), "{}", denials[1]);
    assert!(!denials.iter().any(|d| d.contains("Bob") || d.contains("nested")), "no values audited");
}

#[tokio::test]
async fn without_an_egress_policy_events_carry_no_fields_at_all() {
    let (events, audit, denied) = fields_scenario(&[]).await;
    assert_eq!(events.len(), 3);
    for e in &events {
        assert!(e.fields.is_empty(), "{:?}", e.fields);
        assert_eq!(e.fields_denied, ["resourceType", "name"]);
        let wire = serde_json::to_string(&e.to_wire("local")).expect("wire");
        assert!(!wire.contains("Patient") && !wire.contains("Example"), "{wire}");
    }
    assert_eq!(denied, 6);
    assert_eq!(audit.iter().filter(|(a, _)| a == "egress.denied").count(), 2, "{audit:?}");
}
