//! Metrics, their rollups and inventory on PostgreSQL. A batch's points
//! travel as arrays (`unnest`), so storing one costs a fixed number of round
//! trips whatever its size: the points and both rollups are one statement.

use std::collections::HashMap;

use async_trait::async_trait;
use sqlx::Row;
use tether_proto::AgentId;
use tether_proto::telemetry::{InventoryItem, InventoryKey, Resolution, Series};

use super::rows::{inventory_from_row, series_point_from_row};
use super::{PgStore, Tx, lock};
use crate::rows::INVENTORY_COLUMNS;
use crate::rules::telemetry::{self as rules, DAY_MS, HOUR_MS, bucket_sql};
use crate::sql::q;
use crate::{
    Entity, FleetCounts, Horizons, InventoryRecord, MetricQuery, MetricsOutcome, Millis, NewMetrics, PruneCounts,
    Result, StoreError, TelemetryStore,
};

/// `NotFound(Agent)` unless the agent exists. Its row is share-locked
/// until commit, so a concurrent `delete_agent` (which locks it for
/// update first) either runs before (this then finds no agent) or after
/// (and deletes what this wrote): nothing is left behind for an agent
/// that is gone.
async fn agent_exists(tx: &mut Tx, agent: &str) -> Result<()> {
    let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM agents WHERE id = $1 FOR KEY SHARE")
        .bind(agent)
        .fetch_optional(&mut **tx)
        .await?;
    found.map(|_| ()).ok_or(StoreError::NotFound(Entity::Agent))
}

/// The agent's series among `names`/`labels`, by key.
async fn find_series(
    tx: &mut Tx,
    agent: &str,
    names: &[&str],
    labels: &[&str],
) -> Result<HashMap<(String, String), i64>> {
    let rows = sqlx::query(
        "SELECT s.id, s.name, s.labels FROM unnest($2::text[], $3::text[]) AS k(name, labels)
         JOIN metric_series s ON s.agent_id = $1 AND s.name = k.name AND s.labels = k.labels",
    )
    .bind(agent)
    .bind(names)
    .bind(labels)
    .fetch_all(&mut **tx)
    .await?;
    rows.iter().map(|r| Ok(((r.try_get(1)?, r.try_get(2)?), r.try_get(0)?))).collect()
}

/// The ids of the agent's series `keys` (in their order), creating the
/// missing ones unless that would take the agent past `max_series`. The
/// cap is decided under a lock on the agent's set of series, so two
/// batches at once cannot both squeeze under it.
async fn series_ids(
    tx: &mut Tx,
    agent: &str,
    keys: &[(String, String)],
    max_series: u32,
    now: Millis,
) -> Result<Vec<i64>> {
    let names: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
    let labels: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
    let mut found = find_series(tx, agent, &names, &labels).await?;
    if found.len() < keys.len() {
        lock(tx, &format!("metric_series:{agent}")).await?;
        found = find_series(tx, agent, &names, &labels).await?;
        let missing: Vec<&(String, String)> = keys.iter().filter(|k| !found.contains_key(*k)).collect();
        if !missing.is_empty() {
            let existing: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM metric_series WHERE agent_id = $1")
                .bind(agent)
                .fetch_one(&mut **tx)
                .await?;
            rules::series_cap(existing as u64, missing.len() as u64, max_series)?;
            let names: Vec<&str> = missing.iter().map(|k| k.0.as_str()).collect();
            let labels: Vec<&str> = missing.iter().map(|k| k.1.as_str()).collect();
            let created = sqlx::query(
                "INSERT INTO metric_series (agent_id, name, labels, created_at)
                 SELECT $1, k.name, k.labels, $4 FROM unnest($2::text[], $3::text[]) AS k(name, labels)
                 RETURNING id, name, labels",
            )
            .bind(agent)
            .bind(&names)
            .bind(&labels)
            .bind(now)
            .fetch_all(&mut **tx)
            .await?;
            for r in &created {
                found.insert((r.try_get(1)?, r.try_get(2)?), r.try_get(0)?);
            }
        }
    }
    keys.iter()
        .map(|k| found.get(k).copied().ok_or_else(|| StoreError::Corrupt(format!("series {k:?} not created"))))
        .collect()
}

