//! [`CountingStore`]: any store, with every call counted and timed. The
//! server runs on one, so a test can prove that a hot path (an idle poll)
//! never reaches the database, whichever the backend, and each call's
//! latency is a histogram per method (`tether_store_call_duration_seconds`). Implementing every trait here is
//! what makes that proof hold: a method added to a trait and not counted
//! here does not compile.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use tether_proto::command::{Batch, Command, ResultReport};
use tether_proto::config::{ConfigStatus, EffectiveConfig, Scope};
use tether_proto::files::{FleetStatus, ItemReport};
use tether_proto::{AgentId, BatchId, CommandId, Labels, Signal};

use tether_proto::telemetry::{InventoryItem, InventoryKey, Series};

use crate::audit::{AuditAnchor, AuditEntry, AuditRecord};
use crate::store::*;
use crate::{
    AgentFilter, AgentKeyRecord, AgentRecord, AgentUpdate, ApiTokenRecord, AuditFilter, AuditFor, BackendKind,
    BlobSource, CaRecord, CancelOutcome, CertRecord, CommandFilter, ConfigChange, ConfigScopeRecord,
    ConfigVersionRecord, CreatedBatch, DeviceGrantInfo, DevicePoll, DeviceRedeemed, EnrollTokenRecord, ExpiringCert,
    FileAssignmentRecord, FirstAdmin, FleetCounts, Head, HeartbeatRow, Horizons, InventoryRecord, IssuedRecord,
    ItemChange, ItemKind, MetricQuery, MetricsOutcome, Millis, NewAgent, NewAgentKey, NewBatch, NewCa, NewCert,
    NewConfigVersion, NewDeviceGrant, NewEnrollToken, NewFileAssignment, NewGrantOutcome, NewMetrics, PresenceChange,
    PruneCounts, RefreshOutcome, Result, ResultAudit, ResultOutcome, ResultToRecord, Role, SealedMaterial,
    StreamChange, SweepOutcome, User, UserRecord,
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

    /// Counts a call to `method` now, and times it until the guard drops.
    fn call(&self, method: &'static str) -> CallTimer {
        self.calls.0.fetch_add(1, Ordering::Relaxed);
        CallTimer { method, started: Instant::now() }
    }
}

/// Records how long one store call took when dropped, as the histogram
/// `tether_store_call_duration_seconds{method}` (whatever `metrics`
/// recorder the process installed; none: nothing is kept). Dropped at the
/// end of the call whether it succeeded, failed or was cancelled.
#[derive(Debug)]
struct CallTimer {
    method: &'static str,
    started: Instant,
}

impl Drop for CallTimer {
    fn drop(&mut self) {
        metrics::histogram!("tether_store_call_duration_seconds", "method" => self.method)
            .record(self.started.elapsed().as_secs_f64());
    }
}

#[async_trait]
impl ServerStore for CountingStore {
    fn kind(&self) -> BackendKind {
        self.inner.kind()
    }

    async fn check_ready(&self) -> Result<()> {
        let _t = self.call("check_ready");
        self.inner.check_ready().await
    }

    async fn server_key(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>> {
        let _t = self.call("server_key");
        self.inner.server_key(name, candidate).await
    }

    async fn replace_server_key(&self, name: &str, old: &[u8], new: &[u8]) -> Result<bool> {
        let _t = self.call("replace_server_key");
        self.inner.replace_server_key(name, old, new).await
    }

    async fn try_job_lock(&self, name: &str) -> Result<Option<Box<dyn JobLease>>> {
        let _t = self.call("try_job_lock");
        self.inner.try_job_lock(name).await
    }

    async fn remember_nonce(&self, agent_id: AgentId, nonce: &str, expires_at_s: i64) -> Result<bool> {
        let _t = self.call("remember_nonce");
        self.inner.remember_nonce(agent_id, nonce, expires_at_s).await
    }

    async fn prune_nonces(&self, now_s: i64) -> Result<u64> {
        let _t = self.call("prune_nonces");
        self.inner.prune_nonces(now_s).await
    }
}

#[async_trait]
impl UserStore for CountingStore {
    async fn create_first_admin(&self, admin: FirstAdmin, audit: AuditEntry) -> Result<Option<User>> {
        let _t = self.call("create_first_admin");
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
        let _t = self.call("create_user");
        self.inner.create_user(username, password_hash, role, now, audit).await
    }

