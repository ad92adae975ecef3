//! Store-level tests with an explicit clock: sweeps, rotation, idempotency.

use tether_proto::command::{CommandStatus, CreateCommand, ResultReport, Target, TargetSpec};
use tether_proto::{AgentId, BatchId, Labels};

use super::SqliteStore;
use crate::{
    DevicePoll, NewAgent, NewBatch, NewDeviceGrant, NewEnrollToken, NewGrantOutcome, RefreshOutcome, ResultOutcome,
    Store, StoreError,
};

const T0: i64 = 1_800_000_000_000;

async fn store() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(dir.path()).await.expect("open store");
    (dir, store)
}

async fn enroll(store: &SqliteStore, labels: &[(&str, &str)]) -> AgentId {
    let token_hash = rand_hash();
    store
        .create_enroll_token(
            NewEnrollToken {
                id: uuid::Uuid::now_v7().to_string(),
                token_hash,
                labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                uses: 1,
                created_by: "admin".into(),
                expires_at: T0 + 3_600_000,
            },
            T0,
            audit_entry("enroll_token.create"),
        )
        .await
        .expect("token");
    let agent = NewAgent {
        id: AgentId::new(),
        hostname: "host".into(),
        labels: Labels::new(),
        facts: serde_json::json!({}),
        public_key: vec![0; 32],
    };
    store.enroll_agent(token_hash, agent, rand_hash(), T0, &|_| audit_entry("agent.enroll")).await.expect("enroll").id
}

fn rand_hash() -> [u8; 32] {
    *uuid::Uuid::now_v7().as_bytes().repeat(2).first_chunk().expect("32 bytes")
}

async fn command(store: &SqliteStore, agent: AgentId, timeout_s: u32, now: i64) -> tether_proto::CommandId {
    let mut req = CreateCommand::new(Target::agents([agent]), "ping");
    req.timeout_s = timeout_s;
    let batch = NewBatch {
        id: BatchId::new(),
        target: TargetSpec::Agents(vec![agent]),
        request: req,
        created_by: "admin".into(),
        request_hash: rand_hash(),
        now,
    };
    store.create_batch(batch, &|_| audit_entry("command.create")).await.expect("create").command_ids[0]
}

#[tokio::test]
async fn enroll_token_is_single_use() {
    let (_dir, store) = store().await;
    let token_hash = rand_hash();
    let token = NewEnrollToken {
        id: "t1".into(),
        token_hash,
        labels: Labels::new(),
        uses: 1,
        created_by: "admin".into(),
        expires_at: T0 + 1000,
    };
    store.create_enroll_token(token, T0, audit_entry("enroll_token.create")).await.expect("token");
    let agent = || NewAgent {
        id: AgentId::new(),
        hostname: "h".into(),
        labels: Labels::new(),
        facts: serde_json::Value::Null,
        public_key: vec![1; 32],
    };
    store
        .enroll_agent(token_hash, agent(), rand_hash(), T0, &|_| audit_entry("agent.enroll"))
        .await
        .expect("first use");
    let second = store.enroll_agent(token_hash, agent(), rand_hash(), T0, &|_| audit_entry("agent.enroll")).await;
    assert!(matches!(second, Err(StoreError::NotFound)), "{second:?}");
}

#[tokio::test]
async fn sweep_expires_undelivered_and_loses_silent_commands() {
    let (_dir, store) = store().await;
    let agent = enroll(&store, &[]).await;
    let undelivered = command(&store, agent, 10, T0).await;
    let delivered = command(&store, agent, 10, T0).await;
    store.mark_delivered(agent, &[delivered], T0).await.expect("deliver");

    let before_grace = store.sweep(T0 + 10_000 + 119_000).await.expect("sweep");
    assert_eq!((before_grace.expired, before_grace.lost), (0, 0));
    let after_grace = store.sweep(T0 + 10_000 + 120_000).await.expect("sweep");
    assert_eq!(after_grace.lost, 1);
    let after_expiry = store.sweep(T0 + 3_600_000).await.expect("sweep");
    assert_eq!(after_expiry.expired, 1);

    let get = |id| store.get_command(id);
    assert_eq!(get(undelivered).await.expect("get").expect("exists").status, CommandStatus::Expired);
    assert_eq!(get(delivered).await.expect("get").expect("exists").status, CommandStatus::Lost);

    // A late result still lands on a lost command.
    let late = store
        .report_result(agent, delivered, &ResultReport::new(CommandStatus::Succeeded), T0 + 200_000, &|_, _| {
            audit_entry("command.result")
        })
        .await;
    assert!(matches!(late, Ok(ResultOutcome::Recorded { late: true, .. })), "{late:?}");
}

