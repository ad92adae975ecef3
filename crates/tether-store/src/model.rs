//! The rows and outcomes the [`crate::Store`] traits take and return:
//! plain data, the same for every backend.

use serde_json::Value;
use tether_proto::certs::CertSource;
use tether_proto::command::{Command, CommandStatus, CreateCommand, ResultReport, TargetSpec};
use tether_proto::config::{Doc, Scope};
use tether_proto::telemetry::{MetricPoint, Resolution};
use tether_proto::{AgentId, BatchId, CommandId, Labels};

use crate::audit::AuditEntry;

/// Milliseconds since the Unix epoch; every stored timestamp uses it.
pub type Millis = i64;

/// Builds a mutation's audit row from what the mutation did, when the row
/// depends on it (a new id, a count, merged labels); the store calls it
/// inside the mutation's transaction and appends the row there.
pub type AuditFor<'a, T> = &'a (dyn Fn(&T) -> AuditEntry + Send + Sync);

/// A recorded result's audit row, from the stored command and whether the
/// result came late (after the command was marked lost).
pub type ResultAudit<'a> = &'a (dyn Fn(&Command, bool) -> AuditEntry + Send + Sync);

/// One agent's result report for a command, as
/// [`crate::CommandStore::report_results`] records it with others.
#[derive(Clone, Copy)]
pub struct ResultToRecord<'a> {
    pub agent_id: AgentId,
    pub id: CommandId,
    pub report: &'a ResultReport,
    pub now: Millis,
    /// Its `command.result` audit row, appended when the report is recorded.
    pub audit: ResultAudit<'a>,
}

impl std::fmt::Debug for ResultToRecord<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResultToRecord")
            .field("agent_id", &self.agent_id)
            .field("id", &self.id)
            .field("status", &self.report.status)
            .field("now", &self.now)
            .finish_non_exhaustive()
    }
}

/// The position of one agent's stream after a write; published to wake waiters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// The hash of the effective configuration the agent should run.
    pub config_hash: Option<String>,
    /// The desired hash the agent reported it could not apply, and why.
    pub config_failed_hash: Option<String>,
    pub config_error: Option<String>,
    /// The presence last recorded by [`crate::AgentStore::update_presence`];
    /// `None` until it first decided (a new agent starts online).
    pub online: Option<bool>,
    /// The latest heartbeat body, as the agent sent it (`null` before the first).
    pub heartbeat: Value,
    /// When its last WebSocket closed ([`crate::AgentStore::disconnect_agent`]):
    /// seen at or before this, the agent is offline.
    pub disconnected_at: Option<Millis>,
}

impl AgentRecord {
    /// Whether the agent counts as online (protocol.md §8): not revoked,
    /// seen at or after `seen_since`, and seen after its last WebSocket
    /// closed. `last_seen` may be newer than the stored one (requests not
    /// yet flushed). The SQL of both backends states the same rule.
    pub fn online_at(&self, last_seen: Option<Millis>, seen_since: Millis) -> bool {
        self.revoked_at.is_none()
            && last_seen.is_some_and(|seen| seen >= seen_since && self.disconnected_at.is_none_or(|gone| seen > gone))
    }
}

impl AgentRecord {
    /// A just-created agent: its stream empty, seen at creation, to run the
    /// effective configuration with hash `config_hash`.
    pub fn new(agent: NewAgent, epoch: u64, config_hash: String, now: Millis) -> Self {
        Self {
            id: agent.id,
            name: agent.hostname.clone(),
            hostname: agent.hostname,
            labels: agent.labels,
            facts: agent.facts,
            public_key: agent.public_key,
            version: None,
            applied_config_hash: None,
            epoch,
            head_seq: 0,
            floor_seq: 0,
            created_at: now,
            last_seen: Some(now),
            revoked_at: None,
            revoke_reason: None,
            tokens_valid_after: None,
            config_hash: Some(config_hash),
            config_failed_hash: None,
            config_error: None,
            online: Some(true),
            heartbeat: Value::Null,
            disconnected_at: None,
        }
    }
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

/// A long-lived agent key (`tta_…`, protocol.md §16.5) to store: only its
/// hash, never the secret.
#[derive(Debug, Clone)]
pub struct NewAgentKey {
    pub id: String,
    pub agent_id: AgentId,
    pub key_hash: [u8; 32],
    /// The key's last four characters, so that operators can tell keys
    /// apart without the secret.
    pub last4: String,
    /// A name the agent gets in the same transaction: the printer-fleet
    /// agent's own `agent_id`, which it goes on sending in its bodies.
    pub agent_name: Option<String>,
}

/// A stored agent key, as listings show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentKeyRecord {
    pub id: String,
    pub agent_id: AgentId,
    pub last4: String,
    pub created_at: Millis,
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
    /// Only agents in this state.
    pub status: Option<StatusFilter>,
    /// Keyset cursor: the last agent id of the previous page.
    pub after: Option<AgentId>,
    pub limit: u32,
}

