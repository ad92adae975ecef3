//! The embedded SQLite backend: WAL, `synchronous=FULL`, one writer
//! connection (every write is `BEGIN IMMEDIATE`) and a small reader pool.

mod rows;

use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, Sqlite, Transaction};
use tether_proto::command::{
    Batch, BatchStatus, Command, CommandStatus, DEFAULT_EXPIRY_S, Event, LOST_GRACE_S, ResultReport, TargetSpec,
};
use tether_proto::signal::{self, CommandCancelled, CommandQueued};
use tether_proto::{AgentId, BatchId, CommandId, Signal};

use crate::audit::{AuditEntry, AuditRecord, GENESIS_HASH};
use crate::refresh::{self, PresentedToken, RefreshDecision, Successor};
use crate::{
    AgentFilter, AgentRecord, ApiTokenRecord, AuditFilter, AuditFor, CancelOutcome, CommandFilter, CreatedBatch,
    DeviceGrantInfo, DevicePoll, DeviceRedeemed, EnrollTokenRecord, Head, Millis, NewAgent, NewBatch, NewDeviceGrant,
    NewEnrollToken, NewGrantOutcome, RefreshOutcome, Result, ResultAudit, ResultOutcome, Role, Store, StoreError,
    StoreStats, SweepOutcome, User, UserRecord,
};
use rows::{AGENT_COLUMNS, COMMAND_COLUMNS, agent_from_row, command_from_row, json_text};

/// A query whose text is built from the column-list constants (never from input).
macro_rules! q {
    ($($fmt:tt)*) => {
        sqlx::query(sqlx::AssertSqlSafe(format!($($fmt)*)))
    };
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

#[derive(Debug)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    queries: AtomicU64,
}

