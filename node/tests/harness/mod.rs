//! End-to-end harness: the real `outpost-control` and `outpost` binaries as child processes,
//! talking real TLS on loopback, driving the real Docker engine. Each test gets its own temp
//! directories, node ids and containers, so tests run in parallel.
//!
//! Processes are killed with SIGKILL when their handle drops, so a failing test leaves no
//! agent behind; containers a test made carry its node id and are removed at drop.

#![allow(dead_code, unused_imports, clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use crate::common::{docker_inspect, test_image, workspace_root};
use outpost_node::tls::{CaTrust, enroll_client_config};
use outpost_protocol::{
    AuditList, ContainerSpec, CreateOrgRequest, CreateTokenRequest, EnrollmentToken, JobInfo, Org,
    ResultReport, SubmitJobRequest, paths,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The workspace's target profile directory (`target/debug`), found from this test binary.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/e2e-<hash> → target/debug
    exe.parent().and_then(Path::parent).expect("test binary lives in target/<profile>/deps").to_path_buf()
}

/// Path of the control plane binary, built once per test process so it is never stale.
pub fn control_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let target_dir = profile_dir().parent().expect("target dir").to_path_buf();
            let status = Command::new(cargo)
                .args(["build", "--quiet", "-p", "outpost-control", "--bin", "outpost-control"])
                .env("CARGO_TARGET_DIR", &target_dir)
                .current_dir(workspace_root())
                .status()
                .expect("run cargo build for outpost-control");
            assert!(status.success(), "building outpost-control failed");
            let bin = profile_dir().join("outpost-control");
            assert!(bin.exists(), "{} missing after build", bin.display());
            bin
        })
        .clone()
}

pub fn node_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_outpost"))
}

/// `outpost enroll` (with `extra` arguments) of the agent `bin` configured by `config`, with a
/// new token of `org_id` and the CA `control` presents; panics unless it succeeds.
async fn enroll_online(bin: &Path, config: &Path, control: &Control, org_id: &str, extra: &[&str]) {
    let token = control.create_token(org_id).await;
    let out = Command::new(bin)
        .arg("--config")
        .arg(config)
        .arg("enroll")
        .args(extra)
        .args(["--control", &control.url, "--token", &token.token, "--ca-fingerprint"])
        .arg(&control.fingerprint)
        .args(["--hostname", "e2e-node"])
        .output()
        .expect("run outpost enroll");
    assert!(
        out.status.success(),
        "outpost enroll {extra:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Collects a child's stderr lines so tests can wait for a line and print them on failure.
#[derive(Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn follow(&self, stream: impl std::io::Read + Send + 'static, echo: &'static str) {
        let lines = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if std::env::var_os("OUTPOST_TEST_ECHO").is_some() {
                    eprintln!("[{echo}] {line}");
                }
                lines.0.lock().expect("lines").push(line);
            }
        });
    }

    pub fn snapshot(&self) -> Vec<String> {
        self.0.lock().expect("lines").clone()
    }

    pub fn contains(&self, needle: &str) -> bool {
        self.snapshot().iter().any(|l| l.contains(needle))
    }

    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn dump(&self, who: &str) {
        eprintln!("----- {who} log -----");
        for l in self.snapshot() {
            eprintln!("{l}");
        }
        eprintln!("----- end of {who} log -----");
    }
}

