//! Staging inputs: every object a job names is copied, streamed, from the local store into a
//! fresh directory that becomes its read-only `/in`. Staging starts over from nothing each
//! time, into a temporary directory renamed into place at the end, so a kill -9 midway leaves
//! nothing a later run could mistake for complete.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{JobDataError, path};
use crate::objstore::{MAX_LIST_PAGE, ObjectReader, ObjectStore, ObjectStoreError, key};

/// The most objects one job may have staged (all its inputs together).
pub const MAX_INPUT_OBJECTS: usize = 10_000;

/// Bytes copied per read from an input's body.
const COPY_CHUNK: usize = 256 * 1024;
const DIR_MODE: u32 = 0o755;
const FILE_MODE: u32 = 0o644;

/// Copy the objects named by `inputs` into `dest` (replacing whatever was there), staging in
/// `tmp` first. Returns how many objects were staged.
pub async fn stage_inputs<S: ObjectStore>(
    store: &S,
    inputs: &[String],
    dest: &Path,
    tmp: &Path,
) -> Result<usize, JobDataError> {
    remove_dir_if_present(tmp).await?;
    remove_dir_if_present(dest).await?;
    make_dir(tmp).await?;
    let mut staged = BTreeSet::new();
    for entry in inputs {
        if entry.ends_with('/') {
            stage_prefix(store, entry, tmp, &mut staged).await?;
        } else {
            let rel = path::key_path(entry)
                .map_err(|reason| JobDataError::BadKey { key: entry.clone(), reason })?;
            stage_object(store, entry, &rel, tmp, &mut staged).await?;
        }
    }
    // One syncfs instead of an fsync per file: the directory is complete on disk before it
    // gets its final name, so a power cut cannot leave a torn input behind a good name.
    let dir = std::fs::File::open(tmp).map_err(|e| JobDataError::io(format!("open {}", tmp.display()), e))?;
    nix::unistd::syncfs(&dir)
        .map_err(|e| JobDataError::io(format!("sync {}", tmp.display()), std::io::Error::from(e)))?;
    tokio::fs::rename(tmp, dest)
        .await
        .map_err(|e| JobDataError::io(format!("rename {} to {}", tmp.display(), dest.display()), e))?;
    Ok(staged.len())
}

async fn stage_prefix<S: ObjectStore>(
    store: &S,
    prefix: &str,
    root: &Path,
    staged: &mut BTreeSet<String>,
) -> Result<(), JobDataError> {
    let mut start_after: Option<String> = None;
    let mut found = 0usize;
    loop {
        let page = store.list(prefix, start_after.as_deref(), MAX_LIST_PAGE).await.map_err(|source| {
            JobDataError::Store { context: format!("list input prefix {}", key::display(prefix)), source }
        })?;
        for object in &page.objects {
            // A key ending in '/' is a "directory marker" some S3 clients write: not a file.
            if object.key.ends_with('/') {
                continue;
            }
            found += 1;
            let rel = path::key_path(&object.key)
                .map_err(|reason| JobDataError::BadKey { key: object.key.clone(), reason })?;
            stage_object(store, &object.key, &rel, root, staged).await?;
        }
        match page.next_start_after {
            Some(next) => start_after = Some(next),
            None => break,
        }
    }
    if found == 0 {
        return Err(JobDataError::EmptyPrefix { prefix: prefix.to_owned() });
    }
    Ok(())
}

async fn stage_object<S: ObjectStore>(
    store: &S,
    object_key: &str,
    rel: &Path,
    root: &Path,
    staged: &mut BTreeSet<String>,
) -> Result<(), JobDataError> {
    if staged.contains(object_key) {
        return Ok(()); // named twice (a key and a prefix holding it): one copy
    }
    if staged.len() >= MAX_INPUT_OBJECTS {
        return Err(JobDataError::TooManyInputs { limit: MAX_INPUT_OBJECTS });
    }
    let mut reader = store.get(object_key).await.map_err(|source| match source {
        ObjectStoreError::NotFound { .. } => JobDataError::MissingInput { key: object_key.to_owned() },
        source => JobDataError::Store { context: format!("read input {}", key::display(object_key)), source },
    })?;
    let target = root.join(rel);
    if let Some(parent) = rel.parent() {
        make_dirs(root, parent, object_key).await?;
    }
    let conflict = |e: std::io::Error| JobDataError::Conflict { key: object_key.to_owned(), source: e };
    let mut file =
        tokio::fs::OpenOptions::new().write(true).create_new(true).open(&target).await.map_err(conflict)?;
    copy_body(&mut reader, &mut file, object_key, &target).await?;
    file.flush().await.map_err(|e| JobDataError::io(format!("write {}", target.display()), e))?;
    tokio::fs::set_permissions(&target, std::fs::Permissions::from_mode(FILE_MODE))
        .await
        .map_err(|e| JobDataError::io(format!("set the mode of {}", target.display()), e))?;
    staged.insert(object_key.to_owned());
    Ok(())
}

