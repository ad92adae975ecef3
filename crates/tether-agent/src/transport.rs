//! Which transport carries the stream (protocol.md §9, §12): the WebSocket
//! where it works, long-poll where it does not, and back again. Pure
//! decisions: the daemon does the I/O and supplies the time and the
//! randomness, so every rule here is tested without a network or a clock.
//!
//! With `transport = "auto"` a refused upgrade (an answer other than 101
//! that is not the server's own "later" or "refresh" — a proxy's 400, 404,
//! 405, 426 or 502, a route this server does not have), an upgrade cut
//! off, or three short-lived connections in a row mean "not here":
//! long-poll for five minutes (plus up to one of jitter), then try the
//! WebSocket again. Three failed connects in a row mean "not here" only
//! when HTTP gets through ([`Next::Probe`]): a server that is restarting
//! refuses both, and its agents should come back on the WebSocket.

use std::time::{Duration, Instant};

use serde::Deserialize;
use tether_client::ClientError;
use tether_client::ws::{ReconnectPolicy, WsError};
use tether_proto::ErrorKey;

use crate::session::{Failure, classify};

/// Failed connects and connections that broke within [`STABLE_AFTER`], in
/// a row, before `auto` falls back to long-poll.
pub const FALLBACK_AFTER: u32 = 3;
/// A connection up this long was not "breaking within seconds": the
/// reconnect window starts over.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// After a fallback, long-poll this long (plus up to [`RETRY_JITTER`]) before
/// trying the WebSocket again.
pub const RETRY_WEBSOCKET_AFTER: Duration = Duration::from_secs(300);
/// Spreads the return of a fleet that fell back at one moment (a proxy change).
pub const RETRY_JITTER: Duration = Duration::from_secs(60);
/// A 4401 this soon after a refresh is not an expired token: a refresh
/// would not help, and refreshing in a loop would trip the refresh limit.
pub const REFRESH_AT_MOST_EVERY: Duration = Duration::from_secs(60);

/// The `transport` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum Transport {
    /// The WebSocket, falling back to long-poll where it does not work.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    /// Only the WebSocket: reconnect however often it fails.
    #[serde(rename = "websocket")]
    WebSocket,
    /// Only long-poll (what agents did before the WebSocket).
    #[serde(rename = "long-poll")]
    LongPoll,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::WebSocket => "websocket",
            Self::LongPoll => "long-poll",
        }
    }
}

impl std::str::FromStr for Transport {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "websocket" => Ok(Self::WebSocket),
            "long-poll" => Ok(Self::LongPoll),
            _ => Err(format!("expected auto, websocket or long-poll, got {s:?}")),
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The transport carrying the stream at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InUse {
    WebSocket,
    LongPoll,
}

impl InUse {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WebSocket => "websocket",
            Self::LongPoll => "long-poll",
        }
    }
}

/// What to do after a WebSocket attempt failed or a connection ended.
#[derive(Debug, Clone)]
pub enum Next {
    /// Connect again after this wait.
    Reconnect(Duration),
    /// Refresh the access token, then connect again at once.
    Refresh,
    /// The cursor is outside the retained stream: forget it, resync, connect again.
    Resync,
    /// Long-poll until then; `why` is for the log.
    FallBack { until: Instant, why: String },
    /// Connecting failed repeatedly: find out whether HTTP reaches the
    /// server, and say so with [`Switch::probed`].
    Probe { why: String },
    /// Stop the agent.
    Stop(Failure),
}

/// How a failed connect counts.
enum Refusal {
    /// The server itself says "later" (429, its own 503): the WebSocket works.
    Later,
    /// This path does not upgrade (a proxy, a server without the route).
    NotHere(String),
    /// Nothing answered (refused, TLS, timeout): maybe the server is restarting.
    Unreachable(String),
}

/// The transport decisions of one stream loop.
#[derive(Debug)]
pub struct Switch {
    setting: Transport,
    policy: ReconnectPolicy,
    /// Reconnects since the last connection that stayed up: sizes the jitter window.
    attempt: u32,
    /// Failed connects and short-lived connections in a row.
    strikes: u32,
    /// `auto` after a fallback: long-poll until then.
    long_poll_until: Option<Instant>,
    last_refresh: Option<Instant>,
}

impl Switch {
    pub fn new(setting: Transport, policy: ReconnectPolicy) -> Self {
        Self { setting, policy, attempt: 0, strikes: 0, long_poll_until: None, last_refresh: None }
    }

    pub fn setting(&self) -> Transport {
        self.setting
    }

    /// The transport to use now.
    pub fn in_use(&self, now: Instant) -> InUse {
        match self.setting {
            Transport::LongPoll => InUse::LongPoll,
            Transport::WebSocket => InUse::WebSocket,
            Transport::Auto if self.long_poll_until.is_some_and(|until| now < until) => InUse::LongPoll,
            Transport::Auto => InUse::WebSocket,
        }
    }

