//! Commands on the wire and their lifecycle state machine (protocol.md §5).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{AgentId, BatchId, CommandId, Labels, Timestamp};

pub const DEFAULT_TIMEOUT_S: u32 = 300;
pub const MAX_TIMEOUT_S: u32 = 86_400;
pub const DEFAULT_PRIORITY: u8 = 5;
pub const MAX_PRIORITY: u8 = 9;
/// Commands not delivered within this long expire unless `expires_at` says otherwise (protocol.md §5).
pub const DEFAULT_EXPIRY_S: i64 = 3_600;
/// Grace after `timeout_s` before a silent delivered/running command is `lost`.
pub const LOST_GRACE_S: i64 = 120;
pub const MAX_NAME_LEN: usize = 128;
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;
/// Inline cap for each of stdout and stderr.
pub const MAX_OUTPUT_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CommandStatus {
    Queued,
    Delivered,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Rejected,
    Cancelled,
    Expired,
    Lost,
}

/// What can happen to a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A response carrying its `command.queued` signal was written.
    Deliver,
    /// The agent reported `running`.
    Start,
    /// The agent reported a result with this status.
    Finish(CommandStatus),
    /// An operator cancelled it.
    Cancel,
    /// `expires_at` passed before delivery.
    Expire,
    /// No status/result within `timeout_s` + grace.
    Lose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("command is {from}; {event:?} is not allowed")]
pub struct IllegalTransition {
    pub from: CommandStatus,
    pub event: Event,
}

impl CommandStatus {
    pub const ALL: [CommandStatus; 10] = [
        Self::Queued,
        Self::Delivered,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::TimedOut,
        Self::Rejected,
        Self::Cancelled,
        Self::Expired,
        Self::Lost,
    ];

    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Queued | Self::Delivered | Self::Running)
    }

    /// Statuses an agent may report as a result.
    pub fn is_result(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::TimedOut | Self::Rejected | Self::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Delivered => "delivered",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
            Self::Rejected => "rejected",
            Self::Cancelled => "cancelled",
            Self::Expired => "expired",
            Self::Lost => "lost",
        }
    }

    /// The lifecycle: transitions only move forward. Returns the new status;
    /// an event that changes nothing (a repeated delivery or `running`
    /// report) returns the current status.
    pub fn apply(self, event: Event) -> Result<CommandStatus, IllegalTransition> {
        use CommandStatus::*;
        let next = match (self, event) {
            (Queued, Event::Deliver) => Delivered,
            (Delivered | Running, Event::Deliver) => self,
            (Queued | Delivered, Event::Start) => Running,
            (Running, Event::Start) => Running,
            (Queued | Delivered | Running, Event::Finish(s)) if s.is_result() => s,
            // A late result may still leave `lost` (protocol.md §5).
            (Lost, Event::Finish(s)) if s.is_result() => s,
            (Queued | Delivered | Running, Event::Cancel) => Cancelled,
            (Queued, Event::Expire) => Expired,
            (Delivered | Running, Event::Lose) => Lost,
            _ => return Err(IllegalTransition { from: self, event }),
        };
        Ok(next)
    }
}

impl fmt::Display for CommandStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CommandStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| format!("unknown command status {s:?}"))
    }
}

/// Who a command goes to; exactly one field is set (protocol.md §5). Resolved to
/// agent ids when the command is created.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Target {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents: Option<Vec<AgentId>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all: Option<bool>,
}

/// A checked [`Target`].
#[derive(Debug, Clone, PartialEq)]
pub enum TargetSpec {
    Agents(Vec<AgentId>),
    Labels(Labels),
    All,
}

impl TargetSpec {
    /// Whether an active agent with `id` and `labels` is targeted.
    pub fn matches(&self, id: AgentId, labels: &Labels) -> bool {
        match self {
            TargetSpec::Agents(ids) => ids.contains(&id),
            TargetSpec::Labels(wanted) => wanted.iter().all(|(k, v)| labels.get(k) == Some(v)),
            TargetSpec::All => true,
        }
    }

