//! Everything a store holds, in one canonical order: what `outpost-control migrate-store`
//! copies from the embedded sled store into PostgreSQL, and compares afterwards.

use outpost_protocol::{
    AuditEntry, AuditRecord, CancelAttempt, NodeInfo, ResultReport, StoredEvent, Trigger,
};

use super::{ApiTokenRecord, DeploymentRecord, JobRecord, NodeServiceRecord, OrgRecord, TokenRecord};

/// Every record of a store, each list sorted by its key (see [`StoreDump::canonical`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoreDump {
    pub orgs: Vec<OrgRecord>,
    pub tokens: Vec<TokenRecord>,
    pub nodes: Vec<NodeInfo>,
    /// Node id → the last job sequence number handed out.
    pub seqs: Vec<(String, u64)>,
    pub jobs: Vec<JobRecord>,
    /// Every stored result report, by idempotency key (superseded attempts' too).
    pub results: Vec<ResultReport>,
    /// Node id → a stop request it has not answered.
    pub cancels: Vec<(String, CancelAttempt)>,
    pub deployments: Vec<DeploymentRecord>,
    pub node_services: Vec<NodeServiceRecord>,
    /// Node id → its last stored service report seq.
    pub service_report_last: Vec<(String, u64)>,
    /// Node id → one entry of its audit log.
    pub node_audit: Vec<(String, AuditRecord)>,
    pub events: Vec<StoredEvent>,
    /// The last global event cursor handed out.
    pub event_cursor: u64,
    pub triggers: Vec<Trigger>,
    pub audit: Vec<AuditEntry>,
    /// The last audit sequence number handed out.
    pub audit_seq: u64,
    pub api_tokens: Vec<ApiTokenRecord>,
}

impl StoreDump {
    /// Sorts every list by its key, so that two dumps of the same data are equal.
    pub fn canonical(mut self) -> Self {
        self.orgs.sort_by(|a, b| a.org.id.cmp(&b.org.id));
        self.tokens.sort_by(|a, b| a.token_sha256.cmp(&b.token_sha256));
        self.nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        self.seqs.sort();
        self.jobs.sort_by(|a, b| a.info.job_id.cmp(&b.info.job_id));
        self.results.sort_by(|a, b| a.idempotency_key.cmp(&b.idempotency_key));
        self.cancels.sort_by(|a, b| (&a.0, &a.1.job_id, a.1.attempt).cmp(&(&b.0, &b.1.job_id, b.1.attempt)));
        self.deployments.sort_by(|a, b| (&a.info.org_id, &a.info.name).cmp(&(&b.info.org_id, &b.info.name)));
        self.node_services.sort_by(|a, b| (&a.node_id, &a.service).cmp(&(&b.node_id, &b.service)));
        self.service_report_last.sort();
        self.node_audit.sort_by(|a, b| (&a.0, a.1.seq).cmp(&(&b.0, b.1.seq)));
        self.events.sort_by_key(|e| e.cursor);
        self.triggers.sort_by(|a, b| a.trigger_id.cmp(&b.trigger_id));
        self.audit.sort_by_key(|e| e.seq);
        self.api_tokens.sort_by(|a, b| a.info.id.cmp(&b.info.id));
        self
    }

    /// Whether the store holds nothing at all.
    pub fn is_empty(&self) -> bool {
        self.counts().iter().all(|(_, n)| *n == 0)
    }

    /// How many records of each kind, in a fixed order (what `migrate-store` prints).
    pub fn counts(&self) -> Vec<(&'static str, usize)> {
        vec![
            ("organisations", self.orgs.len()),
            ("enrollment tokens", self.tokens.len()),
            ("nodes", self.nodes.len()),
            ("job sequences", self.seqs.len()),
            ("jobs", self.jobs.len()),
            ("results", self.results.len()),
            ("pending cancels", self.cancels.len()),
            ("deployments", self.deployments.len()),
            ("node services", self.node_services.len()),
            ("service report marks", self.service_report_last.len()),
            ("node audit entries", self.node_audit.len()),
            ("relay events", self.events.len()),
            ("triggers", self.triggers.len()),
            ("audit entries", self.audit.len()),
            ("API tokens", self.api_tokens.len()),
        ]
    }

    /// Checks what a copy must keep: every node's audit log links from the genesis entry, and
    /// the control plane's audit trail and the event cursors have no gaps up to their counters.
    pub fn check_chains(&self) -> Result<(), String> {
        let mut by_node: std::collections::BTreeMap<&str, Vec<AuditRecord>> = Default::default();
        for (node, entry) in &self.node_audit {
            by_node.entry(node).or_default().push(entry.clone());
        }
        for (node, entries) in by_node {
            outpost_protocol::check_audit_chain(0, outpost_protocol::AUDIT_GENESIS, &entries)
                .map_err(|why| format!("node {node}'s audit log: {why}"))?;
        }
        for (i, entry) in self.audit.iter().enumerate() {
            if entry.seq != i as u64 + 1 {
                return Err(format!("the audit trail skips from {} to {}", i, entry.seq));
            }
        }
        if self.audit_seq < self.audit.len() as u64 {
            return Err(format!(
                "audit counter {} is behind its {} entries",
                self.audit_seq,
                self.audit.len()
            ));
        }
        if let Some(last) = self.events.last()
            && last.cursor > self.event_cursor
        {
            return Err(format!("event cursor {} is behind event {}", self.event_cursor, last.cursor));
        }
        Ok(())
    }
}

/// What [`copy_to_postgres`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Copied {
    /// Everything was copied and read back equal.
    Now(Vec<(&'static str, usize)>),
    /// The target held exactly this data already (a repeated run).
    Already(Vec<(&'static str, usize)>),
}

/// Copies every record of an embedded store into an empty PostgreSQL store, then reads the
/// target back and compares it with the source, record for record, and checks the audit
/// chains. A target that holds other data is refused; one that holds the same data is left as
/// it is (the copy is safe to repeat).
pub async fn copy_to_postgres(
    from: &super::SledStore,
    to: &super::PgStore,
) -> Result<Copied, super::StoreError> {
    use super::StoreError;
    let source = from.dump()?;
    source.check_chains().map_err(|why| {
        StoreError::Backend(format!("the source store is inconsistent ({why}); nothing copied"))
    })?;
    let target = to.dump().await?;
    if !target.is_empty() {
        if target == source {
            return Ok(Copied::Already(source.counts()));
        }
        let held: usize = target.counts().iter().map(|(_, n)| n).sum();
        return Err(StoreError::AlreadyExists(format!(
            "{held} other records in the target database (not a copy of this source); refusing to mix them"
        )));
    }
    to.import(&source).await?;
    let after = to.dump().await?;
    if after != source {
        let differs: Vec<&str> = source
            .counts()
            .iter()
            .zip(after.counts())
            .filter(|(a, b)| a.1 != b.1)
            .map(|(a, _)| a.0)
            .collect();
        return Err(StoreError::Backend(format!(
            "the copy does not read back equal to the source (differs in: {}); the target holds the copy, drop it before trying again",
            if differs.is_empty() { "record contents".to_owned() } else { differs.join(", ") }
        )));
    }
    after.check_chains().map_err(|why| StoreError::Backend(format!("the copy is inconsistent: {why}")))?;
    Ok(Copied::Now(source.counts()))
}
