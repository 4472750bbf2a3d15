//! The admin socket: one line of text per request (the `ctl` verb and its words), one line
//! of JSON per answer. Works with no client at all:
//!
//! ```text
//! echo "status" | socat - UNIX-CONNECT:run/switchyard.sock
//! ```
//!
//! This module parses and answers; every change goes to the control path as a
//! [`Command`], which answers once the change is in force.

pub mod ctl;
pub mod http;

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::config::{BasisPoints, ALL};
use crate::control::{failure, Actor, Command, Handle};

/// A request line longer than this is refused and the client cut off.
pub const MAX_LINE: usize = 4096;
/// A client must finish its line within this.
const LINE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin socket {0} is in use by a running switchyard; stop it first or set admin.socket to another path")]
    InUse(PathBuf),
    #[error("admin.socket {0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot create admin socket {path}: {source}")]
    Bind { path: PathBuf, source: std::io::Error },
}

/// The bound admin socket, and the lock that makes it this process's alone.
#[derive(Debug)]
pub struct AdminListener {
    listener: UnixListener,
    /// An exclusive `flock` on `<socket>.lock`, held for as long as the socket is served;
    /// the kernel releases it when the process ends, however it ends.
    _lock: std::fs::File,
}

/// Binds the admin socket at `path` with `mode`. A socket file left by a crashed run is
/// replaced; one a live process answers on is not stolen.
///
/// Two switchyards starting at once with the same path both see no live socket, so the
/// check alone is not enough: each would replace the other's file. First, therefore, an
/// exclusive lock on `<path>.lock` is taken, and whoever cannot take it is refused as "in
/// use". The lock file is left in place when switchyard stops: removing it then could let
/// two later starts lock two different files.
///
/// The socket is created under a temporary name and given its mode before it is renamed
/// into place, so it is never reachable with looser permissions.
pub fn bind(path: &Path, mode: u32) -> Result<AdminListener, AdminError> {
    let err = |source| AdminError::Bind { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(err)?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(AdminError::InUse(path.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => return Err(err(e)),
    }

    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(AdminError::NotASocket(path.to_path_buf()));
        }
        // Another program, or a switchyard from before the lock, may answer on it.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(AdminError::InUse(path.to_path_buf()));
        }
        tracing::warn!(path = %path.display(), "replacing a stale admin socket left by an earlier run");
        std::fs::remove_file(path).map_err(err)?;
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(err)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    Ok(AdminListener { listener, _lock: lock })
}

/// Serves admin clients until `shutdown`, then removes the socket file.
pub async fn serve(listener: AdminListener, path: PathBuf, control: Handle, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors or similar: back off rather than spin.
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        tokio::spawn(client(stream, control.clone()));
    }
    let _ = std::fs::remove_file(&path);
}

async fn client(mut stream: UnixStream, control: Handle) {
    let actor = match stream.peer_cred() {
        Ok(cred) => Actor::Socket { uid: cred.uid(), pid: cred.pid() },
        Err(_) => Actor::Socket { uid: u32::MAX, pid: None },
    };
    // Borrowed halves: unlike owned ones, dropping them costs no `shutdown` call.
    let (read, mut write) = stream.split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::with_capacity(128);
    loop {
        line.clear();
        let read =
            tokio::time::timeout(LINE_TIMEOUT, (&mut reader).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line))
                .await;
        let answer = match read {
            Ok(Ok(0)) => return,
            Ok(Ok(_)) if line.len() > MAX_LINE => Some(failure(&format!("request line longer than {MAX_LINE} bytes"))),
            Ok(Ok(_)) => None,
            Ok(Err(_)) => return,
            Err(_) => Some(failure(&format!("no complete request line within {LINE_TIMEOUT:?}"))),
        };
        let (answer, cut_off) = match answer {
            Some(refusal) => (refusal, true),
            None => match std::str::from_utf8(&line) {
                Ok(text) if text.trim().is_empty() => continue,
                Ok(text) => match parse_request(text) {
                    Ok((command, None)) => (control.send(command, actor.clone()).await, false),
                    Ok((command, Some(deadline))) => {
                        (drain_and_wait(&control, command, actor.clone(), deadline).await, false)
                    }
                    Err(e) => (failure(&e), false),
                },
                Err(_) => (failure("the request line is not UTF-8"), false),
            },
        };
        let mut out = answer.to_string().into_bytes();
        out.push(b'\n');
        if write.write_all(&out).await.is_err() || cut_off {
            return;
        }
    }
}

