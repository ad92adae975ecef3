//! `tether agents list|show|label|rename|revoke|delete|metrics`.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{Context, bail};
use clap::{Subcommand, ValueEnum};
use serde::Serialize;
use serde_json::Value;
use tether_client::{AgentQuery, InventoryQuery, MetricQuery};
use tether_proto::agent::{Agent, AgentStatus, UpdateAgent};
use tether_proto::telemetry::{InventoryEntry, MetricQueryResult};
use tether_proto::{AgentId, Page};

use super::audit::parse_when;
use super::{
    Ctx, Output, api_error, collect_pages, fields_table, fmt_labels, fmt_opt, fmt_time, labels_from, parse_label,
    print_json, print_table, table, terminal_safe, wire_name,
};

/// Inventory entries `agents show` prints.
const SHOWN_INVENTORY: u32 = 20;

#[derive(Debug, Subcommand)]
pub enum AgentsCommand {
    /// List agents, optionally filtered by status, labels or a search term.
    List {
        /// Only agents in this state
        #[arg(long, value_enum)]
        status: Option<StatusFilter>,
        /// Only agents with this label (repeatable; all must match)
        #[arg(long = "label", value_name = "K=V", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Only agents whose name or hostname contains this
        #[arg(long, value_name = "Q")]
        search: Option<String>,
        /// Stop after this many agents [default: all]
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        limit: Option<u32>,
    },
    /// Show one agent in detail, with the first entries of its inventory.
    Show {
        /// The agent id
        id: AgentId,
    },
    /// Set or remove an agent's labels (its configuration follows them).
    Label {
        /// The agent id
        id: AgentId,
        /// Labels to set (repeatable)
        #[arg(value_name = "K=V", value_parser = parse_label)]
        set: Vec<(String, String)>,
        /// Label keys to remove (repeatable)
        #[arg(long = "remove", value_name = "KEY")]
        remove: Vec<String>,
    },
    /// Change the name an agent is listed under.
    Rename {
        /// The agent id
        id: AgentId,
        /// The new name
        name: String,
    },
    /// Revoke an agent: its tokens stop working at once and its open poll ends.
    Revoke {
        /// The agent id
        id: AgentId,
        /// Why, for the audit log [default: "revoked by <you>"]
        #[arg(long, value_name = "R")]
        reason: Option<String>,
    },
    /// Delete an agent and what the server keeps for it; this cannot be undone.
    ///
    /// Asks first on a terminal; elsewhere --yes is required.
    Delete {
        /// The agent id
        id: AgentId,
        /// Do not ask
        #[arg(long)]
        yes: bool,
    },
    /// One metric of an agent over time: count, min, average and max per point or bucket.
    ///
    /// Example: tether agents metrics ID host.cpu_pct --since 6h
    Metrics {
        /// The agent id
        id: AgentId,
        /// The metric, e.g. host.cpu_pct, host.mem_used_bytes, host.load1
        name: String,
        /// From this time: RFC 3339, or an age like 30m, 2h, 7d [default: the server's]
        #[arg(long, visible_alias = "from", value_name = "TIME", value_parser = parse_when)]
        since: Option<String>,
        /// Until this time: RFC 3339, or an age like 30m, 2h, 7d [default: now]
        #[arg(long, visible_alias = "to", value_name = "TIME", value_parser = parse_when)]
        until: Option<String>,
    },
}

/// `--status`: an agent's state as the server reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusFilter {
    Online,
    Offline,
    Revoked,
}

impl From<StatusFilter> for AgentStatus {
    fn from(s: StatusFilter) -> Self {
        match s {
            StatusFilter::Online => Self::Online,
            StatusFilter::Offline => Self::Offline,
            StatusFilter::Revoked => Self::Revoked,
        }
    }
}

