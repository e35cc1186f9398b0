//! The Runtime port: how the agent runs a container job. The core speaks only this trait;
//! the Docker adapter (bollard) lives in `docker.rs` and nothing else imports bollard.
//!
//! Contract every adapter keeps:
//! - one container per (job id, attempt), named [`JobRef::container_name`] and labelled
//!   `outpost.job`, `outpost.attempt`, `outpost.node`; creating it twice returns the first one,
//!   so a restarted agent can never start a job twice;
//! - images are used by id only and never pulled: an absent image is [`RuntimeError::ImageMissing`];
//! - every container gets the hardened defaults unless the signed spec relaxes them.

use std::future::Future;
use std::path::{Path, PathBuf};

use outpost_protocol::{ContainerSpec, ServiceSpec};

pub mod docker;

/// Identifies one attempt of one job on this node.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobRef {
    pub job_id: String,
    pub attempt: u32,
}

impl JobRef {
    /// The container's name: unique per engine, so a second create of the same attempt fails.
    pub fn container_name(&self) -> String {
        format!("outpost-{}-{}", self.job_id, self.attempt)
    }
}

/// Label carrying the job id on the job's container.
pub const LABEL_JOB: &str = "outpost.job";
/// Label carrying the attempt number on the job's container.
pub const LABEL_ATTEMPT: &str = "outpost.attempt";
/// Label carrying the id of the node whose agent made the container.
pub const LABEL_NODE: &str = "outpost.node";
/// Label carrying the service name on a service's container.
pub const LABEL_SERVICE: &str = "outpost.service";
/// Label carrying the service revision on a service's container.
pub const LABEL_REVISION: &str = "outpost.revision";
/// Label carrying the deployment a service container's revision belongs to.
pub const LABEL_DEPLOYMENT: &str = "outpost.deployment";
/// Labels under this prefix belong to the agent: a job spec may not set them.
pub const RESERVED_LABEL_PREFIX: &str = "outpost.";

/// Where the job's container looks inside the container.
pub const INPUT_MOUNT: &str = "/in";
/// Where the job writes the files it leaves behind.
pub const OUTPUT_MOUNT: &str = "/out";

/// Host directories bind-mounted into the job's container: `input` read-only at
/// [`INPUT_MOUNT`], `output` read-write at [`OUTPUT_MOUNT`]. Both must be absolute paths to
/// existing directories; everything else about the container stays hardened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mounts {
    pub input: Option<PathBuf>,
    pub output: Option<PathBuf>,
}

/// What the runtime knows about a job's container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerState {
    /// Created, never started.
    Created,
    Running {
        started_unix_ms: u64,
    },
    Exited {
        exit_code: i64,
        started_unix_ms: Option<u64>,
        finished_unix_ms: Option<u64>,
        oom_killed: bool,
    },
}

/// A container this node's agent made, found by label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Managed {
    pub job: JobRef,
    pub container_id: String,
    pub state: ContainerState,
}

/// Tails of the container's output streams.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    pub stdout_tail: String,
    pub stderr_tail: String,
    /// True when either stream had more than the bytes kept.
    pub truncated: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeInfo {
    pub version: String,
    /// Ids (`sha256:...`) of the images present.
    pub images: Vec<String>,
}

/// One revision of one deployment of a service on this node: at most one container exists
/// for it. (Revisions count per deployment, so the deployment is part of the identity.)
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    pub name: String,
    pub deployment: String,
    pub revision: u64,
}

/// A service container this node's agent made, found by label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedService {
    pub service: ServiceRef,
    pub state: ContainerState,
    /// The container's address on its service network, when it has one.
    pub address: Option<std::net::IpAddr>,
}

/// What a command run inside a container answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    pub exit_code: i64,
    /// The end of its combined output (bounded by the caller's limit).
    pub output: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The engine could not be reached or answered with a server error: retry later.
    #[error("container runtime unavailable: {0}")]
    Unavailable(String),
    #[error(
        "image {0} is not present on this node; load it with `outpost images load FILE.tar` (no registry is used)"
    )]
    ImageMissing(String),
    #[error("no container for job {0}")]
    NotFound(String),
    /// The request itself is wrong (bad spec, bad tarball): retrying will not help.
    #[error("{0}")]
    Invalid(String),
}

impl RuntimeError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, RuntimeError::Unavailable(_))
    }
}

