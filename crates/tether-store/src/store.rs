//! The store's interface, one trait per area; [`Store`] is all of them.
//!
//! # Contract every backend keeps
//!
//! - **One method, one transaction.** A method commits all of its writes,
//!   its audit row included, or none of them; when it returns `Ok` they are
//!   durable. A failed audit append rolls the mutation back.
//! - **Decisions are the rules', not the backend's.** Where a method
//!   decides something (refresh reuse, device polls, command results,
//!   expiry, label precedence), it reads the facts and asks a function in
//!   [`crate::rules`]; the backend only reads and writes.
//! - **Concurrent calls behave as if run one after another,** also when
//!   they come from several server processes sharing one database. SQLite
//!   gets this from its single writer (`BEGIN IMMEDIATE`); on PostgreSQL
//!   each read-decide-write method locks what it decides on before reading
//!   it: the audit chain head (so two replicas never fork the chain), the
//!   refresh-token family, the device grant, the command, the agent whose
//!   stream is appended to, the set of pending device grants (the cap), an
//!   agent's set of metric series (the series cap), and agents whose
//!   presence changes (in id order, re-checked once locked, so a transition
//!   is reported once).
//!   An idempotency key is unique in the schema, and a use of an enrollment
//!   token is a conditional update, so neither can be taken twice.
//! - **Appends return heads, they never wake anyone.** A method that
//!   appends signals returns the new [`crate::Head`]s; the caller publishes them
//!   after the commit.
//! - **Failures are typed.** A database that cannot be reached is
//!   [`StoreError::Unavailable`] (nothing was written; retry later); a
//!   missing row is [`StoreError::NotFound`] naming what was missing.

use async_trait::async_trait;
use tether_proto::command::{Batch, Command, ResultReport};
use tether_proto::config::{ConfigStatus, EffectiveConfig, Scope};
use tether_proto::files::{FleetStatus, ItemReport};
use tether_proto::telemetry::{InventoryItem, InventoryKey, Series};
use tether_proto::{AgentId, BatchId, CommandId, Labels, Signal};

use crate::audit::{AuditAnchor, AuditEntry, AuditRecord};
use crate::{
    AgentFilter, AgentKeyRecord, AgentRecord, AgentUpdate, ApiTokenRecord, AuditFilter, AuditFor, BackendKind,
    CaRecord, CancelOutcome, CertRecord, CommandFilter, ConfigChange, ConfigScopeRecord, ConfigVersionRecord,
    CreatedBatch, DeviceGrantInfo, DevicePoll, DeviceRedeemed, EnrollTokenRecord, ExpiringCert, FileAssignmentRecord,
    FirstAdmin, FleetCounts, Head, HeartbeatRow, Horizons, InventoryRecord, IssuedRecord, ItemChange, ItemKind,
    MetricQuery, MetricsOutcome, Millis, NewAgent, NewAgentKey, NewBatch, NewCa, NewCert, NewConfigVersion,
    NewDeviceGrant, NewEnrollToken, NewFileAssignment, NewGrantOutcome, NewMetrics, PresenceChange, PruneCounts,
    RefreshOutcome, Result, ResultAudit, ResultOutcome, ResultToRecord, Role, SealedMaterial, StreamChange,
    SweepOutcome, User, UserRecord,
};

/// Every area of the store. Implemented for anything that implements them all.
pub trait Store:
    ServerStore
    + UserStore
    + TokenStore
    + AgentStore
    + DeviceGrantStore
    + SignalStore
    + CommandStore
    + ConfigStore
    + FileStore
    + CertStore
    + ItemStore
    + TelemetryStore
    + AuditStore
    + std::fmt::Debug
    + 'static
{
}

impl<T> Store for T where
    T: ServerStore
        + UserStore
        + TokenStore
        + AgentStore
        + DeviceGrantStore
        + SignalStore
        + CommandStore
        + ConfigStore
        + FileStore
        + CertStore
        + ItemStore
        + TelemetryStore
        + AuditStore
        + std::fmt::Debug
        + 'static
{
}

