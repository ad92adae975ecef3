//! Authentication: access tokens, refresh rotation, operator credentials (protocol.md §3).

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tether_client::{Client, Credentials};
use tether_proto::agent::EnrollRequest;
use tether_proto::{ErrorKey, Labels};

use crate::common::{ADMIN_PASSWORD, TestApp, public_key, spawn_app};

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn server_key(app: &TestApp) -> Vec<u8> {
    std::fs::read(app.dir.path().join("keys/jwt.key")).expect("server key")
}

fn forge(app: &TestApp, alg: Algorithm, claims: serde_json::Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), &claims, &EncodingKey::from_secret(&server_key(app))).expect("encode")
}

fn claims(sub: &str, aud: &str, exp: u64) -> serde_json::Value {
    json!({"iss": "tether", "aud": aud, "sub": sub, "device_id": sub, "typ": "agent", "exp": exp, "iat": now() - 10, "jti": "x"})
}

async fn poll_status(app: &TestApp, token: &str) -> (u16, Option<ErrorKey>) {
    match app.anon().with_bearer(token).updates(None, 20, 0).await {
        Ok(tether_client::Poll::Idle { .. }) => (204, None),
        Ok(tether_client::Poll::Signals(_)) => (200, None),
        Err(e) => (e.status().unwrap_or(0), e.key()),
    }
}

#[tokio::test]
async fn access_tokens_are_checked_for_signature_expiry_audience_and_algorithm() {
    let app = spawn_app().await;
    let (_, pair) = app.agent(&[]).await;
    let id = pair.agent_id.to_string();
    assert_eq!(poll_status(&app, &pair.access_token).await.0, 204);

    let unauthenticated = (401, Some(ErrorKey::Unauthenticated));
    assert_eq!(poll_status(&app, "garbage").await, unauthenticated);
    let expired = forge(&app, Algorithm::HS256, claims(&id, "tether-agent", now() - 3600));
    assert_eq!(poll_status(&app, &expired).await, (401, Some(ErrorKey::TokenExpired)));
    let wrong_aud = forge(&app, Algorithm::HS256, claims(&id, "someone-else", now() + 600));
    assert_eq!(poll_status(&app, &wrong_aud).await, unauthenticated);
    let wrong_alg = forge(&app, Algorithm::HS512, claims(&id, "tether-agent", now() + 600));
    assert_eq!(poll_status(&app, &wrong_alg).await, unauthenticated);
    // alg=none: header says none, no signature.
    use base64::Engine;
    let b64 = |v: &serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let none =
        format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), b64(&claims(&id, "tether-agent", now() + 600)));
    assert_eq!(poll_status(&app, &none).await, unauthenticated);
    // Signed by another server.
    let foreign = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(&id, "tether-agent", now() + 600),
        &EncodingKey::from_secret(&[9; 32]),
    )
    .expect("encode");
    assert_eq!(poll_status(&app, &foreign).await, unauthenticated);
    // A valid token for an agent that does not exist.
    let ghost =
        forge(&app, Algorithm::HS256, claims(&tether_proto::AgentId::new().to_string(), "tether-agent", now() + 600));
    assert_eq!(poll_status(&app, &ghost).await, unauthenticated);
    app.stop().await;
}

#[tokio::test]
async fn refresh_rotates_and_reuse_revokes_the_whole_family() {
    let app = spawn_app().await;
    let (_, pair) = app.agent(&[]).await;
    let anon = app.anon();
    let second = anon.refresh(&pair.refresh_token, pair.agent_id).await.expect("rotate");
    assert_ne!(second.refresh_token, pair.refresh_token);
    assert_eq!(poll_status(&app, &second.access_token).await.0, 204);
    // Use the successor, then replay the first token: theft, the family dies.
    let third = anon.refresh(&second.refresh_token, pair.agent_id).await.expect("rotate again");
    let err = anon.refresh(&pair.refresh_token, pair.agent_id).await.expect_err("reuse");
    assert_eq!(err.key(), Some(ErrorKey::Unauthenticated));
    let err = anon.refresh(&third.refresh_token, pair.agent_id).await.expect_err("family revoked");
    assert_eq!(err.key(), Some(ErrorKey::Unauthenticated));
    // The reuse is in the audit log.
    let rows = app.state.store.list_audit(0, 100).await.expect("audit");
    assert!(rows.iter().any(|r| r.action == "token.refresh_reuse"));
    app.stop().await;
}

