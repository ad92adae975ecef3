//! Agents' reports on the files and certificates they hold, and what a
//! relabel changes about them, on PostgreSQL.

use async_trait::async_trait;
use tether_proto::command::TargetSpec;
use tether_proto::files::{FleetStatus, ItemReport};
use tether_proto::signal::{CERT_RENEWED, CERT_REVOKED, FILE_REMOVED, FILE_UPDATED};
use tether_proto::{AgentId, Labels};

use super::commands::targeted_agents;
use super::rows::agent_item_from_row;
use super::signals::append_signal;
use super::{PgStore, Tx};
use crate::rows::AGENT_ITEM_COLUMNS;
use crate::rules::items as rules;
use crate::sql::{q, to_millis};
use crate::{Entity, Head, ItemKind, ItemStore, Millis, Result, StoreError};

/// An active item's target and version; `NotFound` for anything else.
async fn active_item(tx: &mut Tx, kind: ItemKind, id: i64) -> Result<(TargetSpec, u64)> {
    let (sql, missing) = match kind {
        ItemKind::File => (
            "SELECT target, version FROM file_assignments WHERE id = $1 AND removed_at IS NULL",
            Entity::FileAssignment,
        ),
        ItemKind::Cert => ("SELECT target, version FROM certs WHERE id = $1 AND revoked_at IS NULL", Entity::Cert),
    };
    let row: Option<(String, i64)> = sqlx::query_as(sql).bind(id).fetch_optional(&mut **tx).await?;
    let (target, version) = row.ok_or(StoreError::NotFound(missing))?;
    Ok((rules::stored_target(&target)?, version as u64))
}

/// Signals for the items agent `id` gains and loses when its labels go
/// from `before` to `after`, appended inside `tx`.
pub(super) async fn relabel(
    tx: &mut Tx,
    id: AgentId,
    before: &Labels,
    after: &Labels,
    now: Millis,
) -> Result<Vec<Head>> {
    let mut heads = Vec::new();
    let files = super::files::active_assignments(tx).await?;
    let (gained, lost) = rules::relabelled(files.iter().map(|f| (f.id, &f.target)), id, before, after);
    for file in &files {
        if gained.contains(&file.id) {
            heads.push(append_signal(tx, id, FILE_UPDATED, &super::files::updated_ref(file), now).await?);
        } else if lost.contains(&file.id) {
            heads.push(append_signal(tx, id, FILE_REMOVED, &super::files::removed_ref(file), now).await?);
        }
    }
    let certs = super::certs::active_certs(tx).await?;
    let (gained, lost) = rules::relabelled(certs.iter().map(|c| (c.id, &c.target)), id, before, after);
    for cert in &certs {
        if gained.contains(&cert.id) {
            heads.push(append_signal(tx, id, CERT_RENEWED, &super::certs::renewed_ref(cert), now).await?);
        } else if lost.contains(&cert.id) {
            heads.push(append_signal(tx, id, CERT_REVOKED, &super::certs::revoked_ref(cert.id), now).await?);
        }
    }
    Ok(heads)
}

#[async_trait]
impl ItemStore for PgStore {
    async fn report_item(
        &self,
        agent_id: AgentId,
        kind: ItemKind,
        item_id: i64,
        report: ItemReport,
        now: Millis,
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        let (target, _) = active_item(&mut tx, kind, item_id).await?;
        let labels = super::agents::active_agent(&mut tx, agent_id).await?.labels;
        if !target.matches(agent_id, &labels) {
            return Err(StoreError::NotFound(match kind {
                ItemKind::File => Entity::FileAssignment,
                ItemKind::Cert => Entity::Cert,
            }));
        }
        sqlx::query(
            "INSERT INTO agent_items (agent_id, kind, item_id, version, state, error, serial, not_after, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (kind, item_id, agent_id) DO UPDATE SET version = excluded.version, state = excluded.state,
                 error = excluded.error, serial = excluded.serial, not_after = excluded.not_after,
                 updated_at = excluded.updated_at",
        )
        .bind(agent_id.to_string())
        .bind(kind.as_str())
        .bind(item_id)
        .bind(report.version as i64)
        .bind(report.state.as_str())
        .bind(&report.error)
        .bind(&report.serial)
        .bind(report.not_after.map(to_millis))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn item_status(&self, kind: ItemKind, item_id: i64) -> Result<FleetStatus> {
        let mut tx = self.snapshot().await?;
        let (target, version) = active_item(&mut tx, kind, item_id).await?;
        let agents = targeted_agents(&mut tx, &target).await?;
        let rows = q!("SELECT {AGENT_ITEM_COLUMNS} FROM agent_items WHERE kind = $1 AND item_id = $2")
            .bind(kind.as_str())
            .bind(item_id)
            .fetch_all(&mut *tx)
            .await?;
        let mut reports = rows
            .iter()
            .map(|r| agent_item_from_row(r).map(|item| (item.agent_id, item)))
            .collect::<Result<std::collections::HashMap<_, _>>>()?;
        let targeted = agents.into_iter().map(|a| (a, reports.remove(&a))).collect();
        Ok(rules::fleet_status(version, targeted))
    }
}
