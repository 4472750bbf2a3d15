//! The TOML file as serde sees it: a faithful mirror of what the operator wrote, with the
//! source span of every value that validation may need to point at. Nothing here is checked
//! beyond its TOML type; `validate` turns it into the types the rest of switchyard uses.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use toml::Spanned;

/// A value with the byte range it came from.
pub type Located<T> = Spanned<T>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    #[serde(default)]
    pub listen: ListenFile,
    #[serde(default)]
    pub runtime: RuntimeFile,
    #[serde(default)]
    pub admin: AdminFile,
    #[serde(default)]
    pub defaults: DefaultsFile,
    #[serde(default)]
    pub backends: BTreeMap<String, Located<BackendFile>>,
    #[serde(default)]
    pub routes: Vec<Located<RouteFile>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenFile {
    pub http: Option<Located<String>>,
    pub https: Option<Located<HttpsFile>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpsFile {
    pub addr: Located<String>,
    pub cert: Located<String>,
    pub key: Located<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeFile {
    pub worker_threads: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    pub socket: Option<String>,
    pub socket_mode: Option<Located<String>>,
    pub http: Option<Located<String>>,
    pub state_dir: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultsFile {
    pub connect_timeout: Option<Located<String>>,
    pub request_timeout: Option<Located<String>>,
    pub idle_timeout: Option<Located<String>>,
    pub header_read_timeout: Option<Located<String>>,
    pub stream_idle_timeout: Option<Located<String>>,
    pub upstream_idle_timeout: Option<Located<String>>,
    pub drain_timeout: Option<Located<String>>,
    pub shutdown_delay: Option<Located<String>>,
    pub max_request_header_bytes: Option<Located<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendFile {
    pub servers: Located<Vec<Located<String>>>,
    pub version: Option<String>,
    pub health: Option<Located<HealthFile>>,
    pub outlier: Option<Located<OutlierFile>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierFile {
    pub failures: Option<u32>,
    pub backoff: Option<Located<String>>,
    pub max_backoff: Option<Located<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthFile {
    pub path: Option<Located<String>>,
    pub interval: Option<Located<String>>,
    pub timeout: Option<Located<String>>,
    pub rise: Option<Located<u32>>,
    pub fall: Option<Located<u32>>,
    pub expect_status: Option<Located<u16>>,
    pub expect_body: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub name: Located<String>,
    pub hosts: Option<Vec<Located<String>>>,
    pub path_prefix: Option<Located<String>>,
    pub split: Located<SplitFile>,
    pub request_timeout: Option<Located<String>>,
    pub sticky: Option<Located<StickyFile>>,
    pub override_header: Option<Located<String>>,
    pub mirror: Option<Located<MirrorFile>>,
    pub rollout: Option<Located<RolloutFile>>,
}

/// `split = { blue = 90, green = 10 }`. Entries are kept as a list (not a map) so that a
/// backend named twice can be reported; bucket order is decided by the route table.
#[derive(Debug, Default)]
pub struct SplitFile(pub Vec<(String, Located<f64>)>);

impl<'de> Deserialize<'de> for SplitFile {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SplitVisitor;
        impl<'de> Visitor<'de> for SplitVisitor {
            type Value = SplitFile;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a table of backend = percentage")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SplitFile, A::Error> {
                let mut entries = Vec::new();
                while let Some((name, pct)) = map.next_entry::<String, Located<Percent>>()? {
                    let span = pct.span();
                    entries.push((name, Located::new(span, pct.into_inner().0)));
                }
                Ok(SplitFile(entries))
            }
        }
        deserializer.deserialize_map(SplitVisitor)
    }
}

/// A percentage written as an integer or a float (`5` or `0.05`).
#[derive(Debug, Clone, Copy)]
pub struct Percent(pub f64);

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Number {
            Int(i64),
            Float(f64),
        }
        Ok(match Number::deserialize(deserializer)? {
            Number::Int(i) => Percent(i as f64),
            Number::Float(f) => Percent(f),
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StickyFile {
    pub header: Option<Located<String>>,
    pub cookie: Option<Located<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorFile {
    pub backend: Located<String>,
    pub percent: Located<Percent>,
    #[serde(default)]
    pub compare: bool,
    pub max_body: Option<Located<String>>,
    pub max_in_flight: Option<Located<u32>>,
    pub timeout: Option<Located<String>>,
    #[serde(default)]
    pub ignore_headers: Vec<Located<String>>,
    #[serde(default)]
    pub ignore_json_fields: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutFile {
    pub strategy: Located<String>,
    pub stable: Located<String>,
    pub canary: Located<String>,
    pub steps: Option<Located<Vec<Located<StepFile>>>>,
    pub analysis: Option<Located<AnalysisFile>>,
    pub cleanup: Option<Located<String>>,
    pub progress_deadline: Option<Located<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepFile {
    pub weight: Located<Percent>,
    pub hold: Option<Located<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalysisFile {
    pub window: Option<Located<String>>,
    pub min_requests: Option<u64>,
    pub max_error_rate: Option<Located<Percent>>,
    pub max_p99: Option<Located<String>>,
    pub max_error_rate_over_stable: Option<Located<Percent>>,
    pub max_p99_over_stable: Option<Located<String>>,
}
