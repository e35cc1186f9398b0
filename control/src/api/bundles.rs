//! Air-gapped bundles (the control plane's side). `POST /v1/orgs/{org_id}/bundles` signs a
//! bundle's manifest: the operator's machine sends the size and digest of each file it will
//! pack (images, models: they never cross the API), the control plane creates each job for
//! each target node exactly as a submission would (queued, signed, the node's next sequence
//! number), gives every target node a new counter (from the same per-node sequence, so it only
//! grows) and answers with the signed manifest and the bytes of the parts it made.
//! `POST /v1/bundles/results` takes a node's signed results bundle, stores each result
//! exactly as the network path does (idempotent by `job_id/attempt`) and answers with the
//! acknowledgement bundle for the node.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use outpost_protocol::{
    BUNDLE_FORMAT, BundleFile, BundleManifest, BundlePart, BundleRequest, BundleResponse, ErrorBody,
    JobAssignment, NodeInfo, PartKind, ResultReport, ResultsAck, ResultsBundle, ResultsImport,
    ResultsPayload, Role, Selector, paths,
};

use super::jobs::{JobOrigin, check_job_spec, create_job, sign};
use super::{ApiError, ApiResult, Body, Caller, Shared};
use crate::pki::sha256_hex;
use crate::store::ResultOutcome;

