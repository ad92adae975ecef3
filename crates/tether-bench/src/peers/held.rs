//! Memory per idle agent: the server's resident memory grows by so much
//! per parked long-poll and per idle WebSocket, beside a private
//! Mosquitto's growth per idle MQTT client subscribed at QoS 1 — what the
//! lightest broker on this machine needs to hold a device that waits for work.
//!
//! The server runs with jemalloc returning freed pages at once
//! (`dirty_decay_ms:0`), so that one transport's freed garbage is not
//! counted as, or reused by, the next one's connections: its resident
//! memory then follows what is live.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use tether_proto::Labels;
use tether_proto::agent::TokenPair;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::{PeerArgs, Row, Target, alternate, peer_program};
use crate::realtime::{
    PrivateMosquitto, connect_all, drain, mqtt_idle, mqtt_subscribers, poll_each_once, wait_for_gauge,
};
use crate::{Server, Storage, cursor_of, enroll_many, poll_request, rss_bytes, start_server_with};

const SCENARIO: &str = "held";
/// Parked long-polls wait this long: longer than connecting and settling take.
const POLL_WAIT_S: u32 = 30;

pub async fn run(bin: &Path, args: &PeerArgs) -> anyhow::Result<Vec<Row>> {
    let agents = args.pick(10_000, 20);
    let settle = Duration::from_secs(args.pick(5, 1));
    let mosquitto = peer_program(&["/usr/sbin/mosquitto"], "mosquitto")?;

    let free_at_once = [("_RJEM_MALLOC_CONF", "dirty_decay_ms:0,muzzy_decay_ms:0")];
    let server = start_server_with(&bin.to_path_buf(), &Storage::Sqlite, &[], None, &free_at_once)?;
    eprintln!("held: enrolling {agents} agents…");
    let pairs = enroll_many(&server, agents, Labels::new()).await?;
    // Each agent's stream loaded and its token verified once, as for an
    // agent that has been polling: the connections are measured apart.
    poll_each_once(&server, &pairs).await?;
    let requests = parked_poll_requests(&server, &pairs).await?;
    let http = reqwest::Client::new();

    let (ours, theirs) = alternate(
        args.rounds(),
        |_| async {
            let long_poll = held_long_polls(&server, &requests, settle).await?;
            let websocket = idle_websockets(&http, &server, &pairs, settle).await?;
            Ok(vec![long_poll, websocket])
        },
        |_| async {
            let per_client = idle_mqtt_clients(&mosquitto, agents, settle).await?;
            Ok(vec![per_client, per_client])
        },
    )
    .await?;
    let row = |metric: &str, i: usize| Row {
        scenario: SCENARIO,
        metric: format!("{metric}, {agents} agents"),
        unit: "bytes",
        tether: ours[i],
        peer: Some(("Mosquitto, per idle QoS 1 subscriber", theirs[i])),
        target: Target::AtMostAndRatioAtMost(4096.0, 2.0),
    };
    Ok(vec![row("server memory per parked long-poll", 0), row("server memory per idle WebSocket", 1)])
}

/// One `wait=30` poll per agent, each at its stream's head.
async fn parked_poll_requests(server: &Server, pairs: &[TokenPair]) -> anyhow::Result<Vec<Vec<u8>>> {
    let cursors: Vec<anyhow::Result<String>> =
        futures::stream::iter(pairs).map(|p| cursor_of(server, p)).buffered(32).collect().await;
    pairs
        .iter()
        .zip(cursors)
        .map(|(p, cursor)| Ok(poll_request(&server.addr, &p.access_token, &cursor?, POLL_WAIT_S)))
        .collect()
}

/// Server memory per parked long-poll: connects one per request, sends
/// it, lets the server settle, and reads its resident memory.
async fn held_long_polls(server: &Server, requests: &[Vec<u8>], settle: Duration) -> anyhow::Result<f64> {
    tokio::time::sleep(settle).await;
    let before = rss_bytes(server.child.id())?;
    eprintln!("held: parking {} long-polls…", requests.len());
    let started = std::time::Instant::now();
    let mut conns = Vec::with_capacity(requests.len());
    for req in requests {
        let mut conn = TcpStream::connect(&server.addr).await?;
        conn.write_all(req).await?;
        conns.push(conn);
    }
    tokio::time::sleep(settle).await;
    let after = rss_bytes(server.child.id())?;
    if started.elapsed() >= Duration::from_secs(POLL_WAIT_S.into()) {
        bail!("parking the polls took longer than they wait; use fewer agents");
    }
    // None may have been answered: every one is still parked.
    let mut probe = [0u8; 1];
    if conns.iter().any(|c| c.try_read(&mut probe).is_ok()) {
        bail!("a parked poll was answered early");
    }
    drop(conns);
    Ok(after.saturating_sub(before) as f64 / requests.len() as f64)
}

/// Server memory per idle WebSocket agent.
async fn idle_websockets(
    http: &reqwest::Client,
    server: &Server,
    pairs: &[TokenPair],
    settle: Duration,
) -> anyhow::Result<f64> {
    // The long-polls just closed: let the server drop them first.
    tokio::time::sleep(settle).await;
    let before = rss_bytes(server.child.id())?;
    eprintln!("held: opening {} WebSockets…", pairs.len());
    let open = connect_all(&server.addr, pairs).await?;
    let readers: Vec<JoinHandle<()>> =
        open.into_iter().map(|mut ws| tokio::spawn(async move { drain(&mut ws, |_| {}).await })).collect();
    wait_for_gauge(http, server, "tether_websockets_open", pairs.len()).await?;
    tokio::time::sleep(settle).await;
    let after = rss_bytes(server.child.id())?;
    // Still all open: none was closed while idle.
    wait_for_gauge(http, server, "tether_websockets_open", pairs.len()).await?;
    for r in &readers {
        r.abort();
    }
    wait_for_gauge(http, server, "tether_websockets_open", 0).await?;
    Ok(after.saturating_sub(before) as f64 / pairs.len() as f64)
}

/// Memory per idle MQTT client of a fresh private Mosquitto, each client
/// subscribed to its own topic at QoS 1.
async fn idle_mqtt_clients(bin: &Path, clients: usize, settle: Duration) -> anyhow::Result<f64> {
    let mut broker = PrivateMosquitto::start(bin).await?;
    tokio::time::sleep(settle).await;
    let before = rss_bytes(broker.pid())?;
    eprintln!("held: {clients} MQTT clients on {}…", broker.version);
    let conns = mqtt_subscribers(&broker.addr, clients, |i| format!("agents/{i}/cmd"))
        .await
        .with_context(|| format!("an MQTT client: {}", broker.log_tail()))?;
    let readers: Vec<JoinHandle<()>> = conns.into_iter().map(|c| tokio::spawn(mqtt_idle(c))).collect();
    tokio::time::sleep(settle).await;
    let after = rss_bytes(broker.pid())?;
    broker.check_running()?;
    for r in &readers {
        r.abort();
    }
    Ok(after.saturating_sub(before) as f64 / clients as f64)
}
