//! Docker adapter of the Runtime port (bollard). It owns every call to the engine and turns the
//! signed spec into a hardened container; it never pulls an image and never starts a container
//! that has already run. Nothing outside `runtime/` may import bollard.

mod convert;
mod load;
pub use load::Sent;
mod logs;
mod service;
mod spec;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as EngineError;
use bollard::query_parameters::{
    CreateContainerOptions, KillContainerOptions, ListContainersOptions, ListImagesOptions,
    RemoveContainerOptions, WaitContainerOptions,
};
use futures_util::StreamExt;
use outpost_protocol::ContainerSpec;
use tokio::sync::OnceCell;

use self::convert::{container_state, engine_error, job_label, start_cut_short, status_of};
pub use self::spec::is_profile_name;
use self::spec::{confine, container_name, create_body, validate_image_id};
use super::{
    ContainerState, ExecOutcome, JobRef, LABEL_ATTEMPT, LABEL_JOB, LABEL_NODE, LABEL_SERVICE, LogStream,
    Managed, ManagedService, Mounts, Output, Result, Runtime, RuntimeError, RuntimeInfo, ServiceRef,
};

/// Seconds to wait for the engine's answer to an ordinary request.
const REQUEST_TIMEOUT_SECS: u64 = 120;
/// The kernel's list of loaded AppArmor profiles, `NAME (MODE)` a line.
const APPARMOR_PROFILES: &str = "/sys/kernel/security/apparmor/profiles";
/// How often, and how far apart, a create that lost a race for the name looks for the winner's
/// container before giving up with a retryable error.
const NAME_RESERVED_POLLS: u32 = 100;
const NAME_RESERVED_POLL: Duration = Duration::from_millis(50);
/// Loading an image answers only once the whole tarball is uploaded and unpacked.
const LOAD_TIMEOUT: Duration = Duration::from_secs(3600);

/// The Runtime port over a Docker engine, as one node (`outpost.node` label) of possibly several
/// sharing the engine.
#[derive(Debug, Clone)]
pub struct DockerRuntime {
    /// The configured engine address; `None`: `DOCKER_HOST`, else the local default socket.
    socket: Option<String>,
    /// The connection at the engine's API version, made by the first call that reaches it.
    engine: Arc<OnceCell<Engine>>,
    node_id: String,
    /// The AppArmor profile containers run under, when the node's configuration names one.
    apparmor: Option<String>,
}

#[derive(Debug)]
struct Engine {
    docker: Docker,
    /// The same connection with a timeout long enough for a large `docker load`.
    loader: Docker,
}

impl DockerRuntime {
    /// A runtime for the engine at `socket` (a unix socket path or a `unix://`, `tcp://`,
    /// `http://` address), or else at `DOCKER_HOST`, or else at the local default socket. Nothing
    /// is dialled yet: the first call negotiates the API version down to the engine's (Docker
    /// 20.10 speaks only 1.41), and until the engine answers every call fails with a retryable
    /// [`RuntimeError::Unavailable`]. The agent starts this way, so that it need not wait for
    /// dockerd.
    pub fn new(node_id: &str, socket: Option<&str>) -> Result<DockerRuntime> {
        if node_id.trim().is_empty() {
            return Err(RuntimeError::Invalid(
                "node id is empty: the runtime labels containers with it".into(),
            ));
        }
        Ok(DockerRuntime {
            socket: socket.map(str::to_owned),
            engine: Arc::default(),
            node_id: node_id.to_owned(),
            apparmor: None,
        })
    }

    /// Every container this runtime creates runs under AppArmor profile `profile` (see
    /// [`DockerRuntime::confinement`]); `None`: the engine's default.
    pub fn with_apparmor_profile(mut self, profile: Option<String>) -> Self {
        self.apparmor = profile;
        self
    }

