//! The daemon: concurrent loops (stream, executor pool, result spool,
//! heartbeat, host metrics, distributed configuration, managed files,
//! certificates, control socket) sharing one [`Shared`] state, and the
//! lifecycle around them (recovery at start, graceful stop).

use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tether_client::ws::{ReconnectPolicy, WsHandle};
use tether_client::{Client, ClientError, Poll};
use tether_proto::agent::Heartbeat;
use tether_proto::certs::{CertRenewed, CertRevoked};
use tether_proto::command::{CommandStatus, ResultReport};
use tether_proto::config::{ConfigApply, Doc};
use tether_proto::signal::{
    CERT_RENEWED, CERT_REVOKED, COMMAND_CANCELLED, COMMAND_QUEUED, CONFIG_UPDATED, CommandCancelled, CommandQueued,
    FILE_REMOVED, FILE_UPDATED, Signal,
};
use tether_proto::telemetry::MetricBatch;
use tether_proto::{CommandId, ErrorKey};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::config::{self, AgentConfig};
use crate::executor::{self, Builtin, Plan};
use crate::journal::Journal;
use crate::managed::Ctx;
use crate::managed_certs::{self, Events, ManagedCerts, RenewCommand};
use crate::managed_files::ManagedFiles;
use crate::metrics::{self, Collector, CpuMemory, Delivered, MetricSpool};
use crate::remote_config::{self, Applied, Tuning};
use crate::session::{Failure, Session, classify};
use crate::spool::Spool;
use crate::state::{StateDir, off_thread};
use crate::transport::{InUse, Next, Switch, Transport};

/// Signals waiting to run are bounded; the stream stops reading when full.
pub const QUEUE_CAPACITY: usize = 1000;

/// Why the daemon stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// SIGINT/SIGTERM or `once` finished.
    Stopped,
    /// `agent.restart`: exit so the service manager starts us again.
    Restart,
    /// The server revoked this agent (exit code 78: do not restart).
    Revoked(String),
    /// Needs an operator (not enrolled, refresh token rejected, bad state dir).
    Fatal(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Run until stopped.
    Daemon,
    /// One poll (`wait=0`), run what arrived, deliver the results, exit.
    Once,
}

/// A command waiting for an executor slot; higher priority first, then older.
#[derive(Debug)]
struct Queued {
    order: u64,
    cmd: CommandQueued,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        self.order == other.order
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.cmd.priority.cmp(&other.cmd.priority).then(other.order.cmp(&self.order))
    }
}

/// What `tether agent status` prints (the certificate-agent `status --daemon` block, protocol.md §12, §16.4).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub uptime_s: u64,
    pub server: String,
    pub agent_id: String,
    /// The transport carrying the stream now: `websocket` or `long-poll`.
    pub connection: String,
    /// Since when that transport carries it (RFC 3339).
    pub connection_since: Option<String>,
    /// The `transport` setting: `auto`, `websocket` or `long-poll`.
    pub transport: String,
    /// With `auto` on long-poll after a fallback: when the WebSocket is tried again.
    pub websocket_retry_at: Option<String>,
    pub last_poll: Option<String>,
    pub cursor: Option<String>,
    pub poll_wait_s: u32,
    pub next_poll: Option<String>,
    pub retry_after_s: Option<u64>,
    pub consecutive_failures: u32,
    pub circuit_open: bool,
    pub queue_depth: usize,
    pub token_expires_at: Option<String>,
    pub last_signal: Option<String>,
    pub applied_config_hash: Option<String>,
    /// Where the running configuration came from: the server, or the cache
    /// while the server cannot be reached.
    pub config_source: Option<String>,
    /// Why the last configuration from the server was not applied.
    pub config_error: Option<String>,
    pub heartbeat_s: u64,
    pub max_concurrent_commands: usize,
    pub running_commands: Vec<CommandId>,
    pub spooled_results: usize,
    /// Seconds between host metric collections in force (0: none).
    pub metrics_s: u64,
    /// Metric batches waiting for the server in `state/metrics/`.
    pub metrics_spooled: usize,
    /// When the server last took a metric batch.
    pub metrics_last_sent: Option<String>,
}

struct Shared {
    cfg: RwLock<AgentConfig>,
    state: StateDir,
    session: Session,
    journal: Mutex<Journal>,
    spool: Spool,
    queue: Mutex<BinaryHeap<Queued>>,
    queue_order: std::sync::atomic::AtomicU64,
    queue_changed: Notify,
    running: Mutex<HashMap<CommandId, CancellationToken>>,
    /// A command finished or the concurrency limit changed.
    slots_changed: Notify,
    /// What the distributed configuration sets (protocol.md §6).
    tuning: Mutex<Tuning>,
    /// The configuration running now, and the report on the last one received.
    applied: Mutex<Option<Applied>>,
    config_report: Mutex<Option<ConfigApply>>,
    /// A `config.updated` signal (or a resync) says to fetch it again.
    config_changed: Notify,
    /// Send a heartbeat now (a configuration was applied or failed).
    heartbeat_now: Notify,
    /// A configuration was applied: the metrics interval may have changed.
    metrics_changed: Notify,
    /// The newest document for the `post_url` sink.
    post: watch::Sender<Option<Doc>>,
    /// A `file.updated`/`file.removed` signal (or a resync): reconcile the managed files.
    files_changed: Notify,
    /// A certificate signal (or a resync): reconcile the certificates.
    certs_changed: Notify,
    /// Which certificates the signals named.
    cert_events: Mutex<Events>,
    /// `renew NAME` from the control socket, for the certificate loop.
    renewals: mpsc::UnboundedSender<RenewCommand>,
    status: Mutex<Status>,
    /// The open WebSocket, for reports, while the stream runs over it.
    ws: Mutex<Option<WsHandle>>,
    /// The stream loop is waiting for room in the queue, so it reads nothing
    /// from the WebSocket, replies included: reports go over HTTP meanwhile.
    stream_paused: std::sync::atomic::AtomicBool,
    poll_now: Notify,
    spool_changed: Notify,
    exit: Mutex<Option<Exit>>,
    /// Cancelled to stop every loop (signal, fatal error, restart).
    stop: CancellationToken,
    started: Instant,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as i64
}

fn rfc3339_now() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// The wall-clock time `d` from now.
fn rfc3339_in(d: Duration) -> Option<String> {
    let t = time::OffsetDateTime::now_utc().checked_add(time::Duration::try_from(d).ok()?)?;
    t.format(&time::format_description::well_known::Rfc3339).ok()
}