pub async fn run(ctx: &Ctx, command: AgentsCommand) -> anyhow::Result<()> {
    match command {
        AgentsCommand::List { status, labels, search, limit } => {
            let labels = labels_from(&labels)?;
            // The server takes the filter as one comma-separated `label` value.
            if labels.values().any(|v| v.contains(',')) {
                bail!("label filter values cannot contain ','");
            }
            let label = (!labels.is_empty()).then(|| fmt_labels(&labels));
            let q = search.filter(|s| !s.is_empty());
            let agents = collect_pages(limit, |cursor, limit| {
                let query = AgentQuery {
                    status: status.map(AgentStatus::from),
                    label: label.clone(),
                    q: q.clone(),
                    cursor,
                    limit: Some(limit),
                };
                async move { ctx.client.list_agents(&query).await }
            })
            .await
            .map_err(api_error)?;
            print_list(ctx.output, &agents)
        }
        AgentsCommand::Show { id } => {
            let agent = ctx.client.get_agent(id).await.map_err(api_error)?;
            let query = InventoryQuery { limit: Some(SHOWN_INVENTORY), ..Default::default() };
            let inventory = ctx.client.agent_inventory(id, &query).await.map_err(api_error)?;
            print_detail(ctx.output, &agent, &inventory)
        }
        AgentsCommand::Label { id, set, remove } => {
            if set.is_empty() && remove.is_empty() {
                bail!("name labels to set (K=V) or to --remove");
            }
            let mut labels = ctx.client.get_agent(id).await.map_err(api_error)?.labels;
            for key in &remove {
                labels.remove(key);
            }
            labels.extend(labels_from(&set)?);
            // The whole set: PATCH replaces the agent's labels.
            let update = UpdateAgent { labels: Some(labels), name: None };
            let agent = ctx.client.update_agent(id, &update).await.map_err(api_error)?;
            match ctx.output {
                Output::Json => print_json(&agent),
                Output::Table => {
                    let labels = if agent.labels.is_empty() { "(none)".to_owned() } else { fmt_labels(&agent.labels) };
                    println!("labels of {}: {labels}", agent.id);
                    Ok(())
                }
            }
        }
        AgentsCommand::Rename { id, name } => {
            let update = UpdateAgent { labels: None, name: Some(name) };
            let agent = ctx.client.update_agent(id, &update).await.map_err(api_error)?;
            match ctx.output {
                Output::Json => print_json(&agent),
                Output::Table => {
                    println!("agent {} is now named {}", agent.id, terminal_safe(&agent.name));
                    Ok(())
                }
            }
        }
        AgentsCommand::Revoke { id, reason } => {
            let agent = ctx.client.revoke_agent(id, reason.as_deref().unwrap_or_default()).await.map_err(api_error)?;
            match ctx.output {
                Output::Json => print_json(&agent),
                Output::Table => {
                    println!("revoked agent {} ({})", agent.id, terminal_safe(&agent.name));
                    Ok(())
                }
            }
        }
        AgentsCommand::Delete { id, yes } => {
            if !yes {
                // A script must say --yes: refused before anything reaches the server.
                if !std::io::stdin().is_terminal() {
                    bail!("standard input is not a terminal: pass --yes to delete without being asked");
                }
                let agent = ctx.client.get_agent(id).await.map_err(api_error)?;
                if !confirm(&format!(
                    "Delete agent {} ({id}) and everything the server keeps for it? This cannot be undone.",
                    terminal_safe(&agent.name)
                ))? {
                    bail!("not deleted");
                }
            }
            ctx.client.delete_agent(id).await.map_err(api_error)?;
            match ctx.output {
                Output::Json => print_json(&serde_json::json!({ "id": id, "deleted": true })),
                Output::Table => {
                    println!("deleted agent {id}");
                    Ok(())
                }
            }
        }
        AgentsCommand::Metrics { id, name, since, until } => {
            let query = MetricQuery { name, from: since, to: until };
            let result = ctx.client.agent_metrics(id, &query).await.map_err(api_error)?;
            print_metrics(ctx.output, &result)
        }
    }
}

/// Asks `question` on the terminal: only "y" or "yes" is a yes.
fn confirm(question: &str) -> anyhow::Result<bool> {
    eprint!("{question} [y/N] ");
    std::io::stderr().flush().context("cannot write the question")?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer).context("cannot read the answer")?;
    Ok(matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes"))
}

fn print_list(output: Output, agents: &[Agent]) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(agents);
    }
    let mut t =
        table(&["ID", "NAME", "HOSTNAME", "STATUS", "LABELS", "VERSION", "LAST SEEN", "CONFIG APPLIED → DESIRED"]);
    for a in agents {
        t.add_row([
            a.id.to_string(),
            a.name.clone(),
            a.hostname.clone(),
            wire_name(&a.status),
            fmt_labels(&a.labels),
            fmt_opt(a.version.as_deref()),
            fmt_time(a.last_seen),
            config_state(a),
        ]);
    }
    print_table(&t);
    println!("{} agent(s)", agents.len());
    Ok(())
}

/// `agents show -o json`: the agent's fields and the first inventory page.
#[derive(Serialize)]
struct Detail<'a> {
    #[serde(flatten)]
    agent: &'a Agent,
    inventory: &'a Page<InventoryEntry>,
}

