//! The control plane's `StateStore` port: everything it must remember across restarts.
//! The trait is deliberately narrow (records in, records out, a few atomic operations) so that
//! a Postgres adapter can follow; adapters persist durably before a call returns.

mod dump;
mod memory;
mod postgres;
mod sled_index;
mod sled_store;

#[cfg(test)]
mod contract;
#[cfg(test)]
mod postgres_tests;

use std::future::Future;
use std::pin::Pin;

use outpost_protocol::{
    ApiTokenInfo, AuditEntry, CancelAttempt, EnrollmentToken, Heartbeat, JobInfo, JobState, Labels, NodeInfo,
    ObjectEvent, Org, Outcome, Placement, ResultReport, SignedEnvelope, StoredEvent, SupersededAttempt,
    Trigger,
};
use serde::{Deserialize, Serialize};

pub use dump::{Copied, StoreDump, copy_to_postgres};
pub use memory::MemoryStore;
pub use postgres::{MIN_POOL_SIZE, Migrated, Notice, PgOptions, PgStore, SCHEMA_VERSION, listen};
pub use sled_store::SledStore;

/// A store operation in flight. Boxed so that the trait stays object-safe (`Arc<dyn StateStore>`).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store backend failed: {0}")]
    Backend(String),
    /// The store's server cannot be reached now (a database that is down or cut off): worth
    /// retrying, unlike the others.
    #[error("cannot reach the state store: {0}")]
    Unreachable(String),
    #[error("stored record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0} not found")]
    NotFound(String),
}

/// An organisation with its ed25519 signing key (the secret never leaves the control plane).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrgRecord {
    pub org: Org,
    /// The 32 secret key bytes, hex.
    pub signing_secret_hex: String,
    /// Features off and the nodes' default profile (absent from records older than them).
    #[serde(default)]
    pub settings: outpost_protocol::OrgSettings,
    /// Earlier and announced signing keys (absent from records of orgs never rotated).
    #[serde(default, skip_serializing_if = "OrgKeys::is_empty")]
    pub keys: OrgKeys,
}

/// An organisation's signing-key rotations: the chain of endorsed keys up to the current one
/// (`org.signing_key`), and the next one while it is announced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgKeys {
    /// Every key up to and including the current one, oldest first, each but the first
    /// endorsed by the one before (public halves only). Empty: the current key is the first.
    #[serde(default)]
    pub chain: Vec<outpost_protocol::OrgKey>,
    /// The announced next key, which signs from its `signs_from_unix_ms`.
    #[serde(default)]
    pub next: Option<NextOrgKey>,
}

impl OrgKeys {
    pub fn is_empty(&self) -> bool {
        self.chain.is_empty() && self.next.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NextOrgKey {
    pub key: outpost_protocol::OrgKey,
    /// The 32 secret key bytes, hex.
    pub secret_hex: String,
}

/// Whether two records of an org hold the same signing keys.
fn same_keys(a: &OrgRecord, b: &OrgRecord) -> bool {
    a.org.signing_key == b.org.signing_key && a.signing_secret_hex == b.signing_secret_hex && a.keys == b.keys
}

/// Copies the signing keys of `from` into `to`.
fn copy_keys(to: &mut OrgRecord, from: &OrgRecord) {
    to.org.signing_key = from.org.signing_key.clone();
    to.signing_secret_hex = from.signing_secret_hex.clone();
    to.keys = from.keys.clone();
}

/// An enrollment token as stored: keyed by the SHA-256 of the token, never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub token_sha256: String,
    pub org_id: String,
    pub expires_unix_ms: u64,
    pub used_unix_ms: Option<u64>,
    pub used_by_node: Option<String>,
}

impl TokenRecord {
    pub fn for_token(token: &EnrollmentToken) -> Self {
        Self {
            token_sha256: crate::pki::sha256_hex(token.token.as_bytes()),
            org_id: token.org_id.clone(),
            expires_unix_ms: token.expires_unix_ms,
            used_unix_ms: None,
            used_by_node: None,
        }
    }
}

/// An API token as stored: its description and the SHA-256 of its secret, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiTokenRecord {
    pub info: ApiTokenInfo,
    /// SHA-256 of the secret part (after `opk_<id>.`), lowercase hex.
    pub secret_sha256: String,
}

/// Why a token could not be spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    Unknown,
    Used,
    Expired,
}

/// A job with the exact signed envelope the node receives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub info: JobInfo,
    pub envelope: SignedEnvelope,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    /// Only jobs of this organisation.
    pub org_id: Option<String>,
    pub node_id: Option<String>,
    pub state: Option<JobState>,
    pub group_id: Option<String>,
    /// Only finished jobs whose result is not a success ([`job_failed`]).
    pub failed: bool,
    pub limit: usize,
}

