//! `tether server`: flags and environment → [`tether_server::Server`].

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use tether_server::{Server, ServerConfig};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Address to listen on.
    #[arg(long, env = "TETHER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Directory for the embedded SQLite database and server keys.
    #[arg(long, env = "TETHER_DATA_DIR", default_value = "./tether-data")]
    pub data_dir: PathBuf,
}

pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    let admin_password = std::env::var("TETHER_ADMIN_PASSWORD").ok().filter(|p| !p.is_empty());
    let config = ServerConfig::new(args.listen, args.data_dir);
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
