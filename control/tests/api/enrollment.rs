//! Enrollment: one-time, expiring tokens traded for a client certificate.

use std::time::Duration;

use outpost_control::pki;
use outpost_control::testing::TestServer;
use outpost_protocol::paths;
use reqwest::StatusCode;

use crate::support::{TestNode, assert_error, csr, enroll_request, https, org_and_token, post_json, submit};

#[tokio::test]
async fn a_node_enrolls_with_a_token_and_gets_a_certificate_naming_it() {
    let server = TestServer::start().await.expect("server");
    let (org_id, token) = org_and_token(&server).await;
    let node = TestNode::enroll(&server, &token).await;

    let e = &node.enrolled;
    assert_eq!(e.org_id, org_id);
    assert!(e.node_id.starts_with("node-"));
    assert_eq!(e.ca_pem, server.ca_pem());
    let der = pki::pem_to_der(&e.cert_pem, "node certificate").expect("PEM");
    let peer = pki::peer_cert(&der).expect("a certificate");
    assert_eq!(peer.node_id, e.node_id, "the CN is the node id, not what the CSR asked for");
    let op = server.operator().expect("operator");
    let org = op.list_orgs().await.expect("orgs").into_iter().find(|o| o.id == org_id).expect("the org");
    assert_eq!(e.org_signing_key, org.signing_key, "the node pins the org's job-signing key");

    let listed = op.node(&e.node_id).await.expect("node listed");
    assert_eq!(listed.cert_sha256, peer.cert_sha256);
    assert_eq!(listed.hostname, "edge-1.test");
    let audit = op.audit(100).await.expect("audit");
    assert!(audit.entries.iter().any(|a| a.action == "node.enrolled" && a.detail.contains(&e.node_id)));

    // The certificate works: the node can poll.
    assert!(node.poll(&[], 0).await.jobs.is_empty());
}

/// Work submitted between enrollment and the first heartbeat is shaped by what the agent
/// announced when it enrolled: a site-policy agent gets the submitter its policy checks, an
/// agent that announced nothing gets nothing it might refuse.
#[tokio::test]
async fn what_an_agent_announces_at_enrollment_shapes_work_sent_before_its_first_heartbeat() {
    let server = TestServer::start().await.expect("server");
    let op = server.operator().expect("operator");
    let (org_id, token) = org_and_token(&server).await;
    let announcing = Some(outpost_protocol::Announce::this_build());
    let new = TestNode::enroll_announcing(&server.url(), server.ca_pem(), &token, announcing).await;
    let older_token = op.create_token(&org_id, None).await.expect("token").token;
    let older = TestNode::enroll(&server, &older_token).await;

    for (node, stamped) in [(&new, true), (&older, false)] {
        let listed = op.node(node.id()).await.expect("node");
        assert!(listed.last_heartbeat.is_none(), "no heartbeat yet");
        assert_eq!(listed.announce().has(outpost_protocol::capability::SITE_POLICY), stamped);
        let job = submit(&op, node.id()).await;
        let offered = node.poll(&[], 0).await;
        let a = offered.jobs.iter().find(|a| a.job_id == job.job_id).expect("the job offered");
        let env: outpost_protocol::JobEnvelope = serde_json::from_str(&a.envelope.payload).expect("envelope");
        match env.submitter {
            Some(s) if stamped => {
                assert_eq!((s.role.as_deref(), s.org_id.as_str()), (Some("owner"), org_id.as_str()), "{s:?}")
            }
            None if !stamped => {}
            other => panic!("submitter {other:?} for a node that announced site-policy: {stamped}"),
        }
    }
}

#[tokio::test]
async fn a_replayed_token_is_refused_and_audited() {
    let server = TestServer::start().await.expect("server");
    let (_, token) = org_and_token(&server).await;
    let _first = TestNode::enroll(&server, &token).await;

    let anonymous = https(server.ca_pem(), None);
    let url = format!("{}{}", server.url(), paths::ENROLL);
    let got = post_json(&anonymous, &url, &enroll_request(&token, &csr().0)).await;
    assert_error(&got, StatusCode::UNAUTHORIZED, "token_used");
    assert!(got.1["message"].as_str().unwrap_or_default().contains("already used"), "{}", got.1);

    let op = server.operator().expect("operator");
    assert_eq!(op.nodes(None, None).await.expect("nodes").nodes.len(), 1, "the replay registered no node");
    let audit = op.audit(100).await.expect("audit");
    assert!(audit.entries.iter().any(|a| a.action == "enroll.rejected" && a.detail.contains("already used")));
}

#[tokio::test]
async fn an_expired_token_is_refused_with_its_own_message() {
    let server = TestServer::start().await.expect("server");
    let (_, token) = org_and_token(&server).await;
    server.clock().advance(Duration::from_secs(2 * 3600));

    let anonymous = https(server.ca_pem(), None);
    let url = format!("{}{}", server.url(), paths::ENROLL);
    let got = post_json(&anonymous, &url, &enroll_request(&token, &csr().0)).await;
    assert_error(&got, StatusCode::UNAUTHORIZED, "token_expired");
    assert!(got.1["message"].as_str().unwrap_or_default().contains("expired"), "{}", got.1);
    let audit = server.operator().expect("operator").audit(100).await.expect("audit");
    assert!(audit.entries.iter().any(|a| a.action == "enroll.rejected" && a.detail.contains("expired")));
}

