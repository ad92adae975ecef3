//! Abuse limits (protocol.md §11): token buckets per agent, per user and per
//! client IP (unauthenticated routes only), the login failure windows and
//! the wrong-user-code window of the device flow.
//! Buckets are per replica. A refused request gets 429 with `Retry-After`.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::num::NonZeroU32;

use dashmap::DashMap;
use governor::{DefaultKeyedRateLimiter, Quota};
use tether_proto::{AgentId, ErrorKey};
use tether_store::Millis;

use crate::error::ApiError;

/// Limits, all configurable (`[limits]` in the server's `--config` file);
/// the defaults are protocol.md §11's.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitConfig {
    pub agent_per_s: u32,
    pub agent_burst: u32,
    /// Stream polls answered at once (a poll that waited is free).
    pub poll_per_s: u32,
    pub poll_burst: u32,
    pub user_per_s: u32,
    pub user_burst: u32,
    pub ip_per_s: u32,
    pub ip_burst: u32,
    /// Refreshes per refresh-token family (one family per agent identity).
    pub refresh_per_s: u32,
    pub refresh_burst: u32,
    pub login_failures_per_user_ip: usize,
    pub login_failures_per_ip: usize,
    pub login_window_s: u64,
    /// Wrong or unknown RFC 8628 user codes per client IP in
    /// `device_code_window_s` (approvals, denials and `/device` lookups
    /// together); a window of its own so mistyped codes behind one NAT do
    /// not lock out password logins, nor failed logins code entry.
    pub device_code_failures_per_ip: usize,
    pub device_code_window_s: u64,
    /// Most unexpired device grants one client address may have waiting
    /// for an operator, so one address cannot fill the global cap.
    pub pending_device_grants_per_ip: u64,
    /// argon2 verifications running at once; 0 = one per core.
    pub password_checks_at_once: usize,
    /// How long a password check waits for its turn before 503.
    pub password_check_wait_ms: u64,
    /// Nonces of signed requests remembered at once for one agent; unset
    /// means [`LimitConfig::nonce_quota`]'s default.
    pub nonces_per_agent: Option<usize>,
}

impl Default for LimitConfig {
    fn default() -> Self {
        Self {
            agent_per_s: 10,
            agent_burst: 20,
            poll_per_s: 1,
            poll_burst: 10,
            user_per_s: 20,
            user_burst: 100,
            ip_per_s: 50,
            ip_burst: 500,
            // An agent refreshes every ~15 min; a few quick retries after
            // lost responses are normal, a loop is not.
            refresh_per_s: 1,
            refresh_burst: 5,
            login_failures_per_user_ip: 5,
            login_failures_per_ip: 20,
            login_window_s: 60,
            // 10 a minute is plenty for people typing codes; with 20^8
            // codes and at most 10,000 pending, one IP guessing at this rate
            // hits a pending code about once in 2.6 × 10^5 minutes (half a
            // year), and a hit shows the device's details, never approves it.
            device_code_failures_per_ip: 10,
            device_code_window_s: 60,
            // A rack behind one NAT enrolls tens of machines at once, each
            // approved by a person; 100 leaves room for that and keeps one
            // address at 1% of the default global cap of 10,000.
            pending_device_grants_per_ip: 100,
            password_checks_at_once: 0,
            // With the failure windows in front, one address queues at most
            // 20 checks; 2 s is a few dozen argon2 runs per core.
            password_check_wait_ms: 2_000,
            nonces_per_agent: None,
        }
    }
}

impl LimitConfig {
    /// Remembered nonces one agent may hold (protocol.md §3). A nonce is kept
    /// until its timestamp leaves the window, up to 600 s after it arrived
    /// (a timestamp may be 300 s ahead); an agent within its buckets sends at
    /// most `agent + poll` rate × 600 s plus both bursts. Polls that waited
    /// are free under the buckets but not here, so one agent cannot fill the
    /// process-wide nonce cache that the whole fleet shares.
    pub fn nonce_quota(&self) -> usize {
        self.nonces_per_agent.unwrap_or_else(|| {
            let window = 2 * tether_proto::signing::WINDOW_S as usize;
            (self.agent_per_s as usize + self.poll_per_s as usize) * window
                + self.agent_burst as usize
                + self.poll_burst as usize
        })
    }
}

fn quota(per_s: u32, burst: u32) -> Quota {
    let nz = |v: u32| NonZeroU32::new(v.max(1)).expect("max(1) is non-zero");
    Quota::per_second(nz(per_s)).allow_burst(nz(burst))
}

/// Failures in a sliding window, per key. Each entry is a time and the id
/// of the reservation that made it (0 for plain records).
#[derive(Debug, Default)]
struct FailureWindow {
    seen: DashMap<String, VecDeque<(Millis, u64)>>,
}

