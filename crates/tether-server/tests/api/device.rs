//! RFC 8628 device authorization grant (SPEC §3).

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{TestApp, public_key, spawn_app, spawn_app_with};

async fn authorize(app: &TestApp) -> Value {
    let res = app
        .http()
        .post(app.url("/oauth/device_authorization"))
        .form(&[("client_id", "tether-agent"), ("public_key", &public_key()), ("hostname", "printer-1")])
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["cache-control"], "no-store");
    res.json().await.expect("json")
}

async fn poll(app: &TestApp, device_code: &str) -> (u16, Value) {
    let res = app
        .http()
        .post(app.url("/oauth/token"))
        .form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", device_code),
            ("client_id", "tether-agent"),
        ])
        .send()
        .await
        .expect("send");
    assert_eq!(res.headers()["cache-control"], "no-store");
    (res.status().as_u16(), res.json().await.expect("json"))
}

#[tokio::test]
async fn device_flow_pending_slow_down_approval_and_a_working_token() {
    let app = spawn_app().await;
    let grant = authorize(&app).await;
    let user_code = grant["user_code"].as_str().expect("user_code");
    assert_eq!(user_code.len(), 9);
    assert!(
        user_code.chars().enumerate().all(|(i, c)| if i == 4 { c == '-' } else { "BCDFGHJKLMNPQRSTVWXZ".contains(c) }),
        "{user_code}"
    );
    assert_eq!((grant["expires_in"].as_u64(), grant["interval"].as_u64()), (Some(600), Some(5)));
    assert!(grant["verification_uri"].as_str().expect("uri").ends_with("/device"));
    assert!(grant["verification_uri_complete"].as_str().expect("uri").contains(user_code));
    let device_code = grant["device_code"].as_str().expect("device_code");

    assert_eq!(
        poll(&app, device_code).await,
        (400, json!({"error": "authorization_pending", "error_description": "not approved yet"}))
    );
    let (status, body) = poll(&app, device_code).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("slow_down")));

    // Lower-case and without the dash is the same code.
    let typed = user_code.replace('-', "").to_lowercase();
    let res = app
        .http()
        .post(app.url("/api/v1/device/approve"))
        .bearer_auth(&app.admin_token)
        .json(&json!({"user_code": typed, "labels": {"site": "berlin"}}))
        .send()
        .await
        .expect("approve");
    assert_eq!(res.status(), 200);
    // Respect the (now 10 s) interval? The server only counts the time since the last poll:
    // wait it out, then the grant is redeemed.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (status, token) = poll(&app, device_code).await;
    assert_eq!(status, 200, "{token}");
    let agent = app.anon().with_bearer(token["access_token"].as_str().expect("access"));
    agent.updates(None, 20, 0).await.expect("the new agent polls");
    let id: tether_proto::AgentId = token["agent_id"].as_str().expect("id").parse().expect("uuid");
    let view = app.admin.get_agent(id).await.expect("agent");
    assert_eq!((view.hostname.as_str(), view.labels.get("site").map(String::as_str)), ("printer-1", Some("berlin")));
    // The device code works once.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(poll(&app, device_code).await.1["error"], "invalid_grant");
    app.stop().await;
}

#[tokio::test]
async fn denied_and_expired_codes_and_bad_clients() {
    let app = spawn_app_with(|c| c.device_code_ttl_s = 1).await;
    let denied = authorize(&app).await;
    let res = app
        .http()
        .post(app.url("/api/v1/device/deny"))
        .bearer_auth(&app.admin_token)
        .json(&json!({"user_code": denied["user_code"]}))
        .send()
        .await
        .expect("deny");
    assert_eq!(res.status(), 200);
    assert_eq!(poll(&app, denied["device_code"].as_str().expect("code")).await.1["error"], "access_denied");

    let expiring = authorize(&app).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(poll(&app, expiring["device_code"].as_str().expect("code")).await.1["error"], "expired_token");

    let res = app
        .http()
        .post(app.url("/oauth/device_authorization"))
        .form(&[("client_id", "someone-else"), ("public_key", &public_key()), ("hostname", "h")])
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 401);
    assert_eq!(res.json::<Value>().await.expect("json")["error"], "invalid_client");
    assert_eq!(poll(&app, "ttd_unknown").await.1["error"], "invalid_grant");
    app.stop().await;
}

#[tokio::test]
async fn wrong_user_codes_are_limited_and_the_page_approves() {
    let app = spawn_app().await;
    let mut last = 0;
    for _ in 0..7 {
        let res = app
            .http()
            .post(app.url("/api/v1/device/approve"))
            .bearer_auth(&app.admin_token)
            .json(&json!({"user_code": "BCDF-GHJK"}))
            .send()
            .await
            .expect("approve");
        last = res.status().as_u16();
    }
    assert_eq!(last, 429, "guessing codes is rate limited");

    let grant = authorize(&app).await;
    let page = app.http().get(app.url("/device")).send().await.expect("page");
    assert_eq!(page.status(), 200);
    assert!(page.text().await.expect("html").contains("<form"));
    let form = [
        ("user_code", grant["user_code"].as_str().expect("code")),
        ("labels", "role=printer"),
        ("username", "admin"),
        ("password", crate::common::ADMIN_PASSWORD),
        ("action", "approve"),
    ];
    // From another address: this IP has used up its wrong-code allowance.
    let http =
        reqwest::Client::builder().local_address("127.0.0.5".parse::<std::net::IpAddr>().ok()).build().expect("http");
    let res = http.post(app.url("/device")).form(&form).send().await.expect("post");
    assert_eq!(res.status(), 200);
    assert!(res.text().await.expect("html").contains("Approved"));
    let rows = app.state.store.list_audit(0, 1000).await.expect("audit");
    assert!(rows.iter().any(|r| r.action == "device.approve"));
    app.stop().await;
}
