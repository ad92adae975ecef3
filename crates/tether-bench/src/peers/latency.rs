//! Latency: enqueue → agent receipt with 1,000 idle WebSocket agents, on
//! one server (SQLite) and across two replicas on PostgreSQL + NATS (the
//! command created on replica A, its agent connected to replica B), beside
//! Mosquitto QoS 1 publish → receipt with as many idle subscribers.
//!
//! Commands go one at a time, each to a random agent, timed from just before
//! `POST /api/v1/commands` until that agent read the `command.queued` frame.
//! Messages go one at a time too, each to the topic of a random subscriber
//! (`agents/<i>/cmd`), timed from just before the PUBLISH is written until
//! the subscriber read it. Every fleet stays connected through all rounds
//! (3,000 connections in the bench process).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::Rng;
use tether_client::Client;
use tether_proto::command::{CreateCommand, Target};
use tether_proto::{AgentId, CommandId, Labels};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc};

use super::{PeerArgs, Row, alternate, peer_program};
use crate::realtime::{
    AbortOnDrop, DELIVERY_TIMEOUT, PrivateMosquitto, arrival_of, gauge, listening_fleet, mqtt_client, mqtt_connect,
    mqtt_publish_packet, mqtt_subscribers, signed_ms, wait_for_gauge,
};
use crate::{Server, Storage, enroll_many, percentile, start_server, start_server_with, until_quiet};

const SCENARIO: &str = "latency";
/// Longest wait for a server to go quiet after its fleet connected.
const QUIET_LIMIT: Duration = Duration::from_secs(30);

pub async fn run(bin: &Path, args: &PeerArgs) -> anyhow::Result<Vec<Row>> {
    let n = args.pick(1000, 20);
    let count = args.pick(300, 10);
    let bin = bin.to_path_buf();
    let mosquitto = peer_program(&["/usr/sbin/mosquitto"], "mosquitto")?;
    answers("PostgreSQL", "--postgres", &args.postgres, 5432).await?;
    answers("NATS", "--nats", &args.nats, 4222).await?;

    let single = start_server(&bin, &Storage::Sqlite)?;
    eprintln!("latency: {n} agents on one server (SQLite)…");
    let single_fleet = Fleet::connect(&single, &single, n).await?;

    // Dropped after the replicas (declared before them): the database goes last.
    let storage = Storage::new(Some(&args.postgres)).await;
    let cluster = format!("bench{}", tether_testkit::nats::unique_cluster());
    let flags = ["--nats-url", args.nats.as_str(), "--cluster", cluster.as_str()];
    let a = start_server_with(&bin, &storage, &flags, None, &[])?;
    let b = start_server_with(&bin, &storage, &flags, Some(&a.admin_token), &[])?;
    let http = reqwest::Client::new();
    for replica in [&a, &b] {
        wait_for_gauge(&http, replica, "tether_peers_connected", 1)
            .await
            .with_context(|| format!("a replica never connected to NATS at {}", args.nats))?;
    }
    eprintln!("latency: {n} agents on replica B, commands created on replica A (PostgreSQL + NATS)…");
    let replica_fleet = Fleet::connect(&a, &b, n).await?;

    let mut broker = PrivateMosquitto::start(&mosquitto).await?;
    eprintln!("latency: {n} MQTT subscribers on {}…", broker.version);
    let subscribers = Subscribers::connect(&broker, n).await?;

    for pid in [single.child.id(), a.child.id(), b.child.id()] {
        until_quiet(pid, QUIET_LIMIT).await?;
    }
    let peers_before = gauge(&http, &b, "tether_events_from_peers_total").await?;
    let (ours, peer) = alternate(
        args.rounds(),
        |_| async {
            eprintln!("  {count} commands on one server…");
            let one = tether_latencies(&single, &single_fleet, count).await?;
            eprintln!("  {count} commands across two replicas…");
            let two = tether_latencies(&a, &replica_fleet, count).await?;
            Ok(vec![percentile(&one, 0.5), percentile(&one, 0.99), percentile(&two, 0.5), percentile(&two, 0.99)])
        },
        |round| {
            let (broker, subscribers) = (&broker, &subscribers);
            async move {
                let times = mosquitto_latencies(broker, subscribers, count, round).await?;
                Ok(vec![percentile(&times, 0.5), percentile(&times, 0.99)])
            }
        },
    )
    .await?;
    broker.check_running()?;
    let from_peers = gauge(&http, &b, "tether_events_from_peers_total").await? - peers_before;
    eprintln!("latency: replica B heard {from_peers} stream events from A over NATS");

    let row = |metric: String, tether, peer, target| Row {
        scenario: SCENARIO,
        metric,
        unit: "ms",
        tether,
        peer: Some(("mosquitto", peer)),
        target,
    };
    let agents = super::figure(n as f64);
    let single_text = format!("one server (SQLite), {agents} idle agents");
    let replicas_text = format!("two replicas (PostgreSQL + NATS, created on A, agent on B), {agents} idle agents");
    Ok(vec![
        row(format!("enqueue → receipt p50, {single_text}"), ours[0], peer[0], super::Target::None),
        row(format!("enqueue → receipt p99, {single_text}"), ours[1], peer[1], super::Target::AtMost(10.0)),
        row(format!("enqueue → receipt p50, {replicas_text}"), ours[2], peer[0], super::Target::None),
        row(format!("enqueue → receipt p99, {replicas_text}"), ours[3], peer[1], super::Target::AtMost(25.0)),
    ])
}

