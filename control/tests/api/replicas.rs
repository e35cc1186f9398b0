//! Two replicas of one control plane over one real PostgreSQL database (a copy of the data
//! directory each, as an operator deploys them): what one is told, the other serves.

use std::time::{Duration, Instant};

use outpost_control::server::StoreChoice;
use outpost_control::store::PgStore;
use outpost_control::testing::TestServer;
use outpost_control::testing::postgres::{TestPostgres, start_or_skip};
use outpost_protocol::JobState;

use crate::support::*;

/// Two replicas over a fresh, migrated database.
async fn two_replicas(pg: &TestPostgres) -> (TestServer, TestServer) {
    let options = pg.database().await.expect("database");
    PgStore::migrate(options.clone()).await.expect("migrate");
    let a = TestServer::start_with_store(StoreChoice::Postgres(options)).await.expect("replica a");
    let b = a.replica().await.expect("replica b");
    (a, b)
}

/// The same node, speaking to another replica (its certificate is the shared CA's).
fn at(node: &TestNode, server: &TestServer) -> TestNode {
    TestNode {
        enrolled: node.enrolled.clone(),
        key_pem: node.key_pem.clone(),
        http: node.http.clone(),
        base: server.url(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_submitted_on_one_replica_wakes_a_poll_held_on_another() {
    let Some(pg) =
        start_or_skip("a_job_submitted_on_one_replica_wakes_a_poll_held_on_another").await.unwrap()
    else {
        return;
    };
    let (a, b) = two_replicas(&pg).await;
    let (_, token) = org_and_token(&a).await;
    let enrolled_at_a = TestNode::enroll(&a, &token).await;
    let node = at(&enrolled_at_a, &b);
    let node_id = node.id().to_owned();
    let started = Instant::now();
    let held = tokio::spawn(async move {
        let resp = node.poll(&[], 25).await;
        (node, resp)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let job = submit(&a.operator().expect("operator"), &node_id).await;
    let (node, resp) = tokio::time::timeout(Duration::from_secs(24), held)
        .await
        .expect("replica b answered the held poll before its 25 s wait ran out")
        .expect("poll task");
    assert!(started.elapsed() < Duration::from_secs(24));
    assert_eq!(resp.jobs.len(), 1, "{resp:?}");
    assert_eq!(resp.jobs[0].job_id, job.job_id);
    // Acknowledged and reported to replica b, read from replica a.
    node.poll(&[&job.job_id], 0).await;
    let (status, body) = node.report(&report_for(&resp.jobs[0], outpost_protocol::Outcome::Succeeded)).await;
    assert!(status.is_success(), "{body}");
    let seen = a.operator().expect("operator").job(&job.job_id).await.expect("job");
    assert_eq!(seen.state, JobState::Finished);
    // The same report again, now to replica a: stored once.
    let again = at(&node, &a);
    let (status, body) = again.report(&report_for(&resp.jobs[0], outpost_protocol::Outcome::Failed)).await;
    assert!(status.is_success(), "{body}");
    let seen = b.operator().expect("operator").job(&job.job_id).await.expect("job");
    assert_eq!(
        seen.result.expect("result").outcome,
        outpost_protocol::Outcome::Succeeded,
        "the first report stands"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_submitted_on_both_replicas_reach_the_node_in_sequence_order() {
    let Some(pg) =
        start_or_skip("jobs_submitted_on_both_replicas_reach_the_node_in_sequence_order").await.unwrap()
    else {
        return;
    };
    let (a, b) = two_replicas(&pg).await;
    let (_, token) = org_and_token(&b).await;
    let node = TestNode::enroll(&b, &token).await;
    let ops = std::sync::Arc::new([a.operator().expect("operator"), b.operator().expect("operator")]);
    let mut submits = tokio::task::JoinSet::new();
    for i in 0..12 {
        let ops = std::sync::Arc::clone(&ops);
        let node_id = node.id().to_owned();
        submits.spawn(async move { submit(&ops[i % 2], &node_id).await.seq });
    }
    let mut seqs = Vec::new();
    while let Some(seq) = submits.join_next().await {
        seqs.push(seq.expect("submit"));
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=12).collect::<Vec<u64>>(), "each number once, none skipped");
    let offered: Vec<u64> = at(&node, &a)
        .poll(&[], 0)
        .await
        .jobs
        .iter()
        .map(|j| {
            serde_json::from_str::<outpost_protocol::JobEnvelope>(&j.envelope.payload).expect("envelope").seq
        })
        .collect();
    assert_eq!(offered, (1..=12).collect::<Vec<u64>>());
    // One-time enrollment tokens hold across replicas.
    let got = post_json(
        &https(a.ca_pem(), None),
        &format!("{}{}", a.url(), outpost_protocol::paths::ENROLL),
        &enroll_request(&token, &csr().0),
    )
    .await;
    assert_error(&got, reqwest::StatusCode::UNAUTHORIZED, "token_used");
}

/// The database lost under a serving replica: health says not ready, calls fail fast with 503
/// and the reason, a held poll ends; all of it works again once the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_database_makes_the_replica_unready_until_it_returns() {
    let Some(mut pg) =
        start_or_skip("a_lost_database_makes_the_replica_unready_until_it_returns").await.unwrap()
    else {
        return;
    };
    let options = pg.database().await.expect("database");
    PgStore::migrate(options.clone()).await.expect("migrate");
    let server = TestServer::start_with_store(StoreChoice::Postgres(options)).await.expect("replica");
    let (_, token) = org_and_token(&server).await;
    let node = TestNode::enroll(&server, &token).await;
    let health = || async {
        let resp = https(server.ca_pem(), None)
            .get(format!("{}{}", server.url(), outpost_protocol::paths::HEALTH))
            .send()
            .await
            .expect("health answers");
        answer(resp).await
    };
    assert_eq!(health().await.0, reqwest::StatusCode::OK);
    pg.kill();
    let started = Instant::now();
    let got = health().await;
    assert_error(&got, reqwest::StatusCode::SERVICE_UNAVAILABLE, "store_unavailable");
    assert!(got.1["message"].as_str().unwrap_or_default().contains("PostgreSQL"), "{}", got.1);
    let poll = outpost_protocol::PollRequest { wait_secs: Some(5), ..Default::default() };
    let got = node.post(outpost_protocol::paths::NODE_POLL, &poll).await;
    assert_error(&got, reqwest::StatusCode::SERVICE_UNAVAILABLE, "store_unavailable");
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
    pg.resume().await.expect("database back");
    let deadline = Instant::now() + Duration::from_secs(30);
    while health().await.0 != reqwest::StatusCode::OK {
        assert!(Instant::now() < deadline, "the replica did not become ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let job = submit(&server.operator().expect("operator"), node.id()).await;
    assert_eq!(node.poll(&[], 0).await.jobs[0].job_id, job.job_id, "serving again");
}

/// A revocation on one replica ends the node's poll held on another at once (the store
/// announces it), and the node's next request there is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_replica_reaches_a_poll_held_on_another() {
    let Some(pg) = start_or_skip("a_revocation_on_one_replica_reaches_a_poll_held_on_another").await.unwrap()
    else {
        return;
    };
    let (a, b) = two_replicas(&pg).await;
    let (_, token) = org_and_token(&a).await;
    let node = at(&TestNode::enroll(&a, &token).await, &b);
    let node_id = node.id().to_owned();
    let started = Instant::now();
    let held = tokio::spawn(async move {
        let req = outpost_protocol::PollRequest { wait_secs: Some(25), ..Default::default() };
        let answered = node.post(outpost_protocol::paths::NODE_POLL, &req).await;
        (node, answered)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.operator().expect("operator").revoke_node(&node_id).await.expect("revoked");
    let (node, ended) = tokio::time::timeout(Duration::from_secs(24), held)
        .await
        .expect("replica b answered the held poll before its 25 s wait ran out")
        .expect("poll task");
    assert!(started.elapsed() < Duration::from_secs(24));
    assert_error(&ended, reqwest::StatusCode::FORBIDDEN, "node_revoked");
    // Refused by either replica from now on: in the handshake or with the refusal.
    let poll = outpost_protocol::PollRequest { wait_secs: Some(0), ..Default::default() };
    for server in [&a, &b] {
        let sent = node
            .http
            .post(format!("{}{}", server.url(), outpost_protocol::paths::NODE_POLL))
            .json(&poll)
            .send()
            .await;
        if let Ok(resp) = sent {
            assert!(
                resp.status().is_client_error(),
                "a revoked node is refused by every replica: {}",
                resp.status()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_notice_costs_a_held_poll_at_most_the_recheck_interval() {
    let Some(pg) =
        start_or_skip("a_lost_notice_costs_a_held_poll_at_most_the_recheck_interval").await.unwrap()
    else {
        return;
    };
    let (a, b) = two_replicas(&pg).await;
    let (_, token) = org_and_token(&a).await;
    let node = at(&TestNode::enroll(&a, &token).await, &b);
    let node_id = node.id().to_owned();
    let held = tokio::spawn(async move { node.poll(&[], 25).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Both replicas' listening backends stall: the submit's notice reaches neither.
    let paused = pg.pause_listeners().await.expect("listeners paused");
    assert_eq!(paused.len(), 2, "one listener per replica");
    let submitted = Instant::now();
    let job = submit(&a.operator().expect("operator"), &node_id).await;
    let resp = tokio::time::timeout(Duration::from_secs(20), held)
        .await
        .expect("the held poll was answered by the re-check, long before its 25 s wait ran out")
        .expect("poll task");
    let took = submitted.elapsed();
    drop(paused);
    assert_eq!(resp.jobs.len(), 1, "{resp:?}");
    assert_eq!(resp.jobs[0].job_id, job.job_id);
    eprintln!("delivered {took:?} after the submit, with no notice");
}
