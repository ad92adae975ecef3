//! Stream events between servers over NATS (protocol.md §13): a server
//! that appends signals (or revokes an agent) applies the event at once for
//! its own waiters and publishes it; every other server of the cluster
//! applies it to the streams it holds.
//!
//! Subjects: `tether.<cluster>.heads.<shard>` carries new heads, sharded by
//! agent so a NATS cluster can spread them; `tether.<cluster>.revocations`
//! carries revocations and token cut-offs. Publishing never blocks a
//! request: events go through a bounded queue to one publisher task, and
//! one that cannot be queued is dropped and counted. NATS offers at most
//! once delivery anyway, so servers also catch up from the database
//! (`jobs::catch_up`), more often while NATS is away. Nothing here is
//! needed for correctness, only for speed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use async_nats::connection::State;
use futures::StreamExt;
use tether_store::Head;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Notifier, PeerCounters, StreamEvent, Streams};

/// Head subjects per cluster. Fixed: servers of one cluster must agree.
pub const SHARDS: u128 = 64;
/// Events waiting for the publisher at most; beyond, they are dropped.
const QUEUE: usize = 16_384;
/// Most heads in one message, well under NATS's default 1 MiB payload.
const HEADS_PER_MESSAGE: usize = 1_000;

/// The name that scopes a cluster's subjects: one subject token.
pub fn valid_cluster(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[derive(Debug)]
pub struct NatsNotifier {
    streams: Arc<Streams>,
    client: async_nats::Client,
    queue: mpsc::Sender<StreamEvent>,
    dropped: AtomicU64,
    /// Shared with the subscriber task.
    received: Arc<AtomicU64>,
}

/// The publisher and subscriber tasks of a [`NatsNotifier`], to run on the
/// server's task tracker.
#[derive(Debug)]
pub struct NatsTasks {
    client: async_nats::Client,
    cluster: String,
    queue: mpsc::Receiver<StreamEvent>,
    heads: async_nats::Subscriber,
    revocations: async_nats::Subscriber,
    streams: Arc<Streams>,
    received: Arc<AtomicU64>,
}

impl NatsNotifier {
    /// Connects to `url` in the background (a NATS that is down at start
    /// only slows the cluster down until it is up) and subscribes to the
    /// cluster's subjects.
    pub async fn connect(url: &str, cluster: &str, streams: Arc<Streams>) -> anyhow::Result<(Arc<Self>, NatsTasks)> {
        anyhow::ensure!(valid_cluster(cluster), "cluster name {cluster:?} must be 1-64 letters, digits, '-' or '_'");
        let client = async_nats::ConnectOptions::new()
            .name(format!("tether-{cluster}"))
            // Our own events are applied before they are published.
            .no_echo()
            .retry_on_initial_connect()
            .reconnect_delay_callback(|attempts| Duration::from_millis((attempts as u64 * 100).min(1_000)))
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("Connected to NATS"),
                    async_nats::Event::Disconnected => {
                        tracing::warn!("Lost NATS: catching up from the database every second until it is back")
                    }
                    other => tracing::debug!(event = %other, "NATS event"),
                }
            })
            .connect(url)
            .await
            .with_context(|| format!("connecting to NATS at {}", tether_store::redact_url(url)))?;
        let heads = client.subscribe(format!("tether.{cluster}.heads.*")).await.context("subscribing to heads")?;
        let revocations =
            client.subscribe(format!("tether.{cluster}.revocations")).await.context("subscribing to revocations")?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let received = Arc::new(AtomicU64::new(0));
        let notifier = Arc::new(Self {
            streams: streams.clone(),
            client: client.clone(),
            queue: tx,
            dropped: AtomicU64::new(0),
            received: received.clone(),
        });
        let tasks = NatsTasks { client, cluster: cluster.to_owned(), queue: rx, heads, revocations, streams, received };
        Ok((notifier, tasks))
    }
}

impl Notifier for NatsNotifier {
    fn publish(&self, event: StreamEvent) {
        if matches!(&event, StreamEvent::Heads(heads) if heads.is_empty()) {
            return;
        }
        self.streams.apply(&event);
        if self.queue.try_send(event).is_err() {
            // Another server learns of it when it next catches up.
            self.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("Stream event not published: queue full");
        }
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    fn counters(&self) -> PeerCounters {
        PeerCounters { received: self.received.load(Ordering::Relaxed), dropped: self.dropped.load(Ordering::Relaxed) }
    }
}

/// The NATS header carrying when the publishing server sent a message (Unix ms).
const PUBLISHED_MS_HEADER: &str = "Tether-Published-Ms";

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Seconds from publish to `now_ms` by the publisher's header; clocks of
/// two machines can disagree, so a negative delay counts as none.
fn lag_seconds(headers: Option<&async_nats::HeaderMap>, now_ms: i64) -> Option<f64> {
    let sent: i64 = headers?.get(PUBLISHED_MS_HEADER)?.as_str().parse().ok()?;
    Some(now_ms.saturating_sub(sent).max(0) as f64 / 1000.0)
}

/// The shard of an agent's head subject: its id's random low bits.
fn shard(head: &Head) -> u128 {
    head.agent_id.as_uuid().as_u128() % SHARDS
}

impl NatsTasks {
    /// Spawns the publisher and the subscriber; both stop with `stop`.
    pub fn spawn(self, tracker: &TaskTracker, stop: CancellationToken) {
        let Self { client, cluster, queue, heads, revocations, streams, received } = self;
        tracker.spawn(publish(client, cluster, queue, stop.clone()));
        tracker.spawn(receive(futures::stream::select(heads, revocations), streams, received, stop));
    }
}

async fn publish(
    client: async_nats::Client,
    cluster: String,
    mut queue: mpsc::Receiver<StreamEvent>,
    stop: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            event = queue.recv() => match event { Some(e) => e, None => break },
        };
        for (subject, event) in subjects(&cluster, event) {
            let payload = serde_json::to_vec(&event).expect("stream events serialize");
            // A header, not a payload field: replicas that do not know it read the same JSON.
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(PUBLISHED_MS_HEADER, unix_ms().to_string().as_str());
            if let Err(e) = client.publish_with_headers(subject, headers, payload.into()).await {
                tracing::debug!(error = %e, "Publishing a stream event failed");
            }
        }
    }
    // Whatever is still buffered goes out before the server stops.
    let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
}