/// An agent enrolled with the refresh token `first`.
async fn enrolled_with(store: &SqliteStore, first: [u8; 32]) -> AgentId {
    let token_hash = rand_hash();
    let token = NewEnrollToken {
        id: uuid::Uuid::now_v7().to_string(),
        token_hash,
        labels: Labels::new(),
        uses: 1,
        created_by: "a".into(),
        expires_at: T0 + 1000,
    };
    store.create_enroll_token(token, T0, audit_entry("enroll_token.create")).await.expect("token");
    let agent = NewAgent {
        id: AgentId::new(),
        hostname: "h".into(),
        labels: Labels::new(),
        facts: serde_json::Value::Null,
        public_key: vec![1; 32],
    };
    store.enroll_agent(token_hash, agent, first, T0, &|_| audit_entry("agent.enroll")).await.expect("enroll").id
}

fn audit_entry(action: &str) -> crate::AuditEntry {
    crate::AuditEntry {
        ts: T0,
        actor: "admin".into(),
        actor_kind: "user",
        action: action.into(),
        target: String::new(),
        outcome: "ok",
        ip: None,
        request_id: None,
        details: serde_json::json!({}),
    }
}

fn reuse_audit() -> crate::AuditEntry {
    crate::AuditEntry {
        actor: "anonymous".into(),
        actor_kind: "agent",
        outcome: "family_revoked",
        ..audit_entry("token.refresh_reuse")
    }
}

async fn rotate(store: &SqliteStore, id: AgentId, presented: [u8; 32], new: [u8; 32], now: i64) -> RefreshOutcome {
    store.rotate_refresh_token(Some(id), presented, new, 30_000, now, reuse_audit()).await.expect("rotate")
}

async fn reuse_rows(store: &SqliteStore) -> Vec<crate::AuditRecord> {
    let rows = store.list_audit(0, 100).await.expect("audit");
    rows.into_iter().filter(|r| r.action == "token.refresh_reuse").collect()
}

#[tokio::test]
async fn the_lost_response_retry_works_once() {
    let (_dir, store) = store().await;
    let first = rand_hash();
    let id = enrolled_with(&store, first).await;
    let second = rand_hash();
    assert_eq!(
        rotate(&store, id, first, second, T0).await,
        RefreshOutcome::Rotated { agent_id: id, lost_response_retry: false }
    );
    // The response was lost: the same token again within 30 s gets a fresh pair.
    let third = rand_hash();
    let retried = rotate(&store, id, first, third, T0 + 5_000).await;
    assert_eq!(retried, RefreshOutcome::Rotated { agent_id: id, lost_response_retry: true });
    assert!(reuse_rows(&store).await.is_empty(), "a lost response is not audited as reuse");
    // A second retry is reuse: the family dies, including the live `third`.
    let again = rotate(&store, id, first, rand_hash(), T0 + 6_000).await;
    assert!(matches!(again, RefreshOutcome::ReuseDetected { agent_id, .. } if agent_id == id), "{again:?}");
    assert_eq!(rotate(&store, id, third, rand_hash(), T0 + 7_000).await, RefreshOutcome::Invalid);
    assert_eq!(reuse_rows(&store).await.len(), 1);
}

