//! `tether-bench`: starts a release `tether server` in a temp dir (on its
//! embedded SQLite, or on a scratch PostgreSQL database) and measures
//! (1) idle-poll throughput (`wait=0`, cursor at head → 204) and the server CPU
//! each poll costs, (2) the server memory held per open long-poll with
//! thousands of polls parked at once, (3) the agent's own footprint,
//! (4) a flood of wrong passwords from one address, and (5) durable command
//! results per second beside `pgbench` on the same PostgreSQL, and (6) a
//! label-scope configuration change reaching thousands of agents' streams,
//! (7) heartbeats and metric points ingested per second, and (8) the agent
//! WebSocket: memory per idle connection beside Mosquitto, delivery latency
//! beside long-poll, and the reconnect spread after a server kill.
//! Prints a table.

mod certs;
mod config;
mod realtime;
mod results;
mod telemetry;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// Idle-poll throughput and server memory per held long-poll.
    Stream(Args),
    /// Agent idle RSS and CPU, and command receipt latency.
    Agent(AgentArgs),
    /// Concurrent wrong-password HTTP Basic guesses from one address: argon2
    /// runs, server memory, and another user's latency meanwhile.
    PasswordFlood(FloodArgs),
    /// Durable command results per second on SQLite and PostgreSQL, beside
    /// pgbench's simple-update TPS on the same PostgreSQL.
    Results(results::ResultsArgs),
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

