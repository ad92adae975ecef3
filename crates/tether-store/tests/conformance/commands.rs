//! Commands: creation, delivery, reports, cancels and the sweeper.

use tether_proto::command::{CommandStatus, ResultReport, TargetSpec};
use tether_proto::signal;
use tether_store::{AuditEntry, Entity, ResultOutcome, ResultToRecord, StoreError, verify_audit};

use crate::fixtures::{T0, audit_entry, batch, command, enroll, labels};
use crate::harness::{Harness, conformance};

conformance!(
    a_labels_target_matches_agents_having_every_pair,
    the_same_idempotency_key_replays_the_same_request_and_refuses_another,
    reports_move_a_command_forward_and_a_repeat_changes_nothing,
    results_recorded_together_are_decided_in_order_and_a_refused_one_fails_only_itself,
    a_cancel_tells_the_agent_and_a_finished_command_cannot_be_cancelled,
    the_next_command_is_the_highest_priority_then_the_oldest,
    the_sweeper_expires_loses_and_releases,
    deliveries_of_several_agents_are_marked_together_and_only_the_named_agents,
    a_batch_counts_its_commands_per_state_and_cancels_the_unfinished,
);

async fn a_labels_target_matches_agents_having_every_pair(h: &Harness) {
    let store = h.store();
    let web = enroll(store, &[("role", "web"), ("env", "prod")]).await;
    let _db = enroll(store, &[("role", "db"), ("env", "prod")]).await;
    let target = TargetSpec::Labels(labels(&[("role", "web"), ("env", "prod")]));
    let created = store.create_batch(batch(target, T0), &|_| audit_entry("command.create")).await.expect("create");
    assert_eq!(created.command_ids.len(), 1);
    assert_eq!((created.heads.len(), created.heads[0].agent_id, created.heads[0].seq), (1, web, 1));
    let missing = TargetSpec::Agents(vec![web, tether_proto::AgentId::new()]);
    let refused = store.create_batch(batch(missing, T0), &|_| audit_entry("command.create")).await;
    assert!(matches!(refused, Err(StoreError::Invalid { field: "target", .. })), "{refused:?}");
    assert_eq!(store.read_signals(web, 0, 10).await.expect("signals").len(), 1, "the refused batch appended nothing");
}

async fn the_same_idempotency_key_replays_the_same_request_and_refuses_another(h: &Harness) {
    let store = h.store();
    let agent = enroll(store, &[]).await;
    let mut first = batch(TargetSpec::Agents(vec![agent]), T0);
    first.request.idempotency_key = Some("deploy-42".into());
    let created = store.create_batch(first.clone(), &|_| audit_entry("command.create")).await.expect("create");
    assert!(created.created);
    let replay = tether_store::NewBatch { id: tether_proto::BatchId::new(), ..first.clone() };
    let replayed = store.create_batch(replay, &|_| audit_entry("command.create")).await.expect("replay");
    assert_eq!(
        (replayed.batch_id, &replayed.command_ids, replayed.created),
        (created.batch_id, &created.command_ids, false)
    );
    assert!(replayed.heads.is_empty());
    let other = tether_store::NewBatch { id: tether_proto::BatchId::new(), request_hash: [9; 32], ..first };
    let conflict = store.create_batch(other, &|_| audit_entry("command.create")).await;
    assert!(matches!(conflict, Err(StoreError::Conflict(_))), "{conflict:?}");
    assert_eq!(store.read_signals(agent, 0, 10).await.expect("signals").len(), 1, "one command in all");
    let creates =
        store.list_audit(0, 100).await.expect("audit").iter().filter(|r| r.action == "command.create").count();
    assert_eq!(creates, 1, "only the creation is audited");
}