fn retry_after_s(first: Millis, window_ms: Millis, now: Millis) -> u64 {
    ((first + window_ms - now) / 1000 + 1) as u64
}

impl FailureWindow {
    /// Seconds until `key` may try again, if it has `max` failures in the window.
    fn blocked(&self, key: &str, max: usize, window_ms: Millis, now: Millis) -> Option<u64> {
        let mut entry = self.seen.get_mut(key)?;
        while entry.front().is_some_and(|(t, _)| now - t >= window_ms) {
            entry.pop_front();
        }
        (entry.len() >= max).then(|| entry.front().map_or(1, |(first, _)| retry_after_s(*first, window_ms, now)))
    }

    fn record(&self, key: String, now: Millis) {
        self.seen.entry(key).or_default().push_back((now, 0));
    }

    /// Takes a slot in `key`'s window unless it is full: the check and the
    /// take happen under one lock, so parallel callers cannot overfill it.
    fn reserve(&self, key: &str, id: u64, max: usize, window_ms: Millis, now: Millis) -> Result<(), u64> {
        if let Some(retry) = self.blocked(key, max, window_ms, now) {
            // Fast path without allocating a key for a full window.
            return Err(retry);
        }
        let mut entry = self.seen.entry(key.to_owned()).or_default();
        while entry.front().is_some_and(|(t, _)| now - t >= window_ms) {
            entry.pop_front();
        }
        if entry.len() >= max {
            return Err(entry.front().map_or(1, |(first, _)| retry_after_s(*first, window_ms, now)));
        }
        entry.push_back((now, id));
        Ok(())
    }

    /// Gives back the slot `id` took in `key`'s window.
    fn release(&self, key: &str, id: u64) {
        if let Some(mut entry) = self.seen.get_mut(key) {
            entry.retain(|(_, i)| *i != id);
        }
        self.seen.remove_if(key, |_, v| v.is_empty());
    }

    fn prune(&self, window_ms: Millis, now: Millis) {
        self.seen.retain(|_, v| v.back().is_some_and(|(t, _)| now - t < window_ms));
    }

    fn len(&self) -> usize {
        self.seen.len()
    }
}

/// A login failure slot taken before a password is verified (protocol.md
/// §3): kept as a failure unless [`LoginSlot::release`] gives it back after a
/// successful check, so N parallel guesses cost at most the window's allowance.
#[derive(Debug)]
#[must_use = "a slot is kept as a failure unless released"]
pub struct LoginSlot<'a> {
    limits: &'a Limits,
    pair: String,
    ip: String,
    id: u64,
}

impl LoginSlot<'_> {
    /// The check succeeded (or never ran): the slot is not a failure.
    pub fn release(self) {
        self.limits.login.release(&self.pair, self.id);
        self.limits.login.release(&self.ip, self.id);
    }
}

#[derive(Debug)]
pub struct Limits {
    config: LimitConfig,
    agent: DefaultKeyedRateLimiter<AgentId>,
    poll: DefaultKeyedRateLimiter<AgentId>,
    user: DefaultKeyedRateLimiter<String>,
    ip: DefaultKeyedRateLimiter<IpAddr>,
    refresh: DefaultKeyedRateLimiter<String>,
    login: FailureWindow,
    device_codes: FailureWindow,
    next_slot: std::sync::atomic::AtomicU64,
}

/// The 429 answer: envelope params and `Retry-After` (protocol.md §2).
pub fn rate_limited(retry_after_s: u64, allowed: String) -> ApiError {
    ApiError::new(ErrorKey::RateLimited, "too many requests; slow down")
        .with("retry_after", retry_after_s.max(1))
        .with("allowed_rate", allowed)
}

fn check<K: Clone + std::hash::Hash + Eq>(
    limiter: &DefaultKeyedRateLimiter<K>,
    key: &K,
    per_s: u32,
    burst: u32,
) -> Result<(), ApiError> {
    limiter.check_key(key).map_err(|not_until| {
        let wait = not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
        rate_limited(wait.as_secs_f64().ceil() as u64, format!("{per_s}/s, burst {burst}"))
    })
}

impl Limits {
    pub fn new(config: LimitConfig) -> Self {
        Self {
            agent: DefaultKeyedRateLimiter::keyed(quota(config.agent_per_s, config.agent_burst)),
            poll: DefaultKeyedRateLimiter::keyed(quota(config.poll_per_s, config.poll_burst)),
            user: DefaultKeyedRateLimiter::keyed(quota(config.user_per_s, config.user_burst)),
            ip: DefaultKeyedRateLimiter::keyed(quota(config.ip_per_s, config.ip_burst)),
            refresh: DefaultKeyedRateLimiter::keyed(quota(config.refresh_per_s, config.refresh_burst)),
            login: FailureWindow::default(),
            device_codes: FailureWindow::default(),
            next_slot: std::sync::atomic::AtomicU64::new(1),
            config,
        }
    }

