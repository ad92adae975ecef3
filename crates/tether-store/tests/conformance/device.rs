//! RFC 8628 device grants.

use tether_proto::{AgentId, Labels};
use tether_store::{AgentFilter, DevicePoll, DeviceRedeemed, NewDeviceGrant, NewGrantOutcome, RefreshOutcome, Store};

use crate::fixtures::{T0, audit_entry, grant, rand_hash, reuse_audit};
use crate::harness::{Harness, conformance};

conformance!(
    a_grant_is_pending_then_slowed_down_then_redeemed_once,
    a_repeated_redeeming_poll_within_the_grace_reissues_for_the_same_agent,
    a_repeated_redeeming_poll_after_the_grace_is_invalid,
    one_address_fills_only_its_own_share_of_pending_grants,
    pending_grants_are_capped_and_pruned_after_they_expire,
);

fn redeem_audit() -> impl Fn(&DeviceRedeemed) -> tether_store::AuditEntry + Send + Sync {
    |_| audit_entry("agent.enroll")
}

async fn poll(store: &dyn Store, code: [u8; 32], refresh: [u8; 32], now: i64) -> DevicePoll {
    store.poll_device_grant(code, AgentId::new(), refresh, 30_000, now, &redeem_audit()).await.expect("poll")
}

async fn a_grant_is_pending_then_slowed_down_then_redeemed_once(h: &Harness) {
    let store = h.store();
    let code = rand_hash();
    assert_eq!(store.create_device_grant(grant("BCDFGHJK", code, T0)).await.expect("create"), NewGrantOutcome::Created);
    assert!(matches!(poll(store, code, rand_hash(), T0).await, DevicePoll::Pending));
    assert!(matches!(poll(store, code, rand_hash(), T0 + 1_000).await, DevicePoll::SlowDown { interval_s: 10 }));
    assert!(matches!(poll(store, code, rand_hash(), T0 + 5_000).await, DevicePoll::SlowDown { interval_s: 15 }));
    let labels: Labels = crate::fixtures::labels(&[("site", "berlin")]);
    store
        .decide_device_grant("BCDFGHJK", true, &labels, "alice", T0 + 6_000, &|_| audit_entry("device.approve"))
        .await
        .expect("approve");
    let DevicePoll::Approved(redeemed) = poll(store, code, rand_hash(), T0 + 30_000).await else {
        panic!("approved and polled at the interval: redeemed");
    };
    assert_eq!((redeemed.agent.labels, redeemed.agent.hostname.as_str()), (labels, "printer-1"));
    assert!(matches!(poll(store, rand_hash(), rand_hash(), T0).await, DevicePoll::Invalid), "unknown code");
    let expired = rand_hash();
    store.create_device_grant(grant("BCDFGHJL", expired, T0)).await.expect("create");
    assert!(matches!(poll(store, expired, rand_hash(), T0 + 600_000).await, DevicePoll::Expired));
}

/// Creates and approves a grant, then redeems it with the first poll; returns
/// (device code hash, agent id, the refresh token hash issued).
async fn redeemed_grant(store: &dyn Store) -> ([u8; 32], AgentId, [u8; 32]) {
    let code = rand_hash();
    assert_eq!(store.create_device_grant(grant("BCDFGHJK", code, T0)).await.expect("create"), NewGrantOutcome::Created);
    store
        .decide_device_grant("BCDFGHJK", true, &Labels::new(), "alice", T0 + 1_000, &|_| audit_entry("device.approve"))
        .await
        .expect("approve");
    let issued = rand_hash();
    let DevicePoll::Approved(first) = poll(store, code, issued, T0 + 2_000).await else {
        panic!("an approved grant is redeemed by its first poll");
    };
    assert_eq!((first.approved_by.as_str(), first.user_code.as_str()), ("alice", "BCDFGHJK"));
    assert!(!first.lost_response_retry);
    (code, first.agent.id, issued)
}

