//! `tether commands list|show|cancel` and `tether batches show|cancel`.

use std::io::IsTerminal;

use clap::Subcommand;
use tether_client::CommandQuery;
use tether_proto::command::{Batch, Command, CommandStatus};
use tether_proto::{AgentId, BatchId, CommandId};

use super::{
    Ctx, Output, api_error, collect_pages, fields_table, fmt_opt, fmt_time, print_json, print_table, table,
    terminal_safe, wire_name,
};

#[derive(Debug, Subcommand)]
pub enum CommandsCommand {
    /// List commands, newest first.
    List {
        /// Only commands in these states (comma-separated, e.g. failed,timed_out)
        #[arg(long, value_name = "S1,S2", value_delimiter = ',', value_parser = parse_status)]
        status: Vec<CommandStatus>,
        /// Only commands for this agent
        #[arg(long, value_name = "ID")]
        agent: Option<AgentId>,
        /// Only commands of this batch
        #[arg(long, value_name = "ID")]
        batch: Option<BatchId>,
        /// Stop after this many commands
        #[arg(long, value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
    /// Show one command with every field and its full output.
    Show {
        /// The command id
        id: CommandId,
    },
    /// Cancel a command that has not finished; a running one is killed on the agent.
    Cancel {
        /// The command id
        id: CommandId,
    },
}

#[derive(Debug, Subcommand)]
pub enum BatchesCommand {
    /// Show a batch with its command counts per state.
    Show {
        /// The batch id (printed by `tether run`)
        id: BatchId,
    },
    /// Cancel every command of a batch that has not finished.
    Cancel {
        /// The batch id
        id: BatchId,
    },
}

fn parse_status(s: &str) -> Result<CommandStatus, String> {
    s.trim().parse()
}

pub async fn run(ctx: &Ctx, command: CommandsCommand) -> anyhow::Result<()> {
    match command {
        CommandsCommand::List { status, agent, batch, limit } => {
            let status = (!status.is_empty()).then(|| status.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(","));
            let commands = collect_pages(Some(limit), |cursor, limit| {
                let query = CommandQuery {
                    status: status.clone(),
                    agent_id: agent,
                    batch_id: batch,
                    cursor,
                    limit: Some(limit),
                };
                async move { ctx.client.list_commands(&query).await }
            })
            .await
            .map_err(api_error)?;
            print_list(ctx.output, &commands)
        }
        CommandsCommand::Show { id } => {
            let command = ctx.client.get_command(id).await.map_err(api_error)?;
            print_one(ctx.output, &command)
        }
        CommandsCommand::Cancel { id } => {
            let command = ctx.client.cancel_command(id).await.map_err(api_error)?;
            match ctx.output {
                Output::Json => print_json(&command),
                Output::Table => {
                    println!("command {} is {}", command.id, command.status);
                    Ok(())
                }
            }
        }
    }
}

pub async fn run_batches(ctx: &Ctx, command: BatchesCommand) -> anyhow::Result<()> {
    let batch = match command {
        BatchesCommand::Show { id } => ctx.client.get_batch(id).await,
        BatchesCommand::Cancel { id } => ctx.client.cancel_batch(id).await,
    }
    .map_err(api_error)?;
    print_batch(ctx.output, &batch)
}

fn print_list(output: Output, commands: &[Command]) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(commands);
    }
    let mut t = table(&["ID", "AGENT", "NAME", "STATUS", "EXIT", "CREATED", "FINISHED"]);
    for c in commands {
        t.add_row([
            c.id.to_string(),
            c.agent_id.to_string(),
            c.name.clone(),
            c.status.to_string(),
            fmt_opt(c.exit_code),
            fmt_time(Some(c.created_at)),
            fmt_time(c.finished_at),
        ]);
    }
    print_table(&t);
    println!("{} command(s)", commands.len());
    Ok(())
}

fn print_one(output: Output, c: &Command) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(c);
    }
    let json = |v: &serde_json::Value| if v.is_null() { "-".to_owned() } else { v.to_string() };
    let t = fields_table(vec![
        ("id", c.id.to_string()),
        ("batch", c.batch_id.to_string()),
        ("agent", c.agent_id.to_string()),
        ("name", c.name.clone()),
        ("args", json(&c.args)),
        ("timeout", format!("{}s", c.timeout_s)),
        ("priority", c.priority.to_string()),
        ("created by", c.created_by.clone()),
        ("status", c.status.to_string()),
        ("exit code", fmt_opt(c.exit_code)),
        ("reason", fmt_opt(c.reason.as_deref())),
        ("output", json(&c.output)),
        ("truncated", c.truncated.to_string()),
        ("created", fmt_time(Some(c.created_at))),
        ("not before", fmt_time(c.not_before)),
        ("delivered", fmt_time(c.delivered_at)),
        ("started", fmt_time(c.started_at)),
        ("finished", fmt_time(c.finished_at)),
        ("expires", fmt_time(Some(c.expires_at))),
    ]);
    print_table(&t);
    // Output outside the table, so it can be copied as is; verbatim only
    // when it goes to a file or pipe, not to a terminal it could drive.
    let to_terminal = std::io::stdout().is_terminal();
    for (label, text) in [("stdout", &c.stdout), ("stderr", &c.stderr)] {
        println!("--- {label} ---");
        if !text.is_empty() {
            let text = if to_terminal { terminal_safe(text) } else { std::borrow::Cow::Borrowed(text.as_str()) };
            print!("{text}");
            if !text.ends_with('\n') {
                println!();
            }
        }
    }
    Ok(())
}

fn print_batch(output: Output, b: &Batch) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(b);
    }
    let counts =
        b.counts.iter().filter(|(_, n)| **n > 0).map(|(s, n)| format!("{s}={n}")).collect::<Vec<_>>().join(" ");
    let t = fields_table(vec![
        ("id", b.id.to_string()),
        ("name", b.name.clone()),
        ("created by", b.created_by.clone()),
        ("created", fmt_time(Some(b.created_at))),
        ("status", wire_name(&b.status)),
        ("commands", b.total.to_string()),
        ("counts", if counts.is_empty() { "-".to_owned() } else { counts }),
    ]);
    print_table(&t);
    Ok(())
}