fn rfc3339_from_s(s: u64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp(i64::try_from(s).ok()?).ok()?;
    t.format(&time::format_description::well_known::Rfc3339).ok()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock means a loop panicked mid-update; the data is still usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    fn finish(&self, exit: Exit) {
        let mut slot = lock(&self.exit);
        if slot.is_none() {
            *slot = Some(exit);
        }
        self.stop.cancel();
    }

    fn cfg(&self) -> AgentConfig {
        self.cfg.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The long-poll wait: the distributed configuration's, else the local one.
    fn poll_wait_s(&self) -> u32 {
        lock(&self.tuning).poll_wait_s.unwrap_or_else(|| self.cfg().poll_wait_s)
    }

    fn heartbeat_s(&self) -> u64 {
        lock(&self.tuning).heartbeat_s.unwrap_or_else(|| self.cfg().heartbeat_s)
    }

    fn metrics_s(&self) -> u64 {
        lock(&self.tuning).metrics_s.unwrap_or_else(|| self.cfg().metrics_s)
    }

    fn max_concurrent(&self) -> usize {
        lock(&self.tuning).max_concurrent_commands.unwrap_or_else(|| self.cfg().max_concurrent_commands)
    }

    fn update_status(&self, f: impl FnOnce(&mut Status)) {
        f(&mut lock(&self.status));
    }

    fn queue_len(&self) -> usize {
        lock(&self.queue).len()
    }

    /// Notes the transport in use, and since when when it changed.
    fn set_connection(&self, in_use: InUse) {
        self.update_status(|s| {
            if s.connection != in_use.as_str() || s.connection_since.is_none() {
                if s.connection_since.is_some() {
                    tracing::info!(from = %s.connection, to = in_use.as_str(), "Stream transport changed");
                }
                s.connection = in_use.as_str().into();
                s.connection_since = Some(rfc3339_now());
            }
            if in_use == InUse::WebSocket {
                s.websocket_retry_at = None;
            }
        });
    }

    /// The WebSocket for a report: open, and read by the stream loop (else
    /// the reply would wait behind the signals it does not take).
    fn ws(&self) -> Option<WsHandle> {
        if self.stream_paused.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        lock(&self.ws).clone().filter(WsHandle::is_open)
    }

    /// Sends one report (heartbeat, command status or result) over the
    /// WebSocket while it is up, else over HTTP; over HTTP too when the
    /// socket fails under it (the server may then get it twice, which these
    /// reports allow). An error the server replied with counts like the same
    /// answer over HTTP, except an expired token, which the HTTP path refreshes.
    async fn report<T, W, WF, H, HF>(&self, over_ws: W, over_http: H) -> Result<T, Failure>
    where
        W: FnOnce(WsHandle) -> WF,
        WF: std::future::Future<Output = Result<T, ClientError>>,
        H: Fn(Client) -> HF,
        HF: std::future::Future<Output = Result<T, ClientError>>,
    {
        if let Some(ws) = self.ws() {
            match over_ws(ws).await {
                Ok(v) => return Ok(v),
                Err(e @ ClientError::Api { .. }) if e.key() != Some(ErrorKey::TokenExpired) => {
                    return Err(classify(&e));
                }
                Err(e) => tracing::debug!(error = %e.detail(), "Not sent over the WebSocket; sending over HTTP"),
            }
        }
        self.session.call(over_http).await
    }

    /// Takes one signal from the stream.
    fn accept(&self, signal: &Signal) {
        self.update_status(|s| s.last_signal = Some(format!("{} at {}", signal.kind, rfc3339_now())));
        match signal.kind.as_str() {
            COMMAND_QUEUED => {
                let Ok(cmd) = serde_json::from_value::<CommandQueued>(signal.reference.clone()) else {
                    tracing::warn!("Ignoring a malformed command.queued signal");
                    return;
                };
                if lock(&self.journal).get(cmd.command_id).is_some() {
                    // Redelivered after it started: never run twice.
                    tracing::debug!(command_id = %cmd.command_id, "Skipping an already started command");
                    return;
                }
                if cmd.expires_at_ms.is_some_and(|exp| exp <= now_ms()) {
                    tracing::info!(command_id = %cmd.command_id, "Skipping an expired command");
                    return;
                }
                let mut queue = lock(&self.queue);
                if lock(&self.running).contains_key(&cmd.command_id)
                    || queue.iter().any(|q| q.cmd.command_id == cmd.command_id)
                {
                    return;
                }
                let order = self.queue_order.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                queue.push(Queued { order, cmd });
                drop(queue);
                self.queue_changed.notify_waiters();
            }
            CONFIG_UPDATED => self.config_changed.notify_one(),
            // A full pass either way: the server's list is the desired set.
            FILE_UPDATED | FILE_REMOVED => self.files_changed.notify_one(),
            CERT_RENEWED => {
                if let Ok(r) = serde_json::from_value::<CertRenewed>(signal.reference.clone()) {
                    lock(&self.cert_events).renewed.insert(r.cert_id);
                }
                self.certs_changed.notify_one();
            }
            CERT_REVOKED => {
                if let Ok(r) = serde_json::from_value::<CertRevoked>(signal.reference.clone()) {
                    lock(&self.cert_events).revoked.insert(r.cert_id);
                }
                self.certs_changed.notify_one();
            }
            COMMAND_CANCELLED => {
                let Ok(c) = serde_json::from_value::<CommandCancelled>(signal.reference.clone()) else { return };
                if let Some(token) = lock(&self.running).get(&c.command_id) {
                    tracing::info!(command_id = %c.command_id, "Cancelling a running command");
                    token.cancel();
                }
                lock(&self.queue).retain(|q| q.cmd.command_id != c.command_id);
            }
            other => tracing::debug!(kind = other, "Ignoring a signal type this agent does not handle"),
        }
    }
}

/// Puts a result in the spool (durable) and wakes the flusher.
fn spool_result(shared: &Shared, id: CommandId, report: &ResultReport) {
    if let Err(e) = shared.spool.put(id, report) {
        tracing::error!(command_id = %id, error = %e, "Could not spool a result");
    }
    shared.spool_changed.notify_one();
}

async fn sleep_or_stop(shared: &Shared, d: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = shared.stop.cancelled() => {}
        _ = shared.poll_now.notified() => {}
    }
}

/// Whether the stream loop goes on after one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

