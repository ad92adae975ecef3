//! Distributed configuration end to end (protocol.md §6): real server and
//! agent processes, the operator CLI, and the example config worker fed by
//! an agent's `post_url` sink.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tether_client::Client;
use tether_proto::AgentId;
use tether_proto::config::{PutConfig, Scope};

use crate::common::{AgentProcess, ServerProcess, cli, enroll_token, eventually, tether_bin};

/// `tether agent status --json` of the daemon in `dir`, once it answers.
async fn agent_status(dir: &Path) -> Value {
    eventually(Duration::from_secs(30), || async {
        let out = std::process::Command::new(tether_bin())
            .args(["agent", "status", "--json", "-c"])
            .arg(dir)
            .output()
            .ok()?;
        out.status.success().then(|| serde_json::from_slice(&out.stdout).expect("json status"))
    })
    .await
    .expect("the agent answers on its control socket")
}

fn scope(s: &str) -> Scope {
    s.parse().expect("scope")
}

/// Writes the scope's next version (reading the current one for If-Match).
async fn set(admin: &Client, scope_text: &str, doc: Value) -> String {
    let s = scope(scope_text);
    let current = admin.get_config(&s, None).await.ok().map(|c| c.version);
    let Value::Object(doc) = doc else { panic!("not an object") };
    admin.put_config(&s, &PutConfig { doc, comment: "e2e".into() }, current).await.expect("put config").hash
}

/// Waits until the agent runs the configuration the server wants it to
/// run, and returns that hash.
async fn converged(admin: &Client, id: AgentId) -> String {
    eventually(Duration::from_secs(30), || async {
        let a = admin.get_agent(id).await.ok()?;
        (a.applied_config_hash.is_some() && a.applied_config_hash == a.desired_config_hash)
            .then(|| a.applied_config_hash.expect("checked"))
    })
    .await
    .unwrap_or_else(|| panic!("agent {id} never applied its desired configuration"))
}

/// Serves the example config worker on a free port.
async fn config_worker() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = config_worker::app().expect("worker");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread")]
async fn scoped_configs_reach_the_right_agents_and_their_local_programs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(&dir.path().join("server"), 0);
    let token = server.admin_token.clone().expect("token");
    let admin = server.admin_with(&token);
    let worker = config_worker().await;

    let web_dir = dir.path().join("web");
    let web_toml = format!(
        r#"
[config]
file = "{file}"
mode = "0640"
on_change = ["sh", "-c", "echo \"$TETHER_CONFIG_HASH\" >> {hooks}"]
post_url = "{worker}/config"
"#,
        file = web_dir.join("app.toml").display(),
        hooks = web_dir.join("hook.log").display(),
    );
    let web = AgentProcess::start(
        &web_dir,
        &server.base,
        Some(&enroll_token(&admin, &[("role", "web")]).await),
        Some(&web_toml),
    );
    let db_dir = dir.path().join("db");
    let db_toml = format!("[config]\nfile = \"{}\"\n", db_dir.join("app.json").display());
    let db = AgentProcess::start(
        &db_dir,
        &server.base,
        Some(&enroll_token(&admin, &[("role", "db")]).await),
        Some(&db_toml),
    );
    let (web_id, db_id) = (web.agent_id(), db.agent_id());

    set(&admin, "global", json!({"url": format!("{}/healthz", server.base), "greeting": "hello"})).await;
    // The worker gets the override within one poll cycle: the signal wakes
    // the agent's parked long poll (30 s at most) at once.
    set(&admin, "label:role=web", json!({"greeting": "hi web"})).await;
    let got = eventually(Duration::from_secs(30), || async {
        let config: Value = reqwest::get(format!("{worker}/config")).await.ok()?.json().await.ok()?;
        (config["greeting"] == "hi web").then_some(config)
    })
    .await
    .expect("the worker receives the web configuration");
    assert_eq!(got["url"], format!("{}/healthz", server.base));
    let hit = reqwest::get(format!("{worker}/hit")).await.expect("hit");
    assert_eq!(hit.status(), 200, "/hit fetches the configured url");
    assert_eq!(hit.text().await.expect("body"), "ok", "the body of the server's /healthz");

    let web_hash = converged(&admin, web_id).await;
    let db_hash = converged(&admin, db_id).await;
    assert_ne!(web_hash, db_hash);
    let file = std::fs::read_to_string(web_dir.join("app.toml")).expect("web file");
    assert!(file.contains("greeting = \"hi web\""), "{file}");
    let mode = std::fs::metadata(web_dir.join("app.toml")).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);
    let file: Value = serde_json::from_str(&std::fs::read_to_string(db_dir.join("app.json")).expect("db file"))
        .expect("the db agent writes JSON");
    assert_eq!(file["greeting"], "hello", "only the labelled agents see the override");
    let hooks = std::fs::read_to_string(web_dir.join("hook.log")).expect("hook log");
    assert_eq!(hooks.lines().last(), Some(web_hash.as_str()), "the hook ran with the new hash");

    let effective = cli(&server, &token, &["config", "effective", &web_id.to_string()]);
    let line = |key: &str| effective.lines().find(|l| l.contains(key)).unwrap_or_default().to_owned();
    assert!(line("/greeting").contains("label:role=web v1"), "{effective}");
    assert!(line("/url").contains("global v1"), "{effective}");

    // A second web version, then rolling back to the first, restores the
    // hash on every agent it targets; the db agent is never told.
    set(&admin, "label:role=web", json!({"greeting": "hi web, again"})).await;
    let changed = converged(&admin, web_id).await;
    assert_ne!(changed, web_hash);
    let out = cli(&server, &token, &["config", "rollback", "label:role=web", "1"]);
    assert!(out.contains("is at version 3"), "{out}");
    let rolled_back = eventually(Duration::from_secs(30), || async {
        let a = admin.get_agent(web_id).await.ok()?;
        (a.applied_config_hash.as_deref() == Some(web_hash.as_str())).then_some(())
    })
    .await;
    assert!(rolled_back.is_some(), "rollback restores the previous hash");
    assert_eq!(converged(&admin, db_id).await, db_hash);

    let status: Value =
        serde_json::from_str(&cli(&server, &token, &["config", "status", "global", "--output", "json"])).expect("json");
    assert_eq!((status["targeted"].as_u64(), status["applied"].as_u64()), (Some(2), Some(2)), "{status}");
    assert_eq!((status["behind"].as_u64(), status["failed"].as_u64()), (Some(0), Some(0)), "{status}");
    let status: Value =
        serde_json::from_str(&cli(&server, &token, &["config", "status", "label:role=web", "--output", "json"]))
            .expect("json");
    assert_eq!((status["targeted"].as_u64(), status["applied"].as_u64()), (Some(1), Some(1)), "{status}");
}

