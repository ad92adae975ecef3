//! RFC 8628 device grants on SQLite.

use async_trait::async_trait;
use sqlx::Row;
use tether_proto::{AgentId, Labels};

use super::SqliteStore;
use super::rows::grant_info;
use crate::rows::GRANT_INFO_COLUMNS;
use crate::rules::device::{self, GrantFacts, GrantStatus, PollAnswer, PollDecision};
use crate::sql::{is_unique_violation, json_text, parse_json, q};
use crate::{
    AuditFor, DeviceGrantInfo, DeviceGrantStore, DevicePoll, DeviceRedeemed, Entity, Millis, NewAgent, NewDeviceGrant,
    NewGrantOutcome, Result, StoreError,
};

#[async_trait]
impl DeviceGrantStore for SqliteStore {
    async fn create_device_grant(&self, g: NewDeviceGrant) -> Result<NewGrantOutcome> {
        let mut tx = self.begin().await?;
        // Counting stops at the cap, over the expires_at index: bounded work
        // however many grants a flood left behind (retention deletes them).
        let pending: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM (SELECT 1 FROM device_grants
             WHERE expires_at > ? AND status = 'pending' LIMIT ?)",
        )
        .bind(g.now)
        .bind(g.max_pending as i64)
        .fetch_one(&mut *tx)
        .await?;
        // Bounded like the count above: at most `max_pending` rows match
        // the first two conditions.
        let from_address: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM (SELECT 1 FROM device_grants
             WHERE expires_at > ? AND status = 'pending' AND requested_ip IS ? LIMIT ?)",
        )
        .bind(g.now)
        .bind(&g.requested_ip)
        .bind(g.max_pending_per_ip as i64)
        .fetch_one(&mut *tx)
        .await?;
        let admitted = device::admission(pending as u64, from_address as u64, g.max_pending, g.max_pending_per_ip);
        if admitted != NewGrantOutcome::Created {
            return Ok(admitted);
        }
        let res = sqlx::query(
            "INSERT INTO device_grants (device_code_hash, user_code, public_key, hostname, requested_ip,
                                        created_at, expires_at, interval_s, status)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending')",
        )
        .bind(&g.device_code_hash[..])
        .bind(&g.user_code)
        .bind(&g.public_key)
        .bind(&g.hostname)
        .bind(&g.requested_ip)
        .bind(g.now)
        .bind(g.expires_at)
        .bind(g.interval_s)
        .execute(&mut *tx)
        .await;
        match res {
            Err(e) if is_unique_violation(&e) => return Err(StoreError::Conflict("user code collision".into())),
            other => other?,
        };
        tx.commit().await?;
        Ok(NewGrantOutcome::Created)
    }

    async fn pending_device_grant(&self, user_code: &str, now: Millis) -> Result<Option<DeviceGrantInfo>> {
        let row = q!("SELECT {GRANT_INFO_COLUMNS} FROM device_grants
             WHERE user_code = ? AND status = 'pending' AND expires_at > ?")
        .bind(user_code)
        .bind(now)
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(grant_info).transpose()
    }

    async fn decide_device_grant(
        &self,
        user_code: &str,
        approve: bool,
        labels: &Labels,
        decided_by: &str,
        now: Millis,
        audit: AuditFor<'_, DeviceGrantInfo>,
    ) -> Result<DeviceGrantInfo> {
        let status = if approve { GrantStatus::Approved } else { GrantStatus::Denied };
        let mut tx = self.begin().await?;
        let row = q!("UPDATE device_grants SET status = ?, labels = ?, decided_by = ?
             WHERE user_code = ? AND status = 'pending' AND expires_at > ?
             RETURNING {GRANT_INFO_COLUMNS}")
        .bind(status.as_str())
        .bind(json_text(labels))
        .bind(decided_by)
        .bind(user_code)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound(Entity::DeviceGrant))?;
        let info = grant_info(&row)?;
        super::audit::insert_audit(&mut tx, &audit(&info)).await?;
        tx.commit().await?;
        Ok(info)
    }

    async fn poll_device_grant(
        &self,
        device_code_hash: [u8; 32],
        new_agent: AgentId,
        refresh_hash: [u8; 32],
        grace_ms: Millis,
        now: Millis,
        audit: AuditFor<'_, DeviceRedeemed>,
    ) -> Result<DevicePoll> {
        let mut tx = self.begin().await?;
        // The issued token's family is read only while that token, and its
        // agent, are untouched: that is when a repeat may be a lost response.
        let Some(row) = sqlx::query(
            "SELECT g.status, g.expires_at, g.interval_s, g.last_poll_at, g.public_key, g.hostname, g.labels,
                    g.decided_by, g.user_code, g.redeemed_at, g.agent_id, t.family_id
             FROM device_grants g
             LEFT JOIN refresh_tokens t ON t.token_hash = g.refresh_token_hash
                  AND t.used_at IS NULL AND t.revoked_at IS NULL
                  AND EXISTS (SELECT 1 FROM agents a WHERE a.id = t.agent_id AND a.revoked_at IS NULL)
             WHERE g.device_code_hash = ?",
        )
        .bind(&device_code_hash[..])
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(DevicePoll::Invalid);
        };
        let status: &str = row.try_get(0)?;
        let family: Option<String> = row.try_get(11)?;
        let facts = GrantFacts {
            status: GrantStatus::parse(status)
                .ok_or_else(|| StoreError::Corrupt(format!("device grant status {status:?}")))?,
            expires_at: row.try_get(1)?,
            interval_s: row.try_get::<i64, _>(2)? as u32,
            last_poll_at: row.try_get(3)?,
            redeemed_at: row.try_get(9)?,
            issued_token_unused: family.is_some(),
        };
        let approved_by = row.try_get::<Option<String>, _>(7)?.unwrap_or_default();
        let user_code: String = row.try_get(8)?;
        let (interval_s, answer) = match device::decide_poll(&facts, grace_ms, now) {
            PollDecision::Invalid => return Ok(DevicePoll::Invalid),
            PollDecision::Expired => return Ok(DevicePoll::Expired),
            PollDecision::Reissue => {
                let (Some(family), Some(agent_id)) = (family, row.try_get::<Option<String>, _>(10)?) else {
                    return Ok(DevicePoll::Invalid);
                };
                sqlx::query(
                    "UPDATE refresh_tokens SET revoked_at = ?
                     WHERE token_hash = (SELECT refresh_token_hash FROM device_grants WHERE device_code_hash = ?)",
                )
                .bind(now)
                .bind(&device_code_hash[..])
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO refresh_tokens (token_hash, family_id, agent_id, created_at) VALUES (?, ?, ?, ?)",
                )
                .bind(&refresh_hash[..])
                .bind(&family)
                .bind(&agent_id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                sqlx::query("UPDATE device_grants SET refresh_token_hash = ? WHERE device_code_hash = ?")
                    .bind(&refresh_hash[..])
                    .bind(&device_code_hash[..])
                    .execute(&mut *tx)
                    .await?;
                let agent = super::agents::load_agent(&mut tx, &agent_id).await?;
                let redeemed = DeviceRedeemed { agent, approved_by, user_code, lost_response_retry: true };
                super::audit::insert_audit(&mut tx, &audit(&redeemed)).await?;
                tx.commit().await?;
                return Ok(DevicePoll::Approved(Box::new(redeemed)));
            }
            PollDecision::Answer { interval_s, answer } => (interval_s, answer),
        };
        sqlx::query("UPDATE device_grants SET last_poll_at = ?, interval_s = ? WHERE device_code_hash = ?")
            .bind(now)
            .bind(interval_s)
            .bind(&device_code_hash[..])
            .execute(&mut *tx)
            .await?;
        let outcome = match answer {
            PollAnswer::SlowDown => DevicePoll::SlowDown { interval_s },
            PollAnswer::Pending => DevicePoll::Pending,
            PollAnswer::Denied => DevicePoll::Denied,
            PollAnswer::Redeem => {
                let agent = NewAgent {
                    id: new_agent,
                    hostname: row.try_get(5)?,
                    labels: parse_json(row.try_get(6)?)?,
                    facts: serde_json::json!({}),
                    public_key: row.try_get(4)?,
                };
                let agent = super::agents::insert_agent(&mut tx, agent, refresh_hash, now).await?;
                sqlx::query(
                    "UPDATE device_grants SET status = 'redeemed', redeemed_at = ?, agent_id = ?, refresh_token_hash = ?
                     WHERE device_code_hash = ?",
                )
                .bind(now)
                .bind(new_agent.to_string())
                .bind(&refresh_hash[..])
                .bind(&device_code_hash[..])
                .execute(&mut *tx)
                .await?;
                let redeemed = DeviceRedeemed { agent, approved_by, user_code, lost_response_retry: false };
                super::audit::insert_audit(&mut tx, &audit(&redeemed)).await?;
                DevicePoll::Approved(Box::new(redeemed))
            }
        };
        tx.commit().await?;
        Ok(outcome)
    }

    async fn prune_device_grants(&self, before: Millis) -> Result<u64> {
        let done =
            sqlx::query("DELETE FROM device_grants WHERE expires_at < ?").bind(before).execute(&self.writer).await?;
        Ok(done.rows_affected())
    }
}
