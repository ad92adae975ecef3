//! Commands, batches and the agents' reports on SQLite.

use std::collections::HashMap;
use std::str::FromStr;

use async_trait::async_trait;
use sqlx::Row;
use tether_proto::command::{Batch, Command, CommandStatus, TargetSpec};
use tether_proto::signal::{self, CommandCancelled};
use tether_proto::{AgentId, BatchId, CommandId};

use super::rows::{command_from_row, result_target_from_row};
use super::signals::{append_signal, append_to_many};
use super::{SqliteStore, Tx};
use crate::audit::AuditEntry;
use crate::rows::{COMMAND_COLUMNS, RESULT_TARGET_COLUMNS};
use crate::rules::commands::{self as rules, LOST_GRACE_MS};
use crate::sql::{ResultGroup, from_millis, json_text, parse_id, q, to_millis};
use crate::{
    AuditFor, CancelOutcome, CommandFilter, CommandStore, CreatedBatch, Entity, Head, Millis, NewBatch, Result,
    ResultOutcome, ResultToRecord, StoreError, SweepOutcome,
};

async fn load_command(tx: &mut Tx, id: CommandId) -> Result<Option<Command>> {
    let row = q!("SELECT {COMMAND_COLUMNS} FROM commands WHERE id = ?")
        .bind(id.to_string())
        .fetch_optional(&mut **tx)
        .await?;
    row.map(|r| command_from_row(&r)).transpose()
}

/// The agent's own command, or `NotFound` (someone else's is not theirs to see).
async fn agents_command(tx: &mut Tx, agent_id: AgentId, id: CommandId) -> Result<Command> {
    load_command(tx, id).await?.filter(|c| c.agent_id == agent_id).ok_or(StoreError::NotFound(Entity::Command))
}

async fn cancel_in_tx(tx: &mut Tx, cmd: &Command, now: Millis) -> Result<Option<Head>> {
    let released: bool = sqlx::query_scalar("SELECT released FROM commands WHERE id = ?")
        .bind(cmd.id.to_string())
        .fetch_one(&mut **tx)
        .await?;
    let tell_agent = rules::cancel(cmd.status, released)?;
    sqlx::query(
        "UPDATE commands SET status = 'cancelled', finished_at = ?, reason = COALESCE(reason, 'cancelled by operator')
         WHERE id = ?",
    )
    .bind(now)
    .bind(cmd.id.to_string())
    .execute(&mut **tx)
    .await?;
    if !tell_agent {
        return Ok(None);
    }
    let reference = serde_json::to_value(CommandCancelled { command_id: cmd.id }).expect("serializes");
    Ok(Some(append_signal(tx, cmd.agent_id, signal::COMMAND_CANCELLED, &reference, now).await?))
}

/// The agents a new batch (or assignment) goes to, resolved inside its
/// transaction; an `agents` target naming an unknown or revoked agent is
/// `NotFound(Agent)`.
pub(super) async fn resolve_target(tx: &mut Tx, target: &TargetSpec) -> Result<Vec<AgentId>> {
    let found = targeted_agents(tx, target).await?;
    if let TargetSpec::Agents(wanted) = target {
        rules::missing_agent(wanted, &found)?;
    }
    Ok(found)
}

/// The active agents a target reaches now, in id order.
pub(super) async fn targeted_agents(tx: &mut Tx, target: &TargetSpec) -> Result<Vec<AgentId>> {
    let ids: Vec<String> = match target {
        TargetSpec::Agents(ids) => {
            let wanted: Vec<String> = ids.iter().map(ToString::to_string).collect();
            sqlx::query_scalar(
                "SELECT id FROM agents WHERE revoked_at IS NULL AND id IN (SELECT value FROM json_each(?)) ORDER BY id",
            )
            .bind(json_text(&wanted))
            .fetch_all(&mut **tx)
            .await?
        }
        TargetSpec::Labels(labels) => {
            sqlx::query_scalar(
                "SELECT id FROM agents WHERE revoked_at IS NULL
                   AND NOT EXISTS (SELECT 1 FROM json_each(?) l WHERE json_extract(agents.labels, '$.\"' || l.key || '\"') IS NOT l.value)
                 ORDER BY id",
            )
            .bind(json_text(labels))
            .fetch_all(&mut **tx)
            .await?
        }
        TargetSpec::All => {
            sqlx::query_scalar("SELECT id FROM agents WHERE revoked_at IS NULL ORDER BY id").fetch_all(&mut **tx).await?
        }
    };
    ids.iter().map(|id| parse_id(id)).collect()
}

