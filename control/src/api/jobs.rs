//! Operator job routes: submit (sign with the org key, queue, wake the node's poll), list, get;
//! and the spec checks and job creation that triggers share with submission.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use outpost_protocol::{
    ContainerSpec, ErrorBody, InferenceSpec, JobEnvelope, JobGroup, JobInfo, JobList, JobSpec, JobState,
    NodeInfo, Placement, Role, Selector, SignedEnvelope, SubmitJobRequest, paths,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::access::node_for;
use super::{ApiError, ApiResult, AppState, Body, Caller, Params, Shared, placement};
use crate::signing;
use crate::store::{CancelOutcome, JobFilter, JobRecord, OrgRecord, StoreError};

const DEFAULT_JOB_EXPIRY_SECS: u64 = 24 * 3600;
pub(crate) const MAX_JOB_EXPIRY_SECS: u64 = 30 * 24 * 3600;
const DEFAULT_LIST: usize = 100;
const MAX_LIST: usize = 1000;

#[utoipa::path(post, path = paths::JOBS, tag = "jobs", request_body = SubmitJobRequest,
    description = "Sign the job with the node's organisation key and queue it; a poll the node is holding \
                   is answered at once. With `selector`, `org_id` and `placement: any` instead of `node_id`, \
                   the job goes to the least loaded online node the selector matches, and is offered to \
                   another one as a new attempt when that node's lease expires before it reports.",
    responses((status = 201, body = JobInfo), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, description = "node or organisation unknown", body = ErrorBody),
        (status = 409, description = "no node matches the selector", body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn submit_job(
    caller: Caller,
    State(st): State<Shared>,
    Body(req): Body<SubmitJobRequest>,
) -> ApiResult<(StatusCode, Json<JobInfo>)> {
    caller.at_least(Role::Operator)?;
    check_job_spec(&req.spec)?;
    check_recipients(&req.recipients)?;
    let expiry = check_expiry(req.expires_in_secs)?;
    let sealed = !req.recipients.is_empty();
    let (node, origin) = match Target::of(&req)? {
        Target::Node(node_id) => {
            let node = node_for(&st, &caller, node_id, Role::Operator).await?;
            if node.revoked_unix_ms.is_some() {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "node_revoked",
                    format!(
                        "node {node_id} is revoked: it takes no work; enroll the machine again for a new node id"
                    ),
                ));
            }
            if sealed && !can_seal(&node) {
                return Err(cannot_seal(node_id));
            }
            (node, JobOrigin::default())
        }
        Target::Selector { org_id, selector, placement: Placement::Any } => {
            caller.may(org_id, Role::Operator, || org_missing(org_id))?;
            let matching = placement::matching_nodes(&st, org_id, &selector).await?;
            if let [only_old, ..] = matching.as_slice()
                && sealed
                && !matching.iter().any(can_seal)
            {
                return Err(cannot_seal(&only_old.node_id));
            }
            let candidates = sealing_nodes(matching, sealed);
            let loads = placement::open_loads(&st).await?;
            let node = placement::choose(&candidates, &loads, st.clock.now_ms(), st.lease_ms(), &[])
                .or_else(|| placement::most_recently_seen(&candidates))
                .cloned()
                .ok_or_else(|| no_match(org_id, &selector))?;
            let origin = JobOrigin {
                selector: Some(selector.to_string()),
                placement: Some(Placement::Any),
                ..Default::default()
            };
            (node, origin)
        }
        Target::Selector { placement: Placement::Each, .. } => {
            return Err(ApiError::bad_request(
                "use_job_groups",
                format!("placement `each` makes one job per node: POST it to {}", paths::JOB_GROUPS),
            ));
        }
    };
    let origin = JobOrigin { recipients: req.recipients, ..origin };
    let info = create_job(&st, &node, req.spec, expiry, None, origin).await?.ok_or_else(|| {
        ApiError::internal("job_id_taken", "a freshly generated job id is already taken; submit again")
    })?;
    st.audit(&caller.actor, Some(&info.org_id), "job.submitted", &submitted_detail(&info)).await;
    Ok((StatusCode::CREATED, Json(info)))
}

fn submitted_detail(info: &JobInfo) -> String {
    let what = match &info.spec {
        JobSpec::Container(c) => format!("image {}", c.image),
        JobSpec::Inference(i) => format!("{}, model {}", info.spec.kind_name(), i.model),
    };
    let placed = info.selector.as_deref().map(|s| format!(", selector {s}")).unwrap_or_default();
    format!("job {} for node {} (seq {}, {what}{placed})", info.job_id, info.node_id, info.seq)
}

