//! Who is calling: agent access tokens and keys, operator API tokens and
//! HTTP Basic. An agent credential never works on operator routes and vice versa.

pub mod agent_key;
pub mod jwt;
pub mod password;
pub mod secret;
pub mod signing;

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use base64::Engine;
use serde_json::json;
use tether_proto::{AgentId, ErrorKey};
use tether_store::{Role, User};

use crate::api::Access;
use crate::error::ApiError;
use crate::state::AppState;
use crate::stream::AgentStream;

/// An authenticated, non-revoked agent.
#[derive(Debug, Clone)]
pub struct AgentCaller {
    pub id: AgentId,
    pub stream: Arc<AgentStream>,
    pub credential: AgentCredential,
}

/// What an agent proved who it is with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentCredential {
    /// An access token, issued at this instant (seconds since the epoch).
    AccessToken { issued_at: u64 },
    /// A long-lived agent key (`tta_…`, protocol.md §16.5): it never
    /// expires and belongs to no refresh family; it ends with its agent.
    Key,
}

impl AgentCaller {
    /// How long the credential stays valid, `None` for one that does not
    /// expire (an agent key): a WebSocket authenticated by it closes then
    /// (protocol.md §9).
    pub fn token_lifetime_left(&self, now: tether_store::Millis) -> Option<std::time::Duration> {
        let AgentCredential::AccessToken { issued_at } = self.credential else { return None };
        let expires_ms = issued_at.saturating_add(jwt::ACCESS_TOKEN_TTL_S).saturating_mul(1000);
        Some(std::time::Duration::from_millis(expires_ms.saturating_sub(now.max(0) as u64)))
    }

    /// Whether a refresh-token reuse revoked the credential since it was
    /// checked. Only access tokens: an agent key is in no refresh family
    /// (revoking or deleting the agent ends it instead).
    pub fn token_revoked(&self) -> bool {
        match self.credential {
            AgentCredential::AccessToken { issued_at } => self.stream.token_revoked(issued_at),
            AgentCredential::Key => false,
        }
    }
}

/// Name of the dashboard session cookie.
pub const SESSION_COOKIE: &str = "tether_session";
/// Header that must carry the session's CSRF token on mutating requests.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The session cookie's value, if the request carries one.
pub fn session_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(SESSION_COOKIE)?.strip_prefix('='))
}

async fn session_user(state: &AppState, parts: &Parts) -> Result<Option<User>, ApiError> {
    let Some(token) = session_token(&parts.headers) else { return Ok(None) };
    let Some((user, csrf)) = state.store.find_session(secret::hash_token(token), state.clock.now_ms()).await? else {
        return Ok(None);
    };
    let safe = matches!(parts.method, axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS);
    if !safe {
        let sent = parts.headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default();
        if !secret::constant_time_eq(sent.as_bytes(), csrf.as_bytes()) {
            return Err(ApiError::new(ErrorKey::Forbidden, "missing or wrong CSRF token"));
        }
    }
    Ok(Some(user))
}

fn bearer(parts: &Parts) -> Option<&str> {
    bearer_token(&parts.headers)
}

/// The token of an `Authorization: Bearer …` header.
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

pub fn revoked_error(stream: &AgentStream) -> ApiError {
    let (at, reason) = stream.revocation().cloned().unwrap_or_default();
    let at = time::OffsetDateTime::from_unix_timestamp(at / 1000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok());
    ApiError::new(ErrorKey::DeviceRevoked, "this agent has been revoked")
        .with("revoked_at", at.unwrap_or_default())
        .with("reason", reason)
}

