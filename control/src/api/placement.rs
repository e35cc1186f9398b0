//! Placement of jobs by label selector, and the sweep that keeps `any` jobs alive (site HA): a
//! job whose node's lease expired before it reported is offered to another matching node that
//! is online, as a new attempt. The sweep never runs a job twice by itself: the old attempt is
//! fenced by its number (a late result is kept as superseded) and its node is asked to stop it.

use std::collections::HashMap;
use std::time::Duration;

use outpost_protocol::{JobState, NodeInfo, Selector};

use super::jobs::reoffer_job;
use super::{ApiResult, AppState, Shared};
use crate::store::JobRecord;

/// Whether a node's last heartbeat is within the lease.
pub fn is_online(node: &NodeInfo, now_ms: u64, lease_ms: u64) -> bool {
    node.last_seen_unix_ms.is_some_and(|seen| now_ms.saturating_sub(seen) <= lease_ms)
}

/// A node as operators see it: effective labels and whether it is online filled in (its
/// stored last-seen time is shown as stored).
pub fn present(st: &AppState, mut node: NodeInfo) -> NodeInfo {
    node.labels = node.effective_labels();
    let seen = st.seen_ms(&node);
    node.online = seen.is_some_and(|seen| st.clock.now_ms().saturating_sub(seen) <= st.lease_ms());
    node
}

/// The enrolled nodes of `org_id` whose effective labels `selector` matches, by node id.
pub async fn matching_nodes(st: &AppState, org_id: &str, selector: &Selector) -> ApiResult<Vec<NodeInfo>> {
    let mut nodes: Vec<NodeInfo> = st
        .fleet()
        .await?
        .into_iter()
        .filter(|n| n.org_id == org_id && selector.matches(&n.effective_labels()))
        .collect();
    nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    Ok(nodes)
}

/// Per node, the `any` jobs queued on it that it has not taken yet: load its last heartbeat
/// cannot show.
pub async fn open_loads(st: &AppState) -> ApiResult<HashMap<String, u32>> {
    let mut loads = HashMap::new();
    for job in st.store.open_any_jobs().await? {
        if job.info.state == JobState::Queued {
            *loads.entry(job.info.node_id).or_insert(0u32) += 1;
        }
    }
    Ok(loads)
}

/// The online candidate with the least load (running jobs by its last heartbeat plus `any`
/// jobs queued on it), other than those in `except`. Agents that can be told to stop a
/// superseded attempt come first; ties go to the node seen most recently, then by id.
pub fn choose<'a>(
    candidates: &'a [NodeInfo],
    loads: &HashMap<String, u32>,
    now_ms: u64,
    lease_ms: u64,
    except: &[&str],
) -> Option<&'a NodeInfo> {
    candidates
        .iter()
        .filter(|n| is_online(n, now_ms, lease_ms) && !except.contains(&n.node_id.as_str()))
        .min_by_key(|n| {
            let running = n.last_heartbeat.as_ref().map_or(0, |h| h.running_jobs);
            let queued = loads.get(&n.node_id).copied().unwrap_or(0);
            let cannot_cancel = !n.announce().has(outpost_protocol::capability::CANCEL);
            (
                cannot_cancel,
                running.saturating_add(queued),
                std::cmp::Reverse(n.last_seen_unix_ms),
                n.node_id.clone(),
            )
        })
}

/// With no candidate online: the one seen last (the job waits for it, and moves when another
/// comes online).
pub fn most_recently_seen(candidates: &[NodeInfo]) -> Option<&NodeInfo> {
    candidates.iter().max_by_key(|n| (n.last_seen_unix_ms, std::cmp::Reverse(n.node_id.clone())))
}

/// One pass over the open `any` jobs; returns how many were re-placed.
pub async fn sweep(st: &AppState) -> ApiResult<usize> {
    let open = st.store.open_any_jobs().await?;
    if open.is_empty() {
        return Ok(0);
    }
    let (now, lease) = (st.clock.now_ms(), st.lease_ms());
    let nodes: HashMap<String, NodeInfo> =
        st.fleet().await?.into_iter().map(|n| (n.node_id.clone(), n)).collect();
    let mut loads = open_loads(st).await?;
    let mut moved = 0;
    for job in open {
        let holder = nodes.get(&job.info.node_id);
        if holder.is_some_and(|n| is_online(n, now, lease)) {
            continue;
        }
        let Some(target) = next_node(&job, nodes.values(), &loads, now, lease) else {
            continue;
        };
        let silent =
            holder.and_then(|n| n.last_seen_unix_ms).map_or("never heartbeated".to_owned(), |seen| {
                format!("silent for {} s", now.saturating_sub(seen) / 1000)
            });
        let reason = format!("node {} {silent} (lease {} s)", job.info.node_id, lease / 1000);
        if move_job(st, &job, &target, &reason).await? {
            moved += 1;
            *loads.entry(target.node_id.clone()).or_insert(0) += 1;
        }
    }
    Ok(moved)
}

