//! Black-box tests of the operator CLI: a real `tether server` process on a
//! free port, the real `tether` binary with its config dir in a temp dir, and
//! agents played in-test through `tether-client`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;
use tether_client::DeviceToken;
use tether_client::{Client, CommandQuery, Poll};
use tether_proto::agent::{CreateEnrollToken, EnrollRequest};
use tether_proto::command::{CommandStatus, ResultReport};
use tether_proto::signal::{COMMAND_QUEUED, CommandQueued};
use tether_proto::{AgentId, BatchId, CommandId, Labels};

#[path = "e2e/common.rs"]
mod common;

use common::ADMIN_PASSWORD;

/// A `tether server` on a free port with its own temp data dir.
struct Server {
    base: String,
    admin_token: String,
    _process: common::ServerProcess,
    /// The data dir; `tether.db` in it is the server's SQLite database.
    data: tempfile::TempDir,
}

impl Server {
    fn start() -> Self {
        let data = tempfile::tempdir().expect("data dir");
        let process = common::ServerProcess::start(data.path(), 0);
        let admin_token = process.admin_token.clone().expect("first start prints the admin API token");
        Self { base: process.base.clone(), admin_token, _process: process, data }
    }

    fn admin(&self) -> Client {
        Client::new(&self.base).expect("client").with_bearer(self.admin_token.clone())
    }

    /// Enrolls an agent with these labels; returns a client authenticated as it.
    async fn agent(&self, labels: &[(&str, &str)]) -> (Client, AgentId) {
        let labels: Labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let token = self
            .admin()
            .create_enroll_token(&CreateEnrollToken { labels, uses: 1, expires_in_s: 600 })
            .await
            .expect("enroll token")
            .token;
        let key = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
        let req = EnrollRequest {
            enroll_token: token,
            public_key: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes()),
            hostname: "cli-test-host".into(),
            labels: Labels::new(),
            facts: serde_json::json!({"os": "linux"}),
        };
        let pair = Client::new(&self.base).expect("client").enroll(&req).await.expect("enroll");
        (Client::new(&self.base).expect("client").with_bearer(pair.access_token), pair.agent_id)
    }
}

