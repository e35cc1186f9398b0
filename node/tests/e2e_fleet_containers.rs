//! The fleet as containers: the real control plane and three agents, each in a container of its
//! own (own identity, own data dir) on a private Docker network the test creates. The network is
//! `--internal`: the agents reach the control plane by its container name and nothing else, while
//! the jobs and services they run start on the host's engine through its mounted socket. Covered:
//! a rolling deployment; an agent cut off with `docker network disconnect` mid-rollout that
//! catches up once reconnected; an `--any` job whose agent container is SIGKILLed, finished on
//! another node and counted once.
//!
//! Everything a test starts carries its own name prefix and is removed when the test ends, pass or
//! fail: its containers, its network, and the job and service containers of its nodes.

#![allow(clippy::expect_used)]

mod common;
mod harness;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use harness::{Operator, eventually, remove_node_containers, sh};
use outpost_protocol::{
    DeploymentInfo, JobState, NodePhase, Outcome, Placement, RolloutStatus, SubmitJobRequest,
};
use sha2::{Digest, Sha256};

/// Where the binaries are mounted in every container.
const AGENT_BIN: &str = "/usr/local/bin/outpost";
const CONTROL_BIN: &str = "/usr/local/bin/outpost-control";
/// The control plane's port inside its container.
const CONTROL_PORT: u16 = 8443;
/// The engine's socket as the agents see it.
const SOCKET_IN_CONTAINER: &str = "/var/run/docker.sock";
/// Labels every container and network of a test with its prefix, for cleanup.
const TEST_LABEL: &str = "outpost-e2e-fleet";

/// Waits here are generous: three agents, a control plane and their containers share two cores.
const WAIT: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------------------
// The image
// ---------------------------------------------------------------------------------------------

/// The image every container runs: the dynamic loader and the shared libraries of both binaries
/// (as `ldd` lists them), an empty /tmp, nothing else. The binaries are bind-mounted read-only,
/// so a rebuild needs no new image. Assembled as a `docker save` tarball with fixed timestamps,
/// so its id is a pure function of those libraries: concurrent tests load one image, not two.
fn runtime_image() -> String {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| build_runtime_image(&[harness::node_bin(), harness::control_bin()])).clone()
}

/// The absolute paths `ldd` prints for `bin` (the loader included, the vDSO not).
fn shared_libraries(bin: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(bin).output().expect("run ldd");
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            format!("{text}{err}").contains("not a dynamic executable"),
            "ldd {} failed: {text}{err}",
            bin.display()
        );
        return Vec::new();
    }
    text.lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .map(PathBuf::from)
        .collect()
}

