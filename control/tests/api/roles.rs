//! Roles and API tokens: every operator route against every role (allowed, or 403), a token of
//! one organisation against another's objects (404, as if they did not exist), and the tokens'
//! own life: shown once, expired, revoked, named in the audit trail.

use std::collections::BTreeMap;
use std::time::Duration;

use outpost_control::testing::TestServer;
use outpost_protocol::{Placement, Role, SubmitJobRequest, paths};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{TestNode, answer, assert_error, https, spec, submit, trigger_request};

/// Objects of one organisation, made by the owner.
struct OrgObjects {
    org_id: String,
    node_id: String,
    job_id: String,
    group_id: String,
    /// One trigger per role, so that each role has one of its own to delete.
    triggers: BTreeMap<Role, String>,
    /// One API token per role, likewise to revoke.
    spare_tokens: BTreeMap<Role, String>,
}

struct World {
    server: TestServer,
    a: OrgObjects,
    b: OrgObjects,
    /// The API tokens of organisation A, by role.
    tokens: BTreeMap<Role, String>,
    _nodes: Vec<TestNode>,
}

async fn owner_call(
    server: &TestServer,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    call(server, server.admin_token(), method, path, body).await
}

async fn call(
    server: &TestServer,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let http = https(server.ca_pem(), None);
    let mut req = http.request(method, format!("{}{path}", server.url())).bearer_auth(token);
    if let Some(body) = body {
        req = req.json(&body);
    }
    answer(req.send().await.expect("sent")).await
}

fn fill(template: &str, pairs: &[(&str, &str)]) -> String {
    pairs.iter().fold(template.to_owned(), |p, (k, v)| paths::fill(&p, k, v))
}

