//! End to end: `outpost-control` and `outpost` as real processes over real TLS on loopback,
//! jobs running in the real Docker engine. Crash tests SIGKILL the real processes.

#![allow(clippy::expect_used)]

mod common;
mod harness;

use std::time::Duration;

use harness::{Control, Node, container_starts, docker_inspect, eventually, sh, unix_now_s};
use outpost_protocol::{JobState, Outcome, SubmitJobRequest};

const TEST_CONFIG: &str =
    "[control]\npoll_wait_secs = 5\n[agent]\nheartbeat_secs = 2\nshutdown_grace_secs = 3\n";
const RESULT_WAIT: Duration = Duration::from_secs(90);

struct Site {
    _tmp: tempfile::TempDir,
    control: Control,
    node: Node,
    org_id: String,
}

/// A control plane and one enrolled node (not started), each in its own temp dir.
/// `agent_lines` are extra keys of the node's `[agent]` table.
async fn site(agent_lines: &str) -> Site {
    let tmp = tempfile::tempdir().expect("tempdir");
    let control = Control::start(&tmp.path().join("control"), None);
    let org = control.create_org("e2e").await;
    let node =
        Node::enroll(&tmp.path().join("node"), &control, &org.id, &format!("{TEST_CONFIG}{agent_lines}\n"))
            .await;
    Site { _tmp: tmp, control, node, org_id: org.id }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_runs_hardened_and_its_result_is_stored_once() {
    let mut s = site("").await;
    s.node.start();
    let since = unix_now_s();
    let job = s.control.submit(&s.node.node_id, sh("echo hello; echo oops >&2; sleep 3; exit 3")).await;
    assert_eq!(job.state, JobState::Queued);

    // While it runs, the container must carry every hardened default.
    let name = format!("outpost-{}-1", job.job_id);
    let mut inspected = None;
    eventually("the job's container to run", Duration::from_secs(30), async || {
        inspected = docker_inspect(&name).filter(|c| c["State"]["Running"] == true);
        inspected.is_some()
    })
    .await;
    let c = inspected.expect("inspected");
    let host = &c["HostConfig"];
    assert_eq!(host["ReadonlyRootfs"], true, "read-only rootfs");
    assert_eq!(host["CapDrop"], serde_json::json!(["ALL"]), "all capabilities dropped");
    assert!(
        host["SecurityOpt"]
            .as_array()
            .expect("SecurityOpt")
            .iter()
            .any(|o| o.as_str() == Some("no-new-privileges") || o.as_str() == Some("no-new-privileges:true")),
        "no-new-privileges: {}",
        host["SecurityOpt"]
    );
    assert_eq!(host["NetworkMode"], "none");
    assert!(host["Memory"].as_i64().expect("Memory") > 0, "memory limit");
    assert!(host["PidsLimit"].as_i64().expect("PidsLimit") > 0, "pids limit");
    assert!(host["NanoCpus"].as_i64().expect("NanoCpus") > 0, "cpu limit");
    assert!(host["Tmpfs"].get("/tmp").is_some(), "tmpfs on /tmp: {}", host["Tmpfs"]);
    let user = c["Config"]["User"].as_str().expect("User");
    assert!(!user.is_empty() && !user.starts_with("0") && user != "root", "non-root user, got {user:?}");
    assert_eq!(c["Config"]["Labels"]["outpost.job"], job.job_id.as_str());
    assert_eq!(c["Config"]["Labels"]["outpost.attempt"], "1");

    let result = s.control.wait_result(&job.job_id, RESULT_WAIT).await;
    assert_eq!(result.outcome, Outcome::Failed);
    assert_eq!(result.exit_code, Some(3));
    assert_eq!(result.stdout_tail.trim(), "hello");
    assert_eq!(result.stderr_tail.trim(), "oops");
    assert!(result.timings.started_unix_ms.is_some() && result.timings.finished_unix_ms.is_some());
    assert_eq!(s.control.job(&job.job_id).await.state, JobState::Finished);
    assert_eq!(s.control.results_recorded(&job.job_id).await, 1);
    assert_eq!(container_starts(&job.job_id, since), 1);

    // The finished container is cleaned up; the node's status says it is connected and idle.
    eventually("the container to be removed", Duration::from_secs(20), async || {
        docker_inspect(&name).is_none()
    })
    .await;
    let st = s.node.status_json();
    assert_eq!(st["enrolled"], true);
    assert_eq!(st["agent"]["ready"], true);
    assert_eq!(s.node.stop().code(), Some(0), "SIGTERM drains and exits 0");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_absent_image_fails_the_job_with_a_clear_result() {
    let mut s = site("").await;
    s.node.start();
    let mut spec = sh("true");
    spec.image = format!("sha256:{}", "ab".repeat(32));
    let job = s.control.submit(&s.node.node_id, spec).await;
    let result = s.control.wait_result(&job.job_id, RESULT_WAIT).await;
    assert_eq!(result.outcome, Outcome::Error);
    let err = result.error.expect("error message");
    assert!(err.contains("not present") && err.contains("images load"), "{err}");
}

/// `[docker] apparmor_profile` is required once set: an engine without AppArmor (this machine's
/// kernel has none), or a kernel without the profile loaded, starts no container, and the job
/// says why. Never a container quietly run without the confinement the site asked for.
#[tokio::test(flavor = "multi_thread")]
async fn a_configured_apparmor_profile_that_cannot_be_applied_starts_no_container() {
    let mut s = site("[docker]\napparmor_profile = \"outpost-test-not-loaded\"").await;
    s.node.start();
    let since = unix_now_s();
    let job = s.control.submit(&s.node.node_id, sh("echo must-not-run")).await;
    let result = s.control.wait_result(&job.job_id, RESULT_WAIT).await;
    assert_eq!(result.outcome, Outcome::Error, "{result:?}");
    let err = result.error.expect("error message");
    assert!(
        err.contains("outpost-test-not-loaded")
            && (err.contains("runs without AppArmor") || err.contains("no such profile loaded")),
        "{err}"
    );
    assert_eq!(container_starts(&job.job_id, since), 0, "no container ran");
    assert!(docker_inspect(&format!("outpost-{}-1", job.job_id)).is_none(), "none was even created");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_signed_by_another_key_is_rejected_reported_and_audited() {
    let mut s = site("").await;
    // Pin a different org key on the node, as if the operator enrolled it into the wrong org.
    let other = s.control.create_org("other").await;
    let node_json = s.node.dir.join("data/identity/node.json");
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&node_json).expect("read")).expect("json");
    v["org_signing_key"] = serde_json::to_value(&other.signing_key).expect("key");
    std::fs::write(&node_json, serde_json::to_vec(&v).expect("ser")).expect("write");
    s.node.start();

    let since = unix_now_s();
    let job = s.control.submit(&s.node.node_id, sh("echo must-not-run")).await;
    let result = s.control.wait_result(&job.job_id, RESULT_WAIT).await;
    assert_eq!(result.outcome, Outcome::Rejected);
    let err = result.error.expect("reason");
    assert!(err.to_lowercase().contains("signature") || err.contains("key"), "{err}");
    assert_eq!(container_starts(&job.job_id, since), 0, "a rejected job never runs");
    s.node.stop();
    let out = s.node.cli(&["audit", "list"]);
    let audit = String::from_utf8_lossy(&out.stdout);
    assert!(audit.contains("rejected") && audit.contains(&job.job_id), "node audit log: {audit}");
    let out = s.node.cli(&["audit", "verify"]);
    assert!(out.status.success(), "audit chain intact: {}", String::from_utf8_lossy(&out.stdout));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_that_expired_while_the_node_was_offline_is_rejected() {
    let mut s = site("").await;
    let job = s
        .control
        .submit_request(&SubmitJobRequest {
            expires_in_secs: Some(1),
            ..SubmitJobRequest::for_node(s.node.node_id.clone(), sh("echo too-late"))
        })
        .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    s.node.start();
    let result = s.control.wait_result(&job.job_id, RESULT_WAIT).await;
    assert_eq!(result.outcome, Outcome::Rejected);
    assert!(result.error.as_deref().unwrap_or_default().contains("expired"), "{:?}", result.error);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_starts_while_the_control_plane_is_down_and_catches_up() {
    let mut s = site("").await;
    let port = s.control.port;
    s.control.kill();
    s.node.start(); // ready and running jobs; the uplink retries in the background.
    assert!(
        s.node.log.wait_for("unreachable", Duration::from_secs(20))
            || s.node.log.wait_for("connection refused", Duration::from_secs(1)),
        "the agent says why it cannot reach the control plane"
    );
    let st = s.node.status_json();
    assert_eq!(st["agent"]["connected"], false);

    s.control = Control::start(&s.control.dir.clone(), Some(port));
    let job = s.control.submit(&s.node.node_id, sh("echo back")).await;
    let result = s.control.wait_result(&job.job_id, RESULT_WAIT).await;
    assert_eq!(result.stdout_tail.trim(), "back");
    let _ = &s.org_id;
}

/// Docker comes up after the agent (an appliance's boot, an engine being repaired): the agent
/// is ready at once, heartbeats and says why jobs wait, fetches no job meanwhile, and runs the
/// job once the engine answers. The socket first accepts connections and never answers, as a
/// socket-activated dockerd does while it starts (or fails to).
#[tokio::test(flavor = "multi_thread")]
async fn the_agent_is_ready_before_docker_and_runs_jobs_once_it_answers() {
    let sockets = tempfile::tempdir().expect("tempdir");
    let socket = sockets.path().join("docker.sock");
    let silent = std::os::unix::net::UnixListener::bind(&socket).expect("bind a silent socket");
    let mut s = site(&format!("[docker]\nsocket = \"{}\"", socket.display())).await;
    s.node.start_agent();
    let job = s.control.submit(&s.node.node_id, sh("echo after-docker")).await;

    // Ready and heartbeating, but saying that jobs wait for the engine.
    let node = &s.node;
    eventually(
        "the status to show a delivered heartbeat and why jobs wait",
        Duration::from_secs(45),
        async || {
            let st = node.status_json();
            st["agent"]["connected"] == true && st["agent"]["runtime_error"].is_string()
        },
    )
    .await;
    let st = s.node.status_json();
    assert_eq!(st["agent"]["ready"], true);
    assert_eq!(st["agent"]["runtime_ready"], false);
    let why = st["agent"]["runtime_error"].as_str().unwrap_or_default();
    assert!(why.contains("not answer"), "the status says the engine does not answer: {why:?}");
    let text = String::from_utf8_lossy(&s.node.cli(&["status"]).stdout).into_owned();
    assert!(text.contains("runtime:     not ready"), "{text}");
    let info: outpost_protocol::NodeInfo = serde_json::from_str(
        &s.control
            .try_get(&outpost_protocol::paths::fill(
                outpost_protocol::paths::NODE,
                "node_id",
                &s.node.node_id,
            ))
            .await,
    )
    .expect("node info");
    let hb = info.last_heartbeat.expect("a heartbeat reached the control plane");
    assert_eq!(hb.inventory.docker_version, None, "the heartbeat says the engine is not there");
    assert_eq!(s.control.job(&job.job_id).await.state, JobState::Queued, "no job is fetched meanwhile");

    // The engine appears at the configured socket: the job runs, once.
    let engine = engine_socket();
    let since = unix_now_s();
    drop(silent);
    std::fs::remove_file(&socket).expect("remove the silent socket");
    std::os::unix::fs::symlink(&engine, &socket).expect("link the engine's socket");
    assert!(
        s.node.log.wait_for("container runtime ready", Duration::from_secs(60)),
        "the agent notices the engine (it retries at most every 30 s)"
    );
    let result = s.control.wait_result(&job.job_id, RESULT_WAIT).await;
    assert_eq!(result.outcome, Outcome::Succeeded);
    assert_eq!(result.stdout_tail.trim(), "after-docker");
    assert_eq!(container_starts(&job.job_id, since), 1);
    let node = &s.node;
    eventually("the status to show the runtime ready", Duration::from_secs(10), async || {
        let st = node.status_json();
        st["agent"]["runtime_ready"] == true && st["agent"]["runtime_error"].is_null()
    })
    .await;
}

/// The engine's Unix socket: `DOCKER_HOST` when it is one, else the default.
fn engine_socket() -> std::path::PathBuf {
    std::env::var("DOCKER_HOST")
        .ok()
        .and_then(|h| h.strip_prefix("unix://").map(str::to_owned))
        .unwrap_or_else(|| "/var/run/docker.sock".to_owned())
        .into()
}

/// A Unix socket in front of the engine whose connections the test can cut, as a dockerd
/// restart (or one stopping beside the agent at shutdown) does.
struct EngineProxy {
    path: std::path::PathBuf,
    engine: std::path::PathBuf,
    /// The acceptor and every connection it made: cutting aborts them all.
    tasks: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl EngineProxy {
    fn start(path: &std::path::Path, engine: std::path::PathBuf) -> EngineProxy {
        let proxy = EngineProxy { path: path.to_owned(), engine, tasks: Default::default() };
        proxy.listen();
        proxy
    }

    fn listen(&self) {
        let listener = tokio::net::UnixListener::bind(&self.path).expect("bind the proxy socket");
        let engine = self.engine.clone();
        let tasks = std::sync::Arc::clone(&self.tasks);
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let engine = engine.clone();
                tasks.lock().expect("lock").push(tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::UnixStream::connect(&engine).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                    }
                }));
            }
        });
        self.tasks.lock().expect("lock").push(accept);
    }

    /// Drop every connection and stop listening: calls fail until `listen` again.
    fn cut(&self) {
        for task in self.tasks.lock().expect("lock").drain(..) {
            task.abort();
        }
        std::fs::remove_file(&self.path).expect("remove the proxy socket");
    }
}

