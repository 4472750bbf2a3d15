//! Draining servers by hand: no new requests, the ones in flight run on, nothing fails.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_server_under_load_fails_nothing_and_sends_it_nothing_new() {
    let a = TestServer::named("a").await;
    let b = TestServer::named("b").await;
    let proxy = TestProxy::start(&all_to("pool", &[&a, &b])).await;
    let load = Load::start(proxy.addr, 50);
    assert!(eventually(Duration::from_secs(5), || a.request_count() > 100).await, "a serves first");

    let answer = admin(&proxy, &format!("drain {} --wait --deadline 5s", a.addr)).await;
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["drained"], true, "in-flight reached 0: {answer}");
    let after_drain = a.request_count();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ok = load.stop_expecting_no_failures().await;
    assert!(ok > 0);
    assert_eq!(a.request_count(), after_drain, "no new request reached the drained server after the drain answer");

    let status = admin(&proxy, "status").await;
    assert!(status.to_string().contains("\"draining\":true"), "{status}");
    let events = admin(&proxy, "events 5").await;
    assert!(events["events"].as_array().expect("events").iter().any(|e| e["action"] == "drain"), "{events}");

    assert_eq!(admin(&proxy, &format!("undrain {}", a.addr)).await["ok"], true);
    let before = a.request_count();
    let client = client();
    for _ in 0..50 {
        fetch(&client, get(&proxy.url("/"))).await.expect("answer");
    }
    assert!(a.request_count() > before, "an undrained server is back in rotation");
}

#[tokio::test]
async fn drain_wait_answers_when_the_last_long_poll_ends() {
    let slow = TestServer::with_handler("slow", |_req| async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        Response::new(text("done"))
    })
    .await;
    let proxy = TestProxy::start(&format!(
        "{}[[routes]]\nname = \"r\"\nsplit = {{ slow = 100 }}\nrequest_timeout = \"10s\"\n",
        backend("slow", &[&slow])
    ))
    .await;
    let url = proxy.url("/poll");
    let poll = tokio::spawn(async move { fetch(&client(), get(&url)).await });
    assert!(eventually(Duration::from_secs(5), || slow.request_count() == 1).await);
    let started = tokio::time::Instant::now();
    let answer = admin(&proxy, "drain slow --wait --deadline 5s").await;
    assert_eq!(answer["drained"], true, "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(300), "it waited for the long-poll");
    let (status, _, body) = poll.await.expect("task").expect("the long-poll was not cut");
    assert_eq!((status.as_u16(), body.as_str()), (200, "done"));
    assert_eq!(
        fetch(&client(), get(&proxy.url("/"))).await.expect("answer").0,
        503,
        "a fully drained route has no server"
    );
}

#[tokio::test]
async fn drains_survive_a_restart_and_unknown_targets_are_refused() {
    let a = TestServer::named("a").await;
    let b = TestServer::named("b").await;
    let config = all_to("pool", &[&a, &b]);
    let proxy = TestProxy::start(&config).await;
    assert!(admin(&proxy, "drain nowhere").await["error"]
        .as_str()
        .is_some_and(|e| e.contains("neither a backend nor a server")));
    assert_eq!(admin(&proxy, &format!("drain {}", a.addr)).await["ok"], true);
    let TestProxy { running, dir, .. } = proxy;
    running.stop().await;
    let again = TestProxy::start_in(dir, &config, None).await;
    let client = client();
    for _ in 0..50 {
        assert_eq!(fetch(&client, get(&again.url("/"))).await.expect("answer").2, "b");
    }

    // With the whole backend drained, undraining one of its servers would return nothing
    // to rotation: refused, naming the backend, rather than a misleading "ok".
    assert_eq!(admin(&again, "drain pool").await["ok"], true);
    let refused = admin(&again, &format!("undrain {}", b.addr)).await;
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(
        refused["error"].as_str().is_some_and(|e| e.contains("backend \"pool\" is drained as a whole")),
        "{refused}"
    );
    assert_eq!(admin(&again, "undrain pool").await["ok"], true);
    assert_eq!(fetch(&client, get(&again.url("/"))).await.expect("answer").2, "b");
}

/// `a` holds every request for 30 s; `b` answers at once. Both in one backend.
async fn holding_and_quick() -> (TestServer, TestServer) {
    let a = TestServer::with_handler("a", |_req| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Response::new(text("a, too late"))
    })
    .await;
    let b = TestServer::named("b").await;
    (a, b)
}

