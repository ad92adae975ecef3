//! A reconnect storm: every agent is connected over the WebSocket, the
//! server is killed (SIGKILL) and started again on the same port and data,
//! and every agent reconnects at once — no jitter, a retry every 20–100 ms
//! while nothing listens — the worst a fleet can do to a server coming
//! back. Measured: the time from the kill until every agent is connected
//! again, and the restarted server's peak resident memory. The peer is a
//! private Mosquitto killed and restarted the same way, its clients
//! reconnecting and subscribing again at once.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use futures::future::BoxFuture;
use tether_proto::Labels;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{PeerArgs, Row, Target, alternate, peer_program};
use crate::realtime::{
    AbortOnDrop, PrivateMosquitto, connect_all, drain, mqtt_idle, mqtt_subscribe, mqtt_subscribers, wait_for_gauge,
    ws_connect,
};
use crate::{Storage, enroll_many, spawn_server, start_server_on, status_bytes};

const SCENARIO: &str = "storm";
/// A client not back this long after the kill fails the run.
const BACK_WITHIN: Duration = Duration::from_secs(120);

pub async fn run(bin: &Path, args: &PeerArgs) -> anyhow::Result<Vec<Row>> {
    let agents = args.pick(10_000, 20);
    let mosquitto = peer_program(&["/usr/sbin/mosquitto"], "mosquitto")?;
    let bin = bin.to_path_buf();
    // Below the ephemeral range: a client retrying while nothing listens
    // could otherwise be given the server's port as its own source port.
    let listen = format!("127.0.0.1:{}", crate::free_port()?);
    let server = tokio::sync::Mutex::new(start_server_on(&bin, &listen, &Storage::Sqlite, &[], None, &[])?);
    eprintln!("storm: enrolling {agents} agents…");
    let pairs = enroll_many(&*server.lock().await, agents, Labels::new()).await?;
    let tokens: Arc<[String]> = pairs.iter().map(|p| p.access_token.clone()).collect();
    let http = reqwest::Client::new();

    let (ours, theirs) = alternate(
        args.rounds(),
        |_| async {
            let mut server = server.lock().await;
            eprintln!("storm: connecting {agents} WebSocket agents…");
            let open = connect_all(&server.addr, &pairs).await?;
            wait_for_gauge(&http, &server, "tether_websockets_open", agents).await?;
            let (addr, tokens) = (server.addr.clone(), tokens.clone());
            let connect: Connect = Arc::new(move |i| {
                let (addr, token) = (addr.clone(), tokens[i].clone());
                Box::pin(async move {
                    let mut ws = ws_connect(&addr, &token).await.ok()?;
                    Some(Box::pin(async move { drain(&mut ws, |_| {}).await }) as BoxFuture<'static, ()>)
                })
            });
            let waits = open
                .into_iter()
                .map(|mut ws| -> BoxFuture<'static, ()> { Box::pin(async move { drain(&mut ws, |_| {}).await }) });
            let (back, clients) = rejoin_all(waits.collect(), connect);
            eprintln!("storm: killing the server and starting it again…");
            server.child.kill()?;
            server.child.wait()?;
            let killed = Instant::now();
            let (dir, bin, addr) = (server._dir.path().to_owned(), bin.clone(), server.addr.clone());
            let (child, _) = tokio::task::spawn_blocking(move || spawn_server(&bin, &dir, &addr, None)).await??;
            server.child = child;
            let all_back = all_back(back, agents, killed).await?;
            let peak = status_bytes(server.child.id(), "VmHWM")?;
            closed(clients).await?;
            Ok(vec![all_back, peak as f64 / 1048576.0])
        },
        |_| async {
            let port = crate::free_port()?;
            let broker = PrivateMosquitto::start_on(&mosquitto, port).await?;
            eprintln!("storm: connecting {agents} MQTT clients to {}…", broker.version);
            let conns = mqtt_subscribers(&broker.addr, agents, |i| format!("agents/{i}/cmd")).await?;
            let addr = broker.addr.clone();
            let connect: Connect = Arc::new(move |i| {
                let addr = addr.clone();
                Box::pin(async move {
                    let conn = mqtt_subscribe(&addr, &format!("bench-{i}"), &format!("agents/{i}/cmd")).await.ok()?;
                    Some(Box::pin(mqtt_idle(conn)) as BoxFuture<'static, ()>)
                })
            });
            let waits = conns.into_iter().map(|c| -> BoxFuture<'static, ()> { Box::pin(mqtt_idle(c)) });
            let (back, clients) = rejoin_all(waits.collect(), connect);
            eprintln!("storm: killing Mosquitto and starting it again…");
            drop(broker);
            let killed = Instant::now();
            let broker = PrivateMosquitto::start_on(&mosquitto, port).await?;
            let all_back = all_back(back, agents, killed).await?;
            let peak = status_bytes(broker.pid(), "VmHWM")?;
            closed(clients).await?;
            Ok(vec![all_back, peak as f64 / 1048576.0])
        },
    )
    .await?;
    let row = |metric: String, unit, i: usize| Row {
        scenario: SCENARIO,
        metric,
        unit,
        tether: ours[i],
        peer: Some(("Mosquitto, MQTT clients", theirs[i])),
        target: Target::None,
    };
    Ok(vec![
        row(format!("kill → all {agents} agents connected again (reconnecting at once)"), "s", 0),
        row("peak memory of the restarted server".to_owned(), "MiB", 1),
    ])
}

/// How a client connects again: once it is back, its connection (held
/// until the server closes it).
type Connect = Arc<dyn Fn(usize) -> BoxFuture<'static, Option<BoxFuture<'static, ()>>> + Send + Sync>;

/// One task per client: waits on `waits[i]` (its connection, until the
/// server dies), then calls `connect(i)` every 20–100 ms until it succeeds
/// or [`BACK_WITHIN`] passes, reports the moment it is back and holds the
/// new connection. The tasks, and their connections, end when the
/// returned guard drops.
fn rejoin_all(waits: Vec<BoxFuture<'static, ()>>, connect: Connect) -> (mpsc::UnboundedReceiver<Instant>, AbortOnDrop) {
    let (tx, rx) = mpsc::unbounded_channel();
    let tasks: Vec<JoinHandle<()>> = waits
        .into_iter()
        .enumerate()
        .map(|(i, wait)| {
            let (tx, connect) = (tx.clone(), connect.clone());
            tokio::spawn(async move {
                wait.await;
                let given_up_at = Instant::now() + BACK_WITHIN;
                while Instant::now() < given_up_at {
                    if let Some(held) = connect(i).await {
                        let _ = tx.send(Instant::now());
                        held.await;
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(rand::random_range(20..100))).await;
                }
            })
        })
        .collect();
    (rx, AbortOnDrop(tasks))
}

/// Ends the clients' tasks and waits until their connections are closed:
/// the next round opens as many again, and one process may hold at most
/// 20,000 open files.
async fn closed(clients: AbortOnDrop) -> anyhow::Result<()> {
    drop(clients);
    let open_files = || std::fs::read_dir("/proc/self/fd").map(|d| d.count());
    let deadline = Instant::now() + Duration::from_secs(30);
    while open_files()? > 1_000 {
        if Instant::now() > deadline {
            bail!("the clients' connections were still open 30 s after they ended");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Seconds from `killed` until `n` clients reported back.
async fn all_back(mut back: mpsc::UnboundedReceiver<Instant>, n: usize, killed: Instant) -> anyhow::Result<f64> {
    let deadline = tokio::time::Instant::now() + BACK_WITHIN + Duration::from_secs(10);
    let mut last = killed;
    for i in 0..n {
        match tokio::time::timeout_at(deadline, back.recv()).await {
            Ok(Some(at)) => last = last.max(at),
            _ => bail!("only {i} of {n} clients came back within {} s", BACK_WITHIN.as_secs()),
        }
    }
    Ok(last.duration_since(killed).as_secs_f64())
}