async fn reports_move_a_command_forward_and_a_repeat_changes_nothing(h: &Harness) {
    let store = h.store();
    let agent = enroll(store, &[]).await;
    let other = enroll(store, &[]).await;
    let id = command(store, agent, 60, T0).await;
    let foreign = store.report_running(other, id, T0 + 1).await;
    assert!(matches!(foreign, Err(StoreError::NotFound(Entity::Command))), "{foreign:?}");
    let running = store.report_running(agent, id, T0 + 1).await.expect("running");
    assert_eq!(running.status, CommandStatus::Running);
    assert!(running.delivered_at.is_some(), "a running report implies delivery");
    store.report_running(agent, id, T0 + 2).await.expect("a repeated running report is harmless");
    let mut ok = ResultReport::new(CommandStatus::Succeeded);
    ok.stdout = "pong".into();
    ok.exit_code = Some(0);
    let audit = |_: &tether_proto::command::Command, _| audit_entry("command.result");
    let recorded = store.report_result(agent, id, &ok, T0 + 3, &audit).await.expect("result");
    let ResultOutcome::Recorded { late: false, command } = recorded else { panic!("recorded on time: {recorded:?}") };
    assert_eq!(
        (command.status, command.stdout.as_str(), command.exit_code),
        (CommandStatus::Succeeded, "pong", Some(0))
    );
    assert_eq!(store.report_result(agent, id, &ok, T0 + 4, &audit).await.expect("repeat"), ResultOutcome::Unchanged);
    let different = store.report_result(agent, id, &ResultReport::new(CommandStatus::Failed), T0 + 5, &audit).await;
    assert!(matches!(different, Err(StoreError::Conflict(_))), "{different:?}");
    let late_running = store.report_running(agent, id, T0 + 6).await;
    assert!(matches!(late_running, Err(StoreError::Conflict(_))), "{late_running:?}");
}

/// A group of reports (the server's group commit) in one call: each gets
/// the answer it would get alone, in order, and only recorded ones are
/// written and audited, in order.
async fn results_recorded_together_are_decided_in_order_and_a_refused_one_fails_only_itself(h: &Harness) {
    let store = h.store();
    let agent = enroll(store, &[]).await;
    let other = enroll(store, &[]).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(command(store, agent, 60, T0).await);
    }
    let (a, b, c, finished) = (ids[0], ids[1], ids[2], ids[3]);
    let theirs = command(store, other, 60, T0).await;
    let audit = |cmd: &tether_proto::command::Command, late: bool| AuditEntry {
        target: cmd.id.to_string(),
        details: serde_json::json!({"status": cmd.status, "late": late}),
        ..audit_entry("command.result")
    };
    let (ok, failed) = (ResultReport::new(CommandStatus::Succeeded), ResultReport::new(CommandStatus::Failed));
    store.report_result(agent, finished, &ok, T0 + 1, &audit).await.expect("finished first");
    let before = store.list_audit(0, 1000).await.expect("audit").len();

    let to = |id, report| ResultToRecord { agent_id: agent, id, report, now: T0 + 2, audit: &audit };
    let unknown = tether_proto::CommandId::new();
    let group =
        [to(a, &ok), to(a, &ok), to(finished, &failed), to(theirs, &ok), to(b, &failed), to(unknown, &ok), to(c, &ok)];
    let out = store.report_results(&group).await.expect("the group commits");
    assert_eq!(out.len(), group.len(), "one answer per report");
    assert!(matches!(&out[0], Ok(ResultOutcome::Recorded { late: false, .. })), "{:?}", out[0]);
    assert_eq!(out[1].as_ref().expect("a repeat in the same group"), &ResultOutcome::Unchanged);
    assert!(matches!(out[2], Err(StoreError::Conflict(_))), "a different result: {:?}", out[2]);
    assert!(matches!(out[3], Err(StoreError::NotFound(Entity::Command))), "another agent's: {:?}", out[3]);
    assert!(matches!(&out[4], Ok(ResultOutcome::Recorded { command, .. }) if command.status == CommandStatus::Failed));
    assert!(matches!(out[5], Err(StoreError::NotFound(Entity::Command))), "unknown: {:?}", out[5]);
    assert!(matches!(&out[6], Ok(ResultOutcome::Recorded { .. })), "{:?}", out[6]);

    let status = |id| async move { store.get_command(id).await.expect("get").expect("command").status };
    assert_eq!(status(a).await, CommandStatus::Succeeded);
    assert_eq!(status(b).await, CommandStatus::Failed);
    assert_eq!(status(c).await, CommandStatus::Succeeded);
    assert_eq!(status(finished).await, CommandStatus::Succeeded, "the conflicting report changed nothing");
    assert_ne!(status(theirs).await, CommandStatus::Succeeded, "nor did the report for another agent's command");
    let rows = store.list_audit(0, 1000).await.expect("audit");
    let appended: Vec<&str> = rows[before..].iter().map(|r| r.target.as_str()).collect();
    assert_eq!(appended, [a.to_string(), b.to_string(), c.to_string()], "recorded ones audited, in order");
    let v = verify_audit(store).await.expect("verify");
    assert_eq!((v.checked as usize, v.broken_count), (rows.len(), 0), "{v:?}");
    assert!(store.report_results(&[]).await.expect("an empty group").is_empty());
}

