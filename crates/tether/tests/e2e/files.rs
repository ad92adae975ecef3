//! Managed files and certificates end to end (protocol.md §7): real server
//! and agent processes, driven with the operator CLI; files and keys checked
//! on disk, issued certificates with `openssl verify`, the database grepped
//! for key material.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tether_client::Client;

use crate::common::{AgentProcess, ServerProcess, cli, enroll_token, eventually, tether_bin};

/// An agent whose managed files may go under `<dir>/managed`, whose
/// certificates go to `<dir>/certs`, and whose `reload` action appends a
/// line to `<dir>/reload.log`.
async fn agent(dir: &Path, server: &ServerProcess, admin: &Client, role: &str) -> AgentProcess {
    let toml = format!(
        r#"
[files]
allowed_dirs = ["{managed}"]

[certs]
dir = "{certs}"

[actions.reload]
argv = ["sh", "-c", "echo reloaded >> {log}"]
"#,
        managed = dir.join("managed").display(),
        certs = dir.join("certs").display(),
        log = dir.join("reload.log").display(),
    );
    std::fs::create_dir_all(dir.join("managed")).expect("managed dir");
    AgentProcess::start(dir, &server.base, Some(&enroll_token(admin, &[("role", role)]).await), Some(&toml))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}

fn reloads(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("reload.log")).unwrap_or_default().lines().count()
}

/// `tether agent list-certs --json` of the daemon in `dir`.
fn agent_certs(dir: &Path) -> Vec<Value> {
    let out = std::process::Command::new(tether_bin())
        .args(["agent", "list-certs", "--json", "-c"])
        .arg(dir)
        .output()
        .expect("run tether agent list-certs");
    assert!(out.status.success(), "list-certs: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("json")
}

fn serial_of(dir: &Path, name: &str) -> Option<String> {
    agent_certs(dir).into_iter().find(|c| c["name"] == name).and_then(|c| c["serial"].as_str().map(str::to_owned))
}

/// Waits (30 s at most: one poll cycle) for `check` to hold.
async fn within_a_poll_cycle(what: &str, mut check: impl FnMut() -> bool) {
    let held = eventually(Duration::from_secs(30), || {
        let ok = check();
        async move { ok.then_some(()) }
    })
    .await;
    assert!(held.is_some(), "{what} within one poll cycle");
}

/// Every file under `dir`, read whole.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path, bytes));
        }
    }
    out
}

fn pem_body(pem: &str) -> String {
    pem.lines().filter(|l| !l.starts_with("-----")).collect::<Vec<_>>().join("\n")
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// A self-signed certificate for `web.example.com` valid for `days`, written
/// as `<stem>.crt` and `<stem>.key` under `dir`.
fn certificate(dir: &Path, stem: &str, days: i64) -> (PathBuf, PathBuf, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["web.example.com".to_owned()]).expect("params");
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(days);
    let cert = params.self_signed(&key).expect("signs");
    let (crt, key_path) = (dir.join(format!("{stem}.crt")), dir.join(format!("{stem}.key")));
    std::fs::write(&crt, cert.pem()).expect("write cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    (crt, key_path, key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread")]
