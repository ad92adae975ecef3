//! Graceful shutdown (protocol.md §11): SIGTERM with hundreds of parked
//! long-polls ends each with a 204 (or a clean close), the process exits
//! within 10 s, and every write acknowledged meanwhile is there after a
//! restart.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use futures::StreamExt;
use tether_client::{Client, Poll};
use tether_proto::Labels;
use tether_proto::agent::{CreateEnrollToken, EnrollRequest};
use tether_proto::command::{CreateCommand, Target};

use crate::common::{ServerProcess, eventually, signal};

const PARKED: usize = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_parked_polls_and_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = ServerProcess::start(dir.path(), 0);
    let admin = server.admin_with(&server.admin_token.clone().expect("admin token"));
    let enroll_token = admin
        .create_enroll_token(&CreateEnrollToken { labels: Labels::new(), uses: PARKED as u32, expires_in_s: 600 })
        .await
        .expect("enroll token")
        .token;
    let base = server.base.clone();
    let agents: Vec<_> = futures::stream::iter(0..PARKED)
        .map(|i| {
            let (base, enroll_token) = (base.clone(), enroll_token.clone());
            async move {
                let key = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
                let req = EnrollRequest {
                    enroll_token,
                    public_key: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes()),
                    hostname: format!("parked-{i}"),
                    labels: Labels::new(),
                    facts: serde_json::json!({}),
                };
                let pair = Client::new(&base).expect("client").enroll(&req).await.expect("enroll");
                (pair.agent_id, Client::new(&base).expect("client").with_bearer(pair.access_token))
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;

    // Each agent reads its stream to the head, then parks a 30 s poll.
    let mut polls = Vec::new();
    for (_, agent) in &agents {
        let cursor = match agent.updates(None, 100, 0).await.expect("first poll") {
            Poll::Signals(u) => u.cursor,
            Poll::Idle { cursor } => cursor,
        };
        let agent = agent.clone();
        polls.push(tokio::spawn(async move { agent.updates(Some(&cursor), 100, 30).await }));
    }
    let parked = eventually(Duration::from_secs(30), || async {
        let m = admin.server_metrics().await.ok()?;
        (m["parked_polls"].as_u64()? as usize >= PARKED).then_some(())
    })
    .await;
    assert!(parked.is_some(), "{PARKED} polls never parked");

    // Writes keep coming while the server stops; the acknowledged ones are kept.
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let (admin, acknowledged) = (admin.clone(), acknowledged.clone());
        let target = agents[0].0;
        tokio::spawn(async move {
            for _ in 0..2_000 {
                match admin.create_command(&CreateCommand::new(Target::agents([target]), "ping")).await {
                    Ok(created) => acknowledged.lock().unwrap().extend(created.command_ids),
                    Err(_) => break,
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = Instant::now();
    signal(&server.child, libc::SIGTERM);
    let status = tokio::task::spawn_blocking(move || {
        let status = server.child.wait().expect("wait");
        (status, server)
    });
    let (status, server) = status.await.expect("join");
    let took = stopping.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
    writer.await.expect("writer");

    let (mut idle, mut closed) = (0, 0);
    for (i, poll) in polls.into_iter().enumerate() {
        match poll.await.expect("join") {
            Ok(Poll::Idle { .. }) => idle += 1,
            // The commands written meanwhile go to the first agent.
            Ok(Poll::Signals(_)) if i == 0 => idle += 1,
            Ok(Poll::Signals(_)) => panic!("no signal was sent to agent {i}"),
            // The connection closed without an answer: clean, not an error status.
            Err(tether_client::ClientError::Http(_)) => closed += 1,
            Err(e) => panic!("a parked poll ended with {e}"),
        }
    }
    assert_eq!(idle + closed, PARKED);
    assert!(idle > 0, "parked polls are answered 204 on shutdown");

    // Restart: every acknowledged command is there.
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(!acknowledged.is_empty(), "some writes were acknowledged before the stop");
    let port = server.port;
    drop(server);
    let restarted = ServerProcess::start(dir.path(), port);
    let admin = restarted.basic_admin();
    let token = admin
        .create_api_token(&tether_proto::user::CreateApiToken { name: "check".into(), expires_in_s: Some(600) })
        .await
        .expect("token")
        .token;
    let admin = restarted.admin_with(&token);
    for id in acknowledged {
        // Hundreds of reads in a row meet the operator's rate limit: wait as told.
        loop {
            match admin.get_command(id).await {
                Ok(_) => break,
                Err(e) if e.key() == Some(tether_proto::ErrorKey::RateLimited) => {
                    tokio::time::sleep(Duration::from_secs(e.retry_after().unwrap_or(1))).await;
                }
                Err(e) => panic!("acknowledged command {id} lost: {e}"),
            }
        }
    }
}
