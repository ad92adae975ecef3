//! Fan-out: one command to 10,000 connected agents by label, beside one
//! Mosquitto QoS 1 publish to 10,000 subscribers of one topic.
//!
//! tether: a server on SQLite, the agents enrolled with `fleet=fan`, each on
//! the agent WebSocket (raw, as `realtime` connects them) and idle. A round
//! is one `POST /api/v1/commands` targeting `{"labels":{"fleet":"fan"}}`,
//! timed from just before the POST until the last agent read a
//! `command.queued` frame for its command (the 201 may come before or after
//! that; its own time is a context row). Mosquitto: the same number of
//! MQTT 3.1.1 subscribers at QoS 1 on one topic, each acknowledging
//! (PUBACK) what it gets, and one QoS 1 publish from another client, timed
//! until the last subscriber read it.
//!
//! CPU per delivery is the server's (or the broker's) CPU time over that
//! window divided by the deliveries, from per-thread nanoseconds. Each
//! window starts once the process has gone quiet after its fleet connected.
//!
//! One process may hold 20,000 open files, so the bench never holds both
//! fleets: each round connects its fleet and drops it afterwards.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tether_client::Client;
use tether_proto::Labels;
use tether_proto::agent::TokenPair;
use tether_proto::command::{CreateCommand, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{PeerArgs, Row, alternate, peer_program};
use crate::realtime::{
    AbortOnDrop, PrivateMosquitto, STATE_TIMEOUT, listening_fleet, mqtt_client, mqtt_connect, mqtt_publish_packet,
    mqtt_subscribers, signed_ms, wait_for_gauge,
};
use crate::{CpuSample, Server, Storage, enroll_many, start_server, until_quiet};

const SCENARIO: &str = "fan-out";
/// The one topic every MQTT subscriber is on.
const TOPIC: &str = "fleet/fan";
/// The last delivery of a round must come within this long.
const FAN_OUT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for a process to go quiet before a timed step.
const QUIET_LIMIT: Duration = Duration::from_secs(30);
/// How long the server waits for a closed WebSocket's agent to come back
/// before it records it offline (protocol.md §9), and a little more.
const OFFLINE_GRACE: Duration = Duration::from_secs(3);

pub async fn run(bin: &Path, args: &PeerArgs) -> anyhow::Result<Vec<Row>> {
    let n = args.pick(10_000, 20);
    let mosquitto = peer_program(&["/usr/sbin/mosquitto"], "mosquitto")?;
    let server = start_server(&bin.to_path_buf(), &Storage::Sqlite)?;
    let labels = Labels::from([("fleet".to_owned(), "fan".to_owned())]);
    eprintln!("fan-out: enrolling {n} agents with fleet=fan…");
    let pairs = enroll_many(&server, n, labels.clone()).await?;
    let mut broker = PrivateMosquitto::start(&mosquitto).await?;
    eprintln!("fan-out: {n} deliveries a round, on {}", broker.version);

    let (ours, peer) =
        alternate(args.rounds(), |_| tether_round(&server, &pairs, &labels), |_| mosquitto_round(&broker, n)).await?;
    broker.check_running()?;

    let count = super::figure(n as f64);
    let row =
        |metric: String, unit, tether, peer, target| Row { scenario: SCENARIO, metric, unit, tether, peer, target };
    Ok(vec![
        row(
            format!(
                "one command to {count} agents by label (QoS 1 publish to {count} subscribers): sent → the last has it"
            ),
            "ms",
            ours[0],
            Some(("mosquitto", peer[0])),
            super::Target::AtMost(1000.0),
        ),
        row(
            "CPU per delivery (server / broker, over that window)".to_owned(),
            "µs",
            ours[1],
            Some(("mosquitto", peer[1])),
            super::Target::RatioAtMost(2.0),
        ),
        row(
            format!("POST /api/v1/commands → 201 ({count} commands by label)"),
            "ms",
            ours[2],
            None,
            super::Target::None,
        ),
    ])
}

/// One round on tether: the fleet connects, the server goes quiet, one
/// command by label; `[last delivery ms, CPU µs per delivery, POST → 201 ms]`.
async fn tether_round(server: &Server, pairs: &[TokenPair], labels: &Labels) -> anyhow::Result<Vec<f64>> {
    let n = pairs.len();
    let pid = server.child.id();
    let http = reqwest::Client::new();
    eprintln!("  connecting {n} WebSocket agents…");
    let connecting = Instant::now();
    let (readers, mut rx) = listening_fleet(server, pairs).await?;
    until_quiet(pid, QUIET_LIMIT).await?;
    eprintln!("  connected and quiet after {:.0} s", connecting.elapsed().as_secs_f64());

    let admin = Client::new(&server.base)?.with_bearer(server.admin_token.clone());
    let before = CpuSample::of(pid)?;
    let sent = Instant::now();
    let created = admin.create_command(&CreateCommand::new(Target::labels(labels.clone()), "ping")).await?;
    let answered = Instant::now();
    let mut waiting: HashSet<_> = created.command_ids.iter().copied().collect();
    if waiting.len() != n {
        bail!("the label selector matched {} agents, not {n}", waiting.len());
    }
    let deadline = tokio::time::Instant::now() + FAN_OUT_TIMEOUT;
    let mut last = sent;
    while !waiting.is_empty() {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            // Earlier rounds' commands come again with each connect's backlog.
            Ok(Some((id, at))) if waiting.remove(&id) => last = last.max(at),
            Ok(Some(_)) => {}
            Ok(None) => bail!("every agent connection ended with {} commands undelivered", waiting.len()),
            Err(_) => bail!("{} of {n} agents had no command after {} s", waiting.len(), FAN_OUT_TIMEOUT.as_secs()),
        }
    }
    let cpu = CpuSample::of(pid)?.seconds_since(&before);
    let (last_ms, post_ms) = (signed_ms(sent, last), signed_ms(sent, answered));
    eprintln!(
        "  tether: last delivery {last_ms:.0} ms, 201 at {post_ms:.0} ms ({}), {:.0} ms of server CPU",
        if answered <= last { "before the last delivery" } else { "after the last delivery" },
        cpu * 1000.0
    );
    drop(readers);
    wait_for_gauge(&http, server, "tether_websockets_open", 0).await?;
    // Each closed connection is written offline after a 2 s grace, one
    // transaction per agent: let that end before anything else is timed.
    let closed = Instant::now();
    tokio::time::sleep(OFFLINE_GRACE).await;
    until_quiet(pid, STATE_TIMEOUT).await?;
    eprintln!("  the server recorded the {n} disconnects in {:.0} s", closed.elapsed().as_secs_f64());
    Ok(vec![last_ms, cpu * 1e6 / n as f64, post_ms])
}

