//! Fleet placement end to end: several real agents (own identities and data dirs) and the real
//! control plane over TLS on loopback, jobs in the real Docker engine. A job placed on `any`
//! node of a selector survives the SIGKILL of its node (site HA); `each` reaches every
//! matching node; a cancel stops a running container.

#![allow(clippy::expect_used)]

mod common;
mod harness;

use std::process::Command;
use std::time::Duration;

use harness::{Control, Node, eventually, sh};
use outpost_protocol::{JobState, Outcome, Placement, SubmitJobRequest};

const RESULT_WAIT: Duration = Duration::from_secs(120);

/// Fast heartbeats so a 3 s lease notices a dead node quickly.
fn config(labels: &str) -> String {
    format!(
        "[node]\nlabels = {{ {labels} }}\n[control]\npoll_wait_secs = 5\n[agent]\nheartbeat_secs = 1\nshutdown_grace_secs = 3\n"
    )
}

struct Fleet {
    _tmp: tempfile::TempDir,
    control: Control,
    nodes: Vec<Node>,
    org_id: String,
}

/// A control plane with a 3 s lease and one started agent per label set.
async fn fleet(label_sets: &[&str]) -> Fleet {
    let tmp = tempfile::tempdir().expect("tempdir");
    let control = Control::start_with_lease(&tmp.path().join("control"), None, Some("3s"));
    let org = control.create_org("fleet").await;
    let mut nodes = Vec::new();
    for (i, labels) in label_sets.iter().enumerate() {
        let mut node =
            Node::enroll(&tmp.path().join(format!("node{i}")), &control, &org.id, &config(labels)).await;
        node.start();
        nodes.push(node);
    }
    let f = Fleet { _tmp: tmp, control, nodes, org_id: org.id };
    let want = f.nodes.len();
    eventually("every agent to heartbeat its labels", Duration::from_secs(30), async || {
        let list = f.control.nodes(None).await;
        list.nodes.iter().filter(|n| n.online && !n.labels.is_empty()).count() == want
    })
    .await;
    f
}

/// Containers of `job_id` that the engine runs now.
fn running_containers(job_id: &str) -> usize {
    let out = Command::new("docker")
        .args(["ps", "-q", "--filter", &format!("label=outpost.job={job_id}")])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.trim().is_empty()).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_any_job_moves_to_another_node_when_its_node_is_killed_mid_job() {
    let mut f = fleet(&["rack = \"r1\"", "rack = \"r1\"", "rack = \"r2\""]).await;
    let spec = sh("sleep 12; echo finished");
    let req = SubmitJobRequest::for_selector(&f.org_id, "rack=r1", Placement::Any, spec);
    let job = f.control.submit_request(&req).await;
    let first = f.nodes.iter().position(|n| n.node_id == job.node_id).expect("placed on a fleet node");
    assert_ne!(first, 2, "never on a node the selector does not match");

    eventually("attempt 1 to run", Duration::from_secs(60), async || running_containers(&job.job_id) == 1)
        .await;
    f.nodes[first].kill9();

    let moved = {
        let mut moved = None;
        eventually("the job to move to the other r1 node", Duration::from_secs(60), async || {
            let now = f.control.job(&job.job_id).await;
            let done = now.attempt == 2;
            moved = Some(now);
            done
        })
        .await;
        moved.expect("moved")
    };
    let second = 1 - first;
    assert_eq!(moved.node_id, f.nodes[second].node_id);
    assert_eq!(moved.superseded[0].node_id, f.nodes[first].node_id);

    let result = f.control.wait_result(&job.job_id, RESULT_WAIT).await;
    assert_eq!((result.attempt, result.outcome), (2, Outcome::Succeeded), "{result:?}");
    assert!(result.stdout_tail.contains("finished"));

    // The killed node comes back: it adopts its old container, is told to stop it, and its
    // report is kept as the superseded attempt's, never as the job's.
    f.nodes[first].start();
    let mut late = None;
    eventually("the old attempt's late report", Duration::from_secs(60), async || {
        late = f.control.job(&job.job_id).await.superseded[0].late_result.clone();
        late.is_some()
    })
    .await;
    let late = late.expect("late");
    assert_eq!(late.attempt, 1);
    assert!(matches!(late.outcome, Outcome::Cancelled | Outcome::Succeeded), "{late:?}");
    let job_now = f.control.job(&job.job_id).await;
    assert_eq!((job_now.state, job_now.result.map(|r| r.attempt)), (JobState::Finished, Some(2)));
    eventually("no container of the job left running", Duration::from_secs(30), async || {
        running_containers(&job.job_id) == 0
    })
    .await;
    let audit = f.control.audit().await;
    let counted =
        audit.entries.iter().filter(|e| e.action == "job.result" && e.detail.contains(&job.job_id)).count();
    assert_eq!(counted, 1, "one counted result");
    assert!(audit.entries.iter().any(|e| e.action == "job.replaced" && e.detail.contains(&job.job_id)));
}

