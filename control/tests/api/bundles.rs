//! Bundles for air-gapped nodes: the signed manifest names each target node with a counter
//! that only grows, each job is created once per node (queued, as if submitted); a node's
//! signed results are stored exactly once however often they are imported, and only when the
//! node's own enrolled key signed them.

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use outpost_control::testing::TestServer;
use outpost_protocol::{
    BundleFile, BundleManifest, BundleRequest, BundleResponse, JobState, PartKind, ResultsAck, ResultsBundle,
    ResultsImport, ResultsPayload, SignedEnvelope, paths,
};
use reqwest::StatusCode;

use super::support::{TestNode, op_post, org_and_token, spec, succeeded};

fn request(nodes: &[&str]) -> BundleRequest {
    BundleRequest {
        nodes: nodes.iter().map(|s| (*s).to_owned()).collect(),
        selector: None,
        files: vec![BundleFile {
            kind: PartKind::Image,
            size: 10,
            sha256: "ab".repeat(32),
            label: "img.tar".into(),
        }],
        jobs: vec![spec().into()],
        deployments: Vec::new(),
        expires_in_secs: Some(3600),
        recipients: Vec::new(),
    }
}

fn verify(node: &TestNode, env: &SignedEnvelope) -> String {
    let key = &node.enrolled.org_signing_key;
    assert_eq!(env.key_id, key.key_id);
    let bytes: [u8; 32] = hex::decode(&key.ed25519_hex).expect("hex").try_into().expect("32");
    let sig: [u8; 64] = hex::decode(&env.signature_hex).expect("hex").try_into().expect("64");
    VerifyingKey::from_bytes(&bytes)
        .expect("key")
        .verify(env.payload.as_bytes(), &Signature::from_bytes(&sig))
        .expect("the org key signed it");
    env.payload.clone()
}

async fn bundle(server: &TestServer, org: &str, req: &BundleRequest) -> BundleResponse {
    let (status, body) = op_post(server, &paths::fill(paths::ORG_BUNDLES, "org_id", org), req).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    serde_json::from_value(body).expect("BundleResponse")
}

#[tokio::test]
async fn a_bundle_is_signed_for_its_nodes_with_growing_counters_and_queued_jobs() {
    let server = TestServer::start().await.expect("server");
    let op = server.operator().expect("operator");
    let (org, token) = org_and_token(&server).await;
    let a = TestNode::enroll(&server, &token).await;
    let token2 = op.create_token(&org, None).await.expect("token");
    let b = TestNode::enroll(&server, &token2.token).await;

    let first = bundle(&server, &org, &request(&[a.id(), b.id()])).await;
    let m: BundleManifest = serde_json::from_str(&verify(&a, &first.manifest)).expect("manifest");
    m.check().expect("a well-formed manifest");
    assert_eq!(m.counters.len(), 2);
    assert_eq!(m.parts.len(), 3, "one file, one job per node");
    assert_eq!(first.parts[0], None, "the caller packs its own files");
    assert_eq!(first.jobs.len(), 2);
    for (part, body) in m.parts.iter().zip(&first.parts).skip(1) {
        let body = body.as_ref().expect("a made part");
        assert_eq!(part.kind, PartKind::Job);
        assert_eq!(part.size, body.len() as u64);
        let a: outpost_protocol::JobAssignment = serde_json::from_str(body).expect("an assignment");
        let job = op.job(&a.job_id).await.expect("job");
        assert_eq!(job.state, JobState::Queued);
        assert_eq!(Some(&job.node_id), part.node_id.as_ref());
    }

    let second = bundle(&server, &org, &request(&[a.id()])).await;
    let m2: BundleManifest = serde_json::from_str(&second.manifest.payload).expect("manifest");
    assert!(m2.counters[a.id()] > m.counters[a.id()], "counters only grow");
}

