//! Readiness, server keys, singleton jobs and request nonces on PostgreSQL.

use async_trait::async_trait;
use sqlx::{ConnectOptions, Connection, PgConnection};
use tether_proto::AgentId;

use super::{MIGRATOR, PgStore};
use crate::sql::check_schema;
use crate::{BackendKind, JobLease, Result, ServerStore};

/// A session-level advisory lock on a connection of its own: PostgreSQL
/// releases it when that connection ends, so a replica that dies or loses
/// the database hands the job over without anyone cleaning up.
#[derive(Debug)]
struct PgJobLease {
    conn: PgConnection,
}

#[async_trait]
impl JobLease for PgJobLease {
    async fn held(&mut self) -> bool {
        self.conn.ping().await.is_ok()
    }
}

#[async_trait]
impl ServerStore for PgStore {
    fn kind(&self) -> BackendKind {
        BackendKind::Postgres
    }

    async fn check_ready(&self) -> Result<()> {
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success").fetch_one(&self.pool).await?;
        check_schema(applied, &MIGRATOR)
    }

    async fn server_key(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>> {
        // The insert waits for a concurrent first insert of the same name and
        // then does nothing; the select sees whichever value won.
        sqlx::query("INSERT INTO server_keys (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(candidate)
            .execute(&self.pool)
            .await?;
        Ok(sqlx::query_scalar("SELECT value FROM server_keys WHERE name = $1").bind(name).fetch_one(&self.pool).await?)
    }

    async fn replace_server_key(&self, name: &str, old: &[u8], new: &[u8]) -> Result<bool> {
        let done = sqlx::query("UPDATE server_keys SET value = $1 WHERE name = $2 AND value = $3")
            .bind(new)
            .bind(name)
            .bind(old)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn try_job_lock(&self, name: &str) -> Result<Option<Box<dyn JobLease>>> {
        let mut conn = self.connect.connect().await?;
        let got: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended(current_schema() || ':job:' || $1, 0))")
                .bind(name)
                .fetch_one(&mut conn)
                .await?;
        if !got {
            // Closing ends the session; it holds nothing.
            let _ = conn.close().await;
            return Ok(None);
        }
        Ok(Some(Box::new(PgJobLease { conn })))
    }

    async fn remember_nonce(&self, agent_id: AgentId, nonce: &str, expires_at_s: i64) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO request_nonces (agent_id, nonce, expires_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(agent_id.to_string())
        .bind(nonce)
        .bind(expires_at_s)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn prune_nonces(&self, now_s: i64) -> Result<u64> {
        let done =
            sqlx::query("DELETE FROM request_nonces WHERE expires_at < $1").bind(now_s).execute(&self.pool).await?;
        Ok(done.rows_affected())
    }
}
