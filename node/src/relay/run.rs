//! The relay as a long-running service: a scan pass every `poll_interval_ms`, a reconciliation
//! pass once at start (objects that landed behind the cursor while the agent was down), every
//! `reconcile_every` scans, and `reconcile_after_activity` scans after a scan found new objects
//! (concurrent writers land keys out of order, behind the cursor); exponential backoff on
//! retryable failures. The agent runs it when `[relay]` has watches.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Relay, Result};
use crate::backoff::Backoff;
use crate::objstore::ObjectStore;

impl<S: ObjectStore> Relay<S> {
    /// Poll until `shutdown` fires. Returns early only on a failure that retrying will not
    /// fix (corrupt state, a refused configuration, a denied store).
    pub async fn run(&self, shutdown: CancellationToken) -> Result<()> {
        let interval = Duration::from_millis(self.config.poll_interval_ms);
        let mut backoff = Backoff::new(interval.max(Duration::from_millis(100)), Duration::from_secs(60));
        // Scans since the last reconciliation (None: none yet, so reconcile at start), and
        // whether any of them found new objects.
        let mut since: Option<u32> = None;
        let mut active = false;
        loop {
            let due = match since {
                None => true,
                Some(n) => {
                    (self.config.reconcile_every > 0 && n >= self.config.reconcile_every)
                        || (active
                            && self.config.reconcile_after_activity > 0
                            && n >= self.config.reconcile_after_activity)
                }
            };
            let outcome = async {
                let mut report = self.scan_pass().await?;
                let scanned = report.events;
                if due {
                    report.add(self.reconcile_pass().await?);
                }
                Ok::<_, super::RelayError>((report, scanned))
            }
            .await;
            let delay = match outcome {
                Ok((report, scanned)) => {
                    if due {
                        since = Some(0);
                        active = scanned > 0;
                    } else {
                        since = since.map(|n| n.saturating_add(1));
                        active |= scanned > 0;
                    }
                    backoff.reset();
                    if report.events > 0 {
                        tracing::debug!(events = report.events, rejected = report.rejected, "relay pass");
                    }
                    interval
                }
                Err(e) if e.is_retryable() => {
                    let d = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = d.as_millis() as u64, "relay pass failed; retrying");
                    d
                }
                Err(e) => {
                    tracing::error!(error = %e, "relay stopped");
                    return Err(e);
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(delay) => {}
            }
        }
    }
}
