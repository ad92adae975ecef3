//! Users and roles (admin only, protocol.md §3, §15).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tether_proto::user::{CreateUser, MIN_PASSWORD_LEN, UpdateUser, User, validate_username};
use tether_proto::{Data, Page};
use tether_store::{Role, UserRecord};

use crate::auth::Operator;
use crate::auth::password::hash_off_thread;
use crate::clock::rfc3339;
use crate::error::{ApiError, ApiJson, ApiPath, ApiResult};
use crate::state::{AppState, AuditContext, AuditEvent};

fn view(u: UserRecord) -> User {
    User {
        id: u.id,
        username: u.username,
        role: u.role.as_str().into(),
        created_at: rfc3339(u.created_at),
        disabled: u.disabled_at.is_some(),
    }
}

fn parse_role(role: &str) -> ApiResult<Role> {
    Role::parse(role).ok_or_else(|| ApiError::bad_request("role", "role must be admin, operator or viewer"))
}

fn check_password(password: &str) -> ApiResult<()> {
    if password.chars().count() < MIN_PASSWORD_LEN || password.len() > 1024 {
        return Err(ApiError::bad_request("password", format!("password must be {MIN_PASSWORD_LEN}-1024 characters")));
    }
    Ok(())
}

async fn hash(password: String) -> ApiResult<String> {
    hash_off_thread(&password).await.map_err(ApiError::internal)
}

#[utoipa::path(
    get,
    path = "/api/v1/users",
    tag = "users",
    description = "Requires the admin role.",
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = tether_proto::Page<tether_proto::user::User>),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn list(State(state): State<AppState>, _: Operator) -> ApiResult<Response> {
    let data: Vec<User> = state.store.list_users().await?.into_iter().map(view).collect();
    Ok(axum::Json(Page { data, next_cursor: None }).into_response())
}

#[utoipa::path(
    post,
    path = "/api/v1/users",
    request_body = tether_proto::user::CreateUser,
    tag = "users",
    description = "Requires the admin role.",
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 201, description = "Success", body = tether_proto::Data<tether_proto::user::User>),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    ApiJson(req): ApiJson<CreateUser>,
) -> ApiResult<Response> {
    validate_username(&req.username).map_err(|e| ApiError::bad_request("username", e))?;
    let role = parse_role(&req.role)?;
    check_password(&req.password)?;
    let now = state.clock.now_ms();
    let audit = state.audit_entry(
        &ctx,
        AuditEvent::by_user(
            op.name(),
            "user.create",
            String::new(),
            json!({"username": req.username, "role": role.as_str()}),
        ),
    );
    let user = state.store.create_user(&req.username, &hash(req.password).await?, role, now, audit).await?;
    let record = UserRecord { id: user.id, username: user.username, role, created_at: now, disabled_at: None };
    Ok((StatusCode::CREATED, axum::Json(Data { data: view(record) })).into_response())
}

#[utoipa::path(
    patch,
    path = "/api/v1/users/{id}",
    request_body = tether_proto::user::UpdateUser,
    tag = "users",
    description = "Requires the admin role.",
    params(("id" = String, Path)),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = tether_proto::Data<tether_proto::user::User>),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn update(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateUser>,
) -> ApiResult<Response> {
    let role = req.role.as_deref().map(parse_role).transpose()?;
    let password_hash = match req.password {
        Some(p) => {
            check_password(&p)?;
            Some(hash(p).await?)
        }
        None => None,
    };
    let audit = state.audit_entry(
        &ctx,
        AuditEvent::by_user(
            op.name(),
            "user.update",
            id.clone(),
            json!({"role": role.map(Role::as_str), "password_changed": password_hash.is_some()}),
        ),
    );
    // A new password also ends the user's sessions (in the store, same transaction).
    let now = state.clock.now_ms();
    let user = state.store.update_user(&id, role, password_hash.as_deref(), now, audit).await?;
    if password_hash.is_some() {
        state.passwords.invalidate_user(&user.username);
    }
    Ok(axum::Json(Data { data: view(user) }).into_response())
}

#[utoipa::path(
    delete,
    path = "/api/v1/users/{id}",
    tag = "users",
    description = "Requires the admin role.",
    params(("id" = String, Path)),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 204, description = "No content"),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Response> {
    if id == op.user.id {
        return Err(ApiError::conflict("you cannot delete yourself"));
    }
    let audit = state.audit_entry(&ctx, AuditEvent::by_user(op.name(), "user.delete", id.clone(), json!({})));
    state.store.disable_user(&id, state.clock.now_ms(), audit).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
