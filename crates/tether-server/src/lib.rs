//! The tether server: HTTP API, agent stream and background jobs.
//!
//! [`Server::start`] loads the TLS certificate (if any), opens the store,
//! bootstraps the first admin and binds the listener; [`Server::run`] serves
//! until the shutdown token fires, then ends long-polls with 204, drains
//! connections and flushes batched writes.

pub mod alerts;
pub mod api;
pub mod auth;
pub mod clock;
mod conn;
mod deliveries;
pub mod error;
mod fsutil;
mod group_commit;
mod heartbeats;
mod jobs;
pub mod keys;
pub mod limits;
pub mod pki;
mod results;
pub mod state;
pub mod stream;
pub mod tls;
pub mod web;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tether_store::{AuditEntry, CountingStore, FirstAdmin, Location, OpenOptions, Store};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::auth::jwt::AccessTokens;
use crate::auth::secret::{API_TOKEN_PREFIX, hash_token, new_password, new_token};
use crate::clock::{Clock, SystemClock};
pub use crate::state::ServerConfig;
use crate::state::{AppState, ClientAddr, Inner};
use crate::stream::nats::{NatsNotifier, NatsTasks};
use crate::stream::{LocalNotifier, Notifier, Streams};

/// How long shutdown waits for open connections before giving up on them…
const DRAIN_TIMEOUT: Duration = Duration::from_secs(7);
/// …and then for the jobs' last writes (batched `last_seen`, heartbeats, results, deliveries),
/// so the whole shutdown stays within 10 s (protocol.md §11).
const JOBS_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the bootstrap admin API token lives (docs/decisions.md): long
/// enough for a first session, short enough that a forgotten
/// `initial-admin.txt` stops being a key to the fleet.
pub const BOOTSTRAP_TOKEN_TTL_MS: i64 = 24 * 3600 * 1000;

/// The file in the data dir that receives the first admin's credentials.
pub const INITIAL_ADMIN_FILE: &str = "initial-admin.txt";

/// Credentials created on first start. They are written to
/// `<data-dir>/initial-admin.txt` (0600); the binary prints them only to a
/// terminal.
#[derive(Clone, Default)]
pub struct Bootstrap {
    /// Set when the admin password was generated (not given by `TETHER_ADMIN_PASSWORD`).
    pub admin_password: Option<String>,
    pub admin_token: Option<String>,
    /// When `admin_token` expires (Unix ms).
    pub admin_token_expires_at: Option<i64>,
    /// The file the credentials were written to (set on first start).
    pub file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Bootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bootstrap")
            .field("admin_password", &self.admin_password.as_ref().map(|_| "<redacted>"))
            .field("admin_token", &self.admin_token.as_ref().map(|_| "<redacted>"))
            .field("admin_token_expires_at", &self.admin_token_expires_at)
            .field("file", &self.file)
            .finish()
    }
}

pub struct Server {
    state: AppState,
    listener: TcpListener,
    /// Set when serving HTTPS (`ServerConfig::tls`).
    tls: Option<TlsAcceptor>,
    /// The NATS publisher and subscriber, started with the server.
    nats: Option<NatsTasks>,
    /// Taken by the heartbeat writer when the server runs.
    heartbeat_queue: heartbeats::HeartbeatQueue,
    /// Taken by the result writer when the server runs.
    result_queue: results::ResultQueue,
    /// Taken by the delivery writer when the server runs.
    delivery_queue: deliveries::DeliveryQueue,
    /// The webhook and its queue, when one is configured.
    alert_queue: Option<(alerts::WebhookTarget, alerts::AlertQueue)>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("state", &self.state)
            .field("listener", &self.listener)
            .field("tls", &self.tls.is_some())
            .field("nats", &self.nats.is_some())
            .finish()
    }
}

/// Runs hyper's HTTP/2 stream tasks on the server's task tracker, so that
/// shutdown waits for them like for every other task it owns.
#[derive(Debug, Clone)]
struct TrackedExecutor(TaskTracker);

impl<F> hyper::rt::Executor<F> for TrackedExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.spawn(fut);
    }
}

