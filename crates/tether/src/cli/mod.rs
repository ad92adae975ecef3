//! The operator CLI (SPEC §1): subcommands that talk to the HTTP API
//! through `tether-client`.

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum OperatorCommand {}

pub async fn run(command: OperatorCommand) -> anyhow::Result<()> {
    match command {}
}
