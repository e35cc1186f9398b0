//! The OpenAPI document, generated from the handlers' annotations and the protocol's schemas.

use axum::Json;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{node, operator};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Outpost control plane API",
        description = "Nodes dial out to this API: they enroll with a one-time token, then long-poll for \
                       signed jobs and report results over mutual TLS 1.3. Operators use the admin bearer token."
    ),
    paths(
        operator::health,
        operator::create_org,
        operator::list_orgs,
        operator::create_token,
        operator::submit_job,
        operator::list_jobs,
        operator::get_job,
        operator::list_nodes,
        operator::get_node,
        operator::list_audit,
        node::enroll,
        node::poll,
        node::report,
        node::heartbeat,
        document,
    ),
    modifiers(&Security)
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components
            .add_security_scheme("admin_token", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
        // mTLS is not expressible in OpenAPI 3.1's security schemes beyond a description.
        components.add_security_scheme(
            "node_certificate",
            SecurityScheme::MutualTls {
                description: Some("the client certificate issued at enrollment".into()),
                extensions: None,
            },
        );
    }
}

#[utoipa::path(get, path = "/v1/openapi.json", responses((status = 200, description = "this document")))]
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_of_the_protocol_is_documented() {
        let doc = ApiDoc::openapi();
        for path in [
            outpost_protocol::paths::ORGS,
            outpost_protocol::paths::ORG_TOKENS,
            outpost_protocol::paths::ENROLL,
            outpost_protocol::paths::NODE_POLL,
            outpost_protocol::paths::NODE_RESULTS,
            outpost_protocol::paths::NODE_HEARTBEAT,
            outpost_protocol::paths::JOBS,
            outpost_protocol::paths::JOB,
            outpost_protocol::paths::NODES,
            outpost_protocol::paths::NODE,
            outpost_protocol::paths::AUDIT,
            outpost_protocol::paths::HEALTH,
            outpost_protocol::paths::OPENAPI,
        ] {
            assert!(doc.paths.paths.contains_key(path), "{path} missing from the OpenAPI document");
        }
    }

    #[test]
    fn the_document_carries_the_protocol_schemas() {
        let doc = ApiDoc::openapi();
        let schemas = &doc.components.as_ref().expect("components").schemas;
        for name in ["SubmitJobRequest", "ContainerSpec", "ResultReport", "PollResponse", "ErrorBody"] {
            assert!(schemas.contains_key(name), "schema {name} missing");
        }
    }
}
