//! Reading certificates: PEM to DER, and the few fields the control plane looks at (the peer's
//! CN, SANs, issuer, expiry). Parsing only; nothing here decides trust, rustls does.

use std::collections::BTreeSet;
use std::net::IpAddr;

use rustls::pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use super::{PkiError, sha256_hex};

/// The identity a verified client certificate proves: its CN is the node id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    pub node_id: String,
    /// SHA-256 of the certificate (DER), hex.
    pub cert_sha256: String,
}

/// The first certificate in `pem`.
pub fn pem_to_der(pem: &str, what: &str) -> Result<CertificateDer<'static>, PkiError> {
    let bad = |reason: String| PkiError::BadPem { what: what.to_owned(), reason };
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .ok_or_else(|| bad("no CERTIFICATE block found".into()))?
        .map_err(|e| bad(e.to_string()))
}

/// Every certificate of `pem` (at least one).
pub fn pems_to_der(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let bad = |reason: String| PkiError::BadPem { what: what.to_owned(), reason };
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

fn parse<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>, PkiError> {
    X509Certificate::from_der(der)
        .map(|(_, cert)| cert)
        .map_err(|e| PkiError::BadCert { what: what.to_owned(), reason: e.to_string() })
}

/// The SubjectPublicKeyInfo of a certificate, DER.
pub(super) fn public_key_der(der: &[u8], what: &str) -> Result<Vec<u8>, PkiError> {
    Ok(parse(der, what)?.public_key().raw.to_vec())
}

/// The node identity in a client certificate that rustls has already verified.
pub fn peer_cert(der: &[u8]) -> Result<PeerCert, PkiError> {
    let cert = parse(der, "the client certificate")?;
    let cn = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).ok_or_else(|| {
        PkiError::BadCert { what: "the client certificate".into(), reason: "no common name".into() }
    })?;
    Ok(PeerCert { node_id: cn.to_owned(), cert_sha256: sha256_hex(der) })
}

/// Subject alternative names, normalised: IP addresses in canonical text form, DNS names
/// lowercased.
pub fn san_names(der: &[u8]) -> Result<BTreeSet<String>, PkiError> {
    let cert = parse(der, "the server certificate")?;
    let bad = |e: x509_parser::error::X509Error| PkiError::BadCert {
        what: "the server certificate".into(),
        reason: e.to_string(),
    };
    let mut names = BTreeSet::new();
    if let Some(san) = cert.subject_alternative_name().map_err(bad)? {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => {
                    names.insert(dns.to_ascii_lowercase());
                }
                GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        names.insert(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    Ok(names)
}

/// The raw DER of a certificate's subject and issuer names.
pub fn subject_and_issuer(der: &[u8]) -> Result<(Vec<u8>, Vec<u8>), PkiError> {
    let cert = parse(der, "the certificate")?;
    Ok((cert.subject().as_raw().to_vec(), cert.issuer().as_raw().to_vec()))
}

/// When the certificate expires, Unix seconds.
pub fn not_after_unix(der: &[u8]) -> Result<i64, PkiError> {
    Ok(parse(der, "the certificate")?.validity().not_after.timestamp())
}

/// A SAN as the server certificate would carry it (see [`san_names`]).
pub fn normalise_san(name: &str) -> String {
    match name.parse::<IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => name.to_ascii_lowercase(),
    }
}
