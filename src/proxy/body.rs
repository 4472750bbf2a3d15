//! The body of a response on its way to the client.
//!
//! An upstream body streams through frame by frame, never buffered, so an SSE event
//! leaves as soon as the server writes it. The wrapper carries what must live exactly as
//! long as the response: the server's in-flight count, the connection (back to the pool
//! only after the body was read to the end), the stream idle timer, and the client
//! connection's "request active" mark.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::conn::ActiveRequest;
use crate::routes::InFlight;
use crate::upstream::Sender;

/// Why a streaming body was cut.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("server stopped mid-response: {0}")]
    Upstream(#[from] hyper::Error),
    #[error("no data from the server for {0:?} (stream idle timeout)")]
    Idle(Duration),
}

#[derive(Debug)]
pub struct ResponseBody {
    kind: Kind,
    /// Marks the client connection busy until the response ends; set by the connection.
    active: Option<ActiveRequest>,
}

// Unboxed on purpose: the body lives inline in hyper's connection state, and a box would
// be one more allocation per request.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum Kind {
    Message(Option<Bytes>),
    Upstream(UpstreamBody),
}

#[derive(Debug)]
struct UpstreamBody {
    inner: Incoming,
    /// Returned to the server's pool once the body has been read to its end.
    connection: Option<Sender>,
    in_flight: InFlight,
    idle_timeout: Duration,
    /// Created the first time the stream waits, so that bodies which arrive whole never
    /// pay for a timer.
    idle: Option<Pin<Box<Sleep>>>,
}

impl ResponseBody {
    pub fn message(text: Bytes) -> Self {
        ResponseBody { kind: Kind::Message(Some(text)), active: None }
    }

    pub fn empty() -> Self {
        ResponseBody { kind: Kind::Message(None), active: None }
    }

    /// Streams `inner`; `connection`, when given, goes back to the pool at the end.
    pub fn upstream(inner: Incoming, connection: Option<Sender>, in_flight: InFlight, idle_timeout: Duration) -> Self {
        let mut body = UpstreamBody { inner, connection, in_flight, idle_timeout, idle: None };
        if body.inner.is_end_stream() {
            body.finish();
        }
        ResponseBody { kind: Kind::Upstream(body), active: None }
    }

    pub(super) fn set_active(&mut self, active: ActiveRequest) {
        self.active = Some(active);
    }
}

impl UpstreamBody {
    /// The body ended cleanly: the connection can carry another request.
    fn finish(&mut self) {
        if let Some(connection) = self.connection.take() {
            self.in_flight.server().pool.put(connection);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let body = match &mut this.kind {
            Kind::Message(text) => return Poll::Ready(text.take().map(|t| Ok(Frame::data(t)))),
            Kind::Upstream(body) => body,
        };
        match Pin::new(&mut body.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(idle) = &mut body.idle {
                    idle.as_mut().reset(Instant::now() + body.idle_timeout);
                }
                if body.inner.is_end_stream() {
                    body.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                body.finish();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                body.connection = None;
                tracing::warn!(server = %body.in_flight.server().label, error = %e, "response cut: the server failed mid-body");
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending => {
                let timeout = body.idle_timeout;
                let idle = body.idle.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if idle.as_mut().poll(cx).is_ready() {
                    body.connection = None;
                    tracing::warn!(server = %body.in_flight.server().label, idle = ?timeout, "response cut: stream idle timeout");
                    return Poll::Ready(Some(Err(BodyError::Idle(timeout))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Message(text) => text.is_none(),
            Kind::Upstream(body) => body.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Message(Some(text)) => SizeHint::with_exact(text.len() as u64),
            Kind::Message(None) => SizeHint::with_exact(0),
            Kind::Upstream(body) => body.inner.size_hint(),
        }
    }
}
