//! The decisions the store makes, as plain functions that every backend
//! calls: a backend reads the facts, asks the rule, and writes what it
//! decided. Nothing here touches a database, so each rule is unit-tested
//! on its own and no backend can drift from another.

pub mod commands;
pub mod config;
pub mod device;
pub mod items;
pub mod refresh;
pub mod telemetry;

use tether_proto::Labels;

use crate::{AuditEntry, HeartbeatRow, Millis, PresenceChange};

/// The audit row of a presence transition (one per transition, appended
/// in the transaction that records it).
pub fn presence_audit(change: &PresenceChange, now: Millis) -> AuditEntry {
    let action = if change.online { "agent.online" } else { "agent.offline" };
    let details = serde_json::json!({
        "name": change.name,
        "hostname": change.hostname,
        "last_seen": change.last_seen,
    });
    AuditEntry::system("server", action, change.agent_id.to_string(), details, now)
}

/// The heartbeats one batch writes: per agent the latest (by `at`, then
/// the later one given), in agent id order, which is also the order the
/// agents' rows are locked in.
pub fn latest_heartbeats(beats: &[HeartbeatRow]) -> Vec<&HeartbeatRow> {
    let mut latest: std::collections::BTreeMap<tether_proto::AgentId, &HeartbeatRow> = Default::default();
    for beat in beats {
        match latest.get(&beat.agent_id) {
            Some(kept) if kept.at > beat.at => {}
            _ => {
                latest.insert(beat.agent_id, beat);
            }
        }
    }
    latest.into_values().collect()
}

/// The labels of an agent enrolled with a token: the operator's labels on
/// the token win over the ones the agent asked for.
pub fn enrollment_labels(asked: Labels, from_token: Labels) -> Labels {
    let mut labels = asked;
    labels.extend(from_token);
    labels
}

/// The epoch of a new stream (protocol.md §4 cursors are `<epoch>-<seq>`):
/// the second it was created, so a stream made again never accepts a
/// cursor of the one before it.
pub fn new_stream_epoch(now: Millis) -> u64 {
    (now / 1000).max(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_tokens_labels_win_over_the_agents() {
        let merged =
            enrollment_labels(labels(&[("role", "db"), ("rack", "7")]), labels(&[("role", "web"), ("env", "prod")]));
        assert_eq!(merged, labels(&[("role", "web"), ("rack", "7"), ("env", "prod")]));
    }

    #[test]
    fn a_batch_writes_each_agents_latest_heartbeat() {
        let beat = |agent_id, at, version: &str| HeartbeatRow {
            agent_id,
            version: Some(version.into()),
            applied_config_hash: None,
            failed_config: None,
            body: "null".into(),
            at,
        };
        let (a, b) = (tether_proto::AgentId::new(), tether_proto::AgentId::new());
        let beats = [beat(a, 5, "new"), beat(b, 1, "b"), beat(a, 3, "old"), beat(a, 5, "newest")];
        let got: Vec<_> = latest_heartbeats(&beats).iter().map(|b| (b.agent_id, b.version.clone())).collect();
        let mut want = vec![(a, Some("newest".to_owned())), (b, Some("b".to_owned()))];
        want.sort_by_key(|(id, _)| *id);
        assert_eq!(got, want);
    }

    #[test]
    fn a_stream_epoch_is_the_second_of_creation() {
        assert_eq!(new_stream_epoch(1_800_000_000_999), 1_800_000_000);
        assert_eq!(new_stream_epoch(-5), 0);
    }
}