async fn org_objects(server: &TestServer, name: &str, nodes: &mut Vec<TestNode>) -> OrgObjects {
    let op = server.operator().expect("owner client");
    let org = op.create_org(name).await.expect("org");
    let token = op.create_token(&org.id, None).await.expect("enrollment token");
    let node = TestNode::enroll(server, &token.token).await;
    let job = submit(&op, node.id()).await;
    let (status, body) = owner_call(
        server,
        Method::POST,
        &fill(paths::NODE_LABELS, &[("node_id", node.id())]),
        Some(json!({"set": {"site": "x"}})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let group = op
        .submit_group(&SubmitJobRequest::for_selector(&org.id, "site=x", Placement::Each, spec()))
        .await
        .expect("group");
    let mut triggers = BTreeMap::new();
    let mut spare_tokens = BTreeMap::new();
    for role in Role::ALL {
        let t =
            op.create_trigger(&trigger_request(&org.id, &format!("t-{role}"), "in/")).await.expect("trigger");
        triggers.insert(role, t.trigger_id);
        let spare =
            op.create_api_token(&org.id, &format!("spare-{role}"), Role::Viewer, None).await.expect("token");
        spare_tokens.insert(role, spare.info.id);
    }
    let deploy = json!({
        "name": "web", "org_id": org.id, "selector": "site=x",
        "spec": {"image": format!("sha256:{}", "cd".repeat(32)), "command": ["sh", "-c", "sleep 3600"]},
    });
    let (status, body) =
        owner_call(server, Method::POST, &fill(paths::DEPLOYMENTS, &[("org_id", &org.id)]), Some(deploy))
            .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let out = OrgObjects {
        org_id: org.id,
        node_id: node.id().to_owned(),
        job_id: job.job_id,
        group_id: group.group_id,
        triggers,
        spare_tokens,
    };
    nodes.push(node);
    out
}

async fn world() -> World {
    let server = TestServer::start().await.expect("server");
    let mut nodes = Vec::new();
    let a = org_objects(&server, "clinic-a", &mut nodes).await;
    let b = org_objects(&server, "clinic-b", &mut nodes).await;
    let op = server.operator().expect("owner client");
    let mut tokens = BTreeMap::new();
    for role in Role::ALL {
        let created = op.create_api_token(&a.org_id, role.as_str(), role, None).await.expect("API token");
        assert!(created.token.starts_with("opk_"), "{}", created.token);
        tokens.insert(role, created.token);
    }
    World { server, a, b, tokens, _nodes: nodes }
}

/// One operator route: what it needs, and the request for an object of `o`, made by a caller
/// with `role`.
struct Case {
    name: &'static str,
    needs: Role,
    /// Whether the route names an object (or organisation) of `o`: a token of another
    /// organisation gets 404 for it. Listings answer 200 with nothing of `o` instead.
    object: bool,
    request: fn(&OrgObjects, Role) -> (Method, String, Option<Value>),
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "list orgs",
            needs: Role::Viewer,
            object: false,
            request: |_, _| (Method::GET, paths::ORGS.into(), None),
        },
        Case {
            name: "create enrollment token",
            needs: Role::Admin,
            object: true,
            request: |o, _| {
                (Method::POST, fill(paths::ORG_TOKENS, &[("org_id", &o.org_id)]), Some(json!({})))
            },
        },
        Case {
            name: "create API token",
            needs: Role::Admin,
            object: true,
            request: |o, r| {
                let body = json!({"name": format!("made-by-{r}"), "role": "viewer"});
                (Method::POST, fill(paths::ORG_API_TOKENS, &[("org_id", &o.org_id)]), Some(body))
            },
        },
        Case {
            name: "read org settings",
            needs: Role::Viewer,
            object: true,
            request: |o, _| (Method::GET, fill(paths::ORG_SETTINGS, &[("org_id", &o.org_id)]), None),
        },
        Case {
            name: "change org settings",
            needs: Role::Admin,
            object: true,
            request: |o, _| {
                let body = json!({"default_profile": "hybrid"});
                (Method::PUT, fill(paths::ORG_SETTINGS, &[("org_id", &o.org_id)]), Some(body))
            },
        },
        Case {
            name: "list API tokens",
            needs: Role::Admin,
            object: true,
            request: |o, _| (Method::GET, fill(paths::ORG_API_TOKENS, &[("org_id", &o.org_id)]), None),
        },
        Case {
            name: "revoke API token",
            needs: Role::Admin,
            object: true,
            request: |o, r| {
                let path =
                    fill(paths::ORG_API_TOKEN, &[("org_id", &o.org_id), ("token_id", &o.spare_tokens[&r])]);
                (Method::DELETE, path, None)
            },
        },
        Case {
            name: "build bundle",
            needs: Role::Operator,
            object: true,
            request: |o, _| {
                let body = json!({"nodes": [o.node_id]});
                (Method::POST, fill(paths::ORG_BUNDLES, &[("org_id", &o.org_id)]), Some(body))
            },
        },
        Case {
            name: "enroll offline",
            needs: Role::Admin,
            object: true,
            request: |o, _| {
                let body = json!({"request": {"format": 1, "request_id": "0123456789abcdef0123", "csr_pem": "-",
                    "hostname": "h", "agent_version": "0", "created_unix_ms": 0}});
                (Method::POST, fill(paths::ORG_ENROLL_OFFLINE, &[("org_id", &o.org_id)]), Some(body))
            },
        },
        Case {
            name: "create deployment",
            needs: Role::Operator,
            object: true,
            request: |o, r| {
                let body = json!({"name": format!("d-{r}"), "org_id": o.org_id, "selector": "site=x",
                    "spec": {"image": format!("sha256:{}", "cd".repeat(32)), "command": ["sleep", "60"]}});
                (Method::POST, fill(paths::DEPLOYMENTS, &[("org_id", &o.org_id)]), Some(body))
            },
        },
        Case {
            name: "list deployments",
            needs: Role::Viewer,
            object: true,
            request: |o, _| (Method::GET, fill(paths::DEPLOYMENTS, &[("org_id", &o.org_id)]), None),
        },
        Case {
            name: "get deployment",
            needs: Role::Viewer,
            object: true,
            request: |o, _| {
                (Method::GET, fill(paths::DEPLOYMENT, &[("org_id", &o.org_id), ("name", "web")]), None)
            },
        },
        Case {
            name: "pause deployment",
            needs: Role::Operator,
            object: true,
            request: |o, _| {
                let path = fill(paths::DEPLOYMENT_ACTION, &[("org_id", &o.org_id), ("name", "web")]);
                (Method::POST, path, Some(json!({"action": "pause"})))
            },
        },
        Case {
            name: "list events",
            needs: Role::Viewer,
            object: false,
            request: |_, _| (Method::GET, paths::EVENTS.into(), None),
        },
        Case {
            name: "create trigger",
            needs: Role::Operator,
            object: true,
            request: |o, r| {
                let body = serde_json::to_value(trigger_request(&o.org_id, &format!("new-{r}"), "x/"))
                    .expect("json");
                (Method::POST, paths::TRIGGERS.into(), Some(body))
            },
        },
        Case {
            name: "list triggers",
            needs: Role::Viewer,
            object: false,
            request: |_, _| (Method::GET, paths::TRIGGERS.into(), None),
        },
        Case {
            name: "get trigger",
            needs: Role::Viewer,
            object: true,
            request: |o, r| (Method::GET, fill(paths::TRIGGER, &[("trigger_id", &o.triggers[&r])]), None),
        },
        Case {
            name: "delete trigger",
            needs: Role::Operator,
            object: true,
            request: |o, r| (Method::DELETE, fill(paths::TRIGGER, &[("trigger_id", &o.triggers[&r])]), None),
        },
        Case {
            name: "submit job",
            needs: Role::Operator,
            object: true,
            request: |o, _| {
                let body =
                    serde_json::to_value(SubmitJobRequest::for_node(&o.node_id, spec())).expect("json");
                (Method::POST, paths::JOBS.into(), Some(body))
            },
        },
        Case {
            name: "submit job by selector",
            needs: Role::Operator,
            object: true,
            request: |o, _| {
                let req = SubmitJobRequest::for_selector(&o.org_id, "site=x", Placement::Any, spec());
                (Method::POST, paths::JOBS.into(), Some(serde_json::to_value(req).expect("json")))
            },
        },
        Case {
            name: "list jobs",
            needs: Role::Viewer,
            object: false,
            request: |_, _| (Method::GET, paths::JOBS.into(), None),
        },
        Case {
            name: "get job",
            needs: Role::Viewer,
            object: true,
            request: |o, _| (Method::GET, fill(paths::JOB, &[("job_id", &o.job_id)]), None),
        },
        Case {
            name: "job logs",
            needs: Role::Viewer,
            object: true,
            request: |o, _| (Method::GET, fill(paths::JOB_LOGS, &[("job_id", &o.job_id)]), None),
        },
        Case {
            name: "cancel job",
            needs: Role::Operator,
            object: true,
            request: |o, _| (Method::POST, fill(paths::JOB_CANCEL, &[("job_id", &o.job_id)]), None),
        },
        Case {
            name: "submit job group",
            needs: Role::Operator,
            object: true,
            request: |o, _| {
                let req = SubmitJobRequest::for_selector(&o.org_id, "site=x", Placement::Each, spec());
                (Method::POST, paths::JOB_GROUPS.into(), Some(serde_json::to_value(req).expect("json")))
            },
        },
        Case {
            name: "get job group",
            needs: Role::Viewer,
            object: true,
            request: |o, _| (Method::GET, fill(paths::JOB_GROUP, &[("group_id", &o.group_id)]), None),
        },
        Case {
            name: "list nodes",
            needs: Role::Viewer,
            object: false,
            request: |_, _| (Method::GET, paths::NODES.into(), None),
        },
        Case {
            name: "get node",
            needs: Role::Viewer,
            object: true,
            request: |o, _| (Method::GET, fill(paths::NODE, &[("node_id", &o.node_id)]), None),
        },
        Case {
            name: "label node",
            needs: Role::Operator,
            object: true,
            request: |o, _| {
                let body = json!({"set": {"room": "b12"}});
                (Method::POST, fill(paths::NODE_LABELS, &[("node_id", &o.node_id)]), Some(body))
            },
        },
        Case {
            name: "audit",
            needs: Role::Viewer,
            object: false,
            request: |_, _| (Method::GET, paths::AUDIT.into(), None),
        },
        Case {
            name: "node audit",
            needs: Role::Viewer,
            object: true,
            request: |o, _| (Method::GET, fill(paths::NODE_AUDIT, &[("node_id", &o.node_id)]), None),
        },
        Case {
            name: "revoke node",
            needs: Role::Admin,
            object: true,
            request: |o, _| (Method::POST, fill(paths::NODE_REVOKE, &[("node_id", &o.node_id)]), None),
        },
        Case {
            name: "import results bundle",
            needs: Role::Operator,
            object: false,
            request: |_, _| {
                (
                    Method::POST,
                    paths::BUNDLE_RESULTS.into(),
                    Some(json!({"payload": "{}", "cert_pem": "", "signature_hex": ""})),
                )
            },
        },
    ]
}

