//! Runs one job attempt through the runtime, crash-safely. The ledger says how far we got:
//! Staged → create the container (idempotent by name) and persist Running; Running → inspect
//! and start the container only if the runtime says it was never started, else adopt it. So a
//! kill -9 at any point can neither lose the job nor start it twice.
//!
//! Job data follows the same states: inputs are staged (from scratch, every time) while the job
//! is Staged, before its container exists or has started; outputs are uploaded after the
//! container exited and before the result is persisted (uploads overwrite, so collecting again
//! after a crash is safe); the job's data directory is removed once the result is persisted.

use std::time::Duration;

use outpost_protocol::{ContainerSpec, JobSpec, MAX_OUTPUT_TAIL_BYTES, Outcome, ResultReport, Timings};
use tokio_util::sync::CancellationToken;

use super::Agent;
use crate::backoff::Backoff;
use crate::clock::now_unix_ms;
use crate::jobdata::{Collected, JobDataError, JobDirs};
use crate::ledger::{JobRecord, JobState};
use crate::runtime::{ContainerState, JobRef, Runtime, RuntimeError};

/// Most refused bodies or skipped files named one by one in a result's error or an audit entry.
const LISTED: usize = 20;

/// A result and, when output bodies were refused, the audit detail that records it.
pub(super) struct Finished {
    pub(super) report: ResultReport,
    pub(super) denied: Option<String>,
}

/// Why an execution stopped before producing a result.
pub(super) enum Stop {
    /// The agent is shutting down; the ledger keeps the job for the next start.
    Shutdown,
    /// The job cannot run; this becomes its result.
    Failed(String),
    /// The control plane asked to stop it before its container started.
    Cancelled,
    /// The site policy refuses it (checked again before every run: the policy may have been
    /// narrowed since the job arrived, and a local trigger's job is checked only here).
    Refused(String),
}

impl<R: Runtime> Agent<R> {
    pub(super) async fn execute(&self, mut rec: JobRecord, shutdown: CancellationToken) {
        let job = JobRef { job_id: rec.job_id.clone(), attempt: rec.attempt };
        let Some(spec) = rec.spec.clone() else {
            tracing::error!(job = %job.job_id, "ledger record without a spec in a runnable state");
            return;
        };
        let container = spec.container().is_some();
        let dirs = JobDirs::new(&self.cfg.data_dir, &job);
        let stop = self.shared.cancel_signal(&job.job_id, job.attempt);
        let refused = if rec.state == JobState::Staged { self.policy_refusal(&rec, &spec) } else { None };
        let outcome = match (&spec, &dirs) {
            _ if refused.is_some() => Err(Stop::Refused(refused.unwrap_or_default())),
            (JobSpec::Inference(i), _) => tokio::select! {
                r = self.infer(&rec, &job, i, &shutdown) => r,
                // Dropping the request stops generation at its next token.
                _ = stop.cancelled() => Err(Stop::Cancelled),
            },
            (JobSpec::Container(c), Ok(dirs)) => self.drive(&mut rec, &job, c, dirs, &stop, &shutdown).await,
            (JobSpec::Container(_), Err(e)) => Err(Stop::Failed(e.to_string())),
        };
        let (report, denied) = match outcome {
            Ok(Finished { report, denied }) => (report, denied),
            Err(Stop::Shutdown) => return,
            Err(Stop::Failed(msg)) => {
                tracing::warn!(job = %job.job_id, error = %msg, "job could not run");
                (self.report_for(&rec, Outcome::Error, None, Some(msg), Default::default(), None, None), None)
            }
            Err(Stop::Refused(why)) => {
                tracing::warn!(job = %job.job_id, reason = %why, "job refused by the site policy");
                (crate::intake::unrun_report(&rec, Outcome::Refused, &why, now_unix_ms()), None)
            }
            Err(Stop::Cancelled) => {
                let why = self.cancelled_because(&job);
                let mut report = self.report_for(
                    &rec,
                    Outcome::Cancelled,
                    None,
                    Some(why),
                    Default::default(),
                    None,
                    None,
                );
                report.timings.finished_unix_ms = Some(now_unix_ms());
                (report, None)
            }
        };
        let report = self.sealed(&rec, report);
        rec.state = JobState::Finished;
        let cancelled = (report.outcome == Outcome::Cancelled).then(|| {
            format!(
                "job {} attempt {}: {}",
                job.job_id,
                job.attempt,
                report.error.clone().unwrap_or_default()
            )
        });
        rec.result = Some(report);
        // The refusal is audited in the same batch as the result it belongs to.
        let refused = (report_outcome(&rec) == Some(Outcome::Refused)).then(|| {
            format!(
                "job {} attempt {}: {}",
                job.job_id,
                job.attempt,
                rec.result.as_ref().and_then(|r| r.error.clone()).unwrap_or_default()
            )
        });
        let persisted = match (&denied, &cancelled, &refused) {
            (Some(detail), _, _) => self.ledger.update_audited(&rec, "egress.denied", detail),
            (None, Some(detail), _) => self.ledger.update_audited(&rec, "job.cancelled", detail),
            (None, None, Some(detail)) => self.ledger.update_audited(&rec, "job.refused", detail),
            (None, None, None) => self.ledger.update(&rec),
        };
        if let Err(e) = persisted {
            // Not persisted: the next start finds the job as the ledger last recorded it and
            // collects it again. Going on would collect it again at once, in a loop.
            tracing::error!(job = %job.job_id, error = %e, "cannot persist the result; it will be collected again on restart");
            self.fail_stop(format!("cannot record the result of job {}: {e}", job.job_id), &shutdown);
            return;
        }
        self.shared.outbox.notify_one();
        self.shared.changed.notify_one();
        if !container {
            return;
        }
        if let Err(e) = self.runtime.remove(&job).await {
            tracing::warn!(job = %job.job_id, error = %e, "could not remove the finished container");
        }
        if let Ok(dirs) = dirs
            && let Err(e) = dirs.remove().await
        {
            tracing::warn!(job = %job.job_id, error = %e, "could not remove the finished job's data directory");
        }
    }

