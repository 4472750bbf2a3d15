//! The HTTP/1.1 client switchyard speaks to its servers.
//!
//! A request is written and its response read by the task that proxies it: there is no
//! connection task, no channel to one, and no wake-up between the two. The connection
//! travels with the request and then inside the response's body, and the body hands it
//! back (for the pool) once it has been read to its end. hyper's client spent about as
//! many instructions on that hand-over as on the HTTP itself (`benches/HISTORY.md`,
//! "What session 10 changed").
//!
//! Parsing is httparse's, as in hyper. The framing rules are RFC 9112's, applied
//! strictly, because a pooled connection that lost track of where one response ends
//! would hand the rest of it to the next client: a connection is reused only after a
//! response whose length was known (`Content-Length` or chunked) was read to its end,
//! with not one byte more in the buffer, from a server that did not ask to close.

use std::future::poll_fn;
use std::io::{self, Read as _, Write as _};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::{Pool, RequestBody};
use crate::headers::{is_framing, is_hop_by_hop, put_field, ConnectionOptions, Forward};

/// The most a response head (status line and headers) may take.
const MAX_HEAD: usize = 64 * 1024;
/// The most header lines a response head may have.
const MAX_HEADERS: usize = 100;
/// What one read asks the kernel for.
const READ_SIZE: usize = 8 * 1024;
/// The longest chunk size line (with its extensions) accepted.
const MAX_CHUNK_LINE: usize = 1024;
/// Interim (1xx) responses skipped before the final one; more is a broken server.
const MAX_INTERIM: usize = 16;

/// Why an exchange with a server failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connection closed before a response")]
    Closed,
    #[error("connection closed mid-response")]
    ClosedMidResponse,
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    #[error("malformed response head: {0}")]
    MalformedHead(#[from] httparse::Error),
    #[error("malformed response: {0}")]
    Malformed(&'static str),
    #[error("response head over {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("reading the request body from the client: {0}")]
    RequestBody(hyper::Error),
}

/// A failed [`Connection::send`]. `unsent` gives the request's body back when the request
/// can safely go out again on a fresh connection: see [`Connection::send`].
#[derive(Debug)]
pub struct SendError {
    pub error: Error,
    pub unsent: Option<RequestBody>,
}

/// An open connection to a server, between requests.
///
/// Always boxed (see [`Connection::new`]): it goes from the pool into each request's
/// future, into the response's body and back, and a `Box` moves as one pointer where the
/// connection itself is 152 bytes to copy, and makes every response that carries it as
/// much larger.
#[derive(Debug)]
pub struct Connection {
    io: TcpStream,
    /// Bytes read and not yet used. Empty between requests.
    read: BytesMut,
    /// The request head as it is written; kept for its capacity.
    head: Vec<u8>,
    /// Scratch space for parsing response heads; kept for its capacity.
    fields: Vec<Field>,
    /// Whether the connection has carried a request before this one.
    reused: bool,
    /// The server's address: the `Host` of a forwarded request whose client named none.
    server: SocketAddr,
}

impl Connection {
    pub fn new(io: TcpStream, server: SocketAddr) -> Box<Self> {
        Box::new(Connection { io, read: BytesMut::new(), head: Vec::new(), fields: Vec::new(), reused: false, server })
    }

    /// Whether an idle connection is still open: the server has not closed it, nor sent
    /// anything unasked. Asks the kernel only when the reactor saw the socket become
    /// readable, which an idle connection never does unless it is closing.
    pub fn is_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                matches!(self.io.try_read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Sends the request with head `parts` and `body`, and reads the response head. The
    /// response's body owns the connection from then on.
    ///
    /// The head is borrowed and stays the caller's: a request that may go again keeps it.
    /// A request without a body, with an idempotent method, that fails on a reused
    /// connection before any byte of a response came back gets its body back in
    /// [`SendError::unsent`]: the server most likely closed the idle connection just as
    /// the request went out (the keep-alive race), and a fresh connection can take it.
    ///
    /// Once a final response head has come back, the request can no longer go again, and
    /// its header map, emptied, takes the response's headers: `parts.headers` is left
    /// empty, even if the head is then refused. hyper keeps a response's map for the next
    /// request's head on the client's connection, so a request proxied over HTTP/1
    /// allocates no header map at all.
    ///
    /// A bodiless request whose future is dropped while its answer is awaited (its client
    /// hung up) gives the connection back to `home` if the whole answer has come already:
    /// see [`Awaited`].
    pub async fn send(
        mut self: Box<Self>,
        parts: &mut http::request::Parts,
        body: RequestBody,
        forward: Option<&Forward>,
        home: Option<&Pool>,
    ) -> Result<Response<Body>, SendError> {
        let declared = parts.headers.get(header::CONTENT_LENGTH);
        let framing = Framing::of_request(declared, &body);
        self.head.clear();
        encode_head(&mut self.head, parts, forward.map(|f| (f, self.server)), framing, declared.is_some());
        let head_request = parts.method == Method::HEAD;

        if framing == Framing::Length(0) {
            // Nearly every request: the head is all of it.
            let mut interim = 0;
            let written = self.io.write_all(&self.head).await;
            let mut awaited = Awaited { conn: Some(self), home: home.filter(|_| written.is_ok()), head_request };
            let exchanged = match written {
                Ok(()) => {
                    poll_fn(|cx| match awaited.conn.as_mut() {
                        Some(c) => poll_head(&mut c.io, &mut c.read, &mut c.fields, &mut interim, cx),
                        None => Poll::Ready(Err(Error::Closed)),
                    })
                    .await
                }
                Err(e) => Err(e.into()),
            };
            // An answer or a failure: the exchange goes on, and ends, without the guard.
            let Some(conn) = awaited.conn.take() else { return Err(SendError { error: Error::Closed, unsent: None }) };
            return match exchanged {
                Ok(head) => conn.respond(head, &mut parts.headers, head_request, true),
                Err(error) => {
                    // An interim answer means the server has the request.
                    let retry = conn.reused
                        && conn.read.is_empty()
                        && interim == 0
                        && parts.method.is_idempotent()
                        && matches!(error, Error::Closed | Error::Io(_));
                    Err(SendError { error, unsent: retry.then_some(body) })
                }
            };
        }

        // Boxed: this path's state (the body's writer beside the head's reader) would
        // otherwise make every request's future, and each move of it, twice the size.
        Box::pin(self.send_body(&mut parts.headers, body, framing, head_request)).await
    }

    /// [`send`](Self::send) for a request with a body, its head encoded already. The body
    /// is written while the response head is awaited: a server may answer (413, 401)
    /// before it has read all of it.
    async fn send_body(
        mut self: Box<Self>,
        headers: &mut HeaderMap,
        mut body: RequestBody,
        framing: Framing,
        head_request: bool,
    ) -> Result<Response<Body>, SendError> {
        let (answer, written) = {
            let Connection { io, read, head, fields, .. } = &mut *self;
            let (mut reader, mut writer) = io.split();
            let write = async {
                writer.write_all(head).await?;
                write_body(&mut writer, &mut body, framing).await
            };
            tokio::pin!(write);
            let mut written = None;
            let mut interim = 0;
            loop {
                tokio::select! {
                    biased;
                    result = &mut write, if written.is_none() => match result {
                        // The client hung up mid-body: nothing more to do here.
                        Err(error @ Error::RequestBody(_)) => return Err(SendError { error, unsent: None }),
                        // The server may have answered before it stopped reading.
                        result => written = Some(result),
                    },
                    head = poll_fn(|cx| poll_head(&mut reader, read, fields, &mut interim, cx)) => break (head, written),
                }
            }
        };
        let request_done = matches!(written, Some(Ok(())));
        let head = match (answer, written) {
            (Ok(head), _) => head,
            // The write's failure says more than the read's that followed it.
            (Err(_), Some(Err(error))) | (Err(error), _) => return Err(SendError { error, unsent: None }),
        };
        if !request_done {
            tracing::debug!(status = %head.status, "the server answered before the request body was sent; its connection will not be reused");
        }
        self.respond(head, headers, head_request, request_done)
    }

    /// The response to a request whose head came back as `head` (still at the front of the
    /// read buffer), with its headers moved into `headers` (the request's, emptied first);
    /// refused if its framing is broken.
    fn respond(
        mut self: Box<Self>,
        head: Head,
        headers: &mut HeaderMap,
        head_request: bool,
        request_done: bool,
    ) -> Result<Response<Body>, SendError> {
        self.reused = true;
        let mut headers = std::mem::take(headers);
        if let Err(error) = head.take_fields(&mut self.read, &mut self.fields, &mut headers) {
            return Err(SendError { error, unsent: None });
        }
        let Head { status, version, delimiters, .. } = head;
        let (state, keep_alive) = if status == StatusCode::SWITCHING_PROTOCOLS {
            // The connection is the tunnel's now (see `Body::into_upgraded`).
            (State::Done, false)
        } else {
            match Framing::of_response(status, version, &delimiters, head_request) {
                Ok((framing, keep_alive)) => (State::reading(framing), keep_alive && request_done),
                Err(error) => return Err(SendError { error, unsent: None }),
            }
        };
        let body = Body { conn: Some(self), state, keep_alive };
        let mut response = Response::new(body);
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        Ok(response)
    }
}

/// A bodiless request on the wire, its answer awaited.
///
/// Dropped before the answer's head was read, because the client hung up and its request
/// was cancelled, the connection goes back to `home` if the whole answer is there already
/// (see [`Connection::salvage`]). The server has done its work, and the answer just has no
/// one to go to; closing the connection would make the next request open a new one. Most
/// often this is a client that hangs up as its answer comes back: hyper sees the hang-up
/// before the request's task reads the answer. Any other drop closes the connection, since
/// its next bytes would be an answer no one reads.
struct Awaited<'p> {
    /// `None` once the exchange went on normally.
    conn: Option<Box<Connection>>,
    /// `None`: close the connection in any case (the request did not go out whole, or the
    /// caller keeps no pool).
    home: Option<&'p Pool>,
    head_request: bool,
}

impl Drop for Awaited<'_> {
    fn drop(&mut self) {
        if let (Some(conn), Some(home)) = (self.conn.take(), self.home) {
            if let Some(conn) = conn.salvage(self.head_request) {
                home.put(conn);
            }
        }
    }
}

