//! Metrics, their rollups and inventory on SQLite. A batch is one
//! `BEGIN IMMEDIATE` transaction of prepared statements run in a loop
//! (sqlx keeps them prepared on the writer); points go [`POINTS_PER_INSERT`]
//! to a statement, since each statement is a hop to sqlx's SQLite worker
//! thread, which one point per statement made the cost of a batch.

use std::collections::HashMap;

use async_trait::async_trait;
use sqlx::Row;
use tether_proto::AgentId;
use tether_proto::telemetry::{InventoryItem, InventoryKey, Resolution, Series};

use super::rows::{inventory_from_row, series_point_from_row};
use super::{SqliteStore, Tx};
use crate::rows::INVENTORY_COLUMNS;
use crate::rules::telemetry::{self as rules, DAY_MS, HOUR_MS};
use crate::sql::{json_text, q};
use crate::{
    Entity, FleetCounts, Horizons, InventoryRecord, MetricQuery, MetricsOutcome, Millis, NewMetrics, PruneCounts,
    Result, StoreError, TelemetryStore,
};

/// Points per insert statement: 3 parameters each, well under SQLite's
/// parameter limit.
const POINTS_PER_INSERT: usize = 500;

/// `NotFound(Agent)` unless the agent exists.
async fn agent_exists(tx: &mut Tx, agent: &str) -> Result<()> {
    let found: Option<i64> =
        sqlx::query_scalar("SELECT 1 FROM agents WHERE id = ?").bind(agent).fetch_optional(&mut **tx).await?;
    found.map(|_| ()).ok_or(StoreError::NotFound(Entity::Agent))
}

/// The ids of the agent's series `keys` (in their order), creating the
/// missing ones unless that would take the agent past `max_series`.
async fn series_ids(
    tx: &mut Tx,
    agent: &str,
    keys: &[(String, String)],
    max_series: u32,
    now: Millis,
) -> Result<Vec<i64>> {
    let rows = sqlx::query(
        "SELECT id, name, labels FROM metric_series
         WHERE agent_id = ? AND (name, labels) IN (SELECT value ->> 0, value ->> 1 FROM json_each(?))",
    )
    .bind(agent)
    .bind(json_text(keys))
    .fetch_all(&mut **tx)
    .await?;
    let mut found = HashMap::with_capacity(rows.len());
    for r in &rows {
        found.insert((r.try_get::<String, _>(1)?, r.try_get::<String, _>(2)?), r.try_get::<i64, _>(0)?);
    }
    let missing: Vec<&(String, String)> = keys.iter().filter(|k| !found.contains_key(*k)).collect();
    if !missing.is_empty() {
        let existing: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM metric_series WHERE agent_id = ?")
            .bind(agent)
            .fetch_one(&mut **tx)
            .await?;
        rules::series_cap(existing as u64, missing.len() as u64, max_series)?;
        for key in missing {
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO metric_series (agent_id, name, labels, created_at) VALUES (?, ?, ?, ?) RETURNING id",
            )
            .bind(agent)
            .bind(&key.0)
            .bind(&key.1)
            .bind(now)
            .fetch_one(&mut **tx)
            .await?;
            found.insert(key.clone(), id);
        }
    }
    Ok(keys.iter().map(|k| found[k]).collect())
}

