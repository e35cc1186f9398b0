//! Mirrors the node's hash-chained audit log to the control plane as it grows, oldest first,
//! from where the control plane's copy ends (kept in the ledger with what results bundles
//! carried, so the two paths never resend what is stored). The entries stay in the ledger
//! either way: nothing is dropped when the control plane refuses or cannot be reached.

use std::sync::Arc;
use std::time::Duration;

use outpost_protocol::{AuditBatch, MAX_AUDIT_BATCH};
use tokio_util::sync::CancellationToken;

use super::Agent;
use super::poller::sleep_or_cancel;
use crate::backoff::Backoff;
use crate::bundle::results::{audit_acked, audit_acknowledged};
use crate::runtime::Runtime;

/// Entries per batch: well under the control plane's body limit with long details.
const BATCH: usize = if MAX_AUDIT_BATCH < 200 { MAX_AUDIT_BATCH } else { 200 };

/// How long to wait before asking again a control plane that refused the log (an edited or
/// missing entry) or that has no route for it (older than this agent).
const REFUSED_WAIT: Duration = Duration::from_secs(3600);

impl<R: Runtime> Agent<R> {
    pub(super) async fn audit_uplink(self: Arc<Self>, shutdown: CancellationToken) {
        let idle = Duration::from_secs(self.cfg.agent.heartbeat_secs.max(1));
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        while !shutdown.is_cancelled() {
            let store = self.ledger.store();
            let next = audit_acked(store.as_ref())
                .and_then(|acked| crate::audit::entries_after(store.as_ref(), acked, BATCH));
            let entries = match next {
                Ok(entries) => entries,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the audit log to send it");
                    sleep_or_cancel(&shutdown, backoff.next_delay()).await;
                    continue;
                }
            };
            if entries.is_empty() {
                sleep_or_cancel(&shutdown, idle).await;
                continue;
            }
            let full = entries.len() == BATCH;
            match self.uplink.post_audit(&AuditBatch { entries }).await {
                Ok(ack) if ack.refused.is_none() => {
                    backoff.reset();
                    if let Err(e) = audit_acknowledged(store.as_ref(), ack.up_to_seq) {
                        tracing::error!(error = %e, "cannot record how far the audit log was sent");
                    }
                    if !full {
                        sleep_or_cancel(&shutdown, idle).await;
                    }
                }
                Ok(ack) => {
                    tracing::error!(
                        why = ack.refused.as_deref().unwrap_or_default(),
                        stored_up_to = ack.up_to_seq,
                        "the control plane refused this node's audit log: it does not continue the copy it \
                         holds (check it here with `outpost audit verify`)"
                    );
                    sleep_or_cancel(&shutdown, REFUSED_WAIT).await;
                }
                Err(e) if e.is_unknown_route() => {
                    tracing::info!(
                        "the control plane takes no audit log over the uplink (older); results bundles carry it"
                    );
                    sleep_or_cancel(&shutdown, REFUSED_WAIT).await;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::debug!(error = %e, retry_in = ?delay, "audit log not sent; retrying");
                    sleep_or_cancel(&shutdown, delay).await;
                }
            }
        }
    }
}