/// The most of an unread answer [`Connection::salvage`] reads to find its end.
const SALVAGE_MAX: usize = 16 * 1024;

impl Connection {
    /// The connection, ready for another request, if the whole answer to the one on it
    /// (whose head was not read yet) has arrived: a final head that lets the connection
    /// stay open, and exactly the `Content-Length` bytes after it. The answer is read from
    /// the kernel without waiting, and without the reactor, which may not have seen it
    /// arrive yet; then it is thrown away. Anything else (more to come, a chunked or a
    /// close-delimited body, an upgrade, a broken head, more than [`SALVAGE_MAX`] bytes)
    /// gives `None`, and the connection closes.
    fn salvage(mut self: Box<Self>, head_request: bool) -> Option<Box<Connection>> {
        let mut chunk = [0u8; 4096];
        let socket = socket2::SockRef::from(&self.io);
        loop {
            if self.read.len() > SALVAGE_MAX {
                return None;
            }
            match (&*socket).read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.read.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
        // The bytes are all in the buffer: the head is read as `send` reads one, from a
        // source that has nothing more to give.
        let mut cx = Context::from_waker(Waker::noop());
        let Poll::Ready(Ok(head)) = poll_head(&mut &[][..], &mut self.read, &mut self.fields, &mut 0, &mut cx) else {
            return None;
        };
        if head.status == StatusCode::SWITCHING_PROTOCOLS {
            return None;
        }
        let (framing, keep_alive) =
            Framing::of_response(head.status, head.version, &head.delimiters, head_request).ok()?;
        let body = (self.read.len() - head.len) as u64;
        if !keep_alive || framing != Framing::Length(body) {
            return None;
        }
        self.read.clear();
        self.reused = true;
        Some(self)
    }
}

/// A response head, parsed at the front of the read buffer. Its fields' names and places
/// are in the connection's `fields`; they go into a header map only for a final head (see
/// [`Head::take_fields`]).
#[derive(Debug)]
struct Head {
    status: StatusCode,
    version: Version,
    delimiters: Delimiters,
    /// The head's length in bytes, blank line included.
    len: usize,
}

/// Reads until a final response head is at the front of `buf`, skipping interim (1xx)
/// responses but 101, and parses it. The head, and what follows it, stay in `buf`.
/// `interim` counts the interim responses skipped, across polls.
fn poll_head<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    fields: &mut Vec<Field>,
    interim: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<Result<Head, Error>> {
    loop {
        if !buf.is_empty() {
            match parse_head(buf, fields)? {
                Some(head) if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS => {
                    buf.advance(head.len);
                    *interim += 1;
                    if *interim > MAX_INTERIM {
                        return Poll::Ready(Err(Error::Malformed("too many interim (1xx) responses")));
                    }
                    continue;
                }
                Some(head) => return Poll::Ready(Ok(head)),
                None if buf.len() >= MAX_HEAD => return Poll::Ready(Err(Error::HeadTooLarge)),
                None => {}
            }
        }
        let had = buf.len();
        if ready!(poll_fill(io, buf, cx))? == 0 {
            // After an interim response the server has the request: it may not go again.
            let untouched = had == 0 && *interim == 0;
            return Poll::Ready(Err(if untouched { Error::Closed } else { Error::ClosedMidResponse }));
        }
    }
}

/// Parses a complete response head at the front of `buf`, or `None` if it is not all
/// there yet. The fields' names are made, and the framing headers read, on the way;
/// `fields` gets each name with its value's place in `buf`. It is scratch space, kept by
/// the connection so that parsing allocates nothing of its own.
fn parse_head(buf: &BytesMut, fields: &mut Vec<Field>) -> Result<Option<Head>, Error> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut response, buf, &mut slots);
    let len = match parsed? {
        httparse::Status::Complete(len) if len > MAX_HEAD => return Err(Error::HeadTooLarge),
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    let status = response.code.and_then(|c| StatusCode::from_u16(c).ok()).ok_or(Error::Malformed("bad status"))?;
    let version = if response.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    let mut delimiters = Delimiters::default();
    let base = buf.as_ptr() as usize;
    fields.clear();
    for h in response.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| Error::Malformed("bad header name"))?;
        delimiters.note(&name, h.value);
        let start = h.value.as_ptr() as usize - base;
        fields.push((name, start, start + h.value.len()));
    }
    Ok(Some(Head { status, version, delimiters, len }))
}

