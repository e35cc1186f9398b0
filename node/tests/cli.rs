//! The `outpost` binary's own commands, run as a process: configuration checks, status of an
//! unenrolled node, and loading an image tarball into the real Docker engine.

#![allow(clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn outpost(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outpost"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("OUTPOST_DATA_DIR")
        .output()
        .expect("run outpost")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn check_config_prints_the_merged_configuration_with_drop_ins_and_env() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!("data_dir = \"{}\"\n[agent]\nmax_concurrent_jobs = 2\n", dir.path().display()),
    )
    .expect("write");
    std::fs::create_dir(dir.path().join("config.d")).expect("mkdir");
    std::fs::write(dir.path().join("config.d/10-site.toml"), "[agent]\nheartbeat_secs = 7\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .arg("--config")
        .arg(&config)
        .arg("check-config")
        .env("OUTPOST_PROFILE", "air-gapped")
        .output()
        .expect("run");
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("max_concurrent_jobs = 2"), "{t}");
    assert!(t.contains("heartbeat_secs = 7"), "{t}");
    assert!(t.contains("air-gapped"), "{t}");
    assert!(t.contains("10-site.toml") && t.contains("$OUTPOST_PROFILE"), "sources are named: {t}");
}

#[test]
fn an_unknown_key_is_an_error_that_names_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[agent]\nmax_concurent_jobs = 2\n").expect("write");
    let out = outpost(&config, &["check-config"]);
    let t = text(&out);
    assert!(!out.status.success());
    assert!(t.contains("max_concurent_jobs") && t.contains(&config.display().to_string()), "{t}");
    assert!(!t.contains("panicked"), "{t}");
}

#[test]
fn a_malformed_config_file_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[agent\nthis is not toml").expect("write");
    let out = outpost(&config, &["run"]);
    let t = text(&out);
    assert!(!out.status.success());
    assert!(t.contains("not valid TOML"), "{t}");
    assert!(!t.contains("panicked"), "{t}");
}

#[test]
fn run_and_status_of_an_unenrolled_node_say_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, format!("data_dir = \"{}\"\n", dir.path().display())).expect("write");
    let out = outpost(&config, &["run"]);
    let t = text(&out);
    assert!(!out.status.success());
    assert!(t.contains("not enrolled") && t.contains("outpost enroll"), "{t}");
    let out = outpost(&config, &["status"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("not enrolled"));
}

#[test]
fn enroll_refuses_an_unpinned_or_plain_http_control_plane() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, format!("data_dir = \"{}\"\n", dir.path().display())).expect("write");
    let out = outpost(
        &config,
        &["enroll", "--control", "http://x:1", "--token", "t", "--ca-fingerprint", &"ab".repeat(32)],
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("https://"), "{}", text(&out));
    let out =
        outpost(&config, &["enroll", "--control", "https://x:1", "--token", "t", "--ca-fingerprint", "zz"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--ca-fingerprint"), "{}", text(&out));
    // A control plane that is not there: a clear error, nothing written.
    let out = outpost(
        &config,
        &["enroll", "--control", "https://127.0.0.1:9", "--token", "t", "--ca-fingerprint", &"ab".repeat(32)],
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("enrollment failed"), "{}", text(&out));
    assert!(!dir.path().join("identity/node.json").exists());
}

#[test]
fn images_load_brings_a_tarball_into_the_engine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, format!("data_dir = \"{}\"\n", dir.path().display())).expect("write");
    let tar = dir.path().join("image.tar");
    let id = common::build_test_image(Some(&tar));
    let out = outpost(&config, &["images", "load", tar.to_str().expect("utf8")]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains(&format!("loaded {id}")), "{t}");
    std::fs::write(dir.path().join("junk.tar"), b"not a tarball").expect("write");
    let out = outpost(&config, &["images", "load", dir.path().join("junk.tar").to_str().expect("utf8")]);
    assert!(!out.status.success());
    assert!(!text(&out).contains("panicked"), "{}", text(&out));
}

#[test]
fn objects_put_ls_get_head_rm_round_trip_and_refuse_hostile_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, format!("data_dir = \"{}\"\n", dir.path().join("data").display()))
        .expect("write");
    let src = dir.path().join("report.json");
    std::fs::write(&src, br#"{"resourceType":"Patient"}"#).expect("write");

    let put = outpost(&config, &["objects", "put", "in/a b/ü.json", src.to_str().expect("utf8")]);
    assert!(put.status.success(), "{}", text(&put));
    // sha256 of the body, as the store computed it while streaming.
    assert!(text(&put).contains("26 bytes"), "{}", text(&put));
    let ls = outpost(&config, &["objects", "ls", "in/", "--json"]);
    assert!(ls.status.success(), "{}", text(&ls));
    let line: serde_json::Value = serde_json::from_slice(&ls.stdout).expect("one JSON line");
    assert_eq!(line["key"], "in/a b/ü.json");
    assert_eq!(line["size"], 26);
    let out = dir.path().join("copy.json");
    let get = outpost(&config, &["objects", "get", "in/a b/ü.json", out.to_str().expect("utf8")]);
    assert!(get.status.success(), "{}", text(&get));
    assert_eq!(std::fs::read(&out).expect("copy"), std::fs::read(&src).expect("src"));
    let head = outpost(&config, &["objects", "head", "in/a b/ü.json"]);
    assert!(text(&head).contains("size:     26"), "{}", text(&head));

    let long = "k".repeat(1025);
    for hostile in ["", "a\u{1b}[31mred", long.as_str()] {
        let bad = outpost(&config, &["objects", "put", hostile, src.to_str().expect("utf8")]);
        assert!(!bad.status.success(), "{hostile:?} must be refused");
        assert!(text(&bad).contains("invalid object key"), "{}", text(&bad));
    }
    // `..` is an ordinary key byte for byte: stored inside the store, never a path outside it.
    let dots = outpost(&config, &["objects", "put", "../escape", src.to_str().expect("utf8")]);
    assert!(dots.status.success(), "{}", text(&dots));
    assert!(!dir.path().join("escape").exists() && !dir.path().join("data/escape").exists());
    assert!(outpost(&config, &["objects", "rm", "../escape"]).status.success());
    let missing = outpost(&config, &["objects", "get", "in/nope"]);
    assert!(!missing.status.success());
    assert!(text(&missing).contains("not found"), "{}", text(&missing));

    let rm = outpost(&config, &["objects", "rm", "in/a b/ü.json"]);
    assert!(rm.status.success(), "{}", text(&rm));
    let ls = outpost(&config, &["objects", "ls"]);
    assert!(ls.stdout.is_empty(), "{}", text(&ls));
}

#[test]
fn completions_and_man_pages_come_from_the_argument_definitions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("absent.toml");
    let bash = outpost(&config, &["completions", "bash"]);
    assert!(bash.status.success(), "{}", text(&bash));
    let script = String::from_utf8_lossy(&bash.stdout);
    for word in ["outpost", "doctor", "check-config", "models", "--config"] {
        assert!(script.contains(word), "the bash completion lacks {word}");
    }
    let bad = outpost(&config, &["completions", "tcsh"]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));

    let man = dir.path().join("man");
    let out = outpost(&config, &["man", man.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", text(&out));
    let page = std::fs::read_to_string(man.join("outpost.1")).expect("outpost.1");
    assert!(page.starts_with(".ie") || page.contains(".TH outpost 1"), "{page}");
    let doctor = std::fs::read_to_string(man.join("outpost-doctor.1")).expect("outpost-doctor.1");
    assert!(doctor.contains("fix"), "{doctor}");
}
