//! The node's append-only audit log: each entry carries the SHA-256 of the previous one, so
//! editing or deleting an entry breaks the chain and `verify` finds where. Entries are written
//! in the same durable batch as the state change they describe.

use crate::clock::now_unix_ms;
use crate::store::{Op, StateStore, StoreError, Tree};

/// One entry: the wire type, so the control plane checks the chain with the same code.
pub type AuditEntry = outpost_protocol::AuditRecord;

/// Build the op that appends an entry after the current last one. Callers include it in the
/// batch that makes the audited change, and only one task writes at a time per batch.
pub fn entry_op(store: &dyn StateStore, action: &str, detail: &str) -> Result<Op, StoreError> {
    let last = store.last(Tree::Audit)?.map(|(_, v)| decode(&v)).transpose()?;
    let entry = AuditEntry::following(last.as_ref(), now_unix_ms(), action, detail);
    let seq = entry.seq;
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
    outpost_protocol::check_audit_chain(0, outpost_protocol::AUDIT_GENESIS, &list)?;
    Ok(list.len())
}

/// Entries after `after_seq`, at most `max`, in order (a missing one ends the list early, and
/// the chain check on the other side says so).
pub fn entries_after(
    store: &dyn StateStore,
    after_seq: u64,
    max: usize,
) -> Result<Vec<AuditEntry>, StoreError> {
    let last = match store.last(Tree::Audit)? {
        Some((_, v)) => decode(&v)?.seq,
        None => return Ok(Vec::new()),
    };
    let mut out = Vec::new();
    for seq in after_seq.saturating_add(1)..=last {
        if out.len() >= max {
            break;
        }
        match store.get(Tree::Audit, &seq.to_be_bytes())? {
            Some(v) => out.push(decode(&v)?),
            None => break,
        }
    }
    Ok(out)
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