    /// The AppArmor profile to put on a container, after checking that it can be applied: the
    /// engine runs with AppArmor, and the kernel has the profile loaded (where this process can
    /// read the kernel's list). Otherwise a clear error, and no container: a profile the site
    /// asked for is never dropped silently.
    async fn confinement(&self) -> Result<Option<&str>> {
        let Some(profile) = self.apparmor.as_deref() else { return Ok(None) };
        let info =
            self.docker().await?.info().await.map_err(|e| engine_error("read the engine's info", e))?;
        let options = info.security_options.unwrap_or_default();
        if !options.iter().any(|o| o.split(',').any(|part| part == "name=apparmor")) {
            return Err(RuntimeError::Invalid(format!(
                "docker.apparmor_profile is {profile:?}, but the Docker engine runs without AppArmor \
                 (its security options: {}); no container is started without the profile. Enable \
                 AppArmor in the kernel (Debian's does by default: apparmor=1 security=apparmor) or \
                 leave the setting out",
                if options.is_empty() { "none".to_owned() } else { options.join("; ") }
            )));
        }
        match std::fs::read_to_string(APPARMOR_PROFILES) {
            // In enforce mode: a profile in complain mode only logs what it would refuse.
            Ok(loaded) if !loaded.lines().any(|l| l == format!("{profile} (enforce)")) => {
                return Err(RuntimeError::Invalid(format!(
                    "docker.apparmor_profile is {profile:?}, but the kernel has no such profile loaded \
                     in enforce mode; load it (apparmor_parser -r /etc/apparmor.d/{profile}) or fix \
                     the name"
                )));
            }
            Ok(_) => {}
            // Only root in the first user namespace may read the list: the engine refuses a
            // profile that is not loaded when it starts the container.
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the kernel's AppArmor profiles; the engine checks the profile")
            }
        }
        Ok(Some(profile))
    }

    /// [`DockerRuntime::new`], then reach the engine now: for commands that need it at once.
    pub async fn connect(node_id: &str, socket: Option<&str>) -> Result<DockerRuntime> {
        let runtime = DockerRuntime::new(node_id, socket)?;
        runtime.engine().await?;
        Ok(runtime)
    }

    /// The negotiated connection; reaches the engine if no call has yet.
    async fn engine(&self) -> Result<&Engine> {
        self.engine
            .get_or_try_init(|| async {
                let socket = self.socket.as_deref();
                let target = socket.map_or_else(
                    || std::env::var("DOCKER_HOST").unwrap_or_else(|_| "the local Docker socket".into()),
                    str::to_owned,
                );
                let unreachable = |e: EngineError| {
                    RuntimeError::Unavailable(format!(
                        "cannot reach the Docker engine at {target}: {e}; is dockerd running and is its \
                         socket readable by this user?"
                    ))
                };
                let client = match socket {
                    Some(address) if address.contains("://") => Docker::connect_with_host(address),
                    Some(path) => {
                        Docker::connect_with_unix(path, REQUEST_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
                    }
                    None if std::env::var_os("DOCKER_HOST").is_some() => Docker::connect_with_defaults(),
                    None => Docker::connect_with_local_defaults(),
                };
                let docker = client.map_err(unreachable)?.negotiate_version().await.map_err(unreachable)?;
                Ok(Engine { loader: docker.clone().with_timeout(LOAD_TIMEOUT), docker })
            })
            .await
    }

    async fn docker(&self) -> Result<&Docker> {
        Ok(&self.engine().await?.docker)
    }

    /// The node id this runtime labels its containers with.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    fn not_found(job: &JobRef) -> RuntimeError {
        RuntimeError::NotFound(job_label(job))
    }
}

impl Runtime for DockerRuntime {
    async fn info(&self) -> Result<RuntimeInfo> {
        let docker = self.docker().await?;
        let version = docker.version().await.map_err(|e| engine_error("read the engine version", e))?;
        let images = docker
            .list_images(Some(ListImagesOptions::default()))
            .await
            .map_err(|e| engine_error("list images", e))?;
        let mut images: Vec<String> = images.into_iter().map(|image| image.id).collect();
        images.sort();
        images.dedup();
        Ok(RuntimeInfo { version: version.version.unwrap_or_default(), images })
    }

    async fn image_facts(&self, image: &str) -> Result<super::ImageFacts> {
        validate_image_id(image)?;
        let i = self
            .docker()
            .await?
            .inspect_image(image)
            .await
            .map_err(|e| engine_error(&format!("inspect image {image}"), e))?;
        Ok(super::ImageFacts {
            size_bytes: i.size.and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
            created: i.created.unwrap_or_default(),
        })
    }

