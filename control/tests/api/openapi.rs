//! The OpenAPI document served at /v1/openapi.json lists every route of the protocol.

use outpost_control::testing::TestServer;
use outpost_protocol::paths;
use reqwest::StatusCode;

use crate::support::{answer, https};

/// Every `pub const NAME: &str = "/v1/…";` in the protocol's paths.rs, read from its source so
/// that a route added there and forgotten here fails this test.
fn protocol_paths() -> Vec<String> {
    let source = include_str!("../../../protocol/src/paths.rs");
    source
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub const "))
        .filter_map(|l| l.split_once("&str = \"").map(|(_, rest)| rest))
        .filter_map(|rest| rest.split_once('"').map(|(path, _)| path.to_owned()))
        .collect()
}

#[tokio::test]
async fn the_document_lists_every_path_of_the_protocol() {
    let server = TestServer::start().await.expect("server");
    let http = https(server.ca_pem(), None);
    let (status, doc) =
        answer(http.get(format!("{}{}", server.url(), paths::OPENAPI)).send().await.expect("sent")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "{}", doc["openapi"]);
    let documented = doc["paths"].as_object().expect("paths");
    let expected = protocol_paths();
    assert!(expected.len() >= 13, "parsed {} paths from paths.rs: {expected:?}", expected.len());
    for path in &expected {
        assert!(documented.contains_key(path), "{path} is missing from the OpenAPI document");
    }
    assert_eq!(documented.len(), expected.len(), "the document lists only protocol routes");
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
}