    async fn set_password(&self, username: &str, password_hash: &str, now: Millis, audit: AuditEntry) -> Result<()> {
        let _t = self.call("set_password");
        self.inner.set_password(username, password_hash, now, audit).await
    }

    async fn list_users(&self) -> Result<Vec<UserRecord>> {
        let _t = self.call("list_users");
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
        let _t = self.call("update_user");
        self.inner.update_user(id, role, password_hash, now, audit).await
    }

    async fn disable_user(&self, id: &str, now: Millis, audit: AuditEntry) -> Result<()> {
        let _t = self.call("disable_user");
        self.inner.disable_user(id, now, audit).await
    }

    async fn find_user(&self, username: &str) -> Result<Option<User>> {
        let _t = self.call("find_user");
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
        let _t = self.call("create_api_token");
        self.inner.create_api_token(user_id, name, token_hash, expires_at, from_password, now, audit).await
    }

    async fn list_api_tokens(&self, user_id: &str) -> Result<Vec<ApiTokenRecord>> {
        let _t = self.call("list_api_tokens");
        self.inner.list_api_tokens(user_id).await
    }

    async fn revoke_api_token(&self, user_id: &str, id: &str, now: Millis, audit: AuditEntry) -> Result<()> {
        let _t = self.call("revoke_api_token");
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
        let _t = self.call("create_session");
        self.inner.create_session(token_hash, user_id, csrf, expires_at, now, audit).await
    }

    async fn find_session(&self, token_hash: [u8; 32], now: Millis) -> Result<Option<(User, String)>> {
        let _t = self.call("find_session");
        self.inner.find_session(token_hash, now).await
    }

    async fn delete_session(&self, token_hash: [u8; 32]) -> Result<()> {
        let _t = self.call("delete_session");
        self.inner.delete_session(token_hash).await
    }

    async fn find_api_token(&self, token_hash: [u8; 32], now: Millis) -> Result<Option<(User, Option<Millis>)>> {
        let _t = self.call("find_api_token");
        self.inner.find_api_token(token_hash, now).await
    }
}

#[async_trait]
impl TokenStore for CountingStore {
    async fn create_enroll_token(&self, token: NewEnrollToken, now: Millis, audit: AuditEntry) -> Result<()> {
        let _t = self.call("create_enroll_token");
        self.inner.create_enroll_token(token, now, audit).await
    }

    async fn list_enroll_tokens(&self) -> Result<Vec<EnrollTokenRecord>> {
        let _t = self.call("list_enroll_tokens");
        self.inner.list_enroll_tokens().await
    }

    async fn revoke_enroll_token(&self, id: &str, now: Millis, audit: AuditEntry) -> Result<()> {
        let _t = self.call("revoke_enroll_token");
        self.inner.revoke_enroll_token(id, now, audit).await
    }

    async fn refresh_family(&self, presented_hash: [u8; 32]) -> Result<Option<String>> {
        let _t = self.call("refresh_family");
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
        let _t = self.call("rotate_refresh_token");
        self.inner.rotate_refresh_token(expected_agent, presented_hash, new_hash, grace_ms, now, reuse_audit).await
    }

    async fn current_refresh_agent(
        &self,
        expected_agent: Option<AgentId>,
        presented_hash: [u8; 32],
    ) -> Result<Option<AgentId>> {
        let _t = self.call("current_refresh_agent");
        self.inner.current_refresh_agent(expected_agent, presented_hash).await
    }