#[tokio::test]
async fn every_operator_route_checks_the_role_and_hides_other_organisations() {
    let w = world().await;
    let mut table = Vec::new();
    for role in Role::ALL {
        let token = &w.tokens[&role];
        for case in cases() {
            let (method, path, body) = (case.request)(&w.a, role);
            let got = call(&w.server, token, method.clone(), &path, body).await;
            if role >= case.needs {
                assert!(
                    ![StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN, StatusCode::NOT_FOUND]
                        .contains(&got.0),
                    "{role} may {} ({method} {path}), got {}: {}",
                    case.name,
                    got.0,
                    got.1
                );
            } else {
                assert_error(&got, StatusCode::FORBIDDEN, "forbidden");
            }
            table.push(format!("{:<24} {:<9} {}", case.name, role.as_str(), got.0.as_u16()));

            if case.object {
                // The same route on organisation B's object: as if it did not exist (a role that
                // may not do this anywhere may be told so first; that says nothing about B).
                let (method, path, body) = (case.request)(&w.b, role);
                let got = call(&w.server, token, method.clone(), &path, body).await;
                let expected = if role < case.needs && got.0 == StatusCode::FORBIDDEN {
                    StatusCode::FORBIDDEN
                } else {
                    StatusCode::NOT_FOUND
                };
                assert_eq!(got.0, expected, "{role} of A: {} on B ({method} {path}): {}", case.name, got.1);
            }
        }
    }
    // Creating organisations is the owner's alone.
    for role in Role::ALL {
        let got =
            call(&w.server, &w.tokens[&role], Method::POST, paths::ORGS, Some(json!({"name": "x"}))).await;
        assert_error(&got, StatusCode::FORBIDDEN, "owner_only");
    }
    eprintln!("{}", table.join("\n"));
}

