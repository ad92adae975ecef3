//! The agent WebSocket (protocol.md §9): one connection carries the
//! stream's signals down and heartbeats, command status and results up,
//! each answered by a reply with the same id. [`Client::connect_ws`] opens
//! it with the credentials and signature an ordinary GET would carry;
//! errors come back as the same [`ClientError`]s the HTTP calls give, close
//! codes included, so a caller can treat both paths alike.
//!
//! One task per connection owns the socket: it reads every frame (so pings
//! are answered), matches replies to requests by id, and hands signals to
//! [`WsConnection::next`]. A signals frame the reader has not taken yet
//! stops the reading: the server's stream waits rather than the agent's
//! memory growing.

mod reconnect;
mod tls;

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
pub use reconnect::ReconnectPolicy;
use serde_json::Value;
use tether_proto::agent::Heartbeat;
use tether_proto::command::{CommandStatus, ResultReport, StatusReport};
use tether_proto::signal::Updates;
use tether_proto::ws::{AgentFrame, MAX_FRAME_BYTES, Reply, ServerFrame, close};
use tether_proto::{CommandId, ErrorBody, ErrorEnvelope};
pub(crate) use tls::Settings;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};

use crate::{Client, ClientError, Credentials, Result, signing};

/// TCP, TLS and the upgrade together must finish within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request without a reply by then fails (like an HTTP request's timeout).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// No frame at all, not even the server's ping (every 20 s), for this long:
/// the connection is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(tether_proto::ws::IDLE_TIMEOUT_S);
/// How long a close we start may take before the socket is just dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a WebSocket could not be opened or stopped working. Close codes that
/// mean something more (4401, 4403, 4409, 1008, 1009, 1013) and HTTP errors
/// at the upgrade are [`ClientError::Api`] instead, like their HTTP twins.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    /// No TCP connection (refused, unreachable, unknown name, timed out).
    #[error("connecting failed")]
    Connect(#[source] io::Error),
    /// TCP connected, TLS did not (certificate, protocol).
    #[error("TLS handshake failed")]
    Tls(#[source] io::Error),
    /// Connected, but the HTTP upgrade did not complete (reset, timeout, or
    /// an answer that is not a proper `101 Switching Protocols`).
    #[error("upgrade failed")]
    Upgrade(#[source] tungstenite::Error),
    /// The open connection failed underneath (I/O, framing).
    #[error("connection failed")]
    Broken(#[source] tungstenite::Error),
    /// The server closed with a code that only says "reconnect" (1000,
    /// 1001, an unknown one), or the connection ended without a close frame.
    #[error("closed by the server ({}): {reason}", close_code_text(*.code))]
    Closed { code: Option<u16>, reason: String },
    /// Nothing arrived, not even a ping, for [`IDLE_TIMEOUT`].
    #[error("no frame for {} s: the connection is dead", .0.as_secs())]
    Idle(Duration),
    /// A frame that does not parse, or one this side cannot encode.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The request is over the 1 MiB frame limit; it was not sent.
    #[error("a frame of {0} bytes is over the 1 MiB limit")]
    TooBig(usize),
    /// The reply did not come within [`REPLY_TIMEOUT`].
    #[error("no reply within {} s", .0.as_secs())]
    NoReply(Duration),
    /// The connection ended before the reply came, or had already ended.
    #[error("the connection ended")]
    Ended,
}

fn close_code_text(code: Option<u16>) -> String {
    code.map_or_else(|| "no close frame".to_owned(), |c| c.to_string())
}

/// The error a close frame stands for: an API error for the codes that mean
/// what an HTTP error means (so `classify` treats 4403 like DEVICE_REVOKED),
/// else [`WsError::Closed`].
pub fn close_error(code: Option<u16>, reason: &str) -> ClientError {
    let Some(key) = code.and_then(close::error_key) else {
        return WsError::Closed { code, reason: reason.to_owned() }.into();
    };
    let what =
        if reason.is_empty() { format!("websocket closed with {}", close_code_text(code)) } else { reason.into() };
    let mut params = serde_json::Map::new();
    params.insert("close_code".into(), code.into());
    if !reason.is_empty() {
        params.insert("reason".into(), reason.into());
    }
    let body = ErrorBody { code: key.code(), key: key.as_str().into(), what, params, request_id: String::new() };
    ClientError::Api { status: key.status(), body: Box::new(body), retry_after: None }
}

/// An error reply as the HTTP call would have failed: `Api` with the
/// status its key stands for and `params.retry_after` as `Retry-After`.
fn reply_error(body: ErrorBody) -> ClientError {
    let retry_after = body.params.get("retry_after").and_then(Value::as_u64);
    ClientError::Api { status: tether_proto::ws::error_status(&body), body: Box::new(body), retry_after }
}

/// The socket settings of every agent connection: 4 KiB buffers (a fleet's
/// worth of idle connections must stay cheap on both ends) and the 1 MiB
/// frame limit.
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(4 * 1024)
        // Must exceed write_buffer_size (tungstenite panics otherwise) and
        // hold one whole frame; it is a limit, not an allocation.
        .max_write_buffer_size(2 * MAX_FRAME_BYTES)
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES))
}

/// What the connection task is asked to do.
#[derive(Debug)]
enum Op {
    Send { id: u64, text: String, reply: oneshot::Sender<Result<Value>> },
    Close,
}

