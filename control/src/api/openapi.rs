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
/// extractor): the document says so for each of them.
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
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
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
