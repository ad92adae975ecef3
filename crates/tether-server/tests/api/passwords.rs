//! Rationed password checks (protocol.md §3) and usernames checked at the
//! edge: parallel guesses cost at most the failure window, the Basic cache
//! spares argon2, and a bad username writes nothing.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use tether_proto::user::CreateUser;

use crate::common::{ADMIN_PASSWORD, TestApp, spawn_app_with};

const WATCHER_PASSWORD: &str = "watcher-password-1";

fn from(source: &str) -> reqwest::Client {
    reqwest::Client::builder().local_address(source.parse::<std::net::IpAddr>().ok()).build().expect("http")
}

/// A server whose password checks wait as long as it takes for a permit,
/// so a slow machine answers 401, not 503, for the checks that do run.
async fn app() -> TestApp {
    spawn_app_with(|c| c.limits.password_check_wait_ms = 120_000).await
}

async fn add_watcher(app: &TestApp) {
    let req = CreateUser { username: "watcher".into(), password: WATCHER_PASSWORD.into(), role: "viewer".into() };
    app.admin.create_user(&req).await.expect("create watcher");
}

async fn basic_status(http: &reqwest::Client, app: &TestApp, user: &str, password: &str) -> u16 {
    let res = http.get(app.url("/api/v1/agents")).basic_auth(user, Some(password)).send().await.expect("send");
    res.status().as_u16()
}

/// Fires `n` requests at once and counts their statuses.
async fn flood<F, Fut>(n: usize, one: F) -> BTreeMap<u16, usize>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = u16> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        set.spawn(one());
    }
    let mut counts = BTreeMap::new();
    while let Some(status) = set.join_next().await {
        *counts.entry(status.expect("request task")).or_insert(0) += 1;
    }
    counts
}

#[tokio::test]
async fn parallel_wrong_basic_guesses_run_argon2_at_most_five_times_while_others_keep_working() {
    let app = app().await;
    add_watcher(&app).await;
    let watcher = from("127.0.0.2");
    // The watcher's first request runs argon2 once; the rest come from the cache.
    assert_eq!(basic_status(&watcher, &app, "watcher", WATCHER_PASSWORD).await, 200);
    let before = app.state.passwords.verifications();
    let hits_before = app.state.passwords.cache_hits();

    let attacker = from("127.0.0.1");
    let base = app.url("/api/v1/agents");
    let guesses = flood(200, || {
        let (http, url) = (attacker.clone(), base.clone());
        async move {
            let res = http.get(url).basic_auth("admin", Some("wrong-password")).send().await.expect("send");
            res.status().as_u16()
        }
    });
    let watching = async {
        let mut statuses = Vec::new();
        for _ in 0..10 {
            statuses.push(basic_status(&watcher, &app, "watcher", WATCHER_PASSWORD).await);
        }
        statuses
    };
    let (guesses, watched) = tokio::join!(guesses, watching);

    assert_eq!(guesses, BTreeMap::from([(401, 5), (429, 195)]), "five checks, the rest refused");
    assert_eq!(watched, [200; 10], "another user keeps working during the flood");
    assert_eq!(app.state.passwords.verifications() - before, 5, "argon2 ran once per slot of the window");
    assert_eq!(app.state.passwords.cache_hits() - hits_before, 10, "the watcher's password was not re-hashed");
    app.stop().await;
}

#[tokio::test]
async fn parallel_wrong_logins_run_argon2_at_most_five_times() {
    let app = app().await;
    let before = app.state.passwords.verifications();
    let attacker = from("127.0.0.3");
    let url = app.url("/api/v1/auth/login");
    let guesses = flood(60, || {
        let (http, url) = (attacker.clone(), url.clone());
        async move {
            let body = json!({"username": "admin", "password": "wrong-password"});
            http.post(url).json(&body).send().await.expect("send").status().as_u16()
        }
    })
    .await;
    assert_eq!(guesses, BTreeMap::from([(401, 5), (429, 55)]));
    assert_eq!(app.state.passwords.verifications() - before, 5);
    // A success gives its slot back: four failures then a right password
    // leave the pair with four, so one more wrong guess is still checked.
    let other = from("127.0.0.4");
    for _ in 0..4 {
        let body = json!({"username": "admin", "password": "wrong-password"});
        assert_eq!(other.post(app.url("/api/v1/auth/login")).json(&body).send().await.expect("send").status(), 401);
    }
    let body = json!({"username": "admin", "password": ADMIN_PASSWORD});
    assert_eq!(other.post(app.url("/api/v1/auth/login")).json(&body).send().await.expect("send").status(), 200);
    let body = json!({"username": "admin", "password": "wrong-password"});
    assert_eq!(other.post(app.url("/api/v1/auth/login")).json(&body).send().await.expect("send").status(), 401);
    assert_eq!(other.post(app.url("/api/v1/auth/login")).json(&body).send().await.expect("send").status(), 429);
    app.stop().await;
}

