//! Commands: targeting, idempotency, cancellation, result conflicts (protocol.md §5).

use sqlx::Connection;
use tether_client::CommandQuery;
use tether_proto::ErrorKey;
use tether_proto::command::{BatchStatus, CommandStatus, CreateCommand, ResultReport, Target};

use crate::common::{labels, spawn_app};

#[tokio::test]
async fn labels_target_reaches_exactly_the_matching_agents() {
    let app = spawn_app().await;
    let (_, web1) = app.agent(&[("role", "web"), ("env", "prod")]).await;
    let (_, web2) = app.agent(&[("role", "web"), ("env", "dev")]).await;
    let (_, db) = app.agent(&[("role", "db")]).await;
    let created = app
        .admin
        .create_command(&CreateCommand::new(Target::labels(labels(&[("role", "web")])), "ping"))
        .await
        .expect("create");
    let mut targets: Vec<_> = Vec::new();
    for id in &created.command_ids {
        targets.push(app.admin.get_command(*id).await.expect("get").agent_id);
    }
    targets.sort();
    let mut expected = vec![web1.agent_id, web2.agent_id];
    expected.sort();
    assert_eq!(targets, expected);
    assert!(!targets.contains(&db.agent_id));

    let all = app.admin.create_command(&CreateCommand::new(Target::all(), "ping")).await.expect("all");
    assert_eq!(all.command_ids.len(), 3);
    let batch = app.admin.get_batch(all.batch_id).await.expect("batch");
    assert_eq!((batch.total, batch.status), (3, BatchStatus::Running));
    assert_eq!(batch.counts.get(&CommandStatus::Queued), Some(&3));

    // Unknown agent ids are refused, naming the target.
    let err = app
        .admin
        .create_command(&CreateCommand::new(Target::agents([tether_proto::AgentId::new()]), "ping"))
        .await
        .expect_err("unknown agent");
    assert_eq!(err.key(), Some(ErrorKey::BadRequest));
    app.stop().await;
}

#[tokio::test]
async fn idempotency_key_returns_the_same_batch_and_rejects_a_different_body() {
    let app = spawn_app().await;
    let (_, pair) = app.agent(&[]).await;
    let mut req = CreateCommand::new(Target::agents([pair.agent_id]), "ping");
    req.idempotency_key = Some("deploy-42".into());
    let first = app.admin.create_command(&req).await.expect("first");
    let again = app.admin.create_command(&req).await.expect("retry");
    assert_eq!(first, again);
    req.priority = 9;
    let err = app.admin.create_command(&req).await.expect_err("different body");
    assert_eq!(err.status(), Some(409));
    assert_eq!(err.key(), Some(ErrorKey::Conflict));
    let listed = app.admin.list_commands(&CommandQuery::default()).await.expect("list");
    assert_eq!(listed.data.len(), 1, "the retry created nothing");
    app.stop().await;
}

#[tokio::test]
async fn results_for_cancelled_or_finished_commands_conflict() {
    let app = spawn_app().await;
    let (agent, pair) = app.agent(&[]).await;
    let target = Target::agents([pair.agent_id]);
    let cancelled = app.admin.create_command(&CreateCommand::new(target.clone(), "ping")).await.expect("create");
    let id = cancelled.command_ids[0];
    let view = app.admin.cancel_command(id).await.expect("cancel");
    assert_eq!(view.status, CommandStatus::Cancelled);
    let err = agent.report_result(id, &ResultReport::new(CommandStatus::Succeeded)).await.expect_err("cancelled");
    assert_eq!((err.status(), err.key()), (Some(409), Some(ErrorKey::Conflict)));
    let err = app.admin.cancel_command(id).await.expect_err("cancel twice");
    assert_eq!(err.status(), Some(409));

    let done = app.admin.create_command(&CreateCommand::new(target, "ping")).await.expect("create").command_ids[0];
    agent
        .report_result(done, &ResultReport::new(CommandStatus::Succeeded))
        .await
        .expect("result without running (EDR command queue, protocol.md §16.2)");
    let err = agent.report_result(done, &ResultReport::new(CommandStatus::Failed)).await.expect_err("different result");
    assert_eq!(err.key(), Some(ErrorKey::Conflict));
    let err = agent.report_running(done).await.expect_err("running after the end");
    assert_eq!(err.key(), Some(ErrorKey::Conflict));
    assert_eq!(app.admin.get_command(done).await.expect("get").status, CommandStatus::Succeeded);
    app.stop().await;
}

#[tokio::test]
async fn an_agent_cannot_touch_another_agents_command() {
    let app = spawn_app().await;
    let (_, a) = app.agent(&[]).await;
    let (b_client, _) = app.agent(&[]).await;
    let id = app
        .admin
        .create_command(&CreateCommand::new(Target::agents([a.agent_id]), "ping"))
        .await
        .expect("create")
        .command_ids[0];
    let err = b_client.report_running(id).await.expect_err("foreign");
    assert_eq!((err.status(), err.key()), (Some(404), Some(ErrorKey::NotFound)));
    let err = b_client.report_result(id, &ResultReport::new(CommandStatus::Succeeded)).await.expect_err("foreign");
    assert_eq!(err.status(), Some(404));
    // B's simple API never hands out A's command.
    assert!(b_client.next_command(0).await.expect("next").is_none());
    app.stop().await;
}

