//! Applying a verified bundle: images into the engine, models into the signed model store, jobs
//! and services into the ledger through the same intake as the network's, acknowledgements
//! against the outbox; then the bundle's counter, so the same bundle (or an older one) is never
//! applied again.
//!
//! All or nothing across a crash: before the first change the ledger gets a journal entry
//! naming the verified bundle and its staged parts (which stay until the end), and the entry
//! goes in the same write as the bundle's counter. A node killed in between finishes the
//! bundle from its staged parts ([`recover`]) before it runs any job or imports anything else,
//! so it comes back as before the import or as after it, never between. Every step is
//! idempotent (images and models by digest, jobs by id and attempt, services by seq), so
//! doing one again on recovery changes nothing.

use std::path::Path;

use outpost_protocol::{JobAssignment, PartKind, ResultsAck, SignedEnvelope};
use serde::{Deserialize, Serialize};

use super::BundleError;
use super::read::Verified;
use crate::config::Config;
use crate::intake::{Intake, take_job};
use crate::ledger::{JobState, Ledger};
use crate::models::{ModelStore, Publishers};
use crate::runtime::Runtime;
use crate::services::book::ServiceBook;
use crate::store::{Op, StateStore, StoreError, Tree};
use crate::verify::ManifestVerifier;

/// Key of the last imported bundle in the ledger's `meta` tree.
const LAST: &[u8] = b"bundle.last";
/// Key of the journal of a bundle being applied (see the module's documentation).
const APPLYING: &[u8] = b"bundle.applying";

/// A verified bundle whose parts are being applied: enough to finish it after a crash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    pub manifest: outpost_protocol::BundleManifest,
    pub counter: u64,
    /// The parts this node applies and their staged copies, in manifest order.
    pub parts: Vec<(outpost_protocol::BundlePart, std::path::PathBuf)>,
    /// How often finishing it was tried after an interruption.
    #[serde(default)]
    pub attempts: u32,
}

/// Tries to finish an interrupted import before it is given up (the engine down for good, say).
pub const MAX_RECOVERY_ATTEMPTS: u32 = 5;

/// The bundle an interrupted import was applying, if one was.
pub fn journal(store: &dyn StateStore) -> Result<Option<Journal>, StoreError> {
    store
        .get(Tree::Meta, APPLYING)?
        .map(|bytes| {
            serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                tree: "meta",
                key: "bundle.applying".into(),
                message: e.to_string(),
            })
        })
        .transpose()
}

/// Bundle ids remembered as imported (so importing one again is a no-op that says so).
const REMEMBERED: usize = 256;

/// The last bundle this node imported, and the ids of the most recent ones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastBundle {
    pub bundle_id: String,
    pub counter: u64,
    pub imported_unix_ms: u64,
    #[serde(default)]
    pub recent: Vec<String>,
}

/// The last bundle imported (counter 0: none yet).
pub fn last_bundle(store: &dyn StateStore) -> Result<LastBundle, StoreError> {
    match store.get(Tree::Meta, LAST)? {
        Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            tree: "meta",
            key: "bundle.last".into(),
            message: e.to_string(),
        }),
        None => Ok(LastBundle::default()),
    }
}

/// What an import did, part by part, for the operator.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub bundle_id: String,
    pub counter: u64,
    pub images: Vec<String>,
    pub models: Vec<String>,
    pub jobs_accepted: Vec<String>,
    pub jobs_known: Vec<String>,
    pub jobs_rejected: Vec<(String, String)>,
    /// Held by the site policy for an approver (`outpost approvals`).
    #[serde(default)]
    pub jobs_awaiting_approval: Vec<String>,
    pub services: Vec<(String, String)>,
    /// The bundle's configuration was written (it applies when the agent next starts).
    #[serde(default)]
    pub config: Option<String>,
    pub results_acknowledged: usize,
    #[serde(default)]
    pub events_acknowledged: usize,
    #[serde(default)]
    pub service_reports_acknowledged: bool,
    /// The node's audit log is stored on the control plane up to this seq (0: not told).
    #[serde(default)]
    pub audit_acknowledged_up_to: u64,
}

