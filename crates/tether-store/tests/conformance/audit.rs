//! The audit chain and mutations that commit with their audit row.

use tether_proto::command::{CommandStatus, TargetSpec};
use tether_proto::{AgentId, Labels};
use tether_store::{AuditEntry, DevicePoll, NewGrantOutcome, Role, StoreError, verify_audit};

use crate::fixtures::{T0, audit_entry, batch, command, enroll, enroll_token, grant, rand_hash};
use crate::harness::{Harness, conformance};

conformance!(
    audit_rows_link_into_one_chain,
    a_float_in_details_does_not_break_the_chain,
    verification_reports_every_altered_or_removed_row,
    audit_rows_are_filtered_newest_first,
    a_failed_audit_append_rolls_the_mutation_back,
    a_failed_audit_append_rolls_back_commands_and_device_decisions,
);

async fn audit_rows_link_into_one_chain(h: &Harness) {
    let store = h.store();
    for action in ["a", "b", "c"] {
        let entry =
            AuditEntry { target: action.into(), details: serde_json::json!({"k": action}), ..audit_entry(action) };
        store.append_audit(entry).await.expect("append");
    }
    let rows = store.list_audit(0, 10).await.expect("list");
    let mut prev = tether_store::GENESIS_HASH.to_vec();
    for row in &rows {
        assert_eq!(row.prev_hash, prev);
        assert_eq!(row.hash, row.expected_hash(&prev).to_vec());
        prev = row.hash.clone();
    }
    assert_eq!(rows.len(), 3);
    assert_eq!(store.list_audit(rows[0].id, 10).await.expect("after").len(), 2);
}

