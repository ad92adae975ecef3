//! What both SQL backends share: how driver errors become [`StoreError`]s,
//! and conversions between stored values and tether's types.

use std::str::FromStr;

use serde::Serialize;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;

use crate::{Millis, Result, StoreError};

/// A query whose text is built from column-list constants (never from input).
macro_rules! q {
    ($($fmt:tt)*) => {
        sqlx::query(sqlx::AssertSqlSafe(format!($($fmt)*)))
    };
}
pub(crate) use q;

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if unavailable(&e) { StoreError::Unavailable(Box::new(e)) } else { StoreError::Backend(Box::new(e)) }
    }
}

/// Errors that say the database could not be reached or could not take the
/// work right now, rather than that the work was wrong: nothing was done,
/// and the same call may succeed later.
fn unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            let code = db.code();
            let code = code.as_deref().unwrap_or_default();
            // PostgreSQL SQLSTATEs: connection exceptions (08…), shutdown and
            // start-up (57P01-03), too many connections (53300), and the
            // serialization failures a retry resolves (40001, 40P01).
            // SQLite result codes: BUSY (5, 517…) and LOCKED (6, 262).
            code.starts_with("08")
                || matches!(code, "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01")
                || matches!(code, "5" | "6" | "261" | "262" | "517" | "773")
        }
        _ => false,
    }
}

/// Whether the error is a unique-constraint violation (a taken name or code).
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

pub fn to_millis(t: OffsetDateTime) -> Millis {
    (t.unix_timestamp_nanos() / 1_000_000) as Millis
}

pub fn from_millis(ms: Millis) -> Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .map_err(|e| StoreError::Corrupt(format!("timestamp {ms}: {e}")))
}

pub fn opt_time(ms: Option<Millis>) -> Result<Option<OffsetDateTime>> {
    ms.map(from_millis).transpose()
}

pub fn json_text<T: Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).expect("plain data serializes")
}

pub fn parse_json<T: DeserializeOwned>(text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("json: {e}")))
}

pub fn parse_id<T: FromStr>(text: &str) -> Result<T> {
    text.parse().map_err(|_| StoreError::Corrupt(format!("id {text:?}")))
}

/// The newest migration a build knows, to tell whether a database's schema
/// is the one it expects.
pub fn latest_version(migrator: &sqlx::migrate::Migrator) -> i64 {
    migrator.iter().map(|m| m.version).max().unwrap_or(0)
}

/// `Ok` when the newest applied migration is the build's newest.
pub fn check_schema(applied: Option<i64>, migrator: &sqlx::migrate::Migrator) -> Result<()> {
    let expected = latest_version(migrator);
    match applied {
        Some(v) if v == expected => Ok(()),
        Some(v) => Err(StoreError::Unavailable(
            format!("database schema is at migration {v}, this build expects {expected}").into(),
        )),
        None => Err(StoreError::Unavailable("database has no tether schema".into())),
    }
}

/// The error of a failed migration, naming where.
pub fn migrate_error(e: sqlx::migrate::MigrateError, location: &str) -> StoreError {
    StoreError::Open(format!("applying the database migrations to {location} failed: {e}"))
}

