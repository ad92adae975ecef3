//! The daemon's stream transports against a stand-in server (axum): the
//! WebSocket preferred, reports sent as frames, the cursor persisted and
//! resumed, close codes obeyed, and long-poll when the upgrade is refused.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use serde_json::{Value, json};
use tether_agent::config::{AgentConfig, Overrides};
use tether_agent::state::StateDir;
use tether_agent::{Exit, Mode};
use tether_proto::{AgentId, CommandId};
use tokio_util::sync::CancellationToken;

/// How the stand-in answers one upgrade.
#[derive(Debug, Clone)]
enum Plan {
    /// Not a WebSocket here: this status and JSON body.
    Refuse(u16, Value),
    /// Upgrade, send `frames`, answer every agent frame with `{}`, and close
    /// with `close` (code, reason) after `after`, if given.
    Serve { frames: Vec<Value>, close: Option<(u16, &'static str)>, after: Duration },
}

/// What the stand-in saw.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Upgrade { cursor: Option<String>, bearer: String },
    Frame { kind: String, command_id: Option<String>, body: Value },
    Http { method: &'static str, path: String, body: Value },
}

#[derive(Debug, Default)]
struct Fake {
    /// One plan per upgrade; the last one is kept for any further upgrade.
    plans: Mutex<VecDeque<Plan>>,
    /// Long-poll answers with signals, in order; then 204s.
    polls: Mutex<VecDeque<Value>>,
    seen: Mutex<Vec<Seen>>,
}

impl Fake {
    fn record(&self, seen: Seen) {
        self.seen.lock().expect("lock").push(seen);
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    fn upgrades(&self) -> Vec<(Option<String>, String)> {
        self.seen()
            .into_iter()
            .filter_map(|s| match s {
                Seen::Upgrade { cursor, bearer } => Some((cursor, bearer)),
                _ => None,
            })
            .collect()
    }

    fn next_plan(&self) -> Plan {
        let mut plans = self.plans.lock().expect("lock");
        if plans.len() > 1 { plans.pop_front().expect("a plan") } else { plans.front().cloned().expect("a plan") }
    }
}

fn envelope(status: u16, code: u32, key: &str) -> Value {
    json!({"error": {"code": code, "key": key, "what": format!("{key} ({status})"), "params": {}, "request_id": "req_fake0001"}})
}

async fn upgrade(
    State(fake): State<Arc<Fake>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    fake.record(Seen::Upgrade { cursor: query.get("cursor").cloned(), bearer });
    match fake.next_plan() {
        Plan::Refuse(status, body) => {
            let status = StatusCode::from_u16(status).expect("status");
            (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
        }
        Plan::Serve { frames, close, after } => ws.on_upgrade(move |socket| serve(fake, socket, frames, close, after)),
    }
}

async fn serve(
    fake: Arc<Fake>,
    mut socket: WebSocket,
    frames: Vec<Value>,
    close: Option<(u16, &'static str)>,
    after: Duration,
) {
    for frame in frames {
        if socket.send(Message::Text(frame.to_string().into())).await.is_err() {
            return;
        }
    }
    let deadline = tokio::time::sleep(after);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            message = socket.recv() => match message {
                Some(Ok(Message::Text(text))) => {
                    let frame: Value = serde_json::from_str(text.as_str()).expect("agent frames are JSON");
                    fake.record(Seen::Frame {
                        kind: frame["type"].as_str().unwrap_or_default().to_owned(),
                        command_id: frame["command_id"].as_str().map(str::to_owned),
                        body: frame["body"].clone(),
                    });
                    let reply = json!({"type": "reply", "id": frame["id"], "error": null, "data": {}});
                    if socket.send(Message::Text(reply.to_string().into())).await.is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                _ => return,
            },
            () = &mut deadline, if close.is_some() => {
                let (code, reason) = close.unwrap_or((1000, ""));
                let _ = socket.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
                while let Some(Ok(_)) = socket.recv().await {}
                return;
            }
        }
    }
}

async fn updates(State(fake): State<Arc<Fake>>, headers: HeaderMap) -> Response {
    let cursor = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).unwrap_or("\"\"").to_owned();
    fake.record(Seen::Http { method: "GET", path: "/api/v1/agents/self/updates".into(), body: Value::Null });
    let next = fake.polls.lock().expect("lock").pop_front();
    match next {
        Some(data) => {
            let etag = format!("\"{}\"", data["cursor"].as_str().unwrap_or_default());
            (StatusCode::OK, [(header::ETAG, etag)], axum::Json(json!({ "data": data }))).into_response()
        }
        None => {
            // A short long-poll: nothing new.
            tokio::time::sleep(Duration::from_millis(500)).await;
            (StatusCode::NO_CONTENT, [(header::ETAG, cursor)]).into_response()
        }
    }
}

async fn recorded_post(State(fake): State<Arc<Fake>>, uri: axum::http::Uri, body: axum::Json<Value>) -> Response {
    fake.record(Seen::Http { method: "POST", path: uri.path().to_owned(), body: body.0 });
    axum::Json(json!({"data": {}})).into_response()
}

async fn refresh(State(fake): State<Arc<Fake>>, body: axum::Json<Value>) -> Response {
    fake.record(Seen::Http { method: "POST", path: "/api/v1/auth/token/refresh".into(), body: body.0.clone() });
    let pair = json!({
        "agent_id": body.0["device_public_id"],
        "access_token": jwt("second"),
        "refresh_token": "ttr_second",
        "expires_in": 900,
    });
    axum::Json(json!({ "data": pair })).into_response()
}

async fn healthz(State(fake): State<Arc<Fake>>) -> Response {
    fake.record(Seen::Http { method: "GET", path: "/healthz".into(), body: Value::Null });
    axum::Json(json!({"status": "ok"})).into_response()
}

/// The stand-in server; answers its base URL.
async fn start(fake: Arc<Fake>) -> String {
    let app = Router::new()
        .route("/api/v1/agents/self/ws", get(upgrade))
        .route("/api/v1/agents/self/updates", get(updates))
        .route("/api/v1/agents/self/heartbeat", post(recorded_post))
        .route("/api/v1/agents/self/commands/{id}/status", post(recorded_post))
        .route("/api/v1/agents/self/commands/{id}/result", post(recorded_post))
        .route("/api/v1/auth/token/refresh", post(refresh))
        .route("/api/v1/agents/self/config", get(|| async { StatusCode::NOT_MODIFIED }))
        .route("/api/v1/agents/self/files", get(|| async { axum::Json(json!({"data": []})) }))
        .route("/api/v1/agents/self/certs", get(|| async { axum::Json(json!({"data": []})) }))
        .route("/healthz", get(healthz))
        .with_state(fake);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    base
}

/// An access token whose `exp` (all the agent reads of it) is an hour away.
fn jwt(tag: &str) -> String {
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() + 3600;
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json!({"exp": exp, "tag": tag}).to_string());
    format!("eyJhbGciOiJIUzI1NiJ9.{payload}.c2ln")
}

/// The state dir of an agent already enrolled with the stand-in.
fn enrolled(dir: &Path, base: &str, toml_extra: &str) -> AgentConfig {
    let state = StateDir::open(dir).expect("state dir");
    state.write("agent_id", &AgentId::new().to_string()).expect("agent id");
    state.write("refresh_token", "ttr_first").expect("refresh token");
    state.write("access_token", &jwt("first")).expect("access token");
    let toml = format!("server = \"{base}\"\nmetrics_s = 0\nheartbeat_s = 1\n{toml_extra}");
    std::fs::write(dir.join("agent.toml"), toml).expect("agent.toml");
    let file = tether_agent::config::read_file(dir).expect("read agent.toml");
    AgentConfig::resolve(dir, file, |_| None, Overrides::default()).expect("config")
}

fn ping(command_id: CommandId) -> Value {
    json!({"type": "command.queued", "ts_ms": 1, "ref": {
        "command_id": command_id, "name": "ping", "args": {}, "timeout_s": 30, "priority": 5
    }})
}

fn signals(cursor: &str, signals: Vec<Value>) -> Value {
    json!({"type": "signals", "cursor": cursor, "signals": signals})
}

/// Waits (bounded) until `check` finds something.
async fn eventually<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn status(dir: &Path) -> Value {
    tether_agent::control::request(&dir.join("state/agent.sock"), "status").await.expect("status")
}

struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Exit>,
}

fn run(cfg: AgentConfig) -> Running {
    let stop = CancellationToken::new();
    let task = tokio::spawn(tether_agent::run(cfg, Mode::Daemon, stop.clone()));
    Running { stop, task }
}

impl Running {
    async fn stop(self) -> Exit {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task).await.expect("stops").expect("joins")
    }
}