/// Agents by liveness, as an operator filters them. Decided from
/// `last_seen` at the caller's `seen_since`, not from the stored presence
/// (which lags by the presence job's interval).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    /// Not revoked, `last_seen >= seen_since`.
    Online {
        seen_since: Millis,
    },
    /// Not revoked, `last_seen` unknown or `< seen_since`.
    Offline {
        seen_since: Millis,
    },
    Revoked,
}

impl StatusFilter {
    /// The filter as the backends' SQL takes it: a state name and the
    /// instant it is decided at (0 for `revoked`, where it is not used).
    pub fn sql_params(self) -> (&'static str, Millis) {
        match self {
            StatusFilter::Online { seen_since } => ("online", seen_since),
            StatusFilter::Offline { seen_since } => ("offline", seen_since),
            StatusFilter::Revoked => ("revoked", 0),
        }
    }
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

/// The first admin and its API token, created on a store without users.
#[derive(Debug, Clone)]
pub struct FirstAdmin {
    pub username: String,
    /// PHC string (argon2id).
    pub password_hash: String,
    pub token_hash: [u8; 32],
    pub token_expires_at: Millis,
    pub now: Millis,
}

/// What the server keeps in memory about an agent's stream, as stored:
/// what a replica reads to catch up with changes it was not told about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamChange {
    pub agent_id: AgentId,
    pub epoch: u64,
    pub head_seq: u64,
    pub floor_seq: u64,
    pub revoked_at: Option<Millis>,
    pub revoke_reason: Option<String>,
    pub tokens_valid_after: Option<Millis>,
}

/// Which engine a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// One embedded file, one server process.
    Sqlite,
    /// A database server that several tether replicas may share.
    Postgres,
}

impl BackendKind {
    /// Whether other server processes may write to the same data, so that
    /// what one replica holds in memory must be kept in step with the rest.
    pub fn shared(self) -> bool {
        matches!(self, BackendKind::Postgres)
    }
}

/// A new version of a scope's document, checked and ready to write.
#[derive(Debug, Clone)]
pub struct NewConfigVersion {
    pub scope: Scope,
    pub doc: Doc,
    /// The version the writer replaces (`If-Match`), decided on by
    /// [`crate::rules::config::next_version`].
    pub if_match: Option<u64>,
    pub author: String,
    pub comment: String,
    pub now: Millis,
}

/// What writing a scope's version did.
#[derive(Debug, Clone)]
pub struct ConfigChange {
    pub scope: Scope,
    pub version: u64,
    /// The hash of the scope's document.
    pub hash: String,
    /// Agents whose effective configuration changed; each got a
    /// `config.updated` signal.
    pub agents_changed: u64,
    pub heads: Vec<Head>,
}

/// One stored version of a scope's document.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigVersionRecord {
    pub scope: Scope,
    pub version: u64,
    pub doc: Doc,
    pub hash: String,
    pub author: String,
    pub comment: String,
    pub created_at: Millis,
}

/// A scope and its current version.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigScopeRecord {
    pub scope: Scope,
    pub version: u64,
    pub hash: String,
    pub updated_by: String,
    pub updated_at: Millis,
}

/// Changes to an agent an operator makes.
#[derive(Debug, Clone, Default)]
pub struct AgentUpdate {
    /// The agent's whole new label set (its effective configuration follows).
    pub labels: Option<Labels>,
    pub name: Option<String>,
}

