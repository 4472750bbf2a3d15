//! Helpers for the unit tests.

use std::path::PathBuf;

/// A fresh, empty directory for one test, named after it and this process, under the
/// system's temporary directory.
pub fn empty_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("switchyard-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}
