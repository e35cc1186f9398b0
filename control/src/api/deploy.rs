//! Deployment routes: create a deployment or a new revision of one (operator), act on its
//! rollout, read it with a per-node table; and the nodes' service status reports (mutual TLS).

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use outpost_protocol::{
    DeployAction, DeployActionRequest, DeployRequest, DeploymentInfo, DeploymentList, ErrorBody, Role,
    RolloutStatus, Selector, ServiceReportAck, ServiceReportBatch, ServiceState, paths,
};

use super::{ApiError, ApiResult, AppState, Body, Caller, NodeAuth, Shared, rollout};
use crate::store::{DeploymentRecord, MAX_REVISIONS_KEPT, NodeServiceRecord};

/// Most reports a node may send in one request.
pub const MAX_REPORTS_PER_BATCH: usize = 1000;

fn check_request(req: &DeployRequest) -> ApiResult<(String, Selector)> {
    outpost_protocol::check_service_name(&req.name)
        .map_err(|why| ApiError::bad_request("bad_name", format!("deployment name {why}")))?;
    let service = req.service.clone().unwrap_or_else(|| req.name.clone());
    outpost_protocol::check_service_name(&service)
        .map_err(|why| ApiError::bad_request("bad_name", format!("service name {why}")))?;
    let selector =
        Selector::parse(&req.selector).map_err(|e| ApiError::bad_request("bad_selector", e.to_string()))?;
    req.spec.check().map_err(|why| ApiError::bad_request("bad_service_spec", why))?;
    if req.rollout.max_unavailable == Some(0)
        || req.rollout.abort_on_failures == 0
        || req.rollout.health_timeout_secs == 0
    {
        return Err(ApiError::bad_request(
            "bad_rollout",
            "rollout.max_unavailable, abort_on_failures and health_timeout_secs must be at least 1",
        ));
    }
    let r = &req.spec.resources;
    if r.memory_mb < 6 || r.cpu_millis == 0 || r.pids == 0 {
        return Err(ApiError::bad_request(
            "bad_service_spec",
            "resources.memory_mb must be at least 6, cpu_millis and pids at least 1",
        ));
    }
    if let Some(k) = req.spec.env.keys().find(|k| k.is_empty() || k.contains('=') || k.contains('\0')) {
        return Err(ApiError::bad_request(
            "bad_service_spec",
            format!("environment variable name {k:?} is not valid"),
        ));
    }
    Ok((service, selector))
}

#[utoipa::path(post, path = paths::DEPLOYMENTS, tag = "deployments", request_body = DeployRequest,
    params(("org_id" = String, Path, description = "organisation id")),
    description = "Create a deployment, or a new revision of an existing one (same name): it supersedes any \
                   rollout in progress. The rollout moves batch by batch on the nodes' health reports.",
    responses((status = 201, body = DeploymentInfo), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn create(
    caller: Caller,
    State(st): State<Shared>,
    Path(org_id): Path<String>,
    Body(req): Body<DeployRequest>,
) -> ApiResult<(StatusCode, Json<DeploymentInfo>)> {
    caller.may(&org_id, Role::Operator, || org_missing(&org_id))?;
    if req.org_id != org_id {
        return Err(ApiError::bad_request(
            "bad_org",
            format!("org_id {:?} in the body is not the path's {org_id:?}", req.org_id),
        ));
    }
    let (service, selector) = check_request(&req)?;
    let _exclusive = st.fleet_exclusive().await?;
    let org = st.store.get_org(&org_id).await?.ok_or_else(|| {
        ApiError::not_found(format!("organisation {org_id} does not exist; see `org list`"))
    })?;
    super::jobs::feature_on(&org, outpost_protocol::feature::SERVICES)?;
    let now = st.clock.now_ms();
    let record = match st.store.get_deployment(&org_id, &req.name).await? {
        Some(mut d) => {
            if d.info.service != service {
                return Err(ApiError::bad_request(
                    "bad_name",
                    format!(
                        "deployment {} runs service {}; a deployment keeps its service name",
                        d.info.name, d.info.service
                    ),
                ));
            }
            let superseded = matches!(d.info.status, RolloutStatus::InProgress | RolloutStatus::Paused);
            d.info.revision += 1;
            d.info.selector = selector.to_string();
            d.info.priority = req.priority;
            d.info.rollout = req.rollout;
            d.info.spec = req.spec.clone();
            d.info.status = RolloutStatus::InProgress;
            d.info.reason =
                superseded.then(|| format!("supersedes the rollout of revision {}", d.info.revision - 1));
            d.info.updated.clear();
            d.info.updated_unix_ms = now;
            d.batch_started.clear();
            d.revisions.push((d.info.revision, req.spec));
            let excess = d.revisions.len().saturating_sub(MAX_REVISIONS_KEPT);
            // Keep the specs a rollback may need (the completed ones), drop the oldest others.
            let keep: Vec<u64> = d.completed.iter().rev().take(2).copied().collect();
            let mut dropped = 0;
            d.revisions.retain(|(r, _)| {
                let drop = dropped < excess && !keep.contains(r) && *r != d.info.revision;
                dropped += usize::from(drop);
                !drop
            });
            d
        }
        None => DeploymentRecord {
            info: DeploymentInfo {
                name: req.name.clone(),
                org_id: org_id.clone(),
                service,
                selector: selector.to_string(),
                priority: req.priority,
                rollout: req.rollout,
                revision: 1,
                stable_revision: None,
                status: RolloutStatus::InProgress,
                reason: None,
                updated: Vec::new(),
                spec: req.spec.clone(),
                created_unix_ms: now,
                updated_unix_ms: now,
                nodes: Vec::new(),
            },
            revisions: vec![(1, req.spec)],
            completed: Vec::new(),
            batch_started: Default::default(),
        },
    };
    st.store.put_deployment(record.clone()).await?;
    let i = &record.info;
    let detail = format!(
        "deployment {} revision {} of service {} (image {}), selector {}, priority {}, batch {}",
        i.name, i.revision, i.service, i.spec.image, i.selector, i.priority, i.rollout.batch
    );
    st.audit(&caller.actor, Some(&org_id), "deploy.created", &detail).await;
    st.fleet_changed.notify_one();
    Ok((StatusCode::CREATED, Json(record.info)))
}

#[utoipa::path(get, path = paths::DEPLOYMENTS, tag = "deployments", params(("org_id" = String, Path, description = "organisation id")),
    responses((status = 200, body = DeploymentList), (status = 401, body = ErrorBody)), security(("admin_token" = [])))]
