//! The agents' streams on SQLite.

use std::collections::HashMap;

use async_trait::async_trait;
use sqlx::Row;
use tether_proto::{AgentId, Signal};

use super::{SqliteStore, Tx};
use crate::sql::{References, json_text, parse_id, parse_json};
use crate::{Head, Millis, Result, SignalStore};

/// Appends one signal to an agent's stream inside `tx`. The head moves in
/// the same transaction as the insert, so a stream is gap-free.
pub(super) async fn append_signal(
    tx: &mut Tx,
    agent_id: AgentId,
    kind: &str,
    reference: &serde_json::Value,
    now: Millis,
) -> Result<Head> {
    let row = sqlx::query(
        "UPDATE agents SET head_seq = head_seq + 1, stream_changed_at = ? WHERE id = ? RETURNING head_seq, epoch",
    )
    .bind(now)
    .bind(agent_id.to_string())
    .fetch_one(&mut **tx)
    .await?;
    let seq: i64 = row.try_get(0)?;
    let epoch: i64 = row.try_get(1)?;
    sqlx::query("INSERT INTO signals (agent_id, seq, kind, ts_ms, ref) VALUES (?, ?, ?, ?, ?)")
        .bind(agent_id.to_string())
        .bind(seq)
        .bind(kind)
        .bind(now)
        .bind(reference.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(Head { agent_id, epoch: epoch as u64, seq: seq as u64 })
}

/// Agents given one signal per statement pair by [`append_to_many`].
const FAN_OUT_CHUNK: usize = 5_000;

/// Appends a signal of `kind` to many agents' streams inside `tx`, in
/// bulk: two statements per 5,000 agents, never one round trip per agent.
/// `reference(i)` is the JSON text of the signal for `agents[i]`.
pub(super) async fn append_to_many(
    tx: &mut Tx,
    agents: &[AgentId],
    kind: &str,
    reference: &References<'_>,
    now: Millis,
) -> Result<Vec<Head>> {
    let index: HashMap<AgentId, usize> = agents.iter().enumerate().map(|(i, a)| (*a, i)).collect();
    let mut heads = Vec::with_capacity(agents.len());
    for chunk in agents.chunks(FAN_OUT_CHUNK) {
        let ids: Vec<String> = chunk.iter().map(ToString::to_string).collect();
        let moved = sqlx::query(
            "UPDATE agents SET head_seq = head_seq + 1, stream_changed_at = ?
             WHERE id IN (SELECT value FROM json_each(?)) RETURNING id, head_seq, epoch",
        )
        .bind(now)
        .bind(json_text(&ids))
        .fetch_all(&mut **tx)
        .await?;
        let mut rows = Vec::with_capacity(moved.len());
        for r in &moved {
            let agent_id: AgentId = parse_id(r.try_get(0)?)?;
            let seq: i64 = r.try_get(1)?;
            rows.push((agent_id.to_string(), seq, reference(index[&agent_id])));
            heads.push(Head { agent_id, epoch: r.try_get::<i64, _>(2)? as u64, seq: seq as u64 });
        }
        sqlx::query(
            "INSERT INTO signals (agent_id, seq, kind, ts_ms, ref)
             SELECT s.value ->> '$[0]', s.value ->> '$[1]', ?, ?, s.value ->> '$[2]' FROM json_each(?) s",
        )
        .bind(kind)
        .bind(now)
        .bind(json_text(&rows))
        .execute(&mut **tx)
        .await?;
    }
    Ok(heads)
}

#[async_trait]
impl SignalStore for SqliteStore {
    async fn read_signals(&self, agent_id: AgentId, after: u64, limit: u32) -> Result<Vec<(u64, Signal)>> {
        let rows = sqlx::query(
            "SELECT seq, kind, ts_ms, ref FROM signals WHERE agent_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(agent_id.to_string())
        .bind(after as i64)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                let signal =
                    Signal { kind: r.try_get(1)?, ts_ms: r.try_get(2)?, reference: parse_json(r.try_get(3)?)? };
                Ok((r.try_get::<i64, _>(0)? as u64, signal))
            })
            .collect()
    }

    async fn prune_signals(&self, before: Millis, keep: u64, now: Millis) -> Result<Vec<(AgentId, u64)>> {
        let mut tx = self.begin().await?;
        let moved = sqlx::query(
            "WITH target AS (
                SELECT id, MAX(floor_seq, head_seq - ?,
                               COALESCE((SELECT MAX(seq) FROM signals s WHERE s.agent_id = agents.id AND s.ts_ms < ?), 0))
                       AS new_floor
                FROM agents)
             UPDATE agents SET floor_seq = target.new_floor, stream_changed_at = ? FROM target
             WHERE agents.id = target.id AND target.new_floor > agents.floor_seq
             RETURNING agents.id, agents.floor_seq",
        )
        .bind(i64::try_from(keep).unwrap_or(i64::MAX))
        .bind(before)
        .bind(now)
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
        moved.iter().map(|r| Ok((parse_id(r.try_get(0)?)?, r.try_get::<i64, _>(1)? as u64))).collect()
    }
}
