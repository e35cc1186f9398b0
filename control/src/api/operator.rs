//! Operator routes (admin bearer token): organisations, enrollment tokens, jobs, nodes, audit.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use outpost_protocol::{
    AuditList, ContainerSpec, CreateOrgRequest, CreateTokenRequest, EnrollmentToken, ErrorBody, Health,
    JobEnvelope, JobInfo, JobList, JobState, NodeInfo, NodeList, Org, SubmitJobRequest,
};
use serde::Deserialize;

use super::{ApiError, ApiResult, Body, OperatorAuth, Shared};
use crate::data_dir::random_hex;
use crate::signing;
use crate::store::{JobFilter, JobRecord, OrgRecord, TokenRecord};

const DEFAULT_TOKEN_TTL_SECS: u64 = 3600;
const MAX_TOKEN_TTL_SECS: u64 = 7 * 24 * 3600;
const DEFAULT_JOB_EXPIRY_SECS: u64 = 24 * 3600;
const MAX_JOB_EXPIRY_SECS: u64 = 30 * 24 * 3600;
const MAX_LIST: usize = 1000;

#[utoipa::path(get, path = "/v1/health", responses((status = 200, body = Health)))]
pub async fn health() -> Json<Health> {
    Json(Health { status: "ok".into(), version: env!("CARGO_PKG_VERSION").into() })
}

#[utoipa::path(post, path = "/v1/orgs", request_body = CreateOrgRequest,
    responses((status = 201, body = Org), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn create_org(
    _: OperatorAuth,
    State(st): State<Shared>,
    Body(req): Body<CreateOrgRequest>,
) -> ApiResult<(StatusCode, Json<Org>)> {
    let name = req.name.trim();
    if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request("bad_name", "an organisation name is 1-128 printable characters"));
    }
    let (secret, signing_key) = signing::generate_org_key();
    let org = Org {
        id: format!("org-{}", uuid::Uuid::new_v4().simple()),
        name: name.into(),
        signing_key,
        created_unix_ms: st.clock.now_ms(),
    };
    st.store.insert_org(OrgRecord { org: org.clone(), signing_secret_hex: secret }).await?;
    st.audit("operator", "org.created", &format!("{} ({})", org.id, org.name)).await;
    Ok((StatusCode::CREATED, Json(org)))
}

#[utoipa::path(get, path = "/v1/orgs", responses((status = 200, body = Vec<Org>)), security(("admin_token" = [])))]
pub async fn list_orgs(_: OperatorAuth, State(st): State<Shared>) -> ApiResult<Json<Vec<Org>>> {
    Ok(Json(st.store.list_orgs().await?))
}

