//! Agents on PostgreSQL: enrollment, identity, liveness and stream state.

use async_trait::async_trait;
use sqlx::Row;
use tether_proto::{AgentId, Labels};

use super::rows::{agent_from_row, presence_from_row, stream_change_from_row};
use super::{PgStore, Tx, lock};
use crate::rows::{AGENT_COLUMNS, STREAM_COLUMNS};
use crate::rules::config::{RELABELLED, Retarget};
use crate::rules::{enrollment_labels, latest_heartbeats, new_stream_epoch, presence_audit};
use crate::sql::{json_text, like_pattern, parse_json, q};
use crate::{
    AgentFilter, AgentRecord, AgentStore, AgentUpdate, AuditEntry, AuditFor, Entity, Head, HeartbeatRow, Millis,
    NewAgent, PresenceChange, Result, StatusFilter, StoreError, StreamChange,
};

/// Most agents one `last_seen` transaction touches: keeps row locks short.
const TOUCH_CHUNK: usize = 1000;

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
         VALUES ($1, $2, $2, $3, $4, $5, $6, $7, $7, $7, $8, true)",
    )
    .bind(agent.id.to_string())
    .bind(&agent.hostname)
    .bind(json_text(&agent.labels))
    .bind(agent.facts.to_string())
    .bind(&agent.public_key)
    .bind(epoch as i64)
    .bind(now)
    .bind(&config_hash)
    .execute(&mut **tx)
    .await?;
    sqlx::query("INSERT INTO refresh_tokens (token_hash, family_id, agent_id, created_at) VALUES ($1, $2, $3, $4)")
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
    let row = q!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = $1").bind(id).fetch_one(&mut **tx).await?;
    agent_from_row(&row)
}

/// An agent that is not revoked, inside `tx`; `NotFound(Agent)` otherwise.
pub(super) async fn active_agent(tx: &mut Tx, id: AgentId) -> Result<AgentRecord> {
    let row = q!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = $1 AND revoked_at IS NULL")
        .bind(id.to_string())
        .fetch_optional(&mut **tx)
        .await?;
    row.map(|r| agent_from_row(&r)).transpose()?.ok_or(StoreError::NotFound(Entity::Agent))
}

