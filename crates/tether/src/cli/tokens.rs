//! `tether enroll-tokens` (for new agents) and `tether tokens` (personal API
//! tokens). Secrets are printed once, when created, and never listed.

use clap::Subcommand;
use tether_proto::agent::{CreateEnrollToken, EnrollToken};
use tether_proto::user::{ApiToken, CreateApiToken};

use super::{Ctx, Output, api_error, fmt_labels, fmt_time, labels_from, parse_label, print_json, print_table, table};

#[derive(Debug, Subcommand)]
pub enum EnrollTokensCommand {
    /// Create an enrollment token; its secret is shown only this once.
    Create {
        /// Label every agent enrolled with it gets (repeatable)
        #[arg(long = "label", value_name = "K=V", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// How many agents may enroll with it
        #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        uses: u32,
        /// Lifetime in seconds
        #[arg(long, value_name = "SECONDS", default_value_t = 86_400,
              value_parser = clap::value_parser!(u64).range(1..))]
        expires_in: u64,
    },
    /// List enrollment tokens (without their secrets).
    List,
    /// Revoke an enrollment token so no further agent can enroll with it.
    Revoke {
        /// The token id (not the secret)
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApiTokensCommand {
    /// Create a personal API token with your role; its secret is shown only this once.
    Create {
        /// A name to recognise it by (e.g. ci-deploy)
        name: String,
        /// Lifetime in seconds [default: until revoked]
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
        expires_in: Option<u64>,
    },
    /// List your API tokens (without their secrets).
    List,
    /// Revoke one of your API tokens; it stops working on the next request.
    Revoke {
        /// The token id (not the secret)
        id: String,
    },
}

pub async fn run_enroll(ctx: &Ctx, command: EnrollTokensCommand) -> anyhow::Result<()> {
    match command {
        EnrollTokensCommand::Create { labels, uses, expires_in } => {
            let req = CreateEnrollToken { labels: labels_from(&labels)?, uses, expires_in_s: expires_in };
            let created = ctx.client.create_enroll_token(&req).await.map_err(api_error)?;
            if ctx.output == Output::Json {
                return print_json(&created);
            }
            println!("enrollment token {} created ({uses} use(s), valid for {expires_in}s)", created.id);
            println!("secret (shown only this once): {}", created.token);
            println!();
            // Through the environment: a flag would show the secret in `ps` there.
            println!("on the machine to enroll, run (with the secret above):");
            println!("  TETHER_ENROLL_TOKEN=tte_… tether agent --server {}", ctx.server);
            Ok(())
        }
        EnrollTokensCommand::List => {
            let tokens = ctx.client.list_enroll_tokens().await.map_err(api_error)?;
            print_enroll_tokens(ctx.output, &tokens)
        }
        EnrollTokensCommand::Revoke { id } => {
            ctx.client.revoke_enroll_token(&id).await.map_err(api_error)?;
            done(ctx.output, "enrollment token", &id)
        }
    }
}

pub async fn run_api(ctx: &Ctx, command: ApiTokensCommand) -> anyhow::Result<()> {
    match command {
        ApiTokensCommand::Create { name, expires_in } => {
            let created = ctx
                .client
                .create_api_token(&CreateApiToken { name, expires_in_s: expires_in })
                .await
                .map_err(api_error)?;
            if ctx.output == Output::Json {
                return print_json(&created);
            }
            println!(
                "API token {} ({}) created, {}",
                created.id,
                created.name,
                created
                    .expires_at
                    .map_or_else(|| "valid until revoked".to_owned(), |t| format!("expires {}", fmt_time(Some(t))))
            );
            println!("secret (shown only this once): {}", created.token);
            Ok(())
        }
        ApiTokensCommand::List => {
            let tokens = ctx.client.list_api_tokens().await.map_err(api_error)?;
            print_api_tokens(ctx.output, &tokens)
        }
        ApiTokensCommand::Revoke { id } => {
            ctx.client.revoke_api_token(&id).await.map_err(api_error)?;
            done(ctx.output, "API token", &id)
        }
    }
}

fn done(output: Output, what: &str, id: &str) -> anyhow::Result<()> {
    match output {
        Output::Json => print_json(&serde_json::json!({"id": id, "revoked": true})),
        Output::Table => {
            println!("revoked {what} {id}");
            Ok(())
        }
    }
}

fn print_enroll_tokens(output: Output, tokens: &[EnrollToken]) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(tokens);
    }
    let now = time::OffsetDateTime::now_utc();
    let mut t = table(&["ID", "LABELS", "USED", "STATE", "CREATED", "EXPIRES"]);
    for tok in tokens {
        let state = if tok.revoked_at.is_some() {
            "revoked"
        } else if tok.expires_at <= now {
            "expired"
        } else if tok.used >= tok.uses {
            "used up"
        } else {
            "active"
        };
        t.add_row([
            tok.id.clone(),
            fmt_labels(&tok.labels),
            format!("{}/{}", tok.used, tok.uses),
            state.to_owned(),
            fmt_time(Some(tok.created_at)),
            fmt_time(Some(tok.expires_at)),
        ]);
    }
    print_table(&t);
    Ok(())
}

fn print_api_tokens(output: Output, tokens: &[ApiToken]) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(tokens);
    }
    let mut t = table(&["ID", "NAME", "CREATED", "EXPIRES", "REVOKED"]);
    for tok in tokens {
        t.add_row([
            tok.id.clone(),
            tok.name.clone(),
            fmt_time(Some(tok.created_at)),
            tok.expires_at.map_or_else(|| "never".to_owned(), |e| fmt_time(Some(e))),
            fmt_time(tok.revoked_at),
        ]);
    }
    print_table(&t);
    Ok(())
}
