//! `GET /metrics`: the Prometheus text format, the key series, and request
//! counts by route template.

use crate::common::spawn_app;

async fn scrape(app: &crate::common::TestApp) -> String {
    let res = app.http().get(app.url("/metrics")).send().await.expect("send");
    assert_eq!(res.status(), 200);
    let ctype = res.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "content-type {ctype}");
    res.text().await.expect("body")
}

/// The value of the sample whose line starts with `series` (name and labels
/// exactly as rendered), or 0 when absent.
fn sample(body: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            series.split('{').next() == Some(name)
                && labels.iter().all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, value)| value.parse::<f64>().expect("numeric sample"))
        .sum()
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_the_key_series() {
    let app = spawn_app().await;
    app.http().get(app.url("/healthz")).send().await.expect("healthz");
    let body = scrape(&app).await;
    for series in [
        "tether_build_info",
        "tether_http_requests_total",
        "tether_http_request_duration_seconds_bucket",
        "tether_parked_polls",
        "tether_agents",
        "tether_loaded_streams",
        "tether_open_connections",
        "tether_peers_connected",
        "tether_login_limiter_keys",
        "tether_events_from_peers_total",
        "tether_events_not_published_total",
        "tether_store_calls_total",
        "tether_password_verifications_total",
        "tether_password_cache_hits_total",
        "tether_password_checks_refused_busy_total",
    ] {
        assert!(body.lines().any(|l| l.starts_with(series)), "{series} missing from:\n{body}");
        assert!(body.contains(&format!("# HELP {}", series.trim_end_matches("_bucket"))), "{series} has no HELP");
    }
    assert_eq!(sample(&body, "tether_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    // At least the connection making this request is open.
    assert!(sample(&body, "tether_open_connections", &[]) >= 1.0);
    app.stop().await;
}

#[tokio::test]
async fn fleet_and_telemetry_series_move() {
    let app = spawn_app().await;
    let (agent, _) = app.agent(&[]).await;
    let before = scrape(&app).await;
    let beat = tether_proto::agent::Heartbeat { uptime_s: 1, version: "t".into(), ..Default::default() };
    agent.heartbeat(&beat).await.expect("heartbeat");
    let body = scrape(&app).await;
    assert_eq!(sample(&body, "tether_agents", &[("status", "online")]), 1.0, "{body}");
    let received = |b: &str| sample(b, "tether_heartbeats_received_total", &[]);
    assert!(received(&body) >= received(&before) + 1.0, "{body}");
    assert!(sample(&body, "tether_store_call_duration_seconds_count", &[]) > 0.0);
    app.stop().await;
}

#[tokio::test]
async fn request_counts_go_by_route_template_and_grow() {
    let app = spawn_app().await;
    let id = tether_proto::AgentId::new();
    let labels = [("route", "/api/v1/agents/{id}"), ("method", "GET"), ("status", "404")];
    let before = sample(&scrape(&app).await, "tether_http_requests_total", &labels);
    for _ in 0..3 {
        let res = app.http().get(app.url(&format!("/api/v1/agents/{id}"))).bearer_auth(&app.admin_token).send().await;
        assert_eq!(res.expect("send").status(), 404);
    }
    app.http().get(app.url("/no/such/route")).send().await.expect("send");
    let body = scrape(&app).await;
    assert_eq!(sample(&body, "tether_http_requests_total", &labels), before + 3.0);
    // The raw path never becomes a label.
    assert!(!body.contains(&id.to_string()));
    assert!(!body.contains("/no/such/route"));
    assert!(sample(&body, "tether_http_requests_total", &[("route", "unmatched"), ("status", "404")]) >= 1.0);
    assert!(
        sample(&body, "tether_http_request_duration_seconds_count", &[("route", "/api/v1/agents/{id}")]) >= 3.0,
        "{body}"
    );
    app.stop().await;
}

/// `promtool check metrics` accepts the body (lint included). Without
/// promtool the test skips, except under CI (`TETHER_CI`), where it fails.
#[tokio::test]
async fn promtool_accepts_the_metrics() {
    let found = std::process::Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var_os("TETHER_CI").is_none(), "promtool not found on PATH (TETHER_CI is set)");
        println!("SKIP: promtool not found");
        return;
    }
    let app = spawn_app().await;
    app.http().get(app.url("/healthz")).send().await.expect("healthz");
    let body = scrape(&app).await;
    app.stop().await;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool starts");
    {
        use std::io::Write;
        child.stdin.take().expect("stdin").write_all(body.as_bytes()).expect("write to promtool");
    }
    let out = child.wait_with_output().expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- body ---\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
