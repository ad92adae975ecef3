//! Dashboard login sessions (protocol.md §3): an HttpOnly, SameSite=Strict cookie
//! plus a CSRF token that every mutating request must echo.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use tether_proto::{Data, ErrorKey};
use tether_store::User;

use crate::api::enroll::no_store;
use crate::auth::secret::{hash_token, new_token};
use crate::auth::{Credential, Operator, PasswordSource, SESSION_COOKIE, basic_user, session_token};
use crate::error::{ApiError, ApiJson, ApiResult};
use crate::state::{AppState, AuditContext, AuditEvent, PublicCaller};

/// Sessions last 12 hours.
const SESSION_TTL_MS: i64 = 12 * 3_600_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Login {
    username: String,
    password: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login").field("username", &self.username).finish_non_exhaustive()
    }
}

/// `POST /api/v1/auth/login {username, password}`
#[utoipa::path(
    post,
    path = "/api/v1/auth/login",
    request_body(content = serde_json::Value, content_type = "application/json", description = "See protocol.md §15"),
    tag = "session",
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn login(
    State(state): State<AppState>,
    caller: PublicCaller,
    ctx: AuditContext,
    ApiJson(req): ApiJson<Login>,
) -> ApiResult<Response> {
    let user = basic_user(&state, caller.ip, &req.username, &req.password, PasswordSource::Form)
        .await?
        .ok_or_else(|| ApiError::new(ErrorKey::Unauthenticated, "wrong username or password"))?;
    let token = new_token("tts_");
    let csrf = new_token("ttc_");
    let now = state.clock.now_ms();
    let audit = state.audit_entry(
        &ctx,
        AuditEvent::by_user(&user.username, "login.ok", user.id.clone(), json!({"method": "password"})),
    );
    state.store.create_session(hash_token(&token), &user.id, &csrf, now + SESSION_TTL_MS, now, audit).await?;
    let secure = if state.config.secure_cookies { "; Secure" } else { "" };
    let cookie = format!(
        "{SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}",
        SESSION_TTL_MS / 1000
    );
    let body = json!({"csrf_token": csrf, "user": user_view(&user)});
    let mut res = axum::Json(Data { data: body }).into_response();
    res.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_str(&cookie).map_err(ApiError::internal)?);
    Ok(no_store(res))
}

/// `POST /api/v1/auth/logout`: ends the cookie session (if that is how the caller signed in).
#[utoipa::path(
    post,
    path = "/api/v1/auth/logout",
    tag = "session",
    description = "Any signed-in user.",
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 204, description = "No content"),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn logout(State(state): State<AppState>, _: Operator, headers: HeaderMap) -> ApiResult<Response> {
    if let Some(token) = session_token(&headers) {
        state.store.delete_session(hash_token(token)).await?;
    }
    let mut res = StatusCode::NO_CONTENT.into_response();
    let expired = format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    res.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_str(&expired).map_err(ApiError::internal)?);
    Ok(res)
}

/// A user as the session routes show it.
fn user_view(user: &User) -> serde_json::Value {
    json!({"id": user.id, "username": user.username, "role": user.role.as_str()})
}

/// `GET /api/v1/auth/session`: who is signed in, and, for a cookie session,
/// its CSRF token. A reloaded dashboard still has the HttpOnly cookie but
/// has lost what the login answered; this gives both back without a new
/// password check. `csrf_token` is `null` for API tokens and Basic, which
/// need none.
#[utoipa::path(
    get,
    path = "/api/v1/auth/session",
    tag = "session",
    description = "Any signed-in user: `{data:{user:{id, username, role}, csrf_token}}`.",
    security(("bearer" = []), ("basic" = []), ("session" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn current(State(state): State<AppState>, op: Operator, headers: HeaderMap) -> ApiResult<Response> {
    let csrf = match (op.credential, session_token(&headers)) {
        (Credential::Session, Some(token)) => {
            state.store.find_session(hash_token(token), state.clock.now_ms()).await?.map(|(_, csrf)| csrf)
        }
        _ => None,
    };
    let body = json!({"csrf_token": csrf, "user": user_view(&op.user)});
    Ok(no_store(axum::Json(Data { data: body }).into_response()))
}