/// Where an open `any` job may go next: the least loaded online node its selector matches
/// (of those that can seal it, for a sealed job) that has not held an attempt of it. Not back
/// to such a node: its acknowledgements name the job, not the attempt, so a late one could
/// claim the new attempt.
fn next_node<'a>(
    job: &JobRecord,
    nodes: impl Iterator<Item = &'a NodeInfo>,
    loads: &HashMap<String, u32>,
    now: u64,
    lease: u64,
) -> Option<NodeInfo> {
    let Some(selector) = job.info.selector.as_deref().and_then(|s| Selector::parse(s).ok()) else {
        tracing::warn!(job = %job.info.job_id, "an `any` job without a usable selector cannot be re-placed");
        return None;
    };
    let candidates: Vec<NodeInfo> = nodes
        .filter(|n| n.org_id == job.info.org_id && selector.matches(&n.effective_labels()))
        .cloned()
        .collect();
    let sealed = serde_json::from_str::<outpost_protocol::JobEnvelope>(&job.envelope.payload)
        .is_ok_and(|e| !e.recipients.is_empty());
    let mut candidates = super::jobs::sealing_nodes(candidates, sealed);
    candidates.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    let mut except: Vec<&str> = job.info.superseded.iter().map(|a| a.node_id.as_str()).collect();
    except.push(&job.info.node_id);
    choose(&candidates, loads, now, lease, &except).cloned()
}

/// Offers `job` to `target` as its next attempt and audits the move; false when the job
/// moved on meanwhile.
async fn move_job(st: &AppState, job: &JobRecord, target: &NodeInfo, reason: &str) -> ApiResult<bool> {
    if !reoffer_job(st, job, target, reason).await? {
        return Ok(false);
    }
    let detail = format!(
        "job {} attempt {} moved from node {} to node {} as attempt {}: {reason}",
        job.info.job_id,
        job.info.attempt,
        job.info.node_id,
        target.node_id,
        job.info.attempt.saturating_add(1)
    );
    st.audit("control", Some(&job.info.org_id), "job.replaced", &detail).await;
    Ok(true)
}

/// An `any` job that its node's site policy refused goes to another matching node, as a new
/// attempt, before the refusal is stored (it is then kept as the superseded attempt's late
/// result). True when it moved; with no other node to go to, the refusal is the job's result.
pub async fn place_elsewhere_after_refusal(
    st: &AppState,
    node_id: &str,
    report: &outpost_protocol::ResultReport,
) -> ApiResult<bool> {
    if report.outcome != outpost_protocol::Outcome::Refused {
        return Ok(false);
    }
    let Some(job) = st.store.get_job(&report.job_id).await? else { return Ok(false) };
    let open = matches!(job.info.state, JobState::Queued | JobState::Accepted);
    if job.info.placement != Some(outpost_protocol::Placement::Any)
        || !open
        || job.info.attempt != report.attempt
        || job.info.node_id != node_id
        || job.info.cancel_requested_unix_ms.is_some()
    {
        return Ok(false);
    }
    let (now, lease) = (st.clock.now_ms(), st.lease_ms());
    let nodes = st.fleet().await?;
    let loads = open_loads(st).await?;
    let Some(target) = next_node(&job, nodes.iter(), &loads, now, lease) else { return Ok(false) };
    let why = report.error.as_deref().unwrap_or("refused by the site policy");
    let reason = format!("node {node_id} refused it: {why}");
    move_job(st, &job, &target, &reason).await
}

/// Sweeps every `interval` until shutdown. A failing pass is logged and retried next time.
pub async fn run(st: Shared, interval: Duration) {
    loop {
        tokio::select! {
            _ = st.shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        if let Err(e) = sweep(&st).await {
            tracing::warn!(error = %e.body.message, "placement sweep failed; retrying");
        }
    }
}
