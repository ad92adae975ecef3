//! Seed 002, the config controller: its agent registers with HTTP Basic
//! `agent:<enrollment token>`, polls `GET /api/v1/config` with ETags, and its
//! admin writes the configuration with `curl -u admin:… POST /api/v1/config`.

use reqwest::StatusCode;
use serde_json::{Value, json};
use tether_proto::user::{CreateApiToken, CreateUser};

use crate::common::{ADMIN_PASSWORD, TestApp, labels, spawn_app, spawn_app_with};

/// Registers as the seed's agent does; the answer's body.
async fn register(app: &TestApp, token: &str, body: Value) -> Value {
    let res = app
        .http()
        .post(app.url("/api/v1/register"))
        .basic_auth("agent", Some(token))
        .json(&body)
        .send()
        .await
        .expect("register");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["cache-control"], "no-store");
    res.json().await.expect("json")
}

/// `GET /api/v1/config` as the agent, optionally with `If-None-Match`.
async fn get_config(app: &TestApp, access_token: &str, etag: Option<&str>) -> reqwest::Response {
    let mut req = app.http().get(app.url("/api/v1/config")).bearer_auth(access_token);
    if let Some(etag) = etag {
        req = req.header("If-None-Match", etag);
    }
    req.send().await.expect("config")
}

fn etag(res: &reqwest::Response) -> String {
    res.headers()["etag"].to_str().expect("ascii").to_owned()
}

/// The seed's admin command: `curl -X POST …/api/v1/config -u admin:admin123 -d '{"url":"https://ip.me"}'`.
async fn admin_post(app: &TestApp, user: &str, password: &str, doc: &Value) -> reqwest::Response {
    app.http()
        .post(app.url("/api/v1/config"))
        .basic_auth(user, Some(password))
        .json(doc)
        .send()
        .await
        .expect("admin post")
}

async fn error_key(res: reqwest::Response) -> (StatusCode, String) {
    let status = res.status();
    let body: Value = res.json().await.expect("error envelope");
    (status, body["error"]["key"].as_str().expect("error.key").to_owned())
}

