//! `node revoke`: a revoked node's certificate is refused in the TLS handshake and by every
//! node route, its held poll ends, its queued work is cancelled or moved, and nothing new is
//! placed on it, across a restart too.

use std::time::Duration;

use outpost_control::testing::TestServer;
use outpost_protocol::{
    JobState, LabelNodeRequest, Placement, PollRequest, PollResponse, SubmitJobRequest, paths,
};
use reqwest::StatusCode;

use crate::support::{
    TestNode, answer, assert_error, https, op_post, org_and_token, post_json, spec, submit,
};

fn revoke_path(node_id: &str) -> String {
    paths::NODE_REVOKE.replace("{node_id}", node_id)
}

fn held_poll(wait_secs: u64) -> PollRequest {
    PollRequest {
        wait_secs: Some(wait_secs),
        announce: Some(outpost_protocol::Announce::this_build()),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_revoked_node_is_refused_in_the_handshake_and_its_held_poll_ends() {
    let server = TestServer::start().await.expect("server");
    let (org_id, token) = org_and_token(&server).await;
    let node = TestNode::enroll(&server, &token).await;
    node.poll(&[], 0).await;

    // The node holds a poll for 30 s; the revocation ends it with the refusal, not an empty 200.
    let (http, url) = (node.http.clone(), format!("{}{}", server.url(), paths::NODE_POLL));
    let held = tokio::spawn(async move { post_json(&http, &url, &held_poll(30)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = op_post(&server, &revoke_path(node.id()), &serde_json::json!(null)).await;
    assert_eq!(status, StatusCode::OK, "revoke: {body}");
    let revoked_at = body["revoked_unix_ms"].as_u64().expect("revoked_unix_ms");
    let ended = held.await.expect("the held poll");
    assert_error(&ended, StatusCode::FORBIDDEN, "node_revoked");
    assert!(ended.1["message"].as_str().is_some_and(|m| m.contains("with a new token")), "{}", ended.1);

    // A connection opened before the revocation: every node route refuses it.
    let (status, body) = node.post(paths::NODE_HEARTBEAT, &crate::support::description(("a", "b"))).await;
    assert_error(&(status, body), StatusCode::FORBIDDEN, "node_revoked");
    // A new connection with the node's certificate fails in the TLS handshake.
    let fresh = https(server.ca_pem(), Some((&node.enrolled.cert_pem, &node.key_pem)));
    let url = format!("{}{}", server.url(), paths::NODE_POLL);
    let refused = fresh.post(&url).json(&PollRequest::default()).send().await;
    assert!(refused.is_err(), "the handshake must fail for a revoked certificate, got {refused:?}");

    let op = server.operator().expect("operator");
    let listed = op.nodes(None, Some(&org_id)).await.expect("nodes");
    assert_eq!(listed.nodes[0].revoked_unix_ms, Some(revoked_at), "node list shows it revoked");
    let (status, again) = op_post(&server, &revoke_path(node.id()), &serde_json::json!(null)).await;
    assert_eq!((status, again["revoked_unix_ms"].as_u64()), (StatusCode::OK, Some(revoked_at)), "idempotent");
    let audit = op.audit(100).await.expect("audit");
    let entries: Vec<_> = audit.entries.iter().filter(|e| e.action == "node.revoked").collect();
    assert_eq!(entries.len(), 1, "one audit entry, not one per call");
    assert!(
        entries[0].detail.contains(node.id()) && entries[0].detail.contains("revoked"),
        "{}",
        entries[0].detail
    );

    // A restart reloads the revocations: still refused in the handshake.
    let server = server.restart().await.expect("restart");
    let fresh = https(server.ca_pem(), Some((&node.enrolled.cert_pem, &node.key_pem)));
    let url = format!("{}{}", server.url(), paths::NODE_POLL);
    let refused = fresh.post(&url).json(&PollRequest::default()).send().await;
    assert!(refused.is_err(), "still refused after a restart, got {refused:?}");
    let op = server.operator().expect("operator");
    let nodes = op.nodes(None, Some(&org_id)).await.expect("nodes");
    assert_eq!(nodes.nodes[0].revoked_unix_ms, Some(revoked_at));
}

#[tokio::test]
async fn a_revoked_nodes_queued_work_is_cancelled_or_moved_and_none_comes_back() {
    let server = TestServer::start().await.expect("server");
    let op = server.operator().expect("operator");
    let (org_id, token) = org_and_token(&server).await;
    let stolen = TestNode::enroll(&server, &token).await;
    let other = op.create_token(&org_id, None).await.expect("token");
    let spare = TestNode::enroll(&server, &other.token).await;
    let icu = LabelNodeRequest { set: [("site".to_owned(), "icu".to_owned())].into(), ..Default::default() };
    op.label_node(stolen.id(), &icu).await.expect("label");

    // Queued on the node and not taken yet: one by id, one by selector (only it matches).
    let pinned = submit(&op, stolen.id()).await;
    let any = op
        .submit(&SubmitJobRequest::for_selector(&org_id, "site=icu", Placement::Any, spec()))
        .await
        .expect("submitted by selector");
    assert_eq!(any.node_id, stolen.id());
    op.label_node(spare.id(), &icu).await.expect("label");

    let (status, body) = op_post(&server, &revoke_path(stolen.id()), &serde_json::json!(null)).await;
    assert_eq!(status, StatusCode::OK, "revoke: {body}");
    assert_eq!(op.job(&pinned.job_id).await.expect("job").state, JobState::Cancelled, "pinned: cancelled");
    let audit = op.audit(100).await.expect("audit");
    let entry = audit.entries.iter().find(|e| e.action == "node.revoked").expect("audited");
    assert!(entry.detail.contains("1 queued jobs cancelled"), "{}", entry.detail);

    // The selector's job moves to the other matching node (the placement sweep's next pass).
    let mut moved: Option<PollResponse> = None;
    for _ in 0..20 {
        let got = spare.poll(&[], 2).await;
        if got.jobs.iter().any(|j| j.job_id == any.job_id) {
            moved = Some(got);
            break;
        }
    }
    let moved = moved.expect("the selector's job reached the other node");
    assert_eq!(moved.jobs.iter().find(|j| j.job_id == any.job_id).map(|j| j.attempt), Some(2));
    let job = op.job(&any.job_id).await.expect("job");
    assert_eq!(job.node_id, spare.id());

    // Nothing new goes to the revoked node, by id or by selector.
    let (status, body) =
        answer(op_raw_submit(&server, &SubmitJobRequest::for_node(stolen.id(), spec())).await).await;
    assert_error(&(status, body), StatusCode::CONFLICT, "node_revoked");
    for _ in 0..3 {
        let next = op
            .submit(&SubmitJobRequest::for_selector(&org_id, "site=icu", Placement::Any, spec()))
            .await
            .expect("submitted");
        assert_eq!(next.node_id, spare.id(), "never the revoked node");
    }
}

async fn op_raw_submit(server: &TestServer, req: &SubmitJobRequest) -> reqwest::Response {
    https(server.ca_pem(), None)
        .post(format!("{}{}", server.url(), paths::JOBS))
        .bearer_auth(server.admin_token())
        .json(req)
        .send()
        .await
        .expect("submit sent")
}
