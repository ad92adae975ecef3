//! `tether agents list|show|revoke`.

use anyhow::bail;
use clap::Subcommand;
use tether_client::AgentQuery;
use tether_proto::AgentId;
use tether_proto::agent::{Agent, UpdateAgent};

use super::{
    Ctx, Output, api_error, collect_pages, fields_table, fmt_labels, fmt_opt, fmt_time, labels_from, parse_label,
    print_json, print_table, table, wire_name,
};

#[derive(Debug, Subcommand)]
pub enum AgentsCommand {
    /// List agents, optionally filtered by labels or a search term.
    List {
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
    /// Show one agent in detail.
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
    /// Revoke an agent: its tokens stop working at once and its open poll ends.
    Revoke {
        /// The agent id
        id: AgentId,
        /// Why, for the audit log [default: "revoked by <you>"]
        #[arg(long, value_name = "R")]
        reason: Option<String>,
    },
}

pub async fn run(ctx: &Ctx, command: AgentsCommand) -> anyhow::Result<()> {
    match command {
        AgentsCommand::List { labels, search, limit } => {
            let labels = labels_from(&labels)?;
            // The server takes the filter as one comma-separated `label` value.
            if labels.values().any(|v| v.contains(',')) {
                bail!("label filter values cannot contain ','");
            }
            let label = (!labels.is_empty()).then(|| fmt_labels(&labels));
            let q = search.filter(|s| !s.is_empty());
            let agents = collect_pages(limit, |cursor, limit| {
                let query = AgentQuery { label: label.clone(), q: q.clone(), cursor, limit: Some(limit) };
                async move { ctx.client.list_agents(&query).await }
            })
            .await
            .map_err(api_error)?;
            print_list(ctx.output, &agents)
        }
        AgentsCommand::Show { id } => {
            let agent = ctx.client.get_agent(id).await.map_err(api_error)?;
            print_one(ctx.output, &agent)
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
            let update = UpdateAgent { labels: Some(labels), name: None };
            let agent = ctx.client.update_agent(id, &update).await.map_err(api_error)?;
            print_one(ctx.output, &agent)
        }
        AgentsCommand::Revoke { id, reason } => {
            let agent = ctx.client.revoke_agent(id, reason.as_deref().unwrap_or_default()).await.map_err(api_error)?;
            match ctx.output {
                Output::Json => print_json(&agent),
                Output::Table => {
                    println!("revoked agent {} ({})", agent.id, agent.name);
                    Ok(())
                }
            }
        }
    }
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

fn print_one(output: Output, a: &Agent) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(a);
    }
    let facts = if a.facts.is_null() { "-".to_owned() } else { a.facts.to_string() };
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
        ("facts", facts),
    ]);
    print_table(&t);
    Ok(())
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
