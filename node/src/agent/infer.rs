//! Runs an inference job attempt. No container and no side effect but the output object, which
//! an upload overwrites: after a crash the attempt simply runs again from its inputs, so a
//! kill -9 at any point neither loses the job nor reports it twice (the result is persisted
//! once, then sent from the outbox).

use std::time::Duration;

use outpost_protocol::{InferenceSpec, MAX_OUTPUT_TAIL_BYTES, Outcome};
use tokio_util::sync::CancellationToken;

use super::Agent;
use super::executor::{Finished, Retryable, Stop, retry};
use crate::clock::now_unix_ms;
use crate::inference::job::{self, InputError};
use crate::ledger::JobRecord;
use crate::runtime::{JobRef, Output, Runtime};

impl Retryable for InputError {
    fn retryable(&self) -> bool {
        self.is_retryable()
    }
}

impl Retryable for crate::objstore::ObjectStoreError {
    fn retryable(&self) -> bool {
        self.is_retryable()
    }
}

impl<R: Runtime> Agent<R> {
    pub(super) async fn infer(
        &self,
        rec: &JobRecord,
        job: &JobRef,
        spec: &InferenceSpec,
        shutdown: &CancellationToken,
    ) -> Result<Finished, Stop> {
        let started = now_unix_ms();
        let input = retry(shutdown, || job::load_input(self.objects.as_ref(), spec)).await?;
        let (_, model) = self.inference.resolve(&spec.model).map_err(|e| Stop::Failed(e.to_string()))?;
        tracing::info!(job = %job.job_id, model = %model.label, kind = ?spec.kind, "inference job running");
        let limit = Duration::from_secs(spec.timeout_secs);
        let ran = tokio::select! {
            r = tokio::time::timeout(limit, job::run(&self.inference.manager, &model, spec, input)) => r,
            _ = shutdown.cancelled() => return Err(Stop::Shutdown),
        };
        let produced = match ran {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return Err(Stop::Failed(e.to_string())),
            Err(_) => {
                let error = format!("stopped after the {} s timeout", spec.timeout_secs);
                let report = self.report_for(
                    rec,
                    Outcome::TimedOut,
                    None,
                    Some(error),
                    Output::default(),
                    Some(started),
                    Some(now_unix_ms()),
                );
                return Ok(Finished { report, denied: None });
            }
        };
        let key = job::output_key(spec, &job.job_id, produced.file);
        let stored =
            retry(shutdown, || job::store_output(self.objects.as_ref(), &key, &produced.body)).await?;
        let mut output = Output::default();
        if let Some(text) = produced.inline_text {
            output.truncated = text.len() > MAX_OUTPUT_TAIL_BYTES;
            output.stdout_tail = head(&text, MAX_OUTPUT_TAIL_BYTES).to_string();
        }
        let mut report =
            self.report_for(rec, Outcome::Succeeded, None, None, output, Some(started), Some(now_unix_ms()));
        report.outputs = vec![stored];
        tracing::info!(
            job = %job.job_id, model = %model.label, prompt_tokens = produced.stamp.prompt_tokens,
            completion_tokens = produced.stamp.completion_tokens, vectors = produced.stamp.vectors,
            tokens_per_s = produced.stamp.tokens_per_s(), "inference job finished"
        );
        report.inference = Some(produced.stamp);
        Ok(Finished { report, denied: None })
    }
}

/// The first `max` bytes of `s`, cut at a character boundary.
fn head(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
