//! Seed 004, the printer-fleet server (docs/compat.md): an agent registers
//! with an enrollment token, keeps the long-lived key (`tta_…`) it gets and
//! sends everything else with it as Bearer, over raw HTTP with the seed's
//! bodies; the key works on native agent routes, never on operator ones,
//! and dies with its agent.

use std::io::Write;
use std::time::Duration;

use base64::Engine;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tether_proto::Labels;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::common::{TestApp, error_key, spawn_app};

const REGISTER: &str = "/api/v1/agents/register";
const HEARTBEAT: &str = "/api/v1/agents/heartbeat";
const DEVICES: &str = "/api/v1/devices/batch";
const METRICS: &str = "/api/v1/metrics/batch";
const AUDIT: &str = "/api/v1/audit/log";
const LIST: &str = "/api/v1/agents/list";

/// The seed agent's registration: its `[server]` settings plus what it says about itself.
async fn register(app: &TestApp, enroll_token: &str, agent_id: &str) -> reqwest::Response {
    let body = json!({
        "enroll_token": enroll_token,
        "agent_id": agent_id,
        "hostname": "print-srv-01",
        "agent_version": "0.3.0",
        "protocol_version": "1",
        "ip": "10.0.0.5",
        "platform": "windows",
    });
    app.http().post(app.url(REGISTER)).json(&body).send().await.expect("register")
}

/// Registers `agent_id`; returns tether's id for it and its key.
async fn registered(app: &TestApp, agent_id: &str) -> (String, String) {
    let token = app.enroll_token(Labels::new(), 1).await;
    let res = register(app, &token, agent_id).await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.expect("json");
    (body["agent_id"].as_str().expect("agent_id").to_owned(), body["token"].as_str().expect("token").to_owned())
}

/// `POST` of a JSON body with `Authorization: Bearer <token>`, as the seed agent sends every request.
async fn post(app: &TestApp, token: &str, path: &str, body: &Value) -> reqwest::Response {
    app.http().post(app.url(path)).bearer_auth(token).json(body).send().await.expect("post")
}

/// The same, gzip-compressed (`Content-Encoding: gzip`, the seed's compression).
async fn post_gzip(app: &TestApp, token: &str, path: &str, body: &Value) -> reqwest::Response {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(body.to_string().as_bytes()).expect("gzip");
    app.http()
        .post(app.url(path))
        .bearer_auth(token)
        .header("Content-Type", "application/json")
        .header("Content-Encoding", "gzip")
        .body(gz.finish().expect("gzip"))
        .send()
        .await
        .expect("post")
}

async fn get(app: &TestApp, token: &str, path: &str) -> reqwest::Response {
    app.http().get(app.url(path)).bearer_auth(token).send().await.expect("get")
}

/// An operator read that must succeed.
async fn admin_get(app: &TestApp, path: &str) -> Value {
    let res = get(app, &app.admin_token, path).await;
    assert_eq!(res.status(), 200, "{path}");
    res.json().await.expect("json")
}

/// The seed's heartbeat, field for field.
fn seed_heartbeat(agent_id: &str) -> Value {
    json!({
        "agent_id": agent_id,
        "status": "active",
        "uptime_seconds": 86400,
        "devices_count": 25,
        "last_scan": "2025-11-03T18:00:00Z",
        "memory_mb": 120,
        "cpu_percent": 5.2
    })
}

