//! Operator job routes: submit (sign with the org key, queue, wake the node's poll), list, get;
//! and the spec checks and job creation that triggers share with submission.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use outpost_protocol::{
    ContainerSpec, ErrorBody, InferenceSpec, JobEnvelope, JobInfo, JobList, JobSpec, JobState, NodeInfo,
    SubmitJobRequest, paths,
};
use serde::Deserialize;

use super::{ApiError, ApiResult, AppState, Body, OperatorAuth, Params, Shared};
use crate::signing;
use crate::store::{JobFilter, JobRecord, StoreError};

const DEFAULT_JOB_EXPIRY_SECS: u64 = 24 * 3600;
const MAX_JOB_EXPIRY_SECS: u64 = 30 * 24 * 3600;
const DEFAULT_LIST: usize = 100;
const MAX_LIST: usize = 1000;

#[utoipa::path(post, path = paths::JOBS, tag = "jobs", request_body = SubmitJobRequest,
    description = "Sign the job with the node's organisation key and queue it; a poll the node is holding \
                   is answered at once.",
    responses((status = 201, body = JobInfo), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, description = "node not enrolled", body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn submit_job(
    _: OperatorAuth,
    State(st): State<Shared>,
    Body(req): Body<SubmitJobRequest>,
) -> ApiResult<(StatusCode, Json<JobInfo>)> {
    check_job_spec(&req.spec)?;
    let expiry = check_expiry(req.expires_in_secs)?;
    let node = st.store.get_node(&req.node_id).await?.ok_or_else(|| {
        ApiError::not_found(format!("node {} is not enrolled; see `node list`", req.node_id))
    })?;
    let info = create_job(&st, &node, req.spec, expiry, None).await?.ok_or_else(|| {
        ApiError::internal("job_id_taken", "a freshly generated job id is already taken; submit again")
    })?;
    let what = match &info.spec {
        JobSpec::Container(c) => format!("image {}", c.image),
        JobSpec::Inference(i) => format!("{}, model {}", info.spec.kind_name(), i.model),
    };
    let detail = format!("job {} for node {} (seq {}, {what})", info.job_id, info.node_id, info.seq);
    st.audit("operator", "job.submitted", &detail).await;
    Ok((StatusCode::CREATED, Json(info)))
}

/// `expires_in_secs` of a submission or trigger, defaulted and bounded.
pub(super) fn check_expiry(expires_in_secs: Option<u64>) -> ApiResult<u64> {
    let expiry = expires_in_secs.unwrap_or(DEFAULT_JOB_EXPIRY_SECS);
    if expiry == 0 || expiry > MAX_JOB_EXPIRY_SECS {
        return Err(ApiError::bad_request(
            "bad_expiry",
            format!("expires_in_secs must be 1..={MAX_JOB_EXPIRY_SECS}"),
        ));
    }
    Ok(expiry)
}

/// The one way a job comes to exist, whoever asks (an operator's submission or a trigger):
/// signed with the org key, given the node's next sequence number under the submit lock,
/// stored, and the node's held poll woken. With a `job_id`, nothing happens when that job
/// exists already (`None`), which makes a caller with a deterministic id idempotent.
pub(super) async fn create_job(
    st: &AppState,
    node: &NodeInfo,
    spec: JobSpec,
    expiry_secs: u64,
    job_id: Option<String>,
) -> ApiResult<Option<JobInfo>> {
    let org = st.store.get_org(&node.org_id).await?.ok_or_else(|| {
        ApiError::internal(
            "org_missing",
            format!("organisation {} of node {} is gone", node.org_id, node.node_id),
        )
    })?;
    let key = signing::signing_key(&org.org.id, &org.signing_secret_hex)
        .map_err(|e| ApiError::internal("bad_org_key", e.to_string()))?;
    let info = {
        let _ordered = st.submit_lock.lock().await;
        if let Some(id) = &job_id
            && st.store.get_job(id).await?.is_some()
        {
            return Ok(None);
        }
        let now = st.clock.now_ms();
        let seq = st.store.next_job_seq(&node.node_id).await?;
        let envelope = JobEnvelope {
            job_id: job_id.unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()),
            attempt: 1,
            org_id: org.org.id.clone(),
            node_id: node.node_id.clone(),
            seq,
            issued_unix_ms: now,
            expires_unix_ms: now.saturating_add(expiry_secs.saturating_mul(1000)),
            spec,
        };
        let signed = signing::sign_envelope(&key, &envelope)
            .map_err(|e| ApiError::internal("signing_failed", e.to_string()))?;
        let info = JobInfo {
            job_id: envelope.job_id,
            attempt: envelope.attempt,
            org_id: envelope.org_id,
            node_id: envelope.node_id,
            seq,
            state: JobState::Queued,
            spec: envelope.spec,
            submitted_unix_ms: now,
            accepted_unix_ms: None,
            result: None,
        };
        match st.store.insert_job(JobRecord { info: info.clone(), envelope: signed }).await {
            Ok(()) => {}
            Err(StoreError::AlreadyExists(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        info
    };
    st.wakers.wake(&info.node_id);
    Ok(Some(info))
}

/// Most entries of `inputs` and of `egress_bodies`.
pub const MAX_SPEC_KEYS: usize = 64;
/// Longest object key (bytes), as S3 allows.
pub const MAX_KEY_BYTES: usize = 1024;

/// Refuse what the node would refuse anyway, so the operator hears about it at once.
pub(super) fn check_job_spec(spec: &JobSpec) -> ApiResult<()> {
    match spec {
        JobSpec::Container(c) => check_spec(c),
        JobSpec::Inference(i) => check_inference_spec(i),
    }
}

fn check_inference_spec(spec: &InferenceSpec) -> ApiResult<()> {
    spec.check().map_err(|why| ApiError::bad_request("bad_inference_spec", why))?;
    for (field, key) in spec
        .input_keys()
        .map(|k| ("input key", k))
        .chain(spec.output_prefix.iter().map(|p| ("output_prefix", p)))
    {
        check_object_key(key)
            .map_err(|why| ApiError::bad_request("bad_object_key", format!("{field} {key:?} {why}")))?;
    }
    Ok(())
}

/// The checks of a container spec (also those a trigger's job template must pass).
pub(super) fn check_spec(spec: &ContainerSpec) -> ApiResult<()> {
    let digest = spec.image.strip_prefix("sha256:").unwrap_or("");
    if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::bad_request(
            "bad_image",
            format!("image {:?} must be an image id `sha256:<64 hex>`; nodes never pull by name", spec.image),
        ));
    }
    if spec.timeout_secs == 0 {
        return Err(ApiError::bad_request("bad_timeout", "timeout_secs must be at least 1"));
    }
    let r = &spec.resources;
    if r.memory_mb < 6 {
        return Err(ApiError::bad_request("bad_resources", "resources.memory_mb must be at least 6"));
    }
    if r.cpu_millis == 0 || r.pids == 0 {
        return Err(ApiError::bad_request(
            "bad_resources",
            "resources.cpu_millis and resources.pids must be at least 1",
        ));
    }
    if let Some(label) = spec.labels.keys().find(|k| k.starts_with("outpost.")) {
        return Err(ApiError::bad_request(
            "reserved_label",
            format!("label {label:?} is reserved for the agent"),
        ));
    }
    for (field, keys) in [("inputs", &spec.inputs), ("egress_bodies", &spec.egress_bodies)] {
        if keys.len() > MAX_SPEC_KEYS {
            return Err(ApiError::bad_request(
                "bad_object_key",
                format!("{field} has {} entries; at most {MAX_SPEC_KEYS}", keys.len()),
            ));
        }
        for key in keys {
            check_object_key(key).map_err(|why| {
                ApiError::bad_request("bad_object_key", format!("{field} entry {key:?} {why}"))
            })?;
        }
    }
    if let Some(prefix) = &spec.output_prefix {
        check_object_key(prefix).map_err(|why| {
            ApiError::bad_request("bad_object_key", format!("output_prefix {prefix:?} {why}"))
        })?;
    }
    Ok(())
}

/// An object key (or a prefix ending in `/`) of the node's local store, as a job may name it:
/// the node maps keys to paths under `/in` and `/out`, so nothing may climb out of them.
/// The error completes "key … ".
pub fn check_object_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("is empty".into());
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(format!("is {} bytes long; at most {MAX_KEY_BYTES}", key.len()));
    }
    if key.starts_with('/') {
        return Err("starts with '/'; keys are relative to the store's bucket".into());
    }
    if key.chars().any(char::is_control) {
        return Err("holds a NUL or control character".into());
    }
    let body = key.strip_suffix('/').unwrap_or(key);
    if body.split('/').any(|seg| seg.is_empty() || seg == "." || seg == "..") {
        return Err("has an empty, '.' or '..' path segment".into());
    }
    Ok(())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct JobQuery {
    /// Only jobs of this node.
    pub node_id: Option<String>,
    /// Only jobs in this state.
    pub state: Option<JobState>,
    /// At most this many, newest first (default 100, at most 1000).
    pub limit: Option<usize>,
}