/// Where a submission goes.
enum Target<'a> {
    Node(&'a str),
    Selector { org_id: &'a str, selector: Selector, placement: Placement },
}

impl<'a> Target<'a> {
    fn of(req: &'a SubmitJobRequest) -> ApiResult<Self> {
        match (req.node_id.is_empty(), &req.selector) {
            (false, None) => {
                if req.org_id.is_some() || req.placement.is_some() {
                    return Err(ApiError::bad_request(
                        "bad_target",
                        "org_id and placement go with a selector, not with node_id",
                    ));
                }
                Ok(Self::Node(&req.node_id))
            }
            (true, Some(text)) => {
                let selector = Selector::parse(text)
                    .map_err(|e| ApiError::bad_request("bad_selector", e.to_string()))?;
                let org_id = req.org_id.as_deref().ok_or_else(|| {
                    ApiError::bad_request(
                        "bad_target",
                        "a selector needs org_id: the organisation whose nodes it chooses from",
                    )
                })?;
                let placement = req.placement.ok_or_else(|| {
                    ApiError::bad_request(
                        "bad_target",
                        "a selector needs placement: `any` (one node) or `each` (every node)",
                    )
                })?;
                Ok(Self::Selector { org_id, selector, placement })
            }
            (false, Some(_)) => {
                Err(ApiError::bad_request("bad_target", "give node_id or selector, not both"))
            }
            (true, None) => Err(ApiError::bad_request(
                "bad_target",
                "give node_id, or selector with org_id and placement",
            )),
        }
    }
}

fn no_match(org_id: &str, selector: &Selector) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "no_matching_node",
        format!(
            "no enrolled node of organisation {org_id} matches selector `{selector}`; see `node list --selector`"
        ),
    )
}

fn org_missing(org_id: &str) -> ApiError {
    ApiError::not_found(format!("organisation {org_id} does not exist; see `org list`"))
}

