//! The hot path: accepting connections, serving HTTP/1.1 and h2c on them, and proxying
//! each request to a server chosen from the current route table.
//!
//! ```text
//! listener → connection (hyper: h1, or auto for h2c) → serve_request: table = reader.load()  (once)
//!   → Outbound::new: table.route(host, path) → route.pick_backend → backend.pick_server
//!   → attempts (connect retry, request timeout, drain replay)
//!   → Outbound::answer → response body streams back
//! ```
//!
//! This module reads the table and never writes it; it knows nothing of the control path.

mod body;
mod boundary;
mod conn;
mod error;
mod listener;
mod tunnel;

use std::convert::Infallible;
use std::future::Future as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;

use bytes::BytesMut;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use body::{BodyError, ResponseBody, END_GRACE};
pub use error::ProxyError;
pub use listener::bind;

use crate::config::Sticky;
use crate::headers::{self, ConnectionOptions, Forward};
use crate::metrics::Traffic;
use crate::mirror::shape::Kind;
use crate::mirror::{Primary, MIRROR_HEADER};
use crate::routes::{self, Backend, DrainOutcome, InFlight, Route, Server, Table, TableReader};
use crate::upstream::{self, RequestBody, SendError};
use conn::{ClientIo, ConnShared, Speaks, Timeouts, H2_PREFACE};

/// Extra hyper read buffer above the configured header limit, so that a head just over
/// the limit still reaches the handler and gets a 431 with a body naming the cause.
const HEADER_SLACK: usize = 16 * 1024;

/// When draining, how long an idle keep-alive connection may still bring one more request
/// (answered with `Connection: close`) before it is closed. Closing it at once would race a
/// client that is sending on it just then.
const DRAIN_IDLE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// The proxy: shared by every connection of every listener.
#[derive(Debug)]
pub struct Proxy {
    table: TableReader,
    /// Every connection and tunnel, so that shutdown can wait for them.
    connections: TaskTracker,
    /// Cancelled when switchyard drains: connections finish what they serve and close
    /// (`Connection: close` on HTTP/1, GOAWAY on h2).
    drain: CancellationToken,
}

/// What a connection knows about its client, shared by its requests.
#[derive(Debug)]
struct Client {
    proxy: Arc<Proxy>,
    /// The peer's IP, ready to append to `X-Forwarded-For`.
    ip: HeaderValue,
    shared: Arc<ConnShared>,
}

impl Proxy {
    pub fn new(table: TableReader, connections: TaskTracker, drain: CancellationToken) -> Arc<Self> {
        Arc::new(Proxy { table, connections, drain })
    }

    /// Accepts connections until `stop` is cancelled.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    self.connections.spawn(self.clone().serve_connection(stream, peer));
                }
                Err(e) => {
                    // Out of file descriptors or similar: back off briefly instead of
                    // spinning on an accept that keeps failing.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
        // Connections the kernel queued before we stopped would be reset when the
        // listener closes: take them in and serve them (they will be told to close).
        while let Ok(Ok((stream, peer))) = tokio::time::timeout(std::time::Duration::ZERO, listener.accept()).await {
            self.connections.spawn(self.clone().serve_connection(stream, peer));
        }
    }

    async fn serve_connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let defaults = self.table.load().defaults.clone();
        let drain = self.drain.clone();
        // A client that sends nothing is closed after the idle timeout, as between requests.
        let protocol = tokio::select! {
            peeked = tokio::time::timeout(defaults.idle_timeout, sniff(&stream)) => match peeked {
                Ok(protocol) => protocol,
                Err(_) => return,
            },
            // Decided below, where shutdown gives an idle connection its grace period.
            _ = drain.cancelled() => Protocol::Undecided,
        };
        let shared = Arc::new(ConnShared::default());
        let io = TokioIo::new(ClientIo::new(
            stream,
            shared.clone(),
            Timeouts { idle: defaults.idle_timeout, header_read: defaults.header_read_timeout },
        ));
        let ip = HeaderValue::from_str(&peer.ip().to_string()).unwrap_or(HeaderValue::from_static("unknown"));
        let conn_shared = shared.clone();
        let client = Arc::new(Client { proxy: self, ip, shared });

        let service = service_fn(move |req| serve_request(client.clone(), req));
        // hyper's default of 100 headers stays: a larger max_headers makes it heap-allocate
        // two arrays of that size for every request it parses.
        let header_limit = defaults.max_request_header_bytes + HEADER_SLACK;
        let max_buf_size = header_limit.max(8192);
        let result = match protocol {
            Protocol::Http1 => {
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder.max_buf_size(max_buf_size).header_read_timeout(None);
                let conn = std::pin::pin!(builder.serve_connection(io, service).with_upgrades());
                until_drained(conn, |c| c.graceful_shutdown(), &drain, &conn_shared).await.map_err(Into::into)
            }
            // Boxed: `auto`'s connection is twice the size of HTTP/1's, and every connection's
            // task would be that large, touched in full when it is spawned (1 KiB more for
            // each held long-poll), were it kept inline for the few clients that need it.
            Protocol::Undecided => {
                Box::pin(serve_auto(io, service, max_buf_size, header_limit as u32, &drain, &conn_shared)).await
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "client connection ended with an error");
        }
    }
}

