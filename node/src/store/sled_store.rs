//! sled adapter of the StateStore: one database directory under the data dir, one sled tree
//! per [`Tree`]. Batches run as one multi-tree transaction and are flushed before `apply`
//! returns, so an acknowledged write survives kill -9 and power loss.
//!
//! A batch whose flush fails (a full disk above all) is already in sled's memory, and there
//! is no taking it back: read back, it would look recorded though it is not on disk, and an
//! agent that acknowledged a job it read there would lose it at the next start (chaos seed 11).
//! So the first failed write fences the store: every later read and write fails, and the agent
//! stops; the next start reads what the disk holds.

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
    /// Why the store is fenced: the first write that failed.
    failed: std::sync::OnceLock<String>,
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
            // Each try: the cleanup is skipped while the lock is held by someone else.
            match remove_unfinished_snapshots(path) {
                Ok(0) => {}
                Ok(n) => {
                    tracing::warn!(path = %path.display(), removed = n, "removed unfinished ledger snapshots left by an interrupted write")
                }
                Err(e) => return Err(err(sled::Error::Io(e))),
            }
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
        Ok(Self { db, trees, path: path.to_path_buf(), failed: std::sync::OnceLock::new() })
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

    /// Refuses every call once a write failed (see the module's documentation).
    fn fenced(&self) -> Result<()> {
        match self.failed.get() {
            None => Ok(()),
            Some(why) => Err(self.backend(format!(
                "a write failed earlier ({why}), so what this process holds may not be on disk; \
                 restart to read the store again"
            ))),
        }
    }

    /// Fences the store after a failed write and says so.
    fn fence(&self, e: impl std::fmt::Display) -> StoreError {
        let why = e.to_string();
        let _ = self.failed.set(why.clone());
        self.backend(why)
    }
}

/// sled 0.34 opens from the newest `snap.*` file of its directory, and counts among them a
/// `snap.*.generating` it was still writing when it stopped (a full disk, a kill -9): an empty or
/// partial one fails every later open with "Read corrupted data", and the store is lost to its
/// owner (chaos seed 11: an agent restarted on a full disk never started again). A snapshot
/// only caches what sled's log holds, and a finished one is renamed, so such a leftover is
/// removed before opening; never while another process holds the database (sled's lock on its
/// `db` file). Returns how many were removed.
pub(crate) fn remove_unfinished_snapshots(dir: &Path) -> std::io::Result<usize> {
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

impl StateStore for SledStore {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.fenced()?;
        Ok(self.tree(tree).get(key).map_err(|e| self.backend(e))?.map(|v| v.to_vec()))
    }

    fn scan(&self, tree: Tree) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.fenced()?;
        self.tree(tree)
            .iter()
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(|e| self.backend(e)))
            .collect()
    }

    fn last(&self, tree: Tree) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        self.fenced()?;
        Ok(self.tree(tree).last().map_err(|e| self.backend(e))?.map(|(k, v)| (k.to_vec(), v.to_vec())))
    }

    fn apply(&self, ops: Vec<Op>) -> Result<()> {
        self.fenced()?;
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
        // No transaction here aborts on purpose: a failure is the storage's.
        res.map_err(|e| self.fence(format!("{e:?}")))?;
        self.db.flush().map_err(|e| self.fence(e))?;
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

    /// Chaos seed 11 (`scripts/chaos --seed 11 --injections 1000`): a job was acknowledged to
    /// the control plane and then missing from the ledger after a restart. Its intake write had
    /// failed on a full disk, but sled kept the batch in memory, the next poll read it back as
    /// recorded and acknowledged it, and the disk never had it. Here a real store fills a real
    /// (size-limited) filesystem: after the first failed write nothing is answered from memory,
    /// and every write that succeeded is there after reopening.
    #[test]
    fn chaos_seed_11_after_a_failed_write_the_store_answers_nothing_it_may_not_hold() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test mounts a small tmpfs to fill: run it as root (CI does)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(mounted.success(), "mount a tmpfs");
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
            }
        }
        let _unmount = Unmount(dir.path().to_path_buf());
        let path = dir.path().join("db");
        let key = |i: usize| format!("job-{i}").into_bytes();
        let put = |i: usize| Op::Put(Tree::Jobs, key(i), vec![b'x'; 3000]);
        let store = SledStore::open(&path).expect("open");
        store.apply(vec![put(0)]).expect("a first write with room");
        // Fill the disk to the last block.
        let free = nix::sys::statvfs::statvfs(dir.path()).expect("statvfs");
        let bytes = free.blocks_available() as u64 * free.fragment_size() as u64;
        let ballast = dir.path().join("ballast");
        let file = std::fs::File::create(&ballast).expect("ballast");
        let _ = nix::fcntl::posix_fallocate(&file, 0, i64::try_from(bytes).expect("size"));
        drop(file);
        // sled may have slack of its own: write until a write fails.
        let mut recorded = vec![0];
        let failed = (1..2000)
            .find(|&i| match store.apply(vec![put(i)]) {
                Ok(()) => {
                    recorded.push(i);
                    false
                }
                Err(_) => true,
            })
            .expect("a write fails on a full disk");
        // The failed batch is in sled's memory; the store must not hand it out.
        let read = store.get(Tree::Jobs, &key(failed)).map(|v| v.map(|bytes| bytes.len()));
        assert!(read.is_err(), "a write that failed is not read back: {read:?} bytes");
        assert!(store.scan(Tree::Jobs).is_err(), "nor listed");
        let again = store.apply(vec![put(0)]).expect_err("no write after a failed one");
        assert!(again.to_string().contains("restart to read the store again"), "{again}");
        drop(store);
        std::fs::remove_file(&ballast).expect("free the disk");
        let store = SledStore::open(&path).expect("reopen with room");
        for i in &recorded {
            assert!(
                store.get(Tree::Jobs, &key(*i)).expect("get").is_some(),
                "write {i} succeeded and is kept"
            );
        }
        store.apply(vec![put(failed)]).expect("writes go on once the store is read again");
    }

    /// Chaos seed 11 (`scripts/chaos --seed 11 --injections 1000`): an agent restarted while its
    /// data directory was full got as far as sled's snapshot at open, which left an empty
    /// `snap.*.generating`; every later start failed with "Read corrupted data", for good.
    #[test]
    fn chaos_seed_11_an_unfinished_snapshot_does_not_keep_the_store_from_opening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        {
            let store = SledStore::open(&path).expect("open");
            store.apply(vec![Op::Put(Tree::Jobs, b"job".to_vec(), b"staged".to_vec())]).expect("apply");
        }
        let leftover = path.join("snap.FFFFFFFFFFFFFFFF.generating");
        std::fs::write(&leftover, b"").expect("an empty snapshot in the making");
        let store = SledStore::open(&path).expect("the store opens");
        assert_eq!(store.get(Tree::Jobs, b"job").expect("get"), Some(b"staged".to_vec()));
        assert!(!leftover.exists(), "the unfinished snapshot is gone");
        // Never from under a process that holds the database: it may be writing one right now.
        std::fs::write(&leftover, b"").expect("write");
        assert_eq!(remove_unfinished_snapshots(&path).expect("look"), 0);
        assert!(leftover.exists(), "left alone while the store is open");
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
