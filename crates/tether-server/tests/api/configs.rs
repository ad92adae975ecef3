//! Configuration documents over HTTP (protocol.md §6): writes with
//! `If-Match`, bad input refused with nothing written, agents told and
//! served their effective configuration, label changes and apply reports.

use serde_json::{Value, json};
use tether_client::{Client, Poll};
use tether_proto::ErrorKey;
use tether_proto::agent::UpdateAgent;
use tether_proto::config::{ApplyState, ConfigApply, ConfigUpdated, PutConfig, Scope};
use tether_proto::signal::CONFIG_UPDATED;

use crate::common::{TestApp, labels, spawn_app};

fn put(doc: Value) -> PutConfig {
    PutConfig { doc: doc.as_object().expect("an object").clone(), comment: "test".into() }
}

fn scope(s: &str) -> Scope {
    s.parse().expect("scope")
}

async fn history_len(app: &TestApp, s: &Scope) -> usize {
    match app.admin.config_history(s, None, 100).await {
        Ok(page) => page.data.len(),
        Err(e) if e.key() == Some(ErrorKey::NotFound) => 0,
        Err(e) => panic!("{e:?}"),
    }
}

#[tokio::test]
async fn writes_need_the_current_version_once_the_scope_exists() {
    let app = spawn_app().await;
    let g = Scope::Global;
    let created = app.admin.put_config(&g, &put(json!({"a": 1})), None).await.expect("create");
    assert_eq!(created.version, 1);
    let missing = app.admin.put_config(&g, &put(json!({"a": 2})), None).await.expect_err("428");
    assert_eq!((missing.status(), missing.key()), (Some(428), Some(ErrorKey::PreconditionRequired)));
    let stale = app.admin.put_config(&g, &put(json!({"a": 2})), Some(7)).await.expect_err("409");
    assert_eq!((stale.status(), stale.key()), (Some(409), Some(ErrorKey::Conflict)));
    assert_eq!(history_len(&app, &g).await, 1, "refused writes wrote nothing");
    let updated = app.admin.put_config(&g, &put(json!({"a": 2})), Some(1)).await.expect("update");
    assert_eq!(updated.version, 2);
    // The raw form: a bare If-Match, the ETag on reads.
    let res = app
        .http()
        .put(app.url("/api/v1/configs/global"))
        .bearer_auth(&app.admin_token)
        .header("if-match", "2")
        .json(&json!({"doc": {"a": 3}}))
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["etag"], "\"3\"");
    let got = app.http().get(app.url("/api/v1/configs/global?version=1")).bearer_auth(&app.admin_token).send().await;
    let got = got.expect("send");
    assert_eq!(got.headers()["etag"], "\"1\"");
    app.stop().await;
}

