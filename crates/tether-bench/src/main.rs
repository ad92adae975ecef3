//! `tether-bench`: starts release `tether server`s in temp dirs (on their
//! embedded SQLite, or on a scratch PostgreSQL database) and measures them.
//! The ratio scenarios (`peers`) run a peer program beside tether in the
//! same run — nginx `return 204`, a private Mosquitto, `pgbench` — and
//! report tether's figures as ratios of the peer's: idle polls, memory per
//! idle agent, fan-out, delivery latency (one server and two replicas),
//! durable results and a reconnect storm. The other runs measure the agent's
//! own footprint, a flood of wrong passwords, a label-scope configuration
//! change, certificate replacement and telemetry ingest. Each prints a table.

mod certs;
mod config;
mod peers;
mod realtime;
mod results;
mod telemetry;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use clap::Parser;
use futures::StreamExt;
use tether_client::{Client, Poll};
use tether_proto::Labels;
use tether_proto::agent::{CreateEnrollToken, EnrollRequest, TokenPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Parser)]
#[command(about = "Benchmarks tether: the agent stream on the server, and the agent itself")]
struct Cli {
    /// The `tether` binary to benchmark (default: next to this one).
    #[arg(long, global = true)]
    tether: Option<PathBuf>,
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Debug, clap::Subcommand)]
enum Bench {
    /// Agent idle RSS and CPU, and command receipt latency.
    Agent(AgentArgs),
    /// Concurrent wrong-password HTTP Basic guesses from one address: argon2
    /// runs, server memory, and another user's latency meanwhile.
    PasswordFlood(FloodArgs),
    /// A label-scope configuration change to thousands of agents: the write,
    /// and its `config.updated` reaching every parked long-poll.
    Config(config::ConfigArgs),
    /// An uploaded certificate's replacement reaching a thousand holders:
    /// `cert.renewed` on every parked long-poll, then the new material fetched.
    Certs(certs::CertsArgs),
    /// Heartbeats per second from a fleet (each committed before its 200),
    /// and metric points per second in 5,000-point gzip batches.
    Telemetry(telemetry::TelemetryArgs),
    /// The agent WebSocket: server memory per idle connection beside
    /// Mosquitto's per MQTT client, delivery latency beside long-poll, and
    /// the reconnect spread after the server is killed and restarted.
    Realtime(realtime::RealtimeArgs),
    /// Every ratio scenario below in turn, then one table of ratios.
    All(peers::PeerArgs),
    /// Idle-poll throughput and latency beside nginx `return 204`.
    IdlePoll(peers::PeerArgs),
    /// Server memory per idle agent on long-poll and WebSocket beside
    /// Mosquitto per idle subscribed client.
    Held(peers::PeerArgs),
    /// One command to 10,000 agents by label beside one Mosquitto QoS 1
    /// publish to 10,000 subscribers.
    FanOut(peers::PeerArgs),
    /// Enqueue → receipt with 1,000 idle agents, one server and two
    /// replicas, beside Mosquitto publish → receipt.
    Latency(peers::PeerArgs),
    /// Durable command results per second beside pgbench simple-update.
    Durable(peers::PeerArgs),
    /// 10,000 agents reconnecting at once after a restart, beside Mosquitto.
    Storm(peers::PeerArgs),
}

#[derive(Debug, clap::Args)]
struct FloodArgs {
    /// Wrong-password requests for `admin`, all sent at once from 127.0.0.1.
    #[arg(long, default_value_t = 3000)]
    requests: usize,
}

#[derive(Debug, clap::Args)]
struct AgentArgs {
    /// Run the agent as `tether agent` (the all-in-one binary) instead of the slim `tether-agent`.
    #[arg(long)]
    all_in_one: bool,
    /// How long to watch the idle agent, in seconds.
    #[arg(long, default_value_t = 60)]
    idle_seconds: u64,
    /// Commands to time from creation to the agent starting them.
    #[arg(long, default_value_t = 1000)]
    commands: usize,
}

struct Server {
    child: Child,
    base: String,
    addr: String,
    admin_token: String,
    _dir: tempfile::TempDir,
}

/// Where a benchmarked server keeps its data.
enum Storage {
    Sqlite,
    /// A scratch database, dropped with this value.
    Postgres(tether_testkit::pg::TestDatabase),
}

