//! The in-memory twin of the sled store, for unit tests and throwaway servers. It keeps the
//! same rules as the durable adapters (the shared contract tests hold both to them) and loses
//! everything when dropped.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use outpost_protocol::{
    ApiTokenInfo, AuditEntry, CancelAttempt, Heartbeat, JobInfo, JobState, Labels, NodeInfo, ObjectEvent,
    Org, ResultReport, StoredEvent, Trigger,
};

use super::{
    ApiTokenRecord, CANCELLED_BY_OPERATOR, CancelOutcome, EventFilter, EventOrder, EventTally, EventsOutcome,
    JobFilter, JobRecord, OrgRecord, ResultFate, ResultOutcome, StateStore, StoreError, StoreFuture,
    TokenRecord, TokenRefusal, accept_job, apply_cancel, cancel_of, change_labels, check_token, finish_job,
    is_open_any, result_fate, sort_api_tokens, sort_triggers, stored_event, take_window,
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
    /// Cursor → event, in arrival order.
    events: BTreeMap<u64, StoredEvent>,
    /// (node, seq) → cursor, in per-node seq order.
    event_index: BTreeMap<(String, u64), u64>,
    event_cursor: u64,
    triggers: BTreeMap<String, Trigger>,
    /// (node, job, attempt) → the stop request the node has not answered yet.
    cancels: BTreeMap<(String, String, u32), CancelAttempt>,
    deployments: BTreeMap<String, super::DeploymentRecord>,
    node_services: BTreeMap<String, super::NodeServiceRecord>,
    /// node → its last stored service report seq.
    service_report_last: HashMap<String, u64>,
    /// (node, seq) → the node's audit entry.
    node_audit: BTreeMap<(String, u64), outpost_protocol::AuditRecord>,
    api_tokens: HashMap<String, ApiTokenRecord>,
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

    /// Changes one node's record; the record as stored afterwards (the sled store's twin).
    fn modify_node(&self, node_id: &str, change: impl FnOnce(&mut NodeInfo)) -> StoreFuture<'_, NodeInfo> {
        let node_id = node_id.to_owned();
        self.with(move |inner| {
            let node = inner
                .nodes
                .get_mut(&node_id)
                .ok_or_else(|| StoreError::NotFound(format!("node {node_id}")))?;
            change(node);
            Ok(node.clone())
        })
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

    fn put_org_settings(
        &self,
        org_id: &str,
        settings: outpost_protocol::OrgSettings,
    ) -> StoreFuture<'_, bool> {
        let org_id = org_id.to_owned();
        self.with(move |inner| {
            let rec =
                inner.orgs.get_mut(&org_id).ok_or_else(|| StoreError::NotFound(format!("org {org_id}")))?;
            if rec.settings.revision + 1 != settings.revision {
                return Ok(false);
            }
            rec.settings = settings;
            Ok(true)
        })
    }

    fn swap_org_keys(&self, before: &OrgRecord, after: &OrgRecord) -> StoreFuture<'_, bool> {
        let (before, after) = (before.clone(), after.clone());
        self.with(move |inner| {
            let org_id = &after.org.id;
            let rec =
                inner.orgs.get_mut(org_id).ok_or_else(|| StoreError::NotFound(format!("org {org_id}")))?;
            if !super::same_keys(rec, &before) {
                return Ok(false);
            }
            super::copy_keys(rec, &after);
            Ok(true)
        })
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

    fn page_nodes(
        &self,
        org_id: Option<&str>,
        offset: usize,
        limit: usize,
    ) -> StoreFuture<'_, Vec<NodeInfo>> {
        let org_id = org_id.map(str::to_owned);
        self.with(move |inner| {
            Ok(inner
                .nodes
                .values()
                .filter(|n| org_id.as_deref().is_none_or(|o| o == n.org_id))
                .skip(offset)
                .take(limit)
                .cloned()
                .collect())
        })
    }

    fn find_nodes(
        &self,
        org_id: Option<&str>,
        after: Option<&str>,
        _label: Option<(String, String)>,
        keep: super::NodeFilter,
        limit: usize,
    ) -> StoreFuture<'_, Vec<NodeInfo>> {
        let org_id = org_id.map(str::to_owned);
        let after = after.map(str::to_owned);
        self.with(move |inner| {
            let start = match &after {
                Some(a) => std::ops::Bound::Excluded(a.clone()),
                None => std::ops::Bound::Unbounded,
            };
            Ok(inner
                .nodes
                .range((start, std::ops::Bound::Unbounded))
                .map(|(_, n)| n)
                .filter(|n| org_id.as_deref().is_none_or(|o| o == n.org_id))
                .filter(|n| keep(&n.org_id, &n.effective_labels()))
                .take(limit)
                .cloned()
                .collect())
        })
    }

    fn node_presence(&self, org_id: Option<&str>) -> StoreFuture<'_, Vec<super::NodePresence>> {
        let org_id = org_id.map(str::to_owned);
        self.with(move |inner| {
            Ok(inner
                .nodes
                .values()
                .filter(|n| org_id.as_deref().is_none_or(|o| o == n.org_id))
                .map(|n| super::NodePresence {
                    node_id: n.node_id.clone(),
                    last_seen_unix_ms: n.last_seen_unix_ms,
                })
                .collect())
        })
    }

    fn record_heartbeat(
        &self,
        node_id: &str,
        heartbeat: Heartbeat,
        seen_ms: Option<u64>,
    ) -> StoreFuture<'_, ()> {
        let changed = self.modify_node(node_id, |node| {
            if seen_ms.is_some() {
                node.last_seen_unix_ms = seen_ms;
            }
            node.last_heartbeat = Some(heartbeat);
        });
        Box::pin(async move { changed.await.map(drop) })
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

    fn job_counts(&self, org_id: Option<&str>) -> StoreFuture<'_, super::JobCounts> {
        let org_id = org_id.map(str::to_owned);
        self.with(move |inner| {
            let mut counts = super::JobCounts::default();
            for job in inner.jobs.values().filter(|j| org_id.as_deref().is_none_or(|o| o == j.info.org_id)) {
                counts.add(job.info.state, 1);
            }
            Ok(counts)
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
            let Some(job) = inner.jobs.get_mut(&report.job_id) else {
                return Ok(ResultOutcome::NotYours);
            };
            let fate = result_fate(job, &node_id, &report);
            if fate == ResultFate::NotYours {
                return Ok(ResultOutcome::NotYours);
            }
            if inner.results.contains_key(&report.idempotency_key) {
                return Ok(ResultOutcome::Duplicate);
            }
            inner.cancels.remove(&(node_id, report.job_id.clone(), report.attempt));
            finish_job(job, fate, report.clone());
            inner.results.insert(report.idempotency_key.clone(), report);
            Ok(match fate {
                ResultFate::Current => ResultOutcome::Stored,
                _ => ResultOutcome::Superseded,
            })
        })
    }

    fn revoke_node(&self, node_id: &str, now_ms: u64) -> StoreFuture<'_, NodeInfo> {
        self.modify_node(node_id, |node| {
            node.revoked_unix_ms.get_or_insert(now_ms);
        })
    }

    fn renew_node_cert(
        &self,
        node_id: &str,
        presented_sha256: &str,
        new_sha256: &str,
    ) -> StoreFuture<'_, NodeInfo> {
        self.modify_node(node_id, |node| super::renewed_cert(node, presented_sha256, new_sha256))
    }

    fn forget_previous_cert(&self, node_id: &str) -> StoreFuture<'_, NodeInfo> {
        self.modify_node(node_id, |node| node.previous_cert_sha256 = None)
    }

    fn update_node_labels(
        &self,
        node_id: &str,
        set: Labels,
        remove: Vec<String>,
    ) -> StoreFuture<'_, NodeInfo> {
        self.modify_node(node_id, |node| change_labels(node, set, &remove))
    }

    fn reassign_job(&self, job_id: &str, expected_attempt: u32, next: JobRecord) -> StoreFuture<'_, bool> {
        let job_id = job_id.to_owned();
        self.with(move |inner| {
            let Some(job) = inner.jobs.get_mut(&job_id) else { return Ok(false) };
            if job.info.attempt != expected_attempt || !is_open_any(&job.info) {
                return Ok(false);
            }
            let reason = format!("superseded by attempt {} on node {}", next.info.attempt, next.info.node_id);
            let stop = cancel_of(&job.info, &reason);
            inner.cancels.insert((job.info.node_id.clone(), job_id, stop.attempt), stop);
            *job = next;
            Ok(true)
        })
    }

    fn open_any_jobs(&self) -> StoreFuture<'_, Vec<JobRecord>> {
        self.with(|inner| Ok(inner.jobs.values().filter(|j| is_open_any(&j.info)).cloned().collect()))
    }

    fn cancel_job(&self, job_id: &str, now_ms: u64) -> StoreFuture<'_, CancelOutcome> {
        let job_id = job_id.to_owned();
        self.with(move |inner| {
            let Some(job) = inner.jobs.get_mut(&job_id) else { return Ok(CancelOutcome::NotFound) };
            let (outcome, ask_node) = apply_cancel(job, now_ms);
            if ask_node {
                let stop = cancel_of(&job.info, CANCELLED_BY_OPERATOR);
                inner.cancels.insert((job.info.node_id.clone(), job_id, stop.attempt), stop);
            }
            Ok(outcome)
        })
    }

    fn put_deployment(&self, d: super::DeploymentRecord) -> StoreFuture<'_, ()> {
        self.with(move |inner| {
            inner.deployments.insert(d.key(), d);
            Ok(())
        })
    }

    fn get_deployment(&self, org_id: &str, name: &str) -> StoreFuture<'_, Option<super::DeploymentRecord>> {
        let key = super::deployment_key(org_id, name);
        self.with(move |inner| Ok(inner.deployments.get(&key).cloned()))
    }

    fn list_deployments(&self) -> StoreFuture<'_, Vec<super::DeploymentRecord>> {
        self.with(|inner| Ok(inner.deployments.values().cloned().collect()))
    }

    fn set_service_desired(
        &self,
        node_id: &str,
        service: &str,
        desired: super::DesiredService,
    ) -> StoreFuture<'_, ()> {
        let (node_id, service) = (node_id.to_owned(), service.to_owned());
        self.with(move |inner| {
            let rec = inner
                .node_services
                .entry(super::node_service_key(&node_id, &service))
                .or_insert_with(|| super::NodeServiceRecord::new(&node_id, &service));
            rec.desired = Some(desired);
            Ok(())
        })
    }

    fn list_node_services(&self, node_id: Option<&str>) -> StoreFuture<'_, Vec<super::NodeServiceRecord>> {
        let node_id = node_id.map(str::to_owned);
        self.with(move |inner| {
            Ok(inner
                .node_services
                .values()
                .filter(|r| node_id.as_deref().is_none_or(|n| n == r.node_id))
                .cloned()
                .collect())
        })
    }

    fn ack_node_services(
        &self,
        node_id: &str,
        acks: Vec<outpost_protocol::ServiceAck>,
    ) -> StoreFuture<'_, ()> {
        let node_id = node_id.to_owned();
        self.with(move |inner| {
            for a in acks {
                if let Some(r) = inner.node_services.get_mut(&super::node_service_key(&node_id, &a.service)) {
                    r.acked_seq = r.acked_seq.max(a.seq);
                }
            }
            Ok(())
        })
    }

    fn append_node_audit(
        &self,
        node_id: &str,
        entries: Vec<outpost_protocol::AuditRecord>,
    ) -> StoreFuture<'_, super::NodeAuditOutcome> {
        let node_id = node_id.to_owned();
        self.with(move |inner| {
            let head = inner
                .node_audit
                .range((node_id.clone(), 0)..=(node_id.clone(), u64::MAX))
                .next_back()
                .map(|(_, e)| (e.seq, e.sha256.clone()))
                .unwrap_or((0, outpost_protocol::AUDIT_GENESIS.to_owned()));
            match super::continue_node_audit((head.0, &head.1), entries) {
                Err(why) => Ok(super::NodeAuditOutcome { stored: 0, up_to_seq: head.0, refused: Some(why) }),
                Ok(fresh) => {
                    let up_to_seq = fresh.last().map_or(head.0, |e| e.seq);
                    let stored = fresh.len() as u32;
                    for e in fresh {
                        inner.node_audit.insert((node_id.clone(), e.seq), e);
                    }
                    Ok(super::NodeAuditOutcome { stored, up_to_seq, refused: None })
                }
            }
        })
    }

    fn node_audit(
        &self,
        node_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<outpost_protocol::AuditRecord>> {
        let node_id = node_id.to_owned();
        self.with(move |inner| {
            Ok(inner
                .node_audit
                .range((node_id.clone(), after_seq.saturating_add(1))..=(node_id, u64::MAX))
                .take(limit)
                .map(|(_, e)| e.clone())
                .collect())
        })
    }

    fn store_service_reports(
        &self,
        node_id: &str,
        reports: Vec<outpost_protocol::ServiceReport>,
    ) -> StoreFuture<'_, u64> {
        let node_id = node_id.to_owned();
        self.with(move |inner| {
            let last = inner.service_report_last.get(&node_id).copied().unwrap_or(0);
            let (fresh, last) = super::fresh_service_reports(last, reports);
            for r in fresh {
                let key = super::node_service_key(&node_id, &r.service);
                let rec = inner
                    .node_services
                    .entry(key)
                    .or_insert_with(|| super::NodeServiceRecord::new(&node_id, &r.service));
                super::apply_service_report(rec, r);
            }
            inner.service_report_last.insert(node_id, last);
            Ok(last)
        })
    }

    fn pending_cancels(&self, node_id: &str, max: usize) -> StoreFuture<'_, Vec<CancelAttempt>> {
        let node_id = node_id.to_owned();
        self.with(move |inner| {
            Ok(inner
                .cancels
                .iter()
                .filter(|((n, _, _), _)| *n == node_id)
                .take(max)
                .map(|(_, c)| c.clone())
                .collect())
        })
    }

    fn store_events(
        &self,
        node_id: &str,
        org_id: &str,
        events: Vec<ObjectEvent>,
        now_ms: u64,
    ) -> StoreFuture<'_, EventsOutcome> {
        let (node_id, org_id) = (node_id.to_owned(), org_id.to_owned());
        self.with(move |inner| {
            let range = (node_id.clone(), 0)..=(node_id.clone(), u64::MAX);
            let last = inner.event_index.range(range).next_back().map_or(0, |((_, seq), _)| *seq);
            let mut tally = EventTally::new(last);
            for event in events {
                let key = (node_id.clone(), event.seq);
                if inner.event_index.contains_key(&key) {
                    tally.duplicate(event.seq);
                    continue;
                }
                tally.stored(event.seq);
                inner.event_cursor += 1;
                let cursor = inner.event_cursor;
                inner.event_index.insert(key, cursor);
                inner.events.insert(cursor, stored_event(cursor, &node_id, &org_id, now_ms, event));
            }
            Ok(tally.outcome)
        })
    }

    fn list_events(&self, filter: EventFilter) -> StoreFuture<'_, Vec<StoredEvent>> {
        self.with(move |inner| {
            let found: Vec<StoredEvent> = match &filter.order {
                EventOrder::BySeq { node_id, after_seq } => {
                    let range = (node_id.clone(), after_seq.saturating_add(1))..=(node_id.clone(), u64::MAX);
                    inner
                        .event_index
                        .range(range)
                        .filter_map(|(_, cursor)| inner.events.get(cursor))
                        .filter(|e| filter.matches(e))
                        .cloned()
                        .collect()
                }
                EventOrder::ByCursor { after_cursor, .. } => inner
                    .events
                    .range(after_cursor.saturating_add(1)..)
                    .map(|(_, e)| e)
                    .filter(|e| filter.matches(e))
                    .cloned()
                    .collect(),
            };
            Ok(take_window(found, filter.newest, filter.limit))
        })
    }

    fn add_triggered_job(&self, node_id: &str, seq: u64, job_id: &str) -> StoreFuture<'_, ()> {
        let (node_id, job_id) = (node_id.to_owned(), job_id.to_owned());
        self.with(move |inner| {
            let event = inner
                .event_index
                .get(&(node_id.clone(), seq))
                .and_then(|cursor| inner.events.get_mut(cursor))
                .ok_or_else(|| StoreError::NotFound(format!("event {seq} of node {node_id}")))?;
            if !event.triggered_jobs.contains(&job_id) {
                event.triggered_jobs.push(job_id);
            }
            Ok(())
        })
    }

    fn insert_trigger(&self, trigger: Trigger) -> StoreFuture<'_, ()> {
        self.with(move |inner| {
            if inner.triggers.contains_key(&trigger.trigger_id) {
                return Err(StoreError::AlreadyExists(format!("trigger {}", trigger.trigger_id)));
            }
            if inner.triggers.values().any(|t| t.org_id == trigger.org_id && t.name == trigger.name) {
                return Err(StoreError::AlreadyExists(format!(
                    "trigger named {:?} in org {}",
                    trigger.name, trigger.org_id
                )));
            }
            inner.triggers.insert(trigger.trigger_id.clone(), trigger);
            Ok(())
        })
    }

    fn list_triggers(&self, org_id: Option<&str>) -> StoreFuture<'_, Vec<Trigger>> {
        let org_id = org_id.map(str::to_owned);
        self.with(move |inner| {
            let mut out: Vec<Trigger> = inner
                .triggers
                .values()
                .filter(|t| org_id.as_deref().is_none_or(|o| o == t.org_id))
                .cloned()
                .collect();
            sort_triggers(&mut out);
            Ok(out)
        })
    }

    fn get_trigger(&self, trigger_id: &str) -> StoreFuture<'_, Option<Trigger>> {
        let id = trigger_id.to_owned();
        self.with(move |inner| Ok(inner.triggers.get(&id).cloned()))
    }

    fn delete_trigger(&self, trigger_id: &str) -> StoreFuture<'_, bool> {
        let id = trigger_id.to_owned();
        self.with(move |inner| Ok(inner.triggers.remove(&id).is_some()))
    }

    fn append_audit(
        &self,
        actor: &str,
        org_id: Option<&str>,
        action: &str,
        detail: &str,
        now_ms: u64,
    ) -> StoreFuture<'_, AuditEntry> {
        let (actor, action, detail) = (actor.to_owned(), action.to_owned(), detail.to_owned());
        let org_id = org_id.map(str::to_owned);
        self.with(move |inner| {
            let seq = inner.audit.last().map_or(1, |e| e.seq + 1);
            let entry = AuditEntry { seq, unix_ms: now_ms, actor, action, detail, org_id };
            inner.audit.push(entry.clone());
            Ok(entry)
        })
    }

    fn list_audit(&self, org_id: Option<&str>, limit: usize) -> StoreFuture<'_, Vec<AuditEntry>> {
        let org_id = org_id.map(str::to_owned);
        self.with(move |inner| {
            let mut out: Vec<AuditEntry> = inner
                .audit
                .iter()
                .rev()
                .filter(|e| org_id.is_none() || e.org_id == org_id)
                .take(limit)
                .cloned()
                .collect();
            out.reverse();
            Ok(out)
        })
    }

    fn insert_api_token(&self, token: ApiTokenRecord) -> StoreFuture<'_, ()> {
        self.with(move |inner| {
            if inner.api_tokens.contains_key(&token.info.id) {
                return Err(StoreError::AlreadyExists(format!("API token {}", token.info.id)));
            }
            let taken = inner.api_tokens.values().any(|t| {
                t.info.org_id == token.info.org_id
                    && t.info.name == token.info.name
                    && t.info.revoked_unix_ms.is_none()
            });
            if taken {
                return Err(StoreError::AlreadyExists(format!(
                    "API token named {:?} in org {}",
                    token.info.name, token.info.org_id
                )));
            }
            inner.api_tokens.insert(token.info.id.clone(), token);
            Ok(())
        })
    }

    fn get_api_token(&self, token_id: &str) -> StoreFuture<'_, Option<ApiTokenRecord>> {
        let id = token_id.to_owned();
        self.with(move |inner| Ok(inner.api_tokens.get(&id).cloned()))
    }

    fn list_api_tokens(&self, org_id: &str) -> StoreFuture<'_, Vec<ApiTokenInfo>> {
        let org_id = org_id.to_owned();
        self.with(move |inner| {
            let mut out: Vec<ApiTokenInfo> = inner
                .api_tokens
                .values()
                .filter(|t| t.info.org_id == org_id)
                .map(|t| t.info.clone())
                .collect();
            sort_api_tokens(&mut out);
            Ok(out)
        })
    }

    fn revoke_api_token(&self, token_id: &str, now_ms: u64) -> StoreFuture<'_, Option<ApiTokenInfo>> {
        let id = token_id.to_owned();
        self.with(move |inner| {
            Ok(inner.api_tokens.get_mut(&id).map(|t| {
                t.info.revoked_unix_ms.get_or_insert(now_ms);
                t.info.clone()
            }))
        })
    }
}

/// Newest submission first; the job id breaks ties so the order is stable.
pub(crate) fn sort_newest_first(jobs: &mut [JobInfo]) {
    jobs.sort_by(|a, b| b.submitted_unix_ms.cmp(&a.submitted_unix_ms).then_with(|| b.job_id.cmp(&a.job_id)));
}
