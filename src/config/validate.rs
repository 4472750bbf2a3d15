//! From [`file::File`] to [`Config`]: every check, every default, every error located.
//!
//! Validation never stops at the first problem: an operator fixing a config wants the whole
//! list at once, as `nginx -t` would give it if it could.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use http::HeaderName;

use super::file::{self, File, Located, Percent};
use super::*;

/// Something `check` points out that does not stop the config from running.
pub type Warning = ConfigError;

/// The longest duration any key accepts.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

const NAME_RULE: &str = "use letters, digits, '-', '_' and '.' only";

pub(super) fn parse(text: &str) -> Result<Checked, Vec<ConfigError>> {
    let mut v = Validator { lines: LineIndex::new(text), errors: Vec::new() };
    let file: File = match toml::from_str(text) {
        Ok(f) => f,
        Err(first) => {
            match toml::de::DeTable::parse(text) {
                // A type error, an unknown or a missing key: every one of them, each named by
                // its place in the document.
                Ok(doc) => {
                    let mut all = errors_piece_by_piece(&doc);
                    if all.is_empty() {
                        all.push(first);
                    }
                    for e in all {
                        let span = e.span().unwrap_or(0..0);
                        v.error(&key_at(doc.get_ref(), span.start), span, e.message().trim().to_string());
                    }
                    // The pieces come in key order, not the file's.
                    v.errors.sort_by_key(|e| (e.line, e.column));
                }
                // A syntax error (a duplicate key, say): no document to place it in nor to go
                // on with; the text at the error names what it can.
                Err(_) => {
                    let span = first.span().unwrap_or(0..0);
                    let snippet = text.get(span.clone()).unwrap_or("").trim();
                    let key = if snippet.len() <= 64 && !snippet.contains('\n') { snippet } else { "" };
                    v.error(key, span, first.message().trim().to_string());
                }
            }
            return Err(v.errors);
        }
    };
    let config = v.config(&file);
    if !v.errors.is_empty() {
        v.errors.sort_by_key(|e| (e.line, e.column));
        return Err(v.errors);
    }
    let warnings = v.warnings(&file, &config);
    Ok(Checked { config, warnings })
}

/// Deserializes the document a piece at a time (each top-level table, each backend, each
/// route), so that one mistake does not hide the next: serde stops at the first error.
/// Every key of the file has a default, so a piece alone misses nothing it should have.
fn errors_piece_by_piece<'i>(doc: &toml::Spanned<toml::de::DeTable<'i>>) -> Vec<toml::de::Error> {
    use serde::Deserialize;
    use toml::de::{DeTable, DeValue};
    let mut pieces: Vec<DeTable<'i>> = Vec::new();
    for (name, value) in doc.get_ref().iter() {
        let one = |value: toml::Spanned<DeValue<'i>>| -> DeTable<'i> {
            let mut piece = DeTable::new();
            piece.insert(name.clone(), value);
            piece
        };
        match (name.get_ref().as_ref(), value.get_ref()) {
            ("backends", DeValue::Table(backends)) => {
                for (backend, spec) in backends.iter() {
                    let mut only = DeTable::new();
                    only.insert(backend.clone(), spec.clone());
                    pieces.push(one(toml::Spanned::new(value.span(), DeValue::Table(only))));
                }
            }
            ("routes", DeValue::Array(routes)) => {
                for route in routes.iter() {
                    let only = DeValue::Array(std::iter::once(route.clone()).collect());
                    pieces.push(one(toml::Spanned::new(value.span(), only)));
                }
            }
            _ => pieces.push(one(value.clone())),
        }
    }
    pieces
        .into_iter()
        .filter_map(|piece| {
            let piece = toml::Spanned::new(doc.span(), piece);
            File::deserialize(toml::de::Deserializer::from(piece)).err()
        })
        .collect()
}

/// The dotted key of the deepest entry whose key or value holds `offset`, the way errors
/// name keys: `backends.blue.servers`, `routes[1].split`. A table written under a header
/// has a span that covers the header only, so every branch is searched, not only the one
/// whose span holds the offset.
fn key_at(doc: &toml::de::DeTable<'_>, offset: usize) -> String {
    let mut path = Vec::new();
    in_table(doc, offset, &mut path);
    let mut key = String::new();
    for part in path {
        if !key.is_empty() && !part.starts_with('[') {
            key.push('.');
        }
        key.push_str(&part);
    }
    key
}