/// A singleton job's claim (see [`ServerStore::try_job_lock`]); dropping it
/// lets another server take the job over.
#[async_trait]
pub trait JobLease: Send + Sync + std::fmt::Debug {
    /// Whether the claim still holds (on PostgreSQL the lock dies with the
    /// connection that took it).
    async fn held(&mut self) -> bool;
}

/// What the server keeps for itself: readiness, its keys, singleton jobs
/// and the replay cache of signed requests.
#[async_trait]
pub trait ServerStore: Send + Sync {
    fn kind(&self) -> BackendKind;
    /// The database answers and its schema is the one this build expects.
    async fn check_ready(&self) -> Result<()>;
    /// The server secret called `name`: the stored one, or `candidate`
    /// stored now if there is none. Concurrent first starts all get the
    /// value that won.
    async fn server_key(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>>;
    /// Replaces the secret `name` if it still holds `old` (re-wrapping it
    /// under a new master key); whether it did.
    async fn replace_server_key(&self, name: &str, old: &[u8], new: &[u8]) -> Result<bool>;
    /// Claims the singleton job `name` for this server, unless another
    /// server holds it; `None` then. The claim lasts while the lease lives.
    async fn try_job_lock(&self, name: &str) -> Result<Option<Box<dyn JobLease>>>;
    /// Remembers the nonce of a signed agent request until `expires_at_s`;
    /// false when it is already remembered (a replay), on any server.
    async fn remember_nonce(&self, agent_id: AgentId, nonce: &str, expires_at_s: i64) -> Result<bool>;
    /// Forgets nonces that expired before `now_s`; returns how many.
    async fn prune_nonces(&self, now_s: i64) -> Result<u64>;
}

/// Operators: users, their API tokens and dashboard sessions.
#[async_trait]
pub trait UserStore: Send + Sync {
    /// Creates the first admin and its API token, only if there are no
    /// users at all (several servers may start at once: one wins, the others
    /// get `None`).
    async fn create_first_admin(&self, admin: FirstAdmin, audit: AuditEntry) -> Result<Option<User>>;
    /// `audit.target` becomes the new id; `Conflict` when the name is taken.
    async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
        role: Role,
        now: Millis,
        audit: AuditEntry,
    ) -> Result<User>;
    /// Sets the password and ends the user's sessions: dashboard sessions
    /// and the API tokens created with the password (`from_password`).
    async fn set_password(&self, username: &str, password_hash: &str, now: Millis, audit: AuditEntry) -> Result<()>;
    async fn list_users(&self) -> Result<Vec<UserRecord>>;
    /// Changes role and/or password hash; `NotFound` for unknown or disabled
    /// users. A new password ends the user's sessions as `set_password` does.
    async fn update_user(
        &self,
        id: &str,
        role: Option<Role>,
        password_hash: Option<&str>,
        now: Millis,
        audit: AuditEntry,
    ) -> Result<UserRecord>;
    /// Disables the user and revokes their API tokens.
    async fn disable_user(&self, id: &str, now: Millis, audit: AuditEntry) -> Result<()>;
    async fn find_user(&self, username: &str) -> Result<Option<User>>;
    /// `from_password`: created with the password (Basic or a dashboard
    /// session), so it is a session that a password change ends.
    /// `audit.target` becomes the new token id, which is returned.
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
    ) -> Result<String>;
    async fn list_api_tokens(&self, user_id: &str) -> Result<Vec<ApiTokenRecord>>;
    /// Revokes one of the user's tokens; `NotFound` if it is not theirs.
    async fn revoke_api_token(&self, user_id: &str, id: &str, now: Millis, audit: AuditEntry) -> Result<()>;
    async fn create_session(
        &self,
        token_hash: [u8; 32],
        user_id: &str,
        csrf: &str,
        expires_at: Millis,
        now: Millis,
        audit: AuditEntry,
    ) -> Result<()>;
    /// The live session's user and CSRF token.
    async fn find_session(&self, token_hash: [u8; 32], now: Millis) -> Result<Option<(User, String)>>;
    async fn delete_session(&self, token_hash: [u8; 32]) -> Result<()>;
    /// The live (unexpired, unrevoked) token with this hash, its owner and
    /// its own expiry (`None`: never expires).
    async fn find_api_token(&self, token_hash: [u8; 32], now: Millis) -> Result<Option<(User, Option<Millis>)>>;
}