/// One request on a client connection, from its head to the head of its response.
///
/// This future is what a connection holds while its request waits upstream (all of a
/// long-poll), and hyper moves it into place for every request, so it is kept small: the
/// work before the wait ([`Outbound::new`]) and after it ([`Outbound::answer`]) is done in
/// plain functions, and only what lives across the wait is kept here. (A future keeps room
/// for every local that was ever borrowed, and for each by-value argument of every async
/// function it awaits: written as nested async functions, it was 3.6 KiB.)
///
/// Large values are moved as little as possible, since each move is a copy of it: the
/// head stays here and is borrowed, connections to servers move as boxes, and the response
/// goes through as few wrappers as it can (`benches/HISTORY.md`, session 17).
async fn serve_request(client: Arc<Client>, req: Request<Incoming>) -> Result<Response<ResponseBody>, Infallible> {
    let active = client.shared.begin();
    let table = client.proxy.table.load();
    let (mut head, body) = req.into_parts();
    let http1 = head.version < Version::HTTP_2;
    let mut response = match Outbound::new(&table, &mut head, body, &client) {
        Ok((outbound, body)) => {
            let mut first = None;
            let sent = attempts(&table, &outbound, &mut head, body, &mut first).await;
            outbound.answer(&table, sent, first, &client)
        }
        Err(e) => {
            if e.is_before_route() {
                table.unrouted.record(e.status(), None);
            }
            e.into_response()
        }
    };
    if http1 && client.shared.draining() && response.status() != StatusCode::SWITCHING_PROTOCOLS {
        // hyper closes the connection after writing this response.
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response.body_mut().set_active(active);
    Ok(response)
}

/// What was decided from a request's head: where it goes, and what its answer needs.
struct Outbound<'t> {
    route: &'t Route,
    backend: &'t Backend,
    server: &'t Arc<Server>,
    traffic: &'t Traffic,
    sticky_hash: Option<u64>,
    /// The sticky cookie to set, when the client had none.
    new_cookie: Option<HeaderValue>,
    /// The client's side of an upgrade it asked for (the protocol is in `forward`).
    upgrade: Option<OnUpgrade>,
    /// How the request's head changes on its way.
    forward: Forward,
    /// The primary's half of a mirrored request.
    primary: Option<Primary>,
}