fn in_table(table: &toml::de::DeTable<'_>, offset: usize, path: &mut Vec<String>) -> bool {
    for (name, value) in table.iter() {
        path.push(name.get_ref().to_string());
        if in_value(value.get_ref(), offset, path) || name.span().contains(&offset) || value.span().contains(&offset) {
            return true;
        }
        path.pop();
    }
    false
}

/// Whether `offset` lies in an entry somewhere inside `value` (the path then names it).
fn in_value(value: &toml::de::DeValue<'_>, offset: usize, path: &mut Vec<String>) -> bool {
    match value {
        toml::de::DeValue::Table(table) => in_table(table, offset, path),
        toml::de::DeValue::Array(items) => items.iter().enumerate().any(|(i, item)| {
            path.push(format!("[{i}]"));
            let found = in_value(item.get_ref(), offset, path) || item.span().contains(&offset);
            if !found {
                path.pop();
            }
            found
        }),
        _ => false,
    }
}

struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    fn new(text: &str) -> Self {
        let starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        LineIndex { starts }
    }

    /// 1-based line and column of a byte offset.
    fn locate(&self, offset: usize) -> (usize, usize) {
        let line = self.starts.partition_point(|&s| s <= offset);
        let start = self.starts.get(line.saturating_sub(1)).copied().unwrap_or(0);
        (line.max(1), offset - start + 1)
    }
}

struct Validator {
    lines: LineIndex,
    errors: Vec<ConfigError>,
}

impl Validator {
    fn located(&self, key: &str, span: Range<usize>, message: String) -> ConfigError {
        let (line, column) = self.lines.locate(span.start);
        ConfigError { key: key.to_string(), line, column, message }
    }

    fn error(&mut self, key: &str, span: Range<usize>, message: impl Into<String>) {
        let e = self.located(key, span, message.into());
        self.errors.push(e);
    }

    fn duration(&mut self, key: &str, value: Option<&Located<String>>, default: Duration) -> Duration {
        let Some(value) = value else { return default };
        match humantime::parse_duration(value.get_ref()) {
            // Deadlines are computed as now + duration: keep them far from overflow.
            Ok(d) if d > MAX_DURATION => {
                self.error(
                    key,
                    value.span(),
                    format!("{:?} is longer than a year; no timeout here needs that", value.get_ref()),
                );
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.error(
                    key,
                    value.span(),
                    format!("{:?} is not a duration ({e}); write e.g. \"250ms\", \"30s\", \"5m\"", value.get_ref()),
                );
                default
            }
        }
    }

    fn nonzero_duration(&mut self, key: &str, value: Option<&Located<String>>, default: Duration) -> Duration {
        let d = self.duration(key, value, default);
        if d.is_zero() {
            if let Some(value) = value {
                self.error(key, value.span(), "must be longer than zero");
            }
            return default;
        }
        d
    }

    fn percent(&mut self, key: &str, value: &Located<f64>) -> BasisPoints {
        let pct = *value.get_ref();
        let bps = (pct * 100.0).round();
        if !(0.0..=100.0).contains(&pct) || !pct.is_finite() {
            self.error(key, value.span(), format!("{pct} is not a percentage between 0 and 100"));
            0
        } else if (pct * 100.0 - bps).abs() > 1e-6 {
            self.error(key, value.span(), format!("{pct} has more than two decimals; the finest share is 0.01 %"));
            0
        } else {
            bps as BasisPoints
        }
    }

    fn pct(&mut self, key: &str, value: &Located<Percent>) -> BasisPoints {
        self.percent(key, &Located::new(value.span(), value.get_ref().0))
    }

    fn addr(&mut self, key: &str, value: &Located<String>) -> Option<SocketAddr> {
        match value.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.error(
                    key,
                    value.span(),
                    format!(
                        "{:?} is not an address; write IP:port, e.g. \"127.0.0.1:9001\" (host names are not resolved)",
                        value.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn name(&mut self, key: &str, value: &str, span: Range<usize>) {
        if value.is_empty() {
            self.error(key, span, "must not be empty");
        } else if !value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
            self.error(key, span, format!("{value:?} is not a valid name: {NAME_RULE}"));
        }
    }

    fn header_name(&mut self, key: &str, value: &Located<String>) -> Option<HeaderName> {
        match HeaderName::from_bytes(value.get_ref().as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.error(key, value.span(), format!("{:?} is not a valid header name", value.get_ref()));
                None
            }
        }
    }

    fn config(&mut self, file: &File) -> Config {
        let listen = self.listen(&file.listen);
        let runtime = Runtime { worker_threads: file.runtime.worker_threads.unwrap_or(0) };
        let admin = self.admin(&file.admin);
        let defaults = self.defaults(&file.defaults);
        let backends: Vec<BackendSpec> = file.backends.iter().map(|(name, b)| self.backend(name, b)).collect();
        let names: HashSet<&str> = backends.iter().map(|b| b.name.as_str()).collect();

        let mut routes = Vec::with_capacity(file.routes.len());
        let mut seen = HashSet::new();
        for (i, route) in file.routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            let name = route.get_ref().name.get_ref();
            if !seen.insert(name.as_str()) {
                self.error(
                    &format!("{key}.name"),
                    route.get_ref().name.span(),
                    format!("a route named {name:?} is already defined; route names must be unique"),
                );
            }
            routes.push(self.route(&key, route, &names, &defaults));
        }
        if file.routes.is_empty() {
            self.error("routes", 0..0, "no [[routes]] defined: switchyard would answer 404 to everything");
        }
        Config { listen, runtime, admin, defaults, backends, routes }
    }

