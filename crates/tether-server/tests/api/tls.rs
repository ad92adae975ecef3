//! The TLS listener: HTTPS with a private CA, HTTP/2 via ALPN, refused
//! untrusted and plain-HTTP clients, Secure cookies and graceful shutdown.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use reqwest::{Method, Version};
use serde_json::json;
use tether_client::{Client, ClientError, Poll};
use tether_proto::agent::{CreateEnrollToken, EnrollRequest};
use tether_proto::command::{CreateCommand, Target};
use tether_server::tls::TlsFiles;
use tether_server::{Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::common::{ADMIN_PASSWORD, public_key};

/// A private CA and a server certificate it signed for `localhost` and
/// `127.0.0.1`, written as PEM files into `dir`. Returns the CA's PEM.
pub fn private_ca(dir: &Path) -> (TlsFiles, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "tether test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key")).expect("CA certificate");
    let key = KeyPair::generate().expect("server key");
    let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("params");
    let cert = params.signed_by(&key, &ca).expect("server certificate");
    let files = TlsFiles { cert: dir.join("server.crt"), key: dir.join("server.key") };
    std::fs::write(&files.cert, cert.pem()).expect("write certificate");
    std::fs::write(&files.key, key.serialize_pem()).expect("write key");
    (files, ca.pem())
}

struct TlsApp {
    addr: SocketAddr,
    /// `https://localhost:<port>`: the name the certificate is for.
    base: String,
    ca_pem: String,
    admin_token: String,
    _dir: tempfile::TempDir,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    state: tether_server::state::AppState,
}

impl TlsApp {
    async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    async fn spawn_with(adjust: impl FnOnce(&mut ServerConfig)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let (files, ca_pem) = private_ca(dir.path());
        let mut config = ServerConfig::new("127.0.0.1:0".parse().expect("addr"), dir.path().join("data"));
        config.tls = Some(files);
        adjust(&mut config);
        let (server, bootstrap) = Server::start(config, Some(ADMIN_PASSWORD.into())).await.expect("server starts");
        let addr = server.local_addr().expect("bound");
        assert_eq!(server.url().expect("url"), format!("https://{addr}"));
        let state = server.state().clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        Self {
            addr,
            base: format!("https://localhost:{}", addr.port()),
            ca_pem,
            admin_token: bootstrap.admin_token.expect("admin token"),
            _dir: dir,
            shutdown,
            task,
            state,
        }
    }

    /// A tether client that trusts the private CA.
    fn client(&self) -> Client {
        Client::builder(&self.base).ca_pem(self.ca_pem.clone()).build().expect("client")
    }

    fn admin(&self) -> Client {
        self.client().with_bearer(self.admin_token.clone())
    }

    /// A raw reqwest client that trusts the private CA.
    fn http(&self) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).expect("CA");
        reqwest::Client::builder().tls_certs_only([ca]).build().expect("http client")
    }

    async fn enrolled_agent(&self) -> (Client, tether_proto::AgentId) {
        let token = self
            .admin()
            .create_enroll_token(&CreateEnrollToken { labels: Default::default(), uses: 1, expires_in_s: 600 })
            .await
            .expect("enroll token")
            .token;
        let req = EnrollRequest {
            enroll_token: token,
            public_key: public_key(),
            hostname: "tls-host".into(),
            labels: Default::default(),
            facts: json!({}),
        };
        let pair = self.client().enroll(&req).await.expect("enroll over https");
        (self.client().with_bearer(pair.access_token), pair.agent_id)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let stopped = tokio::time::timeout(Duration::from_secs(15), self.task).await;
        stopped.expect("server stops in time").expect("join").expect("server runs cleanly");
    }
}

