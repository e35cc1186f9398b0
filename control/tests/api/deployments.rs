//! Deployments through the real API with test nodes that speak the node protocol: batches that
//! wait for health, a failed revision that stops the rollout and rolls the updated node back,
//! supersede, priority layering, a node that stops matching, the capability gate, and bad input.

use std::collections::HashMap;
use std::time::Duration;

use outpost_control::testing::TestServer;
use outpost_protocol::{
    Announce, BatchSize, DeployAction, DeployRequest, DeploymentInfo, Heartbeat, Inventory, LabelNodeRequest,
    NodePhase, PollRequest, PollResponse, RolloutPolicy, RolloutStatus, ServiceAck, ServiceEnvelope,
    ServiceReport, ServiceReportAck, ServiceReportBatch, ServiceSpec, ServiceState, paths,
};
use reqwest::StatusCode;

use super::support::{TestNode, assert_error, org_and_token};

/// A node as the agent would be: it persists desired states, acknowledges them and reports.
struct Sim {
    node: TestNode,
    /// service → what it was last told.
    desired: HashMap<String, ServiceEnvelope>,
    acks: Vec<ServiceAck>,
    report_seq: u64,
    services: bool,
    /// Announce every capability but these (an agent of an earlier revision 2 build).
    lacks: Vec<&'static str>,
}

impl Sim {
    fn announce(&self) -> Announce {
        let mut a = Announce::this_build();
        a.capabilities.retain(|c| !self.lacks.contains(&c.as_str()));
        a
    }

    async fn heartbeat(&self, site: &str) {
        let hb = Heartbeat {
            agent_version: "test".into(),
            inventory: Inventory::default(),
            running_jobs: 0,
            outbox_depth: 0,
            relay: None,
            models: Vec::new(),
            labels: [("site".to_owned(), site.to_owned())].into(),
            announce: Some(if self.services {
                self.announce()
            } else {
                Announce { protocol: 1, capabilities: vec![] }
            }),
            awaiting_approval: Vec::new(),
        };
        assert_eq!(self.node.post(paths::NODE_HEARTBEAT, &hb).await.0, StatusCode::OK);
    }

    /// One poll: acknowledges what it holds, takes what is offered.
    async fn poll(&mut self) -> Vec<ServiceEnvelope> {
        let announce =
            if self.services { self.announce() } else { Announce { protocol: 1, capabilities: vec![] } };
        let req = PollRequest {
            wait_secs: Some(0),
            announce: Some(announce),
            service_acks: std::mem::take(&mut self.acks),
            ..Default::default()
        };
        let (status, body) = self.node.post(paths::NODE_POLL, &req).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let resp: PollResponse = serde_json::from_value(body).expect("poll response");
        let mut got = Vec::new();
        for env in resp.services {
            let svc: ServiceEnvelope = serde_json::from_str(&env.payload).expect("a service envelope");
            assert_eq!(svc.node_id, self.node.id());
            self.acks.push(ServiceAck { service: svc.service.clone(), seq: svc.seq });
            self.desired.insert(svc.service.clone(), svc.clone());
            got.push(svc);
        }
        got
    }

    async fn report(&mut self, service: &str, state: ServiceState, message: Option<&str>) {
        let d = self.desired.get(service).expect("told about the service");
        self.report_seq += 1;
        let r = ServiceReport {
            seq: self.report_seq,
            service: service.into(),
            deployment: d.deployment.clone(),
            revision: d.revision,
            state,
            restarts: 0,
            last_exit: None,
            health_output: String::new(),
            message: message.map(str::to_owned),
            unix_ms: 1,
        };
        let (status, body) =
            self.node.post(paths::NODE_SERVICES, &ServiceReportBatch { reports: vec![r] }).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let ack: ServiceReportAck = serde_json::from_value(body).expect("ack");
        assert_eq!(ack.up_to_seq, self.report_seq);
    }

    fn revision(&self, service: &str) -> Option<u64> {
        self.desired.get(service).filter(|d| d.spec.is_some()).map(|d| d.revision)
    }
}

fn spec(tag: &str) -> ServiceSpec {
    serde_json::from_value(serde_json::json!({
        "image": format!("sha256:{}", "cd".repeat(32)),
        "command": ["sh", "-c", format!("echo {tag}; sleep 3600")],
    }))
    .expect("spec")
}