    /// The result as it may leave the site: for a job that names recipients, its tails and
    /// output bodies sealed for them and for the site's own (`[policy] seal_also_to`). Sealing
    /// cannot fail for recipients that passed intake; if it does anyway, the result keeps only
    /// its bookkeeping and says why (fail closed: nothing goes out in clear).
    fn sealed(&self, rec: &JobRecord, mut report: ResultReport) -> ResultReport {
        let Some(to) = self.seal_recipients(rec) else { return report };
        if let Err(e) = outpost_protocol::seal::seal_report(&mut report, &to) {
            tracing::error!(job = %rec.job_id, error = %e, "cannot seal the result; only its bookkeeping is reported");
            report.withhold_output();
            report.outcome = Outcome::Error;
            report.error = Some(format!(
                "the result could not be sealed for its recipients ({e}); its output stays on the node"
            ));
        }
        report
    }

    /// Whom what `rec` sends out is sealed for: its envelope's recipients and the site's own
    /// (`[policy] seal_also_to`); `None` for a job that names none (or a local trigger's).
    pub(super) fn seal_recipients(&self, rec: &JobRecord) -> Option<Vec<String>> {
        if rec.local.is_some() {
            return None;
        }
        let env = rec.signed_body().filter(|e| !e.recipients.is_empty())?;
        let mut to = env.recipients.clone();
        to.extend(self.policy.get().seal_also_to.iter().filter(|r| !env.recipients.contains(r)).cloned());
        Some(to)
    }

    fn cancelled_because(&self, job: &JobRef) -> String {
        let why = self.shared.cancel_reason(&job.job_id, job.attempt);
        if why.is_empty() { "cancelled".into() } else { why }
    }

