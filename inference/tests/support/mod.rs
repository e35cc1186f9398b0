//! Test models for the engine tests: `OUTPOST_TEST_MODELS` names a directory that
//! `models/make-test-models DIR` filled; without it the models are built once into the cargo
//! target's tmp dir (about 25 s, PyPI packages only), guarded by a lock directory so parallel
//! test processes build them once.

#![allow(dead_code, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use outpost_inference::ModelFiles;

pub fn test_models() -> PathBuf {
    if let Some(dir) = std::env::var_os("OUTPOST_TEST_MODELS") {
        return PathBuf::from(dir);
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-models");
    let done = dir.join(".done");
    if done.exists() {
        return dir;
    }
    let lock = Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-models.lock");
    let started = Instant::now();
    loop {
        match std::fs::create_dir(&lock) {
            Ok(()) => break,
            Err(_) if done.exists() => return dir,
            Err(_) if started.elapsed() > Duration::from_secs(600) => {
                panic!("waited 10 min for {} (remove it if no build is running)", lock.display())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
    if !done.exists() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/make-test-models");
        let status = Command::new(script).arg(&dir).status().expect("run models/make-test-models");
        assert!(status.success(), "models/make-test-models failed: {status}");
        std::fs::write(&done, b"").expect("mark test models built");
    }
    let _ = std::fs::remove_dir(&lock);
    dir
}

/// A test model directory as `ModelFiles` (the manifest's paths → the files themselves, as the
/// model store maps them to blobs).
pub fn model_files(name: &str, engine: &str) -> ModelFiles {
    let dir = test_models().join(name);
    let mut files = BTreeMap::new();
    collect(&dir, &dir, &mut files);
    files.remove("manifest.json");
    ModelFiles { digest: format!("test-{name}"), label: format!("{name}@1"), engine: engine.into(), files }
}

fn collect(root: &Path, dir: &Path, out: &mut BTreeMap<String, PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read model dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            collect(root, &path, out);
        } else {
            let rel = path.strip_prefix(root).expect("under root").to_string_lossy().replace('\\', "/");
            out.insert(rel, path);
        }
    }
}