#[tokio::test]
async fn the_websocket_carries_signals_down_and_reports_up_and_the_cursor_is_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(Fake::default());
    let command = CommandId::new();
    fake.plans.lock().expect("lock").push_back(Plan::Serve {
        frames: vec![signals("3-7", vec![ping(command)])],
        close: None,
        after: Duration::ZERO,
    });
    let base = start(fake.clone()).await;
    let agent = run(enrolled(dir.path(), &base, ""));

    let result = eventually(Duration::from_secs(15), || {
        fake.seen().into_iter().find_map(|s| match s {
            Seen::Frame { kind, command_id, body } if kind == "result" => Some((command_id, body)),
            _ => None,
        })
    })
    .await;
    assert_eq!(result.0, Some(command.to_string()));
    assert_eq!(result.1["status"], "succeeded");
    eventually(Duration::from_secs(5), || {
        let frames = fake.seen();
        let running = frames
            .iter()
            .any(|s| matches!(s, Seen::Frame { kind, body, .. } if kind == "status" && body["state"] == "running"));
        let beat = frames
            .iter()
            .any(|s| matches!(s, Seen::Frame { kind, body, .. } if kind == "heartbeat" && body["version"].is_string()));
        (running && beat).then_some(())
    })
    .await;
    // Nothing of the command went over HTTP, and nobody long-polled.
    for seen in fake.seen() {
        if let Seen::Http { path, .. } = &seen {
            assert!(!path.contains("/commands/") && !path.ends_with("/updates"), "{seen:?}");
        }
    }
    // One upgrade, from the start, with the saved access token.
    assert_eq!(fake.upgrades(), [(None, format!("Bearer {}", saved_token(dir.path())))]);
    let cursor = std::fs::read_to_string(dir.path().join("state/cursor")).expect("cursor persisted");
    assert_eq!(cursor, "3-7");
    let status = status(dir.path()).await;
    assert_eq!((status["connection"].as_str(), status["transport"].as_str()), (Some("websocket"), Some("auto")));
    assert!(status["connection_since"].is_string(), "{status}");
    assert_eq!(status["cursor"], "3-7");
    assert_eq!(agent.stop().await, Exit::Stopped);
}

