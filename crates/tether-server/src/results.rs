//! Command results committed in groups (docs/decisions.md, "Performance
//! against peers": results committed in groups).
//!
//! Every recorded result appends to the audit chain, whose head is one
//! row: one transaction per result would commit results one at a time,
//! each holding the head until its own commit. Instead every report (HTTP,
//! WebSocket frame, seed route) is handed to one writer task and waits:
//! the writer takes the reports queued at that moment (at most
//! [`MAX_GROUP`]) and records them with one store call, one transaction
//! ([`tether_store::CommandStore::report_results`]), then answers each
//! with its own outcome. A report's own refusal (unknown command, another
//! agent's, a different result for a finished one) is its answer alone;
//! the others in its group are recorded. A 2xx still means committed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tether_proto::command::{Command, ResultReport};
use tether_proto::{AgentId, CommandId};
use tether_store::{AuditEntry, Millis, ResultOutcome, ResultToRecord, Store, StoreError};
use tokio_util::sync::CancellationToken;

pub use crate::group_commit::Stopped;
use crate::group_commit::{self, Waiting, share};

/// Reports waiting for the writer; beyond it handlers wait to queue. Each
/// holds at most 2 × 64 KiB of output.
const QUEUE: usize = 512;
/// Most reports in one transaction.
pub const MAX_GROUP: usize = 64;

type Outcome = Result<ResultOutcome, StoreError>;

/// Builds a recorded result's audit row (see [`tether_store::ResultAudit`]).
pub type AuditFn = Box<dyn Fn(&Command, bool) -> AuditEntry + Send + Sync>;

/// One agent's result report, waiting to be recorded.
pub struct PendingResult {
    pub agent_id: AgentId,
    pub id: CommandId,
    pub report: ResultReport,
    pub now: Millis,
    pub audit: AuditFn,
}

impl std::fmt::Debug for PendingResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingResult").field("agent_id", &self.agent_id).field("id", &self.id).finish_non_exhaustive()
    }
}

/// The handlers' side of the writer.
#[derive(Debug, Clone)]
pub struct ResultWriter {
    queue: group_commit::Writer<PendingResult, Outcome>,
    transactions: Arc<AtomicU64>,
}

/// The writer's side, consumed by [`run`].
#[derive(Debug)]
pub struct ResultQueue {
    queue: group_commit::Queue<PendingResult, Outcome>,
    transactions: Arc<AtomicU64>,
}

pub fn channel() -> (ResultWriter, ResultQueue) {
    let (tx, rx) = group_commit::channel(QUEUE);
    let transactions = Arc::new(AtomicU64::new(0));
    (ResultWriter { queue: tx, transactions: transactions.clone() }, ResultQueue { queue: rx, transactions })
}

impl ResultWriter {
    /// Queues `report` and waits until its group is committed (or failed).
    pub async fn record(&self, report: PendingResult) -> Result<Outcome, Stopped> {
        self.queue.submit(report).await
    }

    /// Reports queued and not yet taken by the writer.
    pub fn queued(&self) -> usize {
        self.queue.queued()
    }

    /// Store transactions the writer has run so far (each recording a group).
    pub fn transactions(&self) -> u64 {
        self.transactions.load(Ordering::Relaxed)
    }
}

/// Records queued reports in groups until `stop` fires, then records what
/// is still queued and returns.
pub async fn run(store: Arc<dyn Store>, queue: ResultQueue, stop: CancellationToken) {
    let ResultQueue { queue, transactions } = queue;
    group_commit::run(queue, MAX_GROUP, stop, |group| commit(store.as_ref(), &transactions, group)).await;
}

/// Records one group in one transaction and answers each waiter. If the
/// transaction fails for a reason other than an unreachable database, each
/// report is tried on its own, so one report the database refuses fails
/// only its own request.
async fn commit(store: &dyn Store, transactions: &AtomicU64, group: Vec<Waiting<PendingResult, Outcome>>) {
    let (pending, waiters): (Vec<PendingResult>, Vec<_>) = group.into_iter().unzip();
    let reports: Vec<ResultToRecord<'_>> = pending
        .iter()
        .map(|p| ResultToRecord { agent_id: p.agent_id, id: p.id, report: &p.report, now: p.now, audit: &*p.audit })
        .collect();
    metrics::histogram!("tether_result_group_size").record(reports.len() as f64);
    transactions.fetch_add(1, Ordering::Relaxed);
    let outcomes: Vec<Outcome> = match store.report_results(&reports).await {
        Ok(outcomes) => outcomes,
        Err(e @ StoreError::Unavailable(_)) => reports.iter().map(|_| Err(share(&e))).collect(),
        Err(e) if reports.len() == 1 => vec![Err(e)],
        Err(e) => {
            tracing::warn!(error = %e, reports = reports.len(), "A result group failed; recording its reports one by one");
            let mut alone = Vec::with_capacity(reports.len());
            for report in &reports {
                transactions.fetch_add(1, Ordering::Relaxed);
                let one = store.report_results(std::slice::from_ref(report)).await;
                alone.push(one.and_then(|mut o| o.pop().expect("one outcome per report")));
            }
            alone
        }
    };
    for (waiter, outcome) in waiters.into_iter().zip(outcomes) {
        let _ = waiter.send(outcome);
    }
}
