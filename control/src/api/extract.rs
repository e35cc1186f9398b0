//! Request extractors: JSON bodies and query strings whose every rejection is a JSON
//! [`ErrorBody`](outpost_protocol::ErrorBody), and the two ways a caller proves who it is (the
//! operator's bearer token, see `access.rs`; a node's client certificate from the TLS layer).

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use outpost_protocol::NodeInfo;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use super::{ApiError, Shared};
use crate::pki::PeerCert;

/// The verified client certificate of the connection, if it presented one. The listener puts
/// it on every request of the connection.
#[derive(Debug, Clone, Default)]
pub struct ConnPeer(pub Option<PeerCert>);

/// A JSON body: 400 for malformed JSON, a wrong shape or unknown fields, 413 for a body over
/// [`outpost_protocol::MAX_BODY_BYTES`], 415 without a JSON content type. A number written with
/// a zero fraction (`3600.0`) is taken for the integer it equals: JSON does not tell the two
/// apart, and JSON Schema (the API's document) calls both integers.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + utoipa::ToSchema> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let (parts, body) = req.into_parts();
        // Read within the route's body limit (`DefaultBodyLimit`), as `axum::Json` would.
        let read = Request::from_parts(parts.clone(), body);
        let bytes = axum::body::Bytes::from_request(read, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    "the request body is too large",
                )
            } else {
                ApiError::bad_request("bad_json", r.body_text())
            }
        })?;
        let again = || Request::from_parts(parts.clone(), axum::body::Body::from(bytes.clone()));
        let parsed = match axum::Json::<T>::from_request(again(), state).await {
            Ok(axum::Json(v)) => Ok(Body(v)),
            Err(JsonRejection::JsonDataError(e)) => {
                // Integral floats read as integers; any other refusal stands as it was.
                let refused = || json_rejection(JsonRejection::JsonDataError(e));
                let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
                    return Err(refused());
                };
                if !integral_floats_to_integers(&mut value) {
                    return Err(refused());
                }
                serde_json::from_value(value).map(Body).map_err(|_| refused())
            }
            Err(rejection) => Err(json_rejection(rejection)),
        }?;
        // serde reads a struct from a JSON array too (its fields in order); the document says
        // object, and so does this check.
        if let Some(why) = shape_error(&T::name(), &bytes) {
            return Err(ApiError::bad_request("invalid_body", why));
        }
        Ok(parsed)
    }
}

/// Where `body` has a JSON array where the API document's schema `name` says object (serde
/// would read the struct from the array): the first such place, or `None`. Only that: every
/// other rule the document states is the handler's to check, with its own error code. A walk
/// of the document's schemas, no validator: cheap on the hottest routes.
fn shape_error(name: &str, body: &[u8]) -> Option<String> {
    let doc = super::openapi::served();
    let schema = doc["components"]["schemas"].get(name)?;
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    array_for_object(doc, schema, &value, String::new(), 0).map(|at| {
        format!("at {}: an array where the document says object", if at.is_empty() { "/" } else { &at })
    })
}

/// `schema`, or the document's schema its `$ref` names (`None`: a reference it does not hold).
fn resolved<'a>(doc: &'a serde_json::Value, schema: &'a serde_json::Value) -> Option<&'a serde_json::Value> {
    match schema.get("$ref").and_then(serde_json::Value::as_str) {
        Some(target) => doc["components"]["schemas"].get(target.strip_prefix("#/components/schemas/")?),
        None => Some(schema),
    }
}

