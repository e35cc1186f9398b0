//! The store's layout and its read and write operations. Layout under the root:
//! `blobs/sha256/<hex>` (model files by content, shared between models),
//! `manifests/<digest>.json` (signed manifests; a model exists once its manifest does),
//! `tmp/` (files being copied), and `lock` (flock: exclusive for import and remove, shared
//! for verify; listing takes no lock, so the agent and `list` never wait).

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use outpost_protocol::{ModelManifest, ModelSummary, SignedModelManifest};

use super::copy::{Progress, copy_verified};
use super::{ModelError, Publishers, Result, is_sha256_hex, sha256_hex, verify_manifest};

/// A model whose manifest is in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstalledModel {
    /// SHA-256 of the signed payload.
    pub digest: String,
    pub manifest: ModelManifest,
    pub signed: SignedModelManifest,
}

impl InstalledModel {
    pub fn summary(&self) -> ModelSummary {
        ModelSummary {
            digest: self.digest.clone(),
            name: self.manifest.name.clone(),
            version: self.manifest.version.clone(),
            format: self.manifest.format,
            engine: self.manifest.engine.clone(),
        }
    }

    pub fn total_bytes(&self) -> u64 {
        self.manifest.files.iter().map(|f| f.size).sum()
    }
}

/// What `verify` found wrong with one file (or the manifest) of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The file's path in the model, or `manifest.json`.
    pub path: String,
    pub problem: String,
}

#[derive(Debug, Clone)]
pub struct ModelCheck {
    pub model: InstalledModel,
    pub damage: Vec<Damage>,
}

#[derive(Debug, Clone)]
pub struct ModelStore {
    root: PathBuf,
}