type Answer = tokio::task::JoinHandle<Result<(http::StatusCode, http::HeaderMap, String), String>>;

/// A long-poll GET and a POST sent through the proxy, each waiting in a task of its own.
fn poll_and_post(proxy: &TestProxy) -> (Answer, Answer) {
    let poll_url = proxy.url("/poll");
    let poll = tokio::spawn(async move { fetch(&client(), get(&poll_url)).await });
    let post_url = proxy.url("/submit");
    let post = tokio::spawn(async move {
        let req = Request::post(post_url).body(Full::new(Bytes::from_static(b"{}"))).expect("request");
        fetch(&client(), req).await
    });
    (poll, post)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_deadline_a_pending_long_poll_moves_and_a_pending_post_is_cut() {
    let (a, b) = holding_and_quick().await;
    let proxy = TestProxy::start(&format!(
        "{}[[routes]]\nname = \"r\"\nsplit = {{ pool = 100 }}\nrequest_timeout = \"1m\"\n",
        backend("pool", &[&a, &b])
    ))
    .await;
    // Both requests land on `a`: `b` is out while they are sent.
    assert_eq!(admin(&proxy, &format!("drain {}", b.addr)).await["ok"], true);
    let (poll, post) = poll_and_post(&proxy);
    assert!(eventually(Duration::from_secs(5), || a.request_count() == 2).await, "both requests wait on a");
    assert_eq!(admin(&proxy, &format!("undrain {}", b.addr)).await["ok"], true);

    let started = tokio::time::Instant::now();
    let answer = admin(&proxy, &format!("drain {} --deadline 500ms --wait", a.addr)).await;
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["drained"], true, "nothing is left in flight on a: {answer}");
    assert_eq!((answer["replayed"].as_u64(), answer["cut"].as_u64()), (Some(1), Some(1)), "{answer}");

    let (status, _, body) = poll.await.expect("task").expect("the long-poll is answered, not failed");
    assert_eq!((status.as_u16(), body.as_str()), (200, "b"), "the long-poll was replayed on b");
    assert!(started.elapsed() >= Duration::from_millis(450), "not before the deadline: {:?}", started.elapsed());
    let seen = b.requests();
    assert!(seen.iter().any(|s| s.uri.path() == "/poll" && s.method == http::Method::GET));
    assert!(!seen.iter().any(|s| s.method == http::Method::POST), "a POST is never replayed");

    let (status, _, body) = post.await.expect("task").expect("the POST gets an answer");
    assert_eq!(status.as_u16(), 503, "{body}");
    assert!(body.contains("drained") && body.contains("only GET, HEAD and OPTIONS"), "{body}");
    let events = admin(&proxy, "events 10").await;
    assert!(events.to_string().contains("drain-deadline"), "{events}");
}

#[tokio::test]
async fn at_the_deadline_a_long_poll_on_a_backend_of_one_server_is_cut_and_told_why() {
    let (a, _) = holding_and_quick().await;
    let proxy = TestProxy::start(&format!(
        "{}[[routes]]\nname = \"r\"\nsplit = {{ solo = 100 }}\nrequest_timeout = \"1m\"\n",
        backend("solo", &[&a])
    ))
    .await;
    let (poll, post) = poll_and_post(&proxy);
    assert!(eventually(Duration::from_secs(5), || a.request_count() == 2).await, "both requests wait on a");

    let answer = admin(&proxy, &format!("drain {} --deadline 300ms --wait", a.addr)).await;
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!((answer["replayed"].as_u64(), answer["cut"].as_u64()), (Some(0), Some(2)), "{answer}");
    let (status, _, body) = poll.await.expect("task").expect("the long-poll gets an answer");
    assert_eq!(status.as_u16(), 503, "{body}");
    assert!(body.contains("deadline passed") && body.contains("no other server to replay it on"), "{body}");
    // The POST's reason is what it is, whatever the backend's size.
    let (status, _, body) = post.await.expect("task").expect("the POST gets an answer");
    assert_eq!(status.as_u16(), 503, "{body}");
    assert!(body.contains("only GET, HEAD and OPTIONS"), "{body}");
}

