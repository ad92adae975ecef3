//! `tether users list|create|set-role|set-password|delete` (admin only on
//! the server). Passwords never come from command-line arguments, which
//! other local users can read in `ps`: they are read from stdin, asked for
//! on the terminal, or generated and printed once.

use std::io::{BufRead, IsTerminal};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};
use rand::distr::{Alphanumeric, SampleString};
use tether_proto::user::{CreateUser, MIN_PASSWORD_LEN, UpdateUser, User};

use super::{Ctx, Output, api_error, fmt_time, print_json, print_table, table};

/// Length of a generated password: ~119 bits from [A-Za-z0-9].
const GENERATED_PASSWORD_LEN: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// Everything, including users and their tokens
    Admin,
    /// Commands, configs, files, certificates, enrollment, device approval
    Operator,
    /// Read-only
    Viewer,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Operator => "operator",
            Self::Viewer => "viewer",
        }
    }
}

/// Where a new password comes from (the terminal when neither flag is given).
#[derive(Debug, Args)]
pub struct PasswordSource {
    /// Read the password from the first line of stdin
    #[arg(long, conflicts_with = "generate_password")]
    password_stdin: bool,
    /// Generate a random password and print it once
    #[arg(long)]
    generate_password: bool,
}

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// List users and their roles.
    List,
    /// Create a user.
    Create {
        /// The user name (1-64 chars of [A-Za-z0-9._@-])
        name: String,
        /// What the user may do
        #[arg(long, value_enum)]
        role: Role,
        #[command(flatten)]
        password: PasswordSource,
    },
    /// Change a user's role.
    SetRole {
        /// The user name
        name: String,
        /// The new role
        #[arg(value_enum)]
        role: Role,
    },
    /// Set a new password for a user.
    SetPassword {
        /// The user name
        name: String,
        #[command(flatten)]
        password: PasswordSource,
    },
    /// Delete (disable) a user: their logins, sessions and API tokens stop working.
    Delete {
        /// The user name
        name: String,
    },
}

pub async fn run(ctx: &Ctx, command: UsersCommand) -> anyhow::Result<()> {
    match command {
        UsersCommand::List => {
            let users = ctx.client.list_users().await.map_err(api_error)?;
            print_users(ctx.output, &users)
        }
        UsersCommand::Create { name, role, password } => {
            let (secret, generated) = password.read(&name)?;
            let req = CreateUser { username: name, password: secret.clone(), role: role.as_str().to_owned() };
            let user = ctx.client.create_user(&req).await.map_err(api_error)?;
            if ctx.output == Output::Json {
                let mut value = serde_json::to_value(&user).context("cannot encode the answer as JSON")?;
                if generated {
                    value["password"] = secret.into();
                }
                return print_json(&value);
            }
            println!("created user {} ({}) with role {}", user.username, user.id, user.role);
            if generated {
                println!("password (shown only this once): {secret}");
            }
            Ok(())
        }
        UsersCommand::SetRole { name, role } => {
            let id = find(ctx, &name).await?.id;
            let req = UpdateUser { role: Some(role.as_str().to_owned()), password: None };
            let user = ctx.client.update_user(&id, &req).await.map_err(api_error)?;
            match ctx.output {
                Output::Json => print_json(&user),
                Output::Table => {
                    println!("user {} now has role {}", user.username, user.role);
                    Ok(())
                }
            }
        }
        UsersCommand::SetPassword { name, password } => {
            let id = find(ctx, &name).await?.id;
            let (secret, generated) = password.read(&name)?;
            let req = UpdateUser { role: None, password: Some(secret.clone()) };
            let user = ctx.client.update_user(&id, &req).await.map_err(api_error)?;
            match ctx.output {
                Output::Json => {
                    let mut value =
                        serde_json::json!({"id": user.id, "username": user.username, "password_changed": true});
                    if generated {
                        value["password"] = secret.into();
                    }
                    print_json(&value)
                }
                Output::Table => {
                    println!("password of {} changed", user.username);
                    if generated {
                        println!("password (shown only this once): {secret}");
                    }
                    Ok(())
                }
            }
        }
        UsersCommand::Delete { name } => {
            let user = find(ctx, &name).await?;
            ctx.client.delete_user(&user.id).await.map_err(api_error)?;
            match ctx.output {
                Output::Json => {
                    print_json(&serde_json::json!({"id": user.id, "username": user.username, "deleted": true}))
                }
                Output::Table => {
                    println!("deleted user {} ({})", user.username, user.id);
                    Ok(())
                }
            }
        }
    }
}

/// The API addresses users by id; people use names. A deleted user keeps
/// its name in the list (disabled), so an active match is preferred.
async fn find(ctx: &Ctx, name: &str) -> anyhow::Result<User> {
    let users = ctx.client.list_users().await.map_err(api_error)?;
    let mut matches: Vec<User> = users.into_iter().filter(|u| u.username == name).collect();
    matches.sort_by_key(|u| u.disabled);
    match matches.into_iter().next() {
        Some(u) if !u.disabled => Ok(u),
        Some(_) => bail!("user {name:?} is deleted"),
        None => bail!("no user named {name:?}"),
    }
}

impl PasswordSource {
    /// The new password and whether it was generated (and so must be shown).
    fn read(&self, name: &str) -> anyhow::Result<(String, bool)> {
        if self.generate_password {
            return Ok((Alphanumeric.sample_string(&mut rand::rng(), GENERATED_PASSWORD_LEN), true));
        }
        let password = if self.password_stdin {
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line).context("cannot read the password from stdin")?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        } else if std::io::stdin().is_terminal() {
            let first = rpassword::prompt_password(format!("new password for {name}: "))
                .context("cannot read the password from the terminal")?;
            let again =
                rpassword::prompt_password("repeat it: ").context("cannot read the password from the terminal")?;
            if first != again {
                bail!("the passwords do not match");
            }
            first
        } else {
            bail!("no password source: pass --password-stdin or --generate-password, or run on a terminal to be asked");
        };
        if password.chars().count() < MIN_PASSWORD_LEN {
            bail!("the password must be at least {MIN_PASSWORD_LEN} characters");
        }
        Ok((password, false))
    }
}

fn print_users(output: Output, users: &[User]) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(users);
    }
    let mut t = table(&["ID", "USERNAME", "ROLE", "STATE", "CREATED"]);
    for u in users {
        t.add_row([
            u.id.clone(),
            u.username.clone(),
            u.role.clone(),
            if u.disabled { "deleted" } else { "active" }.to_owned(),
            fmt_time(Some(u.created_at)),
        ]);
    }
    print_table(&t);
    Ok(())
}