/// Every message in an error's source chain, joined.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[tokio::test]
async fn an_agent_trusting_the_ca_enrolls_and_long_polls_over_http2() {
    let app = TlsApp::spawn().await;
    let (agent, agent_id) = app.enrolled_agent().await;

    let res = agent.request(Method::GET, "api/v1/agents/self/updates?wait=0").expect("request").send().await;
    let res = res.expect("poll over https");
    assert_eq!(res.version(), Version::HTTP_2, "ALPN must negotiate h2");
    assert_eq!(res.status(), 204);

    let Poll::Idle { cursor } = agent.updates(None, 20, 0).await.expect("first poll") else {
        panic!("a new agent's stream is empty")
    };
    // A long-poll parked on an HTTP/2 stream wakes when a command arrives.
    let waiting = {
        let agent = agent.clone();
        tokio::spawn(async move { agent.updates(Some(&cursor), 20, 30).await })
    };
    crate::common::until_parked(&app.state, 1).await;
    let created = app.admin().create_command(&CreateCommand::new(Target::agents([agent_id]), "ping")).await;
    let command_id = created.expect("create command").command_ids[0];
    let woken = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("poll wakes").expect("join");
    let Poll::Signals(updates) = woken.expect("poll") else { panic!("the parked poll must return the command") };
    assert_eq!(updates.signals.len(), 1);
    assert_eq!(updates.signals[0].reference["command_id"], json!(command_id));

    // Clients that only speak HTTP/1.1 negotiate it through ALPN instead.
    let ca = reqwest::Certificate::from_pem(app.ca_pem.as_bytes()).expect("CA");
    let http1 = reqwest::Client::builder().tls_certs_only([ca]).http1_only().build().expect("http/1.1 client");
    let res = http1.get(format!("{}/api/v1/agents", app.base)).bearer_auth(&app.admin_token).send().await;
    let res = res.expect("http/1.1 over tls");
    assert_eq!((res.version(), res.status().as_u16()), (Version::HTTP_11, 200));
    app.stop().await;
}

#[tokio::test]
async fn a_client_without_the_ca_is_refused_with_a_certificate_error() {
    let app = TlsApp::spawn().await;
    let untrusting = Client::new(&app.base).expect("client");
    let err = untrusting.list_agents(&Default::default()).await.expect_err("unknown CA must be refused");
    let ClientError::Http(e) = &err else { panic!("expected a transport error, got {err:?}") };
    let text = chain(e);
    assert!(text.contains("certificate"), "not a certificate error: {text}");

    // Trusting some other CA is no better than trusting none.
    let (_, other_ca) = private_ca(tempfile::tempdir().expect("dir").path());
    let stranger = Client::builder(&app.base).ca_pem(other_ca).build().expect("client");
    let err = stranger.list_agents(&Default::default()).await.expect_err("another CA must be refused");
    assert!(matches!(err, ClientError::Http(_)), "{err:?}");

    // The failed handshakes cost the server nothing.
    app.admin().list_agents(&Default::default()).await.expect("trusted client still served");
    app.stop().await;
}

#[tokio::test]
async fn plain_http_to_the_tls_port_fails_and_the_server_keeps_serving() {
    let app = TlsApp::spawn().await;
    let plain = reqwest::Client::new();
    let res = plain.get(format!("http://{}/api/v1/agents", app.addr)).send().await;
    assert!(res.is_err(), "plain HTTP must not get an answer: {res:?}");

    // Garbage and a handshake abandoned halfway must not take the server down either.
    let mut raw = tokio::net::TcpStream::connect(app.addr).await.expect("connect");
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the server closes a connection whose handshake failed");
    assert!(!String::from_utf8_lossy(&buf).contains("HTTP/1.1"), "no HTTP answer in clear");
    let half = tokio::net::TcpStream::connect(app.addr).await.expect("connect");

    let admin = app.admin();
    for _ in 0..3 {
        admin.list_agents(&Default::default()).await.expect("server still answers over https");
    }
    // Shutdown does not wait out the 10 s handshake timeout of a silent client.
    let started = std::time::Instant::now();
    app.stop().await;
    assert!(started.elapsed() < Duration::from_secs(5), "stopped in {:?}", started.elapsed());
    drop(half);
}