/// One agent's latest heartbeat, to be written with others in one
/// transaction ([`crate::AgentStore::record_heartbeats`]): the server
/// collects them in memory and flushes them in batches, as it does
/// `last_seen`, so a fleet's heartbeats cost one write per flush.
#[derive(Debug, Clone)]
pub struct HeartbeatRow {
    pub agent_id: AgentId,
    pub version: Option<String>,
    /// The effective configuration the agent runs now.
    pub applied_config_hash: Option<String>,
    /// A configuration (hash) the agent could not apply, and why: `(hash, error)`.
    pub failed_config: Option<(String, String)>,
    /// The whole body as JSON text, as the agent sent it (text, so a queue
    /// of heartbeats holds no more than their bytes).
    pub body: String,
    /// When the server received it; `last_seen` moves to it (never back).
    pub at: Millis,
}

/// An agent whose stored presence changed from one decided value to the
/// other ([`crate::AgentStore::update_presence`]), with what an operator
/// needs to recognise it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceChange {
    pub agent_id: AgentId,
    pub name: String,
    pub hostname: String,
    pub labels: Labels,
    /// The new state.
    pub online: bool,
    pub last_seen: Option<Millis>,
}

/// The two kinds of item agents hold and report on (protocol.md §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ItemKind {
    File,
    Cert,
}

impl ItemKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ItemKind::File => "file",
            ItemKind::Cert => "cert",
        }
    }
}

/// What changing a file assignment or a certificate did: the item as it is
/// now, and the agents told (each got one signal).
#[derive(Debug, Clone)]
pub struct ItemChange<T> {
    pub item: T,
    pub agents_told: u64,
    pub heads: Vec<Head>,
}

/// A file assignment to write: checked, its target resolved later, in the
/// store's transaction.
#[derive(Debug, Clone)]
pub struct NewFileAssignment {
    pub sha256: String,
    pub path: String,
    pub mode: u32,
    pub owner: Option<String>,
    pub group: Option<String>,
    pub hook: Option<String>,
    pub target: TargetSpec,
    pub by: String,
    pub now: Millis,
}

/// A stored file assignment.
#[derive(Debug, Clone, PartialEq)]
pub struct FileAssignmentRecord {
    pub id: i64,
    pub path: String,
    pub sha256: String,
    pub size: u64,
    pub mode: u32,
    pub owner: Option<String>,
    pub group: Option<String>,
    pub hook: Option<String>,
    pub target: TargetSpec,
    pub version: u64,
    pub updated_by: String,
    pub updated_at: Millis,
    pub removed_at: Option<Millis>,
}

/// Uploaded certificate material, its key already sealed by the server.
#[derive(Debug, Clone, PartialEq)]
pub struct SealedMaterial {
    pub serial: String,
    pub not_after: Millis,
    pub cert_pem: String,
    pub chain_pem: String,
    pub key_sealed: Vec<u8>,
}

/// A certificate to create: uploaded (with its material) or issued (with
/// the names agents may ask for).
#[derive(Debug, Clone)]
pub struct NewCert {
    pub name: String,
    pub target: TargetSpec,
    pub group: Option<String>,
    pub hook: Option<String>,
    pub material: Option<SealedMaterial>,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<std::net::IpAddr>,
    pub validity_days: Option<u32>,
    pub by: String,
    pub now: Millis,
}

/// A stored certificate. `not_after` is the material's (uploaded) or the
/// soonest an agent reported holding (issued).
#[derive(Debug, Clone, PartialEq)]
pub struct CertRecord {
    pub id: i64,
    pub name: String,
    pub source: CertSource,
    pub target: TargetSpec,
    pub group: Option<String>,
    pub hook: Option<String>,
    pub version: u64,
    pub serial: Option<String>,
    pub not_after: Option<Millis>,
    pub cert_pem: Option<String>,
    pub chain_pem: Option<String>,
    pub key_sealed: Option<Vec<u8>>,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<std::net::IpAddr>,
    pub validity_days: Option<u32>,
    pub created_by: String,
    pub created_at: Millis,
    pub revoked_at: Option<Millis>,
}