/// Appends one entry with fixed owner and time; `None` is a directory.
fn append(tar: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: Option<&[u8]>) {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(if data.is_some() { tar::EntryType::Regular } else { tar::EntryType::Directory });
    header.set_mode(mode);
    header.set_size(data.map_or(0, |d| d.len() as u64));
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    tar.append_data(&mut header, path, data.unwrap_or_default()).expect("append to an image tarball");
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn build_runtime_image(bins: &[PathBuf]) -> String {
    // Path in the image → contents (`None`: a directory). Sorted, so parents come first.
    let mut entries: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
    for dir in ["tmp", "usr", "usr/local", "usr/local/bin"] {
        entries.insert(dir.to_owned(), None);
    }
    for lib in bins.iter().flat_map(|b| shared_libraries(b)) {
        let bytes = std::fs::read(&lib).unwrap_or_else(|e| panic!("read {}: {e}", lib.display()));
        for dir in lib.parent().into_iter().flat_map(Path::ancestors) {
            let dir = dir.to_string_lossy().trim_start_matches('/').to_owned();
            if !dir.is_empty() {
                entries.insert(dir, None);
            }
        }
        entries.insert(lib.to_string_lossy().trim_start_matches('/').to_owned(), Some(bytes));
    }
    let mut layer = tar::Builder::new(Vec::new());
    for (path, data) in &entries {
        let mode = if path == "tmp" { 0o1777 } else { 0o755 };
        append(&mut layer, path, mode, data.as_deref());
    }
    let layer = layer.into_inner().expect("finish the layer");
    let layer_sha = sha256_hex(&layer);
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let config = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": { "Env": ["PATH=/usr/local/bin"] },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{layer_sha}")] },
    })
    .to_string();
    let config_sha = sha256_hex(config.as_bytes());
    let id = format!("sha256:{config_sha}");
    if docker_try(&["image", "inspect", "--format", "{{.Id}}", &id]).is_some_and(|found| found == id) {
        return id;
    }
    let tag = format!("outpost-e2e-runtime:{}", &config_sha[..12]);
    let manifest = serde_json::json!([{
        "Config": format!("{config_sha}.json"),
        "RepoTags": [tag],
        "Layers": [format!("{layer_sha}/layer.tar")],
    }])
    .to_string();
    let mut image = tar::Builder::new(Vec::new());
    append(&mut image, &layer_sha, 0o755, None);
    append(&mut image, &format!("{layer_sha}/layer.tar"), 0o644, Some(&layer));
    append(&mut image, &format!("{config_sha}.json"), 0o644, Some(config.as_bytes()));
    append(&mut image, "manifest.json", 0o644, Some(manifest.as_bytes()));
    let image = image.into_inner().expect("finish the image tarball");

    let mut load = Command::new("docker")
        .args(["load", "-q"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run docker load");
    load.stdin.take().expect("stdin").write_all(&image).expect("send the image to docker load");
    let out = load.wait_with_output().expect("docker load");
    assert!(out.status.success(), "docker load of {tag} failed: {}", String::from_utf8_lossy(&out.stderr));
    let found = docker(&["image", "inspect", "--format", "{{.Id}}", &tag]);
    assert_eq!(found, id, "{tag} after docker load");
    id
}

// ---------------------------------------------------------------------------------------------
// The docker CLI
// ---------------------------------------------------------------------------------------------

/// `docker ARGS`: its stdout, trimmed; panics with its output when it fails.
fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("run docker");
    assert!(
        out.status.success(),
        "docker {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `docker ARGS`: its stdout, trimmed, or `None` when it fails.
fn docker_try(args: &[&str]) -> Option<String> {
    let out = Command::new("docker").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Both streams a container wrote so far.
fn container_logs(name: &str) -> String {
    let out = Command::new("docker").args(["logs", name]).output().expect("docker logs");
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Waits for `needle` in a container's logs; fails at once, with them, if the container exits.
async fn wait_for_log(name: &str, needle: &str) -> String {
    let mut logs = String::new();
    eventually(&format!("{needle:?} from container {name}"), WAIT, async || {
        logs = container_logs(name);
        let running = docker_try(&["inspect", "--format", "{{.State.Running}}", name]);
        assert!(logs.contains(needle) || running.as_deref() == Some("true"), "{name} exited:\n{logs}");
        logs.contains(needle)
    })
    .await;
    logs
}

/// The engine's socket on this host: `DOCKER_HOST` when it names a unix socket, else the default.
fn host_socket() -> String {
    match std::env::var("DOCKER_HOST") {
        Ok(host) if !host.is_empty() => host
            .strip_prefix("unix://")
            .unwrap_or_else(|| panic!("DOCKER_HOST={host}: these tests mount the engine's unix socket"))
            .to_owned(),
        _ => SOCKET_IN_CONTAINER.to_owned(),
    }
}

fn mount(host: &Path, inside: &str, read_only: bool) -> String {
    format!("{}:{inside}{}", host.display(), if read_only { ":ro" } else { "" })
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temp path")
}

// ---------------------------------------------------------------------------------------------
// The fleet
// ---------------------------------------------------------------------------------------------

/// The test's own corner of the engine: a name prefix, an internal network, a temp dir. Dropping
/// it removes every container it started (control plane, agents), then the job and service
/// containers its agents started on the host engine, then the network; a failing test prints
/// the containers' logs first.
struct World {
    prefix: String,
    label: String,
    network: String,
    image: String,
    node_ids: Vec<String>,
    /// Dropped after `drop` ran, so no container still uses it.
    tmp: tempfile::TempDir,
}

impl World {
    fn new() -> World {
        let image = runtime_image();
        // Built now, so no deployment or job waits on it.
        let _ = common::test_image();
        let prefix = common::unique("outpost-e2e");
        let label = format!("{TEST_LABEL}={prefix}");
        let network = format!("{prefix}-net");
        let tmp = tempfile::tempdir().expect("tempdir");
        docker(&["network", "create", "--internal", "--label", &label, &network]);
        World { prefix, label, network, image, node_ids: Vec::new(), tmp }
    }

    /// `docker VERB --label L --user UID:GID OPTIONS IMAGE COMMAND`: every container carries the
    /// test's label, and what it writes in the test's directories is the test's user's.
    fn container(&self, verb: &[&str], options: &[&str], command: &[&str]) -> String {
        let user = format!("{}:{}", nix::unistd::getuid(), nix::unistd::getgid());
        let mut args: Vec<&str> = verb.to_vec();
        args.extend(["--label", &self.label, "--user", &user]);
        args.extend(options);
        args.push(&self.image);
        args.extend(command);
        docker(&args)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let filter = format!("label={}", self.label);
        let names =
            docker_try(&["ps", "-a", "--filter", &filter, "--format", "{{.Names}}"]).unwrap_or_default();
        let names: Vec<&str> = names.split_whitespace().collect();
        if std::thread::panicking() {
            for name in &names {
                eprintln!("----- container {name} -----\n{}", container_logs(name));
            }
        }
        if !names.is_empty() {
            let _ = Command::new("docker").args(["rm", "-f", "-v"]).args(&names).output();
        }
        for node_id in &self.node_ids {
            remove_node_containers(node_id);
        }
        let _ = Command::new("docker").args(["network", "rm", &self.network]).output();
    }
}

struct Agent {
    container: String,
    node_id: String,
}

struct Fleet {
    world: World,
    /// The control plane's container, and its name on the network.
    control: String,
    control_dir: PathBuf,
    op: Operator,
    org_id: String,
    agents: Vec<Agent>,
}

/// Fast heartbeats and short requests, so a 3 s lease notices a silent agent and a reconnected
/// one is back soon.
fn agent_config(dir: &Path, labels: &str) -> String {
    format!(
        "profile = \"on-prem\"\ndata_dir = \"{}\"\n[node]\nlabels = {{ {labels} }}\n\
         [control]\npoll_wait_secs = 5\nrequest_timeout_secs = 5\n\
         [agent]\nheartbeat_secs = 1\nshutdown_grace_secs = 3\n\
         [docker]\nsocket = \"{SOCKET_IN_CONTAINER}\"\n",
        dir.join("data").display()
    )
}

/// Starts `outpost-control serve --lease 3s` in its container on the internal network; returns
/// its name, data dir, CA fingerprint and the operator's client. Its certificate names the
/// container (`--san`), which is how the agents reach it. The operator (this test) reaches it
/// through a loopback port forwarded to its address on the network: the host has a leg on every
/// bridge network, internal ones included, and 127.0.0.1 is a name the certificate always has.
async fn start_control(world: &World) -> (String, PathBuf, String, Operator) {
    let name = format!("{}-control", world.prefix);
    let dir = world.tmp.path().join("control");
    std::fs::create_dir_all(&dir).expect("control dir");
    #[rustfmt::skip]
    let _id = world.container(
        &["run", "--detach"],
        &[
            "--name", &name, "--hostname", &name, "--network", &world.network,
            "--volume", &mount(&dir, path_str(&dir), false),
            "--volume", &mount(&harness::control_bin(), CONTROL_BIN, true),
            "--env", "RUST_LOG=info",
        ],
        &[
            CONTROL_BIN, "serve", "--listen", &format!("0.0.0.0:{CONTROL_PORT}"),
            "--data-dir", path_str(&dir), "--san", &name, "--lease", "3s",
        ],
    );
    let logs = wait_for_log(&name, "listening on https://").await;
    let line = logs.lines().find(|l| l.contains("listening on https://")).expect("listening line");
    let fingerprint = line.rsplit("sha256 ").next().expect("fingerprint").trim_end_matches(')').to_owned();
    let ip =
        docker(&["inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", &name]);
    let address: SocketAddr = format!("{ip}:{CONTROL_PORT}").parse().expect("the control plane's address");
    let port = forward_from_loopback(address).await;
    let op = Operator::for_data_dir(&format!("https://127.0.0.1:{port}"), &dir);
    (name, dir, fingerprint, op)
}

/// Forwards every connection to a fresh port on 127.0.0.1 (returned) to `target`, for as long
/// as the test runs.
async fn forward_from_loopback(target: SocketAddr) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
    let port = listener.local_addr().expect("local address").port();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    port
}

/// Enrolls agent `i` in a one-off container on the network, then runs `outpost run` in its own.
/// Its dir is mounted at the same path inside, since every path the agent hands the engine
/// (through the mounted socket) is read as a host path.
fn start_agent(world: &mut World, i: usize, labels: &str, control: &str, ca: &str, token: &str) -> Agent {
    let name = format!("{}-node{i}", world.prefix);
    let dir = world.tmp.path().join(format!("node{i}"));
    std::fs::create_dir_all(&dir).expect("node dir");
    let config = dir.join("config.toml");
    std::fs::write(&config, agent_config(&dir, labels)).expect("write config");
    let same_dir = mount(&dir, path_str(&dir), false);
    let agent_bin = mount(&harness::node_bin(), AGENT_BIN, true);
    let url = format!("https://{control}:{CONTROL_PORT}");
    #[rustfmt::skip]
    let _enrolled = world.container(
        &["run", "--rm"],
        &["--network", &world.network, "--volume", &same_dir, "--volume", &agent_bin],
        &[
            AGENT_BIN, "--config", path_str(&config), "enroll", "--control", &url, "--token", token,
            "--ca-fingerprint", ca, "--hostname", &name,
        ],
    );
    let identity: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("data/identity/node.json")).expect("node.json"))
            .expect("node.json is JSON");
    let node_id = identity["node_id"].as_str().expect("node_id").to_owned();
    world.node_ids.push(node_id.clone());

    let socket = host_socket();
    let socket_group =
        std::fs::metadata(&socket).unwrap_or_else(|e| panic!("the engine's socket {socket}: {e}")).gid();
    #[rustfmt::skip]
    let _id = world.container(
        &["run", "--detach"],
        &[
            "--name", &name, "--hostname", &name, "--network", &world.network,
            "--volume", &format!("{socket}:{SOCKET_IN_CONTAINER}"), "--group-add", &socket_group.to_string(),
            "--volume", &same_dir, "--volume", &agent_bin, "--env", "RUST_LOG=info,outpost_node=debug",
        ],
        &[AGENT_BIN, "--config", path_str(&config), "run"],
    );
    Agent { container: name, node_id }
}

/// A control plane and one enrolled, running agent per label set, each in its own container.
async fn fleet(label_sets: &[&str]) -> Fleet {
    let mut world = World::new();
    let (control, control_dir, fingerprint, op) = start_control(&world).await;
    let org = op.create_org("fleet").await;
    let mut agents = Vec::new();
    for (i, labels) in label_sets.iter().enumerate() {
        let token = op.create_token(&org.id).await;
        agents.push(start_agent(&mut world, i, labels, &control, &fingerprint, &token.token));
    }
    for agent in &agents {
        wait_for_log(&agent.container, "container runtime ready").await;
    }
    let f = Fleet { world, control, control_dir, op, org_id: org.id, agents };
    let want = f.agents.len();
    eventually("every agent to heartbeat its labels", WAIT, async || {
        let list = f.op.nodes(None).await;
        list.nodes.iter().filter(|n| n.online && !n.labels.is_empty()).count() == want
    })
    .await;
    f
}

impl Fleet {
    fn agent_of(&self, node_id: &str) -> usize {
        self.agents.iter().position(|a| a.node_id == node_id).expect("a node of this fleet")
    }

    fn disconnect(&self, i: usize) {
        docker(&["network", "disconnect", &self.world.network, &self.agents[i].container]);
    }

    fn connect(&self, i: usize) {
        docker(&["network", "connect", &self.world.network, &self.agents[i].container]);
    }

    /// `outpost-control --json deploy status NAME`, run by an operator inside the private
    /// network, read back as the API type.
    fn deploy_status_in_network(&self, name: &str) -> DeploymentInfo {
        let dir = path_str(&self.control_dir);
        let url = format!("https://{}:{CONTROL_PORT}", self.control);
        #[rustfmt::skip]
        let out = self.world.container(
            &["run", "--rm"],
            &[
                "--network", &self.world.network, "--volume", &mount(&self.control_dir, dir, true),
                "--volume", &mount(&harness::control_bin(), CONTROL_BIN, true),
            ],
            &[CONTROL_BIN, "--url", &url, "--data-dir", dir, "--json", "deploy", "status", name, "--org", &self.org_id],
        );
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("deploy status --json: {e}: {out}"))
    }

    /// (agent index, revision, running) of each container of service `web` of this fleet.
    fn web_containers(&self) -> Vec<(usize, u64, bool)> {
        let out = docker(&[
            "ps",
            "-a",
            "--filter",
            "label=outpost.service=web",
            "--format",
            "{{.Label \"outpost.node\"}} {{.Label \"outpost.revision\"}} {{.State}}",
        ]);
        out.lines()
            .filter_map(|l| {
                let mut parts = l.split_whitespace();
                let node = parts.next()?;
                let agent = self.agents.iter().position(|a| a.node_id == node)?;
                Some((agent, parts.next()?.parse().ok()?, parts.next()? == "running"))
            })
            .collect()
    }

    async fn wait_deployment(&self, what: &str, cond: impl Fn(&DeploymentInfo) -> bool) -> DeploymentInfo {
        let mut last = None;
        eventually(what, WAIT, async || {
            let d = self.op.deployment(&self.org_id, "web").await;
            let ok = cond(&d);
            last = Some(d);
            ok
        })
        .await;
        last.expect("status")
    }
}

