//! Results out: every result, relay event, service report and audit entry in the node's outbox
//! (not yet acknowledged by the control plane) as one file signed by the node's own key, for
//! `outpost-control bundle import-results`, with the node's description (as a heartbeat) and
//! its acknowledgements of desired service states. The egress policy applies exactly as on the
//! network: the results are the very reports the reporter would send (bodies only where the
//! policy and the signed job allowed them). The outbox is cleared only by the control plane's
//! acknowledgement, which comes back in a bundle; `--since last` leaves out what an earlier
//! export carried already (for a site that sends a bundle a day and gets acknowledgements
//! back less often).

use std::io::Write;
use std::path::Path;

use outpost_protocol::{BUNDLE_FORMAT, ResultReport, ResultsBundle, ResultsPayload};

use super::BundleError;
use crate::identity::Identity;
use crate::ledger::{JobState, Ledger};
use crate::store::{Op, StateStore, StoreError, Tree};

/// `meta` key: what the exports since the last acknowledgement carried ([`ExportMark`]).
const EXPORTED: &[u8] = b"bundle.exported";
/// `meta` key: the node's audit log is stored on the control plane up to this seq.
const AUDIT_ACKED: &[u8] = b"bundle.audit_acked";

/// What the results bundles written so far carried and the control plane has not acknowledged
/// yet (so `--since last` can leave it out).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExportMark {
    /// The last results bundle written.
    pub bundle_id: String,
    pub results: Vec<String>,
    pub events_up_to_seq: u64,
    pub service_reports_up_to_seq: u64,
    pub audit_up_to_seq: u64,
}

fn meta_json<T: serde::de::DeserializeOwned + Default>(
    store: &dyn StateStore,
    key: &'static [u8],
) -> Result<T, StoreError> {
    match store.get(Tree::Meta, key)? {
        Some(b) => serde_json::from_slice(&b).map_err(|e| StoreError::Corrupt {
            tree: "meta",
            key: String::from_utf8_lossy(key).into_owned(),
            message: e.to_string(),
        }),
        None => Ok(T::default()),
    }
}

/// What earlier exports carried.
pub fn export_mark(store: &dyn StateStore) -> Result<ExportMark, StoreError> {
    meta_json(store, EXPORTED)
}

/// Up to which seq the control plane has stored the node's audit log (by a results bundle or
/// the uplink).
pub fn audit_acked(store: &dyn StateStore) -> Result<u64, StoreError> {
    meta_json(store, AUDIT_ACKED)
}

/// The control plane stored the node's audit log up to `seq`: later exports start after it.
pub fn audit_acknowledged(store: &dyn StateStore, seq: u64) -> Result<(), StoreError> {
    let before: u64 = meta_json(store, AUDIT_ACKED)?;
    if seq <= before {
        return Ok(());
    }
    store.apply(vec![Op::Put(Tree::Meta, AUDIT_ACKED.to_vec(), seq.to_string().into_bytes())])
}

/// What went into a results bundle.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Exported {
    pub bundle_id: String,
    pub results: Vec<String>,
    pub events: usize,
    pub service_reports: usize,
    #[serde(default)]
    pub audit_entries: usize,
    #[serde(default)]
    pub service_acks: usize,
    pub bytes: u64,
    /// Results left in the outbox for the next bundle (over this one's size budget).
    pub remaining: usize,
}

/// Most bytes of results (as JSON) one bundle carries, well under what the control plane
/// takes; the oldest go first and the rest wait for the next bundle.
pub const MAX_EXPORT_BYTES: usize = 128 * 1024 * 1024;

/// The results waiting in the outbox (local triggers' results stay on site).
pub fn pending(ledger: &Ledger) -> Result<Vec<ResultReport>, BundleError> {
    let records = ledger
        .in_state(JobState::Finished)
        .map_err(|e| BundleError::Apply { part: "(outbox)".into(), reason: e.to_string() })?;
    Ok(records.into_iter().filter(|r| r.local.is_none()).filter_map(|r| r.result).collect())
}

