//! The `fs` adapter, the embedded default: objects in a local directory. Several processes may
//! open the same root (the agent, `outpost objects put`, a site's loader): commits and deletes
//! take a cross-process lock, and the crash sweep runs only when a process opens the root
//! alone. It owns everything under its root and must never create, read or remove a file
//! outside it, whatever the key says.
//!
//! ```text
//! ROOT/.lock    flock: shared while a store is open, exclusive while one sweeps at open
//! ROOT/.commit  flock: exclusive around each commit and delete (across processes)
//! ROOT/blobs/   bodies, one file each, named by a random id and never changed once written
//! ROOT/keys/    one metadata file per key (see layout.rs): size, SHA-256, ETag, blob id
//! ROOT/tmp/     metadata being written; emptied on open
//! ```
//! A put streams the body into a new blob (fsync), then writes the metadata to `tmp/`
//! (fsync) and renames it over the key's metadata file (fsync of the directory): that rename
//! is the commit, so readers see the old object or the new one, never a mix. The replaced blob
//! is removed after the commit; a crash in between leaves an unreferenced blob that the next
//! open sweeps.

use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWriteExt};

use super::body::{Digest, VerifyingReader, fill};
use super::{
    ListPage, ObjectMeta, ObjectReader, ObjectStore, ObjectStoreError, PutResult, Result, key, page_limit,
};

mod layout;
mod ops;
mod tree;

use ops::read_record_at;

/// Bytes read from a body per write to the blob file.
const COPY_CHUNK: usize = 256 * 1024;

/// The record behind each key.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    key: String,
    size: u64,
    sha256: String,
    etag: String,
    blob: String,
    modified_unix_ms: u64,
}

impl Record {
    fn meta(&self) -> ObjectMeta {
        ObjectMeta {
            key: self.key.clone(),
            size: self.size,
            etag: self.etag.clone(),
            last_modified_unix_ms: Some(self.modified_unix_ms),
        }
    }
}

#[derive(Clone)]
pub struct FsStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    /// Serialises commits and deletes, so removing an emptied directory never races a put
    /// that is about to rename into it. Bodies stream outside it. Taken with `commit_file`'s
    /// flock, which does the same across processes.
    commit: Mutex<()>,
    commit_file: File,
    _lock: Flock<File>,
}

impl std::fmt::Debug for FsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsStore").field("root", &self.inner.root).finish()
    }
}

impl FsStore {
    /// Open (creating if needed) the store at `root`. When no other process has it open, first
    /// empty `tmp/` and remove blobs no key refers to (what a crash mid-put leaves).
    pub async fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        let inner = blocking(move || {
            for d in ["blobs", "keys", "tmp"] {
                std::fs::create_dir_all(root.join(d))
                    .map_err(|e| ObjectStoreError::io(format!("creating {}", root.join(d).display()), e))?;
            }
            let lock_path = root.join(".lock");
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(|e| ObjectStoreError::io(format!("opening {}", lock_path.display()), e))?;
            let commit_path = root.join(".commit");
            let commit_file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&commit_path)
                .map_err(|e| ObjectStoreError::io(format!("opening {}", commit_path.display()), e))?;
            let lock_err = |errno: nix::errno::Errno| {
                ObjectStoreError::io(format!("locking {}", lock_path.display()), std::io::Error::from(errno))
            };
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                // Alone: nobody can be mid-put, so leftovers are a crash's and safe to sweep.
                Ok(lock) => {
                    let inner = Inner { root, commit: Mutex::new(()), commit_file, _lock: lock };
                    inner.sweep()?;
                    inner._lock.relock(FlockArg::LockShared).map_err(lock_err)?;
                    Ok(inner)
                }
                // Others have it open: join them (waiting out a sweep in progress), no sweep.
                Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
                    let lock = Flock::lock(file, FlockArg::LockShared).map_err(|(_, e)| lock_err(e))?;
                    Ok(Inner { root, commit: Mutex::new(()), commit_file, _lock: lock })
                }
                Err((_, errno)) => Err(lock_err(errno)),
            }
        })
        .await?;
        Ok(FsStore { inner: Arc::new(inner) })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = Arc::clone(&self.inner);
        blocking(move || f(&inner)).await
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ObjectStoreError::Unavailable {
        message: format!("fs object store task failed: {e}"),
        retryable: false,
    })?
}

fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default()
}

/// A record whose blob may be replaced (and removed) by a concurrent put: retry a few times.
const REPLACED_RETRIES: usize = 3;