/// The messages an event becomes: heads split by shard (and size), the rest as is.
fn subjects(cluster: &str, event: StreamEvent) -> Vec<(String, StreamEvent)> {
    match event {
        StreamEvent::Heads(heads) => {
            let mut by_shard: std::collections::BTreeMap<u128, Vec<Head>> = Default::default();
            for head in heads {
                by_shard.entry(shard(&head)).or_default().push(head);
            }
            by_shard
                .into_iter()
                .flat_map(|(shard, heads)| {
                    let subject = format!("tether.{cluster}.heads.{shard}");
                    heads
                        .chunks(HEADS_PER_MESSAGE)
                        .map(|chunk| (subject.clone(), StreamEvent::Heads(chunk.to_vec())))
                        .collect::<Vec<_>>()
                })
                .collect()
        }
        other => vec![(format!("tether.{cluster}.revocations"), other)],
    }
}

async fn receive(
    mut messages: impl futures::Stream<Item = async_nats::Message> + Unpin,
    streams: Arc<Streams>,
    received: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => return,
            message = messages.next() => match message { Some(m) => m, None => return },
        };
        match serde_json::from_slice::<StreamEvent>(&message.payload) {
            Ok(event) => {
                streams.apply(&event);
                received.fetch_add(1, Ordering::Relaxed);
                if let Some(lag) = lag_seconds(message.headers.as_ref(), unix_ms()) {
                    metrics::histogram!(crate::api::prometheus::NOTIFIER_LAG).record(lag);
                }
            }
            Err(e) => tracing::warn!(subject = %message.subject, error = %e, "Ignoring a malformed stream event"),
        }
    }
}

#[cfg(test)]
mod tests {
    use tether_proto::AgentId;

    use super::*;

    #[test]
    fn lag_comes_from_the_publishers_header_and_is_never_negative() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(PUBLISHED_MS_HEADER, "1000");
        assert_eq!(lag_seconds(Some(&headers), 3_500), Some(2.5));
        assert_eq!(lag_seconds(Some(&headers), 900), Some(0.0));
        assert_eq!(lag_seconds(None, 3_500), None);
        headers.insert(PUBLISHED_MS_HEADER, "soon");
        assert_eq!(lag_seconds(Some(&headers), 3_500), None);
    }

    #[test]
    fn heads_go_to_their_agents_shard_and_the_rest_to_one_subject() {
        let heads: Vec<Head> = (0..200).map(|seq| Head { agent_id: AgentId::new(), epoch: 1, seq }).collect();
        let messages = subjects("prod", StreamEvent::Heads(heads.clone()));
        let mut seen = 0;
        for (subject, event) in &messages {
            let StreamEvent::Heads(part) = event else { panic!("heads stay heads") };
            for head in part {
                assert_eq!(subject, &format!("tether.prod.heads.{}", shard(head)));
            }
            seen += part.len();
        }
        assert_eq!(seen, heads.len());
        assert!(messages.len() > 1, "200 random agents spread over shards");
        let revoked = StreamEvent::Revoked { agent_id: AgentId::new(), at: 5, reason: "x".into() };
        assert_eq!(subjects("prod", revoked.clone()), vec![("tether.prod.revocations".to_owned(), revoked)]);
    }

    #[test]
    fn every_event_survives_the_wire() {
        let agent_id = AgentId::new();
        for event in [
            StreamEvent::Heads(vec![Head { agent_id, epoch: 1, seq: 2 }]),
            StreamEvent::Revoked { agent_id, at: 5, reason: "stolen".into() },
            StreamEvent::TokensRevoked { agent_id, at: 6 },
        ] {
            let wire = serde_json::to_vec(&event).expect("serializes");
            assert_eq!(serde_json::from_slice::<StreamEvent>(&wire).expect("parses"), event);
        }
    }

    #[test]
    fn a_cluster_name_is_one_subject_token() {
        assert!(valid_cluster("eu-west_1"));
        for bad in ["", "a.b", "a*", "a b", &"x".repeat(65)] {
            assert!(!valid_cluster(bad), "{bad:?}");
        }
    }
}
