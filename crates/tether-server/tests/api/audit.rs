//! The audit log: filters, agent events, tamper detection (protocol.md §10).

use tether_client::AuditQuery;
use tether_proto::command::{CreateCommand, Target};
use tether_proto::user::AgentAuditEvent;

use crate::common::spawn_app;

#[tokio::test]
async fn mutations_are_audited_without_secrets_and_filterable() {
    let app = spawn_app().await;
    let (agent, pair) = app.agent(&[("role", "web")]).await;
    app.admin.create_command(&CreateCommand::new(Target::all(), "ping")).await.expect("create");
    agent
        .agent_audit(&AgentAuditEvent {
            action: "usb.inserted".into(),
            target: "port-3".into(),
            details: serde_json::json!({"vendor": "acme"}),
        })
        .await
        .expect("agent audit");

    let all = app.admin.list_audit(&AuditQuery::default()).await.expect("audit");
    let actions: Vec<&str> = all.data.iter().map(|r| r.action.as_str()).collect();
    for expected in ["enroll_token.create", "agent.enroll", "command.create", "agent.usb.inserted"] {
        assert!(actions.contains(&expected), "{expected} missing from {actions:?}");
    }
    // Secrets never appear: not the enrollment token, not the refresh token.
    let text = serde_json::to_string(&all.data).expect("json");
    assert!(!text.contains("tte_") && !text.contains("ttr_") && !text.contains("tth_"), "{text}");
    assert!(!text.contains(&pair.refresh_token));

    let mine = app
        .admin
        .list_audit(&AuditQuery { agent_id: Some(pair.agent_id), ..Default::default() })
        .await
        .expect("by agent");
    assert!(mine.data.iter().all(|r| r.actor == pair.agent_id.to_string() || r.target == pair.agent_id.to_string()));
    assert!(mine.data.iter().any(|r| r.action == "agent.usb.inserted"));
    let by_action = app
        .admin
        .list_audit(&AuditQuery { action: Some("command.create".into()), ..Default::default() })
        .await
        .expect("by action");
    assert_eq!(by_action.data.len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn verify_names_the_first_altered_row() {
    let app = spawn_app().await;
    for _ in 0..3 {
        app.agent(&[]).await;
    }
    let clean = app.admin.verify_audit().await.expect("verify");
    assert!(clean.ok && clean.first_bad_id.is_none(), "{clean:?}");
    assert!(clean.checked >= 6);

    // Tamper with the third row behind the server's back.
    let url = format!("sqlite://{}", app.dir.path().join("tether.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.expect("open db");
    sqlx::query("UPDATE audit SET details = '{\"forged\":true}' WHERE id = 3").execute(&pool).await.expect("tamper");
    pool.close().await;

    let broken = app.admin.verify_audit().await.expect("verify");
    assert!(!broken.ok);
    assert_eq!(broken.first_bad_id, Some(3));
    assert_eq!(broken.broken_count, 1, "only the altered row breaks the chain: {broken:?}");
    assert!(broken.problem.as_deref().is_some_and(|p| p.contains("altered")), "{broken:?}");
    app.stop().await;
}

#[tokio::test]
async fn verify_names_the_row_after_a_removed_one() {
    let app = spawn_app().await;
    for _ in 0..3 {
        app.agent(&[]).await;
    }
    let url = format!("sqlite://{}", app.dir.path().join("tether.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.expect("open db");
    sqlx::query("DELETE FROM audit WHERE id = 3").execute(&pool).await.expect("tamper");
    pool.close().await;

    let broken = app.admin.verify_audit().await.expect("verify");
    assert_eq!((broken.ok, broken.first_bad_id), (false, Some(4)), "{broken:?}");
    assert!(broken.problem.as_deref().is_some_and(|p| p.contains("removed")), "{broken:?}");
    app.stop().await;
}
