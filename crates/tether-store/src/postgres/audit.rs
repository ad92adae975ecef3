//! The audit chain on PostgreSQL.

use async_trait::async_trait;

use super::rows::audit_from_row;
use super::{PgStore, Tx};
use crate::audit::{AuditAnchor, AuditEntry, AuditRecord, ROWS_PER_INSERT};
use crate::rows::AUDIT_COLUMNS;
use crate::sql::{audit_insert, q};
use crate::{AuditFilter, AuditStore, Result};

/// Appends `entry` to the audit chain inside `tx`, the transaction of the
/// mutation it describes: both commit or neither does. See [`insert_audits`].
pub(super) async fn insert_audit(tx: &mut Tx, entry: &AuditEntry) -> Result<()> {
    insert_audits(tx, std::slice::from_ref(entry)).await
}

/// Appends `entries` to the audit chain in order, inside `tx`. The chain
/// head row is locked before it is read, so appends from every server are
/// serialised and the chain never forks; ids are allocated under the same
/// lock, in the order of the rows of one multi-row `VALUES` insert, so id
/// order is chain order. The hash covers `details` as the exact text
/// stored.
pub(super) async fn insert_audits(tx: &mut Tx, entries: &[AuditEntry]) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let mut prev: Vec<u8> =
        sqlx::query_scalar("SELECT hash FROM audit_head WHERE singleton FOR UPDATE").fetch_one(&mut **tx).await?;
    for chunk in entries.chunks(ROWS_PER_INSERT) {
        audit_insert::<sqlx::Postgres>(chunk, &mut prev).build().execute(&mut **tx).await?;
    }
    sqlx::query("UPDATE audit_head SET hash = $1 WHERE singleton").bind(&prev).execute(&mut **tx).await?;
    Ok(())
}

#[async_trait]
impl AuditStore for PgStore {
    async fn append_audit(&self, entry: AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        insert_audit(&mut tx, &entry).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_audit(&self, after_id: i64, limit: u32) -> Result<Vec<AuditRecord>> {
        let rows = q!("SELECT {AUDIT_COLUMNS} FROM audit WHERE id > $1 ORDER BY id LIMIT $2")
            .bind(after_id)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(audit_from_row).collect()
    }

    async fn query_audit(&self, f: &AuditFilter) -> Result<Vec<AuditRecord>> {
        let agent = f.agent_id.map(|a| a.to_string());
        let rows = q!("SELECT {AUDIT_COLUMNS} FROM audit
             WHERE ($1::bigint IS NULL OR id < $1) AND ($2::text IS NULL OR actor = $2)
               AND ($3::text IS NULL OR action = $3) AND ($4::text IS NULL OR actor = $4 OR target = $4)
               AND ($5::bigint IS NULL OR ts >= $5) AND ($6::bigint IS NULL OR ts < $6)
             ORDER BY id DESC LIMIT $7")
        .bind(f.before)
        .bind(&f.actor)
        .bind(&f.action)
        .bind(&agent)
        .bind(f.from)
        .bind(f.to)
        .bind(i64::from(f.limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(audit_from_row).collect()
    }

    async fn audit_anchor(&self) -> Result<Option<AuditAnchor>> {
        let row: Option<(i64, Vec<u8>)> =
            sqlx::query_as("SELECT id, hash FROM audit_anchor").fetch_optional(&self.pool).await?;
        Ok(row.map(|(id, hash)| AuditAnchor { id, hash }))
    }
}
