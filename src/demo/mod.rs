//! `switchyard demo`: the whole job on one machine with nothing else installed.
//!
//! Example agents run on loopback: two of the stable version, a faulty canary and a healthy
//! one. switchyard stands in front with sticky conversations and a canary rollout.
//!
//! 1. Conversations (SSE token streams and long-polls) flow while the faulty canary is
//!    rolled out: switchyard measures it, rolls it back and says why. One stable server is
//!    drained meanwhile.
//! 2. The config names the healthy canary: a new rollout, promoted step by step to 100 %.
//! 3. The config adds a shadow of the next version, which streams more tokens than asked:
//!    every request is copied to it and its answers compared; no client ever sees them.
//!
//! The demo checks the story: the faulty canary rolled back, the healthy one complete,
//! nothing failed but the faulty canary's own errors, no conversation changed version but by
//! that rollback, the shadow's differences found and none of its answers reaching a client.

pub mod agent;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use agent::Agent;

use crate::control::{Actor, Command};

const STABLE: &str = "v1.0.0";
const FAULTY: &str = "v1.1.0";
const HEALTHY: &str = "v1.2.0";
const SHADOW: &str = "v1.3.0";
/// The shadow streams this many tokens more than each chat asks for.
const SHADOW_EXTRA_TOKENS: u64 = 2;
const SHADOW_FOR: Duration = Duration::from_secs(2);
/// The faulty canary fails one request in this many.
const FAULTY_EVERY: u64 = 4;
const CONVERSATIONS: usize = 60;
const TRAFFIC_FOR: Duration = Duration::from_secs(4);
/// How long each act may take to reach its end before the demo gives up.
const ACT_LIMIT: Duration = Duration::from_secs(20);
const STICKY_HEADER: &str = "x-conversation-id";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start an example agent: {0}")]
    Agent(std::io::Error),
    #[error("the demo config is invalid: {0}")]
    Config(#[from] crate::config::ConfigErrors),
    #[error("cannot start switchyard: {0}")]
    Start(#[from] crate::app::StartError),
    #[error("cannot write the report: {0}")]
    Output(std::io::Error),
    #[error("{0} requests failed")]
    Failures(u64),
    #[error("{0} conversations changed version mid-way")]
    Flipped(usize),
    #[error("the rollout did not go as the demo expects: {0}")]
    Story(String),
    #[error("cannot write the demo config: {0}")]
    ConfigFile(std::io::Error),
}

/// What one conversation saw.
#[derive(Debug, Default)]
struct Conversation {
    /// Requests and SSE tokens each version served.
    versions: BTreeMap<String, (u64, u64)>,
    requests: u64,
    failures: u64,
    /// 5xx answers from the faulty canary: what the rollout measures and reacts to.
    canary_errors: u64,
}

/// Runs the demo, writing its report to `out`.
pub async fn run(out: &mut impl Write) -> Result<(), DemoError> {
    let stable = Agent::start(STABLE).await.map_err(DemoError::Agent)?;
    let stable_2 = Agent::start(STABLE).await.map_err(DemoError::Agent)?;
    let faulty = Agent::faulty(FAULTY, FAULTY_EVERY).await.map_err(DemoError::Agent)?;
    let healthy = Agent::start(HEALTHY).await.map_err(DemoError::Agent)?;
    let shadow = Agent::chatty(SHADOW, SHADOW_EXTRA_TOKENS).await.map_err(DemoError::Agent)?;
    let run_dir = std::env::temp_dir().join(format!("switchyard-demo-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir).map_err(DemoError::ConfigFile)?;
    let config_path = run_dir.join("switchyard.toml");
    let write_config = |canary: &Agent, shadow: Option<&Agent>| {
        std::fs::write(&config_path, demo_config([stable.addr, stable_2.addr], canary, shadow, &run_dir))
            .map_err(DemoError::ConfigFile)
    };
    write_config(&faulty, None)?;
    let config = crate::config::load(&config_path)?.config;
    let proxy = crate::app::start(config, Some(config_path.clone())).await?;
    let addr = proxy.http_addr().ok_or(crate::app::StartError::NoListener)?;

    let say = |out: &mut dyn Write, line: String| writeln!(out, "{line}").map_err(DemoError::Output);
    say(out, "switchyard demo".into())?;
    say(out, format!("  stable agents {STABLE} on {} and {}", stable.addr, stable_2.addr))?;
    say(out, format!("  switchyard on {addr}, sticky on {STICKY_HEADER}; canary steps 20 % → 50 % → 100 %"))?;
    say(out, "  analysis: 2 s window, at least 20 requests, at most 5 % errors, p99 under 500 ms".into())?;

    say(out, String::new())?;
    say(out, format!("act 1: canary {FAULTY} on {} (fails one request in {FAULTY_EVERY})", faulty.addr))?;
    say(out, format!("  {CONVERSATIONS} conversations (SSE token streams and long-polls) for {TRAFFIC_FOR:?}..."))?;
    let tasks = start_conversations(addr, TRAFFIC_FOR);
    let target = stable_2.addr.to_string();
    let (act_1, drain_line) = tokio::join!(follow_rollout(&proxy, "RolledBack", out), drain_one(&proxy, &target));
    let act_1 = act_1?;
    say(out, drain_line)?;
    let act_1_conversations = gather(tasks).await;
    report(out, &act_1_conversations)?;
    if act_1["state"] != "RolledBack" {
        return Err(DemoError::Story(format!("the faulty canary was not rolled back: {}", act_1["status"])));
    }

    say(out, String::new())?;
    say(out, format!("act 2: the config now names canary {HEALTHY} on {} (a new rollout)", healthy.addr))?;
    write_config(&healthy, None)?;
    reload(&proxy, "the new config").await?;
    let tasks = start_conversations(addr, TRAFFIC_FOR);
    let act_2 = follow_rollout(&proxy, "Complete", out).await?;
    let act_2_conversations = gather(tasks).await;
    report(out, &act_2_conversations)?;
    if act_2["state"] != "Complete" {
        return Err(DemoError::Story(format!("the healthy canary did not complete: {}", act_2["status"])));
    }
    say(out, format!("  {HEALTHY} serves 100 %: the rollout is complete"))?;

    say(out, String::new())?;
    say(
        out,
        format!(
            "act 3: the config adds shadow {SHADOW} on {} (it streams {SHADOW_EXTRA_TOKENS} tokens more than asked); every request is copied to it",
            shadow.addr
        ),
    )?;
    write_config(&healthy, Some(&shadow))?;
    reload(&proxy, "the shadow config").await?;
    let tasks = start_conversations(addr, SHADOW_FOR);
    let act_3_conversations = gather(tasks).await;
    report(out, &act_3_conversations)?;
    let mirror = mirror_outcome(&proxy, out).await?;
    proxy.stop().await;
    let _ = std::fs::remove_dir_all(&run_dir);

    let all = act_1_conversations.iter().chain(&act_2_conversations).chain(&act_3_conversations);
    let failures: u64 = all.clone().map(|c| c.failures).sum();
    // Conversations move only when the faulty canary is rolled back, or (act 2) when the
    // cohort grows onto the new canary; never back and forth.
    let flipped =
        act_1_conversations.iter().filter(|c| c.versions.len() > 1 && !c.versions.contains_key(FAULTY)).count()
            + act_2_conversations.iter().filter(|c| c.versions.len() > 1 && !c.versions.contains_key(HEALTHY)).count();
    say(out, format!("  failed: {failures} (beyond the faulty canary's own errors)"))?;
    say(out, format!("  conversations that changed version other than by the rollout: {flipped}"))?;
    let shadow_seen = act_3_conversations.iter().filter(|c| c.versions.contains_key(SHADOW)).count();
    say(out, format!("  conversations answered by the shadow: {shadow_seen}"))?;
    if failures > 0 {
        return Err(DemoError::Failures(failures));
    }
    if flipped > 0 {
        return Err(DemoError::Flipped(flipped));
    }
    let count = |outcome: &str| mirror["counts"][outcome].as_u64().unwrap_or(0);
    if shadow_seen > 0 || count("match") == 0 || count("body_mismatch") == 0 {
        return Err(DemoError::Story(format!("mirroring did not go as expected: {mirror}")));
    }
    Ok(())
}

/// Waits for the last copies to be judged, then prints what the comparison found.
async fn mirror_outcome(proxy: &crate::app::Running, out: &mut impl Write) -> Result<serde_json::Value, DemoError> {
    let asked = Instant::now();
    let report = loop {
        let report = proxy.command(Command::MirrorReport { route: "agent".into() }, Actor::Switchyard).await;
        if report["in_flight"] == 0 || asked.elapsed() > Duration::from_secs(5) {
            break report;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let counts: Vec<String> = report["counts"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, n)| n.as_u64().is_some_and(|n| n > 0))
        .map(|(outcome, n)| format!("{outcome} {n}"))
        .collect();
    let mut lines = vec![format!("  copies compared: {} sampled: {}", report["sampled"], counts.join(", "))];
    if let Some(d) = report["differences"].as_array().and_then(|d| d.first()) {
        lines.push(format!(
            "  e.g. {} {}: {}",
            d["method"].as_str().unwrap_or("?"),
            d["path"].as_str().unwrap_or("?"),
            d["detail"].as_str().unwrap_or("?")
        ));
    }
    lines.push("  (long-polls answer alike by JSON structure; the chat streams differ in their event counts)".into());
    for line in lines {
        writeln!(out, "{line}").map_err(DemoError::Output)?;
    }
    Ok(report)
}

/// A third of the way into act 1, drains one stable server while conversations run on it,
/// and describes its in-flight count falling.
async fn drain_one(proxy: &crate::app::Running, target: &str) -> String {
    tokio::time::sleep(TRAFFIC_FOR / 3).await;
    let target = target.to_string();
    let drained = proxy.command(Command::Drain { target: target.clone(), deadline: None }, Actor::Switchyard).await;
    let mut counts = vec![drained["in_flight"].as_u64().unwrap_or(0)];
    let drain_started = Instant::now();
    while counts.last().is_some_and(|&n| n > 0) && drain_started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let progress = proxy.command(Command::DrainProgress { target: target.clone() }, Actor::Switchyard).await;
        let n = progress["in_flight"].as_u64().unwrap_or(0);
        if counts.last() != Some(&n) {
            counts.push(n);
        }
    }
    let trail: Vec<String> = counts.iter().map(u64::to_string).collect();
    format!(
        "  drained {target} mid-run: in flight {} (in {:?}); its conversations moved to the other stable server",
        trail.join(" → "),
        drain_started.elapsed()
    )
}

/// Starts every conversation, each running until `lasting` has passed.
fn start_conversations(proxy: SocketAddr, lasting: Duration) -> Vec<tokio::task::JoinHandle<Conversation>> {
    let deadline = Instant::now() + lasting;
    (0..CONVERSATIONS).map(|i| tokio::spawn(converse(proxy, format!("conv-{i:03}"), deadline))).collect()
}

/// Reloads the config just written; `what` names it in the error if it is refused.
async fn reload(proxy: &crate::app::Running, what: &str) -> Result<(), DemoError> {
    let reloaded = proxy.command(Command::Reload, Actor::Switchyard).await;
    if reloaded["ok"] != true {
        return Err(DemoError::Story(format!("{what} was refused: {}", reloaded["error"])));
    }
    Ok(())
}

async fn gather(tasks: Vec<tokio::task::JoinHandle<Conversation>>) -> Vec<Conversation> {
    let mut conversations = Vec::with_capacity(tasks.len());
    for task in tasks {
        conversations.push(task.await.unwrap_or_else(|_| Conversation { failures: 1, ..Default::default() }));
    }
    conversations
}

/// Prints the rollout's moves until it reaches `end` (or RolledBack/Complete, or the act's
/// time limit); returns its last status.
async fn follow_rollout(
    proxy: &crate::app::Running,
    end: &str,
    out: &mut impl Write,
) -> Result<serde_json::Value, DemoError> {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        let status = proxy.command(Command::Status { route: Some("agent".into()) }, Actor::Switchyard).await;
        let rollout = status["routes"][0]["rollout"].clone();
        let line = format!(
            "  {:>5.1}s  rollout {}: step {}/{}, canary {} %",
            started.elapsed().as_secs_f64(),
            rollout["status"].as_str().unwrap_or("?"),
            rollout["step"],
            rollout["steps"],
            rollout["canary_weight"]
        );
        let state = rollout["state"].as_str().unwrap_or("");
        let key = line.split_once("rollout").map_or("", |(_, k)| k).to_string();
        if key != last {
            writeln!(out, "{line}").map_err(DemoError::Output)?;
            last = key;
        }
        if state == end || state == "RolledBack" || state == "Complete" || started.elapsed() > ACT_LIMIT {
            if let Some(reason) = rollout["reason"].as_str() {
                writeln!(out, "          why: {reason}").map_err(DemoError::Output)?;
                let side = |s: &serde_json::Value| {
                    format!("{} requests, {} % errors, p99 {} ms", s["requests"], s["error_rate"], s["p99_ms"])
                };
                let m = &rollout["measured"];
                writeln!(out, "          canary: {}; stable: {}", side(&m["canary"]), side(&m["stable"]))
                    .map_err(DemoError::Output)?;
            }
            return Ok(rollout);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What each version served in an act.
fn report(out: &mut impl Write, conversations: &[Conversation]) -> Result<(), DemoError> {
    let mut by_version: BTreeMap<String, (usize, u64, u64)> = BTreeMap::new();
    for c in conversations {
        for (v, (requests, tokens)) in &c.versions {
            let entry = by_version.entry(v.clone()).or_default();
            entry.0 += 1;
            entry.1 += requests;
            entry.2 += tokens;
        }
    }
    let total: u64 = conversations.iter().map(|c| c.requests).sum();
    let failures: u64 = conversations.iter().map(|c| c.failures).sum();
    let canary_errors: u64 = conversations.iter().map(|c| c.canary_errors).sum();
    let mut lines = vec![format!(
        "  {:<10} {:>13} {:>9} {:>8} {:>11}",
        "version", "conversations", "requests", "share", "SSE tokens"
    )];
    for (version, (convs, requests, tokens)) in &by_version {
        let share = if total == 0 { 0.0 } else { *requests as f64 * 100.0 / total as f64 };
        lines.push(format!("  {version:<10} {convs:>13} {requests:>9} {share:>7.1}% {tokens:>11}"));
    }
    lines.push(format!("  requests: {total}, failed: {failures}, answered 500 by the faulty canary: {canary_errors}"));
    for line in lines {
        writeln!(out, "{line}").map_err(DemoError::Output)?;
    }
    Ok(())
}

fn demo_config(stable: [SocketAddr; 2], canary: &Agent, shadow: Option<&Agent>, run_dir: &std::path::Path) -> String {
    let [stable, stable_2] = stable;
    let run = run_dir.display();
    let (canary_addr, canary_version) = (canary.addr, &canary.version);
    // The shadow's own version header would differ on every answer: it is not compared.
    let (shadow_backend, mirror) = match shadow {
        None => (String::new(), String::new()),
        Some(shadow) => (
            format!("[backends.shadow]\nservers = [\"{}\"]\nversion = \"{}\"\n", shadow.addr, shadow.version),
            "mirror = { backend = \"shadow\", percent = 100, compare = true, max_in_flight = 256, ignore_headers = [\"x-agent-version\"] }\n"
                .to_string(),
        ),
    };
    format!(
        r#"
[listen]
http = "127.0.0.1:0"

[admin]
socket = "{run}/switchyard.sock"
state_dir = "{run}/state"

[defaults]
request_timeout = "10s"

[backends.stable]
servers = ["{stable}", "{stable_2}"]
version = "{STABLE}"

[backends.canary]
servers = ["{canary_addr}"]
version = "{canary_version}"

{shadow_backend}
[[routes]]
name = "agent"
split = {{ stable = 100 }}
sticky = {{ header = "{STICKY_HEADER}" }}
{mirror}
[routes.rollout]
strategy = "canary"
stable = "stable"
canary = "canary"
steps = [ {{ weight = 20, hold = "1s" }}, {{ weight = 50, hold = "1s" }}, {{ weight = 100 }} ]
analysis = {{ window = "2s", min_requests = 20, max_error_rate = 5, max_p99 = "500ms" }}
"#
    )
}

/// One conversation: alternates a streamed chat turn and a long-poll on one keep-alive
/// connection until the deadline.
async fn converse(proxy: SocketAddr, id: String, deadline: Instant) -> Conversation {
    let mut seen = Conversation::default();
    let mut sender = None;
    let mut turn = 0u64;
    while Instant::now() < deadline {
        let path = if turn.is_multiple_of(2) { "/chat?tokens=8" } else { "/poll?ms=150" };
        turn += 1;
        seen.requests += 1;
        match exchange(proxy, &mut sender, &id, path).await {
            Ok((version, tokens)) => {
                let served = seen.versions.entry(version).or_default();
                served.0 += 1;
                served.1 += tokens;
            }
            Err((Some(version), _)) if version == FAULTY => {
                seen.versions.entry(version).or_default().0 += 1;
                seen.canary_errors += 1;
            }
            Err((_, e)) => {
                tracing::warn!(conversation = %id, error = %e, "demo request failed");
                seen.failures += 1;
                sender = None;
            }
        }
    }
    seen
}

async fn exchange(
    proxy: SocketAddr,
    sender: &mut Option<http1::SendRequest<Empty<Bytes>>>,
    id: &str,
    path: &str,
) -> Result<(String, u64), (Option<String>, String)> {
    let failed = |e: String| (None, e);
    if sender.as_ref().is_none_or(|s| s.is_closed()) {
        let stream = TcpStream::connect(proxy).await.map_err(|e| failed(e.to_string()))?;
        let (s, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(|e| failed(e.to_string()))?;
        tokio::spawn(conn);
        *sender = Some(s);
    }
    let s = sender.as_mut().ok_or_else(|| failed("no connection".into()))?;
    s.ready().await.map_err(|e| failed(e.to_string()))?;
    let req = Request::get(path)
        .header("host", "agent.local")
        .header(STICKY_HEADER, id)
        .body(Empty::new())
        .map_err(|e| failed(e.to_string()))?;
    let response = s.send_request(req).await.map_err(|e| failed(e.to_string()))?;
    let version =
        response.headers().get("x-agent-version").and_then(|v| v.to_str().ok()).unwrap_or("unknown").to_string();
    if response.status() != StatusCode::OK {
        let status = response.status();
        // Read the error's body so the connection stays usable.
        let _ = response.into_body().collect().await;
        return Err((Some(version), format!("status {status}")));
    }
    let body = response.into_body().collect().await.map_err(|e| failed(e.to_string()))?.to_bytes();
    let tokens = body.windows(12).filter(|w| w == b"event: token").count() as u64;
    Ok((version, tokens))
}