impl Head {
    /// Takes the head off the front of `buf`, and its fields into `headers`, which is
    /// emptied first. Values share the head's bytes rather than being copied.
    ///
    /// Hop-by-hop headers, and those `Connection` named, were read for framing and
    /// keep-alive and go no further; but a 101's `Upgrade` says what the connection speaks
    /// now, and stays. A `Content-Length` beside `Transfer-Encoding` goes too: the coding
    /// decides where the body ends, and a length passed on would contradict it (RFC 9112,
    /// 6.3).
    fn take_fields(&self, buf: &mut BytesMut, fields: &mut Vec<Field>, headers: &mut HeaderMap) -> Result<(), Error> {
        let head = buf.split_to(self.len).freeze();
        let connection = &self.delimiters.connection;
        let transfer_coded = self.delimiters.chunked.is_some();
        let switching = self.status == StatusCode::SWITCHING_PROTOCOLS;
        let kept = |name: &HeaderName| {
            (!is_hop_by_hop(name) || (switching && name == header::UPGRADE))
                && !connection.names(name)
                && !(transfer_coded && name == header::CONTENT_LENGTH)
        };
        headers.clear();
        headers.reserve(fields.len());
        for (name, start, end) in fields.drain(..) {
            if !kept(&name) {
                continue;
            }
            let value = HeaderValue::from_maybe_shared(head.slice(start..end))
                .map_err(|_| Error::Malformed("bad header value"))?;
            headers.append(name, value);
        }
        Ok(())
    }
}

/// A header's name, and where its value lies in the read buffer.
type Field = (HeaderName, usize, usize);

/// What a response head says about where its body ends, and about its connection.
#[derive(Debug, Default)]
struct Delimiters {
    /// `Content-Length`: `Some(None)` when a value is not a number, or values disagree.
    length: Option<Option<u64>>,
    /// `Transfer-Encoding`: whether its last coding is `chunked`.
    chunked: Option<bool>,
    /// What `Connection` says: `close`, and the headers it names.
    connection: ConnectionOptions,
}

impl Delimiters {
    fn note(&mut self, name: &HeaderName, value: &[u8]) {
        if name == header::CONTENT_LENGTH {
            let length = content_length(value);
            self.length = match self.length {
                None => Some(length),
                Some(seen) => Some(seen.filter(|_| seen == length)),
            };
        } else if name == header::TRANSFER_ENCODING {
            // The last header's last coding is the one that counts.
            let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
            self.chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name == header::CONNECTION {
            self.connection.add(value);
        }
    }
}

/// Reads more into `buf`: the count read, 0 at the end of the stream.
fn poll_fill<R: AsyncRead + Unpin>(io: &mut R, buf: &mut BytesMut, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_SIZE / 4 {
        buf.reserve(READ_SIZE);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// `Content-Length` bytes (0: no body).
    Length(u64),
    Chunked,
    /// Until the server closes the connection (responses only).
    Close,
}

impl Framing {
    /// How a request's body goes out: by the `Content-Length` the client `declared` (hyper
    /// checked it, and framed the body by it), else by the body. A client's
    /// `Transfer-Encoding` is hop-by-hop: its body is re-framed here.
    fn of_request(declared: Option<&HeaderValue>, body: &RequestBody) -> Framing {
        if let Some(length) = declared.and_then(|v| content_length(v.as_bytes())) {
            return Framing::Length(length);
        }
        if body.is_end_stream() {
            return Framing::Length(0);
        }
        match body.size_hint().exact() {
            Some(length) => Framing::Length(length),
            None => Framing::Chunked,
        }
    }

    /// How a response's body is delimited (RFC 9112, 6.3), and whether the connection
    /// may carry another request after it.
    fn of_response(
        status: StatusCode,
        version: Version,
        delimiters: &Delimiters,
        head_request: bool,
    ) -> Result<(Framing, bool), Error> {
        let keep_alive = version == Version::HTTP_11 && !delimiters.connection.close;
        if head_request
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return Ok((Framing::Length(0), keep_alive));
        }
        match (delimiters.chunked, delimiters.length) {
            // With both headers, a message built to be read two ways: read it the one way
            // the RFC says, and never reuse the connection.
            (Some(true), length) => Ok((Framing::Chunked, keep_alive && length.is_none())),
            (Some(false), _) => Ok((Framing::Close, false)),
            (None, Some(Some(length))) => Ok((Framing::Length(length), keep_alive)),
            (None, Some(None)) => Err(Error::Malformed("invalid or conflicting Content-Length")),
            (None, None) => Ok((Framing::Close, false)),
        }
    }
}

/// A `Content-Length` value: digits only, or a list of one number repeated (RFC 9110,
/// 8.6).
fn content_length(value: &[u8]) -> Option<u64> {
    let mut length = None;
    for part in value.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = part.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        if length.is_some_and(|l| l != n) {
            return None;
        }
        length = Some(n);
    }
    length
}

