//! Which backend and server a request reaches: splits, sticky keys, overrides, hosts,
//! paths, protocols.

use std::collections::HashMap;
use std::time::Duration;

use http::Request;

use crate::support::*;

#[tokio::test]
async fn an_80_20_split_sends_80_20() {
    let blue = TestServer::named("blue").await;
    let green = TestServer::named("green").await;
    let proxy = TestProxy::start(&format!(
        "{}{}[[routes]]\nname = \"r\"\nsplit = {{ blue = 80, green = 20 }}\n",
        backend("blue", &[&blue]),
        backend("green", &[&green])
    ))
    .await;
    let client = client();
    let n = 2000;
    let mut failures = 0;
    for _ in 0..n {
        if fetch(&client, get(&proxy.url("/"))).await.map(|(s, _, _)| s.is_success()) != Ok(true) {
            failures += 1;
        }
    }
    assert_eq!(failures, 0);
    let to_green = green.request_count() as f64 * 100.0 / n as f64;
    // Binomial sd at n = 2000, p = 0.2 is 0.9 points: 4 points is over four sd.
    assert!((to_green - 20.0).abs() < 4.0, "green got {to_green:.1} % of an 80/20 split");
    assert_eq!(blue.request_count() + green.request_count(), n);
}

#[tokio::test]
async fn sticky_headers_keep_a_conversation_on_one_backend_and_server() {
    let servers =
        [TestServer::named("blue-1").await, TestServer::named("blue-2").await, TestServer::named("green").await];
    let proxy = TestProxy::start(&format!(
        "{}{}[[routes]]\nname = \"r\"\nsplit = {{ blue = 70, green = 30 }}\nsticky = {{ header = \"x-conversation-id\" }}\n",
        backend("blue", &[&servers[0], &servers[1]]),
        backend("green", &[&servers[2]])
    ))
    .await;
    let client = client();
    let mut served_by: HashMap<String, String> = HashMap::new();
    for round in 0..4 {
        for key in 0..150 {
            let req = Request::get(proxy.url("/"))
                .header("x-conversation-id", format!("conv-{key}"))
                .body(Default::default())
                .expect("req");
            let (status, _, body) = fetch(&client, req).await.expect("answer");
            assert!(status.is_success());
            let first = served_by.entry(format!("conv-{key}")).or_insert_with(|| body.clone());
            assert_eq!(*first, body, "conversation conv-{key} moved in round {round}");
        }
    }
    let green = served_by.values().filter(|s| *s == "green").count();
    assert!((20..=70).contains(&green), "{green} of 150 conversations on a 30 % canary");
    assert!(servers[0].request_count() > 0 && servers[1].request_count() > 0, "both blue servers hold conversations");
}

#[tokio::test]
async fn a_sticky_cookie_is_set_when_missing_and_then_honoured() {
    let blue = TestServer::named("blue").await;
    let green = TestServer::named("green").await;
    let proxy = TestProxy::start(&format!(
        "{}{}[[routes]]\nname = \"r\"\nsplit = {{ blue = 50, green = 50 }}\nsticky = {{ cookie = \"sy_cohort\" }}\n",
        backend("blue", &[&blue]),
        backend("green", &[&green])
    ))
    .await;
    let client = client();
    for _ in 0..20 {
        let (_, headers, first) = fetch(&client, get(&proxy.url("/"))).await.expect("answer");
        let cookie = headers.get("set-cookie").expect("a cohort cookie").to_str().expect("text").to_string();
        assert!(cookie.starts_with("sy_cohort=") && cookie.contains("HttpOnly"), "{cookie}");
        let pair = cookie.split(';').next().expect("pair").to_string();
        for _ in 0..5 {
            let req = Request::get(proxy.url("/"))
                .header("cookie", format!("theme=dark; {pair}"))
                .body(Default::default())
                .expect("req");
            let (_, headers, again) = fetch(&client, req).await.expect("answer");
            assert_eq!(again, first, "the cookie's cohort changed backend");
            assert!(headers.get("set-cookie").is_none(), "a cookie was set again");
        }
    }
}

#[tokio::test]
async fn the_override_header_pins_a_backend_at_zero_percent() {
    let blue = TestServer::named("blue").await;
    let green = TestServer::named("green").await;
    let proxy = TestProxy::start(&format!(
        "{}{}[[routes]]\nname = \"r\"\nsplit = {{ blue = 100, green = 0 }}\noverride_header = \"x-switchyard-backend\"\n",
        backend("blue", &[&blue]),
        backend("green", &[&green])
    ))
    .await;
    let client = client();
    let pinned =
        Request::get(proxy.url("/")).header("x-switchyard-backend", "green").body(Default::default()).expect("req");
    assert_eq!(fetch(&client, pinned).await.expect("answer").2, "green");
    assert_eq!(fetch(&client, get(&proxy.url("/"))).await.expect("answer").2, "blue");
    let unknown =
        Request::get(proxy.url("/")).header("x-switchyard-backend", "nope").body(Default::default()).expect("req");
    assert_eq!(fetch(&client, unknown).await.expect("answer").2, "blue");
}

