//! The web dashboard in real headless Chromium (`tests/browser/dashboard.mjs`,
//! playwright-core driving Debian's `/usr/bin/chromium`) against a real
//! `tether server` and `tether agent`: sign-in, the agents table, an agent's
//! page, `ping` from the run-command form with the result arriving live,
//! a configuration edit with its diff, a device approval, an agent going
//! offline when its process stops, and a viewer who sees no mutating
//! controls and whose mutating calls are refused. A second test puts
//! 10,000 agents in the database and measures the agents page.
//!
//! `tests/browser/setup.sh` installs what is missing (Chromium with apt,
//! playwright-core with `npm ci`); without node or Chromium the tests skip
//! and say why, except under `TETHER_CI`, where they fail. Screenshots of
//! every page and `timings.txt` go to `target/browser-screenshots/`.
//! The timing lines are printed on stderr: see them with
//! `cargo nextest run -p tether --test e2e -E 'test(dashboard::)' --no-capture`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use tether_proto::agent::UpdateAgent;
use tether_proto::user::CreateUser;

use crate::common::{ADMIN_PASSWORD, AgentProcess, ServerProcess, enroll_token};

const VIEWER: &str = "vera";
const VIEWER_PASSWORD: &str = "e2e-viewer-password";
const AGENT_NAME: &str = "e2e-dashboard-agent";
const PERF_AGENTS: usize = 10_000;

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/browser")
}

/// `target/browser-screenshots/<name>` (the binary is `target/<profile>/tether`).
fn screenshot_dir(name: &str) -> PathBuf {
    let target = Path::new(env!("CARGO_BIN_EXE_tether")).parent().and_then(Path::parent).expect("target dir");
    target.join("browser-screenshots").join(name)
}

/// Runs `tests/browser/setup.sh`; `false` (after saying why) when the
/// browser tests cannot run here.
fn browser_ready() -> bool {
    let out = Command::new(browser_dir().join("setup.sh")).output().expect("run tests/browser/setup.sh");
    if out.status.success() {
        return true;
    }
    let why = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    assert!(std::env::var_os("TETHER_CI").is_none(), "the browser tests cannot run under TETHER_CI: {why}");
    eprintln!("skipping: {why} (tests/browser/setup.sh)");
    false
}

/// Runs the browser script with `env`; panics with its output unless it
/// succeeds, and passes its timing lines on.
fn run_browser(env: &[(&str, String)], shots: &Path) {
    let _ = std::fs::remove_dir_all(shots);
    let out = Command::new("node")
        .arg("dashboard.mjs")
        .current_dir(browser_dir())
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("SCREENSHOT_DIR", shots)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the dashboard failed in the browser (screenshots in {}):\n{stdout}\n{}",
        shots.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    for line in stdout.lines().filter(|l| l.starts_with("dashboard:")) {
        eprintln!("{line}");
    }
}

#[tokio::test]
async fn the_dashboard_works_in_a_real_browser() {
    if !browser_ready() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(&dir.path().join("data"), 0);
    let admin = server.admin_with(server.admin_token.as_deref().expect("first start"));
    admin
        .create_user(&CreateUser { username: VIEWER.into(), password: VIEWER_PASSWORD.into(), role: "viewer".into() })
        .await
        .expect("create the viewer");
    let token = enroll_token(&admin, &[("role", "web")]).await;
    let agent = AgentProcess::start(&dir.path().join("agent"), &server.base, Some(&token), None);
    let id = agent.agent_id();
    // A name of its own, so a search finds exactly it whatever the machine's hostname.
    admin.update_agent(id, &UpdateAgent { name: Some(AGENT_NAME.into()), labels: None }).await.expect("name the agent");
    run_browser(
        &[
            ("TETHER_URL", server.base.clone()),
            ("ADMIN_USER", "admin".into()),
            ("ADMIN_PASS", ADMIN_PASSWORD.into()),
            ("VIEWER_USER", VIEWER.into()),
            ("VIEWER_PASS", VIEWER_PASSWORD.into()),
            ("AGENT_ID", id.to_string()),
            ("AGENT_PID", agent.child.id().to_string()),
            ("AGENT_NAME", AGENT_NAME.into()),
        ],
        &screenshot_dir("dashboard"),
    );
    // The approved device enrolled with the labels typed into the page.
    let page = admin.list_agents(&Default::default()).await.expect("agents");
    assert!(
        page.data.iter().any(|a| a.hostname.ends_with("browser-test-device")
            && a.labels.get("via").map(String::as_str) == Some("dashboard")),
        "{:?}",
        page.data
    );
}

/// Writes `n` agents straight into the store of a data dir no server has
/// opened yet (one transaction each: seconds, not the minutes thousands of
/// enrollments over HTTP would take with rate limits).
async fn seed_agents(data_dir: &Path, n: usize) {
    use tether_store::{AuditEntry, Location, NewAgent, NewEnrollToken, OpenOptions};
    std::fs::create_dir_all(data_dir).expect("data dir");
    let location = Location::new(None, data_dir).expect("location");
    let store = tether_store::open(&location, &OpenOptions { create: true, max_connections: 2 }).await.expect("open");
    // A day ago: enrolling counts as being seen, and these agents are meant
    // to be offline (they never run), as most of a large fleet's rows on a
    // status filter would be.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64
        - 86_400_000;
    let token_hash: [u8; 32] = rand::random();
    let token = NewEnrollToken {
        id: uuid_like(),
        token_hash,
        labels: Default::default(),
        uses: n as u32,
        created_by: "e2e".into(),
        expires_at: now + 3_600_000,
    };
    let audit = AuditEntry::system("e2e", "enroll_token.create", token.id.clone(), serde_json::json!({}), now);
    store.create_enroll_token(token, now, audit).await.expect("enroll token");
    let audit = |rec: &tether_store::AgentRecord| {
        AuditEntry::system("e2e", "agent.enroll", rec.id.to_string(), serde_json::json!({}), now)
    };
    for i in 0..n {
        let labels = [
            ("rack".to_owned(), format!("r{}", i % 10)),
            ("env".to_owned(), if i % 3 == 0 { "staging" } else { "prod" }.to_owned()),
        ];
        let agent = NewAgent {
            id: tether_proto::AgentId::new(),
            hostname: format!("perf-{i:05}"),
            labels: labels.into_iter().collect(),
            facts: serde_json::json!({"os": "linux"}),
            public_key: rand::random::<[u8; 32]>().to_vec(),
        };
        store.enroll_agent(token_hash, agent, rand::random(), now, &audit).await.expect("enroll");
    }
}

fn uuid_like() -> String {
    tether_proto::AgentId::new().to_string()
}

#[tokio::test]
async fn the_agents_page_stays_fast_with_ten_thousand_agents() {
    if !browser_ready() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let started = Instant::now();
    seed_agents(&data, PERF_AGENTS).await;
    eprintln!("dashboard: {PERF_AGENTS} agents written to the store in {:.1} s", started.elapsed().as_secs_f64());
    let server = ServerProcess::start(&data, 0);
    run_browser(
        &[
            ("TETHER_URL", server.base.clone()),
            ("ADMIN_USER", "admin".into()),
            ("ADMIN_PASS", ADMIN_PASSWORD.into()),
            ("PERF_AGENTS", PERF_AGENTS.to_string()),
        ],
        &screenshot_dir("dashboard-perf"),
    );
}