/// The engine's connection drops while a job runs (dockerd restarted, or stopping beside the
/// agent at shutdown): the wait for the container fails, and the agent waits again instead of
/// failing the job; the container is not started twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_outlives_the_engine_connection_dropping_while_it_runs() {
    let sockets = tempfile::tempdir().expect("tempdir");
    let socket = sockets.path().join("docker.sock");
    let proxy = EngineProxy::start(&socket, engine_socket());
    let mut s = site(&format!("[docker]\nsocket = \"{}\"", socket.display())).await;
    s.node.start();
    let since = unix_now_s();
    let job = s.control.submit(&s.node.node_id, sh("sleep 6; echo outlived")).await;
    let name = format!("outpost-{}-1", job.job_id);
    eventually("the job's container to run", Duration::from_secs(60), async || {
        docker_inspect(&name).is_some_and(|c| c["State"]["Running"] == true)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await; // the agent is in its wait now
    proxy.cut();
    assert!(
        s.node.log.wait_for("retrying", Duration::from_secs(20)),
        "the agent's wait for the container failed and is retried"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.listen();
    let result = s.control.wait_result(&job.job_id, RESULT_WAIT).await;
    assert_eq!(result.outcome, Outcome::Succeeded, "{:?}", result.error);
    assert_eq!(result.stdout_tail.trim(), "outlived");
    assert_eq!(container_starts(&job.job_id, since), 1);
}

/// SIGKILL while the job is staged (persisted, waiting for a slot): after the restart it runs
/// exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_while_staged_runs_the_job_once_after_restart() {
    let mut s = site("max_concurrent_jobs = 1\nqueue_limit = 8").await;
    s.node.start();
    let since = unix_now_s();
    let blocker = s.control.submit(&s.node.node_id, sh("sleep 4; echo blocker")).await;
    let staged = s.control.submit(&s.node.node_id, sh("echo staged-once")).await;
    let control = &s.control;
    eventually("the second job to be accepted by the node", Duration::from_secs(30), async || {
        control.job(&staged.job_id).await.state == JobState::Accepted
    })
    .await;
    assert!(docker_inspect(&format!("outpost-{}-1", staged.job_id)).is_none(), "still staged");
    s.node.kill9();
    s.node.start();
    let r1 = s.control.wait_result(&blocker.job_id, RESULT_WAIT).await;
    let r2 = s.control.wait_result(&staged.job_id, RESULT_WAIT).await;
    assert_eq!(r1.stdout_tail.trim(), "blocker");
    assert_eq!(r2.stdout_tail.trim(), "staged-once");
    assert_eq!(container_starts(&blocker.job_id, since), 1, "the adopted job was not started again");
    assert_eq!(container_starts(&staged.job_id, since), 1);
    assert_eq!(s.control.results_recorded(&blocker.job_id).await, 1);
    assert_eq!(s.control.results_recorded(&staged.job_id).await, 1);
}

/// SIGKILL while the container runs: the restarted agent adopts it and reports once.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_while_running_adopts_the_container() {
    let mut s = site("").await;
    s.node.start();
    let since = unix_now_s();
    let job = s.control.submit(&s.node.node_id, sh("sleep 4; echo adopted")).await;
    let name = format!("outpost-{}-1", job.job_id);
    eventually("the container to run", Duration::from_secs(30), async || {
        docker_inspect(&name).is_some_and(|c| c["State"]["Running"] == true)
    })
    .await;
    s.node.kill9();
    assert!(
        docker_inspect(&name).is_some_and(|c| c["State"]["Running"] == true),
        "the job outlives the agent"
    );
    s.node.start();
    let r = s.control.wait_result(&job.job_id, RESULT_WAIT).await;
    assert_eq!(r.outcome, Outcome::Succeeded);
    assert_eq!(r.stdout_tail.trim(), "adopted");
    assert_eq!(container_starts(&job.job_id, since), 1);
    assert_eq!(s.control.results_recorded(&job.job_id).await, 1);
}

