//! Fleet placement through the real API: node labels (the node's own and the operator's),
//! selectors, jobs to `each` / `any` node of a selector, re-placement when a node's lease
//! expires (fencing by attempt number), cancellation, and the capability gate that keeps new
//! messages from agents that do not understand them.

use std::time::Duration;

use outpost_control::client::JobsQuery;
use outpost_control::testing::TestServer;
use outpost_protocol::{
    Announce, Heartbeat, Inventory, JobGroup, JobInfo, JobState, LabelNodeRequest, Labels, Outcome,
    Placement, PollRequest, PollResponse, SubmitJobRequest, paths,
};
use reqwest::StatusCode;

use super::support::{TestNode, assert_error, op_get, op_post, org_and_token, report_for, spec};

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

async fn heartbeat(node: &TestNode, running_jobs: u32, own: &[(&str, &str)]) {
    let hb = Heartbeat {
        agent_version: "test".into(),
        inventory: Inventory::default(),
        running_jobs,
        outbox_depth: 0,
        relay: None,
        models: Vec::new(),
        labels: labels(own),
        announce: Some(Announce::this_build()),
        awaiting_approval: Vec::new(),
    };
    let (status, body) = node.post(paths::NODE_HEARTBEAT, &hb).await;
    assert_eq!(status, StatusCode::OK, "heartbeat: {body}");
}

/// Enrolls `n` nodes in one organisation.
async fn fleet(server: &TestServer, n: usize) -> (String, Vec<TestNode>) {
    let op = server.operator().expect("operator");
    let (org_id, _) = org_and_token(server).await;
    let mut nodes = Vec::new();
    for _ in 0..n {
        let token = op.create_token(&org_id, None).await.expect("token");
        nodes.push(TestNode::enroll(server, &token.token).await);
    }
    (org_id, nodes)
}

fn any_request(org_id: &str, selector: &str) -> SubmitJobRequest {
    SubmitJobRequest::for_selector(org_id, selector, Placement::Any, spec())
}

#[tokio::test]
async fn operator_labels_win_over_the_nodes_own_and_selectors_filter_the_node_list() {
    let server = TestServer::start().await.expect("server");
    let op = server.operator().expect("operator");
    let (org_id, nodes) = fleet(&server, 3).await;
    heartbeat(&nodes[0], 0, &[("site", "icu"), ("gpu", "l4")]).await;
    heartbeat(&nodes[1], 0, &[("site", "lab")]).await;
    heartbeat(&nodes[2], 0, &[]).await;
    let req = LabelNodeRequest { set: labels(&[("site", "icu"), ("rack", "2")]), remove: vec![] };
    let labelled = op.label_node(nodes[1].id(), &req).await.expect("label");
    assert_eq!(labelled.labels, labels(&[("site", "icu"), ("rack", "2")]), "the operator's site wins");
    assert!(labelled.online);

    let ids = |list: outpost_protocol::NodeList| {
        let mut v: Vec<String> = list.nodes.into_iter().map(|n| n.node_id).collect();
        v.sort();
        v
    };
    let mut icu = vec![nodes[0].id().to_owned(), nodes[1].id().to_owned()];
    icu.sort();
    assert_eq!(ids(op.nodes(Some("site=icu"), Some(&org_id)).await.expect("list")), icu);
    assert_eq!(ids(op.nodes(Some("site=icu,!gpu"), None).await.expect("list")), [nodes[1].id()]);
    assert_eq!(ids(op.nodes(Some("!site"), None).await.expect("list")), [nodes[2].id()]);

    let req = LabelNodeRequest { set: Labels::new(), remove: vec!["site".into()] };
    let n = op.label_node(nodes[1].id(), &req).await.expect("unlabel");
    assert_eq!(n.labels.get("site").map(String::as_str), Some("lab"), "the node's own label shows again");

    let err = op.nodes(Some("site in (icu"), None).await.expect_err("bad selector");
    assert!(err.to_string().contains("column 13") && err.to_string().contains("bad_selector"), "{err}");
    let bad = LabelNodeRequest { set: labels(&[("-bad", "x")]), remove: vec![] };
    let err = op.label_node(nodes[0].id(), &bad).await.expect_err("bad label");
    assert!(err.to_string().contains("bad_labels"), "{err}");
    let err = op.label_node("node-nobody", &LabelNodeRequest::default()).await.expect_err("unknown node");
    assert!(err.to_string().contains("404"), "{err}");

    // A node with labels that break the rules is told so, not silently stripped.
    let mut hb = Heartbeat {
        agent_version: "test".into(),
        inventory: Inventory::default(),
        running_jobs: 0,
        outbox_depth: 0,
        relay: None,
        models: Vec::new(),
        labels: labels(&[("site", "bad value")]),
        announce: None,
        awaiting_approval: Vec::new(),
    };
    assert_error(&nodes[2].post(paths::NODE_HEARTBEAT, &hb).await, StatusCode::BAD_REQUEST, "bad_labels");
    hb.labels.clear();
    assert_eq!(nodes[2].post(paths::NODE_HEARTBEAT, &hb).await.0, StatusCode::OK);
}