const USAGE: &str = "verbs: status [ROUTE] | set-weights ROUTE BACKEND=PCT... | rollback ROUTE [REASON] | promote ROUTE | pause ROUTE | resume ROUTE | reload | events [N] | drain TARGET [--deadline DUR] [--wait] | undrain TARGET | mirror-report ROUTE";

/// How long `drain --wait` waits without `--deadline`.
const DEFAULT_DRAIN_WAIT: Duration = Duration::from_secs(30);

/// With `--deadline`, how long `--wait` allows beyond the deadline and the grace an event
/// stream has to reach its boundary, for the last cut requests to leave.
const WAIT_SLACK: Duration = Duration::from_secs(1);

/// `drain --wait`: drains, then answers when the target's in-flight count reaches 0 or
/// `limit` passes, with what the deadline replayed, ended and cut. The waiting happens
/// here, in this client's task: the control path answers every other command meanwhile.
async fn drain_and_wait(control: &Handle, command: Command, actor: Actor, limit: Duration) -> Value {
    let Command::Drain { target, .. } = &command else { return failure("only drain can wait") };
    let target = target.clone();
    let mut answer = control.send(command, actor).await;
    if !is_ok(&answer) {
        return answer;
    }
    let started = tokio::time::Instant::now();
    let mut progress = answer.clone();
    while progress["in_flight"].as_u64().unwrap_or(0) > 0 && started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(20)).await;
        progress = control.send(Command::DrainProgress { target: target.clone() }, Actor::Switchyard).await;
    }
    for key in ["in_flight", "replayed", "ended", "cut", "servers"] {
        answer[key] = progress[key].clone();
    }
    answer["waited_ms"] = (started.elapsed().as_millis() as u64).into();
    answer["drained"] = (progress["in_flight"].as_u64() == Some(0)).into();
    answer
}

/// Parses a request line into a command, and for `drain --wait` the deadline to wait for.
pub fn parse_request(line: &str) -> Result<(Command, Option<Duration>), String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.first() {
        Some(&"drain") => {
            let mut target = None;
            let (mut wait, mut deadline) = (false, None);
            let mut rest = words[1..].iter();
            while let Some(word) = rest.next() {
                match *word {
                    "--wait" => wait = true,
                    "--deadline" => {
                        let d = rest.next().ok_or("--deadline needs a duration, e.g. 30s")?;
                        let d = humantime::parse_duration(d).map_err(|e| format!("--deadline {d:?}: {e}"))?;
                        if d > crate::config::MAX_DURATION {
                            return Err(format!("--deadline {}: longer than a year", humantime::format_duration(d)));
                        }
                        deadline = Some(d);
                    }
                    t if target.is_none() && !t.starts_with("--") => target = Some(t.to_string()),
                    other => return Err(format!("unexpected {other:?}; {USAGE}")),
                }
            }
            let target = target.ok_or("drain needs a TARGET: a backend name or host:port")?;
            // With a deadline, waiting ends once the deadline has dealt with what was left.
            let limit = deadline.map_or(DEFAULT_DRAIN_WAIT, |d| d + crate::proxy::END_GRACE + WAIT_SLACK);
            Ok((Command::Drain { target, deadline }, wait.then_some(limit)))
        }
        Some(&"undrain") if words.len() == 2 => Ok((Command::Undrain { target: words[1].to_string() }, None)),
        Some(&"undrain") => Err("undrain needs one TARGET: a backend name or host:port".into()),
        _ => parse(line).map(|c| (c, None)),
    }
}

