//! The listing indexes of the sled store. A page of jobs or nodes, and the counts an overview
//! shows, are read from ordered keys instead of decoding every record: with 10,000 nodes and
//! their jobs a console page reads its 25 records, not all of them.
//!
//! `job_index` holds, per job, one key per way of listing it, each ending in the submission
//! time (big endian) and the job id, so a reverse prefix scan yields the newest first:
//!
//! | key | lists |
//! |---|---|
//! | `a` time id | every job |
//! | `o` org `\0` time id | an organisation's jobs |
//! | `n` node `\0` time id | a node's jobs |
//! | `g` group `\0` time id | a job group's jobs |
//! | `S` state time id | jobs in one state |
//! | `s` org `\0` state time id | an organisation's jobs in one state |
//! | `F` time id | failed jobs ([`job_failed`]) |
//! | `f` org `\0` time id | an organisation's failed jobs |
//!
//! and, per organisation and state, `c` org `\0` state → the number of such jobs (u64 big
//! endian). Every write of a job record moves its keys and counts in the same transaction
//! ([`reindex_job`]). `node_orgs` holds `org \0 node` → the node's stored last-seen time (u64
//! big endian, 0 for never), written with every node record. `node_labels` holds
//! `key=value \0 node` per effective label of a node (empty value), moved with every node
//! record, so a listing filtered by a `key=value` selector term reads only those nodes.
//!
//! A database written before the indexes existed is indexed once when it is opened
//! ([`INDEX_VERSION`]).

use std::collections::{BTreeSet, HashMap};

use outpost_protocol::{JobInfo, JobState, NodeInfo};
use sled::transaction::{TransactionalTree, UnabortableTransactionError};

use super::sled_store::be_u64;
use super::{JobCounts, JobFilter, JobRecord, StoreError, job_failed};

/// `meta` key of the version of the listing indexes the database holds.
pub(super) const INDEX_VERSION_KEY: &[u8] = b"listing_index_version";
/// Raised whenever the keys above change meaning: an older database is re-indexed on open.
pub(super) const INDEX_VERSION: u64 = 2;

const ALL: u8 = b'a';
const ORG: u8 = b'o';
const NODE: u8 = b'n';
const GROUP: u8 = b'g';
const STATE: u8 = b'S';
const ORG_STATE: u8 = b's';
const FAILED: u8 = b'F';
const ORG_FAILED: u8 = b'f';
const COUNT: u8 = b'c';

const STATES: [JobState; 4] = [JobState::Queued, JobState::Accepted, JobState::Finished, JobState::Cancelled];

fn state_byte(state: JobState) -> u8 {
    match state {
        JobState::Queued => b'q',
        JobState::Accepted => b'a',
        JobState::Finished => b'f',
        JobState::Cancelled => b'c',
    }
}

fn state_of_byte(b: u8) -> Option<JobState> {
    STATES.into_iter().find(|s| state_byte(*s) == b)
}

fn kind(kind: u8) -> Vec<u8> {
    vec![kind]
}

fn named(kind: u8, name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + 2);
    key.push(kind);
    key.extend_from_slice(name.as_bytes());
    key.push(0);
    key
}

fn with_state(mut prefix: Vec<u8>, state: JobState) -> Vec<u8> {
    prefix.push(state_byte(state));
    prefix
}

fn ordered(mut prefix: Vec<u8>, info: &JobInfo) -> Vec<u8> {
    prefix.extend_from_slice(&info.submitted_unix_ms.to_be_bytes());
    prefix.extend_from_slice(info.job_id.as_bytes());
    prefix
}

/// Every `job_index` listing key that names this job as it is now.
fn job_keys(info: &JobInfo) -> Vec<Vec<u8>> {
    let mut keys = vec![
        ordered(kind(ALL), info),
        ordered(named(ORG, &info.org_id), info),
        ordered(named(NODE, &info.node_id), info),
        ordered(with_state(kind(STATE), info.state), info),
        ordered(with_state(named(ORG_STATE, &info.org_id), info.state), info),
    ];
    if let Some(group) = &info.group_id {
        keys.push(ordered(named(GROUP, group), info));
    }
    if job_failed(info) {
        keys.push(ordered(kind(FAILED), info));
        keys.push(ordered(named(ORG_FAILED, &info.org_id), info));
    }
    keys
}

