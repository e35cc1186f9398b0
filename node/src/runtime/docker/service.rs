//! Service containers on the Docker engine: one container per (service, revision), named and
//! labelled so that a restarted agent adopts it; the same hardened create request as a job,
//! plus the service's own network, published ports and named volume. Restart policies are the
//! agent's (the engine's own is always `no`), so every restart is seen and counted.

use std::collections::HashMap;
use std::time::Duration;

use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, Mount, MountType, NetworkCreateRequest, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptions, KillContainerOptions, ListContainersOptions, RemoveContainerOptions,
    RemoveVolumeOptions, WaitContainerOptions,
};
use futures_util::StreamExt;
use outpost_protocol::{ContainerSpec, ServiceNetwork, ServiceSpec};

use super::DockerRuntime;
use super::convert::{container_state, engine_error, start_cut_short, status_of};
use super::spec::{confine, create_body, validate_image_id};
use crate::runtime::{
    ExecOutcome, JobRef, LABEL_ATTEMPT, LABEL_DEPLOYMENT, LABEL_JOB, LABEL_NODE, LABEL_REVISION,
    LABEL_SERVICE, ManagedService, Result, Runtime, RuntimeError, ServiceRef,
};

impl DockerRuntime {
    /// `outpost-svc-<node>-<service>-<deployment>-r<revision>`: unique per engine even when
    /// several nodes share it.
    pub(super) fn service_container(&self, svc: &ServiceRef) -> Result<String> {
        check_name(&svc.name)?;
        check_name(&svc.deployment)?;
        Ok(format!("outpost-svc-{}-{}-{}-r{}", self.node_id, svc.name, svc.deployment, svc.revision))
    }

    /// One network per service and kind: a revision signed `internal` never lands on a
    /// network with a route out that an earlier `bridge` revision made.
    fn service_network(&self, name: &str, internal: bool) -> String {
        format!("outpost-svc-{}-{name}-{}", self.node_id, if internal { "internal" } else { "bridge" })
    }

    fn service_volume(&self, name: &str) -> String {
        format!("outpost-svc-{}-{name}-data", self.node_id)
    }

    /// The create request: a job's hardened body with the service's labels, network, ports and
    /// volume.
    fn service_body(
        &self,
        svc: &ServiceRef,
        spec: &ServiceSpec,
        input: Option<&std::path::Path>,
    ) -> Result<ContainerCreateBody> {
        let as_job = ContainerSpec {
            image: spec.image.clone(),
            command: spec.command.clone(),
            env: spec.env.clone(),
            resources: spec.resources.clone(),
            network: false,
            timeout_secs: 1,
            labels: Default::default(),
            security: spec.security.clone(),
            inputs: Vec::new(),
            output_prefix: None,
            egress_bodies: Vec::new(),
        };
        let job = JobRef { job_id: format!("svc-{}", svc.name), attempt: 0 };
        let mounts = crate::runtime::Mounts { input: input.map(std::path::Path::to_path_buf), output: None };
        let mut body = create_body(&self.node_id, &job, &as_job, &mounts)?;
        let labels = body.labels.get_or_insert_with(HashMap::new);
        labels.remove(LABEL_JOB);
        labels.remove(LABEL_ATTEMPT);
        labels.insert(LABEL_SERVICE.to_owned(), svc.name.clone());
        labels.insert(LABEL_REVISION.to_owned(), svc.revision.to_string());
        labels.insert(LABEL_DEPLOYMENT.to_owned(), svc.deployment.clone());
        labels.insert(LABEL_NODE.to_owned(), self.node_id.clone());
        let host = body.host_config.get_or_insert_with(Default::default);
        if spec.network != ServiceNetwork::None {
            host.network_mode =
                Some(self.service_network(&svc.name, spec.network == ServiceNetwork::Internal));
        }
        if !spec.publish.is_empty() {
            let mut bindings = HashMap::new();
            let mut exposed = Vec::new();
            for p in &spec.publish {
                let key = format!("{}/tcp", p.container_port);
                exposed.push(key.clone());
                bindings.entry(key).or_insert_with(|| Some(Vec::new())).get_or_insert_with(Vec::new).push(
                    PortBinding {
                        host_ip: Some(p.host_ip.clone()),
                        host_port: Some(p.host_port.to_string()),
                    },
                );
            }
            host.port_bindings = Some(bindings);
            body.exposed_ports = Some(exposed);
        }
        if let Some(target) = &spec.volume {
            host.mounts.get_or_insert_with(Vec::new).push(Mount {
                target: Some(target.clone()),
                source: Some(self.service_volume(&svc.name)),
                typ: Some(MountType::VOLUME),
                read_only: Some(false),
                ..Default::default()
            });
        }
        Ok(body)
    }

