//! The worker binary: it says where it listens, takes a configuration by
//! POST and fetches its `url` on `/hit`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[tokio::test]
async fn the_worker_fetches_the_url_it_was_configured_with() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_config-worker"))
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the worker");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
    let base = line.trim().strip_prefix("config-worker listening on ").expect("listening line").to_owned();
    let http = reqwest::Client::new();
    let before = http.get(format!("{base}/hit")).send().await.expect("hit");
    assert_eq!(before.status(), 503, "nothing configured yet");
    // The worker's own /config is a URL it can fetch.
    let config = serde_json::json!({"url": format!("{base}/config"), "other": 1});
    let posted = http.post(format!("{base}/config")).json(&config).send().await.expect("post");
    assert_eq!(posted.status(), 204);
    let hit = http.get(format!("{base}/hit")).send().await.expect("hit");
    assert_eq!(hit.status(), 200);
    assert_eq!(hit.json::<serde_json::Value>().await.expect("json"), config);
    let refused = http.post(format!("{base}/config")).json(&serde_json::json!([1])).send().await.expect("post");
    assert_eq!(refused.status(), 400);
    let _ = child.kill();
    let _ = child.wait();
}
