//! Organisation signing keys (ed25519) and the signing of job envelopes. The signed bytes are
//! exactly the `serde_json::to_string` of the envelope, carried verbatim as the payload.

use ed25519_dalek::{Signer, SigningKey};
use outpost_protocol::{JobEnvelope, PublicKey, SignedEnvelope};

use crate::pki::sha256_hex;

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("stored signing key of org {org_id} is not 32 hex bytes; the org record is damaged")]
    BadSecret { org_id: String },
    #[error("cannot serialize the job envelope: {0}")]
    Encode(#[from] serde_json::Error),
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
    let payload = serde_json::to_string(envelope)?;
    let signature = key.sign(payload.as_bytes());
    Ok(SignedEnvelope {
        payload,
        key_id: public_key(key).key_id,
        signature_hex: hex::encode(signature.to_bytes()),
    })
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
