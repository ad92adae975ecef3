//! Agent configuration, layered: defaults < `agent.toml` < environment
//! (`TETHER_*`, plus the status-panel aliases, protocol.md §16.1) < command-line flags.
//!
//! `shell` and named actions can only come from the local `agent.toml`:
//! nothing the server sends can enable them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tether_proto::Labels;

pub use crate::transport::Transport;

pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";
/// The status-panel agent's own default `DASHBOARD_URL`, used when the agent
/// is configured through those names and no server is given (protocol.md §16.1).
pub const STATUS_PANEL_SERVER: &str = "http://localhost:5000";
/// The status-panel names other than `DASHBOARD_URL`: any of them set means
/// the agent is configured the status-panel way.
const STATUS_PANEL_NAMES: [&str; 5] =
    ["AGENT_ID", "DEPLOYMENT_HASH", "POLLING_TIMEOUT_SECS", "POLLING_BACKOFF_SECS", "COMMAND_TIMEOUT_SECS"];
/// Longest wait per poll the server grants (protocol.md §4).
const MAX_POLL_WAIT_S: u32 = 30;

/// What `agent.toml` may contain.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub server: Option<String>,
    pub enroll_token: Option<String>,
    pub device_flow: Option<bool>,
    pub name: Option<String>,
    #[serde(default)]
    pub labels: Labels,
    pub poll_wait_s: Option<u32>,
    pub heartbeat_s: Option<u64>,
    /// Seconds between host metric collections; 0 turns them off.
    pub metrics_s: Option<u64>,
    pub backoff_base_s: Option<u64>,
    pub command_timeout_s: Option<u32>,
    pub max_concurrent_commands: Option<usize>,
    pub output_cap_bytes: Option<usize>,
    pub shutdown_grace_s: Option<u64>,
    pub ca_file: Option<PathBuf>,
    pub sign_requests: Option<bool>,
    /// `auto` (the WebSocket, else long-poll), `websocket` or `long-poll`.
    pub transport: Option<Transport>,
    #[serde(default)]
    pub allow_shell: bool,
    #[serde(default)]
    pub actions: BTreeMap<String, Action>,
    /// Where local programs get the configuration the server distributes.
    #[serde(default)]
    pub config: ConfigSinks,
    /// Where managed files may be written.
    #[serde(default)]
    pub files: FilesSection,
    /// Where certificates are installed.
    #[serde(default)]
    pub certs: CertsSection,
    /// Which host metrics are collected, and how many wait for the server.
    #[serde(default)]
    pub metrics: MetricsSection,
}

/// `[metrics]` in `agent.toml` (protocol.md §12).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Sources to read: `cpu`, `memory`, `load`, `disk`, `network`
    /// (default all of them).
    pub collect: Option<Vec<String>>,
    /// Most batches kept on disk while the server cannot be reached (default 1,000).
    pub spool_max_batches: Option<usize>,
    /// Most bytes they may take (default 16 MiB).
    pub spool_max_bytes: Option<u64>,
}

/// `[files]` in `agent.toml`: the only directories managed files (protocol.md
/// §7) may be written to, whatever path the server names.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesSection {
    /// Absolute directories; default `<state dir>/files`. An empty list
    /// refuses every managed file.
    pub allowed_dirs: Option<Vec<PathBuf>>,
}

/// `[certs]` in `agent.toml`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertsSection {
    /// Certificates go to `<dir>/<name>/`; default `<state dir>/certs`.
    pub dir: Option<PathBuf>,
}

/// `[config]` in `agent.toml`: how the configuration the server distributes
/// (protocol.md §6) reaches local programs. Only this local file decides
/// where it goes; the server only sends documents.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigSinks {
    /// Write the document to this file, atomically.
    pub file: Option<PathBuf>,
    /// `json` or `toml`; default from the file's extension, else JSON.
    pub format: Option<String>,
    /// The file's mode, in octal (default `0600`).
    pub mode: Option<String>,
    /// Run this (argv, no shell) after the file changed, or after every new
    /// configuration when there is no file; a failure fails the apply and
    /// puts the previous file back.
    #[serde(default)]
    pub on_change: Vec<String>,
    /// Longest the hook may run (default 30 s).
    pub on_change_timeout_s: Option<u64>,
    /// POST the document (JSON) here, retrying with backoff until accepted.
    pub post_url: Option<String>,
}

/// How the file sink is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    Json,
    Toml,
}

impl ConfigSinks {
    /// The file sink's format: as configured, else by extension, else JSON.
    pub fn format(&self) -> FileFormat {
        let by_extension = self.file.as_ref().and_then(|f| f.extension()).is_some_and(|e| e == "toml");
        match self.format.as_deref() {
            Some("toml") => FileFormat::Toml,
            Some(_) => FileFormat::Json,
            None if by_extension => FileFormat::Toml,
            None => FileFormat::Json,
        }
    }