async fn files_land_on_exactly_their_agents_and_a_bad_download_keeps_the_old_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(&dir.path().join("server"), 0);
    let token = server.admin_token.clone().expect("token");
    let admin = server.admin_with(&token);
    let (web_dir, db_dir) = (dir.path().join("web"), dir.path().join("db"));
    let web = agent(&web_dir, &server, &admin, "web").await;
    let db = agent(&db_dir, &server, &admin, "db").await;
    let (web_id, _) = (web.agent_id(), db.agent_id());

    let local = dir.path().join("app.conf");
    std::fs::write(&local, "listen = 8080\n").expect("write");
    let dest = web_dir.join("managed/etc/app.conf");
    let out = cli(
        &server,
        &token,
        &[
            "files",
            "push",
            local.to_str().expect("utf-8"),
            "--path",
            dest.to_str().expect("utf-8"),
            "--mode",
            "0640",
            "--label",
            "role=web",
            "--hook",
            "reload",
        ],
    );
    assert!(out.contains("to 1 agent(s)"), "{out}");
    within_a_poll_cycle("the web agent writes the file", || dest.exists()).await;
    assert_eq!(std::fs::read_to_string(&dest).expect("read"), "listen = 8080\n");
    assert_eq!(mode(&dest), 0o640);
    within_a_poll_cycle("the hook runs", || reloads(&web_dir) == 1).await;
    let id = admin.list_file_assignments().await.expect("list")[0].id;
    let status = eventually(Duration::from_secs(30), || async {
        let s = admin.file_status(id).await.ok()?;
        (s.current == 1).then_some(s)
    })
    .await
    .expect("the web agent reports it");
    assert_eq!(status.targeted, 1, "only the web agent is targeted");
    assert_eq!(status.agents[0].agent_id, web_id);
    // The db agent placed nothing.
    let db_manifest = std::fs::read_to_string(db_dir.join("state/files.json")).unwrap_or_default();
    assert!(!db_manifest.contains("app.conf"), "{db_manifest}");

    // New content whose stored bytes were tampered with: the agent refuses
    // it, keeps the old file and reports why.
    std::fs::write(&local, "listen = 9090\n").expect("write");
    let sha = admin.upload_file(tokio::fs::File::open(&local).await.expect("open"), 14).await.expect("upload").sha256;
    let db_file = server.data_dir.join("tether.db");
    let tampered = std::process::Command::new("sqlite3")
        .arg(&db_file)
        .arg(format!("UPDATE blob_chunks SET data = CAST('listen = 6666\n' AS BLOB) WHERE sha256 = '{sha}';"))
        .status()
        .expect("run sqlite3");
    assert!(tampered.success());
    cli(
        &server,
        &token,
        &[
            "files",
            "push",
            local.to_str().expect("utf-8"),
            "--path",
            dest.to_str().expect("utf-8"),
            "--mode",
            "0640",
            "--label",
            "role=web",
        ],
    );
    let failed = eventually(Duration::from_secs(30), || async {
        let s = admin.file_status(id).await.ok()?;
        (s.failed == 1).then_some(s)
    })
    .await
    .expect("the agent reports the mismatch");
    assert!(failed.errors[0].error.contains("sha256 mismatch"), "{:?}", failed.errors);
    assert_eq!(std::fs::read_to_string(&dest).expect("read"), "listen = 8080\n", "the old file stays");
    let text = cli(&server, &token, &["files", "status", &id.to_string()]);
    assert!(text.contains("sha256 mismatch"), "{text}");

    // A path outside the agent's allowed directories is refused and reported.
    let outside = dir.path().join("elsewhere/x.conf");
    cli(
        &server,
        &token,
        &[
            "files",
            "push",
            local.to_str().expect("utf-8"),
            "--path",
            outside.to_str().expect("utf-8"),
            "--agent",
            &web_id.to_string(),
        ],
    );
    let outside_id = admin.list_file_assignments().await.expect("list").iter().map(|a| a.id).max().expect("two");
    let refused = eventually(Duration::from_secs(30), || async {
        let s = admin.file_status(outside_id).await.ok()?;
        (s.failed == 1).then_some(s)
    })
    .await
    .expect("the agent refuses the path");
    assert!(refused.errors[0].error.contains("outside"), "{:?}", refused.errors);
    assert!(!outside.exists());

    // Unassigned: the agent removes the file it placed, nothing else.
    let keep = web_dir.join("managed/etc/keep.conf");
    std::fs::write(&keep, "mine").expect("write");
    let out = cli(&server, &token, &["files", "unassign", dest.to_str().expect("utf-8")]);
    assert!(out.contains("1 agent(s) told"), "{out}");
    within_a_poll_cycle("the file is removed", || !dest.exists()).await;
    assert!(keep.exists(), "a file the agent did not place stays");
}