#[async_trait]
impl CommandStore for SqliteStore {
    async fn create_batch(&self, batch: NewBatch, audit: AuditFor<'_, CreatedBatch>) -> Result<CreatedBatch> {
        let req = &batch.request;
        let now = batch.now;
        let expires_at = rules::expires_at(req.expires_at.map(to_millis), now)?;
        let held_until = rules::held_until(req.not_before.map(to_millis), now);
        let mut tx = self.begin().await?;
        // The key is unique per creator: the insert either claims it or finds the batch that did.
        let inserted = sqlx::query(
            "INSERT INTO batches (id, name, created_by, created_at, target, idempotency_key, request_hash)
             VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(batch.id.to_string())
        .bind(&req.name)
        .bind(&batch.created_by)
        .bind(now)
        .bind(json_text(&req.target))
        .bind(&req.idempotency_key)
        .bind(&batch.request_hash[..])
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            let row = sqlx::query("SELECT id, request_hash FROM batches WHERE created_by = ? AND idempotency_key = ?")
                .bind(&batch.created_by)
                .bind(&req.idempotency_key)
                .fetch_one(&mut *tx)
                .await?;
            rules::check_replay(&row.try_get::<Vec<u8>, _>(1)?, &batch.request_hash)?;
            let batch_id: String = row.try_get(0)?;
            let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM commands WHERE batch_id = ? ORDER BY id")
                .bind(&batch_id)
                .fetch_all(&mut *tx)
                .await?;
            return Ok(CreatedBatch {
                batch_id: parse_id(&batch_id)?,
                command_ids: ids.iter().map(|s| parse_id(s)).collect::<Result<_>>()?,
                created: false,
                heads: Vec::new(),
            });
        }
        let agent_ids = resolve_target(&mut tx, &batch.target).await?;
        let command_ids: Vec<CommandId> = agent_ids.iter().map(|_| CommandId::new()).collect();
        // One statement per 5,000 commands, not one per agent.
        let rows: Vec<(String, String)> =
            command_ids.iter().zip(&agent_ids).map(|(id, agent)| (id.to_string(), agent.to_string())).collect();
        for chunk in rows.chunks(5_000) {
            sqlx::query(
                "INSERT INTO commands (id, batch_id, agent_id, name, args, timeout_s, priority, created_by, status,
                                       released, created_at, not_before, expires_at)
                 SELECT c.value ->> '$[0]', ?, c.value ->> '$[1]', ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?
                 FROM json_each(?) c",
            )
            .bind(batch.id.to_string())
            .bind(&req.name)
            .bind(req.args.to_string())
            .bind(req.timeout_s)
            .bind(req.priority)
            .bind(&batch.created_by)
            .bind(held_until.is_none())
            .bind(now)
            .bind(held_until)
            .bind(expires_at)
            .bind(json_text(&chunk))
            .execute(&mut *tx)
            .await?;
        }
        let heads = match held_until {
            Some(_) => Vec::new(),
            None => {
                let reference = rules::queued_signals(&command_ids, req, expires_at);
                append_to_many(&mut tx, &agent_ids, signal::COMMAND_QUEUED, &reference, now).await?
            }
        };
        let created = CreatedBatch { batch_id: batch.id, command_ids, created: true, heads };
        super::audit::insert_audit(&mut tx, &audit(&created)).await?;
        tx.commit().await?;
        Ok(created)
    }

    async fn get_command(&self, id: CommandId) -> Result<Option<Command>> {
        let row = q!("SELECT {COMMAND_COLUMNS} FROM commands WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await?;
        row.map(|r| command_from_row(&r)).transpose()
    }

    async fn list_commands(&self, filter: &CommandFilter) -> Result<Vec<Command>> {
        let statuses: Vec<&str> = filter.statuses.iter().map(|s| s.as_str()).collect();
        let before = filter.before.map(|c| c.to_string());
        let agent = filter.agent_id.map(|a| a.to_string());
        let batch = filter.batch_id.map(|b| b.to_string());
        let rows = q!("SELECT {COMMAND_COLUMNS} FROM commands
             WHERE (? IS NULL OR id < ?)
               AND (? IS NULL OR agent_id = ?)
               AND (? IS NULL OR batch_id = ?)
               AND (? = 0 OR status IN (SELECT value FROM json_each(?)))
             ORDER BY id DESC LIMIT ?")
        .bind(&before)
        .bind(&before)
        .bind(&agent)
        .bind(&agent)
        .bind(&batch)
        .bind(&batch)
        .bind(statuses.len() as i64)
        .bind(json_text(&statuses))
        .bind(filter.limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(command_from_row).collect()
    }

    async fn get_batch(&self, id: BatchId) -> Result<Option<Batch>> {
        let Some(row) = sqlx::query("SELECT name, created_by, created_at FROM batches WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await?
        else {
            return Ok(None);
        };
        let counts = sqlx::query("SELECT status, COUNT(*) FROM commands WHERE batch_id = ? GROUP BY status")
            .bind(id.to_string())
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(|r| {
                let status = CommandStatus::from_str(r.try_get(0)?).map_err(StoreError::Corrupt)?;
                Ok((status, r.try_get::<i64, _>(1)? as u64))
            })
            .collect::<Result<Vec<_>>>()?;
        let (total, counts, status) = rules::batch_progress(counts);
        Ok(Some(Batch {
            id,
            name: row.try_get(0)?,
            created_by: row.try_get(1)?,
            created_at: from_millis(row.try_get(2)?)?,
            total,
            counts,
            status,
        }))
    }

    async fn mark_delivered(&self, delivered: &[(AgentId, CommandId)], now: Millis) -> Result<u64> {
        if delivered.is_empty() {
            return Ok(0);
        }
        let pairs: Vec<[String; 2]> = delivered.iter().map(|(agent, id)| [id.to_string(), agent.to_string()]).collect();
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            // A row-value IN, not a join: the planner then looks each pair up by
            // `id` instead of matching every queued command against the list.
            "UPDATE commands SET status = 'delivered', delivered_at = ?
             WHERE status = 'queued' AND (id, agent_id) IN (SELECT value ->> 0, value ->> 1 FROM json_each(?))",
        )
        .bind(now)
        .bind(json_text(&pairs))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    async fn take_next_command(&self, agent_id: AgentId, now: Millis) -> Result<Option<Command>> {
        let mut tx = self.begin().await?;
        let row = q!("UPDATE commands SET status = 'delivered', delivered_at = ?
             WHERE id = (SELECT id FROM commands
                         WHERE agent_id = ? AND status = 'queued' AND released = 1 AND expires_at > ?
                         ORDER BY priority DESC, id LIMIT 1)
             RETURNING {COMMAND_COLUMNS}")
        .bind(now)
        .bind(agent_id.to_string())
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        row.map(|r| command_from_row(&r)).transpose()
    }

    async fn report_running(&self, agent_id: AgentId, id: CommandId, now: Millis) -> Result<Command> {
        let mut tx = self.begin().await?;
        let cmd = agents_command(&mut tx, agent_id, id).await?;
        if !rules::start(cmd.status)? {
            return Ok(cmd);
        }
        let row = q!("UPDATE commands SET status = 'running', started_at = ?, delivered_at = COALESCE(delivered_at, ?)
             WHERE id = ? RETURNING {COMMAND_COLUMNS}")
        .bind(now)
        .bind(now)
        .bind(id.to_string())
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        command_from_row(&row)
    }

    async fn report_results(&self, reports: &[ResultToRecord<'_>]) -> Result<Vec<Result<ResultOutcome>>> {
        let mut tx = self.begin().await?;
        let ids = json_text(&reports.iter().map(|r| r.id).collect::<Vec<_>>());
        let rows = q!("SELECT {RESULT_TARGET_COLUMNS} FROM commands WHERE id IN (SELECT value FROM json_each(?))")
            .bind(ids)
            .fetch_all(&mut *tx)
            .await?;
        let found = rows.iter().map(result_target_from_row).collect::<Result<HashMap<_, _>>>()?;
        let mut group = ResultGroup::decide(reports, found);
        for &(i, _, hash) in &group.writes.clone() {
            let r = group.report(i);
            let report = r.report;
            let row =
                q!("UPDATE commands SET status = ?, exit_code = ?, stdout = ?, stderr = ?, output = ?, truncated = ?,
                        reason = COALESCE(?, reason), result_hash = ?, finished_at = ?,
                        delivered_at = COALESCE(delivered_at, ?), started_at = COALESCE(started_at, ?, ?)
                 WHERE id = ? RETURNING {COMMAND_COLUMNS}")
                .bind(report.status.as_str())
                .bind(report.exit_code)
                .bind(&report.stdout)
                .bind(&report.stderr)
                .bind(report.output.to_string())
                .bind(report.truncated)
                .bind(&report.reason)
                .bind(&hash[..])
                .bind(r.now)
                .bind(r.now)
                .bind(report.started_at.map(to_millis))
                .bind(r.now)
                .bind(r.id.to_string())
                .fetch_one(&mut *tx)
                .await?;
            group.written(command_from_row(&row)?)?;
        }
        let (answers, audits) = group.finish()?;
        super::audit::insert_audits(&mut tx, &audits).await?;
        tx.commit().await?;
        Ok(answers)
    }

    async fn cancel_command(&self, id: CommandId, now: Millis, audit: AuditEntry) -> Result<CancelOutcome> {
        let mut tx = self.begin().await?;
        let cmd = load_command(&mut tx, id).await?.ok_or(StoreError::NotFound(Entity::Command))?;
        let head = cancel_in_tx(&mut tx, &cmd, now).await?;
        super::audit::insert_audit(&mut tx, &audit).await?;
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
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(StoreError::NotFound(Entity::Batch));
        }
        let rows = q!(
            "SELECT {COMMAND_COLUMNS} FROM commands WHERE batch_id = ? AND status IN ('queued', 'delivered', 'running')"
        )
        .bind(id.to_string())
        .fetch_all(&mut *tx)
        .await?;
        let mut out = CancelOutcome { cancelled: Vec::new(), heads: Vec::new() };
        for row in &rows {
            let cmd = command_from_row(row)?;
            out.heads.extend(cancel_in_tx(&mut tx, &cmd, now).await?);
            out.cancelled.push(cmd.id);
        }
        out.heads = rules::last_heads(out.heads);
        super::audit::insert_audit(&mut tx, &audit(&out)).await?;
        tx.commit().await?;
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
        let lost = sqlx::query(
            "UPDATE commands SET status = 'lost', finished_at = ?, reason = 'no result from the agent'
             WHERE (status = 'delivered' AND delivered_at + timeout_s * 1000 + ? <= ?)
                OR (status = 'running' AND started_at + timeout_s * 1000 + ? <= ?)",
        )
        .bind(now)
        .bind(LOST_GRACE_MS)
        .bind(now)
        .bind(LOST_GRACE_MS)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        // In agent order, each agent's in priority order, as on PostgreSQL.
        let due =
            q!("SELECT {COMMAND_COLUMNS} FROM commands WHERE status = 'queued' AND released = 0 AND not_before <= ?
             ORDER BY agent_id, priority DESC, id LIMIT 1000")
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
        let mut heads = Vec::with_capacity(due.len());
        for row in &due {
            let c = command_from_row(row)?;
            let reference =
                rules::queued_signal(c.id, &c.name, &c.args, c.timeout_s, c.priority, to_millis(c.expires_at));
            heads.push(append_signal(&mut tx, c.agent_id, signal::COMMAND_QUEUED, &reference, now).await?);
            sqlx::query("UPDATE commands SET released = 1 WHERE id = ?")
                .bind(c.id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(SweepOutcome { expired, lost, released: due.len() as u64, heads: rules::last_heads(heads) })
    }
}
