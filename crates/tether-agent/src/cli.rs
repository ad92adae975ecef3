//! The agent's command line, shared by `tether agent` and the slim
//! `tether-agent` binary: the daemon (`once` for a single cycle) and the
//! one-shot commands that talk to a running daemon over its control socket.

use std::path::{Path, PathBuf};

use crate::{AgentConfig, EXIT_REVOKED, Exit, Mode, Overrides};
use clap::{Args, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AgentArgs {
    #[command(subcommand)]
    action: Option<AgentAction>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum AgentAction {
    /// Do one cycle: poll once (wait=0), run what arrived, deliver results, exit.
    Once(RunArgs),
    /// Show the running daemon's status (uptime, server, cursor, queue, tokens …).
    Status(SocketArgs),
    /// Make the running daemon poll the server now.
    PollNow(SocketArgs),
    /// List the certificates the running daemon installed (name, serial, expiry, source).
    ListCerts(SocketArgs),
    /// Renew a certificate now: an issued one gets a new key and certificate
    /// (prints the new serial); for an uploaded one the operators are asked.
    Renew(RenewArgs),
}

#[derive(Debug, Args)]
struct RenewArgs {
    /// The certificate's name (its directory under the certificates dir).
    cert: String,
    #[command(flatten)]
    socket: SocketArgs,
}

#[derive(Debug, Args)]
struct SocketArgs {
    /// State dir of the agent (env TETHER_CONFIG_DIR).
    #[arg(short = 'c', long = "config-dir", env = "TETHER_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Every knob; flags beat environment, which beats `agent.toml`, which beats defaults.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// State dir holding agent.toml, state/, keys/ (env TETHER_CONFIG_DIR; default
    /// /var/lib/tether as root, else ~/.local/share/tether).
    #[arg(short = 'c', long = "config-dir", env = "TETHER_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,
    /// Server URL (env TETHER_SERVER, status-panel alias DASHBOARD_URL; default http://127.0.0.1:8080).
    #[arg(long)]
    pub server: Option<String>,
    /// Enrollment token for the first start (env TETHER_ENROLL_TOKEN).
    #[arg(long)]
    pub enroll_token: Option<String>,
    /// Enroll with the RFC 8628 device flow when not enrolled and no enrollment token is
    /// given (env TETHER_DEVICE_FLOW, agent.toml device_flow): the agent prints a code and
    /// a URL, an operator approves it (`tether device approve CODE --label k=v` or the
    /// /device page), and the agent enrolls and keeps its identity for later starts.
    /// It exits non-zero when the code is denied or expires.
    #[arg(long)]
    pub device_flow: bool,
    /// Name to enroll under (env TETHER_AGENT_NAME, status-panel alias AGENT_ID; default the hostname).
    #[arg(long)]
    pub name: Option<String>,
    /// Label requested at enrollment, k=v; repeatable (env DEPLOYMENT_HASH adds deployment=…).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Long-poll wait in seconds, 0-30 (env TETHER_POLL_WAIT_S, status-panel alias POLLING_TIMEOUT_SECS; default 30).
    #[arg(long)]
    pub poll_wait: Option<u32>,
    /// Heartbeat interval in seconds (env TETHER_HEARTBEAT_S; default 30).
    #[arg(long)]
    pub heartbeat: Option<u64>,
    /// Upper bound on any command's run time in seconds (env TETHER_COMMAND_TIMEOUT_S,
    /// status-panel alias COMMAND_TIMEOUT_SECS; default 300).
    #[arg(long)]
    pub command_timeout: Option<u32>,
    /// Commands run at once (env TETHER_MAX_CONCURRENT_COMMANDS; default 4).
    #[arg(long)]
    pub max_concurrent: Option<usize>,
    /// PEM file with the CA(s) that signed the server's certificate, for a private CA;
    /// only these are trusted for https:// (env TETHER_CA_FILE, agent.toml ca_file).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Sign every agent request with this agent's Ed25519 key (X-Tether-Signature;
    /// env TETHER_SIGN_REQUESTS=true|false, agent.toml sign_requests; default off).
    /// Needed when the server sets require_signed_requests.
    #[arg(long)]
    pub sign_requests: bool,
    /// What carries the stream: auto (the WebSocket, falling back to long-poll where it
    /// does not work, and back again), websocket or long-poll (env TETHER_TRANSPORT,
    /// agent.toml transport; default auto).
    #[arg(long, value_name = "auto|websocket|long-poll")]
    pub transport: Option<crate::config::Transport>,
    /// Keep running (the default; accepted for compatibility).
    #[arg(long, hide = true)]
    pub keep_running: bool,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("label {s:?} must be k=v"))?;
    Ok((k.to_owned(), v.to_owned()))
}

/// `/var/lib/tether` for root, `~/.local/share/tether` for everyone else.
pub fn default_dir() -> PathBuf {
    if nix_is_root() {
        return PathBuf::from("/var/lib/tether");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/tether")
}

fn nix_is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

impl RunArgs {
    pub fn config(&self) -> anyhow::Result<AgentConfig> {
        let dir = self.config_dir.clone().unwrap_or_else(default_dir);
        let file = crate::config::read_file(&dir)?;
        let flags = Overrides {
            server: self.server.clone(),
            enroll_token: self.enroll_token.clone(),
            // Absent flag = no opinion, so the environment and agent.toml still count.
            device_flow: self.device_flow.then_some(true),
            name: self.name.clone(),
            labels: self.labels.iter().cloned().collect(),
            poll_wait_s: self.poll_wait,
            heartbeat_s: self.heartbeat,
            command_timeout_s: self.command_timeout,
            max_concurrent_commands: self.max_concurrent,
            ca_file: self.ca_file.clone(),
            // A bare flag can only turn signing on; absent, env and file decide.
            sign_requests: self.sign_requests.then_some(true),
            transport: self.transport,
        };
        Ok(AgentConfig::resolve(&dir, file, |k| std::env::var(k).ok(), flags)?)
    }
}

/// Maps how the daemon stopped to the process exit code (78 = revoked, do not restart).
pub fn exit_code(exit: &Exit) -> i32 {
    match exit {
        Exit::Stopped | Exit::Restart => 0,
        Exit::Revoked(message) => {
            eprintln!("tether agent: {message}");
            EXIT_REVOKED
        }
        Exit::Fatal(message) => {
            eprintln!("tether agent: {message}");
            1
        }
    }
}

/// Runs the agent on a single-threaded runtime (it is small and mostly waits).
pub fn main(args: AgentArgs) -> anyhow::Result<i32> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    match args.action {
        None => runtime.block_on(run(args.run, Mode::Daemon)),
        Some(AgentAction::Once(run_args)) => runtime.block_on(run(run_args, Mode::Once)),
        Some(AgentAction::Status(s)) => runtime.block_on(status(&socket(&s), s.json)),
        Some(AgentAction::PollNow(s)) => runtime.block_on(async {
            crate::control::request(&socket(&s), "poll-now").await?;
            println!("poll requested");
            Ok(0)
        }),
        Some(AgentAction::ListCerts(s)) => runtime.block_on(list_certs(&socket(&s), s.json)),
        Some(AgentAction::Renew(r)) => runtime.block_on(renew(&socket(&r.socket), &r.cert, r.socket.json)),
    }
}

fn socket(args: &SocketArgs) -> PathBuf {
    args.config_dir.clone().unwrap_or_else(default_dir).join("state/agent.sock")
}

async fn run(args: RunArgs, mode: Mode) -> anyhow::Result<i32> {
    let cfg = args.config()?;
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("Shutting down");
        trigger.cancel();
    });
    Ok(exit_code(&crate::run(cfg, mode, shutdown).await))
}

