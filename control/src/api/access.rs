//! Who an operator call comes from and what it may do.
//!
//! Two kinds of bearer token reach the operator routes:
//! - the admin token in the data directory (`admin.token`): the global **owner**, for bootstrap
//!   and recovery; it may do everything, in every organisation;
//! - **API tokens** (`opk_<id>.<secret>`): named, scoped to one organisation and one role
//!   (`viewer` < `operator` < `admin`), with an expiry, revocable. Only the SHA-256 of the secret
//!   is stored, and it is compared in constant time.
//!
//! A token of one organisation never learns that another organisation's objects exist: they
//! answer 404, exactly as a missing object does. A token short of the role a call needs gets
//! 403 for objects of its own organisation.

use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use outpost_protocol::{
    ApiTokenInfo, ApiTokenList, CreateApiTokenRequest, CreatedApiToken, ErrorBody, NodeInfo, Role, paths,
};

use super::extract::{bearer, constant_time_eq, sha256};
use super::{ApiError, ApiResult, AppState, Body, Shared};
use crate::data_dir::random_hex;
use crate::store::{ApiTokenRecord, StoreError};

/// What API tokens start with; the rest is `<id>.<secret>`.
pub const API_TOKEN_PREFIX: &str = "opk_";
const DEFAULT_API_TOKEN_TTL_SECS: u64 = 90 * 24 * 3600;
pub(crate) const MAX_API_TOKEN_TTL_SECS: u64 = 400 * 24 * 3600;

/// Whose call this is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The admin token: everything, everywhere.
    Owner,
    /// An API token: `role` in `org_id`, nothing elsewhere.
    Org { org_id: String, role: Role },
}

/// An authenticated operator call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// As the audit trail records it: `owner`, or `token:<name>/<id>`.
    pub actor: String,
    pub scope: Scope,
    /// When the caller's own token expires (`None`: the admin token, which does not).
    pub expires_unix_ms: Option<u64>,
}

impl Caller {
    pub fn owner() -> Self {
        Self { actor: "owner".into(), scope: Scope::Owner, expires_unix_ms: None }
    }

    /// The organisation a listing is confined to; `None` for the owner (everything).
    pub fn org_filter(&self) -> Option<&str> {
        match &self.scope {
            Scope::Owner => None,
            Scope::Org { org_id, .. } => Some(org_id),
        }
    }

    /// Whether the caller sees objects of `org_id` at all.
    pub fn sees(&self, org_id: &str) -> bool {
        self.org_filter().is_none_or(|own| own == org_id)
    }

    /// The caller may do what needs `role` on an object of `org_id`. An object of an organisation
    /// the caller does not see answers `missing()` (the 404 a missing object answers); one it sees
    /// with too small a role answers 403.
    pub fn may(&self, org_id: &str, role: Role, missing: impl FnOnce() -> ApiError) -> ApiResult<()> {
        match &self.scope {
            Scope::Owner => Ok(()),
            Scope::Org { org_id: own, .. } if own != org_id => Err(missing()),
            Scope::Org { role: has, .. } if *has < role => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("this call needs the {role} role; {} has {has}", self.actor),
            )),
            Scope::Org { .. } => Ok(()),
        }
    }

    /// The caller has at least `role` in its organisation (the owner always has): for calls whose
    /// organisation is known only later, checked again against it with [`Caller::may`].
    pub fn at_least(&self, role: Role) -> ApiResult<()> {
        match &self.scope {
            Scope::Owner => Ok(()),
            Scope::Org { org_id, .. } => self.may(org_id, role, unreachable_missing),
        }
    }

    /// Only the admin token may do this (organisations are created and listed whole by it).
    pub fn owner_only(&self, what: &str) -> ApiResult<()> {
        match self.scope {
            Scope::Owner => Ok(()),
            Scope::Org { .. } => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "owner_only",
                format!("{what} needs the admin token (the data directory's admin.token), not an API token"),
            )),
        }
    }
}

fn unreachable_missing() -> ApiError {
    ApiError::internal("scope", "an organisation's own objects were taken for another's")
}

