//! Seed 003, the certificate agent: `GET /apiv1/devices/self/updates` with
//! the cursor contract and `install.updated` signals, the install-config
//! fetch those signals lead to, and `POST /auth/token/refresh`.

use std::time::Duration;

use base64::Engine;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tether_proto::config::{PutConfig, Scope};
use tether_proto::{AgentId, Cursor, ErrorKey};

use crate::common::{TestApp, spawn_app, spawn_app_with, until_parked};

/// A poll as the seed shows it: `?cursor=…&limit=20&wait=…`, or the
/// cursor as `If-None-Match` when `in_header`.
async fn poll(app: &TestApp, token: &str, cursor: Option<&str>, wait: u32, in_header: bool) -> reqwest::Response {
    let mut req = app
        .http()
        .get(app.url("/apiv1/devices/self/updates"))
        .bearer_auth(token)
        .header("User-Agent", "cert-ctrl/1.0")
        .query(&[("limit", "20".to_owned()), ("wait", wait.to_string())]);
    match cursor {
        Some(c) if in_header => req = req.header("If-None-Match", c),
        Some(c) => req = req.query(&[("cursor", c)]),
        None => {}
    }
    req.send().await.expect("poll")
}

/// The bare `ETag` of a poll answer, which the seed's agent persists.
fn etag(res: &reqwest::Response) -> String {
    let tag = res.headers()["etag"].to_str().expect("ascii").to_owned();
    tag.parse::<Cursor>().unwrap_or_else(|_| panic!("ETag {tag} is a bare cursor"));
    tag
}

fn install_config_path(user_id: AgentId, device_id: AgentId) -> String {
    format!("/apiv1/users/{user_id}/devices/{device_id}/install-config")
}

async fn error_of(res: reqwest::Response) -> (StatusCode, Value) {
    let status = res.status();
    let body: Value = res.json().await.expect("error envelope");
    (status, body["error"].clone())
}

fn global(doc: Value) -> PutConfig {
    PutConfig { doc: serde_json::from_value(doc).expect("object"), comment: String::new() }
}

