//! Readiness, server keys, singleton jobs and request nonces on SQLite.

use async_trait::async_trait;
use tether_proto::AgentId;

use super::{MIGRATOR, SqliteStore};
use crate::sql::check_schema;
use crate::{BackendKind, JobLease, Result, ServerStore};

/// One SQLite file has one server process, so every singleton job is its own.
#[derive(Debug)]
struct OnlyServer;

#[async_trait]
impl JobLease for OnlyServer {
    async fn held(&mut self) -> bool {
        true
    }
}

#[async_trait]
impl ServerStore for SqliteStore {
    fn kind(&self) -> BackendKind {
        BackendKind::Sqlite
    }

    async fn check_ready(&self) -> Result<()> {
        let applied: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(&self.reader)
            .await?;
        check_schema(applied, &MIGRATOR)
    }

    async fn server_key(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>> {
        let mut tx = self.begin().await?;
        sqlx::query("INSERT INTO server_keys (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(candidate)
            .execute(&mut *tx)
            .await?;
        let value =
            sqlx::query_scalar("SELECT value FROM server_keys WHERE name = ?").bind(name).fetch_one(&mut *tx).await?;
        tx.commit().await?;
        Ok(value)
    }

    async fn replace_server_key(&self, name: &str, old: &[u8], new: &[u8]) -> Result<bool> {
        let mut tx = self.begin().await?;
        let done = sqlx::query("UPDATE server_keys SET value = ? WHERE name = ? AND value = ?")
            .bind(new)
            .bind(name)
            .bind(old)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    async fn try_job_lock(&self, _name: &str) -> Result<Option<Box<dyn JobLease>>> {
        Ok(Some(Box::new(OnlyServer)))
    }

    async fn remember_nonce(&self, agent_id: AgentId, nonce: &str, expires_at_s: i64) -> Result<bool> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "INSERT INTO request_nonces (agent_id, nonce, expires_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(agent_id.to_string())
        .bind(nonce)
        .bind(expires_at_s)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    async fn prune_nonces(&self, now_s: i64) -> Result<u64> {
        let mut tx = self.begin().await?;
        let done = sqlx::query("DELETE FROM request_nonces WHERE expires_at < ?").bind(now_s).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }
}