pub async fn list(
    caller: Caller,
    State(st): State<Shared>,
    Path(org_id): Path<String>,
) -> ApiResult<Json<DeploymentList>> {
    caller.may(&org_id, Role::Viewer, || org_missing(&org_id))?;
    let mut deployments: Vec<DeploymentInfo> = st
        .store
        .list_deployments()
        .await?
        .into_iter()
        .filter(|d| d.info.org_id == org_id)
        .map(|d| d.info)
        .collect();
    deployments.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(DeploymentList { deployments }))
}

#[utoipa::path(get, path = paths::DEPLOYMENT, tag = "deployments",
    params(("org_id" = String, Path, description = "organisation id"), ("name" = String, Path, description = "deployment name")),
    description = "A deployment with every node its selector matches: the phase (pending, updating, healthy, failed, \
                   rolled back, offline, overridden, agent too old), the revision it is told to run, its last report \
                   and the reason for anything that is not healthy.",
    responses((status = 200, body = DeploymentInfo), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn get(
    caller: Caller,
    State(st): State<Shared>,
    Path((org_id, name)): Path<(String, String)>,
) -> ApiResult<Json<DeploymentInfo>> {
    caller.may(&org_id, Role::Viewer, || deployment_missing(&org_id, &name))?;
    Ok(Json(status(&st, &org_id, &name).await?))
}

fn org_missing(org_id: &str) -> ApiError {
    ApiError::not_found(format!("organisation {org_id} does not exist; see `org list`"))
}

fn deployment_missing(org_id: &str, name: &str) -> ApiError {
    ApiError::not_found(format!("deployment {name} does not exist in organisation {org_id}"))
}

async fn status(st: &AppState, org_id: &str, name: &str) -> ApiResult<DeploymentInfo> {
    let all = st.store.list_deployments().await?;
    let d = all.iter().find(|d| d.info.org_id == org_id && d.info.name == name).ok_or_else(|| {
        ApiError::not_found(format!("deployment {name} does not exist in organisation {org_id}"))
    })?;
    let nodes = st.fleet().await?;
    let records: HashMap<String, NodeServiceRecord> =
        st.store.list_node_services(None).await?.into_iter().map(|r| (r.key(), r)).collect();
    let mut info = d.info.clone();
    info.nodes = rollout::node_table(d, &all, &nodes, &records, st.clock.now_ms(), st.lease_ms());
    Ok(info)
}

#[utoipa::path(post, path = paths::DEPLOYMENT_ACTION, tag = "deployments", request_body = DeployActionRequest,
    params(("org_id" = String, Path, description = "organisation id"), ("name" = String, Path, description = "deployment name")),
    description = "pause / resume a rollout; abort it (the updated nodes go back to the last completed revision); \
                   roll the whole deployment back to the revision that completed before the current one.",
    responses((status = 200, body = DeploymentInfo), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "the action does not apply in the rollout's state", body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn act(
    caller: Caller,
    State(st): State<Shared>,
    Path((org_id, name)): Path<(String, String)>,
    Body(req): Body<DeployActionRequest>,
) -> ApiResult<Json<DeploymentInfo>> {
    caller.may(&org_id, Role::Operator, || deployment_missing(&org_id, &name))?;
    let exclusive = st.fleet_exclusive().await?;
    let mut d = st.store.get_deployment(&org_id, &name).await?.ok_or_else(|| {
        ApiError::not_found(format!("deployment {name} does not exist in organisation {org_id}"))
    })?;
    let conflict = |why: String| ApiError::new(StatusCode::CONFLICT, "bad_state", why);
    let state = outpost_protocol::wire_name(&d.info.status);
    match (req.action, d.info.status) {
        (DeployAction::Pause, RolloutStatus::InProgress) => d.info.status = RolloutStatus::Paused,
        (DeployAction::Resume, RolloutStatus::Paused) => d.info.status = RolloutStatus::InProgress,
        (DeployAction::Abort, RolloutStatus::InProgress | RolloutStatus::Paused) => {
            d.info.status = RolloutStatus::RolledBack;
            d.info.reason = Some("aborted by an operator".into());
        }
        (DeployAction::Rollback, _) => {
            // The revision that completed before the one nodes run now.
            let running = if d.info.status == RolloutStatus::Complete {
                Some(d.info.revision)
            } else {
                d.info.stable_revision
            };
            let target = d
                .completed
                .iter()
                .rev()
                .copied()
                .find(|r| Some(*r) != running && *r < running.unwrap_or(u64::MAX));
            let target = match (d.info.status, target) {
                (RolloutStatus::InProgress | RolloutStatus::Paused, _)
                    if d.info.stable_revision.is_some() =>
                {
                    d.info.stable_revision
                }
                (_, t) => t,
            };
            let Some(target) = target else {
                return Err(conflict(format!(
                    "deployment {name} has no earlier revision that completed to go back to"
                )));
            };
            if target >= d.info.revision {
                return Err(conflict(format!("deployment {name} already runs revision {target}")));
            }
            if d.spec_of(target).is_none() {
                return Err(conflict(format!(
                    "deployment {name}: the spec of revision {target} is no longer kept; create it again as a new revision"
                )));
            }
            d.completed.retain(|r| *r <= target);
            d.info.stable_revision = Some(target);
            d.info.status = RolloutStatus::RolledBack;
            d.info.reason = Some(format!("rolled back by an operator to revision {target}"));
        }
        (action, _) => {
            let action = outpost_protocol::wire_name(&action);
            return Err(conflict(format!("cannot {action} deployment {name}: its rollout is {state}")));
        }
    }
    d.info.updated_unix_ms = st.clock.now_ms();
    st.store.put_deployment(d.clone()).await?;
    drop(exclusive);
    let detail = format!("deployment {name}: {} (was {state})", outpost_protocol::wire_name(&req.action));
    st.audit(&caller.actor, Some(&org_id), "deploy.action", &detail).await;
    st.fleet_changed.notify_one();
    Ok(Json(status(&st, &org_id, &name).await?))
}

#[utoipa::path(post, path = paths::NODE_SERVICES, tag = "node", request_body = ServiceReportBatch,
    description = "Service status reports, oldest first: stored once each by (node, seq); the answer says up to \
                   which seq they are stored.",
    responses((status = 200, body = ServiceReportAck), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)),
    security(("node_certificate" = [])))]
