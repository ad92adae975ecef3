//! `tether server`: flags and environment → [`tether_server::Server`].

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
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
    /// Directory for the embedded SQLite database and server keys.
    #[arg(long, env = "TETHER_DATA_DIR", default_value = "./tether-data")]
    pub data_dir: PathBuf,
    /// TOML file with further settings (`[limits]`, `require_signed_requests`:
    /// see docs/operations.md).
    #[arg(long, env = "TETHER_CONFIG")]
    pub config: Option<PathBuf>,
}

/// What the `--config` file may set.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    limits: tether_server::limits::LimitConfig,
    /// Lifetime of RFC 8628 device codes in seconds (default 600).
    device_code_ttl_s: Option<u64>,
    /// Refuse unsigned agent requests (SPEC §3; default false).
    #[serde(default)]
    require_signed_requests: bool,
    /// Cap on remembered request nonces (default 1,000,000).
    max_remembered_nonces: Option<usize>,
}

#[derive(Debug, clap::Subcommand)]
pub enum ServerAction {
    /// Set a new random password for the `admin` user and print it once.
    ResetAdmin {
        /// Data dir of the server (env TETHER_DATA_DIR).
        #[arg(long, env = "TETHER_DATA_DIR", default_value = "./tether-data")]
        data_dir: PathBuf,
    },
}

pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    if let Some(ServerAction::ResetAdmin { data_dir }) = args.action {
        return reset_admin(&data_dir).await;
    }
    let admin_password = std::env::var("TETHER_ADMIN_PASSWORD").ok().filter(|p| !p.is_empty());
    let mut config = ServerConfig::new(args.listen, args.data_dir);
    if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let file: FileConfig = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        config.limits = file.limits;
        if let Some(ttl) = file.device_code_ttl_s {
            config.device_code_ttl_s = ttl;
        }
        config.require_signed_requests = file.require_signed_requests;
        if let Some(cap) = file.max_remembered_nonces {
            config.max_remembered_nonces = cap;
        }
    }
    let (server, bootstrap) = Server::start(config, admin_password).await?;
    let addr = server.local_addr()?;
    // Printed, not logged: secrets never go to the log, and the operator sees them once.
    if let Some(token) = &bootstrap.admin_token {
        println!("admin API token (shown once): {token}");
    }
    if let Some(password) = &bootstrap.admin_password {
        println!("admin password for user 'admin' (shown once): {password}");
    }
    // Last, so whoever waits for this line has seen the credentials.
    println!("tether server listening on http://{addr}");
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        crate::shutdown_signal().await;
        tracing::info!("Shutting down");
        trigger.cancel();
    });
    server.run(shutdown).await
}

async fn reset_admin(data_dir: &std::path::Path) -> anyhow::Result<()> {
    use tether_store::Store;
    anyhow::ensure!(data_dir.join("tether.db").exists(), "no tether database in {}", data_dir.display());
    let store = tether_store::SqliteStore::open(data_dir).await?;
    let password = tether_server::auth::secret::new_password();
    let hash = tokio::task::spawn_blocking({
        let password = password.clone();
        move || tether_server::auth::password::hash_password(&password)
    })
    .await?;
    store.set_password("admin", &hash).await?;
    println!("new password for user 'admin' (shown once): {password}");
    Ok(())
}