#[tokio::test]
async fn the_seed_agent_registers_reports_with_its_key_and_is_listed() {
    let app = spawn_app().await;
    let enroll = app.enroll_token(Labels::new(), 1).await;
    let res = register(&app, &enroll, "agent-001").await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["cache-control"], "no-store");
    let body: Value = res.json().await.expect("json");
    let id = body["agent_id"].as_str().expect("agent_id").to_owned();
    let key = body["token"].as_str().expect("token").to_owned();
    assert!(key.starts_with("tta_") && key.len() > 40, "{key}");
    // The token was single-use.
    assert_eq!(error_key(register(&app, &enroll, "agent-002").await).await, (401, "UNAUTHENTICATED".to_owned()));

    // Heartbeat with the seed's own field names; its `agent_id` is the one the agent chose.
    let res = post(&app, &key, HEARTBEAT, &seed_heartbeat("agent-001")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.expect("json"), json!({"success": true}));
    let detail = admin_get(&app, &format!("/api/v1/agents/{id}")).await["data"].clone();
    assert_eq!((detail["name"].as_str(), detail["hostname"].as_str()), (Some("agent-001"), Some("print-srv-01")));
    assert_eq!(detail["status"], "online");
    assert_eq!(detail["heartbeat"], seed_heartbeat("agent-001"));
    assert_eq!(detail["facts"]["platform"], "windows");
    // The detail lists the key by id and last four characters, never the secret.
    let keys = detail["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["last4"].as_str(), Some(&key[key.len() - 4..]));
    assert!(keys[0]["id"].is_string() && keys[0]["created_at"].is_string(), "{keys:?}");
    assert!(!detail.to_string().contains(&key[4..]), "the secret never leaves");
    // Lists do not carry keys.
    let native = admin_get(&app, "/api/v1/agents").await;
    assert!(native["data"][0].get("keys").is_none(), "{native}");

    // Devices, gzip-compressed: upserted as inventory of kind `device`, keyed by serial or id.
    let devices = json!({"agent_id": "agent-001", "devices": [
        {"serial": "ABC123", "ip": "10.0.0.100", "manufacturer": "HP", "model": "LaserJet Pro M404n"},
        {"id": 42, "ip": "10.0.0.101", "manufacturer": "Brother"},
    ]});
    let res = post_gzip(&app, &key, DEVICES, &devices).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.expect("json"), json!({"success": true, "received": 2, "stored": 2}));
    let inventory = admin_get(&app, &format!("/api/v1/agents/{id}/inventory?kind=device")).await;
    let keys: Vec<&str> =
        inventory["data"].as_array().expect("data").iter().filter_map(|e| e["key"].as_str()).collect();
    assert_eq!(keys, ["42", "ABC123"]);
    assert_eq!(inventory["data"][1]["attrs"]["model"], "LaserJet Pro M404n");
    // The same device again is an update, not a second one.
    let again = json!({"devices": [{"serial": "ABC123", "ip": "10.0.0.100", "model": "LaserJet Pro M404dn"}]});
    assert_eq!(post(&app, &key, DEVICES, &again).await.status(), 200);
    let inventory = admin_get(&app, &format!("/api/v1/agents/{id}/inventory?kind=device")).await;
    assert_eq!(inventory["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(inventory["data"][1]["attrs"]["model"], "LaserJet Pro M404dn");

    // Metrics: a timestamp of their own, the batch's, or now.
    let now = time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).expect("now");
    let metrics = json!({"agent_id": id, "timestamp": now, "metrics": [
        {"name": "page_count", "value": 12453, "labels": {"serial": "ABC123"}},
        {"name": "toner_black", "value": 45, "timestamp": now, "labels": {"serial": "ABC123"}},
    ]});
    let res = post(&app, &key, METRICS, &metrics).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.expect("json"), json!({"success": true, "received": 2, "stored": 2}));
    let stored = admin_get(&app, &format!("/api/v1/agents/{id}/metrics?name=page_count")).await["data"].clone();
    assert_eq!(stored["series"][0]["labels"], json!({"serial": "ABC123"}));
    assert_eq!(stored["series"][0]["points"][0]["sum"], 12453.0);
    // The same batch again (a retry after a lost answer) stores nothing twice.
    let res = post(&app, &key, METRICS, &metrics).await;
    assert_eq!(res.json::<Value>().await.expect("json"), json!({"success": true, "received": 2, "stored": 0}));

    // The seed's audit event, as an `agent.` row of the audit log.
    let event = json!({
        "agent_id": "agent-001",
        "action": "device_discovered",
        "resource_type": "device",
        "resource_id": "ABC123",
        "details": {"manufacturer": "HP", "model": "LaserJet"}
    });
    let res = post(&app, &key, AUDIT, &event).await;
    assert_eq!(res.status(), 200);
    let rows = admin_get(&app, "/api/v1/audit?action=agent.device_discovered").await["data"].clone();
    assert_eq!(rows.as_array().map(Vec::len), Some(1));
    assert_eq!((rows[0]["actor"].as_str(), rows[0]["actor_kind"].as_str()), (Some(&*id), Some("agent")));
    assert_eq!(rows[0]["target"], "device:ABC123");
    assert_eq!(rows[0]["details"], json!({"manufacturer": "HP", "model": "LaserJet"}));
    let created = admin_get(&app, "/api/v1/audit?action=agent_key.create").await["data"].clone();
    assert_eq!(created[0]["target"].as_str(), Some(&*id));
    assert!(!created.to_string().contains(&key[4..]), "the audit log never holds the secret");

    // The operator's list in the seed's words.
    let list = admin_get(&app, LIST).await;
    let agents = list.as_array().expect("a JSON array");
    assert_eq!(agents.len(), 1);
    let agent = &agents[0];
    assert_eq!((agent["agent_id"].as_str(), agent["name"].as_str()), (Some(&*id), Some("agent-001")));
    assert_eq!((agent["status"].as_str(), agent["version"].as_str()), (Some("active"), Some("0.3.0")));
    assert_eq!((agent["ip"].as_str(), agent["platform"].as_str()), (Some("10.0.0.5"), Some("windows")));
    assert!(agent["last_seen"].is_string() && agent["registered_at"].is_string(), "{agent}");
    assert_eq!(agent["heartbeat"]["devices_count"], 25);

    // The key works on native agent routes…
    let res = post(&app, &key, "/api/v1/agents/self/heartbeat", &json!({"version": "0.3.1"})).await;
    assert_eq!(res.status(), 200);
    let native = json!({"upsert": [{"kind": "toner", "key": "ABC123-black", "attrs": {"level": 45}}]});
    assert_eq!(post(&app, &key, "/api/v1/agents/self/inventory", &native).await.status(), 200);
    // …never on operator routes, native or seed.
    for path in ["/api/v1/agents", LIST, &format!("/api/v1/agents/{id}")] {
        assert_eq!(error_key(get(&app, &key, path).await).await, (401, "UNAUTHENTICATED".to_owned()), "{path}");
    }
    app.stop().await;
}