/// Default lifetime of a bundle and its jobs.
pub const DEFAULT_BUNDLE_EXPIRY_SECS: u64 = 30 * 24 * 3600;
/// Longest lifetime a bundle may have.
pub const MAX_BUNDLE_EXPIRY_SECS: u64 = 365 * 24 * 3600;
/// Most target nodes of one bundle.
const MAX_BUNDLE_NODES: usize = 1000;
/// Held while a bundle is built (see `create`).
static BUILD_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Largest results bundle the API takes (it carries at most the node's outbox of results).
pub const MAX_RESULTS_BUNDLE_BYTES: usize = 256 * 1024 * 1024;

#[utoipa::path(post, path = paths::ORG_BUNDLES, tag = "bundles", request_body = BundleRequest,
    params(("org_id" = String, Path, description = "organisation id")),
    description = "Sign a bundle for air-gapped nodes: each job is created for each target node (queued, \
                   signed), every target node gets a new counter, and the answer carries the signed manifest \
                   and the parts the control plane made, in manifest order (`null` for the request's files, \
                   which the caller packs itself).",
    responses((status = 201, body = BundleResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "no node matches the selector", body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn create(
    caller: Caller,
    State(st): State<Shared>,
    Path(org_id): Path<String>,
    Body(req): Body<BundleRequest>,
) -> ApiResult<(StatusCode, Json<BundleResponse>)> {
    super::access::org_exists(&st, &caller, &org_id, Role::Operator).await?;
    let expiry = req.expires_in_secs.unwrap_or(DEFAULT_BUNDLE_EXPIRY_SECS);
    if expiry == 0 || expiry > MAX_BUNDLE_EXPIRY_SECS {
        return Err(ApiError::bad_request(
            "bad_expiry",
            format!("expires_in_secs must be 1..={MAX_BUNDLE_EXPIRY_SECS}"),
        ));
    }
    for f in &req.files {
        if !matches!(f.kind, PartKind::Image | PartKind::Model | PartKind::Config) {
            return Err(ApiError::bad_request("bad_file", "files are images, models or one configuration"));
        }
        if f.sha256.len() != 64 || !f.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(ApiError::bad_request(
                "bad_file",
                format!("file {:?}: sha256 must be 64 lowercase hex", f.label),
            ));
        }
    }
    for spec in &req.jobs {
        check_job_spec(spec)?;
    }
    super::jobs::check_recipients(&req.recipients)?;
    let mut deployments = Vec::new();
    for name in &req.deployments {
        let d = st.store.get_deployment(&org_id, name).await?.ok_or_else(|| {
            ApiError::not_found(format!("organisation {org_id} has no deployment {name}; see `deploy list`"))
        })?;
        deployments.push(d);
    }
    // One build at a time: its jobs' sequence numbers and its counters (drawn after them) then
    // rise together from one bundle to the next, so importing bundles in the order they were
    // built never meets a job numbered below one already taken.
    let _one_build = BUILD_LOCK.lock().await;
    let nodes = targets(&st, &org_id, &req).await?;
    // An older agent refuses a part kind it does not know (the whole bundle): say so here.
    if req.files.iter().any(|f| f.kind == PartKind::Config)
        && let Some(old) =
            nodes.iter().find(|n| !n.announce().has(outpost_protocol::capability::BUNDLE_CONFIG))
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "agent_too_old",
            format!(
                "node {}'s agent has not announced the `bundle-config` capability: it would refuse a bundle with a \
                 configuration part; leave --config out for it",
                old.node_id
            ),
        ));
    }
    if !req.recipients.is_empty()
        && let Some(old) = nodes.iter().find(|n| !super::jobs::can_seal(n))
    {
        return Err(super::jobs::cannot_seal(&old.node_id));
    }
    let per_node = req.jobs.len().saturating_add(deployments.len());
    let parts = req.files.len().saturating_add(nodes.len().saturating_mul(per_node));
    if parts > outpost_protocol::MAX_BUNDLE_PARTS {
        return Err(ApiError::bad_request(
            "too_many_parts",
            format!(
                "{} file(s) and {per_node} job(s) and deployment(s) for {} node(s) make {parts} parts, more \
                 than {}; split the bundle",
                req.files.len(),
                nodes.len(),
                outpost_protocol::MAX_BUNDLE_PARTS
            ),
        ));
    }
    let mut jobs = Vec::new();
    let mut job_parts: Vec<Made> = deployment_parts(&st, &nodes, &deployments).await?;
    for node in &nodes {
        for spec in &req.jobs {
            let origin = JobOrigin {
                selector: req.selector.clone(),
                recipients: req.recipients.clone(),
                ..Default::default()
            };
            let info = create_job(&st, node, spec.clone(), expiry, None, origin).await?.ok_or_else(|| {
                ApiError::internal("job_id_taken", "a freshly generated job id is already taken; try again")
            })?;
            let rec = st
                .store
                .get_job(&info.job_id)
                .await?
                .ok_or_else(|| ApiError::internal("job_missing", "a job just created is gone"))?;
            let a =
                JobAssignment { job_id: info.job_id.clone(), attempt: info.attempt, envelope: rec.envelope };
            let text = serde_json::to_string(&a).map_err(|e| ApiError::internal("encode", e.to_string()))?;
            job_parts.push(Made {
                node_id: node.node_id.clone(),
                kind: PartKind::Job,
                label: info.job_id.clone(),
                text,
            });
            jobs.push(info);
        }
    }
    let (manifest, parts) =
        sign_manifest(&st, &org_id, &nodes, req.selector.clone(), &req.files, job_parts, expiry).await?;
    let detail = format!(
        "bundle {} for {} node(s): {} file(s), {} job(s), deployment(s) {}",
        manifest.1,
        nodes.len(),
        req.files.len(),
        jobs.len(),
        if req.deployments.is_empty() { "none".to_owned() } else { req.deployments.join(", ") }
    );
    st.audit(&caller.actor, Some(&org_id), "bundle.created", &detail).await;
    Ok((StatusCode::CREATED, Json(BundleResponse { manifest: manifest.0, parts, jobs })))
}

/// A part the control plane makes for one node: a job, a service's desired state, an
/// acknowledgement (its signed JSON).
struct Made {
    node_id: String,
    kind: PartKind,
    label: String,
    text: String,
}

/// Most rollout passes a build runs to let a deployment's batches reach its offline targets.
const MAX_BUILD_PASSES: usize = 64;

