//! RFC 8628 device authorization grant (protocol.md §3, way 2): an agent asks for
//! a code, an operator approves it (API, CLI or the `/device` page), and the
//! agent's polling of `/oauth/token` turns into its first token pair.

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use rand::Rng;
use serde::Deserialize;
use serde_json::json;
use tether_proto::agent::user_code::UserCode;
use tether_proto::agent::{DeviceDetails, key_fingerprint, validate_labels};
use tether_proto::{AgentId, Data, ErrorKey, Labels};
use tether_store::{DeviceGrantInfo, DevicePoll, DeviceRedeemed, NewDeviceGrant, NewGrantOutcome, StoreError};

use crate::api::enroll::{OAuthForm, hostname_ok, no_store, oauth_error, parse_public_key};
use crate::auth::jwt::ACCESS_TOKEN_TTL_S;
use crate::auth::secret::{REFRESH_TOKEN_PREFIX, hash_token, new_token};
use crate::auth::{Operator, PasswordSource, basic_user};
use crate::clock::rfc3339;
use crate::error::{ApiError, ApiJson, ApiResult, DEFAULT_BODY_LIMIT, OwnErrorFormat};
use crate::state::{AppState, AuditContext, AuditEvent, PublicCaller};

pub const CLIENT_ID: &str = "tether-agent";
pub const DEVICE_GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:device_code";
const INTERVAL_S: u32 = 5;
/// `Retry-After` when the pending-grant cap is reached: pending grants
/// expire within `device_code_ttl_s`, and most are decided long before.
const FULL_RETRY_AFTER_S: u64 = 30;

fn new_user_code() -> UserCode {
    let mut rng = rand::rng();
    UserCode::generate(|n| rng.random_range(0..n))
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

/// The refusal of a request whose `client_id` is missing or not ours:
/// RFC 8628 §3.4 makes it required on the token poll, and the authorization
/// request carries it too; only tether agents are clients.
fn client_refusal(client_id: Option<&str>) -> Option<Response> {
    match client_id {
        None => Some(oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "client_id is required")),
        // RFC 6749 §5.2 allows 401 only with WWW-Authenticate for an
        // authentication scheme; a public client has none, so 400.
        Some(c) if c != CLIENT_ID => {
            Some(oauth_error(StatusCode::BAD_REQUEST, "invalid_client", "client_id must be tether-agent"))
        }
        Some(_) => None,
    }
}