impl ModelStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub(crate) fn manifests_dir(&self) -> PathBuf {
        self.root.join("manifests")
    }
    pub(crate) fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }
    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }
    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.blobs_dir().join(sha256)
    }

    /// Every model, sorted by name then version. A store never written to is empty. Damaged
    /// manifests are left out (and logged); `scan` returns them too.
    pub fn list(&self) -> Result<Vec<InstalledModel>> {
        let (models, broken) = self.scan()?;
        for e in broken {
            tracing::warn!(error = %e, "skipping a stored model");
        }
        Ok(models)
    }

    /// The models whose manifests read back intact, and the errors of those that do not.
    pub fn scan(&self) -> Result<(Vec<InstalledModel>, Vec<ModelError>)> {
        let mut models = Vec::new();
        let mut broken = Vec::new();
        for path in self.manifest_paths()? {
            match read_installed(&path) {
                Ok(m) => models.push(m),
                Err(e) => broken.push(e),
            }
        }
        models.sort_by(|a, b| {
            (&a.manifest.name, &a.manifest.version, &a.digest).cmp(&(
                &b.manifest.name,
                &b.manifest.version,
                &b.digest,
            ))
        });
        Ok((models, broken))
    }

    /// For the heartbeat: what is present; damaged manifests are logged and left out.
    pub fn summaries(&self) -> Vec<ModelSummary> {
        match self.list() {
            Ok(models) => models.iter().map(InstalledModel::summary).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the model store");
                Vec::new()
            }
        }
    }

    /// Models matching `selector`: a digest, a digest prefix of at least 8 digits, NAME, or
    /// NAME@VERSION. Errors when nothing matches.
    pub fn find(&self, selector: &str) -> Result<Vec<InstalledModel>> {
        let models = self.list()?;
        let by_digest = selector.len() >= 8 && selector.bytes().all(|b| b.is_ascii_hexdigit());
        let hits: Vec<InstalledModel> = models
            .into_iter()
            .filter(|m| {
                (by_digest && m.digest.starts_with(&selector.to_ascii_lowercase()))
                    || m.manifest.name == selector
                    || format!("{}@{}", m.manifest.name, m.manifest.version) == selector
            })
            .collect();
        if hits.is_empty() {
            return Err(ModelError::NotFound { selector: selector.into() });
        }
        Ok(hits)
    }

    /// Exactly one model matching `selector`.
    pub fn find_one(&self, selector: &str) -> Result<InstalledModel> {
        let mut hits = self.find(selector)?;
        if hits.len() > 1 {
            let candidates = hits
                .iter()
                .map(|m| format!("{}@{} {}", m.manifest.name, m.manifest.version, short(&m.digest)))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(ModelError::Ambiguous { selector: selector.into(), candidates });
        }
        hits.pop().ok_or_else(|| ModelError::NotFound { selector: selector.into() })
    }

    /// Re-hash every file of `models` (all when `None`) and re-check each manifest's signature
    /// against today's trust. Holds the shared lock so no remove runs underneath.
    /// Damaged manifests come back as errors beside the checks (only when no selector).
    pub fn verify(
        &self,
        selector: Option<&str>,
        trust: &Publishers,
    ) -> Result<(Vec<ModelCheck>, Vec<ModelError>)> {
        let _lock = self.lock(FlockArg::LockShared)?;
        let (models, broken) = match selector {
            Some(s) => (self.find(s)?, Vec::new()),
            None => self.scan()?,
        };
        let mut checks = Vec::new();
        for model in models {
            let mut damage = Vec::new();
            if let Err(e) = verify_manifest(&model.signed, trust) {
                damage.push(Damage { path: super::MANIFEST_FILE.into(), problem: e.to_string() });
            }
            for f in &model.manifest.files {
                if let Some(problem) = self.check_blob(&f.sha256, f.size) {
                    damage.push(Damage { path: f.path.clone(), problem });
                }
            }
            checks.push(ModelCheck { model, damage });
        }
        Ok((checks, broken))
    }

    fn check_blob(&self, sha256: &str, size: u64) -> Option<String> {
        let path = self.blob_path(sha256);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => return Some(format!("blob {} cannot be read: {e}", path.display())),
        };
        let mut hasher = sha2::Sha256::default();
        let got = match std::io::copy(&mut file, &mut hasher) {
            Ok(n) => n,
            Err(e) => return Some(format!("blob {} cannot be read: {e}", path.display())),
        };
        let digest = hex::encode(sha2::Digest::finalize(hasher));
        if got != size {
            Some(format!("blob {} is {got} bytes, the manifest says {size}", path.display()))
        } else if digest != sha256 {
            Some(format!("blob {} hashes to {digest}: its content is damaged", path.display()))
        } else {
            None
        }
    }

    /// Take the exclusive lock for an import or a remove, then clear what an interrupted
    /// import left: everything in `tmp/` and every blob no manifest refers to.
    pub fn writer(&self) -> Result<StoreWriter<'_>> {
        for dir in [self.manifests_dir(), self.blobs_dir(), self.tmp_dir()] {
            std::fs::create_dir_all(&dir)
                .map_err(|e| ModelError::io(format!("cannot create {}", dir.display()), e))?;
        }
        let lock = self.lock(FlockArg::LockExclusive)?;
        let writer = StoreWriter { store: self, _lock: lock };
        writer.sweep()?;
        Ok(writer)
    }

    /// Blocks while another process holds a conflicting lock (an import runs for as long as
    /// its copy takes).
    fn lock(&self, arg: FlockArg) -> Result<Option<Flock<File>>> {
        let path = self.root.join("lock");
        if matches!(arg, FlockArg::LockShared) && !self.root.exists() {
            return Ok(None);
        }
        std::fs::create_dir_all(&self.root)
            .map_err(|e| ModelError::io(format!("cannot create {}", self.root.display()), e))?;
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| ModelError::io(format!("cannot open {}", path.display()), e))?;
        Flock::lock(file, arg)
            .map(Some)
            .map_err(|(_, errno)| ModelError::io(format!("cannot lock {}", path.display()), errno.into()))
    }

    fn manifest_paths(&self) -> Result<Vec<PathBuf>> {
        let dir = self.manifests_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ModelError::io(format!("cannot list {}", dir.display()), e)),
        };
        let mut paths = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| ModelError::io(format!("cannot list {}", dir.display()), e))?;
            let name = entry.file_name();
            let stem = name.to_str().and_then(|n| n.strip_suffix(".json"));
            if stem.is_some_and(is_sha256_hex) {
                paths.push(entry.path());
            }
        }
        paths.sort();
        Ok(paths)
    }
}

fn read_installed(path: &Path) -> Result<InstalledModel> {
    let damaged = |message: String| ModelError::StoreDamaged { path: path.into(), message };
    let text = std::fs::read_to_string(path).map_err(|e| damaged(e.to_string()))?;
    let signed: SignedModelManifest = serde_json::from_str(&text).map_err(|e| damaged(e.to_string()))?;
    let manifest: ModelManifest =
        serde_json::from_str(&signed.payload).map_err(|e| damaged(e.to_string()))?;
    let digest = sha256_hex(signed.payload.as_bytes());
    let named = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
    if named != digest {
        return Err(damaged(format!("its payload hashes to {digest}")));
    }
    Ok(InstalledModel { digest, manifest, signed })
}

/// The first 12 digits of a digest, for listings.
pub fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

/// Import and remove, under the store's exclusive lock.
#[derive(Debug)]
pub struct StoreWriter<'a> {
    pub(crate) store: &'a ModelStore,
    _lock: Option<Flock<File>>,
}

