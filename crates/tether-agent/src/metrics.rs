//! Host metrics (protocol.md §12): the sources `[metrics] collect` names,
//! read every `metrics_s` into batches with fresh UUIDv7 ids. A batch the
//! server cannot take yet waits in `state/metrics/` (bounded: the oldest go
//! first when it is full) and is sent again, oldest first, under the same
//! `batch_id`, so a lost answer never stores points twice. A batch the
//! server refuses for good (a 4xx other than 429 or an expired token) is
//! dropped with a warning.
//!
//! Also the CPU and memory reading every heartbeat carries ([`CpuMemory`]).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;

use sysinfo::{CpuRefreshKind, DiskRefreshKind, Disks, MemoryRefreshKind, Networks, RefreshKind, System};
use tether_proto::Labels;
use tether_proto::telemetry::{MAX_METRIC_POINTS, MetricBatch, MetricPoint};

use crate::session::Failure;

/// What the agent can collect, named in `[metrics] collect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `host.cpu_pct`: CPU use since the previous collection, 0–100.
    Cpu,
    /// `host.mem_used_bytes`, `host.mem_total_bytes`.
    Memory,
    /// `host.load1`, `host.load5`, `host.load15`.
    Load,
    /// `host.disk_used_bytes`, `host.disk_total_bytes`, labelled `mount`.
    Disk,
    /// `host.net_rx_bytes`, `host.net_tx_bytes` (counters since boot), labelled `iface`.
    Network,
}

impl Source {
    /// Every source, in the order of the default `collect` list.
    pub const ALL: [Source; 5] = [Source::Cpu, Source::Memory, Source::Load, Source::Disk, Source::Network];

    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Memory => "memory",
            Self::Load => "load",
            Self::Disk => "disk",
            Self::Network => "network",
        }
    }
}

/// The sources `[metrics] collect` names (all of them when it is absent);
/// an unknown name is an error naming the known ones.
pub fn sources(collect: Option<&[String]>) -> Result<Vec<Source>, String> {
    let Some(names) = collect else { return Ok(Source::ALL.to_vec()) };
    let mut out = Vec::new();
    for name in names {
        let Some(source) = Source::ALL.into_iter().find(|s| s.name() == name) else {
            let known = Source::ALL.map(Source::name).join(", ");
            return Err(format!("unknown metric source {name:?}; known sources are {known}"));
        };
        if !out.contains(&source) {
            out.push(source);
        }
    }
    Ok(out)
}

/// How much may wait in the spool while the server cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolLimits {
    pub max_batches: usize,
    pub max_bytes: u64,
}

impl Default for SpoolLimits {
    fn default() -> Self {
        Self { max_batches: 1_000, max_bytes: 16 * 1024 * 1024 }
    }
}

/// `[metrics]` as the agent uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub sources: Vec<Source>,
    pub spool: SpoolLimits,
}

impl Default for Settings {
    fn default() -> Self {
        Self { sources: Source::ALL.to_vec(), spool: SpoolLimits::default() }
    }
}

/// One reading of CPU and memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuMemoryReading {
    /// `None` on the first reading: CPU use is the difference of two.
    pub cpu_pct: Option<f32>,
    pub mem_used_bytes: u64,
    pub mem_total_bytes: u64,
}

/// CPU use and memory, cheap enough to read on the agent's one thread for
/// every heartbeat: two small files under `/proc`, never the process table.
/// The `System` is kept across readings because CPU use is measured
/// between two of them.
pub struct CpuMemory {
    sys: System,
    primed: bool,
}

impl std::fmt::Debug for CpuMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuMemory").field("primed", &self.primed).finish_non_exhaustive()
    }
}

impl CpuMemory {
    /// `None` (with a warning) where this system cannot be read.
    pub fn new() -> Option<Self> {
        match System::new() {
            Ok(sys) => Some(Self { sys, primed: false }),
            Err(e) => {
                tracing::warn!(error = %e, "Cannot read this host's CPU and memory; heartbeats go without them");
                None
            }
        }
    }

