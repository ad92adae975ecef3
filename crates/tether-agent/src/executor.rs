//! What a command may run (protocol.md §5): the allow-list decision and the
//! process runner. Nothing here goes through a shell unless `allow_shell`
//! is set in the local `agent.toml` and the command is `shell`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tether_proto::command::{CommandStatus, ResultReport};
use tether_proto::signal::CommandQueued;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, ParamSpec, ParamType};

/// Built-in commands, answered by the agent itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    Ping,
    Sysinfo,
    ConfigReload,
    AgentRestart,
}

/// What running a command means on this agent.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    Builtin(Builtin),
    Process(ProcessSpec),
    Reject(String),
}

/// A process to run: its argv (never through a shell unless it is `shell`),
/// its whole environment, and its limits.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessSpec {
    pub argv: Vec<String>,
    /// The complete environment; nothing else is inherited.
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
    pub output_cap: usize,
}

/// `PATH` when the agent has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The program that supervises each command: this very binary, started as
/// the exec shim (see [`crate::shim`]). `/proc/self/exe` still works after
/// the binary on disk was replaced by an upgrade.
pub const SELF_EXE: &str = "/proc/self/exe";

/// The minimal command environment (protocol.md §5): `PATH`, `HOME`, `LANG`
/// from the agent's environment (`agent_env`) or defaults, `TZ` when the
/// agent has one (otherwise the system zone applies), then the action's own
/// `env`. Nothing else of the agent's environment (enrollment token, server
/// URL…) reaches a command.
pub fn command_env(
    agent_env: impl Fn(&str) -> Option<String>,
    action_env: &BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let mut env = BTreeMap::new();
    for (key, default) in [("PATH", Some(DEFAULT_PATH)), ("HOME", Some("/")), ("LANG", Some("C.UTF-8")), ("TZ", None)] {
        let value = agent_env(key).filter(|v| !v.is_empty() && !v.contains('\0')).or(default.map(str::to_owned));
        if let Some(v) = value {
            env.insert(key.to_owned(), v);
        }
    }
    env.extend(action_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.into_iter().collect()
}

/// Decides how (and whether) `cmd` runs here.
pub fn plan(cfg: &AgentConfig, cmd: &CommandQueued) -> Plan {
    let timeout_s = cmd.timeout_s.min(cfg.command_timeout_s).max(1);
    let agent_env = |k: &str| std::env::var(k).ok();
    match cmd.name.as_str() {
        "ping" => Plan::Builtin(Builtin::Ping),
        "sysinfo" => Plan::Builtin(Builtin::Sysinfo),
        "config.reload" => Plan::Builtin(Builtin::ConfigReload),
        "agent.restart" => Plan::Builtin(Builtin::AgentRestart),
        "shell" if !cfg.allow_shell => {
            Plan::Reject("shell is disabled on this agent (set allow_shell = true in its agent.toml)".into())
        }
        "shell" => match cmd.args.get("script").and_then(Value::as_str) {
            Some(script) if !script.contains('\0') => Plan::Process(ProcessSpec {
                argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
                env: command_env(agent_env, &BTreeMap::new()),
                timeout: Duration::from_secs(timeout_s.into()),
                output_cap: cfg.output_cap_bytes,
            }),
            _ => Plan::Reject("shell needs args.script (a string)".into()),
        },
        name => match cfg.actions.get(name) {
            Some(action) => match substitute(&action.argv, &action.params, &cmd.args) {
                Ok(argv) => Plan::Process(ProcessSpec {
                    argv,
                    env: command_env(agent_env, &action.env),
                    timeout: Duration::from_secs(action.timeout_s.unwrap_or(timeout_s).min(timeout_s).max(1).into()),
                    output_cap: action.output_cap_bytes.unwrap_or(cfg.output_cap_bytes).min(cfg.output_cap_bytes),
                }),
                Err(reason) => Plan::Reject(reason),
            },
            None => Plan::Reject(format!("{name:?} is not a built-in or an action configured on this agent")),
        },
    }
}

/// How much of a hook's output is kept: only its stderr is shown, in the
/// failure it causes.
pub const HOOK_OUTPUT_CAP: usize = 4096;

/// A named action run as a hook after a managed file or certificate changed
/// (protocol.md §7): the server names it, but only the local `agent.toml`
/// defines it. It gets no parameters, so an action that needs some cannot be
/// a hook. `extra` is added to its environment (what changed, where).
pub fn hook(cfg: &AgentConfig, name: &str, extra: &BTreeMap<String, String>) -> Result<ProcessSpec, String> {
    let action =
        cfg.actions.get(name).ok_or_else(|| format!("hook {name:?} is not an action in this agent's agent.toml"))?;
    let argv = substitute(&action.argv, &action.params, &Value::Null).map_err(|e| format!("hook {name:?}: {e}"))?;
    let mut env = action.env.clone();
    env.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    let timeout_s = action.timeout_s.unwrap_or(cfg.command_timeout_s).min(cfg.command_timeout_s).max(1);
    Ok(ProcessSpec {
        argv,
        env: command_env(|k| std::env::var(k).ok(), &env),
        timeout: Duration::from_secs(timeout_s.into()),
        output_cap: HOOK_OUTPUT_CAP,
    })
}

/// Runs a hook under the exec shim; the error says why it failed (`label`
/// first) with what it wrote to stderr. Cancelling `stop` kills it.
pub async fn run_hook(spec: &ProcessSpec, label: &str, stop: &CancellationToken) -> Result<(), String> {
    let report = run_process(Path::new(SELF_EXE), spec, stop).await;
    if report.status == CommandStatus::Succeeded {
        return Ok(());
    }
    let why = report.reason.unwrap_or_else(|| match report.exit_code {
        Some(code) => format!("exited {code}"),
        None => "failed".into(),
    });
    let stderr = report.stderr.trim();
    Err(if stderr.is_empty() { format!("{label} {why}") } else { format!("{label} {why}: {stderr}") })
}

/// Fills `{param}` argv elements with checked, typed parameters. A
/// placeholder must be a whole element, so a value is always exactly one
/// argument.
fn substitute(template: &[String], params: &BTreeMap<String, ParamType>, args: &Value) -> Result<Vec<String>, String> {
    let empty = serde_json::Map::new();
    let args = match args {
        Value::Object(m) => m,
        Value::Null => &empty,
        _ => return Err("args must be an object".into()),
    };
    if let Some(unknown) = args.keys().find(|k| !params.contains_key(*k)) {
        return Err(format!("unknown parameter {unknown:?}"));
    }
    let mut values = BTreeMap::new();
    for (name, kind) in params {
        let value = args.get(name).ok_or_else(|| format!("missing parameter {name:?}"))?;
        let text = check_param(name, kind, value)?;
        values.insert(format!("{{{name}}}"), text);
    }
    Ok(template.iter().map(|el| values.get(el).cloned().unwrap_or_else(|| el.clone())).collect())
}

/// One parameter value as an argument, or why it is refused.
fn check_param(name: &str, kind: &ParamType, value: &Value) -> Result<String, String> {
    let spec = match kind {
        ParamType::OneOf(allowed) => {
            return match value {
                Value::String(s) if allowed.contains(s) => Ok(s.clone()),
                _ => Err(format!("parameter {name:?} must be one of {allowed:?}")),
            };
        }
        ParamType::Kind(k) => ParamSpec { kind: k.clone(), ..ParamSpec::default() },
        ParamType::Spec(s) => s.clone(),
    };
    let text = match (spec.kind.as_str(), value) {
        ("string" | "path", Value::String(s)) => s.clone(),
        ("int", Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
        ("bool", Value::Bool(b)) => b.to_string(),
        (k, _) => return Err(format!("parameter {name:?} must be a {k}")),
    };
    if text.contains('\0') {
        return Err(format!("parameter {name:?} contains a NUL byte"));
    }
    if spec.kind == "string" && text.starts_with('-') && !spec.allow_leading_dash {
        return Err(format!(
            "parameter {name:?} begins with \"-\" and would be read as an option; \
             the action's agent.toml must set allow_leading_dash = true for it"
        ));
    }
    if spec.kind == "path" {
        let path = std::path::Path::new(&text);
        if !path.is_absolute() || path.components().any(|c| c == std::path::Component::ParentDir) {
            return Err(format!("parameter {name:?} must be an absolute path without \"..\""));
        }
    }
    // The pattern compiled when the configuration was loaded.
    if let Some(re) = spec.regex()?
        && !re.is_match(&text)
    {
        return Err(format!("parameter {name:?} does not match the pattern {:?}", spec.pattern.unwrap_or_default()));
    }
    Ok(text)
}

/// Reads all of `pipe` into `kept`, keeping at most `cap` bytes; the rest is
/// drained so the child never blocks on a full pipe. Returns whether
/// anything was cut.
async fn read_capped(mut pipe: impl AsyncRead + Unpin, cap: usize, kept: Arc<Mutex<Vec<u8>>>) -> bool {
    let mut chunk = [0u8; 8192];
    let mut truncated = false;
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let mut kept = kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&chunk[..n.min(room)]);
                truncated |= n > room;
            }
        }
    }
    truncated
}

