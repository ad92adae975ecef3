//! Retention on SQLite: each kind of history past its horizon is deleted
//! in bounded steps, one short `BEGIN IMMEDIATE` transaction per kind, so
//! the single writer is never held long.

use sqlx::Row;
use tether_proto::command::CommandStatus;

use super::{SqliteStore, Tx};
use crate::rules::telemetry::audit_prefix;
use crate::sql::{json_text, q};
use crate::{Horizons, PruneCounts, Result};

/// Deletes up to `max` rows of `table` whose `column` is before `before`,
/// by primary key (`key`, a column list).
async fn prune_by(store: &SqliteStore, table: &str, key: &str, column: &str, before: i64, max: u32) -> Result<u64> {
    let mut tx = store.begin().await?;
    let done = q!("DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table} WHERE {column} < ? LIMIT ?)")
        .bind(before)
        .bind(max)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(done.rows_affected())
}

/// Of `batches`, those left without commands: a batch is shared by the
/// commands of many agents, so it goes only with its last command.
pub(super) async fn delete_empty_batches(tx: &mut Tx, batches: &[String]) -> Result<()> {
    sqlx::query(
        "DELETE FROM batches WHERE id IN (SELECT value FROM json_each(?))
           AND NOT EXISTS (SELECT 1 FROM commands c WHERE c.batch_id = batches.id)",
    )
    .bind(json_text(&batches))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Commands in a terminal state that finished before `before`, and any
/// batch they leave without commands.
async fn prune_commands(store: &SqliteStore, before: i64, max: u32) -> Result<u64> {
    let terminal: Vec<&str> = CommandStatus::ALL.into_iter().filter(|s| s.is_terminal()).map(|s| s.as_str()).collect();
    let mut tx = store.begin().await?;
    let batches: Vec<String> = sqlx::query_scalar(
        "DELETE FROM commands WHERE id IN (
             SELECT id FROM commands
             WHERE finished_at < ? AND status IN (SELECT value FROM json_each(?)) LIMIT ?)
         RETURNING batch_id",
    )
    .bind(before)
    .bind(json_text(&terminal))
    .bind(max)
    .fetch_all(&mut *tx)
    .await?;
    delete_empty_batches(&mut tx, &batches).await?;
    tx.commit().await?;
    Ok(batches.len() as u64)
}

/// The oldest audit rows before `before`, as a prefix of the chain; the
/// last one deleted becomes the anchor verification starts from.
async fn prune_audit(store: &SqliteStore, before: i64, max: u32) -> Result<u64> {
    let mut tx = store.begin().await?;
    let oldest =
        sqlx::query("SELECT id, ts, hash FROM audit ORDER BY id LIMIT ?").bind(max).fetch_all(&mut *tx).await?;
    let ts = oldest.iter().map(|r| r.try_get(1)).collect::<Result<Vec<i64>, _>>()?;
    let n = audit_prefix(&ts, before);
    let Some(last) = n.checked_sub(1).map(|i| &oldest[i]) else { return Ok(0) };
    let (id, hash): (i64, Vec<u8>) = (last.try_get(0)?, last.try_get(2)?);
    let done = sqlx::query("DELETE FROM audit WHERE id <= ?").bind(id).execute(&mut *tx).await?;
    sqlx::query(
        "INSERT INTO audit_anchor (singleton, id, hash) VALUES (1, ?, ?)
         ON CONFLICT (singleton) DO UPDATE SET id = excluded.id, hash = excluded.hash",
    )
    .bind(id)
    .bind(hash)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(done.rows_affected())
}

pub(super) async fn prune(store: &SqliteStore, h: &Horizons, max: u32) -> Result<PruneCounts> {
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