async fn a_cancel_tells_the_agent_and_a_finished_command_cannot_be_cancelled(h: &Harness) {
    let store = h.store();
    let agent = enroll(store, &[]).await;
    let id = command(store, agent, 60, T0).await;
    let out = store.cancel_command(id, T0 + 1, audit_entry("command.cancel")).await.expect("cancel");
    assert_eq!((out.cancelled, out.heads.len(), out.heads[0].seq), (vec![id], 1, 2));
    let signals = store.read_signals(agent, 1, 10).await.expect("signals");
    assert_eq!(signals[0].1.kind, signal::COMMAND_CANCELLED);
    // The agent confirms with a cancelled result; that is recorded.
    let audit = |_: &tether_proto::command::Command, _| audit_entry("command.result");
    let confirm = store.report_result(agent, id, &ResultReport::new(CommandStatus::Cancelled), T0 + 2, &audit).await;
    assert!(matches!(confirm, Ok(ResultOutcome::Recorded { late: false, .. })), "{confirm:?}");
    let again = store.cancel_command(id, T0 + 3, audit_entry("command.cancel")).await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    let unknown = store.cancel_command(tether_proto::CommandId::new(), T0, audit_entry("command.cancel")).await;
    assert!(matches!(unknown, Err(StoreError::NotFound(Entity::Command))), "{unknown:?}");
}

async fn the_next_command_is_the_highest_priority_then_the_oldest(h: &Harness) {
    let store = h.store();
    let agent = enroll(store, &[]).await;
    let mut ids = Vec::new();
    for priority in [5, 9, 5] {
        let mut b = batch(TargetSpec::Agents(vec![agent]), T0);
        b.request.priority = priority;
        ids.push(store.create_batch(b, &|_| audit_entry("command.create")).await.expect("create").command_ids[0]);
    }
    let mut taken = Vec::new();
    while let Some(c) = store.take_next_command(agent, T0 + 1).await.expect("take") {
        assert_eq!(c.status, CommandStatus::Delivered);
        taken.push(c.id);
    }
    assert_eq!(taken, vec![ids[1], ids[0], ids[2]]);
    let pairs: Vec<_> = ids.iter().map(|id| (agent, *id)).collect();
    assert_eq!(store.mark_delivered(&pairs, T0 + 2).await.expect("mark"), 0, "all delivered already");
}

async fn deliveries_of_several_agents_are_marked_together_and_only_the_named_agents(h: &Harness) {
    let store = h.store();
    let (a, b) = (enroll(store, &[]).await, enroll(store, &[]).await);
    let (for_a, for_b) = (command(store, a, 10, T0).await, command(store, b, 10, T0).await);
    let wrong = store.mark_delivered(&[(b, for_a)], T0 + 1).await.expect("mark");
    assert_eq!(wrong, 0, "a command is marked only for its own agent");
    assert_eq!(store.mark_delivered(&[(a, for_a), (b, for_b)], T0 + 1).await.expect("mark"), 2);
    for id in [for_a, for_b] {
        let command = store.get_command(id).await.expect("get").expect("exists");
        assert_eq!((command.status, command.delivered_at.is_some()), (CommandStatus::Delivered, true));
    }
    assert_eq!(store.mark_delivered(&[(a, for_a)], T0 + 2).await.expect("mark"), 0, "a repeat changes nothing");
}