    async fn ensure_network(&self, name: &str, internal: bool) -> Result<()> {
        let network = self.service_network(name, internal);
        let docker = self.docker().await?;
        if docker.inspect_network(&network, None).await.is_ok() {
            return Ok(());
        }
        let labels = HashMap::from([
            (LABEL_SERVICE.to_owned(), name.to_owned()),
            (LABEL_NODE.to_owned(), self.node_id.clone()),
        ]);
        let request = NetworkCreateRequest {
            name: network.clone(),
            driver: Some("bridge".into()),
            internal: Some(internal),
            labels: Some(labels),
            ..Default::default()
        };
        match docker.create_network(request).await {
            Ok(_) => Ok(()),
            Err(e) if status_of(&e) == Some(409) => Ok(()),
            Err(e) => Err(engine_error(&format!("create network {network}"), e)),
        }
    }

    pub(super) async fn create_service(
        &self,
        svc: &ServiceRef,
        spec: &ServiceSpec,
        input: Option<&std::path::Path>,
    ) -> Result<String> {
        let name = self.service_container(svc)?;
        validate_image_id(&spec.image)?;
        spec.check().map_err(|why| RuntimeError::Invalid(format!("service {}: {why}", svc.name)))?;
        let mut body = self.service_body(svc, spec, input)?;
        confine(&mut body, self.confinement().await?);
        if !self.image_present(&spec.image).await? {
            return Err(RuntimeError::ImageMissing(spec.image.clone()));
        }
        if spec.network != ServiceNetwork::None {
            self.ensure_network(&svc.name, spec.network == ServiceNetwork::Internal).await?;
        }
        let options = CreateContainerOptions { name: Some(name.clone()), ..Default::default() };
        match self.docker().await?.create_container(Some(options), body).await {
            Ok(created) => Ok(created.id),
            Err(e) if status_of(&e) == Some(409) => self.existing_container_id(&name).await,
            Err(e) if status_of(&e) == Some(404) => Err(RuntimeError::ImageMissing(spec.image.clone())),
            Err(e) => Err(engine_error(&format!("create container {name}"), e)),
        }
    }

    pub(super) async fn start_service(&self, svc: &ServiceRef) -> Result<()> {
        let name = self.service_container(svc)?;
        match self.docker().await?.start_container(&name, None).await {
            Ok(()) => Ok(()),
            // 304: running already.
            Err(e) if status_of(&e) == Some(304) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Err(RuntimeError::NotFound(format!("service {name}"))),
            // This container can never start again; a service may run again, so the container
            // goes and the next pass makes a new one.
            Err(e) if start_cut_short(&e) => {
                let removed = match self.remove_service(svc).await {
                    Ok(()) => "it was removed and is made again".to_owned(),
                    Err(why) => format!("removing it failed too ({why})"),
                };
                Err(RuntimeError::Unavailable(format!(
                    "start container {name}: {e}: an earlier start was cut short (dockerd stopped or \
                     was killed while starting it) and containerd still holds it; {removed}"
                )))
            }
            Err(e) => Err(engine_error(&format!("start container {name}"), e)),
        }
    }

