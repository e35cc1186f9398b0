//! The Docker adapter of the Runtime port against the real engine: hardened containers, exit
//! codes and bounded output tails, idempotent create, kill, image loading. Every test works
//! under its own node id and job ids and removes its containers, so tests run in parallel; an
//! unreachable engine fails the tests, it never skips them.

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use common::{
    RemoveNodeContainers, build_test_image, containers_labelled, docker_inspect, test_image, unique,
};
use futures_util::future::join_all;
use outpost_node::runtime::docker::DockerRuntime;
use outpost_node::runtime::{
    ContainerState, JobRef, LABEL_ATTEMPT, LABEL_JOB, LABEL_NODE, Mounts, Runtime, RuntimeError,
};
use outpost_protocol::{ContainerSpec, Resources, SecurityOverrides};
use serde_json::json;

/// How long one engine call may take before the test fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(60);
const MIB: i64 = 1024 * 1024;

/// A runtime labelling its containers with a node id of its own; they are removed on drop.
struct Node {
    rt: DockerRuntime,
    id: String,
    _cleanup: RemoveNodeContainers,
}

async fn node(tag: &str) -> Node {
    let id = unique(&format!("rt-{tag}"));
    let cleanup = RemoveNodeContainers(id.clone());
    match DockerRuntime::connect(&id, None).await {
        Ok(rt) => Node { rt, id, _cleanup: cleanup },
        Err(e) => panic!(
            "the Docker engine is not reachable: {e}\nthese tests drive a real engine and never skip: \
             start dockerd (or point DOCKER_HOST at one) and run them again"
        ),
    }
}

fn job(tag: &str) -> JobRef {
    JobRef { job_id: unique(tag), attempt: 1 }
}

/// busybox `sh -c SCRIPT` in the test image, with small limits and no relaxation.
fn sh(script: &str) -> ContainerSpec {
    ContainerSpec {
        image: test_image(),
        command: vec!["sh".into(), "-c".into(), script.into()],
        env: BTreeMap::new(),
        resources: Resources { cpu_millis: 500, memory_mb: 64, pids: 32 },
        network: false,
        timeout_secs: 60,
        labels: BTreeMap::from([("purpose".to_owned(), "runtime-test".to_owned())]),
        security: SecurityOverrides::default(),
        inputs: Vec::new(),
        output_prefix: None,
        egress_bodies: Vec::new(),
    }
}

async fn within<T>(what: &str, call: impl Future<Output = T>) -> T {
    match tokio::time::timeout(PATIENCE, call).await {
        Ok(answer) => answer,
        Err(_) => panic!("{what} took longer than {PATIENCE:?}"),
    }
}

/// Creates, starts and waits for `job`; returns its exit code.
async fn run(rt: &DockerRuntime, job: &JobRef, spec: &ContainerSpec) -> anyhow::Result<i64> {
    rt.create(job, spec, &Mounts::default()).await?;
    rt.start(job).await?;
    Ok(within("waiting for the job", rt.wait(job)).await?)
}

