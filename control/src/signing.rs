//! Organisation signing keys (ed25519), their rotation, and the signing of job envelopes. The
//! signed bytes are exactly the `serde_json::to_string` of the envelope, carried verbatim as the
//! payload.
//!
//! A rotation announces the next key, endorsed by the current one, and keeps signing with the
//! current one through the overlap; from the end of the overlap the next key signs (what is
//! handed to a node then is signed again with it, whenever it was submitted). Nodes learn the
//! next key during the overlap, and a node that missed it walks the endorsement chain.

use ed25519_dalek::{Signer, SigningKey};
use outpost_protocol::{JobEnvelope, OrgKey, PublicKey, SignedEnvelope};

use crate::pki::sha256_hex;
use crate::store::{NextOrgKey, OrgRecord};

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("stored signing key of org {org_id} is not 32 hex bytes; the org record is damaged")]
    BadSecret { org_id: String },
    #[error("cannot serialize the job envelope: {0}")]
    Encode(#[from] serde_json::Error),
    #[error(
        "organisation {org_id} is already rotating its signing key: key {key_id} signs from {signs_from_unix_ms} (Unix ms); rotate again after that"
    )]
    InProgress { org_id: String, key_id: String, signs_from_unix_ms: u64 },
}

/// The key that signs for `org` at `now_ms`: the announced next key once its overlap is over,
/// the current one before. `(public key, secret hex)`.
pub fn effective(org: &OrgRecord, now_ms: u64) -> (&PublicKey, &str) {
    match &org.keys.next {
        Some(next) if next.key.signs_from_unix_ms <= now_ms => (&next.key.key, &next.secret_hex),
        _ => (&org.org.signing_key, &org.signing_secret_hex),
    }
}

/// The signing key of `org` at `now_ms`, ready to sign.
pub fn effective_key(org: &OrgRecord, now_ms: u64) -> Result<SigningKey, SigningError> {
    signing_key(&org.org.id, effective(org, now_ms).1)
}

/// The chain up to the current key (the current key alone for an org never rotated).
fn chain(org: &OrgRecord) -> Vec<OrgKey> {
    if org.keys.chain.is_empty() {
        vec![OrgKey {
            key: org.org.signing_key.clone(),
            signs_from_unix_ms: org.org.created_unix_ms,
            endorsement_hex: None,
            retired: false,
        }]
    } else {
        org.keys.chain.clone()
    }
}

/// What nodes of `org` are told at `now_ms`: the endorsement chain, oldest first, with every key
/// retired but the one that signs and the announced next one.
pub fn trust_keys(org: &OrgRecord, now_ms: u64) -> Vec<OrgKey> {
    let signer = effective(org, now_ms).0.key_id.clone();
    let mut keys = chain(org);
    keys.extend(org.keys.next.as_ref().map(|n| n.key.clone()));
    // Retired: every key before the signer. The next key stays trusted through its overlap.
    let at = keys.iter().position(|k| k.key.key_id == signer).unwrap_or(0);
    for (i, k) in keys.iter_mut().enumerate() {
        k.retired = i < at;
    }
    keys
}

/// `org` with an announced next key at `now_ms` plus `overlap_ms`: the record to store. A next
/// key whose overlap is over first becomes the current one.
pub fn rotate(org: &OrgRecord, now_ms: u64, overlap_ms: u64) -> Result<OrgRecord, SigningError> {
    let mut rec = settle(org, now_ms);
    if let Some(next) = &rec.keys.next {
        return Err(SigningError::InProgress {
            org_id: rec.org.id.clone(),
            key_id: next.key.key.key_id.clone(),
            signs_from_unix_ms: next.key.signs_from_unix_ms,
        });
    }
    let current = signing_key(&rec.org.id, &rec.signing_secret_hex)?;
    let (secret_hex, key) = generate_org_key();
    let signs_from_unix_ms = now_ms.saturating_add(overlap_ms);
    let message = outpost_protocol::key_rotation_message(&rec.org.id, &key, signs_from_unix_ms);
    let endorsement_hex = Some(hex::encode(current.sign(message.as_bytes()).to_bytes()));
    rec.keys.chain = chain(&rec);
    rec.keys.next = Some(NextOrgKey {
        key: OrgKey { key, signs_from_unix_ms, endorsement_hex, retired: false },
        secret_hex,
    });
    Ok(rec)
}

