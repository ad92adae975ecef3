//! Seed 001, the EDR command queue (docs/compat.md): the agent polls
//! `/command/poll?host=` and posts `/command/result`, over raw HTTP with the
//! seed's shapes; operators see the outcome as native statuses.

use serde_json::{Value, json};
use tether_proto::agent::TokenPair;
use tether_proto::command::{CommandStatus, CreateCommand, Target};

use crate::common::{TestApp, error_key, spawn_app, spawn_app_with};

/// `GET /command/poll?host=HOSTNAME`, as the sentinel sends it.
async fn poll(app: &TestApp, token: &str, host: &str) -> reqwest::Response {
    app.http().get(app.url("/command/poll")).query(&[("host", host)]).bearer_auth(token).send().await.expect("poll")
}

async fn post_result(app: &TestApp, token: &str, body: &Value) -> reqwest::Response {
    app.http().post(app.url("/command/result")).bearer_auth(token).json(body).send().await.expect("result")
}

async fn queue(app: &TestApp, agent: &TokenPair, name: &str, args: Value, priority: u8) -> tether_proto::CommandId {
    let mut req = CreateCommand::new(Target::agents([agent.agent_id]), name);
    req.args = args;
    req.priority = priority;
    app.admin.create_command(&req).await.expect("create").command_ids[0]
}

#[tokio::test]
async fn poll_by_host_then_results_are_succeeded_or_failed_for_operators() {
    let app = spawn_app().await;
    let agent = app.agent_on("web-01").await;
    let token = agent.access_token.as_str();

    let res = poll(&app, token, "web-01").await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.expect("json"), json!({"commands": []}));

    let isolate = queue(&app, &agent, "network_isolate", json!({"reason": "malware"}), 5).await;
    let forensics = queue(&app, &agent, "collect_forensics", json!({}), 9).await;
    let res = poll(&app, token, "WEB-01").await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.expect("json");
    // Higher priority first, as in the seed's queue.
    assert_eq!(
        body,
        json!({"commands": [
            {"id": forensics, "command": "collect_forensics", "params": {}},
            {"id": isolate, "command": "network_isolate", "params": {"reason": "malware"}},
        ]})
    );
    // Handed out once: both are delivered now.
    assert_eq!(poll(&app, token, "web-01").await.json::<Value>().await.expect("json"), json!({"commands": []}));
    assert_eq!(app.admin.get_command(isolate).await.expect("get").status, CommandStatus::Delivered);

    // Results with no `running` report before them.
    let ok = json!({"command_id": isolate, "success": true, "message": "Network isolated", "data": {"rules": 3}});
    let res = post_result(&app, token, &ok).await;
    assert_eq!(res.status(), 200);
    let failed = json!({"command_id": forensics, "success": false, "message": "disk full"});
    assert_eq!(post_result(&app, token, &failed).await.status(), 200);

    let view = app.admin.get_command(isolate).await.expect("get");
    assert_eq!(view.status, CommandStatus::Succeeded);
    assert_eq!(view.output, json!("Network isolated"));
    assert_eq!(serde_json::from_str::<Value>(&view.stdout).expect("data as JSON"), json!({"rules": 3}));
    assert!(view.delivered_at.is_some() && view.finished_at.is_some(), "{view:?}");
    let view = app.admin.get_command(forensics).await.expect("get");
    assert_eq!((view.status, view.output), (CommandStatus::Failed, json!("disk full")));

    // The native idempotency: the same result again is fine, a different one conflicts.
    assert_eq!(post_result(&app, token, &ok).await.status(), 200);
    let flipped = json!({"command_id": isolate, "success": false, "message": "Network isolated"});
    assert_eq!(error_key(post_result(&app, token, &flipped).await).await, (409, "CONFLICT".to_owned()));
    app.stop().await;
}

#[tokio::test]
async fn other_hosts_wrong_credentials_and_bad_bodies_are_refused() {
    let app = spawn_app().await;
    let mine = app.agent_on("web-01").await;
    let theirs = app.agent_on("web-02").await;
    let token = mine.access_token.as_str();
    let their_cmd = queue(&app, &theirs, "kill_process", json!({"pid": 4242}), 5).await;

    // Another agent's host answers exactly as a host nobody has, and hands out nothing.
    let other = poll(&app, token, "web-02").await;
    let (other_status, other_body) = (other.status(), other.json::<Value>().await.expect("json"));
    let nobody = poll(&app, token, "db-99").await;
    let (nobody_status, nobody_body) = (nobody.status(), nobody.json::<Value>().await.expect("json"));
    assert_eq!(other_status, 403);
    assert_eq!((other_status, &other_body["error"]["what"]), (nobody_status, &nobody_body["error"]["what"]));
    assert_eq!(app.admin.get_command(their_cmd).await.expect("get").status, CommandStatus::Queued);
    // Another agent's command is not found for the caller.
    let res = post_result(&app, token, &json!({"command_id": their_cmd, "success": true, "message": "done"})).await;
    assert_eq!(error_key(res).await, (404, "NOT_FOUND".to_owned()));

    // No, wrong or operator credentials.
    let anon = app.http().get(app.url("/command/poll?host=web-01")).send().await.expect("send");
    assert_eq!(error_key(anon).await, (401, "UNAUTHENTICATED".to_owned()));
    assert_eq!(poll(&app, "garbage", "web-01").await.status(), 401);
    assert_eq!(poll(&app, &app.admin_token, "web-01").await.status(), 401);
    let body = json!({"command_id": their_cmd, "success": true});
    assert_eq!(post_result(&app, &app.admin_token, &body).await.status(), 401);
    let anon = app.http().post(app.url("/command/result")).json(&body).send().await.expect("send");
    assert_eq!(anon.status(), 401);

    // Malformed: no host, ids that are not tether's, missing fields, bad JSON; oversize 413.
    let res = app.http().get(app.url("/command/poll")).bearer_auth(token).send().await.expect("send");
    assert_eq!(error_key(res).await, (400, "BAD_REQUEST".to_owned()));
    for bad in [
        json!({"command_id": 123, "success": true, "message": "Network isolated"}),
        json!({"command_id": "123", "success": true}),
        json!({"command_id": their_cmd, "message": "no success field"}),
        json!({"command_id": their_cmd, "success": "yes"}),
    ] {
        assert_eq!(error_key(post_result(&app, token, &bad).await).await.0, 400, "{bad}");
    }
    let res = app
        .http()
        .post(app.url("/command/result"))
        .bearer_auth(token)
        .header("Content-Type", "application/json")
        .body("{\"command_id\":")
        .send()
        .await
        .expect("send");
    assert_eq!(error_key(res).await, (400, "BAD_REQUEST".to_owned()));
    let huge = json!({"command_id": their_cmd, "success": true, "data": "x".repeat(1024 * 1024)});
    assert_eq!(error_key(post_result(&app, token, &huge).await).await, (413, "PAYLOAD_TOO_LARGE".to_owned()));
    app.stop().await;
}

#[tokio::test]
async fn without_seed_routes_the_seed_001_routes_are_not_found() {
    let app = spawn_app_with(|c| c.seed_routes = false).await;
    let agent = app.agent_on("web-01").await;
    assert_eq!(poll(&app, &agent.access_token, "web-01").await.status(), 404);
    let body = json!({"command_id": "x", "success": true});
    assert_eq!(post_result(&app, &agent.access_token, &body).await.status(), 404);
    app.stop().await;
}
