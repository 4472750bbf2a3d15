//! The route table: one immutable snapshot of all routing state, swapped whole.
//!
//! A request takes the snapshot once ([`TableReader::load`]) and finishes on it, however
//! long it runs. Only the holder of the [`TableWriter`] (the control path) can store a new
//! one. Everything a request needs to decide is precomputed here at build time; the hot
//! path only reads.
//!
//! Live per-server state (in-flight counts, health, the connection pool) is *not* part of
//! the snapshot's identity: [`Servers`] carries each [`Server`] from one table to the next
//! by (backend, address), so a reload never resets counters or drops pooled connections.

mod matcher;
mod split;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderName;
use tokio::sync::futures::{Notified, OwnedNotified};
use tokio::sync::Notify;

use crate::config::{BasisPoints, Config, Defaults, HostPattern, Outlier, Sticky};
use crate::metrics::Traffic;
use crate::mirror::{Mirror, MirrorState};
use crate::stats::Stats;
use crate::upstream::Pool;

/// The window backends outside any rollout are measured over (for `status`).
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);

pub use matcher::{host_matches, normalize_path, prefix_matches, strip_port, BadPath};
pub use split::{bucket, key_hash, rendezvous_score, Split};

/// One immutable routing snapshot.
#[derive(Debug)]
pub struct Table {
    pub generation: u64,
    /// Requests refused before a route was found (400, 404, 431), for `/metrics`.
    pub unrouted: Arc<Traffic>,
    /// Timeouts and limits, swapped with the routes so a request sees one consistent set.
    pub defaults: Defaults,
    pub routes: Box<[Route]>,
    pub backends: Box<[Arc<Backend>]>,
}

#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    hosts: Box<[HostPattern]>,
    path_prefix: Box<str>,
    pub split: Split,
    pub sticky: Option<Sticky>,
    pub override_header: Option<HeaderName>,
    /// Time allowed to the response head.
    pub request_timeout: Duration,
    /// Every backend the route may send to, including those at 0 %, for `override_header`.
    members: Box<[usize]>,
    /// Where a sampled share of the route's requests is copied to.
    pub mirror: Option<Arc<Mirror>>,
    /// Requests to each of `members`, in the same order, for `/metrics`.
    traffic: Box<[Arc<Traffic>]>,
    /// Requests of this route that found no backend in rotation (503).
    pub unbacked: Arc<Traffic>,
}

#[derive(Debug)]
pub struct Backend {
    pub name: Arc<str>,
    pub version: Option<Arc<str>>,
    pub outlier: Outlier,
    pub servers: Box<[Arc<Server>]>,
    /// Requests, failures and latency over the analysis window.
    pub stats: Arc<Stats>,
}

/// A server's live state, shared by every snapshot that names it.
#[derive(Debug)]
pub struct Server {
    pub addr: SocketAddr,
    /// `host:port`, as metrics and `status` show it.
    pub label: Arc<str>,
    /// Seeds rendezvous hashing; derived from the address so it is the same in every process.
    seed: u64,
    in_flight: AtomicU32,
    /// Upstream failures in a row, and ejections since the last success (the back-off's
    /// exponent).
    failures: AtomicU32,
    ejections: AtomicU32,
    /// Why the server is out of rotation, as bits ([`UNHEALTHY`], [`DISABLED`]); 0 means in
    /// rotation. One atomic, so the hot path decides with one load.
    out: AtomicU8,
    pub pool: Pool,
    /// Bumped when a drain's deadline passes; requests that began before it are cut over
    /// (replayed, ended at a boundary, or cut), and woken through `cut`.
    cut_epoch: AtomicU32,
    cut: Arc<Notify>,
    /// What the last drain deadline did to the requests it found.
    pub drained: DrainOutcomes,
    /// Its backend's measurements, for failures found after the response head (a
    /// response cut mid-body), where the request no longer holds the table.
    pub stats: arc_swap::ArcSwapOption<Stats>,
}

/// Counts of what a drain's deadline did to a server's requests, since the drain began.
#[derive(Debug, Default)]
pub struct DrainOutcomes {
    /// Idempotent requests still waiting for their response head, sent again elsewhere.
    pub replayed: AtomicU32,
    /// Streams ended cleanly: SSE at an event boundary, WebSockets with close code 1001.
    pub ended: AtomicU32,
    /// Everything else that was still running: cut off.
    pub cut: AtomicU32,
}

/// What a drain deadline did to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    Replayed,
    Ended,
    Cut,
}