    fn listen(&mut self, file: &file::ListenFile) -> Listen {
        let http = file.http.as_ref().and_then(|a| self.addr("listen.http", a));
        if let Some(h) = &file.https {
            self.error(
                "listen.https",
                h.span(),
                "TLS listeners are not available yet: terminate TLS in front of switchyard for now",
            );
        }
        let https = file.https.as_ref().and_then(|h| {
            let h = h.get_ref();
            let addr = self.addr("listen.https.addr", &h.addr)?;
            Some(HttpsListen { addr, cert: PathBuf::from(h.cert.get_ref()), key: PathBuf::from(h.key.get_ref()) })
        });
        if file.http.is_none() && file.https.is_none() {
            let default: SocketAddr = ([0, 0, 0, 0], 8080).into();
            return Listen { http: Some(default), https: None };
        }
        Listen { http, https }
    }

    fn admin(&mut self, file: &file::AdminFile) -> Admin {
        let socket_mode = match &file.socket_mode {
            None => 0o600,
            Some(m) => match u32::from_str_radix(m.get_ref().trim_start_matches("0o"), 8) {
                Ok(mode) if mode <= 0o777 => mode,
                _ => {
                    self.error(
                        "admin.socket_mode",
                        m.span(),
                        format!("{:?} is not an octal file mode such as \"0600\"", m.get_ref()),
                    );
                    0o600
                }
            },
        };
        Admin {
            socket: PathBuf::from(file.socket.as_deref().unwrap_or("run/switchyard.sock")),
            socket_mode,
            http: file.http.as_ref().and_then(|a| self.addr("admin.http", a)),
            state_dir: PathBuf::from(file.state_dir.as_deref().unwrap_or("run/state")),
        }
    }

    fn defaults(&mut self, file: &file::DefaultsFile) -> Defaults {
        let d = Defaults::default();
        let max_request_header_bytes = match &file.max_request_header_bytes {
            None => d.max_request_header_bytes,
            Some(n) if (1024..=1 << 20).contains(n.get_ref()) => *n.get_ref() as usize,
            Some(n) => {
                self.error(
                    "defaults.max_request_header_bytes",
                    n.span(),
                    format!("{} is out of range: between 1024 and 1048576", n.get_ref()),
                );
                d.max_request_header_bytes
            }
        };
        Defaults {
            connect_timeout: self.nonzero_duration(
                "defaults.connect_timeout",
                file.connect_timeout.as_ref(),
                d.connect_timeout,
            ),
            request_timeout: self.nonzero_duration(
                "defaults.request_timeout",
                file.request_timeout.as_ref(),
                d.request_timeout,
            ),
            idle_timeout: self.nonzero_duration("defaults.idle_timeout", file.idle_timeout.as_ref(), d.idle_timeout),
            header_read_timeout: self.nonzero_duration(
                "defaults.header_read_timeout",
                file.header_read_timeout.as_ref(),
                d.header_read_timeout,
            ),
            stream_idle_timeout: self.nonzero_duration(
                "defaults.stream_idle_timeout",
                file.stream_idle_timeout.as_ref(),
                d.stream_idle_timeout,
            ),
            upstream_idle_timeout: self.nonzero_duration(
                "defaults.upstream_idle_timeout",
                file.upstream_idle_timeout.as_ref(),
                d.upstream_idle_timeout,
            ),
            drain_timeout: self.duration("defaults.drain_timeout", file.drain_timeout.as_ref(), d.drain_timeout),
            shutdown_delay: self.duration("defaults.shutdown_delay", file.shutdown_delay.as_ref(), d.shutdown_delay),
            max_request_header_bytes,
        }
    }

