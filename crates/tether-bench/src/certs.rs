//! A certificate replacement reaching a thousand agents (protocol.md §7):
//! how long the replace takes, then how long until every holder's parked
//! long-poll has carried `cert.renewed` and the agent has fetched the new
//! material (serial checked). The agents are simulated by this process: a
//! raw long-poll each, then the same request the real agent makes.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use tether_client::Client;
use tether_proto::Labels;
use tether_proto::certs::{ReplaceCert, UploadCert};
use tether_proto::command::Target;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::config::read_signal;
use crate::{Storage, cursor_of, enroll_many, poll_request, start_server};

#[derive(Debug, clap::Args)]
pub struct CertsArgs {
    /// Agents holding the certificate (each parks one long-poll).
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Also measure on a scratch database on this PostgreSQL server.
    #[arg(long, value_name = "URL")]
    postgres: Option<String>,
}

struct Row {
    store: &'static str,
    replace_ms: f64,
    told: u64,
    signalled_ms: f64,
    installed_p50_ms: f64,
    installed_all_ms: f64,
}

pub async fn run(bin: &PathBuf, args: CertsArgs) -> anyhow::Result<()> {
    if !(1..=15_000).contains(&args.agents) {
        bail!("--agents must be 1..=15000 (one open connection each)");
    }
    let mut rows = vec![measure(bin, &Storage::Sqlite, args.agents).await?];
    if let Some(url) = &args.postgres {
        rows.push(measure(bin, &Storage::new(Some(url)).await, args.agents).await?);
    }
    println!(
        "| store | holders | replace → 200 | agents told | replace → last `cert.renewed` read | replace → new material fetched: p50 | all |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {:.0} ms | {} | {:.0} ms | {:.0} ms | {:.0} ms |",
            r.store, args.agents, r.replace_ms, r.told, r.signalled_ms, r.installed_p50_ms, r.installed_all_ms
        );
    }
    Ok(())
}

/// A certificate for `bench.example.com` valid for `days`, and its key.
fn certificate(days: i64) -> anyhow::Result<(String, String)> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec!["bench.example.com".to_owned()])?;
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(days);
    Ok((params.self_signed(&key)?.pem(), key.serialize_pem()))
}

async fn measure(bin: &PathBuf, storage: &Storage, agents: usize) -> anyhow::Result<Row> {
    let server = start_server(bin, storage)?;
    let admin = Client::new(&server.base)?.with_bearer(server.admin_token.clone());
    eprintln!("{}: enrolling {agents} agents labelled role=bench…", storage.name());
    let labels = Labels::from([("role".to_owned(), "bench".to_owned())]);
    let pairs = enroll_many(&server, agents, labels.clone()).await?;
    let (cert_pem, key_pem) = certificate(30)?;
    let upload = UploadCert {
        name: "bench".into(),
        cert_pem,
        key_pem,
        chain_pem: String::new(),
        target: Target::labels(labels),
        group: None,
        hook: None,
    };
    let added = admin.upload_cert(&upload).await?;
    let id = added.cert.id;

    eprintln!("{}: parking {agents} long-polls…", storage.name());
    let mut conns = Vec::with_capacity(agents);
    for pair in &pairs {
        let mut conn = TcpStream::connect(&server.addr).await?;
        conn.write_all(&poll_request(&server.addr, &pair.access_token, &cursor_of(&server, pair).await?, 30)).await?;
        conns.push(conn);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    let (cert_pem, key_pem) = certificate(90)?;
    let base = Client::new(&server.base)?;
    let started = Instant::now();
    let holders: Vec<_> = conns
        .into_iter()
        .zip(&pairs)
        .map(|(conn, pair)| {
            let agent = base.clone().with_bearer(pair.access_token.clone());
            tokio::spawn(async move {
                let signalled = read_signal(conn, started, b"cert.renewed").await?;
                let material = agent.cert_material(id).await?;
                anyhow::Ok((signalled, material.serial, started.elapsed()))
            })
        })
        .collect();
    let replaced = admin.replace_cert(id, &ReplaceCert { cert_pem, key_pem, chain_pem: String::new() }).await?;
    let replace_ms = started.elapsed().as_secs_f64() * 1000.0;
    let new_serial = replaced.cert.serial.clone().context("an uploaded certificate has a serial")?;

    let mut signalled = Duration::ZERO;
    let mut installed = Vec::with_capacity(agents);
    let mut done = futures::stream::iter(holders).buffer_unordered(agents);
    while let Some(joined) = done.next().await {
        let (s, serial, at) = joined??;
        if serial != new_serial {
            bail!("an agent fetched serial {serial}, expected {new_serial}");
        }
        signalled = signalled.max(s);
        installed.push(at.as_secs_f64() * 1000.0);
    }
    installed.sort_by(f64::total_cmp);
    Ok(Row {
        store: storage.name(),
        replace_ms,
        told: replaced.agents_told,
        signalled_ms: signalled.as_secs_f64() * 1000.0,
        installed_p50_ms: crate::percentile(&installed, 0.5),
        installed_all_ms: installed.last().copied().unwrap_or(0.0),
    })
}
