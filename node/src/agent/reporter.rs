//! Drains the outbox: sends each finished result until the control plane acknowledges it, with
//! exponential backoff and jitter while it is unreachable. A result is marked Reported only
//! after the acknowledgement, and the control plane dedupes by idempotency key, so a crash
//! between the two sends it again and it is still stored once.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Agent;
use super::poller::sleep_or_cancel;
use crate::backoff::Backoff;
use crate::ledger::JobState;
use crate::runtime::Runtime;

impl<R: Runtime> Agent<R> {
    pub(super) async fn reporter(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        while !shutdown.is_cancelled() {
            let notified = self.shared.outbox.notified();
            let outbox = match self.ledger.in_state(JobState::Finished) {
                Ok(o) => o,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the outbox");
                    sleep_or_cancel(&shutdown, Duration::from_secs(1)).await;
                    continue;
                }
            };
            if outbox.is_empty() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = notified => {}
                    _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                }
                continue;
            }
            for mut rec in outbox {
                let Some(report) = rec.result.clone() else { continue };
                if let Some(local) = rec.local.clone() {
                    // A local trigger's job: its result stays on site, in the object store.
                    match self.deliver_local_result(&mut rec, &local, &report).await {
                        Ok(()) => {
                            self.shared.counted.delivered(report.outcome);
                            backoff.reset();
                            self.shared.capacity.notify_waiters();
                            self.shared.changed.notify_one();
                            continue;
                        }
                        Err(e) if e.is_retryable() => {
                            let delay = backoff.next_delay();
                            tracing::warn!(error = %e, retry_in = ?delay, job = %rec.job_id, "local result not stored; retrying");
                            sleep_or_cancel(&shutdown, delay).await;
                            break;
                        }
                        Err(e) => {
                            let detail = format!("result of local job {} cannot be stored: {e}", rec.job_id);
                            tracing::error!("{detail}");
                            rec.state = JobState::Undeliverable;
                            if let Err(e) = self.ledger.update_audited(&rec, "result.undeliverable", &detail)
                            {
                                tracing::error!(error = %e, "cannot persist the refusal");
                            }
                            continue;
                        }
                    }
                }
                // A report in flight is finished even during shutdown (bounded by the grace period).
                match self.uplink.report(&report).await {
                    Ok(ack) => {
                        self.shared.contact_ok();
                        backoff.reset();
                        rec.state = JobState::Reported;
                        self.shared.counted.delivered(report.outcome);
                        if let Err(e) = self.ledger.update(&rec) {
                            tracing::error!(error = %e, job = %rec.job_id, "cannot mark the result reported; it will be sent again");
                        } else {
                            tracing::info!(job = %rec.job_id, duplicate = ack.duplicate, "result delivered");
                        }
                        self.shared.capacity.notify_waiters();
                        self.shared.changed.notify_one();
                    }
                    Err(e) if e.is_retryable() => {
                        self.shared.contact_failed(&e);
                        let delay = backoff.next_delay();
                        tracing::warn!(error = %e, retry_in = ?delay, job = %rec.job_id, "result not delivered; retrying");
                        sleep_or_cancel(&shutdown, delay).await;
                        break;
                    }
                    Err(e) => {
                        let detail = format!("result of job {} refused for good: {e}", rec.job_id);
                        tracing::error!("{detail}");
                        rec.state = JobState::Undeliverable;
                        if let Err(e) = self.ledger.update_audited(&rec, "result.undeliverable", &detail) {
                            tracing::error!(error = %e, "cannot persist the refusal");
                        }
                        self.shared.capacity.notify_waiters();
                        self.shared.changed.notify_one();
                    }
                }
                if shutdown.is_cancelled() {
                    return;
                }
            }
        }
    }
}
