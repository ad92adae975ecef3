//! When to reconnect a WebSocket that closed: full jitter over a window
//! that doubles per failed attempt, capped, and already jittered on the
//! first attempt so a fleet that lost its server at one moment (a restart)
//! does not come back at one moment.
//!
//! Pure arithmetic: the caller supplies the random number and sleeps.

use std::time::Duration;

/// Reconnect pacing (protocol.md §9): `delay(attempt, r)` is uniform in
/// `[0, window(attempt))` for `r` uniform in `[0, 1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// The window doubles from this per attempt.
    pub base: Duration,
    /// No window is wider than this.
    pub cap: Duration,
    /// The window of the first attempt after a close, and the narrowest
    /// any attempt gets.
    pub first: Duration,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        Self { base: Duration::from_secs(1), cap: Duration::from_secs(30), first: Duration::from_secs(5) }
    }
}

impl ReconnectPolicy {
    /// The window for `attempt` (0 = the first reconnect after a close):
    /// `first` for attempt 0, then `min(cap, base·2^attempt)`, never
    /// narrower than `first` (a server that is slow to come back should not
    /// see retries bunch up more closely than the first wave).
    pub fn window(&self, attempt: u32) -> Duration {
        if attempt == 0 {
            return self.first.min(self.cap);
        }
        let doubled = self.base.saturating_mul(1u32 << attempt.min(20));
        doubled.min(self.cap).max(self.first.min(self.cap))
    }

    /// The wait before `attempt`, for `unit` uniform in `[0, 1)` (values
    /// outside are clamped, so the wait stays inside the window).
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let unit = if unit.is_nan() { 0.0 } else { unit.clamp(0.0, 1.0) };
        let window = self.window(attempt);
        // `unit` = 1.0 would land on the window's end, which is excluded.
        window.mul_f64(unit).min(window.saturating_sub(Duration::from_millis(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_start_at_five_seconds_double_and_stop_at_thirty() {
        let p = ReconnectPolicy::default();
        let windows: Vec<u64> = (0..8).map(|a| p.window(a).as_secs()).collect();
        assert_eq!(windows, [5, 5, 5, 8, 16, 30, 30, 30]);
        assert_eq!(p.window(u32::MAX), Duration::from_secs(30), "no overflow however many attempts");
    }

    #[test]
    fn delays_are_full_jitter_inside_the_window() {
        let p = ReconnectPolicy::default();
        assert_eq!(p.delay(0, 0.0), Duration::ZERO, "full jitter reaches zero");
        assert_eq!(p.delay(0, 0.5), Duration::from_millis(2_500));
        assert!(p.delay(0, 0.999_999) < Duration::from_secs(5));
        assert!(p.delay(0, 1.0) < Duration::from_secs(5), "the window's end is excluded");
        assert_eq!(p.delay(4, 0.25), Duration::from_secs(4));
        assert!(p.delay(30, 0.999_999) < Duration::from_secs(30));
        assert_eq!(p.delay(3, -1.0), Duration::ZERO);
        assert_eq!(p.delay(3, f64::NAN), Duration::ZERO);
    }

    #[test]
    fn a_fleet_restart_spreads_over_the_first_window() {
        // 1000 agents whose connection closed at the same moment, with
        // evenly spread random numbers: their reconnects cover [0, 5 s)
        // about evenly, not one instant.
        let p = ReconnectPolicy::default();
        let mut per_second = [0u32; 5];
        for i in 0..1000 {
            let d = p.delay(0, f64::from(i) / 1000.0);
            per_second[d.as_secs() as usize] += 1;
        }
        assert_eq!(per_second, [200; 5]);
    }
}