/// A `LIKE` pattern matching `q` anywhere, with `\` escaping its wildcards.
pub fn like_pattern(q: &str) -> String {
    format!("%{}%", q.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_"))
}

/// Fills `buf` from `source` as far as it goes; the bytes read (0 at the end).
pub(crate) async fn read_chunk(source: crate::BlobSource<'_>, buf: &mut [u8]) -> Result<usize> {
    use tokio::io::AsyncReadExt;
    let mut filled = 0;
    while filled < buf.len() {
        let n = source.read(&mut buf[filled..]).await.map_err(|e| StoreError::Backend(Box::new(e)))?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

/// The JSON text of each agent's signal when one is appended to many
/// streams at once: `references(i)` for the `i`th agent.
pub(crate) type References<'a> = dyn Fn(usize) -> String + Send + Sync + 'a;

/// One multi-row `INSERT` of `entries` into the audit chain, each row's
/// `prev_hash` the hash before it, starting from `prev`; `prev` is left at
/// the last row's hash. Both backends' `insert_audits` run it per chunk.
pub(crate) fn audit_insert<DB>(entries: &[crate::AuditEntry], prev: &mut Vec<u8>) -> sqlx::QueryBuilder<DB>
where
    DB: sqlx::Database,
    for<'t> i64: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    for<'t> &'t str: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    for<'t> Option<&'t str>: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    for<'t> &'t [u8]: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    let mut insert = sqlx::QueryBuilder::<DB>::new(
        "INSERT INTO audit (ts, actor, actor_kind, action, target, outcome, ip, request_id, details, prev_hash, hash) ",
    );
    insert.push_values(entries, |mut row, entry| {
        let details = entry.details_text();
        let hash = entry.hash_after(prev, &details);
        row.push_bind(entry.ts)
            .push_bind(entry.actor.as_str())
            .push_bind(entry.actor_kind)
            .push_bind(entry.action.as_str())
            .push_bind(entry.target.as_str())
            .push_bind(entry.outcome)
            .push_bind(entry.ip.as_deref())
            .push_bind(entry.request_id.as_deref())
            .push_bind(details.as_str())
            .push_bind(prev.as_slice())
            .push_bind(&hash[..]);
        *prev = hash.to_vec();
    });
    insert
}

/// [`References`] giving every agent the same signal.
pub(crate) fn same_for_all(reference: &serde_json::Value) -> impl Fn(usize) -> String + Send + Sync + use<> {
    let text = reference.to_string();
    move |_| text.clone()
}

/// A group of result reports being recorded in one transaction (see
/// [`crate::CommandStore::report_results`]): decided on the commands as
/// the backend found them, then the backend writes [`Self::writes`] (in
/// any order, at most one per command) and hands each stored command back
/// to [`Self::written`]; [`Self::finish`] gives the answers and the audit
/// rows to append, both in the reports' order.
pub(crate) struct ResultGroup<'r, 'a> {
    reports: &'r [crate::ResultToRecord<'a>],
    answers: Vec<Option<Result<crate::ResultOutcome>>>,
    /// The reports to write: their index in the group, whether late, their hash.
    pub writes: Vec<(usize, bool, [u8; 32])>,
}

impl<'r, 'a> ResultGroup<'r, 'a> {
    /// Decides every report on the commands `found` ([`crate::rules::commands::decide_results`]).
    pub fn decide(
        reports: &'r [crate::ResultToRecord<'a>],
        mut found: std::collections::HashMap<tether_proto::CommandId, crate::rules::commands::ResultTarget>,
    ) -> Self {
        use crate::rules::commands::{ResultDecision, decide_results};
        let mut writes = Vec::new();
        let answers = decide_results(reports, &mut found)
            .into_iter()
            .enumerate()
            .map(|(i, decided)| match decided {
                Ok((ResultDecision::Record { late }, hash)) => {
                    writes.push((i, late, hash));
                    None
                }
                Ok((ResultDecision::Unchanged, _)) => Some(Ok(crate::ResultOutcome::Unchanged)),
                Err(refused) => Some(Err(refused)),
            })
            .collect();
        Self { reports, answers, writes }
    }

    /// The report at `index` as the backend writes it.
    pub fn report(&self, index: usize) -> &crate::ResultToRecord<'a> {
        &self.reports[index]
    }

    /// `command` is stored now, written for its report.
    pub fn written(&mut self, command: tether_proto::command::Command) -> Result<()> {
        let &(i, late, _) = self
            .writes
            .iter()
            .find(|(i, ..)| self.reports[*i].id == command.id)
            .ok_or_else(|| StoreError::Corrupt(format!("command {} was written for no report", command.id)))?;
        self.answers[i] = Some(Ok(crate::ResultOutcome::Recorded { late, command: Box::new(command) }));
        Ok(())
    }

    /// The answers and the audit rows of the recorded reports, in order.
    pub fn finish(self) -> Result<(Vec<Result<crate::ResultOutcome>>, Vec<crate::AuditEntry>)> {
        let mut audits = Vec::with_capacity(self.writes.len());
        let mut answers = Vec::with_capacity(self.answers.len());
        for (report, answer) in self.reports.iter().zip(self.answers) {
            let answer = answer.ok_or_else(|| StoreError::Corrupt(format!("no command {} to write", report.id)))?;
            if let Ok(crate::ResultOutcome::Recorded { late, command }) = &answer {
                audits.push((report.audit)(command, *late));
            }
            answers.push(answer);
        }
        Ok((answers, audits))
    }
}
