//! The control path: the single writer of the route table.
//!
//! ```text
//! config file (notify) ─┐
//! SIGHUP ───────────────┼─► Command channel ─► Control::apply → build Table → store
//! admin socket ─────────┘                        → persist state → record event → answer
//! ```
//!
//! Every change goes through [`Control::apply`], one at a time, so changes never race.
//! `apply` is plain data in and out (a [`Command`] and an [`Actor`] in, a JSON answer out),
//! which tests drive without sockets. A command that changes anything answers only once
//! the new table is stored, with its generation: the next request sees it.

pub mod events;
pub mod state;
pub mod watch;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};

use crate::config::{self, BasisPoints, Config, Listen, RolloutSpec, ALL};
use crate::rollout::{self, Change, Observed, Phase};
use crate::routes::{Servers, Table, TableReader, TableWriter};
pub use events::{Actor, Event, EventLog};
use state::{Loaded, Shares, State, StateFile};

/// Everything that can be asked of the control path: the one vocabulary of the admin
/// socket, the config watcher, signals and (later) the rollout engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Status {
        route: Option<String>,
    },
    SetWeights {
        route: String,
        split: Shares,
    },
    Rollback {
        route: String,
        reason: Option<String>,
    },
    Reload,
    Events {
        last: usize,
    },
    /// Takes a backend (by name) or one server (`host:port`) out of rotation; requests in
    /// flight run on, until `deadline` if one is given: then they are replayed elsewhere,
    /// ended at a clean boundary, or cut.
    Drain {
        target: String,
        deadline: Option<Duration>,
    },
    /// A drain's deadline has passed (sent by the drain's own timer).
    DrainDeadline {
        target: String,
        serial: u64,
    },
    Undrain {
        target: String,
    },
    /// Rollout routes: skip the current hold (at the last step, finish the rollout).
    Promote {
        route: String,
    },
    /// Rollout routes: freeze the step timer; analysis stays on.
    Pause {
        route: String,
    },
    /// Rollout routes: unfreeze a paused rollout, or retry a rolled-back one.
    Resume {
        route: String,
    },
    /// The rollout engine's clock (sent by its own timer).
    Tick,
    /// What a route's mirror has seen: counts of matches and differences, both sides'
    /// latency, the latest differing requests.
    MirrorReport {
        route: String,
    },
    /// Everything `/metrics` shows, in the Prometheus text format; the proxy's count of open
    /// client connections comes with the request.
    Metrics {
        connections_open: usize,
    },
    /// Writes the state file now if a change is waiting to be written (sent by the
    /// persistence timer, and by shutdown).
    Flush,
    /// The in-flight count of a drain target's servers and what its deadline did to them
    /// (for `drain --wait`).
    DrainProgress {
        target: String,
    },
}

/// Binds and closes the proxy's listeners when the config's addresses change. Provided by
/// the composition root, so that this module needs nothing of the proxy.
pub trait Listeners: Send {
    /// Makes the listeners match `listen`: binds new addresses first, then closes those no
    /// longer wanted. An error leaves the old listeners as they were.
    fn update(&mut self, listen: &Listen) -> Result<(), String>;
}

type Request = (Command, Actor, oneshot::Sender<Value>);

/// A way to send commands to the running control task.
#[derive(Debug, Clone)]
pub struct Handle {
    tx: mpsc::Sender<Request>,
}

impl Handle {
    /// Sends a command and waits for its answer (`{"ok":...}`).
    pub async fn send(&self, command: Command, actor: Actor) -> Value {
        let (reply, answer) = oneshot::channel();
        if self.tx.send((command, actor, reply)).await.is_err() {
            return failure("switchyard is shutting down");
        }
        answer.await.unwrap_or_else(|_| failure("switchyard is shutting down"))
    }
}

/// The single writer.
pub struct Control {
    config_path: Option<PathBuf>,
    /// The config as the file says it.
    base: Config,
    state: State,
    state_file: StateFile,
    events: EventLog,
    servers: Servers,
    table: TableWriter,
    generation: u64,
    /// None until [`spawn`](Self::spawn): then listen changes take effect.
    listeners: Option<Box<dyn Listeners>>,
    last_reload_error: Option<String>,
    reloads: Reloads,
    health: crate::health::HealthChecks,
    /// For timers that report back (drain deadlines); weak, so that the loop still ends
    /// when the last real [`Handle`] goes.
    own: Option<mpsc::WeakSender<Request>>,
    /// The drain deadline armed for each target, by serial: an undrain or a new drain
    /// disarms the old timer.
    deadlines: HashMap<String, u64>,
    drain_serial: u64,
    /// The rollout engine's last tick, and the last time its progress was saved.
    last_tick: Option<tokio::time::Instant>,
    last_saved: Option<tokio::time::Instant>,
    /// When a `set-weights` was last written, and whether one waits for the next write.
    last_persist: Option<tokio::time::Instant>,
    persist_pending: bool,
    /// Rollbacks since start, by route and reason (`switchyard_rollbacks_total`).
    rollbacks: BTreeMap<(String, &'static str), u64>,
}

/// How often the rollout engine looks at its routes (holds, analysis).
const TICK: Duration = Duration::from_millis(250);
/// Writing the state file takes an fsync of the file and one of its directory: about half a
/// millisecond of the proxy's CPU here. Every change is written before it is answered,
/// except `set-weights`, the one command a program may send many times a second: one after
/// a quiet interval is written before it is answered, and those closer together than this
/// (a script, a controller shifting weights every 10 ms) are written together at the end of
/// the interval, so a crash loses at most this much of such a burst. At 100 ms apart, those
/// writes alone cost 0.5 % of the core the proxy serves on under a `set-weights` every
/// 10 ms (`benches/live.sh`).
const PERSIST_INTERVAL: Duration = Duration::from_secs(1);
/// How often a running rollout's hold time is saved, so that a restart resumes it.
const SAVE_PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Reloads counted since start.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Reloads {
    pub ok: u64,
    pub refused: u64,
}

impl Control {
    /// Builds the first table from `base` and the persisted state in its `state_dir`.
    pub fn new(base: Config, config_path: Option<PathBuf>) -> Control {
        let state_file = StateFile::new(&base.admin.state_dir);
        let mut events = EventLog::open(&base.admin.state_dir);
        let state = match state_file.load() {
            Loaded::Fresh => State::default(),
            Loaded::Restored(state) => state,
            Loaded::Corrupt { reason, moved_to } => {
                tracing::warn!(path = %state_file.path().display(), %reason, moved_to = %moved_to.display(), "state file unusable; moved aside, using the config's state");
                events.record(Event::new(&Actor::Switchyard, "state-reset", 1).reason(format!(
                    "{} {reason}; moved to {}",
                    state_file.path().display(),
                    moved_to.display()
                )));
                State::default()
            }
        };
        let mut servers = Servers::default();
        let mut control = Control {
            config_path,
            state,
            state_file,
            events,
            table: TableWriter::new(Table::build(&base, &mut servers, 1)),
            base,
            servers,
            generation: 1,
            listeners: None,
            last_reload_error: None,
            reloads: Reloads::default(),
            health: Default::default(),
            own: None,
            deadlines: HashMap::new(),
            drain_serial: 0,
            last_tick: None,
            last_saved: None,
            last_persist: None,
            persist_pending: false,
            rollbacks: BTreeMap::new(),
        };
        control.reconcile();
        control.reconcile_rollouts(&Actor::Switchyard, &BTreeMap::new());
        control.drop_invalid_state();
        let restored: Vec<String> =
            control.state.routes.iter().filter(|(_, r)| r.split.is_some()).map(|(n, _)| n.clone()).collect();
        if !restored.is_empty() {
            tracing::info!(routes = ?restored, "restored live splits from the state file");
        }
        control.swap();
        control
    }

