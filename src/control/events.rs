//! The event log: every change, from whoever made it, as one JSON line appended to
//! `state_dir/events.jsonl` and logged. The most recent entries are also kept in memory
//! for `events N`, and reloaded from the file at start so they survive restarts.

use std::collections::VecDeque;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

/// Entries `events N` can return.
const KEPT: usize = 1000;
/// Past this size the log is rotated to `events.jsonl.1` (one old generation is kept).
const ROTATE_AT: u64 = 10 << 20;
/// How long events go on into the file held open before its path is looked at again. An
/// event within this long of a logrotate lands in the file that was renamed away, as with
/// any logger that holds its file open; the next one goes to the new file.
const PATH_RECHECK: Duration = Duration::from_secs(1);

/// Who made a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// A client of the admin socket, by its kernel-reported credentials.
    Socket { uid: u32, pid: Option<i32> },
    /// The config file changed on disk.
    Config,
    /// SIGHUP.
    Signal,
    /// The rollout engine.
    Rollout,
    /// switchyard itself (start-up, state recovery).
    Switchyard,
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::Socket { uid, pid: Some(pid) } => write!(f, "socket uid={uid} pid={pid}"),
            Actor::Socket { uid, pid: None } => write!(f, "socket uid={uid}"),
            Actor::Config => f.write_str("config"),
            Actor::Signal => f.write_str("signal"),
            Actor::Rollout => f.write_str("rollout"),
            Actor::Switchyard => f.write_str("switchyard"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// RFC 3339, UTC.
    pub time: String,
    pub actor: String,
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub before: Value,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub after: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Figures behind an automatic decision: both sides' measurements, the thresholds.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub details: Value,
    /// The table generation in force after the change.
    pub generation: u64,
}

impl Event {
    pub fn new(actor: &Actor, action: &str, generation: u64) -> Self {
        Event {
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            actor: actor.to_string(),
            action: action.to_string(),
            route: None,
            before: Value::Null,
            after: Value::Null,
            reason: None,
            details: Value::Null,
            generation,
        }
    }

    pub fn details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }

    pub fn route(mut self, route: &str) -> Self {
        self.route = Some(route.to_string());
        self
    }

    pub fn change(mut self, before: Value, after: Value) -> Self {
        self.before = before;
        self.after = after;
        self
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }
}

#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    /// The file appended to, held open from the first event on.
    held: Option<Held>,
    /// How long the held file is trusted to still be the one at `path`.
    recheck: Duration,
    recent: VecDeque<Event>,
}

/// The log file held open for appending. An event costs one `write`; the path is looked at
/// again (one `stat`) at most every [`PATH_RECHECK`], and the size that decides rotation is
/// counted here. A `set-weights` every 10 ms paid for a directory check, an open and a
/// close per event at first, then for a `stat`, all on the proxy's core.
#[derive(Debug)]
struct Held {
    file: std::fs::File,
    /// Device and inode: the file at `path` is this one only while they match.
    id: (u64, u64),
    len: u64,
    checked: Instant,
}

impl EventLog {
    /// Opens the log in `state_dir`, reading back its last entries (the file is rotated
    /// at 10 MiB, so this read is bounded).
    pub fn open(state_dir: &Path) -> Self {
        let path = state_dir.join("events.jsonl");
        let mut recent = VecDeque::with_capacity(KEPT);
        if let Ok(text) = std::fs::read_to_string(&path) {
            for line in text.lines().rev().take(KEPT) {
                if let Ok(event) = serde_json::from_str(line) {
                    recent.push_front(event);
                }
            }
        }
        EventLog { path, held: None, recheck: PATH_RECHECK, recent }
    }

    /// Records an event: logged, appended to the file, kept for `events N`. A write
    /// failure is logged and does not stop the change, which is already in force.
    pub fn record(&mut self, event: Event) {
        tracing::info!(
            actor = %event.actor,
            action = %event.action,
            route = event.route.as_deref().unwrap_or(""),
            before = %event.before,
            after = %event.after,
            reason = event.reason.as_deref().unwrap_or(""),
            generation = event.generation,
            "event"
        );
        if let Err(e) = self.append(&event) {
            tracing::error!(path = %self.path.display(), error = %e, "cannot append to the event log");
        }
        if self.recent.len() == KEPT {
            self.recent.pop_front();
        }
        self.recent.push_back(event);
    }

