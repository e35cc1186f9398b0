//! Exponential backoff with full jitter for retryable failures (network cuts, a restarting
//! control plane, a busy Docker engine). Fatal errors never go through here: they are refused.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self { base, max, attempt: 0 }
    }

    /// The delay before the next try: uniformly random in [cap/2, cap], where cap doubles
    /// from `base` up to `max` with each failure. Half the cap is kept so retries never spin.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.base.saturating_mul(1u32 << self.attempt.min(16)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let cap_ms = cap.as_millis().max(1) as u64;
        Duration::from_millis(rand::thread_rng().gen_range(cap_ms / 2..=cap_ms))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn failures(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(2), "{d:?} over the cap");
        }
        assert!(b.next_delay() >= Duration::from_secs(1), "capped delays keep at least half the cap");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