#[utoipa::path(post, path = paths::JOB_GROUPS, tag = "jobs", request_body = SubmitJobRequest,
    description = "One job on each node of `org_id` that `selector` matches now (`placement: each`), as a \
                   group: every job carries the group id (`GET /v1/jobs?group_id=`).",
    responses((status = 201, body = JobGroup), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 409, description = "no node matches the selector", body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn submit_group(
    caller: Caller,
    State(st): State<Shared>,
    Body(req): Body<SubmitJobRequest>,
) -> ApiResult<(StatusCode, Json<JobGroup>)> {
    caller.at_least(Role::Operator)?;
    check_job_spec(&req.spec)?;
    check_recipients(&req.recipients)?;
    let expiry = check_expiry(req.expires_in_secs)?;
    let Target::Selector { org_id, selector, placement: Placement::Each } = Target::of(&req)? else {
        return Err(ApiError::bad_request(
            "bad_target",
            format!(
                "{} takes a selector with org_id and placement `each`; other jobs go to {}",
                paths::JOB_GROUPS,
                paths::JOBS
            ),
        ));
    };
    caller.may(org_id, Role::Operator, || org_missing(org_id))?;
    let nodes = placement::matching_nodes(&st, org_id, &selector).await?;
    if nodes.is_empty() {
        return Err(no_match(org_id, &selector));
    }
    // Every matching node, or the group is not what the operator asked for.
    if !req.recipients.is_empty()
        && let Some(old) = nodes.iter().find(|n| !can_seal(n))
    {
        return Err(cannot_seal(&old.node_id));
    }
    let group_id = uuid::Uuid::new_v4().simple().to_string();
    let mut jobs = Vec::with_capacity(nodes.len());
    for node in &nodes {
        let origin = JobOrigin {
            group_id: Some(group_id.clone()),
            selector: Some(selector.to_string()),
            placement: Some(Placement::Each),
            trigger: None,
            recipients: req.recipients.clone(),
        };
        // One id per (group, node): a repeat of this loop creates nothing twice.
        let job_id = hex::encode(&Sha256::digest(format!("{group_id}/{}", node.node_id))[..16]);
        if let Some(info) = create_job(&st, node, req.spec.clone(), expiry, Some(job_id), origin).await? {
            jobs.push(info);
        }
    }
    let detail = format!("group {group_id}: {} jobs, selector {selector}, org {org_id}", jobs.len());
    st.audit(&caller.actor, Some(org_id), "job.group_submitted", &detail).await;
    Ok((
        StatusCode::CREATED,
        Json(JobGroup { group_id, org_id: org_id.to_owned(), selector: selector.to_string(), jobs }),
    ))
}

#[utoipa::path(get, path = paths::JOB_GROUP, tag = "jobs", params(("group_id" = String, Path, description = "group id")),
    responses((status = 200, body = JobGroup), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn get_group(
    caller: Caller,
    State(st): State<Shared>,
    Path(group_id): Path<String>,
) -> ApiResult<Json<JobGroup>> {
    let filter = JobFilter { group_id: Some(group_id.clone()), limit: usize::MAX, ..Default::default() };
    let jobs = st.store.list_jobs(filter).await?;
    let missing = || ApiError::not_found(format!("job group {group_id} does not exist"));
    let first = jobs.first().ok_or_else(missing)?;
    caller.may(&first.org_id, Role::Viewer, missing)?;
    let (org_id, selector) = (first.org_id.clone(), first.selector.clone().unwrap_or_default());
    Ok(Json(JobGroup { group_id, org_id, selector, jobs }))
}

#[utoipa::path(post, path = paths::JOB_CANCEL, tag = "jobs", params(("job_id" = String, Path, description = "job id")),
    description = "Cancel a job. A queued one is cancelled at once; one its node has is stopped by the node, \
                   which reports the outcome `cancelled`. A job that has ended is left as it is (409).",
    responses((status = 200, body = JobInfo), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "the job has ended", body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn cancel_job(
    caller: Caller,
    State(st): State<Shared>,
    Path(job_id): Path<String>,
) -> ApiResult<Json<JobInfo>> {
    let missing = || ApiError::not_found(format!("job {job_id} does not exist"));
    let job = st.store.get_job(&job_id).await?.ok_or_else(missing)?;
    caller.may(&job.info.org_id, Role::Operator, missing)?;
    if job.info.state == JobState::Accepted
        && let Some(node) = st.store.get_node(&job.info.node_id).await?
        && !node.announce().has(outpost_protocol::capability::CANCEL)
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "cannot_cancel",
            format!(
                "job {job_id} runs on node {}, whose agent is too old to be told to stop it; upgrade the agent \
                 or let the job finish (its timeout bounds it)",
                node.node_id
            ),
        ));
    }
    match st.store.cancel_job(&job_id, st.clock.now_ms()).await? {
        CancelOutcome::NotFound => Err(ApiError::not_found(format!("job {job_id} does not exist"))),
        CancelOutcome::AlreadyEnded(state) => {
            let state = outpost_protocol::wire_name(&state);
            Err(ApiError::new(
                StatusCode::CONFLICT,
                "job_ended",
                format!("job {job_id} has ended ({state}); nothing to cancel and nothing was changed"),
            ))
        }
        outcome => {
            let job = st
                .store
                .get_job(&job_id)
                .await?
                .ok_or_else(|| ApiError::not_found(format!("job {job_id} does not exist")))?;
            let how = if outcome == CancelOutcome::Cancelled {
                "cancelled while queued"
            } else {
                "node asked to stop it"
            };
            let detail = format!("job {job_id} on node {}: {how}", job.info.node_id);
            st.audit(&caller.actor, Some(&job.info.org_id), "job.cancel", &detail).await;
            st.wakers.wake(&job.info.node_id);
            Ok(Json(job.info))
        }
    }
}

/// `expires_in_secs` of a submission or trigger, defaulted and bounded.
pub(super) fn check_expiry(expires_in_secs: Option<u64>) -> ApiResult<u64> {
    let expiry = expires_in_secs.unwrap_or(DEFAULT_JOB_EXPIRY_SECS);
    if expiry == 0 || expiry > MAX_JOB_EXPIRY_SECS {
        return Err(ApiError::bad_request(
            "bad_expiry",
            format!("expires_in_secs must be 1..={MAX_JOB_EXPIRY_SECS}"),
        ));
    }
    Ok(expiry)
}

/// How a job was placed (absent for a job sent to a named node).
#[derive(Debug, Clone, Default)]
pub(super) struct JobOrigin {
    pub group_id: Option<String>,
    pub selector: Option<String>,
    pub placement: Option<Placement>,
    /// The org trigger that made the job (none: an operator's submission).
    pub trigger: Option<String>,
    /// Whom the result is sealed for (checked; only for nodes that [`can_seal`]).
    pub recipients: Vec<String>,
}

