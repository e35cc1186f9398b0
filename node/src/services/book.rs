//! The node's persisted view of its services: the signed desired state of each one (what the
//! reconciler converges to, online or not), the last revision that was healthy here, and the
//! outbox of status reports (ordered, persisted until the control plane acknowledges them).

use std::sync::{Arc, Mutex};

use outpost_protocol::{ServiceEnvelope, ServiceReport, ServiceSpec, ServiceState, SignedEnvelope};
use serde::{Deserialize, Serialize};

use crate::store::{Op, StateStore, StoreError, Tree};

const REPORT_SEQ: &[u8] = b"service_report_seq";
/// Reports kept while the control plane is unreachable. They are snapshots of state: when the
/// outbox is full the oldest snapshot goes (the newest state of every service is always kept).
pub const MAX_PENDING_REPORTS: usize = 1000;

/// A desired state as received: the signed bytes and what they say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Desired {
    pub envelope: SignedEnvelope,
    pub body: ServiceEnvelope,
}

/// A revision that was healthy on this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthyRevision {
    pub deployment: String,
    pub revision: u64,
    pub spec: ServiceSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub service: String,
    /// The desired state in force; `None` when the only one received was refused.
    pub desired: Option<Desired>,
    /// The highest envelope seq seen, accepted or refused: anything at or below is a replay.
    pub last_seq: u64,
    /// The seq to acknowledge on the next poll.
    pub ack_seq: Option<u64>,
    pub last_healthy: Option<HealthyRevision>,
    /// A desired revision that failed its health gate here: the node runs `last_healthy`
    /// instead until a newer desired state arrives.
    pub rolled_back_from: Option<u64>,
}

/// What the reconciler should run for a service.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub deployment: String,
    pub revision: u64,
    pub spec: ServiceSpec,
}

impl ServiceRecord {
    pub fn empty(service: &str) -> Self {
        Self {
            service: service.to_owned(),
            desired: None,
            last_seq: 0,
            ack_seq: None,
            last_healthy: None,
            rolled_back_from: None,
        }
    }

    pub fn target(&self) -> Option<Target> {
        let d = self.desired.as_ref()?;
        let spec = d.body.spec.as_ref()?;
        if self.rolled_back_from == Some(d.body.revision) {
            return self.last_healthy.as_ref().map(|h| Target {
                deployment: h.deployment.clone(),
                revision: h.revision,
                spec: h.spec.clone(),
            });
        }
        Some(Target { deployment: d.body.deployment.clone(), revision: d.body.revision, spec: spec.clone() })
    }
}

/// A report before it gets its seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draft {
    pub service: String,
    pub deployment: String,
    pub revision: u64,
    pub state: ServiceState,
    pub restarts: u32,
    pub last_exit: Option<i64>,
    pub health_output: String,
    pub message: Option<String>,
}

#[derive(Clone)]
pub struct ServiceBook {
    store: Arc<dyn StateStore>,
    /// Serialises every read-modify-write of a record and report numbering: the poller and the
    /// reconciler both change records, and neither may write back a stale copy.
    lock: Arc<Mutex<()>>,
}

impl std::fmt::Debug for ServiceBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServiceBook")
    }
}

fn corrupt(tree: Tree, key: &[u8], e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        tree: tree.name(),
        key: String::from_utf8_lossy(key).into_owned(),
        message: e.to_string(),
    }
}

impl ServiceBook {
    pub fn new(store: Arc<dyn StateStore>) -> Self {
        Self { store, lock: Arc::default() }
    }

    pub fn all(&self) -> Result<Vec<ServiceRecord>, StoreError> {
        self.store
            .scan(Tree::Services)?
            .into_iter()
            .map(|(k, v)| serde_json::from_slice(&v).map_err(|e| corrupt(Tree::Services, &k, e)))
            .collect()
    }

    pub fn get(&self, service: &str) -> Result<Option<ServiceRecord>, StoreError> {
        self.store
            .get(Tree::Services, service.as_bytes())?
            .map(|v| serde_json::from_slice(&v).map_err(|e| corrupt(Tree::Services, service.as_bytes(), e)))
            .transpose()
    }

