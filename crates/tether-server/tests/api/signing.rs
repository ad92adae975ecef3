//! Signed agent requests (protocol.md §3): Ed25519 over method, target, timestamp,
//! nonce and body digest; ±300 s window; nonces single-use; optional policy
//! `require_signed_requests`.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::SigningKey;
use tether_client::signing::{SignatureHeaders, new_nonce, sign};
use tether_client::{Client, Poll};
use tether_proto::ErrorKey;
use tether_proto::agent::{EnrollRequest, TokenPair};
use tether_proto::command::{CommandStatus, CreateCommand, ResultReport, Target};
use tether_proto::signing::{NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER};

use crate::common::{TestApp, labels, spawn_app, spawn_app_with};

const HEARTBEAT: &str = "/api/v1/agents/self/heartbeat";
const POLL: &str = "/api/v1/agents/self/updates?limit=20&wait=0";
const BEAT_BODY: &[u8] = br#"{"uptime_s":1,"version":"t","running_commands":0,"queue_depth":0}"#;

/// An enrolled agent whose private key the test holds.
struct Signer {
    key: SigningKey,
    pair: TokenPair,
}

async fn enroll(app: &TestApp) -> Signer {
    let key = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let req = EnrollRequest {
        enroll_token: app.enroll_token(labels(&[]), 1).await,
        public_key: URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes()),
        hostname: "signer".into(),
        labels: Default::default(),
        facts: serde_json::json!({}),
    };
    let pair = app.anon().enroll(&req).await.expect("enroll");
    Signer { key, pair }
}

fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs()
}