impl JobFilter {
    pub fn matches(&self, info: &JobInfo) -> bool {
        self.org_id.as_deref().is_none_or(|o| o == info.org_id)
            && self.node_id.as_deref().is_none_or(|n| n == info.node_id)
            && self.state.is_none_or(|s| s == info.state)
            && self.group_id.as_deref().is_none_or(|g| info.group_id.as_deref() == Some(g))
            && (!self.failed || job_failed(info))
    }
}

/// A finished job whose result is not a success: what an operator looks at first.
pub fn job_failed(info: &JobInfo) -> bool {
    info.state == JobState::Finished && info.result.as_ref().is_some_and(|r| r.outcome != Outcome::Succeeded)
}

/// How many jobs are in each state (of one organisation or of all), kept by the store as jobs
/// change rather than counted on each read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobCounts {
    pub queued: u64,
    pub accepted: u64,
    pub finished: u64,
    pub cancelled: u64,
}

impl JobCounts {
    pub fn of(&self, state: JobState) -> u64 {
        match state {
            JobState::Queued => self.queued,
            JobState::Accepted => self.accepted,
            JobState::Finished => self.finished,
            JobState::Cancelled => self.cancelled,
        }
    }

    pub(crate) fn add(&mut self, state: JobState, n: u64) {
        let slot = match state {
            JobState::Queued => &mut self.queued,
            JobState::Accepted => &mut self.accepted,
            JobState::Finished => &mut self.finished,
            JobState::Cancelled => &mut self.cancelled,
        };
        *slot = slot.saturating_add(n);
    }

    pub fn total(&self) -> u64 {
        self.queued.saturating_add(self.accepted).saturating_add(self.finished).saturating_add(self.cancelled)
    }
}

/// A node's id with its stored last-seen time: enough to count a fleet online and offline
/// without reading every node's whole record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePresence {
    pub node_id: String,
    pub last_seen_unix_ms: Option<u64>,
}

/// Which nodes [`StateStore::find_nodes`] keeps, judged by a node's organisation and effective
/// labels (its own from its last heartbeat, overridden by the operator's).
pub type NodeFilter = Box<dyn Fn(&str, &outpost_protocol::Labels) -> bool + Send + Sync>;

/// The part of a stored node record a [`NodeFilter`] judges. Decoding only this skips the
/// record's inventory (most of its bytes) without building it.
#[derive(Deserialize)]
struct NodeHead {
    org_id: String,
    #[serde(default)]
    last_heartbeat: Option<HeadBeat>,
    #[serde(default)]
    operator_labels: outpost_protocol::Labels,
}

#[derive(Deserialize)]
struct HeadBeat {
    #[serde(default)]
    labels: outpost_protocol::Labels,
}

/// Whether `keep` accepts the stored node record `bytes` (JSON of a [`NodeInfo`]), read as far
/// as the filter needs.
pub(crate) fn node_record_kept(keep: &NodeFilter, bytes: &[u8]) -> Result<bool, serde_json::Error> {
    let head: NodeHead = serde_json::from_slice(bytes)?;
    let mut labels = head.last_heartbeat.map(|h| h.labels).unwrap_or_default();
    labels.extend(head.operator_labels);
    Ok(keep(&head.org_id, &labels))
}

/// What happened to a result report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultOutcome {
    Stored,
    Duplicate,
    /// A late report of an attempt a later one replaced: kept with that attempt, never counted
    /// as the job's result.
    Superseded,
    /// No job with that id belongs to the reporting node.
    NotYours,
}

/// A deployment as stored: its public view (without the per-node table) and its history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    pub info: outpost_protocol::DeploymentInfo,
    /// The specs of recent revisions, oldest first (bounded by [`MAX_REVISIONS_KEPT`]).
    pub revisions: Vec<(u64, outpost_protocol::ServiceSpec)>,
    /// Revisions whose rollout completed, oldest first: where a rollback goes.
    pub completed: Vec<u64>,
    /// When each node of the rollout was given the new revision (its health gate counts from
    /// there).
    pub batch_started: std::collections::BTreeMap<String, u64>,
}

/// Revisions whose spec a deployment keeps.
pub const MAX_REVISIONS_KEPT: usize = 20;

impl DeploymentRecord {
    pub fn key(&self) -> String {
        deployment_key(&self.info.org_id, &self.info.name)
    }

    pub fn spec_of(&self, revision: u64) -> Option<&outpost_protocol::ServiceSpec> {
        self.revisions.iter().find(|(r, _)| *r == revision).map(|(_, s)| s)
    }
}

pub fn deployment_key(org_id: &str, name: &str) -> String {
    format!("{org_id}\0{name}")
}

/// The desired state of one service on one node, as last signed for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredService {
    pub deployment: String,
    pub revision: u64,
    /// `None`: the service is to be removed.
    pub removal: bool,
    pub rollback: bool,
    pub seq: u64,
    pub envelope: SignedEnvelope,
    pub since_unix_ms: u64,
}

