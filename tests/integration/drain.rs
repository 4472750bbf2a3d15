//! Draining servers by hand: no new requests, the ones in flight run on, nothing fails.

use std::time::Duration;

use http::Response;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_server_under_load_fails_nothing_and_sends_it_nothing_new() {
    let a = TestServer::named("a").await;
    let b = TestServer::named("b").await;
    let proxy = TestProxy::start(&format!(
        "{}[[routes]]\nname = \"r\"\nsplit = {{ pool = 100 }}\n",
        backend("pool", &[&a, &b])
    ))
    .await;
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
    let config = format!("{}[[routes]]\nname = \"r\"\nsplit = {{ pool = 100 }}\n", backend("pool", &[&a, &b]));
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
}