#[tokio::test]
async fn hosts_and_path_prefixes_choose_the_route_in_file_order() {
    let api = TestServer::named("api").await;
    let agents = TestServer::named("agents").await;
    let admin = TestServer::named("admin").await;
    let proxy = TestProxy::start(&format!(
        "{}{}{}\
         [[routes]]\nname = \"admin\"\npath_prefix = \"/admin\"\nsplit = {{ admin = 100 }}\n\
         [[routes]]\nname = \"api\"\nhosts = [\"api.example.com\"]\nsplit = {{ api = 100 }}\n\
         [[routes]]\nname = \"agents\"\nhosts = [\"*.agents.internal\"]\nsplit = {{ agents = 100 }}\n",
        backend("api", &[&api]),
        backend("agents", &[&agents]),
        backend("admin", &[&admin])
    ))
    .await;
    let client = client();
    let with_host = |host: &str, path: &str| {
        Request::get(proxy.url(path)).header("host", host).body(Default::default()).expect("req")
    };
    assert_eq!(fetch(&client, with_host("API.example.com:8080", "/x")).await.expect("answer").2, "api");
    assert_eq!(fetch(&client, with_host("a1.agents.internal", "/x")).await.expect("answer").2, "agents");
    assert_eq!(fetch(&client, with_host("api.example.com", "/admin/users")).await.expect("answer").2, "admin");
    let (status, _, body) = fetch(&client, with_host("other.example.com", "/x")).await.expect("answer");
    assert_eq!(status, 404);
    assert!(body.contains("no route matches host \"other.example.com\""), "{body}");
    // `/administrator` is not under `/admin`: prefixes match whole segments.
    assert_eq!(fetch(&client, with_host("other.example.com", "/administrator")).await.expect("answer").0, 404);
}

#[tokio::test]
async fn paths_are_normalised_before_matching_and_forwarding() {
    let public = TestServer::named("public").await;
    let admin = TestServer::named("admin").await;
    let proxy = TestProxy::start(&format!(
        "{}{}\
         [[routes]]\nname = \"admin\"\npath_prefix = \"/admin\"\nsplit = {{ admin = 100 }}\n\
         [[routes]]\nname = \"public\"\nsplit = {{ public = 100 }}\n",
        backend("public", &[&public]),
        backend("admin", &[&admin])
    ))
    .await;
    let client = client();
    for sneaky in ["/public/..%2Fadmin/keys?x=1", "/public/%2e%2e/admin/keys?x=1", "/public/../admin/keys?x=1"] {
        let (_, _, body) = fetch(&client, get(&proxy.url(sneaky))).await.expect("answer");
        assert_eq!(body, "admin", "{sneaky} escaped the admin route");
    }
    assert!(admin.requests().iter().all(|r| r.uri == "/admin/keys?x=1"), "{:?}", admin.requests());
}