    async fn image_present(&self, image: &str) -> Result<bool> {
        match self.docker().await?.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(e) if status_of(&e) == Some(404) => Ok(false),
            Err(e) => Err(engine_error(&format!("inspect image {image}"), e)),
        }
    }

    async fn create(&self, job: &JobRef, spec: &ContainerSpec, mounts: &Mounts) -> Result<String> {
        let name = container_name(job)?;
        validate_image_id(&spec.image)?;
        let mut body = create_body(&self.node_id, job, spec, mounts)?;
        confine(&mut body, self.confinement().await?);
        if !self.image_present(&spec.image).await? {
            return Err(RuntimeError::ImageMissing(spec.image.clone()));
        }
        let options = CreateContainerOptions { name: Some(name.clone()), ..Default::default() };
        match self.docker().await?.create_container(Some(options), body).await {
            Ok(created) => Ok(created.id),
            // The name is taken: this attempt was created before (maybe by a previous run of the
            // agent). Hand back that container, never a second one.
            Err(e) if status_of(&e) == Some(409) => self.existing_container_id(&name).await,
            Err(e) if status_of(&e) == Some(404) => Err(RuntimeError::ImageMissing(spec.image.clone())),
            Err(e) => Err(engine_error(&format!("create container {name}"), e)),
        }
    }

    async fn start(&self, job: &JobRef) -> Result<()> {
        let name = container_name(job)?;
        // Starting an exited container would run the job a second time.
        match self.inspect(job).await? {
            None => return Err(Self::not_found(job)),
            Some(ContainerState::Exited { exit_code, .. }) => {
                return Err(RuntimeError::Invalid(format!(
                    "container {name} has already run (exit code {exit_code}); a job attempt is never \
                     started twice: create a new attempt instead"
                )));
            }
            Some(ContainerState::Running { .. }) => return Ok(()),
            Some(ContainerState::Created) => {}
        }
        match self.docker().await?.start_container(&name, None).await {
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Err(Self::not_found(job)),
            // A dockerd killed while it started this container left containerd holding the
            // container (and maybe a process), and this dockerd could not clear it: every later
            // start answers the same. The earlier start may have run the job; starting it once
            // the leftover goes would run it twice. The attempt ends here, with the engine's words.
            Err(e) if start_cut_short(&e) => Err(RuntimeError::Invalid(format!(
                "start container {name}: {e}. A start of this container was cut short (dockerd stopped \
                 or was killed while starting it) and containerd still holds it; it may have begun to \
                 run, so it is not started again: the attempt fails, and a new attempt gets a new \
                 container. A process that start left running belongs to containerd alone now \
                 (`ctr --namespace moby tasks list` shows it under the container's id)"
            ))),
            Err(e) => Err(engine_error(&format!("start container {name}"), e)),
        }
    }

    async fn inspect(&self, job: &JobRef) -> Result<Option<ContainerState>> {
        let name = container_name(job)?;
        match self.docker().await?.inspect_container(&name, None).await {
            Ok(container) => Ok(Some(container_state(container.state.as_ref()))),
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(engine_error(&format!("inspect container {name}"), e)),
        }
    }

    async fn wait(&self, job: &JobRef) -> Result<i64> {
        let name = container_name(job)?;
        match self.inspect(job).await? {
            None => return Err(Self::not_found(job)),
            Some(ContainerState::Exited { exit_code, .. }) => return Ok(exit_code),
            Some(ContainerState::Created) => {
                return Err(RuntimeError::Invalid(format!(
                    "container {name} was never started; start it before waiting for it"
                )));
            }
            Some(ContainerState::Running { .. }) => {}
        }
        // "not-running" also answers at once if the container exited since the inspect above.
        let options = WaitContainerOptions { condition: "not-running".into() };
        let mut waited = self.docker().await?.wait_container(&name, Some(options));
        match waited.next().await {
            Some(Ok(answer)) => Ok(answer.status_code),
            // bollard reports a non-zero exit as an error; for us it is the job's result.
            Some(Err(EngineError::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(e)) if status_of(&e) == Some(404) => Err(Self::not_found(job)),
            Some(Err(e)) => Err(engine_error(&format!("wait for container {name}"), e)),
            None => match self.inspect(job).await? {
                Some(ContainerState::Exited { exit_code, .. }) => Ok(exit_code),
                None => Err(Self::not_found(job)),
                Some(_) => Err(RuntimeError::Unavailable(format!(
                    "wait for container {name}: the engine closed the wait before the container exited; \
                     retry"
                ))),
            },
        }
    }

    async fn kill(&self, job: &JobRef) -> Result<()> {
        let name = container_name(job)?;
        let options = KillContainerOptions { signal: "SIGKILL".into() };
        match self.docker().await?.kill_container(&name, Some(options)).await {
            Ok(()) => Ok(()),
            // 409: the container is not running (exited, or never started).
            Err(e) if status_of(&e) == Some(409) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Err(Self::not_found(job)),
            Err(e) => Err(engine_error(&format!("kill container {name}"), e)),
        }
    }

    async fn output(&self, job: &JobRef, max_bytes: usize) -> Result<Output> {
        let name = container_name(job)?;
        match logs::collect(self.docker().await?, &name, max_bytes).await {
            Ok(output) => Ok(output),
            Err(e) if status_of(&e) == Some(404) => Err(Self::not_found(job)),
            Err(e) => Err(engine_error(&format!("read the logs of container {name}"), e)),
        }
    }

    async fn log_stream(&self, job: &JobRef, follow: bool, tail_lines: u64) -> Result<LogStream> {
        let name = container_name(job)?;
        let docker = self.docker().await?.clone();
        // A missing container shows only as the stream's first error: look first.
        match docker.inspect_container(&name, None).await {
            Ok(_) => {}
            Err(e) if status_of(&e) == Some(404) => return Err(Self::not_found(job)),
            Err(e) => return Err(engine_error(&format!("inspect container {name}"), e)),
        }
        Ok(logs::stream(docker, name, follow, tail_lines))
    }

    async fn remove(&self, job: &JobRef) -> Result<()> {
        let name = container_name(job)?;
        let options = RemoveContainerOptions { force: true, v: true, ..Default::default() };
        match self.docker().await?.remove_container(&name, Some(options)).await {
            Ok(()) => Ok(()),
            // 404: gone already; 409: a removal is already in progress.
            Err(e) if matches!(status_of(&e), Some(404 | 409)) => Ok(()),
            Err(e) => Err(engine_error(&format!("remove container {name}"), e)),
        }
    }

    async fn list_managed(&self) -> Result<Vec<Managed>> {
        let filters = HashMap::from([("label".to_owned(), vec![format!("{LABEL_NODE}={}", self.node_id)])]);
        let options = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
        let summaries = self
            .docker()
            .await?
            .list_containers(Some(options))
            .await
            .map_err(|e| engine_error("list containers", e))?;
        let mut managed = Vec::with_capacity(summaries.len());
        for summary in summaries {
            let (Some(id), Some(labels)) = (summary.id, summary.labels) else { continue };
            if labels.contains_key(LABEL_SERVICE) {
                continue; // a service's container: the service reconciler's, not a job's
            }
            let job_id = labels.get(LABEL_JOB).cloned();
            let attempt = labels.get(LABEL_ATTEMPT).and_then(|a| a.parse::<u32>().ok());
            let (Some(job_id), Some(attempt)) = (job_id, attempt) else {
                tracing::warn!(container = %id, "container labelled for this node lacks a valid job or attempt label; ignoring it");
                continue;
            };
            // The summary has no exit code or times: inspect each one.
            let state = match self.docker().await?.inspect_container(&id, None).await {
                Ok(container) => container_state(container.state.as_ref()),
                Err(e) if status_of(&e) == Some(404) => continue, // removed meanwhile
                Err(e) => return Err(engine_error(&format!("inspect container {id}"), e)),
            };
            managed.push(Managed { job: JobRef { job_id, attempt }, container_id: id, state });
        }
        managed.sort_by(|a, b| (&a.job.job_id, a.job.attempt).cmp(&(&b.job.job_id, b.job.attempt)));
        Ok(managed)
    }

    async fn load_image(&self, tar: &Path) -> Result<Vec<String>> {
        load::load_image(&self.engine().await?.loader, tar, std::sync::Arc::new(|_| {})).await
    }

    async fn service_create(
        &self,
        svc: &ServiceRef,
        spec: &outpost_protocol::ServiceSpec,
        input: Option<&Path>,
    ) -> Result<String> {
        self.create_service(svc, spec, input).await
    }

    async fn service_start(&self, svc: &ServiceRef) -> Result<()> {
        self.start_service(svc).await
    }

    async fn service_wait(&self, svc: &ServiceRef) -> Result<()> {
        self.wait_service(svc).await
    }

    async fn service_list(&self) -> Result<Vec<ManagedService>> {
        self.list_services().await
    }

    async fn service_remove(&self, svc: &ServiceRef) -> Result<()> {
        self.remove_service(svc).await
    }

    async fn service_forget(&self, name: &str, volume: bool) -> Result<()> {
        self.forget_service(name, volume).await
    }

    async fn service_exec(
        &self,
        svc: &ServiceRef,
        cmd: &[String],
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<ExecOutcome> {
        self.exec_service(svc, cmd, timeout, max_bytes).await
    }
}

/// What `outpost doctor` says of the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineFacts {
    pub version: String,
    pub storage_driver: String,
    /// `1`, `2`, or empty when the engine does not say.
    pub cgroup_version: String,
    /// The engine's security options as it reports them, e.g. `name=seccomp,profile=default`,
    /// `name=apparmor`, `name=cgroupns`.
    pub security_options: Vec<String>,
}

