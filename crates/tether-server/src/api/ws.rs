//! The agent WebSocket (protocol.md §9): the same stream as the long-poll,
//! pushed as `signals` frames, and heartbeats, command status and results
//! sent back as frames, each answered by a `reply` with the same id. Every
//! frame goes through the same function as its HTTP route, with the same
//! rate limit, checks, errors and audit rows.
//!
//! A connection is one task that owns its socket: it writes at most one
//! frame at a time and gives up on a reader that does not take it within
//! [`SEND_TIMEOUT`], so a stalled agent costs one frame of memory, never a
//! growing queue.

use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use serde::Deserialize;
use serde_json::Value;
use tether_proto::Cursor;
use tether_proto::ws::{AgentFrame, MAX_FRAME_BYTES, Reply, ServerFrame, close};
use tokio::time::Instant;

use crate::api::stream::{MAX_LIMIT, deliver, parse_cursor, resume_from};
use crate::api::{commands, heartbeat};
use crate::auth::AgentCaller;
use crate::conn::ConnSlot;
use crate::error::{ApiError, ApiQuery, ApiResult, invalid_json};
use crate::state::{AppState, AuditContext};

/// The server pings this often; the agent's pong (or any frame) proves it is there.
const PING_INTERVAL: Duration = Duration::from_secs(tether_proto::ws::PING_INTERVAL_S);
/// Nothing heard for this long (two pings missed and some): the agent is gone.
const SILENCE_LIMIT: Duration = Duration::from_secs(50);
/// A frame the agent does not take within this long ends the connection.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// tungstenite's defaults (128 KiB read buffer) would cost ~130 KB per idle
/// agent. Frames are small (a heartbeat, a status); a big result frame takes
/// more reads of this size, a cost paid only when one arrives, while the
/// buffer is held by every idle connection (docs/benchmarks.md: 1 KiB cost
/// ~0.6 KB more per agent than 512 bytes).
const BUFFER_BYTES: usize = 512;
/// After a close, an agent that has not come back within this long goes
/// offline: a reconnect for a fresh token or to another replica is no flap.
const OFFLINE_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WsQuery {
    cursor: Option<String>,
}

/// `GET /api/v1/agents/self/ws?cursor=`: errors before the upgrade are the
/// usual envelopes (401, 409 CURSOR_EXPIRED, 429), then frames.
#[utoipa::path(
    get,
    path = "/api/v1/agents/self/ws",
    tag = "stream",
    params(WsQuery),
    security(("agent_token" = [])),
    responses(
        (status = 101, description = "Switching Protocols: WebSocket frames (protocol.md §9)"),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn connect(
    State(state): State<AppState>,
    agent: AgentCaller,
    ctx: AuditContext,
    slot: Option<Extension<ConnSlot>>,
    ApiQuery(q): ApiQuery<WsQuery>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let upgrade = upgrade.map_err(|e| ApiError::bad_request("upgrade", format!("not a WebSocket upgrade: {e}")))?;
    let cursor = parse_cursor(q.cursor)?;
    let start = agent.stream.state();
    let from = resume_from(cursor, &start)?;
    // A connection starts by sending the backlog, like a poll answered at once.
    state.limits.immediate_poll(agent.id)?;
    let cursor = Cursor { epoch: start.epoch, seq: from };
    Ok(upgrade
        .read_buffer_size(BUFFER_BYTES)
        .write_buffer_size(BUFFER_BYTES)
        .max_write_buffer_size(2 * MAX_FRAME_BYTES)
        .max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| serve(Connection { state, agent, ctx, slot }, cursor, socket)))
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The agent or the network closed it, or it broke a rule.
    Gone,
    /// A newer connection or poll of the same agent took over.
    Replaced,
    ShuttingDown,
}

/// What a connection holds for its whole life.
struct Connection {
    state: AppState,
    agent: AgentCaller,
    ctx: AuditContext,
    /// The connection counts against the server's cap until the socket closes.
    slot: Option<Extension<ConnSlot>>,
}

