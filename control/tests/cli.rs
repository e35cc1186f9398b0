//! The `outpost-control` binary end to end: `serve` prints its ready line and stops on
//! SIGTERM; the operator commands drive a real server; a node (speaking HTTP here) runs the
//! job in between.

// Helpers outside #[test] fns panic on purpose: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::panic)]

#[allow(dead_code)]
#[path = "api/support.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use outpost_protocol::{EventList, JobInfo, TriggerList};

const BIN: &str = env!("CARGO_BIN_EXE_outpost-control");

struct Served {
    child: Child,
    url: String,
    fingerprint: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `serve` on a free port and reads its one ready line.
fn serve(dir: &Path) -> Served {
    serve_to(dir, Stdio::inherit())
}

/// [`serve`] with the server's log written to `log` (appended).
fn serve_logged(dir: &Path, log: &Path) -> Served {
    let file = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("open the log");
    serve_to(dir, file.into())
}

/// [`serve`] with the server's log going to `stderr`.
fn serve_to(dir: &Path, stderr: Stdio) -> Served {
    serve_with(dir, stderr, &[])
}

/// [`serve_to`] with more arguments.
fn serve_with(dir: &Path, stderr: Stdio, extra: &[&str]) -> Served {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("outpost-control starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("a ready line");
    // outpost-control listening on https://127.0.0.1:PORT (CA sha256 HEX)
    let rest =
        line.strip_prefix("outpost-control listening on https://").unwrap_or_else(|| panic!("{line:?}"));
    let (addr, rest) = rest.split_once(" (CA sha256 ").unwrap_or_else(|| panic!("{line:?}"));
    let fingerprint = rest.strip_suffix(")\n").unwrap_or_else(|| panic!("{line:?}"));
    assert!(addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"), "{line:?}");
    assert!(fingerprint.len() == 64 && fingerprint.bytes().all(|b| b.is_ascii_hexdigit()), "{line:?}");
    Served { child, url: format!("https://{addr}"), fingerprint: fingerprint.to_owned() }
}

fn ctl(served: &Served, dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["--url", &served.url, "--data-dir"])
        .arg(dir)
        .args(args)
        .env_remove("OUTPOST_ADMIN_TOKEN")
        .env_remove("OUTPOST_CONTROL_URL")
        .output()
        .expect("outpost-control runs")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{:?}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn serve_runs_a_job_submitted_by_the_cli_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mut served = serve(d);

    assert_eq!(ok(ctl(&served, d, &["ca", "fingerprint"])).trim(), served.fingerprint);
    let org = ok(ctl(&served, d, &["org", "create", "clinic-a"])).trim().to_owned();
    assert!(org.starts_with("org-"), "{org}");
    assert!(ok(ctl(&served, d, &["org", "list"])).contains("clinic-a"));
    let token = ok(ctl(&served, d, &["token", "create", "--org", &org, "--ttl", "30m"])).trim().to_owned();
    assert!(token.starts_with("opt_"), "{token}");

    let ca_pem = std::fs::read_to_string(d.join("ca.crt")).expect("ca.crt");
    let node = support::TestNode::enroll_at(&served.url, &ca_pem, &token).await;
    assert!(ok(ctl(&served, d, &["node", "list"])).contains(node.id()));

    let image = format!("sha256:{}", "c".repeat(64));
    let submit =
        ["job", "submit", "--node", node.id(), "--image", &image, "--memory", "64m", "--", "echo", "hi"];
    let job_id = ok(ctl(&served, d, &submit)).trim().to_owned();
    let waiting = ctl(&served, d, &["job", "wait", &job_id, "--timeout", "1s"]);
    assert_eq!(waiting.status.code(), Some(1), "no result yet: {}", text(&waiting.stderr));

    let offered = node.poll(&[], 5).await;
    assert_eq!(offered.jobs.len(), 1);
    let (status, body) = node.report(&support::succeeded(&job_id, "hi from the node")).await;
    assert!(status.is_success(), "{body}");

    let shown = ok(ctl(&served, d, &["job", "wait", &job_id, "--timeout", "30s"]));
    assert!(shown.contains("succeeded") && shown.contains("hi from the node"), "{shown}");
    let json = ok(ctl(&served, d, &["--json", "job", "get", &job_id]));
    let info: JobInfo = serde_json::from_str(&json).expect("JobInfo JSON");
    assert_eq!(info.spec.container().expect("container").command, ["echo", "hi"]);
    assert_eq!(info.spec.container().expect("container").resources.memory_mb, 64);
    assert!(ok(ctl(&served, d, &["job", "list", "--node", node.id()])).contains(&job_id));
    assert!(ok(ctl(&served, d, &["audit", "list"])).contains("job.submitted"));

    let unknown = ctl(&served, d, &["job", "submit", "--node", "node-nobody", "--image", &image]);
    assert!(!unknown.status.success());
    assert!(text(&unknown.stderr).contains("not enrolled"), "{}", text(&unknown.stderr));

    let pid = served.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs").success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = served.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the server did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn triggers_and_events_are_managed_and_followed_from_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let served = serve(d);
    let org = ok(ctl(&served, d, &["org", "create", "clinic-a"])).trim().to_owned();
    let token = ok(ctl(&served, d, &["token", "create", "--org", &org])).trim().to_owned();
    let ca_pem = std::fs::read_to_string(d.join("ca.crt")).expect("ca.crt");
    let node = support::TestNode::enroll_at(&served.url, &ca_pem, &token).await;

    let image = format!("sha256:{}", "c".repeat(64));
    let create = [
        "trigger",
        "create",
        "--org",
        &org,
        "--name",
        "thumbs",
        "--prefix",
        "in/",
        "--suffix",
        ".jpg",
        "--image",
        &image,
        "--memory",
        "64m",
        "--output-prefix",
        "thumbs/",
        "--",
        "/bin/thumb",
        "-q",
    ];
    let trigger_id = ok(ctl(&served, d, &create)).trim().to_owned();
    assert!(trigger_id.starts_with("trigger-"), "{trigger_id}");
    let listed = ok(ctl(&served, d, &["trigger", "list", "--org", &org]));
    assert!(
        listed.contains(&trigger_id) && listed.contains("thumbs") && listed.contains("in/*.jpg"),
        "{listed}"
    );
    let json: TriggerList =
        serde_json::from_str(&ok(ctl(&served, d, &["--json", "trigger", "list"]))).expect("TriggerList JSON");
    assert_eq!(json.triggers.len(), 1);
    let t = &json.triggers[0];
    assert_eq!(t.job.command, ["/bin/thumb", "-q"]);
    assert_eq!(t.job.resources.memory_mb, 64);
    assert_eq!(t.job.output_prefix.as_deref(), Some("thumbs/"));
    assert_eq!(t.on.key_suffix.as_deref(), Some(".jpg"));
    let duplicate = ctl(&served, d, &create);
    assert!(!duplicate.status.success());
    assert!(text(&duplicate.stderr).contains("already exists"), "{}", text(&duplicate.stderr));

    node.deliver_ok(&[support::object_event(1, "in/a.jpg"), support::object_event(2, "in/b.txt")]).await;
    let table = ok(ctl(&served, d, &["events", "list"]));
    assert!(table.contains("in/a.jpg") && table.contains("in/b.txt") && table.contains("trg-"), "{table}");
    let after: EventList = serde_json::from_str(&ok(ctl(
        &served,
        d,
        &["--json", "events", "list", "--node", node.id(), "--after", "1"],
    )))
    .expect("EventList JSON");
    assert_eq!(after.events.iter().map(|e| e.event.key.as_str()).collect::<Vec<_>>(), ["in/b.txt"]);

    // `events tail --count 3` prints the two stored events, then waits for a third.
    let mut tail = Command::new(BIN)
        .args(["--url", &served.url, "--data-dir"])
        .arg(d)
        .args(["events", "tail", "--count", "3"])
        .env_remove("OUTPOST_ADMIN_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tail starts");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(tail.try_wait().expect("try_wait").is_none(), "tail waits for a third event");
    node.deliver_ok(&[support::object_event(3, "in/c.jpg")]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while tail.try_wait().expect("try_wait").is_none() {
        assert!(Instant::now() < deadline, "tail did not exit after 3 events");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = ok(tail.wait_with_output().expect("tail output"));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].contains("in/a.jpg") && lines[0].contains("-> jobs trg-"), "{out}");
    assert!(lines[2].contains("in/c.jpg") && lines[2].contains("seq 3"), "{out}");

    ok(ctl(&served, d, &["trigger", "delete", &trigger_id]));
    assert!(!ok(ctl(&served, d, &["trigger", "list"])).contains(&trigger_id));
    let gone = ctl(&served, d, &["trigger", "delete", &trigger_id]);
    assert!(!gone.status.success());
    assert!(ok(ctl(&served, d, &["audit", "list"])).contains("trigger.deleted"));
}

#[test]
fn help_shows_examples_and_every_command() {
    let out = Command::new(BIN).arg("--help").output().expect("runs");
    let help = ok(out);
    for word in [
        "serve",
        "ca",
        "org",
        "token",
        "job",
        "node",
        "events",
        "trigger",
        "audit",
        "api-token",
        "Examples:",
        "--json",
        "--data-dir",
    ] {
        assert!(help.contains(word), "--help lacks {word}:\n{help}");
    }
    let submit = ok(Command::new(BIN).args(["job", "submit", "--help"]).output().expect("runs"));
    for word in
        ["--node", "--image", "--env", "--timeout", "--memory", "--cpus", "--pids", "--network", "--file"]
    {
        assert!(submit.contains(word), "job submit --help lacks {word}:\n{submit}");
    }
    let create = ok(Command::new(BIN).args(["trigger", "create", "--help"]).output().expect("runs"));
    for word in [
        "--org",
        "--name",
        "--node",
        "--watch",
        "--prefix",
        "--suffix",
        "--include-rejected",
        "--image",
        "--memory",
        "--output-prefix",
        "OUTPOST_EVENT_KEY",
        "Examples:",
    ] {
        assert!(create.contains(word), "trigger create --help lacks {word}:\n{create}");
    }
    let tail = ok(Command::new(BIN).args(["events", "tail", "--help"]).output().expect("runs"));
    assert!(tail.contains("--count") && tail.contains("--node"), "{tail}");
}

#[test]
fn operator_commands_without_credentials_say_where_they_looked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(BIN)
        .args(["--url", "https://127.0.0.1:1", "--data-dir"])
        .arg(dir.path())
        .args(["node", "list"])
        .env_remove("OUTPOST_ADMIN_TOKEN")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("admin.token"), "{}", text(&out.stderr));
}