    async fn drive(
        &self,
        rec: &mut JobRecord,
        job: &JobRef,
        spec: &ContainerSpec,
        dirs: &JobDirs,
        stop: &CancellationToken,
        shutdown: &CancellationToken,
    ) -> Result<Finished, Stop> {
        if stop.is_cancelled() && rec.state == JobState::Staged {
            return Err(Stop::Cancelled);
        }
        if rec.state == JobState::Staged
            && let Some(ContainerState::Running { .. } | ContainerState::Exited { .. }) =
                retry(shutdown, || self.runtime.inspect(job)).await?
        {
            // The ledger lost the write that said the container started (a full disk, a store
            // that failed): it ran, and its `/out` holds its outputs. Staging again would wipe
            // them; collect it as the running job it is.
            tracing::warn!(job = %job.job_id, "the ledger says staged, but the job's container has started: collecting it");
            rec.state = JobState::Running;
        }
        if rec.state == JobState::Staged {
            // No container of ours has started yet: staging from scratch is always safe.
            retry(shutdown, || dirs.prepare(spec, self.objects.as_ref())).await?;
        }
        // Launch a few containers at a time: the engine serialises much of create/start, and
        // twenty creates in flight make every job wait for all of them before any starts.
        let launch = tokio::select! {
            p = self.launch.acquire() => p.map_err(|_| Stop::Shutdown)?,
            _ = shutdown.cancelled() => return Err(Stop::Shutdown),
        };
        if rec.state == JobState::Staged {
            let mounts = dirs.mounts(spec);
            retry(shutdown, || self.runtime.create(job, spec, &mounts)).await?;
            rec.state = JobState::Running;
            self.ledger
                .update(rec)
                .map_err(|e| Stop::Failed(format!("cannot persist the job's state: {e}")))?;
        }
        let mut started = match retry(shutdown, || self.runtime.inspect(job)).await? {
            None => return Err(Stop::Failed("the job's container disappeared before it finished".into())),
            // Never started: stopping it is not starting it (the container is removed below).
            Some(ContainerState::Created) if stop.is_cancelled() => return Err(Stop::Cancelled),
            Some(ContainerState::Created) => {
                retry(shutdown, || self.runtime.start(job)).await?;
                now_unix_ms()
            }
            Some(ContainerState::Running { started_unix_ms }) => started_unix_ms,
            Some(ContainerState::Exited { started_unix_ms, .. }) => {
                started_unix_ms.unwrap_or_else(now_unix_ms)
            }
        };
        drop(launch);
        tracing::info!(job = %job.job_id, attempt = job.attempt, "job running");

        let deadline_ms = started.saturating_add(spec.timeout_secs.saturating_mul(1000));
        let remaining = Duration::from_millis(deadline_ms.saturating_sub(now_unix_ms()));
        let mut timed_out = false;
        let mut cancelled = false;
        // An engine that goes away (dockerd restarted or stopping) ends the wait with a
        // retryable error: wait again rather than fail a job whose container may still run.
        let exit = tokio::select! {
            r = retry(shutdown, || self.runtime.wait(job)) => Some(r),
            _ = tokio::time::sleep(remaining) => None,
            _ = stop.cancelled() => {
                cancelled = true;
                None
            }
            _ = shutdown.cancelled() => return Err(Stop::Shutdown),
        };
        let exit_code = match exit {
            Some(Ok(code)) => code,
            Some(Err(Stop::Failed(e))) => {
                return Err(Stop::Failed(format!("waiting for the container failed: {e}")));
            }
            Some(Err(stop)) => return Err(stop),
            None => {
                if cancelled {
                    tracing::info!(job = %job.job_id, "job cancelled; killing it");
                } else {
                    timed_out = true;
                    tracing::warn!(job = %job.job_id, timeout_secs = spec.timeout_secs, "job timed out; killing it");
                }
                retry(shutdown, || self.runtime.kill(job)).await?;
                retry(shutdown, || self.runtime.wait(job)).await?
            }
        };
        let mut finished = None;
        if let Ok(Some(ContainerState::Exited { started_unix_ms, finished_unix_ms, .. })) =
            self.runtime.inspect(job).await
        {
            started = started_unix_ms.unwrap_or(started);
            finished = finished_unix_ms;
        }
        let output = retry(shutdown, || self.runtime.output(job, MAX_OUTPUT_TAIL_BYTES)).await?;
        let outcome = match (cancelled, timed_out, exit_code) {
            (true, _, _) => Outcome::Cancelled,
            (_, true, _) => Outcome::TimedOut,
            (_, false, 0) => Outcome::Succeeded,
            (_, false, _) => Outcome::Failed,
        };
        let error = if cancelled {
            Some(format!("stopped: {}", self.cancelled_because(job)))
        } else {
            timed_out.then(|| format!("killed after the {} s timeout", spec.timeout_secs))
        };
        let mut report =
            self.report_for(rec, outcome, Some(exit_code), error, output, Some(started), finished);
        if report.timings.finished_unix_ms.is_none() {
            report.timings.finished_unix_ms = Some(now_unix_ms());
        }
        let mut denied = None;
        if spec.output_prefix.is_some() {
            let allowed = &self.cfg.egress.allow_body_prefixes;
            match retry(shutdown, || dirs.collect(spec, self.objects.as_ref(), allowed)).await {
                Ok(collected) => denied = self.apply_outputs(job, &mut report, collected),
                Err(stop @ (Stop::Shutdown | Stop::Cancelled | Stop::Refused(_))) => return Err(stop),
                Err(Stop::Failed(msg)) => {
                    report.outcome = Outcome::Error;
                    report.error = Some(format!(
                        "the job ran (exit code {exit_code}) but its outputs could not be stored: {msg}"
                    ));
                }
            }
        }
        tracing::info!(job = %job.job_id, outcome = ?report.outcome, exit_code, outputs = report.outputs.len(), "job finished");
        Ok(Finished { report, denied })
    }