fn sigkill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn sigterm(child: &mut Child) -> std::process::ExitStatus {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        if Instant::now() > deadline {
            sigkill(child);
            panic!("process {} did not exit within 30 s of SIGTERM", child.id());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running `outpost-control serve` with its data dir.
pub struct Control {
    pub dir: PathBuf,
    pub port: u16,
    pub fingerprint: String,
    child: Option<Child>,
    pub log: Lines,
    pub op: Operator,
    /// `serve --lease` (a node silent for longer is offline), when not the default.
    lease: Option<String>,
    /// The control plane binary: this build's, or another one (version-skew tests).
    bin: PathBuf,
}

impl std::ops::Deref for Control {
    type Target = Operator;
    fn deref(&self) -> &Operator {
        &self.op
    }
}

/// The operator's view of a control plane: its API over TLS with the admin token.
pub struct Operator {
    pub url: String,
    pub admin_token: String,
    pub ca_pem: String,
    client: reqwest::Client,
}

impl Control {
    /// Start on a fresh port (`port` = None) or on the port of an earlier run.
    pub fn start(dir: &Path, port: Option<u16>) -> Control {
        Self::start_with_lease(dir, port, None)
    }

    /// Start with `serve --lease LEASE` (e.g. `3s`) when given.
    pub fn start_with_lease(dir: &Path, port: Option<u16>, lease: Option<&str>) -> Control {
        Self::start_bin(&control_bin(), dir, port, lease)
    }

    /// [`Control::start_with_lease`] with the control plane binary `bin`.
    pub fn start_bin(bin: &Path, dir: &Path, port: Option<u16>, lease: Option<&str>) -> Control {
        Self::start_args(bin, dir, port, lease, &[])
    }

    /// [`Control::start_bin`] with more `serve` arguments.
    pub fn start_args(
        bin: &Path,
        dir: &Path,
        port: Option<u16>,
        lease: Option<&str>,
        extra: &[&str],
    ) -> Control {
        let listen = format!("127.0.0.1:{}", port.unwrap_or(0));
        let mut command = Command::new(bin);
        command.args(["serve", "--listen", &listen, "--data-dir"]).arg(dir).args(extra);
        if let Some(lease) = lease {
            command.args(["--lease", lease]);
        }
        let mut child = command
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn outpost-control");
        let log = Lines::default();
        log.follow(child.stderr.take().expect("stderr"), "control");
        let stdout = Lines::default();
        stdout.follow(child.stdout.take().expect("stdout"), "control-out");
        if !stdout.wait_for("listening on https://", Duration::from_secs(30)) {
            log.dump("control");
            sigkill(&mut child);
            panic!("outpost-control did not print its listening line within 30 s");
        }
        let line = stdout.snapshot().into_iter().find(|l| l.contains("listening on https://")).expect("line");
        // `outpost-control listening on https://ADDR (CA sha256 HEX)`
        let addr = line.split("https://").nth(1).and_then(|r| r.split_whitespace().next()).expect("addr");
        let fingerprint =
            line.rsplit("sha256 ").next().map(|s| s.trim_end_matches(')').to_string()).expect("fp");
        let port: u16 = addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
        let op = Operator::for_data_dir(&format!("https://localhost:{port}"), dir);
        Control {
            dir: dir.to_path_buf(),
            port,
            fingerprint,
            child: Some(child),
            log,
            op,
            lease: lease.map(str::to_owned),
            bin: bin.to_path_buf(),
        }
    }

    /// Run an `outpost-control` operator subcommand against this control plane (its admin
    /// token and CA from the data dir).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_command().args(args).output().expect("run outpost-control")
    }

    /// `outpost-control` with this control plane's URL and data dir, to add a subcommand to.
    pub fn cli_command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(["--url", &self.url, "--data-dir"]).arg(&self.dir);
        c
    }

    /// SIGKILL: no chance to flush anything the store had not made durable.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            sigkill(&mut c);
        }
    }

    /// Start again on the same port and data dir.
    pub fn restart(&mut self) {
        self.kill();
        let again = Control::start_bin(&self.bin, &self.dir, Some(self.port), self.lease.as_deref());
        *self = again;
    }

    /// Stop this control plane (SIGTERM) and start `bin` on the same port and data dir: an
    /// upgrade in place.
    pub fn replace_with(&mut self, bin: &Path) {
        if let Some(mut c) = self.child.take() {
            sigterm(&mut c);
        }
        let again = Control::start_bin(bin, &self.dir, Some(self.port), self.lease.as_deref());
        *self = again;
    }
}

impl Operator {
    /// An operator client for the control plane at `url` whose data dir is `dir`.
    pub fn for_data_dir(url: &str, dir: &Path) -> Operator {
        let admin_token =
            std::fs::read_to_string(dir.join("admin.token")).expect("admin.token").trim().to_string();
        let mut ca_pem = std::fs::read_to_string(dir.join("ca.crt")).expect("ca.crt");
        // During a CA rotation: the new CA too (presented from the switch).
        if let Ok(next) = std::fs::read_to_string(dir.join("ca.next.crt")) {
            ca_pem.push_str(&next);
        }
        let tls = enroll_client_config(&CaTrust::Pem(ca_pem.clone())).expect("operator TLS config");
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(Duration::from_secs(30))
            .build()
            .expect("operator client");
        Operator { url: url.to_string(), admin_token, ca_pem, client }
    }

    async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> R {
        let mut req =
            self.client.request(method, format!("{}{path}", self.url)).bearer_auth(&self.admin_token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = resp.status();
        let text = resp.text().await.expect("body");
        assert!(status.is_success(), "{path}: HTTP {status}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"))
    }

    pub async fn create_org(&self, name: &str) -> Org {
        self.call(reqwest::Method::POST, paths::ORGS, Some(&CreateOrgRequest { name: name.into() })).await
    }

