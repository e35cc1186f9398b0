//! The node's StateStore port: a few named trees of bytes with atomic, durable batches.
//! The ledger, the outbox and the audit log are built on top; nothing above this module
//! imports sled. `apply` returns only once the batch is on disk: that is what lets the agent
//! persist before it acknowledges.

pub mod memory;
pub mod sled_store;

/// The trees the agent keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tree {
    /// One record per job attempt, keyed `job_id/attempt`.
    Jobs,
    /// Small named values: the last accepted sequence number, counters.
    Meta,
    /// The hash-chained audit log, keyed by big-endian sequence number.
    Audit,
    /// The relay's bookkeeping: its event counter, a cursor and a key → ETag index per watch.
    Relay,
    /// The relay's outbox: events not yet sent, keyed by big-endian event sequence number.
    Events,
    /// The signed desired state of each service, keyed by service name.
    Services,
    /// Service status reports not yet acknowledged, keyed by big-endian report sequence number.
    ServiceReports,
}

impl Tree {
    pub const ALL: [Tree; 7] = [
        Tree::Jobs,
        Tree::Meta,
        Tree::Audit,
        Tree::Relay,
        Tree::Events,
        Tree::Services,
        Tree::ServiceReports,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Tree::Jobs => "jobs",
            Tree::Meta => "meta",
            Tree::Audit => "audit",
            Tree::Relay => "relay",
            Tree::Events => "events",
            Tree::Services => "services",
            Tree::ServiceReports => "service_reports",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(Tree, Vec<u8>, Vec<u8>),
    Delete(Tree, Vec<u8>),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store at {path}: {message}")]
    Backend { path: String, message: String },
    #[error("state store record {key} in {tree} is corrupt: {message}")]
    Corrupt { tree: &'static str, key: String, message: String },
}

pub type Result<T> = std::result::Result<T, StoreError>;

pub trait StateStore: Send + Sync + 'static {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Every entry of a tree in key order.
    fn scan(&self, tree: Tree) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
    /// The last entry of a tree in key order.
    fn last(&self, tree: Tree) -> Result<Option<(Vec<u8>, Vec<u8>)>>;
    /// Apply all ops atomically and durably (flushed to disk before returning).
    fn apply(&self, ops: Vec<Op>) -> Result<()>;
}

#[cfg(test)]
pub(crate) mod contract;