async fn status(socket: &Path, json: bool) -> anyhow::Result<i32> {
    let status = crate::control::request(socket, "status").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(0);
    }
    let Some(fields) = status.as_object() else { anyhow::bail!("unexpected status answer") };
    for (key, value) in fields {
        let text = match value {
            serde_json::Value::Null => "-".to_owned(),
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        println!("{:<22} {text}", format!("{}:", key.replace('_', " ")));
    }
    Ok(0)
}

/// A control answer, or the error it carries.
async fn ask(socket: &Path, command: &str) -> anyhow::Result<serde_json::Value> {
    let answer = crate::control::request(socket, command).await?;
    if let Some(error) = answer.get("error").and_then(|e| e.as_str()) {
        anyhow::bail!("{error}");
    }
    Ok(answer)
}

async fn list_certs(socket: &Path, json: bool) -> anyhow::Result<i32> {
    let answer = ask(socket, "list-certs").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(0);
    }
    let certs: Vec<crate::managed_certs::Listing> = serde_json::from_value(answer)?;
    if certs.is_empty() {
        println!("no certificates installed");
        return Ok(0);
    }
    let width = certs.iter().map(|c| c.name.len()).max().unwrap_or(0).max(4);
    let serial_width = certs.iter().map(|c| c.serial.len()).max().unwrap_or(0).max(6);
    println!("{:<width$}  {:<serial_width$}  {:<25}  SOURCE", "NAME", "SERIAL", "NOT AFTER");
    for c in &certs {
        println!("{:<width$}  {:<serial_width$}  {:<25}  {}", c.name, c.serial, c.not_after, c.source.as_str());
    }
    Ok(0)
}

