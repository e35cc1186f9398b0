//! The relay as a long-running service: a scan pass every `poll_interval_ms`, a reconciliation
//! pass every `reconcile_every` scans (and once at start, for objects that landed while the
//! agent was down behind the cursor), exponential backoff on retryable failures. Not wired
//! into the agent yet.

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
        let mut scans: u64 = 0;
        loop {
            let reconcile = self.config.reconcile_every > 0
                && scans.is_multiple_of(u64::from(self.config.reconcile_every));
            let outcome = async {
                let mut report = self.scan_pass().await?;
                if reconcile {
                    report.add(self.reconcile_pass().await?);
                }
                Ok::<_, super::RelayError>(report)
            }
            .await;
            let delay = match outcome {
                Ok(report) => {
                    scans += 1;
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
