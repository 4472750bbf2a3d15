//! Long-lived traffic: SSE streams, long-polls, WebSocket tunnels, and what happens when
//! either side goes quiet or away.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Response;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// A body whose chunks a task writes, `gap` apart; the write times are recorded.
fn paced_events(count: usize, gap: Duration, written: Arc<Mutex<Vec<Instant>>>, hold_open: Duration) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    tokio::spawn(async move {
        for i in 0..count {
            tokio::time::sleep(gap).await;
            written.lock().expect("lock").push(Instant::now());
            if tx.send(Bytes::from(format!("event: token\ndata: {i}\n\n"))).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(hold_open).await;
    });
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (Ok(Frame::data(b)), rx)) });
    BodyExt::boxed(StreamBody::new(stream))
}

fn route_to(server: &TestServer, extra: &str) -> String {
    format!(
        "{extra}{}[[routes]]\nname = \"r\"\nsplit = {{ s = 100 }}\nrequest_timeout = \"10m\"\n",
        backend("s", &[server])
    )
}

#[tokio::test]
async fn each_sse_event_reaches_the_client_within_50ms_of_being_written() {
    let written = Arc::new(Mutex::new(Vec::new()));
    let w = written.clone();
    let sse = TestServer::with_handler("sse", move |_req| {
        let w = w.clone();
        async move {
            let mut r = Response::new(paced_events(10, Duration::from_millis(100), w, Duration::ZERO));
            r.headers_mut().insert("content-type", http::HeaderValue::from_static("text/event-stream"));
            r
        }
    })
    .await;
    let proxy = TestProxy::start(&route_to(&sse, "")).await;
    let response = client().request(get(&proxy.url("/chat"))).await.expect("response head");
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let mut arrived = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("a clean stream");
        if let Some(data) = frame.data_ref() {
            let events = data.windows(2).filter(|w| w == b"\n\n").count();
            arrived.extend(std::iter::repeat_n(Instant::now(), events));
        }
    }
    let written = written.lock().expect("lock").clone();
    assert_eq!(arrived.len(), 10, "every event arrives");
    for (i, (w, a)) in written.iter().zip(&arrived).enumerate() {
        let delay = a.duration_since(*w);
        assert!(delay < Duration::from_millis(50), "event {i} took {delay:?} to cross the proxy");
    }
}

#[tokio::test]
async fn a_thousand_concurrent_long_polls_are_all_answered() {
    let poll = TestServer::with_handler("poll", |_req| async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Response::new(text("done"))
    })
    .await;
    let proxy = TestProxy::start(&route_to(&poll, "")).await;
    let client = client();
    let polls = (0..1000).map(|_| {
        let client = client.clone();
        let url = proxy.url("/poll");
        async move { fetch(&client, get(&url)).await }
    });
    let answers = futures_util::future::join_all(polls).await;
    let ok = answers.iter().filter(|a| matches!(a, Ok((s, _, b)) if *s == 200 && b == "done")).count();
    assert_eq!(ok, 1000, "failures: {:?}", answers.iter().filter(|a| a.is_err()).take(3).collect::<Vec<_>>());
}

#[tokio::test]
async fn websockets_are_tunnelled_both_ways() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let ws_addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
                while let Some(Ok(message)) = ws.next().await {
                    if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    // Client-connection timeouts far shorter than the pauses below: a tunnel is not an
    // HTTP connection waiting for a head, and must outlive them.
    let proxy = TestProxy::start(&format!(
        "[defaults]\nheader_read_timeout = \"200ms\"\nidle_timeout = \"300ms\"\n\
         [backends.ws]\nservers = [\"{ws_addr}\"]\n[[routes]]\nname = \"ws\"\nsplit = {{ ws = 100 }}\n"
    ))
    .await;
    let stream = tokio::net::TcpStream::connect(proxy.addr).await.expect("connect");
    let (mut ws, response) = tokio_tungstenite::client_async(format!("ws://{}/socket", proxy.addr), stream)
        .await
        .expect("upgrade through the proxy");
    assert_eq!(response.status(), 101);
    for i in 0..20 {
        ws.send(Message::text(format!("hello {i}"))).await.expect("send");
        assert_eq!(ws.next().await.expect("an echo").expect("a frame"), Message::text(format!("hello {i}")));
    }
    // Quiet for longer than both client timeouts: the tunnel stays up.
    tokio::time::sleep(Duration::from_millis(800)).await;
    ws.send(Message::text("after a pause")).await.expect("send");
    assert_eq!(ws.next().await.expect("an echo").expect("a frame"), Message::text("after a pause"));
    ws.send(Message::binary(vec![0u8, 1, 2, 255])).await.expect("send");
    assert_eq!(ws.next().await.expect("an echo").expect("a frame"), Message::binary(vec![0u8, 1, 2, 255]));
    ws.close(None).await.expect("close");
}

#[tokio::test]
async fn a_stream_that_goes_quiet_is_cut_at_the_stream_idle_timeout() {
    let quiet = TestServer::with_handler("quiet", |_req| async {
        Response::new(paced_events(1, Duration::from_millis(10), Arc::default(), Duration::from_secs(30)))
    })
    .await;
    let proxy = TestProxy::start(&route_to(&quiet, "[defaults]\nstream_idle_timeout = \"300ms\"\n")).await;
    let response = client().request(get(&proxy.url("/chat"))).await.expect("response head");
    let mut body = response.into_body();
    let first = body.frame().await.expect("a first event").expect("clean");
    assert!(first.data_ref().is_some_and(|d| d.starts_with(b"event: token")));
    let started = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(5), body.frame()).await.expect("the stream ends within 5 s");
    assert!(!matches!(end, Some(Ok(_))), "no more data was expected: {end:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "cut after {:?}, before the idle timeout",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_client_hanging_up_closes_its_long_poll_upstream() {
    // A bare TCP server, so the test sees exactly when the proxy lets go of the request.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        let mut buf = vec![0u8; 4096];
        let mut received = Vec::new();
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
        let _ = closed_tx.send(received);
    });
    let proxy = TestProxy::start(&format!(
        "[backends.s]\nservers = [\"{addr}\"]\n[[routes]]\nname = \"r\"\nsplit = {{ s = 100 }}\n"
    ))
    .await;
    let gave_up = tokio::time::timeout(Duration::from_millis(300), client().request(get(&proxy.url("/poll")))).await;
    assert!(gave_up.is_err(), "the long-poll should still be pending");
    let received = tokio::time::timeout(Duration::from_secs(5), closed_rx)
        .await
        .expect("the upstream connection closes soon after the client hangs up")
        .expect("the server task reports");
    assert!(received.starts_with(b"GET /poll HTTP/1.1"), "{}", String::from_utf8_lossy(&received));
}