#[tokio::test]
async fn register_poll_with_etag_and_admin_write_round_trip() {
    let app = spawn_app().await;
    let token = app.enroll_token(labels(&[("site", "lab")]), 1).await;
    let pair = register(&app, &token, json!({"hostname": "worker-1", "ip": "10.0.0.7", "version": "1.0.0"})).await;
    let access = pair["access_token"].as_str().expect("access_token");
    assert!(pair["refresh_token"].as_str().expect("refresh_token").starts_with("ttr_"));
    assert_eq!(pair["expires_in"], 900);
    let agent_id = pair["agent_id"].as_str().expect("agent_id").parse().expect("uuid");
    // The seed's extra fields are kept as facts; the token's labels apply.
    let agent = app.admin.get_agent(agent_id).await.expect("agent");
    assert_eq!(
        (agent.hostname.as_str(), agent.facts.clone()),
        ("worker-1", json!({"ip": "10.0.0.7", "version": "1.0.0"}))
    );
    assert_eq!(agent.labels, labels(&[("site", "lab")]));

    // Nothing written yet: an empty document, then 304 for the same ETag.
    let first = get_config(&app, access, None).await;
    assert_eq!(first.status(), StatusCode::OK);
    let empty_tag = etag(&first);
    assert_eq!(first.json::<Value>().await.expect("json"), json!({}));
    let same = get_config(&app, access, Some(&empty_tag)).await;
    assert_eq!(same.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(etag(&same), empty_tag);

    // The admin's write changes the ETag; the agent gets the bare document.
    let res = admin_post(&app, "admin", ADMIN_PASSWORD, &json!({"url": "https://ip.me"})).await;
    assert_eq!(res.status(), StatusCode::OK);
    let written: Value = res.json().await.expect("json");
    assert_eq!((written["scope"].clone(), written["version"].clone()), (json!("global"), json!(1)));
    assert_eq!(written["agents_changed"], 1);
    let changed = get_config(&app, access, Some(&empty_tag)).await;
    assert_eq!(changed.status(), StatusCode::OK);
    let url_tag = etag(&changed);
    assert_ne!(url_tag, empty_tag);
    assert_eq!(changed.json::<Value>().await.expect("json"), json!({"url": "https://ip.me"}));
    assert_eq!(get_config(&app, access, Some(&url_tag)).await.status(), StatusCode::NOT_MODIFIED);
    // The ETag is the hash every native view shows.
    let native = app.admin.agent_config(agent_id).await.expect("native view");
    assert_eq!(url_tag, format!("\"{}\"", native.hash));

    // Another write without If-Match (the seed's admin never sends one)
    // replaces the document, with an API token as the Basic password.
    let api_token = app
        .admin
        .create_api_token(&CreateApiToken { name: "ci".into(), expires_in_s: None })
        .await
        .expect("api token")
        .token;
    let res = admin_post(&app, "ci", &api_token, &json!({"url": "https://example.com", "poll_interval": 10})).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.json::<Value>().await.expect("json")["version"], 2);
    let replaced = get_config(&app, access, Some(&url_tag)).await;
    assert_eq!(
        replaced.json::<Value>().await.expect("json"),
        json!({"url": "https://example.com", "poll_interval": 10})
    );
    // An If-Match naming an old version is the native 409.
    let res = app
        .http()
        .post(app.url("/api/v1/config"))
        .basic_auth("admin", Some(ADMIN_PASSWORD))
        .header("If-Match", "\"1\"")
        .json(&json!({"url": "https://stale.example"}))
        .send()
        .await
        .expect("stale write");
    assert_eq!(error_key(res).await, (StatusCode::CONFLICT, "CONFLICT".to_owned()));
    // Each write is a native version with its author and audit row.
    let history = app.admin.config_history(&tether_proto::config::Scope::Global, None, 10).await.expect("history");
    let authors: Vec<_> = history.data.iter().map(|v| (v.version, v.author.as_str())).collect();
    assert_eq!(authors, [(2, "admin"), (1, "admin")]);

    // The seed's agents list is the native one, which takes Basic.
    let res =
        app.http().get(app.url("/api/v1/agents")).basic_auth("admin", Some(ADMIN_PASSWORD)).send().await.expect("list");
    assert_eq!(res.status(), StatusCode::OK);
    let list: Value = res.json().await.expect("json");
    let hosts: Vec<_> = list["data"].as_array().expect("data").iter().map(|a| a["hostname"].clone()).collect();
    assert_eq!(hosts, [json!("worker-1")]);
    app.stop().await;
}

#[tokio::test]
async fn register_takes_an_optional_key_and_checks_it() {
    let app = spawn_app().await;
    let token = app.enroll_token(labels(&[]), 2).await;
    let key = crate::common::public_key();
    let pair = register(&app, &token, json!({"hostname": "signer", "public_key": key})).await;
    assert!(pair["agent_id"].is_string());
    let res = app
        .http()
        .post(app.url("/api/v1/register"))
        .basic_auth("agent", Some(&token))
        .json(&json!({"hostname": "bad-key", "public_key": "not-a-key"}))
        .send()
        .await
        .expect("register");
    assert_eq!(error_key(res).await, (StatusCode::BAD_REQUEST, "BAD_REQUEST".to_owned()));
    app.stop().await;
}

