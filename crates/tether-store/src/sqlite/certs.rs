//! Certificates and the CAs on SQLite.

use async_trait::async_trait;
use sqlx::Row;
use tether_proto::AgentId;
use tether_proto::certs::{CertRenewed, CertRevoked, CertSource};
use tether_proto::signal::{CERT_RENEWED, CERT_REVOKED};

use super::commands::{resolve_target, targeted_agents};
use super::rows::{ca_from_row, cert_from_row};
use super::signals::append_to_many;
use super::{SqliteStore, Tx};
use crate::audit::AuditEntry;
use crate::rows::{CA_COLUMNS, CERT_COLUMNS};
use crate::sql::{is_unique_violation, json_text, parse_id, q, same_for_all};
use crate::{
    AuditFor, CaRecord, CertRecord, CertStore, Entity, ExpiringCert, Head, IssuedRecord, ItemChange, Millis, NewCa,
    NewCert, Result, SealedMaterial, StoreError,
};

async fn load_cert(tx: &mut Tx, id: i64) -> Result<Option<CertRecord>> {
    let row = q!("SELECT {CERT_COLUMNS} FROM certs c WHERE c.id = ?").bind(id).fetch_optional(&mut **tx).await?;
    row.map(|r| cert_from_row(&r)).transpose()
}

/// Every active certificate, inside `tx`.
pub(super) async fn active_certs(tx: &mut Tx) -> Result<Vec<CertRecord>> {
    let rows =
        q!("SELECT {CERT_COLUMNS} FROM certs c WHERE c.revoked_at IS NULL ORDER BY c.id").fetch_all(&mut **tx).await?;
    rows.iter().map(cert_from_row).collect()
}

pub(super) fn renewed_ref(c: &CertRecord) -> serde_json::Value {
    serde_json::to_value(CertRenewed { cert_id: c.id, serial: c.serial.clone() }).expect("serializes")
}

pub(super) fn revoked_ref(id: i64) -> serde_json::Value {
    serde_json::to_value(CertRevoked { cert_id: id }).expect("serializes")
}

/// Tells the agents of `cert` that it changed.
async fn tell(tx: &mut Tx, cert: &CertRecord, now: Millis) -> Result<Vec<Head>> {
    let agents = targeted_agents(tx, &cert.target).await?;
    append_to_many(tx, &agents, CERT_RENEWED, &same_for_all(&renewed_ref(cert)), now).await
}

/// Raises the version of every active issued certificate (so its agents
/// get one from the CA now in charge) and tells their agents.
async fn reissue_all(tx: &mut Tx, now: Millis) -> Result<Vec<Head>> {
    sqlx::query("UPDATE certs SET version = version + 1 WHERE source = 'issued' AND revoked_at IS NULL")
        .execute(&mut **tx)
        .await?;
    let mut heads = Vec::new();
    for cert in active_certs(tx).await?.iter().filter(|c| c.source == CertSource::Issued) {
        heads.extend(tell(tx, cert, now).await?);
    }
    Ok(heads)
}

async fn insert_ca(tx: &mut Tx, ca: &NewCa) -> Result<sqlx::sqlite::SqliteQueryResult> {
    Ok(sqlx::query(
        "INSERT INTO cas (serial, cert_pem, key_sealed, not_after, active, created_at) VALUES (?, ?, ?, ?, TRUE, ?)
         ON CONFLICT DO NOTHING",
    )
    .bind(&ca.serial)
    .bind(&ca.cert_pem)
    .bind(&ca.key_sealed)
    .bind(ca.not_after)
    .bind(ca.now)
    .execute(&mut **tx)
    .await?)
}

async fn active_ca(tx: &mut Tx) -> Result<Option<CaRecord>> {
    let row = q!("SELECT {CA_COLUMNS} FROM cas WHERE active").fetch_optional(&mut **tx).await?;
    row.map(|r| ca_from_row(&r)).transpose()
}

