//! The operator CLI (protocol.md §1): subcommands that talk to the HTTP API
//! through `tether-client`. This file holds the clap types, the options every
//! operator command shares, credential resolution and the output helpers.

mod agents;
mod audit;
mod certs;
mod commands;
mod config;
mod device;
mod files;
mod login;
mod run;
mod tokens;
mod users;

use std::borrow::Cow;
use std::future::Future;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};
use comfy_table::{ContentArrangement, Table, presets};
use serde::Serialize;
use tether_client::{Client, ClientError, Credentials};
use tether_proto::agent::validate_labels;
use tether_proto::{ErrorKey, Labels, MAX_PAGE_LIMIT, Page, Timestamp};

/// Where operator commands go when neither `--server` nor a saved login says.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

#[derive(Debug, Subcommand)]
pub enum OperatorCommand {
    /// Log in to a server and save an API token for the other operator commands.
    Login(login::LoginArgs),
    /// List, inspect, label, rename, revoke and delete agents; read their metrics.
    Agents {
        #[command(flatten)]
        global: GlobalOpts,
        #[command(subcommand)]
        command: agents::AgentsCommand,
    },
    /// Run a command on agents, wait for it and print the results.
    ///
    /// Example: tether run --label role=web -- ping
    Run(Box<run::RunArgs>),
    /// List, inspect and cancel commands.
    Commands {
        #[command(flatten)]
        global: GlobalOpts,
        #[command(subcommand)]
        command: commands::CommandsCommand,
    },
    /// Inspect and cancel batches (the commands one `tether run` created).
    Batches {
        #[command(flatten)]
        global: GlobalOpts,
        #[command(subcommand)]
        command: commands::BatchesCommand,
    },
    /// Versioned configuration by scope: write, read, history, rollback, status.
    ///
    /// Example: tether config set label:env=prod prod.json -m "raise poll wait"
    Config {
        #[command(flatten)]
        global: GlobalOpts,
        #[command(subcommand)]
        command: config::ConfigCommand,
    },
    /// Create, list and revoke enrollment tokens for new agents.
    EnrollTokens {
        #[command(flatten)]
        global: GlobalOpts,
        #[command(subcommand)]
        command: tokens::EnrollTokensCommand,
    },
    /// Create, list and revoke your personal API tokens.
    Tokens {
        #[command(flatten)]
        global: GlobalOpts,
        #[command(subcommand)]
        command: tokens::ApiTokensCommand,
    },
    /// Approve or deny an agent waiting in the device flow (`tether agent --device-flow`).
    Device {
        #[command(flatten)]
        global: GlobalOpts,
        #[command(subcommand)]
        command: device::DeviceCommand,
    },
    /// Manage users and their roles (admin only).
    Users {
        #[command(flatten)]
        global: GlobalOpts,
        #[command(subcommand)]
        command: users::UsersCommand,
    },
    /// Push files to agents, list and unassign them, see who has them.
    ///
    /// Example: tether files push app.conf --path /etc/app/app.conf --mode 0644 --label role=web
    Files {
        #[command(flatten)]
        global: GlobalOpts,
        #[command(subcommand)]
        command: files::FilesCommand,
    },
    /// Certificates: upload, replace, issue from the server's CA, revoke, list; the CA.
    ///
    /// Example: tether certs issue api --dns api.internal --label role=api
    Certs {
        #[command(flatten)]
        global: GlobalOpts,
        #[command(subcommand)]
        command: certs::CertsCommand,
    },
    /// Read the audit log and verify its hash chain.
    Audit {
        #[command(flatten)]
        global: GlobalOpts,
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
}

/// Runs one operator command; the result is the process exit code (a check
/// such as `audit verify` can fail without an error).
pub async fn run(command: OperatorCommand) -> anyhow::Result<i32> {
    match command {
        OperatorCommand::Login(args) => login::run(args).await,
        OperatorCommand::Agents { global, command } => agents::run(&global.connect()?, command).await,
        OperatorCommand::Run(args) => run::run(*args).await,
        OperatorCommand::Commands { global, command } => commands::run(&global.connect()?, command).await,
        OperatorCommand::Batches { global, command } => commands::run_batches(&global.connect()?, command).await,
        OperatorCommand::Config { global, command } => config::run(&global.connect()?, command).await,
        OperatorCommand::EnrollTokens { global, command } => tokens::run_enroll(&global.connect()?, command).await,
        OperatorCommand::Tokens { global, command } => tokens::run_api(&global.connect()?, command).await,
        OperatorCommand::Device { global, command } => device::run(&global.connect()?, command).await,
        OperatorCommand::Users { global, command } => users::run(&global.connect()?, command).await,
        OperatorCommand::Files { global, command } => files::run(&global.connect()?, command).await,
        OperatorCommand::Certs { global, command } => certs::run(&global.connect()?, command).await,
        OperatorCommand::Audit { global, command } => return audit::run(&global, command).await,
    }
    .map(|()| 0)
}

/// Options every operator command takes (besides `login`, which has its own).
#[derive(Debug, Clone, Args)]
pub struct GlobalOpts {
    /// Server URL [default: the one `tether login` saved, else http://127.0.0.1:8080]
    #[arg(long, env = "TETHER_SERVER", global = true, value_name = "URL")]
    pub server: Option<String>,
    /// Operator API token (tth_…); TETHER_USER and TETHER_PASSWORD give HTTP Basic instead
    #[arg(long, env = "TETHER_TOKEN", global = true, hide_env_values = true, value_name = "TOKEN")]
    pub token: Option<String>,
    /// PEM file with the CA(s) of a server whose certificate a private CA signed; only these are trusted
    #[arg(long, env = "TETHER_CA_FILE", global = true, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Output format: human tables or JSON for scripts
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// What a command needs to talk to the server: an authenticated client, the
/// server URL as the user knows it and the output format.
#[derive(Debug)]
pub struct Ctx {
    pub client: Client,
    pub server: String,
    pub output: Output,
}

impl GlobalOpts {
    /// Resolves server and credentials (flags and environment first, then
    /// the saved login) and builds the client.
    pub fn connect(&self) -> anyhow::Result<Ctx> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let given = Given {
            server: self.server.clone().filter(|s| !s.is_empty()),
            token: self.token.clone().filter(|t| !t.is_empty()),
            user: env("TETHER_USER"),
            password: env("TETHER_PASSWORD"),
        };
        // The saved login only matters when something is missing.
        let saved = if given.server.is_none() || !given.has_credentials() { login::load()? } else { None };
        let (server, credentials) = resolve(given, saved.as_ref())?;
        let client = client_for(&server, self.ca_file.as_deref())?.with_credentials(credentials);
        Ok(Ctx { client, server, output: self.output })
    }
}

/// An unauthenticated client for `server`, trusting only the CA(s) in
/// `ca_file` when one is given.
pub fn client_for(server: &str, ca_file: Option<&Path>) -> anyhow::Result<Client> {
    let mut builder = Client::builder(server);
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).with_context(|| format!("reading CA file {}", path.display()))?;
        builder = builder.ca_pem(pem);
    }
    builder.build().map_err(|e| match (e, ca_file) {
        (ClientError::Ca(why), Some(path)) => anyhow::anyhow!("CA file {}: {why}", path.display()),
        (e, _) => anyhow::Error::new(e).context(format!("invalid server url {server:?}")),
    })
}

