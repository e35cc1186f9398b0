//! Rotations: an organisation's job-signing key and the control plane's CA, each announced
//! through an overlap in which nodes trust both, and the node route that tells a node what to
//! trust now (`GET /v1/node/trust`).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use outpost_protocol::{
    ErrorBody, NodeInfo, NodeTrust, Role, RotateRequest, RotateResponse, capability, check_overlap, paths,
};

use super::{ApiError, ApiResult, Body, Caller, NodeAuth, Shared};
use crate::api::access::org_exists;
use crate::signing::{self, SigningError};
use crate::store::OrgRecord;

/// What a node of `org` should trust at `now_ms`, with its tag.
pub(super) fn node_trust(st: &super::AppState, org: &OrgRecord, now_ms: u64) -> NodeTrust {
    let (ca_pem, ca_rotation) = st.ca_trust(now_ms);
    let mut doc =
        NodeTrust { tag: String::new(), ca_pem, ca_rotation, org_keys: signing::trust_keys(org, now_ms) };
    let body = serde_json::to_vec(&doc).unwrap_or_default();
    doc.tag = crate::pki::sha256_hex(&body)[..16].to_owned();
    doc
}

#[utoipa::path(get, path = paths::NODE_TRUST, tag = "node",
    description = "What the node should trust now: the CAs whose client certificates the control plane accepts \
                   (the one that signs its server certificate first), a CA rotation under way (the new CA, signed \
                   by the old one, and when the server switches), and the organisation's signing keys as a chain \
                   of endorsements. A node adds only what a CA or key it already trusts has signed.",
    responses((status = 200, body = NodeTrust), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("node_certificate" = [])))]
pub async fn get_node_trust(
    NodeAuth(node): NodeAuth,
    State(st): State<Shared>,
) -> ApiResult<Json<NodeTrust>> {
    st.touch(&node.node_id);
    let org = super::jobs::org_of(&st, &node).await?;
    Ok(Json(node_trust(&st, &org, st.clock.now_ms())))
}

/// Nodes that cannot learn of a rotation: agents without the trust-rotation capability (and not
/// revoked), by id.
fn left_behind<'n>(nodes: impl Iterator<Item = &'n NodeInfo>) -> Vec<String> {
    nodes
        .filter(|n| n.revoked_unix_ms.is_none() && !n.announce().has(capability::TRUST_ROTATION))
        .map(|n| n.node_id.clone())
        .collect()
}

fn overlap_ms(req: &RotateRequest) -> ApiResult<u64> {
    let secs = req.overlap_secs.unwrap_or(outpost_protocol::DEFAULT_OVERLAP_SECS);
    check_overlap(secs).map_err(|e| ApiError::bad_request("bad_overlap", e)).map(|s| s * 1000)
}

fn refuse_left_behind(left: &[String], what: &str) -> ApiError {
    let shown: Vec<&str> = left.iter().take(10).map(String::as_str).collect();
    ApiError::new(
        StatusCode::CONFLICT,
        "nodes_left_behind",
        format!(
            "{} node(s) run an agent that cannot learn of a {what} ({}{}): they would stop working at the \
             switch and have to enroll again. Upgrade them first, or pass force to rotate anyway",
            left.len(),
            shown.join(", "),
            if left.len() > shown.len() { ", ..." } else { "" }
        ),
    )
}

