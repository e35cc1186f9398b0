//! sled adapter of the StateStore: one database directory under the data dir, one sled tree
//! per [`Tree`]. Batches run as one multi-tree transaction and are flushed before `apply`
//! returns, so an acknowledged write survives kill -9 and power loss.

use std::path::{Path, PathBuf};

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::{Op, Result, StateStore, StoreError, Tree};

/// How long `open` waits for a lock held by a store that is closing.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug)]
pub struct SledStore {
    db: sled::Db,
    trees: [sled::Tree; 7],
    path: PathBuf,
}

impl SledStore {
    /// Open (or create) the store. Fails clearly when another agent holds the same directory.
    pub fn open(path: &Path) -> Result<Self> {
        let locked = |e: &sled::Error| {
            let text = e.to_string();
            text.contains("lock") || text.contains("WouldBlock")
        };
        let err = |e: sled::Error| {
            let message = if locked(&e) {
                format!("{e}; is another `outpost run` using this data dir?")
            } else {
                e.to_string()
            };
            StoreError::Backend { path: path.display().to_string(), message }
        };
        // A store closed a moment ago in this process can hold its file lock a little longer,
        // while sled's background threads finish; another agent holds it for good. Wait briefly.
        let started = std::time::Instant::now();
        let db = loop {
            match sled::Config::new().path(path).cache_capacity(4 * 1024 * 1024).open() {
                Ok(db) => break db,
                Err(e) if locked(&e) && started.elapsed() < LOCK_WAIT => {
                    std::thread::sleep(std::time::Duration::from_millis(25));
                }
                Err(e) => return Err(err(e)),
            }
        };
        let open = |t: Tree| db.open_tree(t.name()).map_err(err);
        let trees = [
            open(Tree::Jobs)?,
            open(Tree::Meta)?,
            open(Tree::Audit)?,
            open(Tree::Relay)?,
            open(Tree::Events)?,
            open(Tree::Services)?,
            open(Tree::ServiceReports)?,
        ];
        Ok(Self { db, trees, path: path.to_path_buf() })
    }

    fn tree(&self, t: Tree) -> &sled::Tree {
        match t {
            Tree::Jobs => &self.trees[0],
            Tree::Meta => &self.trees[1],
            Tree::Audit => &self.trees[2],
            Tree::Relay => &self.trees[3],
            Tree::Events => &self.trees[4],
            Tree::Services => &self.trees[5],
            Tree::ServiceReports => &self.trees[6],
        }
    }

    fn backend(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Backend { path: self.path.display().to_string(), message: e.to_string() }
    }
}

impl StateStore for SledStore {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.tree(tree).get(key).map_err(|e| self.backend(e))?.map(|v| v.to_vec()))
    }

    fn scan(&self, tree: Tree) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.tree(tree)
            .iter()
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(|e| self.backend(e)))
            .collect()
    }

    fn last(&self, tree: Tree) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        Ok(self.tree(tree).last().map_err(|e| self.backend(e))?.map(|(k, v)| (k.to_vec(), v.to_vec())))
    }

    fn apply(&self, ops: Vec<Op>) -> Result<()> {
        let [jobs, meta, audit, relay, events, services, reports] = &self.trees;
        let res: std::result::Result<(), TransactionError<()>> =
            (jobs, meta, audit, relay, events, services, reports).transaction(|(j, m, a, r, e, s, sr)| {
                for op in &ops {
                    let (t, key) = match op {
                        Op::Put(t, k, _) | Op::Delete(t, k) => (t, k),
                    };
                    let tx = match t {
                        Tree::Jobs => j,
                        Tree::Meta => m,
                        Tree::Audit => a,
                        Tree::Relay => r,
                        Tree::Events => e,
                        Tree::Services => s,
                        Tree::ServiceReports => sr,
                    };
                    match op {
                        Op::Put(_, _, v) => {
                            tx.insert(key.as_slice(), v.as_slice())?;
                        }
                        Op::Delete(..) => {
                            tx.remove(key.as_slice())?;
                        }
                    }
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            });
        res.map_err(|e| self.backend(format!("{e:?}")))?;
        self.db.flush().map_err(|e| self.backend(e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sled_store_passes_the_contract() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(&dir.path().join("db")).expect("open");
        crate::store::contract::run(&store);
    }

    #[test]
    fn a_second_open_while_the_first_is_live_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let _first = SledStore::open(&path).expect("open");
        let err = SledStore::open(&path).expect_err("the directory is held");
        assert!(err.to_string().contains("is another `outpost run` using this data dir?"), "{err}");
    }

    #[test]
    fn writes_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        {
            let store = SledStore::open(&path).expect("open");
            store.apply(vec![Op::Put(Tree::Meta, b"k".to_vec(), b"v".to_vec())]).expect("apply");
        }
        let store = SledStore::open(&path).expect("reopen");
        assert_eq!(store.get(Tree::Meta, b"k").expect("get"), Some(b"v".to_vec()));
    }
}
