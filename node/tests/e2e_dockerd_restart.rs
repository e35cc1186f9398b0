//! Services across a restart of the Docker engine: the real control plane and agent, and a
//! private dockerd (own containerd, data and exec roots, socket) that the test stops and starts
//! again, so the shared engine other tests use is never touched. After dockerd comes back the
//! service is healthy again on exactly one container of its revision (the same container, started
//! again, counted as one restart), and while it is away the agent keeps running and says so.
//!
//! Needs root and `dockerd`, `containerd` and `runc` on PATH, as the Docker engine does.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;
mod harness;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use harness::{Control, Node, eventually};
use nix::sys::signal::Signal;
use outpost_protocol::{DeploymentInfo, DeploymentNode, NodePhase, RolloutStatus, ServiceState};

/// Generous: a shared 2-core machine, and a container that ignores SIGTERM takes dockerd 10 s
/// to stop.
const WAIT: Duration = Duration::from_secs(90);

/// A Docker engine of this test's own: containerd and dockerd as child processes, everything
/// they keep under one temporary directory. Dropping it removes its containers, stops both
/// daemons, unmounts what dockerd mounted there and deletes the directory, on panic too.
struct PrivateEngine {
    dir: PathBuf,
    containerd: Option<Child>,
    dockerd: Option<Child>,
    /// dockerd's logs of every run, appended.
    log: PathBuf,
}