#[utoipa::path(post, path = paths::ORG_KEY_ROTATE, tag = "orgs", request_body = RotateRequest,
    description = "Rotate the organisation's job-signing key (admin role). A new key is made and announced to \
                   the org's nodes, endorsed by the current one; the current key keeps signing through the \
                   overlap (default a week), then the new one signs everything handed to a node, including work \
                   submitted before. Refused (409) while a rotation is under way, and while nodes run agents that \
                   cannot learn of it unless `force` is set.",
    params(("org_id" = String, Path, description = "organisation id")),
    responses((status = 200, body = RotateResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "a rotation is under way, or nodes would be left behind", body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn rotate_org_key(
    caller: Caller,
    State(st): State<Shared>,
    Path(org_id): Path<String>,
    Body(req): Body<RotateRequest>,
) -> ApiResult<Json<RotateResponse>> {
    org_exists(&st, &caller, &org_id, Role::Admin).await?;
    let overlap = overlap_ms(&req)?;
    let nodes = st.store.list_nodes().await?;
    let left = left_behind(nodes.iter().filter(|n| n.org_id == org_id));
    if !left.is_empty() && !req.force {
        return Err(refuse_left_behind(&left, "signing-key rotation"));
    }
    let now = st.clock.now_ms();
    let before = st
        .store
        .get_org(&org_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("organisation {org_id}")))?;
    let before = super::jobs::settled(&st, before).await?;
    let after = signing::rotate(&before, now, overlap).map_err(|e| match e {
        SigningError::InProgress { .. } => {
            ApiError::new(StatusCode::CONFLICT, "rotation_in_progress", e.to_string())
        }
        e => ApiError::internal("bad_org_key", e.to_string()),
    })?;
    if !st.store.swap_org_keys(&before, &after).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "rotation_in_progress",
            format!("organisation {org_id}'s keys changed while rotating; look again and retry"),
        ));
    }
    let next = after.keys.next.as_ref().map(|n| n.key.clone()).ok_or_else(|| {
        ApiError::internal("rotation_lost", "the rotated record has no next key".to_owned())
    })?;
    let detail = format!(
        "signing key {} announced, endorsed by {}; it signs from {} (Unix ms); {} node(s) left behind{}",
        next.key.key_id,
        after.org.signing_key.key_id,
        next.signs_from_unix_ms,
        left.len(),
        if left.is_empty() { String::new() } else { format!(": {}", left.join(", ")) }
    );
    st.audit(&caller.actor, Some(&org_id), "org.key_rotated", &detail).await;
    // Held polls answer now with the new tag.
    for node in nodes.iter().filter(|n| n.org_id == org_id) {
        st.wake_everywhere(&node.node_id).await;
    }
    Ok(Json(RotateResponse {
        new_id: next.key.key_id,
        switch_unix_ms: next.signs_from_unix_ms,
        nodes_left_behind: left,
    }))
}

#[utoipa::path(post, path = paths::CA_ROTATE, tag = "orgs", request_body = RotateRequest,
    description = "Rotate the control plane's CA (admin token only). A new CA is made with a server certificate \
                   of its own and announced to every node, signed by the current CA; new node certificates come \
                   from it at once and nodes renew theirs. Until the switch (default a week) the server presents its \
                   certificate of the old CA and accepts client certificates of both; from the switch, only the new \
                   CA's. A node offline through the whole overlap must enroll again. Refused (409) while a \
                   rotation is under way, and while nodes run agents that cannot learn of it unless `force` is set.",
    responses((status = 200, body = RotateResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 409, description = "a rotation is under way, or nodes would be left behind", body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn rotate_ca(
    caller: Caller,
    State(st): State<Shared>,
    Body(req): Body<RotateRequest>,
) -> ApiResult<Json<RotateResponse>> {
    caller.owner_only("rotating the CA")?;
    let overlap = overlap_ms(&req)?;
    let nodes = st.store.list_nodes().await?;
    let left = left_behind(nodes.iter());
    if !left.is_empty() && !req.force {
        return Err(refuse_left_behind(&left, "CA rotation"));
    }
    let authority = std::sync::Arc::clone(&st.authority);
    let rotated = tokio::task::spawn_blocking(move || authority.rotate(overlap))
        .await
        .map_err(|e| ApiError::internal("rotation_failed", e.to_string()))?;
    let (fingerprint, switch) = rotated.map_err(|e| match e {
        crate::authority::RotateError::InProgress { .. } => {
            ApiError::new(StatusCode::CONFLICT, "rotation_in_progress", e.to_string())
        }
        e => ApiError::internal("rotation_failed", e.to_string()),
    })?;
    let detail = format!(
        "CA {fingerprint} announced, signed by the current CA; the server switches to it at {switch} (Unix ms); \
         {} node(s) left behind{}",
        left.len(),
        if left.is_empty() { String::new() } else { format!(": {}", left.join(", ")) }
    );
    st.audit(&caller.actor, None, "ca.rotated", &detail).await;
    for node in &nodes {
        st.wakers.wake(&node.node_id);
    }
    Ok(Json(RotateResponse { new_id: fingerprint, switch_unix_ms: switch, nodes_left_behind: left }))
}
