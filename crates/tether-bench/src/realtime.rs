//! The agent WebSocket (protocol.md §9) under load, in one run on 127.0.0.1:
//! (1) the server's memory per idle WebSocket agent with thousands
//! connected, beside a private Mosquitto's memory per idle subscribed MQTT
//! client; (2) command delivery latency over WebSocket and long-poll side by
//! side; (3) how a fleet of WebSocket agents comes back after the server is
//! killed and started again, each pacing itself with the agent's own
//! reconnect policy (`tether_client::ws::ReconnectPolicy`).
//!
//! The bench speaks raw tokio-tungstenite (and raw MQTT 3.1.1) rather than
//! the agent's client: it holds thousands of connections, so its own are
//! kept as small as possible, and it needs to see every refused handshake.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use rand::Rng;
use tether_client::ws::ReconnectPolicy;
use tether_client::{Client, Poll};
use tether_proto::agent::TokenPair;
use tether_proto::command::{CreateCommand, Target};
use tether_proto::signal::Updates;
use tether_proto::ws::{MAX_FRAME_BYTES, ServerFrame};
use tether_proto::{AgentId, CommandId, Labels};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::{Reaped, Server, Storage, enroll_many, percentile, rss_bytes, spawn_server, start_server};

#[derive(Debug, clap::Args)]
pub struct RealtimeArgs {
    /// Idle WebSocket agents (and idle MQTT clients) for the memory figures
    /// [default: 5000; 50 with --smoke].
    #[arg(long)]
    agents: Option<usize>,
    /// Agents on each transport, WebSocket and long-poll, for the latency run
    /// [default: 200; 10 with --smoke].
    #[arg(long)]
    latency_agents: Option<usize>,
    /// Commands timed per transport, one at a time, alternating
    /// [default: 500; 20 with --smoke].
    #[arg(long)]
    commands: Option<usize>,
    /// WebSocket agents connected when the server is killed
    /// [default: 1000; 50 with --smoke].
    #[arg(long)]
    reconnect_agents: Option<usize>,
    /// Seconds the server (and Mosquitto) settle before each memory reading
    /// [default: 20, past jemalloc's 10 s decay of freed pages, so the
    /// handshakes' garbage is not counted as the connections' memory; 1 with
    /// --smoke].
    #[arg(long)]
    seconds: Option<u64>,
    /// Small counts that finish in well under a minute (for CI); any count
    /// given explicitly still wins.
    #[arg(long)]
    smoke: bool,
    /// The Mosquitto broker to compare with; its row is skipped when absent.
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    mosquitto: PathBuf,
}

/// The counts of one run, smoke defaults applied.
pub(crate) struct Counts {
    agents: usize,
    latency_agents: usize,
    commands: usize,
    reconnect_agents: usize,
    settle: Duration,
}

impl RealtimeArgs {
    fn counts(&self) -> Counts {
        let pick =
            |given: Option<usize>, full: usize, smoke: usize| given.unwrap_or(if self.smoke { smoke } else { full });
        Counts {
            agents: pick(self.agents, 5000, 50),
            latency_agents: pick(self.latency_agents, 200, 10),
            commands: pick(self.commands, 500, 20),
            reconnect_agents: pick(self.reconnect_agents, 1000, 50),
            settle: Duration::from_secs(self.seconds.unwrap_or(if self.smoke { 1 } else { 20 })),
        }
    }
}

/// Handshakes in flight at once while a fleet connects: enough to connect
/// thousands in seconds, few enough not to time out on two shared cores.
pub(crate) const CONNECTING_AT_ONCE: usize = 64;
/// Every wait for the server to reach a state is bounded by this.
pub(crate) const STATE_TIMEOUT: Duration = Duration::from_secs(120);
/// A command not seen by its agent within this long fails the run.
pub(crate) const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// An agent not back this long after the restart counts as "not back".
pub(crate) const RECONNECT_TIMEOUT: Duration = Duration::from_secs(120);
/// TCP plus the upgrade, as the agent's client allows (`HANDSHAKE_TIMEOUT`).
pub(crate) const HANDSHAKE_TIMEOUT: Duration = tether_client::ws::HANDSHAKE_TIMEOUT;

