//! Helpers shared by the API tests: raw HTTPS clients (CA pinned, TLS 1.3), a test node that
//! enrolls with a CSR made by rcgen and then speaks mutual TLS, and a valid job spec.

use std::time::Duration;

use outpost_control::client::Client;
use outpost_control::testing::TestServer;
use outpost_protocol::{
    ContainerSpec, CreateTriggerRequest, EnrollRequest, EnrollResponse, EventAck, EventBatch, EventMatch,
    JobInfo, ObjectEvent, Outcome, PollRequest, PollResponse, ResultReport, SubmitJobRequest, Timings, paths,
};
use reqwest::StatusCode;
use serde::Serialize;
use serde_json::Value;

/// An HTTPS client that trusts only the server's CA, optionally presenting a client identity.
pub fn https(ca_pem: &str, identity: Option<(&str, &str)>) -> reqwest::Client {
    let tls = outpost_control::tls::client_config(ca_pem, identity).expect("client TLS config");
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("reqwest client")
}

/// POSTs `body` as JSON; returns the status and the JSON answer (Null when not JSON).
pub async fn post_json(http: &reqwest::Client, url: &str, body: &impl Serialize) -> (StatusCode, Value) {
    let resp = http.post(url).json(body).send().await.expect("request sent");
    answer(resp).await
}

/// POST `body` to `path` as the operator (the admin token).
pub async fn op_post(server: &TestServer, path: &str, body: &impl Serialize) -> (StatusCode, Value) {
    let resp = https(server.ca_pem(), None)
        .post(format!("{}{path}", server.url()))
        .bearer_auth(server.admin_token())
        .json(body)
        .send()
        .await
        .expect("request sent");
    answer(resp).await
}

/// GET `path_and_query` as the operator (the admin token).
pub async fn op_get(server: &TestServer, path_and_query: &str) -> (StatusCode, Value) {
    let resp = https(server.ca_pem(), None)
        .get(format!("{}{path_and_query}", server.url()))
        .bearer_auth(server.admin_token())
        .send()
        .await
        .expect("request sent");
    answer(resp).await
}

pub async fn answer(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    let bytes = resp.bytes().await.expect("body read");
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// Asserts an error answer: the status and the `ErrorBody` code.
pub fn assert_error(got: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(got.0, status, "answer: {}", got.1);
    assert_eq!(got.1["code"], code, "answer: {}", got.1);
    assert!(
        got.1["message"].as_str().is_some_and(|m| !m.is_empty()),
        "an ErrorBody with a message: {}",
        got.1
    );
}

/// A fresh organisation and a one-time token for it.
pub async fn org_and_token(server: &TestServer) -> (String, String) {
    let op = server.operator().expect("operator client");
    let org = op.create_org("clinic-test").await.expect("org created");
    let token = op.create_token(&org.id, None).await.expect("token created");
    (org.id, token.token)
}

/// A CSR for a fresh P-256 key: `(csr_pem, key_pem)`.
pub fn csr() -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(rcgen::DnType::CommonName, "asks-for-any-name");
    let csr = params.serialize_request(&key).expect("csr");
    (csr.pem().expect("csr pem"), key.serialize_pem())
}

pub fn enroll_request(token: &str, csr_pem: &str) -> EnrollRequest {
    EnrollRequest {
        token: token.into(),
        csr_pem: csr_pem.into(),
        hostname: "edge-1.test".into(),
        agent_version: "0.0.0-test".into(),
        announce: None,
    }
}

/// An enrolled node speaking mutual TLS, as the agent does.
pub struct TestNode {
    pub enrolled: EnrollResponse,
    pub key_pem: String,
    pub http: reqwest::Client,
    pub base: String,
}

impl TestNode {
    pub async fn enroll(server: &TestServer, token: &str) -> TestNode {
        Self::enroll_at(&server.url(), server.ca_pem(), token).await
    }

    /// Enrolls with the server at `base` whose CA is `ca_pem`.
    pub async fn enroll_at(base: &str, ca_pem: &str, token: &str) -> TestNode {
        Self::enroll_announcing(base, ca_pem, token, None).await
    }

    /// Enrolls as an agent of this build (announcing every capability it has), trusting `ca_pem`.
    pub async fn enroll_current(server: &TestServer, ca_pem: &str, token: &str) -> TestNode {
        Self::enroll_announcing(&server.url(), ca_pem, token, Some(outpost_protocol::Announce::this_build()))
            .await
    }

    /// Enrolls as an agent that announces `announce` in its enrollment request.
    pub async fn enroll_announcing(
        base: &str,
        ca_pem: &str,
        token: &str,
        announce: Option<outpost_protocol::Announce>,
    ) -> TestNode {
        let (csr_pem, key_pem) = csr();
        let anonymous = https(ca_pem, None);
        let url = format!("{base}{}", paths::ENROLL);
        let req = EnrollRequest { announce, ..enroll_request(token, &csr_pem) };
        let (status, body) = post_json(&anonymous, &url, &req).await;
        assert_eq!(status, StatusCode::OK, "enrollment: {body}");
        let enrolled: EnrollResponse = serde_json::from_value(body).expect("an EnrollResponse");
        let http = https(&enrolled.ca_pem, Some((&enrolled.cert_pem, &key_pem)));
        TestNode { enrolled, key_pem, http, base: base.to_owned() }
    }

