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

/// What a client speaks, as far as the bytes it has sent tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Speaks {
    /// Its bytes so far are the first `n` of HTTP/2's preface (a preface may arrive in
    /// pieces, across reads).
    Undecided(u8),
    Http1,
    Http2,
}

impl Speaks {
    /// What the client speaks once it has also sent `bytes`.
    pub(super) fn after(self, bytes: &[u8]) -> Speaks {
        let Speaks::Undecided(seen) = self else { return self };
        let expected = &H2_PREFACE[usize::from(seen)..];
        let n = bytes.len().min(expected.len());
        if bytes[..n] != expected[..n] {
            Speaks::Http1
        } else if n == expected.len() {
            Speaks::Http2
        } else {
            // n < 24 - seen, so the sum fits in a u8.
            Speaks::Undecided(seen + n as u8)
        }
    }
}

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
    /// HTTP/2 clients never get the header-read timeout nor its 408: frames flow all the
    /// time, and a 408 would corrupt the stream. A client whose bytes so far could still be
    /// HTTP/2's preface is timed as an HTTP/1 head: if it stalls mid-preface, nothing of
    /// HTTP/2 has been exchanged yet, and "P" may as well be a POST.
    speaks: Speaks,
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
            speaks: Speaks::Undecided(0),
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
                let was = this.speaks;
                this.speaks = was.after(got);
                if this.speaks == Speaks::Http2 {
                    // Its preface is complete: HTTP/2 is never timed as a slow head.
                    if was != Speaks::Http2 && this.wait == Wait::Head {
                        this.arm(Wait::Idle);
                    }
                } else if !got.is_empty() && !busy && this.wait != Wait::Head {
                    // HTTP/1, or the first bytes of a preface yet: the head's clock starts
                    // at its first byte ("P" may be POST as well as HTTP/2's "PRI").
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
                if this.wait == Wait::Head && this.speaks != Speaks::Http2 {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn speaks(reads: &[&[u8]]) -> Speaks {
        reads.iter().fold(Speaks::Undecided(0), |speaks, bytes| speaks.after(bytes))
    }

    #[test]
    fn the_preface_is_known_however_it_is_cut_across_reads() {
        let mut whole = H2_PREFACE.to_vec();
        // A SETTINGS frame usually follows in the same write.
        whole.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(speaks(&[&whole]), Speaks::Http2);
        for cut in 1..H2_PREFACE.len() {
            let (first, rest) = whole.split_at(cut);
            assert_eq!(speaks(&[first]), Speaks::Undecided(cut as u8), "cut at {cut}");
            assert_eq!(speaks(&[first, b"", rest]), Speaks::Http2, "cut at {cut}");
        }
        let one_by_one: Vec<&[u8]> = H2_PREFACE.chunks(1).collect();
        assert_eq!(speaks(&one_by_one), Speaks::Http2);
    }

    #[test]
    fn http1_is_known_at_its_first_byte_off_the_preface() {
        assert_eq!(speaks(&[b"GET / HTTP/1.1\r\n"]), Speaks::Http1);
        assert_eq!(speaks(&[b"P"]), Speaks::Undecided(1));
        assert_eq!(speaks(&[b"P", b"OST / HTTP/1.1\r\n"]), Speaks::Http1);
        assert_eq!(speaks(&[b"PRI * HTTP/1.1\r\n"]), Speaks::Http1);
        // Decided for good: later bytes change nothing.
        assert_eq!(speaks(&[b"GET", H2_PREFACE]), Speaks::Http1);
        assert_eq!(speaks(&[H2_PREFACE, b"GET / HTTP/1.1\r\n"]), Speaks::Http2);
        assert_eq!(speaks(&[b""]), Speaks::Undecided(0));
    }

    /// A client's socket as a `ClientIo`, with the other end to write to.
    async fn pair() -> (ClientIo, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let timeouts = Timeouts { idle: Duration::from_secs(30), header_read: Duration::from_secs(10) };
        (ClientIo::new(server, Arc::default(), timeouts), client)
    }

    #[tokio::test]
    async fn a_preface_read_in_pieces_ends_timed_as_idle_and_a_head_as_a_head() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut io, mut client) = pair().await;
        let mut buf = [0u8; 64];
        client.write_all(b"PRI *").await.expect("write");
        assert_eq!(io.read(&mut buf).await.expect("read"), 5);
        // Could be a POST's first byte as well: timed as a head so far.
        assert_eq!((io.speaks, io.wait), (Speaks::Undecided(5), Wait::Head));
        client.write_all(&H2_PREFACE[5..]).await.expect("write");
        let mut got = 5;
        while got < H2_PREFACE.len() {
            got += io.read(&mut buf).await.expect("read");
        }
        assert_eq!((io.speaks, io.wait), (Speaks::Http2, Wait::Idle));

        let (mut io, mut client) = pair().await;
        client.write_all(b"P").await.expect("write");
        assert_eq!(io.read(&mut buf).await.expect("read"), 1);
        client.write_all(b"OST / HTTP/1.1\r\n").await.expect("write");
        assert!(io.read(&mut buf).await.expect("read") > 0);
        assert_eq!((io.speaks, io.wait), (Speaks::Http1, Wait::Head));
    }
}