fn request(org_id: &str, name: &str, selector: &str, tag: &str) -> DeployRequest {
    DeployRequest {
        name: name.into(),
        org_id: org_id.into(),
        selector: selector.into(),
        service: None,
        spec: spec(tag),
        priority: 0,
        rollout: RolloutPolicy {
            batch: BatchSize::Nodes(1),
            health_timeout_secs: 30,
            abort_on_failures: 1,
            max_unavailable: None,
        },
    }
}

async fn sims(server: &TestServer, n: usize) -> (String, Vec<Sim>) {
    let op = server.operator().expect("operator");
    let (org_id, _) = org_and_token(server).await;
    let mut out = Vec::new();
    for _ in 0..n {
        let token = op.create_token(&org_id, None).await.expect("token");
        let node = TestNode::enroll(server, &token.token).await;
        let sim = Sim {
            node,
            desired: HashMap::new(),
            acks: Vec::new(),
            report_seq: 0,
            services: true,
            lacks: Vec::new(),
        };
        sim.heartbeat("icu").await;
        out.push(sim);
    }
    (org_id, out)
}

/// Polls every sim until `cond` holds on the deployment (the controller passes every 500 ms).
async fn until(
    server: &TestServer,
    org_id: &str,
    name: &str,
    sims: &mut [Sim],
    what: &str,
    cond: impl Fn(&DeploymentInfo, &[Sim]) -> bool,
) -> DeploymentInfo {
    let op = server.operator().expect("operator");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        for s in sims.iter_mut() {
            s.poll().await;
        }
        let d = op.deployment(org_id, name).await.expect("status");
        if cond(&d, sims) {
            return d;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}; last status {d:#?}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

fn count(sims: &[Sim], service: &str, revision: u64) -> usize {
    sims.iter().filter(|s| s.revision(service) == Some(revision)).count()
}

#[tokio::test]
async fn a_rollout_moves_batch_by_batch_on_health_and_a_failed_revision_is_rolled_back() {
    let server = TestServer::start().await.expect("server");
    let op = server.operator().expect("operator");
    let (org, mut sims) = sims(&server, 3).await;
    let d = op.deploy(&org, &request(&org, "web", "site=icu", "v1")).await.expect("deploy");
    assert_eq!((d.revision, d.status), (1, RolloutStatus::InProgress));

    // One node per batch: the next batch starts only when the current one is healthy.
    for healthy in 1..=3 {
        until(&server, &org, "web", &mut sims, "the next batch", |_, s| count(s, "web", 1) == healthy).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        for s in sims.iter_mut() {
            s.poll().await;
        }
        assert_eq!(count(&sims, "web", 1), healthy, "no new batch before this one is healthy");
        let idx =
            sims.iter().position(|s| s.revision("web") == Some(1) && s.report_seq == 0).expect("updated");
        sims[idx].report("web", ServiceState::Healthy, None).await;
    }
    let done =
        until(&server, &org, "web", &mut sims, "complete", |d, _| d.status == RolloutStatus::Complete).await;
    assert_eq!(done.stable_revision, Some(1));
    assert!(done.nodes.iter().all(|n| n.phase == NodePhase::Healthy), "{:?}", done.nodes);

    // Revision 2 breaks: the first node fails it, so the rollout stops and that node goes back.
    let d2 = op.deploy(&org, &request(&org, "web", "site=icu", "v2")).await.expect("revision 2");
    assert_eq!(d2.revision, 2);
    until(&server, &org, "web", &mut sims, "revision 2 on one node", |_, s| count(s, "web", 2) == 1).await;
    let bad = sims.iter().position(|s| s.revision("web") == Some(2)).expect("updated");
    sims[bad]
        .report("web", ServiceState::RolledBack, Some("not healthy within 30 s; back to revision 1"))
        .await;
    let stopped = until(&server, &org, "web", &mut sims, "the rollout rolled back", |d, _| {
        d.status == RolloutStatus::RolledBack
    })
    .await;
    assert!(
        stopped.reason.as_deref().is_some_and(|r| r.contains("back to revision 1")),
        "{:?}",
        stopped.reason
    );
    let back =
        until(&server, &org, "web", &mut sims, "the failed node back on 1", |_, s| count(s, "web", 1) == 3)
            .await;
    assert!(sims[bad].desired["web"].rollback, "the way back is a signed rollback");
    assert_eq!(count(&sims, "web", 2), 0, "no node went on to revision 2");
    let row = back.nodes.iter().find(|n| n.node_id == sims[bad].node.id()).expect("row");
    assert_eq!(row.desired_revision, Some(1));

    // A fixed revision 3 supersedes and completes; an operator rollback then returns to 1.
    op.deploy(&org, &request(&org, "web", "site=icu", "v3")).await.expect("revision 3");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut reported = std::collections::HashSet::new();
    loop {
        for (i, s) in sims.iter_mut().enumerate() {
            s.poll().await;
            if s.revision("web") == Some(3) && reported.insert(i) {
                s.report("web", ServiceState::Healthy, None).await;
            }
        }
        if op.deployment(&org, "web").await.expect("status").status == RolloutStatus::Complete {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "revision 3 did not complete");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(reported.len(), 3);
    let rolled = op.deploy_action(&org, "web", DeployAction::Rollback).await.expect("rollback");
    assert_eq!(rolled.stable_revision, Some(1));
    until(&server, &org, "web", &mut sims, "everyone on 1", |_, s| count(s, "web", 1) == 3).await;
    let err = op.deploy_action(&org, "web", DeployAction::Resume).await.expect_err("nothing to resume");
    assert!(
        err.to_string().contains("409") && err.to_string().contains("its rollout is rolled_back"),
        "{err}"
    );
}

#[tokio::test]
async fn layering_removal_and_old_agents_each_get_the_right_answer() {
    let server = TestServer::start().await.expect("server");
    let op = server.operator().expect("operator");
    let (org, mut sims) = sims(&server, 3).await;
    sims[2].services = false;
    sims[2].heartbeat("icu").await;
    let mut base = request(&org, "base", "site=icu", "base");
    base.service = Some("web".into());
    base.rollout.batch = BatchSize::Percent(100);
    op.deploy(&org, &base).await.expect("base");
    let mut special = request(&org, "special", "rack=2", "special");
    special.service = Some("web".into());
    special.priority = 10;
    special.rollout.batch = BatchSize::Percent(100);
    op.deploy(&org, &special).await.expect("special");
    op.label_node(
        sims[1].node.id(),
        &LabelNodeRequest { set: [("rack".into(), "2".into())].into(), remove: vec![] },
    )
    .await
    .expect("label");

    let status =
        until(&server, &org, "base", &mut sims, "base on node 0", |_, s| s[0].revision("web") == Some(1))
            .await;
    until(&server, &org, "base", &mut sims, "special on node 1", |_, s| {
        s[1].desired.get("web").is_some_and(|d| d.deployment == "special")
    })
    .await;
    assert!(sims[2].desired.is_empty(), "an agent without the services capability is sent none");
    let phases: HashMap<&str, NodePhase> =
        status.nodes.iter().map(|n| (n.node_id.as_str(), n.phase)).collect();
    assert_eq!(phases[sims[2].node.id()], NodePhase::AgentTooOld);
    let status = op.deployment(&org, "base").await.expect("status");
    let overridden = status.nodes.iter().find(|n| n.node_id == sims[1].node.id()).expect("row");
    assert_eq!(overridden.phase, NodePhase::Overridden);
    assert!(overridden.reason.as_deref().is_some_and(|r| r.contains("special")));

    // Node 0 stops matching every deployment of `web`: it is told to remove the service.
    sims[0].heartbeat("lab").await;
    until(&server, &org, "base", &mut sims, "removal on node 0", |_, s| {
        s[0].desired.get("web").is_some_and(|d| d.spec.is_none())
    })
    .await;
}

#[tokio::test]
async fn bad_deployments_are_refused_with_a_reason() {
    let server = TestServer::start().await.expect("server");
    let op = server.operator().expect("operator");
    let (org, _) = org_and_token(&server).await;
    let http = super::support::https(server.ca_pem(), None);
    let post = |body: serde_json::Value| {
        let http = http.clone();
        let url = format!("{}{}", server.url(), paths::fill(paths::DEPLOYMENTS, "org_id", &org));
        let token = server.admin_token().to_owned();
        async move {
            super::support::answer(http.post(url).bearer_auth(token).json(&body).send().await.expect("sent"))
                .await
        }
    };
    let good = serde_json::to_value(request(&org, "web", "site=icu", "v1")).expect("json");
    let mut v = good.clone();
    v["selector"] = "site in (a".into();
    assert_error(&post(v).await, StatusCode::BAD_REQUEST, "bad_selector");
    let mut v = good.clone();
    v["spec"]["image"] = "busybox:latest".into();
    assert_error(&post(v).await, StatusCode::BAD_REQUEST, "bad_service_spec");
    let mut v = good.clone();
    v["spec"]["publish"] =
        serde_json::json!([{ "host_ip": "127.0.0.1", "host_port": 8080, "container_port": 80 }]);
    assert_error(&post(v).await, StatusCode::BAD_REQUEST, "bad_service_spec");
    let mut v = good.clone();
    v["spec"]["health"] = serde_json::json!({ "exec": ["true"], "tcp_port": 80 });
    assert_error(&post(v).await, StatusCode::BAD_REQUEST, "bad_service_spec");
    let mut v = good.clone();
    v["rollout"]["max_unavailable"] = 0.into();
    assert_error(&post(v).await, StatusCode::BAD_REQUEST, "bad_rollout");
    let mut v = good.clone();
    v["name"] = "Web_1".into();
    assert_error(&post(v).await, StatusCode::BAD_REQUEST, "bad_name");
    let mut v = good.clone();
    v["spec"]["privileged"] = true.into();
    let got = post(v).await;
    assert_eq!(got.0, StatusCode::BAD_REQUEST, "an unknown field in a spec is refused: {}", got.1);
    let err = op.deployment(&org, "nope").await.expect_err("unknown");
    assert!(err.to_string().contains("404"), "{err}");
    let err = op.deploy_action(&org, "nope", DeployAction::Pause).await.expect_err("unknown");
    assert!(err.to_string().contains("404"), "{err}");
}

#[tokio::test]
async fn max_unavailable_caps_a_batch() {
    let server = TestServer::start().await.expect("server");
    let op = server.operator().expect("operator");
    let (org, mut sims) = sims(&server, 3).await;
    let mut req = request(&org, "web", "site=icu", "v1");
    req.rollout.batch = BatchSize::Percent(100);
    req.rollout.max_unavailable = Some(1);
    op.deploy(&org, &req).await.expect("deploy");
    until(&server, &org, "web", &mut sims, "the first node", |_, s| count(s, "web", 1) == 1).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for s in sims.iter_mut() {
        s.poll().await;
    }
    assert_eq!(count(&sims, "web", 1), 1, "one node updating at a time, whatever the batch");
    let first = sims.iter().position(|s| s.revision("web") == Some(1)).expect("updated");
    sims[first].report("web", ServiceState::Healthy, None).await;
    until(&server, &org, "web", &mut sims, "the second node", |_, s| count(s, "web", 1) == 2).await;
}

#[tokio::test]
async fn a_service_with_inputs_goes_only_to_agents_that_announce_service_inputs() {
    let server = TestServer::start().await.expect("server");
    let op = server.operator().expect("operator");
    let (org, mut sims) = sims(&server, 2).await;
    sims[1].lacks = vec![outpost_protocol::capability::SERVICE_INPUTS];
    sims[1].heartbeat("icu").await;
    let mut req = request(&org, "reader", "site=icu", "reads");
    req.spec.inputs = vec!["config/".into()];
    req.rollout.batch = BatchSize::Percent(100);
    op.deploy(&org, &req).await.expect("deploy");
    let status =
        until(&server, &org, "reader", &mut sims, "node 0 told", |_, s| s[0].revision("reader") == Some(1))
            .await;
    assert!(sims[1].desired.is_empty(), "never sent a spec it would refuse");
    let row = status.nodes.iter().find(|n| n.node_id == sims[1].node.id()).expect("row");
    assert_eq!(row.phase, NodePhase::AgentTooOld);
    assert!(row.reason.as_deref().is_some_and(|r| r.contains("service-inputs")), "{row:?}");

    // Bad entries are refused at create, naming the entry.
    let mut bad = request(&org, "bad", "site=icu", "bad");
    bad.spec.inputs = vec!["../secrets".into()];
    let err = op.deploy(&org, &bad).await.expect_err("refused");
    assert!(err.to_string().contains("../secrets"), "{err}");
}
