//! The HTTP API: the router and the state every handler shares. Handlers live in
//! `operator.rs`, `jobs.rs` and `triggers.rs` (admin bearer token), `enroll.rs` (one-time
//! token), `node.rs` (mutual TLS) and `events.rs` (node delivery by mutual TLS, operator
//! listing); the extractors that authenticate and parse requests in `extract.rs`.

pub mod access;
mod bundles;
pub(crate) mod deploy;
mod enroll;
mod error;
pub(crate) mod events;
mod extract;
pub(crate) mod jobs;
pub mod logs;
pub(crate) mod node;
mod offline;
pub mod openapi;
pub(crate) mod operator;
pub mod placement;
pub mod rollout;
mod triggers;
mod trust;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, post};
use outpost_protocol::paths;
use tokio_util::sync::CancellationToken;

pub use access::{Caller, Scope};
pub use error::{ApiError, ApiResult};
pub(crate) use extract::constant_time_eq;
pub use extract::{Body, ConnPeer, NodeAuth, Params};

use crate::clock::Clock;
use crate::longpoll::NodeWakers;
use crate::store::StateStore;

/// What every handler shares.
pub struct AppState {
    pub store: Arc<dyn StateStore>,
    /// The CA (two during a rotation): issues node certificates, says what nodes trust.
    pub authority: Arc<crate::authority::Authority>,
    /// SHA-256 of the admin token; the token itself is compared only through its digest.
    pub admin_token_sha256: [u8; 32],
    pub wakers: NodeWakers,
    pub clock: Clock,
    /// Held from allocating a job's sequence number until the job is stored, so that jobs
    /// become visible to polls in sequence order (a node refuses a sequence number at or below
    /// one it has already accepted).
    pub submit_lock: tokio::sync::Mutex<()>,
    /// Woken whenever a node's events are stored: held event listings answer at once.
    pub events_stored: tokio::sync::Notify,
    /// Cancelled when the server shuts down: held polls answer at once.
    pub shutdown: CancellationToken,
    /// A node whose last heartbeat is older than this is offline: its `any` jobs are offered
    /// to another matching node.
    pub lease: Duration,
    /// Woken when a deployment changes or a node reports on its services: the rollout
    /// controller passes at once.
    pub fleet_changed: tokio::sync::Notify,
    /// Held by whatever reads, changes and writes deployments (the rollout pass, create,
    /// actions), so none of them overwrites another's change.
    pub fleet_lock: tokio::sync::Mutex<()>,
    /// When each node last polled (memory only; heartbeats are stored): a node holding a poll
    /// is alive even between heartbeats.
    pub contact: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// When this process started: after a restart every node counts as seen then, so a
    /// control-plane outage longer than the lease does not make the whole fleet look dead.
    pub started_unix_ms: u64,
    /// Open live log streams (memory only).
    pub logs: logs::LogHub,
    /// Per node, the cancel and service entries its last poll answer carried: a held poll is
    /// answered early only for entries it has not been sent yet.
    pub sent: std::sync::Mutex<std::collections::HashMap<String, std::collections::BTreeSet<String>>>,
    /// Prometheus figures (`metrics.rs`).
    pub metrics: crate::metrics::ControlMetrics,
    /// Web console sessions (memory only).
    pub console: crate::console::Sessions,
    /// Certificates of revoked nodes, shared with the TLS layer.
    pub revoked: crate::revocation::Revoked,
    /// The lifetime of certificates issued to agents that renew them.
    pub node_cert_lifetime: Duration,
    /// The longest a long-poll is held (a node's poll, `wait_secs` of event and log listings).
    pub max_hold: Duration,
}

pub type Shared = Arc<AppState>;

