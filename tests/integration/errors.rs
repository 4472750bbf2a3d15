//! Every error a client can get, each with its status and a body naming the cause, and
//! the failures switchyard absorbs so that clients never see them.

use std::time::Duration;

use http::{Request, Response};

use crate::support::*;

fn one_route(backends: &str, split: &str, extra: &str) -> String {
    format!("{backends}[[routes]]\nname = \"agent\"\nsplit = {{ {split} }}\n{extra}")
}

#[tokio::test]
async fn a_request_without_a_host_is_400_with_a_reason() {
    let blue = TestServer::named("blue").await;
    let proxy = TestProxy::start(&one_route(&backend("blue", &[&blue]), "blue = 100", "")).await;
    let answer = raw_exchange(proxy.addr, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("without a Host header"), "{answer}");
    let answer = raw_exchange(proxy.addr, b"GET /a%zz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400") && answer.contains("percent-escape"), "{answer}");
    let garbage = raw_exchange(proxy.addr, b"THIS IS NOT HTTP\r\n\r\n").await;
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
    assert_eq!(blue.request_count(), 0);
}

#[tokio::test]
async fn a_client_too_slow_with_its_head_gets_408_and_an_idle_one_is_closed_quietly() {
    let blue = TestServer::named("blue").await;
    let proxy = TestProxy::start(&format!(
        "[defaults]\nheader_read_timeout = \"300ms\"\nidle_timeout = \"400ms\"\n{}",
        one_route(&backend("blue", &[&blue]), "blue = 100", "")
    ))
    .await;
    let started = tokio::time::Instant::now();
    let answer = raw_exchange(proxy.addr, b"GET / HTTP/1.1\r\nHost: x\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("no complete request head within 300ms"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // "P" could begin HTTP/2's preface as well as a POST: timed as a head all the same.
    let answer = raw_exchange(proxy.addr, b"P").await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    let idle = raw_exchange(proxy.addr, b"").await;
    assert_eq!(idle, "", "an idle connection is closed without a response");

    // A keep-alive client that finished a request and then waits is idle, not slow.
    let answer = raw_exchange(proxy.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200") && !answer.contains("408"), "{answer}");
}

/// A client socket whose first `skip` bytes of writing are taken as sent: the test has
/// written them itself, ahead of the client library.
struct AlreadySent {
    stream: tokio::net::TcpStream,
    skip: usize,
}

impl tokio::io::AsyncRead for AlreadySent {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for AlreadySent {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.skip > 0 {
            let n = buf.len().min(self.skip);
            self.skip -= n;
            return std::task::Poll::Ready(Ok(n));
        }
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn an_h2c_client_whose_preface_arrives_in_pieces_is_never_sent_a_408() {
    use tokio::io::AsyncWriteExt;
    let blue = TestServer::named("blue").await;
    let proxy = TestProxy::start(&format!(
        "[defaults]\nheader_read_timeout = \"200ms\"\nidle_timeout = \"5s\"\n{}",
        one_route(&backend("blue", &[&blue]), "blue = 100", "")
    ))
    .await;
    // The preface's first five bytes alone, so that the proxy's first read cannot see
    // more of it (a pause is the only way to get that from outside); the h2 client sends
    // the rest.
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.expect("connect");
    stream.write_all(b"PRI *").await.expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let io = hyper_util::rt::TokioIo::new(AlreadySent { stream, skip: 5 });
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.expect("h2 handshake");
    tokio::spawn(connection);
    // Quiet for longer than the header-read timeout: an HTTP/2 connection between
    // requests is idle, not slow with a head. A raw 408 written into it would end it.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let req = Request::get(proxy.url("/h2")).body(http_body_util::Empty::<bytes::Bytes>::new()).expect("req");
    let response = sender.send_request(req).await.expect("an answer on the same connection");
    assert_eq!(response.status(), 200);
    let body = http_body_util::BodyExt::collect(response.into_body()).await.expect("body").to_bytes();
    assert_eq!(&body[..], b"blue");
}

#[tokio::test]
async fn oversized_headers_are_431_with_a_reason() {
    let blue = TestServer::named("blue").await;
    let proxy = TestProxy::start(&format!(
        "[defaults]\nmax_request_header_bytes = 4096\n{}",
        one_route(&backend("blue", &[&blue]), "blue = 100", "")
    ))
    .await;
    let client = client();
    let req = Request::get(proxy.url("/")).header("x-big", "a".repeat(5000)).body(Default::default()).expect("req");
    let (status, _, body) = fetch(&client, req).await.expect("answer");
    assert_eq!(status, 431);
    assert!(body.contains("over the limit of 4096"), "{body}");
    let req = Request::get(proxy.url("/")).header("x-small", "a".repeat(3000)).body(Default::default()).expect("req");
    assert_eq!(fetch(&client, req).await.expect("answer").0, 200);
    assert_eq!(blue.request_count(), 1);
}

#[tokio::test]
async fn all_servers_down_is_502_naming_the_backend() {
    let (a, b) = (dead_addr().await, dead_addr().await);
    let proxy =
        TestProxy::start(&one_route(&format!("[backends.blue]\nservers = [\"{a}\", \"{b}\"]\n"), "blue = 100", ""))
            .await;
    let (status, _, body) = fetch(&client(), get(&proxy.url("/"))).await.expect("answer");
    assert_eq!(status, 502);
    assert!(body.contains("backend \"blue\" of route \"agent\"") && body.contains("connect to"), "{body}");
}

#[tokio::test]
async fn a_connect_failure_is_retried_on_another_server() {
    let live = TestServer::named("live").await;
    let dead = dead_addr().await;
    let proxy = TestProxy::start(&one_route(
        &format!("[backends.blue]\nservers = [\"{dead}\", \"{}\"]\n", live.addr),
        "blue = 100",
        "",
    ))
    .await;
    let client = client();
    let mut failures = 0;
    for _ in 0..200 {
        match fetch(&client, get(&proxy.url("/"))).await {
            Ok((status, _, body)) if status == 200 && body == "live" => {}
            _ => failures += 1,
        }
    }
    assert_eq!(failures, 0, "requests that met the dead server first must be retried on the live one");
    assert_eq!(live.request_count(), 200);
}

#[tokio::test]
async fn no_server_in_rotation_is_503_naming_the_route() {
    let blue = TestServer::named("blue").await;
    let proxy = TestProxy::start(&one_route(&backend("blue", &[&blue]), "blue = 100", "")).await;
    for server in proxy.running.table().backends.iter().flat_map(|b| b.servers.iter()) {
        server.set_in_rotation(false);
    }
    let (status, _, body) = fetch(&client(), get(&proxy.url("/"))).await.expect("answer");
    assert_eq!(status, 503);
    assert!(body.contains("route \"agent\" has no server in rotation"), "{body}");
}

#[tokio::test]
async fn a_server_slower_than_the_request_timeout_is_504() {
    let slow = TestServer::with_handler("slow", |_req| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Response::new(text("late"))
    })
    .await;
    let proxy =
        TestProxy::start(&one_route(&backend("slow", &[&slow]), "slow = 100", "request_timeout = \"200ms\"\n")).await;
    let started = tokio::time::Instant::now();
    let (status, _, body) = fetch(&client(), get(&proxy.url("/"))).await.expect("answer");
    assert_eq!(status, 504);
    assert!(body.contains("no response head within 200ms"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// A server that reads request bodies and says when the first bytes of one arrived.
async fn reading_server(name: &str) -> (TestServer, tokio::sync::mpsc::UnboundedReceiver<()>) {
    use http_body_util::BodyExt;
    let (first_bytes, arrived) = tokio::sync::mpsc::unbounded_channel();
    let server = TestServer::with_handler(name, move |req: Request<hyper::body::Incoming>| {
        let first_bytes = first_bytes.clone();
        async move {
            let mut body = req.into_body();
            while let Some(Ok(_)) = body.frame().await {
                let _ = first_bytes.send(());
            }
            Response::new(text("read"))
        }
    })
    .await;
    (server, arrived)
}

/// The server's figures in `status`: its requests in flight, and its backend's measured
/// requests and failures.
async fn figures(proxy: &TestProxy) -> (u64, u64, u64) {
    let status = admin(proxy, "status").await;
    let backend = &status["routes"][0]["backends"][0];
    let number = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| panic!("a number: {status}"));
    (
        number(&backend["servers"][0]["in_flight"]),
        number(&backend["measured"]["requests"]),
        number(&backend["measured"]["failures"]),
    )
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_upload_is_not_held_against_the_server() {
    use tokio::io::AsyncWriteExt;
    let (blue, mut arrived) = reading_server("blue").await;
    let proxy = TestProxy::start(&one_route(&backend("blue", &[&blue]), "blue = 100", "")).await;

    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.expect("connect");
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789")
        .await
        .expect("write");
    arrived.recv().await.expect("the first bytes reached the server");
    drop(stream);

    // The request ends once the proxy has seen the hang-up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while figures(&proxy).await.0 > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (in_flight, requests, failures) = figures(&proxy).await;
    assert_eq!(in_flight, 0, "the hang-up ended the request");
    assert_eq!((requests, failures), (0, 0), "a client's hang-up is not measured against the backend");

    // A broken chunked body is the client's fault too, and it is told so.
    let answer = raw_exchange(
        proxy.addr,
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\nzz\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("reading the request body from the client failed"), "{answer}");
    let (in_flight, _, failures) = figures(&proxy).await;
    assert_eq!((in_flight, failures), (0, 0));

    // A whole upload is measured as usual.
    let (status, _, body) =
        fetch(&client(), Request::post(proxy.url("/upload")).body("0123456789".into()).expect("request"))
            .await
            .expect("an answer");
    assert_eq!((status.as_u16(), body.as_str()), (200, "read"));
    assert_eq!(figures(&proxy).await, (0, 1, 0));
}
