//! Collecting outputs: the regular files a job left under `/out` are uploaded, streamed, to the
//! local store under the job's output prefix. Symbolic links are never followed and other file
//! kinds are skipped, each with a note; walking is bounded in files and depth. Uploads overwrite,
//! so collecting the same job again after a restart is safe.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use outpost_protocol::OutputObject;

use super::egress::{Decision, Egress};
use super::{JobDataError, path};
use crate::objstore::{ObjectStore, key};

/// The most files one job may leave under `/out`.
pub const MAX_OUTPUT_FILES: usize = 10_000;
/// How deep directories under `/out` may nest.
pub const MAX_OUTPUT_DEPTH: usize = 32;

/// What collecting found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Collected {
    /// Every uploaded file, in key order, with its body where egress allowed it.
    pub outputs: Vec<OutputObject>,
    /// Outputs whose body the manifest asked for and the node refused, with the reason.
    pub denied: Vec<(String, String)>,
    /// Things under `/out` that were not uploaded, and why.
    pub skipped: Vec<String>,
}

/// A regular file found under `/out`.
struct Found {
    file: PathBuf,
    segments: Vec<String>,
}

/// Upload the files under `out` to `prefix` + their relative path, deciding egress for each.
pub async fn collect_outputs<S: ObjectStore>(
    store: &S,
    out: &Path,
    prefix: &str,
    egress: Egress<'_>,
) -> Result<Collected, JobDataError> {
    let mut collected = Collected::default();
    let found = walk(out, &mut collected.skipped).await?;
    for f in found {
        let object_key = path::output_key(prefix, &f.segments);
        let shown = format!("/out/{}", f.segments.join("/"));
        if let Err(e) = key::validate(&object_key) {
            collected.skipped.push(format!("{shown}: its key cannot be stored ({e})"));
            continue;
        }
        // O_NOFOLLOW: a file swapped for a link after the walk is refused, not followed.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(OFlag::O_NOFOLLOW.bits())
            .open(&f.file)
            .map_err(|e| JobDataError::io(format!("open output {shown}"), e))?;
        let put = store.put(&object_key, tokio::fs::File::from_std(file)).await.map_err(|source| {
            JobDataError::Store {
                context: format!("upload output {shown} as {}", key::display(&object_key)),
                source,
            }
        })?;
        let mut output = OutputObject { key: object_key, size: put.size, sha256: put.sha256, body: None };
        match egress.decide(&output.key, output.size, &f.file).await {
            Decision::NotRequested => {}
            Decision::Send(body) => output.body = Some(body),
            Decision::Deny(why) => collected.denied.push((output.key.clone(), why)),
        }
        collected.outputs.push(output);
    }
    collected.outputs.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(collected)
}

/// Regular files under `out`, depth first, never through a symbolic link.
async fn walk(out: &Path, skipped: &mut Vec<String>) -> Result<Vec<Found>, JobDataError> {
    let mut found = Vec::new();
    let mut stack: Vec<(PathBuf, Vec<String>)> = vec![(out.to_path_buf(), Vec::new())];
    while let Some((dir, segments)) = stack.pop() {
        let mut entries = tokio::fs::read_dir(&dir)
            .await
            .map_err(|e| JobDataError::io(format!("read output directory {}", dir.display()), e))?;
        let mut names = Vec::new();
        while let Some(entry) =
            entries.next_entry().await.map_err(|e| JobDataError::io(format!("read {}", dir.display()), e))?
        {
            names.push(entry.file_name());
        }
        names.sort();
        for name in names {
            let at = dir.join(&name);
            let shown = format!("/out/{}", join_shown(&segments, &name.to_string_lossy()));
            let Some(name) = name.to_str().map(str::to_owned) else {
                skipped.push(format!("{shown}: its name is not UTF-8, so it has no object key"));
                continue;
            };
            let meta = tokio::fs::symlink_metadata(&at)
                .await
                .map_err(|e| JobDataError::io(format!("inspect output {shown}"), e))?;
            let kind = meta.file_type();
            let mut child = segments.clone();
            child.push(name);
            if kind.is_symlink() {
                skipped.push(format!("{shown}: a symbolic link, not followed"));
            } else if kind.is_dir() {
                if child.len() >= MAX_OUTPUT_DEPTH {
                    skipped.push(format!("{shown}: nested deeper than {MAX_OUTPUT_DEPTH} directories"));
                } else {
                    stack.push((at, child));
                }
            } else if kind.is_file() {
                if found.len() >= MAX_OUTPUT_FILES {
                    return Err(JobDataError::TooManyOutputs { limit: MAX_OUTPUT_FILES });
                }
                found.push(Found { file: at, segments: child });
            } else {
                skipped.push(format!("{shown}: not a regular file (a device, socket or pipe)"));
            }
        }
    }
    Ok(found)
}

fn join_shown(segments: &[String], name: &str) -> String {
    let mut all: Vec<&str> = segments.iter().map(String::as_str).collect();
    all.push(name);
    all.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objstore::fs::FsStore;
    use sha2::{Digest as _, Sha256};

    #[tokio::test]
    async fn files_are_uploaded_under_the_prefix_and_links_are_not_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FsStore::open(dir.path().join("objects")).await.expect("store");
        let out = dir.path().join("out");
        std::fs::create_dir_all(out.join("sub/deeper")).expect("mkdir");
        std::fs::write(out.join("a.txt"), "hello\n").expect("write");
        std::fs::write(out.join("sub/deeper/b.bin"), [1u8, 2, 3]).expect("write");
        std::fs::write(dir.path().join("secret"), "outside").expect("write");
        std::os::unix::fs::symlink(dir.path().join("secret"), out.join("link")).expect("symlink");
        std::os::unix::fs::symlink(dir.path(), out.join("dirlink")).expect("symlink");

        let requested = vec!["res/a.txt".to_owned()];
        let egress = Egress { requested: &requested, allowed_prefixes: &[] };
        let c = collect_outputs(&store, &out, "res/", egress).await.expect("collect");
        let keys: Vec<&str> = c.outputs.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, ["res/a.txt", "res/sub/deeper/b.bin"]);
        assert_eq!(c.outputs[0].size, 6);
        assert_eq!(c.outputs[0].sha256, hex::encode(Sha256::digest(b"hello\n")));
        assert_eq!(c.outputs[0].body, None);
        assert_eq!(c.denied.len(), 1);
        assert_eq!(c.denied[0].0, "res/a.txt");
        assert_eq!(c.skipped.len(), 2, "{:?}", c.skipped);
        assert!(c.skipped.iter().all(|s| s.contains("symbolic link")), "{:?}", c.skipped);
        assert!(store.head("res/link").await.is_err() && store.head("res/dirlink/secret").await.is_err());
        // Collecting again (a restart) uploads the same objects once more, unchanged.
        let again = collect_outputs(&store, &out, "res/", egress).await.expect("collect again");
        assert_eq!(again.outputs, c.outputs);
    }
}