pub fn router(state: Shared) -> Router {
    Router::new()
        .merge(crate::console::router())
        .route(paths::HEALTH, get(operator::health))
        .route(paths::OPENAPI, get(openapi::document))
        .route(paths::ORGS, post(operator::create_org).get(operator::list_orgs))
        .route(paths::ORG_TOKENS, post(operator::create_token))
        .route(paths::ORG_SETTINGS, get(operator::org_settings).put(operator::put_org_settings))
        .route(paths::ORG_API_TOKENS, post(access::create_api_token).get(access::list_api_tokens))
        .route(paths::ORG_API_TOKEN, axum::routing::delete(access::revoke_api_token))
        .route(paths::ENROLL, post(enroll::enroll))
        .route(paths::NODE_POLL, post(node::poll))
        .route(paths::NODE_RESULTS, post(node::report))
        .route(paths::NODE_HEARTBEAT, post(node::heartbeat))
        .route(paths::NODE_CERTIFICATE, post(node::renew_certificate))
        .route(paths::NODE_AUDIT_UPLINK, post(node::upload_audit))
        .route(paths::NODE_TRUST, get(trust::get_node_trust))
        .route(paths::ORG_KEY_ROTATE, post(trust::rotate_org_key))
        .route(paths::CA_ROTATE, post(trust::rotate_ca))
        .route(paths::NODE_EVENTS, post(events::deliver))
        .route(paths::NODE_SERVICES, post(deploy::node_reports))
        .route(paths::ORG_BUNDLES, post(bundles::create))
        .route(paths::ORG_ENROLL_OFFLINE, post(offline::enroll_offline))
        .route(
            paths::BUNDLE_RESULTS,
            post(bundles::import_results).layer(DefaultBodyLimit::max(bundles::MAX_RESULTS_BUNDLE_BYTES)),
        )
        .route(paths::DEPLOYMENTS, post(deploy::create).get(deploy::list))
        .route(paths::DEPLOYMENT, get(deploy::get))
        .route(paths::DEPLOYMENT_ACTION, post(deploy::act))
        .route(paths::EVENTS, get(events::list_events))
        .route(paths::TRIGGERS, post(triggers::create_trigger).get(triggers::list_triggers))
        .route(paths::TRIGGER, get(triggers::get_trigger).delete(triggers::delete_trigger))
        .route(paths::JOBS, post(jobs::submit_job).get(jobs::list_jobs))
        .route(paths::JOB, get(jobs::get_job))
        .route(paths::JOB_CANCEL, post(jobs::cancel_job))
        .route(paths::JOB_LOGS, get(logs::job_logs))
        .route(paths::NODE_LOGS, post(logs::node_logs))
        .route(paths::JOB_GROUPS, post(jobs::submit_group))
        .route(paths::JOB_GROUP, get(jobs::get_group))
        .route(paths::NODES, get(operator::list_nodes))
        .route(paths::NODE, get(operator::get_node))
        .route(paths::NODE_LABELS, post(operator::label_node))
        .route(paths::NODE_REVOKE, post(operator::revoke_node))
        .route(paths::AUDIT, get(operator::list_audit))
        .route(paths::NODE_AUDIT, get(operator::node_audit))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "no_such_route", "no such API route; see /v1/openapi.json")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method; see /v1/openapi.json",
            )
        })
        .layer(DefaultBodyLimit::max(outpost_protocol::MAX_BODY_BYTES))
        .layer(axum::middleware::map_response(state_revision))
        .layer(axum::middleware::from_fn_with_state(state.clone(), crate::metrics::track))
        .with_state(state)
}

/// Every answer states the protocol revision this control plane speaks, so an agent knows what
/// it may send (see [`outpost_protocol::PROTOCOL_HEADER`]).
async fn state_revision(mut resp: axum::response::Response) -> axum::response::Response {
    resp.headers_mut().insert(
        outpost_protocol::PROTOCOL_HEADER,
        axum::http::HeaderValue::from(outpost_protocol::PROTOCOL_REVISION),
    );
    resp
}

/// Held while deployments are read, changed and written (see [`AppState::fleet_exclusive`]).
pub struct FleetGuard<'a> {
    _local: tokio::sync::MutexGuard<'a, ()>,
    _shared: Option<crate::store::ExclusiveGuard>,
}

impl AppState {
    /// Wakes `node_id`'s held polls here and on every other replica (the store tells them):
    /// for news the store does not announce itself (a revocation, a key rotation). A failed
    /// announcement costs the other replicas' polls at most their hold.
    pub async fn wake_everywhere(&self, node_id: &str) {
        self.wakers.wake(node_id);
        if let Err(e) = self.store.announce(node_id).await {
            tracing::warn!(node_id, error = %e, "cannot tell the other replicas; their polls of it see it at their next");
        }
    }

