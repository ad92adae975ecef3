//! The agent stream (protocol.md §4): `updates` long-poll and the simple
//! `commands/next` API. An idle poll is answered from memory.

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tether_proto::command::Command;
use tether_proto::signal::{COMMAND_QUEUED, CommandQueued, Updates};
use tether_proto::{AgentId, CommandId, Cursor, Data, ErrorKey};

use crate::api::etag::IfNoneMatch;
use crate::auth::{AgentCaller, revoked_error};
use crate::error::{ApiError, ApiQuery, ApiResult};
use crate::state::AppState;
use crate::stream::StreamState;

pub const MAX_WAIT_S: u32 = 30;
pub const MAX_LIMIT: u32 = 100;
const DEFAULT_LIMIT: u32 = 20;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UpdatesQuery {
    cursor: Option<String>,
    limit: Option<u32>,
    wait: Option<u32>,
}

fn check_wait(wait: Option<u32>) -> ApiResult<u32> {
    let wait = wait.unwrap_or(0);
    if wait > MAX_WAIT_S {
        return Err(ApiError::bad_request("wait", format!("wait must be 0..={MAX_WAIT_S} seconds")));
    }
    Ok(wait)
}

fn with_etag(status: StatusCode, cursor: Cursor, body: Option<Updates>) -> Response {
    let mut res = match body {
        Some(updates) => (status, axum::Json(Data { data: updates })).into_response(),
        None => status.into_response(),
    };
    if let Ok(v) = HeaderValue::from_str(&cursor.etag()) {
        res.headers_mut().insert(header::ETAG, v);
    }
    res
}

/// Waits until `ready` holds for the stream, `wait_s` passes or the server
/// shuts down, whichever comes first.
async fn park(
    state: &AppState,
    rx: &mut tokio::sync::watch::Receiver<StreamState>,
    wait_s: u32,
    ready: impl FnMut(&StreamState) -> bool,
) {
    let _parked = state.streams.park();
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(wait_s.into())) => {}
        _ = state.shutdown.cancelled() => {}
        _ = rx.wait_for(ready) => {}
    }
}

/// `GET /api/v1/agents/self/updates?cursor=&limit=&wait=`
#[utoipa::path(
    get,
    path = "/api/v1/agents/self/updates",
    tag = "stream",
    params(UpdatesQuery),
    security(("agent_token" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = 204, description = "No content"),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn updates(
    State(state): State<AppState>,
    agent: AgentCaller,
    IfNoneMatch(if_none_match): IfNoneMatch,
    ApiQuery(q): ApiQuery<UpdatesQuery>,
) -> ApiResult<Response> {
    Ok(match poll(&state, &agent, if_none_match, q).await? {
        Polled::Idle(cursor) => with_etag(StatusCode::NO_CONTENT, cursor, None),
        Polled::Signals(cursor, body) => with_etag(StatusCode::OK, cursor, Some(body)),
    })
}

/// What a poll found.
pub(crate) enum Polled {
    /// Nothing after the cursor (204).
    Idle(Cursor),
    /// Signals after the cursor, and the cursor after them (200).
    Signals(Cursor, Updates),
}

/// One poll of the caller's stream (protocol.md §4): range checks, the
/// cursor from the query or `If-None-Match`, the poll bucket, parking,
/// revocation and `CURSOR_EXPIRED`. Shared with seed 003's alias, which
/// only presents the answer differently.
pub(crate) async fn poll(
    state: &AppState,
    agent: &AgentCaller,
    if_none_match: Option<String>,
    q: UpdatesQuery,
) -> ApiResult<Polled> {
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request("limit", format!("limit must be 1..={MAX_LIMIT}")));
    }
    let wait = check_wait(q.wait)?;
    let cursor = parse_cursor(q.cursor.or(if_none_match))?;
    let generation = agent.stream.begin_poll();
    let mut rx = agent.stream.subscribe();
    let start = *rx.borrow_and_update();
    let from = resume_from(cursor, &start)?;
    // Only polls answered at once count against the poll bucket; a poll that waits is free.
    if start.head > from || wait == 0 {
        state.limits.immediate_poll(agent.id)?;
    }
    if start.head <= from && wait > 0 {
        park(state, &mut rx, wait, |s| {
            s.head > from || s.poll_gen != generation || s.revoked || s.epoch != start.epoch
        })
        .await;
    }
    let now = agent.stream.state();
    if now.revoked {
        return Err(revoked_error(&agent.stream));
    }
    if now.epoch != start.epoch || from < now.floor {
        return Err(ApiError::new(ErrorKey::CursorExpired, "the stream was reset or pruned past the cursor; resync"));
    }
    if now.head <= from || now.poll_gen != generation {
        return Ok(Polled::Idle(Cursor { epoch: start.epoch, seq: from }));
    }

    let (cursor, body) = deliver(state, agent.id, Cursor { epoch: start.epoch, seq: from }, limit).await?;
    Ok(Polled::Signals(cursor, body))
}

