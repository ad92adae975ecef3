//! Injected time, so expiry, sweeps and token lifetimes are testable.

use std::fmt::Debug;

use tether_store::Millis;

pub trait Clock: Send + Sync + Debug + 'static {
    fn now_ms(&self) -> Millis;
    fn now_s(&self) -> u64 {
        (self.now_ms() / 1000) as u64
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> Millis {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        now.as_millis() as Millis
    }
}

/// Milliseconds since the epoch as a wire timestamp.
pub fn rfc3339(ms: Millis) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}
