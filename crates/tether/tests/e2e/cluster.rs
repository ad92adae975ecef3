//! Several `tether server` processes on one PostgreSQL database, woken by
//! NATS (protocol.md §13): an agent on one replica gets what an operator
//! did on the other, with NATS and, through the database, without it.
//! NATS is reached through a proxy the test can cut; each test has its own
//! database and cluster name (subject prefix).

use std::ffi::OsString;
use std::time::{Duration, Instant};

use tether_client::{Client, Poll};
use tether_proto::ErrorKey;
use tether_proto::agent::EnrollRequest;
use tether_proto::command::{CreateCommand, Target};
use tether_testkit::pg::TestDatabase;
use tether_testkit::proxy::Proxy;

use crate::common::{ServerProcess, assert_reset_admin_works, enroll_token, eventually};

struct Cluster {
    a: ServerProcess,
    b: ServerProcess,
    /// An admin API token (the first admin's, from whichever replica made it).
    token: String,
    nats: Proxy,
    _db: TestDatabase,
    _dirs: tempfile::TempDir,
}

impl Cluster {
    /// Two replicas started at the same moment on an empty database.
    async fn start(test: &str) -> Option<Self> {
        let nats_url = tether_testkit::nats::server(test)?;
        let db = TestDatabase::create(test).await?;
        let (nats, proxied) = Proxy::for_url(&nats_url).await;
        let dirs = tempfile::tempdir().expect("dirs");
        let args: Vec<OsString> = vec![
            "--database-url".into(),
            db.url.clone().into(),
            "--nats-url".into(),
            proxied.into(),
            "--cluster".into(),
            tether_testkit::nats::unique_cluster().into(),
        ];
        let start = |name: &str| {
            let dir = dirs.path().join(name);
            let args = args.clone();
            tokio::task::spawn_blocking(move || {
                let refs: Vec<&std::ffi::OsStr> = args.iter().map(OsString::as_os_str).collect();
                ServerProcess::start_with(&dir, 0, &refs)
            })
        };
        let (a, b) = (start("a"), start("b"));
        let (a, b) = (a.await.expect("replica a"), b.await.expect("replica b"));
        let tokens: Vec<String> = [&a, &b].iter().filter_map(|s| s.admin_token.clone()).collect();
        assert_eq!(tokens.len(), 1, "exactly one replica creates the first admin");
        let token = tokens[0].clone();
        Some(Self { a, b, token, nats, _db: db, _dirs: dirs })
    }

    fn admin(&self, server: &ServerProcess) -> Client {
        server.admin_with(&self.token)
    }

    /// Enrolls an agent through replica A; returns a client for it on replica B.
    async fn agent_on_b(&self) -> (Client, tether_proto::AgentId) {
        let token = enroll_token(&self.admin(&self.a), &[]).await;
        let key = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
        let req = EnrollRequest {
            enroll_token: token,
            public_key: base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                key.verifying_key().as_bytes(),
            ),
            hostname: "replicated".into(),
            labels: Default::default(),
            facts: serde_json::json!({}),
        };
        let pair = Client::new(&self.a.base).expect("client").enroll(&req).await.expect("enroll on a");
        (Client::new(&self.b.base).expect("client").with_bearer(pair.access_token), pair.agent_id)
    }

    /// Starts a 30 s long-poll from `from` (the agent talks to replica B)
    /// and returns once B has it parked.
    async fn parked_poll_on_b(
        &self,
        agent: &Client,
        from: String,
    ) -> tokio::task::JoinHandle<tether_client::Result<Poll>> {
        let agent = agent.clone();
        let poll = tokio::spawn(async move { agent.updates(Some(&from), 100, 30).await });
        self.parked_on_b(1).await;
        poll
    }

    /// Waits (bounded) until replica B has `n` polls parked.
    async fn parked_on_b(&self, n: u64) {
        let admin = self.admin(&self.b);
        let parked = eventually(Duration::from_secs(10), || async {
            let m = admin.server_metrics().await.ok()?;
            (m["parked_polls"].as_u64()? >= n).then_some(())
        })
        .await;
        assert!(parked.is_some(), "the poll never parked on replica b");
    }

    /// Waits (bounded) until replica B says whether it reaches its peers.
    async fn b_connected(&self, connected: bool) {
        let admin = self.admin(&self.b);
        let seen = eventually(Duration::from_secs(20), || async {
            let m = admin.server_metrics().await.ok()?;
            (m["peers_connected"].as_bool()? == connected).then_some(())
        })
        .await;
        assert!(seen.is_some(), "replica b never became connected={connected}");
    }

    /// How many stream events replica B received from its peers over NATS.
    async fn events_from_peers_on_b(&self) -> u64 {
        let metrics = self.admin(&self.b).server_metrics().await.expect("metrics");
        metrics["events_from_peers"].as_u64().expect("events_from_peers")
    }

    async fn command_on_a(&self, agent: tether_proto::AgentId) {
        self.admin(&self.a)
            .create_command(&CreateCommand::new(Target::agents([agent]), "ping"))
            .await
            .expect("command");
    }
}

