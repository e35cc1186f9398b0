//! Every request body the control plane reads, under property tests against a real server (TLS,
//! the sled store): generated JSON shaped with the fields of the API's request types, hostile
//! values included (huge and negative numbers, floats for integers, empty and control-character
//! strings, deep nesting, a valid image id now and then), posted to every route with a body, as
//! the admin and as an enrolled node. Properties: never a 5xx, never a dropped connection, and
//! every refusal is an `ErrorBody` with a code and a message. A longer run:
//! `PROPTEST_CASES=5000 cargo test -p outpost-control --test api props`.

use std::sync::OnceLock;

use outpost_control::testing::TestServer;
use outpost_protocol::paths;
use proptest::prelude::*;
use reqwest::StatusCode;
use serde_json::{Map, Value};

use crate::support::{TestNode, org_and_token};

fn config(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// Field names of the API's request types (and of what they nest), so that generated objects
/// get past the first unknown field often enough to reach the checks behind it.
const FIELDS: &[&str] = &[
    "name",
    "ttl_secs",
    "role",
    "node_id",
    "spec",
    "image",
    "command",
    "env",
    "resources",
    "memory_mb",
    "cpu_millis",
    "pids",
    "network",
    "timeout_secs",
    "labels",
    "security",
    "inputs",
    "output_prefix",
    "egress_bodies",
    "expires_in_secs",
    "selector",
    "org_id",
    "placement",
    "recipients",
    "kind",
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "texts",
    "set",
    "remove",
    "default_profile",
    "features_off",
    "revision",
    "overlap_secs",
    "force",
    "token",
    "csr_pem",
    "hostname",
    "agent_version",
    "announce",
    "protocol",
    "capabilities",
    "on",
    "prefix",
    "watch",
    "job",
    "action",
    "batch_size",
    "max_unavailable",
    "health",
    "nodes",
    "files",
    "jobs",
    "deployments",
    "payload",
    "signature_hex",
    "key_id",
    "cert_pem",
    "request",
    "control_url",
    "heartbeat",
    "ack_job_ids",
    "wait_secs",
    "max_jobs",
    "events",
    "seq",
];

fn image() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9a-f]{64}".prop_map(|h| format!("sha256:{h}")),
        Just(String::new()),
        Just("busybox:latest".to_owned()),
        any::<String>(),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (0u64..100_000).prop_map(|n| Value::from(n as f64)),
        any::<f64>().prop_filter("JSON has no NaN", |f| f.is_finite()).prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        "[a-z0-9._-]{0,12}".prop_map(Value::from),
        image().prop_map(Value::from),
        Just(Value::from("viewer")),
        Just(Value::from("each")),
        Just(Value::from("any")),
    ]
}

fn json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(
                (prop::sample::select(FIELDS).prop_map(str::to_owned), inner.clone()),
                0..8
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
            prop::collection::vec((any::<String>(), inner), 0..3)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A server with an organisation and an enrolled node, and a runtime to drive it from the
/// synchronous property tests.
struct World {
    rt: tokio::runtime::Runtime,
    server: TestServer,
    org: String,
    node: TestNode,
    admin: reqwest::Client,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (server, org, node) = rt.block_on(async {
            let server = TestServer::start().await.expect("server");
            let (org, token) = org_and_token(&server).await;
            let node = TestNode::enroll_current(&server, server.ca_pem(), &token).await;
            (server, org, node)
        });
        let admin = crate::support::https(server.ca_pem(), None);
        World { rt, server, org, node, admin }
    })
}

/// Every route that reads a body, as (method, path, sent by the node).
fn routes(w: &World) -> Vec<(reqwest::Method, String, bool)> {
    use reqwest::Method;
    let org = |p: &str| paths::fill(p, "org_id", &w.org);
    let node = |p: &str| paths::fill(p, "node_id", w.node.id());
    vec![
        (Method::POST, paths::ORGS.into(), false),
        (Method::POST, org(paths::ORG_TOKENS), false),
        (Method::POST, org(paths::ORG_API_TOKENS), false),
        (Method::PUT, org(paths::ORG_SETTINGS), false),
        (Method::POST, org(paths::ORG_KEY_ROTATE), false),
        (Method::POST, org(paths::ORG_BUNDLES), false),
        (Method::POST, org(paths::ORG_ENROLL_OFFLINE), false),
        (Method::POST, paths::fill(paths::DEPLOYMENTS, "org_id", &w.org), false),
        (Method::POST, paths::BUNDLE_RESULTS.into(), false),
        (Method::POST, paths::TRIGGERS.into(), false),
        (Method::POST, paths::JOBS.into(), false),
        (Method::POST, paths::JOB_GROUPS.into(), false),
        (Method::POST, node(paths::NODE_LABELS), false),
        (Method::POST, paths::CA_ROTATE.into(), false),
        (Method::POST, paths::ENROLL.into(), false),
        (Method::POST, paths::NODE_POLL.into(), true),
        (Method::POST, paths::NODE_RESULTS.into(), true),
        (Method::POST, paths::NODE_HEARTBEAT.into(), true),
        (Method::POST, paths::NODE_EVENTS.into(), true),
        (Method::POST, paths::NODE_SERVICES.into(), true),
        (Method::POST, paths::NODE_LOGS.into(), true),
        (Method::POST, paths::NODE_AUDIT_UPLINK.into(), true),
        (Method::POST, paths::NODE_CERTIFICATE.into(), true),
    ]
}

fn check(body: &Value) -> Result<(), TestCaseError> {
    let w = world();
    for (method, path, as_node) in routes(w) {
        let url = format!("{}{path}", w.server.url());
        let client = if as_node { &w.node.http } else { &w.admin };
        // A poll holds up to its wait: ask for none.
        let body = match body {
            Value::Object(m) if path == paths::NODE_POLL => {
                let mut m = m.clone();
                m.insert("wait_secs".into(), Value::from(0));
                Value::Object(m)
            }
            other => other.clone(),
        };
        let body = &body;
        let mut req = client.request(method.clone(), &url).json(body);
        if !as_node {
            req = req.bearer_auth(w.server.admin_token());
        }
        let (status, text) =
            w.rt.block_on(async {
                let resp =
                    req.send().await.map_err(|e| format!("{method} {path}: the request failed: {e}"))?;
                let status = resp.status();
                Ok::<_, String>((status, resp.text().await.unwrap_or_default()))
            })
            .map_err(TestCaseError::fail)?;
        prop_assert!(!status.is_server_error(), "{method} {path} answered {status} to {body}: {text}");
        if status.is_client_error() && status != StatusCode::NOT_FOUND {
            let err: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            prop_assert!(
                err["code"].as_str().is_some_and(|c| !c.is_empty())
                    && err["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{method} {path} refused {body} without an ErrorBody: {status} {text}"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(60))]

    #[test]
    fn no_request_body_gets_a_server_error_or_a_bare_refusal(body in json()) {
        check(&body)?;
    }
}
