//! Operator views of agents and the enrollment tokens that create them.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use tether_proto::agent::{
    Agent, AgentKey, AgentStatus, CreateEnrollToken, CreatedEnrollToken, EnrollToken, RevokeRequest, UpdateAgent,
    validate_labels,
};
use tether_proto::{AgentId, Data, Labels, Page};
use tether_store::{AgentFilter, AgentRecord, AgentUpdate, Millis, NewEnrollToken, StatusFilter};

use crate::api::page::{page_limit, parse_param};
use crate::auth::Operator;
use crate::auth::secret::{ENROLL_TOKEN_PREFIX, hash_token, new_token};
use crate::clock::rfc3339;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery, ApiResult};
use crate::state::{AppState, AuditContext, AuditEvent};
use crate::stream::StreamEvent;

const MAX_ENROLL_USES: u32 = 1_000_000;
const MAX_ENROLL_LIFETIME_S: u64 = 366 * 86_400;

/// Agents seen at or after this instant are online (protocol.md §8).
fn seen_since(state: &AppState) -> Millis {
    state.config.telemetry.seen_since(state.clock.now_ms())
}

fn agent_view(state: &AppState, rec: AgentRecord) -> Agent {
    // Memory knows about requests not yet flushed to the store.
    let last_seen = rec.last_seen.max(state.streams.last_seen(rec.id));
    let status = if rec.revoked_at.is_some() {
        AgentStatus::Revoked
    } else if rec.online_at(last_seen, seen_since(state)) {
        AgentStatus::Online
    } else {
        AgentStatus::Offline
    };
    Agent {
        id: rec.id,
        name: rec.name,
        hostname: rec.hostname,
        labels: rec.labels,
        status,
        version: rec.version,
        last_seen: last_seen.map(rfc3339),
        applied_config_hash: rec.applied_config_hash,
        // A failure is news only while it is about what the agent should run.
        config_error: rec
            .config_error
            .filter(|_| rec.config_failed_hash.is_some() && rec.config_failed_hash == rec.config_hash),
        desired_config_hash: rec.config_hash,
        created_at: rfc3339(rec.created_at),
        revoked_at: rec.revoked_at.map(rfc3339),
        facts: rec.facts,
        heartbeat: rec.heartbeat,
        keys: None,
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AgentListQuery {
    label: Option<String>,
    status: Option<AgentStatus>,
    q: Option<String>,
    cursor: Option<String>,
    limit: Option<u32>,
}

/// `GET /api/v1/agents?label=k=v&status=online|offline|revoked&q=&cursor=&limit=`
#[utoipa::path(
    get,
    path = "/api/v1/agents",
    tag = "agents",
    description = "Requires the viewer role.",
    params(AgentListQuery),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = tether_proto::Page<tether_proto::agent::Agent>),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    _: Operator,
    ApiQuery(q): ApiQuery<AgentListQuery>,
) -> ApiResult<Response> {
    let limit = page_limit(q.limit)?;
    let mut labels = Labels::new();
    for pair in q.label.as_deref().unwrap_or_default().split(',').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| ApiError::bad_request("label", "label filters are k=v"))?;
        labels.insert(k.to_owned(), v.to_owned());
    }
    // The same rule as labels on agents and enroll tokens: no filter can
    // name a key that no agent could carry.
    validate_labels(&labels).map_err(|e| ApiError::bad_request("label", e))?;
    let filter = AgentFilter {
        labels,
        q: q.q.filter(|s| !s.is_empty()),
        status: q.status.map(|status| match status {
            AgentStatus::Online => StatusFilter::Online { seen_since: seen_since(&state) },
            AgentStatus::Offline => StatusFilter::Offline { seen_since: seen_since(&state) },
            AgentStatus::Revoked => StatusFilter::Revoked,
        }),
        after: parse_param("cursor", q.cursor.as_deref())?,
        limit,
    };
    Ok(axum::Json(page(&state, &filter).await?).into_response())
}

/// One page of agents as operators see them, with the cursor of the next.
pub(crate) async fn page(state: &AppState, filter: &AgentFilter) -> ApiResult<Page<Agent>> {
    let records = state.store.list_agents(filter).await?;
    let next_cursor =
        (records.len() == filter.limit as usize).then(|| records.last().map(|a| a.id.to_string())).flatten();
    let data = records.into_iter().map(|r| agent_view(state, r)).collect();
    Ok(Page { data, next_cursor })
}