/// The JSON types `schema` names (one, a list, or none).
fn types_of(schema: &serde_json::Value) -> Vec<&str> {
    use serde_json::Value;
    match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

/// Whether `schema` (after its `$ref`) names no type or one that `value`'s JSON type fits. An
/// array fits a schema that wants an object here: the walk below finds that one.
fn admits(doc: &serde_json::Value, schema: &serde_json::Value, value: &serde_json::Value) -> bool {
    use serde_json::Value;
    let Some(schema) = resolved(doc, schema) else { return true };
    let types = types_of(schema);
    if types.is_empty() {
        return true;
    }
    let kind = match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    types
        .iter()
        .any(|t| *t == kind || (*t == "number" && kind == "integer") || (kind == "array" && *t == "object"))
}

/// The JSON pointer of the first array in `value` where `schema` wants an object. `$ref`s are
/// followed; a `oneOf`/`anyOf` is satisfied by any branch (`null` included).
fn array_for_object(
    doc: &serde_json::Value,
    schema: &serde_json::Value,
    value: &serde_json::Value,
    at: String,
    depth: usize,
) -> Option<String> {
    use serde_json::Value;
    // The document's own schemas nest a few levels; a deeper body is not walked further.
    if depth > 32 {
        return None;
    }
    if schema.get("$ref").is_some() {
        return array_for_object(doc, resolved(doc, schema)?, value, at, depth + 1);
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(branches) = schema.get(key).and_then(Value::as_array) {
            let mut first = None;
            // A branch of another JSON type (`null` for an array) is not the one the value took.
            for branch in branches.iter().filter(|b| admits(doc, b, value)) {
                match array_for_object(doc, branch, value, at.clone(), depth + 1) {
                    None => return None,
                    Some(found) => first = first.or(Some(found)),
                }
            }
            return first;
        }
    }
    let types = types_of(schema);
    let object = types.contains(&"object") || schema.get("properties").is_some();
    match value {
        Value::Array(_) if object && !types.contains(&"array") => Some(at),
        Value::Array(items) => {
            let item = schema.get("items")?;
            items
                .iter()
                .enumerate()
                .find_map(|(i, v)| array_for_object(doc, item, v, format!("{at}/{i}"), depth + 1))
        }
        Value::Object(map) => map.iter().find_map(|(k, v)| {
            let field = schema
                .get("properties")
                .and_then(|p| p.get(k))
                .or_else(|| schema.get("additionalProperties").filter(|a| a.is_object()))?;
            let key = k.replace('~', "~0").replace('/', "~1");
            array_for_object(doc, field, v, format!("{at}/{key}"), depth + 1)
        }),
        _ => None,
    }
}

/// Rewrites every float of `value` with no fraction, within the range where a float holds every
/// integer exactly (2^53), as that integer. Whether any was rewritten.
fn integral_floats_to_integers(value: &mut serde_json::Value) -> bool {
    use serde_json::Value;
    const EXACT: f64 = 9_007_199_254_740_992.0;
    match value {
        Value::Number(n) if n.is_f64() => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() <= EXACT => {
                *value = if f >= 0.0 { Value::from(f as u64) } else { Value::from(f as i64) };
                true
            }
            _ => false,
        },
        Value::Array(items) => items.iter_mut().fold(false, |any, v| integral_floats_to_integers(v) | any),
        Value::Object(map) => map.values_mut().fold(false, |any, v| integral_floats_to_integers(v) | any),
        _ => false,
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    match r.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is larger than {} bytes", outpost_protocol::MAX_BODY_BYTES),
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not_json",
            "the request body must be JSON with `Content-Type: application/json`",
        ),
        _ => match r {
            // axum answers 422 for a body of the wrong shape; the API says 400 for both.
            JsonRejection::JsonDataError(e) => ApiError::bad_request("invalid_body", e.body_text()),
            other => ApiError::bad_request("bad_json", other.body_text()),
        },
    }
}

/// Query parameters, 400 with a JSON error when they do not parse.
pub struct Params<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(Params(v)),
            Err(rejection) => Err(query_rejection(rejection)),
        }
    }
}

fn query_rejection(r: QueryRejection) -> ApiError {
    ApiError::bad_request("bad_query", r.body_text())
}

/// The bearer token of an operator call, `None` without an `Authorization: Bearer` header (the
/// scheme is case-insensitive, as HTTP's are).
pub(super) fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares two byte strings (digests, CSRF tokens) in constant time for their length: no early
/// exit on the first difference.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(super) fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// An enrolled node, proven by its client certificate: 401 without one, 403 when the node is
/// not enrolled or the certificate is not the one issued to it.
pub struct NodeAuth(pub NodeInfo);