#[tokio::test]
async fn an_unknown_token_is_refused() {
    let server = TestServer::start().await.expect("server");
    let anonymous = https(server.ca_pem(), None);
    let url = format!("{}{}", server.url(), paths::ENROLL);
    let got = post_json(&anonymous, &url, &enroll_request("opt_made_up", &csr().0)).await;
    assert_error(&got, StatusCode::UNAUTHORIZED, "token_unknown");
}

#[tokio::test]
async fn a_bad_csr_is_refused_without_spending_the_token() {
    let server = TestServer::start().await.expect("server");
    let (_, token) = org_and_token(&server).await;
    let anonymous = https(server.ca_pem(), None);
    let url = format!("{}{}", server.url(), paths::ENROLL);
    let got = post_json(&anonymous, &url, &enroll_request(&token, "not a CSR")).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "bad_csr");
    let node = TestNode::enroll(&server, &token).await;
    assert!(node.id().starts_with("node-"));
}

#[tokio::test]
async fn the_server_presents_its_ca_in_the_chain_for_fingerprint_pinning() {
    let server = TestServer::start().await.expect("server");
    let config = outpost_control::tls::client_config(server.ca_pem(), None).expect("TLS config");
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(server.addr()).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let tls = connector.connect(name, tcp).await.expect("TLS 1.3 handshake");
    let (_, conn) = tls.get_ref();
    assert_eq!(conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    let chain = conn.peer_certificates().expect("a chain");
    assert_eq!(chain.len(), 2, "[leaf, CA]");
    assert_eq!(pki::sha256_hex(chain[1].as_ref()), server.ca_fingerprint());
}

fn offline_request(id: &str) -> outpost_protocol::OfflineEnrollRequest {
    let (csr_pem, _) = csr();
    outpost_protocol::OfflineEnrollRequest {
        format: outpost_protocol::OFFLINE_FORMAT,
        request_id: id.into(),
        csr_pem,
        hostname: "air-1.test".into(),
        agent_version: "0.0.0-test".into(),
        created_unix_ms: 1,
        heartbeat: Some(super::support::description(("site", "icu"))),
    }
}

#[tokio::test]
async fn an_offline_request_enrolls_its_node_once_and_the_file_is_signed_by_the_org() {
    let server = TestServer::start().await.expect("server");
    let (org_id, _) = org_and_token(&server).await;
    let op = server.operator().expect("operator");
    let params = outpost_protocol::OfflineEnrollParams {
        request: offline_request("0123456789abcdef0123456789abcdef"),
        control_url: "https://control.test:8443".into(),
    };
    let signed = op.enroll_offline(&org_id, &params).await.expect("enrolled");
    let offline: outpost_protocol::OfflineEnrollment =
        serde_json::from_str(&signed.payload).expect("payload");
    assert_eq!(offline.request_id, params.request.request_id);
    assert_eq!(offline.control_url, "https://control.test:8443");
    let e = &offline.enrollment;
    assert_eq!(signed.key_id, e.org_signing_key.key_id, "signed by the org key it carries");
    let listed = op.node(&e.node_id).await.expect("node listed");
    assert_eq!(listed.hostname, "air-1.test");
    // Its facts stand for a first heartbeat: selectors and deployments see it, offline.
    assert!(listed.announce().has(outpost_protocol::capability::SERVICES));
    assert!(listed.last_seen_unix_ms.is_none(), "never seen online");
    let icu = op.nodes(Some("site=icu"), Some(&org_id)).await.expect("nodes");
    assert_eq!(icu.nodes.iter().map(|n| n.node_id.as_str()).collect::<Vec<_>>(), [e.node_id.as_str()]);
    let mut bad_labels = params.clone();
    bad_labels.request.request_id = "abcdefabcdefabcdefabcdefabcdef00".into();
    if let Some(hb) = bad_labels.request.heartbeat.as_mut() {
        hb.labels.insert("not a key!".into(), "x".into());
    }
    let refused = op.enroll_offline(&org_id, &bad_labels).await.expect_err("bad labels");
    assert!(refused.to_string().contains("bad_labels"), "{refused}");

    let again = op.enroll_offline(&org_id, &params).await.expect_err("a request is usable once");
    assert!(again.to_string().contains("request_used"), "{again}");
    let mut bad = params.clone();
    bad.request.request_id = "../../x".into();
    assert!(op.enroll_offline(&org_id, &bad).await.is_err());
    let mut unknown_org = params.clone();
    unknown_org.request.request_id = "fedcba9876543210fedcba9876543210".into();
    assert!(op.enroll_offline("org-nope", &unknown_org).await.is_err());
    let audit = op.audit(100).await.expect("audit");
    assert!(audit.entries.iter().any(|a| a.action == "node.enrolled" && a.detail.contains(&e.node_id)));
    assert!(audit.entries.iter().any(|a| a.action == "enroll.rejected" && a.detail.contains("used again")));
}