/// A CA the server created or was given; its key sealed by the server.
#[derive(Debug, Clone, PartialEq)]
pub struct NewCa {
    pub serial: String,
    pub cert_pem: String,
    pub key_sealed: Vec<u8>,
    pub not_after: Millis,
    pub now: Millis,
}

/// A stored CA; exactly one is active (it signs), retired ones are gone
/// from the list the store returns.
#[derive(Debug, Clone, PartialEq)]
pub struct CaRecord {
    pub id: i64,
    pub serial: String,
    pub cert_pem: String,
    pub key_sealed: Vec<u8>,
    pub not_after: Millis,
    pub active: bool,
    pub created_at: Millis,
}

/// A certificate the CA signed for an agent.
#[derive(Debug, Clone, PartialEq)]
pub struct IssuedRecord {
    pub serial: String,
    pub cert_id: i64,
    pub agent_id: AgentId,
    pub ca_id: i64,
    pub version: u64,
    pub not_after: Millis,
    pub now: Millis,
}

/// A certificate expiring soon that has not been announced yet: the
/// uploaded material (no agent), or what one agent holds (issued).
#[derive(Debug, Clone, PartialEq)]
pub struct ExpiringCert {
    pub cert_id: i64,
    pub name: String,
    pub serial: String,
    pub agent_id: Option<AgentId>,
    pub not_after: Millis,
}

/// A metric batch to store ([`crate::TelemetryStore::store_metrics`]).
#[derive(Debug, Clone, Copy)]
pub struct NewMetrics<'a> {
    pub agent_id: AgentId,
    /// Unique per agent: the same id again is a retry and stores nothing.
    pub batch_id: &'a str,
    pub points: &'a [MetricPoint],
    /// Distinct series (name + labels) one agent may have; a batch that
    /// would create more is refused whole.
    pub max_series: u32,
    pub now: Millis,
}

/// What storing a metric batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsOutcome {
    /// Points written now (a point for a series and instant already stored is not).
    Stored { points: u64 },
    /// This batch id was stored before: nothing was written.
    Duplicate,
}

/// One metric's series for one agent over a time range.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricQuery {
    pub agent_id: AgentId,
    pub name: String,
    /// Inclusive.
    pub from: Millis,
    /// Exclusive.
    pub to: Millis,
    pub resolution: Resolution,
    /// At most this many points in all; more → truncated.
    pub max_points: u32,
}

/// A stored inventory entry.
#[derive(Debug, Clone, PartialEq)]
pub struct InventoryRecord {
    pub kind: String,
    pub key: String,
    pub attrs: Value,
    pub updated_at: Millis,
}

/// How far back each kind of history is kept ([`crate::TelemetryStore::prune_history`]):
/// anything older than its horizon goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Horizons {
    /// Raw points by their `ts_ms`.
    pub raw_metrics_before: Millis,
    /// Hourly buckets by their start.
    pub hourly_before: Millis,
    /// Daily buckets by their start.
    pub daily_before: Millis,
    /// Remembered metric batch ids by when they were received.
    pub metric_batches_before: Millis,
    /// Commands in a terminal state by when they finished.
    pub finished_commands_before: Millis,
    /// Audit rows by their `ts`, as a prefix of the chain.
    pub audit_before: Millis,
}

/// Agents by presence and commands by state ([`crate::TelemetryStore::fleet_counts`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetCounts {
    pub agents_online: u64,
    pub agents_offline: u64,
    pub agents_revoked: u64,
    /// Every state with at least one command, by its wire name.
    pub commands: Vec<(String, u64)>,
}

/// Rows one [`crate::TelemetryStore::prune_history`] call deleted, per kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneCounts {
    pub raw: u64,
    pub hourly: u64,
    pub daily: u64,
    pub batches: u64,
    pub commands: u64,
    pub audit: u64,
}

impl PruneCounts {
    /// Whether a kind may have more rows past its horizon: it deleted as
    /// many as it was allowed to, so the caller should call again.
    pub fn more(&self, max_rows: u32) -> bool {
        let max = u64::from(max_rows);
        [self.raw, self.hourly, self.daily, self.batches, self.commands, self.audit].iter().any(|&n| n >= max)
    }
}