    fn append(&mut self, event: &Event) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(event)?;
        line.push(b'\n');
        let held = self.writer()?;
        if let Err(e) = held.file.write_all(&line) {
            self.held = None;
            return Err(e);
        }
        held.len += line.len() as u64;
        Ok(())
    }

    /// The file to append to: the one held open, unless the path has since been found to
    /// name another file (deleted, renamed away by logrotate, its directory recreated), in
    /// which case the path is opened afresh; rotated first once it reaches [`ROTATE_AT`].
    fn writer(&mut self) -> std::io::Result<&mut Held> {
        let now = Instant::now();
        let held = match self.held.take() {
            Some(held) if now.duration_since(held.checked) < self.recheck => Some(held),
            Some(held) => self.still_at_path(held, now),
            None => None,
        };
        let mut held = match held {
            Some(held) => held,
            None => self.open_path(now)?,
        };
        if held.len >= ROTATE_AT {
            // Only the file held is rotated. If the path names another by now (logrotate
            // got there first, or it was truncated in place), that file is the one to go on.
            held = match self.still_at_path(held, now) {
                Some(held) if held.len >= ROTATE_AT => {
                    match std::fs::rename(&self.path, self.path.with_extension("jsonl.1")) {
                        Ok(()) => self.open_path(now)?,
                        // Growing past the size beats losing events; the next event tries again.
                        Err(e) => {
                            tracing::warn!(path = %self.path.display(), error = %e, "cannot rotate the event log; appending to it");
                            held
                        }
                    }
                }
                Some(held) => held,
                None => self.open_path(now)?,
            };
        }
        Ok(self.held.insert(held))
    }

    /// `held`, if the path still names it; its size refreshed from the disk.
    fn still_at_path(&self, mut held: Held, now: Instant) -> Option<Held> {
        use std::os::unix::fs::MetadataExt;
        let on_disk = std::fs::metadata(&self.path).ok()?;
        if (on_disk.dev(), on_disk.ino()) != held.id {
            return None;
        }
        held.len = on_disk.len();
        held.checked = now;
        Some(held)
    }

    fn open_path(&self, now: Instant) -> std::io::Result<Held> {
        use std::os::unix::fs::MetadataExt;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
        let meta = file.metadata()?;
        Ok(Held { file, id: (meta.dev(), meta.ino()), len: meta.len(), checked: now })
    }

    /// Sets how long the held file is trusted between looks at its path (tests).
    #[cfg(test)]
    fn rechecking_every(mut self, every: Duration) -> Self {
        self.recheck = every;
        self
    }

    /// The last `n` events, oldest first.
    pub fn last(&self, n: usize) -> Vec<Event> {
        self.recent.iter().skip(self.recent.len().saturating_sub(n)).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh, empty directory for one test's log.
    fn empty_dir(name: &str) -> PathBuf {
        crate::test_support::empty_dir(&format!("events-{name}"))
    }

    #[test]
    fn the_log_rotates_and_recent_events_survive_a_reopen() {
        let dir = empty_dir("log");
        // A log already at the rotation size.
        let filler = vec![b'\n'; ROTATE_AT as usize];
        std::fs::write(dir.join("events.jsonl"), &filler).expect("write");
        let mut log = EventLog::open(&dir);
        for i in 0..3 {
            log.record(Event::new(&Actor::Config, "reload", i));
        }
        assert_eq!(std::fs::metadata(dir.join("events.jsonl.1")).expect("rotated").len(), ROTATE_AT);
        let reopened = EventLog::open(&dir);
        let last = reopened.last(10);
        assert_eq!(last.iter().map(|e| e.generation).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(last[0].actor, "config");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_held_file_rotates_mid_run_and_is_reopened_when_replaced_or_removed() {
        let dir = empty_dir("held");
        let log_file = dir.join("events.jsonl");
        let generations = |path: &Path| -> Vec<u64> {
            let text = std::fs::read_to_string(path).expect("read");
            text.lines().filter_map(|l| serde_json::from_str::<Event>(l).ok()).map(|e| e.generation).collect()
        };
        // Just under the rotation size: the first event goes in, the next one rotates.
        std::fs::write(&log_file, vec![b'\n'; ROTATE_AT as usize - 10]).expect("write");
        let mut log = EventLog::open(&dir).rechecking_every(Duration::ZERO);
        log.record(Event::new(&Actor::Config, "reload", 1));
        log.record(Event::new(&Actor::Config, "reload", 2));
        log.record(Event::new(&Actor::Config, "reload", 3));
        assert_eq!(generations(&dir.join("events.jsonl.1")), [1]);
        assert_eq!(generations(&log_file), [2, 3]);
        // Renamed away and replaced, as logrotate's `create` does: the next event goes to
        // the new file.
        std::fs::rename(&log_file, dir.join("rotated")).expect("rename");
        std::fs::write(&log_file, b"").expect("create");
        log.record(Event::new(&Actor::Config, "reload", 4));
        assert_eq!(generations(&dir.join("rotated")), [2, 3]);
        assert_eq!(generations(&log_file), [4]);
        // Removed while held open (by hand, or the whole directory): the next event is
        // not written into the deleted file.
        std::fs::remove_dir_all(&dir).expect("remove");
        log.record(Event::new(&Actor::Config, "reload", 5));
        assert_eq!(generations(&log_file), [5]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn between_checks_of_its_path_the_log_appends_to_the_file_it_holds() {
        let dir = empty_dir("trust");
        let log_file = dir.join("events.jsonl");
        let mut log = EventLog::open(&dir).rechecking_every(Duration::from_secs(3600));
        log.record(Event::new(&Actor::Config, "reload", 1));
        std::fs::rename(&log_file, dir.join("rotated")).expect("rename");
        log.record(Event::new(&Actor::Config, "reload", 2));
        // Not looked at within the hour: the event went to the file held open, and the
        // path was not recreated.
        let rotated = std::fs::read_to_string(dir.join("rotated")).expect("read");
        assert_eq!(rotated.lines().count(), 2, "{rotated}");
        assert!(!log_file.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_size_that_decides_rotation_is_counted_between_checks() {
        let dir = empty_dir("count");
        std::fs::write(dir.join("events.jsonl"), vec![b'\n'; ROTATE_AT as usize - 10]).expect("write");
        let mut log = EventLog::open(&dir).rechecking_every(Duration::from_secs(3600));
        // The first event opens the file and takes it past the size; the second rotates
        // it, though the path is not looked at again within the hour.
        log.record(Event::new(&Actor::Config, "reload", 1));
        log.record(Event::new(&Actor::Config, "reload", 2));
        let rotated = std::fs::read_to_string(dir.join("events.jsonl.1")).expect("rotated");
        assert!(rotated.ends_with("\"generation\":1}\n"), "{}", &rotated[rotated.len() - 100..]);
        let fresh = std::fs::read_to_string(dir.join("events.jsonl")).expect("read");
        assert_eq!(fresh.lines().count(), 1, "{fresh}");
        assert!(fresh.contains("\"generation\":2"), "{fresh}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_log_rotated_by_logrotate_meanwhile_is_not_rotated_again_over_its_old_generation() {
        let dir = empty_dir("race");
        let log_file = dir.join("events.jsonl");
        std::fs::write(&log_file, vec![b'\n'; ROTATE_AT as usize - 10]).expect("write");
        let mut log = EventLog::open(&dir).rechecking_every(Duration::from_secs(3600));
        log.record(Event::new(&Actor::Config, "reload", 1));
        let full = std::fs::metadata(&log_file).expect("log").len();
        assert!(full >= ROTATE_AT);
        // logrotate (`create`) moves the full log aside and leaves an empty one, between two
        // events and within the time the held file is trusted.
        std::fs::rename(&log_file, dir.join("events.jsonl.1")).expect("rename");
        std::fs::write(&log_file, b"").expect("create");
        log.record(Event::new(&Actor::Config, "reload", 2));
        assert_eq!(std::fs::metadata(dir.join("events.jsonl.1")).expect("old generation").len(), full);
        let fresh = std::fs::read_to_string(&log_file).expect("read");
        assert_eq!(fresh.lines().count(), 1, "{fresh}");
        assert!(fresh.contains("\"generation\":2"), "{fresh}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_log_that_cannot_rotate_keeps_growing_rather_than_lose_events() {
        let dir = empty_dir("stuck");
        // A directory where the rotated file would go: the rename fails.
        std::fs::create_dir(dir.join("events.jsonl.1")).expect("dir");
        std::fs::write(dir.join("events.jsonl"), vec![b'\n'; ROTATE_AT as usize]).expect("write");
        let mut log = EventLog::open(&dir);
        log.record(Event::new(&Actor::Config, "reload", 7));
        log.record(Event::new(&Actor::Config, "reload", 8));
        let text = std::fs::read_to_string(dir.join("events.jsonl")).expect("read");
        let kept: Vec<u64> =
            text.lines().filter_map(|l| serde_json::from_str::<Event>(l).ok()).map(|e| e.generation).collect();
        assert_eq!(kept, [7, 8]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
