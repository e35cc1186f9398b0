//! The node's identity: its key pair (generated here, never leaves the box), the client
//! certificate the control-plane CA issued for it, the pinned CA and the pinned org job-signing
//! key. Enrollment writes all of it once, atomically; the agent only reads it afterwards.

use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_protocol::{EnrollRequest, PublicKey};
use serde::{Deserialize, Serialize};

use crate::clock::now_unix_ms;
use crate::tls::{self, CaTrust};
use crate::uplink::{Uplink, UplinkError};

const NODE_JSON: &str = "node.json";
const NODE_KEY: &str = "node.key";
const NODE_CRT: &str = "node.crt";
const CA_CRT: &str = "ca.crt";
/// A renewed certificate and its key, written durably before they replace `node.crt` and
/// `node.key`: a crash while replacing them is finished at the next load.
const NODE_NEXT: &str = "node.next.json";

/// What [`NODE_NEXT`] holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NextCert {
    cert_pem: String,
    key_pem: String,
}

/// What `node.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    pub node_id: String,
    pub org_id: String,
    pub control_url: String,
    pub org_signing_key: PublicKey,
    pub enrolled_unix_ms: u64,
}

#[derive(Debug, Clone)]
pub struct Identity {
    pub node: NodeFile,
    /// The org signing keys the node accepts: the one pinned at enrollment, or what it
    /// accepted of a key rotation since (`trust.json`, [`crate::rotation`]).
    pub org_keys: Vec<PublicKey>,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "this node is not enrolled ({dir} has no node.json); run `outpost enroll --control URL --token T --ca-fingerprint SHA256` first"
    )]
    NotEnrolled { dir: PathBuf },
    #[error(
        "this node is already enrolled as {node_id} ({dir}); pass --force to enroll again with a new identity"
    )]
    AlreadyEnrolled { node_id: String, dir: PathBuf },
    #[error("identity file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("enrollment failed: {0}")]
    Enroll(String),
    #[error("certificate renewal failed: {0}")]
    Renew(String),
    #[error("certificate renewal failed: {0}")]
    RenewRefused(UplinkError),
}

impl Identity {
    pub fn load(dir: &Path) -> Result<Self, IdentityError> {
        let node_path = dir.join(NODE_JSON);
        if !node_path.exists() {
            return Err(IdentityError::NotEnrolled { dir: dir.into() });
        }
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(|e| IdentityError::File { path: p, message: e.to_string() })
        };
        let node: NodeFile = serde_json::from_str(&read(NODE_JSON)?)
            .map_err(|e| IdentityError::File { path: node_path, message: e.to_string() })?;
        if dir.join(NODE_NEXT).exists() {
            promote(dir)?;
        }
        let org_keys = crate::rotation::org_keys(dir, &node.org_signing_key)
            .map_err(|message| IdentityError::File { path: dir.join("trust.json"), message })?;
        Ok(Self {
            node,
            org_keys,
            cert_pem: read(NODE_CRT)?,
            key_pem: read(NODE_KEY)?,
            ca_pem: read(CA_CRT)?,
        })
    }

    /// Renews the client certificate over mutual TLS with a fresh key pair (so every renewal
    /// rotates the key), stores it durably, and switches `uplink` to it. The old certificate
    /// stays accepted by the control plane until the node first connects with the new one.
    pub async fn renew(&mut self, dir: &Path, uplink: &Uplink) -> Result<(), IdentityError> {
        let err = |e: &dyn std::fmt::Display| IdentityError::Renew(e.to_string());
        let key = rcgen::KeyPair::generate().map_err(|e| err(&e))?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| err(&e))?;
        params.distinguished_name.push(rcgen::DnType::CommonName, self.node.node_id.clone());
        let csr_pem = params.serialize_request(&key).map_err(|e| err(&e))?.pem().map_err(|e| err(&e))?;
        let resp = uplink
            .renew_certificate(&outpost_protocol::RenewCertificateRequest { csr_pem })
            .await
            .map_err(IdentityError::RenewRefused)?;
        let next = NextCert { cert_pem: resp.cert_pem, key_pem: key.serialize_pem() };
        // The CAs may have changed since this identity was loaded (a CA rotation).
        let ca_path = dir.join(CA_CRT);
        self.ca_pem = std::fs::read_to_string(&ca_path)
            .map_err(|e| IdentityError::File { path: ca_path, message: e.to_string() })?;
        // The pair must work before it replaces the one that does.
        let tls =
            tls::node_client_config(&self.ca_pem, &next.cert_pem, &next.key_pem).map_err(|e| err(&e))?;
        let body = serde_json::to_vec(&next).map_err(|e| err(&e))?;
        let path = dir.join(NODE_NEXT);
        replace_file(&path, &body, 0o600)
            .map_err(|e| IdentityError::File { path, message: e.to_string() })?;
        promote(dir)?;
        uplink.set_tls(tls).map_err(|e| err(&e))?;
        self.cert_pem = next.cert_pem;
        self.key_pem = next.key_pem;
        Ok(())
    }

    /// The mTLS uplink for this identity, to `url` (config) or the URL used at enrollment.
    pub fn uplink(&self, url: Option<&str>, request_timeout: Duration) -> Result<Uplink, UplinkError> {
        let tls = tls::node_client_config(&self.ca_pem, &self.cert_pem, &self.key_pem)
            .map_err(|e| UplinkError::Tls(e.to_string()))?;
        Uplink::new(url.unwrap_or(&self.node.control_url), tls, request_timeout)
    }
}