/// Locks these agents' rows in id order (see the module docs of `postgres`).
/// `NO KEY UPDATE`: these writers exclude each other, but not telemetry
/// ingest, which only needs the row to stay (`KEY SHARE`); only deleting
/// an agent takes the full `FOR UPDATE`.
pub(super) async fn lock_agents(tx: &mut Tx, ids: &[String]) -> Result<()> {
    sqlx::query("SELECT 1 FROM agents WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
        .bind(ids)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[async_trait]
impl AgentStore for PgStore {
    async fn enroll_agent(
        &self,
        enroll_token_hash: [u8; 32],
        agent: NewAgent,
        refresh_hash: [u8; 32],
        now: Millis,
        audit: AuditFor<'_, AgentRecord>,
    ) -> Result<AgentRecord> {
        let mut tx = self.begin().await?;
        // A conditional update: a concurrent use waits for this row and
        // then re-checks `used < uses` against what committed.
        let token_labels: String = sqlx::query_scalar(
            "UPDATE enroll_tokens SET used = used + 1
             WHERE token_hash = $1 AND revoked_at IS NULL AND expires_at > $2 AND used < uses
             RETURNING labels",
        )
        .bind(&enroll_token_hash[..])
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound(Entity::EnrollToken))?;
        let token_labels: Labels = parse_json(&token_labels)?;
        let labels = enrollment_labels(agent.labels.clone(), token_labels);
        let rec = insert_agent(&mut tx, NewAgent { labels, ..agent }, refresh_hash, now).await?;
        super::audit::insert_audit(&mut tx, &audit(&rec)).await?;
        tx.commit().await?;
        Ok(rec)
    }

    async fn get_agent(&self, id: AgentId) -> Result<Option<AgentRecord>> {
        let row = q!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| agent_from_row(&r)).transpose()
    }

    async fn list_agents(&self, filter: &AgentFilter) -> Result<Vec<AgentRecord>> {
        let like = filter.q.as_deref().map(like_pattern);
        let (status, seen_since) = filter.status.map(StatusFilter::sql_params).unzip();
        let rows = q!("SELECT {AGENT_COLUMNS} FROM agents
             WHERE ($1::text IS NULL OR id > $1)
               AND ($2::text IS NULL OR name LIKE $2 ESCAPE '\\' OR hostname LIKE $2 ESCAPE '\\')
               AND labels::jsonb @> $3::jsonb
               AND ($5::text IS NULL
                    OR ($5 = 'online' AND revoked_at IS NULL AND last_seen >= $6 AND last_seen > COALESCE(disconnected_at, -1))
                    OR ($5 = 'offline' AND revoked_at IS NULL
                        AND (last_seen IS NULL OR last_seen < $6 OR last_seen <= disconnected_at))
                    OR ($5 = 'revoked' AND revoked_at IS NOT NULL))
             ORDER BY id LIMIT $4")
        .bind(filter.after.map(|a| a.to_string()))
        .bind(&like)
        .bind(json_text(&filter.labels))
        .bind(i64::from(filter.limit))
        .bind(status)
        .bind(seen_since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(agent_from_row).collect()
    }

    async fn revoke_agent(&self, id: AgentId, reason: &str, now: Millis, audit: AuditEntry) -> Result<AgentRecord> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE agents SET revoked_at = COALESCE(revoked_at, $1), revoke_reason = COALESCE(revoke_reason, $2),
                    stream_changed_at = $1 WHERE id = $3",
        )
        .bind(now)
        .bind(reason)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(Entity::Agent));
        }
        sqlx::query("UPDATE refresh_tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE agent_id = $2")
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
        let beats = latest_heartbeats(beats);
        if beats.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = beats.iter().map(|b| b.agent_id.to_string()).collect();
        let versions: Vec<Option<&str>> = beats.iter().map(|b| b.version.as_deref()).collect();
        let applied: Vec<Option<&str>> = beats.iter().map(|b| b.applied_config_hash.as_deref()).collect();
        let failed: Vec<Option<&str>> = beats.iter().map(|b| b.failed_config.as_ref().map(|f| f.0.as_str())).collect();
        let errors: Vec<Option<&str>> = beats.iter().map(|b| b.failed_config.as_ref().map(|f| f.1.as_str())).collect();
        let bodies: Vec<&str> = beats.iter().map(|b| b.body.as_str()).collect();
        let at: Vec<Millis> = beats.iter().map(|b| b.at).collect();
        let mut tx = self.begin().await?;
        lock_agents(&mut tx, &ids).await?;
        // One statement for the whole batch. An applied configuration clears
        // the failure recorded before it; an agent deleted meanwhile matches
        // no row and is skipped.
        sqlx::query(
            "UPDATE agents SET version = COALESCE(b.version, agents.version),
                    applied_config_hash = COALESCE(b.applied, agents.applied_config_hash),
                    config_failed_hash = CASE WHEN b.failed IS NOT NULL THEN b.failed
                                              WHEN b.applied IS NOT NULL THEN NULL
                                              ELSE agents.config_failed_hash END,
                    config_error = CASE WHEN b.failed IS NOT NULL THEN b.error
                                        WHEN b.applied IS NOT NULL THEN NULL
                                        ELSE agents.config_error END,
                    heartbeat = b.body, last_seen = GREATEST(COALESCE(agents.last_seen, 0), b.at)
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[])
                  AS b(id, version, applied, failed, error, body, at)
             WHERE agents.id = b.id",
        )
        .bind(&ids)
        .bind(&versions)
        .bind(&applied)
        .bind(&failed)
        .bind(&errors)
        .bind(&bodies)
        .bind(&at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn update_presence(&self, offline_before: Millis, now: Millis) -> Result<Vec<PresenceChange>> {
        let mut tx = self.begin().await?;
        // The candidates come from the partial index of each direction (no
        // row is read when nothing changed); they are locked in id order
        // and re-checked once locked, so of two replicas running this at
        // once, the second finds the row changed and skips it: each
        // transition is recorded, and reported, once. `was` is the state
        // as locked.
        let rows = sqlx::query(
            "WITH due AS (
                 SELECT id, online AS was FROM agents
                 WHERE id IN (SELECT id FROM agents
                              WHERE revoked_at IS NULL AND online IS NOT TRUE AND last_seen >= $1
                                AND last_seen > COALESCE(disconnected_at, -1)
                              UNION ALL
                              SELECT id FROM agents
                              WHERE revoked_at IS NULL AND online IS NOT FALSE AND last_seen < $1
                              UNION ALL
                              SELECT id FROM agents
                              WHERE revoked_at IS NULL AND online IS NOT FALSE AND last_seen IS NULL)
                   AND revoked_at IS NULL AND online IS DISTINCT FROM COALESCE(last_seen >= $1
                                                   AND last_seen > COALESCE(disconnected_at, -1), false)
                 ORDER BY id FOR UPDATE)
             UPDATE agents a SET online = COALESCE(a.last_seen >= $1 AND a.last_seen > COALESCE(a.disconnected_at, -1), false)
             FROM due WHERE a.id = due.id
             RETURNING a.id, a.name, a.hostname, a.labels, a.online, a.last_seen, due.was",
        )
        .bind(offline_before)
        .fetch_all(&mut *tx)
        .await?;
        let mut changes = Vec::new();
        for row in &rows {
            let change = presence_from_row(row)?;
            if row.try_get::<Option<bool>, _>(6)?.is_some() {
                changes.push(change);
            }
        }
        changes.sort_unstable_by_key(|c| c.agent_id);
        for change in &changes {
            super::audit::insert_audit(&mut tx, &presence_audit(change, now)).await?;
        }
        tx.commit().await?;
        Ok(changes)
    }

    async fn disconnect_agent(&self, id: AgentId, at: Millis) -> Result<Option<PresenceChange>> {
        let mut tx = self.begin().await?;
        // The row lock orders this against a presence round on another
        // replica, so the transition is recorded once.
        let row = sqlx::query(
            "WITH gone AS (
                 SELECT id, online AS was, last_seen FROM agents WHERE id = $2 FOR NO KEY UPDATE)
             UPDATE agents a SET disconnected_at = GREATEST(COALESCE(a.disconnected_at, $1), $1),
                                 online = CASE WHEN a.revoked_at IS NULL AND (a.last_seen IS NULL OR a.last_seen <= $1)
                                               THEN false ELSE a.online END
             FROM gone WHERE a.id = gone.id
             RETURNING a.id, a.name, a.hostname, a.labels, false, a.last_seen,
                       (a.revoked_at IS NULL AND gone.was IS NOT FALSE AND (gone.last_seen IS NULL OR gone.last_seen <= $1))",
        )
        .bind(at)
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        let change = match &row {
            Some(row) if row.try_get::<bool, _>(6)? => Some(presence_from_row(row)?),
            _ => None,
        };
        if let Some(change) = &change {
            super::audit::insert_audit(&mut tx, &presence_audit(change, at)).await?;
        }
        tx.commit().await?;
        Ok(change)
    }

    async fn delete_agent(&self, id: AgentId, audit: AuditEntry) -> Result<AgentRecord> {
        let mut tx = self.begin().await?;
        // Its configuration scope goes too: configuration writes first, then
        // the agent's row (as `update_agent` does), the audit head last.
        lock(&mut tx, super::configs::CONFIGS_LOCK).await?;
        let agent = id.to_string();
        // Locked before its children go, so a concurrent write for it (a
        // metric batch, an item report) waits and then finds it gone.
        let rec = q!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = $1 FOR UPDATE")
            .bind(&agent)
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| agent_from_row(&r))
            .transpose()?
            .ok_or(StoreError::NotFound(Entity::Agent))?;
        // A tombstone for the other servers' catch-up; a day is far beyond it.
        sqlx::query("DELETE FROM deleted_agents WHERE deleted_at < $1")
            .bind(audit.ts - 86_400_000)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO deleted_agents (id, epoch, head_seq, floor_seq, deleted_at)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING",
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
        sqlx::query(
            "WITH gone AS (DELETE FROM commands WHERE agent_id = $1 RETURNING batch_id)
             DELETE FROM batches b WHERE b.id IN (SELECT batch_id FROM gone)
               AND NOT EXISTS (SELECT 1 FROM commands c WHERE c.batch_id = b.id AND c.agent_id <> $1)",
        )
        .bind(&agent)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM cert_expiry_announced WHERE serial IN (SELECT serial FROM issued_certs WHERE agent_id = $1)",
        )
        .bind(&agent)
        .execute(&mut *tx)
        .await?;
        for sql in [
            "DELETE FROM metric_points WHERE series_id IN (SELECT id FROM metric_series WHERE agent_id = $1)",
            "DELETE FROM metric_hourly WHERE series_id IN (SELECT id FROM metric_series WHERE agent_id = $1)",
            "DELETE FROM metric_daily WHERE series_id IN (SELECT id FROM metric_series WHERE agent_id = $1)",
            "DELETE FROM metric_series WHERE agent_id = $1",
            "DELETE FROM metric_batches WHERE agent_id = $1",
            "DELETE FROM inventory WHERE agent_id = $1",
            "DELETE FROM signals WHERE agent_id = $1",
            "DELETE FROM agent_items WHERE agent_id = $1",
            "DELETE FROM issued_certs WHERE agent_id = $1",
            "DELETE FROM refresh_tokens WHERE agent_id = $1",
            "DELETE FROM agent_keys WHERE agent_id = $1",
            "DELETE FROM device_grants WHERE agent_id = $1",
            "DELETE FROM request_nonces WHERE agent_id = $1",
            "DELETE FROM agents WHERE id = $1",
        ] {
            sqlx::query(sql).bind(&agent).execute(&mut *tx).await?;
        }
        let scope = tether_proto::config::Scope::Agent(id).to_string();
        for sql in ["DELETE FROM config_versions WHERE scope = $1", "DELETE FROM config_scopes WHERE scope = $1"] {
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
        lock(&mut tx, super::configs::CONFIGS_LOCK).await?;
        let before = active_agent(&mut tx, id).await?;
        let done = sqlx::query(
            "UPDATE agents SET name = COALESCE($1, name), labels = COALESCE($2, labels)
             WHERE id = $3 AND revoked_at IS NULL",
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
        let mut seen = seen.to_vec();
        seen.sort_unstable_by_key(|(id, _)| *id);
        for chunk in seen.chunks(TOUCH_CHUNK) {
            let ids: Vec<String> = chunk.iter().map(|(id, _)| id.to_string()).collect();
            let at: Vec<Millis> = chunk.iter().map(|(_, at)| *at).collect();
            let mut tx = self.begin().await?;
            lock_agents(&mut tx, &ids).await?;
            sqlx::query(
                "UPDATE agents SET last_seen = GREATEST(COALESCE(agents.last_seen, 0), s.at)
                 FROM unnest($1::text[], $2::bigint[]) AS s(id, at) WHERE agents.id = s.id",
            )
            .bind(&ids)
            .bind(&at)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        }
        Ok(())
    }

    async fn stream_changes(&self, since: Millis) -> Result<Vec<StreamChange>> {
        // Deleted agents come as revoked, from their tombstones.
        let rows = q!("SELECT {STREAM_COLUMNS} FROM agents WHERE stream_changed_at >= $1
                       UNION ALL
                       SELECT id, epoch, head_seq, floor_seq, deleted_at, 'deleted', NULL FROM deleted_agents
                       WHERE deleted_at >= $1")
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(stream_change_from_row).collect()
    }
}