fn count_key(org_id: &str, state: JobState) -> Vec<u8> {
    with_state(named(COUNT, org_id), state)
}

/// Within a transaction: moves a job's listing keys and counts from how it was stored (`old`,
/// `None` for a new job) to how it is stored now.
pub(super) fn reindex_job(
    index: &TransactionalTree,
    old: Option<&JobInfo>,
    new: &JobInfo,
) -> Result<(), UnabortableTransactionError> {
    let before = old.map(job_keys).unwrap_or_default();
    let after = job_keys(new);
    for key in before.iter().filter(|k| !after.contains(k)) {
        index.remove(key.as_slice())?;
    }
    for key in after.iter().filter(|k| !before.contains(k)) {
        index.insert(key.as_slice(), &[])?;
    }
    let moved = old.is_none_or(|o| o.state != new.state || o.org_id != new.org_id);
    if moved {
        if let Some(o) = old {
            let key = count_key(&o.org_id, o.state);
            let n = be_u64(index.get(&key)?).saturating_sub(1);
            index.insert(key, &n.to_be_bytes())?;
        }
        let key = count_key(&new.org_id, new.state);
        let n = be_u64(index.get(&key)?).saturating_add(1);
        index.insert(key, &n.to_be_bytes())?;
    }
    Ok(())
}

/// The `job_index` prefix whose keys are a superset of the jobs `filter` matches, the narrowest
/// one it names; the scan still checks each job against the whole filter.
pub(super) fn job_scan(filter: &JobFilter) -> Vec<u8> {
    if let Some(node) = &filter.node_id {
        return named(NODE, node);
    }
    if let Some(group) = &filter.group_id {
        return named(GROUP, group);
    }
    match (&filter.org_id, filter.failed, filter.state) {
        (Some(org), true, _) => named(ORG_FAILED, org),
        (None, true, _) => kind(FAILED),
        (Some(org), false, Some(state)) => with_state(named(ORG_STATE, org), state),
        (None, false, Some(state)) => with_state(kind(STATE), state),
        (Some(org), false, None) => named(ORG, org),
        (None, false, None) => kind(ALL),
    }
}

/// The job id a listing key of `prefix` ends with.
pub(super) fn job_id_of<'k>(prefix: &[u8], key: &'k [u8]) -> Result<&'k str, StoreError> {
    key.get(prefix.len() + 8..).and_then(|id| std::str::from_utf8(id).ok()).ok_or_else(|| {
        StoreError::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            reason: "not a job listing key".into(),
        }
    })
}

/// The counts of `org_id` (or of all organisations) read from the kept counters.
pub(super) fn job_counts(index: &sled::Tree, org_id: Option<&str>) -> Result<JobCounts, StoreError> {
    let prefix = org_id.map_or_else(|| kind(COUNT), |org| named(COUNT, org));
    let mut counts = JobCounts::default();
    for item in index.scan_prefix(&prefix) {
        let (key, value) = item.map_err(|e| StoreError::Backend(e.to_string()))?;
        let state = key.last().copied().and_then(state_of_byte).ok_or_else(|| StoreError::Corrupt {
            key: String::from_utf8_lossy(&key).into_owned(),
            reason: "not a job count key".into(),
        })?;
        counts.add(state, be_u64(Some(value)));
    }
    Ok(counts)
}

pub(super) fn node_key(org_id: &str, node_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(org_id.len() + node_id.len() + 1);
    key.extend_from_slice(org_id.as_bytes());
    key.push(0);
    key.extend_from_slice(node_id.as_bytes());
    key
}