#[tokio::test]
async fn api_tokens_are_created_used_listed_and_revoked_from_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let served = serve(dir.path());
    let org = ok(ctl(&served, dir.path(), &["org", "create", "clinic-a"])).trim().to_owned();
    let created = ctl(
        &served,
        dir.path(),
        &["api-token", "create", "--org", &org, "--name", "grafana", "--role", "viewer"],
    );
    let token = ok(created.clone()).trim().to_owned();
    assert!(token.starts_with("opk_"), "{token}");
    assert!(text(&created.stderr).contains("shown only this once"), "{}", text(&created.stderr));

    // The viewer reads, and is refused what needs more, with the reason.
    let as_viewer = |args: &[&str]| {
        let mut all = vec!["--token", token.as_str()];
        all.extend_from_slice(args);
        ctl(&served, dir.path(), &all)
    };
    ok(as_viewer(&["node", "list"]));
    let refused = as_viewer(&["token", "create", "--org", &org]);
    assert!(!refused.status.success());
    assert!(text(&refused.stderr).contains("needs the admin role"), "{}", text(&refused.stderr));
    let refused = as_viewer(&["org", "create", "x"]);
    assert!(text(&refused.stderr).contains("admin token"), "{}", text(&refused.stderr));

    let listed = ok(ctl(&served, dir.path(), &["--json", "api-token", "list", "--org", &org]));
    let list: outpost_protocol::ApiTokenList = serde_json::from_str(&listed).expect("JSON list");
    assert_eq!(list.tokens.len(), 1);
    assert_eq!(
        (list.tokens[0].name.as_str(), list.tokens[0].role),
        ("grafana", outpost_protocol::Role::Viewer)
    );
    assert!(!listed.contains(token.split('.').nth(1).expect("secret")), "the secret is never listed");
    let table = ok(ctl(&served, dir.path(), &["api-token", "list", "--org", &org]));
    assert!(table.contains("grafana") && table.contains("viewer"), "{table}");

    ok(ctl(&served, dir.path(), &["api-token", "revoke", "--org", &org, &list.tokens[0].id]));
    let after = as_viewer(&["node", "list"]);
    assert!(!after.status.success());
    assert!(text(&after.stderr).contains("revoked"), "{}", text(&after.stderr));
}