/// The desired state each deployment's rollout signed for each node, as a part: exactly the
/// envelope the node would get in a poll answer. Rollout passes run first (an air-gapped node
/// never holds a batch: it is offline), so a new deployment reaches every target; a node the
/// rollout has not given a desired state is refused with the reason.
async fn deployment_parts(
    st: &Shared,
    nodes: &[NodeInfo],
    deployments: &[crate::store::DeploymentRecord],
) -> ApiResult<Vec<Made>> {
    if deployments.is_empty() {
        return Ok(Vec::new());
    }
    let desired =
        |records: &[crate::store::NodeServiceRecord], node: &str, d: &crate::store::DeploymentRecord| {
            records
                .iter()
                .find(|r| r.node_id == node && r.service == d.info.service)
                .and_then(|r| r.desired.clone())
                .filter(|x| x.deployment == d.info.name && !x.removal)
        };
    let mut missing = usize::MAX;
    let mut records = Vec::new();
    for _ in 0..MAX_BUILD_PASSES {
        super::rollout::pass(st).await?;
        records = st.store.list_node_services(None).await?;
        let now_missing = nodes
            .iter()
            .flat_map(|n| deployments.iter().map(move |d| (n, d)))
            .filter(|(n, d)| desired(&records, &n.node_id, d).is_none())
            .count();
        if now_missing == 0 || now_missing >= missing {
            break;
        }
        missing = now_missing;
    }
    let mut out = Vec::new();
    for node in nodes {
        for d in deployments {
            let Some(x) = desired(&records, &node.node_id, d) else {
                let all = st.store.list_deployments().await?;
                let by_key: std::collections::HashMap<String, crate::store::NodeServiceRecord> =
                    records.iter().map(|r| (r.key(), r.clone())).collect();
                let why = super::rollout::node_table(
                    d,
                    &all,
                    std::slice::from_ref(node),
                    &by_key,
                    st.clock.now_ms(),
                    st.lease_ms(),
                )
                .into_iter()
                .next()
                .and_then(|row| row.reason)
                .unwrap_or_else(|| "its selector does not match the node".into());
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "no_desired_state",
                    format!(
                        "deployment {} has no desired state for node {} ({why}); see `deploy status {}`",
                        d.info.name, node.node_id, d.info.name
                    ),
                ));
            };
            let text = serde_json::to_string(&x.envelope)
                .map_err(|e| ApiError::internal("encode", e.to_string()))?;
            out.push(Made {
                node_id: node.node_id.clone(),
                kind: PartKind::Service,
                label: format!("{} revision {} ({})", d.info.name, x.revision, d.info.service),
                text,
            });
        }
    }
    Ok(out)
}

/// The nodes a bundle is for: named ones of the org, or those its selector matches now.
async fn targets(st: &Shared, org_id: &str, req: &BundleRequest) -> ApiResult<Vec<NodeInfo>> {
    let mut nodes = Vec::new();
    match (&req.selector, req.nodes.is_empty()) {
        (Some(_), false) => {
            return Err(ApiError::bad_request("bad_target", "give nodes or a selector, not both"));
        }
        (None, true) => {
            return Err(ApiError::bad_request("bad_target", "give the target nodes or a selector"));
        }
        (Some(s), true) => {
            let selector =
                Selector::parse(s).map_err(|e| ApiError::bad_request("bad_selector", e.to_string()))?;
            nodes = super::placement::matching_nodes(st, org_id, &selector).await?;
            if nodes.is_empty() {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "no_matching_node",
                    format!("no enrolled node of organisation {org_id} matches selector `{selector}`"),
                ));
            }
        }
        (None, false) => {
            for id in &req.nodes {
                let node = st.store.get_node(id).await?.ok_or_else(|| {
                    ApiError::not_found(format!("node {id} is not enrolled; see `node list`"))
                })?;
                if node.org_id != org_id {
                    return Err(ApiError::not_found(format!(
                        "node {id} is not a node of organisation {org_id}"
                    )));
                }
                nodes.push(node);
            }
        }
    }
    nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    nodes.dedup_by(|a, b| a.node_id == b.node_id);
    if nodes.len() > MAX_BUNDLE_NODES {
        return Err(ApiError::bad_request(
            "too_many_nodes",
            format!("a bundle targets at most {MAX_BUNDLE_NODES} nodes"),
        ));
    }
    Ok(nodes)
}

