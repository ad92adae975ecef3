//! Concurrent calls from two servers sharing the database behave as if run
//! one after another (the store contract): no forked audit chain, no
//! double use, no cap exceeded.

use std::sync::Arc;

use futures::future::join_all;
use tether_proto::command::TargetSpec;
use tether_proto::{AgentId, Labels};
use tether_store::{AgentRecord, AuditEntry, NewDeviceGrant, NewGrantOutcome, RefreshOutcome, Store, verify_audit};

use crate::fixtures::{
    T0, audit_entry, batch, enroll, enroll_token, enroll_with, grant, new_agent, rand_hash, reuse_audit,
};
use crate::harness::{Harness, conformance};

conformance!(
    two_servers_appending_audit_rows_at_once_leave_one_chain,
    an_idempotency_key_used_at_once_by_two_servers_creates_one_batch,
    an_enroll_token_used_at_once_is_used_only_as_often_as_allowed,
    the_pending_grant_cap_holds_under_concurrent_requests,
    a_refresh_token_presented_twice_at_once_rotates_once,
    concurrent_batches_to_the_same_agents_keep_every_stream_gap_free,
);

/// Both servers' handles, each used by half the tasks.
async fn servers(h: &Harness) -> [Arc<dyn Store>; 2] {
    [h.store.clone(), h.another_server().await]
}

async fn two_servers_appending_audit_rows_at_once_leave_one_chain(h: &Harness) {
    let stores = servers(h).await;
    let appends = (0..60).map(|i| {
        let store = stores[i % 2].clone();
        async move {
            let entry = AuditEntry { details: serde_json::json!({"i": i}), ..audit_entry("concurrent") };
            store.append_audit(entry).await.expect("append");
        }
    });
    join_all(appends).await;
    let v = verify_audit(h.store()).await.expect("verify");
    assert_eq!((v.checked, v.broken_count), (60, 0), "{v:?}");
}

async fn an_idempotency_key_used_at_once_by_two_servers_creates_one_batch(h: &Harness) {
    let stores = servers(h).await;
    let agent = enroll(h.store(), &[]).await;
    let mut request = batch(TargetSpec::Agents(vec![agent]), T0);
    request.request.idempotency_key = Some("once".into());
    let creates = (0..8).map(|i| {
        let store = stores[i % 2].clone();
        let request = tether_store::NewBatch { id: tether_proto::BatchId::new(), ..request.clone() };
        async move { store.create_batch(request, &|_| audit_entry("command.create")).await.expect("create") }
    });
    let results = join_all(creates).await;
    assert_eq!(results.iter().filter(|r| r.created).count(), 1, "one creation");
    assert!(results.iter().all(|r| r.batch_id == results[0].batch_id), "every retry sees the same batch");
    assert_eq!(h.store().read_signals(agent, 0, 100).await.expect("signals").len(), 1);
}

async fn an_enroll_token_used_at_once_is_used_only_as_often_as_allowed(h: &Harness) {
    let stores = servers(h).await;
    let token_hash = rand_hash();
    h.store()
        .create_enroll_token(enroll_token(token_hash, Labels::new(), 3), T0, audit_entry("enroll_token.create"))
        .await
        .expect("token");
    let enrolls = (0..10).map(|i| {
        let store = stores[i % 2].clone();
        async move {
            let audit = |_: &AgentRecord| audit_entry("agent.enroll");
            store.enroll_agent(token_hash, new_agent(), rand_hash(), T0, &audit).await.is_ok()
        }
    });
    let ok = join_all(enrolls).await.into_iter().filter(|ok| *ok).count();
    assert_eq!(ok, 3);
    assert_eq!(h.store().list_enroll_tokens().await.expect("tokens")[0].used, 3);
}

async fn the_pending_grant_cap_holds_under_concurrent_requests(h: &Harness) {
    let stores = servers(h).await;
    let creates = (0..12).map(|i| {
        let store = stores[i % 2].clone();
        // Distinct user codes (8 letters from the RFC 8628 alphabet).
        let code: String = format!("BCDFGH{}{}", ["J", "K", "L"][i % 3], ["M", "N", "P", "Q"][i / 3]);
        let g = NewDeviceGrant {
            max_pending: 5,
            requested_ip: Some(format!("192.0.2.{i}")),
            ..grant(&code, rand_hash(), T0)
        };
        async move { store.create_device_grant(g).await.expect("create") }
    });
    let outcomes = join_all(creates).await;
    assert_eq!(outcomes.iter().filter(|o| **o == NewGrantOutcome::Created).count(), 5, "{outcomes:?}");
}

async fn a_refresh_token_presented_twice_at_once_rotates_once(h: &Harness) {
    let stores = servers(h).await;
    let first = rand_hash();
    let agent = enroll_with(h.store(), &[], first).await;
    let rotations = (0..2).map(|i| {
        let store = stores[i].clone();
        async move {
            store
                .rotate_refresh_token(Some(agent), first, rand_hash(), 30_000, T0 + 1, reuse_audit())
                .await
                .expect("rotate")
        }
    });
    let outcomes = join_all(rotations).await;
    // One rotates; the other finds it used, inside the grace, with an
    // untouched successor: a lost-response retry. Never two plain rotations.
    let plain =
        outcomes.iter().filter(|o| matches!(o, RefreshOutcome::Rotated { lost_response_retry: false, .. })).count();
    let retried =
        outcomes.iter().filter(|o| matches!(o, RefreshOutcome::Rotated { lost_response_retry: true, .. })).count();
    assert_eq!((plain, retried), (1, 1), "{outcomes:?}");
}

async fn concurrent_batches_to_the_same_agents_keep_every_stream_gap_free(h: &Harness) {
    let stores = servers(h).await;
    let mut agents: Vec<AgentId> = Vec::new();
    for _ in 0..4 {
        agents.push(enroll(h.store(), &[("fleet", "a")]).await);
    }
    let creates = (0..10).map(|i| {
        let store = stores[i % 2].clone();
        let target = TargetSpec::Labels(crate::fixtures::labels(&[("fleet", "a")]));
        async move { store.create_batch(batch(target, T0), &|_| audit_entry("command.create")).await.expect("create") }
    });
    join_all(creates).await;
    for agent in agents {
        let seqs: Vec<u64> =
            h.store().read_signals(agent, 0, 100).await.expect("read").iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (1..=10).collect::<Vec<u64>>(), "agent {agent}");
    }
    assert_eq!(verify_audit(h.store()).await.expect("verify").broken_count, 0);
}
