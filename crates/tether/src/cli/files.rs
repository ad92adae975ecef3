//! `tether files push|list|status|unassign`: managed files (protocol.md §7).

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Subcommand;
use tether_proto::files::{AssignFile, FileAssignment, FleetStatus};

use super::{Ctx, Output, TargetArgs, api_error, fields_table, fmt_target, fmt_time, print_json, print_table, table};
use crate::cli::terminal_safe;

#[derive(Debug, Subcommand)]
pub enum FilesCommand {
    /// Upload a file and assign it to agents at a path.
    ///
    /// Pushing the same --path to the same target again replaces the content
    /// (the assignment's version goes up).
    Push {
        /// The local file to push
        file: PathBuf,
        /// Where agents put it (absolute; within the agent's allowed_dirs)
        #[arg(long, value_name = "PATH")]
        path: String,
        /// Permission bits, in octal
        #[arg(long, default_value = "0644", value_parser = parse_mode)]
        mode: u32,
        /// Owner of the file on the agent (the agent must be allowed to chown)
        #[arg(long, value_name = "USER")]
        owner: Option<String>,
        #[arg(long, value_name = "GROUP")]
        group: Option<String>,
        /// An action of the agent's agent.toml to run after the file changed
        #[arg(long, value_name = "ACTION")]
        hook: Option<String>,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// The active assignments.
    List,
    /// Of the agents an assignment targets: who has it, who is behind, who failed and why.
    Status {
        /// Assignment id or path
        assignment: String,
    },
    /// End an assignment: its agents remove the file they placed.
    Unassign {
        /// Assignment id or path
        assignment: String,
    },
}

/// Octal permission bits: `0644`, `644` or `0o644`.
fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    let mode = u32::from_str_radix(digits, 8).map_err(|_| format!("{s:?} is not an octal mode such as 0644"))?;
    if mode > 0o777 {
        return Err(format!("{s:?}: only permission bits (at most 0777)"));
    }
    Ok(mode)
}

pub async fn run(ctx: &Ctx, command: FilesCommand) -> anyhow::Result<()> {
    let client = &ctx.client;
    match command {
        FilesCommand::Push { file, path, mode, owner, group, hook, target } => {
            let target = target.target()?;
            let local = tokio::fs::File::open(&file).await.with_context(|| format!("opening {}", file.display()))?;
            let size = local.metadata().await.with_context(|| format!("reading {}", file.display()))?.len();
            if ctx.output == Output::Table {
                eprintln!("Uploading {} ({size} bytes)…", file.display());
            }
            let blob = client.upload_file(local, size).await.map_err(api_error)?;
            let req = AssignFile { sha256: blob.sha256, path, mode, owner, group, hook, target };
            let assigned = client.assign_file(&req).await.map_err(api_error)?;
            if ctx.output == Output::Json {
                return print_json(&assigned);
            }
            let a = &assigned.assignment;
            println!(
                "Assigned {} (id {}, version {}, sha256 {}) to {} agent(s)",
                a.path,
                a.id,
                a.version,
                &a.sha256[..12],
                assigned.agents_told
            );
            Ok(())
        }
        FilesCommand::List => {
            let list = client.list_file_assignments().await.map_err(api_error)?;
            if ctx.output == Output::Json {
                return print_json(&list);
            }
            let mut t = table(&["ID", "PATH", "SHA256", "SIZE", "MODE", "TARGET", "VERSION", "UPDATED"]);
            for a in &list {
                t.add_row([
                    a.id.to_string(),
                    a.path.clone(),
                    a.sha256[..12].to_owned(),
                    a.size.to_string(),
                    format!("{:04o}", a.mode),
                    fmt_target(&a.target),
                    a.version.to_string(),
                    fmt_time(Some(a.updated_at)),
                ]);
            }
            print_table(&t);
            Ok(())
        }
        FilesCommand::Status { assignment } => {
            let a = find(ctx, &assignment).await?;
            let s = client.file_status(a.id).await.map_err(api_error)?;
            if ctx.output == Output::Json {
                return print_json(&s);
            }
            print_fleet_status(&a.path, &s);
            Ok(())
        }
        FilesCommand::Unassign { assignment } => {
            let a = find(ctx, &assignment).await?;
            let gone = client.unassign_file(a.id).await.map_err(api_error)?;
            if ctx.output == Output::Json {
                return print_json(&gone);
            }
            println!("Unassigned {} (id {}); {} agent(s) told to remove it", a.path, a.id, gone.agents_told);
            Ok(())
        }
    }
}

/// An active assignment by id, or by path when exactly one has it.
async fn find(ctx: &Ctx, which: &str) -> anyhow::Result<FileAssignment> {
    let list = ctx.client.list_file_assignments().await.map_err(api_error)?;
    if let Ok(id) = which.parse::<i64>() {
        return list.into_iter().find(|a| a.id == id).with_context(|| format!("no active file assignment {id}"));
    }
    let mut matching: Vec<_> = list.into_iter().filter(|a| a.path == which).collect();
    match matching.len() {
        1 => Ok(matching.remove(0)),
        0 => bail!("no active file assignment has path {which}"),
        _ => {
            let ids = matching.iter().map(|a| format!("{} ({})", a.id, fmt_target(&a.target))).collect::<Vec<_>>();
            bail!("{which} is assigned to several targets; name one by id: {}", ids.join(", "))
        }
    }
}

/// The fleet view of a file or certificate: counts, errors and agents not current.
pub fn print_fleet_status(what: &str, s: &FleetStatus) {
    print_table(&fields_table(vec![
        ("item", what.to_owned()),
        ("version", s.version.to_string()),
        ("targeted agents", s.targeted.to_string()),
        ("current", s.current.to_string()),
        ("behind", s.behind.to_string()),
        ("failed", s.failed.to_string()),
    ]));
    for e in &s.errors {
        // The agent's text: never raw to a terminal.
        println!("  {} agent(s): {}", e.agents, terminal_safe(&e.error));
    }
    let lagging: Vec<_> = s.agents.iter().filter(|a| a.version != s.version || a.error.is_some()).collect();
    if !lagging.is_empty() {
        let mut t = table(&["AGENT", "VERSION", "STATE", "SERIAL", "ERROR"]);
        for a in lagging {
            t.add_row([
                a.agent_id.to_string(),
                a.version.to_string(),
                a.state.as_str().to_owned(),
                a.serial.clone().unwrap_or_else(|| "-".into()),
                a.error.clone().unwrap_or_default(),
            ]);
        }
        print_table(&t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_octal_permission_bits() {
        assert_eq!(parse_mode("0644"), Ok(0o644));
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert_eq!(parse_mode("0o755"), Ok(0o755));
        assert!(parse_mode("0999").is_err());
        assert!(parse_mode("4755").is_err(), "no setuid");
    }
}
