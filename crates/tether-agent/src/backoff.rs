//! Retry pacing for every agent loop (protocol.md §12): exponential backoff with
//! full jitter from 1 s to 5 min, honoring `Retry-After`, and a circuit
//! breaker that opens after 10 consecutive failures and then probes once
//! per ceiling (5 min) until a call succeeds. It never gives up.
//!
//! Pure arithmetic: the caller sleeps. Randomness is injected so tests are
//! deterministic and need no real time.

use std::time::Duration;

pub const BASE: Duration = Duration::from_secs(1);
pub const CEILING: Duration = Duration::from_secs(300);
pub const BREAKER_THRESHOLD: u32 = 10;

pub struct Backoff {
    base: Duration,
    ceiling: Duration,
    failures: u32,
    /// Uniform in [0, 1).
    rng: Box<dyn FnMut() -> f64 + Send>,
}

impl std::fmt::Debug for Backoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backoff").field("failures", &self.failures).finish()
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(BASE, Box::new(rand::random::<f64>))
    }
}

impl Backoff {
    pub fn new(base: Duration, rng: Box<dyn FnMut() -> f64 + Send>) -> Self {
        Self { base: base.max(Duration::from_millis(1)), ceiling: CEILING, failures: 0, rng }
    }

    /// True once `BREAKER_THRESHOLD` calls in a row have failed.
    pub fn is_open(&self) -> bool {
        self.failures >= BREAKER_THRESHOLD
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A call succeeded: close the breaker and start over.
    pub fn success(&mut self) {
        self.failures = 0;
    }

    /// A call failed: how long to wait before the next attempt.
    pub fn failure(&mut self, retry_after: Option<Duration>) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let delay = if self.is_open() {
            // Open breaker: one probe per ceiling.
            self.ceiling
        } else {
            let exp = self.base.saturating_mul(1u32 << (self.failures - 1).min(20)).min(self.ceiling);
            // Full jitter spreads a fleet that failed at the same moment.
            exp.mul_f64((self.rng)().clamp(0.0, 1.0))
        };
        delay.max(retry_after.unwrap_or_default()).min(self.ceiling.max(retry_after.unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed(v: f64) -> Backoff {
        Backoff::new(BASE, Box::new(move || v))
    }

    #[test]
    fn grows_exponentially_up_to_the_ceiling_with_full_jitter() {
        let mut b = fixed(0.999_999);
        let delays: Vec<u64> = (0..9).map(|_| b.failure(None).as_secs()).collect();
        assert_eq!(delays, [0, 1, 3, 7, 15, 31, 63, 127, 255]);
        let mut low = fixed(0.0);
        assert_eq!(low.failure(None), Duration::ZERO, "full jitter reaches zero");
        let mut half = fixed(0.5);
        half.failure(None);
        assert_eq!(half.failure(None), Duration::from_secs(1));
    }

    #[test]
    fn breaker_opens_after_ten_failures_and_probes_every_five_minutes_forever() {
        let mut b = fixed(0.5);
        for _ in 0..9 {
            b.failure(None);
            assert!(!b.is_open());
        }
        assert_eq!(b.failure(None), CEILING);
        assert!(b.is_open());
        // It never gives up: still one probe per ceiling after many failures.
        for _ in 0..1000 {
            assert_eq!(b.failure(None), CEILING);
        }
        b.success();
        assert!(!b.is_open());
        assert_eq!(b.failures(), 0);
        assert!(b.failure(None) <= BASE);
    }

    #[test]
    fn retry_after_is_a_floor() {
        let mut b = fixed(0.0);
        assert_eq!(b.failure(Some(Duration::from_secs(7))), Duration::from_secs(7));
        // A server asking for longer than the ceiling is obeyed.
        assert_eq!(b.failure(Some(Duration::from_secs(600))), Duration::from_secs(600));
    }

    #[test]
    fn simulated_outage_total_wait_is_bounded() {
        // 20 failures in a row with worst-case jitter: 9 growing waits, then probes at the ceiling.
        let mut b = fixed(0.999_999);
        let total: Duration = (0..20).map(|_| b.failure(None)).sum();
        assert!(total <= Duration::from_secs(511 + 11 * 300), "{total:?}");
        assert!(b.is_open());
    }
}
