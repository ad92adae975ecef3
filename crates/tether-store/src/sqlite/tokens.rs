//! Agent credentials on SQLite: enrollment tokens and refresh-token families.

use async_trait::async_trait;
use sqlx::Row;
use tether_proto::AgentId;

use super::SqliteStore;
use super::rows::{agent_key_from_row, enroll_token_from_row};
use crate::audit::AuditEntry;
use crate::rows::{AGENT_KEY_COLUMNS, ENROLL_TOKEN_COLUMNS};
use crate::rules::refresh::{self, PresentedToken, RefreshDecision, Successor};
use crate::sql::{json_text, parse_id, q};
use crate::{
    AgentKeyRecord, EnrollTokenRecord, Entity, Millis, NewAgentKey, NewEnrollToken, RefreshOutcome, Result, StoreError,
    TokenStore,
};

#[async_trait]
impl TokenStore for SqliteStore {
    async fn create_enroll_token(&self, token: NewEnrollToken, now: Millis, audit: AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO enroll_tokens (id, token_hash, labels, uses, created_by, created_at, expires_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&token.id)
        .bind(&token.token_hash[..])
        .bind(json_text(&token.labels))
        .bind(token.uses)
        .bind(&token.created_by)
        .bind(now)
        .bind(token.expires_at)
        .execute(&mut *tx)
        .await?;
        super::audit::insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_enroll_tokens(&self) -> Result<Vec<EnrollTokenRecord>> {
        let rows =
            q!("SELECT {ENROLL_TOKEN_COLUMNS} FROM enroll_tokens ORDER BY id DESC").fetch_all(&self.reader).await?;
        rows.iter().map(enroll_token_from_row).collect()
    }

    async fn revoke_enroll_token(&self, id: &str, now: Millis, audit: AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query("UPDATE enroll_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(Entity::EnrollToken));
        }
        super::audit::insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn refresh_family(&self, presented_hash: [u8; 32]) -> Result<Option<String>> {
        Ok(sqlx::query_scalar("SELECT family_id FROM refresh_tokens WHERE token_hash = ?")
            .bind(&presented_hash[..])
            .fetch_optional(&self.reader)
            .await?)
    }

    async fn rotate_refresh_token(
        &self,
        expected_agent: Option<AgentId>,
        presented_hash: [u8; 32],
        new_hash: [u8; 32],
        grace_ms: Millis,
        now: Millis,
        reuse_audit: AuditEntry,
    ) -> Result<RefreshOutcome> {
        let mut tx = self.begin().await?;
        let expected = expected_agent.map(|a| a.to_string());
        let Some(row) = sqlx::query(
            "SELECT t.family_id, t.used_at, t.successor_hash, t.revoked_at, a.revoked_at, t.agent_id, t.retried_at,
                    s.used_at IS NOT NULL, s.revoked_at IS NOT NULL, s.token_hash IS NOT NULL,
                    EXISTS (SELECT 1 FROM refresh_tokens f WHERE f.family_id = t.family_id AND f.revoked_at IS NULL)
             FROM refresh_tokens t JOIN agents a ON a.id = t.agent_id
             LEFT JOIN refresh_tokens s ON s.token_hash = t.successor_hash
             WHERE t.token_hash = ? AND (? IS NULL OR t.agent_id = ?)",
        )
        .bind(&presented_hash[..])
        .bind(&expected)
        .bind(&expected)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(RefreshOutcome::Invalid);
        };
        let family_id: String = row.try_get(0)?;
        let successor_hash: Option<Vec<u8>> = row.try_get(2)?;
        let agent_id: AgentId = parse_id(row.try_get(5)?)?;
        let presented = PresentedToken {
            agent_revoked: row.try_get::<Option<Millis>, _>(4)?.is_some(),
            revoked: row.try_get::<Option<Millis>, _>(3)?.is_some(),
            used_at: row.try_get(1)?,
            retried: row.try_get::<Option<Millis>, _>(6)?.is_some(),
            successor: row
                .try_get::<bool, _>(9)?
                .then(|| Ok::<_, sqlx::Error>(Successor { used: row.try_get(7)?, revoked: row.try_get(8)? }))
                .transpose()?,
            family_live: row.try_get(10)?,
        };
        let lost_response_retry = match refresh::decide(&presented, grace_ms, now) {
            RefreshDecision::AgentRevoked => return Ok(RefreshOutcome::AgentRevoked),
            RefreshDecision::Invalid => return Ok(RefreshOutcome::Invalid),
            RefreshDecision::Reuse => {
                sqlx::query("UPDATE refresh_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE family_id = ?")
                    .bind(now)
                    .bind(&family_id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "UPDATE agents SET tokens_valid_after = MAX(COALESCE(tokens_valid_after, 0), ?),
                            stream_changed_at = ? WHERE id = ?",
                )
                .bind(now)
                .bind(now)
                .bind(agent_id.to_string())
                .execute(&mut *tx)
                .await?;
                let audit = refresh::reuse_audit(reuse_audit, agent_id, &family_id, &presented);
                super::audit::insert_audit(&mut tx, &audit).await?;
                tx.commit().await?;
                return Ok(RefreshOutcome::ReuseDetected { agent_id, family_id });
            }
            RefreshDecision::LostResponseRetry => {
                sqlx::query("UPDATE refresh_tokens SET revoked_at = ? WHERE token_hash = ?")
                    .bind(now)
                    .bind(&successor_hash)
                    .execute(&mut *tx)
                    .await?;
                true
            }
            RefreshDecision::Rotate => false,
        };
        sqlx::query(
            "UPDATE refresh_tokens SET used_at = COALESCE(used_at, ?), successor_hash = ?,
                    retried_at = CASE WHEN ? THEN ? ELSE retried_at END
             WHERE token_hash = ?",
        )
        .bind(now)
        .bind(&new_hash[..])
        .bind(lost_response_retry)
        .bind(now)
        .bind(&presented_hash[..])
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO refresh_tokens (token_hash, family_id, agent_id, created_at) VALUES (?, ?, ?, ?)")
            .bind(&new_hash[..])
            .bind(&family_id)
            .bind(agent_id.to_string())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(RefreshOutcome::Rotated { agent_id, lost_response_retry })
    }

    async fn current_refresh_agent(
        &self,
        expected_agent: Option<AgentId>,
        presented_hash: [u8; 32],
    ) -> Result<Option<AgentId>> {
        let expected = expected_agent.map(|a| a.to_string());
        let id: Option<String> = sqlx::query_scalar(
            "SELECT t.agent_id FROM refresh_tokens t JOIN agents a ON a.id = t.agent_id
             WHERE t.token_hash = ? AND t.used_at IS NULL AND t.revoked_at IS NULL AND a.revoked_at IS NULL
               AND (? IS NULL OR t.agent_id = ?)",
        )
        .bind(&presented_hash[..])
        .bind(&expected)
        .bind(&expected)
        .fetch_optional(&self.reader)
        .await?;
        id.map(|id| parse_id(&id)).transpose()
    }

    async fn create_agent_key(&self, key: NewAgentKey, now: Millis, audit: AuditEntry) -> Result<AgentKeyRecord> {
        let mut tx = self.begin().await?;
        let agent = super::agents::active_agent(&mut tx, key.agent_id).await?;
        if let Some(name) = &key.agent_name {
            sqlx::query("UPDATE agents SET name = ? WHERE id = ?")
                .bind(name)
                .bind(agent.id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("INSERT INTO agent_keys (id, agent_id, key_hash, last4, created_at) VALUES (?, ?, ?, ?, ?)")
            .bind(&key.id)
            .bind(agent.id.to_string())
            .bind(&key.key_hash[..])
            .bind(&key.last4)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        super::audit::insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(AgentKeyRecord { id: key.id, agent_id: agent.id, last4: key.last4, created_at: now })
    }

    async fn find_agent_key(&self, key_hash: [u8; 32]) -> Result<Option<AgentId>> {
        let id: Option<String> = sqlx::query_scalar("SELECT agent_id FROM agent_keys WHERE key_hash = ?")
            .bind(&key_hash[..])
            .fetch_optional(&self.reader)
            .await?;
        id.map(|id| parse_id(&id)).transpose()
    }

    async fn list_agent_keys(&self, agent_id: AgentId) -> Result<Vec<AgentKeyRecord>> {
        let rows = q!("SELECT {AGENT_KEY_COLUMNS} FROM agent_keys WHERE agent_id = ? ORDER BY created_at, id")
            .bind(agent_id.to_string())
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(agent_key_from_row).collect()
    }
}