#[derive(Debug, clap::Args)]
struct Args {
    /// Concurrent connections for the idle-poll run.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Length of the idle-poll run in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Long-polls held open at once for the memory run.
    #[arg(long, default_value_t = 5000)]
    held_polls: usize,
    /// Run the server on a scratch database on this PostgreSQL server (a URL
    /// of any database there; the bench creates its own and drops it).
    #[arg(long, value_name = "URL")]
    postgres: Option<String>,
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
    // Port 0: the server picks a free port and names it in its "listening" line.
    let (child, base) = spawn_server(bin, dir.path(), "127.0.0.1:0", storage.database_url())?;
    let addr = base.strip_prefix("http://").context("a plain HTTP server")?.to_owned();
    // Stdout is a pipe, so the first admin's token is only in the file.
    let text =
        std::fs::read_to_string(dir.path().join("data/initial-admin.txt")).context("reading initial-admin.txt")?;
    let admin_token = text.lines().find_map(|l| l.strip_prefix("api_token: ")).context("no api_token")?.to_owned();
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
    let mut command = Command::new(bin);
    command
        .args(["server", "--listen", listen, "--config"])
        .arg(dir.join("server.toml"))
        .arg("--data-dir")
        .arg(dir.join("data"));
    if let Some(url) = database_url {
        command.args(["--database-url", url]);
    }
    let mut child = command
        .env("TETHER_LOG", "warn")
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

struct IdleResult {
    requests: u64,
    seconds: f64,
    p50_us: u64,
    p99_us: u64,
    server_cpu_us_per_req: f64,
}

async fn idle_polls(server: &Server, pairs: &[TokenPair], seconds: u64) -> anyhow::Result<IdleResult> {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let cpu_before = cpu_seconds(server.child.id())?;
    let started = Instant::now();
    for pair in pairs {
        let req = poll_request(&server.addr, &pair.access_token, &cursor_of(server, pair).await?, 0);
        let (stop, count, addr) = (stop.clone(), count.clone(), server.addr.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = TcpStream::connect(&addr).await?;
            conn.set_nodelay(true)?;
            let mut buf = Vec::with_capacity(1024);
            let mut latencies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                conn.write_all(&req).await?;
                let status = read_status(&mut conn, &mut buf).await?;
                if status != 204 {
                    bail!("idle poll answered {status}");
                }
                latencies.push(t.elapsed().as_micros() as u64);
                count.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(latencies)
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(server.child.id())? - cpu_before;
    latencies.sort_unstable();
    let pct =
        |p: f64| latencies.get(((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)).copied().unwrap_or(0);
    let requests = count.load(Ordering::Relaxed);
    Ok(IdleResult {
        requests,
        seconds: elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        server_cpu_us_per_req: cpu * 1e6 / requests.max(1) as f64,
    })
}

struct HeldResult {
    polls: usize,
    rss_before: u64,
    rss_after: u64,
}

async fn held_polls(server: &Server, pairs: &[TokenPair]) -> anyhow::Result<HeldResult> {
    let mut requests = Vec::with_capacity(pairs.len());
    for pair in pairs {
        requests.push(poll_request(&server.addr, &pair.access_token, &cursor_of(server, pair).await?, 30));
    }
    // Let the server settle after the cursor fetches.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = rss_bytes(server.child.id())?;
    let mut conns = Vec::with_capacity(pairs.len());
    for req in &requests {
        let mut conn = TcpStream::connect(&server.addr).await?;
        conn.write_all(req).await?;
        conns.push(conn);
    }
    // Every poll is now parked (none can answer before 30 s); give the server time to read them all.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_after = rss_bytes(server.child.id())?;
    // Nothing may have been answered yet: each connection is still waiting.
    let mut probe = [0u8; 1];
    for conn in conns.iter().take(100) {
        if conn.try_read(&mut probe).is_ok() {
            bail!("a held poll answered early");
        }
    }
    drop(conns);
    Ok(HeldResult { polls: pairs.len(), rss_before, rss_after })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let bin = match cli.tether {
        Some(b) => b,
        None => std::env::current_exe()?.with_file_name("tether"),
    };
    match cli.bench {
        Bench::Stream(args) => stream(&bin, args).await,
        Bench::Agent(args) => agent(&bin, args).await,
        Bench::PasswordFlood(args) => password_flood(&bin, args).await,
        Bench::Results(args) => results::run(&bin, args).await,
        Bench::Config(args) => config::run(&bin, args).await,
        Bench::Certs(args) => certs::run(&bin, args).await,
        Bench::Telemetry(args) => telemetry::run(&bin, args).await,
        Bench::Realtime(args) => realtime::run(&bin, args).await,
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

async fn stream(bin: &PathBuf, args: Args) -> anyhow::Result<()> {
    let storage = Storage::new(args.postgres.as_deref()).await;
    let server = start_server(bin, &storage)?;
    eprintln!("enrolling {} agents…", args.held_polls.max(args.connections));
    let pairs = enroll_many(&server, args.held_polls.max(args.connections), Labels::new()).await?;

    eprintln!("idle polls: {} connections for {} s…", args.connections, args.seconds);
    let idle = idle_polls(&server, &pairs[..args.connections], args.seconds).await?;
    eprintln!("holding {} long-polls…", args.held_polls);
    let held = held_polls(&server, &pairs[..args.held_polls]).await?;
    eprintln!("one command to all {} agents…", pairs.len());
    let admin = Client::new(&server.base)?.with_bearer(server.admin_token.clone());
    let all = tether_proto::command::Target { all: Some(true), ..Default::default() };
    let started = Instant::now();
    let fanned = admin.create_command(&tether_proto::command::CreateCommand::new(all, "ping")).await?;
    let fan_out_s = started.elapsed().as_secs_f64();

    let per_poll = (held.rss_after.saturating_sub(held.rss_before)) as f64 / held.polls as f64;
    println!("| metric | value |");
    println!("|---|---|");
    println!("| store | {} |", storage.name());
    println!(
        "| idle polls (wait=0 → 204), {} connections | {:.0} req/s |",
        args.connections,
        idle.requests as f64 / idle.seconds
    );
    println!("| idle poll latency p50 / p99 | {} µs / {} µs |", idle.p50_us, idle.p99_us);
    println!("| server CPU per idle poll | {:.1} µs |", idle.server_cpu_us_per_req);
    println!(
        "| server RSS before / with {} held long-polls | {:.1} MiB / {:.1} MiB |",
        held.polls,
        held.rss_before as f64 / 1048576.0,
        held.rss_after as f64 / 1048576.0
    );
    println!("| server memory per held long-poll | {:.0} bytes ({:.2} KiB) |", per_poll, per_poll / 1024.0);
    println!(
        "| one command to all {} agents: POST → 201 (one transaction) | {:.0} ms ({:.0} commands and signals/s) |",
        fanned.command_ids.len(),
        fan_out_s * 1000.0,
        fanned.command_ids.len() as f64 / fan_out_s
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
