//! Follows the control plane's trust document ([`crate::rotation`]): when a poll answer carries
//! a tag other than the one taken last, the agent fetches the document, takes what it can verify
//! (new signing keys endorsed by one it trusts, a new CA signed by one it trusts), drops what is
//! no longer listed, stores it, and switches the verifier and the uplink to it. During a CA
//! rotation the renewal task renews at once (and at every start until it has), so the
//! certificate the node holds at the switch is one of the new CA.
//!
//! The identity files and the uplink's TLS configuration change under `identity_lock`, held
//! by this and by the renewal task, so neither undoes the other's change. A document the node
//! refuses is not asked for again until its tag changes; a local failure (a disk, a file) is
//! retried at the next poll.

use super::Agent;
use crate::clock::now_unix_ms;
use crate::runtime::Runtime;

impl<R: Runtime> Agent<R> {
    /// Takes the trust document tagged `tag` unless it is the one taken (or refused) last.
    pub(super) async fn follow_trust(&self, tag: &str) {
        if self.trust_tag.lock().is_ok_and(|held| held.as_deref() == Some(tag)) {
            return;
        }
        let doc = match self.uplink.trust().await {
            Ok(doc) => doc,
            Err(e) => {
                tracing::warn!(error = %e, "cannot fetch this node's trust from the control plane; the next poll tries again");
                return;
            }
        };
        let _identity = self.identity_lock.lock().await;
        let dir = self.cfg.identity_dir();
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))
        };
        let ca_pem = match read("ca.crt") {
            Ok(pem) => pem,
            Err(e) => {
                return tracing::error!(error = %e, "cannot read the pinned CAs; the next poll tries again");
            }
        };
        let applied = match crate::rotation::apply(
            &self.identity.node.org_id,
            &self.verifier.keys(),
            &ca_pem,
            &doc,
        ) {
            Ok(applied) => applied,
            Err(e) => {
                // Refused once per document: the next change of tag tries again.
                tracing::error!(error = %e, "refused the control plane's trust document; this node keeps what it trusts");
                self.audit("trust.refused", &e);
                self.set_trust_tag(&doc.tag);
                return;
            }
        };
        if let Err(e) = crate::rotation::store(&dir, &applied, &doc.tag, now_unix_ms()) {
            return tracing::error!(error = %e, "cannot store what this node trusts; the next poll tries again");
        }
        if let Err(e) = self.verifier.set_keys(&applied.org_keys) {
            return tracing::error!(error = %e, "cannot use the org's signing keys; the next poll tries again");
        }
        if let Some(ca_pem) = &applied.ca_pem {
            let switched = read("node.crt").and_then(|cert| {
                let key = read("node.key")?;
                let tls = crate::tls::node_client_config(ca_pem, &cert, &key).map_err(|e| e.to_string())?;
                self.uplink.set_tls(tls).map_err(|e| e.to_string())
            });
            if let Err(e) = switched {
                return tracing::error!(error = %e, "cannot switch the uplink to the new CAs; the next poll tries again");
            }
        }
        if applied.changed() {
            let detail = format!(
                "signing keys now {} (added {:?}, dropped {:?}); CAs added {:?}, dropped {:?}",
                applied.org_keys.iter().map(|k| k.key_id.as_str()).collect::<Vec<_>>().join(", "),
                applied.keys_added,
                applied.keys_dropped,
                applied.cas_added,
                applied.cas_dropped
            );
            tracing::info!(%detail, "took the control plane's trust rotation");
            self.audit("trust.rotated", &detail);
        }
        if let Some((new_ca, switch)) = &applied.ca_rotation
            && crate::rotation::renewal_owed(&dir, &read("node.crt").unwrap_or_default()).is_some()
        {
            tracing::info!(new_ca = %new_ca, switch_unix_ms = switch, "the control plane rotates its CA: renewing this node's certificate now");
            self.renew_now.notify_one();
        }
        self.set_trust_tag(&doc.tag);
    }

    fn set_trust_tag(&self, tag: &str) {
        if let Ok(mut held) = self.trust_tag.lock() {
            *held = Some(tag.to_owned());
        }
    }

    fn audit(&self, action: &str, detail: &str) {
        if let Err(e) = self.ledger.audit(action, detail) {
            tracing::error!(error = %e, "cannot write the audit log");
        }
    }
}
