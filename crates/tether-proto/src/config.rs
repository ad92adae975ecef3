//! Configuration distribution (protocol.md §6): scopes, documents and their
//! versions, an agent's effective configuration, apply reports, and the
//! canonical hash every side computes the same way.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::agent::validate_labels;
use crate::{AgentId, Labels, Timestamp};

/// A config document: a JSON object.
pub type Doc = Map<String, Value>;

/// Where a document applies: every agent, agents carrying one label, or one agent.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    Global,
    Label { key: String, value: String },
    Agent(AgentId),
}

impl Scope {
    /// Whether this scope applies to an agent with `id` and `labels`.
    pub fn targets(&self, id: AgentId, labels: &Labels) -> bool {
        match self {
            Scope::Global => true,
            Scope::Label { key, value } => labels.get(key) == Some(value),
            Scope::Agent(agent) => *agent == id,
        }
    }

    /// `global`, `label` or `agent`.
    pub fn kind(&self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::Label { .. } => "label",
            Scope::Agent(_) => "agent",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Global => f.write_str("global"),
            Scope::Label { key, value } => write!(f, "label:{key}={value}"),
            Scope::Agent(id) => write!(f, "agent:{id}"),
        }
    }
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "global" {
            return Ok(Scope::Global);
        }
        if let Some(pair) = s.strip_prefix("label:") {
            let (key, value) = pair.split_once('=').ok_or("a label scope is label:KEY=VALUE")?;
            let labels: Labels = [(key.to_owned(), value.to_owned())].into();
            validate_labels(&labels)?;
            return Ok(Scope::Label { key: key.to_owned(), value: value.to_owned() });
        }
        if let Some(id) = s.strip_prefix("agent:") {
            return Ok(Scope::Agent(id.parse().map_err(|_| format!("{id:?} is not an agent id"))?));
        }
        Err("a scope is global, label:KEY=VALUE or agent:AGENT_ID".into())
    }
}

impl Serialize for Scope {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// The JSON text of `value` with every object's keys in order and no
/// whitespace: the same document always gives the same bytes, whatever the
/// key order or spacing it was written with.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// A document's hash: lowercase hex SHA-256 of its canonical JSON.
pub fn doc_hash(doc: &Doc) -> String {
    let text = canonical_json(&Value::Object(doc.clone()));
    hex_lower(&Sha256::digest(text.as_bytes()))
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One key as a JSON Pointer (RFC 6901) segment: `~` → `~0`, `/` → `~1`.
pub fn pointer_segment(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// Every leaf under `value` with its JSON Pointer below `prefix`, in key
/// order. A leaf is anything but a non-empty object (an empty object is
/// one, so that clearing a section shows).
pub fn leaves<'a>(prefix: &str, value: &'a Value) -> Vec<(String, &'a Value)> {
    let mut out = Vec::new();
    collect_leaves(prefix, value, &mut out);
    out
}

fn collect_leaves<'a>(prefix: &str, value: &'a Value, out: &mut Vec<(String, &'a Value)>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            for key in keys {
                collect_leaves(&format!("{prefix}/{}", pointer_segment(key)), &map[key], out);
            }
        }
        _ => out.push((prefix.to_owned(), value)),
    }
}

/// Deepest nesting a document may have: every client, wrapped in the
/// response envelope, can still parse it (serde_json stops at 128).
pub const MAX_DOC_DEPTH: usize = 64;

/// Longest comment on a version, in bytes.
pub const MAX_COMMENT_BYTES: usize = 1024;

/// How deeply `value` nests: 0 for a scalar, 1 for a flat array or object.
pub fn depth(value: &Value) -> usize {
    match value {
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// `PUT /api/v1/configs/{scope}` (with `If-Match` once the scope exists).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PutConfig {
    pub doc: Doc,
    #[serde(default)]
    pub comment: String,
}

/// `POST /api/v1/configs/{scope}/rollback`
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rollback {
    pub version: u64,
}

/// What a write made: the scope's new version and its document's hash.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConfigWritten {
    pub scope: Scope,
    pub version: u64,
    pub hash: String,
    /// Agents whose effective configuration changed (and were told).
    pub agents_changed: u64,
}

/// One version of a scope's document, as history shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConfigVersion {
    pub scope: Scope,
    pub version: u64,
    pub hash: String,
    pub author: String,
    pub comment: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: Timestamp,
    pub doc: Doc,
}

/// A scope and its current version (`GET /api/v1/configs`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConfigScope {
    pub scope: Scope,
    pub version: u64,
    pub hash: String,
    pub updated_by: String,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: Timestamp,
}

/// Which scope, at which version, set a value of the effective configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Provenance {
    pub scope: Scope,
    pub version: u64,
}

/// An agent's effective configuration: every scope that applies to it,
/// merged. `provenance` maps each value's JSON Pointer (RFC 6901, e.g.
/// `/agent/poll_wait_s`) to the scope that set it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EffectiveConfig {
    pub doc: Doc,
    pub hash: String,
    pub provenance: BTreeMap<String, Provenance>,
}

/// How an agent's last apply of a configuration went.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ApplyState {
    Applied,
    Failed,
}