/// Most relay events and service reports one results bundle carries (each outbox is bounded
/// anyway; what does not fit goes in the next bundle).
pub const MAX_EXPORT_EVENTS: usize = 10_000;
pub const MAX_EXPORT_SERVICE_REPORTS: usize = 1_000;
pub const MAX_EXPORT_AUDIT: usize = 10_000;

/// Whether `since` (`last`, or the id of the last results bundle written) names the last export.
pub fn check_since(mark: &ExportMark, since: &str) -> Result<(), BundleError> {
    if since == "last" || (!mark.bundle_id.is_empty() && since == mark.bundle_id) {
        return Ok(());
    }
    Err(BundleError::Corrupt(if mark.bundle_id.is_empty() {
        format!(
            "--since {since}: no results bundle was written since the last acknowledgement; leave --since out"
        )
    } else {
        format!(
            "--since {since}: the last results bundle written is {}; give that id or `last`",
            mark.bundle_id
        )
    }))
}

/// Write the outbox's results, relay events, service reports and audit entries to `out` (via a
/// temporary file renamed into place); with `since` (see [`check_since`]) only what no results
/// bundle written since the last acknowledgement carried.
pub fn export(
    cfg: &crate::config::Config,
    identity: &Identity,
    ledger: &Ledger,
    out: &Path,
    now: u64,
    since: Option<&str>,
) -> Result<Exported, BundleError> {
    let store_err =
        |e: crate::store::StoreError| BundleError::Apply { part: "(outbox)".into(), reason: e.to_string() };
    let store = ledger.store();
    let before = export_mark(store.as_ref()).map_err(store_err)?;
    let skip = match since {
        Some(s) => {
            check_since(&before, s)?;
            before.clone()
        }
        None => ExportMark::default(),
    };
    let bucket = cfg.bucket_name();
    let events: Vec<outpost_protocol::ObjectEvent> =
        crate::relay::outbox_events(std::sync::Arc::clone(store), MAX_EXPORT_EVENTS)
            .map_err(store_err)?
            .iter()
            .filter(|e| e.seq > skip.events_up_to_seq)
            .map(|e| e.to_wire(bucket))
            .collect();
    let book = crate::services::book::ServiceBook::new(std::sync::Arc::clone(store));
    let service_reports: Vec<_> = book
        .pending(MAX_EXPORT_SERVICE_REPORTS)
        .map_err(store_err)?
        .into_iter()
        .filter(|r| r.seq > skip.service_reports_up_to_seq)
        .collect();
    let service_acks = book.acks().map_err(store_err)?;
    let audit_acked: u64 = meta_json(store.as_ref(), AUDIT_ACKED).map_err(store_err)?;
    let audit =
        crate::audit::entries_after(store.as_ref(), audit_acked.max(skip.audit_up_to_seq), MAX_EXPORT_AUDIT)
            .map_err(store_err)?;
    let heartbeat = crate::inventory::heartbeat(cfg, None, ledger.depths().unwrap_or_default());
    let mut all: Vec<ResultReport> =
        pending(ledger)?.into_iter().filter(|r| !skip.results.contains(&r.idempotency_key)).collect();
    all.sort_by_key(|r| r.timings.finished_unix_ms.unwrap_or(r.timings.received_unix_ms));
    let mut results = Vec::new();
    let mut size = 0usize;
    let total = all.len();
    for r in all {
        let one = serde_json::to_vec(&r).map(|v| v.len()).unwrap_or(usize::MAX);
        if !results.is_empty() && size.saturating_add(one) > MAX_EXPORT_BYTES {
            break;
        }
        size = size.saturating_add(one);
        results.push(r);
    }
    let remaining = total - results.len();
    let payload = ResultsPayload {
        format: BUNDLE_FORMAT,
        bundle_id: uuid::Uuid::new_v4().to_string(),
        node_id: identity.node.node_id.clone(),
        org_id: identity.node.org_id.clone(),
        created_unix_ms: now,
        results,
        events,
        service_reports,
        service_acks,
        heartbeat: Some(heartbeat),
        audit,
    };
    let text = serde_json::to_string(&payload).map_err(|e| BundleError::Corrupt(e.to_string()))?;
    let signature_hex = sign(&identity.key_pem, text.as_bytes())?;
    let bundle = ResultsBundle { payload: text, cert_pem: identity.cert_pem.clone(), signature_hex };
    let tmp = out.with_extension("partial");
    let io = |context: String| move |e: std::io::Error| BundleError::Io { context, source: e };
    {
        let file = std::fs::File::create(&tmp).map_err(io(format!("create {}", tmp.display())))?;
        let mut enc = zstd::stream::write::Encoder::new(file, 3).map_err(io("compress".into()))?;
        enc.include_checksum(true).map_err(io("compress".into()))?;
        serde_json::to_writer(&mut enc, &bundle).map_err(|e| BundleError::Corrupt(e.to_string()))?;
        let mut file = enc.finish().map_err(io(format!("write {}", tmp.display())))?;
        file.flush().map_err(io(format!("write {}", tmp.display())))?;
        file.sync_all().map_err(io(format!("sync {}", tmp.display())))?;
    }
    std::fs::rename(&tmp, out).map_err(io(format!("rename {} to {}", tmp.display(), out.display())))?;
    let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    // What the exports carried, for `--since last`: only what is still in the outbox, and
    // everything this one carried.
    let still: std::collections::HashSet<String> =
        pending(ledger)?.into_iter().map(|r| r.idempotency_key).collect();
    let mut carried: Vec<String> = before.results.into_iter().filter(|k| still.contains(k)).collect();
    carried.extend(payload.results.iter().map(|r| r.idempotency_key.clone()));
    carried.sort();
    carried.dedup();
    let mark = ExportMark {
        bundle_id: payload.bundle_id.clone(),
        results: carried,
        events_up_to_seq: payload
            .events
            .iter()
            .map(|e| e.seq)
            .max()
            .unwrap_or(0)
            .max(before.events_up_to_seq),
        service_reports_up_to_seq: payload
            .service_reports
            .iter()
            .map(|r| r.seq)
            .max()
            .unwrap_or(0)
            .max(before.service_reports_up_to_seq),
        audit_up_to_seq: payload.audit.last().map_or(0, |e| e.seq).max(before.audit_up_to_seq),
    };
    let bytes_mark = serde_json::to_vec(&mark).map_err(|e| BundleError::Corrupt(e.to_string()))?;
    store.apply(vec![Op::Put(Tree::Meta, EXPORTED.to_vec(), bytes_mark)]).map_err(store_err)?;
    let detail = format!(
        "results bundle {} with {} result(s), {} event(s), {} service report(s), {} audit entr(ies) written{}",
        payload.bundle_id,
        payload.results.len(),
        payload.events.len(),
        payload.service_reports.len(),
        payload.audit.len(),
        if since.is_some() { " (since the last export)" } else { "" }
    );
    ledger
        .audit("bundle.results_exported", &detail)
        .map_err(|e| BundleError::Apply { part: "(audit)".into(), reason: e.to_string() })?;
    Ok(Exported {
        bundle_id: payload.bundle_id,
        results: payload.results.iter().map(|r| r.idempotency_key.clone()).collect(),
        events: payload.events.len(),
        service_reports: payload.service_reports.len(),
        audit_entries: payload.audit.len(),
        service_acks: payload.service_acks.len(),
        bytes,
        remaining,
    })
}

/// ECDSA P-256 / SHA-256 (ASN.1 DER) with the node's key (PKCS#8 PEM), hex.
fn sign(key_pem: &str, msg: &[u8]) -> Result<String, BundleError> {
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
    let der =
        crate::tls::key_from_pem(key_pem, "node key").map_err(|e| BundleError::Signature(e.to_string()))?;
    let rng = ring::rand::SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der.secret_der(), &rng)
        .map_err(|e| BundleError::Signature(format!("the node key is not a P-256 PKCS#8 key: {e}")))?;
    let sig = key.sign(&rng, msg).map_err(|e| BundleError::Signature(format!("cannot sign: {e}")))?;
    Ok(hex::encode(sig.as_ref()))
}