    fn backend(&mut self, name: &str, file: &Located<file::BackendFile>) -> BackendSpec {
        let key = format!("backends.{name}");
        self.name(&key, name, file.span());
        let b = file.get_ref();
        let mut servers = Vec::new();
        if b.servers.get_ref().is_empty() {
            self.error(&format!("{key}.servers"), b.servers.span(), "a backend needs at least one server");
        }
        for (i, s) in b.servers.get_ref().iter().enumerate() {
            let skey = format!("{key}.servers[{i}]");
            if let Some(addr) = self.addr(&skey, s) {
                if servers.contains(&addr) {
                    self.error(&skey, s.span(), format!("{addr} is listed twice"));
                } else {
                    servers.push(addr);
                }
            }
        }
        let health = b.health.as_ref().map(|h| self.health(&format!("{key}.health"), h.get_ref()));
        let d = Outlier::default();
        let outlier = match &b.outlier {
            None => d,
            Some(o) => {
                let okey = format!("{key}.outlier");
                let o = o.get_ref();
                let backoff = self.nonzero_duration(&format!("{okey}.backoff"), o.backoff.as_ref(), d.backoff);
                let max_backoff = self.nonzero_duration(
                    &format!("{okey}.max_backoff"),
                    o.max_backoff.as_ref(),
                    d.max_backoff.max(backoff),
                );
                if max_backoff < backoff {
                    if let Some(m) = &o.max_backoff {
                        self.error(&format!("{okey}.max_backoff"), m.span(), "must not be shorter than backoff");
                    }
                }
                Outlier { failures: o.failures.unwrap_or(d.failures), backoff, max_backoff: max_backoff.max(backoff) }
            }
        };
        BackendSpec { name: name.to_string(), servers, version: b.version.clone(), health, outlier }
    }

    fn health(&mut self, key: &str, h: &file::HealthFile) -> HealthSpec {
        let path = match &h.path {
            Some(p) if !p.get_ref().starts_with('/') => {
                self.error(&format!("{key}.path"), p.span(), "must start with '/'");
                "/health".to_string()
            }
            Some(p) => p.get_ref().clone(),
            None => "/health".to_string(),
        };
        let interval = self.nonzero_duration(&format!("{key}.interval"), h.interval.as_ref(), Duration::from_secs(2));
        let timeout = self.nonzero_duration(&format!("{key}.timeout"), h.timeout.as_ref(), Duration::from_secs(1));
        let mut count = |field: &str, v: &Option<Located<u32>>, default: u32| match v {
            Some(n) if *n.get_ref() == 0 => {
                self.error(&format!("{key}.{field}"), n.span(), "must be at least 1");
                default
            }
            Some(n) => *n.get_ref(),
            None => default,
        };
        let rise = count("rise", &h.rise, 2);
        let fall = count("fall", &h.fall, 3);
        let expect_status = match &h.expect_status {
            Some(s) if !(100..=599).contains(s.get_ref()) => {
                self.error(&format!("{key}.expect_status"), s.span(), format!("{} is not an HTTP status", s.get_ref()));
                200
            }
            Some(s) => *s.get_ref(),
            None => 200,
        };
        HealthSpec { path, interval, timeout, rise, fall, expect_status, expect_body: h.expect_body.clone() }
    }

    fn route(
        &mut self,
        key: &str,
        file: &Located<file::RouteFile>,
        backends: &HashSet<&str>,
        defaults: &Defaults,
    ) -> RouteSpec {
        let r = file.get_ref();
        self.name(&format!("{key}.name"), r.name.get_ref(), r.name.span());

        let mut hosts = Vec::new();
        for (i, h) in r.hosts.iter().flatten().enumerate() {
            if let Some(p) = self.host(&format!("{key}.hosts[{i}]"), h) {
                hosts.push(p);
            }
        }

        let path_prefix = match &r.path_prefix {
            Some(p) if !p.get_ref().starts_with('/') => {
                self.error(&format!("{key}.path_prefix"), p.span(), format!("{:?} must start with '/'", p.get_ref()));
                "/".to_string()
            }
            Some(p) => p.get_ref().clone(),
            None => "/".to_string(),
        };

        let split = self.split(&format!("{key}.split"), &r.split, backends);

        let sticky = r.sticky.as_ref().and_then(|s| {
            let skey = format!("{key}.sticky");
            match (&s.get_ref().header, &s.get_ref().cookie) {
                (Some(h), None) => self.header_name(&format!("{skey}.header"), h).map(Sticky::Header),
                (None, Some(c)) => {
                    let valid = !c.get_ref().is_empty()
                        && c.get_ref().bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                    if !valid {
                        self.error(
                            &format!("{skey}.cookie"),
                            c.span(),
                            format!("{:?} is not a valid cookie name", c.get_ref()),
                        );
                    }
                    valid.then(|| Sticky::Cookie(c.get_ref().clone()))
                }
                _ => {
                    self.error(&skey, s.span(), "give exactly one of `header` or `cookie`");
                    None
                }
            }
        });

        let override_header =
            r.override_header.as_ref().and_then(|h| self.header_name(&format!("{key}.override_header"), h));
        let mirror = r.mirror.as_ref().map(|m| self.mirror(&format!("{key}.mirror"), m, backends));
        let rollout = r.rollout.as_ref().map(|ro| self.rollout(&format!("{key}.rollout"), ro, backends));
        let request_timeout = self.nonzero_duration(
            &format!("{key}.request_timeout"),
            r.request_timeout.as_ref(),
            defaults.request_timeout,
        );

        RouteSpec {
            name: r.name.get_ref().clone(),
            hosts,
            path_prefix,
            split,
            request_timeout,
            sticky,
            override_header,
            mirror,
            rollout,
        }
    }