/// Agent credentials: enrollment tokens, refresh-token families and
/// long-lived agent keys.
#[async_trait]
pub trait TokenStore: Send + Sync {
    async fn create_enroll_token(&self, token: NewEnrollToken, now: Millis, audit: AuditEntry) -> Result<()>;
    async fn list_enroll_tokens(&self) -> Result<Vec<EnrollTokenRecord>>;
    async fn revoke_enroll_token(&self, id: &str, now: Millis, audit: AuditEntry) -> Result<()>;
    /// The family a refresh token belongs to, for the per-family rate limit.
    async fn refresh_family(&self, presented_hash: [u8; 32]) -> Result<Option<String>>;
    /// Rotates a refresh token by [`crate::rules::refresh::decide`];
    /// `expected_agent` (the certificate-agent `device_public_id`,
    /// protocol.md §16.4) must own it when given. On reuse it revokes the
    /// family, sets the agent's `tokens_valid_after` to `now` (its access
    /// tokens die) and appends `reuse_audit` (target and details filled in
    /// by the store) in the same transaction.
    async fn rotate_refresh_token(
        &self,
        expected_agent: Option<AgentId>,
        presented_hash: [u8; 32],
        new_hash: [u8; 32],
        grace_ms: Millis,
        now: Millis,
        reuse_audit: AuditEntry,
    ) -> Result<RefreshOutcome>;
    /// The agent a *current* refresh token belongs to: one that
    /// [`crate::rules::refresh::decide`] would rotate as a first use (never
    /// used, not revoked, of an agent that is not revoked), and that
    /// `expected_agent` owns when given. `None` for every other token, which
    /// the caller leaves to [`Self::rotate_refresh_token`] and its reuse
    /// rule. A read only: the token stays current (seed 003's refresh keeps
    /// its token, docs/compat.md).
    async fn current_refresh_agent(
        &self,
        expected_agent: Option<AgentId>,
        presented_hash: [u8; 32],
    ) -> Result<Option<AgentId>>;
    /// Gives a live agent a long-lived key (and, with `agent_name`, that
    /// name) with its audit row, in one transaction; the agent's row is
    /// locked first, so a concurrent revocation or deletion is either
    /// before (`NotFound(Agent)`) or after (and then ends the key too).
    /// `NotFound(Agent)` for an agent that is absent or revoked.
    async fn create_agent_key(&self, key: NewAgentKey, now: Millis, audit: AuditEntry) -> Result<AgentKeyRecord>;
    /// The agent holding the key with this hash, revoked or not (the caller
    /// tells a revoked agent apart); `None` for no such key. A key lives as
    /// long as its agent: deleting the agent deletes it.
    async fn find_agent_key(&self, key_hash: [u8; 32]) -> Result<Option<AgentId>>;
    /// The agent's keys, oldest first.
    async fn list_agent_keys(&self, agent_id: AgentId) -> Result<Vec<AgentKeyRecord>>;
}

