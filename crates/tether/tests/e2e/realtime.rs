//! The agent WebSocket with real processes (protocol.md §9): an agent uses
//! it by default, an agent behind a proxy that refuses upgrades falls back
//! to long-poll and still runs commands, and after the server is killed and
//! restarted WebSocket agents come back on their own.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tether_client::Client;
use tether_proto::AgentId;
use tether_proto::command::{CommandStatus, CreateCommand, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{AgentProcess, ServerProcess, enroll_token, eventually, tether_bin};

/// `tether agent status --json` of the daemon in `dir`, if it answers.
fn agent_status(dir: &Path) -> Option<Value> {
    let out =
        std::process::Command::new(tether_bin()).args(["agent", "status", "--json", "-c"]).arg(dir).output().ok()?;
    out.status.success().then(|| serde_json::from_slice(&out.stdout).expect("json status"))
}

/// Waits (30 s) until the agent in `dir` says it uses `connection`.
async fn until_connection(agent: &AgentProcess, connection: &str) {
    let reached = eventually(Duration::from_secs(30), || async {
        agent_status(&agent.dir).filter(|s| s["connection"] == connection).map(|_| ())
    })
    .await;
    assert!(
        reached.is_some(),
        "the agent never used {connection}: {:?}\nagent log:\n{}",
        agent_status(&agent.dir),
        agent.log_text()
    );
}

/// Runs `ping` on the agent and waits (30 s) until it succeeded.
async fn ping(admin: &Client, agent: &AgentProcess, id: AgentId) {
    let created = admin.create_command(&CreateCommand::new(Target::agents([id]), "ping")).await.expect("create");
    let command = created.command_ids[0];
    let done = eventually(Duration::from_secs(30), || async {
        let c = admin.get_command(command).await.ok()?;
        (c.status == CommandStatus::Succeeded).then_some(())
    })
    .await;
    assert!(done.is_some(), "ping never succeeded on {id}\nagent log:\n{}", agent.log_text());
}

/// A proxy in front of `upstream` that answers every WebSocket upgrade with
/// 502, the way a proxy without upgrade support does, and passes the rest.
async fn refusing_proxy(upstream: String) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
                    match client.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if String::from_utf8_lossy(&head).to_ascii_lowercase().contains("upgrade: websocket") {
                    let _ = client
                        .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                    return;
                }
                let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                if server.write_all(&head).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_prefer_the_websocket_fall_back_behind_a_refusing_proxy_and_reconnect_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("server");
    let mut server = ServerProcess::start(&data, 0);
    let token = server.admin_token.clone().expect("admin token");
    let admin = server.admin_with(&token);

    let direct =
        AgentProcess::start(&dir.path().join("direct"), &server.base, Some(&enroll_token(&admin, &[]).await), None);
    let direct_id = direct.agent_id();
    until_connection(&direct, "websocket").await;
    ping(&admin, &direct, direct_id).await;

    let proxy = refusing_proxy(format!("127.0.0.1:{}", server.port)).await;
    let behind = AgentProcess::start(&dir.path().join("behind"), &proxy, Some(&enroll_token(&admin, &[]).await), None);
    let behind_id = behind.agent_id();
    until_connection(&behind, "long-poll").await;
    let status = agent_status(&behind.dir).expect("status");
    assert_eq!(status["transport"], "auto");
    assert!(status["websocket_retry_at"].is_string(), "{status}");
    ping(&admin, &behind, behind_id).await;

    // Killed and started again on the same port: the WebSocket agent comes back by itself.
    server.kill9();
    let server = ServerProcess::start(&data, server.port);
    let admin = server.admin_with(&token);
    until_connection(&direct, "websocket").await;
    ping(&admin, &direct, direct_id).await;
    ping(&admin, &behind, behind_id).await;
}