#[utoipa::path(get, path = paths::JOBS, tag = "jobs", params(JobQuery),
    responses((status = 200, body = JobList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn list_jobs(
    _: OperatorAuth,
    State(st): State<Shared>,
    Params(q): Params<JobQuery>,
) -> ApiResult<Json<JobList>> {
    let filter = JobFilter {
        node_id: q.node_id,
        state: q.state,
        limit: q.limit.unwrap_or(DEFAULT_LIST).min(MAX_LIST),
    };
    Ok(Json(JobList { jobs: st.store.list_jobs(filter).await? }))
}

#[utoipa::path(get, path = paths::JOB, tag = "jobs", params(("job_id" = String, Path, description = "job id")),
    description = "One job with its result once the node has reported it.",
    responses((status = 200, body = JobInfo), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn get_job(
    _: OperatorAuth,
    State(st): State<Shared>,
    Path(job_id): Path<String>,
) -> ApiResult<Json<JobInfo>> {
    let job = st
        .store
        .get_job(&job_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("job {job_id} does not exist")))?;
    Ok(Json(job.info))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_keys_cannot_climb_out_or_hide_control_characters() {
        for ok in ["a", "in/photo.jpg", "results/", "a/b/c.txt", "x..y/z"] {
            assert_eq!(check_object_key(ok), Ok(()), "{ok}");
        }
        for bad in ["", "/abs", "a//b", "a/./b", "../x", "a/..", "a/../", "nul\0x", "tab\tx", "//"] {
            assert!(check_object_key(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_object_key(&"k".repeat(MAX_KEY_BYTES)).is_ok());
        assert!(check_object_key(&"k".repeat(MAX_KEY_BYTES + 1)).is_err());
    }
}
