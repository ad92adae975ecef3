//! `tether login` and the credentials file it writes: `{server, token}` in
//! `$XDG_CONFIG_HOME/tether/credentials.json` (or `~/.config/…`), 0600 in a
//! 0700 directory, replaced atomically.

use std::ffi::OsString;
use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use serde::{Deserialize, Serialize};
use tether_client::{ClientError, Credentials};
use tether_proto::user::CreateApiToken;

use super::{DEFAULT_SERVER, normalize_server};

const FILE_NAME: &str = "credentials.json";

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// Server URL [default: the saved one, else http://127.0.0.1:8080]
    #[arg(long, env = "TETHER_SERVER", value_name = "URL")]
    server: Option<String>,
    /// User to log in as (asked for when missing)
    #[arg(long, env = "TETHER_USER", value_name = "NAME")]
    user: Option<String>,
    /// Save this existing API token instead of creating one with a password
    /// (it is checked first). Visible to other users in `ps`: prefer --token-stdin
    #[arg(long, value_name = "TOKEN", conflicts_with = "token_stdin")]
    token: Option<String>,
    /// Read the API token to save from the first line of standard input
    #[arg(long)]
    token_stdin: bool,
    /// PEM file with the CA(s) of a server whose certificate a private CA signed; only these are trusted
    #[arg(long, env = "TETHER_CA_FILE", value_name = "FILE")]
    ca_file: Option<std::path::PathBuf>,
}

/// Lifetime of the API token `tether login` creates: a forgotten laptop
/// login should not stay valid forever.
const LOGIN_TOKEN_LIFETIME_S: u64 = 30 * 86_400;

/// What `tether login` saves.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct SavedLogin {
    pub server: String,
    pub token: String,
    /// Set when `tether login` created the token, so that logging in again
    /// can revoke it; a token the user brought is theirs to manage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_token_id: Option<String>,
}

impl std::fmt::Debug for SavedLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SavedLogin").field("server", &self.server).field("token", &"<redacted>").finish()
    }
}

pub async fn run(args: LoginArgs) -> anyhow::Result<()> {
    let path = credentials_path()?;
    // A broken saved file must not stop the user from logging in again.
    let saved = load_from(&path).ok().flatten();
    let server = match args.server.filter(|s| !s.is_empty()) {
        Some(s) => s,
        None => saved.as_ref().map_or_else(|| DEFAULT_SERVER.to_owned(), |s| s.server.clone()),
    };
    let server = normalize_server(&server);
    let anon = super::client_for(&server, args.ca_file.as_deref())?;

    let previous = saved.filter(|p| normalize_server(&p.server) == server);
    let given = if args.token_stdin { Some(read_token_line()?) } else { args.token.filter(|t| !t.is_empty()) };
    let (token, created_token_id) = match given {
        Some(token) => {
            // Any authenticated read proves the token works.
            anon.clone().with_bearer(token.clone()).list_api_tokens().await.map_err(login_error)?;
            (token, None)
        }
        None => {
            let user = match args.user.filter(|u| !u.is_empty()) {
                Some(u) => u,
                None => ask_user()?,
            };
            let password = match std::env::var("TETHER_PASSWORD").ok().filter(|p| !p.is_empty()) {
                Some(p) => p,
                None => rpassword::prompt_password(format!("password for {user} at {server}: "))
                    .context("cannot read the password (no terminal?); set TETHER_PASSWORD")?,
            };
            let basic = anon.clone().with_credentials(Credentials::Basic { username: user, password });
            let req =
                CreateApiToken { name: format!("cli@{}", hostname()), expires_in_s: Some(LOGIN_TOKEN_LIFETIME_S) };
            let created = basic.create_api_token(&req).await.map_err(login_error)?;
            (created.token, Some(created.id))
        }
    };

    save_to(&path, &SavedLogin { server: server.clone(), token: token.clone(), created_token_id })?;
    // The token this login replaces would otherwise live on unused: revoke it
    // with itself (best effort: it may have expired or been revoked already).
    if let Some(old) = previous
        && old.token != token
        && let Some(id) = &old.created_token_id
        && let Err(e) = anon.with_bearer(old.token.clone()).revoke_api_token(id).await
    {
        tracing::debug!(error = %e, "Could not revoke the previously saved login token");
    }
    println!("logged in to {server}; credentials saved in {}", path.display());
    Ok(())
}

/// Like [`super::api_error`] but without telling the user to log in.
fn login_error(e: ClientError) -> anyhow::Error {
    match &e {
        ClientError::Api { body, .. } => anyhow::anyhow!("login failed: {} ({})", body.what, body.key),
        ClientError::Http(_) => anyhow::Error::new(e).context("cannot reach the server"),
        _ => anyhow::Error::new(e),
    }
}