    pub async fn create_token(&self, org_id: &str) -> EnrollmentToken {
        let path = paths::fill(paths::ORG_TOKENS, "org_id", org_id);
        self.call(reqwest::Method::POST, &path, Some(&CreateTokenRequest { ttl_secs: Some(600) })).await
    }

    pub async fn submit(&self, node_id: &str, spec: ContainerSpec) -> JobInfo {
        self.submit_request(&SubmitJobRequest::for_node(node_id, spec)).await
    }

    pub async fn submit_request(&self, req: &SubmitJobRequest) -> JobInfo {
        self.call(reqwest::Method::POST, paths::JOBS, Some(req)).await
    }

    /// One job on each node of `org_id` that `selector` matches.
    pub async fn submit_group(&self, req: &SubmitJobRequest) -> outpost_protocol::JobGroup {
        self.call(reqwest::Method::POST, paths::JOB_GROUPS, Some(req)).await
    }

    pub async fn group(&self, group_id: &str) -> outpost_protocol::JobGroup {
        let path = paths::fill(paths::JOB_GROUP, "group_id", group_id);
        self.call::<(), _>(reqwest::Method::GET, &path, None).await
    }

    pub async fn cancel(&self, job_id: &str) -> JobInfo {
        let path = paths::fill(paths::JOB_CANCEL, "job_id", job_id);
        self.call::<(), _>(reqwest::Method::POST, &path, None).await
    }

    /// Nodes whose labels `selector` matches (all with `None`).
    pub async fn nodes(&self, selector: Option<&str>) -> outpost_protocol::NodeList {
        let query = selector
            .map(|s| {
                format!(
                    "?selector={}",
                    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC)
                )
            })
            .unwrap_or_default();
        self.call::<(), _>(reqwest::Method::GET, &format!("{}{query}", paths::NODES), None).await
    }

    pub async fn label(
        &self,
        node_id: &str,
        set: &[(&str, &str)],
        remove: &[&str],
    ) -> outpost_protocol::NodeInfo {
        let req = outpost_protocol::LabelNodeRequest {
            set: set.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            remove: remove.iter().map(|k| (*k).to_owned()).collect(),
        };
        let path = paths::fill(paths::NODE_LABELS, "node_id", node_id);
        self.call(reqwest::Method::POST, &path, Some(&req)).await
    }

    pub async fn deploy(
        &self,
        org_id: &str,
        req: &outpost_protocol::DeployRequest,
    ) -> outpost_protocol::DeploymentInfo {
        let path = paths::fill(paths::DEPLOYMENTS, "org_id", org_id);
        self.call(reqwest::Method::POST, &path, Some(req)).await
    }

    pub async fn deployment(&self, org_id: &str, name: &str) -> outpost_protocol::DeploymentInfo {
        let path = paths::fill(&paths::fill(paths::DEPLOYMENT, "org_id", org_id), "name", name);
        self.call::<(), _>(reqwest::Method::GET, &path, None).await
    }

    pub async fn job(&self, job_id: &str) -> JobInfo {
        self.call::<(), _>(reqwest::Method::GET, &paths::fill(paths::JOB, "job_id", job_id), None).await
    }

    pub async fn audit(&self) -> AuditList {
        self.call::<(), _>(reqwest::Method::GET, paths::AUDIT, None).await
    }

    /// Poll the job until a result is stored.
    pub async fn wait_result(&self, job_id: &str, timeout: Duration) -> ResultReport {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.job(job_id).await.result {
                return r;
            }
            assert!(Instant::now() < deadline, "no result for job {job_id} within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How many audit entries record a stored result for `job_id`. The control plane appends
    /// the entry just after it stores the result, so a result already visible may not be in the
    /// trail yet: this waits (up to 20 s) for the first entry before counting.
    pub async fn results_recorded(&self, job_id: &str) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let n = self
                .audit()
                .await
                .entries
                .iter()
                .filter(|e| {
                    e.action.contains("result")
                        && e.detail.contains(job_id)
                        && !e.action.contains("duplicate")
                })
                .count();
            if n > 0 || Instant::now() >= deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.log.dump("control");
        }
        self.kill();
    }
}

/// A node config under `dir` (data in `dir/data`) with `extra_config` appended; its path.
/// `current`: the config is for this build's agent, which gets its metrics on a free port
/// (several agents share the machine's loopback); an older agent would refuse the key.
fn write_config(dir: &Path, extra_config: &str, current: bool) -> PathBuf {
    std::fs::create_dir_all(dir).expect("node dir");
    let config = dir.join("config.toml");
    let metrics = if current && !extra_config.contains("[metrics]") { "[metrics]\nport = 0\n" } else { "" };
    std::fs::write(
        &config,
        format!(
            "profile = \"on-prem\"\ndata_dir = \"{}\"\n{extra_config}\n{metrics}",
            dir.join("data").display()
        ),
    )
    .expect("write config");
    config
}