/// The cursor of a poll or WebSocket (query or `If-None-Match`); none or
/// empty means from the start.
pub(crate) fn parse_cursor(text: Option<String>) -> ApiResult<Option<Cursor>> {
    text.filter(|t| !t.is_empty())
        .map(|t| Cursor::parse_etag(&t))
        .transpose()
        .map_err(|e| ApiError::bad_request("cursor", e.to_string()))
}

/// The seq after which to send signals, or 409 CURSOR_EXPIRED for a cursor
/// of another epoch or outside the retained window (protocol.md §4).
pub(crate) fn resume_from(cursor: Option<Cursor>, start: &StreamState) -> ApiResult<u64> {
    match cursor {
        None => Ok(start.floor),
        Some(c) if c.epoch == start.epoch && c.seq <= start.head && c.seq >= start.floor => Ok(c.seq),
        Some(_) => Err(ApiError::new(ErrorKey::CursorExpired, "cursor is outside the retained stream; resync")
            .with("cursor", format!("{}-{}", start.epoch, start.floor))),
    }
}

/// Reads up to `limit` signals after `from` and marks the commands among
/// them delivered: the caller writes them out next (protocol.md §4).
pub(crate) async fn deliver(
    state: &AppState,
    agent_id: AgentId,
    from: Cursor,
    limit: u32,
) -> ApiResult<(Cursor, Updates)> {
    let signals = state.store.read_signals(agent_id, from.seq, limit).await?;
    let last = signals.last().map_or(from.seq, |(seq, _)| *seq);
    let delivered: Vec<CommandId> = signals
        .iter()
        .filter(|(_, s)| s.kind == COMMAND_QUEUED)
        .filter_map(|(_, s)| serde_json::from_value::<CommandQueued>(s.reference.clone()).ok())
        .map(|c| c.command_id)
        .collect();
    if !delivered.is_empty() {
        let marked = state.deliveries.mark(crate::deliveries::Delivered { agent_id, commands: delivered }).await;
        marked.map_err(|crate::deliveries::Stopped| {
            ApiError::unavailable("the server is shutting down", crate::error::STORE_RETRY_AFTER_S)
        })??;
    }
    let cursor = Cursor { epoch: from.epoch, seq: last };
    let body = Updates { cursor: cursor.to_string(), signals: signals.into_iter().map(|(_, s)| s).collect() };
    Ok((cursor, body))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct NextQuery {
    wait: Option<u32>,
}

/// `GET /api/v1/agents/self/commands/next?wait=`: the next queued command,
/// marked delivered, or 204 after `wait` seconds.
#[utoipa::path(
    get,
    path = "/api/v1/agents/self/commands/next",
    tag = "stream",
    params(NextQuery),
    security(("agent_token" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = 204, description = "No content"),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn next_command(
    State(state): State<AppState>,
    agent: AgentCaller,
    ApiQuery(q): ApiQuery<NextQuery>,
) -> ApiResult<Response> {
    match wait_next_command(&state, &agent, check_wait(q.wait)?).await? {
        Some(cmd) => Ok(axum::Json(Data { data: cmd }).into_response()),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

/// The agent's next queued command, marked delivered, waiting up to
/// `wait_s` seconds (at most [`MAX_WAIT_S`]) for one; shared by
/// `commands/next` and the seed routes that long-poll for a command.
pub(crate) async fn wait_next_command(
    state: &AppState,
    agent: &AgentCaller,
    wait_s: u32,
) -> ApiResult<Option<Command>> {
    let wait = wait_s.min(MAX_WAIT_S);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait.into());
    let mut rx = agent.stream.subscribe();
    loop {
        let head = rx.borrow_and_update().head;
        let now = state.clock.now_ms();
        if let Some(cmd) = state.store.take_next_command(agent.id, now).await? {
            return Ok(Some(cmd));
        }
        // Woken by any new signal; not every signal is a command, so look again.
        let parked = state.streams.park();
        let woken = tokio::select! {
            _ = tokio::time::sleep_until(deadline) => false,
            _ = state.shutdown.cancelled() => false,
            _ = rx.wait_for(|s| s.head > head || s.revoked) => true,
        };
        drop(parked);
        if agent.stream.state().revoked {
            return Err(revoked_error(&agent.stream));
        }
        if !woken {
            return Ok(None);
        }
    }
}
