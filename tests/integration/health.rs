//! Active health checks: servers enter rotation only once they pass, and leave it when
//! they fail.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Response, StatusCode};

use crate::support::*;

/// A server whose `/health` answers `ok <version>` while `healthy` holds, else 503. Every
/// other path answers with its name.
async fn checked_server(name: &str, version: &'static str, healthy: Arc<AtomicBool>) -> TestServer {
    let n = name.to_string();
    TestServer::with_handler(name, move |req| {
        let (healthy, n) = (healthy.clone(), n.clone());
        async move {
            if req.uri().path() == "/health" {
                if healthy.load(Ordering::SeqCst) {
                    return Response::new(text(format!("ok {version}")));
                }
                let mut r = Response::new(text("down"));
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                return r;
            }
            Response::new(text(n))
        }
    })
    .await
}

fn traffic(server: &TestServer) -> usize {
    server.requests().iter().filter(|r| r.uri.path() != "/health").count()
}

async fn in_rotation(proxy: &TestProxy, addr: std::net::SocketAddr) -> bool {
    let status = admin(proxy, "status").await;
    status["routes"][0]["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .flat_map(|b| b["servers"].as_array().expect("servers").iter())
        .any(|s| s["addr"] == addr.to_string().as_str() && s["in_rotation"] == true)
}

#[tokio::test]
async fn a_checked_server_gets_traffic_only_after_passing_rise_times() {
    let up = Arc::new(AtomicBool::new(true));
    let server = checked_server("a", "v1", up.clone()).await;
    let proxy = TestProxy::start(&format!(
        "[backends.b]\nservers = [\"{}\"]\nhealth = {{ path = \"/health\", interval = \"150ms\", timeout = \"100ms\", rise = 3, fall = 2 }}\n\
         [[routes]]\nname = \"r\"\nsplit = {{ b = 100 }}\n",
        server.addr
    ))
    .await;
    let (status, _, body) = fetch(&client(), get(&proxy.url("/"))).await.expect("answer");
    assert_eq!(status, 503, "no traffic before the first passes: {body}");
    let started = tokio::time::Instant::now();
    assert!(
        eventually(Duration::from_secs(3), || server.requests().iter().filter(|r| r.uri.path() == "/health").count()
            >= 3)
        .await
    );
    let mut ok = false;
    for _ in 0..100 {
        if fetch(&client(), get(&proxy.url("/"))).await.expect("answer").0 == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ok, "in rotation after rise passes");
    assert!(started.elapsed() >= Duration::from_millis(250), "rise = 3 needs three probes ~150 ms apart");
}

#[tokio::test]
async fn a_failing_server_leaves_rotation_within_fall_times_interval() {
    let (a_up, b_up) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicBool::new(true)));
    let a = checked_server("a", "v1", a_up.clone()).await;
    let b = checked_server("b", "v1", b_up).await;
    let interval = Duration::from_millis(100);
    let fall = 3;
    let proxy = TestProxy::start(&format!(
        "[backends.b]\nservers = [\"{}\", \"{}\"]\nhealth = {{ interval = \"100ms\", timeout = \"80ms\", rise = 1, fall = {fall} }}\n\
         [[routes]]\nname = \"r\"\nsplit = {{ b = 100 }}\n",
        a.addr, b.addr
    ))
    .await;
    for _ in 0..300 {
        if in_rotation(&proxy, a.addr).await && in_rotation(&proxy, b.addr).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(in_rotation(&proxy, a.addr).await && in_rotation(&proxy, b.addr).await, "both pass first");

    a_up.store(false, Ordering::SeqCst);
    let failed_at = tokio::time::Instant::now();
    while in_rotation(&proxy, a.addr).await {
        assert!(failed_at.elapsed() < Duration::from_secs(3), "a never left rotation");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = failed_at.elapsed();
    // fall probes, each up to interval + 10 % jitter apart, plus a little scheduling.
    let bound = interval * fall * 12 / 10 + Duration::from_millis(100);
    assert!(took <= bound, "left rotation after {took:?}, bound {bound:?}");

    let before = traffic(&a);
    let client = client();
    for _ in 0..100 {
        assert_eq!(fetch(&client, get(&proxy.url("/"))).await.expect("answer").2, "b");
    }
    assert_eq!(traffic(&a), before, "no request reaches a server out of rotation");
}

#[tokio::test]
async fn a_server_whose_body_does_not_match_never_gets_a_request() {
    let always = Arc::new(AtomicBool::new(true));
    let right = checked_server("right", "v2.5.0", always.clone()).await;
    let wrong = checked_server("wrong", "v2.4.9", always).await;
    let proxy = TestProxy::start(&format!(
        "[backends.green]\nservers = [\"{}\", \"{}\"]\nhealth = {{ interval = \"50ms\", timeout = \"40ms\", rise = 1, expect_body = \"v2.5.0\" }}\n\
         [[routes]]\nname = \"r\"\nsplit = {{ green = 100 }}\n",
        right.addr, wrong.addr
    ))
    .await;
    let client = client();
    let mut served = 0;
    for _ in 0..300 {
        if let Ok((status, _, body)) = fetch(&client, get(&proxy.url("/"))).await {
            if status == 200 {
                assert_eq!(body, "right");
                served += 1;
            }
        }
        if served >= 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(served, 100);
    assert!(wrong.requests().iter().any(|r| r.uri.path() == "/health"), "the wrong build was probed");
    assert_eq!(traffic(&wrong), 0, "the wrong build never served a request");
    let status = admin(&proxy, "status").await;
    assert!(status.to_string().contains("\"healthy\":false"), "{status}");
}

#[tokio::test]
async fn a_server_failing_in_a_row_is_ejected_and_returns_after_its_back_off() {
    let broken = Arc::new(AtomicBool::new(true));
    let b = broken.clone();
    let flaky = TestServer::with_handler("flaky", move |_req| {
        let b = b.clone();
        async move {
            let mut r = Response::new(text("flaky"));
            if b.load(Ordering::SeqCst) {
                *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            }
            r
        }
    })
    .await;
    let steady = TestServer::named("steady").await;
    let proxy = TestProxy::start(&format!(
        "[backends.b]\nservers = [\"{}\", \"{}\"]\noutlier = {{ failures = 3, backoff = \"400ms\", max_backoff = \"10s\" }}\n\
         [[routes]]\nname = \"r\"\nsplit = {{ b = 100 }}\n",
        flaky.addr, steady.addr
    ))
    .await;
    let client = client();
    let mut errors = 0;
    for _ in 0..200 {
        if fetch(&client, get(&proxy.url("/"))).await.expect("answer").0 == 500 {
            errors += 1;
        }
    }
    assert_eq!(errors, 3, "three failures in a row eject the server; no fourth reaches a client");
    assert_eq!(flaky.request_count(), 3);

    // Fixed while ejected: after the back-off it serves again.
    broken.store(false, Ordering::SeqCst);
    let ejected_at = tokio::time::Instant::now();
    let mut back = false;
    while ejected_at.elapsed() < Duration::from_secs(3) {
        if fetch(&client, get(&proxy.url("/"))).await.expect("answer").2 == "flaky" {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(back, "the server returned after its back-off");
}

#[tokio::test]
async fn the_last_server_in_rotation_is_never_ejected() {
    let failing = TestServer::with_handler("failing", |_req| async {
        let mut r = Response::new(text("oops"));
        *r.status_mut() = StatusCode::BAD_GATEWAY;
        r
    })
    .await;
    let proxy = TestProxy::start(&format!(
        "[backends.b]\nservers = [\"{}\"]\noutlier = {{ failures = 2 }}\n[[routes]]\nname = \"r\"\nsplit = {{ b = 100 }}\n",
        failing.addr
    ))
    .await;
    let client = client();
    for _ in 0..10 {
        // The server's own 502, passed through: not switchyard's 503 for an empty backend.
        assert_eq!(fetch(&client, get(&proxy.url("/"))).await.expect("answer").2, "oops");
    }
}
