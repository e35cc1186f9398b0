//! The site's approval queue: jobs the site policy holds for a person (`[policy] approval`) wait
//! in the ledger as `AwaitingApproval` (so they survive kill -9 and reboots) until an approver
//! at the site approves or denies them with `outpost approvals`, or until their manifest
//! expires. The running agent answers on a unix socket in its data directory that only root and
//! `[policy] approvers_group` can open; who asked (SO_PEERCRED) goes into the audit entry.
//! `--remember` keeps the image's digest in a local allowlist with the store prefixes its job
//! read from, so its next jobs reading from those prefixes run without asking (under
//! `approval = "new-image"`); `outpost policy show` lists it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::store::{Op, StateStore, StoreError, Tree};

/// The socket, in the data directory.
pub fn socket_path(cfg: &Config) -> PathBuf {
    cfg.data_dir.join("approvals.sock")
}

/// Largest request line the agent reads.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// `meta` key of the images approved with `--remember`.
const REMEMBERED: &[u8] = b"approvals.images";

/// What `outpost approvals` asks the agent (one JSON line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    List,
    Show { id: String },
    Approve { id: String, remember: bool },
    Deny { id: String, reason: String },
}

/// The agent's answer (one JSON line): what was asked for, or why not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Response {
    Ok { body: serde_json::Value },
    Error { error: String },
}

/// A job waiting for approval, as `list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Waiting {
    /// `job_id/attempt`: what `show`, `approve` and `deny` take.
    pub id: String,
    pub since_unix_ms: u64,
    pub expires_unix_ms: u64,
    pub submitter: Option<outpost_protocol::Submitter>,
    pub kind: String,
    pub image: Option<String>,
}

/// Everything an approver agrees to, as `show` tells it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Details {
    pub waiting: Waiting,
    /// The image's name as the site's policy lists it, and the engine's facts about it.
    pub image_name: Option<String>,
    pub image_size_bytes: Option<u64>,
    pub image_created: Option<String>,
    pub command: Vec<String>,
    /// Every input key or prefix with how many objects and bytes it covers now.
    pub inputs: Vec<InputCover>,
    pub output_prefix: Option<String>,
    /// Output bodies the job asks to send, and which of them the egress policy lets out.
    pub egress_asked: Vec<String>,
    pub egress_allowed: Vec<String>,
    pub network: bool,
    pub relaxations: Vec<String>,
    pub memory_mb: u64,
    pub cpu_millis: u64,
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputCover {
    pub key: String,
    pub objects: u64,
    pub bytes: u64,
    /// More objects than were counted.
    pub more: bool,
}

/// An image approved with `--remember`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Remembered {
    /// Prefixes of the local store its later jobs may read without asking: the folders of the
    /// inputs of the jobs approved with `--remember`. Absent for an image remembered before
    /// inputs were (any input).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_prefixes: Option<BTreeSet<String>>,
    /// Who approved it last, and when.
    #[serde(default)]
    pub by: String,
    #[serde(default)]
    pub approved_unix_ms: u64,
}

impl Remembered {
    /// Whether every input of a job lies under what was approved.
    pub fn covers(&self, inputs: &[String]) -> bool {
        match &self.input_prefixes {
            None => true,
            Some(prefixes) => inputs.iter().all(|i| {
                crate::policy::plain_key(i).is_ok()
                    && prefixes
                        .iter()
                        .any(|p| if p.ends_with('/') { i.starts_with(p.as_str()) } else { i == p })
            }),
        }
    }
}

/// The folder an input key was read from (through its last `/`); a key without one stands
/// for itself.
pub fn input_prefix(key: &str) -> String {
    match key.rfind('/') {
        Some(i) => key[..=i].to_owned(),
        None => key.to_owned(),
    }
}

/// Images approved with `--remember`, by digest. The form before inputs were remembered (a
/// list of digests) reads as images with any input.
pub fn remembered(store: &dyn StateStore) -> Result<BTreeMap<String, Remembered>, StoreError> {
    let Some(b) = store.get(Tree::Meta, REMEMBERED)? else { return Ok(BTreeMap::new()) };
    let corrupt = |e: serde_json::Error| StoreError::Corrupt {
        tree: "meta",
        key: "approvals.images".into(),
        message: e.to_string(),
    };
    match serde_json::from_slice::<BTreeMap<String, Remembered>>(&b) {
        Ok(map) => Ok(map),
        Err(e) => match serde_json::from_slice::<BTreeSet<String>>(&b) {
            Ok(older) => Ok(older
                .into_iter()
                .map(|d| (d, Remembered { input_prefixes: None, by: String::new(), approved_unix_ms: 0 }))
                .collect()),
            Err(_) => Err(corrupt(e)),
        },
    }
}