/// `GET /metrics` from a Prometheus endpoint at `addr` (plain HTTP/1.0): the answer's head and body.
pub fn scrape_metrics(addr: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("request");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).expect("answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    (head.to_owned(), body.to_owned())
}

/// An enrolled node agent with its own data dir and config.
pub struct Node {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub node_id: String,
    child: Option<Child>,
    pub log: Lines,
    /// The agent binary: this build's, or another one (version-skew tests).
    bin: PathBuf,
}

impl Node {
    /// Write a config under `dir` and enroll against `control`.
    pub async fn enroll(dir: &Path, control: &Control, org_id: &str, extra_config: &str) -> Node {
        Self::enroll_with(&node_bin(), dir, control, org_id, extra_config).await
    }

    /// [`Node::enroll`] with the agent binary `bin`.
    pub async fn enroll_with(
        bin: &Path,
        dir: &Path,
        control: &Control,
        org_id: &str,
        extra_config: &str,
    ) -> Node {
        let config = write_config(dir, extra_config, bin == node_bin());
        enroll_online(bin, &config, control, org_id, &[]).await;
        Node::enrolled(dir, config, bin.to_path_buf())
    }

    /// A node enrolled without a link: `outpost enroll --offline`, the operator's
    /// `node enroll-offline`, then `outpost enroll --from` with the CA pinned.
    pub async fn enroll_offline(dir: &Path, control: &Control, org_id: &str, extra_config: &str) -> Node {
        let config = write_config(dir, extra_config, true);
        let bin = node_bin();
        let run = |args: &[&str]| {
            let out =
                Command::new(&bin).arg("--config").arg(&config).args(args).output().expect("run outpost");
            assert!(
                out.status.success(),
                "outpost {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let request = dir.join("request.json");
        let enrollment = dir.join("enrollment.json");
        run(&["enroll", "--offline", "--out", request.to_str().expect("utf8"), "--hostname", "air-node"]);
        let out = Command::new(control_bin())
            .args(["--url", &control.url, "--data-dir"])
            .arg(&control.dir)
            .args(["node", "enroll-offline", "--org", org_id, "--request"])
            .arg(&request)
            .arg("--out")
            .arg(&enrollment)
            .output()
            .expect("run outpost-control");
        assert!(out.status.success(), "node enroll-offline: {}", String::from_utf8_lossy(&out.stderr));
        run(&[
            "enroll",
            "--from",
            enrollment.to_str().expect("utf8"),
            "--ca-fingerprint",
            &control.fingerprint,
        ]);
        Node::enrolled(dir, config, bin)
    }

    /// `outpost enroll --force` with a new token of `org_id` and the CA `control` presents now
    /// (`control.fingerprint`): a new identity in place of the old one.
    pub async fn enroll_again(&mut self, control: &Control, org_id: &str) {
        enroll_online(&self.bin, &self.config, control, org_id, &["--force"]).await;
        *self = Node::enrolled(&self.dir, self.config.clone(), self.bin.clone());
    }

    /// The node whose identity enrollment wrote under `dir`.
    fn enrolled(dir: &Path, config: PathBuf, bin: PathBuf) -> Node {
        let node_json = dir.join("data/identity/node.json");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&node_json).expect("node.json"))
            .expect("node.json is JSON");
        let node_id = v["node_id"].as_str().expect("node_id").to_string();
        Node { dir: dir.to_path_buf(), config, node_id, child: None, log: Lines::default(), bin }
    }

    /// Start `outpost run`; returns once it is ready and its container runtime answered (jobs
    /// are fetched from then on).
    pub fn start(&mut self) {
        self.start_agent();
        if !self.log.wait_for("container runtime ready", Duration::from_secs(60)) {
            self.log.dump("node");
            panic!("the agent did not reach the Docker engine within 60 s");
        }
    }

    /// Start `outpost run`; returns once it logged that it is ready, which it is without Docker.
    pub fn start_agent(&mut self) {
        assert!(self.child.is_none(), "node already running");
        self.log = Lines::default();
        let mut child = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            .env("RUST_LOG", "info,outpost_node=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn outpost run");
        self.log.follow(child.stderr.take().expect("stderr"), "node");
        self.child = Some(child);
        if !self.log.wait_for("outpost agent ready", Duration::from_secs(60)) {
            self.log.dump("node");
            panic!("the agent did not become ready within 60 s");
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            sigkill(&mut c);
        }
    }

    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("node is running");
        sigterm(&mut c)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// `outpost status --json` of this node.
    /// SIGHUP to the running agent: it reloads its site policy.
    pub fn sighup(&self) {
        let child = self.child.as_ref().expect("the agent runs");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    }

