//! What the server keeps for itself: readiness, keys, job locks, nonces.

use tether_proto::AgentId;

use crate::harness::{Harness, conformance};

conformance!(
    a_fresh_store_is_ready,
    the_first_server_key_stored_wins_and_is_replaced_only_from_its_value,
    a_singleton_job_is_claimed_by_one_server_at_a_time,
    a_nonce_is_remembered_once_per_agent_until_it_expires,
);

async fn a_fresh_store_is_ready(h: &Harness) {
    h.store().check_ready().await.expect("migrated and reachable");
}

async fn the_first_server_key_stored_wins_and_is_replaced_only_from_its_value(h: &Harness) {
    let store = h.store();
    assert_eq!(store.server_key("jwt", b"first").await.expect("create"), b"first");
    let other = h.another_server().await;
    assert_eq!(other.server_key("jwt", b"second").await.expect("read"), b"first", "another server gets the stored one");
    assert!(!store.replace_server_key("jwt", b"stale", b"new").await.expect("cas"), "not from a stale value");
    assert!(store.replace_server_key("jwt", b"first", b"wrapped").await.expect("cas"));
    assert_eq!(other.server_key("jwt", b"x").await.expect("read"), b"wrapped");
    assert_eq!(store.server_key("material", b"m").await.expect("another name"), b"m");
}

async fn a_singleton_job_is_claimed_by_one_server_at_a_time(h: &Harness) {
    let store = h.store();
    let other = h.another_server().await;
    let mut lease = store.try_job_lock("sweeper").await.expect("claim").expect("the first claim is granted");
    assert!(lease.held().await);
    let second = other.try_job_lock("sweeper").await.expect("claim");
    if store.kind().shared() {
        assert!(second.is_none(), "another server must wait while the job is held");
        assert!(other.try_job_lock("retention").await.expect("claim").is_some(), "each job has its own claim");
        drop(lease);
        // The claim dies with its connection; the database notices at once or soon after.
        let mut taken = None;
        for _ in 0..100 {
            taken = other.try_job_lock("sweeper").await.expect("claim");
            if taken.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(taken.is_some(), "a released job is taken over");
    } else {
        // One embedded database has one server: every job is its own.
        assert!(second.is_some());
    }
}

async fn a_nonce_is_remembered_once_per_agent_until_it_expires(h: &Harness) {
    let store = h.store();
    let (a, b) = (AgentId::new(), AgentId::new());
    assert!(store.remember_nonce(a, "n1", 1_300).await.expect("first"));
    assert!(!store.remember_nonce(a, "n1", 1_300).await.expect("replay"), "a replay");
    let other = h.another_server().await;
    assert!(!other.remember_nonce(a, "n1", 1_300).await.expect("replay"), "a replay on another server too");
    assert!(store.remember_nonce(b, "n1", 1_300).await.expect("other agent"), "nonces are per agent");
    assert_eq!(store.prune_nonces(1_300).await.expect("prune"), 0, "not expired at 1300");
    assert_eq!(store.prune_nonces(1_301).await.expect("prune"), 2);
    assert!(store.remember_nonce(a, "n1", 1_700).await.expect("after expiry"));
}