/// The theft of issue 10: a thief's retry inside the grace kills the real
/// agent's successor; the real agent's next refresh must expose it.
#[tokio::test]
async fn a_revoked_token_of_a_live_family_is_reuse_and_kills_the_thiefs_tokens() {
    let (_dir, store) = store().await;
    let first = rand_hash();
    let id = enrolled_with(&store, first).await;
    let agents_token = rand_hash();
    rotate(&store, id, first, agents_token, T0).await;
    let thiefs_token = rand_hash();
    let stolen = rotate(&store, id, first, thiefs_token, T0 + 1_000).await;
    assert_eq!(stolen, RefreshOutcome::Rotated { agent_id: id, lost_response_retry: true });
    // The real agent presents its (now revoked) successor.
    let exposed = rotate(&store, id, agents_token, rand_hash(), T0 + 2_000).await;
    assert!(matches!(exposed, RefreshOutcome::ReuseDetected { agent_id, .. } if agent_id == id), "{exposed:?}");
    assert_eq!(rotate(&store, id, thiefs_token, rand_hash(), T0 + 3_000).await, RefreshOutcome::Invalid);
    let agent = store.get_agent(id).await.expect("get").expect("agent");
    assert_eq!(agent.tokens_valid_after, Some(T0 + 2_000), "the agent's access tokens are revoked");
    let rows = reuse_rows(&store).await;
    assert_eq!(rows.len(), 1, "reuse is audited");
    assert_eq!(rows[0].target, id.to_string());
    // A token of the dead family is merely invalid now: no further row.
    assert_eq!(rotate(&store, id, agents_token, rand_hash(), T0 + 4_000).await, RefreshOutcome::Invalid);
    assert_eq!(reuse_rows(&store).await.len(), 1);
}

#[tokio::test]
async fn reuse_after_the_successor_was_used_or_after_the_grace_revokes_the_family() {
    for (successor_used, at) in [(true, T0 + 5_000), (false, T0 + 30_001)] {
        let (_dir, store) = store().await;
        let first = rand_hash();
        let id = enrolled_with(&store, first).await;
        let second = rand_hash();
        rotate(&store, id, first, second, T0).await;
        let mut live = second;
        if successor_used {
            live = rand_hash();
            rotate(&store, id, second, live, T0 + 1_000).await;
        }
        let replay = rotate(&store, id, first, rand_hash(), at).await;
        assert!(matches!(replay, RefreshOutcome::ReuseDetected { .. }), "{successor_used} {replay:?}");
        assert_eq!(rotate(&store, id, live, rand_hash(), at + 1).await, RefreshOutcome::Invalid);
    }
}

#[tokio::test]
async fn labels_target_matches_agents_having_every_pair() {
    let (_dir, store) = store().await;
    let web = enroll(&store, &[("role", "web"), ("env", "prod")]).await;
    let _db = enroll(&store, &[("role", "db"), ("env", "prod")]).await;
    let labels: Labels = [("role".to_string(), "web".to_string())].into();
    let batch = NewBatch {
        id: BatchId::new(),
        target: TargetSpec::Labels(labels.clone()),
        request: CreateCommand::new(Target::labels(labels), "ping"),
        created_by: "admin".into(),
        request_hash: rand_hash(),
        now: T0,
    };
    let created = store.create_batch(batch, &|_| audit_entry("command.create")).await.expect("create");
    assert_eq!(created.command_ids.len(), 1);
    assert_eq!(created.heads.len(), 1);
    assert_eq!(created.heads[0].agent_id, web);
    assert_eq!(created.heads[0].seq, 1);
}

#[tokio::test]
async fn audit_chain_links_rows() {
    let (_dir, store) = store().await;
    for action in ["a", "b", "c"] {
        store
            .append_audit(crate::AuditEntry {
                ts: T0,
                actor: "admin".into(),
                actor_kind: "user",
                action: if action == "a" { "one".into() } else { "two".into() },
                target: action.into(),
                outcome: "ok",
                ip: None,
                request_id: None,
                details: serde_json::json!({"k": action}),
            })
            .await
            .expect("append");
    }
    let rows = store.list_audit(0, 10).await.expect("list");
    let mut prev = crate::GENESIS_HASH.to_vec();
    for row in &rows {
        assert_eq!(row.prev_hash, prev);
        assert_eq!(row.hash, row.expected_hash(&prev).to_vec());
        prev = row.hash.clone();
    }
}

