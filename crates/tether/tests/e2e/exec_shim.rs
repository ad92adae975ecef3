//! The `tether` binary doubles as the agent's exec shim: every command the
//! in-process agent (`tether agent`, `tether up`) runs is started through it.

use std::process::Command;

use crate::common::tether_bin;

#[test]
fn the_tether_binary_runs_a_command_as_its_exec_shim() {
    let out = Command::new(tether_bin())
        .args([tether_agent::shim::ARG, "/bin/sh", "-c", "printf shimmed; exit 7"])
        .output()
        .expect("run the shim");
    assert_eq!(out.status.code(), Some(7), "the command's exit code is the shim's: {out:?}");
    assert_eq!(out.stdout, b"shimmed");
}