#[tokio::test(flavor = "multi_thread")]
async fn certificates_install_replace_issue_and_revoke_on_real_agents() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(&dir.path().join("server"), 0);
    let token = server.admin_token.clone().expect("token");
    let admin = server.admin_with(&token);
    let (web_dir, db_dir) = (dir.path().join("web"), dir.path().join("db"));
    let web = agent(&web_dir, &server, &admin, "web").await;
    let db = agent(&db_dir, &server, &admin, "db").await;
    let _ = (web.agent_id(), db.agent_id());

    // Uploaded, expiring in 10 days: installed with a 0600 key, the hook
    // runs, and the list warns.
    let (crt, key, key_pem) = certificate(dir.path(), "v1", 10);
    let out = cli(
        &server,
        &token,
        &[
            "certs",
            "add",
            "web",
            "--cert",
            crt.to_str().expect("utf-8"),
            "--key",
            key.to_str().expect("utf-8"),
            "--label",
            "role=web",
            "--hook",
            "reload",
        ],
    );
    assert!(out.contains("1 agent(s) told"), "{out}");
    let installed = web_dir.join("certs/web");
    within_a_poll_cycle("the certificate is installed", || installed.join("key.pem").exists()).await;
    assert_eq!(mode(&installed.join("key.pem")), 0o600);
    assert_eq!(mode(&installed.join("cert.pem")), 0o644);
    assert_eq!(std::fs::read_to_string(installed.join("key.pem")).expect("key"), key_pem);
    within_a_poll_cycle("the reload hook runs", || reloads(&web_dir) == 1).await;
    assert!(!db_dir.join("certs/web").exists(), "the db agent is not targeted");
    let listed = cli(&server, &token, &["certs", "list"]);
    assert!(listed.contains("WARN: expires in"), "{listed}");

    // The key's body is nowhere in the server's data dir (database, WAL, keys).
    for (path, bytes) in files_under(&server.data_dir) {
        assert!(!contains(&bytes, &pem_body(&key_pem)), "key material in the clear in {}", path.display());
    }

    // Replaced: the holder has the new serial within one poll cycle.
    let (crt2, key2, _) = certificate(dir.path(), "v2", 90);
    cli(
        &server,
        &token,
        &["certs", "replace", "web", "--cert", crt2.to_str().expect("utf-8"), "--key", key2.to_str().expect("utf-8")],
    );
    let new_serial = admin.list_certs().await.expect("list")[0].serial.clone().expect("serial");
    within_a_poll_cycle("the new serial is installed", || serial_of(&web_dir, "web").as_deref() == Some(&new_serial))
        .await;
    assert_eq!(
        std::fs::read_to_string(installed.join("cert.pem")).expect("cert"),
        std::fs::read_to_string(&crt2).expect("crt2")
    );
    within_a_poll_cycle("the hook runs again", || reloads(&web_dir) == 2).await;

    // Issued by the server's CA: verifies with openssl; the key exists only on the agent.
    cli(
        &server,
        &token,
        &["certs", "issue", "api", "--dns", "api.internal", "--ip", "127.0.0.1", "--days", "30", "--label", "role=web"],
    );
    let issued = web_dir.join("certs/api");
    within_a_poll_cycle("the issued certificate is installed", || issued.join("cert.pem").exists()).await;
    let verify = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(issued.join("ca.pem"))
        .arg(issued.join("cert.pem"))
        .output()
        .expect("run openssl");
    assert!(verify.status.success(), "openssl verify: {}", String::from_utf8_lossy(&verify.stderr));
    let cas = admin.list_cas().await.expect("cas");
    assert_eq!(std::fs::read_to_string(issued.join("ca.pem")).expect("ca").trim(), cas[0].cert_pem.trim());
    assert_eq!(mode(&issued.join("key.pem")), 0o600);
    let agent_key = std::fs::read_to_string(issued.join("key.pem")).expect("key");
    for (path, bytes) in files_under(&server.data_dir) {
        assert!(!contains(&bytes, &pem_body(&agent_key)), "the agent's key reached {}", path.display());
    }

    // `tether agent renew` re-issues at once: a new serial and a new key.
    let before = serial_of(&web_dir, "api").expect("serial");
    let renewed = std::process::Command::new(tether_bin())
        .args(["agent", "renew", "api", "--json", "-c"])
        .arg(&web_dir)
        .output()
        .expect("run renew");
    assert!(renewed.status.success(), "renew: {}", String::from_utf8_lossy(&renewed.stderr));
    let answer: Value = serde_json::from_slice(&renewed.stdout).expect("json");
    assert_ne!(answer["serial"].as_str(), Some(before.as_str()), "{answer}");
    assert_eq!(serial_of(&web_dir, "api").as_deref(), answer["serial"].as_str());
    assert_ne!(std::fs::read_to_string(issued.join("key.pem")).expect("key"), agent_key);

    // A CA rotation: the holder gets a certificate from the new CA and
    // trusts both until the old one is retired.
    let rotated = admin.rotate_ca().await.expect("rotate");
    within_a_poll_cycle("the certificate comes from the new CA", || {
        std::fs::read_to_string(issued.join("ca.pem")).is_ok_and(|ca| ca.contains(rotated.cert_pem.trim()))
    })
    .await;
    let ca_bundle = std::fs::read_to_string(issued.join("ca.pem")).expect("ca");
    assert!(ca_bundle.contains(cas[0].cert_pem.trim()), "the old CA stays trusted during the overlap");
    let verify = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(issued.join("ca.pem"))
        .arg(issued.join("cert.pem"))
        .output()
        .expect("run openssl");
    assert!(verify.status.success(), "openssl verify after rotation: {}", String::from_utf8_lossy(&verify.stderr));

    // Revoked: removed everywhere.
    cli(&server, &token, &["certs", "revoke", "web"]);
    within_a_poll_cycle("the revoked certificate is removed", || !installed.join("key.pem").exists()).await;
    assert!(serial_of(&web_dir, "web").is_none());
    assert!(issued.join("key.pem").exists(), "the other certificate stays");
}
