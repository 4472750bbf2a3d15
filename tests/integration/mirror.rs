//! Shadow traffic: copies reach the shadow whole and marked, sampling holds its share,
//! the in-flight bound holds, answers are compared by what they mean, and nothing the
//! shadow does reaches the primary's clients or figures.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use crate::support::*;

/// What a shadow saw of one copy: its mirror header and its body.
type Copies = Arc<Mutex<Vec<(Option<String>, Bytes)>>>;

/// A server that records each request's `x-switchyard-mirror` header and body, and
/// answers with the body's length.
async fn recording(name: &str) -> (TestServer, Copies) {
    let copies: Copies = Arc::default();
    let seen = copies.clone();
    let server = TestServer::with_handler(name, move |req: Request<hyper::body::Incoming>| {
        let seen = seen.clone();
        async move {
            let header = req.headers().get("x-switchyard-mirror").map(|v| v.to_str().unwrap_or("?").to_string());
            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let len = body.len();
            seen.lock().expect("lock").push((header, body));
            Response::new(text(format!("{len}")))
        }
    })
    .await;
    (server, copies)
}

/// A `primary` backend and a route `agent` to it that mirrors to `shadow_servers`.
fn mirrored_route(primary: &TestServer, shadow_servers: &str, mirror: &str) -> String {
    format!("{}{}", backend("primary", &[primary]), mirrored_to(shadow_servers, mirror))
}

/// The shadow backend and the mirroring route `agent`, for a config that defines `primary`.
fn mirrored_to(shadow_servers: &str, mirror: &str) -> String {
    format!(
        "[backends.shadow]\nservers = [{shadow_servers}]\n[[routes]]\nname = \"agent\"\nsplit = {{ primary = 100 }}\nmirror = {{ {mirror} }}\n"
    )
}

async fn report(proxy: &TestProxy) -> Value {
    let report = admin(proxy, "mirror-report agent").await;
    assert_eq!(report["ok"], true, "{report}");
    report
}

/// Waits until `sampled` requests were sampled and each has ended in an outcome.
async fn settled(proxy: &TestProxy, sampled: u64) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let report = report(proxy).await;
        let counted: u64 = report["counts"].as_object().expect("counts").values().filter_map(Value::as_u64).sum();
        if report["sampled"] == sampled && counted == sampled && report["in_flight"] == 0 {
            return report;
        }
        assert!(tokio::time::Instant::now() < deadline, "mirroring did not settle at {sampled}: {report}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A shadow that answers only when the test adds permits to the semaphore (or after 10 s).
async fn held_shadow() -> (TestServer, Arc<tokio::sync::Semaphore>) {
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let held = release.clone();
    let shadow = TestServer::with_handler("shadow", move |_req| {
        let held = held.clone();
        async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), held.acquire()).await;
            Response::new(text("late"))
        }
    })
    .await;
    (shadow, release)
}