#[tokio::test]
async fn doctor_checks_the_data_directory_and_the_server() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let served = serve(dir.path());
    let report = |args: &[&str]| {
        let out = ctl(&served, dir.path(), args);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("doctor --json prints JSON");
        (out.status.code().expect("code"), json)
    };
    let verdict = |r: &serde_json::Value, name: &str| {
        let c = r["checks"].as_array().expect("checks").iter().find(|c| c["name"] == name).cloned();
        let c = c.unwrap_or_else(|| panic!("no {name} check in {r:#}"));
        (c["verdict"].as_str().expect("verdict").to_owned(), c["detail"].as_str().expect("detail").to_owned())
    };
    let (code, r) = report(&["doctor", "--json"]);
    assert_eq!(code, 0, "{r:#}");
    for name in ["ca", "server_cert", "admin_token", "store", "disk", "server"] {
        assert_eq!(verdict(&r, name).0, "ok", "{name}: {r:#}");
    }
    assert!(verdict(&r, "store").1.contains("held by the running server"), "{r:#}");
    assert!(verdict(&r, "server_cert").1.contains("127.0.0.1"), "{r:#}");

    // An admin token others may read is a warning, not a failure.
    let token = dir.path().join("admin.token");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let (code, r) = report(&["doctor", "--json"]);
    assert_eq!((code, verdict(&r, "admin_token").0.as_str()), (0, "warn"), "{r:#}");

    // A data directory without a database: the store check fails, and nothing is created.
    let empty = tempfile::tempdir().expect("tempdir");
    let out = Command::new(BIN)
        .args(["--data-dir"])
        .arg(empty.path())
        .args(["doctor", "--json"])
        .output()
        .expect("runs");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(verdict(&r, "store").0, "fail", "{r:#}");
    assert!(!empty.path().join("db").exists(), "the doctor created no database");

    // The server gone: a failure, and the store is free.
    let url = served.url.clone();
    drop(served);
    let out = Command::new(BIN)
        .args(["--url", &url, "--data-dir"])
        .arg(dir.path())
        .arg("doctor")
        .env_remove("OUTPOST_ADMIN_TOKEN")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let text = text(&out.stdout);
    assert!(text.lines().any(|l| l.starts_with("✘ server")), "{text}");
    assert!(text.contains("no server holds it now"), "{text}");
    assert!(text.contains("fix: start it"), "{text}");
}