/// Gives each node its next counter and signs the manifest over `files` (first, in order) and
/// the made parts. Returns ((signed manifest, bundle id), parts).
async fn sign_manifest(
    st: &Shared,
    org_id: &str,
    nodes: &[NodeInfo],
    selector: Option<String>,
    files: &[BundleFile],
    made: Vec<Made>,
    expiry_secs: u64,
) -> ApiResult<((outpost_protocol::SignedEnvelope, String), Vec<Option<String>>)> {
    let org = st
        .store
        .get_org(org_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("organisation {org_id} does not exist")))?;
    let mut counters = BTreeMap::new();
    let acks_only =
        files.is_empty() && !made.is_empty() && made.iter().all(|m| m.kind == PartKind::ResultsAck);
    if acks_only {
        // An acknowledgement does not take part in the counter order (the node accepts it
        // whenever it comes, and a replay of one clears nothing new).
        counters.extend(nodes.iter().map(|n| (n.node_id.clone(), 0)));
    } else {
        let _ordered = st.submit_lock.lock().await;
        for node in nodes {
            counters.insert(node.node_id.clone(), st.store.next_job_seq(&node.node_id).await?);
        }
    }
    let mut parts = Vec::new();
    let mut bodies = Vec::new();
    for f in files {
        let i = parts.len();
        parts.push(BundlePart {
            name: BundleManifest::part_name(i, f.kind),
            kind: f.kind,
            size: f.size,
            sha256: f.sha256.clone(),
            node_id: None,
            label: f.label.clone(),
        });
        bodies.push(None);
    }
    for m in made {
        let i = parts.len();
        parts.push(BundlePart {
            name: BundleManifest::part_name(i, m.kind),
            kind: m.kind,
            size: m.text.len() as u64,
            sha256: sha256_hex(m.text.as_bytes()),
            node_id: Some(m.node_id),
            label: m.label,
        });
        bodies.push(Some(m.text));
    }
    let now = st.clock.now_ms();
    let manifest = BundleManifest {
        format: BUNDLE_FORMAT,
        bundle_id: uuid::Uuid::new_v4().simple().to_string(),
        org_id: org_id.to_owned(),
        counters,
        selector,
        created_unix_ms: now,
        expires_unix_ms: now.saturating_add(expiry_secs.saturating_mul(1000)),
        parts,
    };
    manifest.check().map_err(|e| ApiError::bad_request("bad_bundle", e))?;
    let signed = sign(&org, st.clock.now_ms(), &manifest)?;
    Ok(((signed, manifest.bundle_id), bodies))
}