fn post(url: &str, body: Bytes) -> Request<Full<Bytes>> {
    Request::post(url).body(Full::new(body)).expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_copy_reaches_the_shadow_whole_and_marked_and_large_bodies_are_counted_not_sent() {
    let (primary, primary_saw) = recording("primary").await;
    let (shadow, shadow_saw) = recording("shadow").await;
    let config = mirrored_route(
        &primary,
        &format!("\"{}\"", shadow.addr),
        // The test servers name themselves in `x-server`.
        "backend = \"shadow\", percent = 100, compare = true, max_body = \"1MiB\", ignore_headers = [\"x-server\"]",
    );
    let proxy = TestProxy::start(&config).await;
    let client = client();

    let mut sent = Vec::new();
    for i in 0..20u8 {
        let body: Bytes = (0..100 * 1024).map(|_| fastrand::u8(..)).collect::<Vec<u8>>().into();
        let mut req = post(&proxy.url(&format!("/upload/{i}")), body.clone());
        // A client cannot pass its request off as a copy, nor take a copy's mark off.
        req.headers_mut().insert("x-switchyard-mirror", http::HeaderValue::from_static("forged"));
        if i % 2 == 1 {
            req.headers_mut().insert("connection", http::HeaderValue::from_static("x-switchyard-mirror"));
        }
        let (status, _, answer) = fetch(&client, req).await.expect("an answer");
        assert_eq!((status, answer), (StatusCode::OK, (100 * 1024).to_string()));
        sent.push(body);
    }
    let large = Bytes::from(vec![b'x'; 2 << 20]);
    let (status, _, _) = fetch(&client, post(&proxy.url("/upload/large"), large)).await.expect("an answer");
    assert_eq!(status, StatusCode::OK, "a body over max_body still reaches the primary");

    // Chunked, so the size is only found while it streams: 1.25 MiB in 64 KiB chunks.
    let mut chunked =
        b"POST /upload/chunked HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
    for _ in 0..20 {
        chunked.extend_from_slice(format!("{:x}\r\n", 64 * 1024).as_bytes());
        chunked.extend_from_slice(&[b'y'; 64 * 1024]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let answer = raw_exchange(proxy.addr, &chunked).await;
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with(&(1280 * 1024).to_string()), "{answer}");

    let report = settled(&proxy, 22).await;
    assert_eq!(report["counts"]["match"], 20, "{report}");
    assert_eq!(report["counts"]["too_large"], 2, "{report}");

    let copies = shadow_saw.lock().expect("lock").clone();
    assert_eq!(copies.len(), 20, "the shadow gets every copy but the one over max_body");
    for (i, (header, body)) in copies.iter().enumerate() {
        assert_eq!(header.as_deref(), Some("1"), "copy {i} is marked");
        assert!(sent.contains(body), "copy {i} carries a body identical to one sent ({} bytes)", body.len());
    }
    let originals = primary_saw.lock().expect("lock");
    assert_eq!(originals.len(), 22);
    assert!(originals.iter().all(|(header, _)| header.is_none()), "the primary's requests are not marked");
    assert!(
        copies.iter().all(|(header, _)| header.as_deref() == Some("1")),
        "only switchyard's mark reaches the shadow"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_percent_of_5000_requests_are_mirrored_within_tolerance() {
    let primary = TestServer::named("primary").await;
    let shadow = TestServer::named("shadow").await;
    let config = mirrored_route(&primary, &format!("\"{}\"", shadow.addr), "backend = \"shadow\", percent = 10");
    let proxy = TestProxy::start(&config).await;

    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let url = proxy.url("/sampled");
            tokio::spawn(async move {
                let client = client();
                for _ in 0..500 {
                    let (status, _, _) = fetch(&client, get(&url)).await.expect("an answer");
                    assert_eq!(status, StatusCode::OK);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a client");
    }

    let report = report(&proxy).await;
    let sampled = report["sampled"].as_u64().expect("sampled");
    let report = settled(&proxy, sampled).await;
    // 500 expected; the binomial standard deviation is 21, so ±5 of them never fails by chance.
    assert!((394..=606).contains(&sampled), "{sampled} of 5000 sampled at 10 %");
    assert_eq!(report["counts"]["sent"], sampled, "{report}");
    assert_eq!(shadow.request_count() as u64, sampled, "the shadow saw exactly the sampled share");
    assert_eq!(primary.request_count(), 5000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_shadow_gets_at_most_max_in_flight_copies_and_the_rest_are_dropped() {
    let primary = TestServer::named("primary").await;
    let (shadow, release) = held_shadow().await;
    let config = mirrored_route(
        &primary,
        &format!("\"{}\"", shadow.addr),
        "backend = \"shadow\", percent = 100, max_in_flight = 4, timeout = \"20s\"",
    );
    let proxy = TestProxy::start(&config).await;
    let client = client();
    for _ in 0..40 {
        let (status, _, body) = fetch(&client, get(&proxy.url("/busy"))).await.expect("an answer");
        assert_eq!((status, body.as_str()), (StatusCode::OK, "primary"), "the primary never waits");
    }
    assert!(eventually(Duration::from_secs(5), || shadow.request_count() == 4).await);
    let report = report(&proxy).await;
    assert_eq!(report["in_flight"], 4, "{report}");
    assert_eq!(report["counts"]["dropped"], 36, "{report}");

    release.add_permits(40);
    let report = settled(&proxy, 40).await;
    assert_eq!(report["counts"]["sent"], 4, "{report}");
    assert_eq!(shadow.request_count(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_slower_than_its_timeout_is_counted_as_a_shadow_error_with_the_reason() {
    let primary = TestServer::named("primary").await;
    let (shadow, release) = held_shadow().await;
    let config = mirrored_route(
        &primary,
        &format!("\"{}\"", shadow.addr),
        "backend = \"shadow\", percent = 100, compare = true, timeout = \"100ms\"",
    );
    let proxy = TestProxy::start(&config).await;
    let client = client();
    for _ in 0..5 {
        let (status, _, _) = fetch(&client, get(&proxy.url("/slow"))).await.expect("an answer");
        assert_eq!(status, StatusCode::OK);
    }
    let report = settled(&proxy, 5).await;
    release.add_permits(5);
    assert_eq!(report["counts"]["shadow_error"], 5, "{report}");
    let detail = report["differences"][0]["detail"].as_str().expect("a sampled error");
    assert!(detail.contains("sent no response head within 100ms"), "{detail}");
    assert_eq!(report["differences"][0]["result"], "shadow_error");
}

/// A primary and a shadow that answer alike on `/same/*` and differently on `/diff/*`;
/// request ids and a trace field differ everywhere and are ignored.
async fn agent(name: &'static str, shadow: bool) -> TestServer {
    TestServer::with_handler(name, move |req: Request<hyper::body::Incoming>| async move {
        let path = req.uri().path().to_string();
        let id = format!("{:016x}", fastrand::u64(..));
        let json = |extra: &str| {
            let trace = if shadow { r#","trace":{"span":1}"# } else { "" };
            format!(r#"{{"id":"{id}","choices":[{{"text":"{}"{extra}}}]{trace}}}"#, fastrand::u32(..))
        };
        let events =
            |n: usize| (0..n).map(|i| format!("data: token {i}\n\n")).collect::<String>() + "event: done\ndata: {}\n\n";
        let (status, content_type, body) = match path.as_str() {
            "/same/json" => (200, "application/json", json("")),
            "/same/sse" => (200, "text/event-stream", events(3)),
            "/same/text" => (200, "text/plain", "the same words".into()),
            "/diff/status" => (if shadow { 500 } else { 200 }, "text/plain", "ok".into()),
            "/diff/json" => (200, "application/json", json(if shadow { r#","tool_calls":[]"# } else { "" })),
            "/diff/sse" => (200, "text/event-stream", events(if shadow { 4 } else { 3 })),
            "/diff/header" => (200, "text/plain", "ok".into()),
            _ => (404, "text/plain", "no such path".into()),
        };
        let mut response = Response::new(text(body));
        *response.status_mut() = StatusCode::from_u16(status).expect("a status");
        let headers = response.headers_mut();
        headers.insert("content-type", http::HeaderValue::from_static(content_type));
        headers.insert("x-request-id", http::HeaderValue::from_str(&id).expect("an id"));
        let version = if shadow && path == "/diff/header" { "2" } else { "1" };
        headers.insert("x-model-version", http::HeaderValue::from_static(version));
        response
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_compared_by_meaning_and_exactly_the_differing_paths_are_reported() {
    let primary = agent("agent", false).await;
    let shadow = agent("agent", true).await;
    let config = mirrored_route(
        &primary,
        &format!("\"{}\"", shadow.addr),
        "backend = \"shadow\", percent = 100, compare = true, ignore_headers = [\"x-request-id\"], ignore_json_fields = [\"trace\"]",
    );
    let proxy = TestProxy::start(&config).await;
    let client = client();
    let paths = ["/same/json", "/same/sse", "/same/text", "/diff/status", "/diff/json", "/diff/sse", "/diff/header"];
    for _ in 0..3 {
        for path in paths {
            let (status, _, _) = fetch(&client, get(&proxy.url(path))).await.expect("an answer");
            assert_eq!(status, StatusCode::OK, "{path}: the client always gets the primary's answer");
        }
    }

    let report = settled(&proxy, 21).await;
    let counts = &report["counts"];
    assert_eq!(counts["match"], 9, "{report}");
    assert_eq!(counts["status_mismatch"], 3, "{report}");
    assert_eq!(counts["body_mismatch"], 6, "{report}");
    assert_eq!(counts["header_mismatch"], 3, "{report}");
    let differences = report["differences"].as_array().expect("differences");
    assert_eq!(differences.len(), 12);
    let mut reported: Vec<&str> = differences.iter().filter_map(|d| d["path"].as_str()).collect();
    reported.sort_unstable();
    reported.dedup();
    assert_eq!(reported, ["/diff/header", "/diff/json", "/diff/sse", "/diff/status"]);

    let first = |path: &str| differences.iter().find(|d| d["path"] == path).expect("reported").clone();
    let status = first("/diff/status");
    assert_eq!((status["primary_status"].as_u64(), status["shadow_status"].as_u64()), (Some(200), Some(500)));
    assert!(status["primary_ms"].as_f64().is_some() && status["shadow_ms"].as_f64().is_some(), "{status}");
    assert!(first("/diff/json")["detail"]
        .as_str()
        .expect("detail")
        .contains("$.choices[].tool_calls only in the shadow"));
    assert!(first("/diff/sse")["detail"].as_str().expect("detail").contains("4 events"));
    assert!(first("/diff/header")["detail"].as_str().expect("detail").contains("x-model-version"));

    let shown = switchyard::admin::ctl::render("mirror-report", &report);
    assert!(shown.contains("status_mismatch  3") && shown.contains("/diff/json"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gets_the_same_answer_with_and_without_a_mirror() {
    let primary = TestServer::with_handler("primary", |req: Request<hyper::body::Incoming>| async move {
        let path = req.uri().path().to_string();
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let mut response = Response::new(text(body.iter().rev().copied().collect::<Vec<u8>>()));
        response.headers_mut().insert("x-path", http::HeaderValue::from_str(&path).expect("a path"));
        response
    })
    .await;
    let shadow = TestServer::with_handler("shadow", |_req| async {
        let mut response = Response::new(text("something else entirely"));
        *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        response
    })
    .await;
    // The plain route comes first and takes Host "plain"; the mirrored one takes the rest.
    let config = format!(
        "{}{}{}",
        backend("primary", &[&primary]),
        "[[routes]]\nname = \"plain\"\nhosts = [\"plain\"]\nsplit = { primary = 100 }\n",
        mirrored_to(&format!("\"{}\"", shadow.addr), "backend = \"shadow\", percent = 100, compare = true"),
    );
    let proxy = TestProxy::start(&config).await;
    let client = client();
    let body: Bytes = (0..50 * 1024).map(|_| fastrand::u8(..)).collect::<Vec<u8>>().into();
    let mut answers = Vec::new();
    for host in ["plain", "mirrored"] {
        let mut req = post(&proxy.url("/turn?n=1"), body.clone());
        req.headers_mut().insert("host", http::HeaderValue::from_static(host));
        let (status, mut headers, text) = fetch(&client, req).await.expect("an answer");
        headers.remove("date");
        answers.push((status, headers, text));
    }
    assert_eq!(answers[0], answers[1], "the mirrored route answers exactly as the plain one");
    assert_eq!(answers[0].0, StatusCode::OK);
    let report = settled(&proxy, 1).await;
    assert_eq!(report["counts"]["status_mismatch"], 1, "the copy was made and differed: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_mid_stream_leaves_its_copy_unfinished() {
    let stream = |name: &'static str| {
        TestServer::with_handler(name, |_req| async {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::convert::Infallible>>(1);
            tokio::spawn(async move {
                for i in 0..50 {
                    let event = Bytes::from(format!("data: token {i}\n\n"));
                    if tx.send(Ok(http_body::Frame::data(event))).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
            let mut response = Response::new(http_body_util::StreamBody::new(tokio_stream_of(rx)).boxed());
            response.headers_mut().insert("content-type", http::HeaderValue::from_static("text/event-stream"));
            response
        })
    };
    let primary = stream("primary").await;
    let shadow = TestServer::named("shadow").await;
    let config = mirrored_route(
        &primary,
        &format!("\"{}\"", shadow.addr),
        "backend = \"shadow\", percent = 100, compare = true",
    );
    let proxy = TestProxy::start(&config).await;
    let response = client().request(get(&proxy.url("/chat"))).await.expect("a response head");
    let mut body = response.into_body();
    let first = body.frame().await.expect("a first event").expect("data");
    assert!(first.data_ref().is_some_and(|d| d.starts_with(b"data: token 0")));
    drop(body);
    let report = settled(&proxy, 1).await;
    assert_eq!(report["counts"]["unfinished"], 1, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_failures_never_touch_the_primary_figures_and_upgrades_are_never_mirrored() {
    let primary = TestServer::named("primary").await;
    let shadow = TestServer::with_handler("shadow", |_req| async {
        let mut response = Response::new(text("broken"));
        *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        response
    })
    .await;
    let config = mirrored_route(
        &primary,
        &format!("\"{}\"", shadow.addr),
        "backend = \"shadow\", percent = 100, compare = true",
    );
    let proxy = TestProxy::start(&config).await;
    let client = client();
    for _ in 0..30 {
        let (status, _, _) = fetch(&client, get(&proxy.url("/work"))).await.expect("an answer");
        assert_eq!(status, StatusCode::OK);
    }
    let judged = settled(&proxy, 30).await;
    assert_eq!(judged["counts"]["status_mismatch"], 30, "{judged}");

    let upgrade = Request::get(proxy.url("/socket"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let (status, _, _) = fetch(&client, upgrade).await.expect("an answer");
    assert_eq!(status, StatusCode::OK, "the primary declined the upgrade");
    assert_eq!(primary.request_count(), 31);

    let status = admin(&proxy, "status agent").await;
    let backends = status["routes"][0]["backends"].as_array().expect("backends");
    let primary_figures = &backends.iter().find(|b| b["name"] == "primary").expect("primary")["measured"];
    assert_eq!(primary_figures["requests"], 31, "{status}");
    assert_eq!(primary_figures["failures"], 0, "the shadow's 500s are not the primary's: {status}");
    assert_eq!(shadow.request_count(), 30, "the upgrade request was not mirrored");
    assert_eq!(report(&proxy).await["sampled"], 30);
    let all = admin(&proxy, "status").await.to_string();
    assert!(!all.contains("\"ejected\":true"), "no server was ejected for the shadow's failures: {all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_is_switched_on_and_off_by_the_config_file_without_touching_the_split() {
    let blue = TestServer::named("blue").await;
    let green = TestServer::named("green").await;
    let shadow = TestServer::named("shadow").await;
    let config = |mirror: &str| {
        format!(
            "{}{}{}[[routes]]\nname = \"agent\"\nsplit = {{ blue = 50, green = 50 }}\n{mirror}",
            backend("blue", &[&blue]),
            backend("green", &[&green]),
            backend("shadow", &[&shadow]),
        )
    };
    let config_dir = TempDir::new();
    let path = config_dir.path("switchyard.toml");
    let proxy = TestProxy::start_in(TempDir::new(), &config(""), Some(path.clone())).await;
    let live = admin(&proxy, "set-weights agent blue=70 green=30").await;
    assert_eq!(live["ok"], true, "{live}");
    let no_mirror = admin(&proxy, "mirror-report agent").await;
    assert!(no_mirror["error"].as_str().expect("refused").contains("has no mirror"), "{no_mirror}");

    let split_now = |status: &Value| status["routes"][0]["split"].clone();
    for (mirror, on) in [("mirror = { backend = \"shadow\", percent = 100 }\n", true), ("", false)] {
        std::fs::write(&path, full_config(&proxy.dir, &config(mirror))).expect("write the config");
        let _ = admin(&proxy, "reload").await;
        let reloaded = admin(&proxy, "mirror-report agent").await;
        assert_eq!(reloaded["ok"], on, "{reloaded}");
        let status = admin(&proxy, "status agent").await;
        assert_eq!(split_now(&status), serde_json::json!({ "blue": 70.0, "green": 30.0 }), "{status}");
        assert_eq!(status["routes"][0]["split_source"], "live", "{status}");

        let before = shadow.request_count();
        for _ in 0..10 {
            let (status, _, _) = fetch(&client(), get(&proxy.url("/x"))).await.expect("an answer");
            assert_eq!(status, StatusCode::OK);
        }
        if on {
            assert!(eventually(Duration::from_secs(5), || shadow.request_count() == before + 10).await);
        } else {
            let copied = eventually(Duration::from_millis(300), || shadow.request_count() != before).await;
            assert!(!copied, "the mirror is off");
        }
    }
    let events = admin(&proxy, "events 10").await.to_string();
    assert!(events.contains("mirror off -> to shadow at 100 %"), "{events}");
    assert!(events.contains("mirror to shadow at 100 % -> off"), "{events}");
}

/// A receiver as a stream of body frames.
fn tokio_stream_of<T>(rx: tokio::sync::mpsc::Receiver<T>) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })
}
