//! The agent's side of the air-gapped uplink: every few seconds it looks in its inbox (where
//! `outpost bundle import` leaves bundles while the agent owns the ledger) and in the watched
//! directory (`[bundles] watch`, e.g. a mounted USB disk) for `*.bundle` files, and imports each
//! through the same verification and intake as everything else. An inbox file is removed once
//! handled and its outcome left for the command that brought it; a watched file is left where it
//! is (the medium may be read-only) and not tried again while it is unchanged.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Agent;
use crate::bundle::{self, apply};
use crate::clock::now_unix_ms;
use crate::models::{ModelStore, Publishers};
use crate::runtime::Runtime;

const SCAN_EVERY: Duration = Duration::from_secs(2);
/// Prefix of an inbox bundle the agent is importing.
const PROCESSING: &str = ".processing-";
/// A watched file whose import failed for a passing reason (the engine, the disk) is tried
/// again after this long.
const RETRY_AFTER: Duration = Duration::from_secs(60);

/// A watched file as seen: name, size, modification time.
type Seen = (PathBuf, u64, Option<std::time::SystemTime>);

impl<R: Runtime> Agent<R> {
    pub(super) async fn bundle_watcher(self: Arc<Self>, shutdown: CancellationToken) {
        let inbox = bundle::inbox_dir(&self.cfg);
        // A bundle taken by an agent that died before it finished goes back in the queue.
        if let Ok(entries) = std::fs::read_dir(&inbox) {
            for e in entries.filter_map(Result::ok) {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(original) = name.strip_prefix(PROCESSING) {
                    let _ = std::fs::rename(e.path(), inbox.join(original));
                }
            }
        }
        let mut seen: HashSet<Seen> = HashSet::new();
        let mut retry: std::collections::HashMap<Seen, tokio::time::Instant> =
            std::collections::HashMap::new();
        loop {
            for request in files_in(&inbox, "export") {
                let name = request.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let outcome = self.export_results(&request);
                let out = bundle::outcome_path(&self.cfg, &name);
                let v = match &outcome {
                    Ok(e) => serde_json::to_value(e).unwrap_or_default(),
                    Err(e) => serde_json::json!({ "error": e }),
                };
                if let Err(e) = write_value(&out, &v) {
                    tracing::error!(error = %e, "cannot leave the export's outcome");
                }
                let _ = std::fs::remove_file(&request);
            }
            for file in self.in_counter_order(bundles_in(&inbox)) {
                let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                // Taken: the command that left it can no longer take it back.
                let taken = inbox.join(format!("{PROCESSING}{name}"));
                if std::fs::rename(&file, &taken).is_err() {
                    continue;
                }
                let file = taken;
                let outcome = self.import_bundle(&file).await;
                let out = bundle::outcome_path(&self.cfg, &name);
                if let Err(e) = write_outcome(&out, &outcome) {
                    tracing::error!(error = %e, "cannot leave the bundle's outcome");
                }
                let _ = std::fs::remove_file(&file);
            }
            if let Some(dir) = &self.cfg.bundles.watch {
                // Only files not handled yet (nor waiting for a retry) have their manifests
                // read to order them: a disk full of imported bundles costs a stat each scan.
                let due: Vec<(PathBuf, Seen)> = bundles_in(dir)
                    .into_iter()
                    .map(|file| {
                        let meta = std::fs::metadata(&file).ok();
                        let key = (
                            file.clone(),
                            meta.as_ref().map_or(0, |m| m.len()),
                            meta.and_then(|m| m.modified().ok()),
                        );
                        (file, key)
                    })
                    .filter(|(_, key)| {
                        !seen.contains(key)
                            && retry.get(key).is_none_or(|at| tokio::time::Instant::now() >= *at)
                    })
                    .collect();
                let mut keys: std::collections::HashMap<PathBuf, Seen> = due.into_iter().collect();
                let ordered = self.in_counter_order(keys.keys().cloned().collect());
                for file in ordered {
                    let Some(key) = keys.remove(&file) else { continue };
                    match self.import_bundle(&file).await {
                        Err(e) if e.is_transient() => {
                            retry.insert(key, tokio::time::Instant::now() + RETRY_AFTER);
                        }
                        _ => {
                            retry.remove(&key);
                            seen.insert(key);
                        }
                    }
                }
                // Forget files that are gone (the disk was unplugged), bounded either way.
                seen.retain(|(p, _, _)| p.exists());
                retry.retain(|(p, _, _), _| p.exists());
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(SCAN_EVERY) => {}
            }
        }
    }

    /// Bundles in the order their counters say they were built (unreadable ones last, by
    /// name), so that an older bundle is never refused as a replay for coming second.
    fn in_counter_order(&self, files: Vec<PathBuf>) -> Vec<PathBuf> {
        let node_id = &self.identity.node.node_id;
        let org_keys = self.verifier.keys();
        let expect = crate::bundle::read::Expect {
            org_id: &self.identity.node.org_id,
            org_keys: &org_keys,
            node_id,
            now_unix_ms: 0,
        };
        let mut keyed: Vec<(u64, PathBuf)> = files
            .into_iter()
            .map(|f| {
                let counter = crate::bundle::read::manifest(&f, &expect)
                    .ok()
                    .and_then(|m| m.counters.get(node_id).copied())
                    .unwrap_or(u64::MAX);
                (counter, f)
            })
            .collect();
        keyed.sort();
        keyed.into_iter().map(|(_, f)| f).collect()
    }