#[tokio::test]
async fn the_node_list_pages_in_node_id_order_with_a_cursor() {
    let server = TestServer::start().await.expect("server");
    let (org_id, nodes) = fleet(&server, 5).await;
    for (i, node) in nodes.iter().enumerate() {
        heartbeat(node, 0, &[("site", if i % 2 == 0 { "icu" } else { "lab" })]).await;
    }
    let mut all: Vec<String> = nodes.iter().map(|n| n.id().to_owned()).collect();
    all.sort();
    let page = |query: String| {
        let server = &server;
        async move {
            let (status, body) = op_get(server, &format!("{}?{query}", paths::NODES)).await;
            assert_eq!(status, StatusCode::OK, "{query}: {body}");
            let list: outpost_protocol::NodeList = serde_json::from_value(body).expect("a node list");
            (list.nodes.into_iter().map(|n| n.node_id).collect::<Vec<_>>(), list.next_after)
        }
    };
    // Without a limit: every node, and no cursor (what older clients expect).
    let (every, next) = page(format!("org_id={org_id}")).await;
    assert_eq!((every, next), (all.clone(), None));
    // Pages of two, each continuing after the last id of the page before.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    for round in 0.. {
        assert!(round < 5, "paging does not end");
        let query = match &after {
            Some(a) => format!("limit=2&after={a}"),
            None => "limit=2".to_owned(),
        };
        let (ids, next) = page(query).await;
        assert!(ids.len() <= 2);
        seen.extend(ids.clone());
        match next {
            Some(n) => {
                assert_eq!(Some(&n), ids.last(), "the cursor is the page's last id");
                after = Some(n);
            }
            None => break,
        }
    }
    assert_eq!(seen, all, "every node once, in id order");
    // A selector filters before the page is cut.
    let icu: Vec<String> = all
        .iter()
        .filter(|id| nodes.iter().position(|n| n.id() == id.as_str()).is_some_and(|i| i % 2 == 0))
        .cloned()
        .collect();
    let (first, next) = page("selector=site%3Dicu&limit=2".into()).await;
    assert_eq!(first, icu[..2]);
    let (rest, last) = page(format!("selector=site%3Dicu&limit=2&after={}", next.expect("more"))).await;
    assert_eq!((rest, last), (icu[2..].to_vec(), None));
    for bad in ["limit=0", "limit=10001", "after="] {
        let got = op_get(&server, &format!("{}?{bad}", paths::NODES)).await;
        assert_eq!(got.0, StatusCode::BAD_REQUEST, "{bad}: {}", got.1);
    }
}