/// Which token (see [`jwt`]) a bearer header carries.
fn tag_of(bearer: &str) -> String {
    let payload = bearer.split('.').nth(1).expect("a JWT");
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).expect("base64url");
    let claims: Value = serde_json::from_slice(&payload).expect("json");
    claims["tag"].as_str().expect("tag").to_owned()
}

/// The access token the agent keeps in its state dir.
fn saved_token(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("state/access_token")).expect("access token")
}

#[tokio::test]
async fn a_refused_upgrade_falls_back_to_long_poll_and_reports_go_over_http() {
    for refusal in [
        Plan::Refuse(404, envelope(404, 4040, "NOT_FOUND")),
        Plan::Refuse(502, json!("bad gateway")),
        Plan::Refuse(426, json!({"message": "upgrade required"})),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = Arc::new(Fake::default());
        fake.plans.lock().expect("lock").push_back(refusal.clone());
        let command = CommandId::new();
        fake.polls.lock().expect("lock").push_back(json!({"cursor": "1-1", "signals": [ping(command)]}));
        let base = start(fake.clone()).await;
        let agent = run(enrolled(dir.path(), &base, ""));
        let path = format!("/api/v1/agents/self/commands/{command}/result");
        let body = eventually(Duration::from_secs(15), || {
            fake.seen().into_iter().find_map(|s| match s {
                Seen::Http { path: p, body, .. } if p == path => Some(body),
                _ => None,
            })
        })
        .await;
        assert_eq!(body["status"], "succeeded", "{refusal:?}");
        assert_eq!(fake.upgrades().len(), 1, "tried once, then long-poll for minutes: {refusal:?}");
        let status = status(dir.path()).await;
        assert_eq!(status["connection"], "long-poll", "{refusal:?}");
        assert!(status["websocket_retry_at"].is_string(), "{status}");
        eventually(Duration::from_secs(5), || {
            (std::fs::read_to_string(dir.path().join("state/cursor")).ok()? == "1-1").then_some(())
        })
        .await;
        assert_eq!(agent.stop().await, Exit::Stopped);
    }
}

