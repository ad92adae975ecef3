//! Configuration documents (protocol.md §6): scopes and their versions for
//! operators, and each agent's effective configuration, for operators and
//! for the agent itself.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use tether_proto::config::{
    ConfigScope, ConfigVersion, ConfigWritten, EffectiveConfig, MAX_COMMENT_BYTES, MAX_DOC_DEPTH, PutConfig, Rollback,
    Scope, depth,
};
use tether_proto::{AgentId, Data, Page};
use tether_store::{ConfigChange, ConfigVersionRecord, NewConfigVersion};

use crate::api::etag::{IfNoneMatch, if_match_version, quoted};
use crate::api::page::{page_limit, parse_param};
use crate::auth::{AgentCaller, Operator};
use crate::clock::rfc3339;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery, ApiResult};
use crate::state::{AppState, AuditContext, AuditEvent};
use crate::stream::StreamEvent;

fn parse_scope(text: &str) -> ApiResult<Scope> {
    text.parse().map_err(|e: String| ApiError::bad_request("scope", e))
}

fn version_view(v: ConfigVersionRecord) -> ConfigVersion {
    ConfigVersion {
        scope: v.scope,
        version: v.version,
        hash: v.hash,
        author: v.author,
        comment: v.comment,
        created_at: rfc3339(v.created_at),
        doc: v.doc,
    }
}

/// Wakes the agents a committed change appended `config.updated` to; what
/// is left is the answer to the write.
fn publish(state: &AppState, change: ConfigChange) -> ConfigWritten {
    let ConfigChange { scope, version, hash, agents_changed, heads } = change;
    state.notifier.publish(StreamEvent::Heads(heads));
    ConfigWritten { scope, version, hash, agents_changed }
}

/// The answer to a write: the new version, its `ETag`, and the agents woken.
fn written(data: ConfigWritten, status: StatusCode) -> Response {
    let tag = quoted(&data.version.to_string());
    let mut res = (status, axum::Json(Data { data })).into_response();
    res.headers_mut().insert(header::ETAG, tag);
    res
}