/// The stream (protocol.md §4, §9): over the WebSocket or by long-poll as
/// the `transport` setting and [`Switch`] decide, one step (a poll, or one
/// connection's life) at a time. Both transports resume from the same
/// persisted cursor.
async fn stream_loop(shared: Arc<Shared>, mode: Mode) {
    let cfg = shared.cfg();
    let mut backoff = Backoff::new(Duration::from_secs(cfg.backoff_base_s), Box::new(rand::random::<f64>));
    let mut cursor = shared.state.read("cursor").ok().flatten();
    // `once` is one poll with wait=0: long-poll's job.
    let setting = if mode == Mode::Once { Transport::LongPoll } else { cfg.transport };
    let mut switch = Switch::new(setting, ReconnectPolicy::default());
    shared.update_status(|s| {
        s.transport = setting.as_str().into();
        s.cursor = cursor.clone();
    });
    shared.set_connection(switch.in_use(std::time::Instant::now()));
    loop {
        if shared.stop.is_cancelled() {
            return;
        }
        let flow = match switch.in_use(std::time::Instant::now()) {
            // Marked as the connection once it is open: a retry that falls
            // back at once does not flip the status.
            InUse::WebSocket => websocket_step(&shared, &mut switch, &mut cursor, &mut backoff).await,
            InUse::LongPoll => {
                shared.set_connection(InUse::LongPoll);
                poll_step(&shared, mode, &mut cursor, &mut backoff).await
            }
        };
        if flow == Flow::Stop {
            return;
        }
    }
}

/// Waits while the queue is full (backpressure: no more work is read than
/// it can hold); `false` when the agent is stopping.
async fn room_in_queue(shared: &Shared) -> bool {
    while shared.queue_len() >= QUEUE_CAPACITY {
        tokio::select! {
            _ = shared.queue_changed.notified() => {}
            _ = shared.stop.cancelled() => return false,
        }
    }
    !shared.stop.is_cancelled()
}

/// Takes the signals of one answer (a poll or a signals frame) and persists
/// the cursor after them.
fn take_signals(shared: &Shared, cursor: &mut Option<String>, updates: &tether_proto::signal::Updates) {
    for signal in &updates.signals {
        shared.accept(signal);
    }
    advance(shared, cursor, Some(updates.cursor.clone()).filter(|c| !c.is_empty()));
}

/// Persists a new cursor (only when it moved).
fn advance(shared: &Shared, cursor: &mut Option<String>, new_cursor: Option<String>) {
    if new_cursor.is_some() && new_cursor != *cursor {
        if let Some(c) = &new_cursor
            && let Err(e) = shared.state.write("cursor", c)
        {
            tracing::error!(error = %e, "Could not persist the cursor");
        }
        *cursor = new_cursor;
    }
    shared.update_status(|s| {
        s.last_poll = Some(rfc3339_now());
        s.cursor = cursor.clone();
        s.consecutive_failures = 0;
        s.circuit_open = false;
        s.retry_after_s = None;
        s.queue_depth = shared.queue_len();
    });
}

/// CURSOR_EXPIRED (409 or close 4409): start again from the retained stream.
fn resync(shared: &Shared, cursor: &mut Option<String>) {
    tracing::warn!("Stream cursor expired; resyncing from the start of the retained stream");
    let _ = shared.state.remove("cursor");
    *cursor = None;
    // Signals may have been missed: configuration, files and certificates may have changed too.
    shared.config_changed.notify_one();
    shared.files_changed.notify_one();
    shared.certs_changed.notify_one();
}

/// One long-poll (protocol.md §4): re-polls at once after an answer, backs
/// off after a failure.
async fn poll_step(shared: &Shared, mode: Mode, cursor: &mut Option<String>, backoff: &mut Backoff) -> Flow {
    if !room_in_queue(shared).await {
        return Flow::Stop;
    }
    let wait = if mode == Mode::Once { 0 } else { shared.poll_wait_s() };
    shared.update_status(|s| {
        s.poll_wait_s = wait;
        s.next_poll = Some(rfc3339_now());
    });
    let c = cursor.clone();
    let expires = shared.session.token_expires_at().await;
    shared.update_status(|s| s.token_expires_at = rfc3339_from_s(expires));
    let res = tokio::select! {
        r = shared.session.call(|client| { let c = c.clone(); async move { client.updates(c.as_deref(), 100, wait).await } }) => r,
        _ = shared.stop.cancelled() => return Flow::Stop,
        // `tether agent poll-now`: drop the parked poll and ask again.
        _ = shared.poll_now.notified() => return Flow::Continue,
    };
    match res {
        Ok(Poll::Signals(updates)) => take_signals(shared, cursor, &updates),
        Ok(Poll::Idle { cursor: c }) => advance(shared, cursor, Some(c).filter(|c| !c.is_empty())),
        Err(Failure::CursorExpired) => {
            resync(shared, cursor);
            return Flow::Continue;
        }
        Err(Failure::Revoked(msg)) => {
            shared.finish(Exit::Revoked(msg));
            return Flow::Stop;
        }
        Err(Failure::Fatal(msg)) => {
            shared.finish(Exit::Fatal(msg));
            return Flow::Stop;
        }
        Err(e @ (Failure::Retry { .. } | Failure::Refused { .. })) => {
            let retry_after = match &e {
                Failure::Retry { retry_after, .. } => *retry_after,
                _ => None,
            };
            let delay = backoff.failure(retry_after);
            tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, failures = backoff.failures(), "Poll failed");
            shared.update_status(|s| {
                s.consecutive_failures = backoff.failures();
                s.circuit_open = backoff.is_open();
                s.retry_after_s = retry_after.map(|d| d.as_secs());
                s.next_poll = Some(format!("in {} ms", delay.as_millis()));
            });
            if mode == Mode::Once {
                shared.finish(Exit::Fatal(format!("poll failed: {e}")));
                return Flow::Stop;
            }
            sleep_or_stop(shared, delay).await;
            return Flow::Continue;
        }
    }
    backoff.success();
    // Re-poll at once (protocol.md §12: no sleep between polls).
    if mode == Mode::Once { Flow::Stop } else { Flow::Continue }
}

