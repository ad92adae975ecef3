//! Managed files and certificates (protocol.md §7): what operators assign,
//! what an agent is told to hold, and what it reports back.

use serde::{Deserialize, Serialize};

use crate::command::Target;
use crate::config::{ApplyErrorCount, ApplyState, MAX_APPLY_ERROR_BYTES};
use crate::{AgentId, Timestamp};

/// `201`/`200` answer of `POST /api/v1/files` (the raw bytes as the body).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredBlob {
    pub sha256: String,
    pub size: u64,
}

/// The longest destination path, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;

/// `POST /api/v1/files/assignments`: put the content `sha256` at `path` on
/// the agents of `target`. An active assignment of the same path to the
/// same target is updated (its version goes up) instead of duplicated.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AssignFile {
    pub sha256: String,
    /// Absolute, without `..`; the agent also confines it to its allowed directories.
    pub path: String,
    /// Permission bits, e.g. `0o644` (JSON has no octal: 420).
    #[serde(default = "default_file_mode")]
    pub mode: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// A named action of the agent's own `agent.toml` run after the file changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    pub target: Target,
}

fn default_file_mode() -> u32 {
    0o644
}

impl AssignFile {
    /// Checks everything but the target (checked with [`Target::check`]).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if !is_sha256_hex(&self.sha256) {
            return Err(("sha256", "sha256 must be 64 lowercase hex digits".into()));
        }
        check_path(&self.path).map_err(|e| ("path", e))?;
        if self.mode > 0o777 {
            return Err(("mode", format!("mode must be permission bits (at most 0o777), not {:#o}", self.mode)));
        }
        for (field, name) in [("owner", &self.owner), ("group", &self.group)] {
            if let Some(name) = name
                && !is_account_name(name)
            {
                return Err((field, format!("{field} {name:?} is not a user or group name")));
            }
        }
        if let Some(hook) = &self.hook
            && !is_hook_name(hook)
        {
            return Err(("hook", format!("hook {hook:?} must name an action: 1-64 chars of [A-Za-z0-9._-]")));
        }
        Ok(())
    }
}

/// An absolute path without `.`/`..` components, NUL or control characters.
pub fn check_path(path: &str) -> Result<(), String> {
    if path.len() > MAX_PATH_BYTES {
        return Err(format!("path is longer than {MAX_PATH_BYTES} bytes"));
    }
    if !path.starts_with('/') || path.ends_with('/') {
        return Err(format!("path {path:?} must be absolute and name a file"));
    }
    if path.chars().any(char::is_control) {
        return Err("path must not contain control characters".into());
    }
    if path.split('/').skip(1).any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(format!("path {path:?} must not contain empty, . or .. components"));
    }
    Ok(())
}

pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A POSIX-ish user or group name (or a numeric id).
fn is_account_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !s.starts_with('-')
}

/// The name of a hook: a named action in the agent's `agent.toml`.
pub fn is_hook_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// A file assignment as operators see it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileAssignment {
    pub id: i64,
    pub path: String,
    pub sha256: String,
    pub size: u64,
    pub mode: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    pub target: Target,
    /// Goes up with every change of content, mode, owner, group or hook.
    pub version: u64,
    pub updated_by: String,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: Timestamp,
}

/// Answer of an assignment or an unassignment: the assignment and how many
/// agents were told.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileAssigned {
    pub assignment: FileAssignment,
    pub agents_told: u64,
}

/// One file an agent must hold (`GET /api/v1/agents/self/files`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentFile {
    pub file_id: i64,
    pub path: String,
    pub sha256: String,
    pub size: u64,
    pub mode: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    pub version: u64,
}

/// `ref` of `file.updated`: fetch the agent's files again.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileUpdated {
    pub file_id: i64,
    pub path: String,
    pub sha256: String,
    pub mode: u32,
}

/// `ref` of `file.removed`: the agent removes the file it placed there.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileRemoved {
    pub file_id: i64,
    pub path: String,
}

/// An agent's report on one managed item (`POST
/// /api/v1/agents/self/{files|certs}/{id}/status`): the version it tried,
/// and for certificates the serial and expiry it now holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ItemReport {
    pub version: u64,
    pub state: ApplyState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, with = "time::serde::rfc3339::option", skip_serializing_if = "Option::is_none")]
    pub not_after: Option<Timestamp>,
}

impl ItemReport {
    pub fn applied(version: u64) -> Self {
        Self { version, state: ApplyState::Applied, error: None, serial: None, not_after: None }
    }

    /// A failure; the error is cut like a configuration's (protocol.md §6).
    pub fn failed(version: u64, error: String) -> Self {
        let error = crate::config::ConfigApply::failed(String::new(), error).error;
        Self { version, state: ApplyState::Failed, error, serial: None, not_after: None }
    }

    /// Checks what an agent sent.
    pub fn check(&self) -> Result<(), String> {
        if self.error.as_ref().is_some_and(|e| e.len() > MAX_APPLY_ERROR_BYTES) {
            return Err(format!("error is longer than {MAX_APPLY_ERROR_BYTES} bytes"));
        }
        if self.serial.as_ref().is_some_and(|s| s.len() > 128) {
            return Err("serial is longer than 128 bytes".into());
        }
        Ok(())
    }
}

/// The fleet's view of one file assignment or certificate: of the agents it
/// targets now, how many hold the current version, are behind, or failed it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FleetStatus {
    pub version: u64,
    pub targeted: u64,
    pub current: u64,
    pub behind: u64,
    pub failed: u64,
    /// Failures grouped by error, most agents first.
    pub errors: Vec<ApplyErrorCount>,
    /// What each agent reported last (at most 1,000, by agent id).
    pub agents: Vec<AgentItem>,
}

/// One agent's last report on an item.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentItem {
    pub agent_id: AgentId,
    pub version: u64,
    pub state: ApplyState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, with = "time::serde::rfc3339::option", skip_serializing_if = "Option::is_none")]
    pub not_after: Option<Timestamp>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assign(path: &str) -> AssignFile {
        AssignFile {
            sha256: "a".repeat(64),
            path: path.into(),
            mode: 0o644,
            owner: None,
            group: None,
            hook: None,
            target: Target::all(),
        }
    }

    #[test]
    fn paths_are_absolute_without_dot_components() {
        for good in ["/etc/app/app.conf", "/var/lib/x/y z.txt"] {
            assert!(assign(good).check().is_ok(), "{good}");
        }
        for bad in ["etc/app", "/etc/../shadow", "/etc/./x", "/etc//x", "/etc/app/", "/a\nb", "/"] {
            assert_eq!(assign(bad).check().map_err(|e| e.0), Err("path"), "{bad:?}");
        }
    }

    #[test]
    fn modes_names_and_hooks_are_checked() {
        let mut a = assign("/x");
        a.mode = 0o4755;
        assert_eq!(a.check().map_err(|e| e.0), Err("mode"));
        let mut a = assign("/x");
        a.owner = Some("-rf".into());
        assert_eq!(a.check().map_err(|e| e.0), Err("owner"));
        let mut a = assign("/x");
        a.hook = Some("reload nginx".into());
        assert_eq!(a.check().map_err(|e| e.0), Err("hook"));
        let mut a = assign("/x");
        a.sha256 = "A".repeat(64);
        assert_eq!(a.check().map_err(|e| e.0), Err("sha256"));
    }
}
