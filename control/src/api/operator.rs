//! Operator routes (admin bearer token) other than jobs: organisations, enrollment tokens,
//! nodes and the audit trail; plus the unauthenticated health check.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use outpost_protocol::{
    AuditList, CreateOrgRequest, CreateTokenRequest, EnrollmentToken, ErrorBody, Health, JobState,
    LabelNodeRequest, NodeInfo, NodeList, Org, OrgSettings, PutOrgSettings, Role, Selector, paths, selector,
};
use serde::Deserialize;

use super::access::{node_for, org_exists};
use super::{ApiError, ApiResult, Body, Caller, Params, Shared, placement};
use crate::data_dir::random_hex;
use crate::signing;
use crate::store::{JobFilter, OrgRecord, TokenRecord};

const DEFAULT_TOKEN_TTL_SECS: u64 = 3600;
pub(crate) const MAX_TOKEN_TTL_SECS: u64 = 7 * 24 * 3600;
const DEFAULT_AUDIT_LIST: usize = 1000;
const MAX_AUDIT_LIST: usize = 100_000;

#[utoipa::path(get, path = paths::HEALTH, tag = "meta",
    description = "Ready to serve: 200 when the state store answers, 503 (store_unavailable, with the reason) when it does not (a shared database that is down or cut off).",
    responses((status = 200, body = Health), (status = 503, body = ErrorBody)))]
pub async fn health(State(st): State<Shared>) -> ApiResult<Json<Health>> {
    st.store.ping().await?;
    Ok(Json(Health { status: "ok".into(), version: env!("CARGO_PKG_VERSION").into() }))
}

#[utoipa::path(post, path = paths::ORGS, tag = "orgs", request_body = CreateOrgRequest,
    description = "Create an organisation with a fresh ed25519 job-signing key.",
    responses((status = 201, body = Org), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn create_org(
    caller: Caller,
    State(st): State<Shared>,
    Body(req): Body<CreateOrgRequest>,
) -> ApiResult<(StatusCode, Json<Org>)> {
    caller.owner_only("creating an organisation")?;
    // As the document's pattern and maxLength say: characters, not bytes, none a control
    // character, not all spaces; spaces around it are trimmed.
    let name = req.name.trim_matches(' ');
    if name.is_empty() || req.name.chars().count() > 128 || req.name.chars().any(char::is_control) {
        return Err(ApiError::bad_request("bad_name", "an organisation name is 1-128 printable characters"));
    }
    let (secret, signing_key) = signing::generate_org_key();
    let org = Org {
        id: format!("org-{}", uuid::Uuid::new_v4().simple()),
        name: name.into(),
        signing_key,
        created_unix_ms: st.clock.now_ms(),
    };
    st.store
        .insert_org(OrgRecord {
            org: org.clone(),
            signing_secret_hex: secret,
            settings: Default::default(),
            keys: Default::default(),
        })
        .await?;
    let detail = format!("{} ({}), signing key {}", org.id, org.name, org.signing_key.key_id);
    st.audit(&caller.actor, Some(&org.id), "org.created", &detail).await;
    Ok((StatusCode::CREATED, Json(org)))
}

#[utoipa::path(get, path = paths::ORGS, tag = "orgs",
    responses((status = 200, body = Vec<Org>), (status = 401, body = ErrorBody)), security(("admin_token" = [])))]
pub async fn list_orgs(caller: Caller, State(st): State<Shared>) -> ApiResult<Json<Vec<Org>>> {
    let mut orgs = st.store.list_orgs().await?;
    orgs.retain(|o| caller.sees(&o.id));
    Ok(Json(orgs))
}

#[utoipa::path(get, path = paths::ORG_SETTINGS, tag = "orgs",
    description = "The organisation's settings: features turned off for all its nodes and the default \
                   profile of nodes whose configuration names none.",
    params(("org_id" = String, Path, description = "organisation id")),
    responses((status = 200, body = OrgSettings), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn org_settings(
    caller: Caller,
    State(st): State<Shared>,
    Path(org_id): Path<String>,
) -> ApiResult<Json<OrgSettings>> {
    org_exists(&st, &caller, &org_id, Role::Viewer).await?;
    let rec = st
        .store
        .get_org(&org_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("organisation {org_id}")))?;
    Ok(Json(rec.settings))
}