impl<'t> Outbound<'t> {
    /// Routes the request, and turns its head, in place, into the one sent upstream.
    fn new(
        table: &'t Table,
        head: &mut Parts,
        body: Incoming,
        client: &Client,
    ) -> Result<(Outbound<'t>, RequestBody), ProxyError> {
        let limits = &table.defaults;
        let size = headers::head_size(&head.headers);
        if size > limits.max_request_header_bytes {
            return Err(ProxyError::HeadersTooLarge { size, limit: limits.max_request_header_bytes });
        }

        // Everything decided from the request head, while it is borrowed.
        let (route, backend, sticky_hash, new_cookie, host, target) = {
            let host = request_host(head)?;
            let path = routes::normalize_path(head.uri.path())?;
            // The origin-form target sent to the server, when it is not the client's as is.
            let target = match &path {
                std::borrow::Cow::Owned(normal) => Some(origin_form(&head.uri, Some(normal))?),
                std::borrow::Cow::Borrowed(_) if head.uri.scheme().is_some() => Some(origin_form(&head.uri, None)?),
                std::borrow::Cow::Borrowed(_) => None,
            };
            let host_str = host.as_ref().map_or("", |h| h.to_str().unwrap_or(""));
            let route = table
                .route(host_str, &path)
                .ok_or_else(|| ProxyError::NoRoute { host: host_str.to_string(), path: path.to_string() })?;
            let (sticky_hash, new_cookie) = sticky_key(route, &head.headers);
            let bucket = sticky_hash.map_or_else(|| fastrand::u32(0..crate::config::ALL), routes::bucket);
            let overridden =
                route.override_header.as_ref().and_then(|h| head.headers.get(h)).map(HeaderValue::as_bytes);
            let Some(backend) = route.pick_backend(table, bucket, overridden) else {
                let e = ProxyError::NoServer { route: route.name.clone() };
                route.unbacked.record(e.status(), None);
                return Err(e);
            };
            (route, backend, sticky_hash, new_cookie, host, target)
        };
        let traffic = route.traffic(table, backend);
        // Refusals from here on are counted against the route and backend; those before,
        // by the caller.
        let Some(server) = backend.pick_server(sticky_hash, None) else {
            // A backend named by the override header, or one that lost its last server
            // a moment ago.
            let e = ProxyError::BackendDown { route: route.name.clone(), backend: backend.name.clone() };
            traffic.record(e.status(), None);
            return Err(e);
        };

        let connection = ConnectionOptions::of(&head.headers);
        let asked = requested_upgrade(head, &connection);
        // What `hyper::upgrade::on` does with a whole request. hyper adds the extension to
        // every HTTP/1.1 request with an `Upgrade` header, so an upgrade asked for has it;
        // what depends on whether one was asked for looks at `forward.upgrade`.
        let upgrade = if asked.is_some() { head.extensions.remove::<OnUpgrade>() } else { None };
        let forward = Forward {
            host,
            client_ip: client.ip.clone(),
            via: match head.version {
                Version::HTTP_2 => "2.0 switchyard",
                Version::HTTP_10 => "1.0 switchyard",
                _ => "1.1 switchyard",
            },
            upgrade: asked,
            connection,
            shadow_copy: false,
        };
        if let Some(target) = target {
            head.uri = target;
        }
        head.version = Version::HTTP_11;
        // A sampled share is copied to the route's shadow; upgrades never are.
        let (body, primary) = match &route.mirror {
            Some(mirror) => {
                // Only switchyard marks copies, so that the shadow can trust the mark.
                head.headers.remove(&MIRROR_HEADER);
                if forward.upgrade.is_none() && mirror.sampled() {
                    mirror.start(head, &forward, body)
                } else {
                    (RequestBody::Client(body), None)
                }
            }
            None => (RequestBody::Client(body), None),
        };
        let outbound = Outbound { route, backend, server, traffic, sticky_hash, new_cookie, upgrade, forward, primary };
        Ok((outbound, body))
    }