/// Waits until early in a second, so a timestamp computed now is still in
/// the same second when the server reads its clock.
async fn early_in_a_second() -> u64 {
    loop {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock");
        if now.subsec_millis() < 400 {
            return now.as_secs();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `method target` as `signer`'s token with exactly these signature headers and body.
async fn send_raw(
    app: &TestApp,
    signer: &Signer,
    method: reqwest::Method,
    target: &str,
    body: &[u8],
    headers: &SignatureHeaders,
) -> reqwest::Response {
    let mut req = app
        .http()
        .request(method, app.url(target))
        .bearer_auth(&signer.pair.access_token)
        .header(TIMESTAMP_HEADER, &headers.timestamp)
        .header(NONCE_HEADER, &headers.nonce)
        .header(SIGNATURE_HEADER, &headers.signature);
    if !body.is_empty() {
        req = req.header("content-type", "application/json").body(body.to_vec());
    }
    req.send().await.expect("send")
}

/// Signs `method target body` now with `key` and sends it.
async fn send_signed(
    app: &TestApp,
    signer: &Signer,
    key: &SigningKey,
    method: reqwest::Method,
    target: &str,
    body: &[u8],
) -> reqwest::Response {
    let headers = sign(key, method.as_str(), target, body, now_s(), &new_nonce());
    send_raw(app, signer, method, target, body, &headers).await
}

async fn assert_unauthenticated(res: reqwest::Response, why: &str) {
    assert_eq!(res.status(), 401, "{why}");
    let body: serde_json::Value = res.json().await.expect("envelope");
    assert_eq!(body["error"]["key"], "UNAUTHENTICATED", "{why}: {body}");
}

#[tokio::test]
async fn signed_poll_status_and_result_are_accepted_where_signatures_are_required() {
    let app = spawn_app_with(|c| c.require_signed_requests = true).await;
    let signer = enroll(&app).await;
    let agent = app.anon().with_bearer(signer.pair.access_token.clone()).with_signing_key(signer.key.clone());
    let cursor = match agent.updates(None, 20, 0).await.expect("signed first poll") {
        Poll::Idle { cursor } => cursor,
        Poll::Signals(u) => u.cursor,
    };
    let created = app
        .admin
        .create_command(&CreateCommand::new(Target::agents([signer.pair.agent_id]), "ping"))
        .await
        .expect("create");
    let id = created.command_ids[0];
    let Poll::Signals(updates) = agent.updates(Some(&cursor), 20, 5).await.expect("signed poll") else {
        panic!("the command must arrive");
    };
    assert_eq!(updates.signals.len(), 1);
    agent.report_running(id).await.expect("signed status");
    let mut result = ResultReport::new(CommandStatus::Succeeded);
    result.exit_code = Some(0);
    result.stdout = "pong\n".into();
    agent.report_result(id, &result).await.expect("signed result");
    let done = app.admin.get_command(id).await.expect("get");
    assert_eq!((done.status, done.stdout.as_str()), (CommandStatus::Succeeded, "pong\n"));
    agent.heartbeat(&serde_json::from_slice(BEAT_BODY).expect("heartbeat")).await.expect("signed heartbeat");
    app.stop().await;
}

#[tokio::test]
async fn the_same_signed_request_sent_twice_is_refused_the_second_time() {
    let app = spawn_app().await;
    let signer = enroll(&app).await;
    let poll = sign(&signer.key, "GET", POLL, b"", now_s(), &new_nonce());
    let first = send_raw(&app, &signer, reqwest::Method::GET, POLL, b"", &poll).await;
    assert!(first.status().is_success(), "{}", first.status());
    assert_unauthenticated(send_raw(&app, &signer, reqwest::Method::GET, POLL, b"", &poll).await, "replayed poll")
        .await;

    let beat = sign(&signer.key, "POST", HEARTBEAT, BEAT_BODY, now_s(), &new_nonce());
    let first = send_raw(&app, &signer, reqwest::Method::POST, HEARTBEAT, BEAT_BODY, &beat).await;
    assert!(first.status().is_success(), "{}", first.status());
    let again = send_raw(&app, &signer, reqwest::Method::POST, HEARTBEAT, BEAT_BODY, &beat).await;
    assert_unauthenticated(again, "replayed heartbeat").await;
    app.stop().await;
}

#[tokio::test]
async fn timestamps_301_s_away_either_way_are_refused_and_299_s_is_not() {
    let app = spawn_app().await;
    let signer = enroll(&app).await;
    for (offset, accepted) in [(-301_i64, false), (301, false), (-299, true), (299, true)] {
        let now = early_in_a_second().await;
        let ts = now.checked_add_signed(offset).expect("timestamp");
        let headers = sign(&signer.key, "POST", HEARTBEAT, BEAT_BODY, ts, &new_nonce());
        let res = send_raw(&app, &signer, reqwest::Method::POST, HEARTBEAT, BEAT_BODY, &headers).await;
        if accepted {
            assert!(res.status().is_success(), "offset {offset}: {}", res.status());
        } else {
            assert_unauthenticated(res, &format!("offset {offset}")).await;
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn a_tampered_body_path_or_query_is_refused() {
    let app = spawn_app().await;
    let signer = enroll(&app).await;
    let ts = now_s();

    let headers = sign(&signer.key, "POST", HEARTBEAT, BEAT_BODY, ts, &new_nonce());
    let tampered = String::from_utf8_lossy(BEAT_BODY).replace("\"uptime_s\":1", "\"uptime_s\":2");
    let res = send_raw(&app, &signer, reqwest::Method::POST, HEARTBEAT, tampered.as_bytes(), &headers).await;
    assert_unauthenticated(res, "body").await;

    let headers = sign(&signer.key, "POST", HEARTBEAT, BEAT_BODY, ts, &new_nonce());
    let audit = "/api/v1/agents/self/audit";
    assert_unauthenticated(send_raw(&app, &signer, reqwest::Method::POST, audit, BEAT_BODY, &headers).await, "path")
        .await;

    let headers = sign(&signer.key, "GET", POLL, b"", ts, &new_nonce());
    let other_query = "/api/v1/agents/self/updates?limit=21&wait=0";
    let res = send_raw(&app, &signer, reqwest::Method::GET, other_query, b"", &headers).await;
    assert_unauthenticated(res, "query").await;

    let headers = sign(&signer.key, "GET", POLL, b"", ts, &new_nonce());
    let no_query = "/api/v1/agents/self/updates";
    assert_unauthenticated(send_raw(&app, &signer, reqwest::Method::GET, no_query, b"", &headers).await, "no query")
        .await;

    // Headers that do not parse, or only some of them, are refused too.
    let mut headers = sign(&signer.key, "GET", POLL, b"", ts, &new_nonce());
    headers.signature.pop();
    assert_unauthenticated(send_raw(&app, &signer, reqwest::Method::GET, POLL, b"", &headers).await, "short sig").await;
    let res = app
        .http()
        .get(app.url(POLL))
        .bearer_auth(&signer.pair.access_token)
        .header(NONCE_HEADER, new_nonce())
        .send()
        .await
        .expect("send");
    assert_unauthenticated(res, "nonce without signature").await;

    // The untouched request still passes: the refusals above were the tampering.
    let res = send_signed(&app, &signer, &signer.key, reqwest::Method::POST, HEARTBEAT, BEAT_BODY).await;
    assert!(res.status().is_success(), "{}", res.status());
    app.stop().await;
}

#[tokio::test]
async fn a_signature_by_another_agents_key_is_refused() {
    let app = spawn_app().await;
    let (a, b) = (enroll(&app).await, enroll(&app).await);
    let res = send_signed(&app, &a, &b.key, reqwest::Method::GET, POLL, b"").await;
    assert_unauthenticated(res, "b's key on a's token").await;
    let res = send_signed(&app, &a, &b.key, reqwest::Method::POST, HEARTBEAT, BEAT_BODY).await;
    assert_unauthenticated(res, "b's key on a's heartbeat").await;
    let res = send_signed(&app, &a, &a.key, reqwest::Method::GET, POLL, b"").await;
    assert!(res.status().is_success(), "a's own key: {}", res.status());
    app.stop().await;
}

#[tokio::test]
async fn required_signatures_refuse_unsigned_agent_requests_but_not_operators_or_enrollment() {
    let app = spawn_app_with(|c| c.require_signed_requests = true).await;
    // Enrollment is public and unsigned.
    let signer = enroll(&app).await;
    let unsigned = app.anon().with_bearer(signer.pair.access_token.clone());
    let err = unsigned.updates(None, 20, 0).await.expect_err("unsigned poll");
    assert_eq!((err.status(), err.key()), (Some(401), Some(ErrorKey::Unauthenticated)), "{err}");
    let beat = serde_json::from_slice(BEAT_BODY).expect("heartbeat");
    let err = unsigned.heartbeat(&beat).await.expect_err("unsigned heartbeat");
    assert_eq!(err.key(), Some(ErrorKey::Unauthenticated), "{err}");
    // Token refresh is unsigned too.
    let refreshed = app.anon().refresh(&signer.pair.refresh_token, signer.pair.agent_id).await.expect("refresh");
    // Operators are unaffected.
    app.admin.get_agent(signer.pair.agent_id).await.expect("operator route");
    let signed = app.anon().with_bearer(refreshed.access_token).with_signing_key(signer.key.clone());
    signed.heartbeat(&beat).await.expect("signed heartbeat with the refreshed token");
    app.stop().await;
}

#[tokio::test]
async fn unsigned_agent_requests_pass_unless_required() {
    let app = spawn_app().await;
    let signer = enroll(&app).await;
    let unsigned = app.anon().with_bearer(signer.pair.access_token.clone());
    unsigned.updates(None, 20, 0).await.expect("unsigned poll is fine by default");
    app.stop().await;
}

#[tokio::test]
async fn a_signed_gzip_body_is_signed_as_sent_and_oversized_bodies_get_413() {
    use std::io::Write;
    let app = spawn_app().await;
    let signer = enroll(&app).await;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(BEAT_BODY).expect("gzip");
    let compressed = gz.finish().expect("gzip");
    let headers = sign(&signer.key, "POST", HEARTBEAT, &compressed, now_s(), &new_nonce());
    let res = app
        .http()
        .post(app.url(HEARTBEAT))
        .bearer_auth(&signer.pair.access_token)
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .header(TIMESTAMP_HEADER, &headers.timestamp)
        .header(NONCE_HEADER, &headers.nonce)
        .header(SIGNATURE_HEADER, &headers.signature)
        .body(compressed)
        .send()
        .await
        .expect("send");
    assert!(res.status().is_success(), "{}", res.status());

    let big = vec![b' '; tether_server::error::DEFAULT_BODY_LIMIT + 1];
    let res = send_signed(&app, &signer, &signer.key, reqwest::Method::POST, HEARTBEAT, &big).await;
    assert_eq!(res.status(), 413);
    app.stop().await;
}

#[tokio::test]
async fn idle_signed_polls_never_touch_the_store() {
    let app = spawn_app_with(|c| {
        c.require_signed_requests = true;
        c.sweep_interval = Duration::from_secs(3600);
        c.seen_flush_interval = Duration::from_secs(3600);
        c.limits.poll_burst = 1000;
    })
    .await;
    let signer = enroll(&app).await;
    let agent: Client = app.anon().with_bearer(signer.pair.access_token.clone()).with_signing_key(signer.key.clone());
    let cursor = match agent.updates(None, 20, 0).await.expect("warm-up poll") {
        Poll::Idle { cursor } => cursor,
        Poll::Signals(u) => u.cursor,
    };
    let before = app.state.store_calls.get();
    for _ in 0..100 {
        let poll = agent.updates(Some(&cursor), 20, 0).await.expect("signed poll");
        assert!(matches!(poll, Poll::Idle { .. }));
    }
    agent.updates(Some(&cursor), 20, 1).await.expect("signed long poll");
    assert_eq!(app.state.store_calls.get(), before, "idle signed polls must not query the store");
    assert!(app.state.nonces.len() >= 101, "every poll was signed and its nonce remembered");
    app.stop().await;
}

#[tokio::test]
async fn a_signed_body_from_a_caller_without_a_valid_token_is_refused_unread() {
    let app = spawn_app().await;
    let mut signer = enroll(&app).await;
    signer.pair.access_token = "not-a-jwt".into();
    // Had the body been buffered, its size would answer 413 first.
    let big = vec![b' '; tether_server::error::DEFAULT_BODY_LIMIT + 1];
    let res = send_signed(&app, &signer, &signer.key, reqwest::Method::POST, HEARTBEAT, &big).await;
    assert_unauthenticated(res, "refused from the headers").await;
    app.stop().await;
}

#[tokio::test]
async fn a_badly_signed_request_does_not_make_the_agent_look_online() {
    let app = spawn_app_with(|c| c.seen_flush_interval = Duration::from_millis(50)).await;
    let signer = enroll(&app).await;
    let before = app.admin.get_agent(signer.pair.agent_id).await.expect("agent").last_seen;
    let stranger = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    for _ in 0..3 {
        let res = send_signed(&app, &signer, &stranger, reqwest::Method::GET, POLL, b"").await;
        assert_unauthenticated(res, "signed with another key").await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = app.admin.get_agent(signer.pair.agent_id).await.expect("agent").last_seen;
    assert_eq!(after, before, "a token without its key is not a sign of life");
    // A correctly signed poll is.
    let res = send_signed(&app, &signer, &signer.key, reqwest::Method::GET, POLL, b"").await;
    assert_eq!(res.status(), 204);
    let mut seen = false;
    for _ in 0..50 {
        if app.admin.get_agent(signer.pair.agent_id).await.expect("agent").last_seen != before {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen, "a verified poll updates last_seen");
    app.stop().await;
}

#[tokio::test]
async fn an_agent_that_uses_up_its_nonce_quota_gets_429_while_other_agents_go_on() {
    let app = spawn_app_with(|c| {
        c.limits.nonces_per_agent = Some(3);
        // Polls answered at once would hit the poll bucket first otherwise.
        c.limits.poll_burst = 1000;
    })
    .await;
    let (greedy, other) = (enroll(&app).await, enroll(&app).await);
    for i in 0..3 {
        let res = send_signed(&app, &greedy, &greedy.key, reqwest::Method::GET, POLL, b"").await;
        assert!(res.status().is_success(), "signed poll {i} is within the quota: {}", res.status());
    }
    let res = send_signed(&app, &greedy, &greedy.key, reqwest::Method::GET, POLL, b"").await;
    assert_eq!(res.status(), 429, "the fourth remembered nonce is over the quota");
    assert!(res.headers().contains_key("retry-after"));
    let body: serde_json::Value = res.json().await.expect("envelope");
    assert_eq!(body["error"]["key"], "RATE_LIMITED", "{body}");
    assert_eq!(app.state.nonces.len(), 3, "the refused nonce was not remembered");
    for i in 0..3 {
        let res = send_signed(&app, &other, &other.key, reqwest::Method::GET, POLL, b"").await;
        assert!(res.status().is_success(), "another agent's signed poll {i} is unaffected: {}", res.status());
    }
    app.stop().await;
}