#[tokio::test]
async fn cancelling_a_batch_cancels_active_commands_and_signals_agents() {
    let app = spawn_app().await;
    let (agent, _) = app.agent(&[("g", "1")]).await;
    app.agent(&[("g", "1")]).await;
    let created = app
        .admin
        .create_command(&CreateCommand::new(Target::labels(labels(&[("g", "1")])), "sleep"))
        .await
        .expect("create");
    let batch = app.admin.cancel_batch(created.batch_id).await.expect("cancel batch");
    assert_eq!(batch.counts.get(&CommandStatus::Cancelled), Some(&2));
    assert_eq!(batch.status, BatchStatus::Done);
    let tether_client::Poll::Signals(updates) = agent.updates(None, 20, 0).await.expect("poll") else {
        panic!("signals expected")
    };
    let kinds: Vec<_> = updates.signals.iter().map(|s| s.kind.as_str()).collect();
    assert_eq!(kinds, ["command.queued", "command.cancelled"]);
    app.stop().await;
}

#[tokio::test]
async fn command_list_filters_and_pages() {
    let app = spawn_app().await;
    let (_, pair) = app.agent(&[]).await;
    for _ in 0..5 {
        app.admin.create_command(&CreateCommand::new(Target::agents([pair.agent_id]), "ping")).await.expect("create");
    }
    let page1 = app.admin.list_commands(&CommandQuery { limit: Some(3), ..Default::default() }).await.expect("page 1");
    assert_eq!(page1.data.len(), 3);
    let page2 = app
        .admin
        .list_commands(&CommandQuery { limit: Some(3), cursor: page1.next_cursor.clone(), ..Default::default() })
        .await
        .expect("page 2");
    assert_eq!(page2.data.len(), 2);
    assert_eq!(page2.next_cursor, None);
    assert!(page1.data.iter().all(|a| page2.data.iter().all(|b| a.id != b.id)));
    let queued = app
        .admin
        .list_commands(&CommandQuery {
            status: Some("queued,delivered".into()),
            agent_id: Some(pair.agent_id),
            ..Default::default()
        })
        .await
        .expect("filtered");
    assert_eq!(queued.data.len(), 5);
    let err = app
        .admin
        .list_commands(&CommandQuery { status: Some("bogus".into()), ..Default::default() })
        .await
        .expect_err("bad status");
    assert_eq!(err.key(), Some(ErrorKey::BadRequest));
    app.stop().await;
}

/// Results reported while a transaction is committing are recorded
/// together in the next one (group commit): here the database is held
/// busy while the first report is being written, so the next ten all queue
/// and go into one transaction. Each still gets its own answer: a
/// conflicting report its 409 and a report for another agent's command its
/// 404, and their neighbours their 200s; the audit chain stays whole.
#[tokio::test]
async fn concurrent_results_commit_together_and_a_refused_one_fails_only_itself() {
    let app = spawn_app().await;
    let (agent, pair) = app.agent(&[]).await;
    let (_, other) = app.agent(&[]).await;
    let mut ids = Vec::new();
    for _ in 0..10 {
        let req = CreateCommand::new(Target::agents([pair.agent_id]), "ping");
        ids.push(app.admin.create_command(&req).await.expect("create").command_ids[0]);
    }
    let req = CreateCommand::new(Target::agents([other.agent_id]), "ping");
    let theirs = app.admin.create_command(&req).await.expect("create").command_ids[0];
    let (ok, failed) = (ResultReport::new(CommandStatus::Succeeded), ResultReport::new(CommandStatus::Failed));
    let finished = ids[9];
    agent.report_result(finished, &ok).await.expect("finished first");

    // Another connection holds SQLite's write lock; the writer's next
    // transaction waits for it (busy timeout 10 s).
    let url = format!("sqlite://{}", app.dir.path().join("tether.db").display());
    let mut blocker = sqlx::SqliteConnection::connect(&url).await.expect("open db");
    sqlx::query("BEGIN IMMEDIATE").execute(&mut blocker).await.expect("hold the write lock");
    let results = &app.state.results;
    let before = results.transactions();
    let report = |id, report: &ResultReport| {
        let (agent, report) = (agent.clone(), report.clone());
        tokio::spawn(async move { agent.report_result(id, &report).await.map(drop).map_err(|e| e.status()) })
    };
    let first = report(ids[0], &ok);
    until("the first report is being written", || results.transactions() == before + 1).await;
    let mut group: Vec<_> = ids[1..9].iter().map(|id| report(*id, &ok)).collect();
    group.push(report(finished, &failed));
    group.push(report(theirs, &ok));
    until("ten reports are queued", || results.queued() == 10).await;
    sqlx::query("ROLLBACK").execute(&mut blocker).await.expect("release");

    first.await.expect("task").expect("the first report");
    let mut answers = Vec::new();
    for task in group {
        answers.push(task.await.expect("task"));
    }
    let mut expected = vec![Ok(()); 8];
    expected.extend([Err(Some(409)), Err(Some(404))]);
    assert_eq!(answers, expected, "each report its own answer");
    assert_eq!(results.transactions() - before, 2, "the ten queued reports were committed in one transaction");
    for id in &ids {
        assert_eq!(app.admin.get_command(*id).await.expect("get").status, CommandStatus::Succeeded);
    }
    assert_eq!(app.admin.get_command(theirs).await.expect("get").status, CommandStatus::Queued);
    let chain = app.admin.verify_audit().await.expect("verify");
    assert!(chain.ok, "{chain:?}");
    app.stop().await;
}

/// Waits (bounded: 5 s) until `done` holds; panics naming `what` otherwise.
async fn until(what: &str, done: impl Fn() -> bool) {
    for _ in 0..1000 {
        if done() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("timed out waiting until {what}");
}
