//! Relay events: delivery by mutual TLS (stored once per node and seq), validation, listing by
//! seq and by cursor, and the long-poll that wakes when events arrive.

use std::time::{Duration, Instant};

use outpost_control::client::EventsQuery;
use outpost_control::testing::TestServer;
use outpost_protocol::{EventBatch, MAX_EVENTS_PER_BATCH, paths};
use reqwest::StatusCode;
use serde_json::json;

use crate::support::{TestNode, answer, assert_error, https, object_event, org_and_token};

async fn server_with_node() -> (TestServer, TestNode) {
    let server = TestServer::start().await.expect("server");
    let (_, token) = org_and_token(&server).await;
    let node = TestNode::enroll(&server, &token).await;
    (server, node)
}

fn of_node(node_id: &str) -> EventsQuery {
    EventsQuery { node_id: Some(node_id.into()), ..EventsQuery::default() }
}

#[tokio::test]
async fn a_batch_is_stored_in_seq_order_and_listed() {
    let (server, node) = server_with_node().await;
    let op = server.operator().expect("operator");
    let batch = [object_event(1, "in/a.jpg"), object_event(2, "in/b.jpg"), object_event(3, "in/c.jpg")];
    assert_eq!(node.deliver_ok(&batch).await, (3, 0, 3));

    let listed = op.events(&of_node(node.id())).await.expect("events").events;
    assert_eq!(listed.iter().map(|e| e.event.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(listed[1].event, batch[1], "stored as delivered");
    assert!(listed.iter().all(|e| e.node_id == node.id() && e.org_id == node.enrolled.org_id));
    assert!(listed.windows(2).all(|w| w[0].cursor < w[1].cursor));

    let after = op.events(&EventsQuery { after_seq: Some(1), ..of_node(node.id()) }).await.expect("events");
    assert_eq!(after.events.iter().map(|e| e.event.seq).collect::<Vec<_>>(), [2, 3]);
    let by_cursor = EventsQuery { cursor: Some(listed[0].cursor), limit: Some(1), ..EventsQuery::default() };
    let page = op.events(&by_cursor).await.expect("events").events;
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].event.seq, 2, "the cursor resumes after the last event seen");
    let newest = EventsQuery { newest: true, limit: Some(1), ..EventsQuery::default() };
    assert_eq!(op.events(&newest).await.expect("events").events[0].event.seq, 3);
}

#[tokio::test]
async fn a_resent_batch_counts_duplicates_and_stores_nothing_twice() {
    let (server, node) = server_with_node().await;
    let op = server.operator().expect("operator");
    let batch = [object_event(1, "a"), object_event(2, "b")];
    assert_eq!(node.deliver_ok(&batch).await, (2, 0, 2));
    assert_eq!(node.deliver_ok(&batch).await, (0, 2, 2));
    let overlapping = [object_event(2, "b"), object_event(3, "c")];
    assert_eq!(node.deliver_ok(&overlapping).await, (1, 1, 3));
    let listed = op.events(&EventsQuery::default()).await.expect("events").events;
    assert_eq!(listed.iter().map(|e| e.event.seq).collect::<Vec<_>>(), [1, 2, 3]);
}

#[tokio::test]
async fn a_seq_gap_is_stored_and_audited() {
    let (server, node) = server_with_node().await;
    let op = server.operator().expect("operator");
    node.deliver_ok(&[object_event(1, "a")]).await;
    assert_eq!(node.deliver_ok(&[object_event(5, "e")]).await, (1, 0, 5));
    assert_eq!(op.events(&of_node(node.id())).await.expect("events").events.len(), 2);
    let audit = op.audit(100).await.expect("audit");
    let gaps: Vec<_> = audit.entries.iter().filter(|e| e.action == "event.gap").collect();
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert!(gaps[0].detail.contains("from 1 to 5"), "{}", gaps[0].detail);
}