    pub fn read(&mut self) -> CpuMemoryReading {
        self.sys.refresh_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        let cpu_pct = std::mem::replace(&mut self.primed, true)
            .then(|| self.sys.global_cpu_usage())
            .filter(|pct| pct.is_finite());
        CpuMemoryReading { cpu_pct, mem_used_bytes: self.sys.used_memory(), mem_total_bytes: self.sys.total_memory() }
    }
}

/// The one-minute load average, where the system has one.
pub fn load1() -> Option<f64> {
    System::load_average().ok().map(|l| l.one).filter(|l| l.is_finite())
}

/// Reads the configured sources. It may wait on a slow file system (disk
/// usage of a network mount), so the daemon runs it off the runtime thread.
pub struct Collector {
    sources: Vec<Source>,
    cpu_memory: Option<CpuMemory>,
    disks: Option<Disks>,
    networks: Option<Networks>,
}

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collector").field("sources", &self.sources).finish_non_exhaustive()
    }
}

impl Collector {
    /// A collector whose first CPU reading is taken now, so the first
    /// collection already has CPU use over the interval.
    pub fn new(sources: Vec<Source>) -> Self {
        let wants = |s| sources.contains(&s);
        let mut cpu_memory = (wants(Source::Cpu) || wants(Source::Memory)).then(CpuMemory::new).flatten();
        if let Some(cm) = &mut cpu_memory {
            cm.read();
        }
        let disks = wants(Source::Disk).then(Disks::new).and_then(|d| d.ok());
        let networks = wants(Source::Network).then(Networks::new).and_then(|n| n.ok());
        Self { sources, cpu_memory, disks, networks }
    }

    /// One point per value, stamped `ts_ms`. Values that cannot be read
    /// (or would not pass the server's checks) are left out.
    pub fn collect(&mut self, ts_ms: i64) -> Vec<MetricPoint> {
        let mut points = Vec::new();
        let mut point = |name: &str, value: f64, labels: Labels| {
            if value.is_finite() {
                points.push(MetricPoint { name: name.to_owned(), ts_ms, value, labels });
            }
        };
        let reading = self.cpu_memory.as_mut().map(CpuMemory::read);
        for source in &self.sources {
            match source {
                Source::Cpu => {
                    if let Some(pct) = reading.and_then(|r| r.cpu_pct) {
                        point("host.cpu_pct", pct.into(), Labels::new());
                    }
                }
                Source::Memory => {
                    if let Some(r) = reading {
                        point("host.mem_used_bytes", r.mem_used_bytes as f64, Labels::new());
                        point("host.mem_total_bytes", r.mem_total_bytes as f64, Labels::new());
                    }
                }
                Source::Load => {
                    if let Ok(load) = System::load_average() {
                        point("host.load1", load.one, Labels::new());
                        point("host.load5", load.five, Labels::new());
                        point("host.load15", load.fifteen, Labels::new());
                    }
                }
                Source::Disk => {
                    let Some(disks) = &mut self.disks else { continue };
                    disks.refresh_specifics(true, DiskRefreshKind::nothing().with_storage());
                    let mut seen = std::collections::HashSet::new();
                    for disk in disks.iter().filter(|d| !ephemeral_mount(&d.mount_point().to_string_lossy())) {
                        let mount = disk.mount_point().to_string_lossy().into_owned();
                        // A file system mounted twice counts once, under its first mount.
                        if !seen.insert(mount.clone()) {
                            continue;
                        }
                        let Some(labels) = label("mount", mount) else { continue };
                        let total = disk.total_space();
                        point(
                            "host.disk_used_bytes",
                            total.saturating_sub(disk.available_space()) as f64,
                            labels.clone(),
                        );
                        point("host.disk_total_bytes", total as f64, labels);
                    }
                }
                Source::Network => {
                    let Some(networks) = &mut self.networks else { continue };
                    networks.refresh(true);
                    for (iface, data) in networks.iter().filter(|(iface, _)| !ephemeral_iface(&iface.to_string_lossy()))
                    {
                        let Some(labels) = label("iface", iface.to_string_lossy().into_owned()) else { continue };
                        point("host.net_rx_bytes", data.total_received() as f64, labels.clone());
                        point("host.net_tx_bytes", data.total_transmitted() as f64, labels);
                    }
                }
            }
        }
        points
    }
}

