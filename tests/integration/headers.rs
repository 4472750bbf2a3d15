//! What crosses the proxy in headers, and what does not.

use http::{Request, Response};

use crate::support::*;

#[tokio::test]
async fn hop_by_hop_headers_are_removed_and_forwarding_headers_set() {
    let blue = TestServer::with_handler("blue", |_req| async {
        let mut r = Response::new(text("blue"));
        r.headers_mut().insert("keep-alive", http::HeaderValue::from_static("timeout=5"));
        r.headers_mut().insert("proxy-authenticate", http::HeaderValue::from_static("Basic"));
        r
    })
    .await;
    let proxy = TestProxy::start(&all_to("blue", &[&blue])).await;
    let req = Request::get(proxy.url("/x"))
        .header("host", "agent.example.com")
        .header("connection", "x-private")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .header("via", "1.1 edge")
        .header("x-kept", "yes")
        .body(Default::default())
        .expect("req");
    let (status, headers, _) = fetch(&client(), req).await.expect("answer");
    assert_eq!(status, 200);
    assert!(headers.get("keep-alive").is_none() && headers.get("proxy-authenticate").is_none(), "{headers:?}");

    let seen = &blue.requests()[0].headers;
    for gone in ["x-private", "keep-alive", "te", "proxy-authorization"] {
        assert!(seen.get(gone).is_none(), "{gone} crossed the proxy: {seen:?}");
    }
    assert_eq!(seen["x-kept"], "yes");
    assert_eq!(seen["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http", "a client cannot claim https");
    assert_eq!(seen["x-forwarded-host"], "agent.example.com");
    assert_eq!(seen["host"], "agent.example.com");
    assert_eq!(seen["via"], "1.1 edge, 1.1 switchyard");
}

#[tokio::test]
async fn a_client_cannot_strip_forwarding_headers_through_connection() {
    let blue = TestServer::named("blue").await;
    let proxy = TestProxy::start(&all_to("blue", &[&blue])).await;
    let req = Request::get(proxy.url("/"))
        .header("connection", "x-forwarded-for, x-forwarded-proto, via")
        .body(Default::default())
        .expect("req");
    assert_eq!(fetch(&client(), req).await.expect("answer").0, 200);
    let seen = &blue.requests()[0].headers;
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["via"], "1.1 switchyard");
}

#[tokio::test]
async fn a_chunked_upload_reaches_the_server_whole_with_its_trailers() {
    use http_body_util::BodyExt;
    let blue = TestServer::with_handler("blue", |req| async {
        let chunked = req.headers().get("transfer-encoding").is_some_and(|v| v == "chunked");
        let collected = req.into_body().collect().await.expect("the whole upload");
        let checksum = collected.trailers().and_then(|t| t.get("x-checksum")).cloned();
        let mut r = Response::new(text(collected.to_bytes()));
        r.headers_mut()
            .insert("x-upstream-chunked", http::HeaderValue::from_static(if chunked { "yes" } else { "no" }));
        if let Some(checksum) = checksum {
            r.headers_mut().insert("x-checksum", checksum);
        }
        r
    })
    .await;
    let proxy = TestProxy::start(&all_to("blue", &[&blue])).await;
    let answer = raw_exchange(
        proxy.addr,
        b"POST /upload HTTP/1.1\r\nhost: agent\r\nconnection: close\r\nte: trailers\r\ntrailer: x-checksum\r\n\
          transfer-encoding: chunked\r\n\r\n6\r\nhello \r\n5;part=2\r\nagent\r\n0\r\nx-checksum: 11\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("x-upstream-chunked: yes"), "{answer}");
    assert!(answer.contains("x-checksum: 11"), "the trailer did not reach the server: {answer}");
    assert!(answer.ends_with("hello agent"), "{answer}");
}

#[tokio::test]
async fn a_body_stays_framed_when_the_client_names_content_length_in_connection() {
    use http_body_util::BodyExt;
    let blue = TestServer::with_handler("blue", |req| async {
        let body = req.into_body().collect().await.expect("the whole body").to_bytes();
        Response::new(text(body))
    })
    .await;
    let proxy = TestProxy::start(&all_to("blue", &[&blue])).await;
    // Were the body sent unframed, the server would read it as a second request.
    let smuggled = b"GET /admin HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut request = format!(
        "POST /chat HTTP/1.1\r\nhost: agent\r\nconnection: close, content-length\r\ncontent-length: {}\r\n\r\n",
        smuggled.len()
    )
    .into_bytes();
    request.extend_from_slice(smuggled);
    let answer = raw_exchange(proxy.addr, &request).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("GET /admin HTTP/1.1\r\nhost: x\r\n\r\n"), "the body came back whole: {answer}");
    // One more request on the pooled connection: a smuggled request would have been read first.
    let (status, _, _) = fetch(&client(), Request::get(proxy.url("/after")).body(Default::default()).expect("req"))
        .await
        .expect("answer");
    assert_eq!(status, 200);
    let paths: Vec<_> = blue.requests().iter().map(|r| r.uri.path().to_string()).collect();
    assert_eq!(paths, ["/chat", "/after"]);
    assert_eq!(blue.requests()[0].headers["content-length"], smuggled.len().to_string());
}

#[tokio::test]
async fn an_http_1_0_request_without_a_host_reaches_the_server_with_one() {
    let blue = TestServer::named("blue").await;
    let proxy = TestProxy::start(&all_to("blue", &[&blue])).await;
    let answer = raw_exchange(proxy.addr, b"GET /old HTTP/1.0\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.") && answer.contains(" 200 "), "{answer}");
    let seen = &blue.requests()[0].headers;
    assert_eq!(seen["host"], blue.addr.to_string().as_str(), "forwarded as HTTP/1.1, which needs a Host");
    assert!(seen.get("x-forwarded-host").is_none(), "the client named no host: {seen:?}");
}

#[tokio::test]
async fn cookies_from_http2_clients_reach_the_server_as_one_header() {
    let blue = TestServer::named("blue").await;
    let proxy = TestProxy::start(&all_to("blue", &[&blue])).await;
    // HTTP/2 clients send each cookie as a field of its own (RFC 9113, 8.2.3).
    let req = Request::get(proxy.url("/"))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(Default::default())
        .expect("req");
    assert_eq!(fetch(&h2c_client(), req).await.expect("answer").0, 200);
    let seen: Vec<_> = blue.requests()[0].headers.get_all("cookie").iter().cloned().collect();
    assert_eq!(seen, ["a=1; b=2"], "HTTP/1.1 allows one Cookie line");
}
