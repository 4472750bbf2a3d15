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
    let name = config.file_name().map(|n| n.to_os_string());
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access() && about_the_config(&e.paths, name.as_deref())) {
            // Full means a reload is already pending; this event joins it.
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            if !quiet_after(&mut rx).await {
                return;
            }
            let answer = handle.send(Command::Reload, Actor::Config).await;
            if answer.get("error").is_some_and(|e| e == "switchyard is shutting down") {
                return;
            }
        }
    });
    Ok(watcher)
}

/// Whether an event in the config's directory may have changed the config: it names the
/// config file (written, or renamed over), or a name starting with `..`, the way a
/// Kubernetes ConfigMap swaps its `..data` link to a new `..2026_…` directory. Anything else
/// there (a log file, the state directory, an editor's swap file) is not the config, and a
/// reload for it would be wasted, or worse: a refused config whose warning is written to a
/// log beside it would reload itself without end. An event that names no path (a rescan)
/// may be about anything.
fn about_the_config(paths: &[std::path::PathBuf], name: Option<&std::ffi::OsStr>) -> bool {
    paths.is_empty()
        || paths
            .iter()
            .filter_map(|p| p.file_name())
            .any(|f| Some(f) == name || f.as_encoded_bytes().starts_with(b".."))
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

    #[test]
    fn only_events_that_may_change_the_config_count() {
        let name = Some(std::ffi::OsStr::new("switchyard.toml"));
        let about = |paths: &[&str]| about_the_config(&paths.iter().map(Into::into).collect::<Vec<_>>(), name);
        assert!(about(&["/etc/sy/switchyard.toml"]));
        // An editor's rename over the file, as one event with both names.
        assert!(about(&["/etc/sy/.switchyard.toml.swp", "/etc/sy/switchyard.toml"]));
        // A ConfigMap update.
        assert!(about(&["/etc/sy/..data_tmp", "/etc/sy/..data"]));
        assert!(about(&["/etc/sy/..2026_11_23_21_00_00.123"]));
        assert!(about(&[]));
        assert!(!about(&["/etc/sy/switchyard.log"]));
        assert!(!about(&["/etc/sy/state"]));
        assert!(!about(&["/etc/sy/switchyard.toml.bak"]));
    }
}
