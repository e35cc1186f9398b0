//! The site's approval queue: jobs the site policy holds for a person (`[policy] approval`) wait
//! in the ledger as `AwaitingApproval` (so they survive kill -9 and reboots) until an approver
//! at the site approves or denies them with `outpost approvals`, or until their manifest
//! expires. The running agent answers on a unix socket in its data directory that only root and
//! `[policy] approvers_group` can open; who asked (SO_PEERCRED) goes into the audit entry.
//! `--remember` keeps the image's digest in a local allowlist, so its next jobs run without
//! asking (under `approval = "new-image"`).

use std::collections::BTreeSet;
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

/// Images approved with `--remember`.
pub fn remembered(store: &dyn StateStore) -> Result<BTreeSet<String>, StoreError> {
    match store.get(Tree::Meta, REMEMBERED)? {
        Some(b) => serde_json::from_slice(&b).map_err(|e| StoreError::Corrupt {
            tree: "meta",
            key: "approvals.images".into(),
            message: e.to_string(),
        }),
        None => Ok(BTreeSet::new()),
    }
}

/// The op that adds `digest` to the remembered images (in the approval's own batch).
pub fn remember_op(store: &dyn StateStore, digest: &str) -> Result<Op, StoreError> {
    let mut set = remembered(store)?;
    set.insert(digest.to_owned());
    Ok(Op::Put(Tree::Meta, REMEMBERED.to_vec(), serde_json::to_vec(&set).unwrap_or_default()))
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
