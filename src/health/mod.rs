//! Active health checks: one probe task per checked server, flipping the server's
//! "unhealthy" bit. The hot path reads that bit with one atomic load; no table swap is
//! needed when health changes.
//!
//! A probe is a `GET path` on a fresh connection, within `timeout`. It passes when the
//! status is `expect_status` and, if set, the body contains `expect_body` (a build identity
//! such as a version string, so that a server gets traffic only once the right build
//! answers). `rise` passes in a row bring a server into rotation, `fall` failures take it
//! out. Probes are spread over time with jitter so servers are not probed in lockstep.
//!
//! Owned by the control path, which calls [`HealthChecks::sync`] after every table swap.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request};
use http_body_util::BodyExt;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, HealthSpec};
use crate::routes::{Server, Table, UNHEALTHY};
use crate::upstream::{self, RequestBody};

/// The most of a health answer's body read to look for `expect_body`.
const MAX_BODY: usize = 64 * 1024;

/// The running probes, by backend and server address.
#[derive(Debug, Default)]
pub struct HealthChecks {
    probes: HashMap<(Arc<str>, SocketAddr), Probe>,
}

#[derive(Debug)]
struct Probe {
    spec: HealthSpec,
    server: Arc<Server>,
    stop: CancellationToken,
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl HealthChecks {
    /// Makes the probes match `config` and `table`: starts probes for new checked servers,
    /// restarts those whose check changed, stops the rest. A server whose check was removed
    /// is healthy by definition and returns to rotation.
    pub fn sync(&mut self, config: &Config, table: &Table) {
        let mut wanted: HashMap<(Arc<str>, SocketAddr), (HealthSpec, Arc<Server>)> = HashMap::new();
        for backend in table.backends.iter() {
            let Some(spec) = config.backend(&backend.name).and_then(|b| b.health.clone()) else { continue };
            for server in backend.servers.iter() {
                wanted.insert((backend.name.clone(), server.addr), (spec.clone(), server.clone()));
            }
        }
        self.probes.retain(|key, probe| {
            let keep =
                wanted.get(key).is_some_and(|(spec, server)| *spec == probe.spec && Arc::ptr_eq(server, &probe.server));
            if !keep && !wanted.contains_key(key) {
                probe.server.set_out(UNHEALTHY, false);
            }
            keep
        });
        for (key, (spec, server)) in wanted {
            if self.probes.contains_key(&key) {
                continue;
            }
            let stop = CancellationToken::new();
            tokio::spawn(run(key.0.clone(), server.clone(), spec.clone(), stop.clone()));
            self.probes.insert(key, Probe { spec, server, stop });
        }
    }
}

/// Probes one server until stopped.
async fn run(backend: Arc<str>, server: Arc<Server>, spec: HealthSpec, stop: CancellationToken) {
    let (mut passes, mut failures) = (0u32, 0u32);
    loop {
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            result = probe(server.addr, &spec) => result,
        };
        match result {
            Ok(()) => {
                failures = 0;
                passes = passes.saturating_add(1);
                if !server.healthy() && passes >= spec.rise {
                    server.set_out(UNHEALTHY, false);
                    tracing::info!(backend = %backend, server = %server.label, passes, "health check passing: server in rotation");
                }
            }
            Err(reason) => {
                passes = 0;
                failures = failures.saturating_add(1);
                if server.healthy() && failures >= spec.fall {
                    server.set_out(UNHEALTHY, true);
                    tracing::warn!(backend = %backend, server = %server.label, failures, %reason, "health check failing: server out of rotation");
                } else {
                    tracing::debug!(backend = %backend, server = %server.label, %reason, "health check failed");
                }
            }
        }
        // ±10 % jitter keeps a fleet's probes from falling into lockstep.
        let jitter = spec.interval.mul_f64(0.9 + fastrand::f64() * 0.2);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(jitter) => {}
        }
    }
}

/// One probe: passes, or says why not.
pub async fn probe(addr: SocketAddr, spec: &HealthSpec) -> Result<(), String> {
    match tokio::time::timeout(spec.timeout, probe_inner(addr, spec)).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {:?}", spec.timeout)),
    }
}

async fn probe_inner(addr: SocketAddr, spec: &HealthSpec) -> Result<(), String> {
    let conn = upstream::connect(addr, spec.timeout).await.map_err(|e| e.to_string())?;
    let host = HeaderValue::from_str(&addr.to_string()).map_err(|e| e.to_string())?;
    let request = Request::get(spec.path.as_str())
        .header(header::HOST, host)
        .header(header::USER_AGENT, HeaderValue::from_static("switchyard-health"))
        .header(header::CONNECTION, HeaderValue::from_static("close"))
        .body(RequestBody::Empty)
        .map_err(|e| e.to_string())?;
    let (mut head, body) = request.into_parts();
    let response = conn.send(&mut head, body, None, None).await.map_err(|e| e.error.to_string())?;
    let status = response.status();
    if status.as_u16() != spec.expect_status {
        return Err(format!("status {status}, expected {}", spec.expect_status));
    }
    let Some(expected) = &spec.expect_body else { return Ok(()) };
    let body = http_body_util::Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?;
    let body: Bytes = body.to_bytes();
    if memchr::memmem::find(&body, expected.as_bytes()).is_some() {
        Ok(())
    } else {
        Err(format!("body does not contain {expected:?}"))
    }
}
