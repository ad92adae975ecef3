//! Commands, batches and the agents' reports on PostgreSQL.

use std::collections::HashMap;
use std::str::FromStr;

use async_trait::async_trait;
use sqlx::Row;
use tether_proto::command::{Batch, Command, CommandStatus, ResultReport, TargetSpec};
use tether_proto::signal::{self, CommandCancelled};
use tether_proto::{AgentId, BatchId, CommandId};

use super::rows::{command_from_row, result_target_from_row};
use super::signals::{append_signal, append_to_many};
use super::{PgStore, Tx};
use crate::audit::AuditEntry;
use crate::rows::{COMMAND_COLUMNS, RESULT_TARGET_COLUMNS};
use crate::rules::commands::{self as rules, LOST_GRACE_MS};
use crate::sql::{ResultGroup, from_millis, json_text, parse_id, q, to_millis};
use crate::{
    AuditFor, CancelOutcome, CommandFilter, CommandStore, CreatedBatch, Entity, Head, Millis, NewBatch, Result,
    ResultOutcome, ResultToRecord, StoreError, SweepOutcome,
};

/// Reads and locks one command: what is decided about it next is decided
/// on its latest committed state, one report or cancel at a time.
async fn lock_command(tx: &mut Tx, id: CommandId) -> Result<Option<Command>> {
    let row = q!("SELECT {COMMAND_COLUMNS} FROM commands WHERE id = $1 FOR UPDATE")
        .bind(id.to_string())
        .fetch_optional(&mut **tx)
        .await?;
    row.map(|r| command_from_row(&r)).transpose()
}

/// The agent's own command, locked, or `NotFound` (someone else's is not theirs to see).
async fn agents_command(tx: &mut Tx, agent_id: AgentId, id: CommandId) -> Result<Command> {
    lock_command(tx, id).await?.filter(|c| c.agent_id == agent_id).ok_or(StoreError::NotFound(Entity::Command))
}

/// Cancels a command already locked by this transaction.
async fn cancel_in_tx(tx: &mut Tx, cmd: &Command, now: Millis) -> Result<Option<Head>> {
    let released: bool = sqlx::query_scalar("SELECT released FROM commands WHERE id = $1")
        .bind(cmd.id.to_string())
        .fetch_one(&mut **tx)
        .await?;
    let tell_agent = rules::cancel(cmd.status, released)?;
    sqlx::query(
        "UPDATE commands SET status = 'cancelled', finished_at = $1, reason = COALESCE(reason, 'cancelled by operator')
         WHERE id = $2",
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

/// The agents a new batch (or assignment) goes to, in id order (the order
/// their streams are then appended to, and so locked in); an `agents`
/// target naming an unknown or revoked agent is `Invalid`.
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
            sqlx::query_scalar("SELECT id FROM agents WHERE revoked_at IS NULL AND id = ANY($1) ORDER BY id")
                .bind(&wanted)
                .fetch_all(&mut **tx)
                .await?
        }
        TargetSpec::Labels(labels) => {
            sqlx::query_scalar(
                "SELECT id FROM agents WHERE revoked_at IS NULL AND labels::jsonb @> $1::jsonb ORDER BY id",
            )
            .bind(json_text(labels))
            .fetch_all(&mut **tx)
            .await?
        }
        TargetSpec::All => {
            sqlx::query_scalar("SELECT id FROM agents WHERE revoked_at IS NULL ORDER BY id")
                .fetch_all(&mut **tx)
                .await?
        }
    };
    ids.iter().map(|id| parse_id(id)).collect()
}

/// Recorded result reports as the columns of one `UPDATE … FROM UNNEST`.
#[derive(Default)]
struct ResultColumns<'a> {
    id: Vec<String>,
    status: Vec<&'static str>,
    exit_code: Vec<Option<i64>>,
    stdout: Vec<&'a str>,
    stderr: Vec<&'a str>,
    output: Vec<String>,
    truncated: Vec<bool>,
    reason: Vec<Option<&'a str>>,
    hash: Vec<Vec<u8>>,
    now: Vec<Millis>,
    started_at: Vec<Option<Millis>>,
}

impl<'a> ResultColumns<'a> {
    fn push(&mut self, id: CommandId, report: &'a ResultReport, now: Millis, hash: &[u8; 32]) {
        self.id.push(id.to_string());
        self.status.push(report.status.as_str());
        self.exit_code.push(report.exit_code.map(i64::from));
        self.stdout.push(&report.stdout);
        self.stderr.push(&report.stderr);
        self.output.push(report.output.to_string());
        self.truncated.push(report.truncated);
        self.reason.push(report.reason.as_deref());
        self.hash.push(hash.to_vec());
        self.now.push(now);
        self.started_at.push(report.started_at.map(to_millis));
    }
}

