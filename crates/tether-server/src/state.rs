//! Shared server state handed to every handler and job.

use std::net::SocketAddr;
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::Arc;

use tether_store::{AuditEntry, Store, StoreCalls};
use tokio_util::sync::CancellationToken;

use crate::auth::jwt::AccessTokens;
use crate::clock::Clock;
use crate::error::RequestId;
use crate::stream::{Notifier, Streams};

/// Settings of a running server (after layering flags, env and file).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// The embedded database, the key files and `initial-admin.txt`.
    pub data_dir: PathBuf,
    /// `postgres://…` (or `sqlite://FILE`) instead of the embedded database
    /// in `data_dir` (protocol.md §13).
    pub database_url: Option<String>,
    /// Most connections one server opens to PostgreSQL.
    pub database_max_connections: u32,
    /// Wraps the server keys kept in PostgreSQL (`TETHER_MASTER_KEY`).
    pub master_key: Option<crate::keys::MasterKey>,
    /// NATS, carrying stream events between servers that share a database.
    pub nats_url: Option<String>,
    /// Scopes this cluster's NATS subjects (`tether.<cluster>.…`).
    pub cluster: String,
    /// How often a server on a shared database catches up from it.
    pub catch_up: CatchUpIntervals,
    /// How often the sweeper expires, loses and releases commands.
    pub sweep_interval: std::time::Duration,
    /// Signals older than this are dropped (protocol.md §8: 7 days)…
    pub signal_max_age: std::time::Duration,
    /// …and at most this many newest are kept per agent (protocol.md §8: 10,000).
    pub signal_max_per_agent: u64,
    /// How often signal retention runs.
    pub retention_interval: std::time::Duration,
    /// Lifetime of an RFC 8628 device code (protocol.md §3: 600 s).
    pub device_code_ttl_s: u64,
    /// Most unexpired device grants waiting for an operator; beyond it
    /// `/oauth/device_authorization` answers 503 `temporarily_unavailable`.
    pub max_pending_device_grants: u64,
    /// Answer the routes of the five seed designs (protocol.md §16, docs/compat.md).
    pub seed_routes: bool,
    /// Mark session cookies `Secure`; [`crate::Server::start`] turns it on
    /// when `tls` is set (it may also be set behind a TLS-terminating proxy).
    pub secure_cookies: bool,
    /// Serve HTTPS with this certificate and key instead of plain HTTP.
    pub tls: Option<crate::tls::TlsFiles>,
    /// Rate limits (protocol.md §11).
    pub limits: crate::limits::LimitConfig,
    /// How often `last_seen` of active agents is written (batched).
    pub seen_flush_interval: std::time::Duration,
    /// Grace for a refresh retry after a lost response (protocol.md §3: 30 s).
    pub refresh_grace_ms: i64,
    /// Refuse agent requests without a valid signature (protocol.md §3). Signed
    /// requests are verified either way.
    pub require_signed_requests: bool,
    /// Most nonces of signed requests remembered at once; beyond it signed
    /// requests get 503 until older nonces leave the 300 s window.
    pub max_remembered_nonces: usize,
    /// Time limits on slow and silent connections (protocol.md §11).
    pub connections: ConnectionTimeouts,
    /// Most connections open at once; beyond it a new connection gets a raw
    /// 503 and is closed. `None`: 90% of the process's open-file limit.
    pub max_connections: Option<usize>,
    /// Largest managed file accepted by `POST /api/v1/files` (protocol.md §7).
    pub max_file_bytes: u64,
    /// Certificates expiring within this many days are flagged and announced.
    pub cert_expiry_warning_days: u32,
    /// How often certificate expiry is checked.
    pub cert_expiry_interval: std::time::Duration,
    /// Liveness, metrics and how long history is kept (protocol.md §8).
    pub telemetry: TelemetryConfig,
}

/// Liveness, metrics and retention (protocol.md §8).
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// An agent not seen for this long is offline. The default is the
    /// protocol's max(3 × heartbeat 30 s, long-poll wait 30 s + 15 s).
    pub offline_after: std::time::Duration,
    /// How often presence is compared with `last_seen` for transitions.
    pub presence_interval: std::time::Duration,
    /// Told of every online/offline transition, when set.
    pub webhook: Option<crate::alerts::WebhookTarget>,
    /// Distinct metric series (name and labels) one agent may create.
    pub max_series_per_agent: u32,
    pub retention: Retention,
}

