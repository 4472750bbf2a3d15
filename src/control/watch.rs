//! Watching the config file. The watch is on the file's directory, not the file: editors
//! that write a new file and rename it over the old one, and Kubernetes ConfigMaps that
//! swap a `..data` symlink, both replace the inode a file watch would follow. Any change
//! in the directory asks for a reload after a short quiet period (bursts of events from one
//! save become one reload); a reload of an unchanged file changes nothing.

use std::path::Path;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::{Actor, Command, Handle};

/// How long the directory must stay quiet before the reload.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// Watches `config`'s directory until `handle`'s control task stops. The returned watcher
/// must be kept alive.
pub fn watch(config: &Path, handle: Handle) -> notify::Result<notify::RecommendedWatcher> {
    let dir = match config.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            // Full means a reload is already pending; this event joins it.
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Quiet period: keep absorbing events until none came for DEBOUNCE.
            while tokio::time::timeout(DEBOUNCE, rx.recv()).await.is_ok_and(|e| e.is_some()) {}
            let answer = handle.send(Command::Reload, Actor::Config).await;
            if answer.get("error").is_some_and(|e| e == "switchyard is shutting down") {
                return;
            }
        }
    });
    Ok(watcher)
}