impl ObjectStore for FsStore {
    async fn put<R>(&self, key: &str, mut body: R) -> Result<PutResult>
    where
        R: AsyncRead + Unpin + Send,
    {
        key::validate(key)?;
        let blob = uuid::Uuid::new_v4().to_string();
        let blob_path = self.inner.blob_path(&blob);
        let written = write_blob(&blob_path, &mut body).await;
        let (size, sha256) = match written {
            Ok(v) => v,
            Err(e) => {
                let _ = tokio::fs::remove_file(&blob_path).await;
                return Err(e);
            }
        };
        let record = Record {
            key: key.to_string(),
            size,
            etag: sha256.clone(),
            sha256: sha256.clone(),
            blob,
            modified_unix_ms: now_unix_ms(),
        };
        let etag = record.etag.clone();
        let committed = self
            .run(move |inner| {
                tree::sync_dir(&inner.root.join("blobs"))?;
                inner.commit(&record)
            })
            .await;
        if let Err(e) = committed {
            let _ = tokio::fs::remove_file(&blob_path).await;
            return Err(e);
        }
        Ok(PutResult { size, sha256, etag })
    }

    async fn get(&self, key: &str) -> Result<ObjectReader> {
        key::validate(key)?;
        for _ in 0..REPLACED_RETRIES {
            let k = key.to_string();
            let Some(record) = self.run(move |inner| inner.read_record(&k)).await? else {
                return Err(ObjectStoreError::NotFound { key: key.to_string() });
            };
            match tokio::fs::File::open(self.inner.blob_path(&record.blob)).await {
                Ok(file) => {
                    let reader = tokio::io::BufReader::with_capacity(COPY_CHUNK, file);
                    return Ok(Box::pin(VerifyingReader::new(reader, record.size, record.sha256)));
                }
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(ObjectStoreError::io(
                        format!("opening the body of {}", key::display(key)),
                        e,
                    ));
                }
            }
        }
        Err(ObjectStoreError::Unavailable {
            message: format!("{} kept changing while it was opened", key::display(key)),
            retryable: true,
        })
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta> {
        key::validate(key)?;
        let k = key.to_string();
        match self.run(move |inner| inner.read_record(&k)).await? {
            Some(r) => Ok(r.meta()),
            None => Err(ObjectStoreError::NotFound { key: key.to_string() }),
        }
    }

    async fn delete(&self, key: &str) -> Result<()> {
        key::validate(key)?;
        let k = key.to_string();
        self.run(move |inner| inner.delete(&k)).await
    }

    async fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Result<ListPage> {
        key::validate_prefix(prefix)?;
        let (prefix, start_after, limit) =
            (prefix.to_string(), start_after.map(str::to_string), page_limit(limit));
        self.run(move |inner| {
            let mut found = Vec::with_capacity(limit + 1);
            let query = tree::Query { prefix: &prefix, start_after: start_after.as_deref(), want: limit + 1 };
            tree::walk(&inner.keys(), "", &query, &mut |path| read_record_at(path, None), &mut found)?;
            let next_start_after = (found.len() > limit).then(|| {
                found.truncate(limit);
                found.last().map(|r| r.key.clone())
            });
            Ok(ListPage {
                objects: found.iter().map(Record::meta).collect(),
                next_start_after: next_start_after.flatten(),
            })
        })
        .await
    }

    async fn copy(&self, from: &str, to: &str) -> Result<ObjectMeta> {
        key::validate(from)?;
        key::validate(to)?;
        let (from, to) = (from.to_string(), to.to_string());
        self.run(move |inner| {
            for _ in 0..REPLACED_RETRIES {
                let Some(src) = inner.read_record(&from)? else {
                    return Err(ObjectStoreError::NotFound { key: from.clone() });
                };
                let blob = uuid::Uuid::new_v4().to_string();
                let (old, new) = (inner.blob_path(&src.blob), inner.blob_path(&blob));
                // Blobs never change, so a second name for the same inode is a full copy.
                match std::fs::hard_link(&old, &new).or_else(|_| std::fs::copy(&old, &new).map(drop)) {
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => return Err(ObjectStoreError::io(format!("copying {}", old.display()), e)),
                    Ok(()) => {}
                }
                tree::sync_dir(&inner.root.join("blobs"))?;
                let record = Record { key: to.clone(), blob, modified_unix_ms: now_unix_ms(), ..src };
                if let Err(e) = inner.commit(&record) {
                    let _ = std::fs::remove_file(&new);
                    return Err(e);
                }
                return Ok(record.meta());
            }
            Err(ObjectStoreError::Unavailable {
                message: format!("{} kept changing while it was copied", key::display(&from)),
                retryable: true,
            })
        })
        .await
    }
}

async fn write_blob<R: AsyncRead + Unpin>(path: &Path, body: &mut R) -> Result<(u64, String)> {
    let mut file = tokio::fs::File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .await
        .map_err(|e| ObjectStoreError::io(format!("creating {}", path.display()), e))?;
    let mut digest = Digest::default();
    let mut buf = Vec::with_capacity(COPY_CHUNK);
    loop {
        let ended = fill(body, &mut buf, COPY_CHUNK, &mut digest)
            .await
            .map_err(|e| ObjectStoreError::io("reading the object body", e))?;
        file.write_all(&buf)
            .await
            .map_err(|e| ObjectStoreError::io(format!("writing {}", path.display()), e))?;
        if ended {
            break;
        }
    }
    file.sync_all().await.map_err(|e| ObjectStoreError::io(format!("syncing {}", path.display()), e))?;
    Ok(digest.finish())
}
