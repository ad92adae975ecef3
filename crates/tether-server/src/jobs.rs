//! Background jobs owned by the server's task tracker: the command sweeper,
//! retention (signals, device grants, limiter keys, nonces) and the batched
//! `last_seen` flush. Each stops when shutdown is signalled.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::state::AppState;

/// Device grants are deleted this long after they expire. Redemption
/// happens before expiry and a lost-response retry within 30 s of it, so
/// an hour keeps every grant a poll can still use, and meanwhile a late
/// poll hears `expired_token` rather than `invalid_grant`.
const DEVICE_GRANT_KEEP_MS: i64 = 3_600_000;

/// Expires, loses and releases commands once per `interval`.
pub async fn sweeper(state: AppState, interval: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match state.store.sweep(state.clock.now_ms()).await {
            Ok(out) => {
                state.notifier.publish(&out.heads);
                if out.expired + out.lost + out.released > 0 {
                    tracing::info!(expired = out.expired, lost = out.lost, released = out.released, "Swept commands");
                }
            }
            Err(e) => tracing::warn!(error = %e, "Command sweep failed"),
        }
    }
}

/// Drops signals beyond the retention (age and count), old device grants,
/// idle rate-limit keys and expired request nonces once per `interval`.
pub async fn retention(state: AppState, interval: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        state.limits.prune(state.clock.now_ms());
        state.passwords.prune(state.clock.now_ms());
        state.nonces.prune(state.clock.now_s());
        let before = state.clock.now_ms() - state.config.signal_max_age.as_millis() as i64;
        match state.store.prune_signals(before, state.config.signal_max_per_agent).await {
            Ok(floors) => {
                if !floors.is_empty() {
                    tracing::info!(agents = floors.len(), "Pruned old signals");
                }
                state.streams.set_floors(&floors);
            }
            Err(e) => tracing::warn!(error = %e, "Signal retention failed"),
        }
        // Here rather than on each authorization request: one indexed delete
        // per interval instead of a write on the hot path of a flood.
        match state.store.prune_device_grants(state.clock.now_ms() - DEVICE_GRANT_KEEP_MS).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(grants = n, "Deleted expired device grants"),
            Err(e) => tracing::warn!(error = %e, "Device grant retention failed"),
        }
    }
}

/// Writes the `last_seen` of recently active agents in one batch per `interval`,
/// and once more on shutdown, so requests never write it one by one.
pub async fn flush_seen(state: AppState, interval: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = stop.cancelled() => true,
            _ = tick.tick() => false,
        };
        let seen = state.streams.take_seen();
        if let Err(e) = state.store.touch_agents(&seen).await {
            tracing::warn!(error = %e, agents = seen.len(), "Flushing last_seen failed");
        }
        if stopping {
            return;
        }
    }
}
