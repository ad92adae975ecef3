//! Seed 001, the EDR command queue (docs/compat.md, protocol.md §16.2): the
//! agent polls `/command/poll?host=` for its pending commands and posts each
//! outcome to `/command/result`. Thin adapters over `commands/next` (every
//! command handed out is marked delivered) and the native result report; a
//! result needs no `running` report before it.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tether_proto::ErrorKey;
use tether_proto::command::{CommandStatus, ResultReport};

use crate::api::{commands, stream};
use crate::auth::AgentCaller;
use crate::error::{ApiError, ApiJson, ApiQuery, ApiResult};
use crate::state::{AppState, AuditContext};

route_table! {
    Agent get  "/command/poll" => poll,
    Agent post "/command/result" => result,
}

#[derive(Debug, Deserialize)]
pub struct PollQuery {
    host: String,
}

/// `GET /command/poll?host=` (agent): the caller's pending commands, at most
/// as many as one native stream read returns, as
/// `{"commands":[{id, command, params}]}`. `host` must be the caller's own
/// hostname (compared without regard to ASCII case, as DNS names are).
pub async fn poll(
    State(state): State<AppState>,
    agent: AgentCaller,
    ApiQuery(q): ApiQuery<PollQuery>,
) -> ApiResult<Response> {
    let rec = state.store.get_agent(agent.id).await?.ok_or_else(ApiError::unauthenticated)?;
    if !rec.hostname.eq_ignore_ascii_case(&q.host) {
        return Err(ApiError::new(ErrorKey::Forbidden, "host is not this agent's hostname"));
    }
    let mut pending = Vec::new();
    while pending.len() < stream::MAX_LIMIT as usize {
        let Some(cmd) = stream::wait_next_command(&state, &agent, 0).await? else { break };
        pending.push(json!({"id": cmd.id, "command": cmd.name, "params": cmd.args}));
    }
    Ok(axum::Json(json!({ "commands": pending })).into_response())
}

/// `POST /command/result`. Other fields the agent sends are accepted and not kept.
#[derive(Debug, Deserialize)]
pub struct ResultRequest {
    command_id: String,
    success: bool,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    data: Value,
}

impl ResultRequest {
    /// `success` → `succeeded`/`failed`, `message` → `output`, `data` (as
    /// compact JSON) → `stdout`.
    fn into_native(self) -> ApiResult<(tether_proto::CommandId, ResultReport)> {
        let id = self.command_id.parse().map_err(|_| ApiError::bad_request("command_id", "not a command id"))?;
        let mut report = ResultReport::new(if self.success { CommandStatus::Succeeded } else { CommandStatus::Failed });
        report.output = self.message.map_or(Value::Null, Value::String);
        if !self.data.is_null() {
            report.stdout = self.data.to_string();
        }
        Ok((id, report))
    }
}

/// `POST /command/result {command_id, success, message, data}` (agent).
pub async fn result(
    State(state): State<AppState>,
    agent: AgentCaller,
    ctx: AuditContext,
    ApiJson(req): ApiJson<ResultRequest>,
) -> ApiResult<Response> {
    let (id, report) = req.into_native()?;
    let data = commands::record_result(&state, &ctx, agent.id, id, report).await?;
    Ok(axum::Json(data).into_response())
}
