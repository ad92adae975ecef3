//! Stored rows → tether's types, written once for both SQL backends.
//!
//! Both schemas store the same values in types that decode to the same
//! Rust types (`TEXT` → `String`, 64-bit integers → `i64`, booleans →
//! `bool`, bytes → `Vec<u8>`), so one set of decoders serves both.
//! [`decoders!`] instantiates it for a backend's row type: sqlx has no
//! row-generic decode without repeating a long list of bounds on every
//! function.

/// Columns read by `command_from_row`, in order.
pub const COMMAND_COLUMNS: &str = "id, batch_id, agent_id, name, args, timeout_s, priority, created_by, status, \
     exit_code, stdout, stderr, output, truncated, reason, created_at, not_before, delivered_at, started_at, \
     finished_at, expires_at";

/// Columns read by `agent_from_row`, in order.
pub const AGENT_COLUMNS: &str = "id, name, hostname, labels, facts, public_key, version, applied_config_hash, \
     epoch, head_seq, floor_seq, created_at, last_seen, revoked_at, revoke_reason, tokens_valid_after, \
     config_hash, config_failed_hash, config_error, online, heartbeat, disconnected_at";

/// Columns read by `result_target_from_row`, in order.
pub const RESULT_TARGET_COLUMNS: &str = "id, agent_id, status, result_hash";

/// Columns read by `stream_change_from_row`, in order.
pub const STREAM_COLUMNS: &str = "id, epoch, head_seq, floor_seq, revoked_at, revoke_reason, tokens_valid_after";

/// Columns read by `audit_from_row`, in order.
pub const AUDIT_COLUMNS: &str =
    "id, ts, actor, actor_kind, action, target, outcome, ip, request_id, details, prev_hash, hash";

/// Columns read by `grant_info`, in order.
pub const GRANT_INFO_COLUMNS: &str = "user_code, hostname, requested_ip, created_at, public_key, labels";

/// Columns read by `user_from_row`, in order.
pub const USER_COLUMNS: &str = "id, username, role, password_hash";

/// Columns read by `user_record_from_row`, in order.
pub const USER_RECORD_COLUMNS: &str = "id, username, role, created_at, disabled_at";

/// Columns read by `config_version_from_row`, in order.
pub const CONFIG_VERSION_COLUMNS: &str = "scope, version, doc, hash, author, comment, created_at";

/// Columns read by `config_scope_from_row`, in order.
pub const CONFIG_SCOPE_COLUMNS: &str = "scope, version, hash, updated_by, updated_at";

/// Columns read by `enroll_token_from_row`, in order.
pub const ENROLL_TOKEN_COLUMNS: &str = "id, labels, uses, used, created_at, expires_at, revoked_at";

/// Columns read by `file_assignment_from_row`, in order (from `file_assignments f`).
pub const FILE_ASSIGNMENT_COLUMNS: &str = "f.id, f.path, f.sha256, (SELECT size FROM blobs b WHERE b.sha256 = f.sha256), \
     f.mode, f.owner, f.grp, f.hook, f.target, f.version, f.updated_by, f.updated_at, f.removed_at";

/// Columns read by `cert_from_row`, in order (from `certs c`). An issued
/// certificate's `not_after` is the soonest one its agents reported.
pub const CERT_COLUMNS: &str = "c.id, c.name, c.source, c.target, c.grp, c.hook, c.version, c.serial, \
     COALESCE(c.not_after, (SELECT MIN(i.not_after) FROM agent_items i \
        WHERE i.kind = 'cert' AND i.item_id = c.id AND i.state = 'applied')), \
     c.cert_pem, c.chain_pem, c.key_sealed, c.dns_names, c.ip_addresses, c.validity_days, c.created_by, \
     c.created_at, c.revoked_at";

/// Columns read by `ca_from_row`, in order.
pub const CA_COLUMNS: &str = "id, serial, cert_pem, key_sealed, not_after, active, created_at";

/// Columns read by `inventory_from_row`, in order.
pub const INVENTORY_COLUMNS: &str = "kind, key, attrs, updated_at";

/// Columns read by `agent_item_from_row`, in order.
pub const AGENT_ITEM_COLUMNS: &str = "agent_id, version, state, error, serial, not_after";