    /// The client's response, from the server's (or from the failure to get one).
    /// `first` is when the first attempt started, if one did.
    ///
    /// It returns the response itself, not a `Result`: a response is copied into every
    /// wrapper it moves through, so refusals are answered where they are found.
    fn answer(
        self,
        table: &Table,
        sent: Result<(Response<upstream::ResponseBody>, InFlight, Instant), ProxyError>,
        first: Option<Instant>,
        client: &Client,
    ) -> Response<ResponseBody> {
        let Outbound { route, backend, traffic, new_cookie, upgrade, forward, primary, .. } = self;
        let (response, in_flight, answered) = match sent {
            Ok(sent) => sent,
            Err(e) => {
                // A failure is the rare path: one more clock read.
                let latency = first.map_or(std::time::Duration::ZERO, |started| started.elapsed());
                traffic.record(e.status(), Some(latency));
                if let Some(primary) = primary {
                    primary.failed(e.status());
                }
                return e.into_response();
            }
        };
        let latency = answered.saturating_duration_since(first.unwrap_or(answered));
        let digest = primary.map(|p| p.answered(&response));
        let limits = &table.defaults;

        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = upgrade else {
                let e = ProxyError::UnaskedUpgrade { route: route.name.clone(), backend: backend.name.clone() };
                traffic.record(e.status(), None);
                return e.into_response();
            };
            traffic.record(StatusCode::SWITCHING_PROTOCOLS, Some(latency));
            let (mut parts, body) = response.into_parts();
            // A 101 from `send` always carries its connection; this is only for the type.
            let Some(server_upgrade) = body.into_upgraded() else {
                return ProxyError::Upstream {
                    route: route.name.clone(),
                    backend: backend.name.clone(),
                    server: in_flight.server().label.clone(),
                    source: upstream::Error::Malformed("a 101 without its connection"),
                }
                .into_response();
            };
            // The server's `Upgrade` came with its 101 (see `upstream::Connection::send`).
            parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            client.shared.mark_upgraded();
            let websocket = forward.upgrade.is_some_and(|asked| asked.as_bytes().eq_ignore_ascii_case(b"websocket"));
            client.proxy.connections.spawn(tunnel::run(
                client_upgrade,
                server_upgrade,
                in_flight,
                limits.stream_idle_timeout,
                websocket,
            ));
            return Response::from_parts(parts, ResponseBody::empty());
        }

        traffic.record(response.status(), Some(latency));
        // Hop-by-hop headers were left out of the map as the head was read.
        let (mut parts, body) = response.into_parts();
        if let Some(cookie) = new_cookie {
            parts.headers.append(header::SET_COOKIE, cookie);
        }
        // A connection that was offered an upgrade and declined it is not reused: its
        // state is whatever the server made of the offer.
        let reusable = forward.upgrade.is_none();
        let event_stream = Kind::of(&parts.headers) == Kind::EventStream;
        let mut body = ResponseBody::upstream(body, reusable, in_flight, limits.stream_idle_timeout, event_stream);
        if let Some(digest) = digest {
            body.compare(digest);
        }
        Response::from_parts(parts, body)
    }
}

/// What a new client connection speaks, told from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// Certainly HTTP/1: served by hyper's HTTP/1 connection directly.
    Http1,
    /// HTTP/2's preface, or too few bytes yet to tell: hyper-util's `auto` reads them and
    /// decides.
    Undecided,
}

/// Tells HTTP/1 from HTTP/2 (prior knowledge) by peeking at the connection's first bytes,
/// one system call per connection. Serving HTTP/1 directly, rather than through `auto`,
/// spares every connection `auto`'s first 24-byte read, after which hyper grows its read
/// buffer to 16 KiB where 8 KiB serves: 8 KiB less for each connection held open, which
/// is most of a long-poll's cost.
async fn sniff(stream: &TcpStream) -> Protocol {
    let mut first = [0u8; H2_PREFACE.len()];
    match stream.peek(&mut first).await {
        Ok(n) if Speaks::Undecided(0).after(&first[..n]) == Speaks::Http1 => Protocol::Http1,
        // HTTP/2, a preface cut short, the client gone: `auto` finds out.
        _ => Protocol::Undecided,
    }
}

/// Serves a connection that may speak HTTP/2 (prior knowledge) through hyper-util's
/// `auto`, which tells the protocols apart by reading the first bytes.
async fn serve_auto<S>(
    io: TokioIo<ClientIo>,
    service: S,
    max_buf_size: usize,
    max_header_list: u32,
    drain: &CancellationToken,
    shared: &ConnShared,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<ResponseBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().max_buf_size(max_buf_size).header_read_timeout(None);
    builder.http2().max_header_list_size(max_header_list);
    let conn = std::pin::pin!(builder.serve_connection_with_upgrades(io, service));
    until_drained(conn, |c| c.graceful_shutdown(), drain, shared).await
}

