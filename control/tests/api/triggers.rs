//! Org-level triggers: validation, firing exactly once per event (resends included), matching
//! rules, and deletion.

use outpost_control::client::{Client, EventsQuery};
use outpost_control::testing::TestServer;
use outpost_protocol::{JobEnvelope, JobInfo, SubmitJobRequest, Trigger, paths};
use reqwest::StatusCode;

use crate::support::{
    TestNode, answer, assert_error, https, object_event, org_and_token, spec, trigger_request,
};

async fn server_with_node() -> (TestServer, String, TestNode) {
    let server = TestServer::start().await.expect("server");
    let (org_id, token) = org_and_token(&server).await;
    let node = TestNode::enroll(&server, &token).await;
    (server, org_id, node)
}

async fn jobs_of(op: &Client, node_id: &str) -> Vec<JobInfo> {
    op.jobs(&outpost_control::client::JobsQuery {
        node_id: Some(node_id.into()),
        limit: 100,
        ..Default::default()
    })
    .await
    .expect("jobs")
    .jobs
}

async fn audited(op: &Client, action: &str) -> usize {
    op.audit(1000).await.expect("audit").entries.iter().filter(|e| e.action == action).count()
}

#[tokio::test]
async fn a_matching_trigger_fires_once_per_event_even_when_the_batch_is_resent() {
    let (server, org_id, node) = server_with_node().await;
    let op = server.operator().expect("operator");
    let mut req = trigger_request(&org_id, "resize", "in/");
    req.on.key_suffix = Some(".jpg".into());
    let trigger = op.create_trigger(&req).await.expect("trigger");
    assert!(trigger.trigger_id.starts_with("trigger-"), "{}", trigger.trigger_id);

    let batch = [object_event(1, "in/a.jpg"), object_event(2, "out/b.jpg"), object_event(3, "in/c.png")];
    assert_eq!(node.deliver_ok(&batch).await, (3, 0, 3));
    for _ in 0..3 {
        assert_eq!(node.deliver_ok(&batch).await, (0, 3, 3));
    }

    let jobs = jobs_of(&op, node.id()).await;
    assert_eq!(jobs.len(), 1, "exactly one job: {jobs:?}");
    let job = &jobs[0];
    assert!(job.job_id.starts_with("trg-"), "{}", job.job_id);
    let job_spec = job.spec.container().expect("a container job");
    assert_eq!(job_spec.inputs, ["in/a.jpg"]);
    assert_eq!(job_spec.image, spec().image);
    assert_eq!(job_spec.env.get("OUTPOST_EVENT_KEY").map(String::as_str), Some("in/a.jpg"));
    assert_eq!(job_spec.env.get("OUTPOST_EVENT_SEQ").map(String::as_str), Some("1"));
    assert_eq!(job_spec.env.get("OUTPOST_EVENT_SHA256"), batch[0].sha256.as_ref());
    assert_eq!(audited(&op, "trigger.fired").await, 1);

    // The node's poll sees it, signed with its org's key like any submitted job.
    let offered = node.poll(&[], 0).await;
    assert_eq!(offered.jobs.len(), 1);
    let envelope: JobEnvelope = serde_json::from_str(&offered.jobs[0].envelope.payload).expect("envelope");
    assert_eq!(envelope.job_id, job.job_id);
    assert_eq!(envelope.spec.container().expect("container").inputs, ["in/a.jpg"]);
    assert_eq!(offered.jobs[0].envelope.key_id, node.enrolled.org_signing_key.key_id);

    let events = op.events(&EventsQuery::default()).await.expect("events").events;
    assert_eq!(events[0].triggered_jobs, [job.job_id.as_str()]);
    assert!(events[1].triggered_jobs.is_empty() && events[2].triggered_jobs.is_empty());

    // A later submission still gets a higher job seq than the triggered job.
    let next = op.submit(&SubmitJobRequest::for_node(node.id(), spec())).await.expect("submit");
    assert!(next.seq > job.seq);
}

#[tokio::test]
async fn a_trigger_wakes_a_held_poll() {
    let (server, org_id, node) = server_with_node().await;
    let op = server.operator().expect("operator");
    op.create_trigger(&trigger_request(&org_id, "all", "")).await.expect("trigger");
    let node = std::sync::Arc::new(node);
    let poller = node.clone();
    let held = tokio::spawn(async move { poller.poll(&[], 25).await });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    node.deliver_ok(&[object_event(1, "x")]).await;
    let got = tokio::time::timeout(std::time::Duration::from_secs(20), held)
        .await
        .expect("woken before its wait ran out")
        .expect("task");
    assert_eq!(got.jobs.len(), 1);
}

