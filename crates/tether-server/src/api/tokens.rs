//! Personal API tokens: any user manages their own (SPEC §15).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tether_proto::user::{ApiToken, CreateApiToken, CreatedApiToken};
use tether_proto::{Data, Page};
use tether_store::{Millis, StoreError};

use crate::api::agents::rfc3339;
use crate::api::enroll::no_store;
use crate::auth::Operator;
use crate::auth::secret::{API_TOKEN_PREFIX, hash_token, new_token};
use crate::error::{ApiError, ApiJson, ApiPath, ApiResult};
use crate::state::{AppState, AuditContext, AuditEvent};

const MAX_TOKEN_NAME_LEN: usize = 100;
const MAX_TOKEN_LIFETIME_S: u64 = 5 * 366 * 86_400;

/// `POST /api/v1/tokens {name, expires_in_s}`: a token with the caller's role.
pub async fn create(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    ApiJson(req): ApiJson<CreateApiToken>,
) -> ApiResult<Response> {
    if req.name.is_empty() || req.name.len() > MAX_TOKEN_NAME_LEN || req.name.chars().any(char::is_control) {
        return Err(ApiError::bad_request("name", format!("name must be 1-{MAX_TOKEN_NAME_LEN} printable chars")));
    }
    if req.expires_in_s.is_some_and(|s| s == 0 || s > MAX_TOKEN_LIFETIME_S) {
        return Err(ApiError::bad_request("expires_in_s", format!("expires_in_s must be 1..={MAX_TOKEN_LIFETIME_S}")));
    }
    let now = state.clock.now_ms();
    let expires_at = req.expires_in_s.map(|s| now + s as Millis * 1000);
    let token = new_token(API_TOKEN_PREFIX);
    let id = state.store.create_api_token(&op.user.id, &req.name, hash_token(&token), expires_at, now).await?;
    state
        .audit(
            &ctx,
            AuditEvent::by_user(
                op.name(),
                "api_token.create",
                id.clone(),
                json!({"name": req.name, "expires_in_s": req.expires_in_s}),
            ),
        )
        .await;
    let body = CreatedApiToken { id, name: req.name, token, expires_at: expires_at.map(rfc3339) };
    Ok(no_store((StatusCode::CREATED, axum::Json(Data { data: body })).into_response()))
}

/// `GET /api/v1/tokens`: the caller's own tokens.
pub async fn list(State(state): State<AppState>, op: Operator) -> ApiResult<Response> {
    let data: Vec<ApiToken> = state
        .store
        .list_api_tokens(&op.user.id)
        .await?
        .into_iter()
        .map(|t| ApiToken {
            id: t.id,
            name: t.name,
            created_at: rfc3339(t.created_at),
            expires_at: t.expires_at.map(rfc3339),
            revoked_at: t.revoked_at.map(rfc3339),
        })
        .collect();
    Ok(axum::Json(Page { data, next_cursor: None }).into_response())
}

/// `DELETE /api/v1/tokens/{id}`: takes effect on the next request.
pub async fn revoke(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Response> {
    state.store.revoke_api_token(&op.user.id, &id, state.clock.now_ms()).await.map_err(|e| match e {
        StoreError::NotFound => ApiError::not_found("token"),
        other => other.into(),
    })?;
    state.audit(&ctx, AuditEvent::by_user(op.name(), "api_token.revoke", id, json!({}))).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}
