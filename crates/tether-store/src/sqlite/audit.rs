//! The audit chain on SQLite.

use async_trait::async_trait;

use super::rows::audit_from_row;
use super::{SqliteStore, Tx};
use crate::audit::{AuditAnchor, AuditEntry, AuditRecord, GENESIS_HASH, ROWS_PER_INSERT};
use crate::rows::AUDIT_COLUMNS;
use crate::sql::{audit_insert, q};
use crate::{AuditFilter, AuditStore, Result};

/// Appends `entry` to the audit chain inside `tx`, the transaction of the
/// mutation it describes: both commit or neither does. See [`insert_audits`].
pub(super) async fn insert_audit(tx: &mut Tx, entry: &AuditEntry) -> Result<()> {
    insert_audits(tx, std::slice::from_ref(entry)).await
}

/// Appends `entries` to the audit chain in order, inside `tx`. The chain
/// head is read inside the same `BEGIN IMMEDIATE` transaction, so appends
/// are serialised by SQLite's single writer; the rows of one multi-row
/// `VALUES` insert get their ids in order, so id order is chain order.
/// The hash covers `details` as the exact text stored. When retention
/// deleted every row, the chain goes on from the anchor it left.
pub(super) async fn insert_audits(tx: &mut Tx, entries: &[AuditEntry]) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let prev: Option<Vec<u8>> = sqlx::query_scalar(
        "SELECT COALESCE((SELECT hash FROM audit ORDER BY id DESC LIMIT 1), (SELECT hash FROM audit_anchor))",
    )
    .fetch_one(&mut **tx)
    .await?;
    let mut prev = prev.unwrap_or_else(|| GENESIS_HASH.to_vec());
    for chunk in entries.chunks(ROWS_PER_INSERT) {
        audit_insert::<sqlx::Sqlite>(chunk, &mut prev).build().execute(&mut **tx).await?;
    }
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
