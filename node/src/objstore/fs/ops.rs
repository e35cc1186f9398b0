//! The fs adapter's file operations, run on a blocking thread: reading metadata, committing a
//! record with one rename, deleting, and sweeping what a crash left behind.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use super::layout::KeyPath;
use super::{Inner, ObjectStoreError, Record, Result, key, tree};

impl Inner {
    pub(super) fn keys(&self) -> PathBuf {
        self.root.join("keys")
    }
    pub(super) fn blob_path(&self, id: &str) -> PathBuf {
        self.root.join("blobs").join(id)
    }

    /// `Ok(None)` when the key has no object.
    pub(super) fn read_record(&self, key: &str) -> Result<Option<Record>> {
        read_record_at(&KeyPath::of(key).meta_under(&self.keys()), Some(key))
    }

    /// Both commit locks: this process's threads, then other processes. The flock comes first in
    /// the returned tuple so it is released first: the next thread of this process locks the
    /// same open file description, and must not take it before this one's unlock lands.
    fn commit_guard(&self) -> Result<(nix::fcntl::Flock<std::fs::File>, std::sync::MutexGuard<'_, ()>)> {
        let local = self.commit.lock().unwrap_or_else(|p| p.into_inner());
        let file = self
            .commit_file
            .try_clone()
            .map_err(|e| ObjectStoreError::io("duplicating the commit lock", e))?;
        let shared =
            nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, errno)| {
                ObjectStoreError::io("taking the commit lock", std::io::Error::from(errno))
            })?;
        Ok((shared, local))
    }

    /// Make `record` the object of its key, then remove the blob it replaced.
    pub(super) fn commit(&self, record: &Record) -> Result<()> {
        let path = KeyPath::of(&record.key);
        let _guard = self.commit_guard()?;
        let dir = tree::make_dirs(&self.keys(), &self.root.join("tmp"), &path)?;
        let target = dir.join(&path.meta_name);
        let old = read_record_at(&target, Some(&record.key))?;
        let tmp = self.root.join("tmp").join(format!("{}.meta", uuid::Uuid::new_v4()));
        let bytes =
            serde_json::to_vec(record).map_err(|e| ObjectStoreError::io("encoding metadata", e.into()))?;
        tree::write_durably(&tmp, &bytes)?;
        std::fs::rename(&tmp, &target)
            .map_err(|e| ObjectStoreError::io(format!("committing {}", target.display()), e))?;
        tree::sync_dir(&dir)?;
        if let Some(old) = old.filter(|o| o.blob != record.blob) {
            remove_if_present(&self.blob_path(&old.blob))?;
        }
        Ok(())
    }

    pub(super) fn delete(&self, key: &str) -> Result<()> {
        let path = KeyPath::of(key);
        let _guard = self.commit_guard()?;
        let dir = path.dir_under(&self.keys());
        let target = dir.join(&path.meta_name);
        let Some(old) = read_record_at(&target, Some(key))? else { return Ok(()) };
        remove_if_present(&target)?;
        tree::sync_dir(&dir)?;
        remove_if_present(&self.blob_path(&old.blob))?;
        tree::prune_empty_dirs(&self.keys(), &path)
    }

    /// Empty `tmp/` and remove blobs no metadata refers to (left by a crash mid-put).
    pub(super) fn sweep(&self) -> Result<()> {
        let tmp = self.root.join("tmp");
        for entry in read_dir(&tmp)? {
            let p = entry.path();
            let r = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
            r.map_err(|e| ObjectStoreError::io(format!("clearing {}", p.display()), e))?;
        }
        let mut referenced = std::collections::HashSet::new();
        let mut unsure = false;
        tree::for_each_record(&self.keys(), &mut |path| {
            match read_record_at(path, None) {
                Ok(Some(r)) => {
                    referenced.insert(r.blob);
                }
                Ok(None) => {}
                // Its key reads as an integrity error; which blob it names is unknown, so no
                // blob may be swept this time.
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable object metadata; keeping every blob");
                    unsure = true;
                }
            }
            Ok(())
        })?;
        if unsure {
            return Ok(());
        }
        for entry in read_dir(&self.root.join("blobs"))? {
            if !referenced.contains(entry.file_name().to_string_lossy().as_ref()) {
                remove_if_present(&entry.path())?;
            }
        }
        Ok(())
    }
}

fn read_dir(dir: &Path) -> Result<Vec<std::fs::DirEntry>> {
    let it =
        std::fs::read_dir(dir).map_err(|e| ObjectStoreError::io(format!("listing {}", dir.display()), e))?;
    it.collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| ObjectStoreError::io(format!("listing {}", dir.display()), e))
}

/// Read a metadata file; `None` if absent. With `expect_key`, a record for another key (a
/// SHA-256 name collision, or a file someone moved) is an integrity error, not that key's object.
pub(super) fn read_record_at(path: &Path, expect_key: Option<&str>) -> Result<Option<Record>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound || e.kind() == ErrorKind::NotADirectory => return Ok(None),
        Err(e) => return Err(ObjectStoreError::io(format!("reading {}", path.display()), e)),
    };
    let record: Record = serde_json::from_slice(&bytes).map_err(|e| ObjectStoreError::Integrity {
        key: expect_key.unwrap_or_default().to_string(),
        message: format!("metadata file {} is unreadable: {e}", path.display()),
    })?;
    if let Some(k) = expect_key
        && record.key != k
    {
        return Err(ObjectStoreError::Integrity {
            key: k.to_string(),
            message: format!("metadata file {} belongs to key {}", path.display(), key::display(&record.key)),
        });
    }
    Ok(Some(record))
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            Err(ObjectStoreError::io(format!("removing {}", path.display()), e))
        }
        _ => Ok(()),
    }
}