pub(super) fn node_prefix(org_id: Option<&str>) -> Vec<u8> {
    org_id.map(|org| node_key(org, "")).unwrap_or_default()
}

/// The node id and stored last-seen time of a `node_orgs` entry.
pub(super) fn node_entry(key: &[u8], value: &[u8]) -> Result<(String, Option<u64>), StoreError> {
    let at = key.iter().position(|b| *b == 0).ok_or_else(|| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: "not a node listing key".into(),
    })?;
    let node_id = String::from_utf8_lossy(&key[at + 1..]).into_owned();
    let seen = be_u64(Some(value));
    Ok((node_id, (seen > 0).then_some(seen)))
}

pub(super) fn node_value(node: &NodeInfo) -> [u8; 8] {
    node.last_seen_unix_ms.unwrap_or(0).to_be_bytes()
}

/// The `node_labels` entries of a node: `key=value NUL node_id` per effective label (its own
/// from its last heartbeat, the operator's winning). A `key=value` text two labels could share
/// (an `=` in a key) costs a wasted read, never a missed node: the filter judges every record.
pub(super) fn label_keys(node: &NodeInfo) -> BTreeSet<Vec<u8>> {
    node.effective_labels().iter().map(|(k, v)| label_key(k, v, &node.node_id)).collect()
}

fn label_key(key: &str, value: &str, node_id: &str) -> Vec<u8> {
    let mut out = label_prefix(key, value);
    out.extend_from_slice(node_id.as_bytes());
    out
}

/// The organisation of a stored node record, read no further; `None` when unreadable.
pub(super) fn node_org(record: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Head {
        org_id: String,
    }
    serde_json::from_slice::<Head>(record).ok().map(|h| h.org_id)
}

/// Where the nodes carrying `key=value` are listed, in node id order.
pub(super) fn label_prefix(key: &str, value: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + value.len() + 2);
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value.as_bytes());
    out.push(0);
    out
}

/// Builds the indexes from the records when the database holds none of this version (written
/// before they existed, or by a run that stopped while building them): clears them, indexes
/// every job and node, flushes, and only then records the version.
pub(super) fn build_if_missing(
    meta: &sled::Tree,
    jobs: &sled::Tree,
    nodes: &sled::Tree,
    job_index: &sled::Tree,
    node_orgs: &sled::Tree,
    node_labels: &sled::Tree,
    db: &sled::Db,
) -> Result<(), StoreError> {
    let backend = |e: sled::Error| StoreError::Backend(e.to_string());
    if be_u64(meta.get(INDEX_VERSION_KEY).map_err(backend)?) == INDEX_VERSION {
        return Ok(());
    }
    let started = std::time::Instant::now();
    job_index.clear().map_err(backend)?;
    node_orgs.clear().map_err(backend)?;
    node_labels.clear().map_err(backend)?;
    let mut counts: HashMap<Vec<u8>, u64> = HashMap::new();
    let mut indexed = 0u64;
    for item in jobs.iter() {
        let (key, value) = item.map_err(backend)?;
        let job: JobRecord = serde_json::from_slice(&value).map_err(|e| StoreError::Corrupt {
            key: String::from_utf8_lossy(&key).into_owned(),
            reason: e.to_string(),
        })?;
        for k in job_keys(&job.info) {
            job_index.insert(k, &[]).map_err(backend)?;
        }
        *counts.entry(count_key(&job.info.org_id, job.info.state)).or_default() += 1;
        indexed += 1;
    }
    for (key, n) in counts {
        job_index.insert(key, &n.to_be_bytes()).map_err(backend)?;
    }
    let mut nodes_indexed = 0u64;
    for item in nodes.iter() {
        let (key, value) = item.map_err(backend)?;
        let node: NodeInfo = serde_json::from_slice(&value).map_err(|e| StoreError::Corrupt {
            key: String::from_utf8_lossy(&key).into_owned(),
            reason: e.to_string(),
        })?;
        node_orgs.insert(node_key(&node.org_id, &node.node_id), &node_value(&node)).map_err(backend)?;
        for key in label_keys(&node) {
            node_labels.insert(key, &[]).map_err(backend)?;
        }
        nodes_indexed += 1;
    }
    db.flush().map_err(backend)?;
    meta.insert(INDEX_VERSION_KEY, &INDEX_VERSION.to_be_bytes()).map_err(backend)?;
    db.flush().map_err(backend)?;
    if indexed + nodes_indexed > 0 {
        tracing::info!(
            jobs = indexed,
            nodes = nodes_indexed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "built the store's listing indexes"
        );
    }
    Ok(())
}

