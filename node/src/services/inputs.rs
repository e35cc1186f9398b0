//! Service inputs: the objects a service's spec names, copied out of the node's local object
//! store once per revision into a directory mounted read-only at `/in`, exactly as a job's
//! inputs are (same staging: streamed, into a temporary directory renamed into place, so a
//! kill -9 midway leaves nothing that looks complete). A revision's directory lives as long as
//! the revision is wanted or has a container; [`sweep`] removes the rest.
//!
//! ```text
//! data_dir/services/<service>/<deployment>-r<revision>/in/
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::jobdata::{JobDataError, stage_inputs};
use crate::objstore::ObjectStore;
use crate::runtime::ServiceRef;

/// `data_dir/services`.
pub fn root(data_dir: &Path) -> PathBuf {
    data_dir.join("services")
}

/// A revision's directory name under its service; its parts are checked names (lowercase
/// letters, digits, '-'), so it is one plain path component.
fn revision_dir(svc: &ServiceRef) -> String {
    format!("{}-r{}", svc.deployment, svc.revision)
}

fn plain(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The revision's staged inputs: `<root>/<service>/<deployment>-r<revision>/in`.
pub fn dir(root: &Path, svc: &ServiceRef) -> Result<PathBuf, JobDataError> {
    if !plain(&svc.name) || !plain(&svc.deployment) {
        return Err(JobDataError::BadKey {
            key: format!("{}/{}", svc.name, svc.deployment),
            reason: "a service or deployment name that is not a plain name".into(),
        });
    }
    Ok(root.join(&svc.name).join(revision_dir(svc)).join("in"))
}

/// Copy `inputs` for the revision (replacing whatever an earlier, interrupted try left) and
/// return the directory to mount.
pub async fn stage<S: ObjectStore>(
    store: &S,
    root: &Path,
    svc: &ServiceRef,
    inputs: &[String],
) -> Result<PathBuf, JobDataError> {
    let dest = dir(root, svc)?;
    let parent = dest.parent().map(Path::to_path_buf).unwrap_or_else(|| root.to_path_buf());
    tokio::fs::create_dir_all(&parent)
        .await
        .map_err(|e| JobDataError::Io { context: format!("create {}", parent.display()), source: e })?;
    let tmp = parent.join("in.staging");
    stage_inputs(store, inputs, &dest, &tmp).await?;
    Ok(dest)
}

/// Remove the input directories of revisions not in `keep` (service, deployment, revision),
/// and of services with none left. Returns how many revision directories went.
pub async fn sweep(root: &Path, keep: &HashSet<(String, String, u64)>) -> std::io::Result<usize> {
    let mut removed = 0;
    let mut services = match tokio::fs::read_dir(root).await {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    while let Some(service) = services.next_entry().await? {
        let name = service.file_name().to_string_lossy().into_owned();
        let wanted: HashSet<String> = keep
            .iter()
            .filter(|(s, _, _)| *s == name)
            .map(|(s, d, r)| {
                revision_dir(&ServiceRef { name: s.clone(), deployment: d.clone(), revision: *r })
            })
            .collect();
        let mut revisions = match tokio::fs::read_dir(service.path()).await {
            Ok(d) => d,
            Err(_) => continue,
        };
        while let Some(rev) = revisions.next_entry().await? {
            if !wanted.contains(rev.file_name().to_string_lossy().as_ref()) {
                tokio::fs::remove_dir_all(rev.path()).await?;
                removed += 1;
            }
        }
        // Fails harmlessly while a revision is left.
        let _ = tokio::fs::remove_dir(service.path()).await;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objstore::fs::FsStore;

    fn svc(deployment: &str, revision: u64) -> ServiceRef {
        ServiceRef { name: "web".into(), deployment: deployment.into(), revision }
    }

    #[tokio::test]
    async fn a_revisions_inputs_are_staged_read_only_and_swept_when_no_longer_wanted() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = FsStore::open(tmp.path().join("objects")).await.expect("store");
        store.put("models/a.txt", &b"alpha"[..]).await.expect("put");
        store.put("models/b/c.txt", &b"gamma"[..]).await.expect("put");
        store.put("config.json", &b"{}"[..]).await.expect("put");
        let root = root(tmp.path());

        let one = stage(&store, &root, &svc("web", 1), &["models/".into(), "config.json".into()])
            .await
            .expect("stage");
        assert_eq!(std::fs::read_to_string(one.join("models/b/c.txt")).expect("staged"), "gamma");
        assert_eq!(std::fs::read_to_string(one.join("config.json")).expect("staged"), "{}");
        assert!(!one.parent().expect("parent").join("in.staging").exists());
        let two = stage(&store, &root, &svc("web", 2), &["config.json".into()]).await.expect("stage");

        let keep = HashSet::from([("web".to_owned(), "web".to_owned(), 2)]);
        assert_eq!(sweep(&root, &keep).await.expect("sweep"), 1);
        assert!(!one.exists() && two.exists());
        assert_eq!(sweep(&root, &HashSet::new()).await.expect("sweep"), 1);
        assert!(!root.join("web").exists());
    }

    #[tokio::test]
    async fn a_missing_input_or_a_hostile_name_is_a_clear_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = FsStore::open(tmp.path().join("objects")).await.expect("store");
        let root = root(tmp.path());
        let err = stage(&store, &root, &svc("web", 1), &["absent.bin".into()]).await.expect_err("missing");
        assert!(matches!(err, JobDataError::MissingInput { .. }), "{err}");
        let bad = ServiceRef { name: "../etc".into(), deployment: "web".into(), revision: 1 };
        assert!(dir(&root, &bad).is_err());
    }
}
