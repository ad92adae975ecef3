//! Where a store's data lives, parsed from `--database-url` or the data dir,
//! and shown without its password.

use std::path::{Path, PathBuf};

use crate::{Result, StoreError};

/// The file name of the embedded database inside a data dir.
pub const SQLITE_FILE: &str = "tether.db";

#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// An SQLite database file.
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL.
    Postgres(String),
}

impl Location {
    /// `database_url` when given (`postgres://…`, `postgresql://…`,
    /// `sqlite://PATH`, `sqlite:PATH`), else the embedded database in `data_dir`.
    pub fn new(database_url: Option<&str>, data_dir: &Path) -> Result<Self> {
        let Some(url) = database_url.map(str::trim).filter(|u| !u.is_empty()) else {
            return Ok(Location::Sqlite(data_dir.join(SQLITE_FILE)));
        };
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Location::Postgres(url.to_owned()));
        }
        if let Some(path) = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")) {
            if path.is_empty() {
                return Err(StoreError::Open("sqlite: URL has no file path".into()));
            }
            return Ok(Location::Sqlite(PathBuf::from(path)));
        }
        Err(StoreError::Open(format!("unsupported database URL {}: use postgres://… or sqlite://PATH", redact(url))))
    }

    /// Whether several servers may share this database.
    pub fn shared(&self) -> bool {
        matches!(self, Location::Postgres(_))
    }
}

/// The URL with any password replaced by `***`, for messages and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    // A password in the query (`?password=…`) is hidden too.
    format!("{scheme}://{authority}{}", hide_query_password(tail))
}

fn hide_query_password(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else { return tail.to_owned() };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{path}?{}", query.join("&"))
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sqlite(path) => write!(f, "{}", path.display()),
            Location::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Location({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_dir_holds_the_embedded_database_unless_a_url_says_otherwise() {
        let dir = Path::new("/var/lib/tether");
        assert_eq!(Location::new(None, dir).expect("dir"), Location::Sqlite(dir.join("tether.db")));
        assert_eq!(Location::new(Some(""), dir).expect("empty"), Location::Sqlite(dir.join("tether.db")));
        assert_eq!(Location::new(Some("sqlite:///tmp/x.db"), dir).expect("url"), Location::Sqlite("/tmp/x.db".into()));
        assert_eq!(Location::new(Some("sqlite:rel.db"), dir).expect("url"), Location::Sqlite("rel.db".into()));
        let pg = Location::new(Some("postgresql://db/tether"), dir).expect("pg");
        assert!(pg.shared());
        assert!(Location::new(Some("mysql://db/tether"), dir).is_err());
    }

    #[test]
    fn passwords_never_show() {
        assert_eq!(redact("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("postgres://h/db?user=u&password=secret"), "postgres://h/db?user=u&password=***");
        assert_eq!(redact("postgres://u:p%40ss@h/db"), "postgres://u:***@h/db");
        let shown = Location::Postgres("postgres://u:secret@h/db".into());
        assert!(!format!("{shown} {shown:?}").contains("secret"));
    }
}
