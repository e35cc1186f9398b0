//! Services: long-running containers the control plane describes and the node keeps running.
//! The signed desired state of each service lives in the [`book`]; the [`reconcile`] loop
//! converges the engine to it, online or offline, after any crash; [`receive`] is the one way
//! a desired state enters the book, and it never lets one in that this node's own
//! configuration forbids, that is older than what runs (unless the control plane signed a
//! rollback), or that was seen before.

pub mod book;
pub mod health;
pub mod reconcile;

use outpost_protocol::{ServiceEnvelope, ServiceState, SignedEnvelope};

use self::book::{Desired, Draft, ServiceBook, ServiceRecord};
use crate::config::Config;
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
    env: &SignedEnvelope,
    now_ms: u64,
) -> Result<Received, StoreError> {
    let svc = match verifier.verify_service(env) {
        Ok(svc) => svc,
        Err(rejection) => {
            // Unverified, so only used to say which service it claimed to be.
            let claimed: Option<ServiceEnvelope> = serde_json::from_str(&env.payload).ok();
            let why = rejection.to_string();
            let detail = format!(
                "service desired state refused ({}): {why}",
                claimed.as_ref().map_or("unreadable", |c| c.service.as_str())
            );
            tracing::warn!("{detail}");
            ledger.audit("service.refused", &detail)?;
            if let Some(c) = claimed.filter(|c| outpost_protocol::check_service_name(&c.service).is_ok()) {
                let mut rec = book.get(&c.service)?.unwrap_or_else(|| empty(&c.service));
                rec.ack_seq = Some(c.seq);
                book.put(&rec)?;
                refused_report(book, &c, &why, now_ms)?;
            }
            return Ok(Received::Refused(why));
        }
    };
    let mut rec = book.get(&svc.service)?.unwrap_or_else(|| empty(&svc.service));
    if svc.seq <= rec.last_seq {
        rec.ack_seq = Some(svc.seq);
        book.put(&rec)?;
        return Ok(Received::Duplicate);
    }
    rec.last_seq = svc.seq;
    rec.ack_seq = Some(svc.seq);
    if let Some(why) = refusal(&rec, &svc, cfg) {
        book.put(&rec)?;
        let detail = format!("service {} revision {}: {why}", svc.service, svc.revision);
        tracing::warn!("refused: {detail}");
        ledger.audit("service.refused", &detail)?;
        refused_report(book, &svc, &why, now_ms)?;
        return Ok(Received::Refused(why));
    }
    let what = match &svc.spec {
        Some(spec) => {
            format!("revision {} of deployment {} (image {})", svc.revision, svc.deployment, spec.image)
        }
        None => format!("removal (deployment {})", svc.deployment),
    };
    let rollback = if svc.rollback { ", a rollback" } else { "" };
    ledger.audit("service.desired", &format!("service {}: {what}{rollback}", svc.service))?;
    rec.desired = Some(Desired { envelope: env.clone(), body: svc });
    rec.rolled_back_from = None;
    book.put(&rec)?;
    Ok(Received::Accepted)
}

fn empty(service: &str) -> ServiceRecord {
    ServiceRecord {
        service: service.to_owned(),
        desired: None,
        last_seq: 0,
        ack_seq: None,
        last_healthy: None,
        rolled_back_from: None,
    }
}

/// Why this node will not take `svc`, if it will not.
fn refusal(rec: &ServiceRecord, svc: &ServiceEnvelope, cfg: &Config) -> Option<String> {
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
    for p in &spec.publish {
        if !cfg.services.allows(&p.host_ip, p.host_port) {
            return Some(format!(
                "publishing {}:{} is outside this node's services.publish_allow ({}); the site decides which \
                 host ports services may use",
                p.host_ip,
                p.host_port,
                if cfg.services.publish_allow.is_empty() {
                    "empty".to_owned()
                } else {
                    cfg.services.publish_allow.join(", ")
                }
            ));
        }
    }
    None
}

fn refused_report(
    book: &ServiceBook,
    svc: &ServiceEnvelope,
    why: &str,
    now_ms: u64,
) -> Result<(), StoreError> {
    book.report(
        Draft {
            service: svc.service.clone(),
            deployment: svc.deployment.clone(),
            revision: svc.revision,
            state: ServiceState::Refused,
            restarts: 0,
            last_exit: None,
            health_output: String::new(),
            message: Some(why.to_owned()),
        },
        now_ms,
    )
    .map(|_| ())
}
