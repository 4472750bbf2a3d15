//! The composition root: builds every part from a config, starts it, and owns the order
//! in which things stop. Nothing else in the crate imports this module.
//!
//! ```text
//! Control (single writer) ── reader ──► Proxy ◄── HttpListeners (bound by app, updated by control)
//!    ▲ Handle
//!    ├── admin socket     ├── config file watch     └── SIGHUP
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminError};
use crate::config::{Config, Listen};
use crate::control::{self, Actor, Command, Control};
use crate::proxy::{self, Proxy};
use crate::routes::{Table, TableReader};

/// Why switchyard could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("the config has no listener")]
    NoListener,
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("cannot listen for admin HTTP on {addr}: {source}")]
    AdminHttp { addr: SocketAddr, source: std::io::Error },
    #[error("cannot watch the config file {path}: {source}")]
    Watch { path: PathBuf, source: notify::Error },
}

/// A running switchyard.
pub struct Running {
    http_addr: Arc<Mutex<Option<SocketAddr>>>,
    admin_http_addr: Option<SocketAddr>,
    /// What `/readyz` says.
    ready: Arc<AtomicBool>,
    /// Parent of every listener's stop token.
    accepting: CancellationToken,
    /// Tells connections to finish and close.
    drain: CancellationToken,
    listeners: TaskTracker,
    table: TableReader,
    admin_socket: PathBuf,
    control: control::Handle,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    connections: TaskTracker,
    _watcher: Option<notify::RecommendedWatcher>,
}

/// Starts switchyard: the proxy on the config's listener, the control path with its
/// persisted state, the admin socket, and (given the file's path) the config watch and
/// SIGHUP reloads.
pub async fn start(config: Config, config_path: Option<PathBuf>) -> Result<Running, StartError> {
    let shutdown = CancellationToken::new();
    let accepting = CancellationToken::new();
    let drain = CancellationToken::new();
    let tasks = TaskTracker::new();
    let listener_tasks = TaskTracker::new();
    let connections = TaskTracker::new();
    let ready = Arc::new(AtomicBool::new(false));
    let admin_listener = admin::bind(&config.admin.socket, config.admin.socket_mode)?;
    // A start that fails from here on removes the socket file it made: a stale one would
    // make `ctl` say "connection refused" rather than "no such file".
    let socket_file = RemoveOnFailure::new(&config.admin.socket);

    let Some(addr) = config.listen.http else { return Err(StartError::NoListener) };
    let listener = proxy::bind(addr).map_err(|source| StartError::Bind { addr, source })?;
    let summary = config.summary();
    let admin_socket = config.admin.socket.clone();

    let config_admin_http = config.admin.http;
    let control = Control::new(config, config_path.clone());
    let http_addr = Arc::new(Mutex::new(None));
    let mut listeners = HttpListeners {
        proxy: Proxy::new(control.reader(), connections.clone(), drain.clone()),
        configured: None,
        current: None,
        bound: http_addr.clone(),
        accepting: accepting.clone(),
        tasks: listener_tasks.clone(),
    };
    listeners.start(addr, listener);
    let table = control.reader();
    let admin_http = config_admin_http;
    let control = control.spawn(Box::new(listeners));
    let admin_http_addr = match admin_http {
        None => None,
        Some(addr) => {
            let listener = proxy::bind(addr).map_err(|source| StartError::AdminHttp { addr, source })?;
            let bound = listener.local_addr().ok();
            let admin =
                admin::http::Admin { ready: ready.clone(), control: control.clone(), connections: connections.clone() };
            tasks.spawn(admin::http::serve(listener, admin, shutdown.clone()));
            bound
        }
    };

    tasks.spawn(admin::serve(admin_listener, admin_socket.clone(), control.clone(), shutdown.clone()));
    let watcher = match &config_path {
        Some(path) => {
            spawn_sighup(control.clone(), shutdown.clone(), &tasks);
            Some(
                control::watch::watch(path, control.clone())
                    .map_err(|source| StartError::Watch { path: path.clone(), source })?,
            )
        }
        None => None,
    };
    let bound = *http_addr.lock().unwrap_or_else(|p| p.into_inner());
    tracing::info!(addr = ?bound, admin = %admin_socket.display(), %summary, "switchyard is serving");

    ready.store(true, Ordering::Relaxed);
    socket_file.keep();
    Ok(Running {
        http_addr,
        admin_http_addr,
        ready,
        accepting,
        drain,
        listeners: listener_tasks,
        table,
        admin_socket,
        control,
        shutdown,
        tasks,
        connections,
        _watcher: watcher,
    })
}

