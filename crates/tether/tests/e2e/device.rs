//! The RFC 8628 device flow end to end: a real `tether agent --device-flow`
//! prints a code, a real `tether device approve|deny` decides it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tether_proto::command::{CommandStatus, CreateCommand, Target};
use tether_proto::{AgentId, Labels};

use crate::common::{AgentProcess, ServerProcess, eventually, tether_bin};

/// A `tether agent --device-flow` whose stderr is collected as it comes.
struct DeviceAgent {
    child: Child,
    output: Arc<Mutex<String>>,
}

impl DeviceAgent {
    fn start(dir: &Path, server: &str) -> Self {
        let mut child = Command::new(tether_bin())
            .args(["agent", "--device-flow", "--heartbeat", "5", "-c"])
            .arg(dir)
            .args(["--server", server])
            .env_remove("TETHER_ENROLL_TOKEN")
            .env("TETHER_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tether agent --device-flow");
        let stderr = child.stderr.take().expect("stderr");
        let output = Arc::new(Mutex::new(String::new()));
        let sink = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut text = sink.lock().expect("output lock");
                text.push_str(&line);
                text.push('\n');
            }
        });
        Self { child, output }
    }

    fn text(&self) -> String {
        self.output.lock().expect("output lock").clone()
    }

    /// The `XXXX-XXXX` code the agent printed for a person (waits up to 30 s).
    fn user_code(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let text = self.text();
            let code = text.lines().map(str::trim).find(|l| {
                l.len() == 9
                    && l.as_bytes()[4] == b'-'
                    && l.bytes().enumerate().all(|(i, b)| i == 4 || b"BCDFGHJKLMNPQRSTVWXZ".contains(&b))
            });
            if let Some(code) = code {
                return code.to_owned();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the agent printed no user code; output:\n{}", self.text());
    }

    fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the agent did not exit within {limit:?}; output:\n{}", self.text());
    }
}

impl Drop for DeviceAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tether device <args…>` as the admin; panics unless it succeeds.
fn device_cli(server: &ServerProcess, args: &[&str]) -> String {
    let home = tempfile::tempdir().expect("home");
    let out = Command::new(tether_bin())
        .arg("device")
        .args(args)
        .env("HOME", home.path())
        .env("XDG_CONFIG_HOME", home.path())
        .env("TETHER_SERVER", &server.base)
        .env("TETHER_TOKEN", server.admin_token.as_deref().expect("admin token"))
        .env_remove("TETHER_USER")
        .env_remove("TETHER_PASSWORD")
        .output()
        .expect("run tether device");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "tether device {args:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

async fn ping_by_label(admin: &tether_client::Client, labels: &Labels, agent: AgentId) {
    let created =
        admin.create_command(&CreateCommand::new(Target::labels(labels.clone()), "ping")).await.expect("create");
    assert_eq!(created.command_ids.len(), 1, "exactly the approved agent carries the label");
    let id = created.command_ids[0];
    let cmd = eventually(Duration::from_secs(30), || async {
        let cmd = admin.get_command(id).await.ok()?;
        cmd.status.is_terminal().then_some(cmd)
    })
    .await
    .expect("ping finishes within 30 s");
    assert_eq!((cmd.agent_id, cmd.status), (agent, CommandStatus::Succeeded), "{cmd:?}");
}

#[tokio::test]
async fn an_approved_device_enrolls_with_the_operators_labels_and_runs_commands() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(&dir.path().join("server"), 0);
    let admin = server.admin_with(server.admin_token.as_deref().expect("token"));
    let agent_dir = dir.path().join("agent");
    let mut agent = DeviceAgent::start(&agent_dir, &server.base);

    let code = agent.user_code();
    let text = agent.text();
    assert!(text.contains(&format!("{}/device", server.base)), "verification URL shown:\n{text}");
    assert!(text.contains(&format!("/device?user_code={code}")), "verification_uri_complete shown:\n{text}");
    assert!(!text.contains("ttd_"), "the device code is a secret and never printed:\n{text}");
    assert!(!agent_dir.join("state/agent_id").exists(), "not enrolled before approval");

    let out = device_cli(&server, &["approve", &code, "--label", "role=dev"]);
    assert!(out.contains(&format!("approved device {code}")), "{out}");
    // The operator can match the machine: the agent printed the fingerprint the CLI shows.
    let fingerprint = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("key fingerprint"))
        .map(str::trim)
        .unwrap_or_else(|| panic!("the CLI shows the key fingerprint:\n{out}"));
    assert_eq!(fingerprint.len(), 16, "{out}");
    assert!(text.contains(&format!("key fingerprint: {fingerprint}")), "the agent printed it too:\n{text}");

    let id_path = agent_dir.join("state/agent_id");
    let agent_id: AgentId =
        eventually(Duration::from_secs(30), || async { std::fs::read_to_string(&id_path).ok()?.trim().parse().ok() })
            .await
            .unwrap_or_else(|| panic!("the agent enrolled after approval; output:\n{}", agent.text()));
    let shown = admin.get_agent(agent_id).await.expect("agent");
    assert_eq!(shown.labels.get("role").map(String::as_str), Some("dev"), "{shown:?}");
    let labels: Labels = [("role".to_owned(), "dev".to_owned())].into();
    ping_by_label(&admin, &labels, agent_id).await;

    // Later starts reuse the saved identity: no flag, no code, same agent.
    crate::common::signal(&agent.child, libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(30)).success());
    let restarted = AgentProcess::start(&agent_dir, &server.base, None, None);
    assert_eq!(restarted.agent_id(), agent_id);
    ping_by_label(&admin, &labels, agent_id).await;
    assert!(!restarted.log_text().contains("not enrolled"), "{}", restarted.log_text());
}

#[tokio::test]
async fn a_denied_device_exits_non_zero_saying_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(&dir.path().join("server"), 0);
    let agent_dir = dir.path().join("agent");
    let mut agent = DeviceAgent::start(&agent_dir, &server.base);
    let code = agent.user_code();
    // The server normalizes the code: lowercase, no dash.
    device_cli(&server, &["deny", &code.replace('-', "").to_lowercase()]);
    let status = agent.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "output:\n{}", agent.text());
    let text = agent.text();
    assert!(text.contains("denied") && text.contains("access_denied"), "{text}");
    assert!(!agent_dir.join("state/agent_id").exists(), "a denied agent saves no identity");
}

#[tokio::test]
async fn an_expired_device_code_exits_non_zero_saying_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("server.toml");
    std::fs::write(&config, "device_code_ttl_s = 1\n").expect("config");
    let server = ServerProcess::start_with(&dir.path().join("server"), 0, &["--config".as_ref(), config.as_os_str()]);
    let mut agent = DeviceAgent::start(&dir.path().join("agent"), &server.base);
    agent.user_code();
    let status = agent.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "output:\n{}", agent.text());
    assert!(agent.text().contains("expired_token"), "{}", agent.text());
}