impl EngineFacts {
    /// Whether the engine applies a seccomp profile to containers (its default one, since
    /// Outpost never asks for `seccomp=unconfined`).
    pub fn seccomp(&self) -> bool {
        self.security_options.iter().any(|o| o.split(',').any(|kv| kv == "name=seccomp"))
    }

    /// Whether the engine confines containers with AppArmor (where the kernel has it).
    pub fn apparmor(&self) -> bool {
        self.security_options.iter().any(|o| o.split(',').any(|kv| kv == "name=apparmor"))
    }
}

impl DockerRuntime {
    /// [`Runtime::load_image`], telling `sent` the bytes of each piece sent to the engine.
    pub async fn load_image_reporting(&self, tar: &Path, sent: load::Sent) -> Result<Vec<String>> {
        load::load_image(&self.engine().await?.loader, tar, sent).await
    }

    /// The engine's version, storage driver and cgroup version.
    pub async fn engine_facts(&self) -> Result<EngineFacts> {
        let docker = self.docker().await?;
        let info = docker.info().await.map_err(|e| engine_error("read the engine's facts", e))?;
        Ok(EngineFacts {
            version: info.server_version.unwrap_or_default(),
            storage_driver: info.driver.unwrap_or_default(),
            cgroup_version: info.cgroup_version.map(|v| v.to_string()).unwrap_or_default(),
            security_options: info.security_options.unwrap_or_default(),
        })
    }