impl FromRequestParts<AppState> for AgentCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = bearer(parts).ok_or_else(ApiError::unauthenticated)?;
        let (id, credential) = if token.starts_with(secret::AGENT_KEY_PREFIX) {
            let id = state.agent_keys.agent_of(state.store.as_ref(), token).await?;
            (id.ok_or_else(ApiError::unauthenticated)?, AgentCredential::Key)
        } else {
            let (id, issued_at) = state.tokens.verify_issued(token).map_err(|e| match e {
                jwt::TokenError::Expired { expired_at } => {
                    let at = time::OffsetDateTime::from_unix_timestamp(expired_at as i64)
                        .ok()
                        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok());
                    ApiError::new(ErrorKey::TokenExpired, "access token expired").with("expired_at", json!(at))
                }
                jwt::TokenError::Invalid => ApiError::unauthenticated(),
            })?;
            (id, AgentCredential::AccessToken { issued_at })
        };
        let Some(stream) = state.streams.get(state.store.as_ref(), id).await? else {
            // The agent is gone (deleted): a credential remembered for it goes too.
            match credential {
                AgentCredential::AccessToken { .. } => state.tokens.forget(token),
                AgentCredential::Key => state.agent_keys.forget(token),
            }
            return Err(ApiError::unauthenticated());
        };
        if stream.state().revoked {
            // A revoked agent's key stays remembered (refused here from
            // memory); a token is decoded again, as every refused one is.
            state.tokens.forget(token);
            return Err(revoked_error(&stream));
        }
        let caller = Self { id, stream, credential };
        // Refresh-token reuse revoked every access token issued until then.
        if caller.token_revoked() {
            state.tokens.forget(token);
            return Err(ApiError::unauthenticated());
        }
        // Stream polls have their own bucket, charged only when answered at once.
        let path = parts.extensions.get::<axum::extract::MatchedPath>().map(|p| p.as_str());
        if !matches!(path, Some(crate::api::UPDATES_PATH | crate::api::SEED_UPDATES_PATH)) {
            state.limits.agent(id)?;
        }
        signing::verify(parts, state, id, caller.stream.public_key()).await?;
        // Only a fully verified request counts as the agent being online: a
        // stolen token without the key must not keep it looking alive.
        caller.stream.seen(state.clock.now_ms());
        Ok(caller)
    }
}

/// An authenticated operator (user via API token or HTTP Basic).
#[derive(Debug, Clone)]
pub struct Operator {
    pub user: User,
    pub credential: Credential,
}

/// How an operator proved who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// The password (HTTP Basic).
    Password,
    /// A dashboard session cookie (made by a password login).
    Session,
    /// An API token (Bearer, or as the Basic password), with its expiry.
    ApiToken { expires_at: Option<tether_store::Millis> },
}

impl Credential {
    /// Whether this is the user's password at work: tokens it creates are
    /// sessions, which end when the password changes.
    pub fn is_password(self) -> bool {
        matches!(self, Credential::Password | Credential::Session)
    }
}

fn rank(role: Role) -> u8 {
    match role {
        Role::Viewer => 0,
        Role::Operator => 1,
        Role::Admin => 2,
    }
}

/// The role the route table (`api::ROUTES`) demands for this request.
fn required_role(parts: &Parts) -> Result<Role, ApiError> {
    let path = parts.extensions.get::<axum::extract::MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_default();
    match crate::api::access_of(&parts.method, &path) {
        Some(Access::AnyUser | Access::Viewer) => Ok(Role::Viewer),
        Some(Access::Operator) => Ok(Role::Operator),
        Some(Access::Admin) => Ok(Role::Admin),
        other => {
            // Fail closed: an operator handler on a route the table does not give to users.
            tracing::error!(path = %path, access = ?other, "Operator credentials on a route without a user rule");
            Err(ApiError::forbidden())
        }
    }
}

