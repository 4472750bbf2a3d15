//! `switchyard ctl`: sends one request line to the admin socket and prints the answer, as
//! a readable table or as the raw JSON line.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot reach switchyard at {path}: {source} (is it running? is admin.socket the same path?)")]
    Connect { path: String, source: std::io::Error },
    #[error("the admin socket closed without an answer")]
    NoAnswer,
    #[error("talking to the admin socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("the answer is not JSON: {0}")]
    NotJson(#[from] serde_json::Error),
}

/// Sends `words` as one request line and returns the answer.
pub async fn request(socket: &Path, words: &[String]) -> Result<Value, CtlError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| CtlError::Connect { path: socket.display().to_string(), source })?;
    let (read, mut write) = stream.into_split();
    let mut line = words.join(" ");
    line.push('\n');
    write.write_all(line.as_bytes()).await?;
    let mut answer = String::new();
    if BufReader::new(read).read_line(&mut answer).await? == 0 {
        return Err(CtlError::NoAnswer);
    }
    Ok(serde_json::from_str(&answer)?)
}

/// An answer for people: tables for `status` and `events`, a line for the rest.
pub fn render(verb: &str, answer: &Value) -> String {
    let mut out = String::new();
    if let Some(error) = answer.get("error").and_then(Value::as_str) {
        let _ = writeln!(out, "error: {error}");
        return out;
    }
    match verb {
        "status" => status(answer, &mut out),
        "events" => events(answer, &mut out),
        "reload" => {
            let changes: Vec<&str> =
                answer["changes"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            if changes.is_empty() {
                let _ = writeln!(out, "config unchanged (generation {})", answer["generation"]);
            } else {
                let _ = writeln!(out, "reloaded, generation {}:", answer["generation"]);
                for c in changes {
                    let _ = writeln!(out, "  {c}");
                }
            }
        }
        "drain" | "undrain" => drain(answer, &mut out),
        "mirror-report" => mirror_report(answer, &mut out),
        "promote" | "pause" | "resume" => rollout_line(answer, &mut out),
        "rollback" if !answer["state"].is_null() => rollout_line(answer, &mut out),
        _ => {
            let _ = writeln!(
                out,
                "ok: route {} now {} (generation {})",
                text(&answer["route"]),
                split(&answer["split"]),
                answer["generation"]
            );
        }
    }
    out
}

fn text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

fn split(v: &Value) -> String {
    v.as_object().map_or_else(String::new, |m| m.iter().map(|(b, p)| format!("{b}={p}")).collect::<Vec<_>>().join(" "))
}

fn status(answer: &Value, out: &mut String) {
    let _ = writeln!(out, "generation {}  config {}", answer["generation"], text(&answer["config"]));
    if let Some(error) = answer["last_reload_error"].as_str() {
        let _ = writeln!(out, "last reload refused:\n{error}");
    }
    for route in answer["routes"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "\nroute {}  split {} ({})",
            text(&route["name"]),
            split(&route["split"]),
            text(&route["split_source"])
        );
        let _ = writeln!(
            out,
            "  {:<16} {:<12} {:>7}  {:<22} {:>9} {:>10}",
            "backend", "version", "weight", "server", "rotation", "in-flight"
        );
        if !route["rollout"].is_null() {
            let _ = write!(out, "  ");
            rollout_line(&route["rollout"], out);
        }
        let mirror = &route["mirror"];
        if !mirror.is_null() {
            let _ = writeln!(
                out,
                "  mirror to {} at {}%: {} sampled, {} differ, {} shadow errors, {} not sent (ctl mirror-report {})",
                text(&mirror["backend"]),
                mirror["percent"],
                mirror["sampled"],
                mirror["differ"],
                mirror["shadow_errors"],
                mirror["not_sent"],
                text(&route["name"])
            );
        }
        for backend in route["backends"].as_array().into_iter().flatten() {
            let m = &backend["measured"];
            let ms = |v: &Value| v.as_f64().map_or_else(|| "-".to_string(), |v| format!("{v}ms"));
            let _ = writeln!(
                out,
                "  {:<16} over {}s: {} req/s, {}% errors, p50 {}, p99 {} ({} requests)",
                text(&backend["name"]),
                m["window_s"],
                m["rate"],
                m["error_rate"],
                ms(&m["p50_ms"]),
                ms(&m["p99_ms"]),
                m["requests"]
            );
        }
        for backend in route["backends"].as_array().into_iter().flatten() {
            for (i, server) in backend["servers"].as_array().into_iter().flatten().enumerate() {
                let (name, version, weight) = if i == 0 {
                    (
                        text(&backend["name"]),
                        backend["version"].as_str().unwrap_or("-").to_string(),
                        format!("{}%", backend["weight"]),
                    )
                } else {
                    Default::default()
                };
                let rotation = if server["in_rotation"].as_bool() == Some(true) { "in" } else { "out" };
                let _ = writeln!(
                    out,
                    "  {name:<16} {version:<12} {weight:>7}  {:<22} {rotation:>9} {:>10}",
                    text(&server["addr"]),
                    server["in_flight"]
                );
            }
        }
    }
}

