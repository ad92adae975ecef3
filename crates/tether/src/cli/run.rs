//! `tether run`: create a batch of commands, follow it with a progress bar
//! and print one result row per agent. Exits non-zero unless every command
//! succeeded.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Map, Value};
use tether_client::{Client, ClientError, CommandQuery};
use tether_proto::BatchId;
use tether_proto::command::{
    BatchStatus, Command, CommandStatus, CreateCommand, DEFAULT_PRIORITY, DEFAULT_TIMEOUT_S, MAX_PRIORITY,
    MAX_TIMEOUT_S,
};
use tokio::time::Instant;

use super::{GlobalOpts, Output, TargetArgs, api_error, collect_pages, print_json, print_table, table};

const POLL_EVERY: Duration = Duration::from_millis(500);
/// Width of the stdout/stderr excerpts in the results table.
const EXCERPT_CHARS: usize = 80;

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    global: GlobalOpts,
    #[command(flatten)]
    target: TargetArgs,
    /// Seconds the command may run on the agent before it is killed
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_TIMEOUT_S,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_TIMEOUT_S)))]
    timeout: u32,
    /// Priority 0-9; higher runs first
    #[arg(long, default_value_t = DEFAULT_PRIORITY,
          value_parser = clap::value_parser!(u8).range(0..=i64::from(MAX_PRIORITY)))]
    priority: u8,
    /// Sending the same key and body again returns the same batch instead of a new one
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    /// Print the batch id and return without waiting for results
    #[arg(long)]
    no_wait: bool,
    /// Seconds to wait for every result before giving up (the commands keep running)
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    wait_timeout: u64,
    /// The command: ping, sysinfo, config.reload, agent.restart or an action the agents define
    #[arg(value_name = "NAME")]
    name: String,
    /// Arguments as key=value; a value that parses as JSON is sent as JSON, otherwise as a string
    #[arg(value_name = "KEY=VALUE", value_parser = parse_arg)]
    args: Vec<(String, Value)>,
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let ctx = args.global.connect()?;
    let mut req = CreateCommand::new(args.target.target()?, args.name.clone());
    req.args = Value::Object(args_object(args.args)?);
    req.timeout_s = args.timeout;
    req.priority = args.priority;
    req.idempotency_key = args.idempotency_key.clone();

    let created = ctx.client.create_command(&req).await.map_err(api_error)?;
    let batch_id = created.batch_id;
    let total = created.command_ids.len();
    if total == 0 {
        bail!("the target matched no agents; nothing to run");
    }
    if args.no_wait {
        return match ctx.output {
            Output::Json => print_json(&created),
            Output::Table => {
                println!("batch {batch_id}: {total} command(s) queued");
                println!("follow it with: tether batches show {batch_id}");
                Ok(())
            }
        };
    }
    // Keep stdout pure JSON with -o json.
    let intro = format!("batch {batch_id}: {total} command(s) queued");
    match ctx.output {
        Output::Json => eprintln!("{intro}"),
        Output::Table => println!("{intro}"),
    }

    let limit = Duration::from_secs(args.wait_timeout);
    let done = tokio::select! {
        done = wait_for_batch(&ctx.client, batch_id, total as u64, limit) => done?,
        Ok(()) = tokio::signal::ctrl_c() => bail!(
            "interrupted; batch {batch_id} keeps running: follow it with `tether batches show {batch_id}`"
        ),
    };

    let mut commands = collect_pages(None, |cursor, limit| {
        let query = CommandQuery { batch_id: Some(batch_id), cursor, limit: Some(limit), ..CommandQuery::default() };
        let client = &ctx.client;
        async move { client.list_commands(&query).await }
    })
    .await
    .map_err(api_error)?;
    commands.sort_by_key(|c| c.agent_id);
    match ctx.output {
        Output::Json => print_json(&commands)?,
        Output::Table => print_table(&results_table(&commands)),
    }

    let finished = commands.iter().filter(|c| c.status.is_terminal()).count();
    let succeeded = commands.iter().filter(|c| c.status == CommandStatus::Succeeded).count();
    if !done {
        bail!(
            "gave up waiting after {}s with {finished} of {total} command(s) finished; they keep running: \
             follow them with `tether batches show {batch_id}`",
            args.wait_timeout
        );
    }
    if succeeded < commands.len() {
        bail!("{} of {} command(s) did not succeed", commands.len() - succeeded, commands.len());
    }
    Ok(())
}

/// Polls the batch until it is `done` (true) or `limit` passes (false).
/// Transient failures (network, 5xx) are retried until the deadline.
async fn wait_for_batch(client: &Client, id: BatchId, total: u64, limit: Duration) -> anyhow::Result<bool> {
    let target =
        if std::io::stderr().is_terminal() { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
    let bar = ProgressBar::with_draw_target(Some(total), target);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} [{bar:40}] {pos}/{len} finished {msg}")
            .context("progress bar template")?
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    let deadline = Instant::now() + limit;
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match client.get_batch(id).await {
            Ok(batch) => {
                let finished: u64 = batch.counts.iter().filter(|(s, _)| s.is_terminal()).map(|(_, n)| n).sum();
                bar.set_length(batch.total);
                bar.set_position(finished);
                let pending: Vec<String> = batch
                    .counts
                    .iter()
                    .filter(|(s, n)| !s.is_terminal() && **n > 0)
                    .map(|(s, n)| format!("{n} {s}"))
                    .collect();
                bar.set_message(pending.join(", "));
                if batch.status == BatchStatus::Done {
                    bar.finish_and_clear();
                    return Ok(true);
                }
            }
            Err(e) if is_transient(&e) => bar.set_message(format!("retrying: {e}")),
            Err(e) => {
                bar.abandon();
                return Err(api_error(e));
            }
        }
        if Instant::now() >= deadline {
            bar.abandon();
            return Ok(false);
        }
    }
}