    pub(super) async fn list_services(&self) -> Result<Vec<ManagedService>> {
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![format!("{LABEL_NODE}={}", self.node_id), LABEL_SERVICE.to_owned()],
        )]);
        let options = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
        let docker = self.docker().await?;
        let summaries =
            docker.list_containers(Some(options)).await.map_err(|e| engine_error("list containers", e))?;
        let mut out = Vec::with_capacity(summaries.len());
        for summary in summaries {
            let (Some(id), Some(labels)) = (summary.id, summary.labels) else { continue };
            let name = labels.get(LABEL_SERVICE).cloned();
            let revision = labels.get(LABEL_REVISION).and_then(|r| r.parse::<u64>().ok());
            let (Some(name), Some(revision)) = (name, revision) else { continue };
            let deployment = labels.get(LABEL_DEPLOYMENT).cloned().unwrap_or_default();
            let container = match docker.inspect_container(&id, None).await {
                Ok(c) => c,
                Err(e) if status_of(&e) == Some(404) => continue,
                Err(e) => return Err(engine_error(&format!("inspect container {id}"), e)),
            };
            let address = container
                .network_settings
                .and_then(|n| n.networks)
                .and_then(|nets| nets.into_values().find_map(|e| e.ip_address.filter(|a| !a.is_empty())))
                .and_then(|a| a.parse().ok());
            out.push(ManagedService {
                service: ServiceRef { name, deployment, revision },
                state: container_state(container.state.as_ref()),
                address,
            });
        }
        out.sort_by(|a, b| a.service.cmp(&b.service));
        Ok(out)
    }

    pub(super) async fn wait_service(&self, svc: &ServiceRef) -> Result<()> {
        let name = self.service_container(svc)?;
        let options = WaitContainerOptions { condition: "not-running".into() };
        let mut waited = self.docker().await?.wait_container(&name, Some(options));
        match waited.next().await {
            Some(Ok(_)) | None => Ok(()),
            // A non-zero exit is reported as an error by bollard; either way it has stopped.
            Some(Err(bollard::errors::Error::DockerContainerWaitError { .. })) => Ok(()),
            Some(Err(e)) if status_of(&e) == Some(404) => Ok(()),
            Some(Err(e)) => Err(engine_error(&format!("wait for container {name}"), e)),
        }
    }

    pub(super) async fn remove_service(&self, svc: &ServiceRef) -> Result<()> {
        let name = self.service_container(svc)?;
        let docker = self.docker().await?;
        let kill = KillContainerOptions { signal: "SIGKILL".into() };
        match docker.kill_container(&name, Some(kill)).await {
            Ok(()) => {}
            Err(e) if matches!(status_of(&e), Some(404 | 409)) => {}
            Err(e) => return Err(engine_error(&format!("kill container {name}"), e)),
        }
        let options = RemoveContainerOptions { force: true, v: false, ..Default::default() };
        match docker.remove_container(&name, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if matches!(status_of(&e), Some(404 | 409)) => Ok(()),
            Err(e) => Err(engine_error(&format!("remove container {name}"), e)),
        }
    }

    pub(super) async fn forget_service(&self, name: &str, volume: bool) -> Result<()> {
        check_name(name)?;
        let docker = self.docker().await?;
        for internal in [true, false] {
            let network = self.service_network(name, internal);
            match docker.remove_network(&network).await {
                Ok(()) => {}
                Err(e) if status_of(&e) == Some(404) => {}
                Err(e) => return Err(engine_error(&format!("remove network {network}"), e)),
            }
        }
        if volume {
            let v = self.service_volume(name);
            match docker.remove_volume(&v, Some(RemoveVolumeOptions { force: true })).await {
                Ok(()) => {}
                Err(e) if status_of(&e) == Some(404) => {}
                Err(e) => return Err(engine_error(&format!("remove volume {v}"), e)),
            }
        }
        Ok(())
    }

    pub(super) async fn exec_service(
        &self,
        svc: &ServiceRef,
        cmd: &[String],
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<ExecOutcome> {
        let name = self.service_container(svc)?;
        let docker = self.docker().await?;
        let options = CreateExecOptions::<String> {
            cmd: Some(cmd.to_vec()),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            ..Default::default()
        };
        let what = format!("run the health check in {name}");
        let exec = docker.create_exec(&name, options).await.map_err(|e| engine_error(&what, e))?;
        let run = async {
            let started = docker
                .start_exec(
                    &exec.id,
                    Some(StartExecOptions { detach: false, tty: false, output_capacity: None }),
                )
                .await
                .map_err(|e| engine_error(&what, e))?;
            let mut text = Vec::new();
            if let StartExecResults::Attached { mut output, .. } = started {
                while let Some(chunk) = output.next().await {
                    let chunk = chunk.map_err(|e| engine_error(&what, e))?;
                    text.extend_from_slice(&chunk.into_bytes());
                    if text.len() > max_bytes * 2 {
                        text.drain(..text.len() - max_bytes);
                    }
                }
            }
            let inspect = docker.inspect_exec(&exec.id).await.map_err(|e| engine_error(&what, e))?;
            let start = text.len().saturating_sub(max_bytes);
            Ok(ExecOutcome {
                exit_code: inspect.exit_code.unwrap_or(-1),
                output: String::from_utf8_lossy(&text[start..]).into_owned(),
            })
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(r) => r,
            Err(_) => Ok(ExecOutcome {
                exit_code: -1,
                output: format!("health check did not finish within {} ms", timeout.as_millis()),
            }),
        }
    }
}

/// Service names become part of engine object names: only the protocol's safe alphabet.
fn check_name(name: &str) -> Result<()> {
    outpost_protocol::check_service_name(name)
        .map_err(|why| RuntimeError::Invalid(format!("service name {why}")))
}
