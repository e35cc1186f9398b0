//! Result reports: idempotent by `job_id/attempt`, only for the node's own jobs; heartbeats.

use outpost_control::testing::TestServer;
use outpost_protocol::{Ack, Heartbeat, Inventory, JobState, paths};
use reqwest::StatusCode;

use crate::support::{TestNode, assert_error, org_and_token, submit, succeeded};

#[tokio::test]
async fn a_repeated_result_is_acknowledged_and_stored_once() {
    let server = TestServer::start().await.expect("server");
    let (_, token) = org_and_token(&server).await;
    let node = TestNode::enroll(&server, &token).await;
    let op = server.operator().expect("operator");
    let job = submit(&op, node.id()).await;
    node.poll(&[], 0).await;
    node.poll(&[&job.job_id], 0).await;

    let (status, body) = node.report(&succeeded(&job.job_id, "first")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ack: Ack = serde_json::from_value(body).expect("an Ack");
    assert_eq!(ack.idempotency_key, format!("{}/1", job.job_id));
    assert!(!ack.duplicate);

    let (status, body) = node.report(&succeeded(&job.job_id, "second")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let again: Ack = serde_json::from_value(body).expect("an Ack");
    assert_eq!(again.idempotency_key, ack.idempotency_key);
    assert!(again.duplicate);

    let stored = op.job(&job.job_id).await.expect("job");
    assert_eq!(stored.state, JobState::Finished);
    assert_eq!(stored.result.expect("a result").stdout_tail, "first", "the first report is kept");
    let audit = op.audit(1000).await.expect("audit");
    let results = audit.entries.iter().filter(|e| e.action == "job.result").count();
    assert_eq!(results, 1, "stored (and audited) once");
}

#[tokio::test]
async fn a_result_for_a_job_never_acknowledged_still_finishes_it() {
    // A node that refuses a manifest reports a Rejected result before acknowledging the job.
    let server = TestServer::start().await.expect("server");
    let (_, token) = org_and_token(&server).await;
    let node = TestNode::enroll(&server, &token).await;
    let op = server.operator().expect("operator");
    let job = submit(&op, node.id()).await;
    let (status, body) = node.report(&succeeded(&job.job_id, "")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(node.poll(&[], 0).await.jobs.is_empty(), "a finished job is not offered again");
}

#[tokio::test]
async fn a_result_for_another_nodes_job_is_refused_and_an_unknown_job_is_404() {
    let server = TestServer::start().await.expect("server");
    let (_, t1) = org_and_token(&server).await;
    let (_, t2) = org_and_token(&server).await;
    let owner = TestNode::enroll(&server, &t1).await;
    let other = TestNode::enroll(&server, &t2).await;
    let op = server.operator().expect("operator");
    let job = submit(&op, owner.id()).await;

    let got = other.report(&succeeded(&job.job_id, "forged")).await;
    assert_error(&got, StatusCode::FORBIDDEN, "not_your_job");
    assert!(op.job(&job.job_id).await.expect("job").result.is_none());
    let audit = op.audit(100).await.expect("audit");
    let refusal = format!("job {} belongs to another node", job.job_id);
    assert!(audit.entries.iter().any(|e| e.action == "report.refused" && e.detail == refusal));

    let got = other.report(&succeeded("nosuchjob", "")).await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");

    let mut wrong_key = succeeded(&job.job_id, "");
    wrong_key.idempotency_key = "something-else".into();
    let got = owner.report(&wrong_key).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "bad_idempotency_key");
}

#[tokio::test]
async fn a_heartbeat_stores_inventory_and_last_seen() {
    let server = TestServer::start().await.expect("server");
    let (_, token) = org_and_token(&server).await;
    let node = TestNode::enroll(&server, &token).await;
    let hb = Heartbeat {
        agent_version: "9.9.9".into(),
        inventory: Inventory { hostname: "edge-1".into(), cpu_count: 4, ..Inventory::default() },
        running_jobs: 1,
        outbox_depth: 2,
        relay: None,
        models: vec![outpost_protocol::ModelSummary {
            digest: "a".repeat(64),
            name: "minilm".into(),
            version: "1".into(),
            format: outpost_protocol::ModelFormat::Safetensors,
            engine: "candle".into(),
        }],
        labels: Default::default(),
        announce: None,
        awaiting_approval: Vec::new(),
    };
    let (status, body) = node.post(paths::NODE_HEARTBEAT, &hb).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.is_object());
    let stored = server.operator().expect("operator").node(node.id()).await.expect("node");
    assert!(stored.last_seen_unix_ms.is_some());
    assert_eq!(stored.last_heartbeat, Some(hb));
}