/// `Heartbeat sent` lines in the agent's log so far.
fn heartbeats(agent: &AgentProcess) -> usize {
    agent.log_text().matches("Heartbeat sent").count()
}

#[tokio::test(flavor = "multi_thread")]
async fn reserved_keys_retune_the_running_agent_and_a_bad_value_keeps_the_previous_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(&dir.path().join("server"), 0);
    let admin = server.admin_with(server.admin_token.as_deref().expect("token"));
    // The harness starts agents with a 5 s heartbeat.
    let agent = AgentProcess::start(&dir.path().join("a"), &server.base, Some(&enroll_token(&admin, &[]).await), None);
    let id = agent.agent_id();
    let scope_text = format!("agent:{id}");

    set(&admin, &scope_text, json!({"agent": {"heartbeat_s": 1, "log_level": "debug"}})).await;
    let good = converged(&admin, id).await;
    assert_eq!(agent_status(&agent.dir).await["heartbeat_s"], 1);
    // Over six seconds a 1 s heartbeat beats about six times, a 5 s one at
    // most twice: the interval changed without a restart.
    let before = heartbeats(&agent);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let beats = heartbeats(&agent) - before;
    assert!(beats >= 4, "{beats} heartbeats in 6 s with heartbeat_s = 1");

    set(&admin, &scope_text, json!({"agent": {"heartbeat_s": "fast"}})).await;
    let view = eventually(Duration::from_secs(30), || async {
        let a = admin.get_agent(id).await.ok()?;
        a.config_error.is_some().then_some(a)
    })
    .await
    .expect("the agent reports the failure");
    assert!(view.config_error.as_deref().unwrap_or_default().contains("heartbeat_s"), "{view:?}");
    assert_eq!(view.applied_config_hash.as_deref(), Some(good.as_str()), "it still runs the previous one");
    let status = agent_status(&agent.dir).await;
    assert_eq!(status["heartbeat_s"], 1, "{status}");
    assert!(status["config_error"].as_str().unwrap_or_default().contains("heartbeat_s"), "{status}");
    let fleet = admin.config_status(&scope(&scope_text)).await.expect("status");
    assert_eq!((fleet.targeted, fleet.applied, fleet.failed), (1, 0, 1), "{fleet:?}");
    assert!(fleet.errors[0].error.contains("heartbeat_s"), "{fleet:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_restarted_while_the_server_is_down_runs_its_cached_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = ServerProcess::start(&dir.path().join("server"), 0);
    let admin = server.admin_with(server.admin_token.as_deref().expect("token"));
    let agent_dir = dir.path().join("a");
    let toml = format!("[config]\nfile = \"{}\"\n", agent_dir.join("app.json").display());
    let mut agent = AgentProcess::start(&agent_dir, &server.base, Some(&enroll_token(&admin, &[]).await), Some(&toml));
    let id = agent.agent_id();
    let hash =
        set(&admin, "global", json!({"feature": {"enabled": true}, "agent": {"max_concurrent_commands": 2}})).await;
    assert_eq!(converged(&admin, id).await, hash);
    agent.kill9();
    server.kill9();
    std::fs::remove_file(agent_dir.join("app.json")).expect("remove the sink file");

    let agent = AgentProcess::start(&agent_dir, &server.base, None, Some(&toml));
    let status = agent_status(&agent.dir).await;
    assert!(status["config_source"].as_str().unwrap_or_default().contains("cache"), "{status}");
    assert_eq!(status["applied_config_hash"], hash.as_str(), "{status}");
    assert_eq!(status["max_concurrent_commands"], 2, "{status}");
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(agent_dir.join("app.json")).expect("file")).expect("json");
    assert_eq!(file["feature"]["enabled"], true, "the cached configuration is written out again");
}
