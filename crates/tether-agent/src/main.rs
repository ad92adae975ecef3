//! `tether-agent`: the agent daemon alone, a slim binary for managed
//! machines. Same flags and subcommands as `tether agent`; it leaves out the
//! server, the store and the operator CLI so its resident memory stays small.

use clap::Parser;
use tether_agent::cli::{AgentArgs, init_tracing};

#[derive(Debug, Parser)]
#[command(name = "tether-agent", version, about = "The tether agent daemon")]
struct Cli {
    #[command(flatten)]
    agent: AgentArgs,
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    // Each command runs under this binary started as its exec shim.
    tether_agent::shim::run_if_requested();
    let cli = Cli::parse();
    init_tracing();
    let code = tether_agent::cli::main(cli.agent)?;
    Ok(std::process::ExitCode::from(u8::try_from(code).unwrap_or(1)))
}
