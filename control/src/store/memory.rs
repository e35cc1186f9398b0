//! The in-memory twin of the sled store, for unit tests and throwaway servers. It keeps the
//! same rules as the durable adapters (the shared contract tests hold both to them) and loses
//! everything when dropped.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use outpost_protocol::{AuditEntry, Heartbeat, JobInfo, JobState, NodeInfo, Org, ResultReport};

use super::{
    JobFilter, JobRecord, OrgRecord, ResultOutcome, StateStore, StoreError, StoreFuture, TokenRecord,
    TokenRefusal, accept_job, check_token, finish_job,
};

#[derive(Default)]
struct Inner {
    orgs: BTreeMap<String, OrgRecord>,
    tokens: HashMap<String, TokenRecord>,
    nodes: BTreeMap<String, NodeInfo>,
    seqs: HashMap<String, u64>,
    jobs: HashMap<String, JobRecord>,
    results: HashMap<String, ResultReport>,
    audit: Vec<AuditEntry>,
}

#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>, StoreError> {
        self.inner.lock().map_err(|_| StoreError::Backend("memory store lock poisoned".into()))
    }

    fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Inner) -> Result<T, StoreError>,
    ) -> StoreFuture<'_, T> {
        let result = self.lock().and_then(|mut inner| f(&mut inner));
        Box::pin(std::future::ready(result))
    }
}

