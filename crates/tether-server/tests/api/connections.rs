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
