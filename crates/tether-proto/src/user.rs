//! Operator-side identity on the wire: personal API tokens.

use serde::{Deserialize, Serialize};

use crate::Timestamp;

/// `POST /api/v1/tokens`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiToken {
    pub name: String,
    /// Lifetime in seconds; `None` = until revoked.
    #[serde(default)]
    pub expires_in_s: Option<u64>,
}

/// The answer to `POST /api/v1/tokens`: the secret is shown this once.
#[derive(Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct CreatedApiToken {
    pub id: String,
    pub name: String,
    pub token: String,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<Timestamp>,
}

impl std::fmt::Debug for CreatedApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedApiToken").field("id", &self.id).field("name", &self.name).finish_non_exhaustive()
    }
}

/// A token as listed (never with its secret).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ApiToken {
    pub id: String,
    pub name: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<Timestamp>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub revoked_at: Option<Timestamp>,
}

/// A user as admins see it (never with the password hash).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct User {
    pub id: String,
    pub username: String,
    pub role: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    pub disabled: bool,
}

/// `POST /api/v1/users`
#[derive(Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    pub username: String,
    pub password: String,
    pub role: String,
}

impl std::fmt::Debug for CreateUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateUser").field("username", &self.username).field("role", &self.role).finish_non_exhaustive()
    }
}

/// `PATCH /api/v1/users/{id}`: any subset.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUser {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

impl std::fmt::Debug for UpdateUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpdateUser").field("role", &self.role).finish_non_exhaustive()
    }
}

/// Shortest password accepted for a user.
pub const MIN_PASSWORD_LEN: usize = 12;

/// Longest username (protocol.md §3).
pub const MAX_USERNAME_LEN: usize = 64;

/// Checks a username: 1-64 bytes of `[A-Za-z0-9._@-]`. The same rule
/// guards user creation and every place a username arrives (login, HTTP
/// Basic, the `/device` form), before any lookup, limiter key or audit row.
pub fn validate_username(username: &str) -> Result<(), String> {
    let ok = (1..=MAX_USERNAME_LEN).contains(&username.len())
        && username.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b));
    if ok { Ok(()) } else { Err(format!("username must be 1-{MAX_USERNAME_LEN} chars of [A-Za-z0-9._@-]")) }
}

/// One audit row (protocol.md §10).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct AuditRow {
    pub id: i64,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub ts: Timestamp,
    pub actor: String,
    pub actor_kind: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub ip: Option<String>,
    pub request_id: Option<String>,
    pub details: serde_json::Value,
    /// Hex sha256 chaining this row to the previous one.
    pub hash: String,
}

/// `POST /api/v1/agents/self/audit`: an event the agent reports about itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentAuditEvent {
    /// Stored as `agent.<action>`.
    pub action: String,
    #[serde(default)]
    pub target: String,
    #[serde(default)]
    pub details: serde_json::Value,
}

/// `GET /api/v1/audit/verify`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct AuditVerification {
    pub ok: bool,
    pub checked: u64,
    pub first_bad_id: Option<i64>,
    /// What is wrong with the first bad row (absent from older servers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// Every row that breaks the chain, oldest first (at most 1,000 listed).
    #[serde(default)]
    pub broken: Vec<AuditBreak>,
    /// How many rows break the chain in all.
    #[serde(default)]
    pub broken_count: u64,
}

/// One row that breaks the audit hash chain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct AuditBreak {
    pub id: i64,
    pub problem: String,
}