/// The job finishes while the control plane is down, the agent is SIGKILLed with the result in
/// its outbox, then both come back: the result is delivered once and the job never re-runs.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_with_an_unreported_result_delivers_it_once() {
    let mut s = site("").await;
    s.node.start();
    let since = unix_now_s();
    let job = s.control.submit(&s.node.node_id, sh("sleep 2; echo kept")).await;
    let name = format!("outpost-{}-1", job.job_id);
    eventually("the container to run", Duration::from_secs(30), async || docker_inspect(&name).is_some())
        .await;
    let port = s.control.port;
    s.control.kill(); // the network is gone while the job finishes
    let node = &s.node;
    eventually("the result to reach the outbox", Duration::from_secs(30), async || {
        let out = node.cli(&["status", "--json"]);
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        st["agent"]["depths"]["outbox"].as_u64().unwrap_or(0) == 1
    })
    .await;
    s.node.kill9();
    s.node.start();
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.control = Control::start(&s.control.dir.clone(), Some(port));
    let r = s.control.wait_result(&job.job_id, RESULT_WAIT).await;
    assert_eq!(r.stdout_tail.trim(), "kept");
    assert_eq!(container_starts(&job.job_id, since), 1);
    // Give a duplicate report time to arrive, then check it was not stored twice.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(s.control.results_recorded(&job.job_id).await, 1);
}