pub type Result<T> = std::result::Result<T, RuntimeError>;

/// A container's output, piece by piece, as the engine hands it over.
pub type LogStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Vec<u8>>> + Send>>;

/// The compute port. Methods return `Send` futures so the agent can drive them from spawned tasks.
pub trait Runtime: Send + Sync + 'static {
    /// Engine version and the images present.
    fn info(&self) -> impl Future<Output = Result<RuntimeInfo>> + Send;
    fn image_present(&self, image: &str) -> impl Future<Output = Result<bool>> + Send;
    /// Create (not start) the job's container with the hardened configuration and `mounts`; if
    /// it exists already, return the existing one's id without changing it.
    fn create(
        &self,
        job: &JobRef,
        spec: &ContainerSpec,
        mounts: &Mounts,
    ) -> impl Future<Output = Result<String>> + Send;
    fn start(&self, job: &JobRef) -> impl Future<Output = Result<()>> + Send;
    /// `Ok(None)` when no such container exists.
    fn inspect(&self, job: &JobRef) -> impl Future<Output = Result<Option<ContainerState>>> + Send;
    /// Wait until the container has exited and return its exit code.
    fn wait(&self, job: &JobRef) -> impl Future<Output = Result<i64>> + Send;
    /// SIGKILL the container (no error if it already exited).
    fn kill(&self, job: &JobRef) -> impl Future<Output = Result<()>> + Send;
    /// The last `max_bytes` of stdout and of stderr.
    fn output(&self, job: &JobRef, max_bytes: usize) -> impl Future<Output = Result<Output>> + Send;
    /// The container's output as written (stdout and stderr interleaved) from its last
    /// `tail_lines` lines on; with `follow`, everything it writes until it exits.
    fn log_stream(
        &self,
        job: &JobRef,
        follow: bool,
        tail_lines: u64,
    ) -> impl Future<Output = Result<LogStream>> + Send;
    /// Remove the container (no error if it is gone).
    fn remove(&self, job: &JobRef) -> impl Future<Output = Result<()>> + Send;
    /// Every container labelled as this node's.
    fn list_managed(&self) -> impl Future<Output = Result<Vec<Managed>>> + Send;
    /// `docker load` a tarball; returns the ids of the images it brought.
    fn load_image(&self, tar: &Path) -> impl Future<Output = Result<Vec<String>>> + Send;
    /// What the engine knows of a loaded image, for an approver.
    fn image_facts(&self, image: &str) -> impl Future<Output = Result<ImageFacts>> + Send;

    /// Create (not start) the container of a service revision, hardened like a job's, with the
    /// service's network and named volume, and `input` (its staged inputs) read-only at
    /// [`INPUT_MOUNT`]; if it exists already, return it unchanged.
    fn service_create(
        &self,
        svc: &ServiceRef,
        spec: &ServiceSpec,
        input: Option<&Path>,
    ) -> impl Future<Output = Result<String>> + Send;
    /// Start the service revision's container, also after it exited (a restart).
    fn service_start(&self, svc: &ServiceRef) -> impl Future<Output = Result<()>> + Send;
    /// Returns once the revision's container is not running (exited, or gone).
    fn service_wait(&self, svc: &ServiceRef) -> impl Future<Output = Result<()>> + Send;
    /// Every service container labelled as this node's.
    fn service_list(&self) -> impl Future<Output = Result<Vec<ManagedService>>> + Send;
    /// Kill and remove the revision's container (no error if it is gone).
    fn service_remove(&self, svc: &ServiceRef) -> impl Future<Output = Result<()>> + Send;
    /// Remove what the service keeps besides containers (its network; its volume when
    /// `volume` is set): once the service is gone from the node.
    fn service_forget(&self, name: &str, volume: bool) -> impl Future<Output = Result<()>> + Send;
    /// Run `cmd` inside the running container, at most `timeout`; the output's last
    /// `max_bytes`.
    fn service_exec(
        &self,
        svc: &ServiceRef,
        cmd: &[String],
        timeout: std::time::Duration,
        max_bytes: usize,
    ) -> impl Future<Output = Result<ExecOutcome>> + Send;
}

/// An image as an approver is shown it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFacts {
    pub size_bytes: u64,
    /// As the engine states it (RFC 3339).
    pub created: String,
}