    /// The hot path's read-only handle.
    pub fn reader(&self) -> TableReader {
        self.table.reader()
    }

    /// Runs the control loop until every [`Handle`] is dropped; from then on `listeners`
    /// follow the config's addresses.
    ///
    /// The loop has an OS thread of its own: it writes and fsyncs the state file before
    /// answering a change (an operator's answered rollback survives a crash; see
    /// [`PERSIST_INTERVAL`] for `set-weights`), and those milliseconds of disk wait must
    /// never stall a worker that is proxying requests.
    pub fn spawn(mut self, listeners: Box<dyn Listeners>) -> Handle {
        self.listeners = Some(listeners);
        self.health.sync(&self.base, &self.table.current());
        let (tx, mut rx) = mpsc::channel::<Request>(64);
        self.own = Some(tx.downgrade());
        let ticks = tx.downgrade();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(TICK);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(tx) = ticks.upgrade() else { return };
                let (reply, answer) = oneshot::channel();
                if tx.send((Command::Tick, Actor::Rollout, reply)).await.is_err() {
                    return;
                }
                drop(tx);
                let _ = answer.await;
            }
        });
        // Listener changes spawn accept loops onto the proxy's runtime.
        let runtime = tokio::runtime::Handle::current();
        let spawned = std::thread::Builder::new().name("switchyard-control".into()).spawn(move || {
            let _runtime = runtime.enter();
            while let Some((command, actor, reply)) = rx.blocking_recv() {
                let answer = self.apply(command, actor);
                let _ = reply.send(answer);
            }
        });
        if let Err(e) = spawned {
            // Without its thread the control path cannot run; every command says so.
            tracing::error!(error = %e, "cannot start the control thread");
        }
        Handle { tx }
    }

    /// Carries out one command. Never panics on bad input: a refusal is an answer.
    pub fn apply(&mut self, command: Command, actor: Actor) -> Value {
        match command {
            Command::Status { route } => self.status(route.as_deref()),
            Command::Events { last } => json!({ "ok": true, "events": self.events.last(last) }),
            Command::SetWeights { route, split } => self.set_weights(&route, split, &actor),
            Command::Rollback { route, reason } => self.rollback(&route, reason, &actor),
            Command::Reload => self.reload(&actor),
            Command::Drain { target, deadline } => self.drain(&target, Some(deadline), &actor),
            Command::Undrain { target } => self.drain(&target, None, &actor),
            Command::DrainDeadline { target, serial } => self.drain_deadline(&target, serial),
            Command::Promote { route } => self.rollout_command(&route, "promote", &actor),
            Command::Pause { route } => self.rollout_command(&route, "pause", &actor),
            Command::Resume { route } => self.rollout_command(&route, "resume", &actor),
            Command::Tick => self.tick(),
            Command::Metrics { connections_open } => json!({ "ok": true, "text": self.metrics(connections_open) }),
            Command::Flush => {
                if self.persist_pending {
                    self.last_persist = Some(tokio::time::Instant::now());
                    self.write_state();
                }
                json!({ "ok": true })
            }
            Command::MirrorReport { route } => self.mirror_report(&route),
            Command::DrainProgress { target } => match self.drain_servers(&target) {
                Ok(servers) => drain_progress(&target, &servers),
                Err(e) => failure(&e),
            },
        }
    }

    /// The config in force: the file's, with the live splits and rollouts applied.
    fn effective(&self) -> Config {
        let mut config = self.base.clone();
        for route in &mut config.routes {
            if let Some(split) = self.split_override(&route.name) {
                route.split = split;
            }
        }
        config
    }

    /// The split in force on a route when it is not the file's: a rollout's, or a live one.
    fn split_override(&self, route: &str) -> Option<Shares> {
        let state = self.state.routes.get(route)?;
        let spec = self.base.routes.iter().find(|r| r.name == route)?;
        match (&spec.rollout, &state.rollout) {
            (Some(spec), Some(progress)) => Some(progress.split(spec)),
            _ => state.split.clone(),
        }
    }

    fn split_of(&self, route: &str) -> Option<Shares> {
        let file = &self.base.routes.iter().find(|r| r.name == route)?.split;
        Some(self.split_override(route).unwrap_or_else(|| file.clone()))
    }

    /// Drops live splits the file has overtaken: the route or a backend is gone, or the
    /// file's split for the route was edited since the override was made.
    fn reconcile(&mut self) {
        let base = &self.base;
        let mut ignored = Vec::new();
        self.state.routes.retain(|name, route| {
            let Some(spec) = base.routes.iter().find(|r| &r.name == name) else { return false };
            let edited = route.file_split.as_ref().is_some_and(|f| *f != spec.split);
            let unknown = route.split.iter().flatten().find(|(b, _)| base.backend(b).is_none());
            if let Some((backend, _)) = unknown {
                ignored.push((
                    name.clone(),
                    format!("split: no backend named {backend:?}; the config file's split applies"),
                ));
            }
            if edited || unknown.is_some() {
                tracing::info!(route = %name, "the config file's split replaces the live split");
                route.split = None;
                route.file_split = None;
            }
            if route.previous.as_ref().is_some_and(|p| p.iter().any(|(b, _)| base.backend(b).is_none())) {
                route.previous = None;
            }
            route.split.is_some() || route.previous.is_some() || route.rollout.is_some()
        });
        for (route, reason) in ignored {
            tracing::warn!(%route, %reason, "ignoring a live split");
            self.events
                .record(Event::new(&Actor::Switchyard, "state-ignored", self.generation).route(&route).reason(reason));
        }
    }

    /// Starts a rollout for every rollout route whose canary identity is new (and forgets
    /// those of routes that no longer have one). A known identity keeps its progress: a
    /// rolled-back canary is not retried by a restart or an unrelated reload. `before` has
    /// the routes' splits before a reload, for a step list the reload cut.
    fn reconcile_rollouts(&mut self, actor: &Actor, before: &BTreeMap<String, Shares>) {
        let specs: Vec<(String, RolloutSpec)> =
            self.base.routes.iter().filter_map(|r| Some((r.name.clone(), r.rollout.clone()?))).collect();
        let with_rollout: Vec<&String> = specs.iter().map(|(n, _)| n).collect();
        for (name, route) in self.state.routes.iter_mut() {
            if !with_rollout.contains(&name) {
                route.rollout = None;
            }
        }
        for (name, spec) in &specs {
            let identity = rollout::identity(&self.base, spec);
            let entry = self.state.routes.entry(name.clone()).or_default();
            if let Some(progress) = entry.rollout.as_mut().filter(|p| p.identity == identity) {
                let weight = before.get(name).map(|split| weight_of(split, &spec.canary));
                if progress.fit_steps(spec, weight) {
                    let step = progress.step;
                    tracing::warn!(route = %name, step = step + 1, "the rollout's steps were cut below its step; it goes on from the step that does not raise the canary's weight");
                    self.events.record(Event::new(actor, "rollout-step", self.generation).route(name).reason(format!(
                        "the steps were changed: now at step {} of {}",
                        step + 1,
                        spec.steps.len()
                    )));
                }
                continue;
            }
            entry.rollout = Some(rollout::Progress::new(identity.clone()));
            // The new version is judged by its own figures only.
            self.servers.reset_stats(&spec.canary);
            self.undrain_for_rollout(name, &spec.canary, actor, "a new rollout starts on it");
            tracing::info!(route = %name, canary = %identity, "rollout starts: Pending until the canary is healthy");
            self.events.record(
                Event::new(actor, "rollout-start", self.generation)
                    .route(name)
                    .change(Value::Null, json!(identity))
                    .reason(format!("new canary {identity}; stable {}", spec.stable)),
            );
        }
    }

    /// A restored split is used only if it would be accepted from the socket today.
    fn drop_invalid_state(&mut self) {
        let names: Vec<String> = self.state.routes.keys().cloned().collect();
        for name in names {
            let Some(route) = self.state.routes.get(&name).cloned() else { continue };
            for (what, split) in [("split", &route.split), ("previous", &route.previous)] {
                if let Some(Err(e)) = split.as_ref().map(|s| self.check_split(&name, s)) {
                    tracing::warn!(route = %name, %e, "ignoring an invalid {what} from the state file");
                    self.events.record(
                        Event::new(&Actor::Switchyard, "state-ignored", self.generation)
                            .route(&name)
                            .reason(format!("{what}: {e}")),
                    );
                    let entry = self.state.routes.entry(name.clone()).or_default();
                    match what {
                        "split" => {
                            entry.split = None;
                            entry.file_split = None;
                        }
                        _ => entry.previous = None,
                    }
                }
            }
        }
    }

    /// The live servers a drain target names: every server of a backend, or every server
    /// with that address (in whichever backends list it).
    fn drain_servers(&self, target: &str) -> Result<Vec<std::sync::Arc<crate::routes::Server>>, String> {
        let table = self.table.current();
        let servers: Vec<_> = match table.backend_index(target) {
            Some(b) => table.backend(b).servers.to_vec(),
            None => {
                table.backends.iter().flat_map(|b| b.servers.iter()).filter(|s| &*s.label == target).cloned().collect()
            }
        };
        if servers.is_empty() {
            return Err(format!("{target:?} is neither a backend nor a server (host:port) of the running config"));
        }
        Ok(servers)
    }

    /// For a server (host:port) every backend of which is drained as a whole: those
    /// backends' names (an undrain of the server alone would return it nowhere).
    fn drained_with_its_backend(&self, target: &str) -> Option<String> {
        let table = self.table.current();
        if table.backend_index(target).is_some() {
            return None;
        }
        let holding: Vec<&str> =
            table.backends.iter().filter(|b| b.servers.iter().any(|s| &*s.label == target)).map(|b| &*b.name).collect();
        let all_drained = !holding.is_empty() && holding.iter().all(|b| self.state.drained.contains(*b));
        all_drained.then(|| holding.join(", "))
    }

    /// Returns a whole backend to rotation because a rollout sends it traffic: the stable
    /// side on a rollback (a blue-green cleanup drained it), the canary of a new rollout
    /// (it may be the side the last blue-green rollout drained). Recorded as an undrain.
    fn undrain_for_rollout(&mut self, route: &str, backend: &str, actor: &Actor, why: &str) {
        if !self.state.drained.remove(backend) {
            return;
        }
        self.deadlines.remove(backend);
        self.apply_drains();
        tracing::info!(%route, %backend, why, "backend back in rotation");
        self.events.record(
            Event::new(actor, "undrain", self.generation)
                .route(route)
                .change(json!(true), json!(false))
                .reason(format!("{backend}: {why}")),
        );
    }

    /// Drains `target` (`Some(deadline)`) or returns it to rotation (`None`).
    fn drain(&mut self, target: &str, drain: Option<Option<Duration>>, actor: &Actor) -> Value {
        let servers = match self.drain_servers(target) {
            Ok(s) => s,
            Err(e) => return failure(&e),
        };
        if drain.is_none() {
            if let Some(backend) = self.drained_with_its_backend(target) {
                return failure(&format!(
                    "{target} would stay out of rotation: its backend {backend:?} is drained as a whole; undrain {backend} first"
                ));
            }
        }
        let changed = match drain {
            Some(_) => self.state.drained.insert(target.to_string()),
            None => self.state.drained.remove(target),
        };
        self.apply_drains();
        // Whatever deadline was armed for the target no longer applies.
        self.deadlines.remove(target);
        let deadline = drain.flatten();
        if let Some(after) = deadline {
            self.arm_deadline(target, after);
        }
        let in_flight: u32 = servers.iter().map(|s| s.in_flight()).sum();
        let action = if drain.is_some() { "drain" } else { "undrain" };
        let was_drained = if drain.is_some() { !changed } else { changed };
        if changed || deadline.is_some() {
            self.write_state();
            let mut reason = format!("{target}: {in_flight} in flight");
            if let Some(after) = deadline {
                reason.push_str(&format!(", deadline {}", humantime::format_duration(after)));
            }
            self.events.record(
                Event::new(actor, action, self.generation)
                    .change(json!(was_drained), json!(drain.is_some()))
                    .reason(reason),
            );
        }
        let mut answer = drain_progress(target, &servers);
        answer["generation"] = self.generation.into();
        answer["draining"] = drain.is_some().into();
        if let Some(after) = deadline {
            answer["deadline_ms"] = (after.as_millis() as u64).into();
        }
        answer
    }

    /// Starts the timer of a drain's deadline; it reports back as [`Command::DrainDeadline`].
    fn arm_deadline(&mut self, target: &str, after: Duration) {
        let Some(own) = self.own.clone() else {
            tracing::warn!(%target, "drain deadline ignored: the control loop is not running");
            return;
        };
        self.drain_serial += 1;
        let serial = self.drain_serial;
        self.deadlines.insert(target.to_string(), serial);
        let target = target.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let Some(tx) = own.upgrade() else { return };
            let (reply, _) = oneshot::channel();
            let _ = tx.send((Command::DrainDeadline { target, serial }, Actor::Switchyard, reply)).await;
        });
    }

    /// A drain's deadline passed: what still runs on its servers is cut over.
    fn drain_deadline(&mut self, target: &str, serial: u64) -> Value {
        if self.deadlines.get(target) != Some(&serial) {
            // Undrained, or drained again with another deadline, since it was armed.
            return json!({ "ok": true, "target": target, "disarmed": true });
        }
        self.deadlines.remove(target);
        let servers = match self.drain_servers(target) {
            Ok(s) => s,
            Err(e) => return failure(&e),
        };
        let in_flight: u32 = servers.iter().filter(|s| s.draining()).map(|s| s.cut_in_flight()).sum();
        tracing::info!(%target, in_flight, "drain deadline passed: replaying, ending and cutting what is still in flight");
        self.events.record(Event::new(&Actor::Switchyard, "drain-deadline", self.generation).reason(format!(
            "{target}: {in_flight} in flight at the deadline: idempotent requests waiting for a response are replayed, event streams end between events, WebSockets get close 1001, the rest is cut"
        )));
        json!({ "ok": true, "target": target, "in_flight": in_flight })
    }

    /// Sets every live server's drain bit from the state: after a drain, and after every
    /// swap (a reload may bring back a drained server).
    fn apply_drains(&self) {
        let table = self.table.current();
        for backend in table.backends.iter() {
            let whole = self.state.drained.contains(&*backend.name);
            for server in backend.servers.iter() {
                server.set_out(crate::routes::DRAINING, whole || self.state.drained.contains(&*server.label));
            }
        }
    }

    fn rollout_spec(&self, route: &str) -> Option<&RolloutSpec> {
        self.base.routes.iter().find(|r| r.name == route)?.rollout.as_ref()
    }

    /// `promote`, `pause`, `resume` on a rollout route.
    fn rollout_command(&mut self, route: &str, verb: &str, actor: &Actor) -> Value {
        self.change_rollout(route, actor, |progress, spec| match verb {
            "promote" => progress.promote(spec),
            "pause" => progress.pause().map(|()| Change::Paused),
            _ => progress.resume().map(|()| Change::Resumed),
        })
    }

    /// Applies a change to a route's rollout, then carries it out: the split, the state
    /// file, the event. Answers with the rollout as it now stands.
    fn change_rollout(
        &mut self,
        route: &str,
        actor: &Actor,
        change: impl FnOnce(&mut rollout::Progress, &RolloutSpec) -> Result<Change, String>,
    ) -> Value {
        let Some(spec) = self.rollout_spec(route).cloned() else {
            return failure(&format!("route {route:?} has no rollout (see [routes.rollout] in the config)"));
        };
        let Some(progress) = self.state.routes.get_mut(route).and_then(|r| r.rollout.as_mut()) else {
            return failure(&format!("route {route:?} has no rollout state"));
        };
        let before = progress.split(&spec);
        match change(progress, &spec) {
            Ok(done) => {
                let generation = self.carry_out(route, &spec, &before, &done, actor);
                let mut answer = self.rollout_json(route, &spec);
                answer["ok"] = true.into();
                answer["generation"] = generation.into();
                answer["route"] = route.into();
                answer
            }
            Err(e) => failure(&format!("route {route:?}: {e}")),
        }
    }

    /// Carries out what the rollout engine decided: swaps the split if it moved, saves the
    /// progress, records the event (with both sides' figures). Returns the generation.
    fn carry_out(&mut self, route: &str, spec: &RolloutSpec, before: &Shares, change: &Change, actor: &Actor) -> u64 {
        let Some(progress) = self.state.routes.get(route).and_then(|r| r.rollout.clone()) else {
            return self.generation;
        };
        if matches!(change, Change::RolledBack { .. }) {
            self.undrain_for_rollout(route, &spec.stable, actor, "a rollback sends the route's traffic back to it");
        }
        if matches!(change, Change::Resumed) && progress.phase == Phase::Pending {
            // A deliberate retry: the canary's old figures would roll it back again.
            self.servers.reset_stats(&spec.canary);
            self.swap();
        }
        let after = progress.split(spec);
        if after != *before {
            self.swap();
        }
        let (action, reason) = match change {
            Change::Started => ("rollout-progressing", "the canary passed its health checks".to_string()),
            Change::Advanced { from, to } => ("rollout-step", format!("step {} -> step {}", from + 1, to + 1)),
            Change::Completed => ("rollout-complete", format!("{} is the stable side now", spec.canary)),
            Change::RolledBack { reason } => {
                let label = crate::metrics::rollback_reason(*actor == Actor::Rollout, reason);
                *self.rollbacks.entry((route.to_string(), label)).or_default() += 1;
                ("rollback", reason.clone())
            }
            Change::RollbackHeld { reason } => ("rollback-held", reason.clone()),
            Change::WaitingForTraffic => (
                "rollout-waiting",
                format!("hold over, fewer than min_requests ({}) in the window", spec.analysis.min_requests),
            ),
            Change::Paused => ("pause", "rollout timer frozen".to_string()),
            Change::Resumed => ("resume", format!("rollout is {:?}", progress.phase)),
        };
        if matches!(change, Change::Completed) && spec.strategy == config::Strategy::BlueGreen {
            // Cleanup is over: the old side leaves rotation.
            self.state.drained.insert(spec.stable.clone());
            self.apply_drains();
        }
        self.write_state();
        self.last_saved = Some(tokio::time::Instant::now());
        match change {
            Change::RolledBack { .. } | Change::RollbackHeld { .. } => {
                tracing::warn!(%route, %action, %reason, "rollout")
            }
            _ => tracing::info!(%route, %action, %reason, "rollout"),
        }
        let details = self.rollout_json(route, spec);
        self.events.record(
            Event::new(actor, action, self.generation)
                .route(route)
                .change(shares_json(Some(before)), shares_json(Some(&after)))
                .reason(reason)
                .details(details),
        );
        self.generation
    }

    /// The rollout engine's clock: every rollout route looks at its figures.
    fn tick(&mut self) -> Value {
        let now = tokio::time::Instant::now();
        let elapsed = self.last_tick.map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        self.last_tick = Some(now);
        let table = self.table.current();
        let specs: Vec<(String, RolloutSpec)> =
            self.base.routes.iter().filter_map(|r| Some((r.name.clone(), r.rollout.clone()?))).collect();
        let mut running = false;
        for (route, spec) in specs {
            let side = |name: &str| table.backend_index(name).map(|b| table.backend(b));
            let (Some(stable), Some(canary)) = (side(&spec.stable), side(&spec.canary)) else { continue };
            let seen = Observed {
                canary: canary.stats.summary(now),
                stable: stable.stats.summary(now),
                canary_in_rotation: canary.has_server_in_rotation(),
                stable_in_rotation: stable.has_server_in_rotation(),
            };
            let Some(progress) = self.state.routes.get_mut(&route).and_then(|r| r.rollout.as_mut()) else { continue };
            let before = progress.split(&spec);
            let change = progress.tick(&spec, elapsed, &seen);
            running |= matches!(progress.phase, Phase::Pending | Phase::Progressing);
            if let Some(change) = change {
                self.carry_out(&route, &spec, &before, &change, &Actor::Rollout);
            }
        }
        if running && self.last_saved.is_none_or(|t| now.saturating_duration_since(t) >= SAVE_PROGRESS_EVERY) {
            // Hold time, so that a restart resumes the step where it was.
            self.write_state();
            self.last_saved = Some(now);
        }
        json!({ "ok": true })
    }

    /// A rollout as `status` and the rollout commands show it.
    fn rollout_json(&self, route: &str, spec: &RolloutSpec) -> Value {
        let Some(progress) = self.state.routes.get(route).and_then(|r| r.rollout.as_ref()) else { return Value::Null };
        let table = self.table.current();
        let now = tokio::time::Instant::now();
        let measured = |name: &str| {
            table.backend_index(name).map_or(Value::Null, |b| table.backend(b).stats.summary(now).to_json())
        };
        let a = &spec.analysis;
        json!({
            "state": progress.phase,
            "status": progress.describe(),
            "identity": progress.identity,
            "strategy": match spec.strategy { config::Strategy::Canary => "canary", config::Strategy::BlueGreen => "blue-green" },
            "stable": spec.stable,
            "canary": spec.canary,
            "step": progress.step + 1,
            "steps": match spec.strategy { config::Strategy::Canary => spec.steps.len(), config::Strategy::BlueGreen => 1 },
            "canary_weight": percent(progress.canary_weight(spec)),
            // A hold runs only while the rollout moves (or is paused mid-step).
            "hold_left_s": if matches!(progress.phase, Phase::Progressing | Phase::Paused) {
                progress.hold_left(spec).as_secs_f64()
            } else {
                0.0
            },
            "waiting_for_traffic": progress.waiting_for_traffic,
            "rollback_held": progress.rollback_held,
            "reason": progress.reason,
            "thresholds": {
                "window_s": a.window.as_secs_f64(),
                "min_requests": a.min_requests,
                "max_error_rate": a.max_error_rate.map(percent),
                "max_p99_ms": a.max_p99.map(|d| d.as_secs_f64() * 1000.0),
                "max_error_rate_over_stable": a.max_error_rate_over_stable.map(percent),
                "max_p99_over_stable_ms": a.max_p99_over_stable.map(|d| d.as_secs_f64() * 1000.0),
            },
            "measured": { "canary": measured(&spec.canary), "stable": measured(&spec.stable) },
        })
    }

    /// Builds and stores a new table from the effective config; returns its generation.
    fn swap(&mut self) -> u64 {
        self.generation += 1;
        let table = Table::build(&self.effective(), &mut self.servers, self.generation);
        self.table.store(table);
        let table = self.table.current();
        self.servers.retain_in(&table);
        self.apply_drains();
        if self.listeners.is_some() {
            // Running: probes follow the table. (Before `spawn` there is no runtime yet.)
            self.health.sync(&self.base, &table);
        }
        self.generation
    }

    /// Makes a `set-weights` durable: at once after a quiet [`PERSIST_INTERVAL`], else at the
    /// interval's end (a [`Command::Flush`] from a timer), with every change made meanwhile.
    /// Only these writes count towards the interval, so that a rollout's progress saves or an
    /// operator's rollback never make the next `set-weights` wait.
    fn persist_split(&mut self) {
        let now = tokio::time::Instant::now();
        let due = self.last_persist.map_or(now, |last| last + PERSIST_INTERVAL);
        let own = self.own.clone();
        match own {
            Some(own) if due > now => {
                if !self.persist_pending {
                    self.persist_pending = true;
                    tokio::spawn(async move {
                        tokio::time::sleep_until(due).await;
                        let Some(tx) = own.upgrade() else { return };
                        let (reply, _) = oneshot::channel();
                        let _ = tx.send((Command::Flush, Actor::Switchyard, reply)).await;
                    });
                }
            }
            _ => {
                self.last_persist = Some(now);
                self.write_state();
            }
        }
    }

    /// Writes the state file now, with whatever `set-weights` waited for the next write.
    fn write_state(&mut self) {
        self.persist_pending = false;
        if let Err(e) = self.state_file.save(&self.state) {
            tracing::error!(error = %e, "cannot persist the runtime state; the change is in force but will not survive a restart");
        }
    }

    /// Sets a route's live split, remembering the one before for `rollback`.
    fn change_split(&mut self, route: &str, split: Shares) {
        let before = self.split_of(route);
        let file = self.base.routes.iter().find(|r| r.name == route).map(|r| r.split.clone());
        let entry = self.state.routes.entry(route.to_string()).or_default();
        entry.previous = before;
        if file.as_ref().map(nonzero) == Some(nonzero(&split)) {
            entry.split = None;
            entry.file_split = None;
        } else {
            entry.split = Some(split);
            entry.file_split = file;
        }
    }

    fn set_weights(&mut self, route: &str, mut split: Shares, actor: &Actor) -> Value {
        if let Err(e) = self.check_split(route, &split) {
            return failure(&e);
        }
        if self.rollout_spec(route).is_some() {
            return failure(&format!(
                "route {route:?} is under a rollout, which sets its split; use promote, pause, resume or rollback"
            ));
        }
        // Backends at 0 % are the same split as backends left out, and order does not
        // matter: compare and store one canonical form.
        split = nonzero(&split);
        let before = self.split_of(route);
        if before.as_ref().map(nonzero) == Some(nonzero(&split)) {
            // Nothing changes; `rollback` keeps pointing at the split before the last real change.
            return json!({ "ok": true, "generation": self.generation, "route": route, "split": shares_json(before.as_deref()), "unchanged": true });
        }
        self.change_split(route, split.clone());
        let generation = self.swap();
        self.persist_split();
        self.events.record(
            Event::new(actor, "set-weights", generation)
                .route(route)
                .change(shares_json(before.as_deref()), shares_json(Some(&split))),
        );
        json!({ "ok": true, "generation": generation, "route": route, "split": shares_json(Some(&split)) })
    }

    fn check_split(&self, route: &str, split: &Shares) -> Result<(), String> {
        if !self.base.routes.iter().any(|r| r.name == route) {
            return Err(format!("no route named {route:?}"));
        }
        if split.is_empty() {
            return Err("give at least one BACKEND=PERCENT".into());
        }
        let mut seen = Vec::new();
        for (backend, _) in split {
            if self.base.backend(backend).is_none() {
                return Err(format!("no backend named {backend:?}"));
            }
            if seen.contains(&backend) {
                return Err(format!("backend {backend:?} is named twice"));
            }
            seen.push(backend);
        }
        let total: BasisPoints = split.iter().map(|(_, w)| w).sum();
        if total != ALL {
            return Err(format!("shares sum to {} %, they must sum to 100", f64::from(total) / 100.0));
        }
        Ok(())
    }

    fn rollback(&mut self, route: &str, reason: Option<String>, actor: &Actor) -> Value {
        let Some(spec) = self.base.routes.iter().find(|r| r.name == route) else {
            return failure(&format!("no route named {route:?}"));
        };
        if spec.rollout.is_some() {
            let reason = reason.unwrap_or_else(|| "operator rollback".into());
            return self.change_rollout(route, actor, |progress, _| Ok(progress.rollback(reason)));
        }
        let target = match &spec.rollout {
            Some(rollout) => vec![(rollout.stable.clone(), ALL)],
            None => match self.state.routes.get(route).and_then(|r| r.previous.clone()) {
                Some(previous) => previous,
                None => return failure(&format!("route {route:?} has no earlier split to roll back to")),
            },
        };
        let before = self.split_of(route);
        self.change_split(route, target.clone());
        let generation = self.swap();
        self.write_state();
        *self.rollbacks.entry((route.to_string(), "manual")).or_default() += 1;
        let reason = reason.unwrap_or_else(|| "operator rollback".into());
        self.events.record(
            Event::new(actor, "rollback", generation)
                .route(route)
                .change(shares_json(before.as_deref()), shares_json(Some(&target)))
                .reason(reason),
        );
        json!({ "ok": true, "generation": generation, "route": route, "split": shares_json(Some(&target)) })
    }

    fn reload(&mut self, actor: &Actor) -> Value {
        let Some(path) = self.config_path.clone() else {
            return failure("switchyard was started without a config file; there is nothing to reload");
        };
        let checked = match config::load(&path) {
            Ok(c) => c,
            Err(errors) => return self.refuse_reload(actor, errors.to_string()),
        };
        let new = checked.config;
        if new == self.base {
            self.last_reload_error = None;
            return json!({ "ok": true, "generation": self.generation, "changes": [] });
        }
        // The one step that can still fail comes first, before anything (rollouts, their
        // figures, the event log) has seen the new config.
        if let Err(e) = self.listeners.as_mut().map_or(Ok(()), |l| l.update(&new.listen)) {
            return self.refuse_reload(actor, format!("{}: {e}", path.display()));
        }
        let changes = diff(&self.base, &new);
        let old_splits: BTreeMap<String, Shares> =
            self.base.routes.iter().filter_map(|r| Some((r.name.clone(), self.split_of(&r.name)?))).collect();
        self.base = new;
        self.reconcile();
        self.reconcile_rollouts(actor, &old_splits);
        // A route whose split the reload changed can be rolled back to the split before.
        for (name, old) in old_splits {
            if self.split_of(&name).is_some_and(|now| now != old) {
                self.state.routes.entry(name).or_default().previous = Some(old);
            }
        }
        let generation = self.swap();
        self.write_state();
        self.last_reload_error = None;
        self.reloads.ok += 1;
        self.events.record(Event::new(actor, "reload", generation).change(Value::Null, json!(changes)));
        json!({ "ok": true, "generation": generation, "changes": changes })
    }

    /// A reload that did not happen: logged, counted, shown in `status`, an event, and the
    /// answer; the running config stays.
    fn refuse_reload(&mut self, actor: &Actor, error: String) -> Value {
        tracing::warn!(%actor, errors = %error, "config refused; the running config stays");
        self.last_reload_error = Some(error.clone());
        self.reloads.refused += 1;
        self.events.record(Event::new(actor, "reload-refused", self.generation).reason(error.clone()));
        json!({ "ok": false, "error": error, "generation": self.generation })
    }

    /// The `/metrics` page: counters recorded on the hot path, the rest read now.
    fn metrics(&self, connections_open: usize) -> String {
        use crate::metrics::Families;
        let table = self.table.current();
        let mut f = Families::default();
        let (pairs, unrouted) = self.servers.all_traffic();
        let mut pairs: Vec<_> = pairs.collect();
        pairs.sort_by_key(|&(route, backend, _)| (route, backend));
        for (route, backend, traffic) in pairs {
            // "": the route found no backend; no server was asked, so nothing was timed.
            if !backend.is_empty() || traffic.codes().next().is_some() {
                f.traffic(route, backend, traffic, !backend.is_empty());
            }
        }
        if unrouted.codes().next().is_some() {
            f.traffic("", "", unrouted, false);
        }
        for route in table.routes.iter() {
            let name = &*route.name;
            let split = self.split_of(name).unwrap_or_default();
            for &b in route.members() {
                let backend = &*table.backend(b).name;
                let weight = weight_of(&split, backend);
                f.gauge(
                    "switchyard_route_weight",
                    "The share of a route's requests a backend gets, in percent",
                    &[("route", name), ("backend", backend)],
                    percent(weight),
                );
            }
            if let Some(progress) = self.state.routes.get(name).and_then(|r| r.rollout.as_ref()) {
                for phase in [Phase::Pending, Phase::Progressing, Phase::Paused, Phase::Complete, Phase::RolledBack] {
                    let state = format!("{phase:?}");
                    f.gauge(
                        "switchyard_rollout_state",
                        "1 for the state a route's rollout is in",
                        &[("route", name), ("state", &state)],
                        if progress.phase == phase { 1.0 } else { 0.0 },
                    );
                }
            }
            if let Some(mirror) = &route.mirror {
                for outcome in crate::mirror::Outcome::ALL {
                    f.counter(
                        "switchyard_mirror_total",
                        "Mirrored copies by what became of them",
                        &[("route", name), ("result", outcome.label())],
                        mirror.state.count(outcome),
                    );
                }
            }
        }
        for backend in table.backends.iter() {
            for server in backend.servers.iter() {
                let labels = [("backend", &*backend.name), ("server", &*server.label)];
                f.gauge(
                    "switchyard_upstream_in_flight",
                    "Requests sent to a server whose response has not ended",
                    &labels,
                    f64::from(server.in_flight()),
                );
                f.gauge(
                    "switchyard_server_healthy",
                    "1 when the server passes its health checks",
                    &labels,
                    if server.healthy() { 1.0 } else { 0.0 },
                );
            }
        }
        let routes_now = |route: &str| table.routes.iter().any(|r| &*r.name == route);
        for ((route, reason), n) in self.rollbacks.iter().filter(|((route, _), _)| routes_now(route)) {
            f.counter(
                "switchyard_rollbacks_total",
                "Rollbacks by route and reason (manual, or what the analysis measured)",
                &[("route", route), ("reason", reason)],
                *n,
            );
        }
        for (result, n) in [("ok", self.reloads.ok), ("refused", self.reloads.refused)] {
            f.counter("switchyard_config_reloads_total", "Config reloads by result", &[("result", result)], n);
        }
        f.gauge("switchyard_connections_open", "Open client connections", &[], connections_open as f64);
        f.encode()
    }

    fn mirror_report(&self, name: &str) -> Value {
        let table = self.table.current();
        let Some(route) = table.routes.iter().find(|r| &*r.name == name) else {
            return failure(&format!("no route named {name:?}"));
        };
        match &route.mirror {
            Some(mirror) => mirror.report(name, tokio::time::Instant::now()),
            None => failure(&format!(
                "route {name:?} has no mirror; add mirror = {{ backend = \"...\", percent = 10, compare = true }} to it in the config"
            )),
        }
    }

    fn status(&self, only: Option<&str>) -> Value {
        let table = self.table.current();
        let now = tokio::time::Instant::now();
        if let Some(name) = only {
            if !table.routes.iter().any(|r| &*r.name == name) {
                return failure(&format!("no route named {name:?}"));
            }
        }
        let routes: Vec<Value> = table
            .routes
            .iter()
            .filter(|r| only.is_none_or(|n| n == &*r.name))
            .map(|route| {
                let split = self.split_of(&route.name);
                let backends: Vec<Value> = route
                    .members()
                    .iter()
                    .map(|&b| {
                        let backend = table.backend(b);
                        let weight = split.as_deref().map_or(0, |s| weight_of(s, &backend.name));
                        let servers: Vec<Value> = backend
                            .servers
                            .iter()
                            .map(|s| {
                                let mut server = json!({ "addr": &*s.label, "healthy": s.healthy(), "ejected": s.ejected(), "draining": s.draining(), "in_rotation": s.in_rotation(), "in_flight": s.in_flight() });
                                if s.draining() {
                                    let (replayed, ended, cut) = s.drained.counts();
                                    server["drain"] = json!({ "replayed": replayed, "ended": ended, "cut": cut });
                                }
                                server
                            })
                            .collect();
                        let mut measured = backend.stats.summary(now).to_json();
                        measured["window_s"] = backend.stats.window().as_secs_f64().into();
                        json!({ "name": &*backend.name, "version": backend.version.as_deref(), "weight": percent(weight), "measured": measured, "servers": servers })
                    })
                    .collect();
                let live = self.state.routes.get(&*route.name).is_some_and(|r| r.split.is_some());
                let rollout = self.rollout_spec(&route.name).map_or(Value::Null, |spec| self.rollout_json(&route.name, spec));
                let source = if !rollout.is_null() { "rollout" } else if live { "live" } else { "config" };
                let mirror = route.mirror.as_ref().map_or(Value::Null, |m| m.summary());
                json!({ "name": &*route.name, "split": shares_json(split.as_deref()), "split_source": source, "rollout": rollout, "mirror": mirror, "backends": backends })
            })
            .collect();
        json!({
            "ok": true,
            "generation": table.generation,
            "config": self.config_path.as_ref().map(|p| p.display().to_string()),
            "last_reload_error": self.last_reload_error,
            "reloads": self.reloads,
            "routes": routes,
        })
    }
}