/// Columns read by `agent_key_from_row`, in order.
pub const AGENT_KEY_COLUMNS: &str = "id, agent_id, last4, created_at";

macro_rules! decoders {
    ($row:ty) => {
        use std::str::FromStr as _;

        use sqlx::Row as _;
        use tether_proto::command::{Command, CommandStatus};

        use crate::sql::{from_millis, opt_time, parse_id, parse_json};
        use crate::{
            AgentKeyRecord, AgentRecord, AuditRecord, ConfigScopeRecord, ConfigVersionRecord, DeviceGrantInfo,
            EnrollTokenRecord, Result, Role, StoreError, StreamChange, User, UserRecord,
        };

        fn role(text: &str) -> Result<Role> {
            Role::parse(text).ok_or_else(|| StoreError::Corrupt(format!("role {text:?}")))
        }

        pub fn command_from_row(r: &$row) -> Result<Command> {
            Ok(Command {
                id: parse_id(r.try_get(0)?)?,
                batch_id: parse_id(r.try_get(1)?)?,
                agent_id: parse_id(r.try_get(2)?)?,
                name: r.try_get(3)?,
                args: parse_json(r.try_get(4)?)?,
                timeout_s: r.try_get::<i64, _>(5)? as u32,
                priority: r.try_get::<i64, _>(6)? as u8,
                created_by: r.try_get(7)?,
                status: CommandStatus::from_str(r.try_get(8)?).map_err(StoreError::Corrupt)?,
                exit_code: r.try_get::<Option<i64>, _>(9)?.map(|c| c as i32),
                stdout: r.try_get(10)?,
                stderr: r.try_get(11)?,
                output: parse_json(r.try_get(12)?)?,
                truncated: r.try_get(13)?,
                reason: r.try_get(14)?,
                created_at: from_millis(r.try_get(15)?)?,
                not_before: opt_time(r.try_get(16)?)?,
                delivered_at: opt_time(r.try_get(17)?)?,
                started_at: opt_time(r.try_get(18)?)?,
                finished_at: opt_time(r.try_get(19)?)?,
                expires_at: from_millis(r.try_get(20)?)?,
            })
        }

        /// A command's id and what a result report for it is decided on.
        pub fn result_target_from_row(
            r: &$row,
        ) -> Result<(tether_proto::CommandId, crate::rules::commands::ResultTarget)> {
            let target = crate::rules::commands::ResultTarget {
                agent_id: parse_id(r.try_get(1)?)?,
                status: CommandStatus::from_str(r.try_get(2)?).map_err(StoreError::Corrupt)?,
                recorded: r.try_get(3)?,
            };
            Ok((parse_id(r.try_get(0)?)?, target))
        }

        pub fn agent_from_row(r: &$row) -> Result<AgentRecord> {
            Ok(AgentRecord {
                id: parse_id(r.try_get(0)?)?,
                name: r.try_get(1)?,
                hostname: r.try_get(2)?,
                labels: parse_json(r.try_get(3)?)?,
                facts: parse_json(r.try_get(4)?)?,
                public_key: r.try_get(5)?,
                version: r.try_get(6)?,
                applied_config_hash: r.try_get(7)?,
                epoch: r.try_get::<i64, _>(8)? as u64,
                head_seq: r.try_get::<i64, _>(9)? as u64,
                floor_seq: r.try_get::<i64, _>(10)? as u64,
                created_at: r.try_get(11)?,
                last_seen: r.try_get(12)?,
                revoked_at: r.try_get(13)?,
                revoke_reason: r.try_get(14)?,
                tokens_valid_after: r.try_get(15)?,
                config_hash: r.try_get(16)?,
                config_failed_hash: r.try_get(17)?,
                config_error: r.try_get(18)?,
                online: r.try_get(19)?,
                heartbeat: r.try_get::<Option<&str>, _>(20)?.map(parse_json).transpose()?.unwrap_or_default(),
                disconnected_at: r.try_get(21)?,
            })
        }

        /// An agent whose presence changes, from `id, name, hostname,
        /// labels, <new state>, last_seen` (each backend's presence query).
        pub fn presence_from_row(r: &$row) -> Result<crate::PresenceChange> {
            Ok(crate::PresenceChange {
                agent_id: parse_id(r.try_get(0)?)?,
                name: r.try_get(1)?,
                hostname: r.try_get(2)?,
                labels: parse_json(r.try_get(3)?)?,
                online: r.try_get(4)?,
                last_seen: r.try_get(5)?,
            })
        }

        pub fn inventory_from_row(r: &$row) -> Result<crate::InventoryRecord> {
            Ok(crate::InventoryRecord {
                kind: r.try_get(0)?,
                key: r.try_get(1)?,
                attrs: parse_json(r.try_get(2)?)?,
                updated_at: r.try_get(3)?,
            })
        }

        /// A raw point or a rollup bucket as a query answers it: the
        /// series' label text, then the point.
        pub fn series_point_from_row(r: &$row) -> Result<(String, tether_proto::telemetry::SeriesPoint)> {
            let agg = crate::rules::telemetry::Agg {
                count: r.try_get::<i64, _>(2)? as u64,
                sum: r.try_get(3)?,
                min: r.try_get(4)?,
                max: r.try_get(5)?,
            };
            Ok((r.try_get(0)?, agg.point(r.try_get(1)?)))
        }

        pub fn stream_change_from_row(r: &$row) -> Result<StreamChange> {
            Ok(StreamChange {
                agent_id: parse_id(r.try_get(0)?)?,
                epoch: r.try_get::<i64, _>(1)? as u64,
                head_seq: r.try_get::<i64, _>(2)? as u64,
                floor_seq: r.try_get::<i64, _>(3)? as u64,
                revoked_at: r.try_get(4)?,
                revoke_reason: r.try_get(5)?,
                tokens_valid_after: r.try_get(6)?,
            })
        }

        pub fn user_from_row(r: &$row) -> Result<User> {
            Ok(User {
                id: r.try_get(0)?,
                username: r.try_get(1)?,
                role: role(r.try_get(2)?)?,
                password_hash: r.try_get(3)?,
            })
        }

        pub fn user_record_from_row(r: &$row) -> Result<UserRecord> {
            Ok(UserRecord {
                id: r.try_get(0)?,
                username: r.try_get(1)?,
                role: role(r.try_get(2)?)?,
                created_at: r.try_get(3)?,
                disabled_at: r.try_get(4)?,
            })
        }

        pub fn enroll_token_from_row(r: &$row) -> Result<EnrollTokenRecord> {
            Ok(EnrollTokenRecord {
                id: r.try_get(0)?,
                labels: parse_json(r.try_get(1)?)?,
                uses: r.try_get::<i64, _>(2)? as u32,
                used: r.try_get::<i64, _>(3)? as u32,
                created_at: r.try_get(4)?,
                expires_at: r.try_get(5)?,
                revoked_at: r.try_get(6)?,
            })
        }

        pub fn agent_key_from_row(r: &$row) -> Result<AgentKeyRecord> {
            Ok(AgentKeyRecord {
                id: r.try_get(0)?,
                agent_id: parse_id(r.try_get(1)?)?,
                last4: r.try_get(2)?,
                created_at: r.try_get(3)?,
            })
        }

        pub fn audit_from_row(r: &$row) -> Result<AuditRecord> {
            let details_text: String = r.try_get(9)?;
            // A row whose details are not JSON any more was altered; it is
            // still read (as a string) so that verification can report it.
            let details =
                serde_json::from_str(&details_text).unwrap_or_else(|_| serde_json::Value::String(details_text.clone()));
            Ok(AuditRecord {
                id: r.try_get(0)?,
                ts: r.try_get(1)?,
                actor: r.try_get(2)?,
                actor_kind: r.try_get(3)?,
                action: r.try_get(4)?,
                target: r.try_get(5)?,
                outcome: r.try_get(6)?,
                ip: r.try_get(7)?,
                request_id: r.try_get(8)?,
                details,
                details_text,
                prev_hash: r.try_get(10)?,
                hash: r.try_get(11)?,
            })
        }

        pub fn config_version_from_row(r: &$row) -> Result<ConfigVersionRecord> {
            Ok(ConfigVersionRecord {
                scope: parse_id(r.try_get(0)?)?,
                version: r.try_get::<i64, _>(1)? as u64,
                doc: parse_json(r.try_get(2)?)?,
                hash: r.try_get(3)?,
                author: r.try_get(4)?,
                comment: r.try_get(5)?,
                created_at: r.try_get(6)?,
            })
        }

        pub fn config_scope_from_row(r: &$row) -> Result<ConfigScopeRecord> {
            Ok(ConfigScopeRecord {
                scope: parse_id(r.try_get(0)?)?,
                version: r.try_get::<i64, _>(1)? as u64,
                hash: r.try_get(2)?,
                updated_by: r.try_get(3)?,
                updated_at: r.try_get(4)?,
            })
        }

        pub fn file_assignment_from_row(r: &$row) -> Result<crate::FileAssignmentRecord> {
            Ok(crate::FileAssignmentRecord {
                id: r.try_get(0)?,
                path: r.try_get(1)?,
                sha256: r.try_get(2)?,
                size: r.try_get::<i64, _>(3)? as u64,
                mode: r.try_get::<i64, _>(4)? as u32,
                owner: r.try_get(5)?,
                group: r.try_get(6)?,
                hook: r.try_get(7)?,
                target: crate::rules::items::stored_target(r.try_get(8)?)?,
                version: r.try_get::<i64, _>(9)? as u64,
                updated_by: r.try_get(10)?,
                updated_at: r.try_get(11)?,
                removed_at: r.try_get(12)?,
            })
        }

        pub fn cert_from_row(r: &$row) -> Result<crate::CertRecord> {
            let source = match r.try_get::<&str, _>(2)? {
                "uploaded" => tether_proto::certs::CertSource::Uploaded,
                "issued" => tether_proto::certs::CertSource::Issued,
                other => return Err(StoreError::Corrupt(format!("certificate source {other:?}"))),
            };
            Ok(crate::CertRecord {
                id: r.try_get(0)?,
                name: r.try_get(1)?,
                source,
                target: crate::rules::items::stored_target(r.try_get(3)?)?,
                group: r.try_get(4)?,
                hook: r.try_get(5)?,
                version: r.try_get::<i64, _>(6)? as u64,
                serial: r.try_get(7)?,
                not_after: r.try_get(8)?,
                cert_pem: r.try_get(9)?,
                chain_pem: r.try_get(10)?,
                key_sealed: r.try_get(11)?,
                dns_names: parse_json(r.try_get(12)?)?,
                ip_addresses: parse_json(r.try_get(13)?)?,
                validity_days: r.try_get::<Option<i64>, _>(14)?.map(|d| d as u32),
                created_by: r.try_get(15)?,
                created_at: r.try_get(16)?,
                revoked_at: r.try_get(17)?,
            })
        }

        pub fn ca_from_row(r: &$row) -> Result<crate::CaRecord> {
            Ok(crate::CaRecord {
                id: r.try_get(0)?,
                serial: r.try_get(1)?,
                cert_pem: r.try_get(2)?,
                key_sealed: r.try_get(3)?,
                not_after: r.try_get(4)?,
                active: r.try_get(5)?,
                created_at: r.try_get(6)?,
            })
        }

        pub fn agent_item_from_row(r: &$row) -> Result<tether_proto::files::AgentItem> {
            let state = match r.try_get::<&str, _>(2)? {
                "applied" => tether_proto::config::ApplyState::Applied,
                "failed" => tether_proto::config::ApplyState::Failed,
                other => return Err(StoreError::Corrupt(format!("item state {other:?}"))),
            };
            Ok(tether_proto::files::AgentItem {
                agent_id: parse_id(r.try_get(0)?)?,
                version: r.try_get::<i64, _>(1)? as u64,
                state,
                error: r.try_get(3)?,
                serial: r.try_get(4)?,
                not_after: opt_time(r.try_get(5)?)?,
            })
        }

        /// The operator's view of a device grant row.
        pub fn grant_info(r: &$row) -> Result<DeviceGrantInfo> {
            Ok(DeviceGrantInfo {
                user_code: r.try_get(0)?,
                hostname: r.try_get(1)?,
                requested_ip: r.try_get(2)?,
                requested_at: r.try_get(3)?,
                public_key: r.try_get(4)?,
                labels: parse_json(r.try_get(5)?)?,
            })
        }
    };
}
pub(crate) use decoders;