#[tokio::test]
async fn listings_show_only_the_tokens_organisation() {
    let w = world().await;
    let viewer = &w.tokens[&Role::Viewer];
    let server = &w.server;
    let get = |path: &str| {
        let path = path.to_owned();
        async move { call(server, viewer, Method::GET, &path, None).await }
    };

    let (_, orgs) = get(paths::ORGS).await;
    let ids: Vec<&str> = orgs.as_array().expect("orgs").iter().filter_map(|o| o["id"].as_str()).collect();
    assert_eq!(ids, [w.a.org_id.as_str()]);

    let (_, nodes) = get(paths::NODES).await;
    let nodes: Vec<&str> =
        nodes["nodes"].as_array().expect("nodes").iter().filter_map(|n| n["node_id"].as_str()).collect();
    assert_eq!(nodes, [w.a.node_id.as_str()]);
    let (_, nodes) = get(&format!("{}?org_id={}", paths::NODES, w.b.org_id)).await;
    assert!(nodes["nodes"].as_array().expect("nodes").is_empty(), "{nodes}");

    let (_, jobs) = get(paths::JOBS).await;
    let jobs = jobs["jobs"].as_array().expect("jobs");
    assert!(!jobs.is_empty());
    assert!(jobs.iter().all(|j| j["org_id"] == w.a.org_id.as_str()), "{jobs:?}");
    let (_, jobs) = get(&format!("{}?node_id={}", paths::JOBS, w.b.node_id)).await;
    assert!(jobs["jobs"].as_array().expect("jobs").is_empty(), "{jobs}");

    let (_, triggers) = get(paths::TRIGGERS).await;
    let triggers = triggers["triggers"].as_array().expect("triggers");
    assert_eq!(triggers.len(), 3);
    assert!(triggers.iter().all(|t| t["org_id"] == w.a.org_id.as_str()));
    let (_, triggers) = get(&format!("{}?org_id={}", paths::TRIGGERS, w.b.org_id)).await;
    assert!(triggers["triggers"].as_array().expect("triggers").is_empty());

    let (_, audit) = get(paths::AUDIT).await;
    let entries = audit["entries"].as_array().expect("entries");
    assert!(!entries.is_empty());
    assert!(entries.iter().all(|e| e["org_id"] == w.a.org_id.as_str()), "{entries:?}");
    // The owner sees both organisations' entries.
    let (_, all) = owner_call(&w.server, Method::GET, paths::AUDIT, None).await;
    let all = all["entries"].as_array().expect("entries");
    assert!(all.iter().any(|e| e["org_id"] == w.b.org_id.as_str()));
}