impl FromRequestParts<Shared> for NodeAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, ApiError> {
        let peer = parts.extensions.get::<ConnPeer>().and_then(|p| p.0.clone());
        let Some(peer) = peer else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "client_cert_required",
                "node calls need the client certificate issued at enrollment (mutual TLS); enroll first",
            ));
        };
        let known = state.store.get_node(&peer.node_id).await?;
        let org = known.as_ref().map(|n| n.org_id.clone());
        let holds = |node: &NodeInfo| {
            node.cert_sha256 == peer.cert_sha256
                || node.previous_cert_sha256.as_deref() == Some(peer.cert_sha256.as_str())
        };
        let refusal = match known {
            Some(node) if holds(&node) && node.revoked_unix_ms.is_none() => {
                // The first call with a renewed certificate retires the one it replaced.
                if node.previous_cert_sha256.is_some() && node.cert_sha256 == peer.cert_sha256 {
                    return Ok(NodeAuth(state.store.forget_previous_cert(&node.node_id).await?));
                }
                return Ok(NodeAuth(node));
            }
            Some(node) if holds(&node) => revoked_refusal(&node.node_id),
            Some(_) => ApiError::new(
                StatusCode::FORBIDDEN,
                "cert_mismatch",
                format!(
                    "certificate {} is not the one issued to node {} at enrollment; enroll again",
                    peer.cert_sha256, peer.node_id
                ),
            ),
            None => ApiError::new(
                StatusCode::FORBIDDEN,
                "unknown_node",
                format!("node {} is not enrolled here; enroll again with a new token", peer.node_id),
            ),
        };
        // Only certificates our CA signed get this far, so the trail cannot be flooded.
        let detail = format!("{} {} ({})", parts.uri.path(), refusal.body.code, peer.cert_sha256);
        state.audit(&format!("node:{}", peer.node_id), org.as_deref(), "node.refused", &detail).await;
        Err(refusal)
    }
}

/// What a revoked node is told (a connection opened before the revocation, or a held poll).
pub(crate) fn revoked_refusal(node_id: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "node_revoked",
        format!(
            "node {node_id} was revoked by an operator; its certificate is refused from now on. \
             Enroll it again with a new token (or an offline enrollment bundle) to bring it back"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_array_where_the_document_says_object_is_refused_at_any_depth() {
        let says = shape_error("LabelNodeRequest", b"[]").expect("a top-level array");
        assert!(says.starts_with("at /:"), "{says}");
        let says =
            shape_error("CreateTriggerRequest", br#"{"org_id": "o", "name": "n", "on": [], "job": {}}"#)
                .expect("a nested array");
        assert!(says.starts_with("at /on:"), "{says}");
        // Under a oneOf (an optional struct, an untagged enum) and in a list of objects too.
        let says = shape_error("PollRequest", br#"{"announce": [2]}"#).expect("an optional struct");
        assert!(says.starts_with("at /announce:"), "{says}");
        assert_eq!(shape_error("PollRequest", br#"{"announce": null, "wait_secs": 5}"#), None);
        let says =
            shape_error("SubmitJobRequest", br#"{"node_id": "n", "spec": ["img"]}"#).expect("a job spec");
        assert!(says.starts_with("at /spec:"), "{says}");
        let says = shape_error("ServiceReportBatch", br#"{"reports": [[]]}"#).expect("an item");
        assert!(says.starts_with("at /reports/0:"), "{says}");
        assert_eq!(shape_error("LabelNodeRequest", br#"{"set": {"site": "icu"}}"#), None);
        // Other rules are the handler's: a name too long is not a shape error.
        assert_eq!(
            shape_error("CreateOrgRequest", format!(r#"{{"name": "{}"}}"#, "x".repeat(500)).as_bytes()),
            None
        );
        // A schema the document does not have checks nothing.
        assert_eq!(shape_error("NoSuchSchema", b"[]"), None);
    }

    #[test]
    fn digests_compare_equal_only_when_identical() {
        let a = [7u8; 32];
        let mut b = a;
        assert!(constant_time_eq(&a, &b));
        b[31] ^= 1;
        assert!(!constant_time_eq(&a, &b));
    }
}
