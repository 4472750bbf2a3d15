//! Upgraded connections (WebSocket and other `Upgrade` protocols), tunnelled byte for byte
//! in both directions once the server has answered 101.
//!
//! A tunnel has no total time limit, only the stream idle timeout: it is closed when
//! neither side has sent anything for that long.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::routes::InFlight;

/// Runs the tunnel to its end. The server's in-flight count includes the tunnel until then.
pub async fn run(client: OnUpgrade, server: OnUpgrade, in_flight: InFlight, idle_timeout: Duration) {
    let server_label = in_flight.server().label.clone();
    let (client, server) = match tokio::try_join!(client, server) {
        Ok(both) => both,
        Err(e) => {
            tracing::warn!(server = %server_label, error = %e, "upgrade failed; no tunnel");
            return;
        }
    };
    let activity = Arc::new(AtomicBool::new(false));
    let mut client = Active { io: TokioIo::new(client), activity: activity.clone() };
    let mut server = Active { io: TokioIo::new(server), activity: activity.clone() };

    let idle = async {
        loop {
            tokio::time::sleep(idle_timeout).await;
            if !activity.swap(false, Ordering::Relaxed) {
                return;
            }
        }
    };
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut client, &mut server) => {
            if let Err(e) = result {
                tracing::debug!(server = %server_label, error = %e, "tunnel ended with an error");
            }
        }
        () = idle => {
            tracing::info!(server = %server_label, idle = ?idle_timeout, "tunnel closed: stream idle timeout");
        }
    }
    drop(in_flight);
}

/// An I/O stream that notes whether any byte moved, for the idle check.
struct Active<T> {
    io: T,
    activity: Arc<AtomicBool>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.store(true, Ordering::Relaxed);
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
