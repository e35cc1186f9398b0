//! A restarted server (same data directory) keeps its CA, admin token and every record, and
//! the nodes' certificates keep working.

use outpost_control::client::EventsQuery;
use outpost_control::testing::TestServer;
use outpost_protocol::JobState;

use crate::support::{TestNode, https, object_event, org_and_token, submit, succeeded, trigger_request};

#[tokio::test]
async fn a_restart_keeps_the_ca_orgs_nodes_jobs_and_results() {
    let server = TestServer::start().await.expect("server");
    let (org_id, token) = org_and_token(&server).await;
    let mut node = TestNode::enroll(&server, &token).await;
    let op = server.operator().expect("operator");
    let done = submit(&op, node.id()).await;
    node.poll(&[], 0).await;
    node.report(&succeeded(&done.job_id, "kept")).await;
    let pending = submit(&op, node.id()).await;
    let (fingerprint, admin_token) = (server.ca_fingerprint().to_owned(), server.admin_token().to_owned());

    let server = server.restart().await.expect("restarted");
    assert_eq!(server.ca_fingerprint(), fingerprint);
    assert_eq!(server.admin_token(), admin_token);
    let op = server.operator().expect("operator");
    assert!(op.list_orgs().await.expect("orgs").iter().any(|o| o.id == org_id));
    assert_eq!(op.node(node.id()).await.expect("node").org_id, org_id);
    let finished = op.job(&done.job_id).await.expect("job");
    assert_eq!(finished.state, JobState::Finished);
    assert_eq!(finished.result.expect("result").stdout_tail, "kept");

    // The node's certificate still works, and its queued job is offered.
    node.base = server.url();
    node.http = https(&node.enrolled.ca_pem, Some((&node.enrolled.cert_pem, &node.key_pem)));
    let offered = node.poll(&[], 0).await;
    assert!(offered.jobs.iter().any(|j| j.job_id == pending.job_id));
    assert!(offered.jobs.iter().all(|j| j.job_id != done.job_id));
    // Sequence numbers continue after the restart.
    let next = submit(&op, node.id()).await;
    assert!(next.seq > pending.seq);
    server.stop().await;
}

#[tokio::test]
async fn a_restart_keeps_events_cursors_and_triggers_and_a_resend_fires_nothing_new() {
    let server = TestServer::start().await.expect("server");
    let (org_id, token) = org_and_token(&server).await;
    let mut node = TestNode::enroll(&server, &token).await;
    let op = server.operator().expect("operator");
    let trigger = op.create_trigger(&trigger_request(&org_id, "in", "in/")).await.expect("trigger");
    let batch = [object_event(1, "in/a"), object_event(2, "skip/b")];
    assert_eq!(node.deliver_ok(&batch).await, (2, 0, 2));
    let before = op.events(&EventsQuery::default()).await.expect("events").events;

    let server = server.restart().await.expect("restarted");
    let op = server.operator().expect("operator");
    node.base = server.url();
    node.http = https(&node.enrolled.ca_pem, Some((&node.enrolled.cert_pem, &node.key_pem)));
    assert_eq!(op.events(&EventsQuery::default()).await.expect("events").events, before);
    assert_eq!(op.trigger(&trigger.trigger_id).await.expect("trigger"), trigger);

    // The node resends (its ack was lost in the restart) and sends one more.
    assert_eq!(
        node.deliver_ok(&[batch[0].clone(), batch[1].clone(), object_event(3, "in/c")]).await,
        (1, 2, 3)
    );
    let jobs = op
        .jobs(&outpost_control::client::JobsQuery {
            node_id: Some(node.id().into()),
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("jobs")
        .jobs;
    assert_eq!(jobs.len(), 2, "one job per matching event: {jobs:?}");
    let after = op
        .events(&EventsQuery { cursor: Some(before[1].cursor), ..EventsQuery::default() })
        .await
        .expect("events")
        .events;
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].event.seq, 3);
    assert!(after[0].cursor > before[1].cursor, "cursors continue after a restart");
    assert_eq!(after[0].triggered_jobs.len(), 1);
    server.stop().await;
}