    /// The wire form.
    pub fn to_target(&self) -> Target {
        match self {
            TargetSpec::Agents(ids) => Target::agents(ids.iter().copied()),
            TargetSpec::Labels(labels) => Target::labels(labels.clone()),
            TargetSpec::All => Target::all(),
        }
    }

    /// One text per target, whatever the order its agents were listed in:
    /// what "the same target" means for an assignment.
    pub fn key(&self) -> String {
        let mut target = self.to_target();
        if let Some(ids) = &mut target.agents {
            ids.sort();
            ids.dedup();
        }
        serde_json::to_string(&target).expect("a target serializes")
    }
}

impl Target {
    pub fn agents(ids: impl IntoIterator<Item = AgentId>) -> Self {
        Self { agents: Some(ids.into_iter().collect()), ..Self::default() }
    }
    pub fn labels(labels: Labels) -> Self {
        Self { labels: Some(labels), ..Self::default() }
    }
    pub fn all() -> Self {
        Self { all: Some(true), ..Self::default() }
    }

    pub fn check(&self) -> Result<TargetSpec, String> {
        match (&self.agents, &self.labels, self.all) {
            (Some(ids), None, None) if !ids.is_empty() => Ok(TargetSpec::Agents(ids.clone())),
            (None, Some(labels), None) if !labels.is_empty() => {
                crate::agent::validate_labels(labels)?;
                Ok(TargetSpec::Labels(labels.clone()))
            }
            (None, None, Some(true)) => Ok(TargetSpec::All),
            _ => Err("target needs exactly one of a non-empty agents list, non-empty labels or all=true".into()),
        }
    }
}

/// `POST /api/v1/commands`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCommand {
    pub target: Target,
    pub name: String,
    #[serde(default = "empty_object")]
    pub args: Value,
    #[serde(default = "default_timeout")]
    pub timeout_s: u32,
    #[serde(default = "default_priority")]
    pub priority: u8,
    #[serde(default, with = "time::serde::rfc3339::option", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub not_before: Option<Timestamp>,
    #[serde(default, with = "time::serde::rfc3339::option", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

impl CreateCommand {
    pub fn new(target: Target, name: impl Into<String>) -> Self {
        Self {
            target,
            name: name.into(),
            args: empty_object(),
            timeout_s: DEFAULT_TIMEOUT_S,
            priority: DEFAULT_PRIORITY,
            not_before: None,
            expires_at: None,
            idempotency_key: None,
        }
    }

    /// Checks every field; the error names the offending field.
    pub fn validate(&self) -> Result<TargetSpec, (&'static str, String)> {
        let target = self.target.check().map_err(|e| ("target", e))?;
        let name_ok = !self.name.is_empty()
            && self.name.len() <= MAX_NAME_LEN
            && self.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b));
        if !name_ok {
            return Err(("name", format!("must be 1-{MAX_NAME_LEN} chars of [A-Za-z0-9._:-]")));
        }
        if !self.args.is_object() {
            return Err(("args", "must be a JSON object".into()));
        }
        if self.timeout_s == 0 || self.timeout_s > MAX_TIMEOUT_S {
            return Err(("timeout_s", format!("must be 1..={MAX_TIMEOUT_S}")));
        }
        if self.priority > MAX_PRIORITY {
            return Err(("priority", format!("must be 0..={MAX_PRIORITY}")));
        }
        if let (Some(nb), Some(exp)) = (self.not_before, self.expires_at)
            && exp <= nb
        {
            return Err(("expires_at", "must be after not_before".into()));
        }
        if let Some(key) = &self.idempotency_key
            && (key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN)
        {
            return Err(("idempotency_key", format!("must be 1-{MAX_IDEMPOTENCY_KEY_LEN} chars")));
        }
        Ok(target)
    }
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}
fn default_timeout() -> u32 {
    DEFAULT_TIMEOUT_S
}
fn default_priority() -> u8 {
    DEFAULT_PRIORITY
}

/// `201` body of `POST /api/v1/commands`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct CreatedCommands {
    pub batch_id: BatchId,
    pub command_ids: Vec<CommandId>,
}

