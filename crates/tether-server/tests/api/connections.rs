//! Slow and silent connections are cut (protocol.md §11 "Connections"),
//! with short configured limits; each test waits for the socket to close
//! under a generous bound instead of timing anything.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::spawn_app_with;

/// Reads until the server closes the connection (or resets it); `None` if
/// it is still open after 15 s.
async fn until_closed(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    match tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut got)).await {
        Ok(_) => Some(got),
        Err(_) => None,
    }
}

#[tokio::test]
async fn a_request_body_that_stalls_is_cut() {
    let app = spawn_app_with(|c| c.connections.body_stall = Duration::from_secs(1)).await;
    let mut stream = TcpStream::connect(app.addr).await.expect("connect");
    let head = "POST /api/v1/agents/enroll HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{";
    stream.write_all(head.as_bytes()).await.expect("send");
    let answer = until_closed(&mut stream).await.expect("a stalled body must not hold the connection");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 4"), "{text}");
    app.stop().await;
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_header_timeout() {
    let app = spawn_app_with(|c| c.connections.header = Duration::from_secs(1)).await;
    let mut silent = TcpStream::connect(app.addr).await.expect("connect");
    assert!(until_closed(&mut silent).await.is_some(), "a silent connection must be closed");
    // Headers that stop half way are cut the same way.
    let mut slow = TcpStream::connect(app.addr).await.expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost").await.expect("send");
    assert!(until_closed(&mut slow).await.is_some(), "unfinished headers must not hold the connection");
    let res = app.http().get(app.url("/healthz")).send().await.expect("healthz");
    assert!(res.status().is_success(), "normal requests are still served");
    app.stop().await;
}

#[tokio::test]
async fn beyond_the_connection_cap_a_new_connection_gets_503_then_service_resumes() {
    let app = spawn_app_with(|c| c.max_connections = Some(2)).await;
    let held = [
        TcpStream::connect(app.addr).await.expect("connect 1"),
        TcpStream::connect(app.addr).await.expect("connect 2"),
    ];
    let mut third = TcpStream::connect(app.addr).await.expect("connect 3");
    let answer = until_closed(&mut third).await.expect("the refused connection is closed");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 503 "), "{text}");
    assert!(text.to_ascii_lowercase().contains("\r\nretry-after: 1\r\n"), "{text}");
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    let body: serde_json::Value = serde_json::from_str(body).expect("envelope body");
    assert_eq!(body["error"]["key"], "SERVICE_UNAVAILABLE", "{body}");
    // A slot frees when a held connection closes; then requests are served again.
    drop(held);
    let mut served = None;
    for _ in 0..100 {
        let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("client");
        match http.get(app.url("/healthz")).send().await {
            Ok(res) if res.status().is_success() => {
                served = Some(res.status());
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(served.is_some(), "normal service resumes once a slot is free");
    app.stop().await;
}
