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
use std::sync::{Arc, Mutex};

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
    #[error("cannot watch the config file {path}: {source}")]
    Watch { path: PathBuf, source: notify::Error },
}

/// A running switchyard.
pub struct Running {
    http_addr: Arc<Mutex<Option<SocketAddr>>>,
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
    let tasks = TaskTracker::new();
    let connections = TaskTracker::new();
    let admin_listener = admin::bind(&config.admin.socket, config.admin.socket_mode)?;

    let Some(addr) = config.listen.http else { return Err(StartError::NoListener) };
    let listener = proxy::bind(addr).map_err(|source| StartError::Bind { addr, source })?;
    let summary = config.summary();
    let admin_socket = config.admin.socket.clone();

    let control = Control::new(config, config_path.clone());
    let http_addr = Arc::new(Mutex::new(None));
    let mut listeners = HttpListeners {
        proxy: Proxy::new(control.reader()),
        configured: None,
        current: None,
        bound: http_addr.clone(),
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
        connections: connections.clone(),
    };
    listeners.start(addr, listener);
    let table = control.reader();
    let control = control.spawn(Box::new(listeners));

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

    Ok(Running { http_addr, table, admin_socket, control, shutdown, tasks, connections, _watcher: watcher })
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

    /// Stops accepting and closes the admin socket. In-flight requests are cut; the
    /// graceful sequence (readiness, delay, drain) is the shutdown issue's.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.connections.close();
        tracing::info!("switchyard stopped accepting");
    }
}

/// The HTTP listener, rebound by the control path when `listen.http` changes.
struct HttpListeners {
    proxy: Arc<Proxy>,
    /// The address as configured (it may say port 0).
    configured: Option<SocketAddr>,
    current: Option<CancellationToken>,
    bound: Arc<Mutex<Option<SocketAddr>>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    connections: TaskTracker,
}

impl HttpListeners {
    fn start(&mut self, configured: SocketAddr, listener: tokio::net::TcpListener) {
        let stop = self.shutdown.child_token();
        *self.bound.lock().unwrap_or_else(|p| p.into_inner()) = listener.local_addr().ok();
        self.tasks.spawn(self.proxy.clone().serve(listener, stop.clone(), self.connections.clone()));
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
