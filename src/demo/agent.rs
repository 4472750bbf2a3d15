//! A small example agent: the kind of server switchyard stands in front of. It answers
//! with its version, streams SSE tokens like a model does, and holds long-polls.
//!
//! - `GET /health` → `ok <version>`
//! - `GET|POST /chat?tokens=N` → an SSE stream of N token events 20 ms apart, then `[DONE]`
//! - `GET /poll?ms=N` → answers after N ms (at most 60 s)
//! - anything else → `{"version": ..., "path": ...}`
//!
//! Every answer carries `x-agent-version`. A faulty agent ([`Agent::faulty`]) answers
//! every Nth request (health checks aside) with a 500, like a bad build. A chatty one
//! ([`Agent::chatty`]) streams more tokens than asked for, like a build whose model runs on.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const TOKEN_GAP: Duration = Duration::from_millis(20);

/// A running example agent; stops when dropped.
#[derive(Debug)]
pub struct Agent {
    pub addr: SocketAddr,
    pub version: String,
    stop: CancellationToken,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Agent {
    /// Starts an agent on 127.0.0.1 on a free port.
    pub async fn start(version: &str) -> std::io::Result<Agent> {
        Self::start_with(version, None, 0).await
    }

    /// An agent that fails every `nth` request with a 500.
    pub async fn faulty(version: &str, nth: u64) -> std::io::Result<Agent> {
        Self::start_with(version, Some(nth.max(1)), 0).await
    }

    /// An agent that streams `extra` more tokens than each chat asks for.
    pub async fn chatty(version: &str, extra: u64) -> std::io::Result<Agent> {
        Self::start_with(version, None, extra).await
    }

    async fn start_with(version: &str, fail_every: Option<u64>, extra_tokens: u64) -> std::io::Result<Agent> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let version_header = HeaderValue::from_str(version).unwrap_or(HeaderValue::from_static("unknown"));
        let faults = fail_every.map(|n| (n, Arc::new(AtomicU64::new(0))));
        tokio::spawn(serve(listener, version_header, faults, extra_tokens, stop.clone()));
        Ok(Agent { addr, version: version.to_string(), stop })
    }
}

/// Every how many requests to fail, and the count so far.
type Faults = Option<(u64, Arc<AtomicU64>)>;

async fn serve(listener: TcpListener, version: HeaderValue, faults: Faults, extra: u64, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let version = version.clone();
        let stop = stop.clone();
        let faults = faults.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let fail = req.uri().path() != "/health"
                    && faults.as_ref().is_some_and(|(n, count)| count.fetch_add(1, Ordering::Relaxed) % n == 0);
                answer(req, version.clone(), fail, extra)
            });
            let conn = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn full(text: String) -> Body {
    Full::new(Bytes::from(text)).boxed()
}

fn json(text: String) -> Response<Body> {
    let mut r = Response::new(full(text));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn query_number(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

async fn answer(
    req: Request<Incoming>,
    version: HeaderValue,
    fail: bool,
    extra: u64,
) -> Result<Response<Body>, Infallible> {
    let v = version.to_str().unwrap_or("unknown").to_string();
    let mut response = match req.uri().path() {
        _ if fail => {
            let mut r = Response::new(full(format!("{v}: internal error (a faulty build)\n")));
            *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            r
        }
        "/health" => Response::new(full(format!("ok {v}\n"))),
        "/chat" => {
            let tokens = query_number(&req, "tokens").unwrap_or(5).min(1000) + extra;
            let mut r = Response::new(token_stream(v.clone(), tokens).boxed());
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            r
        }
        "/poll" => {
            let ms = query_number(&req, "ms").unwrap_or(1000).min(60_000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            json(format!("{{\"version\":\"{v}\",\"waited_ms\":{ms}}}\n"))
        }
        path => json(format!("{{\"version\":\"{v}\",\"path\":\"{path}\"}}\n")),
    };
    response.headers_mut().insert("x-agent-version", version);
    Ok(response)
}

/// SSE token events, one every [`TOKEN_GAP`], then `[DONE]`: written by a task as a model
/// would produce them, so the proxy's streaming is what is on show.
fn token_stream(version: String, tokens: u64) -> ChannelBody {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        for i in 0..tokens {
            tokio::time::sleep(TOKEN_GAP).await;
            let event = format!("event: token\ndata: {{\"version\":\"{version}\",\"token\":{i}}}\n\n");
            if tx.send(Bytes::from(event)).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Bytes::from_static(b"event: done\ndata: [DONE]\n\n")).await;
    });
    ChannelBody(rx)
}

/// A body fed chunk by chunk through a channel.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}
