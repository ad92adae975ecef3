//! Seed 000, the status-panel agent (docs/compat.md): the seed's own curl
//! enqueue, then the agent's long-poll loop and result report, over raw HTTP
//! with the seed's headers and bodies.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tether_client::{Client, Credentials};
use tether_proto::command::CommandStatus;
use tether_proto::user::{CreateApiToken, CreateUser};

use crate::common::{TestApp, error_key, spawn_app, spawn_app_with, until_parked};

const ENQUEUE: &str = "/api/v1/agent/commands/enqueue";
const WAIT: &str = "/api/v1/agent/commands/wait";
const REPORT: &str = "/api/v1/agent/commands/report";

/// The seed's enqueue: `curl -X POST …/enqueue -H 'X-Agent-Id: …' -d '{…}'`,
/// with an operator credential.
async fn enqueue(app: &TestApp, token: &str, agent: &str, body: &Value) -> reqwest::Response {
    app.http()
        .post(app.url(ENQUEUE))
        .bearer_auth(token)
        .header("Content-Type", "application/json")
        .header("X-Agent-Id", agent)
        .json(body)
        .send()
        .await
        .expect("enqueue")
}

/// The seed agent's poll: Bearer token, `X-Agent-Id` and its (unchecked)
/// HMAC headers.
async fn wait(app: &TestApp, token: &str, agent: &str, timeout: &str) -> reqwest::Response {
    app.http()
        .get(app.url(&format!("{WAIT}?timeout={timeout}")))
        .bearer_auth(token)
        .header("X-Agent-Id", agent)
        .header("X-Timestamp", "1736900000")
        .header("X-Request-Id", "0b7b2b0e-4a4f-4a57-9c1e-3f1b5a0d2c11")
        .header("X-Agent-Signature", "c2VlZC1obWFj")
        .send()
        .await
        .expect("wait")
}

async fn report(app: &TestApp, token: &str, agent: &str, body: &Value) -> reqwest::Response {
    app.http()
        .post(app.url(REPORT))
        .bearer_auth(token)
        .header("X-Agent-Id", agent)
        .json(body)
        .send()
        .await
        .expect("report")
}

#[tokio::test]
async fn the_seed_curl_enqueue_reaches_the_long_polling_agent_which_reports_then_times_out() {
    let app = spawn_app().await;
    let agent = app.agent_on("my-agent").await;
    let token = agent.access_token.as_str();

    let res =
        enqueue(&app, &app.admin_token, "my-agent", &json!({"id": "cmd-001", "name": "date", "params": {}})).await;
    assert_eq!(res.status(), 201);
    let created: Value = res.json().await.expect("json");
    assert_eq!(
        (created["id"].as_str(), created["agent_id"].as_str()),
        (Some("cmd-001"), Some(&*agent.agent_id.to_string()))
    );
    let command_id = created["command_id"].as_str().expect("command id").to_owned();

    let res = wait(&app, token, "my-agent", "30").await;
    assert_eq!(res.status(), 200);
    let cmd: Value = res.json().await.expect("json");
    assert_eq!(cmd, json!({"id": command_id, "name": "date", "params": {}}));

    // The same `id` again is the same command (idempotency key), not a second one.
    let again =
        enqueue(&app, &app.admin_token, "my-agent", &json!({"id": "cmd-001", "name": "date", "params": {}})).await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.json::<Value>().await.expect("json")["command_id"].as_str(), Some(&*command_id));
    let other =
        enqueue(&app, &app.admin_token, "my-agent", &json!({"id": "cmd-001", "name": "uptime", "params": {}})).await;
    assert_eq!(error_key(other).await, (409, "CONFLICT".to_owned()));

    let body = json!({
        "command_id": command_id,
        "status": "success",
        "result": {"stdout": "Mon Jan 12 16:49:26 UTC 2026\n", "stderr": "", "exit_code": 0},
        "error": null,
        "deployment_hash": "my-deployment",
    });
    let res = report(&app, token, "my-agent", &body).await;
    assert_eq!(res.status(), 200);
    let view = app.admin.get_command(command_id.parse().expect("id")).await.expect("command");
    assert_eq!(view.status, CommandStatus::Succeeded);
    assert_eq!((view.stdout.as_str(), view.exit_code), ("Mon Jan 12 16:49:26 UTC 2026\n", Some(0)));
    // The same report again is accepted; a different one is a conflict, as natively.
    assert_eq!(report(&app, token, "my-agent", &body).await.status(), 200);
    let differs = json!({"command_id": command_id, "status": "failed", "error": "boom"});
    assert_eq!(error_key(report(&app, token, "my-agent", &differs).await).await, (409, "CONFLICT".to_owned()));

    // Nothing left: the poll waits its timeout, then 204.
    let started = Instant::now();
    let res = wait(&app, token, "my-agent", "1").await;
    assert_eq!(res.status(), 204);
    assert!(started.elapsed() >= Duration::from_millis(900), "204 only after the timeout");
    app.stop().await;
}

