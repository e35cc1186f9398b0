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
    /// 1-128 characters, none a control character, not all spaces (spaces around it are
    /// trimmed).
    #[cfg_attr(
        feature = "openapi",
        schema(
            min_length = 1,
            max_length = 128,
            pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
        )
    )]
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// Lifetime of the token; defaults to one hour, at most seven days.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 604800))]
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
    /// 1-253 characters; ASCII whitespace around it is trimmed, and what is left is not empty
    /// and holds no control character.
    #[cfg_attr(
        feature = "openapi",
        schema(
            min_length = 1,
            max_length = 253,
            pattern = r"^[\t\n\x0c\r ]*[^\x00-\x20\x7f-\x9f]([^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f])?[\t\n\x0c\r ]*$"
        )
    )]
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

/// How far before its issue a node certificate's validity starts, so a node whose clock is a
/// little behind the control plane's can use it at once.
pub const CERT_BACKDATE_SECS: i64 = 3600;

/// A new certificate for the node's (new) key pair, asked for over mutual TLS with the current
/// one by agents that announce [`crate::capability::CERT_RENEWAL`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RenewCertificateRequest {
    /// PKCS#10 certificate signing request, PEM; a fresh key pair rotates the node's key.
    pub csr_pem: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RenewCertificateResponse {
    /// The node's new client certificate, PEM. The one the request came with stays valid until
    /// the node first connects with the new one (or it expires).
    pub cert_pem: String,
}

/// When a certificate valid from `not_before` to `not_after` (Unix seconds) is due for renewal:
/// two thirds into its life, counted from its issue (the validity starts
/// [`CERT_BACKDATE_SECS`] before it).
pub fn renew_at(not_before: i64, not_after: i64) -> i64 {
    let issued = (not_before.saturating_add(CERT_BACKDATE_SECS)).min(not_after);
    issued.saturating_add(not_after.saturating_sub(issued).saturating_mul(2) / 3)
}

#[cfg(test)]
mod renewal_tests {
    use super::*;

    #[test]
    fn renewal_is_due_two_thirds_into_the_life_since_issue() {
        let issued = 1_000_000;
        let day = 86_400;
        assert_eq!(renew_at(issued - CERT_BACKDATE_SECS, issued + 30 * day), issued + 20 * day);
        assert_eq!(renew_at(issued - CERT_BACKDATE_SECS, issued + 15), issued + 10);
        // A certificate shorter than its backdate is due at once, never before it was valid.
        assert_eq!(renew_at(issued, issued + 60), issued + 60);
        assert_eq!(renew_at(i64::MIN, i64::MAX), renew_at(i64::MIN, i64::MAX), "no overflow panic");
    }
}