impl PrivateEngine {
    fn start() -> PrivateEngine {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test runs a private dockerd and needs root; run it as root (CI does)"
        );
        // Socket paths are limited to 108 bytes, and containerd derives longer ones from its own.
        let dir =
            tempfile::Builder::new().prefix("opd").tempdir().expect("temp dir for the private engine").keep();
        // From here on the drop cleans up.
        let mut engine =
            PrivateEngine { log: dir.join("dockerd.log"), dir: dir.clone(), containerd: None, dockerd: None };
        let longest = dir.join("c.sock.ttrpc");
        assert!(
            longest.as_os_str().len() < 100,
            "{} is too long for a unix socket; set TMPDIR to a short directory",
            longest.display()
        );
        // An empty daemon.json: the machine's own must not leak into this engine.
        std::fs::write(dir.join("daemon.json"), "{}").expect("write daemon.json");
        let d = dir.display();
        std::fs::write(
            dir.join("containerd.toml"),
            format!(
                "version = 2\nroot = \"{d}/ctd/root\"\nstate = \"{d}/ctd/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\naddress = \"{d}/c.sock\"\n[debug]\naddress = \"\"\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\npath = \"{d}/ctd/opt\"\n"
            ),
        )
        .expect("write containerd.toml");
        // containerd runs on its own, as under an init system: a dockerd that dies leaves it and
        // the containers' shims behind, and the next dockerd finds them there.
        // In a network namespace of its own, as dockerd: nothing of the machine's network (the
        // shared engine's docker0 bridge above all) can be touched by this engine.
        let containerd = Command::new("unshare")
            .args(["--net", "--", "containerd", "--config"])
            .arg(engine.dir.join("containerd.toml"))
            .stdin(Stdio::null())
            .stdout(log_file(&engine.dir.join("containerd.log")))
            .stderr(log_file(&engine.dir.join("containerd.log")))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start containerd ({e}); this test needs the Docker engine's containerd on PATH"
                )
            });
        engine.containerd = Some(containerd);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !engine.dir.join("c.sock").exists() {
            if let Some(status) = engine.containerd.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("containerd exited ({status}):\n{}", tail(&engine.dir.join("containerd.log")));
            }
            assert!(Instant::now() < deadline, "containerd made no socket within 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        engine.start_dockerd();
        engine
    }

    /// `unix://…` address of the engine's API.
    fn socket(&self) -> String {
        format!("unix://{}", self.dir.join("d.sock").display())
    }

    /// Starts dockerd, always with the same flags, and waits until its API answers.
    fn start_dockerd(&mut self) {
        assert!(self.dockerd.is_none(), "dockerd is running already");
        if let Err(why) = self.try_start_dockerd() {
            panic!("{why}");
        }
    }

    /// [`PrivateEngine::start_dockerd`] that says why instead of panicking (for the drop).
    fn try_start_dockerd(&mut self) -> Result<(), String> {
        let dir = &self.dir;
        // `unshare` execs dockerd in a new network namespace (same pid): a dockerd, even with
        // `--bridge none`, removes a `docker0` it finds at start, which would cut the shared
        // engine's default bridge from under every other test.
        let dockerd = Command::new("unshare")
            .args(["--net", "--", "dockerd", "--config-file"])
            .arg(dir.join("daemon.json"))
            .arg("--containerd")
            .arg(dir.join("c.sock"))
            .arg("--data-root")
            .arg(dir.join("root"))
            .arg("--exec-root")
            .arg(dir.join("x"))
            .arg("--pidfile")
            .arg(dir.join("d.pid"))
            .args(["--host", &self.socket()])
            // No bridge, no iptables: nothing of the machine's network is touched. Services of
            // this test use network kind `none`.
            .args(["--bridge", "none", "--iptables=false", "--ip6tables=false"])
            .args(["--storage-driver", "vfs"])
            .stdin(Stdio::null())
            .stdout(log_file(&self.log))
            .stderr(log_file(&self.log))
            .spawn()
            .map_err(|e| format!("cannot start dockerd ({e}); this test needs dockerd on PATH"))?;
        self.dockerd = Some(dockerd);
        let deadline = Instant::now() + WAIT;
        loop {
            let version = self.docker_cli(&["version", "--format", "{{.Server.Version}}"]);
            if version.is_ok_and(|out| out.status.success()) {
                return Ok(());
            }
            if let Some(status) = self.dockerd.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.dockerd = None;
                return Err(format!("the private dockerd exited ({status}):\n{}", tail(&self.log)));
            }
            if Instant::now() > deadline {
                return Err(format!("the private dockerd did not answer within {WAIT:?}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Sends `signal` to dockerd and waits until it has exited.
    fn stop_dockerd(&mut self, signal: Signal) {
        let mut child = self.dockerd.take().expect("dockerd is running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        nix::sys::signal::kill(pid, signal).expect("signal dockerd");
        let deadline = Instant::now() + WAIT;
        while child.try_wait().expect("wait for dockerd").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("dockerd did not exit within {WAIT:?} of {signal}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn docker(&self, args: &[&str]) -> Output {
        self.docker_cli(args).expect("run the docker CLI")
    }

    fn docker_cli(&self, args: &[&str]) -> std::io::Result<Output> {
        Command::new("docker").args(["--host", &self.socket()]).args(args).stdin(Stdio::null()).output()
    }

    /// Copies the busybox test image from the shared engine into this one (same image id).
    fn load_test_image(&self) -> String {
        let tar = self.dir.join("image.tar");
        let id = common::build_test_image(Some(&tar));
        let out = self.docker(&["load", "--input", &tar.display().to_string()]);
        assert!(out.status.success(), "docker load failed: {}", String::from_utf8_lossy(&out.stderr));
        id
    }

    /// Every container of `service` on this engine, running or not.
    fn service_containers(&self, service: &str) -> Vec<EngineContainer> {
        let out = self.docker(&[
            "ps",
            "--all",
            "--no-trunc",
            "--filter",
            &format!("label=outpost.service={service}"),
            "--format",
            "{{.ID}} {{.Names}} {{.Label \"outpost.revision\"}} {{.State}}",
        ]);
        assert!(out.status.success(), "docker ps failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut parts = l.split_whitespace();
                Some(EngineContainer {
                    id: parts.next()?.to_owned(),
                    name: parts.next()?.to_owned(),
                    revision: parts.next()?.parse().ok()?,
                    running: parts.next()? == "running",
                })
            })
            .collect()
    }
}

impl Drop for PrivateEngine {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- private dockerd log (tail) -----\n{}", tail(&self.log));
        }
        // Containers go with the engine's API; a dockerd that is down is started for that.
        if self.dockerd.is_none()
            && self.containerd.is_some()
            && let Err(why) = self.try_start_dockerd()
        {
            eprintln!("cannot start the private dockerd to remove its containers: {why}");
        }
        if self.dockerd.is_some()
            && let Ok(ids) = self.docker_cli(&["ps", "--all", "--quiet"])
        {
            let ids: Vec<String> =
                String::from_utf8_lossy(&ids.stdout).split_whitespace().map(str::to_owned).collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "--force", "--volumes"];
                args.extend(ids.iter().map(String::as_str));
                let _ = self.docker_cli(&args);
            }
        }
        for child in [self.dockerd.take(), self.containerd.take()].into_iter().flatten() {
            terminate(child);
        }
        // dockerd bind-mounts its data root onto itself (and a netns per container); one that
        // was killed leaves them. Deepest first.
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
            .filter(|m| Path::new(m).starts_with(&self.dir))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").args(["--lazy", &m]).status();
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("could not remove the private engine's directory {}: {e}", self.dir.display());
        }
    }
}

