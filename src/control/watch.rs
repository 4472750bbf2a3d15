//! Watching the config file. The watch is on the file's directory, not the file: editors
//! that write a new file and rename it over the old one, and Kubernetes ConfigMaps that
//! swap a `..data` symlink, both replace the inode a file watch would follow. After any
//! change in the directory and a short quiet period (bursts of events from one save become
//! one), the config's bytes are read; a reload is asked for when they differ from those of
//! the last reload the watch asked for.

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
        // Any change in the directory: the config may be a link to another file there,
        // whose name no event for the config would carry. The bytes tell (below).
        if event.is_ok_and(|e| !e.kind.is_access()) {
            // Full means a reload is already pending; this event joins it.
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    let config = config.to_path_buf();
    tokio::spawn(async move {
        // The config's bytes at the last reload asked for. Other files change beside the
        // config: a log, the state directory. A refused config whose warning or event went
        // there would otherwise be reloaded, refused and written about again, for ever.
        let mut asked: Option<Vec<u8>> = None;
        while rx.recv().await.is_some() {
            if !quiet_after(&mut rx).await {
                return;
            }
            let bytes = tokio::fs::read(&config).await.ok();
            if bytes.is_some() && bytes == asked {
                continue;
            }
            asked = bytes;
            let answer = handle.send(Command::Reload, Actor::Config).await;
            if answer.get("error").is_some_and(|e| e == "switchyard is shutting down") {
                return;
            }
        }
    });
    Ok(watcher)
}

/// Absorbs the rest of a burst of events: true once none has come for [`DEBOUNCE`], false
/// if the watch ended meanwhile. It ends when switchyard stops and drops its watcher, and
/// a reload then would read a config that may be on its way out (the demo removes its
/// directory as it ends): no reload, no event, no state directory made anew.
async fn quiet_after(rx: &mut mpsc::Receiver<()>) -> bool {
    loop {
        match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
            Ok(Some(())) => continue,
            Ok(None) => return false,
            Err(_quiet) => return true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_burst_ends_in_a_reload_unless_the_watch_ends_first() {
        let (tx, mut rx) = mpsc::channel(1);
        tx.send(()).await.expect("send");
        assert!(quiet_after(&mut rx).await, "one event, then quiet: reload");

        // Events, then the watcher dropped (switchyard stopping) within the quiet period.
        tx.send(()).await.expect("send");
        drop(tx);
        assert!(!quiet_after(&mut rx).await, "the watch ended: no reload");
    }
}