    fn host(&mut self, key: &str, h: &Located<String>) -> Option<HostPattern> {
        let host = h.get_ref().to_ascii_lowercase();
        let (pattern, name) = match host.strip_prefix("*.") {
            Some(rest) => (HostPattern::Suffix(format!(".{rest}")), rest),
            None => (HostPattern::Exact(host.clone()), host.as_str()),
        };
        let valid = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !valid {
            self.error(
                key,
                h.span(),
                format!("{:?} is not a host name; write \"example.com\" or \"*.example.com\" (no port)", h.get_ref()),
            );
            return None;
        }
        Some(pattern)
    }

    fn split(
        &mut self,
        key: &str,
        split: &Located<file::SplitFile>,
        backends: &HashSet<&str>,
    ) -> Vec<(String, BasisPoints)> {
        let mut out = Vec::new();
        let mut total: BasisPoints = 0;
        for (name, pct) in &split.get_ref().0 {
            let ekey = format!("{key}.{name}");
            if !backends.contains(name.as_str()) {
                self.error(&ekey, pct.span(), format!("no backend named {name:?}; define [backends.{name}]"));
            }
            let bps = self.percent(&ekey, pct);
            total += bps;
            out.push((name.clone(), bps));
        }
        // One canonical order (by name), so that splits compare as the sets they are.
        out.sort();
        if out.is_empty() {
            self.error(key, split.span(), "a split needs at least one backend");
        } else if total != ALL {
            self.error(key, split.span(), format!("shares sum to {} %, they must sum to 100", total as f64 / 100.0));
        }
        out
    }

    fn mirror(&mut self, key: &str, m: &Located<file::MirrorFile>, backends: &HashSet<&str>) -> MirrorSpec {
        let f = m.get_ref();
        if !backends.contains(f.backend.get_ref().as_str()) {
            self.error(
                &format!("{key}.backend"),
                f.backend.span(),
                format!("no backend named {:?}", f.backend.get_ref()),
            );
        }
        let max_body = match &f.max_body {
            None => 1 << 20,
            Some(s) => parse_size(s.get_ref()).unwrap_or_else(|| {
                self.error(
                    &format!("{key}.max_body"),
                    s.span(),
                    format!("{:?} is not a size; write e.g. \"64KiB\", \"1MiB\"", s.get_ref()),
                );
                1 << 20
            }),
        };
        let max_in_flight = match &f.max_in_flight {
            Some(n) if *n.get_ref() == 0 => {
                self.error(&format!("{key}.max_in_flight"), n.span(), "must be at least 1");
                64
            }
            Some(n) => *n.get_ref(),
            None => 64,
        };
        MirrorSpec {
            backend: f.backend.get_ref().clone(),
            percent: self.pct(&format!("{key}.percent"), &f.percent),
            compare: f.compare,
            max_body,
            max_in_flight,
            timeout: self.nonzero_duration(&format!("{key}.timeout"), f.timeout.as_ref(), Duration::from_secs(5)),
            ignore_headers: f
                .ignore_headers
                .iter()
                .filter_map(|h| self.header_name(&format!("{key}.ignore_headers"), h))
                .collect(),
            ignore_json_fields: f.ignore_json_fields.clone(),
        }
    }

