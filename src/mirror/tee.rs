//! The client's request body on its way to the primary, copied for the shadow as it
//! passes. The primary never waits: a frame is forwarded as soon as it arrives, and the
//! copy keeps a reference to it (no bytes are copied until the end, and then only when
//! the body came in more than one frame).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use tokio::sync::oneshot;

/// The body was longer than `max_body`: the request is not mirrored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge;

/// What the mirror task receives: the whole body, or word that it was too large. A
/// dropped sender means the body never ended (the client went away, or the primary
/// never read it).
pub type BodyCopy = oneshot::Receiver<Result<Bytes, TooLarge>>;

#[derive(Debug)]
pub struct Tee {
    inner: Incoming,
    chunks: Vec<Bytes>,
    len: u64,
    limit: u64,
    done: Option<oneshot::Sender<Result<Bytes, TooLarge>>>,
}

impl Tee {
    pub fn new(inner: Incoming, limit: u64) -> (Tee, BodyCopy) {
        let (tx, rx) = oneshot::channel();
        (Tee { inner, chunks: Vec::new(), len: 0, limit, done: Some(tx) }, rx)
    }

    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.keep(data);
                }
                if self.inner.is_end_stream() {
                    self.complete();
                }
            }
            Poll::Ready(None) => self.complete(),
            Poll::Ready(Some(Err(_))) => {
                self.done = None;
                self.chunks = Vec::new();
            }
            Poll::Pending => {}
        }
        polled
    }

    pub fn inner(&self) -> &Incoming {
        &self.inner
    }

    fn keep(&mut self, data: &Bytes) {
        if self.done.is_none() || data.is_empty() {
            return;
        }
        self.len += data.len() as u64;
        if self.len > self.limit {
            if let Some(done) = self.done.take() {
                let _ = done.send(Err(TooLarge));
            }
            self.chunks = Vec::new();
            return;
        }
        self.chunks.push(data.clone());
    }

    fn complete(&mut self) {
        let Some(done) = self.done.take() else { return };
        let chunks = std::mem::take(&mut self.chunks);
        let body = match chunks.len() {
            0 => Bytes::new(),
            1 => chunks.into_iter().next().unwrap_or_default(),
            _ => {
                let mut all = BytesMut::with_capacity(self.len as usize);
                for chunk in chunks {
                    all.extend_from_slice(&chunk);
                }
                all.freeze()
            }
        };
        let _ = done.send(Ok(body));
    }
}
