//! Long-polls the control plane for jobs, verifies each manifest and persists it (accepted or
//! rejected) before acknowledging it on the next poll. Stops fetching while the queue or the
//! outbox is at its bound, so nothing piles up in memory.

use std::sync::Arc;
use std::time::Duration;

use outpost_protocol::{CancelAttempt, JobAssignment, Outcome, PollRequest};
use tokio_util::sync::CancellationToken;

use super::Agent;
use crate::backoff::Backoff;
use crate::clock::now_unix_ms;
use crate::ledger::{JobRecord, JobState};
use crate::runtime::Runtime;
use crate::verify::valid_job_id;

/// While the queue or outbox is full, how often the poller still asks for stops and service
/// changes.
const FULL_RECHECK: Duration = Duration::from_secs(5);

impl<R: Runtime> Agent<R> {
    pub(super) async fn poller(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        let wait = Duration::from_secs(self.cfg.control.poll_wait_secs.min(30));
        while !shutdown.is_cancelled() {
            let (acks, room) = match self.poll_plan() {
                Ok(plan) => plan,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the ledger");
                    sleep_or_cancel(&shutdown, Duration::from_secs(1)).await;
                    continue;
                }
            };
            let service_acks = self.services.acks().unwrap_or_else(|e| {
                tracing::error!(error = %e, "cannot read the service book");
                Vec::new()
            });
            if room == 0 && acks.is_empty() && service_acks.is_empty() {
                // Full: wait until a job finishes or the outbox drains; meanwhile ask now and
                // then, with room for no job, for stops and service changes.
                let room_made = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = self.shared.capacity.notified() => true,
                    _ = tokio::time::sleep(FULL_RECHECK) => false,
                };
                if room_made {
                    continue;
                }
            }
            let req = PollRequest {
                ack_job_ids: acks.iter().map(|(id, _)| id.clone()).collect(),
                wait_secs: Some(if room == 0 { 0 } else { wait.as_secs() }),
                max_jobs: Some(room),
                announce: Some(outpost_protocol::Announce::this_build()),
                service_acks: service_acks.clone(),
            };
            let result = tokio::select! {
                r = self.uplink.poll(&req, wait) => r,
                _ = shutdown.cancelled() => return,
            };
            match result {
                Ok(resp) => {
                    self.shared.contact_ok();
                    backoff.reset();
                    if let Err(e) = self.ledger.mark_acked(&acks) {
                        tracing::error!(error = %e, "cannot record acknowledgements; they will be sent again");
                    }
                    if let Err(e) = self.services.acked(&service_acks) {
                        tracing::error!(error = %e, "cannot record service acknowledgements; they will be sent again");
                    }
                    // Before the jobs of the same answer: they may be signed by a key it announces.
                    if let Some(tag) = &resp.trust {
                        self.follow_trust(tag).await;
                    }
                    // Before the jobs of the same answer: they meet the settings in force.
                    if let Some(settings) = resp.org_settings
                        && let Err(e) = crate::org_settings::heard(
                            &self.cfg.data_dir,
                            &self.policy,
                            &self.ledger,
                            settings,
                        )
                    {
                        tracing::error!(error = %e, "cannot keep the organisation's settings; the next poll brings them again");
                    }
                    let mut desired_changed = false;
                    for env in &resp.services {
                        let now = now_unix_ms();
                        match crate::services::receive(
                            &self.services,
                            &self.ledger,
                            &self.verifier,
                            &self.cfg,
                            &self.policy.get(),
                            env,
                            now,
                        ) {
                            Ok(crate::services::Received::Accepted) => desired_changed = true,
                            Ok(_) => {}
                            Err(e) => {
                                tracing::error!(error = %e, "cannot persist a service's desired state; the control plane will offer it again")
                            }
                        }
                    }
                    if desired_changed {
                        self.service_wake.notify_one();
                    }
                    self.service_reported.notify_one();
                    if !resp.logs.is_empty() {
                        self.request_logs(resp.logs, &shutdown);
                    }
                    // Stops first: an attempt cancelled before it arrives must never start.
                    for c in resp.cancel {
                        if let Err(e) = self.cancel(&c) {
                            tracing::error!(error = %e, job = %c.job_id, "cannot record a cancellation; the control plane will ask again");
                        }
                    }
                    for a in resp.jobs {
                        if let Err(e) = self.accept(a) {
                            tracing::error!(error = %e, "cannot persist a received job; the control plane will offer it again");
                        }
                    }
                }
                Err(e) => {
                    self.shared.contact_failed(&e);
                    let delay = backoff.next_delay();
                    if e.is_retryable() {
                        tracing::warn!(error = %e, retry_in = ?delay, "poll failed; retrying");
                    } else {
                        tracing::error!(error = %e, retry_in = ?delay, "control plane refused the poll");
                    }
                    sleep_or_cancel(&shutdown, delay).await;
                }
            }
        }
    }

    /// Jobs to acknowledge, and how many new ones we can take.
    fn poll_plan(&self) -> Result<(Vec<(String, u32)>, u32), crate::store::StoreError> {
        let all = self.ledger.all()?;
        let acks = all.iter().filter(|r| !r.acked).map(|r| (r.job_id.clone(), r.attempt)).collect();
        // Jobs held for approval take room too: nobody approving must not grow the ledger.
        let queued = all
            .iter()
            .filter(|r| matches!(r.state, JobState::Staged | JobState::Running | JobState::AwaitingApproval))
            .count() as u32;
        let outbox = all.iter().filter(|r| r.state == JobState::Finished).count() as u32;
        let a = &self.cfg.agent;
        let room = if outbox >= a.outbox_limit { 0 } else { a.queue_limit.saturating_sub(queued) };
        Ok((acks, room))
    }

    /// The control plane asks to stop an attempt (an operator's cancel, or a later attempt on
    /// another node replaced it). It asks again on every poll until the attempt's result
    /// arrives, so this only has to act once per ask: a running attempt is stopped by its
    /// executor, one we never received is recorded as cancelled (so it can never start) and
    /// reported, and one that has ended already has its result on the way.
    fn cancel(&self, c: &CancelAttempt) -> Result<(), crate::store::StoreError> {
        if !valid_job_id(&c.job_id) {
            return Ok(());
        }
        match self.ledger.get(&c.job_id, c.attempt)? {
            Some(rec) if matches!(rec.state, JobState::Staged | JobState::Running) => {
                if self.shared.request_cancel(&c.job_id, c.attempt, &c.reason) {
                    tracing::info!(job = %c.job_id, attempt = c.attempt, reason = %c.reason, "stopping the job");
                }
                self.shared.work.notify_one();
            }
            // Held for the site's approval, never started: it ends cancelled at once (unless an
            // approver decided first: read again under the decision lock).
            Some(rec) if rec.state == JobState::AwaitingApproval => {
                let _one = self.decisions.lock().unwrap_or_else(|p| p.into_inner());
                let Some(mut rec) = self.ledger.get(&c.job_id, c.attempt)?.filter(|r| r.state == rec.state)
                else {
                    self.shared.work.notify_one();
                    return Ok(());
                };
                let why = format!("cancelled while it waited for the site's approval: {}", c.reason);
                rec.state = JobState::Finished;
                rec.result = Some(crate::intake::unrun_report(&rec, Outcome::Cancelled, &why, now_unix_ms()));
                let detail = format!("job {} attempt {}: {why}", c.job_id, c.attempt);
                self.ledger.update_audited(&rec, "job.cancelled", &detail)?;
                self.shared.outbox.notify_one();
                self.shared.changed.notify_one();
            }
            Some(_) => {}
            None => {
                let now = now_unix_ms();
                let mut rec = JobRecord {
                    job_id: c.job_id.clone(),
                    attempt: c.attempt,
                    seq: 0,
                    state: JobState::Finished,
                    // Nothing to acknowledge: the control plane never saw us take it.
                    acked: true,
                    received_unix_ms: now,
                    spec: None,
                    envelope: crate::intake::no_envelope(),
                    result: None,
                    local: None,
                };
                let why = format!("cancelled before this node received it: {}", c.reason);
                rec.result = Some(crate::intake::unrun_report(&rec, Outcome::Cancelled, &why, now));
                let detail = format!("job {} attempt {}: {why}", c.job_id, c.attempt);
                self.ledger.insert(&rec, false, Some(("job.cancelled", &detail)))?;
                self.shared.outbox.notify_one();
                self.shared.changed.notify_one();
            }
        }
        Ok(())
    }

    /// Persist one assignment (see [`crate::intake`]) and wake whoever has work from it.
    fn accept(&self, a: JobAssignment) -> Result<(), crate::store::StoreError> {
        match crate::intake::take_job(&self.ledger, &self.verifier, &self.policy.get(), &a, now_unix_ms())? {
            crate::intake::Intake::Accepted { .. } => {
                self.shared.work.notify_one();
                self.shared.changed.notify_one();
            }
            crate::intake::Intake::Rejected(_) | crate::intake::Intake::Refused(_) => {
                self.shared.outbox.notify_one();
                self.shared.changed.notify_one();
            }
            crate::intake::Intake::AwaitingApproval => self.shared.changed.notify_one(),
            crate::intake::Intake::Known | crate::intake::Intake::Unusable => {}
        }
        Ok(())
    }
}

pub(super) async fn sleep_or_cancel(shutdown: &CancellationToken, d: Duration) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}
