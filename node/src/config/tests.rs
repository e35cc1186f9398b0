use super::*;

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn an_absent_default_file_means_built_in_defaults() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope/config.toml");
    // An explicit path must exist ...
    assert!(matches!(Config::load_with_env(Some(&missing), &env(&[])), Err(ConfigError::Read { .. })));
}

#[test]
fn drop_ins_merge_in_name_order_and_env_wins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("config.toml");
    std::fs::write(&base, "data_dir = \"/srv/a\"\n[agent]\nheartbeat_secs = 10\nmax_concurrent_jobs = 2\n")
        .expect("write");
    std::fs::create_dir(dir.path().join("config.d")).expect("mkdir");
    std::fs::write(dir.path().join("config.d/20-b.toml"), "[agent]\nheartbeat_secs = 20\n").expect("write");
    std::fs::write(dir.path().join("config.d/10-a.toml"), "[agent]\nheartbeat_secs = 15\n").expect("write");
    std::fs::write(dir.path().join("config.d/ignored.txt"), "garbage").expect("write");
    let loaded = Config::load_with_env(
        Some(&base),
        &env(&[("OUTPOST_DATA_DIR", "/srv/env"), ("OUTPOST_ADMIN_TOKEN", "not ours")]),
    )
    .expect("loads");
    assert_eq!(loaded.config.agent.heartbeat_secs, 20, "20-b.toml is merged after 10-a.toml");
    assert_eq!(loaded.config.agent.max_concurrent_jobs, 2, "merging keeps keys of earlier layers");
    assert_eq!(loaded.config.data_dir, PathBuf::from("/srv/env"));
    assert_eq!(loaded.sources.len(), 4);
}

#[test]
fn unknown_keys_are_errors_that_name_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("config.toml");
    std::fs::write(&base, "[agent]\nheartbeat_sec = 10\n").expect("write");
    let err = Config::load_with_env(Some(&base), &env(&[])).expect_err("typo must fail").to_string();
    assert!(err.contains("heartbeat_sec"), "{err}");
    assert!(err.contains("config.toml"), "the message names the file: {err}");
}

#[test]
fn bad_values_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("config.toml");
    std::fs::write(&base, "[control]\nurl = \"http://plain\"\n").expect("write");
    let err = Config::load_with_env(Some(&base), &env(&[])).expect_err("http must fail").to_string();
    assert!(err.contains("https://"), "{err}");
    std::fs::write(&base, "profile = \"moon\"\n").expect("write");
    assert!(Config::load_with_env(Some(&base), &env(&[])).is_err());
    std::fs::write(&base, "data_dir = [1").expect("write");
    let err = Config::load_with_env(Some(&base), &env(&[])).expect_err("syntax").to_string();
    assert!(err.contains("not valid TOML"), "{err}");
}

#[test]
fn profiles_parse_in_kebab_case() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("config.toml");
    std::fs::write(&base, "profile = \"air-gapped\"\n").expect("write");
    let c = Config::load_with_env(Some(&base), &env(&[])).expect("loads").config;
    assert_eq!(c.profile, Profile::AirGapped);
}
