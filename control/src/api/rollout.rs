//! The rollout controller: one loop that moves every deployment's rollout on by its nodes'
//! health reports, and turns the deployments into a signed desired state per node and service.
//! It compares what should be with what was last signed on every pass and converges, so a
//! restart of the control plane, a node that was offline, or a label change all end in the
//! same place. Nothing can stay "in progress" for ever: a batch ends healthy, failed (health
//! timeout) or skipped (node offline), and a newer revision supersedes the rollout.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use outpost_protocol::{
    DeploymentInfo, NodeInfo, NodePhase, RolloutStatus, Selector, ServiceEnvelope, ServiceReport,
    ServiceSpec, ServiceState, capability,
};

use super::jobs::{org_of, sign_numbered, signing_key};
use super::placement::is_online;
use super::{ApiResult, AppState, Shared};
use crate::store::{DeploymentRecord, DesiredService, NodeServiceRecord, node_service_key};

/// Whether the node's agent runs services.
pub fn capable(node: &NodeInfo) -> bool {
    node.announce().has(capability::SERVICES)
}

/// Why the node's agent cannot run `spec`, if it cannot (version skew).
fn too_old_for(node: &NodeInfo, spec: &ServiceSpec) -> Option<&'static str> {
    let announce = node.announce();
    if !announce.has(capability::SERVICES) {
        Some("agent too old: it does not announce the `services` capability")
    } else if !spec.inputs.is_empty() && !announce.has(capability::SERVICE_INPUTS) {
        Some(
            "agent too old: the service names inputs and it does not announce the `service-inputs` capability",
        )
    } else {
        None
    }
}

fn selects(d: &DeploymentInfo, node: &NodeInfo) -> bool {
    node.org_id == d.org_id && Selector::parse(&d.selector).is_ok_and(|s| s.matches(&node.effective_labels()))
}

/// The deployments of `service` whose selector matches `node`, the one that wins first: the
/// highest priority, the newest on a tie.
fn ranked<'a>(
    deployments: &'a [DeploymentRecord],
    node: &NodeInfo,
    service: &str,
) -> Vec<&'a DeploymentRecord> {
    let mut found: Vec<&DeploymentRecord> =
        deployments.iter().filter(|d| d.info.service == service && selects(&d.info, node)).collect();
    found.sort_by_key(|d| std::cmp::Reverse((d.info.priority, d.info.created_unix_ms, d.info.name.clone())));
    found
}

/// The deployment of `service` that rolls out to `node`: the winner among those that match.
pub fn winner<'a>(
    deployments: &'a [DeploymentRecord],
    node: &NodeInfo,
    service: &str,
) -> Option<&'a DeploymentRecord> {
    ranked(deployments, node, service).into_iter().next()
}

/// What `node` runs of `service`: the winning deployment that has a revision for it (one whose
/// rollout has not reached the node yet leaves it on the next one down, never on nothing).
pub fn effective<'a>(
    deployments: &'a [DeploymentRecord],
    node: &NodeInfo,
    service: &str,
) -> Option<(&'a DeploymentRecord, u64, &'a outpost_protocol::ServiceSpec)> {
    ranked(deployments, node, service).into_iter().find_map(|d| {
        let revision = desired_revision(d, &node.node_id)?;
        d.spec_of(revision).map(|spec| (d, revision, spec))
    })
}

/// The revision a node governed by `d` is to run, if any.
pub fn desired_revision(d: &DeploymentRecord, node_id: &str) -> Option<u64> {
    match d.info.status {
        RolloutStatus::InProgress | RolloutStatus::Paused => {
            if d.info.updated.iter().any(|n| n == node_id) {
                Some(d.info.revision)
            } else {
                d.info.stable_revision
            }
        }
        RolloutStatus::Complete => Some(d.info.revision),
        RolloutStatus::RolledBack | RolloutStatus::Superseded => d.info.stable_revision,
    }
}