    async fn create_agent_key(&self, key: NewAgentKey, now: Millis, audit: AuditEntry) -> Result<AgentKeyRecord> {
        let _t = self.call("create_agent_key");
        self.inner.create_agent_key(key, now, audit).await
    }

    async fn find_agent_key(&self, key_hash: [u8; 32]) -> Result<Option<AgentId>> {
        let _t = self.call("find_agent_key");
        self.inner.find_agent_key(key_hash).await
    }

    async fn list_agent_keys(&self, agent_id: AgentId) -> Result<Vec<AgentKeyRecord>> {
        let _t = self.call("list_agent_keys");
        self.inner.list_agent_keys(agent_id).await
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
        let _t = self.call("enroll_agent");
        self.inner.enroll_agent(enroll_token_hash, agent, refresh_hash, now, audit).await
    }

    async fn get_agent(&self, id: AgentId) -> Result<Option<AgentRecord>> {
        let _t = self.call("get_agent");
        self.inner.get_agent(id).await
    }

    async fn list_agents(&self, filter: &AgentFilter) -> Result<Vec<AgentRecord>> {
        let _t = self.call("list_agents");
        self.inner.list_agents(filter).await
    }

    async fn revoke_agent(&self, id: AgentId, reason: &str, now: Millis, audit: AuditEntry) -> Result<AgentRecord> {
        let _t = self.call("revoke_agent");
        self.inner.revoke_agent(id, reason, now, audit).await
    }

    async fn record_heartbeats(&self, beats: &[HeartbeatRow]) -> Result<()> {
        let _t = self.call("record_heartbeats");
        self.inner.record_heartbeats(beats).await
    }

    async fn update_presence(&self, offline_before: Millis, now: Millis) -> Result<Vec<PresenceChange>> {
        let _t = self.call("update_presence");
        self.inner.update_presence(offline_before, now).await
    }

    async fn disconnect_agent(&self, id: AgentId, at: Millis) -> Result<Option<PresenceChange>> {
        let _t = self.call("disconnect_agent");
        self.inner.disconnect_agent(id, at).await
    }

    async fn delete_agent(&self, id: AgentId, audit: AuditEntry) -> Result<AgentRecord> {
        let _t = self.call("delete_agent");
        self.inner.delete_agent(id, audit).await
    }

    async fn update_agent(
        &self,
        id: AgentId,
        update: AgentUpdate,
        now: Millis,
        audit: AuditEntry,
    ) -> Result<(AgentRecord, Vec<Head>)> {
        let _t = self.call("update_agent");
        self.inner.update_agent(id, update, now, audit).await
    }

    async fn touch_agents(&self, seen: &[(AgentId, Millis)]) -> Result<()> {
        let _t = self.call("touch_agents");
        self.inner.touch_agents(seen).await
    }

    async fn stream_changes(&self, since: Millis) -> Result<Vec<StreamChange>> {
        let _t = self.call("stream_changes");
        self.inner.stream_changes(since).await
    }
}

#[async_trait]
impl DeviceGrantStore for CountingStore {
    async fn create_device_grant(&self, grant: NewDeviceGrant) -> Result<NewGrantOutcome> {
        let _t = self.call("create_device_grant");
        self.inner.create_device_grant(grant).await
    }

    async fn pending_device_grant(&self, user_code: &str, now: Millis) -> Result<Option<DeviceGrantInfo>> {
        let _t = self.call("pending_device_grant");
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
        let _t = self.call("decide_device_grant");
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
        let _t = self.call("poll_device_grant");
        self.inner.poll_device_grant(device_code_hash, new_agent, refresh_hash, grace_ms, now, audit).await
    }