    /// Opening the WebSocket failed with `e`; `unit` is uniform in [0, 1).
    pub fn connect_failed(&mut self, e: &ClientError, now: Instant, unit: f64) -> Next {
        if let Some(next) = self.by_key(e, now) {
            return next;
        }
        let retry_after = e.retry_after().map(Duration::from_secs);
        match refusal(e) {
            Refusal::Later => self.reconnect(retry_after, unit),
            Refusal::NotHere(why) => self.fall_back(now, why, unit),
            Refusal::Unreachable(why) => {
                self.strikes = self.strikes.saturating_add(1);
                if self.strikes >= FALLBACK_AFTER && self.setting == Transport::Auto {
                    return Next::Probe { why };
                }
                self.reconnect(retry_after, unit)
            }
        }
    }

    /// The answer to [`Next::Probe`]: whether an HTTP request reached the
    /// server (any HTTP answer counts). If it did, the WebSocket is what
    /// does not get through (a proxy only HTTP may use): long-poll. If not,
    /// the server is away for both: keep reconnecting, paced as ever.
    pub fn probed(&mut self, http_works: bool, why: String, now: Instant, unit: f64) -> Next {
        if http_works {
            return self.fall_back(now, why, unit);
        }
        self.reconnect(None, unit)
    }

    /// A connection that was up for `lived` ended with `e`.
    pub fn closed(&mut self, e: &ClientError, lived: Duration, now: Instant, unit: f64) -> Next {
        if lived >= STABLE_AFTER {
            self.attempt = 0;
            self.strikes = 0;
        }
        if let Some(next) = self.by_key(e, now) {
            return next;
        }
        let retry_after = e.retry_after().map(Duration::from_secs);
        if lived < STABLE_AFTER {
            let why = format!("connections break within seconds ({})", e.detail());
            return self.strike(now, why, retry_after, unit);
        }
        self.reconnect(retry_after, unit)
    }

    /// The keys that mean the same on both transports.
    fn by_key(&mut self, e: &ClientError, now: Instant) -> Option<Next> {
        match e.key()? {
            ErrorKey::DeviceRevoked => Some(Next::Stop(classify(e))),
            ErrorKey::CursorExpired => Some(Next::Resync),
            ErrorKey::TokenExpired if self.last_refresh.is_none_or(|at| now >= at + REFRESH_AT_MOST_EVERY) => {
                self.last_refresh = Some(now);
                Some(Next::Refresh)
            }
            _ => None,
        }
    }

    fn strike(&mut self, now: Instant, why: String, retry_after: Option<Duration>, unit: f64) -> Next {
        self.strikes = self.strikes.saturating_add(1);
        if self.strikes >= FALLBACK_AFTER {
            return self.fall_back(now, why, unit);
        }
        self.reconnect(retry_after, unit)
    }

    fn reconnect(&mut self, retry_after: Option<Duration>, unit: f64) -> Next {
        let delay = self.policy.delay(self.attempt, unit).max(retry_after.unwrap_or_default());
        self.attempt = self.attempt.saturating_add(1);
        Next::Reconnect(delay)
    }

    fn fall_back(&mut self, now: Instant, why: String, unit: f64) -> Next {
        if self.setting != Transport::Auto {
            // `websocket` was asked for: keep trying, paced like any reconnect.
            return self.reconnect(None, unit);
        }
        self.attempt = 0;
        self.strikes = 0;
        let until = now + RETRY_WEBSOCKET_AFTER + RETRY_JITTER.mul_f64(unit.clamp(0.0, 1.0));
        self.long_poll_until = Some(until);
        Next::FallBack { until, why }
    }
}

fn refusal(e: &ClientError) -> Refusal {
    match e {
        ClientError::Api { status: 429 | 503, .. } => Refusal::Later,
        ClientError::Api { status, body, .. } => {
            Refusal::NotHere(format!("the upgrade was refused with {status} {}: {}", body.key, body.what))
        }
        ClientError::Unexpected { status, .. } => {
            Refusal::NotHere(format!("the upgrade was answered with {status}, not 101 (a proxy?)"))
        }
        ClientError::WebSocket(WsError::Upgrade(_) | WsError::Protocol(_)) => {
            Refusal::NotHere(format!("the upgrade did not complete ({})", e.detail()))
        }
        other => Refusal::Unreachable(format!("cannot connect ({})", other.detail())),
    }
}

#[cfg(test)]
mod tests {
    use tether_proto::ErrorBody;

    use super::*;

    fn api(status: u16, key: ErrorKey, retry_after: Option<u64>) -> ClientError {
        let body = ErrorBody {
            code: key.code(),
            key: key.as_str().into(),
            what: "why".into(),
            params: Default::default(),
            request_id: String::new(),
        };
        ClientError::Api { status, body: Box::new(body), retry_after }
    }

