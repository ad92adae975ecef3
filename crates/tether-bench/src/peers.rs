//! The ratio benchmarks: each scenario runs tether and a peer program on
//! this machine in the same run (nginx `return 204`, a private Mosquitto,
//! PostgreSQL's `pgbench`), alternating tether's rounds and the peer's, and
//! reports the median of each figure with the ratio between the two. On a
//! shared machine absolute figures drift by a third between runs; a ratio
//! measured side by side does not.
//!
//! Every scenario prints a Markdown table on stdout and writes the same
//! rows as JSON to `target/bench/<scenario>.json`. `--smoke` shrinks every
//! count so a scenario finishes in seconds: CI runs `all --smoke` so the
//! harness cannot rot, never the full benchmark.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::json;

pub mod durable;
pub mod fanout;
pub mod held;
pub mod idle_poll;
pub mod latency;
pub mod storm;

#[derive(Debug, Clone, clap::Args)]
pub struct PeerArgs {
    /// Tiny counts and one round, so the scenario finishes in seconds (for CI).
    #[arg(long)]
    pub smoke: bool,
    /// Rounds of tether and the peer, alternating; each figure is the median
    /// [default: 3; 1 with --smoke].
    #[arg(long)]
    pub rounds: Option<usize>,
    /// A PostgreSQL server (URL of any database there) for the scenarios
    /// that run on PostgreSQL and for pgbench; scratch databases are created
    /// and dropped.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres", value_name = "URL")]
    pub postgres: String,
    /// The NATS server two replicas share in the cross-replica latency run.
    #[arg(long, default_value = "nats://127.0.0.1:4222", value_name = "URL")]
    pub nats: String,
    /// Where the JSON results go.
    #[arg(long, default_value = "target/bench", value_name = "DIR")]
    pub json_dir: PathBuf,
}

impl PeerArgs {
    pub fn rounds(&self) -> usize {
        self.rounds.unwrap_or(if self.smoke { 1 } else { 3 }).max(1)
    }

    /// `full` normally, `smoke` with `--smoke`.
    pub fn pick<T>(&self, full: T, smoke: T) -> T {
        if self.smoke { smoke } else { full }
    }
}

/// The scenarios, in the order `all` runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Idle-poll throughput and latency beside nginx `return 204`.
    IdlePoll,
    /// Server memory per idle agent (long-poll, WebSocket) beside Mosquitto
    /// per idle subscribed client.
    Held,
    /// One command to 10,000 connected agents by label beside one Mosquitto
    /// QoS 1 publish to 10,000 subscribers.
    FanOut,
    /// Enqueue → agent receipt with 1,000 idle agents, on one server and
    /// across two replicas, beside Mosquitto publish → receipt.
    Latency,
    /// Durable command results per second beside pgbench simple-update.
    Durable,
    /// 10,000 agents reconnecting at once after a restart, beside Mosquitto.
    Storm,
}

impl Scenario {
    pub const ALL: [Scenario; 6] =
        [Scenario::IdlePoll, Scenario::Held, Scenario::FanOut, Scenario::Latency, Scenario::Durable, Scenario::Storm];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::IdlePoll => "idle-poll",
            Scenario::Held => "held",
            Scenario::FanOut => "fan-out",
            Scenario::Latency => "latency",
            Scenario::Durable => "durable",
            Scenario::Storm => "storm",
        }
    }

    async fn run(self, bin: &Path, args: &PeerArgs) -> anyhow::Result<Vec<Row>> {
        match self {
            Scenario::IdlePoll => idle_poll::run(bin, args).await,
            Scenario::Held => held::run(bin, args).await,
            Scenario::FanOut => fanout::run(bin, args).await,
            Scenario::Latency => latency::run(bin, args).await,
            Scenario::Durable => durable::run(bin, args).await,
            Scenario::Storm => storm::run(bin, args).await,
        }
    }
}

/// What a row must show to meet the target.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// tether ÷ peer at least this (throughput).
    RatioAtLeast(f64),
    /// tether ÷ peer at most this (memory, CPU).
    RatioAtMost(f64),
    /// tether's figure at most this, in the row's unit.
    AtMost(f64),
    /// Both: tether's figure at most the first, and tether ÷ peer at most the second.
    AtMostAndRatioAtMost(f64, f64),
    /// No target: the row is context for the others.
    None,
}

/// One figure of tether's beside the peer's.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: &'static str,
    pub metric: String,
    pub unit: &'static str,
    pub tether: f64,
    /// The peer's program and its figure; `None` where no peer does the same.
    pub peer: Option<(&'static str, f64)>,
    pub target: Target,
}

impl Row {
    pub fn ratio(&self) -> Option<f64> {
        self.peer.map(|(_, p)| self.tether / p).filter(|r| r.is_finite())
    }

    pub fn met(&self) -> Option<bool> {
        let ratio_at_most = |t: f64| self.ratio().is_some_and(|r| r <= t);
        match self.target {
            Target::RatioAtLeast(t) => Some(self.ratio().is_some_and(|r| r >= t)),
            Target::RatioAtMost(t) => Some(ratio_at_most(t)),
            Target::AtMost(t) => Some(self.tether <= t),
            Target::AtMostAndRatioAtMost(t, r) => Some(self.tether <= t && ratio_at_most(r)),
            Target::None => None,
        }
    }

