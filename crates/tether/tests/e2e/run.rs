//! `tether run` end to end: the real CLI against a real server and real agents.

use std::collections::BTreeSet;
use std::time::Duration;

use tether_proto::AgentId;

use crate::common::{AgentProcess, ServerProcess, enroll_token, tether_bin};

#[tokio::test]
async fn run_by_label_reaches_exactly_the_labelled_agents_and_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(&dir.path().join("server"), 0);
    let token = server.admin_token.clone().expect("token");
    let admin = server.admin_with(&token);
    let mut agents = Vec::new();
    for (name, role) in [("web1", "web"), ("web2", "web"), ("db1", "db")] {
        let enroll = enroll_token(&admin, &[("role", role)]).await;
        agents.push((role, AgentProcess::start(&dir.path().join(name), &server.base, Some(&enroll), None)));
    }
    let web: BTreeSet<AgentId> =
        agents.iter().filter(|(role, _)| *role == "web").map(|(_, agent)| agent.agent_id()).collect();
    let db = agents[2].1.agent_id();

    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(tether_bin())
            .args(["run", "--label", "role=web", "-o", "json", "--", "ping"])
            .env("TETHER_SERVER", &server.base)
            .env("TETHER_TOKEN", &token)
            .env("HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path().join("config"))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("tether run finishes within 60 s")
    .expect("spawn tether run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr));

    let commands: Vec<serde_json::Value> = serde_json::from_str(&stdout).expect("JSON list of commands");
    let reached: BTreeSet<AgentId> =
        commands.iter().map(|c| c["agent_id"].as_str().expect("agent_id").parse().expect("agent id")).collect();
    assert_eq!(reached, web, "exactly the role=web agents");
    assert!(!reached.contains(&db));
    for c in &commands {
        assert_eq!(c["status"], "succeeded", "{c}");
        assert!(c["finished_at"].is_string(), "{c}");
    }
}