#[tokio::test]
async fn over_limit_or_bad_batches_are_refused_whole() {
    let app = spawn_app().await;
    let (id, key) = registered(&app, "agent-001").await;
    let device = |i: usize| json!({"serial": format!("SN{i}"), "model": "LaserJet"});
    let too_many: Vec<Value> = (0..1001).map(device).collect();
    let res = post(&app, &key, DEVICES, &json!({"devices": too_many})).await;
    assert_eq!(error_key(res).await, (413, "PAYLOAD_TOO_LARGE".to_owned()));
    // One device without serial or id spoils the batch.
    let mut bad: Vec<Value> = (0..3).map(device).collect();
    bad.push(json!({"model": "no serial"}));
    let res = post(&app, &key, DEVICES, &json!({"devices": bad})).await;
    assert_eq!(error_key(res).await, (400, "BAD_REQUEST".to_owned()));
    assert_eq!(post(&app, &key, DEVICES, &json!({"devices": [7]})).await.status(), 400);
    let inventory = admin_get(&app, &format!("/api/v1/agents/{id}/inventory")).await;
    assert_eq!(inventory["data"], json!([]), "nothing was written");
    // The limit itself is fine.
    let full: Vec<Value> = (0..1000).map(device).collect();
    let res = post(&app, &key, DEVICES, &json!({"devices": full})).await;
    assert_eq!(res.json::<Value>().await.expect("json")["stored"], 1000);

    let metric = |i: usize| json!({"name": "page_count", "value": i, "labels": {"serial": format!("SN{}", i % 10)}});
    let too_many: Vec<Value> = (0..5001).map(metric).collect();
    let res = post_gzip(&app, &key, METRICS, &json!({"metrics": too_many})).await;
    assert_eq!(error_key(res).await, (413, "PAYLOAD_TOO_LARGE".to_owned()));
    for bad in [
        json!({"name": "page count", "value": 1}),
        json!({"name": "page_count", "value": "12"}),
        json!({"name": "page_count", "value": 1, "timestamp": "yesterday"}),
        json!({"name": "page_count", "value": 1, "timestamp": "1970-01-01T00:00:00Z"}),
    ] {
        let res = post(&app, &key, METRICS, &json!({"metrics": [metric(1), bad]})).await;
        assert_eq!(error_key(res).await, (400, "BAD_REQUEST".to_owned()), "{bad}");
    }
    let stored = admin_get(&app, &format!("/api/v1/agents/{id}/metrics?name=page_count")).await;
    assert_eq!(stored["data"]["series"], json!([]), "nothing was written");
    app.stop().await;
}