/// One WebSocket connection's life (protocol.md §9): open it from the
/// cursor, take signals frames until it ends, then do what [`Switch`] says
/// (reconnect after a jittered wait, refresh, resync, fall back, stop).
/// While it is up, heartbeats and command reports go over it.
async fn websocket_step(
    shared: &Shared,
    switch: &mut Switch,
    cursor: &mut Option<String>,
    backoff: &mut Backoff,
) -> Flow {
    if !room_in_queue(shared).await {
        return Flow::Stop;
    }
    let client = match shared.session.client().await {
        Ok(c) => c,
        Err(f) => return session_failed(shared, f, backoff).await,
    };
    let expires = shared.session.token_expires_at().await;
    shared.update_status(|s| {
        s.token_expires_at = rfc3339_from_s(expires);
        s.next_poll = Some(rfc3339_now());
    });
    let opened = tokio::select! {
        r = client.connect_ws(cursor.as_deref()) => r,
        _ = shared.stop.cancelled() => return Flow::Stop,
    };
    let mut conn = match opened {
        Ok(conn) => conn,
        Err(e) => {
            tracing::warn!(error = %e.detail(), "Opening the WebSocket failed");
            let mut next = switch.connect_failed(&e, std::time::Instant::now(), rand::random::<f64>());
            if let Next::Probe { why } = next {
                let http_works = tokio::select! {
                    works = http_reaches_server(&client) => works,
                    _ = shared.stop.cancelled() => return Flow::Stop,
                };
                tracing::debug!(http_works, "Connecting the WebSocket keeps failing; asked over HTTP");
                next = switch.probed(http_works, why, std::time::Instant::now(), rand::random::<f64>());
            }
            return follow(shared, next, cursor, backoff, expires).await;
        }
    };
    let connected = std::time::Instant::now();
    tracing::info!(cursor = cursor.as_deref().unwrap_or("-"), "Stream connected over the WebSocket");
    *lock(&shared.ws) = Some(conn.handle());
    shared.set_connection(InUse::WebSocket);
    backoff.success();
    advance(shared, cursor, None);
    shared.update_status(|s| s.next_poll = None);
    let end = loop {
        shared.stream_paused.store(true, std::sync::atomic::Ordering::Relaxed);
        let room = room_in_queue(shared).await;
        shared.stream_paused.store(false, std::sync::atomic::Ordering::Relaxed);
        if !room {
            break None;
        }
        tokio::select! {
            next = conn.next() => match next {
                Ok(updates) => take_signals(shared, cursor, &updates),
                Err(e) => break Some(e),
            },
            _ = shared.stop.cancelled() => break None,
        }
    };
    *lock(&shared.ws) = None;
    let Some(end) = end else {
        conn.close().await;
        return Flow::Stop;
    };
    let lived = connected.elapsed();
    let next = switch.closed(&end, lived, std::time::Instant::now(), rand::random::<f64>());
    tracing::info!(error = %end.detail(), up_s = lived.as_secs(), "The WebSocket ended");
    follow(shared, next, cursor, backoff, expires).await
}

/// Whether any HTTP answer comes back from the server (`/healthz`, through
/// whatever proxy the HTTP client uses): then the WebSocket is what does
/// not get through.
async fn http_reaches_server(client: &Client) -> bool {
    let Ok(request) = client.request(reqwest::Method::GET, "healthz") else { return false };
    matches!(tokio::time::timeout(Duration::from_secs(10), client.execute(request)).await, Ok(Ok(_)))
}

/// Does what [`Switch`] decided after a WebSocket attempt or connection;
/// `token_expiry` is that of the access token it used.
async fn follow(
    shared: &Shared,
    next: Next,
    cursor: &mut Option<String>,
    backoff: &mut Backoff,
    token_expiry: u64,
) -> Flow {
    match next {
        Next::Reconnect(delay) => {
            shared.update_status(|s| {
                s.consecutive_failures = s.consecutive_failures.saturating_add(1);
                s.next_poll = Some(format!("in {} ms", delay.as_millis()));
            });
            tracing::debug!(retry_in_ms = delay.as_millis() as u64, "Reconnecting the WebSocket");
            sleep_or_stop(shared, delay).await;
            Flow::Continue
        }
        Next::Refresh => match shared.session.refresh_after(token_expiry).await {
            Ok(()) => Flow::Continue,
            Err(f) => session_failed(shared, f, backoff).await,
        },
        Next::Resync => {
            resync(shared, cursor);
            Flow::Continue
        }
        Next::FallBack { until, why } => {
            let back_at = rfc3339_in(until.saturating_duration_since(std::time::Instant::now()));
            tracing::warn!(why = %why, websocket_again_at = back_at.as_deref().unwrap_or("-"), "The WebSocket does not work here; using long-poll");
            shared.update_status(|s| s.websocket_retry_at = back_at);
            Flow::Continue
        }
        Next::Stop(Failure::Revoked(m)) => {
            // A close frame has room for a short reason only; the HTTP
            // envelope says when and why, for the operator reading the exit.
            let asked = tokio::time::timeout(
                Duration::from_secs(5),
                shared.session.call(|c| async move { c.own_config(Some("-")).await }),
            )
            .await;
            let message = match asked {
                Ok(Err(Failure::Revoked(detail))) => detail,
                _ => m,
            };
            shared.finish(Exit::Revoked(message));
            Flow::Stop
        }
        // Answered in `websocket_step` before this; should one slip
        // through, it must not turn into a busy loop.
        Next::Probe { .. } => {
            sleep_or_stop(shared, ReconnectPolicy::default().first).await;
            Flow::Continue
        }
        Next::Stop(other) => {
            shared.finish(Exit::Fatal(other.to_string()));
            Flow::Stop
        }
    }
}

/// The session could not give a usable token (refresh failed).
async fn session_failed(shared: &Shared, failure: Failure, backoff: &mut Backoff) -> Flow {
    match failure {
        Failure::Revoked(m) => {
            shared.finish(Exit::Revoked(m));
            Flow::Stop
        }
        Failure::Fatal(m) => {
            shared.finish(Exit::Fatal(m));
            Flow::Stop
        }
        e => {
            let retry_after = match &e {
                Failure::Retry { retry_after, .. } => *retry_after,
                _ => None,
            };
            let delay = backoff.failure(retry_after);
            tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "Refreshing the access token failed");
            shared.update_status(|s| {
                s.consecutive_failures = backoff.failures();
                s.circuit_open = backoff.is_open();
                s.next_poll = Some(format!("in {} ms", delay.as_millis()));
            });
            sleep_or_stop(shared, delay).await;
            Flow::Continue
        }
    }
}

