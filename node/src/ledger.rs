//! The job ledger: every job attempt's persisted state machine
//! (staged → running → finished → reported), the outbox (finished, not yet acknowledged), and
//! the last accepted sequence number. Each transition is one durable batch, written *before*
//! the agent tells anyone about it; this is what makes kill -9 at any point safe.

use std::sync::Arc;

use outpost_protocol::{JobSpec, ResultReport, SignedEnvelope};
use serde::{Deserialize, Serialize};

use crate::audit;
use crate::store::{Op, StateStore, StoreError, Tree};

const LAST_SEQ: &[u8] = b"last_seq";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Verified and persisted; held by the site policy until an approver at the site approves
    /// or denies it (`outpost approvals`), or its manifest expires.
    AwaitingApproval,
    /// Verified and persisted; no container started by us yet.
    Staged,
    /// The container was created; it may or may not have started (the runtime knows).
    Running,
    /// The result is persisted and waits in the outbox.
    Finished,
    /// The control plane acknowledged the result.
    Reported,
    /// The control plane refused the result for good (e.g. it does not know the job).
    Undeliverable,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub job_id: String,
    pub attempt: u32,
    pub seq: u64,
    pub state: JobState,
    /// Whether the control plane has been told we persisted this job.
    pub acked: bool,
    pub received_unix_ms: u64,
    /// The verified spec; `None` for a rejected manifest.
    pub spec: Option<JobSpec>,
    /// Kept as received, so the signature can be re-checked later.
    pub envelope: SignedEnvelope,
    pub result: Option<ResultReport>,
    /// Set for a job a local relay trigger started (no control plane involved): its result
    /// goes to the local object store instead of the control plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalOrigin>,
}

/// Where a locally triggered job came from and where its result goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalOrigin {
    pub trigger: String,
    pub event_seq: u64,
    /// The key of the local object store the result is written to, as JSON.
    pub results_key: String,
}

impl JobRecord {
    pub fn key(&self) -> Vec<u8> {
        key(&self.job_id, self.attempt)
    }

    /// The signed envelope's body as received (its signature was checked at intake); `None`
    /// for records the control plane never signed (local triggers, unreceived attempts).
    pub fn signed_body(&self) -> Option<outpost_protocol::JobEnvelope> {
        serde_json::from_str(&self.envelope.payload).ok()
    }
}

pub fn key(job_id: &str, attempt: u32) -> Vec<u8> {
    format!("{job_id}/{attempt}").into_bytes()
}

/// Counts the agent reports in its status and heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Depths {
    pub staged: u64,
    pub running: u64,
    pub outbox: u64,
    /// Jobs the site policy holds for an approver.
    #[serde(default)]
    pub awaiting_approval: u64,
}

#[derive(Clone)]
pub struct Ledger {
    store: Arc<dyn StateStore>,
    /// Serialises batches that append to the audit chain (each entry links to the last).
    audit_lock: Arc<std::sync::Mutex<()>>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ledger")
    }
}

impl Ledger {
    pub fn new(store: Arc<dyn StateStore>) -> Self {
        Self { store, audit_lock: Arc::default() }
    }

    pub fn store(&self) -> &Arc<dyn StateStore> {
        &self.store
    }

    pub fn get(&self, job_id: &str, attempt: u32) -> Result<Option<JobRecord>, StoreError> {
        self.store
            .get(Tree::Jobs, &key(job_id, attempt))?
            .map(|v| decode(&key(job_id, attempt), &v))
            .transpose()
    }

    pub fn all(&self) -> Result<Vec<JobRecord>, StoreError> {
        let mut v: Vec<JobRecord> = self
            .store
            .scan(Tree::Jobs)?
            .into_iter()
            .map(|(k, v)| decode(&k, &v))
            .collect::<Result<_, _>>()?;
        v.sort_by_key(|r| (r.seq, r.received_unix_ms));
        Ok(v)
    }

    pub fn in_state(&self, state: JobState) -> Result<Vec<JobRecord>, StoreError> {
        Ok(self.all()?.into_iter().filter(|r| r.state == state).collect())
    }

    pub fn depths(&self) -> Result<Depths, StoreError> {
        let mut d = Depths::default();
        for r in self.all()? {
            match r.state {
                JobState::Staged => d.staged += 1,
                JobState::AwaitingApproval => d.awaiting_approval += 1,
                JobState::Running => d.running += 1,
                JobState::Finished => d.outbox += 1,
                JobState::Reported | JobState::Undeliverable => {}
            }
        }
        Ok(d)
    }

    pub fn last_seq(&self) -> Result<u64, StoreError> {
        Ok(self
            .store
            .get(Tree::Meta, LAST_SEQ)?
            .and_then(|v| v.try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0))
    }

    /// Persist a newly received record; an accepted one also advances the sequence number, in
    /// the same atomic batch, so a replay can never slip in between.
    pub fn insert(
        &self,
        record: &JobRecord,
        advance_seq: bool,
        audit: Option<(&str, &str)>,
    ) -> Result<(), StoreError> {
        let mut ops = vec![Op::Put(Tree::Jobs, record.key(), encode(record))];
        if advance_seq {
            ops.push(Op::Put(Tree::Meta, LAST_SEQ.to_vec(), record.seq.to_be_bytes().to_vec()));
        }
        let _guard = self.audit_lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((action, detail)) = audit {
            ops.push(audit::entry_op(self.store.as_ref(), action, detail)?);
        }
        self.store.apply(ops)
    }

    /// Persist a changed record (state transitions, results, ack flags).
    pub fn update(&self, record: &JobRecord) -> Result<(), StoreError> {
        self.store.apply(vec![Op::Put(Tree::Jobs, record.key(), encode(record))])
    }

