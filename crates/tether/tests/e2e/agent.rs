//! The agent daemon end to end: real server and agent processes.

use std::time::Duration;

use tether_client::Client;
use tether_proto::command::{Command, CommandStatus, CreateCommand, Target};
use tether_proto::{AgentId, CommandId};

use crate::common::{AgentProcess, ServerProcess, enroll_token, eventually};

async fn run_on(admin: &Client, agent: AgentId, name: &str, args: serde_json::Value, timeout_s: u32) -> CommandId {
    let mut req = CreateCommand::new(Target::agents([agent]), name);
    req.args = args;
    req.timeout_s = timeout_s;
    admin.create_command(&req).await.expect("create").command_ids[0]
}

/// Waits until the command is terminal (bounded).
async fn finished(admin: &Client, id: CommandId, limit: Duration) -> Command {
    eventually(limit, || async {
        let cmd = admin.get_command(id).await.ok()?;
        cmd.status.is_terminal().then_some(cmd)
    })
    .await
    .unwrap_or_else(|| panic!("command {id} did not finish within {limit:?}"))
}

const ACTIONS: &str = r#"
[actions.show-args]
argv = ["printf", "[%s]", "{who}", "fixed", "{count}"]
params = { who = "string", count = "int" }
"#;

#[tokio::test]
async fn named_actions_get_exact_argv_and_shell_needs_local_opt_in() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(&dir.path().join("server"), 0);
    let admin = server.admin_with(server.admin_token.as_deref().expect("token"));
    let plain = AgentProcess::start(
        &dir.path().join("a1"),
        &server.base,
        Some(&enroll_token(&admin, &[]).await),
        Some(ACTIONS),
    );
    let shell_toml = format!("allow_shell = true\n{ACTIONS}");
    let shelly = AgentProcess::start(
        &dir.path().join("a2"),
        &server.base,
        Some(&enroll_token(&admin, &[]).await),
        Some(&shell_toml),
    );
    let (plain_id, shelly_id) = (plain.agent_id(), shelly.agent_id());

    let id =
        run_on(&admin, plain_id, "show-args", serde_json::json!({"who": "two words; $(rm -rf /)", "count": 3}), 30)
            .await;
    let cmd = finished(&admin, id, Duration::from_secs(30)).await;
    assert_eq!(cmd.status, CommandStatus::Succeeded, "{cmd:?}");
    assert_eq!(cmd.stdout, "[two words; $(rm -rf /)][fixed][3]", "each parameter is exactly one argv element");

    let bad = run_on(&admin, plain_id, "show-args", serde_json::json!({"who": "x", "count": "3"}), 30).await;
    let cmd = finished(&admin, bad, Duration::from_secs(30)).await;
    assert_eq!(cmd.status, CommandStatus::Rejected);

    let script = serde_json::json!({"script": "echo from-shell"});
    let refused = run_on(&admin, plain_id, "shell", script.clone(), 30).await;
    let cmd = finished(&admin, refused, Duration::from_secs(30)).await;
    assert_eq!(cmd.status, CommandStatus::Rejected);
    assert!(cmd.reason.as_deref().unwrap_or_default().contains("shell is disabled"), "{cmd:?}");

    let allowed = run_on(&admin, shelly_id, "shell", script, 30).await;
    let cmd = finished(&admin, allowed, Duration::from_secs(30)).await;
    assert_eq!((cmd.status, cmd.stdout.as_str()), (CommandStatus::Succeeded, "from-shell\n"));

    let unknown = run_on(&admin, plain_id, "format-disk", serde_json::json!({}), 30).await;
    assert_eq!(finished(&admin, unknown, Duration::from_secs(30)).await.status, CommandStatus::Rejected);
}

#[tokio::test]
async fn a_command_past_its_timeout_is_killed_with_its_children() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(&dir.path().join("server"), 0);
    let admin = server.admin_with(server.admin_token.as_deref().expect("token"));
    let agent = AgentProcess::start(
        &dir.path().join("a"),
        &server.base,
        Some(&enroll_token(&admin, &[]).await),
        Some("allow_shell = true"),
    );
    let marker = dir.path().join("grandchild-survived");
    let script = format!("(sleep 3; touch {}) & sleep 60", marker.display());
    let id = run_on(&admin, agent.agent_id(), "shell", serde_json::json!({"script": script}), 1).await;
    let cmd = finished(&admin, id, Duration::from_secs(30)).await;
    assert_eq!(cmd.status, CommandStatus::TimedOut, "{cmd:?}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!marker.exists(), "the whole process group must be killed");
}

