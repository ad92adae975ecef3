//! RFC 8628 device authorization grant (protocol.md §3).

use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};

use crate::common::{ADMIN_PASSWORD, TestApp, public_key, spawn_app, spawn_app_with};

async fn authorize(app: &TestApp) -> Value {
    authorize_key(app, &public_key()).await
}

async fn authorize_key(app: &TestApp, key: &str) -> Value {
    let res = app
        .http()
        .post(app.url("/oauth/device_authorization"))
        .form(&[("client_id", "tether-agent"), ("public_key", key), ("hostname", "printer-1")])
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["cache-control"], "no-store");
    res.json().await.expect("json")
}

fn fingerprint(key: &str) -> String {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(key).expect("base64url");
    tether_proto::agent::key_fingerprint(&raw)
}

async fn approve(app: &TestApp, user_code: &str) -> reqwest::Response {
    app.http()
        .post(app.url("/api/v1/device/approve"))
        .bearer_auth(&app.admin_token)
        .json(&json!({"user_code": user_code}))
        .send()
        .await
        .expect("approve")
}

async fn refresh(app: &TestApp, refresh_token: &str) -> (u16, Value) {
    let res = app
        .http()
        .post(app.url("/oauth/token"))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", refresh_token)])
        .send()
        .await
        .expect("send");
    (res.status().as_u16(), res.json().await.expect("json"))
}

/// The headers every `/device` answer carries.
fn assert_page_headers(res: &reqwest::Response) {
    let h = res.headers();
    assert_eq!(h["x-frame-options"], "DENY", "{h:?}");
    assert_eq!(
        h["content-security-policy"],
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
    );
    assert_eq!(h["cache-control"], "no-store");
    assert!(h["content-type"].to_str().expect("ascii").starts_with("text/html"), "{h:?}");
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
    // The device code works once: after the agent used its refresh token
    // (a repeat before that is a lost-response retry, see below).
    assert_eq!(refresh(&app, token["refresh_token"].as_str().expect("rt")).await.0, 200);
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
    // RFC 6749 §5.2: 401 only with WWW-Authenticate, which a public client cannot answer.
    assert_eq!(res.status(), 400);
    assert_eq!(res.json::<Value>().await.expect("json")["error"], "invalid_client");
    assert_eq!(poll(&app, "ttd_unknown").await.1["error"], "invalid_grant");

    // RFC 8628 §3.4: client_id is required on the token poll.
    let pending = authorize(&app).await;
    let code = pending["device_code"].as_str().expect("code");
    let token = |client_id: Option<&'static str>| {
        let mut form = vec![("grant_type", "urn:ietf:params:oauth:grant-type:device_code"), ("device_code", code)];
        form.extend(client_id.map(|c| ("client_id", c)));
        app.http().post(app.url("/oauth/token")).form(&form).send()
    };
    let res = token(None).await.expect("send");
    assert_eq!(res.status(), 400);
    assert_eq!(res.json::<Value>().await.expect("json")["error"], "invalid_request");
    let res = token(Some("someone-else")).await.expect("send");
    assert_eq!(res.status(), 400);
    assert_eq!(res.json::<Value>().await.expect("json")["error"], "invalid_client");
    app.stop().await;
}

#[tokio::test]
async fn wrong_user_codes_are_limited_apart_from_logins_and_audited() {
    let app = spawn_app().await;
    let mut statuses = Vec::new();
    for _ in 0..11 {
        statuses.push(approve(&app, "BCDF-GHJK").await.status().as_u16());
    }
    assert_eq!(statuses, [[404; 10].as_slice(), &[429]].concat(), "10 wrong codes per IP, then 429");
    // The device-code window is its own: the same IP still logs in with a password.
    let res = app
        .http()
        .post(app.url("/api/v1/auth/login"))
        .json(&json!({"username": "admin", "password": ADMIN_PASSWORD}))
        .send()
        .await
        .expect("login");
    assert_eq!(res.status(), 200);

    let rows = app.state.store.list_audit(0, 1000).await.expect("audit");
    let refused: Vec<_> = rows.iter().filter(|r| r.action == "device.approve" && r.outcome == "not_found").collect();
    assert_eq!(refused.len(), 10, "each counted wrong code is audited");
    assert_eq!(refused[0].actor, "admin");
    assert!(!refused[0].details.to_string().contains("BCDF"), "the typed code stays out: {}", refused[0].details);
    // A malformed code is refused and audited too.
    let app = spawn_app().await;
    assert_eq!(approve(&app, "not-a-code").await.status(), 400);
    let rows = app.state.store.list_audit(0, 1000).await.expect("audit");
    assert!(rows.iter().any(|r| r.action == "device.approve" && r.outcome == "denied"), "{rows:?}");
    app.stop().await;
}

