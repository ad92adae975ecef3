//! A server on PostgreSQL whose database goes away and comes back (through
//! a proxy the test cuts): 503 with `Retry-After` and a failing `/readyz`,
//! never a 500, never a lost acknowledged write, and recovery without a
//! restart.

use std::time::{Duration, Instant};

use base64::Engine;
use tether_client::Poll;
use tether_client::signing::{new_nonce, sign};
use tether_proto::ErrorKey;
use tether_proto::agent::EnrollRequest;
use tether_proto::command::{CreateCommand, Target};
use tether_proto::signing::{NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use tether_server::keys::MasterKey;
use tether_server::{Server, ServerConfig};
use tether_testkit::pg::TestDatabase;
use tether_testkit::proxy::Proxy;

use crate::common::{ADMIN_PASSWORD, TestApp, spawn_app_with, spawn_replica};

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

fn config_on(db: &TestDatabase, dir: &std::path::Path, master: Option<&str>) -> ServerConfig {
    let mut config = ServerConfig::new("127.0.0.1:0".parse().expect("addr"), dir.to_path_buf());
    config.database_url = Some(db.url.clone());
    config.master_key = master.map(|k| MasterKey::parse(k).expect("master key"));
    config
}

async fn stored_jwt_key(db: &TestDatabase) -> Vec<u8> {
    let pool = sqlx::PgPool::connect(&db.url).await.expect("connect");
    let value = sqlx::query_scalar("SELECT value FROM server_keys WHERE name = 'jwt'").fetch_one(&pool).await;
    pool.close().await;
    value.expect("the jwt key is in the database")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_key_is_shared_in_the_database_and_wrapped_by_the_master_key() {
    let test = "the_token_key_is_shared_in_the_database_and_wrapped_by_the_master_key";
    let Some(db) = TestDatabase::create(test).await else { return };
    let dirs = tempfile::tempdir().expect("dirs");
    let master = "11".repeat(32);
    // Started without a master key: stored as is, with a warning.
    let first = spawn_app_with(|c| c.database_url = Some(db.url.clone())).await;
    assert_eq!(stored_jwt_key(&db).await[0], 0, "stored unwrapped");
    // A replica with a master key wraps it in place and signs with the same key.
    let second = spawn_replica(&first, |c| {
        c.database_url = Some(db.url.clone());
        c.master_key = Some(MasterKey::parse(&master).expect("key"));
    })
    .await;
    let stored = stored_jwt_key(&db).await;
    assert_eq!((stored[0], stored.len()), (1, 1 + 24 + 32 + 16), "wrapped: version, nonce, sealed key, tag");
    let (on_first, _) = first.agent(&[]).await;
    let token = on_first.updates(None, 10, 0).await.map(|_| ());
    assert!(token.is_ok(), "the first replica accepts its own token");
    let req = EnrollRequest {
        enroll_token: first.enroll_token(crate::common::labels(&[]), 1).await,
        public_key: crate::common::public_key(),
        hostname: "h".into(),
        labels: Default::default(),
        facts: serde_json::json!({}),
    };
    let pair = first.anon().enroll(&req).await.expect("enroll on the first");
    let on_second = second.anon().with_bearer(pair.access_token);
    on_second.updates(None, 10, 0).await.expect("a token from the first replica verifies on the second");

    // Now wrapped: a server without the master key, or with another one, does not start.
    let missing = Server::start(config_on(&db, &dirs.path().join("a"), None), Some(ADMIN_PASSWORD.into())).await;
    let err = format!("{:#}", missing.expect_err("no master key"));
    assert!(err.contains("TETHER_MASTER_KEY"), "{err}");
    let wrong = "22".repeat(32);
    let other = Server::start(config_on(&db, &dirs.path().join("b"), Some(&wrong)), Some(ADMIN_PASSWORD.into())).await;
    let err = format!("{:#}", other.expect_err("another master key"));
    assert!(err.contains("does not open"), "{err}");
    first.stop().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_request_replayed_to_another_replica_is_refused() {
    let test = "a_signed_request_replayed_to_another_replica_is_refused";
    let Some(db) = TestDatabase::create(test).await else { return };
    let a = spawn_app_with(|c| c.database_url = Some(db.url.clone())).await;
    let b = spawn_replica(&a, |c| c.database_url = Some(db.url.clone())).await;
    let key = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let req = EnrollRequest {
        enroll_token: a.enroll_token(crate::common::labels(&[]), 1).await,
        public_key: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes()),
        hostname: "signer".into(),
        labels: Default::default(),
        facts: serde_json::json!({}),
    };
    let pair = a.anon().enroll(&req).await.expect("enroll");
    let target = "/api/v1/agents/self/heartbeat";
    let body = br#"{"uptime_s":1,"version":"t","running_commands":0,"queue_depth":0}"#;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    let headers = sign(&key, "POST", target, body, now, &new_nonce());
    let send = |app: &TestApp| {
        app.http()
            .post(app.url(target))
            .bearer_auth(&pair.access_token)
            .header(TIMESTAMP_HEADER, &headers.timestamp)
            .header(NONCE_HEADER, &headers.nonce)
            .header(SIGNATURE_HEADER, &headers.signature)
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
    };
    assert_eq!(send(&a).await.expect("send").status(), 200, "the original is accepted by a");
    let replay = send(&b).await.expect("send");
    assert_eq!(replay.status(), 401, "the replay to b is refused");
    let envelope: serde_json::Value = replay.json().await.expect("envelope");
    assert!(envelope["error"]["what"].as_str().unwrap_or_default().contains("replay"), "{envelope}");
    a.stop().await;
    b.stop().await;
}