/// Sends agent frames over an open connection; cheap to clone, usable from
/// any task. Every call waits for its reply (at most [`REPLY_TIMEOUT`]) and
/// fails like the HTTP call would: an error reply is [`ClientError::Api`].
#[derive(Debug, Clone)]
pub struct WsHandle {
    ops: mpsc::Sender<Op>,
    ids: Arc<AtomicU64>,
}

impl WsHandle {
    /// False once the connection ended: calls would fail at once.
    pub fn is_open(&self) -> bool {
        !self.ops.is_closed()
    }

    /// `{"type":"heartbeat"}`, the body of `POST …/heartbeat`.
    pub async fn send_heartbeat(&self, beat: &Heartbeat) -> Result<Value> {
        let body = serde_json::to_value(beat).map_err(|e| WsError::Protocol(format!("encoding a heartbeat: {e}")))?;
        self.request(|id| AgentFrame::Heartbeat { id, body }).await
    }

    /// `{"type":"status"}`, the body of `POST …/commands/{id}/status`.
    pub async fn report_status(&self, command_id: CommandId, report: &StatusReport) -> Result<Value> {
        let body = report.clone();
        self.request(|id| AgentFrame::Status { id, command_id, body }).await
    }

    /// The command is running (what [`Client::report_running`] says over HTTP).
    pub async fn report_running(&self, command_id: CommandId) -> Result<Value> {
        self.report_status(command_id, &StatusReport { state: CommandStatus::Running }).await
    }

    /// `{"type":"result"}`, the body of `POST …/commands/{id}/result`.
    pub async fn report_result(&self, command_id: CommandId, report: &ResultReport) -> Result<Value> {
        let body = report.clone();
        self.request(|id| AgentFrame::Result { id, command_id, body }).await
    }

    async fn request(&self, frame: impl FnOnce(u64) -> AgentFrame) -> Result<Value> {
        let id = self.ids.fetch_add(1, Ordering::Relaxed) + 1;
        let text =
            serde_json::to_string(&frame(id)).map_err(|e| WsError::Protocol(format!("encoding a frame: {e}")))?;
        if text.len() > MAX_FRAME_BYTES {
            return Err(WsError::TooBig(text.len()).into());
        }
        let (reply, answer) = oneshot::channel();
        self.ops.send(Op::Send { id, text, reply }).await.map_err(|_| WsError::Ended)?;
        match tokio::time::timeout(REPLY_TIMEOUT, answer).await {
            Ok(Ok(result)) => result,
            // The connection task ended with this request unanswered.
            Ok(Err(_)) => Err(WsError::Ended.into()),
            Err(_) => Err(WsError::NoReply(REPLY_TIMEOUT).into()),
        }
    }
}

/// An open agent WebSocket. [`next`](Self::next) yields the signals frames
/// in order and finally why the connection ended; [`handle`](Self::handle)
/// sends reports. Dropping it closes the connection.
#[derive(Debug)]
pub struct WsConnection {
    handle: WsHandle,
    events: mpsc::Receiver<Result<Updates>>,
    ended: bool,
}

impl WsConnection {
    pub fn handle(&self) -> WsHandle {
        self.handle.clone()
    }

    /// The next signals frame (the backlog after the cursor first). An
    /// error is the end of the connection: a close code the server chose
    /// (as [`ClientError::Api`] when it means more than "reconnect"), a
    /// broken or silent connection. Every later call fails with
    /// [`WsError::Ended`]. Cancel-safe.
    pub async fn next(&mut self) -> Result<Updates> {
        if self.ended {
            return Err(WsError::Ended.into());
        }
        match self.events.recv().await {
            Some(Ok(updates)) => Ok(updates),
            Some(Err(e)) => {
                self.ended = true;
                Err(e)
            }
            None => {
                self.ended = true;
                Err(WsError::Ended.into())
            }
        }
    }

    /// Closes with 1000 and waits (briefly) for the server to agree.
    pub async fn close(mut self) {
        if self.handle.ops.send(Op::Close).await.is_ok() {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT + Duration::from_millis(500), async {
                while self.events.recv().await.is_some() {}
            })
            .await;
        }
    }
}