#[tokio::test]
async fn pruning_keeps_the_newest_signals_and_moves_the_floor() {
    let (_dir, store) = store().await;
    let agent = enroll(&store, &[]).await;
    for i in 0..5 {
        command(&store, agent, 10, T0 + i * 1000).await;
    }
    // Keep the newest 3: signals 1 and 2 go, the floor becomes 2.
    let moved = store.prune_signals(T0 - 1, 3).await.expect("prune");
    assert_eq!(moved, vec![(agent, 2)]);
    let left: Vec<u64> = store.read_signals(agent, 0, 100).await.expect("read").iter().map(|(s, _)| *s).collect();
    assert_eq!(left, [3, 4, 5]);
    // By age: everything older than T0 + 3.5 s goes (seq 4 has ts T0 + 3 s).
    let moved = store.prune_signals(T0 + 3_500, 10_000).await.expect("prune");
    assert_eq!(moved, vec![(agent, 4)]);
    // Nothing more to do: no floors move.
    assert!(store.prune_signals(T0 + 3_500, 10_000).await.expect("prune").is_empty());
    assert_eq!(store.get_agent(agent).await.expect("get").expect("agent").floor_seq, 4);
}

fn grant(user_code: &str, device_code_hash: [u8; 32], now: i64) -> NewDeviceGrant {
    NewDeviceGrant {
        device_code_hash,
        user_code: user_code.into(),
        public_key: vec![7; 32],
        hostname: "printer-1".into(),
        expires_at: now + 600_000,
        interval_s: 5,
        requested_ip: Some("192.0.2.7".into()),
        max_pending: 10_000,
        max_pending_per_ip: 100,
        now,
    }
}

/// Creates and approves a grant, then redeems it with the first poll; returns
/// (device code hash, agent id, the refresh token hash issued).
async fn redeemed_grant(store: &SqliteStore) -> ([u8; 32], AgentId, [u8; 32]) {
    let code = rand_hash();
    assert_eq!(store.create_device_grant(grant("BCDFGHJK", code, T0)).await.expect("create"), NewGrantOutcome::Created);
    store
        .decide_device_grant("BCDFGHJK", true, &Labels::new(), "alice", T0 + 1_000, &|_| audit_entry("device.approve"))
        .await
        .expect("approve");
    let issued = rand_hash();
    let DevicePoll::Approved(first) = store
        .poll_device_grant(code, AgentId::new(), issued, 30_000, T0 + 2_000, &|_| audit_entry("agent.enroll"))
        .await
        .expect("poll")
    else {
        panic!("an approved grant is redeemed by its first poll");
    };
    assert_eq!((first.approved_by.as_str(), first.user_code.as_str()), ("alice", "BCDFGHJK"));
    assert!(!first.lost_response_retry);
    (code, first.agent.id, issued)
}

#[tokio::test]
async fn a_repeated_redeeming_poll_within_the_grace_reissues_for_the_same_agent() {
    let (_dir, store) = store().await;
    let (code, agent, issued) = redeemed_grant(&store).await;

    // The answer was lost: the same device code 30 s later gets a new token for the same agent.
    let again = rand_hash();
    let DevicePoll::Approved(retry) = store
        .poll_device_grant(code, AgentId::new(), again, 30_000, T0 + 32_000, &|_| audit_entry("agent.enroll"))
        .await
        .expect("retry")
    else {
        panic!("a retry within the grace is answered");
    };
    assert_eq!((retry.agent.id, retry.lost_response_retry, retry.approved_by.as_str()), (agent, true, "alice"));
    assert_eq!(
        store.list_agents(&crate::AgentFilter { limit: 10, ..Default::default() }).await.expect("list").len(),
        1,
        "no second agent"
    );
    // The new token works.
    let live =
        store.rotate_refresh_token(None, again, rand_hash(), 30_000, T0 + 33_000, reuse_audit()).await.expect("rotate");
    assert_eq!(live, RefreshOutcome::Rotated { agent_id: agent, lost_response_retry: false });
    // Its token has been used now: a further repeat, even inside the grace, is refused.
    let used = store
        .poll_device_grant(code, AgentId::new(), rand_hash(), 30_000, T0 + 34_000, &|_| audit_entry("agent.enroll"))
        .await
        .expect("poll");
    assert!(matches!(used, DevicePoll::Invalid), "{used:?}");
    // The token of the lost answer was revoked; presenting it is reuse.
    let dead = store
        .rotate_refresh_token(None, issued, rand_hash(), 30_000, T0 + 35_000, reuse_audit())
        .await
        .expect("rotate");
    assert!(matches!(dead, RefreshOutcome::ReuseDetected { .. }), "{dead:?}");
}