#[tokio::test]
async fn sigkill_during_a_command_never_runs_it_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(&dir.path().join("server"), 0);
    let admin = server.admin_with(server.admin_token.as_deref().expect("token"));
    let agent_dir = dir.path().join("a");
    let mut agent = AgentProcess::start(
        &agent_dir,
        &server.base,
        Some(&enroll_token(&admin, &[]).await),
        Some("allow_shell = true"),
    );
    let agent_id = agent.agent_id();
    let runs = dir.path().join("runs");
    let script = format!("echo ran >> {}; sleep 5", runs.display());
    let id = run_on(&admin, agent_id, "shell", serde_json::json!({"script": script}), 60).await;
    // Wait until it runs, then kill the agent hard.
    eventually(Duration::from_secs(30), || async { runs.exists().then_some(()) }).await.expect("command started");
    agent.kill9();
    // Restart: the command is redelivered (same cursor) but must not start again.
    let agent = AgentProcess::start(&agent_dir, &server.base, None, None);
    let cmd = finished(&admin, id, Duration::from_secs(30)).await;
    assert!(cmd.status.is_terminal());
    assert_eq!(cmd.status, CommandStatus::Failed, "{cmd:?}");
    assert!(cmd.reason.as_deref().unwrap_or_default().contains("interrupted"), "{cmd:?}");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let lines = std::fs::read_to_string(&runs).expect("runs").lines().count();
    assert_eq!(lines, 1, "the command ran more than once; agent log:\n{}", agent.log_text());
}

#[tokio::test]
async fn results_survive_a_server_outage_and_arrive_after_it_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server_dir = dir.path().join("server");
    let mut server = ServerProcess::start(&server_dir, 0);
    let port = server.port;
    let token = server.admin_token.clone().expect("token");
    let admin = server.admin_with(&token);
    let agent = AgentProcess::start(
        &dir.path().join("a"),
        &server.base,
        Some(&enroll_token(&admin, &[]).await),
        Some("allow_shell = true"),
    );
    let agent_id = agent.agent_id();
    let started = dir.path().join("started");
    let script = format!("touch {}; sleep 3; echo done", started.display());
    let id = run_on(&admin, agent_id, "shell", serde_json::json!({"script": script}), 60).await;
    eventually(Duration::from_secs(30), || async { started.exists().then_some(()) }).await.expect("command started");

    // The server goes away for 20 s while the command finishes.
    server.kill9();
    let spooled = agent.dir.join(format!("state/results/{id}.json"));
    eventually(Duration::from_secs(15), || async { spooled.exists().then_some(()) })
        .await
        .expect("the result is spooled on disk while the server is down");
    tokio::time::sleep(Duration::from_secs(20)).await;
    let server = ServerProcess::start(&server_dir, port);
    let admin = server.admin_with(&token);

    // Backoff is at most 2^5 s by now; the spooled result arrives without help.
    let cmd = finished(&admin, id, Duration::from_secs(90)).await;
    assert_eq!((cmd.status, cmd.stdout.as_str()), (CommandStatus::Succeeded, "done\n"), "{}", agent.log_text());
    let log = agent.log_text();
    // Over the WebSocket (the default) or long-poll, whichever the agent was on.
    let delays: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Poll failed") || l.contains("Reconnecting the WebSocket"))
        .filter_map(|l| l.split("retry_in_ms=").nth(1))
        .collect();
    assert!(delays.len() >= 2, "the agent retried with backoff: {log}");
    assert!(delays.windows(2).any(|w| w[0] != w[1]), "delays vary (jitter): {delays:?}");
    // And the stream works again: a new command runs.
    let next = run_on(&admin, agent_id, "ping", serde_json::json!({}), 30).await;
    assert_eq!(finished(&admin, next, Duration::from_secs(60)).await.status, CommandStatus::Succeeded);
}

#[tokio::test]
async fn a_revoked_agent_exits_78_naming_the_revocation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(&dir.path().join("server"), 0);
    let admin = server.admin_with(server.admin_token.as_deref().expect("token"));
    let mut agent =
        AgentProcess::start(&dir.path().join("a"), &server.base, Some(&enroll_token(&admin, &[]).await), None);
    let id = agent.agent_id();
    // Let it park a long-poll, then revoke.
    tokio::time::sleep(Duration::from_millis(500)).await;
    admin.revoke_agent(id, "stolen laptop").await.expect("revoke");
    let status = agent.wait_exit(Duration::from_secs(35)).expect("agent exits within one poll cycle");
    assert_eq!(status.code(), Some(78));
    let log = agent.log_text();
    assert!(log.contains("revoked") && log.contains("stolen laptop"), "{log}");
}