/// Not an `async fn`: its arguments would be stored twice in the task (as
/// arguments, then as locals; rust-lang/rust#62958), and this future is
/// what every idle agent costs the server.
#[allow(clippy::manual_async_fn, reason = "an async fn would store its arguments twice")]
fn serve(conn: Connection, cursor: Cursor, mut socket: WebSocket) -> impl Future<Output = ()> + Send {
    async move {
        let Connection { state, agent, ctx, slot: _slot } = &conn;
        let generation = agent.stream.begin_poll();
        metrics::gauge!("tether_websockets_open").increment(1.0);
        // The upgrade request already counted as seen (`AgentCaller`); like a
        // poll, that reaches `last_seen` with the next batched flush. A write per
        // connect instead cost ~6 KB of server memory per agent in the
        // realtime bench (docs/benchmarks.md) and a transaction per agent in a
        // reconnect storm.
        let ended = session(state, agent, ctx, cursor, generation, &mut socket).await;
        metrics::gauge!("tether_websockets_open").decrement(1.0);
        drop(socket);
        if ended == Ended::Gone {
            // Boxed here and in `session`: a task holds room for its largest
            // await, and the store's futures are far larger than an idle
            // connection's own state.
            Box::pin(went_away(state, agent, generation)).await;
        }
    }
}

async fn session(
    state: &AppState,
    agent: &AgentCaller,
    ctx: &AuditContext,
    mut sent: Cursor,
    generation: u64,
    socket: &mut WebSocket,
) -> Ended {
    let mut rx = agent.stream.subscribe();
    let mut ping = tokio::time::interval_at(Instant::now() + PING_INTERVAL, PING_INTERVAL);
    // An agent key does not expire: its connection has no such end.
    let lifetime = agent.token_lifetime_left(state.clock.now_ms());
    let token_ends = tokio::time::sleep_until(Instant::now() + lifetime.unwrap_or_default());
    tokio::pin!(token_ends);
    let mut heard = Instant::now();
    loop {
        let now = *rx.borrow_and_update();
        if now.revoked {
            return close(socket, close::REVOKED, "this agent was revoked").await;
        }
        if now.poll_gen != generation {
            return close(socket, close::NORMAL, "replaced by a newer connection").await.and(Ended::Replaced);
        }
        if agent.token_revoked() {
            return close(socket, close::TOKEN_EXPIRED, "access token revoked").await;
        }
        if now.epoch != sent.epoch || sent.seq < now.floor {
            return close(socket, close::CURSOR_EXPIRED, "the stream was reset or pruned past the cursor; resync")
                .await;
        }
        if now.head > sent.seq {
            match Box::pin(deliver(state, agent.id, sent, MAX_LIMIT)).await {
                Ok((cursor, updates)) => {
                    if !send(socket, ServerFrame::Signals(updates)).await {
                        return Ended::Gone;
                    }
                    sent = cursor;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(agent_id = %agent.id, what = %e.what, "Reading signals for a WebSocket failed");
                    return close(socket, close::TRY_LATER, "the server cannot read the stream; reconnect later").await;
                }
            }
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() {
                // The stream left memory: the agent was deleted.
                return close(socket, close::REVOKED, "this agent no longer exists").await;
            },
            msg = socket.recv() => {
                heard = Instant::now();
                agent.stream.seen(state.clock.now_ms());
                match msg {
                    Some(Ok(Message::Text(text))) => {
                        let reply = Box::pin(answer(state, agent, ctx, text.as_str())).await;
                        if !send(socket, reply).await {
                            return Ended::Gone;
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        return close(socket, close::POLICY_VIOLATION, "frames are JSON text").await;
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Close(_))) | None => return Ended::Gone,
                    Some(Err(e)) => {
                        // tungstenite reports an oversized frame as a capacity error.
                        if e.to_string().contains("Space limit exceeded") {
                            return close(socket, close::TOO_BIG, "frame too large").await;
                        }
                        return Ended::Gone;
                    }
                }
            }
            _ = ping.tick() => {
                if heard.elapsed() > SILENCE_LIMIT {
                    return close(socket, close::GOING_AWAY, "no pong").await;
                }
                if !send_message(socket, Message::Ping(Default::default())).await {
                    return Ended::Gone;
                }
            }
            () = &mut token_ends, if lifetime.is_some() => {
                return close(socket, close::TOKEN_EXPIRED, "access token expired").await;
            }
            () = state.shutdown.cancelled() => {
                return close(socket, close::GOING_AWAY, "the server is shutting down").await.and(Ended::ShuttingDown);
            }
        }
    }
}

