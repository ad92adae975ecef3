//! Agents on SQLite: enrollment, identity, liveness and stream state.

use async_trait::async_trait;
use sqlx::Row;
use tether_proto::{AgentId, Labels};

use super::rows::{agent_from_row, presence_from_row, stream_change_from_row};
use super::{SqliteStore, Tx};
use crate::rows::{AGENT_COLUMNS, STREAM_COLUMNS};
use crate::rules::config::{RELABELLED, Retarget};
use crate::rules::{enrollment_labels, latest_heartbeats, new_stream_epoch, presence_audit};
use crate::sql::{json_text, like_pattern, parse_json, q};
use crate::{
    AgentFilter, AgentRecord, AgentStore, AgentUpdate, AuditEntry, AuditFor, Entity, Head, HeartbeatRow, Millis,
    NewAgent, PresenceChange, Result, StatusFilter, StoreError, StreamChange,
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
    let config_hash = super::configs::initial_hash(tx, agent.id, &agent.labels).await?;
    sqlx::query(
        "INSERT INTO agents (id, name, hostname, labels, facts, public_key, epoch, created_at, last_seen,
                             stream_changed_at, config_hash, online)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
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
    .bind(&config_hash)
    .execute(&mut **tx)
    .await?;
    sqlx::query("INSERT INTO refresh_tokens (token_hash, family_id, agent_id, created_at) VALUES (?, ?, ?, ?)")
        .bind(&refresh_hash[..])
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(agent.id.to_string())
        .bind(now)
        .execute(&mut **tx)
        .await?;
    Ok(AgentRecord::new(agent, epoch, config_hash, now))
}

/// Reads one agent inside `tx`.
pub(super) async fn load_agent(tx: &mut Tx, id: &str) -> Result<AgentRecord> {
    let row = q!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = ?").bind(id).fetch_one(&mut **tx).await?;
    agent_from_row(&row)
}