/// A task reading one output pipe into a buffer the runner keeps.
#[derive(Debug)]
pub struct OutputReader {
    task: tokio::task::JoinHandle<bool>,
    kept: Arc<Mutex<Vec<u8>>>,
}

impl OutputReader {
    pub fn spawn(pipe: impl AsyncRead + Unpin + Send + 'static, cap: usize) -> Self {
        let kept = Arc::new(Mutex::new(Vec::new()));
        Self { task: tokio::spawn(read_capped(pipe, cap, kept.clone())), kept }
    }

    /// What was read, once the pipe ends or `grace` passes. After the grace
    /// the task is aborted (and its end of the pipe closed): a process that
    /// still holds the pipe cannot keep the command's result waiting.
    pub async fn finish(mut self, grace: Duration) -> (Vec<u8>, bool) {
        let truncated = match tokio::time::timeout(grace, &mut self.task).await {
            Ok(done) => done.unwrap_or(false),
            Err(_) => {
                self.task.abort();
                // Resolves once the future (and the pipe) has been dropped.
                let _ = (&mut self.task).await;
                true
            }
        };
        let kept = std::mem::take(&mut *self.kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        (kept, truncated)
    }
}

/// How long the readers get to reach the end of the pipes after the process
/// is gone; the shim has killed every writer by then, so this is only for a
/// process that escaped it.
const READER_GRACE: Duration = Duration::from_secs(1);

/// How long the shim gets to kill and reap the command's processes once the
/// lifeline is closed, before its own process group is SIGKILLed.
const SHIM_GRACE: Duration = Duration::from_secs(5);

fn kill_group(pgid: Option<u32>) {
    if let Some(pid) = pgid.and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

/// Runs `spec` under the exec shim `shim` (normally [`SELF_EXE`]) with
/// exactly `spec.env`; on timeout or cancel every process the command
/// started is killed, including any that called `setsid`.
pub async fn run_process(shim: &Path, spec: &ProcessSpec, cancel: &CancellationToken) -> ResultReport {
    let started = time::OffsetDateTime::now_utc();
    let mut report = ResultReport::new(CommandStatus::Failed);
    report.started_at = Some(started);
    let fail = |mut report: ResultReport, reason: String| {
        report.reason = Some(reason);
        report.finished_at = Some(time::OffsetDateTime::now_utc());
        report
    };
    if spec.argv.is_empty() {
        return fail(report, "empty argv".into());
    }
    let (ours, theirs) = match std::os::unix::net::UnixStream::pair() {
        Ok(pair) => pair,
        Err(e) => return fail(report, format!("cannot create the command's lifeline: {e}")),
    };
    let lifeline = ours.set_nonblocking(true).and_then(|()| tokio::net::UnixStream::from_std(ours));
    let mut lifeline = match lifeline {
        Ok(l) => Some(l),
        Err(e) => return fail(report, format!("cannot create the command's lifeline: {e}")),
    };
    let mut child = match tokio::process::Command::new(shim)
        .arg(crate::shim::ARG)
        .args(&spec.argv)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return fail(report, format!("cannot start the exec shim {}: {e}", shim.display())),
    };
    let pgid = child.id();
    let out = OutputReader::spawn(child.stdout.take().expect("stdout is piped"), spec.output_cap);
    let err = OutputReader::spawn(child.stderr.take().expect("stderr is piped"), spec.output_cap);
    let timeout = spec.timeout;
    let (status, exit) = tokio::select! {
        exit = child.wait() => (None, exit.ok()),
        _ = tokio::time::sleep(timeout) => {
            (Some((CommandStatus::TimedOut, format!("timed out after {} s; every process it started was killed", timeout.as_secs()))), None)
        }
        _ = cancel.cancelled() => {
            (Some((CommandStatus::Cancelled, "cancelled; every process it started was killed".to_owned())), None)
        }
    };
    let exit = match exit {
        Some(exit) => Some(exit),
        None => {
            // Closing the lifeline makes the shim kill the command's whole tree.
            drop(lifeline.take());
            match tokio::time::timeout(SHIM_GRACE, child.wait()).await {
                Ok(exit) => exit.ok(),
                Err(_) => {
                    kill_group(pgid);
                    child.wait().await.ok()
                }
            }
        }
    };
    let (stdout, cut_out) = out.finish(READER_GRACE).await;
    let (stderr, cut_err) = err.finish(READER_GRACE).await;
    report.stdout = String::from_utf8_lossy(&stdout).into_owned();
    report.stderr = String::from_utf8_lossy(&stderr).into_owned();
    report.truncated = cut_out || cut_err;
    report.exit_code = exit.and_then(|s| s.code());
    report.finished_at = Some(time::OffsetDateTime::now_utc());
    match status {
        Some((s, reason)) => {
            report.status = s;
            report.reason = Some(reason);
        }
        None if report.exit_code == Some(0) => report.status = CommandStatus::Succeeded,
        None => {
            report.status = CommandStatus::Failed;
            if report.exit_code == Some(crate::shim::SPAWN_FAILED)
                && let Some(why) = spawn_error(lifeline.take()).await
            {
                report.exit_code = None;
                report.reason = Some(why);
            } else if report.exit_code.is_none() {
                report.reason = Some("killed by a signal".into());
            }
        }
    }
    report
}

/// The shim's `cannot start …` line, if it wrote one before exiting.
async fn spawn_error(lifeline: Option<tokio::net::UnixStream>) -> Option<String> {
    let mut lifeline = lifeline?;
    let mut text = Vec::new();
    // The shim has exited, so its end is closed and this ends at once.
    let read = tokio::time::timeout(READER_GRACE, (&mut lifeline).take(4096).read_to_end(&mut text)).await;
    read.ok()?.ok()?;
    let line = String::from_utf8_lossy(&text).trim().to_owned();
    (!line.is_empty()).then_some(line)
}

/// A rejected command's result.
pub fn rejected(reason: String) -> ResultReport {
    let mut r = ResultReport::new(CommandStatus::Rejected);
    r.reason = Some(reason);
    r
}

/// `ping`
pub fn ping() -> ResultReport {
    let mut r = ResultReport::new(CommandStatus::Succeeded);
    r.exit_code = Some(0);
    r.stdout = "pong\n".into();
    r
}

/// `sysinfo`: facts read from the OS, no external tools.
pub fn sysinfo() -> ResultReport {
    let read = |p: &str| std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned());
    let meminfo = read("/proc/meminfo").unwrap_or_default();
    let mem = |key: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    let uptime = read("/proc/uptime").and_then(|u| u.split_whitespace().next()?.parse::<f64>().ok());
    let mut r = ResultReport::new(CommandStatus::Succeeded);
    r.exit_code = Some(0);
    r.output = json!({
        "hostname": read("/proc/sys/kernel/hostname"),
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
        "kernel": read("/proc/sys/kernel/osrelease"),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "mem_total_bytes": mem("MemTotal:"),
        "mem_available_bytes": mem("MemAvailable:"),
        "uptime_s": uptime.map(|u| u as u64),
        "agent_version": env!("CARGO_PKG_VERSION"),
    });
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FileConfig, Overrides};
    use tether_proto::CommandId;

    fn cfg(toml_text: &str) -> AgentConfig {
        let file: FileConfig = toml::from_str(toml_text).expect("toml");
        AgentConfig::resolve(std::path::Path::new("/d"), file, |_| None, Overrides::default()).expect("config")
    }

    fn cmd(name: &str, args: Value) -> CommandQueued {
        CommandQueued {
            command_id: CommandId::new(),
            name: name.into(),
            args,
            timeout_s: 60,
            priority: 5,
            expires_at_ms: None,
        }
    }

    #[test]
    fn allow_list_decides_built_ins_actions_shell_and_rejections() {
        let c = cfg(
            "[actions.greet]\nargv = [\"echo\", \"hello\", \"{who}\", \"{n}\"]\nparams = { who = \"string\", n = \"int\" }",
        );
        assert_eq!(plan(&c, &cmd("ping", json!({}))), Plan::Builtin(Builtin::Ping));
        let argv = argv_of(plan(&c, &cmd("greet", json!({"who": "a b; rm -rf /", "n": 3}))));
        assert_eq!(argv, ["echo", "hello", "a b; rm -rf /", "3"], "a value is one whole argument");
        assert!(
            matches!(plan(&c, &cmd("greet", json!({"who": "x"}))), Plan::Reject(r) if r.contains("missing parameter \"n\""))
        );
        assert!(
            matches!(plan(&c, &cmd("greet", json!({"who": "x", "n": "3"}))), Plan::Reject(r) if r.contains("must be a int"))
        );
        assert!(
            matches!(plan(&c, &cmd("greet", json!({"who": "x", "n": 1, "extra": 1}))), Plan::Reject(r) if r.contains("unknown parameter"))
        );
        assert!(
            matches!(plan(&c, &cmd("shell", json!({"script": "id"}))), Plan::Reject(r) if r.contains("shell is disabled"))
        );
        assert!(matches!(plan(&c, &cmd("rm", json!({}))), Plan::Reject(_)));
        let shell = cfg("allow_shell = true");
        assert!(matches!(plan(&shell, &cmd("shell", json!({"script": "id"}))), Plan::Process(_)));
    }

    #[test]
    fn a_hook_is_a_local_action_without_parameters() {
        let c = cfg(
            "command_timeout_s = 60\n[actions.reload]\nargv = [\"systemctl\", \"reload\", \"nginx\"]\ntimeout_s = 600\n\
             [actions.restart]\nargv = [\"systemctl\", \"restart\", \"{unit}\"]\nparams = { unit = \"string\" }",
        );
        let extra = BTreeMap::from([("TETHER_FILE".to_owned(), "/etc/nginx/site.conf".to_owned())]);
        let spec = hook(&c, "reload", &extra).expect("an action");
        assert_eq!(spec.argv, ["systemctl", "reload", "nginx"]);
        assert_eq!(spec.timeout, Duration::from_secs(60), "capped by command_timeout_s");
        assert!(spec.env.contains(&("TETHER_FILE".to_owned(), "/etc/nginx/site.conf".to_owned())));
        let err = hook(&c, "reload-apache", &extra).expect_err("unknown");
        assert!(err.contains("\"reload-apache\" is not an action"), "{err}");
        let err = hook(&c, "restart", &extra).expect_err("needs a parameter");
        assert!(err.contains("missing parameter \"unit\""), "{err}");
    }

    #[test]
    fn enum_parameters_only_accept_listed_values() {
        let c =
            cfg("[actions.restart]\nargv = [\"systemctl\", \"restart\", \"{svc}\"]\nparams = { svc = [\"nginx\"] }");
        assert!(matches!(plan(&c, &cmd("restart", json!({"svc": "nginx"}))), Plan::Process(_)));
        assert!(matches!(plan(&c, &cmd("restart", json!({"svc": "sshd"}))), Plan::Reject(_)));
    }

    fn argv_of(plan: Plan) -> Vec<String> {
        match plan {
            Plan::Process(spec) => spec.argv,
            other => panic!("expected a process, got {other:?}"),
        }
    }

    fn reason_of(plan: Plan) -> String {
        match plan {
            Plan::Reject(reason) => reason,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn a_string_parameter_beginning_with_a_dash_is_refused_unless_allowed_for_it() {
        let c = cfg(r#"
            [actions.pack]
            argv = ["tar", "-cf", "/tmp/out.tar", "{what}"]
            params = { what = "string" }
            [actions.grep]
            argv = ["grep", "{flags}", "{word}", "/var/log/syslog"]
            params = { flags = { type = "string", allow_leading_dash = true }, word = "string" }
        "#);
        let reason = reason_of(plan(&c, &cmd("pack", json!({"what": "--checkpoint-action=exec=id"}))));
        assert!(reason.contains("\"what\" begins with \"-\"") && reason.contains("allow_leading_dash"), "{reason}");
        assert!(reason_of(plan(&c, &cmd("pack", json!({"what": "-oProxyCommand=id"})))).contains("begins with"));
        assert_eq!(argv_of(plan(&c, &cmd("pack", json!({"what": "a-b"})))).last().map(String::as_str), Some("a-b"));
        // Allowed for `flags` only: `word` keeps the rule.
        let argv = argv_of(plan(&c, &cmd("grep", json!({"flags": "-i", "word": "error"}))));
        assert_eq!(argv[1], "-i");
        assert!(
            reason_of(plan(&c, &cmd("grep", json!({"flags": "-i", "word": "-f/etc/shadow"})))).contains("\"word\"")
        );
    }

    #[test]
    fn pattern_parameters_must_match_whole() {
        let c = cfg(r#"
            [actions.unit]
            argv = ["systemctl", "status", "{unit}"]
            params = { unit = { type = "string", pattern = "[a-z0-9-]+\\.service" } }
        "#);
        assert_eq!(argv_of(plan(&c, &cmd("unit", json!({"unit": "nginx.service"}))))[2], "nginx.service");
        for bad in ["nginx.service; id", "x nginx.service", "NGINX.service", ""] {
            let reason = reason_of(plan(&c, &cmd("unit", json!({"unit": bad}))));
            assert!(reason.contains("does not match the pattern"), "{bad:?}: {reason}");
        }
        let bad: FileConfig =
            toml::from_str("[actions.x]\nargv = [\"a\"]\nparams = { p = { type = \"string\", pattern = \"(\" } }")
                .expect("toml");
        let err = AgentConfig::resolve(std::path::Path::new("/d"), bad, |_| None, Overrides::default())
            .expect_err("a pattern that does not compile");
        assert!(err.to_string().contains("actions.x.params.p") && err.to_string().contains("pattern"), "{err}");
    }

    #[test]
    fn path_parameters_are_absolute_without_parent_components() {
        let c = cfg(r#"
            [actions.du]
            argv = ["du", "-sh", "{dir}"]
            params = { dir = "path" }
            [actions.logs]
            argv = ["tail", "{file}"]
            params = { file = { type = "path", pattern = "/var/log/.*" } }
        "#);
        assert_eq!(argv_of(plan(&c, &cmd("du", json!({"dir": "/var/lib/tether"}))))[2], "/var/lib/tether");
        for bad in ["var/lib", "/var/../etc/shadow", "/var/lib/..", "-rf", "", "./x"] {
            let reason = reason_of(plan(&c, &cmd("du", json!({"dir": bad}))));
            assert!(reason.contains("absolute path"), "{bad:?}: {reason}");
        }
        assert!(reason_of(plan(&c, &cmd("du", json!({"dir": "/a\u{0}b"})))).contains("NUL"));
        assert!(reason_of(plan(&c, &cmd("du", json!({"dir": 7})))).contains("must be a path"));
        assert_eq!(argv_of(plan(&c, &cmd("logs", json!({"file": "/var/log/syslog"}))))[1], "/var/log/syslog");
        assert!(reason_of(plan(&c, &cmd("logs", json!({"file": "/etc/shadow"})))).contains("pattern"));
    }

    #[test]
    fn parameter_options_that_cannot_apply_are_configuration_errors() {
        for (params, needle) in [
            ("p = { type = \"int\", allow_leading_dash = true }", "allow_leading_dash"),
            ("p = { type = \"bool\", pattern = \"x\" }", "pattern"),
            ("p = { type = \"float\" }", "type must be"),
        ] {
            let file: FileConfig =
                toml::from_str(&format!("[actions.x]\nargv = [\"a\"]\nparams = {{ {params} }}")).expect("toml");
            let err = AgentConfig::resolve(std::path::Path::new("/d"), file, |_| None, Overrides::default())
                .expect_err(params);
            assert!(err.to_string().contains(needle), "{params}: {err}");
        }
        let file: FileConfig = toml::from_str("[actions.x]\nargv = [\"a\"]\nenv = { \"A=B\" = \"c\" }").expect("toml");
        let err = AgentConfig::resolve(std::path::Path::new("/d"), file, |_| None, Overrides::default())
            .expect_err("bad env name");
        assert!(err.to_string().contains("actions.x.env"), "{err}");
    }

    #[test]
    fn the_command_environment_is_minimal_plus_the_action_env() {
        let agent = |k: &str| match k {
            "PATH" => Some("/opt/bin:/usr/bin".to_owned()),
            "TETHER_ENROLL_TOKEN" => Some("secret".to_owned()),
            "LANG" => Some(String::new()),
            _ => None,
        };
        let extra =
            BTreeMap::from([("PGHOST".to_owned(), "/run/pg".to_owned()), ("HOME".to_owned(), "/srv".to_owned())]);
        let env = command_env(agent, &extra);
        let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["HOME", "LANG", "PATH", "PGHOST"], "TZ only when the agent has one; nothing else");
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("PATH"), Some("/opt/bin:/usr/bin"));
        assert_eq!(get("HOME"), Some("/srv"), "the action's env wins");
        assert_eq!(get("LANG"), Some("C.UTF-8"), "an empty value falls back to the default");
        let c = cfg("allow_shell = true");
        let Plan::Process(spec) = plan(&c, &cmd("shell", json!({"script": "env"}))) else { panic!("shell runs") };
        assert!(spec.env.iter().all(|(k, _)| !k.starts_with("TETHER_")), "{:?}", spec.env);
    }

    #[tokio::test]
    async fn a_reader_gives_up_on_a_pipe_held_open_and_closes_its_end() {
        let (mut writer, reader) = tokio::net::UnixStream::pair().expect("pair");
        tokio::io::AsyncWriteExt::write_all(&mut writer, b"partial").await.expect("write");
        let reader = OutputReader::spawn(reader, 1024);
        // `writer` stays open, as a surviving grandchild would keep stdout.
        let (kept, truncated) = reader.finish(Duration::from_millis(200)).await;
        assert_eq!(kept, b"partial", "what was read before the grace ended is kept");
        assert!(truncated, "output that may have been cut is flagged");
        // The reader is gone: its end of the pipe is closed.
        let mut buf = [0u8; 1];
        let n = tokio::io::AsyncReadExt::read(&mut writer, &mut buf).await.expect("read");
        assert_eq!(n, 0, "the reader's end was dropped");
    }
}
