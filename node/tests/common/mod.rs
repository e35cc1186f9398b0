//! Helpers any integration test of this crate may share: the busybox test image built by
//! `scripts/build-test-image`, and the `docker` CLI as an independent witness of what the engine
//! holds. Nothing here knows about a particular test; include it with `mod common;`.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The repository root (the workspace, one level above `node/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("node/ has a parent").to_path_buf()
}

/// Runs `scripts/build-test-image` (with `--save FILE` when `save_to` is given) and returns the
/// image id it prints. The script is safe to run from several test processes at once.
pub fn build_test_image(save_to: Option<&Path>) -> String {
    let script = workspace_root().join("scripts/build-test-image");
    let mut command = Command::new(&script);
    if let Some(path) = save_to {
        command.arg("--save").arg(path);
    }
    let out = command
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed ({}); its stderr is above. Is the Docker engine running?",
        script.display(),
        out.status
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        id.strip_prefix("sha256:").is_some_and(|hex| hex.len() == 64),
        "{} printed {id:?}, not an image id",
        script.display()
    );
    id
}

/// The busybox test image's id, built at most once per test process.
pub fn test_image() -> String {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| build_test_image(None)).clone()
}

/// A name unique to this call, for job and node ids of tests that run in parallel (nextest runs
/// each test in its own process; several test binaries may share one engine).
pub fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &id[..12])
}

/// `docker inspect` of one object as JSON, or `None` when the engine has no such object.
pub fn docker_inspect(name: &str) -> Option<serde_json::Value> {
    let out = Command::new("docker").args(["inspect", "--type", "container", name]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    all.get(0).cloned()
}

/// Ids of every container, running or not, carrying the label `key=value`.
pub fn containers_labelled(key: &str, value: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--no-trunc", "--filter", &format!("label={key}={value}")])
        .output()
        .expect("run docker ps");
    assert!(out.status.success(), "docker ps failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_owned).collect()
}

/// Removes, when dropped, every container labelled `outpost.node=<node id>`: a failing test
/// leaves nothing behind.
#[derive(Debug)]
pub struct RemoveNodeContainers(pub String);

impl Drop for RemoveNodeContainers {
    fn drop(&mut self) {
        let Ok(out) = Command::new("docker")
            .args(["ps", "-aq", "--filter", &format!("label=outpost.node={}", self.0)])
            .output()
        else {
            return;
        };
        let ids: Vec<String> =
            String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_owned).collect();
        if !ids.is_empty() {
            let _ = Command::new("docker").args(["rm", "-f", "-v"]).args(&ids).output();
        }
    }
}

/// A service that is healthy once `/tmp/ready` exists: its command runs `ready`, then sleeps;
/// an exec health check (the image is busybox only) looks for the file every 200 ms. A revision
/// not healthy within `health_timeout_secs` is rolled back on the node.
pub fn ready_service(ready: &str, health_timeout_secs: u64) -> outpost_protocol::ServiceSpec {
    serde_json::from_value(serde_json::json!({
        "image": test_image(),
        "command": ["sh", "-c", format!("{ready}; exec sleep 3600")],
        "health": { "exec": ["/bin/busybox", "test", "-f", "/tmp/ready"], "interval_ms": 200, "timeout_ms": 2000, "retries": 2 },
        "restart": { "mode": "always", "backoff_initial_ms": 100 },
        "health_timeout_secs": health_timeout_secs,
    }))
    .expect("service spec")
}

/// Deployment `web` of `spec` to the nodes of `org_id` that `selector` matches: one node per
/// batch, each given `health_timeout_secs`, stopped at the first failure.
pub fn web_deployment(
    org_id: &str,
    selector: &str,
    spec: outpost_protocol::ServiceSpec,
    health_timeout_secs: u64,
) -> outpost_protocol::DeployRequest {
    outpost_protocol::DeployRequest {
        name: "web".into(),
        org_id: org_id.into(),
        selector: selector.into(),
        service: None,
        spec,
        priority: 0,
        rollout: outpost_protocol::RolloutPolicy {
            batch: outpost_protocol::BatchSize::Nodes(1),
            health_timeout_secs,
            abort_on_failures: 1,
            max_unavailable: None,
        },
    }
}

/// A key pair made by Debian's `age-keygen` as `dir/NAME.key`: (public key, identity file).
pub fn age_keygen(dir: &Path, name: &str) -> (String, PathBuf) {
    let file = dir.join(format!("{name}.key"));
    let made = Command::new("age-keygen").arg("-o").arg(&file).output().unwrap_or_else(|e| {
        panic!("Debian's age-keygen is needed (apt-get install age; scripts/test installs it): {e}")
    });
    assert!(made.status.success(), "age-keygen: {}", String::from_utf8_lossy(&made.stderr));
    let public = Command::new("age-keygen").arg("-y").arg(&file).output().expect("age-keygen -y");
    (String::from_utf8_lossy(&public.stdout).trim().to_owned(), file)
}