async fn execute(shared: Arc<Shared>, cmd: CommandQueued, cancel: CancellationToken) {
    let id = cmd.command_id;
    let cfg = shared.cfg();
    let plan = executor::plan(&cfg, &cmd);
    // Journal before anything runs: a crash from here on never re-runs it.
    match lock(&shared.journal).start(id, now_ms()) {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::error!(command_id = %id, error = %e, "Cannot journal the command; not running it");
            return;
        }
    }
    tracing::info!(command_id = %id, name = %cmd.name, "Running command");
    let report = match plan {
        Plan::Reject(reason) => {
            tracing::warn!(command_id = %id, name = %cmd.name, reason = %reason, "Rejected command");
            executor::rejected(reason)
        }
        Plan::Builtin(b) => {
            let _ = report_running(&shared, id).await;
            run_builtin(&shared, b)
        }
        Plan::Process(spec) => {
            if let Err(e) = report_running(&shared, id).await {
                tracing::debug!(command_id = %id, error = %e, "Running report failed; the result will still be sent");
            }
            executor::run_process(std::path::Path::new(executor::SELF_EXE), &spec, &cancel).await
        }
    };
    tracing::info!(command_id = %id, status = %report.status, "Command finished");
    spool_result(&shared, id, &report);
    if plan_restarts(&cmd) {
        shared.finish(Exit::Restart);
    }
}

async fn report_running(shared: &Shared, id: CommandId) -> Result<serde_json::Value, Failure> {
    shared.report(|ws| async move { ws.report_running(id).await }, |c| async move { c.report_running(id).await }).await
}

fn plan_restarts(cmd: &CommandQueued) -> bool {
    cmd.name == "agent.restart"
}

fn run_builtin(shared: &Shared, builtin: Builtin) -> ResultReport {
    match builtin {
        Builtin::Ping => executor::ping(),
        Builtin::Sysinfo => executor::sysinfo(),
        Builtin::ConfigReload => {
            let current = shared.cfg();
            let reloaded = config::read_file(&current.dir).and_then(|file| {
                // Flags and environment still win; only the file is re-read.
                AgentConfig::resolve(
                    &current.dir,
                    file,
                    |k| std::env::var(k).ok(),
                    config::Overrides {
                        server: Some(current.server.clone()),
                        // The session was built signing or not; keep reporting what it does.
                        sign_requests: Some(current.sign_requests),
                        ..Default::default()
                    },
                )
            });
            match reloaded {
                Ok(cfg) => {
                    *shared.cfg.write().unwrap_or_else(std::sync::PoisonError::into_inner) = cfg;
                    let mut r = ResultReport::new(CommandStatus::Succeeded);
                    r.exit_code = Some(0);
                    r.stdout = "configuration reloaded\n".into();
                    r
                }
                Err(e) => {
                    let mut r = ResultReport::new(CommandStatus::Failed);
                    r.reason = Some(format!("reload failed: {e}"));
                    r
                }
            }
        }
        Builtin::AgentRestart => {
            let mut r = ResultReport::new(CommandStatus::Succeeded);
            r.exit_code = Some(0);
            r.stdout = "restarting\n".into();
            r
        }
    }
}

async fn executor_loop(shared: Arc<Shared>, tasks: TaskTracker) {
    loop {
        // A free slot under the limit, which the configuration may change live.
        loop {
            let changed = shared.slots_changed.notified();
            if lock(&shared.running).len() < shared.max_concurrent() {
                break;
            }
            tokio::select! {
                _ = changed => {}
                _ = shared.stop.cancelled() => return,
            }
        }
        let next = loop {
            let notified = shared.queue_changed.notified();
            if let Some(q) = lock(&shared.queue).pop() {
                break q;
            }
            tokio::select! {
                _ = notified => {}
                _ = shared.stop.cancelled() => return,
            }
        };
        shared.queue_changed.notify_waiters();
        let cancel = CancellationToken::new();
        lock(&shared.running).insert(next.cmd.command_id, cancel.clone());
        let shared2 = shared.clone();
        tasks.spawn(async move {
            let id = next.cmd.command_id;
            execute(shared2.clone(), next.cmd, cancel).await;
            lock(&shared2.running).remove(&id);
            shared2.slots_changed.notify_waiters();
        });
    }
}

/// Sends every spooled result; returns false when the server was unreachable.
async fn flush_spool(shared: &Shared) -> Result<bool, Failure> {
    let results = shared.spool.all().unwrap_or_default();
    for (id, report) in results {
        let r = &report;
        let sent = shared
            .report(|ws| async move { ws.report_result(id, r).await }, |c| async move { c.report_result(id, r).await })
            .await;
        match sent {
            Ok(_) => {}
            Err(Failure::Refused { status, what }) => {
                // The server has a final answer for it (e.g. cancelled meanwhile): nothing to retry.
                tracing::warn!(command_id = %id, status, what = %what, "Server refused a result; dropping it");
            }
            Err(e @ (Failure::Revoked(_) | Failure::Fatal(_))) => return Err(e),
            Err(e) => {
                tracing::warn!(command_id = %id, error = %e, "Result not delivered yet; will retry");
                return Ok(false);
            }
        }
        if let Err(e) = lock(&shared.journal).acknowledge(id) {
            tracing::error!(command_id = %id, error = %e, "Could not journal the acknowledgement");
        }
        let _ = shared.spool.remove(id);
    }
    shared.update_status(|s| s.spooled_results = shared.spool.len());
    Ok(true)
}

async fn spool_loop(shared: Arc<Shared>) {
    let mut backoff = Backoff::new(Duration::from_secs(shared.cfg().backoff_base_s), Box::new(rand::random::<f64>));
    loop {
        let delay = match flush_spool(&shared).await {
            Ok(true) => {
                backoff.success();
                Duration::from_secs(30)
            }
            Ok(false) => backoff.failure(None),
            Err(Failure::Revoked(m)) => return shared.finish(Exit::Revoked(m)),
            Err(e) => return shared.finish(Exit::Fatal(e.to_string())),
        };
        tokio::select! {
            _ = shared.spool_changed.notified() => {}
            _ = tokio::time::sleep(delay) => {}
            _ = shared.stop.cancelled() => return,
        }
    }
}

