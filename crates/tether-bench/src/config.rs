//! A label-scope configuration change to thousands of agents (protocol.md
//! §6): how long the write takes and how many store calls it makes (one
//! transaction that appends every agent's `config.updated`), then how long
//! until every one of those agents' parked long-polls has answered with it.
//! On SQLite, and on PostgreSQL when given.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tether_client::Client;
use tether_proto::Labels;
use tether_proto::config::{ConfigWritten, PutConfig, Scope};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{Server, Storage, cursor_of, enroll_many, metrics, poll_request, start_server};

#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// Agents carrying the label (each parks one long-poll, so at most
    /// about 15,000 per process).
    #[arg(long, default_value_t = 5000)]
    agents: usize,
    /// Also measure on a scratch database on this PostgreSQL server (a URL of
    /// any database there; the bench creates its own and drops it).
    #[arg(long, value_name = "URL")]
    postgres: Option<String>,
}

struct Row {
    store: &'static str,
    /// The first write: PUT → 201, and the store calls it made.
    write_ms: f64,
    write_calls: u64,
    told: u64,
    /// The next write with every agent parked on a long-poll.
    delivery_put_ms: f64,
    delivery_all_ms: f64,
    delivery_calls: u64,
}

pub async fn run(bin: &PathBuf, args: ConfigArgs) -> anyhow::Result<()> {
    if !(1..=15_000).contains(&args.agents) {
        bail!("--agents must be 1..=15000 (one open connection each)");
    }
    let mut rows = vec![measure(bin, &Storage::Sqlite, args.agents).await?];
    if let Some(url) = &args.postgres {
        rows.push(measure(bin, &Storage::new(Some(url)).await, args.agents).await?);
    }
    println!(
        "| store | agents labelled | write: PUT → 201 | store calls | agents told | with every agent parked: PUT → 201 | PUT → last poll answered | store calls meanwhile |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {:.0} ms | {} | {} | {:.0} ms | {:.0} ms | {} |",
            r.store,
            args.agents,
            r.write_ms,
            r.write_calls,
            r.told,
            r.delivery_put_ms,
            r.delivery_all_ms,
            r.delivery_calls
        );
    }
    Ok(())
}

async fn store_calls(server: &Server) -> anyhow::Result<u64> {
    metrics(server).await?["store_calls"].as_u64().context("metrics without store_calls")
}

/// Writes `doc` as the scope's next version; the answer and how long it took.
async fn put(
    admin: &Client,
    scope: &Scope,
    doc: serde_json::Value,
    if_match: Option<u64>,
) -> anyhow::Result<(ConfigWritten, f64)> {
    let serde_json::Value::Object(doc) = doc else { bail!("not an object") };
    let started = Instant::now();
    let written = admin.put_config(scope, &PutConfig { doc, comment: "bench".into() }, if_match).await?;
    Ok((written, started.elapsed().as_secs_f64() * 1000.0))
}

async fn measure(bin: &PathBuf, storage: &Storage, agents: usize) -> anyhow::Result<Row> {
    let server = start_server(bin, storage)?;
    let admin = Client::new(&server.base)?.with_bearer(server.admin_token.clone());
    eprintln!("{}: enrolling {agents} agents labelled role=bench…", storage.name());
    let labels = Labels::from([("role".to_owned(), "bench".to_owned())]);
    let pairs = enroll_many(&server, agents, labels).await?;
    let scope: Scope = "label:role=bench".parse().map_err(anyhow::Error::msg)?;

    // Reading the metrics costs store calls of its own (authentication):
    // measure that once and take it off.
    let (a, b) = (store_calls(&server).await?, store_calls(&server).await?);
    let overhead = b - a;
    let before = store_calls(&server).await?;
    let (written, write_ms) = put(&admin, &scope, serde_json::json!({"greeting": "v1", "poll": 30}), None).await?;
    let write_calls = store_calls(&server).await? - before - overhead;
    if written.agents_changed as usize != agents {
        bail!("{} agents told, expected {agents}", written.agents_changed);
    }

    eprintln!("{}: parking {agents} long-polls…", storage.name());
    let mut conns = Vec::with_capacity(agents);
    for pair in &pairs {
        let mut conn = TcpStream::connect(&server.addr).await?;
        conn.write_all(&poll_request(&server.addr, &pair.access_token, &cursor_of(&server, pair).await?, 30)).await?;
        conns.push(conn);
    }
    // Every poll is read and parked before the write.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = store_calls(&server).await?;
    let started = Instant::now();
    let waiting: Vec<_> =
        conns.into_iter().map(|conn| tokio::spawn(read_signal(conn, started, b"config.updated"))).collect();
    let (next, delivery_put_ms) =
        put(&admin, &scope, serde_json::json!({"greeting": "v2", "poll": 30}), Some(written.version)).await?;
    let mut last = Duration::ZERO;
    for task in waiting {
        last = last.max(task.await??);
    }
    let delivery_calls = store_calls(&server).await? - before - overhead;
    if next.agents_changed as usize != agents {
        bail!("{} agents told the second time, expected {agents}", next.agents_changed);
    }
    Ok(Row {
        store: storage.name(),
        write_ms,
        write_calls,
        told: written.agents_changed,
        delivery_put_ms,
        delivery_all_ms: last.as_secs_f64() * 1000.0,
        delivery_calls,
    })
}

/// Reads a parked poll's answer; how long after `started` it carried a
/// signal of `kind`.
pub async fn read_signal(mut conn: TcpStream, started: Instant, kind: &'static [u8]) -> anyhow::Result<Duration> {
    let mut answer = Vec::with_capacity(2048);
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            let n = conn.read(&mut buf).await?;
            if n == 0 {
                bail!("the poll closed without a {} signal", String::from_utf8_lossy(kind));
            }
            answer.extend_from_slice(&buf[..n]);
            if answer.windows(kind.len()).any(|w| w == kind) {
                return Ok(started.elapsed());
            }
        }
    };
    let within = tokio::time::timeout(Duration::from_secs(60), read).await;
    within.with_context(|| format!("no {} signal within 60 s", String::from_utf8_lossy(kind)))?
}
