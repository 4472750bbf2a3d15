//! Configuration: the TOML file, its validation, and the checked types every other module
//! is built from. Pure: no I/O beyond reading the file, no knowledge of the rest of the crate.
//!
//! Two stages, as in sozu: [`file`] mirrors the TOML with source spans, [`validate`] turns
//! it into a [`Config`] or collects *every* error with the key and line/column it concerns.

mod file;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderName;

pub use validate::Warning;
pub(crate) use validate::MAX_DURATION;

/// Basis points: hundredths of a percent, 0..=10_000. A 0.05 % canary is 5.
pub type BasisPoints = u32;

/// 100 % in basis points.
pub const ALL: BasisPoints = 10_000;

/// A validated configuration. Every name it refers to exists, every split sums to 100 %.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: Listen,
    pub runtime: Runtime,
    pub admin: Admin,
    pub defaults: Defaults,
    /// In name order.
    pub backends: Vec<BackendSpec>,
    /// In file order: the first match wins.
    pub routes: Vec<RouteSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub http: Option<SocketAddr>,
    pub https: Option<HttpsListen>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsListen {
    pub addr: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runtime {
    /// 0 means one per available core.
    pub worker_threads: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub socket: PathBuf,
    pub socket_mode: u32,
    pub http: Option<SocketAddr>,
    pub state_dir: PathBuf,
}

/// Timeouts and limits that apply to every route unless a route says otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub header_read_timeout: Duration,
    pub stream_idle_timeout: Duration,
    pub upstream_idle_timeout: Duration,
    pub drain_timeout: Duration,
    pub shutdown_delay: Duration,
    pub max_request_header_bytes: usize,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(90),
            header_read_timeout: Duration::from_secs(10),
            stream_idle_timeout: Duration::from_secs(300),
            upstream_idle_timeout: Duration::from_secs(4),
            drain_timeout: Duration::from_secs(30),
            shutdown_delay: Duration::from_secs(5),
            max_request_header_bytes: 65_536,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    pub name: String,
    pub servers: Vec<SocketAddr>,
    pub version: Option<String>,
    pub health: Option<HealthSpec>,
    pub outlier: Outlier,
}

/// Passive outlier detection: a server whose requests fail `failures` times in a row is
/// ejected for `backoff`, doubled on each ejection up to `max_backoff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outlier {
    /// 0 turns ejection off.
    pub failures: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for Outlier {
    fn default() -> Self {
        Outlier { failures: 5, backoff: Duration::from_secs(10), max_backoff: Duration::from_secs(300) }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSpec {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub expect_status: u16,
    pub expect_body: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub name: String,
    /// Empty: any host.
    pub hosts: Vec<HostPattern>,
    pub path_prefix: String,
    /// Backends in the order written, with their share. Sums to [`ALL`].
    pub split: Vec<(String, BasisPoints)>,
    pub request_timeout: Duration,
    pub sticky: Option<Sticky>,
    pub override_header: Option<HeaderName>,
    pub mirror: Option<MirrorSpec>,
    pub rollout: Option<RolloutSpec>,
}

/// A host a route answers for, lowercased and without a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    /// `*.example.com`, stored as `.example.com`: matches any name ending in it.
    Suffix(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sticky {
    Header(HeaderName),
    Cookie(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorSpec {
    pub backend: String,
    pub percent: BasisPoints,
    pub compare: bool,
    pub max_body: u64,
    pub max_in_flight: u32,
    pub timeout: Duration,
    pub ignore_headers: Vec<HeaderName>,
    pub ignore_json_fields: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    Canary,
    BlueGreen,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutSpec {
    pub strategy: Strategy,
    pub stable: String,
    pub canary: String,
    pub steps: Vec<Step>,
    pub analysis: Analysis,
    pub cleanup: Duration,
    pub progress_deadline: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub weight: BasisPoints,
    /// `None` on the last step: it holds until the rollout completes.
    pub hold: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Analysis {
    pub window: Duration,
    pub min_requests: u64,
    pub max_error_rate: Option<BasisPoints>,
    pub max_p99: Option<Duration>,
    pub max_error_rate_over_stable: Option<BasisPoints>,
    pub max_p99_over_stable: Option<Duration>,
}

/// One problem in a config file, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The key, as a path: `routes[0].split`, `backends.blue.servers[1]`.
    pub key: String,
    /// 1-based; 0 when the error has no place in the file (it cannot be read at all).
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "{}:{}: ", self.line, self.column)?;
        }
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// Why a config was refused: every error found, in file order.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors {
    pub source_name: String,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}:{}", self.source_name, e)?;
        }
        Ok(())
    }
}

/// A validated config with the warnings `check` shows.
#[derive(Debug, Clone)]
pub struct Checked {
    pub config: Config,
    pub warnings: Vec<Warning>,
}

/// Parses and validates config text. `source_name` is used in error messages.
pub fn parse(text: &str, source_name: &str) -> Result<Checked, ConfigErrors> {
    validate::parse(text).map_err(|errors| ConfigErrors { source_name: source_name.to_string(), errors })
}

/// Reads, parses and validates a config file.
pub fn load(path: &Path) -> Result<Checked, ConfigErrors> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        source_name: name.clone(),
        errors: vec![ConfigError {
            key: String::new(),
            line: 0,
            column: 0,
            message: format!("cannot read the file: {e}"),
        }],
    })?;
    parse(&text, &name)
}

impl Config {
    /// One line for `check` and the start-up log.
    pub fn summary(&self) -> String {
        let servers: usize = self.backends.iter().map(|b| b.servers.len()).sum();
        let listeners: Vec<String> = [
            self.listen.http.map(|a| format!("http {a}")),
            self.listen.https.as_ref().map(|h| format!("https {}", h.addr)),
        ]
        .into_iter()
        .flatten()
        .collect();
        format!(
            "{} route{}, {} backend{} ({} server{}), listening on {}",
            self.routes.len(),
            plural(self.routes.len()),
            self.backends.len(),
            plural(self.backends.len()),
            servers,
            plural(servers),
            if listeners.is_empty() { "nothing".to_string() } else { listeners.join(" and ") },
        )
    }

    pub fn backend(&self, name: &str) -> Option<&BackendSpec> {
        self.backends.iter().find(|b| b.name == name)
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}