    async fn prune_device_grants(&self, before: Millis) -> Result<u64> {
        let _t = self.call("prune_device_grants");
        self.inner.prune_device_grants(before).await
    }
}

#[async_trait]
impl SignalStore for CountingStore {
    async fn read_signals(&self, agent_id: AgentId, after: u64, limit: u32) -> Result<Vec<(u64, Signal)>> {
        let _t = self.call("read_signals");
        self.inner.read_signals(agent_id, after, limit).await
    }

    async fn prune_signals(&self, before: Millis, keep: u64, now: Millis) -> Result<Vec<(AgentId, u64)>> {
        let _t = self.call("prune_signals");
        self.inner.prune_signals(before, keep, now).await
    }
}

#[async_trait]
impl CommandStore for CountingStore {
    async fn create_batch(&self, batch: NewBatch, audit: AuditFor<'_, CreatedBatch>) -> Result<CreatedBatch> {
        let _t = self.call("create_batch");
        self.inner.create_batch(batch, audit).await
    }

    async fn get_command(&self, id: CommandId) -> Result<Option<Command>> {
        let _t = self.call("get_command");
        self.inner.get_command(id).await
    }

    async fn list_commands(&self, filter: &CommandFilter) -> Result<Vec<Command>> {
        let _t = self.call("list_commands");
        self.inner.list_commands(filter).await
    }

    async fn get_batch(&self, id: BatchId) -> Result<Option<Batch>> {
        let _t = self.call("get_batch");
        self.inner.get_batch(id).await
    }

    async fn mark_delivered(&self, delivered: &[(AgentId, CommandId)], now: Millis) -> Result<u64> {
        let _t = self.call("mark_delivered");
        self.inner.mark_delivered(delivered, now).await
    }

    async fn take_next_command(&self, agent_id: AgentId, now: Millis) -> Result<Option<Command>> {
        let _t = self.call("take_next_command");
        self.inner.take_next_command(agent_id, now).await
    }

    async fn report_running(&self, agent_id: AgentId, id: CommandId, now: Millis) -> Result<Command> {
        let _t = self.call("report_running");
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
        let _t = self.call("report_result");
        self.inner.report_result(agent_id, id, report, now, audit).await
    }

    async fn report_results(&self, reports: &[ResultToRecord<'_>]) -> Result<Vec<Result<ResultOutcome>>> {
        let _t = self.call("report_results");
        self.inner.report_results(reports).await
    }

    async fn cancel_command(&self, id: CommandId, now: Millis, audit: AuditEntry) -> Result<CancelOutcome> {
        let _t = self.call("cancel_command");
        self.inner.cancel_command(id, now, audit).await
    }

    async fn cancel_batch(
        &self,
        id: BatchId,
        now: Millis,
        audit: AuditFor<'_, CancelOutcome>,
    ) -> Result<CancelOutcome> {
        let _t = self.call("cancel_batch");
        self.inner.cancel_batch(id, now, audit).await
    }

    async fn sweep(&self, now: Millis) -> Result<SweepOutcome> {
        let _t = self.call("sweep");
        self.inner.sweep(now).await
    }
}

#[async_trait]
impl ConfigStore for CountingStore {
    async fn put_config(&self, new: NewConfigVersion, audit: AuditEntry) -> Result<ConfigChange> {
        let _t = self.call("put_config");
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
        let _t = self.call("rollback_config");
        self.inner.rollback_config(scope, version, author, now, audit).await
    }

    async fn get_config(&self, scope: &Scope, version: Option<u64>) -> Result<Option<ConfigVersionRecord>> {
        let _t = self.call("get_config");
        self.inner.get_config(scope, version).await
    }

    async fn config_history(&self, scope: &Scope, before: Option<u64>, limit: u32) -> Result<Vec<ConfigVersionRecord>> {
        let _t = self.call("config_history");
        self.inner.config_history(scope, before, limit).await
    }

    async fn list_configs(&self) -> Result<Vec<ConfigScopeRecord>> {
        let _t = self.call("list_configs");
        self.inner.list_configs().await
    }

