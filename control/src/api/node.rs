//! Node routes behind the client certificate: the long-poll for jobs (which also carries the
//! node's acknowledgements), result reports (idempotent by `job_id/attempt`) and heartbeats.
//! Status codes follow the node's rules: 4xx is final for the request, 5xx is retried.

use std::time::Duration;

use axum::Json;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use outpost_protocol::{
    Ack, AuditAck, AuditBatch, ErrorBody, Heartbeat, JobAssignment, PollRequest, PollResponse,
    RenewCertificateRequest, RenewCertificateResponse, ResultReport, capability, paths, selector,
};

use super::{ApiError, ApiResult, Body, NodeAuth, Shared};
use crate::store::ResultOutcome;

/// Jobs handed out per poll when the node does not say.
const DEFAULT_MAX_JOBS: u32 = 16;
const MAX_JOBS_CAP: u32 = 256;
/// How long a poll is held when the node does not say.
const DEFAULT_POLL_WAIT: Duration = Duration::from_secs(25);

/// Acknowledge the listed jobs, then answer with the node's queued jobs at once, or hold the
/// request until one is submitted or the wait runs out.
#[utoipa::path(post, path = paths::NODE_POLL, tag = "node", request_body = PollRequest,
    description = "Long-poll: acknowledges `ack_job_ids` (they are not offered again), then answers with \
                   the node's unacknowledged jobs in sequence order, holding the request up to `wait_secs` \
                   (at most the server's `--max-hold`, 30 s by default) while there are none.",
    responses((status = 200, body = PollResponse), (status = 400, body = ErrorBody),
        (status = 401, description = "no client certificate", body = ErrorBody),
        (status = 403, description = "node unknown or certificate not the enrolled one", body = ErrorBody)),
    security(("node_certificate" = [])))]