#[tokio::test]
async fn unknown_users_run_the_same_rationed_check_as_wrong_passwords() {
    let app = app().await;
    let before = app.state.passwords.verifications();
    let guesses = flood(30, || {
        let (http, url) = (from("127.0.0.5"), app.url("/api/v1/agents"));
        async move { http.get(url).basic_auth("nobody", Some("whatever")).send().await.expect("send").status().as_u16() }
    })
    .await;
    assert_eq!(guesses, BTreeMap::from([(401, 5), (429, 25)]));
    assert_eq!(app.state.passwords.verifications() - before, 5, "the dummy hash is verified, under the same slots");
    app.stop().await;
}

#[tokio::test]
async fn a_changed_password_stops_working_at_once_despite_the_cache() {
    let app = app().await;
    add_watcher(&app).await;
    let http = from("127.0.0.6");
    assert_eq!(basic_status(&http, &app, "watcher", WATCHER_PASSWORD).await, 200);
    assert_eq!(basic_status(&http, &app, "watcher", WATCHER_PASSWORD).await, 200);
    assert_eq!(app.state.passwords.cache_hits(), 1);
    let id =
        app.admin.list_users().await.expect("users").into_iter().find(|u| u.username == "watcher").expect("watcher").id;
    let res = app
        .http()
        .patch(app.url(&format!("/api/v1/users/{id}")))
        .bearer_auth(&app.admin_token)
        .json(&json!({"password": "a-brand-new-password"}))
        .send()
        .await
        .expect("patch");
    assert_eq!(res.status(), 200);
    assert_eq!(basic_status(&http, &app, "watcher", WATCHER_PASSWORD).await, 401);
    assert_eq!(basic_status(&http, &app, "watcher", "a-brand-new-password").await, 200);
    assert_eq!(app.state.passwords.cache_hits(), 1, "the old entry was dropped, not answered");
    app.stop().await;
}

#[tokio::test]
async fn oversized_or_malformed_usernames_are_refused_before_anything_is_written() {
    let app = app().await;
    let rows_before = app.state.store.list_audit(0, 10_000).await.expect("audit").len();
    let keys_before = app.state.limits.login_keys_held();
    let runs_before = app.state.passwords.verifications();
    let http = from("127.0.0.7");
    let long = "a".repeat(65);
    let huge = "b".repeat(500_000);

    // Basic header (a 65-byte name fits any header limit) and a bad charset.
    for name in [long.as_str(), "bad name", "x\u{0}y"] {
        let res = http.get(app.url("/api/v1/agents")).basic_auth(name, Some("whatever")).send().await.expect("send");
        assert_eq!(res.status(), 400, "{name:?}");
        let body: Value = res.json().await.expect("envelope");
        assert_eq!(body["error"]["key"], "BAD_REQUEST", "{body}");
    }
    // The login route, with a 500 KB name.
    for name in [long.as_str(), huge.as_str()] {
        let body = json!({"username": name, "password": "whatever"});
        let res = http.post(app.url("/api/v1/auth/login")).json(&body).send().await.expect("send");
        assert_eq!(res.status(), 400);
        let body: Value = res.json().await.expect("envelope");
        assert_eq!(body["error"]["key"], "BAD_REQUEST", "{body}");
    }
    // The /device form.
    let form = [("user_code", "BCDF-GHJK"), ("username", huge.as_str()), ("password", "x"), ("action", "approve")];
    let res = http.post(app.url("/device")).form(&form).send().await.expect("send");
    assert_eq!(res.status(), 400);

    assert_eq!(app.state.store.list_audit(0, 10_000).await.expect("audit").len(), rows_before, "no audit row");
    assert_eq!(app.state.limits.login_keys_held(), keys_before, "no limiter key");
    assert_eq!(app.state.passwords.verifications(), runs_before, "no password check");
    app.stop().await;
}

#[tokio::test]
async fn label_filters_follow_the_label_rule() {
    let app = app().await;
    let long_key = "k".repeat(200);
    for filter in [format!("{long_key}=v"), "bad key=v".to_owned(), "=v".to_owned()] {
        let res = app
            .http()
            .get(app.url("/api/v1/agents"))
            .query(&[("label", filter.as_str())])
            .bearer_auth(&app.admin_token)
            .send()
            .await
            .expect("send");
        assert_eq!(res.status(), 400, "{filter}");
        let body: Value = res.json().await.expect("envelope");
        assert_eq!(body["error"]["key"], "BAD_REQUEST", "{body}");
    }
    let res = app
        .http()
        .get(app.url("/api/v1/agents"))
        .query(&[("label", "role=web")])
        .bearer_auth(&app.admin_token)
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn the_metrics_route_shows_the_password_counters_to_admins_only() {
    let app = app().await;
    add_watcher(&app).await;
    let http = from("127.0.0.8");
    let res = http.get(app.url("/api/v1/metrics")).bearer_auth(&app.admin_token).send().await.expect("send");
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["data"]["password_verifications"], app.state.passwords.verifications());
    let res =
        http.get(app.url("/api/v1/metrics")).basic_auth("watcher", Some(WATCHER_PASSWORD)).send().await.expect("send");
    assert_eq!(res.status(), 403);
    app.stop().await;
}