    fn rollout(&mut self, key: &str, ro: &Located<file::RolloutFile>, backends: &HashSet<&str>) -> RolloutSpec {
        let f = ro.get_ref();
        let strategy = match f.strategy.get_ref().as_str() {
            "canary" => Strategy::Canary,
            "blue-green" => Strategy::BlueGreen,
            other => {
                self.error(
                    &format!("{key}.strategy"),
                    f.strategy.span(),
                    format!("{other:?} is not a strategy: \"canary\" or \"blue-green\""),
                );
                Strategy::Canary
            }
        };
        for (field, side) in [("stable", &f.stable), ("canary", &f.canary)] {
            if !backends.contains(side.get_ref().as_str()) {
                self.error(&format!("{key}.{field}"), side.span(), format!("no backend named {:?}", side.get_ref()));
            }
        }
        if f.stable.get_ref() == f.canary.get_ref() {
            self.error(
                &format!("{key}.canary"),
                f.canary.span(),
                "the canary must be a different backend from the stable one",
            );
        }

        let mut steps = Vec::new();
        match (&f.steps, strategy) {
            (None, Strategy::Canary) => self.error(key, ro.span(), "a canary rollout needs `steps`"),
            (Some(s), Strategy::Canary) if s.get_ref().is_empty() => {
                self.error(&format!("{key}.steps"), s.span(), "a canary rollout needs at least one step")
            }
            (Some(s), Strategy::Canary) => {
                let list = s.get_ref();
                let mut previous = 0;
                for (i, step) in list.iter().enumerate() {
                    let skey = format!("{key}.steps[{i}]");
                    let weight = self.pct(&format!("{skey}.weight"), &step.get_ref().weight);
                    if weight <= previous {
                        self.error(
                            &format!("{skey}.weight"),
                            step.get_ref().weight.span(),
                            "step weights must rise, each above the one before",
                        );
                    }
                    previous = weight;
                    let last = i + 1 == list.len();
                    let hold = match (&step.get_ref().hold, last) {
                        (Some(h), _) => {
                            Some(self.nonzero_duration(&format!("{skey}.hold"), Some(h), Duration::from_secs(60)))
                        }
                        (None, false) => {
                            self.error(&skey, step.span(), "every step but the last needs a `hold`");
                            None
                        }
                        (None, true) => None,
                    };
                    steps.push(Step { weight, hold });
                }
                if previous != ALL {
                    self.error(&format!("{key}.steps"), s.span(), "the last step must have weight 100");
                }
            }
            (Some(s), Strategy::BlueGreen) if !s.get_ref().is_empty() => {
                self.error(
                    &format!("{key}.steps"),
                    s.span(),
                    "blue-green has no steps: it switches to 100 % once the new side is healthy",
                );
            }
            (_, Strategy::BlueGreen) => {}
        }
        if strategy == Strategy::BlueGreen {
            steps = vec![Step { weight: ALL, hold: None }];
        }

        let analysis = match &f.analysis {
            None => Analysis {
                window: Duration::from_secs(60),
                min_requests: 50,
                max_error_rate: Some(100),
                max_p99: None,
                max_error_rate_over_stable: None,
                max_p99_over_stable: None,
            },
            Some(a) => {
                let akey = format!("{key}.analysis");
                let a = a.get_ref();
                Analysis {
                    window: self.nonzero_duration(
                        &format!("{akey}.window"),
                        a.window.as_ref(),
                        Duration::from_secs(60),
                    ),
                    min_requests: a.min_requests.unwrap_or(50),
                    max_error_rate: a.max_error_rate.as_ref().map(|p| self.pct(&format!("{akey}.max_error_rate"), p)),
                    max_p99: a
                        .max_p99
                        .as_ref()
                        .map(|d| self.nonzero_duration(&format!("{akey}.max_p99"), Some(d), Duration::ZERO)),
                    max_error_rate_over_stable: a
                        .max_error_rate_over_stable
                        .as_ref()
                        .map(|p| self.pct(&format!("{akey}.max_error_rate_over_stable"), p)),
                    max_p99_over_stable: a
                        .max_p99_over_stable
                        .as_ref()
                        .map(|d| self.duration(&format!("{akey}.max_p99_over_stable"), Some(d), Duration::ZERO)),
                }
            }
        };

        RolloutSpec {
            strategy,
            stable: f.stable.get_ref().clone(),
            canary: f.canary.get_ref().clone(),
            steps,
            analysis,
            cleanup: self.duration(&format!("{key}.cleanup"), f.cleanup.as_ref(), Duration::from_secs(300)),
            progress_deadline: self.nonzero_duration(
                &format!("{key}.progress_deadline"),
                f.progress_deadline.as_ref(),
                Duration::from_secs(600),
            ),
        }
    }