impl Storage {
    async fn new(postgres: Option<&str>) -> Self {
        match postgres {
            Some(url) => Storage::Postgres(tether_testkit::pg::TestDatabase::create_on(url).await),
            None => Storage::Sqlite,
        }
    }

    fn database_url(&self) -> Option<&str> {
        match self {
            Storage::Sqlite => None,
            Storage::Postgres(db) => Some(&db.url),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Storage::Sqlite => "SQLite (WAL, synchronous=FULL)",
            Storage::Postgres(_) => "PostgreSQL",
        }
    }
}

/// A free loopback port for a peer program to listen on, below the
/// kernel's ephemeral range (32768 and up): a port handed out by binding
/// port 0 may be the source port of one of the bench's own connections,
/// and a peer told to listen there could fail to bind it.
fn free_port() -> anyhow::Result<u16> {
    use rand::Rng;
    for _ in 0..1_000 {
        let port = rand::rng().random_range(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port between 20000 and 32000")
}

/// A child process killed when dropped, so a failed run leaves nothing behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(bin: &PathBuf, storage: &Storage) -> anyhow::Result<Server> {
    start_server_with(bin, storage, &[], None, &[])
}

/// [`start_server`] with more `tether server` flags (`--nats-url`,
/// `--cluster`). With `admin_token` the server joins a database another
/// server set up (it writes no initial-admin.txt then) and is driven with
/// that server's admin token. `env`: more variables in its environment.
fn start_server_with(
    bin: &PathBuf,
    storage: &Storage,
    flags: &[&str],
    admin_token: Option<&str>,
    env: &[(&str, &str)],
) -> anyhow::Result<Server> {
    // Port 0: the server picks a free port and names it in its "listening" line.
    start_server_on(bin, "127.0.0.1:0", storage, flags, admin_token, env)
}

/// [`start_server_with`] listening on `listen`.
fn start_server_on(
    bin: &PathBuf,
    listen: &str,
    storage: &Storage,
    flags: &[&str],
    admin_token: Option<&str>,
    env: &[(&str, &str)],
) -> anyhow::Result<Server> {
    let dir = tempfile::tempdir()?;
    // Polls, commands and reports at full speed would hit the protocol.md §11 limits
    // (1 immediate poll/s per agent, 10 req/s per agent, 20 req/s per user):
    // lift them, since this measures the cost of an answer, not the limits.
    let config = dir.path().join("server.toml");
    let mut limits = String::from("[limits]\n");
    for name in ["poll", "ip", "agent", "user"] {
        limits.push_str(&format!("{name}_per_s = 1000000\n{name}_burst = 1000000\n"));
    }
    std::fs::write(&config, limits)?;
    let (child, base) = spawn_server_with(bin, dir.path(), listen, storage.database_url(), flags, env)?;
    let addr = base.strip_prefix("http://").context("a plain HTTP server")?.to_owned();
    let admin_token = match admin_token {
        Some(token) => token.to_owned(),
        None => {
            // Stdout is a pipe, so the first admin's token is only in the file.
            let text = std::fs::read_to_string(dir.path().join("data/initial-admin.txt"))
                .context("reading initial-admin.txt")?;
            text.lines().find_map(|l| l.strip_prefix("api_token: ")).context("no api_token")?.to_owned()
        }
    };
    Ok(Server { child, base, addr, admin_token, _dir: dir })
}

/// Starts `tether server` on `listen` with the configuration and data dir
/// [`start_server`] laid out in `dir`; returns once it says where it
/// listens (blocking: its first line may take a moment), with that URL.
/// Also used to start a killed server again on the same port and data.
fn spawn_server(
    bin: &PathBuf,
    dir: &std::path::Path,
    listen: &str,
    database_url: Option<&str>,
) -> anyhow::Result<(Child, String)> {
    spawn_server_with(bin, dir, listen, database_url, &[], &[])
}

/// [`spawn_server`] with more `tether server` flags and environment variables.
fn spawn_server_with(
    bin: &PathBuf,
    dir: &std::path::Path,
    listen: &str,
    database_url: Option<&str>,
    flags: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<(Child, String)> {
    let mut command = Command::new(bin);
    command.envs(env.iter().copied());
    command
        .args(["server", "--listen", listen, "--config"])
        .arg(dir.join("server.toml"))
        .arg("--data-dir")
        .arg(dir.join("data"));
    if let Some(url) = database_url {
        command.args(["--database-url", url]);
    }
    command.args(flags);
    // sqlx warns at every pool acquire slower than 2 s, which under a
    // fleet-wide burst is thousands of identical lines: errors only there.
    let mut child = command
        .env("TETHER_LOG", "warn,sqlx::pool::acquire=error")
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut base = None;
    for line in lines.by_ref() {
        if let Some(url) = line?.strip_prefix("tether server listening on ") {
            base = Some(url.to_owned());
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    match base {
        Some(base) => Ok((child, base)),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the server never said where it listens")
        }
    }
}

/// Resident memory of a process in bytes.
fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS")?;
    Ok(kb * 1024)
}

/// A `/proc/<pid>/status` field in bytes (`VmRSS`, `VmHWM`).
fn status_bytes(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| field.to_owned())?;
    Ok(kb * 1024)
}

/// User + system CPU time of a process in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_comm = &stat[stat.rfind(')').context("stat")? + 2..];
    let fields: Vec<&str> = after_comm.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

/// CPU time of one process, thread by thread in nanoseconds
/// (`/proc/<pid>/task/*/schedstat`), beside its 10 ms ticks: short windows
/// (tens of milliseconds) need the nanoseconds.
struct CpuSample {
    threads: std::collections::HashMap<u32, u64>,
    ticks_s: f64,
}

impl CpuSample {
    fn of(pid: u32) -> anyhow::Result<Self> {
        let mut threads = std::collections::HashMap::new();
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let task = task?;
            let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else { continue };
            // A thread may end between listing and reading: skip it.
            let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else { continue };
            let ns = text.split_whitespace().next().and_then(|v| v.parse().ok()).context("schedstat")?;
            threads.insert(tid, ns);
        }
        Ok(CpuSample { threads, ticks_s: cpu_seconds(pid)? })
    }

    /// Seconds of CPU since `earlier`: the threads' nanoseconds, or the
    /// ticks when a thread ended in between (its time left the threads').
    fn seconds_since(&self, earlier: &CpuSample) -> f64 {
        if earlier.threads.keys().any(|tid| !self.threads.contains_key(tid)) {
            return self.ticks_s - earlier.ticks_s;
        }
        let ns: u64 =
            self.threads.iter().map(|(tid, ns)| ns - earlier.threads.get(tid).copied().unwrap_or(0).min(*ns)).sum();
        ns as f64 / 1e9
    }
}