/// A PUT body whose document nests `levels` deep.
fn deep_doc(levels: usize) -> Vec<u8> {
    format!(r#"{{"doc": {}1{}}}"#, r#"{"a": "#.repeat(levels), "}".repeat(levels)).into_bytes()
}

#[tokio::test]
async fn bad_documents_and_scopes_are_refused_with_nothing_written() {
    let app = spawn_app().await;
    let send = |path: &str, body: Vec<u8>| {
        app.http()
            .put(app.url(path))
            .bearer_auth(&app.admin_token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for (path, body, status, key) in [
        ("/api/v1/configs/global", b"{not json".to_vec(), 400, "BAD_REQUEST"),
        ("/api/v1/configs/global", br#"{"doc": [1, 2]}"#.to_vec(), 400, "BAD_REQUEST"),
        ("/api/v1/configs/global", br#"{"doc": {}, "extra": 1}"#.to_vec(), 400, "BAD_REQUEST"),
        ("/api/v1/configs/nonsense", br#"{"doc": {}}"#.to_vec(), 400, "BAD_REQUEST"),
        ("/api/v1/configs/label:bad%20key=x", br#"{"doc": {}}"#.to_vec(), 400, "BAD_REQUEST"),
        ("/api/v1/configs/agent:not-an-id", br#"{"doc": {}}"#.to_vec(), 400, "BAD_REQUEST"),
        ("/api/v1/configs/global", deep_doc(65), 400, "BAD_REQUEST"),
        (
            "/api/v1/configs/global",
            format!(r#"{{"doc": {{}}, "comment": "{}"}}"#, "c".repeat(1025)).into_bytes(),
            400,
            "BAD_REQUEST",
        ),
        (
            &format!("/api/v1/configs/agent:{}", tether_proto::AgentId::new()),
            br#"{"doc": {}}"#.to_vec(),
            404,
            "NOT_FOUND",
        ),
    ] {
        let res = send(path, body).await.expect("send");
        assert_eq!(res.status(), status, "{path}");
        let envelope: Value = res.json().await.expect("envelope");
        assert_eq!(envelope["error"]["key"], key, "{path}: {envelope}");
    }
    let huge = format!(r#"{{"doc": {{"blob": "{}"}}}}"#, "x".repeat(1024 * 1024 + 10));
    let res = send("/api/v1/configs/global", huge.into_bytes()).await.expect("send");
    assert_eq!(res.status(), 413);
    assert!(app.admin.list_configs().await.expect("list").is_empty(), "nothing was written");
    // The deepest document allowed is written and read back by the client.
    let res = send("/api/v1/configs/global", deep_doc(64)).await.expect("send");
    assert_eq!(res.status(), 201);
    app.admin.get_config(&scope("global"), None).await.expect("a client reads the deepest document");
    app.stop().await;
}

/// The `config.updated` refs waiting in an agent's stream.
async fn updates(agent: &Client) -> Vec<ConfigUpdated> {
    match agent.updates(None, 100, 0).await.expect("poll") {
        Poll::Signals(u) => u
            .signals
            .into_iter()
            .filter(|s| s.kind == CONFIG_UPDATED)
            .map(|s| serde_json::from_value(s.reference).expect("ref"))
            .collect(),
        Poll::Idle { .. } => Vec::new(),
    }
}

#[tokio::test]
async fn agents_are_told_and_fetch_their_effective_config_with_etags() {
    let app = spawn_app().await;
    let (web, web_pair) = app.agent(&[("role", "web")]).await;
    let (db, _) = app.agent(&[("role", "db")]).await;
    app.admin.put_config(&Scope::Global, &put(json!({"url": "a"})), None).await.expect("global");
    app.admin.put_config(&scope("label:role=web"), &put(json!({"url": "b"})), None).await.expect("label");
    let told = updates(&web).await;
    assert_eq!(told.iter().map(|u| u.config_id.as_str()).collect::<Vec<_>>(), vec!["global", "label:role=web"]);
    assert_eq!(updates(&db).await.len(), 1, "the label scope is not about db");

    let mine = web.own_config(None).await.expect("fetch").expect("200 the first time");
    assert_eq!((Value::Object(mine.doc.clone()), &mine.hash), (json!({"url": "b"}), &told[1].hash));
    assert!(web.own_config(Some(&mine.hash)).await.expect("fetch").is_none(), "304 for the hash it has");
    let operators = app.admin.agent_config(web_pair.agent_id).await.expect("operator view");
    assert_eq!(operators.provenance["/url"].scope, scope("label:role=web"));

    // A label change re-targets: web becomes db and drops the override.
    let update = UpdateAgent { labels: Some(labels(&[("role", "db")])), name: None };
    let agent = app.admin.update_agent(web_pair.agent_id, &update).await.expect("relabel");
    let relabelled = updates(&web).await.pop().expect("told");
    assert_eq!((relabelled.config_id.as_str(), Some(&relabelled.hash)), ("labels", agent.desired_config_hash.as_ref()));
    let now = web.own_config(Some(&mine.hash)).await.expect("fetch").expect("changed");
    assert_eq!(Value::Object(now.doc), json!({"url": "a"}));
    app.stop().await;
}

#[tokio::test]
async fn apply_reports_feed_the_agent_view_and_the_fleet_status() {
    let app = spawn_app().await;
    let (ok_agent, ok_pair) = app.agent(&[]).await;
    let (bad_agent, bad_pair) = app.agent(&[]).await;
    let (_behind, _) = app.agent(&[]).await;
    app.admin.put_config(&Scope::Global, &put(json!({"agent": {"heartbeat_s": 5}})), None).await.expect("global");
    let hash = ok_agent.own_config(None).await.expect("fetch").expect("config").hash;
    let beat = |status: ConfigApply| tether_proto::agent::Heartbeat {
        uptime_s: 1,
        version: "t".into(),
        applied_config_hash: None,
        config_status: Some(status),
        running_commands: 0,
        queue_depth: 0,
        ..Default::default()
    };
    ok_agent
        .heartbeat(&beat(ConfigApply { hash: hash.clone(), state: ApplyState::Applied, error: None }))
        .await
        .expect("beat");
    let failed = ConfigApply { hash: hash.clone(), state: ApplyState::Failed, error: Some("hook exited 1".into()) };
    bad_agent.heartbeat(&beat(failed)).await.expect("beat");
    let status = app.admin.config_status(&Scope::Global).await.expect("status");
    assert_eq!((status.targeted, status.applied, status.failed, status.behind), (3, 1, 1, 1));
    assert_eq!((status.errors[0].error.as_str(), status.errors[0].agents), ("hook exited 1", 1));
    let ok = app.admin.get_agent(ok_pair.agent_id).await.expect("agent");
    assert_eq!((ok.applied_config_hash.as_ref(), ok.desired_config_hash.as_ref()), (Some(&hash), Some(&hash)));
    let bad = app.admin.get_agent(bad_pair.agent_id).await.expect("agent");
    assert_eq!(bad.config_error.as_deref(), Some("hook exited 1"));
    let malformed = app
        .http()
        .post(app.url("/api/v1/agents/self/heartbeat"))
        .bearer_auth(&bad_pair.access_token)
        .json(&json!({"config_status": {"hash": 5}}))
        .send()
        .await
        .expect("send");
    assert_eq!(malformed.status(), 400, "a malformed apply report");
    app.stop().await;
}