/// One service on one node: what it is told, what it acknowledged, what it last reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeServiceRecord {
    pub node_id: String,
    pub service: String,
    #[serde(default)]
    pub desired: Option<DesiredService>,
    #[serde(default)]
    pub acked_seq: u64,
    #[serde(default)]
    pub report: Option<outpost_protocol::ServiceReport>,
    /// The newest report of a failure (failed, refused, rolled back).
    #[serde(default)]
    pub failure: Option<outpost_protocol::ServiceReport>,
}

impl NodeServiceRecord {
    pub fn new(node_id: &str, service: &str) -> Self {
        Self {
            node_id: node_id.to_owned(),
            service: service.to_owned(),
            desired: None,
            acked_seq: 0,
            report: None,
            failure: None,
        }
    }

    pub fn key(&self) -> String {
        node_service_key(&self.node_id, &self.service)
    }

    /// Whether the node still has to be sent its desired state.
    pub fn unacknowledged(&self) -> bool {
        self.desired.as_ref().is_some_and(|d| d.seq > self.acked_seq)
    }
}

pub fn node_service_key(node_id: &str, service: &str) -> String {
    format!("{node_id}\0{service}")
}

/// The reports of a node's batch that are new (seq above the node's last stored one), in seq
/// order, and the node's new last seq.
pub(crate) fn fresh_service_reports(
    last: u64,
    mut reports: Vec<outpost_protocol::ServiceReport>,
) -> (Vec<outpost_protocol::ServiceReport>, u64) {
    reports.retain(|r| r.seq > last);
    reports.sort_by_key(|r| r.seq);
    let up_to = reports.last().map_or(last, |r| r.seq.max(last));
    (reports, up_to)
}

/// Applies one new report to its record: the newest report, and the newest failure (so a
/// failure followed at once by the state after it is still seen).
pub(crate) fn apply_service_report(rec: &mut NodeServiceRecord, r: outpost_protocol::ServiceReport) {
    use outpost_protocol::ServiceState::{Failed, Refused, RolledBack};
    if matches!(r.state, Failed | Refused | RolledBack) {
        rec.failure = Some(r.clone());
    }
    rec.report = Some(r);
}

/// What an operator's cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The job was still queued: cancelled at once.
    Cancelled,
    /// The node has it: the node is asked to stop it and report `cancelled`.
    Requested,
    /// Nothing to do: the job had ended already in this state (or a cancel was asked before).
    AlreadyEnded(JobState),
    NotFound,
}

/// What appending to a node's audit log did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeAuditOutcome {
    /// Entries stored now.
    pub stored: u32,
    /// The seq up to which the node's log is stored (whole, from its first entry).
    pub up_to_seq: u64,
    /// Why nothing was stored: the entries do not continue the stored chain.
    pub refused: Option<String>,
}

/// The entries of `entries` after the stored head `(seq, sha256)`, checked to continue the
/// chain from it; `Err` says where they do not. Entries at or below the head are dropped, once
/// the head's own hash (when the batch holds it) agrees with what is stored.
pub(crate) fn continue_node_audit(
    head: (u64, &str),
    entries: Vec<outpost_protocol::AuditRecord>,
) -> Result<Vec<outpost_protocol::AuditRecord>, String> {
    let (seq, sha) = head;
    if let Some(same) = entries.iter().find(|e| e.seq == seq)
        && same.sha256 != sha
    {
        return Err(format!(
            "audit entry {seq} differs from the copy stored before: the node's log was rewritten"
        ));
    }
    let fresh: Vec<_> = entries.into_iter().filter(|e| e.seq > seq).collect();
    if let Some(first) = fresh.first()
        && first.seq > seq + 1
    {
        return Err(format!(
            "audit entries {}..{} are missing: they are in a results bundle not imported yet; import it first",
            seq + 1,
            first.seq - 1
        ));
    }
    outpost_protocol::check_audit_chain(seq, sha, &fresh)?;
    Ok(fresh)
}

/// What storing a node's batch of events did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventsOutcome {
    /// Events stored now.
    pub stored: u32,
    /// Events whose (node, seq) was stored before: not stored again.
    pub duplicates: u32,
    /// The highest seq of the batch.
    pub up_to_seq: u64,
    /// Where a stored seq jumped past the node's highest stored seq + 1.
    pub gaps: Vec<SeqGap>,
}

/// The node's highest stored seq was `after` when `seq` (> after + 1) arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqGap {
    pub after: u64,
    pub seq: u64,
}

/// Counts a batch as each adapter walks it, with the rules every adapter shares.
pub(crate) struct EventTally {
    /// The node's highest stored seq so far.
    pub last: u64,
    pub outcome: EventsOutcome,
}

impl EventTally {
    pub fn new(last: u64) -> Self {
        Self { last, outcome: EventsOutcome::default() }
    }

    pub fn duplicate(&mut self, seq: u64) {
        self.outcome.duplicates = self.outcome.duplicates.saturating_add(1);
        self.outcome.up_to_seq = self.outcome.up_to_seq.max(seq);
    }

