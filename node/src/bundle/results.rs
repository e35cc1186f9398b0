//! Results out: every result in the node's outbox (not yet acknowledged by the control plane)
//! as one file signed by the node's own key, for `outpost-control bundle import-results`. The
//! egress policy applies exactly as on the network: the results are the very reports the
//! reporter would send (bodies only where the policy and the signed job allowed them). The
//! outbox is cleared only by the control plane's acknowledgement, which comes back in a bundle.

use std::io::Write;
use std::path::Path;

use outpost_protocol::{BUNDLE_FORMAT, ResultReport, ResultsBundle, ResultsPayload};

use super::BundleError;
use crate::identity::Identity;
use crate::ledger::{JobState, Ledger};

/// What went into a results bundle.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Exported {
    pub bundle_id: String,
    pub results: Vec<String>,
    pub events: usize,
    pub service_reports: usize,
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

/// Write the outbox's results, relay events and service reports to `out` (via a temporary file
/// renamed into place).
pub fn export(
    cfg: &crate::config::Config,
    identity: &Identity,
    ledger: &Ledger,
    out: &Path,
    now: u64,
) -> Result<Exported, BundleError> {
    let store_err =
        |e: crate::store::StoreError| BundleError::Apply { part: "(outbox)".into(), reason: e.to_string() };
    let bucket = cfg.bucket_name();
    let events: Vec<outpost_protocol::ObjectEvent> =
        crate::relay::outbox_events(std::sync::Arc::clone(ledger.store()), MAX_EXPORT_EVENTS)
            .map_err(store_err)?
            .iter()
            .map(|e| e.to_wire(bucket))
            .collect();
    let service_reports = crate::services::book::ServiceBook::new(std::sync::Arc::clone(ledger.store()))
        .pending(MAX_EXPORT_SERVICE_REPORTS)
        .map_err(store_err)?;
    let mut all = pending(ledger)?;
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
    let detail = format!(
        "results bundle {} with {} result(s), {} event(s), {} service report(s) written",
        payload.bundle_id,
        payload.results.len(),
        payload.events.len(),
        payload.service_reports.len()
    );
    ledger
        .audit("bundle.results_exported", &detail)
        .map_err(|e| BundleError::Apply { part: "(audit)".into(), reason: e.to_string() })?;
    Ok(Exported {
        bundle_id: payload.bundle_id,
        results: payload.results.iter().map(|r| r.idempotency_key.clone()).collect(),
        events: payload.events.len(),
        service_reports: payload.service_reports.len(),
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
