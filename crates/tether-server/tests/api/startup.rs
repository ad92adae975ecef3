//! What `Server::start` does on disk: private modes, the first admin's file.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tether_server::{BOOTSTRAP_TOKEN_TTL_MS, Server, ServerConfig};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn config(dir: &Path) -> ServerConfig {
    ServerConfig::new("127.0.0.1:0".parse().expect("addr"), dir.to_path_buf())
}

#[tokio::test]
async fn an_existing_data_dir_and_a_readable_jwt_key_are_made_private_at_start() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    // A data dir someone made by hand with the usual umask.
    std::fs::create_dir(&data).expect("mkdir");
    chmod(&data, 0o755);
    drop(Server::start(config(&data), Some("pw-one".into())).await.expect("first start"));
    assert_eq!(mode(&data), 0o700, "an existing data dir is set to 0700");
    assert_eq!(mode(&data.join("keys")), 0o700);
    assert_eq!(mode(&data.join("keys/jwt.key")), 0o600);

    // Loosened after the fact (a restore, a careless chmod -R).
    chmod(&data, 0o755);
    chmod(&data.join("keys"), 0o755);
    chmod(&data.join("keys/jwt.key"), 0o644);
    drop(Server::start(config(&data), None).await.expect("second start"));
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("keys")), 0o700);
    assert_eq!(mode(&data.join("keys/jwt.key")), 0o600, "a group/world-readable jwt.key is fixed at load");
}

fn field<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines().find_map(|l| l.strip_prefix(key)).unwrap_or_else(|| panic!("no {key} in:\n{text}"))
}

#[tokio::test]
async fn first_start_writes_the_admin_credentials_to_a_private_file_and_the_token_expires() {
    let tmp = tempfile::tempdir().expect("tmp");
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_millis() as i64;
    let (server, bootstrap) = Server::start(config(tmp.path()), None).await.expect("start");
    let file = tmp.path().join("initial-admin.txt");
    assert_eq!(bootstrap.file.as_deref(), Some(file.as_path()));
    assert_eq!(mode(&file), 0o600);
    let text = std::fs::read_to_string(&file).expect("read");
    assert!(text.contains("Delete this file after the first login"), "{text}");
    assert_eq!(field(&text, "user: "), "admin");
    assert_eq!(Some(field(&text, "password: ")), bootstrap.admin_password.as_deref(), "the generated password");
    assert_eq!(Some(field(&text, "api_token: ")), bootstrap.admin_token.as_deref());

    // The bootstrap token has a finite lifetime.
    let store = &server.state().store;
    let admin = store.find_user("admin").await.expect("find").expect("admin exists");
    let tokens = store.list_api_tokens(&admin.id).await.expect("tokens");
    assert_eq!(tokens.len(), 1);
    let expires_at = tokens[0].expires_at.expect("the bootstrap token expires");
    assert_eq!(Some(expires_at), bootstrap.admin_token_expires_at);
    assert_eq!(expires_at - tokens[0].created_at, BOOTSTRAP_TOKEN_TTL_MS);
    assert!(tokens[0].created_at >= before);
    drop(server);

    // A second start neither rewrites the file nor makes new credentials.
    std::fs::remove_file(&file).expect("the operator deletes it");
    let (_server, again) = Server::start(config(tmp.path()), None).await.expect("restart");
    assert!(again.admin_token.is_none() && again.file.is_none());
    assert!(!file.exists());
}

#[tokio::test]
async fn a_given_admin_password_is_not_written_to_the_file() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (_server, bootstrap) =
        Server::start(config(tmp.path()), Some("chosen-by-the-operator".into())).await.expect("start");
    let text = std::fs::read_to_string(tmp.path().join("initial-admin.txt")).expect("read");
    assert!(!text.contains("chosen-by-the-operator"), "{text}");
    assert!(field(&text, "password: ").contains("TETHER_ADMIN_PASSWORD"), "{text}");
    assert_eq!(Some(field(&text, "api_token: ")), bootstrap.admin_token.as_deref());
}
