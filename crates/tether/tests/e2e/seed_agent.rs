//! The example status-panel agent (`examples/seed000-agent/agent.py`), written
//! only against the seed routes, against a real `tether server`: it
//! registers with an enrollment token, long-polls, runs what the seed's curl
//! enqueues and reports it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tether_proto::CommandId;
use tether_proto::command::{Command as NativeCommand, CommandStatus};

use crate::common::{ServerProcess, enroll_token, eventually, signal};

const AGENT_NAME: &str = "seed-e2e";

/// A Python 3 interpreter: the test suite's, or `python3` on PATH.
fn python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TETHER_TEST_PYTHON") {
        return Some(p.into());
    }
    let found = Command::new("python3").arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    found.then(|| "python3".into())
}

/// The agent process, killed if the test ends early.
struct ScriptAgent {
    child: Child,
    log: PathBuf,
}

impl ScriptAgent {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ScriptAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The seed's curl: `POST …/enqueue`, `X-Agent-Id`, `{id, name, params}`;
/// returns the tether command id.
async fn enqueue(server: &ServerProcess, token: &str, body: &str) -> CommandId {
    let res = reqwest::Client::new()
        .post(format!("{}/api/v1/agent/commands/enqueue", server.base))
        .bearer_auth(token)
        .header("Content-Type", "application/json")
        .header("X-Agent-Id", AGENT_NAME)
        .body(body.to_owned())
        .send()
        .await
        .expect("enqueue");
    assert_eq!(res.status(), 201, "{:?}", res.text().await);
    let created: Value = res.json().await.expect("json");
    created["command_id"].as_str().and_then(|id| id.parse().ok()).expect("command id")
}

async fn finished(server: &ServerProcess, token: &str, id: CommandId, agent: &ScriptAgent) -> NativeCommand {
    let admin = server.admin_with(token);
    eventually(Duration::from_secs(30), || async {
        let cmd = admin.get_command(id).await.ok()?;
        cmd.status.is_terminal().then_some(cmd)
    })
    .await
    .unwrap_or_else(|| panic!("command {id} never finished; agent log:\n{}", agent.log_text()))
}

fn start_agent(python: &Path, server: &ServerProcess, enroll: &str, dir: &Path) -> ScriptAgent {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/seed000-agent/agent.py");
    let log = dir.join("agent.log");
    let child = Command::new(python)
        .arg(script)
        .env("DASHBOARD_URL", &server.base)
        .env("AGENT_ID", AGENT_NAME)
        .env("TETHER_ENROLL_TOKEN", enroll)
        .env("AGENT_STATE", dir.join("agent-state.json"))
        .env("POLLING_TIMEOUT_SECS", "5")
        .env("POLLING_BACKOFF_SECS", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn the example agent");
    ScriptAgent { child, log }
}

#[tokio::test]
async fn the_example_status_panel_agent_registers_runs_the_enqueued_command_and_reports_it() {
    let Some(python) = python() else {
        eprintln!("skipping: no Python 3 (set TETHER_TEST_PYTHON or put python3 on PATH)");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(&dir.path().join("server"), 0);
    let token = server.admin_token.clone().expect("token");
    let enroll = enroll_token(&server.admin_with(&token), &[]).await;
    let mut agent = start_agent(&python, &server, &enroll, dir.path());

    let state = dir.path().join("agent-state.json");
    let registered = eventually(Duration::from_secs(20), || async {
        let text = std::fs::read_to_string(&state).ok()?;
        serde_json::from_str::<Value>(&text).ok()
    })
    .await
    .unwrap_or_else(|| panic!("the agent never registered; log:\n{}", agent.log_text()));
    assert!(registered["token"].as_str().is_some_and(|t| t.starts_with("tta_")), "{registered}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&state).expect("state file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the agent key is kept private");
    }

    let id = enqueue(&server, &token, r#"{"id": "cmd-001", "name": "date", "params": {}}"#).await;
    let done = finished(&server, &token, id, &agent).await;
    assert_eq!(done.status, CommandStatus::Succeeded, "{done:?}\n{}", agent.log_text());
    assert_eq!(done.exit_code, Some(0));
    assert!(done.stdout.contains("UTC"), "date -u printed the time: {:?}", done.stdout);
    assert_eq!(done.agent_id.to_string(), registered["agent_id"].as_str().expect("agent id"));

    // Outside the script's allow-list: reported failed with the reason.
    let id = enqueue(&server, &token, r#"{"id": "cmd-002", "name": "reboot", "params": {}}"#).await;
    let done = finished(&server, &token, id, &agent).await;
    assert_eq!(done.status, CommandStatus::Failed, "{done:?}");
    assert_eq!(done.output, serde_json::json!("unknown command 'reboot'"));

    // SIGTERM stops it cleanly.
    signal(&agent.child, libc::SIGTERM);
    let exited = eventually(Duration::from_secs(10), || {
        let status = agent.child.try_wait().expect("try_wait");
        async move { status }
    })
    .await
    .expect("the agent exits on SIGTERM");
    assert!(exited.success(), "{exited:?}\n{}", agent.log_text());
}