#[tokio::test]
async fn the_page_shows_the_requesting_device_before_approval_and_is_never_framed_or_cached() {
    let app = spawn_app().await;
    let key = public_key();
    let grant = authorize_key(&app, &key).await;
    let user_code = grant["user_code"].as_str().expect("code");

    let res = app.http().get(app.url("/device")).send().await.expect("page");
    assert_eq!(res.status(), 200);
    assert_page_headers(&res);
    assert!(res.text().await.expect("html").contains("<form"));

    // verification_uri_complete: the device is described before the buttons.
    let res = app.http().get(grant["verification_uri_complete"].as_str().expect("uri")).send().await.expect("page");
    assert_eq!(res.status(), 200);
    assert_page_headers(&res);
    let html = res.text().await.expect("html");
    let details = html.find("printer-1").expect("hostname shown");
    for shown in ["127.0.0.1", &fingerprint(&key), user_code] {
        assert!(html.contains(shown), "{shown} missing from\n{html}");
    }
    assert!(details < html.find(">Approve</button>").expect("button"), "details come first");

    // An unknown code gets the neutral page, with the same headers.
    let res = app.http().get(app.url("/device?user_code=BCDF-GHJK")).send().await.expect("page");
    assert_eq!(res.status(), 404);
    assert_page_headers(&res);
    let html = res.text().await.expect("html");
    assert!(html.contains("No device is waiting for approval with that code"), "{html}");
    assert!(!html.contains("printer-1"));

    // Errors of the form stay HTML (not the JSON envelope) with the headers.
    let form = [("user_code", user_code), ("username", "admin"), ("password", "wrong"), ("action", "approve")];
    let res = app.http().post(app.url("/device")).form(&form).send().await.expect("post");
    assert_eq!(res.status(), 401);
    assert_page_headers(&res);
    assert!(res.text().await.expect("html").contains("Wrong username or password"));

    let form = [
        ("user_code", user_code),
        ("labels", "role=printer"),
        ("username", "admin"),
        ("password", ADMIN_PASSWORD),
        ("action", "approve"),
    ];
    let res = app.http().post(app.url("/device")).form(&form).send().await.expect("post");
    assert_eq!(res.status(), 200);
    assert_page_headers(&res);
    let html = res.text().await.expect("html");
    assert!(html.contains("Approved") && html.contains(&fingerprint(&key)), "{html}");
    let rows = app.state.store.list_audit(0, 1000).await.expect("audit");
    assert!(rows.iter().any(|r| r.action == "device.approve" && r.outcome == "ok"));
    app.stop().await;
}

