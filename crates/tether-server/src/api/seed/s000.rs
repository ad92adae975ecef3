//! Seed 000, the status-panel agent (docs/compat.md, protocol.md §16.1): an
//! operator enqueues `{id, name, params}` for the agent `X-Agent-Id` names,
//! the agent long-polls `wait` for `{id, name, params}` and reports what the
//! command did to `report`. Thin adapters over the native create (`id` is its
//! idempotency key), `commands/next` and the result report.
//!
//! `X-Agent-Id` names an agent by its tether id, or by its name or hostname
//! (a status-panel agent's `AGENT_ID`) when exactly one agent that is not
//! revoked has it. On the agent routes it must name the caller.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tether_proto::command::{CommandStatus, CreateCommand, ResultReport, Target};
use tether_proto::{AgentId, CommandId, ErrorKey};
use tether_store::AgentFilter;

use crate::api::{commands, stream};
use crate::auth::{AgentCaller, Operator};
use crate::error::{ApiError, ApiJson, ApiQuery, ApiResult};
use crate::state::{AppState, AuditContext};

route_table! {
    Operator post "/api/v1/agent/commands/enqueue" => enqueue,
    Agent    get  "/api/v1/agent/commands/wait" => wait,
    Agent    post "/api/v1/agent/commands/report" => report,
}

const AGENT_HEADER: &str = "x-agent-id";
/// The seed agent's own default wait (`POLLING_TIMEOUT_SECS`).
const DEFAULT_WAIT_S: u32 = 30;
/// Agents fetched per page while looking a name up.
const LOOKUP_PAGE: u32 = 500;

/// The `X-Agent-Id` header, required on every seed-000 route.
fn agent_header(headers: &HeaderMap) -> ApiResult<&str> {
    headers
        .get(AGENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::bad_request("X-Agent-Id", "the X-Agent-Id header is required"))
}

/// The one agent, not revoked, that `name` names: its id, or its name or
/// hostname when no other such agent shares it.
async fn resolve_agent(state: &AppState, name: &str) -> ApiResult<AgentId> {
    if let Ok(id) = name.parse::<AgentId>() {
        return match state.store.get_agent(id).await? {
            Some(rec) if rec.revoked_at.is_none() => Ok(id),
            _ => Err(ApiError::not_found("agent")),
        };
    }
    // The store filters on a substring of name or hostname; the exact match is decided here.
    let mut found = None;
    let mut filter = AgentFilter { q: Some(name.to_owned()), limit: LOOKUP_PAGE, ..AgentFilter::default() };
    loop {
        let page = state.store.list_agents(&filter).await?;
        for rec in &page {
            if rec.revoked_at.is_none() && (rec.name == name || rec.hostname == name) {
                if found.is_some_and(|id| id != rec.id) {
                    return Err(ApiError::bad_request(
                        "X-Agent-Id",
                        "more than one agent has this name or hostname; use the agent id",
                    ));
                }
                found = Some(rec.id);
            }
        }
        match page.last() {
            Some(last) if page.len() == LOOKUP_PAGE as usize => filter.after = Some(last.id),
            _ => break,
        }
    }
    found.ok_or_else(|| ApiError::not_found("agent"))
}

/// Refuses the request unless `X-Agent-Id` names the calling agent (by id,
/// name or hostname); says nothing about any other agent.
async fn check_caller(state: &AppState, agent: &AgentCaller, headers: &HeaderMap) -> ApiResult<()> {
    let named = agent_header(headers)?;
    if named.parse::<AgentId>().is_ok_and(|id| id == agent.id) {
        return Ok(());
    }
    let rec = state.store.get_agent(agent.id).await?.ok_or_else(ApiError::unauthenticated)?;
    if rec.name == named || rec.hostname == named {
        return Ok(());
    }
    Err(ApiError::new(ErrorKey::Forbidden, "X-Agent-Id does not name this agent"))
}

/// `POST /api/v1/agent/commands/enqueue`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnqueueRequest {
    id: String,
    name: String,
    #[serde(default = "empty_object")]
    params: Value,
}

