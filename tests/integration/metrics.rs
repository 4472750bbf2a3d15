//! `/metrics` on the admin HTTP listener: what an operator's Prometheus scrapes, checked
//! against the traffic and the changes the test made.

use std::time::Duration;

use http::Request;
use http_body_util::Full;

use crate::support::*;

/// The value of one series (`name{labels}`) in a scrape, if it is there.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_by_route_backend_and_code_and_show_the_live_state() {
    let blue = TestServer::named("blue").await;
    let green = TestServer::named("green").await;
    let shadow = TestServer::named("shadow").await;
    let dead = dead_addr().await;
    let dir = TempDir::new();
    let config = format!(
        "[listen]\nhttp = \"127.0.0.1:0\"\n[admin]\nsocket = \"{}\"\nstate_dir = \"{}\"\nhttp = \"127.0.0.1:0\"\n{}{}{}\
         [backends.dead]\nservers = [\"{dead}\"]\n\
         [[routes]]\nname = \"agent\"\nhosts = [\"agent\"]\nsplit = {{ blue = 100, green = 0, dead = 0 }}\n\
         override_header = \"x-backend\"\nmirror = {{ backend = \"shadow\", percent = 100 }}\n\
         [[routes]]\nname = \"ro\"\nhosts = [\"ro\"]\nsplit = {{ blue = 100 }}\n\
         [routes.rollout]\nstrategy = \"canary\"\nstable = \"blue\"\ncanary = \"green\"\n\
         steps = [{{ weight = 50, hold = \"1h\" }}, {{ weight = 100 }}]\n",
        dir.path("admin.sock").display(),
        dir.path("state").display(),
        backend("blue", &[&blue]),
        backend("green", &[&green]),
        backend("shadow", &[&shadow]),
    );
    let checked = switchyard::config::parse(&config, "test").expect("a valid config");
    let running = switchyard::app::start(checked.config, None).await.expect("switchyard starts");
    let addr = running.http_addr().expect("a listener");
    let scrape_url = format!("http://{}/metrics", running.admin_http_addr().expect("the admin listener"));
    let proxy = TestProxy { running, addr, dir };

    let client = client();
    let ask = |host: &'static str, pinned: Option<&'static str>| {
        let mut req = Request::get(proxy.url("/ask")).header("host", host);
        if let Some(backend) = pinned {
            req = req.header("x-backend", backend);
        }
        req.body(Full::default()).expect("request")
    };
    let status_of = |req| async { fetch(&client, req).await.expect("an answer").0 };
    for _ in 0..10 {
        assert_eq!(status_of(ask("agent", None)).await, 200);
    }
    for _ in 0..3 {
        assert_eq!(status_of(ask("agent", Some("green"))).await, 200);
    }
    assert_eq!(status_of(ask("agent", Some("dead"))).await, 502, "nothing listens there");
    assert_eq!(status_of(ask("nowhere", None)).await, 404);
    assert_eq!(admin(&proxy, "drain green").await["ok"], true);
    assert_eq!(status_of(ask("agent", Some("green"))).await, 503, "pinned to a backend with no server in rotation");
    // `dead` leaves the split and comes back: its counts stay.
    assert_eq!(admin(&proxy, "set-weights agent blue=50 green=50").await["ok"], true);
    assert_eq!(admin(&proxy, "rollback agent").await["ok"], true);
    // Copies of the 14 requests that reached a server (the 503 never did).
    assert!(eventually(Duration::from_secs(5), || shadow.request_count() == 14).await);
    for _ in 0..200 {
        if admin(&proxy, "status ro").await["routes"][0]["rollout"]["state"] == "Progressing" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (status, headers, text) = fetch(&client, get(&scrape_url)).await.expect("a scrape");
    assert_eq!(status, 200);
    assert!(headers["content-type"].to_str().expect("text").starts_with("text/plain; version=0.0.4"));
    let has = |series: &str, expected: f64| {
        assert_eq!(value(&text, series), Some(expected), "{series} in:\n{text}");
    };
    has(r#"switchyard_requests_total{route="agent",backend="blue",code="200"}"#, 10.0);
    has(r#"switchyard_requests_total{route="agent",backend="green",code="200"}"#, 3.0);
    has(r#"switchyard_requests_total{route="agent",backend="dead",code="502"}"#, 1.0);
    has(r#"switchyard_requests_total{route="agent",backend="green",code="503"}"#, 1.0);
    has(r#"switchyard_requests_total{route="",backend="",code="404"}"#, 1.0);
    has(r#"switchyard_request_duration_seconds_count{route="agent",backend="blue"}"#, 10.0);
    has(r#"switchyard_request_duration_seconds_count{route="agent",backend="dead"}"#, 1.0);
    has(r#"switchyard_request_duration_seconds_bucket{route="agent",backend="blue",le="60"}"#, 10.0);
    has(r#"switchyard_route_weight{route="agent",backend="blue"}"#, 100.0);
    has(r#"switchyard_rollbacks_total{route="agent",reason="manual"}"#, 1.0);
    has(r#"switchyard_mirror_total{route="agent",result="sent"}"#, 14.0);
    has(r#"switchyard_config_reloads_total{result="refused"}"#, 0.0);
    has(&format!(r#"switchyard_upstream_in_flight{{backend="blue",server="{}"}}"#, blue.addr), 0.0);
    has(&format!(r#"switchyard_server_healthy{{backend="green",server="{}"}}"#, green.addr), 1.0);
    has(r#"switchyard_rollout_state{route="ro",state="Progressing"}"#, 1.0);
    has(r#"switchyard_rollout_state{route="ro",state="Pending"}"#, 0.0);
    assert!(value(&text, "switchyard_connections_open").is_some_and(|n| n >= 1.0), "{text}");
    assert!(
        !text.contains(r#"switchyard_requests_total{route="agent",backend="blue",code="502"}"#),
        "the failure is counted once, against the backend that failed:\n{text}"
    );
}

#[tokio::test]
async fn the_dashboard_and_the_apis_it_polls_are_served() {
    let blue = TestServer::named("blue").await;
    let dir = TempDir::new();
    let config = format!(
        "[listen]\nhttp = \"127.0.0.1:0\"\n[admin]\nsocket = \"{}\"\nstate_dir = \"{}\"\nhttp = \"127.0.0.1:0\"\n{}\
         [[routes]]\nname = \"agent\"\nsplit = {{ blue = 100 }}\n",
        dir.path("admin.sock").display(),
        dir.path("state").display(),
        backend("blue", &[&blue]),
    );
    let checked = switchyard::config::parse(&config, "test").expect("a valid config");
    let running = switchyard::app::start(checked.config, None).await.expect("switchyard starts");
    let base = format!("http://{}", running.admin_http_addr().expect("the admin listener"));
    let addr = running.http_addr().expect("a listener");
    let proxy = TestProxy { running, addr, dir };
    assert_eq!(admin(&proxy, "drain blue").await["ok"], true, "an event to show");

    let client = client();
    let (status, headers, page) = fetch(&client, get(&format!("{base}/"))).await.expect("the dashboard");
    assert_eq!(status, 200);
    assert!(headers["content-type"].to_str().expect("text").starts_with("text/html"));
    for polled in ["/api/status", "/api/events"] {
        assert!(page.contains(&format!("fetch(\"{polled}\")")), "the page polls {polled}");
    }
    let (status, _, events) = fetch(&client, get(&format!("{base}/api/events"))).await.expect("events");
    assert_eq!(status, 200);
    let events: serde_json::Value = serde_json::from_str(&events).expect("JSON");
    assert!(events["events"].as_array().expect("a list").iter().any(|e| e["action"] == "drain"), "{events}");
    let (_, _, status_json) = fetch(&client, get(&format!("{base}/api/status"))).await.expect("status");
    let status_json: serde_json::Value = serde_json::from_str(&status_json).expect("JSON");
    assert_eq!(status_json["routes"][0]["name"], "agent");
}