/// Whether `node`'s agent seals results for a job's recipients.
pub(super) fn can_seal(node: &NodeInfo) -> bool {
    node.announce().has(outpost_protocol::capability::SEALED_RESULTS)
}

/// The candidates a job may be placed on: all of them, or for a sealed job those that can seal.
pub(super) fn sealing_nodes(mut nodes: Vec<NodeInfo>, sealed: bool) -> Vec<NodeInfo> {
    if sealed {
        nodes.retain(can_seal);
    }
    nodes
}

pub(super) fn cannot_seal(node_id: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "cannot_seal",
        format!(
            "node {node_id}'s agent does not announce `{}`: it cannot seal a result, and nothing was queued; \
             upgrade the agent or submit without recipients",
            outpost_protocol::capability::SEALED_RESULTS
        ),
    )
}

/// A submission's recipients: well-formed age X25519 keys, at most a few.
pub(super) fn check_recipients(recipients: &[String]) -> ApiResult<()> {
    outpost_protocol::seal::check_recipients(recipients)
        .map_err(|why| ApiError::bad_request("bad_recipient", why))
}

/// Who asked for a job, as the node's site policy sees it: an operator (today the one admin
/// token: `name:admin`, `role:owner`) or a trigger. Only for agents that take it.
fn submitter_for(node: &NodeInfo, org_id: &str, origin: &JobOrigin) -> Option<outpost_protocol::Submitter> {
    if !node.announce().has(outpost_protocol::capability::SITE_POLICY) {
        return None;
    }
    let org = outpost_protocol::Submitter::in_org(org_id);
    Some(match &origin.trigger {
        Some(t) => outpost_protocol::Submitter { trigger: Some(t.clone()), ..org },
        None => outpost_protocol::Submitter { name: Some("admin".into()), role: Some("owner".into()), ..org },
    })
}

/// The one way a job comes to exist, whoever asks (an operator's submission or a trigger):
/// signed with the org key, given the node's next sequence number under the submit lock,
/// stored, and the node's held poll woken. With a `job_id`, nothing happens when that job
/// exists already (`None`), which makes a caller with a deterministic id idempotent.
pub(super) async fn create_job(
    st: &AppState,
    node: &NodeInfo,
    spec: JobSpec,
    expiry_secs: u64,
    job_id: Option<String>,
    origin: JobOrigin,
) -> ApiResult<Option<JobInfo>> {
    let org = org_of(st, node).await?;
    feature_on(&org, spec.feature())?;
    if let Some(id) = &job_id
        && st.store.get_job(id).await?.is_some()
    {
        return Ok(None);
    }
    // The key that signs now, decoded before the store hands out a sequence number: building
    // the job then cannot fail on the key.
    let now = st.clock.now_ms();
    let key =
        signing::effective_key(&org, now).map_err(|e| ApiError::internal("bad_org_key", e.to_string()))?;
    let job_id = job_id.unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let (org_id, node_id) = (org.org.id.clone(), node.node_id.clone());
    let submitter = submitter_for(node, &org.org.id, &origin);
    let make: crate::store::MakeJob = Box::new(move |seq| {
        let envelope = JobEnvelope {
            job_id,
            attempt: 1,
            org_id,
            node_id,
            seq,
            issued_unix_ms: now,
            expires_unix_ms: now.saturating_add(expiry_secs.saturating_mul(1000)),
            spec,
            submitter,
            recipients: origin.recipients,
        };
        let signed = sign_numbered(&key, &envelope)?;
        let info = JobInfo {
            job_id: envelope.job_id,
            attempt: envelope.attempt,
            org_id: envelope.org_id,
            node_id: envelope.node_id,
            seq,
            state: JobState::Queued,
            spec: envelope.spec,
            submitted_unix_ms: now,
            accepted_unix_ms: None,
            result: None,
            group_id: origin.group_id,
            selector: origin.selector,
            placement: origin.placement,
            superseded: Vec::new(),
            cancel_requested_unix_ms: None,
            awaiting_site_approval_since_unix_ms: None,
        };
        Ok(JobRecord { info, envelope: signed })
    });
    let info = {
        // One process's submits in order (the store's own lock does it across replicas).
        let _ordered = st.submit_lock.lock().await;
        let inserting = std::time::Instant::now();
        let stored = st.store.submit_job(&node.node_id, make).await;
        st.metrics.store_op("insert_job", inserting.elapsed());
        match stored? {
            Some(job) => {
                st.metrics.job_submitted();
                job.info
            }
            None => return Ok(None),
        }
    };
    st.wakers.wake(&info.node_id);
    Ok(Some(info))
}

