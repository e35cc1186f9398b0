//! What a node trusts, and how it learns of a change without trusting anything new on the
//! control plane's word alone: the CAs it pins and the organisation's job-signing keys. A new
//! CA is announced with a signature by the CA it replaces, a new signing key with a signature
//! by the key before it (an endorsement); the node adds only what something it already trusts
//! has signed, and drops what the control plane no longer lists. Agents that announce
//! [`crate::capability::TRUST_ROTATION`] fetch it from [`crate::paths::NODE_TRUST`] whenever
//! the tag in a poll answer changes.

use serde::{Deserialize, Serialize};

use crate::PublicKey;

/// Most signing keys an organisation's endorsement chain keeps (older ones are dropped: a node
/// offline through more rotations than this enrolls again).
pub const MAX_KEY_CHAIN: usize = 16;

/// Shortest and longest overlap of a rotation, in seconds.
pub const MIN_OVERLAP_SECS: u64 = 60;
pub const MAX_OVERLAP_SECS: u64 = 365 * 86_400;
/// The overlap when the operator names none: a week.
pub const DEFAULT_OVERLAP_SECS: u64 = 7 * 86_400;

/// Everything a node should trust now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NodeTrust {
    /// Changes whenever anything below does; poll answers carry it.
    pub tag: String,
    /// The CA certificates the control plane accepts client certificates from, PEM, the one that
    /// signs its server certificate now first.
    pub ca_pem: String,
    /// A CA rotation under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_rotation: Option<CaRotation>,
    /// The organisation's signing keys, oldest first, each but the first endorsed by the one
    /// before it. The node trusts the keys not `retired` that chain to a key it trusts.
    pub org_keys: Vec<OrgKey>,
}

/// A new CA, announced by the one it replaces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CaRotation {
    /// The new CA certificate, PEM.
    pub new_ca_pem: String,
    /// When the control plane starts presenting a server certificate of the new CA and stops
    /// accepting client certificates of the old one.
    pub switch_unix_ms: u64,
    /// ECDSA P-256 SHA-256 signature (ASN.1 DER, hex) by the old CA's key over
    /// [`ca_rotation_message`].
    pub signature_hex: String,
}

/// One of an organisation's signing keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct OrgKey {
    pub key: PublicKey,
    /// When the control plane signs with it from (the end of the overlap that announced it).
    pub signs_from_unix_ms: u64,
    /// ed25519 signature (hex) by the previous key of the chain over [`key_rotation_message`];
    /// absent for the first key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endorsement_hex: Option<String>,
    /// No longer signs anything and is no longer trusted; kept to endorse the next one.
    #[serde(default)]
    pub retired: bool,
}

/// An operator's rotation (`POST /v1/ca/rotate`, `POST /v1/orgs/{org_id}/signing-key/rotate`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// How long both the old and the new one are trusted (default a week; 60 s to a year).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 60, maximum = 31536000))]
    pub overlap_secs: Option<u64>,
    /// Rotate although some nodes cannot learn of it (agents too old to fetch their trust).
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RotateResponse {
    /// The new CA's SHA-256 fingerprint, or the new key's id.
    pub new_id: String,
    /// When the control plane switches to it.
    pub switch_unix_ms: u64,
    /// Nodes that will not learn of it (agents without the trust-rotation capability, or never
    /// connected since enrollment): they must enroll again after the switch.
    pub nodes_left_behind: Vec<String>,
}

/// The bytes the old CA signs to announce `new_ca_sha256` (DER, lowercase hex).
pub fn ca_rotation_message(new_ca_sha256: &str, switch_unix_ms: u64) -> String {
    format!("outpost ca rotation v1\nnew {new_ca_sha256}\nswitch {switch_unix_ms}\n")
}

/// The bytes a signing key signs to endorse the next one of `org_id`.
pub fn key_rotation_message(org_id: &str, next: &PublicKey, signs_from_unix_ms: u64) -> String {
    format!(
        "outpost key rotation v1\norg {org_id}\nkey {} {}\nsigns_from {signs_from_unix_ms}\n",
        next.key_id, next.ed25519_hex
    )
}

/// Checks an overlap an operator asked for.
pub fn check_overlap(secs: u64) -> Result<u64, String> {
    if (MIN_OVERLAP_SECS..=MAX_OVERLAP_SECS).contains(&secs) {
        Ok(secs)
    } else {
        Err(format!(
            "overlap_secs must be between {MIN_OVERLAP_SECS} and {MAX_OVERLAP_SECS} (a year), not {secs}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_everything_they_vouch_for() {
        let key = PublicKey { key_id: "k1".into(), ed25519_hex: "ab".into() };
        let m = key_rotation_message("org-1", &key, 5);
        assert!(m.contains("org org-1") && m.contains("key k1 ab") && m.contains("signs_from 5"));
        assert_ne!(m, key_rotation_message("org-2", &key, 5), "bound to the organisation");
        assert_ne!(ca_rotation_message("aa", 1), ca_rotation_message("aa", 2), "bound to the switch");
    }

    #[test]
    fn overlaps_are_bounded() {
        assert!(check_overlap(59).is_err());
        assert!(check_overlap(MAX_OVERLAP_SECS + 1).is_err());
        assert_eq!(check_overlap(DEFAULT_OVERLAP_SECS), Ok(DEFAULT_OVERLAP_SECS));
    }

    #[test]
    fn a_trust_document_round_trips_and_refuses_unknown_fields() {
        let doc = NodeTrust {
            tag: "t".into(),
            ca_pem: "pem".into(),
            ca_rotation: None,
            org_keys: vec![OrgKey {
                key: PublicKey { key_id: "k".into(), ed25519_hex: "00".into() },
                signs_from_unix_ms: 0,
                endorsement_hex: None,
                retired: false,
            }],
        };
        let text = serde_json::to_string(&doc).unwrap();
        assert_eq!(serde_json::from_str::<NodeTrust>(&text).unwrap(), doc);
        let extra = text.replacen('{', r#"{"x":1,"#, 1);
        assert!(serde_json::from_str::<NodeTrust>(&extra).is_err());
    }
}
