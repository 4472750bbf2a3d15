//! The HTTP/1.1 client switchyard speaks to its servers.
//!
//! A request is written and its response read by the task that proxies it: there is no
//! connection task, no channel to one, and no wake-up between the two. The connection
//! travels with the request and then inside the response's body, and the body hands it
//! back (for the pool) once it has been read to its end. hyper's client spent about as
//! many instructions on that hand-over as on the HTTP itself (README, Performance).
//!
//! Parsing is httparse's, as in hyper. The framing rules are RFC 9112's, applied
//! strictly, because a pooled connection that lost track of where one response ends
//! would hand the rest of it to the next client: a connection is reused only after a
//! response whose length was known (`Content-Length` or chunked) was read to its end,
//! with not one byte more in the buffer, from a server that did not ask to close.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::RequestBody;
use crate::proxy::headers::connection_has;

/// The most a response head (status line and headers) may take.
pub const MAX_HEAD: usize = 64 * 1024;
/// The most header lines a response head may have.
const MAX_HEADERS: usize = 100;
/// What one read asks the kernel for.
const READ_SIZE: usize = 8 * 1024;
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

/// A failed [`Connection::send`]. `unsent` gives the request back when it can safely go
/// out again on a fresh connection: see [`Connection::send`].
#[derive(Debug)]
pub struct SendError {
    pub error: Error,
    pub unsent: Option<Box<Request<RequestBody>>>,
}

/// An open connection to a server, between requests.
#[derive(Debug)]
pub struct Connection {
    io: TcpStream,
    /// Bytes read and not yet used. Empty between requests.
    read: BytesMut,
    /// The request head as it is written; kept for its capacity.
    head: Vec<u8>,
    /// Whether the connection has carried a request before this one.
    reused: bool,
}