/// `GET /api/v1/agents/{id}`: the agent, with its long-lived keys (never their secrets).
#[utoipa::path(
    get,
    path = "/api/v1/agents/{id}",
    tag = "agents",
    description = "Requires the viewer role.",
    params(("id" = String, Path, format = Uuid)),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = tether_proto::Data<tether_proto::agent::Agent>),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn get(State(state): State<AppState>, _: Operator, ApiPath(id): ApiPath<AgentId>) -> ApiResult<Response> {
    let rec = state.store.get_agent(id).await?.ok_or_else(|| ApiError::not_found("agent"))?;
    let keys = state.store.list_agent_keys(id).await?;
    let keys = keys.into_iter().map(|k| AgentKey { id: k.id, last4: k.last4, created_at: rfc3339(k.created_at) });
    let agent = Agent { keys: Some(keys.collect()), ..agent_view(&state, rec) };
    Ok(axum::Json(Data { data: agent }).into_response())
}

/// `PATCH /api/v1/agents/{id} {labels, name}`: new labels re-target the
/// agent's configuration (and, from now on, commands by label).
#[utoipa::path(
    patch,
    path = "/api/v1/agents/{id}",
    request_body = tether_proto::agent::UpdateAgent,
    tag = "agents",
    description = "Requires the operator role.",
    params(("id" = String, Path, format = Uuid)),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = tether_proto::Data<tether_proto::agent::Agent>),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn update(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    ApiPath(id): ApiPath<AgentId>,
    ApiJson(req): ApiJson<UpdateAgent>,
) -> ApiResult<Response> {
    if let Some(labels) = &req.labels {
        validate_labels(labels).map_err(|e| ApiError::bad_request("labels", e))?;
    }
    if let Some(name) = &req.name
        && !crate::api::enroll::hostname_ok(name)
    {
        return Err(ApiError::bad_request("name", "name must be 1-253 printable chars"));
    }
    let details = json!({"labels": req.labels, "name": req.name});
    let audit = state.audit_entry(&ctx, AuditEvent::by_user(op.name(), "agent.update", id.to_string(), details));
    let update = AgentUpdate { labels: req.labels, name: req.name };
    let (rec, heads) = state.store.update_agent(id, update, state.clock.now_ms(), audit).await?;
    state.notifier.publish(StreamEvent::Heads(heads));
    Ok(axum::Json(Data { data: agent_view(&state, rec) }).into_response())
}

/// `POST /api/v1/agents/{id}/revoke {reason}`: every further call of the
/// agent answers 403 DEVICE_REVOKED and its open poll ends now.
#[utoipa::path(
    post,
    path = "/api/v1/agents/{id}/revoke",
    request_body(content = Option<tether_proto::agent::RevokeRequest>, content_type = "application/json", description = "Optional: `{\"reason\": …}`"),
    tag = "agents",
    description = "Requires the operator role.",
    params(("id" = String, Path, format = Uuid)),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = tether_proto::Data<tether_proto::agent::Agent>),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn revoke(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    ApiPath(id): ApiPath<AgentId>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    // The body is optional: an empty one means no reason given.
    let req: RevokeRequest = if body.is_empty() {
        RevokeRequest::default()
    } else {
        crate::error::decode_json(&headers, &body, crate::error::DEFAULT_BODY_LIMIT)?
    };
    let reason = req.reason;
    let reason = if reason.is_empty() { format!("revoked by {}", op.name()) } else { reason };
    let audit = state
        .audit_entry(&ctx, AuditEvent::by_user(op.name(), "agent.revoke", id.to_string(), json!({"reason": reason})));
    let now = state.clock.now_ms();
    let rec = state.store.revoke_agent(id, &reason, now, audit).await?;
    let (at, reason) = (rec.revoked_at.unwrap_or(now), rec.revoke_reason.clone().unwrap_or_default());
    state.notifier.publish(StreamEvent::Revoked { agent_id: id, at, reason });
    tracing::info!(agent_id = %id, "Agent revoked");
    Ok(axum::Json(Data { data: agent_view(&state, rec) }).into_response())
}

