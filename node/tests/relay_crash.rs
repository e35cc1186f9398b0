//! Crash safety: the relay "dies" at each batch of a pass (before its batch reaches the disk,
//! and after it did but before `apply` returned), the durable sled store is reopened, and a
//! fresh relay finishes the work. No event is lost, none is repeated, numbers stay gapless.

#![allow(clippy::expect_used)]

mod relay_support;

use std::path::Path;
use std::sync::Arc;

use outpost_node::objstore::ObjectStore;
use outpost_node::objstore::fs::FsStore;
use outpost_node::relay::{RelayConfig, RelayEvent, Rules};
use outpost_node::store::StateStore;
use outpost_node::store::sled_store::SledStore;
use relay_support::*;

fn cfg() -> RelayConfig {
    RelayConfig { batch_size: 10, ..config(vec![watch("w", "in/", Rules::default())]) }
}

fn sled(path: &Path) -> Arc<dyn StateStore> {
    Arc::new(SledStore::open(path).expect("open sled"))
}

/// Run `pass` on a relay whose state dies at batch `at`, then reopen the same sled directory
/// and run it again to completion. Returns every event in the outbox afterwards.
async fn crash_then_recover(
    objects: &FsStore,
    db: &Path,
    at: usize,
    crash: Crash,
    reconcile: bool,
) -> Vec<RelayEvent> {
    {
        let dying: Arc<dyn StateStore> = Arc::new(CrashingStore::new(sled(db), at, crash));
        let r = relay(objects, dying, cfg());
        let outcome = if reconcile { r.reconcile_pass().await } else { r.scan_pass().await };
        let err = outcome.expect_err("the pass dies at the chosen batch");
        assert!(!err.is_retryable(), "a dead store is not retried: {err}");
    } // everything dropped: the sled directory is closed, as after kill -9
    let r = relay(objects, sled(db), cfg());
    if reconcile {
        r.reconcile_pass().await.expect("reconcile after restart");
    } else {
        r.scan_pass().await.expect("scan after restart");
    }
    assert_eq!(r.scan_pass().await.expect("scan").events, 0, "nothing left over");
    assert_eq!(r.reconcile_pass().await.expect("reconcile").events, 0, "nothing left over");
    pending(&r)
}

#[tokio::test]
async fn a_scan_killed_at_any_batch_neither_loses_nor_repeats_an_event() {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = fs_store(&dir).await;
    let all: Vec<String> = (0..25).map(|i| format!("in/{i:03}")).collect();
    put_many(&objects, &all).await;
    // 25 objects in batches of 10: three batches; kill at each.
    for crash in [Crash::BeforeWrite, Crash::AfterWrite] {
        for at in 1..=3 {
            let db = dir.path().join(format!("scan-{crash:?}-{at}"));
            let events = crash_then_recover(&objects, &db, at, crash, false).await;
            assert_eq!(keys(&events), all, "{crash:?} at batch {at}");
            assert_gapless(&events, 1);
        }
    }
}

#[tokio::test]
async fn a_reconciliation_killed_at_any_batch_neither_loses_nor_repeats_an_event() {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = fs_store(&dir).await;
    let ahead: Vec<String> = (0..10).map(|i| format!("in/m{i:02}")).collect();
    put_many(&objects, &ahead).await;
    let mut round = 0;
    for crash in [Crash::BeforeWrite, Crash::AfterWrite] {
        for at in 1..=3 {
            round += 1;
            let db = dir.path().join(format!("reconcile-{crash:?}-{at}"));
            let first = relay(&objects, sled(&db), cfg());
            first.scan_pass().await.expect("scan");
            drop(first);
            // Behind the cursor: 15 late keys and two overwrites, seen in two batches of 10.
            let late: Vec<String> = (0..15).map(|i| format!("in/a{round}-{i:02}")).collect();
            put_many(&objects, &late).await;
            put(&objects, "in/m03", format!("v{round}").as_bytes()).await;
            put(&objects, "in/m07", format!("v{round}").as_bytes()).await;

            let events = crash_then_recover(&objects, &db, at, crash, true).await;
            let (before, after) = events.split_at(10);
            assert_eq!(keys(before), ahead);
            let mut want = late.clone();
            want.extend(["in/m03".to_string(), "in/m07".to_string()]);
            assert_eq!(keys(after), want, "{crash:?} at batch {at}: each late or changed object once");
            assert_gapless(&events, 1);
            for k in &late {
                objects.delete(k).await.expect("clean up for the next round");
            }
        }
    }
}
