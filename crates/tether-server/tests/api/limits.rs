//! Malformed, oversized and unexpected input: always the envelope, never a crash (protocol.md §2).

use std::io::Write;

use serde_json::json;
use tether_proto::{ErrorEnvelope, ErrorKey};

use crate::common::spawn_app;

async fn envelope(res: reqwest::Response) -> (u16, ErrorEnvelope) {
    let status = res.status().as_u16();
    let request_id = res.headers().get("x-request-id").map(|v| v.to_str().expect("ascii").to_owned());
    let body: ErrorEnvelope = res.json().await.expect("error envelope");
    assert_eq!(Some(body.error.request_id.clone()), request_id, "envelope carries the request id");
    (status, body)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(bytes).expect("gzip");
    enc.finish().expect("gzip")
}

#[tokio::test]
async fn oversized_bodies_and_gzip_bombs_get_413() {
    let app = spawn_app().await;
    let http = app.http();
    let big = json!({"labels": {}, "uses": 1, "pad": "x".repeat(2 * 1024 * 1024)}).to_string();
    let res = http
        .post(app.url("/api/v1/enroll-tokens"))
        .bearer_auth(&app.admin_token)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .expect("send");
    let (status, body) = envelope(res).await;
    assert_eq!((status, body.error.key()), (413, Some(ErrorKey::PayloadTooLarge)));

    // 64 MiB of zeros inside a JSON string, compressed to about 64 KiB.
    let mut bomb = b"{\"enroll_token\":\"".to_vec();
    bomb.extend(std::iter::repeat_n(b'0', 64 * 1024 * 1024));
    bomb.extend(b"\"}");
    let compressed = gzip(&bomb);
    assert!(compressed.len() < 1024 * 1024);
    let res = http
        .post(app.url("/api/v1/agents/enroll"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(compressed)
        .send()
        .await
        .expect("send");
    let (status, body) = envelope(res).await;
    assert_eq!((status, body.error.key()), (413, Some(ErrorKey::PayloadTooLarge)));

    // A small gzip body is accepted and decoded.
    let ok = gzip(json!({"labels": {"a": "b"}, "uses": 1}).to_string().as_bytes());
    let res = http
        .post(app.url("/api/v1/enroll-tokens"))
        .bearer_auth(&app.admin_token)
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(ok)
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 201);
    app.stop().await;
}

#[tokio::test]
async fn malformed_requests_get_the_envelope_with_the_right_status() {
    let app = spawn_app().await;
    let http = app.http();
    let post = |path: &str, ctype: &str, body: &'static str| {
        http.post(app.url(path)).bearer_auth(&app.admin_token).header("content-type", ctype.to_owned()).body(body)
    };
    let cases: Vec<(reqwest::RequestBuilder, u16, ErrorKey)> = vec![
        (post("/api/v1/commands", "application/json", "{not json"), 400, ErrorKey::BadRequest),
        (
            post("/api/v1/commands", "application/json", r#"{"target":{"all":true},"name":"ping","extra":1}"#),
            400,
            ErrorKey::BadRequest,
        ),
        (post("/api/v1/commands", "application/json", r#"{"target":{},"name":"ping"}"#), 400, ErrorKey::BadRequest),
        (
            post("/api/v1/commands", "application/json", r#"{"target":{"all":true},"name":"ping","priority":10}"#),
            400,
            ErrorKey::BadRequest,
        ),
        (post("/api/v1/commands", "text/plain", "hello"), 415, ErrorKey::UnsupportedMediaType),
        (
            post("/api/v1/commands", "application/json", "{}").header("content-encoding", "br-unknown"),
            415,
            ErrorKey::UnsupportedMediaType,
        ),
        (
            post("/api/v1/commands", "application/json", "{}").header("content-encoding", "gzip"),
            400,
            ErrorKey::BadRequest,
        ),
        (http.get(app.url("/api/v1/nothing-here")), 404, ErrorKey::NotFound),
        (http.delete(app.url("/api/v1/commands")).bearer_auth(&app.admin_token), 405, ErrorKey::MethodNotAllowed),
        (http.get(app.url("/api/v1/commands/not-a-uuid")).bearer_auth(&app.admin_token), 400, ErrorKey::BadRequest),
        (
            http.get(app.url(&format!("/api/v1/commands/{}", tether_proto::CommandId::new())))
                .bearer_auth(&app.admin_token),
            404,
            ErrorKey::NotFound,
        ),
        (http.get(app.url("/api/v1/commands?limit=501")).bearer_auth(&app.admin_token), 400, ErrorKey::BadRequest),
        (http.get(app.url("/api/v1/commands?limit=abc")).bearer_auth(&app.admin_token), 400, ErrorKey::BadRequest),
    ];
    for (i, (req, status, key)) in cases.into_iter().enumerate() {
        let (got, body) = envelope(req.send().await.expect("send")).await;
        assert_eq!((got, body.error.key()), (status, Some(key)), "case {i}: {:?}", body.error);
        assert_eq!(body.error.code, key.code());
    }
    app.stop().await;
}

#[tokio::test]
async fn request_ids_are_echoed_when_well_formed() {
    let app = spawn_app().await;
    let res = app.http().get(app.url("/healthz")).header("x-request-id", "client-req-123").send().await.expect("send");
    assert_eq!(res.headers()["x-request-id"], "client-req-123");
    let res = app.http().get(app.url("/healthz")).header("x-request-id", "bad id!").send().await.expect("send");
    assert_ne!(res.headers()["x-request-id"], "bad id!");
    app.stop().await;
}