/// Containers of `job_id` that the engine runs now.
fn running_containers(job_id: &str) -> usize {
    docker(&["ps", "-q", "--filter", &format!("label=outpost.job={job_id}")]).lines().count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_reaches_every_agent_container_and_one_cut_off_from_the_network_catches_up() {
    let f = fleet(&["site = \"icu\""; 3]).await;
    // The agents' only network is the test's, and it has no route out.
    assert_eq!(docker(&["network", "inspect", "--format", "{{.Internal}}", &f.world.network]), "true");
    for agent in &f.agents {
        let networks = docker(&[
            "inspect",
            "--format",
            "{{range $name, $_ := .NetworkSettings.Networks}}{{$name}} {{end}}",
            &agent.container,
        ]);
        assert_eq!(networks, f.world.network, "{}", agent.container);
    }

    let first =
        f.op.deploy(
            &f.org_id,
            &common::web_deployment(&f.org_id, "site=icu", common::ready_service("touch /tmp/ready", 4), 60),
        )
        .await;
    assert_eq!(first.revision, 1);
    let done = f
        .wait_deployment("revision 1 complete", |d| d.revision == 1 && d.status == RolloutStatus::Complete)
        .await;
    assert_eq!(done.nodes.len(), 3, "{:#?}", done.nodes);
    assert!(done.nodes.iter().all(|n| n.phase == NodePhase::Healthy), "{:#?}", done.nodes);
    let running = f.web_containers();
    assert_eq!(running.len(), 3, "one service container per agent: {running:?}");
    assert!(running.iter().all(|(_, rev, up)| *rev == 1 && *up), "{running:?}");

    // The third agent is cut off as revision 2 is created: to the control plane it goes silent
    // mid-rollout (its 3 s lease runs out while the batches move on) and it never receives
    // revision 2. The two others take it, and the rollout completes without the silent one.
    let cut = 2;
    let away = f.agents[cut].node_id.clone();
    f.disconnect(cut);
    let second =
        f.op.deploy(
            &f.org_id,
            &common::web_deployment(
                &f.org_id,
                "site=icu",
                common::ready_service("touch /tmp/ready; echo v2", 4),
                60,
            ),
        )
        .await;
    assert_eq!((second.revision, second.status), (2, RolloutStatus::InProgress));
    let converged = f
        .wait_deployment("the reachable agents healthy on revision 2, the cut-off one offline", |d| {
            d.revision == 2
                && d.status == RolloutStatus::Complete
                && d.nodes.iter().all(|n| {
                    if n.node_id == away {
                        matches!(n.phase, NodePhase::Offline | NodePhase::Pending)
                    } else {
                        n.phase == NodePhase::Healthy && n.desired_revision == Some(2)
                    }
                })
        })
        .await;
    assert_eq!(converged.nodes.len(), 3, "{:#?}", converged.nodes);
    eventually("the reachable agents' revision 1 containers gone", WAIT, async || {
        let c = f.web_containers();
        c.iter().filter(|(a, rev, up)| *a != cut && *rev == 2 && *up).count() == 2
            && !c.iter().any(|(a, rev, _)| *a != cut && *rev == 1)
    })
    .await;
    // Cut off, the agent keeps its service up on the revision it had.
    let c = f.web_containers();
    assert!(c.iter().any(|(a, rev, up)| *a == cut && *rev == 1 && *up), "{c:?}");
    // What an operator inside the private network sees with `deploy status`.
    let seen = f.deploy_status_in_network("web");
    let row = seen.nodes.iter().find(|n| n.node_id == away).expect("the cut-off node in deploy status");
    assert!(matches!(row.phase, NodePhase::Offline | NodePhase::Pending), "{row:#?}");

    // Back on the network, it converges to revision 2 by itself.
    f.connect(cut);
    eventually("the reconnected agent on revision 2", WAIT, async || {
        let c = f.web_containers();
        c.iter().any(|(a, rev, up)| *a == cut && *rev == 2 && *up) && !c.iter().any(|(_, rev, _)| *rev == 1)
    })
    .await;
    let healthy = f
        .wait_deployment("every agent healthy on revision 2", |d| {
            d.nodes.len() == 3
                && d.nodes.iter().all(|n| n.phase == NodePhase::Healthy && n.desired_revision == Some(2))
        })
        .await;
    assert_eq!(healthy.status, RolloutStatus::Complete);
    let c = f.web_containers();
    assert_eq!(c.len(), 3, "one container per agent, none duplicated: {c:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_any_job_finishes_on_another_agent_when_its_agent_container_is_killed_mid_job() {
    let f = fleet(&["rack = \"r1\"", "rack = \"r1\"", "rack = \"r2\""]).await;
    let req = SubmitJobRequest::for_selector(&f.org_id, "rack=r1", Placement::Any, sh("sleep 20; echo done"));
    let job = f.op.submit_request(&req).await;
    let first = f.agent_of(&job.node_id);
    assert_ne!(first, 2, "never on an agent the selector does not match");

    eventually("attempt 1 to run", WAIT, async || running_containers(&job.job_id) == 1).await;
    docker(&["kill", "--signal", "KILL", &f.agents[first].container]);

    let mut moved = None;
    eventually("the job offered to the other r1 agent", WAIT, async || {
        let now = f.op.job(&job.job_id).await;
        let done = now.attempt == 2;
        moved = Some(now);
        done
    })
    .await;
    let moved = moved.expect("moved");
    let second = 1 - first;
    assert_eq!(moved.node_id, f.agents[second].node_id);
    assert_eq!(moved.superseded[0].node_id, f.agents[first].node_id);

    let result = f.op.wait_result(&job.job_id, WAIT).await;
    assert_eq!((result.attempt, result.outcome), (2, Outcome::Succeeded), "{result:?}");
    assert!(result.stdout_tail.contains("done"), "{result:?}");

    // The killed agent's container starts again: it finds its old attempt (stopped by order of
    // the control plane, or finished), and that report is kept as the superseded attempt's.
    docker(&["start", &f.agents[first].container]);
    let mut late = None;
    eventually("the old attempt's late report", WAIT, async || {
        late = f.op.job(&job.job_id).await.superseded[0].late_result.clone();
        late.is_some()
    })
    .await;
    let late = late.expect("late");
    assert_eq!(late.attempt, 1);
    assert!(matches!(late.outcome, Outcome::Cancelled | Outcome::Succeeded), "{late:?}");
    let job_now = f.op.job(&job.job_id).await;
    assert_eq!((job_now.state, job_now.result.map(|r| r.attempt)), (JobState::Finished, Some(2)));
    eventually("no container of the job left running", WAIT, async || running_containers(&job.job_id) == 0)
        .await;
    let audit = f.op.audit().await;
    let counted =
        audit.entries.iter().filter(|e| e.action == "job.result" && e.detail.contains(&job.job_id)).count();
    assert_eq!(counted, 1, "one counted result");
    assert!(audit.entries.iter().any(|e| e.action == "job.replaced" && e.detail.contains(&job.job_id)));
}
