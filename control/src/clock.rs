//! The control plane's notion of "now" (Unix milliseconds). Real time by default; tests can
//! move it forward to expire tokens without sleeping. Certificates use the real clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Default)]
pub struct Clock {
    skew_ms: Arc<AtomicU64>,
}

impl Clock {
    pub fn system() -> Self {
        Self::default()
    }

    pub fn now_ms(&self) -> u64 {
        let real = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        real.saturating_add(self.skew_ms.load(Ordering::Relaxed))
    }

    /// Moves this clock (and every clone of it) forward.
    pub fn advance(&self, by: Duration) {
        self.skew_ms.fetch_add(by.as_millis() as u64, Ordering::Relaxed);
    }

    /// Moves this clock back by `by`, at most to the real time (a step back after an advance,
    /// as an NTP correction makes).
    pub fn rewind(&self, by: Duration) {
        let by = by.as_millis() as u64;
        let _ =
            self.skew_ms.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| Some(s.saturating_sub(by)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advancing_a_clone_moves_the_original() {
        let clock = Clock::system();
        let before = clock.now_ms();
        clock.clone().advance(Duration::from_secs(3600));
        assert!(clock.now_ms() >= before + 3_600_000);
    }
}
