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
    store.enroll_agent(token_hash, agent, rand_hash(), T0).await.expect("enroll").id
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
    store.create_batch(batch).await.expect("create").command_ids[0]
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
    store.create_enroll_token(token, T0).await.expect("token");
    let agent = || NewAgent {
        id: AgentId::new(),
        hostname: "h".into(),
        labels: Labels::new(),
        facts: serde_json::Value::Null,
        public_key: vec![1; 32],
    };
    store.enroll_agent(token_hash, agent(), rand_hash(), T0).await.expect("first use");
    let second = store.enroll_agent(token_hash, agent(), rand_hash(), T0).await;
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
    let late = store.report_result(agent, delivered, &ResultReport::new(CommandStatus::Succeeded), T0 + 200_000).await;
    assert!(matches!(late, Ok(ResultOutcome::Recorded { late: true, .. })), "{late:?}");
}

#[tokio::test]
async fn refresh_rotation_grace_and_family_revocation() {
    let (_dir, store) = store().await;
    let token_hash = rand_hash();
    store
        .create_enroll_token(
            NewEnrollToken {
                id: "t".into(),
                token_hash,
                labels: Labels::new(),
                uses: 1,
                created_by: "a".into(),
                expires_at: T0 + 1000,
            },
            T0,
        )
        .await
        .expect("token");
    let first = rand_hash();
    let agent = NewAgent {
        id: AgentId::new(),
        hostname: "h".into(),
        labels: Labels::new(),
        facts: serde_json::Value::Null,
        public_key: vec![1; 32],
    };
    let id = store.enroll_agent(token_hash, agent, first, T0).await.expect("enroll").id;
    let second = rand_hash();
    let rotated = store.rotate_refresh_token(Some(id), first, second, 30_000, T0).await.expect("rotate");
    assert_eq!(rotated, RefreshOutcome::Rotated { agent_id: id, lost_response_retry: false });
    // The response was lost: the same token again within 30 s gets a fresh pair.
    let third = rand_hash();
    let retried = store.rotate_refresh_token(Some(id), first, third, 30_000, T0 + 5_000).await.expect("retry");
    assert_eq!(retried, RefreshOutcome::Rotated { agent_id: id, lost_response_retry: true });
    // The abandoned successor is dead.
    let dead = store.rotate_refresh_token(Some(id), second, rand_hash(), 30_000, T0 + 6_000).await.expect("dead");
    assert_eq!(dead, RefreshOutcome::Invalid);
    // Use the live one, then replay the original outside the grace: theft.
    let fourth = rand_hash();
    store.rotate_refresh_token(Some(id), third, fourth, 30_000, T0 + 7_000).await.expect("rotate");
    let replay = store.rotate_refresh_token(Some(id), first, rand_hash(), 30_000, T0 + 60_000).await.expect("replay");
    assert!(matches!(replay, RefreshOutcome::ReuseDetected { .. }), "{replay:?}");
    // The whole family is revoked, including the live token.
    let after = store.rotate_refresh_token(Some(id), fourth, rand_hash(), 30_000, T0 + 61_000).await.expect("after");
    assert_eq!(after, RefreshOutcome::Invalid);
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
    let created = store.create_batch(batch).await.expect("create");
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
    store.decide_device_grant("BCDFGHJK", true, &Labels::new(), "alice", T0 + 1_000).await.expect("approve");
    let issued = rand_hash();
    let DevicePoll::Approved(first) =
        store.poll_device_grant(code, AgentId::new(), issued, 30_000, T0 + 2_000).await.expect("poll")
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
    let DevicePoll::Approved(retry) =
        store.poll_device_grant(code, AgentId::new(), again, 30_000, T0 + 32_000).await.expect("retry")
    else {
        panic!("a retry within the grace is answered");
    };
    assert_eq!((retry.agent.id, retry.lost_response_retry, retry.approved_by.as_str()), (agent, true, "alice"));
    assert_eq!(
        store.list_agents(&crate::AgentFilter { limit: 10, ..Default::default() }).await.expect("list").len(),
        1,
        "no second agent"
    );
    // The token of the lost answer is dead; the new one works.
    let dead = store.rotate_refresh_token(None, issued, rand_hash(), 30_000, T0 + 33_000).await.expect("rotate");
    assert_eq!(dead, RefreshOutcome::Invalid);
    let live = store.rotate_refresh_token(None, again, rand_hash(), 30_000, T0 + 33_000).await.expect("rotate");
    assert_eq!(live, RefreshOutcome::Rotated { agent_id: agent, lost_response_retry: false });
    // Its token has been used now: a further repeat, even inside the grace, is refused.
    let used = store.poll_device_grant(code, AgentId::new(), rand_hash(), 30_000, T0 + 34_000).await.expect("poll");
    assert!(matches!(used, DevicePoll::Invalid), "{used:?}");
}

#[tokio::test]
async fn a_repeated_redeeming_poll_after_the_grace_is_invalid() {
    let (_dir, store) = store().await;
    let (code, _agent, issued) = redeemed_grant(&store).await;
    let late = store.poll_device_grant(code, AgentId::new(), rand_hash(), 30_000, T0 + 32_001).await.expect("poll");
    assert!(matches!(late, DevicePoll::Invalid), "{late:?}");
    // Nothing was revoked by the refused repeat.
    let live = store.rotate_refresh_token(None, issued, rand_hash(), 30_000, T0 + 33_000).await.expect("rotate");
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
    store.decide_device_grant("BCDFGHJK", false, &Labels::new(), "alice", T0).await.expect("deny");
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
