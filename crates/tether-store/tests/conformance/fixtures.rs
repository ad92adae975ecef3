//! Values the conformance tests build their cases from.

use tether_proto::command::{CreateCommand, Target, TargetSpec};
use tether_proto::{AgentId, BatchId, CommandId, Labels};
use tether_store::{AuditEntry, NewAgent, NewBatch, NewDeviceGrant, NewEnrollToken, RefreshOutcome, Store};

/// A fixed "now": tests pass time explicitly, never read a clock.
pub const T0: i64 = 1_800_000_000_000;

pub fn rand_hash() -> [u8; 32] {
    *uuid::Uuid::now_v7().as_bytes().repeat(2).first_chunk().expect("32 bytes")
}

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

pub fn audit_entry(action: &str) -> AuditEntry {
    AuditEntry {
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

pub fn reuse_audit() -> AuditEntry {
    AuditEntry {
        actor: "anonymous".into(),
        actor_kind: "agent",
        outcome: "family_revoked",
        ..audit_entry("token.refresh_reuse")
    }
}

pub fn enroll_token(token_hash: [u8; 32], labels: Labels, uses: u32) -> NewEnrollToken {
    NewEnrollToken {
        id: uuid::Uuid::now_v7().to_string(),
        token_hash,
        labels,
        uses,
        created_by: "admin".into(),
        expires_at: T0 + 3_600_000,
    }
}

pub fn new_agent() -> NewAgent {
    NewAgent {
        id: AgentId::new(),
        hostname: "host".into(),
        labels: Labels::new(),
        facts: serde_json::json!({}),
        public_key: vec![1; 32],
    }
}

/// A new agent carrying `labels`, enrolled with the refresh token `refresh`.
pub async fn enroll_with(store: &dyn Store, labels: &[(&str, &str)], refresh: [u8; 32]) -> AgentId {
    let token_hash = rand_hash();
    store
        .create_enroll_token(enroll_token(token_hash, self::labels(labels), 1), T0, audit_entry("enroll_token.create"))
        .await
        .expect("token");
    store.enroll_agent(token_hash, new_agent(), refresh, T0, &|_| audit_entry("agent.enroll")).await.expect("enroll").id
}

pub async fn enroll(store: &dyn Store, labels: &[(&str, &str)]) -> AgentId {
    enroll_with(store, labels, rand_hash()).await
}

pub fn batch(target: TargetSpec, now: i64) -> NewBatch {
    let wire = match &target {
        TargetSpec::Agents(ids) => Target::agents(ids.clone()),
        TargetSpec::Labels(l) => Target::labels(l.clone()),
        TargetSpec::All => Target { all: Some(true), ..Target::default() },
    };
    NewBatch {
        id: BatchId::new(),
        target,
        request: CreateCommand::new(wire, "ping"),
        created_by: "admin".into(),
        request_hash: rand_hash(),
        now,
    }
}

/// One command for `agent`, created at `now`.
pub async fn command(store: &dyn Store, agent: AgentId, timeout_s: u32, now: i64) -> CommandId {
    let mut b = batch(TargetSpec::Agents(vec![agent]), now);
    b.request.timeout_s = timeout_s;
    store.create_batch(b, &|_| audit_entry("command.create")).await.expect("create").command_ids[0]
}

pub async fn rotate(store: &dyn Store, id: AgentId, presented: [u8; 32], new: [u8; 32], now: i64) -> RefreshOutcome {
    store.rotate_refresh_token(Some(id), presented, new, 30_000, now, reuse_audit()).await.expect("rotate")
}

pub fn grant(user_code: &str, device_code_hash: [u8; 32], now: i64) -> NewDeviceGrant {
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