/// Serves a client connection to its end. When switchyard drains, busy clients learn of
/// the shutdown from their next response (`Connection: close`); idle ones get a moment to
/// send one more request before the connection is closed (GOAWAY on h2).
async fn until_drained<C, E>(
    mut conn: std::pin::Pin<&mut C>,
    graceful_shutdown: fn(std::pin::Pin<&mut C>),
    drain: &CancellationToken,
    shared: &ConnShared,
) -> Result<(), E>
where
    C: std::future::Future<Output = Result<(), E>>,
{
    tokio::select! {
        result = conn.as_mut() => result,
        _ = drain.cancelled() => {
            shared.start_draining();
            tokio::select! {
                result = conn.as_mut() => result,
                _ = tokio::time::sleep(DRAIN_IDLE_GRACE) => {
                    graceful_shutdown(conn.as_mut());
                    conn.await
                }
            }
        }
    }
}

/// Sends `req` to the outbound's server, on a pooled connection if one is idle. A connect
/// failure, which happens before any byte of the request is sent, is retried once on
/// another server of the same backend; a pooled connection found closed is replaced. A
/// drain deadline that passes while the request waits for its response head replays it
/// once on another server of the backend if it is idempotent and bodiless, and cuts it
/// otherwise.
///
/// `first` gets the start of the first attempt, and success the time its response head
/// came (for `/metrics`).
async fn attempts(
    table: &Table,
    outbound: &Outbound<'_>,
    head: &mut Parts,
    mut body: RequestBody,
    first: &mut Option<Instant>,
) -> Result<(Response<upstream::ResponseBody>, InFlight, Instant), ProxyError> {
    let Outbound { route, backend, sticky_hash, .. } = *outbound;
    let limits = &table.defaults;
    let mut server = outbound.server.clone();
    let mut connect_retried = false;
    // Requests that may be replayed keep a copy of their head, owning its bytes in one
    // allocation (see `replay_copy`): a long-poll that then never fails. A replay goes to
    // another server of this backend, so a backend of one server (a sidecar's usual
    // version) never needs the copy, and the request is spared it.
    let replayable = is_replayable(head, &body);
    let alone = backend.servers.len() < 2;
    // Boxed: the copy is rare, and the request's future would otherwise keep room for it.
    let mut replay = if replayable && !alone { replay_copy(head).map(Box::new) } else { None };
    let mut replayed = false;
    loop {
        // One clock read serves the pool's idle check and the latency measurement.
        let started = Instant::now();
        first.get_or_insert(started);
        let in_flight = server.start_request();
        let conn = match server.pool.take(started, limits.upstream_idle_timeout) {
            Some(conn) => conn,
            None => match upstream::connect(server.addr, limits.connect_timeout).await {
                Ok(conn) => conn,
                Err(source) => {
                    outcome(backend, &server, true, started);
                    if !connect_retried {
                        if let Some(other) = backend.pick_server(sticky_hash, Some(&server)) {
                            tracing::warn!(route = %route.name, backend = %backend.name, error = %source, retry = %other.label, "connect failed; retrying on another server");
                            connect_retried = true;
                            server = other.clone();
                            continue;
                        }
                    }
                    return Err(ProxyError::Connect {
                        route: route.name.clone(),
                        backend: backend.name.clone(),
                        source,
                    });
                }
            },
        };
        let waited = {
            // Made where they are pinned, and waited on together by hand: the send is most
            // of this future's size, and `timeout` and `select!` each moved it once more.
            let mut send = std::pin::pin!(conn.send(head, body, Some(&outbound.forward), Some(&server.pool)));
            // Outside the task's cooperative budget, as `tokio::time::timeout` polls its
            // timer once the inner future has spent it: an upload that keeps the send busy
            // must not keep the timeout from being seen.
            let mut timeout =
                std::pin::pin!(tokio::task::coop::unconstrained(tokio::time::sleep(route.request_timeout)));
            let mut cut = std::pin::pin!(in_flight.cut_signal());
            let cut_already = in_flight.is_cut();
            std::future::poll_fn(|cx| {
                if let Poll::Ready(sent) = send.as_mut().poll(cx) {
                    Poll::Ready(Waited::Sent(sent))
                } else if timeout.as_mut().poll(cx).is_ready() {
                    Poll::Ready(Waited::TimedOut)
                } else if cut_already || cut.as_mut().poll(cx).is_ready() {
                    Poll::Ready(Waited::Cut)
                } else {
                    Poll::Pending
                }
            })
            .await
        };
        // One match, down to the response: each binding on the way would copy it.
        let failed = match waited {
            Waited::Sent(Ok(response)) => {
                let answered = outcome(backend, &server, response.status().is_server_error(), started);
                return Ok((response, in_flight, answered));
            }
            Waited::Sent(Err(failed)) => failed,
            Waited::TimedOut => {
                outcome(backend, &server, true, started);
                return Err(ProxyError::Timeout {
                    route: route.name.clone(),
                    backend: backend.name.clone(),
                    server: server.label.clone(),
                    after: route.request_timeout,
                });
            }
            Waited::Cut => {
                // A drain deadline passed. Dropping the send cancelled the request
                // upstream (its connection closes with it).
                let drain_cut = |why| ProxyError::DrainCut {
                    route: route.name.clone(),
                    backend: backend.name.clone(),
                    server: server.label.clone(),
                    why,
                };
                let Some(again) = replay.take() else {
                    server.drained.note(DrainOutcome::Cut);
                    return Err(drain_cut(if !replayable {
                        " (only GET, HEAD and OPTIONS without a body are replayed)"
                    } else if replayed {
                        "; it was already replayed once"
                    } else if alone {
                        "; its backend has no other server to replay it on"
                    } else {
                        "; its head could not be copied to replay it"
                    }));
                };
                let Some(other) = backend.pick_server(sticky_hash, Some(&server)) else {
                    server.drained.note(DrainOutcome::Cut);
                    return Err(drain_cut("; no other server of the backend is in rotation to replay it on"));
                };
                server.drained.note(DrainOutcome::Replayed);
                tracing::info!(route = %route.name, backend = %backend.name, from = %server.label, to = %other.label, "drain deadline: request replayed on another server");
                server = other.clone();
                *head = *again;
                body = RequestBody::Empty;
                replayed = true;
                continue;
            }
        };
        match failed {
            // The pooled connection closed under us before an answer: the server did not
            // take the request, so a fresh connection can.
            SendError { unsent: Some(unsent), error } => {
                tracing::debug!(server = %server.label, %error, "pooled connection was closed; reconnecting");
                body = unsent;
            }
            // The client's body failed (a hang-up mid-upload, broken chunked framing): held
            // against neither the server (outlier detection) nor its backend (analysis).
            SendError { error: upstream::Error::RequestBody(source), .. } => {
                return Err(ProxyError::ClientBody { route: route.name.clone(), source });
            }
            SendError { error, .. } => {
                outcome(backend, &server, true, started);
                return Err(ProxyError::Upstream {
                    route: route.name.clone(),
                    backend: backend.name.clone(),
                    server: server.label.clone(),
                    source: error,
                });
            }
        }
    }
}