    pub fn id(&self) -> &str {
        &self.enrolled.node_id
    }

    pub async fn post(&self, path: &str, body: &impl Serialize) -> (StatusCode, Value) {
        post_json(&self.http, &format!("{}{path}", self.base), body).await
    }

    /// One poll; panics unless it is answered 200.
    pub async fn poll(&self, acks: &[&str], wait_secs: u64) -> PollResponse {
        let req = PollRequest {
            ack_job_ids: acks.iter().map(|s| s.to_string()).collect(),
            wait_secs: Some(wait_secs),
            max_jobs: None,
            announce: Some(outpost_protocol::Announce::this_build()),
            ..Default::default()
        };
        let (status, body) = self.post(paths::NODE_POLL, &req).await;
        assert_eq!(status, StatusCode::OK, "poll: {body}");
        serde_json::from_value(body).expect("a PollResponse")
    }

    pub async fn report(&self, report: &ResultReport) -> (StatusCode, Value) {
        self.post(paths::NODE_RESULTS, report).await
    }
}

pub fn spec() -> ContainerSpec {
    serde_json::from_value(serde_json::json!({
        "image": format!("sha256:{}", "ab".repeat(32)),
        "command": ["sh", "-c", "echo hello"],
    }))
    .expect("a valid spec")
}

pub async fn submit(op: &Client, node_id: &str) -> JobInfo {
    let req = SubmitJobRequest::for_node(node_id, spec());
    op.submit(&req).await.expect("job submitted")
}

/// The report of the attempt a node was handed, with `outcome`.
pub fn report_for(a: &outpost_protocol::JobAssignment, outcome: Outcome) -> ResultReport {
    let mut r = succeeded(&a.job_id, "");
    r.attempt = a.attempt;
    r.idempotency_key = ResultReport::key_for(&a.job_id, a.attempt);
    r.outcome = outcome;
    r
}

pub fn succeeded(job_id: &str, stdout: &str) -> ResultReport {
    ResultReport {
        job_id: job_id.into(),
        attempt: 1,
        idempotency_key: ResultReport::key_for(job_id, 1),
        outcome: Outcome::Succeeded,
        exit_code: Some(0),
        error: None,
        stdout_tail: stdout.into(),
        stderr_tail: String::new(),
        output_truncated: false,
        timings: Timings { received_unix_ms: 1, started_unix_ms: Some(2), finished_unix_ms: Some(3) },
        outputs: Vec::new(),
        egress_denied: Vec::new(),
        inference: None,
        sealed: None,
    }
}

/// An accepted object event of watch `inbox` in bucket `local`.
pub fn object_event(seq: u64, key: &str) -> ObjectEvent {
    ObjectEvent {
        seq,
        watch: "inbox".into(),
        bucket: "local".into(),
        key: key.into(),
        size: 42,
        etag: format!("etag-{seq}"),
        sha256: Some(format!("{:064x}", seq)),
        content_type: None,
        accepted: true,
        reason: None,
        replaces_etag: None,
        observed_unix_ms: 1_700_000_000_000 + seq,
        fields: Default::default(),
        fields_denied: Vec::new(),
    }
}

impl TestNode {
    /// Delivers a batch of events; returns the raw answer.
    pub async fn deliver(&self, events: &[ObjectEvent]) -> (StatusCode, Value) {
        self.post(paths::NODE_EVENTS, &EventBatch { events: events.to_vec() }).await
    }

    /// Delivers a batch that must be acknowledged: `(stored, duplicates, up_to_seq)`.
    pub async fn deliver_ok(&self, events: &[ObjectEvent]) -> (u32, u32, u64) {
        let (status, body) = self.deliver(events).await;
        assert_eq!(status, StatusCode::OK, "delivery: {body}");
        let ack: EventAck = serde_json::from_value(body).expect("an EventAck");
        (ack.stored, ack.duplicates, ack.up_to_seq)
    }
}

/// A trigger on keys under `prefix` that runs [`spec`].
pub fn trigger_request(org_id: &str, name: &str, prefix: &str) -> CreateTriggerRequest {
    CreateTriggerRequest {
        org_id: org_id.into(),
        name: name.into(),
        on: EventMatch { key_prefix: prefix.into(), ..EventMatch::default() },
        job: spec(),
        expires_in_secs: None,
    }
}

/// A node's description as this build's agent gives it (its capabilities, these labels), for
/// the files an air-gapped node writes: an offline enrollment request, a results bundle.
pub fn description(label: (&str, &str)) -> outpost_protocol::Heartbeat {
    outpost_protocol::Heartbeat {
        agent_version: "0.0.0-test".into(),
        inventory: Default::default(),
        running_jobs: 0,
        outbox_depth: 0,
        relay: None,
        models: Vec::new(),
        labels: [(label.0.to_owned(), label.1.to_owned())].into_iter().collect(),
        announce: Some(outpost_protocol::Announce::this_build()),
        awaiting_approval: Vec::new(),
    }
}

/// An age X25519 public key as `age-keygen` prints it (no test here needs its identity).
pub const AGE_RECIPIENT: &str = "age1zlha77mzg93n59zgj4wgy6xmyvtanyrtfgp5lta5t7mlfpmary7sst2mzg";