#[tokio::test]
async fn each_places_one_job_on_every_matching_node_as_a_group() {
    let server = TestServer::start().await.expect("server");
    let op = server.operator().expect("operator");
    let (org_id, nodes) = fleet(&server, 3).await;
    heartbeat(&nodes[0], 0, &[("site", "icu")]).await;
    heartbeat(&nodes[1], 0, &[("site", "icu")]).await;
    heartbeat(&nodes[2], 0, &[("site", "lab")]).await;
    let req = SubmitJobRequest::for_selector(&org_id, "site=icu", Placement::Each, spec());
    let group: JobGroup = op.submit_group(&req).await.expect("group");
    assert_eq!(group.jobs.len(), 2);
    assert_eq!(group.selector, "site=icu");
    for node in &nodes[..2] {
        let poll = node.poll(&[], 1).await;
        assert_eq!(poll.jobs.len(), 1, "one job for each matching node");
        assert!(group.jobs.iter().any(|j| j.job_id == poll.jobs[0].job_id && j.node_id == node.id()));
    }
    assert!(nodes[2].poll(&[], 1).await.jobs.is_empty(), "nothing for a node the selector does not match");
    let listed = op
        .jobs(&JobsQuery { group_id: Some(group.group_id.clone()), limit: 10, ..Default::default() })
        .await
        .expect("list");
    assert_eq!(listed.jobs.len(), 2);
    assert_eq!(op.group(&group.group_id).await.expect("group").jobs.len(), 2);

    // Bad placements are refused with a reason, and nothing is queued.
    let each_to_jobs = op_post(&server, paths::JOBS, &req).await;
    assert_error(&each_to_jobs, StatusCode::BAD_REQUEST, "use_job_groups");
    let none = SubmitJobRequest::for_selector(&org_id, "site=mars", Placement::Each, spec());
    assert_error(&op_post(&server, paths::JOB_GROUPS, &none).await, StatusCode::CONFLICT, "no_matching_node");
    let broken = SubmitJobRequest::for_selector(&org_id, "site in", Placement::Any, spec());
    let got = op_post(&server, paths::JOBS, &broken).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "bad_selector");
    assert!(got.1["message"].as_str().is_some_and(|m| m.contains("column 8")), "{}", got.1);
    let mut both = any_request(&org_id, "site=icu");
    both.node_id = nodes[0].id().into();
    assert_error(&op_post(&server, paths::JOBS, &both).await, StatusCode::BAD_REQUEST, "bad_target");
    let mut no_placement = any_request(&org_id, "site=icu");
    no_placement.placement = None;
    assert_error(&op_post(&server, paths::JOBS, &no_placement).await, StatusCode::BAD_REQUEST, "bad_target");
    let mut no_org = any_request(&org_id, "site=icu");
    no_org.org_id = None;
    assert_error(&op_post(&server, paths::JOBS, &no_org).await, StatusCode::BAD_REQUEST, "bad_target");
    assert!(nodes[0].poll(&[], 0).await.jobs.len() == 1, "still only the group's job");
}