    /// Update a record and append an audit entry in one batch.
    /// Update a record, apply `extra` ops and append an audit entry, all in one batch.
    pub fn update_audited_with(
        &self,
        record: &JobRecord,
        action: &str,
        detail: &str,
        extra: Vec<Op>,
    ) -> Result<(), StoreError> {
        let _guard = self.audit_lock.lock().unwrap_or_else(|p| p.into_inner());
        let audit = audit::entry_op(self.store.as_ref(), action, detail)?;
        let mut ops = vec![Op::Put(Tree::Jobs, record.key(), encode(record))];
        ops.extend(extra);
        ops.push(audit);
        self.store.apply(ops)
    }

    pub fn update_audited(&self, record: &JobRecord, action: &str, detail: &str) -> Result<(), StoreError> {
        let _guard = self.audit_lock.lock().unwrap_or_else(|p| p.into_inner());
        let audit = audit::entry_op(self.store.as_ref(), action, detail)?;
        self.store.apply(vec![Op::Put(Tree::Jobs, record.key(), encode(record)), audit])
    }

    /// Mark jobs as acknowledged to the control plane.
    pub fn mark_acked(&self, ids: &[(String, u32)]) -> Result<(), StoreError> {
        let mut ops = Vec::new();
        for (job_id, attempt) in ids {
            if let Some(mut r) = self.get(job_id, *attempt)?
                && !r.acked
            {
                r.acked = true;
                ops.push(Op::Put(Tree::Jobs, r.key(), encode(&r)));
            }
        }
        if ops.is_empty() { Ok(()) } else { self.store.apply(ops) }
    }

    /// Forget the oldest settled jobs (reported or undeliverable, and acknowledged) beyond the
    /// newest `keep`, so the ledger stays bounded. Replay protection does not need them: it
    /// rests on the persisted last sequence number. Returns how many were removed.
    pub fn prune_settled(&self, keep: usize) -> Result<usize, StoreError> {
        let settled: Vec<JobRecord> = self
            .all()?
            .into_iter()
            .filter(|r| r.acked && matches!(r.state, JobState::Reported | JobState::Undeliverable))
            .collect();
        let excess = settled.len().saturating_sub(keep);
        if excess == 0 {
            return Ok(0);
        }
        let ops = settled.iter().take(excess).map(|r| Op::Delete(Tree::Jobs, r.key())).collect();
        self.store.apply(ops)?;
        Ok(excess)
    }

    /// Append an audit entry on its own.
    pub fn audit(&self, action: &str, detail: &str) -> Result<(), StoreError> {
        let _guard = self.audit_lock.lock().unwrap_or_else(|p| p.into_inner());
        let op = audit::entry_op(self.store.as_ref(), action, detail)?;
        self.store.apply(vec![op])
    }
}

pub(crate) fn encode(r: &JobRecord) -> Vec<u8> {
    // Serialising plain data with owned strings and numbers cannot fail.
    serde_json::to_vec(r).unwrap_or_default()
}

fn decode(key: &[u8], v: &[u8]) -> Result<JobRecord, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
        tree: Tree::Jobs.name(),
        key: String::from_utf8_lossy(key).into_owned(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    pub(crate) fn record(id: &str, seq: u64, state: JobState) -> JobRecord {
        JobRecord {
            job_id: id.into(),
            attempt: 1,
            seq,
            state,
            acked: false,
            received_unix_ms: seq,
            spec: None,
            envelope: SignedEnvelope { payload: "{}".into(), key_id: "k".into(), signature_hex: "00".into() },
            result: None,
            local: None,
        }
    }

    #[test]
    fn insert_advances_the_sequence_atomically_and_depths_count_states() {
        let ledger = Ledger::new(Arc::new(MemoryStore::new()));
        assert_eq!(ledger.last_seq().expect("seq"), 0);
        ledger.insert(&record("a", 3, JobState::Staged), true, None).expect("insert");
        ledger
            .insert(&record("b", 9, JobState::Finished), false, Some(("job.rejected", "why")))
            .expect("insert");
        assert_eq!(ledger.last_seq().expect("seq"), 3, "a rejected job does not move the sequence");
        let d = ledger.depths().expect("depths");
        assert_eq!((d.staged, d.running, d.outbox), (1, 0, 1));
        ledger.mark_acked(&[("a".into(), 1)]).expect("ack");
        assert!(ledger.get("a", 1).expect("get").expect("present").acked);
        assert_eq!(ledger.all().expect("all").iter().map(|r| r.seq).collect::<Vec<_>>(), vec![3, 9]);
    }

    #[test]
    fn pruning_keeps_the_newest_settled_jobs_and_everything_unsettled() {
        let ledger = Ledger::new(Arc::new(MemoryStore::new()));
        let envelope =
            SignedEnvelope { payload: String::new(), key_id: String::new(), signature_hex: String::new() };
        for seq in 1..=6u64 {
            let state = if seq == 2 { JobState::Finished } else { JobState::Reported };
            let rec = JobRecord {
                job_id: format!("j{seq}"),
                attempt: 1,
                seq,
                state,
                acked: seq != 3,
                received_unix_ms: seq,
                spec: None,
                envelope: envelope.clone(),
                result: None,
                local: None,
            };
            ledger.insert(&rec, true, None).expect("insert");
        }
        // settled and acked: j1, j4, j5, j6 -> keep the newest two
        assert_eq!(ledger.prune_settled(2).expect("prune"), 2);
        let left: Vec<String> = ledger.all().expect("all").into_iter().map(|r| r.job_id).collect();
        assert_eq!(left, ["j2", "j3", "j5", "j6"]);
        assert_eq!(ledger.last_seq().expect("seq"), 6, "replay protection is untouched");
        assert_eq!(ledger.prune_settled(2).expect("prune"), 0);
    }
}