/// `POST /oauth/device_authorization` (form: client_id, public_key, hostname).
#[utoipa::path(
    post,
    path = "/oauth/device_authorization",
    request_body(content = String, content_type = "application/x-www-form-urlencoded", description = "RFC 8628 §3.1 form: `client_id`, `scope`, and the agent's `public_key`, `hostname`"),
    tag = "device",
    responses(
        (status = 200, description = "RFC 6749 / RFC 8628 token or device response", body = serde_json::Value),
        (status = "4XX", description = "RFC 6749 §5.2 error (or the error envelope for a malformed request)", body = serde_json::Value),
        (status = "default", description = "Error envelope", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn authorization(
    State(state): State<AppState>,
    caller: Result<PublicCaller, ApiError>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    body: axum::body::Bytes,
) -> Response {
    let (caller, form) = match OAuthForm::accept(caller, &headers, &body) {
        Ok(accepted) => accepted,
        Err(res) => return *res,
    };
    if let Some(res) = client_refusal(form.get("client_id")) {
        return res;
    }
    let Some(public_key) = form.get("public_key").and_then(|k| parse_public_key(k).ok()) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "public_key must be a base64url Ed25519 key");
    };
    let hostname = form.get("hostname").unwrap_or_default().to_owned();
    if !hostname_ok(&hostname) {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "hostname must be 1-253 printable chars");
    }
    let device_code = new_token("ttd_");
    let now = state.clock.now_ms();
    let ttl = state.config.device_code_ttl_s;
    let mut user_code = new_user_code();
    for attempt in 0.. {
        let grant = NewDeviceGrant {
            device_code_hash: hash_token(&device_code),
            user_code: user_code.as_str().to_owned(),
            public_key: public_key.clone(),
            hostname: hostname.clone(),
            expires_at: now + ttl as i64 * 1000,
            interval_s: INTERVAL_S,
            requested_ip: caller.ip.map(|ip| ip.to_string()),
            max_pending: state.config.max_pending_device_grants,
            max_pending_per_ip: state.config.limits.pending_device_grants_per_ip,
            now,
        };
        match state.store.create_device_grant(grant).await {
            Ok(NewGrantOutcome::Created) => break,
            Ok(NewGrantOutcome::TooManyPending) => {
                tracing::warn!(
                    max_pending = state.config.max_pending_device_grants,
                    "Device authorization refused: too many pending grants"
                );
                let mut res = oauth_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "temporarily_unavailable",
                    "too many devices are waiting for approval; try again later",
                );
                res.headers_mut().insert(header::RETRY_AFTER, FULL_RETRY_AFTER_S.into());
                return res;
            }
            Ok(NewGrantOutcome::TooManyFromAddress) => {
                tracing::warn!(
                    ip = ?caller.ip,
                    max_per_ip = state.config.limits.pending_device_grants_per_ip,
                    "Device authorization refused: too many pending grants from one address"
                );
                let mut res = oauth_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "temporarily_unavailable",
                    "too many devices from this address are waiting for approval; try again later",
                );
                res.headers_mut().insert(header::RETRY_AFTER, FULL_RETRY_AFTER_S.into());
                return res;
            }
            Err(StoreError::Conflict(_)) if attempt < 5 => user_code = new_user_code(),
            Err(e) => {
                tracing::error!(error = %e, "Creating a device grant failed");
                return oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "try again");
            }
        }
    }
    let base = base_url(&state, &headers, &uri);
    no_store(
        axum::Json(json!({
            "device_code": device_code,
            "user_code": user_code.to_string(),
            "verification_uri": format!("{base}/device"),
            "verification_uri_complete": format!("{base}/device?user_code={user_code}"),
            "expires_in": ttl,
            "interval": INTERVAL_S,
        }))
        .into_response(),
    )
}

/// Shows a canonical user code from the store as `XXXX-XXXX`.
fn shown(canonical: &str) -> String {
    UserCode::parse(canonical).map(|c| c.to_string()).unwrap_or_else(|_| canonical.to_owned())
}

