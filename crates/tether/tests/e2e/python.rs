//! Interoperability: independent Python clients (authlib, PyJWT) against a real server.

use crate::common::ServerProcess;

#[test]
fn rfc8628_device_flow_with_authlib_and_pyjwt() {
    let Some(python) = std::env::var_os("TETHER_TEST_PYTHON") else {
        eprintln!(
            "skipping: TETHER_TEST_PYTHON is not set (.ci/run sets it after installing tests/python/requirements.txt)"
        );
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = ServerProcess::start(&data, 0);
    // A second server whose device codes expire after 1 s, for expired_token.
    let config = dir.path().join("short.toml");
    std::fs::write(&config, "device_code_ttl_s = 1\n").expect("config");
    let short = ServerProcess::start_with(&dir.path().join("short"), 0, &["--config".as_ref(), config.as_os_str()]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/python/device_flow.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(&server.base)
        .arg(server.admin_token.as_deref().expect("token"))
        .arg(data.join("keys/jwt.key"))
        .arg(&short.base)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "python device-flow client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("device flow OK"));
}
