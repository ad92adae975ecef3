//! `tether config get|set|history|rollback|effective|diff|status|list`:
//! versioned configuration documents by scope (protocol.md §6).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Subcommand;
use serde_json::Value;
use tether_proto::AgentId;
use tether_proto::ErrorKey;
use tether_proto::config::{ConfigWritten, Doc, PutConfig, Scope, leaves};

use super::{
    Ctx, Output, api_error, collect_pages, fields_table, fmt_time, print_json, print_table, table, terminal_safe,
};

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// List every scope with its current version.
    List,
    /// Print a scope's document (the current version, or --version).
    Get {
        /// global, label:KEY=VALUE or agent:AGENT_ID
        scope: Scope,
        #[arg(long, value_name = "N")]
        version: Option<u64>,
    },
    /// Write a scope's next version from a JSON file (or - for stdin).
    ///
    /// Without --if-match it replaces whatever version is current. Name the
    /// version your file was edited from with --if-match, and a write someone
    /// else made meanwhile is refused instead of overwritten.
    Set {
        scope: Scope,
        /// A JSON object, or - to read it from stdin
        file: PathBuf,
        /// The version this one replaces (0: only if the scope does not exist)
        #[arg(long, value_name = "N")]
        if_match: Option<u64>,
        /// Why, for the history
        #[arg(long, short = 'm', default_value = "")]
        comment: String,
    },
    /// A scope's versions, newest first.
    History {
        scope: Scope,
        /// Stop after this many versions [default: all]
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        limit: Option<u32>,
    },
    /// Write a new version equal to an earlier one.
    Rollback { scope: Scope, version: u64 },
    /// An agent's effective configuration, and which scope set each value.
    Effective { agent: AgentId },
    /// What changed between two versions of a scope.
    Diff { scope: Scope, from: u64, to: u64 },
    /// Of the agents a scope targets: how many run their configuration, are behind, or failed it.
    Status { scope: Scope },
}

pub async fn run(ctx: &Ctx, command: ConfigCommand) -> anyhow::Result<()> {
    let client = &ctx.client;
    match command {
        ConfigCommand::List => {
            let scopes = client.list_configs().await.map_err(api_error)?;
            if ctx.output == Output::Json {
                return print_json(&scopes);
            }
            let mut t = table(&["SCOPE", "VERSION", "HASH", "UPDATED BY", "UPDATED"]);
            for s in &scopes {
                t.add_row([
                    s.scope.to_string(),
                    s.version.to_string(),
                    short(&s.hash),
                    s.updated_by.clone(),
                    fmt_time(Some(s.updated_at)),
                ]);
            }
            print_table(&t);
            Ok(())
        }
        ConfigCommand::Get { scope, version } => {
            let v = client.get_config(&scope, version).await.map_err(api_error)?;
            match ctx.output {
                Output::Json => print_json(&v),
                Output::Table => {
                    eprintln!(
                        "{} version {} by {} at {} ({})",
                        v.scope,
                        v.version,
                        v.author,
                        fmt_time(Some(v.created_at)),
                        short(&v.hash)
                    );
                    print_json(&v.doc)
                }
            }
        }
        ConfigCommand::Set { scope, file, if_match, comment } => {
            let doc = read_doc(&file)?;
            let if_match = match if_match {
                Some(v) => Some(v),
                None => match client.get_config(&scope, None).await {
                    Ok(current) => Some(current.version),
                    Err(e) if e.key() == Some(ErrorKey::NotFound) => None,
                    Err(e) => return Err(api_error(e)),
                },
            };
            let written = client.put_config(&scope, &PutConfig { doc, comment }, if_match).await.map_err(api_error)?;
            print_written(ctx.output, &written)
        }
        ConfigCommand::History { scope, limit } => {
            let versions = collect_pages(limit, |cursor, limit| {
                let scope = scope.clone();
                async move { client.config_history(&scope, cursor.as_deref(), limit).await }
            })
            .await
            .map_err(api_error)?;
            if ctx.output == Output::Json {
                return print_json(&versions);
            }
            let mut t = table(&["VERSION", "AUTHOR", "CREATED", "HASH", "COMMENT"]);
            for v in &versions {
                t.add_row([
                    v.version.to_string(),
                    v.author.clone(),
                    fmt_time(Some(v.created_at)),
                    short(&v.hash),
                    v.comment.clone(),
                ]);
            }
            print_table(&t);
            Ok(())
        }
        ConfigCommand::Rollback { scope, version } => {
            let written = client.rollback_config(&scope, version).await.map_err(api_error)?;
            print_written(ctx.output, &written)
        }
        ConfigCommand::Effective { agent } => {
            let eff = client.agent_config(agent).await.map_err(api_error)?;
            if ctx.output == Output::Json {
                return print_json(&eff);
            }
            println!("hash {}", eff.hash);
            let mut t = table(&["KEY", "VALUE", "FROM"]);
            for (pointer, value) in leaves("", &Value::Object(eff.doc.clone())) {
                let from =
                    eff.provenance.get(&pointer).map_or("-".to_owned(), |p| format!("{} v{}", p.scope, p.version));
                t.add_row([pointer, value.to_string(), from]);
            }
            print_table(&t);
            Ok(())
        }
        ConfigCommand::Diff { scope, from, to } => {
            let (old, new) = (
                client.get_config(&scope, Some(from)).await.map_err(api_error)?,
                client.get_config(&scope, Some(to)).await.map_err(api_error)?,
            );
            let changes = diff(&old.doc, &new.doc);
            if ctx.output == Output::Json {
                return print_json(&changes);
            }
            if changes.is_empty() {
                println!("versions {from} and {to} of {scope} are the same");
            }
            for change in &changes {
                println!("{change}");
            }
            Ok(())
        }
        ConfigCommand::Status { scope } => {
            let s = client.config_status(&scope).await.map_err(api_error)?;
            if ctx.output == Output::Json {
                return print_json(&s);
            }
            print_table(&fields_table(vec![
                ("scope", s.scope.to_string()),
                ("version", s.version.to_string()),
                ("targeted agents", s.targeted.to_string()),
                ("applied", s.applied.to_string()),
                ("behind", s.behind.to_string()),
                ("failed", s.failed.to_string()),
            ]));
            for e in &s.errors {
                // The error is the agent's text (a hook's stderr): never raw to a terminal.
                println!("  {} agent(s): {}", e.agents, terminal_safe(&e.error));
            }
            Ok(())
        }
    }
}

