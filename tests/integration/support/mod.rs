//! Real servers, a real proxy and real clients on 127.0.0.1 for the integration tests.

#![allow(dead_code)] // each test module uses its own part of the kit

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub type Body = BoxBody<Bytes, Infallible>;

pub fn text(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).boxed()
}

/// What a test server saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: http::Method,
    pub uri: http::Uri,
    pub headers: HeaderMap,
}

/// An HTTP server on 127.0.0.1 with a handler of the test's choosing.
pub struct TestServer {
    pub addr: SocketAddr,
    pub name: String,
    /// Connections accepted so far.
    pub connections: Arc<AtomicUsize>,
    /// Every request seen, in order.
    pub seen: Arc<Mutex<Vec<Seen>>>,
    stop: CancellationToken,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl TestServer {
    /// A server that answers every request with its name, in the body and in `x-server`.
    pub async fn named(name: &str) -> TestServer {
        let n = name.to_string();
        Self::with_handler(name, move |_req| {
            let n = n.clone();
            async move { Response::new(text(n)) }
        })
        .await
    }

    pub async fn with_handler<F, Fut>(name: &str, handler: F) -> TestServer
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        Self::start(name, true, handler).await
    }

    /// Like [`with_handler`](Self::with_handler), with keep-alive off: every connection
    /// carries one response and is closed by the server.
    pub async fn closing<F, Fut>(name: &str, handler: F) -> TestServer
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        Self::start(name, false, handler).await
    }

    async fn start<F, Fut>(name: &str, keep_alive: bool, handler: F) -> TestServer
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a test server");
        let addr = listener.local_addr().expect("local addr");
        let stop = CancellationToken::new();
        let connections = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler = Arc::new(handler);
        let server_name = http::HeaderValue::from_str(name).expect("a header-safe name");
        {
            let (stop, connections, seen) = (stop.clone(), connections.clone(), seen.clone());
            tokio::spawn(async move {
                loop {
                    let stream = tokio::select! {
                        _ = stop.cancelled() => return,
                        accepted = listener.accept() => match accepted { Ok((s, _)) => s, Err(_) => continue },
                    };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let (handler, seen, stop, server_name) =
                        (handler.clone(), seen.clone(), stop.clone(), server_name.clone());
                    tokio::spawn(async move {
                        let service = service_fn(move |req: Request<Incoming>| {
                            seen.lock().expect("lock").push(Seen {
                                method: req.method().clone(),
                                uri: req.uri().clone(),
                                headers: req.headers().clone(),
                            });
                            let fut = handler(req);
                            let server_name = server_name.clone();
                            async move {
                                let mut response = fut.await;
                                response.headers_mut().insert("x-server", server_name);
                                Ok::<_, Infallible>(response)
                            }
                        });
                        let mut builder = hyper::server::conn::http1::Builder::new();
                        builder.keep_alive(keep_alive);
                        let conn = builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
                        tokio::select! {
                            _ = conn => {}
                            _ = stop.cancelled() => {}
                        }
                    });
                }
            });
        }
        TestServer { addr, name: name.to_string(), connections, seen, stop }
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    pub fn request_count(&self) -> usize {
        self.seen.lock().expect("lock").len()
    }
}

/// An address where nothing listens, so that a connection to it is refused. Its port stays
/// bound (without listening) for the rest of the test run: released, it could be taken by
/// a server of a test running beside, or be picked as a connection's own local port (a
/// loopback connection to itself), and the "dead" backend would answer.
pub async fn dead_addr() -> SocketAddr {
    static HELD: Mutex<Vec<socket2::Socket>> = Mutex::new(Vec::new());
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).expect("bind");
    let addr = socket.local_addr().expect("addr").as_socket().expect("an IP address");
    HELD.lock().expect("lock").push(socket);
    addr
}

/// A port free for a child process to listen on: bound, then released.
pub async fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr")
}

/// switchyard itself, started through its library entry point.
pub struct TestProxy {
    pub running: switchyard::app::Running,
    pub addr: SocketAddr,
    pub dir: TempDir,
}

/// A test config completed with a listener on a free port and an `[admin]` table in `dir`.
pub fn full_config(dir: &TempDir, config: &str) -> String {
    format!("[listen]\nhttp = \"127.0.0.1:0\"\n{}{config}", dir.admin_section())
}