#[tokio::test]
async fn a_lost_refresh_response_can_be_retried_once_within_the_grace() {
    let app = spawn_app().await;
    let (_, pair) = app.agent(&[]).await;
    let anon = app.anon();
    anon.refresh(&pair.refresh_token, pair.agent_id).await.expect("rotate (response lost)");
    let retry = anon.refresh(&pair.refresh_token, pair.agent_id).await.expect("retry within grace");
    anon.refresh(&retry.refresh_token, pair.agent_id).await.expect("the retry's pair works");
    app.stop().await;
}

/// Issue 10: a thief's grace retry kills the real agent's successor; when
/// the agent presents it, the whole family and its access tokens die.
#[tokio::test]
async fn a_revoked_successor_presented_is_reuse_and_revokes_the_access_tokens() {
    let app = spawn_app().await;
    let (_, pair) = app.agent(&[]).await;
    let anon = app.anon();
    let agents = anon.refresh(&pair.refresh_token, pair.agent_id).await.expect("the agent rotates");
    let thiefs = anon.refresh(&pair.refresh_token, pair.agent_id).await.expect("the thief retries within grace");
    let err = anon.refresh(&agents.refresh_token, pair.agent_id).await.expect_err("reuse");
    assert_eq!(err.key(), Some(ErrorKey::Unauthenticated));
    assert!(anon.refresh(&thiefs.refresh_token, pair.agent_id).await.is_err(), "the family is revoked");
    let thief = app.anon().with_bearer(thiefs.access_token.clone());
    let err = thief.heartbeat(&tether_proto::agent::Heartbeat::default()).await.expect_err("access token revoked");
    assert_eq!(err.key(), Some(ErrorKey::Unauthenticated));
    let rows = app.state.store.list_audit(0, 100).await.expect("audit");
    assert!(rows.iter().any(|r| r.action == "token.refresh_reuse" && r.target == pair.agent_id.to_string()));
    app.stop().await;
}

#[tokio::test]
async fn refresh_for_another_device_id_and_the_oauth_form() {
    let app = spawn_app().await;
    let (_, a) = app.agent(&[]).await;
    let (_, b) = app.agent(&[]).await;
    let err = app.anon().refresh(&a.refresh_token, b.agent_id).await.expect_err("wrong device");
    assert_eq!(err.key(), Some(ErrorKey::Unauthenticated));

    let http = app.http();
    let res = http
        .post(app.url("/oauth/token"))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", a.refresh_token.as_str())])
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["cache-control"], "no-store");
    let body: serde_json::Value = res.json().await.expect("json");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(poll_status(&app, body["access_token"].as_str().expect("token")).await.0, 204);
    let res = http
        .post(app.url("/oauth/token"))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", "ttr_bogus")])
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 400);
    let body: serde_json::Value = res.json().await.expect("json");
    assert_eq!(body["error"], "invalid_grant");
    app.stop().await;
}

#[tokio::test]
async fn enrollment_tokens_are_single_use_and_revocable() {
    let app = spawn_app().await;
    let token = app.enroll_token(Labels::new(), 1).await;
    let req = |t: &str| EnrollRequest {
        enroll_token: t.to_owned(),
        public_key: public_key(),
        hostname: "h".into(),
        labels: Labels::new(),
        facts: json!({}),
    };
    app.anon().enroll(&req(&token)).await.expect("first use");
    let err = app.anon().enroll(&req(&token)).await.expect_err("used up");
    assert_eq!(err.key(), Some(ErrorKey::Unauthenticated));
    let err = app.anon().enroll(&req("tte_never-issued")).await.expect_err("unknown");
    assert_eq!(err.status(), Some(401));

    let revoked = app
        .admin
        .create_enroll_token(&tether_proto::agent::CreateEnrollToken {
            labels: Labels::new(),
            uses: 5,
            expires_in_s: 60,
        })
        .await
        .expect("token");
    app.admin.revoke_enroll_token(&revoked.id).await.expect("revoke");
    assert!(app.anon().enroll(&req(&revoked.token)).await.is_err());

    let mut bad_key = req(&token);
    bad_key.public_key = "not-a-key".into();
    let err = app.anon().enroll(&bad_key).await.expect_err("bad key");
    assert_eq!(err.key(), Some(ErrorKey::BadRequest));
    app.stop().await;
}

