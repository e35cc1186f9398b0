//! TLS client configurations of the agent: TLS 1.3 only, ring provider. After enrollment the
//! agent trusts exactly the pinned control-plane CA and presents its client certificate. At
//! enrollment it trusts a CA given by file or by SHA-256 fingerprint, never the system roots.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: no PEM certificate found")]
    NoCertificate { what: String },
    #[error("{what}: no PEM private key found")]
    NoKey { what: String },
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn certs_from_pem(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid { what: what.into(), message: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what: what.into() });
    }
    Ok(certs)
}

pub(crate) fn key_from_pem(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|e| TlsError::Invalid { what: what.into(), message: e.to_string() })?
        .ok_or_else(|| TlsError::NoKey { what: what.into() })
}

/// SHA-256 of a certificate's DER, lowercase hex: how operators name a CA.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}

/// Whether a certificate in `pem` (`what` it is, for errors) has the fingerprint `want` (hex,
/// either case, colons allowed).
pub fn pem_has_fingerprint(pem: &str, what: &str, want: &str) -> Result<bool, TlsError> {
    let want = want.to_lowercase().replace(':', "");
    Ok(certs_from_pem(pem, what)?.iter().any(|c| fingerprint(c) == want))
}

fn roots(ca: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in ca {
        roots
            .add(c.clone())
            .map_err(|e| TlsError::Invalid { what: "CA certificate".into(), message: e.to_string() })?;
    }
    Ok(roots)
}

fn builder() -> Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>, TlsError> {
    ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Invalid { what: "TLS configuration".into(), message: e.to_string() })
}

/// mTLS configuration used for every call after enrollment.
pub fn node_client_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<ClientConfig, TlsError> {
    let ca = certs_from_pem(ca_pem, "pinned CA (identity/ca.crt)")?;
    let certs = certs_from_pem(cert_pem, "node certificate (identity/node.crt)")?;
    let key = key_from_pem(key_pem, "node key (identity/node.key)")?;
    builder()?
        .with_root_certificates(roots(&ca)?)
        .with_client_auth_cert(certs, key)
        .map_err(|e| TlsError::Invalid { what: "node certificate and key".into(), message: e.to_string() })
}

/// How an enrolling node decides to trust the control plane.
#[derive(Debug, Clone)]
pub enum CaTrust {
    /// A CA certificate file the operator copied over.
    Pem(String),
    /// The SHA-256 of the CA certificate; the CA itself comes in the server's chain.
    Fingerprint(String),
}

pub fn enroll_client_config(trust: &CaTrust) -> Result<ClientConfig, TlsError> {
    let b = builder()?;
    let config = match trust {
        CaTrust::Pem(pem) => {
            b.with_root_certificates(roots(&certs_from_pem(pem, "--ca-file")?)?).with_no_client_auth()
        }
        CaTrust::Fingerprint(fp) => {
            let verifier = FingerprintVerifier {
                fingerprint: fp.to_lowercase().replace(':', ""),
                algs: provider().signature_verification_algorithms,
            };
            b.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth()
        }
    };
    Ok(config)
}

/// Finds the certificate with the pinned fingerprint in the server's chain and then verifies
/// the server certificate against it as the only root (name, validity and signature included).
#[derive(Debug)]
struct FingerprintVerifier {
    fingerprint: String,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for FingerprintVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .chain(std::iter::once(end_entity))
            .find(|c| fingerprint(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "no certificate in the control plane's chain has SHA-256 {}; check --ca-fingerprint \
                     against `outpost-control ca fingerprint` on the control plane",
                    self.fingerprint
                ))
            })?;
        let roots = roots(&[ca.clone().into_owned()]).map_err(|e| rustls::Error::General(e.to_string()))?;
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