fn unauthenticated() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "operator calls need `Authorization: Bearer <token>`: an API token (`outpost-control api-token \
         create`) or the admin token in the data directory's admin.token",
    )
}

fn bad_token() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "bad_token",
        "the bearer token is neither the admin token (the data directory's admin.token) nor an API token \
         issued here",
    )
}

impl FromRequestParts<Shared> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &Shared) -> Result<Self, ApiError> {
        let given = bearer(parts).ok_or_else(unauthenticated)?;
        authenticate(st, given).await
    }
}

/// Who `given` (a bearer token) is, checked now: the admin token, or an API token that exists,
/// matches, is not revoked and has not expired.
pub async fn authenticate(st: &AppState, given: &str) -> Result<Caller, ApiError> {
    let Some(rest) = given.strip_prefix(API_TOKEN_PREFIX) else {
        if constant_time_eq(&sha256(given.as_bytes()), &st.admin_token_sha256) {
            return Ok(Caller::owner());
        }
        // Logged, not audited: an unauthenticated caller must not be able to grow the trail.
        tracing::warn!("operator call with a wrong bearer token refused");
        return Err(bad_token());
    };
    let (id, secret) = rest.split_once('.').ok_or_else(bad_token)?;
    let record = st.store.get_api_token(id).await?;
    // The digest is compared even for an unknown id, so that the answer takes as long.
    let stored = record.as_ref().and_then(|r| hex_digest(&r.secret_sha256)).unwrap_or([0xff; 32]);
    let matches = constant_time_eq(&sha256(secret.as_bytes()), &stored);
    let Some(ApiTokenRecord { info, .. }) = record.filter(|_| matches) else {
        tracing::warn!(token_id = id, "operator call with an unknown API token refused");
        return Err(bad_token());
    };
    if let Some(at) = info.revoked_unix_ms {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "token_revoked",
            format!(
                "API token {} ({}) was revoked at {at} (unix ms); ask an admin for a new one",
                info.name, info.id
            ),
        ));
    }
    if st.clock.now_ms() >= info.expires_unix_ms {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "token_expired",
            format!(
                "API token {} ({}) expired at {} (unix ms); ask an admin for a new one",
                info.name, info.id, info.expires_unix_ms
            ),
        ));
    }
    Ok(Caller {
        actor: format!("token:{}/{}", info.name, info.id),
        scope: Scope::Org { org_id: info.org_id, role: info.role },
        expires_unix_ms: Some(info.expires_unix_ms),
    })
}

fn hex_digest(text: &str) -> Option<[u8; 32]> {
    hex::decode(text).ok()?.try_into().ok()
}

fn check_token_name(name: &str) -> ApiResult<()> {
    let ok = (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request("bad_name", "an API token name is 1-64 of [A-Za-z0-9._-]"))
    }
}

pub async fn org_exists(st: &AppState, caller: &Caller, org_id: &str, role: Role) -> ApiResult<()> {
    let missing = || ApiError::not_found(format!("organisation {org_id} does not exist; see `org list`"));
    caller.may(org_id, role, missing)?;
    match st.store.get_org(org_id).await? {
        Some(_) => Ok(()),
        None => Err(missing()),
    }
}