/// What applying needs of the node.
pub struct Node<'a, R: Runtime> {
    pub cfg: &'a Config,
    /// The site policy in force: the gate for the bundle's jobs and services.
    pub policy: std::sync::Arc<crate::policy::Policy>,
    pub ledger: &'a Ledger,
    pub verifier: &'a ManifestVerifier,
    pub runtime: &'a R,
    pub models: &'a ModelStore,
    pub publishers: &'a Publishers,
    pub services: &'a ServiceBook,
    pub node_id: &'a str,
    /// When the node enrolled: it has heard from its control plane since then at least.
    pub enrolled_unix_ms: u64,
}

/// A part read and checked before anything is applied.
enum Checked {
    Job(JobAssignment),
    Service(SignedEnvelope),
    Ack(ResultsAck),
    Config(String),
}

/// Whether the bundle holds only acknowledgements: those do not take part in the counter order
/// (an acknowledgement replayed clears nothing that was not cleared already).
pub fn ack_only(parts: &[outpost_protocol::BundlePart]) -> bool {
    !parts.is_empty() && parts.iter().all(|p| p.kind == PartKind::ResultsAck)
}

/// Apply every staged part, then record the bundle as imported. Every job, service and
/// acknowledgement part is read and its signature checked first, so a bad one fails the import
/// before anything changed; images and models go next (idempotent by digest), then the ledger.
pub async fn apply<R: Runtime>(node: &Node<'_, R>, v: &Verified, now: u64) -> Result<Applied, BundleError> {
    let mut out =
        Applied { bundle_id: v.manifest.bundle_id.clone(), counter: v.counter, ..Applied::default() };
    let mut checked = Vec::new();
    for (part, file) in &v.parts {
        let bad =
            |reason: String| BundleError::BadPart { part: format!("{} ({})", part.name, part.label), reason };
        match part.kind {
            PartKind::Image | PartKind::Model => {}
            PartKind::Config => {
                let text = std::fs::read_to_string(file)
                    .map_err(|e| bad(format!("cannot read its staged copy: {e}")))?;
                let table = crate::config::parse_bundle_config(&text).map_err(bad)?;
                // The node must still start with it, under its own files (which win).
                let env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
                crate::config::Config::load_with_bundle(node.cfg.base_file.as_deref(), &env, table)
                    .map_err(|e| bad(format!("the node's configuration would not load with it: {e}")))?;
                checked.push((part, Checked::Config(text)));
            }
            PartKind::Job => {
                let a: JobAssignment = read_json(file, part)?;
                node.verifier.verify_payload(&a.envelope).map_err(|e| bad(e.to_string()))?;
                checked.push((part, Checked::Job(a)));
            }
            PartKind::Service => {
                let env: SignedEnvelope = read_json(file, part)?;
                node.verifier.verify_payload(&env).map_err(|e| bad(e.to_string()))?;
                checked.push((part, Checked::Service(env)));
            }
            PartKind::ResultsAck => {
                let env: SignedEnvelope = read_json(file, part)?;
                let payload = node.verifier.verify_payload(&env).map_err(|e| bad(e.to_string()))?;
                let ack: ResultsAck =
                    serde_json::from_str(payload).map_err(|e| bad(format!("does not parse: {e}")))?;
                if ack.node_id != node.node_id {
                    return Err(bad(format!(
                        "the acknowledgement is for node {}, not this one",
                        ack.node_id
                    )));
                }
                checked.push((part, Checked::Ack(ack)));
            }
        }
    }
    // From here on the node changes: journal first, so a crash here is finished on restart.
    let attempts = journal(node.ledger.store().as_ref())
        .ok()
        .flatten()
        .filter(|j| j.manifest.bundle_id == v.manifest.bundle_id)
        .map_or(0, |j| j.attempts);
    let journal =
        Journal { manifest: v.manifest.clone(), counter: v.counter, parts: v.parts.clone(), attempts };
    let bytes = serde_json::to_vec(&journal).map_err(|e| BundleError::Corrupt(e.to_string()))?;
    node.ledger
        .store()
        .apply(vec![Op::Put(Tree::Meta, APPLYING.to_vec(), bytes)])
        .map_err(|e| BundleError::Apply { part: "(bundle journal)".into(), reason: e.to_string() })?;
    // Content first (idempotent by digest), so jobs never arrive before what they need.
    for (part, file) in v.parts.iter().filter(|(p, _)| p.kind == PartKind::Image) {
        let ids = node.runtime.load_image(file).await.map_err(|e| BundleError::Apply {
            part: format!("{} ({})", part.name, part.label),
            reason: format!("image not loaded: {e}"),
        })?;
        out.images.extend(ids);
    }
    for (part, file) in v.parts.iter().filter(|(p, _)| p.kind == PartKind::Model) {
        let model = import_model(node, file).map_err(|reason| BundleError::Apply {
            part: format!("{} ({})", part.name, part.label),
            reason,
        })?;
        out.models.push(model);
    }
    let store_err =
        |part: &str, e: StoreError| BundleError::Apply { part: part.to_owned(), reason: e.to_string() };
    for (part, c) in checked {
        match c {
            Checked::Job(a) => {
                match take_job(node.ledger, node.verifier, &node.policy, &a, now)
                    .map_err(|e| store_err(&part.name, e))?
                {
                    Intake::Accepted { .. } => out.jobs_accepted.push(a.job_id),
                    Intake::Known => out.jobs_known.push(a.job_id),
                    Intake::AwaitingApproval => out.jobs_awaiting_approval.push(a.job_id),
                    Intake::Rejected(why) | Intake::Refused(why) => out.jobs_rejected.push((a.job_id, why)),
                    Intake::Unusable => out.jobs_rejected.push((a.job_id, "unusable job id".into())),
                }
            }
            Checked::Service(env) => {
                let got = crate::services::receive(
                    node.services,
                    node.ledger,
                    node.verifier,
                    node.cfg,
                    &node.policy,
                    &env,
                    now,
                )
                .map_err(|e| store_err(&part.name, e))?;
                out.services.push((part.label.clone(), format!("{got:?}").to_lowercase()));
            }
            Checked::Config(text) => {
                let path = node.cfg.data_dir.join(crate::config::BUNDLE_CONFIG_FILE);
                write_durably(&path, text.as_bytes()).map_err(|e| BundleError::Apply {
                    part: part.name.clone(),
                    reason: format!("cannot write {}: {e}", path.display()),
                })?;
                out.config = Some(path.display().to_string());
            }
            Checked::Ack(ack) => {
                out.results_acknowledged += acknowledge(node, &ack).map_err(|e| store_err(&part.name, e))?;
                let store = node.ledger.store();
                if ack.events_up_to_seq > 0 {
                    out.events_acknowledged +=
                        crate::relay::outbox_mark_sent(std::sync::Arc::clone(store), ack.events_up_to_seq)
                            .map_err(|e| store_err(&part.name, e))?;
                }
                if ack.service_reports_up_to_seq > 0 {
                    node.services
                        .delivered(ack.service_reports_up_to_seq)
                        .map_err(|e| store_err(&part.name, e))?;
                    out.service_reports_acknowledged = true;
                }
                node.services.acked(&ack.service_acks).map_err(|e| store_err(&part.name, e))?;
                if ack.audit_up_to_seq > 0 {
                    super::results::audit_acknowledged(store.as_ref(), ack.audit_up_to_seq)
                        .map_err(|e| store_err(&part.name, e))?;
                    out.audit_acknowledged_up_to = out.audit_acknowledged_up_to.max(ack.audit_up_to_seq);
                }
            }
        }
    }
    let previous = last_bundle(node.ledger.store().as_ref()).map_err(|e| store_err("(bundle record)", e))?;
    let mut recent = previous.recent.clone();
    recent.push(v.manifest.bundle_id.clone());
    if recent.len() > REMEMBERED {
        recent.drain(..recent.len() - REMEMBERED);
    }
    // An acknowledgement-only bundle leaves the counter where it was.
    let last = if ack_only(&v.manifest.parts) {
        LastBundle { recent, ..previous }
    } else {
        LastBundle {
            bundle_id: v.manifest.bundle_id.clone(),
            counter: v.counter,
            imported_unix_ms: now,
            recent,
        }
    };
    let bytes = serde_json::to_vec(&last).map_err(|e| BundleError::Corrupt(e.to_string()))?;
    // The counter and the end of the journal in one write: the bundle is applied.
    node.ledger
        .store()
        .apply(vec![Op::Put(Tree::Meta, LAST.to_vec(), bytes), Op::Delete(Tree::Meta, APPLYING.to_vec())])
        .map_err(|e| store_err("(bundle record)", e))?;
    let detail = format!(
        "bundle {} (counter {}): {} image(s), {} model(s), {} job(s) accepted, {} known, {} rejected, {} service state(s), {} result(s) acknowledged{}",
        out.bundle_id,
        out.counter,
        out.images.len(),
        out.models.len(),
        out.jobs_accepted.len(),
        out.jobs_known.len(),
        out.jobs_rejected.len(),
        out.services.len(),
        out.results_acknowledged,
        if out.config.is_some() { ", configuration written (applies at the next agent start)" } else { "" }
    );
    node.ledger.audit("bundle.imported", &detail).map_err(|e| store_err("(audit)", e))?;
    Ok(out)
}

