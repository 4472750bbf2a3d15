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
    let dir = TempDir::new();
    let config = format!(
        "[listen]\nhttp = \"127.0.0.1:0\"\n[admin]\nsocket = \"{}\"\nstate_dir = \"{}\"\nhttp = \"127.0.0.1:0\"\n{}{}{}\
         [[routes]]\nname = \"agent\"\nhosts = [\"agent\"]\nsplit = {{ blue = 100 }}\n\
         mirror = {{ backend = \"shadow\", percent = 100 }}\n\
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
    let to = |host: &'static str| {
        Request::get(proxy.url("/ask")).header("host", host).body(Full::default()).expect("request")
    };
    for _ in 0..10 {
        assert_eq!(fetch(&client, to("agent")).await.expect("an answer").0, 200);
    }
    assert_eq!(fetch(&client, to("nowhere")).await.expect("an answer").0, 404);
    assert_eq!(admin(&proxy, "set-weights agent blue=50 green=50").await["ok"], true);
    assert_eq!(admin(&proxy, "rollback agent").await["ok"], true);
    assert!(eventually(Duration::from_secs(5), || shadow.request_count() == 10).await);

    let (status, headers, text) = fetch(&client, get(&scrape_url)).await.expect("a scrape");
    assert_eq!(status, 200);
    assert!(headers["content-type"].to_str().expect("text").starts_with("text/plain; version=0.0.4"));
    let has = |series: &str, expected: f64| {
        assert_eq!(value(&text, series), Some(expected), "{series} in:\n{text}");
    };
    has(r#"switchyard_requests_total{route="agent",backend="blue",code="200"}"#, 10.0);
    has(r#"switchyard_request_duration_seconds_count{route="agent",backend="blue"}"#, 10.0);
    has(r#"switchyard_request_duration_seconds_bucket{route="agent",backend="blue",le="+Inf"}"#, 10.0);
    has(r#"switchyard_requests_total{route="",backend="",code="404"}"#, 1.0);
    has(r#"switchyard_route_weight{route="agent",backend="blue"}"#, 100.0);
    has(r#"switchyard_rollbacks_total{route="agent",reason="manual"}"#, 1.0);
    has(r#"switchyard_mirror_total{route="agent",result="sent"}"#, 10.0);
    has(r#"switchyard_config_reloads_total{result="refused"}"#, 0.0);
    has(&format!(r#"switchyard_upstream_in_flight{{backend="blue",server="{}"}}"#, blue.addr), 0.0);
    has(&format!(r#"switchyard_server_healthy{{backend="green",server="{}"}}"#, green.addr), 1.0);
    let states: f64 = ["Pending", "Progressing", "Paused", "Complete", "RolledBack"]
        .iter()
        .filter_map(|s| value(&text, &format!(r#"switchyard_rollout_state{{route="ro",state="{s}"}}"#)))
        .sum();
    assert_eq!(states, 1.0, "the rollout is in exactly one state:\n{text}");
    assert!(value(&text, "switchyard_connections_open").is_some_and(|n| n >= 1.0), "{text}");
}
