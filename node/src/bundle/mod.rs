//! Air-gapped bundles (the node's side): `outpost bundle inspect|import|export-results`, and the
//! agent's watched directory. A bundle is just another uplink: the jobs and services inside are
//! verified and persisted by the same code as those that arrive over the network, and the
//! results a node carries out are the ones its outbox holds for the network.
//!
//! Import verifies before it changes anything: the whole file is verified and its parts
//! staged ([`read::verify_and_stage`]), then every job, service and acknowledgement part is
//! read and its signature checked, and only then are images loaded, models imported and the
//! ledger changed; the bundle's counter is recorded last. A refusal before that point changes
//! nothing (but the audit log). From the first change on, a journal in the ledger names the
//! bundle and its staged parts: a crash (or an engine failure) midway is finished from them on
//! the next start, or by the next import, before anything else ([`apply::recover`]).

pub mod apply;
pub mod read;
pub mod results;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use crate::config::Config;

/// `data_dir/bundles/staging`: where parts wait until the whole bundle verified.
pub fn staging_dir(cfg: &Config) -> PathBuf {
    cfg.data_dir.join("bundles").join("staging")
}

/// `data_dir/bundles/inbox`: bundles `outpost bundle import` hands to the running agent.
pub fn inbox_dir(cfg: &Config) -> PathBuf {
    cfg.data_dir.join("bundles").join("inbox")
}

/// Where the agent leaves the outcome of an inbox bundle for the command that handed it over.
pub fn outcome_path(cfg: &Config, name: &str) -> PathBuf {
    cfg.data_dir.join("bundles").join("outcomes").join(format!("{name}.json"))
}

/// Why a bundle was refused or could not be applied. Nothing was changed on the node.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("not a readable bundle: {0}")]
    Corrupt(String),
    #[error("the manifest's signature does not verify: {0}")]
    Signature(String),
    #[error("wrong target: {0}")]
    WrongTarget(String),
    #[error("the bundle expired at {expires_unix_ms} (Unix ms); ask for a new one")]
    Expired { expires_unix_ms: u64 },
    #[error("{0}")]
    Trust(String),
    #[error(
        "replayed or older bundle: its counter {counter} is not above {last}, the last this node imported"
    )]
    Replayed { counter: u64, last: u64 },
    #[error("truncated: {0}")]
    Truncated(String),
    #[error("member {member}: {reason}")]
    BadMember { member: String, reason: String },
    #[error("part {part} ({label}): its SHA-256 differs from the signed manifest (damaged or altered)")]
    Digest { part: String, label: String },
    #[error("not enough free space in {dir}: {needed} bytes needed, {available} available")]
    NoSpace { dir: String, needed: u64, available: u64 },
    /// A part that verified against the manifest but cannot be used (checked before anything
    /// is applied).
    #[error("part {part}: {reason}")]
    BadPart { part: String, reason: String },
    /// Applying failed midway: the journal finishes it on the next start or import.
    #[error("part {part}: {reason}")]
    Apply { part: String, reason: String },
}

impl BundleError {
    /// Whether the node is exactly as before (else: partly applied, import again to finish).
    pub fn changed_nothing(&self) -> bool {
        !matches!(self, BundleError::Apply { .. })
    }

    /// Whether trying the same file again later may succeed (the engine, the disk, the ledger).
    pub fn is_transient(&self) -> bool {
        matches!(self, BundleError::Io { .. } | BundleError::NoSpace { .. } | BundleError::Apply { .. })
    }
}

/// Staging needs the parts' size plus a margin, on the filesystem that holds `dir` (or its
/// nearest existing parent).
pub fn check_free_space(dir: &Path, needed: u64) -> Result<(), BundleError> {
    let mut probe = dir;
    while !probe.exists() {
        match probe.parent() {
            Some(p) => probe = p,
            None => break,
        }
    }
    let stat = nix::sys::statvfs::statvfs(probe).map_err(|e| BundleError::Io {
        context: format!("free space of {}", probe.display()),
        source: std::io::Error::from(e),
    })?;
    let available = (stat.blocks_available() as u64).saturating_mul(stat.fragment_size() as u64);
    let wanted = needed.saturating_add(needed / 20).saturating_add(16 * 1024 * 1024);
    if wanted > available {
        return Err(BundleError::NoSpace { dir: probe.display().to_string(), needed: wanted, available });
    }
    Ok(())
}

/// What `outpost bundle export-results` asks the running agent to do (a `*.export` file in
/// its inbox).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    /// Absolute path of the results bundle to write.
    pub out: PathBuf,
    /// Only what no earlier export carried (`last`, or the last export's id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}