pub async fn run(bin: &PathBuf, args: RealtimeArgs) -> anyhow::Result<()> {
    let n = args.counts();
    if !(1..=15_000).contains(&n.agents) || !(1..=15_000).contains(&n.reconnect_agents) {
        bail!("--agents and --reconnect-agents must be 1..=15000 (one open file each, 20,000 per process)");
    }
    if n.latency_agents == 0 || n.commands == 0 {
        bail!("--latency-agents and --commands must be at least 1");
    }

    let tether = tether_memory(bin, &n).await?;
    let mosquitto = if args.mosquitto.exists() {
        Some(mosquitto_memory(&args.mosquitto, &n).await?)
    } else {
        eprintln!("{} not found: skipping the Mosquitto comparison", args.mosquitto.display());
        None
    };
    let latency = latency(bin, &n).await?;
    let storm = reconnect_storm(bin, &n).await?;

    let mib = |b: u64| b as f64 / 1048576.0;
    let kib = |b: f64| format!("{b:.0} bytes ({:.2} KiB)", b / 1024.0);
    println!("| metric | value |");
    println!("|---|---|");
    println!(
        "| tether server RSS: agents enrolled and each polled once / with {} idle WebSockets | {:.1} / {:.1} MiB |",
        n.agents,
        mib(tether.before),
        mib(tether.after)
    );
    let per_agent = tether.per_connection(n.agents);
    println!("| **tether: server memory per idle WebSocket agent** | **{}** — target < 4 KB |", kib(per_agent));
    match &mosquitto {
        Some(m) => {
            println!(
                "| {} RSS: started / with {} idle clients, each subscribed to its own topic at QoS 1 | {:.2} / {:.2} MiB |",
                m.version,
                n.agents,
                mib(m.memory.before),
                mib(m.memory.after)
            );
            let per_client = m.memory.per_connection(n.agents);
            println!("| **Mosquitto: memory per idle subscribed MQTT client** | **{}** |", kib(per_client));
            println!("| tether ÷ Mosquitto, per connection | {:.2}× — target ≤ 2× |", per_agent / per_client.max(1.0));
        }
        None => println!("| Mosquitto | not measured ({} not found) |", args.mosquitto.display()),
    }
    println!();
    println!(
        "| transport ({} agents each, {} commands each, alternating) | POST sent → signal at the agent: p50 / p99 / max | 201 received → signal at the agent: p50 / p99 / max |",
        n.latency_agents, n.commands
    );
    println!("|---|---|---|");
    for (name, t) in [("WebSocket", &latency.websocket), ("long-poll (`wait=30`)", &latency.long_poll)] {
        println!("| {name} | {} | {} |", spread_ms(&t.from_sent), spread_ms(&t.from_created));
    }
    println!("| (POST /api/v1/commands → 201, both kinds) | {} | |", spread_ms(&latency.post));
    println!();
    println!("| reconnect storm | value |");
    println!("|---|---|");
    println!("| WebSocket agents connected when the server was killed (SIGKILL) | {} |", n.reconnect_agents);
    println!("| restart → the new server listening (same port, same data dir) | {:.0} ms |", storm.listening_ms);
    println!(
        "| agents connected again, after the restart: first / p50 / p90 / max | {:.2} / {:.2} / {:.2} / {:.2} s |",
        percentile(&storm.back_s, 0.0),
        percentile(&storm.back_s, 0.5),
        percentile(&storm.back_s, 0.9),
        storm.back_s.last().copied().unwrap_or(0.0)
    );
    println!("| agents connected again, per second after the restart | {} |", histogram(&storm.back_s));
    println!(
        "| handshakes refused by the server during the storm | {} |",
        if storm.refused.is_empty() { "none".to_owned() } else { storm.refused.clone() }
    );
    println!(
        "| connects that found no listener (server not up yet), other failed handshakes | {} , {} |",
        storm.no_listener, storm.other_failures
    );
    println!(
        "| agents back on their first attempt / needing more | {} / {} |",
        storm.first_attempt,
        storm.back_s.len() - storm.first_attempt
    );
    println!(
        "| agents not back within {} s | {} |",
        RECONNECT_TIMEOUT.as_secs(),
        n.reconnect_agents - storm.back_s.len()
    );
    println!("| server's `tether_websockets_open` once all were back | {} |", storm.open_after);
    Ok(())
}

/// `p50 / p99 / max` in milliseconds.
pub(crate) fn spread_ms(sorted: &[f64]) -> String {
    format!(
        "{:.2} / {:.2} / {:.2} ms",
        percentile(sorted, 0.5),
        percentile(sorted, 0.99),
        sorted.last().copied().unwrap_or(0.0)
    )
}

/// "0–1 s: 210 · 1–2 s: 198 · …" over whole seconds, up to the last one.
pub(crate) fn histogram(sorted_s: &[f64]) -> String {
    let Some(last) = sorted_s.last() else { return "none".to_owned() };
    let mut buckets = vec![0usize; *last as usize + 1];
    for s in sorted_s {
        buckets[*s as usize] += 1;
    }
    let cells: Vec<String> = buckets.iter().enumerate().map(|(i, n)| format!("{i}–{} s: {n}", i + 1)).collect();
    cells.join(" · ")
}

/// VmRSS of one process before and after its connections opened.
pub(crate) struct Memory {
    before: u64,
    after: u64,
}

impl Memory {
    fn per_connection(&self, connections: usize) -> f64 {
        self.after.saturating_sub(self.before) as f64 / connections as f64
    }
}

pub(crate) type Ws = WebSocketStream<TcpStream>;

/// The bench's own socket settings: the server's memory is what is
/// measured, so the bench keeps thousands of connections cheap (1 KiB read
/// buffer, frames written straight out) while still taking any frame the
/// server may send.
pub(crate) fn client_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES))
}

