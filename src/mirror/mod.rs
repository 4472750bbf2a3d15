//! Shadow traffic: a sampled share of a route's requests is copied to a shadow backend,
//! and with `compare` the shadow's answers are compared with the primary's.
//!
//! ```text
//! request ─► Mirror::start: dice, body size, shadow in rotation, in-flight bound
//!    │          └─ spawns the copy's task ─────────────────────────────────┐
//!    ├─ body frames ─► Tee ─► primary     (the copy keeps each frame, up to max_body)
//!    └─ response head and body ─► PrimaryDigest (status, latency, headers, body shape)
//!                                                                          ▼
//! copy task: wait for the whole body ─► a shadow server, on the mirror's own pool, with
//!   its own timeout ─► read and digest the shadow's answer ─► wait for the primary's
//!   ─► compare ─► count one outcome; keep a sample of the differing
//! ```
//!
//! The primary never waits for the shadow: the copy is taken from frames already on their
//! way, and everything after is the task's. Shadow requests are not counted against the
//! shadow's servers (in-flight, outliers) nor against anyone's analysis figures; the only
//! things they read from the table are which shadow servers are in rotation.
//!
//! Every sampled request ends in exactly one [`Outcome`], so the counts add up to the
//! sampled share of traffic.

pub mod shape;
mod tee;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::config::{MirrorSpec, ALL};
use crate::headers::Forward;
use crate::routes::{Backend, DEFAULT_WINDOW};
use crate::stats::Stats;
use crate::upstream::{self, Connection, Pool, RequestBody, SendError};
use shape::{Digest, Kind, Shape};
pub use tee::Tee;
use tee::{BodyCopy, TooLarge};

/// Marks every mirrored copy, so the shadow (and its logs) can tell.
pub static MIRROR_HEADER: HeaderName = HeaderName::from_static("x-switchyard-mirror");

/// Differing requests kept for `mirror-report`, most recent first.
const SAMPLES: usize = 32;

/// What became of one sampled request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Compared: the shadow answered like the primary.
    Match,
    StatusMismatch,
    BodyMismatch,
    HeaderMismatch,
    /// `compare` off: the shadow answered.
    Sent,
    /// The shadow failed: no connection, no answer within `timeout`, a broken body.
    ShadowError,
    /// Not sent: the in-flight bound was reached, or no shadow server is in rotation.
    Dropped,
    /// Not sent: the request body was over `max_body`.
    TooLarge,
    /// Not compared: the request or the primary's response never ended (the client went
    /// away), so there was nothing whole to send or compare.
    Unfinished,
}

impl Outcome {
    pub const ALL: [Outcome; 9] = [
        Outcome::Match,
        Outcome::StatusMismatch,
        Outcome::BodyMismatch,
        Outcome::HeaderMismatch,
        Outcome::Sent,
        Outcome::ShadowError,
        Outcome::Dropped,
        Outcome::TooLarge,
        Outcome::Unfinished,
    ];

    /// The `result` label of `switchyard_mirror_total` and the key in `mirror-report`.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Match => "match",
            Outcome::StatusMismatch => "status_mismatch",
            Outcome::BodyMismatch => "body_mismatch",
            Outcome::HeaderMismatch => "header_mismatch",
            Outcome::Sent => "sent",
            Outcome::ShadowError => "shadow_error",
            Outcome::Dropped => "dropped",
            Outcome::TooLarge => "too_large",
            Outcome::Unfinished => "unfinished",
        }
    }
}

/// A route's mirroring figures, carried from one table to the next while the route keeps
/// mirroring to the same backend.
#[derive(Debug)]
pub struct MirrorState {
    /// Requests sampled: each is counted in one outcome once its copy's task ends.
    sampled: AtomicU64,
    in_flight: AtomicU32,
    counts: [AtomicU64; Outcome::ALL.len()],
    /// Latency to the response head of both sides of every compared pair.
    primary_latency: Stats,
    shadow_latency: Stats,
    differences: Mutex<VecDeque<Difference>>,
}

impl Default for MirrorState {
    fn default() -> Self {
        MirrorState {
            sampled: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            counts: Default::default(),
            primary_latency: Stats::new(DEFAULT_WINDOW),
            shadow_latency: Stats::new(DEFAULT_WINDOW),
            differences: Mutex::new(VecDeque::with_capacity(SAMPLES)),
        }
    }
}

