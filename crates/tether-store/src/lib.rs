//! Persistence for tether: the [`Store`] trait every handler and job talks
//! to, and its backends (SQLite now; PostgreSQL implements the same trait).
//!
//! The store owns transactions: each trait method is one atomic unit, and a
//! method that appends signals returns the new stream heads so the caller can
//! wake waiting agents *after* the commit.
//!
//! Audited mutations take the [`AuditEntry`] that describes them and append
//! it to the audit chain in the same transaction (protocol.md §10: a 2xx
//! means both are committed; a failed append rolls the mutation back). When
//! the store allocates the id of the row it creates (a user, an API token),
//! it writes that id into the entry's `target`. Every backend must serialise
//! appends to the chain head (SQLite: the single `BEGIN IMMEDIATE` writer;
//! PostgreSQL: lock the head row or take an advisory lock in the same
//! transaction) so that concurrent appends never fork the chain.

mod audit;
pub mod refresh;
pub mod sqlite;

use async_trait::async_trait;
use serde_json::Value;
use tether_proto::command::{Batch, Command, CommandStatus, CreateCommand, ResultReport, TargetSpec};
use tether_proto::{AgentId, BatchId, CommandId, Labels, Signal};

pub use audit::{AuditEntry, AuditRecord, GENESIS_HASH, chain_hash};

/// Builds a mutation's audit row from what the mutation did, when the row
/// depends on it (a new id, a count, merged labels); the store calls it
/// inside the mutation's transaction and appends the row there.
pub type AuditFor<'a, T> = &'a (dyn Fn(&T) -> AuditEntry + Send + Sync);

/// A recorded result's audit row, from the stored command and whether the
/// result came late (after the command was marked lost).
pub type ResultAudit<'a> = &'a (dyn Fn(&Command, bool) -> AuditEntry + Send + Sync);
pub use sqlite::SqliteStore;

/// Milliseconds since the Unix epoch; every stored timestamp uses it.
pub type Millis = i64;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("invalid {field}: {message}")]
    Invalid { field: &'static str, message: String },
    #[error("database error: {0}")]
    Backend(#[from] sqlx::Error),
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The position of one agent's stream after a write; published to wake waiters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub agent_id: AgentId,
    pub epoch: u64,
    pub seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Operator,
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(Role::Admin),
            "operator" => Some(Role::Operator),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub username: String,
    pub role: Role,
    /// PHC string (argon2id); never leaves the server.
    pub password_hash: String,
}

#[derive(Debug, Clone)]
pub struct NewDeviceGrant {
    pub device_code_hash: [u8; 32],
    pub user_code: String,
    pub public_key: Vec<u8>,
    pub hostname: String,
    pub expires_at: Millis,
    pub interval_s: u32,
    /// The address the request came from, shown to the approving operator.
    pub requested_ip: Option<String>,
    /// Refuse the grant when this many unexpired grants are already pending.
    pub max_pending: u64,
    /// …or when this many of them came from `requested_ip`.
    pub max_pending_per_ip: u64,
    pub now: Millis,
}

/// Whether a device grant was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewGrantOutcome {
    Created,
    /// `max_pending` unexpired grants are waiting for an operator already.
    TooManyPending,
    /// `max_pending_per_ip` unexpired grants from this address are waiting already.
    TooManyFromAddress,
}

/// A device grant as the approving operator sees it (RFC 8628 §5.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceGrantInfo {
    /// Canonical form (8 letters, no dash).
    pub user_code: String,
    pub hostname: String,
    pub requested_ip: Option<String>,
    pub requested_at: Millis,
    /// Raw 32-byte Ed25519 key of the requesting agent.
    pub public_key: Vec<u8>,
    pub labels: Labels,
}

/// An approved grant turned into an agent by a token poll.
#[derive(Debug, Clone)]
pub struct DeviceRedeemed {
    pub agent: AgentRecord,
    /// The user who approved the grant (`decided_by`).
    pub approved_by: String,
    /// Canonical form (8 letters, no dash).
    pub user_code: String,
    /// A repeat of the redeeming poll within the grace whose first answer
    /// was lost: same agent, new refresh token, the earlier one revoked.
    pub lost_response_retry: bool,
}

/// The answer to a device-code poll (RFC 8628 §3.5).
#[derive(Debug, Clone)]
pub enum DevicePoll {
    Pending,
    /// Polled faster than the interval; the interval is now this many seconds.
    SlowDown {
        interval_s: u32,
    },
    Denied,
    Expired,
    /// Unknown or already redeemed device code.
    Invalid,
    Approved(Box<DeviceRedeemed>),
}

