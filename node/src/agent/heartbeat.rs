//! Sends a heartbeat with the node's inventory every `heartbeat_secs`. A failed heartbeat is
//! only logged: the next one carries fresher data anyway.

use std::sync::Arc;
use std::time::Duration;

use outpost_protocol::Heartbeat;
use tokio_util::sync::CancellationToken;

use super::Agent;
use crate::inventory;
use crate::runtime::Runtime;

/// Settled (reported, acknowledged) jobs kept in the ledger for `outpost status` and debugging;
/// older ones are pruned so the ledger stays bounded.
const SETTLED_KEEP: usize = 1000;

/// How long a heartbeat waits for the container engine's inventory before going without it.
const ENGINE_WAIT: Duration = Duration::from_secs(5);

impl<R: Runtime> Agent<R> {
    /// Word from the control plane (the trust window): written to the ledger now and then.
    fn note_heard(&self) {
        use std::sync::atomic::Ordering;
        let now = crate::clock::now_unix_ms();
        if now.saturating_sub(self.shared.trust_written.load(Ordering::Relaxed)) < 60_000 {
            return;
        }
        match crate::trust::heard(self.ledger.store().as_ref(), now) {
            Ok(()) => self.shared.trust_written.store(now, Ordering::Relaxed),
            Err(e) => tracing::warn!(error = %e, "cannot record contact with the control plane"),
        }
    }

    pub(super) async fn heartbeat(self: Arc<Self>, shutdown: CancellationToken) {
        let every = Duration::from_secs(self.cfg.agent.heartbeat_secs);
        loop {
            // Bounded: behind a socket-activated dockerd that is slow or broken, a call is
            // accepted and then waits; the heartbeat must still go out, saying there is no engine.
            let runtime = tokio::select! {
                r = tokio::time::timeout(ENGINE_WAIT, self.runtime.info()) => match r {
                    Ok(Ok(info)) => {
                        self.shared.runtime_answered();
                        Some(info)
                    }
                    Ok(Err(e)) => {
                        self.shared.runtime_failed(&e);
                        None
                    }
                    Err(_) => {
                        self.shared.runtime_failed(&format_args!(
                            "the container engine did not answer within {} s",
                            ENGINE_WAIT.as_secs()
                        ));
                        None
                    }
                },
                _ = shutdown.cancelled() => return,
            };
            let depths = self.ledger.depths().unwrap_or_default();
            let hb = Heartbeat {
                relay: self.relay.as_ref().and_then(|r| r.metrics().ok()).map(Into::into),
                awaiting_approval: self.awaiting_approval(),
                ..inventory::heartbeat(&self.cfg, runtime.as_ref(), depths)
            };
            tokio::select! {
                r = self.uplink.heartbeat(&hb) => match r {
                    Ok(()) => {
                        self.shared.contact_ok();
                        self.note_heard();
                    }
                    Err(e) => {
                        self.shared.contact_failed(&e);
                        tracing::debug!(error = %e, "heartbeat not delivered");
                    }
                },
                _ = shutdown.cancelled() => return,
            }
            match self.ledger.prune_settled(SETTLED_KEEP) {
                Ok(0) => {}
                Ok(n) => tracing::debug!(removed = n, "pruned settled jobs from the ledger"),
                Err(e) => tracing::warn!(error = %e, "cannot prune the ledger"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}

impl<R: crate::runtime::Runtime> super::Agent<R> {
    /// The jobs the site policy holds for an approver, oldest first, for the control plane.
    fn awaiting_approval(&self) -> Vec<outpost_protocol::AwaitingApproval> {
        let Ok(all) = self.ledger.all() else { return Vec::new() };
        let mut out: Vec<outpost_protocol::AwaitingApproval> = all
            .into_iter()
            .filter(|r| r.state == crate::ledger::JobState::AwaitingApproval)
            .map(|r| outpost_protocol::AwaitingApproval {
                job_id: r.job_id,
                attempt: r.attempt,
                since_unix_ms: r.received_unix_ms,
            })
            .collect();
        out.sort_by_key(|a| a.since_unix_ms);
        out.truncate(outpost_protocol::MAX_AWAITING_LISTED);
        out
    }
}