    /// The file sink's mode (default 0600).
    pub fn mode(&self) -> u32 {
        self.mode.as_deref().and_then(|m| u32::from_str_radix(m.trim_start_matches("0o"), 8).ok()).unwrap_or(0o600)
    }

    fn check(&self) -> Result<(), String> {
        if let Some(f) = &self.format
            && !matches!(f.as_str(), "json" | "toml")
        {
            return Err(format!("format must be json or toml, not {f:?}"));
        }
        if let Some(m) = &self.mode
            && !u32::from_str_radix(m.trim_start_matches("0o"), 8).is_ok_and(|m| m <= 0o777)
        {
            return Err(format!("mode must be octal permission bits like \"0640\", not {m:?}"));
        }
        if self.file.as_ref().is_some_and(|f| !f.is_absolute()) {
            return Err("file must be an absolute path".into());
        }
        if let Some(url) = &self.post_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err("post_url must be an http:// or https:// URL".into());
        }
        if self.on_change_timeout_s == Some(0) {
            return Err("on_change_timeout_s must be positive".into());
        }
        Ok(())
    }
}

/// A named action: an argv template whose `{param}` elements are replaced
/// by typed parameters, each as one whole argument (never via a shell).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    pub argv: Vec<String>,
    #[serde(default)]
    pub params: BTreeMap<String, ParamType>,
    pub timeout_s: Option<u32>,
    pub output_cap_bytes: Option<usize>,
    /// Variables added to the minimal command environment (protocol.md §5).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// A parameter's type, as written in `agent.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ParamType {
    /// `"string"`, `"int"`, `"bool"` or `"path"`.
    Kind(String),
    /// One of a fixed list of strings.
    OneOf(Vec<String>),
    /// `{ type = "string", pattern = "...", allow_leading_dash = true }`.
    Spec(ParamSpec),
}

/// The table form of a parameter type, for the options the short forms lack.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    /// `"string"`, `"int"`, `"bool"` or `"path"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A regular expression the whole value must match (`string` and `path`).
    pub pattern: Option<String>,
    /// Lets a `string` value begin with `-`. Off by default: such a value
    /// would be read as an option by most programs (`tar`, `find`, `ssh`…).
    #[serde(default)]
    pub allow_leading_dash: bool,
}

impl ParamType {
    /// The table form of a parameter type (a list has none).
    pub fn spec(&self) -> Option<ParamSpec> {
        match self {
            Self::Kind(k) => Some(ParamSpec { kind: k.clone(), ..ParamSpec::default() }),
            Self::Spec(s) => Some(s.clone()),
            Self::OneOf(_) => None,
        }
    }
}

impl ParamSpec {
    /// The compiled `pattern`, anchored at both ends.
    pub fn regex(&self) -> Result<Option<regex::Regex>, String> {
        self.pattern
            .as_deref()
            .map(|p| regex::Regex::new(&format!("^(?:{p})$")).map_err(|e| format!("pattern does not compile: {e}")))
            .transpose()
    }
}

/// Values given on the command line (or by `tether up`).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub server: Option<String>,
    pub enroll_token: Option<String>,
    pub device_flow: Option<bool>,
    pub name: Option<String>,
    pub labels: Labels,
    pub poll_wait_s: Option<u32>,
    pub heartbeat_s: Option<u64>,
    pub command_timeout_s: Option<u32>,
    pub max_concurrent_commands: Option<usize>,
    pub ca_file: Option<PathBuf>,
    /// `--sign-requests`: only ever turns signing on.
    pub sign_requests: Option<bool>,
    pub transport: Option<Transport>,
}

/// The effective configuration.
#[derive(Clone)]
pub struct AgentConfig {
    pub dir: PathBuf,
    pub server: String,
    pub enroll_token: Option<String>,
    /// Enroll through the RFC 8628 device flow when not enrolled and no
    /// enrollment token is given: an operator approves the printed code.
    pub device_flow: bool,
    /// Name reported at enrollment (default: the hostname).
    pub name: Option<String>,
    pub labels: Labels,
    pub poll_wait_s: u32,
    pub heartbeat_s: u64,
    /// Seconds between host metric collections; 0 = none.
    pub metrics_s: u64,
    /// `[metrics]`, checked.
    pub metrics: crate::metrics::Settings,
    pub backoff_base_s: u64,
    /// Upper bound on any command's run time.
    pub command_timeout_s: u32,
    pub max_concurrent_commands: usize,
    pub output_cap_bytes: usize,
    pub shutdown_grace_s: u64,
    pub ca_file: Option<PathBuf>,
    /// Sign every agent request with the agent's Ed25519 key (protocol.md §3).
    pub sign_requests: bool,
    /// What carries the stream (protocol.md §9): the WebSocket, long-poll, or
    /// the WebSocket with long-poll where it does not work.
    pub transport: Transport,
    pub allow_shell: bool,
    pub actions: BTreeMap<String, Action>,
    pub sinks: ConfigSinks,
    /// `[files] allowed_dirs`, resolved.
    pub file_dirs: Vec<PathBuf>,
    /// `[certs] dir`, resolved.
    pub certs_dir: PathBuf,
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("dir", &self.dir)
            .field("server", &self.server)
            .field("enroll_token", &self.enroll_token.as_ref().map(|_| "<redacted>"))
            .field("device_flow", &self.device_flow)
            .field("labels", &self.labels)
            .field("poll_wait_s", &self.poll_wait_s)
            .field("sign_requests", &self.sign_requests)
            .field("transport", &self.transport)
            .field("allow_shell", &self.allow_shell)
            .field("actions", &self.actions.keys().collect::<Vec<_>>())
            .field("file_dirs", &self.file_dirs)
            .field("certs_dir", &self.certs_dir)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{name}: {message}")]
    Invalid { name: String, message: String },
}

