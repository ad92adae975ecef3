//! Commands: operators create, list, inspect and cancel them; agents report
//! `running` and results (protocol.md §5).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use tether_proto::command::{
    Batch, Command, CommandStatus, CreateCommand, CreatedCommands, MAX_OUTPUT_BYTES, ResultReport, StatusReport,
};
use tether_proto::{AgentId, BatchId, CommandId, Data, Page};
use tether_store::{CancelOutcome, CommandFilter, CreatedBatch, NewBatch, ResultOutcome, StoreError};

use crate::api::page::{page_limit, parse_param};
use crate::auth::{AgentCaller, Operator};
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery, ApiResult};
use crate::results::PendingResult;
use crate::state::{AppState, AuditContext, AuditEvent};
use crate::stream::StreamEvent;

/// `POST /api/v1/commands`
#[utoipa::path(
    post,
    path = "/api/v1/commands",
    request_body = tether_proto::command::CreateCommand,
    tag = "commands",
    description = "Requires the operator role.",
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 201, description = "Success", body = tether_proto::Data<tether_proto::command::CreatedCommands>),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    ApiJson(req): ApiJson<CreateCommand>,
) -> ApiResult<Response> {
    let body = create_commands(&state, &op, &ctx, req).await?;
    Ok((StatusCode::CREATED, axum::Json(Data { data: body })).into_response())
}

/// Creates a batch of commands (checked, idempotent by key, audited) and
/// wakes the agents it targets; shared by the native route and the seed
/// routes that enqueue.
pub(crate) async fn create_commands(
    state: &AppState,
    op: &Operator,
    ctx: &AuditContext,
    req: CreateCommand,
) -> ApiResult<CreatedCommands> {
    let target =
        req.validate().map_err(|(field, what)| ApiError::bad_request(field, format!("invalid {field}: {what}")))?;
    // serde_json maps are sorted, so this serialization is canonical.
    let request_hash: [u8; 32] = Sha256::digest(serde_json::to_vec(&req).map_err(ApiError::internal)?).into();
    let audit = |created: &CreatedBatch| {
        state.audit_entry(
            ctx,
            AuditEvent::by_user(
                op.name(),
                "command.create",
                created.batch_id.to_string(),
                json!({"name": req.name, "target": req.target, "commands": created.command_ids.len()}),
            ),
        )
    };
    let batch = NewBatch {
        id: BatchId::new(),
        target,
        request: req.clone(),
        created_by: op.name().to_owned(),
        request_hash,
        now: state.clock.now_ms(),
    };
    let created = state.store.create_batch(batch, &audit).await?;
    state.notifier.publish(StreamEvent::Heads(created.heads));
    Ok(CreatedCommands { batch_id: created.batch_id, command_ids: created.command_ids })
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    status: Option<String>,
    agent_id: Option<String>,
    batch_id: Option<String>,
    cursor: Option<String>,
    limit: Option<u32>,
}

async fn list_page(state: &AppState, q: ListQuery, agent_id: Option<AgentId>) -> ApiResult<Page<Command>> {
    let limit = page_limit(q.limit)?;
    let statuses = q
        .status
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<CommandStatus>().map_err(|e| ApiError::bad_request("status", e)))
        .collect::<ApiResult<Vec<_>>>()?;
    let filter = CommandFilter {
        statuses,
        agent_id: agent_id.or(parse_param("agent_id", q.agent_id.as_deref())?),
        batch_id: parse_param("batch_id", q.batch_id.as_deref())?,
        before: parse_param("cursor", q.cursor.as_deref())?,
        limit,
    };
    let data = state.store.list_commands(&filter).await?;
    let next_cursor = (data.len() == limit as usize).then(|| data.last().map(|c| c.id.to_string())).flatten();
    Ok(Page { data, next_cursor })
}

/// `GET /api/v1/commands?status=&agent_id=&batch_id=&cursor=&limit=`
#[utoipa::path(
    get,
    path = "/api/v1/commands",
    tag = "commands",
    description = "Requires the viewer role.",
    params(ListQuery),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = tether_proto::Page<tether_proto::command::Command>),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn list(State(state): State<AppState>, _: Operator, ApiQuery(q): ApiQuery<ListQuery>) -> ApiResult<Response> {
    Ok(axum::Json(list_page(&state, q, None).await?).into_response())
}

