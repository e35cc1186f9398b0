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

#[test]
fn storage_defaults_to_a_local_directory_under_the_data_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("config.toml");
    std::fs::write(&base, "data_dir = \"/srv/outpost\"\n").expect("write");
    let c = Config::load_with_env(Some(&base), &env(&[])).expect("loads").config;
    assert_eq!(c.storage.backend, StorageBackend::Fs);
    assert_eq!(c.objects_root(), PathBuf::from("/srv/outpost/objects"));
}

#[test]
fn an_s3_storage_section_parses_and_the_backend_can_come_from_the_env() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("config.toml");
    std::fs::write(
        &base,
        "[storage.s3]\nendpoint = \"http://127.0.0.1:3900\"\nregion = \"garage\"\nbucket = \"site\"\n\
         credentials_file = \"/etc/outpost/s3.toml\"\n",
    )
    .expect("write");
    let c =
        Config::load_with_env(Some(&base), &env(&[("OUTPOST_STORAGE_BACKEND", "s3")])).expect("loads").config;
    assert_eq!(c.storage.backend, StorageBackend::S3);
    let s3 = c.storage.s3.expect("s3 section");
    assert_eq!(
        (s3.endpoint.as_str(), s3.region.as_str(), s3.bucket.as_str()),
        ("http://127.0.0.1:3900", "garage", "site")
    );
    assert_eq!(s3.credentials_file, Some(PathBuf::from("/etc/outpost/s3.toml")));
}

#[test]
fn storage_mistakes_are_refused_with_the_key_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("config.toml");
    for (text, needle) in [
        ("[storage]\nbackend = \"s3\"\n", "[storage.s3]"),
        ("[storage]\nbackend = \"minio\"\n", "minio"),
        ("[storage.fs]\nroot = \"relative/objects\"\n", "storage.fs.root"),
        ("[storage.fs]\nroots = \"/x\"\n", "roots"),
        ("[storage.s3]\nendpoint = \"127.0.0.1:3900\"\nregion = \"r\"\nbucket = \"b\"\n", "http://"),
        ("[storage.s3]\nendpoint = \"http://h\"\nregion = \"r\"\nbucket = \"b\"\nsecret = \"x\"\n", "secret"),
    ] {
        std::fs::write(&base, text).expect("write");
        let err = Config::load_with_env(Some(&base), &env(&[])).expect_err(text).to_string();
        assert!(err.contains(needle), "{text}: {err}");
    }
}

#[test]
fn the_model_store_defaults_under_the_data_dir_and_checks_publisher_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("config.toml");
    std::fs::write(&base, "data_dir = \"/srv/outpost\"\n").expect("write");
    let c = Config::load_with_env(Some(&base), &env(&[])).expect("loads").config;
    assert_eq!(c.models_dir(), PathBuf::from("/srv/outpost/models"));
    assert!(c.models.trusted_publishers.is_empty());
    let key = "ab".repeat(32);
    std::fs::write(&base, format!("[models]\nstore_dir = \"/mnt/m\"\ntrusted_publishers = [\"{key}\"]\n"))
        .expect("write");
    let c = Config::load_with_env(Some(&base), &env(&[])).expect("loads").config;
    assert_eq!(c.models_dir(), PathBuf::from("/mnt/m"));
    assert_eq!(c.models.trusted_publishers, vec![key]);
    std::fs::write(&base, "[models]\ntrusted_publishers = [\"abcd\"]\n").expect("write");
    let err = Config::load_with_env(Some(&base), &env(&[])).expect_err("short key").to_string();
    assert!(err.contains("models.trusted_publishers"), "{err}");
    std::fs::write(&base, "[models]\nstore = \"/x\"\n").expect("write");
    assert!(Config::load_with_env(Some(&base), &env(&[])).is_err(), "unknown key in [models]");
}

#[test]
fn the_egress_policy_may_name_event_fields_but_never_an_empty_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("config.toml");
    std::fs::write(&base, "[[relay.watches]]\nname = \"w\"\nprefix = \"in/\"\nevent_fields = [\"id\"]\n")
        .expect("write");
    std::fs::create_dir(dir.path().join("config.d")).expect("mkdir");
    let egress = dir.path().join("config.d/egress.toml");
    std::fs::write(&egress, "[egress]\nallow_event_fields = [\"id\"]\n").expect("write");
    let loaded = Config::load_with_env(Some(&base), &env(&[])).expect("loads");
    assert_eq!(loaded.config.egress.allow_event_fields, ["id"]);
    assert_eq!(loaded.config.relay.watches[0].event_fields, ["id"]);
    assert!(loaded.config.relay.allowed_event_fields.is_empty(), "filled by the agent, not the file");
    std::fs::write(&egress, "[egress]\nallow_event_fields = [\"\"]\n").expect("write");
    let err = Config::load_with_env(Some(&base), &env(&[])).expect_err("empty name").to_string();
    assert!(err.contains("allow_event_fields"), "{err}");
}