    pub fn agent(&self, id: AgentId) -> Result<(), ApiError> {
        check(&self.agent, &id, self.config.agent_per_s, self.config.agent_burst)
    }

    pub fn immediate_poll(&self, id: AgentId) -> Result<(), ApiError> {
        check(&self.poll, &id, self.config.poll_per_s, self.config.poll_burst)
    }

    pub fn user(&self, user_id: &str) -> Result<(), ApiError> {
        check(&self.user, &user_id.to_owned(), self.config.user_per_s, self.config.user_burst)
    }

    pub fn ip(&self, ip: IpAddr) -> Result<(), ApiError> {
        check(&self.ip, &ip, self.config.ip_per_s, self.config.ip_burst)
    }

    pub fn refresh_family(&self, family_id: &str) -> Result<(), ApiError> {
        check(&self.refresh, &family_id.to_owned(), self.config.refresh_per_s, self.config.refresh_burst)
    }

    fn login_keys(ip: Option<IpAddr>, username: &str) -> (String, String) {
        let ip = ip.map(|i| i.to_string()).unwrap_or_default();
        (format!("{ip}\u{0}{username}"), ip)
    }

    fn login_refusal(&self, retry: u64) -> ApiError {
        rate_limited(retry, format!("{} failed logins per minute", self.config.login_failures_per_user_ip))
    }

    /// Refuses a password check while this IP (or this IP and username) has
    /// too many recent failures. Takes nothing: see [`Limits::reserve_login`].
    pub fn login_allowed(&self, ip: Option<IpAddr>, username: &str, now: Millis) -> Result<(), ApiError> {
        let window = self.config.login_window_s as Millis * 1000;
        let (pair, ip) = Self::login_keys(ip, username);
        let blocked = self
            .login
            .blocked(&pair, self.config.login_failures_per_user_ip, window, now)
            .or_else(|| self.login.blocked(&ip, self.config.login_failures_per_ip, window, now));
        match blocked {
            Some(retry) => Err(self.login_refusal(retry)),
            None => Ok(()),
        }
    }