#[tokio::test]
async fn a_repeated_redeeming_poll_after_the_grace_is_invalid() {
    let (_dir, store) = store().await;
    let (code, _agent, issued) = redeemed_grant(&store).await;
    let late = store
        .poll_device_grant(code, AgentId::new(), rand_hash(), 30_000, T0 + 32_001, &|_| audit_entry("agent.enroll"))
        .await
        .expect("poll");
    assert!(matches!(late, DevicePoll::Invalid), "{late:?}");
    // Nothing was revoked by the refused repeat.
    let live = store
        .rotate_refresh_token(None, issued, rand_hash(), 30_000, T0 + 33_000, reuse_audit())
        .await
        .expect("rotate");
    assert!(matches!(live, RefreshOutcome::Rotated { lost_response_retry: false, .. }), "{live:?}");
}

#[tokio::test]
async fn one_address_fills_only_its_own_share_of_pending_grants() {
    let (_dir, store) = store().await;
    let from = |code: &str, ip: &str| NewDeviceGrant {
        max_pending_per_ip: 2,
        requested_ip: Some(ip.into()),
        ..grant(code, rand_hash(), T0)
    };
    assert_eq!(store.create_device_grant(from("BCDFGHJK", "192.0.2.1")).await.expect("1"), NewGrantOutcome::Created);
    assert_eq!(store.create_device_grant(from("BCDFGHJL", "192.0.2.1")).await.expect("2"), NewGrantOutcome::Created);
    assert_eq!(
        store.create_device_grant(from("BCDFGHJM", "192.0.2.1")).await.expect("3"),
        NewGrantOutcome::TooManyFromAddress
    );
    assert_eq!(store.create_device_grant(from("BCDFGHJM", "192.0.2.2")).await.expect("4"), NewGrantOutcome::Created);
}

#[tokio::test]
async fn pending_grants_are_capped_and_pruned_after_they_expire() {
    let (_dir, store) = store().await;
    let capped = |code: &str, now| NewDeviceGrant { max_pending: 2, ..grant(code, rand_hash(), now) };
    assert_eq!(store.create_device_grant(capped("BCDFGHJK", T0)).await.expect("1"), NewGrantOutcome::Created);
    assert_eq!(store.create_device_grant(capped("BCDFGHJL", T0)).await.expect("2"), NewGrantOutcome::Created);
    assert_eq!(store.create_device_grant(capped("BCDFGHJM", T0)).await.expect("3"), NewGrantOutcome::TooManyPending);
    // A decided grant no longer counts as pending.
    store
        .decide_device_grant("BCDFGHJK", false, &Labels::new(), "alice", T0, &|_| audit_entry("device.approve"))
        .await
        .expect("deny");
    assert_eq!(store.create_device_grant(capped("BCDFGHJM", T0)).await.expect("4"), NewGrantOutcome::Created);
    // Nor does an expired one, before retention has deleted it.
    let later = T0 + 600_000;
    assert_eq!(store.create_device_grant(capped("BCDFGHJN", later)).await.expect("5"), NewGrantOutcome::Created);

    let info = store.pending_device_grant("BCDFGHJN", later).await.expect("lookup").expect("pending");
    assert_eq!(
        (info.hostname.as_str(), info.requested_ip.as_deref(), info.requested_at, info.public_key),
        ("printer-1", Some("192.0.2.7"), later, vec![7; 32])
    );
    assert_eq!(store.pending_device_grant("BCDFGHJK", later).await.expect("lookup"), None, "denied");
    assert_eq!(store.pending_device_grant("BCDFGHJL", later).await.expect("lookup"), None, "expired");

    assert_eq!(store.prune_device_grants(later).await.expect("prune"), 0, "expired at `later`, not before it");
    assert_eq!(store.prune_device_grants(later + 1).await.expect("prune"), 3);
    assert!(store.pending_device_grant("BCDFGHJN", later).await.expect("lookup").is_some(), "still live");
}