#[test]
fn completions_and_man_pages_come_from_the_argument_definitions() {
    let bash = Command::new(BIN).args(["completions", "bash"]).output().expect("runs");
    let script = ok(bash);
    for word in ["outpost-control", "api-token", "doctor", "--metrics-listen"] {
        assert!(script.contains(word), "the bash completion lacks {word}");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    ok(Command::new(BIN).arg("man").arg(dir.path()).output().expect("runs"));
    let page = std::fs::read_to_string(dir.path().join("outpost-control.1")).expect("outpost-control.1");
    assert!(page.contains(".TH outpost-control 1"), "{page}");
    assert!(dir.path().join("outpost-control-api-token-create.1").exists());
}

/// The data directory fills up under a serving control plane. The first write that cannot reach
/// the disk stops the server (exit 1, saying why) before it serves anything that exists only in
/// its memory: a server that went on would offer the failed submission to its node, and lose it
/// at the next start. After a restart with room, every acknowledged submission is there, and the
/// node is offered exactly what the restarted server knows.
#[tokio::test]
async fn a_full_disk_stops_the_server_before_it_serves_what_it_could_not_write() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test mounts a small tmpfs for the data directory: run it as root (CI does)"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("data");
    std::fs::create_dir(&d).expect("data dir");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs"])
        .arg(&d)
        .status()
        .expect("run mount");
    assert!(mounted.success(), "mount a tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(d.clone());
    let log = dir.path().join("serve.log");
    let mut served = serve_logged(&d, &log);
    let org = ok(ctl(&served, &d, &["org", "create", "full-disk"])).trim().to_owned();
    let token = ok(ctl(&served, &d, &["token", "create", "--org", &org, "--ttl", "30m"])).trim().to_owned();
    let ca_pem = std::fs::read_to_string(d.join("ca.crt")).expect("ca.crt");
    let mut node = support::TestNode::enroll_at(&served.url, &ca_pem, &token).await;
    let image = format!("sha256:{}", "c".repeat(64));
    let submit = ["job", "submit", "--node", node.id(), "--image", &image, "--memory", "64m", "--", "true"];
    let first = ok(ctl(&served, &d, &submit)).trim().to_owned();

    let free = nix::sys::statvfs::statvfs(&d).expect("statvfs");
    let bytes = free.blocks_available() as u64 * free.fragment_size() as u64;
    let ballast = d.join("ballast");
    let file = std::fs::File::create(&ballast).expect("ballast");
    let _ = nix::fcntl::posix_fallocate(&file, 0, i64::try_from(bytes).expect("size"));
    drop(file);
    // sled may have slack of its own: submit until a submission is refused.
    let mut acked = vec![first];
    let refused = (0..500).any(|_| {
        let out = ctl(&served, &d, &submit);
        if out.status.success() {
            acked.push(text(&out.stdout).trim().to_owned());
        }
        !out.status.success()
    });
    assert!(refused, "a submission is refused on a full disk");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = served.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the server goes on serving after a write failed:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(1), "it fails, so its service manager starts it again");
    let said = std::fs::read_to_string(&log).expect("the log");
    assert!(said.contains("could not write to disk") && said.contains("free space"), "{said}");

    std::fs::remove_file(&ballast).expect("free the disk");
    let served = serve_logged(&d, &log);
    node.base.clone_from(&served.url);
    let listed = ok(ctl(&served, &d, &["--json", "job", "list", "--node", node.id()]));
    let known: std::collections::BTreeSet<String> = serde_json::from_str::<serde_json::Value>(&listed)
        .expect("job list JSON")["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| j["job_id"].as_str().expect("job_id").to_owned())
        .collect();
    for id in &acked {
        assert!(known.contains(id), "acknowledged job {id} is kept: {known:?}");
    }
    assert!(known.len() <= acked.len() + 1, "nothing but the acknowledged jobs and the refused one");
    let offered: std::collections::BTreeSet<String> =
        node.poll(&[], 0).await.jobs.iter().map(|a| a.job_id.clone()).collect();
    assert!(offered.iter().all(|id| known.contains(id)), "offered {offered:?}, known {known:?}");
}

/// `migrate` brings a PostgreSQL database to the binary's schema (once), `serve --store-url`
/// serves from it, and a database without the schema is refused with what to run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_then_serve_from_postgres() {
    let Some(pg) = outpost_control::testing::postgres::start_or_skip("migrate_then_serve_from_postgres")
        .await
        .expect("postgres")
    else {
        return;
    };
    let options = pg.database().await.expect("database");
    let dir = tempfile::tempdir().expect("tempdir");
    let refused = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(["--store-url", &options.url])
        .output()
        .expect("outpost-control runs");
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("run `outpost-control migrate` first"),
        "{}",
        text(&refused.stderr)
    );
    let migrate = || {
        Command::new(BIN)
            .args(["migrate", "--store-url", &options.url])
            .env_remove("OUTPOST_CONTROL_CONFIG")
            .output()
            .expect("outpost-control runs")
    };
    let first = ok(migrate());
    assert!(
        first.contains(&format!(
            "schema migrated from version 0 to {}",
            outpost_control::store::SCHEMA_VERSION
        )),
        "{first}"
    );
    let again = ok(migrate());
    assert!(again.contains("nothing to do"), "{again}");
    let served = serve_with(dir.path(), Stdio::inherit(), &["--store-url", &options.url]);
    let org = ok(ctl(&served, dir.path(), &["org", "create", "clinic-pg"]));
    let doctor = ctl(&served, dir.path(), &["doctor", "--json", "--store-url", &options.url]);
    let report: serde_json::Value = serde_json::from_slice(&doctor.stdout).expect("doctor JSON");
    let store = report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == "store")
        .expect("a store check");
    assert!(store["detail"].as_str().unwrap_or_default().contains("at schema version"), "{store}");
    let fresh = pg.database().await.expect("database");
    let doctor = ctl(&served, dir.path(), &["doctor", "--json", "--store-url", &fresh.url]);
    assert!(!doctor.status.success(), "an unmigrated store fails the doctor");
    let report: serde_json::Value = serde_json::from_slice(&doctor.stdout).expect("doctor JSON");
    let store = report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == "store")
        .expect("a store check");
    assert!(store["fix"].as_str().unwrap_or_default().contains("outpost-control migrate"), "{store}");
    let listed = ok(ctl(&served, dir.path(), &["--json", "org", "list"]));
    assert!(listed.contains(org.trim()), "{listed}");
    assert!(!dir.path().join("db").exists(), "nothing kept in the embedded store");
}

