//! 10,000 objects in one prefix: bounded pages and batches, every object evented once and in
//! listing order, and a reconciliation over all of them that finds nothing to add.

#![allow(clippy::expect_used)]

mod relay_support;

use std::sync::Arc;
use std::time::Instant;

use outpost_node::relay::{RelayConfig, Rules};
use outpost_node::store::StateStore;
use outpost_node::store::sled_store::SledStore;
use relay_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_objects_in_one_prefix_are_evented_once_in_order_in_bounded_batches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = fs_store(&dir).await;
    let all: Vec<String> = (0..10_000).map(|i| format!("bulk/{i:05}.json")).collect();
    let t = Instant::now();
    put_many(&objects, &all).await;
    eprintln!("[figures] 10,000 puts in {:.1} s", t.elapsed().as_secs_f64());

    let state: Arc<dyn StateStore> = Arc::new(SledStore::open(&dir.path().join("state")).expect("sled"));
    let cfg = RelayConfig {
        batch_size: 500,
        outbox_bound: 20_000,
        ..config(vec![watch(
            "bulk",
            "bulk/",
            Rules { allowed_suffixes: vec![".json".into()], ..Rules::default() },
        )])
    };
    let relay = relay(&objects, state, cfg);
    let t = Instant::now();
    let report = relay.scan_pass().await.expect("scan");
    eprintln!("[figures] scan pass over 10,000 objects in {:.1} s: {report:?}", t.elapsed().as_secs_f64());
    assert_eq!((report.events, report.accepted), (10_000, 10_000));
    assert_eq!(report.batches, 20, "one atomic batch per page of 500");
    assert!(report.list_calls <= 21, "bounded pages: {}", report.list_calls);

    let t = Instant::now();
    let events = pending(&relay);
    eprintln!("[figures] reading 10,000 pending events in {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(keys(&events), all, "every object once, in listing order");
    assert_gapless(&events, 1);

    let t = Instant::now();
    assert_eq!(relay.scan_pass().await.expect("rescan").events, 0);
    eprintln!("[figures] rescan in {:.1} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let reconcile = relay.reconcile_pass().await.expect("reconcile");
    eprintln!("[figures] reconciliation over 10,000 objects in {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!((reconcile.events, reconcile.batches), (0, 0), "nothing new, nothing written");
    let t = Instant::now();
    assert_eq!(relay.mark_sent(10_000).expect("sent"), 10_000);
    eprintln!("[figures] marking 10,000 events sent in {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(relay.metrics().expect("metrics").pending_depth, 0);
}