    pub fn status_json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.cli(&["status", "--json"]).stdout)
            .expect("outpost status --json prints JSON")
    }

    /// The agent's Prometheus exposition (`GET /metrics` on the loopback address it reports).
    pub fn metrics(&self) -> String {
        let addr =
            self.status_json()["agent"]["metrics"].as_str().expect("the agent serves metrics").to_owned();
        scrape_metrics(&addr).1
    }

    /// Run another `outpost` subcommand with this node's config.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.bin).arg("--config").arg(&self.config).args(args).output().expect("run outpost")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.log.dump("node");
        }
        self.kill9();
        remove_node_containers(&self.node_id);
    }
}

/// `docker rm -f` every container labelled with `node_id`.
pub fn remove_node_containers(node_id: &str) {
    drop(crate::common::RemoveNodeContainers(node_id.to_owned()));
}

/// How many times the engine started a container of `job_id` since `since_unix_s`.
pub fn container_starts(job_id: &str, since_unix_s: u64) -> usize {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() + 1;
    let out = Command::new("docker")
        .args([
            "events",
            "--since",
            &since_unix_s.to_string(),
            "--until",
            &now.to_string(),
            "--filter",
            "type=container",
            "--filter",
            "event=start",
            "--filter",
            &format!("label=outpost.job={job_id}"),
            "--format",
            "{{.ID}}",
        ])
        .output()
        .expect("docker events");
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.trim().is_empty()).count()
}

pub fn unix_now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs()
}

/// A container spec running busybox `sh -c SCRIPT` in the test image.
pub fn sh(script: &str) -> ContainerSpec {
    let mut spec: ContainerSpec =
        serde_json::from_value(serde_json::json!({ "image": test_image(), "command": ["sh", "-c", script] }))
            .expect("spec");
    spec.timeout_secs = 120;
    spec
}

/// Wait until `cond` holds, checking every 100 ms.
pub async fn eventually(what: &str, timeout: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Relay events and triggers, through the operator API.
impl Operator {
    /// GET an operator route and return the body (panics unless 2xx).
    pub async fn try_get(&self, path: &str) -> String {
        let resp = self
            .client
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.admin_token)
            .send()
            .await
            .expect("get");
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        resp.text().await.expect("body")
    }

    /// POST an operator route with no body; the HTTP status and body, refused or not.
    pub async fn try_post(&self, path: &str) -> (u16, String) {
        let resp = self
            .client
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.admin_token)
            .send()
            .await
            .expect("post");
        let status = resp.status().as_u16();
        (status, resp.text().await.expect("body"))
    }

    /// Submit a job and return the HTTP status and body, refused or not.
    pub async fn try_submit(&self, node_id: &str, spec: ContainerSpec) -> (u16, String) {
        let req = SubmitJobRequest::for_node(node_id, spec);
        let resp = self
            .client
            .post(format!("{}{}", self.url, paths::JOBS))
            .bearer_auth(&self.admin_token)
            .json(&req)
            .send()
            .await
            .expect("submit");
        let status = resp.status().as_u16();
        (status, resp.text().await.expect("body"))
    }

    /// One page of a node's stored events after `after_seq`, oldest first.
    pub async fn events_page(
        &self,
        node_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> outpost_protocol::EventList {
        let path = format!("{}?node_id={node_id}&after_seq={after_seq}&limit={limit}", paths::EVENTS);
        self.call::<(), _>(reqwest::Method::GET, &path, None).await
    }

    /// Every stored event of a node, in seq order.
    pub async fn all_events(&self, node_id: &str) -> Vec<outpost_protocol::StoredEvent> {
        let mut all: Vec<outpost_protocol::StoredEvent> = Vec::new();
        loop {
            let after = all.last().map_or(0, |e| e.event.seq);
            let page = self.events_page(node_id, after, 1000).await.events;
            if page.is_empty() {
                return all;
            }
            all.extend(page);
        }
    }

    pub async fn create_trigger(
        &self,
        req: &outpost_protocol::CreateTriggerRequest,
    ) -> outpost_protocol::Trigger {
        self.call(reqwest::Method::POST, paths::TRIGGERS, Some(req)).await
    }
}