#[tokio::test]
async fn updates_follow_the_cursor_contract_with_install_updated() {
    let app = spawn_app().await;
    let (_, pair) = app.agent(&[]).await;
    let token = pair.access_token.as_str();

    // A new device's stream is empty: 204, no body, the cursor as ETag.
    let first = poll(&app, token, None, 0, false).await;
    assert_eq!(first.status(), StatusCode::NO_CONTENT);
    assert_eq!(first.headers()["cache-control"], "no-store");
    let cursor = etag(&first);
    assert!(first.bytes().await.expect("body").is_empty());
    for in_header in [true, false] {
        let again = poll(&app, token, Some(&cursor), 0, in_header).await;
        assert_eq!((again.status(), etag(&again)), (StatusCode::NO_CONTENT, cursor.clone()));
    }

    // A configuration change wakes a parked long-poll with install.updated.
    let waiting = {
        let (http, url, token, cursor) =
            (app.http(), app.url("/apiv1/devices/self/updates?wait=30"), token.to_owned(), cursor.clone());
        tokio::spawn(async move {
            http.get(url).bearer_auth(token).header("If-None-Match", cursor).send().await.expect("poll")
        })
    };
    until_parked(&app.state, 1).await;
    let written = app.admin.put_config(&Scope::Global, &global(json!({"installs": [{"id": "nginx"}]})), None).await;
    assert_eq!(written.expect("write").version, 1);
    let res = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("woken").expect("join");
    assert_eq!(res.status(), StatusCode::OK);
    let next = etag(&res);
    assert_eq!(res.headers()["cache-control"], "no-store");
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["data"]["cursor"], next.as_str());
    let signals = body["data"]["signals"].as_array().expect("signals");
    assert_eq!(signals.len(), 1);
    assert_eq!(signals[0]["type"], "install.updated");
    assert!(signals[0]["ts_ms"].as_i64().expect("ts_ms") > 0);
    let reference = &signals[0]["ref"];
    assert_eq!((reference["config_id"].clone(), reference["version"].clone()), (json!("global"), json!(1)));
    // installs_hash_b64 is the native hash's bytes in base64.
    let native = app.admin.agent_config(pair.agent_id).await.expect("native view");
    let bytes = hex::decode(&native.hash).expect("hex");
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    assert_eq!(reference, &json!({"config_id": "global", "version": 1, "installs_hash_b64": b64}));

    // The agent then fetches the install config, which carries the same hash.
    let path = install_config_path(pair.agent_id, pair.agent_id);
    let res = app.http().get(app.url(&path)).bearer_auth(token).send().await.expect("install config");
    assert_eq!(res.status(), StatusCode::OK);
    let tag = res.headers()["etag"].to_str().expect("ascii").to_owned();
    let config: Value = res.json().await.expect("json");
    assert_eq!(config["data"]["installs"], json!({"installs": [{"id": "nginx"}]}));
    assert_eq!(config["data"]["installs_hash_b64"], b64.as_str());
    assert_eq!(config["data"]["hash"], native.hash.as_str());
    let res = app.http().get(app.url(&path)).bearer_auth(token).header("If-None-Match", tag).send().await;
    assert_eq!(res.expect("conditional").status(), StatusCode::NOT_MODIFIED);

    // From the new cursor the stream is idle again; replaying the old one
    // gets the same signal (delivery is at least once).
    let idle = poll(&app, token, Some(&next), 0, false).await;
    assert_eq!((idle.status(), etag(&idle)), (StatusCode::NO_CONTENT, next.clone()));
    let replay = poll(&app, token, Some(&cursor), 0, true).await;
    assert_eq!(replay.status(), StatusCode::OK);
    assert_eq!(replay.json::<Value>().await.expect("json")["data"]["signals"][0]["type"], "install.updated");

    // Signals of other kinds pass as they are.
    let cmd = tether_proto::command::CreateCommand::new(tether_proto::command::Target::agents([pair.agent_id]), "ping");
    app.admin.create_command(&cmd).await.expect("command");
    let res = poll(&app, token, Some(&next), 0, true).await;
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["data"]["signals"][0]["type"], "command.queued");

    // A cursor the stream never reached, or of another epoch: 409 as the seed shows it.
    let c: Cursor = next.parse().expect("cursor");
    for bad in [Cursor { seq: c.seq + 100, ..c }, Cursor { epoch: c.epoch + 1, ..c }] {
        let (status, error) = error_of(poll(&app, token, Some(&bad.to_string()), 0, true).await).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!((error["code"].clone(), error["key"].clone()), (json!(40901), json!("CURSOR_EXPIRED")));
    }
    app.stop().await;
}

#[tokio::test]
async fn refresh_in_the_seed_form() {
    let app = spawn_app().await;
    let (_, pair) = app.agent(&[]).await;
    let refresh = |body: Value| app.http().post(app.url("/auth/token/refresh")).json(&body).send();
    let res = refresh(json!({"refresh_token": pair.refresh_token, "device_public_id": pair.agent_id}))
        .await
        .expect("refresh");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["cache-control"], "no-store");
    let body: Value = res.json().await.expect("json");
    let data = &body["data"];
    assert_eq!((data["expires_in"].clone(), data["token_type"].clone()), (json!(900), json!("Bearer")));
    let access = data["access_token"].as_str().expect("access_token");
    let kept = data["refresh_token"].as_str().expect("the refresh token to present next");
    assert_eq!(kept, pair.refresh_token, "the seed's refresh does not rotate");
    // The new access token polls; the same refresh token refreshes again.
    assert_eq!(poll(&app, access, None, 0, false).await.status(), StatusCode::NO_CONTENT);
    let res = refresh(json!({"refresh_token": kept, "device_public_id": pair.agent_id})).await.expect("again");
    assert_eq!(res.status(), StatusCode::OK);

    // Another device's id, an unknown token: 401; malformed bodies: 400.
    let (_, other) = app.agent(&[]).await;
    let unauthenticated = (StatusCode::UNAUTHORIZED, json!("UNAUTHENTICATED"));
    for body in [
        json!({"refresh_token": other.refresh_token, "device_public_id": pair.agent_id}),
        json!({"refresh_token": "rt_271f3eca9daa6b1a317a89cac16d38b0.OEftln9mNb7H", "device_public_id": pair.agent_id}),
    ] {
        let (status, error) = error_of(refresh(body).await.expect("send")).await;
        assert_eq!((status, error["key"].clone()), unauthenticated);
    }
    for body in [
        json!({"refresh_token": other.refresh_token}),
        json!({"refresh_token": other.refresh_token, "device_public_id": "23229bf7-5172-02c7"}),
        json!({"refresh_token": other.refresh_token, "device_public_id": other.agent_id, "extra": 1}),
        json!([]),
    ] {
        let (status, error) = error_of(refresh(body.clone()).await.expect("send")).await;
        assert_eq!((status, error["key"].clone()), (StatusCode::BAD_REQUEST, json!("BAD_REQUEST")), "{body}");
    }
    let huge = json!({"refresh_token": "x".repeat(2 * 1024 * 1024), "device_public_id": other.agent_id});
    let (status, _) = error_of(refresh(huge).await.expect("send")).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    // The other device's token was never used up by those.
    let res = refresh(json!({"refresh_token": other.refresh_token, "device_public_id": other.agent_id})).await;
    assert_eq!(res.expect("send").status(), StatusCode::OK);
    app.stop().await;
}