    pub fn stored(&mut self, seq: u64) {
        if seq > self.last.saturating_add(1) {
            self.outcome.gaps.push(SeqGap { after: self.last, seq });
        }
        self.last = self.last.max(seq);
        self.outcome.stored = self.outcome.stored.saturating_add(1);
        self.outcome.up_to_seq = self.outcome.up_to_seq.max(seq);
    }
}

/// Which events to list, and in which order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventOrder {
    /// One node's events by seq, those above `after_seq`.
    BySeq { node_id: String, after_seq: u64 },
    /// Events in arrival order (the global cursor), those above `after_cursor`, optionally of
    /// one node.
    ByCursor { node_id: Option<String>, after_cursor: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFilter {
    pub org_id: Option<String>,
    pub order: EventOrder,
    /// The last `limit` matching events instead of the first (still returned in order).
    pub newest: bool,
    pub limit: usize,
}

impl EventFilter {
    /// The org and node filters (the position is applied by the adapter's range scan).
    pub fn matches(&self, e: &StoredEvent) -> bool {
        let node = match &self.order {
            EventOrder::BySeq { node_id, .. } => Some(node_id),
            EventOrder::ByCursor { node_id, .. } => node_id.as_ref(),
        };
        self.org_id.as_deref().is_none_or(|o| o == e.org_id) && node.is_none_or(|n| *n == e.node_id)
    }
}

/// Keeps the first or, for `newest`, the last `limit` of an ordered list of matches.
pub(crate) fn take_window(mut found: Vec<StoredEvent>, newest: bool, limit: usize) -> Vec<StoredEvent> {
    if newest {
        found.drain(..found.len().saturating_sub(limit));
    } else {
        found.truncate(limit);
    }
    found
}

/// Builds a job from the sequence number its node gets (see [`StateStore::submit_job`]).
pub type MakeJob = Box<dyn FnOnce(u64) -> Result<JobRecord, StoreError> + Send>;
/// Held while a store-wide lock is (see [`StateStore::exclusive`]).
pub type ExclusiveGuard = Box<dyn Send + Sync>;

/// Builds a service's desired state from the sequence number its node gets.
pub type MakeDesired = Box<dyn FnOnce(u64) -> Result<DesiredService, StoreError> + Send>;

/// Most stops a node is asked about at once by [`StateStore::pending_work`] (as many as one
/// poll answer sends).
pub const PENDING_WORK_MAX: usize = 256;

/// Something waiting for a node's poll (see [`StateStore::pending_work`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum PendingWork {
    /// At least one queued job: a held poll never waits while there is one.
    Jobs,
    /// A stop or service change, by the key under which a poll answer sends it: a held poll
    /// waits while every one of these was sent in an earlier answer.
    Sent(String),
}

