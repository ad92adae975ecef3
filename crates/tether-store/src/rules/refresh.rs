//! The refresh-token rotation rule (protocol.md §3), as a plain function
//! every backend calls: the backend only reads the facts and writes what
//! the decision says.
//!
//! - An unused, unrevoked token rotates.
//! - A used token presented again within the grace (30 s), while the
//!   successor it was answered with is still unused and unrevoked, and for
//!   the first time, is a lost response: a new pair, the unused successor
//!   dies. The grace retry works once.
//! - Any other reuse — a used token outside the grace or after its successor
//!   was used, a second retry, or a revoked token of a family that is still
//!   live (e.g. the successor a thief's retry killed, presented by the real
//!   agent) — revokes the whole family and the agent's access tokens.

use tether_proto::AgentId;

use crate::{AuditEntry, Millis};

/// What the backend read about the presented token and its family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresentedToken {
    pub agent_revoked: bool,
    pub revoked: bool,
    /// When it was first exchanged.
    pub used_at: Option<Millis>,
    /// Whether a lost-response retry already used the grace for it.
    pub retried: bool,
    /// The token it was answered with, if it was used.
    pub successor: Option<Successor>,
    /// Some token of the family is still unrevoked.
    pub family_live: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Successor {
    pub used: bool,
    pub revoked: bool,
}

/// What to do with a presented refresh token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshDecision {
    /// First use: mark it used and issue its successor.
    Rotate,
    /// A lost response: revoke the unused successor, issue a new one, and
    /// remember that the grace is spent.
    LostResponseRetry,
    /// Revoke the family and the agent's access tokens; audit it.
    Reuse,
    /// Nothing to do: the family is already dead.
    Invalid,
    AgentRevoked,
}

pub fn decide(t: &PresentedToken, grace_ms: Millis, now: Millis) -> RefreshDecision {
    if t.agent_revoked {
        return RefreshDecision::AgentRevoked;
    }
    if t.revoked {
        return if t.family_live { RefreshDecision::Reuse } else { RefreshDecision::Invalid };
    }
    let Some(used_at) = t.used_at else { return RefreshDecision::Rotate };
    let within_grace = now - used_at <= grace_ms;
    let successor_untouched = t.successor.is_some_and(|s| !s.used && !s.revoked);
    if within_grace && successor_untouched && !t.retried {
        RefreshDecision::LostResponseRetry
    } else {
        RefreshDecision::Reuse
    }
}

/// The audit row of a detected reuse: the caller's `entry`, aimed at the
/// agent, saying which family died and whether a used or a revoked token
/// was presented.
pub fn reuse_audit(entry: AuditEntry, agent_id: AgentId, family_id: &str, presented: &PresentedToken) -> AuditEntry {
    AuditEntry {
        target: agent_id.to_string(),
        details: serde_json::json!({
            "family_id": family_id,
            "presented": if presented.revoked { "revoked" } else { "used" },
        }),
        ..entry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Millis = 30_000;
    const T: Millis = 1_000_000;

    fn fresh() -> PresentedToken {
        PresentedToken {
            agent_revoked: false,
            revoked: false,
            used_at: None,
            retried: false,
            successor: None,
            family_live: true,
        }
    }

    fn used(at: Millis, successor: Successor) -> PresentedToken {
        PresentedToken { used_at: Some(at), successor: Some(successor), ..fresh() }
    }

    const UNUSED: Successor = Successor { used: false, revoked: false };

    #[test]
    fn an_unused_token_rotates() {
        assert_eq!(decide(&fresh(), GRACE, T), RefreshDecision::Rotate);
    }

    #[test]
    fn a_retry_within_the_grace_before_the_successor_is_used_is_a_lost_response() {
        assert_eq!(decide(&used(T, UNUSED), GRACE, T + GRACE), RefreshDecision::LostResponseRetry);
    }

    #[test]
    fn the_grace_retry_works_once() {
        let again = PresentedToken { retried: true, ..used(T, UNUSED) };
        assert_eq!(decide(&again, GRACE, T + 1), RefreshDecision::Reuse);
    }

    #[test]
    fn a_retry_after_the_grace_is_reuse() {
        assert_eq!(decide(&used(T, UNUSED), GRACE, T + GRACE + 1), RefreshDecision::Reuse);
    }

    #[test]
    fn a_retry_after_the_successor_was_used_is_reuse() {
        let successor_used = used(T, Successor { used: true, revoked: false });
        assert_eq!(decide(&successor_used, GRACE, T + 1), RefreshDecision::Reuse);
        let successor_revoked = used(T, Successor { used: false, revoked: true });
        assert_eq!(decide(&successor_revoked, GRACE, T + 1), RefreshDecision::Reuse);
    }

    #[test]
    fn a_revoked_token_of_a_live_family_is_reuse_and_of_a_dead_one_invalid() {
        let live = PresentedToken { revoked: true, ..fresh() };
        assert_eq!(decide(&live, GRACE, T), RefreshDecision::Reuse);
        let dead = PresentedToken { revoked: true, family_live: false, ..fresh() };
        assert_eq!(decide(&dead, GRACE, T), RefreshDecision::Invalid);
    }

    #[test]
    fn a_revoked_agent_wins_over_everything() {
        for t in [fresh(), used(T, UNUSED), PresentedToken { revoked: true, ..fresh() }] {
            let t = PresentedToken { agent_revoked: true, ..t };
            assert_eq!(decide(&t, GRACE, T), RefreshDecision::AgentRevoked);
        }
    }
}