async fn a_repeated_redeeming_poll_within_the_grace_reissues_for_the_same_agent(h: &Harness) {
    let store = h.store();
    let (code, agent, issued) = redeemed_grant(store).await;

    // The answer was lost: the same device code 30 s later gets a new token for the same agent.
    let again = rand_hash();
    let DevicePoll::Approved(retry) = poll(store, code, again, T0 + 32_000).await else {
        panic!("a retry within the grace is answered");
    };
    assert_eq!((retry.agent.id, retry.lost_response_retry, retry.approved_by.as_str()), (agent, true, "alice"));
    let agents = store.list_agents(&AgentFilter { limit: 10, ..Default::default() }).await.expect("list");
    assert_eq!(agents.len(), 1, "no second agent");
    // The new token works.
    let live = store.rotate_refresh_token(None, again, rand_hash(), 30_000, T0 + 33_000, reuse_audit()).await;
    assert_eq!(live.expect("rotate"), RefreshOutcome::Rotated { agent_id: agent, lost_response_retry: false });
    // Its token has been used now: a further repeat, even inside the grace, is refused.
    assert!(matches!(poll(store, code, rand_hash(), T0 + 34_000).await, DevicePoll::Invalid));
    // The token of the lost answer was revoked; presenting it is reuse.
    let dead = store.rotate_refresh_token(None, issued, rand_hash(), 30_000, T0 + 35_000, reuse_audit()).await;
    assert!(matches!(dead, Ok(RefreshOutcome::ReuseDetected { .. })), "{dead:?}");
}

async fn a_repeated_redeeming_poll_after_the_grace_is_invalid(h: &Harness) {
    let store = h.store();
    let (code, _agent, issued) = redeemed_grant(store).await;
    assert!(matches!(poll(store, code, rand_hash(), T0 + 32_001).await, DevicePoll::Invalid));
    // Nothing was revoked by the refused repeat.
    let live = store.rotate_refresh_token(None, issued, rand_hash(), 30_000, T0 + 33_000, reuse_audit()).await;
    assert!(matches!(live, Ok(RefreshOutcome::Rotated { lost_response_retry: false, .. })), "{live:?}");
}

async fn one_address_fills_only_its_own_share_of_pending_grants(h: &Harness) {
    let store = h.store();
    let from = |code: &str, ip: &str| NewDeviceGrant {
        max_pending_per_ip: 2,
        requested_ip: Some(ip.into()),
        ..grant(code, rand_hash(), T0)
    };
    assert_eq!(store.create_device_grant(from("BCDFGHJK", "192.0.2.1")).await.expect("1"), NewGrantOutcome::Created);
    assert_eq!(store.create_device_grant(from("BCDFGHJL", "192.0.2.1")).await.expect("2"), NewGrantOutcome::Created);
    assert_eq!(
        store.create_device_grant(from("BCDFGHJM", "192.0.2.1")).await.expect("3"),
        NewGrantOutcome::TooManyFromAddress
    );
    assert_eq!(store.create_device_grant(from("BCDFGHJM", "192.0.2.2")).await.expect("4"), NewGrantOutcome::Created);
    let unknown = NewDeviceGrant { requested_ip: None, ..from("BCDFGHJN", "") };
    assert_eq!(store.create_device_grant(unknown).await.expect("no address"), NewGrantOutcome::Created);
}

async fn pending_grants_are_capped_and_pruned_after_they_expire(h: &Harness) {
    let store = h.store();
    let capped = |code: &str, now| NewDeviceGrant { max_pending: 2, ..grant(code, rand_hash(), now) };
    assert_eq!(store.create_device_grant(capped("BCDFGHJK", T0)).await.expect("1"), NewGrantOutcome::Created);
    assert_eq!(store.create_device_grant(capped("BCDFGHJL", T0)).await.expect("2"), NewGrantOutcome::Created);
    assert_eq!(store.create_device_grant(capped("BCDFGHJM", T0)).await.expect("3"), NewGrantOutcome::TooManyPending);
    // A decided grant no longer counts as pending.
    store
        .decide_device_grant("BCDFGHJK", false, &Labels::new(), "alice", T0, &|_| audit_entry("device.approve"))
        .await
        .expect("deny");
    assert_eq!(store.create_device_grant(capped("BCDFGHJM", T0)).await.expect("4"), NewGrantOutcome::Created);
    // Nor does an expired one, before retention has deleted it.
    let later = T0 + 600_000;
    assert_eq!(store.create_device_grant(capped("BCDFGHJN", later)).await.expect("5"), NewGrantOutcome::Created);

    let info = store.pending_device_grant("BCDFGHJN", later).await.expect("lookup").expect("pending");
    assert_eq!(
        (info.hostname.as_str(), info.requested_ip.as_deref(), info.requested_at, info.public_key),
        ("printer-1", Some("192.0.2.7"), later, vec![7; 32])
    );
    assert_eq!(store.pending_device_grant("BCDFGHJK", later).await.expect("lookup"), None, "denied");
    assert_eq!(store.pending_device_grant("BCDFGHJL", later).await.expect("lookup"), None, "expired");

    assert_eq!(store.prune_device_grants(later).await.expect("prune"), 0, "expired at `later`, not before it");
    assert_eq!(store.prune_device_grants(later + 1).await.expect("prune"), 3);
    assert!(store.pending_device_grant("BCDFGHJN", later).await.expect("lookup").is_some(), "still live");
}
