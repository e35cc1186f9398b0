//! A control plane and two nodes, each in its own container on a private Docker network; one
//! node is cut off with `docker network disconnect` while its job runs and reconnected later.
//! Its result must arrive exactly once, and the other node must not notice.

#![allow(clippy::expect_used)]

mod common;
mod harness;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use harness::{
    Operator, container_starts, control_bin, docker_inspect, eventually, node_bin, sh, unix_now_s,
};
use outpost_protocol::JobState;

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("run docker");
    assert!(out.status.success(), "docker {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// An image holding both binaries and the shared libraries they link, made with `docker import`
/// (no registry, no builder).
fn agent_image(stage: &Path) -> String {
    let root = stage.join("rootfs");
    for dir in ["usr/local/bin", "tmp", "etc", "data"] {
        std::fs::create_dir_all(root.join(dir)).expect("mkdir");
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/sbin/nologin\n").expect("passwd");
    std::fs::write(root.join("etc/group"), "root:x:0:\n").expect("group");
    std::fs::write(root.join("etc/nsswitch.conf"), "hosts: files dns\n").expect("nsswitch");
    for bin in [control_bin(), node_bin()] {
        let name = bin.file_name().expect("name");
        std::fs::copy(&bin, root.join("usr/local/bin").join(name)).expect("copy binary");
        let ldd = Command::new("ldd").arg(&bin).output().expect("ldd");
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = line.split("=>").last().and_then(|r| r.split_whitespace().next()).unwrap_or_default();
            if path.starts_with('/') {
                let dest = root.join(path.trim_start_matches('/'));
                std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir lib");
                std::fs::copy(path, &dest).expect("copy library");
            }
        }
    }
    let tag = format!("outpost-e2e-agent:{}", std::process::id());
    let tar = stage.join("rootfs.tar");
    let st = Command::new("tar").arg("-C").arg(&root).arg("-cf").arg(&tar).arg(".").status().expect("tar");
    assert!(st.success(), "tar rootfs");
    docker(&["import", tar.to_str().expect("utf8"), &tag]);
    tag
}

struct Cleanup {
    containers: Vec<String>,
    network: String,
    image: String,
    node_ids: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for c in &self.containers {
                let out = Command::new("docker").args(["logs", "--tail", "80", c]).output();
                if let Ok(out) = out {
                    eprintln!(
                        "----- {c} -----\n{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        }
        let _ = Command::new("docker").args(["rm", "-f"]).args(&self.containers).output();
        for n in &self.node_ids {
            harness::remove_node_containers(n);
        }
        let _ = Command::new("docker").args(["network", "rm", &self.network]).output();
        let _ = Command::new("docker").args(["rmi", "-f", &self.image]).output();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_cut_off_by_the_network_delivers_its_result_once_when_it_is_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let image = agent_image(tmp.path());
    let tag = std::process::id();
    let net = format!("outpost-e2e-net-{tag}");
    let ctl = format!("outpost-e2e-control-{tag}");
    let nodes = [format!("outpost-e2e-node1-{tag}"), format!("outpost-e2e-node2-{tag}")];
    let mut cleanup =
        Cleanup { containers: vec![], network: net.clone(), image: image.clone(), node_ids: vec![] };
    docker(&["network", "create", &net]);

    // The control plane, reachable as `control` on the private network and, for the operator
    // (this test), on a loopback port of the host.
    let ctl_dir = tmp.path().join("control");
    std::fs::create_dir_all(&ctl_dir).expect("mkdir");
    cleanup.containers.push(ctl.clone());
    docker(&[
        "run",
        "-d",
        "--name",
        &ctl,
        "--network",
        &net,
        "--network-alias",
        "control",
        "-p",
        "127.0.0.1::8443",
        "-v",
        &format!("{}:/data", ctl_dir.display()),
        &image,
        "/usr/local/bin/outpost-control",
        "serve",
        "--listen",
        "0.0.0.0:8443",
        "--data-dir",
        "/data",
        "--san",
        "control",
    ]);
    let port = {
        let mut mapped = String::new();
        for _ in 0..100 {
            if ctl_dir.join("admin.token").exists() {
                mapped = docker(&["port", &ctl, "8443/tcp"]);
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        mapped.lines().next().and_then(|l| l.rsplit(':').next()).expect("mapped port").to_string()
    };
    let op = Operator::for_data_dir(&format!("https://localhost:{port}"), &ctl_dir);
    let org = {
        let mut org = None;
        for _ in 0..100 {
            if Command::new("docker")
                .args(["logs", &ctl])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("listening"))
            {
                org = Some(op.create_org("net").await);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        org.expect("the control plane came up")
    };

    // Two nodes, enrolled from inside their containers against https://control:8443.
    let mut node_ids = Vec::new();
    for name in &nodes {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(
            dir.join("config.toml"),
            "data_dir = \"/data\"\n[control]\npoll_wait_secs = 5\n[agent]\nheartbeat_secs = 2\n",
        )
        .expect("config");
        std::fs::copy(ctl_dir.join("ca.crt"), dir.join("ca.crt")).expect("ca");
        let token = op.create_token(&org.id).await;
        let vol = format!("{}:/data", dir.display());
        docker(&[
            "run",
            "--rm",
            "--network",
            &net,
            "-v",
            &vol,
            &image,
            "/usr/local/bin/outpost",
            "--config",
            "/data/config.toml",
            "enroll",
            "--control",
            "https://control:8443",
            "--token",
            &token.token,
            "--ca-file",
            "/data/ca.crt",
            "--hostname",
            name,
        ]);
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("identity/node.json")).expect("node.json"))
                .expect("json");
        let node_id = v["node_id"].as_str().expect("node id").to_string();
        cleanup.node_ids.push(node_id.clone());
        cleanup.containers.push(name.clone());
        docker(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            &net,
            "-v",
            &vol,
            "-v",
            "/var/run/docker.sock:/var/run/docker.sock",
            &image,
            "/usr/local/bin/outpost",
            "--config",
            "/data/config.toml",
            "run",
        ]);
        node_ids.push(node_id);
    }

    // Both nodes work.
    let since = unix_now_s();
    for id in &node_ids {
        let job = op.submit(id, sh("echo warm")).await;
        assert_eq!(op.wait_result(&job.job_id, Duration::from_secs(90)).await.stdout_tail.trim(), "warm");
    }

    // Node 2 takes a job, then loses the network while the job runs.
    let cut = op.submit(&node_ids[1], sh("sleep 3; echo from-the-island")).await;
    eventually("node 2 to accept its job", Duration::from_secs(30), async || {
        op.job(&cut.job_id).await.state == JobState::Accepted
    })
    .await;
    docker(&["network", "disconnect", &net, &nodes[1]]);
    let cname = format!("outpost-{}-1", cut.job_id);
    eventually(
        "the cut-off job to finish and its container to be cleaned up",
        Duration::from_secs(60),
        async || docker_inspect(&cname).is_none(),
    )
    .await;

    // Node 1 carries on; node 2's result cannot arrive.
    let other = op.submit(&node_ids[0], sh("echo unaffected")).await;
    assert_eq!(op.wait_result(&other.job_id, Duration::from_secs(90)).await.stdout_tail.trim(), "unaffected");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(op.job(&cut.job_id).await.result.is_none(), "no result while node 2 is cut off");

    docker(&["network", "connect", &net, &nodes[1]]);
    let r = op.wait_result(&cut.job_id, Duration::from_secs(120)).await;
    assert_eq!(r.stdout_tail.trim(), "from-the-island");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(op.results_recorded(&cut.job_id).await, 1, "stored exactly once");
    assert_eq!(container_starts(&cut.job_id, since), 1, "started exactly once");
    drop(cleanup);
}