impl DrainOutcomes {
    pub fn note(&self, outcome: DrainOutcome) {
        let counter = match outcome {
            DrainOutcome::Replayed => &self.replayed,
            DrainOutcome::Ended => &self.ended,
            DrainOutcome::Cut => &self.cut,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// (replayed, ended, cut)
    pub fn counts(&self) -> (u32, u32, u32) {
        (self.replayed.load(Ordering::Relaxed), self.ended.load(Ordering::Relaxed), self.cut.load(Ordering::Relaxed))
    }

    fn reset(&self) {
        for counter in [&self.replayed, &self.ended, &self.cut] {
            counter.store(0, Ordering::Relaxed);
        }
    }
}

/// The server failed its active health check (or has not passed it yet).
pub const UNHEALTHY: u8 = 1;
/// Taken out by hand.
pub const DISABLED: u8 = 2;
/// Ejected by passive outlier detection, for a back-off.
pub const EJECTED: u8 = 4;
/// Drained by the operator: no new requests, the ones in flight run on.
pub const DRAINING: u8 = 8;

impl Server {
    /// A server with a health check starts out of rotation until it has passed it.
    fn new(addr: SocketAddr, health_checked: bool) -> Self {
        let label: Arc<str> = addr.to_string().into();
        Server {
            addr,
            seed: key_hash(label.as_bytes()),
            label,
            in_flight: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            out: AtomicU8::new(if health_checked { UNHEALTHY } else { 0 }),
            pool: Pool::default(),
            cut_epoch: AtomicU32::new(0),
            cut: Arc::new(Notify::new()),
            drained: DrainOutcomes::default(),
            stats: arc_swap::ArcSwapOption::empty(),
        }
    }

    /// Requests sent to this server whose response has not yet ended.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether new requests may go to this server.
    #[inline]
    pub fn in_rotation(&self) -> bool {
        self.out.load(Ordering::Relaxed) == 0
    }

    pub fn healthy(&self) -> bool {
        self.out.load(Ordering::Relaxed) & UNHEALTHY == 0
    }

    /// Sets or clears one reason for being out of rotation. Leaving rotation closes the
    /// idle pooled connections: they would only go stale.
    pub fn set_out(&self, reason: u8, out: bool) {
        let before = if out {
            self.out.fetch_or(reason, Ordering::Relaxed)
        } else {
            self.out.fetch_and(!reason, Ordering::Relaxed)
        };
        if out && before == 0 {
            self.pool.clear();
        }
        if reason == DRAINING && out && before & DRAINING == 0 {
            self.drained.reset();
        }
    }

    /// A drain's deadline has passed: every request that began before now is cut over.
    /// Returns how many were in flight.
    pub fn cut_in_flight(&self) -> u32 {
        // Epoch first, then the wake-up: a request that registers between the two sees
        // the new epoch when it checks (see [`InFlight::cut_signal`]).
        self.cut_epoch.fetch_add(1, Ordering::Release);
        self.cut.notify_waiters();
        self.in_flight()
    }

    pub fn draining(&self) -> bool {
        self.out.load(Ordering::Relaxed) & DRAINING != 0
    }

    pub fn ejected(&self) -> bool {
        self.out.load(Ordering::Relaxed) & EJECTED != 0
    }

    /// Records a request's outcome for passive outlier detection. After `policy.failures`
    /// upstream failures in a row the server is ejected, unless it is the last one in
    /// rotation in its backend (`others_in_rotation` false): ejecting that would turn a
    /// degraded backend into a dead one. Returns the back-off when it ejected.
    #[inline]
    pub fn record_outcome(
        self: &Arc<Self>,
        failed: bool,
        policy: &Outlier,
        others_in_rotation: impl FnOnce() -> bool,
    ) -> Option<Duration> {
        if !failed {
            // Loads first: the common case writes nothing, so no cache line bounces.
            if self.failures.load(Ordering::Relaxed) != 0 {
                self.failures.store(0, Ordering::Relaxed);
            }
            if self.ejections.load(Ordering::Relaxed) != 0 {
                self.ejections.store(0, Ordering::Relaxed);
            }
            return None;
        }
        let in_a_row = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if policy.failures == 0 || in_a_row < policy.failures || self.ejected() || !others_in_rotation() {
            return None;
        }
        self.failures.store(0, Ordering::Relaxed);
        let n = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let backoff = policy.backoff.saturating_mul(1 << n).min(policy.max_backoff);
        self.set_out(EJECTED, true);
        let server = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(backoff).await;
            // Back in rotation, unless its health check (still probing) says otherwise.
            server.set_out(EJECTED, false);
            tracing::info!(server = %server.label, "ejection over: server back in rotation");
        });
        Some(backoff)
    }