impl MirrorState {
    pub fn count(&self, outcome: Outcome) -> u64 {
        self.counts[outcome as usize].load(Ordering::Relaxed)
    }
}

/// One request whose copy did not answer like the primary.
#[derive(Debug, Clone)]
struct Difference {
    at: String,
    method: Method,
    path: Uri,
    outcome: Outcome,
    primary_status: Option<u16>,
    shadow_status: Option<u16>,
    primary_latency: Option<Duration>,
    shadow_latency: Option<Duration>,
    detail: String,
}

/// One side's answer as it was read. It is reduced for comparison ([`Reading::settle`])
/// in the copy's task, never on the primary's response path.
#[derive(Debug)]
pub struct Reading {
    status: StatusCode,
    latency: Duration,
    headers: HeaderMap,
    /// The body's digest, or why there is none.
    body: Result<Digest, &'static str>,
}

/// One side's answer, reduced to what is compared.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    latency: Duration,
    headers: Vec<(HeaderName, HeaderValue)>,
    shape: Shape,
}

impl Reading {
    async fn settle(self, spec: &MirrorSpec) -> Answer {
        let shape = match self.body {
            Err(why) => Shape::Unchecked(why),
            // Parsing a large JSON body takes milliseconds: not on a proxy worker.
            Ok(digest) if digest.is_heavy() => {
                let ignore = spec.ignore_json_fields.clone();
                tokio::task::spawn_blocking(move || digest.finish(&ignore))
                    .await
                    .unwrap_or(Shape::Unchecked("the body could not be read for comparison"))
            }
            Ok(digest) => digest.finish(&spec.ignore_json_fields),
        };
        Answer {
            status: self.status,
            latency: self.latency,
            headers: shape::compared_headers(&self.headers, &spec.ignore_headers),
            shape,
        }
    }
}

/// A route's mirror in one table snapshot.
#[derive(Debug)]
pub struct Mirror {
    spec: MirrorSpec,
    shadow: Arc<Backend>,
    /// The mirror's own idle connections, one pool per shadow server (in the order of
    /// `shadow.servers`), shared by every route that mirrors to it.
    pools: Box<[Arc<Pool>]>,
    connect_timeout: Duration,
    upstream_idle_timeout: Duration,
    pub state: Arc<MirrorState>,
}

/// Held by the hot path for a mirrored request with `compare`: tells the copy's task how
/// the primary answered.
#[derive(Debug)]
pub struct Primary {
    mirror: Arc<Mirror>,
    started: Instant,
    tx: oneshot::Sender<Reading>,
}

/// The primary's response body on its way to the client, read for comparison.
#[derive(Debug)]
pub struct PrimaryDigest {
    status: StatusCode,
    latency: Duration,
    headers: HeaderMap,
    digest: Digest,
    tx: oneshot::Sender<Reading>,
}

