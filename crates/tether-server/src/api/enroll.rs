//! Agent identity endpoints: enrollment and refresh-token rotation, in the
//! native, certificate-agent (protocol.md §16.4) and OAuth (`/oauth/token`) forms,
//! and seed 003's refresh that keeps a current refresh token (docs/compat.md).

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;
use tether_proto::agent::{EnrollRequest, RefreshRequest, TokenPair, validate_labels};
use tether_proto::{AgentId, Data, ErrorKey};
use tether_store::{AgentRecord, NewAgent, RefreshOutcome, StoreError};

use crate::auth::jwt::ACCESS_TOKEN_TTL_S;
use crate::auth::secret::{REFRESH_TOKEN_PREFIX, hash_token, new_token};
use crate::error::{ApiError, ApiJson, ApiResult};
use crate::state::{AppState, AuditContext, AuditEvent, PublicCaller};
use crate::stream::StreamEvent;

/// Longest DNS name (RFC 1035), for hostnames agents send at enrollment.
pub const MAX_HOSTNAME_LEN: usize = 253;

/// A hostname an agent may enroll with: 1–253 printable characters.
pub fn hostname_ok(hostname: &str) -> bool {
    !hostname.is_empty() && hostname.len() <= MAX_HOSTNAME_LEN && !hostname.chars().any(char::is_control)
}

/// Adds `Cache-Control: no-store`, required on every credential response.
pub fn no_store(mut res: Response) -> Response {
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

pub fn parse_public_key(text: &str) -> ApiResult<Vec<u8>> {
    let bytes = URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|_| ApiError::bad_request("public_key", "public_key must be base64url"))?;
    let raw: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| ApiError::bad_request("public_key", "public_key must be a raw 32-byte Ed25519 key"))?;
    ed25519_dalek::VerifyingKey::from_bytes(&raw)
        .map_err(|_| ApiError::bad_request("public_key", "public_key is not a valid Ed25519 point"))?;
    Ok(raw.to_vec())
}

