//! Background jobs owned by the server's task tracker: the command sweeper
//! and retention (singletons: on a shared database exactly one server runs
//! each, the one holding its claim), catching up with stream changes other
//! servers made, and the batched `last_seen` flush. Each stops when
//! shutdown is signalled.

use std::time::Duration;

use tether_store::{AuditEntry, JobLease, Store};
use tokio_util::sync::CancellationToken;

use crate::state::AppState;
use crate::stream::StreamEvent;

/// Device grants are deleted this long after they expire. Redemption
/// happens before expiry and a lost-response retry within 30 s of it, so
/// an hour keeps every grant a poll can still use, and meanwhile a late
/// poll hears `expired_token` rather than `invalid_grant`.
const DEVICE_GRANT_KEEP_MS: i64 = 3_600_000;

/// How far back each catch-up reads before the previous one began: covers
/// a transaction stamped before that read and committed after it, and
/// servers whose clocks differ by less than this.
const CATCH_UP_OVERLAP_MS: i64 = 5_000;

/// This server's claim on a singleton job: kept across rounds while it
/// holds, taken when the job is free, let go when lost (on PostgreSQL the
/// claim dies with its connection, and another server takes the job over).
#[derive(Debug)]
struct Singleton {
    job: &'static str,
    lease: Option<Box<dyn JobLease>>,
}

impl Singleton {
    fn new(job: &'static str) -> Self {
        Self { job, lease: None }
    }

    /// Whether this server may run the job now.
    async fn held(&mut self, store: &dyn Store) -> bool {
        if let Some(lease) = &mut self.lease {
            if lease.held().await {
                return true;
            }
            tracing::warn!(job = self.job, "Lost the claim on a singleton job");
            self.lease = None;
        }
        match store.try_job_lock(self.job).await {
            Ok(Some(lease)) => {
                if store.kind().shared() {
                    tracing::info!(job = self.job, "This server runs the job");
                }
                self.lease = Some(lease);
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(job = self.job, error = %e, "Claiming a singleton job failed");
                false
            }
        }
    }
}

/// Waits for the next tick; false once `stop` fires.
async fn next_tick(tick: &mut tokio::time::Interval, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tick.tick() => true,
    }
}

fn every(interval: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// Expires, loses and releases commands once per `interval`.
pub async fn sweeper(state: AppState, interval: Duration, stop: CancellationToken) {
    let mut tick = every(interval);
    let mut claim = Singleton::new("sweeper");
    while next_tick(&mut tick, &stop).await {
        if !claim.held(state.store.as_ref()).await {
            continue;
        }
        match state.store.sweep(state.clock.now_ms()).await {
            Ok(out) => {
                if out.expired + out.lost + out.released > 0 {
                    tracing::info!(expired = out.expired, lost = out.lost, released = out.released, "Swept commands");
                }
                state.notifier.publish(StreamEvent::Heads(out.heads));
            }
            Err(e) => tracing::warn!(error = %e, "Command sweep failed"),
        }
    }
}

/// Once per `interval`: drops this server's idle rate-limit keys, password
/// cache entries and expired nonces; and, on the one server holding the
/// claim, signals beyond the retention (age and count), old device grants,
/// expired shared nonces, and metrics, rollups, finished commands and
/// audit rows past their horizons.
pub async fn retention(state: AppState, interval: Duration, stop: CancellationToken) {
    let mut tick = every(interval);
    let mut claim = Singleton::new("retention");
    while next_tick(&mut tick, &stop).await {
        let now = state.clock.now_ms();
        state.limits.prune(now);
        state.passwords.prune(now);
        state.nonces.prune(state.clock.now_s());
        if !claim.held(state.store.as_ref()).await {
            continue;
        }
        let before = now - state.config.signal_max_age.as_millis() as i64;
        match state.store.prune_signals(before, state.config.signal_max_per_agent, now).await {
            Ok(floors) => {
                if !floors.is_empty() {
                    tracing::info!(agents = floors.len(), "Pruned old signals");
                }
                // Other servers see the moved floors when they next catch up.
                state.streams.set_floors(&floors);
            }
            Err(e) => tracing::warn!(error = %e, "Signal retention failed"),
        }
        // Here rather than on each authorization request: one indexed delete
        // per interval instead of a write on the hot path of a flood.
        match state.store.prune_device_grants(now - DEVICE_GRANT_KEEP_MS).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(grants = n, "Deleted expired device grants"),
            Err(e) => tracing::warn!(error = %e, "Device grant retention failed"),
        }
        if state.store.kind().shared()
            && let Err(e) = state.store.prune_nonces(state.clock.now_s() as i64).await
        {
            tracing::warn!(error = %e, "Nonce retention failed");
        }
        prune_history(&state, now, &stop).await;
    }
}

