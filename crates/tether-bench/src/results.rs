//! Durable command results per second: agents report results for queued
//! commands as fast as the server acknowledges them (each acknowledgement a
//! committed transaction with its audit row), on SQLite and on PostgreSQL,
//! beside `pgbench`'s simple-update transactions on the same PostgreSQL in
//! the same run, as the physical reference for what that database commits.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use futures::StreamExt;
use tether_client::{Client, CommandQuery};
use tether_proto::command::{CommandStatus, CreateCommand, ResultReport, Target};

use crate::{Storage, cpu_seconds, enroll_many, percentile, start_server};

#[derive(Debug, clap::Args)]
pub struct ResultsArgs {
    /// Agents reporting at once; also pgbench's client count.
    #[arg(long, default_value_t = 32)]
    reporters: usize,
    /// Results each agent reports (at most 500).
    #[arg(long, default_value_t = 200)]
    per_reporter: usize,
    /// A PostgreSQL server (URL of any database there) for the PostgreSQL
    /// run and pgbench; the bench creates scratch databases and drops them.
    /// Without it only SQLite is measured.
    #[arg(long, value_name = "URL")]
    postgres: Option<String>,
    /// How long pgbench runs, in seconds.
    #[arg(long, default_value_t = 10)]
    pgbench_seconds: u64,
}

struct Row {
    what: String,
    writes_per_s: f64,
    latency: String,
    cpu_per_write_us: Option<f64>,
}

pub async fn run(bin: &PathBuf, args: ResultsArgs) -> anyhow::Result<()> {
    if !(1..=500).contains(&args.per_reporter) {
        bail!("--per-reporter must be 1..=500");
    }
    let mut rows = vec![measure(bin, &Storage::Sqlite, &args).await?];
    if let Some(url) = &args.postgres {
        rows.push(measure(bin, &Storage::new(Some(url)).await, &args).await?);
        rows.push(pgbench(url, &args).await?);
    }
    println!("| writer | concurrent writers | durable writes/s | latency p50 / p99 | server CPU per write |");
    println!("|---|---|---|---|---|");
    for r in rows {
        let cpu = r.cpu_per_write_us.map_or("—".to_owned(), |us| format!("{us:.0} µs"));
        println!("| {} | {} | {:.0} | {} | {} |", r.what, args.reporters, r.writes_per_s, r.latency, cpu);
    }
    Ok(())
}

/// Each agent reports a result for each of its queued commands, one after
/// the other; all agents at once.
async fn measure(bin: &PathBuf, storage: &Storage, args: &ResultsArgs) -> anyhow::Result<Row> {
    let server = start_server(bin, storage)?;
    let admin = Client::new(&server.base)?.with_bearer(server.admin_token.clone());
    eprintln!("{}: enrolling {} agents…", storage.name(), args.reporters);
    let pairs = enroll_many(&server, args.reporters, tether_proto::Labels::new()).await?;
    eprintln!("{}: queueing {} commands…", storage.name(), args.reporters * args.per_reporter);
    let all = Target { all: Some(true), ..Target::default() };
    for _ in 0..args.per_reporter {
        admin.create_command(&CreateCommand::new(all.clone(), "ping")).await?;
    }
    let mut work = Vec::with_capacity(pairs.len());
    for pair in &pairs {
        let query = CommandQuery { agent_id: Some(pair.agent_id), limit: Some(500), ..CommandQuery::default() };
        let ids: Vec<_> = admin.list_commands(&query).await?.data.into_iter().map(|c| c.id).collect();
        anyhow::ensure!(ids.len() == args.per_reporter, "expected {} commands, found {}", args.per_reporter, ids.len());
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
        .buffer_unordered(args.reporters)
        .collect::<Vec<_>>()
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(server.child.id())? - cpu_before;
    let mut all_latencies: Vec<f64> = Vec::new();
    for l in latencies {
        all_latencies.extend(l?);
    }
    all_latencies.sort_by(f64::total_cmp);
    let writes = all_latencies.len() as f64;
    Ok(Row {
        what: format!("tether on {}: command results (each with its audit row)", storage.name()),
        writes_per_s: writes / elapsed,
        latency: format!("{:.1} ms / {:.1} ms", percentile(&all_latencies, 0.5), percentile(&all_latencies, 0.99)),
        cpu_per_write_us: Some(cpu * 1e6 / writes),
    })
}

/// pgbench's built-in simple-update script on a scratch database of the
/// same server, with as many clients as the bench has reporters.
async fn pgbench(url: &str, args: &ResultsArgs) -> anyhow::Result<Row> {
    let db = tether_testkit::pg::TestDatabase::create_on(url).await;
    let settings = ["synchronous_commit", "fsync"]
        .iter()
        .map(|s| Ok(format!("{s}={}", psql(&db.url, &format!("SHOW {s}"))?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    eprintln!("pgbench: initialising…");
    run_tool(Command::new("pgbench").args(["-i", "-q", "-s", "1"]).arg(&db.url))?;
    eprintln!("pgbench: simple-update, {} clients, {} s…", args.reporters, args.pgbench_seconds);
    let out = run_tool(
        Command::new("pgbench")
            .args(["-b", "simple-update", "-n", "-j", "2"])
            .args(["-c", &args.reporters.to_string(), "-T", &args.pgbench_seconds.to_string()])
            .arg(&db.url),
    )?;
    let field = |prefix: &str| -> anyhow::Result<f64> {
        let line = out.lines().find(|l| l.starts_with(prefix)).with_context(|| format!("no {prefix:?} in:\n{out}"))?;
        line[prefix.len()..].split_whitespace().next().context("a number")?.parse().context("a number")
    };
    Ok(Row {
        what: format!("pgbench simple-update on the same PostgreSQL ({})", settings.join(", ")),
        writes_per_s: field("tps = ")?,
        latency: format!("{:.1} ms average", field("latency average = ")?),
        cpu_per_write_us: None,
    })
}

fn psql(url: &str, sql: &str) -> anyhow::Result<String> {
    Ok(run_tool(Command::new("psql").args(["-Atc", sql]).arg(url))?.trim().to_owned())
}

/// Runs a PostgreSQL tool (from the machine's packages) and returns its stdout.
fn run_tool(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {:?} (is the PostgreSQL client installed?)", cmd))?;
    if !out.status.success() {
        bail!("{:?} failed: {}", cmd.get_program(), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}