fn read_token_line() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).context("cannot read the token from standard input")?;
    let token = line.trim().to_owned();
    if token.is_empty() {
        bail!("--token-stdin: standard input held no token");
    }
    Ok(token)
}

fn ask_user() -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        bail!("no user given: pass --user or set TETHER_USER");
    }
    eprint!("user: ");
    std::io::stderr().flush().context("cannot write the prompt")?;
    let mut line = String::new();
    stdin.lock().read_line(&mut line).context("cannot read the user name")?;
    let user = line.trim().to_owned();
    if user.is_empty() {
        bail!("no user given");
    }
    Ok(user)
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned())
}

/// The saved login, if there is one (none when there is no config directory).
pub fn load() -> anyhow::Result<Option<SavedLogin>> {
    match credentials_path_from(std::env::var_os("XDG_CONFIG_HOME"), std::env::var_os("HOME")) {
        Some(path) => load_from(&path),
        None => Ok(None),
    }
}

fn credentials_path() -> anyhow::Result<PathBuf> {
    credentials_path_from(std::env::var_os("XDG_CONFIG_HOME"), std::env::var_os("HOME"))
        .context("cannot find a config directory: set XDG_CONFIG_HOME or HOME")
}

/// `$XDG_CONFIG_HOME/tether/credentials.json`, else `$HOME/.config/…`. The
/// XDG spec says to ignore a relative `XDG_CONFIG_HOME`.
fn credentials_path_from(xdg: Option<OsString>, home: Option<OsString>) -> Option<PathBuf> {
    let absolute = |v: Option<OsString>| v.map(PathBuf::from).filter(|p| p.is_absolute());
    let config = absolute(xdg).or_else(|| absolute(home).map(|h| h.join(".config")))?;
    Some(config.join("tether").join(FILE_NAME))
}

fn load_from(path: &Path) -> anyhow::Result<Option<SavedLogin>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        eprintln!("warning: {} is readable by other users; run `chmod 600` on it", path.display());
    }
    let saved = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid credentials file; run `tether login` again", path.display()))?;
    Ok(Some(saved))
}

/// Writes the file so that a crash leaves either the old or the new one,
/// never a torn one, and so the token is never readable by others, not even
/// for a moment: temp file created 0600, fsynced, renamed, directory fsynced.
fn save_to(path: &Path, login: &SavedLogin) -> anyhow::Result<()> {
    let dir = path.parent().context("credentials path has no directory")?;
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    // The directory may predate us with looser permissions.
    fs::set_permissions(dir, Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict {}", dir.display()))?;

    let tmp = dir.join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        serde_json::to_writer_pretty(&mut file, login)?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    };
    write()
        .inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xdg_config_home_wins_over_home_and_must_be_absolute() {
        let p = |x: Option<&str>, h: Option<&str>| credentials_path_from(x.map(Into::into), h.map(Into::into));
        assert_eq!(p(Some("/x"), Some("/h")), Some(PathBuf::from("/x/tether/credentials.json")));
        assert_eq!(p(None, Some("/h")), Some(PathBuf::from("/h/.config/tether/credentials.json")));
        assert_eq!(p(Some("rel"), Some("/h")), Some(PathBuf::from("/h/.config/tether/credentials.json")));
        assert_eq!(p(None, None), None);
    }

    #[test]
    fn saved_login_round_trips_with_private_permissions() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("cfg/tether/credentials.json");
        assert_eq!(load_from(&path).expect("missing is fine"), None);
        let login =
            SavedLogin { server: "http://a:1".into(), token: "tth_secret".into(), created_token_id: Some("id".into()) };
        save_to(&path, &login).expect("saves");
        let replaced = SavedLogin { token: "tth_other".into(), ..login };
        save_to(&path, &replaced).expect("replaces");
        assert_eq!(load_from(&path).expect("loads"), Some(replaced));
        let mode = |p: &Path| fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().expect("dir")), 0o700);
        let leftovers: Vec<_> = fs::read_dir(path.parent().expect("dir")).expect("list").collect();
        assert_eq!(leftovers.len(), 1, "only the credentials file remains");
    }

    #[test]
    fn a_corrupt_file_is_an_error_that_says_to_log_in_again() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("credentials.json");
        fs::write(&path, "not json").expect("write");
        let err = load_from(&path).expect_err("corrupt");
        assert!(err.to_string().contains("tether login"), "{err}");
    }

    #[test]
    fn debug_never_shows_the_token() {
        let login =
            SavedLogin { server: "http://a:1".into(), token: "tth_secret".into(), created_token_id: Some("id".into()) };
        assert!(!format!("{login:?}").contains("tth_secret"));
    }
}
