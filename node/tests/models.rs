//! The signed model store through the real `outpost` binary: import from a directory and from a
//! tar archive, list, verify, remove, and every kind of bad input refused with nothing left
//! visible. Models are generated here (a well-formed GGUF header, a small safetensors file) and
//! signed with a key made by the test and configured as a trusted publisher.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ed25519_dalek::{Signer, SigningKey};
use outpost_node::models::{ModelStore, key_id_of, sha256_hex};
use outpost_protocol::{ModelFile, ModelFormat, ModelManifest, SignedModelManifest};

struct Site {
    dir: tempfile::TempDir,
    key: SigningKey,
}

impl Site {
    /// A node whose config trusts `key` (no enrollment: there is no org key).
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = SigningKey::from_bytes(&rand_seed());
        let site = Self { dir, key };
        site.write_config(&[hex::encode(site.key.verifying_key().as_bytes())]);
        site
    }

    fn write_config(&self, trusted: &[String]) {
        let keys = trusted.iter().map(|k| format!("\"{k}\"")).collect::<Vec<_>>().join(", ");
        std::fs::write(
            self.config(),
            format!("data_dir = \"{}\"\n[models]\ntrusted_publishers = [{keys}]\n", self.data().display()),
        )
        .expect("config");
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    fn store(&self) -> PathBuf {
        self.data().join("models")
    }

    fn outpost(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_outpost"))
            .arg("--config")
            .arg(self.config())
            .args(args)
            .env_remove("OUTPOST_DATA_DIR")
            .output()
            .expect("run outpost")
    }

    fn import(&self, path: &Path) -> Output {
        self.outpost(&["models", "import", path.to_str().expect("utf-8 path")])
    }

    /// A fresh model directory under the site's temp dir, signed with the site's key.
    fn model(&self, name: &str, spec: &ModelSpec) -> PathBuf {
        let dir = self.dir.path().join("src").join(name);
        write_model(&dir, name, spec);
        sign_dir(&dir, &self.key, name, spec.format);
        dir
    }

    fn blobs(&self) -> Vec<String> {
        list_names(&self.store().join("blobs/sha256"))
    }
    fn manifests(&self) -> Vec<String> {
        list_names(&self.store().join("manifests"))
    }
    fn tmp(&self) -> Vec<String> {
        list_names(&self.store().join("tmp"))
    }
}

fn rand_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos();
    let pid = std::process::id() as u128;
    seed[..16].copy_from_slice(&(t ^ (pid << 64)).to_le_bytes());
    seed
}

fn list_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// What goes into a generated model.
struct ModelSpec {
    format: ModelFormat,
    /// Extra bytes after the weight file's header, making the content (and digest) unique.
    salt: &'static str,
}

const GGUF: ModelSpec = ModelSpec { format: ModelFormat::Gguf, salt: "gguf" };
const SAFETENSORS: ModelSpec = ModelSpec { format: ModelFormat::Safetensors, salt: "st" };

/// A weight file (a GGUF v3 header with no tensors and no metadata, or a safetensors header
/// with one tensor) padded to 200 KiB, a file under a subdirectory, and a licence file that is
/// byte-identical in every model (one shared blob).
fn write_model(dir: &Path, name: &str, spec: &ModelSpec) {
    std::fs::create_dir_all(dir.join("tokenizer")).expect("mkdir");
    let weights = match spec.format {
        ModelFormat::Gguf => {
            let mut b = b"GGUF".to_vec();
            b.extend_from_slice(&3u32.to_le_bytes());
            b.extend_from_slice(&0u64.to_le_bytes());
            b.extend_from_slice(&0u64.to_le_bytes());
            b
        }
        ModelFormat::Safetensors => {
            let header = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
            let mut b = (header.len() as u64).to_le_bytes().to_vec();
            b.extend_from_slice(header);
            b.extend_from_slice(&[0u8; 8]);
            b
        }
    };
    let mut weights = weights;
    weights.extend(format!("{name}-{}", spec.salt).bytes().cycle().take(200 * 1024));
    std::fs::write(dir.join(format!("model.{}", spec.format.as_str())), weights).expect("weights");
    std::fs::write(dir.join("tokenizer/vocab.txt"), format!("vocabulary of {name}\n")).expect("vocab");
    std::fs::write(dir.join("LICENSE.txt"), "the same licence text in every test model\n").expect("licence");
}

