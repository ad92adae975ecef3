//! A 2xx on a write means committed: SIGKILL loses nothing acknowledged.

use base64::Engine;
use tether_proto::Labels;
use tether_proto::agent::{CreateEnrollToken, EnrollRequest};
use tether_proto::command::{CommandStatus, CreateCommand, ResultReport, Target};

use crate::common::ServerProcess;

const COMMANDS: usize = 60;

#[tokio::test]
async fn acknowledged_commands_survive_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = ServerProcess::start(dir.path(), 0);
    let port = server.port;
    let admin_token = server.admin_token.clone().expect("first start prints the admin token");
    let admin = server.admin_with(&admin_token);
    let token = admin
        .create_enroll_token(&CreateEnrollToken { labels: Labels::new(), uses: 1, expires_in_s: 600 })
        .await
        .expect("enroll token")
        .token;
    let key = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let pair = tether_client::Client::new(&server.base)
        .expect("client")
        .enroll(&EnrollRequest {
            enroll_token: token,
            public_key: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes()),
            hostname: "durable".into(),
            labels: Labels::new(),
            facts: serde_json::json!({}),
        })
        .await
        .expect("enroll");
    let agent = tether_client::Client::new(&server.base).expect("client").with_bearer(pair.access_token.clone());

    let mut acknowledged = Vec::new();
    for i in 0..COMMANDS {
        let mut req = CreateCommand::new(Target::agents([pair.agent_id]), "ping");
        req.args = serde_json::json!({"i": i});
        let id = admin.create_command(&req).await.expect("create").command_ids[0];
        // Every third command gets a result, every third is cancelled.
        let expected = match i % 3 {
            0 => {
                let mut r = ResultReport::new(CommandStatus::Succeeded);
                r.stdout = format!("out {i}");
                agent.report_result(id, &r).await.expect("result");
                CommandStatus::Succeeded
            }
            1 => {
                admin.cancel_command(id).await.expect("cancel");
                CommandStatus::Cancelled
            }
            _ => CommandStatus::Queued,
        };
        acknowledged.push((id, expected, i));
    }

    server.kill9();
    let server = ServerProcess::start(dir.path(), port);
    assert!(server.admin_token.is_none(), "a restart must not bootstrap again");
    let admin = server.admin_with(&admin_token);
    // The password set at first start still works.
    server.basic_admin().list_agents(&Default::default()).await.expect("basic auth after restart");
    for (id, expected, i) in acknowledged {
        let cmd = admin.get_command(id).await.expect("acknowledged command survives");
        assert_eq!(cmd.status, expected, "command {i}");
        assert_eq!(cmd.args, serde_json::json!({"i": i}));
        if expected == CommandStatus::Succeeded {
            assert_eq!(cmd.stdout, format!("out {i}"));
            assert!(cmd.finished_at.is_some());
        }
    }
    // The agent's stream survived too, and its token still works.
    let agent = tether_client::Client::new(&server.base).expect("client").with_bearer(pair.access_token);
    let tether_client::Poll::Signals(updates) = agent.updates(None, 100, 0).await.expect("poll") else {
        panic!("the stream must hold the queued commands")
    };
    assert_eq!(updates.signals.iter().filter(|s| s.kind == "command.queued").count(), 100.min(COMMANDS));
}
