//! The node's append-only audit log: each entry carries the SHA-256 of the previous one, so
//! editing or deleting an entry breaks the chain and `verify` finds where. Entries are written
//! in the same durable batch as the state change they describe.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::clock::now_unix_ms;
use crate::store::{Op, StateStore, StoreError, Tree};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub unix_ms: u64,
    pub action: String,
    pub detail: String,
    /// Hash of the previous entry (64 zeros for the first).
    pub prev_sha256: String,
    /// Hash of this entry's other fields.
    pub sha256: String,
}

fn digest(seq: u64, unix_ms: u64, action: &str, detail: &str, prev: &str) -> String {
    let mut h = Sha256::new();
    for part in [seq.to_string().as_str(), unix_ms.to_string().as_str(), action, detail, prev] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Build the op that appends an entry after the current last one. Callers include it in the
/// batch that makes the audited change, and only one task writes at a time per batch.
pub fn entry_op(store: &dyn StateStore, action: &str, detail: &str) -> Result<Op, StoreError> {
    let (seq, prev) = match store.last(Tree::Audit)? {
        Some((_, v)) => {
            let last: AuditEntry = decode(&v)?;
            (last.seq + 1, last.sha256)
        }
        None => (1, "0".repeat(64)),
    };
    let unix_ms = now_unix_ms();
    let entry = AuditEntry {
        seq,
        unix_ms,
        action: action.into(),
        detail: detail.into(),
        sha256: digest(seq, unix_ms, action, detail, &prev),
        prev_sha256: prev,
    };
    tracing::info!(target: "audit", seq, action, detail, "audit");
    Ok(Op::Put(Tree::Audit, seq.to_be_bytes().to_vec(), serde_json::to_vec(&entry).unwrap_or_default()))
}

fn decode(v: &[u8]) -> Result<AuditEntry, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
        tree: "audit",
        key: "?".into(),
        message: e.to_string(),
    })
}

pub fn entries(store: &dyn StateStore) -> Result<Vec<AuditEntry>, StoreError> {
    store.scan(Tree::Audit)?.into_iter().map(|(_, v)| decode(&v)).collect()
}

/// Check the whole chain; `Err` names the first entry that does not fit.
pub fn verify(store: &dyn StateStore) -> Result<usize, String> {
    let list = entries(store).map_err(|e| e.to_string())?;
    let mut prev = "0".repeat(64);
    for (i, e) in list.iter().enumerate() {
        if e.seq != i as u64 + 1 {
            return Err(format!("audit entry {} is missing (found seq {} in its place)", i + 1, e.seq));
        }
        if e.prev_sha256 != prev {
            return Err(format!("audit entry {} does not follow entry {}: the chain was edited", e.seq, i));
        }
        if digest(e.seq, e.unix_ms, &e.action, &e.detail, &e.prev_sha256) != e.sha256 {
            return Err(format!("audit entry {} was modified after it was written", e.seq));
        }
        prev = e.sha256.clone();
    }
    Ok(list.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    #[test]
    fn a_tampered_entry_breaks_the_chain() {
        let store = MemoryStore::new();
        for i in 0..3 {
            let op = entry_op(&store, "job.rejected", &format!("detail {i}")).expect("op");
            store.apply(vec![op]).expect("apply");
        }
        assert_eq!(verify(&store), Ok(3));
        let mut second = entries(&store).expect("entries")[1].clone();
        second.detail = "nothing happened".into();
        store
            .apply(vec![Op::Put(
                Tree::Audit,
                2u64.to_be_bytes().to_vec(),
                serde_json::to_vec(&second).expect("ser"),
            )])
            .expect("apply");
        let err = verify(&store).expect_err("tampering must be found");
        assert!(err.contains("entry 2"), "{err}");
    }
}
