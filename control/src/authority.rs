//! The control plane's CA through a rotation: which CA issues node certificates, which server
//! certificate the TLS layer presents, whose client certificates it accepts, and what nodes are
//! told to trust. Outside a rotation that is the one CA. During one (`outpost-control ca
//! rotate`):
//!
//! - until the switch the server presents its certificate of the old CA, accepts client
//!   certificates of both, and new node certificates come from the new CA; nodes are told to
//!   trust both, and the new CA is announced with the old CA's signature;
//! - from the switch it presents its certificate of the new CA and accepts only the new CA's
//!   client certificates; nodes are told to trust the new one alone.
//!
//! The switch is a moment on the control plane's clock: nothing has to run at it. The files move
//! into place at the next start or the next rotation ([`crate::data_dir::DataDir::finish_rotation`]).

use std::sync::{Arc, RwLock};

use outpost_protocol::CaRotation;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::clock::Clock;
use crate::data_dir::{DataDir, DataDirError, Materials, NextCa, Rotation};
use crate::pki::{self, CertAuthority};
use crate::tls::{self, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error(
        "a CA rotation is under way: the server switches to CA {fingerprint} at {switch_unix_ms} (Unix ms); rotate again after that"
    )]
    InProgress { fingerprint: String, switch_unix_ms: u64 },
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// One CA with the server certificate it issued and a verifier of its client certificates.
struct Held {
    ca: Arc<CertAuthority>,
    server: Arc<CertifiedKey>,
}

struct Next {
    held: Held,
    rotation: Rotation,
    /// Set the first time the switch is seen: it holds from then on, whatever the clock does
    /// afterwards (a step back must not bring back the old CA).
    seen: std::sync::atomic::AtomicBool,
    /// Client certificates of the new CA only (from the switch).
    alone: Arc<dyn ClientCertVerifier>,
}

struct State {
    current: Held,
    next: Option<Next>,
    /// Client certificates of the current CA and, during a rotation, of the next one.
    both: Arc<dyn ClientCertVerifier>,
}

impl State {
    fn switched(&self, now_ms: u64) -> bool {
        use std::sync::atomic::Ordering;
        self.next.as_ref().is_some_and(|n| {
            if n.seen.load(Ordering::Relaxed) {
                return true;
            }
            let due = n.rotation.switch_unix_ms <= now_ms;
            if due {
                n.seen.store(true, Ordering::Relaxed);
            }
            due
        })
    }
}

pub struct Authority {
    state: RwLock<Arc<State>>,
    clock: Clock,
    dir: DataDir,
    /// The names the server certificate of a next CA carries.
    sans: Vec<String>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").field("dir", &self.dir.root()).finish_non_exhaustive()
    }
}

fn certified(ca: &CertAuthority, cert_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, TlsError> {
    let leaf = pki::pem_to_der(cert_pem, "the server certificate")?;
    let key = tls::private_key(key_pem, "the server key")?;
    let signing = tls::provider().key_provider.load_private_key(key)?;
    Ok(Arc::new(CertifiedKey::new(vec![leaf, ca.cert_der().clone()], signing)))
}

fn verifier(cas: &[&CertAuthority]) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca.cert_der().clone())?;
    }
    Ok(WebPkiClientVerifier::builder_with_provider(Arc::new(roots), tls::provider())
        .allow_unauthenticated()
        .build()?)
}

fn state(current: Held, next: Option<(Held, Rotation)>) -> Result<State, TlsError> {
    let both = match &next {
        Some((n, _)) => verifier(&[&current.ca, &n.ca])?,
        None => verifier(&[&current.ca])?,
    };
    let next = match next {
        Some((held, rotation)) => {
            Some(Next { alone: verifier(&[&held.ca])?, held, rotation, seen: Default::default() })
        }
        None => None,
    };
    Ok(State { current, next, both })
}

impl Authority {
    /// The authority of a data directory's `materials`; `sans` are the names the server
    /// certificate of a next CA will carry.
    pub fn new(
        materials: Materials,
        dir: DataDir,
        sans: Vec<String>,
        clock: Clock,
    ) -> Result<Self, TlsError> {
        let server = certified(&materials.ca, &materials.server_cert_pem, &materials.server_key_pem)?;
        let current = Held { ca: Arc::new(materials.ca), server };
        let next = match materials.next {
            Some(NextCa { ca, server_cert_pem, server_key_pem, rotation }) => {
                let server = certified(&ca, &server_cert_pem, &server_key_pem)?;
                Some((Held { ca: Arc::new(ca), server }, rotation))
            }
            None => None,
        };
        Ok(Self { state: RwLock::new(Arc::new(state(current, next)?)), clock, dir, sans })
    }