/// How the wait for a response head ended.
enum Waited {
    Sent(Result<Response<upstream::ResponseBody>, SendError>),
    /// The route's `request_timeout` passed first.
    TimedOut,
    /// A drain deadline passed on the server first.
    Cut,
}

/// Whether a drain deadline may replay the request: GET, HEAD or OPTIONS, with no body.
/// Replaying anything else could repeat its effect.
fn is_replayable(head: &Parts, body: &RequestBody) -> bool {
    matches!(head.method, Method::GET | Method::HEAD | Method::OPTIONS) && body.is_end_stream()
}

/// A copy of the head of a request that a drain deadline may replay (see
/// [`is_replayable`]).
///
/// The copy owns its bytes, in one allocation. The request's own header values and target
/// are slices of the client connection's read buffer: a copy sharing them would hold that
/// buffer for as long as the request waits (all of a long-poll), and the connection would
/// allocate another one for its next read.
fn replay_copy(head: &Parts) -> Option<Parts> {
    let target = head.uri.path_and_query().map_or("/", PathAndQuery::as_str);
    let mut bytes = BytesMut::with_capacity(target.len() + head.headers.values().map(HeaderValue::len).sum::<usize>());
    bytes.extend_from_slice(target.as_bytes());
    for value in head.headers.values() {
        bytes.extend_from_slice(value.as_bytes());
    }
    let mut bytes = bytes.freeze();

    let (mut copy, ()) = Request::new(()).into_parts();
    copy.method = head.method.clone();
    copy.uri = Uri::from_maybe_shared(bytes.split_to(target.len())).ok()?;
    copy.version = head.version;
    copy.headers.reserve(head.headers.len());
    for (name, value) in &head.headers {
        let mut owned = HeaderValue::from_maybe_shared(bytes.split_to(value.len())).ok()?;
        owned.set_sensitive(value.is_sensitive());
        copy.headers.append(name.clone(), owned);
    }
    Some(copy)
}

