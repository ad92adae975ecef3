//! What a command may run (SPEC §5): the allow-list decision and the
//! process runner. Nothing here goes through a shell unless `allow_shell`
//! is set in the local `agent.toml` and the command is `shell`.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tether_proto::command::{CommandStatus, ResultReport};
use tether_proto::signal::CommandQueued;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, ParamType};

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
    Process { argv: Vec<String>, timeout: Duration, output_cap: usize },
    Reject(String),
}

/// Decides how (and whether) `cmd` runs here.
pub fn plan(cfg: &AgentConfig, cmd: &CommandQueued) -> Plan {
    let timeout_s = cmd.timeout_s.min(cfg.command_timeout_s).max(1);
    match cmd.name.as_str() {
        "ping" => Plan::Builtin(Builtin::Ping),
        "sysinfo" => Plan::Builtin(Builtin::Sysinfo),
        "config.reload" => Plan::Builtin(Builtin::ConfigReload),
        "agent.restart" => Plan::Builtin(Builtin::AgentRestart),
        "shell" if !cfg.allow_shell => {
            Plan::Reject("shell is disabled on this agent (set allow_shell = true in its agent.toml)".into())
        }
        "shell" => match cmd.args.get("script").and_then(Value::as_str) {
            Some(script) if !script.contains('\0') => Plan::Process {
                argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
                timeout: Duration::from_secs(timeout_s.into()),
                output_cap: cfg.output_cap_bytes,
            },
            _ => Plan::Reject("shell needs args.script (a string)".into()),
        },
        name => match cfg.actions.get(name) {
            Some(action) => match substitute(&action.argv, &action.params, &cmd.args) {
                Ok(argv) => Plan::Process {
                    argv,
                    timeout: Duration::from_secs(action.timeout_s.unwrap_or(timeout_s).min(timeout_s).max(1).into()),
                    output_cap: action.output_cap_bytes.unwrap_or(cfg.output_cap_bytes).min(cfg.output_cap_bytes),
                },
                Err(reason) => Plan::Reject(reason),
            },
            None => Plan::Reject(format!("{name:?} is not a built-in or an action configured on this agent")),
        },
    }
}

/// Fills `{param}` argv elements with checked, typed parameters. A
/// placeholder must be a whole element, so a value is always exactly one
/// argument.
fn substitute(
    template: &[String],
    params: &std::collections::BTreeMap<String, ParamType>,
    args: &Value,
) -> Result<Vec<String>, String> {
    let empty = serde_json::Map::new();
    let args = match args {
        Value::Object(m) => m,
        Value::Null => &empty,
        _ => return Err("args must be an object".into()),
    };
    if let Some(unknown) = args.keys().find(|k| !params.contains_key(*k)) {
        return Err(format!("unknown parameter {unknown:?}"));
    }
    let mut values = std::collections::BTreeMap::new();
    for (name, kind) in params {
        let value = args.get(name).ok_or_else(|| format!("missing parameter {name:?}"))?;
        let text = match (kind, value) {
            (ParamType::Kind(k), Value::String(s)) if k == "string" => s.clone(),
            (ParamType::Kind(k), Value::Number(n)) if k == "int" && (n.is_i64() || n.is_u64()) => n.to_string(),
            (ParamType::Kind(k), Value::Bool(b)) if k == "bool" => b.to_string(),
            (ParamType::OneOf(allowed), Value::String(s)) if allowed.contains(s) => s.clone(),
            (ParamType::OneOf(allowed), _) => return Err(format!("parameter {name:?} must be one of {allowed:?}")),
            (ParamType::Kind(k), _) => return Err(format!("parameter {name:?} must be a {k}")),
        };
        if text.contains('\0') {
            return Err(format!("parameter {name:?} contains a NUL byte"));
        }
        values.insert(format!("{{{name}}}"), text);
    }
    Ok(template.iter().map(|el| values.get(el).cloned().unwrap_or_else(|| el.clone())).collect())
}

/// Reads all of `pipe`, keeping at most `cap` bytes; the rest is drained so
/// the child never blocks on a full pipe.
async fn read_capped(mut pipe: impl AsyncRead + Unpin, cap: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut chunk = [0u8; 8192];
    let mut truncated = false;
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&chunk[..n.min(room)]);
                truncated |= n > room;
            }
        }
    }
    (kept, truncated)
}

