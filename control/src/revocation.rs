//! Revoked node certificates. A revoked node's certificate is refused in the TLS handshake
//! itself (the client certificate verifier consults this set on every connection), and every
//! node route refuses a revoked node too, which covers a connection that was already open when
//! the node was revoked.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};

/// The SHA-256 (DER, lowercase hex) of every revoked node certificate. Bounded by the number
/// of enrolled nodes; filled from the store at start and on every revocation.
#[derive(Debug, Clone, Default)]
pub struct Revoked(Arc<RwLock<HashSet<String>>>);

impl Revoked {
    pub fn contains(&self, cert_sha256: &str) -> bool {
        // A poisoned lock means a panic elsewhere while inserting; refusing is the safe answer.
        self.0.read().map_or(true, |set| set.contains(cert_sha256))
    }

    pub fn insert(&self, cert_sha256: &str) {
        if let Ok(mut set) = self.0.write() {
            set.insert(cert_sha256.to_owned());
        }
    }

    /// Refuses every certificate of `node`: its current one and the one a renewal replaced.
    pub fn insert_node(&self, node: &outpost_protocol::NodeInfo) {
        self.insert(&node.cert_sha256);
        if let Some(previous) = &node.previous_cert_sha256 {
            self.insert(previous);
        }
    }

    pub fn len(&self) -> usize {
        self.0.read().map_or(0, |set| set.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Wraps the CA's client certificate verifier: a revoked certificate fails the handshake
/// before any request is read.
#[derive(Debug)]
pub struct RevocationVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: Revoked,
}

impl RevocationVerifier {
    pub fn new(inner: Arc<dyn ClientCertVerifier>, revoked: Revoked) -> Self {
        Self { inner, revoked }
    }
}

impl ClientCertVerifier for RevocationVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        if self.revoked.contains(&hex::encode(Sha256::digest(end_entity.as_ref()))) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}