/// Rows deleted per kind in one retention transaction: small enough that
/// the API's writes never wait long behind one.
const PRUNE_ROWS: u32 = 2_000;
/// The metric batch ids remembered for retries (a day is far beyond any
/// agent's retry window).
const METRIC_BATCH_IDS_KEEP_MS: i64 = 86_400_000;

/// Deletes metrics, rollups, finished commands and audit rows past their
/// horizons (protocol.md §8), a small batch at a time with a pause
/// between batches, until nothing is left to delete or the server stops.
async fn prune_history(state: &AppState, now: i64, stop: &CancellationToken) {
    let kept = &state.config.telemetry.retention;
    let before = |keep: Duration| now - keep.as_millis() as i64;
    let horizons = tether_store::Horizons {
        raw_metrics_before: before(kept.raw_metrics),
        hourly_before: before(kept.hourly_rollups),
        daily_before: before(kept.daily_rollups),
        metric_batches_before: now - METRIC_BATCH_IDS_KEEP_MS,
        finished_commands_before: before(kept.finished_commands),
        audit_before: before(kept.audit),
    };
    let mut total = tether_store::PruneCounts::default();
    loop {
        let done = match state.store.prune_history(&horizons, PRUNE_ROWS).await {
            Ok(n) => {
                total.raw += n.raw;
                total.hourly += n.hourly;
                total.daily += n.daily;
                total.batches += n.batches;
                total.commands += n.commands;
                total.audit += n.audit;
                !n.more(PRUNE_ROWS)
            }
            Err(e) => {
                tracing::warn!(error = %e, "History retention failed");
                true
            }
        };
        if done {
            break;
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    if total.raw + total.hourly + total.daily + total.commands + total.audit > 0 {
        tracing::info!(
            raw_points = total.raw,
            hourly = total.hourly,
            daily = total.daily,
            commands = total.commands,
            audit_rows = total.audit,
            "Deleted history past its retention"
        );
    }
}

/// Once per `interval`, on the one server holding the claim: announces
/// certificates (uploaded material, or what an agent reported holding) that
/// expire within the warning window, once per serial, as `cert.expiring`
/// audit events (protocol.md §7).
pub async fn cert_expiry(state: AppState, interval: Duration, stop: CancellationToken) {
    let mut tick = every(interval);
    let mut claim = Singleton::new("cert_expiry");
    while next_tick(&mut tick, &stop).await {
        if !claim.held(state.store.as_ref()).await {
            continue;
        }
        let now = state.clock.now_ms();
        let before = now + i64::from(state.config.cert_expiry_warning_days) * 86_400_000;
        let expiring = match state.store.expiring_certs(before).await {
            Ok(expiring) => expiring,
            Err(e) => {
                tracing::warn!(error = %e, "Checking certificate expiry failed");
                continue;
            }
        };
        for cert in expiring {
            tracing::warn!(cert = %cert.name, serial = %cert.serial, agent = ?cert.agent_id, "Certificate expires soon");
            let details = serde_json::json!({"name": cert.name, "serial": cert.serial, "agent_id": cert.agent_id,
                                             "not_after": cert.not_after});
            let audit = AuditEntry::system("server", "cert.expiring", cert.cert_id.to_string(), details, now);
            if let Err(e) = state.store.announce_expiring(&cert.serial, now, audit).await {
                tracing::warn!(error = %e, "Announcing an expiring certificate failed");
            }
        }
    }
}

/// Once per `interval`, on the one server holding the claim: marks agents
/// offline whose `last_seen` is older than the threshold and online again
/// when it is not (protocol.md §8). The store records each transition once
/// (with its audit row); this job tells the webhook and the log.
pub async fn presence(state: AppState, interval: Duration, stop: CancellationToken) {
    let mut tick = every(interval);
    let mut claim = Singleton::new("presence");
    while next_tick(&mut tick, &stop).await {
        if !claim.held(state.store.as_ref()).await {
            continue;
        }
        let now = state.clock.now_ms();
        let changes = match state.store.update_presence(state.config.telemetry.seen_since(now), now).await {
            Ok(changes) => changes,
            Err(e) => {
                tracing::warn!(error = %e, "Updating agent presence failed");
                continue;
            }
        };
        for change in changes {
            announce_presence(&state, change, now);
        }
    }
}

/// Tells the log, the metrics and the webhook about a presence transition
/// the store recorded (with its audit row) at `at`.
pub fn announce_presence(state: &AppState, change: tether_store::PresenceChange, at: tether_store::Millis) {
    let event = if change.online { "agent.online" } else { "agent.offline" };
    tracing::info!(agent_id = %change.agent_id, name = %change.name, event, "Agent presence changed");
    metrics::counter!("tether_presence_transitions_total", "to" => if change.online { "online" } else { "offline" })
        .increment(1);
    state.alerts.send(crate::alerts::PresenceAlert {
        id: uuid::Uuid::now_v7().to_string(),
        event,
        agent_id: change.agent_id.to_string(),
        name: change.name,
        hostname: change.hostname,
        labels: change.labels,
        last_seen: change.last_seen.map(crate::clock::rfc3339),
        at: crate::clock::rfc3339(at),
    });
}

/// On a shared database: reads which agents' streams changed since the
/// previous round and brings the loaded ones up to date, healing any event
/// that NATS lost (or all of them, without NATS). Every server runs its
/// own; often while events may be missing, rarely while NATS carries them.
pub async fn catch_up(state: AppState, stop: CancellationToken) {
    let intervals = &state.config.catch_up;
    let mut since = state.clock.now_ms();
    // Ticks at the short interval, so losing NATS is noticed within one.
    let mut tick = every(intervals.without_nats);
    let mut last = tokio::time::Instant::now();
    while next_tick(&mut tick, &stop).await {
        if state.notifier.connected() && last.elapsed() < intervals.with_nats {
            continue;
        }
        last = tokio::time::Instant::now();
        let started = state.clock.now_ms();
        match state.store.stream_changes(since - CATCH_UP_OVERLAP_MS).await {
            Ok(changes) => {
                state.streams.catch_up(&changes);
                since = started;
            }
            Err(e) => tracing::warn!(error = %e, "Catching up with stream changes failed"),
        }
    }
}

/// Writes the `last_seen` of recently active agents in one batch per `interval`,
/// and once more on shutdown, so requests never write it one by one. A batch
/// that fails is tried again with the next one, not dropped.
pub async fn flush_seen(state: AppState, interval: Duration, stop: CancellationToken) {
    let mut tick = every(interval);
    loop {
        let stopping = !next_tick(&mut tick, &stop).await;
        let seen = state.streams.take_seen();
        if let Err(e) = state.store.touch_agents(&seen).await {
            tracing::warn!(error = %e, agents = seen.len(), "Flushing last_seen failed; will retry");
            state.streams.unflushed(&seen);
        }
        if stopping {
            return;
        }
    }
}
