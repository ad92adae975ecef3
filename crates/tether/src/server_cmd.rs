//! `tether server`: flags and environment → [`tether_server::Server`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tether_server::tls::TlsFiles;
use tether_server::{Server, ServerConfig};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ServerArgs {
    #[command(subcommand)]
    pub action: Option<ServerAction>,
    /// Address to listen on.
    #[arg(long, env = "TETHER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Directory for the embedded SQLite database, server keys and initial-admin.txt.
    #[arg(long, env = "TETHER_DATA_DIR", default_value = "./tether-data")]
    pub data_dir: PathBuf,
    /// `postgres://user@host/db` to share one database among several servers
    /// (its keys live there, wrapped by TETHER_MASTER_KEY when set); default:
    /// the embedded SQLite database in --data-dir.
    #[arg(long, env = "TETHER_DATABASE_URL")]
    pub database_url: Option<String>,
    /// `nats://host:4222`: servers sharing the database wake each other's
    /// agents through NATS (without it they catch up from the database every second).
    #[arg(long, env = "TETHER_NATS_URL")]
    pub nats_url: Option<String>,
    /// Names this cluster's NATS subjects (`tether.<cluster>.…`), so several
    /// clusters can share one NATS.
    #[arg(long, env = "TETHER_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// TOML file with further settings (`[limits]`, `device_code_ttl_s`, `max_pending_device_grants`,
    /// `require_signed_requests`, `max_remembered_nonces`, `max_connections`, `database_max_connections`,
    /// `max_file_bytes`, `cert_expiry_warning_days`, `tls_cert`, `tls_key`, `[telemetry]`).
    #[arg(long, env = "TETHER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Serve HTTPS with this PEM certificate chain (needs --tls-key); plain HTTP
    /// otherwise, e.g. behind a TLS-terminating proxy.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Do not answer the routes of the seed designs (docs/compat.md): they
    /// answer 404 then. `TETHER_SEED_ROUTES=false` does the same.
    #[arg(long = "no-seed-routes", action = clap::ArgAction::SetFalse, env = "TETHER_SEED_ROUTES")]
    pub seed_routes: bool,
}

/// What the `--config` file may set.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    limits: tether_server::limits::LimitConfig,
    /// Lifetime of RFC 8628 device codes in seconds (default 600).
    device_code_ttl_s: Option<u64>,
    /// Cap on device grants waiting for approval (default 10,000).
    max_pending_device_grants: Option<u64>,
    /// Refuse unsigned agent requests (protocol.md §3; default false).
    #[serde(default)]
    require_signed_requests: bool,
    /// Cap on remembered request nonces (default 1,000,000).
    max_remembered_nonces: Option<usize>,
    /// Cap on open connections (default 90% of the open-file limit).
    max_connections: Option<usize>,
    /// Most connections to PostgreSQL per server (default 16).
    database_max_connections: Option<u32>,
    /// Largest managed file accepted (default 64 MiB).
    max_file_bytes: Option<u64>,
    /// Certificates expiring within this many days are flagged (default 14).
    cert_expiry_warning_days: Option<u32>,
    /// PEM certificate chain and key for HTTPS; the flags win over these.
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    #[serde(default)]
    telemetry: TelemetryFile,
}

/// `[telemetry]`: liveness, the presence webhook, metrics and retention
/// (protocol.md §8).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TelemetryFile {
    /// An agent not seen for this many seconds is offline (default 90).
    offline_after_s: Option<u64>,
    /// POSTed a JSON alert on every online/offline transition.
    webhook_url: Option<String>,
    /// Let `webhook_url` reach loopback, private and link-local addresses.
    #[serde(default)]
    allow_private_targets: bool,
    /// Distinct metric series one agent may create (default 1,000).
    max_series_per_agent: Option<u32>,
    #[serde(default)]
    retention_days: RetentionFile,
}

/// `[telemetry.retention_days]`, each in days.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionFile {
    raw_metrics: Option<u64>,
    hourly_rollups: Option<u64>,
    daily_rollups: Option<u64>,
    finished_commands: Option<u64>,
    audit: Option<u64>,
}