impl TelemetryConfig {
    /// Agents seen at or after this instant are online at `now` (protocol.md §8).
    pub fn seen_since(&self, now: tether_store::Millis) -> tether_store::Millis {
        now - self.offline_after.as_millis() as tether_store::Millis
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            offline_after: std::time::Duration::from_secs(90),
            presence_interval: std::time::Duration::from_secs(5),
            webhook: None,
            max_series_per_agent: 1_000,
            retention: Retention::default(),
        }
    }
}

/// How long each kind of history is kept (protocol.md §8 defaults).
#[derive(Debug, Clone)]
pub struct Retention {
    pub raw_metrics: std::time::Duration,
    pub hourly_rollups: std::time::Duration,
    pub daily_rollups: std::time::Duration,
    pub finished_commands: std::time::Duration,
    pub audit: std::time::Duration,
}

impl Default for Retention {
    fn default() -> Self {
        let days = |d: u64| std::time::Duration::from_secs(d * 86_400);
        Self {
            raw_metrics: days(7),
            hourly_rollups: days(90),
            daily_rollups: days(400),
            finished_commands: days(30),
            audit: days(730),
        }
    }
}

/// How often a server sharing its database reads what changed there
/// (`jobs::catch_up`): often while NATS is away or not configured, rarely
/// while it carries every event.
#[derive(Debug, Clone)]
pub struct CatchUpIntervals {
    pub without_nats: std::time::Duration,
    pub with_nats: std::time::Duration,
}

impl Default for CatchUpIntervals {
    fn default() -> Self {
        Self { without_nats: std::time::Duration::from_secs(1), with_nats: std::time::Duration::from_secs(10) }
    }
}

/// How long a connection may keep the server waiting (protocol.md §11
/// "Connections"); the defaults are the protocol's.
#[derive(Debug, Clone)]
pub struct ConnectionTimeouts {
    /// From accepting (or the end of the previous response) to the request
    /// headers being complete; over HTTP/2, to the client's first bytes.
    pub header: std::time::Duration,
    /// Longest pause between two pieces of a request body.
    pub body_stall: std::time::Duration,
    /// TLS handshake.
    pub tls_handshake: std::time::Duration,
    /// HTTP/2 keep-alive ping interval; a ping unanswered for as long closes the connection.
    pub h2_ping: std::time::Duration,
}

impl Default for ConnectionTimeouts {
    fn default() -> Self {
        use std::time::Duration;
        Self {
            header: Duration::from_secs(10),
            body_stall: Duration::from_secs(30),
            tls_handshake: Duration::from_secs(10),
            h2_ping: Duration::from_secs(20),
        }
    }
}

impl ServerConfig {
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        Self {
            listen,
            data_dir,
            database_url: None,
            database_max_connections: tether_store::OpenOptions::default().max_connections,
            master_key: None,
            nats_url: None,
            cluster: "default".into(),
            catch_up: CatchUpIntervals::default(),
            sweep_interval: std::time::Duration::from_secs(1),
            seen_flush_interval: std::time::Duration::from_secs(5),
            limits: crate::limits::LimitConfig::default(),
            secure_cookies: false,
            tls: None,
            device_code_ttl_s: 600,
            max_pending_device_grants: 10_000,
            seed_routes: true,
            signal_max_age: std::time::Duration::from_secs(7 * 86_400),
            signal_max_per_agent: 10_000,
            retention_interval: std::time::Duration::from_secs(60),
            refresh_grace_ms: 30_000,
            require_signed_requests: false,
            max_remembered_nonces: 1_000_000,
            connections: ConnectionTimeouts::default(),
            max_connections: None,
            max_file_bytes: 64 * 1024 * 1024,
            cert_expiry_warning_days: 14,
            cert_expiry_interval: std::time::Duration::from_secs(3600),
            telemetry: TelemetryConfig::default(),
        }
    }
}