/// Upserts inventory items (the last of one key wins) inside `tx`, in
/// key order (the order their rows are locked in).
async fn upsert_items(tx: &mut Tx, agent: &str, items: &[InventoryItem], now: Millis) -> Result<()> {
    let items = rules::last_per_key(items);
    if items.is_empty() {
        return Ok(());
    }
    let kinds: Vec<&str> = items.iter().map(|i| i.kind.as_str()).collect();
    let keys: Vec<&str> = items.iter().map(|i| i.key.as_str()).collect();
    let attrs: Vec<String> = items.iter().map(|i| i.attrs.to_string()).collect();
    sqlx::query(
        "INSERT INTO inventory (agent_id, kind, key, attrs, updated_at)
         SELECT $1, i.kind, i.key, i.attrs, $5 FROM unnest($2::text[], $3::text[], $4::text[]) AS i(kind, key, attrs)
         ON CONFLICT (agent_id, kind, key) DO UPDATE SET attrs = excluded.attrs, updated_at = excluded.updated_at",
    )
    .bind(agent)
    .bind(&kinds)
    .bind(&keys)
    .bind(&attrs)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Adds the rows of the CTE `ins` to the rollup `table` of bucket `width`:
/// one row per series and bucket, taken in that order (so two batches
/// never lock the same buckets in opposite orders).
fn rollup_cte(table: &str, width: i64) -> String {
    let bucket = bucket_sql("ts_ms", width);
    format!(
        "INSERT INTO {table} AS r (series_id, bucket, count, sum, min, max)
         SELECT series_id, {bucket}, count(*), sum(value), min(value), max(value) FROM ins
         GROUP BY 1, 2 ORDER BY 1, 2
         ON CONFLICT (series_id, bucket) DO UPDATE SET count = r.count + excluded.count,
             sum = r.sum + excluded.sum, min = LEAST(r.min, excluded.min), max = GREATEST(r.max, excluded.max)"
    )
}

#[async_trait]
impl TelemetryStore for PgStore {
    async fn store_metrics(&self, batch: NewMetrics<'_>) -> Result<MetricsOutcome> {
        rules::check_points(batch.points)?;
        let agent = batch.agent_id.to_string();
        let (keys, of_point) = rules::index_series(batch.points);
        let mut tx = self.begin().await?;
        agent_exists(&mut tx, &agent).await?;
        // The batch id is claimed first: a concurrent retry of the same
        // batch waits here for this one to commit, then finds it stored.
        let claimed = sqlx::query(
            "INSERT INTO metric_batches (agent_id, batch_id, received_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(&agent)
        .bind(batch.batch_id)
        .bind(batch.now)
        .execute(&mut *tx)
        .await?;
        if claimed.rows_affected() == 0 {
            return Ok(MetricsOutcome::Duplicate);
        }
        let ids = series_ids(&mut tx, &agent, &keys, batch.max_series, batch.now).await?;
        let series: Vec<i64> = of_point.iter().map(|&k| ids[k]).collect();
        let ts: Vec<i64> = batch.points.iter().map(|p| p.ts_ms).collect();
        let values: Vec<f64> = batch.points.iter().map(|p| p.value).collect();
        // The points and the rollups of exactly those inserted, in one
        // statement: `ins` holds only rows the insert wrote.
        let inserted: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "WITH ins AS (
                 INSERT INTO metric_points (series_id, ts_ms, value)
                 SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::float8[])
                 ON CONFLICT DO NOTHING RETURNING series_id, ts_ms, value),
             hourly AS ({hourly}),
             daily AS ({daily})
             SELECT count(*) FROM ins",
            hourly = rollup_cte("metric_hourly", HOUR_MS),
            daily = rollup_cte("metric_daily", DAY_MS),
        )))
        .bind(&series)
        .bind(&ts)
        .bind(&values)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(MetricsOutcome::Stored { points: inserted as u64 })
    }

    async fn query_metrics(&self, query: &MetricQuery) -> Result<(Vec<Series>, bool)> {
        let (table, ts, values) = match query.resolution {
            Resolution::Raw => ("metric_points", "ts_ms", "1::bigint, p.value, p.value, p.value"),
            Resolution::Hour => ("metric_hourly", "bucket", "p.count, p.sum, p.min, p.max"),
            Resolution::Day => ("metric_daily", "bucket", "p.count, p.sum, p.min, p.max"),
        };
        let rows = q!("SELECT s.labels, p.{ts}, {values} FROM metric_series s JOIN {table} p ON p.series_id = s.id
             WHERE s.agent_id = $1 AND s.name = $2 AND p.{ts} >= $3 AND p.{ts} < $4
             ORDER BY s.labels, p.{ts} LIMIT $5")
        .bind(query.agent_id.to_string())
        .bind(&query.name)
        .bind(query.from)
        .bind(query.to)
        .bind(i64::from(query.max_points) + 1)
        .fetch_all(&self.pool)
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
        if !remove.is_empty() {
            let kinds: Vec<&str> = remove.iter().map(|k| k.kind.as_str()).collect();
            let keys: Vec<&str> = remove.iter().map(|k| k.key.as_str()).collect();
            sqlx::query(
                "DELETE FROM inventory WHERE agent_id = $1
                   AND (kind, key) IN (SELECT * FROM unnest($2::text[], $3::text[]))",
            )
            .bind(&agent)
            .bind(&kinds)
            .bind(&keys)
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
        sqlx::query("DELETE FROM inventory WHERE agent_id = $1").bind(&agent).execute(&mut *tx).await?;
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
             WHERE agent_id = $1 AND ($2::text IS NULL OR kind = $2)
               AND ($3::text IS NULL OR (kind, key) > ($3, $4::text))
             ORDER BY kind, key LIMIT $5")
        .bind(agent_id.to_string())
        .bind(kind)
        .bind(after_kind)
        .bind(after_key)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(inventory_from_row).collect()
    }

    async fn prune_history(&self, h: &Horizons, max_rows: u32) -> Result<PruneCounts> {
        super::retention::prune(self, h, max_rows).await
    }

    async fn fleet_counts(&self, seen_since: Millis) -> Result<FleetCounts> {
        let agents = sqlx::query(
            "SELECT COALESCE(SUM(CASE WHEN revoked_at IS NULL AND last_seen >= $1
                                          AND last_seen > COALESCE(disconnected_at, -1) THEN 1 ELSE 0 END), 0),
                    COALESCE(SUM(CASE WHEN revoked_at IS NULL
                                          AND (last_seen IS NULL OR last_seen < $1 OR last_seen <= disconnected_at)
                                     THEN 1 ELSE 0 END), 0),
                    COALESCE(SUM(CASE WHEN revoked_at IS NOT NULL THEN 1 ELSE 0 END), 0)
             FROM agents",
        )
        .bind(seen_since)
        .fetch_one(&self.pool)
        .await?;
        let commands = sqlx::query("SELECT status, COUNT(*) FROM commands GROUP BY status ORDER BY status")
            .fetch_all(&self.pool)
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
