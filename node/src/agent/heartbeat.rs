//! Sends a heartbeat with the node's inventory every `heartbeat_secs`. A failed heartbeat is
//! only logged: the next one carries fresher data anyway.

use std::sync::Arc;
use std::time::Duration;

use outpost_protocol::Heartbeat;
use tokio_util::sync::CancellationToken;

use super::Agent;
use crate::inventory;
use crate::runtime::Runtime;

/// Settled (reported, acknowledged) jobs kept in the ledger for `outpost status` and debugging;
/// older ones are pruned so the ledger stays bounded.
const SETTLED_KEEP: usize = 1000;

impl<R: Runtime> Agent<R> {
    pub(super) async fn heartbeat(self: Arc<Self>, shutdown: CancellationToken) {
        let every = Duration::from_secs(self.cfg.agent.heartbeat_secs);
        loop {
            let runtime = self.runtime.info().await.ok();
            let depths = self.ledger.depths().unwrap_or_default();
            let hb = Heartbeat {
                agent_version: env!("CARGO_PKG_VERSION").into(),
                inventory: inventory::collect(runtime.as_ref()),
                running_jobs: depths.running as u32,
                outbox_depth: depths.outbox,
                relay: self.relay.as_ref().and_then(|r| r.metrics().ok()).map(Into::into),
                // A handful of small manifest files: cheap enough to read every time.
                models: crate::models::ModelStore::new(self.cfg.models_dir()).summaries(),
            };
            tokio::select! {
                r = self.uplink.heartbeat(&hb) => match r {
                    Ok(()) => self.shared.contact_ok(),
                    Err(e) => {
                        self.shared.contact_failed(&e);
                        tracing::debug!(error = %e, "heartbeat not delivered");
                    }
                },
                _ = shutdown.cancelled() => return,
            }
            match self.ledger.prune_settled(SETTLED_KEEP) {
                Ok(0) => {}
                Ok(n) => tracing::debug!(removed = n, "pruned settled jobs from the ledger"),
                Err(e) => tracing::warn!(error = %e, "cannot prune the ledger"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}