/// What `models/sign` does: list the files present, hash them, sign the payload.
fn manifest_of(dir: &Path, name: &str, format: ModelFormat) -> ModelManifest {
    let mut files = Vec::new();
    for rel in ["LICENSE.txt", "tokenizer/vocab.txt", &format!("model.{}", format.as_str())] {
        let bytes = std::fs::read(dir.join(rel)).expect("read");
        files.push(ModelFile { path: rel.into(), size: bytes.len() as u64, sha256: sha256_hex(&bytes) });
    }
    let engine = if format == ModelFormat::Gguf { "llama" } else { "candle" };
    ModelManifest {
        name: name.into(),
        version: "1.0".into(),
        format,
        engine: engine.into(),
        license: "MIT".into(),
        files,
        embedding_dimensions: Vec::new(),
    }
}

fn sign(key: &SigningKey, m: &ModelManifest) -> SignedModelManifest {
    let payload = serde_json::to_string(m).expect("encode");
    SignedModelManifest {
        key_id: key_id_of(&key.verifying_key()),
        signature_hex: hex::encode(key.sign(payload.as_bytes()).to_bytes()),
        payload,
    }
}

fn write_signed(dir: &Path, signed: &SignedModelManifest) {
    std::fs::write(dir.join("manifest.json"), serde_json::to_string_pretty(signed).expect("json"))
        .expect("write");
}

fn sign_dir(dir: &Path, key: &SigningKey, name: &str, format: ModelFormat) -> ModelManifest {
    let m = manifest_of(dir, name, format);
    write_signed(dir, &sign(key, &m));
    m
}

/// A plain tar of `dir` with manifest.json first, as the README tells publishers to build it.
fn tar_of(dir: &Path, out: &Path) {
    let mut b = tar::Builder::new(std::fs::File::create(out).expect("create tar"));
    b.append_path_with_name(dir.join("manifest.json"), "manifest.json").expect("manifest");
    b.append_dir("./tokenizer", dir.join("tokenizer")).expect("dir entry");
    for rel in ["./LICENSE.txt", "tokenizer/vocab.txt"] {
        b.append_path_with_name(dir.join(rel), rel).expect("append");
    }
    for e in std::fs::read_dir(dir).expect("ls").flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with("model.") {
            b.append_path_with_name(e.path(), &n).expect("append");
        }
    }
    b.finish().expect("finish");
}

fn assert_refused(site: &Site, source: &Path, want: &str) {
    let before = (site.manifests(), site.blobs());
    let out = site.import(source);
    let t = text(&out);
    assert!(!out.status.success(), "import of {} must fail: {t}", source.display());
    assert!(t.contains(want), "the error should say {want:?}: {t}");
    assert!(!t.contains("panicked"), "{t}");
    assert_eq!((site.manifests(), site.blobs()), before, "a refused import changes nothing visible");
    assert!(site.tmp().is_empty(), "a refused import leaves nothing in tmp/: {:?}", site.tmp());
}

