//! Telemetry over HTTP (protocol.md §8): metric batches stored whole or
//! not at all and once per batch id, inventory, heartbeats committed in
//! groups, presence transitions told to a webhook once each, and agents
//! deleted with their data.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tether_proto::AgentId;
use tether_proto::agent::AgentStatus;
use tether_proto::telemetry::MAX_METRIC_POINTS;

use crate::common::{TestApp, spawn_app, spawn_app_with};

fn points(n: usize, name: &str, ts_ms: i64) -> Vec<Value> {
    (0..n).map(|i| json!({"name": name, "ts_ms": ts_ms + i as i64, "value": i as f64})).collect()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("ok").as_millis() as i64
}

async fn post(app: &TestApp, token: &str, path: &str, body: &Value) -> (u16, Value) {
    let res = app.http().post(app.url(path)).bearer_auth(token).json(body).send().await.expect("send");
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn get(app: &TestApp, path: &str) -> (u16, Value) {
    let res = app.http().get(app.url(path)).bearer_auth(&app.admin_token).send().await.expect("send");
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// Every point stored under `name` for the agent, over the last day.
async fn stored_points(app: &TestApp, agent: AgentId, name: &str) -> usize {
    let from = now_ms() - 86_400_000;
    let (status, body) = get(app, &format!("/api/v1/agents/{agent}/metrics?name={name}&from={from}")).await;
    assert_eq!(status, 200, "{body}");
    body["data"]["series"]
        .as_array()
        .expect("an array")
        .iter()
        .map(|s| s["points"].as_array().expect("an array").len())
        .sum()
}

async fn agent(app: &TestApp) -> (AgentId, String) {
    let (_, pair) = app.agent(&[("site", "a")]).await;
    (pair.agent_id, pair.access_token)
}

#[tokio::test]
async fn metric_batches_are_stored_whole_once_or_not_at_all() {
    let app = spawn_app().await;
    let (id, token) = agent(&app).await;
    let now = now_ms() - 60_000;

    // One point over the limit: 413 and nothing stored.
    let big = json!({"batch_id": "b-big", "points": points(MAX_METRIC_POINTS + 1, "cpu", now)});
    let (status, body) = post(&app, &token, "/api/v1/agents/self/metrics", &big).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["key"], "PAYLOAD_TOO_LARGE");
    assert_eq!(body["error"]["params"]["limit"], MAX_METRIC_POINTS);
    assert_eq!(stored_points(&app, id, "cpu").await, 0);

    // The same batch id twice: stored once.
    let batch = json!({"batch_id": "b-1", "points": points(100, "cpu", now)});
    let (status, body) = post(&app, &token, "/api/v1/agents/self/metrics", &batch).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"], json!({"stored": 100, "duplicate": false}));
    let (status, body) = post(&app, &token, "/api/v1/agents/self/metrics", &batch).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"], json!({"stored": 0, "duplicate": true}));
    assert_eq!(stored_points(&app, id, "cpu").await, 100);

    // Bad values refuse the whole batch, naming the field.
    let mut bad = points(10, "mem", now);
    bad[7]["value"] = json!("high");
    let (status, body) =
        post(&app, &token, "/api/v1/agents/self/metrics", &json!({"batch_id": "b-2", "points": bad})).await;
    assert_eq!((status, body["error"]["key"].as_str()), (400, Some("BAD_REQUEST")), "{body}");
    let future = points(3, "mem", now_ms() + 3_600_000);
    let (status, body) =
        post(&app, &token, "/api/v1/agents/self/metrics", &json!({"batch_id": "b-3", "points": future})).await;
    assert_eq!((status, body["error"]["params"]["field"].as_str()), (400, Some("ts_ms")), "{body}");
    assert_eq!(stored_points(&app, id, "mem").await, 0);

    // Operators only; the agent route is the agent's only.
    let res = app.http().post(app.url("/api/v1/agents/self/metrics")).bearer_auth(&app.admin_token).json(&batch);
    assert_eq!(res.send().await.expect("send").status(), 401);
}

#[tokio::test]
async fn gzip_bodies_are_accepted_and_a_gzip_bomb_is_refused() {
    let app = spawn_app().await;
    let (id, token) = agent(&app).await;
    let gzip = |bytes: &[u8]| {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(bytes).expect("ok");
        enc.finish().expect("ok")
    };
    let send = |body: Vec<u8>| {
        app.http()
            .post(app.url("/api/v1/agents/self/metrics"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(body)
            .send()
    };
    let batch = json!({"batch_id": "gz-1", "points": points(MAX_METRIC_POINTS, "load1", now_ms() - 600_000)});
    let res = send(gzip(batch.to_string().as_bytes())).await.expect("call");
    assert_eq!(res.status(), 200);
    assert_eq!(stored_points(&app, id, "load1").await, MAX_METRIC_POINTS);

    // 64 MiB of spaces squeezed into ~64 KiB: refused at the cap, never inflated whole.
    let mut bomb = b"{\"batch_id\":\"gz-2\",\"points\":[".to_vec();
    bomb.extend(std::iter::repeat_n(b' ', 64 * 1024 * 1024));
    bomb.extend(b"]}");
    let compressed = gzip(&bomb);
    assert!(compressed.len() < 1024 * 1024);
    let res = send(compressed).await.expect("call");
    assert_eq!(res.status(), 413);
    let body: Value = res.json().await.expect("json body");
    assert_eq!(body["error"]["key"], "PAYLOAD_TOO_LARGE");
}

#[tokio::test]
async fn a_batch_creating_series_over_the_cap_stores_nothing() {
    let app = spawn_app_with(|c| c.telemetry.max_series_per_agent = 5).await;
    let (id, token) = agent(&app).await;
    let now = now_ms() - 60_000;
    let pts: Vec<Value> = (0..6)
        .map(|i| json!({"name": "disk", "ts_ms": now, "value": 1.0, "labels": {"mount": format!("/m{i}")}}))
        .collect();
    let (status, body) =
        post(&app, &token, "/api/v1/agents/self/metrics", &json!({"batch_id": "s", "points": pts})).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(stored_points(&app, id, "disk").await, 0);
    let (status, _) =
        post(&app, &token, "/api/v1/agents/self/metrics", &json!({"batch_id": "s2", "points": pts[..5]})).await;
    assert_eq!(status, 200);
    assert_eq!(stored_points(&app, id, "disk").await, 5);
}

#[tokio::test]
async fn metric_queries_pick_raw_points_or_rollups_by_range() {
    let app = spawn_app().await;
    let (id, token) = agent(&app).await;
    let hour = 3_600_000;
    let base = now_ms() - 3 * 86_400_000;
    let pts: Vec<Value> =
        (0..72).map(|h| json!({"name": "temp", "ts_ms": base + h * hour, "value": h as f64})).collect();
    let (status, _) = post(&app, &token, "/api/v1/agents/self/metrics", &json!({"batch_id": "q", "points": pts})).await;
    assert_eq!(status, 200);
    let path = |from: i64, to: i64| format!("/api/v1/agents/{id}/metrics?name=temp&from={from}&to={to}");
    let (_, body) = get(&app, &path(base, base + 10 * hour)).await;
    assert_eq!(body["data"]["resolution"], "raw");
    assert_eq!(body["data"]["series"][0]["points"].as_array().expect("an array").len(), 10);
    let (_, body) = get(&app, &path(base, base + 72 * hour + 86_400_000)).await;
    assert_eq!(body["data"]["resolution"], "hour", "{body}");
    assert_eq!(body["data"]["series"][0]["points"].as_array().expect("an array").len(), 72);
    let (_, body) = get(&app, &path(base - 100 * 86_400_000, now_ms())).await;
    assert_eq!(body["data"]["resolution"], "day");
    let days = body["data"]["series"][0]["points"].as_array().expect("an array");
    assert_eq!(days.iter().map(|p| p["count"].as_u64().expect("a number")).sum::<u64>(), 72);
    // Bad questions are 400s; an unknown agent is 404.
    assert_eq!(get(&app, &format!("/api/v1/agents/{id}/metrics")).await.0, 400);
    assert_eq!(get(&app, &format!("/api/v1/agents/{id}/metrics?name=temp&from=yesterday")).await.0, 400);
    assert_eq!(get(&app, &format!("/api/v1/agents/{id}/metrics?name=temp&from=10&to=5")).await.0, 400);
    assert_eq!(get(&app, &format!("/api/v1/agents/{id}/metrics?name=temp&to=-9223372036854775808")).await.0, 400);
    assert_eq!(
        get(&app, &format!("/api/v1/agents/{id}/metrics?name=temp&from=-5&to=9223372036854775807")).await.0,
        400
    );
    assert_eq!(get(&app, &format!("/api/v1/agents/{}/metrics?name=temp", AgentId::new())).await.0, 404);
}

#[tokio::test]
async fn inventory_is_upserted_removed_replaced_and_paged() {
    let app = spawn_app().await;
    let (id, token) = agent(&app).await;
    let printer = |k: &str| json!({"kind": "printer", "key": k, "attrs": {"model": "HP", "ip": "10.0.0.9"}});
    let upsert: Vec<Value> = (0..5).map(|i| printer(&format!("SN{i}"))).collect();
    let (status, body) = post(&app, &token, "/api/v1/agents/self/inventory", &json!({"upsert": upsert})).await;
    assert_eq!(status, 200, "{body}");
    let remove = json!({"remove": [{"kind": "printer", "key": "SN0"}, {"kind": "printer", "key": "absent"}]});
    assert_eq!(post(&app, &token, "/api/v1/agents/self/inventory", &remove).await.0, 200);
    let (_, first) = get(&app, &format!("/api/v1/agents/{id}/inventory?limit=2")).await;
    let keys: Vec<&str> =
        first["data"].as_array().expect("an array").iter().map(|e| e["key"].as_str().expect("a string")).collect();
    assert_eq!(keys, ["SN1", "SN2"]);
    let cursor = first["next_cursor"].as_str().expect("a string");
    let (_, rest) = get(&app, &format!("/api/v1/agents/{id}/inventory?limit=10&cursor={cursor}")).await;
    let keys: Vec<&str> =
        rest["data"].as_array().expect("an array").iter().map(|e| e["key"].as_str().expect("a string")).collect();
    assert_eq!(keys, ["SN3", "SN4"]);
    assert_eq!(rest["data"][0]["attrs"]["model"], "HP");

    // Replace whole; over the limit is 413 with nothing changed.
    let res = app
        .http()
        .put(app.url("/api/v1/agents/self/inventory"))
        .bearer_auth(&token)
        .json(&json!({"items": [printer("NEW")]}))
        .send()
        .await
        .expect("ok");
    assert_eq!(res.status(), 200);
    let too_many: Vec<Value> = (0..1001).map(|i| printer(&format!("X{i}"))).collect();
    let (status, _) = post(&app, &token, "/api/v1/agents/self/inventory", &json!({"upsert": too_many})).await;
    assert_eq!(status, 413);
    let (_, all) = get(&app, &format!("/api/v1/agents/{id}/inventory")).await;
    assert_eq!(all["data"].as_array().expect("an array").len(), 1);
    assert_eq!(all["data"][0]["key"], "NEW");
    let (status, body) =
        post(&app, &token, "/api/v1/agents/self/inventory", &json!({"upsert": [{"kind": "", "key": "k"}]})).await;
    assert_eq!((status, body["error"]["params"]["field"].as_str()), (400, Some("kind")));
    assert_eq!(get(&app, &format!("/api/v1/agents/{id}/inventory?cursor=%%%")).await.0, 400);
}

#[tokio::test]
async fn concurrent_heartbeats_are_all_committed() {
    let app = spawn_app().await;
    let mut agents = Vec::new();
    for _ in 0..20 {
        agents.push(agent(&app).await);
    }
    let beats = agents.iter().map(|(_, token)| {
        let http = app.http();
        let url = app.url("/api/v1/agents/self/heartbeat");
        let token = token.clone();
        async move {
            let body = json!({"uptime_s": 5, "version": "9.9.9", "running_commands": 0, "queue_depth": 0,
                              "cpu_percent": 12.5, "devices_count": 3});
            http.post(url).bearer_auth(token).json(&body).send().await.expect("send").status()
        }
    });
    for status in futures::future::join_all(beats).await {
        assert_eq!(status, 200);
    }
    // A field that goes to a column of its own must be printable.
    let bad = json!({"uptime_s": 5, "version": "1\u{0}", "running_commands": 0, "queue_depth": 0});
    let (status, body) = post(&app, &agents[0].1, "/api/v1/agents/self/heartbeat", &bad).await;
    assert_eq!((status, body["error"]["params"]["field"].as_str()), (400, Some("version")), "{body}");
    for (id, _) in &agents {
        let agent = app.admin.get_agent(*id).await.expect("call");
        assert_eq!(agent.version.as_deref(), Some("9.9.9"));
        // Seed-style fields are kept as the agent sent them.
        assert_eq!(agent.heartbeat["devices_count"], json!(3), "{:?}", agent.heartbeat);
    }
}

/// A webhook receiver on 127.0.0.1 recording what it is sent.
async fn receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(v): axum::Json<Value>| {
            let sink = sink.clone();
            async move {
                sink.lock().expect("lock").push(v);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("call");
    let url = format!("http://{}/hook", listener.local_addr().expect("ok"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, got)
}

async fn until(what: &str, mut ok: impl FnMut() -> bool) {
    for _ in 0..200 {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn presence_transitions_reach_the_webhook_once_each_and_the_audit_log() {
    let (url, got) = receiver().await;
    let app = spawn_app_with(|c| {
        c.telemetry.offline_after = Duration::from_millis(1500);
        c.telemetry.presence_interval = Duration::from_millis(100);
        c.seen_flush_interval = Duration::from_millis(100);
        c.telemetry.webhook = Some(tether_server::alerts::WebhookTarget::parse(&url, true).expect("ok"));
    })
    .await;
    let (id, token) = agent(&app).await;
    let events = |got: &Arc<Mutex<Vec<Value>>>| -> Vec<String> {
        got.lock().expect("lock").iter().map(|v| v["event"].as_str().expect("a string").to_owned()).collect()
    };
    // Silent past the threshold: offline, told once.
    until("the offline alert", || events(&got) == ["agent.offline"]).await;
    let query = tether_client::AgentQuery { status: Some(AgentStatus::Offline), ..Default::default() };
    let offline = app.admin.list_agents(&query).await.expect("call");
    assert_eq!(offline.data.iter().map(|a| a.id).collect::<Vec<_>>(), [id]);
    assert_eq!(got.lock().expect("lock")[0]["agent_id"], id.to_string());
    // Back: online, told once.
    let beat = json!({"uptime_s": 1, "version": "1", "running_commands": 0, "queue_depth": 0});
    assert_eq!(post(&app, &token, "/api/v1/agents/self/heartbeat", &beat).await.0, 200);
    until("the online alert", || events(&got) == ["agent.offline", "agent.online"]).await;
    // Nothing more while the state holds.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(events(&got), ["agent.offline", "agent.online"]);
    let (_, audit) = get(&app, &format!("/api/v1/audit?agent_id={id}")).await;
    let actions: Vec<&str> =
        audit["data"].as_array().expect("an array").iter().map(|r| r["action"].as_str().expect("a string")).collect();
    assert_eq!(actions.iter().filter(|a| **a == "agent.offline").count(), 1, "{actions:?}");
    assert_eq!(actions.iter().filter(|a| **a == "agent.online").count(), 1, "{actions:?}");
}

#[tokio::test]
async fn a_failing_webhook_never_holds_up_the_api() {
    // Answers 500 after hanging for longer than a delivery attempt may take.
    let app_hook = axum::Router::new().route(
        "/hook",
        axum::routing::post(|| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "no")
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("call");
    let url = format!("http://{}/hook", listener.local_addr().expect("ok"));
    tokio::spawn(async move { axum::serve(listener, app_hook).await });
    let app = spawn_app_with(|c| {
        c.telemetry.offline_after = Duration::from_millis(300);
        c.telemetry.presence_interval = Duration::from_millis(50);
        c.telemetry.webhook = Some(tether_server::alerts::WebhookTarget::parse(&url, true).expect("ok"));
    })
    .await;
    let mut tokens = Vec::new();
    for _ in 0..5 {
        tokens.push(agent(&app).await.1);
    }
    // Transitions keep coming while the receiver hangs; the API answers throughout.
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        for token in &tokens {
            let beat = json!({"uptime_s": round, "version": "1", "running_commands": 0, "queue_depth": 0});
            let call = post(&app, token, "/api/v1/agents/self/heartbeat", &beat);
            let (status, _) = tokio::time::timeout(Duration::from_secs(10), call).await.expect("the API answers");
            assert_eq!(status, 200);
        }
    }
}

#[tokio::test]
async fn a_deleted_agent_is_gone_and_locked_out_but_its_history_stays() {
    let app = spawn_app().await;
    let (id, token) = agent(&app).await;
    let (other, other_token) = agent(&app).await;
    for (t, batch) in [(&token, "d1"), (&other_token, "d2")] {
        let body = json!({"batch_id": batch, "points": points(3, "cpu", now_ms() - 1000)});
        assert_eq!(post(&app, t, "/api/v1/agents/self/metrics", &body).await.0, 200);
    }
    let del =
        |id: AgentId| app.http().delete(app.url(&format!("/api/v1/agents/{id}"))).bearer_auth(&app.admin_token).send();
    assert_eq!(del(id).await.expect("call").status(), 204);
    assert_eq!(del(id).await.expect("call").status(), 404);
    assert_eq!(get(&app, &format!("/api/v1/agents/{id}")).await.0, 404);
    // Its token no longer works.
    let beat = json!({"uptime_s": 1, "version": "1", "running_commands": 0, "queue_depth": 0});
    let (status, _) = post(&app, &token, "/api/v1/agents/self/heartbeat", &beat).await;
    assert!(matches!(status, 401 | 403), "{status}");
    // The other agent and the audit trail are untouched.
    assert_eq!(stored_points(&app, other, "cpu").await, 3);
    let (_, audit) = get(&app, &format!("/api/v1/audit?agent_id={id}")).await;
    let actions: Vec<&str> =
        audit["data"].as_array().expect("an array").iter().map(|r| r["action"].as_str().expect("a string")).collect();
    assert!(actions.contains(&"agent.delete") && actions.contains(&"agent.enroll"), "{actions:?}");
    // A viewer may not delete.
    let res = app.anon().delete_agent(other).await;
    assert!(res.is_err());
}