/// The cursor of an agent's stream now (its first poll answers at once).
async fn cursor(agent: &Client) -> String {
    match agent.updates(None, 100, 0).await.expect("poll") {
        Poll::Idle { cursor } => cursor,
        Poll::Signals(u) => u.cursor,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_created_on_one_replica_wakes_an_agent_polling_the_other_with_or_without_nats() {
    let test = "a_command_created_on_one_replica_wakes_an_agent_polling_the_other_with_or_without_nats";
    let Some(cluster) = Cluster::start(test).await else { return };
    cluster.b_connected(true).await;
    let (agent, id) = cluster.agent_on_b().await;

    // With NATS: the poll parked on B returns with the command, long before
    // its 30 s, and it was NATS that carried the new head to B.
    let heard = cluster.events_from_peers_on_b().await;
    let poll = cluster.parked_poll_on_b(&agent, cursor(&agent).await).await;
    let created = Instant::now();
    cluster.command_on_a(id).await;
    let Poll::Signals(got) = poll.await.expect("join").expect("poll") else {
        panic!("the poll on b waited out its 30 s: the command on a never woke it")
    };
    assert_eq!(got.signals[0].kind, "command.queued");
    eprintln!("woken through NATS after {:?}", created.elapsed());
    assert!(cluster.events_from_peers_on_b().await > heard, "replica b heard of the new head over NATS");

    // NATS goes away: B catches up from the database instead (every second).
    cluster.nats.cut();
    cluster.b_connected(false).await;
    let poll = cluster.parked_poll_on_b(&agent, got.cursor).await;
    let created = Instant::now();
    cluster.command_on_a(id).await;
    let Poll::Signals(got) = poll.await.expect("join").expect("poll") else {
        panic!("without NATS the poll on b waited out its 30 s: catching up from the database did not wake it")
    };
    eprintln!("woken by catching up from the database after {:?}", created.elapsed());

    // NATS is back: events flow again without restarting anything.
    cluster.nats.restore();
    cluster.b_connected(true).await;
    let poll = cluster.parked_poll_on_b(&agent, got.cursor).await;
    cluster.command_on_a(id).await;
    assert!(matches!(poll.await.expect("join").expect("poll"), Poll::Signals(_)), "woken again after NATS returned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_replica_stops_the_agent_on_the_other_within_a_second() {
    let test = "a_revocation_on_one_replica_stops_the_agent_on_the_other_within_a_second";
    let Some(cluster) = Cluster::start(test).await else { return };
    cluster.b_connected(true).await;
    let (agent, id) = cluster.agent_on_b().await;
    let from = cursor(&agent).await;
    let poll = tokio::spawn({
        let agent = agent.clone();
        async move {
            let result = agent.updates(Some(&from), 100, 30).await;
            (result, Instant::now())
        }
    });
    cluster.parked_on_b(1).await;
    cluster.admin(&cluster.a).revoke_agent(id, "stolen").await.expect("revoke on a");
    let revoked = Instant::now();
    let (result, ended) = poll.await.expect("join");
    let err = result.expect_err("the parked poll on b ends refused");
    assert_eq!(err.key(), Some(ErrorKey::DeviceRevoked), "{err:?}");
    let took = ended.saturating_duration_since(revoked);
    assert!(took < Duration::from_secs(1), "the revocation reached replica b after {took:?}");
    // Every further request on B is refused too.
    let err = agent.next_command(0).await.expect_err("refused");
    assert_eq!(err.key(), Some(ErrorKey::DeviceRevoked), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_writing_audit_rows_at_once_leave_one_verifiable_chain() {
    let test = "two_replicas_writing_audit_rows_at_once_leave_one_verifiable_chain";
    let Some(cluster) = Cluster::start(test).await else { return };
    let (a, b) = (cluster.admin(&cluster.a), cluster.admin(&cluster.b));
    // Enrollment tokens: each creation is an audited write (under the per-user limit).
    let writes = (0..40).map(|i| {
        let admin = if i % 2 == 0 { a.clone() } else { b.clone() };
        async move { enroll_token(&admin, &[]).await }
    });
    futures::future::join_all(writes).await;
    let verified = a.verify_audit().await.expect("verify");
    assert!(verified.ok && verified.broken_count == 0, "{verified:?}");
    assert!(verified.checked >= 41, "the bootstrap row and 40 writes: {verified:?}");
    assert_eq!(b.verify_audit().await.expect("verify on b").checked, verified.checked);
}

#[test]
fn an_unreachable_database_at_start_is_a_clear_error_without_the_password() {
    let dir = tempfile::tempdir().expect("dir");
    // Nothing listens on port 1.
    let url = "postgres://tether:s3cret-pw@127.0.0.1:1/tether";
    let out = std::process::Command::new(crate::common::tether_bin())
        .args(["server", "--listen", "127.0.0.1:0", "--database-url", url, "--data-dir"])
        .arg(dir.path())
        .env("TETHER_LOG", "warn")
        .output()
        .expect("run tether server");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exits non-zero; stderr: {stderr}");
    assert!(stderr.contains("postgres://tether:***@127.0.0.1:1/tether"), "names the URL: {stderr}");
    assert!(!stderr.contains("s3cret-pw"), "never the password: {stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("s3cret-pw"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_admin_sets_a_new_password_in_postgresql() {
    let Some(db) = TestDatabase::create("reset_admin_sets_a_new_password_in_postgresql").await else { return };
    let dir = tempfile::tempdir().expect("dir");
    let url = db.url.clone();
    let server = tokio::task::spawn_blocking(move || {
        ServerProcess::start_with(dir.path(), 0, &["--database-url".as_ref(), url.as_ref()])
    });
    let server = server.await.expect("server");
    assert_reset_admin_works(&server, &["--database-url", &db.url]).await;
}
