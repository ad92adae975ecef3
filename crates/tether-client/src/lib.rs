//! A typed client for the tether HTTP API, shared by the agent, the CLI, the
//! tests and the benchmarks. Every non-2xx answer becomes
//! [`ClientError::Api`] with the server's error envelope.

mod items;
pub mod signing;
mod telemetry;
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{ETAG, HeaderMap, HeaderValue, IF_MATCH, IF_NONE_MATCH, RETRY_AFTER};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
pub use telemetry::{InventoryQuery, MetricQuery};
use tether_proto::agent::{
    Agent, AgentStatus, CreateEnrollToken, CreatedEnrollToken, DEVICE_CLIENT_ID, DEVICE_GRANT_TYPE,
    DeviceAuthorization, DeviceDecision, DeviceDetails, EnrollRequest, EnrollToken, OAuthError, RefreshRequest,
    RevokeRequest, TokenPair, UpdateAgent,
};
use tether_proto::command::{Batch, Command, CreateCommand, CreatedCommands, ResultReport, StatusReport};
use tether_proto::config::{
    ConfigScope, ConfigStatus, ConfigVersion, ConfigWritten, EffectiveConfig, PutConfig, Rollback, Scope,
};
use tether_proto::signal::Updates;
use tether_proto::user::{
    AgentAuditEvent, ApiToken, AuditRow, AuditVerification, CreateApiToken, CreateUser, CreatedApiToken, UpdateUser,
    User,
};
use tether_proto::{AgentId, BatchId, CommandId, Data, ErrorBody, ErrorEnvelope, ErrorKey, Page};

/// Extra time allowed beyond a long-poll's `wait` before the request times out.
const POLL_SLACK: Duration = Duration::from_secs(15);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{} ({}): {}", .body.key, .status, .body.what)]
    Api { status: u16, body: Box<ErrorBody>, retry_after: Option<u64> },
    #[error("unexpected answer {status}: {text}")]
    Unexpected { status: u16, text: String },
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("invalid server url: {0}")]
    Url(#[from] url::ParseError),
    #[error("invalid CA certificate: {0}")]
    Ca(String),
    /// The agent WebSocket could not be opened or stopped working (protocol.md §9).
    #[error("websocket {0}")]
    WebSocket(#[from] ws::WsError),
}

impl ClientError {
    /// The protocol.md §2 key of an API error.
    pub fn key(&self) -> Option<ErrorKey> {
        match self {
            Self::Api { body, .. } => body.key(),
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } | Self::Unexpected { status, .. } => Some(*status),
            Self::Http(e) => e.status().map(|s| s.as_u16()),
            Self::Url(_) | Self::Ca(_) | Self::WebSocket(_) => None,
        }
    }

    /// This error with its causes, e.g. "request failed: error sending
    /// request …: invalid peer certificate: UnknownIssuer": a transport
    /// error's own message rarely says what went wrong.
    pub fn detail(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            // `request failed: {0}` already shows the first cause.
            if !text.ends_with(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            source = cause.source();
        }
        text
    }

    /// Seconds the server asked us to wait (`Retry-After`).
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Api { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// How requests authenticate.
#[derive(Clone, Default)]
pub enum Credentials {
    #[default]
    None,
    /// An agent access JWT or an operator API token (`tth_…`).
    Bearer(String),
    Basic {
        username: String,
        password: String,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::Bearer(_) => f.write_str("Bearer(<redacted>)"),
            Self::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
        }
    }
}

/// The answer of one RFC 8628 token poll (`POST /oauth/token`, device_code grant).
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceToken {
    /// An operator approved: the agent's first token pair.
    Issued(TokenPair),
    /// `authorization_pending`: ask again after the interval.
    Pending,
    /// `slow_down`: ask again, 5 s more apart than before (RFC 8628 §3.5).
    SlowDown,
    /// `access_denied`: an operator denied this device.
    Denied,
    /// `expired_token`: the device code expired; start over.
    Expired,
    /// Any other OAuth error (`invalid_grant`, `invalid_client` …).
    Refused(OAuthError),
}

/// The answer of a stream poll.
#[derive(Debug, Clone, PartialEq)]
pub enum Poll {
    /// 200: new signals and the cursor after them.
    Signals(Updates),
    /// 204: nothing newer; the cursor to poll from next.
    Idle { cursor: String },
}

#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: url::Url,
    credentials: Credentials,
    /// Signs agent-route requests when set (protocol.md §3); `Arc` keeps clones cheap.
    signer: Option<Arc<ed25519_dalek::SigningKey>>,
    /// What the agent WebSocket shares with the HTTP client: user agent and trusted roots.
    ws: Arc<ws::Settings>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CommandQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<AgentId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<BatchId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<AgentId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct AgentQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<AgentStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub q: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// Builds a [`Client`] that needs more than the defaults, e.g. a private CA:
/// `Client::builder(base).ca_pem(pem).build()`.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    base: String,
    user_agent: String,
    ca_pem: Option<Vec<u8>>,
}

