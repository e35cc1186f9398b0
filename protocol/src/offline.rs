//! Offline enrollment, for a node that can never reach the control plane: the node writes a
//! request file (its CSR and facts), the operator trades it for an enrollment file, and the node
//! enrolls from that file. A request is usable once; the enrollment file is for the key that
//! made the request and no other.

use serde::{Deserialize, Serialize};

/// The format of offline enrollment files this build writes and reads.
pub const OFFLINE_FORMAT: u32 = 1;

/// What `outpost enroll --offline --out FILE` writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct OfflineEnrollRequest {
    pub format: u32,
    /// Random; the control plane honours each request once.
    pub request_id: String,
    /// PKCS#10 request for the node's own key pair (which never leaves the node), PEM.
    pub csr_pem: String,
    pub hostname: String,
    pub agent_version: String,
    pub created_unix_ms: u64,
    /// What the box has and says about itself (labels, capabilities), as a heartbeat would: the
    /// control plane keeps it as the node's last heartbeat, so selectors and deployments see the
    /// node before any other word from it. Absent from older agents' requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<crate::Heartbeat>,
}

/// Operator (`POST /v1/orgs/{org_id}/enroll-offline`): enroll the node that wrote `request`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct OfflineEnrollParams {
    pub request: OfflineEnrollRequest,
    /// The URL the node will use should it ever get a link (the operator's own, by default).
    #[serde(default)]
    pub control_url: String,
}

/// The signed payload of an enrollment file (a [`crate::SignedEnvelope`] by the org key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct OfflineEnrollment {
    pub format: u32,
    pub request_id: String,
    pub enrollment: crate::EnrollResponse,
    pub control_url: String,
    pub issued_unix_ms: u64,
}