/// A directory of its own for one test, removed when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("sy-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }

    /// An `[admin]` table putting the socket and the state in this directory.
    pub fn admin_section(&self) -> String {
        format!(
            "[admin]\nsocket = \"{}\"\nstate_dir = \"{}\"\n",
            self.path("admin.sock").display(),
            self.path("state").display()
        )
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl TestProxy {
    /// Starts switchyard with `config` (TOML); `[listen]` on a free port and `[admin]` in a
    /// fresh temporary directory are added.
    pub async fn start(config: &str) -> TestProxy {
        Self::start_in(TempDir::new(), config, None).await
    }

    /// Starts switchyard in `dir` (its admin socket and state live there); with a
    /// `config_path`, the config is also written there and watched.
    pub async fn start_in(dir: TempDir, config: &str, config_path: Option<std::path::PathBuf>) -> TestProxy {
        let text = full_config(&dir, config);
        if let Some(path) = &config_path {
            std::fs::write(path, &text).expect("write the config");
        }
        let checked =
            switchyard::config::parse(&text, "test").unwrap_or_else(|e| panic!("test config invalid:\n{e}\n{text}"));
        let running = switchyard::app::start(checked.config, config_path).await.expect("switchyard starts");
        let addr = running.http_addr().expect("a listener");
        TestProxy { running, addr, dir }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

/// `[backends.NAME]` with these servers.
pub fn backend(name: &str, servers: &[&TestServer]) -> String {
    let list: Vec<String> = servers.iter().map(|s| format!("\"{}\"", s.addr)).collect();
    format!("[backends.{name}]\nservers = [{}]\n", list.join(", "))
}

pub type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// A config with one route, `r`, that sends everything to one backend of `servers`.
pub fn all_to(name: &str, servers: &[&TestServer]) -> String {
    format!("{}[[routes]]\nname = \"r\"\nsplit = {{ {name} = 100 }}\n", backend(name, servers))
}

/// An HTTP/1.1 client with a keep-alive pool.
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1024).build_http()
}

/// An HTTP/2 client speaking h2c by prior knowledge.
pub fn h2c_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).http2_only(true).build_http()
}

pub fn get(url: &str) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::new(Bytes::new())).expect("request")
}

/// Sends a request and reads the whole answer: status, headers, body as text.
pub async fn fetch(
    client: &HttpClient,
    req: Request<Full<Bytes>>,
) -> Result<(http::StatusCode, HeaderMap, String), String> {
    let response = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((parts.status, parts.headers, String::from_utf8_lossy(&body).into_owned()))
}

/// Waits until `check` holds, polling, for at most `within`. For conditions with no
/// event to await (a counter in another task).
pub async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    check()
}

pub fn empty() -> Empty<Bytes> {
    Empty::new()
}

/// Writes raw bytes to `addr` and reads everything until the server closes (at most 10 s):
/// for requests a well-behaved client library would refuse to send.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// Continuous load from keep-alive clients, counting what failed. Stops when asked, or by
/// itself after two minutes so that a broken test cannot loop forever.
pub struct Load {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<(u64, Vec<String>)>>,
}

impl Load {
    pub fn start(proxy: SocketAddr, clients: usize) -> Load {
        let stop = CancellationToken::new();
        let tasks = (0..clients)
            .map(|_| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let client = client();
                    let url = format!("http://{proxy}/load");
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
                    let (mut ok, mut failures) = (0u64, Vec::new());
                    while !stop.is_cancelled() && tokio::time::Instant::now() < deadline {
                        match fetch(&client, get(&url)).await {
                            Ok((status, _, _)) if status.is_success() => ok += 1,
                            Ok((status, _, body)) => failures.push(format!("{status}: {body}")),
                            Err(e) => failures.push(e),
                        }
                    }
                    (ok, failures)
                })
            })
            .collect();
        Load { stop, tasks }
    }

    /// Stops the clients and fails the test if any request failed; returns how many
    /// succeeded.
    pub async fn stop_expecting_no_failures(self) -> u64 {
        let (ok, failures) = self.stop().await;
        assert!(
            failures.is_empty(),
            "{} of {} requests failed, e.g. {:?}",
            failures.len(),
            ok + failures.len() as u64,
            &failures[..failures.len().min(3)]
        );
        ok
    }

    /// Stops the clients: (requests that succeeded, every failure).
    pub async fn stop(self) -> (u64, Vec<String>) {
        self.stop.cancel();
        let (mut ok, mut failures) = (0, Vec::new());
        for task in self.tasks {
            let (o, f) = task.await.expect("a load client");
            ok += o;
            failures.extend(f);
        }
        (ok, failures)
    }
}

/// One admin request over the real socket.
pub async fn admin(proxy: &TestProxy, line: &str) -> serde_json::Value {
    let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
    switchyard::admin::ctl::request(proxy.running.admin_socket(), &words).await.expect("the admin socket answers")
}

/// Which server answers a fresh request now.
pub async fn probe(proxy: &TestProxy) -> String {
    fetch(&client(), get(&proxy.url("/probe"))).await.expect("an answer").2
}
