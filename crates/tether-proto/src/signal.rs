//! Signals: the entries of an agent's stream (protocol.md §4). Agents must ignore
//! types they do not know, so `kind` stays a string on the wire.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{CommandId, Cursor};

pub const COMMAND_QUEUED: &str = "command.queued";
pub const COMMAND_CANCELLED: &str = "command.cancelled";
pub const CONFIG_UPDATED: &str = "config.updated";
pub const FILE_UPDATED: &str = "file.updated";
pub const FILE_REMOVED: &str = "file.removed";
pub const CERT_RENEWED: &str = "cert.renewed";
pub const CERT_REVOKED: &str = "cert.revoked";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Signal {
    #[serde(rename = "type")]
    pub kind: String,
    pub ts_ms: i64,
    #[serde(rename = "ref")]
    pub reference: Value,
}

/// `200` body of `GET /api/v1/agents/self/updates`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Updates {
    pub cursor: String,
    pub signals: Vec<Signal>,
}

impl Updates {
    pub fn cursor(&self) -> Option<Cursor> {
        self.cursor.parse().ok()
    }
}

/// `ref` of `command.queued`: the full command, so the agent needs no extra
/// round trip before running it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CommandQueued {
    pub command_id: CommandId,
    pub name: String,
    pub args: Value,
    pub timeout_s: u32,
    pub priority: u8,
    /// Agents skip a command they receive after this instant (ms since epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<i64>,
}

/// `ref` of `command.cancelled`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CommandCancelled {
    pub command_id: CommandId,
}
