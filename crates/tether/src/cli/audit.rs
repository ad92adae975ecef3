//! `tether audit list|verify`: read the audit log with the API's filters and
//! check its hash chain (SPEC §10).

use anyhow::{Context as _, bail};
use clap::Subcommand;
use tether_client::AuditQuery;
use tether_proto::AgentId;
use tether_proto::user::AuditRow;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{Ctx, Output, api_error, collect_pages, fmt_opt, fmt_time, print_json, print_table, table};

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
    /// Check the audit log's hash chain; exits 1 when a row was altered or removed.
    Verify,
}

/// Returns the process exit code: `verify` fails with 1 on a broken chain.
pub async fn run(ctx: &Ctx, command: AuditCommand) -> anyhow::Result<i32> {
    match command {
        AuditCommand::List { actor, agent_id, action, since, until, limit } => {
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
        AuditCommand::Verify => {
            let v = ctx.client.verify_audit().await.map_err(api_error)?;
            let code = i32::from(!v.ok);
            if ctx.output == Output::Json {
                print_json(&v)?;
                return Ok(code);
            }
            if v.ok {
                println!("audit log OK: {} rows, hash chain intact", v.checked);
            } else {
                println!(
                    "audit log BROKEN at row {}: {}",
                    fmt_opt(v.first_bad_id),
                    v.problem.as_deref().unwrap_or("it does not match the hash chain")
                );
                println!(
                    "{} rows before it verified; rows from {} on cannot be trusted",
                    v.checked,
                    fmt_opt(v.first_bad_id)
                );
            }
            Ok(code)
        }
    }
}

/// `--since`/`--until`: RFC 3339 as is, or an age (`90s`, `30m`, `2h`, `7d`)
/// turned into the RFC 3339 time that long ago.
fn parse_when(s: &str) -> Result<String, String> {
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
