//! RFC 8628 device grants (protocol.md §3): who may create one, and what
//! a token-endpoint poll of one gets.

use crate::{Millis, NewGrantOutcome};

/// The interval grows by this much each time a device polls too fast
/// (RFC 8628 §3.5 `slow_down`).
pub const SLOW_DOWN_STEP_S: u32 = 5;

/// Whether a new grant may be created, given how many unexpired grants
/// are pending in all and from the requesting address (each counted up to
/// its cap, so the count is bounded however many a flood left behind).
pub fn admission(pending: u64, from_address: u64, max_pending: u64, max_pending_per_ip: u64) -> NewGrantOutcome {
    if pending >= max_pending {
        NewGrantOutcome::TooManyPending
    } else if from_address >= max_pending_per_ip {
        NewGrantOutcome::TooManyFromAddress
    } else {
        NewGrantOutcome::Created
    }
}

/// Where a grant is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantStatus {
    Pending,
    Approved,
    Denied,
    /// Approved, and a poll turned it into an agent.
    Redeemed,
}

impl GrantStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantStatus::Pending => "pending",
            GrantStatus::Approved => "approved",
            GrantStatus::Denied => "denied",
            GrantStatus::Redeemed => "redeemed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::Approved, Self::Denied, Self::Redeemed].into_iter().find(|g| g.as_str() == s)
    }
}

/// What a backend reads about a polled grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantFacts {
    pub status: GrantStatus,
    pub expires_at: Millis,
    pub interval_s: u32,
    pub last_poll_at: Option<Millis>,
    /// When a poll redeemed it (status `Redeemed`).
    pub redeemed_at: Option<Millis>,
    /// The refresh token the redeeming poll issued is still unused and
    /// unrevoked, and so is the agent.
    pub issued_token_unused: bool,
}

/// What to do with a poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollDecision {
    /// Unknown code, or redeemed and not a lost-response retry.
    Invalid,
    /// A repeat of the redeeming poll within the grace while the token it
    /// got is unused: its answer was lost. Revoke that token and issue a new
    /// one to the same agent.
    Reissue,
    Expired,
    /// Record the poll (`last_poll_at` = now, the interval below) and answer.
    Answer {
        interval_s: u32,
        answer: PollAnswer,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollAnswer {
    SlowDown,
    Pending,
    Denied,
    /// Create the agent and its first refresh token.
    Redeem,
}

pub fn decide_poll(g: &GrantFacts, grace_ms: Millis, now: Millis) -> PollDecision {
    if g.status == GrantStatus::Redeemed {
        // Before expiry and interval: the redeeming poll may have been the
        // grant's last moment, and its retry comes at once.
        let within_grace = g.redeemed_at.is_some_and(|at| now - at <= grace_ms);
        return if within_grace && g.issued_token_unused { PollDecision::Reissue } else { PollDecision::Invalid };
    }
    if g.expires_at <= now {
        return PollDecision::Expired;
    }
    let too_fast = g.last_poll_at.is_some_and(|t| now - t < i64::from(g.interval_s) * 1000);
    let interval_s = if too_fast { g.interval_s + SLOW_DOWN_STEP_S } else { g.interval_s };
    let answer = match g.status {
        _ if too_fast => PollAnswer::SlowDown,
        GrantStatus::Pending => PollAnswer::Pending,
        GrantStatus::Denied => PollAnswer::Denied,
        GrantStatus::Approved | GrantStatus::Redeemed => PollAnswer::Redeem,
    };
    PollDecision::Answer { interval_s, answer }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Millis = 1_000_000;
    const GRACE: Millis = 30_000;

    fn grant(status: GrantStatus) -> GrantFacts {
        GrantFacts {
            status,
            expires_at: T + 600_000,
            interval_s: 5,
            last_poll_at: None,
            redeemed_at: None,
            issued_token_unused: false,
        }
    }

    fn answer(interval_s: u32, answer: PollAnswer) -> PollDecision {
        PollDecision::Answer { interval_s, answer }
    }

    #[test]
    fn each_status_gets_its_answer_at_a_polite_pace() {
        assert_eq!(decide_poll(&grant(GrantStatus::Pending), GRACE, T), answer(5, PollAnswer::Pending));
        assert_eq!(decide_poll(&grant(GrantStatus::Denied), GRACE, T), answer(5, PollAnswer::Denied));
        assert_eq!(decide_poll(&grant(GrantStatus::Approved), GRACE, T), answer(5, PollAnswer::Redeem));
        let polled = GrantFacts { last_poll_at: Some(T - 5_000), ..grant(GrantStatus::Pending) };
        assert_eq!(decide_poll(&polled, GRACE, T), answer(5, PollAnswer::Pending));
    }

    #[test]
    fn polling_faster_than_the_interval_slows_down_by_five_seconds_whatever_the_status() {
        for status in [GrantStatus::Pending, GrantStatus::Approved, GrantStatus::Denied] {
            let fast = GrantFacts { last_poll_at: Some(T - 4_999), ..grant(status) };
            assert_eq!(decide_poll(&fast, GRACE, T), answer(10, PollAnswer::SlowDown), "{status:?}");
        }
    }

    #[test]
    fn an_expired_grant_is_expired_even_when_approved() {
        let expired = GrantFacts { expires_at: T, ..grant(GrantStatus::Approved) };
        assert_eq!(decide_poll(&expired, GRACE, T), PollDecision::Expired);
    }

    #[test]
    fn a_redeemed_grant_is_reissued_once_within_the_grace_while_its_token_is_unused() {
        let redeemed = GrantFacts {
            redeemed_at: Some(T),
            issued_token_unused: true,
            // Expired and polled a moment ago: neither matters for a retry.
            expires_at: T,
            last_poll_at: Some(T),
            ..grant(GrantStatus::Redeemed)
        };
        assert_eq!(decide_poll(&redeemed, GRACE, T + GRACE), PollDecision::Reissue);
        assert_eq!(decide_poll(&redeemed, GRACE, T + GRACE + 1), PollDecision::Invalid, "after the grace");
        let used = GrantFacts { issued_token_unused: false, ..redeemed };
        assert_eq!(decide_poll(&used, GRACE, T + 1), PollDecision::Invalid, "its token was used");
    }

    #[test]
    fn admission_checks_the_global_cap_then_the_addresss_share() {
        assert_eq!(admission(10, 0, 10, 3), NewGrantOutcome::TooManyPending);
        assert_eq!(admission(9, 3, 10, 3), NewGrantOutcome::TooManyFromAddress);
        assert_eq!(admission(9, 2, 10, 3), NewGrantOutcome::Created);
    }
}