impl StoreWriter<'_> {
    pub fn store(&self) -> &ModelStore {
        self.store
    }

    /// Remove the model's manifest (it disappears at once), then the blobs only it used.
    pub fn remove(&self, selector: &str) -> Result<InstalledModel> {
        let model = self.store.find_one(selector)?;
        let path = self.store.manifests_dir().join(format!("{}.json", model.digest));
        std::fs::remove_file(&path)
            .map_err(|e| ModelError::io(format!("cannot remove {}", path.display()), e))?;
        sync_dir(&self.store.manifests_dir())?;
        self.collect_garbage()?;
        Ok(model)
    }

    fn sweep(&self) -> Result<()> {
        let tmp = self.store.tmp_dir();
        let entries = std::fs::read_dir(&tmp)
            .map_err(|e| ModelError::io(format!("cannot list {}", tmp.display()), e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let removed =
                if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            match removed {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "removed what an interrupted model import left")
                }
                Err(e) => return Err(ModelError::io(format!("cannot remove {}", path.display()), e)),
            }
        }
        self.collect_garbage()
    }

    /// Delete blobs no manifest refers to. A damaged manifest stops it: its blobs are unknown.
    fn collect_garbage(&self) -> Result<()> {
        let (models, broken) = self.store.scan()?;
        if let Some(e) = broken.first() {
            tracing::warn!(error = %e, "not removing unused blobs while a manifest is damaged");
            return Ok(());
        }
        let used: BTreeSet<String> =
            models.into_iter().flat_map(|m| m.manifest.files.into_iter().map(|f| f.sha256)).collect();
        let dir = self.store.blobs_dir();
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| ModelError::io(format!("cannot list {}", dir.display()), e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_str().is_some_and(|n| used.contains(n)) {
                continue;
            }
            let path = entry.path();
            std::fs::remove_file(&path)
                .map_err(|e| ModelError::io(format!("cannot remove {}", path.display()), e))?;
            tracing::debug!(blob = %path.display(), "removed a blob no model uses");
        }
        Ok(())
    }

    /// Copy one file from `src` into `tmp/`, verifying it; it stays there until `commit`.
    pub(crate) fn stage(
        &self,
        src: &mut dyn std::io::Read,
        entry: &outpost_protocol::ModelFile,
        format: outpost_protocol::ModelFormat,
        staged: &mut Staged,
        progress: &mut Progress,
        report: &mut dyn FnMut(&Progress),
    ) -> Result<()> {
        let sniff = super::copy::sniff_for(&entry.path, format);
        let tmp = copy_verified(src, entry, sniff, &self.store.tmp_dir(), progress, report)?;
        staged.files.push((tmp, entry.sha256.clone()));
        Ok(())
    }

    /// Make the model visible: the verified files move to their blob paths, then the manifest
    /// is written to `tmp/`, synced, and renamed in last. A crash before that last rename
    /// leaves only blobs no manifest names, which the next writer removes.
    pub(crate) fn commit(
        &self,
        signed: &SignedModelManifest,
        digest: &str,
        mut staged: Staged,
    ) -> Result<()> {
        for (tmp, sha256) in std::mem::take(&mut staged.files) {
            let blob = self.store.blob_path(&sha256);
            // Replacing an existing blob with verified bytes also repairs a damaged one.
            if let Err(e) = std::fs::rename(&tmp, &blob) {
                let _ = std::fs::remove_file(&tmp);
                return Err(ModelError::io(
                    format!("cannot move {} to {}", tmp.display(), blob.display()),
                    e,
                ));
            }
        }
        sync_dir(&self.store.blobs_dir())?;
        let json = serde_json::to_vec_pretty(signed)
            .map_err(|e| ModelError::InvalidManifest(format!("cannot encode the manifest: {e}")))?;
        let tmp = self.store.tmp_dir().join(format!("{digest}.json"));
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            std::io::Write::write_all(&mut f, &json)?;
            f.sync_all()
        };
        write().map_err(|e| ModelError::io(format!("cannot write {}", tmp.display()), e))?;
        let dest = self.store.manifests_dir().join(format!("{digest}.json"));
        std::fs::rename(&tmp, &dest)
            .map_err(|e| ModelError::io(format!("cannot move {} to {}", tmp.display(), dest.display()), e))?;
        sync_dir(&self.store.manifests_dir())
    }
}

/// Files of one import waiting in `tmp/`; whatever is not committed is deleted on drop, so a
/// refused import leaves nothing behind.
#[derive(Debug, Default)]
pub(crate) struct Staged {
    files: Vec<(PathBuf, String)>,
}

impl Drop for Staged {
    fn drop(&mut self) {
        for (tmp, _) in &self.files {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ModelError::io(format!("cannot sync {}", dir.display()), e))
}