/// Reads `agent.toml` in `dir` (absent = empty).
pub fn read_file(dir: &Path) -> Result<FileConfig, ConfigError> {
    let path = dir.join("agent.toml");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(FileConfig::default()),
        Err(source) => return Err(ConfigError::Read { path, source }),
    };
    toml::from_str(&text).map_err(|e| ConfigError::Parse { path, message: e.to_string() })
}

/// `[metrics]` checked: known sources, spool limits that keep something.
fn metrics_settings(section: &MetricsSection) -> Result<crate::metrics::Settings, ConfigError> {
    let invalid = |name: &str, message: String| ConfigError::Invalid { name: name.into(), message };
    let sources = crate::metrics::sources(section.collect.as_deref()).map_err(|m| invalid("metrics.collect", m))?;
    let defaults = crate::metrics::SpoolLimits::default();
    let spool = crate::metrics::SpoolLimits {
        max_batches: section.spool_max_batches.unwrap_or(defaults.max_batches),
        max_bytes: section.spool_max_bytes.unwrap_or(defaults.max_bytes),
    };
    if spool.max_batches == 0 || spool.max_bytes == 0 {
        return Err(invalid("metrics.spool_max_batches/spool_max_bytes", "must be positive".into()));
    }
    Ok(crate::metrics::Settings { sources, spool })
}

fn parse_env<T: std::str::FromStr>(name: &str, value: Option<String>) -> Result<Option<T>, ConfigError> {
    value
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.parse().map_err(|_| ConfigError::Invalid { name: name.into(), message: format!("cannot parse {v:?}") })
        })
        .transpose()
}

/// A boolean from the environment: `1/true/yes/on` or `0/false/no/off`.
fn parse_bool(name: &str, value: Option<String>) -> Result<Option<bool>, ConfigError> {
    let Some(v) = value.filter(|v| !v.is_empty()) else { return Ok(None) };
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(Some(true)),
        "0" | "false" | "no" | "off" => Ok(Some(false)),
        _ => Err(ConfigError::Invalid { name: name.into(), message: format!("expected true or false, got {v:?}") }),
    }
}

/// `TETHER_TRANSPORT`: `auto`, `websocket` or `long-poll`.
fn parse_transport(value: Option<String>) -> Result<Option<Transport>, ConfigError> {
    value
        .filter(|v| !v.is_empty())
        .map(|v| v.parse().map_err(|message| ConfigError::Invalid { name: "TETHER_TRANSPORT".into(), message }))
        .transpose()
}