/// A user row for listings.
#[derive(Debug, Clone)]
pub struct UserRecord {
    pub id: String,
    pub username: String,
    pub role: Role,
    pub created_at: Millis,
    pub disabled_at: Option<Millis>,
}

/// An agent with the stream position and secrets-free identity the server needs.
#[derive(Debug, Clone)]
pub struct AgentRecord {
    pub id: AgentId,
    pub name: String,
    pub hostname: String,
    pub labels: Labels,
    pub facts: Value,
    pub public_key: Vec<u8>,
    pub version: Option<String>,
    pub applied_config_hash: Option<String>,
    pub epoch: u64,
    pub head_seq: u64,
    pub floor_seq: u64,
    pub created_at: Millis,
    pub last_seen: Option<Millis>,
    pub revoked_at: Option<Millis>,
    pub revoke_reason: Option<String>,
    /// Access tokens issued at or before this instant are refused (set when
    /// refresh-token reuse is detected).
    pub tokens_valid_after: Option<Millis>,
}

#[derive(Debug, Clone)]
pub struct NewAgent {
    pub id: AgentId,
    pub hostname: String,
    pub labels: Labels,
    pub facts: Value,
    pub public_key: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct ApiTokenRecord {
    pub id: String,
    pub name: String,
    pub created_at: Millis,
    pub expires_at: Option<Millis>,
    pub revoked_at: Option<Millis>,
}

#[derive(Debug, Clone)]
pub struct NewEnrollToken {
    pub id: String,
    pub token_hash: [u8; 32],
    pub labels: Labels,
    pub uses: u32,
    pub created_by: String,
    pub expires_at: Millis,
}

#[derive(Debug, Clone)]
pub struct EnrollTokenRecord {
    pub id: String,
    pub labels: Labels,
    pub uses: u32,
    pub used: u32,
    pub created_at: Millis,
    pub expires_at: Millis,
    pub revoked_at: Option<Millis>,
}

/// What presenting a refresh token led to (protocol.md §3 rotation rules).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// First use, or a retry within the lost-response grace: the new token is live.
    Rotated {
        agent_id: AgentId,
        lost_response_retry: bool,
    },
    /// Unknown or foreign token, or a revoked one of an already revoked family.
    Invalid,
    AgentRevoked,
    /// Any reuse that is not a lost-response retry: the whole family and the
    /// agent's access tokens are now revoked, and the event is audited.
    ReuseDetected {
        agent_id: AgentId,
        family_id: String,
    },
}

#[derive(Debug, Clone, Default)]
pub struct AgentFilter {
    pub labels: Labels,
    /// Substring of name or hostname.
    pub q: Option<String>,
    /// Keyset cursor: the last agent id of the previous page.
    pub after: Option<AgentId>,
    pub limit: u32,
}

#[derive(Debug, Clone, Default)]
pub struct CommandFilter {
    pub statuses: Vec<CommandStatus>,
    pub agent_id: Option<AgentId>,
    pub batch_id: Option<BatchId>,
    /// Keyset cursor: the last command id of the previous page (newest first).
    pub before: Option<CommandId>,
    pub limit: u32,
}

#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub actor: Option<String>,
    /// Rows whose actor or target is this agent.
    pub agent_id: Option<AgentId>,
    pub action: Option<String>,
    pub from: Option<Millis>,
    pub to: Option<Millis>,
    pub before: Option<i64>,
    pub limit: u32,
}

/// Most broken rows listed in one verification (all are counted).
pub const MAX_LISTED_BREAKS: usize = 1000;

/// Walks the whole audit chain and reports every row that breaks it, not
/// just the first: after a broken row the walk goes on from that row's
/// stored hash, so each altered or removed row is named once and tampering
/// further on is still seen.
pub async fn verify_audit(store: &dyn Store) -> Result<AuditVerification> {
    let mut prev = GENESIS_HASH.to_vec();
    let mut after = 0;
    let mut v = AuditVerification::default();
    loop {
        let rows = store.list_audit(after, 1000).await?;
        let Some(last) = rows.last() else { break };
        after = last.id;
        for row in &rows {
            v.checked += 1;
            if let Some(problem) = audit_row_problem(row, &prev) {
                v.broken_count += 1;
                if v.broken.len() < MAX_LISTED_BREAKS {
                    v.broken.push(AuditBreak { id: row.id, problem: problem.to_owned() });
                }
            }
            prev = row.hash.clone();
        }
    }
    Ok(v)
}