/// The control plane's persistence port. Every mutating call is durable when it returns.
pub trait StateStore: Send + Sync + 'static {
    fn insert_org(&self, org: OrgRecord) -> StoreFuture<'_, ()>;
    fn get_org(&self, org_id: &str) -> StoreFuture<'_, Option<OrgRecord>>;
    fn list_orgs(&self) -> StoreFuture<'_, Vec<Org>>;
    /// Stores `settings` if the org's stored revision is the one before `settings.revision`:
    /// false (nothing changed) when another change came first; `NotFound` for no such org.
    fn put_org_settings(
        &self,
        org_id: &str,
        settings: outpost_protocol::OrgSettings,
    ) -> StoreFuture<'_, bool>;
    /// Replaces the org's signing keys (`org.signing_key`, its secret and `keys`) with those of
    /// `after` if the stored ones are still those of `before`: false (nothing changed) when
    /// another change came first; `NotFound` for no such org.
    fn swap_org_keys(&self, before: &OrgRecord, after: &OrgRecord) -> StoreFuture<'_, bool>;

    fn insert_token(&self, token: TokenRecord) -> StoreFuture<'_, ()>;
    fn get_token(&self, token_sha256: &str) -> StoreFuture<'_, Option<TokenRecord>>;
    /// Atomically spends the token (one-time, unexpired at `now_ms`, of `node.org_id`) and
    /// registers the node. Either both happen or neither does.
    fn enroll_node(
        &self,
        token_sha256: &str,
        now_ms: u64,
        node: NodeInfo,
    ) -> StoreFuture<'_, Result<(), TokenRefusal>>;

    fn get_node(&self, node_id: &str) -> StoreFuture<'_, Option<NodeInfo>>;
    fn list_nodes(&self) -> StoreFuture<'_, Vec<NodeInfo>>;
    /// Up to `limit` nodes from the `offset`-th on, in node id order, of `org_id` or of all
    /// organisations; reads only the records of the page.
    fn page_nodes(&self, org_id: Option<&str>, offset: usize, limit: usize)
    -> StoreFuture<'_, Vec<NodeInfo>>;
    /// Up to `limit` nodes in node id order, after `after` (exclusive) when given, of `org_id`
    /// or of all organisations, that `keep` accepts. A record `keep` refuses is read only as
    /// far as the filter needs (not its inventory), so a filtered listing costs little more
    /// than its matches. `label`: a `(key, value)` that every node `keep` accepts carries among
    /// its effective labels (a selector's `key=value` term); a store with a label index reads
    /// only the nodes that carry it. It never widens or narrows what `keep` decides.
    fn find_nodes(
        &self,
        org_id: Option<&str>,
        after: Option<&str>,
        label: Option<(String, String)>,
        keep: NodeFilter,
        limit: usize,
    ) -> StoreFuture<'_, Vec<NodeInfo>>;
    /// Every node of `org_id` (or of all) with its stored last-seen time, without the records.
    fn node_presence(&self, org_id: Option<&str>) -> StoreFuture<'_, Vec<NodePresence>>;
    /// Keeps `heartbeat` as the node's last, and `seen_ms` as when it was last seen; `None`:
    /// the heartbeat is no sign of life (it came in a results bundle: the node is no more
    /// reachable than before).
    fn record_heartbeat(
        &self,
        node_id: &str,
        heartbeat: Heartbeat,
        seen_ms: Option<u64>,
    ) -> StoreFuture<'_, ()>;

    /// The next per-node job sequence number (1, 2, ...); never handed out twice.
    fn next_job_seq(&self, node_id: &str) -> StoreFuture<'_, u64>;
    /// Takes the node's next sequence number, builds the job with it (`make` signs its
    /// manifest) and stores it, as one step: no other submit for the node stores a job between
    /// the two, so jobs become visible to the node in sequence order. `None` (nothing stored)
    /// when the job's id is taken. This default suits one process that serialises submits
    /// itself (`AppState::submit_lock`); a store shared by replicas holds the sequence's row
    /// lock instead.
    fn submit_job(&self, node_id: &str, make: MakeJob) -> StoreFuture<'_, Option<JobRecord>> {
        let node_id = node_id.to_owned();
        Box::pin(async move {
            let seq = self.next_job_seq(&node_id).await?;
            let job = make(seq)?;
            match self.insert_job(job.clone()).await {
                Ok(()) => Ok(Some(job)),
                Err(StoreError::AlreadyExists(_)) => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    /// [`StateStore::reassign_job`] with the next attempt built from the sequence number
    /// `node_id` gets, taken and used as one step (see [`StateStore::submit_job`]). False
    /// (nothing changed) when the job moved on meanwhile.
    fn reassign_job_to(
        &self,
        job_id: &str,
        expected_attempt: u32,
        node_id: &str,
        make: MakeJob,
    ) -> StoreFuture<'_, bool> {
        let (job_id, node_id) = (job_id.to_owned(), node_id.to_owned());
        Box::pin(async move {
            let seq = self.next_job_seq(&node_id).await?;
            let next = make(seq)?;
            self.reassign_job(&job_id, expected_attempt, next).await
        })
    }

    /// [`StateStore::set_service_desired`] with the desired state built from the sequence
    /// number the node gets, taken and used as one step (see [`StateStore::submit_job`]).
    fn offer_service(&self, node_id: &str, service: &str, make: MakeDesired) -> StoreFuture<'_, ()> {
        let (node_id, service) = (node_id.to_owned(), service.to_owned());
        Box::pin(async move {
            let seq = self.next_job_seq(&node_id).await?;
            let desired = make(seq)?;
            self.set_service_desired(&node_id, &service, desired).await
        })
    }

    /// Tells every replica sharing the store that `node_id` has something new (a revocation,
    /// a signing-key rotation): their polls of it look again. A store of one process has no
    /// other replica to tell.
    fn announce(&self, node_id: &str) -> StoreFuture<'_, ()> {
        let _ = node_id;
        Box::pin(std::future::ready(Ok(())))
    }

    /// What each of `node_ids` has waiting for its poll: [`PendingWork::Jobs`] when it has a
    /// queued job, and each stop and unacknowledged service change by the key the poll sends it
    /// under (`c:JOB/ATTEMPT`, `s:SEQ`). A replica of a shared store asks this of the nodes it
    /// holds polls of, every few seconds, so a notice from another replica that got lost delays
    /// a node's work by at most that long.
    fn pending_work(&self, node_ids: Vec<String>) -> StoreFuture<'_, Vec<(String, PendingWork)>> {
        Box::pin(async move {
            let mut found = Vec::new();
            for node_id in node_ids {
                if !self.queued_jobs(&node_id, 1).await?.is_empty() {
                    found.push((node_id.clone(), PendingWork::Jobs));
                }
                for c in self.pending_cancels(&node_id, PENDING_WORK_MAX).await? {
                    found.push((node_id.clone(), PendingWork::Sent(format!("c:{}/{}", c.job_id, c.attempt))));
                }
                for s in self.list_node_services(Some(&node_id)).await? {
                    if let Some(d) = s.desired.as_ref().filter(|_| s.unacknowledged()) {
                        found.push((node_id.clone(), PendingWork::Sent(format!("s:{}", d.seq))));
                    }
                }
            }
            Ok(found)
        })
    }

    /// Whether the store answers now (`/v1/health`): an embedded one always does.
    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// Holds the store-wide lock `name` until the guard is dropped: what replicas sharing the
    /// store must not do at once (the rollout pass and deployment changes). `None`: the store
    /// is one process's, whose own lock suffices.
    fn exclusive(&self, name: &'static str) -> StoreFuture<'_, Option<ExclusiveGuard>> {
        let _ = name;
        Box::pin(std::future::ready(Ok(None)))
    }

    /// Stores a new job; a `Queued` one is offered to its node until acknowledged.
    fn insert_job(&self, job: JobRecord) -> StoreFuture<'_, ()>;
    fn get_job(&self, job_id: &str) -> StoreFuture<'_, Option<JobRecord>>;
    /// Matching jobs, newest first, at most `filter.limit`.
    fn list_jobs(&self, filter: JobFilter) -> StoreFuture<'_, Vec<JobInfo>>;
    /// Jobs by state, of `org_id` or of all organisations.
    fn job_counts(&self, org_id: Option<&str>) -> StoreFuture<'_, JobCounts>;
    /// The node's `Queued` jobs in sequence order, at most `max`.
    fn queued_jobs(&self, node_id: &str, max: usize) -> StoreFuture<'_, Vec<JobRecord>>;
    /// Moves the listed jobs of this node from `Queued` to `Accepted`; others are ignored.
    fn ack_jobs(&self, node_id: &str, job_ids: Vec<String>, now_ms: u64) -> StoreFuture<'_, ()>;
    /// Stores the first report per idempotency key and finishes the job; a report of a
    /// superseded attempt is kept with that attempt and leaves the job as it is. Clears the
    /// attempt's pending cancel.
    fn store_result(&self, node_id: &str, report: ResultReport) -> StoreFuture<'_, ResultOutcome>;

    /// Replaces the operator labels of a node: `set` applied, then `remove`. The node's record
    /// as stored afterwards.
    /// Marks the node revoked at `now_ms` (kept if it already was); the record as stored.
    fn revoke_node(&self, node_id: &str, now_ms: u64) -> StoreFuture<'_, NodeInfo>;
    /// The node renewed its certificate: `new_sha256` is its certificate now, and
    /// `presented_sha256` (the one the renewal came with) stays accepted until the node first
    /// uses the new one ([`renewed_cert`]).
    fn renew_node_cert(
        &self,
        node_id: &str,
        presented_sha256: &str,
        new_sha256: &str,
    ) -> StoreFuture<'_, NodeInfo>;
    /// The node connected with its current certificate: the previous one is no longer accepted.
    fn forget_previous_cert(&self, node_id: &str) -> StoreFuture<'_, NodeInfo>;
    fn update_node_labels(
        &self,
        node_id: &str,
        set: Labels,
        remove: Vec<String>,
    ) -> StoreFuture<'_, NodeInfo>;

    /// Replaces the current attempt of a job still at `expected_attempt` and unfinished with
    /// `next` (built by [`next_attempt`]), and asks the old attempt's node to stop it. False
    /// (nothing changed) when the job moved on meanwhile.
    fn reassign_job(&self, job_id: &str, expected_attempt: u32, next: JobRecord) -> StoreFuture<'_, bool>;
    /// Unfinished jobs placed with `any`, for the placement sweep.
    fn open_any_jobs(&self) -> StoreFuture<'_, Vec<JobRecord>>;
    /// Cancels a job: a queued one at once, one its node has by asking the node.
    fn cancel_job(&self, job_id: &str, now_ms: u64) -> StoreFuture<'_, CancelOutcome>;
    /// Attempts `node_id` must stop, at most `max`.
    fn pending_cancels(&self, node_id: &str, max: usize) -> StoreFuture<'_, Vec<CancelAttempt>>;

    /// Stores a deployment (create or replace) under its org and name.
    fn put_deployment(&self, d: DeploymentRecord) -> StoreFuture<'_, ()>;
    fn get_deployment(&self, org_id: &str, name: &str) -> StoreFuture<'_, Option<DeploymentRecord>>;
    fn list_deployments(&self) -> StoreFuture<'_, Vec<DeploymentRecord>>;
    /// Sets the desired state of a service on a node (creating its record), keeping what the
    /// node acknowledged and reported.
    fn set_service_desired(
        &self,
        node_id: &str,
        service: &str,
        desired: DesiredService,
    ) -> StoreFuture<'_, ()>;
    /// The service records of one node, or of every node.
    fn list_node_services(&self, node_id: Option<&str>) -> StoreFuture<'_, Vec<NodeServiceRecord>>;
    /// Records that the node persisted these desired states (the highest seq wins).
    fn ack_node_services(
        &self,
        node_id: &str,
        acks: Vec<outpost_protocol::ServiceAck>,
    ) -> StoreFuture<'_, ()>;
    /// Stores a node's service reports once each (by node and seq); the node's last stored seq.
    fn store_service_reports(
        &self,
        node_id: &str,
        reports: Vec<outpost_protocol::ServiceReport>,
    ) -> StoreFuture<'_, u64>;

    /// Appends what of `entries` continues the node's stored audit log (see
    /// [`continue_node_audit`]), atomically; a batch that does not continue it stores nothing.
    fn append_node_audit(
        &self,
        node_id: &str,
        entries: Vec<outpost_protocol::AuditRecord>,
    ) -> StoreFuture<'_, NodeAuditOutcome>;
    /// The node's stored audit entries after `after_seq`, in order, at most `limit`.
    fn node_audit(
        &self,
        node_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<outpost_protocol::AuditRecord>>;

    /// Stores a node's events atomically: an event whose (node, seq) is stored already is a
    /// duplicate and not stored again; each new one gets the next global cursor.
    fn store_events(
        &self,
        node_id: &str,
        org_id: &str,
        events: Vec<ObjectEvent>,
        now_ms: u64,
    ) -> StoreFuture<'_, EventsOutcome>;
    /// Matching events in the filter's order, at most `filter.limit`.
    fn list_events(&self, filter: EventFilter) -> StoreFuture<'_, Vec<StoredEvent>>;
    /// Adds `job_id` to the event's `triggered_jobs` (once); `NotFound` without such an event.
    fn add_triggered_job(&self, node_id: &str, seq: u64, job_id: &str) -> StoreFuture<'_, ()>;

    /// Stores a trigger; `AlreadyExists` when its org has one of that name (or the id is taken).
    fn insert_trigger(&self, trigger: Trigger) -> StoreFuture<'_, ()>;
    /// Triggers of `org_id` (all when `None`), oldest first.
    fn list_triggers(&self, org_id: Option<&str>) -> StoreFuture<'_, Vec<Trigger>>;
    fn get_trigger(&self, trigger_id: &str) -> StoreFuture<'_, Option<Trigger>>;
    /// Removes a trigger; false when there was none.
    fn delete_trigger(&self, trigger_id: &str) -> StoreFuture<'_, bool>;

    /// Appends to the audit trail with the next sequence number; `org_id` is the organisation
    /// the action concerned, if one.
    fn append_audit(
        &self,
        actor: &str,
        org_id: Option<&str>,
        action: &str,
        detail: &str,
        now_ms: u64,
    ) -> StoreFuture<'_, AuditEntry>;
    /// The most recent `limit` entries (of `org_id` only, when given), oldest first.
    fn list_audit(&self, org_id: Option<&str>, limit: usize) -> StoreFuture<'_, Vec<AuditEntry>>;

    /// Stores a new API token; `AlreadyExists` when the id is taken or a token of its
    /// organisation that is not revoked has the same name.
    fn insert_api_token(&self, token: ApiTokenRecord) -> StoreFuture<'_, ()>;
    fn get_api_token(&self, token_id: &str) -> StoreFuture<'_, Option<ApiTokenRecord>>;
    /// The organisation's tokens, revoked ones included, oldest first.
    fn list_api_tokens(&self, org_id: &str) -> StoreFuture<'_, Vec<ApiTokenInfo>>;
    /// Marks the token revoked at `now_ms` (a token revoked already keeps its first time) and
    /// frees its name; `None` when there is no such token.
    fn revoke_api_token(&self, token_id: &str, now_ms: u64) -> StoreFuture<'_, Option<ApiTokenInfo>>;
}

/// Oldest first; the id breaks ties so the order is stable.
pub(crate) fn sort_api_tokens(tokens: &mut [ApiTokenInfo]) {
    tokens.sort_by(|a, b| a.created_unix_ms.cmp(&b.created_unix_ms).then_with(|| a.id.cmp(&b.id)));
}

/// Checks a token against the rules shared by every adapter.
pub(crate) fn check_token(
    record: Option<&TokenRecord>,
    org_id: &str,
    now_ms: u64,
) -> Result<(), TokenRefusal> {
    let record = record.ok_or(TokenRefusal::Unknown)?;
    if record.org_id != org_id {
        return Err(TokenRefusal::Unknown);
    }
    if record.used_unix_ms.is_some() {
        return Err(TokenRefusal::Used);
    }
    if now_ms >= record.expires_unix_ms {
        return Err(TokenRefusal::Expired);
    }
    Ok(())
}

/// Applies an acknowledgement to a job of `node_id`; true when it changed.
pub(crate) fn accept_job(job: &mut JobRecord, node_id: &str, now_ms: u64) -> bool {
    if job.info.node_id != node_id || job.info.state != JobState::Queued {
        return false;
    }
    job.info.state = JobState::Accepted;
    job.info.accepted_unix_ms = Some(now_ms);
    true
}

/// Where a result report belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResultFate {
    /// The job's current attempt, from its node.
    Current,
    /// A superseded attempt (the index into `superseded`), from the node that had it.
    Superseded(usize),
    NotYours,
}