    async fn effective_config(&self, agent_id: AgentId) -> Result<Option<EffectiveConfig>> {
        let _t = self.call("effective_config");
        self.inner.effective_config(agent_id).await
    }

    async fn config_status(&self, scope: &Scope) -> Result<ConfigStatus> {
        let _t = self.call("config_status");
        self.inner.config_status(scope).await
    }
}

#[async_trait]
impl AuditStore for CountingStore {
    async fn append_audit(&self, entry: AuditEntry) -> Result<()> {
        let _t = self.call("append_audit");
        self.inner.append_audit(entry).await
    }

    async fn list_audit(&self, after_id: i64, limit: u32) -> Result<Vec<AuditRecord>> {
        let _t = self.call("list_audit");
        self.inner.list_audit(after_id, limit).await
    }

    async fn query_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>> {
        let _t = self.call("query_audit");
        self.inner.query_audit(filter).await
    }

    async fn audit_anchor(&self) -> Result<Option<AuditAnchor>> {
        let _t = self.call("audit_anchor");
        self.inner.audit_anchor().await
    }
}

#[async_trait]
impl TelemetryStore for CountingStore {
    async fn store_metrics(&self, batch: NewMetrics<'_>) -> Result<MetricsOutcome> {
        let _t = self.call("store_metrics");
        self.inner.store_metrics(batch).await
    }

    async fn query_metrics(&self, q: &MetricQuery) -> Result<(Vec<Series>, bool)> {
        let _t = self.call("query_metrics");
        self.inner.query_metrics(q).await
    }

    async fn change_inventory(
        &self,
        agent_id: AgentId,
        upsert: &[InventoryItem],
        remove: &[InventoryKey],
        now: Millis,
    ) -> Result<()> {
        let _t = self.call("change_inventory");
        self.inner.change_inventory(agent_id, upsert, remove, now).await
    }

    async fn replace_inventory(&self, agent_id: AgentId, items: &[InventoryItem], now: Millis) -> Result<()> {
        let _t = self.call("replace_inventory");
        self.inner.replace_inventory(agent_id, items, now).await
    }

    async fn list_inventory(
        &self,
        agent_id: AgentId,
        kind: Option<&str>,
        after: Option<(String, String)>,
        limit: u32,
    ) -> Result<Vec<InventoryRecord>> {
        let _t = self.call("list_inventory");
        self.inner.list_inventory(agent_id, kind, after, limit).await
    }

    async fn prune_history(&self, h: &Horizons, max_rows: u32) -> Result<PruneCounts> {
        let _t = self.call("prune_history");
        self.inner.prune_history(h, max_rows).await
    }

    async fn fleet_counts(&self, seen_since: Millis) -> Result<FleetCounts> {
        let _t = self.call("fleet_counts");
        self.inner.fleet_counts(seen_since).await
    }
}

#[async_trait]
impl FileStore for CountingStore {
    async fn put_blob(&self, sha256: &str, size: u64, source: BlobSource<'_>, now: Millis) -> Result<bool> {
        let _t = self.call("put_blob");
        self.inner.put_blob(sha256, size, source, now).await
    }

    async fn blob_size(&self, sha256: &str) -> Result<Option<u64>> {
        let _t = self.call("blob_size");
        self.inner.blob_size(sha256).await
    }

    async fn blob_chunk(&self, sha256: &str, index: u64) -> Result<Option<Vec<u8>>> {
        let _t = self.call("blob_chunk");
        self.inner.blob_chunk(sha256, index).await
    }

    async fn assign_file(
        &self,
        new: NewFileAssignment,
        audit: AuditFor<'_, FileAssignmentRecord>,
    ) -> Result<ItemChange<FileAssignmentRecord>> {
        let _t = self.call("assign_file");
        self.inner.assign_file(new, audit).await
    }

