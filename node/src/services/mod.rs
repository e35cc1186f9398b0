//! Services: long-running containers the control plane describes and the node keeps running.
//! The signed desired state of each service lives in the [`book`]; the [`reconcile`] loop
//! converges the engine to it, online or offline, after any crash; [`receive`] is the one way
//! a desired state enters the book, and it never lets one in that this node's own
//! configuration forbids, that is older than what runs (unless the control plane signed a
//! rollback), or that was seen before.

pub mod book;
pub mod health;
pub mod inputs;
pub mod reconcile;

use outpost_protocol::{ServiceEnvelope, ServiceState, SignedEnvelope};

use self::book::{Desired, Draft, ServiceBook, ServiceRecord};
use crate::config::{Config, ServicesConfig};
use crate::ledger::Ledger;
use crate::store::StoreError;
use crate::verify::ManifestVerifier;

/// What became of a received desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// Persisted; the reconciler converges to it.
    Accepted,
    /// Seen before (or older by seq): acknowledged again, nothing changed.
    Duplicate,
    /// Refused, reported and audited; what ran before keeps running.
    Refused(String),
}

/// Verifies and persists one signed desired state, and marks it for acknowledgement.
pub fn receive(
    book: &ServiceBook,
    ledger: &Ledger,
    verifier: &ManifestVerifier,
    cfg: &Config,
    policy: &crate::policy::Policy,
    env: &SignedEnvelope,
    now_ms: u64,
) -> Result<Received, StoreError> {
    let svc = match verifier.verify_service(env) {
        Ok(svc) => svc,
        Err(rejection) => {
            // Unverified, so only used to say which service it claimed to be, and to acknowledge
            // it (else the control plane would offer it for ever).
            let claimed: Option<ServiceEnvelope> = serde_json::from_str(&env.payload).ok();
            let why = rejection.to_string();
            let detail = format!(
                "service desired state refused ({}): {why}",
                claimed.as_ref().map_or("unreadable", |c| c.service.as_str())
            );
            tracing::warn!("{detail}");
            ledger.audit("service.refused", &detail)?;
            if let Some(c) = claimed.filter(|c| outpost_protocol::check_service_name(&c.service).is_ok()) {
                book.update(
                    &c.service,
                    |rec| {
                        rec.ack_seq = Some(c.seq);
                        true
                    },
                    Some((refused_draft(&c, &why), now_ms)),
                )?;
            }
            return Ok(Received::Refused(why));
        }
    };
    let mut outcome = Received::Accepted;
    let mut report = None;
    let mut audit = None;
    book.update(
        &svc.service,
        |rec| {
            rec.ack_seq = Some(svc.seq);
            if svc.seq <= rec.last_seq {
                outcome = Received::Duplicate;
                return true;
            }
            rec.last_seq = svc.seq;
            if let Some(why) = refusal(rec, &svc, cfg, policy) {
                audit = Some((
                    "service.refused",
                    format!("service {} revision {}: {why}", svc.service, svc.revision),
                ));
                report = Some(refused_draft(&svc, &why));
                outcome = Received::Refused(why);
                return true;
            }
            let what = match &svc.spec {
                Some(spec) => format!(
                    "revision {} of deployment {} (image {})",
                    svc.revision, svc.deployment, spec.image
                ),
                None => format!("removal (deployment {})", svc.deployment),
            };
            let rollback = if svc.rollback { ", a rollback" } else { "" };
            audit = Some(("service.desired", format!("service {}: {what}{rollback}", svc.service)));
            rec.desired = Some(Desired { envelope: env.clone(), body: svc.clone() });
            rec.rolled_back_from = None;
            true
        },
        None,
    )?;
    if let Some(draft) = report {
        book.report(draft, now_ms)?;
    }
    if let Some((action, detail)) = audit {
        if action == "service.refused" {
            tracing::warn!("refused: {detail}");
        }
        ledger.audit(action, &detail)?;
    }
    Ok(outcome)
}

/// Why this node will not take `svc`, if it will not.
fn refusal(
    rec: &ServiceRecord,
    svc: &ServiceEnvelope,
    cfg: &Config,
    policy: &crate::policy::Policy,
) -> Option<String> {
    if let Some(current) = &rec.desired
        && current.body.deployment == svc.deployment
        && svc.revision < current.body.revision
        && !svc.rollback
    {
        return Some(format!(
            "revision {} is older than revision {} that this node runs: a replay; only a rollback the control \
             plane signs may go back",
            svc.revision, current.body.revision
        ));
    }
    let spec = svc.spec.as_ref()?;
    publish_refusal(spec, &cfg.services)
        .or_else(|| policy_refusal(spec, &svc.deployment, &svc.org_id, policy))
}

/// Why the site policy refuses a service revision, if it does: its submitter is its
/// deployment, in the organisation that signed it.
pub fn policy_refusal(
    spec: &outpost_protocol::ServiceSpec,
    deployment: &str,
    org_id: &str,
    policy: &crate::policy::Policy,
) -> Option<String> {
    let by = outpost_protocol::Submitter {
        deployment: Some(deployment.to_owned()),
        ..outpost_protocol::Submitter::in_org(org_id)
    };
    match policy.evaluate(&crate::policy::Work::service(spec, Some(by)), true) {
        crate::policy::Decision::Refuse(r) => Some(r.to_string()),
        _ => None,
    }
}

/// Why the node's own `[services] publish_allow` forbids `spec`, if it does. Checked when a
/// desired state arrives and again before every container is made (the site may have narrowed
/// it since).
pub fn publish_refusal(spec: &outpost_protocol::ServiceSpec, allow: &ServicesConfig) -> Option<String> {
    let p = spec.publish.iter().find(|p| !allow.allows(&p.host_ip, p.host_port))?;
    Some(format!(
        "publishing {}:{} is outside this node's services.publish_allow ({}); the site decides which host \
         ports services may use",
        p.host_ip,
        p.host_port,
        if allow.publish_allow.is_empty() { "empty".to_owned() } else { allow.publish_allow.join(", ") }
    ))
}

fn refused_draft(svc: &ServiceEnvelope, why: &str) -> Draft {
    Draft {
        service: svc.service.clone(),
        deployment: svc.deployment.clone(),
        revision: svc.revision,
        state: ServiceState::Refused,
        restarts: 0,
        last_exit: None,
        health_output: String::new(),
        message: Some(why.to_owned()),
    }
}
