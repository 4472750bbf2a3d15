//! Upgraded connections (WebSocket and other `Upgrade` protocols), tunnelled byte for byte
//! in both directions once the server has answered 101.
//!
//! A tunnel has no total time limit, only the stream idle timeout: it is closed when
//! neither side has sent anything for that long. A drain deadline on the server closes it:
//! a WebSocket with a close frame (1001, going away) sent to the client at a frame
//! boundary, so the client reconnects knowing why; any other protocol at once.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::body::END_GRACE;
use super::boundary::{WsFrames, CLOSE_GOING_AWAY};
use crate::routes::{DrainOutcome, InFlight};
use crate::upstream::Upgraded;

/// Runs the tunnel to its end. The server's in-flight count includes the tunnel until then.
pub async fn run(client: OnUpgrade, server: Upgraded, in_flight: InFlight, idle_timeout: Duration, websocket: bool) {
    let server_label = in_flight.server().label.clone();
    let client = match client.await {
        Ok(client) => client,
        Err(e) => {
            tracing::warn!(server = %server_label, error = %e, "upgrade failed; no tunnel");
            return;
        }
    };
    let shared = Arc::new(Shared::default());
    let mut client = Active { io: TokioIo::new(client), shared: shared.clone(), frames: None };
    let frames = websocket.then(WsFrames::default);
    let mut server = Active { io: server, shared: shared.clone(), frames };

    let idle = async {
        loop {
            tokio::time::sleep(idle_timeout).await;
            if !shared.activity.swap(false, Ordering::Relaxed) {
                return;
            }
        }
    };
    let cut = in_flight.cut_signal();
    let deadline = async {
        if !in_flight.is_cut() {
            cut.await;
        }
    };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut server);
    tokio::pin!(idle, deadline, copy);
    let mut grace_until = None;
    loop {
        tokio::select! {
            result = &mut copy => {
                if let Err(e) = result {
                    tracing::debug!(server = %server_label, error = %e, "tunnel ended with an error");
                }
                break;
            }
            () = &mut idle => {
                tracing::info!(server = %server_label, idle = ?idle_timeout, "tunnel closed: stream idle timeout");
                break;
            }
            () = &mut deadline, if grace_until.is_none() => {
                if !websocket {
                    break;
                }
                // The server side's reader now stops at the next frame boundary and hands
                // the client a close frame; the copy carries on until both sides are done.
                shared.closing.store(CLOSING, Ordering::Relaxed);
                grace_until = Some(Instant::now() + END_GRACE);
            }
            () = tokio::time::sleep_until(grace_until.unwrap_or_else(Instant::now)), if grace_until.is_some() => break,
        }
    }
    if in_flight.is_cut() {
        let server = in_flight.server();
        if shared.closing.load(Ordering::Relaxed) == CLOSE_SENT {
            server.drained.note(DrainOutcome::Ended);
            tracing::info!(server = %server_label, "drain deadline: WebSocket closed with 1001 going away");
        } else {
            server.drained.note(DrainOutcome::Cut);
            tracing::warn!(server = %server_label, "drain deadline: tunnel cut");
        }
    }
    // `in_flight` drops last: the count falls once the tunnel is gone.
}

/// Where a drain deadline has got with the tunnel (0: open).
const CLOSING: u8 = 1;
const CLOSE_SENT: u8 = 2;

#[derive(Debug, Default)]
struct Shared {
    /// Whether any byte moved since the idle check last looked.
    activity: AtomicBool,
    /// 0 (open), [`CLOSING`] or [`CLOSE_SENT`].
    closing: AtomicU8,
}

/// One side's I/O stream. Notes activity for the idle check; on the server side of a
/// WebSocket, also tracks frame boundaries in what it reads and, once closing, ends the
/// stream at the next one with a close frame.
struct Active<T> {
    io: T,
    shared: Arc<Shared>,
    frames: Option<WsFrames>,
}

impl<T: AsyncRead + Unpin> Active<T> {
    /// Reads once the tunnel is closing: up to the next frame boundary, then the close frame.
    fn poll_read_closing(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let Some(frames) = &mut self.frames else { return Poll::Ready(Ok(())) };
        if !frames.at_boundary() {
            // Read into a scratch buffer first: what follows the boundary is dropped, and
            // the close frame must still fit.
            let mut scratch = [0u8; 4096];
            let room = scratch.len().min(buf.remaining().saturating_sub(CLOSE_GOING_AWAY.len()));
            let mut read = ReadBuf::new(&mut scratch[..room]);
            std::task::ready!(Pin::new(&mut self.io).poll_read(cx, &mut read))?;
            let data = read.filled();
            if data.is_empty() {
                // The server closed mid-frame: nothing clean can follow.
                return Poll::Ready(Ok(()));
            }
            let Some(n) = frames.feed(data, true) else {
                buf.put_slice(data);
                return Poll::Ready(Ok(()));
            };
            buf.put_slice(&data[..n]);
        }
        if buf.remaining() >= CLOSE_GOING_AWAY.len() {
            buf.put_slice(&CLOSE_GOING_AWAY);
            self.shared.closing.store(CLOSE_SENT, Ordering::Relaxed);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match this.shared.closing.load(Ordering::Relaxed) {
            // After the close frame, the server side reads as ended.
            CLOSE_SENT if this.frames.is_some() => return Poll::Ready(Ok(())),
            CLOSING if this.frames.is_some() => return this.poll_read_closing(cx, buf),
            _ => {}
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        let read = &buf.filled()[before..];
        if !read.is_empty() {
            this.shared.activity.store(true, Ordering::Relaxed);
            if let Some(frames) = &mut this.frames {
                frames.feed(read, false);
            }
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