/// The control plane restarts while the node holds a long-poll: the node reconnects and the
/// next job still arrives.
#[tokio::test(flavor = "multi_thread")]
async fn a_control_plane_restart_during_long_poll_is_survived() {
    let mut s = site("").await;
    s.node.start();
    let first = s.control.submit(&s.node.node_id, sh("echo one")).await;
    s.control.wait_result(&first.job_id, RESULT_WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // the node is now parked in a poll
    s.control.restart();
    let second = s.control.submit(&s.node.node_id, sh("echo two")).await;
    let r = s.control.wait_result(&second.job_id, RESULT_WAIT).await;
    assert_eq!(r.stdout_tail.trim(), "two");
    assert_eq!(s.control.results_recorded(&first.job_id).await, 1);
}

/// Found by the chaos campaign, seed 4 (`scripts/chaos --seed 4 --faults disk-full,kill-agent`):
/// the node's data directory filled up while a job ran. The ledger could not record the
/// result; the agent used to collect the job again in a loop, and after a restart staged it
/// again over the outputs it had written, reporting success with none. Now it stops, says why,
/// and once there is room again the job is collected once, its output listed, never re-run.
#[tokio::test(flavor = "multi_thread")]
async fn chaos_seed_4_a_full_disk_stops_the_agent_and_loses_no_output() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test mounts a small tmpfs for the node's data directory: run it as root (CI does)");
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let control = Control::start(&tmp.path().join("control"), None);
    let org = control.create_org("e2e").await;
    let data = tmp.path().join("node/data");
    std::fs::create_dir_all(&data).expect("data dir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs"])
        .arg(&data)
        .status()
        .expect("run mount");
    assert!(mounted.success(), "mount a tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(data.clone());
    // The object store elsewhere: only the ledger meets the full disk.
    let objects = tmp.path().join("objects");
    let config = format!("{TEST_CONFIG}[storage.fs]\nroot = \"{}\"\n", objects.display());
    let mut node = Node::enroll(&tmp.path().join("node"), &control, &org.id, &config).await;
    node.start();
    let since = unix_now_s();
    let mut spec = sh("echo kept > /out/a.txt; sleep 3; echo done");
    spec.output_prefix = Some("results/".into());
    let job = control.submit(&node.node_id, spec).await;
    let name = format!("outpost-{}-1", job.job_id);
    eventually("the container to run", Duration::from_secs(30), async || {
        docker_inspect(&name).is_some_and(|c| c["State"]["Running"] == true)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await; // its output is written
    // The disk stays full: whatever the agent frees (a finished job's files) is taken again,
    // so its ledger probe cannot slip a write in between.
    let mut ballast = Vec::new();
    let mut fill = || {
        let free = nix::sys::statvfs::statvfs(&data).expect("statvfs");
        let bytes = free.blocks_available() as u64 * free.fragment_size() as u64;
        if bytes > 0 {
            let path = data.join(format!("ballast-{}", ballast.len()));
            let file = std::fs::File::create(&path).expect("ballast");
            let _ = nix::fcntl::posix_fallocate(&file, 0, bytes as i64);
            ballast.push(path);
        }
    };
    fill();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while node.is_running() {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent goes on with a full disk:\n{}",
            node.log.snapshot().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        fill();
    }
    let status = node.stop(); // reaps the exited agent
    assert_eq!(status.code(), Some(1), "the agent fails, so its service manager starts it again");
    assert!(
        node.log.contains("Nothing is lost"),
        "the agent says why it stopped:\n{}",
        node.log.snapshot().join("\n")
    );
    for path in &ballast {
        std::fs::remove_file(path).expect("free the disk");
    }
    node.start();
    let r = control.wait_result(&job.job_id, RESULT_WAIT).await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
    assert_eq!(r.stdout_tail.trim(), "done");
    assert_eq!(r.outputs.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(), ["results/a.txt"], "{r:?}");
    assert_eq!(container_starts(&job.job_id, since), 1, "never run again");
    assert_eq!(control.results_recorded(&job.job_id).await, 1);
}
