//! Signed agent requests end to end: a real `tether agent --sign-requests`
//! against a real server whose `--config` sets `require_signed_requests`.

use std::time::Duration;

use tether_proto::ErrorKey;
use tether_proto::command::{CommandStatus, CreateCommand, Target};

use crate::common::{AgentProcess, ServerProcess, enroll_token, eventually};

#[tokio::test]
async fn a_signing_agent_runs_ping_on_a_server_that_requires_signatures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("server.toml");
    std::fs::write(&config, "require_signed_requests = true\n").expect("server config");
    let server = ServerProcess::start_with(&dir.path().join("server"), 0, &["--config".as_ref(), config.as_os_str()]);
    let admin = server.admin_with(server.admin_token.as_deref().expect("token"));
    let token = enroll_token(&admin, &[]).await;
    let agent = AgentProcess::start_with(
        &dir.path().join("a"),
        &server.base,
        Some(&token),
        None,
        &["--sign-requests".as_ref()],
    );
    let agent_id = agent.agent_id();

    let created = admin.create_command(&CreateCommand::new(Target::agents([agent_id]), "ping")).await.expect("create");
    let id = created.command_ids[0];
    let cmd = eventually(Duration::from_secs(30), || async {
        let cmd = admin.get_command(id).await.ok()?;
        cmd.status.is_terminal().then_some(cmd)
    })
    .await
    .unwrap_or_else(|| panic!("ping did not finish; agent log:\n{}", agent.log_text()));
    assert_eq!((cmd.status, cmd.stdout.as_str()), (CommandStatus::Succeeded, "pong\n"), "{cmd:?}");

    // The same agent's token without a signature is refused: the policy is on,
    // so the ping above went through signed requests.
    let access = std::fs::read_to_string(agent.dir.join("state/access_token")).expect("access token");
    let unsigned = tether_client::Client::new(&server.base).expect("client").with_bearer(access.trim());
    let err = unsigned.updates(None, 20, 0).await.expect_err("unsigned poll");
    assert_eq!((err.status(), err.key()), (Some(401), Some(ErrorKey::Unauthenticated)), "{err}");
    let log = agent.log_text();
    assert!(!log.contains("UNAUTHENTICATED"), "the signing agent was never refused:\n{log}");
}
