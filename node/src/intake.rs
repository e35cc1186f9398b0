//! How a job offered to this node enters its ledger, whichever way it came (a poll answer or a
//! bundle): verified first, then held to the site policy, then persisted as Staged, or persisted
//! as Finished with a Rejected (bad manifest) or Refused (site policy) result that goes out like
//! any other. A job the ledger already holds is only marked for a new acknowledgement.

use outpost_protocol::{JobAssignment, Outcome, ResultReport, SignedEnvelope, Timings};

use crate::ledger::{JobRecord, JobState, Ledger};
use crate::store::StoreError;
use crate::verify::{ManifestVerifier, valid_job_id};

/// What became of an offered job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intake {
    /// Verified and persisted: an executor will run it.
    Accepted { seq: u64 },
    /// Already in the ledger.
    Known,
    /// Refused (the reason); persisted with a Rejected result for the outbox.
    Rejected(String),
    /// Refused by the site policy (the rule and value); persisted with a Refused result.
    Refused(String),
    /// Verified and persisted, held by the site policy until an approver decides.
    AwaitingApproval,
    /// Its id cannot name anything here: refused and audited, nothing persisted.
    Unusable,
}

/// Verify and persist one assignment.
pub fn take_job(
    ledger: &Ledger,
    verifier: &ManifestVerifier,
    policy: &crate::policy::Policy,
    a: &JobAssignment,
    now: u64,
) -> Result<Intake, StoreError> {
    if !valid_job_id(&a.job_id) {
        let detail = format!("assignment with unusable job id {:?} ignored", a.job_id);
        tracing::warn!("{detail}");
        ledger.audit("job.refused", &detail)?;
        return Ok(Intake::Unusable);
    }
    if let Some(mut existing) = ledger.get(&a.job_id, a.attempt)? {
        if existing.acked {
            existing.acked = false;
            ledger.update(&existing)?;
        }
        return Ok(Intake::Known);
    }
    let last_seq = ledger.last_seq()?;
    let mut rec = JobRecord {
        job_id: a.job_id.clone(),
        attempt: a.attempt,
        seq: 0,
        state: JobState::Staged,
        acked: false,
        received_unix_ms: now,
        spec: None,
        envelope: a.envelope.clone(),
        result: None,
        local: None,
    };
    match verifier.verify(a, last_seq, now) {
        Ok(env) => {
            rec.seq = env.seq;
            let work = crate::policy::Work::job(&env.spec, env.submitter.clone())
                .unsealed(env.recipients.is_empty());
            let remembered = match &work.image {
                Some(image) if policy.approval != crate::policy::Approval::Off || policy.images.is_some() => {
                    crate::approvals::remembered(ledger.store().as_ref())?
                        .get(image)
                        .is_some_and(|r| r.covers(&work.inputs))
                }
                _ => false,
            };
            let decision = policy.evaluate(&work, remembered);
            if decision == crate::policy::Decision::NeedsApproval {
                rec.spec = Some(env.spec);
                rec.state = JobState::AwaitingApproval;
                let detail = format!(
                    "job {} waits for the site's approval (`outpost approvals show {}`)",
                    a.job_id, a.job_id
                );
                tracing::info!(job = %a.job_id, "job waits for the site's approval");
                ledger.insert(&rec, true, Some(("job.awaiting_approval", &detail)))?;
                return Ok(Intake::AwaitingApproval);
            }
            if let crate::policy::Decision::Refuse(r) = decision {
                let msg = r.to_string();
                tracing::warn!(job = %a.job_id, reason = %msg, "job refused by the site policy");
                rec.spec = Some(env.spec);
                rec.state = JobState::Finished;
                rec.result = Some(unrun_report(&rec, Outcome::Refused, &msg, now));
                let detail = format!("job {}: {msg}", a.job_id);
                ledger.insert(&rec, true, Some(("job.refused", &detail)))?;
                return Ok(Intake::Refused(msg));
            }
            rec.spec = Some(env.spec);
            ledger.insert(&rec, true, None)?;
            tracing::info!(job = %rec.job_id, seq = rec.seq, "job accepted");
            Ok(Intake::Accepted { seq: rec.seq })
        }
        Err(rejection) => {
            let msg = rejection.to_string();
            tracing::warn!(job = %a.job_id, reason = %msg, "job rejected");
            rec.state = JobState::Finished;
            rec.seq = last_seq;
            rec.result = Some(unrun_report(&rec, Outcome::Rejected, &msg, now));
            ledger.insert(&rec, false, Some(("job.rejected", &format!("job {}: {msg}", a.job_id))))?;
            Ok(Intake::Rejected(msg))
        }
    }
}

/// The result of an attempt that ended before it ran: rejected (its manifest), refused (the
/// site policy), not approved, or cancelled while it waited. `why` is its error.
pub fn unrun_report(rec: &JobRecord, outcome: Outcome, why: &str, now: u64) -> ResultReport {
    ResultReport {
        job_id: rec.job_id.clone(),
        attempt: rec.attempt,
        idempotency_key: ResultReport::key_for(&rec.job_id, rec.attempt),
        outcome,
        exit_code: None,
        error: Some(why.to_owned()),
        stdout_tail: String::new(),
        stderr_tail: String::new(),
        output_truncated: false,
        timings: Timings {
            received_unix_ms: rec.received_unix_ms,
            started_unix_ms: None,
            finished_unix_ms: Some(now),
        },
        outputs: Vec::new(),
        egress_denied: Vec::new(),
        inference: None,
        sealed: None,
    }
}

/// An empty envelope, for records of attempts this node never received.
pub fn no_envelope() -> SignedEnvelope {
    SignedEnvelope { payload: String::new(), key_id: String::new(), signature_hex: String::new() }
}
