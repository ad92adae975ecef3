//! Durable command results per second beside pgbench: agents report
//! results for queued commands as fast as the server acknowledges them
//! (each 200 a committed result with its `command.result` audit row), on
//! SQLite (WAL, synchronous=FULL) and on a scratch PostgreSQL database;
//! `pgbench -b simple-update` with as many clients on another scratch
//! database of the same PostgreSQL is what that database commits on this
//! machine. Each round runs tether on PostgreSQL, tether on SQLite, then
//! pgbench.

use std::path::Path;

use super::{PeerArgs, Row, Target, alternate};
use crate::Storage;
use crate::results::{Writes, durability_settings, measure, pgbench};

const SCENARIO: &str = "durable";
const PEER: &str = "pgbench simple-update";

pub async fn run(bin: &Path, args: &PeerArgs) -> anyhow::Result<Vec<Row>> {
    let reporters = args.pick(32, 4);
    let per_reporter = args.pick(200, 10);
    let pgbench_seconds = args.pick(10, 1);
    eprintln!(
        "durable: {reporters} reporters × {per_reporter} results on PostgreSQL and SQLite, \
         pgbench {reporters} clients × {pgbench_seconds} s ({})",
        durability_settings(&args.postgres)?
    );
    let (ours, theirs) = alternate(
        args.rounds(),
        |_| async move {
            let postgres = measure(bin, &Storage::new(Some(&args.postgres)).await, reporters, per_reporter).await?;
            let sqlite = measure(bin, &Storage::Sqlite, reporters, per_reporter).await?;
            Ok([figures(&postgres), figures(&sqlite)].concat())
        },
        |_| async move { Ok(figures(&pgbench(&args.postgres, reporters, pgbench_seconds).await?)) },
    )
    .await?;
    let (postgres, sqlite, peer) = (&ours[0..5], &ours[5..10], &theirs[0..5]);
    let row = |metric: &str, unit, tether: f64, peer: Option<f64>, target| Row {
        scenario: SCENARIO,
        metric: format!("{metric}, {reporters} writers"),
        unit,
        tether,
        peer: peer.map(|p| (PEER, p)),
        target,
    };
    Ok(vec![
        row("durable results on PostgreSQL", "results/s", postgres[0], Some(peer[0]), Target::RatioAtLeast(1.0)),
        row("durable results on SQLite (synchronous=FULL)", "results/s", sqlite[0], Some(peer[0]), Target::None),
        row("result latency p50 on PostgreSQL", "ms", postgres[1], Some(peer[1]), Target::None),
        row("result latency p99 on PostgreSQL", "ms", postgres[2], Some(peer[2]), Target::None),
        row("result latency p99 on SQLite", "ms", sqlite[2], Some(peer[2]), Target::None),
        row("server CPU per result on PostgreSQL", "µs", postgres[3], None, Target::None),
        row("server CPU per result on SQLite", "µs", sqlite[3], None, Target::None),
        row("results per transaction on PostgreSQL (mean)", "results", postgres[4], None, Target::None),
        row("results per transaction on SQLite (mean)", "results", sqlite[4], None, Target::None),
    ])
}

/// A run's figures in the order the rows read them: per second, p50, p99,
/// CPU per write, results per transaction (NaN where pgbench has none).
fn figures(w: &Writes) -> Vec<f64> {
    let tether_only = |v: Option<f64>| v.unwrap_or(f64::NAN);
    vec![w.per_s, w.p50_ms, w.p99_ms, tether_only(w.cpu_per_write_us), tether_only(w.per_transaction)]
}