#[tokio::test]
async fn any_goes_to_the_least_loaded_online_node_and_moves_when_its_lease_expires() {
    let server = TestServer::start_with_lease(Duration::from_secs(2)).await.expect("server");
    let op = server.operator().expect("operator");
    let (org_id, nodes) = fleet(&server, 3).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    heartbeat(a, 0, &[("rack", "r1")]).await;
    heartbeat(b, 3, &[("rack", "r1")]).await;
    heartbeat(c, 0, &[("rack", "r2")]).await;
    let job: JobInfo = op.submit(&any_request(&org_id, "rack=r1")).await.expect("submit");
    assert_eq!(job.node_id, a.id(), "the least loaded matching node");
    assert_eq!((job.attempt, job.placement), (1, Some(Placement::Any)));
    let first = a.poll(&[], 1).await;
    assert_eq!(first.jobs.len(), 1);
    a.poll(&[&job.job_id], 0).await;

    // a goes silent; b keeps heartbeating, so the job moves to b as attempt 2.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let moved = loop {
        heartbeat(b, 0, &[("rack", "r1")]).await;
        let now = op.job(&job.job_id).await.expect("job");
        if now.attempt == 2 {
            break now;
        }
        assert!(tokio::time::Instant::now() < deadline, "the job was not re-placed: {now:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!((moved.node_id.as_str(), moved.state), (b.id(), JobState::Queued));
    assert_eq!(moved.superseded.len(), 1);
    assert_eq!((moved.superseded[0].attempt, moved.superseded[0].node_id.as_str()), (1, a.id()));
    assert!(moved.superseded[0].reason.contains("silent"), "{}", moved.superseded[0].reason);
    let second = b.poll(&[], 1).await;
    assert_eq!((second.jobs.len(), second.jobs[0].attempt), (1, 2));

    // a comes back: it is told to stop attempt 1, and its late result is kept, not counted.
    let back = a.poll(&[], 0).await;
    assert_eq!(back.cancel.len(), 1, "{back:?}");
    assert_eq!((back.cancel[0].job_id.as_str(), back.cancel[0].attempt), (job.job_id.as_str(), 1));
    let late = report_for(&first.jobs[0], Outcome::Succeeded);
    assert_eq!(a.report(&late).await.0, StatusCode::OK, "acknowledged, so the node stops retrying");
    let after = op.job(&job.job_id).await.expect("job");
    assert!(after.result.is_none(), "a superseded attempt's result is not the job's result");
    assert!(after.superseded[0].late_result.is_some());
    assert!(a.poll(&[], 0).await.cancel.is_empty(), "the stop request was answered");

    let done = report_for(&second.jobs[0], Outcome::Succeeded);
    assert_eq!(b.report(&done).await.0, StatusCode::OK);
    let finished = op.job(&job.job_id).await.expect("job");
    assert_eq!((finished.state, finished.result.map(|r| r.attempt)), (JobState::Finished, Some(2)));
    let audit = op.audit(100).await.expect("audit");
    assert!(audit.entries.iter().any(|e| e.action == "job.replaced"), "the move is audited");
    assert!(audit.entries.iter().any(|e| e.action == "job.result.superseded"));
}

#[tokio::test]
async fn an_any_job_with_no_node_online_waits_for_the_one_seen_last() {
    let server = TestServer::start_with_lease(Duration::from_secs(1)).await.expect("server");
    let op = server.operator().expect("operator");
    let (org_id, nodes) = fleet(&server, 2).await;
    heartbeat(&nodes[0], 0, &[("rack", "r1")]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    heartbeat(&nodes[1], 0, &[("rack", "r1")]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let job = op.submit(&any_request(&org_id, "rack=r1")).await.expect("submit");
    assert_eq!(job.node_id, nodes[1].id(), "seen last");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let still = op.job(&job.job_id).await.expect("job");
    assert_eq!((still.attempt, still.node_id.as_str()), (1, nodes[1].id()), "nowhere better to go");
}

#[tokio::test]
async fn cancel_ends_a_queued_job_at_once_and_asks_the_node_for_a_running_one() {
    let server = TestServer::start().await.expect("server");
    let op = server.operator().expect("operator");
    let (_, nodes) = fleet(&server, 1).await;
    let node = &nodes[0];
    heartbeat(node, 0, &[]).await;
    let queued = super::support::submit(&op, node.id()).await;
    let cancelled = op.cancel(&queued.job_id).await.expect("cancel");
    assert_eq!(cancelled.state, JobState::Cancelled);

    let running = super::support::submit(&op, node.id()).await;
    let poll = node.poll(&[], 1).await;
    let offered: Vec<&str> = poll.jobs.iter().map(|j| j.job_id.as_str()).collect();
    assert_eq!(offered, [running.job_id.as_str()], "a cancelled job is never offered");
    node.poll(&[&running.job_id], 0).await;
    let asked = op.cancel(&running.job_id).await.expect("cancel");
    assert_eq!(asked.state, JobState::Accepted);
    assert!(asked.cancel_requested_unix_ms.is_some());

    // An agent that did not announce `cancel` is never sent one (version skew).
    let old = PollRequest { wait_secs: Some(0), ..Default::default() };
    let (status, body) = node.post(paths::NODE_POLL, &old).await;
    assert_eq!(status, StatusCode::OK);
    let body: PollResponse = serde_json::from_value(body).expect("poll response");
    assert!(body.cancel.is_empty());

    let poll = node.poll(&[], 1).await;
    let stops: Vec<(&str, u32)> = poll.cancel.iter().map(|c| (c.job_id.as_str(), c.attempt)).collect();
    assert!(stops.contains(&(running.job_id.as_str(), 1)), "{stops:?}");
    let report = report_for(&poll_assignment(&running), Outcome::Cancelled);
    assert_eq!(node.report(&report).await.0, StatusCode::OK);
    let ended = op.job(&running.job_id).await.expect("job");
    assert_eq!(ended.state, JobState::Cancelled);

    // An agent that never announced `cancel` cannot be told to stop a job it runs: 409, no change.
    let stuck = super::support::submit(&op, node.id()).await;
    node.poll(&[], 1).await;
    node.poll(&[&stuck.job_id], 0).await;
    let mut old_hb_node = Heartbeat {
        agent_version: "old".into(),
        inventory: Inventory::default(),
        running_jobs: 1,
        outbox_depth: 0,
        relay: None,
        models: Vec::new(),
        labels: Labels::new(),
        announce: None,
        awaiting_approval: Vec::new(),
    };
    assert_eq!(node.post(paths::NODE_HEARTBEAT, &old_hb_node).await.0, StatusCode::OK);
    let refused = op_post(&server, &paths::fill(paths::JOB_CANCEL, "job_id", &stuck.job_id), &()).await;
    assert_error(&refused, StatusCode::CONFLICT, "cannot_cancel");
    assert!(op.job(&stuck.job_id).await.expect("job").cancel_requested_unix_ms.is_none());
    old_hb_node.announce = Some(Announce::this_build());
    assert_eq!(node.post(paths::NODE_HEARTBEAT, &old_hb_node).await.0, StatusCode::OK);

    let again = op_post(&server, &paths::fill(paths::JOB_CANCEL, "job_id", &running.job_id), &()).await;
    assert_error(&again, StatusCode::CONFLICT, "job_ended");
    let missing = op_post(&server, &paths::fill(paths::JOB_CANCEL, "job_id", "nope"), &()).await;
    assert_error(&missing, StatusCode::NOT_FOUND, "not_found");
}

/// The assignment a node got for attempt 1 of `job` (enough to build its report).
fn poll_assignment(job: &JobInfo) -> outpost_protocol::JobAssignment {
    outpost_protocol::JobAssignment {
        job_id: job.job_id.clone(),
        attempt: job.attempt,
        envelope: outpost_protocol::SignedEnvelope {
            payload: String::new(),
            key_id: String::new(),
            signature_hex: String::new(),
        },
    }
}

/// A node's site policy has the last word on that node, not on the job: an `any` job it refuses
/// goes to another matching node as a new attempt; with no node left, the refusal is the result.
#[tokio::test]
async fn an_any_job_a_site_policy_refuses_moves_on_and_ends_refused_when_no_node_is_left() {
    let server = TestServer::start().await.expect("server");
    let op = server.operator().expect("operator");
    let (org_id, nodes) = fleet(&server, 2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    heartbeat(a, 0, &[("rack", "r1")]).await;
    heartbeat(b, 2, &[("rack", "r1")]).await;
    let job: JobInfo = op.submit(&any_request(&org_id, "rack=r1")).await.expect("submit");
    assert_eq!(job.node_id, a.id(), "the least loaded matching node first");

    let first = a.poll(&[], 1).await;
    let mut refused = report_for(&first.jobs[0], Outcome::Refused);
    refused.error = Some("refused by the site policy: policy.images does not allow image sha256:ab".into());
    assert_eq!(a.report(&refused).await.0, StatusCode::OK);
    let moved = op.job(&job.job_id).await.expect("job");
    assert_eq!(
        (moved.attempt, moved.node_id.as_str(), moved.state),
        (2, b.id(), JobState::Queued),
        "{moved:?}"
    );
    assert!(moved.superseded[0].reason.contains("refused it: refused by the site policy"), "{moved:?}");
    assert_eq!(moved.superseded[0].late_result.as_ref().map(|r| r.outcome), Some(Outcome::Refused));
    assert!(moved.result.is_none());

    // b refuses too, and a held it already: the refusal is the job's result.
    let second = b.poll(&[], 1).await;
    assert_eq!((second.jobs.len(), second.jobs[0].attempt), (1, 2));
    let mut refused = report_for(&second.jobs[0], Outcome::Refused);
    refused.error = Some("refused by the site policy: policy.kinds does not allow kind container".into());
    assert_eq!(b.report(&refused).await.0, StatusCode::OK);
    let done = op.job(&job.job_id).await.expect("job");
    assert_eq!(done.state, JobState::Finished, "{done:?}");
    assert_eq!(done.result.map(|r| (r.attempt, r.outcome)), Some((2, Outcome::Refused)));
    let audit = op.audit(100).await.expect("audit");
    assert!(audit.entries.iter().any(|e| e.action == "job.replaced" && e.detail.contains("refused it")));
}
