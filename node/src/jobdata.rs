//! Job data on the node's disk: the inputs a job names, copied out of the local object store
//! into a directory mounted read-only at `/in`, and the files it leaves in `/out`, uploaded back
//! under its output prefix. It owns `data_dir/jobdata/` and must never write outside it,
//! whatever a key or a job's file names say.
//!
//! ```text
//! data_dir/jobdata/<job id>/<attempt>/in/          staged inputs (read-only in the container)
//! data_dir/jobdata/<job id>/<attempt>/in.staging/  inputs being staged; never mounted
//! data_dir/jobdata/<job id>/<attempt>/out/         the job's /out
//! ```

mod collect;
pub mod egress;
pub mod path;
mod stage;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use outpost_protocol::ContainerSpec;

pub use collect::{Collected, MAX_OUTPUT_DEPTH, MAX_OUTPUT_FILES, collect_outputs};
pub use egress::{Decision, Egress};
pub use stage::{MAX_INPUT_OBJECTS, stage_inputs};

use crate::objstore::{ObjectStore, ObjectStoreError, key};
use crate::runtime::{JobRef, Mounts};

/// The user a job runs as unless its spec names another (nobody:nogroup).
const DEFAULT_UID_GID: (u32, u32) = (65534, 65534);

#[derive(Debug, thiserror::Error)]
pub enum JobDataError {
    #[error("input object {} is not in the local object store; put it there before submitting the job", key::display(.key))]
    MissingInput { key: String },
    #[error("input prefix {} names no objects in the local object store", key::display(.prefix))]
    EmptyPrefix { prefix: String },
    #[error("object {} cannot be staged as a file: {reason}", key::display(.key))]
    BadKey { key: String, reason: String },
    #[error("input {} collides with another input (a file where a directory must be, or the reverse): {source}", key::display(.key))]
    Conflict { key: String, source: std::io::Error },
    #[error("the job's inputs name more than {limit} objects; split the job or name fewer prefixes")]
    TooManyInputs { limit: usize },
    #[error("the job left more than {limit} files under /out; nothing was uploaded past the limit")]
    TooManyOutputs { limit: usize },
    #[error("{context}: {source}")]
    Store { context: String, source: ObjectStoreError },
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

impl JobDataError {
    /// True when the object store was unreachable: the same work may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, JobDataError::Store { source, .. } if source.is_retryable())
    }

    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        JobDataError::Io { context: context.into(), source }
    }
}

/// The directories of one job attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobDirs {
    root: PathBuf,
}

impl JobDirs {
    /// `data_dir/jobdata/<job id>/<attempt>`. Job ids are checked when the manifest is verified
    /// (`[A-Za-z0-9-]`); one that is not a plain name is refused here too.
    pub fn new(data_dir: &Path, job: &JobRef) -> Result<Self, JobDataError> {
        let id = &job.job_id;
        if id.is_empty() || id == "." || id == ".." || id.contains('/') || id.contains('\0') {
            return Err(JobDataError::io(
                format!("job id {id:?} cannot name a directory"),
                std::io::Error::from(std::io::ErrorKind::InvalidInput),
            ));
        }
        Ok(Self { root: jobdata_dir(data_dir).join(id).join(job.attempt.to_string()) })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn input(&self) -> PathBuf {
        self.root.join("in")
    }
    pub fn output(&self) -> PathBuf {
        self.root.join("out")
    }

    /// What the container gets mounted: `/in` when the spec names inputs, `/out` when it has an
    /// output prefix.
    pub fn mounts(&self, spec: &ContainerSpec) -> Mounts {
        Mounts {
            input: (!spec.inputs.is_empty()).then(|| self.input()),
            output: spec.output_prefix.is_some().then(|| self.output()),
        }
    }

    /// Stage the inputs and create an empty `/out`, starting over from nothing: safe to call
    /// again after a crash, as long as the container has not started.
    pub async fn prepare<S: ObjectStore>(&self, spec: &ContainerSpec, store: &S) -> Result<(), JobDataError> {
        if spec.inputs.is_empty() && spec.output_prefix.is_none() {
            return Ok(());
        }
        tokio::fs::create_dir_all(&self.root)
            .await
            .map_err(|e| JobDataError::io(format!("create {}", self.root.display()), e))?;
        if !spec.inputs.is_empty() {
            let input = self.input();
            stage_inputs(store, &spec.inputs, &input, &stage::tmp_of(&input)).await?;
        }
        if spec.output_prefix.is_some() {
            let out = self.output();
            stage::remove_dir_if_present(&out).await?;
            stage::make_dir(&out).await?;
            give_to_job_user(&out, spec.security.user.as_deref()).await?;
        }
        Ok(())
    }

    /// Upload what the job left under `/out` (nothing when it has no output prefix).
    pub async fn collect<S: ObjectStore>(
        &self,
        spec: &ContainerSpec,
        store: &S,
        allowed_prefixes: &[String],
    ) -> Result<Collected, JobDataError> {
        let Some(prefix) = &spec.output_prefix else { return Ok(Collected::default()) };
        let egress = Egress { requested: &spec.egress_bodies, allowed_prefixes };
        collect_outputs(store, &self.output(), prefix, egress).await
    }

    /// Remove the attempt's directory (and the job's, once no attempt is left).
    pub async fn remove(&self) -> Result<(), JobDataError> {
        stage::remove_dir_if_present(&self.root).await?;
        if let Some(job_dir) = self.root.parent() {
            // Fails harmlessly while another attempt of the job still has data.
            let _ = tokio::fs::remove_dir(job_dir).await;
        }
        Ok(())
    }
}

/// `data_dir/jobdata`.
pub fn jobdata_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("jobdata")
}

