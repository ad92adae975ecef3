//! The audit log (protocol.md §10): read with filters, verify the hash chain, and
//! let agents append events about themselves. There is no update or delete.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tether_proto::user::{AgentAuditEvent, AuditBreak, AuditRow, AuditVerification};
use tether_proto::{Data, Page};
use tether_store::{AuditFilter, AuditRecord, Role};

use crate::api::page::{page_limit, parse_param, parse_time};
use crate::auth::{AgentCaller, Operator};
use crate::clock::rfc3339;
use crate::error::{ApiError, ApiJson, ApiQuery, ApiResult};
use crate::state::{AppState, AuditContext, AuditEvent};

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    actor: Option<String>,
    agent_id: Option<String>,
    action: Option<String>,
    from: Option<String>,
    to: Option<String>,
    cursor: Option<String>,
    limit: Option<u32>,
}

/// A stored row as the API shows it (also the event feed's `data`).
pub(crate) fn row(r: AuditRecord) -> AuditRow {
    AuditRow {
        id: r.id,
        ts: rfc3339(r.ts),
        actor: r.actor,
        actor_kind: r.actor_kind,
        action: r.action,
        target: r.target,
        outcome: r.outcome,
        ip: r.ip,
        request_id: r.request_id,
        details: r.details,
        hash: hex::encode(&r.hash),
    }
}

/// `GET /api/v1/audit?actor=&agent_id=&action=&from=&to=&cursor=&limit=`:
/// admins see every row, other users only their own.
#[utoipa::path(
    get,
    path = "/api/v1/audit",
    tag = "audit",
    description = "Any signed-in user.",
    params(AuditQuery),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = tether_proto::Page<tether_proto::user::AuditRow>),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    op: Operator,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<Response> {
    let limit = page_limit(q.limit)?;
    let actor = if op.user.role == Role::Admin { q.actor } else { Some(op.user.username.clone()) };
    let filter = AuditFilter {
        actor,
        agent_id: parse_param("agent_id", q.agent_id.as_deref())?,
        action: q.action.filter(|a| !a.is_empty()),
        from: parse_time("from", q.from.as_deref())?,
        to: parse_time("to", q.to.as_deref())?,
        before: parse_param("cursor", q.cursor.as_deref())?,
        limit,
    };
    let rows = state.store.query_audit(&filter).await?;
    let next_cursor = (rows.len() == limit as usize).then(|| rows.last().map(|r| r.id.to_string())).flatten();
    Ok(axum::Json(Page { data: rows.into_iter().map(row).collect(), next_cursor }).into_response())
}

/// `GET /api/v1/audit/verify`: walks the hash chain from the first row and
/// lists every row that breaks it.
#[utoipa::path(
    get,
    path = "/api/v1/audit/verify",
    tag = "audit",
    description = "Requires the admin role.",
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn verify(State(state): State<AppState>, _: Operator) -> ApiResult<Response> {
    let v = tether_store::verify_audit(state.store.as_ref()).await?;
    let first = v.broken.first();
    let body = AuditVerification {
        ok: v.broken_count == 0,
        checked: v.checked,
        first_bad_id: first.map(|b| b.id),
        problem: first.map(|b| b.problem.clone()),
        broken: v.broken.iter().map(|b| AuditBreak { id: b.id, problem: b.problem.clone() }).collect(),
        broken_count: v.broken_count,
    };
    Ok(axum::Json(Data { data: body }).into_response())
}

/// `POST /api/v1/agents/self/audit {action, target, details}`
#[utoipa::path(
    post,
    path = "/api/v1/agents/self/audit",
    request_body = tether_proto::user::AgentAuditEvent,
    tag = "audit",
    security(("agent_token" = [])),
    responses(
        (status = 201, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn agent_append(
    State(state): State<AppState>,
    agent: AgentCaller,
    ctx: AuditContext,
    ApiJson(event): ApiJson<AgentAuditEvent>,
) -> ApiResult<Response> {
    agent_event(&state, &ctx, agent.id, event).await?;
    Ok((StatusCode::CREATED, axum::Json(Data { data: serde_json::json!({}) })).into_response())
}

/// Checks an event an agent reports about itself and appends it as
/// `agent.<action>`; returns once the row is committed.
pub(crate) async fn agent_event(
    state: &AppState,
    ctx: &AuditContext,
    agent_id: tether_proto::AgentId,
    event: AgentAuditEvent,
) -> ApiResult<()> {
    let action_ok = (1..=64).contains(&event.action.len())
        && event.action.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !action_ok {
        return Err(ApiError::bad_request("action", "action must be 1-64 chars of [A-Za-z0-9._-]"));
    }
    if event.target.len() > 256 || event.details.to_string().len() > 4096 {
        return Err(ApiError::bad_request("details", "target ≤ 256 bytes and details ≤ 4 KiB"));
    }
    let actor = agent_id.to_string();
    let action = format!("agent.{}", event.action);
    let entry = state.audit_entry(
        ctx,
        AuditEvent {
            actor: &actor,
            actor_kind: "agent",
            action: &action,
            target: event.target,
            outcome: "reported",
            details: event.details,
        },
    );
    // The row is what this call creates: a 2xx only once it is committed.
    state.store.append_audit(entry).await?;
    Ok(())
}