/// Finishes the bundle an interrupted import was applying, from its staged parts (each checked
/// against the signed manifest's size and digest again, in case the disk lost them). `None`:
/// nothing was interrupted. The staged parts are removed once it is applied; a damaged staged
/// copy ends the journal and says to import the bundle again (which finishes it the same way).
pub async fn recover<R: Runtime>(node: &Node<'_, R>, now: u64) -> Result<Option<Applied>, BundleError> {
    let store = node.ledger.store();
    let Some(j) = journal(store.as_ref())
        .map_err(|e| BundleError::Apply { part: "(bundle journal)".into(), reason: e.to_string() })?
    else {
        return Ok(None);
    };
    tracing::warn!(bundle = %j.manifest.bundle_id, "an import was interrupted; finishing it");
    let parts = j.parts.clone();
    let checked = tokio::task::spawn_blocking(move || {
        parts
            .iter()
            .find_map(|(part, file)| staged_copy_differs(part, file).map(|why| (part.name.clone(), why)))
    })
    .await
    .map_err(|e| BundleError::Corrupt(format!("checking the staged parts stopped: {e}")))?;
    let staging = j.parts.first().and_then(|(_, f)| f.parent().map(Path::to_path_buf));
    if let Some((part, why)) = checked {
        let reason = format!(
            "bundle {}: the staged copy of an interrupted import is unusable ({why}); import the bundle again to finish it",
            j.manifest.bundle_id
        );
        let end = store.apply(vec![Op::Delete(Tree::Meta, APPLYING.to_vec())]);
        let audit = node.ledger.audit("bundle.recovery_failed", &format!("{part}: {reason}"));
        if let Some(dir) = staging {
            let _ = std::fs::remove_dir_all(dir);
        }
        end.and(audit)
            .map_err(|e| BundleError::Apply { part: "(bundle journal)".into(), reason: e.to_string() })?;
        return Err(BundleError::Apply { part, reason });
    }
    // Counted before trying, so a crash while trying counts too.
    let attempts = j.attempts.saturating_add(1);
    let counted = Journal { attempts, ..j.clone() };
    let bytes = serde_json::to_vec(&counted).map_err(|e| BundleError::Corrupt(e.to_string()))?;
    store
        .apply(vec![Op::Put(Tree::Meta, APPLYING.to_vec(), bytes)])
        .map_err(|e| BundleError::Apply { part: "(bundle journal)".into(), reason: e.to_string() })?;
    let v = super::read::Verified { manifest: j.manifest, counter: j.counter, parts: j.parts };
    let applied = match apply(node, &v, now).await {
        Ok(a) => a,
        // One that cannot succeed (a part no longer verifies), or has failed too often (the
        // engine refuses an image), is given up, so that later bundles are not held behind it.
        Err(e) if !e.is_transient() || attempts >= MAX_RECOVERY_ATTEMPTS => {
            let detail = format!(
                "bundle {}: finishing the interrupted import failed ({e}) after {attempts} attempt(s); given up, \
                 it may be partly applied: import a new bundle",
                v.manifest.bundle_id
            );
            tracing::error!("{detail}");
            let end = store.apply(vec![Op::Delete(Tree::Meta, APPLYING.to_vec())]);
            let audit = node.ledger.audit("bundle.recovery_abandoned", &detail);
            if let Some(dir) = &staging {
                let _ = std::fs::remove_dir_all(dir);
            }
            end.and(audit)
                .map_err(|e| BundleError::Apply { part: "(bundle journal)".into(), reason: e.to_string() })?;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    crate::trust::heard(store.as_ref(), v.manifest.created_unix_ms.min(now))
        .map_err(|e| BundleError::Apply { part: "(trust)".into(), reason: e.to_string() })?;
    if let Some(dir) = staging {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(Some(applied))
}

/// Why a staged part no longer matches the manifest, if it does not.
fn staged_copy_differs(part: &outpost_protocol::BundlePart, file: &Path) -> Option<String> {
    use sha2::Digest;
    let mut f = match std::fs::File::open(file) {
        Ok(f) => f,
        Err(e) => return Some(format!("cannot open {}: {e}", file.display())),
    };
    let mut hash = sha2::Sha256::new();
    let n = match std::io::copy(&mut f, &mut hash) {
        Ok(n) => n,
        Err(e) => return Some(format!("cannot read {}: {e}", file.display())),
    };
    if n != part.size {
        return Some(format!("{n} bytes, the manifest says {}", part.size));
    }
    (hex::encode(hash.finalize()) != part.sha256).then(|| "its SHA-256 differs from the manifest".to_owned())
}

/// Writes `bytes` to `path` through a synced temporary file renamed into place.
pub(crate) fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("partial");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// A staged envelope part (at most `MAX_ENVELOPE_PART_BYTES`, as the manifest checked).
fn read_json<T: serde::de::DeserializeOwned>(
    file: &Path,
    part: &outpost_protocol::BundlePart,
) -> Result<T, BundleError> {
    let name = format!("{} ({})", part.name, part.label);
    let bytes = std::fs::read(file).map_err(|e| BundleError::BadPart {
        part: name.clone(),
        reason: format!("cannot read its staged copy: {e}"),
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| BundleError::BadPart { part: name, reason: format!("does not parse: {e}") })
}

fn import_model<R: Runtime>(node: &Node<'_, R>, file: &Path) -> Result<String, String> {
    let writer = node.models.writer().map_err(|e| e.to_string())?;
    let model = writer.import(file, node.publishers, &mut |_| {}).map_err(|e| e.to_string())?;
    Ok(format!("{}@{}", model.manifest.name, model.manifest.version))
}

/// Marks the results the control plane stored as reported, and those it refused for good as
/// undeliverable (as a 4xx answer on the network would); returns how many left the outbox.
fn acknowledge<R: Runtime>(node: &Node<'_, R>, ack: &ResultsAck) -> Result<usize, StoreError> {
    let mut cleared = 0;
    let keys = ack
        .results
        .iter()
        .map(|k| (k, JobState::Reported))
        .chain(ack.refused.iter().map(|k| (k, JobState::Undeliverable)));
    for (key, state) in keys {
        let Some((job_id, attempt)) = key.rsplit_once('/') else { continue };
        let Ok(attempt) = attempt.parse::<u32>() else { continue };
        if let Some(mut rec) = node.ledger.get(job_id, attempt)?
            && rec.state == JobState::Finished
        {
            rec.state = state;
            if state == JobState::Undeliverable {
                let detail = format!(
                    "result of job {key} refused by the control plane (results bundle {})",
                    ack.results_bundle_id
                );
                node.ledger.update_audited(&rec, "result.undeliverable", &detail)?;
            } else {
                node.ledger.update(&rec)?;
            }
            cleared += 1;
        }
    }
    Ok(cleared)
}
