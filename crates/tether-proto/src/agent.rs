//! Agent identity on the wire: enrollment, tokens, agent views (protocol.md §3, §15).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{AgentId, Labels, Timestamp};

pub mod user_code;

/// Limits on labels (protocol.md §11 caps).
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_KEY_LEN: usize = 63;
pub const MAX_LABEL_VALUE_LEN: usize = 255;

/// Checks a label set against the caps: keys are `[A-Za-z0-9._/-]`, values printable.
pub fn validate_labels(labels: &Labels) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!("at most {MAX_LABELS} labels"));
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= MAX_LABEL_KEY_LEN
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b));
        if !key_ok {
            return Err(format!("label key {k:?} must be 1-{MAX_LABEL_KEY_LEN} chars of [A-Za-z0-9._/-]"));
        }
        if v.len() > MAX_LABEL_VALUE_LEN || v.chars().any(char::is_control) {
            return Err(format!("label value for {k:?} must be at most {MAX_LABEL_VALUE_LEN} printable chars"));
        }
    }
    Ok(())
}

/// `POST /api/v1/agents/enroll`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub enroll_token: String,
    /// base64url (no padding) of the raw 32-byte Ed25519 public key.
    pub public_key: String,
    pub hostname: String,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub facts: Value,
}

/// Answer of enrollment and of every refresh.
#[derive(Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct TokenPair {
    pub agent_id: AgentId,
    pub access_token: String,
    pub refresh_token: String,
    pub expires_in: u64,
}

impl std::fmt::Debug for TokenPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenPair")
            .field("agent_id", &self.agent_id)
            .field("access_token", &"<redacted>")
            .field("refresh_token", &"<redacted>")
            .field("expires_in", &self.expires_in)
            .finish()
    }
}

/// `POST /api/v1/auth/token/refresh` (certificate-agent form, protocol.md §16.4).
#[derive(Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    pub refresh_token: String,
    pub device_public_id: AgentId,
}

impl std::fmt::Debug for RefreshRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefreshRequest")
            .field("refresh_token", &"<redacted>")
            .field("device_public_id", &self.device_public_id)
            .finish()
    }
}

/// `POST /api/v1/agents/{id}/revoke`
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    Online,
    Offline,
    Revoked,
}

/// An agent as operators see it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Agent {
    pub id: AgentId,
    pub name: String,
    pub hostname: String,
    pub labels: Labels,
    pub status: AgentStatus,
    pub version: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_seen: Option<Timestamp>,
    pub applied_config_hash: Option<String>,
    /// The hash of the effective configuration the agent should run.
    #[serde(default)]
    pub desired_config_hash: Option<String>,
    /// Why the agent could not apply `desired_config_hash`, if it said so.
    #[serde(default)]
    pub config_error: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub revoked_at: Option<Timestamp>,
    #[serde(default)]
    pub facts: Value,
    /// The latest heartbeat, as the agent sent it (`null` before the first).
    #[serde(default)]
    pub heartbeat: Value,
    /// The agent's long-lived keys (`GET /api/v1/agents/{id}` only: absent
    /// from lists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<AgentKey>>,
}

/// A long-lived agent key (`tta_…`, protocol.md §16.5) as operators see
/// it: never the secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct AgentKey {
    pub id: String,
    /// The key's last four characters, to tell keys apart.
    pub last4: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
}

/// `PATCH /api/v1/agents/{id}`: what is given replaces what the agent had.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateAgent {
    /// The whole new label set (its configuration follows, protocol.md §6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `POST /api/v1/enroll-tokens`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEnrollToken {
    #[serde(default)]
    pub labels: Labels,
    /// How many enrollments the token allows (default 1).
    #[serde(default = "one")]
    pub uses: u32,
    /// Lifetime in seconds (default 24 h).
    #[serde(default = "one_day")]
    pub expires_in_s: u64,
}

fn one() -> u32 {
    1
}
fn one_day() -> u64 {
    86_400
}

#[derive(Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct CreatedEnrollToken {
    pub id: String,
    pub token: String,
}

impl std::fmt::Debug for CreatedEnrollToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedEnrollToken").field("id", &self.id).field("token", &"<redacted>").finish()
    }
}

/// An enrollment token as listed (never with its secret).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct EnrollToken {
    pub id: String,
    pub labels: Labels,
    pub uses: u32,
    pub used: u32,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: Timestamp,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub revoked_at: Option<Timestamp>,
}