/// Server and credentials as given on the command line or in the environment.
#[derive(Default)]
struct Given {
    server: Option<String>,
    token: Option<String>,
    user: Option<String>,
    password: Option<String>,
}

impl Given {
    fn has_credentials(&self) -> bool {
        self.token.is_some() || (self.user.is_some() && self.password.is_some())
    }
}

/// Credential precedence (protocol.md §1): `--token`/TETHER_TOKEN, then
/// TETHER_USER + TETHER_PASSWORD (Basic), then the saved login. The saved
/// token is only ever sent to the server it was issued by.
fn resolve(given: Given, saved: Option<&login::SavedLogin>) -> anyhow::Result<(String, Credentials)> {
    let server = given.server.or_else(|| saved.map(|s| s.server.clone())).unwrap_or_else(|| DEFAULT_SERVER.to_owned());
    let server = normalize_server(&server);
    if let Some(token) = given.token {
        return Ok((server, Credentials::Bearer(token)));
    }
    if let (Some(username), Some(password)) = (given.user, given.password) {
        return Ok((server, Credentials::Basic { username, password }));
    }
    match saved {
        Some(s) if normalize_server(&s.server) == server => Ok((server, Credentials::Bearer(s.token.clone()))),
        Some(s) => bail!(
            "no credentials for {server} (the saved login is for {}): run `tether login --server {server}` or set TETHER_TOKEN",
            normalize_server(&s.server)
        ),
        None => bail!("no credentials: run `tether login` or set TETHER_TOKEN (or TETHER_USER and TETHER_PASSWORD)"),
    }
}

/// `http://host:8080/` and `http://host:8080` are the same server.
pub fn normalize_server(server: &str) -> String {
    server.trim().trim_end_matches('/').to_owned()
}

/// An API error as the user should read it: the envelope's `what` and `key`,
/// plus what to do about missing or bad credentials.
pub fn api_error(e: ClientError) -> anyhow::Error {
    match &e {
        ClientError::Api { body, .. } => {
            let hint = match body.key() {
                Some(ErrorKey::Unauthenticated | ErrorKey::TokenExpired) => {
                    "; run `tether login` or set TETHER_TOKEN to valid credentials"
                }
                Some(ErrorKey::Forbidden) => "; your role does not allow this",
                _ => "",
            };
            anyhow::anyhow!("{} ({}){hint}", body.what, body.key)
        }
        ClientError::Http(_) => anyhow::Error::new(e).context("cannot reach the server"),
        _ => anyhow::Error::new(e),
    }
}

