//! The PostgreSQL backend, for several tether servers sharing one database
//! (protocol.md §13). One file per area, the same files as `sqlite/`.
//!
//! Each read-decide-write method locks what it decides on before it reads
//! it (the store contract in `store.rs`): a row `FOR UPDATE` where there is
//! one row to lock (a command, a device grant, the audit chain head), and a
//! transaction-scoped advisory lock where the decision is about a set (the
//! pending device grants, a refresh-token family, whether any user exists).
//! Rows of many agents are always locked in id order, so two transactions
//! touching the same agents never wait on each other in a cycle.

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
    crate::rows::decoders!(sqlx::postgres::PgRow);
}

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, Postgres, Transaction};

use crate::location::redact;
use crate::sql::migrate_error;
use crate::{OpenOptions, Result, StoreError};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// How long a call waits for a pooled connection before it fails as
/// unavailable (503): bounded, so an outage answers quickly instead of
/// piling up requests.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// A pooled connection idle for longer is pinged before it is handed out
/// (it may have been cut meanwhile); one in steady use is not, which saves
/// a round trip on every call.
const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(1);

type Tx = Transaction<'static, Postgres>;

#[derive(Debug)]
pub struct PgStore {
    pool: PgPool,
    /// For the dedicated connections that hold singleton-job locks.
    connect: PgConnectOptions,
}

impl PgStore {
    /// Connects and applies migrations. Migrations run under sqlx's
    /// advisory lock, so replicas starting together apply them once.
    pub async fn open(url: &str, options: &OpenOptions) -> Result<Self> {
        let shown = redact(url);
        let connect = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Open(format!("bad PostgreSQL URL {shown}: {e}")))?
            .application_name("tether");
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_WHEN_IDLE_FOR {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(connect.clone())
            .await
            .map_err(|e| StoreError::Open(format!("cannot connect to PostgreSQL at {shown}: {e}")))?;
        if !options.create {
            let schema: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
                .fetch_one(&pool)
                .await
                .map_err(|e| StoreError::Open(format!("reading PostgreSQL at {shown}: {e}")))?;
            if !schema {
                return Err(StoreError::Open(format!("no tether database at {shown}")));
            }
        }
        MIGRATOR.run(&pool).await.map_err(|e| migrate_error(e, &shown))?;
        Ok(Self { pool, connect })
    }

    async fn begin(&self) -> Result<Tx> {
        Ok(self.pool.begin().await?)
    }

    /// A read-only transaction whose statements all see one snapshot.
    async fn snapshot(&self) -> Result<Tx> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
        Ok(tx)
    }
}

/// Takes the transaction-scoped advisory lock called `name` (released at
/// commit or rollback). Names are scoped to the schema, so tether clusters
/// in different schemas of one database never wait on each other.
async fn lock(tx: &mut Tx, name: &str) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended(current_schema() || ':' || $1, 0))")
        .bind(name)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Takes the lock called `name` shared: holders of the shared lock run
/// side by side, and all of them exclude one holding it with [`lock`].
async fn lock_shared(tx: &mut Tx, name: &str) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared(hashtextextended(current_schema() || ':' || $1, 0))")
        .bind(name)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