/// `POST /auth/token/refresh` as the seed's agent sends it.
async fn seed_refresh(app: &TestApp, refresh_token: &str, agent_id: AgentId) -> reqwest::Response {
    let body = json!({"refresh_token": refresh_token, "device_public_id": agent_id});
    app.http().post(app.url("/auth/token/refresh")).json(&body).send().await.expect("refresh")
}

/// The access token of a successful seed refresh, checking that the
/// refresh token it names for next time is still the one presented.
async fn seed_access_token(app: &TestApp, refresh_token: &str, agent_id: AgentId) -> String {
    let res = seed_refresh(app, refresh_token, agent_id).await;
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["data"]["refresh_token"], refresh_token, "not rotated");
    body["data"]["access_token"].as_str().expect("access_token").to_owned()
}

/// The seed's agent stores its refresh token once ("NOT rotated"): every
/// refresh with it works, each access token polls, and the per-family
/// bucket still counts those refreshes.
#[tokio::test]
async fn the_seed_refresh_keeps_the_refresh_token_and_every_access_token_works() {
    let app = spawn_app().await;
    let (_, pair) = app.agent(&[]).await;
    let mut issued = Vec::new();
    for _ in 0..3 {
        issued.push(seed_access_token(&app, &pair.refresh_token, pair.agent_id).await);
    }
    issued.dedup();
    assert_eq!(issued.len(), 3, "three distinct access tokens");
    for access in &issued {
        assert_eq!(poll(&app, access, None, 0, false).await.status(), StatusCode::NO_CONTENT);
    }
    let rows = app.state.store.list_audit(0, 100).await.expect("audit");
    assert!(rows.iter().all(|r| r.action != "token.refresh_reuse"), "using the same token again is not reuse here");

    // The family's bucket (burst 5) is the native one: a loop is 429.
    let mut limited = None;
    for _ in 0..10 {
        let res = seed_refresh(&app, &pair.refresh_token, pair.agent_id).await;
        if res.status() == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(res);
            break;
        }
        assert_eq!(res.status(), StatusCode::OK);
    }
    let limited = limited.expect("the refresh loop is limited");
    assert!(limited.headers().contains_key("retry-after"));
    let (_, error) = error_of(limited).await;
    assert_eq!(error["key"], "RATE_LIMITED");
    app.stop().await;
}

#[tokio::test]
async fn a_revoked_agents_refresh_token_is_refused_on_the_seed_route() {
    let app = spawn_app().await;
    let (_, pair) = app.agent(&[]).await;
    let access = seed_access_token(&app, &pair.refresh_token, pair.agent_id).await;
    app.admin.revoke_agent(pair.agent_id, "decommissioned").await.expect("revoke");
    let (status, error) = error_of(seed_refresh(&app, &pair.refresh_token, pair.agent_id).await).await;
    assert_eq!((status, error["key"].clone()), (StatusCode::FORBIDDEN, json!("DEVICE_REVOKED")));
    let (status, error) = error_of(poll(&app, &access, None, 0, false).await).await;
    assert_eq!((status, error["key"].clone()), (StatusCode::FORBIDDEN, json!("DEVICE_REVOKED")));
    app.stop().await;
}

