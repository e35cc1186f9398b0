//! Relay events: nodes deliver batches over mutual TLS (stored once per node and seq, then the
//! org's triggers fire, then the ack); operators list them, optionally long-polling for new
//! ones. A batch is acknowledged only after it is durable and its triggers have fired.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use outpost_protocol::{
    ErrorBody, EventAck, EventBatch, EventList, MAX_EVENTS_PER_BATCH, ObjectEvent, paths,
};
use serde::Deserialize;

use super::jobs::MAX_KEY_BYTES;
use super::{ApiError, ApiResult, Body, Caller, NodeAuth, Params, Shared, triggers};
use crate::store::{EventFilter, EventOrder};

const DEFAULT_LIST: usize = 100;
const MAX_LIST: usize = 1000;

#[utoipa::path(post, path = paths::NODE_EVENTS, tag = "node", request_body = EventBatch,
    description = "Deliver relay events, oldest first. Idempotent by (node, seq): an event whose seq is \
                   stored already counts as a duplicate and is not stored again. The org's triggers are \
                   evaluated for every event of the batch (duplicates included) before the answer, each \
                   firing at most once per event; the node may drop every event up to `up_to_seq`.",
    responses((status = 200, body = EventAck),
        (status = 400, description = "malformed batch, unknown fields, bad seq order or fields", body = ErrorBody),
        (status = 401, description = "no client certificate", body = ErrorBody),
        (status = 403, description = "node unknown or certificate not the enrolled one", body = ErrorBody),
        (status = 413, description = "body over 1 MiB", body = ErrorBody),
        (status = 503, description = "store failed; resend the batch", body = ErrorBody)),
    security(("node_certificate" = [])))]
pub async fn deliver(
    NodeAuth(node): NodeAuth,
    State(st): State<Shared>,
    Body(batch): Body<EventBatch>,
) -> ApiResult<Json<EventAck>> {
    Ok(Json(store_node_events(&st, &node, batch).await?))
}

/// Stores a node's events once each (by node and seq) and fires the org's triggers: whether
/// they came over the network or in a results bundle.
pub(super) async fn store_node_events(
    st: &Shared,
    node: &outpost_protocol::NodeInfo,
    batch: EventBatch,
) -> ApiResult<EventAck> {
    check_batch(&batch)?;
    let outcome =
        st.store.store_events(&node.node_id, &node.org_id, batch.events.clone(), st.clock.now_ms()).await?;
    st.metrics.events(u64::from(outcome.stored), u64::from(outcome.duplicates));
    let actor = format!("node:{}", node.node_id);
    for gap in &outcome.gaps {
        let detail = format!("node {} event seq jumped from {} to {}", node.node_id, gap.after, gap.seq);
        st.audit(&actor, Some(&node.org_id), "event.gap", &detail).await;
    }
    tracing::debug!(node = %node.node_id, stored = outcome.stored, duplicates = outcome.duplicates,
        up_to_seq = outcome.up_to_seq, "events delivered");
    let fired = triggers::fire(st, node, &batch.events).await;
    // Wake listings even when firing failed: the events themselves are stored.
    st.events_stored.notify_waiters();
    fired?;
    Ok(EventAck { up_to_seq: outcome.up_to_seq, stored: outcome.stored, duplicates: outcome.duplicates })
}

/// Refuses a batch the node should never have sent, naming the first bad event.
fn check_batch(batch: &EventBatch) -> ApiResult<()> {
    let n = batch.events.len();
    if n == 0 || n > MAX_EVENTS_PER_BATCH {
        return Err(ApiError::bad_request(
            "bad_batch",
            format!("a batch carries 1 to {MAX_EVENTS_PER_BATCH} events, not {n}"),
        ));
    }
    let mut previous = 0;
    for e in &batch.events {
        check_event(e, previous)
            .map_err(|why| ApiError::bad_request("bad_event", format!("event seq {}: {why}", e.seq)))?;
        previous = e.seq;
    }
    Ok(())
}

