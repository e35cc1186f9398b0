use serde::{Deserialize, Serialize};

/// Body of every non-2xx answer of the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// Stable machine-readable code, e.g. `token_expired`, `body_too_large`.
    pub code: String,
    /// What failed, on what input, and what to do about it.
    pub message: String,
}

/// Liveness answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Health {
    pub status: String,
    pub version: String,
}