fn print_detail(output: Output, a: &Agent, inventory: &Page<InventoryEntry>) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(&Detail { agent: a, inventory });
    }
    let t = fields_table(vec![
        ("id", a.id.to_string()),
        ("name", a.name.clone()),
        ("hostname", a.hostname.clone()),
        ("status", wire_name(&a.status)),
        ("labels", fmt_labels(&a.labels)),
        ("version", fmt_opt(a.version.as_deref())),
        ("last seen", fmt_time(a.last_seen)),
        ("config applied", fmt_opt(a.applied_config_hash.as_deref())),
        ("config desired", fmt_opt(a.desired_config_hash.as_deref())),
        ("config error", fmt_opt(a.config_error.as_deref())),
        ("created", fmt_time(Some(a.created_at))),
        ("revoked", fmt_time(a.revoked_at)),
        ("facts", facts_summary(&a.facts)),
    ]);
    print_table(&t);
    println!();
    if inventory.data.is_empty() {
        println!("inventory: none");
        return Ok(());
    }
    let mut t = table(&["KIND", "KEY", "UPDATED", "ATTRS"]);
    for e in &inventory.data {
        t.add_row([e.kind.clone(), e.key.clone(), fmt_time(Some(e.updated_at)), facts_summary(&e.attrs)]);
    }
    print_table(&t);
    if inventory.next_cursor.is_some() {
        println!("(the first {} inventory entries; -o json for the cursor to the rest)", inventory.data.len());
    }
    Ok(())
}

/// Free-form JSON the agent reported, on one line: `key=value` for each
/// top-level scalar, `key=[n]` or `key={…}` for the nested.
fn facts_summary(v: &Value) -> String {
    let Value::Object(map) = v else {
        return if v.is_null() { "-".to_owned() } else { v.to_string() };
    };
    if map.is_empty() {
        return "-".to_owned();
    }
    let items: Vec<_> = map
        .iter()
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}={s}"),
            Value::Array(a) => format!("{k}=[{}]", a.len()),
            Value::Object(_) => format!("{k}={{…}}"),
            other => format!("{k}={other}"),
        })
        .collect();
    items.join(" ")
}

fn print_metrics(output: Output, r: &MetricQueryResult) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(r);
    }
    if r.series.is_empty() {
        println!("no points of {} in that range", r.name);
    }
    for series in &r.series {
        if !series.labels.is_empty() {
            println!("{}{{{}}}", r.name, fmt_labels(&series.labels));
        }
        let mut t = table(&["TIME", "COUNT", "MIN", "AVG", "MAX"]);
        for p in &series.points {
            t.add_row([fmt_ms(p.ts_ms), p.count.to_string(), fmt_value(p.min), fmt_value(p.avg), fmt_value(p.max)]);
        }
        print_table(&t);
        println!();
    }
    println!(
        "{}: resolution {}, {} to {}{}",
        r.name,
        wire_name(&r.resolution),
        fmt_ms(r.from_ms),
        fmt_ms(r.to_ms),
        if r.truncated { " (cut at the server's point limit: ask for a shorter range)" } else { "" }
    );
    Ok(())
}

/// Unix milliseconds as RFC 3339.
fn fmt_ms(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok();
    fmt_time(t)
}

/// A whole number without decimals (bytes, counters), anything else with two.
fn fmt_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 { format!("{v:.0}") } else { format!("{v:.2}") }
}

/// The agent's configuration at a glance: the applied hash, and the desired
/// one when they differ (with `failed` when the agent said it could not apply it).
fn config_state(a: &Agent) -> String {
    let applied = a.applied_config_hash.as_deref().map_or("-".to_owned(), super::config::short);
    match a.desired_config_hash.as_deref() {
        Some(desired) if a.applied_config_hash.as_deref() != Some(desired) => {
            let failed = if a.config_error.is_some() { " (failed)" } else { "" };
            format!("{applied} → {}{failed}", super::config::short(desired))
        }
        _ => applied,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_are_summarised_on_one_line() {
        let facts = serde_json::json!({"os": "linux", "cpus": 4, "disks": ["a", "b"], "net": {"eth0": {}}});
        assert_eq!(facts_summary(&facts), "cpus=4 disks=[2] net={…} os=linux");
        assert_eq!(facts_summary(&Value::Null), "-");
        assert_eq!(facts_summary(&serde_json::json!({})), "-");
    }

    #[test]
    fn values_print_whole_numbers_plainly_and_the_rest_with_two_decimals() {
        assert_eq!(fmt_value(8_589_934_592.0), "8589934592");
        assert_eq!(fmt_value(12.3456), "12.35");
        assert_eq!(fmt_ms(0), "1970-01-01T00:00:00Z");
    }
}