/// Why a WebSocket handshake failed.
#[derive(Debug)]
pub(crate) enum Refused {
    /// No TCP connection (nothing listening yet).
    Tcp(std::io::Error),
    /// The server answered the upgrade with this status (and `Retry-After`).
    Status(u16, Option<u64>),
    /// Anything else: reset mid-handshake, timed out.
    Other(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Tcp(e) => write!(f, "TCP connect failed: {e}"),
            Refused::Status(s, _) => write!(f, "upgrade answered {s}"),
            Refused::Other(e) => write!(f, "handshake failed: {e}"),
        }
    }
}

/// Opens `GET /api/v1/agents/self/ws` as the agent holding `token`, within
/// [`HANDSHAKE_TIMEOUT`].
pub(crate) async fn ws_connect(addr: &str, token: &str) -> Result<Ws, Refused> {
    let attempt = async {
        let tcp = TcpStream::connect(addr).await.map_err(Refused::Tcp)?;
        // Frames are small and latency is measured: no Nagle delay.
        tcp.set_nodelay(true).map_err(|e| Refused::Other(e.to_string()))?;
        let mut request = format!("ws://{addr}{}", tether_proto::ws::PATH)
            .into_client_request()
            .map_err(|e| Refused::Other(e.to_string()))?;
        let bearer = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| Refused::Other(e.to_string()))?;
        request.headers_mut().insert(header::AUTHORIZATION, bearer);
        match tokio_tungstenite::client_async_with_config(request, tcp, Some(client_config())).await {
            Ok((ws, _)) => Ok(ws),
            Err(tungstenite::Error::Http(response)) => {
                let retry_after = response
                    .headers()
                    .get(header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse().ok());
                Err(Refused::Status(response.status().as_u16(), retry_after))
            }
            Err(e) => Err(Refused::Other(e.to_string())),
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt).await.unwrap_or_else(|_| Err(Refused::Other("timed out".into())))
}

/// Connects every agent of `pairs` ([`CONNECTING_AT_ONCE`] handshakes at a
/// time); fails on the first refusal.
pub(crate) async fn connect_all(addr: &str, pairs: &[TokenPair]) -> anyhow::Result<Vec<Ws>> {
    let all: Vec<Result<Ws, Refused>> = futures::stream::iter(pairs)
        .map(|p| ws_connect(addr, &p.access_token))
        .buffer_unordered(CONNECTING_AT_ONCE)
        .collect()
        .await;
    let mut open = Vec::with_capacity(all.len());
    for ws in all {
        open.push(ws.map_err(|e| anyhow::anyhow!("opening an agent WebSocket: {e}"))?);
    }
    Ok(open)
}

