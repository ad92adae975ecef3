//! The agent's identity and tokens: enrollment on first start, access
//! tokens refreshed 60 s before expiry (and once on TOKEN_EXPIRED), refresh
//! tokens rotated and persisted before use. Enrollment is with an
//! enrollment token or, with `device_flow`, through [`crate::device_flow`]. Every API error is classified
//! into what the loops should do about it.

use std::time::Duration;

use base64::Engine;
use tether_client::{Client, ClientError};
use tether_proto::agent::{EnrollRequest, TokenPair};
use tether_proto::{AgentId, ErrorKey};
use tokio::sync::Mutex;

use crate::config::AgentConfig;
use crate::state::{StateDir, public_key_text};

/// Refresh this long before the access token expires.
const REFRESH_AHEAD_S: u64 = 60;

/// What a failed call means for the caller.
#[derive(Debug, Clone)]
pub enum Failure {
    /// The server revoked this agent: stop for good (exit 78).
    Revoked(String),
    /// Cannot continue without an operator (e.g. refresh token rejected).
    Fatal(String),
    /// Worth retrying after a backoff (network, 5xx, 429).
    Retry { retry_after: Option<Duration>, why: String },
    /// The stream cursor is outside the retained window: resync.
    CursorExpired,
    /// The server refused this request for good (400/404/409…); retrying will not help.
    Refused { status: u16, what: String },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Revoked(m) | Self::Fatal(m) => f.write_str(m),
            Self::Retry { why, .. } => write!(f, "{why}"),
            Self::CursorExpired => f.write_str("cursor expired"),
            Self::Refused { status, what } => write!(f, "refused ({status}): {what}"),
        }
    }
}

/// What a failed call means; shared with the device flow.
pub(crate) fn classify(e: &ClientError) -> Failure {
    let retry_after = e.retry_after().map(Duration::from_secs);
    match (e.key(), e.status()) {
        (Some(ErrorKey::DeviceRevoked), _) => {
            let detail = match e {
                ClientError::Api { body, .. } => {
                    let reason = body.params.get("reason").and_then(|v| v.as_str()).unwrap_or_default();
                    let at = body.params.get("revoked_at").and_then(|v| v.as_str()).unwrap_or_default();
                    format!("this agent was revoked by the server at {at} (reason: {reason}); re-enroll it to continue")
                }
                _ => "this agent was revoked by the server; re-enroll it to continue".into(),
            };
            Failure::Revoked(detail)
        }
        (Some(ErrorKey::CursorExpired), _) => Failure::CursorExpired,
        (_, Some(429 | 500..=599) | None) => Failure::Retry { retry_after, why: e.to_string() },
        (_, Some(status)) => Failure::Refused { status, what: e.to_string() },
    }
}

#[derive(Debug)]
struct Tokens {
    access: String,
    refresh: String,
    expires_at_s: u64,
}

#[derive(Debug)]
pub struct Session {
    base: Client,
    state: StateDir,
    agent_id: AgentId,
    tokens: Mutex<Tokens>,
}

fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// `exp` of a JWT, read without verification (only to schedule refreshes).
fn jwt_exp(token: &str) -> u64 {
    token
        .split('.')
        .nth(1)
        .and_then(|p| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(p).ok())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("exp")?.as_u64())
        .unwrap_or(0)
}