pub(crate) fn result_fate(job: &JobRecord, node_id: &str, report: &ResultReport) -> ResultFate {
    if job.info.node_id == node_id && job.info.attempt == report.attempt {
        return ResultFate::Current;
    }
    match job.info.superseded.iter().position(|a| a.attempt == report.attempt && a.node_id == node_id) {
        Some(i) => ResultFate::Superseded(i),
        None => ResultFate::NotYours,
    }
}

/// Applies a first result report of an attempt to its job (see [`result_fate`]).
pub(crate) fn finish_job(job: &mut JobRecord, fate: ResultFate, report: ResultReport) {
    match fate {
        ResultFate::Current => {
            let cancelled = report.outcome == Outcome::Cancelled || job.info.state == JobState::Cancelled;
            job.info.state = if cancelled { JobState::Cancelled } else { JobState::Finished };
            job.info.result = Some(report);
        }
        ResultFate::Superseded(i) => {
            if let Some(a) = job.info.superseded.get_mut(i) {
                a.late_result = Some(report);
            }
        }
        ResultFate::NotYours => {}
    }
}

/// Whether a job is open for the placement sweep (placed with `any`, not ended).
pub(crate) fn is_open_any(info: &JobInfo) -> bool {
    // A job an operator cancelled is never offered to another node.
    info.placement == Some(Placement::Any)
        && matches!(info.state, JobState::Queued | JobState::Accepted)
        && info.cancel_requested_unix_ms.is_none()
}

