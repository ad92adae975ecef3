//! TLS end to end: `tether server --tls-cert --tls-key` and `tether agent
//! --ca-file` as real processes, and the agent's plain-HTTP warning.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tether_client::Client;
use tether_proto::command::{CommandStatus, CreateCommand, Target};

use crate::common::{AgentProcess, ServerProcess, enroll_token, eventually, tether_bin};

const PLAIN_HTTP_WARNING: &str = "Talking plain HTTP to a non-loopback server";

/// A private CA and a server certificate it signed for `localhost` and
/// `127.0.0.1`, as PEM files in `dir`: (CA file, certificate, key).
fn private_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "tether e2e CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key")).expect("CA certificate");
    let key = KeyPair::generate().expect("server key");
    let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("params");
    let cert = params.signed_by(&key, &ca).expect("server certificate");
    std::fs::create_dir_all(dir).expect("pki dir");
    let paths = (dir.join("ca.pem"), dir.join("server.crt"), dir.join("server.key"));
    std::fs::write(&paths.0, ca.pem()).expect("write CA");
    std::fs::write(&paths.1, cert.pem()).expect("write certificate");
    std::fs::write(&paths.2, key.serialize_pem()).expect("write key");
    paths
}

/// `tether server --tls-cert --tls-key`, addressed by the name its certificate is for.
fn start_tls_server(data_dir: &Path, port: u16, cert: &Path, key: &Path) -> ServerProcess {
    let tls = ["--tls-cert".as_ref(), cert.as_os_str(), "--tls-key".as_ref(), key.as_os_str()];
    let mut server = ServerProcess::start_with(data_dir, port, &tls);
    server.base = format!("https://localhost:{}", server.port);
    server
}

async fn ping(admin: &Client, agent: tether_proto::AgentId) -> tether_proto::command::Command {
    let id =
        admin.create_command(&CreateCommand::new(Target::agents([agent]), "ping")).await.expect("create").command_ids
            [0];
    eventually(Duration::from_secs(30), || async {
        let cmd = admin.get_command(id).await.ok()?;
        cmd.status.is_terminal().then_some(cmd)
    })
    .await
    .expect("ping finished")
}

#[tokio::test]
async fn an_agent_with_ca_file_runs_ping_against_a_tls_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = private_ca(&dir.path().join("pki"));
    let server = start_tls_server(&dir.path().join("server"), 0, &cert, &key);
    assert_eq!(server.url, Some(format!("https://127.0.0.1:{}", server.port)), "the startup line names the https URL");
    let token = server.admin_token.clone().expect("first start prints an admin token");
    let pem = std::fs::read(&ca).expect("read CA");
    let admin = Client::builder(&server.base).ca_pem(pem).build().expect("client").with_bearer(token);

    let agent = AgentProcess::start_with(
        &dir.path().join("agent"),
        &server.base,
        Some(&enroll_token(&admin, &[]).await),
        None,
        &["--ca-file".as_ref(), ca.as_os_str()],
    );
    let cmd = ping(&admin, agent.agent_id()).await;
    assert_eq!(cmd.status, CommandStatus::Succeeded, "{cmd:?}\n{}", agent.log_text());
    assert!(!agent.log_text().contains(PLAIN_HTTP_WARNING), "{}", agent.log_text());

    // Without the CA the agent cannot enroll: it never trusts the unknown certificate.
    let stranger =
        AgentProcess::start(&dir.path().join("stranger"), &server.base, Some(&enroll_token(&admin, &[]).await), None);
    let refused =
        eventually(Duration::from_secs(15), || async { stranger.log_text().contains("certificate").then_some(()) })
            .await;
    assert!(refused.is_some(), "no certificate error in: {}", stranger.log_text());
    assert!(!stranger.dir.join("state/agent_id").exists(), "the agent must not enroll");

    // The operator CLI: --ca-file makes the same server reachable.
    let cli = |extra: &[&std::ffi::OsStr]| {
        Command::new(tether_bin())
            .args(["agents", "list", "-o", "json", "--server", &server.base])
            .args(extra)
            .env("TETHER_TOKEN", server.admin_token.as_deref().expect("token"))
            .env_remove("TETHER_CA_FILE")
            .env("HOME", dir.path())
            .output()
            .expect("run tether agents list")
    };
    let out = cli(&["--ca-file".as_ref(), ca.as_os_str()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&agent.agent_id().to_string()), "{stdout}");
    let out = cli(&[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("certificate"), "the CLI names the certificate problem: {stderr}");
}

#[tokio::test]
async fn the_agent_warns_once_when_it_talks_plain_http_to_a_non_loopback_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(&dir.path().join("server"), 0);
    let admin = server.admin_with(server.admin_token.as_deref().expect("token"));
    // 0.0.0.0 reaches this machine's listener but is not a loopback address,
    // so it stands in for a remote server without sending traffic anywhere.
    let remote = format!("http://0.0.0.0:{}", server.port);
    let agent = AgentProcess::start(&dir.path().join("agent"), &remote, Some(&enroll_token(&admin, &[]).await), None);
    let cmd = ping(&admin, agent.agent_id()).await;
    assert_eq!(cmd.status, CommandStatus::Succeeded, "{cmd:?}\n{}", agent.log_text());
    assert_eq!(agent.log_text().matches(PLAIN_HTTP_WARNING).count(), 1, "{}", agent.log_text());

    let local =
        AgentProcess::start(&dir.path().join("local"), &server.base, Some(&enroll_token(&admin, &[]).await), None);
    let cmd = ping(&admin, local.agent_id()).await;
    assert_eq!(cmd.status, CommandStatus::Succeeded);
    assert!(!local.log_text().contains(PLAIN_HTTP_WARNING), "loopback is fine: {}", local.log_text());
}

#[test]
fn a_certificate_without_its_key_stops_the_server_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, cert, _) = private_ca(&dir.path().join("pki"));
    let out = Command::new(tether_bin())
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--tls-cert")
        .arg(&cert)
        .output()
        .expect("run tether server");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--tls-key"), "{stderr}");

    let missing = dir.path().join("missing.key");
    let out = Command::new(tether_bin())
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&missing)
        .output()
        .expect("run tether server");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("reading TLS key {}", missing.display())), "{stderr}");
}