    /// Routes that can never match because an earlier route takes all their requests, and
    /// mirrors whose shadow also serves the route (it would get sampled requests twice).
    fn warnings(&self, file: &File, config: &Config) -> Vec<Warning> {
        let mut out = Vec::new();
        for (i, route) in config.routes.iter().enumerate() {
            let (Some(mirror), Some(located)) = (&route.mirror, &file.routes[i].get_ref().mirror) else { continue };
            let serves = route.split.iter().any(|(b, w)| *b == mirror.backend && *w > 0)
                || route.rollout.as_ref().is_some_and(|r| r.stable == mirror.backend || r.canary == mirror.backend);
            if serves {
                out.push(self.located(
                    &format!("routes[{i}].mirror.backend"),
                    located.span(),
                    format!(
                        "route {:?} mirrors to {:?}, which also serves it: its sampled requests reach that backend twice",
                        route.name, mirror.backend
                    ),
                ));
            }
        }
        for (i, later) in config.routes.iter().enumerate() {
            if let Some(earlier) = config.routes[..i].iter().find(|e| shadows(e, later)) {
                out.push(self.located(
                    &format!("routes[{i}]"),
                    file.routes[i].span(),
                    format!(
                        "route {:?} is never reached: the earlier route {:?} matches every request it would",
                        later.name, earlier.name
                    ),
                ));
            }
        }
        out
    }
}

/// Whether every request `later` matches is matched by `earlier` first.
fn shadows(earlier: &RouteSpec, later: &RouteSpec) -> bool {
    let hosts_covered = earlier.hosts.is_empty()
        || (!later.hosts.is_empty()
            && later.hosts.iter().all(|l| {
                earlier.hosts.iter().any(|e| match (e, l) {
                    (HostPattern::Exact(a), HostPattern::Exact(b)) => a == b,
                    (HostPattern::Suffix(a), HostPattern::Exact(b)) => b.ends_with(a.as_str()),
                    (HostPattern::Suffix(a), HostPattern::Suffix(b)) => b.ends_with(a.as_str()),
                    (HostPattern::Exact(_), HostPattern::Suffix(_)) => false,
                })
            }));
    hosts_covered && crate::routes::prefix_matches(&earlier.path_prefix, &later.path_prefix)
}

/// "64KiB", "1MiB", "1MB", "512" (bytes).
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[listen]
http = "127.0.0.1:8080"

[backends.blue]
servers = ["127.0.0.1:9001", "127.0.0.1:9002"]

[backends.green]
servers = ["127.0.0.1:9101"]
version = "v2"