/// Told the bytes verified so far.
pub type Progress = std::sync::Arc<dyn Fn(u64) + Send + Sync>;

/// What importing a bundle did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Imported(Box<apply::Applied>),
    /// The last bundle imported is this one: nothing to do.
    AlreadyImported {
        bundle_id: String,
        counter: u64,
    },
}

/// Verify `file` completely, stage its parts under `staging_root`, apply them and record it;
/// or change nothing and say why (audited). The staging directory is removed either way.
pub async fn import_file<R: crate::runtime::Runtime>(
    node: &apply::Node<'_, R>,
    org_keys: &[outpost_protocol::PublicKey],
    org_id: &str,
    staging_root: &Path,
    file: &Path,
    now: u64,
    progress: Progress,
) -> Result<Outcome, BundleError> {
    let result = import_inner(node, org_keys, org_id, staging_root, file, now, progress).await;
    match &result {
        Ok(Outcome::Imported(_)) => {}
        Ok(Outcome::AlreadyImported { bundle_id, .. }) => {
            tracing::info!(bundle = %bundle_id, file = %file.display(), "bundle already imported; nothing to do");
        }
        Err(e) => {
            let detail = format!("{}: {e}", file.display());
            tracing::warn!("bundle refused: {detail}");
            if let Err(e) = node.ledger.audit("bundle.refused", &detail) {
                tracing::error!(error = %e, "cannot write the audit log");
            }
        }
    }
    result
}

async fn import_inner<R: crate::runtime::Runtime>(
    node: &apply::Node<'_, R>,
    org_keys: &[outpost_protocol::PublicKey],
    org_id: &str,
    staging_root: &Path,
    file: &Path,
    now: u64,
    progress: Progress,
) -> Result<Outcome, BundleError> {
    let store_err =
        |e: crate::store::StoreError| BundleError::Apply { part: "(ledger)".into(), reason: e.to_string() };
    // An import that was interrupted is finished first: it came before this one.
    if let Some(applied) = apply::recover(node, now).await? {
        tracing::info!(bundle = %applied.bundle_id, "the interrupted import is finished");
    }
    let last = apply::last_bundle(node.ledger.store().as_ref()).map_err(store_err)?;
    let expect = read::Expect { org_id, org_keys, node_id: node.node_id, now_unix_ms: now };
    let manifest = read::manifest(file, &expect)?;
    if manifest.bundle_id == last.bundle_id || last.recent.contains(&manifest.bundle_id) {
        let counter = manifest.counters.get(node.node_id).copied().unwrap_or_default();
        return Ok(Outcome::AlreadyImported { bundle_id: manifest.bundle_id, counter });
    }
    let heard =
        crate::trust::last_heard(node.ledger.store().as_ref(), node.enrolled_unix_ms).map_err(store_err)?;
    crate::trust::check(heard, node.cfg.trust_window(), manifest.created_unix_ms, now)
        .map_err(BundleError::Trust)?;
    if !manifest.bundle_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        || manifest.bundle_id.is_empty()
    {
        return Err(BundleError::Corrupt("the bundle id is not a plain name".into()));
    }
    // One import at a time owns the ledger: whatever an interrupted one left staged goes.
    let _ = std::fs::remove_dir_all(staging_root);
    let staging = staging_root.join(&manifest.bundle_id);
    // Reading and hashing gigabytes is blocking work: off the async thread.
    let verified = {
        let (file, staging, org_id, org_keys, node_id) = (
            file.to_path_buf(),
            staging.clone(),
            org_id.to_owned(),
            org_keys.to_vec(),
            node.node_id.to_owned(),
        );
        let last = last.counter;
        tokio::task::spawn_blocking(move || {
            let expect =
                read::Expect { org_id: &org_id, org_keys: &org_keys, node_id: &node_id, now_unix_ms: now };
            read::verify_and_stage(&file, &expect, last, Some(&staging), &*progress)
        })
        .await
        .map_err(|e| BundleError::Corrupt(format!("verification stopped: {e}")))?
    };
    let result = match verified {
        Ok(v) => apply::apply(node, &v, now).await.map(|a| Outcome::Imported(Box::new(a))),
        Err(e) => Err(e),
    };
    if result.is_ok() {
        // A bundle is word from the control plane, as of when it was signed.
        crate::trust::heard(node.ledger.store().as_ref(), manifest.created_unix_ms.min(now))
            .map_err(store_err)?;
    }
    // A bundle applied partly keeps its staged parts: its journal finishes it from them.
    if !matches!(result, Err(BundleError::Apply { .. })) {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}
