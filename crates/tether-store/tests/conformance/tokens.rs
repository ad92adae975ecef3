//! Enrollment tokens and refresh-token rotation.

use tether_store::{AgentRecord, AuditRecord, Entity, RefreshOutcome, Store, StoreError};

use crate::fixtures::{T0, audit_entry, enroll_token, enroll_with, new_agent, rand_hash, rotate};
use crate::harness::{Harness, conformance};

conformance!(
    an_enroll_token_is_used_up_and_its_labels_win,
    the_lost_response_retry_works_once,
    a_revoked_token_of_a_live_family_is_reuse_and_kills_the_thiefs_tokens,
    reuse_after_the_successor_was_used_or_after_the_grace_revokes_the_family,
    a_token_is_refused_to_another_agent,
);

async fn reuse_rows(store: &dyn Store) -> Vec<AuditRecord> {
    let rows = store.list_audit(0, 100).await.expect("audit");
    rows.into_iter().filter(|r| r.action == "token.refresh_reuse").collect()
}

async fn an_enroll_token_is_used_up_and_its_labels_win(h: &Harness) {
    let store = h.store();
    let token_hash = rand_hash();
    let token = enroll_token(token_hash, crate::fixtures::labels(&[("role", "web")]), 1);
    store.create_enroll_token(token, T0, audit_entry("enroll_token.create")).await.expect("token");
    let asked =
        tether_store::NewAgent { labels: crate::fixtures::labels(&[("role", "db"), ("rack", "7")]), ..new_agent() };
    let audit = |_: &AgentRecord| audit_entry("agent.enroll");
    let rec = store.enroll_agent(token_hash, asked, rand_hash(), T0, &audit).await.expect("first use");
    assert_eq!(rec.labels, crate::fixtures::labels(&[("role", "web"), ("rack", "7")]));
    assert_eq!(store.get_agent(rec.id).await.expect("get").expect("stored").labels, rec.labels);
    let second = store.enroll_agent(token_hash, new_agent(), rand_hash(), T0, &audit).await;
    assert!(matches!(second, Err(StoreError::NotFound(Entity::EnrollToken))), "{second:?}");
}

async fn the_lost_response_retry_works_once(h: &Harness) {
    let store = h.store();
    let first = rand_hash();
    let id = enroll_with(store, &[], first).await;
    let second = rand_hash();
    assert_eq!(
        rotate(store, id, first, second, T0).await,
        RefreshOutcome::Rotated { agent_id: id, lost_response_retry: false }
    );
    // The response was lost: the same token again within 30 s gets a fresh pair.
    let third = rand_hash();
    let retried = rotate(store, id, first, third, T0 + 5_000).await;
    assert_eq!(retried, RefreshOutcome::Rotated { agent_id: id, lost_response_retry: true });
    assert!(reuse_rows(store).await.is_empty(), "a lost response is not audited as reuse");
    // A second retry is reuse: the family dies, including the live `third`.
    let again = rotate(store, id, first, rand_hash(), T0 + 6_000).await;
    assert!(matches!(again, RefreshOutcome::ReuseDetected { agent_id, .. } if agent_id == id), "{again:?}");
    assert_eq!(rotate(store, id, third, rand_hash(), T0 + 7_000).await, RefreshOutcome::Invalid);
    assert_eq!(reuse_rows(store).await.len(), 1);
}

/// A thief's retry inside the grace kills the real agent's successor; the
/// real agent's next refresh must expose it.
async fn a_revoked_token_of_a_live_family_is_reuse_and_kills_the_thiefs_tokens(h: &Harness) {
    let store = h.store();
    let first = rand_hash();
    let id = enroll_with(store, &[], first).await;
    let agents_token = rand_hash();
    rotate(store, id, first, agents_token, T0).await;
    let thiefs_token = rand_hash();
    let stolen = rotate(store, id, first, thiefs_token, T0 + 1_000).await;
    assert_eq!(stolen, RefreshOutcome::Rotated { agent_id: id, lost_response_retry: true });
    // The real agent presents its (now revoked) successor.
    let exposed = rotate(store, id, agents_token, rand_hash(), T0 + 2_000).await;
    assert!(matches!(exposed, RefreshOutcome::ReuseDetected { agent_id, .. } if agent_id == id), "{exposed:?}");
    assert_eq!(rotate(store, id, thiefs_token, rand_hash(), T0 + 3_000).await, RefreshOutcome::Invalid);
    let agent = store.get_agent(id).await.expect("get").expect("agent");
    assert_eq!(agent.tokens_valid_after, Some(T0 + 2_000), "the agent's access tokens are revoked");
    let rows = reuse_rows(store).await;
    assert_eq!(rows.len(), 1, "reuse is audited");
    assert_eq!(rows[0].target, id.to_string());
    assert_eq!(rows[0].details["presented"], "revoked");
    // A token of the dead family is merely invalid now: no further row.
    assert_eq!(rotate(store, id, agents_token, rand_hash(), T0 + 4_000).await, RefreshOutcome::Invalid);
    assert_eq!(reuse_rows(store).await.len(), 1);
}

async fn reuse_after_the_successor_was_used_or_after_the_grace_revokes_the_family(h: &Harness) {
    let store = h.store();
    for (successor_used, at) in [(true, T0 + 5_000), (false, T0 + 30_001)] {
        let first = rand_hash();
        let id = enroll_with(store, &[], first).await;
        let second = rand_hash();
        rotate(store, id, first, second, T0).await;
        let mut live = second;
        if successor_used {
            live = rand_hash();
            rotate(store, id, second, live, T0 + 1_000).await;
        }
        let replay = rotate(store, id, first, rand_hash(), at).await;
        assert!(matches!(replay, RefreshOutcome::ReuseDetected { .. }), "{successor_used} {replay:?}");
        assert_eq!(rotate(store, id, live, rand_hash(), at + 1).await, RefreshOutcome::Invalid);
    }
}

async fn a_token_is_refused_to_another_agent(h: &Harness) {
    let store = h.store();
    let first = rand_hash();
    let owner = enroll_with(store, &[], first).await;
    let other = enroll_with(store, &[], rand_hash()).await;
    assert_eq!(rotate(store, other, first, rand_hash(), T0).await, RefreshOutcome::Invalid);
    assert_eq!(
        rotate(store, owner, first, rand_hash(), T0).await,
        RefreshOutcome::Rotated { agent_id: owner, lost_response_retry: false },
        "the refused attempt left the token as it was"
    );
}
