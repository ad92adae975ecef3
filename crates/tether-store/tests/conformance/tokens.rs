//! Enrollment tokens and refresh-token rotation.

use tether_proto::AgentId;
use tether_store::{AgentKeyRecord, AgentRecord, AuditRecord, Entity, NewAgentKey, RefreshOutcome, Store, StoreError};

use crate::fixtures::{T0, audit_entry, enroll_token, enroll_with, new_agent, rand_hash, rotate};
use crate::harness::{Harness, conformance};

conformance!(
    an_enroll_token_is_used_up_and_its_labels_win,
    the_lost_response_retry_works_once,
    a_revoked_token_of_a_live_family_is_reuse_and_kills_the_thiefs_tokens,
    reuse_after_the_successor_was_used_or_after_the_grace_revokes_the_family,
    a_token_is_refused_to_another_agent,
    a_current_token_names_its_agent_without_being_used_until_rotated_or_revoked,
    an_agent_key_names_its_agent_is_listed_without_its_secret_and_dies_with_it,
    a_revoked_or_unknown_agent_gets_no_key,
    an_agent_key_whose_audit_row_fails_is_not_stored,
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

/// `current_refresh_agent` (seed 003's refresh, which does not rotate): a
/// read that leaves the token as it was, true exactly while the rotation
/// rule would still rotate the token as a first use.
async fn a_current_token_names_its_agent_without_being_used_until_rotated_or_revoked(h: &Harness) {
    let store = h.store();
    let first = rand_hash();
    let id = enroll_with(store, &[], first).await;
    let other = enroll_with(store, &[], rand_hash()).await;
    for _ in 0..3 {
        assert_eq!(store.current_refresh_agent(Some(id), first).await.expect("read"), Some(id));
    }
    assert_eq!(store.current_refresh_agent(None, first).await.expect("read"), Some(id));
    assert_eq!(store.current_refresh_agent(Some(other), first).await.expect("read"), None, "another agent's");
    assert_eq!(store.current_refresh_agent(Some(id), rand_hash()).await.expect("read"), None, "unknown");

    // The reads did not use it: its rotation is a first use, not a retry.
    let second = rand_hash();
    assert_eq!(
        rotate(store, id, first, second, T0).await,
        RefreshOutcome::Rotated { agent_id: id, lost_response_retry: false }
    );
    assert_eq!(store.current_refresh_agent(Some(id), first).await.expect("read"), None, "a used token");
    assert_eq!(store.current_refresh_agent(Some(id), second).await.expect("read"), Some(id));

    // Reuse of the used one kills the family: its live token is no longer current.
    let replay = rotate(store, id, first, rand_hash(), T0 + 60_000).await;
    assert!(matches!(replay, RefreshOutcome::ReuseDetected { .. }), "{replay:?}");
    assert_eq!(store.current_refresh_agent(Some(id), second).await.expect("read"), None, "a revoked family");

    // A revoked agent's token is not current, even with the token itself
    // left unrevoked behind the store's back.
    let third = rand_hash();
    let revoked = enroll_with(store, &[], third).await;
    store.revoke_agent(revoked, "retired", T0 + 1, audit_entry("agent.revoke")).await.expect("revoke");
    assert_eq!(store.current_refresh_agent(Some(revoked), third).await.expect("read"), None);
    h.exec(&format!("UPDATE refresh_tokens SET revoked_at = NULL WHERE agent_id = '{revoked}'")).await;
    assert_eq!(store.current_refresh_agent(Some(revoked), third).await.expect("read"), None, "a revoked agent");
}

fn agent_key(agent_id: AgentId, key_hash: [u8; 32], agent_name: Option<&str>) -> NewAgentKey {
    NewAgentKey {
        id: uuid::Uuid::now_v7().to_string(),
        agent_id,
        key_hash,
        last4: "x9Qz".into(),
        agent_name: agent_name.map(str::to_owned),
    }
}

async fn an_agent_key_names_its_agent_is_listed_without_its_secret_and_dies_with_it(h: &Harness) {
    let store = h.store();
    let id = enroll_with(store, &[], rand_hash()).await;
    let other = enroll_with(store, &[], rand_hash()).await;
    let key_hash = rand_hash();
    let key = agent_key(id, key_hash, Some("agent-001"));
    let created = store.create_agent_key(key.clone(), T0 + 1, audit_entry("agent_key.create")).await.expect("key");
    assert_eq!(created, AgentKeyRecord { id: key.id.clone(), agent_id: id, last4: "x9Qz".into(), created_at: T0 + 1 });
    // A key without a name leaves the agent's name as it is.
    let second = store.create_agent_key(agent_key(id, rand_hash(), None), T0 + 2, audit_entry("agent_key.create"));
    let second = second.await.expect("second key");

    assert_eq!(store.find_agent_key(key_hash).await.expect("find"), Some(id));
    assert_eq!(store.find_agent_key(rand_hash()).await.expect("find"), None, "an unknown key names no one");
    assert_eq!(store.list_agent_keys(id).await.expect("list"), vec![created, second]);
    assert_eq!(store.list_agent_keys(other).await.expect("list"), vec![], "keys are the agent's own");
    assert_eq!(store.get_agent(id).await.expect("get").expect("agent").name, "agent-001");
    let rows = store.list_audit(0, 100).await.expect("audit");
    assert_eq!(rows.iter().filter(|r| r.action == "agent_key.create").count(), 2, "each key is audited");

    // Revoked, the agent still holds its key (the caller refuses it as revoked)…
    store.revoke_agent(id, "stolen", T0 + 3, audit_entry("agent.revoke")).await.expect("revoke");
    assert_eq!(store.find_agent_key(key_hash).await.expect("find"), Some(id));
    // …deleted, its keys are gone with it.
    store.delete_agent(id, audit_entry("agent.delete")).await.expect("delete");
    assert_eq!(store.find_agent_key(key_hash).await.expect("find"), None);
    assert_eq!(store.list_agent_keys(id).await.expect("list"), vec![]);
}

async fn a_revoked_or_unknown_agent_gets_no_key(h: &Harness) {
    let store = h.store();
    let id = enroll_with(store, &[], rand_hash()).await;
    store.revoke_agent(id, "retired", T0 + 1, audit_entry("agent.revoke")).await.expect("revoke");
    for agent in [id, AgentId::new()] {
        let key_hash = rand_hash();
        let refused = store.create_agent_key(
            agent_key(agent, key_hash, Some("renamed")),
            T0 + 2,
            audit_entry("agent_key.create"),
        );
        let refused = refused.await;
        assert!(matches!(refused, Err(StoreError::NotFound(Entity::Agent))), "{refused:?}");
        assert_eq!(store.find_agent_key(key_hash).await.expect("find"), None);
    }
    assert_eq!(store.get_agent(id).await.expect("get").expect("agent").name, "host", "nothing was renamed");
    let rows = store.list_audit(0, 100).await.expect("audit");
    assert!(rows.iter().all(|r| r.action != "agent_key.create"), "a refused key leaves no audit row");
}

/// One transaction: an audit append that fails takes the key and the new name with it.
async fn an_agent_key_whose_audit_row_fails_is_not_stored(h: &Harness) {
    let store = h.store();
    let id = enroll_with(store, &[], rand_hash()).await;
    h.break_audit().await;
    let key_hash = rand_hash();
    let failed = store.create_agent_key(agent_key(id, key_hash, Some("renamed")), T0, audit_entry("agent_key.create"));
    assert!(failed.await.is_err());
    assert_eq!(store.find_agent_key(key_hash).await.expect("find"), None);
    assert_eq!(store.list_agent_keys(id).await.expect("list"), vec![]);
    assert_eq!(store.get_agent(id).await.expect("get").expect("agent").name, "host");
}