    /// Writes the results bundle an `*.export` request asks for.
    fn export_results(&self, request: &Path) -> Result<bundle::results::Exported, String> {
        let text = std::fs::read_to_string(request).map_err(|e| format!("cannot read the request: {e}"))?;
        let req: bundle::ExportRequest =
            serde_json::from_str(&text).map_err(|e| format!("the request does not parse: {e}"))?;
        if !req.out.is_absolute() {
            return Err("the results bundle's path must be absolute".into());
        }
        // Signed with the identity on disk: the certificate may have been renewed since the start.
        let identity =
            crate::identity::Identity::load(&self.cfg.identity_dir()).map_err(|e| e.to_string())?;
        let exported = bundle::results::export(
            &self.cfg,
            &identity,
            &self.ledger,
            &req.out,
            now_unix_ms(),
            req.since.as_deref(),
        )
        .map_err(|e| e.to_string())?;
        tracing::info!(out = %req.out.display(), results = exported.results.len(), "results bundle written");
        Ok(exported)
    }

    async fn import_bundle(&self, file: &Path) -> Result<bundle::Outcome, bundle::BundleError> {
        let _one = self.bundle_lock.lock().await;
        let (models, publishers) = self
            .model_trust()
            .map_err(|reason| bundle::BundleError::Apply { part: "(models)".into(), reason })?;
        let node = self.apply_node(&models, &publishers);
        tracing::info!(file = %file.display(), "importing a bundle");
        let outcome = bundle::import_file(
            &node,
            &self.verifier.keys(),
            &self.identity.node.org_id,
            &bundle::staging_dir(&self.cfg),
            file,
            now_unix_ms(),
            Arc::new(|_| {}),
        )
        .await;
        if let Ok(bundle::Outcome::Imported(a)) = &outcome {
            tracing::info!(bundle = %a.bundle_id, jobs = a.jobs_accepted.len(), "bundle imported");
            self.shared.work.notify_one();
            self.shared.changed.notify_one();
            self.shared.outbox.notify_one();
            self.service_wake.notify_one();
        }
        outcome
    }
}

impl<R: Runtime> Agent<R> {
    /// Finishes a bundle import a crash interrupted (see `bundle::apply::recover`); a failure is
    /// logged and audited, and the next import tries again.
    pub(super) async fn finish_interrupted_import(&self) {
        let _one = self.bundle_lock.lock().await;
        let (models, publishers) = match self.model_trust() {
            Ok(trust) => trust,
            Err(e) => {
                tracing::error!(error = %e, "cannot check for an interrupted bundle import");
                return;
            }
        };
        let node = self.apply_node(&models, &publishers);
        match apply::recover(&node, now_unix_ms()).await {
            Ok(None) => {}
            Ok(Some(a)) => {
                tracing::info!(bundle = %a.bundle_id, "finished the bundle import a restart interrupted");
                self.service_wake.notify_one();
            }
            Err(e) => tracing::error!(error = %e, "cannot finish an interrupted bundle import"),
        }
    }

    /// The model store bundles import into, and whom it trusts to sign models.
    fn model_trust(&self) -> Result<(ModelStore, Publishers), String> {
        let publishers = Publishers::new(&self.verifier.keys(), &self.cfg.models.trusted_publishers)?;
        Ok((ModelStore::new(self.cfg.models_dir()), publishers))
    }

    fn apply_node<'a>(&'a self, models: &'a ModelStore, publishers: &'a Publishers) -> apply::Node<'a, R> {
        apply::Node {
            cfg: &self.cfg,
            policy: self.policy.get(),
            ledger: &self.ledger,
            verifier: &self.verifier,
            runtime: self.runtime.as_ref(),
            models,
            publishers,
            services: &self.services,
            node_id: &self.identity.node.node_id,
            enrolled_unix_ms: self.identity.node.enrolled_unix_ms,
        }
    }
}

/// `*.bundle` regular files of `dir`, oldest name first (none when it is absent).
fn bundles_in(dir: &Path) -> Vec<PathBuf> {
    files_in(dir, "bundle")
}

/// Regular files of `dir` with extension `ext`, by name, dot-files left out.
fn files_in(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .filter(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    files.sort();
    files
}

fn write_outcome(path: &Path, outcome: &Result<bundle::Outcome, bundle::BundleError>) -> std::io::Result<()> {
    let v = match outcome {
        Ok(o) => serde_json::to_value(o).unwrap_or_default(),
        Err(e) => serde_json::json!({ "outcome": "refused", "error": e.to_string() }),
    };
    write_value(path, &v)
}

/// Leaves `v` at `path` (via a temporary file renamed into place).
fn write_value(path: &Path, v: &serde_json::Value) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, v.to_string())?;
    std::fs::rename(tmp, path)
}
