//! The relay over the s3 adapter and a real Garage (started by `scripts/test`, or by hand with
//! `scripts/s3-server start DIR` and `OUTPOST_TEST_S3_ENV=DIR/s3.env`). Like the s3 contract
//! suite it fails, never skips, without the server. Each test works under its own prefix.

#![allow(clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;

use outpost_node::objstore::ObjectStore;
use outpost_node::objstore::s3::{S3Credentials, S3Settings, S3Store};
use outpost_node::relay::{Relay, RelayConfig, Rules, Watch};
use outpost_node::store::StateStore;
use outpost_node::store::sled_store::SledStore;

fn s3_store() -> S3Store {
    let Ok(path) = std::env::var("OUTPOST_TEST_S3_ENV") else {
        panic!(
            "OUTPOST_TEST_S3_ENV is not set: the relay s3 tests need a real S3 server. Run \
             `scripts/s3-server start DIR` and set OUTPOST_TEST_S3_ENV=DIR/s3.env (scripts/test does both)"
        );
    };
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("OUTPOST_TEST_S3_ENV={path} cannot be read ({e}); is the server started?")
    });
    let env: BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let var = |k: &str| env.get(k).cloned().unwrap_or_else(|| panic!("{k} missing from {path}"));
    S3Store::new(S3Settings {
        endpoint: var("OUTPOST_TEST_S3_ENDPOINT"),
        region: var("OUTPOST_TEST_S3_REGION"),
        bucket: var("OUTPOST_TEST_S3_BUCKET"),
        credentials: S3Credentials::from_file(var("OUTPOST_TEST_S3_CREDENTIALS_FILE").as_ref())
            .expect("credentials file"),
    })
    .expect("s3 store")
}

#[tokio::test]
async fn over_garage_objects_are_evented_once_and_reconciliation_finds_late_changed_and_deleted_keys() {
    let store = s3_store();
    let p = format!("relay-{}/", uuid::Uuid::new_v4().simple());
    let put = |k: &str, body: &'static [u8]| {
        let (store, key) = (store.clone(), format!("{p}{k}"));
        async move { store.put(&key, body).await.expect("put").etag }
    };
    put("m.json", br#"{"resourceType":"Patient"}"#).await;
    put("n.json", br#"{"resourceType":"Observation"}"#).await;
    put("o b/ü.json", br#"{"resourceType":"Patient","x":[1]}"#).await;
    put("zero.json", b"").await;

    let dir = tempfile::tempdir().expect("tempdir");
    let state: Arc<dyn StateStore> = Arc::new(SledStore::open(&dir.path().join("state")).expect("sled"));
    let rules = Rules { fhir_resource_types: Some(vec!["Patient".into()]), ..Rules::default() };
    let cfg = RelayConfig {
        batch_size: 2,
        watches: vec![Watch { name: "fhir".into(), prefix: p.clone(), rules, event_fields: Vec::new() }],
        ..RelayConfig::default()
    };
    let relay = Relay::new(store.clone(), state, cfg).expect("relay");
    let first = relay.scan_pass().await.expect("scan");
    assert_eq!((first.events, first.accepted, first.rejected, first.batches), (4, 2, 2, 2));
    let events = relay.pending_events(100).expect("pending");
    let short: Vec<String> = events.iter().map(|e| e.key[p.len()..].to_string()).collect();
    assert_eq!(short, ["m.json", "n.json", "o b/ü.json", "zero.json"]);
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert!(events[1].reason.as_deref().expect("reason").contains(r#""Observation" is not allowed"#));
    assert!(events[3].reason.as_deref().expect("reason").starts_with("not well-formed JSON"));
    assert_eq!(relay.scan_pass().await.expect("rescan").events, 0);

    // Behind the cursor, an overwrite, a deletion.
    put("a-late.json", br#"{"resourceType":"Patient"}"#).await;
    let new_etag = put("m.json", br#"{"resourceType":"Patient","v":2}"#).await;
    store.delete(&format!("{p}n.json")).await.expect("delete");
    assert_eq!(relay.scan_pass().await.expect("scan").events, 0);
    let r = relay.reconcile_pass().await.expect("reconcile");
    assert_eq!((r.events, r.accepted), (2, 2));
    assert_eq!(relay.reconcile_pass().await.expect("reconcile again").events, 0);
    let events = relay.pending_events(100).expect("pending");
    let late = &events[4..];
    assert_eq!(
        late.iter().map(|e| e.key[p.len()..].to_string()).collect::<Vec<_>>(),
        ["a-late.json", "m.json"]
    );
    assert_eq!(late[1].etag, new_etag);
    assert!(late[1].replaces_etag.is_some());
    assert_eq!(late.iter().map(|e| e.seq).collect::<Vec<_>>(), [5, 6]);

    for k in ["a-late.json", "m.json", "o b/ü.json", "zero.json"] {
        store.delete(&format!("{p}{k}")).await.expect("clean up");
    }
}
