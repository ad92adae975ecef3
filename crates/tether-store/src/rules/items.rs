//! Rules for the items agents hold (protocol.md §7): which agents an
//! assignment's target reaches, what a relabel gains or loses an agent, and
//! the fleet view of an item from the agents' reports.

use std::collections::BTreeMap;

use tether_proto::command::{Target, TargetSpec};
use tether_proto::config::{ApplyErrorCount, ApplyState};
use tether_proto::files::{AgentItem, FleetStatus};
use tether_proto::{AgentId, Labels};

use crate::{Result, StoreError};

/// Most agents a fleet view lists one by one.
pub const MAX_LISTED_AGENTS: usize = 1000;

/// A stored target, checked again as it is read.
pub fn stored_target(text: &str) -> Result<TargetSpec> {
    let target: Target =
        serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("stored target {text:?}: {e}")))?;
    target.check().map_err(|e| StoreError::Corrupt(format!("stored target {text:?}: {e}")))
}

/// Failures grouped by error text, most agents first.
pub fn group_errors(errors: BTreeMap<String, u64>) -> Vec<ApplyErrorCount> {
    let mut grouped: Vec<ApplyErrorCount> =
        errors.into_iter().map(|(error, agents)| ApplyErrorCount { error, agents }).collect();
    grouped.sort_by(|a, b| b.agents.cmp(&a.agents).then_with(|| a.error.cmp(&b.error)));
    grouped
}

/// The fleet view of an item at `version` from each targeted agent's last
/// report (`None`: it never reported). An agent holds the current version
/// when it reported it applied; it failed when it reported a failure of the
/// current version; anything else — no report, an older version — is behind.
pub fn fleet_status(version: u64, targeted: Vec<(AgentId, Option<AgentItem>)>) -> FleetStatus {
    let mut status = FleetStatus { version, ..FleetStatus::default() };
    let mut errors = BTreeMap::new();
    for (_, report) in &targeted {
        status.targeted += 1;
        match report {
            Some(r) if r.version == version && r.state == ApplyState::Applied => status.current += 1,
            Some(r) if r.version == version => {
                status.failed += 1;
                *errors.entry(r.error.clone().unwrap_or_default()).or_default() += 1;
            }
            _ => status.behind += 1,
        }
    }
    status.errors = group_errors(errors);
    status.agents = targeted.into_iter().filter_map(|(_, r)| r).take(MAX_LISTED_AGENTS).collect();
    status
}

/// What relabelling agent `id` from `before` to `after` does to the items
/// targeting it: the ids of those it gains, and of those it loses.
pub fn relabelled<'a>(
    items: impl IntoIterator<Item = (i64, &'a TargetSpec)>,
    id: AgentId,
    before: &Labels,
    after: &Labels,
) -> (Vec<i64>, Vec<i64>) {
    let (mut gained, mut lost) = (Vec::new(), Vec::new());
    for (item, target) in items {
        match (target.matches(id, before), target.matches(id, after)) {
            (false, true) => gained.push(item),
            (true, false) => lost.push(item),
            _ => {}
        }
    }
    (gained, lost)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn item(agent: AgentId, version: u64, state: ApplyState, error: Option<&str>) -> Option<AgentItem> {
        Some(AgentItem {
            agent_id: agent,
            version,
            state,
            error: error.map(str::to_owned),
            serial: None,
            not_after: None,
        })
    }

    #[test]
    fn only_a_report_of_the_current_version_counts_as_current_or_failed() {
        let ids: Vec<AgentId> = (0..5).map(|_| AgentId::new()).collect();
        let targeted = vec![
            (ids[0], item(ids[0], 3, ApplyState::Applied, None)),
            (ids[1], item(ids[1], 2, ApplyState::Applied, None)),
            (ids[2], item(ids[2], 3, ApplyState::Failed, Some("hash mismatch"))),
            (ids[3], item(ids[3], 2, ApplyState::Failed, Some("old failure"))),
            (ids[4], None),
        ];
        let s = fleet_status(3, targeted);
        assert_eq!((s.targeted, s.current, s.behind, s.failed), (5, 1, 3, 1));
        assert_eq!(s.errors, vec![ApplyErrorCount { error: "hash mismatch".into(), agents: 1 }]);
        assert_eq!(s.agents.len(), 4, "agents that never reported are not listed");
    }

    #[test]
    fn a_relabel_gains_and_loses_exactly_the_items_whose_match_changed() {
        let id = AgentId::new();
        let web = TargetSpec::Labels(labels(&[("role", "web")]));
        let prod = TargetSpec::Labels(labels(&[("env", "prod")]));
        let all = TargetSpec::All;
        let mine = TargetSpec::Agents(vec![id]);
        let items = [(1, &web), (2, &prod), (3, &all), (4, &mine)];
        let before = labels(&[("role", "web"), ("env", "dev")]);
        let after = labels(&[("role", "db"), ("env", "prod")]);
        assert_eq!(relabelled(items, id, &before, &after), (vec![2], vec![1]));
    }

    #[test]
    fn a_stored_target_is_checked_again() {
        assert_eq!(stored_target(r#"{"all":true}"#).expect("all"), TargetSpec::All);
        assert!(stored_target(r#"{"all":false}"#).is_err());
        assert!(stored_target("nonsense").is_err());
    }
}