fn spawn_sighup(control: control::Handle, shutdown: CancellationToken, tasks: &TaskTracker) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; reload with `switchyard ctl reload` instead");
        return;
    };
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                got = hangups.recv() => if got.is_none() { return },
            }
            tracing::info!("SIGHUP: reloading the config");
            control.send(Command::Reload, Actor::Signal).await;
        }
    });
}

impl Running {
    /// The address the HTTP listener is bound to now (useful with port 0).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        *self.http_addr.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The route table in force.
    pub fn table(&self) -> Arc<Table> {
        self.table.load()
    }

    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }

    /// Sends a command to the control path, as the admin socket would.
    pub async fn command(&self, command: Command, actor: Actor) -> serde_json::Value {
        self.control.send(command, actor).await
    }

    /// The admin HTTP address, when `admin.http` is set.
    pub fn admin_http_addr(&self) -> Option<SocketAddr> {
        self.admin_http_addr
    }

    /// The graceful shutdown sequence, as load balancers and clients expect it:
    /// 1. `/readyz` answers 503 at once, while everything keeps serving;
    /// 2. after `shutdown_delay`, the listeners stop accepting (queued connections are
    ///    still taken in and served);
    /// 3. every connection finishes what it is serving and closes (HTTP/1 responses carry
    ///    `Connection: close`; h2 clients get GOAWAY);
    /// 4. after at most `drain_timeout`, whatever is still open is cut.
    pub async fn shutdown(self) {
        let defaults = self.table.load().defaults.clone();
        self.ready.store(false, Ordering::Relaxed);
        tracing::info!(delay = ?defaults.shutdown_delay, "shutting down: /readyz answers 503; still accepting during the delay");
        tokio::time::sleep(defaults.shutdown_delay).await;
        self.finish(defaults.drain_timeout).await;
    }

    /// Stops at once: no delay, no waiting for requests in flight.
    pub async fn stop(self) {
        self.ready.store(false, Ordering::Relaxed);
        self.finish(Duration::ZERO).await;
    }

    async fn finish(self, drain_timeout: Duration) {
        self.accepting.cancel();
        self.listeners.close();
        self.listeners.wait().await;
        self.drain.cancel();
        self.connections.close();
        if !drain_timeout.is_zero() {
            tracing::info!(connections = self.connections.len(), within = ?drain_timeout, "stopped accepting; draining connections");
        }
        if tokio::time::timeout(drain_timeout, self.connections.wait()).await.is_err() && !drain_timeout.is_zero() {
            tracing::warn!(cut = self.connections.len(), "drain_timeout passed: cutting the connections still open");
        }
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        // A change made in the last moments may still wait for its write (the control
        // path outlives the admin socket: this handle keeps it).
        self.control.send(control::Command::Flush, control::Actor::Switchyard).await;
        tracing::info!("switchyard stopped");
    }
}

/// Removes the file this start put at a path when dropped, unless told to keep it; a file
/// that is no longer that one (another instance's socket, placed meanwhile) is left alone.
struct RemoveOnFailure(Option<(PathBuf, (u64, u64))>);

impl RemoveOnFailure {
    fn new(path: &Path) -> Self {
        use std::os::unix::fs::MetadataExt;
        let made = std::fs::symlink_metadata(path).ok().map(|m| (path.to_path_buf(), (m.dev(), m.ino())));
        RemoveOnFailure(made)
    }

    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnFailure {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if let Some((path, id)) = &self.0 {
            if std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == *id) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// The HTTP listener, rebound by the control path when `listen.http` changes.
struct HttpListeners {
    proxy: Arc<Proxy>,
    /// The address as configured (it may say port 0).
    configured: Option<SocketAddr>,
    current: Option<CancellationToken>,
    bound: Arc<Mutex<Option<SocketAddr>>>,
    accepting: CancellationToken,
    tasks: TaskTracker,
}

impl HttpListeners {
    fn start(&mut self, configured: SocketAddr, listener: tokio::net::TcpListener) {
        let stop = self.accepting.child_token();
        *self.bound.lock().unwrap_or_else(|p| p.into_inner()) = listener.local_addr().ok();
        self.tasks.spawn(self.proxy.clone().serve(listener, stop.clone()));
        if let Some(old) = self.current.replace(stop) {
            old.cancel();
        }
        self.configured = Some(configured);
    }
}

impl control::Listeners for HttpListeners {
    fn update(&mut self, listen: &Listen) -> Result<(), String> {
        let Some(addr) = listen.http else { return Err("a config without listen.http would stop all traffic".into()) };
        if self.configured == Some(addr) {
            return Ok(());
        }
        let listener = proxy::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        tracing::info!(%addr, "listen.http changed: new listener bound, old one closing (open connections stay)");
        self.start(addr, listener);
        Ok(())
    }
}