/// The HTTP client for the configured server (custom CA when given).
pub fn http_client(cfg: &AgentConfig) -> Result<Client, Failure> {
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("tether-agent/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10));
    if let Some(ca) = &cfg.ca_file {
        let pem = std::fs::read(ca).map_err(|e| Failure::Fatal(format!("reading CA file {}: {e}", ca.display())))?;
        let cert = reqwest::Certificate::from_pem(&pem)
            .map_err(|e| Failure::Fatal(format!("CA file {}: {e}", ca.display())))?;
        builder = builder.add_root_certificate(cert);
    }
    let http = builder.build().map_err(|e| Failure::Fatal(format!("building the HTTP client: {e}")))?;
    let client = Client::with_http(http, &cfg.server).map_err(|e| Failure::Fatal(format!("server URL: {e}")))?;
    let host = client.base_url().host_str().unwrap_or_default().to_owned();
    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if client.base_url().scheme() == "http" && !loopback {
        tracing::warn!(server = %cfg.server, "Talking plain HTTP to a remote server: tokens and commands travel unencrypted");
    }
    Ok(client)
}

impl Session {
    /// Loads the saved identity, or enrolls with the configured enrollment token.
    pub async fn establish(cfg: &AgentConfig, state: &StateDir) -> Result<Self, Failure> {
        let mut base = http_client(cfg)?;
        let io = |e: std::io::Error| Failure::Fatal(format!("state dir {}: {e}", state.root().display()));
        if cfg.sign_requests {
            // The client signs agent routes only; enrollment and refresh below stay unsigned.
            base = base.with_signing_key(state.signing_key().map_err(io)?);
        }
        let saved = (state.read("agent_id").map_err(io)?, state.read("refresh_token").map_err(io)?);
        if let (Some(id), Some(refresh)) = saved {
            let agent_id = id.parse().map_err(|_| Failure::Fatal(format!("state/agent_id is corrupt: {id:?}")))?;
            let access = state.read("access_token").map_err(io)?.unwrap_or_default();
            let expires_at_s = jwt_exp(&access);
            let tokens = Tokens { access, refresh, expires_at_s };
            return Ok(Self { base, state: state.clone(), agent_id, tokens: Mutex::new(tokens) });
        }
        let key = state.signing_key().map_err(io)?;
        let hostname =
            std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
        let hostname = cfg.name.clone().unwrap_or(if hostname.is_empty() { "unknown".into() } else { hostname });
        let pair = if let Some(enroll_token) = cfg.enroll_token.clone() {
            let req = EnrollRequest {
                enroll_token,
                public_key: public_key_text(&key),
                hostname,
                labels: cfg.labels.clone(),
                facts: serde_json::json!({"os": std::env::consts::OS, "arch": std::env::consts::ARCH, "agent_version": env!("CARGO_PKG_VERSION")}),
            };
            base.enroll(&req).await.map_err(|e| match classify(&e) {
                Failure::Refused { status: 401, .. } => {
                    Failure::Fatal("the enrollment token was rejected (invalid, expired or used up)".into())
                }
                other => other,
            })?
        } else if cfg.device_flow {
            if !cfg.labels.is_empty() {
                // The device authorization request carries no labels.
                tracing::warn!("Labels are chosen by the operator who approves the device; --label is ignored");
            }
            crate::device_flow::enroll(&base, &public_key_text(&key), &hostname).await?
        } else {
            return Err(Failure::Fatal(
                "this agent is not enrolled: pass --enroll-token (or TETHER_ENROLL_TOKEN) from `tether enroll-tokens create`, \
                 or --device-flow to have an operator approve it"
                    .into(),
            ));
        };
        tracing::info!(agent_id = %pair.agent_id, "Enrolled");
        state.write("agent_id", &pair.agent_id.to_string()).map_err(io)?;
        let session = Self {
            base,
            state: state.clone(),
            agent_id: pair.agent_id,
            tokens: Mutex::new(Tokens { access: String::new(), refresh: String::new(), expires_at_s: 0 }),
        };
        session.store(&mut *session.tokens.lock().await, pair)?;
        Ok(session)
    }

    pub fn agent_id(&self) -> AgentId {
        self.agent_id
    }

    pub async fn token_expires_at(&self) -> u64 {
        self.tokens.lock().await.expires_at_s
    }

    fn store(&self, tokens: &mut Tokens, pair: TokenPair) -> Result<(), Failure> {
        let io = |e: std::io::Error| Failure::Fatal(format!("saving tokens: {e}"));
        // The refresh token first: after this point only the new one is valid.
        self.state.write("refresh_token", &pair.refresh_token).map_err(io)?;
        self.state.write("access_token", &pair.access_token).map_err(io)?;
        tokens.expires_at_s = jwt_exp(&pair.access_token);
        tokens.access = pair.access_token;
        tokens.refresh = pair.refresh_token;
        Ok(())
    }

    async fn refresh_locked(&self, tokens: &mut Tokens) -> Result<(), Failure> {
        let pair = self.base.refresh(&tokens.refresh, self.agent_id).await.map_err(|e| match classify(&e) {
            Failure::Refused { .. } => {
                Failure::Fatal(format!("the server rejected this agent's refresh token ({e}); re-enroll it"))
            }
            other => other,
        })?;
        self.store(tokens, pair)
    }

    /// A client carrying a fresh access token.
    pub async fn client(&self) -> Result<Client, Failure> {
        let mut tokens = self.tokens.lock().await;
        if tokens.expires_at_s <= now_s() + REFRESH_AHEAD_S {
            self.refresh_locked(&mut tokens).await?;
        }
        Ok(self.base.clone().with_bearer(tokens.access.clone()))
    }

    /// Runs one API call; refreshes once and retries on TOKEN_EXPIRED.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, Failure>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        match f(self.client().await?).await {
            Ok(v) => Ok(v),
            Err(e) if e.key() == Some(ErrorKey::TokenExpired) => {
                let mut tokens = self.tokens.lock().await;
                self.refresh_locked(&mut tokens).await?;
                drop(tokens);
                f(self.client().await?).await.map_err(|e| classify(&e))
            }
            Err(e) => Err(classify(&e)),
        }
    }
}
