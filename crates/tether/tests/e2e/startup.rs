//! What `tether server` prints on first start: the credentials in full on a
//! terminal only, otherwise just where the file with them is.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use crate::common::{ServerProcess, assert_reset_admin_works, initial_admin_token, signal, tether_bin};

/// Runs `tether server` on port 0 (through util-linux `script` when `tty`,
/// which gives it a terminal) and returns its stdout lines up to the "listening" one.
fn first_start_lines(data: &std::path::Path, tty: bool) -> Vec<String> {
    let server = format!("{} server --listen 127.0.0.1:0 --data-dir {}", tether_bin(), data.display());
    let mut cmd = if tty {
        let mut cmd = Command::new("script");
        cmd.args(["-qec", &server, "/dev/null"]);
        cmd
    } else {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &format!("exec {server}")]);
        cmd
    };
    let mut child = cmd
        .env("TETHER_LOG", "warn")
        .env_remove("TETHER_ADMIN_PASSWORD")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut lines = Vec::new();
    for line in BufReader::new(child.stdout.take().expect("stdout")).lines() {
        let Ok(line) = line else { break };
        let done = line.contains("tether server listening on");
        lines.push(line.trim_end_matches('\r').to_owned());
        if done {
            break;
        }
    }
    signal(&child, libc::SIGTERM);
    child.wait().expect("wait");
    lines
}

#[test]
fn the_first_admin_credentials_are_printed_to_a_terminal_only() {
    let dir = tempfile::tempdir().expect("tempdir");

    let piped = dir.path().join("piped");
    let lines = first_start_lines(&piped, false);
    assert!(lines.iter().any(|l| l.contains("listening on")), "{lines:?}");
    assert!(!lines.iter().any(|l| l.contains("tth_") || l.contains("password")), "secrets on a pipe: {lines:?}");
    assert!(lines.iter().any(|l| l.contains("initial-admin.txt")), "says where they are: {lines:?}");
    assert!(initial_admin_token(&piped).is_some());

    let tty = dir.path().join("tty");
    let lines = first_start_lines(&tty, true);
    let token = initial_admin_token(&tty).expect("the file is written on a terminal too");
    let printed = lines.iter().find_map(|l| l.split("admin API token (valid for 24 hours): ").nth(1));
    assert_eq!(printed, Some(token.as_str()), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("admin password for user 'admin': ")), "{lines:?}");
}

#[tokio::test]
async fn reset_admin_sets_a_new_password_on_the_embedded_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), 0);
    assert_reset_admin_works(&server, &[]).await;
    let missing = Command::new(tether_bin())
        .args(["server", "reset-admin", "--data-dir"])
        .arg(dir.path().join("nothing-here"))
        .output()
        .expect("run");
    assert!(!missing.status.success(), "no database there");
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no tether database"));
}
