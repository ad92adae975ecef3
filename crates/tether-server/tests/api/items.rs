//! Managed files and certificates over HTTP (protocol.md §7): uploads with
//! a size cap, assignments reaching exactly their agents, bad certificate
//! material refused with the field named, CSRs signed only for assigned
//! names, and private keys never stored in the clear.

use rcgen::{CertificateParams, KeyPair};
use tether_client::{Client, Poll};
use tether_proto::certs::{CertRenewed, CertRevoked, CertSource, IssueCert, ReplaceCert, UploadCert};
use tether_proto::command::Target;
use tether_proto::config::ApplyState;
use tether_proto::files::{AssignFile, FileRemoved, FileUpdated, ItemReport};
use tether_proto::signal::{CERT_RENEWED, CERT_REVOKED, FILE_REMOVED, FILE_UPDATED};

use crate::common::{TestApp, labels, spawn_app, spawn_app_with};

const DAY_MS: i64 = 86_400_000;

/// The signals waiting for an agent, from the start of its stream.
async fn signals(agent: &Client) -> Vec<(String, serde_json::Value)> {
    match agent.updates(None, 100, 0).await.expect("poll") {
        Poll::Signals(u) => u.signals.into_iter().map(|s| (s.kind, s.reference)).collect(),
        Poll::Idle { .. } => Vec::new(),
    }
}

async fn upload(app: &TestApp, bytes: &[u8]) -> String {
    let path = app.dir.path().join("upload.bin");
    std::fs::write(&path, bytes).expect("write");
    let file = tokio::fs::File::open(&path).await.expect("open");
    app.admin.upload_file(file, bytes.len() as u64).await.expect("upload").sha256
}

fn assign(sha256: &str, path: &str, target: Target) -> AssignFile {
    AssignFile { sha256: sha256.into(), path: path.into(), mode: 0o640, owner: None, group: None, hook: None, target }
}

#[tokio::test]
async fn a_file_over_the_cap_is_refused_before_it_is_stored() {
    let app = spawn_app_with(|c| c.max_file_bytes = 1024).await;
    // Declared too large: refused on the header.
    let res = app
        .http()
        .post(app.url("/api/v1/files"))
        .bearer_auth(&app.admin_token)
        .body(vec![b'x'; 2048])
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 413);
    let body: serde_json::Value = res.json().await.expect("envelope");
    assert_eq!(body["error"]["key"], "PAYLOAD_TOO_LARGE");
    // Undeclared (chunked) and too large: refused while streaming.
    let chunks = futures::stream::iter((0..4).map(|_| Ok::<_, std::io::Error>(vec![b'y'; 512])));
    let res = app
        .http()
        .post(app.url("/api/v1/files"))
        .bearer_auth(&app.admin_token)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 413);
    use sha2::Digest;
    for bytes in [vec![b'x'; 2048], vec![b'y'; 2048]] {
        let sha = hex::encode(sha2::Sha256::digest(&bytes));
        assert_eq!(app.state.store.blob_size(&sha).await.expect("store"), None, "nothing stored");
    }
    // Empty bodies and anonymous callers are refused too.
    let res = app.http().post(app.url("/api/v1/files")).bearer_auth(&app.admin_token).send().await.expect("send");
    assert_eq!(res.status(), 400);
    let res = app.http().post(app.url("/api/v1/files")).body("abc").send().await.expect("send");
    assert_eq!(res.status(), 401);
    // Under the cap: stored once, by its hash.
    let sha = upload(&app, b"hello").await;
    assert_eq!(sha, hex::encode(sha2::Sha256::digest(b"hello")));
    assert_eq!(app.state.store.blob_size(&sha).await.expect("store"), Some(5));
    app.stop().await;
}