#[tokio::test]
async fn agent_and_operator_credentials_do_not_cross() {
    let app = spawn_app().await;
    let (agent, _) = app.agent(&[]).await;
    // An agent token on operator routes.
    let err = agent.list_commands(&Default::default()).await.expect_err("agent on operator route");
    assert_eq!(err.status(), Some(401));
    // An operator token on agent routes.
    let err = app.admin.updates(None, 20, 0).await.expect_err("operator on agent route");
    assert_eq!(err.status(), Some(401));
    // No credentials at all.
    assert_eq!(app.anon().list_agents(&Default::default()).await.expect_err("anon").status(), Some(401));
    // Basic with the admin password works; a wrong one does not.
    let basic = |p: &str| {
        Client::new(&app.base)
            .expect("client")
            .with_credentials(Credentials::Basic { username: "admin".into(), password: p.into() })
    };
    basic(ADMIN_PASSWORD).list_agents(&Default::default()).await.expect("basic auth");
    assert_eq!(basic("wrong").list_agents(&Default::default()).await.expect_err("wrong").status(), Some(401));
    // Config-controller clients: the API token as the Basic password (protocol.md §16.3).
    basic(&app.admin_token).list_agents(&Default::default()).await.expect("token as basic password");
    app.stop().await;
}

#[tokio::test]
async fn login_sessions_use_a_strict_http_only_cookie_and_csrf_on_mutations() {
    let app = spawn_app().await;
    let http = app.http();
    let res = http
        .post(app.url("/api/v1/auth/login"))
        .json(&json!({"username": "admin", "password": ADMIN_PASSWORD}))
        .send()
        .await
        .expect("login");
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["cache-control"], "no-store");
    let cookie = res.headers()["set-cookie"].to_str().expect("cookie").to_owned();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    let body: serde_json::Value = res.json().await.expect("json");
    let csrf = body["data"]["csrf_token"].as_str().expect("csrf").to_owned();
    assert_eq!(body["data"]["user"]["role"], "admin");
    let session = cookie.split(';').next().expect("pair").to_owned();

    let get = http.get(app.url("/api/v1/agents")).header("cookie", &session).send().await.expect("get");
    assert_eq!(get.status(), 200);
    let body = json!({"labels": {}, "uses": 1});
    let no_csrf =
        http.post(app.url("/api/v1/enroll-tokens")).header("cookie", &session).json(&body).send().await.expect("post");
    assert_eq!(no_csrf.status(), 403);
    let wrong = http
        .post(app.url("/api/v1/enroll-tokens"))
        .header("cookie", &session)
        .header("x-csrf-token", "ttc_forged")
        .json(&body)
        .send()
        .await
        .expect("post");
    assert_eq!(wrong.status(), 403);
    let ok = http
        .post(app.url("/api/v1/enroll-tokens"))
        .header("cookie", &session)
        .header("x-csrf-token", &csrf)
        .json(&body)
        .send()
        .await
        .expect("post");
    assert_eq!(ok.status(), 201);

    let out = http
        .post(app.url("/api/v1/auth/logout"))
        .header("cookie", &session)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .expect("logout");
    assert_eq!(out.status(), 204);
    let after = http.get(app.url("/api/v1/agents")).header("cookie", &session).send().await.expect("get");
    assert_eq!(after.status(), 401);
    let bad = http
        .post(app.url("/api/v1/auth/login"))
        .json(&json!({"username": "admin", "password": "nope-nope-nope"}))
        .send()
        .await
        .expect("login");
    assert_eq!(bad.status(), 401);
    app.stop().await;
}

#[tokio::test]
async fn revoked_api_tokens_stop_working_on_the_next_request() {
    let app = spawn_app().await;
    let created = app
        .admin
        .create_api_token(&tether_proto::user::CreateApiToken { name: "ci".into(), expires_in_s: Some(3600) })
        .await
        .expect("token");
    let client = app.anon().with_bearer(created.token.clone());
    client.list_agents(&Default::default()).await.expect("works");
    app.admin.revoke_api_token(&created.id).await.expect("revoke");
    assert_eq!(client.list_agents(&Default::default()).await.expect_err("revoked").status(), Some(401));
    app.stop().await;
}
