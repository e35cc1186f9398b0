//! Offline enrollment (`POST /v1/orgs/{org_id}/enroll-offline`): the operator brings a node's
//! request file; the control plane enrolls it exactly as the online path does (the same
//! certificate, store record and audit), spending a one-time token derived from the request's
//! id, so one request enrolls one node once; and answers with the enrollment file, signed by the
//! organisation's key.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use outpost_protocol::{
    ErrorBody, OFFLINE_FORMAT, OfflineEnrollParams, OfflineEnrollment, SignedEnvelope, paths,
};

use super::jobs::sign;
use super::{ApiError, ApiResult, Body, Caller, Shared};
use crate::pki::sha256_hex;
use crate::store::TokenRecord;

/// How long a request's one-time token lives: only for this call.
const TOKEN_TTL_MS: u64 = 60_000;

#[utoipa::path(post, path = paths::ORG_ENROLL_OFFLINE, tag = "nodes", request_body = OfflineEnrollParams,
    params(("org_id" = String, Path, description = "organisation id")),
    description = "Enroll a node that cannot reach the control plane, from its request file (`outpost enroll \
                   --offline`). Each request enrolls once. The answer is the enrollment file (a signed \
                   envelope of an OfflineEnrollment) for `outpost enroll --from`.",
    responses((status = 201, body = SignedEnvelope), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "this request was used already", body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn enroll_offline(
    caller: Caller,
    State(st): State<Shared>,
    Path(org_id): Path<String>,
    Body(p): Body<OfflineEnrollParams>,
) -> ApiResult<(StatusCode, Json<SignedEnvelope>)> {
    let missing = || ApiError::not_found(format!("organisation {org_id} does not exist; see `org list`"));
    caller.may(&org_id, outpost_protocol::Role::Admin, missing)?;
    let org = st.store.get_org(&org_id).await?.ok_or_else(missing)?;
    let req = &p.request;
    if req.format != OFFLINE_FORMAT {
        return Err(ApiError::bad_request(
            "bad_request_file",
            format!("request format {} (this control plane reads {OFFLINE_FORMAT})", req.format),
        ));
    }
    if req.request_id.len() < 16
        || req.request_id.len() > 64
        || !req.request_id.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(ApiError::bad_request("bad_request_file", "request_id must be 16-64 letters and digits"));
    }
    // The request's own one-time token: a second use of the request finds it spent.
    let token = format!("offline-{}", req.request_id);
    if let Some(hb) = &req.heartbeat {
        outpost_protocol::selector::check_labels(&hb.labels).map_err(|why| {
            ApiError::bad_request("bad_labels", format!("the node's [node] labels are not valid: {why}"))
        })?;
    }
    let token_sha = sha256_hex(token.as_bytes());
    if st.store.get_token(&token_sha).await?.is_some() {
        st.audit(
            &caller.actor,
            Some(&org_id),
            "enroll.rejected",
            &format!("offline request {} used again", req.request_id),
        )
        .await;
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "request_used",
            "this enrollment request was used already; make a new one on the node (`outpost enroll --offline`)",
        ));
    }
    let now = st.clock.now_ms();
    st.store
        .insert_token(TokenRecord {
            token_sha256: token_sha.clone(),
            org_id: org_id.clone(),
            expires_unix_ms: now + TOKEN_TTL_MS,
            used_unix_ms: None,
            used_by_node: None,
        })
        .await?;
    // The node's facts stand for its first heartbeat (never seen online: it stays offline).
    let facts = req.heartbeat.clone();
    let enrollment = super::enroll::enroll_core(
        &st,
        &token_sha,
        &req.csr_pem,
        &req.hostname,
        &req.agent_version,
        facts,
        None,
    )
    .await?;
    let offline = OfflineEnrollment {
        format: OFFLINE_FORMAT,
        request_id: req.request_id.clone(),
        enrollment,
        control_url: p.control_url.clone(),
        issued_unix_ms: now,
    };
    let signed = sign(&org, st.clock.now_ms(), &offline)?;
    Ok((StatusCode::CREATED, Json(signed)))
}