/// `POST /api/v1/agents/self/heartbeat`. The server keeps unknown fields
/// too (≤ 4 KiB), so agents may add their own.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Heartbeat {
    pub uptime_s: u64,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_config_hash: Option<String>,
    /// How the last configuration the agent received went (protocol.md §6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_status: Option<crate::config::ConfigApply>,
    pub running_commands: u32,
    pub queue_depth: u32,
    /// Host CPU use since the previous heartbeat, 0–100 (absent on the
    /// first one: usage is the difference of two readings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_pct: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_used_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_total_bytes: Option<u64>,
    /// The host's one-minute load average.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load1: Option<f64>,
}

/// Largest heartbeat body the server keeps.
pub const MAX_HEARTBEAT_BYTES: usize = 4096;

/// The `client_id` agents use on the RFC 8628 endpoints.
pub const DEVICE_CLIENT_ID: &str = "tether-agent";
/// `grant_type` of the RFC 8628 token poll.
pub const DEVICE_GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// The answer of `POST /oauth/device_authorization` (RFC 8628 §3.2).
#[derive(Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct DeviceAuthorization {
    /// The secret the agent polls with; never shown to people.
    pub device_code: String,
    /// What a person types at the verification page, shown as `XXXX-XXXX`.
    pub user_code: String,
    pub verification_uri: String,
    #[serde(default)]
    pub verification_uri_complete: Option<String>,
    /// Seconds until the codes expire.
    pub expires_in: u64,
    /// Seconds to wait between token polls.
    #[serde(default = "default_device_interval")]
    pub interval: u64,
}

/// RFC 8628 §3.2: "If no value is provided, clients MUST use 5 as the default."
fn default_device_interval() -> u64 {
    5
}

impl std::fmt::Debug for DeviceAuthorization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceAuthorization")
            .field("device_code", &"<redacted>")
            .field("user_code", &self.user_code)
            .field("verification_uri", &self.verification_uri)
            .field("expires_in", &self.expires_in)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

/// An RFC 6749 §5.2 error body, as the `/oauth/*` endpoints answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct OAuthError {
    pub error: String,
    #[serde(default)]
    pub error_description: Option<String>,
}

/// `POST /api/v1/device/approve {user_code, labels}` and `…/deny {user_code}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceDecision {
    /// `XXXX-XXXX`; the server also accepts it without the dash and in any case.
    pub user_code: String,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
}

/// Hex digits of an agent key fingerprint: 64 bits, enough for a person to
/// compare by eye, not meant to resist a targeted second-preimage search.
pub const KEY_FINGERPRINT_LEN: usize = 16;

/// The short fingerprint of a raw Ed25519 public key: the first
/// [`KEY_FINGERPRINT_LEN`] lowercase hex digits of its SHA-256. The agent
/// prints it beside its user code and the approval page shows it, so an
/// operator can check that the code belongs to the machine in front of them.
pub fn key_fingerprint(raw_public_key: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(raw_public_key);
    digest.iter().take(KEY_FINGERPRINT_LEN / 2).map(|b| format!("{b:02x}")).collect()
}

/// What an operator deciding a user code is told about the device behind it
/// (RFC 8628 §5.4: a person must be able to tell whether this is the device
/// they meant before approving). The `data` of `POST /api/v1/device/approve`
/// and `…/deny`, with `approved: true` or `denied: true` beside it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeviceDetails {
    /// `XXXX-XXXX`.
    pub user_code: String,
    /// The hostname the agent sent; the agent chose it, so it proves nothing alone.
    pub hostname: String,
    /// The address the authorization request came from, as the server saw it.
    #[serde(default)]
    pub requested_ip: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub requested_at: Timestamp,
    /// First 16 hex digits of SHA-256 over the raw 32-byte agent public key;
    /// the agent prints the same next to its code.
    pub key_fingerprint: String,
    #[serde(default)]
    pub labels: Labels,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_fingerprints_are_16_hex_digits_of_sha256() {
        // SHA-256 of 32 zero bytes is 66687aadf862bd77…
        assert_eq!(key_fingerprint(&[0; 32]), "66687aadf862bd77");
        assert_ne!(key_fingerprint(&[1; 32]), key_fingerprint(&[0; 32]));
    }
}
