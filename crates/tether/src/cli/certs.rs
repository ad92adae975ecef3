//! `tether certs add|replace|issue|revoke|list|status|ca`: certificates
//! agents install and keep current (protocol.md §7).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use tether_proto::certs::{Cert, CertSource, ImportCa, IssueCert, ReplaceCert, UploadCert};

use super::files::print_fleet_status;
use super::{Ctx, Output, TargetArgs, api_error, fmt_target, fmt_time, print_json, print_table, table};

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Upload a certificate and its key for agents to install in certs/NAME/.
    Add {
        /// Also the directory on agents: certs/NAME/
        name: String,
        /// PEM certificate
        #[arg(long = "cert", value_name = "FILE")]
        cert: PathBuf,
        /// PEM private key (kept encrypted on the server)
        #[arg(long = "key", value_name = "FILE")]
        key: PathBuf,
        /// PEM intermediates
        #[arg(long = "chain", value_name = "FILE")]
        chain: Option<PathBuf>,
        /// Make key.pem 0640 with this group (e.g. the web server's)
        #[arg(long, value_name = "GROUP")]
        group: Option<String>,
        /// An action of the agent's agent.toml to run after new material is installed
        #[arg(long, value_name = "ACTION")]
        hook: Option<String>,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// New material for an uploaded certificate; every holder installs it.
    Replace {
        /// Certificate name or id
        cert_name: String,
        #[arg(long = "cert", value_name = "FILE")]
        cert: PathBuf,
        #[arg(long = "key", value_name = "FILE")]
        key: PathBuf,
        #[arg(long = "chain", value_name = "FILE")]
        chain: Option<PathBuf>,
    },
    /// Have each targeted agent get a certificate from the server's CA for
    /// these names; its private key never leaves the agent.
    Issue {
        name: String,
        /// A DNS name (repeatable)
        #[arg(long = "dns", value_name = "NAME")]
        dns_names: Vec<String>,
        /// An IP address (repeatable)
        #[arg(long = "ip", value_name = "IP")]
        ip_addresses: Vec<IpAddr>,
        /// Lifetime; agents renew at two thirds of it
        #[arg(long, default_value_t = 90, value_name = "DAYS")]
        days: u32,
        #[arg(long, value_name = "GROUP")]
        group: Option<String>,
        #[arg(long, value_name = "ACTION")]
        hook: Option<String>,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Revoke a certificate: every holder removes it.
    Revoke {
        /// Certificate name or id
        cert_name: String,
    },
    /// Certificates with their serial and expiry; those expiring soon are flagged.
    List,
    /// Of the agents a certificate targets: who holds the current one, who is behind, who failed.
    Status {
        /// Certificate name or id
        cert_name: String,
    },
    /// The server's CAs.
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// The CAs agents trust, the active (signing) one first.
    List,
    /// A new CA signs from now on; agents get new certificates and trust both until `retire`.
    Rotate,
    /// Your own CA signs from now on (admin).
    Import {
        #[arg(long = "cert", value_name = "FILE")]
        cert: PathBuf,
        #[arg(long = "key", value_name = "FILE")]
        key: PathBuf,
    },
    /// Stop trusting every CA but the active one (after a rotation has reached the fleet).
    Retire,
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn read_opt(path: Option<&Path>) -> anyhow::Result<String> {
    path.map(read).transpose().map(Option::unwrap_or_default)
}

/// An active certificate by id or name.
async fn find(ctx: &Ctx, which: &str) -> anyhow::Result<Cert> {
    let certs = ctx.client.list_certs().await.map_err(api_error)?;
    let id = which.parse::<i64>().ok();
    certs
        .into_iter()
        .filter(|c| c.revoked_at.is_none())
        .find(|c| Some(c.id) == id || c.name == which)
        .with_context(|| format!("no active certificate {which}"))
}

/// "in 9 days" / "expired" for a flagged certificate.
fn expiry_note(cert: &Cert) -> String {
    let Some(not_after) = cert.not_after else { return String::new() };
    let days = (not_after - time::OffsetDateTime::now_utc()).whole_days();
    if days < 0 { "WARN: expired".to_owned() } else { format!("WARN: expires in {days} day(s)") }
}

pub async fn run(ctx: &Ctx, command: CertsCommand) -> anyhow::Result<()> {
    let client = &ctx.client;
    let changed = match command {
        CertsCommand::Add { name, cert, key, chain, group, hook, target } => {
            let req = UploadCert {
                name,
                cert_pem: read(&cert)?,
                key_pem: read(&key)?,
                chain_pem: read_opt(chain.as_deref())?,
                target: target.target()?,
                group,
                hook,
            };
            client.upload_cert(&req).await.map_err(api_error)?
        }
        CertsCommand::Replace { cert_name, cert, key, chain } => {
            let found = find(ctx, &cert_name).await?;
            let req =
                ReplaceCert { cert_pem: read(&cert)?, key_pem: read(&key)?, chain_pem: read_opt(chain.as_deref())? };
            client.replace_cert(found.id, &req).await.map_err(api_error)?
        }
        CertsCommand::Issue { name, dns_names, ip_addresses, days, group, hook, target } => {
            let req =
                IssueCert { name, dns_names, ip_addresses, validity_days: days, target: target.target()?, group, hook };
            client.issue_cert(&req).await.map_err(api_error)?
        }
        CertsCommand::Revoke { cert_name } => {
            let found = find(ctx, &cert_name).await?;
            client.revoke_cert(found.id).await.map_err(api_error)?
        }
        CertsCommand::List => {
            let certs = client.list_certs().await.map_err(api_error)?;
            if ctx.output == Output::Json {
                return print_json(&certs);
            }
            let mut t = table(&["ID", "NAME", "SOURCE", "SERIAL", "NOT AFTER", "VERSION", "TARGET", "STATE"]);
            for c in &certs {
                let state = if c.revoked_at.is_some() {
                    "revoked".to_owned()
                } else if c.expiring {
                    expiry_note(c)
                } else {
                    "ok".to_owned()
                };
                t.add_row([
                    c.id.to_string(),
                    c.name.clone(),
                    c.source.as_str().to_owned(),
                    c.serial.clone().unwrap_or_else(|| "(per agent)".into()),
                    fmt_time(c.not_after),
                    c.version.to_string(),
                    fmt_target(&c.target),
                    state,
                ]);
            }
            print_table(&t);
            let expiring = certs.iter().filter(|c| c.expiring).count();
            if expiring > 0 {
                eprintln!("warning: {expiring} certificate(s) expire soon; replace them (`tether certs replace`)");
            }
            return Ok(());
        }
        CertsCommand::Status { cert_name } => {
            let found = find(ctx, &cert_name).await?;
            let s = client.cert_status(found.id).await.map_err(api_error)?;
            if ctx.output == Output::Json {
                return print_json(&s);
            }
            print_fleet_status(&found.name, &s);
            return Ok(());
        }
        CertsCommand::Ca(command) => return run_ca(ctx, command).await,
    };
    if ctx.output == Output::Json {
        return print_json(&changed);
    }
    let c = &changed.cert;
    let what = match (c.revoked_at.is_some(), c.source) {
        (true, _) => "revoked",
        (false, CertSource::Uploaded) => "installs",
        (false, CertSource::Issued) => "gets one from the CA for",
    };
    let serial = c.serial.as_deref().map(|s| format!(", serial {s}")).unwrap_or_default();
    println!(
        "Certificate {} (id {}, version {}{serial}): {} agent(s) told; each {what} it",
        c.name, c.id, c.version, changed.agents_told
    );
    Ok(())
}

async fn run_ca(ctx: &Ctx, command: CaCommand) -> anyhow::Result<()> {
    let client = &ctx.client;
    let ca = match command {
        CaCommand::List => {
            let cas = client.list_cas().await.map_err(api_error)?;
            if ctx.output == Output::Json {
                return print_json(&cas);
            }
            let mut t = table(&["ID", "ACTIVE", "NOT AFTER", "CREATED"]);
            for ca in &cas {
                t.add_row([
                    ca.id.to_string(),
                    if ca.active { "yes" } else { "trusted" }.to_owned(),
                    fmt_time(Some(ca.not_after)),
                    fmt_time(Some(ca.created_at)),
                ]);
            }
            print_table(&t);
            return Ok(());
        }
        CaCommand::Rotate => client.rotate_ca().await.map_err(api_error)?,
        CaCommand::Import { cert, key } => {
            client.import_ca(&ImportCa { cert_pem: read(&cert)?, key_pem: read(&key)? }).await.map_err(api_error)?
        }
        CaCommand::Retire => {
            let out = client.retire_cas().await.map_err(api_error)?;
            if ctx.output == Output::Json {
                return print_json(&out);
            }
            let n = out["retired"].as_u64().unwrap_or(0);
            if n == 0 {
                bail!("no CA to retire: only the active one is trusted");
            }
            println!("Retired {n} CA(s); agents fetch certificates and trust bundles without them");
            return Ok(());
        }
    };
    if ctx.output == Output::Json {
        return print_json(&ca);
    }
    println!(
        "CA {} signs from now on; agents renew from it and trust the previous CA until `tether certs ca retire`",
        ca.id
    );
    Ok(())
}