/// The record of a job's next attempt on another node: `envelope` is the new signed manifest
/// (new attempt number, the new node's sequence number); the current attempt moves to
/// `superseded`.
pub fn next_attempt(
    job: &JobRecord,
    envelope: SignedEnvelope,
    node_id: &str,
    seq: u64,
    now_ms: u64,
    reason: &str,
) -> JobRecord {
    let mut next = job.clone();
    next.info.superseded.push(SupersededAttempt {
        attempt: job.info.attempt,
        node_id: job.info.node_id.clone(),
        seq: job.info.seq,
        superseded_unix_ms: now_ms,
        reason: reason.to_owned(),
        late_result: None,
    });
    next.info.attempt = job.info.attempt.saturating_add(1);
    next.info.node_id = node_id.to_owned();
    next.info.seq = seq;
    next.info.state = JobState::Queued;
    next.info.accepted_unix_ms = None;
    next.envelope = envelope;
    next
}

/// The stop request for the attempt `job` holds now.
pub(crate) fn cancel_of(job: &JobInfo, reason: &str) -> CancelAttempt {
    CancelAttempt { job_id: job.job_id.clone(), attempt: job.attempt, reason: reason.to_owned() }
}

/// The reason a node hears when an operator cancels.
pub(crate) const CANCELLED_BY_OPERATOR: &str = "cancelled by an operator";

