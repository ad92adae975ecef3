//! Idle-poll throughput beside nginx: every connection sends the same
//! authenticated `GET /api/v1/agents/self/updates?wait=0` with the agent's
//! cursor in `If-None-Match`, back to back on a kept-alive connection, and
//! tether answers 204 from memory. nginx gets byte-for-byte the same
//! requests from the same load generator and answers `return 204`: the
//! most an HTTP server on this machine can do for such a request.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tether_proto::Labels;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{PeerArgs, Row, Target, alternate, peer_program};
use crate::{Reaped, Storage, cpu_seconds, cursor_of, enroll_many, poll_request, read_status, start_server};

const SCENARIO: &str = "idle-poll";

pub async fn run(bin: &Path, args: &PeerArgs) -> anyhow::Result<Vec<Row>> {
    let connections = args.pick(64, 4);
    let seconds = Duration::from_secs(args.pick(10, 1));
    let nginx_bin = peer_program(&["/usr/sbin/nginx"], "nginx-light")?;

    let server = start_server(&bin.to_path_buf(), &Storage::Sqlite)?;
    eprintln!("idle-poll: enrolling {connections} agents…");
    let pairs = enroll_many(&server, connections, Labels::new()).await?;
    let mut requests = Vec::with_capacity(pairs.len());
    for pair in &pairs {
        requests.push(poll_request(&server.addr, &pair.access_token, &cursor_of(&server, pair).await?, 0));
    }
    let nginx = Nginx::start(&nginx_bin)?;
    eprintln!("idle-poll: {connections} connections, {} s a round, beside nginx `return 204`", seconds.as_secs());
    let (ours, theirs) = alternate(
        args.rounds(),
        |_| load(&server.addr, &requests, seconds, vec![server.child.id()]),
        |_| load(&nginx.addr, &requests, seconds, nginx.pids()),
    )
    .await?;
    let row = |metric: &str, unit, i: usize, target| Row {
        scenario: SCENARIO,
        metric: format!("{metric}, {connections} connections"),
        unit,
        tether: ours[i],
        peer: Some(("nginx return 204", theirs[i])),
        target,
    };
    Ok(vec![
        row("idle polls answered (wait=0 → 204)", "req/s", 0, Target::RatioAtLeast(0.8)),
        row("latency p50", "µs", 1, Target::None),
        row("latency p99", "µs", 2, Target::None),
        row("server CPU per request", "µs", 3, Target::None),
    ])
}

/// Sends each of `requests` back to back on its own connection to `addr`
/// for `seconds`; requests per second, latency p50 and p99 (µs), and the
/// CPU the processes `pids` spent per request (µs).
async fn load(addr: &str, requests: &[Vec<u8>], seconds: Duration, pids: Vec<u32>) -> anyhow::Result<Vec<f64>> {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::with_capacity(requests.len());
    for _ in requests {
        let conn = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        conn.set_nodelay(true)?;
        conns.push(conn);
    }
    let cpu = || pids.iter().map(|&p| cpu_seconds(p)).sum::<anyhow::Result<f64>>();
    let cpu_before = cpu()?;
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(conns.len());
    for (mut conn, req) in conns.into_iter().zip(requests.iter().cloned()) {
        let (stop, count) = (stop.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1024);
            let mut latencies = Vec::with_capacity(1 << 16);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                conn.write_all(&req).await?;
                let status = read_status(&mut conn, &mut buf).await?;
                if status != 204 {
                    bail!("an idle poll was answered {status}");
                }
                latencies.push(t.elapsed().as_micros() as u64);
                count.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(latencies)
        }));
    }
    tokio::time::sleep(seconds).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu()? - cpu_before;
    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)] as f64;
    let requests = count.load(Ordering::Relaxed);
    if requests == 0 {
        bail!("no request was answered in {} s", seconds.as_secs());
    }
    Ok(vec![requests as f64 / elapsed, pct(0.5), pct(0.99), cpu * 1e6 / requests as f64])
}

/// A private nginx on a free loopback port whose every location answers
/// `return 204`, with as many workers as cores (as tether has threads).
struct Nginx {
    addr: String,
    bin: PathBuf,
    master: Reaped,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    /// Killing the master alone would leave its workers serving: ask it to
    /// stop (it stops them), then reap it.
    fn drop(&mut self) {
        let _ = Command::new(&self.bin)
            .arg("-p")
            .arg(self._dir.path())
            .arg("-c")
            .arg(self._dir.path().join("nginx.conf"))
            .args(["-s", "stop"])
            .stderr(Stdio::null())
            .status();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) && matches!(self.master.0.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Nginx {
    fn start(bin: &PathBuf) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = crate::free_port()?;
        let d = dir.path().display();
        // keepalive_requests: nginx closes a kept-alive connection after 1,000
        // requests by default; tether never does, so neither may the peer.
        let conf = format!(
            "daemon off;\nworker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 1000000000;\n  keepalive_timeout 300s;\n\
               client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
               uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               server {{ listen 127.0.0.1:{port}; location / {{ return 204; }} }}\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf)?;
        let master = Command::new(bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(Reaped)
            .with_context(|| format!("starting {}", bin.display()))?;
        let addr = format!("127.0.0.1:{port}");
        let nginx = Nginx { addr, bin: bin.clone(), master, _dir: dir };
        let started = Instant::now();
        while std::net::TcpStream::connect(&nginx.addr).is_err() || nginx.pids().len() < 2 {
            if started.elapsed() > Duration::from_secs(10) {
                let log = std::fs::read_to_string(nginx._dir.path().join("error.log")).unwrap_or_default();
                bail!("nginx did not listen on {}: {log}", nginx.addr);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(nginx)
    }

    /// The master and its workers.
    fn pids(&self) -> Vec<u32> {
        let master = self.master.0.id();
        let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children")).unwrap_or_default();
        std::iter::once(master).chain(children.split_whitespace().filter_map(|p| p.parse().ok())).collect()
    }
}