/// Agents: enrollment, identity, liveness and the stream state replicas share.
#[async_trait]
pub trait AgentStore: Send + Sync {
    /// Consumes one use of a live enrollment token and creates the agent
    /// (labels by [`crate::rules::enrollment_labels`]) with its first refresh
    /// token, atomically, with its audit row. `NotFound(EnrollToken)` when
    /// the token is not usable.
    async fn enroll_agent(
        &self,
        enroll_token_hash: [u8; 32],
        agent: NewAgent,
        refresh_hash: [u8; 32],
        now: Millis,
        audit: AuditFor<'_, AgentRecord>,
    ) -> Result<AgentRecord>;
    async fn get_agent(&self, id: AgentId) -> Result<Option<AgentRecord>>;
    async fn list_agents(&self, filter: &AgentFilter) -> Result<Vec<AgentRecord>>;
    /// Revokes the agent and its refresh tokens.
    async fn revoke_agent(&self, id: AgentId, reason: &str, now: Millis, audit: AuditEntry) -> Result<AgentRecord>;
    /// Writes every row in ONE transaction: per row the version, the
    /// configuration the agent runs or could not apply (an applied one
    /// clears an earlier failure), the body, and `last_seen = max(old, at)`.
    /// Of several rows for one agent the latest (`at`) is written. Rows for
    /// agents that no longer exist are skipped silently (deleted meanwhile).
    async fn record_heartbeats(&self, beats: &[HeartbeatRow]) -> Result<()>;
    /// Marks each non-revoked agent online (`last_seen >= offline_before`
    /// and after its `disconnected_at`) or offline (otherwise). Where the stored state changes from a decided
    /// value, appends one audit row (`AuditEntry::system("server",
    /// "agent.online"|"agent.offline", agent_id, {name, hostname,
    /// last_seen}, now)`) in the same transaction and returns the change;
    /// an agent whose state was not decided yet (`NULL`) is set without an
    /// audit row and is not returned. Concurrent callers (two replicas)
    /// never report the same transition twice: the rows are locked (in id
    /// order) and re-checked before they change. Cheap when nothing changes:
    /// only agents whose state differs are read.
    async fn update_presence(&self, offline_before: Millis, now: Millis) -> Result<Vec<PresenceChange>>;
    /// Records that the agent's last WebSocket closed at `at` (protocol.md
    /// §9): seen at or before `at`, it is offline from now on, whatever its
    /// `last_seen` says. If it was stored online it is flipped offline with
    /// the same audit row as [`Self::update_presence`] writes, in one
    /// transaction, and the change is returned; `None` otherwise (already
    /// offline, seen after `at`, revoked or gone).
    async fn disconnect_agent(&self, id: AgentId, at: Millis) -> Result<Option<PresenceChange>>;
    /// Removes the agent and everything that is only its (stream signals,
    /// commands with their results and any batch left empty, item reports,
    /// issued certificates, refresh tokens, agent keys, device grants, nonces, its agent
    /// configuration scope, metrics, rollups, series, metric batch ids,
    /// inventory) in one transaction with `audit` appended; audit rows that
    /// mention it stay. Returns the agent as it was. `NotFound(Agent)` when absent.
    async fn delete_agent(&self, id: AgentId, audit: AuditEntry) -> Result<AgentRecord>;
    /// Changes an agent's name and/or labels; new labels retarget its
    /// configuration like a config write does (a `config.updated` signal when
    /// its effective hash changes, whose head is returned). `NotFound(Agent)`
    /// for an unknown or revoked agent.
    async fn update_agent(
        &self,
        id: AgentId,
        update: AgentUpdate,
        now: Millis,
        audit: AuditEntry,
    ) -> Result<(AgentRecord, Vec<Head>)>;
    /// Batched `last_seen` updates; a value never moves backwards.
    async fn touch_agents(&self, seen: &[(AgentId, Millis)]) -> Result<()>;
    /// The stream state of every agent whose head, floor, revocation or
    /// token cut-off changed at or after `since` (by the `now` of the call
    /// that changed it), for replicas to catch up with what they missed.
    async fn stream_changes(&self, since: Millis) -> Result<Vec<StreamChange>>;
}

/// RFC 8628 device grants.
#[async_trait]
pub trait DeviceGrantStore: Send + Sync {
    /// Creates a pending grant unless [`crate::rules::device::admission`]
    /// refuses it; `Conflict` when the user code is taken.
    async fn create_device_grant(&self, grant: NewDeviceGrant) -> Result<NewGrantOutcome>;
    /// The pending, unexpired grant with this (canonical) user code.
    async fn pending_device_grant(&self, user_code: &str, now: Millis) -> Result<Option<DeviceGrantInfo>>;
    /// Approves (with labels) or denies a pending, unexpired grant and
    /// returns what it was, with its audit row; `NotFound(DeviceGrant)` otherwise.
    async fn decide_device_grant(
        &self,
        user_code: &str,
        approve: bool,
        labels: &Labels,
        decided_by: &str,
        now: Millis,
        audit: AuditFor<'_, DeviceGrantInfo>,
    ) -> Result<DeviceGrantInfo>;
    /// One token-endpoint poll, decided by [`crate::rules::device::decide_poll`]:
    /// records the poll and, once approved, creates the agent with its first
    /// refresh token; a lost-response repeat re-issues for the same agent.
    /// Either redemption appends `audit` in its transaction.
    async fn poll_device_grant(
        &self,
        device_code_hash: [u8; 32],
        new_agent: AgentId,
        refresh_hash: [u8; 32],
        grace_ms: Millis,
        now: Millis,
        audit: AuditFor<'_, DeviceRedeemed>,
    ) -> Result<DevicePoll>;
    /// Deletes grants that expired before `before`; returns how many.
    async fn prune_device_grants(&self, before: Millis) -> Result<u64>;
}