#[tokio::test]
async fn status_and_poll_now_talk_to_the_running_daemon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(&dir.path().join("server"), 0);
    let admin = server.admin_with(server.admin_token.as_deref().expect("token"));
    let agent = AgentProcess::start(&dir.path().join("a"), &server.base, Some(&enroll_token(&admin, &[]).await), None);
    let id = agent.agent_id();
    let socket = agent.dir.join("state/agent.sock");
    eventually(Duration::from_secs(10), || async { socket.exists().then_some(()) }).await.expect("control socket");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&socket).expect("socket").permissions().mode() & 0o777, 0o600);
    let status_now = || {
        let out = std::process::Command::new(crate::common::tether_bin())
            .args(["agent", "status", "--json", "-c"])
            .arg(&agent.dir)
            .output()
            .expect("status");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json status")
    };
    // The stream runs over the WebSocket once the first connection is up.
    let status =
        eventually(Duration::from_secs(10), || async { Some(status_now()).filter(|s| s["connection"] == "websocket") })
            .await
            .unwrap_or_else(|| panic!("not on the WebSocket: {}", status_now()));
    assert_eq!(status["agent_id"], id.to_string());
    assert_eq!(status["server"], server.base);
    for key in ["uptime_s", "last_poll", "cursor", "queue_depth", "token_expires_at", "running_commands"] {
        assert!(status.get(key).is_some(), "status lacks {key}: {status}");
    }
    let out = std::process::Command::new(crate::common::tether_bin())
        .args(["agent", "poll-now", "-c"])
        .arg(&agent.dir)
        .output()
        .expect("poll-now");
    assert!(out.status.success());
    // Without a daemon the one-shots fail clearly.
    let out = std::process::Command::new(crate::common::tether_bin())
        .args(["agent", "status", "-c"])
        .arg(dir.path().join("nobody"))
        .output()
        .expect("status");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no agent is running"));
}

#[tokio::test]
async fn sigterm_lets_the_running_command_finish_and_report() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(&dir.path().join("server"), 0);
    let admin = server.admin_with(server.admin_token.as_deref().expect("token"));
    let mut agent = AgentProcess::start(
        &dir.path().join("a"),
        &server.base,
        Some(&enroll_token(&admin, &[]).await),
        Some("allow_shell = true"),
    );
    let started = dir.path().join("started");
    let script = format!("touch {}; sleep 2; echo finished", started.display());
    let id = run_on(&admin, agent.agent_id(), "shell", serde_json::json!({"script": script}), 60).await;
    eventually(Duration::from_secs(30), || async { started.exists().then_some(()) }).await.expect("command started");
    crate::common::signal(&agent.child, libc::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(20)).expect("agent stops");
    assert_eq!(status.code(), Some(0));
    let cmd = admin.get_command(id).await.expect("get");
    assert_eq!((cmd.status, cmd.stdout.as_str()), (CommandStatus::Succeeded, "finished\n"), "{}", agent.log_text());
}

#[tokio::test]
async fn tether_up_runs_a_server_with_a_local_agent_and_reuses_it() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    // A PATH without `tether` on it, as for someone who ran `cargo run`.
    let path = std::env::var("PATH").unwrap_or_default();
    let up = |port: u16| {
        let mut child = std::process::Command::new(crate::common::tether_bin())
            .args(["up", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(&data)
            .env("TETHER_LOG", "warn")
            .env("PATH", &path)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("tether up");
        let mut lines = Vec::new();
        let stdout = child.stdout.take().expect("stdout");
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("line");
            let done = line.contains("local agent state");
            lines.push(line);
            if done {
                break;
            }
        }
        let url = lines
            .iter()
            .find_map(|l| l.strip_prefix("tether is up: "))
            .unwrap_or_else(|| panic!("no URL line: {lines:?}"))
            .to_owned();
        (child, lines, url)
    };
    let (mut first, lines, url) = up(0);
    assert!(lines.iter().any(|l| l.trim() == format!("dashboard: {url}/ui/")), "{lines:?}");
    // Stdout is not a terminal: the credentials are in the file only.
    assert!(!lines.iter().any(|l| l.contains("tth_")), "{lines:?}");
    let token = crate::common::initial_admin_token(&data).expect("first start writes initial-admin.txt");
    let admin = Client::new(&url).expect("client").with_bearer(token.clone());
    let agents = eventually(Duration::from_secs(30), || async {
        let page = admin.list_agents(&Default::default()).await.ok()?;
        (page.data.len() == 1).then_some(page.data)
    })
    .await
    .expect("the local agent enrolls");
    let id = run_on(&admin, agents[0].id, "ping", serde_json::json!({}), 30).await;
    assert_eq!(finished(&admin, id, Duration::from_secs(30)).await.stdout, "pong\n");
    // The "try:" line works when pasted into a shell as printed.
    let try_line = lines.iter().find_map(|l| l.trim().strip_prefix("try: ")).expect("a try: line").to_owned();
    let out = std::process::Command::new("sh")
        .args(["-c", &try_line])
        .env("PATH", &path)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run the try: line");
    assert!(
        out.status.success(),
        "{try_line}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("pong"), "{}", String::from_utf8_lossy(&out.stdout));
    crate::common::signal(&first, libc::SIGTERM);
    first.wait().expect("wait");

    let port: u16 = url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port in URL");
    let (mut second, lines, _) = up(port);
    assert!(lines.iter().any(|l| l.contains("reusing")), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains(" server reset-admin")), "{lines:?}");
    // Same data: same token, same single agent.
    let admin = Client::new(&url).expect("client").with_bearer(token);
    let id = run_on(&admin, agents[0].id, "ping", serde_json::json!({}), 30).await;
    assert_eq!(finished(&admin, id, Duration::from_secs(30)).await.status, CommandStatus::Succeeded);
    assert_eq!(admin.list_agents(&Default::default()).await.expect("list").data.len(), 1);
    crate::common::signal(&second, libc::SIGTERM);
    second.wait().expect("wait");
}