#[tokio::test]
async fn bad_credentials_and_other_agents_ids_are_refused() {
    let app = spawn_app().await;
    let (_, key) = registered(&app, "agent-001").await;
    let (other_id, _) = registered(&app, "agent-002").await;
    let beat = seed_heartbeat("agent-001");

    // No, wrong or the wrong kind of credential: 401 envelopes.
    let none = app.http().post(app.url(HEARTBEAT)).json(&beat).send().await.expect("post");
    assert_eq!(error_key(none).await, (401, "UNAUTHENTICATED".to_owned()));
    let unknown = format!("tta_{}", "A".repeat(43));
    for token in [unknown.as_str(), "tta_short", app.admin_token.as_str()] {
        assert_eq!(error_key(post(&app, token, HEARTBEAT, &beat).await).await, (401, "UNAUTHENTICATED".to_owned()));
    }
    // The operator list refuses agents and anonymous callers alike.
    let anonymous = app.http().get(app.url(LIST)).send().await.expect("get");
    assert_eq!(error_key(anonymous).await, (401, "UNAUTHENTICATED".to_owned()));

    // Another agent's `agent_id` (its id or its name): 403, nothing said about it.
    for named in [other_id.as_str(), "agent-002", "no-such-agent"] {
        let res = post(&app, &key, HEARTBEAT, &seed_heartbeat(named)).await;
        let status = res.status().as_u16();
        let body = res.text().await.expect("body");
        assert_eq!(status, 403, "{named}: {body}");
        assert!(!body.contains("agent-002") && !body.contains(&other_id), "{body}");
        let event = json!({"agent_id": named, "action": "scan_initiated", "resource_type": "scan", "details": {}});
        assert_eq!(post(&app, &key, AUDIT, &event).await.status(), 403, "{named}");
        let devices = json!({"agent_id": named, "devices": [{"serial": "X"}]});
        assert_eq!(post(&app, &key, DEVICES, &devices).await.status(), 403, "{named}");
    }
    let rows = admin_get(&app, "/api/v1/audit?action=agent.scan_initiated").await;
    assert_eq!(rows["data"], json!([]));

    // Malformed or oversized bodies.
    let res = app
        .http()
        .post(app.url(HEARTBEAT))
        .bearer_auth(&key)
        .header("Content-Type", "application/json")
        .body("{\"agent_id\": ")
        .send()
        .await
        .expect("post");
    assert_eq!(error_key(res).await, (400, "BAD_REQUEST".to_owned()));
    assert_eq!(post(&app, &key, HEARTBEAT, &json!([1, 2])).await.status(), 400);
    let huge = json!({"agent_id": "agent-001", "status": "x".repeat(5000)});
    assert_eq!(error_key(post(&app, &key, HEARTBEAT, &huge).await).await, (413, "PAYLOAD_TOO_LARGE".to_owned()));
    let bad_action = json!({"action": "rm -rf", "resource_type": "device", "resource_id": "1", "details": {}});
    assert_eq!(post(&app, &key, AUDIT, &bad_action).await.status(), 400);
    let res = app.http().post(app.url(HEARTBEAT)).bearer_auth(&key).body("agent_id=1").send().await.expect("post");
    assert_eq!(res.status(), 415);

    // Registration: a bad enrollment token, a malformed name or key, a missing field.
    let enroll = app.enroll_token(Labels::new(), 5).await;
    assert_eq!(error_key(register(&app, "tte_nope", "agent-003").await).await, (401, "UNAUTHENTICATED".to_owned()));
    assert_eq!(register(&app, &enroll, &"a".repeat(300)).await.status(), 400);
    let bad_key = json!({"enroll_token": enroll, "hostname": "h", "public_key": "not a key"});
    assert_eq!(app.http().post(app.url(REGISTER)).json(&bad_key).send().await.expect("post").status(), 400);
    let no_host = json!({"enroll_token": enroll});
    assert_eq!(app.http().post(app.url(REGISTER)).json(&no_host).send().await.expect("post").status(), 400);
    // None of these made an agent.
    assert_eq!(admin_get(&app, LIST).await.as_array().map(Vec::len), Some(2));
    app.stop().await;
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the agent WebSocket with `Authorization: Bearer <key>`.
async fn websocket(app: &TestApp, key: &str) -> Socket {
    let mut req = format!("ws://{}/api/v1/agents/self/ws", app.addr).into_client_request().expect("request");
    req.headers_mut().insert("authorization", format!("Bearer {key}").parse().expect("header"));
    tokio_tungstenite::connect_async(req).await.expect("upgrade").0
}

#[tokio::test]
async fn revoking_or_deleting_the_agent_ends_its_key_at_once_and_the_key_does_not_expire() {
    let app = spawn_app().await;
    let (revoked_id, revoked_key) = registered(&app, "agent-001").await;
    let (deleted_id, deleted_key) = registered(&app, "agent-002").await;
    let mut socket = websocket(&app, &revoked_key).await;
    // A key has no lifetime to run out: the connection is open and answers frames.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let beat = json!({"type": "heartbeat", "id": 7, "body": {"status": "active"}});
    socket.send(Message::Text(beat.to_string().into())).await.expect("send");
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), socket.next()).await.expect("a frame in time");
        match msg.expect("open").expect("frame") {
            Message::Text(text) => {
                let frame: Value = serde_json::from_str(&text).expect("json");
                if frame["type"] == "reply" {
                    assert_eq!((frame["id"].as_u64(), &frame["error"]), (Some(7), &Value::Null), "{frame}");
                    break;
                }
            }
            Message::Close(close) => panic!("closed: {close:?}"),
            _ => {}
        }
    }

    let revoke = app.http().post(app.url(&format!("/api/v1/agents/{revoked_id}/revoke"))).bearer_auth(&app.admin_token);
    assert_eq!(revoke.send().await.expect("revoke").status(), 200);
    let res = post(&app, &revoked_key, HEARTBEAT, &seed_heartbeat("agent-001")).await;
    assert_eq!(error_key(res).await, (403, "DEVICE_REVOKED".to_owned()));
    // The open socket is closed as revoked.
    let closed = loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), socket.next()).await.expect("closed in time");
        if let Some(Ok(Message::Close(close))) = msg {
            break close.expect("a close frame");
        }
    };
    assert_eq!(u16::from(closed.code), tether_proto::ws::close::REVOKED);

    assert_eq!(post(&app, &deleted_key, HEARTBEAT, &seed_heartbeat("agent-002")).await.status(), 200);
    let delete = app.http().delete(app.url(&format!("/api/v1/agents/{deleted_id}"))).bearer_auth(&app.admin_token);
    assert_eq!(delete.send().await.expect("delete").status(), 204);
    let res = post(&app, &deleted_key, HEARTBEAT, &seed_heartbeat("agent-002")).await;
    assert!(matches!(res.status().as_u16(), 401 | 403), "{}", res.status());
    // Gone from the store with its agent: once this server forgets it, the key names no one.
    let keys = app.state.store.find_agent_key(tether_server::auth::secret::hash_token(&deleted_key)).await;
    assert_eq!(keys.expect("find"), None);
    app.stop().await;
}