#[utoipa::path(put, path = paths::ORG_SETTINGS, tag = "orgs", request_body = PutOrgSettings,
    description = "Replace the organisation's settings (admin role). Nodes hear of them in their next poll \
                   answer; a feature turned off is refused at once by the control plane and by each node; a \
                   new default profile takes effect at a node's next start.",
    params(("org_id" = String, Path, description = "organisation id")),
    responses((status = 200, body = OrgSettings), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "the settings changed since the revision given", body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn put_org_settings(
    caller: Caller,
    State(st): State<Shared>,
    Path(org_id): Path<String>,
    Body(req): Body<PutOrgSettings>,
) -> ApiResult<Json<OrgSettings>> {
    org_exists(&st, &caller, &org_id, Role::Admin).await?;
    let rec = st
        .store
        .get_org(&org_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("organisation {org_id}")))?;
    let held = rec.settings.revision;
    if req.revision.is_some_and(|r| r != held) {
        return Err(settings_conflict(held));
    }
    let new = OrgSettings {
        revision: held + 1,
        default_profile: req.default_profile,
        features_off: req.features_off,
        updated_unix_ms: st.clock.now_ms(),
    }
    .normalise()
    .map_err(|why| ApiError::bad_request("bad_settings", why))?;
    if !st.store.put_org_settings(&org_id, new.clone()).await? {
        return Err(settings_conflict(held));
    }
    st.audit(&caller.actor, Some(&org_id), "org.settings", &new.summary()).await;
    Ok(Json(new))
}

fn settings_conflict(held: u64) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "settings_changed",
        format!("the settings changed meanwhile (now revision {held}); read them again and retry"),
    )
}