#[utoipa::path(post, path = "/v1/orgs/{org_id}/tokens", request_body = CreateTokenRequest,
    params(("org_id" = String, Path, description = "organisation id")),
    responses((status = 201, body = EnrollmentToken), (status = 404, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn create_token(
    _: OperatorAuth,
    State(st): State<Shared>,
    Path(org_id): Path<String>,
    Body(req): Body<CreateTokenRequest>,
) -> ApiResult<(StatusCode, Json<EnrollmentToken>)> {
    if st.store.get_org(&org_id).await?.is_none() {
        return Err(ApiError::not_found(format!("organisation {org_id} does not exist")));
    }
    let ttl = req.ttl_secs.unwrap_or(DEFAULT_TOKEN_TTL_SECS);
    if ttl == 0 || ttl > MAX_TOKEN_TTL_SECS {
        return Err(ApiError::bad_request("bad_ttl", format!("ttl_secs must be 1..={MAX_TOKEN_TTL_SECS}")));
    }
    let token = EnrollmentToken {
        token: format!("opt_{}", random_hex(24)),
        org_id: org_id.clone(),
        expires_unix_ms: st.clock.now_ms() + ttl * 1000,
    };
    st.store.insert_token(TokenRecord::for_token(&token)).await?;
    st.audit("operator", "token.created", &format!("org {org_id}, expires in {ttl} s")).await;
    Ok((StatusCode::CREATED, Json(token)))
}

#[utoipa::path(post, path = "/v1/jobs", request_body = SubmitJobRequest,
    responses((status = 201, body = JobInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn submit_job(
    _: OperatorAuth,
    State(st): State<Shared>,
    Body(req): Body<SubmitJobRequest>,
) -> ApiResult<(StatusCode, Json<JobInfo>)> {
    check_spec(&req.spec)?;
    let node = st
        .store
        .get_node(&req.node_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("node {} is not enrolled", req.node_id)))?;
    let org = st.store.get_org(&node.org_id).await?.ok_or_else(|| {
        ApiError::not_found(format!("organisation {} of node {} is gone", node.org_id, node.node_id))
    })?;
    let expiry = req.expires_in_secs.unwrap_or(DEFAULT_JOB_EXPIRY_SECS);
    if expiry == 0 || expiry > MAX_JOB_EXPIRY_SECS {
        return Err(ApiError::bad_request(
            "bad_expiry",
            format!("expires_in_secs must be 1..={MAX_JOB_EXPIRY_SECS}"),
        ));
    }
    let key = signing::signing_key(&org.org.id, &org.signing_secret_hex)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "bad_org_key", e.to_string()))?;
    let now = st.clock.now_ms();
    let seq = st.store.next_job_seq(&node.node_id).await?;
    let envelope = JobEnvelope {
        job_id: uuid::Uuid::new_v4().simple().to_string(),
        attempt: 1,
        org_id: org.org.id.clone(),
        node_id: node.node_id.clone(),
        seq,
        issued_unix_ms: now,
        expires_unix_ms: now + expiry * 1000,
        spec: req.spec,
    };
    let signed = signing::sign_envelope(&key, &envelope)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "signing_failed", e.to_string()))?;
    let info = JobInfo {
        job_id: envelope.job_id.clone(),
        attempt: envelope.attempt,
        org_id: envelope.org_id.clone(),
        node_id: envelope.node_id.clone(),
        seq,
        state: JobState::Queued,
        spec: envelope.spec,
        submitted_unix_ms: now,
        accepted_unix_ms: None,
        result: None,
    };
    st.store.insert_job(JobRecord { info: info.clone(), envelope: signed }).await?;
    st.wakers.wake(&info.node_id);
    st.audit(
        "operator",
        "job.submitted",
        &format!("job {} for node {} (seq {seq})", info.job_id, info.node_id),
    )
    .await;
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

#[utoipa::path(get, path = "/v1/jobs", params(JobQuery), responses((status = 200, body = JobList)),
    security(("admin_token" = [])))]
pub async fn list_jobs(
    _: OperatorAuth,
    State(st): State<Shared>,
    Query(q): Query<JobQuery>,
) -> ApiResult<Json<JobList>> {
    let filter =
        JobFilter { node_id: q.node_id, state: q.state, limit: q.limit.unwrap_or(100).min(MAX_LIST) };
    Ok(Json(JobList { jobs: st.store.list_jobs(filter).await? }))
}

#[utoipa::path(get, path = "/v1/jobs/{job_id}", params(("job_id" = String, Path, description = "job id")),
    responses((status = 200, body = JobInfo), (status = 404, body = ErrorBody)), security(("admin_token" = [])))]
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

#[utoipa::path(get, path = "/v1/nodes", responses((status = 200, body = NodeList)), security(("admin_token" = [])))]
pub async fn list_nodes(_: OperatorAuth, State(st): State<Shared>) -> ApiResult<Json<NodeList>> {
    Ok(Json(NodeList { nodes: st.store.list_nodes().await? }))
}

#[utoipa::path(get, path = "/v1/nodes/{node_id}", params(("node_id" = String, Path, description = "node id")),
    responses((status = 200, body = NodeInfo), (status = 404, body = ErrorBody)), security(("admin_token" = [])))]
pub async fn get_node(
    _: OperatorAuth,
    State(st): State<Shared>,
    Path(node_id): Path<String>,
) -> ApiResult<Json<NodeInfo>> {
    let node = st
        .store
        .get_node(&node_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("node {node_id} is not enrolled")))?;
    Ok(Json(node))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// The most recent entries, oldest first (default 1000).
    pub limit: Option<usize>,
}

#[utoipa::path(get, path = "/v1/audit", params(AuditQuery), responses((status = 200, body = AuditList)),
    security(("admin_token" = [])))]
pub async fn list_audit(
    _: OperatorAuth,
    State(st): State<Shared>,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<AuditList>> {
    Ok(Json(AuditList { entries: st.store.list_audit(q.limit.unwrap_or(1000).min(100_000)).await? }))
}