#[derive(Debug, Clone)]
pub struct EnrollOptions {
    pub control_url: String,
    pub token: String,
    pub trust: CaTrust,
    pub hostname: String,
    pub force: bool,
}

/// Generate a key pair and CSR, trade the one-time token for a certificate, and store the
/// identity (key 0600). Files are written to a temp dir and renamed into place, so an
/// interrupted enrollment leaves either the old identity or none.
pub async fn enroll(dir: &Path, opts: &EnrollOptions) -> Result<Identity, IdentityError> {
    if let Ok(existing) = Identity::load(dir)
        && !opts.force
    {
        return Err(IdentityError::AlreadyEnrolled { node_id: existing.node.node_id, dir: dir.into() });
    }
    let enroll_err = |e: &dyn std::fmt::Display| IdentityError::Enroll(e.to_string());
    let key = rcgen::KeyPair::generate().map_err(|e| enroll_err(&e))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| enroll_err(&e))?;
    params.distinguished_name.push(rcgen::DnType::CommonName, opts.hostname.clone());
    let csr = params.serialize_request(&key).map_err(|e| enroll_err(&e))?;
    let csr_pem = csr.pem().map_err(|e| enroll_err(&e))?;

    let tls = tls::enroll_client_config(&opts.trust).map_err(|e| enroll_err(&e))?;
    let uplink = Uplink::new(&opts.control_url, tls, Duration::from_secs(30)).map_err(|e| enroll_err(&e))?;
    let resp = uplink
        .enroll(&EnrollRequest {
            token: opts.token.clone(),
            csr_pem,
            hostname: opts.hostname.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            announce: Some(outpost_protocol::Announce::this_build()),
        })
        .await
        .map_err(|e| enroll_err(&e))?;

    // The CA the control plane returns must be the one we decided to trust.
    if let CaTrust::Fingerprint(fp) = &opts.trust
        && !tls::pem_has_fingerprint(&resp.ca_pem, "CA in the enrollment answer", fp)
            .map_err(|e| enroll_err(&e))?
    {
        return Err(IdentityError::Enroll(format!(
            "the CA in the enrollment answer does not have fingerprint {fp}"
        )));
    }
    let identity = Identity {
        org_keys: vec![resp.org_signing_key.clone()],
        node: NodeFile {
            node_id: resp.node_id,
            org_id: resp.org_id,
            control_url: uplink.base().to_string(),
            org_signing_key: resp.org_signing_key,
            enrolled_unix_ms: now_unix_ms(),
        },
        cert_pem: resp.cert_pem,
        key_pem: key.serialize_pem(),
        ca_pem: resp.ca_pem,
    };
    write_atomically(dir, &identity)?;
    Ok(identity)
}

