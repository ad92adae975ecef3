//! The decisions the store makes, as plain functions that every backend
//! calls: a backend reads the facts, asks the rule, and writes what it
//! decided. Nothing here touches a database, so each rule is unit-tested
//! on its own and no backend can drift from another.

pub mod commands;
pub mod config;
pub mod device;
pub mod items;
pub mod refresh;

use tether_proto::Labels;

use crate::Millis;

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
    fn a_stream_epoch_is_the_second_of_creation() {
        assert_eq!(new_stream_epoch(1_800_000_000_999), 1_800_000_000);
        assert_eq!(new_stream_epoch(-5), 0);
    }
}