/// The `tether` binary with a private config dir and none of the caller's
/// TETHER_* settings.
fn tether(home: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"));
    for var in ["TETHER_SERVER", "TETHER_TOKEN", "TETHER_USER", "TETHER_PASSWORD"] {
        cmd.env_remove(var);
    }
    cmd.env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("RUST_BACKTRACE", "0")
        .env("TETHER_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }

    #[track_caller]
    fn assert_ok(&self) -> &Self {
        assert_eq!(self.code, Some(0), "stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        self
    }
}

async fn output(mut cmd: tokio::process::Command) -> Out {
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the CLI finishes within 60 s")
        .expect("run tether");
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The CLI authenticated with `token` against `server`.
async fn cli(server: &Server, home: &Path, token: &str, args: &[&str]) -> Out {
    let mut cmd = tether(home);
    cmd.env("TETHER_SERVER", &server.base).env("TETHER_TOKEN", token).args(args);
    output(cmd).await
}

/// Plays one agent: waits for its next queued command, reports it running,
/// then reports `result`. Returns the command's id.
async fn answer_next_command(agent: &Client, result: ResultReport) -> CommandId {
    let play = async {
        let mut cursor: Option<String> = None;
        loop {
            match agent.updates(cursor.as_deref(), 100, 5).await.expect("poll") {
                Poll::Idle { cursor: next } => cursor = Some(next),
                Poll::Signals(updates) => {
                    cursor = Some(updates.cursor.clone());
                    let queued = updates.signals.into_iter().find(|s| s.kind == COMMAND_QUEUED);
                    if let Some(signal) = queued {
                        let cmd: CommandQueued = serde_json::from_value(signal.reference).expect("command.queued ref");
                        agent.report_running(cmd.command_id).await.expect("report running");
                        agent.report_result(cmd.command_id, &result).await.expect("report result");
                        return cmd.command_id;
                    }
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), play).await.expect("a command arrives within 30 s")
}

fn result(status: CommandStatus, exit_code: i32, stdout: &str, stderr: &str) -> ResultReport {
    ResultReport {
        exit_code: Some(exit_code),
        stdout: stdout.into(),
        stderr: stderr.into(),
        ..ResultReport::new(status)
    }
}

async fn batch_agents(server: &Server, batch: BatchId) -> Vec<AgentId> {
    let query = CommandQuery { batch_id: Some(batch), ..CommandQuery::default() };
    let mut agents: Vec<_> =
        server.admin().list_commands(&query).await.expect("list").data.into_iter().map(|c| c.agent_id).collect();
    agents.sort();
    agents
}

#[tokio::test(flavor = "multi_thread")]
async fn login_saves_private_credentials_that_later_commands_use() {
    let server = Server::start();
    let (_agent, agent_id) = server.agent(&[("role", "web")]).await;
    let home = tempfile::tempdir().expect("home");

    let mut login = tether(home.path());
    login.args(["login", "--server", &server.base, "--user", "admin"]).env("TETHER_PASSWORD", ADMIN_PASSWORD);
    let out = output(login).await;
    out.assert_ok();

    let path = home.path().join("config/tether/credentials.json");
    let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(path.parent().expect("dir")), 0o700);
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    assert_eq!(saved["server"], server.base.as_str());
    let token = saved["token"].as_str().expect("token saved");
    assert!(token.starts_with("tth_"), "an API token was saved");
    assert!(!out.stdout.contains(token) && !out.stderr.contains(token), "the token is never printed");

    // No --server, no token: everything comes from the saved login.
    let mut list = tether(home.path());
    list.args(["agents", "list", "-o", "json"]);
    let out = output(list).await;
    out.assert_ok();
    let agents = out.json();
    let ids: Vec<&str> = agents.as_array().expect("array").iter().filter_map(|a| a["id"].as_str()).collect();
    assert_eq!(ids, vec![agent_id.to_string()]);

    // The saved token is a personal API token named after this host, and it expires.
    let tokens = server.admin().list_api_tokens().await.expect("tokens");
    let cli_tokens: Vec<_> = tokens.iter().filter(|t| t.name.starts_with("cli@")).collect();
    assert_eq!(cli_tokens.len(), 1, "{tokens:?}");
    assert!(cli_tokens[0].expires_at.is_some(), "login tokens expire");

    // Logging in again replaces the token and revokes the one it replaced.
    let mut again = tether(home.path());
    again.args(["login", "--user", "admin"]).env("TETHER_PASSWORD", ADMIN_PASSWORD);
    output(again).await.assert_ok();
    let tokens = server.admin().list_api_tokens().await.expect("tokens");
    let live: Vec<_> = tokens.iter().filter(|t| t.name.starts_with("cli@") && t.revoked_at.is_none()).collect();
    assert_eq!(live.len(), 1, "only the new login token is live: {tokens:?}");
    assert_ne!(live[0].id, cli_tokens[0].id);
    let err = Client::new(&server.base).expect("client").with_bearer(token).list_api_tokens().await;
    assert_eq!(err.expect_err("old token revoked").status(), Some(401));
}

#[tokio::test(flavor = "multi_thread")]
async fn login_with_a_wrong_password_fails_and_saves_nothing() {
    let server = Server::start();
    let home = tempfile::tempdir().expect("home");
    let mut login = tether(home.path());
    login.args(["login", "--server", &server.base, "--user", "admin"]).env("TETHER_PASSWORD", "wrong");
    let out = output(login).await;
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("login failed") && out.stderr.contains("UNAUTHENTICATED"), "{}", out.stderr);
    assert!(!home.path().join("config/tether/credentials.json").exists());

    // --token is checked before it is saved.
    let mut login = tether(home.path());
    login.args(["login", "--server", &server.base, "--token", "tth_bogus"]);
    let out = output(login).await;
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(!home.path().join("config/tether/credentials.json").exists());

    let mut login = tether(home.path());
    login.args(["login", "--server", &server.base, "--token", &server.admin_token]);
    output(login).await.assert_ok();
    assert!(home.path().join("config/tether/credentials.json").exists());

    // --token-stdin keeps the token out of the process list.
    let other = tempfile::tempdir().expect("home");
    let mut login = tether(other.path());
    login.args(["login", "--server", &server.base, "--token-stdin"]).stdin(Stdio::piped());
    let mut child = login.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    tokio::io::AsyncWriteExt::write_all(&mut stdin, format!("{}\n", server.admin_token).as_bytes())
        .await
        .expect("write");
    drop(stdin);
    let status = child.wait().await.expect("wait");
    assert!(status.success());
    let saved = std::fs::read_to_string(other.path().join("config/tether/credentials.json")).expect("saved");
    assert!(saved.contains(&server.admin_token));
}

#[tokio::test(flavor = "multi_thread")]
async fn enroll_tokens_are_created_listed_and_revoked() {
    let server = Server::start();
    let home = tempfile::tempdir().expect("home");
    let token = server.admin_token.clone();

    let out =
        cli(&server, home.path(), &token, &["enroll-tokens", "create", "--label", "role=web", "--uses", "3"]).await;
    out.assert_ok();
    let secret = out.stdout.split_whitespace().find(|w| w.starts_with("tte_")).expect("secret printed");
    assert_eq!(out.stdout.matches(secret).count(), 1, "the secret is printed once: {}", out.stdout);
    assert!(out.stdout.contains("TETHER_ENROLL_TOKEN="), "{}", out.stdout);
    assert!(out.stdout.contains(&format!("tether agent --server {}", server.base)), "{}", out.stdout);

    let out = cli(&server, home.path(), &token, &["enroll-tokens", "create", "--label", "role=db", "-o", "json"]).await;
    out.assert_ok();
    let created = out.json();
    let id = created["id"].as_str().expect("id").to_owned();
    assert!(created["token"].as_str().is_some_and(|t| !t.is_empty()));

    let out = cli(&server, home.path(), &token, &["enroll-tokens", "list", "-o", "json"]).await;
    out.assert_ok();
    let listed = out.json();
    let listed = listed.as_array().expect("array");
    assert_eq!(listed.len(), 2);
    let mine = listed.iter().find(|t| t["id"] == id.as_str()).expect("created token listed");
    assert_eq!(mine["labels"], serde_json::json!({"role": "db"}));
    assert!(mine["revoked_at"].is_null());
    assert!(listed.iter().all(|t| t.get("token").is_none()), "secrets are never listed");

    cli(&server, home.path(), &token, &["enroll-tokens", "revoke", &id]).await.assert_ok();
    let out = cli(&server, home.path(), &token, &["enroll-tokens", "list", "-o", "json"]).await;
    let listed = out.json();
    let mine = listed.as_array().expect("array").iter().find(|t| t["id"] == id.as_str()).cloned().expect("listed");
    assert!(!mine["revoked_at"].is_null(), "{mine}");

    let out = cli(&server, home.path(), &token, &["enroll-tokens", "list"]).await;
    out.assert_ok();
    assert!(out.stdout.contains("revoked") && out.stdout.contains("role=web"), "{}", out.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn api_tokens_are_created_used_and_revoked() {
    let server = Server::start();
    let home = tempfile::tempdir().expect("home");
    let admin = server.admin_token.clone();

    let out = cli(&server, home.path(), &admin, &["tokens", "create", "ci-deploy", "-o", "json"]).await;
    out.assert_ok();
    let created = out.json();
    let (id, secret) = (created["id"].as_str().expect("id"), created["token"].as_str().expect("secret"));

    cli(&server, home.path(), secret, &["agents", "list"]).await.assert_ok();
    let out = cli(&server, home.path(), &admin, &["tokens", "list"]).await;
    out.assert_ok();
    assert!(out.stdout.contains("ci-deploy"), "{}", out.stdout);

    cli(&server, home.path(), &admin, &["tokens", "revoke", id]).await.assert_ok();
    let out = cli(&server, home.path(), secret, &["agents", "list"]).await;
    assert_eq!(out.code, Some(1), "a revoked token no longer works");
}

#[tokio::test(flavor = "multi_thread")]
async fn run_no_wait_targets_only_the_labelled_agents() {
    let server = Server::start();
    let (_w1, web1) = server.agent(&[("role", "web"), ("dc", "a")]).await;
    let (_w2, web2) = server.agent(&[("role", "web"), ("dc", "b")]).await;
    let (_d, _db) = server.agent(&[("role", "db")]).await;
    let home = tempfile::tempdir().expect("home");
    let token = server.admin_token.clone();

    let args = ["run", "--label", "role=web", "--no-wait", "-o", "json", "--", "ping"];
    let out = cli(&server, home.path(), &token, &args).await;
    out.assert_ok();
    let batch: BatchId = out.json()["batch_id"].as_str().expect("batch id").parse().expect("uuid");
    let mut expected = vec![web1, web2];
    expected.sort();
    assert_eq!(batch_agents(&server, batch).await, expected);

    // Several labels must all match.
    let args = ["run", "--label", "role=web", "--label", "dc=b", "--no-wait", "--", "ping", "count=2", "note=hi"];
    let out = cli(&server, home.path(), &token, &args).await;
    out.assert_ok();
    let batch: BatchId = out
        .stdout
        .split_whitespace()
        .nth(1)
        .and_then(|w| w.trim_end_matches(':').parse().ok())
        .unwrap_or_else(|| panic!("batch id in {:?}", out.stdout));
    assert_eq!(batch_agents(&server, batch).await, vec![web2]);
    let query = CommandQuery { batch_id: Some(batch), ..CommandQuery::default() };
    let cmd = server.admin().list_commands(&query).await.expect("list").data.remove(0);
    assert_eq!(cmd.args, serde_json::json!({"count": 2, "note": "hi"}));
}

#[tokio::test(flavor = "multi_thread")]
async fn run_waits_for_every_result_and_exits_zero_when_all_succeed() {
    let server = Server::start();
    let (a, a_id) = server.agent(&[("role", "web")]).await;
    let (b, b_id) = server.agent(&[("role", "web")]).await;
    let home = tempfile::tempdir().expect("home");

    let mut cmd = tether(home.path());
    cmd.env("TETHER_SERVER", &server.base)
        .env("TETHER_TOKEN", &server.admin_token)
        .args(["run", "--label", "role=web", "--", "ping"]);
    let (out, _, _) = tokio::join!(
        output(cmd),
        answer_next_command(&a, result(CommandStatus::Succeeded, 0, "pong from a\n", "")),
        answer_next_command(&b, result(CommandStatus::Succeeded, 0, "pong from b\nsecond line\n", "")),
    );
    out.assert_ok();
    for (id, text) in [(a_id, "pong from a"), (b_id, "pong from b")] {
        let row = out.stdout.lines().find(|l| l.contains(&id.to_string())).unwrap_or_else(|| panic!("{}", out.stdout));
        assert!(row.contains("succeeded") && row.contains(text), "{row}");
    }
    assert!(!out.stdout.contains("second line"), "only the first line is shown");
}

#[tokio::test(flavor = "multi_thread")]
async fn run_exits_one_when_a_command_fails_and_json_lists_every_command() {
    let server = Server::start();
    let (a, a_id) = server.agent(&[("role", "web")]).await;
    let (b, b_id) = server.agent(&[("role", "web")]).await;
    let home = tempfile::tempdir().expect("home");

    let mut cmd = tether(home.path());
    cmd.env("TETHER_SERVER", &server.base).env("TETHER_TOKEN", &server.admin_token).args([
        "run",
        "--agent",
        &a_id.to_string(),
        "--agent",
        &b_id.to_string(),
        "-o",
        "json",
        "--",
        "ping",
    ]);
    let (out, _, _) = tokio::join!(
        output(cmd),
        answer_next_command(&a, result(CommandStatus::Succeeded, 0, "pong\n", "")),
        answer_next_command(&b, result(CommandStatus::Failed, 3, "", "boom\n")),
    );
    assert_eq!(out.code, Some(1), "stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("1 of 2 command(s) did not succeed"), "{}", out.stderr);
    let commands = out.json();
    let commands = commands.as_array().expect("array");
    assert_eq!(commands.len(), 2);
    let failed = commands.iter().find(|c| c["agent_id"] == b_id.to_string().as_str()).expect("b's command");
    assert_eq!((failed["status"].as_str(), failed["exit_code"].as_i64()), (Some("failed"), Some(3)));
    assert_eq!(failed["stderr"], "boom\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn run_table_shows_the_failure_and_exits_one() {
    let server = Server::start();
    let (a, a_id) = server.agent(&[("role", "web")]).await;
    let home = tempfile::tempdir().expect("home");

    let mut cmd = tether(home.path());
    cmd.env("TETHER_SERVER", &server.base)
        .env("TETHER_TOKEN", &server.admin_token)
        .args(["run", "--all", "--", "ping"]);
    let (out, _) =
        tokio::join!(output(cmd), answer_next_command(&a, result(CommandStatus::Failed, 3, "", "disk full\n")));
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let row = out.stdout.lines().find(|l| l.contains(&a_id.to_string())).unwrap_or_else(|| panic!("{}", out.stdout));
    assert!(row.contains("failed") && row.contains('3') && row.contains("disk full"), "{row}");
}

#[tokio::test(flavor = "multi_thread")]
async fn run_gives_up_after_the_wait_timeout_and_exits_one() {
    let server = Server::start();
    let (_silent, _) = server.agent(&[("role", "web")]).await;
    let home = tempfile::tempdir().expect("home");
    let started = Instant::now();
    let out =
        cli(&server, home.path(), &server.admin_token, &["run", "--all", "--wait-timeout", "1", "--", "ping"]).await;
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("gave up waiting after 1s"), "{}", out.stderr);
    assert!(out.stdout.contains("queued"), "the table shows where things stand: {}", out.stdout);
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread")]
async fn run_on_a_label_no_agent_has_says_so_and_exits_one() {
    let server = Server::start();
    let (_a, _) = server.agent(&[("role", "web")]).await;
    let home = tempfile::tempdir().expect("home");
    let out = cli(&server, home.path(), &server.admin_token, &["run", "--label", "role=nope", "--", "ping"]).await;
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("matched no agents"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_and_batches_can_be_inspected_and_cancelled() {
    let server = Server::start();
    let (_a, a_id) = server.agent(&[("role", "web")]).await;
    let (_b, _) = server.agent(&[("role", "web")]).await;
    let home = tempfile::tempdir().expect("home");
    let token = server.admin_token.clone();

    let out = cli(&server, home.path(), &token, &["run", "--all", "--no-wait", "-o", "json", "--", "ping"]).await;
    out.assert_ok();
    let created = out.json();
    let batch = created["batch_id"].as_str().expect("batch").to_owned();

    let out =
        cli(&server, home.path(), &token, &["commands", "list", "--batch", &batch, "--agent", &a_id.to_string()]).await;
    out.assert_ok();
    assert!(out.stdout.contains(&a_id.to_string()) && out.stdout.contains("1 command(s)"), "{}", out.stdout);

    let out =
        cli(&server, home.path(), &token, &["commands", "list", "--status", "queued,delivered", "-o", "json"]).await;
    out.assert_ok();
    let first = out.json()[0]["id"].as_str().expect("a command").to_owned();

    let out = cli(&server, home.path(), &token, &["commands", "show", &first]).await;
    out.assert_ok();
    assert!(out.stdout.contains(&batch) && out.stdout.contains("--- stdout ---"), "{}", out.stdout);

    cli(&server, home.path(), &token, &["commands", "cancel", &first]).await.assert_ok();
    let out = cli(&server, home.path(), &token, &["commands", "cancel", &first]).await;
    assert_eq!(out.code, Some(1), "a terminal command cannot be cancelled again");
    assert!(out.stderr.contains("CONFLICT"), "{}", out.stderr);

    let out = cli(&server, home.path(), &token, &["batches", "cancel", &batch, "-o", "json"]).await;
    out.assert_ok();
    let done = out.json();
    assert_eq!(done["status"], "done");
    assert_eq!(done["counts"]["cancelled"], 2);
    let out = cli(&server, home.path(), &token, &["batches", "show", &batch]).await;
    out.assert_ok();
    assert!(out.stdout.contains("cancelled=2"), "{}", out.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_token_gives_a_clear_error() {
    let server = Server::start();
    let home = tempfile::tempdir().expect("home");
    let out = cli(&server, home.path(), "tth_not_a_real_token", &["agents", "list"]).await;
    assert_eq!(out.code, Some(1));
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert!(out.stderr.contains("UNAUTHENTICATED") && out.stderr.contains("tether login"), "{}", out.stderr);
}

#[tokio::test]
async fn no_credentials_at_all_says_to_log_in() {
    let home = tempfile::tempdir().expect("home");
    let mut cmd = tether(home.path());
    cmd.args(["agents", "list"]);
    let out = output(cmd).await;
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("run `tether login` or set TETHER_TOKEN"), "{}", out.stderr);
}

#[tokio::test]
async fn errors_are_one_line_without_a_backtrace_even_when_rust_backtrace_is_set() {
    // A "server" that accepts and at once closes every connection: the CLI's
    // request fails with a transport error, every time.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    let home = tempfile::tempdir().expect("home");
    let mut cmd = tether(home.path());
    cmd.env("RUST_BACKTRACE", "1").env("RUST_LIB_BACKTRACE", "1");
    cmd.env("TETHER_SERVER", &url).env("TETHER_TOKEN", "tth_x").args(["agents", "list"]);
    let out = output(cmd).await;
    assert_eq!(out.code, Some(1), "stderr:\n{}", out.stderr);
    assert!(!out.stderr.to_lowercase().contains("stack backtrace"), "{}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line of error and causes: {}", out.stderr);
    assert!(lines[0].starts_with("error: "), "{}", out.stderr);
}

#[tokio::test]
async fn run_without_a_target_is_a_usage_error() {
    let home = tempfile::tempdir().expect("home");
    let mut cmd = tether(home.path());
    cmd.env("TETHER_TOKEN", "tth_x").args(["run", "--", "ping"]);
    let out = output(cmd).await;
    assert_eq!(out.code, Some(2), "clap's usage-error exit code");
    assert!(out.stderr.contains("--agent") && out.stderr.contains("--all"), "{}", out.stderr);

    let mut cmd = tether(home.path());
    cmd.env("TETHER_TOKEN", "tth_x").args(["run", "--all", "--label", "a=b", "--", "ping"]);
    assert_eq!(output(cmd).await.code, Some(2), "two kinds of target");
}

/// Like [`cli`], with `input` on the CLI's stdin.
async fn cli_stdin(server: &Server, home: &Path, token: &str, args: &[&str], input: &str) -> Out {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tether(home);
    cmd.env("TETHER_SERVER", &server.base).env("TETHER_TOKEN", token).args(args);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run tether");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input.as_bytes()).await.expect("write stdin");
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the CLI finishes within 60 s")
        .expect("wait for tether");
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The CLI with HTTP Basic credentials (TETHER_USER / TETHER_PASSWORD).
async fn cli_as(server: &Server, home: &Path, user: &str, password: &str, args: &[&str]) -> Out {
    let mut cmd = tether(home);
    cmd.env("TETHER_SERVER", &server.base).env("TETHER_USER", user).env("TETHER_PASSWORD", password).args(args);
    output(cmd).await
}

/// `users list -o json` as `{username: (role, disabled)}`.
async fn users_by_name(server: &Server, home: &Path) -> std::collections::BTreeMap<String, (String, bool)> {
    let out = cli(server, home, &server.admin_token, &["users", "list", "-o", "json"]).await;
    out.assert_ok();
    out.json()
        .as_array()
        .expect("array")
        .iter()
        .map(|u| {
            let name = u["username"].as_str().expect("username").to_owned();
            (name, (u["role"].as_str().expect("role").to_owned(), u["disabled"].as_bool().expect("disabled")))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn users_are_created_listed_re_roled_and_deleted_and_a_viewer_is_forbidden() {
    let server = Server::start();
    let home = tempfile::tempdir().expect("home");
    let admin = server.admin_token.clone();
    let alice_pw = "alice-password-1234";

    let out = cli_stdin(
        &server,
        home.path(),
        &admin,
        &["users", "create", "alice", "--role", "viewer", "--password-stdin"],
        &format!("{alice_pw}\n"),
    )
    .await;
    out.assert_ok();
    assert!(out.stdout.contains("created user alice") && out.stdout.contains("viewer"), "{}", out.stdout);
    assert!(!out.stdout.contains(alice_pw), "a password given on stdin is never echoed");
    assert_eq!(users_by_name(&server, home.path()).await.get("alice"), Some(&("viewer".to_owned(), false)));

    // Without a terminal and without a flag there is nowhere to take a password from.
    let out = cli(&server, home.path(), &admin, &["users", "create", "nopw", "--role", "viewer"]).await;
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("--password-stdin"), "{}", out.stderr);

    // A viewer gets a clear forbidden error, not a crash or a login hint.
    let out = cli_as(
        &server,
        home.path(),
        "alice",
        alice_pw,
        &["users", "create", "mallory", "--role", "admin", "--generate-password"],
    )
    .await;
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("FORBIDDEN") && out.stderr.contains("your role does not allow this"), "{}", out.stderr);
    assert!(!users_by_name(&server, home.path()).await.contains_key("mallory"));

    // A generated password is printed once and works.
    let out =
        cli(&server, home.path(), &admin, &["users", "create", "carol", "--role", "operator", "--generate-password"])
            .await;
    out.assert_ok();
    let carol_pw = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("password (shown only this once): "))
        .unwrap_or_else(|| panic!("generated password printed:\n{}", out.stdout))
        .to_owned();
    assert!(carol_pw.len() >= 12, "{carol_pw:?}");
    let out = cli_as(&server, home.path(), "carol", &carol_pw, &["agents", "list", "-o", "json"]).await;
    out.assert_ok();

    let out = cli(&server, home.path(), &admin, &["users", "set-role", "alice", "operator"]).await;
    out.assert_ok();
    assert!(out.stdout.contains("alice now has role operator"), "{}", out.stdout);
    assert_eq!(users_by_name(&server, home.path()).await.get("alice"), Some(&("operator".to_owned(), false)));

    let new_pw = "alice-new-password-5678";
    let out = cli_stdin(
        &server,
        home.path(),
        &admin,
        &["users", "set-password", "alice", "--password-stdin"],
        &format!("{new_pw}\n"),
    )
    .await;
    out.assert_ok();
    let out = cli_as(&server, home.path(), "alice", alice_pw, &["agents", "list"]).await;
    assert!(out.stderr.contains("UNAUTHENTICATED"), "the old password stops working: {}", out.stderr);
    cli_as(&server, home.path(), "alice", new_pw, &["agents", "list"]).await.assert_ok();

    let out = cli(&server, home.path(), &admin, &["users", "delete", "alice"]).await;
    out.assert_ok();
    assert!(out.stdout.contains("deleted user alice"), "{}", out.stdout);
    assert_eq!(users_by_name(&server, home.path()).await.get("alice"), Some(&("operator".to_owned(), true)));
    let out = cli_as(&server, home.path(), "alice", new_pw, &["agents", "list"]).await;
    assert!(out.stderr.contains("UNAUTHENTICATED"), "a deleted user cannot log in: {}", out.stderr);

    let out = cli(&server, home.path(), &admin, &["users", "set-role", "nobody", "viewer"]).await;
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("no user named \"nobody\""), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_list_applies_the_filters() {
    let server = Server::start();
    let home = tempfile::tempdir().expect("home");
    let admin = server.admin_token.clone();
    for name in ["dave", "erin"] {
        cli(&server, home.path(), &admin, &["users", "create", name, "--role", "viewer", "--generate-password"])
            .await
            .assert_ok();
    }
    cli(&server, home.path(), &admin, &["enroll-tokens", "create"]).await.assert_ok();

    let rows = |out: Out| -> Vec<Value> {
        out.assert_ok();
        out.json().as_array().expect("array").clone()
    };
    let created =
        rows(cli(&server, home.path(), &admin, &["audit", "list", "--action", "user.create", "-o", "json"]).await);
    assert_eq!(created.len(), 2, "{created:?}");
    assert!(created.iter().all(|r| r["action"] == "user.create" && r["actor"] == "admin"), "{created:?}");
    assert!(created[0]["id"].as_i64() > created[1]["id"].as_i64(), "newest first");

    let all = rows(cli(&server, home.path(), &admin, &["audit", "list", "-o", "json"]).await);
    assert!(all.len() > created.len() && all.iter().any(|r| r["action"] != "user.create"), "{all:?}");
    assert_eq!(
        rows(cli(&server, home.path(), &admin, &["audit", "list", "--limit", "1", "-o", "json"]).await).len(),
        1
    );
    assert!(
        rows(cli(&server, home.path(), &admin, &["audit", "list", "--actor", "nobody", "-o", "json"]).await).is_empty()
    );
    let recent = rows(
        cli(&server, home.path(), &admin, &["audit", "list", "--action", "user.create", "--since", "1h", "-o", "json"])
            .await,
    );
    assert_eq!(recent.len(), 2);
    let old = rows(
        cli(&server, home.path(), &admin, &["audit", "list", "--until", "2000-01-01T00:00:00Z", "-o", "json"]).await,
    );
    assert!(old.is_empty(), "{old:?}");

    let out = cli(&server, home.path(), &admin, &["audit", "list", "--action", "user.create"]).await;
    out.assert_ok();
    assert!(out.stdout.starts_with("ID") || out.stdout.trim_start().starts_with("ID"), "{}", out.stdout);
    assert_eq!(out.stdout.lines().filter(|l| l.contains("user.create")).count(), 2, "{}", out.stdout);

    let out = cli(&server, home.path(), &admin, &["audit", "list", "--since", "yesterday"]).await;
    assert_eq!(out.code, Some(2), "a bad time is a usage error: {}", out.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_verify_reports_every_altered_row_and_exits_one_and_two_for_other_errors() {
    let server = Server::start();
    let home = tempfile::tempdir().expect("home");
    let admin = server.admin_token.clone();
    for name in ["frank", "grace", "heidi"] {
        cli(&server, home.path(), &admin, &["users", "create", name, "--role", "viewer", "--generate-password"])
            .await
            .assert_ok();
    }
    let out = cli(&server, home.path(), &admin, &["audit", "verify"]).await;
    out.assert_ok();
    assert!(out.stdout.contains("audit log OK"), "{}", out.stdout);
    let total = server.admin().list_audit(&Default::default()).await.expect("audit").data.len();
    assert!(out.stdout.contains(&format!("{total} rows")), "the row count is printed ({total}): {}", out.stdout);

    // Alter the row for grace directly in the database, as someone with
    // access to the file could.
    let rows = server
        .admin()
        .list_audit(&tether_client::AuditQuery { action: Some("user.create".into()), ..Default::default() })
        .await
        .expect("audit")
        .data;
    let victim = rows.iter().find(|r| r.details["username"] == "grace").expect("grace's row").id;
    let second = rows.iter().find(|r| r.details["username"] == "heidi").expect("heidi's row").id;
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(server.data.path().join("tether.db"))
        .busy_timeout(Duration::from_secs(10));
    let db = sqlx::SqlitePool::connect_with(opts).await.expect("open the server's database");
    // Two separate rows: the first must not hide the second.
    for (id, sql) in [
        (victim, "UPDATE audit SET outcome = 'denied' WHERE id = ?"),
        (second, "UPDATE audit SET details = '{\"username\":\"mallory\"}' WHERE id = ?"),
    ] {
        let changed =
            sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).execute(&db).await.expect("tamper").rows_affected();
        assert_eq!(changed, 1);
    }
    db.close().await;

    let out = cli(&server, home.path(), &admin, &["audit", "verify"]).await;
    assert_eq!(out.code, Some(1), "a broken chain fails the check:\n{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains(&format!("BROKEN at row {victim}:")), "{}", out.stdout);
    assert!(out.stdout.contains(&format!("BROKEN at row {second}:")), "every broken row is named: {}", out.stdout);
    assert!(out.stdout.contains("altered"), "says what is wrong: {}", out.stdout);
    let out = cli(&server, home.path(), &admin, &["audit", "verify", "-o", "json"]).await;
    assert_eq!(out.code, Some(1));
    let v = out.json();
    assert_eq!((v["ok"].as_bool(), v["first_bad_id"].as_i64()), (Some(false), Some(victim)), "{v}");
    let broken: Vec<i64> = v["broken"].as_array().expect("broken").iter().filter_map(|b| b["id"].as_i64()).collect();
    assert_eq!(broken, vec![victim, second], "{v}");

    // Anything that is not a verdict on the chain exits 2.
    let out = cli(&server, home.path(), "tth_not-a-token", &["audit", "verify"]).await;
    assert_eq!(out.code, Some(2), "refused credentials:\n{}\n{}", out.stdout, out.stderr);
    let mut cmd = tether(home.path());
    cmd.env("TETHER_SERVER", "http://127.0.0.1:1").env("TETHER_TOKEN", &admin).args(["audit", "verify"]);
    let out = output(cmd).await;
    assert_eq!(out.code, Some(2), "an unreachable server:\n{}\n{}", out.stdout, out.stderr);
}

/// Issue 10: an agent reporting a float that does not survive a parse/print
/// round trip byte for byte must leave the chain verifiable.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_reported_float_leaves_the_chain_intact() {
    let server = Server::start();
    let home = tempfile::tempdir().expect("home");
    let (agent, _) = server.agent(&[]).await;
    let details: Value = serde_json::from_str(r#"{"v":9.7084255809572990e79}"#).expect("json");
    let event = tether_proto::user::AgentAuditEvent { action: "x".into(), target: String::new(), details };
    agent.agent_audit(&event).await.expect("the agent's row is accepted");
    let out = cli(&server, home.path(), &server.admin_token, &["audit", "verify"]).await;
    out.assert_ok();
    assert!(out.stdout.contains("audit log OK"), "{}", out.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn device_approve_and_deny_accept_any_code_form_and_set_labels() {
    let server = Server::start();
    let home = tempfile::tempdir().expect("home");
    let admin = server.admin_token.clone();
    let anon = Client::new(&server.base).expect("client");
    let key = |seed: u8| {
        let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes())
    };

    let auth = anon.device_authorization(&key(1), "dev-box").await.expect("device authorization");
    // Typed lowercase and without the dash: the server normalizes.
    let typed = auth.user_code.replace('-', "").to_lowercase();
    let out =
        cli(&server, home.path(), &admin, &["device", "approve", &typed, "--label", "role=dev", "--label", "env=test"])
            .await;
    out.assert_ok();
    assert!(out.stdout.contains(&format!("approved device {}", auth.user_code)), "{}", out.stdout);
    // What the server knows about the device is shown (RFC 8628 §5.4).
    let fingerprint = tether_proto::agent::key_fingerprint(
        ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key().as_bytes(),
    );
    for shown in [
        "hostname         dev-box",
        "requested from   127.0.0.1",
        "requested at",
        &format!("key fingerprint  {fingerprint}"),
    ] {
        assert!(out.stdout.contains(shown), "{shown:?} missing from\n{}", out.stdout);
    }
    let DeviceToken::Issued(pair) = anon.device_token(&auth.device_code).await.expect("poll") else {
        panic!("an approved device gets tokens");
    };
    let agent = server.admin().get_agent(pair.agent_id).await.expect("agent");
    let expected: Labels =
        [("env", "test"), ("role", "dev")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    assert_eq!(agent.labels, expected);
    assert_eq!(agent.hostname, "dev-box");

    let auth = anon.device_authorization(&key(2), "other-box").await.expect("device authorization");
    let out = cli(&server, home.path(), &admin, &["device", "deny", &auth.user_code]).await;
    out.assert_ok();
    assert!(out.stdout.contains(&format!("denied device {}", auth.user_code)), "{}", out.stdout);
    assert_eq!(anon.device_token(&auth.device_code).await.expect("poll"), DeviceToken::Denied);

    // Nothing is pending under a code that was already decided.
    let out = cli(&server, home.path(), &admin, &["device", "approve", &auth.user_code]).await;
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("NOT_FOUND"), "{}", out.stderr);

    // What cannot be a code is refused before it reaches the server.
    let out = cli(&server, home.path(), &admin, &["device", "approve", "AEIO-UAEI"]).await;
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("is not a device code"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn config_set_history_diff_rollback_and_label_work_from_the_cli() {
    let server = Server::start();
    let home = tempfile::tempdir().expect("home");
    let token = server.admin_token.clone();
    let (_agent, id) = server.agent(&[("role", "web")]).await;

    let out =
        cli_stdin(&server, home.path(), &token, &["config", "set", "global", "-", "-m", "first"], r#"{"a": 1}"#).await;
    out.assert_ok();
    assert!(out.stdout.contains("global is at version 1") && out.stdout.contains("1 agent(s)"), "{}", out.stdout);
    // Without --if-match the CLI reads the version it replaces.
    let doc = r#"{"a": 2, "b": {"c": true}}"#;
    cli_stdin(&server, home.path(), &token, &["config", "set", "global", "-", "-m", "second"], doc).await.assert_ok();
    // A stale --if-match is refused and writes nothing.
    let stale =
        cli_stdin(&server, home.path(), &token, &["config", "set", "global", "-", "--if-match", "1"], r#"{"a": 9}"#)
            .await;
    assert_ne!(stale.code, Some(0));
    assert!(stale.stderr.contains("version 2"), "{}", stale.stderr);
    // Not a JSON object: refused before anything is sent.
    let bad = cli_stdin(&server, home.path(), &token, &["config", "set", "global", "-"], "[1, 2]").await;
    assert_ne!(bad.code, Some(0));
    assert!(bad.stderr.contains("JSON object"), "{}", bad.stderr);

    let history = cli(&server, home.path(), &token, &["config", "history", "global", "-o", "json"]).await;
    let versions: Vec<u64> =
        history.assert_ok().json().as_array().expect("array").iter().filter_map(|v| v["version"].as_u64()).collect();
    assert_eq!(versions, vec![2, 1], "newest first, nothing from the refused writes");
    let diff = cli(&server, home.path(), &token, &["config", "diff", "global", "1", "2"]).await;
    assert_eq!(diff.assert_ok().stdout, "~ /a: 1 → 2\n+ /b/c: true\n");
    let get = cli(&server, home.path(), &token, &["config", "get", "global", "--version", "1"]).await;
    assert_eq!(get.assert_ok().json(), serde_json::json!({"a": 1}));

    cli(&server, home.path(), &token, &["config", "rollback", "global", "1"]).await.assert_ok();
    let current = cli(&server, home.path(), &token, &["config", "get", "global", "-o", "json"]).await;
    let current = current.assert_ok().json();
    assert_eq!((current["version"].as_u64(), &current["doc"]), (Some(3), &serde_json::json!({"a": 1})));

    // Relabelling the agent puts it under the label scope's document.
    cli_stdin(&server, home.path(), &token, &["config", "set", "label:role=db", "-"], r#"{"a": "db"}"#)
        .await
        .assert_ok();
    cli(&server, home.path(), &token, &["agents", "label", &id.to_string(), "role=db"]).await.assert_ok();
    let effective = cli(&server, home.path(), &token, &["config", "effective", &id.to_string()]).await;
    let line = effective.assert_ok().stdout.lines().find(|l| l.contains("/a")).unwrap_or_default().to_owned();
    assert!(line.contains("\"db\"") && line.contains("label:role=db v1"), "{}", effective.stdout);
    let list = cli(&server, home.path(), &token, &["agents", "list"]).await;
    assert!(list.assert_ok().stdout.contains("CONFIG APPLIED → DESIRED"), "{}", list.stdout);
    let scopes = cli(&server, home.path(), &token, &["config", "list", "-o", "json"]).await;
    let names: Vec<String> = scopes
        .assert_ok()
        .json()
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|s| s["scope"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(names, vec!["global", "label:role=db"]);
}
