//! A node's audit log as it travels: each entry carries the SHA-256 of the one before it, so an
//! entry edited, removed or moved breaks the chain wherever it is checked (on the node, and on
//! the control plane that keeps a copy).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `prev_sha256` of the first entry.
pub const AUDIT_GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One entry of a node's hash-chained audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// 1 for the first entry, then one more for each.
    pub seq: u64,
    pub unix_ms: u64,
    pub action: String,
    pub detail: String,
    /// `sha256` of the entry before ([`AUDIT_GENESIS`] for the first).
    pub prev_sha256: String,
    /// [`AuditRecord::digest`] of this entry's other fields.
    pub sha256: String,
}

impl AuditRecord {
    /// SHA-256 over the length-prefixed seq, time, action, detail and previous hash.
    pub fn digest(seq: u64, unix_ms: u64, action: &str, detail: &str, prev_sha256: &str) -> String {
        let mut h = Sha256::new();
        for part in [seq.to_string().as_str(), unix_ms.to_string().as_str(), action, detail, prev_sha256] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        hex::encode(h.finalize())
    }

    /// The entry that follows `prev` (`None`: the first of a log).
    pub fn following(prev: Option<&AuditRecord>, unix_ms: u64, action: &str, detail: &str) -> Self {
        let (prev_seq, prev_sha256) = prev.map_or((0, AUDIT_GENESIS), |p| (p.seq, p.sha256.as_str()));
        let seq = prev_seq + 1;
        Self {
            seq,
            unix_ms,
            action: action.to_owned(),
            detail: detail.to_owned(),
            sha256: Self::digest(seq, unix_ms, action, detail, prev_sha256),
            prev_sha256: prev_sha256.to_owned(),
        }
    }
}

/// Operator: a page of a node's audit log, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NodeAuditList {
    pub node_id: String,
    pub entries: Vec<AuditRecord>,
}

/// Checks that `entries` continue the chain after the entry `prev_seq` whose hash is
/// `prev_sha256` (`0` and [`AUDIT_GENESIS`] for a chain from its start), each following the
/// one before; `Err` names the first entry that does not fit and why.
pub fn check_audit_chain(prev_seq: u64, prev_sha256: &str, entries: &[AuditRecord]) -> Result<(), String> {
    let (mut seq, mut prev) = (prev_seq, prev_sha256.to_owned());
    for e in entries {
        if e.seq != seq + 1 {
            return Err(format!("audit entry {} is missing (found seq {} in its place)", seq + 1, e.seq));
        }
        if e.prev_sha256 != prev {
            return Err(format!("audit entry {} does not follow entry {seq}: the chain was edited", e.seq));
        }
        if AuditRecord::digest(e.seq, e.unix_ms, &e.action, &e.detail, &e.prev_sha256) != e.sha256 {
            return Err(format!("audit entry {} was modified after it was written", e.seq));
        }
        seq = e.seq;
        prev = e.sha256.clone();
    }
    Ok(())
}

/// Most audit entries one uplink batch carries.
pub const MAX_AUDIT_BATCH: usize = 500;

/// The next entries of a node's audit log, oldest first, sent over the uplink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AuditBatch {
    /// At most [`MAX_AUDIT_BATCH`] (500).
    #[cfg_attr(feature = "openapi", schema(max_items = 500))]
    pub entries: Vec<AuditRecord>,
}

/// What the control plane did with an [`AuditBatch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AuditAck {
    /// Entries stored now.
    pub stored: u32,
    /// The node's log is stored whole, from its first entry, up to this seq: send after it.
    pub up_to_seq: u64,
    /// Why nothing was stored: the entries do not continue the stored chain (edited, missing,
    /// reordered). The node keeps them and the refusal is in the control plane's audit trail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// Verifies an audit log read a page at a time from its first entry: each page must continue
/// exactly where the pages before it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditWalk {
    seq: u64,
    sha256: String,
}

impl Default for AuditWalk {
    fn default() -> Self {
        Self { seq: 0, sha256: AUDIT_GENESIS.to_owned() }
    }
}

impl AuditWalk {
    pub fn new() -> Self {
        Self::default()
    }

    /// The seq of the last entry verified (0 before the first): where the next page starts.
    pub fn verified(&self) -> u64 {
        self.seq
    }

    /// Checks the next page. `Ok(false)` for an empty page (the log ends); `Err` says which
    /// entry breaks the chain and why, and the walk stays at the last entry that fitted.
    pub fn step(&mut self, page: &[AuditRecord]) -> Result<bool, String> {
        let Some(last) = page.last() else { return Ok(false) };
        check_audit_chain(self.seq, &self.sha256, page)?;
        self.seq = last.seq;
        self.sha256.clone_from(&last.sha256);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walk_in_pages_checks_what_one_check_does() {
        let c = chain(7);
        let mut walk = AuditWalk::new();
        for page in c.chunks(3) {
            assert_eq!(walk.step(page), Ok(true));
        }
        assert_eq!((walk.step(&[]), walk.verified()), (Ok(false), 7));
        let mut walk = AuditWalk::new();
        assert_eq!(walk.step(&c[..3]), Ok(true));
        let err = walk.step(&c[4..]).expect_err("entry 4 left out between pages");
        assert!(err.contains("entry 4 is missing"), "{err}");
        assert_eq!(walk.verified(), 3, "the walk stays at the last entry that fitted");
    }

    fn chain(n: u64) -> Vec<AuditRecord> {
        let mut out: Vec<AuditRecord> = Vec::new();
        for i in 0..n {
            out.push(AuditRecord::following(out.last(), 1000 + i, "job.accepted", &format!("job {i}")));
        }
        out
    }

    #[test]
    fn a_whole_chain_checks_and_so_does_its_tail() {
        let c = chain(5);
        assert_eq!(check_audit_chain(0, AUDIT_GENESIS, &c), Ok(()));
        assert_eq!(check_audit_chain(2, &c[1].sha256, &c[2..]), Ok(()));
    }

    #[test]
    fn edited_removed_and_reordered_entries_are_found() {
        let c = chain(5);
        let mut edited = c.clone();
        edited[2].detail = "nothing happened".into();
        let err = check_audit_chain(0, AUDIT_GENESIS, &edited).expect_err("edited");
        assert!(err.contains("entry 3 was modified"), "{err}");
        let mut removed = c.clone();
        removed.remove(1);
        let err = check_audit_chain(0, AUDIT_GENESIS, &removed).expect_err("removed");
        assert!(err.contains("entry 2 is missing"), "{err}");
        let mut reordered = c.clone();
        reordered.swap(1, 2);
        assert!(check_audit_chain(0, AUDIT_GENESIS, &reordered).is_err());
        // A tail that does not follow what the checker holds.
        let err = check_audit_chain(2, &c[0].sha256, &c[2..]).expect_err("wrong link");
        assert!(err.contains("does not follow entry 2"), "{err}");
    }
}