/// `DELETE /api/v1/agents/{id}`: revokes the agent (its open poll ends,
/// its tokens stop working) and removes it with its stream, commands,
/// reports, metrics and inventory; the audit log keeps its history.
#[utoipa::path(
    delete,
    path = "/api/v1/agents/{id}",
    tag = "agents",
    description = "Requires the operator role.",
    params(("id" = String, Path, format = Uuid)),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    ApiPath(id): ApiPath<AgentId>,
) -> ApiResult<Response> {
    let audit = state.audit_entry(&ctx, AuditEvent::by_user(op.name(), "agent.delete", id.to_string(), json!({})));
    let rec = state.store.delete_agent(id, audit).await?;
    let reason = format!("deleted by {}", op.name());
    state.notifier.publish(StreamEvent::Revoked { agent_id: id, at: state.clock.now_ms(), reason });
    tracing::info!(agent_id = %id, name = %rec.name, "Agent deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /api/v1/enroll-tokens {labels, uses, expires_in_s}`: the secret is shown once.
#[utoipa::path(
    post,
    path = "/api/v1/enroll-tokens",
    request_body = tether_proto::agent::CreateEnrollToken,
    tag = "agents",
    description = "Requires the operator role.",
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 201, description = "Success", body = tether_proto::Data<tether_proto::agent::CreatedEnrollToken>),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn create_enroll_token(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    ApiJson(req): ApiJson<CreateEnrollToken>,
) -> ApiResult<Response> {
    validate_labels(&req.labels).map_err(|e| ApiError::bad_request("labels", e))?;
    if !(1..=MAX_ENROLL_USES).contains(&req.uses) {
        return Err(ApiError::bad_request("uses", format!("uses must be 1..={MAX_ENROLL_USES}")));
    }
    if !(1..=MAX_ENROLL_LIFETIME_S).contains(&req.expires_in_s) {
        return Err(ApiError::bad_request("expires_in_s", format!("expires_in_s must be 1..={MAX_ENROLL_LIFETIME_S}")));
    }
    let token = new_token(ENROLL_TOKEN_PREFIX);
    let id = uuid::Uuid::now_v7().to_string();
    let now = state.clock.now_ms();
    let audit = state.audit_entry(
        &ctx,
        AuditEvent::by_user(
            op.name(),
            "enroll_token.create",
            id.clone(),
            json!({"labels": req.labels, "uses": req.uses, "expires_in_s": req.expires_in_s}),
        ),
    );
    state
        .store
        .create_enroll_token(
            NewEnrollToken {
                id: id.clone(),
                token_hash: hash_token(&token),
                labels: req.labels.clone(),
                uses: req.uses,
                created_by: op.name().to_owned(),
                expires_at: now + req.expires_in_s as Millis * 1000,
            },
            now,
            audit,
        )
        .await?;
    let body = Data { data: CreatedEnrollToken { id, token } };
    Ok(crate::api::enroll::no_store((StatusCode::CREATED, axum::Json(body)).into_response()))
}

/// `GET /api/v1/enroll-tokens`
#[utoipa::path(
    get,
    path = "/api/v1/enroll-tokens",
    tag = "agents",
    description = "Requires the operator role.",
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = tether_proto::Page<tether_proto::agent::EnrollToken>),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn list_enroll_tokens(State(state): State<AppState>, _: Operator) -> ApiResult<Response> {
    let data: Vec<EnrollToken> = state
        .store
        .list_enroll_tokens()
        .await?
        .into_iter()
        .map(|t| EnrollToken {
            id: t.id,
            labels: t.labels,
            uses: t.uses,
            used: t.used,
            created_at: rfc3339(t.created_at),
            expires_at: rfc3339(t.expires_at),
            revoked_at: t.revoked_at.map(rfc3339),
        })
        .collect();
    Ok(axum::Json(Page { data, next_cursor: None }).into_response())
}

/// `DELETE /api/v1/enroll-tokens/{id}`
#[utoipa::path(
    delete,
    path = "/api/v1/enroll-tokens/{id}",
    tag = "agents",
    description = "Requires the operator role.",
    params(("id" = String, Path)),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 204, description = "No content"),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn revoke_enroll_token(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Response> {
    let audit = state.audit_entry(&ctx, AuditEvent::by_user(op.name(), "enroll_token.revoke", id.clone(), json!({})));
    state.store.revoke_enroll_token(&id, state.clock.now_ms(), audit).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