#[utoipa::path(post, path = paths::ORG_TOKENS, tag = "orgs", request_body = CreateTokenRequest,
    description = "Create a one-time enrollment token for the organisation. Only its SHA-256 is stored: \
                   this answer is the only place the token appears.",
    params(("org_id" = String, Path, description = "organisation id")),
    responses((status = 201, body = EnrollmentToken), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn create_token(
    caller: Caller,
    State(st): State<Shared>,
    Path(org_id): Path<String>,
    Body(req): Body<CreateTokenRequest>,
) -> ApiResult<(StatusCode, Json<EnrollmentToken>)> {
    org_exists(&st, &caller, &org_id, Role::Admin).await?;
    let ttl = req.ttl_secs.unwrap_or(DEFAULT_TOKEN_TTL_SECS);
    if ttl == 0 || ttl > MAX_TOKEN_TTL_SECS {
        return Err(ApiError::bad_request("bad_ttl", format!("ttl_secs must be 1..={MAX_TOKEN_TTL_SECS}")));
    }
    let token = EnrollmentToken {
        token: format!("opt_{}", random_hex(24)),
        org_id: org_id.clone(),
        expires_unix_ms: st.clock.now_ms() + ttl * 1000,
    };
    let record = TokenRecord::for_token(&token);
    let detail = format!(
        "org {org_id}, sha256 {}…, expires in {ttl} s",
        record.token_sha256.get(..12).unwrap_or_default()
    );
    st.store.insert_token(record).await?;
    st.audit(&caller.actor, Some(&org_id), "token.created", &detail).await;
    Ok((StatusCode::CREATED, Json(token)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct NodeQuery {
    /// Only nodes whose effective labels this selector (Kubernetes grammar) matches.
    pub selector: Option<String>,
    /// Only nodes of this organisation.
    pub org_id: Option<String>,
    /// A page of at most this many nodes, in node id order (1 to 10,000); the answer's
    /// `next_after` is set when more follow. Without it, every matching node.
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<u32>,
    /// Only nodes whose id sorts after this one: the `next_after` of the page before.
    #[param(min_length = 1, max_length = 256)]
    pub after: Option<String>,
}

/// The largest page of `GET /v1/nodes`.
pub const MAX_NODE_PAGE: u32 = 10_000;

#[utoipa::path(get, path = paths::NODES, tag = "nodes", params(NodeQuery),
    description = "Enrolled nodes with their effective labels (the node's own, overridden by operator labels) \
                   and whether their last heartbeat is within the lease.",
    responses((status = 200, body = NodeList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn list_nodes(
    caller: Caller,
    State(st): State<Shared>,
    Params(q): Params<NodeQuery>,
) -> ApiResult<Json<NodeList>> {
    let selector = q
        .selector
        .as_deref()
        .map(Selector::parse)
        .transpose()
        .map_err(|e| ApiError::bad_request("bad_selector", e.to_string()))?;
    if let Some(limit) = q.limit
        && !(1..=MAX_NODE_PAGE).contains(&limit)
    {
        return Err(ApiError::bad_request(
            "bad_limit",
            format!("limit must be 1 to {MAX_NODE_PAGE}, got {limit}"),
        ));
    }
    if q.after.as_deref().is_some_and(|a| a.is_empty() || a.chars().count() > 256) {
        return Err(ApiError::bad_request("bad_after", "after must be a node id of 1 to 256 characters"));
    }
    // The organisation's own index when the caller sees one organisation only; the filter
    // reads each other record only as far as its organisation and labels.
    let org = q.org_id.clone().or_else(|| caller.org_filter().map(str::to_owned));
    let own = caller.org_filter().map(str::to_owned);
    // A `key=value` term lets a store with a label index read only the nodes that carry it.
    let label = selector.as_ref().and_then(|s| {
        s.requirements().iter().find_map(|r| match &r.op {
            outpost_protocol::selector::Op::Equals(v) => Some((r.key.clone(), v.clone())),
            _ => None,
        })
    });
    let keep: crate::store::NodeFilter = Box::new(move |org_id, labels| {
        own.as_deref().is_none_or(|o| o == org_id) && selector.as_ref().is_none_or(|s| s.matches(labels))
    });
    let want = q.limit.map_or(usize::MAX, |l| l as usize + 1);
    let mut found = st.store.find_nodes(org.as_deref(), q.after.as_deref(), label, keep, want).await?;
    let next_after = match q.limit {
        Some(limit) if found.len() > limit as usize => {
            found.truncate(limit as usize);
            found.last().map(|n| n.node_id.clone())
        }
        _ => None,
    };
    let nodes = found.into_iter().map(|n| placement::present(&st, n)).collect();
    Ok(Json(NodeList { nodes, next_after }))
}

#[utoipa::path(get, path = paths::NODE, tag = "nodes", params(("node_id" = String, Path, description = "node id")),
    description = "One node with its last heartbeat (inventory), last-seen time and effective labels.",
    responses((status = 200, body = NodeInfo), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn get_node(
    caller: Caller,
    State(st): State<Shared>,
    Path(node_id): Path<String>,
) -> ApiResult<Json<NodeInfo>> {
    let node = node_for(&st, &caller, &node_id, Role::Viewer).await?;
    Ok(Json(placement::present(&st, node)))
}

#[utoipa::path(post, path = paths::NODE_LABELS, tag = "nodes", request_body = LabelNodeRequest,
    params(("node_id" = String, Path, description = "node id")),
    description = "Set and remove operator labels of a node (they win over the node's own labels).",
    responses((status = 200, body = NodeInfo), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn label_node(
    caller: Caller,
    State(st): State<Shared>,
    Path(node_id): Path<String>,
    Body(req): Body<LabelNodeRequest>,
) -> ApiResult<Json<NodeInfo>> {
    selector::check_labels(&req.set).map_err(|why| ApiError::bad_request("bad_labels", why))?;
    for key in &req.remove {
        selector::check_label_key(key)
            .map_err(|why| ApiError::bad_request("bad_labels", format!("label key {why}")))?;
    }
    let mut node = node_for(&st, &caller, &node_id, Role::Operator).await?;
    node.operator_labels.extend(req.set.clone());
    req.remove.iter().for_each(|k| drop(node.operator_labels.remove(k)));
    if node.operator_labels.len() > selector::MAX_LABELS {
        return Err(ApiError::bad_request(
            "bad_labels",
            format!("a node carries at most {} operator labels; remove some first", selector::MAX_LABELS),
        ));
    }
    let node = st.store.update_node_labels(&node_id, req.set.clone(), req.remove.clone()).await?;
    let set = req.set.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
    let detail = format!("node {node_id}: set [{set}] removed [{}]", req.remove.join(","));
    st.audit(&caller.actor, Some(&node.org_id), "node.labelled", &detail).await;
    Ok(Json(placement::present(&st, node)))
}

#[utoipa::path(post, path = paths::NODE_REVOKE, tag = "nodes",
    params(("node_id" = String, Path, description = "node id")),
    description = "Revoke a node (admin): from now on its certificate is refused in the TLS handshake of every \
                   connection and by every node route, a poll it holds ends, its queued jobs placed on it by id \
                   are cancelled (jobs placed by selector move to another matching node), and nothing new is \
                   placed on it. Revoking a revoked node changes nothing. To bring the machine back, enroll it \
                   again with a new token (it gets a new node id).",
    responses((status = 200, body = NodeInfo), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn revoke_node(
    caller: Caller,
    State(st): State<Shared>,
    Path(node_id): Path<String>,
) -> ApiResult<Json<NodeInfo>> {
    let node = node_for(&st, &caller, &node_id, Role::Admin).await?;
    if node.revoked_unix_ms.is_some() {
        return Ok(Json(placement::present(&st, node)));
    }
    let now = st.clock.now_ms();
    // Refused from this moment: the TLS layer first, then the store (a restart reloads the set).
    st.revoked.insert_node(&node);
    let node = st.store.revoke_node(&node_id, now).await?;
    let queued = JobFilter {
        node_id: Some(node_id.clone()),
        state: Some(JobState::Queued),
        limit: usize::MAX,
        ..Default::default()
    };
    let mut cancelled = 0usize;
    for job in st.store.list_jobs(queued).await? {
        if job.placement == Some(outpost_protocol::Placement::Any) {
            continue; // the placement sweep moves it: its holder is no longer in the fleet
        }
        if st.store.cancel_job(&job.job_id, now).await? == crate::store::CancelOutcome::Cancelled {
            cancelled += 1;
        }
    }
    st.wake_everywhere(&node_id).await;
    st.fleet_changed.notify_one();
    let detail = format!(
        "node {node_id} (certificate {}): revoked; {cancelled} queued jobs cancelled",
        node.cert_sha256
    );
    st.audit(&caller.actor, Some(&node.org_id), "node.revoked", &detail).await;
    Ok(Json(placement::present(&st, node)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// The most recent entries, oldest first (default 1000; more than 100000 is taken as
    /// 100000).
    #[param(value_type = Option<u64>)]
    pub limit: Option<usize>,
}

#[utoipa::path(get, path = paths::AUDIT, tag = "audit", params(AuditQuery),
    description = "Enrollments (granted and refused), organisations, tokens, submissions, results and refusals.",
    responses((status = 200, body = AuditList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn list_audit(
    caller: Caller,
    State(st): State<Shared>,
    Params(q): Params<AuditQuery>,
) -> ApiResult<Json<AuditList>> {
    let limit = q.limit.unwrap_or(DEFAULT_AUDIT_LIST).min(MAX_AUDIT_LIST);
    Ok(Json(AuditList { entries: st.store.list_audit(caller.org_filter(), limit).await? }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct NodeAuditQuery {
    /// Entries after this seq (default 0: from the first).
    pub after: Option<u64>,
    /// At most this many (default 10000; more is taken as 10000, and 0 as 1).
    #[param(value_type = Option<u64>)]
    pub limit: Option<usize>,
}

/// Most entries of a node's audit log one page holds.
const MAX_NODE_AUDIT_PAGE: usize = 10_000;

#[utoipa::path(get, path = paths::NODE_AUDIT, tag = "audit",
    params(("node_id" = String, Path, description = "node id"), NodeAuditQuery),
    description = "The node's own hash-chained audit log, as far as its results bundles brought it; each entry \
                   was checked to follow the one before when it was stored.",
    responses((status = 200, body = outpost_protocol::NodeAuditList), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn node_audit(
    caller: Caller,
    State(st): State<Shared>,
    Path(node_id): Path<String>,
    Params(q): Params<NodeAuditQuery>,
) -> ApiResult<Json<outpost_protocol::NodeAuditList>> {
    node_for(&st, &caller, &node_id, Role::Viewer).await?;
    let limit = q.limit.unwrap_or(MAX_NODE_AUDIT_PAGE).clamp(1, MAX_NODE_AUDIT_PAGE);
    let entries = st.store.node_audit(&node_id, q.after.unwrap_or(0), limit).await?;
    Ok(Json(outpost_protocol::NodeAuditList { node_id, entries }))
}