impl Operator {
    pub fn name(&self) -> &str {
        &self.user.username
    }
}

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let (scheme, value) = header.split_once(' ').unwrap_or_default();
        let found = if scheme.eq_ignore_ascii_case("bearer") && value.starts_with(secret::API_TOKEN_PREFIX) {
            api_token_user(state, value.trim()).await?
        } else if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(value.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(ApiError::unauthenticated)?;
            let (username, password) = decoded.split_once(':').ok_or_else(ApiError::unauthenticated)?;
            if password.starts_with(secret::API_TOKEN_PREFIX) {
                // Config-controller clients send an API token as the Basic password (protocol.md §3, §16.3).
                api_token_user(state, password).await?
            } else {
                let ip = parts.extensions.get::<crate::state::ClientAddr>().map(|a| a.0.ip());
                basic_user(state, ip, username, password, PasswordSource::Basic)
                    .await?
                    .map(|u| (u, Credential::Password))
            }
        } else if header.is_empty() {
            session_user(state, parts).await?.map(|u| (u, Credential::Session))
        } else {
            None
        };
        let (user, credential) = found.ok_or_else(ApiError::unauthenticated)?;
        state.limits.user(&user.id)?;
        let required = required_role(parts)?;
        if rank(user.role) < rank(required) {
            let ctx = crate::state::AuditContext::from_parts(parts);
            state
                .audit(
                    &ctx,
                    crate::state::AuditEvent {
                        actor: &user.username,
                        actor_kind: "user",
                        action: "rbac.denied",
                        target: format!("{} {}", parts.method, parts.uri.path()),
                        outcome: "denied",
                        details: json!({"role": user.role.as_str(), "required": required.as_str()}),
                    },
                )
                .await;
            return Err(ApiError::forbidden());
        }
        Ok(Self { user, credential })
    }
}

async fn api_token_user(state: &AppState, token: &str) -> Result<Option<(User, Credential)>, ApiError> {
    let found = state.store.find_api_token(secret::hash_token(token), state.clock.now_ms()).await?;
    Ok(found.map(|(user, expires_at)| (user, Credential::ApiToken { expires_at })))
}

/// Where a password arrived: HTTP Basic is not behind the per-IP bucket
/// of the public routes, so its password checks are charged to it here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordSource {
    /// The login route or the `/device` form (already IP-limited).
    Form,
    /// An `Authorization: Basic` header on an operator route.
    Basic,
}

/// Checks a username and password, rationed as protocol.md §3 says: the
/// username is validated before anything else, a fresh successful Basic
/// check is answered from memory, and otherwise a login failure slot is
/// reserved before argon2 runs (under the semaphore), given back only on
/// success. Unknown users take the same path (and time) as wrong passwords.
pub async fn basic_user(
    state: &AppState,
    ip: Option<std::net::IpAddr>,
    username: &str,
    password: &str,
    source: PasswordSource,
) -> Result<Option<User>, ApiError> {
    tether_proto::user::validate_username(username).map_err(|e| ApiError::bad_request("username", e))?;
    let now = state.clock.now_ms();
    // A blocked pair or address stays blocked, even for a remembered password.
    state.limits.login_allowed(ip, username, now)?;
    if source == PasswordSource::Basic
        && let Some(checked_hash) = state.passwords.cached(username, password, now)
    {
        match state.store.find_user(username).await? {
            Some(user) if user.password_hash == checked_hash => {
                state.passwords.hit();
                return Ok(Some(user));
            }
            // Changed, disabled or deleted since: check afresh.
            _ => state.passwords.forget(username, password),
        }
    }
    if source == PasswordSource::Basic
        && let Some(ip) = ip
    {
        state.limits.ip(ip)?;
    }
    let slot = state.limits.reserve_login(ip, username, now)?;
    let checked = async {
        let user = state.store.find_user(username).await?;
        let ok = state.passwords.verify(password, user.as_ref().map(|u| u.password_hash.as_str())).await?;
        Ok::<_, ApiError>((user, ok))
    }
    .await;
    let user = match checked {
        Ok((user, true)) => {
            slot.release();
            user
        }
        Ok((_, false)) => None,
        Err(e) => {
            // Nothing was verified (store error or no permit in time): not a failure.
            slot.release();
            return Err(e);
        }
    };
    match user {
        Some(user) => {
            if source == PasswordSource::Basic {
                state.passwords.remember(username, password, &user.password_hash, now);
            }
            Ok(Some(user))
        }
        None => {
            let ctx_ip = ip.map(|i| i.to_string());
            state
                .audit(
                    &crate::state::AuditContext { ip: ctx_ip, request_id: None },
                    crate::state::AuditEvent {
                        actor: username,
                        actor_kind: "user",
                        action: "login.failed",
                        target: username.to_owned(),
                        outcome: "denied",
                        details: json!({}),
                    },
                )
                .await;
            Ok(None)
        }
    }
}