/// Remove the data of every attempt for which `keep(job_id, attempt)` is false: what a crash
/// between persisting a result and removing its directory left behind. Returns how many
/// attempt directories were removed.
pub async fn sweep(data_dir: &Path, keep: impl Fn(&str, u32) -> bool) -> Result<usize, JobDataError> {
    let base = jobdata_dir(data_dir);
    let mut removed = 0;
    let mut jobs = match tokio::fs::read_dir(&base).await {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(JobDataError::io(format!("read {}", base.display()), e)),
    };
    while let Some(job) =
        jobs.next_entry().await.map_err(|e| JobDataError::io(format!("read {}", base.display()), e))?
    {
        let job_id = job.file_name().to_string_lossy().into_owned();
        let Ok(mut attempts) = tokio::fs::read_dir(job.path()).await else { continue };
        while let Ok(Some(attempt)) = attempts.next_entry().await {
            let number = attempt.file_name().to_str().and_then(|a| a.parse::<u32>().ok());
            if number.is_some_and(|n| keep(&job_id, n)) {
                continue;
            }
            stage::remove_dir_if_present(&attempt.path()).await?;
            removed += 1;
        }
        let _ = tokio::fs::remove_dir(job.path()).await;
    }
    Ok(removed)
}

/// Make `/out` writable by the container's user: owned by its uid:gid where this process may
/// chown (the agent runs as root on appliances), else open to everyone (mode 0777).
async fn give_to_job_user(dir: &Path, user: Option<&str>) -> Result<(), JobDataError> {
    let ids = match user {
        None => Some((DEFAULT_UID_GID.0, Some(DEFAULT_UID_GID.1))),
        Some(u) => numeric_user(u),
    };
    let owned = match ids {
        Some((uid, gid)) => std::os::unix::fs::chown(dir, Some(uid), gid).is_ok(),
        None => false,
    };
    let mode = if owned { 0o755 } else { 0o777 };
    if !owned {
        tracing::debug!(dir = %dir.display(), "cannot give /out to the job's user; opening it to everyone (mode 0777)");
    }
    tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .await
        .map_err(|e| JobDataError::io(format!("set the mode of {}", dir.display()), e))
}

/// `uid[:gid]` as numbers; `None` for a user name, which only the image can resolve.
fn numeric_user(user: &str) -> Option<(u32, Option<u32>)> {
    let (uid, gid) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let uid = uid.trim().parse().ok()?;
    let gid = match gid {
        Some(g) => Some(g.trim().parse().ok()?),
        None => None,
    };
    Some((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_users_are_read_as_numbers_or_left_to_the_image() {
        assert_eq!(numeric_user("1000"), Some((1000, None)));
        assert_eq!(numeric_user("1000:100"), Some((1000, Some(100))));
        assert_eq!(numeric_user("app"), None);
        assert_eq!(numeric_user("1000:staff"), None);
    }

    #[test]
    fn job_ids_that_are_not_plain_names_get_no_directory() {
        for id in ["", "..", "a/b", "."] {
            assert!(
                JobDirs::new(Path::new("/d"), &JobRef { job_id: id.into(), attempt: 1 }).is_err(),
                "{id:?}"
            );
        }
        let dirs = JobDirs::new(Path::new("/d"), &JobRef { job_id: "j-1".into(), attempt: 2 }).expect("ok");
        assert_eq!(dirs.input(), Path::new("/d/jobdata/j-1/2/in"));
        assert_eq!(dirs.output(), Path::new("/d/jobdata/j-1/2/out"));
    }

    #[tokio::test]
    async fn sweeping_removes_only_attempts_not_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (job, attempt) in [("a", 1), ("a", 2), ("b", 1)] {
            std::fs::create_dir_all(jobdata_dir(dir.path()).join(job).join(attempt.to_string()).join("out"))
                .expect("mkdir");
        }
        let removed = sweep(dir.path(), |job, attempt| job == "a" && attempt == 2).await.expect("sweep");
        assert_eq!(removed, 2);
        assert!(jobdata_dir(dir.path()).join("a/2/out").exists());
        assert!(!jobdata_dir(dir.path()).join("a/1").exists());
        assert!(!jobdata_dir(dir.path()).join("b").exists());
    }
}
