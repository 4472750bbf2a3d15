//! A client connection's socket, with the two timeouts hyper cannot express for us:
//!
//! - idle: no request in progress and nothing received for `idle_timeout` → closed quietly;
//! - header read: the client began a request head but did not finish it within
//!   `header_read_timeout` → answered `408 Request Timeout` and closed (HTTP/1 only).
//!
//! hyper's own header timer closes without a response and also runs while a keep-alive
//! connection sits idle, so it cannot give a slow client its 408 nor tell the two cases
//! apart. This wrapper can: the service marks each request active through [`ConnShared`],
//! and the wrapper only times the gaps between requests. A long-poll or a stream is never
//! timed here; its own timeouts live in the handler and the response body.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// HTTP/2's connection preface (RFC 9113, 3.4).
pub(super) const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Enough of the preface to tell an HTTP/2 connection by its first read.
const H2_PREFACE_START: &[u8] = H2_PREFACE.split_at(14).0;

/// State shared between a connection's socket wrapper and its requests.
#[derive(Debug, Default)]
pub struct ConnShared {
    /// Requests whose response has not ended yet.
    active: AtomicU32,
    /// Requests begun on this connection, ever: tells the wrapper a new head was parsed.
    started: AtomicU64,
    /// The connection became a tunnel (101): no more HTTP heads, no timers here; the
    /// tunnel has its own idle timeout.
    upgraded: AtomicBool,
    /// switchyard is shutting down: HTTP/1 responses tell the client to close.
    draining: AtomicBool,
}

impl ConnShared {
    /// Marks a request as begun; the connection counts as busy until the mark is dropped.
    pub fn begin(self: &Arc<Self>) -> ActiveRequest {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveRequest(self.clone())
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Marks the connection as a tunnel from now on.
    pub fn mark_upgraded(&self) {
        self.upgraded.store(true, Ordering::Relaxed);
    }
}

/// A request in progress on a client connection.
#[derive(Debug)]
pub struct ActiveRequest(Arc<ConnShared>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub idle: Duration,
    pub header_read: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Not timing anything (a request is active).
    None,
    /// Waiting for the first byte of the next request.
    Idle,
    /// Bytes of a head have arrived; waiting for the rest.
    Head,
}

#[derive(Debug)]
pub struct ClientIo {
    stream: TcpStream,
    shared: Arc<ConnShared>,
    timeouts: Timeouts,
    /// Goes off at `due` or earlier (see [`arm`](Self::arm)).
    timer: Pin<Box<Sleep>>,
    /// When what `wait` waits for times out.
    due: Instant,
    wait: Wait,
    /// `started` as last seen: a change means hyper parsed a head since.
    seen_started: u64,
    /// HTTP/2 (known from the preface): frames flow all the time, and a 408 would corrupt
    /// the stream, so only the idle timeout applies.
    h2: bool,
    first_read: bool,
}

impl ClientIo {
    pub fn new(stream: TcpStream, shared: Arc<ConnShared>, timeouts: Timeouts) -> Self {
        let due = Instant::now() + timeouts.idle;
        ClientIo {
            stream,
            shared,
            timer: Box::pin(tokio::time::sleep_until(due)),
            due,
            timeouts,
            wait: Wait::Idle,
            seen_started: 0,
            h2: false,
            first_read: true,
        }
    }

    fn arm(&mut self, wait: Wait) {
        let after = match wait {
            Wait::Head => self.timeouts.header_read,
            _ => self.timeouts.idle,
        };
        self.wait = wait;
        self.due = Instant::now() + after;
        // Moving a timer takes the timer wheel's lock, and a keep-alive connection arms
        // twice per request. A timer that goes off no later than the new deadline is left
        // as it is: when it fires early, `poll_read` moves it on to `due`.
        if self.timer.deadline() > self.due {
            self.timer.as_mut().reset(self.due);
        }
    }

    /// Ready once `due` has passed.
    fn poll_due(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            ready!(self.timer.as_mut().poll(cx));
            if Instant::now() >= self.due {
                return Poll::Ready(());
            }
            let due = self.due;
            self.timer.as_mut().reset(due);
        }
    }

    /// Best effort: the socket buffer is empty at this point, so one non-blocking write of
    /// a small response goes through whole, and if it does not, the client was gone anyway.
    fn send_408(&self) {
        let body = format!("no complete request head within {:?}\n", self.timeouts.header_read);
        let response = format!(
            "HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = self.stream.try_write(response.as_bytes());
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let result = Pin::new(&mut this.stream).poll_read(cx, buf);

        let started = this.shared.started.load(Ordering::Relaxed);
        if started != this.seen_started {
            this.seen_started = started;
            this.wait = Wait::None;
        }
        let busy = this.shared.active.load(Ordering::Relaxed) > 0 || this.shared.upgraded.load(Ordering::Relaxed);

        match result {
            Poll::Ready(Ok(())) => {
                let got = &buf.filled()[before..];
                if this.first_read && !got.is_empty() {
                    this.first_read = false;
                    this.h2 = got.starts_with(H2_PREFACE_START);
                }
                if !got.is_empty() && !busy && !this.h2 && this.wait != Wait::Head {
                    this.arm(Wait::Head);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if busy => Poll::Pending,
            Poll::Pending => {
                if this.wait == Wait::None {
                    this.arm(Wait::Idle);
                }
                ready!(this.poll_due(cx));
                if this.wait == Wait::Head {
                    tracing::info!(status = 408, after = ?this.timeouts.header_read, "request refused: client too slow sending a request head");
                    this.send_408();
                }
                // End of stream: hyper closes the connection.
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl AsyncWrite for ClientIo {
    #[inline]
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    #[inline]
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    #[inline]
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    #[inline]
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