#[tokio::test]
async fn rejected_objects_fire_only_triggers_that_include_them() {
    let (server, org_id, node) = server_with_node().await;
    let op = server.operator().expect("operator");
    let plain = op.create_trigger(&trigger_request(&org_id, "plain", "")).await.expect("trigger");
    let mut req = trigger_request(&org_id, "quarantine", "");
    req.on.include_rejected = true;
    let quarantine = op.create_trigger(&req).await.expect("trigger");

    let mut rejected = object_event(1, "in/virus.exe");
    rejected.accepted = false;
    rejected.reason = Some("suffix not allowed".into());
    rejected.sha256 = None;
    node.deliver_ok(&[rejected]).await;
    let jobs = jobs_of(&op, node.id()).await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let events = op.events(&EventsQuery::default()).await.expect("events").events;
    assert_eq!(events[0].triggered_jobs, [jobs[0].job_id.as_str()]);
    assert_eq!(
        jobs[0].spec.container().expect("container").env.get("OUTPOST_EVENT_SHA256").map(String::as_str),
        Some("")
    );
    // Which trigger fired is recorded in the audit trail.
    let audit = op.audit(1000).await.expect("audit");
    let fired: Vec<_> = audit.entries.iter().filter(|e| e.action == "trigger.fired").collect();
    assert_eq!(fired.len(), 1);
    assert!(fired[0].detail.contains(&quarantine.trigger_id), "{}", fired[0].detail);
    assert!(!fired[0].detail.contains(&plain.trigger_id));
}

#[tokio::test]
async fn non_matching_events_and_other_orgs_triggers_fire_nothing() {
    let (server, org_id, node) = server_with_node().await;
    let op = server.operator().expect("operator");
    let mut req = trigger_request(&org_id, "inbox-only", "in/");
    req.on.watch = Some("other-watch".into());
    op.create_trigger(&req).await.expect("trigger");
    let mut req = trigger_request(&org_id, "other-bucket", "in/");
    req.on.bucket = Some("elsewhere".into());
    op.create_trigger(&req).await.expect("trigger");
    let other_org = op.create_org("clinic-b").await.expect("org");
    op.create_trigger(&trigger_request(&other_org.id, "everything", "")).await.expect("trigger");

    node.deliver_ok(&[object_event(1, "in/a.jpg"), object_event(2, "b")]).await;
    assert!(jobs_of(&op, node.id()).await.is_empty());
    let events = op.events(&EventsQuery::default()).await.expect("events").events;
    assert!(events.iter().all(|e| e.triggered_jobs.is_empty()));
    assert_eq!(audited(&op, "trigger.fired").await, 0);
}

#[tokio::test]
async fn a_deleted_trigger_stops_firing() {
    let (server, org_id, node) = server_with_node().await;
    let op = server.operator().expect("operator");
    let trigger = op.create_trigger(&trigger_request(&org_id, "once", "")).await.expect("trigger");
    node.deliver_ok(&[object_event(1, "a")]).await;
    assert_eq!(jobs_of(&op, node.id()).await.len(), 1);

    let removed = op.delete_trigger(&trigger.trigger_id).await.expect("deleted");
    assert_eq!(removed, trigger);
    let err = op.trigger(&trigger.trigger_id).await.expect_err("gone");
    assert!(err.to_string().contains("404"), "{err}");
    assert!(op.delete_trigger(&trigger.trigger_id).await.is_err(), "a second delete is a 404");
    assert_eq!(audited(&op, "trigger.deleted").await, 1);

    node.deliver_ok(&[object_event(2, "b")]).await;
    assert_eq!(jobs_of(&op, node.id()).await.len(), 1, "no job for an event after the delete");
    assert!(op.triggers(Some(&org_id)).await.expect("list").triggers.is_empty());
}

#[tokio::test]
async fn triggers_are_listed_and_read_by_org() {
    let server = TestServer::start().await.expect("server");
    let op = server.operator().expect("operator");
    let a = op.create_org("a").await.expect("org");
    let b = op.create_org("b").await.expect("org");
    let ta = op.create_trigger(&trigger_request(&a.id, "t", "")).await.expect("trigger");
    let tb = op.create_trigger(&trigger_request(&b.id, "t", "")).await.expect("same name, other org");
    let ids = |l: Vec<Trigger>| l.into_iter().map(|t| t.trigger_id).collect::<Vec<_>>();
    assert_eq!(ids(op.triggers(Some(&a.id)).await.expect("list").triggers), [ta.trigger_id.as_str()]);
    assert_eq!(op.triggers(None).await.expect("list").triggers.len(), 2);
    assert_eq!(op.trigger(&tb.trigger_id).await.expect("get"), tb);
    assert_eq!(audited(&op, "trigger.created").await, 2);
}

