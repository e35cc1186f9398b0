//! Delivers the relay's outbox to the control plane: the oldest unsent events in one batch,
//! then `mark_sent` up to the seq the control plane says it stored. Until that answer arrives
//! the events stay in the persisted outbox, so a cut network or a kill -9 at any point resends
//! them, and the control plane's dedupe by (node, seq) makes the resend harmless.

use std::sync::Arc;
use std::time::Duration;

use outpost_protocol::{EventBatch, MAX_EVENTS_PER_BATCH};
use tokio_util::sync::CancellationToken;

use super::Agent;
use super::poller::sleep_or_cancel;
use crate::backoff::Backoff;
use crate::runtime::Runtime;

/// Longest pause between looks at the outbox when nothing wakes the sender.
const IDLE_RECHECK: Duration = Duration::from_secs(5);

impl<R: Runtime> Agent<R> {
    pub(super) async fn event_sender(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(relay) = self.relay.clone() else { return };
        let bucket = self.cfg.bucket_name().to_string();
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut refused_logged = None::<String>;
        loop {
            let pending = match relay.pending_events(MAX_EVENTS_PER_BATCH) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the relay outbox");
                    sleep_or_cancel(&shutdown, backoff.next_delay()).await;
                    if shutdown.is_cancelled() {
                        return;
                    }
                    continue;
                }
            };
            if pending.is_empty() {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = relay.events_ready() => {
                        // Local triggers may have staged jobs with these events.
                        self.shared.work.notify_one();
                    }
                    () = tokio::time::sleep(IDLE_RECHECK) => {}
                }
                continue;
            }
            if !self.cfg.relay.triggers.is_empty() {
                self.shared.work.notify_one();
            }
            let first = pending.first().map_or(0, |e| e.seq);
            let batch = EventBatch { events: pending.iter().map(|e| e.to_wire(&bucket)).collect() };
            let sent = tokio::select! {
                r = self.uplink.post_events(&batch) => r,
                () = shutdown.cancelled() => return,
            };
            match sent {
                Ok(ack) => {
                    self.shared.contact_ok();
                    backoff.reset();
                    refused_logged = None;
                    match relay.mark_sent(ack.up_to_seq) {
                        Ok(n) => tracing::debug!(
                            from = first,
                            up_to = ack.up_to_seq,
                            stored = ack.stored,
                            duplicates = ack.duplicates,
                            removed = n,
                            "events delivered"
                        ),
                        // Not removed: they are sent again and deduped by the control plane.
                        Err(e) => tracing::error!(error = %e, "cannot update the relay outbox"),
                    }
                    self.shared.changed.notify_one();
                }
                Err(e) if e.is_retryable() => {
                    self.shared.contact_failed(&e);
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "events not delivered; retrying");
                    sleep_or_cancel(&shutdown, delay).await;
                    if shutdown.is_cancelled() {
                        return;
                    }
                }
                Err(e) => {
                    // A refusal is a bug or a version mismatch, not a reason to drop data: keep
                    // the events, say so once (audited), and retry slowly.
                    let msg = e.to_string();
                    if refused_logged.as_deref() != Some(msg.as_str()) {
                        tracing::error!(error = %msg, first_seq = first, "the control plane refused relay events; they stay in the outbox");
                        if let Err(ae) =
                            self.ledger.audit("events.refused", &format!("from seq {first}: {msg}"))
                        {
                            tracing::error!(error = %ae, "cannot write the audit log");
                        }
                        refused_logged = Some(msg);
                    }
                    sleep_or_cancel(&shutdown, Duration::from_secs(30)).await;
                    if shutdown.is_cancelled() {
                        return;
                    }
                }
            }
        }
    }
}