#[utoipa::path(post, path = paths::ORG_API_TOKENS, tag = "orgs", request_body = CreateApiTokenRequest,
    description = "Create an API token of the organisation with a role. The answer is the only place the \
                   token appears: only the SHA-256 of its secret is stored. Needs the admin role.",
    params(("org_id" = String, Path, description = "organisation id")),
    responses((status = 201, body = CreatedApiToken), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "a token of that name exists", body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn create_api_token(
    caller: Caller,
    State(st): State<Shared>,
    Path(org_id): Path<String>,
    Body(req): Body<CreateApiTokenRequest>,
) -> ApiResult<(StatusCode, Json<CreatedApiToken>)> {
    org_exists(&st, &caller, &org_id, Role::Admin).await?;
    check_token_name(&req.name)?;
    let ttl = req.ttl_secs.unwrap_or(DEFAULT_API_TOKEN_TTL_SECS);
    if ttl == 0 || ttl > MAX_API_TOKEN_TTL_SECS {
        return Err(ApiError::bad_request(
            "bad_ttl",
            format!("ttl_secs must be 1..={MAX_API_TOKEN_TTL_SECS}"),
        ));
    }
    let now = st.clock.now_ms();
    let id = format!("tok-{}", random_hex(8));
    let secret = random_hex(32);
    let info = ApiTokenInfo {
        id: id.clone(),
        name: req.name.clone(),
        org_id: org_id.clone(),
        role: req.role,
        created_unix_ms: now,
        // A token never outlives the token that made it: an expiring admin token cannot mint a
        // longer-lived one.
        expires_unix_ms: now
            .saturating_add(ttl.saturating_mul(1000))
            .min(caller.expires_unix_ms.unwrap_or(u64::MAX)),
        created_by: caller.actor.clone(),
        revoked_unix_ms: None,
    };
    let record = ApiTokenRecord { info: info.clone(), secret_sha256: hex::encode(sha256(secret.as_bytes())) };
    match st.store.insert_api_token(record).await {
        Ok(()) => {}
        Err(StoreError::AlreadyExists(_)) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "token_name_taken",
                format!(
                    "organisation {org_id} has an API token named {:?}; revoke it or pick another name",
                    req.name
                ),
            ));
        }
        Err(e) => return Err(e.into()),
    }
    let detail = format!("{} {} ({}), expires in {ttl} s", info.role, info.name, info.id);
    st.audit(&caller.actor, Some(&org_id), "api_token.created", &detail).await;
    let token = format!("{API_TOKEN_PREFIX}{id}.{secret}");
    Ok((StatusCode::CREATED, Json(CreatedApiToken { token, info })))
}

#[utoipa::path(get, path = paths::ORG_API_TOKENS, tag = "orgs",
    description = "The organisation's API tokens, revoked ones included, oldest first (never their secrets). \
                   Needs the admin role.",
    params(("org_id" = String, Path, description = "organisation id")),
    responses((status = 200, body = ApiTokenList), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn list_api_tokens(
    caller: Caller,
    State(st): State<Shared>,
    Path(org_id): Path<String>,
) -> ApiResult<Json<ApiTokenList>> {
    org_exists(&st, &caller, &org_id, Role::Admin).await?;
    Ok(Json(ApiTokenList { tokens: st.store.list_api_tokens(&org_id).await? }))
}

#[utoipa::path(delete, path = paths::ORG_API_TOKEN, tag = "orgs",
    description = "Revoke an API token: every later call with it answers 401 `token_revoked`. Revoking a revoked \
                   token changes nothing. Needs the admin role.",
    params(("org_id" = String, Path, description = "organisation id"), ("token_id" = String, Path, description = "token id")),
    responses((status = 200, body = ApiTokenInfo), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn revoke_api_token(
    caller: Caller,
    State(st): State<Shared>,
    Path((org_id, token_id)): Path<(String, String)>,
) -> ApiResult<Json<ApiTokenInfo>> {
    org_exists(&st, &caller, &org_id, Role::Admin).await?;
    let missing = || ApiError::not_found(format!("organisation {org_id} has no API token {token_id}"));
    match st.store.get_api_token(&token_id).await? {
        Some(t) if t.info.org_id == org_id => {}
        _ => return Err(missing()),
    }
    let info = st.store.revoke_api_token(&token_id, st.clock.now_ms()).await?.ok_or_else(missing)?;
    let detail = format!("{} {} ({})", info.role, info.name, info.id);
    st.audit(&caller.actor, Some(&org_id), "api_token.revoked", &detail).await;
    Ok(Json(info))
}

/// The node, if the caller may do what needs `role` with it: 404 when it is not enrolled or
/// belongs to an organisation the caller does not see.
pub async fn node_for(st: &AppState, caller: &Caller, node_id: &str, role: Role) -> ApiResult<NodeInfo> {
    let missing = || ApiError::not_found(format!("node {node_id} is not enrolled; see `node list`"));
    let node = st.store.get_node(node_id).await?.ok_or_else(missing)?;
    caller.may(&node.org_id, role, missing)?;
    Ok(node)
}
