//! The OpenAPI document against the real server: `tests/schemathesis/run`
//! (no 5xx, every response matches its documented schema).

use crate::common::tether_bin;

#[test]
fn schemathesis_finds_no_server_error_or_schema_violation() {
    let Some(python) = std::env::var_os("TETHER_TEST_PYTHON") else {
        eprintln!(
            "skipping: TETHER_TEST_PYTHON is not set (.ci/run sets it after installing tests/python/requirements.txt)"
        );
        return;
    };
    let schemathesis = std::path::Path::new(&python).with_file_name("schemathesis");
    if !schemathesis.is_file() {
        eprintln!(
            "skipping: {} does not exist (schemathesis is not in TETHER_TEST_PYTHON's venv)",
            schemathesis.display()
        );
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/schemathesis/run");
    let started = std::time::Instant::now();
    let out = std::process::Command::new(script)
        .arg(tether_bin())
        .env("SCHEMATHESIS", &schemathesis)
        .output()
        .expect("run tests/schemathesis/run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "schemathesis found problems:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("passed"), "{stdout}");
    eprintln!("schemathesis passed in {:?}", started.elapsed());
}
