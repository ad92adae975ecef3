//! Rate limits and brute force (protocol.md §11).

use std::time::Duration;

use tether_client::{Client, Credentials};
use tether_proto::ErrorKey;

use crate::common::{ADMIN_PASSWORD, TestApp, spawn_app};

fn basic_from(app: &TestApp, source: &str, user: &str, password: &str) -> Client {
    let http = reqwest::Client::builder().local_address(source.parse::<std::net::IpAddr>().ok()).build().expect("http");
    Client::with_http(http, &app.base)
        .expect("client")
        .with_credentials(Credentials::Basic { username: user.into(), password: password.into() })
}

#[tokio::test]
async fn brute_force_from_one_ip_is_stopped_while_other_ips_still_log_in() {
    let app = spawn_app().await;
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..20 {
        match basic_from(&app, "127.0.0.1", "admin", "wrong-password").list_agents(&Default::default()).await {
            Err(e) => {
                if e.status() == Some(429) {
                    retry_after = retry_after.or(e.retry_after());
                }
                statuses.push(e.status().unwrap_or(0));
            }
            Ok(_) => panic!("a wrong password was accepted"),
        }
    }
    assert_eq!(&statuses[..5], &[401; 5]);
    assert!(statuses[5..].iter().all(|s| *s == 429), "{statuses:?}");
    assert!(retry_after.is_some_and(|r| (1..=60).contains(&r)), "{retry_after:?}");
    // Even the right password is refused from that IP for now…
    let err = basic_from(&app, "127.0.0.1", "admin", ADMIN_PASSWORD)
        .list_agents(&Default::default())
        .await
        .expect_err("blocked");
    assert_eq!(err.key(), Some(ErrorKey::RateLimited));
    // …but works from another address.
    basic_from(&app, "127.0.0.2", "admin", ADMIN_PASSWORD).list_agents(&Default::default()).await.expect("other IP");
    app.stop().await;
}

#[tokio::test]
async fn unknown_users_get_exactly_the_answer_of_a_wrong_password() {
    let app = spawn_app().await;
    let strip = |e: tether_client::ClientError| match e {
        tether_client::ClientError::Api { status, body, .. } => (status, body.code, body.key, body.what, body.params),
        other => panic!("{other}"),
    };
    let unknown = basic_from(&app, "127.0.0.3", "nobody", "whatever-password")
        .list_agents(&Default::default())
        .await
        .expect_err("unknown");
    let wrong = basic_from(&app, "127.0.0.4", "admin", "whatever-password")
        .list_agents(&Default::default())
        .await
        .expect_err("wrong");
    assert_eq!(strip(unknown), strip(wrong));
    // Both were audited as failed logins.
    let rows = app.state.store.list_audit(0, 100).await.expect("audit");
    assert_eq!(rows.iter().filter(|r| r.action == "login.failed").count(), 2);
    app.stop().await;
}

#[tokio::test]
async fn immediate_polls_are_limited_but_waiting_polls_are_free() {
    let app = spawn_app().await;
    let (agent, _) = app.agent(&[]).await;
    let mut answers = Vec::new();
    for _ in 0..12 {
        answers.push(agent.updates(None, 20, 0).await.map(|_| 200).unwrap_or_else(|e| e.status().unwrap_or(0)));
    }
    // Ok(_) is recorded as 200; the burst is 10.
    assert_eq!(answers[..10], [200; 10]);
    assert_eq!(answers[10..], [429, 429]);
    let err = agent.updates(None, 20, 0).await.expect_err("over the burst");
    assert_eq!(err.key(), Some(ErrorKey::RateLimited));
    assert!(err.retry_after().is_some());
    let tether_client::ClientError::Api { body, .. } = &err else { panic!() };
    assert!(body.params.contains_key("allowed_rate") && body.params.contains_key("retry_after"));
    // A poll that waits costs nothing: after the bucket refills one token, waited polls keep working.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let cursor = match agent.updates(None, 20, 0).await.expect("refilled") {
        tether_client::Poll::Idle { cursor } => cursor,
        tether_client::Poll::Signals(u) => u.cursor,
    };
    for _ in 0..3 {
        agent.updates(Some(&cursor), 20, 1).await.expect("waiting polls are not charged");
    }
    app.stop().await;
}

#[tokio::test]
async fn one_refresh_family_in_a_loop_is_limited_without_touching_the_others() {
    let app = spawn_app().await;
    let (_, mut pair) = app.agent(&[]).await;
    let (_, other) = app.agent(&[]).await;
    let anon = app.anon();
    // Default: 1/s with a burst of 5 per family.
    for i in 0..5 {
        pair = anon.refresh(&pair.refresh_token, pair.agent_id).await.unwrap_or_else(|e| panic!("refresh {i}: {e}"));
    }
    let err = anon.refresh(&pair.refresh_token, pair.agent_id).await.expect_err("sixth refresh in a burst");
    assert_eq!(err.status(), Some(429));
    assert_eq!(err.key(), Some(ErrorKey::RateLimited));
    assert!(err.retry_after().is_some_and(|r| r >= 1), "{:?}", err.retry_after());
    // The limited token was not consumed: after the wait it still rotates.
    anon.refresh(&other.refresh_token, other.agent_id).await.expect("another family is unaffected");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    anon.refresh(&pair.refresh_token, pair.agent_id).await.expect("same token works once the bucket refills");

    // The OAuth form answers in RFC 6749 style, with the same 429 and Retry-After.
    let (_, third) = app.agent(&[]).await;
    let mut token = third.refresh_token;
    let mut last = None;
    for _ in 0..6 {
        let res = app
            .http()
            .post(app.url("/oauth/token"))
            .form(&[("grant_type", "refresh_token"), ("refresh_token", token.as_str())])
            .send()
            .await
            .expect("send");
        let status = res.status().as_u16();
        let retry_after = res.headers().get("retry-after").cloned();
        let body: serde_json::Value = res.json().await.expect("json");
        if status == 200 {
            token = body["refresh_token"].as_str().expect("refresh_token").to_owned();
        }
        last = Some((status, body, retry_after));
    }
    let (status, body, retry_after) = last.expect("six answers");
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"], "temporarily_unavailable");
    assert!(retry_after.is_some());
}