#[tokio::test]
async fn bad_credentials_and_bodies_are_refused_in_the_envelope() {
    let app = spawn_app().await;
    let token = app.enroll_token(labels(&[]), 1).await;
    let post = |auth: Option<(&str, &str)>, body: &str| {
        let mut req = app
            .http()
            .post(app.url("/api/v1/register"))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some((user, password)) = auth {
            req = req.basic_auth(user, Some(password));
        }
        req.send()
    };
    let hostname = r#"{"hostname":"h"}"#;
    let unauthenticated = (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED".to_owned());
    // No credentials, a wrong token, the admin's password, a Bearer token.
    assert_eq!(error_key(post(None, hostname).await.expect("send")).await, unauthenticated);
    assert_eq!(error_key(post(Some(("agent", "tte_wrong")), hostname).await.expect("send")).await, unauthenticated);
    assert_eq!(error_key(post(Some(("admin", ADMIN_PASSWORD)), hostname).await.expect("send")).await, unauthenticated);
    let res = app
        .http()
        .post(app.url("/api/v1/register"))
        .bearer_auth(&token)
        .json(&json!({"hostname": "h"}))
        .send()
        .await
        .expect("send");
    assert_eq!(error_key(res).await, unauthenticated);
    // Malformed, missing the hostname, an empty hostname, oversize.
    let bad = (StatusCode::BAD_REQUEST, "BAD_REQUEST".to_owned());
    for body in ["{", r#"{"ip":"10.0.0.1"}"#, r#"{"hostname":""}"#, r#"{"hostname":"h","labels":"x"}"#] {
        assert_eq!(error_key(post(Some(("agent", &token)), body).await.expect("send")).await, bad, "{body}");
    }
    let huge = json!({"hostname": "h", "blob": "x".repeat(2 * 1024 * 1024)}).to_string();
    let res = post(Some(("agent", &token)), &huge).await.expect("send");
    assert_eq!(error_key(res).await, (StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE".to_owned()));
    // None of that used the token up; one registration does.
    let pair = register(&app, &token, json!({"hostname": "h"})).await;
    assert_eq!(error_key(post(Some(("agent", &token)), hostname).await.expect("send")).await, unauthenticated);
    let access = pair["access_token"].as_str().expect("access_token");

    // The agent's route refuses operators' credentials and none at all.
    let res = app.http().get(app.url("/api/v1/config")).send().await.expect("send");
    assert_eq!(error_key(res).await, unauthenticated);
    let res = app.http().get(app.url("/api/v1/config")).basic_auth("admin", Some(ADMIN_PASSWORD)).send().await;
    assert_eq!(error_key(res.expect("send")).await, unauthenticated);
    let res = app.http().get(app.url("/api/v1/config")).bearer_auth(&app.admin_token).send().await.expect("send");
    assert_eq!(error_key(res).await, unauthenticated);

    // The admin's route refuses the agent's token, a wrong password and
    // a user below admin; and anything but a JSON object.
    let doc = json!({"url": "https://ip.me"});
    let res = app.http().post(app.url("/api/v1/config")).bearer_auth(access).json(&doc).send().await.expect("send");
    assert_eq!(error_key(res).await, unauthenticated);
    assert_eq!(error_key(admin_post(&app, "admin", "wrong password!", &doc).await).await, unauthenticated);
    let operator =
        CreateUser { username: "ops".into(), password: "operator password 1".into(), role: "operator".into() };
    app.admin.create_user(&operator).await.expect("operator");
    let res = admin_post(&app, "ops", "operator password 1", &doc).await;
    assert_eq!(error_key(res).await, (StatusCode::FORBIDDEN, "FORBIDDEN".to_owned()));
    for body in [json!(["url"]), json!("https://ip.me")] {
        assert_eq!(error_key(admin_post(&app, "admin", ADMIN_PASSWORD, &body).await).await, bad, "{body}");
    }
    let huge = json!({"blob": "x".repeat(2 * 1024 * 1024)});
    let res = admin_post(&app, "admin", ADMIN_PASSWORD, &huge).await;
    assert_eq!(error_key(res).await, (StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE".to_owned()));
    // Nothing of that was written.
    assert!(app.admin.list_configs().await.expect("configs").is_empty());
    app.stop().await;
}

#[tokio::test]
async fn the_routes_are_gone_without_seed_routes() {
    let app = spawn_app_with(|c| c.seed_routes = false).await;
    let token = app.enroll_token(labels(&[]), 1).await;
    let res = app
        .http()
        .post(app.url("/api/v1/register"))
        .basic_auth("agent", Some(&token))
        .json(&json!({"hostname": "h"}))
        .send()
        .await
        .expect("send");
    assert_eq!(error_key(res).await, (StatusCode::NOT_FOUND, "NOT_FOUND".to_owned()));
    let res = admin_post(&app, "admin", ADMIN_PASSWORD, &json!({"url": "https://ip.me"})).await;
    assert_eq!(error_key(res).await, (StatusCode::NOT_FOUND, "NOT_FOUND".to_owned()));
    app.stop().await;
}