impl StateStore for MemoryStore {
    fn insert_org(&self, org: OrgRecord) -> StoreFuture<'_, ()> {
        self.with(move |inner| {
            if inner.orgs.contains_key(&org.org.id) {
                return Err(StoreError::AlreadyExists(format!("org {}", org.org.id)));
            }
            inner.orgs.insert(org.org.id.clone(), org);
            Ok(())
        })
    }

    fn get_org(&self, org_id: &str) -> StoreFuture<'_, Option<OrgRecord>> {
        let org_id = org_id.to_owned();
        self.with(move |inner| Ok(inner.orgs.get(&org_id).cloned()))
    }

    fn list_orgs(&self) -> StoreFuture<'_, Vec<Org>> {
        self.with(|inner| Ok(inner.orgs.values().map(|r| r.org.clone()).collect()))
    }

    fn insert_token(&self, token: TokenRecord) -> StoreFuture<'_, ()> {
        self.with(move |inner| {
            inner.tokens.insert(token.token_sha256.clone(), token);
            Ok(())
        })
    }

    fn get_token(&self, token_sha256: &str) -> StoreFuture<'_, Option<TokenRecord>> {
        let key = token_sha256.to_owned();
        self.with(move |inner| Ok(inner.tokens.get(&key).cloned()))
    }

    fn enroll_node(
        &self,
        token_sha256: &str,
        now_ms: u64,
        node: NodeInfo,
    ) -> StoreFuture<'_, Result<(), TokenRefusal>> {
        let key = token_sha256.to_owned();
        self.with(move |inner| {
            if let Err(refusal) = check_token(inner.tokens.get(&key), &node.org_id, now_ms) {
                return Ok(Err(refusal));
            }
            if let Some(token) = inner.tokens.get_mut(&key) {
                token.used_unix_ms = Some(now_ms);
                token.used_by_node = Some(node.node_id.clone());
            }
            inner.nodes.insert(node.node_id.clone(), node);
            Ok(Ok(()))
        })
    }

    fn get_node(&self, node_id: &str) -> StoreFuture<'_, Option<NodeInfo>> {
        let node_id = node_id.to_owned();
        self.with(move |inner| Ok(inner.nodes.get(&node_id).cloned()))
    }

    fn list_nodes(&self) -> StoreFuture<'_, Vec<NodeInfo>> {
        self.with(|inner| Ok(inner.nodes.values().cloned().collect()))
    }

    fn record_heartbeat(&self, node_id: &str, heartbeat: Heartbeat, now_ms: u64) -> StoreFuture<'_, ()> {
        let node_id = node_id.to_owned();
        self.with(move |inner| {
            let node = inner
                .nodes
                .get_mut(&node_id)
                .ok_or_else(|| StoreError::NotFound(format!("node {node_id}")))?;
            node.last_seen_unix_ms = Some(now_ms);
            node.last_heartbeat = Some(heartbeat);
            Ok(())
        })
    }

    fn next_job_seq(&self, node_id: &str) -> StoreFuture<'_, u64> {
        let node_id = node_id.to_owned();
        self.with(move |inner| {
            let seq = inner.seqs.entry(node_id).or_insert(0);
            *seq += 1;
            Ok(*seq)
        })
    }

    fn insert_job(&self, job: JobRecord) -> StoreFuture<'_, ()> {
        self.with(move |inner| {
            if inner.jobs.contains_key(&job.info.job_id) {
                return Err(StoreError::AlreadyExists(format!("job {}", job.info.job_id)));
            }
            inner.jobs.insert(job.info.job_id.clone(), job);
            Ok(())
        })
    }

    fn get_job(&self, job_id: &str) -> StoreFuture<'_, Option<JobRecord>> {
        let job_id = job_id.to_owned();
        self.with(move |inner| Ok(inner.jobs.get(&job_id).cloned()))
    }

    fn list_jobs(&self, filter: JobFilter) -> StoreFuture<'_, Vec<JobInfo>> {
        self.with(move |inner| {
            let mut jobs: Vec<JobInfo> =
                inner.jobs.values().filter(|j| filter.matches(&j.info)).map(|j| j.info.clone()).collect();
            sort_newest_first(&mut jobs);
            jobs.truncate(filter.limit);
            Ok(jobs)
        })
    }

    fn queued_jobs(&self, node_id: &str, max: usize) -> StoreFuture<'_, Vec<JobRecord>> {
        let node_id = node_id.to_owned();
        self.with(move |inner| {
            let mut jobs: Vec<JobRecord> = inner
                .jobs
                .values()
                .filter(|j| j.info.node_id == node_id && j.info.state == JobState::Queued)
                .cloned()
                .collect();
            jobs.sort_by_key(|j| j.info.seq);
            jobs.truncate(max);
            Ok(jobs)
        })
    }

    fn ack_jobs(&self, node_id: &str, job_ids: Vec<String>, now_ms: u64) -> StoreFuture<'_, ()> {
        let node_id = node_id.to_owned();
        self.with(move |inner| {
            for id in job_ids {
                if let Some(job) = inner.jobs.get_mut(&id) {
                    accept_job(job, &node_id, now_ms);
                }
            }
            Ok(())
        })
    }

    fn store_result(&self, node_id: &str, report: ResultReport) -> StoreFuture<'_, ResultOutcome> {
        let node_id = node_id.to_owned();
        self.with(move |inner| {
            let Some(job) = inner.jobs.get_mut(&report.job_id).filter(|j| j.info.node_id == node_id) else {
                return Ok(ResultOutcome::NotYours);
            };
            if inner.results.contains_key(&report.idempotency_key) {
                return Ok(ResultOutcome::Duplicate);
            }
            finish_job(job, report.clone());
            inner.results.insert(report.idempotency_key.clone(), report);
            Ok(ResultOutcome::Stored)
        })
    }

    fn append_audit(
        &self,
        actor: &str,
        action: &str,
        detail: &str,
        now_ms: u64,
    ) -> StoreFuture<'_, AuditEntry> {
        let (actor, action, detail) = (actor.to_owned(), action.to_owned(), detail.to_owned());
        self.with(move |inner| {
            let seq = inner.audit.last().map_or(1, |e| e.seq + 1);
            let entry = AuditEntry { seq, unix_ms: now_ms, actor, action, detail };
            inner.audit.push(entry.clone());
            Ok(entry)
        })
    }

    fn list_audit(&self, limit: usize) -> StoreFuture<'_, Vec<AuditEntry>> {
        self.with(move |inner| {
            let start = inner.audit.len().saturating_sub(limit);
            Ok(inner.audit[start..].to_vec())
        })
    }
}

/// Newest submission first; the job id breaks ties so the order is stable.
pub(crate) fn sort_newest_first(jobs: &mut [JobInfo]) {
    jobs.sort_by(|a, b| b.submitted_unix_ms.cmp(&a.submitted_unix_ms).then_with(|| b.job_id.cmp(&a.job_id)));
}