/// `POST /api/v1/agents/enroll`
#[utoipa::path(
    post,
    path = "/api/v1/agents/enroll",
    request_body = tether_proto::agent::EnrollRequest,
    tag = "enroll",
    responses(
        (status = 201, description = "Success", body = tether_proto::Data<tether_proto::agent::TokenPair>),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn enroll(
    State(state): State<AppState>,
    _: PublicCaller,
    ctx: AuditContext,
    ApiJson(req): ApiJson<EnrollRequest>,
) -> ApiResult<Response> {
    let public_key = parse_public_key(&req.public_key)?;
    let enrollment = Enrollment {
        enroll_token: req.enroll_token,
        hostname: req.hostname,
        labels: req.labels,
        facts: req.facts,
        public_key,
    };
    let pair = enroll_agent(&state, &ctx, enrollment).await?;
    Ok(no_store((StatusCode::CREATED, axum::Json(Data { data: pair })).into_response()))
}

/// What an agent enrolls with, whichever route it came by.
pub(crate) struct Enrollment {
    pub enroll_token: String,
    pub hostname: String,
    pub labels: tether_proto::Labels,
    pub facts: serde_json::Value,
    /// The raw Ed25519 key the agent signs with; empty for an agent of a
    /// seed design that has none (it cannot sign requests then).
    pub public_key: Vec<u8>,
}

/// Enrolls an agent with a one-time enrollment token (protocol.md §3, way 1):
/// validates the request, creates the agent and its first token pair, and
/// audits the attempt either way.
pub(crate) async fn enroll_agent(state: &AppState, ctx: &AuditContext, req: Enrollment) -> ApiResult<TokenPair> {
    let public_key = req.public_key;
    if !hostname_ok(&req.hostname) {
        return Err(ApiError::bad_request(
            "hostname",
            format!("hostname must be 1-{MAX_HOSTNAME_LEN} printable chars"),
        ));
    }
    validate_labels(&req.labels).map_err(|e| ApiError::bad_request("labels", e))?;
    let refresh_token = new_token(REFRESH_TOKEN_PREFIX);
    let now = state.clock.now_ms();
    let agent =
        NewAgent { id: AgentId::new(), hostname: req.hostname, labels: req.labels, facts: req.facts, public_key };
    let audit = |rec: &AgentRecord| {
        state.audit_entry(
            ctx,
            AuditEvent {
                actor: &rec.id.to_string(),
                actor_kind: "agent",
                action: "agent.enroll",
                target: rec.id.to_string(),
                outcome: "ok",
                details: json!({"hostname": rec.hostname, "labels": rec.labels}),
            },
        )
    };
    let rec = match state
        .store
        .enroll_agent(hash_token(&req.enroll_token), agent, hash_token(&refresh_token), now, &audit)
        .await
    {
        Ok(rec) => rec,
        Err(StoreError::NotFound(_)) => {
            state
                .audit(
                    ctx,
                    AuditEvent {
                        actor: "anonymous",
                        actor_kind: "anonymous",
                        action: "agent.enroll",
                        target: String::new(),
                        outcome: "denied",
                        details: json!({"reason": "enrollment token invalid, expired or used up"}),
                    },
                )
                .await;
            return Err(ApiError::new(ErrorKey::Unauthenticated, "enrollment token is invalid, expired or used up"));
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(agent_id = %rec.id, hostname = %rec.hostname, "Agent enrolled");
    Ok(TokenPair {
        agent_id: rec.id,
        access_token: state.tokens.issue(rec.id, state.clock.now_s()),
        refresh_token,
        expires_in: ACCESS_TOKEN_TTL_S,
    })
}

/// Why a refresh failed, before it is shaped for the route's error format.
enum RefreshFailure {
    Invalid,
    Revoked,
    Api(ApiError),
}

/// Per-family bucket (protocol.md §11): one agent stuck in a refresh loop must
/// not use up the per-IP budget of the rest of its NAT'ed fleet.
async fn charge_family(state: &AppState, presented: &str) -> Result<(), RefreshFailure> {
    let family = state.store.refresh_family(hash_token(presented)).await.map_err(|e| RefreshFailure::Api(e.into()))?;
    if let Some(family) = family {
        state.limits.refresh_family(&family).map_err(RefreshFailure::Api)?;
    }
    Ok(())
}

async fn rotate(
    state: &AppState,
    ctx: &AuditContext,
    presented: &str,
    expected_agent: Option<AgentId>,
) -> Result<TokenPair, RefreshFailure> {
    charge_family(state, presented).await?;
    rotate_charged(state, ctx, presented, expected_agent).await
}

/// [`rotate`] once the family's bucket has been charged.
async fn rotate_charged(
    state: &AppState,
    ctx: &AuditContext,
    presented: &str,
    expected_agent: Option<AgentId>,
) -> Result<TokenPair, RefreshFailure> {
    let refresh_token = new_token(REFRESH_TOKEN_PREFIX);
    let now = state.clock.now_ms();
    // Written by the store, in the rotation's transaction, only on reuse
    // (target and details filled in there).
    let reuse_audit = state.audit_entry(
        ctx,
        AuditEvent {
            actor: "anonymous",
            actor_kind: "agent",
            action: "token.refresh_reuse",
            target: String::new(),
            outcome: "family_revoked",
            details: json!({}),
        },
    );
    let outcome = state
        .store
        .rotate_refresh_token(
            expected_agent,
            hash_token(presented),
            hash_token(&refresh_token),
            state.config.refresh_grace_ms,
            now,
            reuse_audit,
        )
        .await
        .map_err(|e| RefreshFailure::Api(e.into()))?;
    match outcome {
        RefreshOutcome::Rotated { agent_id, lost_response_retry } => {
            if lost_response_retry {
                tracing::info!(agent_id = %agent_id, "Refresh retried after a lost response");
            }
            Ok(TokenPair {
                agent_id,
                access_token: state.tokens.issue(agent_id, state.clock.now_s()),
                refresh_token,
                expires_in: ACCESS_TOKEN_TTL_S,
            })
        }
        RefreshOutcome::Invalid => Err(RefreshFailure::Invalid),
        RefreshOutcome::AgentRevoked => Err(RefreshFailure::Revoked),
        RefreshOutcome::ReuseDetected { agent_id, family_id } => {
            // The family and the audit row are committed; now refuse the
            // agent's access tokens on every server at once.
            state.notifier.publish(StreamEvent::TokensRevoked { agent_id, at: now });
            tracing::warn!(agent_id = %agent_id, family_id = %family_id, "Refresh token reuse: family and access tokens revoked");
            Err(RefreshFailure::Invalid)
        }
    }
}

/// `POST /api/v1/auth/token/refresh {refresh_token, device_public_id}` (certificate-agent form, protocol.md §3, §16.4).
#[utoipa::path(
    post,
    path = "/api/v1/auth/token/refresh",
    request_body = tether_proto::agent::RefreshRequest,
    tag = "enroll",
    responses(
        (status = 200, description = "Success", body = tether_proto::Data<tether_proto::agent::TokenPair>),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn refresh(
    State(state): State<AppState>,
    _: PublicCaller,
    ctx: AuditContext,
    ApiJson(req): ApiJson<RefreshRequest>,
) -> ApiResult<Response> {
    let pair = refresh_agent(&state, &ctx, &req).await?;
    Ok(no_store(axum::Json(Data { data: pair }).into_response()))
}

/// Rotates the refresh token of the agent `device_public_id` names
/// (protocol.md §3), failures in the error envelope.
async fn refresh_agent(state: &AppState, ctx: &AuditContext, req: &RefreshRequest) -> ApiResult<TokenPair> {
    rotate(state, ctx, &req.refresh_token, Some(req.device_public_id)).await.map_err(refresh_error)
}

/// A new access token for a refresh token that stays valid: seed 003's
/// `/auth/token/refresh`, whose agents store their refresh token once and
/// never replace it (docs/compat.md). A current token (never used, not
/// revoked, of a live agent, the one `device_public_id` names) is answered
/// with itself as the pair's refresh token. Every other token goes through
/// the native rotation (protocol.md §3) and its errors: one a native refresh
/// already rotated is reuse there (the family dies), unknown, foreign and
/// dead ones are 401, a revoked agent `DEVICE_REVOKED`. The family's bucket
/// is charged once either way.
pub(crate) async fn refresh_agent_keeping_token(
    state: &AppState,
    ctx: &AuditContext,
    req: &RefreshRequest,
) -> ApiResult<TokenPair> {
    let presented = &req.refresh_token;
    let refreshed = async {
        charge_family(state, presented).await?;
        let current = state
            .store
            .current_refresh_agent(Some(req.device_public_id), hash_token(presented))
            .await
            .map_err(|e| RefreshFailure::Api(e.into()))?;
        match current {
            Some(agent_id) => Ok(TokenPair {
                agent_id,
                access_token: state.tokens.issue(agent_id, state.clock.now_s()),
                refresh_token: presented.clone(),
                expires_in: ACCESS_TOKEN_TTL_S,
            }),
            None => rotate_charged(state, ctx, presented, Some(req.device_public_id)).await,
        }
    };
    refreshed.await.map_err(refresh_error)
}

/// A refresh failure in the error envelope.
fn refresh_error(failure: RefreshFailure) -> ApiError {
    match failure {
        RefreshFailure::Invalid => ApiError::new(ErrorKey::Unauthenticated, "refresh token is invalid"),
        RefreshFailure::Revoked => ApiError::new(ErrorKey::DeviceRevoked, "this agent has been revoked"),
        RefreshFailure::Api(e) => e,
    }
}

/// A form-encoded OAuth request as name → value. A name may repeat only
/// with the same value (some clients send `client_id` twice).
#[derive(Debug, Default)]
pub struct OAuthForm(std::collections::HashMap<String, String>);

impl OAuthForm {
    /// The start of every `/oauth/*` handler: the caller passed the per-IP
    /// limit and the body parses; otherwise the RFC 6749 answer to send.
    pub fn accept(
        caller: Result<PublicCaller, ApiError>,
        headers: &axum::http::HeaderMap,
        body: &[u8],
    ) -> Result<(PublicCaller, Self), Box<Response>> {
        let caller = caller.map_err(|e| Box::new(oauth_api_error(&e)))?;
        Ok((caller, Self::parse(headers, body)?))
    }

    /// Parses the body; on failure, the `invalid_request` answer to send.
    fn parse(headers: &axum::http::HeaderMap, body: &[u8]) -> Result<Self, Box<Response>> {
        Self::parse_pairs(headers, body)
            .map_err(|description| Box::new(oauth_error(StatusCode::BAD_REQUEST, "invalid_request", &description)))
    }

    fn parse_pairs(headers: &axum::http::HeaderMap, body: &[u8]) -> Result<Self, String> {
        let ctype = headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
        if !ctype.to_ascii_lowercase().starts_with("application/x-www-form-urlencoded") {
            return Err("expected a form-encoded request".to_owned());
        }
        let mut map = std::collections::HashMap::new();
        for (k, v) in url_pairs(body) {
            if map.get(&k).is_some_and(|old: &String| *old != v) {
                return Err(format!("{k} given twice"));
            }
            map.insert(k, v);
        }
        Ok(Self(map))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str).filter(|v| !v.is_empty())
    }
}

fn url_pairs(body: &[u8]) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body).unwrap_or_default()
}

/// An RFC 6749 §5.2 error answer.
pub fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    let mut res = (status, axum::Json(json!({"error": error, "error_description": description}))).into_response();
    res.extensions_mut().insert(crate::error::OwnErrorFormat);
    no_store(res)
}

