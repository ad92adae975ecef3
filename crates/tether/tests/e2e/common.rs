//! Spawning and stopping real `tether` processes in temp dirs.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tether_client::Client;

pub const ADMIN_PASSWORD: &str = "e2e-admin-password";

pub fn tether_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tether")
}

/// A `tether server` process. It binds the port it is given, or with 0 a
/// free one of its own choosing: the harness reads the address back from the
/// server's `tether server listening on URL` line, so no port is ever picked
/// here and released for someone else to take. A restart passes the port the
/// first process got.
pub struct ServerProcess {
    pub child: Child,
    pub base: String,
    pub data_dir: PathBuf,
    /// The port the server bound.
    pub port: u16,
    /// The first admin's API token, from `<data-dir>/initial-admin.txt` on first start.
    pub admin_token: Option<String>,
    /// The URL of the server's "listening on" line.
    pub url: Option<String>,
}

/// The `tether` CLI against `server` with `token`; panics unless it exits 0.
pub fn cli(server: &ServerProcess, token: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(tether_bin())
        .args(args)
        .env("TETHER_SERVER", &server.base)
        .env("TETHER_TOKEN", token)
        .env("TETHER_LOG", "warn")
        .env("HOME", &server.data_dir)
        .env("XDG_CONFIG_HOME", server.data_dir.join("cli"))
        .output()
        .expect("run tether");
    assert!(out.status.success(), "tether {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

/// `api_token` from a first start's `initial-admin.txt`.
pub fn initial_admin_token(data_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(data_dir.join("initial-admin.txt")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("api_token: ")).map(str::to_owned)
}

impl ServerProcess {
    /// Starts `tether server` on `data_dir` and waits until it listens; `port`
    /// 0 lets the server choose.
    pub fn start(data_dir: &Path, port: u16) -> Self {
        Self::start_with(data_dir, port, &[])
    }

    /// Like `start`, with extra server arguments.
    pub fn start_with(data_dir: &Path, port: u16, extra: &[&std::ffi::OsStr]) -> Self {
        let mut child = Command::new(tether_bin())
            .args(["server", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env("TETHER_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("TETHER_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tether server");
        let stdout = child.stdout.take().expect("stdout");
        let (mut first_start, mut url) = (false, None);
        let mut lines = BufReader::new(stdout).lines();
        let deadline = Instant::now() + Duration::from_secs(30);
        for line in lines.by_ref() {
            let line = line.expect("read stdout");
            // Stdout is a pipe, so the credentials are only in the file.
            first_start |= line.starts_with("first admin credentials: ");
            if let Some(printed) = line.strip_prefix("tether server listening on ") {
                url = Some(printed.to_owned());
                break;
            }
            if Instant::now() > deadline {
                break;
            }
        }
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let bound = url
            .as_deref()
            .and_then(|u| u.rsplit(':').next())
            .and_then(|p| p.parse::<u16>().ok())
            .unwrap_or_else(|| panic!("tether server on {} never said where it listens", data_dir.display()));
        assert!(port == 0 || bound == port, "asked for port {port}, the server bound {bound}");
        let admin_token = if first_start { initial_admin_token(data_dir) } else { None };
        let base = format!("http://127.0.0.1:{bound}");
        Self { child, base, data_dir: data_dir.to_owned(), port: bound, admin_token, url }
    }

    /// A client with HTTP Basic admin credentials (slow: argon2 per request).
    pub fn basic_admin(&self) -> Client {
        Client::new(&self.base).expect("client").with_credentials(tether_client::Credentials::Basic {
            username: "admin".into(),
            password: ADMIN_PASSWORD.into(),
        })
    }

    /// A client with an admin API token (the bootstrap one, or `token`).
    pub fn admin_with(&self, token: &str) -> Client {
        Client::new(&self.base).expect("client").with_bearer(token)
    }

    pub fn kill9(&mut self) {
        // SIGKILL: no chance to flush anything.
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        signal(&self.child, libc::SIGTERM);
        self.child.wait().expect("wait")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn signal(child: &Child, sig: i32) {
    // SAFETY-free: libc::kill on a pid we own.
    let pid = child.id() as i32;
    let rc = unsafe_kill(pid, sig);
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

#[allow(unsafe_code)]
fn unsafe_kill(pid: i32, sig: i32) -> i32 {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) }
}

/// A real `tether agent` process with its own state dir; stderr goes to `log`.
pub struct AgentProcess {
    pub child: Child,
    pub dir: PathBuf,
    pub log: PathBuf,
}

impl AgentProcess {
    /// Starts an agent; `agent_toml` is written to its state dir first (if any).
    pub fn start(dir: &Path, server: &str, enroll_token: Option<&str>, agent_toml: Option<&str>) -> Self {
        Self::start_with(dir, server, enroll_token, agent_toml, &[])
    }

    /// Like `start`, with extra agent arguments.
    pub fn start_with(
        dir: &Path,
        server: &str,
        enroll_token: Option<&str>,
        agent_toml: Option<&str>,
        extra: &[&std::ffi::OsStr],
    ) -> Self {
        std::fs::create_dir_all(dir).expect("agent dir");
        if let Some(toml) = agent_toml {
            std::fs::write(dir.join("agent.toml"), toml).expect("agent.toml");
        }
        let log = dir.join(format!(
            "agent-{}.log",
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_nanos()
        ));
        let mut cmd = Command::new(tether_bin());
        cmd.args(["agent", "-c"]).arg(dir).args(["--server", server, "--heartbeat", "5"]);
        if let Some(t) = enroll_token {
            cmd.args(["--enroll-token", t]);
        }
        let child = cmd
            .args(extra)
            .env("TETHER_LOG", "info,tether_agent=debug")
            .env_remove("TETHER_CA_FILE")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn tether agent");
        Self { child, dir: dir.to_owned(), log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The agent id once it has enrolled (waits up to 30 s).
    pub fn agent_id(&self) -> tether_proto::AgentId {
        let path = self.dir.join("state/agent_id");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(text) = std::fs::read_to_string(&path)
                && let Ok(id) = text.trim().parse()
            {
                return id;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("agent never enrolled; log:\n{}", self.log_text());
    }

    /// Waits for the process to exit (up to `limit`).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn kill9(&mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 100 ms until it returns Some, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(v) = f().await {
            return Some(v);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// An enrollment token with these labels, via the admin client.
pub async fn enroll_token(admin: &Client, labels: &[(&str, &str)]) -> String {
    admin
        .create_enroll_token(&tether_proto::agent::CreateEnrollToken {
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            uses: 1,
            expires_in_s: 600,
        })
        .await
        .expect("enroll token")
        .token
}

/// Runs `tether server reset-admin` for `server` (with `extra` arguments,
/// e.g. its `--database-url`) and checks the printed password works over
/// Basic while the old one no longer does.
pub async fn assert_reset_admin_works(server: &ServerProcess, extra: &[&str]) {
    let out = Command::new(tether_bin())
        .args(["server", "reset-admin", "--data-dir"])
        .arg(&server.data_dir)
        .args(extra)
        .env("TETHER_LOG", "warn")
        .output()
        .expect("run reset-admin");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "reset-admin failed: {}", String::from_utf8_lossy(&out.stderr));
    let password = stdout.split("(shown once): ").nth(1).map(str::trim).expect("a new password is printed");
    let basic = |password: &str| {
        Client::new(&server.base)
            .expect("client")
            .with_credentials(tether_client::Credentials::Basic { username: "admin".into(), password: password.into() })
    };
    basic(password).list_users().await.expect("the new password works");
    let old = basic(ADMIN_PASSWORD).list_users().await.expect_err("the old password no longer works");
    assert_eq!(old.status(), Some(401), "{old:?}");
}
