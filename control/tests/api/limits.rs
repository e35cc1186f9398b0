//! Malformed, oversized and misrouted requests get a JSON `ErrorBody`, never plain text.

use outpost_control::testing::TestServer;
use outpost_protocol::paths;
use reqwest::StatusCode;

use crate::support::{answer, assert_error, https};

fn operator_post(server: &TestServer, path: &str) -> reqwest::RequestBuilder {
    https(server.ca_pem(), None)
        .post(format!("{}{path}", server.url()))
        .bearer_auth(server.admin_token())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
}

#[tokio::test]
async fn malformed_json_answers_400_with_an_error_body() {
    let server = TestServer::start().await.expect("server");
    let got =
        answer(operator_post(&server, paths::ORGS).body("{\"name\": ").send().await.expect("sent")).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "bad_json");
}

#[tokio::test]
async fn unknown_fields_answer_400_naming_the_field() {
    let server = TestServer::start().await.expect("server");
    let body = r#"{"name":"clinic","privileged":true}"#;
    let got = answer(operator_post(&server, paths::ORGS).body(body).send().await.expect("sent")).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "invalid_body");
    assert!(got.1["message"].as_str().unwrap_or_default().contains("privileged"), "{}", got.1);
    // A wrong type is the same kind of error.
    let got =
        answer(operator_post(&server, paths::ORGS).body(r#"{"name":7}"#).send().await.expect("sent")).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "invalid_body");
}

#[tokio::test]
async fn an_oversized_body_answers_413() {
    let server = TestServer::start().await.expect("server");
    let big = format!(r#"{{"name":"{}"}}"#, "x".repeat(outpost_protocol::MAX_BODY_BYTES));
    let got = answer(operator_post(&server, paths::ORGS).body(big).send().await.expect("sent")).await;
    assert_error(&got, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
}

#[tokio::test]
async fn a_body_without_a_json_content_type_answers_415() {
    let server = TestServer::start().await.expect("server");
    let http = https(server.ca_pem(), None);
    let req = http.post(format!("{}{}", server.url(), paths::ORGS)).bearer_auth(server.admin_token());
    let got = answer(req.body(r#"{"name":"x"}"#).send().await.expect("sent")).await;
    assert_error(&got, StatusCode::UNSUPPORTED_MEDIA_TYPE, "not_json");
}

#[tokio::test]
async fn unknown_routes_methods_and_queries_answer_json_errors() {
    let server = TestServer::start().await.expect("server");
    let http = https(server.ca_pem(), None);
    let got = answer(http.get(format!("{}/v1/nope", server.url())).send().await.expect("sent")).await;
    assert_error(&got, StatusCode::NOT_FOUND, "no_such_route");
    let got =
        answer(http.delete(format!("{}{}", server.url(), paths::JOBS)).send().await.expect("sent")).await;
    assert_error(&got, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    let url = format!("{}{}?limit=many", server.url(), paths::JOBS);
    let got = answer(http.get(url).bearer_auth(server.admin_token()).send().await.expect("sent")).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "bad_query");
}

#[tokio::test]
async fn a_number_with_a_zero_fraction_is_the_integer_it_equals() {
    let server = TestServer::start().await.expect("server");
    let org = server.operator().expect("operator").create_org("floats").await.expect("org");
    let path = paths::fill(paths::ORG_TOKENS, "org_id", &org.id);
    let got =
        answer(operator_post(&server, &path).body(r#"{"ttl_secs": 3600.0}"#).send().await.expect("sent"))
            .await;
    assert_eq!(got.0, StatusCode::CREATED, "JSON Schema's integer: {}", got.1);
    // A fraction is still no integer, and the refusal is the one it always was.
    let got =
        answer(operator_post(&server, &path).body(r#"{"ttl_secs": 3600.5}"#).send().await.expect("sent"))
            .await;
    assert_error(&got, StatusCode::BAD_REQUEST, "invalid_body");
    assert!(got.1["message"].as_str().unwrap_or_default().contains("ttl_secs"), "{}", got.1);
}
