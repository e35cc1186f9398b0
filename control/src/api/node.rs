//! Node routes: enrollment (one-time token, no client certificate yet), then long-poll,
//! results and heartbeats, each behind the node's client certificate.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use outpost_protocol::{
    Ack, EnrollRequest, EnrollResponse, ErrorBody, Heartbeat, JobAssignment, NodeInfo, PollRequest,
    PollResponse, ResultReport,
};

use super::{ApiError, ApiResult, Body, MAX_POLL_WAIT, NodeAuth, Shared};
use crate::pki::sha256_hex;
use crate::store::{ResultOutcome, TokenRefusal};

/// Jobs handed out per poll when the node does not say.
const DEFAULT_MAX_JOBS: u32 = 16;
const MAX_JOBS_CAP: u32 = 256;

#[utoipa::path(post, path = "/v1/enroll", request_body = EnrollRequest,
    responses((status = 200, body = EnrollResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn enroll(
    State(st): State<Shared>,
    Body(req): Body<EnrollRequest>,
) -> ApiResult<Json<EnrollResponse>> {
    let hostname = req.hostname.trim();
    if hostname.is_empty() || hostname.len() > 253 || hostname.chars().any(char::is_control) {
        return Err(ApiError::bad_request("bad_hostname", "hostname must be 1-253 printable characters"));
    }
    let token_sha = sha256_hex(req.token.trim().as_bytes());
    let now = st.clock.now_ms();
    let refuse = |code: &str, message: &str| ApiError::new(StatusCode::UNAUTHORIZED, code, message);
    let Some(token) = st.store.get_token(&token_sha).await? else {
        st.audit("anonymous", "enroll.rejected", &format!("unknown token from {hostname:?}")).await;
        return Err(refuse(
            "token_unknown",
            "this enrollment token is not known; ask the operator for a new one",
        ));
    };
    let org = st
        .store
        .get_org(&token.org_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("organisation {} is gone", token.org_id)))?;
    let node_id = format!("node-{}", uuid::Uuid::new_v4().simple());
    let cert = st.ca.issue_client_cert(&req.csr_pem, &node_id).map_err(|e| {
        ApiError::bad_request("bad_csr", format!("the certificate signing request is unusable: {e}"))
    })?;
    let node = NodeInfo {
        node_id: node_id.clone(),
        org_id: org.org.id.clone(),
        hostname: hostname.into(),
        enrolled_unix_ms: now,
        cert_sha256: cert.sha256.clone(),
        last_seen_unix_ms: None,
        last_heartbeat: None,
    };
    match st.store.enroll_node(&token_sha, now, node).await? {
        Ok(()) => {}
        Err(refusal) => {
            let (code, message, why) = match refusal {
                TokenRefusal::Used => (
                    "token_used",
                    "this enrollment token was already used; tokens are one-time, ask the operator for a new one",
                    "token already used",
                ),
                TokenRefusal::Expired => (
                    "token_expired",
                    "this enrollment token has expired; ask the operator for a new one",
                    "token expired",
                ),
                TokenRefusal::Unknown => {
                    ("token_unknown", "this enrollment token is not known", "unknown token")
                }
            };
            st.audit(
                "anonymous",
                "enroll.rejected",
                &format!("{why} (org {}) from {hostname:?}", org.org.id),
            )
            .await;
            return Err(refuse(code, message));
        }
    }
    st.audit(
        &format!("node:{node_id}"),
        "node.enrolled",
        &format!("{node_id} ({hostname}) in org {}", org.org.id),
    )
    .await;
    Ok(Json(EnrollResponse {
        node_id,
        org_id: org.org.id.clone(),
        cert_pem: cert.pem,
        ca_pem: st.ca.cert_pem().to_owned(),
        org_signing_key: org.org.signing_key.clone(),
    }))
}

/// Acknowledge the listed jobs, then answer with the node's queued jobs at once, or hold the
/// request until one is submitted or the wait runs out.
#[utoipa::path(post, path = "/v1/node/poll", request_body = PollRequest,
    responses((status = 200, body = PollResponse), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("node_certificate" = [])))]
