//! Graceful shutdown, with the real binary and real signals.

use std::net::SocketAddr;
use std::time::Duration;

use http::Response;

use crate::support::*;

/// A switchyard child process on `port`, with admin HTTP on `admin_port`.
struct Child {
    child: tokio::process::Child,
    _dir: TempDir,
}

impl Child {
    async fn start(port: u16, admin_port: u16, origin: SocketAddr) -> Child {
        let dir = TempDir::new();
        let file = dir.path("switchyard.toml");
        std::fs::write(
            &file,
            format!(
                "[listen]\nhttp = \"127.0.0.1:{port}\"\n[defaults]\nshutdown_delay = \"300ms\"\ndrain_timeout = \"10s\"\n\
                 [admin]\nsocket = \"{}\"\nstate_dir = \"{}\"\nhttp = \"127.0.0.1:{admin_port}\"\n\
                 [backends.origin]\nservers = [\"{origin}\"]\n[[routes]]\nname = \"r\"\nsplit = {{ origin = 100 }}\nrequest_timeout = \"30s\"\n",
                dir.path("admin.sock").display(),
                dir.path("state").display(),
            ),
        )
        .expect("write");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["run", "-c", file.to_str().expect("utf-8")])
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .expect("spawn");
        let ready = format!("http://127.0.0.1:{admin_port}/readyz");
        for _ in 0..400 {
            if fetch(&client(), get(&ready)).await.is_ok_and(|(s, _, _)| s == 200) {
                return Child { child, _dir: dir };
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("switchyard did not become ready");
    }

    fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running").to_string();
        assert!(std::process::Command::new("kill").args([name, &pid]).status().expect("kill").success());
    }

    async fn exit_code(mut self) -> Option<i32> {
        tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("exits in time")
            .expect("status")
            .code()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_long_polls_finish_then_exits_0() {
    let origin = TestServer::with_handler("origin", |_req| async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        Response::new(text("answered"))
    })
    .await;
    let (port, admin_port) = (free_addr().await.port(), free_addr().await.port());
    let proxy = Child::start(port, admin_port, origin.addr).await;

    let client = client();
    let polls: Vec<_> = (0..100)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { fetch(&client, get(&format!("http://127.0.0.1:{port}/poll"))).await })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(5), || origin.request_count() == 100).await,
        "all 100 long-polls reached the origin"
    );

    proxy.signal("-TERM");
    let readyz = format!("http://127.0.0.1:{admin_port}/readyz");
    let signalled = tokio::time::Instant::now();
    loop {
        let status = fetch(&client, get(&readyz)).await.expect("readyz answers while draining").0;
        if status == 503 {
            break;
        }
        assert!(signalled.elapsed() < Duration::from_millis(200), "/readyz still {status} 200 ms after SIGTERM");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let mut answered = 0;
    for poll in polls {
        let (status, headers, body) = poll.await.expect("task").expect("a long-poll answered across the shutdown");
        assert_eq!((status.as_u16(), body.as_str()), (200, "answered"));
        assert_eq!(
            headers.get("connection").map(|v| v.as_bytes()),
            Some(&b"close"[..]),
            "keep-alive clients are told to go"
        );
        answered += 1;
    }
    assert_eq!(answered, 100);
    assert_eq!(proxy.exit_code().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_switchyard_takes_over_the_port_with_no_failed_request() {
    let origin = TestServer::named("origin").await;
    let port = free_addr().await.port();
    let old = Child::start(port, free_addr().await.port(), origin.addr).await;
    let load = Load::start(format!("127.0.0.1:{port}").parse().expect("addr"), 20);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The new process binds the same port (SO_REUSEPORT) before the old one leaves.
    let new = Child::start(port, free_addr().await.port(), origin.addr).await;
    old.signal("-TERM");
    assert_eq!(old.exit_code().await, Some(0));
    let served_after = origin.request_count();
    tokio::time::sleep(Duration::from_millis(300)).await;

    load.stop_expecting_no_failures().await;
    assert!(origin.request_count() > served_after, "the new switchyard serves after the old one left");
    new.signal("-TERM");
    assert_eq!(new.exit_code().await, Some(0));
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let origin = TestServer::with_handler("origin", |_req| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Response::new(text("late"))
    })
    .await;
    let (port, admin_port) = (free_addr().await.port(), free_addr().await.port());
    let proxy = Child::start(port, admin_port, origin.addr).await;
    let client = client();
    let poll = tokio::spawn(async move { fetch(&client, get(&format!("http://127.0.0.1:{port}/poll"))).await });
    assert!(eventually(Duration::from_secs(5), || origin.request_count() == 1).await);
    proxy.signal("-TERM");
    // Past the 300 ms shutdown delay: draining, with a 30 s request that would hold it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.signal("-TERM");
    let started = tokio::time::Instant::now();
    assert_eq!(proxy.exit_code().await, Some(1), "a second signal stops without draining");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(poll.await.expect("task").is_err(), "the request in flight was cut");
}
