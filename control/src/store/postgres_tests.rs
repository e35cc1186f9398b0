//! What the PostgreSQL adapter keeps across replicas: several stores (each its own pool, as
//! each replica has) over one real database, racing on the invariants the database must hold.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::contract::{any_job, event, job, node, org, result};
use super::{EventFilter, EventOrder, JobRecord, PgOptions, PgStore, ResultOutcome, StateStore, TokenRecord};
use crate::testing::postgres::{TestPostgres, start_or_skip};

/// `n` replicas' stores over one fresh, migrated database.
async fn replicas(pg: &TestPostgres, n: usize) -> (PgOptions, Vec<Arc<PgStore>>) {
    let options = keyed(pg.database().await.unwrap());
    PgStore::migrate(options.clone()).await.unwrap();
    let mut stores = Vec::new();
    for _ in 0..n {
        stores.push(Arc::new(PgStore::connect(options.clone()).await.unwrap()));
    }
    (options, stores)
}

/// `options` with the replicas' store key (the same for every store of a test).
fn keyed(mut options: PgOptions) -> PgOptions {
    options.secret_key = Some([7; 32]);
    options
}

macro_rules! postgres_or_skip {
    ($test:literal) => {
        match start_or_skip($test).await.unwrap() {
            Some(pg) => pg,
            None => return,
        }
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submits_from_several_replicas_number_a_nodes_jobs_without_gaps_or_repeats() {
    let pg = postgres_or_skip!("submits_from_several_replicas_number_a_nodes_jobs_without_gaps_or_repeats");
    let (_, stores) = replicas(&pg, 3).await;
    const EACH: usize = 40;
    let mut submits = JoinSet::new();
    for (r, store) in stores.iter().enumerate() {
        for i in 0..EACH {
            let store = Arc::clone(store);
            submits.spawn(async move {
                let id = format!("r{r}-{i}");
                let make: super::MakeJob = Box::new(move |seq| Ok(job(&id, "n1", seq)));
                store.submit_job("n1", make).await.unwrap().unwrap().info.seq
            });
        }
    }
    let mut seqs = Vec::new();
    while let Some(seq) = submits.join_next().await {
        seqs.push(seq.unwrap());
    }
    seqs.sort_unstable();
    let want: Vec<u64> = (1..=(3 * EACH) as u64).collect();
    assert_eq!(seqs, want, "every number once, none skipped");
    // A submit whose job id is taken stores nothing and hands its number back.
    let make: super::MakeJob = Box::new(|seq| Ok(job("r0-0", "n1", seq)));
    assert!(stores[1].submit_job("n1", make).await.unwrap().is_none());
    let make: super::MakeJob = Box::new(|seq| Ok(job("after", "n1", seq)));
    let next = stores[2].submit_job("n1", make).await.unwrap().unwrap();
    assert_eq!(next.info.seq, (3 * EACH + 1) as u64, "the refused submit left no gap");
    let queued = stores[0].queued_jobs("n1", 1000).await.unwrap();
    let order: Vec<u64> = queued.iter().map(|j| j.info.seq).collect();
    assert_eq!(order, (1..=(3 * EACH + 1) as u64).collect::<Vec<_>>());
}

/// While one replica's submit holds a node's next number, no later number becomes visible to
/// the node: a poll never sees seq N+1 before N.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_never_sees_a_later_job_before_an_earlier_one() {
    let pg = postgres_or_skip!("a_node_never_sees_a_later_job_before_an_earlier_one");
    let (_, stores) = replicas(&pg, 2).await;
    let (held, release) = std::sync::mpsc::channel::<()>();
    let (taken_tx, taken) = tokio::sync::oneshot::channel::<u64>();
    let slow = {
        let store = Arc::clone(&stores[0]);
        tokio::spawn(async move {
            let make: super::MakeJob = Box::new(move |seq| {
                let _ = taken_tx.send(seq);
                // The job is built (signed) while the number is held; take long about it.
                let _ = release.recv_timeout(Duration::from_secs(10));
                Ok(job("slow", "n1", seq))
            });
            store.submit_job("n1", make).await.unwrap()
        })
    };
    assert_eq!(taken.await.unwrap(), 1);
    let fast = {
        let store = Arc::clone(&stores[1]);
        tokio::spawn(async move {
            let make: super::MakeJob = Box::new(|seq| Ok(job("fast", "n1", seq)));
            store.submit_job("n1", make).await.unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        stores[1].queued_jobs("n1", 10).await.unwrap().is_empty(),
        "the second submit waits for the first's number to be stored"
    );
    held.send(()).unwrap();
    assert_eq!(slow.await.unwrap().unwrap().info.seq, 1);
    assert_eq!(fast.await.unwrap().unwrap().info.seq, 2);
    let order: Vec<String> =
        stores[1].queued_jobs("n1", 10).await.unwrap().into_iter().map(|j| j.info.job_id).collect();
    assert_eq!(order, ["slow", "fast"]);
}

/// Re-placing a job and offering a service number what they store in the same step: a
/// submit for the node on another replica waits for them, and the node sees one sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn re_placed_jobs_and_offered_services_share_the_nodes_one_sequence() {
    let pg = postgres_or_skip!("re_placed_jobs_and_offered_services_share_the_nodes_one_sequence");
    let (_, stores) = replicas(&pg, 3).await;
    stores[0].insert_job(any_job("moving", "n1", 1)).await.unwrap();
    let (held, release) = std::sync::mpsc::channel::<()>();
    let (taken_tx, taken) = tokio::sync::oneshot::channel::<u64>();
    let moving = {
        let store = Arc::clone(&stores[0]);
        tokio::spawn(async move {
            let make: super::MakeJob = Box::new(move |seq| {
                let _ = taken_tx.send(seq);
                let _ = release.recv_timeout(Duration::from_secs(10));
                let old = any_job("moving", "n1", 1);
                Ok(super::next_attempt(&old, old.envelope.clone(), "n2", seq, 5, "n1 silent"))
            });
            store.reassign_job_to("moving", 1, "n2", make).await.unwrap()
        })
    };
    assert_eq!(taken.await.unwrap(), 1);
    let submitted = {
        let store = Arc::clone(&stores[1]);
        tokio::spawn(async move {
            let make: super::MakeJob = Box::new(|seq| Ok(job("fresh", "n2", seq)));
            store.submit_job("n2", make).await.unwrap().unwrap().info.seq
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(stores[2].queued_jobs("n2", 10).await.unwrap().is_empty(), "the submit waits for the move");
    held.send(()).unwrap();
    assert!(moving.await.unwrap(), "moved");
    assert_eq!(submitted.await.unwrap(), 2);
    let order: Vec<(String, u64)> = stores[2]
        .queued_jobs("n2", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|j| (j.info.job_id, j.info.seq))
        .collect();
    assert_eq!(order, [("moving".to_string(), 1), ("fresh".to_string(), 2)]);
    // A job that moved on already is not moved again, and takes no number.
    let make: super::MakeJob = Box::new(|_| panic!("not built for a job that moved on"));
    assert!(!stores[1].reassign_job_to("moving", 1, "n2", make).await.unwrap());
    let desired = |seq| super::DesiredService {
        deployment: "web".into(),
        revision: 1,
        removal: false,
        rollback: false,
        seq,
        envelope: any_job("x", "n2", seq).envelope,
        since_unix_ms: 6,
    };
    stores[0].offer_service("n2", "web", Box::new(move |seq| Ok(desired(seq)))).await.unwrap();
    let services = stores[1].list_node_services(Some("n2")).await.unwrap();
    assert_eq!(services.len(), 1);
    assert_eq!(services[0].desired.as_ref().map(|d| d.seq), Some(3), "the service got the next number");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_enrolls_one_node_whichever_replicas_race_for_it() {
    let pg = postgres_or_skip!("a_token_enrolls_one_node_whichever_replicas_race_for_it");
    let (_, stores) = replicas(&pg, 3).await;
    stores[0].insert_org(org("o")).await.unwrap();
    let token = TokenRecord {
        token_sha256: "t".into(),
        org_id: "o".into(),
        expires_unix_ms: u64::MAX,
        used_unix_ms: None,
        used_by_node: None,
    };
    stores[0].insert_token(token).await.unwrap();
    let mut tries = JoinSet::new();
    for i in 0..24 {
        let store = Arc::clone(&stores[i % 3]);
        tries.spawn(async move { store.enroll_node("t", 10, node(&format!("n{i:02}"), "o")).await.unwrap() });
    }
    let mut enrolled = 0;
    while let Some(outcome) = tries.join_next().await {
        match outcome.unwrap() {
            Ok(()) => enrolled += 1,
            Err(refusal) => assert_eq!(refusal, super::TokenRefusal::Used),
        }
    }
    assert_eq!(enrolled, 1);
    assert_eq!(stores[2].list_nodes().await.unwrap().len(), 1, "only the winner is registered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_result_reported_to_several_replicas_at_once_is_stored_once() {
    let pg = postgres_or_skip!("a_result_reported_to_several_replicas_at_once_is_stored_once");
    let (_, stores) = replicas(&pg, 3).await;
    for j in 0..10 {
        stores[0].insert_job(job(&format!("j{j}"), "n1", j + 1)).await.unwrap();
    }
    let mut reports = JoinSet::new();
    for j in 0..10 {
        for r in 0..6 {
            let store = Arc::clone(&stores[r % 3]);
            reports.spawn(async move { store.store_result("n1", result(&format!("j{j}"))).await.unwrap() });
        }
    }
    let (mut stored, mut duplicates) = (0, 0);
    while let Some(outcome) = reports.join_next().await {
        match outcome.unwrap() {
            ResultOutcome::Stored => stored += 1,
            ResultOutcome::Duplicate => duplicates += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((stored, duplicates), (10, 50));
    let counts = stores[1].job_counts(None).await.unwrap();
    assert_eq!((counts.finished, counts.total()), (10, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_and_audit_from_several_replicas_are_stored_once_in_one_order() {
    let pg = postgres_or_skip!("events_and_audit_from_several_replicas_are_stored_once_in_one_order");
    let (_, stores) = replicas(&pg, 3).await;
    let mut work = JoinSet::new();
    // The same batch delivered to every replica (a node retrying after a lost answer), and
    // audit appends from all of them at once.
    for (r, store) in stores.iter().enumerate() {
        let store = Arc::clone(store);
        work.spawn(async move {
            let batch: Vec<_> = (1..=20).map(|s| event(s, &format!("k{s}"))).collect();
            let outcome = store.store_events("n1", "o", batch, 5).await.unwrap();
            for i in 0..10 {
                store.append_audit("admin", Some("o"), "test", &format!("{r}-{i}"), 5).await.unwrap();
            }
            outcome.stored
        });
    }
    let mut stored = 0;
    while let Some(n) = work.join_next().await {
        stored += n.unwrap();
    }
    assert_eq!(stored, 20, "each event once, whichever replica stored it");
    let filter = EventFilter {
        org_id: None,
        order: EventOrder::ByCursor { node_id: None, after_cursor: 0 },
        newest: false,
        limit: 100,
    };
    let events = stores[0].list_events(filter).await.unwrap();
    let cursors: Vec<u64> = events.iter().map(|e| e.cursor).collect();
    assert_eq!(cursors, (1..=20).collect::<Vec<_>>(), "cursors without gaps");
    let audit = stores[1].list_audit(None, 100).await.unwrap();
    let seqs: Vec<u64> = audit.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=30).collect::<Vec<_>>(), "audit sequence without gaps or repeats");
    let details: BTreeSet<&str> = audit.iter().map(|e| e.detail.as_str()).collect();
    assert_eq!(details.len(), 30);
}

#[tokio::test]
async fn the_schema_is_migrated_once_and_a_newer_one_is_refused() {
    let pg = postgres_or_skip!("the_schema_is_migrated_once_and_a_newer_one_is_refused");
    let options = keyed(pg.database().await.unwrap());
    let refused = PgStore::connect(options.clone()).await.err().expect("no schema yet");
    assert!(refused.to_string().contains("outpost-control migrate"), "{refused}");
    // Two replicas migrating at once apply each migration once.
    let (a, b) = tokio::join!(PgStore::migrate(options.clone()), PgStore::migrate(options.clone()));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.to, super::SCHEMA_VERSION);
    assert_eq!(b.to, super::SCHEMA_VERSION);
    assert_eq!(a.from.min(b.from), 0);
    assert_eq!(a.from.max(b.from), super::SCHEMA_VERSION, "the second found the schema done");
    let store = PgStore::connect(options.clone()).await.unwrap();
    store.insert_org(org("kept")).await.unwrap();
    // A newer binary migrated the database: this one refuses to serve or migrate it.
    let (client, conn) = tokio_postgres::connect(&options.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
        .execute(
            "INSERT INTO outpost_schema (version, applied_unix_ms, applied_by) VALUES ($1, 0, 'a newer one')",
            &[&(super::SCHEMA_VERSION + 1)],
        )
        .await
        .unwrap();
    for refused in [
        PgStore::connect(options.clone()).await.err().expect("newer schema"),
        PgStore::migrate(options.clone()).await.expect_err("newer schema"),
    ] {
        assert!(refused.to_string().contains("newer than this binary"), "{refused}");
    }
    assert!(store.get_org("kept").await.unwrap().is_some(), "nothing was changed");
}

/// The database killed under a serving store: calls fail with an error within the pool's
/// bound (no hang), and work again once it is back, on fresh connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_database_fails_calls_fast_and_they_work_again_when_it_returns() {
    let mut pg = postgres_or_skip!("a_lost_database_fails_calls_fast_and_they_work_again_when_it_returns");
    let (_, stores) = replicas(&pg, 1).await;
    let store = &stores[0];
    store.insert_org(org("o")).await.unwrap();
    pg.kill();
    let started = Instant::now();
    let failed = store.get_org("o").await.expect_err("the database is gone");
    assert!(failed.to_string().contains("PostgreSQL"), "{failed}");
    assert!(started.elapsed() < Duration::from_secs(30), "failed after {:?}", started.elapsed());
    let submit: super::MakeJob = Box::new(|seq| Ok(job("lost", "n1", seq)));
    assert!(store.submit_job("n1", submit).await.is_err());
    pg.resume().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match store.get_org("o").await {
            Ok(found) => {
                assert!(found.is_some());
                break;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("not yet: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the store did not recover: {e}"),
        }
    }
    assert!(store.get_job("lost").await.unwrap().is_none(), "a failed submit stored nothing");
    let again: super::MakeJob = Box::new(|seq| Ok(job("again", "n1", seq)));
    let again: JobRecord = store.submit_job("n1", again).await.unwrap().unwrap();
    assert_eq!(again.info.seq, 1, "the failed submit took no number");
}

/// The store-wide lock the rollout pass and deployment changes hold excludes other replicas,
/// and is released when its guard is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_lock_excludes_other_replicas_until_dropped() {
    let pg = postgres_or_skip!("the_fleet_lock_excludes_other_replicas_until_dropped");
    let (_, stores) = replicas(&pg, 2).await;
    let held = stores[0].exclusive("fleet").await.unwrap().expect("a shared store's lock");
    let waiting = {
        let store = Arc::clone(&stores[1]);
        tokio::spawn(async move { store.exclusive("fleet").await.unwrap().is_some() })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the second replica waits");
    // Another lock's name does not wait.
    assert!(stores[1].exclusive("other").await.unwrap().is_some());
    // A waiter that gives up (its request went away) leaves nothing behind: its connection
    // never returns to the pool mid-transaction.
    for _ in 0..20 {
        let store = Arc::clone(&stores[1]);
        let gave_up = tokio::spawn(async move { store.exclusive("fleet").await.map(|g| g.is_some()) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        gave_up.abort();
    }
    for i in 0..40 {
        stores[1].insert_org(org(&format!("while-waiting-{i}"))).await.unwrap();
    }
    drop(held);
    assert!(tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("released").unwrap());
    for i in 0..40 {
        assert!(
            stores[1].get_org(&format!("while-waiting-{i}")).await.unwrap().is_some(),
            "nothing rolled back"
        );
    }
    // The connection went back to the pool usable, outside any transaction.
    for _ in 0..20 {
        stores[0].insert_org(org(&format!("after-{}", uuid::Uuid::new_v4().simple()))).await.unwrap();
    }
}

/// `migrate-store`: an embedded store full of every kind of record (the contract's own run)
/// copied into PostgreSQL reads back equal, a second run finds it done, a target holding other
/// data is refused, and the copy goes on numbering where the source stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_store_is_copied_whole_once() {
    let pg = postgres_or_skip!("an_embedded_store_is_copied_whole_once");
    let dir = tempfile::tempdir().unwrap();
    let sled = super::SledStore::open(dir.path()).unwrap();
    super::contract::contract(&sled).await;
    sled.append_node_audit("n-copy", super::contract::audit_chain(3)).await.unwrap();
    let source = sled.dump().unwrap();
    assert!(
        source.counts().iter().all(|(_, n)| *n > 0),
        "every kind of record is copied: {:?}",
        source.counts()
    );
    let (_, stores) = replicas(&pg, 1).await;
    let target = &stores[0];
    let copied = super::copy_to_postgres(&sled, target).await.unwrap();
    assert_eq!(copied, super::Copied::Now(source.counts()));
    assert_eq!(target.dump().await.unwrap(), source);
    assert_eq!(
        super::copy_to_postgres(&sled, target).await.unwrap(),
        super::Copied::Already(source.counts())
    );
    // The copy goes on where the source stopped.
    let next_seq = source.seqs.iter().find(|(n, _)| n == "n1").map(|(_, s)| s + 1).unwrap();
    assert_eq!(target.next_job_seq("n1").await.unwrap(), next_seq);
    let next_audit = target.append_audit("admin", None, "after.copy", "", 9).await.unwrap();
    assert_eq!(next_audit.seq, source.audit_seq + 1);
    // Now the target holds more than the source: refused, and left as it was.
    let refused = super::copy_to_postgres(&sled, target).await.expect_err("other data");
    assert!(refused.to_string().contains("refusing"), "{refused}");
    assert!(target.get_job("r1").await.unwrap().is_some());
}

/// TLS to the database: with the CA given, connections are TLS (the server says so) and a
/// server whose certificate another CA issued is refused; `sslmode=require` without a CA is
/// refused rather than sent in plain text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_speaks_tls_to_a_database_whose_certificate_it_checks() {
    let test = "the_store_speaks_tls_to_a_database_whose_certificate_it_checks";
    let Some(pg) = crate::testing::postgres::start_tls_or_skip(test).await.unwrap() else { return };
    let name = pg.database().await.unwrap().url;
    let db = name.rsplit("dbname=").next().unwrap().to_owned();
    let mut options = keyed(PgOptions::new(pg.tcp_url(&db, "require")));
    options.ca_pem = pg.ca_pem().map(str::to_owned);
    PgStore::migrate(options.clone()).await.unwrap();
    let store = PgStore::connect(options.clone()).await.unwrap();
    store.insert_org(org("over-tls")).await.unwrap();
    let (client, conn) = options.connect_one().await.unwrap();
    let driver = tokio::spawn(async move {
        let mut conn = conn;
        std::future::poll_fn(|cx| conn.poll_message(cx)).await
    });
    let row = client
        .query_one("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "the connection is TLS");
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("TLSv1.3"));
    drop(client);
    driver.abort();
    // Another CA: refused.
    let other = crate::pki::CertAuthority::generate().unwrap();
    let mut wrong = keyed(PgOptions::new(pg.tcp_url(&db, "require")));
    wrong.ca_pem = Some(other.cert_pem().to_owned());
    let refused = PgStore::connect(wrong).await.err().expect("another CA");
    assert!(matches!(refused, super::StoreError::Unreachable(_)), "{refused}");
    // TLS required, no CA to check it with: refused, never plain text.
    let refused =
        PgStore::connect(keyed(PgOptions::new(pg.tcp_url(&db, "require")))).await.err().expect("no CA");
    assert!(refused.to_string().contains("PostgreSQL"), "{refused}");
}

/// The organisations' signing secrets are sealed in the database with the replicas' store
/// key: a dump of the database alone holds no secret, a replica with another key refuses to
/// start, and a sealed secret moved to another org's record does not open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_secrets_are_sealed_with_the_replicas_store_key() {
    let pg = postgres_or_skip!("signing_secrets_are_sealed_with_the_replicas_store_key");
    let (options, stores) = replicas(&pg, 1).await;
    let mut rotating = org("sealed-a");
    rotating.keys.next = Some(super::NextOrgKey {
        key: outpost_protocol::OrgKey {
            key: outpost_protocol::PublicKey { key_id: "k2".into(), ed25519_hex: "22".repeat(32) },
            signs_from_unix_ms: 9,
            endorsement_hex: None,
            retired: false,
        },
        secret_hex: "33".repeat(32),
    });
    stores[0].insert_org(rotating.clone()).await.unwrap();
    stores[0].insert_org(org("sealed-b")).await.unwrap();
    assert_eq!(stores[0].get_org("sealed-a").await.unwrap(), Some(rotating.clone()), "read back opened");
    let (client, conn) = tokio_postgres::connect(&options.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let raw: Vec<String> =
        client.query("SELECT doc::text FROM orgs", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    for text in &raw {
        assert!(
            !text.contains(&"11".repeat(32)) && !text.contains(&"33".repeat(32)),
            "a secret in the clear: {text}"
        );
        assert!(text.contains("sealed:v1:"), "{text}");
    }
    // Another key: the replica refuses to start.
    let mut other = options.clone();
    other.secret_key = Some([8; 32]);
    let refused = PgStore::connect(other).await.err().expect("another key");
    assert!(refused.to_string().contains("store.key"), "{refused}");
    // A's sealed secret copied into B's record: B no longer opens.
    client
        .execute(
            "UPDATE orgs SET doc = jsonb_set(doc::jsonb, '{signing_secret_hex}', (SELECT doc::jsonb->'signing_secret_hex' FROM orgs WHERE org_id = 'sealed-a'))::json WHERE org_id = 'sealed-b'",
            &[],
        )
        .await
        .unwrap();
    let moved = stores[0].get_org("sealed-b").await.expect_err("bound to its org");
    assert!(matches!(moved, super::StoreError::Corrupt { .. }), "{moved}");
    // The settings change without touching the sealed secrets.
    let settings = outpost_protocol::OrgSettings { revision: 1, ..Default::default() };
    assert!(stores[0].put_org_settings("sealed-a", settings).await.unwrap());
    assert_eq!(stores[0].get_org("sealed-a").await.unwrap().unwrap().signing_secret_hex, "11".repeat(32));
}

/// Sequence numbers a node sends beyond what bigint holds are refused, never clamped (two
/// clamped numbers would count as one, and the second event would be dropped as a repeat).
#[tokio::test]
async fn a_node_seq_beyond_bigint_is_refused_whole() {
    let pg = postgres_or_skip!("a_node_seq_beyond_bigint_is_refused_whole");
    let (_, stores) = replicas(&pg, 1).await;
    let batch = vec![event(1, "a"), event(u64::MAX - 1, "b"), event(u64::MAX, "c")];
    let refused = stores[0].store_events("n1", "o", batch, 5).await.expect_err("beyond bigint");
    assert!(refused.to_string().contains("2^63"), "{refused}");
    let filter = EventFilter {
        org_id: None,
        order: EventOrder::BySeq { node_id: "n1".into(), after_seq: 0 },
        newest: false,
        limit: 10,
    };
    assert!(
        stores[0].list_events(filter).await.unwrap().is_empty(),
        "the batch is stored whole or not at all"
    );
}

/// Organisation "o" and `nodes` enrolled in it, each with a token of its own.
async fn enroll_in_org_o(s: &PgStore, nodes: &[&str]) {
    s.insert_org(org("o")).await.unwrap();
    for id in nodes {
        let token = format!("t-{id}");
        s.insert_token(TokenRecord {
            token_sha256: token.clone(),
            org_id: "o".into(),
            expires_unix_ms: u64::MAX,
            used_unix_ms: None,
            used_by_node: None,
        })
        .await
        .unwrap();
        s.enroll_node(&token, 1, node(id, "o")).await.unwrap().unwrap();
    }
}

/// Rows whose index columns say nothing (written before schema 2, or by a replica not yet
/// upgraded: `labels` and `pending_seq` NULL) are judged from their records: a filtered
/// listing and the re-check of held polls never miss them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_without_index_columns_are_judged_from_their_records() {
    let pg = postgres_or_skip!("rows_without_index_columns_are_judged_from_their_records");
    let (options, stores) = replicas(&pg, 1).await;
    let s = &stores[0];
    enroll_in_org_o(s, &["n-old", "n-new", "n-other"]).await;
    let site = |v: &str| [("site".to_owned(), v.to_owned())].into();
    s.update_node_labels("n-old", site("icu"), vec![]).await.unwrap();
    s.update_node_labels("n-new", site("icu"), vec![]).await.unwrap();
    s.update_node_labels("n-other", site("lab"), vec![]).await.unwrap();
    s.set_service_desired("n-old", "web", super::contract::desired(5)).await.unwrap();
    let (client, conn) = tokio_postgres::connect(&options.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let indexed: Vec<Option<Vec<String>>> = client
        .query("SELECT labels FROM nodes ORDER BY node_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        indexed,
        [
            Some(vec!["site=icu".to_owned()]),
            Some(vec!["site=icu".to_owned()]),
            Some(vec!["site=lab".to_owned()])
        ],
        "written with every node record"
    );
    client
        .batch_execute(
            "UPDATE nodes SET labels = NULL WHERE node_id IN ('n-old', 'n-other');
             UPDATE node_services SET pending_seq = NULL",
        )
        .await
        .unwrap();
    let icu = || -> super::NodeFilter { Box::new(|_, l| l.get("site").map(String::as_str) == Some("icu")) };
    let label = Some(("site".to_owned(), "icu".to_owned()));
    let found: Vec<String> =
        s.find_nodes(None, None, label, icu(), 10).await.unwrap().into_iter().map(|n| n.node_id).collect();
    assert_eq!(found, ["n-new", "n-old"], "the unindexed node is read and judged, the other refused");
    let pending = s.pending_work(vec!["n-old".into()]).await.unwrap();
    assert_eq!(pending, [("n-old".to_owned(), super::PendingWork::Sent("s:5".into()))]);
    // The next write of each record fills its columns in.
    s.update_node_labels("n-old", site("lab"), vec![]).await.unwrap();
    let label = Some(("site".to_owned(), "icu".to_owned()));
    let found: Vec<String> =
        s.find_nodes(None, None, label, icu(), 10).await.unwrap().into_iter().map(|n| n.node_id).collect();
    assert_eq!(found, ["n-new"]);
    let unknown: i64 =
        client.query_one("SELECT count(*) FROM nodes WHERE labels IS NULL", &[]).await.unwrap().get(0);
    assert_eq!(unknown, 1, "only the node not written since");
}

/// Migration 2 on a database that already holds nodes and services (written at schema 1):
/// their index columns are filled in from the records, except a record holding NUL, which
/// stays unindexed (NULL) and is still found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_2_fills_the_index_columns_of_existing_rows() {
    let pg = postgres_or_skip!("migration_2_fills_the_index_columns_of_existing_rows");
    let (options, stores) = replicas(&pg, 1).await;
    let s = &stores[0];
    enroll_in_org_o(s, &["n-1", "n-2"]).await;
    s.update_node_labels("n-1", [("site".to_owned(), "icu".to_owned())].into(), vec![]).await.unwrap();
    s.update_node_labels("n-2", [("odd".to_owned(), "a\0b".to_owned())].into(), vec![]).await.unwrap();
    s.set_service_desired("n-1", "web", super::contract::desired(5)).await.unwrap();
    s.set_service_desired("n-1", "db", super::contract::desired(6)).await.unwrap();
    s.ack_node_services("n-1", vec![outpost_protocol::ServiceAck { service: "db".into(), seq: 6 }])
        .await
        .unwrap();
    let (client, conn) = tokio_postgres::connect(&options.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    // Back to schema 1, the rows as schema 1 held them.
    client
        .batch_execute(
            "ALTER TABLE nodes DROP COLUMN labels;
             ALTER TABLE node_services DROP COLUMN pending_seq;
             DELETE FROM outpost_schema WHERE version = 2;",
        )
        .await
        .unwrap();
    let migrated = PgStore::migrate(options.clone()).await.unwrap();
    assert_eq!((migrated.from, migrated.to), (1, 2));
    let labels: Vec<Option<Vec<String>>> = client
        .query("SELECT labels FROM nodes ORDER BY node_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        labels,
        [Some(vec!["site=icu".to_owned()]), None],
        "filled in; the NUL record left to the scan"
    );
    let pending: Vec<(String, Option<i64>)> = client
        .query("SELECT service, pending_seq FROM node_services ORDER BY service", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(pending, [("db".to_owned(), Some(0)), ("web".to_owned(), Some(5))]);
    let s = PgStore::connect(options).await.unwrap();
    let find = |k: &'static str, v: &'static str| {
        let keep: super::NodeFilter = Box::new(move |_, l| l.get(k).map(String::as_str) == Some(v));
        let s = &s;
        async move {
            let found = s.find_nodes(None, None, Some((k.into(), v.into())), keep, 10).await.unwrap();
            found.into_iter().map(|n| n.node_id).collect::<Vec<String>>()
        }
    };
    assert_eq!(find("odd", "a\0b").await, ["n-2"], "the unindexed record is read and judged");
    assert_eq!(find("site", "icu").await, ["n-1"], "through the filled-in index");
    assert!(find("site", "lab").await.is_empty());
}