/// One rollout, in a line: where it is and what it measures.
fn rollout_line(rollout: &Value, out: &mut String) {
    let _ = write!(
        out,
        "rollout {} -> {}: {}, step {}/{}, canary {}%",
        text(&rollout["stable"]),
        text(&rollout["canary"]),
        text(&rollout["status"]),
        rollout["step"],
        rollout["steps"],
        rollout["canary_weight"]
    );
    if let Some(left) = rollout["hold_left_s"].as_f64().filter(|l| *l > 0.0) {
        let _ = write!(out, ", hold {left:.1}s left");
    }
    if let Some(reason) = rollout["reason"].as_str() {
        let _ = write!(out, " ({reason})");
    }
    let _ = writeln!(out);
}

fn drain(answer: &Value, out: &mut String) {
    let verb = if answer["draining"].as_bool() == Some(true) { "draining" } else { "back in rotation" };
    let _ = write!(out, "ok: {} {verb} (generation {})", text(&answer["target"]), answer["generation"]);
    if let Some(ms) = answer["deadline_ms"].as_u64() {
        let _ = write!(out, ", deadline {ms} ms");
    }
    let _ = writeln!(out);
    if let Some(ms) = answer["waited_ms"].as_u64() {
        let done = if answer["drained"].as_bool() == Some(true) { "drained" } else { "still in flight" };
        let _ = writeln!(out, "  after {ms} ms: {done}");
    }
    let _ = writeln!(
        out,
        "  in flight {}  replayed {}  ended {}  cut {}",
        answer["in_flight"], answer["replayed"], answer["ended"], answer["cut"]
    );
    for server in answer["servers"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "  {:<22} in flight {}", text(&server["addr"]), server["in_flight"]);
    }
}

fn mirror_report(answer: &Value, out: &mut String) {
    let m = &answer["mirror"];
    let _ = writeln!(
        out,
        "route {} mirrors {} % to {}{}; {} in flight (at most {})",
        text(&answer["route"]),
        m["percent"],
        text(&m["backend"]),
        if m["compare"].as_bool() == Some(true) { ", comparing answers" } else { "" },
        answer["in_flight"],
        m["max_in_flight"],
    );
    let _ = writeln!(out, "sampled {}", answer["sampled"]);
    for (label, count) in answer["counts"].as_object().into_iter().flatten() {
        if count.as_u64() != Some(0) {
            let _ = writeln!(out, "  {label:<16} {count}");
        }
    }
    let latency = &answer["latency"];
    for side in ["primary", "shadow"] {
        let l = &latency[side];
        if l["requests"].as_u64().unwrap_or(0) > 0 {
            let _ = writeln!(
                out,
                "{side:<8} p50 {} ms  p99 {} ms  over {} compared pairs in the last {} s",
                l["p50_ms"], l["p99_ms"], l["requests"], latency["window_s"]
            );
        }
    }
    let differences = answer["differences"].as_array().map_or(&[][..], Vec::as_slice);
    if !differences.is_empty() {
        let _ = writeln!(out, "latest differences:");
    }
    for d in differences {
        let status = |v: &Value| v.as_u64().map_or("-".to_string(), |s| s.to_string());
        let _ = writeln!(
            out,
            "  {} {:<7} {:<30} {:<16} {} vs {}  {} vs {} ms  {}",
            text(&d["at"]),
            text(&d["method"]),
            text(&d["path"]),
            text(&d["result"]),
            status(&d["primary_status"]),
            status(&d["shadow_status"]),
            compact(&d["primary_ms"]),
            compact(&d["shadow_ms"]),
            text(&d["detail"]),
        );
    }
}

fn events(answer: &Value, out: &mut String) {
    for e in answer["events"].as_array().into_iter().flatten() {
        let mut line = format!("{}  {:<22} {:<15}", text(&e["time"]), text(&e["actor"]), text(&e["action"]));
        if let Some(route) = e["route"].as_str() {
            let _ = write!(line, " route {route}");
        }
        if !e["before"].is_null() || !e["after"].is_null() {
            let _ = write!(line, "  {} -> {}", compact(&e["before"]), compact(&e["after"]));
        }
        if let Some(reason) = e["reason"].as_str() {
            let _ = write!(line, "  ({})", reason.lines().next().unwrap_or(""));
        }
        let _ = writeln!(out, "{line}  [gen {}]", e["generation"]);
    }
}

fn compact(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::Object(_) => split(v),
        other => other.to_string(),
    }
}
