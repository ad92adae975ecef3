//! Enrollment through the RFC 8628 device authorization grant (protocol.md §3, way
//! 2): ask the server for a code, show it to a person, and poll the token
//! endpoint until an operator approves (tokens), denies or lets it expire.

use std::time::Duration;

use tether_client::{Client, DeviceToken};
use tether_proto::agent::{DeviceAuthorization, TokenPair};

use crate::session::{Failure, classify};

/// RFC 8628 §3.5: each `slow_down` adds 5 seconds to the polling interval.
const SLOW_DOWN_STEP_S: u64 = 5;
/// Never poll faster than this, whatever the server says.
const MIN_INTERVAL_S: u64 = 1;

/// The interval after an answer: `slow_down` makes it longer for good.
pub fn next_interval(interval_s: u64, answer: &DeviceToken) -> u64 {
    match answer {
        DeviceToken::SlowDown => interval_s + SLOW_DOWN_STEP_S,
        _ => interval_s,
    }
}

/// Runs the whole flow and returns the agent's first token pair.
pub async fn enroll(base: &Client, public_key: &str, hostname: &str) -> Result<TokenPair, Failure> {
    let auth = base.device_authorization(public_key, hostname).await.map_err(|e| match classify(&e) {
        Failure::Refused { status, what } => {
            Failure::Fatal(format!("the server refused the device authorization request ({status}): {what}"))
        }
        other => other,
    })?;
    announce(&auth, &fingerprint(public_key));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(auth.expires_in);
    let mut interval_s = auth.interval.max(MIN_INTERVAL_S);
    loop {
        tokio::time::sleep(Duration::from_secs(interval_s)).await;
        let answer = match base.device_token(&auth.device_code).await {
            Ok(answer) => answer,
            Err(e) => match classify(&e) {
                // The code stays valid across a blip: keep polling rather
                // than starting over with a code nobody has seen.
                Failure::Retry { retry_after, why } => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(expired());
                    }
                    tracing::warn!(error = %why, "Device token poll failed; polling again");
                    if let Some(wait) = retry_after {
                        tokio::time::sleep(wait).await;
                    }
                    continue;
                }
                Failure::Refused { status, what } => {
                    return Err(Failure::Fatal(format!("the server refused the device token poll ({status}): {what}")));
                }
                other => return Err(other),
            },
        };
        interval_s = next_interval(interval_s, &answer);
        match answer {
            DeviceToken::Issued(pair) => {
                eprintln!("tether agent: device approved; enrolled as agent {}", pair.agent_id);
                return Ok(pair);
            }
            DeviceToken::Pending => {
                tracing::debug!(user_code = %auth.user_code, "Waiting for an operator to approve the device");
            }
            DeviceToken::SlowDown => {
                tracing::info!(interval_s, "Server asked to slow down; polling less often");
            }
            DeviceToken::Denied => {
                return Err(Failure::Fatal(format!(
                    "an operator denied this device (access_denied) for code {}; it was not enrolled",
                    auth.user_code
                )));
            }
            DeviceToken::Expired => return Err(expired()),
            DeviceToken::Refused(e) => {
                return Err(Failure::Fatal(format!(
                    "the server rejected the device code ({}): {}",
                    e.error,
                    e.error_description.unwrap_or_default()
                )));
            }
        }
    }
}

fn expired() -> Failure {
    Failure::Fatal(
        "the device code expired before anyone approved it (expired_token); start the agent again for a new code"
            .into(),
    )
}

/// Tells the person at the console what to do. The user code is not a
/// secret (approving needs operator credentials); the device code is, and
/// is never printed.
/// The fingerprint the approval page and `tether device approve` show for
/// this key, so the person approving can match code and machine.
fn fingerprint(public_key: &str) -> String {
    use base64::Engine;
    match base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(public_key) {
        Ok(raw) => tether_proto::agent::key_fingerprint(&raw),
        // The key is our own, encoded by `public_key_text`; should that ever
        // change, show no fingerprint rather than a wrong one.
        Err(_) => "unknown".to_owned(),
    }
}

fn announce(auth: &DeviceAuthorization, fingerprint: &str) {
    let minutes = auth.expires_in.div_ceil(60);
    let mut text = String::new();
    text.push_str("\nThis agent is not enrolled. To enroll it, approve this code within ");
    text.push_str(&format!("{minutes} min:\n\n    {}\n\n", auth.user_code));
    text.push_str(&format!("  open     {}\n", auth.verification_uri));
    if let Some(complete) = &auth.verification_uri_complete {
        text.push_str(&format!("  or open  {complete}\n"));
    }
    text.push_str(&format!("  or run   tether device approve {} --label key=value\n\n", auth.user_code));
    text.push_str(&format!("Approve only if the server shows this key fingerprint: {fingerprint}\n\n"));
    eprint!("{text}");
    tracing::info!(user_code = %auth.user_code, verification_uri = %auth.verification_uri, "Waiting for device approval");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_down_adds_five_seconds_for_good_and_nothing_else_changes_it() {
        assert_eq!(next_interval(5, &DeviceToken::SlowDown), 10);
        assert_eq!(next_interval(10, &DeviceToken::SlowDown), 15);
        assert_eq!(next_interval(15, &DeviceToken::Pending), 15);
        assert_eq!(next_interval(15, &DeviceToken::Denied), 15);
    }
}
