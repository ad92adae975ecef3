//! `tether device approve|deny CODE`: the operator's half of the RFC 8628
//! device flow. The agent printed the code; approving it (with the labels
//! the agent gets) lets the agent's next token poll enroll it.

use clap::Subcommand;
use tether_proto::agent::DeviceDecision;

use super::{Ctx, Output, api_error, fmt_labels, labels_from, parse_label, print_json};

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Approve the device showing this code; it enrolls at its next poll.
    Approve {
        /// The code the agent printed (XXXX-XXXX; dash and case do not matter)
        code: String,
        /// Label the new agent gets (repeatable)
        #[arg(long = "label", value_name = "K=V", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Deny the device showing this code; its agent stops with access_denied.
    Deny {
        /// The code the agent printed (XXXX-XXXX; dash and case do not matter)
        code: String,
    },
}

pub async fn run(ctx: &Ctx, command: DeviceCommand) -> anyhow::Result<()> {
    match command {
        DeviceCommand::Approve { code, labels } => {
            let labels = labels_from(&labels)?;
            let req = DeviceDecision { user_code: code.clone(), labels };
            ctx.client.approve_device(&req).await.map_err(api_error)?;
            let shown = display(&code);
            match ctx.output {
                Output::Json => {
                    print_json(&serde_json::json!({"user_code": shown, "approved": true, "labels": req.labels}))
                }
                Output::Table => {
                    let labels = if req.labels.is_empty() { "none".to_owned() } else { fmt_labels(&req.labels) };
                    println!("approved device {shown} (labels: {labels}); the agent enrolls at its next poll");
                    Ok(())
                }
            }
        }
        DeviceCommand::Deny { code } => {
            ctx.client.deny_device(&code).await.map_err(api_error)?;
            let shown = display(&code);
            match ctx.output {
                Output::Json => print_json(&serde_json::json!({"user_code": shown, "denied": true})),
                Output::Table => {
                    println!("denied device {shown}");
                    Ok(())
                }
            }
        }
    }
}

/// The code as the agent showed it (`XXXX-XXXX`), whatever form was typed;
/// the server does the authoritative normalization.
fn display(code: &str) -> String {
    let plain: String = code.chars().filter(|c| !matches!(c, '-' | ' ')).map(|c| c.to_ascii_uppercase()).collect();
    match (plain.get(..4), plain.get(4..)) {
        (Some(a), Some(b)) if plain.len() == 8 => format!("{a}-{b}"),
        _ => plain,
    }
}

#[cfg(test)]
mod tests {
    use super::display;

    #[test]
    fn codes_display_as_the_agent_showed_them() {
        assert_eq!(display("bcdf-ghjk"), "BCDF-GHJK");
        assert_eq!(display("BCDFGHJK"), "BCDF-GHJK");
        assert_eq!(display("bcdf ghjk"), "BCDF-GHJK");
        assert_eq!(display("abc"), "ABC");
    }
}