/// The agents' streams of signals.
#[async_trait]
pub trait SignalStore: Send + Sync {
    /// Signals with `seq > after`, oldest first.
    async fn read_signals(&self, agent_id: AgentId, after: u64, limit: u32) -> Result<Vec<(u64, Signal)>>;
    /// Drops signals older than `before` or beyond the newest `keep` per
    /// agent, moving each affected stream's floor; returns the new floors.
    async fn prune_signals(&self, before: Millis, keep: u64, now: Millis) -> Result<Vec<(AgentId, u64)>>;
}

/// Commands, their batches and the agents' reports.
#[async_trait]
pub trait CommandStore: Send + Sync {
    /// Appends `audit` when it creates; an idempotent replay creates nothing
    /// and appends nothing.
    async fn create_batch(&self, batch: NewBatch, audit: AuditFor<'_, CreatedBatch>) -> Result<CreatedBatch>;
    async fn get_command(&self, id: CommandId) -> Result<Option<Command>>;
    async fn list_commands(&self, filter: &CommandFilter) -> Result<Vec<Command>>;
    async fn get_batch(&self, id: BatchId) -> Result<Option<Batch>>;
    /// Marks these agents' commands delivered (those still queued and
    /// the named agent's), in one transaction however many agents they
    /// span; returns how many changed.
    async fn mark_delivered(&self, delivered: &[(AgentId, CommandId)], now: Millis) -> Result<u64>;
    /// The next released, undelivered, unexpired command for the agent
    /// (priority, then age), marked delivered.
    async fn take_next_command(&self, agent_id: AgentId, now: Millis) -> Result<Option<Command>>;
    /// `running` report; `NotFound` for another agent's command, `Conflict` when terminal.
    async fn report_running(&self, agent_id: AgentId, id: CommandId, now: Millis) -> Result<Command>;
    /// Appends `audit(command, late)` when it records; a repeat of the
    /// recorded result changes nothing and appends nothing; `NotFound` for
    /// another agent's command, `Conflict` for a different result of a
    /// terminal one. [`Self::report_results`] with one report.
    async fn report_result(
        &self,
        agent_id: AgentId,
        id: CommandId,
        report: &ResultReport,
        now: Millis,
        audit: ResultAudit<'_>,
    ) -> Result<ResultOutcome> {
        let one = [ResultToRecord { agent_id, id, report, now, audit }];
        self.report_results(&one).await?.pop().expect("one outcome per report")
    }
    /// Records several agents' result reports in one transaction (group
    /// commit): each decided as [`Self::report_result`] would, one after
    /// another in the order given (a repeat later in `reports` is
    /// `Unchanged`), with its audit row appended in that order. A report's
    /// own refusal (`NotFound`, `Conflict`) is its entry of the answer and
    /// writes nothing for it, the others are recorded; the outer error
    /// means nothing was written. On PostgreSQL the commands are locked in
    /// agent then id order (like a batch cancel), the audit head last.
    async fn report_results(&self, reports: &[ResultToRecord<'_>]) -> Result<Vec<Result<ResultOutcome>>>;
    async fn cancel_command(&self, id: CommandId, now: Millis, audit: AuditEntry) -> Result<CancelOutcome>;
    async fn cancel_batch(&self, id: BatchId, now: Millis, audit: AuditFor<'_, CancelOutcome>)
    -> Result<CancelOutcome>;
    /// Expires undelivered commands, marks silent ones lost, releases commands
    /// whose `not_before` has come.
    async fn sweep(&self, now: Millis) -> Result<SweepOutcome>;
}

/// Versioned configuration documents and how they reach agents (protocol.md §6).
///
/// Every write of a scope (and every label change, [`AgentStore::update_agent`])
/// retargets the agents the scope applies to in its own transaction: each
/// agent's effective configuration is computed by [`crate::rules::config`]
/// from the current documents, and only agents whose hash changed get it as
/// their desired hash and a `config.updated` signal. Writes that retarget are
/// serialised with each other (on PostgreSQL by a lock), so no two compute
/// from different snapshots.
#[async_trait]
pub trait ConfigStore: Send + Sync {
    /// Writes the scope's next version (`If-Match` as
    /// [`crate::rules::config::next_version`] decides; an agent scope's agent
    /// must exist) and retargets, with the audit row.
    async fn put_config(&self, new: NewConfigVersion, audit: AuditEntry) -> Result<ConfigChange>;
    /// Writes the scope's next version equal to its `version`, and retargets.
    async fn rollback_config(
        &self,
        scope: &Scope,
        version: u64,
        author: &str,
        now: Millis,
        audit: AuditEntry,
    ) -> Result<ConfigChange>;
    /// The scope's current document, or its `version`.
    async fn get_config(&self, scope: &Scope, version: Option<u64>) -> Result<Option<ConfigVersionRecord>>;
    /// The scope's versions, newest first, older than `before`.
    async fn config_history(&self, scope: &Scope, before: Option<u64>, limit: u32) -> Result<Vec<ConfigVersionRecord>>;
    /// Every scope with its current version.
    async fn list_configs(&self) -> Result<Vec<ConfigScopeRecord>>;
    /// The agent's effective configuration, computed now; `None` for an unknown agent.
    async fn effective_config(&self, agent_id: AgentId) -> Result<Option<EffectiveConfig>>;
    /// Of the active agents the scope targets: how many run their desired
    /// configuration, are behind, or failed it (grouped by error).
    /// `NotFound(Config)` for a scope without versions.
    async fn config_status(&self, scope: &Scope) -> Result<ConfigStatus>;
}

/// Where the bytes of a blob come from while it is stored.
pub type BlobSource<'a> = &'a mut (dyn tokio::io::AsyncRead + Send + Unpin);

/// Managed files (protocol.md §7): content-addressed blobs, stored in
/// chunks so neither side holds a whole file, and their assignments to
/// targets. Targets are resolved when an assignment changes (to tell the
/// agents) and whenever an agent asks for its files, so an agent that gains
/// a label gains its files. Assignment changes append their signals in the
/// same transaction, in bulk.
#[async_trait]
pub trait FileStore: Send + Sync {
    /// Stores `size` bytes read from `source` as blob `sha256` (the caller
    /// has hashed them), unless it is stored already; true when it was new.
    async fn put_blob(&self, sha256: &str, size: u64, source: BlobSource<'_>, now: Millis) -> Result<bool>;
    /// A blob's size, if it is stored.
    async fn blob_size(&self, sha256: &str) -> Result<Option<u64>>;
    /// Chunk `index` of a blob (chunks are [`crate::BLOB_CHUNK`] bytes, the
    /// last one shorter), `None` past the end.
    async fn blob_chunk(&self, sha256: &str, index: u64) -> Result<Option<Vec<u8>>>;
    /// Assigns (or, for an active assignment of the same path to the same
    /// target, updates) a file, and tells the targeted agents with
    /// `file.updated`. `NotFound(Blob)` for content never uploaded; an
    /// `agents` target naming an unknown agent is `Invalid` (as for commands).
    async fn assign_file(
        &self,
        new: NewFileAssignment,
        audit: AuditFor<'_, FileAssignmentRecord>,
    ) -> Result<ItemChange<FileAssignmentRecord>>;
    /// Ends an assignment and tells the targeted agents with `file.removed`.
    async fn unassign_file(&self, id: i64, now: Millis, audit: AuditEntry) -> Result<ItemChange<FileAssignmentRecord>>;
    /// Active assignments, oldest first.
    async fn list_file_assignments(&self) -> Result<Vec<FileAssignmentRecord>>;
    /// One assignment, active or not.
    async fn get_file_assignment(&self, id: i64) -> Result<Option<FileAssignmentRecord>>;
    /// The active assignments that target this agent now.
    async fn agent_files(&self, agent_id: AgentId) -> Result<Vec<FileAssignmentRecord>>;
}

/// Certificates (protocol.md §7): uploaded ones with their key sealed by
/// the server, issued ones signed by the server's CA, and the CAs. Changes
/// that concern agents append `cert.renewed`/`cert.revoked` to the agents
/// the certificate targets, in the same transaction.
#[async_trait]
pub trait CertStore: Send + Sync {
    /// Creates a certificate and tells its agents (`cert.renewed`); a name
    /// in use by an active certificate is `Conflict`.
    async fn create_cert(&self, new: NewCert, audit: AuditFor<'_, CertRecord>) -> Result<ItemChange<CertRecord>>;
    /// New material for an uploaded certificate: its version goes up and its
    /// agents are told (`cert.renewed` with the new serial).
    async fn replace_cert(
        &self,
        id: i64,
        material: SealedMaterial,
        now: Millis,
        audit: AuditEntry,
    ) -> Result<ItemChange<CertRecord>>;
    /// Revokes a certificate; its agents remove it (`cert.revoked`).
    async fn revoke_cert(&self, id: i64, now: Millis, audit: AuditEntry) -> Result<ItemChange<CertRecord>>;
    /// Active certificates by name, then those revoked in the last `revoked_since`.
    async fn list_certs(&self, revoked_since: Millis) -> Result<Vec<CertRecord>>;
    async fn get_cert(&self, id: i64) -> Result<Option<CertRecord>>;
    /// The active certificates that target this agent now.
    async fn agent_certs(&self, agent_id: AgentId) -> Result<Vec<CertRecord>>;
    /// Records a certificate the CA signed for an agent.
    async fn record_issued(&self, issued: IssuedRecord, audit: AuditEntry) -> Result<()>;
    /// The CAs agents trust (not retired), the active one first.
    async fn list_cas(&self) -> Result<Vec<CaRecord>>;
    /// The active CA, creating `candidate` as it when there is none (the
    /// first start; several servers starting at once agree on one).
    async fn ensure_ca(&self, candidate: NewCa) -> Result<CaRecord>;
    /// Makes `ca` the active CA (a rotation or an import); the previous one
    /// stays trusted until retired. Every issued certificate's version goes
    /// up and its agents are told to get one from the new CA.
    async fn activate_ca(&self, ca: NewCa, audit: AuditEntry) -> Result<(CaRecord, Vec<Head>)>;
    /// Stops trusting every CA but the active one; agents holding issued
    /// certificates are told, to fetch the smaller bundle. The count retired.
    async fn retire_cas(&self, now: Millis, audit: AuditEntry) -> Result<(u64, Vec<Head>)>;
    /// Certificates (uploaded material, or what an agent reported holding)
    /// whose `not_after` is before `before` and that were not announced yet.
    async fn expiring_certs(&self, before: Millis) -> Result<Vec<ExpiringCert>>;
    /// Announces one: remembers its serial, with the audit row.
    async fn announce_expiring(&self, serial: &str, now: Millis, audit: AuditEntry) -> Result<()>;
}

/// What agents report about the files and certificates they hold.
#[async_trait]
pub trait ItemStore: Send + Sync {
    /// Keeps an agent's last report on an item; `NotFound` unless the item
    /// is active and targets the agent.
    async fn report_item(
        &self,
        agent_id: AgentId,
        kind: ItemKind,
        item_id: i64,
        report: ItemReport,
        now: Millis,
    ) -> Result<()>;
    /// Of the agents an active item targets now: how many hold its current
    /// version, are behind, or failed it.
    async fn item_status(&self, kind: ItemKind, item_id: i64) -> Result<FleetStatus>;
}

/// The hash-chained audit log (protocol.md §10).
#[async_trait]
pub trait AuditStore: Send + Sync {
    /// Appends an event that comes with no other change (a denial, a failed login).
    async fn append_audit(&self, entry: AuditEntry) -> Result<()>;
    /// Oldest first, rows with `id > after_id`.
    async fn list_audit(&self, after_id: i64, limit: u32) -> Result<Vec<AuditRecord>>;
    /// Newest first, filtered; `before` is the keyset cursor (an audit id).
    async fn query_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>>;
    /// The last row retention deleted (see [`TelemetryStore::prune_history`]):
    /// where [`crate::verify_audit`] starts instead of the genesis hash.
    /// `None` while nothing was pruned.
    async fn audit_anchor(&self) -> Result<Option<AuditAnchor>>;
}

/// What agents report besides commands (protocol.md §8): metric points with
/// their hourly and daily rollups, and inventory; and the retention of
/// everything that grows with time.
///
/// A metric series is one agent's name and label set (labels stored as
/// canonical JSON text); points are unique per series and instant. Rollups
/// are kept incrementally, from exactly the points each batch inserted, so
/// they always equal an aggregate of the raw points ever stored (until
/// retention removes either).
#[async_trait]
pub trait TelemetryStore: Send + Sync {
    /// One transaction: records `(agent_id, batch_id)` (already there →
    /// `Duplicate`, nothing written), creates missing series (more than
    /// `max_series` for the agent → `Invalid { field: "points" }`, nothing
    /// written), inserts the points (one for an existing `(series, ts_ms)`
    /// is ignored) and adds exactly the inserted ones to the hourly and
    /// daily rollups ([`crate::rules::telemetry::bucket_start`]). A
    /// non-finite value is `Invalid`. `NotFound(Agent)` for an unknown agent.
    async fn store_metrics(&self, batch: NewMetrics<'_>) -> Result<MetricsOutcome>;
    /// The agent's series of that name that have points in `[from, to)`,
    /// by label set, each with its points in time order (raw: count 1,
    /// min = max = sum = avg = value; rollups: by bucket start); at most
    /// `max_points` in all, and whether more were cut off.
    async fn query_metrics(&self, q: &MetricQuery) -> Result<(Vec<Series>, bool)>;
    /// Applies `upsert` (attrs replaced, `updated_at = now`; of one key
    /// given twice the last wins) then `remove` (missing ones ignored) in
    /// one transaction. `NotFound(Agent)` for an unknown agent.
    async fn change_inventory(
        &self,
        agent_id: AgentId,
        upsert: &[InventoryItem],
        remove: &[InventoryKey],
        now: Millis,
    ) -> Result<()>;
    /// Replaces the agent's whole inventory in one transaction.
    /// `NotFound(Agent)` for an unknown agent.
    async fn replace_inventory(&self, agent_id: AgentId, items: &[InventoryItem], now: Millis) -> Result<()>;
    /// The agent's inventory by `(kind, key)`, after the keyset cursor
    /// `after`; only `kind` when given.
    async fn list_inventory(
        &self,
        agent_id: AgentId,
        kind: Option<&str>,
        after: Option<(String, String)>,
        limit: u32,
    ) -> Result<Vec<InventoryRecord>>;
    /// Deletes at most `max_rows` rows per kind that are past their horizon:
    /// raw points and rollup buckets by their ts, metric batch ids by when
    /// they were received, commands in a terminal state that finished
    /// before the horizon (with any batch they leave empty), and audit rows
    /// older than the horizon, always a whole prefix of the chain (the last
    /// deleted row becomes the [`AuditStore::audit_anchor`]). Each kind is
    /// one short transaction, so nothing waits long; the caller calls again
    /// while [`PruneCounts::more`].
    async fn prune_history(&self, h: &Horizons, max_rows: u32) -> Result<PruneCounts>;
    /// How many agents are online (seen at or after `seen_since`), offline
    /// and revoked, and how many commands are in each state: one read for
    /// the operations gauges.
    async fn fleet_counts(&self, seen_since: Millis) -> Result<FleetCounts>;
}