/// Container and virtual interfaces come and go by the hundred on a busy
/// host; each would be a new series, and the server caps series per agent.
fn ephemeral_iface(name: &str) -> bool {
    name == "lo"
        || ["veth", "docker", "br-", "cni", "flannel", "cali", "virbr", "vxlan", "kube-", "tunl", "lxc"]
            .iter()
            .any(|prefix| name.starts_with(prefix))
}

/// Mounts of container layers and runtime state, one per container.
fn ephemeral_mount(mount: &str) -> bool {
    ["/var/lib/docker/", "/var/lib/containers/", "/var/lib/kubelet/", "/run/", "/snap/"]
        .iter()
        .any(|prefix| mount.starts_with(prefix))
}

/// A one-label set, or `None` when the value would not pass the server's
/// label checks (the whole batch would be refused for it).
fn label(key: &str, value: String) -> Option<Labels> {
    tether_proto::telemetry::label_ok(key, &value).then(|| Labels::from([(key.to_owned(), value)]))
}

/// `points` as batches of at most [`MAX_METRIC_POINTS`], each with a fresh
/// UUIDv7 id (they sort by creation, which is the order the spool keeps).
pub fn batches(points: Vec<MetricPoint>) -> Vec<MetricBatch> {
    let mut out = Vec::new();
    let mut points = points.into_iter().peekable();
    while points.peek().is_some() {
        let chunk: Vec<_> = points.by_ref().take(MAX_METRIC_POINTS).collect();
        out.push(MetricBatch { batch_id: uuid::Uuid::now_v7().to_string(), points: chunk });
    }
    out
}

/// Batches waiting for the server, one JSON file each under
/// `state/metrics/`, named by batch id (so oldest first by name), written
/// atomically. Only batches the server could not take are written: while it
/// answers, nothing touches the disk.
#[derive(Debug)]
pub struct MetricSpool {
    dir: PathBuf,
    limits: SpoolLimits,
    /// Batch id and file size, oldest first.
    entries: VecDeque<(String, u64)>,
    bytes: u64,
}

impl MetricSpool {
    /// The spool in `dir` as a previous run left it, trimmed to `limits`.
    pub fn open(dir: PathBuf, limits: SpoolLimits) -> std::io::Result<Self> {
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name();
            // Temp files of interrupted writes start with a dot.
            let Some(id) = name.to_str().filter(|n| !n.starts_with('.')).and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            entries.push((id.to_owned(), entry.metadata()?.len()));
        }
        entries.sort();
        let bytes = entries.iter().map(|(_, size)| size).sum();
        let mut spool = Self { dir, limits, entries: entries.into(), bytes };
        spool.trim();
        Ok(spool)
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Keeps `batch` until it is sent; the oldest batches go when the spool is full.
    pub fn push(&mut self, batch: &MetricBatch) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(batch).map_err(std::io::Error::other)?;
        crate::state::write_atomic(&self.path(&batch.batch_id), &bytes)?;
        self.entries.push_back((batch.batch_id.clone(), bytes.len() as u64));
        self.bytes += bytes.len() as u64;
        self.trim();
        Ok(())
    }

    /// Drops the oldest batches beyond the limits, with one warning saying how many.
    fn trim(&mut self) {
        let (mut batches, mut bytes) = (0, 0);
        while self.entries.len() > self.limits.max_batches || self.bytes > self.limits.max_bytes {
            let Some(&(_, size)) = self.entries.front() else { break };
            self.remove_front();
            batches += 1;
            bytes += size;
        }
        if batches > 0 {
            tracing::warn!(
                dropped_batches = batches,
                dropped_bytes = bytes,
                max_batches = self.limits.max_batches,
                max_bytes = self.limits.max_bytes,
                "Metrics spool full while the server is unreachable: dropped the {batches} oldest batch(es)"
            );
        }
    }

    /// The oldest batch; one that cannot be read is dropped with a warning.
    pub fn front(&mut self) -> Option<MetricBatch> {
        while let Some((id, _)) = self.entries.front() {
            let path = self.path(id);
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(batch) => return Some(batch),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "Dropping an unreadable spooled metric batch");
                    self.remove_front();
                }
            }
        }
        None
    }

    /// Forgets the oldest batch (sent, refused or unreadable).
    pub fn remove_front(&mut self) {
        let Some((id, size)) = self.entries.pop_front() else { return };
        self.bytes -= size;
        if let Err(e) = std::fs::remove_file(self.path(&id))
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(batch_id = %id, error = %e, "Could not remove a spooled metric batch");
        }
    }
}