#[test]
fn a_bundles_configuration_sits_under_the_nodes_own_files_and_sets_only_what_it_may() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    let base = dir.path().join("config.toml");
    std::fs::write(&base, format!("data_dir = \"{}\"\n[agent]\nmax_concurrent_jobs = 2\n", data.display()))
        .expect("write");
    std::fs::create_dir(dir.path().join("config.d")).expect("mkdir");
    std::fs::write(dir.path().join("config.d/10-site.toml"), "[agent]\nheartbeat_secs = 7\n").expect("write");
    std::fs::write(
        data.join(BUNDLE_CONFIG_FILE),
        "[agent]\nheartbeat_secs = 30\nmax_concurrent_jobs = 4\n[node]\nlabels = { ward = \"7\" }\n",
    )
    .expect("write");
    let loaded = Config::load_with_env(Some(&base), &env(&[])).expect("loads");
    let c = &loaded.config;
    assert_eq!(c.agent.max_concurrent_jobs, 4, "the bundle's value over the base file");
    assert_eq!(c.agent.heartbeat_secs, 7, "config.d wins over the bundle");
    assert_eq!(c.node.labels.get("ward").map(String::as_str), Some("7"));
    assert!(loaded.sources.iter().any(|s| s.ends_with("(from a bundle)")), "{:?}", loaded.sources);

    // What a bundle may not set is refused when the part is read, and if the file was edited.
    for text in [
        "[egress]\nallow_logs = true\n",
        "data_dir = \"/tmp\"\n",
        "[trust]\nmax_offline = \"off\"\n",
        "[policy]\nkinds = []\n",
        "[[relay.triggers]]\nname = \"x\"\n",
    ] {
        assert!(parse_bundle_config(text).is_err(), "{text}");
    }
    std::fs::write(data.join(BUNDLE_CONFIG_FILE), "[control]\nurl = \"https://elsewhere\"\n").expect("write");
    let err = Config::load_with_env(Some(&base), &env(&[])).expect_err("refused").to_string();
    assert!(err.contains("may not set `control`"), "{err}");

    // One the node would not start with fails the trial load.
    let bad = parse_bundle_config("[agent]\nmax_concurrent_jobs = 0\n").expect("parses");
    assert!(Config::load_with_bundle(Some(&base), &env(&[]), bad).is_err());
}

fn load_text(text: &str, vars: &[(&str, &str)]) -> Result<Loaded, ConfigError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("config.toml");
    std::fs::write(&base, format!("data_dir = \"{}\"\n{text}", dir.path().join("data").display()))
        .expect("write");
    Config::load_with_env(Some(&base), &env(vars))
}

#[test]
fn each_profile_sets_its_documented_defaults() {
    let on_prem = load_text("", &[]).expect("loads");
    assert_eq!(on_prem.config.profile, Profile::OnPrem);
    assert!(on_prem.config.control.uplink);
    assert!(!on_prem.config.egress.allow_logs);
    assert_eq!(on_prem.config.trust.max_offline, "90d");
    assert_eq!(on_prem.from_profile, ["trust.max_offline", "egress.allow_logs"]);

    let cloud = load_text("profile = \"cloud\"\n", &[]).expect("loads");
    assert!(cloud.config.egress.allow_logs, "operators may follow job logs");
    assert_eq!(cloud.config.trust.max_offline, "7d");

    let hybrid = load_text("profile = \"hybrid\"\n", &[]).expect("loads");
    assert_eq!(hybrid.config.trust.max_offline, "30d");

    let gapped = load_text("", &[("OUTPOST_PROFILE", "air-gapped")]).expect("loads");
    assert!(!gapped.config.control.uplink, "an air-gapped node never dials out");
    assert_eq!(gapped.config.bundles.watch.as_deref(), Some(Path::new("/media/outpost")));
    assert_eq!(gapped.config.trust.max_offline, "180d");
    assert_eq!(
        gapped.from_profile,
        ["control.uplink", "bundles.watch", "trust.max_offline", "egress.allow_logs"]
    );
}

#[test]
fn every_profile_default_yields_to_a_file_or_variable() {
    let text = "profile = \"air-gapped\"\n[control]\nuplink = true\n[bundles]\nwatch = \"/mnt/usb\"\n";
    let loaded = load_text(text, &[]).expect("loads");
    assert!(loaded.config.control.uplink);
    assert_eq!(loaded.config.bundles.watch.as_deref(), Some(Path::new("/mnt/usb")));
    assert_eq!(loaded.from_profile, ["trust.max_offline", "egress.allow_logs"], "only what was not set");
    let cloud = load_text("profile = \"cloud\"\n[egress]\nallow_logs = false\n", &[]).expect("loads");
    assert!(!cloud.config.egress.allow_logs);
}

#[test]
fn an_unknown_profile_is_an_error_that_names_it() {
    let err = load_text("profile = \"edge\"\n", &[]).expect_err("refused").to_string();
    assert!(err.contains("profile") && err.contains("edge"), "{err}");
}