#[tokio::test(flavor = "multi_thread")]
async fn each_reaches_every_matching_node_and_a_cancel_stops_a_running_container() {
    let f = fleet(&["site = \"icu\"", "site = \"icu\"", "site = \"lab\""]).await;
    // The operator's label wins over the node's own.
    let relabelled = f.control.label(&f.nodes[2].node_id, &[("site", "icu")], &[]).await;
    assert_eq!(relabelled.labels.get("site").map(String::as_str), Some("icu"));
    assert_eq!(f.control.nodes(Some("site=icu")).await.nodes.len(), 3);

    let req = SubmitJobRequest::for_selector(&f.org_id, "site=icu", Placement::Each, sh("echo each"));
    let group = f.control.submit_group(&req).await;
    assert_eq!(group.jobs.len(), 3);
    for job in &group.jobs {
        let r = f.control.wait_result(&job.job_id, RESULT_WAIT).await;
        assert_eq!(r.outcome, Outcome::Succeeded);
        assert!(r.stdout_tail.contains("each"));
    }
    let mut ran_on: Vec<String> =
        f.control.group(&group.group_id).await.jobs.into_iter().map(|j| j.node_id).collect();
    ran_on.sort();
    let mut all: Vec<String> = f.nodes.iter().map(|n| n.node_id.clone()).collect();
    all.sort();
    assert_eq!(ran_on, all, "one job on each node");

    let long = f.control.submit(&f.nodes[0].node_id, sh("sleep 300")).await;
    eventually("the long job to run", Duration::from_secs(60), async || {
        running_containers(&long.job_id) == 1
    })
    .await;
    let asked = f.control.cancel(&long.job_id).await;
    assert!(asked.cancel_requested_unix_ms.is_some());
    let r = f.control.wait_result(&long.job_id, Duration::from_secs(60)).await;
    assert_eq!(r.outcome, Outcome::Cancelled, "{r:?}");
    assert!(r.error.as_deref().is_some_and(|e| e.contains("cancelled by an operator")), "{r:?}");
    assert_eq!(f.control.job(&long.job_id).await.state, JobState::Cancelled);
    assert_eq!(running_containers(&long.job_id), 0, "the container was stopped");
}

/// (node id, revision, running) of every service container of `service` on the engine.
fn service_containers(service: &str) -> Vec<(String, u64, bool)> {
    let out = Command::new("docker")
        .args([
            "ps",
            "-a",
            "--filter",
            &format!("label=outpost.service={service}"),
            "--format",
            "{{.Label \"outpost.node\"}} {{.Label \"outpost.revision\"}} {{.State}}",
        ])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some((parts.next()?.to_owned(), parts.next()?.parse().ok()?, parts.next()? == "running"))
        })
        .collect()
}

fn mine(f: &Fleet, all: Vec<(String, u64, bool)>) -> Vec<(String, u64, bool)> {
    all.into_iter().filter(|(n, _, _)| f.nodes.iter().any(|x| &x.node_id == n)).collect()
}

