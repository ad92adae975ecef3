//! RFC 8628 device authorization grant (SPEC §3, way 2): an agent asks for
//! a code, an operator approves it (API, CLI or the `/device` page), and the
//! agent's polling of `/oauth/token` turns into its first token pair.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use rand::Rng;
use serde::Deserialize;
use serde_json::json;
use tether_proto::agent::validate_labels;
use tether_proto::{AgentId, Data, ErrorKey, Labels};
use tether_store::{DevicePoll, NewDeviceGrant, StoreError};

use crate::api::enroll::{OAuthForm, no_store, oauth_error, parse_public_key};
use crate::auth::jwt::ACCESS_TOKEN_TTL_S;
use crate::auth::secret::{REFRESH_TOKEN_PREFIX, hash_token, new_token};
use crate::auth::{Operator, basic_user};
use crate::error::{ApiError, ApiJson, ApiResult};
use crate::state::{AppState, AuditContext, AuditEvent, PublicCaller};

pub const CLIENT_ID: &str = "tether-agent";
pub const DEVICE_GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// RFC 8628 §6.1: consonants only, no vowels (no words), no ambiguous letters.
const USER_CODE_ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";
const INTERVAL_S: u32 = 5;

fn new_user_code() -> String {
    let mut rng = rand::rng();
    (0..8).map(|_| USER_CODE_ALPHABET[rng.random_range(0..USER_CODE_ALPHABET.len())] as char).collect()
}

/// `XXXX-XXXX`, as shown to people.
fn display(code: &str) -> String {
    format!("{}-{}", &code[..4], &code[4..])
}

/// Accepts `bcdf-ghjk`, `BCDF GHJK`, … as `BCDFGHJK`.
pub fn normalize_user_code(input: &str) -> Option<String> {
    let code: String = input.chars().filter(|c| !matches!(c, '-' | ' ')).map(|c| c.to_ascii_uppercase()).collect();
    (code.len() == 8 && code.bytes().all(|b| USER_CODE_ALPHABET.contains(&b))).then_some(code)
}

fn base_url(state: &AppState, headers: &HeaderMap, uri: &axum::http::Uri) -> String {
    // HTTP/2 (over TLS) carries the host in `:authority`, which hyper puts in
    // the URI rather than a Host header.
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .unwrap_or("localhost");
    let scheme = if state.config.secure_cookies { "https" } else { "http" };
    format!("{scheme}://{host}")
}

/// `POST /oauth/device_authorization` (form: client_id, public_key, hostname).
pub async fn authorization(
    State(state): State<AppState>,
    _: PublicCaller,
    headers: HeaderMap,
    uri: axum::http::Uri,
    body: axum::body::Bytes,
) -> Response {
    let form = match OAuthForm::parse(&headers, &body) {
        Ok(f) => f,
        Err(res) => return *res,
    };
    if form.get("client_id") != Some(CLIENT_ID) {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "client_id must be tether-agent");
    }
    let Some(public_key) = form.get("public_key").and_then(|k| parse_public_key(k).ok()) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "public_key must be a base64url Ed25519 key");
    };
    let hostname = form.get("hostname").unwrap_or_default().to_owned();
    if hostname.is_empty() || hostname.len() > 253 || hostname.chars().any(char::is_control) {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "hostname is required");
    }
    let device_code = new_token("ttd_");
    let now = state.clock.now_ms();
    let ttl = state.config.device_code_ttl_s;
    let mut user_code = new_user_code();
    for attempt in 0.. {
        let grant = NewDeviceGrant {
            device_code_hash: hash_token(&device_code),
            user_code: user_code.clone(),
            public_key: public_key.clone(),
            hostname: hostname.clone(),
            expires_at: now + ttl as i64 * 1000,
            interval_s: INTERVAL_S,
            now,
        };
        match state.store.create_device_grant(grant).await {
            Ok(()) => break,
            Err(StoreError::Conflict(_)) if attempt < 5 => user_code = new_user_code(),
            Err(e) => {
                tracing::error!(error = %e, "Creating a device grant failed");
                return oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "try again");
            }
        }
    }
    let base = base_url(&state, &headers, &uri);
    let shown = display(&user_code);
    no_store(
        axum::Json(json!({
            "device_code": device_code,
            "user_code": shown,
            "verification_uri": format!("{base}/device"),
            "verification_uri_complete": format!("{base}/device?user_code={shown}"),
            "expires_in": ttl,
            "interval": INTERVAL_S,
        }))
        .into_response(),
    )
}

