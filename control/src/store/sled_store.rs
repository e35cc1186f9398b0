//! The sled adapter of `StateStore`, the embedded default. Records are JSON in one tree per
//! kind; multi-record changes run in sled transactions, and every write is flushed to disk
//! before the call returns, so nothing is acknowledged to a client that a crash could undo.

use std::path::Path;

use outpost_protocol::{
    ApiTokenInfo, AuditEntry, CancelAttempt, Heartbeat, JobInfo, JobState, Labels, NodeInfo, ObjectEvent,
    Org, ResultReport, StoredEvent, Trigger,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::sled_index;
use super::{
    ApiTokenRecord, CANCELLED_BY_OPERATOR, CancelOutcome, EventFilter, EventOrder, EventTally, EventsOutcome,
    JobFilter, JobRecord, OrgRecord, ResultFate, ResultOutcome, StateStore, StoreError, StoreFuture,
    TokenRecord, TokenRefusal, accept_job, apply_cancel, cancel_of, change_labels, check_token, finish_job,
    is_open_any, result_fate, sort_api_tokens, sort_triggers, stored_event,
};

const AUDIT_SEQ_KEY: &[u8] = b"audit_seq";
/// The last global event cursor handed out.
const EVENT_CURSOR_KEY: &[u8] = b"event_cursor";
/// Followed by the node id: the node's highest stored event seq.
const EVENT_LAST_PREFIX: &[u8] = b"event_last\0";

pub struct SledStore {
    db: sled::Db,
    orgs: sled::Tree,
    tokens: sled::Tree,
    nodes: sled::Tree,
    seqs: sled::Tree,
    jobs: sled::Tree,
    /// `node_id \0 seq (big endian)` → job id, for every job still `Queued`.
    queued: sled::Tree,
    results: sled::Tree,
    audit: sled::Tree,
    meta: sled::Tree,
    /// `node_id \0 seq (big endian)` → `StoredEvent`, so one node's events scan in seq order.
    events: sled::Tree,
    /// `cursor (big endian)` → the `events` key, for arrival order across nodes.
    event_cursors: sled::Tree,
    /// `trigger_id` → `Trigger`.
    triggers: sled::Tree,
    /// `org_id \0 name` → `trigger_id`: names are unique per org.
    trigger_names: sled::Tree,
    /// `node_id \0 job_id \0 attempt (big endian)` → `CancelAttempt` the node has not answered.
    cancels: sled::Tree,
    /// `job_id` of every unfinished job placed with `any` (the placement sweep's work list).
    any_open: sled::Tree,
    /// `org_id \0 name` → `DeploymentRecord`.
    deployments: sled::Tree,
    /// `node_id \0 service` → `NodeServiceRecord`.
    node_services: sled::Tree,
    /// `node_id \0 seq (big endian)` → the node's audit entry.
    node_audit: sled::Tree,
    /// `token_id` → `ApiTokenRecord`.
    api_tokens: sled::Tree,
    /// `org_id \0 name` → `token_id` for every token not revoked: names are unique per org.
    api_token_names: sled::Tree,
    /// Listing keys and kept counts of jobs ([`sled_index`]).
    job_index: sled::Tree,
    /// `org_id \0 node_id` → the node's stored last-seen time ([`sled_index`]).
    node_orgs: sled::Tree,
    /// `key=value \0 node_id` per effective label of each node (see `sled_index`).
    node_labels: sled::Tree,
}

/// Followed by the node id: the node's last stored service report seq (in `meta`).
const SERVICE_REPORT_LAST_PREFIX: &[u8] = b"service_report_last\0";
/// `meta` key prefix of a node's stored audit head (seq and hash, JSON).
const NODE_AUDIT_HEAD_PREFIX: &[u8] = b"node_audit_head\0";

impl SledStore {
    /// Opens (or creates) the database in `dir`. Fails when another process holds it.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        match remove_unfinished_snapshots(dir) {
            Ok(0) => {}
            Ok(n) => {
                tracing::warn!(path = %dir.display(), removed = n, "removed unfinished store snapshots left by an interrupted write")
            }
            Err(e) => {
                return Err(StoreError::Backend(format!("cannot open sled database {}: {e}", dir.display())));
            }
        }
        let db = sled::Config::new().path(dir).open().map_err(|e| {
            StoreError::Backend(format!(
                "cannot open sled database {}: {e} (is another server running?)",
                dir.display()
            ))
        })?;
        Self::from_db(db)
    }

    /// A database in a temporary directory that is deleted on drop (tests).
    pub fn temporary() -> Result<Self, StoreError> {
        Self::from_db(sled::Config::new().temporary(true).open().map_err(backend)?)
    }

    fn from_db(db: sled::Db) -> Result<Self, StoreError> {
        let tree = |name: &str| db.open_tree(name).map_err(backend);
        let store = Self {
            orgs: tree("orgs")?,
            tokens: tree("tokens")?,
            nodes: tree("nodes")?,
            seqs: tree("seqs")?,
            jobs: tree("jobs")?,
            queued: tree("queued")?,
            results: tree("results")?,
            audit: tree("audit")?,
            meta: tree("meta")?,
            events: tree("events")?,
            event_cursors: tree("event_cursors")?,
            triggers: tree("triggers")?,
            trigger_names: tree("trigger_names")?,
            cancels: tree("cancels")?,
            any_open: tree("any_open")?,
            deployments: tree("deployments")?,
            node_services: tree("node_services")?,
            node_audit: tree("node_audit")?,
            api_tokens: tree("api_tokens")?,
            api_token_names: tree("api_token_names")?,
            job_index: tree("job_index")?,
            node_orgs: tree("node_orgs")?,
            node_labels: tree("node_labels")?,
            db,
        };
        sled_index::build_if_missing(
            &store.meta,
            &store.jobs,
            &store.nodes,
            &store.job_index,
            &store.node_orgs,
            &store.node_labels,
            &store.db,
        )?;
        Ok(store)
    }

    /// Every record, for a copy into another store (`outpost-control migrate-store`).
    pub fn dump(&self) -> Result<super::dump::StoreDump, StoreError> {
        fn values<T: DeserializeOwned>(tree: &sled::Tree, what: &str) -> Result<Vec<T>, StoreError> {
            tree.iter()
                .map(|item| {
                    let (key, value) = item.map_err(backend)?;
                    decode(&format!("{what} {}", String::from_utf8_lossy(&key)), &value)
                })
                .collect()
        }
        /// The text before the first NUL of a key (the node id of `node \0 ...` keys).
        fn head(key: &[u8]) -> String {
            let end = key.iter().position(|b| *b == 0).unwrap_or(key.len());
            String::from_utf8_lossy(&key[..end]).into_owned()
        }
        let mut dump = super::dump::StoreDump {
            orgs: values(&self.orgs, "org")?,
            tokens: values(&self.tokens, "token")?,
            nodes: values(&self.nodes, "node")?,
            jobs: values(&self.jobs, "job")?,
            results: values(&self.results, "result")?,
            deployments: values(&self.deployments, "deployment")?,
            node_services: values(&self.node_services, "node service")?,
            events: values(&self.events, "event")?,
            triggers: values(&self.triggers, "trigger")?,
            audit: values(&self.audit, "audit entry")?,
            api_tokens: values(&self.api_tokens, "API token")?,
            event_cursor: be_u64(self.meta.get(EVENT_CURSOR_KEY).map_err(backend)?),
            audit_seq: be_u64(self.meta.get(AUDIT_SEQ_KEY).map_err(backend)?),
            ..Default::default()
        };
        for item in self.seqs.iter() {
            let (key, value) = item.map_err(backend)?;
            dump.seqs.push((String::from_utf8_lossy(&key).into_owned(), be_u64(Some(value))));
        }
        for item in self.cancels.iter() {
            let (key, value) = item.map_err(backend)?;
            dump.cancels.push((head(&key), decode("cancel", &value)?));
        }
        for item in self.node_audit.iter() {
            let (key, value) = item.map_err(backend)?;
            dump.node_audit.push((head(&key), decode("node audit", &value)?));
        }
        for item in self.meta.scan_prefix(SERVICE_REPORT_LAST_PREFIX) {
            let (key, value) = item.map_err(backend)?;
            let node = String::from_utf8_lossy(&key[SERVICE_REPORT_LAST_PREFIX.len()..]).into_owned();
            dump.service_report_last.push((node, be_u64(Some(value))));
        }
        Ok(dump.canonical())
    }

    /// Whether the listing indexes hold exactly what the records call for (tests).
    #[cfg(test)]
    pub(crate) fn check_indexes(&self) -> Result<(), String> {
        sled_index::check_exact(&self.jobs, &self.nodes, &self.job_index, &self.node_orgs, &self.node_labels)
    }

    /// Drops the listing indexes as a database written before they existed lacks them (tests of
    /// the re-indexing on open).
    #[cfg(test)]
    pub(crate) fn forget_indexes(&self) -> Result<(), StoreError> {
        self.job_index.clear().map_err(backend)?;
        self.node_orgs.clear().map_err(backend)?;
        self.node_labels.clear().map_err(backend)?;
        self.meta.remove(sled_index::INDEX_VERSION_KEY).map_err(backend)?;
        self.db.flush().map(drop).map_err(backend)
    }

    /// Changes one node's record in a transaction (`change` may run again on a conflict) and
    /// flushes; the record as stored afterwards.
    async fn modify_node(
        &self,
        node_id: &str,
        change: impl Fn(&mut NodeInfo),
    ) -> Result<NodeInfo, StoreError> {
        let trees = (&self.nodes, &self.node_orgs, &self.node_labels);
        let outcome = trees.transaction(|(nodes, node_orgs, node_labels)| {
            let bytes = nodes.get(node_id.as_bytes())?;
            let bytes = bytes.ok_or_else(|| abort(StoreError::NotFound(format!("node {node_id}"))))?;
            let mut node: NodeInfo = decode(node_id, &bytes).map_err(abort)?;
            let before = sled_index::label_keys(&node);
            change(&mut node);
            nodes.insert(node_id.as_bytes(), encode(&node).map_err(abort)?)?;
            node_orgs.insert(sled_index::node_key(&node.org_id, node_id), &sled_index::node_value(&node))?;
            let after = sled_index::label_keys(&node);
            for gone in before.difference(&after) {
                node_labels.remove(gone.as_slice())?;
            }
            for new in after.difference(&before) {
                node_labels.insert(new.as_slice(), &[])?;
            }
            Ok(node)
        });
        let node = settle(outcome)?;
        self.flush().await?;
        Ok(node)
    }

    /// Makes every write so far durable. sled's own `flush_async` runs each flush on sled's small
    /// I/O pool, where a few concurrent ones wait for buffer writes that need the same pool
    /// threads: eight concurrent requests hung the control plane for good. A blocking flush on
    /// tokio's blocking pool leaves sled's threads free to write.
    ///
    /// A flush that fails (a full disk above all) leaves sled's memory ahead of its disk: the
    /// write that failed, and any other not yet flushed, would be read back, served and built
    /// on (a job offered to a node that the next start does not know). There is no taking it
    /// back, so the process stops at once, as a kill -9 would stop it, which it survives by
    /// design: the next start reads what the disk holds, and the service manager starts it
    /// once there is room (`outpost-control doctor` says so).
    async fn flush(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        match tokio::task::spawn_blocking(move || db.flush()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => fail_stop(&e),
            // A flush that panicked may have written part of what it had, or nothing.
            Err(e) if e.is_panic() => {
                fail_stop(&sled::Error::ReportableBug(format!("the flush panicked: {e}")))
            }
            Err(e) => Err(StoreError::Backend(format!("the flush stopped: {e}"))),
        }
    }

    fn get<T: DeserializeOwned>(tree: &sled::Tree, key: &str) -> Result<Option<T>, StoreError> {
        tree.get(key.as_bytes()).map_err(backend)?.map(|bytes| decode(key, &bytes)).transpose()
    }

    /// The first (or, for `newest`, the last) `filter.limit` matching events of a range scan,
    /// in scan order; `lookup` turns a scanned entry into the `events` entry it names.
    fn window(
        &self,
        iter: sled::Iter,
        filter: &EventFilter,
        lookup: impl Fn(sled::IVec, sled::IVec) -> Result<Option<(sled::IVec, sled::IVec)>, StoreError>,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let entries: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> =
            if filter.newest { Box::new(iter.rev()) } else { Box::new(iter) };
        let mut out = Vec::new();
        for item in entries {
            if out.len() >= filter.limit {
                break;
            }
            let (k, v) = item.map_err(backend)?;
            let Some((key, value)) = lookup(k, v)? else { continue };
            let event: StoredEvent = decode(&hex::encode(&key), &value)?;
            if filter.matches(&event) {
                out.push(event);
            }
        }
        if filter.newest {
            out.reverse();
        }
        Ok(out)
    }

    fn all<T: DeserializeOwned>(tree: &sled::Tree) -> Result<Vec<T>, StoreError> {
        tree.iter()
            .map(|item| {
                let (key, value) = item.map_err(backend)?;
                decode(&String::from_utf8_lossy(&key), &value)
            })
            .collect()
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Backend(format!("cannot encode record: {e}")))
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt { key: key.to_owned(), reason: e.to_string() })
}

