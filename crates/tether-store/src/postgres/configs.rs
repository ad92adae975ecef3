//! Configuration documents and retargeting on PostgreSQL. Every write that
//! retargets (a version, a rollback, a label change, an enrollment) first
//! takes the `configs` lock, so each computes from what the previous one
//! committed.

use async_trait::async_trait;
use sqlx::Row;
use tether_proto::config::{ConfigStatus, ConfigUpdated, Doc, EffectiveConfig, Scope, canonical_json, doc_hash};
use tether_proto::signal::CONFIG_UPDATED;
use tether_proto::{AgentId, Labels};

use super::agents::lock_agents;
use super::rows::{config_scope_from_row, config_version_from_row};
use super::{PgStore, Tx, lock};
use crate::audit::AuditEntry;
use crate::rows::{CONFIG_SCOPE_COLUMNS, CONFIG_VERSION_COLUMNS};
use crate::rules::config::{self as rules, CurrentDocs, Retarget};
use crate::sql::{json_text, parse_id, parse_json, q};
use crate::{
    ConfigChange, ConfigScopeRecord, ConfigStore, ConfigVersionRecord, Entity, Head, Millis, NewConfigVersion, Result,
    StoreError,
};

/// Agents retargeted per statement: large changes go in several statements
/// of one transaction, never one per agent.
const RETARGET_CHUNK: usize = 5_000;

/// The lock every write that retargets takes first.
pub(super) const CONFIGS_LOCK: &str = "configs";

/// The current documents of every global and label scope, and of every
/// agent scope (`agent: None`) or of one agent's.
pub(super) async fn load_docs(tx: &mut Tx, agent: Option<AgentId>) -> Result<CurrentDocs> {
    let own = agent.map(|id| Scope::Agent(id).to_string());
    let rows = sqlx::query(
        "SELECT s.scope, s.version, v.doc FROM config_scopes s
         JOIN config_versions v ON v.scope = s.scope AND v.version = s.version
         WHERE s.kind != 'agent' OR $1::text IS NULL OR s.scope = $1",
    )
    .bind(&own)
    .fetch_all(&mut **tx)
    .await?;
    let docs = rows
        .iter()
        .map(|r| {
            let doc: Doc = parse_json(r.try_get(2)?)?;
            Ok((parse_id(r.try_get(0)?)?, r.try_get::<i64, _>(1)? as u64, doc))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(CurrentDocs::new(docs))
}

/// The active agents a scope applies to. Binds `$1` the agent id (or NULL)
/// and `$2` the label as a JSON object (or NULL), from [`target_binds`].
const TARGETED: &str =
    "revoked_at IS NULL AND ($1::text IS NULL OR id = $1) AND ($2::text IS NULL OR labels::jsonb @> $2::jsonb)";

fn target_binds(scope: &Scope) -> (Option<String>, Option<String>) {
    match scope {
        Scope::Global => (None, None),
        Scope::Label { key, value } => (None, Some(json_text(&Labels::from([(key.clone(), value.clone())])))),
        Scope::Agent(id) => (Some(id.to_string()), None),
    }
}

/// The active agents `scope` applies to, with their labels and desired hash.
async fn targets(tx: &mut Tx, scope: &Scope) -> Result<Vec<Retarget>> {
    let (agent, label) = target_binds(scope);
    let rows = q!("SELECT id, labels, config_hash FROM agents WHERE {TARGETED} ORDER BY id")
        .bind(&agent)
        .bind(&label)
        .fetch_all(&mut **tx)
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Retarget {
                agent_id: parse_id(r.try_get(0)?)?,
                labels: parse_json(r.try_get(1)?)?,
                config_hash: r.try_get(2)?,
            })
        })
        .collect()
}

