//! The agent's Prometheus metrics on 127.0.0.1 only (`[metrics]`): never on another address,
//! so the node still has no inbound port from the network. A site's own Prometheus (or an
//! agent that forwards) scrapes it on the box.
//!
//! Almost everything is read at scrape time from what the agent already keeps (the ledger's
//! depths, the relay's and the inference manager's figures, the uplink's state); results
//! delivered are counted as they happen. No label carries a job id, node id or object key.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::Agent;
use crate::clock::now_unix_ms;
use crate::runtime::Runtime;

pub(crate) type Labels = Vec<(&'static str, String)>;

/// Figures counted as things happen (the rest is read at each scrape).
#[derive(Debug)]
pub(crate) struct Counted {
    /// Results handed over (to the control plane, or to the object store for a local
    /// trigger's job), by outcome.
    pub results_delivered: Family<Labels, Counter>,
    /// Service containers restarted (by their restart policy or after a failed health check).
    pub service_restarts: Counter,
}

impl Default for Counted {
    /// Every outcome's series exists from the start: dashboards see zeros, not gaps.
    fn default() -> Self {
        let results_delivered = Family::<Labels, Counter>::default();
        for outcome in outpost_protocol::Outcome::ALL {
            let _ =
                results_delivered.get_or_create(&vec![("outcome", outpost_protocol::wire_name(&outcome))]);
        }
        Self { results_delivered, service_restarts: Counter::default() }
    }
}

impl Counted {
    pub fn delivered(&self, outcome: outpost_protocol::Outcome) {
        self.results_delivered.get_or_create(&vec![("outcome", outpost_protocol::wire_name(&outcome))]).inc();
    }
}

fn gauge(r: &mut Registry, name: &str, help: &str, value: i64) {
    let g = Gauge::<i64>::default();
    g.set(value);
    r.register(name, help, g);
}

fn gauge_f(r: &mut Registry, name: &str, help: &str, value: f64) {
    let g = Gauge::<f64, AtomicU64>::default();
    g.set(value);
    r.register(name, help, g);
}

/// A counter whose running total someone else keeps: registered as a counter with that total.
fn total(r: &mut Registry, name: &str, help: &str, value: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(value);
    r.register(name, help, c);
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl<R: Runtime> Agent<R> {
    /// The exposition as of now.
    pub(crate) fn render_metrics(&self) -> Result<String, std::fmt::Error> {
        let mut r = Registry::default();
        let build = Family::<Labels, Gauge>::default();
        build.get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_owned())]).set(1);
        r.register("outpost_node_build_info", "The running agent's version", build);

        let shared = &self.shared;
        gauge(
            &mut r,
            "outpost_node_ready",
            "1 once the agent runs",
            i64::from(shared.ready.load(Ordering::Relaxed)),
        );
        gauge(
            &mut r,
            "outpost_node_runtime_ready",
            "1 while the container engine answers and jobs may run",
            i64::from(shared.runtime_ready.load(Ordering::Relaxed)),
        );
        gauge(
            &mut r,
            "outpost_node_connected",
            "1 while the last exchange with the control plane succeeded",
            i64::from(shared.connected.load(Ordering::Relaxed)),
        );
        let last = shared.last_contact_unix_ms.load(Ordering::Relaxed);
        if last > 0 {
            gauge_f(
                &mut r,
                "outpost_node_last_contact_age_seconds",
                "Seconds since the control plane last answered",
                now_unix_ms().saturating_sub(last) as f64 / 1000.0,
            );
        }

        let read = Instant::now();
        // An unreadable ledger fails the scrape (Prometheus marks the target down) rather than
        // showing empty queues.
        let depths = self.ledger.depths().map_err(|e| {
            tracing::warn!(error = %e, "metrics: cannot read the ledger");
            std::fmt::Error
        })?;
        gauge_f(
            &mut r,
            "outpost_node_ledger_read_seconds",
            "How long reading the ledger's job states took at this scrape (store latency)",
            read.elapsed().as_secs_f64(),
        );
        let jobs = Family::<Labels, Gauge>::default();
        for (state, n) in [
            ("staged", depths.staged),
            ("awaiting_approval", depths.awaiting_approval),
            ("running", depths.running),
            ("outbox", depths.outbox),
        ] {
            jobs.get_or_create(&vec![("state", state.to_owned())]).set(i(n));
        }
        r.register(
            "outpost_node_jobs",
            "Jobs on this node by state (outbox: finished, result not yet delivered)",
            jobs,
        );
        gauge(&mut r, "outpost_node_outbox_depth", "Results waiting to be delivered", i(depths.outbox));

        r.register(
            "outpost_node_results_delivered",
            "Results handed over (to the control plane, or to the object store for local jobs), by outcome",
            self.shared.counted.results_delivered.clone(),
        );

        r.register(
            "outpost_node_service_restarts",
            "Service containers restarted since the agent started",
            self.shared.counted.service_restarts.clone(),
        );

        // Zeros without a relay: the same series on every node.
        {
            let relay = self.relay.as_ref().and_then(|relay| relay.metrics().ok()).unwrap_or_default();
            total(
                &mut r,
                "outpost_node_relay_events_sent",
                "Relay events the control plane acknowledged",
                relay.events_sent,
            );
            gauge(
                &mut r,
                "outpost_node_relay_pending_events",
                "Relay events waiting to be sent",
                i(relay.pending_depth),
            );
            gauge_f(
                &mut r,
                "outpost_node_relay_lag_seconds",
                "Age of the oldest unsent relay event (0 when none waits)",
                relay.lag_ms.unwrap_or(0) as f64 / 1000.0,
            );
            gauge(
                &mut r,
                "outpost_node_relay_backpressure",
                "1 when the relay's last pass stopped at the outbox bound",
                i64::from(relay.backpressure),
            );
            let objects = Family::<Labels, Counter>::default();
            objects.get_or_create(&vec![("verdict", "accepted".into())]).inc_by(relay.objects_accepted);
            objects.get_or_create(&vec![("verdict", "rejected".into())]).inc_by(relay.objects_rejected);
            r.register("outpost_node_relay_objects", "Objects the relay evaluated, by verdict", objects);
        }

        // Zeros on an agent built without engines: the same series everywhere.
        {
            let m = self.inference.manager.metrics();
            total(
                &mut r,
                "outpost_inference_requests",
                "Inference requests admitted or refused",
                m.requests_total,
            );
            total(
                &mut r,
                "outpost_inference_refused_queue_full",
                "Inference requests refused because the queue was full",
                m.refused_queue_full_total,
            );
            total(
                &mut r,
                "outpost_inference_completion_tokens",
                "Tokens generated",
                m.completion_tokens_total,
            );
            total(
                &mut r,
                "outpost_inference_prompt_tokens",
                "Prompt tokens processed",
                m.prompt_tokens_total,
            );
            gauge(
                &mut r,
                "outpost_inference_queue_depth",
                "Inference requests waiting for a turn",
                m.queue_depth as i64,
            );
            gauge(&mut r, "outpost_inference_running", "Inference requests computing now", m.running as i64);
            gauge_f(
                &mut r,
                "outpost_inference_last_tokens_per_second",
                "Decode speed of the last generation",
                m.last_tokens_per_s,
            );
        }

        let mut out = String::new();
        prometheus_text::encode(&mut out, &r)?;
        Ok(out)
    }

    /// Serves `GET /metrics` on 127.0.0.1:`port` until `shutdown`. A port that cannot be bound
    /// is logged and skipped: metrics never keep the agent from running jobs.
    pub(crate) async fn serve_metrics(self: Arc<Self>, shutdown: CancellationToken) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.cfg.metrics.port));
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(%addr, error = %e, "cannot serve metrics; set [metrics] port, or enabled = false");
                return;
            }
        };
        if let Ok(bound) = listener.local_addr() {
            if let Ok(mut m) = self.shared.metrics_addr.lock() {
                *m = Some(bound.to_string());
            }
            self.shared.changed.notify_one();
            tracing::info!(addr = %bound, "metrics listening (GET /metrics, loopback only)");
        }
        let app = Router::new().route("/metrics", get(scrape::<R>)).with_state(Arc::clone(&self));
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await {
            tracing::warn!(error = %e, "the metrics listener stopped");
        }
    }
}

async fn scrape<R: Runtime>(State(agent): State<Arc<Agent<R>>>) -> Response {
    // The ledger is read from disk: off the async workers.
    match tokio::task::spawn_blocking(move || agent.render_metrics()).await {
        Ok(Ok(body)) => {
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
        }
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "cannot render the metrics\n").into_response(),
    }
}
