//! Agent credentials on PostgreSQL: enrollment tokens and refresh-token families.

use async_trait::async_trait;
use sqlx::Row;
use tether_proto::AgentId;

use super::rows::{agent_key_from_row, enroll_token_from_row};
use super::{PgStore, lock};
use crate::audit::AuditEntry;
use crate::rows::{AGENT_KEY_COLUMNS, ENROLL_TOKEN_COLUMNS};
use crate::rules::refresh::{self, PresentedToken, RefreshDecision, Successor};
use crate::sql::{json_text, parse_id, q};
use crate::{
    AgentKeyRecord, EnrollTokenRecord, Entity, Millis, NewAgentKey, NewEnrollToken, RefreshOutcome, Result, StoreError,
    TokenStore,
};

#[async_trait]
impl TokenStore for PgStore {
    async fn create_enroll_token(&self, token: NewEnrollToken, now: Millis, audit: AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO enroll_tokens (id, token_hash, labels, uses, created_by, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&token.id)
        .bind(&token.token_hash[..])
        .bind(json_text(&token.labels))
        .bind(i64::from(token.uses))
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
            q!("SELECT {ENROLL_TOKEN_COLUMNS} FROM enroll_tokens ORDER BY id DESC").fetch_all(&self.pool).await?;
        rows.iter().map(enroll_token_from_row).collect()
    }

    async fn revoke_enroll_token(&self, id: &str, now: Millis, audit: AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query("UPDATE enroll_tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2")
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
        Ok(sqlx::query_scalar("SELECT family_id FROM refresh_tokens WHERE token_hash = $1")
            .bind(&presented_hash[..])
            .fetch_optional(&self.pool)
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
        // A token never changes family: find it, lock the family, then read
        // every fact the rule needs as it is now, after any rotation that
        // held the lock before us.
        let Some(family_id) =
            sqlx::query_scalar::<_, String>("SELECT family_id FROM refresh_tokens WHERE token_hash = $1")
                .bind(&presented_hash[..])
                .fetch_optional(&mut *tx)
                .await?
        else {
            return Ok(RefreshOutcome::Invalid);
        };
        lock(&mut tx, &format!("refresh-family:{family_id}")).await?;
        let expected = expected_agent.map(|a| a.to_string());
        let Some(row) = sqlx::query(
            "SELECT t.used_at, t.successor_hash, t.revoked_at, a.revoked_at, t.agent_id, t.retried_at,
                    s.used_at IS NOT NULL, s.revoked_at IS NOT NULL, s.token_hash IS NOT NULL,
                    EXISTS (SELECT 1 FROM refresh_tokens f WHERE f.family_id = t.family_id AND f.revoked_at IS NULL)
             FROM refresh_tokens t JOIN agents a ON a.id = t.agent_id
             LEFT JOIN refresh_tokens s ON s.token_hash = t.successor_hash
             WHERE t.token_hash = $1 AND ($2::text IS NULL OR t.agent_id = $2)",
        )
        .bind(&presented_hash[..])
        .bind(&expected)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(RefreshOutcome::Invalid);
        };
        let successor_hash: Option<Vec<u8>> = row.try_get(1)?;
        let agent_id: AgentId = parse_id(row.try_get(4)?)?;
        let presented = PresentedToken {
            agent_revoked: row.try_get::<Option<Millis>, _>(3)?.is_some(),
            revoked: row.try_get::<Option<Millis>, _>(2)?.is_some(),
            used_at: row.try_get(0)?,
            retried: row.try_get::<Option<Millis>, _>(5)?.is_some(),
            successor: row
                .try_get::<bool, _>(8)?
                .then(|| Ok::<_, sqlx::Error>(Successor { used: row.try_get(6)?, revoked: row.try_get(7)? }))
                .transpose()?,
            family_live: row.try_get(9)?,
        };
        let lost_response_retry = match refresh::decide(&presented, grace_ms, now) {
            RefreshDecision::AgentRevoked => return Ok(RefreshOutcome::AgentRevoked),
            RefreshDecision::Invalid => return Ok(RefreshOutcome::Invalid),
            RefreshDecision::Reuse => {
                sqlx::query("UPDATE refresh_tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE family_id = $2")
                    .bind(now)
                    .bind(&family_id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "UPDATE agents SET tokens_valid_after = GREATEST(COALESCE(tokens_valid_after, 0), $1),
                            stream_changed_at = $1 WHERE id = $2",
                )
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
                sqlx::query("UPDATE refresh_tokens SET revoked_at = $1 WHERE token_hash = $2")
                    .bind(now)
                    .bind(&successor_hash)
                    .execute(&mut *tx)
                    .await?;
                true
            }
            RefreshDecision::Rotate => false,
        };
        sqlx::query(
            "UPDATE refresh_tokens SET used_at = COALESCE(used_at, $1), successor_hash = $2,
                    retried_at = CASE WHEN $3 THEN $1 ELSE retried_at END
             WHERE token_hash = $4",
        )
        .bind(now)
        .bind(&new_hash[..])
        .bind(lost_response_retry)
        .bind(&presented_hash[..])
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO refresh_tokens (token_hash, family_id, agent_id, created_at) VALUES ($1, $2, $3, $4)")
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
        // No family lock: a read only, ordered before or after any rotation
        // by what that rotation had committed.
        let expected = expected_agent.map(|a| a.to_string());
        let id: Option<String> = sqlx::query_scalar(
            "SELECT t.agent_id FROM refresh_tokens t JOIN agents a ON a.id = t.agent_id
             WHERE t.token_hash = $1 AND t.used_at IS NULL AND t.revoked_at IS NULL AND a.revoked_at IS NULL
               AND ($2::text IS NULL OR t.agent_id = $2)",
        )
        .bind(&presented_hash[..])
        .bind(&expected)
        .fetch_optional(&self.pool)
        .await?;
        id.map(|id| parse_id(&id)).transpose()
    }

    async fn create_agent_key(&self, key: NewAgentKey, now: Millis, audit: AuditEntry) -> Result<AgentKeyRecord> {
        let mut tx = self.begin().await?;
        // Locked before it is read: a revocation or deletion racing this is
        // wholly before it (refused here) or after it (and ends the key).
        let agent_id = key.agent_id.to_string();
        super::agents::lock_agents(&mut tx, std::slice::from_ref(&agent_id)).await?;
        let agent = super::agents::active_agent(&mut tx, key.agent_id).await?;
        if let Some(name) = &key.agent_name {
            sqlx::query("UPDATE agents SET name = $1 WHERE id = $2")
                .bind(name)
                .bind(&agent_id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("INSERT INTO agent_keys (id, agent_id, key_hash, last4, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(&key.id)
            .bind(&agent_id)
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
        let id: Option<String> = sqlx::query_scalar("SELECT agent_id FROM agent_keys WHERE key_hash = $1")
            .bind(&key_hash[..])
            .fetch_optional(&self.pool)
            .await?;
        id.map(|id| parse_id(&id)).transpose()
    }

    async fn list_agent_keys(&self, agent_id: AgentId) -> Result<Vec<AgentKeyRecord>> {
        let rows = q!("SELECT {AGENT_KEY_COLUMNS} FROM agent_keys WHERE agent_id = $1 ORDER BY created_at, id")
            .bind(agent_id.to_string())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(agent_key_from_row).collect()
    }
}
