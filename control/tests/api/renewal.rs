//! Certificate renewal over mutual TLS: an agent that announces `cert-renewal` is given a
//! short-lived certificate and trades it for a new one (a new key), the old one stays accepted
//! until the new one is used and is refused after, and a revocation covers both.

use outpost_control::testing::TestServer;
use outpost_protocol::{
    Announce, PollRequest, RenewCertificateRequest, RenewCertificateResponse, capability, paths,
};
use reqwest::StatusCode;

use crate::support::{TestNode, assert_error, csr, https, op_post, org_and_token, post_json};

/// Days between now and the certificate's end.
fn days_left(cert_pem: &str) -> i64 {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).expect("PEM");
    let cert = pem.parse_x509().expect("certificate");
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64;
    (cert.validity().not_after.timestamp() - now) / 86_400
}

#[tokio::test]
async fn an_agent_that_renews_gets_a_month_and_an_older_one_a_year() {
    let server = TestServer::start().await.expect("server");
    let (org_id, token) = org_and_token(&server).await;
    let renews = TestNode::enroll_current(&server, server.ca_pem(), &token).await;
    assert!(Announce::this_build().has(capability::CERT_RENEWAL));
    assert!(
        (29..=30).contains(&days_left(&renews.enrolled.cert_pem)),
        "{}",
        days_left(&renews.enrolled.cert_pem)
    );
    let op = server.operator().expect("operator");
    let second = op.create_token(&org_id, None).await.expect("token");
    let old = TestNode::enroll(&server, &second.token).await;
    assert!(
        (364..=365).contains(&days_left(&old.enrolled.cert_pem)),
        "{}",
        days_left(&old.enrolled.cert_pem)
    );
}

#[tokio::test]
async fn a_renewed_certificate_replaces_the_old_one_once_it_is_used() {
    let server = TestServer::start().await.expect("server");
    let (_, token) = org_and_token(&server).await;
    let node = TestNode::enroll_current(&server, server.ca_pem(), &token).await;
    node.poll(&[], 0).await;

    // A CSR that is not one is refused, and nothing changes.
    let bad = RenewCertificateRequest { csr_pem: "not a CSR".into() };
    assert_error(&node.post(paths::NODE_CERTIFICATE, &bad).await, StatusCode::BAD_REQUEST, "bad_csr");

    let (csr_pem, key_pem) = csr();
    let (status, body) = node.post(paths::NODE_CERTIFICATE, &RenewCertificateRequest { csr_pem }).await;
    assert_eq!(status, StatusCode::OK, "renew: {body}");
    let renewed: RenewCertificateResponse = serde_json::from_value(body).expect("a RenewCertificateResponse");
    assert!((29..=30).contains(&days_left(&renewed.cert_pem)));
    let (_, pem) = x509_parser::pem::parse_x509_pem(renewed.cert_pem.as_bytes()).expect("PEM");
    let cn = pem
        .parse_x509()
        .expect("cert")
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok().map(str::to_owned));
    assert_eq!(cn.as_deref(), Some(node.id()), "the certificate names the node, whatever the CSR asked");

    // The old certificate still works (a renewal lost on the way locks nobody out)...
    node.poll(&[], 0).await;
    // ...until the new one is used; then only the new one.
    let new = https(server.ca_pem(), Some((&renewed.cert_pem, &key_pem)));
    let url = format!("{}{}", server.url(), paths::NODE_POLL);
    let now = PollRequest { wait_secs: Some(0), ..Default::default() };
    let (status, body) = post_json(&new, &url, &now).await;
    assert_eq!(status, StatusCode::OK, "the renewed certificate: {body}");
    let fresh_old = https(server.ca_pem(), Some((&node.enrolled.cert_pem, &node.key_pem)));
    let got = post_json(&fresh_old, &url, &now).await;
    assert_error(&got, StatusCode::FORBIDDEN, "cert_mismatch");

    let op = server.operator().expect("operator");
    let audit = op.audit(100).await.expect("audit");
    assert_eq!(audit.entries.iter().filter(|e| e.action == "node.certificate_renewed").count(), 1);
    let listed = op.node(node.id()).await.expect("node");
    assert_eq!(listed.previous_cert_sha256, None, "retired once the new one was used");

    // Renewed again from the new one, then revoked before switching: both are refused.
    let (csr_pem, newest_key) = csr();
    let (status, body) = post_json(
        &new,
        &format!("{}{}", server.url(), paths::NODE_CERTIFICATE),
        &RenewCertificateRequest { csr_pem },
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let newest: RenewCertificateResponse = serde_json::from_value(body).expect("response");
    let (status, _) =
        op_post(&server, &paths::NODE_REVOKE.replace("{node_id}", node.id()), &serde_json::json!(null)).await;
    assert_eq!(status, StatusCode::OK);
    let again = https(server.ca_pem(), Some((&renewed.cert_pem, &key_pem)));
    assert!(again.post(&url).json(&PollRequest::default()).send().await.is_err(), "the previous one");
    let latest = https(server.ca_pem(), Some((&newest.cert_pem, &newest_key)));
    assert!(latest.post(&url).json(&PollRequest::default()).send().await.is_err(), "and the current one");
}
