//! Who may call what: node routes need the enrolled client certificate, operator routes the
//! admin bearer token, and the TLS layer speaks only TLS 1.3.

use std::sync::Arc;

use outpost_control::data_dir::DataDir;
use outpost_control::testing::TestServer;
use outpost_protocol::{PollRequest, paths};
use reqwest::StatusCode;

use crate::support::{TestNode, answer, assert_error, csr, https, org_and_token, post_json};

#[tokio::test]
async fn node_routes_without_a_client_certificate_answer_401() {
    let server = TestServer::start().await.expect("server");
    let anonymous = https(server.ca_pem(), None);
    for path in [paths::NODE_POLL, paths::NODE_RESULTS, paths::NODE_HEARTBEAT] {
        let got = post_json(&anonymous, &format!("{}{path}", server.url()), &serde_json::json!({})).await;
        assert_error(&got, StatusCode::UNAUTHORIZED, "client_cert_required");
    }
}

#[tokio::test]
async fn operator_routes_need_the_right_admin_token() {
    let server = TestServer::start().await.expect("server");
    let http = https(server.ca_pem(), None);
    let url = format!("{}{}", server.url(), paths::NODES);

    let none = answer(http.get(&url).send().await.expect("sent")).await;
    assert_error(&none, StatusCode::UNAUTHORIZED, "unauthenticated");
    let wrong = answer(http.get(&url).bearer_auth("0".repeat(64)).send().await.expect("sent")).await;
    assert_error(&wrong, StatusCode::UNAUTHORIZED, "bad_token");
    let right = answer(http.get(&url).bearer_auth(server.admin_token()).send().await.expect("sent")).await;
    assert_eq!(right.0, StatusCode::OK, "{}", right.1);
    // The enrollment token is not an admin token either.
    let (_, token) = org_and_token(&server).await;
    let enrollment = answer(http.get(&url).bearer_auth(token).send().await.expect("sent")).await;
    assert_error(&enrollment, StatusCode::UNAUTHORIZED, "bad_token");
}

#[tokio::test]
async fn health_and_the_openapi_document_need_no_credentials() {
    let server = TestServer::start().await.expect("server");
    let http = https(server.ca_pem(), None);
    for path in [paths::HEALTH, paths::OPENAPI] {
        let got = answer(http.get(format!("{}{path}", server.url())).send().await.expect("sent")).await;
        assert_eq!(got.0, StatusCode::OK, "{path}: {}", got.1);
    }
}

#[tokio::test]
async fn a_certificate_of_our_ca_for_an_unknown_node_answers_403() {
    let server = TestServer::start().await.expect("server");
    let ca = DataDir::new(server.data_dir()).read_ca().expect("CA");
    let (csr_pem, key_pem) = csr();
    let ghost = ca.issue_client_cert(&csr_pem, "node-ghost").expect("certificate");
    let http = https(server.ca_pem(), Some((&ghost.pem, &key_pem)));
    let url = format!("{}{}", server.url(), paths::NODE_POLL);
    let got = post_json(&http, &url, &PollRequest::default()).await;
    assert_error(&got, StatusCode::FORBIDDEN, "unknown_node");
    let audit = server.operator().expect("operator").audit(100).await.expect("audit");
    assert!(audit.entries.iter().any(|e| e.action == "node.refused" && e.actor == "node:node-ghost"));
}

#[tokio::test]
async fn a_second_certificate_for_an_enrolled_node_answers_403() {
    let server = TestServer::start().await.expect("server");
    let (_, token) = org_and_token(&server).await;
    let node = TestNode::enroll(&server, &token).await;
    let ca = DataDir::new(server.data_dir()).read_ca().expect("CA");
    let (csr_pem, key_pem) = csr();
    let other = ca.issue_client_cert(&csr_pem, node.id()).expect("certificate");
    let http = https(server.ca_pem(), Some((&other.pem, &key_pem)));
    let url = format!("{}{}", server.url(), paths::NODE_POLL);
    let got = post_json(&http, &url, &PollRequest::default()).await;
    assert_error(&got, StatusCode::FORBIDDEN, "cert_mismatch");
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused_in_the_handshake() {
    let server = TestServer::start().await.expect("server");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["intruder".into()])
        .expect("params")
        .self_signed(&key)
        .expect("self-signed");
    let http = https(server.ca_pem(), Some((&cert.pem(), &key.serialize_pem())));
    let url = format!("{}{}", server.url(), paths::NODE_POLL);
    let result = http.post(&url).json(&PollRequest::default()).send().await;
    assert!(result.is_err(), "the server must refuse the handshake, got {result:?}");
}

#[tokio::test]
async fn tls_1_2_is_refused() {
    let server = TestServer::start().await.expect("server");
    let mut roots = rustls::RootCertStore::empty();
    let ca = outpost_control::pki::pem_to_der(server.ca_pem(), "CA").expect("CA");
    roots.add(ca).expect("root");
    let config = rustls::ClientConfig::builder_with_provider(outpost_control::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .expect("TLS 1.2 config")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(server.addr()).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    assert!(connector.connect(name, tcp).await.is_err(), "a TLS 1.2 handshake must fail");
}
