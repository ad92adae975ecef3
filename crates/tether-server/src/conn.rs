//! Bounds on slow and silent connections (protocol.md §11 "Connections")
//! that hyper does not enforce by itself: a request body that stalls
//! between bytes, and an HTTP/2 client that sends nothing after the TLS
//! handshake.

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