#[tokio::test]
async fn bad_bundle_requests_are_refused_with_a_reason() {
    let server = TestServer::start().await.expect("server");
    let (org, token) = org_and_token(&server).await;
    let a = TestNode::enroll(&server, &token).await;
    let path = paths::fill(paths::ORG_BUNDLES, "org_id", &org);
    let mut none = request(&[]);
    none.nodes.clear();
    assert_eq!(op_post(&server, &path, &none).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(op_post(&server, &path, &request(&["node-unknown"])).await.0, StatusCode::NOT_FOUND);
    let mut bad_digest = request(&[a.id()]);
    bad_digest.files[0].sha256 = "XYZ".into();
    assert_eq!(op_post(&server, &path, &bad_digest).await.0, StatusCode::BAD_REQUEST);
    let mut forever = request(&[a.id()]);
    forever.expires_in_secs = Some(10 * 365 * 24 * 3600);
    assert_eq!(op_post(&server, &path, &forever).await.0, StatusCode::BAD_REQUEST);
    let other = paths::fill(paths::ORG_BUNDLES, "org_id", "org-nope");
    assert_eq!(op_post(&server, &other, &request(&[a.id()])).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_bundles_jobs_seal_for_its_recipients_and_only_agents_that_seal_get_them() {
    let server = TestServer::start().await.expect("server");
    let op = server.operator().expect("operator");
    let (org, token) = org_and_token(&server).await;
    let announce = Some(outpost_protocol::Announce::this_build());
    let sealing = TestNode::enroll_announcing(&server.url(), server.ca_pem(), &token, announce).await;
    let older = TestNode::enroll(&server, &op.create_token(&org, None).await.expect("token").token).await;
    let path = paths::fill(paths::ORG_BUNDLES, "org_id", &org);
    let recipient = super::support::AGE_RECIPIENT;

    let bad = BundleRequest { recipients: vec!["age1nope".into()], ..request(&[sealing.id()]) };
    let got = op_post(&server, &path, &bad).await;
    assert_eq!(got.0, StatusCode::BAD_REQUEST, "{}", got.1);
    assert_eq!(got.1["code"], "bad_recipient", "{}", got.1);
    let to_older =
        BundleRequest { recipients: vec![recipient.into()], ..request(&[sealing.id(), older.id()]) };
    let got = op_post(&server, &path, &to_older).await;
    assert_eq!(got.0, StatusCode::CONFLICT, "{}", got.1);
    assert!(got.1["message"].as_str().unwrap_or_default().contains(older.id()), "{}", got.1);
    let all = outpost_control::client::JobsQuery { node_id: None, state: None, group_id: None, limit: 100 };
    assert!(op.jobs(&all).await.expect("jobs").jobs.is_empty(), "nothing queued");

    let made = bundle(
        &server,
        &org,
        &BundleRequest { recipients: vec![recipient.into()], ..request(&[sealing.id()]) },
    )
    .await;
    let a: outpost_protocol::JobAssignment =
        serde_json::from_str(made.parts[1].as_ref().expect("the job part")).expect("assignment");
    let env: outpost_protocol::JobEnvelope = serde_json::from_str(&a.envelope.payload).expect("envelope");
    assert_eq!(env.recipients, [recipient]);
}

/// A results bundle signed with `key_pem` (PKCS#8 P-256), as `outpost bundle export-results` writes it.
fn results_bundle(node: &TestNode, key_pem: &str, cert_pem: &str, payload: &ResultsPayload) -> ResultsBundle {
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
    let text = serde_json::to_string(payload).expect("payload");
    let (_, pem) = x509_parser::pem::parse_x509_pem(key_pem.as_bytes()).expect("pem");
    let der = pem.contents;
    let rng = ring::rand::SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &der, &rng).expect("key");
    let sig = key.sign(&rng, text.as_bytes()).expect("sign");
    let _ = node;
    ResultsBundle { payload: text, cert_pem: cert_pem.to_owned(), signature_hex: hex::encode(sig.as_ref()) }
}

#[tokio::test]
async fn results_from_a_bundle_are_stored_once_and_acknowledged_only_for_their_own_node() {
    let server = TestServer::start().await.expect("server");
    let op = server.operator().expect("operator");
    let (org, token) = org_and_token(&server).await;
    let node = TestNode::enroll(&server, &token).await;
    let token2 = op.create_token(&org, None).await.expect("token");
    let other = TestNode::enroll(&server, &token2.token).await;
    let made = bundle(&server, &org, &request(&[node.id()])).await;
    let job_id = made.jobs[0].job_id.clone();

    let payload = ResultsPayload {
        format: outpost_protocol::BUNDLE_FORMAT,
        bundle_id: "r1".into(),
        node_id: node.id().to_owned(),
        org_id: org.clone(),
        created_unix_ms: 1,
        results: vec![succeeded(&job_id, "carried by hand\n")],
        events: Vec::new(),
        service_reports: Vec::new(),
        service_acks: Vec::new(),
        heartbeat: None,
        audit: Vec::new(),
    };
    let signed = results_bundle(&node, &node.key_pem, &node.enrolled.cert_pem, &payload);
    let (status, body) = op_post(&server, paths::BUNDLE_RESULTS, &signed).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let got: ResultsImport = serde_json::from_value(body).expect("ResultsImport");
    assert_eq!(got.stored, vec![format!("{job_id}/1")]);
    let job = op.job(&job_id).await.expect("job");
    assert_eq!(job.state, JobState::Finished);
    assert_eq!(job.result.expect("result").stdout_tail, "carried by hand\n");

    // The acknowledgement: a bundle for this node alone, carrying the signed receipt.
    let ack_manifest: BundleManifest =
        serde_json::from_str(&verify(&node, &got.ack.manifest)).expect("manifest");
    assert_eq!(ack_manifest.counters.keys().collect::<Vec<_>>(), [node.id()]);
    assert_eq!(ack_manifest.parts[0].kind, PartKind::ResultsAck);
    let env: SignedEnvelope =
        serde_json::from_str(got.ack.parts[0].as_ref().expect("ack")).expect("envelope");
    let ack: ResultsAck = serde_json::from_str(&verify(&node, &env)).expect("ack");
    assert_eq!(ack.results, vec![format!("{job_id}/1")]);
    assert_eq!(ack_manifest.counters[node.id()], 0, "an acknowledgement takes no counter: any order works");

    // Again: nothing new is stored, and it is acknowledged again.
    let (status, body) = op_post(&server, paths::BUNDLE_RESULTS, &signed).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let again: ResultsImport = serde_json::from_value(body).expect("ResultsImport");
    assert!(again.stored.is_empty());
    assert_eq!(again.duplicates, vec![format!("{job_id}/1")]);
    let audit = op.audit(200).await.expect("audit");
    let stored =
        audit.entries.iter().filter(|e| e.action == "job.result" && e.detail.contains(&job_id)).count();
    assert_eq!(stored, 1, "stored once");

    // A result for a job this node never had is refused, and acknowledged as refused so that
    // the node drops it instead of carrying it for ever.
    let mut stray = payload.clone();
    stray.bundle_id = "r2".into();
    stray.results = vec![succeeded("job-that-never-was", "")];
    let signed_stray = results_bundle(&node, &node.key_pem, &node.enrolled.cert_pem, &stray);
    let (status, body) = op_post(&server, paths::BUNDLE_RESULTS, &signed_stray).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let got: ResultsImport = serde_json::from_value(body).expect("ResultsImport");
    assert_eq!(got.refused.len(), 1, "{got:?}");
    let env: SignedEnvelope =
        serde_json::from_str(got.ack.parts[0].as_ref().expect("ack")).expect("envelope");
    let ack: ResultsAck = serde_json::from_str(&verify(&node, &env)).expect("ack");
    assert_eq!(ack.refused, vec!["job-that-never-was/1".to_owned()]);

    // Signed by another node's key, or claiming to be another node: refused.
    let forged = results_bundle(&other, &other.key_pem, &other.enrolled.cert_pem, &payload);
    let (status, body) = op_post(&server, paths::BUNDLE_RESULTS, &forged).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let mut tampered = signed.clone();
    tampered.payload = tampered.payload.replace("carried by hand", "carried by some");
    assert_eq!(op_post(&server, paths::BUNDLE_RESULTS, &tampered).await.0, StatusCode::FORBIDDEN);
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn audit_chain(n: u64) -> Vec<outpost_protocol::AuditRecord> {
    let mut out: Vec<outpost_protocol::AuditRecord> = Vec::new();
    for i in 0..n {
        out.push(outpost_protocol::AuditRecord::following(
            out.last(),
            10 + i,
            "job.accepted",
            &format!("job {i}"),
        ));
    }
    out
}

#[tokio::test]
async fn relay_events_and_service_reports_from_a_bundle_are_stored_once_and_acknowledged_by_seq() {
    let server = TestServer::start().await.expect("server");
    let op = server.operator().expect("operator");
    let (org, token) = org_and_token(&server).await;
    let node = TestNode::enroll(&server, &token).await;
    let report = outpost_protocol::ServiceReport {
        seq: 1,
        service: "web".into(),
        deployment: "web".into(),
        revision: 1,
        state: outpost_protocol::ServiceState::Healthy,
        restarts: 0,
        last_exit: None,
        health_output: String::new(),
        message: None,
        unix_ms: 1,
    };
    let payload = ResultsPayload {
        format: outpost_protocol::BUNDLE_FORMAT,
        bundle_id: "r-events".into(),
        node_id: node.id().to_owned(),
        org_id: org.clone(),
        created_unix_ms: now_ms(),
        results: Vec::new(),
        events: vec![
            super::support::object_event(2, "in/b.json"),
            super::support::object_event(1, "in/a.json"),
        ],
        service_reports: vec![report],
        service_acks: vec![outpost_protocol::ServiceAck { service: "web".into(), seq: 7 }],
        heartbeat: Some(super::support::description(("ward", "b"))),
        audit: audit_chain(3),
    };
    let signed = results_bundle(&node, &node.key_pem, &node.enrolled.cert_pem, &payload);
    for round in 0..2 {
        let (status, body) = op_post(&server, paths::BUNDLE_RESULTS, &signed).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let got: ResultsImport = serde_json::from_value(body).expect("ResultsImport");
        assert_eq!(got.events_stored, if round == 0 { 2 } else { 0 }, "stored once: {got:?}");
        assert_eq!((got.events_up_to_seq, got.service_reports_up_to_seq), (2, 1));
        let env: SignedEnvelope =
            serde_json::from_str(got.ack.parts[0].as_ref().expect("ack")).expect("envelope");
        let ack: ResultsAck = serde_json::from_str(&verify(&node, &env)).expect("ack");
        assert_eq!((ack.events_up_to_seq, ack.service_reports_up_to_seq), (2, 1));
        assert_eq!((got.audit_stored, got.audit_up_to_seq), (if round == 0 { 3 } else { 0 }, 3));
        assert_eq!(ack.audit_up_to_seq, 3);
        assert_eq!(ack.service_acks, payload.service_acks, "the node's acknowledgements are echoed");
    }
    // The node's audit log is kept, link by link; a bundle that skips entries adds none.
    let log = op.node_audit(node.id(), 0).await.expect("node audit");
    assert_eq!(log.entries, payload.audit);
    let mut gap = payload.clone();
    gap.bundle_id = "r-gap".into();
    gap.audit = audit_chain(6)[4..].to_vec();
    let signed_gap = results_bundle(&node, &node.key_pem, &node.enrolled.cert_pem, &gap);
    let (status, body) = op_post(&server, paths::BUNDLE_RESULTS, &signed_gap).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let got: ResultsImport = serde_json::from_value(body).expect("ResultsImport");
    assert_eq!((got.audit_stored, got.audit_up_to_seq), (0, 3));
    assert!(
        got.refused.iter().any(|(what, why)| what == "audit" && why.contains("4..4 are missing")),
        "{got:?}"
    );
    // The node's description came with it (a bundle from before an online heartbeat would not).
    let listed = op.node(node.id()).await.expect("node");
    assert_eq!(listed.effective_labels().get("ward").map(String::as_str), Some("b"));
    let q =
        outpost_control::client::EventsQuery { node_id: Some(node.id().to_owned()), ..Default::default() };
    let listed = op.events(&q).await.expect("events");
    let keys: Vec<&str> = listed.events.iter().map(|e| e.event.key.as_str()).collect();
    assert_eq!(keys, ["in/a.json", "in/b.json"]);
}

/// A deployment travels as the desired state its rollout signed for each target node: for a
/// node enrolled offline (its request's facts announce what its agent runs) the rollout reaches
/// it without waiting, since an offline node never holds a batch; a node whose agent has not
/// said it runs services gets no bundle, and the error says why.
#[tokio::test]
async fn a_deployment_travels_as_the_desired_state_signed_for_each_node() {
    use outpost_protocol::{BatchSize, DeployRequest, RolloutPolicy, ServiceEnvelope};
    let server = TestServer::start().await.expect("server");
    let op = server.operator().expect("operator");
    let (org, token) = org_and_token(&server).await;
    let mute = TestNode::enroll(&server, &token).await;
    let (csr_pem, _) = super::support::csr();
    let hb = super::support::description(("site", "icu"));
    let params = outpost_protocol::OfflineEnrollParams {
        request: outpost_protocol::OfflineEnrollRequest {
            format: outpost_protocol::OFFLINE_FORMAT,
            request_id: "00112233445566778899aabbccddeeff".into(),
            csr_pem,
            hostname: "air.test".into(),
            agent_version: "test".into(),
            created_unix_ms: now_ms(),
            heartbeat: Some(hb),
        },
        control_url: String::new(),
    };
    let signed = op.enroll_offline(&org, &params).await.expect("offline enrollment");
    let air: outpost_protocol::OfflineEnrollment = serde_json::from_str(&signed.payload).expect("payload");
    let air_id = air.enrollment.node_id;
    let spec = serde_json::from_value(serde_json::json!({
        "image": format!("sha256:{}", "cd".repeat(32)),
        "command": ["sh", "-c", "sleep 3600"],
    }))
    .expect("spec");
    let deploy = DeployRequest {
        name: "viewer".into(),
        org_id: org.clone(),
        selector: "site=icu".into(),
        service: None,
        spec,
        priority: 0,
        rollout: RolloutPolicy {
            batch: BatchSize::Nodes(1),
            health_timeout_secs: 30,
            abort_on_failures: 1,
            max_unavailable: None,
        },
    };
    op.deploy(&org, &deploy).await.expect("deploy");

    let req = BundleRequest {
        nodes: vec![air_id.clone()],
        selector: None,
        files: Vec::new(),
        jobs: Vec::new(),
        deployments: vec!["viewer".into()],
        expires_in_secs: None,
        recipients: Vec::new(),
    };
    let made = bundle(&server, &org, &req).await;
    let m: BundleManifest = serde_json::from_str(&made.manifest.payload).expect("manifest");
    assert_eq!(m.parts.len(), 1, "{m:?}");
    assert_eq!((m.parts[0].kind, m.parts[0].node_id.as_deref()), (PartKind::Service, Some(air_id.as_str())));
    let env: SignedEnvelope = serde_json::from_str(made.parts[0].as_ref().expect("made")).expect("envelope");
    assert_eq!(env.key_id, air.enrollment.org_signing_key.key_id);
    let desired: ServiceEnvelope = serde_json::from_str(&env.payload).expect("service envelope");
    assert_eq!(
        (desired.node_id.as_str(), desired.deployment.as_str(), desired.revision),
        (air_id.as_str(), "viewer", 1)
    );
    assert!(desired.spec.is_some());

    // The online-enrolled node never announced services: no desired state, and why.
    let mut other = req.clone();
    other.nodes = vec![mute.id().to_owned()];
    let (status, body) = op_post(&server, &paths::fill(paths::ORG_BUNDLES, "org_id", &org), &other).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.to_string().contains("no_desired_state"), "{body}");
    let mut unknown = req.clone();
    unknown.deployments = vec!["nope".into()];
    let (status, _) = op_post(&server, &paths::fill(paths::ORG_BUNDLES, "org_id", &org), &unknown).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// Imports a results bundle from `node` that carries only `audit`, its audit entries.
pub(crate) async fn import_audit(
    server: &TestServer,
    node: &TestNode,
    org_id: &str,
    bundle_id: &str,
    audit: Vec<outpost_protocol::AuditRecord>,
) {
    let payload = ResultsPayload {
        format: outpost_protocol::BUNDLE_FORMAT,
        bundle_id: bundle_id.into(),
        node_id: node.id().to_owned(),
        org_id: org_id.to_owned(),
        created_unix_ms: now_ms(),
        results: Vec::new(),
        events: Vec::new(),
        service_reports: Vec::new(),
        service_acks: Vec::new(),
        heartbeat: None,
        audit,
    };
    let signed = results_bundle(node, &node.key_pem, &node.enrolled.cert_pem, &payload);
    let (status, body) = op_post(server, paths::BUNDLE_RESULTS, &signed).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