/// Offers an unfinished job to `node` as its next attempt (the placement sweep): a new
/// manifest for that node, signed, with the node's next sequence number. False when the job
/// moved on meanwhile (finished, cancelled, or re-placed by someone else).
pub(super) async fn reoffer_job(
    st: &AppState,
    job: &JobRecord,
    node: &NodeInfo,
    reason: &str,
) -> ApiResult<bool> {
    let org = org_of(st, node).await?;
    let now = st.clock.now_ms();
    let key = signing_key(&org, now)?;
    let before = serde_json::from_str::<JobEnvelope>(&job.envelope.payload).ok();
    let (current, org_id, node_id) = (job.clone(), org.org.id.clone(), node.node_id.clone());
    // Whoever asked for it still did (a re-placed job is an operator's: triggers name their
    // node); only an agent that takes it is told.
    let submitter = before
        .as_ref()
        .and_then(|e| e.submitter.clone())
        .or_else(|| submitter_for(node, &org.org.id, &JobOrigin::default()))
        .filter(|_| node.announce().has(outpost_protocol::capability::SITE_POLICY));
    let reason = reason.to_owned();
    let make: crate::store::MakeJob = Box::new(move |seq| {
        let envelope = JobEnvelope {
            job_id: current.info.job_id.clone(),
            attempt: current.info.attempt.saturating_add(1),
            org_id,
            node_id: node_id.clone(),
            seq,
            issued_unix_ms: now,
            // The operator's deadline stands: a re-placed job does not live longer.
            expires_unix_ms: before.as_ref().map_or(now, |e| e.expires_unix_ms),
            spec: current.info.spec.clone(),
            submitter,
            // The sweep offers a sealed job only to nodes that can seal it.
            recipients: before.as_ref().map(|e| e.recipients.clone()).unwrap_or_default(),
        };
        let signed = sign_numbered(&key, &envelope)?;
        Ok(crate::store::next_attempt(&current, signed, &node_id, seq, now, &reason))
    });
    let moved = {
        let _ordered = st.submit_lock.lock().await;
        st.store.reassign_job_to(&job.info.job_id, job.info.attempt, &node.node_id, make).await?
    };
    if moved {
        st.wakers.wake(&node.node_id);
        st.wakers.wake(&job.info.node_id);
    }
    Ok(moved)
}

/// Refuses work of a feature the organisation has turned off (its nodes would refuse it too).
pub(super) fn feature_on(org: &OrgRecord, feature: &str) -> ApiResult<()> {
    if org.settings.enabled(feature) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "feature_off",
        format!(
            "organisation {} has turned {feature} off for its nodes (settings revision {}); an admin turns it \
             back on with `outpost-control org settings {} --enable {feature}`",
            org.org.id, org.settings.revision, org.org.id
        ),
    ))
}

/// The organisation of `node`, whose key signs what the node is sent.
pub(super) async fn org_of(st: &AppState, node: &NodeInfo) -> ApiResult<OrgRecord> {
    let org = st.store.get_org(&node.org_id).await?.ok_or_else(|| {
        ApiError::internal(
            "org_missing",
            format!("organisation {} of node {} is gone", node.org_id, node.node_id),
        )
    })?;
    settled(st, org).await
}

/// `org` with a signing key whose overlap is over made the current one, and stored so: once
/// the switch has been seen it holds, whatever the clock does afterwards.
pub(super) async fn settled(st: &AppState, org: OrgRecord) -> ApiResult<OrgRecord> {
    let now = st.clock.now_ms();
    if org.keys.next.as_ref().is_none_or(|n| n.key.signs_from_unix_ms > now) {
        return Ok(org);
    }
    let after = signing::settle(&org, now);
    if st.store.swap_org_keys(&org, &after).await? {
        let detail = format!(
            "signing key {} now signs for organisation {}",
            after.org.signing_key.key_id, after.org.id
        );
        st.audit("control-plane", Some(&after.org.id), "org.key_switched", &detail).await;
        return Ok(after);
    }
    // Another request settled it first: read what it stored.
    Ok(st.store.get_org(&org.org.id).await?.map_or(after, |stored| signing::settle(&stored, now)))
}