    /// Takes the server out of rotation by hand, or returns it.
    pub fn set_in_rotation(&self, yes: bool) {
        self.set_out(DISABLED, !yes);
    }

    /// Counts a request against this server until the guard is dropped.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { server: self.clone(), epoch: self.cut_epoch.load(Ordering::Acquire) }
    }
}

/// A request in flight on a server; the count drops with the guard.
#[derive(Debug)]
pub struct InFlight {
    server: Arc<Server>,
    /// The server's cut epoch when the request began.
    epoch: u32,
}

impl InFlight {
    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    /// Whether a drain deadline has passed on this request's server since it began.
    #[inline]
    pub fn is_cut(&self) -> bool {
        self.server.cut_epoch.load(Ordering::Acquire) != self.epoch
    }

    /// Completes when a drain deadline passes on the server. Create it, then check
    /// [`is_cut`](Self::is_cut): a deadline between the two is seen by one or the other.
    pub fn cut_signal(&self) -> Notified<'_> {
        self.server.cut.notified()
    }

    /// [`cut_signal`](Self::cut_signal) for a future that must own what it waits on.
    pub fn owned_cut_signal(&self) -> OwnedNotified {
        self.server.cut.clone().notified_owned()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.server.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Table {
    /// The first route, in file order, whose host and path prefix match.
    #[inline]
    pub fn route(&self, host: &str, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| prefix_matches(&r.path_prefix, path) && host_matches(&r.hosts, host))
    }

    pub fn backend(&self, index: usize) -> &Arc<Backend> {
        &self.backends[index]
    }

    pub fn backend_index(&self, name: &str) -> Option<usize> {
        self.backends.iter().position(|b| &*b.name == name)
    }

    /// Builds a snapshot from a validated config. `servers` supplies the live state of
    /// servers that exist already and records the new ones.
    pub fn build(config: &Config, servers: &mut Servers, generation: u64) -> Table {
        let backends: Box<[Arc<Backend>]> = config
            .backends
            .iter()
            .map(|b| {
                let backend_servers: Vec<Arc<Server>> =
                    b.servers.iter().map(|&addr| servers.get_or_create(&b.name, addr, b.health.is_some())).collect();
                // Measured over the shortest analysis window of the rollouts it is in.
                let window = config
                    .routes
                    .iter()
                    .filter_map(|r| r.rollout.as_ref())
                    .filter(|ro| ro.stable == b.name || ro.canary == b.name)
                    .map(|ro| ro.analysis.window)
                    .min()
                    .unwrap_or(DEFAULT_WINDOW);
                Arc::new(Backend {
                    name: b.name.as_str().into(),
                    version: b.version.as_deref().map(Into::into),
                    outlier: b.outlier,
                    stats: {
                        let stats = servers.stats(&b.name, window);
                        for server in &backend_servers {
                            server.stats.store(Some(stats.clone()));
                        }
                        stats
                    },
                    servers: backend_servers.into(),
                })
            })
            .collect();
        let index = |name: &str| backends.iter().position(|b| &*b.name == name);
        let routes = config
            .routes
            .iter()
            .map(|r| {
                // Buckets are laid out in one canonical order, whatever order the split
                // was written or typed in: the rollout's canary first (its sticky cohort
                // then only grows as its weight rises), the others by name. A layout that
                // followed the input would move sticky keys whenever a split is re-typed.
                let mut named: Vec<&(String, BasisPoints)> = r.split.iter().collect();
                named.sort_by_key(|(name, _)| (r.rollout.as_ref().is_none_or(|ro| ro.canary != *name), name.as_str()));
                let shares: Vec<(usize, BasisPoints)> =
                    named.iter().filter_map(|(name, w)| Some((index(name)?, *w))).collect();
                let mut members: Vec<usize> = shares.iter().map(|&(b, _)| b).collect();
                if let Some(rollout) = &r.rollout {
                    members.extend([&rollout.stable, &rollout.canary].into_iter().filter_map(|n| index(n)));
                }
                members.sort_unstable();
                members.dedup();
                let mirror = r.mirror.as_ref().and_then(|spec| {
                    let shadow = backends[index(&spec.backend)?].clone();
                    let pools = shadow.servers.iter().map(|s| servers.mirror_pool(s.addr)).collect();
                    let state = servers.mirror_state(&r.name, &spec.backend);
                    let d = &config.defaults;
                    let mirror =
                        Mirror::new(spec.clone(), shadow, pools, state, d.connect_timeout, d.upstream_idle_timeout);
                    Some(Arc::new(mirror))
                });
                let traffic = members.iter().map(|&b| servers.traffic(&r.name, &backends[b].name)).collect();
                let unbacked = servers.traffic(&r.name, "");
                Route {
                    name: r.name.as_str().into(),
                    hosts: r.hosts.clone().into(),
                    path_prefix: r.path_prefix.as_str().into(),
                    split: Split::new(shares),
                    sticky: r.sticky.clone(),
                    override_header: r.override_header.clone(),
                    request_timeout: r.request_timeout,
                    members: members.into(),
                    mirror,
                    traffic,
                    unbacked,
                }
            })
            .collect();
        Table { generation, unrouted: servers.unrouted.clone(), defaults: config.defaults.clone(), routes, backends }
    }
}