#[tokio::test]
async fn invalid_triggers_are_refused_with_a_reason() {
    let (server, org_id, node) = server_with_node().await;
    let op = server.operator().expect("operator");
    let http = https(server.ca_pem(), None);
    let url = format!("{}{}", server.url(), paths::TRIGGERS);
    let post = |body: serde_json::Value| http.post(&url).bearer_auth(server.admin_token()).json(&body).send();
    let json = |r: &outpost_protocol::CreateTriggerRequest| serde_json::to_value(r).expect("json");

    let bad_name = trigger_request(&org_id, "has space", "");
    assert_error(
        &answer(post(json(&bad_name)).await.expect("sent")).await,
        StatusCode::BAD_REQUEST,
        "bad_name",
    );
    let no_org = trigger_request("org-nobody", "t", "");
    assert_error(&answer(post(json(&no_org)).await.expect("sent")).await, StatusCode::NOT_FOUND, "not_found");
    let mut bad_image = trigger_request(&org_id, "t", "");
    bad_image.job.image = "alpine".into();
    assert_error(
        &answer(post(json(&bad_image)).await.expect("sent")).await,
        StatusCode::BAD_REQUEST,
        "bad_image",
    );
    let mut bad_input = trigger_request(&org_id, "t", "");
    bad_input.job.inputs = vec!["../etc/passwd".into()];
    assert_error(
        &answer(post(json(&bad_input)).await.expect("sent")).await,
        StatusCode::BAD_REQUEST,
        "bad_object_key",
    );
    let other_org = op.create_org("other").await.expect("org");
    let mut foreign_node = trigger_request(&other_org.id, "t", "");
    foreign_node.on.node_id = Some(node.id().into());
    assert_error(
        &answer(post(json(&foreign_node)).await.expect("sent")).await,
        StatusCode::BAD_REQUEST,
        "bad_match",
    );
    let mut unknown = json(&trigger_request(&org_id, "t", ""));
    unknown["on"]["regex"] = serde_json::json!(".*");
    assert_error(&answer(post(unknown).await.expect("sent")).await, StatusCode::BAD_REQUEST, "invalid_body");

    let mut own_node = trigger_request(&org_id, "t", "");
    own_node.on.node_id = Some(node.id().into());
    assert_eq!(answer(post(json(&own_node)).await.expect("sent")).await.0, StatusCode::CREATED);
    let again = answer(post(json(&own_node)).await.expect("sent")).await;
    assert_error(&again, StatusCode::CONFLICT, "already_exists");
    assert_eq!(op.triggers(None).await.expect("list").triggers.len(), 1);
}

#[tokio::test]
async fn job_submission_checks_inputs_outputs_and_egress_keys() {
    let (server, _org_id, node) = server_with_node().await;
    let op = server.operator().expect("operator");
    let submit = |f: fn(&mut outpost_protocol::ContainerSpec)| {
        let mut s = spec();
        f(&mut s);
        let req = SubmitJobRequest::for_node(node.id(), s);
        let op = &op;
        async move { op.submit(&req).await }
    };
    let refused = [
        submit(|s| s.inputs = vec!["/abs".into()]).await,
        submit(|s| s.inputs = (0..65).map(|i| format!("k{i}")).collect()).await,
        submit(|s| s.output_prefix = Some("out/../x/".into())).await,
        submit(|s| s.egress_bodies = vec!["a//b".into()]).await,
        submit(|s| s.inputs = vec!["nul\0".into()]).await,
    ];
    for r in refused {
        let err = r.expect_err("refused");
        assert!(err.to_string().contains("bad_object_key"), "{err}");
    }
    let ok = submit(|s| {
        s.inputs = vec!["in/a.jpg".into(), "in/batch/".into()];
        s.output_prefix = Some("results/".into());
        s.egress_bodies = vec!["results/summary.json".into()];
    })
    .await
    .expect("valid keys are accepted");
    assert_eq!(ok.spec.container().expect("container").output_prefix.as_deref(), Some("results/"));
}