/// Creates the data dir (0700) if needed; an existing one is set to 0700
/// with a warning.
fn ensure_data_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    fsutil::ensure_private_dir(dir).with_context(|| format!("creating data dir {}", dir.display()))
}

/// Creates the `admin` user and an admin API token (expiring after
/// [`BOOTSTRAP_TOKEN_TTL_MS`]) when the store has no users, and writes both to
/// `<data-dir>/initial-admin.txt` (0600). When several servers start on an
/// empty shared database at once, one creates the admin and writes the
/// file; the others find it done.
async fn bootstrap_admin(
    store: &dyn Store,
    clock: &dyn Clock,
    data_dir: &std::path::Path,
    admin_password: Option<String>,
) -> anyhow::Result<Bootstrap> {
    if !store.list_users().await?.is_empty() {
        return Ok(Bootstrap::default());
    }
    let generated = admin_password.is_none();
    let password = admin_password.unwrap_or_else(new_password);
    let hash = auth::password::hash_off_thread(&password).await?;
    let now = clock.now_ms();
    let token = new_token(API_TOKEN_PREFIX);
    let expires_at = now + BOOTSTRAP_TOKEN_TTL_MS;
    let path = data_dir.join(INITIAL_ADMIN_FILE);
    let bootstrap = Bootstrap {
        admin_password: generated.then_some(password),
        admin_token: Some(token.clone()),
        admin_token_expires_at: Some(expires_at),
        file: Some(path.clone()),
    };
    // The file first: if the store write below fails, the next start finds no
    // users and overwrites it; the other order could lose the credentials.
    fsutil::write_private(&path, initial_admin_text(&bootstrap, now).as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    let admin = FirstAdmin {
        username: "admin".into(),
        password_hash: hash,
        token_hash: hash_token(&token),
        token_expires_at: expires_at,
        now,
    };
    let details = serde_json::json!({"username": "admin", "token_expires_at": expires_at});
    let audit = AuditEntry::system("tether", "user.bootstrap", String::new(), details, now);
    if store.create_first_admin(admin, audit).await?.is_none() {
        // Another server sharing the database got there first: these
        // credentials were never stored.
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        return Ok(Bootstrap::default());
    }
    tracing::info!(file = %path.display(), "Created the admin user and its first API token");
    Ok(bootstrap)
}

/// Opens the existing store of a server configured as `config`, sets a new
/// random password for `admin` (ending its sessions, in one transaction with
/// the audit row) and returns the password, to be shown once.
pub async fn reset_admin(config: &ServerConfig) -> anyhow::Result<String> {
    let location = Location::new(config.database_url.as_deref(), &config.data_dir)?;
    let options = OpenOptions { create: false, max_connections: 2 };
    let store = tether_store::open(&location, &options).await?;
    let password = auth::secret::new_password();
    let hash = auth::password::hash_off_thread(&password).await?;
    let now = SystemClock.now_ms();
    let details = serde_json::json!({"sessions_ended": true});
    let audit = AuditEntry::system("reset-admin", "user.reset_password", "admin".into(), details, now);
    store.set_password("admin", &hash, now, audit).await.context("setting the admin password")?;
    Ok(password)
}

/// Creates the server's CA on first start (protocol.md §7); several
/// servers starting on an empty shared database agree on one.
async fn ensure_ca(store: &dyn Store, sealer: &pki::Sealer, now: i64) -> anyhow::Result<()> {
    if store.list_cas().await?.iter().any(|ca| ca.active) {
        return Ok(());
    }
    let ca = store.ensure_ca(pki::new_ca(sealer, now)?).await.context("creating the server's CA")?;
    tracing::info!(serial = %ca.serial, "The server's CA is ready");
    Ok(())
}

fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("{ms} ms after the Unix epoch"))
}

/// The contents of `initial-admin.txt`: `key: value` lines under comments.
fn initial_admin_text(bootstrap: &Bootstrap, now: i64) -> String {
    let password = bootstrap.admin_password.as_deref().unwrap_or("(the one given in TETHER_ADMIN_PASSWORD)");
    let token = bootstrap.admin_token.as_deref().unwrap_or_default();
    let expires = bootstrap.admin_token_expires_at.map(rfc3339).unwrap_or_default();
    format!(
        "# The first admin of this tether server, created {created}.\n\
         # Delete this file after the first login (`tether login`); create your own\n\
         # API tokens with `tether tokens create`. The token below expires at {expires}.\n\
         # A new admin password: `tether server reset-admin`.\n\
         user: admin\n\
         password: {password}\n\
         api_token: {token}\n\
         api_token_expires_at: {expires}\n",
        created = rfc3339(now),
    )
}