/// Waits until process `pid` has used under 5% of a core for half a second,
/// at most `limit` (then says so and goes on): the work a fleet's connects
/// set off (presence, `last_seen` flushes) is over before a timed step.
async fn until_quiet(pid: u32, limit: Duration) -> anyhow::Result<()> {
    const WINDOW: Duration = Duration::from_millis(500);
    let started = Instant::now();
    let mut last = CpuSample::of(pid)?;
    loop {
        tokio::time::sleep(WINDOW).await;
        let now = CpuSample::of(pid)?;
        if now.seconds_since(&last) < 0.05 * WINDOW.as_secs_f64() {
            return Ok(());
        }
        if started.elapsed() > limit {
            eprintln!("  process {pid} still busy after {} s; going on", limit.as_secs());
            return Ok(());
        }
        last = now;
    }
}

/// Enrolls `n` agents (32 at a time), each with the enroll token's `labels`.
async fn enroll_many(server: &Server, n: usize, labels: Labels) -> anyhow::Result<Vec<TokenPair>> {
    let admin = Client::new(&server.base)?.with_bearer(server.admin_token.clone());
    let token =
        admin.create_enroll_token(&CreateEnrollToken { labels, uses: n as u32, expires_in_s: 3600 }).await?.token;
    let anon = Client::new(&server.base)?;
    let pairs = futures::stream::iter(0..n)
        .map(|i| {
            let (anon, token) = (anon.clone(), token.clone());
            async move {
                let key = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
                anon.enroll(&EnrollRequest {
                    enroll_token: token,
                    public_key: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes()),
                    hostname: format!("bench-{i}"),
                    labels: Labels::new(),
                    facts: serde_json::json!({}),
                })
                .await
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    Ok(pairs.into_iter().collect::<Result<_, _>>()?)
}

/// Reads one HTTP/1.1 response head from `conn` and returns its status;
/// the idle answers (204) have no body.
async fn read_status(conn: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<u16> {
    buf.clear();
    let mut chunk = [0u8; 1024];
    loop {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed");
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let line = std::str::from_utf8(&buf[..buf.len().min(12)])?;
    Ok(line.get(9..12).context("status line")?.parse()?)
}

fn poll_request(addr: &str, token: &str, cursor: &str, wait: u32) -> Vec<u8> {
    format!(
        "GET /api/v1/agents/self/updates?wait={wait} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nIf-None-Match: \"{cursor}\"\r\n\r\n"
    )
    .into_bytes()
}

async fn cursor_of(server: &Server, pair: &TokenPair) -> anyhow::Result<String> {
    let agent = Client::new(&server.base)?.with_bearer(pair.access_token.clone());
    Ok(match agent.updates(None, 20, 0).await? {
        Poll::Idle { cursor } => cursor,
        Poll::Signals(u) => u.cursor,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let bin = match cli.tether {
        Some(b) => b,
        None => std::env::current_exe()?.with_file_name("tether"),
    };
    match cli.bench {
        Bench::Agent(args) => agent(&bin, args).await,
        Bench::PasswordFlood(args) => password_flood(&bin, args).await,
        Bench::Config(args) => config::run(&bin, args).await,
        Bench::Certs(args) => certs::run(&bin, args).await,
        Bench::Telemetry(args) => telemetry::run(&bin, args).await,
        Bench::Realtime(args) => realtime::run(&bin, args).await,
        Bench::All(args) => peers::run(&bin, None, &args).await,
        Bench::IdlePoll(args) => peers::run(&bin, Some(peers::Scenario::IdlePoll), &args).await,
        Bench::Held(args) => peers::run(&bin, Some(peers::Scenario::Held), &args).await,
        Bench::FanOut(args) => peers::run(&bin, Some(peers::Scenario::FanOut), &args).await,
        Bench::Latency(args) => peers::run(&bin, Some(peers::Scenario::Latency), &args).await,
        Bench::Durable(args) => peers::run(&bin, Some(peers::Scenario::Durable), &args).await,
        Bench::Storm(args) => peers::run(&bin, Some(peers::Scenario::Storm), &args).await,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted.get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1))).copied().unwrap_or(0.0)
}

async fn agent(bin: &PathBuf, args: AgentArgs) -> anyhow::Result<()> {
    let server = start_server(bin, &Storage::Sqlite)?;
    let admin = Client::new(&server.base)?.with_bearer(server.admin_token.clone());
    let token = admin
        .create_enroll_token(&CreateEnrollToken { labels: Labels::new(), uses: 1, expires_in_s: 600 })
        .await?
        .token;
    let dir = tempfile::tempdir()?;
    let mut agent = if args.all_in_one {
        let mut c = Command::new(bin);
        c.arg("agent");
        c
    } else {
        Command::new(bin.with_file_name("tether-agent"))
    };
    let agent = agent
        .arg("-c")
        .arg(dir.path())
        .args(["--server", &server.base, "--enroll-token", &token])
        .env("TETHER_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .map(Reaped)?;
    let pid = agent.0.id();
    let agent_id: tether_proto::AgentId = loop {
        if let Ok(id) = std::fs::read_to_string(dir.path().join("state/agent_id")) {
            break id.trim().parse()?;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("agent idle for {} s…", args.idle_seconds);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu_before = cpu_seconds(pid)?;
    let mut peak_rss = 0;
    for _ in 0..args.idle_seconds {
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak_rss = peak_rss.max(rss_bytes(pid)?);
    }
    let idle_cpu = cpu_seconds(pid)? - cpu_before;
    let idle_rss = rss_bytes(pid)?;

    eprintln!("timing {} commands…", args.commands);
    let mut delivered = Vec::with_capacity(args.commands);
    let mut started = Vec::with_capacity(args.commands);
    for _ in 0..args.commands {
        let req = tether_proto::command::CreateCommand::new(tether_proto::command::Target::agents([agent_id]), "ping");
        let id = admin.create_command(&req).await?.command_ids[0];
        let cmd = loop {
            let cmd = admin.get_command(id).await?;
            if cmd.status.is_terminal() {
                break cmd;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let ms = |t: Option<time::OffsetDateTime>| t.map(|t| (t - cmd.created_at).as_seconds_f64() * 1000.0);
        delivered.extend(ms(cmd.delivered_at));
        started.extend(ms(cmd.started_at));
    }
    let rss_after = rss_bytes(pid)?;
    drop(agent);
    delivered.sort_by(f64::total_cmp);
    started.sort_by(f64::total_cmp);
    println!("| metric | value |");
    println!("|---|---|");
    let which = if args.all_in_one { "tether agent" } else { "tether-agent" };
    println!("| agent binary | {which} |");
    println!(
        "| agent RSS idle (after {} s) / peak while idle | {:.1} MiB / {:.1} MiB |",
        args.idle_seconds,
        idle_rss as f64 / 1048576.0,
        peak_rss as f64 / 1048576.0
    );
    println!(
        "| agent CPU while idle for {} s | {:.3} s ({:.3} %) |",
        args.idle_seconds,
        idle_cpu,
        idle_cpu * 100.0 / args.idle_seconds as f64
    );
    println!("| agent RSS after {} commands | {:.1} MiB |", args.commands, rss_after as f64 / 1048576.0);
    println!(
        "| POST /commands → delivered, p50 / p99 ({} commands) | {:.1} ms / {:.1} ms |",
        delivered.len(),
        percentile(&delivered, 0.5),
        percentile(&delivered, 0.99)
    );
    println!(
        "| POST /commands → agent started it, p50 / p99 | {:.1} ms / {:.1} ms |",
        percentile(&started, 0.5),
        percentile(&started, 0.99)
    );
    Ok(())
}

/// A connection to `addr` from the address `source`. The flood speaks raw
/// HTTP so that every connection is open before any request leaves.
async fn connect_from(addr: std::net::SocketAddr, source: std::net::IpAddr) -> anyhow::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::new(source, 0))?;
    Ok(socket.connect(addr).await?)
}

/// Sends one `GET /api/v1/agents` with `Connection: close`; the answer's status code.
async fn send_and_status(mut conn: TcpStream, host: &str, authorization: &str) -> anyhow::Result<u16> {
    let req = format!(
        "GET /api/v1/agents HTTP/1.1\r\nHost: {host}\r\nAuthorization: {authorization}\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(req.as_bytes()).await?;
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 1024];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = conn.read(&mut buf).await?;
        if n == 0 || head.len() > 4096 {
            bail!("connection closed before a status line");
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let status = line.split(' ').nth(1).context("status line")?.parse()?;
    // Drain the rest so the server is never blocked writing to us.
    while conn.read(&mut buf).await? > 0 {}
    Ok(status)
}

async fn metrics(server: &Server) -> anyhow::Result<serde_json::Value> {
    let addr: std::net::SocketAddr = server.addr.parse()?;
    let mut conn = connect_from(addr, addr.ip()).await?;
    let req = format!(
        "GET /api/v1/metrics HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        server.addr, server.admin_token
    );
    conn.write_all(req.as_bytes()).await?;
    let mut body = Vec::new();
    conn.read_to_end(&mut body).await?;
    let text = String::from_utf8(body)?;
    let (head, json) = text.split_once("\r\n\r\n").context("no body")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("metrics: {head}");
    }
    Ok(serde_json::from_str::<serde_json::Value>(json)?["data"].clone())
}

async fn password_flood(bin: &PathBuf, args: FloodArgs) -> anyhow::Result<()> {
    let server = start_server(bin, &Storage::Sqlite)?;
    let pid = server.child.id();
    let addr: std::net::SocketAddr = server.addr.parse()?;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let admin = Client::new(&server.base)?.with_bearer(server.admin_token.clone());
    let watcher_password = "bench-watcher-password";
    admin
        .create_user(&tether_proto::user::CreateUser {
            username: "watcher".into(),
            password: watcher_password.into(),
            role: "viewer".into(),
        })
        .await?;
    let watcher_auth = format!("Basic {}", b64(&format!("watcher:{watcher_password}")));
    let watcher_ip: std::net::IpAddr = "127.0.0.2".parse()?;
    let attacker_ip: std::net::IpAddr = "127.0.0.1".parse()?;

    // The unrelated user: sequential requests from another address, timed.
    let watch = |stop: Arc<AtomicBool>, limit: usize| {
        let (host, auth) = (server.addr.clone(), watcher_auth.clone());
        tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
            while !stop.load(Ordering::Relaxed) && lat.len() < limit {
                let t = Instant::now();
                let conn = connect_from(addr, watcher_ip).await?;
                let status = send_and_status(conn, &host, &auth).await?;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                *statuses.entry(status).or_default() += 1;
            }
            lat.sort_by(f64::total_cmp);
            anyhow::Ok((lat, statuses))
        })
    };
    // Warm the watcher's cache entry and measure a quiet baseline.
    let (quiet, _) = watch(Arc::new(AtomicBool::new(false)), 200).await??;
    let before = metrics(&server).await?;
    let rss_before = status_bytes(pid, "VmRSS")?;

    eprintln!("opening {} connections from {attacker_ip}…", args.requests);
    let auth = format!("Basic {}", b64("admin:wrong-password"));
    let barrier = Arc::new(tokio::sync::Barrier::new(args.requests + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.requests {
        let (barrier, auth, host) = (barrier.clone(), auth.clone(), server.addr.clone());
        tasks.spawn(async move {
            let conn = connect_from(addr, attacker_ip).await;
            barrier.wait().await;
            send_and_status(conn?, &host, &auth).await
        });
    }
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch(stop.clone(), usize::MAX);
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while !stop.load(Ordering::Relaxed) {
                peak = peak.max(status_bytes(pid, "VmRSS").unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            peak
        })
    };
    eprintln!("sending {} wrong guesses at once…", args.requests);
    let started = Instant::now();
    barrier.wait().await;
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    while let Some(r) = tasks.join_next().await {
        let key = match r? {
            Ok(status) => status.to_string(),
            Err(e) => format!("error: {e}"),
        };
        *statuses.entry(key).or_default() += 1;
    }
    let flood_s = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let peak_sampled = sampler.await?;
    let (during, watcher_statuses) = watcher.await??;
    let hwm = status_bytes(pid, "VmHWM")?;
    let rss_after = status_bytes(pid, "VmRSS")?;
    let after = metrics(&server).await?;
    let delta = |k: &str| after[k].as_u64().unwrap_or(0).saturating_sub(before[k].as_u64().unwrap_or(0));

    let mib = |b: u64| b as f64 / 1048576.0;
    println!("| metric | value |");
    println!("|---|---|");
    println!("| wrong-password Basic requests for `admin`, sent at once from one address | {} |", args.requests);
    let counts: Vec<String> = statuses.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    println!("| their answers | {} |", counts.join(", "));
    println!("| time until the last answer | {flood_s:.2} s |");
    println!("| argon2 verifications during the flood (server counter) | {} |", delta("password_verifications"));
    println!("| checks refused busy (503) | {} |", delta("password_checks_refused_busy"));
    println!(
        "| server RSS before / peak sampled during / after | {:.1} / {:.1} / {:.1} MiB |",
        mib(rss_before),
        mib(peak_sampled.max(rss_after)),
        mib(rss_after)
    );
    println!(
        "| server RSS growth (peak sampled − before) | {:.1} MiB |",
        mib(peak_sampled.max(rss_after).saturating_sub(rss_before))
    );
    println!("| server VmHWM (peak since start, includes start-up hashing) | {:.1} MiB |", mib(hwm));
    let wcounts: Vec<String> = watcher_statuses.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    println!(
        "| another user (Basic, other address): requests during the flood, answers | {} ({}) |",
        during.len(),
        wcounts.join(", ")
    );
    println!(
        "| another user's latency p50 / p99, quiet | {:.2} ms / {:.2} ms |",
        percentile(&quiet, 0.5),
        percentile(&quiet, 0.99)
    );
    println!(
        "| another user's latency p50 / p99, during the flood | {:.2} ms / {:.2} ms |",
        percentile(&during, 0.5),
        percentile(&during, 0.99)
    );
    println!("| cache hits for the other user's password (server counter) | {} |", delta("password_cache_hits"));
    Ok(())
}
