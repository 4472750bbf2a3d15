//! Steering a running switchyard: the admin socket, the watched config file, persisted
//! state and the event log, under load, counting every failed request.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

fn blue_green(split: &str) -> impl Fn(&TestServer, &TestServer) -> String + '_ {
    move |blue, green| {
        format!(
            "{}{}[[routes]]\nname = \"agent\"\nsplit = {{ {split} }}\n",
            backend("blue", &[blue]),
            backend("green", &[green])
        )
    }
}

fn generation(answer: &Value) -> u64 {
    answer["generation"].as_u64().expect("a generation")
}

/// Writes a config the way editors do: in place, or a new file renamed over the old one.
fn write_config(path: &std::path::Path, text: &str, rename_over: bool) {
    if rename_over {
        let tmp = path.with_extension("toml.new");
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, path).expect("rename");
    } else {
        std::fs::write(path, text).expect("write");
    }
}

/// Waits for the table generation to pass `after` (a reload took effect).
async fn reloaded(proxy: &TestProxy, after: u64) -> u64 {
    for _ in 0..400 {
        let g = generation(&admin(proxy, "status").await);
        if g > after {
            return g;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no reload within 4 s after generation {after}");
}

/// A blue/green switchyard whose config file is watched. The file lives in a directory of
/// its own: the watch covers that directory, and the proxy's state writes must not look
/// like config edits.
struct Watched {
    blue: TestServer,
    green: TestServer,
    proxy: TestProxy,
    path: std::path::PathBuf,
    _config_dir: TempDir,
}

async fn watched(split: &str) -> Watched {
    let blue = TestServer::named("blue").await;
    let green = TestServer::named("green").await;
    let config_dir = TempDir::new();
    let path = config_dir.path("switchyard.toml");
    let proxy = TestProxy::start_in(TempDir::new(), &blue_green(split)(&blue, &green), Some(path.clone())).await;
    Watched { blue, green, proxy, path, _config_dir: config_dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_changes_and_config_rewrites_under_load_lose_no_request() {
    let Watched { blue, green, proxy, path, _config_dir } = watched("blue = 50, green = 50").await;
    let load = Load::start(proxy.addr, 50);

    let mut last = 0;
    for i in 0..1000 {
        let (line, expect) = if i % 2 == 0 {
            ("set-weights agent blue=100 green=0", "blue")
        } else {
            ("set-weights agent blue=0 green=100", "green")
        };
        let answer = admin(&proxy, line).await;
        assert_eq!(answer["ok"], true, "{answer}");
        assert!(generation(&answer) > last, "generations rise");
        last = generation(&answer);
        assert_eq!(probe(&proxy).await, expect, "the request after change {i} did not follow it");
    }

    for i in 0..100 {
        let (split, expect) =
            if i % 2 == 0 { ("blue = 100, green = 0", "blue") } else { ("blue = 0, green = 100", "green") };
        let text = full_config(&proxy.dir, &blue_green(split)(&blue, &green));
        write_config(&path, &text, i % 2 == 1);
        last = reloaded(&proxy, last).await;
        // A reload may land on a half-written file and be refused, then the full one: wait
        // for the split the file now says.
        for _ in 0..400 {
            if admin(&proxy, "status agent").await["routes"][0]["split"][expect] == 100.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(probe(&proxy).await, expect, "the request after rewrite {i} did not follow it");
    }

    let ok = load.stop_expecting_no_failures().await;
    assert!(ok > 1000, "the load ran ({ok} requests)");
}

#[tokio::test]
async fn an_invalid_config_is_refused_and_the_old_split_keeps_serving() {
    let Watched { blue: _blue, green, proxy, path, _config_dir } = watched("blue = 100, green = 0").await;
    let load = Load::start(proxy.addr, 10);
    let before = generation(&admin(&proxy, "status").await);

    let broken =
        std::fs::read_to_string(&path).expect("read").replace("blue = 100, green = 0", "blue = 100, green = 10");
    write_config(&path, &broken, true);
    let answer = admin(&proxy, "reload").await;
    assert_eq!(answer["ok"], false);
    let error = answer["error"].as_str().expect("an error");
    assert!(error.contains("routes[0].split: shares sum to 110 %"), "{error}");

    let status = admin(&proxy, "status").await;
    assert_eq!(generation(&status), before, "nothing was swapped");
    assert!(status["last_reload_error"].as_str().is_some_and(|e| e.contains("sum to 110")), "{status}");
    assert!(status["reloads"]["refused"].as_u64() >= Some(1), "{status}");
    for _ in 0..20 {
        assert_eq!(probe(&proxy).await, "blue");
    }
    let ok = load.stop_expecting_no_failures().await;
    assert!(ok > 0);
    assert_eq!(green.request_count(), 0);
}

#[tokio::test]
async fn a_refused_config_beside_switchyard_s_own_files_is_refused_once() {
    // The config in the state directory: every refusal appends an event beside it, which
    // must not count as a change of the config and set off the next refusal.
    let blue = TestServer::named("blue").await;
    let dir = TempDir::new();
    let path = dir.path("state").join("switchyard.toml");
    std::fs::create_dir_all(dir.path("state")).expect("state dir");
    let proxy = TestProxy::start_in(dir, &all_to("blue", &[&blue]), Some(path.clone())).await;
    let refused = |status: &serde_json::Value| status["reloads"]["refused"].as_u64().expect("a count");

    let broken = std::fs::read_to_string(&path).expect("read").replace("blue = 100", "blue = 90");
    write_config(&path, &broken, true);
    let mut status = admin(&proxy, "status").await;
    for _ in 0..500 {
        if refused(&status) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        status = admin(&proxy, "status").await;
    }
    assert_eq!(refused(&status), 1, "{status}");
    // Several quiet periods of the watch (150 ms each) later, still the one refusal.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(refused(&admin(&proxy, "status").await), 1);
    assert_eq!(probe(&proxy).await, "blue");
}

#[tokio::test]
async fn live_splits_survive_a_restart() {
    let blue = TestServer::named("blue").await;
    let green = TestServer::named("green").await;
    let config = blue_green("blue = 100, green = 0")(&blue, &green);
    let dir = TempDir::new();
    let state_dir = dir.0.clone();
    let proxy = TestProxy::start_in(dir, &config, None).await;
    assert_eq!(admin(&proxy, "set-weights agent blue=0 green=100").await["ok"], true);
    let TestProxy { running, dir, .. } = proxy;
    running.stop().await;
    assert!(state_dir.join("state").join("state.json").exists());

    let again = TestProxy::start_in(dir, &config, None).await;
    let status = admin(&again, "status agent").await;
    assert_eq!(status["routes"][0]["split"]["green"], 100.0, "{status}");
    assert_eq!(status["routes"][0]["split_source"], "live");
    assert_eq!(probe(&again).await, "green");
}

#[tokio::test]
async fn a_live_split_naming_a_backend_the_config_dropped_is_ignored_with_an_event() {
    let blue = TestServer::named("blue").await;
    let green = TestServer::named("green").await;
    let dir = TempDir::new();
    let proxy = TestProxy::start_in(dir, &blue_green("blue = 100, green = 0")(&blue, &green), None).await;
    assert_eq!(admin(&proxy, "set-weights agent blue=0 green=100").await["ok"], true);
    let TestProxy { running, dir, .. } = proxy;
    running.stop().await;

    // Restarted with green gone from the config.
    let again = TestProxy::start_in(
        dir,
        &format!("{}[[routes]]\nname = \"agent\"\nsplit = {{ blue = 100 }}\n", backend("blue", &[&blue])),
        None,
    )
    .await;
    assert_eq!(probe(&again).await, "blue");
    let events = admin(&again, "events 10").await;
    let ignored = events["events"].as_array().expect("events").iter().find(|e| e["action"] == "state-ignored").cloned();
    let ignored = ignored.unwrap_or_else(|| panic!("a state-ignored event: {events}"));
    assert_eq!(ignored["route"], "agent");
    assert!(ignored["reason"].as_str().is_some_and(|r| r.contains("no backend named \"green\"")), "{ignored}");
}

#[tokio::test]
async fn a_config_that_links_to_another_file_in_its_directory_follows_edits_of_that_file() {
    let blue = TestServer::named("blue").await;
    let green = TestServer::named("green").await;
    let dir = TempDir::new();
    let (real, link) = (dir.path("real.toml"), dir.path("switchyard.toml"));
    let text = full_config(&dir, &blue_green("blue = 100, green = 0")(&blue, &green));
    std::fs::write(&real, &text).expect("write");
    std::os::unix::fs::symlink("real.toml", &link).expect("symlink");
    let config = switchyard::config::parse(&text, "test").expect("valid").config;
    let running = switchyard::app::start(config, Some(link)).await.expect("starts");
    let url = format!("http://{}/", running.http_addr().expect("addr"));
    let client = client();
    assert_eq!(fetch(&client, get(&url)).await.expect("answer").2, "blue");

    // An edit of the link's target, renamed over it: its events name real.toml only.
    write_config(&real, &text.replace("blue = 100, green = 0", "blue = 0, green = 100"), true);
    let mut now = String::new();
    for _ in 0..500 {
        now = fetch(&client, get(&url)).await.expect("answer").2;
        if now == "green" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(now, "green", "the edit was reloaded");
    running.stop().await;
}

#[tokio::test]
async fn a_start_that_cannot_listen_says_why_and_leaves_no_socket_behind() {
    let blue = TestServer::named("blue").await;
    // A port held by a listener that does not share it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let dir = TempDir::new();
    let text = full_config(&dir, &all_to("blue", &[&blue])).replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let config = switchyard::config::parse(&text, "test").expect("valid").config;
    let Err(e) = switchyard::app::start(config, None).await else { panic!("started on a port in use") };
    assert!(e.to_string().contains(&format!("cannot listen on 127.0.0.1:{port}")), "{e}");
    assert!(!dir.path("admin.sock").exists(), "the admin socket made by the failed start is removed");
}

#[tokio::test]
async fn a_burst_of_changes_is_written_as_a_whole_and_survives_a_clean_stop() {
    let blue = TestServer::named("blue").await;
    let green = TestServer::named("green").await;
    let config = blue_green("blue = 100, green = 0")(&blue, &green);
    let dir = TempDir::new();
    let state_file = dir.path("state").join("state.json");
    let proxy = TestProxy::start_in(dir, &config, None).await;
    // The first change after a quiet spell is on disk when it is answered.
    assert_eq!(admin(&proxy, "set-weights agent blue=10 green=90").await["ok"], true);
    let on_disk = std::fs::read_to_string(&state_file).expect("the state file");
    assert!(on_disk.contains("9000"), "{on_disk}");
    // A burst: answered at once, written together; the last one wins, stop or no stop.
    for i in 0..30 {
        let line = if i % 2 == 0 { "set-weights agent blue=30 green=70" } else { "set-weights agent blue=40 green=60" };
        assert_eq!(admin(&proxy, line).await["ok"], true);
    }
    let TestProxy { running, dir, .. } = proxy;
    running.stop().await;
    let again = TestProxy::start_in(dir, &config, None).await;
    let status = admin(&again, "status agent").await;
    assert_eq!(status["routes"][0]["split"]["green"], 60.0, "the last change of the burst: {status}");
}

#[tokio::test]
async fn a_corrupt_state_file_is_moved_aside_and_the_config_serves() {
    let blue = TestServer::named("blue").await;
    let green = TestServer::named("green").await;
    let dir = TempDir::new();
    std::fs::create_dir_all(dir.path("state")).expect("state dir");
    std::fs::write(dir.path("state").join("state.json"), "{ half a file").expect("write");
    let proxy = TestProxy::start_in(dir, &blue_green("blue = 100, green = 0")(&blue, &green), None).await;
    assert_eq!(probe(&proxy).await, "blue");
    let kept: Vec<_> = std::fs::read_dir(proxy.dir.path("state"))
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(kept.iter().any(|n| n.starts_with("state.json.corrupt-")), "{kept:?}");
    let events = admin(&proxy, "events 10").await;
    assert!(events["events"].as_array().expect("events").iter().any(|e| e["action"] == "state-reset"), "{events}");
}

#[tokio::test]
async fn a_stale_socket_is_replaced_and_a_live_one_is_not_stolen() {
    let blue = TestServer::named("blue").await;
    let green = TestServer::named("green").await;
    let config = blue_green("blue = 100, green = 0")(&blue, &green);
    let dir = TempDir::new();
    // A socket file left behind by a crashed run: bound, then the listener gone.
    drop(std::os::unix::net::UnixListener::bind(dir.path("admin.sock")).expect("bind"));
    assert!(dir.path("admin.sock").exists());
    let proxy = TestProxy::start_in(dir, &config, None).await;
    assert_eq!(admin(&proxy, "status").await["ok"], true);
    let mode = std::fs::metadata(proxy.running.admin_socket()).expect("socket").mode() & 0o777;
    assert_eq!(mode, 0o600);

    let second = switchyard::config::parse(&full_config(&proxy.dir, &config), "second").expect("valid").config;
    let refused =
        switchyard::app::start(second, None).await.err().expect("a second switchyard must not take the socket");
    assert!(refused.to_string().contains("in use by a running switchyard"), "{refused}");
    assert_eq!(admin(&proxy, "status").await["ok"], true, "the first one still answers");
}

#[tokio::test]
async fn events_name_their_actor() {
    let Watched { blue: _blue, green: _green, proxy, path, _config_dir } = watched("blue = 100, green = 0").await;
    admin(&proxy, "set-weights agent blue=90 green=10").await;
    let g = generation(&admin(&proxy, "status").await);
    let edited =
        std::fs::read_to_string(&path).expect("read").replace("blue = 100, green = 0", "blue = 80, green = 20");
    write_config(&path, &edited, true);
    reloaded(&proxy, g).await;
    admin(&proxy, "rollback agent canary looked wrong").await;

    let uid = std::fs::metadata(&proxy.dir.0).expect("our own dir").uid();
    let me = format!("socket uid={uid} pid={}", std::process::id());
    let events = admin(&proxy, "events 10").await;
    let events = events["events"].as_array().expect("events").clone();
    let by = |action: &str| {
        events
            .iter()
            .find(|e| e["action"] == action)
            .unwrap_or_else(|| panic!("no {action} event in {events:?}"))
            .clone()
    };
    let set = by("set-weights");
    assert_eq!(set["actor"], me.as_str());
    assert_eq!(set["route"], "agent");
    assert_eq!(set["before"]["blue"], 100.0);
    assert_eq!(set["after"]["green"], 10.0);
    assert_eq!(by("reload")["actor"], "config");
    let rollback = by("rollback");
    assert_eq!(rollback["actor"], me.as_str());
    assert_eq!(rollback["reason"], "canary looked wrong");
    assert_eq!(rollback["after"]["green"], 10.0, "rollback restores the split before the last change (the file edit)");

    let log = std::fs::read_to_string(proxy.dir.path("state").join("events.jsonl")).expect("the event log");
    assert_eq!(log.lines().count(), events.len());
}

#[tokio::test]
async fn bad_requests_get_reasons_and_bad_clients_harm_no_one() {
    let blue = TestServer::named("blue").await;
    let green = TestServer::named("green").await;
    let proxy = TestProxy::start(&blue_green("blue = 100, green = 0")(&blue, &green)).await;
    for (line, expected) in [
        ("launch", "unknown verb"),
        ("set-weights ghost blue=100", "no route named \"ghost\""),
        ("set-weights agent purple=100", "no backend named \"purple\""),
        ("set-weights agent blue=60 green=30", "sum to 90 %"),
        ("set-weights agent blue=abc", "not a percentage"),
        ("rollback agent", "no earlier split"),
        ("reload", "without a config file"),
    ] {
        let answer = admin(&proxy, line).await;
        assert_eq!(answer["ok"], false, "{line}: {answer}");
        assert!(answer["error"].as_str().is_some_and(|e| e.contains(expected)), "{line}: {answer}");
    }

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    // A client that never finishes its line, and one that sends far too much.
    let mut dawdler = tokio::net::UnixStream::connect(proxy.running.admin_socket()).await.expect("connect");
    dawdler.write_all(b"status ag").await.expect("write");
    let mut flood = tokio::net::UnixStream::connect(proxy.running.admin_socket()).await.expect("connect");
    let _ = flood.write_all(&vec![b'x'; 64 * 1024]).await;
    let mut answer = String::new();
    tokio::io::BufReader::new(&mut flood).read_line(&mut answer).await.expect("an answer");
    assert!(answer.contains("longer than 4096 bytes"), "{answer}");
    assert_eq!(admin(&proxy, "status").await["ok"], true, "others are served meanwhile");
    drop(dawdler);
}

#[tokio::test]
async fn a_new_listen_address_takes_effect_on_reload() {
    let Watched { blue: _blue, green: _green, proxy, path, _config_dir } = watched("blue = 100, green = 0").await;
    let old = proxy.addr;
    let new = free_addr().await;
    let text = std::fs::read_to_string(&path).expect("read").replace("127.0.0.1:0", &new.to_string());
    std::fs::write(&path, text).expect("write");
    let answer = admin(&proxy, "reload").await;
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(proxy.running.http_addr(), Some(new));
    assert_eq!(fetch(&client(), get(&format!("http://{new}/"))).await.expect("the new address answers").2, "blue");
    assert!(
        eventually(Duration::from_secs(2), || std::net::TcpStream::connect(old).is_err()).await,
        "the old listener closes"
    );
}

/// A Kubernetes ConfigMap volume: `switchyard.toml -> ..data/switchyard.toml`, and an update
/// swaps the `..data` symlink to a new timestamped directory. A watch on the file itself
/// would keep following the old inode.
#[tokio::test]
async fn a_configmap_style_symlink_swap_is_reloaded() {
    use std::os::unix::fs::symlink;
    let blue = TestServer::named("blue").await;
    let green = TestServer::named("green").await;
    let volume = TempDir::new();
    std::fs::create_dir_all(volume.path("..2026_11_23_a")).expect("dir");
    symlink("..2026_11_23_a", volume.path("..data")).expect("symlink");
    symlink("..data/switchyard.toml", volume.path("switchyard.toml")).expect("symlink");
    let proxy = TestProxy::start_in(
        TempDir::new(),
        &blue_green("blue = 100, green = 0")(&blue, &green),
        Some(volume.path("switchyard.toml")),
    )
    .await;
    assert_eq!(probe(&proxy).await, "blue");
    let before = generation(&admin(&proxy, "status").await);

    std::fs::create_dir_all(volume.path("..2026_11_23_b")).expect("dir");
    std::fs::write(
        volume.path("..2026_11_23_b/switchyard.toml"),
        full_config(&proxy.dir, &blue_green("blue = 0, green = 100")(&blue, &green)),
    )
    .expect("write");
    symlink("..2026_11_23_b", volume.path("..data_tmp")).expect("symlink");
    std::fs::rename(volume.path("..data_tmp"), volume.path("..data")).expect("swap ..data");
    std::fs::remove_dir_all(volume.path("..2026_11_23_a")).expect("old data goes");

    reloaded(&proxy, before).await;
    assert_eq!(probe(&proxy).await, "green");
}

/// Open streams and tunnels live on the snapshot they started with: 20 changes that move
/// new traffic away from their backends cut neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_and_an_sse_stream_stay_open_across_reloads_and_weight_changes() {
    use futures_util::{SinkExt, StreamExt};
    use http_body_util::BodyExt;
    use tokio_tungstenite::tungstenite::Message;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let ws_addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() && ws.send(m).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let sse = TestServer::with_handler("sse", |_req| async {
        let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(1);
        tokio::spawn(async move {
            for i in 0..40 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if tx.send(bytes::Bytes::from(format!("data: {i}\n\n"))).await.is_err() {
                    return;
                }
            }
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok(hyper::body::Frame::data(b)), rx))
        });
        http::Response::new(BodyExt::boxed(http_body_util::StreamBody::new(stream)))
    })
    .await;
    let alt = TestServer::named("alt").await;
    let routes = |ws_split: &str| {
        format!(
            "[backends.ws]\nservers = [\"{ws_addr}\"]\n{}{}\
             [[routes]]\nname = \"ws\"\npath_prefix = \"/ws\"\nsplit = {{ {ws_split} }}\n\
             [[routes]]\nname = \"sse\"\nsplit = {{ sse = 100, alt = 0 }}\nrequest_timeout = \"1m\"\n",
            backend("sse", &[&sse]),
            backend("alt", &[&alt])
        )
    };
    let dir = TempDir::new();
    let path = dir.path("switchyard.toml");
    let proxy = TestProxy::start_in(TempDir::new(), &routes("ws = 100, alt = 0"), Some(path.clone())).await;

    let stream = tokio::net::TcpStream::connect(proxy.addr).await.expect("connect");
    let (mut ws, _) =
        tokio_tungstenite::client_async(format!("ws://{}/ws", proxy.addr), stream).await.expect("upgrade");
    let events = client().request(get(&proxy.url("/chat"))).await.expect("stream head").into_body();
    let reading = tokio::spawn(async move {
        let body = events.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok::<usize, String>(body.windows(2).filter(|w| w == b"\n\n").count())
    });

    let mut generation = generation(&admin(&proxy, "status").await);
    for i in 0..20 {
        if i % 2 == 0 {
            let line = if i % 4 == 0 { "set-weights sse sse=0 alt=100" } else { "set-weights sse sse=100 alt=0" };
            generation = self::generation(&admin(&proxy, line).await);
        } else {
            let split = if i % 4 == 1 { "ws = 0, alt = 100" } else { "ws = 100, alt = 0" };
            std::fs::write(&path, full_config(&proxy.dir, &routes(split))).expect("rewrite");
            generation = reloaded(&proxy, generation).await;
        }
        ws.send(Message::text(format!("still here {i}"))).await.expect("the tunnel is open");
        assert_eq!(ws.next().await.expect("echo").expect("frame"), Message::text(format!("still here {i}")));
    }
    assert_eq!(reading.await.expect("task"), Ok(40), "every SSE event arrived and the stream ended cleanly");
}