/// `GET /api/v1/configs`: every scope and its current version.
#[utoipa::path(
    get,
    path = "/api/v1/configs",
    tag = "configs",
    description = "Requires the viewer role.",
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn list(State(state): State<AppState>, _: Operator) -> ApiResult<Response> {
    let data: Vec<ConfigScope> = state
        .store
        .list_configs()
        .await?
        .into_iter()
        .map(|s| ConfigScope {
            scope: s.scope,
            version: s.version,
            hash: s.hash,
            updated_by: s.updated_by,
            updated_at: rfc3339(s.updated_at),
        })
        .collect();
    Ok(axum::Json(Page { data, next_cursor: None }).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct VersionQuery {
    version: Option<String>,
}

/// `GET /api/v1/configs/{scope}[?version=N]`, with the version as `ETag`.
#[utoipa::path(
    get,
    path = "/api/v1/configs/{scope}",
    tag = "configs",
    description = "Requires the viewer role.",
    params(("scope" = String, Path), VersionQuery),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    _: Operator,
    ApiPath(scope): ApiPath<String>,
    ApiQuery(q): ApiQuery<VersionQuery>,
) -> ApiResult<Response> {
    let scope = parse_scope(&scope)?;
    let version = parse_param("version", q.version.as_deref())?;
    let found = state.store.get_config(&scope, version).await?.ok_or_else(|| ApiError::not_found("config version"))?;
    let tag = found.version.to_string();
    let mut res = axum::Json(Data { data: version_view(found) }).into_response();
    res.headers_mut().insert(header::ETAG, quoted(&tag));
    Ok(res)
}

/// `PUT /api/v1/configs/{scope} {doc, comment}`: `If-Match` with the version
/// replaced is required once the scope exists (428 without, 409 when stale).
#[utoipa::path(
    put,
    path = "/api/v1/configs/{scope}",
    request_body(content = serde_json::Value, content_type = "application/json", description = "See protocol.md §15"),
    tag = "configs",
    description = "Requires the operator role.",
    params(("scope" = String, Path)),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = 201, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn put(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    ApiPath(scope): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<PutConfig>,
) -> ApiResult<Response> {
    let scope = parse_scope(&scope)?;
    let if_match = if_match_version(&headers)?;
    let data = write(&state, &op, &ctx, scope, if_match, req).await?;
    let status = if data.version == 1 { StatusCode::CREATED } else { StatusCode::OK };
    Ok(written(data, status))
}

/// Writes the next version of `scope` (checked, audited; `if_match` as
/// protocol.md §6 says) and wakes the agents whose effective configuration
/// it changed. Shared with the seed route that writes the `global` scope.
pub(crate) async fn write(
    state: &AppState,
    op: &Operator,
    ctx: &AuditContext,
    scope: Scope,
    if_match: Option<u64>,
    req: PutConfig,
) -> ApiResult<ConfigWritten> {
    if req.comment.len() > MAX_COMMENT_BYTES {
        return Err(ApiError::bad_request("comment", format!("comment is longer than {MAX_COMMENT_BYTES} bytes")));
    }
    // One level for the document object itself.
    if req.doc.values().map(depth).max().unwrap_or(0) + 1 > MAX_DOC_DEPTH {
        return Err(ApiError::bad_request("doc", format!("doc nests deeper than {MAX_DOC_DEPTH} levels")));
    }
    let audit = state.audit_entry(
        ctx,
        AuditEvent::by_user(op.name(), "config.put", scope.to_string(), json!({"comment": req.comment})),
    );
    let new = NewConfigVersion {
        scope,
        doc: req.doc,
        if_match,
        author: op.name().to_owned(),
        comment: req.comment,
        now: state.clock.now_ms(),
    };
    let change = state.store.put_config(new, audit).await?;
    tracing::info!(scope = %change.scope, version = change.version, agents = change.agents_changed, "Config written");
    Ok(publish(state, change))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    cursor: Option<String>,
    limit: Option<u32>,
}

/// `GET /api/v1/configs/{scope}/history`: versions newest first, with
/// author, time, comment and document; the cursor is a version.
#[utoipa::path(
    get,
    path = "/api/v1/configs/{scope}/history",
    tag = "configs",
    description = "Requires the viewer role.",
    params(("scope" = String, Path), HistoryQuery),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn history(
    State(state): State<AppState>,
    _: Operator,
    ApiPath(scope): ApiPath<String>,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> ApiResult<Response> {
    let scope = parse_scope(&scope)?;
    let limit = page_limit(q.limit)?;
    let before = parse_param("cursor", q.cursor.as_deref())?;
    let versions = state.store.config_history(&scope, before, limit).await?;
    let next_cursor =
        (versions.len() == limit as usize).then(|| versions.last().map(|v| v.version.to_string())).flatten();
    let data = versions.into_iter().map(version_view).collect();
    Ok(axum::Json(Page { data, next_cursor }).into_response())
}

/// `POST /api/v1/configs/{scope}/rollback {version}`: a new version whose
/// document is that version's.
#[utoipa::path(
    post,
    path = "/api/v1/configs/{scope}/rollback",
    request_body(content = serde_json::Value, content_type = "application/json", description = "See protocol.md §15"),
    tag = "configs",
    description = "Requires the operator role.",
    params(("scope" = String, Path)),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn rollback(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    ApiPath(scope): ApiPath<String>,
    ApiJson(req): ApiJson<Rollback>,
) -> ApiResult<Response> {
    let scope = parse_scope(&scope)?;
    let audit = state.audit_entry(
        &ctx,
        AuditEvent::by_user(op.name(), "config.rollback", scope.to_string(), json!({"to_version": req.version})),
    );
    let change = state.store.rollback_config(&scope, req.version, op.name(), state.clock.now_ms(), audit).await?;
    Ok(written(publish(&state, change), StatusCode::OK))
}

/// `GET /api/v1/configs/{scope}/status`: of the agents the scope targets,
/// how many run their desired configuration, are behind, or failed it.
#[utoipa::path(
    get,
    path = "/api/v1/configs/{scope}/status",
    tag = "configs",
    description = "Requires the viewer role.",
    params(("scope" = String, Path)),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn status(
    State(state): State<AppState>,
    _: Operator,
    ApiPath(scope): ApiPath<String>,
) -> ApiResult<Response> {
    let scope = parse_scope(&scope)?;
    Ok(axum::Json(Data { data: state.store.config_status(&scope).await? }).into_response())
}

/// `GET /api/v1/agents/{id}/config`: an agent's effective configuration
/// and where each value came from.
#[utoipa::path(
    get,
    path = "/api/v1/agents/{id}/config",
    tag = "configs",
    description = "Requires the viewer role.",
    params(("id" = String, Path, format = Uuid)),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn agent_config(
    State(state): State<AppState>,
    _: Operator,
    ApiPath(id): ApiPath<AgentId>,
) -> ApiResult<Response> {
    let effective = state.store.effective_config(id).await?.ok_or_else(|| ApiError::not_found("agent"))?;
    Ok(axum::Json(Data { data: effective }).into_response())
}

/// `GET /api/v1/agents/self/config`: the caller's effective configuration,
/// `ETag` its hash; 304 when `If-None-Match` names it already.
#[utoipa::path(
    get,
    path = "/api/v1/agents/self/config",
    tag = "configs",
    security(("agent_token" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = 304, description = "Not modified (If-None-Match)"),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn own(State(state): State<AppState>, agent: AgentCaller, if_none_match: IfNoneMatch) -> ApiResult<Response> {
    own_config(&state, &agent, &if_none_match, |effective| axum::Json(Data { data: effective }).into_response()).await
}

/// The caller's effective configuration, conditionally: 304 when
/// `If-None-Match` names its hash already, else 200 with `body` made of it;
/// `ETag` is the hash either way. Shared with the seed routes, which only
/// shape the body differently.
pub(crate) async fn own_config(
    state: &AppState,
    agent: &AgentCaller,
    if_none_match: &IfNoneMatch,
    body: impl FnOnce(EffectiveConfig) -> Response,
) -> ApiResult<Response> {
    let effective: EffectiveConfig =
        state.store.effective_config(agent.id).await?.ok_or_else(ApiError::unauthenticated)?;
    let tag = quoted(&effective.hash);
    let mut res =
        if if_none_match.matches(&effective.hash) { StatusCode::NOT_MODIFIED.into_response() } else { body(effective) };
    res.headers_mut().insert(header::ETAG, tag);
    Ok(res)
}
