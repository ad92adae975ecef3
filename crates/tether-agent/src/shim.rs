//! The exec shim: a small supervisor between the agent and every command
//! process (protocol.md §5). The agent starts its own binary as
//! `<agent> __tether-exec-shim PROGRAM ARGS…`; the shim
//!
//! - becomes a child subreaper, so every process the command spawns stays
//!   its descendant even after `setsid` or a double fork (an orphan is
//!   reparented to the nearest subreaper, not to init);
//! - starts the command with a parent-death signal (SIGKILL), so the command
//!   dies with the shim;
//! - holds a "lifeline" on fd 0, one end of a socket pair whose other end the
//!   agent keeps. When the agent closes it (timeout, cancel) or dies (even by
//!   SIGKILL: the kernel closes it), the shim kills every descendant;
//! - when the command exits, kills whatever it left behind, reaps everything,
//!   and exits with the command's status (a signal death is re-raised).
//!
//! A command that cannot be started is reported on the lifeline as one line
//! `cannot start …` and the shim exits with [`SPAWN_FAILED`].

use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::process::Stdio;

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;

/// The first argument that selects the shim.
pub const ARG: &str = "__tether-exec-shim";

/// Exit code of a shim whose command could not be started.
pub const SPAWN_FAILED: i32 = 127;

/// How many kill rounds the shim makes before giving up on a process that
/// keeps forking; each round kills every descendant it sees.
const KILL_ROUNDS: usize = 200;

/// Call first thing in `main`: when this process was started as the exec
/// shim, it runs the shim and never returns.
pub fn run_if_requested() {
    let mut args = std::env::args_os();
    let _program = args.next();
    if args.next().as_deref() != Some(OsStr::new(ARG)) {
        return;
    }
    run(args.collect())
}

fn run(argv: Vec<OsString>) -> ! {
    #[cfg(target_os = "linux")]
    let _ = nix::sys::prctl::set_child_subreaper(true);
    let lifeline = std::os::fd::AsFd::as_fd(&std::io::stdin()).try_clone_to_owned().map(std::fs::File::from);
    let Some((program, rest)) = argv.split_first() else {
        report_spawn_error(lifeline.ok(), "cannot start a command with an empty argv");
        std::process::exit(SPAWN_FAILED)
    };
    let mut command = std::process::Command::new(program);
    command.args(rest).stdin(Stdio::null());
    with_parent_death_signal(&mut command);
    let child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            report_spawn_error(lifeline.ok(), &format!("cannot start {}: {e}", program.to_string_lossy()));
            std::process::exit(SPAWN_FAILED)
        }
    };
    let child_pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    // `child` is reaped below with waitpid(-1); dropping it neither waits nor kills.
    drop(child);
    if let Ok(mut lifeline) = lifeline {
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            // The agent never writes; any end of the stream means it is gone or wants us to stop.
            loop {
                match lifeline.read(&mut buf) {
                    Ok(0) => break,
                    Err(e) if e.kind() != std::io::ErrorKind::Interrupted => break,
                    _ => {}
                }
            }
            kill_descendants();
        });
    }
    let mut status = None;
    // Reaps one process per turn; it ends when no child is left (ECHILD).
    loop {
        match waitpid(None::<Pid>, None) {
            Ok(ws @ (WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _))) if pid == child_pid => {
                status = Some(ws);
                // Nothing a command started outlives it.
                kill_descendants();
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => break,
        }
    }
    match status {
        Some(WaitStatus::Exited(_, code)) => std::process::exit(code),
        Some(WaitStatus::Signaled(_, signal, _)) => {
            let _ = kill(nix::unistd::getpid(), signal);
            std::process::exit(128 + signal as i32)
        }
        _ => std::process::exit(SPAWN_FAILED),
    }
}

fn report_spawn_error(lifeline: Option<std::fs::File>, message: &str) {
    if let Some(mut l) = lifeline {
        let _ = writeln!(l, "{message}");
    }
}

/// SIGKILLs every live descendant of this process until none is left.
fn kill_descendants() {
    let me = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
    for _ in 0..KILL_ROUNDS {
        let found = descendants(me);
        if found.is_empty() {
            return;
        }
        for pid in found {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Live (not zombie) descendants of `root`, from `/proc/*/stat`.
pub fn descendants(root: i32) -> Vec<i32> {
    let mut children: std::collections::HashMap<i32, Vec<i32>> = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Some((state, ppid)) = stat_state_ppid(pid) else { continue };
        if state != 'Z' {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut found = Vec::new();
    let mut next = vec![root];
    while let Some(pid) = next.pop() {
        for &child in children.get(&pid).into_iter().flatten() {
            if child != root && !found.contains(&child) {
                found.push(child);
                next.push(child);
            }
        }
    }
    found
}

/// The state letter and parent pid of `pid`, or `None` when it is gone.
pub fn stat_state_ppid(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid …`; comm may contain spaces and parentheses.
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn with_parent_death_signal(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let shim = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and only makes
    // two system calls (prctl, getppid), both async-signal-safe; it allocates
    // nothing (errors are raw OS errors) and takes no lock. The shim is single-threaded when it spawns.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            // The shim may have died before the signal was armed.
            if nix::unistd::getppid() != shim {
                return Err(Errno::ESRCH.into());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn with_parent_death_signal(_command: &mut std::process::Command) {}
