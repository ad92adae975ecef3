//! `tether`: one binary for the server, the agent and the operator CLI.

mod cli;
mod first_start;
mod server_cmd;
mod up_cmd;

use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(name = "tether", version, about = "Fleet control plane: server, agent and operator CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the tether server (HTTP API, agent stream, background jobs).
    Server(server_cmd::ServerArgs),
    /// Run the agent daemon, or talk to the one running on this machine.
    Agent(Box<tether_agent::cli::AgentArgs>),
    /// Quick start: a server on embedded SQLite plus one local agent enrolled into it.
    Up(up_cmd::UpArgs),
    #[command(flatten)]
    Operator(cli::OperatorCommand),
}

fn main() -> std::process::ExitCode {
    // Each agent command runs under this binary started as its exec shim.
    tether_agent::shim::run_if_requested();
    let cli = Cli::parse();
    tether_agent::cli::init_tracing();
    match run(cli.command) {
        Ok(code) => std::process::ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            // The message and its causes on one line (`{:#}`), never the
            // `Debug` form: that adds a stack backtrace whenever
            // RUST_BACKTRACE is set, which is noise to an operator.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<i32> {
    Ok(match command {
        // The agent runs on machines we do not own: keep it on one thread.
        Command::Agent(args) => tether_agent::cli::main(*args)?,
        Command::Server(args) => multi_thread()?.block_on(server_cmd::run(args)).map(|()| 0)?,
        Command::Up(args) => multi_thread()?.block_on(up_cmd::run(args))?,
        Command::Operator(command) => multi_thread()?.block_on(cli::run(command))?,
    })
}

fn multi_thread() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()
}

pub use tether_agent::cli::shutdown_signal;
