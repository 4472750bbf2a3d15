//! `switchyard demo`: the whole job on one machine with nothing else installed.
//!
//! Two example agents (a stable version and a canary) run on loopback; switchyard stands in
//! front of them with a 90/10 split and sticky conversations; simulated conversations
//! stream SSE tokens and hold long-polls through it for a few seconds, and one stable
//! server is drained mid-run; then the demo prints what each version served and checks
//! that no conversation changed version and nothing failed.

pub mod agent;

use std::collections::{BTreeMap, HashSet};
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
const CANARY: &str = "v1.1.0";
const CONVERSATIONS: usize = 60;
const TRAFFIC_FOR: Duration = Duration::from_secs(4);
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
}

/// What one conversation saw.
#[derive(Debug, Default)]
struct Conversation {
    versions: HashSet<String>,
    requests: u64,
    tokens: u64,
    failures: u64,
}

/// Runs the demo, writing its report to `out`.
pub async fn run(out: &mut impl Write) -> Result<(), DemoError> {
    let stable = Agent::start(STABLE).await.map_err(DemoError::Agent)?;
    let stable_2 = Agent::start(STABLE).await.map_err(DemoError::Agent)?;
    let canary = Agent::start(CANARY).await.map_err(DemoError::Agent)?;
    let run_dir = std::env::temp_dir().join(format!("switchyard-demo-{}", std::process::id()));
    let config =
        crate::config::parse(&demo_config([stable.addr, stable_2.addr], canary.addr, &run_dir), "demo")?.config;
    let proxy = crate::app::start(config, None).await?;
    let addr = proxy.http_addr().ok_or(crate::app::StartError::NoListener)?;

    let say = |out: &mut dyn Write, line: String| writeln!(out, "{line}").map_err(DemoError::Output);
    say(out, "switchyard demo".into())?;
    say(
        out,
        format!(
            "  stable agents {STABLE} on {} and {}, canary agent {CANARY} on {}",
            stable.addr, stable_2.addr, canary.addr
        ),
    )?;
    say(out, format!("  switchyard on {addr}: split stable 90 % / canary 10 %, sticky on {STICKY_HEADER}"))?;
    say(
        out,
        format!("  driving {CONVERSATIONS} conversations (SSE token streams and long-polls) for {TRAFFIC_FOR:?}..."),
    )?;

    let deadline = Instant::now() + TRAFFIC_FOR;
    let tasks: Vec<_> =
        (0..CONVERSATIONS).map(|i| tokio::spawn(converse(addr, format!("conv-{i:03}"), deadline))).collect();

    // Halfway through, drain one stable server while conversations run on it.
    tokio::time::sleep(TRAFFIC_FOR / 3).await;
    let target = stable_2.addr.to_string();
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
    say(
        out,
        format!(
            "  drained {target} mid-run: in flight {} (in {:?}); its conversations moved to the other stable server",
            trail.join(" → "),
            drain_started.elapsed()
        ),
    )?;

    let mut conversations = Vec::with_capacity(tasks.len());
    for task in tasks {
        conversations.push(task.await.unwrap_or_else(|_| Conversation { failures: 1, ..Default::default() }));
    }
    proxy.stop().await;
    let _ = std::fs::remove_dir_all(&run_dir);

    let mut by_version: BTreeMap<String, (usize, u64, u64)> = BTreeMap::new();
    for c in &conversations {
        for v in &c.versions {
            let entry = by_version.entry(v.clone()).or_default();
            entry.0 += 1;
            entry.1 += c.requests;
            entry.2 += c.tokens;
        }
    }
    let total: u64 = conversations.iter().map(|c| c.requests).sum();
    let failures: u64 = conversations.iter().map(|c| c.failures).sum();
    let flipped = conversations.iter().filter(|c| c.versions.len() > 1).count();

    say(out, String::new())?;
    say(
        out,
        format!("  {:<10} {:>13} {:>9} {:>8} {:>11}", "version", "conversations", "requests", "share", "SSE tokens"),
    )?;
    for (version, (convs, requests, tokens)) in &by_version {
        let share = if total == 0 { 0.0 } else { *requests as f64 * 100.0 / total as f64 };
        say(out, format!("  {version:<10} {convs:>13} {requests:>9} {share:>7.1}% {tokens:>11}"))?;
    }
    say(out, String::new())?;
    say(out, format!("  requests: {total}, failed: {failures}"))?;
    say(out, format!("  conversations that changed version: {flipped} (sticky keys keep each on one version)"))?;

    if failures > 0 {
        return Err(DemoError::Failures(failures));
    }
    if flipped > 0 {
        return Err(DemoError::Flipped(flipped));
    }
    Ok(())
}

fn demo_config(stable: [SocketAddr; 2], canary: SocketAddr, run_dir: &std::path::Path) -> String {
    let [stable, stable_2] = stable;
    let run = run_dir.display();
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
servers = ["{canary}"]
version = "{CANARY}"

[[routes]]
name = "agent"
split = {{ stable = 90, canary = 10 }}
sticky = {{ header = "{STICKY_HEADER}" }}
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
        let path = if turn % 2 == 0 { "/chat?tokens=8" } else { "/poll?ms=150" };
        turn += 1;
        seen.requests += 1;
        match exchange(proxy, &mut sender, &id, path).await {
            Ok((version, tokens)) => {
                seen.versions.insert(version);
                seen.tokens += tokens;
            }
            Err(e) => {
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
) -> Result<(String, u64), String> {
    if sender.as_ref().is_none_or(|s| s.is_closed()) {
        let stream = TcpStream::connect(proxy).await.map_err(|e| e.to_string())?;
        let (s, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        *sender = Some(s);
    }
    let s = sender.as_mut().ok_or("no connection")?;
    s.ready().await.map_err(|e| e.to_string())?;
    let req = Request::get(path)
        .header("host", "agent.local")
        .header(STICKY_HEADER, id)
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let response = s.send_request(req).await.map_err(|e| e.to_string())?;
    if response.status() != StatusCode::OK {
        return Err(format!("status {}", response.status()));
    }
    let version =
        response.headers().get("x-agent-version").and_then(|v| v.to_str().ok()).unwrap_or("unknown").to_string();
    let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    let tokens = body.windows(12).filter(|w| w == b"event: token").count() as u64;
    Ok((version, tokens))
}