/// A backend's share in a split; 0 when it is not in it.
fn weight_of(split: &[(String, BasisPoints)], backend: &str) -> BasisPoints {
    split.iter().find(|(name, _)| name == backend).map_or(0, |&(_, w)| w)
}

/// A split without its 0 % shares, in name order: the form splits are compared in.
fn nonzero(split: &Shares) -> Shares {
    let mut s: Shares = split.iter().filter(|&&(_, w)| w > 0).cloned().collect();
    s.sort();
    s
}

/// `{"ok": false, "error": ...}`
/// A drain target's in-flight count and what its deadline did, summed over its servers.
fn drain_progress(target: &str, servers: &[std::sync::Arc<crate::routes::Server>]) -> Value {
    let (mut replayed, mut ended, mut cut) = (0, 0, 0);
    for server in servers {
        let (r, e, c) = server.drained.counts();
        (replayed, ended, cut) = (replayed + r, ended + e, cut + c);
    }
    let list: Vec<Value> = servers
        .iter()
        .map(|s| json!({ "addr": &*s.label, "in_flight": s.in_flight(), "in_rotation": s.in_rotation() }))
        .collect();
    json!({
        "ok": true,
        "target": target,
        "in_flight": servers.iter().map(|s| s.in_flight()).sum::<u32>(),
        "replayed": replayed,
        "ended": ended,
        "cut": cut,
        "servers": list,
    })
}