/// Writes the request line and headers, changed as `forward` says when it is a request
/// forwarded (to the server given with it), then the framing headers for `framing`. The
/// request's own `Content-Length` and `Transfer-Encoding` are never copied: the framing
/// written is always the one the body is sent with, whatever else the headers say (a client
/// naming `Content-Length` in `Connection` must not leave a body unframed, to be read as the
/// next request). `declared`: whether the client sent a `Content-Length`, which is kept even
/// when it is 0.
fn encode_head(
    out: &mut Vec<u8>,
    parts: &http::request::Parts,
    forward: Option<(&Forward, SocketAddr)>,
    framing: Framing,
    declared: bool,
) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.uri.path_and_query().map_or("/", |pq| pq.as_str()).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    match forward {
        Some((forward, server)) => forward.put_fields(out, &parts.headers, server),
        None => put_fields(out, &parts.headers, |name| !is_framing(name)),
    }
    match framing {
        // A server may wait for a body it was not told is empty.
        Framing::Length(0) if declared || matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) => {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        Framing::Length(0) => {}
        Framing::Length(length) => {
            let _ = write!(out, "content-length: {length}\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        // A request is never close-delimited (`of_request`).
        Framing::Close => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes each field that `keep` keeps as a `name: value` line.
fn put_fields(out: &mut Vec<u8>, fields: &HeaderMap, keep: impl Fn(&HeaderName) -> bool) {
    for (name, value) in fields {
        if keep(name) {
            put_field(out, name.as_str(), value.as_bytes());
        }
    }
}

/// Streams the request's body to the server, framed as `framing` says.
async fn write_body<W: AsyncWrite + Unpin>(w: &mut W, body: &mut RequestBody, framing: Framing) -> Result<(), Error> {
    let mut left = match framing {
        Framing::Length(length) => Some(length),
        _ => None,
    };
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Error::RequestBody)?;
        let frame = match frame.into_data() {
            Ok(data) if data.is_empty() => continue,
            Ok(data) => {
                match &mut left {
                    Some(left) => {
                        *left = left
                            .checked_sub(data.len() as u64)
                            .ok_or(Error::Malformed("request body longer than its Content-Length"))?;
                        w.write_all(&data).await?;
                    }
                    None => {
                        out.clear();
                        let _ = write!(out, "{:x}\r\n", data.len());
                        out.extend_from_slice(&data);
                        out.extend_from_slice(b"\r\n");
                        w.write_all(&out).await?;
                    }
                }
                continue;
            }
            Err(frame) => frame,
        };
        if let (Ok(trailers), None) = (frame.into_trailers(), left) {
            out.clear();
            out.extend_from_slice(b"0\r\n");
            put_fields(&mut out, &trailers, |_| true);
            out.extend_from_slice(b"\r\n");
            return Ok(w.write_all(&out).await?);
        }
    }
    match left {
        Some(0) => Ok(()),
        Some(_) => Err(Error::Malformed("request body shorter than its Content-Length")),
        None => Ok(w.write_all(b"0\r\n\r\n").await?),
    }
}

/// A response's body, read from the connection as the client takes it.
#[derive(Debug)]
pub struct Body {
    /// `None` once handed back for reuse or to a tunnel.
    conn: Option<Box<Connection>>,
    state: State,
    /// Whether the connection may carry another request once the body is read.
    keep_alive: bool,
}

#[derive(Debug)]
enum State {
    /// This many bytes of a `Content-Length` body are still to come.
    Length(u64),
    Chunked(Chunk),
    /// Read until the server closes.
    Close,
    Done,
    /// The body broke off; the error was reported.
    Failed,
}

/// Where a chunked body stands.
#[derive(Debug, Clone, Copy)]
enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
}

impl State {
    fn reading(framing: Framing) -> State {
        match framing {
            Framing::Length(0) => State::Done,
            Framing::Length(length) => State::Length(length),
            Framing::Chunked => State::Chunked(Chunk::Size),
            Framing::Close => State::Close,
        }
    }
}

impl Body {
    /// The connection, if the body has been read to its end and the connection can carry
    /// another request.
    pub fn take_reusable(&mut self) -> Option<Box<Connection>> {
        let reusable = matches!(self.state, State::Done)
            && self.keep_alive
            && self.conn.as_ref().is_some_and(|c| c.read.is_empty());
        if reusable {
            self.conn.take()
        } else {
            None
        }
    }

    /// The connection of a 101 response, with whatever the server sent after the head.
    pub fn into_upgraded(mut self) -> Option<Upgraded> {
        let conn = self.conn.take()?;
        Some(Upgraded { io: conn.io, early: conn.read.freeze() })
    }