#[tokio::test]
async fn a_file_reaches_exactly_its_agents_and_leaves_on_unassign() {
    let app = spawn_app().await;
    let (web, _) = app.agent(&[("role", "web")]).await;
    let (db, _) = app.agent(&[("role", "db")]).await;
    let content = vec![7u8; 300 * 1024]; // more than one stored chunk
    let sha = upload(&app, &content).await;

    // Content that was never uploaded, and a bad path, are refused.
    let missing = app.admin.assign_file(&assign(&"0".repeat(64), "/etc/x", Target::all())).await.expect_err("400");
    assert_eq!((missing.status(), missing.detail().contains("upload it first")), (Some(400), true));
    let bad = app.admin.assign_file(&assign(&sha, "/etc/../shadow", Target::all())).await.expect_err("400");
    assert_eq!(bad.status(), Some(400));

    let target = Target::labels(labels(&[("role", "web")]));
    let assigned = app.admin.assign_file(&assign(&sha, "/srv/app/data.bin", target.clone())).await.expect("assign");
    assert_eq!((assigned.assignment.version, assigned.agents_told), (1, 1));
    let id = assigned.assignment.id;

    let told = signals(&web).await;
    assert_eq!(told.len(), 1);
    assert_eq!(told[0].0, FILE_UPDATED);
    let updated: FileUpdated = serde_json::from_value(told[0].1.clone()).expect("ref");
    assert_eq!((updated.file_id, updated.sha256.as_str(), updated.mode), (id, sha.as_str(), 0o640));
    assert!(signals(&db).await.is_empty(), "the db agent is not targeted");

    let files = web.own_files().await.expect("own files");
    assert_eq!(files.len(), 1);
    assert_eq!((files[0].path.as_str(), files[0].size), ("/srv/app/data.bin", content.len() as u64));
    let body = web.download_file(&sha).await.expect("download").bytes().await.expect("body");
    assert_eq!(body.as_ref(), content.as_slice());
    assert!(db.own_files().await.expect("own files").is_empty());
    let refused = db.download_file(&sha).await.expect_err("not assigned to db");
    assert_eq!(refused.status(), Some(404));

    // Reports feed the fleet view.
    web.report_file(id, &ItemReport::applied(1)).await.expect("report");
    let status = app.admin.file_status(id).await.expect("status");
    assert_eq!((status.targeted, status.current, status.behind, status.failed), (1, 1, 0, 0));
    assert_eq!(status.agents[0].state, ApplyState::Applied);
    let not_mine = db.report_file(id, &ItemReport::applied(1)).await.expect_err("not targeted");
    assert_eq!(not_mine.status(), Some(404));

    // The same path and target again: an update, the version goes up.
    let sha2 = upload(&app, b"second").await;
    let again = app.admin.assign_file(&assign(&sha2, "/srv/app/data.bin", target)).await.expect("update");
    assert_eq!((again.assignment.id, again.assignment.version), (id, 2));
    let status = app.admin.file_status(id).await.expect("status");
    assert_eq!((status.current, status.behind), (0, 1));
    web.report_file(id, &ItemReport::failed(2, "sha256 mismatch".into())).await.expect("report");
    let status = app.admin.file_status(id).await.expect("status");
    assert_eq!((status.failed, status.errors[0].error.as_str()), (1, "sha256 mismatch"));

    let gone = app.admin.unassign_file(id).await.expect("unassign");
    assert_eq!(gone.agents_told, 1);
    let told = signals(&web).await;
    assert_eq!(told.last().map(|s| s.0.as_str()), Some(FILE_REMOVED));
    let removed: FileRemoved = serde_json::from_value(told.last().expect("signal").1.clone()).expect("ref");
    assert_eq!(removed, FileRemoved { file_id: id, path: "/srv/app/data.bin".into() });
    assert!(web.own_files().await.expect("own files").is_empty());
    assert!(app.admin.list_file_assignments().await.expect("list").is_empty());
    let again = app.admin.unassign_file(id).await.expect_err("already gone");
    assert_eq!(again.status(), Some(404));
    app.stop().await;
}