/// Signs a statement for a node of `org` (a job, a service's desired state) with the key that
/// signs for the org at `now_ms`.
pub(super) fn sign<T: serde::Serialize>(
    org: &OrgRecord,
    now_ms: u64,
    payload: &T,
) -> ApiResult<SignedEnvelope> {
    let key =
        signing::effective_key(org, now_ms).map_err(|e| ApiError::internal("bad_org_key", e.to_string()))?;
    signing::sign_payload(&key, payload).map_err(|e| ApiError::internal("signing_failed", e.to_string()))
}

/// The key that signs for `org` at `now_ms`, decoded before a store hands out a sequence
/// number: building what is numbered then cannot fail on the key.
pub(super) fn signing_key(org: &OrgRecord, now_ms: u64) -> ApiResult<ed25519_dalek::SigningKey> {
    signing::effective_key(org, now_ms).map_err(|e| ApiError::internal("bad_org_key", e.to_string()))
}

/// Signs inside a store's numbering step ([`crate::store::MakeJob`]).
pub(super) fn sign_numbered<T: serde::Serialize>(
    key: &ed25519_dalek::SigningKey,
    payload: &T,
) -> Result<SignedEnvelope, StoreError> {
    signing::sign_payload(key, payload).map_err(|e| StoreError::Backend(format!("cannot sign: {e}")))
}

/// `env` signed again with the key that signs for `org` at `now_ms`, when an earlier key signed
/// it (a job submitted before a signing-key rotation's overlap ended, handed out after it). The
/// payload is unchanged, byte for byte.
pub(super) fn resign(org: &OrgRecord, now_ms: u64, env: &mut SignedEnvelope) -> ApiResult<()> {
    if signing::effective(org, now_ms).0.key_id == env.key_id {
        return Ok(());
    }
    let key =
        signing::effective_key(org, now_ms).map_err(|e| ApiError::internal("bad_org_key", e.to_string()))?;
    *env = signing::sign_bytes(&key, std::mem::take(&mut env.payload));
    Ok(())
}

/// Most entries of `inputs` and of `egress_bodies`.
pub const MAX_SPEC_KEYS: usize = 64;
/// Longest object key (bytes), as S3 allows.
pub const MAX_KEY_BYTES: usize = 1024;

/// Refuse what the node would refuse anyway, so the operator hears about it at once.
pub(super) fn check_job_spec(spec: &JobSpec) -> ApiResult<()> {
    match spec {
        JobSpec::Container(c) => check_spec(c),
        JobSpec::Inference(i) => check_inference_spec(i),
    }
}

fn check_inference_spec(spec: &InferenceSpec) -> ApiResult<()> {
    spec.check().map_err(|why| ApiError::bad_request("bad_inference_spec", why))?;
    for (field, key) in spec
        .input_keys()
        .map(|k| ("input key", k))
        .chain(spec.output_prefix.iter().map(|p| ("output_prefix", p)))
    {
        check_object_key(key)
            .map_err(|why| ApiError::bad_request("bad_object_key", format!("{field} {key:?} {why}")))?;
    }
    Ok(())
}

/// The checks of a container spec (also those a trigger's job template must pass).
pub(super) fn check_spec(spec: &ContainerSpec) -> ApiResult<()> {
    let digest = spec.image.strip_prefix("sha256:").unwrap_or("");
    if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::bad_request(
            "bad_image",
            format!("image {:?} must be an image id `sha256:<64 hex>`; nodes never pull by name", spec.image),
        ));
    }
    if spec.timeout_secs == 0 {
        return Err(ApiError::bad_request("bad_timeout", "timeout_secs must be at least 1"));
    }
    let r = &spec.resources;
    if r.memory_mb < 6 {
        return Err(ApiError::bad_request("bad_resources", "resources.memory_mb must be at least 6"));
    }
    if r.cpu_millis == 0 || r.pids == 0 {
        return Err(ApiError::bad_request(
            "bad_resources",
            "resources.cpu_millis and resources.pids must be at least 1",
        ));
    }
    if let Some(label) = spec.labels.keys().find(|k| k.starts_with("outpost.")) {
        return Err(ApiError::bad_request(
            "reserved_label",
            format!("label {label:?} is reserved for the agent"),
        ));
    }
    for (field, keys) in [("inputs", &spec.inputs), ("egress_bodies", &spec.egress_bodies)] {
        if keys.len() > MAX_SPEC_KEYS {
            return Err(ApiError::bad_request(
                "bad_object_key",
                format!("{field} has {} entries; at most {MAX_SPEC_KEYS}", keys.len()),
            ));
        }
        for key in keys {
            check_object_key(key).map_err(|why| {
                ApiError::bad_request("bad_object_key", format!("{field} entry {key:?} {why}"))
            })?;
        }
    }
    if let Some(prefix) = &spec.output_prefix {
        check_object_key(prefix).map_err(|why| {
            ApiError::bad_request("bad_object_key", format!("output_prefix {prefix:?} {why}"))
        })?;
    }
    Ok(())
}