    /// Excludes every other rollout pass and deployment change: this process's by its lock,
    /// other replicas' by the store's.
    pub async fn fleet_exclusive(&self) -> Result<FleetGuard<'_>, crate::store::StoreError> {
        let local = self.fleet_lock.lock().await;
        let shared = self.store.exclusive("fleet").await?;
        Ok(FleetGuard { _local: local, _shared: shared })
    }

    /// Records that `node_id` is talking to us now.
    /// The CAs nodes should trust at `now_ms` (PEM) and the CA rotation under way.
    pub fn ca_trust(&self, now_ms: u64) -> (String, Option<outpost_protocol::CaRotation>) {
        self.authority.ca_trust(now_ms)
    }

    pub fn touch(&self, node_id: &str) {
        if let Ok(mut map) = self.contact.lock() {
            map.insert(node_id.to_owned(), self.clock.now_ms());
        }
    }

    /// The node with its last-seen time as the fleet logic uses it: the latest of its stored
    /// heartbeat, its last poll and this process's start.
    pub fn seen(&self, mut node: outpost_protocol::NodeInfo) -> outpost_protocol::NodeInfo {
        node.last_seen_unix_ms = self.seen_ms(&node);
        node
    }

    /// The last-seen time [`AppState::seen`] gives `node`, without taking the record.
    pub fn seen_ms(&self, node: &outpost_protocol::NodeInfo) -> Option<u64> {
        let polled = self.contact.lock().ok().and_then(|m| m.get(&node.node_id).copied());
        self.latest_seen(node.last_seen_unix_ms, polled)
    }

    /// The latest of a node's stored last-seen time, its last poll and this process's start.
    fn latest_seen(&self, stored: Option<u64>, polled: Option<u64>) -> Option<u64> {
        [stored, polled, Some(self.started_unix_ms)].into_iter().flatten().max()
    }

    /// Every enrolled node not revoked, seen as [`AppState::seen`] says: what placement and
    /// rollouts choose from.
    pub async fn fleet(&self) -> Result<Vec<outpost_protocol::NodeInfo>, crate::store::StoreError> {
        Ok(self
            .store
            .list_nodes()
            .await?
            .into_iter()
            .filter(|n| n.revoked_unix_ms.is_none())
            .map(|n| self.seen(n))
            .collect())
    }

    /// How many nodes of `org_id` (or of all) are online and offline, as [`AppState::seen`] and
    /// the lease say, from the stored last-seen times alone (no node record is read).
    pub async fn presence(&self, org_id: Option<&str>) -> Result<(u64, u64), crate::store::StoreError> {
        let now = self.clock.now_ms();
        let lease = self.lease_ms();
        let fresh = |ms: u64| now.saturating_sub(ms) <= lease;
        let nodes = self.store.node_presence(org_id).await?;
        let total = nodes.len() as u64;
        let contact = self.contact.lock().ok();
        let polled = |id: &str| contact.as_ref().and_then(|m| m.get(id).copied());
        let online = nodes
            .iter()
            .filter(|n| self.latest_seen(n.last_seen_unix_ms, polled(&n.node_id)).is_some_and(fresh))
            .count() as u64;
        Ok((online, total - online))
    }

    pub fn lease_ms(&self) -> u64 {
        u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX)
    }

    /// Appends to the audit trail; `org_id`: the organisation the action concerned, which is
    /// what that organisation's tokens see of the trail. Best effort: an audit write failing
    /// must not turn a served request into an error, but it is logged loudly and counted.
    pub async fn audit(&self, actor: &str, org_id: Option<&str>, action: &str, detail: &str) {
        tracing::info!(target: "outpost_control::audit", actor, org_id, action, detail);
        if let Err(e) = self.store.append_audit(actor, org_id, action, detail, self.clock.now_ms()).await {
            tracing::error!(error = %e, action, detail, "cannot write the audit trail");
            self.metrics.audit_failed();
        }
    }
}
