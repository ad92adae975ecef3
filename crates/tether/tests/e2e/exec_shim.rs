//! The `tether` binary doubles as the agent's exec shim: every command the
//! in-process agent (`tether agent`, `tether up`) runs is started through it.

use std::process::{Command, Stdio};

use crate::common::tether_bin;

#[test]
fn the_tether_binary_runs_a_command_as_its_exec_shim() {
    // The shim runs its command while the other end of its lifeline (fd 0) is open.
    let (lifeline, theirs) = std::os::unix::net::UnixStream::pair().expect("socket pair");
    let out = Command::new(tether_bin())
        .args([tether_agent::shim::ARG, "/bin/sh", "-c", "printf shimmed; exit 7"])
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .output()
        .expect("run the shim");
    drop(lifeline);
    assert_eq!(out.status.code(), Some(7), "the command's exit code is the shim's: {out:?}");
    assert_eq!(out.stdout, b"shimmed");
}
