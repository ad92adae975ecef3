//! The agent stream: long-poll contract, wake-ups, cursors (protocol.md §4).

use std::time::Duration;

use tether_client::{ClientError, Poll};
use tether_proto::command::{CommandStatus, CreateCommand, ResultReport, Target};
use tether_proto::signal::{COMMAND_QUEUED, CommandQueued};
use tether_proto::{Cursor, ErrorKey};

use crate::common::{spawn_app, spawn_app_with};

fn cursor_of(poll: &Poll) -> String {
    match poll {
        Poll::Signals(u) => u.cursor.clone(),
        Poll::Idle { cursor } => cursor.clone(),
    }
}

#[tokio::test]
async fn enroll_poll_command_result_round_trip() {
    let app = spawn_app().await;
    let (agent, pair) = app.agent(&[("role", "web")]).await;

    // A newly enrolled agent's stream is empty: 204 with an ETag cursor.
    let first = agent.updates(None, 20, 0).await.expect("first poll");
    let Poll::Idle { cursor } = first else { panic!("expected 204, got {first:?}") };
    let parsed: Cursor = cursor.parse().expect("ETag carries a cursor");
    assert_eq!(parsed.seq, 0);

    // Park a long-poll, then create a command: the poll must return with it.
    let waiting = {
        let agent = agent.clone();
        let cursor = cursor.clone();
        tokio::spawn(async move { agent.updates(Some(&cursor), 20, 30).await })
    };
    tokio::task::yield_now().await;
    let mut req = CreateCommand::new(Target::agents([pair.agent_id]), "ping");
    req.args = serde_json::json!({"count": 1});
    let created = app.admin.create_command(&req).await.expect("create command");
    assert_eq!(created.command_ids.len(), 1);
    let command_id = created.command_ids[0];

    let poll = waiting.await.expect("join").expect("poll");
    let Poll::Signals(updates) = poll else { panic!("the waiting poll must return the signal, got {poll:?}") };
    assert_eq!(updates.signals.len(), 1);
    assert_eq!(updates.signals[0].kind, COMMAND_QUEUED);
    let queued: CommandQueued = serde_json::from_value(updates.signals[0].reference.clone()).expect("ref");
    assert_eq!(queued.command_id, command_id);
    assert_eq!(queued.name, "ping");
    assert_eq!(queued.args, serde_json::json!({"count": 1}));

    let delivered = app.admin.get_command(command_id).await.expect("get");
    assert_eq!(delivered.status, CommandStatus::Delivered);
    assert!(delivered.delivered_at.is_some());

    agent.report_running(command_id).await.expect("running");
    let mut result = ResultReport::new(CommandStatus::Succeeded);
    result.exit_code = Some(0);
    result.stdout = "pong\n".into();
    agent.report_result(command_id, &result).await.expect("result");
    // The same result again is fine (idempotent).
    agent.report_result(command_id, &result).await.expect("same result again");

    let done = app.admin.get_command(command_id).await.expect("get");
    assert_eq!(done.status, CommandStatus::Succeeded);
    assert_eq!(done.exit_code, Some(0));
    assert_eq!(done.stdout, "pong\n");
    let (d, s, f) = (
        done.delivered_at.expect("delivered_at"),
        done.started_at.expect("started_at"),
        done.finished_at.expect("finished_at"),
    );
    assert!(done.created_at <= d && d <= s && s <= f, "timestamps are monotonic");

    // Polling from the returned cursor is idle again.
    let again = agent.updates(Some(&updates.cursor), 20, 0).await.expect("poll");
    assert_eq!(again, Poll::Idle { cursor: updates.cursor.clone() });
    app.stop().await;
}

#[tokio::test]
async fn idle_polls_never_touch_the_store() {
    // Background jobs use the store on their own schedule; keep them out of the count.
    let app = spawn_app_with(|c| {
        c.sweep_interval = Duration::from_secs(3600);
        c.seen_flush_interval = Duration::from_secs(3600);
        c.limits.poll_burst = 1000;
    })
    .await;
    let (agent, _) = app.agent(&[]).await;
    let cursor = cursor_of(&agent.updates(None, 20, 0).await.expect("warm-up poll"));
    let before = app.state.store_calls.get();
    for _ in 0..200 {
        let poll = agent.updates(Some(&cursor), 20, 0).await.expect("poll");
        assert!(matches!(poll, Poll::Idle { .. }));
    }
    // A waited poll that times out is idle too.
    agent.updates(Some(&cursor), 20, 1).await.expect("long poll");
    assert_eq!(app.state.store_calls.get(), before, "idle polls must not query the store");
    app.stop().await;
}

#[tokio::test]
async fn a_new_poll_ends_the_previous_one_with_204() {
    let app = spawn_app().await;
    let (agent, _) = app.agent(&[]).await;
    let cursor = cursor_of(&agent.updates(None, 20, 0).await.expect("poll"));
    let old = {
        let (agent, cursor) = (agent.clone(), cursor.clone());
        tokio::spawn(async move { agent.updates(Some(&cursor), 20, 30).await })
    };
    crate::common::until_parked(&app.state, 1).await;
    let newer = {
        let (agent, cursor) = (agent.clone(), cursor.clone());
        tokio::spawn(async move { agent.updates(Some(&cursor), 20, 2).await })
    };
    let ended = tokio::time::timeout(Duration::from_secs(10), old).await.expect("old poll ended early").expect("join");
    assert!(matches!(ended, Ok(Poll::Idle { .. })), "{ended:?}");
    newer.await.expect("join").expect("newer poll");
    app.stop().await;
}