/// Feeds the backend's measurements and passive outlier detection: failures the upstream
/// caused (connect errors, timeouts, broken connections, 5xx), never the client's.
/// Returns the moment it was recorded.
#[inline]
fn outcome(backend: &Backend, server: &Arc<Server>, failed: bool, started: Instant) -> Instant {
    let now = Instant::now();
    backend.stats.record(now, now.saturating_duration_since(started), failed);
    let others = || backend.servers.iter().any(|s| !Arc::ptr_eq(s, server) && s.in_rotation());
    if let Some(backoff) = server.record_outcome(failed, &backend.outlier, others) {
        tracing::warn!(backend = %backend.name, server = %server.label, failures = backend.outlier.failures, ?backoff, "server ejected: upstream failures in a row");
    }
    now
}

/// The host a request is for: an absolute-form target's authority wins over `Host`
/// (RFC 9112, 3.2.2); HTTP/2's `:authority` arrives the same way. HTTP/1.1 without one
/// is malformed.
fn request_host(head: &Parts) -> Result<Option<HeaderValue>, ProxyError> {
    if let Some(authority) = head.uri.authority() {
        return HeaderValue::from_str(authority.as_str())
            .map(Some)
            .map_err(|_| ProxyError::BadRequest("the request target's host is not valid"));
    }
    match head.headers.get(header::HOST) {
        Some(host) if host.to_str().is_ok() => Ok(Some(host.clone())),
        Some(_) => Err(ProxyError::BadRequest("the Host header is not valid text")),
        None if head.version == Version::HTTP_11 => {
            Err(ProxyError::BadRequest("HTTP/1.1 request without a Host header"))
        }
        None => Ok(None),
    }
}

/// The protocol a client asks to upgrade to, if it asks properly: HTTP/1.1, `Upgrade`
/// named in `Connection`. An `h2c` upgrade is not honoured (we speak h2c by prior
/// knowledge only); the request goes on as plain HTTP/1.1.
fn requested_upgrade(head: &Parts, connection: &ConnectionOptions) -> Option<HeaderValue> {
    if head.version != Version::HTTP_11 || !connection.upgrade {
        return None;
    }
    head.headers.get(header::UPGRADE).filter(|p| !p.as_bytes().eq_ignore_ascii_case(b"h2c")).cloned()
}

/// The sticky key's hash for a route that has one, and the cookie to set when the
/// route's cookie was missing (a new key, chosen here).
fn sticky_key(route: &Route, headers: &http::HeaderMap) -> (Option<u64>, Option<HeaderValue>) {
    match &route.sticky {
        None => (None, None),
        Some(Sticky::Header(name)) => (headers.get(name).map(|v| routes::key_hash(v.as_bytes())), None),
        Some(Sticky::Cookie(name)) => match find_cookie(headers, name) {
            Some(value) => (Some(routes::key_hash(value)), None),
            None => {
                let key = format!("{:016x}", fastrand::u64(..));
                let cookie = format!("{name}={key}; Path=/; HttpOnly; SameSite=Lax");
                (Some(routes::key_hash(key.as_bytes())), HeaderValue::from_str(&cookie).ok())
            }
        },
    }
}

fn find_cookie<'h>(headers: &'h http::HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers.get_all(header::COOKIE).iter().flat_map(|v| v.as_bytes().split(|&b| b == b';')).find_map(|pair| {
        let pair = pair.trim_ascii();
        let (n, v) = pair.split_at(pair.iter().position(|&b| b == b'=')?);
        (n == name.as_bytes()).then(|| &v[1..])
    })
}

