//! Bounds on connections (protocol.md §11 "Connections") that hyper does
//! not enforce by itself: a request body that stalls between bytes, an
//! HTTP/2 client that sends nothing after the TLS handshake, and the number
//! of connections open at once.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// The error a request body yields when it stalled too long.
#[derive(Debug, thiserror::Error)]
#[error("the request body stalled for more than {0:?}")]
pub struct BodyStalled(pub Duration);

pin_project_lite::pin_project! {
    /// A request body that fails once no bytes arrived for `stall`. The timer
    /// is created on the first wait only, so a body-less request (the
    /// long-poll) allocates nothing.
    pub struct StallBody {
        #[pin]
        inner: Incoming,
        stall: Duration,
        timer: Option<Pin<Box<Sleep>>>,
    }
}

impl StallBody {
    pub fn new(inner: Incoming, stall: Duration) -> Self {
        Self { inner, stall, timer: None }
    }
}

impl Body for StallBody {
    type Data = hyper::body::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                // Progress: the next wait gets a full `stall` again.
                *this.timer = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let stall = *this.stall;
                let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
                ready!(timer.as_mut().poll(cx));
                Poll::Ready(Some(Err(Box::new(BodyStalled(stall)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// An I/O stream whose reads fail with `TimedOut` if its first bytes do
    /// not arrive by the deadline. Put under HTTP/2 after the TLS handshake:
    /// hyper waits for the client preface with no timeout of its own, and
    /// its keep-alive pings start only after it.
    pub struct FirstBytesDeadline<T> {
        #[pin]
        inner: T,
        deadline: Option<Pin<Box<Sleep>>>,
    }
}

impl<T> FirstBytesDeadline<T> {
    pub fn new(inner: T, within: Duration) -> Self {
        Self { inner, deadline: Some(Box::pin(tokio::time::sleep(within))) }
    }
}

impl<T: AsyncRead> AsyncRead for FirstBytesDeadline<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        match this.inner.poll_read(cx, buf) {
            Poll::Ready(done) => {
                if buf.filled().len() > before {
                    *this.deadline = None;
                }
                Poll::Ready(done)
            }
            Poll::Pending => match this.deadline {
                Some(deadline) => {
                    ready!(deadline.as_mut().poll(cx));
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "no request bytes in time")))
                }
                None => Poll::Pending,
            },
        }
    }
}

impl<T: AsyncWrite> AsyncWrite for FirstBytesDeadline<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The default cap on open connections: 90% of the process's open-file
/// limit, leaving room for the database, the log and the listener.
pub fn default_max_connections() -> usize {
    // /proc keeps this free of unsafe FFI; 1024 is the usual soft limit elsewhere.
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("Max open files"))?;
            line.trim_start_matches("Max open files").split_whitespace().next()?.parse::<usize>().ok()
        })
        .unwrap_or(1024);
    (soft / 10 * 9).max(1)
}

/// One open connection, counted until dropped.
#[derive(Debug)]
pub struct Slot(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Slot {
    /// A slot if fewer than `cap` connections are open.
    pub fn take(open: &std::sync::Arc<std::sync::atomic::AtomicUsize>, cap: usize) -> Option<Self> {
        use std::sync::atomic::Ordering;
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < cap).then_some(n + 1)).ok()?;
        Some(Self(open.clone()))
    }
}

/// The connection's [`Slot`], shared with the requests it carries: a
/// WebSocket outlives hyper's connection task and keeps counting until the
/// socket closes.
#[derive(Debug, Clone)]
pub struct ConnSlot {
    _slot: std::sync::Arc<Slot>,
}

impl ConnSlot {
    pub fn new(slot: Slot) -> Self {
        Self { _slot: std::sync::Arc::new(slot) }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The whole answer to a connection over the cap: written raw, without
/// reading the request, then the connection is closed.
pub fn over_capacity_response() -> Vec<u8> {
    use tether_proto::ErrorKey;
    use tether_proto::error::{ErrorBody, ErrorEnvelope};
    let key = ErrorKey::ServiceUnavailable;
    let mut params = serde_json::Map::new();
    params.insert("retry_after".into(), serde_json::json!(RETRY_AFTER_S));
    let body = ErrorEnvelope {
        error: ErrorBody {
            code: key.code(),
            key: key.as_str().to_owned(),
            what: "too many open connections; retry later".into(),
            params,
            request_id: String::new(),
        },
    };
    let body = serde_json::to_string(&body).expect("the envelope serializes");
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nretry-after: {RETRY_AFTER_S}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

const RETRY_AFTER_S: u64 = 1;

/// Sends [`over_capacity_response`] and closes; a client that does not read
/// it within a second loses it.
pub async fn refuse(mut tcp: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let answer = over_capacity_response();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        tcp.write_all(&answer).await?;
        tcp.shutdown().await
    })
    .await;
}