async fn renew(socket: &Path, name: &str, json: bool) -> anyhow::Result<i32> {
    // One line to the daemon: a name cannot carry another command.
    if name.is_empty() || name.contains(char::is_whitespace) {
        anyhow::bail!("certificate name {name:?} must be one word");
    }
    let answer = ask(socket, &format!("renew {name}")).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(0);
    }
    let text = |key: &str| answer.get(key).and_then(|v| v.as_str()).unwrap_or("-").to_owned();
    match answer.get("serial") {
        Some(_) => println!("renewed {name}: serial {}, valid until {}", text("serial"), text("not_after")),
        None => println!("renewal of {name} requested from the operators"),
    }
    Ok(0)
}

/// Resolves when SIGINT or SIGTERM arrives.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

type LogFilter = tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

/// The filter of the running process's log, changed live by `agent.log_level`,
/// and the local one (`TETHER_LOG`) to go back to.
static LOG_FILTER: std::sync::OnceLock<(LogFilter, String)> = std::sync::OnceLock::new();

/// Logs to stderr, filtered by `TETHER_LOG` (default `info`), colored only on a terminal.
pub fn init_tracing() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let local = std::env::var("TETHER_LOG")
        .ok()
        .filter(|spec| tracing_subscriber::EnvFilter::try_new(spec).is_ok())
        .unwrap_or_else(|| "info".to_owned());
    let (filter, handle) = tracing_subscriber::reload::Layer::new(tracing_subscriber::EnvFilter::new(&local));
    let output = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    tracing_subscriber::registry().with(filter).with(output).init();
    let _ = LOG_FILTER.set((handle, local));
}

/// Sets the log level (`error` … `trace`) from now on (protocol.md §6
/// `agent.log_level`), or with `None` goes back to the local one; nothing
/// happens where logging was not set up here.
pub fn set_log_level(level: Option<&str>) {
    let Some((handle, local)) = LOG_FILTER.get() else { return };
    let spec = level.unwrap_or(local);
    match handle.modify(|f| *f = tracing_subscriber::EnvFilter::new(spec)) {
        Ok(()) => tracing::info!(level = spec, "Log level changed by the configuration"),
        Err(e) => tracing::warn!(error = %e, "Could not change the log level"),
    }
}