/// Parses a request line: the `ctl` verb and its words.
pub fn parse(line: &str) -> Result<Command, String> {
    let mut words = line.split_whitespace();
    let verb = words.next().ok_or_else(|| format!("empty request; {USAGE}"))?;
    let rest: Vec<&str> = words.collect();
    let route = |what: &str| rest.first().map(|r| r.to_string()).ok_or_else(|| format!("{what} needs a ROUTE"));
    match verb {
        "status" if rest.len() <= 1 => Ok(Command::Status { route: rest.first().map(|r| r.to_string()) }),
        "set-weights" => {
            let route = route("set-weights")?;
            let split = rest[1..].iter().map(|w| share(w)).collect::<Result<Vec<_>, _>>()?;
            if split.is_empty() {
                return Err(
                    "set-weights needs BACKEND=PERCENT for each backend, e.g. set-weights agent blue=90 green=10"
                        .into(),
                );
            }
            Ok(Command::SetWeights { route, split })
        }
        "rollback" => {
            let route = route("rollback")?;
            let reason = (rest.len() > 1).then(|| rest[1..].join(" "));
            Ok(Command::Rollback { route, reason })
        }
        "promote" if rest.len() == 1 => Ok(Command::Promote { route: route("promote")? }),
        "pause" if rest.len() == 1 => Ok(Command::Pause { route: route("pause")? }),
        "resume" if rest.len() == 1 => Ok(Command::Resume { route: route("resume")? }),
        "mirror-report" if rest.len() == 1 => Ok(Command::MirrorReport { route: route("mirror-report")? }),
        "promote" | "pause" | "resume" | "mirror-report" => Err(format!("{verb} needs one ROUTE")),
        "reload" if rest.is_empty() => Ok(Command::Reload),
        "events" if rest.len() <= 1 => {
            let last = match rest.first() {
                None => 20,
                Some(n) => n.parse().map_err(|_| format!("events takes a count, not {n:?}"))?,
            };
            Ok(Command::Events { last })
        }
        "status" | "reload" | "events" => Err(format!("too many arguments to {verb}; {USAGE}")),
        other => Err(format!("unknown verb {other:?}; {USAGE}")),
    }
}

/// `blue=90` or `green=0.05` → (backend, basis points).
fn share(word: &str) -> Result<(String, BasisPoints), String> {
    let (backend, pct) = word.split_once('=').ok_or_else(|| format!("{word:?} is not BACKEND=PERCENT"))?;
    let value: f64 = pct.parse().map_err(|_| format!("{pct:?} is not a percentage"))?;
    let bps = (value * 100.0).round();
    if !(0.0..=100.0).contains(&value) || (value * 100.0 - bps).abs() > 1e-6 {
        return Err(format!("{pct:?} is not a percentage from 0 to 100 with at most two decimals"));
    }
    if backend.is_empty() {
        return Err(format!("{word:?} names no backend"));
    }
    Ok((backend.to_string(), (bps as BasisPoints).min(ALL)))
}

