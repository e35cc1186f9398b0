//! The control plane's Prometheus metrics, served on their own plain-HTTP listener
//! (`metrics_listen`, off unless set) in the Prometheus text format.
//!
//! Counters and histograms live here and are updated where things happen; the fleet's state
//! (nodes online, jobs by state) is read from the store at each scrape. No label carries a job
//! id, node id or object key: every label has a small, fixed set of values (route templates,
//! outcomes, states), so the series count does not grow with the fleet.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{AppState, Shared};
use outpost_protocol::JobState;

type Labels = Vec<(&'static str, String)>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// Latency buckets from 1 ms to about 33 s.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// The figures updated as the control plane works. Cloning shares them.
#[derive(Clone)]
pub struct ControlMetrics {
    http_requests: Family<Labels, Counter>,
    http_seconds: Histograms,
    jobs_submitted: Counter,
    results: Family<Labels, Counter>,
    dispatch_seconds: Histogram,
    polls_held: Gauge,
    events_stored: Counter,
    events_duplicate: Counter,
    store_seconds: Histograms,
    audit_failures: Counter,
}

impl Default for ControlMetrics {
    fn default() -> Self {
        let metrics = Self {
            http_requests: Family::default(),
            http_seconds: Family::new_with_constructor(latency),
            jobs_submitted: Counter::default(),
            results: Family::default(),
            dispatch_seconds: latency(),
            polls_held: Gauge::default(),
            events_stored: Counter::default(),
            events_duplicate: Counter::default(),
            store_seconds: Family::new_with_constructor(latency),
            audit_failures: Counter::default(),
        };
        metrics.seed();
        metrics
    }
}

/// Held while a node's poll waits: the gauge of held polls counts it until dropped.
pub struct HeldPoll(Gauge);

impl Drop for HeldPoll {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl ControlMetrics {
    pub fn job_submitted(&self) {
        self.jobs_submitted.inc();
    }

    /// A result stored for the first time, by its outcome's wire name.
    pub fn result_stored(&self, outcome: &str) {
        self.results.get_or_create(&vec![("outcome", outcome.to_owned())]).inc();
    }

    /// A job reached its node: from submission to the poll answer that carried it.
    pub fn dispatched(&self, waited: Duration) {
        self.dispatch_seconds.observe(waited.as_secs_f64());
    }

    pub fn poll_held(&self) -> HeldPoll {
        self.polls_held.inc();
        HeldPoll(self.polls_held.clone())
    }

    pub fn events(&self, stored: u64, duplicates: u64) {
        self.events_stored.inc_by(stored);
        self.events_duplicate.inc_by(duplicates);
    }

    /// How long one store operation took; `op` is one of a fixed few names.
    pub fn store_op(&self, op: &'static str, took: Duration) {
        self.store_seconds.get_or_create(&vec![("op", op.to_owned())]).observe(took.as_secs_f64());
    }

    pub fn audit_failed(&self) {
        self.audit_failures.inc();
    }

    /// Series that exist before anything happened, so that dashboards and alerts see zeros
    /// rather than no data.
    fn seed(&self) {
        for outcome in outpost_protocol::Outcome::ALL {
            let _ = self.results.get_or_create(&vec![("outcome", outpost_protocol::wire_name(&outcome))]);
        }
        for op in ["insert_job", "queued_jobs", "store_result"] {
            let _ = self.store_seconds.get_or_create(&vec![("op", op.to_owned())]);
        }
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "outpost_control_http_requests",
            "API requests by route, method and status",
            self.http_requests.clone(),
        );
        r.register(
            "outpost_control_http_request_seconds",
            "API request latency by route (held polls included)",
            self.http_seconds.clone(),
        );
        r.register(
            "outpost_control_jobs_submitted",
            "Jobs submitted (one per node for a group)",
            self.jobs_submitted.clone(),
        );
        r.register(
            "outpost_jobs",
            "Results stored, by outcome (each job's first report)",
            self.results.clone(),
        );
        r.register(
            "outpost_dispatch_seconds",
            "From a job's submission to the poll answer that carried it to its node",
            self.dispatch_seconds.clone(),
        );
        r.register(
            "outpost_control_longpoll_connections",
            "Node polls being held open now",
            self.polls_held.clone(),
        );
        r.register("outpost_control_relay_events_stored", "Relay events stored", self.events_stored.clone());
        r.register(
            "outpost_control_relay_events_duplicate",
            "Relay events delivered again and not stored twice",
            self.events_duplicate.clone(),
        );
        r.register(
            "outpost_control_store_seconds",
            "Latency of the state store's hot operations",
            self.store_seconds.clone(),
        );
        r.register(
            "outpost_control_audit_write_failures",
            "Audit entries the store could not write",
            self.audit_failures.clone(),
        );
    }
}

/// Counts every API request by its route template (never the path itself) and status class.
pub async fn track(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    // Any method name reaches here, before authentication: only the standard ones get a label.
    let method = match req.method().as_str() {
        m @ ("GET" | "POST" | "PUT" | "DELETE" | "HEAD" | "OPTIONS" | "PATCH") => m,
        _ => "other",
    }
    .to_owned();
    let started = Instant::now();
    let response = next.run(req).await;
    let status = format!("{}xx", response.status().as_u16() / 100);
    let m = &st.metrics;
    m.http_requests
        .get_or_create(&vec![("route", route.clone()), ("method", method), ("status", status)])
        .inc();
    m.http_seconds.get_or_create(&vec![("route", route)]).observe(started.elapsed().as_secs_f64());
    response
}

/// The whole exposition: the live figures and the fleet read from the store now.
pub async fn render(st: &AppState) -> Result<String, crate::store::StoreError> {
    let mut registry = Registry::default();
    st.metrics.register(&mut registry);

    let build = Family::<Labels, Gauge>::default();
    build.get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_owned())]).set(1);
    registry.register("outpost_control_build_info", "The running version", build);

    let nodes = Family::<Labels, Gauge>::default();
    let (online, offline) = st.presence(None).await?;
    nodes.get_or_create(&vec![("state", "online".into())]).set(i64::try_from(online).unwrap_or(i64::MAX));
    nodes.get_or_create(&vec![("state", "offline".into())]).set(i64::try_from(offline).unwrap_or(i64::MAX));
    registry.register("outpost_control_nodes", "Enrolled nodes, online (within the lease) or not", nodes);

    let jobs = Family::<Labels, Gauge>::default();
    let counts = st.store.job_counts(None).await?;
    for state in [JobState::Queued, JobState::Accepted, JobState::Finished, JobState::Cancelled] {
        let n = i64::try_from(counts.of(state)).unwrap_or(i64::MAX);
        jobs.get_or_create(&vec![("state", outpost_protocol::wire_name(&state))]).set(n);
    }
    registry.register("outpost_control_jobs", "Jobs by state", jobs);

    let uptime = Gauge::<f64, AtomicU64>::default();
    uptime.set(st.clock.now_ms().saturating_sub(st.started_unix_ms) as f64 / 1000.0);
    registry.register("outpost_control_uptime_seconds", "Seconds since this process started", uptime);

    let mut out = String::new();
    prometheus_text::encode(&mut out, &registry)
        .map_err(|e| crate::store::StoreError::Backend(e.to_string()))?;
    Ok(out)
}

async fn scrape(State(st): State<Shared>) -> Response {
    match render(&st).await {
        Ok(body) => {
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
        }
        Err(e) => {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot read the store: {e}\n")).into_response()
        }
    }
}

/// Binds the metrics listener (plain HTTP: keep it on loopback or a private network) and serves
/// `GET /metrics` until `shutdown`.
pub async fn bind(
    addr: SocketAddr,
    st: Shared,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new().route("/metrics", get(scrape)).with_state(Arc::clone(&st));
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the metrics listener stopped");
        }
    });
    Ok((bound, task))
}
