//! Agents on SQLite: enrollment, identity, liveness and stream state.

use async_trait::async_trait;
use sqlx::Row;
use tether_proto::{AgentId, Labels};

use super::rows::{agent_from_row, stream_change_from_row};
use super::{SqliteStore, Tx};
use crate::rows::{AGENT_COLUMNS, STREAM_COLUMNS};
use crate::rules::{enrollment_labels, new_stream_epoch};
use crate::sql::{json_text, like_pattern, parse_json, q};
use crate::{
    AgentFilter, AgentRecord, AgentStore, AuditEntry, AuditFor, Entity, Millis, NewAgent, Result, StoreError,
    StreamChange,
};

/// Inserts a new agent (labels already final) and the first refresh token of
/// a new family inside `tx`: the common half of both enrollment ways.
pub(super) async fn insert_agent(
    tx: &mut Tx,
    agent: NewAgent,
    refresh_hash: [u8; 32],
    now: Millis,
) -> Result<AgentRecord> {
    let epoch = new_stream_epoch(now);
    sqlx::query(
        "INSERT INTO agents (id, name, hostname, labels, facts, public_key, epoch, created_at, last_seen, stream_changed_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(agent.id.to_string())
    .bind(&agent.hostname)
    .bind(&agent.hostname)
    .bind(json_text(&agent.labels))
    .bind(agent.facts.to_string())
    .bind(&agent.public_key)
    .bind(epoch as i64)
    .bind(now)
    .bind(now)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    sqlx::query("INSERT INTO refresh_tokens (token_hash, family_id, agent_id, created_at) VALUES (?, ?, ?, ?)")
        .bind(&refresh_hash[..])
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(agent.id.to_string())
        .bind(now)
        .execute(&mut **tx)
        .await?;
    Ok(AgentRecord::new(agent, epoch, now))
}

/// Reads one agent inside `tx`.
pub(super) async fn load_agent(tx: &mut Tx, id: &str) -> Result<AgentRecord> {
    let row = q!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = ?").bind(id).fetch_one(&mut **tx).await?;
    agent_from_row(&row)
}

#[async_trait]
impl AgentStore for SqliteStore {
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
        .ok_or(StoreError::NotFound(Entity::EnrollToken))?;
        let token_labels: Labels = parse_json(token.try_get(0)?)?;
        let labels = enrollment_labels(agent.labels.clone(), token_labels);
        let rec = insert_agent(&mut tx, NewAgent { labels, ..agent }, refresh_hash, now).await?;
        super::audit::insert_audit(&mut tx, &audit(&rec)).await?;
        tx.commit().await?;
        Ok(rec)
    }

    async fn get_agent(&self, id: AgentId) -> Result<Option<AgentRecord>> {
        let row = q!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await?;
        row.map(|r| agent_from_row(&r)).transpose()
    }

    async fn list_agents(&self, filter: &AgentFilter) -> Result<Vec<AgentRecord>> {
        let like = filter.q.as_deref().map(like_pattern);
        let after = filter.after.map(|a| a.to_string());
        let rows = q!("SELECT {AGENT_COLUMNS} FROM agents
             WHERE (? IS NULL OR id > ?)
               AND (? IS NULL OR name LIKE ? ESCAPE '\\' OR hostname LIKE ? ESCAPE '\\')
               AND NOT EXISTS (SELECT 1 FROM json_each(?) l WHERE json_extract(agents.labels, '$.\"' || l.key || '\"') IS NOT l.value)
             ORDER BY id LIMIT ?")
        .bind(&after)
        .bind(&after)
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
        let done = sqlx::query(
            "UPDATE agents SET revoked_at = COALESCE(revoked_at, ?), revoke_reason = COALESCE(revoke_reason, ?),
                    stream_changed_at = ? WHERE id = ?",
        )
        .bind(now)
        .bind(reason)
        .bind(now)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(Entity::Agent));
        }
        sqlx::query("UPDATE refresh_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE agent_id = ?")
            .bind(now)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        let rec = load_agent(&mut tx, &id.to_string()).await?;
        super::audit::insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(rec)
    }

    async fn record_heartbeat(
        &self,
        id: AgentId,
        version: Option<&str>,
        applied_config_hash: Option<&str>,
        body: &serde_json::Value,
        now: Millis,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE agents SET version = COALESCE(?, version), applied_config_hash = COALESCE(?, applied_config_hash),
                    heartbeat = ?, last_seen = MAX(COALESCE(last_seen, 0), ?) WHERE id = ?",
        )
        .bind(version)
        .bind(applied_config_hash)
        .bind(body.to_string())
        .bind(now)
        .bind(id.to_string())
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

    async fn stream_changes(&self, since: Millis) -> Result<Vec<StreamChange>> {
        let rows = q!("SELECT {STREAM_COLUMNS} FROM agents WHERE stream_changed_at >= ?")
            .bind(since)
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(stream_change_from_row).collect()
    }
}