/// One round on Mosquitto: `n` subscribers connect, the broker goes quiet,
/// one QoS 1 publish; `[last delivery ms, broker CPU µs per delivery]`.
async fn mosquitto_round(broker: &PrivateMosquitto, n: usize) -> anyhow::Result<Vec<f64>> {
    eprintln!("  connecting {n} MQTT subscribers…");
    let clients = mqtt_subscribers(&broker.addr, n, |_| TOPIC.to_owned())
        .await
        .with_context(|| format!("an MQTT subscriber: {}", broker.log_tail()))?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Instant>();
    let readers: Vec<JoinHandle<()>> = clients
        .into_iter()
        .map(|conn| {
            let tx = tx.clone();
            tokio::spawn(mqtt_client(conn, move |_, at| {
                let _ = tx.send(at);
            }))
        })
        .collect();
    drop(tx);
    let _readers = AbortOnDrop(readers);
    let mut publisher = mqtt_connect(&broker.addr, "bench-publisher").await?;
    until_quiet(broker.pid(), QUIET_LIMIT).await?;

    let before = CpuSample::of(broker.pid())?;
    let sent = Instant::now();
    publisher.write_all(&mqtt_publish_packet(1, TOPIC, b"ping")).await?;
    let deadline = tokio::time::Instant::now() + FAN_OUT_TIMEOUT;
    let mut last = sent;
    for got in 0..n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(at)) => last = last.max(at),
            Ok(None) => bail!("every subscriber ended with {} deliveries missing: {}", n - got, broker.log_tail()),
            Err(_) => bail!("{} of {n} subscribers had nothing after {} s", n - got, FAN_OUT_TIMEOUT.as_secs()),
        }
    }
    let cpu = CpuSample::of(broker.pid())?.seconds_since(&before);
    let mut puback = [0u8; 4];
    tokio::time::timeout(STATE_TIMEOUT, publisher.read_exact(&mut puback)).await.context("no PUBACK")??;
    if puback != [0x40, 0x02, 0, 1] {
        bail!("the publisher got {puback:02x?}, not its PUBACK");
    }
    let last_ms = signed_ms(sent, last);
    eprintln!("  mosquitto: last delivery {last_ms:.0} ms, {:.1} ms of broker CPU", cpu * 1000.0);
    Ok(vec![last_ms, cpu * 1e6 / n as f64])
}