/// Whether an answer says `ok`.
pub fn is_ok(answer: &Value) -> bool {
    answer.get("ok").and_then(Value::as_bool) == Some(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_into_commands() {
        assert_eq!(parse("status"), Ok(Command::Status { route: None }));
        assert_eq!(parse("status agent\n"), Ok(Command::Status { route: Some("agent".into()) }));
        assert_eq!(
            parse("set-weights agent blue=99.95 green=0.05"),
            Ok(Command::SetWeights { route: "agent".into(), split: vec![("blue".into(), 9995), ("green".into(), 5)] })
        );
        assert_eq!(
            parse("rollback agent p99 too high"),
            Ok(Command::Rollback { route: "agent".into(), reason: Some("p99 too high".into()) })
        );
        assert_eq!(parse("events 5"), Ok(Command::Events { last: 5 }));
        assert_eq!(parse("reload"), Ok(Command::Reload));
        assert_eq!(parse("promote agent"), Ok(Command::Promote { route: "agent".into() }));
        assert_eq!(parse("mirror-report agent"), Ok(Command::MirrorReport { route: "agent".into() }));
        assert!(parse("mirror-report").expect_err("refused").contains("needs one ROUTE"));
        assert_eq!(parse("pause agent"), Ok(Command::Pause { route: "agent".into() }));
        assert_eq!(parse("resume agent"), Ok(Command::Resume { route: "agent".into() }));
        assert!(parse("promote").expect_err("refused").contains("needs one ROUTE"));
        assert_eq!(parse_request("drain blue"), Ok((Command::Drain { target: "blue".into(), deadline: None }, None)));
        assert_eq!(
            parse_request("drain 127.0.0.1:9001 --deadline 2s --wait"),
            Ok((
                Command::Drain { target: "127.0.0.1:9001".into(), deadline: Some(Duration::from_secs(2)) },
                Some(Duration::from_secs(2) + crate::proxy::END_GRACE + WAIT_SLACK)
            ))
        );
        assert_eq!(
            parse_request("drain blue --deadline 500ms"),
            Ok((Command::Drain { target: "blue".into(), deadline: Some(Duration::from_millis(500)) }, None)),
            "a deadline applies without --wait too"
        );
        assert_eq!(parse_request("undrain blue"), Ok((Command::Undrain { target: "blue".into() }, None)));
        assert!(parse_request("drain").expect_err("refused").contains("needs a TARGET"));
        assert!(parse_request("drain blue --deadline soon").expect_err("refused").contains("--deadline"));
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        assert!(parse("explode").expect_err("refused").contains("unknown verb \"explode\""));
        assert!(parse("set-weights agent blue").expect_err("refused").contains("not BACKEND=PERCENT"));
        assert!(parse("set-weights agent blue=101").expect_err("refused").contains("from 0 to 100"));
        assert!(parse("set-weights agent blue=0.001").expect_err("refused").contains("two decimals"));
        assert!(parse("set-weights agent").expect_err("refused").contains("needs BACKEND=PERCENT"));
        assert!(parse("rollback").expect_err("refused").contains("needs a ROUTE"));
        assert!(parse("events many").expect_err("refused").contains("takes a count"));
        assert!(parse("").expect_err("refused").contains("empty request"));
        // A deadline so long that adding the wait's slack would overflow: refused, not a panic.
        for line in
            ["drain blue --deadline 18446744073709551615s", "drain blue --deadline 18446744073709551615s --wait"]
        {
            assert!(parse_request(line).expect_err("refused").contains("longer than a year"), "{line}");
        }
        assert!(parse_request("drain blue --deadline 364days --wait").is_ok());
    }

    /// Two switchyards started at once with one `admin.socket`, free or left stale by a
    /// crash: exactly one gets it, the other is told it is in use, and the socket at the
    /// path is the winner's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn of_two_binding_one_path_at_once_exactly_one_wins() {
        let dir = crate::test_support::empty_dir("admin-race");
        for round in 0..20 {
            let path = dir.join(format!("admin-{round}.sock"));
            if round % 2 == 1 {
                // A socket file left by a crashed run, which both find and replace.
                drop(std::os::unix::net::UnixListener::bind(&path).expect("stale socket"));
            }
            let start = std::sync::Arc::new(std::sync::Barrier::new(2));
            let racers: Vec<_> = (0..2)
                .map(|_| {
                    let (path, start) = (path.clone(), start.clone());
                    tokio::task::spawn_blocking(move || {
                        start.wait();
                        bind(&path, 0o600)
                    })
                })
                .collect();
            let mut won = Vec::new();
            for racer in racers {
                match racer.await.expect("no panic") {
                    Ok(listener) => won.push(listener),
                    Err(e) => assert!(matches!(e, AdminError::InUse(_)), "round {round}: {e}"),
                }
            }
            assert_eq!(won.len(), 1, "round {round}: both switchyards bound {}", path.display());
            let _client = UnixStream::connect(&path).await.expect("the socket answers");
            tokio::time::timeout(Duration::from_secs(5), won[0].listener.accept())
                .await
                .expect("the winner is the one at the path")
                .expect("accept");
        }
        let left: Vec<_> = std::fs::read_dir(&dir).expect("dir").map(|e| e.expect("entry").file_name()).collect();
        let sockets = left.iter().filter(|n| n.to_string_lossy().ends_with(".sock")).count();
        let locks = left.iter().filter(|n| n.to_string_lossy().ends_with(".sock.lock")).count();
        assert_eq!(
            (sockets, locks, left.len()),
            (20, 20, 40),
            "a socket and its lock per round, nothing else: {left:?}"
        );
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
