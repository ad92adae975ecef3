//! `config-worker`: serves [`config_worker::app`] and prints
//! `config-worker listening on http://ADDR` once it listens.

use std::net::SocketAddr;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "An example service configured by tether's post_url sink")]
struct Args {
    /// Address to listen on (port 0: any free port).
    #[arg(long, env = "WORKER_LISTEN", default_value = "127.0.0.1:8082")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("config-worker listening on http://{}", listener.local_addr()?);
    axum::serve(listener, config_worker::app()?)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
