//! Command processes under the exec shim: environment, output, and that
//! nothing a command started survives its timeout, its cancel, or the
//! agent's own death.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use tether_agent::config::{AgentConfig, FileConfig, Overrides};
use tether_agent::executor::{self, Plan, ProcessSpec};
use tether_agent::shim;
use tether_proto::CommandId;
use tether_proto::command::CommandStatus;
use tether_proto::signal::CommandQueued;
use tokio_util::sync::CancellationToken;

/// The slim agent binary: it is the exec shim of every command.
const SHIM: &str = env!("CARGO_BIN_EXE_tether-agent");

/// Set (to a directory) when this test binary is re-run as a stand-in agent.
const HELPER_DIR: &str = "TETHER_TEST_HELPER_DIR";

fn spec(script: &str, timeout: Duration) -> ProcessSpec {
    ProcessSpec {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: executor::command_env(|_| None, &Default::default()),
        timeout,
        output_cap: 64 * 1024,
    }
}

fn shell_plan(script: &str) -> ProcessSpec {
    let file: FileConfig = toml::from_str("allow_shell = true").expect("toml");
    let cfg = AgentConfig::resolve(Path::new("/d"), file, |_| None, Overrides::default()).expect("config");
    let cmd = CommandQueued {
        command_id: CommandId::new(),
        name: "shell".into(),
        args: json!({ "script": script }),
        timeout_s: 60,
        priority: 5,
        expires_at_ms: None,
    };
    match executor::plan(&cfg, &cmd) {
        Plan::Process(spec) => spec,
        other => panic!("shell must run: {other:?}"),
    }
}

/// Whether `pid` is still a live process (a zombie is dead).
fn alive(pid: i32) -> bool {
    shim::stat_state_ppid(pid).is_some_and(|(state, _)| state != 'Z')
}

/// Reads a pid a script wrote to `path`, waiting (bounded) for the write.
fn read_pid(path: &Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(pid) = std::fs::read_to_string(path).ok().and_then(|t| t.trim().parse().ok()) {
            return pid;
        }
        assert!(Instant::now() < deadline, "{} was never written", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (bounded) until `pid` is no longer alive; false if it still is.
fn gone_within(pid: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[tokio::test]
async fn a_timed_out_command_takes_its_setsid_grandchild_with_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pidfile = dir.path().join("escaped.pid");
    // The grandchild leaves the process group and the session, and holds stdout open.
    let script = format!("echo started; setsid sleep 1000 & echo $! > {}; wait", pidfile.display());
    let report =
        executor::run_process(Path::new(SHIM), &spec(&script, Duration::from_secs(3)), &CancellationToken::new()).await;
    assert_eq!(report.status, CommandStatus::TimedOut, "{report:?}");
    assert_eq!(report.stdout, "started\n", "output read before the kill is kept");
    let escaped = read_pid(&pidfile);
    // The shim reaps everything before it exits, so there is nothing to wait for.
    assert!(!alive(escaped), "the setsid grandchild {escaped} survived the timeout");
}

#[tokio::test]
async fn a_cancelled_command_takes_an_orphaned_setsid_daemon_with_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pidfile = dir.path().join("daemon.pid");
    // A double fork: the subshell exits at once, so the daemon is an orphan
    // in its own session long before the cancel.
    let script = format!("(setsid sleep 1000 & echo $! > {}); sleep 1000", pidfile.display());
    let cancel = CancellationToken::new();
    let run = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            executor::run_process(Path::new(SHIM), &spec(&script, Duration::from_secs(600)), &cancel).await
        })
    };
    let daemon = tokio::task::spawn_blocking(move || read_pid(&pidfile)).await.expect("pid");
    assert!(alive(daemon), "the daemon runs until the cancel");
    cancel.cancel();
    let report = run.await.expect("join");
    assert_eq!(report.status, CommandStatus::Cancelled, "{report:?}");
    assert!(!alive(daemon), "the orphaned daemon {daemon} survived the cancel");
}

#[tokio::test]
async fn leftovers_of_a_finished_command_are_killed_and_do_not_hold_its_result() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pidfile = dir.path().join("left.pid");
    let script = format!("setsid sleep 1000 & echo $! > {}; echo done", pidfile.display());
    let report =
        executor::run_process(Path::new(SHIM), &spec(&script, Duration::from_secs(600)), &CancellationToken::new())
            .await;
    assert_eq!((report.status, report.stdout.as_str()), (CommandStatus::Succeeded, "done\n"), "{report:?}");
    let left = read_pid(&pidfile);
    assert!(!alive(left), "a process left behind by a finished command ({left}) survived");
}