impl AgentConfig {
    /// Layers defaults < `file` < environment (`env` looks a variable up) < `flags`.
    pub fn resolve(
        dir: &Path,
        file: FileConfig,
        env: impl Fn(&str) -> Option<String>,
        flags: Overrides,
    ) -> Result<Self, ConfigError> {
        // TETHER_* wins over the status-panel alias of the same knob (protocol.md §16.1).
        let var = |name: &str, alias: Option<&str>| env(name).or_else(|| alias.and_then(&env));
        let mut labels = file.labels;
        if let Some(hash) = var("TETHER_DEPLOYMENT_HASH", Some("DEPLOYMENT_HASH")) {
            labels.insert("deployment".into(), hash);
        }
        labels.extend(flags.labels);
        tether_proto::agent::validate_labels(&labels)
            .map_err(|message| ConfigError::Invalid { name: "labels".into(), message })?;
        let default_server =
            if STATUS_PANEL_NAMES.iter().any(|n| env(n).is_some()) { STATUS_PANEL_SERVER } else { DEFAULT_SERVER };
        let poll_wait_env = match env("TETHER_POLL_WAIT_S") {
            Some(v) => parse_env("TETHER_POLL_WAIT_S", Some(v))?,
            // A status-panel agent may wait longer than the server's bound:
            // it waits the bound instead and polls again at once.
            None => {
                parse_env::<u32>("POLLING_TIMEOUT_SECS", env("POLLING_TIMEOUT_SECS"))?.map(|s| s.min(MAX_POLL_WAIT_S))
            }
        };
        let cfg = Self {
            dir: dir.to_owned(),
            server: flags
                .server
                .or(var("TETHER_SERVER", Some("DASHBOARD_URL")))
                .or(file.server)
                .unwrap_or_else(|| default_server.into()),
            enroll_token: flags.enroll_token.or(var("TETHER_ENROLL_TOKEN", None)).or(file.enroll_token),
            device_flow: flags
                .device_flow
                .or(parse_bool("TETHER_DEVICE_FLOW", var("TETHER_DEVICE_FLOW", None))?)
                .or(file.device_flow)
                .unwrap_or(false),
            name: flags.name.or(var("TETHER_AGENT_NAME", Some("AGENT_ID"))).or(file.name),
            labels,
            poll_wait_s: flags.poll_wait_s.or(poll_wait_env).or(file.poll_wait_s).unwrap_or(30),
            heartbeat_s: flags
                .heartbeat_s
                .or(parse_env("TETHER_HEARTBEAT_S", var("TETHER_HEARTBEAT_S", None))?)
                .or(file.heartbeat_s)
                .unwrap_or(30),
            metrics_s: file.metrics_s.unwrap_or(60),
            metrics: metrics_settings(&file.metrics)?,
            backoff_base_s: parse_env(
                "POLLING_BACKOFF_SECS",
                var("TETHER_BACKOFF_BASE_S", Some("POLLING_BACKOFF_SECS")),
            )?
            .or(file.backoff_base_s)
            .unwrap_or(1),
            command_timeout_s: flags
                .command_timeout_s
                .or(parse_env("COMMAND_TIMEOUT_SECS", var("TETHER_COMMAND_TIMEOUT_S", Some("COMMAND_TIMEOUT_SECS")))?)
                .or(file.command_timeout_s)
                .unwrap_or(tether_proto::command::DEFAULT_TIMEOUT_S),
            max_concurrent_commands: flags
                .max_concurrent_commands
                .or(parse_env("TETHER_MAX_CONCURRENT_COMMANDS", var("TETHER_MAX_CONCURRENT_COMMANDS", None))?)
                .or(file.max_concurrent_commands)
                .unwrap_or(4),
            output_cap_bytes: file.output_cap_bytes.unwrap_or(tether_proto::command::MAX_OUTPUT_BYTES),
            shutdown_grace_s: file.shutdown_grace_s.unwrap_or(30),
            ca_file: flags.ca_file.or(var("TETHER_CA_FILE", None).map(PathBuf::from)).or(file.ca_file),
            sign_requests: flags
                .sign_requests
                .or(parse_env::<bool>("TETHER_SIGN_REQUESTS", var("TETHER_SIGN_REQUESTS", None))?)
                .or(file.sign_requests)
                .unwrap_or(false),
            transport: flags
                .transport
                .or(parse_transport(var("TETHER_TRANSPORT", None))?)
                .or(file.transport)
                .unwrap_or_default(),
            allow_shell: file.allow_shell,
            actions: file.actions,
            sinks: file.config,
            file_dirs: file.files.allowed_dirs.unwrap_or_else(|| vec![dir.join("files")]),
            certs_dir: file.certs.dir.unwrap_or_else(|| dir.join("certs")),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid =
            |name: &str, message: &str| Err(ConfigError::Invalid { name: name.into(), message: message.into() });
        if !(self.server.starts_with("http://") || self.server.starts_with("https://")) {
            return invalid("server", "must be an http:// or https:// URL");
        }
        if self.poll_wait_s > MAX_POLL_WAIT_S {
            return invalid("poll_wait_s", "must be 0..=30");
        }
        if self.metrics_s > 86_400 {
            return invalid("metrics_s", "must be 0..=86400 (0 turns metrics off)");
        }
        if self.heartbeat_s == 0 || self.max_concurrent_commands == 0 || self.command_timeout_s == 0 {
            return invalid("heartbeat_s/max_concurrent_commands/command_timeout_s", "must be positive");
        }
        if self.output_cap_bytes > tether_proto::command::MAX_OUTPUT_BYTES {
            return invalid("output_cap_bytes", "must be at most 65536");
        }
        self.sinks.check().map_err(|message| ConfigError::Invalid { name: "config".into(), message })?;
        if let Some(dir) = self.file_dirs.iter().find(|d| !d.is_absolute()) {
            return invalid("files.allowed_dirs", &format!("{} must be an absolute path", dir.display()));
        }
        if !self.certs_dir.is_absolute() {
            return invalid("certs.dir", &format!("{} must be an absolute path", self.certs_dir.display()));
        }
        for (name, action) in &self.actions {
            if action.argv.is_empty() {
                return invalid(&format!("actions.{name}"), "argv must not be empty");
            }
            for (param, kind) in &action.params {
                let at = format!("actions.{name}.params.{param}");
                let Some(spec) = kind.spec() else { continue };
                if !matches!(spec.kind.as_str(), "string" | "int" | "bool" | "path") {
                    return invalid(&at, "type must be string, int, bool, path or a list");
                }
                if spec.pattern.is_some() && !matches!(spec.kind.as_str(), "string" | "path") {
                    return invalid(&at, "pattern applies to string and path parameters only");
                }
                if spec.allow_leading_dash && spec.kind != "string" {
                    return invalid(&at, "allow_leading_dash applies to string parameters only");
                }
                if let Err(message) = spec.regex() {
                    return invalid(&at, &message);
                }
            }
            for (key, value) in &action.env {
                let valid_key = key.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid_key || value.contains('\0') {
                    return invalid(
                        &format!("actions.{name}.env.{key}"),
                        "names are letters, digits and _ (not starting with a digit); values have no NUL",
                    );
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn layers_defaults_file_env_and_flags_in_order() {
        let file: FileConfig =
            toml::from_str("server = \"http://file:1\"\npoll_wait_s = 10\nheartbeat_s = 5").expect("toml");
        let dir = Path::new("/tmp/x");
        let cfg = AgentConfig::resolve(dir, file.clone(), env_of(&[]), Overrides::default()).expect("resolve");
        assert_eq!((cfg.server.as_str(), cfg.poll_wait_s, cfg.heartbeat_s), ("http://file:1", 10, 5));
        assert_eq!(cfg.max_concurrent_commands, 4);

        let env = env_of(&[("TETHER_SERVER", "http://env:2"), ("POLLING_TIMEOUT_SECS", "20")]);
        let cfg = AgentConfig::resolve(dir, file.clone(), env, Overrides::default()).expect("resolve");
        assert_eq!((cfg.server.as_str(), cfg.poll_wait_s), ("http://env:2", 20));

        let flags = Overrides { server: Some("http://flag:3".into()), poll_wait_s: Some(25), ..Default::default() };
        let env = env_of(&[("TETHER_SERVER", "http://env:2"), ("POLLING_TIMEOUT_SECS", "20")]);
        let cfg = AgentConfig::resolve(dir, file, env, flags).expect("resolve");
        assert_eq!((cfg.server.as_str(), cfg.poll_wait_s), ("http://flag:3", 25));
    }

    #[test]
    fn device_flow_layers_file_env_and_flag() {
        let dir = Path::new("/d");
        let off = AgentConfig::resolve(dir, FileConfig::default(), env_of(&[]), Overrides::default()).expect("ok");
        assert!(!off.device_flow);
        let file: FileConfig = toml::from_str("device_flow = true").expect("toml");
        let cfg = AgentConfig::resolve(dir, file.clone(), env_of(&[]), Overrides::default()).expect("ok");
        assert!(cfg.device_flow);
        let cfg =
            AgentConfig::resolve(dir, file, env_of(&[("TETHER_DEVICE_FLOW", "0")]), Overrides::default()).expect("ok");
        assert!(!cfg.device_flow, "the environment beats agent.toml");
        let flags = Overrides { device_flow: Some(true), ..Overrides::default() };
        let cfg = AgentConfig::resolve(dir, FileConfig::default(), env_of(&[("TETHER_DEVICE_FLOW", "no")]), flags)
            .expect("ok");
        assert!(cfg.device_flow, "the flag beats the environment");
        let on = AgentConfig::resolve(
            dir,
            FileConfig::default(),
            env_of(&[("TETHER_DEVICE_FLOW", "YES")]),
            Overrides::default(),
        )
        .expect("ok");
        assert!(on.device_flow);
        let err = AgentConfig::resolve(
            dir,
            FileConfig::default(),
            env_of(&[("TETHER_DEVICE_FLOW", "maybe")]),
            Overrides::default(),
        )
        .expect_err("not a boolean");
        assert!(err.to_string().contains("TETHER_DEVICE_FLOW"), "{err}");
    }

    #[test]
    fn ca_file_layers_file_then_env_then_flag() {
        let dir = Path::new("/d");
        let file: FileConfig = toml::from_str("ca_file = \"/etc/tether/file-ca.pem\"").expect("toml");
        let cfg = AgentConfig::resolve(dir, file.clone(), env_of(&[]), Overrides::default()).expect("ok");
        assert_eq!(cfg.ca_file, Some(PathBuf::from("/etc/tether/file-ca.pem")));
        let env = env_of(&[("TETHER_CA_FILE", "/env-ca.pem")]);
        let cfg = AgentConfig::resolve(dir, file.clone(), env, Overrides::default()).expect("ok");
        assert_eq!(cfg.ca_file, Some(PathBuf::from("/env-ca.pem")));
        let flags = Overrides { ca_file: Some("/flag-ca.pem".into()), ..Default::default() };
        let cfg = AgentConfig::resolve(dir, file, env_of(&[("TETHER_CA_FILE", "/env-ca.pem")]), flags).expect("ok");
        assert_eq!(cfg.ca_file, Some(PathBuf::from("/flag-ca.pem")));
    }

    #[test]
    fn status_panel_names_are_aliases_and_tether_names_win() {
        let env = env_of(&[
            ("DASHBOARD_URL", "http://seed:5000"),
            ("AGENT_ID", "printer-7"),
            ("DEPLOYMENT_HASH", "abc123"),
            ("COMMAND_TIMEOUT_SECS", "60"),
        ]);
        let cfg = AgentConfig::resolve(Path::new("/d"), FileConfig::default(), env, Overrides::default()).expect("ok");
        assert_eq!(cfg.server, "http://seed:5000");
        assert_eq!(cfg.name.as_deref(), Some("printer-7"));
        assert_eq!(cfg.labels.get("deployment").map(String::as_str), Some("abc123"));
        assert_eq!(cfg.command_timeout_s, 60);
        let env = env_of(&[("DASHBOARD_URL", "http://seed:5000"), ("TETHER_SERVER", "http://tether:8080")]);
        let cfg = AgentConfig::resolve(Path::new("/d"), FileConfig::default(), env, Overrides::default()).expect("ok");
        assert_eq!(cfg.server, "http://tether:8080");
    }

    #[test]
    fn status_panel_polling_names_and_default_dashboard() {
        let dir = Path::new("/d");
        let env = env_of(&[("POLLING_TIMEOUT_SECS", "25"), ("POLLING_BACKOFF_SECS", "5")]);
        let cfg = AgentConfig::resolve(dir, FileConfig::default(), env, Overrides::default()).expect("ok");
        assert_eq!((cfg.poll_wait_s, cfg.backoff_base_s), (25, 5));
        // Set the status-panel way without DASHBOARD_URL: the status panel's own default.
        assert_eq!(cfg.server, STATUS_PANEL_SERVER);
        let cfg = AgentConfig::resolve(dir, FileConfig::default(), env_of(&[("AGENT_ID", "a")]), Overrides::default())
            .expect("ok");
        assert_eq!(cfg.server, "http://localhost:5000");
        let file: FileConfig = toml::from_str("server = \"http://file:1\"").expect("toml");
        let cfg = AgentConfig::resolve(dir, file, env_of(&[("AGENT_ID", "a")]), Overrides::default()).expect("ok");
        assert_eq!(cfg.server, "http://file:1", "a configured server wins over the status panel's default");
        let cfg = AgentConfig::resolve(dir, FileConfig::default(), env_of(&[]), Overrides::default()).expect("ok");
        assert_eq!(cfg.server, DEFAULT_SERVER);

        // The status panel may wait longer than the server's bound; tether's own name may not.
        let env = env_of(&[("POLLING_TIMEOUT_SECS", "60")]);
        let cfg = AgentConfig::resolve(dir, FileConfig::default(), env, Overrides::default()).expect("ok");
        assert_eq!(cfg.poll_wait_s, 30);
        let env = env_of(&[("TETHER_POLL_WAIT_S", "60")]);
        let err = AgentConfig::resolve(dir, FileConfig::default(), env, Overrides::default()).expect_err("too long");
        assert!(err.to_string().contains("poll_wait_s"), "{err}");
        let env =
            env_of(&[("TETHER_POLL_WAIT_S", "10"), ("POLLING_TIMEOUT_SECS", "20"), ("TETHER_BACKOFF_BASE_S", "2")]);
        let cfg = AgentConfig::resolve(dir, FileConfig::default(), env, Overrides::default()).expect("ok");
        assert_eq!(cfg.poll_wait_s, 10, "TETHER_POLL_WAIT_S wins over its alias");
        let env = env_of(&[("TETHER_BACKOFF_BASE_S", "2"), ("POLLING_BACKOFF_SECS", "5")]);
        let cfg = AgentConfig::resolve(dir, FileConfig::default(), env, Overrides::default()).expect("ok");
        assert_eq!(cfg.backoff_base_s, 2, "TETHER_BACKOFF_BASE_S wins over its alias");
        let err = AgentConfig::resolve(
            dir,
            FileConfig::default(),
            env_of(&[("TETHER_POLL_WAIT_S", "x")]),
            Overrides::default(),
        )
        .expect_err("not a number");
        assert!(err.to_string().contains("TETHER_POLL_WAIT_S"), "the variable that is wrong is named: {err}");
    }

    #[test]
    fn sign_requests_is_off_by_default_and_layers_file_env_flag() {
        let dir = Path::new("/d");
        let cfg = AgentConfig::resolve(dir, FileConfig::default(), env_of(&[]), Overrides::default()).expect("ok");
        assert!(!cfg.sign_requests);
        let file: FileConfig = toml::from_str("sign_requests = true").expect("toml");
        let cfg = AgentConfig::resolve(dir, file.clone(), env_of(&[]), Overrides::default()).expect("ok");
        assert!(cfg.sign_requests);
        let env = env_of(&[("TETHER_SIGN_REQUESTS", "false")]);
        let cfg = AgentConfig::resolve(dir, file, env, Overrides::default()).expect("ok");
        assert!(!cfg.sign_requests, "environment beats the file");
        let env = env_of(&[("TETHER_SIGN_REQUESTS", "false")]);
        let flags = Overrides { sign_requests: Some(true), ..Default::default() };
        let cfg = AgentConfig::resolve(dir, FileConfig::default(), env, flags).expect("ok");
        assert!(cfg.sign_requests, "the flag beats the environment");
        let env = env_of(&[("TETHER_SIGN_REQUESTS", "yes")]);
        let err = AgentConfig::resolve(dir, FileConfig::default(), env, Overrides::default()).expect_err("bad bool");
        assert!(err.to_string().contains("TETHER_SIGN_REQUESTS"), "{err}");
    }

    #[test]
    fn transport_is_auto_by_default_and_layers_file_env_flag() {
        let dir = Path::new("/d");
        let cfg = AgentConfig::resolve(dir, FileConfig::default(), env_of(&[]), Overrides::default()).expect("ok");
        assert_eq!(cfg.transport, Transport::Auto);
        let file: FileConfig = toml::from_str("transport = \"long-poll\"").expect("toml");
        let cfg = AgentConfig::resolve(dir, file.clone(), env_of(&[]), Overrides::default()).expect("ok");
        assert_eq!(cfg.transport, Transport::LongPoll);
        let env = env_of(&[("TETHER_TRANSPORT", "websocket")]);
        let cfg = AgentConfig::resolve(dir, file.clone(), env, Overrides::default()).expect("ok");
        assert_eq!(cfg.transport, Transport::WebSocket, "the environment beats the file");
        let flags = Overrides { transport: Some(Transport::Auto), ..Default::default() };
        let cfg = AgentConfig::resolve(dir, file, env_of(&[("TETHER_TRANSPORT", "websocket")]), flags).expect("ok");
        assert_eq!(cfg.transport, Transport::Auto, "the flag beats the environment");
        let err = AgentConfig::resolve(
            dir,
            FileConfig::default(),
            env_of(&[("TETHER_TRANSPORT", "ws")]),
            Overrides::default(),
        )
        .expect_err("unknown transport");
        assert!(err.to_string().starts_with("TETHER_TRANSPORT: expected auto, websocket or long-poll"), "{err}");
        assert!(toml::from_str::<FileConfig>("transport = \"ws\"").is_err());
    }

    #[test]
    fn actions_parse_and_bad_values_are_named() {
        let file: FileConfig = toml::from_str(
            r#"
            allow_shell = true
            [actions.restart]
            argv = ["systemctl", "restart", "{service}"]
            params = { service = ["nginx", "redis"] }
            timeout_s = 30
            [actions.echo]
            argv = ["echo", "{text}", "{n}"]
            params = { text = "string", n = "int" }
            "#,
        )
        .expect("toml");
        let cfg = AgentConfig::resolve(Path::new("/d"), file, env_of(&[]), Overrides::default()).expect("ok");
        assert!(cfg.allow_shell);
        assert_eq!(cfg.actions["restart"].params["service"], ParamType::OneOf(vec!["nginx".into(), "redis".into()]));

        let bad: FileConfig = toml::from_str("[actions.x]\nargv = [\"a\"]\nparams = { p = \"float\" }").expect("toml");
        let err = AgentConfig::resolve(Path::new("/d"), bad, env_of(&[]), Overrides::default()).expect_err("bad type");
        assert!(err.to_string().contains("actions.x.params.p"), "{err}");
        let err = AgentConfig::resolve(
            Path::new("/d"),
            FileConfig::default(),
            env_of(&[("POLLING_TIMEOUT_SECS", "x")]),
            Overrides::default(),
        )
        .expect_err("bad env");
        assert!(err.to_string().contains("POLLING_TIMEOUT_SECS"), "{err}");
        assert!(toml::from_str::<FileConfig>("unknown_knob = 1").is_err());
    }

    #[test]
    fn files_and_certs_dirs_default_to_the_state_dir_and_must_be_absolute() {
        let dir = Path::new("/var/lib/tether");
        let cfg = AgentConfig::resolve(dir, FileConfig::default(), env_of(&[]), Overrides::default()).expect("ok");
        assert_eq!(cfg.file_dirs, [dir.join("files")]);
        assert_eq!(cfg.certs_dir, dir.join("certs"));
        let file: FileConfig = toml::from_str(
            "[files]\nallowed_dirs = [\"/etc/app\", \"/srv/www\"]\n[certs]\ndir = \"/etc/tether/certs\"",
        )
        .expect("toml");
        let cfg = AgentConfig::resolve(dir, file, env_of(&[]), Overrides::default()).expect("ok");
        assert_eq!(cfg.file_dirs, [PathBuf::from("/etc/app"), PathBuf::from("/srv/www")]);
        assert_eq!(cfg.certs_dir, PathBuf::from("/etc/tether/certs"));
        for (bad, name) in
            [("[files]\nallowed_dirs = [\"etc/app\"]", "files.allowed_dirs"), ("[certs]\ndir = \"certs\"", "certs.dir")]
        {
            let file: FileConfig = toml::from_str(bad).expect("toml");
            let err = AgentConfig::resolve(dir, file, env_of(&[]), Overrides::default()).expect_err(bad);
            assert!(err.to_string().starts_with(name), "{err}");
        }
        assert!(toml::from_str::<FileConfig>("[files]\nallowed = []").is_err());
    }

    #[test]
    fn metrics_default_to_every_source_each_minute_and_unknown_sources_are_named() {
        let dir = Path::new("/d");
        let cfg = AgentConfig::resolve(dir, FileConfig::default(), env_of(&[]), Overrides::default()).expect("ok");
        assert_eq!((cfg.metrics_s, &cfg.metrics), (60, &crate::metrics::Settings::default()));
        assert_eq!(cfg.metrics.spool, crate::metrics::SpoolLimits { max_batches: 1_000, max_bytes: 16 << 20 });

        let file: FileConfig = toml::from_str(
            "metrics_s = 0\n[metrics]\ncollect = [\"load\", \"disk\"]\nspool_max_batches = 10\nspool_max_bytes = 4096",
        )
        .expect("toml");
        let cfg = AgentConfig::resolve(dir, file, env_of(&[]), Overrides::default()).expect("ok");
        assert_eq!(cfg.metrics_s, 0, "0 turns collection off");
        use crate::metrics::Source;
        assert_eq!(cfg.metrics.sources, [Source::Load, Source::Disk]);
        assert_eq!(cfg.metrics.spool, crate::metrics::SpoolLimits { max_batches: 10, max_bytes: 4096 });

        for (bad, name) in [
            (
                "[metrics]\ncollect = [\"cpu\", \"temperature\"]",
                "metrics.collect: unknown metric source \"temperature\"",
            ),
            ("[metrics]\nspool_max_batches = 0", "metrics.spool_max_batches"),
            ("metrics_s = 86401", "metrics_s"),
        ] {
            let file: FileConfig = toml::from_str(bad).expect("toml");
            let err = AgentConfig::resolve(dir, file, env_of(&[]), Overrides::default()).expect_err(bad);
            assert!(err.to_string().starts_with(name), "{err}");
        }
        assert!(toml::from_str::<FileConfig>("[metrics]\ninterval = 5").is_err());
    }

    #[test]
    fn the_shipped_example_agent_toml_is_valid() {
        let file: FileConfig =
            toml::from_str(include_str!("../../../deploy/agent.toml.example")).expect("the example parses");
        let cfg = AgentConfig::resolve(Path::new("/d"), file, env_of(&[]), Overrides::default()).expect("and resolves");
        assert!(!cfg.allow_shell);
        assert_eq!(cfg.actions["backup-db"].env.get("PGHOST").map(String::as_str), Some("/run/postgresql"));
        let unit = cfg.actions["unit-logs"].params["unit"].spec().expect("a table");
        assert!(unit.regex().expect("compiles").is_some_and(|re| re.is_match("nginx.service") && !re.is_match("x")));
        // The commented-out [config] block is valid once uncommented.
        let example = include_str!("../../../deploy/agent.toml.example");
        let block: String = example
            .lines()
            .skip_while(|l| *l != "# [config]")
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .filter(|l| !l.trim_start().starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        let file: FileConfig = toml::from_str(&block).expect("the [config] example parses");
        let cfg = AgentConfig::resolve(Path::new("/d"), file, env_of(&[]), Overrides::default()).expect("and resolves");
        assert_eq!((cfg.sinks.format(), cfg.sinks.mode()), (FileFormat::Toml, 0o640));
        assert_eq!(cfg.sinks.post_url.as_deref(), Some("http://127.0.0.1:8082/config"));
        // So is the commented-out [metrics] block, and it says the defaults.
        let block: String = example
            .lines()
            .skip_while(|l| *l != "# [metrics]")
            .take_while(|l| !l.is_empty())
            .map(|l| format!("{}\n", l.strip_prefix("# ").unwrap_or(l)))
            .collect();
        let file: FileConfig = toml::from_str(&block).expect("the [metrics] example parses");
        let cfg = AgentConfig::resolve(Path::new("/d"), file, env_of(&[]), Overrides::default()).expect("and resolves");
        assert_eq!(cfg.metrics, crate::metrics::Settings::default());
    }
}