impl Server {
    /// Opens the store, bootstraps the first admin and binds the listener.
    pub async fn start(mut config: ServerConfig, admin_password: Option<String>) -> anyhow::Result<(Self, Bootstrap)> {
        // First, so that a bad certificate fails before anything is created on disk.
        let tls = config.tls.as_ref().map(tls::acceptor).transpose()?;
        if tls.is_some() {
            // A cookie that could leak over plain HTTP would defeat the point of TLS.
            config.secure_cookies = true;
        }
        ensure_data_dir(&config.data_dir)?;
        let location = Location::new(config.database_url.as_deref(), &config.data_dir)?;
        if config.nats_url.is_some() && !location.shared() {
            anyhow::bail!("--nats-url connects servers that share a database: it needs --database-url postgres://…");
        }
        let options = OpenOptions { create: true, max_connections: config.database_max_connections };
        // The process-wide metrics recorder, before anything records (`/metrics`).
        api::prometheus::handle();
        let (store, store_calls) = CountingStore::new(tether_store::open(&location, &options).await?);
        let store: Arc<dyn Store> = Arc::new(store);
        let jwt = keys::load(store.as_ref(), &config.data_dir, config.master_key.as_ref(), keys::JWT_KEY).await?;
        let tokens = AccessTokens::new(&jwt);
        let material =
            keys::load(store.as_ref(), &config.data_dir, config.master_key.as_ref(), pki::MATERIAL_KEY).await?;
        let sealer = pki::Sealer::new(&material);
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let bootstrap = bootstrap_admin(store.as_ref(), clock.as_ref(), &config.data_dir, admin_password).await?;
        ensure_ca(store.as_ref(), &sealer, clock.now_ms()).await?;
        let listener = TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
        let streams = Arc::new(Streams::default());
        let (notifier, nats): (Arc<dyn Notifier>, _) = match &config.nats_url {
            Some(url) => {
                let (notifier, tasks) = NatsNotifier::connect(url, &config.cluster, streams.clone()).await?;
                (notifier, Some(tasks))
            }
            None => (Arc::new(LocalNotifier(streams.clone())), None),
        };
        tracing::info!(store = %location, nats = nats.is_some(), "Store opened");
        let (heartbeats, heartbeat_queue) = heartbeats::channel();
        let (results, result_queue) = results::channel();
        let (deliveries, delivery_queue) = deliveries::channel();
        let (alerts, alert_queue) = match &config.telemetry.webhook {
            Some(target) => {
                let (alerts, queue) = alerts::channel();
                (alerts, Some((target.clone(), queue)))
            }
            None => (alerts::Alerts::none(), None),
        };
        let state = AppState(Arc::new(Inner {
            store,
            store_calls,
            notifier,
            streams,
            tokens,
            sealer,
            limits: limits::Limits::new(config.limits.clone()),
            nonces: auth::signing::NonceCache::new(config.max_remembered_nonces, config.limits.nonce_quota()),
            agent_keys: Default::default(),
            passwords: auth::password::PasswordChecks::new(
                config.limits.password_checks_at_once,
                std::time::Duration::from_millis(config.limits.password_check_wait_ms),
            ),
            clock,
            config,
            shutdown: CancellationToken::new(),
            readiness: Default::default(),
            open_connections: Default::default(),
            heartbeats,
            results,
            deliveries,
            alerts,
            fleet_gauges: Default::default(),
            event_streams: Arc::new(tokio::sync::Semaphore::new(api::MAX_EVENT_STREAMS)),
        }));
        Ok((Self { state, listener, tls, nats, heartbeat_queue, result_queue, delivery_queue, alert_queue }, bootstrap))
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// `https://addr` when serving TLS, else `http://addr`.
    pub fn url(&self) -> std::io::Result<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        Ok(format!("{scheme}://{}", self.local_addr()?))
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// A single-use enrollment token (10 minutes) for an agent started
    /// beside this server by `tether up`: made without operator
    /// credentials, audited as the system's.
    pub async fn local_enroll_token(&self, labels: tether_proto::Labels) -> anyhow::Result<String> {
        let token = new_token(auth::secret::ENROLL_TOKEN_PREFIX);
        let now = self.state.clock.now_ms();
        let id = uuid::Uuid::now_v7().to_string();
        let details = serde_json::json!({"uses": 1, "for": "the local agent"});
        let audit = AuditEntry::system("tether up", "enroll_token.create", id.clone(), details, now);
        let new = tether_store::NewEnrollToken {
            id,
            token_hash: hash_token(&token),
            labels,
            uses: 1,
            created_by: "tether up".into(),
            expires_at: now + 600_000,
        };
        self.state.store.create_enroll_token(new, now, audit).await?;
        Ok(token)
    }

    /// Serves until `shutdown` is cancelled, then drains and returns.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self { state, listener, tls, nats, heartbeat_queue, result_queue, delivery_queue, alert_queue } = self;
        let app = api::routes(state.clone())
            .layer(tower_http::catch_panic::CatchPanicLayer::new())
            .layer(error::EnvelopeLayer);
        let jobs = TaskTracker::new();
        let stop_jobs = CancellationToken::new();
        jobs.spawn(jobs::sweeper(state.clone(), state.config.sweep_interval, stop_jobs.clone()));
        jobs.spawn(jobs::retention(state.clone(), state.config.retention_interval, stop_jobs.clone()));
        jobs.spawn(jobs::cert_expiry(state.clone(), state.config.cert_expiry_interval, stop_jobs.clone()));
        jobs.spawn(jobs::flush_seen(state.clone(), state.config.seen_flush_interval, stop_jobs.clone()));
        jobs.spawn(heartbeats::run(state.store.clone(), heartbeat_queue, stop_jobs.clone()));
        jobs.spawn(results::run(state.store.clone(), result_queue, stop_jobs.clone()));
        jobs.spawn(deliveries::run(state.store.clone(), state.clock.clone(), delivery_queue, stop_jobs.clone()));
        jobs.spawn(jobs::presence(state.clone(), state.config.telemetry.presence_interval, stop_jobs.clone()));
        if let Some((target, queue)) = alert_queue {
            jobs.spawn(alerts::deliver(target, queue, stop_jobs.clone()));
        }
        if state.store.kind().shared() {
            jobs.spawn(jobs::catch_up(state.clone(), stop_jobs.clone()));
        }
        if let Some(nats) = nats {
            nats.spawn(&jobs, stop_jobs.clone());
        }

        // Plain connections are HTTP/1.1 only: the auto builder costs memory
        // on every parked long-poll (docs/decisions.md). Over TLS the
        // protocol ALPN chose is served explicitly: hyper-util's auto
        // builder would sniff the first bytes with no timeout.
        let limits = state.config.connections.clone();
        let mut http1 = hyper::server::conn::http1::Builder::new();
        // The header timer runs from the accept (and from the end of each
        // response), so it also closes silent and idle keep-alive connections.
        http1.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(limits.header);
        let mut http2 = hyper::server::conn::http2::Builder::new(TrackedExecutor(jobs.clone()));
        http2
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(limits.h2_ping)
            .keep_alive_timeout(limits.h2_ping);
        let max_connections = state.config.max_connections.unwrap_or_else(conn::default_max_connections);
        let open = state.open_connections.clone();
        // HTTP/2 connections are drained by hyper-util's watcher; HTTP/1.1
        // ones (which may upgrade to a WebSocket, which it cannot watch) by
        // `serve_http1`, each in a task of `http1_conns`.
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let http1_conns = TaskTracker::new();
        tracing::info!(addr = %listener.local_addr()?, tls = tls.is_some(), "Server listening");
        loop {
            let (tcp, addr) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "Accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let Some(slot) = conn::Slot::take(&open, max_connections) else {
                // Over the cap: answer 503 and close, so the file limit is never
                // reached and the connections already open keep being served.
                tracing::debug!(%addr, max_connections, "Connection refused: too many open");
                if tls.is_none() {
                    jobs.spawn(conn::refuse(tcp));
                }
                // Over TLS a plain answer would be garbage, and a handshake is
                // the work the cap saves: the connection is just closed.
                continue;
            };
            let slot = conn::ConnSlot::new(slot);
            let stall = limits.body_stall;
            let request_slot = slot.clone();
            let svc = TowerToHyperService::new(app.clone().map_request(
                move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ClientAddr(addr));
                    // Only an upgrade outlives its connection task; parked polls stay lean.
                    if req.headers().contains_key(axum::http::header::UPGRADE) {
                        req.extensions_mut().insert(request_slot.clone());
                    }
                    req.map(|body| axum::body::Body::new(conn::StallBody::new(body, stall)))
                },
            ));
            match &tls {
                None => {
                    let conn = http1.serve_connection(TokioIo::new(tcp), svc).with_upgrades();
                    let draining = state.shutdown.clone();
                    http1_conns.spawn(async move {
                        serve_http1(conn, draining).await;
                        drop(slot);
                    });
                }
                Some(acceptor) => {
                    // The handshake runs in the connection's own task so a slow
                    // client cannot stall the accept loop; the watcher makes
                    // shutdown wait for a connection still in its handshake.
                    let handshake = tls_handshake(acceptor.clone(), tcp, addr, limits.tls_handshake, shutdown.clone());
                    let (http1, http2, watcher) = (http1.clone(), http2.clone(), graceful.watcher());
                    let first_bytes = limits.header;
                    let draining = state.shutdown.clone();
                    http1_conns.spawn(async move {
                        let _slot = slot;
                        let Some(stream) = handshake.await else { return };
                        if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                            let io = TokioIo::new(conn::FirstBytesDeadline::new(stream, first_bytes));
                            let _ = watcher.watch(http2.serve_connection(io, svc)).await;
                        } else {
                            // No ALPN or `http/1.1`: the header timeout bounds a silent client.
                            serve_http1(http1.serve_connection(TokioIo::new(stream), svc).with_upgrades(), draining)
                                .await;
                        }
                    });
                }
            }
        }
        drop(listener);
        // Waiting polls answer 204 now; then connections close as they go idle.
        state.shutdown.cancel();
        http1_conns.close();
        let drained = async {
            graceful.shutdown().await;
            http1_conns.wait().await;
        };
        if tokio::time::timeout(DRAIN_TIMEOUT, drained).await.is_err() {
            tracing::warn!("Connections still open after the drain timeout");
        }
        stop_jobs.cancel();
        jobs.close();
        if tokio::time::timeout(JOBS_TIMEOUT, jobs.wait()).await.is_err() {
            tracing::warn!("Background jobs still running after the shutdown timeout");
        }
        tracing::info!("Server stopped");
        Ok(())
    }
}