/// The device-code branch of `POST /oauth/token`.
pub async fn token(
    state: &AppState,
    ctx: &AuditContext,
    device_code: Option<&str>,
    client_id: Option<&str>,
) -> Response {
    if client_id.is_some_and(|c| c != CLIENT_ID) {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "client_id must be tether-agent");
    }
    let Some(device_code) = device_code else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "device_code is required");
    };
    let refresh_token = new_token(REFRESH_TOKEN_PREFIX);
    let agent_id = AgentId::new();
    let now = state.clock.now_ms();
    let polled =
        state.store.poll_device_grant(hash_token(device_code), agent_id, hash_token(&refresh_token), now).await;
    match polled {
        Ok(DevicePoll::Approved(rec)) => {
            tracing::info!(agent_id = %rec.id, "Agent enrolled by device flow");
            state
                .audit(
                    ctx,
                    AuditEvent {
                        actor: &rec.id.to_string(),
                        actor_kind: "agent",
                        action: "agent.enroll",
                        target: rec.id.to_string(),
                        outcome: "ok",
                        details: json!({"method": "device_flow", "hostname": rec.hostname, "labels": rec.labels}),
                    },
                )
                .await;
            no_store(
                axum::Json(json!({
                    "access_token": state.tokens.issue(rec.id, state.clock.now_s()),
                    "token_type": "Bearer",
                    "expires_in": ACCESS_TOKEN_TTL_S,
                    "refresh_token": refresh_token,
                    "agent_id": rec.id,
                }))
                .into_response(),
            )
        }
        Ok(DevicePoll::Pending) => oauth_error(StatusCode::BAD_REQUEST, "authorization_pending", "not approved yet"),
        Ok(DevicePoll::SlowDown { interval_s }) => {
            oauth_error(StatusCode::BAD_REQUEST, "slow_down", &format!("poll at most every {interval_s} s"))
        }
        Ok(DevicePoll::Denied) => {
            oauth_error(StatusCode::BAD_REQUEST, "access_denied", "an operator denied this device")
        }
        Ok(DevicePoll::Expired) => oauth_error(StatusCode::BAD_REQUEST, "expired_token", "the device code expired"),
        Ok(DevicePoll::Invalid) => oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "unknown or used device code"),
        Err(e) => {
            tracing::error!(error = %e, "Device token poll failed");
            oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "try again")
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    user_code: String,
    #[serde(default)]
    labels: Labels,
}

/// Approves or denies a user code as `who`; wrong codes count like failed logins.
async fn decide(
    state: &AppState,
    ctx: &AuditContext,
    who: &str,
    ip: Option<std::net::IpAddr>,
    decision: Decision,
    approve: bool,
) -> ApiResult<()> {
    let limit_key = format!("device-code:{who}");
    let now = state.clock.now_ms();
    state.limits.login_allowed(ip, &limit_key, now)?;
    validate_labels(&decision.labels).map_err(|e| ApiError::bad_request("labels", e))?;
    let Some(code) = normalize_user_code(&decision.user_code) else {
        state.limits.login_failed(ip, &limit_key, now);
        return Err(ApiError::bad_request("user_code", "user_code looks like XXXX-XXXX"));
    };
    match state.store.decide_device_grant(&code, approve, &decision.labels, who, now).await {
        Ok(()) => {}
        Err(StoreError::NotFound) => {
            state.limits.login_failed(ip, &limit_key, now);
            return Err(ApiError::not_found("pending device code"));
        }
        Err(e) => return Err(e.into()),
    }
    state
        .audit(
            ctx,
            AuditEvent::by_user(
                who,
                if approve { "device.approve" } else { "device.deny" },
                display(&code),
                json!({"labels": decision.labels}),
            ),
        )
        .await;
    Ok(())
}

fn client_ip(ctx: &AuditContext) -> Option<std::net::IpAddr> {
    ctx.ip.as_deref().and_then(|i| i.parse().ok())
}

