//! Users, API tokens, sessions and the first admin.

use tether_store::{FirstAdmin, Role, StoreError};

use crate::fixtures::{T0, audit_entry, rand_hash};
use crate::harness::{Harness, conformance};

conformance!(
    a_new_password_ends_the_users_password_sessions_but_not_tokens_made_by_tokens,
    the_first_admin_is_created_once_with_its_token_and_audit_row,
    a_taken_username_is_a_conflict,
);

async fn a_new_password_ends_the_users_password_sessions_but_not_tokens_made_by_tokens(h: &Harness) {
    let store = h.store();
    let user = store.create_user("u", "old", Role::Admin, T0, audit_entry("user.create")).await.expect("user");
    let token = |hash, from_password| {
        store.create_api_token(&user.id, "t", hash, None, from_password, T0, audit_entry("token.create"))
    };
    let (login, personal) = (rand_hash(), rand_hash());
    token(login, true).await.expect("login token");
    token(personal, false).await.expect("personal token");
    let cookie = rand_hash();
    store.create_session(cookie, &user.id, "csrf", T0 + 1000, T0, audit_entry("login.ok")).await.expect("session");
    store.set_password("u", "new", T0 + 1, audit_entry("user.reset_password")).await.expect("reset");
    assert!(store.find_api_token(login, T0 + 2).await.expect("find").is_none(), "the login token ended");
    assert!(store.find_session(cookie, T0 + 2).await.expect("find").is_none(), "the dashboard session ended");
    assert!(store.find_api_token(personal, T0 + 2).await.expect("find").is_some(), "a token made by a token stays");
    // The same through an update of the user.
    let again = rand_hash();
    token(again, true).await.expect("login token");
    store.update_user(&user.id, None, Some("newer"), T0 + 3, audit_entry("user.update")).await.expect("update");
    assert!(store.find_api_token(again, T0 + 4).await.expect("find").is_none());
    // A role change alone ends nothing.
    let third = rand_hash();
    token(third, true).await.expect("login token");
    store.update_user(&user.id, Some(Role::Operator), None, T0 + 5, audit_entry("user.update")).await.expect("update");
    assert!(store.find_api_token(third, T0 + 6).await.expect("find").is_some());
}

fn first_admin(token_hash: [u8; 32]) -> FirstAdmin {
    FirstAdmin {
        username: "admin".into(),
        password_hash: "phc".into(),
        token_hash,
        token_expires_at: T0 + 86_400_000,
        now: T0,
    }
}

async fn the_first_admin_is_created_once_with_its_token_and_audit_row(h: &Harness) {
    let store = h.store();
    let token = rand_hash();
    let admin = store.create_first_admin(first_admin(token), audit_entry("user.bootstrap")).await.expect("first");
    let admin = admin.expect("no users yet: created");
    assert_eq!((admin.username.as_str(), admin.role), ("admin", Role::Admin));
    let (owner, expires) = store.find_api_token(token, T0 + 1).await.expect("find").expect("its token works");
    assert_eq!((owner.id.as_str(), expires), (admin.id.as_str(), Some(T0 + 86_400_000)));
    let rows = store.list_audit(0, 10).await.expect("audit");
    assert_eq!((rows.len(), rows[0].target.as_str()), (1, admin.id.as_str()), "audited, aimed at the new user");
    let again = store.create_first_admin(first_admin(rand_hash()), audit_entry("user.bootstrap")).await.expect("again");
    assert!(again.is_none(), "users exist: nothing created");
    assert_eq!(store.list_users().await.expect("users").len(), 1);
}

async fn a_taken_username_is_a_conflict(h: &Harness) {
    let store = h.store();
    store.create_user("alice", "h", Role::Viewer, T0, audit_entry("user.create")).await.expect("first");
    let second = store.create_user("alice", "h", Role::Viewer, T0, audit_entry("user.create")).await;
    assert!(matches!(second, Err(StoreError::Conflict(_))), "{second:?}");
    assert_eq!(store.list_audit(0, 10).await.expect("audit").len(), 1, "the refused create left no audit row");
}
