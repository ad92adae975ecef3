//! `tether device approve|deny CODE`: the operator's half of the RFC 8628
//! device flow. The agent printed the code; approving it (with the labels
//! the agent gets) lets the agent's next token poll enroll it.

use clap::Subcommand;
use tether_proto::agent::user_code::UserCode;
use tether_proto::agent::{DeviceDecision, DeviceDetails};

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
            let code = parse_code(&code)?;
            let labels = labels_from(&labels)?;
            let req = DeviceDecision { user_code: code.to_string(), labels };
            let device = ctx.client.approve_device(&req).await.map_err(api_error)?;
            match ctx.output {
                Output::Json => print_json(&decided("approved", &device)?),
                Output::Table => {
                    let labels = if device.labels.is_empty() { "none".to_owned() } else { fmt_labels(&device.labels) };
                    println!(
                        "approved device {} (labels: {labels}); the agent enrolls at its next poll",
                        device.user_code
                    );
                    print_device(&device);
                    Ok(())
                }
            }
        }
        DeviceCommand::Deny { code } => {
            let code = parse_code(&code)?;
            let device = ctx.client.deny_device(&code.to_string()).await.map_err(api_error)?;
            match ctx.output {
                Output::Json => print_json(&decided("denied", &device)?),
                Output::Table => {
                    println!("denied device {}", device.user_code);
                    print_device(&device);
                    Ok(())
                }
            }
        }
    }
}

/// Refuses what cannot be a code before asking the server (which parses it
/// the same way, through `tether_proto`).
fn parse_code(typed: &str) -> anyhow::Result<UserCode> {
    UserCode::parse(typed).map_err(|e| anyhow::anyhow!("{typed:?} is not a device code: {e}"))
}

fn decided(flag: &str, device: &DeviceDetails) -> anyhow::Result<serde_json::Value> {
    let mut value = serde_json::to_value(device)?;
    value[flag] = serde_json::Value::Bool(true);
    Ok(value)
}

/// What the server knows about the device that asked (RFC 8628 §5.4), so
/// the operator can tell a phished code from their own machine.
fn print_device(device: &DeviceDetails) {
    let at = device.requested_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    println!("  hostname         {}", device.hostname);
    println!("  requested from   {}", device.requested_ip.as_deref().unwrap_or("unknown"));
    println!("  requested at     {at}");
    println!("  key fingerprint  {}", device.key_fingerprint);
}