    fn refused_connect() -> ClientError {
        WsError::Connect(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)).into()
    }

    fn going_away() -> ClientError {
        tether_client::ws::close_error(Some(1001), "restarting")
    }

    fn auto() -> Switch {
        Switch::new(Transport::Auto, ReconnectPolicy::default())
    }

    #[test]
    fn the_setting_parses_from_the_three_names_only() {
        assert_eq!("auto".parse(), Ok(Transport::Auto));
        assert_eq!("WebSocket".parse(), Ok(Transport::WebSocket));
        assert_eq!(" long-poll ".parse(), Ok(Transport::LongPoll));
        assert!("longpoll".parse::<Transport>().expect_err("unknown").contains("auto, websocket or long-poll"));
        for t in [Transport::Auto, Transport::WebSocket, Transport::LongPoll] {
            assert_eq!(t.as_str().parse(), Ok(t));
        }
    }

    #[test]
    fn auto_prefers_the_websocket_and_long_poll_means_long_poll() {
        let now = Instant::now();
        assert_eq!(auto().in_use(now), InUse::WebSocket);
        assert_eq!(Switch::new(Transport::LongPoll, ReconnectPolicy::default()).in_use(now), InUse::LongPoll);
    }

    #[test]
    fn a_refused_upgrade_falls_back_at_once_and_the_websocket_is_tried_again_after_five_minutes() {
        let now = Instant::now();
        for refusal in [
            ClientError::Unexpected { status: 502, text: "<html>".into() },
            ClientError::Unexpected { status: 426, text: String::new() },
            ClientError::Unexpected { status: 400, text: String::new() },
            api(404, ErrorKey::NotFound, None),
            api(405, ErrorKey::MethodNotAllowed, None),
            WsError::Upgrade(tokio_tungstenite::tungstenite::Error::ConnectionClosed).into(),
        ] {
            let mut s = auto();
            let Next::FallBack { until, why } = s.connect_failed(&refusal, now, 0.5) else { panic!("{refusal:?}") };
            assert_eq!(until, now + Duration::from_secs(330), "five minutes plus half the jitter");
            assert!(!why.is_empty());
            assert_eq!(s.in_use(now), InUse::LongPoll);
            assert_eq!(s.in_use(now + Duration::from_secs(329)), InUse::LongPoll);
            // "And back again".
            assert_eq!(s.in_use(until), InUse::WebSocket);
        }
    }

    #[test]
    fn the_servers_own_later_is_no_reason_to_fall_back() {
        let now = Instant::now();
        let mut s = auto();
        for _ in 0..10 {
            let Next::Reconnect(d) = s.connect_failed(&api(429, ErrorKey::RateLimited, Some(12)), now, 0.0) else {
                panic!("429 waits")
            };
            assert_eq!(d, Duration::from_secs(12), "Retry-After is a floor");
            assert!(matches!(
                s.connect_failed(&api(503, ErrorKey::ServiceUnavailable, None), now, 0.0),
                Next::Reconnect(_)
            ));
        }
        assert_eq!(s.in_use(now), InUse::WebSocket);
    }

    #[test]
    fn three_quick_breaks_in_a_row_fall_back() {
        let now = Instant::now();
        let mut s = auto();
        assert!(matches!(s.closed(&going_away(), Duration::from_secs(3), now, 0.0), Next::Reconnect(_)));
        assert!(matches!(s.closed(&going_away(), Duration::from_secs(2), now, 0.0), Next::Reconnect(_)));
        let Next::FallBack { why, .. } = s.closed(&going_away(), Duration::from_secs(1), now, 0.0) else { panic!() };
        assert!(why.contains("within seconds"), "{why}");

        // A connection that stayed up clears the count.
        let mut s = auto();
        s.closed(&going_away(), Duration::from_secs(1), now, 0.0);
        s.closed(&going_away(), Duration::from_secs(1), now, 0.0);
        assert!(matches!(s.closed(&going_away(), Duration::from_secs(3600), now, 0.0), Next::Reconnect(_)));
        assert!(matches!(s.closed(&going_away(), Duration::from_secs(1), now, 0.0), Next::Reconnect(_)));
    }

    #[test]
    fn failed_connects_fall_back_only_where_http_gets_through() {
        let now = Instant::now();
        // The server restarts: neither the WebSocket nor HTTP connects, so
        // the agent stays on the WebSocket, reconnecting with wider windows.
        let mut s = auto();
        assert!(matches!(s.connect_failed(&refused_connect(), now, 0.0), Next::Reconnect(_)));
        assert!(matches!(s.connect_failed(&refused_connect(), now, 0.0), Next::Reconnect(_)));
        let Next::Probe { why } = s.connect_failed(&refused_connect(), now, 0.0) else { panic!("probe") };
        assert!(why.contains("refused"), "{why}");
        let Next::Reconnect(wait) = s.probed(false, why, now, 0.999) else { panic!("keeps trying") };
        assert!(wait < Duration::from_secs(5), "{wait:?}");
        let Next::Probe { why } = s.connect_failed(&refused_connect(), now, 0.0) else { panic!("probe again") };
        let Next::Reconnect(wait) = s.probed(false, why, now, 0.999) else { panic!("keeps trying") };
        assert!(wait >= Duration::from_secs(7), "the window widens: {wait:?}");
        assert_eq!(s.in_use(now), InUse::WebSocket);
        // Then the server is back: the next connect works and the count starts over.
        assert!(matches!(s.closed(&going_away(), Duration::from_secs(600), now, 0.0), Next::Reconnect(_)));
        assert!(matches!(s.connect_failed(&refused_connect(), now, 0.0), Next::Reconnect(_)));

        // Only the WebSocket is blocked (an HTTP proxy): long-poll.
        let mut s = auto();
        for _ in 0..2 {
            s.connect_failed(&refused_connect(), now, 0.0);
        }
        let Next::Probe { why } = s.connect_failed(&refused_connect(), now, 0.0) else { panic!("probe") };
        assert!(matches!(s.probed(true, why, now, 0.0), Next::FallBack { .. }));
        assert_eq!(s.in_use(now), InUse::LongPoll);
    }

    #[test]
    fn reconnects_after_a_server_restart_are_spread_over_five_seconds_then_widen() {
        let now = Instant::now();
        let mut s = auto();
        // A long-lived connection ends (restart): the first wait is in [0, 5 s).
        let Next::Reconnect(first) = s.closed(&going_away(), Duration::from_secs(600), now, 0.999) else { panic!() };
        assert!(first < Duration::from_secs(5) && first > Duration::from_millis(4900), "{first:?}");
        let Next::Reconnect(low) = auto().closed(&going_away(), Duration::from_secs(600), now, 0.0) else { panic!() };
        assert_eq!(low, Duration::ZERO);
        // `websocket` never falls back; its waits grow to the 30 s cap.
        let mut forced = Switch::new(Transport::WebSocket, ReconnectPolicy::default());
        let waits: Vec<u64> = (0..8)
            .map(|_| match forced.connect_failed(&refused_connect(), now, 0.999_999) {
                Next::Reconnect(d) => d.as_secs(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(waits, [4, 4, 4, 7, 15, 29, 29, 29]);
        assert!(matches!(
            forced.connect_failed(&ClientError::Unexpected { status: 404, text: String::new() }, now, 0.0),
            Next::Reconnect(_)
        ));
        assert_eq!(forced.in_use(now), InUse::WebSocket);
    }

    #[test]
    fn close_codes_and_upgrade_refusals_mean_what_they_mean_over_http() {
        let now = Instant::now();
        let mut s = auto();
        let revoked = tether_client::ws::close_error(Some(4403), "stolen laptop");
        let Next::Stop(Failure::Revoked(message)) = s.closed(&revoked, Duration::from_secs(99), now, 0.0) else {
            panic!()
        };
        assert!(message.contains("stolen laptop"), "{message}");
        assert!(matches!(s.connect_failed(&api(403, ErrorKey::DeviceRevoked, None), now, 0.0), Next::Stop(_)));
        let expired = tether_client::ws::close_error(Some(4409), "");
        assert!(matches!(s.closed(&expired, Duration::from_secs(99), now, 0.0), Next::Resync));
        assert!(matches!(s.connect_failed(&api(409, ErrorKey::CursorExpired, None), now, 0.0), Next::Resync));
        assert_eq!(s.in_use(now), InUse::WebSocket);
    }

    #[test]
    fn an_expired_token_is_refreshed_but_not_in_a_loop() {
        let now = Instant::now();
        let mut s = auto();
        let expired = tether_client::ws::close_error(Some(4401), "token expired");
        assert!(matches!(s.closed(&expired, Duration::from_secs(900), now, 0.0), Next::Refresh));
        // Closed again right after the refresh: refreshing again will not
        // help; it counts as a quick break.
        let later = now + Duration::from_secs(1);
        assert!(matches!(s.closed(&expired, Duration::from_secs(1), later, 0.0), Next::Reconnect(_)));
        // Refused at the upgrade with a fresh token: the WebSocket does not
        // take what HTTP takes, so long-poll it is.
        assert!(matches!(s.connect_failed(&api(401, ErrorKey::TokenExpired, None), later, 0.0), Next::FallBack { .. }));
        let much_later = now + Duration::from_secs(900);
        assert!(matches!(s.closed(&expired, Duration::from_secs(900), much_later, 0.0), Next::Refresh));
    }
}