impl ClientBuilder {
    /// Sent as `User-Agent` (default `tether-client/<version>`).
    pub fn user_agent(mut self, user_agent: impl Into<String>) -> Self {
        self.user_agent = user_agent.into();
        self
    }

    /// Trusts only the CA certificates in this PEM bundle for `https://`
    /// servers (like `curl --cacert`): a fleet behind a private CA should
    /// not also accept any publicly trusted certificate for its server name.
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    pub fn build(self) -> Result<Client> {
        // The server closes a keep-alive connection idle for its header
        // timeout (10 s, protocol.md §11); dropping ours first means a request
        // never goes out on a connection the server is closing at that moment.
        let mut http = reqwest::Client::builder()
            .user_agent(&self.user_agent)
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(5));
        if let Some(pem) = &self.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| ClientError::Ca(e.to_string()))?;
            // Text without any PEM block parses as an empty bundle; trusting
            // nothing would only fail later with a confusing handshake error.
            if certs.is_empty() {
                return Err(ClientError::Ca("no CERTIFICATE block found".into()));
            }
            http = http.tls_certs_only(certs);
        }
        let mut client = Client::with_http(http.build()?, &self.base)?;
        client.ws = Arc::new(ws::Settings::new(self.user_agent, self.ca_pem));
        Ok(client)
    }
}

