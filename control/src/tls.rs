//! rustls configuration for both ends: the server (TLS 1.3 only, client certificates optional
//! at the TLS layer and checked against our CA when present) and the clients (operator CLI,
//! tests). Always the *ring* provider, passed explicitly; never a process-wide default.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::pki::{self, PkiError};
use crate::revocation::{RevocationVerifier, Revoked};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS configuration failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("{what} holds no usable private key (PKCS#8, SEC1 or PKCS#1 PEM expected)")]
    NoKey { what: String },
}

/// The crypto provider every config uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's config: chain [server cert, CA cert], TLS 1.3 only, optional client certs
/// that must chain to `ca` and not be `revoked` when presented, ALPN http/1.1.
pub fn server_config(
    ca: &CertificateDer<'static>,
    server_cert_pem: &str,
    server_key_pem: &str,
    revoked: Revoked,
) -> Result<ServerConfig, TlsError> {
    let roots = Arc::new(roots_of(std::slice::from_ref(ca))?);
    let webpki =
        WebPkiClientVerifier::builder_with_provider(roots, provider()).allow_unauthenticated().build()?;
    let verifier = Arc::new(RevocationVerifier::new(webpki, revoked));
    let server_cert = pki::pem_to_der(server_cert_pem, "server.crt")?;
    let key = private_key(server_key_pem, "server.key")?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![server_cert, ca.clone()], key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A TLS 1.3 client config trusting only `ca_pem`, optionally presenting a client identity
/// `(cert_pem, key_pem)`.
pub fn client_config(ca_pem: &str, identity: Option<(&str, &str)>) -> Result<ClientConfig, TlsError> {
    let ca = pki::pem_to_der(ca_pem, "the CA certificate")?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots_of(&[ca])?);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert_pem, key_pem)) => {
            let cert = pki::pem_to_der(cert_pem, "the client certificate")?;
            builder.with_client_auth_cert(vec![cert], private_key(key_pem, "the client key")?)?
        }
    };
    Ok(config)
}

fn roots_of(certs: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert.clone())?;
    }
    Ok(roots)
}

/// The first private key in `pem`.
pub fn private_key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .ok()
        .flatten()
        .ok_or_else(|| TlsError::NoKey { what: what.to_owned() })
}