    /// Changes one record under the book's lock: `change` gets the stored record (a new empty
    /// one when there is none) and says whether to write it; `report`, when given, is appended
    /// in the same durable batch, only when the record is written.
    pub fn update(
        &self,
        service: &str,
        change: impl FnOnce(&mut ServiceRecord) -> bool,
        report: Option<(Draft, u64)>,
    ) -> Result<Option<ServiceReport>, StoreError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut rec = self.get(service)?.unwrap_or_else(|| ServiceRecord::empty(service));
        if !change(&mut rec) {
            return Ok(None);
        }
        let mut ops = vec![Op::Put(Tree::Services, rec.service.as_bytes().to_vec(), encode(&rec))];
        let written = match report {
            Some((draft, now_ms)) => {
                let (report, report_ops) = self.report_ops(draft, now_ms)?;
                ops.extend(report_ops);
                Some(report)
            }
            None => None,
        };
        self.store.apply(ops)?;
        Ok(written)
    }

    /// The acknowledgements to send with the next poll.
    pub fn acks(&self) -> Result<Vec<outpost_protocol::ServiceAck>, StoreError> {
        Ok(self
            .all()?
            .into_iter()
            .filter_map(|r| r.ack_seq.map(|seq| outpost_protocol::ServiceAck { service: r.service, seq }))
            .collect())
    }

    /// After a poll carried these acknowledgements: clear them (unless a newer one arrived).
    pub fn acked(&self, acks: &[outpost_protocol::ServiceAck]) -> Result<(), StoreError> {
        for a in acks {
            self.update(
                &a.service,
                |r| {
                    let mine = r.ack_seq == Some(a.seq);
                    if mine {
                        r.ack_seq = None;
                    }
                    mine
                },
                None,
            )?;
        }
        Ok(())
    }

    /// Appends a report with the next seq.
    pub fn report(&self, d: Draft, now_ms: u64) -> Result<ServiceReport, StoreError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let (report, ops) = self.report_ops(d, now_ms)?;
        self.store.apply(ops)?;
        Ok(report)
    }

    /// The ops that append a report (caller holds the lock). When the outbox is full, the
    /// oldest report that a newer one of the same service supersedes goes first, so the newest
    /// state of every service is kept; only when every report is a service's newest does the
    /// oldest go.
    fn report_ops(&self, d: Draft, now_ms: u64) -> Result<(ServiceReport, Vec<Op>), StoreError> {
        let seq = self
            .store
            .get(Tree::Meta, REPORT_SEQ)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(0, u64::from_be_bytes)
            + 1;
        let mut health_output = d.health_output;
        if health_output.len() > outpost_protocol::MAX_HEALTH_OUTPUT_BYTES {
            let mut cut = health_output.len() - outpost_protocol::MAX_HEALTH_OUTPUT_BYTES;
            while !health_output.is_char_boundary(cut) {
                cut += 1;
            }
            health_output.drain(..cut);
        }
        let report = ServiceReport {
            seq,
            service: d.service,
            deployment: d.deployment,
            revision: d.revision,
            state: d.state,
            restarts: d.restarts,
            last_exit: d.last_exit,
            health_output,
            message: d.message,
            unix_ms: now_ms,
        };
        let mut ops = vec![
            Op::Put(Tree::Meta, REPORT_SEQ.to_vec(), seq.to_be_bytes().to_vec()),
            Op::Put(
                Tree::ServiceReports,
                seq.to_be_bytes().to_vec(),
                serde_json::to_vec(&report).unwrap_or_default(),
            ),
        ];
        let pending = self.store.scan(Tree::ServiceReports)?;
        if pending.len() >= MAX_PENDING_REPORTS {
            let services: Vec<String> = pending
                .iter()
                .map(|(_, v)| {
                    serde_json::from_slice::<ServiceReport>(v).map(|r| r.service).unwrap_or_default()
                })
                .collect();
            let superseded = (0..pending.len()).find(|&i| {
                services[i] == report.service || services[i + 1..].iter().any(|s| *s == services[i])
            });
            let victim = superseded.unwrap_or(0);
            ops.push(Op::Delete(Tree::ServiceReports, pending[victim].0.clone()));
            tracing::warn!("service report outbox full: an older state snapshot was dropped");
        }
        Ok((report, ops))
    }

    /// The oldest `max` unacknowledged reports.
    pub fn pending(&self, max: usize) -> Result<Vec<ServiceReport>, StoreError> {
        self.store
            .scan(Tree::ServiceReports)?
            .into_iter()
            .take(max)
            .map(|(k, v)| serde_json::from_slice(&v).map_err(|e| corrupt(Tree::ServiceReports, &k, e)))
            .collect()
    }

    /// Drops every report up to `up_to_seq` (acknowledged).
    pub fn delivered(&self, up_to_seq: u64) -> Result<(), StoreError> {
        let ops: Vec<Op> = self
            .store
            .scan(Tree::ServiceReports)?
            .into_iter()
            .filter(|(k, _)| {
                <[u8; 8]>::try_from(k.as_slice()).is_ok_and(|b| u64::from_be_bytes(b) <= up_to_seq)
            })
            .map(|(k, _)| Op::Delete(Tree::ServiceReports, k))
            .collect();
        if ops.is_empty() {
            return Ok(());
        }
        self.store.apply(ops)
    }
}

fn encode(r: &ServiceRecord) -> Vec<u8> {
    serde_json::to_vec(r).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn draft(service: &str, state: ServiceState) -> Draft {
        Draft {
            service: service.into(),
            deployment: "d".into(),
            revision: 1,
            state,
            restarts: 0,
            last_exit: None,
            health_output: String::new(),
            message: None,
        }
    }

    #[test]
    fn reports_are_numbered_kept_until_delivered_and_bounded() {
        let book = ServiceBook::new(Arc::new(MemoryStore::new()));
        let a = book.report(draft("web", ServiceState::Starting), 1).expect("report");
        let b = book.report(draft("web", ServiceState::Healthy), 2).expect("report");
        assert_eq!((a.seq, b.seq), (1, 2));
        assert_eq!(book.pending(10).expect("pending").len(), 2);
        book.delivered(1).expect("delivered");
        assert_eq!(book.pending(10).expect("pending")[0].seq, 2);
        book.report(draft("db", ServiceState::Healthy), 3).expect("report");
        for _ in 0..MAX_PENDING_REPORTS + 5 {
            book.report(draft("web", ServiceState::Restarting), 3).expect("report");
        }
        let left = book.pending(usize::MAX).expect("pending");
        assert_eq!(left.len(), MAX_PENDING_REPORTS, "bounded");
        assert_eq!(left.last().expect("newest").seq, MAX_PENDING_REPORTS as u64 + 8, "the newest is kept");
        assert!(left.iter().any(|r| r.service == "db"), "a quiet service's only report is not pushed out");
        let long = Draft { health_output: "é".repeat(5000), ..draft("web", ServiceState::Unhealthy) };
        let r = book.report(long, 4).expect("report");
        assert!(r.health_output.len() <= outpost_protocol::MAX_HEALTH_OUTPUT_BYTES);
    }
}