/// Fails with a clear error when nothing accepts a connection at `url`'s
/// host and port within 3 s (the URL itself is not printed: it may hold a
/// password).
async fn answers(what: &str, flag: &str, url: &str, default_port: u16) -> anyhow::Result<()> {
    let parsed = reqwest::Url::parse(url).with_context(|| format!("{flag}: not a URL"))?;
    let host = parsed.host_str().with_context(|| format!("{flag}: no host"))?.to_owned();
    let port = parsed.port().unwrap_or(default_port);
    match tokio::time::timeout(Duration::from_secs(3), TcpStream::connect((host.as_str(), port))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => bail!("{what} does not answer at {host}:{port} ({e}); the two-replica run needs it ({flag} URL)"),
        Err(_) => bail!("{what} at {host}:{port} did not answer within 3 s; the two-replica run needs it ({flag} URL)"),
    }
}

/// Arrivals of `K`s (commands, MQTT messages) as their receivers reported
/// them; behind a lock only because every round borrows it anew.
struct Inbox<K> {
    arrivals: mpsc::UnboundedReceiver<(K, Instant)>,
    seen: HashMap<K, Instant>,
}

impl<K: Copy + Eq + std::hash::Hash + std::fmt::Display> Inbox<K> {
    fn new(arrivals: mpsc::UnboundedReceiver<(K, Instant)>) -> Mutex<Self> {
        Mutex::new(Inbox { arrivals, seen: HashMap::new() })
    }

    async fn arrival_of(&mut self, id: K) -> anyhow::Result<Instant> {
        arrival_of(id, &mut self.arrivals, &mut self.seen).await
    }
}

/// Idle WebSocket agents and the `command.queued` frames they read.
struct Fleet {
    ids: Vec<AgentId>,
    inbox: Mutex<Inbox<CommandId>>,
    _readers: AbortOnDrop,
}

impl Fleet {
    /// Enrolls `n` agents through `enroll_on` and connects each to the
    /// WebSocket of `connect_to`.
    async fn connect(enroll_on: &Server, connect_to: &Server, n: usize) -> anyhow::Result<Self> {
        let pairs = enroll_many(enroll_on, n, Labels::new()).await?;
        let (readers, arrivals) = listening_fleet(connect_to, &pairs).await?;
        Ok(Fleet { ids: pairs.iter().map(|p| p.agent_id).collect(), inbox: Inbox::new(arrivals), _readers: readers })
    }
}

/// `count` commands created on `on`, one at a time, each to a random agent
/// of `fleet`: milliseconds from just before the POST to the agent reading
/// it, sorted.
async fn tether_latencies(on: &Server, fleet: &Fleet, count: usize) -> anyhow::Result<Vec<f64>> {
    let admin = Client::new(&on.base)?.with_bearer(on.admin_token.clone());
    let mut inbox = fleet.inbox.lock().await;
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let agent = fleet.ids[rand::rng().random_range(0..fleet.ids.len())];
        let sent = Instant::now();
        let created = admin.create_command(&CreateCommand::new(Target::agents([agent]), "ping")).await?;
        let id = *created.command_ids.first().context("no command created")?;
        let at = inbox.arrival_of(id).await?;
        times.push(signed_ms(sent, at));
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

/// Idle MQTT clients, client `i` subscribed to `agents/<i>/cmd` at QoS 1,
/// and the messages they read (each payload is a number).
struct Subscribers {
    n: usize,
    inbox: Mutex<Inbox<u64>>,
    _readers: AbortOnDrop,
}

impl Subscribers {
    async fn connect(broker: &PrivateMosquitto, n: usize) -> anyhow::Result<Self> {
        let clients = mqtt_subscribers(&broker.addr, n, |i| format!("agents/{i}/cmd"))
            .await
            .with_context(|| format!("an MQTT subscriber: {}", broker.log_tail()))?;
        let (tx, arrivals) = mpsc::unbounded_channel();
        let readers = clients
            .into_iter()
            .map(|conn| {
                let tx = tx.clone();
                tokio::spawn(mqtt_client(conn, move |payload, at| {
                    if let Some(seq) = std::str::from_utf8(payload).ok().and_then(|p| p.parse().ok()) {
                        let _ = tx.send((seq, at));
                    }
                }))
            })
            .collect();
        Ok(Subscribers { n, inbox: Inbox::new(arrivals), _readers: AbortOnDrop(readers) })
    }
}

/// `count` QoS 1 messages from a fresh publisher, one at a time, each to a
/// random subscriber's topic: milliseconds from just before the PUBLISH is
/// written to the subscriber reading it, sorted. The publisher reads each
/// PUBACK before the next message, as it waits for each 201 on tether.
async fn mosquitto_latencies(
    broker: &PrivateMosquitto,
    subscribers: &Subscribers,
    count: usize,
    round: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut publisher = mqtt_connect(&broker.addr, "bench-publisher").await?;
    let mut inbox = subscribers.inbox.lock().await;
    let mut times = Vec::with_capacity(count);
    for k in 0..count {
        let seq = (round * count + k) as u64;
        let packet_id = (k % usize::from(u16::MAX)) as u16 + 1;
        let topic = format!("agents/{}/cmd", rand::rng().random_range(0..subscribers.n));
        let packet = mqtt_publish_packet(packet_id, &topic, seq.to_string().as_bytes());
        let sent = Instant::now();
        publisher.write_all(&packet).await?;
        let at = inbox.arrival_of(seq).await?;
        times.push(signed_ms(sent, at));
        let mut puback = [0u8; 4];
        tokio::time::timeout(DELIVERY_TIMEOUT, publisher.read_exact(&mut puback)).await.context("no PUBACK")??;
        if puback != [0x40, 0x02, (packet_id >> 8) as u8, packet_id as u8] {
            bail!("the publisher got {puback:02x?}, not its PUBACK: {}", broker.log_tail());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}
