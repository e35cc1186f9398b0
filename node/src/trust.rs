//! The trust window: a node that has not heard from its control plane (over the network or in a
//! bundle) for longer than `[trust] max_offline` accepts no bundle signed before the window, and
//! says so in `outpost status`: a stolen signing key, or a bundle that waited on a shelf, cannot
//! start work on a node nobody has spoken to for months. Hearing from the control plane again (a
//! fresh bundle, a connection) restores it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::store::{Op, StateStore, StoreError, Tree};

/// Key of the time the node last heard from its control plane, in the ledger's `meta` tree.
const LAST_HEARD: &[u8] = b"trust.last_heard";

/// Where the node stands, for `outpost status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustState {
    pub last_heard_unix_ms: u64,
    /// None: no window configured.
    pub window_secs: Option<u64>,
    pub expired: bool,
}

/// When the node last heard from its control plane (`enrolled_unix_ms` before anything else).
pub fn last_heard(store: &dyn StateStore, enrolled_unix_ms: u64) -> Result<u64, StoreError> {
    Ok(match store.get(Tree::Meta, LAST_HEARD)? {
        Some(b) if b.len() == 8 => u64::from_be_bytes(b.try_into().unwrap_or_default()).max(enrolled_unix_ms),
        _ => enrolled_unix_ms,
    })
}

/// Records having heard from the control plane at `at` (never moving backwards).
pub fn heard(store: &dyn StateStore, at: u64) -> Result<(), StoreError> {
    let before = last_heard(store, 0)?;
    if at <= before {
        return Ok(());
    }
    store.apply(vec![Op::Put(Tree::Meta, LAST_HEARD.to_vec(), at.to_be_bytes().to_vec())])
}

pub fn state(last_heard_unix_ms: u64, window: Option<Duration>, now: u64) -> TrustState {
    TrustState {
        last_heard_unix_ms,
        window_secs: window.map(|w| w.as_secs()),
        expired: expired(last_heard_unix_ms, window, now),
    }
}

fn expired(last_heard: u64, window: Option<Duration>, now: u64) -> bool {
    window.is_some_and(|w| now.saturating_sub(last_heard) > w.as_millis() as u64)
}

/// Whether something the control plane signed at `signed_unix_ms` may still be accepted: always
/// while the window holds; once it has expired, only what was signed within the window.
pub fn check(last_heard: u64, window: Option<Duration>, signed_unix_ms: u64, now: u64) -> Result<(), String> {
    let Some(w) = window else { return Ok(()) };
    if !expired(last_heard, window, now) {
        return Ok(());
    }
    let since = now.saturating_sub(w.as_millis() as u64);
    if signed_unix_ms >= since {
        return Ok(());
    }
    Err(format!(
        "the trust window has expired: this node last heard from its control plane at {last_heard} (Unix ms), \
         more than {} ago ([trust] max_offline), and accepts only what was signed after {since}; this was \
         signed at {signed_unix_ms}. Ask the operator for a new bundle, or reconnect the node",
        human(w)
    ))
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s.is_multiple_of(86_400) {
        format!("{}d", s / 86_400)
    } else if s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else {
        format!("{s}s")
    }
}

/// `90d`, `36h`, `30m`, `45s`; `0` or `off`: no window.
pub fn parse_window(s: &str) -> Result<Option<Duration>, String> {
    let s = s.trim();
    if s == "0" || s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 =
        num.parse().map_err(|_| format!("{s:?} is not a duration like 90d, 36h, 30m, 45s (or off)"))?;
    let factor = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    if n == 0 {
        return Ok(None);
    }
    Ok(Some(Duration::from_secs(n.saturating_mul(factor))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    const DAY: u64 = 86_400_000;

    #[test]
    fn within_the_window_everything_valid_is_accepted() {
        let w = Some(Duration::from_secs(90 * 86_400));
        assert!(check(100 * DAY, w, 0, 150 * DAY).is_ok(), "heard 50 days ago: an old bundle still goes");
        assert!(check(0, None, 0, 1000 * DAY).is_ok(), "no window");
    }

    #[test]
    fn once_expired_only_what_was_signed_inside_the_window_is_accepted() {
        let w = Some(Duration::from_secs(90 * 86_400));
        let now = 200 * DAY;
        let err = check(100 * DAY, w, 105 * DAY, now).expect_err("signed before the window");
        assert!(err.contains("trust window has expired") && err.contains("90d"), "{err}");
        assert!(check(100 * DAY, w, 150 * DAY, now).is_ok(), "a fresh bundle restores contact");
        assert!(state(100 * DAY, w, now).expired);
        assert!(!state(150 * DAY, w, now).expired);
    }

    #[test]
    fn last_heard_only_moves_forward_and_starts_at_enrollment() {
        let store = MemoryStore::new();
        assert_eq!(last_heard(&store, 7).expect("read"), 7);
        heard(&store, 50).expect("write");
        heard(&store, 20).expect("write");
        assert_eq!(last_heard(&store, 7).expect("read"), 50);
    }

    #[test]
    fn windows_parse_with_units_and_can_be_turned_off() {
        assert_eq!(parse_window("90d"), Ok(Some(Duration::from_secs(90 * 86_400))));
        assert_eq!(parse_window("36h"), Ok(Some(Duration::from_secs(36 * 3600))));
        assert_eq!(parse_window("off"), Ok(None));
        assert_eq!(parse_window("0"), Ok(None));
        assert!(parse_window("90").is_err(), "a unit is required");
        assert!(parse_window("ninety days").is_err());
    }
}
