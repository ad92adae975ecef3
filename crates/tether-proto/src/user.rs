//! Operator-side identity on the wire: personal API tokens.

use serde::{Deserialize, Serialize};

use crate::Timestamp;

/// `POST /api/v1/tokens`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CreateApiToken {
    pub name: String,
    /// Lifetime in seconds; `None` = until revoked.
    #[serde(default)]
    pub expires_in_s: Option<u64>,
}

/// The answer to `POST /api/v1/tokens`: the secret is shown this once.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct CreatedApiToken {
    pub id: String,
    pub name: String,
    pub token: String,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<Timestamp>,
}

impl std::fmt::Debug for CreatedApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedApiToken").field("id", &self.id).field("name", &self.name).finish_non_exhaustive()
    }
}

/// A token as listed (never with its secret).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ApiToken {
    pub id: String,
    pub name: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: Timestamp,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<Timestamp>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<Timestamp>,
}
