//! Offline enrollment, the node's side. `request` makes the node's key pair and writes the
//! request file; the key waits in `identity.pending/` (mode 0600) beside the identity directory.
//! `complete` takes the enrollment file the operator brings back and writes the identity exactly
//! as online enrollment does, after checking that the certificate is for the pending key (an
//! enrollment file made for another node's request is refused), that the request is this
//! node's, that the organisation key signed it, and, when given, the CA's fingerprint.

use std::path::{Path, PathBuf};

use outpost_protocol::{OFFLINE_FORMAT, OfflineEnrollRequest, OfflineEnrollment, SignedEnvelope};
use serde::{Deserialize, Serialize};

use crate::clock::now_unix_ms;
use crate::identity::{Identity, IdentityError, NodeFile};
use crate::tls;

const PENDING_KEY: &str = "pending.key";
const PENDING_JSON: &str = "pending.json";

/// What waits for the enrollment file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pending {
    request_id: String,
    hostname: String,
}

/// `identity.pending` next to the identity directory.
pub fn pending_dir(identity_dir: &Path) -> PathBuf {
    identity_dir.with_file_name("identity.pending")
}

fn err(e: impl std::fmt::Display) -> IdentityError {
    IdentityError::Enroll(e.to_string())
}

/// Make the key pair and the request. An earlier pending request is replaced (its enrollment
/// file will then be refused here).
pub fn request(
    identity_dir: &Path,
    hostname: &str,
    force: bool,
    heartbeat: Option<outpost_protocol::Heartbeat>,
) -> Result<OfflineEnrollRequest, IdentityError> {
    if let Ok(existing) = Identity::load(identity_dir)
        && !force
    {
        return Err(IdentityError::AlreadyEnrolled {
            node_id: existing.node.node_id,
            dir: identity_dir.into(),
        });
    }
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    params.distinguished_name.push(rcgen::DnType::CommonName, hostname.to_owned());
    let csr_pem = params.serialize_request(&key).map_err(err)?.pem().map_err(err)?;
    let req = OfflineEnrollRequest {
        format: OFFLINE_FORMAT,
        request_id: uuid::Uuid::new_v4().simple().to_string(),
        csr_pem,
        hostname: hostname.to_owned(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        created_unix_ms: now_unix_ms(),
        heartbeat,
    };
    let dir = pending_dir(identity_dir);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| file_err(&dir, e))?;
    crate::identity::set_mode(&dir, 0o700).map_err(|e| file_err(&dir, e))?;
    let pending = Pending { request_id: req.request_id.clone(), hostname: hostname.to_owned() };
    let json = serde_json::to_vec_pretty(&pending).map_err(err)?;
    for (name, body, mode) in
        [(PENDING_KEY, key.serialize_pem().into_bytes(), 0o600), (PENDING_JSON, json, 0o644)]
    {
        let p = dir.join(name);
        crate::identity::write_file(&p, &body, mode).map_err(|e| file_err(&p, e))?;
    }
    Ok(req)
}

fn file_err(p: &Path, e: std::io::Error) -> IdentityError {
    IdentityError::File { path: p.into(), message: e.to_string() }
}

/// Enroll from the operator's enrollment file (`text`, read from `file`); `ca_fingerprint` pins
/// the CA it carries.
pub fn complete(
    identity_dir: &Path,
    file: &Path,
    text: &str,
    ca_fingerprint: Option<&str>,
) -> Result<Identity, IdentityError> {
    let dir = pending_dir(identity_dir);
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| file_err(p, e));
    let pending: Pending = serde_json::from_str(&read(&dir.join(PENDING_JSON)).map_err(|_| {
        IdentityError::Enroll(format!(
            "no offline enrollment request is pending here ({} is missing): run `outpost enroll --offline --out FILE` first",
            dir.display()
        ))
    })?)
    .map_err(|e| err(format!("{}: {e}", dir.join(PENDING_JSON).display())))?;
    let key_pem = read(&dir.join(PENDING_KEY))?;
    let env: SignedEnvelope = serde_json::from_str(text)
        .map_err(|e| err(format!("{} is not an enrollment file: {e}", file.display())))?;
    let offline: OfflineEnrollment = serde_json::from_str(&env.payload)
        .map_err(|e| err(format!("{} does not hold an enrollment: {e}", file.display())))?;
    if offline.format != OFFLINE_FORMAT {
        return Err(err(format!(
            "enrollment file format {} (this build reads {OFFLINE_FORMAT})",
            offline.format
        )));
    }
    if offline.request_id != pending.request_id {
        return Err(err(format!(
            "the enrollment file answers request {}, not this node's pending request {}",
            offline.request_id, pending.request_id
        )));
    }
    let e = &offline.enrollment;
    crate::verify::ManifestVerifier::new(&e.node_id, &e.org_signing_key)
        .map_err(err)?
        .verify_payload(&env)
        .map_err(|x| err(format!("the enrollment file is not signed by its organisation's key: {x}")))?;
    // The certificate must be for the key this node made (never for another node's request).
    let key = rcgen::KeyPair::from_pem(&key_pem).map_err(err)?;
    let cert = tls::certs_from_pem(&e.cert_pem, "certificate in the enrollment file").map_err(err)?;
    let cert = cert.first().ok_or_else(|| err("the enrollment file holds no certificate"))?;
    if !key_in_cert(cert.as_ref(), key.public_key_raw()) {
        return Err(err(
            "the certificate in the enrollment file is for another key: it was made for another node's request",
        ));
    }
    if let Some(fp) = ca_fingerprint
        && !tls::pem_has_fingerprint(&e.ca_pem, "CA in the enrollment file", fp).map_err(err)?
    {
        return Err(err(format!("the CA in the enrollment file does not have fingerprint {fp}")));
    }
    let identity = Identity {
        org_keys: vec![e.org_signing_key.clone()],
        node: NodeFile {
            node_id: e.node_id.clone(),
            org_id: e.org_id.clone(),
            control_url: offline.control_url.clone(),
            org_signing_key: e.org_signing_key.clone(),
            enrolled_unix_ms: now_unix_ms(),
        },
        cert_pem: e.cert_pem.clone(),
        key_pem,
        ca_pem: e.ca_pem.clone(),
    };
    crate::identity::write_atomically(identity_dir, &identity)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(identity)
}

/// Whether the certificate (DER) carries the public key `raw` (the EC point, 65 bytes for P-256).
fn key_in_cert(cert_der: &[u8], raw: &[u8]) -> bool {
    // The key is one contiguous BIT STRING inside the certificate.
    !raw.is_empty() && cert_der.windows(raw.len()).any(|w| w == raw)
}