/// Reads `ws` until it ends, handing each signals frame to `on_signals`.
/// Reading is also what answers the server's pings (tungstenite queues the
/// pong and writes it on the next read).
pub(crate) async fn drain(ws: &mut Ws, mut on_signals: impl FnMut(Updates)) {
    while let Some(Ok(msg)) = ws.next().await {
        match msg {
            Message::Text(text) => {
                if let Ok(ServerFrame::Signals(updates)) = serde_json::from_str(text.as_str()) {
                    on_signals(updates);
                }
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
}

/// Aborts a fleet's reader tasks (closing their connections) when dropped,
/// also when a run fails half-way.
pub(crate) struct AbortOnDrop(pub(crate) Vec<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Connects every agent of `pairs` to `server` and waits until the server
/// counts them all open. Each connection reports the `command.queued`
/// signals it reads to the receiver returned, until the tasks are dropped.
pub(crate) async fn listening_fleet(
    server: &Server,
    pairs: &[TokenPair],
) -> anyhow::Result<(AbortOnDrop, mpsc::UnboundedReceiver<Arrival>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let readers = connect_all(&server.addr, pairs)
        .await?
        .into_iter()
        .map(|mut ws| {
            let tx = tx.clone();
            tokio::spawn(async move { drain(&mut ws, |u| report_arrivals(&u, &tx)).await })
        })
        .collect();
    let readers = AbortOnDrop(readers);
    wait_for_gauge(&reqwest::Client::new(), server, "tether_websockets_open", pairs.len()).await?;
    Ok((readers, rx))
}

/// A value of the server's Prometheus text (`GET /metrics`): `name`
/// without labels, 0 when the series does not exist yet.
pub(crate) async fn gauge(http: &reqwest::Client, server: &Server, name: &str) -> anyhow::Result<f64> {
    let text = http.get(format!("{}/metrics", server.base)).send().await?.error_for_status()?.text().await?;
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        if parts.next() == Some(name) {
            return Ok(parts.next().context("a series without a value")?.parse()?);
        }
    }
    Ok(0.0)
}

/// Waits (at most [`STATE_TIMEOUT`]) until the server's gauge `name` reads `want`.
pub(crate) async fn wait_for_gauge(
    http: &reqwest::Client,
    server: &Server,
    name: &str,
    want: usize,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let value = gauge(http, server, name).await?;
        if value as usize == want {
            return Ok(());
        }
        if started.elapsed() > STATE_TIMEOUT {
            bail!("{name} is {value} after {} s, expected {want}", STATE_TIMEOUT.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One wait=0 poll per agent: loads each agent's stream into the server's
/// memory, as the long-poll memory run does (`cursor_of`), so the
/// connections' growth is measured apart from the streams'.
pub(crate) async fn poll_each_once(server: &Server, pairs: &[TokenPair]) -> anyhow::Result<()> {
    let client = Client::new(&server.base)?;
    let polls: Vec<_> = futures::stream::iter(pairs)
        .map(|p| {
            let agent = client.clone().with_bearer(p.access_token.clone());
            async move { agent.updates(None, 20, 0).await }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for poll in polls {
        poll?;
    }
    Ok(())
}

pub(crate) async fn tether_memory(bin: &PathBuf, n: &Counts) -> anyhow::Result<Memory> {
    let server = start_server(bin, &Storage::Sqlite)?;
    let http = reqwest::Client::new();
    eprintln!("memory: enrolling {} agents…", n.agents);
    let pairs = enroll_many(&server, n.agents, Labels::new()).await?;
    poll_each_once(&server, &pairs).await?;
    tokio::time::sleep(n.settle).await;
    let before = rss_bytes(server.child.id())?;
    let after = idle_websockets(&http, &server, &pairs, n).await?;
    let memory = Memory { before, after };
    eprintln!("memory: {:.0} bytes per WebSocket", memory.per_connection(n.agents));
    Ok(memory)
}

/// Opens a WebSocket for every agent of `pairs`, reads the server's RSS once
/// they have idled for the settle time, and closes them all again.
pub(crate) async fn idle_websockets(
    http: &reqwest::Client,
    server: &Server,
    pairs: &[TokenPair],
    n: &Counts,
) -> anyhow::Result<u64> {
    eprintln!("memory: opening {} WebSockets…", pairs.len());
    let open = connect_all(&server.addr, pairs).await?;
    let readers: Vec<JoinHandle<()>> =
        open.into_iter().map(|mut ws| tokio::spawn(async move { drain(&mut ws, |_| {}).await })).collect();
    wait_for_gauge(http, server, "tether_websockets_open", pairs.len()).await?;
    // Connecting marks each agent seen; the presence round (every 5 s) and
    // the last_seen flush run meanwhile. Let them pass before reading.
    tokio::time::sleep(n.settle).await;
    let rss = rss_bytes(server.child.id())?;
    // Still all there: none was closed while idle.
    wait_for_gauge(http, server, "tether_websockets_open", pairs.len()).await?;
    for r in &readers {
        r.abort();
    }
    wait_for_gauge(http, server, "tether_websockets_open", 0).await?;
    Ok(rss)
}

pub(crate) struct Mosquitto {
    version: String,
    memory: Memory,
}

/// A private Mosquitto on a free 127.0.0.1 port (never the system one on
/// 1883), killed when dropped; errors only in its log.
pub(crate) struct PrivateMosquitto {
    broker: Reaped,
    pub(crate) addr: String,
    /// "Mosquitto 2.0.21", from `mosquitto -h`.
    pub(crate) version: String,
    dir: tempfile::TempDir,
}

impl PrivateMosquitto {
    /// Starts `bin` on a free port and returns once it accepts connections
    /// (within 10 s).
    pub(crate) async fn start(bin: &Path) -> anyhow::Result<Self> {
        Self::start_on(bin, crate::free_port()?).await
    }

    /// [`PrivateMosquitto::start`] on `port`.
    pub(crate) async fn start_on(bin: &Path, port: u16) -> anyhow::Result<Self> {
        let version = std::process::Command::new(bin).arg("-h").output().ok().and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let line = text.lines().next()?.trim().to_owned();
            line.strip_prefix("mosquitto version ").map(|v| format!("Mosquitto {v}"))
        });
        let version = version.unwrap_or_else(|| "Mosquitto".to_owned());
        let dir = tempfile::tempdir()?;
        let conf = dir.path().join("mosquitto.conf");
        // Connection notices for thousands of clients are noise: errors only.
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_connections -1\nlog_dest stderr\nlog_type error\n"
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("mosquitto.log"))?;
        let broker = std::process::Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .map(Reaped)
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut mosquitto = PrivateMosquitto { broker, addr: format!("127.0.0.1:{port}"), version, dir };
        let started = Instant::now();
        while TcpStream::connect(&mosquitto.addr).await.is_err() {
            if started.elapsed() > Duration::from_secs(10) || mosquitto.broker.0.try_wait()?.is_some() {
                bail!("mosquitto did not listen on {}: {}", mosquitto.addr, mosquitto.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(mosquitto)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.broker.0.id()
    }

    /// What the broker logged (errors only).
    pub(crate) fn log_tail(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// Fails, with the broker's log, when it has exited.
    pub(crate) fn check_running(&mut self) -> anyhow::Result<()> {
        if self.broker.0.try_wait()?.is_some() {
            bail!("mosquitto exited during the run: {}", self.log_tail());
        }
        Ok(())
    }
}

/// A private Mosquitto and `n.agents` MQTT 3.1.1 clients, each subscribed
/// to `agents/<i>/cmd` at QoS 1.
pub(crate) async fn mosquitto_memory(bin: &Path, n: &Counts) -> anyhow::Result<Mosquitto> {
    let mut broker = PrivateMosquitto::start(bin).await?;
    tokio::time::sleep(n.settle).await;
    let before = rss_bytes(broker.pid())?;

    eprintln!("memory: {} MQTT clients on {}…", n.agents, broker.version);
    let clients = mqtt_subscribers(&broker.addr, n.agents, |i| format!("agents/{i}/cmd"))
        .await
        .with_context(|| format!("an MQTT client: {}", broker.log_tail()))?;
    let readers: Vec<JoinHandle<()>> = clients.into_iter().map(|c| tokio::spawn(mqtt_idle(c))).collect();
    tokio::time::sleep(n.settle).await;
    let after = rss_bytes(broker.pid())?;
    broker.check_running()?;
    for r in &readers {
        r.abort();
    }
    Ok(Mosquitto { version: broker.version.clone(), memory: Memory { before, after } })
}

/// The MQTT keep-alive the clients announce; they ping at half of it.
pub(crate) const MQTT_KEEPALIVE_S: u16 = 60;

/// An MQTT "remaining length": 7 bits a byte, low first.
pub(crate) fn push_remaining_length(mut len: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

pub(crate) fn push_mqtt_string(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A packet of `kind` (the fixed header's first byte) around `body`.
pub(crate) fn mqtt_packet(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut packet = vec![kind];
    push_remaining_length(body.len(), &mut packet);
    packet.extend_from_slice(body);
    packet
}

/// CONNECT, MQTT 3.1.1, clean session, no credentials.
pub(crate) fn mqtt_connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(32);
    push_mqtt_string("MQTT", &mut body);
    body.push(4); // protocol level 4 = 3.1.1
    body.push(0x02); // clean session
    body.extend_from_slice(&MQTT_KEEPALIVE_S.to_be_bytes());
    push_mqtt_string(client_id, &mut body);
    mqtt_packet(0x10, &body)
}

/// SUBSCRIBE to one topic filter at `qos`.
pub(crate) fn mqtt_subscribe_packet(packet_id: u16, topic: &str, qos: u8) -> Vec<u8> {
    let mut body = Vec::with_capacity(32);
    body.extend_from_slice(&packet_id.to_be_bytes());
    push_mqtt_string(topic, &mut body);
    body.push(qos);
    mqtt_packet(0x82, &body)
}

/// PUBLISH `payload` to `topic` at QoS 1 as packet `packet_id`.
pub(crate) fn mqtt_publish_packet(packet_id: u16, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(topic.len() + payload.len() + 4);
    push_mqtt_string(topic, &mut body);
    body.extend_from_slice(&packet_id.to_be_bytes());
    body.extend_from_slice(payload);
    mqtt_packet(0x32, &body)
}

/// The whole packet at the front of `buf`, if it has arrived: its first
/// byte, where its body starts and where it ends.
fn mqtt_frame(buf: &[u8]) -> Option<(u8, usize, usize)> {
    let mut len = 0usize;
    for i in 1..buf.len().min(5) {
        len |= usize::from(buf[i] & 0x7f) << (7 * (i - 1));
        if buf[i] & 0x80 == 0 {
            let end = i + 1 + len;
            return (buf.len() >= end).then_some((buf[0], i + 1, end));
        }
    }
    None
}

/// A PUBLISH body's packet id (QoS 1 and 2 carry one) and payload.
fn mqtt_publish_parts(first: u8, body: &[u8]) -> Option<(Option<u16>, &[u8])> {
    let mut at = 2 + usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    let id = if first & 0x06 != 0 {
        at += 2;
        Some(u16::from_be_bytes([*body.get(at - 2)?, *body.get(at - 1)?]))
    } else {
        None
    };
    Some((id, body.get(at..)?))
}

/// Connects as `client_id` (clean session) and waits for the CONNACK.
pub(crate) async fn mqtt_connect(addr: &str, client_id: &str) -> anyhow::Result<TcpStream> {
    let handshake = async {
        let mut conn = TcpStream::connect(addr).await?;
        conn.set_nodelay(true)?;
        conn.write_all(&mqtt_connect_packet(client_id)).await?;
        let mut connack = [0u8; 4];
        conn.read_exact(&mut connack).await?;
        if connack[0] != 0x20 || connack[3] != 0 {
            bail!("CONNACK {connack:02x?}");
        }
        Ok(conn)
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await.context("MQTT connect timed out")?
}

/// Connects `client_id`, subscribes it to `topic` at QoS 1, and returns the
/// connection once the broker granted QoS 1.
pub(crate) async fn mqtt_subscribe(addr: &str, client_id: &str, topic: &str) -> anyhow::Result<TcpStream> {
    let mut conn = mqtt_connect(addr, client_id).await?;
    let subscribe = async {
        conn.write_all(&mqtt_subscribe_packet(1, topic, 1)).await?;
        let mut suback = [0u8; 5];
        conn.read_exact(&mut suback).await?;
        if suback[0] != 0x90 || suback[4] != 1 {
            bail!("SUBACK {suback:02x?}: QoS 1 not granted");
        }
        Ok(())
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, subscribe).await.context("MQTT subscribe timed out")??;
    Ok(conn)
}

/// `n` clients (`bench-<i>`), client `i` subscribed at QoS 1 to `topic(i)`,
/// [`CONNECTING_AT_ONCE`] handshakes at a time; in no particular order.
pub(crate) async fn mqtt_subscribers(
    addr: &str,
    n: usize,
    topic: impl Fn(usize) -> String,
) -> anyhow::Result<Vec<TcpStream>> {
    let clients: Vec<anyhow::Result<TcpStream>> = futures::stream::iter(0..n)
        .map(|i| {
            let topic = topic(i);
            async move { mqtt_subscribe(addr, &format!("bench-{i}"), &topic).await }
        })
        .buffer_unordered(CONNECTING_AT_ONCE)
        .collect()
        .await;
    clients.into_iter().collect()
}

/// Keeps an MQTT client alive (PINGREQ at half the keep-alive) and reads
/// whatever the broker sends, until the broker closes or the task is
/// aborted: each PUBLISH's payload goes to `on_publish` with the moment it
/// was read, and a QoS 1 one is acknowledged (PUBACK) at once.
pub(crate) async fn mqtt_client(mut conn: TcpStream, mut on_publish: impl FnMut(&[u8], Instant)) {
    let half = Duration::from_secs(u64::from(MQTT_KEEPALIVE_S) / 2);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + half, half);
    let mut buf = Vec::with_capacity(64);
    loop {
        tokio::select! {
            read = conn.read_buf(&mut buf) => {
                if !matches!(read, Ok(n) if n > 0) {
                    return;
                }
                let now = Instant::now();
                while let Some((first, body, end)) = mqtt_frame(&buf) {
                    if first >> 4 == 3 && let Some((id, payload)) = mqtt_publish_parts(first, &buf[body..end]) {
                        on_publish(payload, now);
                        if let Some(id) = id.filter(|_| first & 0x06 == 0x02) {
                            let [hi, lo] = id.to_be_bytes();
                            if conn.write_all(&[0x40, 0x02, hi, lo]).await.is_err() {
                                return;
                            }
                        }
                    }
                    buf.drain(..end);
                }
            }
            _ = ping.tick() => if conn.write_all(&[0xC0, 0x00]).await.is_err() { return },
        }
    }
}

/// An idle MQTT client: [`mqtt_client`] ignoring what it receives.
pub(crate) async fn mqtt_idle(conn: TcpStream) {
    mqtt_client(conn, |_, _| {}).await
}

/// Delivery latencies of one transport, sorted, in milliseconds.
#[derive(Default)]
pub(crate) struct Timings {
    from_sent: Vec<f64>,
    /// Negative when the signal reached the agent before the 201 reached
    /// the operator (the wake-up and the response race after the commit).
    from_created: Vec<f64>,
}

pub(crate) struct Latency {
    websocket: Timings,
    long_poll: Timings,
    post: Vec<f64>,
}

/// A `command.queued` signal as one agent saw it.
pub(crate) type Arrival = (CommandId, Instant);

/// Sends every `command.queued` id in `updates` to `tx`, stamped now.
pub(crate) fn report_arrivals(updates: &Updates, tx: &mpsc::UnboundedSender<Arrival>) {
    let now = Instant::now();
    for signal in &updates.signals {
        if signal.kind != "command.queued" {
            continue;
        }
        if let Some(id) = signal.reference.get("command_id").and_then(|v| serde_json::from_value(v.clone()).ok()) {
            let _ = tx.send((id, now));
        }
    }
}

/// A long-poll agent as the daemon runs one: `wait=30`, the cursor of each
/// answer, and the next poll at once.
pub(crate) async fn long_poll_agent(agent: Client, tx: mpsc::UnboundedSender<Arrival>) -> anyhow::Result<()> {
    let mut cursor: Option<String> = None;
    loop {
        match agent.updates(cursor.as_deref(), 20, 30).await? {
            Poll::Signals(updates) => {
                report_arrivals(&updates, &tx);
                cursor = Some(updates.cursor);
            }
            Poll::Idle { cursor: c } => cursor = Some(c),
        }
        if tx.is_closed() {
            return Ok(());
        }
    }
}

/// Waits for `id` (a command, or a message of the MQTT runs) to have
/// arrived at its agent, keeping arrivals of others (there are none unless
/// one was late) in `seen`.
pub(crate) async fn arrival_of<K: Copy + Eq + std::hash::Hash + std::fmt::Display>(
    id: K,
    rx: &mut mpsc::UnboundedReceiver<(K, Instant)>,
    seen: &mut HashMap<K, Instant>,
) -> anyhow::Result<Instant> {
    let wait = async {
        loop {
            if let Some(at) = seen.remove(&id) {
                return Ok(at);
            }
            let (got, at) = rx.recv().await.context("every agent task ended")?;
            seen.insert(got, at);
        }
    };
    tokio::time::timeout(DELIVERY_TIMEOUT, wait)
        .await
        .with_context(|| format!("{id} not seen by its receiver within {} s", DELIVERY_TIMEOUT.as_secs()))?
}

/// Signed milliseconds from `from` to `to`.
pub(crate) fn signed_ms(from: Instant, to: Instant) -> f64 {
    match to.checked_duration_since(from) {
        Some(d) => d.as_secs_f64() * 1000.0,
        None => -(from.duration_since(to).as_secs_f64() * 1000.0),
    }
}

pub(crate) async fn latency(bin: &PathBuf, n: &Counts) -> anyhow::Result<Latency> {
    let server = start_server(bin, &Storage::Sqlite)?;
    let http = reqwest::Client::new();
    eprintln!("latency: enrolling {} agents…", 2 * n.latency_agents);
    let pairs = enroll_many(&server, 2 * n.latency_agents, Labels::new()).await?;
    let (ws_pairs, lp_pairs) = pairs.split_at(n.latency_agents);
    let (tx, mut rx) = mpsc::unbounded_channel::<Arrival>();

    let mut agents: Vec<JoinHandle<()>> = Vec::new();
    for mut ws in connect_all(&server.addr, ws_pairs).await? {
        let tx = tx.clone();
        agents.push(tokio::spawn(async move { drain(&mut ws, |u| report_arrivals(&u, &tx)).await }));
    }
    let client = Client::new(&server.base)?;
    for pair in lp_pairs {
        let agent = client.clone().with_bearer(pair.access_token.clone());
        let tx = tx.clone();
        agents.push(tokio::spawn(async move {
            if let Err(e) = long_poll_agent(agent, tx).await {
                eprintln!("a long-poll agent stopped: {e:#}");
            }
        }));
    }
    drop(tx);
    wait_for_gauge(&http, &server, "tether_websockets_open", n.latency_agents).await?;
    wait_for_gauge(&http, &server, "tether_parked_polls", n.latency_agents).await?;

    eprintln!("latency: {} commands per transport…", n.commands);
    let admin = Client::new(&server.base)?.with_bearer(server.admin_token.clone());
    let ids = |p: &[TokenPair]| p.iter().map(|p| p.agent_id).collect::<Vec<AgentId>>();
    let (ws_ids, lp_ids) = (ids(ws_pairs), ids(lp_pairs));
    let mut rng = rand::rng();
    let (mut websocket, mut long_poll, mut post) = (Timings::default(), Timings::default(), Vec::new());
    let mut seen = HashMap::new();
    for i in 0..2 * n.commands {
        let (ids, timings) = if i % 2 == 0 { (&ws_ids, &mut websocket) } else { (&lp_ids, &mut long_poll) };
        let agent = ids[rng.random_range(0..ids.len())];
        let sent = Instant::now();
        let created = admin.create_command(&CreateCommand::new(Target::agents([agent]), "ping")).await?;
        let answered = Instant::now();
        let id = *created.command_ids.first().context("no command created")?;
        let at = arrival_of(id, &mut rx, &mut seen).await?;
        timings.from_sent.push(signed_ms(sent, at));
        timings.from_created.push(signed_ms(answered, at));
        post.push(signed_ms(sent, answered));
    }
    for a in &agents {
        a.abort();
    }
    for t in [&mut websocket, &mut long_poll] {
        t.from_sent.sort_by(f64::total_cmp);
        t.from_created.sort_by(f64::total_cmp);
    }
    post.sort_by(f64::total_cmp);
    Ok(Latency { websocket, long_poll, post })
}

/// What the storm's handshakes met, counted across all agents.
#[derive(Default)]
pub(crate) struct StormCounts {
    no_listener: AtomicU64,
    status_429: AtomicU64,
    status_503: AtomicU64,
    status_other: AtomicU64,
    other: AtomicU64,
}

pub(crate) struct Storm {
    listening_ms: f64,
    /// Seconds from the restart to each agent's new connection, sorted.
    back_s: Vec<f64>,
    first_attempt: usize,
    refused: String,
    no_listener: u64,
    other_failures: u64,
    open_after: f64,
}

/// One agent through the storm: reads its connection until the server dies,
/// then reconnects paced by `policy` exactly as the agent daemon paces a
/// WebSocket (`delay(attempt)`, attempt 0 first, never sooner than a
/// `Retry-After`), reports when it is back and how many tries it took, and
/// keeps reading until aborted.
pub(crate) async fn storm_agent(
    addr: String,
    token: String,
    mut ws: Ws,
    policy: ReconnectPolicy,
    counts: Arc<StormCounts>,
    back: mpsc::UnboundedSender<(Instant, u32)>,
) {
    drain(&mut ws, |_| {}).await;
    drop(ws);
    let given_up_at = Instant::now() + RECONNECT_TIMEOUT;
    let mut attempt = 0u32;
    let mut retry_after = Duration::ZERO;
    loop {
        let delay = policy.delay(attempt, rand::random::<f64>()).max(retry_after);
        attempt += 1;
        if Instant::now() + delay > given_up_at {
            return;
        }
        tokio::time::sleep(delay).await;
        retry_after = Duration::ZERO;
        match ws_connect(&addr, &token).await {
            Ok(mut ws) => {
                let _ = back.send((Instant::now(), attempt));
                drain(&mut ws, |_| {}).await;
                return;
            }
            Err(Refused::Tcp(_)) => counts.no_listener.fetch_add(1, Ordering::Relaxed),
            Err(Refused::Status(status, after)) => {
                retry_after = Duration::from_secs(after.unwrap_or(0));
                match status {
                    429 => counts.status_429.fetch_add(1, Ordering::Relaxed),
                    503 => counts.status_503.fetch_add(1, Ordering::Relaxed),
                    _ => counts.status_other.fetch_add(1, Ordering::Relaxed),
                }
            }
            Err(Refused::Other(_)) => counts.other.fetch_add(1, Ordering::Relaxed),
        };
    }
}

pub(crate) async fn reconnect_storm(bin: &PathBuf, n: &Counts) -> anyhow::Result<Storm> {
    let mut server = start_server(bin, &Storage::Sqlite)?;
    let http = reqwest::Client::new();
    eprintln!("reconnect: enrolling and connecting {} agents…", n.reconnect_agents);
    let pairs = enroll_many(&server, n.reconnect_agents, Labels::new()).await?;
    let open = connect_all(&server.addr, &pairs).await?;
    let counts = Arc::new(StormCounts::default());
    let (back_tx, mut back_rx) = mpsc::unbounded_channel();
    let agents: Vec<JoinHandle<()>> = pairs
        .iter()
        .zip(open)
        .map(|(pair, ws)| {
            tokio::spawn(storm_agent(
                server.addr.clone(),
                pair.access_token.clone(),
                ws,
                ReconnectPolicy::default(),
                counts.clone(),
                back_tx.clone(),
            ))
        })
        .collect();
    drop(back_tx);
    wait_for_gauge(&http, &server, "tether_websockets_open", n.reconnect_agents).await?;

    eprintln!("reconnect: killing the server and starting it again…");
    server.child.kill()?;
    server.child.wait()?;
    let restarted = Instant::now();
    // Start it on the same port and data dir; reading its first line
    // blocks, so off the runtime threads the agents' timers run on.
    let (dir, addr) = (server._dir.path().to_owned(), server.addr.clone());
    let bin_again = bin.clone();
    let (child, _) = tokio::task::spawn_blocking(move || spawn_server(&bin_again, &dir, &addr, None)).await??;
    let listening_ms = restarted.elapsed().as_secs_f64() * 1000.0;
    server.child = child;

    let mut back_s = Vec::with_capacity(n.reconnect_agents);
    let mut first_attempt = 0;
    let deadline = tokio::time::Instant::now() + RECONNECT_TIMEOUT + HANDSHAKE_TIMEOUT;
    while back_s.len() < n.reconnect_agents {
        match tokio::time::timeout_at(deadline, back_rx.recv()).await {
            Ok(Some((at, attempts))) => {
                back_s.push(at.saturating_duration_since(restarted).as_secs_f64());
                if attempts == 1 {
                    first_attempt += 1;
                }
            }
            // Every agent task ended (the rest gave up), or time is up.
            Ok(None) | Err(_) => break,
        }
    }
    back_s.sort_by(f64::total_cmp);
    let open_after = gauge(&http, &server, "tether_websockets_open").await?;
    for a in &agents {
        a.abort();
    }
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let refused: Vec<String> = [
        ("429", load(&counts.status_429)),
        ("503", load(&counts.status_503)),
        ("other status", load(&counts.status_other)),
    ]
    .iter()
    .filter(|(_, n)| *n > 0)
    .map(|(s, n)| format!("{s}: {n}"))
    .collect();
    Ok(Storm {
        listening_ms,
        back_s,
        first_attempt,
        refused: refused.join(", "),
        no_listener: load(&counts.no_listener),
        other_failures: load(&counts.other),
        open_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_packets_are_byte_exact() {
        assert_eq!(
            mqtt_connect_packet("c1"),
            [0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'c', b'1']
        );
        assert_eq!(mqtt_subscribe_packet(1, "a/b", 1), [0x82, 8, 0, 1, 0, 3, b'a', b'/', b'b', 1]);
        let publish = mqtt_publish_packet(7, "a/b", b"hi");
        assert_eq!(publish, [0x32, 9, 0, 3, b'a', b'/', b'b', 0, 7, b'h', b'i']);
        assert_eq!(mqtt_frame(&publish[..5]), None, "not all there yet");
        let (first, body, end) = mqtt_frame(&publish).unwrap();
        assert_eq!((first, end), (0x32, publish.len()));
        assert_eq!(mqtt_publish_parts(first, &publish[body..end]), Some((Some(7), &b"hi"[..])));
        let qos0 = mqtt_packet(0x30, &[0, 1, b't', b'x']);
        assert_eq!(mqtt_publish_parts(0x30, &qos0[2..]), Some((None, &b"x"[..])));
        let mut len = Vec::new();
        push_remaining_length(321, &mut len);
        assert_eq!(len, [0xC1, 0x02], "the MQTT spec's own example");
    }

    #[test]
    fn the_histogram_counts_whole_seconds() {
        assert_eq!(histogram(&[0.1, 0.9, 2.5]), "0–1 s: 2 · 1–2 s: 0 · 2–3 s: 1");
        assert_eq!(histogram(&[]), "none");
    }
}
