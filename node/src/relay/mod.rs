//! The Relay: turns objects landing in the local object store into validated, numbered
//! events in a bounded, persisted outbox, for the uplink to send. It owns `Tree::Relay` and
//! `Tree::Events` of the StateStore and only ever reads the object store: it must never
//! write, move or delete site data, and never put an object's body into an event.
//!
//! A scan pass lists each watch after its persisted cursor in bounded pages; a reconciliation
//! pass lists whole prefixes to find objects that landed behind the cursor or were
//! overwritten, and forgets deleted keys. Every page's events, cursor, index and event counter
//! go into one atomic batch (see `state.rs`), so a kill at any point neither loses nor repeats
//! an event. Passes stop when the outbox holds `outbox_bound` events (back-pressure).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::objstore::{ObjectStore, ObjectStoreError};
use crate::store::{Op, StateStore, StoreError, Tree};

pub mod config;
pub mod event;
pub mod fields;
mod run;
mod scan;
pub mod schema;
mod state;
pub mod validate;

pub use config::{ConfigError, LocalTrigger, RelayConfig, Rules, Watch};
pub use event::{PassReport, RelayEvent, RelayMetrics};
pub use fields::Denial;

use state::State;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("relay watch {watch:?} could not list or read the object store: {source}")]
    Objects { watch: String, source: ObjectStoreError },
    #[error("relay watch {watch:?} could not read the body of {key}: {source}")]
    Read { watch: String, key: String, source: std::io::Error },
    #[error("relay state: {0}")]
    State(#[from] StoreError),
}

impl RelayError {
    /// Whether the same pass may succeed later (an unreachable store, a cut read): the
    /// caller backs off and retries. Anything else needs an operator.
    pub fn is_retryable(&self) -> bool {
        match self {
            RelayError::Objects { source, .. } => source.is_retryable(),
            RelayError::Read { .. } => true,
            RelayError::Config(_) | RelayError::State(_) => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, RelayError>;

/// Up to `limit` events waiting in the relay outbox kept in `store`, oldest first, without a
/// running relay (a results bundle is written while the agent is stopped).
pub fn outbox_events(
    store: Arc<dyn StateStore>,
    limit: usize,
) -> std::result::Result<Vec<RelayEvent>, StoreError> {
    State::new(store).pending_first(limit)
}

/// Drops every event up to and including `up_to_seq` from the relay outbox kept in `store`
/// (the control plane acknowledged them in a bundle). Returns how many went.
pub fn outbox_mark_sent(
    store: Arc<dyn StateStore>,
    up_to_seq: u64,
) -> std::result::Result<usize, StoreError> {
    let state = State::new(store);
    let ops: Vec<Op> = state
        .pending_keys()?
        .into_iter()
        .filter(|k| <[u8; 8]>::try_from(k.as_slice()).map(u64::from_be_bytes).is_ok_and(|s| s <= up_to_seq))
        .map(|k| Op::Delete(Tree::Events, k))
        .collect();
    let n = ops.len();
    if n > 0 {
        state.apply(ops)?;
    }
    Ok(n)
}

type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Extra state changes for a new event, applied in the same atomic batch as the event itself
/// (the agent's local triggers stage their jobs this way, so each fires exactly once).
pub type EventHook = Arc<dyn Fn(&RelayEvent) -> Vec<Op> + Send + Sync>;

/// Writes one entry to the node's audit log: `(action, detail)`. The agent passes one that
/// goes through the ledger, which serialises the hash chain.
pub type AuditHook = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// What a watch needs beyond its configuration, prepared once when the relay is built.
#[derive(Debug, Default)]
struct Prepared {
    schema: Option<schema::Schema>,
    /// `event_fields` the egress policy allows.
    fields: Vec<String>,
    /// `event_fields` it does not: named in every accepted event's `fields_denied`.
    policy_denied: Vec<String>,
}

#[derive(Default)]
struct Counters {
    seen: AtomicU64,
    accepted: AtomicU64,
    rejected: AtomicU64,
    list_calls: AtomicU64,
    sent: AtomicU64,
    fields_denied: AtomicU64,
    backpressure: AtomicBool,
}

/// The relay over one object store. Build one per node: it assumes it is the only writer of
/// its two trees.
pub struct Relay<S: ObjectStore> {
    objects: S,
    state: State,
    config: RelayConfig,
    counters: Counters,
    clock: Clock,
    hook: Option<EventHook>,
    prepared: BTreeMap<String, Prepared>,
    /// Event fields the egress policy refuses, found when the relay was built.
    policy_denials: Vec<Denial>,
    audit: Option<AuditHook>,
    /// (watch, field) pairs whose run-time denial was audited already: once per relay is
    /// enough for the audit log; every denial is still logged and counted.
    audited: std::sync::Mutex<BTreeSet<(String, String)>>,
    /// Passes read the event counter and write it back: one pass at a time.
    pass: tokio::sync::Mutex<()>,
    /// Notified when a pass put events in the outbox, so the sender need not poll.
    ready: tokio::sync::Notify,
}

impl<S: ObjectStore> std::fmt::Debug for Relay<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("watches", &self.config.watches.len()).finish()
    }
}

impl<S: ObjectStore> Relay<S> {
    /// Build a relay after checking its configuration, loading each watch's JSON Schema, and
    /// splitting each watch's `event_fields` by the egress policy in
    /// `config.allowed_event_fields` (the refused ones are logged here; see [`Relay::with_audit`]).
    pub fn new(objects: S, state: Arc<dyn StateStore>, config: RelayConfig) -> Result<Self> {
        config.validate()?;
        let mut prepared = BTreeMap::new();
        let mut policy_denials = Vec::new();
        for w in &config.watches {
            let schema =
                w.rules.json_schema.as_deref().map(|p| schema::Schema::load(&w.name, p)).transpose()?;
            let (fields, denied) =
                fields::split_by_policy(&w.name, &w.event_fields, &config.allowed_event_fields);
            for d in &denied {
                tracing::warn!(watch = %d.watch, field = %d.field, reason = %d.reason, "relay event field withheld by the egress policy");
            }
            let policy_denied = denied.iter().map(|d| d.field.clone()).collect();
            policy_denials.extend(denied);
            prepared.insert(w.name.clone(), Prepared { schema, fields, policy_denied });
        }
        Ok(Self {
            objects,
            state: State::new(state),
            config,
            counters: Counters::default(),
            clock: Arc::new(crate::clock::now_unix_ms),
            hook: None,
            prepared,
            policy_denials,
            audit: None,
            audited: std::sync::Mutex::default(),
            pass: tokio::sync::Mutex::new(()),
            ready: tokio::sync::Notify::new(),
        })
    }