/// `org` with a next key whose overlap is over made the current one (the chain kept to
/// [`outpost_protocol::MAX_KEY_CHAIN`] keys).
pub fn settle(org: &OrgRecord, now_ms: u64) -> OrgRecord {
    let mut rec = org.clone();
    let Some(next) = rec.keys.next.take_if(|n| n.key.signs_from_unix_ms <= now_ms) else { return rec };
    let mut keys = chain(&rec);
    keys.push(next.key.clone());
    let excess = keys.len().saturating_sub(outpost_protocol::MAX_KEY_CHAIN);
    keys.drain(..excess);
    rec.keys.chain = keys;
    rec.org.signing_key = next.key.key;
    rec.signing_secret_hex = next.secret_hex;
    rec
}

/// A new random signing key: `(secret hex, public key)`.
pub fn generate_org_key() -> (String, PublicKey) {
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    (hex::encode(key.to_bytes()), public_key(&key))
}

/// The public half with its id: the first 16 hex digits of SHA-256 of the 32 key bytes.
pub fn public_key(key: &SigningKey) -> PublicKey {
    let bytes = key.verifying_key().to_bytes();
    let mut key_id = sha256_hex(&bytes);
    key_id.truncate(16);
    PublicKey { key_id, ed25519_hex: hex::encode(bytes) }
}

/// Restores a signing key from its stored secret.
pub fn signing_key(org_id: &str, secret_hex: &str) -> Result<SigningKey, SigningError> {
    let bytes = hex::decode(secret_hex).ok().and_then(|b| <[u8; 32]>::try_from(b).ok());
    bytes
        .map(|b| SigningKey::from_bytes(&b))
        .ok_or_else(|| SigningError::BadSecret { org_id: org_id.to_owned() })
}

/// Serializes `envelope` and signs exactly those bytes.
pub fn sign_envelope(key: &SigningKey, envelope: &JobEnvelope) -> Result<SignedEnvelope, SigningError> {
    sign_payload(key, envelope)
}

/// Serializes any signed statement (a job or a service's desired state) and signs those bytes.
pub fn sign_payload<T: serde::Serialize>(
    key: &SigningKey,
    envelope: &T,
) -> Result<SignedEnvelope, SigningError> {
    Ok(sign_bytes(key, serde_json::to_string(envelope)?))
}

/// Signs exactly `payload`.
pub fn sign_bytes(key: &SigningKey, payload: String) -> SignedEnvelope {
    let signature = key.sign(payload.as_bytes());
    SignedEnvelope {
        payload,
        key_id: public_key(key).key_id,
        signature_hex: hex::encode(signature.to_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::{Signature, Verifier, VerifyingKey};
    use outpost_protocol::ContainerSpec;

    use super::*;

    #[test]
    fn a_signed_envelope_verifies_with_the_published_key() {
        let (secret, public) = generate_org_key();
        let key = signing_key("org", &secret).unwrap();
        let spec: ContainerSpec =
            serde_json::from_str(&format!(r#"{{"image":"sha256:{}"}}"#, "a".repeat(64))).unwrap();
        let envelope = JobEnvelope {
            job_id: "j".into(),
            attempt: 1,
            org_id: "org".into(),
            node_id: "n".into(),
            seq: 1,
            issued_unix_ms: 1,
            expires_unix_ms: 2,
            spec: spec.into(),
            submitter: None,
            recipients: Vec::new(),
        };
        let signed = sign_envelope(&key, &envelope).unwrap();
        assert_eq!(signed.key_id, public.key_id);
        let verifying =
            VerifyingKey::from_bytes(&hex::decode(&public.ed25519_hex).unwrap().try_into().unwrap()).unwrap();
        let signature = Signature::from_slice(&hex::decode(&signed.signature_hex).unwrap()).unwrap();
        verifying.verify(signed.payload.as_bytes(), &signature).unwrap();
        assert_eq!(serde_json::from_str::<JobEnvelope>(&signed.payload).unwrap(), envelope);
    }

    #[test]
    fn a_damaged_secret_is_reported() {
        assert!(signing_key("o", "abcd").is_err());
    }
}
