//! Persistence for tether: the [`Store`] traits every handler and job talks
//! to, the rules they apply ([`rules`]), and two backends behind them —
//! embedded SQLite and PostgreSQL — chosen at run time by [`open`].
//!
//! The store owns transactions: each trait method is one atomic unit (its
//! audit row included), and a method that appends signals returns the new
//! stream heads so the caller can wake waiting agents *after* the commit.
//! The full contract, including what concurrent calls from several servers
//! may rely on, is on [`Store`]'s module, `store.rs`.

mod audit;
mod counting;
mod error;
mod location;
mod model;
mod postgres;
mod rows;
pub mod rules;
mod sql;
mod sqlite;
mod store;

use std::sync::Arc;

pub use audit::{
    AuditAnchor, AuditBreak, AuditEntry, AuditRecord, AuditVerification, GENESIS_HASH, MAX_LISTED_BREAKS,
    audit_row_problem, chain_hash, verify_audit,
};
pub use counting::{CountingStore, StoreCalls};
pub use error::{BackendError, Entity, Result, StoreError};
pub use location::{Location, redact as redact_url};
pub use model::*;
pub use store::{
    AgentStore, AuditStore, BlobSource, CertStore, CommandStore, ConfigStore, DeviceGrantStore, FileStore, ItemStore,
    JobLease, ServerStore, SignalStore, Store, TelemetryStore, TokenStore, UserStore,
};

/// Bytes per stored chunk of a blob: what one row holds and one read returns.
pub const BLOB_CHUNK: usize = 256 * 1024;

/// How to open a store.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Create the database when there is none (a server's first start);
    /// otherwise a missing database is an error (`tether server reset-admin`).
    pub create: bool,
    /// Most connections a PostgreSQL store opens (SQLite: one writer, a few readers).
    pub max_connections: u32,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self { create: true, max_connections: 16 }
    }
}

/// Opens the store at `location`, applying its migrations. Several servers
/// may open the same PostgreSQL database at once: migrations run under a
/// lock, one after the other.
pub async fn open(location: &Location, options: &OpenOptions) -> Result<Arc<dyn Store>> {
    Ok(match location {
        Location::Sqlite(path) => Arc::new(sqlite::SqliteStore::open(path, options).await?),
        Location::Postgres(url) => Arc::new(postgres::PgStore::open(url, options).await?),
    })
}