fn queued_key(node_id: &str, seq: u64) -> Vec<u8> {
    let mut key = queued_prefix(node_id);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn queued_prefix(node_id: &str) -> Vec<u8> {
    let mut key = node_id.as_bytes().to_vec();
    key.push(0);
    key
}

fn cancel_key(node_id: &str, job_id: &str, attempt: u32) -> Vec<u8> {
    let mut key = queued_prefix(node_id);
    key.extend_from_slice(job_id.as_bytes());
    key.push(0);
    key.extend_from_slice(&attempt.to_be_bytes());
    key
}

pub(super) fn be_u64(bytes: Option<impl AsRef<[u8]>>) -> u64 {
    bytes.and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok()).map_or(0, u64::from_be_bytes)
}

fn trigger_name_key(org_id: &str, name: &str) -> Vec<u8> {
    let mut key = queued_prefix(org_id);
    key.extend_from_slice(name.as_bytes());
    key
}

/// Unwraps a transaction result whose abort value is the operation's own answer.
fn settle<T>(result: Result<T, TransactionError<StoreError>>) -> Result<T, StoreError> {
    result.map_err(|e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => backend(e),
    })
}

fn abort(e: StoreError) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(e)
}

/// sled 0.34 opens from the newest `snap.*` file of its directory, and counts among them a
/// `snap.*.generating` it was still writing when it stopped (a full disk, a kill -9): an empty or
/// partial one fails every later open with "Read corrupted data" (found by chaos seed 11 on the
/// agent, whose store is sled too). A snapshot only caches what sled's log holds, and a finished
/// one is renamed, so such a leftover is removed before opening; never while another process
/// holds the database (sled's lock on its `db` file). Returns how many were removed.
fn remove_unfinished_snapshots(dir: &Path) -> std::io::Result<usize> {
    let db = match std::fs::OpenOptions::new().read(true).write(true).open(dir.join("db")) {
        Ok(file) => file,
        // No database yet (or none readable here: sled says why).
        Err(_) => return Ok(0),
    };
    let Ok(_held) = nix::fcntl::Flock::lock(db, nix::fcntl::FlockArg::LockExclusiveNonblock) else {
        return Ok(0);
    };
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            std::fs::remove_file(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Stops the process after a failed flush (see [`SledStore::flush`]).
fn fail_stop(e: &sled::Error) -> ! {
    let why = format!(
        "outpost-control: stopping: the store could not write to disk ({e}); what this process \
         holds in memory may not be on disk, so it stops before serving it. Nothing acknowledged \
         is lost: free space in the data directory and start it again (the service manager does)"
    );
    tracing::error!("{why}");
    eprintln!("{why}");
    std::process::exit(1)
}

impl StateStore for SledStore {
    fn insert_org(&self, org: OrgRecord) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let value = encode(&org)?;
            let swapped = self.orgs.compare_and_swap(org.org.id.as_bytes(), None::<&[u8]>, Some(value));
            if swapped.map_err(backend)?.is_err() {
                return Err(StoreError::AlreadyExists(format!("org {}", org.org.id)));
            }
            self.flush().await
        })
    }

    fn get_org(&self, org_id: &str) -> StoreFuture<'_, Option<OrgRecord>> {
        let org_id = org_id.to_owned();
        Box::pin(async move { Self::get(&self.orgs, &org_id) })
    }

    fn list_orgs(&self) -> StoreFuture<'_, Vec<Org>> {
        Box::pin(async move { Ok(Self::all::<OrgRecord>(&self.orgs)?.into_iter().map(|r| r.org).collect()) })
    }

    fn put_org_settings(
        &self,
        org_id: &str,
        settings: outpost_protocol::OrgSettings,
    ) -> StoreFuture<'_, bool> {
        let org_id = org_id.to_owned();
        Box::pin(async move {
            let Some(old) = self.orgs.get(org_id.as_bytes()).map_err(backend)? else {
                return Err(StoreError::NotFound(format!("org {org_id}")));
            };
            let mut rec: OrgRecord = decode(&org_id, &old)?;
            if rec.settings.revision + 1 != settings.revision {
                return Ok(false);
            }
            rec.settings = settings;
            // Compared with the very bytes read: a change that came in between wins, this one
            // reports the conflict.
            let swapped = self.orgs.compare_and_swap(org_id.as_bytes(), Some(old), Some(encode(&rec)?));
            if swapped.map_err(backend)?.is_err() {
                return Ok(false);
            }
            self.flush().await?;
            Ok(true)
        })
    }

    fn swap_org_keys(&self, before: &OrgRecord, after: &OrgRecord) -> StoreFuture<'_, bool> {
        let (before, after) = (before.clone(), after.clone());
        Box::pin(async move {
            let org_id = after.org.id.clone();
            let Some(old) = self.orgs.get(org_id.as_bytes()).map_err(backend)? else {
                return Err(StoreError::NotFound(format!("org {org_id}")));
            };
            let mut rec: OrgRecord = decode(&org_id, &old)?;
            if !super::same_keys(&rec, &before) {
                return Ok(false);
            }
            super::copy_keys(&mut rec, &after);
            let swapped = self.orgs.compare_and_swap(org_id.as_bytes(), Some(old), Some(encode(&rec)?));
            if swapped.map_err(backend)?.is_err() {
                return Ok(false);
            }
            self.flush().await?;
            Ok(true)
        })
    }

    fn insert_token(&self, token: TokenRecord) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.tokens.insert(token.token_sha256.as_bytes(), encode(&token)?).map_err(backend)?;
            self.flush().await
        })
    }

    fn get_token(&self, token_sha256: &str) -> StoreFuture<'_, Option<TokenRecord>> {
        let key = token_sha256.to_owned();
        Box::pin(async move { Self::get(&self.tokens, &key) })
    }

    fn enroll_node(
        &self,
        token_sha256: &str,
        now_ms: u64,
        node: NodeInfo,
    ) -> StoreFuture<'_, Result<(), TokenRefusal>> {
        let key = token_sha256.to_owned();
        Box::pin(async move {
            let node_value = encode(&node)?;
            let node_entry = sled_index::node_key(&node.org_id, &node.node_id);
            let seen = sled_index::node_value(&node);
            let labels = sled_index::label_keys(&node);
            let trees = (&self.tokens, &self.nodes, &self.node_orgs, &self.node_labels);
            let outcome = trees.transaction(|(tokens, nodes, node_orgs, node_labels)| {
                let record: Option<TokenRecord> =
                    tokens.get(key.as_bytes())?.map(|b| decode(&key, &b)).transpose().map_err(abort)?;
                if let Err(refusal) = check_token(record.as_ref(), &node.org_id, now_ms) {
                    return Ok(Err(refusal));
                }
                if let Some(mut record) = record {
                    record.used_unix_ms = Some(now_ms);
                    record.used_by_node = Some(node.node_id.clone());
                    tokens.insert(key.as_bytes(), encode(&record).map_err(abort)?)?;
                }
                nodes.insert(node.node_id.as_bytes(), node_value.clone())?;
                node_orgs.insert(node_entry.as_slice(), &seen)?;
                for key in &labels {
                    node_labels.insert(key.as_slice(), &[])?;
                }
                Ok(Ok(()))
            });
            let outcome = settle(outcome)?;
            self.flush().await?;
            Ok(outcome)
        })
    }

    fn get_node(&self, node_id: &str) -> StoreFuture<'_, Option<NodeInfo>> {
        let node_id = node_id.to_owned();
        Box::pin(async move { Self::get(&self.nodes, &node_id) })
    }

    fn list_nodes(&self) -> StoreFuture<'_, Vec<NodeInfo>> {
        Box::pin(async move { Self::all(&self.nodes) })
    }

    fn page_nodes(
        &self,
        org_id: Option<&str>,
        offset: usize,
        limit: usize,
    ) -> StoreFuture<'_, Vec<NodeInfo>> {
        let org_id = org_id.map(str::to_owned);
        Box::pin(async move {
            let Some(org_id) = org_id else {
                return self
                    .nodes
                    .iter()
                    .skip(offset)
                    .take(limit)
                    .map(|item| {
                        let (key, value) = item.map_err(backend)?;
                        decode(&String::from_utf8_lossy(&key), &value)
                    })
                    .collect();
            };
            let mut out = Vec::new();
            for item in
                self.node_orgs.scan_prefix(sled_index::node_prefix(Some(&org_id))).skip(offset).take(limit)
            {
                let (key, value) = item.map_err(backend)?;
                let (node_id, _) = sled_index::node_entry(&key, &value)?;
                if let Some(node) = Self::get::<NodeInfo>(&self.nodes, &node_id)? {
                    out.push(node);
                }
            }
            Ok(out)
        })
    }

    fn find_nodes(
        &self,
        org_id: Option<&str>,
        after: Option<&str>,
        label: Option<(String, String)>,
        keep: super::NodeFilter,
        limit: usize,
    ) -> StoreFuture<'_, Vec<NodeInfo>> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let org_id = org_id.map(str::to_owned);
        let after = after.map(str::to_owned);
        Box::pin(async move {
            let mut out = Vec::new();
            // One record: judged from its head, decoded whole only when kept.
            let mut take = |key: &[u8], value: &[u8]| -> Result<bool, StoreError> {
                let name = String::from_utf8_lossy(key);
                let kept = super::node_record_kept(&keep, value)
                    .map_err(|e| StoreError::Corrupt { key: name.to_string(), reason: e.to_string() })?;
                if kept {
                    out.push(decode::<NodeInfo>(&name, value)?);
                }
                Ok(out.len() < limit)
            };
            if limit == 0 {
                return Ok(out);
            }
            match (label, org_id) {
                // Only the nodes that carry the label, in node id order.
                (Some((key, value)), org_id) => {
                    let prefix = sled_index::label_prefix(&key, &value);
                    let start = match &after {
                        Some(a) => Excluded([prefix.as_slice(), a.as_bytes()].concat()),
                        None => Included(prefix.clone()),
                    };
                    for item in self.node_labels.range::<Vec<u8>, _>((start, Unbounded)) {
                        let (entry, _) = item.map_err(backend)?;
                        let Some(node_id) = entry.strip_prefix(prefix.as_slice()) else { break };
                        let Some(record) = self.nodes.get(node_id).map_err(backend)? else {
                            continue;
                        };
                        if org_id
                            .as_deref()
                            .is_some_and(|o| sled_index::node_org(&record).is_none_or(|of| of != o))
                        {
                            continue;
                        }
                        if !take(node_id, &record)? {
                            break;
                        }
                    }
                }
                (None, None) => {
                    let start = match &after {
                        Some(a) => Excluded(a.as_bytes().to_vec()),
                        None => Unbounded,
                    };
                    for item in self.nodes.range::<Vec<u8>, _>((start, Unbounded)) {
                        let (key, value) = item.map_err(backend)?;
                        if !take(&key, &value)? {
                            break;
                        }
                    }
                }
                (None, Some(org_id)) => {
                    let prefix = sled_index::node_prefix(Some(&org_id));
                    let start = match &after {
                        Some(a) => Excluded(sled_index::node_key(&org_id, a)),
                        None => Included(prefix.clone()),
                    };
                    for item in self.node_orgs.range::<Vec<u8>, _>((start, Unbounded)) {
                        let (key, value) = item.map_err(backend)?;
                        if !key.starts_with(&prefix) {
                            break;
                        }
                        let (node_id, _) = sled_index::node_entry(&key, &value)?;
                        let Some(record) = self.nodes.get(node_id.as_bytes()).map_err(backend)? else {
                            continue;
                        };
                        if !take(node_id.as_bytes(), &record)? {
                            break;
                        }
                    }
                }
            }
            Ok(out)
        })
    }

    fn node_presence(&self, org_id: Option<&str>) -> StoreFuture<'_, Vec<super::NodePresence>> {
        let prefix = sled_index::node_prefix(org_id);
        Box::pin(async move {
            self.node_orgs
                .scan_prefix(prefix)
                .map(|item| {
                    let (key, value) = item.map_err(backend)?;
                    let (node_id, last_seen_unix_ms) = sled_index::node_entry(&key, &value)?;
                    Ok(super::NodePresence { node_id, last_seen_unix_ms })
                })
                .collect()
        })
    }

    fn record_heartbeat(
        &self,
        node_id: &str,
        heartbeat: Heartbeat,
        seen_ms: Option<u64>,
    ) -> StoreFuture<'_, ()> {
        let node_id = node_id.to_owned();
        Box::pin(async move {
            self.modify_node(&node_id, |node| {
                if seen_ms.is_some() {
                    node.last_seen_unix_ms = seen_ms;
                }
                node.last_heartbeat = Some(heartbeat.clone());
            })
            .await
            .map(drop)
        })
    }

    fn next_job_seq(&self, node_id: &str) -> StoreFuture<'_, u64> {
        let node_id = node_id.to_owned();
        Box::pin(async move {
            let next = self
                .seqs
                .update_and_fetch(node_id.as_bytes(), |old| {
                    let current = old.and_then(|b| <[u8; 8]>::try_from(b).ok()).map_or(0, u64::from_be_bytes);
                    Some(current.saturating_add(1).to_be_bytes().to_vec())
                })
                .map_err(backend)?;
            let seq =
                next.and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok()).map(u64::from_be_bytes).ok_or_else(
                    || StoreError::Corrupt { key: node_id.clone(), reason: "bad job sequence".into() },
                )?;
            self.flush().await?;
            Ok(seq)
        })
    }

    fn insert_job(&self, job: JobRecord) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let value = encode(&job)?;
            let info = &job.info;
            let trees = (&self.jobs, &self.queued, &self.any_open, &self.job_index);
            let outcome = trees.transaction(|(jobs, queued, any_open, index)| {
                if jobs.get(info.job_id.as_bytes())?.is_some() {
                    return Err(abort(StoreError::AlreadyExists(format!("job {}", info.job_id))));
                }
                jobs.insert(info.job_id.as_bytes(), value.clone())?;
                sled_index::reindex_job(index, None, info)?;
                if info.state == JobState::Queued {
                    queued.insert(queued_key(&info.node_id, info.seq), info.job_id.as_bytes())?;
                }
                if is_open_any(info) {
                    any_open.insert(info.job_id.as_bytes(), &[])?;
                }
                Ok(())
            });
            settle(outcome)?;
            self.flush().await
        })
    }

    fn get_job(&self, job_id: &str) -> StoreFuture<'_, Option<JobRecord>> {
        let job_id = job_id.to_owned();
        Box::pin(async move { Self::get(&self.jobs, &job_id) })
    }

    fn list_jobs(&self, filter: JobFilter) -> StoreFuture<'_, Vec<JobInfo>> {
        Box::pin(async move {
            let prefix = sled_index::job_scan(&filter);
            let mut out = Vec::new();
            for item in self.job_index.scan_prefix(&prefix).rev() {
                if out.len() >= filter.limit {
                    break;
                }
                let (key, _) = item.map_err(backend)?;
                let job_id = sled_index::job_id_of(&prefix, &key)?;
                if let Some(job) = Self::get::<JobRecord>(&self.jobs, job_id)?
                    && filter.matches(&job.info)
                {
                    out.push(job.info);
                }
            }
            Ok(out)
        })
    }

    fn job_counts(&self, org_id: Option<&str>) -> StoreFuture<'_, super::JobCounts> {
        let org_id = org_id.map(str::to_owned);
        Box::pin(async move { sled_index::job_counts(&self.job_index, org_id.as_deref()) })
    }

    fn queued_jobs(&self, node_id: &str, max: usize) -> StoreFuture<'_, Vec<JobRecord>> {
        let prefix = queued_prefix(node_id);
        Box::pin(async move {
            let mut out = Vec::new();
            for item in self.queued.scan_prefix(&prefix).take(max) {
                let (_, job_id) = item.map_err(backend)?;
                let job_id = String::from_utf8_lossy(&job_id).into_owned();
                if let Some(job) = Self::get::<JobRecord>(&self.jobs, &job_id)? {
                    out.push(job);
                }
            }
            Ok(out)
        })
    }

    fn ack_jobs(&self, node_id: &str, job_ids: Vec<String>, now_ms: u64) -> StoreFuture<'_, ()> {
        let node_id = node_id.to_owned();
        Box::pin(async move {
            for job_id in &job_ids {
                let trees = (&self.jobs, &self.queued, &self.job_index);
                let outcome = trees.transaction(|(jobs, queued, index)| {
                    let Some(bytes) = jobs.get(job_id.as_bytes())? else { return Ok(()) };
                    let mut job: JobRecord = decode(job_id, &bytes).map_err(abort)?;
                    let old = job.info.clone();
                    if accept_job(&mut job, &node_id, now_ms) {
                        jobs.insert(job_id.as_bytes(), encode(&job).map_err(abort)?)?;
                        sled_index::reindex_job(index, Some(&old), &job.info)?;
                        queued.remove(queued_key(&node_id, job.info.seq))?;
                    }
                    Ok(())
                });
                settle(outcome)?;
            }
            self.flush().await
        })
    }

    fn store_result(&self, node_id: &str, report: ResultReport) -> StoreFuture<'_, ResultOutcome> {
        let node_id = node_id.to_owned();
        Box::pin(async move {
            let report_value = encode(&report)?;
            let key = report.idempotency_key.as_bytes();
            let trees =
                (&self.jobs, &self.results, &self.queued, &self.cancels, &self.any_open, &self.job_index);
            let outcome = trees.transaction(|(jobs, results, queued, cancels, any_open, index)| {
                let Some(bytes) = jobs.get(report.job_id.as_bytes())? else {
                    return Ok(ResultOutcome::NotYours);
                };
                let mut job: JobRecord = decode(&report.job_id, &bytes).map_err(abort)?;
                let fate = result_fate(&job, &node_id, &report);
                if fate == ResultFate::NotYours {
                    return Ok(ResultOutcome::NotYours);
                }
                if results.get(key)?.is_some() {
                    return Ok(ResultOutcome::Duplicate);
                }
                results.insert(key, report_value.clone())?;
                cancels.remove(cancel_key(&node_id, &report.job_id, report.attempt))?;
                if fate == ResultFate::Current {
                    queued.remove(queued_key(&node_id, job.info.seq))?;
                    any_open.remove(report.job_id.as_bytes())?;
                }
                let old = job.info.clone();
                finish_job(&mut job, fate, report.clone());
                jobs.insert(report.job_id.as_bytes(), encode(&job).map_err(abort)?)?;
                sled_index::reindex_job(index, Some(&old), &job.info)?;
                Ok(match fate {
                    ResultFate::Current => ResultOutcome::Stored,
                    _ => ResultOutcome::Superseded,
                })
            });
            let outcome = settle(outcome)?;
            if matches!(outcome, ResultOutcome::Stored | ResultOutcome::Superseded) {
                self.flush().await?;
            }
            Ok(outcome)
        })
    }

    fn revoke_node(&self, node_id: &str, now_ms: u64) -> StoreFuture<'_, NodeInfo> {
        let node_id = node_id.to_owned();
        Box::pin(async move {
            self.modify_node(&node_id, |node| {
                node.revoked_unix_ms.get_or_insert(now_ms);
            })
            .await
        })
    }

    fn renew_node_cert(
        &self,
        node_id: &str,
        presented_sha256: &str,
        new_sha256: &str,
    ) -> StoreFuture<'_, NodeInfo> {
        let (node_id, presented, new) =
            (node_id.to_owned(), presented_sha256.to_owned(), new_sha256.to_owned());
        Box::pin(async move {
            self.modify_node(&node_id, |node| super::renewed_cert(node, &presented, &new)).await
        })
    }

    fn forget_previous_cert(&self, node_id: &str) -> StoreFuture<'_, NodeInfo> {
        let node_id = node_id.to_owned();
        Box::pin(async move { self.modify_node(&node_id, |node| node.previous_cert_sha256 = None).await })
    }

    fn update_node_labels(
        &self,
        node_id: &str,
        set: Labels,
        remove: Vec<String>,
    ) -> StoreFuture<'_, NodeInfo> {
        let node_id = node_id.to_owned();
        Box::pin(
            async move { self.modify_node(&node_id, |node| change_labels(node, set.clone(), &remove)).await },
        )
    }

    fn reassign_job(&self, job_id: &str, expected_attempt: u32, next: JobRecord) -> StoreFuture<'_, bool> {
        let job_id = job_id.to_owned();
        Box::pin(async move {
            let value = encode(&next)?;
            let trees = (&self.jobs, &self.queued, &self.cancels, &self.job_index);
            let outcome = trees.transaction(|(jobs, queued, cancels, index)| {
                let Some(bytes) = jobs.get(job_id.as_bytes())? else { return Ok(false) };
                let job: JobRecord = decode(&job_id, &bytes).map_err(abort)?;
                if job.info.attempt != expected_attempt || !is_open_any(&job.info) {
                    return Ok(false);
                }
                let reason =
                    format!("superseded by attempt {} on node {}", next.info.attempt, next.info.node_id);
                let stop = cancel_of(&job.info, &reason);
                cancels.insert(
                    cancel_key(&job.info.node_id, &job_id, stop.attempt),
                    encode(&stop).map_err(abort)?,
                )?;
                queued.remove(queued_key(&job.info.node_id, job.info.seq))?;
                queued.insert(queued_key(&next.info.node_id, next.info.seq), job_id.as_bytes())?;
                jobs.insert(job_id.as_bytes(), value.clone())?;
                sled_index::reindex_job(index, Some(&job.info), &next.info)?;
                Ok(true)
            });
            let moved = settle(outcome)?;
            if moved {
                self.flush().await?;
            }
            Ok(moved)
        })
    }

    fn open_any_jobs(&self) -> StoreFuture<'_, Vec<JobRecord>> {
        Box::pin(async move {
            let mut out = Vec::new();
            for item in self.any_open.iter() {
                let (job_id, _) = item.map_err(backend)?;
                let job_id = String::from_utf8_lossy(&job_id).into_owned();
                if let Some(job) =
                    Self::get::<JobRecord>(&self.jobs, &job_id)?.filter(|j| is_open_any(&j.info))
                {
                    out.push(job);
                }
            }
            Ok(out)
        })
    }

    fn cancel_job(&self, job_id: &str, now_ms: u64) -> StoreFuture<'_, CancelOutcome> {
        let job_id = job_id.to_owned();
        Box::pin(async move {
            let trees = (&self.jobs, &self.queued, &self.cancels, &self.any_open, &self.job_index);
            let outcome = trees.transaction(|(jobs, queued, cancels, any_open, index)| {
                let Some(bytes) = jobs.get(job_id.as_bytes())? else { return Ok(CancelOutcome::NotFound) };
                let mut job: JobRecord = decode(&job_id, &bytes).map_err(abort)?;
                let old = job.info.clone();
                let (outcome, ask_node) = apply_cancel(&mut job, now_ms);
                if ask_node {
                    let stop = cancel_of(&job.info, CANCELLED_BY_OPERATOR);
                    let key = cancel_key(&job.info.node_id, &job_id, stop.attempt);
                    cancels.insert(key, encode(&stop).map_err(abort)?)?;
                    jobs.insert(job_id.as_bytes(), encode(&job).map_err(abort)?)?;
                    sled_index::reindex_job(index, Some(&old), &job.info)?;
                }
                if outcome == CancelOutcome::Cancelled {
                    queued.remove(queued_key(&job.info.node_id, job.info.seq))?;
                    any_open.remove(job_id.as_bytes())?;
                }
                Ok(outcome)
            });
            let outcome = settle(outcome)?;
            self.flush().await?;
            Ok(outcome)
        })
    }

    fn put_deployment(&self, d: super::DeploymentRecord) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.deployments.insert(d.key().as_bytes(), encode(&d)?).map_err(backend)?;
            self.flush().await
        })
    }

    fn get_deployment(&self, org_id: &str, name: &str) -> StoreFuture<'_, Option<super::DeploymentRecord>> {
        let key = super::deployment_key(org_id, name);
        Box::pin(async move { Self::get(&self.deployments, &key) })
    }

    fn list_deployments(&self) -> StoreFuture<'_, Vec<super::DeploymentRecord>> {
        Box::pin(async move { Self::all(&self.deployments) })
    }

    fn set_service_desired(
        &self,
        node_id: &str,
        service: &str,
        desired: super::DesiredService,
    ) -> StoreFuture<'_, ()> {
        let key = super::node_service_key(node_id, service);
        let (node_id, service) = (node_id.to_owned(), service.to_owned());
        Box::pin(async move {
            let outcome = self.node_services.transaction(|tree| {
                let mut rec = match tree.get(key.as_bytes())? {
                    Some(bytes) => decode::<super::NodeServiceRecord>(&key, &bytes).map_err(abort)?,
                    None => super::NodeServiceRecord::new(&node_id, &service),
                };
                rec.desired = Some(desired.clone());
                tree.insert(key.as_bytes(), encode(&rec).map_err(abort)?)?;
                Ok(())
            });
            settle(outcome)?;
            self.flush().await
        })
    }

    fn list_node_services(&self, node_id: Option<&str>) -> StoreFuture<'_, Vec<super::NodeServiceRecord>> {
        let prefix = node_id.map(queued_prefix).unwrap_or_default();
        Box::pin(async move {
            self.node_services
                .scan_prefix(&prefix)
                .map(|item| {
                    let (k, v) = item.map_err(backend)?;
                    decode(&String::from_utf8_lossy(&k), &v)
                })
                .collect()
        })
    }

    fn ack_node_services(
        &self,
        node_id: &str,
        acks: Vec<outpost_protocol::ServiceAck>,
    ) -> StoreFuture<'_, ()> {
        let node_id = node_id.to_owned();
        Box::pin(async move {
            let mut changed = false;
            for a in acks {
                let key = super::node_service_key(&node_id, &a.service);
                let outcome = self.node_services.transaction(|tree| {
                    let Some(bytes) = tree.get(key.as_bytes())? else { return Ok(false) };
                    let mut r: super::NodeServiceRecord = decode(&key, &bytes).map_err(abort)?;
                    if a.seq <= r.acked_seq {
                        return Ok(false);
                    }
                    r.acked_seq = a.seq;
                    tree.insert(key.as_bytes(), encode(&r).map_err(abort)?)?;
                    Ok(true)
                });
                changed |= settle(outcome)?;
            }
            if changed {
                self.flush().await?;
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
        Box::pin(async move {
            let mut head_key = NODE_AUDIT_HEAD_PREFIX.to_vec();
            head_key.extend_from_slice(node_id.as_bytes());
            let outcome = (&self.meta, &self.node_audit).transaction(|(meta, audit)| {
                let head: (u64, String) = match meta.get(&head_key)? {
                    Some(b) => decode("node audit head", &b).map_err(abort)?,
                    None => (0, outpost_protocol::AUDIT_GENESIS.to_owned()),
                };
                let fresh = match super::continue_node_audit((head.0, &head.1), entries.clone()) {
                    Ok(fresh) => fresh,
                    Err(why) => {
                        return Ok(super::NodeAuditOutcome {
                            stored: 0,
                            up_to_seq: head.0,
                            refused: Some(why),
                        });
                    }
                };
                let Some(last) = fresh.last() else {
                    return Ok(super::NodeAuditOutcome { stored: 0, up_to_seq: head.0, refused: None });
                };
                let new_head = (last.seq, last.sha256.clone());
                for e in &fresh {
                    let mut key = queued_prefix(&node_id);
                    key.extend_from_slice(&e.seq.to_be_bytes());
                    audit.insert(key, encode(e).map_err(abort)?)?;
                }
                meta.insert(head_key.as_slice(), encode(&new_head).map_err(abort)?)?;
                Ok(super::NodeAuditOutcome {
                    stored: fresh.len() as u32,
                    up_to_seq: new_head.0,
                    refused: None,
                })
            });
            let outcome = settle(outcome)?;
            if outcome.stored > 0 {
                self.flush().await?;
            }
            Ok(outcome)
        })
    }

    fn node_audit(
        &self,
        node_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<outpost_protocol::AuditRecord>> {
        let mut from = queued_prefix(node_id);
        let mut to = from.clone();
        from.extend_from_slice(&after_seq.saturating_add(1).to_be_bytes());
        to.extend_from_slice(&u64::MAX.to_be_bytes());
        Box::pin(async move {
            self.node_audit
                .range(from..=to)
                .take(limit)
                .map(|item| {
                    let (k, v) = item.map_err(backend)?;
                    decode(&String::from_utf8_lossy(&k), &v)
                })
                .collect()
        })
    }

    fn store_service_reports(
        &self,
        node_id: &str,
        reports: Vec<outpost_protocol::ServiceReport>,
    ) -> StoreFuture<'_, u64> {
        let node_id = node_id.to_owned();
        Box::pin(async move {
            let mut last_key = SERVICE_REPORT_LAST_PREFIX.to_vec();
            last_key.extend_from_slice(node_id.as_bytes());
            let outcome = (&self.meta, &self.node_services).transaction(|(meta, services)| {
                let last = be_u64(meta.get(&last_key)?);
                let (fresh, up_to) = super::fresh_service_reports(last, reports.clone());
                for r in fresh {
                    let key = super::node_service_key(&node_id, &r.service);
                    let mut rec = match services.get(key.as_bytes())? {
                        Some(bytes) => decode::<super::NodeServiceRecord>(&key, &bytes).map_err(abort)?,
                        None => super::NodeServiceRecord::new(&node_id, &r.service),
                    };
                    super::apply_service_report(&mut rec, r);
                    services.insert(key.as_bytes(), encode(&rec).map_err(abort)?)?;
                }
                if up_to > last {
                    meta.insert(last_key.as_slice(), &up_to.to_be_bytes())?;
                }
                Ok((up_to, up_to > last))
            });
            let (up_to, stored) = settle(outcome)?;
            if stored {
                self.flush().await?;
            }
            Ok(up_to)
        })
    }

    fn pending_cancels(&self, node_id: &str, max: usize) -> StoreFuture<'_, Vec<CancelAttempt>> {
        let prefix = queued_prefix(node_id);
        Box::pin(async move {
            let mut out = Vec::new();
            for item in self.cancels.scan_prefix(&prefix).take(max) {
                let (key, value) = item.map_err(backend)?;
                out.push(decode(&String::from_utf8_lossy(&key), &value)?);
            }
            Ok(out)
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
        Box::pin(async move {
            let mut last_key = EVENT_LAST_PREFIX.to_vec();
            last_key.extend_from_slice(node_id.as_bytes());
            let outcome =
                (&self.meta, &self.events, &self.event_cursors).transaction(|(meta, stored, cursors)| {
                    let mut tally = EventTally::new(be_u64(meta.get(&last_key)?));
                    let mut cursor = be_u64(meta.get(EVENT_CURSOR_KEY)?);
                    for event in &events {
                        let key = queued_key(&node_id, event.seq);
                        if stored.get(&key)?.is_some() {
                            tally.duplicate(event.seq);
                            continue;
                        }
                        tally.stored(event.seq);
                        cursor += 1;
                        let record = stored_event(cursor, &node_id, &org_id, now_ms, event.clone());
                        stored.insert(key.as_slice(), encode(&record).map_err(abort)?)?;
                        cursors.insert(&cursor.to_be_bytes(), key)?;
                    }
                    meta.insert(EVENT_CURSOR_KEY, &cursor.to_be_bytes())?;
                    meta.insert(last_key.as_slice(), &tally.last.to_be_bytes())?;
                    Ok(tally.outcome)
                });
            let outcome = settle(outcome)?;
            if outcome.stored > 0 {
                self.flush().await?;
            }
            Ok(outcome)
        })
    }

    fn list_events(&self, filter: EventFilter) -> StoreFuture<'_, Vec<StoredEvent>> {
        Box::pin(async move {
            match &filter.order {
                EventOrder::BySeq { node_id, after_seq } => {
                    let from = queued_key(node_id, after_seq.saturating_add(1));
                    let to = queued_key(node_id, u64::MAX);
                    let iter = self.events.range(from..=to);
                    self.window(iter, &filter, |key, value| Ok(Some((key, value))))
                }
                EventOrder::ByCursor { after_cursor, .. } => {
                    let iter = self.event_cursors.range(after_cursor.saturating_add(1).to_be_bytes()..);
                    self.window(iter, &filter, |_, key| {
                        Ok(self.events.get(&key).map_err(backend)?.map(|value| (key, value)))
                    })
                }
            }
        })
    }

    fn add_triggered_job(&self, node_id: &str, seq: u64, job_id: &str) -> StoreFuture<'_, ()> {
        let (node_id, job_id) = (node_id.to_owned(), job_id.to_owned());
        Box::pin(async move {
            let key = queued_key(&node_id, seq);
            let outcome = self.events.transaction(|events| {
                let Some(bytes) = events.get(&key)? else {
                    return Err(abort(StoreError::NotFound(format!("event {seq} of node {node_id}"))));
                };
                let mut event: StoredEvent = decode(&hex::encode(&key), &bytes).map_err(abort)?;
                if event.triggered_jobs.contains(&job_id) {
                    return Ok(false);
                }
                event.triggered_jobs.push(job_id.clone());
                events.insert(key.as_slice(), encode(&event).map_err(abort)?)?;
                Ok(true)
            });
            if settle(outcome)? {
                self.flush().await?;
            }
            Ok(())
        })
    }

    fn insert_trigger(&self, trigger: Trigger) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let value = encode(&trigger)?;
            let name_key = trigger_name_key(&trigger.org_id, &trigger.name);
            let outcome = (&self.triggers, &self.trigger_names).transaction(|(triggers, names)| {
                if triggers.get(trigger.trigger_id.as_bytes())?.is_some() {
                    return Err(abort(StoreError::AlreadyExists(format!("trigger {}", trigger.trigger_id))));
                }
                if names.get(name_key.as_slice())?.is_some() {
                    return Err(abort(StoreError::AlreadyExists(format!(
                        "trigger named {:?} in org {}",
                        trigger.name, trigger.org_id
                    ))));
                }
                triggers.insert(trigger.trigger_id.as_bytes(), value.clone())?;
                names.insert(name_key.as_slice(), trigger.trigger_id.as_bytes())?;
                Ok(())
            });
            settle(outcome)?;
            self.flush().await
        })
    }

    fn list_triggers(&self, org_id: Option<&str>) -> StoreFuture<'_, Vec<Trigger>> {
        let org_id = org_id.map(str::to_owned);
        Box::pin(async move {
            let mut out: Vec<Trigger> = Self::all::<Trigger>(&self.triggers)?
                .into_iter()
                .filter(|t| org_id.as_deref().is_none_or(|o| o == t.org_id))
                .collect();
            sort_triggers(&mut out);
            Ok(out)
        })
    }

    fn get_trigger(&self, trigger_id: &str) -> StoreFuture<'_, Option<Trigger>> {
        let id = trigger_id.to_owned();
        Box::pin(async move { Self::get(&self.triggers, &id) })
    }

    fn delete_trigger(&self, trigger_id: &str) -> StoreFuture<'_, bool> {
        let id = trigger_id.to_owned();
        Box::pin(async move {
            let outcome = (&self.triggers, &self.trigger_names).transaction(|(triggers, names)| {
                let Some(bytes) = triggers.remove(id.as_bytes())? else { return Ok(false) };
                let trigger: Trigger = decode(&id, &bytes).map_err(abort)?;
                names.remove(trigger_name_key(&trigger.org_id, &trigger.name))?;
                Ok(true)
            });
            let removed = settle(outcome)?;
            if removed {
                self.flush().await?;
            }
            Ok(removed)
        })
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
        Box::pin(async move {
            let outcome = (&self.meta, &self.audit).transaction(|(meta, audit)| {
                let last = meta.get(AUDIT_SEQ_KEY)?.and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok());
                let seq = last.map_or(0, u64::from_be_bytes) + 1;
                let entry = AuditEntry {
                    seq,
                    unix_ms: now_ms,
                    actor: actor.clone(),
                    action: action.clone(),
                    detail: detail.clone(),
                    org_id: org_id.clone(),
                };
                meta.insert(AUDIT_SEQ_KEY, &seq.to_be_bytes())?;
                audit.insert(&seq.to_be_bytes(), encode(&entry).map_err(abort)?)?;
                Ok(entry)
            });
            let entry = settle(outcome)?;
            self.flush().await?;
            Ok(entry)
        })
    }

    fn list_audit(&self, org_id: Option<&str>, limit: usize) -> StoreFuture<'_, Vec<AuditEntry>> {
        let org_id = org_id.map(str::to_owned);
        Box::pin(async move {
            let mut entries = Vec::new();
            for item in self.audit.iter().rev() {
                if entries.len() >= limit {
                    break;
                }
                let (key, value) = item.map_err(backend)?;
                let entry = decode::<AuditEntry>(&hex::encode(key), &value)?;
                if org_id.is_none() || entry.org_id == org_id {
                    entries.push(entry);
                }
            }
            entries.reverse();
            Ok(entries)
        })
    }

    fn insert_api_token(&self, token: ApiTokenRecord) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let value = encode(&token)?;
            let name_key = trigger_name_key(&token.info.org_id, &token.info.name);
            let outcome = (&self.api_tokens, &self.api_token_names).transaction(|(tokens, names)| {
                if tokens.get(token.info.id.as_bytes())?.is_some() {
                    return Err(abort(StoreError::AlreadyExists(format!("API token {}", token.info.id))));
                }
                if names.get(name_key.as_slice())?.is_some() {
                    return Err(abort(StoreError::AlreadyExists(format!(
                        "API token named {:?} in org {}",
                        token.info.name, token.info.org_id
                    ))));
                }
                tokens.insert(token.info.id.as_bytes(), value.clone())?;
                names.insert(name_key.as_slice(), token.info.id.as_bytes())?;
                Ok(())
            });
            settle(outcome)?;
            self.flush().await
        })
    }

    fn get_api_token(&self, token_id: &str) -> StoreFuture<'_, Option<ApiTokenRecord>> {
        let id = token_id.to_owned();
        Box::pin(async move { Self::get(&self.api_tokens, &id) })
    }

    fn list_api_tokens(&self, org_id: &str) -> StoreFuture<'_, Vec<ApiTokenInfo>> {
        let org_id = org_id.to_owned();
        Box::pin(async move {
            let mut out: Vec<ApiTokenInfo> = Self::all::<ApiTokenRecord>(&self.api_tokens)?
                .into_iter()
                .filter(|t| t.info.org_id == org_id)
                .map(|t| t.info)
                .collect();
            sort_api_tokens(&mut out);
            Ok(out)
        })
    }

    fn revoke_api_token(&self, token_id: &str, now_ms: u64) -> StoreFuture<'_, Option<ApiTokenInfo>> {
        let id = token_id.to_owned();
        Box::pin(async move {
            let outcome = (&self.api_tokens, &self.api_token_names).transaction(|(tokens, names)| {
                let Some(bytes) = tokens.get(id.as_bytes())? else {
                    return Ok(None);
                };
                let mut token: ApiTokenRecord = decode(&id, &bytes).map_err(abort)?;
                if token.info.revoked_unix_ms.is_none() {
                    token.info.revoked_unix_ms = Some(now_ms);
                    tokens.insert(id.as_bytes(), encode(&token).map_err(abort)?)?;
                    names.remove(trigger_name_key(&token.info.org_id, &token.info.name))?;
                }
                Ok(Some(token.info))
            });
            let revoked = settle(outcome)?;
            self.flush().await?;
            Ok(revoked)
        })
    }
}