async fn wait_status(
    f: &Fleet,
    what: &str,
    cond: impl Fn(&outpost_protocol::DeploymentInfo) -> bool,
) -> outpost_protocol::DeploymentInfo {
    let mut last = None;
    eventually(what, Duration::from_secs(90), async || {
        let d = f.control.deployment(&f.org_id, "web").await;
        let ok = cond(&d);
        last = Some(d);
        ok
    })
    .await;
    last.expect("status")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_deployment_reaches_every_node_and_a_broken_revision_is_rolled_back() {
    let mut f = fleet(&["site = \"icu\"", "site = \"icu\"", "site = \"icu\""]).await;
    let d = f
        .control
        .deploy(
            &f.org_id,
            &common::web_deployment(&f.org_id, "site=icu", common::ready_service("touch /tmp/ready", 4), 30),
        )
        .await;
    assert_eq!(d.revision, 1);
    let done =
        wait_status(&f, "revision 1 complete", |d| d.status == outpost_protocol::RolloutStatus::Complete)
            .await;
    assert!(done.nodes.iter().all(|n| n.phase == outpost_protocol::NodePhase::Healthy), "{:#?}", done.nodes);
    let running = mine(&f, service_containers("web"));
    assert_eq!(running.len(), 3, "one container per node: {running:?}");
    assert!(running.iter().all(|(_, rev, up)| *rev == 1 && *up));

    // A container dies: the agent restarts it (its own policy, not the engine's).
    let victim = &f.nodes[0].node_id;
    let name = format!("outpost-svc-{victim}-web-web-r1");
    assert!(Command::new("docker").args(["kill", &name]).status().expect("docker kill").success());
    wait_status(&f, "the killed container restarted and healthy", |d| {
        d.nodes.iter().any(|n| {
            &n.node_id == victim
                && n.phase == outpost_protocol::NodePhase::Healthy
                && n.report.as_ref().is_some_and(|r| r.restarts >= 1)
        })
    })
    .await;
    let restarts = f.nodes[0].metrics();
    let counted = restarts
        .lines()
        .find_map(|l| l.strip_prefix("outpost_node_service_restarts_total "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(counted.is_some_and(|n| n >= 1.0), "the agent's metrics count the restart: {restarts}");

    // kill -9 of an agent: the service keeps running, and the restarted agent adopts it.
    f.nodes[1].kill9();
    assert_eq!(mine(&f, service_containers("web")).iter().filter(|(_, _, up)| *up).count(), 3);
    f.nodes[1].start();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = mine(&f, service_containers("web"));
    assert_eq!(after.len(), 3, "adopted, not duplicated: {after:?}");

    // Revision 2 never becomes healthy: its node goes back to revision 1 by itself, and the
    // rollout stops after that first batch.
    let broken = f
        .control
        .deploy(
            &f.org_id,
            &common::web_deployment(&f.org_id, "site=icu", common::ready_service("true", 4), 30),
        )
        .await;
    assert_eq!(broken.revision, 2);
    let stopped = wait_status(&f, "the rollout rolled back", |d| {
        d.status == outpost_protocol::RolloutStatus::RolledBack
    })
    .await;
    assert!(stopped.reason.as_deref().is_some_and(|r| r.contains("failed")), "{:?}", stopped.reason);
    eventually("every node back on revision 1", Duration::from_secs(60), async || {
        let c = mine(&f, service_containers("web"));
        c.len() == 3 && c.iter().all(|(_, rev, up)| *rev == 1 && *up)
    })
    .await;
    let audit = f.control.audit().await;
    assert!(audit.entries.iter().any(|e| e.action == "service.report" && e.detail.contains("rolled_back")));
    let touched: Vec<&String> = stopped
        .nodes
        .iter()
        .filter(|n| n.report.as_ref().is_some_and(|r| r.revision == 2))
        .map(|n| &n.node_id)
        .collect();
    assert!(touched.len() <= 1, "only the first batch saw revision 2: {touched:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_offline_during_a_rollout_converges_when_it_comes_back() {
    let mut f = fleet(&["site = \"icu\"", "site = \"icu\""]).await;
    f.control
        .deploy(
            &f.org_id,
            &common::web_deployment(&f.org_id, "site=icu", common::ready_service("touch /tmp/ready", 4), 30),
        )
        .await;
    wait_status(&f, "revision 1 complete", |d| d.status == outpost_protocol::RolloutStatus::Complete).await;
    f.nodes[1].kill9();
    let away = f.nodes[1].node_id.clone();
    wait_status(&f, "the node offline", |d| {
        d.nodes.iter().any(|n| n.node_id == away && n.phase == outpost_protocol::NodePhase::Offline)
    })
    .await;
    f.control
        .deploy(
            &f.org_id,
            &common::web_deployment(
                &f.org_id,
                "site=icu",
                common::ready_service("touch /tmp/ready; echo v2", 4),
                30,
            ),
        )
        .await;
    let done = wait_status(&f, "revision 2 complete without the offline node", |d| {
        d.status == outpost_protocol::RolloutStatus::Complete
    })
    .await;
    assert!(done.nodes.iter().any(|n| n.node_id == away && n.phase == outpost_protocol::NodePhase::Offline));
    f.nodes[1].start();
    eventually("the returning node on revision 2", Duration::from_secs(60), async || {
        let c = mine(&f, service_containers("web"));
        c.iter().any(|(n, rev, up)| *n == away && *rev == 2 && *up) && !c.iter().any(|(_, rev, _)| *rev == 1)
    })
    .await;
    wait_status(&f, "every node healthy on revision 2", |d| {
        d.nodes
            .iter()
            .all(|n| n.phase == outpost_protocol::NodePhase::Healthy && n.desired_revision == Some(2))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_reads_its_inputs_from_the_local_store_read_only_and_a_missing_one_is_named() {
    let f = fleet(&["site = \"icu\""]).await;
    let node = &f.nodes[0];
    let src = node.dir.join("greeting.txt");
    std::fs::write(&src, "hello from the store\n").expect("write");
    let put = node.cli(&["objects", "put", "config/greeting.txt", src.to_str().expect("utf8")]);
    assert!(put.status.success(), "objects put: {}", String::from_utf8_lossy(&put.stderr));

    // Healthy only if it read the input and could not write next to it.
    let reads = serde_json::from_value(serde_json::json!({
        "image": common::test_image(),
        "command": ["sh", "-c", "cat /in/config/greeting.txt > /tmp/seen; \
            if touch /in/config/mine 2>/dev/null; then echo writable > /tmp/seen; fi; exec sleep 3600"],
        "inputs": ["config/"],
        "health": { "exec": ["/bin/busybox", "grep", "-q", "hello from the store", "/tmp/seen"],
                    "interval_ms": 200, "timeout_ms": 2000, "retries": 2 },
        "restart": { "mode": "always", "backoff_initial_ms": 100 },
        "health_timeout_secs": 10,
    }))
    .expect("spec");
    f.control.deploy(&f.org_id, &common::web_deployment(&f.org_id, "site=icu", reads, 30)).await;
    let done =
        wait_status(&f, "revision 1 complete", |d| d.status == outpost_protocol::RolloutStatus::Complete)
            .await;
    assert_eq!(done.nodes[0].phase, outpost_protocol::NodePhase::Healthy, "{:#?}", done.nodes);
    let staged = node.dir.join("data/services/web/web-r1/in/config/greeting.txt");
    assert!(staged.is_file(), "inputs staged under the data dir");

    // Revision 2 names an object the store lacks: it never starts, the node says which, the
    // rollout stops and goes back to revision 1, and revision 2's staging is cleaned up.
    let missing = serde_json::from_value(serde_json::json!({
        "image": common::test_image(),
        "command": ["sh", "-c", "exec sleep 3600"],
        "inputs": ["models/absent.bin"],
        "restart": { "mode": "always", "backoff_initial_ms": 100 },
        "health_timeout_secs": 3,
    }))
    .expect("spec");
    f.control.deploy(&f.org_id, &common::web_deployment(&f.org_id, "site=icu", missing, 30)).await;
    let stopped = wait_status(&f, "the rollout rolled back", |d| {
        d.status == outpost_protocol::RolloutStatus::RolledBack
    })
    .await;
    let said = stopped.reason.clone().unwrap_or_default();
    assert!(said.contains("models/absent.bin") && said.contains("not in the local object store"), "{said}");
    eventually("back on revision 1, healthy", Duration::from_secs(60), async || {
        let c = mine(&f, service_containers("web"));
        c.len() == 1 && c[0].1 == 1 && c[0].2
    })
    .await;
    assert!(!node.dir.join("data/services/web/web-r2").exists(), "revision 2's staging removed");
}
