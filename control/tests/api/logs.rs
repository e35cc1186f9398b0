//! Live job logs: the operator's request reaches the node in its poll answer, the node's chunks
//! come back in order (a repeated one adds nothing), a refusal is audited and ends in the
//! result's tails, and a node that did not announce `logs` is never asked.

use std::time::Duration;

use outpost_control::testing::TestServer;
use outpost_protocol::{
    Announce, Heartbeat, Inventory, JobLogs, LogChunk, LogChunkAck, LogRequest, LogSource, paths,
};
use reqwest::StatusCode;

use super::support::{TestNode, org_and_token, submit, succeeded};

async fn heartbeat(node: &TestNode, announce: Option<Announce>) {
    let hb = Heartbeat {
        agent_version: "test".into(),
        inventory: Inventory::default(),
        running_jobs: 1,
        outbox_depth: 0,
        relay: None,
        models: Vec::new(),
        labels: Default::default(),
        announce,
        awaiting_approval: Vec::new(),
    };
    let (status, body) = node.post(paths::NODE_HEARTBEAT, &hb).await;
    assert_eq!(status, StatusCode::OK, "heartbeat: {body}");
}

async fn logs(server: &TestServer, job_id: &str, query: &str) -> (StatusCode, serde_json::Value) {
    let http = super::support::https(server.ca_pem(), None);
    let url = format!("{}{}?{query}", server.url(), paths::fill(paths::JOB_LOGS, "job_id", job_id));
    super::support::answer(http.get(url).bearer_auth(server.admin_token()).send().await.expect("GET logs"))
        .await
}

async fn logs_ok(server: &TestServer, job_id: &str, query: &str) -> JobLogs {
    let (status, body) = logs(server, job_id, query).await;
    assert_eq!(status, StatusCode::OK, "logs: {body}");
    serde_json::from_value(body).expect("JobLogs")
}

fn chunk(req: &LogRequest, offset: u64, data: &str) -> LogChunk {
    LogChunk {
        request_id: req.request_id.clone(),
        job_id: req.job_id.clone(),
        attempt: req.attempt,
        offset,
        data: data.into(),
        eof: false,
        refused: None,
        note: None,
    }
}

async fn send(node: &TestNode, c: &LogChunk) -> LogChunkAck {
    let (status, body) = node.post(paths::NODE_LOGS, c).await;
    assert_eq!(status, StatusCode::OK, "chunk: {body}");
    serde_json::from_value(body).expect("LogChunkAck")
}

/// One node of a fresh org that has taken one job (accepted).
async fn running_job(server: &TestServer, announce: Option<Announce>) -> (TestNode, String) {
    let op = server.operator().expect("operator");
    let (_, token) = org_and_token(server).await;
    let node = TestNode::enroll(server, &token).await;
    heartbeat(&node, announce).await;
    let job = submit(&op, node.id()).await;
    node.poll(&[], 1).await;
    node.poll(&[&job.job_id], 0).await;
    (node, job.job_id)
}