#[async_trait]
impl CommandStore for PgStore {
    async fn create_batch(&self, batch: NewBatch, audit: AuditFor<'_, CreatedBatch>) -> Result<CreatedBatch> {
        let req = &batch.request;
        let now = batch.now;
        let expires_at = rules::expires_at(req.expires_at.map(to_millis), now)?;
        let held_until = rules::held_until(req.not_before.map(to_millis), now);
        let mut tx = self.begin().await?;
        // The key is unique per creator: the insert either claims it, or waits
        // for a concurrent claim to commit and then finds that batch.
        let inserted = sqlx::query(
            "INSERT INTO batches (id, name, created_by, created_at, target, idempotency_key, request_hash)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
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
            let row =
                sqlx::query("SELECT id, request_hash FROM batches WHERE created_by = $1 AND idempotency_key = $2")
                    .bind(&batch.created_by)
                    .bind(&req.idempotency_key)
                    .fetch_one(&mut *tx)
                    .await?;
            rules::check_replay(&row.try_get::<Vec<u8>, _>(1)?, &batch.request_hash)?;
            let batch_id: String = row.try_get(0)?;
            let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM commands WHERE batch_id = $1 ORDER BY id")
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
        for (ids, agents) in command_ids.chunks(5_000).zip(agent_ids.chunks(5_000)) {
            let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
            let agents: Vec<String> = agents.iter().map(ToString::to_string).collect();
            sqlx::query(
                "INSERT INTO commands (id, batch_id, agent_id, name, args, timeout_s, priority, created_by, status,
                                       released, created_at, not_before, expires_at)
                 SELECT c.id, $1, c.agent_id, $2, $3, $4, $5, $6, 'queued', $7, $8, $9, $10
                 FROM UNNEST($11::text[], $12::text[]) AS c(id, agent_id)",
            )
            .bind(batch.id.to_string())
            .bind(&req.name)
            .bind(req.args.to_string())
            .bind(i64::from(req.timeout_s))
            .bind(i64::from(req.priority))
            .bind(&batch.created_by)
            .bind(held_until.is_none())
            .bind(now)
            .bind(held_until)
            .bind(expires_at)
            .bind(&ids)
            .bind(&agents)
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
        let row = q!("SELECT {COMMAND_COLUMNS} FROM commands WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| command_from_row(&r)).transpose()
    }

    async fn list_commands(&self, filter: &CommandFilter) -> Result<Vec<Command>> {
        let statuses: Vec<&str> = filter.statuses.iter().map(|s| s.as_str()).collect();
        let rows = q!("SELECT {COMMAND_COLUMNS} FROM commands
             WHERE ($1::text IS NULL OR id < $1)
               AND ($2::text IS NULL OR agent_id = $2)
               AND ($3::text IS NULL OR batch_id = $3)
               AND (cardinality($4::text[]) = 0 OR status = ANY($4))
             ORDER BY id DESC LIMIT $5")
        .bind(filter.before.map(|c| c.to_string()))
        .bind(filter.agent_id.map(|a| a.to_string()))
        .bind(filter.batch_id.map(|b| b.to_string()))
        .bind(&statuses)
        .bind(i64::from(filter.limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(command_from_row).collect()
    }

    async fn get_batch(&self, id: BatchId) -> Result<Option<Batch>> {
        let Some(row) = sqlx::query("SELECT name, created_by, created_at FROM batches WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let counts = sqlx::query("SELECT status, COUNT(*) FROM commands WHERE batch_id = $1 GROUP BY status")
            .bind(id.to_string())
            .fetch_all(&self.pool)
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
        let (agents, ids): (Vec<String>, Vec<String>) =
            delivered.iter().map(|(agent, id)| (agent.to_string(), id.to_string())).unzip();
        let done = sqlx::query(
            "UPDATE commands SET status = 'delivered', delivered_at = $1
             FROM UNNEST($2::text[], $3::text[]) AS d(agent_id, id)
             WHERE commands.id = d.id AND commands.agent_id = d.agent_id AND commands.status = 'queued'",
        )
        .bind(now)
        .bind(&agents)
        .bind(&ids)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn take_next_command(&self, agent_id: AgentId, now: Millis) -> Result<Option<Command>> {
        // Two takes at once each get a different command (or none).
        let row = q!("UPDATE commands SET status = 'delivered', delivered_at = $1
             WHERE id = (SELECT id FROM commands
                         WHERE agent_id = $2 AND status = 'queued' AND released AND expires_at > $1
                         ORDER BY priority DESC, id LIMIT 1 FOR UPDATE SKIP LOCKED)
             RETURNING {COMMAND_COLUMNS}")
        .bind(now)
        .bind(agent_id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| command_from_row(&r)).transpose()
    }

    async fn report_running(&self, agent_id: AgentId, id: CommandId, now: Millis) -> Result<Command> {
        let mut tx = self.begin().await?;
        let cmd = agents_command(&mut tx, agent_id, id).await?;
        if !rules::start(cmd.status)? {
            return Ok(cmd);
        }
        let row =
            q!("UPDATE commands SET status = 'running', started_at = $1, delivered_at = COALESCE(delivered_at, $1)
             WHERE id = $2 RETURNING {COMMAND_COLUMNS}")
            .bind(now)
            .bind(id.to_string())
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        command_from_row(&row)
    }

    async fn report_results(&self, reports: &[ResultToRecord<'_>]) -> Result<Vec<Result<ResultOutcome>>> {
        let mut tx = self.begin().await?;
        let ids: Vec<String> = reports.iter().map(|r| r.id.to_string()).collect();
        // In agent order, then id, like a batch cancel: no two transactions
        // locking several commands wait for each other in a cycle.
        let rows =
            q!("SELECT {RESULT_TARGET_COLUMNS} FROM commands WHERE id = ANY($1) ORDER BY agent_id, id FOR UPDATE")
                .bind(&ids)
                .fetch_all(&mut *tx)
                .await?;
        let found = rows.iter().map(result_target_from_row).collect::<Result<HashMap<_, _>>>()?;
        let mut group = ResultGroup::decide(reports, found);
        if !group.writes.is_empty() {
            // Every recorded report in one statement, one row per command.
            let mut cols = ResultColumns::default();
            for &(i, _, hash) in &group.writes {
                let r = group.report(i);
                cols.push(r.id, r.report, r.now, &hash);
            }
            let rows = q!("UPDATE commands SET status = u.r_status, exit_code = u.r_exit_code, stdout = u.r_stdout,
                        stderr = u.r_stderr, output = u.r_output, truncated = u.r_truncated,
                        reason = COALESCE(u.r_reason, reason), result_hash = u.r_hash, finished_at = u.r_now,
                        delivered_at = COALESCE(delivered_at, u.r_now),
                        started_at = COALESCE(started_at, u.r_started_at, u.r_now)
                 FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::boolean[],
                             $8::text[], $9::bytea[], $10::bigint[], $11::bigint[])
                   AS u(r_id, r_status, r_exit_code, r_stdout, r_stderr, r_output, r_truncated, r_reason, r_hash,
                        r_now, r_started_at)
                 WHERE id = u.r_id RETURNING {COMMAND_COLUMNS}")
            .bind(cols.id)
            .bind(cols.status)
            .bind(cols.exit_code)
            .bind(cols.stdout)
            .bind(cols.stderr)
            .bind(cols.output)
            .bind(cols.truncated)
            .bind(cols.reason)
            .bind(cols.hash)
            .bind(cols.now)
            .bind(cols.started_at)
            .fetch_all(&mut *tx)
            .await?;
            for row in &rows {
                group.written(command_from_row(row)?)?;
            }
        }
        let (answers, audits) = group.finish()?;
        super::audit::insert_audits(&mut tx, &audits).await?;
        tx.commit().await?;
        Ok(answers)
    }

    async fn cancel_command(&self, id: CommandId, now: Millis, audit: AuditEntry) -> Result<CancelOutcome> {
        let mut tx = self.begin().await?;
        let cmd = lock_command(&mut tx, id).await?.ok_or(StoreError::NotFound(Entity::Command))?;
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
        let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM batches WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(StoreError::NotFound(Entity::Batch));
        }
        // In agent order, so the streams appended to are locked in id order.
        let rows = q!("SELECT {COMMAND_COLUMNS} FROM commands
             WHERE batch_id = $1 AND status IN ('queued', 'delivered', 'running')
             ORDER BY agent_id, id FOR UPDATE")
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
            "UPDATE commands SET status = 'expired', finished_at = $1 WHERE status = 'queued' AND expires_at <= $1",
        )
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let lost = sqlx::query(
            "UPDATE commands SET status = 'lost', finished_at = $1, reason = 'no result from the agent'
             WHERE (status = 'delivered' AND delivered_at + timeout_s * 1000 + $2 <= $1)
                OR (status = 'running' AND started_at + timeout_s * 1000 + $2 <= $1)",
        )
        .bind(now)
        .bind(LOST_GRACE_MS)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        // In agent order (each agent's in priority order), locking the streams in id order.
        let due = q!("SELECT {COMMAND_COLUMNS} FROM commands
             WHERE status = 'queued' AND NOT released AND not_before <= $1
             ORDER BY agent_id, priority DESC, id LIMIT 1000 FOR UPDATE SKIP LOCKED")
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let mut heads = Vec::with_capacity(due.len());
        for row in &due {
            let c = command_from_row(row)?;
            let reference =
                rules::queued_signal(c.id, &c.name, &c.args, c.timeout_s, c.priority, to_millis(c.expires_at));
            heads.push(append_signal(&mut tx, c.agent_id, signal::COMMAND_QUEUED, &reference, now).await?);
            sqlx::query("UPDATE commands SET released = true WHERE id = $1")
                .bind(c.id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(SweepOutcome { expired, lost, released: due.len() as u64, heads: rules::last_heads(heads) })
    }
}
