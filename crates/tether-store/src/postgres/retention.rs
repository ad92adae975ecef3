//! Retention on PostgreSQL: each kind of history past its horizon is
//! deleted in bounded steps, one short transaction per kind, so no lock is
//! held long. Audit pruning takes the chain head lock appends take, so it
//! never races an append.

use sqlx::Row;
use tether_proto::command::CommandStatus;

use super::PgStore;
use crate::rules::telemetry::audit_prefix;
use crate::sql::q;
use crate::{Horizons, PruneCounts, Result};

/// Deletes up to `max` rows of `table` whose `column` is before `before`,
/// matched back by primary key (`key`, a column list).
async fn prune_by(store: &PgStore, table: &str, key: &str, column: &str, before: i64, max: u32) -> Result<u64> {
    let done = q!("DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table} WHERE {column} < $1 LIMIT $2)")
        .bind(before)
        .bind(i64::from(max))
        .execute(&store.pool)
        .await?;
    Ok(done.rows_affected())
}

/// Commands in a terminal state that finished before `before`, and any
/// batch they leave without commands.
async fn prune_commands(store: &PgStore, before: i64, max: u32) -> Result<u64> {
    let terminal: Vec<&str> = CommandStatus::ALL.into_iter().filter(|s| s.is_terminal()).map(|s| s.as_str()).collect();
    let gone: i64 = sqlx::query_scalar(
        "WITH gone AS (
             DELETE FROM commands WHERE id IN (
                 SELECT id FROM commands WHERE finished_at < $1 AND status = ANY($2) LIMIT $3)
             RETURNING id, batch_id),
         empty AS (
             DELETE FROM batches b WHERE b.id IN (SELECT batch_id FROM gone)
               AND NOT EXISTS (SELECT 1 FROM commands c
                               WHERE c.batch_id = b.id AND c.id NOT IN (SELECT id FROM gone)))
         SELECT count(*) FROM gone",
    )
    .bind(before)
    .bind(&terminal)
    .bind(i64::from(max))
    .fetch_one(&store.pool)
    .await?;
    Ok(gone as u64)
}

/// The oldest audit rows before `before`, as a prefix of the chain; the
/// last one deleted becomes the anchor verification starts from. Under the
/// chain head lock, so no append runs meanwhile.
async fn prune_audit(store: &PgStore, before: i64, max: u32) -> Result<u64> {
    let mut tx = store.begin().await?;
    sqlx::query("SELECT 1 FROM audit_head WHERE singleton FOR UPDATE").execute(&mut *tx).await?;
    let oldest = sqlx::query("SELECT id, ts, hash FROM audit ORDER BY id LIMIT $1")
        .bind(i64::from(max))
        .fetch_all(&mut *tx)
        .await?;
    let ts = oldest.iter().map(|r| r.try_get(1)).collect::<Result<Vec<i64>, _>>()?;
    let n = audit_prefix(&ts, before);
    let Some(last) = n.checked_sub(1).map(|i| &oldest[i]) else { return Ok(0) };
    let (id, hash): (i64, Vec<u8>) = (last.try_get(0)?, last.try_get(2)?);
    let done = sqlx::query("DELETE FROM audit WHERE id <= $1").bind(id).execute(&mut *tx).await?;
    sqlx::query(
        "INSERT INTO audit_anchor (singleton, id, hash) VALUES (true, $1, $2)
         ON CONFLICT (singleton) DO UPDATE SET id = excluded.id, hash = excluded.hash",
    )
    .bind(id)
    .bind(hash)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(done.rows_affected())
}

pub(super) async fn prune(store: &PgStore, h: &Horizons, max: u32) -> Result<PruneCounts> {
    Ok(PruneCounts {
        raw: prune_by(store, "metric_points", "series_id, ts_ms", "ts_ms", h.raw_metrics_before, max).await?,
        hourly: prune_by(store, "metric_hourly", "series_id, bucket", "bucket", h.hourly_before, max).await?,
        daily: prune_by(store, "metric_daily", "series_id, bucket", "bucket", h.daily_before, max).await?,
        batches: prune_by(store, "metric_batches", "agent_id, batch_id", "received_at", h.metric_batches_before, max)
            .await?,
        commands: prune_commands(store, h.finished_commands_before, max).await?,
        audit: prune_audit(store, h.audit_before, max).await?,
    })
}