fn check_event(e: &ObjectEvent, previous: u64) -> Result<(), String> {
    if e.seq == 0 {
        return Err("seq starts at 1".into());
    }
    if e.seq <= previous {
        return Err(format!("seqs must increase strictly within a batch (after {previous})"));
    }
    if e.key.is_empty() || e.key.len() > MAX_KEY_BYTES {
        return Err(format!("key must be 1 to {MAX_KEY_BYTES} bytes, not {}", e.key.len()));
    }
    if e.watch.is_empty() || e.bucket.is_empty() {
        return Err("watch and bucket must not be empty".into());
    }
    if let Some(sha) = &e.sha256
        && (sha.len() != 64 || !sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
    {
        return Err(format!("sha256 {sha:?} must be 64 lowercase hex digits"));
    }
    Ok(())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventQuery {
    /// Only events of this organisation.
    pub org_id: Option<String>,
    /// Only events of this node. Without `cursor`, they come in the node's seq order.
    pub node_id: Option<String>,
    /// With `node_id`: only events with a higher seq (per-node order).
    pub after_seq: Option<u64>,
    /// Only events that arrived after the one with this `cursor` (arrival order across nodes;
    /// pass the last `cursor` seen to follow). Not together with `after_seq`.
    pub cursor: Option<u64>,
    /// The most recent `limit` matches instead of the oldest (still listed oldest first).
    #[serde(default)]
    pub newest: bool,
    /// At most this many (default 100; more than 1000 is taken as 1000).
    #[param(value_type = Option<u64>)]
    pub limit: Option<usize>,
    /// Hold the request up to this many seconds (at most the server's `--max-hold`, 30 by
    /// default; more is taken as that) while nothing matches.
    pub wait_secs: Option<u64>,
}

#[utoipa::path(get, path = paths::EVENTS, tag = "events", params(EventQuery),
    description = "Stored relay events, oldest first, with the jobs triggers started for them. \
                   `node_id` alone or with `after_seq` lists one node's events in seq order; otherwise \
                   events come in arrival order and `cursor` resumes after the last one seen. With \
                   `wait_secs` an empty answer is held until an event is stored (long-poll).",
    responses((status = 200, body = EventList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn list_events(
    caller: Caller,
    State(st): State<Shared>,
    Params(q): Params<EventQuery>,
) -> ApiResult<Json<EventList>> {
    // Another organisation's events do not exist for this caller.
    if q.org_id.as_deref().is_some_and(|o| !caller.sees(o)) {
        return Ok(Json(EventList::default()));
    }
    let org_id = q.org_id.clone().or_else(|| caller.org_filter().map(str::to_owned));
    let order = match (q.node_id, q.after_seq, q.cursor) {
        (_, Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "bad_query",
                "give after_seq (one node's seq order) or cursor (arrival order), not both",
            ));
        }
        (None, Some(_), None) => {
            return Err(ApiError::bad_request("bad_query", "after_seq needs node_id (seqs are per node)"));
        }
        (Some(node_id), after_seq, None) => EventOrder::BySeq { node_id, after_seq: after_seq.unwrap_or(0) },
        (node_id, None, cursor) => EventOrder::ByCursor { node_id, after_cursor: cursor.unwrap_or(0) },
    };
    let filter =
        EventFilter { org_id, order, newest: q.newest, limit: q.limit.unwrap_or(DEFAULT_LIST).min(MAX_LIST) };
    let wait = q.wait_secs.map_or(Duration::ZERO, Duration::from_secs).min(st.max_hold);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // Register interest before looking, so an event stored in between wakes us.
        let notified = st.events_stored.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let events = st.store.list_events(filter.clone()).await?;
        if !events.is_empty() || filter.limit == 0 || tokio::time::Instant::now() >= deadline {
            return Ok(Json(EventList { events }));
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = st.shutdown.cancelled() => return Ok(Json(EventList::default())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64) -> ObjectEvent {
        ObjectEvent {
            seq,
            watch: "w".into(),
            bucket: "b".into(),
            key: "k".into(),
            size: 0,
            etag: "e".into(),
            sha256: Some("0".repeat(64)),
            content_type: None,
            accepted: true,
            reason: None,
            replaces_etag: None,
            observed_unix_ms: 0,
            fields: Default::default(),
            fields_denied: Vec::new(),
        }
    }

    #[test]
    fn events_are_checked_field_by_field() {
        assert_eq!(check_event(&event(1), 0), Ok(()));
        assert!(check_event(&event(0), 0).is_err());
        assert!(check_event(&event(3), 3).unwrap_err().contains("increase"));
        let mut e = event(1);
        e.sha256 = Some("A".repeat(64));
        assert!(check_event(&e, 0).unwrap_err().contains("lowercase"));
        e = event(1);
        e.key = "k".repeat(MAX_KEY_BYTES + 1);
        assert!(check_event(&e, 0).is_err());
        e = event(1);
        e.watch.clear();
        assert!(check_event(&e, 0).is_err());
    }
}