impl ApplyState {
    pub fn as_str(self) -> &'static str {
        match self {
            ApplyState::Applied => "applied",
            ApplyState::Failed => "failed",
        }
    }
}

/// An agent's report on one configuration (by hash), carried in its heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConfigApply {
    pub hash: String,
    pub state: ApplyState,
    /// Why it failed (`state` = failed), at most [`MAX_APPLY_ERROR_BYTES`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The longest apply error an agent reports: the heartbeat carrying it must
/// stay well under its 4 KiB limit (protocol.md §8).
pub const MAX_APPLY_ERROR_BYTES: usize = 1024;

impl ConfigApply {
    pub fn applied(hash: String) -> Self {
        Self { hash, state: ApplyState::Applied, error: None }
    }

    /// A failed apply; a long error is cut to [`MAX_APPLY_ERROR_BYTES`], and
    /// control characters (but newline and tab) become spaces, since JSON
    /// would send each as six bytes.
    pub fn failed(hash: String, error: String) -> Self {
        let mut error: String =
            error.chars().map(|c| if c.is_control() && c != '\n' && c != '\t' { ' ' } else { c }).collect();
        crate::cap_utf8(&mut error, MAX_APPLY_ERROR_BYTES);
        Self { hash, state: ApplyState::Failed, error: Some(error) }
    }
}

/// The fleet's view of a scope (`GET /api/v1/configs/{scope}/status`): of the
/// agents it targets, how many run their current effective configuration,
/// how many are still behind, and how many failed to apply it, and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConfigStatus {
    pub scope: Scope,
    pub version: u64,
    pub targeted: u64,
    pub applied: u64,
    pub behind: u64,
    pub failed: u64,
    /// Failures grouped by error, most agents first.
    pub errors: Vec<ApplyErrorCount>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApplyErrorCount {
    pub error: String,
    pub agents: u64,
}

/// The `config.updated` signal's ref: which scope changed (`config_id`), to
/// which version, and the agent's new effective hash.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConfigUpdated {
    pub config_id: String,
    pub version: u64,
    pub hash: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_apply_error_is_cut_on_a_char_boundary() {
        let report = ConfigApply::failed("h".into(), "é".repeat(MAX_APPLY_ERROR_BYTES));
        let error = report.error.expect("error");
        assert!(error.len() <= MAX_APPLY_ERROR_BYTES && error.len() > MAX_APPLY_ERROR_BYTES - 2);
        assert!(error.chars().all(|c| c == 'é'));
        let report = ConfigApply::failed("h".into(), "\u{1b}[31m".repeat(MAX_APPLY_ERROR_BYTES));
        let json = serde_json::to_string(&report).expect("json");
        assert!(json.len() < 2 * MAX_APPLY_ERROR_BYTES, "{} bytes as JSON", json.len());
    }

    #[test]
    fn scopes_parse_and_print_back() {
        let id = AgentId::new();
        for text in ["global", "label:env=prod", "label:role=web server", &format!("agent:{id}")] {
            let scope: Scope = text.parse().expect(text);
            assert_eq!(scope.to_string(), text);
        }
        for bad in ["", "globals", "label:", "label:env", "label:bad key=x", "agent:nope", "other:x"] {
            assert!(bad.parse::<Scope>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_scope_targets_what_it_names() {
        let id = AgentId::new();
        let labels: Labels = [("env".to_owned(), "prod".to_owned())].into();
        assert!(Scope::Global.targets(id, &labels));
        assert!("label:env=prod".parse::<Scope>().expect("scope").targets(id, &labels));
        assert!(!"label:env=dev".parse::<Scope>().expect("scope").targets(id, &labels));
        assert!(Scope::Agent(id).targets(id, &labels));
        assert!(!Scope::Agent(AgentId::new()).targets(id, &labels));
    }

    #[test]
    fn leaves_are_json_pointers_in_key_order() {
        let v: Value =
            serde_json::from_str(r#"{"b": {"x/y": 1, "a~": []}, "a": {}, "c": {"d": {"e": null}}}"#).expect("json");
        let got: Vec<String> = leaves("", &v).into_iter().map(|(p, _)| p).collect();
        assert_eq!(got, vec!["/a", "/b/a~0", "/b/x~1y", "/c/d/e"]);
        assert_eq!(leaves("/k", &Value::from(3)), vec![("/k".to_owned(), &Value::from(3))]);
    }

    #[test]
    fn the_hash_ignores_key_order_and_spacing() {
        let a: Value = serde_json::from_str(r#"{"b": [1, {"y": 2, "x": 1}], "a": "é"}"#).expect("json");
        let b: Value = serde_json::from_str(r#"{"a":"é","b":[1,{"x":1,"y":2}]}"#).expect("json");
        assert_eq!(canonical_json(&a), r#"{"a":"é","b":[1,{"x":1,"y":2}]}"#);
        let (Value::Object(a), Value::Object(b)) = (a, b) else { panic!("objects") };
        assert_eq!(doc_hash(&a), doc_hash(&b));
        assert_eq!(doc_hash(&Doc::new()).len(), 64);
    }
}
