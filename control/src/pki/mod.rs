//! The control plane's certificate authority: it creates or loads the CA and issues the
//! server certificate and the nodes' client certificates. It never trusts anything a CSR
//! asks for beyond its public key: names, usages and lifetimes are chosen here.

mod inspect;
#[cfg(test)]
mod props;

use std::time::Duration;

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

pub use inspect::{
    PeerCert, normalise_san, not_after_unix, peer_cert, pem_to_der, pems_to_der, san_names,
    subject_and_issuer,
};

/// How long issued certificates live.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
const CLIENT_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Back-dating of `not_before`, so a node whose clock runs a little behind accepts the cert.
const CLOCK_SKEW: Duration = Duration::from_secs(outpost_protocol::CERT_BACKDATE_SECS.unsigned_abs());

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate operation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("the certificate signing request is not valid PKCS#10 PEM with a valid signature: {0}")]
    BadCsr(rcgen::Error),
    #[error("{what} is not valid PEM: {reason}")]
    BadPem { what: String, reason: String },
    #[error("{what} is not a valid X.509 certificate: {reason}")]
    BadCert { what: String, reason: String },
    #[error("the CA key does not match the CA certificate; restore ca.key and ca.crt together")]
    KeyMismatch,
    #[error("the CA key cannot sign: {0}")]
    Sign(String),
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A certificate issued to a node.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub pem: String,
    pub sha256: String,
}

pub struct CertAuthority {
    /// The CA as rcgen needs it for signing (re-derived from the stored certificate).
    signer: rcgen::Certificate,
    key: KeyPair,
    pem: String,
    der: CertificateDer<'static>,
    fingerprint: String,
}

impl CertAuthority {
    /// A fresh self-signed ECDSA P-256 CA named `Outpost CA <random>`.
    pub fn generate() -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&format!("Outpost CA {}", hex::encode(random_bytes::<4>())));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, CA_LIFETIME);
        let cert = params.self_signed(&key)?;
        Self::from_pem(&cert.pem(), &key.serialize_pem())
    }

    /// Loads the CA from its certificate and key (PEM), checking they belong together.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let der = pem_to_der(cert_pem, "the CA certificate")?;
        let spki = inspect::public_key_der(&der, "the CA certificate")?;
        if spki != key.public_key_der() {
            return Err(PkiError::KeyMismatch);
        }
        let signer = CertificateParams::from_ca_cert_der(&der)?.self_signed(&key)?;
        let fingerprint = sha256_hex(&der);
        Ok(Self { signer, key, pem: cert_pem.to_owned(), der, fingerprint })
    }

    pub fn cert_pem(&self) -> &str {
        &self.pem
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.der
    }

    /// An ECDSA P-256 SHA-256 signature (ASN.1 DER) by the CA's key over `message`: how the CA
    /// announces the one that replaces it.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, PkiError> {
        let rng = ring::rand::SystemRandom::new();
        let signer = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &self.key.serialize_der(),
            &rng,
        )
        .map_err(|e| PkiError::Sign(e.to_string()))?;
        let signature = signer.sign(&rng, message).map_err(|e| PkiError::Sign(e.to_string()))?;
        Ok(signature.as_ref().to_vec())
    }

    /// SHA-256 of the CA certificate (DER), hex: what nodes pin with `--ca-fingerprint`.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// A server certificate for `sans` (DNS names or IP addresses) with a fresh key:
    /// returns `(cert_pem, key_pem)`.
    pub fn issue_server_cert(&self, sans: &[String]) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(sans.to_vec())?;
        params.distinguished_name = name("outpost-control");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        set_validity(&mut params, SERVER_CERT_LIFETIME);
        let cert = params.signed_by(&key, &self.signer, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A client certificate for the key in `csr_pem`, with CN = `node_id`. Everything else in
    /// the CSR (subject, requested names) is ignored.
    pub fn issue_client_cert(&self, csr_pem: &str, node_id: &str) -> Result<IssuedCert, PkiError> {
        self.issue_client_cert_for(csr_pem, node_id, CLIENT_CERT_LIFETIME)
    }

    /// A client certificate for `node_id` valid for `lifetime` from now (and
    /// [`outpost_protocol::CERT_BACKDATE_SECS`] before).
    pub fn issue_client_cert_for(
        &self,
        csr_pem: &str,
        node_id: &str,
        lifetime: Duration,
    ) -> Result<IssuedCert, PkiError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(PkiError::BadCsr)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(node_id);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        set_validity(&mut params, lifetime);
        csr.params = params;
        let cert = csr.signed_by(&self.signer, &self.key)?;
        Ok(IssuedCert { pem: cert.pem(), sha256: sha256_hex(cert.der()) })
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn set_validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + lifetime;
    let mut serial = random_bytes::<16>();
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.use_authority_key_identifier_extension = !matches!(params.is_ca, IsCa::Ca(_));
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loaded_ca_issues_client_certs_that_name_the_node() {
        let ca = CertAuthority::generate().unwrap();
        let reloaded = CertAuthority::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(reloaded.fingerprint(), ca.fingerprint());

        let node_key = KeyPair::generate().unwrap();
        let csr = CertificateParams::new(vec!["ignored.example".into()])
            .unwrap()
            .serialize_request(&node_key)
            .unwrap();
        let issued = reloaded.issue_client_cert(&csr.pem().unwrap(), "node-1").unwrap();
        let der = pem_to_der(&issued.pem, "client").unwrap();
        let peer = peer_cert(&der).unwrap();
        assert_eq!(peer.node_id, "node-1");
        assert_eq!(peer.cert_sha256, issued.sha256);
        let (_, issuer) = subject_and_issuer(&der).unwrap();
        let (ca_subject, _) = subject_and_issuer(ca.cert_der()).unwrap();
        assert_eq!(issuer, ca_subject);
    }

    #[test]
    fn a_ca_key_from_another_ca_is_refused() {
        let a = CertAuthority::generate().unwrap();
        let b = CertAuthority::generate().unwrap();
        assert!(matches!(CertAuthority::from_pem(a.cert_pem(), &b.key_pem()), Err(PkiError::KeyMismatch)));
    }

    #[test]
    fn garbage_csrs_are_refused() {
        let ca = CertAuthority::generate().unwrap();
        assert!(matches!(ca.issue_client_cert("not a csr", "n"), Err(PkiError::BadCsr(_))));
    }

    #[test]
    fn server_certs_carry_the_requested_names() {
        let ca = CertAuthority::generate().unwrap();
        let (pem, _) = ca.issue_server_cert(&["localhost".into(), "127.0.0.1".into(), "::1".into()]).unwrap();
        let names = san_names(&pem_to_der(&pem, "server").unwrap()).unwrap();
        assert_eq!(names, ["127.0.0.1", "::1", "localhost"].map(String::from).into_iter().collect());
    }
}
