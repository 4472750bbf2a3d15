//! Runtime state: what the operator changed while switchyard ran (live splits, and what to
//! roll back to), persisted in `state_dir/state.json` and restored at start.
//!
//! The config file says what the operator wants; this file says where things are now. A
//! live split remembers the file's split it overrode: when the file's split for that route
//! changes (an edit, at a reload or while switchyard was down), the edit is the newer
//! intent and the override is dropped.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::BasisPoints;

/// A split as the state file keeps it: backends in bucket order with their share.
pub type Shares = Vec<(String, BasisPoints)>;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub routes: BTreeMap<String, RouteState>,
    /// Drained targets: backend names or `host:port`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub drained: std::collections::BTreeSet<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteState {
    /// The split in force, when it is not the file's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<Shares>,
    /// The file's split when `split` was set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_split: Option<Shares>,
    /// The split in force before the last change: what `rollback` restores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Shares>,
    /// Where the route's rollout stands; on a rollout route it decides the split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<crate::rollout::Progress>,
}

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// Where the state lives.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

/// What loading found.
#[derive(Debug)]
pub enum Loaded {
    Fresh,
    Restored(State),
    /// The file could not be used; it was moved to `moved_to` and the config's state is used.
    Corrupt {
        reason: String,
        moved_to: PathBuf,
    },
}

impl StateFile {
    pub fn new(state_dir: &Path) -> Self {
        StateFile { path: state_dir.join("state.json") }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the state. A file that cannot be read or parsed is moved aside, never
    /// deleted and never fatal: the operator can inspect it.
    pub fn load(&self) -> Loaded {
        let text = match std::fs::read(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Loaded::Fresh,
            Err(e) => return self.move_aside(format!("cannot read it: {e}")),
            Ok(text) => text,
        };
        match serde_json::from_slice(&text) {
            Ok(state) => Loaded::Restored(state),
            Err(e) => self.move_aside(format!("cannot parse it: {e}")),
        }
    }

    fn move_aside(&self, reason: String) -> Loaded {
        let stamp =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let moved_to = self.path.with_extension(format!("json.corrupt-{stamp}"));
        if let Err(e) = std::fs::rename(&self.path, &moved_to) {
            tracing::error!(path = %self.path.display(), error = %e, "cannot move the unusable state file aside");
        }
        Loaded::Corrupt { reason, moved_to }
    }

    /// Writes the state atomically: a temporary file, fsync, rename over the old one,
    /// fsync of the directory. A crash at any point leaves the old state or the new one.
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        let err = |source| StateError::Write { path: self.path.clone(), source };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(err)?;
        let tmp = self.path.with_extension("json.tmp");
        let mut json = serde_json::to_vec_pretty(state).map_err(|e| err(e.into()))?;
        json.push(b'\n');
        let mut file = std::fs::File::create(&tmp).map_err(err)?;
        file.write_all(&json).map_err(err)?;
        file.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("switchyard-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn state_round_trips() {
        let dir = temp_dir("round");
        let file = StateFile::new(&dir);
        assert!(matches!(file.load(), Loaded::Fresh));
        let mut state = State::default();
        state.routes.insert(
            "agent".into(),
            RouteState {
                split: Some(vec![("green".into(), 10_000)]),
                file_split: Some(vec![("blue".into(), 10_000)]),
                previous: Some(vec![("blue".into(), 10_000)]),
                rollout: Some(crate::rollout::Progress::new("green v2 [127.0.0.1:9101]".into())),
            },
        );
        file.save(&state).expect("save");
        match file.load() {
            Loaded::Restored(again) => assert_eq!(again, state),
            other => panic!("{other:?}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_corrupt_state_is_moved_aside_not_lost() {
        let dir = temp_dir("corrupt");
        std::fs::create_dir_all(&dir).expect("dir");
        let file = StateFile::new(&dir);
        std::fs::write(file.path(), b"{ not json").expect("write");
        match file.load() {
            Loaded::Corrupt { reason, moved_to } => {
                assert!(reason.contains("cannot parse"), "{reason}");
                assert_eq!(std::fs::read(&moved_to).expect("kept"), b"{ not json");
            }
            other => panic!("{other:?}"),
        }
        assert!(!file.path().exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