pub async fn poll(
    NodeAuth(node): NodeAuth,
    State(st): State<Shared>,
    Body(req): Body<PollRequest>,
) -> ApiResult<Json<PollResponse>> {
    if !req.ack_job_ids.is_empty() {
        st.store.ack_jobs(&node.node_id, req.ack_job_ids, st.clock.now_ms()).await?;
    }
    let max = req.max_jobs.unwrap_or(DEFAULT_MAX_JOBS).min(MAX_JOBS_CAP) as usize;
    let wait = Duration::from_secs(req.wait_secs.unwrap_or(25)).min(MAX_POLL_WAIT);
    if max == 0 {
        return Ok(Json(PollResponse { jobs: vec![] }));
    }
    let deadline = tokio::time::Instant::now() + wait;
    let waker = st.wakers.waker(&node.node_id);
    loop {
        // Register interest before looking, so a submit between the look and the wait wakes us.
        let notified = waker.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let queued = st.store.queued_jobs(&node.node_id, max).await?;
        if !queued.is_empty() {
            let jobs = queued
                .into_iter()
                .map(|j| JobAssignment {
                    job_id: j.info.job_id,
                    attempt: j.info.attempt,
                    envelope: j.envelope,
                })
                .collect();
            return Ok(Json(PollResponse { jobs }));
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(deadline) => return Ok(Json(PollResponse { jobs: vec![] })),
        }
    }
}

#[utoipa::path(post, path = "/v1/node/results", request_body = ResultReport,
    responses((status = 200, body = Ack), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)),
    security(("node_certificate" = [])))]
pub async fn report(
    NodeAuth(node): NodeAuth,
    State(st): State<Shared>,
    Body(report): Body<ResultReport>,
) -> ApiResult<Json<Ack>> {
    let key = ResultReport::key_for(&report.job_id, report.attempt);
    if report.idempotency_key != key {
        return Err(ApiError::bad_request("bad_idempotency_key", format!("idempotency_key must be {key:?}")));
    }
    let limit = outpost_protocol::MAX_OUTPUT_TAIL_BYTES;
    if report.stdout_tail.len() > limit || report.stderr_tail.len() > limit {
        return Err(ApiError::bad_request(
            "tail_too_long",
            format!("output tails are at most {limit} bytes each"),
        ));
    }
    let job_id = report.job_id.clone();
    let outcome = report.outcome;
    match st.store.store_result(&node.node_id, report).await? {
        ResultOutcome::Stored => {
            st.audit(&format!("node:{}", node.node_id), "job.result", &format!("job {job_id} {outcome:?}"))
                .await;
            Ok(Json(Ack { idempotency_key: key, duplicate: false }))
        }
        ResultOutcome::Duplicate => {
            tracing::debug!(job = %job_id, node = %node.node_id, "repeated result acknowledged, not stored again");
            Ok(Json(Ack { idempotency_key: key, duplicate: true }))
        }
        ResultOutcome::NotYours => {
            if st.store.get_job(&job_id).await?.is_some() {
                st.audit(
                    &format!("node:{}", node.node_id),
                    "result.rejected",
                    &format!("job {job_id} belongs to another node"),
                )
                .await;
                Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "not_your_job",
                    format!("job {job_id} was not sent to this node"),
                ))
            } else {
                Err(ApiError::not_found(format!("job {job_id} does not exist")))
            }
        }
    }
}

#[utoipa::path(post, path = "/v1/node/heartbeat", request_body = Heartbeat,
    responses((status = 200, body = Object), (status = 401, body = ErrorBody)), security(("node_certificate" = [])))]
pub async fn heartbeat(
    NodeAuth(node): NodeAuth,
    State(st): State<Shared>,
    Body(hb): Body<Heartbeat>,
) -> ApiResult<Json<serde_json::Value>> {
    st.store.record_heartbeat(&node.node_id, hb, st.clock.now_ms()).await?;
    Ok(Json(serde_json::json!({})))
}