/// Gives these agents their new desired hash and a `config.updated`
/// signal naming what caused it (a scope and its version, or
/// [`rules::RELABELLED`]), in bulk.
pub(super) async fn retarget(
    tx: &mut Tx,
    changed: &[(AgentId, String)],
    config_id: &str,
    version: u64,
    now: Millis,
) -> Result<Vec<Head>> {
    let mut heads = Vec::with_capacity(changed.len());
    for chunk in changed.chunks(RETARGET_CHUNK) {
        let ids: Vec<String> = chunk.iter().map(|(id, _)| id.to_string()).collect();
        let hashes: Vec<&str> = chunk.iter().map(|(_, hash)| hash.as_str()).collect();
        lock_agents(tx, &ids).await?;
        let moved = sqlx::query(
            "UPDATE agents SET head_seq = head_seq + 1, config_hash = c.hash, stream_changed_at = $3
             FROM unnest($1::text[], $2::text[]) AS c(id, hash) WHERE agents.id = c.id
             RETURNING agents.id, agents.head_seq, agents.epoch, agents.config_hash",
        )
        .bind(&ids)
        .bind(&hashes)
        .bind(now)
        .fetch_all(&mut **tx)
        .await?;
        let (mut agent_ids, mut seqs, mut refs) = (Vec::new(), Vec::new(), Vec::new());
        for r in &moved {
            let agent_id: AgentId = parse_id(r.try_get(0)?)?;
            let seq: i64 = r.try_get(1)?;
            let reference =
                ConfigUpdated { config_id: config_id.to_owned(), version, hash: r.try_get::<String, _>(3)? };
            agent_ids.push(agent_id.to_string());
            seqs.push(seq);
            refs.push(json_text(&reference));
            heads.push(Head { agent_id, epoch: r.try_get::<i64, _>(2)? as u64, seq: seq as u64 });
        }
        sqlx::query(
            "INSERT INTO signals (agent_id, seq, kind, ts_ms, ref)
             SELECT s.agent_id, s.seq, $4, $5, s.ref FROM unnest($1::text[], $2::bigint[], $3::text[]) AS s(agent_id, seq, ref)",
        )
        .bind(&agent_ids)
        .bind(&seqs)
        .bind(&refs)
        .bind(CONFIG_UPDATED)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    }
    Ok(heads)
}

/// The effective hash a new agent with `labels` starts with. It takes the
/// `configs` lock shared: enrollments run side by side, but never beside a
/// configuration write, which either sees the new agent or is seen by it.
pub(super) async fn initial_hash(tx: &mut Tx, id: AgentId, labels: &Labels) -> Result<String> {
    super::lock_shared(tx, CONFIGS_LOCK).await?;
    Ok(load_docs(tx, Some(id)).await?.effective_for(id, labels).hash)
}

/// Writes `doc` as the scope's next version after `current` and retargets.
async fn write_version(
    tx: &mut Tx,
    scope: &Scope,
    version: u64,
    doc: &Doc,
    author: &str,
    comment: &str,
    now: Millis,
) -> Result<ConfigChange> {
    if let Scope::Agent(id) = scope {
        let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM agents WHERE id = $1 AND revoked_at IS NULL")
            .bind(id.to_string())
            .fetch_optional(&mut **tx)
            .await?;
        if exists.is_none() {
            return Err(StoreError::NotFound(Entity::Agent));
        }
    }
    let hash = doc_hash(doc);
    sqlx::query(
        "INSERT INTO config_versions (scope, version, doc, hash, author, comment, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(scope.to_string())
    .bind(version as i64)
    .bind(canonical_json(&serde_json::Value::Object(doc.clone())))
    .bind(&hash)
    .bind(author)
    .bind(comment)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO config_scopes (scope, kind, version, hash, updated_by, updated_at) VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (scope) DO UPDATE SET version = excluded.version, hash = excluded.hash,
             updated_by = excluded.updated_by, updated_at = excluded.updated_at",
    )
    .bind(scope.to_string())
    .bind(scope.kind())
    .bind(version as i64)
    .bind(&hash)
    .bind(author)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    let docs = load_docs(tx, None).await?;
    let changed = rules::retargeted(&docs, &targets(tx, scope).await?);
    let heads = retarget(tx, &changed, &scope.to_string(), version, now).await?;
    Ok(ConfigChange { scope: scope.clone(), version, hash, agents_changed: changed.len() as u64, heads })
}

async fn current_version(tx: &mut Tx, scope: &Scope) -> Result<Option<u64>> {
    let v: Option<i64> = sqlx::query_scalar("SELECT version FROM config_scopes WHERE scope = $1")
        .bind(scope.to_string())
        .fetch_optional(&mut **tx)
        .await?;
    Ok(v.map(|v| v as u64))
}