#[tokio::test]
async fn the_audit_trail_names_the_token_that_acted() {
    let w = world().await;
    let operator = &w.tokens[&Role::Operator];
    let body = serde_json::to_value(SubmitJobRequest::for_node(&w.a.node_id, spec())).expect("json");
    let (status, job) = call(&w.server, operator, Method::POST, paths::JOBS, Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{job}");
    let (_, audit) = owner_call(&w.server, Method::GET, paths::AUDIT, None).await;
    let entry = audit["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .rfind(|e| e["action"] == "job.submitted")
        .cloned()
        .expect("job.submitted entry");
    let actor = entry["actor"].as_str().expect("actor");
    assert!(actor.starts_with("token:operator/tok-"), "{actor}");
    assert_eq!(entry["org_id"], w.a.org_id.as_str());
    assert!(entry["detail"].as_str().expect("detail").contains(job["job_id"].as_str().expect("id")));
    // Owner actions say so.
    let (_, all) = owner_call(&w.server, Method::GET, paths::AUDIT, None).await;
    assert!(
        all["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .any(|e| e["action"] == "org.created" && e["actor"] == "owner")
    );
}

#[tokio::test]
async fn expired_revoked_and_forged_tokens_are_refused() {
    let w = world().await;
    let op = w.server.operator().expect("owner");
    let short = op.create_api_token(&w.a.org_id, "short", Role::Viewer, Some(60)).await.expect("token");
    let listed = op.list_api_tokens(&w.a.org_id).await.expect("list");
    assert!(listed.tokens.iter().any(|t| t.id == short.info.id && t.name == "short"));
    let listed_json = serde_json::to_string(&listed).expect("json");
    assert!(
        !listed_json.contains(short.token.split('.').nth(1).expect("secret")),
        "secrets are never listed"
    );

    let ok = call(&w.server, &short.token, Method::GET, paths::NODES, None).await;
    assert_eq!(ok.0, StatusCode::OK, "{}", ok.1);
    w.server.clock().advance(Duration::from_secs(61));
    let expired = call(&w.server, &short.token, Method::GET, paths::NODES, None).await;
    assert_error(&expired, StatusCode::UNAUTHORIZED, "token_expired");

    let token = &w.tokens[&Role::Admin];
    let id = token.trim_start_matches("opk_").split('.').next().expect("id").to_owned();
    let forged = format!("opk_{id}.{}", "0".repeat(64));
    assert_error(
        &call(&w.server, &forged, Method::GET, paths::NODES, None).await,
        StatusCode::UNAUTHORIZED,
        "bad_token",
    );
    let unknown = format!("opk_tok-0000000000000000.{}", "0".repeat(64));
    assert_error(
        &call(&w.server, &unknown, Method::GET, paths::NODES, None).await,
        StatusCode::UNAUTHORIZED,
        "bad_token",
    );
    assert_error(
        &call(&w.server, "opk_garbage", Method::GET, paths::NODES, None).await,
        StatusCode::UNAUTHORIZED,
        "bad_token",
    );

    let revoked = op.revoke_api_token(&w.a.org_id, &id).await.expect("revoke");
    assert!(revoked.revoked_unix_ms.is_some());
    let after = call(&w.server, token, Method::GET, paths::NODES, None).await;
    assert_error(&after, StatusCode::UNAUTHORIZED, "token_revoked");
    // A token never outlives the one that made it.
    let brief = op.create_api_token(&w.a.org_id, "brief-admin", Role::Admin, Some(120)).await.expect("token");
    let path = fill(paths::ORG_API_TOKENS, &[("org_id", &w.a.org_id)]);
    let body = json!({"name": "long-lived", "role": "viewer", "ttl_secs": 400 * 24 * 3600});
    let (status, made) = call(&w.server, &brief.token, Method::POST, &path, Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    assert_eq!(made["info"]["expires_unix_ms"], brief.info.expires_unix_ms, "capped at the parent's expiry");
    // A token of organisation B cannot revoke A's tokens, nor learn they exist.
    let b_admin = op.create_api_token(&w.b.org_id, "admin", Role::Admin, None).await.expect("token");
    let viewer_id =
        w.tokens[&Role::Viewer].trim_start_matches("opk_").split('.').next().expect("id").to_owned();
    let path = fill(paths::ORG_API_TOKEN, &[("org_id", &w.b.org_id), ("token_id", &viewer_id)]);
    let got = call(&w.server, &b_admin.token, Method::DELETE, &path, None).await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    let still = call(&w.server, &w.tokens[&Role::Viewer], Method::GET, paths::NODES, None).await;
    assert_eq!(still.0, StatusCode::OK);
    // The bearer scheme is case-insensitive, as HTTP's are.
    let http = https(w.server.ca_pem(), None);
    let resp = http
        .get(format!("{}{}", w.server.url(), paths::NODES))
        .header("authorization", format!("bearer {}", w.tokens[&Role::Viewer]))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn api_token_requests_are_checked() {
    let w = world().await;
    let path = fill(paths::ORG_API_TOKENS, &[("org_id", &w.a.org_id)]);
    for (body, code) in [
        (json!({"name": "", "role": "viewer"}), "bad_name"),
        (json!({"name": "has space", "role": "viewer"}), "bad_name"),
        (json!({"name": "x", "role": "root"}), "invalid_body"),
        (json!({"name": "x", "role": "viewer", "ttl_secs": 0}), "bad_ttl"),
        (json!({"name": "x", "role": "viewer", "extra": 1}), "invalid_body"),
    ] {
        let got = owner_call(&w.server, Method::POST, &path, Some(body.clone())).await;
        assert_error(&got, StatusCode::BAD_REQUEST, code);
    }
    let dup =
        owner_call(&w.server, Method::POST, &path, Some(json!({"name": "viewer", "role": "admin"}))).await;
    assert_error(&dup, StatusCode::CONFLICT, "token_name_taken");
    let missing = fill(paths::ORG_API_TOKENS, &[("org_id", "org-none")]);
    let got =
        owner_call(&w.server, Method::POST, &missing, Some(json!({"name": "x", "role": "viewer"}))).await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
}