impl Client {
    /// Opens `GET /api/v1/agents/self/ws?cursor=` (protocol.md §9) with
    /// this client's credentials (and signature, when it signs): `wss` for
    /// an `https` server, through rustls with the same trusted roots as the
    /// HTTP calls. Within [`HANDSHAKE_TIMEOUT`] in all. A refusal before
    /// the upgrade is the [`ClientError::Api`] the envelope in its body
    /// says (401 TOKEN_EXPIRED, 409 CURSOR_EXPIRED, 429 …), or
    /// [`ClientError::Unexpected`] when the body is not one (a proxy).
    pub async fn connect_ws(&self, cursor: Option<&str>) -> Result<WsConnection> {
        let mut url = self.base.join(tether_proto::ws::PATH.trim_start_matches('/'))?;
        if let Some(c) = cursor {
            url.query_pairs_mut().append_pair("cursor", c);
        }
        let secure = match url.scheme() {
            "https" => true,
            "http" => false,
            other => return Err(WsError::Protocol(format!("cannot open a websocket to a {other}:// server")).into()),
        };
        let mut request = self.handshake_request(&url, secure)?;
        // Signed like the GET it replaces: same method, target and (empty) body.
        if let Some(key) = &self.signer
            && self.is_agent_route(&url)
        {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
            let h = signing::sign(key, "GET", &signing::path_and_query(&url), b"", now, &signing::new_nonce());
            let headers = request.headers_mut();
            for (name, value) in [
                (tether_proto::signing::TIMESTAMP_HEADER, h.timestamp),
                (tether_proto::signing::NONCE_HEADER, h.nonce),
                (tether_proto::signing::SIGNATURE_HEADER, h.signature),
            ] {
                let value = HeaderValue::from_str(&value).map_err(|e| WsError::Protocol(format!("{name}: {e}")))?;
                headers.insert(name, value);
            }
        }

        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let tls = if secure { Some(self.ws.tls_config().map_err(ClientError::Ca)?) } else { None };
        let host = url.host().ok_or_else(|| WsError::Protocol("the server URL has no host".into()))?;
        let port = url.port_or_known_default().unwrap_or(if secure { 443 } else { 80 });
        let io = match tokio::time::timeout_at(deadline, tls::connect(&host, port, tls)).await {
            Ok(Ok(io)) => io,
            Ok(Err((tls::Stage::Connect, e))) => return Err(WsError::Connect(e).into()),
            Ok(Err((tls::Stage::Tls, e))) => return Err(WsError::Tls(e).into()),
            Err(_) => return Err(WsError::Connect(timed_out("connecting")).into()),
        };
        let upgrade = tokio_tungstenite::client_async_with_config(request, io, Some(websocket_config()));
        let ws = match tokio::time::timeout_at(deadline, upgrade).await {
            Ok(Ok((ws, _response))) => ws,
            Ok(Err(tungstenite::Error::Http(response))) => return Err(handshake_error(&response)),
            Ok(Err(e)) => return Err(WsError::Upgrade(e).into()),
            Err(_) => return Err(WsError::Upgrade(tungstenite::Error::Io(timed_out("the upgrade"))).into()),
        };

        let (ops, ops_rx) = mpsc::channel(16);
        // Two frames in flight: enough to keep the reader busy, little
        // enough that a slow reader holds the server's stream back.
        let (events_tx, events) = mpsc::channel(2);
        tokio::spawn(async move {
            let end = drive(ws, ops_rx, &events_tx).await;
            let _ = events_tx.send(Err(end)).await;
        });
        Ok(WsConnection { handle: WsHandle { ops, ids: Arc::new(AtomicU64::new(0)) }, events, ended: false })
    }

    /// `wss://…` or `ws://…` with the headers an ordinary GET carries.
    fn handshake_request(&self, url: &url::Url, secure: bool) -> Result<tungstenite::handshake::client::Request> {
        let mut ws_url = url.clone();
        // http→ws and https→wss keep host, port and default port.
        let _ = ws_url.set_scheme(if secure { "wss" } else { "ws" });
        let mut request = ws_url.as_str().into_client_request().map_err(WsError::Upgrade)?;
        let bad = |e: tungstenite::http::header::InvalidHeaderValue| WsError::Protocol(format!("header: {e}"));
        let headers = request.headers_mut();
        headers.insert(header::USER_AGENT, HeaderValue::from_str(&self.ws.user_agent).map_err(bad)?);
        let authorization = match &self.credentials {
            Credentials::None => None,
            Credentials::Bearer(token) => Some(format!("Bearer {token}")),
            Credentials::Basic { username, password } => {
                use base64::Engine;
                let pair = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
                Some(format!("Basic {pair}"))
            }
        };
        if let Some(value) = authorization {
            let mut value = HeaderValue::from_str(&value).map_err(bad)?;
            value.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, value);
        }
        Ok(request)
    }
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what} took longer than {} s", HANDSHAKE_TIMEOUT.as_secs()))
}

/// A non-101 answer to the upgrade, as the same request over HTTP would
/// have failed: the envelope in its body when there is one.
fn handshake_error(response: &tungstenite::handshake::client::Response) -> ClientError {
    let status = response.status().as_u16();
    let retry_after =
        response.headers().get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok());
    // The body is what arrived with the head; small error bodies come whole.
    let raw = response.body().as_deref().unwrap_or_default();
    let chunked = response
        .headers()
        .get(header::TRANSFER_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked { dechunk(raw) } else { raw.to_vec() };
    let text = String::from_utf8_lossy(&body).into_owned();
    match serde_json::from_str::<ErrorEnvelope>(&text) {
        Ok(envelope) => ClientError::Api { status, body: Box::new(envelope.error), retry_after },
        Err(_) => ClientError::Unexpected { status, text },
    }
}

/// The data of a chunked body, as far as it arrived.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = raw.windows(2).position(|w| w == b"\r\n") else { return out };
        let size = std::str::from_utf8(&raw[..line_end])
            .ok()
            .and_then(|line| usize::from_str_radix(line.split(';').next().unwrap_or_default().trim(), 16).ok());
        let Some(size) = size.filter(|s| *s > 0) else { return out };
        raw = &raw[line_end + 2..];
        let take = size.min(raw.len());
        out.extend_from_slice(&raw[..take]);
        if take < size || raw.len() < size + 2 {
            return out;
        }
        raw = &raw[size + 2..];
    }
}

