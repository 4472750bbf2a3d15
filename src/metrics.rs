//! `/metrics` in the Prometheus text format.
//!
//! The hot path records into [`Traffic`]: per route and backend, a counter per status code
//! and a latency histogram, all atomics. Everything else (weights, health, in-flight
//! counts, rollouts, mirrors, reloads) is read when scraped: the control path builds the
//! families ([`Families`]) from the table and its own state, and the `prometheus` crate
//! encodes them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::StatusCode;
use prometheus::proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Encoder as _, TextEncoder};

/// Upper bounds of `switchyard_request_duration_seconds`, in seconds: from a fast answer
/// to a long-poll's response head.
pub const DURATION_BUCKETS: [f64; 14] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0];

/// Status codes counted one by one: every code the `http` crate can hold.
const CODES: std::ops::RangeInclusive<u16> = 100..=999;

/// Requests of one route to one backend since start: by the status the client got, and
/// the time to the response head of those a server answered. Recorded on the hot path, so
/// atomics only and no allocation.
#[derive(Debug)]
pub struct Traffic {
    codes: Box<[AtomicU64]>,
    /// Observations per bucket (not cumulative); the last counts those above every bound.
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Default for Traffic {
    fn default() -> Self {
        Traffic {
            codes: CODES.map(|_| AtomicU64::new(0)).collect(),
            buckets: Default::default(),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl Traffic {
    /// One request answered with `status`; `latency` to the response head when a server
    /// answered (switchyard's own error answers have none).
    #[inline]
    pub fn record(&self, status: StatusCode, latency: Option<Duration>) {
        let code = status.as_u16().clamp(*CODES.start(), *CODES.end());
        self.codes[usize::from(code - CODES.start())].fetch_add(1, Ordering::Relaxed);
        if let Some(latency) = latency {
            let secs = latency.as_secs_f64();
            let bucket = DURATION_BUCKETS.iter().position(|&b| secs <= b).unwrap_or(DURATION_BUCKETS.len());
            self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
            self.sum_micros.fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
        }
    }

    /// (code, count) for every code seen.
    pub fn codes(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        CODES.zip(self.codes.iter()).map(|(c, n)| (c, n.load(Ordering::Relaxed))).filter(|&(_, n)| n > 0)
    }

    /// Cumulative counts per bound, the count and the sum in seconds.
    fn histogram(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut total = 0;
        let mut cumulative = Vec::with_capacity(DURATION_BUCKETS.len());
        for (bound, n) in DURATION_BUCKETS.iter().zip(&self.buckets) {
            total += n.load(Ordering::Relaxed);
            cumulative.push((*bound, total));
        }
        total += self.buckets[DURATION_BUCKETS.len()].load(Ordering::Relaxed);
        (cumulative, total, self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6)
    }
}

/// The metric families of one scrape, by name.
#[derive(Debug, Default)]
pub struct Families(BTreeMap<&'static str, MetricFamily>);

impl Families {
    fn push(&mut self, name: &'static str, help: &str, kind: MetricType, labels: &[(&str, &str)], fill: Metric) {
        let family = self.0.entry(name).or_insert_with(|| {
            let mut f = MetricFamily::default();
            f.set_name(name.to_string());
            f.set_help(help.to_string());
            f.set_field_type(kind);
            f
        });
        let mut metric = fill;
        metric.set_label(
            labels
                .iter()
                .map(|(k, v)| {
                    let mut pair = LabelPair::default();
                    pair.set_name(k.to_string());
                    pair.set_value(v.to_string());
                    pair
                })
                .collect(),
        );
        family.mut_metric().push(metric);
    }

    pub fn counter(&mut self, name: &'static str, help: &str, labels: &[(&str, &str)], value: u64) {
        let mut counter = Counter::default();
        counter.set_value(value as f64);
        let mut metric = Metric::default();
        metric.set_counter(counter);
        self.push(name, help, MetricType::COUNTER, labels, metric);
    }

    pub fn gauge(&mut self, name: &'static str, help: &str, labels: &[(&str, &str)], value: f64) {
        let mut gauge = Gauge::default();
        gauge.set_value(value);
        let mut metric = Metric::default();
        metric.set_gauge(gauge);
        self.push(name, help, MetricType::GAUGE, labels, metric);
    }

    /// `switchyard_requests_total` and (when `timed`: a server was asked)
    /// `switchyard_request_duration_seconds` of one route and backend.
    pub fn traffic(&mut self, route: &str, backend: &str, traffic: &Traffic, timed: bool) {
        let labels = [("route", route), ("backend", backend)];
        for (code, n) in traffic.codes() {
            let code = code.to_string();
            self.counter(
                "switchyard_requests_total",
                "Requests by route, backend and the status the client got",
                &[("route", route), ("backend", backend), ("code", &code)],
                n,
            );
        }
        if !timed {
            return;
        }
        let (cumulative, count, sum) = traffic.histogram();
        let mut histogram = Histogram::default();
        histogram.set_sample_count(count);
        histogram.set_sample_sum(sum);
        histogram.set_bucket(
            cumulative
                .into_iter()
                .map(|(bound, n)| {
                    let mut bucket = Bucket::default();
                    bucket.set_upper_bound(bound);
                    bucket.set_cumulative_count(n);
                    bucket
                })
                .collect(),
        );
        let mut metric = Metric::default();
        metric.set_histogram(histogram);
        self.push(
            "switchyard_request_duration_seconds",
            "Time to the response head of requests a server answered",
            MetricType::HISTOGRAM,
            &labels,
            metric,
        );
    }

    /// The text exposition format.
    pub fn encode(self) -> String {
        let families: Vec<MetricFamily> = self.0.into_values().filter(|f| !f.get_metric().is_empty()).collect();
        let mut out = Vec::new();
        match TextEncoder::new().encode(&families, &mut out) {
            Ok(()) => String::from_utf8(out).unwrap_or_default(),
            Err(e) => format!("# switchyard could not encode its metrics: {e}\n"),
        }
    }
}

/// A rollback's reason as a label of few values: what the rollout engine measured, or
/// `manual`.
pub fn rollback_reason(automatic: bool, reason: &str) -> &'static str {
    if !automatic {
        return "manual";
    }
    match reason {
        r if r.contains("over_stable") && r.starts_with("error rate") => "error_rate_over_stable",
        r if r.contains("over_stable") && r.starts_with("p99") => "p99_over_stable",
        r if r.starts_with("error rate") => "error_rate",
        r if r.starts_with("p99") => "p99",
        r if r.contains("progress_deadline") => "progress_deadline",
        r if r.contains("no server in rotation") => "unhealthy",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traffic_is_counted_by_code_and_bucket() {
        let t = Traffic::default();
        t.record(StatusCode::OK, Some(Duration::from_micros(800)));
        t.record(StatusCode::OK, Some(Duration::from_millis(30)));
        t.record(StatusCode::BAD_GATEWAY, None);
        t.record(StatusCode::OK, Some(Duration::from_secs(90)));
        assert_eq!(t.codes().collect::<Vec<_>>(), [(200, 3), (502, 1)]);
        let (cumulative, count, sum) = t.histogram();
        assert_eq!(count, 3, "only answers a server gave are timed");
        assert_eq!(cumulative[0], (0.001, 1));
        assert_eq!(cumulative.iter().find(|(b, _)| *b == 0.05).map(|&(_, n)| n), Some(2));
        assert_eq!(cumulative.last().map(|&(_, n)| n), Some(2), "90 s is above every bound");
        assert!((sum - 90.0308).abs() < 1e-6, "{sum}");
    }

    #[test]
    fn families_encode_as_prometheus_text() {
        let t = Traffic::default();
        t.record(StatusCode::OK, Some(Duration::from_millis(3)));
        let mut f = Families::default();
        f.traffic("agent", "blue", &t, true);
        f.gauge("switchyard_route_weight", "Weight", &[("route", "agent"), ("backend", "blue")], 90.0);
        let text = f.encode();
        assert!(text.contains("switchyard_requests_total{route=\"agent\",backend=\"blue\",code=\"200\"} 1"), "{text}");
        assert!(
            text.contains(
                "switchyard_request_duration_seconds_bucket{route=\"agent\",backend=\"blue\",le=\"0.005\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("switchyard_request_duration_seconds_count{route=\"agent\",backend=\"blue\"} 1"),
            "{text}"
        );
        assert!(text.contains("# TYPE switchyard_route_weight gauge"), "{text}");
    }

    #[test]
    fn rollback_reasons_have_few_values() {
        assert_eq!(rollback_reason(true, "error rate 33.33 % is over max_error_rate 5 %"), "error_rate");
        assert_eq!(rollback_reason(true, "p99 300ms is over max_p99 100ms"), "p99");
        assert_eq!(
            rollback_reason(
                true,
                "error rate 9 % is more than max_error_rate_over_stable 1 % over the stable side's 0 %"
            ),
            "error_rate_over_stable"
        );
        assert_eq!(
            rollback_reason(true, "the canary did not pass its health checks within progress_deadline 10m"),
            "progress_deadline"
        );
        assert_eq!(rollback_reason(false, "bad build"), "manual");
    }
}
