//! File-system work on the `keys/` tree: creating and pruning directories durably, and the
//! depth-first walk that yields records in key order. Everything here runs on a blocking thread.

use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use super::layout::{self, Entry, KeyPath, SEGMENT_FILE};
use super::{ObjectStoreError, Record, Result};

/// Write `bytes` to a new file at `path` and fsync it.
pub(super) fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| ObjectStoreError::io(format!("creating {}", path.display()), e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| ObjectStoreError::io(format!("writing {}", path.display()), e))
}

pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ObjectStoreError::io(format!("syncing directory {}", dir.display()), e))
}

/// Create the directories on the way to `path`'s metadata file and return the last one. A
/// hashed directory is assembled in `tmp` with its segment file and renamed into place, so it
/// never exists without its name.
pub(super) fn make_dirs(keys_root: &Path, tmp: &Path, path: &KeyPath) -> Result<PathBuf> {
    let mut dir = keys_root.to_path_buf();
    for step in &path.dirs {
        let parent = dir.clone();
        dir.push(&step.name);
        if dir.is_dir() {
            continue;
        }
        match &step.hashed_segment {
            None => match std::fs::create_dir(&dir) {
                Err(e) if e.kind() != ErrorKind::AlreadyExists => {
                    return Err(ObjectStoreError::io(format!("creating {}", dir.display()), e));
                }
                _ => {}
            },
            Some(segment) => {
                let staged = tmp.join(uuid::Uuid::new_v4().to_string());
                std::fs::create_dir(&staged)
                    .map_err(|e| ObjectStoreError::io(format!("creating {}", staged.display()), e))?;
                write_durably(&staged.join(SEGMENT_FILE), segment.as_bytes())?;
                sync_dir(&staged)?;
                std::fs::rename(&staged, &dir)
                    .map_err(|e| ObjectStoreError::io(format!("creating {}", dir.display()), e))?;
            }
        }
        sync_dir(&parent)?;
    }
    Ok(dir)
}

/// After a delete, remove the key's directories that hold nothing any more, deepest first.
pub(super) fn prune_empty_dirs(keys_root: &Path, path: &KeyPath) -> Result<()> {
    for depth in (1..=path.dirs.len()).rev() {
        let mut dir = keys_root.to_path_buf();
        dir.extend(path.dirs[..depth].iter().map(|d| d.name.as_str()));
        let names: Vec<String> = match std::fs::read_dir(&dir) {
            Ok(it) => {
                it.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned())).collect()
            }
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(ObjectStoreError::io(format!("listing {}", dir.display()), e)),
        };
        let hashed = path.dirs[depth - 1].hashed_segment.is_some();
        let empty = names.is_empty() || (hashed && names.len() == 1 && names[0] == SEGMENT_FILE);
        if !empty {
            return Ok(());
        }
        let removed = if hashed { std::fs::remove_dir_all(&dir) } else { std::fs::remove_dir(&dir) };
        removed.map_err(|e| ObjectStoreError::io(format!("removing {}", dir.display()), e))?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// Call `f` with the path of every metadata file under `dir`.
pub(super) fn for_each_record(dir: &Path, f: &mut dyn FnMut(&Path) -> Result<()>) -> Result<()> {
    for entry in entries(dir)? {
        match entry {
            Entry::Dir { path, .. } => for_each_record(&path, f)?,
            Entry::Meta { path, .. } => f(&path)?,
        }
    }
    Ok(())
}

pub(super) struct Query<'a> {
    pub prefix: &'a str,
    pub start_after: Option<&'a str>,
    /// Stop once this many records are found.
    pub want: usize,
}

/// Depth-first walk of `dir` (whose keys all start with `key_prefix`) in key byte order,
/// pushing records that match `query` into `out` until it holds `query.want`.
pub(super) fn walk(
    dir: &Path,
    key_prefix: &str,
    query: &Query<'_>,
    read: &mut dyn FnMut(&Path) -> Result<Option<Record>>,
    out: &mut Vec<Record>,
) -> Result<()> {
    let mut sorted: Vec<(Vec<u8>, Entry)> = Vec::new();
    for entry in entries(dir)? {
        let sort = match &entry {
            Entry::Dir { segment, .. } => layout::sort_key(segment, true),
            Entry::Meta { segment: Some(segment), .. } => layout::sort_key(segment, false),
            // A hashed file's segment is the last of the key inside it.
            Entry::Meta { segment: None, path } => match read(path)? {
                Some(r) => layout::sort_key(r.key.rsplit('/').next().unwrap_or_default(), false),
                None => continue,
            },
        };
        sorted.push((sort, entry));
    }
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, entry) in sorted {
        if out.len() >= query.want {
            return Ok(());
        }
        match entry {
            Entry::Dir { segment, path } => {
                let group = format!("{key_prefix}{segment}/");
                if layout::group_may_match(&group, query.prefix, query.start_after) {
                    walk(&path, &group, query, read, out)?;
                }
            }
            Entry::Meta { segment, path } => {
                if let Some(segment) = &segment {
                    let key = format!("{key_prefix}{segment}");
                    if !key.starts_with(query.prefix) || query.start_after.is_some_and(|s| key.as_str() <= s)
                    {
                        continue;
                    }
                }
                let Some(record) = read(&path)? else { continue };
                let k = record.key.as_str();
                if k.starts_with(query.prefix) && query.start_after.is_none_or(|s| k > s) {
                    out.push(record);
                }
            }
        }
    }
    Ok(())
}

/// The tree entries of `dir` (a directory removed meanwhile has none).
fn entries(dir: &Path) -> Result<Vec<Entry>> {
    let it = match std::fs::read_dir(dir) {
        Ok(it) => it,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ObjectStoreError::io(format!("listing {}", dir.display()), e)),
    };
    let mut out = Vec::new();
    for e in it {
        let e = e.map_err(|e| ObjectStoreError::io(format!("listing {}", dir.display()), e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let classified = layout::classify(dir, &name)
            .map_err(|e| ObjectStoreError::io(format!("reading {}", dir.display()), e))?;
        if let Some(entry) = classified {
            out.push(entry);
        }
    }
    Ok(out)
}