/// SSE events that take 250 ms each to write, in two chunks: at almost any moment the
/// stream is in the middle of one.
fn slow_events() -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    tokio::spawn(async move {
        for i in 0.. {
            let first = tx.send(Bytes::from(format!("event: token\nid: {i}\n"))).await;
            tokio::time::sleep(Duration::from_millis(250)).await;
            if first.is_err() || tx.send(Bytes::from(format!("data: {i}\n\n"))).await.is_err() {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok(hyper::body::Frame::data(b)), rx))
    });
    BodyExt::boxed(StreamBody::new(stream))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_deadline_an_sse_stream_ends_between_events() {
    let sse = TestServer::with_handler("sse", |_req| async {
        let mut r = Response::new(slow_events());
        r.headers_mut().insert("content-type", http::HeaderValue::from_static("text/event-stream"));
        r
    })
    .await;
    let proxy = TestProxy::start(&all_to("s", &[&sse])).await;
    let response = client().request(get(&proxy.url("/chat"))).await.expect("response head");
    let mut body = response.into_body();
    let first = body.frame().await.expect("a first chunk").expect("clean");
    assert!(first.data_ref().is_some_and(|d| d.starts_with(b"event: token")));

    let drain = admin(&proxy, "drain s --deadline 400ms --wait").await;
    let mut received = first.into_data().expect("data").to_vec();
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("the stream ends cleanly, not with an error");
        received.extend_from_slice(frame.data_ref().expect("data"));
    }
    let received = String::from_utf8(received).expect("text");
    assert!(received.ends_with("\n\n"), "the stream ends after a whole event: {received:?}");
    let events: Vec<&str> = received.trim_end().split("\n\n").collect();
    assert!(events.len() >= 2, "events flowed until the deadline: {received:?}");
    for (i, event) in events.iter().enumerate() {
        assert_eq!(*event, format!("event: token\nid: {i}\ndata: {i}"), "every event is whole");
    }
    assert_eq!(drain["drained"], true, "{drain}");
    assert_eq!((drain["ended"].as_u64(), drain["cut"].as_u64()), (Some(1), Some(0)), "{drain}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_deadline_a_websocket_gets_close_1001_between_frames() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::Message;

    // A server streaming 64 KiB messages without pause, so the deadline falls inside one.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let ws_addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let Ok((stream, _)) = listener.accept().await else { return };
        let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
        for i in 0u32..100_000 {
            let mut payload = vec![(i % 251) as u8; 64 * 1024];
            payload[..4].copy_from_slice(&i.to_be_bytes());
            if ws.send(Message::binary(payload)).await.is_err() {
                return;
            }
        }
    });
    let proxy = TestProxy::start(&format!(
        "[backends.ws]\nservers = [\"{ws_addr}\"]\n[[routes]]\nname = \"ws\"\nsplit = {{ ws = 100 }}\n"
    ))
    .await;
    let stream = tokio::net::TcpStream::connect(proxy.addr).await.expect("connect");
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{}/socket", proxy.addr), stream)
        .await
        .expect("upgrade through the proxy");
    let socket = proxy.running.admin_socket().to_path_buf();
    let drain = tokio::spawn(async move {
        let words = ["drain", "ws", "--deadline", "300ms", "--wait"].map(String::from);
        switchyard::admin::ctl::request(&socket, &words).await.expect("answer")
    });
    let mut messages = 0u32;
    let close = loop {
        match ws.next().await.expect("the stream ends with a close frame, not a bare hang-up") {
            Ok(Message::Binary(payload)) => {
                assert_eq!(payload.len(), 64 * 1024, "every message arrives whole");
                assert_eq!(u32::from_be_bytes(payload[..4].try_into().expect("4 bytes")), messages, "in order");
                messages += 1;
            }
            Ok(Message::Close(frame)) => break frame,
            other => panic!("unexpected {other:?}"),
        }
    };
    let close = close.expect("a close frame with a code");
    assert_eq!(close.code, CloseCode::Away, "1001 going away");
    assert!(messages > 0, "messages flowed until the deadline");
    let _ = ws.close(None).await;
    let drain = drain.await.expect("task");
    assert_eq!(drain["drained"], true, "{drain}");
    assert_eq!((drain["ended"].as_u64(), drain["cut"].as_u64()), (Some(1), Some(0)), "{drain}");
}