    /// Put what collecting found into the report; returns the audit detail of refused bodies.
    fn apply_outputs(&self, job: &JobRef, report: &mut ResultReport, collected: Collected) -> Option<String> {
        let Collected { outputs, mut denied, skipped } = collected;
        report.outputs = outputs;
        // One result carries at most MAX_RESULT_BODIES_BYTES of bodies (sealed, about 4/3 of
        // that): the report always fits the control plane's request limit, so it is delivered.
        let mut budget = outpost_protocol::MAX_RESULT_BODIES_BYTES;
        for o in &mut report.outputs {
            let Some(body) = &o.body else { continue };
            if body.len() > budget {
                o.body = None;
                denied.push((
                    o.key.clone(),
                    format!(
                        "the result's output bodies would pass {} bytes in all",
                        outpost_protocol::MAX_RESULT_BODIES_BYTES
                    ),
                ));
            } else {
                budget -= body.len();
            }
        }
        if !skipped.is_empty() {
            tracing::warn!(job = %job.job_id, skipped = ?skipped, "some of the job's files under /out were not uploaded");
            let note = format!("not uploaded from /out: {}", listed(&skipped));
            report.error = Some(match report.error.take() {
                Some(e) => format!("{e}; {note}"),
                None => note,
            });
        }
        if denied.is_empty() {
            return None;
        }
        let reasons: Vec<String> = denied.iter().map(|(key, why)| format!("{key:?}: {why}")).collect();
        for (key, why) in &denied {
            tracing::warn!(job = %job.job_id, key = %key, reason = %why, "output body not sent: egress refused");
        }
        report.egress_denied = denied.into_iter().map(|(key, _)| key).collect();
        Some(format!(
            "job {} attempt {}: output bodies not sent: {}",
            job.job_id,
            job.attempt,
            listed(&reasons)
        ))
    }

    /// Why the site policy refuses to run `rec` now, if it does. A local trigger's job is
    /// submitted by its trigger in this node's organisation; a network job by whoever its
    /// signed envelope names.
    pub(super) fn policy_refusal(&self, rec: &JobRecord, spec: &JobSpec) -> Option<String> {
        let policy = self.policy.get();
        if policy.is_open() {
            return None;
        }
        // A local trigger's result stays on site; a job from the control plane or a bundle
        // without recipients would send its result out in clear.
        let (submitter, unsealed) = match &rec.local {
            Some(local) => {
                let by = outpost_protocol::Submitter {
                    local_trigger: Some(local.trigger.clone()),
                    ..outpost_protocol::Submitter::in_org(&self.identity.node.org_id)
                };
                (Some(by), false)
            }
            None => {
                let body = rec.signed_body();
                let unsealed = body.as_ref().is_none_or(|e| e.recipients.is_empty());
                (body.and_then(|e| e.submitter), unsealed)
            }
        };
        let work = crate::policy::Work::job(spec, submitter).unsealed(unsealed);
        match policy.evaluate(&work, true) {
            crate::policy::Decision::Refuse(r) => Some(r.to_string()),
            _ => None,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn report_for(
        &self,
        rec: &JobRecord,
        outcome: Outcome,
        exit_code: Option<i64>,
        error: Option<String>,
        output: crate::runtime::Output,
        started: Option<u64>,
        finished: Option<u64>,
    ) -> ResultReport {
        ResultReport {
            job_id: rec.job_id.clone(),
            attempt: rec.attempt,
            idempotency_key: ResultReport::key_for(&rec.job_id, rec.attempt),
            outcome,
            exit_code,
            error,
            stdout_tail: output.stdout_tail,
            stderr_tail: output.stderr_tail,
            output_truncated: output.truncated,
            timings: Timings {
                received_unix_ms: rec.received_unix_ms,
                started_unix_ms: started,
                finished_unix_ms: finished.or_else(|| (outcome == Outcome::Error).then(now_unix_ms)),
            },
            outputs: Vec::new(),
            egress_denied: Vec::new(),
            inference: None,
            sealed: None,
        }
    }
}

/// The first [`LISTED`] items, then how many more.
fn listed(items: &[String]) -> String {
    let mut text = items.iter().take(LISTED).cloned().collect::<Vec<_>>().join("; ");
    if items.len() > LISTED {
        text.push_str(&format!("; and {} more", items.len() - LISTED));
    }
    text
}

/// An error that says whether the same call may succeed later.
pub(super) trait Retryable: std::fmt::Display {
    fn retryable(&self) -> bool;
}

impl Retryable for RuntimeError {
    fn retryable(&self) -> bool {
        self.is_retryable()
    }
}

impl Retryable for JobDataError {
    fn retryable(&self) -> bool {
        self.is_retryable()
    }
}

/// Retry a runtime or object store call while it is unavailable; any other error ends the job.
pub(super) async fn retry<T, E, F, Fut>(shutdown: &CancellationToken, mut call: F) -> Result<T, Stop>
where
    E: Retryable,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if e.retryable() => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "call failed (runtime or object store unavailable); retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(Stop::Shutdown),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => return Err(Stop::Failed(e.to_string())),
        }
    }
}

fn report_outcome(rec: &JobRecord) -> Option<Outcome> {
    rec.result.as_ref().map(|r| r.outcome)
}