pub async fn poll(
    NodeAuth(node): NodeAuth,
    State(st): State<Shared>,
    Body(req): Body<PollRequest>,
) -> ApiResult<Json<PollResponse>> {
    st.touch(&node.node_id);
    if !req.ack_job_ids.is_empty() {
        st.store.ack_jobs(&node.node_id, req.ack_job_ids, st.clock.now_ms()).await?;
    }
    let runs_services = req.announce.as_ref().is_some_and(|a| a.has(capability::SERVICES));
    if !req.service_acks.is_empty() {
        st.store.ack_node_services(&node.node_id, req.service_acks).await?;
        st.fleet_changed.notify_one();
    }
    let max_jobs = req.max_jobs.unwrap_or(DEFAULT_MAX_JOBS).min(MAX_JOBS_CAP) as usize;
    // A node with no room for jobs still takes stops and service changes (which free room or
    // do not need it), answered at once.
    let max = max_jobs.max(1);
    let wait = if max_jobs == 0 {
        Duration::ZERO
    } else {
        req.wait_secs.map_or(DEFAULT_POLL_WAIT, Duration::from_secs).min(st.max_hold)
    };
    let deadline = tokio::time::Instant::now() + wait;
    let waker = st.wakers.waker(&node.node_id);
    // Only an agent that said it understands cancellation is sent any (version skew).
    let cancels_understood = req.announce.as_ref().is_some_and(|a| a.has(capability::CANCEL));
    let logs_understood = req.announce.as_ref().is_some_and(|a| a.has(capability::LOGS));
    let settings_understood = req.announce.as_ref().is_some_and(|a| a.has(capability::ORG_SETTINGS));
    let trust_understood = req.announce.as_ref().is_some_and(|a| a.has(capability::TRUST_ROTATION));
    // The organisation's settings and the tag of the node's trust ride on every answer to an
    // agent that takes them, read when the answer goes (a change made during a held poll is in
    // that poll's answer); what an earlier signing key signed is signed again with the current one.
    let settled = |mut resp: PollResponse, org: &crate::store::OrgRecord, trust: Option<String>| {
        let now = st.clock.now_ms();
        for job in &mut resp.jobs {
            super::jobs::resign(org, now, &mut job.envelope)?;
        }
        for service in &mut resp.services {
            super::jobs::resign(org, now, service)?;
        }
        if settings_understood {
            resp.org_settings = Some(org.settings.clone());
        }
        resp.trust = trust;
        Ok(Json(resp))
    };
    let empty = loop {
        let org = super::jobs::org_of(&st, &node).await?;
        let trust = trust_understood.then(|| super::trust::node_trust(&st, &org, st.clock.now_ms()).tag);
        // Register interest before looking, so a submit between the look and the wait wakes us.
        let notified = waker.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // Counted as held from before the look: a job stored after the look whose notice is lost
        // is found by the next re-check pass (see `recheck_held`).
        let _holding = st.wakers.hold(&node.node_id);
        let looked = std::time::Instant::now();
        let queued =
            if max_jobs == 0 { Vec::new() } else { st.store.queued_jobs(&node.node_id, max_jobs).await? };
        st.metrics.store_op("queued_jobs", looked.elapsed());
        let cancel =
            if cancels_understood { st.store.pending_cancels(&node.node_id, max).await? } else { Vec::new() };
        let services: Vec<(u64, outpost_protocol::SignedEnvelope)> = if runs_services {
            let mut pending: Vec<_> = st
                .store
                .list_node_services(Some(&node.node_id))
                .await?
                .into_iter()
                .filter(|r| r.unacknowledged())
                .filter_map(|r| r.desired)
                .collect();
            pending.sort_by_key(|d| d.seq);
            pending.into_iter().take(max).map(|d| (d.seq, d.envelope)).collect()
        } else {
            Vec::new()
        };
        let logs = if logs_understood { st.logs.pending_for(&node.node_id) } else { Vec::new() };
        // Stops and service changes stay pending until the node's result or acknowledgement
        // arrives; the held poll ends early only for ones this node has not been sent yet, so a
        // node working through a stop does not spin on its polls.
        let pending: std::collections::BTreeSet<String> = cancel
            .iter()
            .map(|c| format!("c:{}/{}", c.job_id, c.attempt))
            .chain(services.iter().map(|(seq, _)| format!("s:{seq}")))
            .chain(logs.iter().map(|l| format!("l:{}", l.request_id)))
            .chain(trust.iter().map(|t| format!("t:{t}")))
            .collect();
        // A new trust tag ends a held poll only when the node was sent another one before: the
        // first poll since this process started is held as usual and its answer carries the tag.
        let unsent = st.sent.lock().map_or(true, |sent| {
            let before = sent.get(&node.node_id);
            pending.iter().any(|k| match before {
                None => !k.starts_with("t:"),
                Some(b) => !b.contains(k),
            })
        });
        let answer = |queued: Vec<crate::store::JobRecord>| {
            if let Ok(mut sent) = st.sent.lock() {
                if pending.is_empty() {
                    sent.remove(&node.node_id);
                } else {
                    sent.insert(node.node_id.clone(), pending.clone());
                }
            }
            let now = st.clock.now_ms();
            for j in &queued {
                st.metrics.dispatched(Duration::from_millis(now.saturating_sub(j.info.submitted_unix_ms)));
            }
            let jobs = queued
                .into_iter()
                .map(|j| JobAssignment {
                    job_id: j.info.job_id,
                    attempt: j.info.attempt,
                    envelope: j.envelope,
                })
                .collect();
            PollResponse {
                jobs,
                cancel: cancel.clone(),
                services: services.iter().map(|(_, e)| e.clone()).collect(),
                logs: logs.clone(),
                org_settings: None,
                trust: None,
            }
        };
        if !queued.is_empty() || unsent {
            return settled(answer(queued), &org, trust);
        }
        let _held = st.metrics.poll_held();
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(deadline) => break answer(Vec::new()),
            _ = st.shutdown.cancelled() => break answer(Vec::new()),
        }
        // Revoked while this poll was held: it ends now, with the refusal. Another replica may
        // have revoked it (its announcement woke this poll): the store says so, and this
        // replica's TLS layer refuses the node from now on too.
        if st.revoked.contains(&node.cert_sha256) {
            return Err(super::extract::revoked_refusal(&node.node_id));
        }
        if let Some(now) = st.store.get_node(&node.node_id).await?
            && now.revoked_unix_ms.is_some()
        {
            st.revoked.insert_node(&now);
            return Err(super::extract::revoked_refusal(&node.node_id));
        }
    };
    // Read again: a change made while the poll was held is in its answer.
    let org = super::jobs::org_of(&st, &node).await?;
    let trust = trust_understood.then(|| super::trust::node_trust(&st, &org, st.clock.now_ms()).tag);
    settled(empty, &org, trust)
}

/// How often a replica of a shared store looks for work waiting for the nodes it holds polls
/// of: the most a notice from another replica that got lost delays a node's work.
pub const RECHECK_HELD: Duration = Duration::from_secs(3);