impl TelemetryFile {
    fn apply(self, config: &mut ServerConfig) -> anyhow::Result<()> {
        let t = &mut config.telemetry;
        if let Some(s) = self.offline_after_s {
            anyhow::ensure!(s >= 1, "[telemetry] offline_after_s must be at least 1");
            t.offline_after = Duration::from_secs(s);
            // Presence is checked, and last_seen written, often enough for
            // a short threshold to hold.
            t.presence_interval = (t.offline_after / 10).clamp(Duration::from_millis(200), Duration::from_secs(5));
            config.seen_flush_interval = config.seen_flush_interval.min(t.offline_after / 6);
        }
        if let Some(url) = self.webhook_url {
            let target = tether_server::alerts::WebhookTarget::parse(&url, self.allow_private_targets)
                .map_err(|e| anyhow::anyhow!("[telemetry] webhook_url: {e}"))?;
            t.webhook = Some(target);
        }
        if let Some(n) = self.max_series_per_agent {
            t.max_series_per_agent = n;
        }
        let days = |d: u64| Duration::from_secs(d * 86_400);
        let r = self.retention_days;
        for (kept, set) in [
            (&mut t.retention.raw_metrics, r.raw_metrics),
            (&mut t.retention.hourly_rollups, r.hourly_rollups),
            (&mut t.retention.daily_rollups, r.daily_rollups),
            (&mut t.retention.finished_commands, r.finished_commands),
            (&mut t.retention.audit, r.audit),
        ] {
            if let Some(d) = set {
                anyhow::ensure!(d >= 1, "[telemetry.retention_days] values must be at least 1 day");
                *kept = days(d);
            }
        }
        Ok(())
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum ServerAction {
    /// Set a new random password for the `admin` user and print it once.
    ResetAdmin {
        /// Data dir of the server (env TETHER_DATA_DIR).
        #[arg(long, env = "TETHER_DATA_DIR", default_value = "./tether-data")]
        data_dir: PathBuf,
        /// The server's PostgreSQL database, if it uses one (env TETHER_DATABASE_URL).
        #[arg(long, env = "TETHER_DATABASE_URL")]
        database_url: Option<String>,
    },
}

pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    if let Some(ServerAction::ResetAdmin { data_dir, database_url }) = args.action {
        let mut config = ServerConfig::new(args.listen, data_dir);
        config.database_url = database_url;
        let password = tether_server::reset_admin(&config).await?;
        println!("new password for user 'admin' (shown once): {password}");
        return Ok(());
    }
    let admin_password = std::env::var("TETHER_ADMIN_PASSWORD").ok().filter(|p| !p.is_empty());
    let mut config = ServerConfig::new(args.listen, args.data_dir);
    config.database_url = args.database_url;
    config.nats_url = args.nats_url;
    config.cluster = args.cluster;
    config.seed_routes = args.seed_routes;
    // A secret: taken from the environment only, never from a flag (flags show in `ps`).
    config.master_key = std::env::var("TETHER_MASTER_KEY")
        .ok()
        .filter(|k| !k.is_empty())
        .map(|k| tether_server::keys::MasterKey::parse(&k))
        .transpose()?;
    let file = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => FileConfig::default(),
    };
    config.limits = file.limits;
    if let Some(ttl) = file.device_code_ttl_s {
        config.device_code_ttl_s = ttl;
    }
    if let Some(cap) = file.max_pending_device_grants {
        config.max_pending_device_grants = cap;
    }
    config.require_signed_requests = file.require_signed_requests;
    if let Some(cap) = file.max_remembered_nonces {
        config.max_remembered_nonces = cap;
    }
    config.max_connections = file.max_connections.or(config.max_connections);
    if let Some(n) = file.database_max_connections {
        config.database_max_connections = n;
    }
    if let Some(n) = file.max_file_bytes {
        config.max_file_bytes = n;
    }
    if let Some(days) = file.cert_expiry_warning_days {
        config.cert_expiry_warning_days = days;
    }
    file.telemetry.apply(&mut config)?;
    config.tls = tls_files(args.tls_cert, args.tls_key, file.tls_cert, file.tls_key)?;
    let (server, bootstrap) = Server::start(config, admin_password).await?;
    let url = server.url()?;
    // Printed (to a terminal only), never logged: secrets never go to the log.
    crate::first_start::print_credentials(&bootstrap, "");
    // Last, so whoever waits for this line has seen the credentials.
    println!("tether server listening on {url}");
    println!("dashboard: {url}{}", tether_server::web::UI_PATH);
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        crate::shutdown_signal().await;
        tracing::info!("Shutting down");
        trigger.cancel();
    });
    server.run(shutdown).await
}

/// The certificate and key to serve HTTPS with: the flags as a pair win over
/// the config file's pair, so a flag never combines with the other file half.
fn tls_files(
    flag_cert: Option<PathBuf>,
    flag_key: Option<PathBuf>,
    file_cert: Option<PathBuf>,
    file_key: Option<PathBuf>,
) -> anyhow::Result<Option<TlsFiles>> {
    let (cert, key) =
        if flag_cert.is_some() || flag_key.is_some() { (flag_cert, flag_key) } else { (file_cert, file_key) };
    Ok(TlsFiles::from_pair(cert, key)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Option<PathBuf> {
        Some(PathBuf::from(s))
    }

    #[test]
    fn tls_flags_win_as_a_pair_over_the_config_file() {
        let files = |cert: &str, key: &str| Some(TlsFiles { cert: cert.into(), key: key.into() });
        assert_eq!(tls_files(None, None, None, None).expect("plain"), None);
        assert_eq!(tls_files(None, None, p("f.crt"), p("f.key")).expect("file"), files("f.crt", "f.key"));
        assert_eq!(tls_files(p("c.crt"), p("c.key"), p("f.crt"), p("f.key")).expect("flags"), files("c.crt", "c.key"));
        let err = tls_files(p("c.crt"), None, p("f.crt"), p("f.key")).expect_err("half a flag pair");
        assert!(err.to_string().contains("--tls-key"), "{err}");
        let err = tls_files(None, None, None, p("f.key")).expect_err("half a file pair");
        assert!(err.to_string().contains("--tls-cert"), "{err}");
    }

    #[test]
    fn config_file_accepts_tls_paths() {
        let file: FileConfig =
            toml::from_str("tls_cert = \"/etc/tether/cert.pem\"\ntls_key = \"/etc/tether/key.pem\"").expect("toml");
        assert_eq!((file.tls_cert, file.tls_key), (p("/etc/tether/cert.pem"), p("/etc/tether/key.pem")));
    }

    #[test]
    fn seed_routes_are_on_unless_the_flag_or_the_environment_turns_them_off() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            server: ServerArgs,
        }
        // Other tests in this process do not set it; clap reads it at parse time.
        let parse = |args: &[&str]| Cli::try_parse_from(args).expect("parse").server.seed_routes;
        assert!(parse(&["tether"]));
        assert!(!parse(&["tether", "--no-seed-routes"]));
    }
}