async fn heartbeat_loop(shared: Arc<Shared>) {
    let mut host = CpuMemory::new();
    loop {
        let reading = host.as_mut().map(CpuMemory::read);
        let beat = Heartbeat {
            uptime_s: shared.started.elapsed().as_secs(),
            version: env!("CARGO_PKG_VERSION").into(),
            applied_config_hash: lock(&shared.applied).as_ref().map(|a| a.hash.clone()),
            config_status: lock(&shared.config_report).clone(),
            running_commands: lock(&shared.running).len() as u32,
            queue_depth: shared.queue_len() as u32,
            cpu_pct: reading.and_then(|r| r.cpu_pct),
            mem_used_bytes: reading.map(|r| r.mem_used_bytes),
            mem_total_bytes: reading.map(|r| r.mem_total_bytes),
            load1: metrics::load1(),
        };
        let b = &beat;
        match shared
            .report(|ws| async move { ws.send_heartbeat(b).await }, |c| async move { c.heartbeat(b).await })
            .await
        {
            Ok(_) => tracing::debug!("Heartbeat sent"),
            Err(Failure::Revoked(m)) => return shared.finish(Exit::Revoked(m)),
            Err(e) => tracing::debug!(error = %e, "Heartbeat failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(shared.heartbeat_s())) => {}
            _ = shared.heartbeat_now.notified() => {}
            _ = shared.stop.cancelled() => return,
        }
    }
}

/// Collects host metrics every `metrics_s` (the distributed value, else
/// `agent.toml`'s; 0: none) and delivers them (protocol.md §12): batches
/// the server cannot take wait in `state/metrics/` and are retried with
/// backoff, oldest first, before anything newer. The collector is kept
/// across collections (CPU use is measured between two) and runs off the
/// runtime thread: a hung network mount must not stall the other loops.
async fn metrics_loop(shared: Arc<Shared>) {
    let settings = shared.cfg().metrics;
    let mut spool = match MetricSpool::open(shared.state.metrics_dir(), settings.spool) {
        Ok(spool) => spool,
        Err(e) => {
            tracing::error!(error = %e, "Cannot open the metrics spool; no host metrics this run");
            return;
        }
    };
    let collector = Arc::new(Mutex::new(Collector::new(settings.sources)));
    let mut backoff = Backoff::new(Duration::from_secs(shared.cfg().backoff_base_s), Box::new(rand::random::<f64>));
    let mut last_collected = tokio::time::Instant::now();
    // What a previous run left is sent at once.
    let mut retry_at = (!spool.is_empty()).then(tokio::time::Instant::now);
    shared.update_status(|s| s.metrics_spooled = spool.len());
    loop {
        let every = shared.metrics_s();
        let tick = (every > 0).then(|| last_collected + Duration::from_secs(every));
        let wake = tick.into_iter().chain(retry_at).min();
        tokio::select! {
            _ = sleep_until(wake) => {}
            _ = shared.metrics_changed.notified() => continue,
            _ = shared.stop.cancelled() => return,
        }
        let now = tokio::time::Instant::now();
        let mut fresh = Vec::new();
        if tick.is_some_and(|t| t <= now) {
            last_collected = now;
            let collector = collector.clone();
            match off_thread(move || lock(&collector).collect(now_ms())).await {
                Ok(points) => fresh = metrics::batches(points),
                Err(e) => tracing::warn!(error = %e, "Collecting host metrics failed"),
            }
        }
        let send = |batch: MetricBatch| {
            let shared = &shared;
            async move {
                // Stopping: what is left waits in the spool for the next run.
                if shared.stop.is_cancelled() {
                    return Err(Failure::Retry { retry_after: None, why: "the agent is stopping".into() });
                }
                let b = &batch;
                shared.session.call(|c| async move { c.send_metrics(b).await }).await?;
                shared.update_status(|s| s.metrics_last_sent = Some(rfc3339_now()));
                Ok(())
            }
        };
        retry_at = match metrics::deliver(&mut spool, fresh, send).await {
            Ok(Delivered::All) => {
                backoff.success();
                None
            }
            Ok(Delivered::Partly { retry_after }) => {
                let delay = backoff.failure(retry_after);
                tracing::debug!(
                    spooled = spool.len(),
                    retry_in_ms = delay.as_millis() as u64,
                    "Metrics not delivered yet"
                );
                Some(now + delay)
            }
            Err(Failure::Revoked(m)) => return shared.finish(Exit::Revoked(m)),
            Err(e) => return shared.finish(Exit::Fatal(e.to_string())),
        };
        shared.update_status(|s| s.metrics_spooled = spool.len());
    }
}

/// Sleeps until `at`, or forever for `None`.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Applies a configuration: its reserved keys first (a bad one changes
/// nothing), then the local sinks (a failing hook puts the file back), then
/// the tuning takes effect and the document goes to `post_url`. A
/// configuration from the server is kept as the last good one.
async fn apply_config(shared: &Shared, applied: Applied, from_server: bool) -> Result<(), String> {
    let tuning = remote_config::tuning(&applied.doc)?;
    let previous = lock(&shared.applied).as_ref().map(|a| a.hash.clone());
    remote_config::apply_locally(&shared.cfg().sinks, &applied, previous.as_deref(), &shared.stop).await?;
    let previous_level = std::mem::replace(&mut *lock(&shared.tuning), tuning.clone()).log_level;
    if tuning.log_level != previous_level {
        crate::cli::set_log_level(tuning.log_level.as_deref());
    }
    shared.slots_changed.notify_waiters();
    shared.metrics_changed.notify_one();
    shared.post.send_replace(Some(applied.doc.clone()));
    if from_server && let Err(e) = remote_config::save(&shared.state, &applied) {
        tracing::error!(error = %e, "Could not keep the configuration as the last good one");
    }
    shared.update_status(|s| s.applied_config_hash = Some(applied.hash.clone()));
    *lock(&shared.applied) = Some(applied);
    Ok(())
}

/// Keeps the agent on the configuration the server distributes: starts
/// from the last good one, fetches the current one, and fetches again on
/// every `config.updated` signal; retries with backoff while the server
/// cannot be reached (running on the cached one meanwhile).
async fn config_loop(shared: Arc<Shared>) {
    if let Some(cached) = remote_config::load_cached(&shared.state) {
        let hash = cached.hash.clone();
        match apply_config(&shared, cached, false).await {
            Ok(()) => {
                tracing::info!(hash = %hash, "Running the cached configuration until the server answers");
                shared.update_status(|s| s.config_source = Some("cache (the server has not answered yet)".into()));
            }
            Err(e) => tracing::warn!(error = %e, "The cached configuration does not apply"),
        }
    }
    let mut backoff = Backoff::new(Duration::from_secs(shared.cfg().backoff_base_s), Box::new(rand::random::<f64>));
    loop {
        let have = lock(&shared.applied).as_ref().map(|a| a.hash.clone());
        let fetched = shared
            .session
            .call(|c| {
                let have = have.clone();
                async move { c.own_config(have.as_deref()).await }
            })
            .await;
        let delay = match fetched {
            Ok(latest) => {
                // A configuration that failed is tried again with backoff: a
                // hook may fail only until the service it reloads is up.
                let mut retry = None;
                if let Some(effective) = latest {
                    let applied = Applied { hash: effective.hash, doc: effective.doc };
                    let hash = applied.hash.clone();
                    let report = match apply_config(&shared, applied, true).await {
                        Ok(()) => {
                            tracing::info!(hash = %hash, "Configuration applied");
                            shared.update_status(|s| s.config_error = None);
                            ConfigApply::applied(hash)
                        }
                        Err(e) => {
                            tracing::warn!(hash = %hash, error = %e, "Configuration not applied; keeping the previous one");
                            let report = ConfigApply::failed(hash, e);
                            shared.update_status(|s| s.config_error = report.error.clone());
                            retry = Some(backoff.failure(None));
                            report
                        }
                    };
                    *lock(&shared.config_report) = Some(report);
                    shared.heartbeat_now.notify_one();
                }
                if retry.is_none() {
                    backoff.success();
                }
                shared.update_status(|s| s.config_source = Some("server".into()));
                retry
            }
            Err(Failure::Revoked(m)) => return shared.finish(Exit::Revoked(m)),
            Err(Failure::Fatal(m)) => return shared.finish(Exit::Fatal(m)),
            Err(e) => {
                let delay = backoff.failure(None);
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "Fetching the configuration failed");
                if lock(&shared.applied).is_some() {
                    shared.update_status(|s| s.config_source = Some("cache (the server is unreachable)".into()));
                }
                Some(delay)
            }
        };
        tokio::select! {
            _ = shared.config_changed.notified() => {}
            _ = sleep_for(delay) => {}
            _ = shared.stop.cancelled() => return,
        }
    }
}