/// A self-signed certificate for `name` valid until `not_after_ms`, and its key.
fn self_signed(name: &str, not_after_ms: i64) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec![name.to_owned()]).expect("params");
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    params.not_after =
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(not_after_ms) * 1_000_000).expect("time");
    (params.self_signed(&key).expect("signs").pem(), key.serialize_pem())
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

fn upload_req(name: &str, cert: &str, key: &str, target: Target) -> UploadCert {
    UploadCert {
        name: name.into(),
        cert_pem: cert.into(),
        key_pem: key.into(),
        chain_pem: String::new(),
        target,
        group: None,
        hook: Some("reload".into()),
    }
}

fn assert_field(err: tether_client::ClientError, field: &str, says: &str) {
    assert_eq!(err.status(), Some(400), "{err}");
    let tether_client::ClientError::Api { body, .. } = &err else { panic!("{err:?}") };
    assert_eq!(body.params.get("field").and_then(|f| f.as_str()), Some(field), "{err}");
    assert!(body.what.contains(says), "{:?} should say {says:?}", body.what);
}

#[tokio::test]
async fn bad_certificate_uploads_name_the_problem_and_store_nothing() {
    let app = spawn_app().await;
    let (cert, key) = self_signed("web.example.com", now_ms() + 30 * DAY_MS);
    let (_, other_key) = self_signed("web.example.com", now_ms() + 30 * DAY_MS);
    let (expired, expired_key) = self_signed("old.example.com", now_ms() - DAY_MS);
    let cases = [
        (
            upload_req(
                "web",
                "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
                &key,
                Target::all(),
            ),
            "cert_pem",
            "PEM",
        ),
        (upload_req("web", &cert, "not a key", Target::all()), "key_pem", "private key"),
        (upload_req("web", &cert, &other_key, Target::all()), "key_pem", "does not match"),
        (upload_req("web", &expired, &expired_key, Target::all()), "cert_pem", "expired"),
        (upload_req("../web", &cert, &key, Target::all()), "name", "name"),
    ];
    for (req, field, says) in cases {
        assert_field(app.admin.upload_cert(&req).await.expect_err("refused"), field, says);
    }
    assert!(app.admin.list_certs().await.expect("list").is_empty());
    app.stop().await;
}

