//! Live control measured end to end, everything on 127.0.0.1 in one process:
//!
//! 1. rollback latency: from sending `rollback` on the admin socket to the first request
//!    served by the stable side (target under 10 ms, median over 100 rollbacks);
//! 2. requests/s through the proxy with a `set-weights` every 10 ms against none (target:
//!    within 3 %): short rounds in pairs, one of each kind back to back, and the median of
//!    the pairs' ratios. The machine's own drift over a minute is larger than 3 %; within a
//!    pair of one-second rounds it mostly cancels. The changes are sent twice over: on a new
//!    connection each, as `switchyard ctl` does, and on one connection kept open.
//!
//! `cargo bench --bench live`

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::time::Instant;

const ROLLBACKS: usize = 100;
/// Pairs of rounds, one quiet and one with weight changes; which goes first alternates.
const PAIRS: usize = 25;
const ROUND: Duration = Duration::from_secs(1);
const CLIENTS: usize = 50;

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

/// How the weight changes reach the admin socket.
enum Controller {
    /// A new connection per command, as `switchyard ctl` makes.
    PerCommand(std::path::PathBuf),
    /// One connection kept open for every command, as a controller process can.
    Kept(tokio::io::BufStream<tokio::net::UnixStream>),
}

impl Controller {
    async fn send(&mut self, line: &str) -> serde_json::Value {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        match self {
            Controller::PerCommand(socket) => admin(socket, line).await,
            Controller::Kept(stream) => {
                stream.write_all(format!("{line}\n").as_bytes()).await.expect("write");
                stream.flush().await.expect("flush");
                let mut answer = String::new();
                stream.read_line(&mut answer).await.expect("read");
                serde_json::from_str(&answer).expect("a JSON answer")
            }
        }
    }
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

    // 2. Requests/s with and without a set-weights every 10 ms, sent both ways.
    admin(&socket, "set-weights agent stable=50 canary=50").await;
    for keep in [false, true] {
        // Connected just before its rounds: the socket closes connections idle for 10 s.
        let (how, mut controller) = if keep {
            let kept = tokio::net::UnixStream::connect(&socket).await.expect("connect");
            ("one connection kept open", Controller::Kept(tokio::io::BufStream::new(kept)))
        } else {
            ("a new connection per command", Controller::PerCommand(socket.clone()))
        };
        let mut ratios = Vec::with_capacity(PAIRS);
        let (mut quiet, mut busy) = (Vec::new(), Vec::new());
        for pair in 0..PAIRS {
            let order = if pair % 2 == 0 { [false, true] } else { [true, false] };
            let mut rates = [0.0; 2];
            for swapping in order {
                let changes = if swapping { Some(&mut controller) } else { None };
                rates[usize::from(swapping)] = load_round(&client, &url, changes).await;
            }
            let [q, b] = rates;
            quiet.push(q);
            busy.push(b);
            ratios.push(b / q);
        }
        let pct = |r: f64| (r - 1.0) * 100.0;
        println!(
            "set-weights every 10 ms on {how}, against none: median {:+.1} % per pair (quartiles {:+.1} % to {:+.1} %; target within 3 %); {CLIENTS} clients, {PAIRS} pairs of {ROUND:?} rounds, medians {:.0} and {:.0} requests/s",
            pct(median(ratios.clone())),
            pct(percentile(ratios.clone(), 0.25)),
            pct(percentile(ratios, 0.75)),
            median(quiet),
            median(busy)
        );
    }
    running.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

async fn load_round(client: &HttpClient, url: &str, changes: Option<&mut Controller>) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + ROUND;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (client, url, done) = (client.clone(), url.to_string(), done.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    body_of(&client, &url).await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    if let Some(controller) = changes {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut flip = false;
        while Instant::now() < deadline {
            tick.tick().await;
            flip = !flip;
            let answer = controller
                .send(if flip {
                    "set-weights agent stable=60 canary=40"
                } else {
                    "set-weights agent stable=50 canary=50"
                })
                .await;
            // Refused changes would measure nothing.
            assert_eq!(answer["ok"], true, "{answer}");
        }
    }
    for c in clients {
        let _ = c.await;
    }
    done.load(Ordering::Relaxed) as f64 / ROUND.as_secs_f64()
}