/// `GET /api/v1/agents/{id}/commands`
#[utoipa::path(
    get,
    path = "/api/v1/agents/{id}/commands",
    tag = "commands",
    description = "Requires the viewer role.",
    params(("id" = String, Path, format = Uuid), ListQuery),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = tether_proto::Page<tether_proto::command::Command>),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn list_for_agent(
    State(state): State<AppState>,
    _: Operator,
    ApiPath(id): ApiPath<AgentId>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Response> {
    Ok(axum::Json(list_page(&state, q, Some(id)).await?).into_response())
}

/// `GET /api/v1/commands/{id}`
#[utoipa::path(
    get,
    path = "/api/v1/commands/{id}",
    tag = "commands",
    description = "Requires the viewer role.",
    params(("id" = String, Path, format = Uuid)),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = tether_proto::Data<tether_proto::command::Command>),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn get(State(state): State<AppState>, _: Operator, ApiPath(id): ApiPath<CommandId>) -> ApiResult<Response> {
    let cmd = state.store.get_command(id).await?.ok_or_else(|| ApiError::not_found("command"))?;
    Ok(axum::Json(Data { data: cmd }).into_response())
}

fn cancel_error(e: StoreError, what: &str) -> ApiError {
    match e {
        StoreError::Conflict(_) => ApiError::conflict(format!("{what} is already finished")),
        other => other.into(),
    }
}

/// `POST /api/v1/commands/{id}/cancel`
#[utoipa::path(
    post,
    path = "/api/v1/commands/{id}/cancel",
    tag = "commands",
    description = "Requires the operator role.",
    params(("id" = String, Path, format = Uuid)),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = tether_proto::Data<tether_proto::command::Command>),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn cancel(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    ApiPath(id): ApiPath<CommandId>,
) -> ApiResult<Response> {
    let audit = state.audit_entry(&ctx, AuditEvent::by_user(op.name(), "command.cancel", id.to_string(), json!({})));
    let out =
        state.store.cancel_command(id, state.clock.now_ms(), audit).await.map_err(|e| cancel_error(e, "command"))?;
    state.notifier.publish(StreamEvent::Heads(out.heads));
    let cmd = state.store.get_command(id).await?.ok_or_else(|| ApiError::not_found("command"))?;
    Ok(axum::Json(Data { data: cmd }).into_response())
}

/// `GET /api/v1/batches/{id}`
#[utoipa::path(
    get,
    path = "/api/v1/batches/{id}",
    tag = "commands",
    description = "Requires the viewer role.",
    params(("id" = String, Path, format = Uuid)),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = tether_proto::Data<tether_proto::command::Batch>),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn get_batch(
    State(state): State<AppState>,
    _: Operator,
    ApiPath(id): ApiPath<BatchId>,
) -> ApiResult<Response> {
    let batch: Batch = state.store.get_batch(id).await?.ok_or_else(|| ApiError::not_found("batch"))?;
    Ok(axum::Json(Data { data: batch }).into_response())
}

/// `POST /api/v1/batches/{id}/cancel`: cancels every command still active.
#[utoipa::path(
    post,
    path = "/api/v1/batches/{id}/cancel",
    tag = "commands",
    description = "Requires the operator role.",
    params(("id" = String, Path, format = Uuid)),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = tether_proto::Data<tether_proto::command::Batch>),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn cancel_batch(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    ApiPath(id): ApiPath<BatchId>,
) -> ApiResult<Response> {
    let audit = |out: &CancelOutcome| {
        state.audit_entry(
            &ctx,
            AuditEvent::by_user(op.name(), "batch.cancel", id.to_string(), json!({"cancelled": out.cancelled.len()})),
        )
    };
    let out = state.store.cancel_batch(id, state.clock.now_ms(), &audit).await.map_err(|e| cancel_error(e, "batch"))?;
    state.notifier.publish(StreamEvent::Heads(out.heads));
    let batch = state.store.get_batch(id).await?.ok_or_else(|| ApiError::not_found("batch"))?;
    Ok(axum::Json(Data { data: batch }).into_response())
}