#[tokio::test]
async fn malformed_empty_oversized_and_disordered_batches_are_refused() {
    let (server, node) = server_with_node().await;
    let url = format!("{}{}", node.base, paths::NODE_EVENTS);
    let raw = |body: &'static str| {
        node.http.post(&url).header("content-type", "application/json").body(body).send()
    };
    assert_error(
        &answer(raw("{\"events\": [").await.expect("sent")).await,
        StatusCode::BAD_REQUEST,
        "bad_json",
    );

    let mut unknown = serde_json::to_value(EventBatch { events: vec![object_event(1, "a")] }).expect("json");
    unknown["events"][0]["privileged"] = json!(true);
    assert_error(&node.post(paths::NODE_EVENTS, &unknown).await, StatusCode::BAD_REQUEST, "invalid_body");

    assert_error(&node.deliver(&[]).await, StatusCode::BAD_REQUEST, "bad_batch");
    let too_many: Vec<_> = (1..=MAX_EVENTS_PER_BATCH as u64 + 1).map(|s| object_event(s, "k")).collect();
    assert_error(&node.deliver(&too_many).await, StatusCode::BAD_REQUEST, "bad_batch");

    let backwards = [object_event(2, "a"), object_event(1, "b")];
    let got = node.deliver(&backwards).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "bad_event");
    assert!(got.1["message"].as_str().is_some_and(|m| m.contains("increase")), "{}", got.1);
    assert_error(&node.deliver(&[object_event(0, "a")]).await, StatusCode::BAD_REQUEST, "bad_event");
    assert_error(&node.deliver(&[object_event(1, "")]).await, StatusCode::BAD_REQUEST, "bad_event");
    let mut upper = object_event(1, "a");
    upper.sha256 = Some("AB".repeat(32));
    assert_error(&node.deliver(&[upper]).await, StatusCode::BAD_REQUEST, "bad_event");
    let mut no_watch = object_event(1, "a");
    no_watch.watch.clear();
    assert_error(&node.deliver(&[no_watch]).await, StatusCode::BAD_REQUEST, "bad_event");

    let op = server.operator().expect("operator");
    assert!(op.events(&EventsQuery::default()).await.expect("events").events.is_empty(), "nothing stored");
    // The exact maximum is fine.
    let max: Vec<_> = (1..=MAX_EVENTS_PER_BATCH as u64).map(|s| object_event(s, "k")).collect();
    assert_eq!(node.deliver_ok(&max).await, (MAX_EVENTS_PER_BATCH as u32, 0, MAX_EVENTS_PER_BATCH as u64));
}

#[tokio::test]
async fn events_need_a_node_certificate_and_listing_needs_the_admin_token() {
    let (server, _node) = server_with_node().await;
    let anonymous = https(server.ca_pem(), None);
    let batch = EventBatch { events: vec![object_event(1, "a")] };
    let url = format!("{}{}", server.url(), paths::NODE_EVENTS);
    let got = answer(anonymous.post(&url).json(&batch).send().await.expect("sent")).await;
    assert_error(&got, StatusCode::UNAUTHORIZED, "client_cert_required");
    // The admin token is not a node certificate.
    let got = answer(
        anonymous.post(&url).bearer_auth(server.admin_token()).json(&batch).send().await.expect("sent"),
    )
    .await;
    assert_error(&got, StatusCode::UNAUTHORIZED, "client_cert_required");
    let list = format!("{}{}", server.url(), paths::EVENTS);
    let got = answer(anonymous.get(&list).send().await.expect("sent")).await;
    assert_error(&got, StatusCode::UNAUTHORIZED, "unauthenticated");
}

#[tokio::test]
async fn bad_list_queries_are_refused() {
    let (server, _node) = server_with_node().await;
    let http = https(server.ca_pem(), None);
    for query in ["after_seq=1", "node_id=n&after_seq=1&cursor=2", "limit=many", "colour=red"] {
        let url = format!("{}{}?{query}", server.url(), paths::EVENTS);
        let got = answer(http.get(&url).bearer_auth(server.admin_token()).send().await.expect("sent")).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "bad_query");
    }
}

#[tokio::test]
async fn a_held_listing_wakes_when_an_event_arrives() {
    let (server, node) = server_with_node().await;
    let op = server.operator().expect("operator");
    node.deliver_ok(&[object_event(1, "old")]).await;
    let seen = op.events(&EventsQuery::default()).await.expect("events").events;
    let cursor = seen.last().expect("one event").cursor;

    let started = Instant::now();
    let held = tokio::spawn(async move {
        op.events(&EventsQuery { cursor: Some(cursor), wait_secs: Some(25), ..EventsQuery::default() }).await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    node.deliver_ok(&[object_event(2, "new")]).await;
    let got = tokio::time::timeout(Duration::from_secs(20), held)
        .await
        .expect("answered before the wait ran out")
        .expect("task")
        .expect("events");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(got.events.len(), 1);
    assert_eq!(got.events[0].event.key, "new");
}

#[tokio::test]
async fn a_held_listing_answers_empty_when_its_wait_runs_out() {
    let (server, node) = server_with_node().await;
    let op = server.operator().expect("operator");
    node.deliver_ok(&[object_event(1, "a")]).await;
    let started = Instant::now();
    let q = EventsQuery { after_seq: Some(1), wait_secs: Some(1), ..of_node(node.id()) };
    let got = op.events(&q).await.expect("events");
    assert!(got.events.is_empty());
    assert!(started.elapsed() >= Duration::from_secs(1), "held for its wait");
    // Events of another node do not end the wait with a wrong answer.
    let (_, token) = org_and_token(&server).await;
    let other = TestNode::enroll(&server, &token).await;
    let q = EventsQuery { wait_secs: Some(2), ..q };
    let held = tokio::spawn(async move { op.events(&q).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    other.deliver_ok(&[object_event(1, "b")]).await;
    assert!(held.await.expect("task").expect("events").events.is_empty());
}
