//! Durable command results per second: agents report results for queued
//! commands as fast as the server acknowledges them (each acknowledgement a
//! committed transaction with its audit row), and `pgbench`'s simple-update
//! transactions on the same PostgreSQL as the physical reference for what
//! that database commits. Used by the `durable` scenario (`peers::durable`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use futures::StreamExt;
use tether_client::{Client, CommandQuery};
use tether_proto::command::{CommandStatus, CreateCommand, ResultReport, Target};

use crate::{Storage, cpu_seconds, enroll_many, percentile, start_server};

/// Most results one agent reports (one page of its commands).
pub(crate) const MAX_PER_REPORTER: usize = 500;

/// What one run of writers did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Writes {
    pub per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Server CPU per write (tether only).
    pub cpu_per_write_us: Option<f64>,
    /// Results recorded per store transaction, from the server's
    /// `tether_result_group_size` (tether only).
    pub per_transaction: Option<f64>,
}

/// `reporters` agents each report a result for each of its
/// `per_reporter` queued commands, one after the other; all agents at once.
pub(crate) async fn measure(
    bin: &Path,
    storage: &Storage,
    reporters: usize,
    per_reporter: usize,
) -> anyhow::Result<Writes> {
    if !(1..=MAX_PER_REPORTER).contains(&per_reporter) {
        bail!("results per reporter must be 1..={MAX_PER_REPORTER}");
    }
    let server = start_server(&bin.to_path_buf(), storage)?;
    let admin = Client::new(&server.base)?.with_bearer(server.admin_token.clone());
    eprintln!("{}: enrolling {reporters} agents…", storage.name());
    let pairs = enroll_many(&server, reporters, tether_proto::Labels::new()).await?;
    eprintln!("{}: queueing {} commands…", storage.name(), reporters * per_reporter);
    let all = Target { all: Some(true), ..Target::default() };
    for _ in 0..per_reporter {
        admin.create_command(&CreateCommand::new(all.clone(), "ping")).await?;
    }
    let mut work = Vec::with_capacity(pairs.len());
    for pair in &pairs {
        let query = CommandQuery {
            agent_id: Some(pair.agent_id),
            limit: Some(MAX_PER_REPORTER as u32),
            ..CommandQuery::default()
        };
        let ids: Vec<_> = admin.list_commands(&query).await?.data.into_iter().map(|c| c.id).collect();
        anyhow::ensure!(ids.len() == per_reporter, "expected {per_reporter} commands, found {}", ids.len());
        work.push((Client::new(&server.base)?.with_bearer(pair.access_token.clone()), ids));
    }

    eprintln!("{}: reporting results…", storage.name());
    let cpu_before = cpu_seconds(server.child.id())?;
    let started = Instant::now();
    let latencies = futures::stream::iter(work)
        .map(|(agent, ids)| async move {
            let mut lat = Vec::with_capacity(ids.len());
            let mut report = ResultReport::new(CommandStatus::Succeeded);
            report.exit_code = Some(0);
            report.stdout = "pong".into();
            for id in ids {
                let t = Instant::now();
                agent.report_result(id, &report).await?;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(lat)
        })
        .buffer_unordered(reporters)
        .collect::<Vec<_>>()
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(server.child.id())? - cpu_before;
    let per_transaction = mean_group_size(&server.base).await?;
    let mut all: Vec<f64> = Vec::new();
    for l in latencies {
        all.extend(l?);
    }
    all.sort_by(f64::total_cmp);
    let writes = all.len() as f64;
    Ok(Writes {
        per_s: writes / elapsed,
        p50_ms: percentile(&all, 0.5),
        p99_ms: percentile(&all, 0.99),
        cpu_per_write_us: Some(cpu * 1e6 / writes),
        per_transaction: Some(per_transaction),
    })
}

/// The mean of the server's `tether_result_group_size` (results per
/// transaction) from its `/metrics`.
async fn mean_group_size(base: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("{base}/metrics")).await?.error_for_status()?.text().await?;
    let value = |name: &str| -> anyhow::Result<f64> {
        let line = text.lines().find(|l| l.starts_with(name)).with_context(|| format!("no {name} in /metrics"))?;
        line[name.len()..].trim().parse().with_context(|| format!("{name}: {line:?}"))
    };
    Ok(value("tether_result_group_size_sum ")? / value("tether_result_group_size_count ")?)
}

/// pgbench's built-in simple-update script for `seconds` on a scratch
/// database of the PostgreSQL server at `url`, with `clients` clients; the
/// latency percentiles come from its per-transaction log.
pub(crate) async fn pgbench(url: &str, clients: usize, seconds: u64) -> anyhow::Result<Writes> {
    let db = tether_testkit::pg::TestDatabase::create_on(url).await;
    eprintln!("pgbench: initialising…");
    run_tool(Command::new("pgbench").args(["-i", "-q", "-s", "1"]).arg(&db.url))?;
    eprintln!("pgbench: simple-update, {clients} clients, {seconds} s…");
    let logs = tempfile::tempdir()?;
    let out = run_tool(
        Command::new("pgbench")
            .args(["-b", "simple-update", "-n", "-j", "2", "-l", "--log-prefix"])
            .arg(logs.path().join("tx"))
            .args(["-c", &clients.to_string(), "-T", &seconds.to_string()])
            .arg(&db.url),
    )?;
    let tps_line = out.lines().find(|l| l.starts_with("tps = ")).with_context(|| format!("no tps in:\n{out}"))?;
    let tps: f64 = tps_line["tps = ".len()..].split_whitespace().next().context("tps")?.parse().context("tps")?;
    let mut latencies = transaction_latencies(logs.path())?;
    latencies.sort_by(f64::total_cmp);
    anyhow::ensure!(!latencies.is_empty(), "pgbench logged no transactions");
    Ok(Writes {
        per_s: tps,
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
        cpu_per_write_us: None,
        per_transaction: None,
    })
}

/// The latency (ms) of every transaction in pgbench's per-thread logs in
/// `dir` (`client_id transaction_no time_us script_no epoch epoch_us`).
fn transaction_latencies(dir: &Path) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path: PathBuf = entry?.path();
        for line in std::fs::read_to_string(&path)?.lines() {
            let us: f64 = line
                .split_whitespace()
                .nth(2)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("a latency in {line:?} of {}", path.display()))?;
            out.push(us / 1000.0);
        }
    }
    Ok(out)
}

/// `synchronous_commit` and `fsync` of the PostgreSQL server at `url`, as
/// `name=value` pairs (what "durable" means there).
pub(crate) fn durability_settings(url: &str) -> anyhow::Result<String> {
    let settings = ["synchronous_commit", "fsync"]
        .iter()
        .map(|s| Ok(format!("{s}={}", psql(url, &format!("SHOW {s}"))?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(settings.join(", "))
}

pub(crate) fn psql(url: &str, sql: &str) -> anyhow::Result<String> {
    Ok(run_tool(Command::new("psql").args(["-Atc", sql]).arg(url))?.trim().to_owned())
}

/// Runs a PostgreSQL tool (from the machine's packages) and returns its stdout.
pub(crate) fn run_tool(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {:?} (is the PostgreSQL client installed?)", cmd))?;
    if !out.status.success() {
        bail!("{:?} failed: {}", cmd.get_program(), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}
