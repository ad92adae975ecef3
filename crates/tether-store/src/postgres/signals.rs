//! The agents' streams on PostgreSQL.

use std::collections::HashMap;

use async_trait::async_trait;
use sqlx::Row;
use tether_proto::{AgentId, Signal};

use super::agents::lock_agents;
use super::{PgStore, Tx};
use crate::sql::{References, parse_id, parse_json};
use crate::{Head, Millis, Result, SignalStore};

/// Appends one signal to an agent's stream inside `tx`. Moving the head
/// locks the agent's row until commit, so appends to one stream are
/// serialised and the stream is gap-free.
pub(super) async fn append_signal(
    tx: &mut Tx,
    agent_id: AgentId,
    kind: &str,
    reference: &serde_json::Value,
    now: Millis,
) -> Result<Head> {
    let row = sqlx::query(
        "UPDATE agents SET head_seq = head_seq + 1, stream_changed_at = $1 WHERE id = $2 RETURNING head_seq, epoch",
    )
    .bind(now)
    .bind(agent_id.to_string())
    .fetch_one(&mut **tx)
    .await?;
    let seq: i64 = row.try_get(0)?;
    let epoch: i64 = row.try_get(1)?;
    sqlx::query("INSERT INTO signals (agent_id, seq, kind, ts_ms, ref) VALUES ($1, $2, $3, $4, $5)")
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

/// Appends the same signal to many agents' streams inside `tx`, in bulk:
/// their rows locked in id order, then two statements per 5,000 agents,
/// never one round trip per agent.
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
        lock_agents(tx, &ids).await?;
        let moved = sqlx::query(
            "UPDATE agents SET head_seq = head_seq + 1, stream_changed_at = $1
             WHERE id = ANY($2) RETURNING id, head_seq, epoch",
        )
        .bind(now)
        .bind(&ids)
        .fetch_all(&mut **tx)
        .await?;
        let mut agent_ids = Vec::with_capacity(moved.len());
        let (mut seqs, mut refs) = (Vec::with_capacity(moved.len()), Vec::with_capacity(moved.len()));
        for r in &moved {
            let agent_id: AgentId = parse_id(r.try_get(0)?)?;
            let seq: i64 = r.try_get(1)?;
            agent_ids.push(agent_id.to_string());
            seqs.push(seq);
            refs.push(reference(index[&agent_id]));
            heads.push(Head { agent_id, epoch: r.try_get::<i64, _>(2)? as u64, seq: seq as u64 });
        }
        sqlx::query(
            "INSERT INTO signals (agent_id, seq, kind, ts_ms, ref)
             SELECT s.agent_id, s.seq, $3, $4, s.ref
             FROM unnest($1::text[], $2::bigint[], $5::text[]) AS s(agent_id, seq, ref)",
        )
        .bind(&agent_ids)
        .bind(&seqs)
        .bind(kind)
        .bind(now)
        .bind(&refs)
        .execute(&mut **tx)
        .await?;
    }
    Ok(heads)
}

#[async_trait]
impl SignalStore for PgStore {
    async fn read_signals(&self, agent_id: AgentId, after: u64, limit: u32) -> Result<Vec<(u64, Signal)>> {
        let rows = sqlx::query(
            "SELECT seq, kind, ts_ms, ref FROM signals WHERE agent_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(agent_id.to_string())
        .bind(after as i64)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
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
        // The floors to move, computed first; then those agents are locked
        // in id order and moved (a floor only ever rises).
        let targets = sqlx::query(
            "SELECT id, new_floor FROM (
                SELECT id, floor_seq, GREATEST(floor_seq, head_seq - $1,
                       COALESCE((SELECT MAX(seq) FROM signals s WHERE s.agent_id = agents.id AND s.ts_ms < $2), 0))
                       AS new_floor
                FROM agents) t
             WHERE new_floor > floor_seq ORDER BY id",
        )
        .bind(i64::try_from(keep).unwrap_or(i64::MAX))
        .bind(before)
        .fetch_all(&mut *tx)
        .await?;
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let ids = targets.iter().map(|r| r.try_get(0)).collect::<Result<Vec<String>, _>>()?;
        let floors = targets.iter().map(|r| r.try_get(1)).collect::<Result<Vec<i64>, _>>()?;
        lock_agents(&mut tx, &ids).await?;
        let moved = sqlx::query(
            "UPDATE agents SET floor_seq = GREATEST(agents.floor_seq, f.floor), stream_changed_at = $3
             FROM unnest($1::text[], $2::bigint[]) AS f(id, floor)
             WHERE agents.id = f.id
             RETURNING agents.id, agents.floor_seq",
        )
        .bind(&ids)
        .bind(&floors)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM signals s USING agents a
             WHERE a.id = ANY($1) AND s.agent_id = a.id AND s.seq <= a.floor_seq",
        )
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut out = moved
            .iter()
            .map(|r| Ok((parse_id(r.try_get(0)?)?, r.try_get::<i64, _>(1)? as u64)))
            .collect::<Result<Vec<(AgentId, u64)>>>()?;
        out.sort_unstable_by_key(|(id, _)| *id);
        Ok(out)
    }
}