#[tokio::test]
async fn the_long_poll_setting_never_opens_a_websocket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(Fake::default());
    fake.plans.lock().expect("lock").push_back(Plan::Serve { frames: vec![], close: None, after: Duration::ZERO });
    let command = CommandId::new();
    fake.polls.lock().expect("lock").push_back(json!({"cursor": "1-1", "signals": [ping(command)]}));
    let base = start(fake.clone()).await;
    let agent = run(enrolled(dir.path(), &base, "transport = \"long-poll\"\n"));
    eventually(Duration::from_secs(15), || {
        fake.seen().iter().any(|s| matches!(s, Seen::Http { path, .. } if path.ends_with("/result"))).then_some(())
    })
    .await;
    assert!(fake.upgrades().is_empty());
    let status = status(dir.path()).await;
    assert_eq!((status["connection"].as_str(), status["transport"].as_str()), (Some("long-poll"), Some("long-poll")));
    assert_eq!(agent.stop().await, Exit::Stopped);
}

#[tokio::test]
async fn close_codes_resync_refresh_and_reconnect_from_the_persisted_cursor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(Fake::default());
    let quickly = Duration::from_millis(100);
    fake.plans.lock().expect("lock").extend([
        // The stored cursor is too old: resync.
        Plan::Serve { frames: vec![], close: Some((4409, "pruned past the cursor")), after: quickly },
        // From the start: new signals, then a restart (1001).
        Plan::Serve { frames: vec![signals("6-1", vec![])], close: Some((1001, "restarting")), after: quickly },
        // The token expired: refresh, reconnect with the new one.
        Plan::Serve { frames: vec![], close: Some((4401, "access token expired")), after: quickly },
        Plan::Serve { frames: vec![], close: None, after: Duration::ZERO },
    ]);
    let base = start(fake.clone()).await;
    let cfg = enrolled(dir.path(), &base, "");
    StateDir::open(dir.path()).expect("state").write("cursor", "5-9").expect("old cursor");
    let agent = run(cfg);
    // 1001 waits up to 5 s (jitter); the rest reconnect at once.
    let upgrades = eventually(Duration::from_secs(20), || {
        let upgrades = fake.upgrades();
        (upgrades.len() >= 4).then_some(upgrades)
    })
    .await;
    let cursors: Vec<Option<&str>> = upgrades.iter().map(|(c, _)| c.as_deref()).collect();
    assert_eq!(cursors[..4], [Some("5-9"), None, Some("6-1"), Some("6-1")]);
    assert_eq!(upgrades[0].1, upgrades[2].1, "the same token until it expired");
    assert_ne!(upgrades[3].1, upgrades[2].1, "a fresh token after 4401");
    assert_eq!(upgrades[3].1, format!("Bearer {}", saved_token(dir.path())));
    assert_eq!((tag_of(&upgrades[0].1), tag_of(&upgrades[3].1)), ("first".into(), "second".into()));
    assert!(
        fake.seen().iter().any(|s| matches!(s, Seen::Http { path, .. } if path == "/api/v1/auth/token/refresh")),
        "refreshed"
    );
    assert_eq!(std::fs::read_to_string(dir.path().join("state/refresh_token")).expect("saved"), "ttr_second");
    assert_eq!(std::fs::read_to_string(dir.path().join("state/cursor")).expect("cursor"), "6-1");
    let status = status(dir.path()).await;
    assert_eq!(status["connection"], "websocket", "still on the WebSocket: {status}");
    assert_eq!(agent.stop().await, Exit::Stopped);
}

