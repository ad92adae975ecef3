//! The audit chain on SQLite.

use async_trait::async_trait;

use super::rows::audit_from_row;
use super::{SqliteStore, Tx};
use crate::audit::{AuditAnchor, AuditEntry, AuditRecord, GENESIS_HASH};
use crate::rows::AUDIT_COLUMNS;
use crate::sql::q;
use crate::{AuditFilter, AuditStore, Result};

/// Appends `entry` to the audit chain inside `tx`, the transaction of the
/// mutation it describes: both commit or neither does. The chain head is
/// read inside the same `BEGIN IMMEDIATE` transaction, so appends are
/// serialised by SQLite's single writer. The hash covers `details` as the
/// exact text stored. When retention deleted every row, the chain goes on
/// from the anchor it left.
pub(super) async fn insert_audit(tx: &mut Tx, entry: &AuditEntry) -> Result<()> {
    let prev: Option<Vec<u8>> = sqlx::query_scalar(
        "SELECT COALESCE((SELECT hash FROM audit ORDER BY id DESC LIMIT 1), (SELECT hash FROM audit_anchor))",
    )
    .fetch_one(&mut **tx)
    .await?;
    let prev = prev.unwrap_or_else(|| GENESIS_HASH.to_vec());
    let details = entry.details_text();
    let hash = entry.hash_after(&prev, &details);
    sqlx::query(
        "INSERT INTO audit (ts, actor, actor_kind, action, target, outcome, ip, request_id, details, prev_hash, hash)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(entry.ts)
    .bind(&entry.actor)
    .bind(entry.actor_kind)
    .bind(&entry.action)
    .bind(&entry.target)
    .bind(entry.outcome)
    .bind(&entry.ip)
    .bind(&entry.request_id)
    .bind(&details)
    .bind(&prev)
    .bind(&hash[..])
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[async_trait]
impl AuditStore for SqliteStore {
    async fn append_audit(&self, entry: AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        insert_audit(&mut tx, &entry).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_audit(&self, after_id: i64, limit: u32) -> Result<Vec<AuditRecord>> {
        let rows = q!("SELECT {AUDIT_COLUMNS} FROM audit WHERE id > ? ORDER BY id LIMIT ?")
            .bind(after_id)
            .bind(limit)
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(audit_from_row).collect()
    }

    async fn query_audit(&self, f: &AuditFilter) -> Result<Vec<AuditRecord>> {
        let agent = f.agent_id.map(|a| a.to_string());
        let rows = q!("SELECT {AUDIT_COLUMNS} FROM audit
             WHERE (? IS NULL OR id < ?) AND (? IS NULL OR actor = ?) AND (? IS NULL OR action = ?)
               AND (? IS NULL OR actor = ? OR target = ?) AND (? IS NULL OR ts >= ?) AND (? IS NULL OR ts < ?)
             ORDER BY id DESC LIMIT ?")
        .bind(f.before)
        .bind(f.before)
        .bind(&f.actor)
        .bind(&f.actor)
        .bind(&f.action)
        .bind(&f.action)
        .bind(&agent)
        .bind(&agent)
        .bind(&agent)
        .bind(f.from)
        .bind(f.from)
        .bind(f.to)
        .bind(f.to)
        .bind(f.limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(audit_from_row).collect()
    }

    async fn audit_anchor(&self) -> Result<Option<AuditAnchor>> {
        let row: Option<(i64, Vec<u8>)> =
            sqlx::query_as("SELECT id, hash FROM audit_anchor").fetch_optional(&self.reader).await?;
        Ok(row.map(|(id, hash)| AuditAnchor { id, hash }))
    }
}
