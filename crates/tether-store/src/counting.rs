//! [`CountingStore`]: any store, with every call counted. The server runs
//! on one, so a test can prove that a hot path (an idle poll) never reaches
//! the database, whichever the backend. Implementing every trait here is
//! what makes that proof hold: a method added to a trait and not counted
//! here does not compile.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use tether_proto::command::{Batch, Command, ResultReport};
use tether_proto::config::{ConfigStatus, EffectiveConfig, Scope};
use tether_proto::files::{FleetStatus, ItemReport};
use tether_proto::{AgentId, BatchId, CommandId, Labels, Signal};

use crate::audit::{AuditEntry, AuditRecord};
use crate::store::*;
use crate::{
    AgentFilter, AgentRecord, AgentUpdate, ApiTokenRecord, AuditFilter, AuditFor, BackendKind, BlobSource, CaRecord,
    CancelOutcome, CertRecord, CommandFilter, ConfigChange, ConfigScopeRecord, ConfigVersionRecord, CreatedBatch,
    DeviceGrantInfo, DevicePoll, DeviceRedeemed, EnrollTokenRecord, ExpiringCert, FileAssignmentRecord, FirstAdmin,
    Head, HeartbeatFacts, IssuedRecord, ItemChange, ItemKind, Millis, NewAgent, NewBatch, NewCa, NewCert,
    NewConfigVersion, NewDeviceGrant, NewEnrollToken, NewFileAssignment, NewGrantOutcome, RefreshOutcome, Result,
    ResultAudit, ResultOutcome, Role, SealedMaterial, StreamChange, SweepOutcome, User, UserRecord,
};

#[derive(Debug)]
pub struct CountingStore {
    inner: Arc<dyn Store>,
    calls: StoreCalls,
}

/// The count of a [`CountingStore`], readable while the store is in use
/// behind a `dyn Store`.
#[derive(Debug, Clone, Default)]
pub struct StoreCalls(Arc<AtomicU64>);

impl StoreCalls {
    /// Store calls made so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl CountingStore {
    /// `inner`, counted, and the handle to read the count.
    pub fn new(inner: Arc<dyn Store>) -> (Self, StoreCalls) {
        let calls = StoreCalls::default();
        (Self { inner, calls: calls.clone() }, calls)
    }

