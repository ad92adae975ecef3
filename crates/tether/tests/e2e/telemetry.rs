//! Liveness and telemetry with real processes (protocol.md §8): a stopped
//! agent goes offline within the threshold and comes back online when
//! restarted, a webhook hears each transition once, and the agent's host
//! metrics reach the server and the CLI.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::common::{AgentProcess, ServerProcess, cli, enroll_token, eventually, signal};

/// A webhook receiver on 127.0.0.1 recording the events it is sent.
async fn receiver() -> (String, Arc<Mutex<Vec<String>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(v): axum::Json<Value>| {
            let sink = sink.clone();
            async move {
                sink.lock().expect("lock").push(v["event"].as_str().unwrap_or_default().to_owned());
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_goes_offline_and_comes_back_and_ships_metrics() {
    let (hook, got) = receiver().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("server.toml");
    // The e2e agents heartbeat every 5 s; 8 s without a word is offline.
    std::fs::write(
        &config,
        format!("[telemetry]\noffline_after_s = 8\nwebhook_url = \"{hook}\"\nallow_private_targets = true\n"),
    )
    .expect("config");
    let server = ServerProcess::start_with(&dir.path().join("server"), 0, &["--config".as_ref(), config.as_os_str()]);
    let token = server.admin_token.clone().expect("admin token");
    let admin = server.admin_with(&token);
    let agent_dir = dir.path().join("agent");
    let agent_toml = "metrics_s = 1\n[metrics]\ncollect = [\"cpu\", \"memory\"]\n";
    let mut agent =
        AgentProcess::start(&agent_dir, &server.base, Some(&enroll_token(&admin, &[]).await), Some(agent_toml));
    let id = agent.agent_id().to_string();

    // Host metrics arrive and the CLI shows them.
    let shown = eventually(Duration::from_secs(30), || async {
        let out = cli(&server, &token, &["agents", "metrics", &id, "host.mem_used_bytes", "--since", "1h"]);
        (out.lines().count() > 2).then_some(out)
    })
    .await;
    assert!(shown.is_some(), "no metrics shown; agent log:\n{}", agent.log_text());

    // Stopped: offline within the threshold, told once.
    signal(&agent.child, libc::SIGTERM);
    agent.wait_exit(Duration::from_secs(20)).expect("the agent stops");
    let offline = eventually(Duration::from_secs(20), || async {
        (got.lock().expect("lock").as_slice() == ["agent.offline"]).then_some(())
    })
    .await;
    assert!(offline.is_some(), "no offline alert: {:?}", got.lock().expect("lock"));
    let listed = cli(&server, &token, &["agents", "list", "--status", "offline"]);
    assert!(listed.contains(&id), "{listed}");

    // Restarted: online again, told once.
    let _agent = AgentProcess::start(&agent_dir, &server.base, None, Some(agent_toml));
    let online = eventually(Duration::from_secs(20), || async {
        (got.lock().expect("lock").as_slice() == ["agent.offline", "agent.online"]).then_some(())
    })
    .await;
    assert!(online.is_some(), "no online alert: {:?}", got.lock().expect("lock"));
    let listed = cli(&server, &token, &["agents", "list", "--status", "online"]);
    assert!(listed.contains(&id), "{listed}");
    // No repeats while the agent stays up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(got.lock().expect("lock").as_slice(), ["agent.offline", "agent.online"]);
}
