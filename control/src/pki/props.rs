//! Property tests of the enrollment and renewal CSR, the untrusted input the CA signs: whatever
//! a CSR asks for (any name, alternative names), the certificate issued names
//! exactly the node the control plane chose, is a client certificate and nothing else; and
//! bytes that are not a CSR are refused, never a panic. A longer run: `PROPTEST_CASES=20000
//! cargo test -p outpost-control --lib pki::props`.

use proptest::prelude::*;
use rcgen::{CertificateParams, DnType, KeyPair, SanType};

use super::{CertAuthority, PkiError, peer_cert, pem_to_der, san_names};

fn config(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

fn ca() -> &'static CertAuthority {
    static CA: std::sync::OnceLock<CertAuthority> = std::sync::OnceLock::new();
    CA.get_or_init(|| CertAuthority::generate().expect("CA"))
}

fn key() -> &'static KeyPair {
    static KEY: std::sync::OnceLock<KeyPair> = std::sync::OnceLock::new();
    KEY.get_or_init(|| KeyPair::generate().expect("key"))
}

proptest! {
    #![proptest_config(config(1_000))]

    #[test]
    fn a_csr_cannot_choose_what_it_is_issued(
        cn in "\\PC{0,40}",
        dns in prop::collection::vec("[a-z0-9.-]{1,20}", 0..3),
        node in "node-[0-9a-f]{32}",
    ) {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = dns.iter().filter_map(|d| d.clone().try_into().ok().map(SanType::DnsName)).collect();
        let csr = params.serialize_request(key()).expect("csr").pem().expect("pem");
        let issued = ca().issue_client_cert(&csr, &node).expect("a well-formed CSR is signed");
        let der = pem_to_der(&issued.pem, "issued").expect("der");
        prop_assert_eq!(peer_cert(&der).expect("peer").node_id, node, "named by the control plane");
        prop_assert!(san_names(&der).expect("sans").is_empty(), "no name the CSR asked for");
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("parse");
        prop_assert!(!cert.is_ca(), "never a CA");
        let eku = cert.extended_key_usage().expect("eku").expect("has an EKU").value;
        prop_assert!(eku.client_auth && !eku.server_auth, "a client certificate only");
    }

    #[test]
    fn bytes_that_are_not_a_csr_are_refused(
        body in prop::collection::vec(any::<u8>(), 0..600),
        armour in any::<bool>(),
    ) {
        let text = if armour {
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::STANDARD.encode(&body);
            format!("-----BEGIN CERTIFICATE REQUEST-----\n{b64}\n-----END CERTIFICATE REQUEST-----\n")
        } else {
            String::from_utf8_lossy(&body).into_owned()
        };
        prop_assert!(matches!(ca().issue_client_cert(&text, "node-1"), Err(PkiError::BadCsr(_))));
    }
}
