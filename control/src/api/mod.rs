//! The HTTP API: the router, shared state, and the pieces every handler uses (JSON bodies with
//! JSON errors, operator and node authentication). Handlers live in `operator.rs` and `node.rs`.

mod node;
pub mod openapi;
mod operator;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use outpost_protocol::{ErrorBody, NodeInfo, paths};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::clock::Clock;
use crate::longpoll::NodeWakers;
use crate::pki::{CertAuthority, PeerCert};
use crate::store::{StateStore, StoreError};

/// Longest a node's poll is held.
pub const MAX_POLL_WAIT: Duration = Duration::from_secs(30);

/// What every handler shares.
pub struct AppState {
    pub store: Arc<dyn StateStore>,
    pub ca: CertAuthority,
    /// SHA-256 of the admin token; the token itself is compared only through its digest.
    pub admin_token_sha256: [u8; 32],
    pub wakers: NodeWakers,
    pub clock: Clock,
}

pub type Shared = Arc<AppState>;

/// The verified client certificate of the connection, if it presented one.
#[derive(Debug, Clone, Default)]
pub struct ConnPeer(pub Option<PeerCert>);

pub fn router(state: Shared) -> Router {
    Router::new()
        .route(paths::HEALTH, get(operator::health))
        .route(paths::OPENAPI, get(openapi::document))
        .route(paths::ORGS, post(operator::create_org).get(operator::list_orgs))
        .route(paths::ORG_TOKENS, post(operator::create_token))
        .route(paths::ENROLL, post(node::enroll))
        .route(paths::NODE_POLL, post(node::poll))
        .route(paths::NODE_RESULTS, post(node::report))
        .route(paths::NODE_HEARTBEAT, post(node::heartbeat))
        .route(paths::JOBS, post(operator::submit_job).get(operator::list_jobs))
        .route(paths::JOB, get(operator::get_job))
        .route(paths::NODES, get(operator::list_nodes))
        .route(paths::NODE, get(operator::get_node))
        .route(paths::AUDIT, get(operator::list_audit))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "no_such_route", "no such API route; see /v1/openapi.json")
        })
        .layer(DefaultBodyLimit::max(outpost_protocol::MAX_BODY_BYTES))
        .with_state(state)
}

/// Every non-2xx answer: a status and an [`ErrorBody`].
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self { status, body: ErrorBody { code: code.into(), message: message.into() } }
    }
    pub fn bad_request(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", what)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "state store failed");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!("the control plane's store failed: {e}; retry later"),
        )
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// A JSON body whose every rejection is a JSON [`ErrorBody`]: 400 for malformed JSON or unknown
/// fields, 413 for a body over [`outpost_protocol::MAX_BODY_BYTES`], 415 without a JSON type.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Body(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    let status = r.status();
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "not_json",
        _ => "bad_json",
    };
    let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
        format!("request body is larger than {} bytes", outpost_protocol::MAX_BODY_BYTES)
    } else {
        r.body_text()
    };
    ApiError::new(status, code, message)
}

/// Proof that the request carried the admin bearer token.
pub struct OperatorAuth;

impl FromRequestParts<Shared> for OperatorAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, ApiError> {
        let given = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(given) = given else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "operator calls need `Authorization: Bearer <admin token>`",
            ));
        };
        let digest: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        // Comparing fixed-size digests byte by byte without an early exit.
        let diff = digest.iter().zip(state.admin_token_sha256.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "bad_token", "the admin token is wrong"));
        }
        Ok(OperatorAuth)
    }
}

/// An enrolled node, proven by its client certificate.
pub struct NodeAuth(pub NodeInfo);

impl FromRequestParts<Shared> for NodeAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, ApiError> {
        let peer = parts.extensions.get::<ConnPeer>().and_then(|p| p.0.clone());
        let Some(peer) = peer else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "client_cert_required",
                "node calls need the client certificate issued at enrollment (mutual TLS)",
            ));
        };
        let node = state.store.get_node(&peer.node_id).await?;
        match node {
            Some(node) if node.cert_sha256 == peer.cert_sha256 => Ok(NodeAuth(node)),
            Some(_) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "cert_superseded",
                format!("node {} has enrolled again; this certificate is no longer valid", peer.node_id),
            )),
            None => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "unknown_node",
                format!("node {} is not enrolled", peer.node_id),
            )),
        }
    }
}

impl AppState {
    /// Best effort: an audit write failing must not turn a served request into an error, but
    /// it is logged loudly.
    pub async fn audit(&self, actor: &str, action: &str, detail: &str) {
        if let Err(e) = self.store.append_audit(actor, action, detail, self.clock.now_ms()).await {
            tracing::error!(error = %e, action, detail, "cannot write the audit trail");
        }
    }
}