/// The device-code branch of `POST /oauth/token`.
pub async fn token(
    state: &AppState,
    ctx: &AuditContext,
    device_code: Option<&str>,
    client_id: Option<&str>,
) -> Response {
    if let Some(res) = client_refusal(client_id) {
        return res;
    }
    let Some(device_code) = device_code else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "device_code is required");
    };
    let refresh_token = new_token(REFRESH_TOKEN_PREFIX);
    let agent_id = AgentId::new();
    let now = state.clock.now_ms();
    let grace = state.config.refresh_grace_ms;
    let audit = |redeemed: &DeviceRedeemed| {
        let rec = &redeemed.agent;
        let action = if redeemed.lost_response_retry { "token.issued" } else { "agent.enroll" };
        state.audit_entry(
            ctx,
            AuditEvent {
                actor: &rec.id.to_string(),
                actor_kind: "agent",
                action,
                target: rec.id.to_string(),
                outcome: "ok",
                details: json!({
                    "method": "device_flow",
                    "hostname": rec.hostname,
                    "labels": rec.labels,
                    "approved_by": redeemed.approved_by,
                    "user_code": shown(&redeemed.user_code),
                    "key_fingerprint": key_fingerprint(&rec.public_key),
                    "lost_response_retry": redeemed.lost_response_retry,
                }),
            },
        )
    };
    let polled = state
        .store
        .poll_device_grant(hash_token(device_code), agent_id, hash_token(&refresh_token), grace, now, &audit)
        .await;
    match polled {
        Ok(DevicePoll::Approved(redeemed)) => {
            let rec = &redeemed.agent;
            let what = if redeemed.lost_response_retry {
                "Device token re-issued after a lost response"
            } else {
                "Agent enrolled by device flow"
            };
            tracing::info!(agent_id = %rec.id, approved_by = %redeemed.approved_by, "{what}");
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

/// What the operator is shown about a grant before and after deciding.
fn details(info: DeviceGrantInfo) -> DeviceDetails {
    DeviceDetails {
        user_code: shown(&info.user_code),
        key_fingerprint: key_fingerprint(&info.public_key),
        hostname: info.hostname,
        requested_ip: info.requested_ip,
        requested_at: rfc3339(info.requested_at),
        labels: info.labels,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    user_code: String,
    #[serde(default)]
    labels: Labels,
}

/// Approves or denies a user code as `who`. Wrong, malformed and unknown
/// codes count in the per-IP wrong-code window and are audited.
async fn decide(
    state: &AppState,
    ctx: &AuditContext,
    who: &str,
    ip: Option<std::net::IpAddr>,
    decision: Decision,
    approve: bool,
) -> ApiResult<DeviceDetails> {
    let action = if approve { "device.approve" } else { "device.deny" };
    let now = state.clock.now_ms();
    state.limits.device_code_allowed(ip, now)?;
    validate_labels(&decision.labels).map_err(|e| ApiError::bad_request("labels", e))?;
    // The typed code is left out of the audit row: a near miss of a live code is
    // worth something to whoever reads the log.
    let refused = |outcome: &'static str, reason: &str| AuditEvent {
        actor: who,
        actor_kind: "user",
        action,
        target: String::new(),
        outcome,
        details: json!({"reason": reason}),
    };
    let Ok(code) = UserCode::parse(&decision.user_code) else {
        state.limits.device_code_failed(ip, now);
        state.audit(ctx, refused("denied", "malformed user code")).await;
        return Err(ApiError::bad_request("user_code", "user_code looks like XXXX-XXXX"));
    };
    let audit = |grant: &DeviceGrantInfo| {
        let info = details(grant.clone());
        state.audit_entry(
            ctx,
            AuditEvent::by_user(
                who,
                action,
                info.user_code,
                json!({
                    "hostname": info.hostname,
                    "requested_ip": info.requested_ip,
                    "key_fingerprint": info.key_fingerprint,
                    "labels": info.labels,
                }),
            ),
        )
    };
    match state.store.decide_device_grant(code.as_str(), approve, &decision.labels, who, now, &audit).await {
        Ok(info) => Ok(details(info)),
        Err(StoreError::NotFound(_)) => {
            state.limits.device_code_failed(ip, now);
            state.audit(ctx, refused("not_found", "no pending device has that code")).await;
            Err(ApiError::not_found("pending device code"))
        }
        Err(e) => Err(e.into()),
    }
}

fn client_ip(ctx: &AuditContext) -> Option<std::net::IpAddr> {
    ctx.ip.as_deref().and_then(|i| i.parse().ok())
}

/// `{approved|denied: true, …DeviceDetails}`
fn decided(flag: &str, details: &DeviceDetails) -> ApiResult<Response> {
    let mut data = serde_json::to_value(details).map_err(ApiError::internal)?;
    data[flag] = json!(true);
    Ok(axum::Json(Data { data }).into_response())
}

/// `POST /api/v1/device/approve {user_code, labels}`
#[utoipa::path(
    post,
    path = "/api/v1/device/approve",
    request_body(content = serde_json::Value, content_type = "application/json", description = "See protocol.md §15"),
    tag = "device",
    description = "Requires the operator role.",
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn approve(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    ApiJson(d): ApiJson<Decision>,
) -> ApiResult<Response> {
    let details = decide(&state, &ctx, op.name(), client_ip(&ctx), d, true).await?;
    decided("approved", &details)
}

/// `POST /api/v1/device/deny {user_code}`
#[utoipa::path(
    post,
    path = "/api/v1/device/deny",
    request_body(content = serde_json::Value, content_type = "application/json", description = "See protocol.md §15"),
    tag = "device",
    description = "Requires the operator role.",
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn deny(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    ApiJson(d): ApiJson<Decision>,
) -> ApiResult<Response> {
    let details = decide(&state, &ctx, op.name(), client_ip(&ctx), d, false).await?;
    decided("denied", &details)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

/// Shown for a code that is not pending, whatever the reason (never
/// issued, decided, expired), so the page tells a guesser nothing more.
const NO_SUCH_CODE: &str = "No device is waiting for approval with that code. Check the code the agent printed.";

/// The `/device` page. With `device`, its details come before the buttons
/// (RFC 8628 §5.4: the person approving must see what they approve).
fn page(message: &str, user_code: &str, device: Option<&DeviceDetails>) -> Html<String> {
    let device = device.map_or_else(String::new, |d| {
        let time = d.requested_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        format!(
            r#"<h2>Requesting device</h2>
<table><tr><th scope="row">Hostname</th><td>{}</td></tr>
<tr><th scope="row">Requested from</th><td>{}</td></tr>
<tr><th scope="row">Requested at</th><td>{}</td></tr>
<tr><th scope="row">Key fingerprint</th><td><code>{}</code></td></tr></table>
<p>Approve only if this is the machine you are enrolling and its agent printed the same fingerprint.</p>
"#,
            escape(&d.hostname),
            escape(d.requested_ip.as_deref().unwrap_or("unknown")),
            escape(&time),
            escape(&d.key_fingerprint),
        )
    });
    Html(format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>tether: approve a device</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family:sans-serif;max-width:32rem;margin:2rem auto">
<h1>Approve a device</h1><p role="status">{}</p>
{device}<form method="post" action="/device">
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

/// Every `/device` answer: never framed (clickjacking an Approve button),
/// no scripts or foreign form targets, never cached, and kept as HTML by the
/// envelope layer even when the status is an error.
fn page_response(status: StatusCode, html: Html<String>) -> Response {
    let mut res = (status, html).into_response();
    let headers = res.headers_mut();
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res.extensions_mut().insert(OwnErrorFormat);
    res
}

/// An error as the page: its status, `Retry-After` when it has one.
fn error_page(e: &ApiError, user_code: &str) -> Response {
    let status = StatusCode::from_u16(e.key.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message = match e.key {
        ErrorKey::NotFound => NO_SUCH_CODE,
        ErrorKey::ServerError => "Something went wrong; try again.",
        _ => &e.what,
    };
    let mut res = page_response(status, page(message, user_code, None));
    if let Some(retry) = e.params.get("retry_after").and_then(serde_json::Value::as_u64) {
        res.headers_mut().insert(header::RETRY_AFTER, retry.into());
    }
    res
}

#[derive(Debug, Default, Deserialize)]
struct PageQuery {
    user_code: Option<String>,
}

const PROMPT: &str = "Enter the code your agent printed, then sign in to approve it.";

/// `GET /device[?user_code=…]`: the approval page (plain HTML, no scripts).
/// With a pending code it shows the requesting device; an unknown code
/// counts against the IP like a wrong code at approval, so the page is no
/// cheaper a guessing oracle than the approve API.
#[utoipa::path(
    get,
    path = "/device",
    tag = "device",
    responses(
        (status = 200, description = "HTML page", content_type = "text/html", body = String),
        (status = "4XX", description = "HTML page naming the problem, or the error envelope", content_type = "text/html", body = String),
        (status = "default", description = "Error envelope", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn page_get(
    State(state): State<AppState>,
    caller: Result<PublicCaller, ApiError>,
    RawQuery(query): RawQuery,
) -> Response {
    let caller = match caller {
        Ok(c) => c,
        Err(e) => return error_page(&e, ""),
    };
    // Parsed by hand: a malformed query still gets the page and its headers.
    let q: PageQuery = serde_urlencoded::from_str(query.as_deref().unwrap_or_default()).unwrap_or_default();
    let typed = q.user_code.unwrap_or_default();
    if typed.trim().is_empty() {
        return page_response(StatusCode::OK, page(PROMPT, "", None));
    }
    let now = state.clock.now_ms();
    if let Err(e) = state.limits.device_code_allowed(caller.ip, now) {
        return error_page(&e, &typed);
    }
    let found = match UserCode::parse(&typed) {
        Ok(code) => match state.store.pending_device_grant(code.as_str(), now).await {
            Ok(found) => found,
            Err(e) => return error_page(&e.into(), &typed),
        },
        Err(_) => None,
    };
    match found {
        Some(info) => {
            let d = details(info);
            let message = "Check that this is your device, then sign in to approve it.";
            page_response(StatusCode::OK, page(message, &d.user_code, Some(&d)))
        }
        None => {
            state.limits.device_code_failed(caller.ip, now);
            page_response(StatusCode::NOT_FOUND, page(NO_SUCH_CODE, &typed, None))
        }
    }
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
/// CSRF token is involved. The body is read and parsed here rather than by
/// extractors so that every failure is answered by the page, headers included.
#[utoipa::path(
    post,
    path = "/device",
    tag = "device",
    responses(
        (status = 200, description = "HTML page", content_type = "text/html", body = String),
        (status = "4XX", description = "HTML page naming the problem, or the error envelope", content_type = "text/html", body = String),
        (status = "default", description = "Error envelope", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn page_post(
    State(state): State<AppState>,
    caller: Result<PublicCaller, ApiError>,
    ctx: AuditContext,
    body: axum::body::Body,
) -> Response {
    let caller = match caller {
        Ok(c) => c,
        Err(e) => return error_page(&e, ""),
    };
    let form = match axum::body::to_bytes(body, DEFAULT_BODY_LIMIT).await {
        Ok(bytes) => serde_urlencoded::from_bytes::<PageForm>(&bytes).ok(),
        Err(_) => None,
    };
    let Some(form) = form else {
        return page_response(StatusCode::BAD_REQUEST, page("Fill in every field of the form.", "", None));
    };
    let user = match basic_user(&state, caller.ip, &form.username, &form.password, PasswordSource::Form).await {
        Ok(Some(u)) if u.role != tether_store::Role::Viewer => u,
        Ok(Some(_)) => {
            return page_response(
                StatusCode::FORBIDDEN,
                page("Your role cannot approve devices.", &form.user_code, None),
            );
        }
        Ok(None) => {
            return page_response(StatusCode::UNAUTHORIZED, page("Wrong username or password.", &form.user_code, None));
        }
        Err(e) => return error_page(&e, &form.user_code),
    };
    let mut labels = Labels::new();
    for pair in form.labels.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some((k, v)) => {
                labels.insert(k.trim().to_owned(), v.trim().to_owned());
            }
            None => {
                return page_response(StatusCode::BAD_REQUEST, page("Labels are k=v pairs.", &form.user_code, None));
            }
        }
    }
    let approve = form.action == "approve";
    let decision = Decision { user_code: form.user_code.clone(), labels };
    match decide(&state, &ctx, &user.username, caller.ip, decision, approve).await {
        Ok(d) => {
            let message = if approve { "Approved: the agent will finish enrolling within seconds." } else { "Denied." };
            page_response(StatusCode::OK, page(message, "", Some(&d)))
        }
        Err(e) => error_page(&e, &form.user_code),
    }
}
