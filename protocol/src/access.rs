//! Operator access: roles and the API tokens that carry them.

use serde::{Deserialize, Serialize};

/// What an API token of an organisation may do there. Each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read the organisation's nodes, jobs, deployments, events, triggers and audit trail.
    Viewer,
    /// Also submit and cancel jobs, deploy, label nodes, create triggers and bundles.
    Operator,
    /// Also create and revoke API tokens and enrollment tokens.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?}: one of viewer, operator, admin"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateApiTokenRequest {
    /// A name for people and the audit trail: 1-64 of `[A-Za-z0-9._-]`, unique in the organisation
    /// among tokens not revoked.
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[A-Za-z0-9._-]{1,64}$"))]
    pub name: String,
    pub role: Role,
    /// Lifetime; defaults to 90 days, at most 400 days.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 34560000))]
    pub ttl_secs: Option<u64>,
}

/// An API token as listed: everything but the secret, which is shown once at creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ApiTokenInfo {
    /// `tok-…`; the token itself starts with `opk_<id>.`.
    pub id: String,
    pub name: String,
    pub org_id: String,
    pub role: Role,
    pub created_unix_ms: u64,
    pub expires_unix_ms: u64,
    /// Who created it (the actor recorded in the audit trail).
    pub created_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_unix_ms: Option<u64>,
}

/// The answer to creating a token: the only time the secret appears.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreatedApiToken {
    /// `opk_<id>.<secret>`: send as `Authorization: Bearer <token>`.
    pub token: String,
    pub info: ApiTokenInfo,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ApiTokenList {
    pub tokens: Vec<ApiTokenInfo>,
}