pub(crate) fn write_atomically(dir: &Path, id: &Identity) -> Result<(), IdentityError> {
    let file_err =
        |p: &Path, e: std::io::Error| IdentityError::File { path: p.into(), message: e.to_string() };
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| file_err(parent, e))?;
    let tmp = parent.join(format!(".identity.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| file_err(&tmp, e))?;
    let node_json = serde_json::to_string_pretty(&id.node).unwrap_or_default();
    for (name, body, mode) in [
        (NODE_KEY, id.key_pem.as_str(), 0o600),
        (NODE_CRT, id.cert_pem.as_str(), 0o644),
        (CA_CRT, id.ca_pem.as_str(), 0o644),
        (NODE_JSON, node_json.as_str(), 0o644),
    ] {
        let p = tmp.join(name);
        write_file(&p, body.as_bytes(), mode).map_err(|e| file_err(&p, e))?;
    }
    set_mode(&tmp, 0o700).map_err(|e| file_err(&tmp, e))?;
    if dir.exists() {
        let old = parent.join(format!(".identity.old-{}", std::process::id()));
        std::fs::rename(dir, &old).map_err(|e| file_err(dir, e))?;
        std::fs::rename(&tmp, dir).map_err(|e| file_err(dir, e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, dir).map_err(|e| file_err(dir, e))?;
    }
    Ok(())
}

/// `(not_before, not_after)` of a PEM certificate, Unix seconds.
pub fn validity(cert_pem: &str) -> Result<(i64, i64), String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).map_err(|e| e.to_string())?;
    let cert = pem.parse_x509().map_err(|e| e.to_string())?;
    Ok((cert.validity().not_before.timestamp(), cert.validity().not_after.timestamp()))
}

/// When a PEM certificate ends, Unix seconds.
pub fn not_after(cert_pem: &str) -> Result<i64, String> {
    validity(cert_pem).map(|(_, end)| end)
}

/// Puts a renewed pair ([`NODE_NEXT`]) in place of `node.key` and `node.crt`, each replaced
/// atomically, then drops it. Run again after a crash, it finishes the job.
fn promote(dir: &Path) -> Result<(), IdentityError> {
    let file_err =
        |p: &Path, e: &dyn std::fmt::Display| IdentityError::File { path: p.into(), message: e.to_string() };
    let next_path = dir.join(NODE_NEXT);
    let text = std::fs::read(&next_path).map_err(|e| file_err(&next_path, &e))?;
    let next: NextCert = serde_json::from_slice(&text).map_err(|e| file_err(&next_path, &e))?;
    for (name, body, mode) in [(NODE_KEY, &next.key_pem, 0o600), (NODE_CRT, &next.cert_pem, 0o644)] {
        let p = dir.join(name);
        replace_file(&p, body.as_bytes(), mode).map_err(|e| file_err(&p, &e))?;
    }
    std::fs::remove_file(&next_path).map_err(|e| file_err(&next_path, &e))?;
    sync_dir(dir).map_err(|e| file_err(dir, &e))
}

/// Replaces `p` atomically: a temporary file written and synced, renamed over it, the directory
/// synced.
pub(crate) fn replace_file(p: &Path, body: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = p.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    write_file(&tmp, body, mode)?;
    std::fs::rename(&tmp, p)?;
    sync_dir(p.parent().unwrap_or(Path::new(".")))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Create with the final mode from the start (no window where the key is world-readable),
/// and fsync so the identity survives a power cut right after enrollment.
pub(crate) fn write_file(p: &Path, body: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(p)?;
    f.write_all(body)?;
    f.sync_all()
}

pub(crate) fn set_mode(p: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
}