fn empty_object() -> Value {
    json!({})
}

/// The seed's field names in an error of the native create.
fn seed_fields(mut err: ApiError) -> ApiError {
    for (native, seed) in [("idempotency_key", "id"), ("args", "params")] {
        if err.params.get("field").and_then(Value::as_str) == Some(native) {
            err.params.insert("field".into(), seed.into());
            err.what = err.what.replace(native, seed);
        }
    }
    err
}

/// `POST /api/v1/agent/commands/enqueue` (operator): a command for the agent
/// `X-Agent-Id` names; the same `id` and body again is the same command.
pub async fn enqueue(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    headers: HeaderMap,
    ApiJson(req): ApiJson<EnqueueRequest>,
) -> ApiResult<Response> {
    let agent_id = resolve_agent(&state, agent_header(&headers)?).await?;
    let mut create = CreateCommand::new(Target::agents([agent_id]), req.name);
    create.args = req.params;
    create.idempotency_key = Some(req.id.clone());
    let created = commands::create_commands(&state, &op, &ctx, create).await.map_err(seed_fields)?;
    let body = json!({
        "id": req.id,
        "command_id": created.command_ids.first(),
        "batch_id": created.batch_id,
        "agent_id": agent_id,
    });
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

#[derive(Debug, Deserialize)]
pub struct WaitQuery {
    timeout: Option<u32>,
}

/// `GET /api/v1/agent/commands/wait?timeout=` (agent): the next command as
/// `{id, name, params}` (marked delivered), or 204 once `timeout` seconds
/// (at most the native 30) passed without one.
pub async fn wait(
    State(state): State<AppState>,
    agent: AgentCaller,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<WaitQuery>,
) -> ApiResult<Response> {
    check_caller(&state, &agent, &headers).await?;
    let wait = q.timeout.unwrap_or(DEFAULT_WAIT_S);
    Ok(match stream::wait_next_command(&state, &agent, wait).await? {
        Some(cmd) => axum::Json(json!({"id": cmd.id, "name": cmd.name, "params": cmd.args})).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

/// What the seed agent posts after running a command. Its other fields
/// (`deployment_hash`, `completed_at`, …) are accepted and not kept.
#[derive(Debug, Deserialize)]
pub struct ReportRequest {
    command_id: String,
    status: String,
    /// `{stdout, stderr, exit_code}` when the command ran.
    #[serde(default)]
    result: Value,
    #[serde(default)]
    error: Option<String>,
}

impl ReportRequest {
    fn into_native(self) -> ApiResult<(CommandId, ResultReport)> {
        let id = self.command_id.parse().map_err(|_| ApiError::bad_request("command_id", "not a command id"))?;
        let status = match self.status.as_str() {
            "success" => CommandStatus::Succeeded,
            "failed" => CommandStatus::Failed,
            "timeout" => CommandStatus::TimedOut,
            _ => return Err(ApiError::bad_request("status", "status must be success, failed or timeout")),
        };
        let text = |field: &str| self.result.get(field).and_then(Value::as_str).unwrap_or_default().to_owned();
        let mut report = ResultReport::new(status);
        report.stdout = text("stdout");
        report.stderr = text("stderr");
        report.exit_code = self.result.get("exit_code").and_then(Value::as_i64).and_then(|c| i32::try_from(c).ok());
        report.output = self.error.map_or(Value::Null, Value::String);
        Ok((id, report))
    }
}

/// `POST /api/v1/agent/commands/report` (agent): the command's result,
/// recorded as the native result report records it.
pub async fn report(
    State(state): State<AppState>,
    agent: AgentCaller,
    ctx: AuditContext,
    headers: HeaderMap,
    ApiJson(req): ApiJson<ReportRequest>,
) -> ApiResult<Response> {
    check_caller(&state, &agent, &headers).await?;
    let (id, report) = req.into_native()?;
    let data = commands::record_result(&state, &ctx, agent.id, id, report).await?;
    Ok(axum::Json(data).into_response())
}