/// Releases an in-flight place when the copy's task ends, however it ends.
#[derive(Debug)]
struct Slot(Arc<Mirror>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.state.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where the copy's body comes from.
#[derive(Debug)]
enum CopyBody {
    Empty,
    Streaming(BodyCopy),
}

impl Mirror {
    pub fn new(
        spec: MirrorSpec,
        shadow: Arc<Backend>,
        pools: Box<[Arc<Pool>]>,
        state: Arc<MirrorState>,
        connect_timeout: Duration,
        upstream_idle_timeout: Duration,
    ) -> Mirror {
        Mirror { spec, shadow, pools, connect_timeout, upstream_idle_timeout, state }
    }

    pub fn spec(&self) -> &MirrorSpec {
        &self.spec
    }

    pub fn shadow_servers(&self) -> impl Iterator<Item = &Arc<crate::routes::Server>> {
        self.shadow.servers.iter()
    }

    /// Whether this request is in the sampled share. One random number, and none at 0 %.
    #[inline]
    pub fn sampled(&self) -> bool {
        self.spec.percent > 0 && (self.spec.percent >= ALL || fastrand::u32(0..ALL) < self.spec.percent)
    }

    fn note(&self, outcome: Outcome) {
        self.state.counts[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Starts the copy of a sampled request, whose head is `parts`, changed as `forward`
    /// says on its way (as the primary's is). Returns the body to send the primary (a
    /// [`Tee`] when there is a body to copy) and, with `compare`, the watch the primary's
    /// answer goes through. A request that cannot be mirrored is counted and goes on as it
    /// is.
    pub fn start(self: &Arc<Self>, parts: &Parts, forward: &Forward, body: Incoming) -> (RequestBody, Option<Primary>) {
        self.state.sampled.fetch_add(1, Ordering::Relaxed);
        let has_body = !body.is_end_stream();
        if has_body && body.size_hint().lower() > self.spec.max_body {
            self.note(Outcome::TooLarge);
            return (RequestBody::Client(body), None);
        }
        if !self.shadow.has_server_in_rotation() {
            self.note(Outcome::Dropped);
            return (RequestBody::Client(body), None);
        }
        if self.state.in_flight.fetch_add(1, Ordering::Relaxed) >= self.spec.max_in_flight {
            self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
            self.note(Outcome::Dropped);
            return (RequestBody::Client(body), None);
        }
        let slot = Slot(self.clone());

        let mut head = Request::new(());
        *head.method_mut() = parts.method.clone();
        *head.uri_mut() = parts.uri.clone();
        *head.headers_mut() = parts.headers.clone();
        let (head, ()) = head.into_parts();
        let forward = Forward { shadow_copy: true, ..forward.clone() };

        let (body, copy) = if has_body {
            let (tee, copy) = Tee::new(body, self.spec.max_body);
            (RequestBody::Mirrored(Box::new(tee)), CopyBody::Streaming(copy))
        } else {
            (RequestBody::Client(body), CopyBody::Empty)
        };
        let (primary, answer) = if self.spec.compare {
            let (tx, rx) = oneshot::channel();
            (Some(Primary { mirror: self.clone(), started: Instant::now(), tx }), Some(rx))
        } else {
            (None, None)
        };
        tokio::spawn(self.clone().copy(head, forward, copy, answer, slot));
        (body, primary)
    }

    /// The copy's whole life, off the hot path. Its in-flight place is given back when
    /// the task ends, after the outcome is counted, so a report never sees a copy that is
    /// neither in flight nor counted. With compare, the place is held until the pair is
    /// judged: that bounds what pairs in wait keep in memory, not only copies on the wire.
    async fn copy(
        self: Arc<Self>,
        head: Parts,
        forward: Forward,
        body: CopyBody,
        primary: Option<oneshot::Receiver<Reading>>,
        _slot: Slot,
    ) {
        let body = match body {
            CopyBody::Empty => RequestBody::Empty,
            CopyBody::Streaming(copy) => match copy.await {
                Ok(Ok(bytes)) => RequestBody::Whole(Some(bytes)),
                Ok(Err(TooLarge)) => return self.note(Outcome::TooLarge),
                Err(_) => return self.note(Outcome::Unfinished),
            },
        };
        let (method, uri) = (head.method.clone(), head.uri.clone());
        let shadow = match self.exchange(head, &forward, body).await {
            Ok(shadow) => shadow,
            Err(error) => {
                // Counted at once: the primary's answer (its receiver dropped here) would
                // change nothing, and waiting for it would hold a place for nothing.
                tracing::debug!(%method, %uri, %error, "mirrored copy failed");
                return self.differs(method, uri, Outcome::ShadowError, None, None, error);
            }
        };
        let Some(primary) = primary else { return self.note(Outcome::Sent) };
        let Ok(primary) = primary.await else { return self.note(Outcome::Unfinished) };
        let (primary, shadow) = (primary.settle(&self.spec).await, shadow.settle(&self.spec).await);
        let now = Instant::now();
        self.state.primary_latency.record(now, primary.latency, false);
        self.state.shadow_latency.record(now, shadow.latency, false);
        match judge(&primary, &shadow) {
            (Outcome::Match, _) => self.note(Outcome::Match),
            (outcome, detail) => {
                tracing::debug!(%method, %uri, result = outcome.label(), %detail, "mirrored copy differs");
                self.differs(method, uri, outcome, Some(&primary), Some(&shadow), detail);
            }
        }
    }

    /// Counts a copy that did not answer like the primary, and keeps it among the latest
    /// samples.
    fn differs(
        &self,
        method: Method,
        path: Uri,
        outcome: Outcome,
        primary: Option<&Answer>,
        shadow: Option<&Answer>,
        detail: String,
    ) {
        self.note(outcome);
        let difference = Difference {
            at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            method,
            path,
            outcome,
            primary_status: primary.map(|p| p.status.as_u16()),
            shadow_status: shadow.map(|s| s.status.as_u16()),
            primary_latency: primary.map(|p| p.latency),
            shadow_latency: shadow.map(|s| s.latency),
            detail,
        };
        let mut samples = self.state.differences.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() == SAMPLES {
            samples.pop_back();
        }
        samples.push_front(difference);
    }

    /// Sends the copy to a shadow server in rotation and reads its answer.
    async fn exchange(&self, mut head: Parts, forward: &Forward, mut body: RequestBody) -> Result<Reading, String> {
        // A random server in rotation: scan from a random start.
        let servers = &self.shadow.servers;
        let start = fastrand::usize(0..servers.len().max(1));
        let Some(index) = (0..servers.len()).map(|i| (start + i) % servers.len()).find(|&i| servers[i].in_rotation())
        else {
            return Err("no shadow server in rotation".into());
        };
        let (server, pool) = (&self.shadow.servers[index], &self.pools[index]);
        let timeout = self.spec.timeout;
        let connect_timeout = self.connect_timeout.min(timeout);
        let started = Instant::now();
        let mut pooled = pool.take(started, self.upstream_idle_timeout);
        let response = loop {
            let conn = match pooled.take() {
                Some(conn) => conn,
                None => upstream::connect(server.addr, connect_timeout).await.map_err(|e| e.to_string())?,
            };
            match tokio::time::timeout(
                timeout.saturating_sub(started.elapsed()),
                conn.send(&mut head, body, Some(forward), Some(pool)),
            )
            .await
            {
                Err(_) => return Err(format!("shadow {} sent no response head within {timeout:?}", server.label)),
                Ok(Ok(response)) => break response,
                // A pooled connection closed under us before an answer: a fresh one.
                Ok(Err(SendError { unsent: Some(unsent), .. })) => body = unsent,
                Ok(Err(SendError { error, .. })) => return Err(format!("shadow {} failed: {error}", server.label)),
            }
        };
        let (reading, reusable) = read_answer(response, started, &self.spec, timeout)
            .await
            .map_err(|e| format!("shadow {}: {e}", server.label))?;
        if let Some(conn) = reusable {
            pool.put(conn);
        }
        Ok(reading)
    }

    /// The few figures `status` shows of a route's mirror.
    pub fn summary(&self) -> Value {
        let count = |o| self.state.count(o);
        json!({
            "backend": self.spec.backend,
            "percent": f64::from(self.spec.percent) / 100.0,
            "compare": self.spec.compare,
            "sampled": self.state.sampled.load(Ordering::Relaxed),
            "differ": count(Outcome::StatusMismatch) + count(Outcome::BodyMismatch) + count(Outcome::HeaderMismatch),
            "shadow_errors": count(Outcome::ShadowError),
            "not_sent": count(Outcome::Dropped) + count(Outcome::TooLarge),
        })
    }

    /// `mirror-report`: the spec, the counts, both sides' latency and the latest
    /// differences.
    pub fn report(&self, route: &str, now: Instant) -> Value {
        let counts: serde_json::Map<String, Value> =
            Outcome::ALL.iter().map(|&o| (o.label().to_string(), self.state.count(o).into())).collect();
        let in_flight = self.state.in_flight.load(Ordering::Relaxed);
        let sampled = self.state.sampled.load(Ordering::Relaxed);
        let ms = |d: Option<Duration>| d.map(|d| (d.as_secs_f64() * 1e5).round() / 100.0);
        let samples = self.state.differences.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let differences: Vec<Value> = samples
            .iter()
            .map(|d| {
                json!({
                    "at": d.at,
                    "method": d.method.as_str(),
                    "path": d.path.to_string(),
                    "result": d.outcome.label(),
                    "primary_status": d.primary_status,
                    "shadow_status": d.shadow_status,
                    "primary_ms": ms(d.primary_latency),
                    "shadow_ms": ms(d.shadow_latency),
                    "detail": d.detail,
                })
            })
            .collect();
        let spec = &self.spec;
        json!({
            "ok": true,
            "route": route,
            "mirror": {
                "backend": spec.backend,
                "percent": f64::from(spec.percent) / 100.0,
                "compare": spec.compare,
                "max_body": spec.max_body,
                "max_in_flight": spec.max_in_flight,
                "timeout_ms": spec.timeout.as_millis() as u64,
                "ignore_headers": spec.ignore_headers.iter().map(HeaderName::as_str).collect::<Vec<_>>(),
                "ignore_json_fields": spec.ignore_json_fields,
            },
            "in_flight": in_flight,
            "sampled": sampled,
            "counts": counts,
            "latency": {
                "window_s": DEFAULT_WINDOW.as_secs(),
                "primary": self.state.primary_latency.summary(now).to_json(),
                "shadow": self.state.shadow_latency.summary(now).to_json(),
            },
            "differences": differences,
        })
    }
}

/// Reads the shadow's response to its end, or to `max_body` (digested for comparison when
/// `compare`), each frame within `timeout`; with the connection, when the body was read
/// whole and it can carry another request.
async fn read_answer(
    response: Response<upstream::ResponseBody>,
    started: Instant,
    spec: &MirrorSpec,
    timeout: Duration,
) -> Result<(Reading, Option<Box<Connection>>), String> {
    let latency = started.elapsed();
    let (parts, mut body) = response.into_parts();
    let mut digest = spec.compare.then(|| Digest::new(Kind::of(&parts.headers), spec.max_body));
    let mut read = 0u64;
    let whole = loop {
        match tokio::time::timeout(timeout, body.frame()).await {
            Err(_) => return Err(format!("no body data for {timeout:?}")),
            Ok(None) => break true,
            Ok(Some(Err(e))) => return Err(format!("body broke off: {e}")),
            Ok(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    read += data.len() as u64;
                    if let Some(digest) = &mut digest {
                        digest.feed(data);
                    }
                }
                if body.is_end_stream() {
                    break true;
                }
                // The primary's side stops reading there too.
                if read > spec.max_body {
                    break false;
                }
            }
        }
    };
    let reading = Reading { status: parts.status, latency, headers: parts.headers, body: digest.ok_or("not compared") };
    Ok((reading, if whole { body.take_reusable() } else { None }))
}

/// Whether a pair matches, and if not, the first difference: status, then body, then
/// headers.
fn judge(primary: &Answer, shadow: &Answer) -> (Outcome, String) {
    if primary.status != shadow.status {
        let detail =
            format!("status {} in the primary, {} in the shadow", primary.status.as_u16(), shadow.status.as_u16());
        return (Outcome::StatusMismatch, detail);
    }
    if let Some(detail) = shape::body_difference(&primary.shape, &shadow.shape) {
        return (Outcome::BodyMismatch, detail);
    }
    if let Some(detail) = shape::header_difference(&primary.headers, &shadow.headers) {
        return (Outcome::HeaderMismatch, detail);
    }
    (Outcome::Match, String::new())
}

impl Primary {
    /// The primary's response head has arrived: its body is read for comparison as it
    /// streams to the client (attach the result to the response body).
    pub fn answered<B>(self, response: &Response<B>) -> Box<PrimaryDigest> {
        Box::new(PrimaryDigest {
            status: response.status(),
            latency: self.started.elapsed(),
            headers: response.headers().clone(),
            digest: Digest::new(Kind::of(response.headers()), self.mirror.spec.max_body),
            tx: self.tx,
        })
    }

    /// The primary did not answer; switchyard did, with `status`.
    pub fn failed(self, status: StatusCode) {
        let reading = Reading {
            status,
            latency: self.started.elapsed(),
            headers: HeaderMap::new(),
            body: Err("an error answer from switchyard"),
        };
        let _ = self.tx.send(reading);
    }
}

impl PrimaryDigest {
    /// Reads the next piece of the body. `false` once nothing more is wanted: the copy was
    /// abandoned (the shadow failed), or `max_body` has been read (where the shadow's side
    /// stops too); the body should then call [`done`](Self::done) or drop the digest.
    #[inline]
    pub fn feed(&mut self, data: &[u8]) -> bool {
        if self.tx.is_closed() {
            return false;
        }
        self.digest.feed(data);
        !self.digest.over()
    }

    /// The primary's body ended whole (or was read as far as is compared): the pair can be
    /// judged.
    pub fn done(self) {
        let PrimaryDigest { status, latency, headers, digest, tx } = self;
        let _ = tx.send(Reading { status, latency, headers, body: Ok(digest) });
    }
}