#[tokio::test]
async fn cursor_from_the_future_or_another_epoch_is_expired() {
    let app = spawn_app().await;
    let (agent, _) = app.agent(&[]).await;
    let cursor: Cursor = cursor_of(&agent.updates(None, 20, 0).await.expect("poll")).parse().expect("cursor");
    for bad in [Cursor { seq: cursor.seq + 5, ..cursor }, Cursor { epoch: cursor.epoch - 1, ..cursor }] {
        let err = agent.updates(Some(&bad.to_string()), 20, 0).await.expect_err("must fail");
        assert_eq!(err.status(), Some(409));
        assert_eq!(err.key(), Some(ErrorKey::CursorExpired), "{err}");
    }
    let err = agent.updates(Some("garbage"), 20, 0).await.expect_err("must fail");
    assert_eq!(err.key(), Some(ErrorKey::BadRequest));
    app.stop().await;
}

#[tokio::test]
async fn poll_parameters_are_range_checked() {
    let app = spawn_app().await;
    let (agent, _) = app.agent(&[]).await;
    for (limit, wait) in [(0, 0), (101, 0), (20, 31)] {
        let err = agent.updates(None, limit, wait).await.expect_err("out of range");
        assert_eq!(err.status(), Some(400), "limit={limit} wait={wait}");
        assert_eq!(err.key(), Some(ErrorKey::BadRequest));
    }
    app.stop().await;
}

#[tokio::test]
async fn revocation_ends_the_waiting_poll_with_device_revoked() {
    let app = spawn_app().await;
    let (agent, pair) = app.agent(&[]).await;
    let cursor = cursor_of(&agent.updates(None, 20, 0).await.expect("poll"));
    let waiting = {
        let agent = agent.clone();
        tokio::spawn(async move { agent.updates(Some(&cursor), 20, 30).await })
    };
    crate::common::until_parked(&app.state, 1).await;
    app.admin.revoke_agent(pair.agent_id, "decommissioned").await.expect("revoke");
    let err = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the poll ends at once")
        .expect("join")
        .expect_err("revoked");
    assert_eq!(err.key(), Some(ErrorKey::DeviceRevoked), "{err}");
    let ClientError::Api { body, .. } = &err else { panic!("{err}") };
    assert_eq!(body.params["reason"], "decommissioned");
    // Every further call is refused too, including refresh.
    let err = agent.updates(None, 20, 0).await.expect_err("revoked");
    assert_eq!(err.key(), Some(ErrorKey::DeviceRevoked));
    let err = app.anon().refresh(&pair.refresh_token, pair.agent_id).await.expect_err("revoked");
    assert_eq!(err.key(), Some(ErrorKey::DeviceRevoked));
    app.stop().await;
}

#[tokio::test]
async fn simple_command_api_hands_out_by_priority_and_marks_delivered() {
    let app = spawn_app().await;
    let (agent, pair) = app.agent(&[]).await;
    assert!(agent.next_command(0).await.expect("next").is_none());
    let mut low = CreateCommand::new(Target::agents([pair.agent_id]), "low");
    low.priority = 1;
    let mut high = CreateCommand::new(Target::agents([pair.agent_id]), "high");
    high.priority = 9;
    app.admin.create_command(&low).await.expect("low");
    app.admin.create_command(&high).await.expect("high");
    let first = agent.next_command(0).await.expect("next").expect("a command");
    assert_eq!((first.name.as_str(), first.status), ("high", CommandStatus::Delivered));
    let second = agent.next_command(0).await.expect("next").expect("a command");
    assert_eq!(second.name, "low");
    // A waiting call is woken by a new command.
    let waiting = {
        let agent = agent.clone();
        tokio::spawn(async move { agent.next_command(30).await })
    };
    crate::common::until_parked(&app.state, 1).await;
    app.admin.create_command(&CreateCommand::new(Target::all(), "later")).await.expect("create");
    let third = waiting.await.expect("join").expect("next").expect("woken with the command");
    assert_eq!(third.name, "later");
    app.stop().await;
}

#[tokio::test]
async fn a_cursor_behind_the_retained_window_is_expired_and_a_fresh_start_resyncs() {
    let app = spawn_app_with(|c| {
        c.signal_max_per_agent = 2;
        c.retention_interval = Duration::from_millis(50);
        c.limits.poll_burst = 1000;
    })
    .await;
    let (agent, pair) = app.agent(&[]).await;
    let start = cursor_of(&agent.updates(None, 20, 0).await.expect("poll"));
    for _ in 0..5 {
        app.admin.create_command(&CreateCommand::new(Target::agents([pair.agent_id]), "ping")).await.expect("create");
    }
    // Wait for retention to run (bounded).
    let mut expired = None;
    for _ in 0..100 {
        match agent.updates(Some(&start), 20, 0).await {
            Err(e) => {
                expired = Some(e);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let err = expired.expect("the old cursor expires once signals are pruned");
    assert_eq!(err.key(), Some(ErrorKey::CursorExpired));
    // Without a cursor the agent gets the retained backlog: the newest two.
    // Retention may have first run while the commands were still being
    // created, so wait (bounded) for the pass that follows the last one.
    let mut retained = 0;
    for _ in 0..100 {
        let Poll::Signals(backlog) = agent.updates(None, 20, 0).await.expect("resync") else {
            panic!("signals expected")
        };
        retained = backlog.signals.len();
        if retained == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(retained, 2, "retention keeps the newest two signals");
    app.stop().await;
}