/// What a node's report says about revision `revision` of deployment `d`.
fn report_of<'a>(
    rec: Option<&'a NodeServiceRecord>,
    d: &DeploymentInfo,
    revision: u64,
) -> Option<&'a ServiceReport> {
    // A failure of that revision wins over later reports: after a rollback the node reports
    // about the revision it went back to.
    let of = |r: &&ServiceReport| r.deployment == d.name && r.revision == revision;
    let rec = rec?;
    rec.failure.as_ref().filter(of).or_else(|| rec.report.as_ref().filter(of))
}

/// One pass: rollouts first, then every node's desired state.
pub async fn pass(st: &AppState) -> ApiResult<()> {
    let now = st.clock.now_ms();
    let lease = st.lease_ms();
    let _exclusive = st.fleet_exclusive().await?;
    let nodes = st.fleet().await?;
    let mut deployments = st.store.list_deployments().await?;
    let records: HashMap<String, NodeServiceRecord> =
        st.store.list_node_services(None).await?.into_iter().map(|r| (r.key(), r)).collect();
    let snapshot = deployments.clone();
    for d in deployments.iter_mut() {
        if let Some(note) = advance(d, &snapshot, &nodes, &records, now, lease) {
            d.info.updated_unix_ms = now;
            st.store.put_deployment(d.clone()).await?;
            st.audit(
                "control",
                Some(&d.info.org_id),
                "deploy.rollout",
                &format!("deployment {} revision {}: {note}", d.info.name, d.info.revision),
            )
            .await;
        }
    }
    for node in nodes.iter().filter(|n| capable(n)) {
        let mut services: BTreeSet<String> = deployments
            .iter()
            .filter(|d| d.info.org_id == node.org_id)
            .map(|d| d.info.service.clone())
            .collect();
        services.extend(records.values().filter(|r| r.node_id == node.node_id).map(|r| r.service.clone()));
        for service in services {
            let rec = records.get(&node_service_key(&node.node_id, &service));
            converge(st, &deployments, node, &service, rec, now).await?;
        }
    }
    Ok(())
}

/// Signs a new desired state for the node when what it should run differs from what it was
/// last told.
async fn converge(
    st: &AppState,
    deployments: &[DeploymentRecord],
    node: &NodeInfo,
    service: &str,
    rec: Option<&NodeServiceRecord>,
    now: u64,
) -> ApiResult<()> {
    let want = effective(deployments, node, service)
        .map(|(d, revision, spec)| (d.info.name.clone(), revision, spec.clone()));
    let current = rec.and_then(|r| r.desired.as_ref());
    let (deployment, revision, spec) = match (&want, current) {
        (Some((dep, rev, _)), Some(c)) if !c.removal && c.deployment == *dep && c.revision == *rev => {
            return Ok(());
        }
        (None, None) => return Ok(()),
        (None, Some(c)) if c.removal => return Ok(()),
        (None, Some(c)) => (c.deployment.clone(), c.revision, None),
        (Some((dep, rev, spec)), _) => (dep.clone(), *rev, Some(spec.clone())),
    };
    if spec.as_ref().is_some_and(|s| too_old_for(node, s).is_some()) {
        // Never sent what it would refuse; `deploy status` says why.
        return Ok(());
    }
    let rollback =
        spec.is_some() && current.is_some_and(|c| c.deployment == deployment && revision < c.revision);
    let org = org_of(st, node).await?;
    let key = signing_key(&org, now)?;
    let body = ServiceEnvelope {
        org_id: org.org.id.clone(),
        node_id: node.node_id.clone(),
        service: service.to_owned(),
        deployment: deployment.clone(),
        revision,
        seq: 0,
        issued_unix_ms: now,
        rollback,
        spec: spec.clone(),
    };
    let make: crate::store::MakeDesired = Box::new(move |seq| {
        let body = ServiceEnvelope { seq, ..body };
        let envelope = sign_numbered(&key, &body)?;
        Ok(DesiredService {
            deployment: body.deployment,
            revision,
            removal: body.spec.is_none(),
            rollback,
            seq,
            envelope,
            since_unix_ms: now,
        })
    });
    {
        let _ordered = st.submit_lock.lock().await;
        st.store.offer_service(&node.node_id, service, make).await?;
    }
    let what = if spec.is_none() {
        "removal".to_owned()
    } else if rollback {
        format!("rollback to revision {revision}")
    } else {
        format!("revision {revision}")
    };
    st.audit(
        "control",
        Some(&node.org_id),
        "service.desired",
        &format!("node {} service {service}: {what} of deployment {deployment}", node.node_id),
    )
    .await;
    st.wakers.wake(&node.node_id);
    Ok(())
}