#[tokio::test]
async fn output_is_capped_with_a_truncated_flag_and_exit_codes_map_to_status() {
    let never = CancellationToken::new();
    let shim = Path::new(SHIM);
    let mut big = spec("head -c 100000 /dev/zero | tr '\\0' x; echo err >&2", Duration::from_secs(30));
    big.output_cap = 1000;
    let big = executor::run_process(shim, &big, &never).await;
    assert_eq!((big.status, big.stdout.len(), big.truncated), (CommandStatus::Succeeded, 1000, true));
    assert_eq!(big.stderr, "err\n");
    let fail = executor::run_process(shim, &spec("exit 3", Duration::from_secs(30)), &never).await;
    assert_eq!((fail.status, fail.exit_code), (CommandStatus::Failed, Some(3)));
    let killed = executor::run_process(shim, &spec("kill -9 $$", Duration::from_secs(30)), &never).await;
    assert_eq!((killed.status, killed.exit_code), (CommandStatus::Failed, None), "{killed:?}");
    assert_eq!(killed.reason.as_deref(), Some("killed by a signal"));
    let mut missing = spec("", Duration::from_secs(30));
    missing.argv = vec!["/nonexistent/tool".into()];
    let missing = executor::run_process(shim, &missing, &never).await;
    assert_eq!(missing.status, CommandStatus::Failed);
    assert!(missing.reason.as_deref().unwrap_or_default().contains("cannot start /nonexistent/tool"), "{missing:?}");
}

/// Re-runs this test binary as a stand-in agent: `test` with `vars` added
/// to its environment, and `dir` to talk through.
fn helper(test: &str, dir: &Path, vars: &[(&str, &str)]) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().expect("current exe"))
        .args(["--exact", test, "--include-ignored", "--nocapture", "--test-threads=1"])
        .env(HELPER_DIR, dir)
        .envs(vars.iter().copied())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start the helper")
}

fn helper_dir() -> Option<PathBuf> {
    std::env::var_os(HELPER_DIR).map(PathBuf::from)
}

#[test]
fn commands_never_see_the_agents_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vars = [
        ("TETHER_ENROLL_TOKEN", "enroll-secret-123"),
        ("TETHER_SERVER", "http://127.0.0.1:9"),
        ("AWS_SECRET_ACCESS_KEY", "aws-secret"),
        ("PATH", "/usr/local/bin:/usr/bin:/bin"),
        ("TZ", "Europe/Berlin"),
    ];
    let status = helper("helper_runs_env_as_a_shell_command", dir.path(), &vars).wait().expect("helper");
    assert!(status.success(), "the helper failed: {status}");
    let env = std::fs::read_to_string(dir.path().join("env.out")).expect("the helper ran the command");
    assert!(!env.contains("TETHER_") && !env.contains("secret"), "the agent's environment leaked:\n{env}");
    let mut names: Vec<&str> = env.lines().filter_map(|l| l.split_once('=').map(|(k, _)| k)).collect();
    names.sort_unstable();
    // `sh` itself adds PWD (and some add SHLVL or `_`); nothing comes from the agent.
    names.retain(|n| !matches!(*n, "PWD" | "SHLVL" | "_" | "OLDPWD"));
    assert_eq!(names, ["HOME", "LANG", "PATH", "TZ"], "{env}");
    assert!(env.contains("PATH=/usr/local/bin:/usr/bin:/bin\n") && env.contains("TZ=Europe/Berlin\n"), "{env}");
}

#[tokio::test]
#[ignore = "run by commands_never_see_the_agents_environment as a separate process"]
async fn helper_runs_env_as_a_shell_command() {
    let Some(dir) = helper_dir() else { return };
    let report = executor::run_process(Path::new(SHIM), &shell_plan("env"), &CancellationToken::new()).await;
    assert_eq!(report.status, CommandStatus::Succeeded, "{report:?}");
    std::fs::write(dir.join("env.out"), report.stdout).expect("write");
}

#[test]
fn a_sigkilled_agent_takes_its_commands_with_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut agent = helper("helper_runs_a_long_command", dir.path(), &[]);
    let child = read_pid(&dir.path().join("child.pid"));
    let escaped = read_pid(&dir.path().join("escaped.pid"));
    assert!(alive(child) && alive(escaped), "the command runs while the agent does");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(agent.id()).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL the agent");
    let _ = agent.wait();
    assert!(gone_within(child, Duration::from_secs(20)), "the command {child} outlived the SIGKILLed agent");
    assert!(gone_within(escaped, Duration::from_secs(20)), "its setsid child {escaped} outlived the SIGKILLed agent");
}

#[tokio::test]
#[ignore = "run by a_sigkilled_agent_takes_its_commands_with_it as a separate process"]
async fn helper_runs_a_long_command() {
    let Some(dir) = helper_dir() else { return };
    let script = format!(
        "echo $$ > {}/child.pid.tmp && mv {0}/child.pid.tmp {0}/child.pid; setsid sleep 1000 & echo $! > {0}/escaped.pid.tmp && mv {0}/escaped.pid.tmp {0}/escaped.pid; wait",
        dir.display()
    );
    let _ = executor::run_process(Path::new(SHIM), &spec(&script, Duration::from_secs(600)), &CancellationToken::new())
        .await;
}