/// Applies an operator's cancel to a job; returns the outcome and whether the node must be
/// asked to stop the attempt (it may hold it, even when it had not acknowledged it yet).
pub(crate) fn apply_cancel(job: &mut JobRecord, now_ms: u64) -> (CancelOutcome, bool) {
    match job.info.state {
        JobState::Queued => {
            job.info.state = JobState::Cancelled;
            job.info.cancel_requested_unix_ms = Some(now_ms);
            (CancelOutcome::Cancelled, true)
        }
        JobState::Accepted => {
            job.info.cancel_requested_unix_ms.get_or_insert(now_ms);
            (CancelOutcome::Requested, true)
        }
        state => (CancelOutcome::AlreadyEnded(state), false),
    }
}

/// A node's certificates after a renewal that came with `presented`.
pub(crate) fn renewed_cert(node: &mut NodeInfo, presented: &str, new: &str) {
    node.previous_cert_sha256 = Some(presented.to_owned());
    node.cert_sha256 = new.to_owned();
}

/// Applies a label change to a node's operator labels.
pub(crate) fn change_labels(node: &mut NodeInfo, set: Labels, remove: &[String]) {
    node.operator_labels.extend(set);
    for key in remove {
        node.operator_labels.remove(key);
    }
}

/// Oldest first; the id breaks ties so the order is stable.
pub(crate) fn sort_triggers(triggers: &mut [Trigger]) {
    triggers.sort_by(|a, b| {
        a.created_unix_ms.cmp(&b.created_unix_ms).then_with(|| a.trigger_id.cmp(&b.trigger_id))
    });
}

/// The record of a newly stored event.
pub(crate) fn stored_event(
    cursor: u64,
    node_id: &str,
    org_id: &str,
    now_ms: u64,
    event: ObjectEvent,
) -> StoredEvent {
    StoredEvent {
        cursor,
        node_id: node_id.to_owned(),
        org_id: org_id.to_owned(),
        received_unix_ms: now_ms,
        event,
        triggered_jobs: Vec::new(),
    }
}