/// An object key (or a prefix ending in `/`) of the node's local store, as a job may name it:
/// the node maps keys to paths under `/in` and `/out`, so nothing may climb out of them.
/// The error completes "key … ".
pub fn check_object_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("is empty".into());
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(format!("is {} bytes long; at most {MAX_KEY_BYTES}", key.len()));
    }
    if key.starts_with('/') {
        return Err("starts with '/'; keys are relative to the store's bucket".into());
    }
    if key.chars().any(char::is_control) {
        return Err("holds a NUL or control character".into());
    }
    let body = key.strip_suffix('/').unwrap_or(key);
    if body.split('/').any(|seg| seg.is_empty() || seg == "." || seg == "..") {
        return Err("has an empty, '.' or '..' path segment".into());
    }
    Ok(())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct JobQuery {
    /// Only jobs of this node.
    pub node_id: Option<String>,
    /// Only jobs in this state.
    pub state: Option<JobState>,
    /// Only jobs of this group (`placement: each`).
    pub group_id: Option<String>,
    /// At most this many, newest first (default 100; more than 1000 is taken as 1000).
    #[param(value_type = Option<u64>)]
    pub limit: Option<usize>,
}

#[utoipa::path(get, path = paths::JOBS, tag = "jobs", params(JobQuery),
    responses((status = 200, body = JobList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn list_jobs(
    caller: Caller,
    State(st): State<Shared>,
    Params(q): Params<JobQuery>,
) -> ApiResult<Json<JobList>> {
    let filter = JobFilter {
        org_id: caller.org_filter().map(str::to_owned),
        node_id: q.node_id,
        state: q.state,
        group_id: q.group_id,
        failed: false,
        limit: q.limit.unwrap_or(DEFAULT_LIST).min(MAX_LIST),
    };
    Ok(Json(JobList { jobs: st.store.list_jobs(filter).await? }))
}

#[utoipa::path(get, path = paths::JOB, tag = "jobs", params(("job_id" = String, Path, description = "job id")),
    description = "One job with its result once the node has reported it.",
    responses((status = 200, body = JobInfo), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn get_job(
    caller: Caller,
    State(st): State<Shared>,
    Path(job_id): Path<String>,
) -> ApiResult<Json<JobInfo>> {
    let missing = || ApiError::not_found(format!("job {job_id} does not exist"));
    let job = st.store.get_job(&job_id).await?.ok_or_else(missing)?;
    caller.may(&job.info.org_id, Role::Viewer, missing)?;
    let mut info = job.info;
    // Held at its site for an approver, as the node's last heartbeat said.
    if info.state == JobState::Accepted
        && let Some(node) = st.store.get_node(&info.node_id).await?
    {
        info.awaiting_site_approval_since_unix_ms = node.last_heartbeat.as_ref().and_then(|hb| {
            hb.awaiting_approval
                .iter()
                .find(|a| a.job_id == info.job_id && a.attempt == info.attempt)
                .map(|a| a.since_unix_ms)
        });
    }
    Ok(Json(info))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_keys_cannot_climb_out_or_hide_control_characters() {
        for ok in ["a", "in/photo.jpg", "results/", "a/b/c.txt", "x..y/z"] {
            assert_eq!(check_object_key(ok), Ok(()), "{ok}");
        }
        for bad in ["", "/abs", "a//b", "a/./b", "../x", "a/..", "a/../", "nul\0x", "tab\tx", "//"] {
            assert!(check_object_key(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_object_key(&"k".repeat(MAX_KEY_BYTES)).is_ok());
        assert!(check_object_key(&"k".repeat(MAX_KEY_BYTES + 1)).is_err());
    }
}
