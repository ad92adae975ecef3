//! A server on PostgreSQL whose database goes away and comes back (through
//! a proxy the test cuts): 503 with `Retry-After` and a failing `/readyz`,
//! never a 500, never a lost acknowledged write, and recovery without a
//! restart.

use std::time::{Duration, Instant};

use tether_client::Poll;
use tether_proto::ErrorKey;
use tether_proto::command::{CreateCommand, Target};
use tether_testkit::pg::TestDatabase;
use tether_testkit::proxy::Proxy;

use crate::common::{TestApp, spawn_app_with};

async fn app_on(test: &str) -> Option<(TestApp, Proxy, TestDatabase)> {
    let db = TestDatabase::create(test).await?;
    let (proxy, url) = Proxy::for_url(&db.url).await;
    let app = spawn_app_with(|c| c.database_url = Some(url)).await;
    Some((app, proxy, db))
}

/// Waits (bounded: 20 s) until `/readyz` answers `status`.
async fn readyz_becomes(app: &TestApp, status: u16) -> reqwest::Response {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let res = app.http().get(app.url("/readyz")).send().await.expect("readyz");
        if res.status().as_u16() == status || Instant::now() > deadline {
            return res;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_goes_away_gets_503_and_no_acknowledged_write_is_lost() {
    let Some((app, proxy, _db)) = app_on("a_database_that_goes_away_gets_503_and_no_acknowledged_write_is_lost").await
    else {
        return;
    };
    let (agent, pair) = app.agent(&[]).await;
    let (bystander, _) = app.agent(&[]).await;
    assert_eq!(readyz_becomes(&app, 200).await.status(), 200);
    let Poll::Idle { cursor } = agent.updates(None, 10, 0).await.expect("poll") else {
        panic!("a new stream is empty")
    };
    let Poll::Idle { cursor: quiet } = bystander.updates(None, 10, 0).await.expect("poll") else { panic!("empty") };

    // Commands are created without pause while the database goes away and comes back.
    let writer = {
        let admin = app.admin.clone();
        let target = pair.agent_id;
        tokio::spawn(async move {
            let (mut acknowledged, mut statuses) = (Vec::new(), std::collections::BTreeMap::new());
            let until = Instant::now() + Duration::from_secs(12);
            while Instant::now() < until {
                match admin.create_command(&CreateCommand::new(Target::agents([target]), "ping")).await {
                    Ok(created) => {
                        acknowledged.extend(created.command_ids);
                        *statuses.entry(201).or_insert(0) += 1;
                    }
                    Err(e) => {
                        let status = e.status().unwrap_or(0);
                        if status == 503 {
                            assert!(e.retry_after().is_some(), "503 carries Retry-After: {e:?}");
                            assert_eq!(e.key(), Some(ErrorKey::ServiceUnavailable));
                        }
                        *statuses.entry(status).or_insert(0) += 1;
                    }
                }
                // Under the per-user limit (20/s): every answer is about the database.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (acknowledged, statuses)
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.cut();
    let not_ready = readyz_becomes(&app, 503).await;
    assert_eq!(not_ready.status(), 503, "/readyz fails while the database is away");
    assert!(not_ready.headers().contains_key("retry-after"));
    let body: serde_json::Value = not_ready.json().await.expect("envelope");
    assert_eq!(body["error"]["key"], "SERVICE_UNAVAILABLE", "{body}");
    // An agent the server holds in memory still gets its idle polls answered.
    let idle = bystander.updates(Some(&quiet), 10, 0).await.expect("an idle poll needs no database");
    assert!(matches!(idle, Poll::Idle { .. }), "{idle:?}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.restore();
    assert_eq!(readyz_becomes(&app, 200).await.status(), 200, "ready again without a restart");

    let (acknowledged, statuses) = writer.await.expect("writer");
    assert!(statuses.keys().all(|s| *s == 201 || *s == 503), "only 201 or 503, never a 500: {statuses:?}");
    assert!(statuses.get(&503).copied().unwrap_or(0) > 0, "the outage was seen: {statuses:?}");
    assert!(statuses.get(&201).copied().unwrap_or(0) > 0, "{statuses:?}");
    let query = tether_client::CommandQuery { agent_id: Some(pair.agent_id), limit: Some(500), ..Default::default() };
    let stored: std::collections::HashSet<_> =
        app.admin.list_commands(&query).await.expect("list").data.into_iter().map(|c| c.id).collect();
    for id in &acknowledged {
        assert!(stored.contains(id), "acknowledged command {id} is gone");
    }
    // And the agent receives what was acknowledged.
    let Poll::Signals(updates) = agent.updates(Some(&cursor), 100, 5).await.expect("poll") else {
        panic!("the acknowledged commands are in the stream")
    };
    assert!(!updates.signals.is_empty());
    app.stop().await;
}