impl Route {
    /// The backend for a request: the one named in the override header if it belongs to
    /// this route, else the split's choice for `bucket`. When the chosen backend has no
    /// server in rotation, its share goes to the others.
    #[inline]
    pub fn pick_backend<'t>(
        &self,
        table: &'t Table,
        bucket: u32,
        overridden: Option<&[u8]>,
    ) -> Option<&'t Arc<Backend>> {
        if let Some(name) = overridden {
            if let Some(&b) = self.members.iter().find(|&&b| table.backends[b].name.as_bytes() == name) {
                return Some(&table.backends[b]);
            }
        }
        let chosen = self.split.pick(bucket)?;
        if table.backends[chosen].has_server_in_rotation() {
            return Some(&table.backends[chosen]);
        }
        self.split.pick_usable(bucket, |b| table.backends[b].has_server_in_rotation()).map(|b| &table.backends[b])
    }

    /// Indexes of every backend this route may send to, including those at 0 %.
    pub fn members(&self) -> &[usize] {
        &self.members
    }

    /// The request counts of this route to `backend`, one of its members.
    #[inline]
    pub fn traffic(&self, table: &Table, backend: &Backend) -> &Traffic {
        self.members
            .iter()
            .position(|&b| std::ptr::eq(&*table.backends[b], backend))
            .map_or(&*self.unbacked, |i| &*self.traffic[i])
    }
}

impl Backend {
    pub fn has_server_in_rotation(&self) -> bool {
        self.servers.iter().any(|s| s.in_rotation())
    }

    /// A server in rotation for a request, other than `exclude`: for a sticky key the
    /// rendezvous winner (the same server for the same key while it stays in rotation),
    /// otherwise the less loaded of two picked at random.
    #[inline]
    pub fn pick_server(&self, sticky_hash: Option<u64>, exclude: Option<&Server>) -> Option<&Arc<Server>> {
        let usable = |s: &&Arc<Server>| s.in_rotation() && !exclude.is_some_and(|e| std::ptr::eq(e, &***s));
        if let Some(hash) = sticky_hash {
            return self.servers.iter().filter(usable).max_by_key(|s| rendezvous_score(hash, s.seed));
        }
        match self.servers.len() {
            0 => None,
            1 => self.servers.first().filter(usable),
            n => {
                let a = &self.servers[fastrand::usize(0..n)];
                let b = &self.servers[fastrand::usize(0..n)];
                match (usable(&a), usable(&b)) {
                    (true, true) => Some(if b.in_flight() < a.in_flight() { b } else { a }),
                    (true, false) => Some(a),
                    (false, true) => Some(b),
                    (false, false) => self.servers.iter().find(usable),
                }
            }
        }
    }
}

/// The live servers, by backend and address. Owned by the control path.
#[derive(Debug, Default)]
pub struct Servers {
    by_identity: HashMap<(String, SocketAddr), Arc<Server>>,
    /// Each backend's measurements, kept across swaps while its window stays the same.
    stats: HashMap<String, Arc<Stats>>,
    /// Each mirroring route's figures, by (route, shadow backend).
    mirrors: HashMap<(String, String), Arc<MirrorState>>,
    /// Mirroring's own idle connections, by shadow server.
    mirror_pools: HashMap<SocketAddr, Arc<Pool>>,
    /// Request counts since start, by (route, backend; "" for none found), and those refused
    /// before any route was found.
    traffic: HashMap<(String, String), Arc<Traffic>>,
    unrouted: Arc<Traffic>,
}