/// How a delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// Everything was sent (or refused for good): nothing waits.
    All,
    /// The server could not be reached; the rest waits in the spool.
    Partly { retry_after: Option<Duration> },
}

/// Sends the spooled batches oldest first, then `fresh`, with `send`,
/// stopping at the first the server could not take: it and everything
/// after it wait in the spool. A batch refused for good is dropped with a
/// warning. A revoked or unusable session ends the delivery with its
/// failure (the batches stay spooled).
pub async fn deliver<F, Fut>(
    spool: &mut MetricSpool,
    fresh: Vec<MetricBatch>,
    mut send: F,
) -> Result<Delivered, Failure>
where
    F: FnMut(MetricBatch) -> Fut,
    Fut: Future<Output = Result<(), Failure>>,
{
    let mut fresh = VecDeque::from(fresh);
    let outcome = loop {
        let (batch, spooled) = match spool.front() {
            Some(batch) => (batch, true),
            None => match fresh.pop_front() {
                Some(batch) => (batch, false),
                None => break Ok(Delivered::All),
            },
        };
        let id = batch.batch_id.clone();
        match send(batch.clone()).await {
            Ok(()) => {}
            Err(Failure::Refused { status, what }) => {
                tracing::warn!(batch_id = %id, status, what = %what, "The server refused a metric batch; dropping it");
            }
            Err(failure) => {
                if !spooled {
                    fresh.push_front(batch);
                }
                break match failure {
                    Failure::Retry { retry_after, .. } => Ok(Delivered::Partly { retry_after }),
                    Failure::CursorExpired => Ok(Delivered::Partly { retry_after: None }),
                    stop => Err(stop),
                };
            }
        }
        if spooled {
            spool.remove_front();
        }
    };
    for batch in fresh {
        if let Err(e) = spool.push(&batch) {
            tracing::error!(batch_id = %batch.batch_id, error = %e, "Could not spool a metric batch; its points are lost");
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    fn point(value: f64) -> MetricPoint {
        MetricPoint { name: "host.load1".into(), ts_ms: 1, value, labels: Labels::new() }
    }

    fn batch(value: f64) -> MetricBatch {
        MetricBatch { batch_id: uuid::Uuid::now_v7().to_string(), points: vec![point(value)] }
    }

    #[test]
    fn container_interfaces_and_mounts_are_not_series() {
        for name in ["lo", "veth1a2b3c", "docker0", "br-5f2", "cni0", "cali12ab", "flannel.1"] {
            assert!(ephemeral_iface(name), "{name}");
        }
        for name in ["eth0", "ens3", "wlp2s0", "bond0"] {
            assert!(!ephemeral_iface(name), "{name}");
        }
        assert!(ephemeral_mount("/var/lib/docker/overlay2/abc/merged"));
        assert!(ephemeral_mount("/run/user/1000"));
        assert!(!ephemeral_mount("/"));
        assert!(!ephemeral_mount("/var/lib/postgresql"));
    }

    fn spool(dir: &tempfile::TempDir, limits: SpoolLimits) -> MetricSpool {
        MetricSpool::open(dir.path().to_owned(), limits).expect("open")
    }

    fn ids(batches: &[MetricBatch]) -> Vec<String> {
        batches.iter().map(|b| b.batch_id.clone()).collect()
    }

    /// The ids a fake sender was given, in order.
    type SentIds = Arc<Mutex<Vec<String>>>;

    /// A sender answering from `script` in turn (then Ok) and recording what it was given.
    fn sender(
        script: Vec<Result<(), Failure>>,
    ) -> (SentIds, impl FnMut(MetricBatch) -> std::future::Ready<Result<(), Failure>>) {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let log = sent.clone();
        let mut script = VecDeque::from(script);
        let send = move |b: MetricBatch| {
            log.lock().expect("log").push(b.batch_id);
            std::future::ready(script.pop_front().unwrap_or(Ok(())))
        };
        (sent, send)
    }

    fn unreachable() -> Failure {
        Failure::Retry { retry_after: Some(Duration::from_secs(7)), why: "connection refused".into() }
    }

    #[test]
    fn collect_names_known_sources_and_rejects_others_by_name() {
        assert_eq!(sources(None), Ok(Source::ALL.to_vec()));
        let names = ["load".to_owned(), "cpu".to_owned(), "load".to_owned()];
        assert_eq!(sources(Some(&names)), Ok(vec![Source::Load, Source::Cpu]));
        assert_eq!(sources(Some(&[])), Ok(vec![]));
        let err = sources(Some(&["cpu".to_owned(), "gpu".to_owned()])).expect_err("unknown");
        assert!(err.contains("\"gpu\"") && err.contains("cpu, memory, load, disk, network"), "{err}");
    }

    #[test]
    fn batches_split_at_the_point_limit_with_ids_in_creation_order() {
        assert!(batches(Vec::new()).is_empty());
        let split = batches((0..MAX_METRIC_POINTS + 1).map(|n| point(n as f64)).collect());
        assert_eq!(split.iter().map(|b| b.points.len()).collect::<Vec<_>>(), [MAX_METRIC_POINTS, 1]);
        assert!(split[0].batch_id < split[1].batch_id, "ids sort oldest first");
    }

    #[test]
    fn the_spool_keeps_order_across_reopening_and_drops_the_oldest_beyond_its_limits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = SpoolLimits { max_batches: 3, max_bytes: 1 << 20 };
        let mut s = spool(&dir, limits);
        let all: Vec<_> = (0..5).map(|n| batch(n as f64)).collect();
        for b in &all {
            s.push(b).expect("push");
        }
        assert_eq!(s.len(), 3);
        assert_eq!(s.front(), Some(all[2].clone()), "the two oldest were dropped");

        let mut s = spool(&dir, limits);
        assert_eq!(s.len(), 3);
        for b in &all[2..] {
            assert_eq!(s.front().as_ref(), Some(b));
            s.remove_front();
        }
        assert!(s.front().is_none() && s.is_empty());
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0, "sent batches leave no file");

        // By size: each batch here is the same size; room for two.
        let size = serde_json::to_vec(&all[0]).expect("json").len() as u64;
        let mut s = spool(&dir, SpoolLimits { max_batches: 100, max_bytes: 2 * size + 1 });
        for b in &all {
            s.push(b).expect("push");
        }
        assert_eq!((s.len(), s.front()), (2, Some(all[3].clone())));
        // A smaller limit on the next start trims what is there.
        assert_eq!(spool(&dir, SpoolLimits { max_batches: 1, max_bytes: 1 << 20 }).front(), Some(all[4].clone()));
    }

    #[test]
    fn an_unreadable_spooled_batch_is_dropped_not_retried_forever() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = spool(&dir, SpoolLimits::default());
        let (a, b) = (batch(1.0), batch(2.0));
        s.push(&a).expect("push");
        s.push(&b).expect("push");
        std::fs::write(dir.path().join(format!("{}.json", a.batch_id)), "{not json").expect("corrupt");
        assert_eq!(s.front(), Some(b));
        assert_eq!(s.len(), 1);
    }

    #[tokio::test]
    async fn while_the_server_is_away_batches_wait_and_go_oldest_first_under_the_same_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = spool(&dir, SpoolLimits::default());
        let first = vec![batch(1.0)];
        let (sent, send) = sender(vec![Err(unreachable())]);
        assert_eq!(
            deliver(&mut s, first.clone(), send).await.expect("delivered"),
            Delivered::Partly { retry_after: Some(Duration::from_secs(7)) }
        );
        assert_eq!((s.len(), sent.lock().expect("log").clone()), (1, ids(&first)));

        // Still away: the spooled batch is tried first; the new one joins it.
        let second = vec![batch(2.0)];
        let (sent, send) = sender(vec![Err(unreachable())]);
        deliver(&mut s, second.clone(), send).await.expect("delivered");
        assert_eq!((s.len(), sent.lock().expect("log").clone()), (2, ids(&first)));

        // Back: everything in order, the retried batch with its first id.
        let third = vec![batch(3.0)];
        let (sent, send) = sender(vec![]);
        assert_eq!(deliver(&mut s, third.clone(), send).await.expect("delivered"), Delivered::All);
        assert_eq!(*sent.lock().expect("log"), [ids(&first), ids(&second), ids(&third)].concat());
        assert!(s.is_empty());
    }

    #[tokio::test]
    async fn a_batch_refused_for_good_is_dropped_and_the_rest_still_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = spool(&dir, SpoolLimits::default());
        let (old, refused, fresh) = (batch(1.0), batch(2.0), batch(3.0));
        s.push(&old).expect("push");
        s.push(&refused).expect("push");
        let bad = Failure::Refused { status: 400, what: "value must be finite".into() };
        let (sent, send) = sender(vec![Ok(()), Err(bad)]);
        assert_eq!(deliver(&mut s, vec![fresh.clone()], send).await.expect("delivered"), Delivered::All);
        assert_eq!(*sent.lock().expect("log"), ids(&[old, refused, fresh]));
        assert!(s.is_empty(), "nothing refused stays to be retried");
    }

    #[tokio::test]
    async fn a_revoked_agent_stops_delivering_and_keeps_what_it_collected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = spool(&dir, SpoolLimits::default());
        let fresh = vec![batch(1.0), batch(2.0)];
        let (_, send) = sender(vec![Err(Failure::Revoked("revoked".into()))]);
        let stop = deliver(&mut s, fresh.clone(), send).await.expect_err("stops");
        assert!(matches!(stop, Failure::Revoked(_)));
        assert_eq!((s.len(), s.front()), (2, Some(fresh[0].clone())));
    }

    #[test]
    fn the_first_cpu_reading_has_no_usage_and_later_ones_do() {
        let Some(mut cm) = CpuMemory::new() else { return };
        let first = cm.read();
        assert_eq!(first.cpu_pct, None);
        assert!(first.mem_total_bytes > 0 && first.mem_used_bytes <= first.mem_total_bytes);
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        assert!(cm.read().cpu_pct.is_some_and(|pct| (0.0..=100.0).contains(&pct)));
    }

    #[test]
    fn collected_points_have_well_formed_names_and_labels() {
        let mut collector = Collector::new(Source::ALL.to_vec());
        let points = collector.collect(42);
        assert!(points.iter().any(|p| p.name == "host.mem_total_bytes"), "{points:?}");
        for p in &points {
            assert!(tether_proto::telemetry::metric_name_ok(&p.name), "{}", p.name);
            assert!(p.value.is_finite() && p.ts_ms == 42);
            tether_proto::agent::validate_labels(&p.labels).expect("labels the server takes");
        }
    }
}