/// The native route still rotates, also a token the seed route kept; the
/// token it rotated is then used, and presenting it again is reuse on
/// either route: the family dies with every access token issued from it,
/// the seed route's included.
#[tokio::test]
async fn the_native_refresh_still_rotates_and_a_rotated_token_is_reuse_on_either_route() {
    let app = spawn_app().await;
    let anon = app.anon();
    for seed_route_replays in [false, true] {
        let (_, pair) = app.agent(&[]).await;
        let seed_access = seed_access_token(&app, &pair.refresh_token, pair.agent_id).await;
        let second = anon.refresh(&pair.refresh_token, pair.agent_id).await.expect("native rotation");
        assert_ne!(second.refresh_token, pair.refresh_token);
        // The successor is used, so no lost-response grace covers the first token.
        let third = anon.refresh(&second.refresh_token, pair.agent_id).await.expect("native rotation");
        if seed_route_replays {
            let (status, error) = error_of(seed_refresh(&app, &pair.refresh_token, pair.agent_id).await).await;
            assert_eq!((status, error["key"].clone()), (StatusCode::UNAUTHORIZED, json!("UNAUTHENTICATED")));
        } else {
            let err = anon.refresh(&pair.refresh_token, pair.agent_id).await.expect_err("reuse");
            assert_eq!(err.key(), Some(ErrorKey::Unauthenticated));
        }
        let (status, error) = error_of(seed_refresh(&app, &third.refresh_token, pair.agent_id).await).await;
        assert_eq!((status, error["key"].clone()), (StatusCode::UNAUTHORIZED, json!("UNAUTHENTICATED")));
        for access in [&seed_access, &second.access_token, &third.access_token] {
            let (status, _) = error_of(poll(&app, access, None, 0, false).await).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "an access token of the revoked family");
        }
        let rows = app.state.store.list_audit(0, 100).await.expect("audit");
        let target = pair.agent_id.to_string();
        assert!(rows.iter().any(|r| r.action == "token.refresh_reuse" && r.target == target), "{seed_route_replays}");
    }
    app.stop().await;
}

#[tokio::test]
async fn install_config_is_the_callers_own_only() {
    let app = spawn_app().await;
    let (_, me) = app.agent(&[("team", "a")]).await;
    let (_, other) = app.agent(&[("team", "b")]).await;
    app.admin
        .put_config(&Scope::Agent(other.agent_id), &global(json!({"secret": "theirs"})), None)
        .await
        .expect("write");
    let get = |path: String, token: &str| app.http().get(app.url(&path)).bearer_auth(token).send();
    // Another device, or my device under another user id: 404, nothing of theirs.
    for path in [
        install_config_path(other.agent_id, other.agent_id),
        install_config_path(me.agent_id, other.agent_id),
        install_config_path(other.agent_id, me.agent_id),
        install_config_path(AgentId::new(), AgentId::new()),
    ] {
        let res = get(path.clone(), &me.access_token).await.expect("send");
        assert!(res.headers().get("etag").is_none(), "{path}");
        let text = res.text().await.expect("text");
        let error: Value = serde_json::from_str(&text).expect("envelope");
        assert_eq!(error["error"]["key"], "NOT_FOUND", "{path}");
        assert!(!text.contains("theirs"), "{text}");
    }
    let res = get(install_config_path(me.agent_id, me.agent_id), &me.access_token).await.expect("own");
    assert_eq!(res.json::<Value>().await.expect("json")["data"]["installs"], json!({}));
    // A malformed id is 400; no credentials, or an operator's, 401.
    let res = get("/apiv1/users/14/devices/23229bf7/install-config".to_owned(), &me.access_token).await;
    assert_eq!(error_of(res.expect("send")).await.1["key"], "BAD_REQUEST");
    let own = install_config_path(me.agent_id, me.agent_id);
    let res = app.http().get(app.url(&own)).send().await.expect("send");
    assert_eq!(error_of(res).await.0, StatusCode::UNAUTHORIZED);
    let res = get(own.clone(), &app.admin_token).await.expect("send");
    assert_eq!(error_of(res).await.0, StatusCode::UNAUTHORIZED);
    let res = app.http().get(app.url(&own)).basic_auth("admin", Some(crate::common::ADMIN_PASSWORD)).send().await;
    assert_eq!(error_of(res.expect("send")).await.0, StatusCode::UNAUTHORIZED);
    app.stop().await;
}

