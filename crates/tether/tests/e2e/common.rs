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

/// A free port on loopback (bound then released, so a restart can reuse it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

pub struct ServerProcess {
    pub child: Child,
    pub base: String,
    pub data_dir: PathBuf,
    pub port: u16,
    /// Printed once on first start.
    pub admin_token: Option<String>,
}

impl ServerProcess {
    /// Starts `tether server` on `data_dir` and waits until it listens.
    pub fn start(data_dir: &Path, port: u16) -> Self {
        let mut child = Command::new(tether_bin())
            .args(["server", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(data_dir)
            .env("TETHER_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("TETHER_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tether server");
        let stdout = child.stdout.take().expect("stdout");
        let mut admin_token = None;
        let mut lines = BufReader::new(stdout).lines();
        let deadline = Instant::now() + Duration::from_secs(30);
        for line in lines.by_ref() {
            let line = line.expect("read stdout");
            if let Some(token) = line.strip_prefix("admin API token (shown once): ") {
                admin_token = Some(token.to_owned());
            }
            if line.starts_with("tether server listening on ") || Instant::now() > deadline {
                break;
            }
        }
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self { child, base: format!("http://127.0.0.1:{port}"), data_dir: data_dir.to_owned(), port, admin_token }
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
