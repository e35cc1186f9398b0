//! Local relay triggers (`[[relay.triggers]]`): an event that matches stages a job in the
//! ledger in the same atomic batch as the event (see `relay::EventHook`), so a trigger fires
//! exactly once per event whatever is killed when. The job then runs like any other, with the
//! object mounted at `/in/<key>`; its result is written to the local object store as JSON
//! instead of going to the control plane, so an air-gapped site needs no round trip at all.

use std::sync::Arc;

use outpost_protocol::SignedEnvelope;

use crate::clock::now_unix_ms;
use crate::ledger::{self, JobRecord, JobState, LocalOrigin};
use crate::relay::{EventHook, LocalTrigger, RelayEvent};
use crate::store::{Op, Tree};

/// Whether `trigger` fires on `event`.
pub(crate) fn matches(trigger: &LocalTrigger, event: &RelayEvent) -> bool {
    (event.accepted || trigger.include_rejected)
        && trigger.watch.as_ref().is_none_or(|w| *w == event.watch)
        && event.key.starts_with(&trigger.key_prefix)
        && trigger.key_suffix.as_ref().is_none_or(|s| event.key.ends_with(s.as_str()))
}

/// The job id of `trigger` for event `seq`: deterministic, so it can never be staged twice, and
/// inside the alphabet container names allow.
pub(crate) fn job_id(trigger: &LocalTrigger, seq: u64) -> String {
    use sha2::Digest;
    let tag = hex::encode(&sha2::Sha256::digest(trigger.name.as_bytes())[..4]);
    format!("local-{tag}-{seq}")
}

fn record(trigger: &LocalTrigger, event: &RelayEvent) -> JobRecord {
    let job_id = job_id(trigger, event.seq);
    let mut spec = trigger.job.clone();
    spec.inputs.push(event.key.clone());
    spec.env.insert("OUTPOST_EVENT_KEY".into(), event.key.clone());
    spec.env.insert("OUTPOST_EVENT_SEQ".into(), event.seq.to_string());
    if let Some(h) = &event.sha256 {
        spec.env.insert("OUTPOST_EVENT_SHA256".into(), h.clone());
    }
    JobRecord {
        job_id: job_id.clone(),
        attempt: 1,
        seq: 0,
        state: JobState::Staged,
        // Nothing to acknowledge: the control plane never offered it.
        acked: true,
        received_unix_ms: now_unix_ms(),
        spec: Some(spec.into()),
        // Not signed: the job comes from the site's own configuration, not over the network.
        envelope: SignedEnvelope {
            payload: String::new(),
            key_id: format!("local-trigger:{}", trigger.name),
            signature_hex: String::new(),
        },
        result: None,
        local: Some(LocalOrigin {
            trigger: trigger.name.clone(),
            event_seq: event.seq,
            results_key: format!("{}{job_id}.json", trigger.results_prefix),
        }),
    }
}

/// The relay hook that stages one job per matching trigger.
pub(crate) fn hook(triggers: Vec<LocalTrigger>) -> EventHook {
    Arc::new(move |event: &RelayEvent| {
        triggers
            .iter()
            .filter(|t| matches(t, event))
            .map(|t| {
                let rec = record(t, event);
                Op::Put(Tree::Jobs, rec.key(), ledger::encode(&rec))
            })
            .collect()
    })
}

impl<R: crate::runtime::Runtime> super::Agent<R> {
    /// Write a locally triggered job's result to the local store and settle it in the ledger
    /// (audited). Writing twice after a crash is harmless: the key is the job's own.
    pub(super) async fn deliver_local_result(
        &self,
        rec: &mut JobRecord,
        local: &LocalOrigin,
        report: &outpost_protocol::ResultReport,
    ) -> Result<(), crate::objstore::ObjectStoreError> {
        use crate::objstore::ObjectStore;
        let doc = serde_json::json!({
            "trigger": local.trigger,
            "event_seq": local.event_seq,
            "result": report,
        });
        let body = serde_json::to_vec_pretty(&doc).unwrap_or_default();
        self.objects.put(&local.results_key, body.as_slice()).await?;
        rec.state = JobState::Reported;
        let detail = format!(
            "trigger {} ran job {} for event {}: {:?}; result at {}",
            local.trigger, rec.job_id, local.event_seq, report.outcome, local.results_key
        );
        if let Err(e) = self.ledger.update_audited(rec, "trigger.local.result", &detail) {
            tracing::error!(error = %e, job = %rec.job_id, "cannot settle the local result; it will be written again");
        } else {
            tracing::info!(job = %rec.job_id, key = %local.results_key, "local trigger result stored");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trigger() -> LocalTrigger {
        toml::from_str(
            r#"
            name = "index"
            watch = "fhir"
            key_prefix = "in/"
            key_suffix = ".json"
            [job]
            image = "sha256:0000000000000000000000000000000000000000000000000000000000000000"
            command = ["true"]
            "#,
        )
        .expect("trigger parses")
    }

    fn event(key: &str, accepted: bool) -> RelayEvent {
        RelayEvent {
            seq: 7,
            watch: "fhir".into(),
            key: key.into(),
            size: 2,
            etag: "e".into(),
            sha256: Some("ab".repeat(32)),
            content_type: None,
            accepted,
            reason: None,
            replaces_etag: None,
            observed_unix_ms: 1,
            fields: Default::default(),
            fields_denied: Vec::new(),
        }
    }

    #[test]
    fn a_trigger_matches_on_watch_prefix_suffix_and_verdict() {
        let t = trigger();
        assert!(matches(&t, &event("in/a.json", true)));
        assert!(!matches(&t, &event("in/a.txt", true)));
        assert!(!matches(&t, &event("out/a.json", true)));
        assert!(!matches(&t, &event("in/a.json", false)), "rejected objects fire only when asked");
        let mut other = event("in/a.json", true);
        other.watch = "other".into();
        assert!(!matches(&t, &other));
    }

    #[test]
    fn the_staged_job_mounts_the_object_and_names_where_its_result_goes() {
        let t = trigger();
        let Op::Put(Tree::Jobs, _, bytes) = &hook(vec![t.clone()])(&event("in/a.json", true))[0] else {
            panic!("expected one job put");
        };
        let rec: JobRecord = serde_json::from_slice(bytes).expect("a job record");
        assert_eq!(rec.job_id, job_id(&t, 7));
        assert!(crate::verify::valid_job_id(&rec.job_id));
        assert_eq!(rec.state, JobState::Staged);
        let spec = rec.spec.and_then(|s| s.container().cloned()).expect("a container spec");
        assert_eq!(spec.inputs, ["in/a.json"]);
        assert_eq!(spec.env["OUTPOST_EVENT_SEQ"], "7");
        let local = rec.local.expect("local origin");
        assert_eq!(local.results_key, format!("outpost-results/{}.json", rec.job_id));
        assert!(hook(vec![t])(&event("in/a.txt", true)).is_empty());
    }
}
