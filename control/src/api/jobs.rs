//! Operator job routes: submit (sign with the org key, queue, wake the node's poll), list, get.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use outpost_protocol::{
    ContainerSpec, ErrorBody, JobEnvelope, JobInfo, JobList, JobState, SubmitJobRequest, paths,
};
use serde::Deserialize;

use super::{ApiError, ApiResult, Body, OperatorAuth, Params, Shared};
use crate::signing;
use crate::store::{JobFilter, JobRecord};

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
    check_spec(&req.spec)?;
    let expiry = req.expires_in_secs.unwrap_or(DEFAULT_JOB_EXPIRY_SECS);
    if expiry == 0 || expiry > MAX_JOB_EXPIRY_SECS {
        return Err(ApiError::bad_request(
            "bad_expiry",
            format!("expires_in_secs must be 1..={MAX_JOB_EXPIRY_SECS}"),
        ));
    }
    let node = st.store.get_node(&req.node_id).await?.ok_or_else(|| {
        ApiError::not_found(format!("node {} is not enrolled; see `node list`", req.node_id))
    })?;
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
        let now = st.clock.now_ms();
        let seq = st.store.next_job_seq(&node.node_id).await?;
        let envelope = JobEnvelope {
            job_id: uuid::Uuid::new_v4().simple().to_string(),
            attempt: 1,
            org_id: org.org.id.clone(),
            node_id: node.node_id.clone(),
            seq,
            issued_unix_ms: now,
            expires_unix_ms: now.saturating_add(expiry.saturating_mul(1000)),
            spec: req.spec,
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
        st.store.insert_job(JobRecord { info: info.clone(), envelope: signed }).await?;
        info
    };
    st.wakers.wake(&info.node_id);
    let detail = format!(
        "job {} for node {} (seq {}, image {})",
        info.job_id, info.node_id, info.seq, info.spec.image
    );
    st.audit("operator", "job.submitted", &detail).await;
    Ok((StatusCode::CREATED, Json(info)))
}

/// Refuse what the node would refuse anyway, so the operator hears about it at once.
fn check_spec(spec: &ContainerSpec) -> ApiResult<()> {
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