/// Sleeps for `delay`, or forever for `None`.
async fn sleep_for(delay: Option<Duration>) {
    match delay {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// The wait before the next pass of a reconcile loop: none (until a
/// signal) when the pass applied everything, a backoff when something
/// failed, or how the agent must stop.
fn after_pass(pass: Result<bool, Failure>, backoff: &mut Backoff, what: &str) -> Result<Option<Duration>, Exit> {
    match pass {
        Ok(true) => {
            backoff.success();
            Ok(None)
        }
        Ok(false) => Ok(Some(backoff.failure(None))),
        Err(Failure::Revoked(m)) => Err(Exit::Revoked(m)),
        Err(Failure::Fatal(m)) => Err(Exit::Fatal(m)),
        Err(e) => {
            let retry_after = match &e {
                Failure::Retry { retry_after, .. } => *retry_after,
                _ => None,
            };
            let delay = backoff.failure(retry_after);
            tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "Fetching the {what} failed");
            Ok(Some(delay))
        }
    }
}

/// Keeps the managed files as the server assigns them (protocol.md §7): a
/// full pass at start, on every `file.updated`/`file.removed` (signals
/// during a pass make one more pass, not one each) and on a resync; a pass
/// where something failed is retried with backoff.
async fn files_loop(shared: Arc<Shared>) {
    let mut files = ManagedFiles::load(&shared.state);
    let mut backoff = Backoff::new(Duration::from_secs(shared.cfg().backoff_base_s), Box::new(rand::random::<f64>));
    loop {
        let cfg = shared.cfg();
        let ctx = Ctx { session: &shared.session, cfg: &cfg, state: &shared.state, stop: &shared.stop };
        let pass = tokio::select! {
            pass = files.reconcile(ctx) => pass,
            _ = shared.stop.cancelled() => return,
        };
        let delay = match after_pass(pass, &mut backoff, "managed files") {
            Ok(delay) => delay,
            Err(exit) => return shared.finish(exit),
        };
        tokio::select! {
            _ = shared.files_changed.notified() => {}
            _ = sleep_for(delay) => {}
            _ = shared.stop.cancelled() => return,
        }
    }
}

/// Keeps the certificates as the server assigns them (protocol.md §7): a
/// full pass at start, on `cert.renewed`/`cert.revoked`, on a resync and
/// when an issued certificate is due for renewal; answers `renew NAME` from
/// the control socket between passes. A pass where something failed is
/// retried with backoff.
async fn certs_loop(shared: Arc<Shared>, mut renewals: mpsc::UnboundedReceiver<RenewCommand>) {
    let mut certs = ManagedCerts::load(&shared.state, shared.session.agent_id());
    let mut backoff = Backoff::new(Duration::from_secs(shared.cfg().backoff_base_s), Box::new(rand::random::<f64>));
    loop {
        certs.note(std::mem::take(&mut *lock(&shared.cert_events)));
        let cfg = shared.cfg();
        let ctx = Ctx { session: &shared.session, cfg: &cfg, state: &shared.state, stop: &shared.stop };
        let pass = tokio::select! {
            pass = certs.reconcile(ctx, now_ms()) => pass,
            _ = shared.stop.cancelled() => return,
        };
        let delay = match after_pass(pass, &mut backoff, "certificates") {
            // The renewal timer, unless a retry is due first.
            Ok(delay) => delay.or_else(|| certs.next_renewal(now_ms())),
            Err(exit) => return shared.finish(exit),
        };
        tokio::select! {
            _ = shared.certs_changed.notified() => {}
            _ = sleep_for(delay) => {}
            Some(command) = renewals.recv() => {
                let answer = tokio::select! {
                    answer = certs.renew(ctx, &command.name, now_ms()) => answer,
                    _ = shared.stop.cancelled() => return,
                };
                // The asker may have given up waiting.
                let _ = command.reply.send(answer);
            }
            _ = shared.stop.cancelled() => return,
        }
    }
}

/// Results of commands a crash interrupted: the command started (journaled)
/// but no result was ever spooled. It is not run again; the server learns why.
fn recover_interrupted(shared: &Shared) {
    let interrupted = lock(&shared.journal).unacknowledged();
    for id in interrupted {
        if shared.spool.contains(id) {
            continue;
        }
        tracing::warn!(command_id = %id, "Reporting a command interrupted by an agent restart");
        let mut report = ResultReport::new(CommandStatus::Failed);
        report.reason = Some("interrupted: the agent stopped while it ran; it is not run again".into());
        spool_result(shared, id, &report);
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("state", &self.state).finish_non_exhaustive()
    }
}

/// Runs the agent until `shutdown` fires (or until one cycle in `Once` mode).
pub async fn run(cfg: AgentConfig, mode: Mode, shutdown: CancellationToken) -> Exit {
    let state = match StateDir::open(&cfg.dir) {
        Ok(s) => s,
        Err(e) => return Exit::Fatal(format!("state dir {}: {e}", cfg.dir.display())),
    };
    let client = match crate::session::http_client(&cfg) {
        Ok(c) => c,
        Err(e) => return Exit::Fatal(e.to_string()),
    };
    let session = loop {
        // Enrollment can wait minutes for a person (device flow): a signal
        // must still stop it.
        let established = tokio::select! {
            r = Session::establish(client.clone(), &cfg, &state) => r,
            _ = shutdown.cancelled() => return Exit::Stopped,
        };
        match established {
            Ok(s) => break s,
            Err(Failure::Revoked(m)) => return Exit::Revoked(m),
            Err(Failure::Retry { why, .. }) if mode == Mode::Daemon => {
                tracing::warn!(error = %why, "Cannot reach the server to enroll; retrying in 5 s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                    _ = shutdown.cancelled() => return Exit::Stopped,
                }
            }
            Err(e) => return Exit::Fatal(e.to_string()),
        }
    };
    let journal = match Journal::open(&state.path("state/journal"), now_ms()) {
        Ok(j) => j,
        Err(e) => return Exit::Fatal(format!("opening the journal: {e}")),
    };
    let (renewals, renewal_requests) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        status: Mutex::new(Status {
            server: cfg.server.clone(),
            agent_id: session.agent_id().to_string(),
            transport: cfg.transport.as_str().into(),
            ..Status::default()
        }),
        ws: Mutex::new(None),
        stream_paused: Default::default(),
        spool: Spool::new(state.results_dir()),
        cfg: RwLock::new(cfg),
        state,
        session,
        journal: Mutex::new(journal),
        queue: Mutex::new(BinaryHeap::new()),
        queue_order: Default::default(),
        queue_changed: Notify::new(),
        running: Mutex::new(HashMap::new()),
        slots_changed: Notify::new(),
        tuning: Mutex::new(Tuning::default()),
        applied: Mutex::new(None),
        config_report: Mutex::new(None),
        config_changed: Notify::new(),
        heartbeat_now: Notify::new(),
        metrics_changed: Notify::new(),
        post: watch::channel(None).0,
        files_changed: Notify::new(),
        certs_changed: Notify::new(),
        cert_events: Mutex::new(Events::default()),
        renewals,
        poll_now: Notify::new(),
        spool_changed: Notify::new(),
        exit: Mutex::new(None),
        stop: shutdown.child_token(),
        started: Instant::now(),
    });
    tracing::info!(agent_id = %shared.session.agent_id(), "Agent started");
    recover_interrupted(&shared);

    let loops = TaskTracker::new();
    let commands = TaskTracker::new();
    match mode {
        Mode::Once => {
            stream_loop(shared.clone(), mode).await;
            // Run everything that arrived, then deliver the results.
            let drained = tokio::spawn(executor_loop(shared.clone(), commands.clone()));
            while shared.queue_len() > 0 || !lock(&shared.running).is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            shared.stop.cancel();
            let _ = drained.await;
            commands.close();
            commands.wait().await;
            if let Err(e) = flush_spool(&shared).await {
                shared.finish(match e {
                    Failure::Revoked(m) => Exit::Revoked(m),
                    other => Exit::Fatal(other.to_string()),
                });
            }
        }
        Mode::Daemon => {
            loops.spawn(stream_loop(shared.clone(), mode));
            loops.spawn(executor_loop(shared.clone(), commands.clone()));
            loops.spawn(spool_loop(shared.clone()));
            loops.spawn(heartbeat_loop(shared.clone()));
            loops.spawn(metrics_loop(shared.clone()));
            loops.spawn(config_loop(shared.clone()));
            loops.spawn(files_loop(shared.clone()));
            loops.spawn(certs_loop(shared.clone(), renewal_requests));
            let cfg = shared.cfg();
            if let Some(url) = cfg.sinks.post_url.clone() {
                loops.spawn(remote_config::post_loop(
                    url,
                    shared.post.subscribe(),
                    cfg.backoff_base_s,
                    shared.stop.clone(),
                ));
            }
            match crate::control::listen(&shared.state.socket()) {
                Ok(listener) => {
                    loops.spawn(crate::control::serve(
                        listener,
                        shared.clone() as Arc<dyn Control>,
                        shared.stop.clone(),
                    ));
                }
                Err(e) => tracing::warn!(error = %e, "Control socket unavailable"),
            }
            shared.stop.cancelled().await;
            tracing::info!("Stopping: no new commands; waiting for running ones");
            loops.close();
            loops.wait().await;
            commands.close();
            let grace = Duration::from_secs(shared.cfg().shutdown_grace_s);
            if tokio::time::timeout(grace, commands.wait()).await.is_err() {
                tracing::warn!("Grace period over; cancelling running commands");
                for token in lock(&shared.running).values() {
                    token.cancel();
                }
                commands.wait().await;
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), flush_spool(&shared)).await;
            let _ = std::fs::remove_file(shared.state.socket());
        }
    }
    lock(&shared.exit).clone().unwrap_or(Exit::Stopped)
}