fn kill_group(pgid: Option<u32>) {
    if let Some(pid) = pgid.and_then(|p| i32::try_from(p).ok()) {
        // The child leads its own process group, so this reaches its children too.
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

/// Runs `argv` in a new process group; on timeout or cancel the whole group
/// is killed.
pub async fn run_process(argv: &[String], timeout: Duration, cap: usize, cancel: &CancellationToken) -> ResultReport {
    let started = time::OffsetDateTime::now_utc();
    let mut report = ResultReport::new(CommandStatus::Failed);
    report.started_at = Some(started);
    let Some((program, rest)) = argv.split_first() else {
        report.reason = Some("empty argv".into());
        return report;
    };
    let mut child = match tokio::process::Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            report.reason = Some(format!("cannot start {program}: {e}"));
            report.finished_at = Some(time::OffsetDateTime::now_utc());
            return report;
        }
    };
    let pgid = child.id();
    let out = tokio::spawn(read_capped(child.stdout.take().expect("stdout is piped"), cap));
    let err = tokio::spawn(read_capped(child.stderr.take().expect("stderr is piped"), cap));
    let (status, exit) = tokio::select! {
        exit = child.wait() => (None, exit.ok()),
        _ = tokio::time::sleep(timeout) => {
            kill_group(pgid);
            (Some((CommandStatus::TimedOut, format!("timed out after {} s; process group killed", timeout.as_secs()))), child.wait().await.ok())
        }
        _ = cancel.cancelled() => {
            kill_group(pgid);
            (Some((CommandStatus::Cancelled, "cancelled; process group killed".to_owned())), child.wait().await.ok())
        }
    };
    if status.is_none() {
        // Leftover children of a finished command would keep the pipes open.
        kill_group(pgid);
    }
    let grace = Duration::from_secs(2);
    let (stdout, cut_out) = tokio::time::timeout(grace, out).await.ok().and_then(Result::ok).unwrap_or_default();
    let (stderr, cut_err) = tokio::time::timeout(grace, err).await.ok().and_then(Result::ok).unwrap_or_default();
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
            if report.exit_code.is_none() {
                report.reason = Some("killed by a signal".into());
            }
        }
    }
    report
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
        let Plan::Process { argv, .. } = plan(&c, &cmd("greet", json!({"who": "a b; rm -rf /", "n": 3}))) else {
            panic!("action must run")
        };
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
        assert!(matches!(plan(&shell, &cmd("shell", json!({"script": "id"}))), Plan::Process { .. }));
    }

    #[test]
    fn enum_parameters_only_accept_listed_values() {
        let c =
            cfg("[actions.restart]\nargv = [\"systemctl\", \"restart\", \"{svc}\"]\nparams = { svc = [\"nginx\"] }");
        assert!(matches!(plan(&c, &cmd("restart", json!({"svc": "nginx"}))), Plan::Process { .. }));
        assert!(matches!(plan(&c, &cmd("restart", json!({"svc": "sshd"}))), Plan::Reject(_)));
    }

    #[tokio::test]
    async fn a_timed_out_command_and_its_children_are_killed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("child-survived");
        // The child spawns a grandchild that would write the marker after 2 s.
        let script = format!("(sleep 2; touch {}) & sleep 30", marker.display());
        let argv = vec!["/bin/sh".to_owned(), "-c".to_owned(), script];
        let report = run_process(&argv, Duration::from_millis(300), 1024, &CancellationToken::new()).await;
        assert_eq!(report.status, CommandStatus::TimedOut);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(!marker.exists(), "the grandchild must have been killed with the group");
    }

    #[tokio::test]
    async fn output_is_capped_with_a_truncated_flag_and_exit_codes_map_to_status() {
        let argv = |s: &str| vec!["/bin/sh".to_owned(), "-c".to_owned(), s.to_owned()];
        let never = CancellationToken::new();
        let big = run_process(
            &argv("head -c 100000 /dev/zero | tr '\\0' x; echo err >&2"),
            Duration::from_secs(10),
            1000,
            &never,
        )
        .await;
        assert_eq!((big.status, big.stdout.len(), big.truncated), (CommandStatus::Succeeded, 1000, true));
        assert_eq!(big.stderr, "err\n");
        let fail = run_process(&argv("exit 3"), Duration::from_secs(10), 1000, &never).await;
        assert_eq!((fail.status, fail.exit_code), (CommandStatus::Failed, Some(3)));
        let missing = run_process(&["/nonexistent/tool".to_owned()], Duration::from_secs(1), 10, &never).await;
        assert!(missing.reason.as_deref().unwrap_or_default().contains("cannot start"));
    }
}
