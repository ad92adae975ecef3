//! Test harness: a real server on port 0 with a fresh temp data dir, driven
//! over HTTP through `tether-client`.
#![allow(dead_code)]

use std::net::SocketAddr;

use base64::Engine;
use tether_client::Client;
use tether_proto::Labels;
use tether_proto::agent::{CreateEnrollToken, EnrollRequest, TokenPair};
use tether_server::state::AppState;
use tether_server::{Server, ServerConfig};
use tokio_util::sync::CancellationToken;

pub struct TestApp {
    pub addr: SocketAddr,
    pub base: String,
    /// Authenticated with the bootstrap admin API token.
    pub admin: Client,
    pub admin_token: String,
    pub state: AppState,
    pub dir: tempfile::TempDir,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

pub const ADMIN_PASSWORD: &str = "correct horse battery staple";

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// A server whose config `adjust` may change first.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut ServerConfig)) -> TestApp {
    spawn(adjust, None).await
}

/// Another server on the database of `first` (set by `adjust`): its admin is
/// the one `first` created.
pub async fn spawn_replica(first: &TestApp, adjust: impl FnOnce(&mut ServerConfig)) -> TestApp {
    spawn(adjust, Some(first.admin_token.clone())).await
}

async fn spawn(adjust: impl FnOnce(&mut ServerConfig), admin_token: Option<String>) -> TestApp {
    let dir = tempfile::tempdir().expect("temp data dir");
    let mut config = ServerConfig::new("127.0.0.1:0".parse().expect("addr"), dir.path().to_path_buf());
    adjust(&mut config);
    let (server, bootstrap) = Server::start(config, Some(ADMIN_PASSWORD.into())).await.expect("server starts");
    let addr = server.local_addr().expect("bound");
    let state = server.state().clone();
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        server.run(stop).await.expect("server runs");
    });
    let base = format!("http://{addr}");
    let admin_token = bootstrap.admin_token.or(admin_token).expect("first start creates an admin token");
    let admin = Client::new(&base).expect("client").with_bearer(admin_token.clone());
    TestApp { addr, base, admin, admin_token, state, dir, shutdown, task }
}

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

pub fn public_key() -> String {
    let key = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes())
}

impl TestApp {
    pub fn anon(&self) -> Client {
        Client::new(&self.base).expect("client")
    }

    pub async fn enroll_token(&self, labels: Labels, uses: u32) -> String {
        let req = CreateEnrollToken { labels, uses, expires_in_s: 3600 };
        self.admin.create_enroll_token(&req).await.expect("enroll token").token
    }

    /// Enrolls a new agent; returns a client authenticated as it and its tokens.
    pub async fn agent(&self, label_pairs: &[(&str, &str)]) -> (Client, TokenPair) {
        let token = self.enroll_token(labels(label_pairs), 1).await;
        let req = EnrollRequest {
            enroll_token: token,
            public_key: public_key(),
            hostname: "test-host".into(),
            labels: Labels::new(),
            facts: serde_json::json!({"os": "linux"}),
        };
        let pair = self.anon().enroll(&req).await.expect("enroll");
        (self.anon().with_bearer(pair.access_token.clone()), pair)
    }

    /// Enrolls a new agent on host `hostname`, with no labels or facts.
    pub async fn agent_on(&self, hostname: &str) -> TokenPair {
        let req = EnrollRequest {
            enroll_token: self.enroll_token(Labels::new(), 1).await,
            public_key: public_key(),
            hostname: hostname.into(),
            labels: Labels::new(),
            facts: serde_json::json!({}),
        };
        self.anon().enroll(&req).await.expect("enroll")
    }

    pub fn http(&self) -> reqwest::Client {
        reqwest::Client::new()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// Waits (bounded: 10 s) until `n` polls are parked on the server; panics
/// otherwise, so a test that needs a parked poll cannot pass without one.
pub async fn until_parked(state: &tether_server::state::AppState, n: usize) {
    for _ in 0..2000 {
        if state.streams.parked() >= n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("{n} poll(s) never parked (parked: {})", state.streams.parked());
}

/// The status and the error envelope's `key` of a refused request.
pub async fn error_key(res: reqwest::Response) -> (u16, String) {
    let status = res.status().as_u16();
    let body: serde_json::Value = res.json().await.expect("error envelope");
    (status, body["error"]["key"].as_str().expect("key").to_owned())
}