/// Upserts inventory items (the last of one key wins) inside `tx`.
async fn upsert_items(tx: &mut Tx, agent: &str, items: &[InventoryItem], now: Millis) -> Result<()> {
    for item in rules::last_per_key(items) {
        sqlx::query(
            "INSERT INTO inventory (agent_id, kind, key, attrs, updated_at) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (agent_id, kind, key) DO UPDATE SET attrs = excluded.attrs, updated_at = excluded.updated_at",
        )
        .bind(agent)
        .bind(&item.kind)
        .bind(&item.key)
        .bind(item.attrs.to_string())
        .bind(now)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

#[async_trait]
impl TelemetryStore for SqliteStore {
    async fn store_metrics(&self, batch: NewMetrics<'_>) -> Result<MetricsOutcome> {
        rules::check_points(batch.points)?;
        let agent = batch.agent_id.to_string();
        let mut tx = self.begin().await?;
        agent_exists(&mut tx, &agent).await?;
        let claimed = sqlx::query(
            "INSERT INTO metric_batches (agent_id, batch_id, received_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(&agent)
        .bind(batch.batch_id)
        .bind(batch.now)
        .execute(&mut *tx)
        .await?;
        if claimed.rows_affected() == 0 {
            return Ok(MetricsOutcome::Duplicate);
        }
        let (keys, of_point) = rules::index_series(batch.points);
        let ids = series_ids(&mut tx, &agent, &keys, batch.max_series, batch.now).await?;
        let series: Vec<i64> = of_point.iter().map(|&k| ids[k]).collect();
        let mut inserted = Vec::with_capacity(batch.points.len());
        for (points, series) in batch.points.chunks(POINTS_PER_INSERT).zip(series.chunks(POINTS_PER_INSERT)) {
            // One prepared statement per chunk size; RETURNING names only
            // the rows the insert wrote (not those already there).
            let values = vec!["(?, ?, ?)"; points.len()].join(", ");
            let mut insert = q!("INSERT INTO metric_points (series_id, ts_ms, value) VALUES {values}
                 ON CONFLICT DO NOTHING RETURNING series_id, ts_ms, value");
            for (p, s) in points.iter().zip(series) {
                insert = insert.bind(*s).bind(p.ts_ms).bind(p.value);
            }
            for r in insert.fetch_all(&mut *tx).await? {
                inserted.push((r.try_get::<i64, _>(0)?, r.try_get::<i64, _>(1)?, r.try_get::<f64, _>(2)?));
            }
        }
        // Each bucket is written once per batch, from the aggregate of
        // exactly the points inserted above.
        for (table, width) in [("metric_hourly", HOUR_MS), ("metric_daily", DAY_MS)] {
            for ((series, bucket), agg) in rules::rollup(&inserted, width) {
                q!("INSERT INTO {table} (series_id, bucket, count, sum, min, max) VALUES (?, ?, ?, ?, ?, ?)
                     ON CONFLICT (series_id, bucket) DO UPDATE SET count = count + excluded.count,
                         sum = sum + excluded.sum, min = MIN(min, excluded.min), max = MAX(max, excluded.max)")
                .bind(series)
                .bind(bucket)
                .bind(agg.count as i64)
                .bind(agg.sum)
                .bind(agg.min)
                .bind(agg.max)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(MetricsOutcome::Stored { points: inserted.len() as u64 })
    }

    async fn query_metrics(&self, query: &MetricQuery) -> Result<(Vec<Series>, bool)> {
        let (table, ts, values) = match query.resolution {
            Resolution::Raw => ("metric_points", "ts_ms", "1, p.value, p.value, p.value"),
            Resolution::Hour => ("metric_hourly", "bucket", "p.count, p.sum, p.min, p.max"),
            Resolution::Day => ("metric_daily", "bucket", "p.count, p.sum, p.min, p.max"),
        };
        let rows = q!("SELECT s.labels, p.{ts}, {values} FROM metric_series s JOIN {table} p ON p.series_id = s.id
             WHERE s.agent_id = ? AND s.name = ? AND p.{ts} >= ? AND p.{ts} < ?
             ORDER BY s.labels, p.{ts} LIMIT ?")
        .bind(query.agent_id.to_string())
        .bind(&query.name)
        .bind(query.from)
        .bind(query.to)
        .bind(i64::from(query.max_points) + 1)
        .fetch_all(&self.reader)
        .await?;
        rules::assemble_series(rows.iter().map(series_point_from_row), query.max_points)
    }

    async fn change_inventory(
        &self,
        agent_id: AgentId,
        upsert: &[InventoryItem],
        remove: &[InventoryKey],
        now: Millis,
    ) -> Result<()> {
        let agent = agent_id.to_string();
        let mut tx = self.begin().await?;
        agent_exists(&mut tx, &agent).await?;
        upsert_items(&mut tx, &agent, upsert, now).await?;
        for key in remove {
            sqlx::query("DELETE FROM inventory WHERE agent_id = ? AND kind = ? AND key = ?")
                .bind(&agent)
                .bind(&key.kind)
                .bind(&key.key)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn replace_inventory(&self, agent_id: AgentId, items: &[InventoryItem], now: Millis) -> Result<()> {
        let agent = agent_id.to_string();
        let mut tx = self.begin().await?;
        agent_exists(&mut tx, &agent).await?;
        sqlx::query("DELETE FROM inventory WHERE agent_id = ?").bind(&agent).execute(&mut *tx).await?;
        upsert_items(&mut tx, &agent, items, now).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_inventory(
        &self,
        agent_id: AgentId,
        kind: Option<&str>,
        after: Option<(String, String)>,
        limit: u32,
    ) -> Result<Vec<InventoryRecord>> {
        let (after_kind, after_key) = after.unzip();
        let rows = q!("SELECT {INVENTORY_COLUMNS} FROM inventory
             WHERE agent_id = ?1 AND (?2 IS NULL OR kind = ?2) AND (?3 IS NULL OR (kind, key) > (?3, ?4))
             ORDER BY kind, key LIMIT ?5")
        .bind(agent_id.to_string())
        .bind(kind)
        .bind(after_kind)
        .bind(after_key)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(inventory_from_row).collect()
    }

    async fn prune_history(&self, h: &Horizons, max_rows: u32) -> Result<PruneCounts> {
        super::retention::prune(self, h, max_rows).await
    }

    async fn fleet_counts(&self, seen_since: Millis) -> Result<FleetCounts> {
        let agents = sqlx::query(
            "SELECT COALESCE(SUM(CASE WHEN revoked_at IS NULL AND last_seen >= ?1
                                          AND last_seen > COALESCE(disconnected_at, -1) THEN 1 ELSE 0 END), 0),
                    COALESCE(SUM(CASE WHEN revoked_at IS NULL
                                          AND (last_seen IS NULL OR last_seen < ?1 OR last_seen <= disconnected_at)
                                     THEN 1 ELSE 0 END), 0),
                    COALESCE(SUM(CASE WHEN revoked_at IS NOT NULL THEN 1 ELSE 0 END), 0)
             FROM agents",
        )
        .bind(seen_since)
        .fetch_one(&self.reader)
        .await?;
        let commands = sqlx::query("SELECT status, COUNT(*) FROM commands GROUP BY status ORDER BY status")
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<i64, _>(1)? as u64)))
            .collect::<Result<Vec<_>>>()?;
        Ok(FleetCounts {
            agents_online: agents.try_get::<i64, _>(0)? as u64,
            agents_offline: agents.try_get::<i64, _>(1)? as u64,
            agents_revoked: agents.try_get::<i64, _>(2)? as u64,
            commands,
        })
    }
}