/// `POST /api/v1/device/approve {user_code, labels}`
pub async fn approve(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    ApiJson(d): ApiJson<Decision>,
) -> ApiResult<Response> {
    decide(&state, &ctx, op.name(), client_ip(&ctx), d, true).await?;
    Ok(axum::Json(Data { data: json!({"approved": true}) }).into_response())
}

/// `POST /api/v1/device/deny {user_code}`
pub async fn deny(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    ApiJson(d): ApiJson<Decision>,
) -> ApiResult<Response> {
    decide(&state, &ctx, op.name(), client_ip(&ctx), d, false).await?;
    Ok(axum::Json(Data { data: json!({"denied": true}) }).into_response())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

fn page(message: &str, user_code: &str) -> Html<String> {
    Html(format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>tether: approve a device</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family:sans-serif;max-width:32rem;margin:2rem auto">
<h1>Approve a device</h1><p role="status">{}</p>
<form method="post" action="/device">
<p><label>Code <input name="user_code" value="{}" required autocomplete="off" placeholder="XXXX-XXXX"></label></p>
<p><label>Labels (k=v, comma separated) <input name="labels" placeholder="role=web,env=prod"></label></p>
<p><label>Username <input name="username" required autocomplete="username"></label></p>
<p><label>Password <input name="password" type="password" required autocomplete="current-password"></label></p>
<p><button name="action" value="approve">Approve</button> <button name="action" value="deny">Deny</button></p>
</form></body></html>"#,
        escape(message),
        escape(user_code)
    ))
}

#[derive(Debug, Deserialize)]
pub struct PageQuery {
    user_code: Option<String>,
}

/// `GET /device`: the approval page (plain HTML, no scripts).
pub async fn page_get(axum::extract::Query(q): axum::extract::Query<PageQuery>) -> Response {
    no_store(
        page(
            "Enter the code your agent printed, then sign in to approve it.",
            q.user_code.as_deref().unwrap_or_default(),
        )
        .into_response(),
    )
}

/// The `/device` form; `Debug` leaves the password out.
#[derive(Deserialize)]
pub struct PageForm {
    user_code: String,
    #[serde(default)]
    labels: String,
    username: String,
    password: String,
    action: String,
}

impl std::fmt::Debug for PageForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageForm")
            .field("user_code", &self.user_code)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// `POST /device`: credentials travel with the decision, so no session or
/// CSRF token is involved.
pub async fn page_post(
    State(state): State<AppState>,
    caller: PublicCaller,
    ctx: AuditContext,
    axum::Form(form): axum::Form<PageForm>,
) -> Response {
    let user = match basic_user(&state, caller.ip, &form.username, &form.password).await {
        Ok(Some(u)) if u.role != tether_store::Role::Viewer => u,
        Ok(Some(_)) => {
            return (StatusCode::FORBIDDEN, page("Your role cannot approve devices.", &form.user_code)).into_response();
        }
        Ok(None) => {
            return (StatusCode::UNAUTHORIZED, page("Wrong username or password.", &form.user_code)).into_response();
        }
        Err(e) => {
            return (
                StatusCode::from_u16(e.key.status()).unwrap_or(StatusCode::TOO_MANY_REQUESTS),
                page(&e.what, &form.user_code),
            )
                .into_response();
        }
    };
    let mut labels = Labels::new();
    for pair in form.labels.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some((k, v)) => {
                labels.insert(k.trim().to_owned(), v.trim().to_owned());
            }
            None => return (StatusCode::BAD_REQUEST, page("Labels are k=v pairs.", &form.user_code)).into_response(),
        }
    }
    let approve = form.action == "approve";
    let decision = Decision { user_code: form.user_code.clone(), labels };
    match decide(&state, &ctx, &user.username, caller.ip, decision, approve).await {
        Ok(()) => {
            page(if approve { "Approved: the agent will finish enrolling within seconds." } else { "Denied." }, "")
                .into_response()
        }
        Err(e) => {
            let status = StatusCode::from_u16(e.key.status()).unwrap_or(StatusCode::BAD_REQUEST);
            let message =
                if e.key == ErrorKey::NotFound { "No pending device has that code (or it expired)." } else { &e.what };
            (status, page(message, &form.user_code)).into_response()
        }
    }
}
