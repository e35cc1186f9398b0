//! rustls configuration for both ends: the server (TLS 1.3 only, client certificates optional
//! at the TLS layer and checked against our CA when present) and the clients (operator CLI,
//! tests). Always the *ring* provider, passed explicitly; never a process-wide default.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::authority::Authority;
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

/// The server's config: TLS 1.3 only, the chain [server cert, CA cert] and the accepted client
/// CAs the `authority` says on each handshake (they change during a CA rotation), optional
/// client certs that must not be `revoked` when presented, ALPN http/1.1.
pub fn server_config(authority: Arc<Authority>, revoked: Revoked) -> Result<ServerConfig, TlsError> {
    let tls = crate::authority::Tls(authority);
    let verifier = Arc::new(RevocationVerifier::new(Arc::new(tls.clone()), revoked));
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(tls));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A TLS 1.3 client config trusting only the CAs of `ca_pem` (one, or both during a CA
/// rotation), optionally presenting a client identity `(cert_pem, key_pem)`.
pub fn client_config(ca_pem: &str, identity: Option<(&str, &str)>) -> Result<ClientConfig, TlsError> {
    let cas = pki::pems_to_der(ca_pem, "the CA certificate")?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots_of(&cas)?);
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