/// Moves a rollout on; returns what changed, if anything did.
fn advance(
    d: &mut DeploymentRecord,
    all: &[DeploymentRecord],
    nodes: &[NodeInfo],
    records: &HashMap<String, NodeServiceRecord>,
    now: u64,
    lease: u64,
) -> Option<String> {
    if d.info.status != RolloutStatus::InProgress {
        return None;
    }
    let revision = d.info.revision;
    let targets: Vec<&NodeInfo> = {
        let mut t: Vec<&NodeInfo> = nodes
            .iter()
            .filter(|n| {
                too_old_for(n, &d.info.spec).is_none()
                    && winner(all, n, &d.info.service).is_some_and(|w| w.key() == d.key())
            })
            .collect();
        t.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        t
    };
    let timeout_ms = d.info.rollout.health_timeout_secs.saturating_mul(1000);
    let mut failed = Vec::new();
    let mut waiting = 0;
    for node in targets.iter().filter(|n| d.info.updated.contains(&n.node_id)) {
        let rec = records.get(&node_service_key(&node.node_id, &d.info.service));
        match report_of(rec, &d.info, revision).map(|r| (r.state, r.message.clone())) {
            Some((ServiceState::Healthy, _)) => {}
            Some((ServiceState::Failed | ServiceState::Refused | ServiceState::RolledBack, why)) => {
                failed.push(format!("{}: {}", node.node_id, why.unwrap_or_else(|| "failed".into())));
            }
            _ if !is_online(node, now, lease) => {}
            _ => {
                let since = d.batch_started.get(&node.node_id).copied().unwrap_or(now);
                if now.saturating_sub(since) > timeout_ms {
                    failed.push(format!(
                        "{}: not healthy within {} s",
                        node.node_id, d.info.rollout.health_timeout_secs
                    ));
                } else {
                    waiting += 1;
                }
            }
        }
    }
    if !failed.is_empty() && failed.len() as u32 >= d.info.rollout.abort_on_failures {
        d.info.status = RolloutStatus::RolledBack;
        let to = d
            .info
            .stable_revision
            .map_or("nothing (no earlier revision completed)".to_owned(), |r| format!("revision {r}"));
        let reason = format!("{} node(s) failed: {}; rolled back to {to}", failed.len(), failed.join("; "));
        d.info.reason = Some(reason.clone());
        return Some(reason);
    }
    if waiting > 0 {
        return None;
    }
    let remaining: Vec<&&NodeInfo> =
        targets.iter().filter(|n| !d.info.updated.contains(&n.node_id)).collect();
    if remaining.is_empty() {
        d.info.status = RolloutStatus::Complete;
        d.info.stable_revision = Some(revision);
        if d.completed.last() != Some(&revision) {
            d.completed.push(revision);
        }
        d.info.reason = None;
        return Some(format!("complete on {} node(s)", targets.len()));
    }
    // Online nodes first, so an offline one does not hold a batch; it gets the revision when it
    // comes back.
    let mut next: Vec<&&NodeInfo> = remaining;
    next.sort_by_key(|n| (!is_online(n, now, lease), n.node_id.clone()));
    let cap = d.info.rollout.max_unavailable.map_or(usize::MAX, |m| m as usize);
    let size = d.info.rollout.batch.of(targets.len()).min(cap).max(1);
    let batch: Vec<String> = next.into_iter().take(size).map(|n| n.node_id.clone()).collect();
    for n in &batch {
        d.batch_started.insert(n.clone(), now);
    }
    d.info.updated.extend(batch.iter().cloned());
    Some(format!("next batch: {}", batch.join(", ")))
}

