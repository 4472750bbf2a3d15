//! Rollback latency, measured end to end on 127.0.0.1 in one process: from sending
//! `rollback` on the admin socket to the first request served by the stable side (target
//! under 10 ms, median over 100 rollbacks).
//!
//! `cargo bench --bench live`. What a `set-weights` every 10 ms costs the hot path is
//! measured by `benches/live.sh`, with the proxy on a core shared only with its origin.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::time::Instant;

const ROLLBACKS: usize = 100;

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn origin(name: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(move |_req| async move {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(name.as_bytes()))))
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    addr
}

async fn body_of(client: &HttpClient, url: &str) -> Bytes {
    let response = client.get(url.parse().expect("uri")).await.expect("a response");
    response.into_body().collect().await.expect("a body").to_bytes()
}

async fn admin(socket: &std::path::Path, line: &str) -> serde_json::Value {
    let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
    switchyard::admin::ctl::request(socket, &words).await.expect("admin answer")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let stable = origin("stable").await;
    let canary = origin("canary").await;
    let dir = std::env::temp_dir().join(format!("switchyard-bench-live-{}", std::process::id()));
    let config = format!(
        "[listen]\nhttp = \"127.0.0.1:0\"\n[admin]\nsocket = \"{d}/admin.sock\"\nstate_dir = \"{d}/state\"\n\
         [backends.stable]\nservers = [\"{stable}\"]\n[backends.canary]\nservers = [\"{canary}\"]\n\
         [[routes]]\nname = \"agent\"\nsplit = {{ stable = 50, canary = 50 }}\n",
        d = dir.display()
    );
    let config = switchyard::config::parse(&config, "bench").expect("valid").config;
    let running = switchyard::app::start(config, None).await.expect("start");
    let url = format!("http://{}/", running.http_addr().expect("addr"));
    let socket = running.admin_socket().to_path_buf();
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    // 1. Rollback latency.
    let mut latencies = Vec::with_capacity(ROLLBACKS);
    // No rollout on the route (set-weights is refused on one): `rollback` restores the
    // split before the last change, stable=100.
    for _ in 0..ROLLBACKS {
        admin(&socket, "set-weights agent stable=100 canary=0").await;
        admin(&socket, "set-weights agent stable=0 canary=100").await;
        assert_eq!(body_of(&client, &url).await, "canary");
        // Requests run from the moment the rollback is sent, not from its answer: what
        // counts is when traffic moves.
        let started = Instant::now();
        let rollback = {
            let socket = socket.clone();
            tokio::spawn(async move { admin(&socket, "rollback agent bench").await })
        };
        while body_of(&client, &url).await != "stable" {}
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
        rollback.await.expect("rollback answered");
    }
    println!(
        "rollback → first stable response: median {:.3} ms, p99 {:.3} ms, max {:.3} ms over {ROLLBACKS} rollbacks (target: median under 10 ms)",
        median(latencies.clone()),
        percentile(latencies.clone(), 0.99),
        percentile(latencies, 1.0)
    );

    running.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
