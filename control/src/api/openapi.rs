//! The OpenAPI document, generated from the handlers' annotations and the protocol's schemas.

use axum::Json;
use outpost_protocol::paths;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{access, bundles, deploy, enroll, events, jobs, logs, node, offline, operator, triggers, trust};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Outpost control plane API",
        description = "Nodes dial out to this API: they enroll with a one-time token, then long-poll for \
                       signed jobs, report results and deliver relay events over mutual TLS 1.3. Operators send a \
                       bearer token: an API token of one organisation with a role (viewer, operator, admin), or \
                       the admin token (everything, every organisation); a token never sees another \
                       organisation's objects (404). Org-level triggers turn matching events into jobs. \
                       Every error answer is an ErrorBody."
    ),
    paths(
        operator::health,
        operator::create_org,
        operator::list_orgs,
        operator::create_token,
        operator::org_settings,
        operator::put_org_settings,
        access::create_api_token,
        access::list_api_tokens,
        access::revoke_api_token,
        operator::list_nodes,
        operator::get_node,
        operator::label_node,
        operator::revoke_node,
        operator::list_audit,
        operator::node_audit,
        jobs::submit_job,
        jobs::list_jobs,
        jobs::get_job,
        jobs::cancel_job,
        jobs::submit_group,
        jobs::get_group,
        logs::job_logs,
        enroll::enroll,
        node::poll,
        node::report,
        node::heartbeat,
        node::renew_certificate,
        node::upload_audit,
        trust::get_node_trust,
        trust::rotate_org_key,
        trust::rotate_ca,
        logs::node_logs,
        events::deliver,
        deploy::node_reports,
        bundles::create,
        offline::enroll_offline,
        bundles::import_results,
        deploy::create,
        deploy::list,
        deploy::get,
        deploy::act,
        events::list_events,
        triggers::create_trigger,
        triggers::list_triggers,
        triggers::get_trigger,
        triggers::delete_trigger,
        document,
    ),
    modifiers(&Security, &BodyRefusals)
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components
            .add_security_scheme("admin_token", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
        components.add_security_scheme(
            "node_certificate",
            SecurityScheme::MutualTls {
                description: Some("the client certificate issued at enrollment".into()),
                extensions: None,
            },
        );
    }
}

/// Every route that reads a JSON body answers 400 for one that is not JSON of the request's
/// shape, 413 for one over the size limit and 415 without a JSON content type (the `Body`
/// extractor), and every route with query parameters 400 for an unknown or malformed one (the
/// `Params` extractor): the document says so for each of them.
struct BodyRefusals;

impl Modify for BodyRefusals {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let refusal = |why: &str| {
            ResponseBuilder::new()
                .description(why)
                .content(
                    "application/json",
                    ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build(),
                )
                .build()
        };
        let limit = outpost_protocol::MAX_BODY_BYTES;
        for item in openapi.paths.paths.values_mut() {
            // Every query string is read by the `Params` extractor: 400 for an unknown parameter
            // or one that does not parse.
            for op in [&mut item.get, &mut item.post, &mut item.put, &mut item.delete].into_iter().flatten() {
                let has_query = op
                    .parameters
                    .iter()
                    .flatten()
                    .any(|p| matches!(p.parameter_in, utoipa::openapi::path::ParameterIn::Query));
                if has_query {
                    op.responses.responses.entry("400".into()).or_insert_with(|| {
                        refusal("a query parameter is unknown, or its value does not parse").into()
                    });
                }
            }
            for op in [&mut item.post, &mut item.put, &mut item.patch].into_iter().flatten() {
                if op.request_body.is_none() {
                    continue;
                }
                let responses = &mut op.responses.responses;
                responses
                    .entry("400".into())
                    .or_insert_with(|| refusal("the body is not JSON of this request's shape").into());
                responses
                    .entry("413".into())
                    .or_insert_with(|| refusal(&format!("the body is over {limit} bytes")).into());
                responses.entry("415".into()).or_insert_with(|| {
                    refusal("the body is not sent as `Content-Type: application/json`").into()
                });
            }
        }
    }
}

#[utoipa::path(get, path = paths::OPENAPI, tag = "meta", responses((status = 200, description = "this document")))]
pub async fn document() -> Json<&'static serde_json::Value> {
    Json(served())
}

/// The document as served: [`ApiDoc`] with the whole range of each unsigned integer stated.
/// utoipa names the format (`uint64`, `uint32`, ...) but not its bounds, and JSON Schema's
/// integers are unbounded: a client that trusts the document must learn that 2^64 is refused.
pub fn served() -> &'static serde_json::Value {
    static DOC: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    DOC.get_or_init(|| {
        // An OpenApi value always serialises (string keys, no non-finite floats).
        let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
        bound_unsigned(&mut doc);
        doc
    })
}