#[tokio::test]
async fn a_parked_wait_wakes_on_enqueue_and_a_long_timeout_is_served_within_the_native_bound() {
    let app = spawn_app().await;
    let agent = app.agent_on("edge-7").await;
    let id = agent.agent_id.to_string();
    let poll = {
        let (http, url, token) = (app.http(), app.url(&format!("{WAIT}?timeout=600")), agent.access_token.clone());
        let id = id.clone();
        tokio::spawn(
            async move { http.get(url).bearer_auth(token).header("X-Agent-Id", id).send().await.expect("wait") },
        )
    };
    until_parked(&app.state, 1).await;
    // Named by its id this time.
    let res =
        enqueue(&app, &app.admin_token, &id, &json!({"id": "restart-1", "name": "ping", "params": {"n": 1}})).await;
    assert_eq!(res.status(), 201);
    let res = tokio::time::timeout(Duration::from_secs(10), poll).await.expect("woken").expect("task");
    assert_eq!(res.status(), 200);
    let cmd: Value = res.json().await.expect("json");
    assert_eq!((cmd["name"].as_str(), &cmd["params"]), (Some("ping"), &json!({"n": 1})));

    // Failure and timeout reports map onto the native statuses.
    let second = enqueue(&app, &app.admin_token, &id, &json!({"id": "restart-2", "name": "ping"})).await;
    let second: Value = second.json().await.expect("json");
    let first_id = cmd["id"].as_str().expect("id");
    let second_id = second["command_id"].as_str().expect("id");
    assert_eq!(wait(&app, &agent.access_token, &id, "0").await.status(), 200);
    let failed = json!({"command_id": first_id, "status": "failed", "result": null, "error": "exit status 2"});
    assert_eq!(report(&app, &agent.access_token, "edge-7", &failed).await.status(), 200);
    let timed_out = json!({"command_id": second_id, "status": "timeout", "error": "timed out after 300s"});
    assert_eq!(report(&app, &agent.access_token, "edge-7", &timed_out).await.status(), 200);
    let first = app.admin.get_command(first_id.parse().expect("id")).await.expect("command");
    assert_eq!((first.status, &first.output), (CommandStatus::Failed, &json!("exit status 2")));
    let second = app.admin.get_command(second_id.parse().expect("id")).await.expect("command");
    assert_eq!(second.status, CommandStatus::TimedOut);
    app.stop().await;
}

async fn operator_token(app: &TestApp, username: &str, role: &str) -> String {
    let password = format!("{username}-password-long");
    let user = CreateUser { username: username.into(), password: password.clone(), role: role.into() };
    app.admin.create_user(&user).await.expect("create user");
    let basic = Client::new(&app.base)
        .expect("client")
        .with_credentials(Credentials::Basic { username: username.into(), password });
    basic.create_api_token(&CreateApiToken { name: "seed".into(), expires_in_s: None }).await.expect("token").token
}