fn is_transient(e: &ClientError) -> bool {
    match e {
        ClientError::Http(_) => true,
        other => other.status().is_some_and(|s| s == 429 || s >= 500),
    }
}

fn results_table(commands: &[Command]) -> comfy_table::Table {
    let mut t = table(&["AGENT", "STATUS", "EXIT", "OUTPUT", "STDERR / REASON"]);
    for c in commands {
        // Built-ins like sysinfo answer with structured output and no stdout.
        let output = if c.stdout.trim().is_empty() && !c.output.is_null() {
            excerpt(&c.output.to_string())
        } else {
            excerpt(&c.stdout)
        };
        let problem = match &c.reason {
            Some(reason) if !reason.is_empty() => excerpt(reason),
            _ => excerpt(&c.stderr),
        };
        t.add_row([
            c.agent_id.to_string(),
            c.status.to_string(),
            c.exit_code.map_or_else(|| "-".to_owned(), |code| code.to_string()),
            output,
            problem,
        ]);
    }
    t
}

/// The first non-empty line, cut to [`EXCERPT_CHARS`]; `…` marks anything left out.
fn excerpt(text: &str) -> String {
    let text = text.trim();
    let line = text.lines().next().unwrap_or_default().trim_end();
    let mut out: String = line.chars().take(EXCERPT_CHARS).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out
}

/// Parses one `key=value` command argument: the value is JSON when it parses
/// as JSON (`n=3`, `force=true`, `tags=["a"]`), otherwise a plain string.
fn parse_arg(s: &str) -> Result<(String, Value), String> {
    let (key, raw) = s.split_once('=').ok_or_else(|| format!("expected key=value, got {s:?}"))?;
    if key.is_empty() {
        return Err(format!("argument {s:?} has an empty key"));
    }
    let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()));
    Ok((key.to_owned(), value))
}

fn args_object(pairs: Vec<(String, Value)>) -> anyhow::Result<Map<String, Value>> {
    let mut map = Map::new();
    for (key, value) in pairs {
        if map.contains_key(&key) {
            bail!("argument {key:?} given twice");
        }
        map.insert(key, value);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use serde_json::json;
    use tether_proto::AgentId;

    use super::*;

    #[test]
    fn arg_values_are_json_when_they_parse_and_strings_otherwise() {
        let cases = [
            ("n=3", json!(3)),
            ("force=true", json!(true)),
            ("ratio=0.5", json!(0.5)),
            ("nothing=null", json!(null)),
            ("tags=[\"a\",\"b\"]", json!(["a", "b"])),
            ("obj={\"k\":1}", json!({"k": 1})),
            ("quoted=\"42\"", json!("42")),
            ("name=web-1", json!("web-1")),
            ("path=/etc/hosts", json!("/etc/hosts")),
            ("empty=", json!("")),
            ("eq=a=b", json!("a=b")),
            ("spaced=hello world", json!("hello world")),
        ];
        for (input, expected) in cases {
            let (key, value) = parse_arg(input).expect(input);
            assert_eq!(value, expected, "{input}");
            assert_eq!(key, input.split('=').next().expect("key"));
        }
    }

    #[test]
    fn arg_without_key_or_equals_is_rejected() {
        assert!(parse_arg("novalue").is_err());
        assert!(parse_arg("=3").is_err());
        let dup = vec![("a".to_owned(), json!(1)), ("a".to_owned(), json!(2))];
        assert!(args_object(dup).is_err());
    }

    #[test]
    fn excerpt_keeps_the_first_line_and_marks_the_rest() {
        assert_eq!(excerpt("pong\n"), "pong");
        assert_eq!(excerpt("\n  first\nsecond"), "first…");
        assert_eq!(excerpt(""), "");
        assert_eq!(excerpt(&"x".repeat(100)).chars().count(), EXCERPT_CHARS + 1);
    }

    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(flatten)]
        run: RunArgs,
    }

    #[test]
    fn exactly_one_kind_of_target_is_required() {
        let parse = |argv: &[&str]| Wrapper::try_parse_from(std::iter::once("run").chain(argv.iter().copied()));
        assert!(parse(&["--", "ping"]).is_err(), "no target");
        assert!(parse(&["--all", "--label", "a=b", "--", "ping"]).is_err(), "two kinds");
        let id = AgentId::new().to_string();
        let two = parse(&["--agent", &id, "--agent", &id, "--", "ping", "n=1"]).expect("repeated --agent");
        assert_eq!(two.run.target.agents.len(), 2);
        assert_eq!(two.run.args, vec![("n".to_owned(), json!(1))]);
        let labels = parse(&["--label", "a=b", "--label", "c=d", "ping"]).expect("labels, no --");
        assert_eq!(labels.run.target.labels.len(), 2);
        assert!(parse(&["--all", "--priority", "10", "--", "ping"]).is_err(), "priority range");
    }
}