impl Connection {
    pub fn new(io: TcpStream) -> Self {
        Connection { io, read: BytesMut::new(), head: Vec::new(), reused: false }
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

    /// Sends `req` and reads the response head. The response's body owns the connection
    /// from then on.
    ///
    /// A request without a body, with an idempotent method, that fails on a reused
    /// connection before any byte of a response came back is given back in
    /// [`SendError::unsent`]: the server most likely closed the idle connection just as
    /// the request went out (the keep-alive race), and a fresh connection can take it.
    pub async fn send(mut self, req: Request<RequestBody>) -> Result<Response<Body>, SendError> {
        let (parts, mut body) = req.into_parts();
        let framing = Framing::of_request(&parts.headers, &body);
        self.head.clear();
        encode_head(&mut self.head, &parts, framing);
        let head_request = parts.method == Method::HEAD;

        if framing == Framing::Length(0) {
            // Nearly every request: the head is all of it.
            let exchanged = match self.io.write_all(&self.head).await {
                Ok(()) => poll_fn(|cx| poll_head(&mut self.io, &mut self.read, cx)).await,
                Err(e) => Err(e.into()),
            };
            return match exchanged {
                Ok(head) => self.respond(head, head_request, true),
                Err(error) => {
                    let retry = self.reused
                        && self.read.is_empty()
                        && parts.method.is_idempotent()
                        && matches!(error, Error::Closed | Error::Io(_));
                    let unsent = retry.then(|| Box::new(Request::from_parts(parts, body)));
                    Err(SendError { error, unsent })
                }
            };
        }

        // A body is written while the response head is awaited: a server may answer
        // (413, 401) before it has read all of it.
        let (answer, written) = {
            let Connection { io, read, head, .. } = &mut self;
            let (mut reader, mut writer) = io.split();
            let write = async {
                writer.write_all(head).await?;
                write_body(&mut writer, &mut body, framing).await
            };
            tokio::pin!(write);
            let mut written = None;
            loop {
                tokio::select! {
                    biased;
                    result = &mut write, if written.is_none() => match result {
                        // The client hung up mid-body: nothing more to do here.
                        Err(error @ Error::RequestBody(_)) => return Err(SendError { error, unsent: None }),
                        // The server may have answered before it stopped reading.
                        result => written = Some(result),
                    },
                    head = poll_fn(|cx| poll_head(&mut reader, read, cx)) => break (head, written),
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
        self.respond(head, head_request, request_done)
    }

    /// The response to a request whose head came back as `head`; refused if its framing
    /// is broken.
    fn respond(mut self, head: Head, head_request: bool, request_done: bool) -> Result<Response<Body>, SendError> {
        self.reused = true;
        let Head { status, version, headers } = head;
        let (state, keep_alive) = if status == StatusCode::SWITCHING_PROTOCOLS {
            // The connection is the tunnel's now (see `Body::into_upgraded`).
            (State::Done, false)
        } else {
            match Framing::of_response(status, version, &headers, head_request) {
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

/// A response head, parsed.
#[derive(Debug)]
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
}

/// Reads until a final response head is in `buf`, skipping interim (1xx) responses but
/// 101, and parses it. What follows the head stays in `buf`.
fn poll_head<R: AsyncRead + Unpin>(io: &mut R, buf: &mut BytesMut, cx: &mut Context<'_>) -> Poll<Result<Head, Error>> {
    let mut interim = 0;
    loop {
        if !buf.is_empty() {
            match parse_head(buf)? {
                Some(head) if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS => {
                    interim += 1;
                    if interim > MAX_INTERIM {
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
            return Poll::Ready(Err(if had == 0 { Error::Closed } else { Error::ClosedMidResponse }));
        }
    }
}

/// Parses a complete response head off the front of `buf`, or `None` if it is not all
/// there yet. Header values share the head's bytes rather than being copied.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, Error> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut response, buf, &mut slots);
    let len = match parsed? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    let status = response.code.and_then(|c| StatusCode::from_u16(c).ok()).ok_or(Error::Malformed("bad status"))?;
    let version = if response.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    // Where each name and value lies in `buf`, to slice them out of the frozen head.
    let base = buf.as_ptr() as usize;
    let mut spans = [(0usize, 0usize, 0usize, 0usize); MAX_HEADERS];
    let count = response.headers.len();
    for (span, h) in spans.iter_mut().zip(response.headers.iter()) {
        let name = h.name.as_ptr() as usize - base;
        let value = h.value.as_ptr() as usize - base;
        *span = (name, name + h.name.len(), value, value + h.value.len());
    }
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    for &(name_start, name_end, value_start, value_end) in &spans[..count] {
        let name =
            HeaderName::from_bytes(&head[name_start..name_end]).map_err(|_| Error::Malformed("bad header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(value_start..value_end))
            .map_err(|_| Error::Malformed("bad header value"))?;
        headers.append(name, value);
    }
    Ok(Some(Head { status, version, headers }))
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
    /// How a request's body goes out. Its `Transfer-Encoding` was removed as hop-by-hop;
    /// a `Content-Length` the client sent stands (hyper checked it).
    fn of_request(headers: &HeaderMap, body: &RequestBody) -> Framing {
        if let Some(length) = headers.get(header::CONTENT_LENGTH).and_then(|v| content_length(v.as_bytes())) {
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
        headers: &HeaderMap,
        head_request: bool,
    ) -> Result<(Framing, bool), Error> {
        let keep_alive = version == Version::HTTP_11 && !connection_has(headers, "close");
        if head_request
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return Ok((Framing::Length(0), keep_alive));
        }
        if headers.contains_key(header::TRANSFER_ENCODING) {
            // Both headers: a message built to be read two ways. Read it the one way the
            // RFC says, and never reuse the connection.
            let both = headers.contains_key(header::CONTENT_LENGTH);
            return Ok(if last_coding_is_chunked(headers) {
                (Framing::Chunked, keep_alive && !both)
            } else {
                (Framing::Close, false)
            });
        }
        let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
        let Some(first) = lengths.next() else { return Ok((Framing::Close, false)) };
        let length = content_length(first.as_bytes()).ok_or(Error::Malformed("invalid Content-Length"))?;
        if lengths.any(|v| content_length(v.as_bytes()) != Some(length)) {
            return Err(Error::Malformed("conflicting Content-Length headers"));
        }
        Ok((Framing::Length(length), keep_alive))
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

/// Whether the last transfer coding of the message is `chunked`.
fn last_coding_is_chunked(headers: &HeaderMap) -> bool {
    let last = headers.get_all(header::TRANSFER_ENCODING).iter().next_back();
    last.and_then(|v| v.as_bytes().rsplit(|&b| b == b',').next())
        .is_some_and(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// Writes the request line and headers, with the framing header for `framing`.
fn encode_head(out: &mut Vec<u8>, parts: &http::request::Parts, framing: Framing) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.uri.path_and_query().map_or("/", |pq| pq.as_str()).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let has_length = parts.headers.contains_key(header::CONTENT_LENGTH);
    match framing {
        Framing::Length(0) if !has_length && matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) => {
            // A server may wait for a body it was not told is empty.
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        Framing::Length(0) => {}
        Framing::Length(length) if !has_length => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(length.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Length(_) => {}
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Close => unreachable!("requests are never close-delimited"),
    }
    out.extend_from_slice(b"\r\n");
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
                        out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
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
            for (name, value) in &trailers {
                out.extend_from_slice(name.as_str().as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(value.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
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
    conn: Option<Connection>,
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
    pub fn take_reusable(&mut self) -> Option<Connection> {
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
            let conn = match (&this.state, &mut this.conn) {
                (State::Done | State::Failed, _) | (_, None) => return Poll::Ready(None),
                (_, Some(conn)) => conn,
            };
            let buf = &mut conn.read;
            match &mut this.state {
                State::Length(left) | State::Chunked(Chunk::Data(left)) => {
                    if buf.is_empty() {
                        match ready!(poll_fill(&mut conn.io, buf, cx)) {
                            Ok(0) => return this.fail(Error::ClosedMidResponse),
                            Ok(_) => {}
                            Err(e) => return this.fail(e.into()),
                        }
                    }
                    let take = (*left).min(buf.len() as u64);
                    let data = buf.split_to(take as usize).freeze();
                    *left -= take;
                    if *left == 0 {
                        this.state = match this.state {
                            State::Length(_) => State::Done,
                            _ => State::Chunked(Chunk::DataEnd),
                        };
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::Close => {
                    if buf.is_empty() {
                        match ready!(poll_fill(&mut conn.io, buf, cx)) {
                            Ok(0) => {
                                this.state = State::Done;
                                return Poll::Ready(None);
                            }
                            Ok(_) => {}
                            Err(e) => return this.fail(e.into()),
                        }
                    }
                    return Poll::Ready(Some(Ok(Frame::data(buf.split().freeze()))));
                }
                State::Chunked(chunk) => {
                    // Each step needs a little more of the body than may have arrived.
                    let step = match *chunk {
                        Chunk::Size => match httparse::parse_chunk_size(buf) {
                            Ok(httparse::Status::Complete((used, size))) => {
                                buf.advance(used);
                                *chunk = if size == 0 { Chunk::Trailers } else { Chunk::Data(size) };
                                None
                            }
                            Ok(httparse::Status::Partial) if buf.len() < 1024 => Some(()),
                            _ => return this.fail(Error::Malformed("invalid chunk size line")),
                        },
                        Chunk::DataEnd if buf.len() < 2 => Some(()),
                        Chunk::DataEnd if buf.starts_with(b"\r\n") => {
                            buf.advance(2);
                            *chunk = Chunk::Size;
                            None
                        }
                        Chunk::DataEnd => return this.fail(Error::Malformed("chunk data longer than its size")),
                        Chunk::Trailers => {
                            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
                            match httparse::parse_headers(buf, &mut slots) {
                                Ok(httparse::Status::Complete((used, fields))) => {
                                    let trailers = trailer_map(fields);
                                    buf.advance(used);
                                    this.state = State::Done;
                                    match trailers {
                                        Some(map) if !map.is_empty() => {
                                            return Poll::Ready(Some(Ok(Frame::trailers(map))))
                                        }
                                        Some(_) => return Poll::Ready(None),
                                        None => return this.fail(Error::Malformed("invalid trailer field")),
                                    }
                                }
                                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => Some(()),
                                Ok(httparse::Status::Partial) => return this.fail(Error::HeadTooLarge),
                                Err(e) => return this.fail(e.into()),
                            }
                        }
                        Chunk::Data(_) => unreachable!("matched above"),
                    };
                    if step.is_some() {
                        match ready!(poll_fill(&mut conn.io, buf, cx)) {
                            Ok(0) => return this.fail(Error::ClosedMidResponse),
                            Ok(_) => {}
                            Err(e) => return this.fail(e.into()),
                        }
                    }
                }
                State::Done | State::Failed => unreachable!("returned above"),
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
