//! Audit rows and their hash chain (protocol.md §10): each row's hash covers the
//! previous row's hash and the row's own content as stored, so altering or
//! removing a row breaks the chain at that row.
//!
//! The hash is computed over the exact stored column values: `details` is
//! hashed as the text the backend wrote, never re-serialised from a parsed
//! value (a float such as `9.7084255809572990e79` does not survive a
//! parse/print round trip byte for byte, which once made clean rows look
//! tampered; protocol.md §10).

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::{Millis, Result, Store};

/// The `prev_hash` of the first row.
pub const GENESIS_HASH: [u8; 32] = [0; 32];

/// Most audit rows one `INSERT` statement writes (each row binds 11
/// values; both backends' limits on bound values are far above).
pub(crate) const ROWS_PER_INSERT: usize = 256;

/// An event to append. No secrets in `details`.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    pub ts: Millis,
    pub actor: String,
    pub actor_kind: &'static str,
    pub action: String,
    pub target: String,
    pub outcome: &'static str,
    pub ip: Option<String>,
    pub request_id: Option<String>,
    pub details: Value,
}

/// A stored row.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    pub id: i64,
    pub ts: Millis,
    pub actor: String,
    pub actor_kind: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub ip: Option<String>,
    pub request_id: Option<String>,
    pub details: Value,
    /// `details` exactly as stored: what the hash covers.
    #[serde(skip)]
    pub details_text: String,
    #[serde(skip)]
    pub prev_hash: Vec<u8>,
    #[serde(skip)]
    pub hash: Vec<u8>,
}

/// `sha256(prev_hash || canonical row)`; the row excludes its own id so a
/// backend's id allocation does not matter.
#[allow(clippy::too_many_arguments)]
pub fn chain_hash(
    prev_hash: &[u8],
    ts: Millis,
    actor: &str,
    actor_kind: &str,
    action: &str,
    target: &str,
    outcome: &str,
    ip: Option<&str>,
    request_id: Option<&str>,
    details: &str,
) -> [u8; 32] {
    let row = serde_json::json!([ts, actor, actor_kind, action, target, outcome, ip, request_id, details]);
    let mut h = Sha256::new();
    h.update(prev_hash);
    h.update(row.to_string().as_bytes());
    h.finalize().into()
}

impl AuditEntry {
    /// An event of the server itself (its first start, a reset from the
    /// command line, the quick start's own agent), not of a request.
    pub fn system(actor: &str, action: &str, target: String, details: Value, ts: Millis) -> Self {
        Self {
            ts,
            actor: actor.to_owned(),
            actor_kind: "system",
            action: action.to_owned(),
            target,
            outcome: "ok",
            ip: None,
            request_id: None,
            details,
        }
    }

    /// The `details` text to store; the hash is computed over these bytes.
    pub fn details_text(&self) -> String {
        self.details.to_string()
    }

    /// The hash of this entry appended after `prev_hash`, over `details_text`.
    pub fn hash_after(&self, prev_hash: &[u8], details_text: &str) -> [u8; 32] {
        chain_hash(
            prev_hash,
            self.ts,
            &self.actor,
            self.actor_kind,
            &self.action,
            &self.target,
            self.outcome,
            self.ip.as_deref(),
            self.request_id.as_deref(),
            details_text,
        )
    }
}

impl AuditRecord {
    pub fn expected_hash(&self, prev_hash: &[u8]) -> [u8; 32] {
        chain_hash(
            prev_hash,
            self.ts,
            &self.actor,
            &self.actor_kind,
            &self.action,
            &self.target,
            &self.outcome,
            self.ip.as_deref(),
            self.request_id.as_deref(),
            &self.details_text,
        )
    }
}

/// Where the chain starts once retention deleted a prefix of it: the last
/// deleted row's id and hash. The first remaining row's `prev_hash` must
/// equal `hash`, as it equalled that row's hash when it was appended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditAnchor {
    pub id: i64,
    pub hash: Vec<u8>,
}

/// Most broken rows listed in one verification (all are counted).
pub const MAX_LISTED_BREAKS: usize = 1000;

/// Walks the whole audit chain and reports every row that breaks it, not
/// just the first: after a broken row the walk goes on from that row's
/// stored hash, so each altered or removed row is named once and tampering
/// further on is still seen. The walk starts at the retention anchor (the
/// last pruned row), or at [`GENESIS_HASH`] when nothing was pruned.
pub async fn verify_audit(store: &dyn Store) -> Result<AuditVerification> {
    let anchor = store.audit_anchor().await?;
    let (mut after, mut prev) = match anchor {
        Some(a) => (a.id, a.hash),
        None => (0, GENESIS_HASH.to_vec()),
    };
    let mut v = AuditVerification::default();
    loop {
        let rows = store.list_audit(after, 1000).await?;
        let Some(last) = rows.last() else { break };
        let checked_up_to = after;
        after = last.id;
        for (i, row) in rows.iter().enumerate() {
            v.checked += 1;
            let mut problem = audit_row_problem(row, &prev);
            if problem.is_some() && i == 0 && row.prev_hash != prev {
                // Retention may have pruned past where this walk had read
                // while it was reading: then the row follows the new anchor.
                if let Some(a) = store.audit_anchor().await?
                    && a.id > checked_up_to
                    && a.id < row.id
                    && a.hash == row.prev_hash
                {
                    problem = audit_row_problem(row, &a.hash);
                }
            }
            if let Some(problem) = problem {
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