impl Servers {
    fn stats(&mut self, backend: &str, window: Duration) -> Arc<Stats> {
        let stats = self.stats.entry(backend.to_string()).or_insert_with(|| Arc::new(Stats::new(window)));
        if stats.window() != Stats::new_window(window) {
            *stats = Arc::new(Stats::new(window));
        }
        stats.clone()
    }

    /// Starts a backend's measurements afresh (a new version under analysis must not be
    /// judged by the old one's figures).
    pub fn reset_stats(&mut self, backend: &str) {
        self.stats.remove(backend);
    }

    fn mirror_state(&mut self, route: &str, shadow: &str) -> Arc<MirrorState> {
        self.mirrors.entry((route.to_string(), shadow.to_string())).or_default().clone()
    }

    fn traffic(&mut self, route: &str, backend: &str) -> Arc<Traffic> {
        self.traffic.entry((route.to_string(), backend.to_string())).or_default().clone()
    }

    /// Every route's request counts by backend ("" for none found), whether the backend is
    /// in the route's split today or was earlier; and those refused before any route.
    pub fn all_traffic(&self) -> (impl Iterator<Item = (&str, &str, &Traffic)>, &Traffic) {
        let pairs = self.traffic.iter().map(|((r, b), t)| (r.as_str(), b.as_str(), &**t));
        (pairs, &*self.unrouted)
    }

    fn mirror_pool(&mut self, addr: SocketAddr) -> Arc<Pool> {
        self.mirror_pools.entry(addr).or_default().clone()
    }

    fn get_or_create(&mut self, backend: &str, addr: SocketAddr, health_checked: bool) -> Arc<Server> {
        self.by_identity
            .entry((backend.to_string(), addr))
            .or_insert_with(|| Arc::new(Server::new(addr, health_checked)))
            .clone()
    }

    /// Forgets servers no longer in `table`; requests still running on them keep their own
    /// reference until they end.
    pub fn retain_in(&mut self, table: &Table) {
        self.by_identity.retain(|(backend, addr), _| {
            table.backends.iter().any(|b| &*b.name == backend && b.servers.iter().any(|s| s.addr == *addr))
        });
        self.stats.retain(|backend, _| table.backends.iter().any(|b| &*b.name == backend));
        // A backend that leaves a route's split keeps its counts: counters must not go back
        // to zero if it returns.
        self.traffic.retain(|(route, backend), _| {
            table.routes.iter().any(|r| &*r.name == route)
                && (backend.is_empty() || table.backends.iter().any(|b| &*b.name == backend))
        });
        let mirrors = || table.routes.iter().filter_map(|r| Some((r, r.mirror.as_ref()?)));
        self.mirrors
            .retain(|(route, shadow), _| mirrors().any(|(r, m)| &*r.name == route && m.spec().backend == *shadow));
        self.mirror_pools.retain(|addr, _| mirrors().any(|(_, m)| m.shadow_servers().any(|s| s.addr == *addr)));
    }
}

/// The hot path's handle on the table: it can read, never store.
#[derive(Debug, Clone)]
pub struct TableReader(Arc<ArcSwap<Table>>);

impl TableReader {
    /// The current snapshot, owned: safe to keep across `.await` for as long as the
    /// request runs.
    #[inline]
    pub fn load(&self) -> Arc<Table> {
        self.0.load_full()
    }
}

/// The single writer of the table.
#[derive(Debug)]
pub struct TableWriter(Arc<ArcSwap<Table>>);

impl TableWriter {
    pub fn new(table: Table) -> Self {
        TableWriter(Arc::new(ArcSwap::from_pointee(table)))
    }

    pub fn reader(&self) -> TableReader {
        TableReader(self.0.clone())
    }

    pub fn store(&self, table: Table) {
        self.0.store(Arc::new(table));
    }

    pub fn current(&self) -> Arc<Table> {
        self.0.load_full()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> Table {
        let config = crate::config::parse(text, "test").expect("valid config").config;
        Table::build(&config, &mut Servers::default(), 1)
    }

    const CONFIG: &str = r#"
[backends.blue]
servers = ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]
[backends.green]
servers = ["127.0.0.1:9101"]

[[routes]]
name = "api"
hosts = ["api.example.com"]
path_prefix = "/v1"
split = { green = 100 }

[[routes]]
name = "agent"
split = { blue = 90, green = 10 }
override_header = "x-switchyard-backend"
[routes.rollout]
strategy = "canary"
stable = "blue"
canary = "green"
steps = [{ weight = 10, hold = "1m" }, { weight = 100 }]
"#;

