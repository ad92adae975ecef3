//! One store per test on each backend, with what tests need beyond the
//! traits: raw SQL on the same database (to tamper, or to break it), and a
//! second handle on it (another server sharing the database).

use std::sync::Arc;

use tether_store::{Location, OpenOptions, Store};

/// Declares each listed `async fn name(h: &Harness)` as one test per
/// backend: `sqlite::name` and `postgres::name` (skipped, saying why,
/// without `TETHER_TEST_POSTGRES_URL`).
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let h = crate::harness::Harness::sqlite().await;
                    super::$name(&h).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(h) = crate::harness::Harness::postgres(stringify!($name)).await else { return };
                    super::$name(&h).await;
                }
            )*
        }
    };
}
pub(crate) use conformance;

pub struct Harness {
    pub store: Arc<dyn Store>,
    location: Location,
    /// Dropped with the harness: deletes the temp dir or the test database.
    _cleanup: Box<dyn std::any::Any + Send + Sync>,
}

impl Harness {
    pub async fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let location = Location::new(None, dir.path()).expect("location");
        Self::open(location, Box::new(dir)).await
    }

    pub async fn postgres(test: &str) -> Option<Self> {
        let db = tether_testkit::pg::TestDatabase::create(test).await?;
        let location = Location::new(Some(&db.url), std::path::Path::new(".")).expect("location");
        Some(Self::open(location, Box::new(db)).await)
    }

    async fn open(location: Location, cleanup: Box<dyn std::any::Any + Send + Sync>) -> Self {
        let store = tether_store::open(&location, &OpenOptions::default()).await.expect("open store");
        Self { store, location, _cleanup: cleanup }
    }

    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// Another handle on the same database, as a second server would have.
    pub async fn another_server(&self) -> Arc<dyn Store> {
        tether_store::open(&self.location, &OpenOptions::default()).await.expect("open a second store")
    }

    /// Runs SQL on the database directly, around the store (to tamper with it).
    pub async fn exec(&self, sql: &str) {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match &self.location {
            Location::Sqlite(path) => {
                let url = format!("sqlite://{}", path.display());
                let pool = sqlx::SqlitePool::connect(&url).await.expect("connect");
                sqlx::raw_sql(sql).execute(&pool).await.expect("exec");
                pool.close().await;
            }
            Location::Postgres(url) => {
                let pool = sqlx::PgPool::connect(url).await.expect("connect");
                sqlx::raw_sql(sql).execute(&pool).await.expect("exec");
                pool.close().await;
            }
        }
    }

    /// Makes every later audit insert fail, as a full or broken audit table would.
    pub async fn break_audit(&self) {
        match &self.location {
            Location::Sqlite(_) => {
                self.exec(
                    "CREATE TRIGGER audit_full BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'audit unavailable'); END",
                )
                .await
            }
            Location::Postgres(_) => {
                self.exec(
                    "CREATE FUNCTION audit_full() RETURNS trigger LANGUAGE plpgsql AS
                       $$ BEGIN RAISE EXCEPTION 'audit unavailable'; END $$;
                     CREATE TRIGGER audit_full BEFORE INSERT ON audit FOR EACH ROW EXECUTE FUNCTION audit_full();",
                )
                .await
            }
        }
    }
}
