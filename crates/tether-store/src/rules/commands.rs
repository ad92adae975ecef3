//! Command rules (protocol.md §5) that the store applies when it writes:
//! expiry, scheduling, idempotent creation, result reports and
//! cancellation. Transitions themselves are [`CommandStatus::apply`].

use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};

use tether_proto::command::{
    BatchStatus, CommandStatus, CreateCommand, DEFAULT_EXPIRY_S, Event, LOST_GRACE_S, ResultReport,
};
use tether_proto::signal::CommandQueued;
use tether_proto::{AgentId, CommandId};

use crate::{Entity, Head, Millis, Result, ResultToRecord, StoreError};

/// How long after its deadline (`timeout_s` from delivery or start) a
/// silent command is marked `lost`.
pub const LOST_GRACE_MS: Millis = LOST_GRACE_S * 1000;

/// When an undelivered command expires: as asked, or one hour after
/// creation; never in the past.
pub fn expires_at(requested: Option<Millis>, now: Millis) -> Result<Millis> {
    let at = requested.unwrap_or(now + DEFAULT_EXPIRY_S * 1000);
    if at <= now {
        return Err(StoreError::Invalid { field: "expires_at", message: "must be in the future".into() });
    }
    Ok(at)
}

/// Until when a new command is held back from its agent's stream: a
/// `not_before` in the future; `None` releases it at once.
pub fn held_until(not_before: Option<Millis>, now: Millis) -> Option<Millis> {
    not_before.filter(|at| *at > now)
}

/// A request reusing an idempotency key is a replay of the first only if
/// its body is the same.
pub fn check_replay(stored_request_hash: &[u8], request_hash: &[u8]) -> Result<()> {
    if stored_request_hash == request_hash {
        Ok(())
    } else {
        Err(StoreError::Conflict("idempotency key was used with a different request".into()))
    }
}

/// What identifies a result report, to tell a repeat from a different one.
pub fn result_hash(r: &ResultReport) -> [u8; 32] {
    let canonical = serde_json::json!([r.status, r.exit_code, r.stdout, r.stderr, r.output, r.truncated, r.reason]);
    Sha256::digest(canonical.to_string().as_bytes()).into()
}

/// What to do with a result report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultDecision {
    /// The same result is already recorded: change nothing.
    Unchanged,
    /// Record it; `late` when it arrives for a command already marked lost.
    Record { late: bool },
}

/// Decides a result report for a command in `current` state whose recorded
/// result (if any) hashes to `recorded`. A different result for a terminal
/// command is a conflict, except for a lost one (a late result) and for the
/// agent confirming an operator's cancel with its first report.
pub fn decide_result(
    current: CommandStatus,
    recorded: Option<&[u8]>,
    report: &ResultReport,
    report_hash: &[u8],
) -> Result<ResultDecision> {
    if recorded == Some(report_hash) {
        return Ok(ResultDecision::Unchanged);
    }
    let confirms_cancel =
        current == CommandStatus::Cancelled && report.status == CommandStatus::Cancelled && recorded.is_none();
    if !confirms_cancel {
        current.apply(Event::Finish(report.status)).map_err(|e| StoreError::Conflict(e.to_string()))?;
    }
    Ok(ResultDecision::Record { late: current == CommandStatus::Lost })
}

/// A command as reports for it are decided: whose it is, its state, and
/// the hash of its recorded result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultTarget {
    pub agent_id: AgentId,
    pub status: CommandStatus,
    pub recorded: Option<Vec<u8>>,
}

/// Decides the reports recorded together, in order, each as if the ones
/// before it were already written: `found` holds the commands they name as
/// stored (absent: unknown) and is updated as reports are recorded, so a
/// repeat later in the group is `Unchanged` and a different one a
/// conflict. Each answer is the decision and the report's hash;
/// another agent's command or an unknown one is `NotFound`.
pub fn decide_results(
    reports: &[ResultToRecord<'_>],
    found: &mut HashMap<CommandId, ResultTarget>,
) -> Vec<Result<(ResultDecision, [u8; 32])>> {
    let decide = |r: &ResultToRecord<'_>, found: &mut HashMap<CommandId, ResultTarget>| {
        let stored =
            found.get_mut(&r.id).filter(|c| c.agent_id == r.agent_id).ok_or(StoreError::NotFound(Entity::Command))?;
        let hash = result_hash(r.report);
        let decision = decide_result(stored.status, stored.recorded.as_deref(), r.report, &hash)?;
        if let ResultDecision::Record { .. } = decision {
            stored.status = r.report.status;
            stored.recorded = Some(hash.to_vec());
        }
        Ok((decision, hash))
    };
    reports.iter().map(|r| decide(r, found)).collect()
}

/// A `running` report: whether it changes the stored state (a repeat does
/// not); a conflict for a terminal command.
pub fn start(current: CommandStatus) -> Result<bool> {
    let next = current.apply(Event::Start).map_err(|e| StoreError::Conflict(e.to_string()))?;
    Ok(next != current)
}