    #[test]
    fn routes_match_in_file_order() {
        let t = table(CONFIG);
        assert_eq!(&*t.route("api.example.com", "/v1/chat").expect("route").name, "api");
        assert_eq!(&*t.route("api.example.com", "/v2").expect("route").name, "agent");
        assert_eq!(&*t.route("other", "/v1").expect("route").name, "agent");
    }

    #[test]
    fn the_canary_owns_the_lowest_buckets() {
        let t = table(CONFIG);
        let route = t.route("x", "/").expect("route");
        assert_eq!(&*route.pick_backend(&t, 0, None).expect("backend").name, "green");
        assert_eq!(&*route.pick_backend(&t, 999, None).expect("backend").name, "green");
        assert_eq!(&*route.pick_backend(&t, 1000, None).expect("backend").name, "blue");
    }

    #[test]
    fn the_override_header_reaches_members_only() {
        let t = table(CONFIG);
        let agent = t.route("x", "/").expect("route");
        assert_eq!(&*agent.pick_backend(&t, 5000, Some(b"green")).expect("backend").name, "green");
        assert_eq!(&*agent.pick_backend(&t, 5000, Some(b"nope")).expect("backend").name, "blue");
    }

    #[test]
    fn a_backend_out_of_rotation_gives_its_share_away() {
        let t = table(CONFIG);
        let agent = t.route("x", "/").expect("route");
        for s in t.backends[t.backend_index("green").expect("green")].servers.iter() {
            s.set_in_rotation(false);
        }
        assert_eq!(&*agent.pick_backend(&t, 0, None).expect("backend").name, "blue");
    }

    #[test]
    fn sticky_keys_keep_their_server_and_only_move_when_it_leaves() {
        let t = table(CONFIG);
        let blue = &t.backends[t.backend_index("blue").expect("blue")];
        let keys: Vec<u64> = (0..300).map(|i| key_hash(format!("k{i}").as_bytes())).collect();
        let before: Vec<SocketAddr> =
            keys.iter().map(|&k| blue.pick_server(Some(k), None).expect("server").addr).collect();
        let again: Vec<SocketAddr> =
            keys.iter().map(|&k| blue.pick_server(Some(k), None).expect("server").addr).collect();
        assert_eq!(before, again);
        assert!(blue.servers.iter().all(|s| before.contains(&s.addr)), "every server gets keys");
        blue.servers[0].set_in_rotation(false);
        for (&k, &was) in keys.iter().zip(&before) {
            let now = blue.pick_server(Some(k), None).expect("server").addr;
            assert_ne!(now, blue.servers[0].addr);
            if was != blue.servers[0].addr {
                assert_eq!(now, was, "a key moved though its server stayed");
            }
        }
    }

    #[tokio::test]
    async fn ejection_back_off_doubles_up_to_the_cap_and_resets_on_success() {
        let server = Arc::new(Server::new("127.0.0.1:1".parse().expect("addr"), false));
        let policy = Outlier { failures: 2, backoff: Duration::from_secs(1), max_backoff: Duration::from_secs(3) };
        let eject = || {
            assert_eq!(server.record_outcome(true, &policy, || true), None, "one failure is not a row");
            let backoff = server.record_outcome(true, &policy, || true);
            assert!(!server.in_rotation());
            server.set_out(EJECTED, false);
            backoff
        };
        assert_eq!(eject(), Some(Duration::from_secs(1)));
        assert_eq!(eject(), Some(Duration::from_secs(2)));
        assert_eq!(eject(), Some(Duration::from_secs(3)), "capped");
        server.record_outcome(false, &policy, || true);
        assert_eq!(eject(), Some(Duration::from_secs(1)), "a success starts over");
        server.record_outcome(true, &policy, || false);
        assert_eq!(server.record_outcome(true, &policy, || false), None, "never the last server in rotation");
        assert!(server.in_rotation());
    }

    #[test]
    fn live_state_carries_over_a_rebuild() {
        let config = crate::config::parse(CONFIG, "test").expect("valid").config;
        let mut servers = Servers::default();
        let first = Table::build(&config, &mut servers, 1);
        let _guard = first.backends[0].servers[0].start_request();
        let second = Table::build(&config, &mut servers, 2);
        assert_eq!(second.backends[0].servers[0].in_flight(), 1);
        assert!(Arc::ptr_eq(&first.backends[0].servers[0], &second.backends[0].servers[0]));
    }
}
