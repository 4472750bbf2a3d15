//! The per-request routing work, piece by piece and whole: take the snapshot, match one of
//! ten routes, pick a backend by weight or sticky key, pick a server.
//!
//! Targets: the whole decision under 100 ns (issue 2); recording a request's outcome for
//! analysis under 50 ns (issue 5), clock reads included. Recording it for `/metrics` is
//! measured too.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use switchyard::config;
use switchyard::routes::{self, Servers, Table, TableWriter};

/// Ten routes; the request matches the last, so every matcher runs.
fn ten_routes() -> String {
    let mut text = String::from(
        "[backends.blue]\nservers = [\"127.0.0.1:9001\", \"127.0.0.1:9002\", \"127.0.0.1:9003\"]\n\
         [backends.green]\nservers = [\"127.0.0.1:9101\", \"127.0.0.1:9102\"]\n",
    );
    for i in 0..9 {
        text.push_str(&format!(
            "[[routes]]\nname = \"r{i}\"\nhosts = [\"svc{i}.example.com\", \"*.svc{i}.internal\"]\npath_prefix = \"/api/v{i}\"\nsplit = {{ blue = 90, green = 10 }}\n"
        ));
    }
    text.push_str(
        "[[routes]]\nname = \"agent\"\nhosts = [\"agent.example.com\"]\nsplit = { blue = 95, green = 5 }\nsticky = { header = \"x-conversation-id\" }\n",
    );
    text
}

fn bench(c: &mut Criterion) {
    let config = config::parse(&ten_routes(), "bench").expect("valid").config;
    let writer = TableWriter::new(Table::build(&config, &mut Servers::default(), 1));
    let reader = writer.reader();

    c.bench_function("route: load + match + weighted pick + server pick", |b| {
        b.iter(|| {
            let table = reader.load();
            let route = table.route(black_box("agent.example.com"), black_box("/v1/chat")).expect("route");
            let backend = route.pick_backend(&table, fastrand::u32(0..config::ALL), None).expect("backend");
            black_box(backend.pick_server(None, None).expect("server").addr)
        })
    });

    c.bench_function("route: load + match + sticky pick + rendezvous server", |b| {
        b.iter(|| {
            let table = reader.load();
            let route = table.route(black_box("agent.example.com"), black_box("/v1/chat")).expect("route");
            let hash = routes::key_hash(black_box(b"conv-6f1c2b9e-41d7"));
            let backend = route.pick_backend(&table, routes::bucket(hash), None).expect("backend");
            black_box(backend.pick_server(Some(hash), None).expect("server").addr)
        })
    });

    c.bench_function("snapshot load", |b| b.iter(|| black_box(reader.load())));

    // What measurement adds to a request: the clock read at its end and the counters (the
    // start time is the clock read the pool's idle check makes anyway). The stats are
    // shared as in the proxy: one per backend.
    let stats = switchyard::stats::Stats::new(std::time::Duration::from_secs(60));
    let started = tokio::time::Instant::now();
    c.bench_function("stats: record one request (one clock read + counters)", |b| {
        b.iter(|| {
            let now = tokio::time::Instant::now();
            stats.record(now, now.saturating_duration_since(black_box(started)), false);
        })
    });
    let now = tokio::time::Instant::now();
    c.bench_function("stats: record one request (counters only)", |b| {
        b.iter(|| stats.record(black_box(now), black_box(std::time::Duration::from_millis(3)), false))
    });
    c.bench_function("clock read (tokio Instant::now)", |b| b.iter(|| black_box(tokio::time::Instant::now())));
    c.bench_function("stats: window summary (analysis, once a second)", |b| {
        b.iter(|| black_box(stats.summary(tokio::time::Instant::now())))
    });

    // What /metrics adds: the route's counters for the chosen backend, then one status
    // counter, one latency bucket and the latency sum.
    {
        let table = reader.load();
        let route = table.route("agent.example.com", "/v1/chat").expect("route");
        let backend = route.pick_backend(&table, 0, None).expect("backend");
        c.bench_function("metrics: find the route's counters and record one request", |b| {
            b.iter(|| {
                route
                    .traffic(&table, black_box(backend))
                    .record(black_box(http::StatusCode::OK), Some(black_box(std::time::Duration::from_millis(3))))
            })
        });
    }

    c.bench_function("normalize_path (already normal)", |b| {
        b.iter(|| black_box(routes::normalize_path(black_box("/v1/agents/7/conversations/abc/messages")).is_ok()))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