    fn fail(&mut self, error: Error) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.state = State::Failed;
        self.conn = None;
        Poll::Ready(Some(Err(error)))
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
            let buf = &mut conn.read;
            // Each step either yields, moves on, or falls through to read more.
            match &mut this.state {
                State::Done | State::Failed => return Poll::Ready(None),
                State::Length(left) if !buf.is_empty() => {
                    let data = take_data(buf, left);
                    if *left == 0 {
                        this.state = State::Done;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::Chunked(Chunk::Data(left)) if !buf.is_empty() => {
                    let data = take_data(buf, left);
                    if *left == 0 {
                        this.state = State::Chunked(Chunk::DataEnd);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::Close if !buf.is_empty() => return Poll::Ready(Some(Ok(Frame::data(buf.split().freeze())))),
                State::Length(_) | State::Chunked(Chunk::Data(_)) | State::Close => {}
                State::Chunked(chunk @ Chunk::Size) => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        buf.advance(used);
                        *chunk = if size == 0 { Chunk::Trailers } else { Chunk::Data(size) };
                        continue;
                    }
                    Ok(httparse::Status::Partial) if buf.len() < MAX_CHUNK_LINE => {}
                    _ => return this.fail(Error::Malformed("invalid chunk size line")),
                },
                State::Chunked(chunk @ Chunk::DataEnd) => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        *chunk = Chunk::Size;
                        continue;
                    }
                    if buf.len() >= 2 || buf.first().is_some_and(|&b| b != b'\r') {
                        return this.fail(Error::Malformed("chunk data longer than its size"));
                    }
                }
                State::Chunked(Chunk::Trailers) => {
                    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    match httparse::parse_headers(buf, &mut slots) {
                        Ok(httparse::Status::Complete((used, fields))) => {
                            let trailers = trailer_map(fields);
                            buf.advance(used);
                            this.state = State::Done;
                            return match trailers {
                                Some(map) if map.is_empty() => Poll::Ready(None),
                                Some(map) => Poll::Ready(Some(Ok(Frame::trailers(map)))),
                                None => this.fail(Error::Malformed("invalid trailer field")),
                            };
                        }
                        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
                        Ok(httparse::Status::Partial) => return this.fail(Error::HeadTooLarge),
                        Err(e) => return this.fail(e.into()),
                    }
                }
            }
            match ready!(poll_fill(&mut conn.io, buf, cx)) {
                Ok(0) if matches!(this.state, State::Close) => {
                    this.state = State::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(Error::ClosedMidResponse),
                Ok(_) => {}
                Err(e) => return this.fail(e.into()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done | State::Failed)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(left) => SizeHint::with_exact(left),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// Up to `left` bytes of body data from the front of `buf`.
fn take_data(buf: &mut BytesMut, left: &mut u64) -> Bytes {
    let n = (*left).min(buf.len() as u64);
    *left -= n;
    // `n` is at most `buf.len()`, so it fits a `usize`.
    buf.split_to(n as usize).freeze()
}

/// Trailer fields as a map, copied (they are rare); `None` if one is not valid.
fn trailer_map(fields: &[httparse::Header<'_>]) -> Option<HeaderMap> {
    let mut map = HeaderMap::with_capacity(fields.len());
    for field in fields {
        let name = HeaderName::from_bytes(field.name.as_bytes()).ok()?;
        map.append(name, HeaderValue::from_bytes(field.value).ok()?);
    }
    Some(map)
}

/// A connection that switched protocols: bytes both ways, starting with any the server
/// sent right after its 101.
#[derive(Debug)]
pub struct Upgraded {
    io: TcpStream,
    early: Bytes,
}

impl AsyncRead for Upgraded {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.early.is_empty() {
            let n = this.early.len().min(buf.remaining());
            buf.put_slice(&this.early.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use http::Request;

    use super::*;

    /// A server on 127.0.0.1 that accepts one connection and answers each request on it
    /// with the next of `answers`, written byte by byte so that the client sees its pieces
    /// in any grouping. It closes the connection after the last answer, and returns the
    /// requests as it read them.
    async fn scripted(answers: Vec<&'static [u8]>) -> (SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
        serve_one(|mut stream| async move {
            stream.set_nodelay(true).expect("nodelay");
            let mut seen = Vec::new();
            for answer in answers {
                seen.push(read_request(&mut stream).await);
                for byte in answer {
                    if stream.write_all(&[*byte]).await.is_err() {
                        return seen;
                    }
                }
            }
            seen
        })
        .await
    }

    /// A server on 127.0.0.1 that hands its one connection to `serve`.
    async fn serve_one<F, Fut, T>(serve: F) -> (SocketAddr, tokio::task::JoinHandle<T>)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T> + Send,
        T: Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move { serve(listener.accept().await.expect("accept").0).await });
        (addr, task)
    }

    /// One request as the server reads it: the head, and a body by its `content-length`
    /// or to its last chunk.
    async fn read_request(stream: &mut TcpStream) -> String {
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        let complete = |r: &[u8]| {
            let Some(end) = r.windows(4).position(|w| w == b"\r\n\r\n") else { return false };
            let head = String::from_utf8_lossy(&r[..end]).to_lowercase();
            if head.contains("transfer-encoding: chunked") {
                return r[end + 4..].windows(5).any(|w| w == b"0\r\n\r\n")
                    || r.ends_with(b"\r\n\r\n") && r.len() > end + 4;
            }
            let length =
                head.lines().find_map(|l| l.strip_prefix("content-length: ")).map_or(0, |n| n.parse().expect("length"));
            r.len() >= end + 4 + length
        };
        while !complete(&request) {
            match stream.read(&mut byte).await {
                Ok(1) => request.push(byte[0]),
                _ => break,
            }
        }
        String::from_utf8_lossy(&request).into_owned()
    }

    async fn open(addr: SocketAddr) -> Box<Connection> {
        Connection::new(TcpStream::connect(addr).await.expect("connect"), addr)
    }

    fn request(method: Method, body: RequestBody) -> Request<RequestBody> {
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = "/agent?q=1".parse().expect("uri");
        req.headers_mut().insert(header::HOST, HeaderValue::from_static("agent"));
        req
    }

    /// Sends a whole request, as a caller that does not keep its head.
    async fn exchange(conn: Box<Connection>, req: Request<RequestBody>) -> Result<Response<Body>, SendError> {
        let (mut head, body) = req.into_parts();
        conn.send(&mut head, body, None, None).await
    }

    /// The answer to a GET from a [`scripted`] server, and the server's task.
    async fn get_answered(answers: Vec<&'static [u8]>) -> (Response<Body>, tokio::task::JoinHandle<Vec<String>>) {
        let (addr, server) = scripted(answers).await;
        (exchange(open(addr).await, get()).await.expect("a response"), server)
    }

    /// A connection to `addr` that has carried one GET, answered and read to its end.
    async fn reused(addr: SocketAddr) -> Box<Connection> {
        let response = exchange(open(addr).await, get()).await.expect("a response");
        read_all(response).await.2.expect("reusable")
    }

    fn get() -> Request<RequestBody> {
        request(Method::GET, RequestBody::Empty)
    }

    /// The body's data and trailers, and the connection if it can be reused.
    async fn read_all(response: Response<Body>) -> (Vec<u8>, Option<HeaderMap>, Option<Box<Connection>>) {
        let mut body = response.into_body();
        let (mut data, mut trailers) = (Vec::new(), None);
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("a whole body");
            match frame.into_data() {
                Ok(bytes) => data.extend_from_slice(&bytes),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        (data, trailers, body.take_reusable())
    }

    /// The head `encode_head` writes for `req`, forwarded as a proxy does when `forwarded`.
    fn written_head(req: Request<RequestBody>, forwarded: bool) -> String {
        let (parts, body) = req.into_parts();
        let forward = Forward {
            host: parts.headers.get(header::HOST).cloned(),
            client_ip: HeaderValue::from_static("10.0.0.9"),
            via: "1.1 switchyard",
            upgrade: None,
            connection: ConnectionOptions::of(&parts.headers),
            shadow_copy: false,
        };
        let declared = parts.headers.get(header::CONTENT_LENGTH);
        let framing = Framing::of_request(declared, &body);
        let mut out = Vec::new();
        let server = SocketAddr::from(([127, 0, 0, 1], 9));
        encode_head(&mut out, &parts, forwarded.then_some((&forward, server)), framing, declared.is_some());
        String::from_utf8(out).expect("text")
    }

    #[test]
    fn the_framing_written_is_the_bodys_whatever_the_headers_say() {
        let lines = |head: &str, name: &str| {
            head.lines()
                .filter(|l| l.to_lowercase().starts_with(&format!("{name}:")))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        for forwarded in [true, false] {
            // A client naming Content-Length in Connection, or sending it twice.
            let mut req = request(Method::POST, RequestBody::Whole(Some(Bytes::from_static(b"12345"))));
            req.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("keep-alive, content-length"));
            req.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
            req.headers_mut().append(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
            let head = written_head(req, forwarded);
            assert_eq!(lines(&head, "content-length"), ["content-length: 5"], "{head}");
            // A client's Transfer-Encoding is hop-by-hop: the body is framed as it is sent.
            let mut req = request(Method::POST, RequestBody::Whole(Some(Bytes::from_static(b"123"))));
            req.headers_mut().insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
            let head = written_head(req, forwarded);
            assert_eq!(lines(&head, "content-length"), ["content-length: 3"], "{head}");
            assert!(lines(&head, "transfer-encoding").is_empty(), "{head}");
            // An empty body is declared where a server may wait for one, or where the client did.
            let head = written_head(request(Method::POST, RequestBody::Empty), forwarded);
            assert_eq!(lines(&head, "content-length"), ["content-length: 0"], "{head}");
            let mut req = get();
            req.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
            assert_eq!(lines(&written_head(req, forwarded), "content-length"), ["content-length: 0"]);
            assert!(lines(&written_head(get(), forwarded), "content-length").is_empty());
        }
    }

    #[tokio::test]
    async fn a_content_length_beside_transfer_encoding_is_not_passed_on() {
        let (response, _server) = get_answered(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        ])
        .await;
        assert!(response.headers().is_empty(), "{:?}", response.headers());
        let (data, _, conn) = read_all(response).await;
        assert_eq!(data, b"ok", "the coding decides where the body ends");
        assert!(conn.is_none(), "a connection that sent both is not trusted again");
    }

    #[test]
    fn content_length_is_digits_or_one_number_repeated() {
        assert_eq!(content_length(b"5"), Some(5));
        assert_eq!(content_length(b"5, 5"), Some(5));
        assert_eq!(content_length(b"0"), Some(0));
        for bad in [&b""[..], b"5,6", b"-1", b"+5", b"5 5", b"0x10", b"99999999999999999999", b" ,5"] {
            assert_eq!(content_length(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[tokio::test]
    async fn a_response_read_to_its_end_frees_the_connection_for_the_next_request() {
        let (response, server) = get_answered(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-agent: 1\r\n\r\nhello",
            b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
        ])
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-agent"], "1");
        let (data, _, conn) = read_all(response).await;
        assert_eq!(data, b"hello");
        let conn = conn.expect("the connection, reusable");
        let response = exchange(conn, request(Method::DELETE, RequestBody::Empty)).await.expect("a second response");
        assert_eq!(response.status(), StatusCode::CREATED);
        assert_eq!(read_all(response).await.0, b"ok");
        let seen = server.await.expect("server");
        assert!(seen[0].starts_with("GET /agent?q=1 HTTP/1.1\r\nhost: agent\r\n"), "{}", seen[0]);
        assert!(seen[1].starts_with("DELETE /agent?q=1 HTTP/1.1\r\n"), "{}", seen[1]);
    }

    #[tokio::test]
    async fn a_responses_hop_by_hop_headers_are_read_and_left_out() {
        let (response, _server) = get_answered(vec![
            b"HTTP/1.1 200 OK\r\nConnection: X-Private, keep-alive\r\nKeep-Alive: timeout=5\r\n\
              X-Private: 1\r\nUpgrade: nothing\r\nProxy-Authenticate: Basic\r\nx-agent: 1\r\n\
              Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
        ])
        .await;
        let names: Vec<_> = response.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-agent"]);
        // ... and still obeyed: the body was chunked, and the connection may go on.
        let (data, _, conn) = read_all(response).await;
        assert_eq!(data, b"ok");
        let response = exchange(conn.expect("reusable"), get()).await.expect("a second response");
        let names: Vec<_> = response.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-length"]);
        assert!(read_all(response).await.2.is_none(), "`Connection: close` was obeyed");
    }

    #[tokio::test]
    async fn a_chunked_response_is_decoded_with_its_extensions_and_trailers() {
        let (response, _server) = get_answered(vec![
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-sum: 11\r\n\r\n",
        ])
        .await;
        let (data, trailers, conn) = read_all(response).await;
        assert_eq!(data, b"hello world");
        assert_eq!(trailers.expect("trailers")["x-sum"], "11");
        assert!(conn.is_some(), "a chunked body read to its end leaves the connection reusable");
    }

    #[tokio::test]
    async fn bodies_that_may_not_be_followed_on_their_connection_are_read_but_not_reused() {
        let cases: [(&[u8], &[u8]); 5] = [
            (b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok", b"ok"),
            (b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok", b"ok"),
            // No length: the body ends when the server closes.
            (b"HTTP/1.1 200 OK\r\n\r\nto the end", b"to the end"),
            // Both: chunked wins, and the connection is not trusted again.
            (b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", b"ok"),
            // More than the body: the server and switchyard disagree on where it ends.
            (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n", b"ok"),
        ];
        for (answer, body) in cases {
            let (response, _server) = get_answered(vec![answer]).await;
            let (data, _, conn) = read_all(response).await;
            assert_eq!(data, body, "{:?}", String::from_utf8_lossy(answer));
            assert!(conn.is_none(), "reused after {:?}", String::from_utf8_lossy(answer));
        }
    }

    #[tokio::test]
    async fn head_204_and_304_responses_have_no_body_whatever_their_headers_say() {
        for (method, answer) in [
            (Method::HEAD, &b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n"[..]),
            (Method::GET, b"HTTP/1.1 204 No Content\r\ncontent-length: 100\r\n\r\n"),
            (Method::GET, b"HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n"),
        ] {
            let (addr, _server) = scripted(vec![answer]).await;
            let response = exchange(open(addr).await, request(method, RequestBody::Empty)).await.expect("a response");
            assert!(response.body().is_end_stream());
            let (data, _, conn) = read_all(response).await;
            assert!(data.is_empty());
            assert!(conn.is_some(), "a bodiless response leaves the connection reusable");
        }
    }

    #[tokio::test]
    async fn interim_responses_are_skipped() {
        let (response, _server) = get_answered(vec![
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ]).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.headers().get("link").is_none());
        assert_eq!(read_all(response).await.0, b"ok");
    }

    #[tokio::test]
    async fn broken_framing_is_an_error_not_a_guess() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: two\r\n\r\nok",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"SMTP ready\r\n\r\n",
        ] {
            let (addr, _server) = scripted(vec![answer]).await;
            let sent = exchange(open(addr).await, get()).await;
            assert!(sent.is_err(), "accepted {:?}", String::from_utf8_lossy(answer));
        }
        for answer in [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nokay\r\n0\r\n\r\n",
            // Cut short.
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nok",
        ] {
            let (addr, _server) = scripted(vec![answer]).await;
            let mut body = exchange(open(addr).await, get()).await.expect("a head").into_body();
            let mut failed = false;
            while let Some(frame) = body.frame().await {
                failed |= frame.is_err();
            }
            assert!(failed, "read whole: {:?}", String::from_utf8_lossy(answer));
            assert!(body.take_reusable().is_none());
        }
    }

    #[tokio::test]
    async fn a_head_over_the_limit_is_refused() {
        let answer: &'static [u8] =
            format!("HTTP/1.1 200 OK\r\nx-big: {}\r\n\r\n", "a".repeat(MAX_HEAD)).leak().as_bytes();
        let (addr, _server) = scripted(vec![answer]).await;
        let sent = exchange(open(addr).await, get()).await;
        assert!(matches!(sent, Err(SendError { error: Error::HeadTooLarge, .. })), "{sent:?}");
    }

    #[tokio::test]
    async fn a_request_body_goes_out_with_its_length() {
        let (addr, server) = scripted(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"]).await;
        let body = RequestBody::Whole(Some(Bytes::from_static(b"{\"q\":1}")));
        let response = exchange(open(addr).await, request(Method::POST, body)).await.expect("a response");
        assert!(read_all(response).await.2.is_some());
        let seen = server.await.expect("server");
        assert!(seen[0].ends_with("content-length: 7\r\n\r\n{\"q\":1}"), "{}", seen[0]);
        // Without a body, a POST still says so.
        let (addr, server) = scripted(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"]).await;
        let response = exchange(open(addr).await, request(Method::POST, RequestBody::Empty)).await.expect("a response");
        drop(response);
        assert!(server.await.expect("server")[0].ends_with("content-length: 0\r\n\r\n"));
    }

    #[tokio::test]
    async fn a_server_that_answers_before_reading_the_body_is_heard_and_its_connection_dropped() {
        // The server reads nothing of the 32 MiB body, which cannot all fit in the
        // sockets' buffers, and refuses it.
        let (addr, server) = serve_one(|mut stream| async move {
            let mut head = [0u8; 64];
            let _ = stream.read(&mut head).await.expect("read");
            stream.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\n\r\nbig").await.expect("write");
            // Hold the connection until the client lets go of it.
            let _ = stream.read_to_end(&mut Vec::new()).await;
        })
        .await;
        let body = RequestBody::Whole(Some(Bytes::from(vec![b'x'; 32 << 20])));
        let response = exchange(open(addr).await, request(Method::PUT, body)).await.expect("the early answer");
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let (data, _, conn) = read_all(response).await;
        assert_eq!(data, b"big");
        assert!(conn.is_none(), "a connection with half a request on it was kept");
        server.await.expect("server");
    }

    #[tokio::test]
    async fn an_upgrade_hands_over_the_connection_with_what_followed_the_head() {
        let (addr, server) = serve_one(|mut stream| async move {
            read_request(&mut stream).await;
            stream
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: echo\r\nconnection: upgrade\r\n\r\nhi")
                .await
                .expect("write");
            let mut ping = [0u8; 4];
            stream.read_exact(&mut ping).await.expect("ping");
            stream.write_all(&ping).await.expect("echo");
        })
        .await;
        let response = exchange(open(addr).await, get()).await.expect("a response");
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        // What the connection speaks now stays with the 101; the connection's own header goes.
        assert_eq!(response.headers()["upgrade"], "echo");
        assert!(response.headers().get("connection").is_none(), "{:?}", response.headers());
        let mut tunnel = response.into_body().into_upgraded().expect("the connection");
        let mut hi = [0u8; 2];
        tunnel.read_exact(&mut hi).await.expect("early bytes");
        assert_eq!(&hi, b"hi");
        tunnel.write_all(b"ping").await.expect("write");
        let mut echo = [0u8; 4];
        tunnel.read_exact(&mut echo).await.expect("echo");
        assert_eq!(&echo, b"ping");
        server.await.expect("server");
    }

    #[tokio::test]
    async fn an_idempotent_request_on_a_connection_the_server_closed_is_given_back() {
        for (method, given_back) in [(Method::GET, true), (Method::POST, false)] {
            // One answer, then the server closes: the keep-alive race, lost.
            let (addr, server) = scripted(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"]).await;
            let conn = reused(addr).await;
            server.await.expect("server");
            let sent = exchange(conn, request(method.clone(), RequestBody::Empty)).await;
            let Err(SendError { unsent, .. }) = sent else { panic!("{method}: an answer from a closed connection") };
            assert_eq!(unsent.is_some(), given_back, "{method}");
        }
    }

    #[tokio::test]
    async fn a_request_that_had_an_interim_answer_is_not_given_back() {
        // The server takes the request and says so (103), then closes: at once, a little
        // later (so that the client has gone back to waiting), or with a reset.
        for (pause, reset) in [(0, false), (50, false), (0, true)] {
            let (addr, server) = serve_one(move |mut stream| async move {
                for answer in
                    [&b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"[..], b"HTTP/1.1 103 Early Hints\r\n\r\n"]
                {
                    read_request(&mut stream).await;
                    stream.write_all(answer).await.expect("write");
                }
                tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                if reset {
                    let stream = stream.into_std().expect("std stream");
                    socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO)).expect("linger");
                }
            })
            .await;
            let sent = exchange(reused(addr).await, get()).await;
            server.await.expect("server");
            assert!(matches!(sent, Err(SendError { unsent: None, .. })), "pause {pause} ms, reset {reset}: {sent:?}");
        }
    }

    #[tokio::test]
    async fn the_request_head_stays_whole_until_a_final_answer_then_its_map_holds_the_response() {
        let (addr, server) = scripted(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\nx-agent: 2\r\nconnection: x-hop\r\nx-hop: 1\r\n\r\n",
        ])
        .await;
        let conn = reused(addr).await;
        let (mut head, body) = get().into_parts();
        head.headers.insert("x-conversation", HeaderValue::from_static("c-1"));
        let capacity = head.headers.capacity();
        let response = conn.send(&mut head, body, None, None).await.expect("a response");
        server.await.expect("server");
        assert!(head.headers.is_empty(), "the request's map went to the response");
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        assert_eq!(response.headers().len(), 1, "{:?}", response.headers());
        assert_eq!(response.headers()["x-agent"], "2");
        assert!(response.headers().capacity() >= capacity);

        // A send that fails before any answer leaves the head as it was, for a retry.
        let (addr, server) = scripted(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"]).await;
        let conn = reused(addr).await;
        server.await.expect("server");
        let (mut head, body) = get().into_parts();
        head.headers.insert("x-conversation", HeaderValue::from_static("c-1"));
        let sent = conn.send(&mut head, body, None, None).await;
        assert!(matches!(sent, Err(SendError { unsent: Some(_), .. })), "{sent:?}");
        assert_eq!(head.headers["x-conversation"], "c-1");
        assert_eq!(head.headers[header::HOST], "agent");
    }

    #[tokio::test]
    async fn a_fresh_connections_failure_is_not_retried() {
        let (addr, server) = scripted(vec![]).await;
        let conn = open(addr).await;
        server.await.expect("server");
        let sent = exchange(conn, get()).await;
        assert!(matches!(sent, Err(SendError { unsent: None, .. })), "{sent:?}");
    }

    /// A GET sent with `home` as its pool, to a server that answers it with `answer`
    /// only once the request is on its way, and whose answer is in the client's socket,
    /// unread, when the send is dropped: a client that hung up just as its answer came
    /// back. The server answers a second request on the same connection, if one comes, with
    /// a 204, and returns the requests it read.
    async fn dropped_once_answered(answer: &'static [u8], home: &Pool) -> tokio::task::JoinHandle<Vec<String>> {
        let (got, got_rx) = tokio::sync::oneshot::channel();
        let (go, go_rx) = tokio::sync::oneshot::channel::<()>();
        let (addr, server) = serve_one(move |mut stream| async move {
            stream.set_nodelay(true).expect("nodelay");
            let mut seen = vec![read_request(&mut stream).await];
            let _ = got.send(());
            go_rx.await.expect("go");
            stream.write_all(answer).await.expect("answer");
            let next = read_request(&mut stream).await;
            if !next.is_empty() {
                seen.push(next);
                stream.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await.expect("second answer");
            }
            seen
        })
        .await;
        // A second handle on the socket, to see the answer arrive without reading it.
        let socket = std::net::TcpStream::connect(addr).expect("connect");
        socket.set_nonblocking(true).expect("nonblocking");
        let probe = TcpStream::from_std(socket.try_clone().expect("clone")).expect("probe");
        let conn = Connection::new(TcpStream::from_std(socket).expect("stream"), addr);

        let (mut head, body) = get().into_parts();
        let send = conn.send(&mut head, body, None, Some(home));
        tokio::pin!(send);
        tokio::select! {
            sent = &mut send => panic!("answered before the server answered: {sent:?}"),
            got = got_rx => got.expect("the server read the request"),
        }
        go.send(()).expect("go");
        let mut arrived = vec![0u8; answer.len()];
        let n = probe.peek(&mut arrived).await.expect("peek");
        assert_eq!(&arrived[..n], answer, "the whole answer is in the socket");
        server
    }

    #[tokio::test]
    async fn a_dropped_request_whose_whole_answer_came_gives_its_connection_back() {
        let pool = Pool::default();
        let server = dropped_once_answered(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", &pool).await;
        let conn =
            pool.take(tokio::time::Instant::now(), std::time::Duration::from_secs(60)).expect("back in the pool");
        assert!(conn.read.is_empty(), "the answer was thrown away");

        // The next request on it gets its own answer, not the rest of the last one.
        let response = exchange(conn, get()).await.expect("a response");
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        let (_, _, reusable) = read_all(response).await;
        drop(reusable);
        let seen = server.await.expect("server");
        assert_eq!(seen.len(), 2, "both requests on the one connection: {seen:?}");

        // Interim answers before the final one, and an answer that has no body whatever
        // its length says, too.
        for answer in [
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"[..],
            b"HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n",
        ] {
            let pool = Pool::default();
            let server = dropped_once_answered(answer, &pool).await;
            let kept = pool.take(tokio::time::Instant::now(), std::time::Duration::from_secs(60));
            assert!(kept.is_some(), "{:?}", String::from_utf8_lossy(answer));
            drop(kept);
            assert_eq!(server.await.expect("server").len(), 1);
        }
    }

    #[tokio::test]
    async fn a_dropped_request_closes_its_connection_unless_the_answer_is_whole_and_keeps_it_open() {
        for answer in [
            // More to come.
            &b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nok"[..],
            &b"HTTP/1.1 200 OK\r\ncontent-le"[..],
            // More than the answer: the server is out of step.
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nok",
            // The server is closing, or the length is not known until it does.
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
            b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\n\r\nok",
            // Whole, but chunked: not worth parsing on the way out.
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
            b"HTTP/1.1 2xx broken\r\n\r\n",
        ] {
            let pool = Pool::default();
            let server = dropped_once_answered(answer, &pool).await;
            let kept = pool.take(tokio::time::Instant::now(), std::time::Duration::from_secs(60));
            assert!(kept.is_none(), "{:?}", String::from_utf8_lossy(answer));
            // Closed: the server's read of a next request ends.
            assert_eq!(server.await.expect("server").len(), 1);
        }
    }
}
