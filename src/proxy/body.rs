//! The body of a response on its way to the client.
//!
//! An upstream body streams through frame by frame, never buffered, so an SSE event
//! leaves as soon as the server writes it. The wrapper carries what must live exactly as
//! long as the response: the server's in-flight count, the connection (back to the pool
//! only after the body was read to the end), the stream idle timer, and the client
//! connection's "request active" mark.
//!
//! A drain deadline on the server ends the body: an SSE stream at its next event boundary
//! (the client's EventSource reconnects, to a server in rotation), anything else at once.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::futures::OwnedNotified;
use tokio::time::{Instant, Sleep};

use super::boundary::SseScanner;
use super::conn::ActiveRequest;
use crate::mirror::PrimaryDigest;
use crate::routes::{DrainOutcome, InFlight};
use crate::upstream;

type FrameResult = Result<Frame<Bytes>, BodyError>;

/// After a drain deadline, how long an SSE stream caught mid-event may take to finish the
/// event before it is cut anyway.
pub const END_GRACE: Duration = Duration::from_secs(2);

/// Why a streaming body was cut.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("server stopped mid-response: {0}")]
    Upstream(#[from] upstream::Error),
    #[error("no data from the server for {0:?} (stream idle timeout)")]
    Idle(Duration),
    #[error("the server was drained and its deadline passed")]
    Drained,
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
enum Kind {
    Message(Option<Bytes>),
    Upstream(UpstreamBody),
}

#[derive(Debug)]
struct UpstreamBody {
    inner: upstream::ResponseBody,
    /// Whether the connection goes back to the server's pool once the body has been read
    /// to its end.
    reuse: bool,
    in_flight: InFlight,
    idle_timeout: Duration,
    /// Created the first time the stream waits, so that bodies which arrive whole never
    /// pay for a timer.
    waits: Option<Pin<Box<Waits>>>,
    /// For `text/event-stream`: where the stream stands between events.
    sse: Option<SseScanner>,
    end: End,
    /// A mirrored request's primary answer, read for comparison with the shadow's.
    digest: Option<Box<PrimaryDigest>>,
}

/// How far a drain deadline has got with a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Streaming,
    /// The deadline passed mid-event: forward up to the event's end, then stop.
    AtNextEvent,
    /// The last event is out: the body ends with the next poll.
    Now,
}

pin_project_lite::pin_project! {
    /// What a waiting body wakes for, in one allocation.
    #[derive(Debug)]
    struct Waits {
        #[pin]
        idle: Sleep,
        #[pin]
        cut: OwnedNotified,
    }
}

impl ResponseBody {
    pub fn message(text: Bytes) -> Self {
        ResponseBody { kind: Kind::Message(Some(text)), active: None }
    }

    pub fn empty() -> Self {
        ResponseBody { kind: Kind::Message(None), active: None }
    }

    /// Streams `inner`; its connection, if `reuse`, goes back to the pool at the end. An
    /// `event_stream` (SSE) is tracked so that a drain deadline can end it between events.
    pub fn upstream(
        inner: upstream::ResponseBody,
        reuse: bool,
        in_flight: InFlight,
        idle_timeout: Duration,
        event_stream: bool,
    ) -> Self {
        let sse = event_stream.then(SseScanner::default);
        let mut body =
            UpstreamBody { inner, reuse, in_flight, idle_timeout, waits: None, sse, end: End::Streaming, digest: None };
        if body.inner.is_end_stream() {
            body.finish();
        }
        ResponseBody { kind: Kind::Upstream(body), active: None }
    }

    /// Reads the body for a mirrored request's comparison as it streams; the digest is
    /// complete when the body ends whole (dropped, it tells the mirror it never did).
    pub fn compare(&mut self, digest: Box<PrimaryDigest>) {
        match &mut self.kind {
            Kind::Upstream(body) if !body.inner.is_end_stream() => body.digest = Some(digest),
            // Whole already (an empty body): there is nothing more to read.
            _ => digest.done(),
        }
    }

    pub(super) fn set_active(&mut self, active: ActiveRequest) {
        self.active = Some(active);
    }
}