impl Client {
    /// A client for the server at `base` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base: &str) -> Result<Self> {
        Self::builder(base).build()
    }

    /// A builder for a client with a private CA or its own user agent.
    pub fn builder(base: &str) -> ClientBuilder {
        ClientBuilder { base: base.to_owned(), user_agent: default_user_agent(), ca_pem: None }
    }

    /// A client sharing an existing connection pool (proxies …).
    pub fn with_http(http: reqwest::Client, base: &str) -> Result<Self> {
        let mut base = url::Url::parse(base)?;
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        // Another pool's roots are unknown here: the WebSocket trusts the system's.
        let ws = Arc::new(ws::Settings::new(default_user_agent(), None));
        Ok(Self { http, base, credentials: Credentials::None, signer: None, ws })
    }

    pub fn with_credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = credentials;
        self
    }

    pub fn with_bearer(self, token: impl Into<String>) -> Self {
        self.with_credentials(Credentials::Bearer(token.into()))
    }

    /// Signs every request to an agent route (`/api/v1/agents/self/…`) with
    /// `key` (protocol.md §3). Other routes, enrollment and refresh included, stay unsigned.
    pub fn with_signing_key(mut self, key: ed25519_dalek::SigningKey) -> Self {
        self.signer = Some(Arc::new(key));
        self
    }

    pub fn base_url(&self) -> &url::Url {
        &self.base
    }

    /// A request to `path` (relative to the base URL) with credentials attached.
    pub fn request(&self, method: Method, path: &str) -> Result<RequestBuilder> {
        let url = self.base.join(path.trim_start_matches('/'))?;
        let req = self.http.request(method, url).timeout(DEFAULT_TIMEOUT);
        Ok(match &self.credentials {
            Credentials::None => req,
            Credentials::Bearer(t) => req.bearer_auth(t),
            Credentials::Basic { username, password } => req.basic_auth(username, Some(password)),
        })
    }

    /// Sends a request built from [`Client::request`], signing it first when
    /// this client signs and the target is an agent route.
    pub async fn execute(&self, req: RequestBuilder) -> Result<reqwest::Response> {
        let mut req = req.build()?;
        if let Some(key) = &self.signer
            && self.is_agent_route(req.url())
        {
            signing::sign_request(key, &mut req);
        }
        Ok(self.http.execute(req).await?)
    }

    /// Whether `url` is under the agent routes, the ones that are signed.
    fn is_agent_route(&self, url: &url::Url) -> bool {
        let relative = url.path().strip_prefix(self.base.path()).unwrap_or_default();
        relative.starts_with(tether_proto::signing::AGENT_ROUTES_PREFIX.trim_start_matches('/'))
    }

    async fn send<T: DeserializeOwned>(&self, req: RequestBuilder) -> Result<T> {
        let res = self.execute(req).await?;
        let status = res.status();
        if status.is_success() {
            return Ok(res.json::<Data<T>>().await?.data);
        }
        Err(error_from(res).await)
    }

    async fn send_page<T: DeserializeOwned>(&self, req: RequestBuilder) -> Result<Page<T>> {
        let res = self.execute(req).await?;
        if res.status().is_success() {
            return Ok(res.json::<Page<T>>().await?);
        }
        Err(error_from(res).await)
    }

    async fn send_empty(&self, req: RequestBuilder) -> Result<()> {
        let res = self.execute(req).await?;
        if res.status().is_success() {
            return Ok(());
        }
        Err(error_from(res).await)
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(self.request(Method::GET, path)?).await
    }

    async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.send(self.request(Method::POST, path)?.json(body)).await
    }

    // ----- agent side -----

    pub async fn enroll(&self, req: &EnrollRequest) -> Result<TokenPair> {
        self.post("api/v1/agents/enroll", req).await
    }

    pub async fn refresh(&self, refresh_token: &str, agent_id: AgentId) -> Result<TokenPair> {
        let body = RefreshRequest { refresh_token: refresh_token.to_owned(), device_public_id: agent_id };
        self.post("api/v1/auth/token/refresh", &body).await
    }

    /// `POST /oauth/device_authorization`: asks for a user code for this key.
    pub async fn device_authorization(&self, public_key: &str, hostname: &str) -> Result<DeviceAuthorization> {
        let form = [("client_id", DEVICE_CLIENT_ID), ("public_key", public_key), ("hostname", hostname)];
        let res = self.request(Method::POST, "oauth/device_authorization")?.form(&form).send().await?;
        if res.status().is_success() {
            return Ok(res.json().await?);
        }
        Err(error_from(res).await)
    }

    /// One `POST /oauth/token` poll with the device code. OAuth error bodies
    /// are answers here, not failures; only transport trouble and answers
    /// that are not RFC 6749 bodies (e.g. 5xx pages, 429) are errors.
    pub async fn device_token(&self, device_code: &str) -> Result<DeviceToken> {
        let form = [("grant_type", DEVICE_GRANT_TYPE), ("device_code", device_code), ("client_id", DEVICE_CLIENT_ID)];
        let res = self.request(Method::POST, "oauth/token")?.form(&form).send().await?;
        let status = res.status();
        if status.is_success() {
            return Ok(DeviceToken::Issued(res.json().await?));
        }
        if !status.is_client_error() || status == StatusCode::TOO_MANY_REQUESTS {
            return Err(error_from(res).await);
        }
        let text = res.text().await.unwrap_or_default();
        let Ok(err) = serde_json::from_str::<OAuthError>(&text) else {
            return Err(ClientError::Unexpected { status: status.as_u16(), text });
        };
        Ok(match err.error.as_str() {
            "authorization_pending" => DeviceToken::Pending,
            "slow_down" => DeviceToken::SlowDown,
            "access_denied" => DeviceToken::Denied,
            "expired_token" => DeviceToken::Expired,
            _ => DeviceToken::Refused(err),
        })
    }

    /// One stream poll from `cursor` (None = from the start of the retained stream).
    pub async fn updates(&self, cursor: Option<&str>, limit: u32, wait_s: u32) -> Result<Poll> {
        let mut req = self
            .request(Method::GET, "api/v1/agents/self/updates")?
            .query(&[("limit", limit), ("wait", wait_s)])
            .timeout(Duration::from_secs(wait_s.into()) + POLL_SLACK);
        if let Some(c) = cursor {
            req = req.header(
                IF_NONE_MATCH,
                HeaderValue::from_str(&format!("\"{c}\"")).unwrap_or(HeaderValue::from_static("")),
            );
        }
        let res = self.execute(req).await?;
        match res.status() {
            StatusCode::OK => Ok(Poll::Signals(res.json::<Data<Updates>>().await?.data)),
            StatusCode::NO_CONTENT => Ok(Poll::Idle { cursor: etag_cursor(res.headers()).unwrap_or_default() }),
            _ => Err(error_from(res).await),
        }
    }

    /// The simple command API: the next command (now delivered) or None after `wait_s`.
    pub async fn next_command(&self, wait_s: u32) -> Result<Option<Command>> {
        let req = self
            .request(Method::GET, "api/v1/agents/self/commands/next")?
            .query(&[("wait", wait_s)])
            .timeout(Duration::from_secs(wait_s.into()) + POLL_SLACK);
        let res = self.execute(req).await?;
        match res.status() {
            StatusCode::OK => Ok(Some(res.json::<Data<Command>>().await?.data)),
            StatusCode::NO_CONTENT => Ok(None),
            _ => Err(error_from(res).await),
        }
    }

    pub async fn report_running(&self, id: CommandId) -> Result<serde_json::Value> {
        let body = StatusReport { state: tether_proto::command::CommandStatus::Running };
        self.post(&format!("api/v1/agents/self/commands/{id}/status"), &body).await
    }

    pub async fn report_result(&self, id: CommandId, report: &ResultReport) -> Result<serde_json::Value> {
        self.post(&format!("api/v1/agents/self/commands/{id}/result"), report).await
    }

    /// `GET /api/v1/agents/self/config`: the agent's effective configuration,
    /// or `None` when `have` (a hash) is still current (304).
    pub async fn own_config(&self, have: Option<&str>) -> Result<Option<EffectiveConfig>> {
        let mut req = self.request(Method::GET, "api/v1/agents/self/config")?;
        if let Some(hash) = have {
            req = req.header(
                IF_NONE_MATCH,
                HeaderValue::from_str(&format!("\"{hash}\"")).unwrap_or(HeaderValue::from_static("")),
            );
        }
        let res = self.execute(req).await?;
        match res.status() {
            StatusCode::NOT_MODIFIED => Ok(None),
            s if s.is_success() => Ok(Some(res.json::<Data<EffectiveConfig>>().await?.data)),
            _ => Err(error_from(res).await),
        }
    }

    pub async fn heartbeat(&self, beat: &tether_proto::agent::Heartbeat) -> Result<serde_json::Value> {
        self.post("api/v1/agents/self/heartbeat", beat).await
    }

    // ----- operator side -----

    pub async fn create_api_token(&self, req: &CreateApiToken) -> Result<CreatedApiToken> {
        self.post("api/v1/tokens", req).await
    }

    pub async fn list_api_tokens(&self) -> Result<Vec<ApiToken>> {
        Ok(self.send_page(self.request(Method::GET, "api/v1/tokens")?).await?.data)
    }

    pub async fn list_audit(&self, query: &AuditQuery) -> Result<Page<AuditRow>> {
        self.send_page(self.request(Method::GET, "api/v1/audit")?.query(query)).await
    }

    pub async fn verify_audit(&self) -> Result<AuditVerification> {
        self.get("api/v1/audit/verify").await
    }

    pub async fn agent_audit(&self, event: &AgentAuditEvent) -> Result<serde_json::Value> {
        self.post("api/v1/agents/self/audit", event).await
    }

    pub async fn list_users(&self) -> Result<Vec<User>> {
        Ok(self.send_page(self.request(Method::GET, "api/v1/users")?).await?.data)
    }

    pub async fn create_user(&self, req: &CreateUser) -> Result<User> {
        self.post("api/v1/users", req).await
    }

    pub async fn update_user(&self, id: &str, req: &UpdateUser) -> Result<User> {
        self.send(self.request(Method::PATCH, &format!("api/v1/users/{id}"))?.json(req)).await
    }

    pub async fn delete_user(&self, id: &str) -> Result<()> {
        self.send_empty(self.request(Method::DELETE, &format!("api/v1/users/{id}"))?).await
    }

    pub async fn revoke_api_token(&self, id: &str) -> Result<()> {
        self.send_empty(self.request(Method::DELETE, &format!("api/v1/tokens/{id}"))?).await
    }

    pub async fn create_enroll_token(&self, req: &CreateEnrollToken) -> Result<CreatedEnrollToken> {
        self.post("api/v1/enroll-tokens", req).await
    }

    pub async fn list_enroll_tokens(&self) -> Result<Vec<EnrollToken>> {
        Ok(self.send_page(self.request(Method::GET, "api/v1/enroll-tokens")?).await?.data)
    }

    pub async fn revoke_enroll_token(&self, id: &str) -> Result<()> {
        self.send_empty(self.request(Method::DELETE, &format!("api/v1/enroll-tokens/{id}"))?).await
    }

    pub async fn create_command(&self, req: &CreateCommand) -> Result<CreatedCommands> {
        self.post("api/v1/commands", req).await
    }

    pub async fn get_command(&self, id: CommandId) -> Result<Command> {
        self.get(&format!("api/v1/commands/{id}")).await
    }

    pub async fn list_commands(&self, query: &CommandQuery) -> Result<Page<Command>> {
        self.send_page(self.request(Method::GET, "api/v1/commands")?.query(query)).await
    }

    pub async fn cancel_command(&self, id: CommandId) -> Result<Command> {
        self.post(&format!("api/v1/commands/{id}/cancel"), &serde_json::json!({})).await
    }

    pub async fn get_batch(&self, id: BatchId) -> Result<Batch> {
        self.get(&format!("api/v1/batches/{id}")).await
    }

    pub async fn cancel_batch(&self, id: BatchId) -> Result<Batch> {
        self.post(&format!("api/v1/batches/{id}/cancel"), &serde_json::json!({})).await
    }

    /// Approves a pending device (RFC 8628) with these labels; returns what
    /// the server knows about the device that asked.
    pub async fn approve_device(&self, req: &DeviceDecision) -> Result<DeviceDetails> {
        self.post("api/v1/device/approve", req).await
    }

    /// Denies a pending device; its agent stops polling with `access_denied`.
    pub async fn deny_device(&self, user_code: &str) -> Result<DeviceDetails> {
        let req = DeviceDecision { user_code: user_code.to_owned(), labels: Default::default() };
        self.post("api/v1/device/deny", &req).await
    }

    pub async fn list_agents(&self, query: &AgentQuery) -> Result<Page<Agent>> {
        self.send_page(self.request(Method::GET, "api/v1/agents")?.query(query)).await
    }

    pub async fn get_agent(&self, id: AgentId) -> Result<Agent> {
        self.get(&format!("api/v1/agents/{id}")).await
    }

    /// `GET /api/v1/metrics` (admin): this server's process counters.
    pub async fn server_metrics(&self) -> Result<serde_json::Value> {
        self.get("api/v1/metrics").await
    }

    // ----- configuration (protocol.md §6) -----

    /// Writes the scope's next version; `if_match` is the version replaced
    /// (required once the scope exists).
    pub async fn put_config(&self, scope: &Scope, req: &PutConfig, if_match: Option<u64>) -> Result<ConfigWritten> {
        let mut put = self.request(Method::PUT, &scope_path(scope, ""))?.json(req);
        if let Some(v) = if_match {
            put = put.header(IF_MATCH, format!("\"{v}\""));
        }
        self.send(put).await
    }

    /// The scope's current version, or `version`.
    pub async fn get_config(&self, scope: &Scope, version: Option<u64>) -> Result<ConfigVersion> {
        let mut req = self.request(Method::GET, &scope_path(scope, ""))?;
        if let Some(v) = version {
            req = req.query(&[("version", v)]);
        }
        self.send(req).await
    }

    pub async fn config_history(&self, scope: &Scope, cursor: Option<&str>, limit: u32) -> Result<Page<ConfigVersion>> {
        let mut req = self.request(Method::GET, &scope_path(scope, "/history"))?.query(&[("limit", limit)]);
        if let Some(c) = cursor {
            req = req.query(&[("cursor", c)]);
        }
        self.send_page(req).await
    }

    pub async fn rollback_config(&self, scope: &Scope, version: u64) -> Result<ConfigWritten> {
        self.post(&scope_path(scope, "/rollback"), &Rollback { version }).await
    }

    pub async fn config_status(&self, scope: &Scope) -> Result<ConfigStatus> {
        self.get(&scope_path(scope, "/status")).await
    }

    pub async fn list_configs(&self) -> Result<Vec<ConfigScope>> {
        Ok(self.send_page(self.request(Method::GET, "api/v1/configs")?).await?.data)
    }

    /// An agent's effective configuration with the provenance of each value.
    pub async fn agent_config(&self, id: AgentId) -> Result<EffectiveConfig> {
        self.get(&format!("api/v1/agents/{id}/config")).await
    }

    /// `PATCH /api/v1/agents/{id}`: new labels and/or name.
    pub async fn update_agent(&self, id: AgentId, req: &UpdateAgent) -> Result<Agent> {
        self.send(self.request(Method::PATCH, &format!("api/v1/agents/{id}"))?.json(req)).await
    }

    pub async fn revoke_agent(&self, id: AgentId, reason: &str) -> Result<Agent> {
        self.post(&format!("api/v1/agents/{id}/revoke"), &RevokeRequest { reason: reason.to_owned() }).await
    }

    /// `DELETE /api/v1/agents/{id}` (204): the agent and what the server kept for it.
    pub async fn delete_agent(&self, id: AgentId) -> Result<()> {
        self.send_empty(self.request(Method::DELETE, &format!("api/v1/agents/{id}"))?).await
    }
}

fn default_user_agent() -> String {
    concat!("tether-client/", env!("CARGO_PKG_VERSION")).to_owned()
}

fn etag_cursor(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(ETAG)?.to_str().ok()?;
    Some(v.trim_matches('"').to_owned())
}

/// Turns a non-2xx response into [`ClientError`], keeping the envelope.
pub async fn error_from(res: reqwest::Response) -> ClientError {
    let status = res.status().as_u16();
    let retry_after = res.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let text = res.text().await.unwrap_or_default();
    match serde_json::from_str::<ErrorEnvelope>(&text) {
        Ok(env) => ClientError::Api { status, body: Box::new(env.error), retry_after },
        Err(_) => ClientError::Unexpected { status, text },
    }
}

/// `api/v1/configs/{scope}{rest}`, the scope percent-encoded as one path segment.
fn scope_path(scope: &Scope, rest: &str) -> String {
    let scope = scope.to_string();
    let segment = percent_encoding::utf8_percent_encode(&scope, percent_encoding::NON_ALPHANUMERIC);
    format!("api/v1/configs/{segment}{rest}")
}