/// `migrate-store`: what a sled-backed server stored is copied into PostgreSQL (once, safe to
/// repeat), and a server started on the copy serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_store_moves_a_sled_server_to_postgres() {
    let Some(pg) =
        outpost_control::testing::postgres::start_or_skip("migrate_store_moves_a_sled_server_to_postgres")
            .await
            .expect("postgres")
    else {
        return;
    };
    let options = pg.database().await.expect("database");
    let dir = tempfile::tempdir().expect("tempdir");
    let org = {
        let served = serve(dir.path());
        let org = ok(ctl(&served, dir.path(), &["org", "create", "moving-clinic"]));
        ok(ctl(&served, dir.path(), &["token", "create", "--org", org.trim()]));
        org
    };
    let copy = || {
        Command::new(BIN)
            .args(["--data-dir"])
            .arg(dir.path())
            .args(["migrate-store", "--to", &options.url])
            .env_remove("OUTPOST_CONTROL_CONFIG")
            .output()
            .expect("outpost-control runs")
    };
    let first = ok(copy());
    assert!(first.contains("read back equal, audit chains intact"), "{first}");
    assert!(first.lines().any(|l| l.starts_with("organisations") && l.trim_end().ends_with(" 1")), "{first}");
    let again = ok(copy());
    assert!(again.contains("nothing to do"), "{again}");
    let served = serve_with(dir.path(), Stdio::inherit(), &["--store-url", &options.url]);
    let listed = ok(ctl(&served, dir.path(), &["--json", "org", "list"]));
    assert!(listed.contains(org.trim()), "{listed}");
    let audit = ok(ctl(&served, dir.path(), &["audit", "list"]));
    assert!(audit.contains("moving-clinic") || audit.contains(org.trim()), "{audit}");
    let wrong = Command::new(BIN)
        .args(["--data-dir"])
        .arg(dir.path())
        .args(["migrate-store", "--from", "elsewhere", "--to", &options.url])
        .output()
        .expect("outpost-control runs");
    assert!(!wrong.status.success());
    assert!(text(&wrong.stderr).contains("sled:DIR"), "{}", text(&wrong.stderr));
}