/// An [`ApiError`] met on an `/oauth/*` route (the per-IP bucket of the
/// `PublicCaller` extractor, the refresh-family bucket, the store) in RFC
/// 6749 form: that RFC has no rate-limit error, so a 429 or 503 keeps its
/// status and `Retry-After` and says `temporarily_unavailable`.
pub fn oauth_api_error(e: &ApiError) -> Response {
    let status = match e.key {
        ErrorKey::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorKey::ServiceUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => {
            tracing::error!(error = %e.what, "OAuth request failed");
            return oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "try again");
        }
    };
    let mut res = oauth_error(status, "temporarily_unavailable", &e.what);
    if let Some(retry) = e.params.get("retry_after").and_then(serde_json::Value::as_u64) {
        res.headers_mut().insert(header::RETRY_AFTER, retry.into());
    }
    res
}

/// `POST /oauth/token` (form-encoded, RFC 6749): refresh and device-code grants.
#[utoipa::path(
    post,
    path = "/oauth/token",
    request_body(content = String, content_type = "application/x-www-form-urlencoded", description = "RFC 6749 form: `grant_type=refresh_token` or the RFC 8628 device code grant"),
    tag = "enroll",
    responses(
        (status = 200, description = "RFC 6749 / RFC 8628 token or device response", body = serde_json::Value),
        (status = "4XX", description = "RFC 6749 §5.2 error (or the error envelope for a malformed request)", body = serde_json::Value),
        (status = "default", description = "Error envelope", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn oauth_token(
    State(state): State<AppState>,
    caller: Result<PublicCaller, ApiError>,
    ctx: AuditContext,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let (_, form) = match OAuthForm::accept(caller, &headers, &body) {
        Ok(accepted) => accepted,
        Err(res) => return *res,
    };
    match form.get("grant_type") {
        Some(crate::api::device::DEVICE_GRANT_TYPE) => {
            return crate::api::device::token(&state, &ctx, form.get("device_code"), form.get("client_id")).await;
        }
        Some("refresh_token") => {}
        Some(_) => {
            return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type", "grant_type is not supported");
        }
        None => return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "grant_type is required"),
    }
    let Some(presented) = form.get("refresh_token") else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "refresh_token is required");
    };
    match rotate(&state, &ctx, presented, None).await {
        Ok(pair) => no_store(
            axum::Json(json!({
                "access_token": pair.access_token,
                "token_type": "Bearer",
                "expires_in": pair.expires_in,
                "refresh_token": pair.refresh_token,
                "agent_id": pair.agent_id,
            }))
            .into_response(),
        ),
        Err(RefreshFailure::Invalid) => {
            oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "refresh token is invalid")
        }
        Err(RefreshFailure::Revoked) => oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "agent has been revoked"),
        Err(RefreshFailure::Api(e)) => oauth_api_error(&e),
    }
}