/// A float that does not survive a parse/print round trip byte for byte
/// must not break the chain, since the hash covers the stored text.
async fn a_float_in_details_does_not_break_the_chain(h: &Harness) {
    let store = h.store();
    let details: serde_json::Value = serde_json::from_str(r#"{"v":9.7084255809572990e79}"#).expect("json");
    store.append_audit(AuditEntry { details, ..audit_entry("agent.x") }).await.expect("append");
    store.append_audit(audit_entry("after")).await.expect("append");
    let v = verify_audit(store).await.expect("verify");
    assert_eq!((v.checked, v.broken_count), (2, 0), "{v:?}");
}

async fn verification_reports_every_altered_or_removed_row(h: &Harness) {
    let store = h.store();
    for i in 0..6 {
        store
            .append_audit(AuditEntry { details: serde_json::json!({"i": i}), ..audit_entry("a") })
            .await
            .expect("append");
    }
    let ids: Vec<i64> = store.list_audit(0, 10).await.expect("rows").iter().map(|r| r.id).collect();
    h.exec(&format!("UPDATE audit SET outcome = 'denied' WHERE id = {}", ids[1])).await;
    h.exec(&format!("DELETE FROM audit WHERE id = {}", ids[3])).await;
    let v = verify_audit(store).await.expect("verify");
    let broken: Vec<i64> = v.broken.iter().map(|b| b.id).collect();
    assert_eq!((broken, v.broken_count, v.checked), (vec![ids[1], ids[4]], 2, 5), "{v:?}");
    assert!(v.broken[0].problem.contains("altered") && v.broken[1].problem.contains("removed"), "{v:?}");
}

async fn audit_rows_are_filtered_newest_first(h: &Harness) {
    let store = h.store();
    let agent = AgentId::new();
    for (actor, action, target, ts) in [
        ("alice", "user.create", "x", T0),
        ("bob", "agent.revoke", agent.to_string().as_str(), T0 + 1),
        ("alice", "agent.revoke", "y", T0 + 2),
    ] {
        let entry = AuditEntry { actor: actor.into(), target: target.into(), ts, ..audit_entry(action) };
        store.append_audit(entry).await.expect("append");
    }
    let query = |f: tether_store::AuditFilter| async move {
        let rows = store.query_audit(&tether_store::AuditFilter { limit: 10, ..f }).await.expect("query");
        rows.into_iter().map(|r| (r.actor, r.action)).collect::<Vec<_>>()
    };
    let alice = query(tether_store::AuditFilter { actor: Some("alice".into()), ..Default::default() }).await;
    assert_eq!(alice, vec![("alice".into(), "agent.revoke".into()), ("alice".into(), "user.create".into())]);
    let revokes = query(tether_store::AuditFilter { action: Some("agent.revoke".into()), ..Default::default() }).await;
    assert_eq!(revokes.len(), 2);
    let about = query(tether_store::AuditFilter { agent_id: Some(agent), ..Default::default() }).await;
    assert_eq!(about, vec![("bob".into(), "agent.revoke".into())]);
    let window = query(tether_store::AuditFilter { from: Some(T0 + 1), to: Some(T0 + 2), ..Default::default() }).await;
    assert_eq!(window, vec![("bob".into(), "agent.revoke".into())]);
}

/// The audit row is part of the mutation's transaction: when appending it
/// fails, the mutation is rolled back (a 2xx means both are committed).
async fn a_failed_audit_append_rolls_the_mutation_back(h: &Harness) {
    let store = h.store();
    let token = tether_store::NewEnrollToken { id: "t".into(), ..enroll_token(rand_hash(), Labels::new(), 1) };
    store.create_enroll_token(token, T0, audit_entry("enroll_token.create")).await.expect("token");
    h.break_audit().await;
    let failed = store.revoke_enroll_token("t", T0 + 1, audit_entry("enroll_token.revoke")).await;
    assert!(matches!(failed, Err(StoreError::Backend(_))), "{failed:?}");
    let tokens = store.list_enroll_tokens().await.expect("list");
    assert_eq!(tokens[0].revoked_at, None, "the revocation was rolled back with its audit row");
    let user = store.create_user("u", "hash", Role::Viewer, T0, audit_entry("user.create")).await;
    assert!(user.is_err());
    assert!(store.find_user("u").await.expect("find").is_none(), "no user without its audit row");
}

async fn a_failed_audit_append_rolls_back_commands_and_device_decisions(h: &Harness) {
    let store = h.store();
    let agent = enroll(store, &[]).await;
    let queued = command(store, agent, 60, T0).await;
    let code = rand_hash();
    assert_eq!(store.create_device_grant(grant("BCDFGHJK", code, T0)).await.expect("grant"), NewGrantOutcome::Created);
    let audit_rows = store.list_audit(0, 1000).await.expect("audit").len();
    h.break_audit().await;

    let new = batch(TargetSpec::Agents(vec![agent]), T0);
    let batch_id = new.id;
    let created = store.create_batch(new, &|_| audit_entry("command.create")).await;
    assert!(matches!(created, Err(StoreError::Backend(_))), "{created:?}");
    assert!(store.get_batch(batch_id).await.expect("get").is_none(), "no batch without its audit row");
    let filter = tether_store::CommandFilter { agent_id: Some(agent), limit: 100, ..Default::default() };
    assert_eq!(store.list_commands(&filter).await.expect("list").len(), 1, "no command without its audit row");
    assert_eq!(store.read_signals(agent, 0, 100).await.expect("signals").len(), 1, "nor its stream signal");

    let cancelled = store.cancel_command(queued, T0 + 1, audit_entry("command.cancel")).await;
    assert!(matches!(cancelled, Err(StoreError::Backend(_))), "{cancelled:?}");
    let cmd = store.get_command(queued).await.expect("get").expect("command");
    assert_eq!(cmd.status, CommandStatus::Queued, "the cancellation was rolled back with its audit row");

    let approve = |_: &tether_store::DeviceGrantInfo| audit_entry("device.approve");
    let approved = store.decide_device_grant("BCDFGHJK", true, &Labels::new(), "alice", T0 + 1, &approve).await;
    assert!(matches!(approved, Err(StoreError::Backend(_))), "{approved:?}");
    assert!(
        store.pending_device_grant("BCDFGHJK", T0 + 2).await.expect("pending").is_some(),
        "the approval was rolled back with its audit row"
    );
    let redeem = |_: &tether_store::DeviceRedeemed| audit_entry("agent.enroll");
    let polled = store.poll_device_grant(code, AgentId::new(), rand_hash(), 30_000, T0 + 10_000, &redeem).await;
    let polled = polled.expect("poll");
    assert!(matches!(polled, DevicePoll::Pending), "nothing was approved, so nothing is redeemed: {polled:?}");
    assert_eq!(store.list_audit(0, 1000).await.expect("audit").len(), audit_rows);
}