/// Every node the deployment's selector matches, with its phase and the reason for it.
pub fn node_table(
    d: &DeploymentRecord,
    all: &[DeploymentRecord],
    nodes: &[NodeInfo],
    records: &HashMap<String, NodeServiceRecord>,
    now: u64,
    lease: u64,
) -> Vec<outpost_protocol::DeploymentNode> {
    let mut out = Vec::new();
    let mut matching: Vec<&NodeInfo> = nodes.iter().filter(|n| selects(&d.info, n)).collect();
    matching.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    for node in matching {
        let rec = records.get(&node_service_key(&node.node_id, &d.info.service));
        let desired =
            rec.and_then(|r| r.desired.as_ref()).filter(|x| x.deployment == d.info.name && !x.removal);
        let report = rec.and_then(|r| r.report.clone());
        let (phase, reason) = if let Some(why) = too_old_for(node, &d.info.spec) {
            (NodePhase::AgentTooOld, Some(why.to_owned()))
        } else if let Some(w) = effective(all, node, &d.info.service)
            .map(|(w, _, _)| w)
            .or_else(|| winner(all, node, &d.info.service))
            .filter(|w| w.key() != d.key())
        {
            (
                NodePhase::Overridden,
                Some(format!("deployment {} (priority {}) wins", w.info.name, w.info.priority)),
            )
        } else if !is_online(node, now, lease) {
            // An air-gapped node is always offline: its results bundle's report says more.
            let last = desired.and_then(|x| report_of(rec, &d.info, x.revision)).map_or(String::new(), |r| {
                format!(
                    "; its last report: {} on revision {}",
                    outpost_protocol::wire_name(&r.state),
                    r.revision
                )
            });
            (
                NodePhase::Offline,
                Some(format!("silent past its lease; gets its desired state when it is back{last}")),
            )
        } else {
            match desired {
                None => (NodePhase::Pending, Some("waiting for its batch".to_owned())),
                Some(x) if rec.is_some_and(NodeServiceRecord::unacknowledged) => {
                    (NodePhase::Pending, Some(format!("revision {} sent, not acknowledged yet", x.revision)))
                }
                Some(x) => match report_of(rec, &d.info, x.revision).map(|r| (r.state, r.message.clone())) {
                    Some((ServiceState::Healthy, _)) => (NodePhase::Healthy, None),
                    Some((ServiceState::Failed | ServiceState::Refused, why)) => (NodePhase::Failed, why),
                    Some((ServiceState::RolledBack, why)) => (NodePhase::RolledBack, why),
                    Some((state, why)) => {
                        (NodePhase::Updating, why.or_else(|| Some(outpost_protocol::wire_name(&state))))
                    }
                    None => (NodePhase::Updating, None),
                },
            }
        };
        out.push(outpost_protocol::DeploymentNode {
            node_id: node.node_id.clone(),
            phase,
            desired_revision: desired.map(|x| x.revision),
            report,
            reason,
        });
    }
    out
}

/// Runs passes every `interval`, and at once when a report or a deployment change wakes it.
pub async fn run(st: Shared, interval: Duration) {
    loop {
        if let Err(e) = pass(&st).await {
            tracing::warn!(error = %e.body.message, "rollout pass failed; retrying");
        }
        tokio::select! {
            _ = st.shutdown.cancelled() => return,
            _ = st.fleet_changed.notified() => {}
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