    /// The id of the container already named `name`, if it is this node's.
    async fn existing_container_id(&self, name: &str) -> Result<String> {
        let what = format!("inspect existing container {name}");
        // The engine reserves the name before the container it creates can be inspected: a
        // create racing another one may see the conflict a moment before the container exists.
        let mut attempts = 0;
        let container = loop {
            match self.docker().await?.inspect_container(name, None).await {
                Ok(container) => break container,
                Err(e) if status_of(&e) == Some(404) && attempts < NAME_RESERVED_POLLS => {
                    attempts += 1;
                    tokio::time::sleep(NAME_RESERVED_POLL).await;
                }
                Err(e) if status_of(&e) == Some(404) => {
                    return Err(RuntimeError::Unavailable(format!(
                        "{what}: the name is taken but no container answers to it yet (another create \
                         is still running?); retry"
                    )));
                }
                Err(e) => return Err(engine_error(&what, e)),
            }
        };
        let labels = container.config.and_then(|c| c.labels).unwrap_or_default();
        let owner = labels.get(LABEL_NODE).map(String::as_str);
        if owner != Some(self.node_id.as_str()) {
            return Err(RuntimeError::Invalid(format!(
                "container name {name} is taken by a container of node {owner:?}, not {}: job ids must \
                 be unique per engine",
                self.node_id
            )));
        }
        container.id.ok_or_else(|| RuntimeError::Unavailable(format!("{what}: the engine gave no id")))
    }
}