/// Control-socket access to the daemon's live state.
pub trait Control: Send + Sync + 'static {
    fn status(&self) -> Status;
    fn poll_now(&self);
    /// The installed certificates.
    fn list_certs(&self) -> Vec<managed_certs::Listing>;
    /// Renews certificate `name` now; the answer comes when it is done.
    fn renew(&self, name: String) -> oneshot::Receiver<Result<serde_json::Value, String>>;
}

impl Control for Shared {
    fn status(&self) -> Status {
        let mut s = lock(&self.status).clone();
        s.uptime_s = self.started.elapsed().as_secs();
        s.queue_depth = self.queue_len();
        s.poll_wait_s = self.poll_wait_s();
        s.heartbeat_s = self.heartbeat_s();
        s.metrics_s = self.metrics_s();
        s.max_concurrent_commands = self.max_concurrent();
        s.running_commands = lock(&self.running).keys().copied().collect();
        s.spooled_results = self.spool.len();
        s
    }

    fn poll_now(&self) {
        self.poll_now.notify_waiters();
    }

    fn list_certs(&self) -> Vec<managed_certs::Listing> {
        managed_certs::list(&self.state)
    }

    fn renew(&self, name: String) -> oneshot::Receiver<Result<serde_json::Value, String>> {
        let (reply, answer) = oneshot::channel();
        // Sent to a loop that stopped, the reply is dropped: the asker hears that.
        let _ = self.renewals.send(RenewCommand { name, reply });
        answer
    }
}