#[tokio::test]
async fn a_registration_whose_key_cannot_be_stored_leaves_no_agent() {
    let app = spawn_app().await;
    let db = format!("sqlite://{}", app.dir.path().join("tether.db").display());
    let pool = sqlx::SqlitePool::connect(&db).await.expect("connect");
    sqlx::raw_sql("CREATE TRIGGER no_keys BEFORE INSERT ON agent_keys BEGIN SELECT RAISE(ABORT, 'no keys'); END")
        .execute(&pool)
        .await
        .expect("trigger");
    pool.close().await;
    let enroll = app.enroll_token(Labels::new(), 5).await;
    let res = register(&app, &enroll, "agent-001").await;
    assert!(res.status().is_server_error(), "{}", res.status());
    assert_eq!(admin_get(&app, LIST).await, json!([]), "the enrolled agent was deleted again");
    let rows = admin_get(&app, "/api/v1/audit?action=agent.delete").await["data"].clone();
    assert_eq!(rows[0]["details"]["reason"], "registration failed before the agent's key was stored");
    app.stop().await;
}

#[tokio::test]
async fn an_agent_key_is_held_to_request_signing_as_access_tokens_are() {
    let app = crate::common::spawn_app_with(|c| c.require_signed_requests = true).await;
    let signing_key = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let public_key = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signing_key.verifying_key().as_bytes());
    let enroll_token = app.enroll_token(Labels::new(), 1).await;
    let body = json!({"enroll_token": enroll_token, "hostname": "print-srv-01", "public_key": public_key});
    let res = app.http().post(app.url(REGISTER)).json(&body).send().await.expect("register");
    assert_eq!(res.status(), 200, "registration is public, never signed");
    let key = res.json::<Value>().await.expect("json")["token"].as_str().expect("token").to_owned();

    let beat = seed_heartbeat("print-srv-01");
    let unsigned = post(&app, &key, HEARTBEAT, &beat).await;
    assert_eq!(error_key(unsigned).await, (401, "UNAUTHENTICATED".to_owned()));
    let mut signed = app.http().post(app.url(HEARTBEAT)).bearer_auth(&key).json(&beat).build().expect("request");
    tether_client::signing::sign_request(&signing_key, &mut signed);
    let replay = signed.try_clone().expect("clone");
    assert_eq!(app.http().execute(signed).await.expect("send").status(), 200);
    let replayed = app.http().execute(replay).await.expect("send");
    assert_eq!(error_key(replayed).await, (401, "UNAUTHENTICATED".to_owned()), "a nonce is single-use");
    // A body other than the one signed does not verify.
    let mut tampered = app.http().post(app.url(HEARTBEAT)).bearer_auth(&key).json(&beat).build().expect("request");
    tether_client::signing::sign_request(&signing_key, &mut tampered);
    *tampered.body_mut() = Some(seed_heartbeat("print-srv-02").to_string().into());
    assert_eq!(error_key(app.http().execute(tampered).await.expect("send")).await, (401, "UNAUTHENTICATED".to_owned()));
    app.stop().await;
}

#[tokio::test]
async fn without_seed_routes_the_seed_004_routes_are_not_found() {
    let app = crate::common::spawn_app_with(|c| c.seed_routes = false).await;
    let enroll = app.enroll_token(Labels::new(), 1).await;
    assert_eq!(register(&app, &enroll, "agent-001").await.status(), 404);
    let (_, pair) = app.agent(&[]).await;
    for path in [HEARTBEAT, DEVICES, METRICS, AUDIT] {
        assert_eq!(post(&app, &pair.access_token, path, &json!({})).await.status(), 404, "{path}");
    }
    assert_eq!(get(&app, &app.admin_token, LIST).await.status(), 404);
    app.stop().await;
}