/// The op that remembers `digest` with the folders of `inputs` (added to what was remembered
/// for it before), in the approval's own batch; and the list as it then stands.
pub fn remember_op(
    store: &dyn StateStore,
    digest: &str,
    inputs: &[String],
    by: &str,
    now_unix_ms: u64,
) -> Result<(Op, BTreeMap<String, Remembered>), StoreError> {
    let mut all = remembered(store)?;
    let entry = all.entry(digest.to_owned()).or_insert(Remembered {
        input_prefixes: Some(BTreeSet::new()),
        by: String::new(),
        approved_unix_ms: 0,
    });
    if let Some(prefixes) = &mut entry.input_prefixes {
        prefixes.extend(inputs.iter().map(|k| input_prefix(k)));
    }
    entry.by = by.to_owned();
    entry.approved_unix_ms = now_unix_ms;
    let op = Op::Put(Tree::Meta, REMEMBERED.to_vec(), serde_json::to_vec(&all).unwrap_or_default());
    Ok((op, all))
}

/// The copy of the remembered list `outpost policy show` reads (the ledger is the running
/// agent's alone): `data_dir/approvals-remembered.json`.
pub fn remembered_file(cfg: &Config) -> PathBuf {
    cfg.data_dir.join("approvals-remembered.json")
}

/// Writes [`remembered_file`] whole (a new file renamed over the old one); a failure is
/// logged (the ledger holds the truth, only `policy show` misses it).
pub fn write_remembered_file(cfg: &Config, all: &BTreeMap<String, Remembered>) {
    let path = remembered_file(cfg);
    let tmp = path.with_extension("json.new");
    let written = std::fs::write(&tmp, serde_json::to_vec_pretty(all).unwrap_or_default())
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        tracing::warn!(error = %e, "cannot write the copy of the remembered images `policy show` reads");
    }
}

/// Whether the user `uid` may approve: root, or a member of `group`.
pub fn may_approve(uid: u32, group: Option<&str>) -> Result<String, String> {
    use nix::unistd::{Group, Uid, User};
    let user = User::from_uid(Uid::from_raw(uid)).ok().flatten();
    let name = user.as_ref().map_or_else(|| format!("uid {uid}"), |u| u.name.clone());
    if uid == 0 {
        return Ok(name);
    }
    let Some(group) = group else {
        return Err(format!("{name} may not approve: only root may ([policy] approvers_group is not set)"));
    };
    let Some(g) = Group::from_name(group).ok().flatten() else {
        return Err(format!("{name} may not approve: group {group:?} does not exist"));
    };
    let member = user.as_ref().is_some_and(|u| {
        u.gid == g.gid
            || g.mem.contains(&u.name)
            || std::ffi::CString::new(u.name.clone())
                .ok()
                .and_then(|c| nix::unistd::getgrouplist(&c, u.gid).ok())
                .is_some_and(|gs| gs.contains(&g.gid))
    });
    if member { Ok(name) } else { Err(format!("{name} may not approve: not in group {group:?}")) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    #[test]
    fn remembering_keeps_the_folders_of_the_inputs_and_covers_only_those() {
        let store = MemoryStore::new();
        let inputs = vec!["scans/2026/a.dcm".to_owned(), "notes.txt".to_owned()];
        let (op, all) = remember_op(&store, "sha256:aa", &inputs, "root", 5).expect("op");
        store.apply(vec![op]).expect("apply");
        assert_eq!(remembered(&store).expect("read"), all);
        let r = &all["sha256:aa"];
        assert_eq!(
            r.input_prefixes.as_ref().map(|p| p.iter().cloned().collect::<Vec<_>>()),
            Some(vec!["notes.txt".to_owned(), "scans/2026/".to_owned()])
        );
        assert!(r.covers(&["scans/2026/b.dcm".into()]));
        assert!(r.covers(&[]));
        assert!(!r.covers(&["scans/2025/a.dcm".into()]));
        assert!(!r.covers(&["other.txt".into()]));
        // Approving again with other inputs widens what is remembered.
        let (op, _) = remember_op(&store, "sha256:aa", &["lab/x.csv".into()], "alice", 6).expect("op");
        store.apply(vec![op]).expect("apply");
        let r = remembered(&store).expect("read").remove("sha256:aa").expect("kept");
        assert!(r.covers(&["lab/y.csv".into(), "scans/2026/c.dcm".into()]) && r.by == "alice");
    }

    #[test]
    fn the_list_of_digests_an_older_agent_kept_reads_as_images_with_any_input() {
        let store = MemoryStore::new();
        let older = serde_json::to_vec(&["sha256:bb"]).expect("json");
        store.apply(vec![Op::Put(Tree::Meta, REMEMBERED.to_vec(), older)]).expect("apply");
        let all = remembered(&store).expect("read");
        assert!(all["sha256:bb"].covers(&["anything/at/all".into()]));
        store.apply(vec![Op::Put(Tree::Meta, REMEMBERED.to_vec(), b"{not json".to_vec())]).expect("apply");
        assert!(matches!(remembered(&store), Err(StoreError::Corrupt { .. })));
    }
}
