//! The embedded SQLite backend: WAL, `synchronous=FULL`, one writer
//! connection and a small reader pool. Every write is a `BEGIN IMMEDIATE`
//! transaction on the single writer, which is also what serialises each
//! read-decide-write method (the store contract in `store.rs`). One file per
//! area, the same files as `postgres/`.

mod agents;
mod audit;
mod certs;
mod commands;
mod configs;
mod device;
mod files;
mod items;
mod retention;
mod server;
mod signals;
mod telemetry;
mod tokens;
mod users;

mod rows {
    crate::rows::decoders!(sqlx::sqlite::SqliteRow);
}

use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, Transaction};

use crate::sql::migrate_error;
use crate::{OpenOptions, Result, StoreError};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

type Tx = Transaction<'static, Sqlite>;

#[derive(Debug)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
}

impl SqliteStore {
    /// Opens the database file at `path` (creating it if `options.create`)
    /// and applies migrations.
    pub async fn open(path: &Path, options: &OpenOptions) -> Result<Self> {
        if !options.create && !path.exists() {
            return Err(StoreError::Open(format!("no tether database at {}", path.display())));
        }
        let connect = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(options.create)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let opened = |e: sqlx::Error| StoreError::Open(format!("opening {} failed: {e}", path.display()));
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .connect_with(connect.clone())
            .await
            .map_err(opened)?;
        MIGRATOR.run(&writer).await.map_err(|e| migrate_error(e, &path.display().to_string()))?;
        let reader =
            SqlitePoolOptions::new().max_connections(4).connect_with(connect.read_only(true)).await.map_err(opened)?;
        Ok(Self { writer, reader })
    }

    async fn begin(&self) -> Result<Tx> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }
}