/// SIGTERM, then SIGKILL if it has not exited within 30 s.
fn terminate(mut child: Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn log_file(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new().create(true).append(true).open(path).expect("open a log file")
}

/// The last lines of a log file.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct EngineContainer {
    id: String,
    name: String,
    revision: u64,
    running: bool,
}

/// The deployment's row for `node_id`.
fn row<'a>(d: &'a DeploymentInfo, node_id: &str) -> &'a DeploymentNode {
    d.nodes.iter().find(|n| n.node_id == node_id).unwrap_or_else(|| panic!("{node_id} not in {d:#?}"))
}

/// What the control plane knows of the service on the node: (phase, reported state, restarts).
fn seen(d: &DeploymentInfo, node_id: &str) -> (NodePhase, Option<ServiceState>, u32) {
    let r = row(d, node_id);
    (r.phase, r.report.as_ref().map(|r| r.state), r.report.as_ref().map_or(0, |r| r.restarts))
}

/// Deploys one service to an agent on a private engine, restarts that engine's dockerd by
/// `signal` (SIGTERM: a clean stop; SIGKILL: a crash), and checks what the agent makes of it.
/// Whether the machine has the shared engine's default bridge.
fn has_docker0() -> bool {
    Path::new("/sys/class/net/docker0").exists()
}

async fn service_survives_a_dockerd_restart(signal: Signal) {
    let bridge_before = has_docker0();
    service_survives_a_dockerd_restart_inner(signal).await;
    // The private engine is gone: the shared engine's network must be as it was.
    assert_eq!(has_docker0(), bridge_before, "the private engine changed the machine's docker0 bridge");
}