/// A second replica started with the first one's listener address says so and exits.
#[tokio::test]
async fn a_replica_on_a_taken_address_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let served = serve(dir.path());
    let addr = served.url.trim_start_matches("https://").to_owned();
    let copy = tempfile::tempdir().expect("tempdir");
    let second = Command::new(BIN)
        .args(["serve", "--listen", &addr, "--data-dir"])
        .arg(copy.path())
        .output()
        .expect("outpost-control runs");
    assert!(!second.status.success());
    let stderr = text(&second.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")) && stderr.contains("another server"),
        "{stderr}"
    );
}

/// A database that cannot be reached when a replica starts: the replica says why, retries with
/// backoff, answers `/v1/health` (and everything else) 503 meanwhile, and serves once the
/// database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_unreachable_at_start_is_waited_for_while_health_says_not_ready() {
    let Some(mut pg) = outpost_control::testing::postgres::start_or_skip(
        "a_database_unreachable_at_start_is_waited_for_while_health_says_not_ready",
    )
    .await
    .expect("postgres") else {
        return;
    };
    let options = pg.database().await.expect("database");
    outpost_control::store::PgStore::migrate(options.clone()).await.expect("migrate");
    pg.kill();
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("serve.log");
    let port =
        std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", &addr, "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--store-url", &options.url])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("outpost-control starts");
    let health = format!("https://{addr}{}", outpost_protocol::paths::HEALTH);
    let deadline = Instant::now() + Duration::from_secs(30);
    let not_ready = loop {
        assert!(
            Instant::now() < deadline,
            "no answer on {addr}; log: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "serve exited: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        if let Ok(ca) = std::fs::read_to_string(dir.path().join("data/ca.crt"))
            && let Ok(resp) = support::https(&ca, None).get(&health).send().await
        {
            break resp;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(not_ready.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let body: outpost_protocol::ErrorBody = not_ready.json().await.expect("an error body");
    assert_eq!(body.code, "store_unavailable", "{body:?}");
    assert!(body.message.contains("cannot reach its store yet"), "{body:?}");
    // Let it retry at least once, then bring the database back.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let logged = std::fs::read_to_string(&log).expect("log");
    assert!(logged.contains("cannot reach the state store; retrying"), "{logged}");
    pg.resume().await.expect("postgres back");
    let stdout = child.stdout.take().expect("stdout");
    let ready = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    });
    let line = tokio::time::timeout(Duration::from_secs(60), ready)
        .await
        .expect("ready within a minute of the database's return")
        .expect("reader")
        .expect("a ready line");
    assert!(line.starts_with(&format!("outpost-control listening on https://{addr}")), "{line:?}");
    let ca = std::fs::read_to_string(dir.path().join("data/ca.crt")).expect("ca");
    let ready = support::https(&ca, None).get(&health).send().await.expect("health");
    assert_eq!(ready.status(), reqwest::StatusCode::OK);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status:?}");
}
