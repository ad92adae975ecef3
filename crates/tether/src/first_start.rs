//! What `tether server` and `tether up` tell the operator about the first
//! admin's credentials, and how to run the CLI they just used.
//!
//! The credentials are always in `<data-dir>/initial-admin.txt` (0600, written
//! by the server). They are printed in full only when stdout is a terminal:
//! under a service manager stdout goes to a journal that must not keep them.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use tether_server::{Bootstrap, INITIAL_ADMIN_FILE};

/// Prints the first start's credentials, or where they are.
pub fn print_credentials(bootstrap: &Bootstrap, indent: &str) {
    let Some(token) = &bootstrap.admin_token else { return };
    let file = bootstrap.file.as_deref().map(Path::display);
    if std::io::stdout().is_terminal() {
        let hours = tether_server::BOOTSTRAP_TOKEN_TTL_MS / 3_600_000;
        println!("{indent}admin API token (valid for {hours} hours): {token}");
        if let Some(password) = &bootstrap.admin_password {
            println!("{indent}admin password for user 'admin': {password}");
        }
    }
    if let Some(file) = file {
        println!("{indent}first admin credentials: {file} (0600; delete it after the first login)");
    }
}

/// A shell expression for the admin API token: the token itself when it was
/// printed, else a command reading it from `initial-admin.txt`; `None` once
/// that file is gone.
pub fn token_expr(bootstrap: &Bootstrap, data_dir: &Path) -> Option<String> {
    match &bootstrap.admin_token {
        Some(token) if std::io::stdout().is_terminal() => Some(token.clone()),
        _ => {
            let file = data_dir.join(INITIAL_ADMIN_FILE);
            file.exists().then(|| format!("$(sed -n 's/^api_token: //p' {})", shell_quote(&file.to_string_lossy())))
        }
    }
}

/// How to run this binary from a shell, as the operator can type it: `tether`
/// when that name on PATH is this very file (e.g. after `cargo install --path
/// crates/tether`), else this executable's full path (e.g. under `cargo run`).
pub fn self_command() -> String {
    let Ok(exe) = std::env::current_exe().and_then(|p| p.canonicalize()) else { return "tether".into() };
    if on_path("tether").is_some_and(|found| found == exe) {
        return "tether".into();
    }
    shell_quote(&exe.to_string_lossy())
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .and_then(|p| p.canonicalize().ok())
}

/// `s` as one shell word.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+:=@%,".contains(&b)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_leaves_plain_words_and_quotes_the_rest() {
        assert_eq!(shell_quote("/usr/bin/tether"), "/usr/bin/tether");
        assert_eq!(shell_quote("/home/a b/tether"), "'/home/a b/tether'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