async fn service_survives_a_dockerd_restart_inner(signal: Signal) {
    // Declared first, dropped last: the agent is gone before its engine is torn down.
    let mut engine = PrivateEngine::start();
    let image = engine.load_test_image();
    assert_eq!(image, common::test_image());

    let tmp = tempfile::tempdir().expect("tempdir");
    let control = Control::start(&tmp.path().join("control"), None);
    let org = control.create_org("dockerd-restart").await;
    let config = format!(
        "[node]\nlabels = {{ site = \"edge\" }}\n[control]\npoll_wait_secs = 5\n\
         [agent]\nheartbeat_secs = 1\nshutdown_grace_secs = 3\n[docker]\nsocket = \"{}\"\n",
        engine.socket()
    );
    let mut node = Node::enroll(&tmp.path().join("node"), &control, &org.id, &config).await;
    node.start();
    let node_id = node.node_id.clone();
    eventually("the agent to heartbeat its labels", WAIT, async || {
        control.nodes(Some("site=edge")).await.nodes.iter().any(|n| n.node_id == node_id && n.online)
    })
    .await;

    control
        .deploy(
            &org.id,
            &common::web_deployment(&org.id, "site=edge", common::ready_service("touch /tmp/ready", 30), 60),
        )
        .await;
    let mut last = None;
    eventually("the deployment complete and healthy", WAIT, async || {
        let d = control.deployment(&org.id, "web").await;
        let done = d.status == RolloutStatus::Complete && seen(&d, &node_id).0 == NodePhase::Healthy;
        last = Some(d);
        done
    })
    .await;
    let before = last.expect("deployment");
    assert_eq!(seen(&before, &node_id), (NodePhase::Healthy, Some(ServiceState::Healthy), 0));
    let name = format!("outpost-svc-{node_id}-web-web-r1");
    let first = engine.service_containers("web");
    assert!(
        matches!(first.as_slice(), [c] if c.name == name && c.revision == 1 && c.running),
        "one running container of revision 1 before the restart: {first:?}"
    );

    // dockerd goes away. Without live-restore its containers stop with it (SIGTERM), or when
    // the next dockerd finds them (SIGKILL).
    engine.stop_dockerd(signal);
    let down_since = Instant::now();

    let mut status = serde_json::Value::Null;
    eventually("the agent to say that the engine does not answer", WAIT, async || {
        status = node.status_json();
        status["agent"]["runtime_error"].is_string()
    })
    .await;
    assert_eq!(status["agent"]["ready"], true, "the agent stays ready without its engine: {status:#}");
    let mut down = None;
    eventually("the node to stop reporting the service healthy", WAIT, async || {
        let d = control.deployment(&org.id, "web").await;
        let (_, state, _) = seen(&d, &node_id);
        down = Some(d);
        state.is_some_and(|s| s != ServiceState::Healthy)
    })
    .await;
    let down = down.expect("deployment");
    let down_row = row(&down, &node_id);
    assert_ne!(down_row.phase, NodePhase::Healthy, "{down_row:#?}");
    let report = down_row.report.as_ref().expect("a report");
    assert_eq!((report.revision, report.state), (1, ServiceState::Unhealthy), "{report:#?}");
    assert!(
        report.message.as_deref().is_some_and(|m| m.contains("engine")),
        "the report says why: {report:#?}"
    );
    assert_eq!(down.status, RolloutStatus::Complete, "a finished rollout is not undone by it");
    assert!(node.is_running(), "the agent survives the loss of its engine");
    // The reconciler tries once a second; a bound ten times that only catches a busy loop.
    let failed_passes =
        node.log.snapshot().iter().filter(|l| l.contains("service reconciliation failed")).count();
    let bound = 10 * down_since.elapsed().as_secs() + 20;
    assert!(
        failed_passes as u64 <= bound,
        "{failed_passes} failed reconciler passes in {:?} without an engine: a busy loop",
        down_since.elapsed()
    );

    engine.start_dockerd();

    // Back: the same container started again, once; never a second one beside it.
    let mut back = None;
    eventually("the service healthy again after one restart", WAIT, async || {
        let containers = engine.service_containers("web");
        assert!(containers.len() <= 1, "never two containers of the service: {containers:?}");
        let d = control.deployment(&org.id, "web").await;
        let (phase, state, restarts) = seen(&d, &node_id);
        assert!(restarts <= 1, "one restart of dockerd, one restart of the service: {d:#?}");
        back = Some(d);
        phase == NodePhase::Healthy && state == Some(ServiceState::Healthy) && restarts == 1
    })
    .await;
    let back = back.expect("deployment");
    let report = row(&back, &node_id).report.clone().expect("a report");
    assert_eq!(report.revision, 1);
    assert!(report.last_exit.is_some(), "the stop was seen as an exit: {report:#?}");
    let now = engine.service_containers("web");
    assert_eq!(now.len(), 1, "exactly one container of the service: {now:?}");
    assert_eq!(now[0], EngineContainer { running: true, ..first[0].clone() }, "the same container again");

    eventually("the agent to see its engine again", WAIT, async || {
        node.status_json()["agent"]["runtime_error"].is_null()
    })
    .await;
    // Settled: a few more passes of the reconciler change nothing.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let containers = engine.service_containers("web");
        assert!(
            matches!(containers.as_slice(), [c] if c.id == first[0].id && c.running),
            "still the one container: {containers:?}"
        );
    }
    let settled = control.deployment(&org.id, "web").await;
    assert_eq!(seen(&settled, &node_id), (NodePhase::Healthy, Some(ServiceState::Healthy), 1));
    assert!(node.is_running(), "the agent did not crash");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_is_healthy_again_on_its_one_container_after_dockerd_stops_and_starts() {
    service_survives_a_dockerd_restart(Signal::SIGTERM).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_is_healthy_again_on_its_one_container_after_dockerd_is_killed_and_restarted() {
    service_survives_a_dockerd_restart(Signal::SIGKILL).await;
}

/// A process that containerd runs under a container id of the engine's, made with `ctr` behind
/// dockerd's back; killed and deleted on drop (on panic too), before the engine goes.
struct StrayTask {
    address: PathBuf,
    id: String,
}

impl StrayTask {
    fn ctr(address: &Path, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(address)
            .args(["--namespace", "moby"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr (it ships with containerd)")
    }

    /// `sleep 600` in a busybox root of its own, under container id `id`.
    fn run(engine: &PrivateEngine, id: &str) -> StrayTask {
        let rootfs = engine.dir.join("stray-rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).expect("stray rootfs");
        let busybox = which_busybox();
        std::fs::copy(&busybox, rootfs.join("bin/busybox")).expect("copy busybox");
        let address = engine.dir.join("c.sock");
        let out = Self::ctr(
            &address,
            &[
                "run",
                "--detach",
                "--rootfs",
                &rootfs.display().to_string(),
                id,
                "/bin/busybox",
                "sleep",
                "600",
            ],
        );
        assert!(out.status.success(), "ctr run failed: {}", String::from_utf8_lossy(&out.stderr));
        StrayTask { address, id: id.to_owned() }
    }
}

impl Drop for StrayTask {
    fn drop(&mut self) {
        let _ = Self::ctr(&self.address, &["tasks", "kill", "--signal", "SIGKILL", &self.id]);
        for _ in 0..50 {
            if Self::ctr(&self.address, &["tasks", "delete", &self.id]).status.success() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Self::ctr(&self.address, &["containers", "delete", &self.id]);
    }
}

/// The static busybox the test image is built from.
fn which_busybox() -> PathBuf {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("busybox (Debian's busybox-static; scripts/test installs it)")
}

/// Chaos seed 1 (`scripts/chaos --seed 1 --injections 50` with dockerd-restart): dockerd was
/// killed while it started a job's container, and containerd kept what that start had made. The
/// next dockerd answers every start of the container `500 id already in use`, and the agent,
/// taking it for a passing engine error, retried for ever: the job never finished. Here the
/// same state is made on purpose (the job's container created, dockerd killed, containerd given
/// a live process under the container's id, dockerd started again). The attempt must end once,
/// as an error that says what happened, without a second start, and its container be removed.
#[tokio::test(flavor = "multi_thread")]
async fn chaos_seed_1_a_container_start_cut_short_by_a_killed_dockerd_fails_the_attempt_once() {
    let mut engine = PrivateEngine::start();
    let image = engine.load_test_image();
    assert_eq!(image, common::test_image());

    let tmp = tempfile::tempdir().expect("tempdir");
    let control = Control::start(&tmp.path().join("control"), None);
    let org = control.create_org("start-cut-short").await;
    let config = format!(
        "[control]\npoll_wait_secs = 5\n[agent]\nheartbeat_secs = 1\nshutdown_grace_secs = 3\n\
         [docker]\nsocket = \"{}\"\n",
        engine.socket()
    );
    let mut node = Node::enroll(&tmp.path().join("node"), &control, &org.id, &config).await;
    let node_id = node.node_id.clone();
    // The agent is not running yet: the job waits for it, and its container is made first, as
    // the cut-short start left it.
    let job = control.submit(&node_id, harness::sh("echo ran")).await;
    let name = format!("outpost-{}-{}", job.job_id, job.attempt);
    let attempt = job.attempt.to_string();
    let out = engine.docker(&[
        "create",
        "--name",
        &name,
        "--network",
        "none",
        "--label",
        &format!("outpost.node={node_id}"),
        "--label",
        &format!("outpost.job={}", job.job_id),
        "--label",
        &format!("outpost.attempt={attempt}"),
        &image,
        "sh",
        "-c",
        "echo ran",
    ]);
    assert!(out.status.success(), "docker create failed: {}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    engine.stop_dockerd(Signal::SIGKILL);
    // Dropped before the engine: the stray process goes first.
    let _stray = StrayTask::run(&engine, &id);
    engine.start_dockerd();
    let state = engine.docker(&["inspect", "--format", "{{.State.Status}}", &name]);
    assert_eq!(
        String::from_utf8_lossy(&state.stdout).trim(),
        "created",
        "the engine's view after the restart"
    );

    node.start();
    let result = control.wait_result(&job.job_id, WAIT).await;
    assert_eq!(result.outcome, outpost_protocol::Outcome::Error, "{result:#?}");
    let error = result.error.clone().unwrap_or_default();
    assert!(
        error.contains("already in use") && error.contains("not started again"),
        "the error says what the engine answered and why the job is not retried: {error}"
    );
    assert_eq!(result.exit_code, None, "{result:#?}");
    let starts = node.log.snapshot().iter().filter(|l| l.contains("retrying") && l.contains(&name)).count();
    assert_eq!(starts, 0, "the start was not retried: {:#?}", node.log.snapshot());
    eventually("the attempt's container removed", WAIT, async || {
        let out = engine.docker(&["ps", "--all", "--quiet", "--filter", &format!("name=^{name}$")]);
        out.status.success() && out.stdout.trim_ascii().is_empty()
    })
    .await;
    assert_eq!(control.results_recorded(&job.job_id).await, 1, "one result");
    assert!(node.is_running(), "the agent did not crash");
}
