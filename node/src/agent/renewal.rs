//! Renews the node's client certificate two thirds into its life, over mutual TLS with the
//! current one ([`crate::identity::Identity::renew`]): a new key pair each time, stored before
//! it is used, the uplink switched to it. Failures retry with a backoff (30 s up to an hour); a
//! control plane too old to renew is asked again every six hours, and the certificate it issued
//! (a year) lasts meanwhile.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Agent;
use super::poller::sleep_or_cancel;
use crate::backoff::Backoff;
use crate::clock::now_unix_ms;
use crate::identity::validity;
use crate::runtime::Runtime;

/// Never sleep longer than this before looking again (a clock set forward, a renewal by hand).
const MAX_SLEEP: Duration = Duration::from_secs(6 * 3600);

impl<R: Runtime> Agent<R> {
    pub(super) async fn renewal(self: Arc<Self>, shutdown: CancellationToken) {
        let dir = self.cfg.identity_dir();
        let mut identity = self.identity.clone();
        let mut backoff = Backoff::new(Duration::from_secs(30), Duration::from_secs(3600));
        // Set when the agent learns of a CA rotation: renew now, from the new CA.
        let mut forced = false;
        while !shutdown.is_cancelled() {
            let (not_before, not_after) = match validity(&identity.cert_pem) {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read this node's certificate; it is not renewed");
                    return;
                }
            };
            let due = outpost_protocol::renew_at(not_before, not_after);
            let now = i64::try_from(now_unix_ms() / 1000).unwrap_or(i64::MAX);
            // A CA rotation whose new CA has not issued this node's certificate yet: renew now
            // (asked by the trust follower, or found here at a start after a crash).
            let owed = crate::rotation::renewal_owed(&dir, &identity.cert_pem).is_some();
            let force_now = std::mem::take(&mut forced) || owed;
            if due > now && !force_now {
                let wait = Duration::from_secs(due.saturating_sub(now).unsigned_abs()).min(MAX_SLEEP);
                tracing::debug!(in_secs = wait.as_secs(), "certificate renewal not due yet");
                tokio::select! {
                    () = sleep_or_cancel(&shutdown, wait) => {}
                    () = self.renew_now.notified() => forced = true,
                }
                continue;
            }
            let renewed = {
                let _identity = self.identity_lock.lock().await;
                identity.renew(&dir, &self.uplink).await
            };
            match renewed {
                Ok(()) => {
                    backoff.reset();
                    let until = validity(&identity.cert_pem).map(|(_, end)| end).unwrap_or_default();
                    tracing::info!(
                        valid_until_unix = until,
                        "renewed this node's certificate (new key pair)"
                    );
                    let detail =
                        format!("client certificate renewed with a new key, valid until {until} (Unix s)");
                    if let Err(e) = self.ledger.audit("identity.renewed", &detail) {
                        tracing::error!(error = %e, "cannot write the audit log");
                    }
                }
                Err(e) => {
                    let older =
                        matches!(&e, crate::identity::IdentityError::RenewRefused(u) if u.is_unknown_route());
                    let delay = if older { MAX_SLEEP } else { backoff.next_delay() };
                    // A renewal the CA rotation asked for is asked for again after the delay.
                    forced = force_now && !older;
                    tracing::warn!(
                        error = %e,
                        retry_in = ?delay,
                        expires_in_secs = not_after.saturating_sub(now),
                        "certificate renewal failed; the current certificate is used meanwhile"
                    );
                    sleep_or_cancel(&shutdown, delay).await;
                }
            }
        }
    }
}
