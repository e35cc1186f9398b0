//! Turns a signed `ContainerSpec` into the engine's create request with the hardened defaults.
//! Everything a job may relax comes from `spec.security`; nothing else can loosen the result.

use std::collections::HashMap;
use std::path::Path;

use bollard::models::{
    ContainerCreateBody, HostConfig, HostConfigLogConfig, Mount, MountBindOptions,
    MountBindOptionsPropagationEnum, MountType, RestartPolicy, RestartPolicyNameEnum,
};
use outpost_protocol::ContainerSpec;

use crate::runtime::{
    INPUT_MOUNT, JobRef, LABEL_ATTEMPT, LABEL_JOB, LABEL_NODE, Mounts, OUTPUT_MOUNT, RESERVED_LABEL_PREFIX,
    Result, RuntimeError,
};

/// The unprivileged user (nobody:nogroup) jobs run as unless the spec names another.
pub(super) const DEFAULT_USER: &str = "65534:65534";
/// Mount options of the job's scratch space on /tmp.
pub(super) const TMP_MOUNT_OPTIONS: &str = "rw,nosuid,nodev,size=64m";
/// The job's log on the node's disk: json-file (which `docker logs` and our tails read, whatever
/// the daemon's default driver) rotated at this size, so a chatty job can neither fill the disk
/// nor make reading its tail slow. After a rotation the previous file is kept whole: at least
/// 16 MiB of JSON, which holds over 200 KiB of output even as one-byte lines (about 70 bytes of
/// JSON each), more than any tail the agent reports.
pub(super) const LOG_DRIVER: &str = "json-file";
pub(super) const LOG_MAX_SIZE: &str = "16m";
pub(super) const LOG_MAX_FILES: &str = "2";
/// The engine refuses memory limits under 6 MiB.
const MIN_MEMORY_MB: u64 = 6;

/// The container's name, refusing job ids that are not safe as a Docker name and URL segment
/// (a job id like `../x` must never address another object of the engine).
pub(super) fn container_name(job: &JobRef) -> Result<String> {
    let id = &job.job_id;
    if !is_plain_name(id, 200) {
        return Err(RuntimeError::Invalid(format!(
            "job id {id:?} cannot name a container: use 1-200 characters [A-Za-z0-9_.-] starting with \
             a letter or digit"
        )));
    }
    Ok(job.container_name())
}

/// Images are addressed by id only (`sha256:` and 64 lowercase hex digits), never by a name a
/// registry or a local tag could re-point.
pub(super) fn validate_image_id(image: &str) -> Result<()> {
    let hex = image.strip_prefix("sha256:").unwrap_or_default();
    if hex.len() == 64 && hex.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) {
        Ok(())
    } else {
        Err(RuntimeError::Invalid(format!(
            "image {image:?} is not an image id: jobs name images as sha256:<64 hex digits> (the id \
             `docker load` preserves), never by tag"
        )))
    }
}

