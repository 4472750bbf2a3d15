//! The composition root: builds every part from a config, starts it, and owns the order
//! in which things stop. Nothing else in the crate imports this module.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::proxy::{self, Proxy};
use crate::routes::{Servers, Table, TableWriter};

/// Why switchyard could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("the config has no listener")]
    NoListener,
}

/// A running switchyard.
#[derive(Debug)]
pub struct Running {
    http_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    listeners: TaskTracker,
    connections: TaskTracker,
    table: TableWriter,
    #[allow(dead_code)] // the control path (reloads, admin) takes it over
    servers: Servers,
}

/// Builds the route table from `config`, binds the listeners and starts serving.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let mut servers = Servers::default();
    let table = TableWriter::new(Table::build(&config, &mut servers, 1));
    let proxy = Proxy::new(table.reader());
    let shutdown = CancellationToken::new();
    let listeners = TaskTracker::new();
    let connections = TaskTracker::new();

    let Some(addr) = config.listen.http else { return Err(StartError::NoListener) };
    let listener = proxy::bind(addr).map_err(|source| StartError::Bind { addr, source })?;
    let http_addr = listener.local_addr().ok();
    listeners.spawn(proxy.clone().serve(listener, shutdown.clone(), connections.clone()));
    tracing::info!(addr = ?http_addr, summary = %config.summary(), "switchyard is serving");

    Ok(Running { http_addr, shutdown, listeners, connections, table, servers })
}

impl Running {
    /// The address the HTTP listener is bound to (useful with port 0).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The current route table.
    pub fn table(&self) -> Arc<Table> {
        self.table.current()
    }

    /// Stops accepting, then closes every connection. In-flight requests are cut; the
    /// graceful sequence (readiness, delay, drain) is the shutdown issue's.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.listeners.close();
        self.listeners.wait().await;
        self.connections.close();
        tracing::info!("switchyard stopped accepting");
    }
}