    /// Takes a failure slot in both login windows (per IP and username, per
    /// IP) before a password is verified, or refuses with 429 when either is
    /// full. The slot stays a failure unless released.
    pub fn reserve_login(&self, ip: Option<IpAddr>, username: &str, now: Millis) -> Result<LoginSlot<'_>, ApiError> {
        let window = self.config.login_window_s as Millis * 1000;
        let (pair, ip) = Self::login_keys(ip, username);
        let id = self.next_slot.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.login
            .reserve(&pair, id, self.config.login_failures_per_user_ip, window, now)
            .map_err(|retry| self.login_refusal(retry))?;
        if let Err(retry) = self.login.reserve(&ip, id, self.config.login_failures_per_ip, window, now) {
            self.login.release(&pair, id);
            return Err(self.login_refusal(retry));
        }
        Ok(LoginSlot { limits: self, pair, ip, id })
    }

    pub fn login_failed(&self, ip: Option<IpAddr>, username: &str, now: Millis) {
        let (pair, ip) = Self::login_keys(ip, username);
        self.login.record(pair, now);
        self.login.record(ip, now);
    }

    /// Keys held by the login failure windows (for tests and metrics).
    pub fn login_keys_held(&self) -> usize {
        self.login.len()
    }

    /// Refuses user-code checks from an IP with too many recent wrong codes.
    pub fn device_code_allowed(&self, ip: Option<IpAddr>, now: Millis) -> Result<(), ApiError> {
        let window = self.config.device_code_window_s as Millis * 1000;
        let key = ip.map(|i| i.to_string()).unwrap_or_default();
        match self.device_codes.blocked(&key, self.config.device_code_failures_per_ip, window, now) {
            Some(retry) => Err(rate_limited(
                retry,
                format!(
                    "{} wrong user codes per {} s",
                    self.config.device_code_failures_per_ip, self.config.device_code_window_s
                ),
            )),
            None => Ok(()),
        }
    }

    /// Counts a wrong, malformed or unknown user code against this IP.
    pub fn device_code_failed(&self, ip: Option<IpAddr>, now: Millis) {
        self.device_codes.record(ip.map(|i| i.to_string()).unwrap_or_default(), now);
    }

    /// Forgets idle keys so the maps stay bounded.
    pub fn prune(&self, now: Millis) {
        self.agent.retain_recent();
        self.poll.retain_recent();
        self.user.retain_recent();
        self.ip.retain_recent();
        self.refresh.retain_recent();
        self.login.prune(self.config.login_window_s as Millis * 1000, now);
        self.device_codes.prune(self.config.device_code_window_s as Millis * 1000, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_failures_block_the_pair_then_the_ip_until_the_window_passes() {
        let limits = Limits::new(LimitConfig::default());
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        for _ in 0..5 {
            assert!(limits.login_allowed(Some(a), "admin", 0).is_ok());
            limits.login_failed(Some(a), "admin", 0);
        }
        assert!(limits.login_allowed(Some(a), "admin", 1_000).is_err());
        assert!(limits.login_allowed(Some(a), "bob", 1_000).is_ok(), "another user from the same IP");
        assert!(limits.login_allowed(Some(b), "admin", 1_000).is_ok(), "the same user from another IP");
        assert!(limits.login_allowed(Some(a), "admin", 60_000).is_ok(), "the window passed");
        for i in 0..20 {
            limits.login_failed(Some(b), &format!("user{i}"), 0);
        }
        assert!(limits.login_allowed(Some(b), "fresh-name", 10).is_err(), "20 per IP");
    }

    #[test]
    fn reserved_login_slots_cap_parallel_checks_and_released_slots_are_not_failures() {
        let limits = Limits::new(LimitConfig::default());
        let a: IpAddr = "10.0.0.5".parse().expect("ip");
        // Five checks in flight at once fill the pair's window: the sixth is
        // refused before any of them has finished.
        let slots: Vec<_> = (0..5).map(|_| limits.reserve_login(Some(a), "admin", 0).expect("slot")).collect();
        let err = limits.reserve_login(Some(a), "admin", 0).expect_err("window full");
        assert_eq!(err.key, ErrorKey::RateLimited);
        assert!(limits.login_allowed(Some(a), "bob", 0).is_ok(), "other users from the address");
        // A successful check gives its slot back; failed ones keep theirs.
        let mut slots = slots.into_iter();
        slots.next().expect("slot").release();
        drop(slots);
        let last = limits.reserve_login(Some(a), "admin", 0).expect("a released slot is free again");
        assert!(limits.reserve_login(Some(a), "admin", 0).is_err(), "the four kept slots and this one");
        last.release();
        // The per-IP window counts reservations for every username.
        let b: IpAddr = "10.0.0.6".parse().expect("ip");
        let _held: Vec<_> =
            (0..20).map(|i| limits.reserve_login(Some(b), &format!("u{i}"), 0).expect("slot")).collect();
        assert!(limits.reserve_login(Some(b), "fresh", 0).is_err(), "20 per IP");
        assert!(limits.reserve_login(Some(b), "fresh", 60_000).is_ok(), "the window passed");
    }

    #[test]
    fn wrong_user_codes_have_their_own_window_apart_from_logins() {
        let limits = Limits::new(LimitConfig::default());
        let nat: IpAddr = "10.0.0.3".parse().expect("ip");
        for _ in 0..10 {
            assert!(limits.device_code_allowed(Some(nat), 0).is_ok());
            limits.device_code_failed(Some(nat), 0);
        }
        assert!(limits.device_code_allowed(Some(nat), 1_000).is_err(), "10 wrong codes per IP");
        assert!(limits.login_allowed(Some(nat), "admin", 1_000).is_ok(), "password logins are not affected");
        assert!(limits.device_code_allowed(Some("10.0.0.4".parse().expect("ip")), 1_000).is_ok(), "another IP");
        assert!(limits.device_code_allowed(Some(nat), 60_000).is_ok(), "the window passed");

        // And the other way round: failed logins do not block code entry.
        for i in 0..20 {
            limits.login_failed(Some(nat), &format!("user{i}"), 70_000);
        }
        assert!(limits.login_allowed(Some(nat), "admin", 70_000).is_err());
        assert!(limits.device_code_allowed(Some(nat), 70_000).is_ok());
    }

    #[test]
    fn buckets_allow_the_burst_then_refuse_with_retry_after() {
        let limits = Limits::new(LimitConfig { ip_per_s: 1, ip_burst: 3, ..LimitConfig::default() });
        let ip: IpAddr = "10.0.0.9".parse().expect("ip");
        for _ in 0..3 {
            limits.ip(ip).expect("within burst");
        }
        let err = limits.ip(ip).expect_err("over");
        assert_eq!(err.key, ErrorKey::RateLimited);
        assert!(err.params["retry_after"].as_u64().expect("retry_after") >= 1);
    }
}