#[tokio::test]
async fn an_absolute_form_target_wins_over_the_host_header() {
    let api = TestServer::named("api").await;
    let other = TestServer::named("other").await;
    let proxy = TestProxy::start(&format!(
        "{}{}\
         [[routes]]\nname = \"api\"\nhosts = [\"api.example.com\"]\nsplit = {{ api = 100 }}\n\
         [[routes]]\nname = \"other\"\nsplit = {{ other = 100 }}\n",
        backend("api", &[&api]),
        backend("other", &[&other])
    ))
    .await;
    let answer = raw_exchange(
        proxy.addr,
        b"GET http://api.example.com/v1/x?q=1 HTTP/1.1\r\nHost: other.example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("api"), "{answer}");
    let seen = &api.requests()[0];
    assert_eq!(seen.uri, "/v1/x?q=1");
    assert_eq!(seen.headers["host"], "api.example.com");
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let blue = TestServer::named("blue").await;
    let proxy = TestProxy::start(&all_to("blue", &[&blue])).await;
    let client = h2c_client();
    for _ in 0..10 {
        let (status, _, body) = fetch(&client, get(&proxy.url("/h2"))).await.expect("answer");
        assert_eq!((status.as_u16(), body.as_str()), (200, "blue"));
    }
    let seen = &blue.requests()[0];
    assert_eq!(seen.headers["via"], "2.0 switchyard");
    assert!(seen.headers.contains_key("host"), "an h1 server needs a Host header");
}

#[tokio::test]
async fn keep_alive_connections_to_servers_are_reused() {
    let blue = TestServer::named("blue").await;
    let proxy = TestProxy::start(&all_to("blue", &[&blue])).await;
    let client = client();
    for _ in 0..50 {
        assert_eq!(fetch(&client, get(&proxy.url("/"))).await.expect("answer").2, "blue");
    }
    assert_eq!(
        blue.connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "50 sequential requests should share one upstream connection"
    );
}

#[tokio::test]
async fn servers_that_close_every_connection_lose_no_request() {
    let blue = TestServer::closing("blue", |_req| async { http::Response::new(text("blue")) }).await;
    let proxy = TestProxy::start(&all_to("blue", &[&blue])).await;
    let client = client();
    let mut failures = 0;
    for _ in 0..200 {
        if fetch(&client, get(&proxy.url("/"))).await.map(|a| a.2) != Ok("blue".to_string()) {
            failures += 1;
        }
    }
    assert_eq!(failures, 0);
}

#[tokio::test]
async fn sticky_cohorts_only_grow_whatever_order_set_weights_names_backends_in() {
    let blue = TestServer::named("blue").await;
    let green = TestServer::named("green").await;
    let proxy = TestProxy::start(&format!(
        "{}{}[[routes]]\nname = \"agent\"\nsplit = {{ blue = 90, green = 10 }}\nsticky = {{ header = \"x-conversation-id\" }}\n",
        backend("blue", &[&blue]),
        backend("green", &[&green])
    ))
    .await;
    let client = client();
    let served = |key: usize| {
        let req = Request::get(proxy.url("/"))
            .header("x-conversation-id", format!("c{key}"))
            .body(Default::default())
            .expect("req");
        let client = client.clone();
        async move { fetch(&client, req).await.expect("answer").2 }
    };
    let mut on_green = Vec::new();
    for key in 0..300 {
        if served(key).await == "green" {
            on_green.push(key);
        }
    }
    assert!(!on_green.is_empty());
    // Typed canary-first, the reverse of the file's order: the layout must not follow it.
    assert_eq!(admin(&proxy, "set-weights agent green=20 blue=80").await["ok"], true);
    let mut now_green = 0;
    for key in 0..300 {
        let backend = served(key).await;
        if on_green.contains(&key) {
            assert_eq!(backend, "green", "conversation c{key} went back from green to blue as green's weight rose");
        }
        now_green += usize::from(backend == "green");
    }
    assert!(now_green > on_green.len(), "the cohort grew ({} -> {now_green})", on_green.len());
}

#[tokio::test]
async fn pooled_connections_idle_past_the_limit_are_not_reused() {
    let blue = TestServer::named("blue").await;
    let proxy = TestProxy::start(&format!(
        "[defaults]\nupstream_idle_timeout = \"150ms\"\n{}[[routes]]\nname = \"r\"\nsplit = {{ blue = 100 }}\n",
        backend("blue", &[&blue])
    ))
    .await;
    let client = client();
    fetch(&client, get(&proxy.url("/"))).await.expect("answer");
    fetch(&client, get(&proxy.url("/"))).await.expect("answer");
    assert_eq!(blue.connections.load(std::sync::atomic::Ordering::SeqCst), 1, "reused while fresh");
    // Longer than the limit: a server with a 5 s keep-alive and a 4 s limit, in small.
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    fetch(&client, get(&proxy.url("/"))).await.expect("answer");
    assert_eq!(blue.connections.load(std::sync::atomic::Ordering::SeqCst), 2, "a stale connection must not be reused");
}

/// A request whose first bytes could begin HTTP/2's preface ("P" of a PUT) is served as
/// HTTP/1. When the "P" arrives alone, as it usually does here, the request goes through
/// hyper-util's protocol detection; the unit test of `sniff` checks that decision itself.
#[tokio::test]
async fn an_http1_request_arriving_a_byte_at_first_is_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let blue = TestServer::named("blue").await;
    let proxy = TestProxy::start(&all_to("blue", &[&blue])).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    stream.write_all(b"P").await.expect("write");
    // Not a synchronisation: the gap only makes the first byte likely to arrive alone.
    tokio::time::sleep(Duration::from_millis(50)).await;
    stream
        .write_all(b"UT /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")
        .await
        .expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("answered")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("blue"), "{answer}");
    assert_eq!(blue.requests()[0].method, http::Method::PUT);
}
