//! `tether audit list|verify`: read the audit log with the API's filters and
//! check its hash chain (protocol.md §10).

use anyhow::{Context as _, bail};
use clap::Subcommand;
use tether_client::AuditQuery;
use tether_proto::AgentId;
use tether_proto::user::AuditRow;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{GlobalOpts, Output, api_error, collect_pages, fmt_opt, fmt_time, print_json, print_table, table};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List audit rows, newest first (admins see everyone's, others their own).
    List {
        /// Only rows by this actor (a user name or an agent id)
        #[arg(long, value_name = "NAME")]
        actor: Option<String>,
        /// Only rows about this agent
        #[arg(long = "agent", value_name = "ID")]
        agent_id: Option<AgentId>,
        /// Only rows with this action (e.g. user.create, device.approve)
        #[arg(long, value_name = "ACTION")]
        action: Option<String>,
        /// Only rows at or after this time: RFC 3339, or an age like 30m, 2h, 7d
        #[arg(long, value_name = "TIME", value_parser = parse_when)]
        since: Option<String>,
        /// Only rows at or before this time: RFC 3339, or an age like 30m, 2h, 7d
        #[arg(long, value_name = "TIME", value_parser = parse_when)]
        until: Option<String>,
        /// Stop after this many rows
        #[arg(long, value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
    /// Check the audit log's hash chain and list every broken row; exits 1
    /// when a row was altered or removed, 2 when the check could not run.
    Verify,
}

/// Returns the process exit code.
pub async fn run(global: &GlobalOpts, command: AuditCommand) -> anyhow::Result<i32> {
    match command {
        AuditCommand::List { actor, agent_id, action, since, until, limit } => {
            let ctx = &global.connect()?;
            let rows = collect_pages(Some(limit), |cursor, page| {
                let query = AuditQuery {
                    actor: actor.clone().filter(|a| !a.is_empty()),
                    agent_id,
                    action: action.clone().filter(|a| !a.is_empty()),
                    from: since.clone(),
                    to: until.clone(),
                    cursor,
                    limit: Some(page),
                };
                async move { ctx.client.list_audit(&query).await }
            })
            .await
            .map_err(api_error)?;
            print_rows(ctx.output, &rows)?;
            Ok(0)
        }
        AuditCommand::Verify => Ok(run_verify(global).await),
    }
}

/// `tether audit verify`: exits 0 for an intact chain, 1 for a broken one
/// and 2 for anything else (no credentials, server unreachable, refused…),
/// so a script can tell "tampered" from "could not check".
async fn run_verify(global: &GlobalOpts) -> i32 {
    match verify(global).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    }
}

async fn verify(global: &GlobalOpts) -> anyhow::Result<i32> {
    let ctx = global.connect()?;
    let v = ctx.client.verify_audit().await.map_err(api_error)?;
    let code = i32::from(!v.ok);
    if ctx.output == Output::Json {
        print_json(&v)?;
        return Ok(code);
    }
    if v.ok {
        println!("audit log OK: {} rows, hash chain intact", v.checked);
        return Ok(code);
    }
    // Servers before the full listing only name the first broken row.
    let broken: Vec<(i64, &str)> = if v.broken.is_empty() {
        v.first_bad_id
            .map(|id| (id, v.problem.as_deref().unwrap_or("it does not match the hash chain")))
            .into_iter()
            .collect()
    } else {
        v.broken.iter().map(|b| (b.id, b.problem.as_str())).collect()
    };
    let count = v.broken_count.max(broken.len() as u64);
    println!("audit log BROKEN: {count} of {} rows do not match the hash chain", v.checked);
    for (id, problem) in &broken {
        println!("  BROKEN at row {id}: {problem}");
    }
    if count > broken.len() as u64 {
        println!("  … and {} more", count - broken.len() as u64);
    }
    Ok(code)
}

/// `--since`/`--until`: RFC 3339 as is, or an age (`90s`, `30m`, `2h`, `7d`)
/// turned into the RFC 3339 time that long ago.
pub fn parse_when(s: &str) -> Result<String, String> {
    if OffsetDateTime::parse(s, &Rfc3339).is_ok() {
        return Ok(s.to_owned());
    }
    let ago = parse_age(s).map_err(|e| format!("{e} (expected RFC 3339 or an age like 30m, 2h, 7d)"))?;
    let at = OffsetDateTime::now_utc() - ago;
    at.format(&Rfc3339).map_err(|e| e.to_string())
}

fn parse_age(s: &str) -> anyhow::Result<time::Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit()).context("missing unit")?;
    let (n, unit) = s.split_at(split);
    let n: i64 = n.parse().with_context(|| format!("{s:?} is not a number and a unit"))?;
    Ok(match unit {
        "s" => time::Duration::seconds(n),
        "m" => time::Duration::minutes(n),
        "h" => time::Duration::hours(n),
        "d" => time::Duration::days(n),
        _ => bail!("unknown unit {unit:?}"),
    })
}

fn print_rows(output: Output, rows: &[AuditRow]) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(rows);
    }
    let mut t = table(&["ID", "TIME", "ACTOR", "ACTION", "TARGET", "OUTCOME", "IP"]);
    for r in rows {
        t.add_row([
            r.id.to_string(),
            fmt_time(Some(r.ts)),
            format!("{} ({})", r.actor, r.actor_kind),
            r.action.clone(),
            r.target.clone(),
            r.outcome.clone(),
            fmt_opt(r.ip.as_deref()),
        ]);
    }
    print_table(&t);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_rfc3339_are_accepted_and_the_rest_named() {
        assert_eq!(parse_when("2026-01-02T03:04:05Z").as_deref(), Ok("2026-01-02T03:04:05Z"));
        let two_hours_ago = OffsetDateTime::parse(&parse_when("2h").expect("age"), &Rfc3339).expect("rfc3339");
        let diff = OffsetDateTime::now_utc() - two_hours_ago;
        assert!((diff - time::Duration::hours(2)).abs() < time::Duration::seconds(5), "{diff}");
        for bad in ["", "h", "2w", "yesterday", "2026-01-02"] {
            assert!(parse_when(bad).is_err(), "{bad:?}");
        }
    }
}
