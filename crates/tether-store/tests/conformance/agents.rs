//! Agents: listing, revocation, liveness and the stream changes replicas read.

use tether_proto::command::TargetSpec;
use tether_store::{AgentFilter, Entity, StoreError};

use crate::fixtures::{T0, audit_entry, batch, enroll, labels};
use crate::harness::{Harness, conformance};

conformance!(
    agents_are_listed_by_label_and_name_in_id_pages,
    revoking_an_agent_keeps_the_first_reason,
    last_seen_only_moves_forward,
    stream_changes_name_every_agent_whose_stream_state_moved,
);

async fn agents_are_listed_by_label_and_name_in_id_pages(h: &Harness) {
    let store = h.store();
    let web = enroll(store, &[("role", "web"), ("env", "prod")]).await;
    let db = enroll(store, &[("role", "db"), ("env", "prod")]).await;
    let list = |filter: AgentFilter| async move {
        let got = store.list_agents(&AgentFilter { limit: 10, ..filter }).await.expect("list");
        got.into_iter().map(|a| a.id).collect::<Vec<_>>()
    };
    assert_eq!(list(AgentFilter { labels: labels(&[("role", "web")]), ..Default::default() }).await, vec![web]);
    let prod = list(AgentFilter { labels: labels(&[("env", "prod")]), ..Default::default() }).await;
    assert_eq!(prod, vec![web.min(db), web.max(db)], "in id order");
    assert!(
        list(AgentFilter { labels: labels(&[("role", "web"), ("env", "dev")]), ..Default::default() }).await.is_empty()
    );
    let page = store.list_agents(&AgentFilter { limit: 1, ..Default::default() }).await.expect("page");
    let rest = list(AgentFilter { after: Some(page[0].id), ..Default::default() }).await;
    assert_eq!(rest, vec![web.max(db)]);
    assert_eq!(list(AgentFilter { q: Some("hos".into()), ..Default::default() }).await.len(), 2);
    assert!(list(AgentFilter { q: Some("%".into()), ..Default::default() }).await.is_empty(), "wildcards are literal");
}

async fn revoking_an_agent_keeps_the_first_reason(h: &Harness) {
    let store = h.store();
    let agent = enroll(store, &[]).await;
    let rec = store.revoke_agent(agent, "stolen laptop", T0 + 1, audit_entry("agent.revoke")).await.expect("revoke");
    assert_eq!((rec.revoked_at, rec.revoke_reason.as_deref()), (Some(T0 + 1), Some("stolen laptop")));
    let again = store.revoke_agent(agent, "other", T0 + 2, audit_entry("agent.revoke")).await.expect("again");
    assert_eq!((again.revoked_at, again.revoke_reason.as_deref()), (Some(T0 + 1), Some("stolen laptop")));
    let unknown = store.revoke_agent(tether_proto::AgentId::new(), "x", T0, audit_entry("agent.revoke")).await;
    assert!(matches!(unknown, Err(StoreError::NotFound(Entity::Agent))), "{unknown:?}");
    // A revoked agent is no command target.
    let created = store.create_batch(batch(TargetSpec::All, T0 + 3), &|_| audit_entry("command.create")).await;
    assert!(created.expect("create").command_ids.is_empty());
}

async fn last_seen_only_moves_forward(h: &Harness) {
    let store = h.store();
    let (a, b) = (enroll(store, &[]).await, enroll(store, &[]).await);
    store.touch_agents(&[(a, T0 + 10), (b, T0 + 20)]).await.expect("touch");
    store.touch_agents(&[(a, T0 + 5)]).await.expect("an older value");
    let beat = tether_store::HeartbeatRow {
        agent_id: b,
        version: Some("1.2.3".into()),
        applied_config_hash: Some("abc".into()),
        failed_config: None,
        body: serde_json::json!({"x": 1}).to_string(),
        at: T0 + 15,
    };
    store.record_heartbeats(&[beat]).await.expect("beat");
    let seen = |id| async move { store.get_agent(id).await.expect("get").expect("agent") };
    assert_eq!(seen(a).await.last_seen, Some(T0 + 10));
    let b = seen(b).await;
    assert_eq!(
        (b.last_seen, b.version.as_deref(), b.applied_config_hash.as_deref()),
        (Some(T0 + 20), Some("1.2.3"), Some("abc"))
    );
}

async fn stream_changes_name_every_agent_whose_stream_state_moved(h: &Harness) {
    let store = h.store();
    let (a, b) = (enroll(store, &[]).await, enroll(store, &[]).await);
    let changed = |since| async move {
        let mut got = store.stream_changes(since).await.expect("changes");
        got.sort_by_key(|c| c.agent_id);
        got
    };
    assert!(changed(T0 + 1).await.is_empty(), "enrolled at T0, unchanged since");
    store
        .create_batch(batch(TargetSpec::Agents(vec![a]), T0 + 10), &|_| audit_entry("command.create"))
        .await
        .expect("cmd");
    let after_append = changed(T0 + 10).await;
    assert_eq!(after_append.len(), 1);
    assert_eq!((after_append[0].agent_id, after_append[0].head_seq), (a, 1));
    store.revoke_agent(b, "gone", T0 + 20, audit_entry("agent.revoke")).await.expect("revoke");
    let after_revoke = changed(T0 + 20).await;
    assert_eq!(after_revoke.len(), 1);
    assert_eq!((after_revoke[0].agent_id, after_revoke[0].revoked_at), (b, Some(T0 + 20)));
    assert_eq!(after_revoke[0].revoke_reason.as_deref(), Some("gone"));
    assert_eq!(changed(T0 + 10).await.len(), 2);
}