#[derive(Debug)]
pub struct Inner {
    /// A `CountingStore`: every call is counted in `store_calls`.
    pub store: Arc<dyn Store>,
    /// What proves that idle polls never reach the store.
    pub store_calls: StoreCalls,
    pub streams: Arc<Streams>,
    pub notifier: Arc<dyn Notifier>,
    pub tokens: AccessTokens,
    /// Seals certificate and CA private keys at rest.
    pub sealer: crate::pki::Sealer,
    pub limits: crate::limits::Limits,
    /// Nonces of accepted signed agent requests (per process).
    pub nonces: crate::auth::signing::NonceCache,
    /// Agent keys found in the store, so that their agents' requests skip it.
    pub agent_keys: crate::auth::agent_key::AgentKeys,
    /// Rationed argon2 verifications and the Basic cache (protocol.md §3).
    pub passwords: crate::auth::password::PasswordChecks,
    pub clock: Arc<dyn Clock>,
    pub config: ServerConfig,
    /// Cancelled when the server starts shutting down: waiting polls answer 204.
    pub shutdown: CancellationToken,
    /// The last readiness check, reused for a second (`/readyz`).
    pub readiness: crate::api::health::Readiness,
    /// Client connections open right now (`conn::Slot`s taken), for `/metrics`.
    pub open_connections: Arc<std::sync::atomic::AtomicUsize>,
    /// Commits heartbeats in groups.
    pub heartbeats: crate::heartbeats::HeartbeatWriter,
    /// Commits command results in groups.
    pub results: crate::results::ResultWriter,
    /// Marks delivered commands in groups.
    pub deliveries: crate::deliveries::DeliveryWriter,
    /// The presence webhook's queue (a no-op without a webhook).
    pub alerts: crate::alerts::Alerts,
    /// The agent and command counts `/metrics` shows, read at most every 15 s.
    pub fleet_gauges: crate::api::prometheus::FleetGauges,
    /// Event feeds (`/api/v1/events`) open at once are bounded.
    pub event_streams: Arc<tokio::sync::Semaphore>,
}

#[derive(Debug, Clone)]
pub struct AppState(pub Arc<Inner>);

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// Where a request came from, for audit rows.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// Request facts that audit rows carry.
#[derive(Debug, Clone, Default)]
pub struct AuditContext {
    pub ip: Option<String>,
    pub request_id: Option<String>,
}

/// Passes only while the client IP is within its bucket; put on every
/// unauthenticated route that does real work (protocol.md §11).
#[derive(Debug, Clone, Copy)]
pub struct PublicCaller {
    pub ip: Option<std::net::IpAddr>,
}

impl axum::extract::FromRequestParts<AppState> for PublicCaller {
    type Rejection = crate::error::ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let ip = parts.extensions.get::<ClientAddr>().map(|a| a.0.ip());
        if let Some(ip) = ip {
            state.limits.ip(ip)?;
        }
        Ok(Self { ip })
    }
}

impl AuditContext {
    pub fn from_parts(parts: &axum::http::request::Parts) -> Self {
        Self {
            ip: parts.extensions.get::<ClientAddr>().map(|a| a.0.ip().to_string()),
            request_id: parts.extensions.get::<RequestId>().map(|r| r.0.clone()),
        }
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for AuditContext {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self::from_parts(parts))
    }
}

/// One audit event, described by the handler that caused it.
#[derive(Debug)]
pub struct AuditEvent<'a> {
    pub actor: &'a str,
    pub actor_kind: &'static str,
    pub action: &'a str,
    pub target: String,
    pub outcome: &'static str,
    pub details: serde_json::Value,
}

impl<'a> AuditEvent<'a> {
    /// A successful action by an operator (the common case).
    pub fn by_user(actor: &'a str, action: &'a str, target: String, details: serde_json::Value) -> Self {
        Self { actor, actor_kind: "user", action, target, outcome: "ok", details }
    }
}

impl AppState {
    /// The audit row of a mutation, to hand to the store method that makes
    /// it: the store appends it in the mutation's own transaction.
    pub fn audit_entry(&self, ctx: &AuditContext, event: AuditEvent<'_>) -> AuditEntry {
        AuditEntry {
            ts: self.clock.now_ms(),
            actor: event.actor.to_owned(),
            actor_kind: event.actor_kind,
            action: event.action.to_owned(),
            target: event.target,
            outcome: event.outcome,
            ip: ctx.ip.clone(),
            request_id: ctx.request_id.clone(),
            details: event.details,
        }
    }

    /// Appends an event that changes nothing else (a denial, a failed
    /// login, an agent's report). A failure is logged, not returned. A
    /// mutation passes its row to the store instead ([`Self::audit_entry`]).
    pub async fn audit(&self, ctx: &AuditContext, event: AuditEvent<'_>) {
        let action = event.action;
        let entry = self.audit_entry(ctx, event);
        if let Err(e) = self.store.append_audit(entry).await {
            tracing::error!(error = %e, action, "Audit append failed");
        }
    }
}