/// The origin-form target (`/path?query`) sent to servers.
fn origin_form(uri: &Uri, normal_path: Option<&str>) -> Result<Uri, ProxyError> {
    let path = normal_path.unwrap_or_else(|| uri.path());
    let pq = match uri.query() {
        Some(q) => PathAndQuery::try_from(format!("{path}?{q}")),
        None if normal_path.is_some() => PathAndQuery::try_from(path.to_string()),
        None => return Ok(Uri::from(uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/")))),
    }
    .map_err(|_| ProxyError::BadRequest("the request target cannot be rebuilt"))?;
    Ok(Uri::from(pq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = http::HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; sy_cohort=abc; b=2"));
        assert_eq!(find_cookie(&h, "sy_cohort"), Some(&b"abc"[..]));
        assert_eq!(find_cookie(&h, "sy"), None);
        assert_eq!(find_cookie(&h, "b"), Some(&b"2"[..]));
    }

    #[tokio::test]
    async fn http1_is_told_apart_from_the_http2_preface_by_its_first_bytes() {
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        for (first, expected) in [
            (&b"GET / HTTP/1.1\r\n"[..], Protocol::Http1),
            (b"G", Protocol::Http1),
            (b"PUT /chat HTTP/1.1\r\n", Protocol::Http1),
            // Could still be either: left to `auto`, which reads on.
            (b"P", Protocol::Undecided),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Protocol::Undecided),
            (b"", Protocol::Undecided),
        ] {
            let mut client = TcpStream::connect(addr).await.expect("connect");
            let (server, _) = listener.accept().await.expect("accept");
            client.write_all(first).await.expect("write");
            if first.is_empty() {
                client.shutdown().await.expect("shutdown");
            }
            assert_eq!(sniff(&server).await, expected, "{:?}", String::from_utf8_lossy(first));
            // Peeking leaves the bytes for hyper.
            let mut again = [0u8; 24];
            let n = server.try_read(&mut again).unwrap_or(0);
            assert_eq!(&again[..n], &first[..n.min(first.len())]);
        }
    }

    #[test]
    fn a_replay_copy_is_the_same_request_head() {
        // As hyper parses them: the target and the header values are slices of one read
        // buffer.
        let buffer = bytes::Bytes::from(b"/poll?after=41 agent.example a b Bearer t0ken".to_vec());
        let value = |from: usize, to: usize| HeaderValue::from_maybe_shared(buffer.slice(from..to)).expect("value");
        let (mut original, body) = Request::get(Uri::from_maybe_shared(buffer.slice(0..14)).expect("uri"))
            .body(RequestBody::Empty)
            .expect("request")
            .into_parts();
        assert!(is_replayable(&original, &body), "a bodiless GET is replayable");
        let headers = &mut original.headers;
        headers.insert(header::HOST, value(15, 28));
        headers.append("x-trace", value(29, 30));
        headers.append("x-trace", value(31, 32));
        let mut secret = value(33, 45);
        secret.set_sensitive(true);
        headers.insert(header::AUTHORIZATION, secret);

        let copy = replay_copy(&original).expect("a copy");
        assert_eq!(copy.method, Method::GET);
        assert_eq!(copy.uri, "/poll?after=41");
        assert_eq!(copy.headers, original.headers);
        let trace: Vec<_> = copy.headers.get_all("x-trace").iter().collect();
        assert_eq!(trace, ["a", "b"], "repeated headers keep their order");
        assert!(copy.headers[header::AUTHORIZATION].is_sensitive());
        assert_eq!(copy.headers[header::AUTHORIZATION], "Bearer t0ken");
        drop(original);
        assert!(buffer.is_unique(), "the copy holds none of the read buffer");

        let (post, body) = Request::post("/chat").body(RequestBody::Empty).expect("request").into_parts();
        assert!(!is_replayable(&post, &body), "a POST could repeat its effect");
        let (get, body) =
            Request::get("/chat").body(RequestBody::Whole(Some("x".into()))).expect("request").into_parts();
        assert!(!is_replayable(&get, &body), "nor could a GET with a body");
    }

    #[test]
    fn targets_become_origin_form() {
        let abs: Uri = "http://example.com/a/../b?x=1".parse().expect("uri");
        assert_eq!(origin_form(&abs, Some("/b")).expect("ok"), "/b?x=1");
        let plain: Uri = "http://example.com/a".parse().expect("uri");
        assert_eq!(origin_form(&plain, None).expect("ok"), "/a");
    }
}