fn bound_unsigned(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            // utoipa spells them `u-int64`; the usual spelling is `uint64`.
            let max = match map.get("format").and_then(Value::as_str) {
                Some("u-int8" | "uint8") => Some((u64::from(u8::MAX), "uint8")),
                Some("u-int16" | "uint16") => Some((u64::from(u16::MAX), "uint16")),
                Some("u-int32" | "uint32") => Some((u64::from(u32::MAX), "uint32")),
                Some("u-int64" | "uint64") => Some((u64::MAX, "uint64")),
                _ => None,
            };
            if let Some((max, format)) = max {
                map.insert("format".into(), Value::from(format));
                map.entry("minimum").or_insert(Value::from(0u64));
                map.entry("maximum").or_insert(Value::from(max));
            }
            map.values_mut().for_each(bound_unsigned);
        }
        Value::Array(items) => items.iter_mut().for_each(bound_unsigned),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_with_a_body_documents_its_size_and_content_type_refusals() {
        let doc = ApiDoc::openapi();
        let mut checked = 0;
        for (path, item) in &doc.paths.paths {
            for op in [&item.post, &item.put, &item.patch].into_iter().flatten() {
                if op.request_body.is_some() {
                    for code in ["400", "413", "415"] {
                        assert!(op.responses.responses.contains_key(code), "{path} lacks {code}");
                    }
                    checked += 1;
                }
            }
        }
        assert!(checked > 20, "{checked} routes with a body");
    }

    #[test]
    fn the_document_carries_the_protocol_schemas() {
        let doc = ApiDoc::openapi();
        let schemas = &doc.components.as_ref().expect("components").schemas;
        for name in [
            "SubmitJobRequest",
            "ContainerSpec",
            "JobSpec",
            "InferenceSpec",
            "InferenceStamp",
            "ResultReport",
            "PollResponse",
            "ErrorBody",
            "Heartbeat",
            "EventBatch",
            "ObjectEvent",
            "EventAck",
            "EventList",
            "StoredEvent",
            "CreateTriggerRequest",
            "EventMatch",
            "Trigger",
            "TriggerList",
        ] {
            assert!(schemas.contains_key(name), "schema {name} missing");
        }
    }

    /// The bounds the document states are the ones the handlers enforce.
    #[test]
    fn stated_bounds_are_the_enforced_ones() {
        let doc = served();
        let field =
            |schema: &str, name: &str| doc["components"]["schemas"][schema]["properties"][name].clone();
        let bounds = |schema: &str, name: &str| {
            let f = field(schema, name);
            (f["minimum"].as_u64(), f["maximum"].as_u64())
        };
        use outpost_protocol::{MAX_OVERLAP_SECS, MIN_OVERLAP_SECS};
        assert_eq!(bounds("RotateRequest", "overlap_secs"), (Some(MIN_OVERLAP_SECS), Some(MAX_OVERLAP_SECS)));
        assert_eq!(
            bounds("CreateTokenRequest", "ttl_secs"),
            (Some(1), Some(super::super::operator::MAX_TOKEN_TTL_SECS))
        );
        assert_eq!(
            bounds("CreateApiTokenRequest", "ttl_secs"),
            (Some(1), Some(super::super::access::MAX_API_TOKEN_TTL_SECS))
        );
        for schema in ["SubmitJobRequest", "CreateTriggerRequest"] {
            assert_eq!(
                bounds(schema, "expires_in_secs"),
                (Some(1), Some(super::super::jobs::MAX_JOB_EXPIRY_SECS))
            );
        }
        assert_eq!(
            bounds("BundleRequest", "expires_in_secs"),
            (Some(1), Some(super::super::bundles::MAX_BUNDLE_EXPIRY_SECS))
        );
        assert_eq!(field("CreateOrgRequest", "name")["maxLength"], 128);
        assert_eq!(field("EnrollRequest", "hostname")["maxLength"], 253);
    }

    /// Query strings are documented as such (a parameter `in: path` that the path does not name
    /// is never sent by a client that trusts the document), and each operation with one
    /// documents the 400 a malformed one gets.
    #[test]
    fn query_parameters_are_documented_in_the_query() {
        let doc = served();
        let mut queries = 0;
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("path item") {
                for p in op["parameters"].as_array().into_iter().flatten() {
                    let name = p["name"].as_str().expect("name");
                    match p["in"].as_str() {
                        Some("path") => {
                            assert!(path.contains(&format!("{{{name}}}")), "{method} {path}: {name}")
                        }
                        Some("query") => {
                            queries += 1;
                            assert!(op["responses"]["400"].is_object(), "{method} {path} lacks 400");
                            assert_ne!(p["required"], true, "{method} {path}: {name} is optional");
                        }
                        other => panic!("{method} {path}: {name} in {other:?}"),
                    }
                }
            }
        }
        assert!(queries > 10, "{queries} query parameters");
    }

    /// Every unsigned integer states its whole range, so a client never sends 2^64.
    #[test]
    fn unsigned_integers_state_their_range() {
        fn walk(v: &serde_json::Value, seen: &mut usize) {
            if let Some(map) = v.as_object() {
                if map.get("format").and_then(|f| f.as_str()).is_some_and(|f| f.starts_with("uint")) {
                    assert!(map["maximum"].is_u64() && map["minimum"].is_u64(), "{v}");
                    *seen += 1;
                }
                map.values().for_each(|v| walk(v, seen));
            } else if let Some(items) = v.as_array() {
                items.iter().for_each(|v| walk(v, seen));
            }
        }
        let mut seen = 0;
        walk(served(), &mut seen);
        assert!(seen > 50, "{seen} unsigned integers");
        let poll = &served()["components"]["schemas"]["PollRequest"]["properties"]["wait_secs"];
        assert_eq!(poll["maximum"], u64::MAX, "{poll}");
    }

    #[test]
    fn operator_and_node_routes_declare_their_security() {
        let doc = serde_json::to_value(ApiDoc::openapi()).expect("serialises");
        let security = |path: &str, method: &str| doc["paths"][path][method]["security"].clone();
        assert!(security(paths::JOBS, "post").to_string().contains("admin_token"));
        assert!(security(paths::NODE_POLL, "post").to_string().contains("node_certificate"));
        assert!(security(paths::ENROLL, "post").is_null());
        assert!(security(paths::NODE_EVENTS, "post").to_string().contains("node_certificate"));
        assert!(security(paths::EVENTS, "get").to_string().contains("admin_token"));
        assert!(security(paths::TRIGGER, "delete").to_string().contains("admin_token"));
    }
}