#[tokio::test]
async fn wrong_credentials_other_agents_and_bad_bodies_are_refused() {
    let app = spawn_app().await;
    let mine = app.agent_on("mine").await;
    let theirs = app.agent_on("theirs").await;
    let token = mine.access_token.as_str();
    let body = json!({"id": "c1", "name": "ping", "params": {}});

    // No or wrong credentials: 401 on every route.
    let http = app.http();
    let anon = http.post(app.url(ENQUEUE)).header("X-Agent-Id", "mine").json(&body).send().await.expect("send");
    assert_eq!(error_key(anon).await, (401, "UNAUTHENTICATED".to_owned()));
    let anon = http.get(app.url(WAIT)).header("X-Agent-Id", "mine").send().await.expect("send");
    assert_eq!(anon.status(), 401);
    assert_eq!(report(&app, "not-a-token", "mine", &json!({})).await.status(), 401);
    assert_eq!(enqueue(&app, "tta_wrong", "mine", &body).await.status(), 401);
    // An agent credential on the operator route, an operator one on the agent routes.
    assert_eq!(error_key(enqueue(&app, token, "mine", &body).await).await, (401, "UNAUTHENTICATED".to_owned()));
    assert_eq!(wait(&app, &app.admin_token, "mine", "0").await.status(), 401);
    assert_eq!(report(&app, &app.admin_token, "mine", &json!({})).await.status(), 401);
    // A viewer may not enqueue.
    let viewer = operator_token(&app, "vera", "viewer").await;
    assert_eq!(error_key(enqueue(&app, &viewer, "mine", &body).await).await, (403, "FORBIDDEN".to_owned()));

    // Another agent's X-Agent-Id, by name or id, answers exactly as a name nobody has.
    let mut answers = Vec::new();
    for named in ["theirs", &theirs.agent_id.to_string(), "nobody"] {
        let res = wait(&app, token, named, "0").await;
        answers.push((res.status().as_u16(), res.json::<Value>().await.expect("json")["error"]["what"].clone()));
    }
    assert_eq!(answers[0].0, 403);
    assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
    assert_eq!(report(&app, token, "theirs", &json!({"command_id": "x", "status": "success"})).await.status(), 403);
    // X-Agent-Id names the caller by id, name or hostname; it is required.
    assert_eq!(wait(&app, token, &mine.agent_id.to_string(), "0").await.status(), 204);
    let res = http.get(app.url(WAIT)).bearer_auth(token).send().await.expect("send");
    assert_eq!(error_key(res).await, (400, "BAD_REQUEST".to_owned()));

    // Another agent's command is not found for the caller.
    let res = enqueue(&app, &app.admin_token, "theirs", &body).await;
    let their_cmd = res.json::<Value>().await.expect("json")["command_id"].as_str().expect("id").to_owned();
    let res = report(&app, token, "mine", &json!({"command_id": their_cmd, "status": "success"})).await;
    assert_eq!(error_key(res).await, (404, "NOT_FOUND".to_owned()));

    // Enqueue: unknown agent 404, a name two agents share 400, bad bodies 400, oversize 413.
    assert_eq!(error_key(enqueue(&app, &app.admin_token, "nobody", &body).await).await.0, 404);
    app.agent_on("twin").await;
    app.agent_on("twin").await;
    assert_eq!(error_key(enqueue(&app, &app.admin_token, "twin", &body).await).await.0, 400);
    for bad in [
        json!({"id": "c2", "name": "has space", "params": {}}),
        json!({"id": "c2", "name": "ping", "params": [1]}),
        json!({"id": "", "name": "ping", "params": {}}),
        json!({"name": "ping", "params": {}}),
        json!({"id": "c2", "name": "ping", "params": {}, "extra": 1}),
    ] {
        let res = enqueue(&app, &app.admin_token, "mine", &bad).await;
        assert_eq!(error_key(res).await.0, 400, "{bad}");
    }
    let res = enqueue(&app, &app.admin_token, "mine", &json!({"id": "", "name": "ping", "params": {}})).await;
    let err: Value = res.json().await.expect("json");
    assert_eq!(err["error"]["params"]["field"], "id", "the seed's field name: {err}");
    let res = app
        .http()
        .post(app.url(ENQUEUE))
        .bearer_auth(&app.admin_token)
        .header("X-Agent-Id", "mine")
        .header("Content-Type", "application/json")
        .body("{\"id\": ")
        .send()
        .await
        .expect("send");
    assert_eq!(error_key(res).await, (400, "BAD_REQUEST".to_owned()));
    let huge = json!({"id": "c3", "name": "ping", "params": {"blob": "x".repeat(1024 * 1024)}});
    assert_eq!(
        error_key(enqueue(&app, &app.admin_token, "mine", &huge).await).await,
        (413, "PAYLOAD_TOO_LARGE".to_owned())
    );

    // Wait and report: bad query and bodies.
    assert_eq!(error_key(wait(&app, token, "mine", "soon").await).await.0, 400);
    assert_eq!(error_key(wait(&app, token, "mine", "-1").await).await.0, 400);
    for bad in [
        json!({"command_id": "not-an-id", "status": "success"}),
        json!({"command_id": their_cmd, "status": "done"}),
        json!({"status": "success"}),
    ] {
        assert_eq!(error_key(report(&app, token, "mine", &bad).await).await.0, 400, "{bad}");
    }
    let huge = json!({"command_id": their_cmd, "status": "success", "error": "x".repeat(1024 * 1024)});
    assert_eq!(error_key(report(&app, token, "mine", &huge).await).await.0, 413);
    app.stop().await;
}

#[tokio::test]
async fn without_seed_routes_the_seed_000_routes_are_not_found() {
    let app = spawn_app_with(|c| c.seed_routes = false).await;
    let agent = app.agent_on("my-agent").await;
    let body = json!({"id": "cmd-001", "name": "date", "params": {}});
    assert_eq!(enqueue(&app, &app.admin_token, "my-agent", &body).await.status(), 404);
    assert_eq!(wait(&app, &agent.access_token, "my-agent", "0").await.status(), 404);
    assert_eq!(report(&app, &agent.access_token, "my-agent", &json!({})).await.status(), 404);
    app.stop().await;
}