/// Which agents something is for: exactly one kind of target.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct TargetArgs {
    /// This agent (repeatable)
    #[arg(long = "agent", value_name = "ID")]
    pub agents: Vec<tether_proto::AgentId>,
    /// The agents with this label (repeatable; all must match)
    #[arg(long = "label", value_name = "K=V", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Every agent
    #[arg(long)]
    pub all: bool,
}

impl TargetArgs {
    pub fn target(&self) -> anyhow::Result<tether_proto::command::Target> {
        use tether_proto::command::Target;
        Ok(if self.all {
            Target::all()
        } else if !self.agents.is_empty() {
            Target::agents(self.agents.iter().copied())
        } else {
            Target::labels(labels_from(&self.labels)?)
        })
    }
}

/// A target as one short text: `all`, `k=v,…` or the agent ids.
pub fn fmt_target(target: &tether_proto::command::Target) -> String {
    if target.all == Some(true) {
        return "all".to_owned();
    }
    if let Some(labels) = &target.labels {
        return fmt_labels(labels);
    }
    let ids = target.agents.iter().flatten().map(ToString::to_string).collect::<Vec<_>>();
    format!("agents:{}", ids.join(","))
}

/// Parses one `k=v` label, checked with the same rules the server applies.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("expected key=value, got {s:?}"))?;
    validate_labels(&Labels::from([(k.to_owned(), v.to_owned())]))?;
    Ok((k.to_owned(), v.to_owned()))
}

/// Collects parsed `k=v` pairs into a label set; a key given twice with
/// different values is an error rather than a silent overwrite.
pub fn labels_from(pairs: &[(String, String)]) -> anyhow::Result<Labels> {
    let mut labels = Labels::new();
    for (k, v) in pairs {
        if let Some(previous) = labels.insert(k.clone(), v.clone())
            && previous != *v
        {
            bail!("label {k:?} given twice with different values");
        }
    }
    validate_labels(&labels).map_err(anyhow::Error::msg)?;
    Ok(labels)
}

/// Fetches pages (`fetch(cursor, page_size)`) until the last one or until
/// `limit` items are in hand.
pub async fn collect_pages<T, F, Fut>(limit: Option<u32>, mut fetch: F) -> Result<Vec<T>, ClientError>
where
    F: FnMut(Option<String>, u32) -> Fut,
    Fut: Future<Output = Result<Page<T>, ClientError>>,
{
    let mut items = Vec::new();
    let mut cursor = None;
    loop {
        let have = u32::try_from(items.len()).unwrap_or(u32::MAX);
        let want = limit.map_or(MAX_PAGE_LIMIT, |l| l.saturating_sub(have).min(MAX_PAGE_LIMIT));
        if want == 0 {
            break;
        }
        let page = fetch(cursor.take(), want).await?;
        let got = page.data.len();
        items.extend(page.data);
        match page.next_cursor {
            Some(next) if got > 0 => cursor = Some(next),
            _ => break,
        }
    }
    Ok(items)
}

/// Text an agent controls (its output, name, hostname) shown on the
/// operator's terminal: control characters other than newline and tab are
/// printed escaped, so a compromised agent cannot drive the terminal with
/// escape sequences.
pub fn terminal_safe(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

pub fn print_table(table: &Table) {
    println!("{}", terminal_safe(&table.trim_fmt()));
}

pub fn print_json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value).context("cannot encode the answer as JSON")?);
    Ok(())
}

/// A human table with these column headers.
pub fn table(headers: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_style(presets::NOTHING).set_content_arrangement(ContentArrangement::Dynamic);
    table.set_header(headers.iter().copied());
    table
}

/// A two-column field/value table for one object.
pub fn fields_table(rows: Vec<(&str, String)>) -> Table {
    let mut table = Table::new();
    table.load_style(presets::NOTHING).set_content_arrangement(ContentArrangement::Dynamic);
    for (field, value) in rows {
        table.add_row([format!("{field}:"), value]);
    }
    table
}

pub fn fmt_time(t: Option<Timestamp>) -> String {
    let Some(t) = t else { return "-".to_owned() };
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| t.to_string())
}

