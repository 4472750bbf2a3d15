//! Connections to servers: connecting with a timeout, HTTP/1.1 keep-alive pools, the
//! client that speaks HTTP/1.1 on them (`client`), and the body type requests are sent
//! with.
//!
//! Connecting is a step of its own, before any byte of the request is touched: a connect
//! failure therefore leaves the request intact for a retry on another server. A pooled
//! connection that turns out to be closed hands the unsent request back too
//! ([`SendError::unsent`]), so keep-alive races with a server closing idle connections
//! never reach the client.

mod client;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::net::TcpStream;
use tokio::time::Instant;

pub use client::{Body as ResponseBody, Connection, Error, SendError, Upgraded};

use crate::mirror::Tee;

/// Idle connections kept per server; more are closed as they come back.
const MAX_IDLE_PER_SERVER: usize = 1024;

/// Why a new connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr} timed out after {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("connect to {addr} failed: {source}")]
    Refused { addr: SocketAddr, source: io::Error },
}

/// Idle keep-alive connections to one server.
#[derive(Debug, Default)]
pub struct Pool {
    /// Idle connections with the moment each became idle, most recent last.
    idle: Mutex<Vec<(Box<Connection>, Instant)>>,
}

impl Pool {
    /// An idle connection, if there is one that is still open; closed ones are dropped on
    /// the way.
    ///
    /// Connections idle for longer than `max_idle` are closed instead: a server closes its
    /// idle keep-alive connections on its own clock (often 5 s), and a request written just
    /// as it does would fail.
    pub fn take(&self, now: Instant, max_idle: Duration) -> Option<Box<Connection>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((mut conn, since)) = idle.pop() {
            if now.duration_since(since) > max_idle {
                // Pushed in time order: everything below is older still.
                idle.clear();
                return None;
            }
            if conn.is_open() {
                return Some(conn);
            }
        }
        None
    }

    /// Returns a connection whose last response has been read to the end.
    pub fn put(&self, conn: Box<Connection>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE_PER_SERVER {
            idle.push((conn, Instant::now()));
        }
    }

    /// Closes every idle connection (a server leaving rotation).
    pub fn clear(&self) {
        let drained = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|p| p.into_inner()));
        drop(drained);
    }
}

/// Opens a new connection to `addr`.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Box<Connection>, ConnectError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => return Err(ConnectError::Timeout { addr, after: timeout }),
        Ok(Err(source)) => return Err(ConnectError::Refused { addr, source }),
        Ok(Ok(s)) => s,
    };
    // Small writes (SSE events, WebSocket frames) must leave at once.
    let _ = stream.set_nodelay(true);
    Ok(Connection::new(stream, addr))
}

/// The body of a request on its way to a server: the client's own, streamed as it comes
/// (and copied for a shadow when the request is mirrored), a whole one (a mirrored copy),
/// or nothing (health checks, replays of bodiless requests).
#[derive(Debug)]
pub enum RequestBody {
    Client(Incoming),
    Mirrored(Box<Tee>),
    Whole(Option<Bytes>),
    Empty,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    #[inline]
    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Client(body) => Pin::new(body).poll_frame(cx),
            RequestBody::Mirrored(tee) => tee.poll_frame(cx),
            RequestBody::Whole(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            RequestBody::Empty => Poll::Ready(None),
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Client(body) => body.is_end_stream(),
            RequestBody::Mirrored(tee) => tee.inner().is_end_stream(),
            RequestBody::Whole(bytes) => bytes.is_none(),
            RequestBody::Empty => true,
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Client(body) => body.size_hint(),
            RequestBody::Mirrored(tee) => tee.inner().size_hint(),
            RequestBody::Whole(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}