    fn snapshot(&self) -> Arc<State> {
        match self.state.read() {
            Ok(s) => Arc::clone(&s),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// The CA that issues node certificates: the new one from the start of a rotation.
    pub fn issuer(&self) -> Arc<CertAuthority> {
        let s = self.snapshot();
        Arc::clone(s.next.as_ref().map_or(&s.current.ca, |n| &n.held.ca))
    }

    /// The CA whose server certificate is presented now.
    pub fn presented(&self) -> Arc<CertAuthority> {
        let s = self.snapshot();
        match &s.next {
            Some(n) if s.switched(self.clock.now_ms()) => Arc::clone(&n.held.ca),
            _ => Arc::clone(&s.current.ca),
        }
    }

    /// What nodes should trust at `now_ms`: the CAs (PEM; the one presented first) and the
    /// rotation under way.
    pub fn ca_trust(&self, now_ms: u64) -> (String, Option<CaRotation>) {
        let s = self.snapshot();
        match &s.next {
            None => (s.current.ca.cert_pem().to_owned(), None),
            Some(n) if s.switched(now_ms) => (n.held.ca.cert_pem().to_owned(), None),
            Some(n) => (
                format!("{}{}", s.current.ca.cert_pem(), n.held.ca.cert_pem()),
                Some(CaRotation {
                    new_ca_pem: n.held.ca.cert_pem().to_owned(),
                    switch_unix_ms: n.rotation.switch_unix_ms,
                    signature_hex: n.rotation.signature_hex.clone(),
                }),
            ),
        }
    }

    /// Starts a rotation whose switch is `overlap_ms` from now: a new CA, a server certificate
    /// it issued, the old CA's signature over the announcement; written to the data directory
    /// before it takes effect. A rotation whose switch has passed is finished first.
    pub fn rotate(&self, overlap_ms: u64) -> Result<(String, u64), RotateError> {
        let mut held = self.state.write().unwrap_or_else(|p| p.into_inner());
        let now = self.clock.now_ms();
        let mut s = Arc::clone(&held);
        if let Some(n) = &s.next {
            if !s.switched(now) {
                return Err(RotateError::InProgress {
                    fingerprint: n.held.ca.fingerprint().to_owned(),
                    switch_unix_ms: n.rotation.switch_unix_ms,
                });
            }
            // The switch has passed: the new CA becomes the current one, on disk too.
            self.dir.finish_rotation(now)?;
            let current = Held { ca: Arc::clone(&n.held.ca), server: Arc::clone(&n.held.server) };
            s = Arc::new(state(current, None)?);
            *held = Arc::clone(&s);
        }
        let ca = CertAuthority::generate()?;
        let (server_cert_pem, server_key_pem) = ca.issue_server_cert(&self.sans)?;
        let switch_unix_ms = now.saturating_add(overlap_ms);
        let message = outpost_protocol::ca_rotation_message(ca.fingerprint(), switch_unix_ms);
        let signature_hex = hex::encode(s.current.ca.sign(message.as_bytes())?);
        let rotation = Rotation { switch_unix_ms, signature_hex };
        let next = NextCa { ca, server_cert_pem, server_key_pem, rotation };
        self.dir.write_rotation(&next)?;
        let server = certified(&next.ca, &next.server_cert_pem, &next.server_key_pem)?;
        let fingerprint = next.ca.fingerprint().to_owned();
        let current = Held { ca: Arc::clone(&s.current.ca), server: Arc::clone(&s.current.server) };
        *held = Arc::new(state(current, Some((Held { ca: Arc::new(next.ca), server }, next.rotation)))?);
        Ok((fingerprint, switch_unix_ms))
    }

    fn client_verifier(&self) -> Arc<dyn ClientCertVerifier> {
        let s = self.snapshot();
        match &s.next {
            Some(n) if s.switched(self.clock.now_ms()) => Arc::clone(&n.alone),
            _ => Arc::clone(&s.both),
        }
    }
}

/// The TLS layer's view of an [`Authority`]: the server certificate to present and the client
/// certificates to accept, looked up on every handshake.
#[derive(Debug, Clone)]
pub struct Tls(pub Arc<Authority>);

impl ResolvesServerCert for Tls {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let s = self.0.snapshot();
        Some(match &s.next {
            Some(n) if s.switched(self.0.clock.now_ms()) => Arc::clone(&n.held.server),
            _ => Arc::clone(&s.current.server),
        })
    }
}

impl ClientCertVerifier for Tls {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // Operators and enrolling nodes connect without one; node routes require it.
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The accepted CAs change during a rotation; a node presents its one certificate anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.client_verifier().verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.client_verifier().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.client_verifier().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.client_verifier().supported_verify_schemes()
    }
}
