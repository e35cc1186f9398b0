//! Follows the control plane's trust document ([`crate::rotation`]): when a poll answer carries
//! a tag other than the one taken last, the agent fetches the document, takes what it can verify
//! (new signing keys endorsed by one it trusts, a new CA signed by one it trusts), drops what is
//! no longer listed, stores it, and switches the verifier and the uplink to it. During a CA
//! rotation it renews its certificate at once, so the one it holds at the switch is of the new CA.

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
        let dir = self.cfg.identity_dir();
        let ca_path = dir.join("ca.crt");
        let outcome = std::fs::read_to_string(&ca_path)
            .map_err(|e| format!("{}: {e}", ca_path.display()))
            .and_then(|ca_pem| {
                crate::rotation::apply(&self.identity.node.org_id, &self.verifier.keys(), &ca_pem, &doc)
            })
            .and_then(|applied| {
                crate::rotation::store(&dir, &applied, &doc.tag, now_unix_ms())?;
                self.verifier.set_keys(&applied.org_keys)?;
                Ok(applied)
            });
        let applied = match outcome {
            Ok(applied) => applied,
            Err(e) => {
                // Refused once per document: the next change of tag tries again.
                tracing::error!(error = %e, "refused the control plane's trust document; this node keeps what it trusts");
                self.audit("trust.refused", &e);
                self.set_trust_tag(&doc.tag);
                return;
            }
        };
        if applied.ca_pem.is_some() {
            match crate::identity::Identity::load(&dir)
                .map_err(|e| e.to_string())
                .and_then(|id| {
                    crate::tls::node_client_config(&id.ca_pem, &id.cert_pem, &id.key_pem)
                        .map_err(|e| e.to_string())
                })
                .and_then(|tls| self.uplink.set_tls(tls).map_err(|e| e.to_string()))
            {
                Ok(()) => {}
                Err(e) => {
                    tracing::error!(error = %e, "cannot switch the uplink to the new CAs; it does at the next start")
                }
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
            && let Some(rotation) = &doc.ca_rotation
            && !crate::rotation::issued_by(&self.current_cert(&dir), &rotation.new_ca_pem)
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

    fn current_cert(&self, dir: &std::path::Path) -> String {
        std::fs::read_to_string(dir.join("node.crt")).unwrap_or_default()
    }

    fn audit(&self, action: &str, detail: &str) {
        if let Err(e) = self.ledger.audit(action, detail) {
            tracing::error!(error = %e, "cannot write the audit log");
        }
    }
}