#[tokio::test]
async fn bad_polls_are_refused_in_the_envelope() {
    let app = spawn_app().await;
    let (_, pair) = app.agent(&[]).await;
    let token = pair.access_token.as_str();
    // Out-of-range limit or wait, a cursor that is no cursor: 400.
    for query in ["limit=0", "limit=101", "wait=31", "cursor=garbage", "wait=-1"] {
        let url = app.url(&format!("/apiv1/devices/self/updates?{query}"));
        let (status, error) = error_of(app.http().get(url).bearer_auth(token).send().await.expect("send")).await;
        assert_eq!((status, error["key"].clone()), (StatusCode::BAD_REQUEST, json!("BAD_REQUEST")), "{query}");
    }
    // No credentials, an operator's token or password, a refresh token: 401.
    let url = app.url("/apiv1/devices/self/updates");
    let tries = [
        app.http().get(&url),
        app.http().get(&url).bearer_auth(&app.admin_token),
        app.http().get(&url).basic_auth("admin", Some(crate::common::ADMIN_PASSWORD)),
        app.http().get(&url).bearer_auth(&pair.refresh_token),
    ];
    for req in tries {
        let (status, error) = error_of(req.send().await.expect("send")).await;
        assert_eq!((status, error["code"].clone()), (StatusCode::UNAUTHORIZED, json!(4010)));
    }
    // A revoked device: 403 DEVICE_REVOKED with when and why.
    app.admin.revoke_agent(pair.agent_id, "Compromised device").await.expect("revoke");
    let (status, error) = error_of(poll(&app, token, None, 0, false).await).await;
    assert_eq!((status, error["key"].clone()), (StatusCode::FORBIDDEN, json!("DEVICE_REVOKED")));
    assert_eq!(error["params"]["reason"], "Compromised device");
    app.stop().await;
}

#[tokio::test]
async fn polls_are_limited_by_the_poll_bucket_not_the_agent_bucket() {
    let app = spawn_app_with(|c| {
        c.limits.agent_per_s = 1;
        c.limits.agent_burst = 1;
        c.limits.poll_per_s = 1;
        c.limits.poll_burst = 3;
    })
    .await;
    let (_, pair) = app.agent(&[]).await;
    let token = pair.access_token.as_str();
    // Three immediate polls fit the poll bucket although the agent bucket holds one.
    for _ in 0..3 {
        assert_eq!(poll(&app, token, None, 0, false).await.status(), StatusCode::NO_CONTENT);
    }
    let (status, error) = error_of(poll(&app, token, None, 0, false).await).await;
    assert_eq!((status, error["key"].clone()), (StatusCode::TOO_MANY_REQUESTS, json!("RATE_LIMITED")));
    // Other agent routes are charged to the agent bucket.
    let path = install_config_path(pair.agent_id, pair.agent_id);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(app.http().get(app.url(&path)).bearer_auth(token).send().await.expect("send").status());
    }
    assert!(statuses.contains(&StatusCode::TOO_MANY_REQUESTS), "{statuses:?}");
    app.stop().await;
}

#[tokio::test]
async fn the_routes_are_gone_without_seed_routes() {
    let app = spawn_app_with(|c| c.seed_routes = false).await;
    let (_, pair) = app.agent(&[]).await;
    let (status, _) = error_of(poll(&app, &pair.access_token, None, 0, false).await).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let res = app
        .http()
        .post(app.url("/auth/token/refresh"))
        .json(&json!({"refresh_token": pair.refresh_token, "device_public_id": pair.agent_id}))
        .send()
        .await
        .expect("send");
    assert_eq!(error_of(res).await.0, StatusCode::NOT_FOUND);
    app.stop().await;
}
