//! The tether server: HTTP API, agent stream and background jobs.
//!
//! [`Server::start`] opens the store, bootstraps the first admin and binds
//! the listener; [`Server::run`] serves until the shutdown token fires, then
//! ends long-polls with 204, drains connections and flushes batched writes.

pub mod api;
pub mod auth;
pub mod clock;
pub mod error;
mod fsutil;
mod jobs;
pub mod limits;
pub mod state;
pub mod stream;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tether_store::{Role, SqliteStore, Store};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::auth::jwt::AccessTokens;
use crate::auth::secret::{API_TOKEN_PREFIX, hash_token, new_password, new_token};
use crate::clock::{Clock, SystemClock};
pub use crate::state::ServerConfig;
use crate::state::{AppState, ClientAddr, Inner};
use crate::stream::{LocalNotifier, Streams};

/// How long shutdown waits for open connections before giving up on them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Credentials created on first start; shown to the operator once.
#[derive(Clone, Default)]
pub struct Bootstrap {
    /// Set when the admin password was generated (not given by `TETHER_ADMIN_PASSWORD`).
    pub admin_password: Option<String>,
    pub admin_token: Option<String>,
}

impl std::fmt::Debug for Bootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bootstrap")
            .field("admin_password", &self.admin_password.as_ref().map(|_| "<redacted>"))
            .field("admin_token", &self.admin_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Debug)]
pub struct Server {
    state: AppState,
    listener: TcpListener,
}

/// Creates the data dir (0700) if needed.
fn ensure_data_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating data dir {}", dir.display()))
}

/// Creates the `admin` user and an admin API token when the store has no users.
async fn bootstrap_admin(
    store: &dyn Store,
    clock: &dyn Clock,
    admin_password: Option<String>,
) -> anyhow::Result<Bootstrap> {
    if store.user_count().await? > 0 {
        return Ok(Bootstrap::default());
    }
    let generated = admin_password.is_none();
    let password = admin_password.unwrap_or_else(new_password);
    let hash = tokio::task::spawn_blocking({
        let password = password.clone();
        move || auth::password::hash_password(&password)
    })
    .await?;
    let now = clock.now_ms();
    let admin = store.create_user("admin", &hash, Role::Admin, now).await?;
    let token = new_token(API_TOKEN_PREFIX);
    store.create_api_token(&admin.id, "bootstrap", hash_token(&token), None, now).await?;
    tracing::info!("Created the admin user and its first API token");
    Ok(Bootstrap { admin_password: generated.then_some(password), admin_token: Some(token) })
}

impl Server {
    /// Opens the store, bootstraps the first admin and binds the listener.
    pub async fn start(config: ServerConfig, admin_password: Option<String>) -> anyhow::Result<(Self, Bootstrap)> {
        ensure_data_dir(&config.data_dir)?;
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&config.data_dir).await.context("opening the store")?);
        let tokens = AccessTokens::load_or_create(&config.data_dir).context("loading the token signing key")?;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let bootstrap = bootstrap_admin(store.as_ref(), clock.as_ref(), admin_password).await?;
        let listener = TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
        let streams = Arc::new(Streams::default());
        let state = AppState(Arc::new(Inner {
            store,
            notifier: Arc::new(LocalNotifier(streams.clone())),
            streams,
            tokens,
            limits: limits::Limits::new(config.limits.clone()),
            nonces: auth::signing::NonceCache::new(config.max_remembered_nonces),
            clock,
            config,
            shutdown: CancellationToken::new(),
        }));
        Ok((Self { state, listener }, bootstrap))
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` is cancelled, then drains and returns.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self { state, listener } = self;
        let app = api::routes(state.clone())
            .layer(tower_http::catch_panic::CatchPanicLayer::new())
            .layer(error::EnvelopeLayer);
        let jobs = TaskTracker::new();
        let stop_jobs = CancellationToken::new();
        jobs.spawn(jobs::sweeper(state.clone(), state.config.sweep_interval, stop_jobs.clone()));
        jobs.spawn(jobs::retention(state.clone(), state.config.retention_interval, stop_jobs.clone()));
        jobs.spawn(jobs::flush_seen(state.clone(), state.config.seen_flush_interval, stop_jobs.clone()));

        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(hyper_util::rt::TokioTimer::new());
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        tracing::info!(addr = %listener.local_addr()?, "Server listening");
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
            let svc = app.clone().map_request(move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ClientAddr(addr));
                req
            });
            let conn = builder.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(svc));
            let conn = graceful.watch(conn);
            jobs.spawn(async move {
                let _ = conn.await;
            });
        }
        drop(listener);
        // Waiting polls answer 204 now; then connections close as they go idle.
        state.shutdown.cancel();
        if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await.is_err() {
            tracing::warn!("Connections still open after the drain timeout");
        }
        stop_jobs.cancel();
        jobs.close();
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, jobs.wait()).await;
        tracing::info!("Server stopped");
        Ok(())
    }
}