/// Every `interval`, asks the store what is waiting for the nodes whose polls this replica
/// holds and wakes those with a queued job or a stop or service change they have not been
/// sent; held event listings look again too. One statement per pass (a few for many thousands of nodes), whatever the number of
/// nodes: the safety net under the notices replicas send each other (docs/scaling.md).
pub async fn recheck_held(st: Shared, interval: Duration) {
    // The stops and service changes each held node had waiting at the last pass. A poll sends
    // only what its agent understands and at most its batch, so one it did not send is not
    // proof of a lost notice: such a key wakes the node once, when it first appears.
    let mut reported: std::collections::HashMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    let mut failing = false;
    loop {
        tokio::select! {
            _ = st.shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        // Held event listings (`wait_secs`) look again too: one query each, few of them.
        st.events_stored.notify_waiters();
        let held = st.wakers.held();
        if held.is_empty() {
            continue;
        }
        let found = match st.store.pending_work(held).await {
            Ok(found) => {
                if std::mem::take(&mut failing) {
                    tracing::info!("re-check of held polls works again");
                }
                found
            }
            Err(e) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(error = %e, "re-check of held polls failed; a lost notice now waits for the poll's end; retrying");
                }
                continue;
            }
        };
        let mut now: std::collections::HashMap<String, std::collections::BTreeSet<String>> =
            Default::default();
        let mut missed = std::collections::BTreeSet::new();
        {
            let Ok(sent) = st.sent.lock() else { continue };
            for (node_id, work) in found {
                match work {
                    crate::store::PendingWork::Jobs => {
                        missed.insert(node_id);
                    }
                    crate::store::PendingWork::Sent(key) => {
                        let new = !sent.get(&node_id).is_some_and(|s| s.contains(&key))
                            && !reported.get(&node_id).is_some_and(|r| r.contains(&key));
                        if new {
                            missed.insert(node_id.clone());
                        }
                        now.entry(node_id).or_default().insert(key);
                    }
                }
            }
        }
        reported = now;
        if !missed.is_empty() {
            tracing::debug!(nodes = missed.len(), "re-check found work for held polls; waking them");
        }
        for node_id in &missed {
            st.wakers.wake(node_id);
        }
    }
}

/// What makes a result unstorable, whichever way it came (a report, a results bundle).
pub(super) fn report_problem(report: &ResultReport) -> Option<(&'static str, String)> {
    let key = ResultReport::key_for(&report.job_id, report.attempt);
    if report.idempotency_key != key {
        let why =
            format!("idempotency_key is {:?} but must be {key:?} (job_id/attempt)", report.idempotency_key);
        return Some(("bad_idempotency_key", why));
    }
    let limit = outpost_protocol::MAX_OUTPUT_TAIL_BYTES;
    if report.stdout_tail.len() > limit || report.stderr_tail.len() > limit {
        return Some(("tail_too_long", format!("output tails are at most {limit} bytes each")));
    }
    let begin = outpost_protocol::seal::ARMOUR_BEGIN;
    if report.sealed.as_ref().is_some_and(|s| !s.starts_with(begin)) {
        return Some(("bad_sealed_result", format!("sealed must be an ASCII-armoured age file ({begin})")));
    }
    None
}

#[utoipa::path(post, path = paths::NODE_RESULTS, tag = "node", request_body = ResultReport,
    description = "Report a job result. Idempotent by `idempotency_key` (`job_id/attempt`): the first report \
                   is stored, a repeat is acknowledged with `duplicate: true` and not stored again.",
    responses((status = 200, body = Ack), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "the job belongs to another node", body = ErrorBody),
        (status = 404, description = "no such job", body = ErrorBody)),
    security(("node_certificate" = [])))]
pub async fn report(
    NodeAuth(node): NodeAuth,
    State(st): State<Shared>,
    Body(report): Body<ResultReport>,
) -> ApiResult<Json<Ack>> {
    let key = ResultReport::key_for(&report.job_id, report.attempt);
    if let Some((code, why)) = report_problem(&report) {
        return Err(ApiError::bad_request(code, why));
    }
    let job_id = report.job_id.clone();
    let outcome = report.outcome;
    let actor = format!("node:{}", node.node_id);
    // A refused `any` job gets another node first; the refusal then stays with its attempt.
    super::placement::place_elsewhere_after_refusal(&st, &node.node_id, &report).await?;
    let storing = std::time::Instant::now();
    let stored = st.store.store_result(&node.node_id, report).await?;
    st.metrics.store_op("store_result", storing.elapsed());
    match stored {
        ResultOutcome::Stored => {
            st.metrics.result_stored(&outpost_protocol::wire_name(&outcome));
            let detail = format!("job {key}: {}", outpost_protocol::wire_name(&outcome));
            st.audit(&actor, Some(&node.org_id), "job.result", &detail).await;
            Ok(Json(Ack { idempotency_key: key, duplicate: false }))
        }
        ResultOutcome::Superseded => {
            let detail = format!("job {key}: a later attempt replaced this one; kept, not counted");
            st.audit(&actor, Some(&node.org_id), "job.result.superseded", &detail).await;
            Ok(Json(Ack { idempotency_key: key, duplicate: false }))
        }
        ResultOutcome::Duplicate => {
            tracing::debug!(job = %job_id, node = %node.node_id, "repeated result acknowledged, not stored again");
            Ok(Json(Ack { idempotency_key: key, duplicate: true }))
        }
        ResultOutcome::NotYours => {
            if st.store.get_job(&job_id).await?.is_some() {
                st.audit(
                    &actor,
                    Some(&node.org_id),
                    "report.refused",
                    &format!("job {job_id} belongs to another node"),
                )
                .await;
                Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "not_your_job",
                    format!("job {job_id} was not sent to node {}", node.node_id),
                ))
            } else {
                st.audit(
                    &actor,
                    Some(&node.org_id),
                    "report.refused",
                    &format!("job {job_id} does not exist"),
                )
                .await;
                Err(ApiError::not_found(format!("job {job_id} does not exist on this control plane")))
            }
        }
    }
}