#[tokio::test]
async fn an_uploaded_certificate_is_served_replaced_revoked_and_sealed_at_rest() {
    let app = spawn_app().await;
    let (agent, _) = app.agent(&[("role", "web")]).await;
    let (cert, key) = self_signed("web.example.com", now_ms() + 10 * DAY_MS);
    let target = Target::labels(labels(&[("role", "web")]));
    let added = app.admin.upload_cert(&upload_req("web", &cert, &key, target)).await.expect("upload");
    assert_eq!((added.agents_told, added.cert.source), (1, CertSource::Uploaded));
    assert!(added.cert.expiring, "10 days is within the 14-day warning");
    let id = added.cert.id;
    let dup = app.admin.upload_cert(&upload_req("web", &cert, &key, Target::all())).await.expect_err("name in use");
    assert_eq!(dup.status(), Some(409));

    let told = signals(&agent).await;
    assert_eq!(told[0].0, CERT_RENEWED);
    let renewed: CertRenewed = serde_json::from_value(told[0].1.clone()).expect("ref");
    assert_eq!((renewed.cert_id, &renewed.serial), (id, &added.cert.serial));
    let material = agent.cert_material(id).await.expect("material");
    assert_eq!((material.cert_pem.as_str(), material.key_pem.as_str()), (cert.as_str(), key.as_str()));

    // The key's body is nowhere in the database files (WAL included).
    let body = pem_body(&key);
    for entry in std::fs::read_dir(app.dir.path()).expect("data dir") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            let bytes = std::fs::read(&path).expect("read");
            assert!(!contains(&bytes, body.as_bytes()), "key material in the clear in {}", path.display());
        }
    }

    // Replacement: new serial, holders told.
    let (cert2, key2) = self_signed("web.example.com", now_ms() + 90 * DAY_MS);
    let replaced = app
        .admin
        .replace_cert(id, &ReplaceCert { cert_pem: cert2.clone(), key_pem: key2, chain_pem: String::new() })
        .await
        .expect("replace");
    assert_eq!(replaced.cert.version, 2);
    assert!(!replaced.cert.expiring);
    assert_ne!(replaced.cert.serial, added.cert.serial);
    let told = signals(&agent).await;
    let last: CertRenewed = serde_json::from_value(told.last().expect("signal").1.clone()).expect("ref");
    assert_eq!(last.serial, replaced.cert.serial);
    let mismatched = ReplaceCert { cert_pem: cert2, key_pem: key, chain_pem: String::new() };
    assert_field(app.admin.replace_cert(id, &mismatched).await.expect_err("mismatch"), "key_pem", "does not match");

    // Reports carry the serial; the fleet view counts them.
    let mut report = ItemReport::applied(2);
    report.serial = replaced.cert.serial.clone();
    agent.report_cert(id, &report).await.expect("report");
    assert_eq!(app.admin.cert_status(id).await.expect("status").current, 1);

    let revoked = app.admin.revoke_cert(id).await.expect("revoke");
    assert!(revoked.cert.revoked_at.is_some());
    let told = signals(&agent).await;
    assert_eq!(told.last().map(|s| s.0.as_str()), Some(CERT_REVOKED));
    let gone: CertRevoked = serde_json::from_value(told.last().expect("signal").1.clone()).expect("ref");
    assert_eq!(gone.cert_id, id);
    assert!(agent.own_certs().await.expect("own").is_empty());
    assert_eq!(agent.cert_material(id).await.expect_err("revoked").status(), Some(404));
    app.stop().await;
}

fn pem_body(pem: &str) -> String {
    pem.lines().filter(|l| !l.starts_with("-----")).collect::<Vec<_>>().join("\n")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn csr(names: &[&str]) -> String {
    let key = KeyPair::generate().expect("key");
    let params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("params");
    params.serialize_request(&key).expect("csr").pem().expect("pem")
}

#[tokio::test]
async fn the_ca_signs_assigned_names_only_and_refusals_are_audited() {
    let app = spawn_app().await;
    let (agent, pair) = app.agent(&[("role", "api")]).await;
    let req = IssueCert {
        name: "api".into(),
        dns_names: vec!["api.internal".into()],
        ip_addresses: vec!["10.1.2.3".parse().expect("ip")],
        validity_days: 30,
        target: Target::labels(labels(&[("role", "api")])),
        group: None,
        hook: None,
    };
    let issued = app.admin.issue_cert(&req).await.expect("issue");
    let id = issued.cert.id;
    assert_eq!(issued.agents_told, 1);
    assert_eq!(agent.cert_material(id).await.expect_err("no material").status(), Some(400));

    let refused = agent.sign_csr(id, &csr(&["api.internal", "bank.example.com"])).await.expect_err("outside");
    assert_field(refused, "csr_pem", "bank.example.com");
    let audit = app.admin.list_audit(&Default::default()).await.expect("audit");
    let row = audit.data.iter().find(|r| r.action == "cert.csr_refused").expect("refusal audited");
    assert_eq!((row.actor.as_str(), row.outcome.as_str()), (pair.agent_id.to_string().as_str(), "denied"));
    assert_field(agent.sign_csr(id, "garbage").await.expect_err("bad csr"), "csr_pem", "CSR");

    let signed = agent.sign_csr(id, &csr(&["api.internal", "10.1.2.3"])).await.expect("signed");
    assert_eq!(signed.version, 1);
    let lifetime = signed.not_after - signed.not_before;
    assert!((lifetime - time::Duration::days(30)).whole_minutes().abs() <= 6, "{lifetime}");
    let cas = app.admin.list_cas().await.expect("cas");
    assert_eq!(cas.len(), 1);
    assert_eq!(signed.ca_pem.trim(), cas[0].cert_pem.trim());
    verify_signed_by(&signed.cert_pem, &cas[0].cert_pem);

    // A rotation: holders are told, the new CA signs, both are trusted.
    let rotated = app.admin.rotate_ca().await.expect("rotate");
    assert!(rotated.active);
    let told = signals(&agent).await;
    assert_eq!(told.last().map(|s| s.0.as_str()), Some(CERT_RENEWED));
    let again = agent.sign_csr(id, &csr(&["api.internal"])).await.expect("signed again");
    assert_eq!(again.version, 2, "the rotation raised the version");
    verify_signed_by(&again.cert_pem, &rotated.cert_pem);
    assert!(again.ca_pem.contains(rotated.cert_pem.trim()) && again.ca_pem.contains(cas[0].cert_pem.trim()));
    assert_eq!(app.admin.retire_cas().await.expect("retire")["retired"], 1);
    assert_eq!(app.admin.list_cas().await.expect("cas").len(), 1);
    app.stop().await;
}

fn verify_signed_by(cert_pem: &str, ca_pem: &str) {
    let (_, cert) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).expect("pem");
    let (_, ca) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes()).expect("ca pem");
    let cert = cert.parse_x509().expect("cert");
    let ca = ca.parse_x509().expect("ca");
    cert.verify_signature(Some(ca.public_key())).expect("signed by the CA");
}

