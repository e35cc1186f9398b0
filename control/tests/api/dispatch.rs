//! Job dispatch: signed envelopes, the long-poll that wakes on submit, acknowledgements and
//! re-offers.

use std::time::{Duration, Instant};

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use outpost_control::testing::TestServer;
use outpost_protocol::{JobEnvelope, JobState, PollRequest, SubmitJobRequest, paths};
use reqwest::StatusCode;

use crate::support::{TestNode, assert_error, org_and_token, spec, submit};

async fn server_with_node() -> (TestServer, TestNode) {
    let server = TestServer::start().await.expect("server");
    let (_, token) = org_and_token(&server).await;
    let node = TestNode::enroll(&server, &token).await;
    (server, node)
}

#[tokio::test]
async fn a_submit_wakes_a_held_poll_with_the_job() {
    let (server, node) = server_with_node().await;
    let op = server.operator().expect("operator");
    let node_id = node.id().to_owned();
    let started = Instant::now();
    let held = tokio::spawn(async move { node.poll(&[], 25).await });
    // Give the poll time to reach the server and be held there.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let job = submit(&op, &node_id).await;
    let resp = tokio::time::timeout(Duration::from_secs(24), held)
        .await
        .expect("the poll was answered before its 25 s wait ran out")
        .expect("poll task");
    assert!(started.elapsed() < Duration::from_secs(24));
    assert_eq!(resp.jobs.len(), 1);
    assert_eq!(resp.jobs[0].job_id, job.job_id);
}

#[tokio::test]
async fn envelopes_are_signed_by_the_org_key_with_increasing_sequence_numbers() {
    let (server, node) = server_with_node().await;
    let op = server.operator().expect("operator");
    let first = submit(&op, node.id()).await;
    let second = submit(&op, node.id()).await;
    assert!(second.seq > first.seq, "{} then {}", first.seq, second.seq);

    let resp = node.poll(&[], 0).await;
    let ids: Vec<&str> = resp.jobs.iter().map(|j| j.job_id.as_str()).collect();
    assert_eq!(ids, [first.job_id.as_str(), second.job_id.as_str()], "offered in sequence order");
    let key = &node.enrolled.org_signing_key;
    let verifying =
        VerifyingKey::from_bytes(&hex::decode(&key.ed25519_hex).expect("hex").try_into().expect("32 bytes"))
            .expect("a public key");
    for a in &resp.jobs {
        assert_eq!(a.envelope.key_id, key.key_id);
        let sig =
            Signature::from_slice(&hex::decode(&a.envelope.signature_hex).expect("hex")).expect("signature");
        verifying.verify(a.envelope.payload.as_bytes(), &sig).expect("the signature verifies");
        let env: JobEnvelope = serde_json::from_str(&a.envelope.payload).expect("an envelope");
        assert_eq!(env.job_id, a.job_id);
        assert_eq!(env.node_id, node.id());
        assert_eq!(env.spec, spec().into());
        assert!(env.expires_unix_ms > env.issued_unix_ms);
    }
}

#[tokio::test]
async fn an_unacknowledged_job_is_offered_again_and_an_acknowledged_one_is_not() {
    let (server, node) = server_with_node().await;
    let op = server.operator().expect("operator");
    let job = submit(&op, node.id()).await;

    assert_eq!(node.poll(&[], 0).await.jobs.len(), 1);
    let again = node.poll(&[], 0).await;
    assert_eq!(again.jobs.len(), 1, "not acknowledged: offered again");
    assert_eq!(again.jobs[0].job_id, job.job_id);

    let after_ack = node.poll(&[&job.job_id], 0).await;
    assert!(after_ack.jobs.is_empty(), "acknowledged: not offered again");
    let stored = op.job(&job.job_id).await.expect("job");
    assert_eq!(stored.state, JobState::Accepted);
    assert!(stored.accepted_unix_ms.is_some());
    assert!(node.poll(&[], 0).await.jobs.is_empty());
}

#[tokio::test]
async fn a_node_is_offered_only_its_own_jobs_and_cannot_ack_others() {
    let server = TestServer::start().await.expect("server");
    let (_, t1) = org_and_token(&server).await;
    let (_, t2) = org_and_token(&server).await;
    let a = TestNode::enroll(&server, &t1).await;
    let b = TestNode::enroll(&server, &t2).await;
    let op = server.operator().expect("operator");
    let job = submit(&op, a.id()).await;
    assert!(b.poll(&[&job.job_id], 0).await.jobs.is_empty());
    assert_eq!(op.job(&job.job_id).await.expect("job").state, JobState::Queued, "b's ack is ignored");
    assert_eq!(a.poll(&[], 0).await.jobs.len(), 1);
}

#[tokio::test]
async fn a_poll_with_no_room_answers_at_once() {
    let (server, node) = server_with_node().await;
    submit(&server.operator().expect("operator"), node.id()).await;
    let req = PollRequest { wait_secs: Some(25), max_jobs: Some(0), ..Default::default() };
    let started = Instant::now();
    let (status, body) = node.post(paths::NODE_POLL, &req).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["jobs"].as_array().map(Vec::len), Some(0));
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn a_held_poll_is_answered_when_the_server_shuts_down() {
    let (server, node) = server_with_node().await;
    let held = tokio::spawn(async move { node.poll(&[], 25).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.stop().await;
    let resp = tokio::time::timeout(Duration::from_secs(20), held).await.expect("answered").expect("task");
    assert!(resp.jobs.is_empty());
}

#[tokio::test]
async fn submissions_that_a_node_would_refuse_are_refused_up_front() {
    let (server, node) = server_with_node().await;
    let http = crate::support::https(server.ca_pem(), None);
    let url = format!("{}{}", server.url(), paths::JOBS);
    let mut bad = spec();
    bad.image = "alpine:latest".into();
    let req = SubmitJobRequest::for_node(node.id(), bad);
    let got = crate::support::answer(
        http.post(&url).bearer_auth(server.admin_token()).json(&req).send().await.expect("sent"),
    )
    .await;
    assert_error(&got, StatusCode::BAD_REQUEST, "bad_image");

    let req = SubmitJobRequest::for_node("node-nobody", spec());
    let got = crate::support::answer(
        http.post(&url).bearer_auth(server.admin_token()).json(&req).send().await.expect("sent"),
    )
    .await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    let audit = server.operator().expect("operator").audit(100).await.expect("audit");
    assert!(!audit.entries.iter().any(|e| e.action == "job.submitted"));
}
