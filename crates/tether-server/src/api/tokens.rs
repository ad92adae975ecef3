//! Personal API tokens: any user manages their own (protocol.md §15).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tether_proto::user::{ApiToken, CreateApiToken, CreatedApiToken};
use tether_proto::{Data, Page};
use tether_store::Millis;

use crate::api::enroll::no_store;
use crate::auth::secret::{API_TOKEN_PREFIX, hash_token, new_token};
use crate::auth::{Credential, Operator};
use crate::clock::rfc3339;
use crate::error::{ApiError, ApiJson, ApiPath, ApiResult};
use crate::state::{AppState, AuditContext, AuditEvent};

const MAX_TOKEN_NAME_LEN: usize = 100;
const MAX_TOKEN_LIFETIME_S: u64 = 5 * 366 * 86_400;

/// A token created with an API token cannot outlive it: its expiry is
/// capped at the creator's (and it never expires only when the creator
/// never does). The password and a dashboard session prove the user
/// directly, so they may choose any allowed lifetime.
pub fn capped_expiry(requested: Option<Millis>, creator: Credential) -> Option<Millis> {
    match (creator, requested) {
        (Credential::ApiToken { expires_at: Some(cap) }, Some(want)) => Some(want.min(cap)),
        (Credential::ApiToken { expires_at: Some(cap) }, None) => Some(cap),
        (_, requested) => requested,
    }
}

/// `POST /api/v1/tokens {name, expires_in_s}`: a token with the caller's role.
#[utoipa::path(
    post,
    path = "/api/v1/tokens",
    request_body = tether_proto::user::CreateApiToken,
    tag = "tokens",
    description = "Any signed-in user.",
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 201, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
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
    let expires_at = capped_expiry(req.expires_in_s.map(|s| now + s as Millis * 1000), op.credential);
    let token = new_token(API_TOKEN_PREFIX);
    let audit = state.audit_entry(
        &ctx,
        AuditEvent::by_user(
            op.name(),
            "api_token.create",
            String::new(),
            json!({"name": req.name, "expires_in_s": req.expires_in_s, "expires_at": expires_at.map(rfc3339)}),
        ),
    );
    let from_password = op.credential.is_password();
    let id = state
        .store
        .create_api_token(&op.user.id, &req.name, hash_token(&token), expires_at, from_password, now, audit)
        .await?;
    let body = CreatedApiToken { id, name: req.name, token, expires_at: expires_at.map(rfc3339) };
    Ok(no_store((StatusCode::CREATED, axum::Json(Data { data: body })).into_response()))
}

/// `GET /api/v1/tokens`: the caller's own tokens.
#[utoipa::path(
    get,
    path = "/api/v1/tokens",
    tag = "tokens",
    description = "Any signed-in user.",
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
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
#[utoipa::path(
    delete,
    path = "/api/v1/tokens/{id}",
    tag = "tokens",
    description = "Any signed-in user.",
    params(("id" = String, Path)),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 204, description = "No content"),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn revoke(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Response> {
    let audit = state.audit_entry(&ctx, AuditEvent::by_user(op.name(), "api_token.revoke", id.clone(), json!({})));
    state.store.revoke_api_token(&op.user.id, &id, state.clock.now_ms(), audit).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_made_by_a_token_cannot_outlive_it() {
        let token = |expires_at| Credential::ApiToken { expires_at };
        assert_eq!(capped_expiry(None, token(Some(100))), Some(100), "never-expiring is capped");
        assert_eq!(capped_expiry(Some(500), token(Some(100))), Some(100));
        assert_eq!(capped_expiry(Some(50), token(Some(100))), Some(50), "a shorter lifetime stays");
        assert_eq!(capped_expiry(None, token(None)), None, "a never-expiring creator may");
        assert_eq!(capped_expiry(None, Credential::Password), None);
        assert_eq!(capped_expiry(Some(7), Credential::Session), Some(7));
    }
}