/// Whether the indexes hold exactly the keys the records call for, no stale one left behind
/// (tests: a stale key costs only a wasted read in a listing, so listings alone cannot tell).
#[cfg(test)]
pub(super) fn check_exact(
    jobs: &sled::Tree,
    nodes: &sled::Tree,
    job_index: &sled::Tree,
    node_orgs: &sled::Tree,
    node_labels: &sled::Tree,
) -> Result<(), String> {
    let mut want = BTreeSet::new();
    for item in jobs.iter() {
        let (_, value) = item.map_err(|e| e.to_string())?;
        let job: JobRecord = serde_json::from_slice(&value).map_err(|e| e.to_string())?;
        want.extend(job_keys(&job.info));
    }
    let have: BTreeSet<Vec<u8>> = job_index
        .iter()
        .keys()
        .filter_map(Result::ok)
        .map(|k| k.to_vec())
        .filter(|k| k.first() != Some(&COUNT))
        .collect();
    if have != want {
        let stale: Vec<_> = have.difference(&want).map(|k| String::from_utf8_lossy(k).into_owned()).collect();
        let missing: Vec<_> =
            want.difference(&have).map(|k| String::from_utf8_lossy(k).into_owned()).collect();
        return Err(format!("job index: stale {stale:?}, missing {missing:?}"));
    }
    let mut want = BTreeSet::new();
    let mut want_labels = BTreeSet::new();
    for item in nodes.iter() {
        let (_, value) = item.map_err(|e| e.to_string())?;
        let node: NodeInfo = serde_json::from_slice(&value).map_err(|e| e.to_string())?;
        want.insert((node_key(&node.org_id, &node.node_id), node_value(&node).to_vec()));
        want_labels.extend(label_keys(&node));
    }
    let have_labels: BTreeSet<Vec<u8>> =
        node_labels.iter().keys().filter_map(Result::ok).map(|k| k.to_vec()).collect();
    if have_labels != want_labels {
        let stale: Vec<_> =
            have_labels.difference(&want_labels).map(|k| String::from_utf8_lossy(k).into_owned()).collect();
        let missing: Vec<_> =
            want_labels.difference(&have_labels).map(|k| String::from_utf8_lossy(k).into_owned()).collect();
        return Err(format!("label index: stale {stale:?}, missing {missing:?}"));
    }
    let have: BTreeSet<_> =
        node_orgs.iter().filter_map(Result::ok).map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
    if have != want {
        return Err(format!("node index: {} entries, {} nodes", have.len(), want.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_bytes_round_trip() {
        for s in STATES {
            assert_eq!(state_of_byte(state_byte(s)), Some(s));
        }
        assert_eq!(state_of_byte(b'x'), None);
    }

    #[test]
    fn node_entries_read_back() {
        let key = node_key("org-1", "node-7");
        assert_eq!(node_entry(&key, &5u64.to_be_bytes()).unwrap(), ("node-7".to_owned(), Some(5)));
        assert_eq!(node_entry(&key, &0u64.to_be_bytes()).unwrap().1, None, "0 is never seen");
        assert!(node_entry(b"no-separator", &[]).is_err());
        assert!(key.starts_with(&node_prefix(Some("org-1"))));
        assert!(!key.starts_with(&node_prefix(Some("org"))), "an org id is not a prefix of a longer one");
    }
}