pub fn fmt_labels(labels: &Labels) -> String {
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

pub fn fmt_opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// The wire name of a serde enum (e.g. an agent status).
pub fn wire_name<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use login::SavedLogin;

    fn saved(server: &str) -> SavedLogin {
        SavedLogin { server: server.into(), token: "tth_saved".into(), created_token_id: None }
    }

    fn bearer(c: &Credentials) -> Option<&str> {
        match c {
            Credentials::Bearer(t) => Some(t),
            _ => None,
        }
    }

    #[test]
    fn token_flag_beats_basic_and_saved_login() {
        let given = Given {
            token: Some("tth_flag".into()),
            user: Some("alice".into()),
            password: Some("pw".into()),
            ..Given::default()
        };
        let (server, creds) = resolve(given, Some(&saved("http://a:1"))).expect("resolves");
        assert_eq!(server, "http://a:1");
        assert_eq!(bearer(&creds), Some("tth_flag"));
    }

    #[test]
    fn basic_beats_saved_login() {
        let given = Given { user: Some("alice".into()), password: Some("pw".into()), ..Given::default() };
        let (_, creds) = resolve(given, Some(&saved("http://a:1"))).expect("resolves");
        assert!(matches!(creds, Credentials::Basic { ref username, .. } if username == "alice"));
    }

    #[test]
    fn user_without_password_falls_back_to_saved_login() {
        let given = Given { user: Some("alice".into()), ..Given::default() };
        let (_, creds) = resolve(given, Some(&saved("http://a:1/"))).expect("resolves");
        assert_eq!(bearer(&creds), Some("tth_saved"));
    }

    #[test]
    fn saved_login_supplies_server_and_token() {
        let (server, creds) = resolve(Given::default(), Some(&saved("http://a:1/"))).expect("resolves");
        assert_eq!(server, "http://a:1");
        assert_eq!(bearer(&creds), Some("tth_saved"));
    }

    #[test]
    fn saved_token_is_never_sent_to_another_server() {
        let given = Given { server: Some("http://b:2".into()), ..Given::default() };
        let err = resolve(given, Some(&saved("http://a:1"))).expect_err("other server");
        assert!(err.to_string().contains("tether login --server http://b:2"), "{err}");
    }

    #[test]
    fn no_credentials_at_all_says_to_log_in() {
        let err = resolve(Given::default(), None).expect_err("nothing given");
        let msg = err.to_string();
        assert!(msg.contains("tether login") && msg.contains("TETHER_TOKEN"), "{msg}");
    }

    #[test]
    fn server_defaults_to_localhost() {
        let given = Given { token: Some("t".into()), ..Given::default() };
        assert_eq!(resolve(given, None).expect("resolves").0, DEFAULT_SERVER);
    }

    #[test]
    fn label_parser_accepts_k_eq_v_and_rejects_the_rest() {
        assert_eq!(parse_label("role=web"), Ok(("role".into(), "web".into())));
        assert_eq!(parse_label("env=a=b"), Ok(("env".into(), "a=b".into())));
        assert_eq!(parse_label("empty="), Ok(("empty".into(), String::new())));
        for bad in ["role", "=web", "ro le=web", "role\u{7}=x", "k=line\nbreak"] {
            assert!(parse_label(bad).is_err(), "{bad:?}");
        }
        assert!(parse_label(&format!("{}=v", "k".repeat(64))).is_err());
    }

    #[test]
    fn control_characters_from_agents_are_shown_escaped() {
        assert!(matches!(terminal_safe("plain\ttext\n"), Cow::Borrowed(_)));
        assert_eq!(terminal_safe("\u{1b}]0;pwned\u{7}ok\r"), "\\u{1b}]0;pwned\\u{7}ok\\r");
        assert_eq!(terminal_safe("a\u{9b}31mb"), "a\\u{9b}31mb", "C1 controls too");
    }

    #[test]
    fn labels_given_twice_must_agree() {
        let pair = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let labels = labels_from(&[pair("a", "1"), pair("b", "2"), pair("a", "1")]).expect("same value twice is fine");
        assert_eq!(fmt_labels(&labels), "a=1,b=2");
        assert!(labels_from(&[pair("a", "1"), pair("a", "2")]).is_err());
    }

    #[tokio::test]
    async fn pages_are_followed_until_the_last_or_the_limit() {
        // 7 items served in pages of at most 3, whatever size is asked for.
        let fetch = |cursor: Option<String>, size: u32| async move {
            let start: u32 = cursor.map_or(0, |c| c.parse().expect("numeric cursor"));
            let end = (start + size.min(3)).min(7);
            let next_cursor = (end < 7).then(|| end.to_string());
            Ok::<_, ClientError>(Page { data: (start..end).collect(), next_cursor })
        };
        assert_eq!(collect_pages(None, fetch).await.expect("all"), (0..7).collect::<Vec<_>>());
        assert_eq!(collect_pages(Some(5), fetch).await.expect("five"), (0..5).collect::<Vec<_>>());
        assert_eq!(collect_pages(Some(2), fetch).await.expect("two"), vec![0, 1]);
    }
}
