//! A fresh PostgreSQL database per test, dropped when the test ends.

use std::str::FromStr;

use sqlx::ConnectOptions;
use sqlx::postgres::PgConnectOptions;

/// The variable naming the PostgreSQL server tests may use (any database
/// on it: it is only used to create and drop the tests' own).
pub const ENV: &str = "TETHER_TEST_POSTGRES_URL";

const PREFIX: &str = "tether_test_";

/// A database that exists for as long as this value lives (for a test, or
/// a benchmark run).
#[derive(Debug)]
pub struct TestDatabase {
    /// The URL of the new database.
    pub url: String,
    admin: String,
    name: String,
}

/// The server URL from [`ENV`], or `None` after printing why `test` skips.
pub fn server(test: &str) -> Option<String> {
    match std::env::var(ENV) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            crate::skip(test, &format!("{ENV} is not set (.ci/run sets it when PostgreSQL answers on 127.0.0.1:5432)"));
            None
        }
    }
}

impl TestDatabase {
    /// Creates an empty database on the [`ENV`] server, or returns `None`
    /// (after printing why) when the variable is unset. Panics when the
    /// server cannot be reached: a configured PostgreSQL that is down is a
    /// failure, not a skip.
    pub async fn create(test: &str) -> Option<Self> {
        Some(Self::create_on(&server(test)?).await)
    }

    /// Creates an empty database on the PostgreSQL server at `admin` (a URL
    /// of any database there). Panics when that fails.
    pub async fn create_on(admin: &str) -> Self {
        let admin = admin.to_owned();
        let mut conn = connect(&admin).await;
        drop_orphans(&mut conn).await;
        let name = format!("{PREFIX}{}_{}", std::process::id(), uuid::Uuid::now_v7().simple());
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("creating test database {name}: {e}"));
        let mut url = url::Url::parse(&admin).unwrap_or_else(|e| panic!("{ENV} is not a URL: {e}"));
        url.set_path(&format!("/{name}"));
        Self { url: url.to_string(), admin, name }
    }
}

async fn connect(url: &str) -> sqlx::PgConnection {
    let options = PgConnectOptions::from_str(url).unwrap_or_else(|e| panic!("{ENV}: {e}"));
    options.connect().await.unwrap_or_else(|e| panic!("connecting to the PostgreSQL of {ENV}: {e}"))
}

/// Drops test databases whose process is gone (a run that was killed
/// before its databases could be dropped).
async fn drop_orphans(conn: &mut sqlx::PgConnection) {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'tether\\_test\\_%'")
            .fetch_all(&mut *conn)
            .await
            .unwrap_or_default();
    for name in names {
        let pid = name.strip_prefix(PREFIX).and_then(|rest| rest.split('_').next()).and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                .execute(&mut *conn)
                .await;
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Drop cannot await: a thread with its own runtime does it, and is
        // waited for so the database is gone when the test is.
        let done = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async {
                let mut conn = connect(&admin).await;
                let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                    .execute(&mut conn)
                    .await;
            });
        });
        let _ = done.join();
    }
}