/// An operator's cancel: a conflict for a terminal command; otherwise
/// whether the agent must be told (only if its stream may carry the
/// command, i.e. it was released).
pub fn cancel(current: CommandStatus, released: bool) -> Result<bool> {
    current.apply(Event::Cancel).map_err(|e| StoreError::Conflict(e.to_string()))?;
    Ok(released)
}

/// The `command.queued` signal's ref: the whole spec, so the agent needs no
/// further round trip (protocol.md §4).
pub fn queued_signal(
    command_id: CommandId,
    name: &str,
    args: &serde_json::Value,
    timeout_s: u32,
    priority: u8,
    expires_at: Millis,
) -> serde_json::Value {
    serde_json::to_value(CommandQueued {
        command_id,
        name: name.to_owned(),
        args: args.clone(),
        timeout_s,
        priority,
        expires_at_ms: Some(expires_at),
    })
    .expect("command.queued ref serializes")
}

/// The `command.queued` signal of each command of a batch of `request`, as
/// the JSON text a bulk append stores: the `i`th for `command_ids[i]`.
pub fn queued_signals<'a>(
    command_ids: &'a [CommandId],
    request: &'a CreateCommand,
    expires_at: Millis,
) -> impl Fn(usize) -> String + Send + Sync + 'a {
    let r = request;
    move |i| queued_signal(command_ids[i], &r.name, &r.args, r.timeout_s, r.priority, expires_at).to_string()
}

/// Keeps only the last head per agent: a later append supersedes an
/// earlier one, and waiters need only the newest.
pub fn last_heads(heads: Vec<Head>) -> Vec<Head> {
    let mut out: Vec<Head> = Vec::with_capacity(heads.len());
    for h in heads {
        match out.iter_mut().find(|o| o.agent_id == h.agent_id) {
            Some(o) => *o = h,
            None => out.push(h),
        }
    }
    out
}

/// Whether a batch's target left out an agent it named: every named agent
/// must exist and be active.
pub fn missing_agent(wanted: &[AgentId], found: &[AgentId]) -> Result<()> {
    match wanted.iter().find(|w| !found.contains(w)) {
        Some(missing) => Err(StoreError::Invalid { field: "target", message: format!("no active agent {missing}") }),
        None => Ok(()),
    }
}

