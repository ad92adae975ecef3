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
                    // A WebSocket close (4403) carries only its reason text.
                    match (at.is_empty(), reason.is_empty()) {
                        (false, _) => format!(
                            "this agent was revoked by the server at {at} (reason: {reason}); re-enroll it to continue"
                        ),
                        (true, false) => {
                            format!("this agent was revoked by the server ({reason}); re-enroll it to continue")
                        }
                        (true, true) => "this agent was revoked by the server; re-enroll it to continue".into(),
                    }
                }
                _ => "this agent was revoked by the server; re-enroll it to continue".into(),
            };
            Failure::Revoked(detail)
        }
        (Some(ErrorKey::CursorExpired), _) => Failure::CursorExpired,
        // The causes matter here: "certificate unknown" and "connection refused"
        // call for different fixes, and the transport error alone says neither.
        (_, Some(429 | 500..=599) | None) => Failure::Retry { retry_after, why: e.detail() },
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

/// The HTTP client for the configured server (trusting only `ca_file` when
/// given). Built once per run, so the plain-HTTP warning appears once.
pub fn http_client(cfg: &AgentConfig) -> Result<Client, Failure> {
    let mut builder = Client::builder(&cfg.server).user_agent(concat!("tether-agent/", env!("CARGO_PKG_VERSION")));
    if let Some(ca) = &cfg.ca_file {
        let pem = std::fs::read(ca).map_err(|e| Failure::Fatal(format!("reading CA file {}: {e}", ca.display())))?;
        builder = builder.ca_pem(pem);
    }
    let client = builder.build().map_err(|e| match e {
        ClientError::Ca(why) => match &cfg.ca_file {
            Some(ca) => Failure::Fatal(format!("CA file {}: {why}", ca.display())),
            None => Failure::Fatal(why),
        },
        ClientError::Url(e) => Failure::Fatal(format!("server URL {}: {e}", cfg.server)),
        other => Failure::Fatal(format!("building the HTTP client: {other}")),
    })?;
    if is_plain_remote(client.base_url()) {
        tracing::warn!(
            server = %cfg.server,
            "Talking plain HTTP to a non-loopback server: tokens and commands travel unencrypted; use https:// (and --ca-file for a private CA)"
        );
    }
    Ok(client)
}

/// `http://` to anything but this machine: the agent's tokens would cross a
/// network in clear.
fn is_plain_remote(url: &url::Url) -> bool {
    let loopback = match url.host() {
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    url.scheme() == "http" && !loopback
}

impl Session {
    /// Loads the saved identity, or enrolls with the configured enrollment token.
    pub async fn establish(mut base: Client, cfg: &AgentConfig, state: &StateDir) -> Result<Self, Failure> {
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

    /// Refreshes the access token the server no longer takes (the WebSocket
    /// closed with 4401, protocol.md §9), whatever its expiry says; the token
    /// is the one expiring at `used_expires_at_s`. Nothing happens when
    /// another loop has refreshed since: the next connection takes the newer one.
    pub async fn refresh_after(&self, used_expires_at_s: u64) -> Result<(), Failure> {
        let mut tokens = self.tokens.lock().await;
        if tokens.expires_at_s > used_expires_at_s {
            return Ok(());
        }
        self.refresh_locked(&mut tokens).await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_to_another_machine_counts_as_plain_remote() {
        let plain_remote = |u: &str| is_plain_remote(&url::Url::parse(u).expect("url"));
        for local in [
            "http://127.0.0.1:8080",
            "http://127.8.0.1",
            "http://localhost:8080",
            "http://LOCALHOST",
            "http://[::1]:80",
        ] {
            assert!(!plain_remote(local), "{local} is loopback");
        }
        for tls in ["https://fleet.example.com", "https://10.0.0.5:8443"] {
            assert!(!plain_remote(tls), "{tls} is TLS");
        }
        for remote in
            ["http://fleet.example.com", "http://10.0.0.5:8080", "http://[2001:db8::1]", "http://localhost.example"]
        {
            assert!(plain_remote(remote), "{remote} is plain and remote");
        }
    }

    #[test]
    fn a_ca_file_without_certificates_is_a_fatal_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate").expect("write");
        let flags = crate::Overrides {
            server: Some("https://fleet.example.com".into()),
            ca_file: Some(ca.clone()),
            ..Default::default()
        };
        let cfg = AgentConfig::resolve(dir.path(), Default::default(), |_| None, flags).expect("config");
        let err = http_client(&cfg).expect_err("no certificate in the CA file");
        assert!(matches!(&err, Failure::Fatal(m) if m.contains(&ca.display().to_string())), "{err}");

        let cfg = AgentConfig { ca_file: Some(dir.path().join("absent.pem")), ..cfg };
        let err = http_client(&cfg).expect_err("missing CA file");
        assert!(err.to_string().starts_with("reading CA file "), "{err}");
    }
}