    fn tick(&self) {
        self.calls.0.fetch_add(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl ServerStore for CountingStore {
    fn kind(&self) -> BackendKind {
        self.inner.kind()
    }

    async fn check_ready(&self) -> Result<()> {
        self.tick();
        self.inner.check_ready().await
    }

    async fn server_key(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>> {
        self.tick();
        self.inner.server_key(name, candidate).await
    }

    async fn replace_server_key(&self, name: &str, old: &[u8], new: &[u8]) -> Result<bool> {
        self.tick();
        self.inner.replace_server_key(name, old, new).await
    }

    async fn try_job_lock(&self, name: &str) -> Result<Option<Box<dyn JobLease>>> {
        self.tick();
        self.inner.try_job_lock(name).await
    }

    async fn remember_nonce(&self, agent_id: AgentId, nonce: &str, expires_at_s: i64) -> Result<bool> {
        self.tick();
        self.inner.remember_nonce(agent_id, nonce, expires_at_s).await
    }

    async fn prune_nonces(&self, now_s: i64) -> Result<u64> {
        self.tick();
        self.inner.prune_nonces(now_s).await
    }
}

#[async_trait]
impl UserStore for CountingStore {
    async fn create_first_admin(&self, admin: FirstAdmin, audit: AuditEntry) -> Result<Option<User>> {
        self.tick();
        self.inner.create_first_admin(admin, audit).await
    }

    async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
        role: Role,
        now: Millis,
        audit: AuditEntry,
    ) -> Result<User> {
        self.tick();
        self.inner.create_user(username, password_hash, role, now, audit).await
    }

    async fn set_password(&self, username: &str, password_hash: &str, now: Millis, audit: AuditEntry) -> Result<()> {
        self.tick();
        self.inner.set_password(username, password_hash, now, audit).await
    }

    async fn list_users(&self) -> Result<Vec<UserRecord>> {
        self.tick();
        self.inner.list_users().await
    }

    async fn update_user(
        &self,
        id: &str,
        role: Option<Role>,
        password_hash: Option<&str>,
        now: Millis,
        audit: AuditEntry,
    ) -> Result<UserRecord> {
        self.tick();
        self.inner.update_user(id, role, password_hash, now, audit).await
    }

    async fn disable_user(&self, id: &str, now: Millis, audit: AuditEntry) -> Result<()> {
        self.tick();
        self.inner.disable_user(id, now, audit).await
    }

    async fn find_user(&self, username: &str) -> Result<Option<User>> {
        self.tick();
        self.inner.find_user(username).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn create_api_token(
        &self,
        user_id: &str,
        name: &str,
        token_hash: [u8; 32],
        expires_at: Option<Millis>,
        from_password: bool,
        now: Millis,
        audit: AuditEntry,
    ) -> Result<String> {
        self.tick();
        self.inner.create_api_token(user_id, name, token_hash, expires_at, from_password, now, audit).await
    }

    async fn list_api_tokens(&self, user_id: &str) -> Result<Vec<ApiTokenRecord>> {
        self.tick();
        self.inner.list_api_tokens(user_id).await
    }

    async fn revoke_api_token(&self, user_id: &str, id: &str, now: Millis, audit: AuditEntry) -> Result<()> {
        self.tick();
        self.inner.revoke_api_token(user_id, id, now, audit).await
    }

    async fn create_session(
        &self,
        token_hash: [u8; 32],
        user_id: &str,
        csrf: &str,
        expires_at: Millis,
        now: Millis,
        audit: AuditEntry,
    ) -> Result<()> {
        self.tick();
        self.inner.create_session(token_hash, user_id, csrf, expires_at, now, audit).await
    }

    async fn find_session(&self, token_hash: [u8; 32], now: Millis) -> Result<Option<(User, String)>> {
        self.tick();
        self.inner.find_session(token_hash, now).await
    }

    async fn delete_session(&self, token_hash: [u8; 32]) -> Result<()> {
        self.tick();
        self.inner.delete_session(token_hash).await
    }

    async fn find_api_token(&self, token_hash: [u8; 32], now: Millis) -> Result<Option<(User, Option<Millis>)>> {
        self.tick();
        self.inner.find_api_token(token_hash, now).await
    }
}

#[async_trait]
impl TokenStore for CountingStore {
    async fn create_enroll_token(&self, token: NewEnrollToken, now: Millis, audit: AuditEntry) -> Result<()> {
        self.tick();
        self.inner.create_enroll_token(token, now, audit).await
    }

    async fn list_enroll_tokens(&self) -> Result<Vec<EnrollTokenRecord>> {
        self.tick();
        self.inner.list_enroll_tokens().await
    }

    async fn revoke_enroll_token(&self, id: &str, now: Millis, audit: AuditEntry) -> Result<()> {
        self.tick();
        self.inner.revoke_enroll_token(id, now, audit).await
    }

    async fn refresh_family(&self, presented_hash: [u8; 32]) -> Result<Option<String>> {
        self.tick();
        self.inner.refresh_family(presented_hash).await
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
        self.tick();
        self.inner.rotate_refresh_token(expected_agent, presented_hash, new_hash, grace_ms, now, reuse_audit).await
    }
}

#[async_trait]
impl AgentStore for CountingStore {
    async fn enroll_agent(
        &self,
        enroll_token_hash: [u8; 32],
        agent: NewAgent,
        refresh_hash: [u8; 32],
        now: Millis,
        audit: AuditFor<'_, AgentRecord>,
    ) -> Result<AgentRecord> {
        self.tick();
        self.inner.enroll_agent(enroll_token_hash, agent, refresh_hash, now, audit).await
    }

    async fn get_agent(&self, id: AgentId) -> Result<Option<AgentRecord>> {
        self.tick();
        self.inner.get_agent(id).await
    }

    async fn list_agents(&self, filter: &AgentFilter) -> Result<Vec<AgentRecord>> {
        self.tick();
        self.inner.list_agents(filter).await
    }

    async fn revoke_agent(&self, id: AgentId, reason: &str, now: Millis, audit: AuditEntry) -> Result<AgentRecord> {
        self.tick();
        self.inner.revoke_agent(id, reason, now, audit).await
    }

    async fn record_heartbeat(&self, id: AgentId, beat: HeartbeatFacts<'_>, now: Millis) -> Result<()> {
        self.tick();
        self.inner.record_heartbeat(id, beat, now).await
    }

    async fn update_agent(
        &self,
        id: AgentId,
        update: AgentUpdate,
        now: Millis,
        audit: AuditEntry,
    ) -> Result<(AgentRecord, Vec<Head>)> {
        self.tick();
        self.inner.update_agent(id, update, now, audit).await
    }

    async fn touch_agents(&self, seen: &[(AgentId, Millis)]) -> Result<()> {
        self.tick();
        self.inner.touch_agents(seen).await
    }

    async fn stream_changes(&self, since: Millis) -> Result<Vec<StreamChange>> {
        self.tick();
        self.inner.stream_changes(since).await
    }
}

#[async_trait]
impl DeviceGrantStore for CountingStore {
    async fn create_device_grant(&self, grant: NewDeviceGrant) -> Result<NewGrantOutcome> {
        self.tick();
        self.inner.create_device_grant(grant).await
    }

    async fn pending_device_grant(&self, user_code: &str, now: Millis) -> Result<Option<DeviceGrantInfo>> {
        self.tick();
        self.inner.pending_device_grant(user_code, now).await
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
        self.tick();
        self.inner.decide_device_grant(user_code, approve, labels, decided_by, now, audit).await
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
        self.tick();
        self.inner.poll_device_grant(device_code_hash, new_agent, refresh_hash, grace_ms, now, audit).await
    }

    async fn prune_device_grants(&self, before: Millis) -> Result<u64> {
        self.tick();
        self.inner.prune_device_grants(before).await
    }
}

#[async_trait]
impl SignalStore for CountingStore {
    async fn read_signals(&self, agent_id: AgentId, after: u64, limit: u32) -> Result<Vec<(u64, Signal)>> {
        self.tick();
        self.inner.read_signals(agent_id, after, limit).await
    }

    async fn prune_signals(&self, before: Millis, keep: u64, now: Millis) -> Result<Vec<(AgentId, u64)>> {
        self.tick();
        self.inner.prune_signals(before, keep, now).await
    }
}

#[async_trait]
impl CommandStore for CountingStore {
    async fn create_batch(&self, batch: NewBatch, audit: AuditFor<'_, CreatedBatch>) -> Result<CreatedBatch> {
        self.tick();
        self.inner.create_batch(batch, audit).await
    }

    async fn get_command(&self, id: CommandId) -> Result<Option<Command>> {
        self.tick();
        self.inner.get_command(id).await
    }

    async fn list_commands(&self, filter: &CommandFilter) -> Result<Vec<Command>> {
        self.tick();
        self.inner.list_commands(filter).await
    }

    async fn get_batch(&self, id: BatchId) -> Result<Option<Batch>> {
        self.tick();
        self.inner.get_batch(id).await
    }

    async fn mark_delivered(&self, agent_id: AgentId, ids: &[CommandId], now: Millis) -> Result<u64> {
        self.tick();
        self.inner.mark_delivered(agent_id, ids, now).await
    }

    async fn take_next_command(&self, agent_id: AgentId, now: Millis) -> Result<Option<Command>> {
        self.tick();
        self.inner.take_next_command(agent_id, now).await
    }

    async fn report_running(&self, agent_id: AgentId, id: CommandId, now: Millis) -> Result<Command> {
        self.tick();
        self.inner.report_running(agent_id, id, now).await
    }

    async fn report_result(
        &self,
        agent_id: AgentId,
        id: CommandId,
        report: &ResultReport,
        now: Millis,
        audit: ResultAudit<'_>,
    ) -> Result<ResultOutcome> {
        self.tick();
        self.inner.report_result(agent_id, id, report, now, audit).await
    }

    async fn cancel_command(&self, id: CommandId, now: Millis, audit: AuditEntry) -> Result<CancelOutcome> {
        self.tick();
        self.inner.cancel_command(id, now, audit).await
    }

    async fn cancel_batch(
        &self,
        id: BatchId,
        now: Millis,
        audit: AuditFor<'_, CancelOutcome>,
    ) -> Result<CancelOutcome> {
        self.tick();
        self.inner.cancel_batch(id, now, audit).await
    }

    async fn sweep(&self, now: Millis) -> Result<SweepOutcome> {
        self.tick();
        self.inner.sweep(now).await
    }
}

#[async_trait]
impl ConfigStore for CountingStore {
    async fn put_config(&self, new: NewConfigVersion, audit: AuditEntry) -> Result<ConfigChange> {
        self.tick();
        self.inner.put_config(new, audit).await
    }

    async fn rollback_config(
        &self,
        scope: &Scope,
        version: u64,
        author: &str,
        now: Millis,
        audit: AuditEntry,
    ) -> Result<ConfigChange> {
        self.tick();
        self.inner.rollback_config(scope, version, author, now, audit).await
    }

    async fn get_config(&self, scope: &Scope, version: Option<u64>) -> Result<Option<ConfigVersionRecord>> {
        self.tick();
        self.inner.get_config(scope, version).await
    }

    async fn config_history(&self, scope: &Scope, before: Option<u64>, limit: u32) -> Result<Vec<ConfigVersionRecord>> {
        self.tick();
        self.inner.config_history(scope, before, limit).await
    }

    async fn list_configs(&self) -> Result<Vec<ConfigScopeRecord>> {
        self.tick();
        self.inner.list_configs().await
    }

    async fn effective_config(&self, agent_id: AgentId) -> Result<Option<EffectiveConfig>> {
        self.tick();
        self.inner.effective_config(agent_id).await
    }

    async fn config_status(&self, scope: &Scope) -> Result<ConfigStatus> {
        self.tick();
        self.inner.config_status(scope).await
    }
}

#[async_trait]
impl AuditStore for CountingStore {
    async fn append_audit(&self, entry: AuditEntry) -> Result<()> {
        self.tick();
        self.inner.append_audit(entry).await
    }

    async fn list_audit(&self, after_id: i64, limit: u32) -> Result<Vec<AuditRecord>> {
        self.tick();
        self.inner.list_audit(after_id, limit).await
    }

    async fn query_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>> {
        self.tick();
        self.inner.query_audit(filter).await
    }
}

#[async_trait]
impl FileStore for CountingStore {
    async fn put_blob(&self, sha256: &str, size: u64, source: BlobSource<'_>, now: Millis) -> Result<bool> {
        self.tick();
        self.inner.put_blob(sha256, size, source, now).await
    }

    async fn blob_size(&self, sha256: &str) -> Result<Option<u64>> {
        self.tick();
        self.inner.blob_size(sha256).await
    }

    async fn blob_chunk(&self, sha256: &str, index: u64) -> Result<Option<Vec<u8>>> {
        self.tick();
        self.inner.blob_chunk(sha256, index).await
    }

    async fn assign_file(
        &self,
        new: NewFileAssignment,
        audit: AuditFor<'_, FileAssignmentRecord>,
    ) -> Result<ItemChange<FileAssignmentRecord>> {
        self.tick();
        self.inner.assign_file(new, audit).await
    }

    async fn unassign_file(&self, id: i64, now: Millis, audit: AuditEntry) -> Result<ItemChange<FileAssignmentRecord>> {
        self.tick();
        self.inner.unassign_file(id, now, audit).await
    }

    async fn list_file_assignments(&self) -> Result<Vec<FileAssignmentRecord>> {
        self.tick();
        self.inner.list_file_assignments().await
    }

    async fn get_file_assignment(&self, id: i64) -> Result<Option<FileAssignmentRecord>> {
        self.tick();
        self.inner.get_file_assignment(id).await
    }

    async fn agent_files(&self, agent_id: AgentId) -> Result<Vec<FileAssignmentRecord>> {
        self.tick();
        self.inner.agent_files(agent_id).await
    }
}

#[async_trait]
impl CertStore for CountingStore {
    async fn create_cert(&self, new: NewCert, audit: AuditFor<'_, CertRecord>) -> Result<ItemChange<CertRecord>> {
        self.tick();
        self.inner.create_cert(new, audit).await
    }

    async fn replace_cert(
        &self,
        id: i64,
        material: SealedMaterial,
        now: Millis,
        audit: AuditEntry,
    ) -> Result<ItemChange<CertRecord>> {
        self.tick();
        self.inner.replace_cert(id, material, now, audit).await
    }

    async fn revoke_cert(&self, id: i64, now: Millis, audit: AuditEntry) -> Result<ItemChange<CertRecord>> {
        self.tick();
        self.inner.revoke_cert(id, now, audit).await
    }

    async fn list_certs(&self, revoked_since: Millis) -> Result<Vec<CertRecord>> {
        self.tick();
        self.inner.list_certs(revoked_since).await
    }

    async fn get_cert(&self, id: i64) -> Result<Option<CertRecord>> {
        self.tick();
        self.inner.get_cert(id).await
    }

    async fn agent_certs(&self, agent_id: AgentId) -> Result<Vec<CertRecord>> {
        self.tick();
        self.inner.agent_certs(agent_id).await
    }

    async fn record_issued(&self, issued: IssuedRecord, audit: AuditEntry) -> Result<()> {
        self.tick();
        self.inner.record_issued(issued, audit).await
    }

    async fn list_cas(&self) -> Result<Vec<CaRecord>> {
        self.tick();
        self.inner.list_cas().await
    }

    async fn ensure_ca(&self, candidate: NewCa) -> Result<CaRecord> {
        self.tick();
        self.inner.ensure_ca(candidate).await
    }

    async fn activate_ca(&self, ca: NewCa, audit: AuditEntry) -> Result<(CaRecord, Vec<Head>)> {
        self.tick();
        self.inner.activate_ca(ca, audit).await
    }

    async fn retire_cas(&self, now: Millis, audit: AuditEntry) -> Result<(u64, Vec<Head>)> {
        self.tick();
        self.inner.retire_cas(now, audit).await
    }

    async fn expiring_certs(&self, before: Millis) -> Result<Vec<ExpiringCert>> {
        self.tick();
        self.inner.expiring_certs(before).await
    }

    async fn announce_expiring(&self, serial: &str, now: Millis, audit: AuditEntry) -> Result<()> {
        self.tick();
        self.inner.announce_expiring(serial, now, audit).await
    }
}

#[async_trait]
impl ItemStore for CountingStore {
    async fn report_item(
        &self,
        agent_id: AgentId,
        kind: ItemKind,
        item_id: i64,
        report: ItemReport,
        now: Millis,
    ) -> Result<()> {
        self.tick();
        self.inner.report_item(agent_id, kind, item_id, report, now).await
    }

    async fn item_status(&self, kind: ItemKind, item_id: i64) -> Result<FleetStatus> {
        self.tick();
        self.inner.item_status(kind, item_id).await
    }
}