#[async_trait]
impl ConfigStore for PgStore {
    async fn put_config(&self, new: NewConfigVersion, audit: AuditEntry) -> Result<ConfigChange> {
        let mut tx = self.begin().await?;
        lock(&mut tx, CONFIGS_LOCK).await?;
        let version = rules::next_version(current_version(&mut tx, &new.scope).await?, new.if_match)?;
        let change = write_version(&mut tx, &new.scope, version, &new.doc, &new.author, &new.comment, new.now).await?;
        super::audit::insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(change)
    }

    async fn rollback_config(
        &self,
        scope: &Scope,
        version: u64,
        author: &str,
        now: Millis,
        audit: AuditEntry,
    ) -> Result<ConfigChange> {
        let mut tx = self.begin().await?;
        lock(&mut tx, CONFIGS_LOCK).await?;
        let current = current_version(&mut tx, scope).await?.ok_or(StoreError::NotFound(Entity::Config))?;
        let old: Option<String> =
            sqlx::query_scalar("SELECT doc FROM config_versions WHERE scope = $1 AND version = $2")
                .bind(scope.to_string())
                .bind(version as i64)
                .fetch_optional(&mut *tx)
                .await?;
        let doc: Doc = parse_json(&old.ok_or(StoreError::NotFound(Entity::Config))?)?;
        let comment = rules::rollback_comment(version);
        let change = write_version(&mut tx, scope, current + 1, &doc, author, &comment, now).await?;
        super::audit::insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(change)
    }

    async fn get_config(&self, scope: &Scope, version: Option<u64>) -> Result<Option<ConfigVersionRecord>> {
        let row = q!("SELECT {CONFIG_VERSION_COLUMNS} FROM config_versions
             WHERE scope = $1 AND version = COALESCE($2, (SELECT version FROM config_scopes WHERE scope = $1))")
        .bind(scope.to_string())
        .bind(version.map(|v| v as i64))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| config_version_from_row(&r)).transpose()
    }

    async fn config_history(&self, scope: &Scope, before: Option<u64>, limit: u32) -> Result<Vec<ConfigVersionRecord>> {
        let rows = q!("SELECT {CONFIG_VERSION_COLUMNS} FROM config_versions
             WHERE scope = $1 AND ($2::bigint IS NULL OR version < $2) ORDER BY version DESC LIMIT $3")
        .bind(scope.to_string())
        .bind(before.map(|v| v as i64))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(config_version_from_row).collect()
    }

    async fn list_configs(&self) -> Result<Vec<ConfigScopeRecord>> {
        let rows =
            q!("SELECT {CONFIG_SCOPE_COLUMNS} FROM config_scopes ORDER BY kind = 'agent', kind = 'label', scope")
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(config_scope_from_row).collect()
    }

    async fn effective_config(&self, agent_id: AgentId) -> Result<Option<EffectiveConfig>> {
        // One snapshot: the labels and the documents agree.
        let mut tx = self.snapshot().await?;
        let labels: Option<String> = sqlx::query_scalar("SELECT labels FROM agents WHERE id = $1")
            .bind(agent_id.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(labels) = labels else { return Ok(None) };
        let labels: Labels = parse_json(&labels)?;
        let docs = load_docs(&mut tx, Some(agent_id)).await?;
        Ok(Some(docs.effective_for(agent_id, &labels)))
    }

    async fn config_status(&self, scope: &Scope) -> Result<ConfigStatus> {
        let mut tx = self.snapshot().await?;
        let version = current_version(&mut tx, scope).await?.ok_or(StoreError::NotFound(Entity::Config))?;
        let (agent, label) = target_binds(scope);
        let rows = q!("SELECT applied_config_hash IS NOT DISTINCT FROM config_hash,
                    config_failed_hash IS NOT NULL AND config_failed_hash IS NOT DISTINCT FROM config_hash, config_error
             FROM agents WHERE {TARGETED}")
        .bind(&agent)
        .bind(&label)
        .fetch_all(&mut *tx)
        .await?;
        let reports = rows
            .iter()
            .map(|r| Ok((r.try_get::<bool, _>(0)?, r.try_get::<bool, _>(1)?, r.try_get::<Option<String>, _>(2)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(rules::fleet_status(scope.clone(), version, reports))
    }
}