#[tokio::test]
async fn close_4403_stops_the_agent_as_revoked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(Fake::default());
    fake.plans.lock().expect("lock").push_back(Plan::Serve {
        frames: vec![],
        close: Some((4403, "stolen laptop")),
        after: Duration::from_millis(100),
    });
    let base = start(fake.clone()).await;
    let agent = run(enrolled(dir.path(), &base, ""));
    let exit = tokio::time::timeout(Duration::from_secs(15), agent.task).await.expect("exits").expect("joins");
    let Exit::Revoked(message) = exit else { panic!("{exit:?}") };
    assert!(message.contains("stolen laptop"), "{message}");
}

#[tokio::test]
async fn connections_that_break_within_seconds_fall_back_to_long_poll() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(Fake::default());
    // Every connection is cut at once, like a proxy with a tiny idle timeout.
    fake.plans.lock().expect("lock").push_back(Plan::Serve {
        frames: vec![],
        close: Some((1011, "proxy says no")),
        after: Duration::from_millis(50),
    });
    let base = start(fake.clone()).await;
    let agent = run(enrolled(dir.path(), &base, ""));
    // Three quick breaks (reconnect waits are in [0, 5 s) each), then long-poll.
    eventually(Duration::from_secs(30), || {
        fake.seen().iter().any(|s| matches!(s, Seen::Http { path, .. } if path.ends_with("/updates"))).then_some(())
    })
    .await;
    assert_eq!(fake.upgrades().len(), 3);
    assert_eq!(status(dir.path()).await["connection"], "long-poll");
    assert_eq!(agent.stop().await, Exit::Stopped);
}

#[tokio::test]
async fn an_agent_that_reaches_the_server_only_through_an_http_proxy_long_polls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(Fake::default());
    let command = CommandId::new();
    fake.polls.lock().expect("lock").push_back(json!({"cursor": "1-1", "signals": [ping(command)]}));
    // The stand-in is the proxy: it routes absolute-form requests by path.
    let proxy = start(fake.clone()).await;
    // The server's own address has nobody listening: only the proxy gets there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let server = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    enrolled(dir.path(), &server, "");
    let mut agent = std::process::Command::new(env!("CARGO_BIN_EXE_tether-agent"))
        .arg("-c")
        .arg(dir.path())
        .env("HTTP_PROXY", &proxy)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .env_remove("TETHER_SERVER")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("agent");
    // Three refused connects (waits under 5 s each), /healthz through the
    // proxy answers, so long-poll it is.
    let path = format!("/api/v1/agents/self/commands/{command}/result");
    let delivered = |fake: &Fake| fake.seen().iter().any(|s| matches!(s, Seen::Http { path: p, .. } if *p == path));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while !delivered(&fake) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = tether_agent::control::request(&dir.path().join("state/agent.sock"), "status").await;
    let _ = agent.kill();
    let output = agent.wait_with_output().expect("agent output");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(delivered(&fake), "no result through the proxy: {log}");
    assert!(fake.upgrades().is_empty(), "the WebSocket never reached the proxy");
    assert!(fake.seen().iter().any(|s| matches!(s, Seen::Http { path, .. } if path == "/healthz")), "{log}");
    let status = status.expect("status");
    assert_eq!(status["connection"], "long-poll", "{status}");
    assert!(log.contains("The WebSocket does not work here"), "{log}");
}