/// Serves one HTTP/1.1 connection; once `draining` is cancelled it finishes
/// the request in flight and closes. An upgraded connection (a WebSocket)
/// ends here; its socket lives on in its own task, which watches the same
/// token.
async fn serve_http1<C>(conn: C, draining: CancellationToken)
where
    C: std::future::Future<Output = Result<(), hyper::Error>> + GracefulHttp1,
{
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        () = draining.cancelled() => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// hyper's upgradeable HTTP/1.1 connection, which hyper-util's graceful
/// watcher does not take.
trait GracefulHttp1 {
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>);
}

impl<I, S, B> GracefulHttp1 for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(self);
    }
}

/// Completes the TLS handshake, or gives up on this one connection: a failed
/// handshake (a scanner, plain HTTP sent to the TLS port, an untrusted
/// certificate on the client side) is the client's problem, logged at debug.
async fn tls_handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: std::net::SocketAddr,
    within: Duration,
    shutdown: CancellationToken,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    // A client that never finishes the handshake must not hold a task and a socket forever.
    let handshake = tokio::time::timeout(within, acceptor.accept(tcp));
    tokio::select! {
        _ = shutdown.cancelled() => None,
        done = handshake => match done {
            Ok(Ok(stream)) => Some(stream),
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                None
            }
        },
    }
}