    fn target_text(&self) -> String {
        match self.target {
            Target::RatioAtLeast(t) => format!("≥ {t}×"),
            Target::RatioAtMost(t) => format!("≤ {t}×"),
            Target::AtMost(t) => format!("≤ {} {}", figure(t), self.unit),
            Target::AtMostAndRatioAtMost(t, r) => format!("≤ {} {} and ≤ {r}×", figure(t), self.unit),
            Target::None => String::new(),
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "scenario": self.scenario,
            "metric": self.metric,
            "unit": self.unit,
            "tether": self.tether,
            "peer": self.peer.map(|(name, _)| name),
            "peer_value": self.peer.map(|(_, v)| v),
            "ratio": self.ratio(),
            "target": self.target_text(),
            "met": self.met(),
        })
    }
}

/// A figure with thousands separators and sensible decimals.
pub fn figure(v: f64) -> String {
    if v.abs() >= 100.0 || (v.fract() == 0.0 && v.abs() >= 1.0) {
        let digits = format!("{:.0}", v.abs());
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        if v < 0.0 { format!("-{out}") } else { out }
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The median of a round's figures.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Runs `ours` and `peer` alternately for `rounds` rounds, each returning
/// its figures in the same order; the medians of each figure, per side.
pub async fn alternate<O, P, FO, FP>(rounds: usize, mut ours: O, mut peer: P) -> anyhow::Result<(Vec<f64>, Vec<f64>)>
where
    O: FnMut(usize) -> FO,
    P: FnMut(usize) -> FP,
    FO: Future<Output = anyhow::Result<Vec<f64>>>,
    FP: Future<Output = anyhow::Result<Vec<f64>>>,
{
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        eprintln!("  round {}/{rounds}: tether…", round + 1);
        a.push(ours(round).await?);
        eprintln!("  round {}/{rounds}: peer…", round + 1);
        b.push(peer(round).await?);
    }
    Ok((medians(a), medians(b)))
}

/// The median of each column of `rounds`.
pub fn medians(rounds: Vec<Vec<f64>>) -> Vec<f64> {
    let width = rounds.first().map_or(0, Vec::len);
    (0..width).map(|i| median(rounds.iter().map(|r| r[i]).collect())).collect()
}

/// Prints `rows` as a Markdown table.
pub fn print_table(rows: &[Row]) {
    println!("| scenario | metric | tether | peer | tether ÷ peer | target | met |");
    println!("|---|---|---|---|---|---|---|");
    for row in rows {
        let peer = row.peer.map_or("—".to_owned(), |(name, v)| format!("{} ({name})", figure(v)));
        let ratio = row.ratio().map_or("—".to_owned(), |r| format!("{r:.2}×"));
        let met = match row.met() {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        println!(
            "| {} | {} | {} {} | {peer} | {ratio} | {} | {met} |",
            row.scenario,
            row.metric,
            figure(row.tether),
            row.unit,
            row.target_text()
        );
    }
}

/// Writes `rows` as JSON to `<json_dir>/<name>.json`.
pub fn write_json(name: &str, rows: &[Row], args: &PeerArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.json_dir).with_context(|| format!("creating {}", args.json_dir.display()))?;
    let path = args.json_dir.join(format!("{name}.json"));
    let document = json!({
        "scenario": name,
        "smoke": args.smoke,
        "rounds": args.rounds(),
        "date": time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339)?,
        "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
    });
    std::fs::write(&path, serde_json::to_string_pretty(&document)?)?;
    eprintln!("results written to {}", path.display());
    Ok(())
}

/// Runs one scenario, or every scenario for `None`, and reports: each
/// scenario's JSON as it finishes, then one table (and `all.json`). A
/// scenario that fails does not stop the others; the run then fails
/// naming it, after the table of those that finished.
pub async fn run(bin: &Path, scenario: Option<Scenario>, args: &PeerArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let scenarios = scenario.map_or(Scenario::ALL.to_vec(), |s| vec![s]);
    let (mut rows, mut failed) = (Vec::new(), Vec::new());
    for s in &scenarios {
        eprintln!("== {} ==", s.name());
        let t = std::time::Instant::now();
        match s.run(bin, args).await {
            Ok(mine) => {
                write_json(s.name(), &mine, args)?;
                rows.extend(mine);
                eprintln!("== {} done in {:.0} s ==", s.name(), t.elapsed().as_secs_f64());
            }
            Err(e) => {
                eprintln!("== {} FAILED after {:.0} s: {e:#} ==", s.name(), t.elapsed().as_secs_f64());
                failed.push(s.name());
            }
        }
    }
    print_table(&rows);
    if scenario.is_none() {
        write_json("all", &rows, args)?;
    }
    eprintln!("finished in {:.0} s", started.elapsed().as_secs_f64());
    if !failed.is_empty() {
        bail!("failed: {} (errors above)", failed.join(", "));
    }
    Ok(())
}

/// The path of a peer program, or an error saying how to install it.
pub fn peer_program(candidates: &[&str], package: &str) -> anyhow::Result<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.exists()).with_context(|| {
        format!("none of {candidates:?} exists: install Debian's `{package}` package to run this benchmark's peer")
    })
}
