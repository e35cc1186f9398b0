use serde::{Deserialize, Serialize};

/// An organisation: the unit that owns nodes, jobs and a job-signing key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Org {
    pub id: String,
    pub name: String,
    /// The org's ed25519 job-signing public key.
    pub signing_key: PublicKey,
    pub created_unix_ms: u64,
}

/// An ed25519 public key with its id (the first 16 hex digits of SHA-256 of the key bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PublicKey {
    pub key_id: String,
    /// 32 key bytes, hex.
    pub ed25519_hex: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateOrgRequest {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// Lifetime of the token; defaults to one hour, at most seven days.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// A one-time enrollment token, scoped to one organisation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EnrollmentToken {
    pub token: String,
    pub org_id: String,
    pub expires_unix_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub token: String,
    /// PKCS#10 certificate signing request for the node's own key pair, PEM.
    pub csr_pem: String,
    pub hostname: String,
    pub agent_version: String,
    /// What the agent understands, so that work submitted before its first heartbeat is
    /// already shaped for it (e.g. carries the submitter a site policy checks). Absent from
    /// agents before revision 3; an agent leaves it out for a control plane that refuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce: Option<crate::Announce>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EnrollResponse {
    pub node_id: String,
    pub org_id: String,
    /// The node's client certificate (its CN is the node id), PEM.
    pub cert_pem: String,
    /// The control plane's CA, PEM: the node pins it for every later call.
    pub ca_pem: String,
    /// The organisation's job-signing key: the node runs only manifests signed by it.
    pub org_signing_key: PublicKey,
}
