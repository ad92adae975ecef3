//! The web dashboard through the real server: its pages and their headers,
//! and `GET /api/v1/auth/session`, which tells a reloaded dashboard who is
//! signed in (protocol.md §14).

use serde_json::json;
use tether_server::web::CONTENT_SECURITY_POLICY;

use crate::common::{ADMIN_PASSWORD, spawn_app};

#[tokio::test]
async fn the_dashboard_is_served_from_the_binary_with_strict_headers() {
    let app = spawn_app().await;
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client");
    let root = http.get(app.url("/")).send().await.expect("get /");
    assert_eq!(root.status(), 303);
    assert_eq!(root.headers()["location"], "/ui/");
    let index = http.get(app.url("/ui/")).send().await.expect("get /ui/");
    assert_eq!(index.status(), 200);
    assert_eq!(index.headers()["content-security-policy"], CONTENT_SECURITY_POLICY);
    assert_eq!(index.headers()["x-content-type-options"], "nosniff");
    assert_eq!(index.headers()["referrer-policy"], "no-referrer");
    assert_eq!(index.headers()["content-type"], "text/html; charset=utf-8");
    let html = index.text().await.expect("body");
    assert!(html.contains(r#"<script type="module" src="/ui/js/app.js"></script>"#), "{html}");
    let script = http.get(app.url("/ui/js/app.js")).send().await.expect("get app.js");
    assert_eq!(script.headers()["content-type"], "text/javascript; charset=utf-8");
    // An unknown file is the API's 404 envelope, still with the headers.
    let missing = http.get(app.url("/ui/js/nope.js")).send().await.expect("get");
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.headers()["content-security-policy"], CONTENT_SECURITY_POLICY);
    let body: serde_json::Value = missing.json().await.expect("envelope");
    assert_eq!(body["error"]["key"], "NOT_FOUND");
    app.stop().await;
}

#[tokio::test]
async fn the_session_route_names_the_user_and_gives_back_the_csrf_token() {
    let app = spawn_app().await;
    let http = app.http();
    let anonymous = http.get(app.url("/api/v1/auth/session")).send().await.expect("get");
    assert_eq!(anonymous.status(), 401);

    let login = http
        .post(app.url("/api/v1/auth/login"))
        .json(&json!({"username": "admin", "password": ADMIN_PASSWORD}))
        .send()
        .await
        .expect("login");
    let cookie = login.headers()["set-cookie"].to_str().expect("cookie").split(';').next().expect("pair").to_owned();
    let logged: serde_json::Value = login.json().await.expect("json");
    let res = http.get(app.url("/api/v1/auth/session")).header("cookie", &cookie).send().await.expect("get");
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["cache-control"], "no-store");
    let body: serde_json::Value = res.json().await.expect("json");
    assert_eq!(body["data"]["csrf_token"], logged["data"]["csrf_token"]);
    assert_eq!(body["data"]["user"], logged["data"]["user"]);
    assert_eq!(body["data"]["user"]["role"], "admin");

    // An API token needs no CSRF token: there is none to give.
    let bearer = http.get(app.url("/api/v1/auth/session")).bearer_auth(&app.admin_token).send().await.expect("get");
    let body: serde_json::Value = bearer.json().await.expect("json");
    assert_eq!(body["data"]["user"]["username"], "admin");
    assert!(body["data"]["csrf_token"].is_null(), "{body}");

    // After logout the cookie names nobody.
    let csrf = logged["data"]["csrf_token"].as_str().expect("csrf");
    let out = http
        .post(app.url("/api/v1/auth/logout"))
        .header("cookie", &cookie)
        .header("x-csrf-token", csrf)
        .send()
        .await
        .expect("logout");
    assert_eq!(out.status(), 204);
    let after = http.get(app.url("/api/v1/auth/session")).header("cookie", &cookie).send().await.expect("get");
    assert_eq!(after.status(), 401);
    app.stop().await;
}