/// A bind mount of the host directory `source` at `target`: private propagation, so nothing
/// the host mounts later under `source` shows up in the container, and nothing leaks back.
fn bind(job: &JobRef, source: &Path, target: &str, read_only: bool) -> Result<Mount> {
    let source = source.to_str().filter(|s| source.is_absolute() && !s.contains('\0')).ok_or_else(|| {
        RuntimeError::Invalid(format!(
            "job {}: the host directory for {target} ({}) must be an absolute UTF-8 path",
            job.job_id,
            source.display()
        ))
    })?;
    Ok(Mount {
        target: Some(target.to_owned()),
        source: Some(source.to_owned()),
        typ: Some(MountType::BIND),
        read_only: Some(read_only),
        bind_options: Some(MountBindOptions {
            propagation: Some(MountBindOptionsPropagationEnum::RPRIVATE),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Whether `name` may name an AppArmor profile in the node's configuration (`unconfined`, which
/// turns AppArmor off for the container, may not).
pub fn is_profile_name(name: &str) -> bool {
    name != "unconfined" && is_plain_name(name, 64)
}

/// 1 to `max` bytes of `[A-Za-z0-9_.-]`, starting with a letter or digit: safe as a Docker name,
/// a URL segment and a security option's value.
fn is_plain_name(name: &str, max: usize) -> bool {
    name.bytes().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.len() <= max
        && name.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Puts the container under AppArmor profile `profile` (the engine's default when `None`).
pub(super) fn confine(body: &mut ContainerCreateBody, profile: Option<&str>) {
    if let Some(profile) = profile {
        let host = body.host_config.get_or_insert_with(Default::default);
        host.security_opt.get_or_insert_with(Vec::new).push(format!("apparmor={profile}"));
    }
}

/// The create request for `job`, labelled as `node_id`'s, with the job's data `mounts`.
pub(super) fn create_body(
    node_id: &str,
    job: &JobRef,
    spec: &ContainerSpec,
    mounts: &Mounts,
) -> Result<ContainerCreateBody> {
    validate_image_id(&spec.image)?;
    let mut binds = Vec::new();
    if let Some(input) = &mounts.input {
        binds.push(bind(job, input, INPUT_MOUNT, true)?);
    }
    if let Some(output) = &mounts.output {
        binds.push(bind(job, output, OUTPUT_MOUNT, false)?);
    }
    let mut labels: HashMap<String, String> = HashMap::with_capacity(spec.labels.len() + 3);
    for (key, value) in &spec.labels {
        if key.to_ascii_lowercase().starts_with(RESERVED_LABEL_PREFIX) {
            return Err(RuntimeError::Invalid(format!(
                "job {} sets label {key:?}: labels starting with {RESERVED_LABEL_PREFIX:?} are the \
                 agent's; rename it",
                job.job_id
            )));
        }
        labels.insert(key.clone(), value.clone());
    }
    labels.insert(LABEL_JOB.to_owned(), job.job_id.clone());
    labels.insert(LABEL_ATTEMPT.to_owned(), job.attempt.to_string());
    labels.insert(LABEL_NODE.to_owned(), node_id.to_owned());

    let mut env = Vec::with_capacity(spec.env.len());
    for (key, value) in &spec.env {
        if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0') {
            return Err(RuntimeError::Invalid(format!(
                "job {} sets environment variable {key:?}: names must be non-empty without '=' or NUL",
                job.job_id
            )));
        }
        env.push(format!("{key}={value}"));
    }

    let security = &spec.security;
    let user = match security.user.as_deref() {
        None => DEFAULT_USER.to_owned(),
        Some(user) if !user.trim().is_empty() => user.to_owned(),
        Some(_) => {
            return Err(RuntimeError::Invalid(format!(
                "job {} sets an empty security.user: give uid[:gid] or leave it out",
                job.job_id
            )));
        }
    };

    let res = &spec.resources;
    let limit_error = |what: &str| {
        RuntimeError::Invalid(format!("job {}: {what} (resources of the signed spec)", job.job_id))
    };
    if res.memory_mb < MIN_MEMORY_MB {
        return Err(limit_error(&format!("memory_mb {} is below the engine's minimum of 6", res.memory_mb)));
    }
    let memory = res
        .memory_mb
        .checked_mul(1024 * 1024)
        .and_then(|b| i64::try_from(b).ok())
        .ok_or_else(|| limit_error(&format!("memory_mb {} is too large", res.memory_mb)))?;
    if res.cpu_millis == 0 {
        return Err(limit_error("cpu_millis 0 would mean no CPU limit; give at least 1"));
    }
    let nano_cpus = res
        .cpu_millis
        .checked_mul(1_000_000)
        .and_then(|n| i64::try_from(n).ok())
        .ok_or_else(|| limit_error(&format!("cpu_millis {} is too large", res.cpu_millis)))?;
    if res.pids == 0 {
        return Err(limit_error("pids 0 would mean no process limit; give at least 1"));
    }
    let pids =
        i64::try_from(res.pids).map_err(|_| limit_error(&format!("pids {} is too large", res.pids)))?;

    let host_config = HostConfig {
        readonly_rootfs: Some(!security.writable_rootfs),
        tmpfs: Some(HashMap::from([("/tmp".to_owned(), TMP_MOUNT_OPTIONS.to_owned())])),
        mounts: (!binds.is_empty()).then_some(binds),
        cap_drop: Some(vec!["ALL".to_owned()]),
        cap_add: (!security.cap_add.is_empty()).then(|| security.cap_add.clone()),
        security_opt: Some(vec!["no-new-privileges".to_owned()]),
        network_mode: Some(if spec.network { "bridge" } else { "none" }.to_owned()),
        memory: Some(memory),
        memory_swap: Some(memory),
        nano_cpus: Some(nano_cpus),
        pids_limit: Some(pids),
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::NO),
            maximum_retry_count: None,
        }),
        auto_remove: Some(false),
        log_config: Some(HostConfigLogConfig {
            typ: Some(LOG_DRIVER.to_owned()),
            config: Some(HashMap::from([
                ("max-size".to_owned(), LOG_MAX_SIZE.to_owned()),
                ("max-file".to_owned(), LOG_MAX_FILES.to_owned()),
            ])),
        }),
        ..Default::default()
    };
    Ok(ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
        env: Some(env),
        user: Some(user),
        labels: Some(labels),
        tty: Some(false),
        attach_stdin: Some(false),
        open_stdin: Some(false),
        host_config: Some(host_config),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use outpost_protocol::{Resources, SecurityOverrides};

    use super::*;

    const IMAGE: &str = "sha256:6b5cf973f8b24ce841a0fe3ed85dc02dbe117def3516167f9484d4b53373bcfb";

    fn job() -> JobRef {
        JobRef { job_id: "j1".into(), attempt: 2 }
    }

    fn spec() -> ContainerSpec {
        ContainerSpec {
            image: IMAGE.into(),
            command: vec!["echo".into(), "hi".into()],
            env: [("A".to_owned(), "b=c".to_owned())].into(),
            resources: Resources { cpu_millis: 500, memory_mb: 64, pids: 32 },
            network: false,
            timeout_secs: 10,
            labels: [("team".to_owned(), "x".to_owned())].into(),
            security: SecurityOverrides::default(),
            inputs: Vec::new(),
            output_prefix: None,
            egress_bodies: Vec::new(),
        }
    }

    #[test]
    fn a_configured_apparmor_profile_joins_the_other_security_options() -> Result<()> {
        let mut body = create_body("n", &job(), &spec(), &Mounts::default())?;
        confine(&mut body, None);
        assert_eq!(
            body.host_config.as_ref().and_then(|h| h.security_opt.clone()),
            Some(vec!["no-new-privileges".to_owned()])
        );
        confine(&mut body, Some("outpost-container"));
        assert_eq!(
            body.host_config.and_then(|h| h.security_opt),
            Some(vec!["no-new-privileges".to_owned(), "apparmor=outpost-container".to_owned()])
        );
        for good in ["outpost-container", "a", "docker-default", "x_1.2"] {
            assert!(is_profile_name(good), "{good}");
        }
        for bad in ["", "unconfined", "-x", "a b", "a,b", "unconfined=1", "a/b", &"x".repeat(65)] {
            assert!(!is_profile_name(bad), "{bad}");
        }
        Ok(())
    }

    #[test]
    fn a_plain_spec_gets_every_hardened_default() -> Result<()> {
        let body = create_body("node-a", &job(), &spec(), &Mounts::default())?;
        let host = body.host_config.unwrap_or_default();
        assert_eq!(host.readonly_rootfs, Some(true));
        assert_eq!(host.tmpfs.unwrap_or_default().get("/tmp").map(String::as_str), Some(TMP_MOUNT_OPTIONS));
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(host.cap_add, None);
        assert_eq!(host.security_opt, Some(vec!["no-new-privileges".to_owned()]));
        assert_eq!(host.network_mode.as_deref(), Some("none"));
        assert_eq!(host.memory, Some(64 * 1024 * 1024));
        assert_eq!(host.memory_swap, host.memory);
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(host.pids_limit, Some(32));
        assert_eq!(host.auto_remove, Some(false));
        assert_eq!(host.mounts, None, "no job data, no mounts");
        let log = host.log_config.unwrap_or_default();
        assert_eq!(log.typ.as_deref(), Some(LOG_DRIVER));
        assert_eq!(log.config.unwrap_or_default().get("max-size").map(String::as_str), Some(LOG_MAX_SIZE));
        assert_eq!(body.user.as_deref(), Some(DEFAULT_USER));
        assert_eq!(body.env, Some(vec!["A=b=c".to_owned()]));
        assert_eq!(body.cmd, Some(vec!["echo".to_owned(), "hi".to_owned()]));
        let labels = body.labels.unwrap_or_default();
        assert_eq!(labels.get(LABEL_JOB).map(String::as_str), Some("j1"));
        assert_eq!(labels.get(LABEL_ATTEMPT).map(String::as_str), Some("2"));
        assert_eq!(labels.get(LABEL_NODE).map(String::as_str), Some("node-a"));
        assert_eq!(labels.get("team").map(String::as_str), Some("x"));
        Ok(())
    }

    #[test]
    fn the_signed_security_overrides_relax_only_what_they_name() -> Result<()> {
        let mut spec = spec();
        spec.network = true;
        spec.command.clear();
        spec.security = SecurityOverrides {
            writable_rootfs: true,
            user: Some("1000".into()),
            cap_add: vec!["CHOWN".into()],
        };
        let body = create_body("n", &job(), &spec, &Mounts::default())?;
        let host = body.host_config.unwrap_or_default();
        assert_eq!(host.readonly_rootfs, Some(false));
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(host.cap_add, Some(vec!["CHOWN".to_owned()]));
        assert_eq!(host.network_mode.as_deref(), Some("bridge"));
        assert_eq!(host.security_opt, Some(vec!["no-new-privileges".to_owned()]));
        assert_eq!(body.user.as_deref(), Some("1000"));
        assert_eq!(body.cmd, None);
        Ok(())
    }

    #[test]
    fn job_data_is_bind_mounted_input_read_only_and_output_writable() -> Result<()> {
        let mounts = Mounts {
            input: Some("/var/lib/outpost/jobdata/j1/2/in".into()),
            output: Some("/var/lib/outpost/jobdata/j1/2/out".into()),
        };
        let body = create_body("n", &job(), &spec(), &mounts)?;
        let host = body.host_config.unwrap_or_default();
        let binds = host.mounts.unwrap_or_default();
        assert_eq!(binds.len(), 2);
        let input = &binds[0];
        assert_eq!(input.target.as_deref(), Some(INPUT_MOUNT));
        assert_eq!(input.source.as_deref(), Some("/var/lib/outpost/jobdata/j1/2/in"));
        assert_eq!(input.typ, Some(MountType::BIND));
        assert_eq!(input.read_only, Some(true));
        let output = &binds[1];
        assert_eq!(output.target.as_deref(), Some(OUTPUT_MOUNT));
        assert_eq!(output.read_only, Some(false));
        // Mounting job data relaxes nothing else.
        assert_eq!(host.readonly_rootfs, Some(true));
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(host.network_mode.as_deref(), Some("none"));
        assert_eq!(body.user.as_deref(), Some(DEFAULT_USER));

        let only_out = Mounts { input: None, output: Some("/d/out".into()) };
        let host = create_body("n", &job(), &spec(), &only_out)?.host_config.unwrap_or_default();
        let binds = host.mounts.unwrap_or_default();
        assert_eq!(binds.len(), 1);
        assert_eq!(binds[0].target.as_deref(), Some(OUTPUT_MOUNT));
        Ok(())
    }

    #[test]
    fn a_relative_mount_source_is_refused() {
        let mounts = Mounts { input: Some("jobdata/in".into()), output: None };
        let err = create_body("n", &job(), &spec(), &mounts).err();
        assert!(matches!(err, Some(RuntimeError::Invalid(ref m)) if m.contains("absolute")), "{err:?}");
    }

    #[test]
    fn a_spec_label_may_not_claim_the_outpost_prefix() {
        for key in ["outpost.node", "outpost.job", "Outpost.anything"] {
            let mut spec = spec();
            spec.labels.insert(key.into(), "other".into());
            let err = create_body("n", &job(), &spec, &Mounts::default()).err();
            assert!(matches!(err, Some(RuntimeError::Invalid(ref m)) if m.contains(key)), "{key}: {err:?}");
        }
    }

    #[test]
    fn images_are_named_by_id_only() {
        for image in ["busybox", "busybox:latest", "sha256:abc", &IMAGE.to_uppercase(), &format!("{IMAGE}0")]
        {
            let mut spec = spec();
            spec.image = image.to_owned();
            assert!(
                matches!(create_body("n", &job(), &spec, &Mounts::default()), Err(RuntimeError::Invalid(_))),
                "{image}"
            );
        }
    }

    #[test]
    fn limits_that_would_mean_unlimited_are_refused() {
        for resources in [
            Resources { cpu_millis: 0, memory_mb: 64, pids: 32 },
            Resources { cpu_millis: 500, memory_mb: 0, pids: 32 },
            Resources { cpu_millis: 500, memory_mb: 64, pids: 0 },
            Resources { cpu_millis: u64::MAX, memory_mb: 64, pids: 32 },
        ] {
            let mut spec = spec();
            spec.resources = resources.clone();
            assert!(
                matches!(create_body("n", &job(), &spec, &Mounts::default()), Err(RuntimeError::Invalid(_))),
                "{resources:?}"
            );
        }
    }

    #[test]
    fn job_ids_that_are_not_safe_names_are_refused() {
        for id in ["", "../images/x", "a/b", "-x", "a b", "é"] {
            let job = JobRef { job_id: id.into(), attempt: 1 };
            assert!(matches!(container_name(&job), Err(RuntimeError::Invalid(_))), "{id:?}");
        }
        let ok = JobRef { job_id: "0f4c_x.y-z".into(), attempt: 3 };
        assert_eq!(container_name(&ok).ok().as_deref(), Some("outpost-0f4c_x.y-z-3"));
    }
}