#[tokio::test]
async fn looking_up_unknown_codes_on_the_page_counts_like_wrong_codes() {
    let app = spawn_app().await;
    let grant = authorize(&app).await;
    for _ in 0..10 {
        let res = app.http().get(app.url("/device?user_code=BCDF-GHJK")).send().await.expect("page");
        assert_eq!(res.status(), 404);
    }
    // Now even a live code is not looked up from this IP, on the page or by the API.
    let live = format!("/device?user_code={}", grant["user_code"].as_str().expect("code"));
    let res = app.http().get(app.url(&live)).send().await.expect("page");
    assert_eq!(res.status(), 429);
    assert_page_headers(&res);
    assert!(res.headers().contains_key("retry-after"));
    assert!(!res.text().await.expect("html").contains("printer-1"));
    assert_eq!(approve(&app, grant["user_code"].as_str().expect("code")).await.status(), 429);
    // Another address is not affected.
    let http =
        reqwest::Client::builder().local_address("127.0.0.5".parse::<std::net::IpAddr>().ok()).build().expect("http");
    assert_eq!(http.get(app.url(&live)).send().await.expect("page").status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn approval_returns_the_device_details_and_the_audit_names_the_approver() {
    let app = spawn_app().await;
    let key = public_key();
    let grant = authorize_key(&app, &key).await;
    let user_code = grant["user_code"].as_str().expect("code");
    let res = app
        .http()
        .post(app.url("/api/v1/device/approve"))
        .bearer_auth(&app.admin_token)
        .json(&json!({"user_code": user_code, "labels": {"site": "berlin"}}))
        .send()
        .await
        .expect("approve");
    assert_eq!(res.status(), 200);
    let data = res.json::<Value>().await.expect("json")["data"].clone();
    assert_eq!(
        (&data["approved"], &data["user_code"], &data["hostname"], &data["requested_ip"], &data["key_fingerprint"]),
        (&json!(true), &json!(user_code), &json!("printer-1"), &json!("127.0.0.1"), &json!(fingerprint(&key)))
    );
    assert_eq!(data["labels"], json!({"site": "berlin"}));
    assert!(data["requested_at"].as_str().is_some_and(|t| t.contains('T')), "{data}");

    let (status, token) = poll(&app, grant["device_code"].as_str().expect("code")).await;
    assert_eq!(status, 200, "{token}");
    let rows = app.state.store.list_audit(0, 1000).await.expect("audit");
    let approved = rows.iter().find(|r| r.action == "device.approve").expect("device.approve row");
    assert_eq!(
        (approved.details["hostname"].as_str(), approved.details["key_fingerprint"].as_str()),
        (Some("printer-1"), Some(fingerprint(&key).as_str()))
    );
    let enrolled = rows.iter().find(|r| r.action == "agent.enroll").expect("agent.enroll row");
    assert_eq!(
        (enrolled.details["approved_by"].as_str(), enrolled.details["user_code"].as_str()),
        (Some("admin"), Some(user_code))
    );
    assert_eq!(enrolled.details["key_fingerprint"], json!(fingerprint(&key)));
    for row in &rows {
        let text = row.details.to_string();
        assert!(!text.contains("ttd_") && !text.contains("ttr_"), "a secret in {text}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_lost_approving_response_is_answered_again_for_the_same_agent() {
    let app = spawn_app().await;
    let grant = authorize(&app).await;
    let device_code = grant["device_code"].as_str().expect("code");
    // Approved before the first poll, so no poll has to wait out the interval.
    assert_eq!(approve(&app, grant["user_code"].as_str().expect("code")).await.status(), 200);
    let (status, lost) = poll(&app, device_code).await;
    assert_eq!(status, 200, "{lost}");
    // That answer never arrived: the agent polls again with the same device code.
    let (status, again) = poll(&app, device_code).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["agent_id"], lost["agent_id"], "the same agent, not an orphan and a new one");
    assert_ne!(again["refresh_token"], lost["refresh_token"]);
    let agents = app.admin.list_agents(&Default::default()).await.expect("agents");
    assert_eq!(agents.data.len(), 1);
    // The new token works. (Presenting the lost answer's revoked token
    // would be reuse and revoke the family: see the store tests.)
    let (status, rotated) = refresh(&app, again["refresh_token"].as_str().expect("rt")).await;
    assert_eq!(status, 200, "{rotated}");
    assert_eq!(refresh(&app, lost["refresh_token"].as_str().expect("rt")).await.1["error"], "invalid_grant");
    // Once the agent has used its token, the device code is spent for good.
    assert_eq!(
        poll(&app, device_code).await,
        (400, json!({"error": "invalid_grant", "error_description": "unknown or used device code"}))
    );
    let rows = app.state.store.list_audit(0, 1000).await.expect("audit");
    assert_eq!(rows.iter().filter(|r| r.action == "agent.enroll").count(), 1);
    assert!(rows.iter().any(|r| r.action == "token.issued" && r.details["lost_response_retry"] == json!(true)));
    app.stop().await;
}

#[tokio::test]
async fn pending_grants_are_capped_with_an_rfc6749_503() {
    let app = spawn_app_with(|c| c.max_pending_device_grants = 2).await;
    authorize(&app).await;
    authorize(&app).await;
    let res = app
        .http()
        .post(app.url("/oauth/device_authorization"))
        .form(&[("client_id", "tether-agent"), ("public_key", &public_key()), ("hostname", "h")])
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    assert_eq!(res.headers()["cache-control"], "no-store");
    assert_eq!(res.json::<Value>().await.expect("json")["error"], "temporarily_unavailable");
    app.stop().await;
}

#[tokio::test]
async fn the_per_ip_limit_on_oauth_routes_answers_in_rfc6749_form() {
    let app = spawn_app_with(|c| {
        c.limits.ip_per_s = 1;
        c.limits.ip_burst = 1;
    })
    .await;
    authorize(&app).await;
    let requests = [
        app.http().post(app.url("/oauth/device_authorization")).form(&[
            ("client_id", "tether-agent"),
            ("public_key", &public_key()),
            ("hostname", "h"),
        ]),
        app.http().post(app.url("/oauth/token")).form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", "ttd_x"),
            ("client_id", "tether-agent"),
        ]),
    ];
    for req in requests {
        let res = req.send().await.expect("send");
        assert_eq!(res.status(), 429);
        assert!(res.headers().contains_key("retry-after"));
        let body: Value = res.json().await.expect("json");
        assert_eq!(body["error"], "temporarily_unavailable", "{body}");
        assert!(body["error_description"].is_string(), "{body}");
    }
    app.stop().await;
}

#[tokio::test]
async fn one_address_cannot_fill_the_pending_grants_of_everyone() {
    let app = spawn_app_with(|c| c.limits.pending_device_grants_per_ip = 2).await;
    let ask = |source: &str| {
        let http =
            reqwest::Client::builder().local_address(source.parse::<std::net::IpAddr>().ok()).build().expect("http");
        http.post(app.url("/oauth/device_authorization"))
            .form(&[("client_id", "tether-agent"), ("public_key", &public_key()), ("hostname", "h")])
            .send()
    };
    assert_eq!(ask("127.0.0.1").await.expect("send").status(), 200);
    assert_eq!(ask("127.0.0.1").await.expect("send").status(), 200);
    let res = ask("127.0.0.1").await.expect("send");
    assert_eq!(res.status(), 429);
    assert!(res.headers().contains_key("retry-after"));
    assert_eq!(res.json::<Value>().await.expect("json")["error"], "temporarily_unavailable");
    assert_eq!(ask("127.0.0.2").await.expect("send").status(), 200, "another address still starts a grant");
    app.stop().await;
}