    /// Audit egress denials through `hook`: at once an `egress.denied` entry for each event
    /// field the policy refuses, then one for each (watch, field) first withheld at run time
    /// because its value is not a short scalar.
    pub fn with_audit(mut self, hook: AuditHook) -> Self {
        for d in &self.policy_denials {
            hook("egress.denied", &d.audit_detail());
        }
        self.audit = Some(hook);
        self
    }

    /// Event fields that watches ask for and the egress policy refuses.
    pub fn denied_fields(&self) -> &[Denial] {
        &self.policy_denials
    }

    /// Use another clock for event timestamps and lag (tests).
    pub fn with_clock(mut self, clock: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Add state changes to the batch of every new event (see [`EventHook`]).
    pub fn with_event_hook(mut self, hook: EventHook) -> Self {
        self.hook = Some(hook);
        self
    }

    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// Up to `limit` unsent events, oldest first, for the uplink.
    pub fn pending_events(&self, limit: usize) -> Result<Vec<RelayEvent>> {
        Ok(self.state.pending_first(limit)?)
    }

    /// Resolves once a pass has put new events in the outbox since the last call (a permit is
    /// kept when nobody waits, so a wake-up between a look and a wait is not missed).
    pub async fn events_ready(&self) {
        self.ready.notified().await;
    }

    /// Drop every event up to and including `up_to_seq` from the outbox, once the control
    /// plane has stored them. Idempotent; returns how many were removed.
    pub fn mark_sent(&self, up_to_seq: u64) -> Result<usize> {
        let ops: Vec<Op> = self
            .state
            .pending_keys()?
            .into_iter()
            .filter(|k| {
                <[u8; 8]>::try_from(k.as_slice()).map(u64::from_be_bytes).is_ok_and(|s| s <= up_to_seq)
            })
            .map(|k| Op::Delete(Tree::Events, k))
            .collect();
        let n = ops.len();
        if n > 0 {
            self.state.apply(ops)?;
            self.counters.sent.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(n)
    }

    pub fn metrics(&self) -> Result<RelayMetrics> {
        let depth = self.state.pending_keys()?.len() as u64;
        let oldest = self.state.pending_first(1)?;
        let now = (self.clock)();
        Ok(RelayMetrics {
            objects_seen: self.counters.seen.load(Ordering::Relaxed),
            objects_accepted: self.counters.accepted.load(Ordering::Relaxed),
            objects_rejected: self.counters.rejected.load(Ordering::Relaxed),
            pending_depth: depth,
            lag_ms: oldest.first().map(|e| now.saturating_sub(e.observed_unix_ms)),
            backpressure: self.counters.backpressure.load(Ordering::Relaxed),
            last_seq: self.state.last_seq()?,
            list_calls: self.counters.list_calls.load(Ordering::Relaxed),
            events_sent: self.counters.sent.load(Ordering::Relaxed),
            fields_denied: self.counters.fields_denied.load(Ordering::Relaxed),
        })
    }

    /// Log, count and (once per watch and field) audit the fields withheld from one event.
    fn withheld(&self, event: &RelayEvent, by_value: &[(String, String)]) {
        self.counters.fields_denied.fetch_add(event.fields_denied.len() as u64, Ordering::Relaxed);
        for (field, reason) in by_value {
            let key = crate::objstore::key::display(&event.key);
            tracing::warn!(watch = %event.watch, key = %key, field = %field, reason = %reason, "relay event field withheld");
            let Some(audit) = &self.audit else { continue };
            let first = self
                .audited
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((event.watch.clone(), field.clone()));
            if first {
                let d = Denial { watch: event.watch.clone(), field: field.clone(), reason: reason.clone() };
                audit("egress.denied", &format!("{} (first seen in {key})", d.audit_detail()));
            }
        }
    }

    fn count(&self, report: &PassReport) {
        self.counters.seen.fetch_add(report.events + report.vanished, Ordering::Relaxed);
        self.counters.accepted.fetch_add(report.accepted, Ordering::Relaxed);
        self.counters.rejected.fetch_add(report.rejected, Ordering::Relaxed);
        self.counters.list_calls.fetch_add(report.list_calls, Ordering::Relaxed);
    }
}