#[tokio::test]
async fn login_cookie_is_secure_and_urls_are_https_over_tls() {
    let app = TlsApp::spawn().await;
    let http = app.http();
    let res = http
        .post(format!("{}/api/v1/auth/login", app.base))
        .json(&json!({"username": "admin", "password": ADMIN_PASSWORD}))
        .send()
        .await
        .expect("login");
    assert_eq!((res.status().as_u16(), res.version()), (200, Version::HTTP_2));
    let cookie = res.headers()["set-cookie"].to_str().expect("cookie").to_owned();
    assert!(cookie.split(';').any(|attr| attr.trim() == "Secure"), "{cookie}");
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");

    // HTTP/2 has no Host header; the verification URL still names this server.
    let res = http
        .post(format!("{}/oauth/device_authorization", app.base))
        .form(&[("client_id", "tether-agent"), ("public_key", &public_key()), ("hostname", "h")])
        .send()
        .await
        .expect("device authorization");
    assert_eq!(res.version(), Version::HTTP_2);
    let body: serde_json::Value = res.json().await.expect("json");
    assert_eq!(body["verification_uri"], format!("{}/device", app.base), "{body}");
    app.stop().await;
}

#[tokio::test]
async fn shutdown_ends_a_long_poll_parked_on_http2_with_204() {
    let app = TlsApp::spawn().await;
    let (agent, _) = app.enrolled_agent().await;
    let Poll::Idle { cursor } = agent.updates(None, 20, 0).await.expect("first poll") else {
        panic!("a new agent's stream is empty")
    };
    let waiting = {
        let cursor = cursor.clone();
        tokio::spawn(async move { agent.updates(Some(&cursor), 20, 30).await })
    };
    crate::common::until_parked(&app.state, 1).await;
    let started = std::time::Instant::now();
    app.stop().await;
    let poll = waiting.await.expect("join").expect("the parked poll gets an answer");
    assert_eq!(poll, Poll::Idle { cursor });
    assert!(started.elapsed() < Duration::from_secs(5), "drained in {:?}", started.elapsed());
}

#[tokio::test]
async fn a_bad_certificate_file_stops_startup_and_is_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (files, _) = private_ca(dir.path());
    std::fs::write(&files.cert, "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n")
        .expect("write");
    let data = dir.path().join("data");
    let mut config = ServerConfig::new("127.0.0.1:0".parse().expect("addr"), data.clone());
    config.tls = Some(files.clone());
    let err = Server::start(config, None).await.expect_err("invalid certificate");
    assert!(err.to_string().contains(&files.cert.display().to_string()), "{err:#}");
    assert!(!data.exists(), "nothing is created before the certificate loads");
}

/// Connects and completes the TLS handshake offering `alpn`, then sends nothing.
async fn silent_tls_client(app: &TlsApp, alpn: &[u8]) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(app.ca_pem.as_bytes()) {
        roots.add(cert.expect("CA pem")).expect("CA");
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(app.addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let stream = connector.connect(name, tcp).await.expect("handshake");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(alpn), "the server chose the offered protocol");
    stream
}

#[tokio::test]
async fn a_client_silent_after_the_handshake_is_closed_whatever_alpn_chose() {
    let app = TlsApp::spawn_with(|c| c.connections.header = Duration::from_secs(1)).await;
    for alpn in [&b"h2"[..], b"http/1.1"] {
        let mut stream = silent_tls_client(&app, alpn).await;
        let mut sink = Vec::new();
        // Before the fix the server sniffed for the first bytes forever.
        let closed = tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut sink)).await;
        assert!(closed.is_ok(), "{} connection still open after 15 s", String::from_utf8_lossy(alpn));
    }
    // The server still serves after closing them.
    let res = app.http().get(format!("{}/healthz", app.base)).send().await.expect("healthz");
    assert!(res.status().is_success());
    app.stop().await;
}