#[async_trait]
impl CertStore for SqliteStore {
    async fn create_cert(&self, new: NewCert, audit: AuditFor<'_, CertRecord>) -> Result<ItemChange<CertRecord>> {
        let mut tx = self.begin().await?;
        let agents = resolve_target(&mut tx, &new.target).await?;
        let source = if new.material.is_some() { CertSource::Uploaded } else { CertSource::Issued };
        let m = new.material.as_ref();
        let inserted = sqlx::query(
            "INSERT INTO certs (name, source, target, grp, hook, version, serial, not_after, cert_pem, chain_pem,
                                key_sealed, dns_names, ip_addresses, validity_days, created_by, created_at)
             VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(&new.name)
        .bind(source.as_str())
        .bind(json_text(&new.target.to_target()))
        .bind(&new.group)
        .bind(&new.hook)
        .bind(m.map(|m| &m.serial))
        .bind(m.map(|m| m.not_after))
        .bind(m.map(|m| &m.cert_pem))
        .bind(m.map(|m| &m.chain_pem))
        .bind(m.map(|m| &m.key_sealed))
        .bind(json_text(&new.dns_names))
        .bind(json_text(&new.ip_addresses))
        .bind(new.validity_days.map(i64::from))
        .bind(&new.by)
        .bind(new.now)
        .fetch_one(&mut *tx)
        .await;
        let id: i64 = match inserted {
            Ok(row) => row.try_get(0)?,
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::Conflict(format!("a certificate named {:?} exists", new.name)));
            }
            Err(e) => return Err(e.into()),
        };
        let cert = load_cert(&mut tx, id).await?.ok_or(StoreError::NotFound(Entity::Cert))?;
        let heads = append_to_many(&mut tx, &agents, CERT_RENEWED, &same_for_all(&renewed_ref(&cert)), new.now).await?;
        super::audit::insert_audit(&mut tx, &audit(&cert)).await?;
        tx.commit().await?;
        Ok(ItemChange { item: cert, agents_told: heads.len() as u64, heads })
    }

    async fn replace_cert(
        &self,
        id: i64,
        material: SealedMaterial,
        now: Millis,
        audit: AuditEntry,
    ) -> Result<ItemChange<CertRecord>> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE certs SET serial = ?, not_after = ?, cert_pem = ?, chain_pem = ?, key_sealed = ?,
                              version = version + 1
             WHERE id = ? AND source = 'uploaded' AND revoked_at IS NULL",
        )
        .bind(&material.serial)
        .bind(material.not_after)
        .bind(&material.cert_pem)
        .bind(&material.chain_pem)
        .bind(&material.key_sealed)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(Entity::Cert));
        }
        let cert = load_cert(&mut tx, id).await?.ok_or(StoreError::NotFound(Entity::Cert))?;
        let heads = tell(&mut tx, &cert, now).await?;
        super::audit::insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(ItemChange { item: cert, agents_told: heads.len() as u64, heads })
    }

    async fn revoke_cert(&self, id: i64, now: Millis, audit: AuditEntry) -> Result<ItemChange<CertRecord>> {
        let mut tx = self.begin().await?;
        let done = sqlx::query("UPDATE certs SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(Entity::Cert));
        }
        let cert = load_cert(&mut tx, id).await?.ok_or(StoreError::NotFound(Entity::Cert))?;
        let agents = targeted_agents(&mut tx, &cert.target).await?;
        let heads = append_to_many(&mut tx, &agents, CERT_REVOKED, &same_for_all(&revoked_ref(id)), now).await?;
        sqlx::query("DELETE FROM agent_items WHERE kind = 'cert' AND item_id = ?").bind(id).execute(&mut *tx).await?;
        super::audit::insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(ItemChange { item: cert, agents_told: heads.len() as u64, heads })
    }

    async fn list_certs(&self, revoked_since: Millis) -> Result<Vec<CertRecord>> {
        let rows = q!("SELECT {CERT_COLUMNS} FROM certs c WHERE c.revoked_at IS NULL OR c.revoked_at >= ?
             ORDER BY c.revoked_at IS NOT NULL, c.name, c.id")
        .bind(revoked_since)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(cert_from_row).collect()
    }

    async fn get_cert(&self, id: i64) -> Result<Option<CertRecord>> {
        let mut tx = self.reader.begin().await?;
        load_cert(&mut tx, id).await
    }

    async fn agent_certs(&self, agent_id: AgentId) -> Result<Vec<CertRecord>> {
        let mut tx = self.reader.begin().await?;
        let labels = super::agents::active_agent(&mut tx, agent_id).await?.labels;
        let all = active_certs(&mut tx).await?;
        Ok(all.into_iter().filter(|c| c.target.matches(agent_id, &labels)).collect())
    }

    async fn record_issued(&self, issued: IssuedRecord, audit: AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO issued_certs (serial, cert_id, agent_id, ca_id, version, not_after, issued_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&issued.serial)
        .bind(issued.cert_id)
        .bind(issued.agent_id.to_string())
        .bind(issued.ca_id)
        .bind(issued.version as i64)
        .bind(issued.not_after)
        .bind(issued.now)
        .execute(&mut *tx)
        .await?;
        super::audit::insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_cas(&self) -> Result<Vec<CaRecord>> {
        let rows = q!("SELECT {CA_COLUMNS} FROM cas WHERE retired_at IS NULL ORDER BY active DESC, id DESC")
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(ca_from_row).collect()
    }

    async fn ensure_ca(&self, candidate: NewCa) -> Result<CaRecord> {
        let mut tx = self.begin().await?;
        insert_ca(&mut tx, &candidate).await?;
        let ca = active_ca(&mut tx).await?.ok_or(StoreError::Corrupt("no active CA after creating one".into()))?;
        tx.commit().await?;
        Ok(ca)
    }

    async fn activate_ca(&self, ca: NewCa, audit: AuditEntry) -> Result<(CaRecord, Vec<Head>)> {
        let mut tx = self.begin().await?;
        sqlx::query("UPDATE cas SET active = FALSE WHERE active").execute(&mut *tx).await?;
        insert_ca(&mut tx, &ca).await?;
        let record =
            active_ca(&mut tx).await?.ok_or(StoreError::Corrupt("no active CA after activating one".into()))?;
        let heads = reissue_all(&mut tx, ca.now).await?;
        super::audit::insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok((record, heads))
    }

    async fn retire_cas(&self, now: Millis, audit: AuditEntry) -> Result<(u64, Vec<Head>)> {
        let mut tx = self.begin().await?;
        let retired = sqlx::query("UPDATE cas SET retired_at = ? WHERE NOT active AND retired_at IS NULL")
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let heads = if retired > 0 { reissue_all(&mut tx, now).await? } else { Vec::new() };
        super::audit::insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok((retired, heads))
    }

    async fn expiring_certs(&self, before: Millis) -> Result<Vec<ExpiringCert>> {
        let rows = sqlx::query(
            "SELECT c.id, c.name, c.serial, NULL, c.not_after FROM certs c
              WHERE c.revoked_at IS NULL AND c.source = 'uploaded' AND c.not_after < ?1
                AND c.serial NOT IN (SELECT serial FROM cert_expiry_announced)
             UNION ALL
             SELECT c.id, c.name, i.serial, i.agent_id, i.not_after FROM agent_items i JOIN certs c ON c.id = i.item_id
              WHERE i.kind = 'cert' AND i.state = 'applied' AND c.revoked_at IS NULL AND c.source = 'issued'
                AND i.not_after < ?1 AND i.serial IS NOT NULL
                AND i.serial NOT IN (SELECT serial FROM cert_expiry_announced)",
        )
        .bind(before)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ExpiringCert {
                    cert_id: r.try_get(0)?,
                    name: r.try_get(1)?,
                    serial: r.try_get(2)?,
                    agent_id: r.try_get::<Option<&str>, _>(3)?.map(parse_id).transpose()?,
                    not_after: r.try_get(4)?,
                })
            })
            .collect()
    }

    async fn announce_expiring(&self, serial: &str, now: Millis, audit: AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        let fresh = sqlx::query(
            "INSERT INTO cert_expiry_announced (serial, announced_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(serial)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if fresh {
            super::audit::insert_audit(&mut tx, &audit).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
