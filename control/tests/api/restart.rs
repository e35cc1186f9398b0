//! A restarted server (same data directory) keeps its CA, admin token and every record, and
//! the nodes' certificates keep working.

use outpost_control::testing::TestServer;
use outpost_protocol::JobState;

use crate::support::{TestNode, https, org_and_token, submit, succeeded};

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
