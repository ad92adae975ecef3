//! Telemetry ingest: heartbeats per second from a fleet of agents (each
//! one committed, in groups, before its 200), and metric points per second
//! in 5,000-point gzip batches; on SQLite and on PostgreSQL.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use futures::StreamExt;
use tether_proto::telemetry::{MAX_METRIC_POINTS, MetricBatch, MetricPoint};

use crate::{Storage, cpu_seconds, enroll_many, percentile, start_server};

#[derive(Debug, clap::Args)]
pub struct TelemetryArgs {
    /// Agents sending heartbeats.
    #[arg(long, default_value_t = 2000)]
    agents: usize,
    /// Heartbeats in flight at once.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// Length of the heartbeat run in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Agents shipping metric batches at once.
    #[arg(long, default_value_t = 8)]
    metric_agents: usize,
    /// 5,000-point batches each of them ships.
    #[arg(long, default_value_t = 20)]
    batches: usize,
    /// Also run on a scratch database on this PostgreSQL server.
    #[arg(long, value_name = "URL")]
    postgres: Option<String>,
}

struct Row {
    store: String,
    what: &'static str,
    per_s: f64,
    latency: String,
    cpu_us: f64,
}

pub async fn run(bin: &PathBuf, args: TelemetryArgs) -> anyhow::Result<()> {
    if args.agents < args.concurrency {
        bail!("--agents must be at least --concurrency");
    }
    let mut rows = measure(bin, &Storage::Sqlite, &args).await?;
    if let Some(url) = &args.postgres {
        rows.extend(measure(bin, &Storage::new(Some(url)).await, &args).await?);
    }
    println!("| store | what | per second | latency p50 / p99 | server CPU per item |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!("| {} | {} | {:.0} | {} | {:.1} µs |", r.store, r.what, r.per_s, r.latency, r.cpu_us);
    }
    Ok(())
}

async fn measure(bin: &PathBuf, storage: &Storage, args: &TelemetryArgs) -> anyhow::Result<Vec<Row>> {
    let server = start_server(bin, storage)?;
    eprintln!("{}: enrolling {} agents…", storage.name(), args.agents);
    let pairs = enroll_many(&server, args.agents, tether_proto::Labels::new()).await?;
    let http = reqwest::Client::builder().pool_max_idle_per_host(args.concurrency).build()?;

    eprintln!("{}: heartbeats for {} s…", storage.name(), args.seconds);
    let url = format!("{}/api/v1/agents/self/heartbeat", server.base);
    let stop = Arc::new(AtomicBool::new(false));
    let cpu_before = cpu_seconds(server.child.id())?;
    let started = Instant::now();
    let workers = (0..args.concurrency).map(|w| {
        let (http, url, stop) = (http.clone(), url.clone(), stop.clone());
        let tokens: Vec<String> =
            pairs.iter().skip(w).step_by(args.concurrency).map(|p| p.access_token.clone()).collect();
        tokio::spawn(async move {
            let mut lat = Vec::new();
            let body = serde_json::json!({"uptime_s": 100, "version": "bench", "running_commands": 0,
                                          "queue_depth": 0, "cpu_pct": 3.5, "mem_used_bytes": 1_000_000});
            for token in tokens.iter().cycle() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let t = Instant::now();
                let res = http.post(&url).bearer_auth(token).json(&body).send().await?;
                anyhow::ensure!(res.status() == 200, "heartbeat answered {}", res.status());
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(lat)
        })
    });
    let workers: Vec<_> = workers.collect();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for w in workers {
        lat.extend(w.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(server.child.id())? - cpu_before;
    lat.sort_by(f64::total_cmp);
    let heartbeats = Row {
        store: storage.name().to_owned(),
        what: "heartbeats (each committed before its 200)",
        per_s: lat.len() as f64 / elapsed,
        latency: format!("{:.1} ms / {:.1} ms", percentile(&lat, 0.5), percentile(&lat, 0.99)),
        cpu_us: cpu * 1e6 / lat.len() as f64,
    };

    eprintln!("{}: {} agents × {} metric batches…", storage.name(), args.metric_agents, args.batches);
    let url = format!("{}/api/v1/agents/self/metrics", server.base);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
    let cpu_before = cpu_seconds(server.child.id())?;
    let started = Instant::now();
    let lat = futures::stream::iter(pairs.iter().take(args.metric_agents).enumerate())
        .map(|(a, pair)| {
            let (http, url, token) = (http.clone(), url.clone(), pair.access_token.clone());
            let batches = args.batches;
            async move {
                let mut lat = Vec::new();
                for b in 0..batches {
                    let body = gzip_batch(a, b, now)?;
                    let t = Instant::now();
                    let res = http
                        .post(&url)
                        .bearer_auth(&token)
                        .header("content-type", "application/json")
                        .header("content-encoding", "gzip")
                        .body(body)
                        .send()
                        .await?;
                    anyhow::ensure!(res.status() == 200, "metrics answered {}", res.status());
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                anyhow::Ok(lat)
            }
        })
        .buffer_unordered(args.metric_agents)
        .collect::<Vec<_>>()
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(server.child.id())? - cpu_before;
    let mut all = Vec::new();
    for l in lat {
        all.extend(l?);
    }
    all.sort_by(f64::total_cmp);
    let points = (all.len() * MAX_METRIC_POINTS) as f64;
    let metric_row = Row {
        store: storage.name().to_owned(),
        what: "metric points (5,000-point gzip batches; latency per batch)",
        per_s: points / elapsed,
        latency: format!("{:.0} ms / {:.0} ms", percentile(&all, 0.5), percentile(&all, 0.99)),
        cpu_us: cpu * 1e6 / points,
    };
    Ok(vec![heartbeats, metric_row])
}

/// Batch `b` of agent `a`: ten series (five names, two label values) of
/// 500 points each, one every 10 s, gzip-compressed as an agent sends it.
fn gzip_batch(a: usize, b: usize, now: i64) -> anyhow::Result<Vec<u8>> {
    let names = ["host.cpu_pct", "host.mem_used_bytes", "host.load1", "host.disk_used_bytes", "host.net_rx_bytes"];
    let start = now - 2 * 86_400_000 + (b * 500) as i64 * 10_000;
    let points = (0..MAX_METRIC_POINTS)
        .map(|i| {
            let series = i % 10;
            MetricPoint {
                name: names[series / 2].into(),
                ts_ms: start + (i / 10) as i64 * 10_000,
                value: (i * 7 % 100) as f64,
                labels: [("dev".to_owned(), format!("d{}", series % 2))].into(),
            }
        })
        .collect();
    let batch = MetricBatch { batch_id: format!("bench-{a}-{b}"), points };
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&serde_json::to_vec(&batch)?)?;
    Ok(enc.finish()?)
}