/// An agent that is not revoked, inside `tx`; `NotFound(Agent)` otherwise.
pub(super) async fn active_agent(tx: &mut Tx, id: AgentId) -> Result<AgentRecord> {
    let row = q!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = ? AND revoked_at IS NULL")
        .bind(id.to_string())
        .fetch_optional(&mut **tx)
        .await?;
    row.map(|r| agent_from_row(&r)).transpose()?.ok_or(StoreError::NotFound(Entity::Agent))
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
        let (status, seen_since) = filter.status.map(StatusFilter::sql_params).unzip();
        let rows = q!("SELECT {AGENT_COLUMNS} FROM agents
             WHERE (? IS NULL OR id > ?)
               AND (? IS NULL OR name LIKE ? ESCAPE '\\' OR hostname LIKE ? ESCAPE '\\')
               AND NOT EXISTS (SELECT 1 FROM json_each(?) l WHERE json_extract(agents.labels, '$.\"' || l.key || '\"') IS NOT l.value)
               AND (?8 IS NULL
                    OR (?8 = 'online' AND revoked_at IS NULL AND last_seen >= ?9 AND last_seen > COALESCE(disconnected_at, -1))
                    OR (?8 = 'offline' AND revoked_at IS NULL
                        AND (last_seen IS NULL OR last_seen < ?9 OR last_seen <= disconnected_at))
                    OR (?8 = 'revoked' AND revoked_at IS NOT NULL))
             ORDER BY id LIMIT ?7")
        .bind(&after)
        .bind(&after)
        .bind(&like)
        .bind(&like)
        .bind(&like)
        .bind(json_text(&filter.labels))
        .bind(filter.limit)
        .bind(status)
        .bind(seen_since)
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

    async fn record_heartbeats(&self, beats: &[HeartbeatRow]) -> Result<()> {
        if beats.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin().await?;
        for beat in latest_heartbeats(beats) {
            let (failed_hash, error) = beat.failed_config.clone().unzip();
            // An applied configuration clears the failure recorded before it.
            // An agent deleted meanwhile matches no row: skipped.
            sqlx::query(
                "UPDATE agents SET version = COALESCE(?1, version),
                        applied_config_hash = COALESCE(?2, applied_config_hash),
                        config_failed_hash = CASE WHEN ?3 IS NOT NULL THEN ?3 WHEN ?2 IS NOT NULL THEN NULL
                                                  ELSE config_failed_hash END,
                        config_error = CASE WHEN ?3 IS NOT NULL THEN ?4 WHEN ?2 IS NOT NULL THEN NULL
                                            ELSE config_error END,
                        heartbeat = ?5, last_seen = MAX(COALESCE(last_seen, 0), ?6) WHERE id = ?7",
            )
            .bind(&beat.version)
            .bind(&beat.applied_config_hash)
            .bind(failed_hash)
            .bind(error)
            .bind(&beat.body)
            .bind(beat.at)
            .bind(beat.agent_id.to_string())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn update_presence(&self, offline_before: Millis, now: Millis) -> Result<Vec<PresenceChange>> {
        let mut tx = self.begin().await?;
        // Only agents whose state differs, through the partial indexes of
        // each direction; the single writer keeps the read and the update
        // together.
        let rows = sqlx::query(
            "SELECT id, name, hostname, labels, 1, last_seen, online FROM agents
             WHERE revoked_at IS NULL AND online IS NOT 1 AND last_seen >= ?1
               AND last_seen > COALESCE(disconnected_at, -1)
             UNION ALL
             SELECT id, name, hostname, labels, 0, last_seen, online FROM agents
             WHERE revoked_at IS NULL AND online IS NOT 0 AND (last_seen < ?1 OR last_seen IS NULL)
             ORDER BY id",
        )
        .bind(offline_before)
        .fetch_all(&mut *tx)
        .await?;
        let mut changes = Vec::new();
        for row in &rows {
            let change = presence_from_row(row)?;
            let was: Option<bool> = row.try_get(6)?;
            sqlx::query("UPDATE agents SET online = ? WHERE id = ?")
                .bind(change.online)
                .bind(change.agent_id.to_string())
                .execute(&mut *tx)
                .await?;
            if was.is_some() {
                super::audit::insert_audit(&mut tx, &presence_audit(&change, now)).await?;
                changes.push(change);
            }
        }
        tx.commit().await?;
        Ok(changes)
    }

    async fn disconnect_agent(&self, id: AgentId, at: Millis) -> Result<Option<PresenceChange>> {
        let mut tx = self.begin().await?;
        sqlx::query("UPDATE agents SET disconnected_at = MAX(COALESCE(disconnected_at, ?1), ?1) WHERE id = ?2")
            .bind(at)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        // A disconnected agent goes offline here, not in the presence job,
        // which only ever sees it again once it is seen after `at`.
        let row = sqlx::query(
            "UPDATE agents SET online = 0
             WHERE id = ?2 AND revoked_at IS NULL AND online IS NOT 0 AND (last_seen IS NULL OR last_seen <= ?1)
             RETURNING id, name, hostname, labels, 0, last_seen",
        )
        .bind(at)
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        let change = row.as_ref().map(presence_from_row).transpose()?;
        if let Some(change) = &change {
            super::audit::insert_audit(&mut tx, &presence_audit(change, at)).await?;
        }
        tx.commit().await?;
        Ok(change)
    }

    async fn delete_agent(&self, id: AgentId, audit: AuditEntry) -> Result<AgentRecord> {
        let mut tx = self.begin().await?;
        let rec = q!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| agent_from_row(&r))
            .transpose()?
            .ok_or(StoreError::NotFound(Entity::Agent))?;
        let agent = id.to_string();
        // A tombstone for the other servers' catch-up; a day is far beyond it.
        sqlx::query("DELETE FROM deleted_agents WHERE deleted_at < ?")
            .bind(audit.ts - 86_400_000)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO deleted_agents (id, epoch, head_seq, floor_seq, deleted_at)
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id.to_string())
        .bind(rec.epoch as i64)
        .bind(rec.head_seq as i64)
        .bind(rec.floor_seq as i64)
        .bind(audit.ts)
        .execute(&mut *tx)
        .await?;
        // Children before the agent row (foreign keys). Batches are shared
        // by the commands of many agents: only those left empty go.
        let batches: Vec<String> = sqlx::query_scalar("DELETE FROM commands WHERE agent_id = ? RETURNING batch_id")
            .bind(&agent)
            .fetch_all(&mut *tx)
            .await?;
        super::retention::delete_empty_batches(&mut tx, &batches).await?;
        sqlx::query(
            "DELETE FROM cert_expiry_announced WHERE serial IN (SELECT serial FROM issued_certs WHERE agent_id = ?)",
        )
        .bind(&agent)
        .execute(&mut *tx)
        .await?;
        for sql in [
            "DELETE FROM metric_points WHERE series_id IN (SELECT id FROM metric_series WHERE agent_id = ?)",
            "DELETE FROM metric_hourly WHERE series_id IN (SELECT id FROM metric_series WHERE agent_id = ?)",
            "DELETE FROM metric_daily WHERE series_id IN (SELECT id FROM metric_series WHERE agent_id = ?)",
            "DELETE FROM metric_series WHERE agent_id = ?",
            "DELETE FROM metric_batches WHERE agent_id = ?",
            "DELETE FROM inventory WHERE agent_id = ?",
            "DELETE FROM signals WHERE agent_id = ?",
            "DELETE FROM agent_items WHERE agent_id = ?",
            "DELETE FROM issued_certs WHERE agent_id = ?",
            "DELETE FROM refresh_tokens WHERE agent_id = ?",
            "DELETE FROM agent_keys WHERE agent_id = ?",
            "DELETE FROM device_grants WHERE agent_id = ?",
            "DELETE FROM request_nonces WHERE agent_id = ?",
            "DELETE FROM agents WHERE id = ?",
        ] {
            sqlx::query(sql).bind(&agent).execute(&mut *tx).await?;
        }
        // Its own configuration scope is only its.
        let scope = tether_proto::config::Scope::Agent(id).to_string();
        for sql in ["DELETE FROM config_versions WHERE scope = ?", "DELETE FROM config_scopes WHERE scope = ?"] {
            sqlx::query(sql).bind(&scope).execute(&mut *tx).await?;
        }
        super::audit::insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(rec)
    }

    async fn update_agent(
        &self,
        id: AgentId,
        update: AgentUpdate,
        now: Millis,
        audit: AuditEntry,
    ) -> Result<(AgentRecord, Vec<Head>)> {
        let mut tx = self.begin().await?;
        let before = active_agent(&mut tx, id).await?;
        let done = sqlx::query(
            "UPDATE agents SET name = COALESCE(?, name), labels = COALESCE(?, labels)
             WHERE id = ? AND revoked_at IS NULL",
        )
        .bind(&update.name)
        .bind(update.labels.as_ref().map(json_text))
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(Entity::Agent));
        }
        let mut heads = Vec::new();
        if let Some(labels) = &update.labels {
            let docs = super::configs::load_docs(&mut tx, Some(id)).await?;
            let target = [Retarget { agent_id: id, labels: labels.clone(), config_hash: before.config_hash }];
            let changed = crate::rules::config::retargeted(&docs, &target);
            heads = super::configs::retarget(&mut tx, &changed, RELABELLED, 0, now).await?;
            heads.extend(super::items::relabel(&mut tx, id, &before.labels, labels, now).await?);
        }
        let rec = load_agent(&mut tx, &id.to_string()).await?;
        super::audit::insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok((rec, heads))
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
        // Deleted agents come as revoked, from their tombstones.
        let rows = q!("SELECT {STREAM_COLUMNS} FROM agents WHERE stream_changed_at >= ?1
                       UNION ALL
                       SELECT id, epoch, head_seq, floor_seq, deleted_at, 'deleted', NULL FROM deleted_agents
                       WHERE deleted_at >= ?1")
        .bind(since)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(stream_change_from_row).collect()
    }
}