fn read_doc(file: &PathBuf) -> anyhow::Result<Doc> {
    let mut text = String::new();
    if file.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut text).context("reading the document from stdin")?;
    } else {
        text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    }
    match serde_json::from_str::<Value>(&text).with_context(|| format!("{} is not JSON", file.display()))? {
        Value::Object(doc) => Ok(doc),
        _ => bail!("{} must hold a JSON object", file.display()),
    }
}

fn print_written(output: Output, w: &ConfigWritten) -> anyhow::Result<()> {
    match output {
        Output::Json => print_json(w),
        Output::Table => {
            println!(
                "{} is at version {} ({}); {} agent(s) told to apply it",
                w.scope,
                w.version,
                short(&w.hash),
                w.agents_changed
            );
            Ok(())
        }
    }
}

/// The first 12 hex digits of a hash, enough to tell versions apart.
pub fn short(hash: &str) -> String {
    hash.chars().take(12).collect()
}

/// One difference between two documents, by JSON Pointer.
#[derive(Debug, serde::Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
enum Change {
    Added { key: String, value: Value },
    Removed { key: String, value: Value },
    Changed { key: String, from: Value, to: Value },
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Added { key, value } => write!(f, "+ {key}: {value}"),
            Change::Removed { key, value } => write!(f, "- {key}: {value}"),
            Change::Changed { key, from, to } => write!(f, "~ {key}: {from} → {to}"),
        }
    }
}

/// The leaf-by-leaf differences from `old` to `new`, in key order.
fn diff(old: &Doc, new: &Doc) -> Vec<Change> {
    let (old, new) = (Value::Object(old.clone()), Value::Object(new.clone()));
    let before: BTreeMap<String, &Value> = leaves("", &old).into_iter().collect();
    let after: BTreeMap<String, &Value> = leaves("", &new).into_iter().collect();
    let mut keys: Vec<&String> = before.keys().chain(after.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|key| match (before.get(key), after.get(key)) {
            (None, Some(v)) => Some(Change::Added { key: key.clone(), value: (*v).clone() }),
            (Some(v), None) => Some(Change::Removed { key: key.clone(), value: (*v).clone() }),
            (Some(a), Some(b)) if a != b => {
                Some(Change::Changed { key: key.clone(), from: (*a).clone(), to: (*b).clone() })
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_diff_lists_added_removed_and_changed_leaves() {
        let doc = |v: Value| v.as_object().expect("object").clone();
        let old = doc(json!({"url": "a", "agent": {"poll_wait_s": 30}, "gone": 1}));
        let new = doc(json!({"url": "b", "agent": {"poll_wait_s": 30, "heartbeat_s": 5}}));
        let lines: Vec<String> = diff(&old, &new).iter().map(ToString::to_string).collect();
        assert_eq!(lines, vec!["+ /agent/heartbeat_s: 5", "- /gone: 1", "~ /url: \"a\" → \"b\""]);
        assert!(diff(&old, &old).is_empty());
    }
}