    async fn unassign_file(&self, id: i64, now: Millis, audit: AuditEntry) -> Result<ItemChange<FileAssignmentRecord>> {
        let _t = self.call("unassign_file");
        self.inner.unassign_file(id, now, audit).await
    }

    async fn list_file_assignments(&self) -> Result<Vec<FileAssignmentRecord>> {
        let _t = self.call("list_file_assignments");
        self.inner.list_file_assignments().await
    }

    async fn get_file_assignment(&self, id: i64) -> Result<Option<FileAssignmentRecord>> {
        let _t = self.call("get_file_assignment");
        self.inner.get_file_assignment(id).await
    }

    async fn agent_files(&self, agent_id: AgentId) -> Result<Vec<FileAssignmentRecord>> {
        let _t = self.call("agent_files");
        self.inner.agent_files(agent_id).await
    }
}

#[async_trait]
impl CertStore for CountingStore {
    async fn create_cert(&self, new: NewCert, audit: AuditFor<'_, CertRecord>) -> Result<ItemChange<CertRecord>> {
        let _t = self.call("create_cert");
        self.inner.create_cert(new, audit).await
    }

    async fn replace_cert(
        &self,
        id: i64,
        material: SealedMaterial,
        now: Millis,
        audit: AuditEntry,
    ) -> Result<ItemChange<CertRecord>> {
        let _t = self.call("replace_cert");
        self.inner.replace_cert(id, material, now, audit).await
    }

    async fn revoke_cert(&self, id: i64, now: Millis, audit: AuditEntry) -> Result<ItemChange<CertRecord>> {
        let _t = self.call("revoke_cert");
        self.inner.revoke_cert(id, now, audit).await
    }

    async fn list_certs(&self, revoked_since: Millis) -> Result<Vec<CertRecord>> {
        let _t = self.call("list_certs");
        self.inner.list_certs(revoked_since).await
    }

    async fn get_cert(&self, id: i64) -> Result<Option<CertRecord>> {
        let _t = self.call("get_cert");
        self.inner.get_cert(id).await
    }

    async fn agent_certs(&self, agent_id: AgentId) -> Result<Vec<CertRecord>> {
        let _t = self.call("agent_certs");
        self.inner.agent_certs(agent_id).await
    }

    async fn record_issued(&self, issued: IssuedRecord, audit: AuditEntry) -> Result<()> {
        let _t = self.call("record_issued");
        self.inner.record_issued(issued, audit).await
    }

    async fn list_cas(&self) -> Result<Vec<CaRecord>> {
        let _t = self.call("list_cas");
        self.inner.list_cas().await
    }

    async fn ensure_ca(&self, candidate: NewCa) -> Result<CaRecord> {
        let _t = self.call("ensure_ca");
        self.inner.ensure_ca(candidate).await
    }

    async fn activate_ca(&self, ca: NewCa, audit: AuditEntry) -> Result<(CaRecord, Vec<Head>)> {
        let _t = self.call("activate_ca");
        self.inner.activate_ca(ca, audit).await
    }

    async fn retire_cas(&self, now: Millis, audit: AuditEntry) -> Result<(u64, Vec<Head>)> {
        let _t = self.call("retire_cas");
        self.inner.retire_cas(now, audit).await
    }

    async fn expiring_certs(&self, before: Millis) -> Result<Vec<ExpiringCert>> {
        let _t = self.call("expiring_certs");
        self.inner.expiring_certs(before).await
    }

    async fn announce_expiring(&self, serial: &str, now: Millis, audit: AuditEntry) -> Result<()> {
        let _t = self.call("announce_expiring");
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
        let _t = self.call("report_item");
        self.inner.report_item(agent_id, kind, item_id, report, now).await
    }

    async fn item_status(&self, kind: ItemKind, item_id: i64) -> Result<FleetStatus> {
        let _t = self.call("item_status");
        self.inner.item_status(kind, item_id).await
    }
}