/// Answers one agent frame through the function of its HTTP route.
async fn answer(state: &AppState, agent: &AgentCaller, ctx: &AuditContext, text: &str) -> ServerFrame {
    let parsed: Result<Value, _> = serde_json::from_str(text);
    // The id of a frame that is otherwise wrong still goes on its reply.
    let id = parsed.as_ref().ok().and_then(|v| v.get("id")).and_then(Value::as_u64);
    let request_id = match (&ctx.request_id, id) {
        (Some(r), Some(id)) => format!("{r}-{id}"),
        (Some(r), None) => r.clone(),
        (None, _) => String::new(),
    };
    let result = match parsed.map(serde_json::from_value::<AgentFrame>) {
        Err(_) => Err(ApiError::bad_request("frame", "frame is not JSON")),
        Ok(Err(e)) => Err(invalid_json(e)),
        Ok(Ok(frame)) => {
            let frame_ctx = AuditContext { ip: ctx.ip.clone(), request_id: Some(request_id.clone()) };
            handle(state, agent, &frame_ctx, frame).await
        }
    };
    let (error, data) = match result {
        Ok(data) => (None, data),
        Err(e) => (Some(e.into_body(request_id)), Value::Null),
    };
    ServerFrame::Reply(Reply { id, error, data })
}

async fn handle(state: &AppState, agent: &AgentCaller, ctx: &AuditContext, frame: AgentFrame) -> ApiResult<Value> {
    // Each frame is a request: the agent's request bucket applies (protocol.md §11).
    state.limits.agent(agent.id)?;
    match frame {
        AgentFrame::Heartbeat { body, .. } => {
            heartbeat::record(state, agent.id, body).await?;
            Ok(serde_json::json!({}))
        }
        AgentFrame::Status { command_id, body, .. } => commands::record_status(state, agent.id, command_id, body).await,
        AgentFrame::Result { command_id, body, .. } => {
            commands::record_result(state, ctx, agent.id, command_id, body).await
        }
    }
}

/// Encodes and writes one frame (see [`send_message`]); the frame is
/// dropped before the write is awaited.
fn send(socket: &mut WebSocket, frame: ServerFrame) -> Sending<'_> {
    match serde_json::to_string(&frame) {
        Ok(text) => send_message(socket, Message::Text(Utf8Bytes::from(text))),
        Err(e) => {
            tracing::error!(error = %e, "Encoding a WebSocket frame failed");
            Box::pin(std::future::ready(false))
        }
    }
}

/// A write in progress: boxed, so the connection's task does not keep room
/// for a message and a timer while it idles (protocol.md §9: thousands of
/// idle agents per server).
type Sending<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + 'a>>;

/// Writes one frame, or gives up on an agent that does not read it in time.
fn send_message(socket: &mut WebSocket, msg: Message) -> Sending<'_> {
    Box::pin(async move { matches!(tokio::time::timeout(SEND_TIMEOUT, socket.send(msg)).await, Ok(Ok(()))) })
}

/// Says why in a close frame (best effort), then the connection ends.
async fn close(socket: &mut WebSocket, code: u16, reason: &'static str) -> Ended {
    send_message(socket, Message::Close(Some(CloseFrame { code, reason: Utf8Bytes::from_static(reason) }))).await;
    Ended::Gone
}

impl Ended {
    /// `self` once the close frame is sent, except that `Gone` stays `other`.
    fn and(self, other: Ended) -> Ended {
        if self == Ended::Gone { other } else { self }
    }
}

/// After the agent's connection closed: unless it came back within the
/// grace (here, by a newer poll or connection), it is offline now
/// (protocol.md §9), not only once `last_seen` ages past the threshold.
async fn went_away(state: &AppState, agent: &AgentCaller, generation: u64) {
    let closed_at = state.clock.now_ms();
    tokio::select! {
        () = tokio::time::sleep(OFFLINE_GRACE) => {}
        () = state.shutdown.cancelled() => return,
    }
    if agent.stream.state().poll_gen != generation || agent.stream.last_seen() > closed_at {
        return;
    }
    match state.store.disconnect_agent(agent.id, closed_at).await {
        Ok(Some(change)) => crate::jobs::announce_presence(state, change, closed_at),
        Ok(None) => {}
        Err(e) => tracing::warn!(agent_id = %agent.id, error = %e, "Recording a WebSocket close failed"),
    }
}

#[cfg(test)]
mod tests {
    use tether_proto::ErrorKey;

    use super::*;

    #[test]
    fn error_replies_carry_the_envelope_error_object_and_no_data() {
        let body = ApiError::new(ErrorKey::NotFound, "command not found").into_body("req_1".into());
        let reply = ServerFrame::Reply(Reply { id: None, error: Some(body), data: Value::Null });
        let json = serde_json::to_value(reply).expect("encode");
        assert_eq!(json["type"], "reply");
        assert_eq!(json["error"]["key"], "NOT_FOUND");
        assert_eq!(json["error"]["request_id"], "req_1");
        assert_eq!(json["id"], Value::Null);
        assert!(json.get("data").is_none());
    }
}