#[utoipa::path(post, path = paths::NODE_AUDIT_UPLINK, tag = "node", request_body = AuditBatch,
    description = "The next entries of the node's hash-chained audit log, oldest first (at most 500). Stored \
                   where they continue the chain stored for the node, from its first entry; entries already \
                   stored are acknowledged again. A batch that does not continue it (an entry edited, missing \
                   or moved) stores nothing, says why in `refused`, and is recorded as `node.audit.refused`.",
    responses((status = 200, body = AuditAck), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)),
    security(("node_certificate" = [])))]
pub async fn upload_audit(
    NodeAuth(node): NodeAuth,
    State(st): State<Shared>,
    Body(batch): Body<AuditBatch>,
) -> ApiResult<Json<AuditAck>> {
    if batch.entries.len() > outpost_protocol::MAX_AUDIT_BATCH {
        return Err(ApiError::bad_request(
            "batch_too_large",
            format!("at most {} audit entries per batch", outpost_protocol::MAX_AUDIT_BATCH),
        ));
    }
    let got = st.store.append_node_audit(&node.node_id, batch.entries).await?;
    if let Some(why) = &got.refused {
        let detail = format!("node {} over the uplink: {why}", node.node_id);
        st.audit(&format!("node:{}", node.node_id), Some(&node.org_id), "node.audit.refused", &detail).await;
    }
    Ok(Json(AuditAck { stored: got.stored, up_to_seq: got.up_to_seq, refused: got.refused }))
}

#[utoipa::path(post, path = paths::NODE_CERTIFICATE, tag = "node", request_body = RenewCertificateRequest,
    description = "Renew the node's client certificate (agents that announce `cert-renewal`, two thirds into \
                   its life). Mutual TLS with the current certificate; the CSR may carry a new key (rotation). \
                   The certificate the request came with stays accepted until the node first connects with the \
                   new one. A revoked or expired certificate cannot renew: such a node enrolls again.",
    responses((status = 200, body = RenewCertificateResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("node_certificate" = [])))]
pub async fn renew_certificate(
    NodeAuth(node): NodeAuth,
    Extension(peer): Extension<super::extract::ConnPeer>,
    State(st): State<Shared>,
    Body(req): Body<RenewCertificateRequest>,
) -> ApiResult<Json<RenewCertificateResponse>> {
    let presented = peer.0.map(|p| p.cert_sha256).unwrap_or_else(|| node.cert_sha256.clone());
    let cert = st
        .authority
        .issuer()
        .issue_client_cert_for(&req.csr_pem, &node.node_id, st.node_cert_lifetime)
        .map_err(|e| {
            ApiError::bad_request("bad_csr", format!("the certificate signing request is unusable: {e}"))
        })?;
    st.store.renew_node_cert(&node.node_id, &presented, &cert.sha256).await?;
    let detail = format!(
        "node {}: certificate {} renewed as {} (valid {} days)",
        node.node_id,
        presented,
        cert.sha256,
        st.node_cert_lifetime.as_secs() / 86_400
    );
    st.audit(&format!("node:{}", node.node_id), Some(&node.org_id), "node.certificate_renewed", &detail)
        .await;
    Ok(Json(RenewCertificateResponse { cert_pem: cert.pem }))
}

#[utoipa::path(post, path = paths::NODE_HEARTBEAT, tag = "node", request_body = Heartbeat,
    description = "Proof of life with inventory; stored as the node's last heartbeat and last-seen time.",
    responses((status = 200, description = "recorded (an empty JSON object)", body = Object),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("node_certificate" = [])))]
pub async fn heartbeat(
    NodeAuth(node): NodeAuth,
    State(st): State<Shared>,
    Body(hb): Body<Heartbeat>,
) -> ApiResult<Json<serde_json::Value>> {
    selector::check_labels(&hb.labels).map_err(|why| {
        ApiError::bad_request("bad_labels", format!("the node's [node] labels are not valid: {why}"))
    })?;
    st.store.record_heartbeat(&node.node_id, hb, Some(st.clock.now_ms())).await?;
    Ok(Json(serde_json::json!({})))
}
