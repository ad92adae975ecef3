//! Heartbeats committed in groups (protocol.md §8).
//!
//! A fleet sends a heartbeat per agent every 30 s; one transaction each
//! would make the database's commit rate the fleet's ceiling. Handlers
//! hand their heartbeat to one writer task and wait: the writer takes
//! everything queued, writes it in one transaction, and answers every
//! waiter with its outcome. No timer adds latency — while one group is
//! being committed the next one gathers — and a 200 still means the
//! heartbeat is committed.

use std::collections::HashMap;

use tether_proto::AgentId;
use tether_store::{HeartbeatRow, Store, StoreError};
use tokio_util::sync::CancellationToken;

pub use crate::group_commit::Stopped;
use crate::group_commit::{self, Waiting, share};

/// Heartbeats waiting for the writer; beyond it handlers wait to queue.
/// Each holds at most a 4 KiB body.
const QUEUE: usize = 4_000;
/// Most heartbeats in one transaction.
const MAX_GROUP: usize = 2_000;

type Outcome = Result<(), StoreError>;

/// The handlers' side of the writer.
#[derive(Debug, Clone)]
pub struct HeartbeatWriter(group_commit::Writer<HeartbeatRow, Outcome>);

/// The writer's side, consumed by [`run`].
#[derive(Debug)]
pub struct HeartbeatQueue(group_commit::Queue<HeartbeatRow, Outcome>);

pub fn channel() -> (HeartbeatWriter, HeartbeatQueue) {
    let (tx, rx) = group_commit::channel(QUEUE);
    (HeartbeatWriter(tx), HeartbeatQueue(rx))
}

impl HeartbeatWriter {
    /// Queues `row` and waits until its group is committed (or failed).
    pub async fn write(&self, row: HeartbeatRow) -> Result<Outcome, Stopped> {
        self.0.submit(row).await
    }
}

/// Commits queued heartbeats in groups until `stop` fires, then commits
/// what is still queued and returns.
pub async fn run(store: std::sync::Arc<dyn Store>, queue: HeartbeatQueue, stop: CancellationToken) {
    group_commit::run(queue.0, MAX_GROUP, stop, |group| commit(store.as_ref(), group)).await;
}

/// Writes one group: an agent's later heartbeat in the group supersedes
/// its earlier one. Every waiter hears how its agent's row went: if the
/// group fails for a reason other than an unreachable database, each row
/// is tried on its own, so one bad row fails only its own agent's request.
async fn commit(store: &dyn Store, group: Vec<Waiting<HeartbeatRow, Outcome>>) {
    let mut latest: HashMap<AgentId, usize> = HashMap::with_capacity(group.len());
    for (i, (row, _)) in group.iter().enumerate() {
        latest.insert(row.agent_id, i);
    }
    let (rows, waiters): (Vec<HeartbeatRow>, Vec<_>) = group.into_iter().unzip();
    let agents: Vec<AgentId> = rows.iter().map(|r| r.agent_id).collect();
    let rows: Vec<HeartbeatRow> =
        rows.into_iter().enumerate().filter(|(i, row)| latest[&row.agent_id] == *i).map(|(_, row)| row).collect();
    metrics::histogram!("tether_heartbeat_group_size").record(rows.len() as f64);
    let mut failed: HashMap<AgentId, StoreError> = HashMap::new();
    match store.record_heartbeats(&rows).await {
        Ok(()) => {}
        Err(e @ StoreError::Unavailable(_)) => {
            for row in &rows {
                failed.insert(row.agent_id, share(&e));
            }
        }
        Err(e) if rows.len() == 1 => {
            failed.insert(rows[0].agent_id, e);
        }
        Err(e) => {
            tracing::warn!(error = %e, rows = rows.len(), "A heartbeat group failed; writing its rows one by one");
            for row in &rows {
                if let Err(e) = store.record_heartbeats(std::slice::from_ref(row)).await {
                    failed.insert(row.agent_id, e);
                }
            }
        }
    }
    metrics::counter!("tether_heartbeats_written_total").increment((rows.len() - failed.len()) as u64);
    for (agent, waiter) in agents.into_iter().zip(waiters) {
        let _ = waiter.send(failed.get(&agent).map_or(Ok(()), |e| Err(share(e))));
    }
}