#[test]
fn a_signed_directory_imports_lists_verifies_and_reports_in_the_heartbeat() {
    let site = Site::new();
    let src = site.model("tiny-llama", &GGUF);
    let out = site.outpost(&["models", "import", src.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let imported: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let signed: SignedModelManifest =
        serde_json::from_str(&std::fs::read_to_string(src.join("manifest.json")).unwrap()).unwrap();
    let digest = sha256_hex(signed.payload.as_bytes());
    assert_eq!(imported["digest"], digest.as_str());
    assert_eq!(imported["format"], "gguf");

    // Content-addressed: each file is a blob named by its SHA-256, the manifest by its digest.
    let weights = std::fs::read(src.join("model.gguf")).unwrap();
    assert_eq!(std::fs::read(site.store().join("blobs/sha256").join(sha256_hex(&weights))).unwrap(), weights);
    assert_eq!(site.blobs().len(), 3);
    assert_eq!(site.manifests(), vec![format!("{digest}.json")]);

    let list = site.outpost(&["models", "list"]);
    assert!(list.status.success());
    let t = text(&list);
    assert!(t.contains("tiny-llama") && t.contains(&digest[..12]) && t.contains("llama"), "{t}");
    let list = site.outpost(&["models", "list", "--json"]);
    let row: serde_json::Value = serde_json::from_slice(&list.stdout).expect("one json line");
    assert_eq!(row["name"], "tiny-llama");

    let summaries = ModelStore::new(site.store()).summaries();
    assert_eq!(summaries.len(), 1);
    assert_eq!(summaries[0].digest, digest);
    assert_eq!((summaries[0].name.as_str(), summaries[0].format), ("tiny-llama", ModelFormat::Gguf));

    let verify = site.outpost(&["models", "verify"]);
    assert!(verify.status.success(), "{}", text(&verify));
    assert!(text(&verify).contains("ok "), "{}", text(&verify));

    // Importing the same model again is harmless.
    assert!(site.import(&src).status.success());
    assert_eq!(site.manifests().len(), 1);
}

#[test]
fn a_tar_archive_imports_the_same_as_its_directory() {
    let site = Site::new();
    let src = site.model("minilm", &SAFETENSORS);
    let archive = site.dir.path().join("minilm.tar");
    tar_of(&src, &archive);
    let out = site.import(&archive);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("imported minilm@1.0 (safetensors"), "{}", text(&out));
    assert_eq!(site.blobs().len(), 3);
    let found = ModelStore::new(site.store()).find_one("minilm@1.0").expect("present");
    assert_eq!(found.manifest.engine, "candle");
}

#[test]
fn verify_names_a_damaged_blob_and_fails() {
    let site = Site::new();
    let src = site.model("tiny-llama", &GGUF);
    assert!(site.import(&src).status.success());
    let vocab = std::fs::read(src.join("tokenizer/vocab.txt")).unwrap();
    let blob = site.store().join("blobs/sha256").join(sha256_hex(&vocab));
    let mut damaged = vocab.clone();
    damaged[0] ^= 0xff;
    std::fs::write(&blob, damaged).unwrap();

    let out = site.outpost(&["models", "verify", "tiny-llama"]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("DAMAGED") && t.contains("tokenizer/vocab.txt"), "{t}");
    assert!(!t.contains("model.gguf:"), "only the damaged file is named: {t}");

    // Importing again repairs it.
    assert!(site.import(&src).status.success());
    assert!(site.outpost(&["models", "verify"]).status.success());
}

#[test]
fn remove_keeps_shared_blobs_until_no_model_uses_them() {
    let site = Site::new();
    let a = site.model("tiny-llama", &GGUF);
    let b = site.model("minilm", &SAFETENSORS);
    assert!(site.import(&a).status.success());
    assert!(site.import(&b).status.success());
    // LICENSE.txt is the same in both: 3 + 3 files, 5 blobs.
    assert_eq!(site.blobs().len(), 5);
    let licence = sha256_hex(&std::fs::read(a.join("LICENSE.txt")).unwrap());

    let out = site.outpost(&["models", "remove", "tiny-llama"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(site.manifests().len(), 1);
    assert_eq!(site.blobs().len(), 3, "the shared licence stays: {:?}", site.blobs());
    assert!(site.blobs().contains(&licence));
    let list = text(&site.outpost(&["models", "list"]));
    assert!(!list.contains("tiny-llama") && list.contains("minilm"), "{list}");

    let digest = ModelStore::new(site.store()).find_one("minilm").unwrap().digest;
    let out = site.outpost(&["models", "remove", &digest[..16]]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(site.blobs().is_empty() && site.manifests().is_empty(), "no orphan blobs: {:?}", site.blobs());

    let out = site.outpost(&["models", "remove", "minilm"]);
    assert!(!out.status.success() && text(&out).contains("no model matches"), "{}", text(&out));
}

#[test]
fn a_file_altered_after_signing_is_refused_by_hash_size_or_truncation() {
    let site = Site::new();
    let src = site.model("tiny-llama", &GGUF);
    let vocab = src.join("tokenizer/vocab.txt");
    let original = std::fs::read(&vocab).unwrap();

    let mut flipped = original.clone();
    flipped[0] ^= 1;
    std::fs::write(&vocab, &flipped).unwrap();
    assert_refused(&site, &src, "SHA-256");

    std::fs::write(&vocab, [original.as_slice(), b"more"].concat()).unwrap();
    assert_refused(&site, &src, "larger than");

    let weights = src.join("model.gguf");
    std::fs::write(&vocab, &original).unwrap();
    let full = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &full[..full.len() / 2]).unwrap();
    assert_refused(&site, &src, "truncated");

    std::fs::remove_file(&weights).unwrap();
    assert_refused(&site, &src, "not found");
}

#[test]
fn a_wrong_magic_is_refused_even_when_signed() {
    let site = Site::new();
    let src = site.model("tiny-llama", &GGUF);
    let weights = src.join("model.gguf");
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes[..4].copy_from_slice(b"GGML");
    std::fs::write(&weights, bytes).unwrap();
    sign_dir(&src, &site.key, "tiny-llama", ModelFormat::Gguf);
    assert_refused(&site, &src, "not a gguf file");

    let st = site.model("minilm", &SAFETENSORS);
    let weights = st.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes[8] = b'[';
    std::fs::write(&weights, bytes).unwrap();
    sign_dir(&st, &site.key, "minilm", ModelFormat::Safetensors);
    assert_refused(&site, &st, "not a safetensors file");
}

#[test]
fn bad_missing_or_untrusted_signatures_are_refused() {
    let site = Site::new();
    let src = site.model("tiny-llama", &GGUF);
    let manifest = manifest_of(&src, "tiny-llama", ModelFormat::Gguf);

    let mut forged = sign(&site.key, &manifest);
    forged.payload = forged.payload.replace("\"1.0\"", "\"2.0\"");
    write_signed(&src, &forged);
    assert_refused(&site, &src, "does not verify");

    std::fs::write(src.join("manifest.json"), serde_json::to_string(&manifest).unwrap()).unwrap();
    assert_refused(&site, &src, "not a signed manifest");

    std::fs::remove_file(src.join("manifest.json")).unwrap();
    assert_refused(&site, &src, "has no manifest.json");

    let stranger = SigningKey::from_bytes(&[7u8; 32]);
    write_signed(&src, &sign(&stranger, &manifest));
    assert_refused(&site, &src, "does not trust");

    // With no publisher configured and no enrollment, nothing is trusted.
    site.write_config(&[]);
    sign_dir(&src, &site.key, "tiny-llama", ModelFormat::Gguf);
    assert_refused(&site, &src, "no model publisher is trusted");
}

#[test]
fn an_unsafe_path_in_a_signed_manifest_is_refused() {
    let site = Site::new();
    let src = site.model("tiny-llama", &GGUF);
    let mut m = manifest_of(&src, "tiny-llama", ModelFormat::Gguf);
    m.files[1].path = "../tiny-llama/tokenizer/vocab.txt".into();
    write_signed(&src, &sign(&site.key, &m));
    assert_refused(&site, &src, "'..'");
}

#[test]
fn archives_with_links_unlisted_or_unsafe_entries_are_refused() {
    let site = Site::new();
    let src = site.model("tiny-llama", &GGUF);
    let base = site.dir.path().join("base.tar");
    tar_of(&src, &base);

    // Appends one extra entry to a copy of the good archive.
    let with = |name: &str, extra: &dyn Fn(&mut tar::Builder<std::fs::File>)| -> PathBuf {
        let path = site.dir.path().join(name);
        let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
        let mut a = tar::Archive::new(std::fs::File::open(&base).unwrap());
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let mut h = e.header().clone();
            let p = e.path().unwrap().into_owned();
            if h.entry_type().is_dir() {
                b.append_data(&mut h, p, std::io::empty()).unwrap();
            } else {
                b.append_data(&mut h, p, &mut e).unwrap();
            }
            if e.header().path().unwrap().ends_with("manifest.json") {
                extra(&mut b);
            }
        }
        b.finish().unwrap();
        path
    };

    let link = with("link.tar", &|b| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, "evil", "/etc/passwd").unwrap();
    });
    assert_refused(&site, &link, "Symlink");

    let unlisted = with("unlisted.tar", &|b| {
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o644);
        b.append_data(&mut h, "extra.bin", &b"hello"[..]).unwrap();
    });
    assert_refused(&site, &unlisted, "not listed in the signed manifest");

    let unsafe_path = with("unsafe.tar", &|b| {
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o644);
        // The builder refuses `..` itself; write the name into the header directly.
        h.as_gnu_mut().unwrap().name[..10].copy_from_slice(b"../escaped");
        h.set_cksum();
        b.append(&h, &b"hello"[..]).unwrap();
    });
    assert_refused(&site, &unsafe_path, "unsafe path");

    // The manifest must come first, so nothing unsigned is written before the check.
    let late = site.dir.path().join("late.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&late).unwrap());
    b.append_path_with_name(src.join("LICENSE.txt"), "LICENSE.txt").unwrap();
    b.append_path_with_name(src.join("manifest.json"), "manifest.json").unwrap();
    b.finish().unwrap();
    drop(b);
    assert_refused(&site, &late, "first file must be manifest.json");

    // A truncated archive: the last file is cut short.
    let bytes = std::fs::read(&base).unwrap();
    let cut = site.dir.path().join("cut.tar");
    std::fs::write(&cut, &bytes[..bytes.len() - 150 * 1024]).unwrap();
    assert_refused(&site, &cut, "truncated");
}