/// A batch's progress from its commands' counts per state: the total, the
/// counts, and `running` while any command is not terminal.
pub fn batch_progress(
    counts: impl IntoIterator<Item = (CommandStatus, u64)>,
) -> (u64, BTreeMap<CommandStatus, u64>, BatchStatus) {
    let counts: BTreeMap<CommandStatus, u64> = counts.into_iter().filter(|(_, n)| *n > 0).collect();
    let total = counts.values().sum();
    let running = counts.keys().any(|s| !s.is_terminal());
    (total, counts, if running { BatchStatus::Running } else { BatchStatus::Done })
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Millis = 1_000_000;

    fn report(status: CommandStatus) -> ResultReport {
        ResultReport::new(status)
    }

    #[test]
    fn commands_expire_after_an_hour_unless_told_otherwise_and_never_in_the_past() {
        assert_eq!(expires_at(None, T).expect("default"), T + 3_600_000);
        assert_eq!(expires_at(Some(T + 1), T).expect("asked"), T + 1);
        assert!(matches!(expires_at(Some(T), T), Err(StoreError::Invalid { field: "expires_at", .. })));
    }

    #[test]
    fn only_a_future_not_before_holds_a_command_back() {
        assert_eq!(held_until(Some(T + 1), T), Some(T + 1));
        assert_eq!(held_until(Some(T), T), None);
        assert_eq!(held_until(None, T), None);
    }

    #[test]
    fn a_reused_idempotency_key_replays_only_the_same_request() {
        check_replay(&[1; 32], &[1; 32]).expect("same body");
        assert!(matches!(check_replay(&[1; 32], &[2; 32]), Err(StoreError::Conflict(_))));
    }

    #[test]
    fn the_same_result_twice_changes_nothing_and_a_different_one_for_a_finished_command_conflicts() {
        let ok = report(CommandStatus::Succeeded);
        let hash = result_hash(&ok);
        let unchanged = decide_result(CommandStatus::Succeeded, Some(&hash), &ok, &hash).expect("repeat");
        assert_eq!(unchanged, ResultDecision::Unchanged);
        let failed = report(CommandStatus::Failed);
        let conflict = decide_result(CommandStatus::Succeeded, Some(&hash), &failed, &result_hash(&failed));
        assert!(matches!(conflict, Err(StoreError::Conflict(_))), "{conflict:?}");
    }

    #[test]
    fn reports_decided_together_see_the_ones_recorded_before_them() {
        let (agent, other) = (AgentId::new(), AgentId::new());
        let (mine, theirs, unknown) = (CommandId::new(), CommandId::new(), CommandId::new());
        let mut found = HashMap::from([
            (mine, ResultTarget { agent_id: agent, status: CommandStatus::Running, recorded: None }),
            (theirs, ResultTarget { agent_id: other, status: CommandStatus::Running, recorded: None }),
        ]);
        let (ok, failed) = (report(CommandStatus::Succeeded), report(CommandStatus::Failed));
        let audit = |_: &tether_proto::command::Command, _: bool| {
            crate::AuditEntry::system("t", "t", String::new(), serde_json::json!({}), T)
        };
        let to = |agent_id, id, report| ResultToRecord { agent_id, id, report, now: T, audit: &audit };
        let decided = decide_results(
            &[
                to(agent, mine, &ok),
                to(agent, mine, &ok),
                to(agent, mine, &failed),
                to(agent, theirs, &ok),
                to(agent, unknown, &ok),
            ],
            &mut found,
        );
        assert!(matches!(decided[0], Ok((ResultDecision::Record { late: false }, _))), "{:?}", decided[0]);
        assert!(matches!(decided[1], Ok((ResultDecision::Unchanged, _))), "a repeat: {:?}", decided[1]);
        assert!(matches!(decided[2], Err(StoreError::Conflict(_))), "a different one: {:?}", decided[2]);
        assert!(matches!(decided[3], Err(StoreError::NotFound(Entity::Command))), "another's: {:?}", decided[3]);
        assert!(matches!(decided[4], Err(StoreError::NotFound(Entity::Command))), "unknown: {:?}", decided[4]);
        assert_eq!(found[&mine].status, CommandStatus::Succeeded);
        assert_eq!(found[&theirs].status, CommandStatus::Running, "a refused report changes nothing");
    }

    #[test]
    fn a_result_for_a_lost_command_is_recorded_late() {
        let ok = report(CommandStatus::Succeeded);
        let decided = decide_result(CommandStatus::Lost, None, &ok, &result_hash(&ok)).expect("late");
        assert_eq!(decided, ResultDecision::Record { late: true });
        let decided = decide_result(CommandStatus::Running, None, &ok, &result_hash(&ok)).expect("on time");
        assert_eq!(decided, ResultDecision::Record { late: false });
    }

    #[test]
    fn the_agents_first_cancelled_report_confirms_an_operators_cancel() {
        let cancelled = report(CommandStatus::Cancelled);
        let hash = result_hash(&cancelled);
        let first = decide_result(CommandStatus::Cancelled, None, &cancelled, &hash).expect("confirmation");
        assert_eq!(first, ResultDecision::Record { late: false });
        let other = report(CommandStatus::Succeeded);
        let after = decide_result(CommandStatus::Cancelled, None, &other, &result_hash(&other));
        assert!(matches!(after, Err(StoreError::Conflict(_))), "only a cancelled report confirms: {after:?}");
    }

    #[test]
    fn running_reports_move_forward_once_and_never_out_of_a_terminal_state() {
        assert!(start(CommandStatus::Delivered).expect("start"));
        assert!(!start(CommandStatus::Running).expect("repeat"));
        assert!(matches!(start(CommandStatus::Succeeded), Err(StoreError::Conflict(_))));
    }

    #[test]
    fn a_cancel_tells_the_agent_only_about_released_commands() {
        assert!(cancel(CommandStatus::Queued, true).expect("released"));
        assert!(!cancel(CommandStatus::Queued, false).expect("held back"));
        assert!(matches!(cancel(CommandStatus::Failed, true), Err(StoreError::Conflict(_))));
    }

    #[test]
    fn only_the_newest_head_per_agent_is_kept() {
        let (a, b) = (AgentId::new(), AgentId::new());
        let h = |agent_id, seq| Head { agent_id, epoch: 1, seq };
        assert_eq!(last_heads(vec![h(a, 1), h(b, 1), h(a, 2)]), vec![h(a, 2), h(b, 1)]);
    }

    #[test]
    fn every_named_agent_must_be_found() {
        let (a, b) = (AgentId::new(), AgentId::new());
        missing_agent(&[a, b], &[b, a]).expect("all found");
        let err = missing_agent(&[a, b], &[a]).expect_err("b missing");
        assert!(err.to_string().contains(&b.to_string()), "{err}");
    }

    #[test]
    fn a_batch_runs_while_any_command_is_not_terminal() {
        let (total, _, status) = batch_progress([(CommandStatus::Succeeded, 2), (CommandStatus::Running, 1)]);
        assert_eq!((total, status), (3, BatchStatus::Running));
        let (total, counts, status) = batch_progress([(CommandStatus::Succeeded, 2), (CommandStatus::Lost, 1)]);
        assert_eq!((total, counts.len(), status), (3, 2, BatchStatus::Done));
    }
}
