//! Seed 002, the config controller (docs/compat.md): registration with HTTP
//! Basic `agent:<enrollment token>`, the agent's configuration with ETags,
//! and the admin's write of the one configuration every agent shares (the
//! `global` scope). Its agents list is the native `GET /api/v1/agents`,
//! which already takes HTTP Basic. Bodies are bare JSON objects, without the
//! native `data` wrapper, like the one the seed's admin posts.

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Deserialize;
use tether_proto::Labels;
use tether_proto::config::{Doc, PutConfig, Scope};

use crate::api::configs;
use crate::api::enroll::{Enrollment, enroll_agent, no_store, parse_public_key};
use crate::api::etag::{IfNoneMatch, if_match_version};
use crate::auth::{AgentCaller, Operator};
use crate::error::{ApiError, ApiJson, ApiResult};
use crate::state::{AppState, AuditContext, PublicCaller};

route_table! {
    Agent  get  "/api/v1/config" => config,
    Public post "/api/v1/register" => register,
    Admin  post "/api/v1/config" => write_config,
}

/// `POST /api/v1/register {hostname, …}`: the seed's agent knows no key, so
/// `public_key` is optional; `labels` are asked for as at native enrollment
/// (the token's win); whatever else it says about itself is kept as facts.
#[derive(Debug, Deserialize)]
struct Register {
    hostname: String,
    #[serde(default)]
    public_key: Option<String>,
    #[serde(default)]
    labels: Labels,
    #[serde(flatten)]
    facts: serde_json::Map<String, serde_json::Value>,
}

/// The password of an `Authorization: Basic` header: the seed's agent sends
/// its enrollment token as `agent:<token>`. The user name is not checked,
/// as it is not for an API token sent as a Basic password (protocol.md §3).
fn basic_password(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (_, password) = decoded.split_once(':')?;
    (!password.is_empty()).then(|| password.to_owned())
}

/// `POST /api/v1/register` → 200 `{agent_id, access_token, refresh_token,
/// expires_in}`: native enrollment (protocol.md §3, way 1) with the token
/// taken from HTTP Basic.
async fn register(
    State(state): State<AppState>,
    _: PublicCaller,
    ctx: AuditContext,
    headers: HeaderMap,
    ApiJson(req): ApiJson<Register>,
) -> ApiResult<Response> {
    let enroll_token = basic_password(&headers).ok_or_else(ApiError::unauthenticated)?;
    let public_key = match req.public_key.as_deref() {
        None | Some("") => Vec::new(),
        Some(text) => parse_public_key(text)?,
    };
    let enrollment = Enrollment {
        enroll_token,
        hostname: req.hostname,
        labels: req.labels,
        facts: serde_json::Value::Object(req.facts),
        public_key,
    };
    let pair = enroll_agent(&state, &ctx, enrollment).await?;
    Ok(no_store(axum::Json(pair).into_response()))
}

/// `GET /api/v1/config` (agent): the caller's effective configuration as the
/// bare document, `ETag` its hash, 304 when `If-None-Match` names it.
async fn config(State(state): State<AppState>, agent: AgentCaller, if_none_match: IfNoneMatch) -> ApiResult<Response> {
    configs::own_config(&state, &agent, &if_none_match, |effective| axum::Json(effective.doc).into_response()).await
}

/// `POST /api/v1/config` (admin) with the new configuration as the body:
/// the next version of the `global` scope. The seed's admin sends no
/// `If-Match`; without one the write replaces whatever version is current
/// (a write that lands in between is still refused with 409), with one the
/// native rule applies.
async fn write_config(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    headers: HeaderMap,
    ApiJson(doc): ApiJson<Doc>,
) -> ApiResult<Response> {
    let if_match = match if_match_version(&headers)? {
        Some(version) => Some(version),
        None => state.store.get_config(&Scope::Global, None).await?.map(|current| current.version),
    };
    let req = PutConfig { doc, comment: String::new() };
    let written = configs::write(&state, &op, &ctx, Scope::Global, if_match, req).await?;
    Ok(axum::Json(written).into_response())
}
