//! `tether up`: the quick start. A server on embedded SQLite plus one local
//! agent enrolled into it, in one process. Run again on the same data dir,
//! it reuses everything.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use tether_agent::{AgentConfig, Mode, Overrides};
use tether_server::{Server, ServerConfig};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Address for the server (env TETHER_LISTEN).
    #[arg(long, env = "TETHER_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Data dir for the server; the local agent keeps its state in <data-dir>/agent (env TETHER_DATA_DIR).
    #[arg(long, env = "TETHER_DATA_DIR", default_value = "./tether-data")]
    data_dir: PathBuf,
}

pub async fn run(args: UpArgs) -> anyhow::Result<i32> {
    let admin_password = std::env::var("TETHER_ADMIN_PASSWORD").ok().filter(|p| !p.is_empty());
    let (server, bootstrap) =
        Server::start(ServerConfig::new(args.listen, args.data_dir.clone()), admin_password).await?;
    let url = format!("http://{}", server.local_addr()?);
    let agent_dir = args.data_dir.join("agent");
    let enrolled = agent_dir.join("state/agent_id").exists();
    let enroll_token = if enrolled {
        None
    } else {
        let labels = [("tether-up".to_owned(), "local".to_owned())].into();
        let token = server.local_enroll_token(labels).await?;
        Some(token)
    };

    println!("tether is up: {url}");
    println!("  dashboard: {url}{}", tether_server::web::UI_PATH);
    crate::first_start::print_credentials(&bootstrap, "  ");
    if bootstrap.admin_token.is_none() {
        println!("  reusing {}; the admin credentials were set up at first start.", args.data_dir.display());
        println!(
            "  for a new admin password: {} server reset-admin --data-dir {}",
            crate::first_start::self_command(),
            crate::first_start::shell_quote(&args.data_dir.to_string_lossy())
        );
    }
    // A command that works as printed, whether or not `tether` is on PATH.
    let tether = crate::first_start::self_command();
    match crate::first_start::token_expr(&bootstrap, &args.data_dir) {
        Some(token) => println!("  try: TETHER_SERVER={url} TETHER_TOKEN={token} {tether} run --all -- ping"),
        None => println!("  try: {tether} login --server {url}, then {tether} run --all -- ping"),
    }
    println!("  local agent state: {}", agent_dir.display());

    let cfg = AgentConfig::resolve(
        &agent_dir,
        tether_agent::config::read_file(&agent_dir)?,
        |_| None,
        Overrides { server: Some(url), enroll_token, ..Overrides::default() },
    )?;
    let shutdown = CancellationToken::new();
    let server_task = tokio::spawn(server.run(shutdown.clone()));
    let agent_shutdown = shutdown.clone();
    let agent_task = tokio::spawn(async move {
        loop {
            match tether_agent::run(cfg.clone(), Mode::Daemon, agent_shutdown.clone()).await {
                // `agent.restart` restarts the in-process agent.
                tether_agent::Exit::Restart if !agent_shutdown.is_cancelled() => continue,
                other => return other,
            }
        }
    });
    crate::shutdown_signal().await;
    shutdown.cancel();
    let exit = agent_task.await?;
    server_task.await??;
    Ok(tether_agent::cli::exit_code(&exit))
}