pub fn failure(error: &str) -> Value {
    json!({ "ok": false, "error": error })
}

fn percent(bps: BasisPoints) -> f64 {
    f64::from(bps) / 100.0
}

/// A split as JSON: `{"blue": 90.0, "green": 10.0}` in bucket order.
fn shares_json(shares: Option<&[(String, BasisPoints)]>) -> Value {
    match shares {
        None => Value::Null,
        Some(s) => {
            Value::Object(s.iter().map(|(b, w)| (b.clone(), json!(percent(*w)))).collect::<Map<String, Value>>())
        }
    }
}

/// What a reload changes, in words an operator reads in an event.
fn diff(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if old.listen != new.listen {
        out.push(format!("listen: {:?} -> {:?}", old.listen.http, new.listen.http));
    }
    if old.defaults != new.defaults {
        out.push("defaults changed".into());
    }
    if old.runtime != new.runtime {
        out.push("runtime changed (takes effect at the next start)".into());
    }
    if old.admin != new.admin {
        out.push("admin changed (takes effect at the next start)".into());
    }
    for (kind, old_names, new_names) in [
        (
            "backend",
            old.backends.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
            new.backends.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
        ),
        (
            "route",
            old.routes.iter().map(|r| r.name.as_str()).collect(),
            new.routes.iter().map(|r| r.name.as_str()).collect(),
        ),
    ] {
        for name in &new_names {
            if !old_names.contains(name) {
                out.push(format!("{kind} {name} added"));
            }
        }
        for name in &old_names {
            if !new_names.contains(name) {
                out.push(format!("{kind} {name} removed"));
            }
        }
    }
    for b in &new.backends {
        if old.backend(&b.name).is_some_and(|o| o != b) {
            out.push(format!("backend {} changed", b.name));
        }
    }
    for r in &new.routes {
        let Some(o) = old.routes.iter().find(|o| o.name == r.name) else { continue };
        let mirror = |m: &Option<config::MirrorSpec>| {
            m.as_ref().map_or("off".to_string(), |m| format!("to {} at {} %", m.backend, percent(m.percent)))
        };
        if o.mirror != r.mirror {
            out.push(format!("route {}: mirror {} -> {}", r.name, mirror(&o.mirror), mirror(&r.mirror)));
        }
        if (config::RouteSpec { mirror: r.mirror.clone(), ..o.clone() }) != *r {
            out.push(format!("route {} changed", r.name));
        }
    }
    if old.routes.iter().map(|r| &r.name).ne(new.routes.iter().map(|r| &r.name))
        && out.iter().all(|c| !c.contains("route"))
    {
        out.push("routes reordered".into());
    }
    out
}