/// Waits until the engine reports the job's container running.
async fn until_running(rt: &DockerRuntime, job: &JobRef) -> anyhow::Result<()> {
    for _ in 0..200 {
        if let Some(ContainerState::Running { .. }) = rt.inspect(job).await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("{} never ran", job.container_name())
}

fn random_image_id() -> String {
    let hex = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    format!("sha256:{hex}")
}

#[tokio::test]
async fn a_job_reports_its_exit_code_and_separate_stdout_and_stderr_tails() -> anyhow::Result<()> {
    let node = node("exit").await;
    let job = job("exit");
    let mut spec = sh(r#"echo "out $GREETING"; echo err-1 >&2; echo out-2; echo err-2 >&2; exit 3"#);
    spec.env.insert("GREETING".into(), "hello world".into());

    assert_eq!(run(&node.rt, &job, &spec).await?, 3);

    let state = node.rt.inspect(&job).await?;
    let Some(ContainerState::Exited {
        exit_code: 3,
        started_unix_ms: Some(started),
        finished_unix_ms: Some(finished),
        oom_killed: false,
    }) = state
    else {
        panic!("expected an exit with code 3 and both times, got {state:?}");
    };
    assert!(started <= finished, "started {started} after finished {finished}");

    let output = node.rt.output(&job, 4096).await?;
    assert_eq!(output.stdout_tail, "out hello world\nout-2\n");
    assert_eq!(output.stderr_tail, "err-1\nerr-2\n");
    assert!(!output.truncated);

    // Waiting again answers at once with the same code: a restarted agent collects it so.
    assert_eq!(within("a second wait", node.rt.wait(&job)).await?, 3);
    Ok(())
}

#[tokio::test]
async fn every_container_gets_the_hardened_defaults() -> anyhow::Result<()> {
    let node = node("hardened").await;
    let job = job("hardened");
    let id = node.rt.create(&job, &sh("true"), &Mounts::default()).await?;

    let name = job.container_name();
    let c = docker_inspect(&name).unwrap_or_else(|| panic!("docker inspect finds no {name}"));
    assert_eq!(c["Id"], id);
    assert_eq!(c["Name"], format!("/outpost-{}-1", job.job_id));
    assert_eq!(c["Image"], test_image(), "the image is referenced by id");

    let host = &c["HostConfig"];
    assert_eq!(host["ReadonlyRootfs"], true);
    assert_eq!(host["CapDrop"], json!(["ALL"]));
    assert!(host["CapAdd"].is_null(), "CapAdd: {}", host["CapAdd"]);
    assert_eq!(host["SecurityOpt"], json!(["no-new-privileges"]));
    assert_eq!(host["NetworkMode"], "none");
    assert_eq!(host["Privileged"], false);
    assert_eq!(host["Memory"], 64 * MIB);
    assert_eq!(host["MemorySwap"], 64 * MIB, "no swap beyond the memory limit");
    assert_eq!(host["NanoCpus"], 500_000_000);
    assert_eq!(host["PidsLimit"], 32);
    assert!(host["Tmpfs"]["/tmp"].as_str().is_some_and(|o| o.contains("size=")), "Tmpfs: {}", host["Tmpfs"]);
    assert_eq!(host["RestartPolicy"]["Name"], "no");
    assert_eq!(host["AutoRemove"], false);
    assert_eq!(host["LogConfig"]["Type"], "json-file");
    assert!(host["LogConfig"]["Config"]["max-size"].is_string(), "LogConfig: {}", host["LogConfig"]);

    let config = &c["Config"];
    assert_eq!(config["User"], "65534:65534");
    assert_eq!(config["Image"], test_image());
    let labels = &config["Labels"];
    assert_eq!(labels[LABEL_JOB], job.job_id.as_str());
    assert_eq!(labels[LABEL_ATTEMPT], "1");
    assert_eq!(labels[LABEL_NODE], node.id.as_str());
    assert_eq!(labels["purpose"], "runtime-test");
    Ok(())
}

#[tokio::test]
async fn the_job_runs_unprivileged_without_capabilities_or_network() -> anyhow::Result<()> {
    let node = node("inside").await;
    let job = job("inside");
    let spec = sh("id -u; id -g; grep -E '^(CapEff|NoNewPrivs):' /proc/self/status; ls /sys/class/net");

    assert_eq!(run(&node.rt, &job, &spec).await?, 0);
    let output = node.rt.output(&job, 4096).await?;
    assert_eq!(output.stdout_tail, "65534\n65534\nCapEff:\t0000000000000000\nNoNewPrivs:\t1\nlo\n");
    assert_eq!(output.stderr_tail, "");
    Ok(())
}

/// Docker's default seccomp profile filters every job's system calls: the agent never asks for
/// `seccomp=unconfined` (no spec field can), so the kernel reports filter mode (2) inside.
#[tokio::test]
async fn the_job_runs_under_the_engines_seccomp_profile() -> anyhow::Result<()> {
    let node = node("seccomp").await;
    let facts = node.rt.engine_facts().await?;
    let plain = job("seccomp");
    assert_eq!(run(&node.rt, &plain, &sh("grep -E '^Seccomp:' /proc/self/status")).await?, 0);
    let output = node.rt.output(&plain, 4096).await?;
    if facts.seccomp() {
        assert_eq!(output.stdout_tail, "Seccomp:\t2\n", "engine options {:?}", facts.security_options);
    } else {
        // An engine built without seccomp cannot filter; `outpost doctor` warns of it.
        eprintln!(
            "the engine reports no seccomp ({:?}): only checked that the job ran",
            facts.security_options
        );
        assert!(output.stdout_tail.starts_with("Seccomp:"), "{:?}", output.stdout_tail);
    }
    // A signed spec that relaxes what it may (capabilities, user, root filesystem) keeps the filter.
    let relaxed = job("seccomp-relaxed");
    let mut spec = sh("grep -E '^Seccomp:' /proc/self/status");
    spec.security =
        SecurityOverrides { writable_rootfs: true, user: Some("0:0".into()), cap_add: vec!["CHOWN".into()] };
    assert_eq!(run(&node.rt, &relaxed, &spec).await?, 0);
    let relaxed_out = node.rt.output(&relaxed, 4096).await?;
    assert_eq!(relaxed_out.stdout_tail, output.stdout_tail, "relaxing a spec never lifts the filter");
    Ok(())
}

/// The AppArmor profile the packages and the appliance install (`outpost-container`) compiles
/// with Debian's parser (no kernel needed: this machine's has no AppArmor), and the check bites:
/// the same profile with one rule broken is refused.
#[test]
fn the_outpost_container_apparmor_profile_compiles() {
    let profile = common::workspace_root().join("images/packages/outpost/apparmor-outpost-container");
    let text = std::fs::read_to_string(&profile).expect("read the profile");
    assert!(text.contains("profile outpost-container "), "the name the docs and configs use");
    let parse = |path: &std::path::Path| {
        let parser = ["/usr/sbin/apparmor_parser", "/sbin/apparmor_parser"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("apparmor_parser");
        std::process::Command::new(parser)
            .args(["--skip-kernel-load", "--skip-cache", "--quiet"])
            .arg(path)
            .output()
            .expect("run apparmor_parser (Debian's apparmor package; scripts/test installs it)")
    };
    let out = parse(&profile);
    assert!(out.status.success(), "the profile does not compile: {}", String::from_utf8_lossy(&out.stderr));
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = dir.path().join("broken");
    std::fs::write(&broken, text.replace("deny mount,", "deny mount")).expect("write");
    assert!(!parse(&broken).status.success(), "a broken rule is refused");
}

/// A service container is confined as a job's is: the engine's seccomp filter on its process,
/// no capabilities, no new privileges, the unprivileged user, also when its signed spec relaxes
/// what it may (a user, capabilities, a writable root) and asks for a network.
#[tokio::test]
async fn every_service_container_runs_under_the_engines_seccomp_profile() -> anyhow::Result<()> {
    use outpost_node::runtime::ServiceRef;
    let node = node("svc-seccomp").await;
    let facts = node.rt.engine_facts().await?;
    let status = |svc: ServiceRef| {
        let rt = &node.rt;
        async move {
            let cmd: Vec<String> =
                ["/bin/busybox", "grep", "-E", "^(Seccomp|CapEff|NoNewPrivs|Uid):", "/proc/1/status"]
                    .map(String::from)
                    .to_vec();
            let mut last = None;
            // The exec needs the container running; give the engine a moment.
            for _ in 0..50 {
                match rt.service_exec(&svc, &cmd, PATIENCE, 4096).await {
                    Ok(out) if out.exit_code == 0 => return Ok::<_, anyhow::Error>(out.output),
                    other => last = Some(format!("{other:?}")),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::bail!("the service's status could not be read: {last:?}")
        }
    };
    let plain_spec = common::ready_service("true", 30);
    let plain = ServiceRef { name: unique("plain"), deployment: "d".into(), revision: 1 };
    within("create", node.rt.service_create(&plain, &plain_spec, None)).await?;
    within("start", node.rt.service_start(&plain)).await?;
    let out = status(plain.clone()).await?;
    let seccomp = if facts.seccomp() { "Seccomp:\t2" } else { "Seccomp:" };
    assert!(out.contains(seccomp), "engine options {:?}: {out}", facts.security_options);
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.contains("Uid:\t65534"), "{out}");

    let mut relaxed_spec = common::ready_service("true", 30);
    relaxed_spec.security =
        SecurityOverrides { writable_rootfs: true, user: Some("0:0".into()), cap_add: vec!["CHOWN".into()] };
    relaxed_spec.network = outpost_protocol::ServiceNetwork::Internal;
    let relaxed = ServiceRef { name: unique("relaxed"), deployment: "d".into(), revision: 1 };
    within("create", node.rt.service_create(&relaxed, &relaxed_spec, None)).await?;
    within("start", node.rt.service_start(&relaxed)).await?;
    let out = status(relaxed.clone()).await?;
    assert!(out.contains(seccomp), "relaxing a service's spec never lifts the filter: {out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    for svc in [&plain, &relaxed] {
        node.rt.service_remove(svc).await?;
        node.rt.service_forget(&svc.name, true).await?;
    }
    Ok(())
}

#[tokio::test]
async fn the_root_filesystem_is_read_only_and_tmp_is_writable() -> anyhow::Result<()> {
    let node = node("rootfs").await;

    let root = job("rootfs-root");
    assert_ne!(run(&node.rt, &root, &sh("touch /x")).await?, 0, "writing / must fail");
    let output = node.rt.output(&root, 4096).await?;
    assert!(output.stderr_tail.contains("Read-only file system"), "stderr: {:?}", output.stderr_tail);

    let tmp = job("rootfs-tmp");
    let spec = sh("touch /tmp/x && echo written > /tmp/x && cat /tmp/x");
    assert_eq!(run(&node.rt, &tmp, &spec).await?, 0);
    assert_eq!(node.rt.output(&tmp, 4096).await?.stdout_tail, "written\n");
    Ok(())
}

#[tokio::test]
async fn job_data_is_mounted_input_read_only_and_output_writable() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let node = node("mounts").await;
    let job = job("mounts");
    let dir = tempfile::tempdir()?;
    let (input, output) = (dir.path().join("in"), dir.path().join("out"));
    std::fs::create_dir_all(input.join("data"))?;
    std::fs::write(input.join("data/a.txt"), "input bytes\n")?;
    std::fs::create_dir(&output)?;
    std::fs::set_permissions(&input, std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(&output, std::fs::Permissions::from_mode(0o777))?;
    let spec = sh("cat /in/data/a.txt; touch /in/x 2>/dev/null && echo in-writable; \
                   echo made > /out/o.txt && echo out-written; touch /x 2>/dev/null || echo rootfs-read-only");
    let mounts = Mounts { input: Some(input.clone()), output: Some(output.clone()) };
    node.rt.create(&job, &spec, &mounts).await?;
    node.rt.start(&job).await?;
    assert_eq!(within("waiting for the job", node.rt.wait(&job)).await?, 0);
    let out = node.rt.output(&job, 4096).await?;
    assert_eq!(out.stdout_tail, "input bytes\nout-written\nrootfs-read-only\n");
    assert_eq!(std::fs::read_to_string(output.join("o.txt"))?, "made\n");
    assert!(!input.join("x").exists(), "nothing was written to the input directory");

    let c = docker_inspect(&job.container_name()).unwrap_or_else(|| panic!("no {}", job.container_name()));
    let mounts = c["Mounts"].as_array().cloned().unwrap_or_default();
    let find = |dest: &str| mounts.iter().find(|m| m["Destination"] == dest).cloned();
    let (Some(in_mount), Some(out_mount)) = (find("/in"), find("/out")) else {
        panic!("both mounts expected: {mounts:?}");
    };
    assert_eq!((in_mount["Type"].as_str(), in_mount["RW"].as_bool()), (Some("bind"), Some(false)));
    assert_eq!((out_mount["Type"].as_str(), out_mount["RW"].as_bool()), (Some("bind"), Some(true)));
    assert_eq!(c["HostConfig"]["ReadonlyRootfs"], true, "mounting job data relaxes nothing else");
    Ok(())
}

#[tokio::test]
async fn a_signed_spec_relaxes_only_what_it_names() -> anyhow::Result<()> {
    let node = node("relaxed").await;
    let job = job("relaxed");
    let mut spec = sh("touch /x && id -u && grep -E '^(CapEff|NoNewPrivs):' /proc/self/status");
    spec.security =
        SecurityOverrides { writable_rootfs: true, user: Some("0:0".into()), cap_add: vec!["CHOWN".into()] };

    assert_eq!(run(&node.rt, &job, &spec).await?, 0);
    let output = node.rt.output(&job, 4096).await?;
    // CHOWN is capability 0: the only bit left after dropping all and adding it back.
    assert_eq!(output.stdout_tail, "0\nCapEff:\t0000000000000001\nNoNewPrivs:\t1\n");

    let c = docker_inspect(&job.container_name()).unwrap_or_else(|| panic!("no {}", job.container_name()));
    let host = &c["HostConfig"];
    assert_eq!(host["ReadonlyRootfs"], false);
    assert_eq!(host["CapDrop"], json!(["ALL"]));
    assert_eq!(host["CapAdd"], json!(["CHOWN"]));
    assert_eq!(host["SecurityOpt"], json!(["no-new-privileges"]));
    assert_eq!(host["NetworkMode"], "none");
    assert_eq!(c["Config"]["User"], "0:0");
    Ok(())
}

#[tokio::test]
async fn a_spec_asking_for_network_gets_the_bridge() -> anyhow::Result<()> {
    let node = node("network").await;
    let job = job("network");
    let mut spec = sh("ls /sys/class/net");
    spec.network = true;

    assert_eq!(run(&node.rt, &job, &spec).await?, 0);
    assert_eq!(node.rt.output(&job, 4096).await?.stdout_tail, "eth0\nlo\n");
    let c = docker_inspect(&job.container_name()).unwrap_or_else(|| panic!("no {}", job.container_name()));
    assert_eq!(c["HostConfig"]["NetworkMode"], "bridge");
    assert_eq!(c["HostConfig"]["CapDrop"], json!(["ALL"]));
    Ok(())
}

#[tokio::test]
async fn creating_an_attempt_twice_returns_the_first_container_unchanged() -> anyhow::Result<()> {
    let node = node("twice").await;
    let job = job("twice");
    let first = node.rt.create(&job, &sh("echo first"), &Mounts::default()).await?;
    let second = node.rt.create(&job, &sh("echo second"), &Mounts::default()).await?;
    assert_eq!(first, second);
    assert_eq!(containers_labelled(LABEL_JOB, &job.job_id), vec![first.clone()]);
    let c = docker_inspect(&first).unwrap_or_else(|| panic!("no container {first}"));
    assert_eq!(c["Config"]["Cmd"], json!(["sh", "-c", "echo first"]), "the second create changed nothing");

    // Once it has run, creating it again still hands back the same container, never a new run.
    assert_eq!(run(&node.rt, &job, &sh("echo first")).await?, 0);
    assert_eq!(node.rt.create(&job, &sh("echo third"), &Mounts::default()).await?, first);
    assert_eq!(node.rt.output(&job, 100).await?.stdout_tail, "first\n");

    // Another attempt of the same job is another container.
    let retry = JobRef { job_id: job.job_id.clone(), attempt: 2 };
    let other = node.rt.create(&retry, &sh("true"), &Mounts::default()).await?;
    assert_ne!(other, first);
    assert_eq!(
        docker_inspect(&other).map(|c| c["Name"].clone()),
        Some(json!(format!("/outpost-{}-2", job.job_id)))
    );
    Ok(())
}

#[tokio::test]
async fn concurrent_creates_of_one_attempt_make_one_container() -> anyhow::Result<()> {
    let node = node("race").await;
    let job = job("race");
    let spec = sh("true");
    let mounts = Mounts::default();
    let ids = join_all((0..4).map(|_| node.rt.create(&job, &spec, &mounts))).await;
    let ids: Vec<String> = ids.into_iter().collect::<Result<_, _>>()?;
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    assert_eq!(containers_labelled(LABEL_JOB, &job.job_id), vec![ids[0].clone()]);
    Ok(())
}

#[tokio::test]
async fn a_container_name_held_by_another_node_is_refused() -> anyhow::Result<()> {
    let (mine, theirs) = (node("owner").await, node("intruder").await);
    let job = job("shared");
    mine.rt.create(&job, &sh("true"), &Mounts::default()).await?;
    let err = theirs.rt.create(&job, &sh("true"), &Mounts::default()).await.err();
    assert!(
        matches!(&err, Some(RuntimeError::Invalid(m)) if m.contains(&mine.id)),
        "expected Invalid naming the owner {}, got {err:?}",
        mine.id
    );
    assert!(theirs.rt.list_managed().await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn list_managed_finds_only_this_nodes_containers_with_their_states() -> anyhow::Result<()> {
    let (node, other) = (node("list").await, node("list-other").await);
    let (created, running, exited) = (job("list-created"), job("list-running"), job("list-exited"));
    let created_id = node.rt.create(&created, &sh("true"), &Mounts::default()).await?;
    let running_id = node.rt.create(&running, &sh("sleep 300"), &Mounts::default()).await?;
    node.rt.start(&running).await?;
    until_running(&node.rt, &running).await?;
    let exited_id = node.rt.create(&exited, &sh("exit 7"), &Mounts::default()).await?;
    assert_eq!(run(&node.rt, &exited, &sh("exit 7")).await?, 7);
    let foreign = job("list-foreign");
    other.rt.create(&foreign, &sh("true"), &Mounts::default()).await?;

    let mut managed = node.rt.list_managed().await?;
    managed.sort_by(|a, b| a.container_id.cmp(&b.container_id));
    let mut expected = vec![created_id.clone(), running_id.clone(), exited_id];
    expected.sort();
    assert_eq!(managed.iter().map(|m| m.container_id.clone()).collect::<Vec<_>>(), expected);
    for m in &managed {
        if m.container_id == created_id {
            assert_eq!(m.job, created);
            assert_eq!(m.state, ContainerState::Created);
        } else if m.container_id == running_id {
            assert_eq!(m.job, running);
            assert!(matches!(m.state, ContainerState::Running { started_unix_ms } if started_unix_ms > 0));
        } else {
            assert_eq!(m.job, exited);
            assert!(matches!(m.state, ContainerState::Exited { exit_code: 7, oom_killed: false, .. }));
        }
    }

    let theirs = other.rt.list_managed().await?;
    assert_eq!(theirs.iter().map(|m| &m.job).collect::<Vec<_>>(), vec![&foreign]);
    Ok(())
}

#[tokio::test]
async fn kill_stops_a_sleeping_job_and_is_harmless_once_it_exited() -> anyhow::Result<()> {
    let node = node("kill").await;
    let job = job("kill");
    node.rt.create(&job, &sh("sleep 300"), &Mounts::default()).await?;
    // Killing a container that never started is no error either.
    node.rt.kill(&job).await?;
    assert_eq!(node.rt.inspect(&job).await?, Some(ContainerState::Created));

    node.rt.start(&job).await?;
    until_running(&node.rt, &job).await?;
    node.rt.kill(&job).await?;
    assert_eq!(within("waiting for the killed job", node.rt.wait(&job)).await?, 137, "SIGKILL");
    assert!(matches!(node.rt.inspect(&job).await?, Some(ContainerState::Exited { exit_code: 137, .. })));
    node.rt.kill(&job).await?;
    Ok(())
}

/// The adapter has no timeout of its own: the executor races `wait` against the job's deadline
/// and kills on expiry. That only works if an abandoned wait leaves the job alone.
#[tokio::test]
async fn a_wait_abandoned_at_a_deadline_leaves_the_job_running_until_killed() -> anyhow::Result<()> {
    let node = node("deadline").await;
    let job = job("deadline");
    node.rt.create(&job, &sh("echo started; sleep 300"), &Mounts::default()).await?;
    node.rt.start(&job).await?;

    let waited = tokio::time::timeout(Duration::from_secs(1), node.rt.wait(&job)).await;
    assert!(waited.is_err(), "a 300 s job finished within a second: {waited:?}");
    assert!(matches!(node.rt.inspect(&job).await?, Some(ContainerState::Running { .. })));

    node.rt.kill(&job).await?;
    assert_eq!(within("waiting after the kill", node.rt.wait(&job)).await?, 137);
    assert_eq!(node.rt.output(&job, 100).await?.stdout_tail, "started\n");
    Ok(())
}

#[tokio::test]
async fn a_job_over_its_memory_limit_is_reported_oom_killed() -> anyhow::Result<()> {
    let node = node("oom").await;
    let job = job("oom");
    // The shell holds the whole 64 MB in a variable; the limit is 16 MiB without swap.
    let mut spec = sh("x=$(head -c 64000000 /dev/zero | tr '\\0' a); echo survived");
    spec.resources.memory_mb = 16;

    let code = run(&node.rt, &job, &spec).await?;
    assert_ne!(code, 0);
    let state = node.rt.inspect(&job).await?;
    assert!(matches!(state, Some(ContainerState::Exited { oom_killed: true, .. })), "{state:?}");
    assert_eq!(node.rt.output(&job, 100).await?.stdout_tail, "");
    Ok(())
}

#[tokio::test]
async fn start_never_runs_an_attempt_twice() -> anyhow::Result<()> {
    let node = node("once").await;
    let job = job("once");
    node.rt.create(&job, &sh("echo ran"), &Mounts::default()).await?;
    let err = node.rt.wait(&job).await.err();
    assert!(matches!(err, Some(RuntimeError::Invalid(_))), "waiting for a never-started job: {err:?}");

    assert_eq!(run(&node.rt, &job, &sh("echo ran")).await?, 0);
    let err = node.rt.start(&job).await.err();
    assert!(
        matches!(&err, Some(RuntimeError::Invalid(m)) if m.contains("already run")),
        "starting an exited attempt: {err:?}"
    );
    assert_eq!(node.rt.output(&job, 100).await?.stdout_tail, "ran\n", "it ran once");
    Ok(())
}

#[tokio::test]
async fn a_job_without_a_container_is_not_found() -> anyhow::Result<()> {
    let node = node("absent").await;
    let job = job("absent");
    assert_eq!(node.rt.inspect(&job).await?, None);
    assert!(matches!(node.rt.start(&job).await, Err(RuntimeError::NotFound(_))));
    assert!(matches!(node.rt.wait(&job).await, Err(RuntimeError::NotFound(_))));
    assert!(matches!(node.rt.kill(&job).await, Err(RuntimeError::NotFound(_))));
    assert!(matches!(node.rt.output(&job, 100).await, Err(RuntimeError::NotFound(_))));

    // A job id that is no safe container name never reaches the engine.
    let evil = JobRef { job_id: "../images/x".into(), attempt: 1 };
    assert!(matches!(
        node.rt.create(&evil, &sh("true"), &Mounts::default()).await,
        Err(RuntimeError::Invalid(_))
    ));
    assert!(matches!(node.rt.inspect(&evil).await, Err(RuntimeError::Invalid(_))));
    Ok(())
}

#[tokio::test]
async fn an_absent_image_is_image_missing_and_never_pulled() -> anyhow::Result<()> {
    let node = node("noimage").await;
    let job = job("noimage");
    let mut spec = sh("true");
    spec.image = random_image_id();

    assert!(!node.rt.image_present(&spec.image).await?);
    // No registry is reachable here: a pull attempt would hang or fail slowly, not answer at once.
    let created =
        tokio::time::timeout(Duration::from_secs(15), node.rt.create(&job, &spec, &Mounts::default())).await;
    match created {
        Ok(Err(RuntimeError::ImageMissing(image))) => assert_eq!(image, spec.image),
        other => panic!("expected ImageMissing({}), got {other:?}", spec.image),
    }
    assert_eq!(node.rt.inspect(&job).await?, None, "no container is made for a missing image");

    // Images are named by id only: a tag is refused before the engine is asked.
    spec.image = "outpost-test-busybox:latest".into();
    assert!(matches!(node.rt.create(&job, &spec, &Mounts::default()).await, Err(RuntimeError::Invalid(_))));
    assert_eq!(node.rt.inspect(&job).await?, None);
    Ok(())
}

#[tokio::test]
async fn output_beyond_max_bytes_keeps_the_newest_bytes_of_each_stream_and_says_so() -> anyhow::Result<()> {
    let node = node("tail").await;
    let job = job("tail");
    // stderr's only line comes first: a chatty stdout must not push it out of its own tail.
    let spec = sh("echo only-line >&2; seq 1 5000");
    assert_eq!(run(&node.rt, &job, &spec).await?, 0);
    let all: String = (1..=5000).map(|i| format!("{i}\n")).collect();

    let cut = node.rt.output(&job, 100).await?;
    assert_eq!(cut.stdout_tail, all[all.len() - 100..]);
    assert_eq!(cut.stderr_tail, "only-line\n");
    assert!(cut.truncated);

    let whole = node.rt.output(&job, 1 << 20).await?;
    assert_eq!(whole.stdout_tail, all);
    assert_eq!(whole.stderr_tail, "only-line\n");
    assert!(!whole.truncated);

    let nothing = node.rt.output(&job, 0).await?;
    assert_eq!((nothing.stdout_tail.as_str(), nothing.stderr_tail.as_str()), ("", ""));
    assert!(nothing.truncated);
    Ok(())
}

#[tokio::test]
async fn a_line_longer_than_max_bytes_is_cut_to_its_end() -> anyhow::Result<()> {
    let node = node("longline").await;
    let job = job("longline");
    // 100 000 bytes and no newline: the engine splits it into several log entries.
    let spec = sh("head -c 99999 /dev/zero | tr '\\0' x; echo y");
    assert_eq!(run(&node.rt, &job, &spec).await?, 0);
    let output = node.rt.output(&job, 10).await?;
    assert_eq!(output.stdout_tail, "xxxxxxxxy\n");
    assert!(output.truncated);
    Ok(())
}

#[tokio::test]
async fn a_flood_of_output_is_rotated_away_on_disk_and_its_tail_stays_exact() -> anyhow::Result<()> {
    let node = node("flood").await;
    let job = job("flood");
    let written = 40_000_000;
    let spec = sh(&format!("head -c {written} /dev/zero | tr '\\0' x; echo end"));
    assert_eq!(run(&node.rt, &job, &spec).await?, 0);

    let output = node.rt.output(&job, 10).await?;
    assert_eq!(output.stdout_tail, "xxxxxxend\n");
    assert!(output.truncated);

    let logs = std::process::Command::new("docker").args(["logs", &job.container_name()]).output()?;
    assert!(logs.status.success(), "docker logs: {}", String::from_utf8_lossy(&logs.stderr));
    let kept = logs.stdout.len();
    assert!(kept < written, "the engine kept all {kept} bytes: the log is not rotated");
    assert!(kept > 1 << 20, "the engine kept only {kept} bytes");
    Ok(())
}

#[tokio::test]
async fn load_image_of_a_saved_tarball_returns_its_id() -> anyhow::Result<()> {
    let node = node("load").await;
    let dir = tempfile::tempdir()?;
    let tar = dir.path().join("busybox.tar");
    let id = build_test_image(Some(&tar));

    let loaded = within("loading the image", node.rt.load_image(&tar)).await?;
    assert_eq!(loaded, vec![id.clone()]);
    assert!(node.rt.image_present(&id).await?);
    let info = node.rt.info().await?;
    assert!(!info.version.is_empty());
    assert!(info.images.contains(&id), "{id} not among {:?}", info.images);
    Ok(())
}

#[tokio::test]
async fn a_corrupt_or_missing_tarball_is_refused_as_invalid() -> anyhow::Result<()> {
    let node = node("badtar").await;
    let dir = tempfile::tempdir()?;

    let garbage = dir.path().join("garbage.tar");
    std::fs::write(&garbage, b"this is not a tar archive\n".repeat(1000))?;
    let saved = dir.path().join("saved.tar");
    build_test_image(Some(&saved));
    let bytes = std::fs::read(&saved)?;
    let truncated = dir.path().join("truncated.tar");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2])?;
    let missing = dir.path().join("missing.tar");
    // A well-formed tar archive that is no image, and a large file the engine gives up on early.
    std::fs::write(dir.path().join("hello.txt"), "hello\n")?;
    let not_image = dir.path().join("not-an-image.tar");
    let status = std::process::Command::new("tar")
        .arg("-cf")
        .arg(&not_image)
        .arg("-C")
        .arg(dir.path())
        .arg("hello.txt")
        .status()?;
    assert!(status.success(), "tar failed: {status}");
    let large = dir.path().join("large-garbage.tar");
    std::fs::write(&large, vec![0x5a_u8; 16 << 20])?;

    for tar in [&garbage, &truncated, &missing, &not_image, &large] {
        let err = within("loading a bad tarball", node.rt.load_image(tar)).await.err();
        let shown = tar.display().to_string();
        assert!(
            matches!(&err, Some(RuntimeError::Invalid(m)) if m.contains(&shown)),
            "{shown}: expected Invalid naming the file, got {err:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn remove_is_idempotent_and_takes_a_running_job_with_it() -> anyhow::Result<()> {
    let node = node("remove").await;

    let done = job("remove-done");
    assert_eq!(run(&node.rt, &done, &sh("true")).await?, 0);
    node.rt.remove(&done).await?;
    assert_eq!(node.rt.inspect(&done).await?, None);
    node.rt.remove(&done).await?;

    let busy = job("remove-busy");
    node.rt.create(&busy, &sh("sleep 300"), &Mounts::default()).await?;
    node.rt.start(&busy).await?;
    until_running(&node.rt, &busy).await?;
    node.rt.remove(&busy).await?;
    assert_eq!(node.rt.inspect(&busy).await?, None);

    node.rt.remove(&job("remove-never")).await?;
    assert!(node.rt.list_managed().await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn an_unreachable_engine_is_a_retryable_error_naming_the_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("no-docker.sock");
    let socket = socket.to_str().expect("utf-8 temp path");
    let err = within("connecting to nothing", DockerRuntime::connect("rt-nowhere", Some(socket))).await.err();
    assert!(
        matches!(&err, Some(e @ RuntimeError::Unavailable(m)) if e.is_retryable() && m.contains(socket)),
        "{err:?}"
    );

    let err = DockerRuntime::connect(" ", None).await.err();
    assert!(matches!(err, Some(RuntimeError::Invalid(_))), "an empty node id: {err:?}");
}