#[test]
fn an_interrupted_import_leaves_nothing_visible_and_the_next_one_cleans_up() {
    let site = Site::new();
    let a = site.model("tiny-llama", &GGUF);
    assert!(site.import(&a).status.success());
    let kept = site.blobs();

    // What a kill -9 half-way leaves: a partial copy and a manifest in tmp/, and a blob moved
    // into place whose manifest never was.
    let store = site.store();
    std::fs::write(store.join("tmp").join(format!("{}.partial", "c".repeat(64))), b"half a file").unwrap();
    std::fs::write(store.join("tmp").join(format!("{}.json", "d".repeat(64))), b"{\"payload\":").unwrap();
    let orphan = sha256_hex(b"orphan");
    std::fs::write(store.join("blobs/sha256").join(&orphan), b"orphan").unwrap();

    let list = site.outpost(&["models", "list", "--json"]);
    assert!(list.status.success());
    assert_eq!(String::from_utf8_lossy(&list.stdout).lines().count(), 1, "only the complete model is listed");
    assert_eq!(ModelStore::new(site.store()).summaries().len(), 1);

    let b = site.model("minilm", &SAFETENSORS);
    assert!(site.import(&b).status.success());
    assert!(site.tmp().is_empty(), "tmp/ was emptied: {:?}", site.tmp());
    assert!(!site.blobs().contains(&orphan), "the orphan blob was removed");
    assert!(kept.iter().all(|k| site.blobs().contains(k)), "the first model's blobs are kept");
    assert!(site.outpost(&["models", "verify"]).status.success());
}