/// `POST /api/v1/agents/self/commands/{id}/status {state:"running"}`
#[utoipa::path(
    post,
    path = "/api/v1/agents/self/commands/{id}/status",
    request_body(content = serde_json::Value, content_type = "application/json", description = "See protocol.md §15"),
    tag = "commands",
    params(("id" = String, Path, format = Uuid)),
    security(("agent_token" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn report_status(
    State(state): State<AppState>,
    agent: AgentCaller,
    ApiPath(id): ApiPath<CommandId>,
    ApiJson(report): ApiJson<StatusReport>,
) -> ApiResult<Response> {
    let data = record_status(&state, agent.id, id, report).await?;
    Ok(axum::Json(Data { data }).into_response())
}

/// Records that the agent started a command; shared by the HTTP route and
/// the agent WebSocket.
pub(crate) async fn record_status(
    state: &AppState,
    agent_id: AgentId,
    id: CommandId,
    report: StatusReport,
) -> ApiResult<serde_json::Value> {
    if report.state != CommandStatus::Running {
        return Err(ApiError::bad_request("state", "state must be \"running\"; send results to …/result"));
    }
    let cmd = state.store.report_running(agent_id, id, state.clock.now_ms()).await?;
    Ok(json!({"id": cmd.id, "status": cmd.status}))
}

/// `POST /api/v1/agents/self/commands/{id}/result`
#[utoipa::path(
    post,
    path = "/api/v1/agents/self/commands/{id}/result",
    request_body(content = serde_json::Value, content_type = "application/json", description = "See protocol.md §15"),
    tag = "commands",
    params(("id" = String, Path, format = Uuid)),
    security(("agent_token" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn report_result(
    State(state): State<AppState>,
    agent: AgentCaller,
    ctx: AuditContext,
    ApiPath(id): ApiPath<CommandId>,
    ApiJson(report): ApiJson<ResultReport>,
) -> ApiResult<Response> {
    let data = record_result(&state, &ctx, agent.id, id, report).await?;
    Ok(axum::Json(Data { data }).into_response())
}

/// Records a command's result (once: a different second result is a
/// conflict); shared by the HTTP route, the agent WebSocket and the seed
/// routes. The report is committed in a group with others reported at the
/// same time (`crate::results`); it is answered once its group committed.
pub(crate) async fn record_result(
    state: &AppState,
    ctx: &AuditContext,
    agent_id: AgentId,
    id: CommandId,
    mut report: ResultReport,
) -> ApiResult<serde_json::Value> {
    if !report.status.is_result() {
        return Err(ApiError::bad_request(
            "status",
            "status must be one of succeeded, failed, timed_out, rejected, cancelled",
        ));
    }
    let cut_out = tether_proto::cap_utf8(&mut report.stdout, MAX_OUTPUT_BYTES);
    let cut_err = tether_proto::cap_utf8(&mut report.stderr, MAX_OUTPUT_BYTES);
    report.truncated |= cut_out || cut_err;
    let (audit_state, audit_ctx) = (state.clone(), ctx.clone());
    let audit = Box::new(move |command: &Command, late: bool| {
        let outcome = if late { "late" } else { "ok" };
        let details = json!({"status": command.status});
        audit_state.audit_entry(&audit_ctx, result_event(&agent_id.to_string(), id, outcome, details))
    });
    let status = report.status;
    let pending = PendingResult { agent_id, id, report, now: state.clock.now_ms(), audit };
    let recorded = state.results.record(pending).await.map_err(|crate::results::Stopped| {
        ApiError::unavailable("the server is shutting down", crate::error::STORE_RETRY_AFTER_S)
    })?;
    match recorded {
        Ok(ResultOutcome::Recorded { command, .. }) => Ok(json!({"id": id, "status": command.status})),
        Ok(ResultOutcome::Unchanged) => Ok(json!({"id": id, "status": status})),
        Err(StoreError::Conflict(what)) => {
            let details = json!({"reported": status, "reason": what});
            state.audit(ctx, result_event(&agent_id.to_string(), id, "conflict", details)).await;
            Err(ApiError::conflict(format!("a different result is already recorded: {what}")))
        }
        Err(other) => Err(other.into()),
    }
}

/// The `command.result` audit event of an agent's report.
fn result_event<'a>(
    agent: &'a str,
    id: CommandId,
    outcome: &'static str,
    details: serde_json::Value,
) -> AuditEvent<'a> {
    AuditEvent { actor: agent, actor_kind: "agent", action: "command.result", target: id.to_string(), outcome, details }
}
