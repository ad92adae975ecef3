//! Commands marked delivered in groups (docs/decisions.md, "Performance
//! against peers": deliveries marked in groups).
//!
//! A command fanned out to a labelled fleet reaches every connected agent
//! at once, and each delivery marks the agent's commands `delivered`
//! before the signals go out. One transaction per delivery made a fan-out
//! to 10,000 agents 10,000 commits in a row; instead every delivery is
//! handed to one writer task and waits: the writer takes what is queued
//! (at most [`MAX_GROUP`] deliveries), marks them all with one statement
//! in one transaction and answers each. The signals still go out only
//! once their commands are marked.

use std::sync::Arc;

use tether_proto::{AgentId, CommandId};
use tether_store::{Store, StoreError};
use tokio_util::sync::CancellationToken;

pub use crate::group_commit::Stopped;
use crate::group_commit::{self, Waiting, share};

/// Deliveries waiting for the writer; beyond it deliveries wait to queue.
const QUEUE: usize = 10_000;
/// Most deliveries in one transaction.
const MAX_GROUP: usize = 2_000;

type Outcome = Result<(), StoreError>;

/// One agent's delivered commands.
#[derive(Debug)]
pub struct Delivered {
    pub agent_id: AgentId,
    pub commands: Vec<CommandId>,
}

/// The delivering side of the writer.
#[derive(Debug, Clone)]
pub struct DeliveryWriter(group_commit::Writer<Delivered, Outcome>);

/// The writer's side, consumed by [`run`].
#[derive(Debug)]
pub struct DeliveryQueue(group_commit::Queue<Delivered, Outcome>);

pub fn channel() -> (DeliveryWriter, DeliveryQueue) {
    let (tx, rx) = group_commit::channel(QUEUE);
    (DeliveryWriter(tx), DeliveryQueue(rx))
}

impl DeliveryWriter {
    /// Queues `delivered` and waits until its group is committed (or failed).
    pub async fn mark(&self, delivered: Delivered) -> Result<Outcome, Stopped> {
        self.0.submit(delivered).await
    }
}

/// Marks queued deliveries in groups until `stop` fires, then marks what
/// is still queued and returns.
pub async fn run(
    store: Arc<dyn Store>,
    clock: Arc<dyn crate::clock::Clock>,
    queue: DeliveryQueue,
    stop: CancellationToken,
) {
    group_commit::run(queue.0, MAX_GROUP, stop, |group| commit(store.as_ref(), clock.now_ms(), group)).await;
}

/// Marks one group in one transaction and answers every waiter. If it
/// fails for another reason than an unreachable database, each delivery
/// is tried on its own, so one the database refuses fails only its own.
async fn commit(store: &dyn Store, now: tether_store::Millis, group: Vec<Waiting<Delivered, Outcome>>) {
    let pairs = |d: &Delivered| d.commands.iter().map(|id| (d.agent_id, *id)).collect::<Vec<_>>();
    let all: Vec<(AgentId, CommandId)> = group.iter().flat_map(|(d, _)| pairs(d)).collect();
    metrics::histogram!("tether_delivery_group_size").record(group.len() as f64);
    match store.mark_delivered(&all, now).await {
        Ok(_) => group.into_iter().for_each(|(_, waiter)| {
            let _ = waiter.send(Ok(()));
        }),
        Err(e) if group.len() == 1 || matches!(e, StoreError::Unavailable(_)) => {
            for (_, waiter) in group {
                let _ = waiter.send(Err(share(&e)));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, deliveries = group.len(), "A delivery group failed; marking its deliveries one by one");
            for (delivered, waiter) in group {
                let _ = waiter.send(store.mark_delivered(&pairs(&delivered), now).await.map(drop));
            }
        }
    }
}
