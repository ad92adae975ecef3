//! Writes committed in groups: request handlers queue an item and wait;
//! one writer task takes everything queued at that moment (up to a bound),
//! commits it in one transaction and answers every waiter with its own
//! outcome. No timer adds latency — while one group is being committed the
//! next one gathers — and the queue is bounded, so handlers wait to queue
//! (backpressure) rather than pile up. Used by heartbeats and command
//! results.

use std::future::Future;

use tether_store::StoreError;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// An item and where its outcome goes.
pub type Waiting<T, R> = (T, oneshot::Sender<R>);

/// The handlers' side of a writer.
#[derive(Debug)]
pub struct Writer<T, R>(mpsc::Sender<Waiting<T, R>>);

impl<T, R> Clone for Writer<T, R> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

/// The writer's side, consumed by [`run`].
#[derive(Debug)]
pub struct Queue<T, R>(mpsc::Receiver<Waiting<T, R>>);

/// The item could not be written because the server is stopping.
#[derive(Debug)]
pub struct Stopped;

/// A writer whose queue holds at most `capacity` items.
pub fn channel<T, R>(capacity: usize) -> (Writer<T, R>, Queue<T, R>) {
    let (tx, rx) = mpsc::channel(capacity);
    (Writer(tx), Queue(rx))
}

impl<T, R> Writer<T, R> {
    /// Queues `item` (waiting while the queue is full) and waits until its
    /// group is committed (or failed).
    pub async fn submit(&self, item: T) -> Result<R, Stopped> {
        let (done, outcome) = oneshot::channel();
        self.0.send((item, done)).await.map_err(|_| Stopped)?;
        outcome.await.map_err(|_| Stopped)
    }

    /// Items queued and not yet taken by the writer.
    pub fn queued(&self) -> usize {
        self.0.max_capacity() - self.0.capacity()
    }
}

/// Commits queued items in groups of at most `max_group` with `commit`
/// until `stop` fires, then commits what is still queued and returns.
/// `commit` answers every waiter of its group.
pub async fn run<T, R, F, Fut>(mut queue: Queue<T, R>, max_group: usize, stop: CancellationToken, mut commit: F)
where
    F: FnMut(Vec<Waiting<T, R>>) -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => break,
            next = queue.0.recv() => match next {
                Some(item) => item,
                None => return,
            },
        };
        let mut group = vec![first];
        take_queued(&mut queue, &mut group, max_group);
        commit(group).await;
    }
    // Nothing new can be queued now; what is queued is still committed.
    queue.0.close();
    loop {
        let mut group = Vec::new();
        take_queued(&mut queue, &mut group, max_group);
        if group.is_empty() {
            return;
        }
        commit(group).await;
    }
}

/// Moves what is queued now into `group`, up to `max_group` in all.
fn take_queued<T, R>(queue: &mut Queue<T, R>, group: &mut Vec<Waiting<T, R>>, max_group: usize) {
    while group.len() < max_group {
        match queue.0.try_recv() {
            Ok(item) => group.push(item),
            Err(_) => break,
        }
    }
}

/// The same failure for another waiter (store errors are not `Clone`):
/// an unreachable database stays a 503, anything else a 500.
pub fn share(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(inner) => StoreError::Unavailable(inner.to_string().into()),
        other => StoreError::Backend(other.to_string().into()),
    }
}