/// Issue 10: a float that does not survive a parse/print round trip byte for
/// byte must not break the chain, since the hash covers the stored text.
#[tokio::test]
async fn a_float_in_details_does_not_break_the_chain() {
    let (_dir, store) = store().await;
    let details: serde_json::Value = serde_json::from_str(r#"{"v":9.7084255809572990e79}"#).expect("json");
    store.append_audit(crate::AuditEntry { details, ..audit_entry("agent.x") }).await.expect("append");
    store.append_audit(audit_entry("after")).await.expect("append");
    let v = crate::verify_audit(&store).await.expect("verify");
    assert_eq!((v.checked, v.broken_count), (2, 0), "{v:?}");
}

#[tokio::test]
async fn verification_reports_every_altered_or_removed_row() {
    let (_dir, store) = store().await;
    for i in 0..6 {
        store
            .append_audit(crate::AuditEntry { details: serde_json::json!({"i": i}), ..audit_entry("a") })
            .await
            .expect("append");
    }
    sqlx::query("UPDATE audit SET outcome = 'denied' WHERE id = 2").execute(&store.writer).await.expect("tamper");
    sqlx::query("DELETE FROM audit WHERE id = 4").execute(&store.writer).await.expect("tamper");
    let v = crate::verify_audit(&store).await.expect("verify");
    let ids: Vec<i64> = v.broken.iter().map(|b| b.id).collect();
    assert_eq!((ids, v.broken_count, v.checked), (vec![2, 5], 2, 5), "{v:?}");
    assert!(v.broken[0].problem.contains("altered") && v.broken[1].problem.contains("removed"), "{v:?}");
}

/// The audit row is part of the mutation's transaction: when appending it
/// fails, the mutation is rolled back (a 2xx means both are committed).
#[tokio::test]
async fn a_failed_audit_append_rolls_the_mutation_back() {
    let (_dir, store) = store().await;
    let token = NewEnrollToken {
        id: "t".into(),
        token_hash: rand_hash(),
        labels: Labels::new(),
        uses: 1,
        created_by: "admin".into(),
        expires_at: T0 + 1000,
    };
    store.create_enroll_token(token, T0, audit_entry("enroll_token.create")).await.expect("token");
    sqlx::query("CREATE TRIGGER audit_full BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'audit unavailable'); END")
        .execute(&store.writer)
        .await
        .expect("trigger");
    let failed = store.revoke_enroll_token("t", T0 + 1, audit_entry("enroll_token.revoke")).await;
    assert!(matches!(failed, Err(StoreError::Backend(_))), "{failed:?}");
    let tokens = store.list_enroll_tokens().await.expect("list");
    assert_eq!(tokens[0].revoked_at, None, "the revocation was rolled back with its audit row");
    let user = store.create_user("u", "hash", crate::Role::Viewer, T0, Some(audit_entry("user.create"))).await;
    assert!(user.is_err());
    assert!(store.find_user("u").await.expect("find").is_none(), "no user without its audit row");
}

/// Makes every later audit insert fail, as a full or broken audit table would.
async fn break_audit(store: &SqliteStore) {
    sqlx::query("CREATE TRIGGER audit_full BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'audit unavailable'); END")
        .execute(&store.writer)
        .await
        .expect("trigger");
}

#[tokio::test]
async fn a_failed_audit_append_rolls_back_commands_and_device_decisions() {
    let (_dir, store) = store().await;
    let agent = enroll(&store, &[]).await;
    let queued = command(&store, agent, 60, T0).await;
    let code = rand_hash();
    assert_eq!(store.create_device_grant(grant("BCDFGHJK", code, T0)).await.expect("grant"), NewGrantOutcome::Created);
    let audit_rows = store.list_audit(0, 1000).await.expect("audit").len();
    break_audit(&store).await;

    let req = CreateCommand::new(Target::agents([agent]), "ping");
    let batch = NewBatch {
        id: BatchId::new(),
        target: TargetSpec::Agents(vec![agent]),
        request: req,
        created_by: "admin".into(),
        request_hash: rand_hash(),
        now: T0,
    };
    let batch_id = batch.id;
    let created = store.create_batch(batch, &|_| audit_entry("command.create")).await;
    assert!(matches!(created, Err(StoreError::Backend(_))), "{created:?}");
    assert!(store.get_batch(batch_id).await.expect("get").is_none(), "no batch without its audit row");
    let filter = crate::CommandFilter { agent_id: Some(agent), limit: 100, ..Default::default() };
    assert_eq!(store.list_commands(&filter).await.expect("list").len(), 1, "no command without its audit row");
    assert_eq!(store.read_signals(agent, 0, 100).await.expect("signals").len(), 1, "nor its stream signal");

    let cancelled = store.cancel_command(queued, T0 + 1, audit_entry("command.cancel")).await;
    assert!(matches!(cancelled, Err(StoreError::Backend(_))), "{cancelled:?}");
    let cmd = store.get_command(queued).await.expect("get").expect("command");
    assert_eq!(cmd.status, CommandStatus::Queued, "the cancellation was rolled back with its audit row");

    let approve = |_: &crate::DeviceGrantInfo| audit_entry("device.approve");
    let approved = store.decide_device_grant("BCDFGHJK", true, &Labels::new(), "alice", T0 + 1, &approve).await;
    assert!(matches!(approved, Err(StoreError::Backend(_))), "{approved:?}");
    assert!(
        store.pending_device_grant("BCDFGHJK", T0 + 2).await.expect("pending").is_some(),
        "the approval was rolled back with its audit row"
    );
    let redeem = |_: &crate::DeviceRedeemed| audit_entry("agent.enroll");
    let polled = store.poll_device_grant(code, AgentId::new(), rand_hash(), 30_000, T0 + 10_000, &redeem).await;
    let polled = polled.expect("poll");
    assert!(matches!(polled, DevicePoll::Pending), "nothing was approved, so nothing is redeemed: {polled:?}");
    assert_eq!(store.list_audit(0, 1000).await.expect("audit").len(), audit_rows);
}

#[tokio::test]
async fn a_new_password_ends_the_users_password_sessions_but_not_tokens_made_by_tokens() {
    let (_dir, store) = store().await;
    let user = store.create_user("u", "old", crate::Role::Admin, T0, None).await.expect("user");
    let (login, personal) = (rand_hash(), rand_hash());
    store.create_api_token(&user.id, "cli@host", login, None, true, T0, None).await.expect("login token");
    store.create_api_token(&user.id, "ci", personal, None, false, T0, None).await.expect("personal token");
    let cookie = rand_hash();
    store.create_session(cookie, &user.id, "csrf", T0 + 1000, T0, audit_entry("login.ok")).await.expect("session");
    store.set_password("u", "new", T0 + 1, audit_entry("user.reset_password")).await.expect("reset");
    assert!(store.find_api_token(login, T0 + 2).await.expect("find").is_none(), "the login token ended");
    assert!(store.find_session(cookie, T0 + 2).await.expect("find").is_none(), "the dashboard session ended");
    assert!(store.find_api_token(personal, T0 + 2).await.expect("find").is_some(), "a token made by a token stays");
    // The same through an update of the user.
    let again = rand_hash();
    store.create_api_token(&user.id, "cli@host", again, None, true, T0, None).await.expect("login token");
    store.update_user(&user.id, None, Some("newer"), T0 + 3, audit_entry("user.update")).await.expect("update");
    assert!(store.find_api_token(again, T0 + 4).await.expect("find").is_none());
    // A role change alone ends nothing.
    let third = rand_hash();
    store.create_api_token(&user.id, "cli@host", third, None, true, T0, None).await.expect("login token");
    store
        .update_user(&user.id, Some(crate::Role::Operator), None, T0 + 5, audit_entry("user.update"))
        .await
        .expect("update");
    assert!(store.find_api_token(third, T0 + 6).await.expect("find").is_some());
}
