//! Realtime channels (protocol.md §9): the agent WebSocket carries the
//! stream and the agent's reports with the same rules as HTTP, refuses bad
//! frames without falling over, and a closed socket makes the agent offline
//! within seconds; the event feed shows fleet events by role and resumes
//! from `Last-Event-ID`.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tether_proto::AgentId;
use tether_proto::agent::AgentStatus;
use tether_proto::command::{CommandStatus, CreateCommand, Target};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::common::{TestApp, spawn_app};

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(app: &TestApp, token: &str, cursor: Option<&str>) -> Result<Socket, (u16, Value)> {
    let query = cursor.map(|c| format!("?cursor={c}")).unwrap_or_default();
    let url = format!("ws://{}/api/v1/agents/self/ws{query}", app.addr);
    let mut req = url.into_client_request().expect("request");
    req.headers_mut().insert("authorization", format!("Bearer {token}").parse().expect("header"));
    match tokio_tungstenite::connect_async(req).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
            let body = res.body().as_deref().and_then(|b| serde_json::from_slice(b).ok()).unwrap_or(Value::Null);
            Err((res.status().as_u16(), body))
        }
        Err(e) => panic!("handshake failed: {e}"),
    }
}

/// The next text frame as JSON (pings skipped); panics after 10 s.
async fn next_json(socket: &mut Socket) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a frame within 10 s")
            .expect("socket open")
            .expect("frame");
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("JSON frame"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// The close code the server ends with; panics after 10 s.
async fn close_code(socket: &mut Socket) -> Option<CloseCode> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), socket.next()).await.expect("closed within 10 s") {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

async fn send(socket: &mut Socket, frame: Value) {
    socket.send(Message::Text(frame.to_string().into())).await.expect("send");
}

async fn command_for(app: &TestApp, agent: AgentId, name: &str) -> tether_proto::CommandId {
    let created = app.admin.create_command(&CreateCommand::new(Target::agents([agent]), name)).await.expect("create");
    created.command_ids[0]
}

#[tokio::test]
async fn websocket_pushes_backlog_then_new_signals_and_marks_commands_delivered() {
    let app = spawn_app().await;
    let (_, agent) = app.agent(&[]).await;
    let first = command_for(&app, agent.agent_id, "ping").await;

    let mut socket = connect(&app, &agent.access_token, None).await.expect("upgrade");
    let frame = next_json(&mut socket).await;
    assert_eq!(frame["type"], "signals");
    assert_eq!(frame["signals"][0]["type"], "command.queued");
    assert_eq!(frame["signals"][0]["ref"]["command_id"], first.to_string());
    assert_eq!(app.admin.get_command(first).await.expect("get").status, CommandStatus::Delivered);

    let second = command_for(&app, agent.agent_id, "ping").await;
    let frame = next_json(&mut socket).await;
    assert_eq!(frame["signals"][0]["ref"]["command_id"], second.to_string());
    let cursor = frame["cursor"].as_str().expect("cursor").to_owned();
    drop(socket);

    // Resuming from the cursor sends nothing old.
    let mut socket = connect(&app, &agent.access_token, Some(&cursor)).await.expect("resume");
    let third = command_for(&app, agent.agent_id, "ping").await;
    let frame = next_json(&mut socket).await;
    assert_eq!(frame["signals"].as_array().expect("signals").len(), 1);
    assert_eq!(frame["signals"][0]["ref"]["command_id"], third.to_string());
    app.stop().await;
}

#[tokio::test]
async fn reports_over_the_websocket_follow_the_http_rules() {
    let app = spawn_app().await;
    let (_, agent) = app.agent(&[]).await;
    let (_, other) = app.agent(&[]).await;
    let id = command_for(&app, agent.agent_id, "ping").await;
    let foreign = command_for(&app, other.agent_id, "ping").await;
    let mut socket = connect(&app, &agent.access_token, None).await.expect("upgrade");
    assert_eq!(next_json(&mut socket).await["type"], "signals");

    send(&mut socket, json!({"type": "status", "id": 1, "command_id": id, "body": {"state": "running"}})).await;
    let reply = next_json(&mut socket).await;
    assert_eq!((reply["type"].as_str(), reply["id"].as_u64(), &reply["error"]), (Some("reply"), Some(1), &Value::Null));

    let result = json!({"status": "succeeded", "exit_code": 0, "stdout": "pong"});
    send(&mut socket, json!({"type": "result", "id": 2, "command_id": id, "body": result})).await;
    let reply = next_json(&mut socket).await;
    assert_eq!((reply["id"].as_u64(), &reply["error"]), (Some(2), &Value::Null));
    assert_eq!(app.admin.get_command(id).await.expect("get").status, CommandStatus::Succeeded);

    // A different second result is a conflict, as over HTTP.
    let failed = json!({"status": "failed", "exit_code": 1});
    send(&mut socket, json!({"type": "result", "id": 3, "command_id": id, "body": failed})).await;
    let reply = next_json(&mut socket).await;
    assert_eq!((reply["id"].as_u64(), reply["error"]["key"].as_str()), (Some(3), Some("CONFLICT")));

    // Another agent's command does not exist for this one.
    send(&mut socket, json!({"type": "result", "id": 4, "command_id": foreign, "body": result})).await;
    let reply = next_json(&mut socket).await;
    assert_eq!(reply["error"]["key"], "NOT_FOUND");
    assert_eq!(app.admin.get_command(foreign).await.expect("get").status, CommandStatus::Queued);

    send(&mut socket, json!({"type": "heartbeat", "id": 5, "body": {"version": "1.2.3", "cpu_pct": 3.5}})).await;
    assert_eq!(next_json(&mut socket).await["error"], Value::Null);
    let seen = app.admin.get_agent(agent.agent_id).await.expect("agent");
    assert_eq!(seen.version.as_deref(), Some("1.2.3"));
    app.stop().await;
}

#[tokio::test]
async fn bad_frames_get_error_replies_or_a_policy_close_never_a_crash() {
    let app = spawn_app().await;
    let (_, agent) = app.agent(&[]).await;
    let mut socket = connect(&app, &agent.access_token, None).await.expect("upgrade");

    socket.send(Message::Text("{not json".into())).await.expect("send");
    let reply = next_json(&mut socket).await;
    assert_eq!((reply["id"].clone(), reply["error"]["key"].as_str()), (Value::Null, Some("BAD_REQUEST")));

    send(&mut socket, json!({"type": "launch", "id": 9, "body": {}})).await;
    let reply = next_json(&mut socket).await;
    assert_eq!((reply["id"].as_u64(), reply["error"]["key"].as_str()), (Some(9), Some("BAD_REQUEST")));

    send(&mut socket, json!({"type": "result", "id": 10, "body": {"status": "succeeded"}})).await;
    assert_eq!(next_json(&mut socket).await["error"]["params"]["field"], "command_id");

    send(&mut socket, json!({"type": "heartbeat", "id": 11, "body": {"version": "a\u{0}b"}})).await;
    assert_eq!(next_json(&mut socket).await["error"]["key"], "BAD_REQUEST");

    // Still serving after all that.
    send(&mut socket, json!({"type": "heartbeat", "id": 12, "body": {}})).await;
    assert_eq!(next_json(&mut socket).await["error"], Value::Null);

    socket.send(Message::Binary(vec![1, 2, 3].into())).await.expect("send");
    assert_eq!(close_code(&mut socket).await, Some(CloseCode::Policy));

    let mut socket = connect(&app, &agent.access_token, None).await.expect("upgrade");
    let huge = "x".repeat(2 * 1024 * 1024);
    let _ =
        socket.send(Message::Text(json!({"type": "heartbeat", "id": 1, "body": {"x": huge}}).to_string().into())).await;
    assert_eq!(close_code(&mut socket).await, Some(CloseCode::Size));

    // The server is fine.
    assert!(connect(&app, &agent.access_token, None).await.is_ok());
    app.stop().await;
}

#[tokio::test]
async fn refused_upgrades_answer_with_the_error_envelope() {
    let app = spawn_app().await;
    let (_, agent) = app.agent(&[]).await;
    let (status, body) = connect(&app, "not-a-token", None).await.expect_err("no agent");
    assert_eq!((status, body["error"]["key"].as_str()), (401, Some("UNAUTHENTICATED")));

    let (status, body) = connect(&app, &agent.access_token, Some("999-0")).await.expect_err("other epoch");
    assert_eq!((status, body["error"]["key"].as_str()), (409, Some("CURSOR_EXPIRED")));

    let (status, body) = connect(&app, &agent.access_token, Some("garbage")).await.expect_err("bad cursor");
    assert_eq!((status, body["error"]["key"].as_str()), (400, Some("BAD_REQUEST")));

    // A plain GET is not an upgrade.
    let res =
        app.http().get(app.url("/api/v1/agents/self/ws")).bearer_auth(&agent.access_token).send().await.expect("send");
    assert_eq!(res.status().as_u16(), 400);
    let body: Value = res.json().await.expect("envelope");
    assert_eq!(body["error"]["params"]["field"], "upgrade");
    app.stop().await;
}

/// The agent's status as the API shows it.
async fn status(app: &TestApp, id: AgentId) -> AgentStatus {
    app.admin.get_agent(id).await.expect("agent").status
}

#[tokio::test]
async fn a_closed_websocket_makes_the_agent_offline_within_seconds_and_the_feed_says_so() {
    let app = spawn_app().await;
    let (_, agent) = app.agent(&[]).await;
    let id = agent.agent_id;

    // A viewer's feed, opened before anything happens.
    let feed = app.http().get(app.url("/api/v1/events")).bearer_auth(&app.admin_token).send().await.expect("feed");
    assert_eq!(feed.status().as_u16(), 200);
    assert_eq!(feed.headers()["content-type"], "text/event-stream");
    let mut feed = feed.bytes_stream();

    let socket = connect(&app, &agent.access_token, None).await.expect("upgrade");
    assert_eq!(status(&app, id).await, AgentStatus::Online);
    let closed = std::time::Instant::now();
    drop(socket);
    let mut went_offline = None;
    for _ in 0..100 {
        if status(&app, id).await == AgentStatus::Offline {
            went_offline = Some(closed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = went_offline.expect("offline within 10 s of the close");
    assert!(took < Duration::from_secs(5), "offline after {took:?}");

    // The feed carries the transition, with the audit row as data.
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !text.contains("event: agent.offline") {
        let chunk = tokio::time::timeout_at(deadline, feed.next()).await.expect("event within 10 s");
        text.push_str(std::str::from_utf8(&chunk.expect("open").expect("chunk")).expect("utf-8"));
    }
    let data = text
        .split("event: agent.offline\n")
        .nth(1)
        .and_then(|rest| rest.lines().find_map(|l| l.strip_prefix("data: ")))
        .expect("data line");
    let row: Value = serde_json::from_str(data).expect("JSON");
    assert_eq!(row["target"], id.to_string());

    // Coming back over the long-poll makes it online again at the next presence round.
    let client = app.anon().with_bearer(agent.access_token.clone());
    client.updates(None, 1, 0).await.expect("poll");
    let mut online = false;
    for _ in 0..100 {
        if status(&app, id).await == AgentStatus::Online {
            online = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(online, "online again after a poll");
    app.stop().await;
}

/// Reads the feed until an event named `until` arrived; returns the
/// (id, event) pairs so far.
async fn events(res: reqwest::Response, until: &str) -> Vec<(i64, String)> {
    let mut stream = res.bytes_stream();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let found: Vec<(i64, String)> = text
            .split("\n\n")
            .filter_map(|block| {
                let id = block.lines().find_map(|l| l.strip_prefix("id: "))?.parse().ok()?;
                let event = block.lines().find_map(|l| l.strip_prefix("event: "))?.to_owned();
                Some((id, event))
            })
            .collect();
        if found.iter().any(|(_, e)| e == until) {
            return found;
        }
        let chunk = tokio::time::timeout_at(deadline, stream.next()).await.expect("events within 10 s");
        text.push_str(std::str::from_utf8(&chunk.expect("open").expect("chunk")).expect("utf-8"));
    }
}

#[tokio::test]
async fn the_feed_resumes_from_last_event_id_and_hides_admin_events_from_viewers() {
    let app = spawn_app().await;
    let viewer = tether_proto::user::CreateUser {
        username: "vera".into(),
        password: "a long viewer password".into(),
        role: "viewer".into(),
    };
    app.admin.create_user(&viewer).await.expect("viewer");
    let (_, agent) = app.agent(&[]).await;
    command_for(&app, agent.agent_id, "ping").await;

    // From the start: the admin sees the user creation, the viewer does not.
    let all =
        app.http().get(app.url("/api/v1/events?after=0")).bearer_auth(&app.admin_token).send().await.expect("feed");
    let seen = events(all, "command.create").await;
    assert!(seen.iter().any(|(_, e)| e == "user.create"), "{seen:?}");
    let as_viewer = app
        .http()
        .get(app.url("/api/v1/events?after=0"))
        .basic_auth("vera", Some("a long viewer password"))
        .send()
        .await
        .expect("feed");
    let shown = events(as_viewer, "command.create").await;
    assert!(shown.iter().all(|(_, e)| !e.starts_with("user.")), "{shown:?}");
    assert!(shown.iter().any(|(_, e)| e == "command.create"), "{shown:?}");

    // Resuming after the command's event starts with the next one.
    let (create_id, _) = seen.iter().find(|(_, e)| e == "command.create").expect("command.create").clone();
    command_for(&app, agent.agent_id, "ping").await;
    let resumed = app
        .http()
        .get(app.url("/api/v1/events"))
        .header("last-event-id", create_id.to_string())
        .bearer_auth(&app.admin_token)
        .send()
        .await
        .expect("feed");
    let next = events(resumed, "command.create").await;
    assert!(next[0].0 > create_id);
    assert_eq!(next[0].1, "command.create");

    // A malformed Last-Event-ID is a 400, an operator credential is needed.
    let bad = app
        .http()
        .get(app.url("/api/v1/events"))
        .header("last-event-id", "yesterday")
        .bearer_auth(&app.admin_token)
        .send()
        .await
        .expect("send");
    assert_eq!(bad.status().as_u16(), 400);
    let anon = app.http().get(app.url("/api/v1/events")).send().await.expect("send");
    assert_eq!(anon.status().as_u16(), 401);
    app.stop().await;
}

#[tokio::test]
async fn shutting_down_closes_websockets_with_going_away() {
    let app = spawn_app().await;
    let (_, agent) = app.agent(&[]).await;
    let mut socket = connect(&app, &agent.access_token, None).await.expect("upgrade");
    let stopping = tokio::spawn(app.stop());
    assert_eq!(close_code(&mut socket).await, Some(CloseCode::Away));
    tokio::time::timeout(Duration::from_secs(10), stopping).await.expect("stops within 10 s").expect("stopped");
}