async fn the_sweeper_expires_loses_and_releases(h: &Harness) {
    let store = h.store();
    let agent = enroll(store, &[]).await;
    let undelivered = command(store, agent, 10, T0).await;
    let delivered = command(store, agent, 10, T0).await;
    store.mark_delivered(&[(agent, delivered)], T0).await.expect("deliver");
    let mut later = batch(TargetSpec::Agents(vec![agent]), T0);
    later.request.not_before = Some(time::OffsetDateTime::from_unix_timestamp((T0 + 60_000) / 1000).expect("time"));
    let held = store.create_batch(later, &|_| audit_entry("command.create")).await.expect("create");
    assert!(held.heads.is_empty(), "held back: not in the stream yet");

    let before_grace = store.sweep(T0 + 10_000 + 119_000).await.expect("sweep");
    assert_eq!((before_grace.expired, before_grace.lost), (0, 0));
    assert_eq!((before_grace.released, before_grace.heads.len()), (1, 1), "not_before has come");
    let after_grace = store.sweep(T0 + 10_000 + 120_000).await.expect("sweep");
    assert_eq!((after_grace.lost, after_grace.released), (1, 0));
    let after_expiry = store.sweep(T0 + 3_600_000).await.expect("sweep");
    assert_eq!(after_expiry.expired, 2);

    let status = |id| async move { store.get_command(id).await.expect("get").expect("exists").status };
    assert_eq!(status(undelivered).await, CommandStatus::Expired);
    assert_eq!(status(delivered).await, CommandStatus::Lost);
    // A late result still lands on a lost command.
    let audit = |_: &tether_proto::command::Command, _| audit_entry("command.result");
    let late =
        store.report_result(agent, delivered, &ResultReport::new(CommandStatus::Succeeded), T0 + 200_000, &audit).await;
    assert!(matches!(late, Ok(ResultOutcome::Recorded { late: true, .. })), "{late:?}");
}

async fn a_batch_counts_its_commands_per_state_and_cancels_the_unfinished(h: &Harness) {
    let store = h.store();
    let (a, b) = (enroll(store, &[("g", "1")]).await, enroll(store, &[("g", "1")]).await);
    let created = store
        .create_batch(batch(TargetSpec::Labels(labels(&[("g", "1")])), T0), &|_| audit_entry("command.create"))
        .await
        .expect("create");
    let first = store.take_next_command(a, T0 + 1).await.expect("take").expect("a's command");
    let audit = |_: &tether_proto::command::Command, _| audit_entry("command.result");
    store.report_result(a, first.id, &ResultReport::new(CommandStatus::Succeeded), T0 + 2, &audit).await.expect("done");
    let batch_now = store.get_batch(created.batch_id).await.expect("get").expect("batch");
    assert_eq!((batch_now.total, batch_now.status), (2, tether_proto::command::BatchStatus::Running));
    let out = store.cancel_batch(created.batch_id, T0 + 3, &|_| audit_entry("batch.cancel")).await.expect("cancel");
    assert_eq!((out.cancelled.len(), out.heads.len(), out.heads[0].agent_id), (1, 1, b));
    let done = store.get_batch(created.batch_id).await.expect("get").expect("batch");
    assert_eq!(done.status, tether_proto::command::BatchStatus::Done);
    assert_eq!(done.counts.get(&CommandStatus::Cancelled), Some(&1));
    let unknown = store.cancel_batch(tether_proto::BatchId::new(), T0, &|_| audit_entry("batch.cancel")).await;
    assert!(matches!(unknown, Err(StoreError::NotFound(Entity::Batch))), "{unknown:?}");
}