#[tokio::test]
async fn expiring_certificates_are_announced_once() {
    let app = spawn_app_with(|c| c.cert_expiry_interval = std::time::Duration::from_millis(100)).await;
    let (cert, key) = self_signed("soon.example.com", now_ms() + 3 * DAY_MS);
    app.admin.upload_cert(&upload_req("soon", &cert, &key, Target::all())).await.expect("upload");
    let mut announced = 0;
    for _ in 0..100 {
        let audit = app.admin.list_audit(&Default::default()).await.expect("audit");
        announced = audit.data.iter().filter(|r| r.action == "cert.expiring").count();
        if announced > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(announced, 1);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let audit = app.admin.list_audit(&Default::default()).await.expect("audit");
    assert_eq!(audit.data.iter().filter(|r| r.action == "cert.expiring").count(), 1, "once per serial");
    app.stop().await;
}

#[tokio::test]
async fn certificate_keys_are_not_in_a_postgresql_dump() {
    let Some(db) = tether_testkit::pg::TestDatabase::create("certificate_keys_are_not_in_a_postgresql_dump").await
    else {
        return;
    };
    let url = db.url.clone();
    let app = spawn_app_with(|c| c.database_url = Some(url)).await;
    let (agent, _) = app.agent(&[]).await;
    let (cert, key) = self_signed("pg.example.com", now_ms() + 30 * DAY_MS);
    let id = app.admin.upload_cert(&upload_req("pg", &cert, &key, Target::all())).await.expect("upload").cert.id;
    assert_eq!(agent.cert_material(id).await.expect("material").key_pem, key, "the holder gets it back");
    let dump = std::process::Command::new("pg_dump").arg("--data-only").arg(&db.url).output().expect("run pg_dump");
    assert!(dump.status.success(), "pg_dump: {}", String::from_utf8_lossy(&dump.stderr));
    assert!(
        contains(&dump.stdout, cert.lines().nth(1).expect("a body line").as_bytes()),
        "the dump has the certificate"
    );
    assert!(!contains(&dump.stdout, pem_body(&key).as_bytes()), "key material in the clear in the dump");
    // Lines that only encode the public key also appear in the certificate:
    // every other line of the key must be absent.
    for line in pem_body(&key).lines().filter(|l| l.len() > 20 && !cert.contains(*l)) {
        assert!(!contains(&dump.stdout, line.as_bytes()), "a line of the key is in the dump");
    }
    app.stop().await;
}