/// Runs one connection until it ends; answers why. Owns the request queue,
/// so handles fail at once (not after a timeout) from the moment it returns.
async fn drive(
    mut ws: WebSocketStream<tls::Io>,
    mut ops: mpsc::Receiver<Op>,
    events: &mpsc::Sender<Result<Updates>>,
) -> ClientError {
    let mut pending: HashMap<u64, oneshot::Sender<Result<Value>>> = HashMap::new();
    // A signals frame the reader has not taken: nothing more is read until it does.
    let mut held: Option<Updates> = None;
    let mut closed_with: Option<(Option<u16>, String)> = None;
    let mut deadline = Instant::now() + IDLE_TIMEOUT;
    loop {
        tokio::select! {
            permit = events.reserve(), if held.is_some() => {
                let Ok(permit) = permit else { return close_from_agent(&mut ws).await };
                if let Some(updates) = held.take() {
                    permit.send(Ok(updates));
                }
                // The silence while we were not reading is ours, not the server's.
                deadline = Instant::now() + IDLE_TIMEOUT;
            }
            message = ws.next(), if held.is_none() => {
                deadline = Instant::now() + IDLE_TIMEOUT;
                let message = match message {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        return match closed_with {
                            Some((code, reason)) => close_error(code, &reason),
                            None if matches!(e, tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                                WsError::Closed { code: None, reason: "the connection ended".into() }.into()
                            }
                            None => WsError::Broken(e).into(),
                        };
                    }
                    None => {
                        let (code, reason) = closed_with.unwrap_or((None, "the connection ended without a close frame".into()));
                        return close_error(code, &reason);
                    }
                };
                match message {
                    Message::Text(text) => match serde_json::from_str::<ServerFrame>(text.as_str()) {
                        Ok(ServerFrame::Signals(updates)) => match events.try_send(Ok(updates)) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(Ok(updates))) => held = Some(updates),
                            Err(_) => return close_from_agent(&mut ws).await,
                        },
                        Ok(ServerFrame::Reply(reply)) => answer(&mut pending, reply),
                        Ok(ServerFrame::Unknown) => {}
                        Err(e) => {
                            let why = format!("a server frame does not parse: {e}");
                            let frame = CloseFrame { code: CloseCode::Policy, reason: "bad frame".into() };
                            let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.close(Some(frame))).await;
                            return WsError::Protocol(why).into();
                        }
                    },
                    Message::Close(frame) => {
                        // tungstenite answers the close; the stream ends after that.
                        closed_with = Some(match frame {
                            Some(f) => (Some(u16::from(f.code)), f.reason.to_string()),
                            None => (None, "closed without a code".into()),
                        });
                        deadline = Instant::now() + CLOSE_TIMEOUT;
                    }
                    // Pings are answered by tungstenite; binary frames are not part of the protocol.
                    Message::Ping(_) | Message::Pong(_) | Message::Binary(_) | Message::Frame(_) => {}
                }
            }
            op = ops.recv() => match op {
                Some(Op::Send { id, text, reply }) => {
                    // Requests whose caller gave up waiting need no slot.
                    pending.retain(|_, waiting| !waiting.is_closed());
                    pending.insert(id, reply);
                    match tokio::time::timeout(REPLY_TIMEOUT, ws.send(Message::text(text))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return WsError::Broken(e).into(),
                        Err(_) => return WsError::Broken(tungstenite::Error::Io(timed_out("sending a frame"))).into(),
                    }
                }
                Some(Op::Close) | None => return close_from_agent(&mut ws).await,
            },
            () = tokio::time::sleep_until(deadline), if held.is_none() => {
                return match closed_with {
                    Some((code, reason)) => close_error(code, &reason),
                    None => WsError::Idle(IDLE_TIMEOUT).into(),
                };
            }
            () = events.closed(), if held.is_none() => return close_from_agent(&mut ws).await,
        }
    }
}

/// Hands a reply to the request waiting for it; one nobody waits for any
/// more (it timed out) is dropped.
fn answer(pending: &mut HashMap<u64, oneshot::Sender<Result<Value>>>, reply: Reply) {
    if let Some(waiting) = reply.id.and_then(|id| pending.remove(&id)) {
        let _ = waiting.send(reply.into_result().map_err(reply_error));
    }
}