#[tokio::test]
async fn an_operator_reads_a_running_jobs_output_as_the_node_streams_it() {
    let server = TestServer::start().await.expect("server");
    let (node, job_id) = running_job(&server, Some(Announce::this_build())).await;

    // The operator's first read opens the stream; nothing has come yet.
    let first = logs_ok(&server, &job_id, "follow=true").await;
    assert_eq!((first.source, first.done, first.next), (LogSource::Pending, false, 0), "{first:?}");

    // The node is asked in its next poll, until it answers.
    let poll = node.poll(&[], 0).await;
    assert_eq!(poll.logs.len(), 1, "{poll:?}");
    let req = poll.logs[0].clone();
    assert_eq!((req.job_id.as_str(), req.attempt, req.follow), (job_id.as_str(), 1, true));
    assert_eq!(node.poll(&[], 0).await.logs, vec![req.clone()], "offered again until answered");

    // A held read is answered as soon as a chunk arrives.
    let reader = {
        let (url, ca, token) =
            (server.url().to_owned(), server.ca_pem().to_owned(), server.admin_token().to_owned());
        let path = paths::fill(paths::JOB_LOGS, "job_id", &job_id);
        tokio::spawn(async move {
            let http = super::support::https(&ca, None);
            let resp = http
                .get(format!("{url}{path}?follow=true&wait_secs=20"))
                .bearer_auth(token)
                .send()
                .await
                .expect("GET");
            resp.json::<JobLogs>().await.expect("JobLogs")
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(send(&node, &chunk(&req, 0, "line 1\n")).await.keep);
    let held = tokio::time::timeout(Duration::from_secs(15), reader).await.expect("answered").expect("task");
    assert_eq!((held.source, held.data.as_str(), held.next), (LogSource::Live, "line 1\n", 7), "{held:?}");
    assert!(node.poll(&[], 0).await.logs.is_empty(), "answered requests are not offered again");

    // A repeated chunk adds nothing; an overlapping one only its new part.
    send(&node, &chunk(&req, 0, "line 1\n")).await;
    send(&node, &chunk(&req, 0, "line 1\nline 2\n")).await;
    let all = logs_ok(&server, &job_id, "after=0&follow=true").await;
    assert_eq!(all.data, "line 1\nline 2\n");
    let rest = logs_ok(&server, &job_id, "after=7&follow=true").await;
    assert_eq!((rest.offset, rest.data.as_str(), rest.next), (7, "line 2\n", 14));

    // The end of the stream ends the read; later chunks are told to stop.
    let mut end = chunk(&req, 14, "bye\n");
    end.eof = true;
    end.note = Some("the output ended".into());
    assert!(!send(&node, &end).await.keep);
    let last = logs_ok(&server, &job_id, "after=14&follow=true").await;
    assert_eq!(
        (last.data.as_str(), last.done, last.note.as_deref()),
        ("bye\n", true, Some("the output ended"))
    );
    assert!(!send(&node, &chunk(&req, 18, "late")).await.keep);

    // Another node cannot write into this stream.
    let (other, _) = running_job(&server, Some(Announce::this_build())).await;
    assert!(!send(&other, &chunk(&req, 18, "forged")).await.keep);
    assert!(!logs_ok(&server, &job_id, "after=0&follow=true").await.data.contains("forged"));

    // Once the job has ended, a reader at the end is done at once.
    let (status, _) = node.report(&succeeded(&job_id, "the tail\n")).await;
    assert_eq!(status, StatusCode::OK);
    let after = logs_ok(&server, &job_id, "after=18&follow=true&wait_secs=5").await;
    assert_eq!((after.data.as_str(), after.done), ("", true), "{after:?}");
}

#[tokio::test]
async fn a_refusal_by_the_node_is_audited_and_the_result_tails_follow() {
    let server = TestServer::start().await.expect("server");
    let op = server.operator().expect("operator");
    let (node, job_id) = running_job(&server, Some(Announce::this_build())).await;
    logs_ok(&server, &job_id, "follow=true").await;
    let req = node.poll(&[], 0).await.logs.remove(0);
    let mut refusal = chunk(&req, 0, "");
    refusal.eof = true;
    refusal.refused = Some("this node's egress policy does not allow live logs".into());
    assert!(!send(&node, &refusal).await.keep);

    let l = logs_ok(&server, &job_id, "follow=true").await;
    assert!(l.refused.as_deref().is_some_and(|r| r.contains("egress policy")), "{l:?}");
    assert_eq!((l.source, l.done, l.data.as_str()), (LogSource::Pending, false, ""), "{l:?}");
    let audit = op.audit(100).await.expect("audit");
    assert!(
        audit.entries.iter().any(|e| e.action == "job.logs.refused" && e.detail.contains(&job_id)),
        "{audit:?}"
    );

    let mut report = succeeded(&job_id, "out tail\n");
    report.stderr_tail = "err tail\n".into();
    assert_eq!(node.report(&report).await.0, StatusCode::OK);
    let tails = logs_ok(&server, &job_id, "follow=true").await;
    assert_eq!(tails.source, LogSource::ResultTail, "{tails:?}");
    assert_eq!((tails.data.as_str(), tails.done), ("out tail\nerr tail\n", true));
    assert!(tails.refused.is_some());
}

#[tokio::test]
async fn a_node_that_did_not_announce_logs_is_never_asked() {
    let server = TestServer::start().await.expect("server");
    let old = Announce { protocol: 2, capabilities: vec!["cancel".into(), "labels".into()] };
    let (node, job_id) = running_job(&server, Some(old)).await;
    let l = logs_ok(&server, &job_id, "follow=true").await;
    assert_eq!((l.source, l.done), (LogSource::Pending, false));
    assert!(l.note.as_deref().is_some_and(|n| n.contains("too old")), "{l:?}");
    let once = logs_ok(&server, &job_id, "").await;
    assert!(once.done, "without follow there is nothing to wait for: {once:?}");
    let req = outpost_protocol::PollRequest {
        wait_secs: Some(0),
        announce: Some(Announce { protocol: 2, capabilities: vec!["cancel".into()] }),
        ..Default::default()
    };
    let (status, body) = node.post(paths::NODE_POLL, &req).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.get("logs").is_none(), "{body}");
}

#[tokio::test]
async fn logs_of_an_unknown_job_and_bad_queries_are_refused_clearly() {
    let server = TestServer::start().await.expect("server");
    let (status, body) = logs(&server, "no-such-job", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (_, job_id) = running_job(&server, Some(Announce::this_build())).await;
    let (status, body) = logs(&server, &job_id, "after=minus-one").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = logs(&server, &job_id, "tail=5").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "unknown parameters are refused: {body}");
}

#[tokio::test]
async fn an_oversized_chunk_is_refused() {
    let server = TestServer::start().await.expect("server");
    let (node, job_id) = running_job(&server, Some(Announce::this_build())).await;
    logs_ok(&server, &job_id, "").await;
    let req = node.poll(&[], 0).await.logs.remove(0);
    let big = chunk(&req, 0, &"x".repeat(outpost_protocol::MAX_LOG_CHUNK_BYTES + 1));
    let (status, body) = node.post(paths::NODE_LOGS, &big).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["code"], "chunk_too_large");
}

#[tokio::test]
async fn a_job_that_ended_before_its_stream_began_shows_its_result_tails() {
    let server = TestServer::start().await.expect("server");
    let (node, job_id) = running_job(&server, Some(Announce::this_build())).await;
    logs_ok(&server, &job_id, "follow=true").await;
    let req = node.poll(&[], 0).await.logs.remove(0);
    let mut end = chunk(&req, 0, "");
    end.eof = true;
    end.note = Some("the job is not running on this node".into());
    send(&node, &end).await;
    let waiting = logs_ok(&server, &job_id, "follow=true").await;
    assert!(!waiting.done, "with follow, the result is waited for: {waiting:?}");
    assert_eq!(node.report(&succeeded(&job_id, "all it said\n")).await.0, StatusCode::OK);
    let tails = logs_ok(&server, &job_id, "follow=true&wait_secs=5").await;
    assert_eq!(
        (tails.source, tails.data.as_str(), tails.done),
        (LogSource::ResultTail, "all it said\n", true)
    );
}

#[tokio::test]
async fn a_new_read_without_follow_asks_the_node_again_and_never_joins_a_followed_stream() {
    let server = TestServer::start().await.expect("server");
    let (node, job_id) = running_job(&server, Some(Announce::this_build())).await;
    logs_ok(&server, &job_id, "").await;
    let first = node.poll(&[], 0).await.logs.remove(0);
    assert!(!first.follow);
    let mut all = chunk(&first, 0, "so far\n");
    all.eof = true;
    send(&node, &all).await;
    let read = logs_ok(&server, &job_id, "").await;
    assert_eq!((read.data.as_str(), read.done), ("so far\n", true));

    // Read again later: a new request, not the old answer.
    logs_ok(&server, &job_id, "").await;
    let again = node.poll(&[], 0).await.logs;
    assert_eq!(again.len(), 1, "{again:?}");
    assert_ne!(again[0].request_id, first.request_id);

    // A follower gets its own stream, which the completed one-off read does not end.
    let f = logs_ok(&server, &job_id, "follow=true").await;
    assert!(!f.done, "{f:?}");
    let offered = node.poll(&[], 0).await.logs;
    assert!(offered.iter().any(|r| r.follow), "{offered:?}");
}