impl SqliteStore {
    /// Opens (creating if needed) `tether.db` in `dir` and applies migrations.
    pub async fn open(dir: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(dir.join("tether.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let writer =
            SqlitePoolOptions::new().max_connections(1).min_connections(1).connect_with(options.clone()).await?;
        MIGRATOR.run(&writer).await?;
        let reader = SqlitePoolOptions::new().max_connections(4).connect_with(options.read_only(true)).await?;
        Ok(Self { writer, reader, queries: AtomicU64::new(0) })
    }

    fn count(&self) {
        self.queries.fetch_add(1, Ordering::Relaxed);
    }

    async fn begin(&self) -> Result<Transaction<'static, Sqlite>> {
        self.count();
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }
}

fn uuid_text<T: std::fmt::Display>(id: T) -> String {
    id.to_string()
}

fn result_hash(r: &ResultReport) -> Vec<u8> {
    let canonical = serde_json::json!([r.status, r.exit_code, r.stdout, r.stderr, r.output, r.truncated, r.reason]);
    Sha256::digest(canonical.to_string().as_bytes()).to_vec()
}

/// Appends one signal to an agent's stream inside `tx`.
async fn append_signal(
    tx: &mut Transaction<'static, Sqlite>,
    agent_id: AgentId,
    kind: &str,
    reference: &serde_json::Value,
    now: Millis,
) -> Result<Head> {
    let row = sqlx::query("UPDATE agents SET head_seq = head_seq + 1 WHERE id = ? RETURNING head_seq, epoch")
        .bind(uuid_text(agent_id))
        .fetch_one(&mut **tx)
        .await?;
    let seq: i64 = row.get(0);
    let epoch: i64 = row.get(1);
    sqlx::query("INSERT INTO signals (agent_id, seq, kind, ts_ms, ref) VALUES (?, ?, ?, ?, ?)")
        .bind(uuid_text(agent_id))
        .bind(seq)
        .bind(kind)
        .bind(now)
        .bind(reference.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(Head { agent_id, epoch: epoch as u64, seq: seq as u64 })
}

/// Appends `entry` to the audit chain inside `tx`, the transaction of the
/// mutation it describes: both commit or neither does. The chain head is
/// read inside the same `BEGIN IMMEDIATE` transaction, so appends are
/// serialised by SQLite's single writer. The hash covers `details` as the
/// exact text stored.
async fn insert_audit(tx: &mut Transaction<'static, Sqlite>, entry: &AuditEntry) -> Result<()> {
    let prev: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT hash FROM audit ORDER BY id DESC LIMIT 1").fetch_optional(&mut **tx).await?;
    let prev = prev.unwrap_or_else(|| GENESIS_HASH.to_vec());
    let details = entry.details_text();
    let hash = entry.hash_after(&prev, &details);
    sqlx::query(
        "INSERT INTO audit (ts, actor, actor_kind, action, target, outcome, ip, request_id, details, prev_hash, hash)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(entry.ts)
    .bind(&entry.actor)
    .bind(entry.actor_kind)
    .bind(&entry.action)
    .bind(&entry.target)
    .bind(entry.outcome)
    .bind(&entry.ip)
    .bind(&entry.request_id)
    .bind(&details)
    .bind(&prev)
    .bind(&hash[..])
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// What counts as a user's session (docs/decisions.md): dashboard cookie
/// sessions and the API tokens created with the password (`tether login`
/// does that over HTTP Basic). Tokens created with another token stay.
async fn end_sessions(tx: &mut Transaction<'static, Sqlite>, user_id: &str, now: Millis) -> Result<()> {
    sqlx::query("DELETE FROM sessions WHERE user_id = ?").bind(user_id).execute(&mut **tx).await?;
    sqlx::query("UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE user_id = ? AND from_password = 1")
        .bind(now)
        .bind(user_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Inserts a new agent (labels already final) and the first refresh token of
/// a new family inside `tx`: the common half of both enrollment ways.
async fn insert_agent(
    tx: &mut Transaction<'static, Sqlite>,
    agent: NewAgent,
    refresh_hash: [u8; 32],
    now: Millis,
) -> Result<AgentRecord> {
    let epoch = (now / 1000) as u64;
    sqlx::query(
        "INSERT INTO agents (id, name, hostname, labels, facts, public_key, epoch, created_at, last_seen)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(uuid_text(agent.id))
    .bind(&agent.hostname)
    .bind(&agent.hostname)
    .bind(json_text(&agent.labels))
    .bind(agent.facts.to_string())
    .bind(&agent.public_key)
    .bind(epoch as i64)
    .bind(now)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    sqlx::query("INSERT INTO refresh_tokens (token_hash, family_id, agent_id, created_at) VALUES (?, ?, ?, ?)")
        .bind(&refresh_hash[..])
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(uuid_text(agent.id))
        .bind(now)
        .execute(&mut **tx)
        .await?;
    Ok(AgentRecord {
        id: agent.id,
        name: agent.hostname.clone(),
        hostname: agent.hostname,
        labels: agent.labels,
        facts: agent.facts,
        public_key: agent.public_key,
        version: None,
        applied_config_hash: None,
        epoch,
        head_seq: 0,
        floor_seq: 0,
        created_at: now,
        last_seen: Some(now),
        revoked_at: None,
        revoke_reason: None,
        tokens_valid_after: None,
    })
}

/// The operator's view of a device grant row selected with [`GRANT_INFO_COLUMNS`].
fn grant_info(row: &sqlx::sqlite::SqliteRow) -> Result<DeviceGrantInfo> {
    Ok(DeviceGrantInfo {
        user_code: row.get(0),
        hostname: row.get(1),
        requested_ip: row.get(2),
        requested_at: row.get(3),
        public_key: row.get(4),
        labels: rows::parse_json(row.get::<&str, _>(5))?,
    })
}

const GRANT_INFO_COLUMNS: &str = "user_code, hostname, requested_ip, created_at, public_key, labels";

fn queued_ref(c: &Command) -> serde_json::Value {
    serde_json::to_value(CommandQueued {
        command_id: c.id,
        name: c.name.clone(),
        args: c.args.clone(),
        timeout_s: c.timeout_s,
        priority: c.priority,
        expires_at_ms: Some(rows::to_millis(c.expires_at)),
    })
    .expect("command.queued ref serializes")
}

async fn load_command(tx: &mut Transaction<'static, Sqlite>, id: CommandId) -> Result<Option<Command>> {
    let row =
        q!("SELECT {COMMAND_COLUMNS} FROM commands WHERE id = ?").bind(uuid_text(id)).fetch_optional(&mut **tx).await?;
    row.map(|r| command_from_row(&r)).transpose()
}

/// Keeps only the last head per agent (later appends supersede earlier ones).
fn last_heads(heads: Vec<Head>) -> Vec<Head> {
    let mut out: Vec<Head> = Vec::with_capacity(heads.len());
    for h in heads {
        match out.iter_mut().find(|o| o.agent_id == h.agent_id) {
            Some(o) => *o = h,
            None => out.push(h),
        }
    }
    out
}

async fn cancel_in_tx(tx: &mut Transaction<'static, Sqlite>, cmd: &Command, now: Millis) -> Result<Option<Head>> {
    cmd.status.apply(Event::Cancel).map_err(|e| StoreError::Conflict(e.to_string()))?;
    sqlx::query("UPDATE commands SET status = 'cancelled', finished_at = ?, reason = COALESCE(reason, 'cancelled by operator') WHERE id = ?")
        .bind(now)
        .bind(uuid_text(cmd.id))
        .execute(&mut **tx)
        .await?;
    // Only an agent that may have seen the command needs to hear about it.
    let released: i64 = sqlx::query_scalar("SELECT released FROM commands WHERE id = ?")
        .bind(uuid_text(cmd.id))
        .fetch_one(&mut **tx)
        .await?;
    if released == 1 {
        let reference = serde_json::to_value(CommandCancelled { command_id: cmd.id }).expect("serializes");
        return Ok(Some(append_signal(tx, cmd.agent_id, signal::COMMAND_CANCELLED, &reference, now).await?));
    }
    Ok(None)
}

#[async_trait]
impl Store for SqliteStore {
    fn stats(&self) -> StoreStats {
        StoreStats { queries: self.queries.load(Ordering::Relaxed) }
    }

    async fn ping(&self) -> Result<()> {
        self.count();
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    async fn user_count(&self) -> Result<u64> {
        self.count();
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users").fetch_one(&self.reader).await?;
        Ok(n as u64)
    }

    async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
        role: Role,
        now: Millis,
        audit: Option<AuditEntry>,
    ) -> Result<User> {
        let mut tx = self.begin().await?;
        let id = uuid::Uuid::now_v7().to_string();
        let res =
            sqlx::query("INSERT INTO users (id, username, password_hash, role, created_at) VALUES (?, ?, ?, ?, ?)")
                .bind(&id)
                .bind(username)
                .bind(password_hash)
                .bind(role.as_str())
                .bind(now)
                .execute(&mut *tx)
                .await;
        match res {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Err(StoreError::Conflict(format!("user {username:?} exists")));
            }
            other => other?,
        };
        if let Some(audit) = audit {
            insert_audit(&mut tx, &AuditEntry { target: id.clone(), ..audit }).await?;
        }
        tx.commit().await?;
        Ok(User { id, username: username.to_owned(), role, password_hash: password_hash.to_owned() })
    }

    async fn set_password(&self, username: &str, password_hash: &str, now: Millis, audit: AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        let id: Option<String> =
            sqlx::query_scalar("UPDATE users SET password_hash = ? WHERE username = ? RETURNING id")
                .bind(password_hash)
                .bind(username)
                .fetch_optional(&mut *tx)
                .await?;
        let id = id.ok_or(StoreError::NotFound)?;
        end_sessions(&mut tx, &id, now).await?;
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_users(&self) -> Result<Vec<UserRecord>> {
        self.count();
        let rows = sqlx::query("SELECT id, username, role, created_at, disabled_at FROM users ORDER BY username")
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(rows::user_record_from_row).collect()
    }

    async fn update_user(
        &self,
        id: &str,
        role: Option<Role>,
        password_hash: Option<&str>,
        now: Millis,
        audit: AuditEntry,
    ) -> Result<UserRecord> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(
            "UPDATE users SET role = COALESCE(?, role), password_hash = COALESCE(?, password_hash)
             WHERE id = ? AND disabled_at IS NULL RETURNING id, username, role, created_at, disabled_at",
        )
        .bind(role.map(Role::as_str))
        .bind(password_hash)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound)?;
        if password_hash.is_some() {
            end_sessions(&mut tx, id, now).await?;
        }
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        rows::user_record_from_row(&row)
    }

    async fn disable_user(&self, id: &str, now: Millis, audit: AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query("UPDATE users SET disabled_at = ? WHERE id = ? AND disabled_at IS NULL")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        sqlx::query("UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE user_id = ?")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM sessions WHERE user_id = ?").bind(id).execute(&mut *tx).await?;
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn find_user(&self, username: &str) -> Result<Option<User>> {
        self.count();
        let row = sqlx::query(
            "SELECT id, username, role, password_hash FROM users WHERE username = ? AND disabled_at IS NULL",
        )
        .bind(username)
        .fetch_optional(&self.reader)
        .await?;
        row.map(|r| rows::user_from_row(&r)).transpose()
    }

    #[allow(clippy::too_many_arguments)]
    async fn create_api_token(
        &self,
        user_id: &str,
        name: &str,
        token_hash: [u8; 32],
        expires_at: Option<Millis>,
        from_password: bool,
        now: Millis,
        audit: Option<AuditEntry>,
    ) -> Result<String> {
        let mut tx = self.begin().await?;
        let id = uuid::Uuid::now_v7().to_string();
        sqlx::query(
            "INSERT INTO api_tokens (id, user_id, name, token_hash, created_at, expires_at, from_password)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(user_id)
        .bind(name)
        .bind(&token_hash[..])
        .bind(now)
        .bind(expires_at)
        .bind(from_password)
        .execute(&mut *tx)
        .await?;
        if let Some(audit) = audit {
            insert_audit(&mut tx, &AuditEntry { target: id.clone(), ..audit }).await?;
        }
        tx.commit().await?;
        Ok(id)
    }

    async fn list_api_tokens(&self, user_id: &str) -> Result<Vec<ApiTokenRecord>> {
        self.count();
        let rows = sqlx::query(
            "SELECT id, name, created_at, expires_at, revoked_at FROM api_tokens WHERE user_id = ? ORDER BY id DESC",
        )
        .bind(user_id)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows
            .iter()
            .map(|r| ApiTokenRecord {
                id: r.get(0),
                name: r.get(1),
                created_at: r.get(2),
                expires_at: r.get(3),
                revoked_at: r.get(4),
            })
            .collect())
    }

    async fn revoke_api_token(&self, user_id: &str, id: &str, now: Millis, audit: AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        let done =
            sqlx::query("UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ? AND user_id = ?")
                .bind(now)
                .bind(id)
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn create_session(
        &self,
        token_hash: [u8; 32],
        user_id: &str,
        csrf: &str,
        expires_at: Millis,
        now: Millis,
        audit: AuditEntry,
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM sessions WHERE expires_at <= ?").bind(now).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO sessions (token_hash, user_id, csrf, created_at, expires_at) VALUES (?, ?, ?, ?, ?)")
            .bind(&token_hash[..])
            .bind(user_id)
            .bind(csrf)
            .bind(now)
            .bind(expires_at)
            .execute(&mut *tx)
            .await?;
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn find_session(&self, token_hash: [u8; 32], now: Millis) -> Result<Option<(User, String)>> {
        self.count();
        let row = sqlx::query(
            "SELECT u.id, u.username, u.role, u.password_hash, s.csrf FROM sessions s JOIN users u ON u.id = s.user_id
             WHERE s.token_hash = ? AND s.expires_at > ? AND u.disabled_at IS NULL",
        )
        .bind(&token_hash[..])
        .bind(now)
        .fetch_optional(&self.reader)
        .await?;
        row.map(|r| Ok((rows::user_from_row(&r)?, r.get::<String, _>(4)))).transpose()
    }

    async fn delete_session(&self, token_hash: [u8; 32]) -> Result<()> {
        self.count();
        sqlx::query("DELETE FROM sessions WHERE token_hash = ?").bind(&token_hash[..]).execute(&self.writer).await?;
        Ok(())
    }

    async fn find_api_token(&self, token_hash: [u8; 32], now: Millis) -> Result<Option<(User, Option<Millis>)>> {
        self.count();
        let row = sqlx::query(
            "SELECT u.id, u.username, u.role, u.password_hash, t.expires_at FROM api_tokens t JOIN users u ON u.id = t.user_id
             WHERE t.token_hash = ? AND t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > ?)
               AND u.disabled_at IS NULL",
        )
        .bind(&token_hash[..])
        .bind(now)
        .fetch_optional(&self.reader)
        .await?;
        row.map(|r| Ok((rows::user_from_row(&r)?, r.get::<Option<Millis>, _>(4)))).transpose()
    }

    async fn create_enroll_token(&self, token: NewEnrollToken, now: Millis, audit: AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO enroll_tokens (id, token_hash, labels, uses, created_by, created_at, expires_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&token.id)
        .bind(&token.token_hash[..])
        .bind(json_text(&token.labels))
        .bind(token.uses)
        .bind(&token.created_by)
        .bind(now)
        .bind(token.expires_at)
        .execute(&mut *tx)
        .await?;
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_enroll_tokens(&self) -> Result<Vec<EnrollTokenRecord>> {
        self.count();
        let rows = sqlx::query(
            "SELECT id, labels, uses, used, created_at, expires_at, revoked_at FROM enroll_tokens ORDER BY id DESC",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(rows::enroll_token_from_row).collect()
    }

    async fn revoke_enroll_token(&self, id: &str, now: Millis, audit: AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query("UPDATE enroll_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn enroll_agent(
        &self,
        enroll_token_hash: [u8; 32],
        agent: NewAgent,
        refresh_hash: [u8; 32],
        now: Millis,
        audit: AuditFor<'_, AgentRecord>,
    ) -> Result<AgentRecord> {
        let mut tx = self.begin().await?;
        let token = sqlx::query(
            "UPDATE enroll_tokens SET used = used + 1
             WHERE token_hash = ? AND revoked_at IS NULL AND expires_at > ? AND used < uses
             RETURNING labels",
        )
        .bind(&enroll_token_hash[..])
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound)?;
        let token_labels: tether_proto::Labels = rows::parse_json(token.get::<String, _>(0).as_str())?;
        // Operator-chosen labels on the token win over what the agent asks for.
        let mut labels = agent.labels;
        labels.extend(token_labels);
        let rec = insert_agent(&mut tx, NewAgent { labels, ..agent }, refresh_hash, now).await?;
        insert_audit(&mut tx, &audit(&rec)).await?;
        tx.commit().await?;
        Ok(rec)
    }

    async fn get_agent(&self, id: AgentId) -> Result<Option<AgentRecord>> {
        self.count();
        let row = q!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = ?")
            .bind(uuid_text(id))
            .fetch_optional(&self.reader)
            .await?;
        row.map(|r| agent_from_row(&r)).transpose()
    }

    async fn list_agents(&self, filter: &AgentFilter) -> Result<Vec<AgentRecord>> {
        self.count();
        let like =
            filter.q.as_ref().map(|q| format!("%{}%", q.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")));
        let rows = q!("SELECT {AGENT_COLUMNS} FROM agents
             WHERE (? IS NULL OR id > ?)
               AND (? IS NULL OR name LIKE ? ESCAPE '\\' OR hostname LIKE ? ESCAPE '\\')
               AND NOT EXISTS (SELECT 1 FROM json_each(?) l WHERE json_extract(agents.labels, '$.\"' || l.key || '\"') IS NOT l.value)
             ORDER BY id LIMIT ?")
        .bind(filter.after.map(uuid_text))
        .bind(filter.after.map(uuid_text))
        .bind(&like)
        .bind(&like)
        .bind(&like)
        .bind(json_text(&filter.labels))
        .bind(filter.limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(agent_from_row).collect()
    }

    async fn revoke_agent(&self, id: AgentId, reason: &str, now: Millis, audit: AuditEntry) -> Result<AgentRecord> {
        let mut tx = self.begin().await?;
        let done = sqlx::query("UPDATE agents SET revoked_at = COALESCE(revoked_at, ?), revoke_reason = COALESCE(revoke_reason, ?) WHERE id = ?")
            .bind(now)
            .bind(reason)
            .bind(uuid_text(id))
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        sqlx::query("UPDATE refresh_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE agent_id = ?")
            .bind(now)
            .bind(uuid_text(id))
            .execute(&mut *tx)
            .await?;
        let row = q!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = ?").bind(uuid_text(id)).fetch_one(&mut *tx).await?;
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        agent_from_row(&row)
    }

    async fn record_heartbeat(
        &self,
        id: AgentId,
        version: Option<&str>,
        applied_config_hash: Option<&str>,
        body: &serde_json::Value,
        now: Millis,
    ) -> Result<()> {
        self.count();
        sqlx::query(
            "UPDATE agents SET version = COALESCE(?, version), applied_config_hash = COALESCE(?, applied_config_hash),
                    heartbeat = ?, last_seen = MAX(COALESCE(last_seen, 0), ?) WHERE id = ?",
        )
        .bind(version)
        .bind(applied_config_hash)
        .bind(body.to_string())
        .bind(now)
        .bind(uuid_text(id))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn touch_agents(&self, seen: &[(AgentId, Millis)]) -> Result<()> {
        if seen.is_empty() {
            return Ok(());
        }
        let pairs: Vec<(String, Millis)> = seen.iter().map(|(id, at)| (id.to_string(), *at)).collect();
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE agents SET last_seen = MAX(COALESCE(last_seen, 0), s.value ->> '$[1]')
             FROM json_each(?) s WHERE agents.id = s.value ->> '$[0]'",
        )
        .bind(json_text(&pairs))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn refresh_family(&self, presented_hash: [u8; 32]) -> Result<Option<String>> {
        self.count();
        Ok(sqlx::query_scalar("SELECT family_id FROM refresh_tokens WHERE token_hash = ?")
            .bind(&presented_hash[..])
            .fetch_optional(&self.reader)
            .await?)
    }

    async fn rotate_refresh_token(
        &self,
        expected_agent: Option<AgentId>,
        presented_hash: [u8; 32],
        new_hash: [u8; 32],
        grace_ms: Millis,
        now: Millis,
        reuse_audit: AuditEntry,
    ) -> Result<RefreshOutcome> {
        let mut tx = self.begin().await?;
        let Some(row) = sqlx::query(
            "SELECT t.family_id, t.used_at, t.successor_hash, t.revoked_at, a.revoked_at, t.agent_id, t.retried_at,
                    s.used_at IS NOT NULL, s.revoked_at IS NOT NULL, s.token_hash IS NOT NULL,
                    EXISTS (SELECT 1 FROM refresh_tokens f WHERE f.family_id = t.family_id AND f.revoked_at IS NULL)
             FROM refresh_tokens t JOIN agents a ON a.id = t.agent_id
             LEFT JOIN refresh_tokens s ON s.token_hash = t.successor_hash
             WHERE t.token_hash = ? AND (? IS NULL OR t.agent_id = ?)",
        )
        .bind(&presented_hash[..])
        .bind(expected_agent.map(uuid_text))
        .bind(expected_agent.map(uuid_text))
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(RefreshOutcome::Invalid);
        };
        let family_id: String = row.get(0);
        let successor_hash: Option<Vec<u8>> = row.get(2);
        let agent_id: AgentId = rows::parse_id(row.get(5))?;
        let presented = PresentedToken {
            agent_revoked: row.get::<Option<Millis>, _>(4).is_some(),
            revoked: row.get::<Option<Millis>, _>(3).is_some(),
            used_at: row.get(1),
            retried: row.get::<Option<Millis>, _>(6).is_some(),
            successor: row.get::<bool, _>(9).then(|| Successor { used: row.get(7), revoked: row.get(8) }),
            family_live: row.get(10),
        };
        let lost_response_retry = match refresh::decide(&presented, grace_ms, now) {
            RefreshDecision::AgentRevoked => return Ok(RefreshOutcome::AgentRevoked),
            RefreshDecision::Invalid => return Ok(RefreshOutcome::Invalid),
            RefreshDecision::Reuse => {
                sqlx::query("UPDATE refresh_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE family_id = ?")
                    .bind(now)
                    .bind(&family_id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "UPDATE agents SET tokens_valid_after = MAX(COALESCE(tokens_valid_after, 0), ?) WHERE id = ?",
                )
                .bind(now)
                .bind(uuid_text(agent_id))
                .execute(&mut *tx)
                .await?;
                let audit = AuditEntry {
                    target: agent_id.to_string(),
                    details: serde_json::json!({"family_id": family_id, "presented": if presented.revoked { "revoked" } else { "used" }}),
                    ..reuse_audit
                };
                insert_audit(&mut tx, &audit).await?;
                tx.commit().await?;
                return Ok(RefreshOutcome::ReuseDetected { agent_id, family_id });
            }
            RefreshDecision::LostResponseRetry => {
                sqlx::query("UPDATE refresh_tokens SET revoked_at = ? WHERE token_hash = ?")
                    .bind(now)
                    .bind(&successor_hash)
                    .execute(&mut *tx)
                    .await?;
                true
            }
            RefreshDecision::Rotate => false,
        };
        sqlx::query(
            "UPDATE refresh_tokens SET used_at = COALESCE(used_at, ?), successor_hash = ?,
                    retried_at = CASE WHEN ? THEN ? ELSE retried_at END
             WHERE token_hash = ?",
        )
        .bind(now)
        .bind(&new_hash[..])
        .bind(lost_response_retry)
        .bind(now)
        .bind(&presented_hash[..])
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO refresh_tokens (token_hash, family_id, agent_id, created_at) VALUES (?, ?, ?, ?)")
            .bind(&new_hash[..])
            .bind(&family_id)
            .bind(uuid_text(agent_id))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(RefreshOutcome::Rotated { agent_id, lost_response_retry })
    }

    async fn create_device_grant(&self, g: NewDeviceGrant) -> Result<NewGrantOutcome> {
        let mut tx = self.begin().await?;
        // Counting stops at the cap, over the expires_at index: bounded work
        // however many grants a flood left behind (retention deletes them).
        let pending: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM (SELECT 1 FROM device_grants
             WHERE expires_at > ? AND status = 'pending' LIMIT ?)",
        )
        .bind(g.now)
        .bind(g.max_pending as i64)
        .fetch_one(&mut *tx)
        .await?;
        if pending as u64 >= g.max_pending {
            return Ok(NewGrantOutcome::TooManyPending);
        }
        // Bounded like the count above: at most `max_pending` rows match
        // the first two conditions.
        let from_address: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM (SELECT 1 FROM device_grants
             WHERE expires_at > ? AND status = 'pending' AND requested_ip IS ? LIMIT ?)",
        )
        .bind(g.now)
        .bind(&g.requested_ip)
        .bind(g.max_pending_per_ip as i64)
        .fetch_one(&mut *tx)
        .await?;
        if from_address as u64 >= g.max_pending_per_ip {
            return Ok(NewGrantOutcome::TooManyFromAddress);
        }
        let res = sqlx::query(
            "INSERT INTO device_grants (device_code_hash, user_code, public_key, hostname, requested_ip,
                                        created_at, expires_at, interval_s, status)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending')",
        )
        .bind(&g.device_code_hash[..])
        .bind(&g.user_code)
        .bind(&g.public_key)
        .bind(&g.hostname)
        .bind(&g.requested_ip)
        .bind(g.now)
        .bind(g.expires_at)
        .bind(g.interval_s)
        .execute(&mut *tx)
        .await;
        match res {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Err(StoreError::Conflict("user code collision".into()));
            }
            other => other?,
        };
        tx.commit().await?;
        Ok(NewGrantOutcome::Created)
    }

    async fn pending_device_grant(&self, user_code: &str, now: Millis) -> Result<Option<DeviceGrantInfo>> {
        self.count();
        let row = q!("SELECT {GRANT_INFO_COLUMNS} FROM device_grants
             WHERE user_code = ? AND status = 'pending' AND expires_at > ?")
        .bind(user_code)
        .bind(now)
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(grant_info).transpose()
    }

    async fn decide_device_grant(
        &self,
        user_code: &str,
        approve: bool,
        labels: &tether_proto::Labels,
        decided_by: &str,
        now: Millis,
        audit: AuditFor<'_, DeviceGrantInfo>,
    ) -> Result<DeviceGrantInfo> {
        let mut tx = self.begin().await?;
        let row = q!("UPDATE device_grants SET status = ?, labels = ?, decided_by = ?
             WHERE user_code = ? AND status = 'pending' AND expires_at > ?
             RETURNING {GRANT_INFO_COLUMNS}")
        .bind(if approve { "approved" } else { "denied" })
        .bind(json_text(labels))
        .bind(decided_by)
        .bind(user_code)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound)?;
        let info = grant_info(&row)?;
        insert_audit(&mut tx, &audit(&info)).await?;
        tx.commit().await?;
        Ok(info)
    }

    async fn poll_device_grant(
        &self,
        device_code_hash: [u8; 32],
        new_agent: AgentId,
        refresh_hash: [u8; 32],
        grace_ms: Millis,
        now: Millis,
        audit: AuditFor<'_, DeviceRedeemed>,
    ) -> Result<DevicePoll> {
        let mut tx = self.begin().await?;
        let Some(row) = sqlx::query(
            "SELECT status, expires_at, interval_s, last_poll_at, public_key, hostname, labels, decided_by,
                    user_code, redeemed_at, agent_id, refresh_token_hash
             FROM device_grants WHERE device_code_hash = ?",
        )
        .bind(&device_code_hash[..])
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(DevicePoll::Invalid);
        };
        let status: String = row.get(0);
        let expires_at: Millis = row.get(1);
        let mut interval_s: i64 = row.get(2);
        let last_poll: Option<Millis> = row.get(3);
        let approved_by: Option<String> = row.get(7);
        let user_code: String = row.get(8);
        if status == "redeemed" {
            // Checked before expiry and interval: the redeeming poll may have
            // been the last moment of the grant, and its retry comes at once.
            let redeemed_at: Option<Millis> = row.get(9);
            let agent_id: Option<String> = row.get(10);
            let issued: Option<Vec<u8>> = row.get(11);
            let (Some(redeemed_at), Some(agent_id), Some(issued)) = (redeemed_at, agent_id, issued) else {
                return Ok(DevicePoll::Invalid);
            };
            if now - redeemed_at > grace_ms {
                return Ok(DevicePoll::Invalid);
            }
            // Only while the agent never used what it was given: once it
            // has, the answer was not lost and a repeat is not the agent.
            let family: Option<String> = sqlx::query_scalar(
                "SELECT t.family_id FROM refresh_tokens t JOIN agents a ON a.id = t.agent_id
                 WHERE t.token_hash = ? AND t.used_at IS NULL AND t.revoked_at IS NULL AND a.revoked_at IS NULL",
            )
            .bind(&issued)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(family) = family else {
                return Ok(DevicePoll::Invalid);
            };
            sqlx::query("UPDATE refresh_tokens SET revoked_at = ? WHERE token_hash = ?")
                .bind(now)
                .bind(&issued)
                .execute(&mut *tx)
                .await?;
            sqlx::query("INSERT INTO refresh_tokens (token_hash, family_id, agent_id, created_at) VALUES (?, ?, ?, ?)")
                .bind(&refresh_hash[..])
                .bind(&family)
                .bind(&agent_id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE device_grants SET refresh_token_hash = ? WHERE device_code_hash = ?")
                .bind(&refresh_hash[..])
                .bind(&device_code_hash[..])
                .execute(&mut *tx)
                .await?;
            let rec = q!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = ?").bind(&agent_id).fetch_one(&mut *tx).await?;
            let agent = agent_from_row(&rec)?;
            let redeemed = DeviceRedeemed {
                agent,
                approved_by: approved_by.unwrap_or_default(),
                user_code,
                lost_response_retry: true,
            };
            insert_audit(&mut tx, &audit(&redeemed)).await?;
            tx.commit().await?;
            return Ok(DevicePoll::Approved(Box::new(redeemed)));
        }
        if expires_at <= now {
            return Ok(DevicePoll::Expired);
        }
        let too_fast = last_poll.is_some_and(|t| now - t < interval_s * 1000);
        if too_fast {
            interval_s += 5;
        }
        sqlx::query("UPDATE device_grants SET last_poll_at = ?, interval_s = ? WHERE device_code_hash = ?")
            .bind(now)
            .bind(interval_s)
            .bind(&device_code_hash[..])
            .execute(&mut *tx)
            .await?;
        let outcome = match status.as_str() {
            _ if too_fast => DevicePoll::SlowDown { interval_s: interval_s as u32 },
            "pending" => DevicePoll::Pending,
            "denied" => DevicePoll::Denied,
            "approved" => {
                let agent = NewAgent {
                    id: new_agent,
                    hostname: row.get(5),
                    labels: rows::parse_json(row.get::<&str, _>(6))?,
                    facts: serde_json::json!({}),
                    public_key: row.get(4),
                };
                let agent = insert_agent(&mut tx, agent, refresh_hash, now).await?;
                sqlx::query(
                    "UPDATE device_grants SET status = 'redeemed', redeemed_at = ?, agent_id = ?, refresh_token_hash = ?
                     WHERE device_code_hash = ?",
                )
                .bind(now)
                .bind(uuid_text(new_agent))
                .bind(&refresh_hash[..])
                .bind(&device_code_hash[..])
                .execute(&mut *tx)
                .await?;
                let redeemed = DeviceRedeemed {
                    agent,
                    approved_by: approved_by.unwrap_or_default(),
                    user_code,
                    lost_response_retry: false,
                };
                insert_audit(&mut tx, &audit(&redeemed)).await?;
                DevicePoll::Approved(Box::new(redeemed))
            }
            other => return Err(StoreError::Corrupt(format!("device grant status {other:?}"))),
        };
        tx.commit().await?;
        Ok(outcome)
    }

    async fn prune_device_grants(&self, before: Millis) -> Result<u64> {
        self.count();
        let done =
            sqlx::query("DELETE FROM device_grants WHERE expires_at < ?").bind(before).execute(&self.writer).await?;
        Ok(done.rows_affected())
    }

    async fn read_signals(&self, agent_id: AgentId, after: u64, limit: u32) -> Result<Vec<(u64, Signal)>> {
        self.count();
        let rows = sqlx::query(
            "SELECT seq, kind, ts_ms, ref FROM signals WHERE agent_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(uuid_text(agent_id))
        .bind(after as i64)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                let seq: i64 = r.get(0);
                Ok((
                    seq as u64,
                    Signal { kind: r.get(1), ts_ms: r.get(2), reference: rows::parse_json(r.get::<&str, _>(3))? },
                ))
            })
            .collect()
    }

    async fn prune_signals(&self, before: Millis, keep: u64) -> Result<Vec<(AgentId, u64)>> {
        let mut tx = self.begin().await?;
        let moved = sqlx::query(
            "WITH target AS (
                SELECT id, MAX(floor_seq, head_seq - ?,
                               COALESCE((SELECT MAX(seq) FROM signals s WHERE s.agent_id = agents.id AND s.ts_ms < ?), 0))
                       AS new_floor
                FROM agents)
             UPDATE agents SET floor_seq = target.new_floor FROM target
             WHERE agents.id = target.id AND target.new_floor > agents.floor_seq
             RETURNING agents.id, agents.floor_seq",
        )
        .bind(i64::try_from(keep).unwrap_or(i64::MAX))
        .bind(before)
        .fetch_all(&mut *tx)
        .await?;
        if !moved.is_empty() {
            sqlx::query(
                "DELETE FROM signals WHERE seq <= (SELECT floor_seq FROM agents WHERE agents.id = signals.agent_id)",
            )
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        moved.iter().map(|r| Ok((rows::parse_id(r.get::<&str, _>(0))?, r.get::<i64, _>(1) as u64))).collect()
    }

    async fn mark_delivered(&self, agent_id: AgentId, ids: &[CommandId], now: Millis) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE commands SET status = 'delivered', delivered_at = ?
             WHERE agent_id = ? AND status = 'queued' AND id IN (SELECT value FROM json_each(?))",
        )
        .bind(now)
        .bind(uuid_text(agent_id))
        .bind(json_text(&ids))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    async fn create_batch(&self, batch: NewBatch, audit: AuditFor<'_, CreatedBatch>) -> Result<CreatedBatch> {
        let mut tx = self.begin().await?;
        let req = &batch.request;
        if let Some(key) = &req.idempotency_key {
            let existing =
                sqlx::query("SELECT id, request_hash FROM batches WHERE created_by = ? AND idempotency_key = ?")
                    .bind(&batch.created_by)
                    .bind(key)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some(row) = existing {
                let hash: Vec<u8> = row.get(1);
                if hash != batch.request_hash {
                    return Err(StoreError::Conflict("idempotency key was used with a different request".into()));
                }
                let batch_id: String = row.get(0);
                let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM commands WHERE batch_id = ? ORDER BY id")
                    .bind(&batch_id)
                    .fetch_all(&mut *tx)
                    .await?;
                return Ok(CreatedBatch {
                    batch_id: rows::parse_id(&batch_id)?,
                    command_ids: ids.iter().map(|s| rows::parse_id(s)).collect::<Result<_>>()?,
                    created: false,
                    heads: Vec::new(),
                });
            }
        }
        let agent_ids: Vec<String> = match &batch.target {
            TargetSpec::Agents(ids) => {
                let wanted: Vec<String> = ids.iter().map(ToString::to_string).collect();
                let found: Vec<String> = sqlx::query_scalar(
                    "SELECT id FROM agents WHERE revoked_at IS NULL AND id IN (SELECT value FROM json_each(?)) ORDER BY id",
                )
                .bind(json_text(&wanted))
                .fetch_all(&mut *tx)
                .await?;
                if let Some(missing) = wanted.iter().find(|w| !found.contains(w)) {
                    return Err(StoreError::Invalid { field: "target", message: format!("no active agent {missing}") });
                }
                found
            }
            TargetSpec::Labels(labels) => {
                sqlx::query_scalar(
                    "SELECT id FROM agents WHERE revoked_at IS NULL
                       AND NOT EXISTS (SELECT 1 FROM json_each(?) l WHERE json_extract(agents.labels, '$.\"' || l.key || '\"') IS NOT l.value)
                     ORDER BY id",
                )
                .bind(json_text(labels))
                .fetch_all(&mut *tx)
                .await?
            }
            TargetSpec::All => {
                sqlx::query_scalar("SELECT id FROM agents WHERE revoked_at IS NULL ORDER BY id").fetch_all(&mut *tx).await?
            }
        };
        let now = batch.now;
        let expires_at = req.expires_at.map(rows::to_millis).unwrap_or(now + DEFAULT_EXPIRY_S * 1000);
        if expires_at <= now {
            return Err(StoreError::Invalid { field: "expires_at", message: "must be in the future".into() });
        }
        let not_before = req.not_before.map(rows::to_millis).filter(|nb| *nb > now);
        sqlx::query(
            "INSERT INTO batches (id, name, created_by, created_at, target, idempotency_key, request_hash) VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(uuid_text(batch.id))
        .bind(&req.name)
        .bind(&batch.created_by)
        .bind(now)
        .bind(json_text(&req.target))
        .bind(&req.idempotency_key)
        .bind(&batch.request_hash[..])
        .execute(&mut *tx)
        .await?;
        let mut command_ids = Vec::with_capacity(agent_ids.len());
        let mut heads = Vec::new();
        for agent in &agent_ids {
            let id = CommandId::new();
            let agent_id: AgentId = rows::parse_id(agent)?;
            sqlx::query(
                "INSERT INTO commands (id, batch_id, agent_id, name, args, timeout_s, priority, created_by, status,
                                       released, created_at, not_before, expires_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
            )
            .bind(uuid_text(id))
            .bind(uuid_text(batch.id))
            .bind(agent)
            .bind(&req.name)
            .bind(req.args.to_string())
            .bind(req.timeout_s)
            .bind(req.priority)
            .bind(&batch.created_by)
            .bind(not_before.is_none())
            .bind(now)
            .bind(not_before)
            .bind(expires_at)
            .execute(&mut *tx)
            .await?;
            if not_before.is_none() {
                let reference = serde_json::to_value(CommandQueued {
                    command_id: id,
                    name: req.name.clone(),
                    args: req.args.clone(),
                    timeout_s: req.timeout_s,
                    priority: req.priority,
                    expires_at_ms: Some(expires_at),
                })
                .expect("command.queued ref serializes");
                heads.push(append_signal(&mut tx, agent_id, signal::COMMAND_QUEUED, &reference, now).await?);
            }
            command_ids.push(id);
        }
        let created = CreatedBatch { batch_id: batch.id, command_ids, created: true, heads };
        insert_audit(&mut tx, &audit(&created)).await?;
        tx.commit().await?;
        Ok(created)
    }

    async fn get_command(&self, id: CommandId) -> Result<Option<Command>> {
        self.count();
        let row = q!("SELECT {COMMAND_COLUMNS} FROM commands WHERE id = ?")
            .bind(uuid_text(id))
            .fetch_optional(&self.reader)
            .await?;
        row.map(|r| command_from_row(&r)).transpose()
    }

    async fn list_commands(&self, filter: &CommandFilter) -> Result<Vec<Command>> {
        self.count();
        let statuses: Vec<&str> = filter.statuses.iter().map(|s| s.as_str()).collect();
        let rows = q!("SELECT {COMMAND_COLUMNS} FROM commands
             WHERE (? IS NULL OR id < ?)
               AND (? IS NULL OR agent_id = ?)
               AND (? IS NULL OR batch_id = ?)
               AND (? = 0 OR status IN (SELECT value FROM json_each(?)))
             ORDER BY id DESC LIMIT ?")
        .bind(filter.before.map(uuid_text))
        .bind(filter.before.map(uuid_text))
        .bind(filter.agent_id.map(uuid_text))
        .bind(filter.agent_id.map(uuid_text))
        .bind(filter.batch_id.map(uuid_text))
        .bind(filter.batch_id.map(uuid_text))
        .bind(statuses.len() as i64)
        .bind(json_text(&statuses))
        .bind(filter.limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(command_from_row).collect()
    }

    async fn get_batch(&self, id: BatchId) -> Result<Option<Batch>> {
        self.count();
        let Some(row) = sqlx::query("SELECT name, created_by, created_at FROM batches WHERE id = ?")
            .bind(uuid_text(id))
            .fetch_optional(&self.reader)
            .await?
        else {
            return Ok(None);
        };
        let counts_rows = sqlx::query("SELECT status, COUNT(*) FROM commands WHERE batch_id = ? GROUP BY status")
            .bind(uuid_text(id))
            .fetch_all(&self.reader)
            .await?;
        let mut counts = std::collections::BTreeMap::new();
        let mut total = 0;
        let mut active = false;
        for r in &counts_rows {
            let status = CommandStatus::from_str(r.get::<&str, _>(0)).map_err(StoreError::Corrupt)?;
            let n: i64 = r.get(1);
            total += n as u64;
            active |= !status.is_terminal();
            counts.insert(status, n as u64);
        }
        Ok(Some(Batch {
            id,
            name: row.get(0),
            created_by: row.get(1),
            created_at: rows::from_millis(row.get(2))?,
            total,
            counts,
            status: if active { BatchStatus::Running } else { BatchStatus::Done },
        }))
    }

    async fn take_next_command(&self, agent_id: AgentId, now: Millis) -> Result<Option<Command>> {
        let mut tx = self.begin().await?;
        let row = q!("UPDATE commands SET status = 'delivered', delivered_at = ?
             WHERE id = (SELECT id FROM commands
                         WHERE agent_id = ? AND status = 'queued' AND released = 1 AND expires_at > ?
                         ORDER BY priority DESC, id LIMIT 1)
             RETURNING {COMMAND_COLUMNS}")
        .bind(now)
        .bind(uuid_text(agent_id))
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        row.map(|r| command_from_row(&r)).transpose()
    }

    async fn report_running(&self, agent_id: AgentId, id: CommandId, now: Millis) -> Result<Command> {
        let mut tx = self.begin().await?;
        let cmd = load_command(&mut tx, id).await?.filter(|c| c.agent_id == agent_id).ok_or(StoreError::NotFound)?;
        let next = cmd.status.apply(Event::Start).map_err(|e| StoreError::Conflict(e.to_string()))?;
        if next != cmd.status {
            sqlx::query(
                "UPDATE commands SET status = 'running', started_at = ?, delivered_at = COALESCE(delivered_at, ?) WHERE id = ?",
            )
            .bind(now)
            .bind(now)
            .bind(uuid_text(id))
            .execute(&mut *tx)
            .await?;
        }
        let cmd = load_command(&mut tx, id).await?.ok_or(StoreError::NotFound)?;
        tx.commit().await?;
        Ok(cmd)
    }

    async fn report_result(
        &self,
        agent_id: AgentId,
        id: CommandId,
        report: &ResultReport,
        now: Millis,
        audit: ResultAudit<'_>,
    ) -> Result<ResultOutcome> {
        let mut tx = self.begin().await?;
        let cmd = load_command(&mut tx, id).await?.filter(|c| c.agent_id == agent_id).ok_or(StoreError::NotFound)?;
        let hash = result_hash(report);
        let stored_hash: Option<Vec<u8>> = sqlx::query_scalar("SELECT result_hash FROM commands WHERE id = ?")
            .bind(uuid_text(id))
            .fetch_one(&mut *tx)
            .await?;
        if stored_hash.as_deref() == Some(&hash[..]) {
            return Ok(ResultOutcome::Unchanged);
        }
        // An operator cancelled it and the agent confirms: record its output.
        let confirms_cancel = cmd.status == CommandStatus::Cancelled
            && report.status == CommandStatus::Cancelled
            && stored_hash.is_none();
        if !confirms_cancel {
            cmd.status.apply(Event::Finish(report.status)).map_err(|e| StoreError::Conflict(e.to_string()))?;
        }
        let late = cmd.status == CommandStatus::Lost;
        let started_at = report.started_at.map(rows::to_millis);
        sqlx::query(
            "UPDATE commands SET status = ?, exit_code = ?, stdout = ?, stderr = ?, output = ?, truncated = ?,
                    reason = COALESCE(?, reason), result_hash = ?, finished_at = ?,
                    delivered_at = COALESCE(delivered_at, ?), started_at = COALESCE(started_at, ?, ?)
             WHERE id = ?",
        )
        .bind(report.status.as_str())
        .bind(report.exit_code)
        .bind(&report.stdout)
        .bind(&report.stderr)
        .bind(report.output.to_string())
        .bind(report.truncated)
        .bind(&report.reason)
        .bind(&hash)
        .bind(now)
        .bind(now)
        .bind(started_at)
        .bind(now)
        .bind(uuid_text(id))
        .execute(&mut *tx)
        .await?;
        let cmd = load_command(&mut tx, id).await?.ok_or(StoreError::NotFound)?;
        insert_audit(&mut tx, &audit(&cmd, late)).await?;
        tx.commit().await?;
        Ok(ResultOutcome::Recorded { late, command: Box::new(cmd) })
    }

    async fn cancel_command(&self, id: CommandId, now: Millis, audit: AuditEntry) -> Result<CancelOutcome> {
        let mut tx = self.begin().await?;
        let cmd = load_command(&mut tx, id).await?.ok_or(StoreError::NotFound)?;
        let head = cancel_in_tx(&mut tx, &cmd, now).await?;
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(CancelOutcome { cancelled: vec![id], heads: head.into_iter().collect() })
    }

    async fn cancel_batch(
        &self,
        id: BatchId,
        now: Millis,
        audit: AuditFor<'_, CancelOutcome>,
    ) -> Result<CancelOutcome> {
        let mut tx = self.begin().await?;
        let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM batches WHERE id = ?")
            .bind(uuid_text(id))
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(StoreError::NotFound);
        }
        let rows = q!(
            "SELECT {COMMAND_COLUMNS} FROM commands WHERE batch_id = ? AND status IN ('queued', 'delivered', 'running')"
        )
        .bind(uuid_text(id))
        .fetch_all(&mut *tx)
        .await?;
        let mut out = CancelOutcome { cancelled: Vec::new(), heads: Vec::new() };
        for row in &rows {
            let cmd = command_from_row(row)?;
            out.heads.extend(cancel_in_tx(&mut tx, &cmd, now).await?);
            out.cancelled.push(cmd.id);
        }
        insert_audit(&mut tx, &audit(&out)).await?;
        tx.commit().await?;
        out.heads = last_heads(out.heads);
        Ok(out)
    }

    async fn sweep(&self, now: Millis) -> Result<SweepOutcome> {
        let mut tx = self.begin().await?;
        let expired = sqlx::query(
            "UPDATE commands SET status = 'expired', finished_at = ? WHERE status = 'queued' AND expires_at <= ?",
        )
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let grace = LOST_GRACE_S * 1000;
        let lost = sqlx::query(
            "UPDATE commands SET status = 'lost', finished_at = ?, reason = 'no result from the agent'
             WHERE (status = 'delivered' AND delivered_at + timeout_s * 1000 + ? <= ?)
                OR (status = 'running' AND started_at + timeout_s * 1000 + ? <= ?)",
        )
        .bind(now)
        .bind(grace)
        .bind(now)
        .bind(grace)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let due =
            q!("SELECT {COMMAND_COLUMNS} FROM commands WHERE status = 'queued' AND released = 0 AND not_before <= ?
             ORDER BY priority DESC, id LIMIT 1000")
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
        let mut heads = Vec::with_capacity(due.len());
        for row in &due {
            let cmd = command_from_row(row)?;
            heads.push(append_signal(&mut tx, cmd.agent_id, signal::COMMAND_QUEUED, &queued_ref(&cmd), now).await?);
            sqlx::query("UPDATE commands SET released = 1 WHERE id = ?")
                .bind(uuid_text(cmd.id))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(SweepOutcome { expired, lost, released: due.len() as u64, heads: last_heads(heads) })
    }

    async fn append_audit(&self, entry: AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        insert_audit(&mut tx, &entry).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn query_audit(&self, f: &AuditFilter) -> Result<Vec<AuditRecord>> {
        self.count();
        let agent = f.agent_id.map(uuid_text);
        let rows = sqlx::query(
            "SELECT id, ts, actor, actor_kind, action, target, outcome, ip, request_id, details, prev_hash, hash
             FROM audit
             WHERE (? IS NULL OR id < ?) AND (? IS NULL OR actor = ?) AND (? IS NULL OR action = ?)
               AND (? IS NULL OR actor = ? OR target = ?) AND (? IS NULL OR ts >= ?) AND (? IS NULL OR ts < ?)
             ORDER BY id DESC LIMIT ?",
        )
        .bind(f.before)
        .bind(f.before)
        .bind(&f.actor)
        .bind(&f.actor)
        .bind(&f.action)
        .bind(&f.action)
        .bind(&agent)
        .bind(&agent)
        .bind(&agent)
        .bind(f.from)
        .bind(f.from)
        .bind(f.to)
        .bind(f.to)
        .bind(f.limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(rows::audit_from_row).collect()
    }

    async fn list_audit(&self, after_id: i64, limit: u32) -> Result<Vec<AuditRecord>> {
        self.count();
        let rows = sqlx::query(
            "SELECT id, ts, actor, actor_kind, action, target, outcome, ip, request_id, details, prev_hash, hash
             FROM audit WHERE id > ? ORDER BY id LIMIT ?",
        )
        .bind(after_id)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(rows::audit_from_row).collect()
    }
}

#[cfg(test)]
mod tests;