/// Closes with 1000 (the agent is done with it), waiting briefly for the
/// server's close.
async fn close_from_agent(ws: &mut WebSocketStream<tls::Io>) -> ClientError {
    let frame = CloseFrame { code: CloseCode::Normal, reason: "agent closing".into() };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        if ws.close(Some(frame)).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
    WsError::Closed { code: Some(close::NORMAL), reason: "closed by the agent".into() }.into()
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use serde_json::json;
    use tether_proto::ErrorKey;
    use tether_proto::ws::Reply;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

    use super::*;

    type ServerWs = WebSocketStream<TcpStream>;

    /// The request head the fake server saw.
    #[derive(Debug, Clone, Default)]
    struct Seen {
        target: String,
        headers: Vec<(String, String)>,
    }

    impl Seen {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
        }
    }

    /// A one-connection WebSocket server running `serve`; answers its base
    /// URL and what the upgrade request carried.
    async fn fake_server<F, Fut>(serve: F) -> (String, Arc<Mutex<Seen>>)
    where
        F: FnOnce(ServerWs) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let record = seen.clone();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            #[expect(clippy::result_large_err, reason = "the signature tungstenite asks for")]
            let callback = move |req: &Request, res: Response| {
                let target = req.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
                let headers = req
                    .headers()
                    .iter()
                    .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap_or_default().to_owned()))
                    .collect();
                *record.lock().expect("lock") = Seen { target, headers };
                Ok(res)
            };
            let ws = tokio_tungstenite::accept_hdr_async_with_config(tcp, callback, Some(websocket_config()))
                .await
                .expect("server handshake");
            serve(ws).await;
        });
        (base, seen)
    }

    /// A server that answers the upgrade with this raw HTTP response.
    async fn refusing_server(response: String) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.expect("accept");
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if tcp.read(&mut byte).await.expect("read") == 0 {
                    return;
                }
                head.push(byte[0]);
            }
            tcp.write_all(response.as_bytes()).await.expect("write");
            let _ = tcp.shutdown().await;
        });
        base
    }

    async fn recv_frame(ws: &mut ServerWs) -> serde_json::Value {
        loop {
            match ws.next().await.expect("a frame").expect("read") {
                Message::Text(t) => return serde_json::from_str(t.as_str()).expect("json"),
                Message::Close(_) => panic!("closed"),
                _ => {}
            }
        }
    }

    async fn send_json(ws: &mut ServerWs, value: serde_json::Value) {
        ws.send(Message::text(value.to_string())).await.expect("send");
    }

    fn envelope(code: u32, key: &str, what: &str, params: serde_json::Value) -> String {
        json!({"error": {"code": code, "key": key, "what": what, "params": params, "request_id": "req_test1234"}})
            .to_string()
    }

    fn http_response(status: &str, extra_headers: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra_headers}\r\n{body}",
            body.len()
        )
    }

    fn updates(cursor: &str, n: usize) -> serde_json::Value {
        let signals: Vec<_> =
            (0..n).map(|i| json!({"type": "config.updated", "ts_ms": i, "ref": {"version": i}})).collect();
        json!({"type": "signals", "cursor": cursor, "signals": signals})
    }

    #[tokio::test]
    async fn the_upgrade_carries_cursor_credentials_and_a_valid_signature() {
        let (base, seen) = fake_server(|mut ws| async move {
            send_json(&mut ws, updates("1-0", 0)).await;
            let _ = ws.next().await;
        })
        .await;
        let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let client = Client::builder(&base)
            .user_agent("tether-agent/test")
            .build()
            .expect("client")
            .with_bearer("jwt-token")
            .with_signing_key(key.clone());
        let mut conn = client.connect_ws(Some("3-41")).await.expect("connect");
        assert_eq!(conn.next().await.expect("signals").cursor, "1-0");
        let seen = seen.lock().expect("lock").clone();
        assert_eq!(seen.target, "/api/v1/agents/self/ws?cursor=3-41");
        assert_eq!(seen.header("authorization"), Some("Bearer jwt-token"));
        assert_eq!(seen.header("user-agent"), Some("tether-agent/test"));
        // Exactly what the server checks for a GET of this target (protocol.md §3).
        let ts: u64 = seen.header("x-tether-timestamp").expect("timestamp").parse().expect("digits");
        let nonce = seen.header("x-tether-nonce").expect("nonce");
        assert!(tether_proto::signing::valid_nonce(nonce));
        let input =
            tether_proto::signing::signing_input("GET", &seen.target, ts, nonce, &signing::body_digest_hex(b""));
        use base64::Engine;
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(seen.header("x-tether-signature").expect("signature"))
            .expect("base64url");
        let sig = ed25519_dalek::Signature::from_slice(&sig).expect("64 bytes");
        key.verifying_key().verify_strict(input.as_bytes(), &sig).expect("the signature verifies");
        conn.close().await;
    }

    #[tokio::test]
    async fn no_cursor_means_no_query_and_no_signature_without_a_key() {
        let (base, seen) = fake_server(|mut ws| async move {
            let _ = ws.next().await;
        })
        .await;
        let client = Client::new(&base).expect("client").with_bearer("t");
        let conn = client.connect_ws(None).await.expect("connect");
        let seen = seen.lock().expect("lock").clone();
        assert_eq!(seen.target, "/api/v1/agents/self/ws");
        assert_eq!(seen.header("x-tether-signature"), None);
        assert!(seen.header("user-agent").is_some_and(|ua| ua.starts_with("tether-client/")));
        drop(conn);
    }

    #[tokio::test]
    async fn signals_and_replies_round_trip_and_replies_find_their_request_by_id() {
        let (base, _) = fake_server(|mut ws| async move {
            send_json(&mut ws, updates("1-2", 2)).await;
            // Two requests, answered in the opposite order.
            let first = recv_frame(&mut ws).await;
            let second = recv_frame(&mut ws).await;
            assert_ne!(first["id"], second["id"], "ids are unique per connection");
            for frame in [&second, &first] {
                let data = json!({"echo": frame["type"], "command_id": frame["command_id"], "body": frame["body"]});
                let id = frame["id"].as_u64().expect("id");
                send_json(&mut ws, serde_json::to_value(ServerFrame::Reply(Reply::ok(id, data))).expect("json")).await;
            }
            send_json(&mut ws, updates("1-3", 1)).await;
            let _ = ws.next().await;
        })
        .await;
        let mut conn = Client::new(&base).expect("client").connect_ws(None).await.expect("connect");
        let first = conn.next().await.expect("backlog");
        assert_eq!((first.cursor.as_str(), first.signals.len()), ("1-2", 2));
        assert_eq!(first.signals[1].kind, "config.updated");

        let handle = conn.handle();
        let beat = Heartbeat {
            uptime_s: 5,
            version: "1.2.3".into(),
            applied_config_hash: None,
            config_status: None,
            running_commands: 0,
            queue_depth: 0,
            cpu_pct: None,
            mem_used_bytes: None,
            mem_total_bytes: None,
            load1: None,
        };
        let command = CommandId::new();
        let mut report = ResultReport::new(CommandStatus::Succeeded);
        report.stdout = "hello\n".into();
        let (beat_reply, result_reply) =
            tokio::join!(handle.send_heartbeat(&beat), handle.report_result(command, &report));
        let beat_reply = beat_reply.expect("heartbeat reply");
        assert_eq!(
            (beat_reply["echo"].as_str(), beat_reply["body"]["version"].as_str()),
            (Some("heartbeat"), Some("1.2.3"))
        );
        let result_reply = result_reply.expect("result reply");
        assert_eq!(result_reply["echo"], "result");
        assert_eq!(result_reply["command_id"], command.to_string());
        assert_eq!(result_reply["body"]["stdout"], "hello\n");
        assert_eq!(conn.next().await.expect("new signals").cursor, "1-3");
    }

    #[tokio::test]
    async fn error_replies_are_the_api_errors_the_http_calls_give() {
        let (base, _) = fake_server(|mut ws| async move {
            let frame = recv_frame(&mut ws).await;
            assert_eq!((frame["type"].as_str(), frame["body"]["state"].as_str()), (Some("status"), Some("running")));
            let id = frame["id"].as_u64().expect("id");
            let error = json!({"code": 40902, "key": "CONFLICT", "what": "command is finished", "params": {}, "request_id": "r"});
            send_json(&mut ws, json!({"type": "reply", "id": id, "error": error})).await;
            let frame = recv_frame(&mut ws).await;
            let id = frame["id"].as_u64().expect("id");
            let error = json!({"code": 4029, "key": "RATE_LIMITED", "what": "slow down", "params": {"retry_after": 7}, "request_id": "r"});
            send_json(&mut ws, json!({"type": "reply", "id": id, "error": error})).await;
            let _ = ws.next().await;
        })
        .await;
        let conn = Client::new(&base).expect("client").connect_ws(None).await.expect("connect");
        let err = conn.handle().report_running(CommandId::new()).await.expect_err("conflict");
        assert!(matches!(&err, ClientError::Api { status: 409, .. }), "{err:?}");
        assert_eq!(err.key(), Some(ErrorKey::Conflict));
        assert_eq!(err.to_string(), "CONFLICT (409): command is finished");
        let err = conn
            .handle()
            .report_result(CommandId::new(), &ResultReport::new(CommandStatus::Failed))
            .await
            .expect_err("rate limited");
        assert_eq!((err.status(), err.key(), err.retry_after()), (Some(429), Some(ErrorKey::RateLimited), Some(7)));
    }

    #[tokio::test]
    async fn refusals_before_the_upgrade_carry_the_envelope() {
        let cases = [
            (
                "401 Unauthorized",
                "",
                envelope(4001, "TOKEN_EXPIRED", "access token expired", json!({})),
                401,
                ErrorKey::TokenExpired,
            ),
            (
                "409 Conflict",
                "",
                envelope(40901, "CURSOR_EXPIRED", "cursor expired", json!({"cursor": "2-0"})),
                409,
                ErrorKey::CursorExpired,
            ),
            (
                "403 Forbidden",
                "",
                envelope(4003, "DEVICE_REVOKED", "revoked", json!({"reason": "lost"})),
                403,
                ErrorKey::DeviceRevoked,
            ),
            (
                "429 Too Many Requests",
                "retry-after: 9\r\n",
                envelope(4029, "RATE_LIMITED", "slow down", json!({})),
                429,
                ErrorKey::RateLimited,
            ),
            ("404 Not Found", "", envelope(4040, "NOT_FOUND", "no route", json!({})), 404, ErrorKey::NotFound),
        ];
        for (status_line, headers, body, status, key) in cases {
            let base = refusing_server(http_response(status_line, headers, &body)).await;
            let err = Client::new(&base).expect("client").connect_ws(Some("1-1")).await.expect_err(status_line);
            assert_eq!((err.status(), err.key()), (Some(status), Some(key)), "{err:?}");
            if status == 429 {
                assert_eq!(err.retry_after(), Some(9));
            }
        }
        // The same envelope sent chunked.
        let body = envelope(40901, "CURSOR_EXPIRED", "cursor expired", json!({}));
        let chunked = format!(
            "HTTP/1.1 409 Conflict\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{}\r\n{:x}\r\n{}\r\n0\r\n\r\n",
            10,
            &body[..10],
            body.len() - 10,
            &body[10..]
        );
        let err = Client::new(&refusing_server(chunked).await)
            .expect("client")
            .connect_ws(None)
            .await
            .expect_err("chunked 409");
        assert_eq!(err.key(), Some(ErrorKey::CursorExpired), "{err:?}");
        // A proxy's page is no envelope: the status and text stay.
        let page = "<html>bad gateway</html>";
        let base = refusing_server(format!(
            "HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\r\n{page}",
            page.len()
        ))
        .await;
        let err = Client::new(&base).expect("client").connect_ws(None).await.expect_err("502");
        assert!(matches!(&err, ClientError::Unexpected { status: 502, text } if text == page), "{err:?}");
    }

    #[tokio::test]
    async fn transport_failures_say_where_they_happened() {
        // Nothing listens: connecting fails.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        drop(listener);
        let err = Client::new(&base).expect("client").connect_ws(None).await.expect_err("refused");
        assert!(matches!(err, ClientError::WebSocket(WsError::Connect(_))), "{err:?}");
        assert_eq!(err.status(), None);
        // Accepted, then closed without an answer: the upgrade failed.
        let base = refusing_server(String::new()).await;
        let err = Client::new(&base).expect("client").connect_ws(None).await.expect_err("no answer");
        assert!(matches!(err, ClientError::WebSocket(WsError::Upgrade(_))), "{err:?}");
        // A 101 without the right accept key is no WebSocket either.
        let base = refusing_server(
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: nope\r\n\r\n"
                .into(),
        )
        .await;
        let err = Client::new(&base).expect("client").connect_ws(None).await.expect_err("bad accept");
        assert!(matches!(err, ClientError::WebSocket(WsError::Upgrade(_))), "{err:?}");
    }

    /// Opens a connection the server ends with `code`; answers how `next` ends.
    async fn closed_with(code: u16, reason: &'static str) -> ClientError {
        let (base, _) = fake_server(move |mut ws| async move {
            let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
            ws.close(Some(frame)).await.expect("close");
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
        let mut conn = Client::new(&base).expect("client").connect_ws(None).await.expect("connect");
        let err = conn.next().await.expect_err("closed");
        assert!(matches!(conn.next().await, Err(ClientError::WebSocket(WsError::Ended))), "ended for good");
        assert!(!conn.handle().is_open());
        err
    }

    #[tokio::test]
    async fn close_codes_become_the_errors_of_their_http_twins() {
        for (code, key, status) in [
            (4401, ErrorKey::TokenExpired, 401),
            (4403, ErrorKey::DeviceRevoked, 403),
            (4409, ErrorKey::CursorExpired, 409),
            (1013, ErrorKey::ServiceUnavailable, 503),
            (1008, ErrorKey::BadRequest, 400),
            (1009, ErrorKey::PayloadTooLarge, 413),
        ] {
            let err = closed_with(code, "why").await;
            assert_eq!((err.key(), err.status()), (Some(key), Some(status)), "{code}: {err:?}");
            let ClientError::Api { body, .. } = &err else { panic!("{err:?}") };
            assert_eq!(
                (body.params["close_code"].as_u64(), body.params["reason"].as_str()),
                (Some(code.into()), Some("why"))
            );
        }
        for code in [1000, 1001, 1011] {
            let err = closed_with(code, "bye").await;
            assert!(
                matches!(&err, ClientError::WebSocket(WsError::Closed { code: Some(c), reason }) if *c == code && reason == "bye"),
                "{code}: {err:?}"
            );
            assert_eq!(err.key(), None);
        }
        // The revocation reads like DEVICE_REVOKED over HTTP.
        let err = close_error(Some(close::REVOKED), "stolen laptop");
        let ClientError::Api { body, .. } = &err else { panic!() };
        assert_eq!(body.params["reason"], "stolen laptop");
        assert_eq!(close_error(Some(4999), "").to_string(), "websocket closed by the server (4999): ");
        assert_eq!(close_error(None, "gone").to_string(), "websocket closed by the server (no close frame): gone");
    }

    #[tokio::test]
    async fn a_request_pending_when_the_connection_ends_fails_at_once() {
        let (base, _) = fake_server(|mut ws| async move {
            let _ = recv_frame(&mut ws).await;
            let frame = CloseFrame { code: CloseCode::Away, reason: "restarting".into() };
            ws.close(Some(frame)).await.expect("close");
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
        let mut conn = Client::new(&base).expect("client").connect_ws(None).await.expect("connect");
        let handle = conn.handle();
        let started = std::time::Instant::now();
        let err = handle.report_running(CommandId::new()).await.expect_err("no reply");
        assert!(matches!(err, ClientError::WebSocket(WsError::Ended)), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "not after the reply timeout");
        let end = conn.next().await.expect_err("closed");
        assert!(matches!(end, ClientError::WebSocket(WsError::Closed { code: Some(1001), .. })), "{end:?}");
        let err = handle.report_running(CommandId::new()).await.expect_err("ended");
        assert!(matches!(err, ClientError::WebSocket(WsError::Ended)), "{err:?}");
    }

    #[tokio::test]
    async fn a_silent_connection_is_dead_after_sixty_seconds_but_pings_keep_it_alive() {
        let (base, _) = fake_server(|mut ws| async move {
            // Pings for a while (the server's keep-alive), then nothing at all.
            for _ in 0..4 {
                ws.send(Message::Ping(Vec::new().into())).await.expect("ping");
                tokio::time::sleep(Duration::from_secs(20)).await;
            }
            tokio::time::sleep(Duration::from_secs(3600)).await;
        })
        .await;
        let mut conn = Client::new(&base).expect("client").connect_ws(None).await.expect("connect");
        // Virtual time from here: the sleeps above and the idle timer.
        tokio::time::pause();
        let started = Instant::now();
        let err = conn.next().await.expect_err("dead");
        assert!(matches!(err, ClientError::WebSocket(WsError::Idle(_))), "{err:?}");
        let lived = started.elapsed();
        assert!(lived >= Duration::from_secs(60 + 60), "pings kept it up: {lived:?}");
        assert!(lived <= Duration::from_secs(60 + 61), "then 60 s of silence ended it: {lived:?}");
    }

    #[tokio::test]
    async fn a_slow_reader_loses_no_frame_and_keeps_their_order() {
        let (base, _) = fake_server(|mut ws| async move {
            for i in 1..=20 {
                send_json(&mut ws, updates(&format!("1-{i}"), 1)).await;
            }
            let _ = ws.next().await;
        })
        .await;
        let mut conn = Client::new(&base).expect("client").connect_ws(None).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(200)).await;
        for i in 1..=20 {
            assert_eq!(conn.next().await.expect("frame").cursor, format!("1-{i}"));
        }
    }

    #[tokio::test]
    async fn an_unparsable_frame_ends_the_connection_with_1008_and_unknown_types_are_ignored() {
        let (base, _) = fake_server(|mut ws| async move {
            send_json(&mut ws, json!({"type": "notice", "text": "from a newer server"})).await;
            send_json(&mut ws, updates("1-1", 0)).await;
            ws.send(Message::text("{not json")).await.expect("send");
            let closed = loop {
                match ws.next().await {
                    Some(Ok(Message::Close(frame))) => break frame,
                    Some(Ok(_)) => {}
                    other => panic!("{other:?}"),
                }
            };
            assert_eq!(closed.map(|f| u16::from(f.code)), Some(1008));
        })
        .await;
        let mut conn = Client::new(&base).expect("client").connect_ws(None).await.expect("connect");
        assert_eq!(conn.next().await.expect("signals after the unknown frame").cursor, "1-1");
        let err = conn.next().await.expect_err("bad frame");
        assert!(matches!(err, ClientError::WebSocket(WsError::Protocol(_))), "{err:?}");
    }

    #[tokio::test]
    async fn a_frame_over_the_limit_is_not_sent() {
        let (base, _) = fake_server(|mut ws| async move {
            let _ = ws.next().await;
        })
        .await;
        let conn = Client::new(&base).expect("client").connect_ws(None).await.expect("connect");
        let mut report = ResultReport::new(CommandStatus::Succeeded);
        report.output = json!("x".repeat(MAX_FRAME_BYTES));
        let err = conn.handle().report_result(CommandId::new(), &report).await.expect_err("too big");
        assert!(matches!(err, ClientError::WebSocket(WsError::TooBig(n)) if n > MAX_FRAME_BYTES), "{err:?}");
        assert!(conn.handle().is_open(), "the connection is still up");
    }

    #[test]
    fn dechunk_keeps_what_arrived() {
        assert_eq!(dechunk(b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n"), b"hello world");
        assert_eq!(dechunk(b"5\r\nhel"), b"hel");
        assert_eq!(dechunk(b"zz\r\n"), b"");
    }

    /// A CA and a certificate it signed for `localhost` and 127.0.0.1.
    fn private_ca() -> (String, rustls::pki_types::CertificateDer<'static>, rustls::pki_types::PrivateKeyDer<'static>) {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key")).expect("CA");
        let key = KeyPair::generate().expect("key");
        let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("params");
        let cert = params.signed_by(&key, &ca).expect("certificate");
        let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der");
        (ca.pem(), cert.der().clone(), key)
    }

    #[tokio::test]
    async fn wss_trusts_the_private_ca_only_and_asks_for_http_1_1() {
        let (ca_pem, cert, key) = private_ca();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut server_config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .expect("server config");
        // Like the tether server: h2 first, so a client must ask for http/1.1.
        server_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let alpn = Arc::new(Mutex::new(None));
        let seen_alpn = alpn.clone();
        tokio::spawn(async move {
            // First the client with the CA, then one without (whose handshake fails).
            for _ in 0..2 {
                let (tcp, _) = listener.accept().await.expect("accept");
                let Ok(tls) = acceptor.accept(tcp).await else { continue };
                *seen_alpn.lock().expect("lock") = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                let mut ws = tokio_tungstenite::accept_async(tls).await.expect("upgrade");
                ws.send(Message::text(updates("4-2", 0).to_string())).await.expect("send");
                let _ = ws.next().await;
            }
        });
        let base = format!("https://localhost:{port}");
        let client = Client::builder(&base).ca_pem(ca_pem).build().expect("client");
        let mut conn = client.connect_ws(None).await.expect("wss with the private CA");
        assert_eq!(conn.next().await.expect("signals").cursor, "4-2");
        assert_eq!(alpn.lock().expect("lock").as_deref(), Some(&b"http/1.1"[..]));
        conn.close().await;
        // The system's roots do not include a private CA.
        let err = Client::new(&base).expect("client").connect_ws(None).await.expect_err("untrusted");
        assert!(matches!(err, ClientError::WebSocket(WsError::Tls(_))), "{err:?}");
        assert!(err.detail().contains("certificate"), "{}", err.detail());
    }
}
