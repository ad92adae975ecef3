//! Blobs and file assignments on PostgreSQL.

use async_trait::async_trait;
use tether_proto::AgentId;
use tether_proto::files::{FileRemoved, FileUpdated};
use tether_proto::signal::{FILE_REMOVED, FILE_UPDATED};

use super::commands::{resolve_target, targeted_agents};
use super::rows::file_assignment_from_row;
use super::signals::append_to_many;
use super::{PgStore, Tx};
use crate::audit::AuditEntry;
use crate::rows::FILE_ASSIGNMENT_COLUMNS;
use crate::sql::{json_text, q, read_chunk, same_for_all};
use crate::{
    AuditFor, BLOB_CHUNK, BlobSource, Entity, FileAssignmentRecord, FileStore, ItemChange, Millis, NewFileAssignment,
    Result, StoreError,
};

async fn load_assignment(tx: &mut Tx, id: i64) -> Result<Option<FileAssignmentRecord>> {
    let row = q!("SELECT {FILE_ASSIGNMENT_COLUMNS} FROM file_assignments f WHERE f.id = $1")
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?;
    row.map(|r| file_assignment_from_row(&r)).transpose()
}

/// The signal telling agents to fetch their files again.
pub(super) fn updated_ref(a: &FileAssignmentRecord) -> serde_json::Value {
    serde_json::to_value(FileUpdated { file_id: a.id, path: a.path.clone(), sha256: a.sha256.clone(), mode: a.mode })
        .expect("serializes")
}

pub(super) fn removed_ref(a: &FileAssignmentRecord) -> serde_json::Value {
    serde_json::to_value(FileRemoved { file_id: a.id, path: a.path.clone() }).expect("serializes")
}

/// Every active assignment, inside `tx` (a relabel decides on them).
pub(super) async fn active_assignments(tx: &mut Tx) -> Result<Vec<FileAssignmentRecord>> {
    let rows = q!("SELECT {FILE_ASSIGNMENT_COLUMNS} FROM file_assignments f WHERE f.removed_at IS NULL ORDER BY f.id")
        .fetch_all(&mut **tx)
        .await?;
    rows.iter().map(file_assignment_from_row).collect()
}

#[async_trait]
impl FileStore for PgStore {
    async fn put_blob(&self, sha256: &str, size: u64, source: BlobSource<'_>, now: Millis) -> Result<bool> {
        let mut tx = self.begin().await?;
        let inserted =
            sqlx::query("INSERT INTO blobs (sha256, size, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
                .bind(sha256)
                .bind(size as i64)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                == 1;
        if !inserted {
            return Ok(false);
        }
        let (mut index, mut total) = (0i64, 0u64);
        let mut chunk = vec![0u8; BLOB_CHUNK];
        loop {
            let n = read_chunk(source, &mut chunk).await?;
            if n == 0 {
                break;
            }
            total += n as u64;
            sqlx::query("INSERT INTO blob_chunks (sha256, idx, data) VALUES ($1, $2, $3)")
                .bind(sha256)
                .bind(index)
                .bind(&chunk[..n])
                .execute(&mut *tx)
                .await?;
            index += 1;
        }
        if total != size {
            return Err(StoreError::Backend(format!("blob {sha256}: read {total} bytes, expected {size}").into()));
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn blob_size(&self, sha256: &str) -> Result<Option<u64>> {
        let size: Option<i64> = sqlx::query_scalar("SELECT size FROM blobs WHERE sha256 = $1")
            .bind(sha256)
            .fetch_optional(&self.pool)
            .await?;
        Ok(size.map(|s| s as u64))
    }

    async fn blob_chunk(&self, sha256: &str, index: u64) -> Result<Option<Vec<u8>>> {
        Ok(sqlx::query_scalar("SELECT data FROM blob_chunks WHERE sha256 = $1 AND idx = $2")
            .bind(sha256)
            .bind(index as i64)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn assign_file(
        &self,
        new: NewFileAssignment,
        audit: AuditFor<'_, FileAssignmentRecord>,
    ) -> Result<ItemChange<FileAssignmentRecord>> {
        let mut tx = self.begin().await?;
        let known: Option<i64> = sqlx::query_scalar("SELECT size FROM blobs WHERE sha256 = $1")
            .bind(&new.sha256)
            .fetch_optional(&mut *tx)
            .await?;
        if known.is_none() {
            return Err(StoreError::NotFound(Entity::Blob));
        }
        let agents = resolve_target(&mut tx, &new.target).await?;
        let key = new.target.key();
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO file_assignments (path, sha256, mode, owner, grp, hook, target, target_key, version,
                                           updated_by, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 1, $9, $10)
             ON CONFLICT (path, target_key) WHERE removed_at IS NULL DO UPDATE SET
                 sha256 = excluded.sha256, mode = excluded.mode, owner = excluded.owner, grp = excluded.grp,
                 hook = excluded.hook, version = file_assignments.version + 1,
                 updated_by = excluded.updated_by, updated_at = excluded.updated_at
             RETURNING id",
        )
        .bind(&new.path)
        .bind(&new.sha256)
        .bind(i64::from(new.mode))
        .bind(&new.owner)
        .bind(&new.group)
        .bind(&new.hook)
        .bind(json_text(&new.target.to_target()))
        .bind(&key)
        .bind(&new.by)
        .bind(new.now)
        .fetch_one(&mut *tx)
        .await?;
        let record = load_assignment(&mut tx, id).await?.ok_or(StoreError::NotFound(Entity::FileAssignment))?;
        let heads =
            append_to_many(&mut tx, &agents, FILE_UPDATED, &same_for_all(&updated_ref(&record)), new.now).await?;
        super::audit::insert_audit(&mut tx, &audit(&record)).await?;
        tx.commit().await?;
        Ok(ItemChange { item: record, agents_told: heads.len() as u64, heads })
    }

    async fn unassign_file(&self, id: i64, now: Millis, audit: AuditEntry) -> Result<ItemChange<FileAssignmentRecord>> {
        let mut tx = self.begin().await?;
        let done = sqlx::query("UPDATE file_assignments SET removed_at = $1 WHERE id = $2 AND removed_at IS NULL")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(Entity::FileAssignment));
        }
        let record = load_assignment(&mut tx, id).await?.ok_or(StoreError::NotFound(Entity::FileAssignment))?;
        let agents = targeted_agents(&mut tx, &record.target).await?;
        let heads = append_to_many(&mut tx, &agents, FILE_REMOVED, &same_for_all(&removed_ref(&record)), now).await?;
        sqlx::query("DELETE FROM agent_items WHERE kind = 'file' AND item_id = $1").bind(id).execute(&mut *tx).await?;
        super::audit::insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(ItemChange { item: record, agents_told: heads.len() as u64, heads })
    }

    async fn list_file_assignments(&self) -> Result<Vec<FileAssignmentRecord>> {
        let mut tx = self.snapshot().await?;
        active_assignments(&mut tx).await
    }

    async fn get_file_assignment(&self, id: i64) -> Result<Option<FileAssignmentRecord>> {
        let mut tx = self.snapshot().await?;
        load_assignment(&mut tx, id).await
    }

    async fn agent_files(&self, agent_id: AgentId) -> Result<Vec<FileAssignmentRecord>> {
        let mut tx = self.snapshot().await?;
        let labels = super::agents::active_agent(&mut tx, agent_id).await?.labels;
        let all = active_assignments(&mut tx).await?;
        Ok(all.into_iter().filter(|a| a.target.matches(agent_id, &labels)).collect())
    }
}