[[routes]]
name = "agent"
split = { blue = 99.95, green = 0.05 }
"#;

    fn errors(text: &str) -> Vec<ConfigError> {
        match parse(text) {
            Ok(_) => panic!("config was accepted:\n{text}"),
            Err(e) => e,
        }
    }

    #[test]
    fn a_good_config_gives_basis_points_and_defaults() {
        let c = parse(BASE).expect("valid").config;
        assert_eq!(c.routes[0].split, vec![("blue".into(), 9995), ("green".into(), 5)]);
        let reordered =
            parse(&BASE.replace("blue = 99.95, green = 0.05", "green = 0.05, blue = 99.95")).expect("valid").config;
        assert_eq!(reordered.routes[0].split, c.routes[0].split, "splits are sets, whatever the order written");
        assert_eq!(c.routes[0].path_prefix, "/");
        assert_eq!(c.routes[0].request_timeout, Duration::from_secs(60));
        assert_eq!(c.defaults, Defaults::default());
        assert_eq!(c.summary(), "1 route, 2 backends (3 servers), listening on http 127.0.0.1:8080");
    }

    #[test]
    fn every_error_is_reported_with_its_place() {
        let text = r#"
[backends.blue]
servers = ["127.0.0.1:9001", "nowhere"]

[backends.empty]
servers = []

[[routes]]
name = "a"
split = { blue = 90, ghost = 5 }

[[routes]]
name = "a"
split = { blue = 100 }
request_timeout = "forever"
"#;
        let e = errors(text);
        let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "backends.blue.servers[1]",
                "backends.empty.servers",
                "routes[0].split",
                "routes[0].split.ghost",
                "routes[1].name",
                "routes[1].request_timeout"
            ]
        );
        let ghost = &e[3];
        assert_eq!((ghost.line, ghost.column), (10, 30));
        assert!(ghost.message.contains("no backend named \"ghost\""));
        assert!(e[2].message.contains("sum to 95 %"), "{}", e[2].message);
    }

    #[test]
    fn unknown_keys_are_errors_with_a_line() {
        let e = errors(&BASE.replace("version = \"v2\"", "version = \"v2\"\nweight = 3"));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].line, 11);
        assert!(e[0].message.contains("unknown field `weight`"), "{}", e[0].message);
    }

    #[test]
    fn type_unknown_and_missing_key_errors_name_the_key() {
        let cases = [
            ("[backends.blue]\nservers = \"127.0.0.1:1\"\n", "backends.blue.servers"),
            ("[backends.blue]\nservers = [\"127.0.0.1:1\"]\ncolour = \"red\"\n", "backends.blue.colour"),
            ("[listen]\nbogus = 1\n", "listen.bogus"),
            (
                "[backends.blue]\nservers = [\"127.0.0.1:1\"]\n[[routes]]\nname = \"a\"\nsplit = { blue = 100 }\n[[routes]]\nname = \"b\"\n",
                "routes[1]",
            ),
            ("[defaults]\nmax_request_header_bytes = -1\n", "defaults.max_request_header_bytes"),
        ];
        for (text, key) in cases {
            let e = errors(text);
            assert_eq!(e[0].key, key, "{text}\n{}", e[0].message);
        }
        // A syntax error has no document to place it in: the text at the error names it.
        let e = errors("[backends.blue]\nservers = [\"127.0.0.1:1\"]\nservers = [\"127.0.0.1:2\"]\n");
        assert_eq!((e[0].key.as_str(), e[0].line), ("servers", 3), "{}", e[0].message);
    }

    #[test]
    fn every_type_unknown_and_missing_key_error_is_listed() {
        let text = r#"
[listen]
http = "127.0.0.1:8080"
bogus = 1

[backends.blue]
servers = ["127.0.0.1:9001"]
colour = "red"

[backends.green]
servers = "127.0.0.1:9002"

[[routes]]
name = "a"
split = { blue = 100 }

[[routes]]
name = "b"

[[routes]]
name = "c"
split = { blue = 100 }
request_timeout = 30
"#;
        let e = errors(text);
        let found: Vec<(&str, usize)> = e.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert_eq!(
            found,
            [
                ("listen.bogus", 4),
                ("backends.blue.colour", 8),
                ("backends.green.servers", 11),
                ("routes[1]", 17),
                ("routes[2].request_timeout", 23)
            ],
            "{e:#?}"
        );
        assert!(e[3].message.contains("missing field `split`"), "{}", e[3].message);
    }

    #[test]
    fn percentages_take_two_decimals_at_most() {
        let e = errors(&BASE.replace("99.95, green = 0.05", "99.995, green = 0.005"));
        assert!(e.iter().any(|e| e.message.contains("more than two decimals")));
    }

    #[test]
    fn rollouts_need_existing_distinct_sides_and_rising_steps() {
        let text = format!(
            "{BASE}\n[routes.rollout]\nstrategy = \"canary\"\nstable = \"blue\"\ncanary = \"purple\"\nsteps = [{{ weight = 50, hold = \"1m\" }}, {{ weight = 20, hold = \"1m\" }}]\n"
        );
        let e = errors(&text);
        let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
        assert!(keys.contains(&"routes[0].rollout.canary"), "{keys:?}");
        assert!(keys.contains(&"routes[0].rollout.steps[1].weight"), "{keys:?}");
        assert!(keys.contains(&"routes[0].rollout.steps"), "{keys:?}");
    }

    #[test]
    fn a_shadowed_route_is_a_warning() {
        let text = format!("{BASE}\n[[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nsplit = {{ blue = 100 }}\n");
        let w = parse(&text).expect("valid").warnings;
        assert_eq!(w.len(), 1);
        assert!(w[0].message.contains("\"api\" is never reached"));
    }

    #[test]
    fn a_mirror_to_a_backend_of_the_route_is_a_warning() {
        let text = format!("{BASE}mirror = {{ backend = \"blue\", percent = 5 }}\n");
        let w = parse(&text).expect("valid").warnings;
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].key, "routes[0].mirror.backend");
        assert!(w[0].message.contains("also serves it"), "{}", w[0].message);
    }

    #[test]
    fn absurd_durations_are_refused() {
        let e = errors(&format!("[defaults]\nstream_idle_timeout = \"300000000000y\"\n{BASE}"));
        assert!(
            e[0].message.contains("longer than a year") || e[0].message.contains("not a duration"),
            "{}",
            e[0].message
        );
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("64KiB"), Some(65536));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("lots"), None);
    }
}
