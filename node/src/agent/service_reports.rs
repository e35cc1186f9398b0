//! Delivers service status reports to the control plane, oldest first, and drops them only
//! once the control plane says it stored them (by node and seq, so a resend after a cut network
//! or a kill -9 is harmless). Also starts the service reconciler once the engine answers.

use std::sync::Arc;
use std::time::Duration;

use outpost_protocol::ServiceReportBatch;
use tokio_util::sync::CancellationToken;

use super::Agent;
use super::poller::sleep_or_cancel;
use crate::backoff::Backoff;
use crate::runtime::Runtime;
use crate::services::reconcile::Reconciler;

/// Reports per request.
const BATCH: usize = 100;
const IDLE_RECHECK: Duration = Duration::from_secs(5);

impl<R: Runtime> Agent<R> {
    pub(super) fn service_reconciler(&self) -> Reconciler<R> {
        Reconciler::new(
            Arc::clone(&self.runtime),
            self.services.clone(),
            self.ledger.clone(),
            self.cfg.services.clone(),
            Arc::clone(&self.service_wake),
            Arc::clone(&self.service_reported),
            crate::services::reconcile::InputSource {
                objects: Arc::clone(&self.objects),
                root: crate::services::inputs::root(&self.cfg.data_dir),
            },
        )
        .with_policy(self.policy.clone(), &self.identity.node.org_id)
        .with_restart_counter(self.shared.counted.service_restarts.clone())
    }

    pub(super) async fn service_report_sender(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        loop {
            let pending = match self.services.pending(BATCH) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the service report outbox");
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
                    () = self.service_reported.notified() => {}
                    () = tokio::time::sleep(IDLE_RECHECK) => {}
                }
                continue;
            }
            let batch = ServiceReportBatch { reports: pending };
            let sent = tokio::select! {
                r = self.uplink.post_service_reports(&batch) => r,
                () = shutdown.cancelled() => return,
            };
            match sent {
                Ok(ack) => {
                    self.shared.contact_ok();
                    backoff.reset();
                    if let Err(e) = self.services.delivered(ack.up_to_seq) {
                        tracing::error!(error = %e, "cannot update the service report outbox; the reports are sent again");
                    }
                }
                Err(e) => {
                    self.shared.contact_failed(&e);
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "service reports not delivered; retrying");
                    sleep_or_cancel(&shutdown, delay).await;
                    if shutdown.is_cancelled() {
                        return;
                    }
                }
            }
        }
    }
}