#[test]
fn an_import_killed_with_sigkill_mid_copy_leaves_nothing_visible_and_imports_again() {
    let site = Site::new();
    let dir = site.dir.path().join("src/big");
    write_model(&dir, "big", &GGUF);
    // A weight file large enough that the copy is still running when the test kills it.
    let mut weights = std::fs::read(dir.join("model.gguf")).expect("read weights");
    weights.resize(384 << 20, 7);
    std::fs::write(dir.join("model.gguf"), &weights).expect("write weights");
    drop(weights);
    sign_dir(&dir, &site.key, "big", ModelFormat::Gguf);

    let mut child = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .arg("--config")
        .arg(site.config())
        .args(["models", "import", dir.to_str().expect("utf-8 path")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn outpost models import");
    // Kill it once part of the weights has been written into tmp/.
    let started = std::time::Instant::now();
    let killed_mid_copy = loop {
        let partial: u64 = std::fs::read_dir(site.store().join("tmp"))
            .map(|d| d.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
            .unwrap_or(0);
        if partial > 1 << 20 {
            child.kill().expect("SIGKILL the import");
            break true;
        }
        if matches!(child.try_wait(), Ok(Some(_))) || started.elapsed() > std::time::Duration::from_secs(120)
        {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    child.wait().expect("reap");
    assert!(killed_mid_copy, "the import ended before it could be killed mid-copy");
    assert!(site.manifests().is_empty(), "no manifest after a killed import: {:?}", site.manifests());
    let list = site.outpost(&["models", "list", "--json"]);
    assert!(list.status.success());
    assert_eq!(String::from_utf8_lossy(&list.stdout).trim(), "", "nothing is listed");

    // The next import completes, cleans tmp/ and verifies.
    let out = site.import(&dir);
    assert!(out.status.success(), "import after the kill: {}", text(&out));
    assert!(site.tmp().is_empty(), "tmp/ was emptied: {:?}", site.tmp());
    assert_eq!(site.manifests().len(), 1);
    assert!(site.outpost(&["models", "verify"]).status.success());
}