/// Stream the body into the file, never more than one buffer in memory. A failed read is the
/// store's (retryable, unless the bytes failed their checksum); a failed write is the disk's.
async fn copy_body(
    reader: &mut ObjectReader,
    file: &mut tokio::fs::File,
    object_key: &str,
    target: &Path,
) -> Result<(), JobDataError> {
    let mut buf = vec![0u8; COPY_CHUNK];
    loop {
        let n = reader.read(&mut buf).await.map_err(|e| {
            let source = if e.kind() == std::io::ErrorKind::InvalidData {
                ObjectStoreError::Integrity { key: object_key.to_owned(), message: e.to_string() }
            } else {
                ObjectStoreError::Unavailable { message: e.to_string(), retryable: true }
            };
            JobDataError::Store { context: format!("read input {}", key::display(object_key)), source }
        })?;
        if n == 0 {
            return Ok(());
        }
        file.write_all(&buf[..n])
            .await
            .map_err(|e| JobDataError::io(format!("write {}", target.display()), e))?;
    }
}

/// Create each directory of `rel` under `root` that is missing, readable by the job's user.
async fn make_dirs(root: &Path, rel: &Path, object_key: &str) -> Result<(), JobDataError> {
    let mut at = root.to_path_buf();
    for part in rel.components() {
        at.push(part);
        match tokio::fs::symlink_metadata(&at).await {
            Ok(m) if m.is_dir() => continue,
            Ok(_) => {
                return Err(JobDataError::Conflict {
                    key: object_key.to_owned(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        format!("{} is a file of another input, not a directory", at.display()),
                    ),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => make_dir(&at).await?,
            Err(e) => return Err(JobDataError::io(format!("inspect {}", at.display()), e)),
        }
    }
    Ok(())
}

pub(super) async fn make_dir(dir: &Path) -> Result<(), JobDataError> {
    tokio::fs::create_dir(dir).await.map_err(|e| JobDataError::io(format!("create {}", dir.display()), e))?;
    tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))
        .await
        .map_err(|e| JobDataError::io(format!("set the mode of {}", dir.display()), e))
}

pub(super) async fn remove_dir_if_present(dir: &Path) -> Result<(), JobDataError> {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(JobDataError::io(format!("remove {}", dir.display()), e)),
    }
}

/// Where `tmp` lives next to `dest`.
pub(super) fn tmp_of(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".staging");
    dest.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objstore::fs::FsStore;

    async fn store_with(dir: &Path, objects: &[(&str, &str)]) -> FsStore {
        let store = FsStore::open(dir.join("objects")).await.expect("open store");
        for (k, body) in objects {
            store.put(k, body.as_bytes()).await.expect("put");
        }
        store
    }

    #[tokio::test]
    async fn keys_and_prefixes_are_staged_as_files_and_a_rerun_starts_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store_with(
            dir.path(),
            &[("a.txt", "A"), ("set/1", "one"), ("set/sub/2", "two"), ("settle", "no")],
        )
        .await;
        let dest = dir.path().join("in");
        let tmp = tmp_of(&dest);
        let inputs = vec!["a.txt".to_owned(), "set/".to_owned(), "set/1".to_owned()];
        // Leftovers of an interrupted run are replaced, not merged.
        std::fs::create_dir_all(tmp.join("stale")).expect("mkdir");
        std::fs::create_dir_all(dest.join("old")).expect("mkdir");
        assert_eq!(stage_inputs(&store, &inputs, &dest, &tmp).await.expect("stage"), 3);
        assert_eq!(std::fs::read_to_string(dest.join("a.txt")).expect("a"), "A");
        assert_eq!(std::fs::read_to_string(dest.join("set/1")).expect("1"), "one");
        assert_eq!(std::fs::read_to_string(dest.join("set/sub/2")).expect("2"), "two");
        assert!(!dest.join("settle").exists(), "a prefix ending in '/' takes only what is under it");
        assert!(!dest.join("old").exists() && !tmp.exists());
        let mode = std::fs::metadata(dest.join("set/sub")).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, DIR_MODE);
    }

    #[tokio::test]
    async fn a_missing_key_an_empty_prefix_and_a_hostile_key_are_errors_naming_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store_with(dir.path(), &[("x/../evil", "e"), ("ok", "k")]).await;
        let dest = dir.path().join("in");
        let tmp = tmp_of(&dest);
        let err =
            stage_inputs(&store, &["ok".into(), "nope".into()], &dest, &tmp).await.expect_err("missing");
        assert!(matches!(err, JobDataError::MissingInput { ref key } if key == "nope"), "{err}");
        assert!(err.to_string().contains("\"nope\""), "{err}");
        let err = stage_inputs(&store, &["empty/".into()], &dest, &tmp).await.expect_err("empty");
        assert!(err.to_string().contains("\"empty/\""), "{err}");
        let err = stage_inputs(&store, &["x/".into()], &dest, &tmp).await.expect_err("hostile");
        assert!(matches!(err, JobDataError::BadKey { .. }) && err.to_string().contains(".."), "{err}");
        assert!(!dest.exists(), "nothing is renamed into place after a failure");
    }
}
