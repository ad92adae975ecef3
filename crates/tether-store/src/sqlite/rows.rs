//! Row ↔ type conversions for the SQLite backend.

use std::str::FromStr;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use tether_proto::command::{Command, CommandStatus};
use time::OffsetDateTime;

use crate::{AgentRecord, AuditRecord, EnrollTokenRecord, Millis, Result, Role, StoreError, User, UserRecord};

pub const COMMAND_COLUMNS: &str = "id, batch_id, agent_id, name, args, timeout_s, priority, created_by, status, \
     exit_code, stdout, stderr, output, truncated, reason, created_at, not_before, delivered_at, started_at, \
     finished_at, expires_at";

pub const AGENT_COLUMNS: &str = "id, name, hostname, labels, facts, public_key, version, applied_config_hash, \
     epoch, head_seq, floor_seq, created_at, last_seen, revoked_at, revoke_reason, tokens_valid_after";

pub fn to_millis(t: OffsetDateTime) -> Millis {
    (t.unix_timestamp_nanos() / 1_000_000) as Millis
}

pub fn from_millis(ms: Millis) -> Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .map_err(|e| StoreError::Corrupt(format!("timestamp {ms}: {e}")))
}

fn opt_time(ms: Option<Millis>) -> Result<Option<OffsetDateTime>> {
    ms.map(from_millis).transpose()
}

pub fn json_text<T: Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).expect("plain data serializes")
}

pub fn parse_json<T: DeserializeOwned>(text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("json: {e}")))
}

pub fn parse_id<T: FromStr>(text: &str) -> Result<T> {
    text.parse().map_err(|_| StoreError::Corrupt(format!("id {text:?}")))
}

pub fn command_from_row(r: &SqliteRow) -> Result<Command> {
    Ok(Command {
        id: parse_id(r.get(0))?,
        batch_id: parse_id(r.get(1))?,
        agent_id: parse_id(r.get(2))?,
        name: r.get(3),
        args: parse_json(r.get(4))?,
        timeout_s: r.get::<i64, _>(5) as u32,
        priority: r.get::<i64, _>(6) as u8,
        created_by: r.get(7),
        status: CommandStatus::from_str(r.get(8)).map_err(StoreError::Corrupt)?,
        exit_code: r.get(9),
        stdout: r.get(10),
        stderr: r.get(11),
        output: parse_json(r.get(12))?,
        truncated: r.get(13),
        reason: r.get(14),
        created_at: from_millis(r.get(15))?,
        not_before: opt_time(r.get(16))?,
        delivered_at: opt_time(r.get(17))?,
        started_at: opt_time(r.get(18))?,
        finished_at: opt_time(r.get(19))?,
        expires_at: from_millis(r.get(20))?,
    })
}

pub fn agent_from_row(r: &SqliteRow) -> Result<AgentRecord> {
    Ok(AgentRecord {
        id: parse_id(r.get(0))?,
        name: r.get(1),
        hostname: r.get(2),
        labels: parse_json(r.get(3))?,
        facts: parse_json(r.get(4))?,
        public_key: r.get(5),
        version: r.get(6),
        applied_config_hash: r.get(7),
        epoch: r.get::<i64, _>(8) as u64,
        head_seq: r.get::<i64, _>(9) as u64,
        floor_seq: r.get::<i64, _>(10) as u64,
        created_at: r.get(11),
        last_seen: r.get(12),
        revoked_at: r.get(13),
        revoke_reason: r.get(14),
        tokens_valid_after: r.get(15),
    })
}

pub fn user_from_row(r: &SqliteRow) -> Result<User> {
    let role: &str = r.get(2);
    Ok(User {
        id: r.get(0),
        username: r.get(1),
        role: Role::parse(role).ok_or_else(|| StoreError::Corrupt(format!("role {role:?}")))?,
        password_hash: r.get(3),
    })
}

pub fn enroll_token_from_row(r: &SqliteRow) -> Result<EnrollTokenRecord> {
    Ok(EnrollTokenRecord {
        id: r.get(0),
        labels: parse_json(r.get(1))?,
        uses: r.get::<i64, _>(2) as u32,
        used: r.get::<i64, _>(3) as u32,
        created_at: r.get(4),
        expires_at: r.get(5),
        revoked_at: r.get(6),
    })
}

pub fn audit_from_row(r: &SqliteRow) -> Result<AuditRecord> {
    let details_text: String = r.get(9);
    // A row whose details are not JSON any more was altered; it is still
    // read (as a string) so that verification can report it.
    let details =
        serde_json::from_str(&details_text).unwrap_or_else(|_| serde_json::Value::String(details_text.clone()));
    Ok(AuditRecord {
        id: r.get(0),
        ts: r.get(1),
        actor: r.get(2),
        actor_kind: r.get(3),
        action: r.get(4),
        target: r.get(5),
        outcome: r.get(6),
        ip: r.get(7),
        request_id: r.get(8),
        details,
        details_text,
        prev_hash: r.get(10),
        hash: r.get(11),
    })
}

pub fn user_record_from_row(r: &SqliteRow) -> Result<UserRecord> {
    let role: &str = r.get(2);
    Ok(UserRecord {
        id: r.get(0),
        username: r.get(1),
        role: Role::parse(role).ok_or_else(|| StoreError::Corrupt(format!("role {role:?}")))?,
        created_at: r.get(3),
        disabled_at: r.get(4),
    })
}