pub async fn node_reports(
    NodeAuth(node): NodeAuth,
    State(st): State<Shared>,
    Body(batch): Body<ServiceReportBatch>,
) -> ApiResult<Json<ServiceReportAck>> {
    Ok(Json(store_node_reports(&st, &node, batch).await?))
}

/// Stores a node's service reports once each (by node and seq): whether they came over the
/// network or in a results bundle.
pub(super) async fn store_node_reports(
    st: &Shared,
    node: &outpost_protocol::NodeInfo,
    batch: ServiceReportBatch,
) -> ApiResult<ServiceReportAck> {
    if batch.reports.len() > MAX_REPORTS_PER_BATCH {
        return Err(ApiError::bad_request(
            "batch_too_large",
            format!("at most {MAX_REPORTS_PER_BATCH} reports per request"),
        ));
    }
    for r in &batch.reports {
        outpost_protocol::check_service_name(&r.service)
            .map_err(|why| ApiError::bad_request("bad_report", format!("service name {why}")))?;
        if r.health_output.len() > outpost_protocol::MAX_HEALTH_OUTPUT_BYTES {
            return Err(ApiError::bad_request(
                "bad_report",
                format!("health_output is at most {} bytes", outpost_protocol::MAX_HEALTH_OUTPUT_BYTES),
            ));
        }
    }
    let notable: Vec<String> = batch
        .reports
        .iter()
        .filter(|r| {
            matches!(r.state, ServiceState::Failed | ServiceState::RolledBack | ServiceState::Refused)
        })
        .map(|r| {
            let state = outpost_protocol::wire_name(&r.state);
            format!(
                "service {} revision {}: {state}: {}",
                r.service,
                r.revision,
                r.message.clone().unwrap_or_default()
            )
        })
        .collect();
    let up_to_seq = st.store.store_service_reports(&node.node_id, batch.reports).await?;
    for detail in notable {
        st.audit(&format!("node:{}", node.node_id), Some(&node.org_id), "service.report", &detail).await;
    }
    st.fleet_changed.notify_one();
    Ok(ServiceReportAck { up_to_seq })
}