/// What is wrong with `row` given the hash of the row stored before it.
pub fn audit_row_problem(row: &AuditRecord, prev_hash: &[u8]) -> Option<&'static str> {
    if row.prev_hash != prev_hash {
        Some("its prev_hash does not match the previous row's hash (a row before it was removed or altered)")
    } else if row.hash != row.expected_hash(prev_hash) {
        Some("its content does not match its hash (the row was altered)")
    } else {
        None
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct AuditVerification {
    /// Rows read.
    pub checked: u64,
    /// Rows that break the chain, oldest first (at most [`MAX_LISTED_BREAKS`]).
    pub broken: Vec<AuditBreak>,
    /// How many rows break the chain in all.
    pub broken_count: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditBreak {
    pub id: i64,
    /// What is wrong with that row.
    pub problem: String,
}

/// One `POST /api/v1/commands`, checked and ready to write.
#[derive(Debug, Clone)]
pub struct NewBatch {
    pub id: BatchId,
    pub target: TargetSpec,
    pub request: CreateCommand,
    pub created_by: String,
    /// sha256 of the canonical request, to tell a retry from a different body.
    pub request_hash: [u8; 32],
    pub now: Millis,
}

#[derive(Debug, Clone)]
pub struct CreatedBatch {
    pub batch_id: BatchId,
    pub command_ids: Vec<CommandId>,
    /// False when an idempotent retry returned the existing batch.
    pub created: bool,
    pub heads: Vec<Head>,
}

/// What a result report did.
#[derive(Debug, Clone, PartialEq)]
pub enum ResultOutcome {
    Recorded {
        late: bool,
        command: Box<Command>,
    },
    /// Same result as already recorded: nothing changed.
    Unchanged,
}

#[derive(Debug, Clone, Default)]
pub struct SweepOutcome {
    pub expired: u64,
    pub lost: u64,
    pub released: u64,
    pub heads: Vec<Head>,
}

#[derive(Debug, Clone)]
pub struct CancelOutcome {
    pub cancelled: Vec<CommandId>,
    pub heads: Vec<Head>,
}

/// Counters the server exports and the tests use to prove that hot paths
/// (idle polls) never reach the database.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub queries: u64,
}

#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    fn stats(&self) -> StoreStats;
    async fn ping(&self) -> Result<()>;

    // --- operators
    async fn user_count(&self) -> Result<u64>;
    /// `audit.target` becomes the new id; `None` only for the bootstrap
    /// admin, created before anyone can act.
    async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
        role: Role,
        now: Millis,
        audit: Option<AuditEntry>,
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
    #[allow(clippy::too_many_arguments)]
    async fn create_api_token(
        &self,
        user_id: &str,
        name: &str,
        token_hash: [u8; 32],
        expires_at: Option<Millis>,
        from_password: bool,
        now: Millis,
        audit: Option<AuditEntry>,
    ) -> Result<String>;
    // `from_password`: created with the password (Basic or a dashboard
    // session), so it is a session that a password change ends.
    // `audit.target` becomes the new token id; `None` only for the bootstrap token.
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

    // --- enrollment and agent identity
    async fn create_enroll_token(&self, token: NewEnrollToken, now: Millis, audit: AuditEntry) -> Result<()>;
    async fn list_enroll_tokens(&self) -> Result<Vec<EnrollTokenRecord>>;
    async fn revoke_enroll_token(&self, id: &str, now: Millis, audit: AuditEntry) -> Result<()>;
    /// Consumes one use of a live enrollment token and creates the agent with
    /// its first refresh token, atomically, with its audit row. `NotFound`
    /// when the token is not usable.
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
    async fn revoke_agent(&self, id: AgentId, reason: &str, now: Millis, audit: AuditEntry) -> Result<AgentRecord>;
    /// Records a heartbeat: version, applied config hash and the whole body.
    async fn record_heartbeat(
        &self,
        id: AgentId,
        version: Option<&str>,
        applied_config_hash: Option<&str>,
        body: &Value,
        now: Millis,
    ) -> Result<()>;
    /// Batched `last_seen` updates.
    async fn touch_agents(&self, seen: &[(AgentId, Millis)]) -> Result<()>;
    /// The family a refresh token belongs to, for the per-family rate limit.
    async fn refresh_family(&self, presented_hash: [u8; 32]) -> Result<Option<String>>;
    /// Rotates a refresh token by [`refresh::decide`]; `expected_agent` (the
    /// certificate-agent `device_public_id`, protocol.md §16.4) must own it when given. On reuse it
    /// revokes the family, sets the agent's `tokens_valid_after` to `now`
    /// (its access tokens die) and appends `reuse_audit` (target and details
    /// filled in by the store) in the same transaction.
    async fn rotate_refresh_token(
        &self,
        expected_agent: Option<AgentId>,
        presented_hash: [u8; 32],
        new_hash: [u8; 32],
        grace_ms: Millis,
        now: Millis,
        reuse_audit: AuditEntry,
    ) -> Result<RefreshOutcome>;

    // --- RFC 8628 device grants
    /// Creates a pending grant unless `max_pending` unexpired ones are
    /// pending already; `Conflict` when the user code is taken.
    async fn create_device_grant(&self, grant: NewDeviceGrant) -> Result<NewGrantOutcome>;
    /// The pending, unexpired grant with this (canonical) user code.
    async fn pending_device_grant(&self, user_code: &str, now: Millis) -> Result<Option<DeviceGrantInfo>>;
    /// Approves (with labels) or denies a pending, unexpired grant and
    /// returns what it was, with its audit row; `NotFound` otherwise.
    async fn decide_device_grant(
        &self,
        user_code: &str,
        approve: bool,
        labels: &Labels,
        decided_by: &str,
        now: Millis,
        audit: AuditFor<'_, DeviceGrantInfo>,
    ) -> Result<DeviceGrantInfo>;
    /// One token-endpoint poll: enforces the interval (slow_down) and, once
    /// approved, creates the agent with its first refresh token. A repeat of
    /// the redeeming poll within `grace_ms`, while the refresh token it
    /// issued is unused, re-issues for the same agent (a lost response).
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

    // --- the stream
    /// Signals with `seq > after`, oldest first.
    async fn read_signals(&self, agent_id: AgentId, after: u64, limit: u32) -> Result<Vec<(u64, Signal)>>;
    /// Marks these commands delivered (those still queued), returns how many changed.
    async fn mark_delivered(&self, agent_id: AgentId, ids: &[CommandId], now: Millis) -> Result<u64>;

    /// Drops signals older than `before` or beyond the newest `keep` per
    /// agent, moving each affected stream's floor; returns the new floors.
    async fn prune_signals(&self, before: Millis, keep: u64) -> Result<Vec<(AgentId, u64)>>;

    // --- commands
    /// Appends `audit` when it creates; an idempotent replay creates nothing
    /// and appends nothing.
    async fn create_batch(&self, batch: NewBatch, audit: AuditFor<'_, CreatedBatch>) -> Result<CreatedBatch>;
    async fn get_command(&self, id: CommandId) -> Result<Option<Command>>;
    async fn list_commands(&self, filter: &CommandFilter) -> Result<Vec<Command>>;
    async fn get_batch(&self, id: BatchId) -> Result<Option<Batch>>;
    /// The next released, undelivered, unexpired command for the agent
    /// (priority, then age), marked delivered.
    async fn take_next_command(&self, agent_id: AgentId, now: Millis) -> Result<Option<Command>>;
    /// `running` report; `NotFound` for another agent's command, `Conflict` when terminal.
    async fn report_running(&self, agent_id: AgentId, id: CommandId, now: Millis) -> Result<Command>;
    /// Appends `audit(command, late)` when it records; a repeat of the
    /// recorded result changes nothing and appends nothing.
    async fn report_result(
        &self,
        agent_id: AgentId,
        id: CommandId,
        report: &ResultReport,
        now: Millis,
        audit: ResultAudit<'_>,
    ) -> Result<ResultOutcome>;
    async fn cancel_command(&self, id: CommandId, now: Millis, audit: AuditEntry) -> Result<CancelOutcome>;
    async fn cancel_batch(&self, id: BatchId, now: Millis, audit: AuditFor<'_, CancelOutcome>)
    -> Result<CancelOutcome>;
    /// Expires undelivered commands, marks silent ones lost, releases commands
    /// whose `not_before` has come.
    async fn sweep(&self, now: Millis) -> Result<SweepOutcome>;

    // --- audit
    async fn append_audit(&self, entry: AuditEntry) -> Result<()>;
    async fn list_audit(&self, after_id: i64, limit: u32) -> Result<Vec<AuditRecord>>;
    /// Newest first, filtered; `before` is the keyset cursor (an audit id).
    async fn query_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>>;
}