/// A command as operators (and the simple agent API) see it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Command {
    pub id: CommandId,
    pub batch_id: BatchId,
    pub agent_id: AgentId,
    pub name: String,
    pub args: Value,
    pub timeout_s: u32,
    pub priority: u8,
    pub created_by: String,
    pub status: CommandStatus,
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub output: Value,
    pub truncated: bool,
    pub reason: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub not_before: Option<Timestamp>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub delivered_at: Option<Timestamp>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub started_at: Option<Timestamp>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub finished_at: Option<Timestamp>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: Timestamp,
}

/// A batch with its per-state counts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Batch {
    pub id: BatchId,
    pub name: String,
    pub created_by: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    pub total: u64,
    pub counts: BTreeMap<CommandStatus, u64>,
    /// `running` while any command is not terminal, then `done`.
    pub status: BatchStatus,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    Running,
    Done,
}

/// `POST /api/v1/agents/self/commands/{id}/status`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StatusReport {
    pub state: CommandStatus,
}

/// `POST /api/v1/agents/self/commands/{id}/result`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ResultReport {
    pub status: CommandStatus,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub stdout: String,
    #[serde(default)]
    pub stderr: String,
    #[serde(default)]
    pub output: Value,
    #[serde(default)]
    pub truncated: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, with = "time::serde::rfc3339::option", skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    #[serde(default, with = "time::serde::rfc3339::option", skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
}

impl ResultReport {
    pub fn new(status: CommandStatus) -> Self {
        Self {
            status,
            exit_code: None,
            stdout: String::new(),
            stderr: String::new(),
            output: Value::Null,
            truncated: false,
            reason: None,
            started_at: None,
            finished_at: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CommandStatus::*;

    const EVENTS: [Event; 10] = [
        Event::Deliver,
        Event::Start,
        Event::Finish(Succeeded),
        Event::Finish(Failed),
        Event::Finish(Cancelled),
        Event::Finish(Queued),
        Event::Finish(Lost),
        Event::Cancel,
        Event::Expire,
        Event::Lose,
    ];

    /// The whole transition table, written out so a change to the lifecycle
    /// has to change this test too.
    fn expected(from: CommandStatus, event: Event) -> Option<CommandStatus> {
        match (from, event) {
            (Queued, Event::Deliver) => Some(Delivered),
            (Delivered, Event::Deliver) => Some(Delivered),
            (Running, Event::Deliver) => Some(Running),
            (Queued | Delivered | Running, Event::Start) => Some(Running),
            (Queued | Delivered | Running | Lost, Event::Finish(s @ (Succeeded | Failed | Cancelled))) => Some(s),
            (Queued | Delivered | Running, Event::Cancel) => Some(Cancelled),
            (Queued, Event::Expire) => Some(Expired),
            (Delivered | Running, Event::Lose) => Some(Lost),
            _ => None,
        }
    }

    #[test]
    fn transition_table_is_exhaustive_and_monotonic() {
        for from in CommandStatus::ALL {
            for event in EVENTS {
                assert_eq!(from.apply(event).ok(), expected(from, event), "{from} + {event:?}");
                if let Ok(to) = from.apply(event) {
                    // Never back to an earlier active state; terminal only left from `lost`.
                    assert!(to >= from || from == Lost, "{from} -> {to} goes backwards");
                }
            }
        }
    }

    #[test]
    fn terminal_statuses_cannot_be_cancelled() {
        for s in CommandStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
            assert!(s.apply(Event::Cancel).is_err(), "{s}");
        }
    }

    #[test]
    fn target_needs_exactly_one_selector() {
        assert!(Target::all().check().is_ok());
        assert!(Target::default().check().is_err());
        assert!(Target::agents([]).check().is_err());
        let both = Target { all: Some(true), ..Target::agents([AgentId::new()]) };
        assert!(both.check().is_err());
    }

    #[test]
    fn create_command_rejects_unknown_fields_and_bad_values() {
        let bad: Result<CreateCommand, _> = serde_json::from_str(r#"{"target":{"all":true},"name":"ping","bogus":1}"#);
        assert!(bad.is_err());
        let mut c = CreateCommand::new(Target::all(), "ping");
        assert!(c.validate().is_ok());
        c.priority = 10;
        assert_eq!(c.validate().unwrap_err().0, "priority");
    }
}