#[utoipa::path(post, path = paths::BUNDLE_RESULTS, tag = "bundles", request_body = ResultsBundle,
    description = "Import a node's signed results bundle: the signature must verify against the node's \
                   enrolled certificate; each result is stored exactly once (as over the network), and the \
                   answer carries the acknowledgement bundle to carry back to the node.",
    responses((status = 200, body = ResultsImport), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "not signed by an enrolled node's certificate", body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn import_results(
    caller: Caller,
    State(st): State<Shared>,
    Body(bundle): Body<ResultsBundle>,
) -> ApiResult<Json<ResultsImport>> {
    caller.at_least(Role::Operator)?;
    let payload: ResultsPayload = serde_json::from_str(&bundle.payload).map_err(|e| {
        ApiError::bad_request("bad_bundle", format!("the results payload does not parse: {e}"))
    })?;
    let node = st
        .store
        .get_node(&payload.node_id)
        .await?
        .ok_or_else(|| forbidden(format!("node {} is not enrolled here", payload.node_id)))?;
    caller.may(&node.org_id, Role::Operator, || {
        forbidden(format!("node {} is not enrolled here", payload.node_id))
    })?;
    verify_node_signature(&node, &bundle).map_err(forbidden)?;
    if payload.org_id != node.org_id {
        return Err(forbidden(format!(
            "the bundle names organisation {}, the node is in {}",
            payload.org_id, node.org_id
        )));
    }
    let actor = format!("node:{}", node.node_id);
    let mut out = ResultsImport {
        node_id: node.node_id.clone(),
        results_bundle_id: payload.bundle_id.clone(),
        stored: Vec::new(),
        duplicates: Vec::new(),
        superseded: Vec::new(),
        refused: Vec::new(),
        events_stored: 0,
        events_up_to_seq: 0,
        service_reports_up_to_seq: 0,
        audit_stored: 0,
        audit_up_to_seq: 0,
        ack: BundleResponse { manifest: empty_envelope(), parts: Vec::new(), jobs: Vec::new() },
    };
    let mut acked = Vec::new();
    let mut refused_keys = Vec::new();
    for report in payload.results {
        let key = ResultReport::key_for(&report.job_id, report.attempt);
        if let Some((_, why)) = super::node::report_problem(&report) {
            out.refused.push((key.clone(), why));
            refused_keys.push(key);
            continue;
        }
        let outcome = report.outcome;
        match st.store.store_result(&node.node_id, report).await? {
            ResultOutcome::Stored => {
                let detail = format!(
                    "job {key}: {} (from results bundle {})",
                    outpost_protocol::wire_name(&outcome),
                    payload.bundle_id
                );
                st.audit(&actor, Some(&node.org_id), "job.result", &detail).await;
                out.stored.push(key.clone());
                acked.push(key);
            }
            ResultOutcome::Superseded => {
                st.audit(
                    &actor,
                    Some(&node.org_id),
                    "job.result.superseded",
                    &format!("job {key}: a later attempt replaced this one"),
                )
                .await;
                out.superseded.push(key.clone());
                acked.push(key);
            }
            ResultOutcome::Duplicate => {
                out.duplicates.push(key.clone());
                acked.push(key);
            }
            ResultOutcome::NotYours => {
                st.audit(
                    &actor,
                    Some(&node.org_id),
                    "report.refused",
                    &format!("job {key}: not sent to this node, or unknown"),
                )
                .await;
                out.refused
                    .push((key.clone(), "the job was not sent to this node, or does not exist here".into()));
                refused_keys.push(key);
            }
        }
    }
    // Relay events and service reports, through the same store calls (and triggers) as their
    // network routes, in the batch sizes those take.
    let mut events = payload.events;
    events.sort_by_key(|e| e.seq);
    for chunk in events.chunks(outpost_protocol::MAX_EVENTS_PER_BATCH) {
        let batch = outpost_protocol::EventBatch { events: chunk.to_vec() };
        match super::events::store_node_events(&st, &node, batch).await {
            Ok(ack) => {
                out.events_stored += ack.stored;
                out.events_up_to_seq = out.events_up_to_seq.max(ack.up_to_seq);
            }
            Err(e) => {
                out.refused.push((format!("events from seq {}", chunk[0].seq), e.body.message));
                break;
            }
        }
    }
    let mut reports = payload.service_reports;
    reports.sort_by_key(|r| r.seq);
    for chunk in reports.chunks(super::deploy::MAX_REPORTS_PER_BATCH) {
        let batch = outpost_protocol::ServiceReportBatch { reports: chunk.to_vec() };
        match super::deploy::store_node_reports(&st, &node, batch).await {
            Ok(ack) => out.service_reports_up_to_seq = out.service_reports_up_to_seq.max(ack.up_to_seq),
            Err(e) => {
                out.refused.push((format!("service reports from seq {}", chunk[0].seq), e.body.message));
                break;
            }
        }
    }
    // The desired service states the node persisted, as a poll would acknowledge them.
    if !payload.service_acks.is_empty() {
        st.store.ack_node_services(&node.node_id, payload.service_acks.clone()).await?;
    }
    // The node's own description, as of when it wrote the bundle (never older than what the
    // network brought): labels, models and capabilities for selectors and rollouts. Not a
    // sign of life: the node is no more reachable than before.
    if let Some(hb) = payload.heartbeat
        && node.last_seen_unix_ms.is_none_or(|seen| seen < payload.created_unix_ms)
        && outpost_protocol::selector::check_labels(&hb.labels).is_ok()
    {
        st.store.record_heartbeat(&node.node_id, hb, None).await?;
        st.fleet_changed.notify_one();
    }
    // The node's audit log, checked link by link against what is stored of it.
    if !payload.audit.is_empty() {
        let got = st.store.append_node_audit(&node.node_id, payload.audit).await?;
        out.audit_stored = got.stored;
        out.audit_up_to_seq = got.up_to_seq;
        if let Some(why) = got.refused {
            st.audit(
                &actor,
                Some(&node.org_id),
                "node.audit.refused",
                &format!("results bundle {}: {why}", payload.bundle_id),
            )
            .await;
            out.refused.push(("audit".into(), why));
        }
    }
    let ack = ResultsAck {
        node_id: node.node_id.clone(),
        results_bundle_id: payload.bundle_id.clone(),
        results: acked,
        refused: refused_keys,
        events_up_to_seq: out.events_up_to_seq,
        service_reports_up_to_seq: out.service_reports_up_to_seq,
        service_acks: payload.service_acks,
        audit_up_to_seq: out.audit_up_to_seq,
    };
    let org = super::jobs::org_of(&st, &node).await?;
    let signed_ack = sign(&org, st.clock.now_ms(), &ack)?;
    let text = serde_json::to_string(&signed_ack).map_err(|e| ApiError::internal("encode", e.to_string()))?;
    let made = vec![Made {
        node_id: node.node_id.clone(),
        kind: PartKind::ResultsAck,
        label: format!("ack:{}", payload.bundle_id),
        text,
    }];
    let ((manifest, bundle_id), parts) = sign_manifest(
        &st,
        &node.org_id,
        std::slice::from_ref(&node),
        None,
        &[],
        made,
        DEFAULT_BUNDLE_EXPIRY_SECS,
    )
    .await?;
    let detail = format!(
        "results bundle {} of node {}: {} stored, {} duplicate, {} superseded, {} refused; acknowledgement bundle {bundle_id}",
        payload.bundle_id,
        node.node_id,
        out.stored.len(),
        out.duplicates.len(),
        out.superseded.len(),
        out.refused.len()
    );
    st.audit(&caller.actor, Some(&node.org_id), "bundle.results_imported", &detail).await;
    out.ack = BundleResponse { manifest, parts, jobs: Vec::new() };
    Ok(Json(out))
}

fn forbidden(why: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "not_signed_by_node", why)
}

