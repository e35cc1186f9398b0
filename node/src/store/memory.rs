//! In-memory twin of the StateStore for unit tests of the core. Not durable, by design.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{Op, Result, StateStore, StoreError, Tree};

type Trees = BTreeMap<Tree, BTreeMap<Vec<u8>, Vec<u8>>>;

#[derive(Debug, Default)]
pub struct MemoryStore {
    trees: Mutex<Trees>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Trees>> {
        self.trees
            .lock()
            .map_err(|_| StoreError::Backend { path: "memory".into(), message: "lock poisoned".into() })
    }
}

impl StateStore for MemoryStore {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.lock()?.get(&tree).and_then(|t| t.get(key).cloned()))
    }

    fn scan(&self, tree: Tree) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(self
            .lock()?
            .get(&tree)
            .map(|t| t.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default())
    }

    fn last(&self, tree: Tree) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        Ok(self.lock()?.get(&tree).and_then(|t| t.iter().next_back().map(|(k, v)| (k.clone(), v.clone()))))
    }

    fn apply(&self, ops: Vec<Op>) -> Result<()> {
        let mut trees = self.lock()?;
        for op in ops {
            match op {
                Op::Put(t, k, v) => {
                    trees.entry(t).or_default().insert(k, v);
                }
                Op::Delete(t, k) => {
                    trees.entry(t).or_default().remove(&k);
                }
            }
        }
        Ok(())
    }
}