impl UpstreamBody {
    /// The body ended cleanly: the connection can carry another request.
    fn finish(&mut self) {
        if let Some(connection) = self.reuse.then(|| self.inner.take_reusable()).flatten() {
            self.in_flight.server().pool.put(connection);
        }
        if let Some(digest) = self.digest.take() {
            digest.done();
        }
    }
}

impl UpstreamBody {
    /// The drain deadline has passed on the server: how this body ends.
    fn deadline_passed(&mut self) -> Option<Poll<Option<FrameResult>>> {
        let server = self.in_flight.server();
        // The connection is not returned: the request was cut short on a server that is
        // leaving.
        self.reuse = false;
        match self.sse {
            Some(sse) if sse.at_boundary() => {
                server.drained.note(DrainOutcome::Ended);
                tracing::info!(server = %server.label, "drain deadline: event stream ended between events");
                Some(Poll::Ready(None))
            }
            Some(_) => {
                self.end = End::AtNextEvent;
                if let Some(waits) = &mut self.waits {
                    waits.as_mut().project().idle.reset(Instant::now() + END_GRACE.min(self.idle_timeout));
                }
                None
            }
            None => {
                server.drained.note(DrainOutcome::Cut);
                tracing::warn!(server = %server.label, "drain deadline: response cut");
                Some(Poll::Ready(Some(Err(BodyError::Drained))))
            }
        }
    }

    /// A data frame on its way: tracked for event boundaries, and when the stream is to
    /// end at the next one, shortened to it.
    fn pass(&mut self, frame: Frame<Bytes>) -> Frame<Bytes> {
        let Some(sse) = &mut self.sse else { return frame };
        let mut data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => return frame,
        };
        let stop = self.end == End::AtNextEvent;
        if let Some(n) = sse.feed(&data, stop) {
            if stop {
                data.truncate(n);
                self.end = End::Now;
                let server = self.in_flight.server();
                server.drained.note(DrainOutcome::Ended);
                tracing::info!(server = %server.label, "drain deadline: event stream ended after its current event");
            }
        }
        Frame::data(data)
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<FrameResult>> {
        let this = self.get_mut();
        let body = match &mut this.kind {
            Kind::Message(text) => return Poll::Ready(text.take().map(|t| Ok(Frame::data(t)))),
            Kind::Upstream(body) => body,
        };
        if body.end == End::Now {
            return Poll::Ready(None);
        }
        match Pin::new(&mut body.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(waits), End::Streaming) = (&mut body.waits, body.end) {
                    waits.as_mut().project().idle.reset(Instant::now() + body.idle_timeout);
                }
                let frame = body.pass(frame);
                if let (Some(digest), Some(data)) = (&mut body.digest, frame.data_ref()) {
                    if !digest.feed(data) {
                        if let Some(digest) = body.digest.take() {
                            digest.done();
                        }
                    }
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
                body.reuse = false;
                let server = body.in_flight.server();
                if let Some(stats) = &*server.stats.load() {
                    stats.record_failure(Instant::now());
                }
                tracing::warn!(server = %server.label, error = %e, "response cut: the server failed mid-body");
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending => {
                let timeout = body.idle_timeout;
                let waits = body.waits.get_or_insert_with(|| {
                    Box::pin(Waits { idle: tokio::time::sleep(timeout), cut: body.in_flight.owned_cut_signal() })
                });
                let waits = waits.as_mut().project();
                if body.end == End::Streaming && (waits.cut.poll(cx).is_ready() || body.in_flight.is_cut()) {
                    if let Some(end) = body.deadline_passed() {
                        return end;
                    }
                }
                let Some(waits) = body.waits.as_mut() else { return Poll::Pending };
                if waits.as_mut().project().idle.poll(cx).is_ready() {
                    body.reuse = false;
                    let server = body.in_flight.server();
                    if body.end == End::AtNextEvent {
                        server.drained.note(DrainOutcome::Cut);
                        tracing::warn!(server = %server.label, "drain deadline: event stream cut, its event did not end in time");
                        return Poll::Ready(Some(Err(BodyError::Drained)));
                    }
                    tracing::warn!(server = %server.label, idle = ?timeout, "response cut: stream idle timeout");
                    return Poll::Ready(Some(Err(BodyError::Idle(timeout))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Message(text) => text.is_none(),
            Kind::Upstream(body) => body.end == End::Now || body.inner.is_end_stream(),
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