fn empty_envelope() -> outpost_protocol::SignedEnvelope {
    outpost_protocol::SignedEnvelope {
        payload: String::new(),
        key_id: String::new(),
        signature_hex: String::new(),
    }
}

/// The bundle's certificate must be the one the node enrolled with, and its key must have
/// signed the payload (ECDSA P-256, SHA-256).
fn verify_node_signature(node: &NodeInfo, bundle: &ResultsBundle) -> Result<(), String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(bundle.cert_pem.as_bytes())
        .map_err(|e| format!("the bundle's certificate is not PEM: {e}"))?;
    let presented = sha256_hex(&pem.contents);
    if presented != node.cert_sha256 && node.previous_cert_sha256.as_deref() != Some(presented.as_str()) {
        return Err(format!("the bundle is not signed with node {}'s enrolled certificate", node.node_id));
    }
    let cert = pem.parse_x509().map_err(|e| format!("the bundle's certificate does not parse: {e}"))?;
    let key = cert.public_key().subject_public_key.data.to_vec();
    let sig = hex::decode(&bundle.signature_hex).map_err(|_| "the signature is not hex".to_owned())?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, key)
        .verify(bundle.payload.as_bytes(), &sig)
        .map_err(|_| format!("the signature does not verify with node {}'s key", node.node_id))
}
