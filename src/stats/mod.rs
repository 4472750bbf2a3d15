//! What switchyard measures of each backend itself, for rollout analysis and `status`:
//! requests, failures the upstream caused, and latency to the response head, over a
//! sliding window.
//!
//! ```text
//! request ends ─► Stats::record(now, latency, failed)
//!                   slot = slots[(now / slot_len) % SLOTS]    (10 slots span the window)
//!                   3 relaxed atomic adds: requests, failures, one histogram bucket
//! analysis ─────► Stats::window(now): merges the slots still inside the window
//! ```
//!
//! Recording takes no lock: every counter is an atomic, and a slot that has aged out is
//! reset by whichever request first lands in it. A request recorded into a slot while
//! another thread resets it may be lost; that is a handful of samples per slot change, and
//! analysis needs a rate and a percentile, not an audit.
//!
//! The latency histogram has the layout of an HDR histogram with two significant digits
//! (values below 256 µs exact; above, 128 buckets per power of two, so a bucket is at most
//! 0.8 % wide), with atomic counters. The tests check its percentiles against the
//! `hdrhistogram` crate's.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

/// Slots the window is divided into: the window slides in steps of a tenth.
pub const SLOTS: usize = 10;

/// Sub-buckets per power of two, as a power of two: 2^7 = 128.
const SUB_BITS: u32 = 7;
/// Values below this are recorded exactly.
const EXACT: u64 = 1 << (SUB_BITS + 1);
/// The largest latency told apart, in µs (about 18 minutes); longer ones count as this.
const MAX_MICROS: u64 = (1 << 30) - 1;
const BUCKETS: usize = EXACT as usize + (30 - (SUB_BITS as usize + 1)) * (1 << SUB_BITS);

/// Where a latency in µs is counted.
#[inline]
fn bucket_of(micros: u64) -> usize {
    let v = micros.min(MAX_MICROS);
    if v < EXACT {
        return v as usize;
    }
    let top = 63 - v.leading_zeros(); // ≥ SUB_BITS + 1
    let shift = top - SUB_BITS;
    let sub = (v >> shift) as usize - (1 << SUB_BITS);
    EXACT as usize + (top - SUB_BITS - 1) as usize * (1 << SUB_BITS) + sub
}

/// The highest latency, in µs, that a bucket counts: percentiles are never understated.
fn bucket_top(index: usize) -> u64 {
    if index < EXACT as usize {
        return index as u64;
    }
    let above = index - EXACT as usize;
    let top = (above >> SUB_BITS) as u32 + SUB_BITS + 1;
    let sub = (above & ((1 << SUB_BITS) - 1)) as u64 + (1 << SUB_BITS);
    let shift = top - SUB_BITS;
    ((sub + 1) << shift) - 1
}

fn slot_ms(window: Duration) -> u64 {
    (window.as_millis() as u64 / SLOTS as u64).max(10)
}

/// Milliseconds since the first measurement of the process: the slots' clock.
fn millis(now: Instant) -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    now.saturating_duration_since(start).as_millis() as u64
}

/// One backend's measurements.
#[derive(Debug)]
pub struct Stats {
    slot_ms: u64,
    slots: Box<[Slot]>,
}

#[derive(Debug)]
struct Slot {
    /// Which tick of `slot_ms` the counts belong to, plus one (0: never used).
    tick: AtomicU64,
    requests: AtomicU64,
    failures: AtomicU64,
    latency: Box<[AtomicU32]>,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            tick: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            latency: (0..BUCKETS).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// Makes the slot count `tick`'s requests, resetting it if it held an older tick's.
    #[inline]
    fn enter(&self, tick: u64) {
        let held = self.tick.load(Ordering::Acquire);
        if held > tick {
            return;
        }
        if self.tick.compare_exchange(held, tick + 1, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            self.requests.store(0, Ordering::Relaxed);
            self.failures.store(0, Ordering::Relaxed);
            for count in self.latency.iter() {
                count.store(0, Ordering::Relaxed);
            }
        }
    }
}

/// A backend's figures over the window.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Summary {
    pub requests: u64,
    /// Failures the upstream caused: connect errors, resets, timeouts, 5xx.
    pub failures: u64,
    /// The span the figures cover (a little under the window while it slides).
    pub span: Duration,
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
}

impl Summary {
    /// Failures per request, in percent.
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            return 0.0;
        }
        self.failures as f64 * 100.0 / self.requests as f64
    }

    /// Requests per second.
    pub fn rate(&self) -> f64 {
        let secs = self.span.as_secs_f64();
        if secs == 0.0 {
            return 0.0;
        }
        self.requests as f64 / secs
    }

    pub fn to_json(&self) -> serde_json::Value {
        let ms = |d: Option<Duration>| d.map(|d| (d.as_secs_f64() * 1000.0 * 100.0).round() / 100.0);
        serde_json::json!({
            "requests": self.requests,
            "failures": self.failures,
            "rate": (self.rate() * 100.0).round() / 100.0,
            "error_rate": (self.error_rate() * 100.0).round() / 100.0,
            "p50_ms": ms(self.p50),
            "p99_ms": ms(self.p99),
        })
    }
}

impl Stats {
    /// Measurements over a sliding `window`, in [`SLOTS`] steps.
    pub fn new(window: Duration) -> Stats {
        let slot_ms = slot_ms(window);
        Stats { slot_ms, slots: (0..SLOTS).map(|_| Slot::new()).collect() }
    }

    /// The window these measurements slide over.
    pub fn window(&self) -> Duration {
        Duration::from_millis(self.slot_ms * SLOTS as u64)
    }

    /// The window that [`new`](Self::new) would make of `window` (rounded to whole slots).
    pub fn new_window(window: Duration) -> Duration {
        Duration::from_millis(slot_ms(window) * SLOTS as u64)
    }

    /// Records one request: its latency to the response head (or to its failure), and
    /// whether the upstream failed it.
    #[inline]
    pub fn record(&self, now: Instant, latency: Duration, failed: bool) {
        let tick = millis(now) / self.slot_ms;
        let slot = &self.slots[(tick % SLOTS as u64) as usize];
        slot.enter(tick);
        slot.requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            slot.failures.fetch_add(1, Ordering::Relaxed);
        }
        let micros = latency.as_micros().min(u128::from(MAX_MICROS)) as u64;
        slot.latency[bucket_of(micros)].fetch_add(1, Ordering::Relaxed);
    }

    /// Records a failure after the request was counted: a response cut mid-body.
    pub fn record_failure(&self, now: Instant) {
        let tick = millis(now) / self.slot_ms;
        let slot = &self.slots[(tick % SLOTS as u64) as usize];
        slot.enter(tick);
        slot.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// The figures over the window ending at `now`.
    pub fn summary(&self, now: Instant) -> Summary {
        let elapsed = millis(now);
        let tick = elapsed / self.slot_ms;
        let oldest = (tick + 1).saturating_sub(SLOTS as u64);
        let mut counts = vec![0u64; BUCKETS];
        let mut summary = Summary::default();
        for slot in self.slots.iter() {
            let held = slot.tick.load(Ordering::Acquire);
            if held == 0 || held - 1 < oldest || held - 1 > tick {
                continue;
            }
            summary.requests += slot.requests.load(Ordering::Relaxed);
            summary.failures += slot.failures.load(Ordering::Relaxed);
            for (total, count) in counts.iter_mut().zip(slot.latency.iter()) {
                *total += u64::from(count.load(Ordering::Relaxed));
            }
        }
        // The current slot counts for the part of it that has passed.
        let covered = (tick - oldest) * self.slot_ms + elapsed % self.slot_ms;
        summary.span = Duration::from_millis(covered.min(elapsed).max(1));
        let recorded: u64 = counts.iter().sum();
        summary.p50 = percentile(&counts, recorded, 50.0);
        summary.p99 = percentile(&counts, recorded, 99.0);
        summary
    }
}

/// The smallest latency at or below which `pct` % of the recorded ones fall.
fn percentile(counts: &[u64], total: u64, pct: f64) -> Option<Duration> {
    if total == 0 {
        return None;
    }
    let rank = ((pct / 100.0) * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (index, &count) in counts.iter().enumerate() {
        seen += count;
        if seen >= rank {
            return Some(Duration::from_micros(bucket_top(index)));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A moment on the slots' clock (at or after its start, so that offsets from it are
    /// exact).
    fn base() -> Instant {
        millis(Instant::now());
        Instant::now()
    }

    #[test]
    fn buckets_cover_the_range_in_order() {
        let mut last = 0;
        for v in (0..MAX_MICROS).step_by(997).chain([MAX_MICROS, u64::MAX]) {
            let b = bucket_of(v);
            assert!(b < BUCKETS, "{v} → {b}");
            assert!(b >= last, "buckets grow with the value");
            assert!(bucket_top(b) >= v.min(MAX_MICROS), "{v} is within its bucket's top {}", bucket_top(b));
            last = b;
        }
        assert_eq!(bucket_of(255), 255);
        assert_eq!(bucket_top(bucket_of(256)), 257);
        assert_eq!(bucket_of(MAX_MICROS), BUCKETS - 1);
    }

    proptest! {
        /// A bucket is never wider than 1/128 of the values it holds.
        #[test]
        fn a_bucket_is_at_most_0_8_percent_wide(v in 0u64..MAX_MICROS) {
            let top = bucket_top(bucket_of(v));
            prop_assert!(top >= v);
            prop_assert!((top - v) as f64 <= (v as f64 / 128.0).max(0.0) + 1e-9, "{} → {}", v, top);
        }

        /// Percentiles agree with hdrhistogram's at two significant digits.
        #[test]
        fn percentiles_match_hdrhistogram(samples in prop::collection::vec(1u64..5_000_000, 1..2000)) {
            let stats = Stats::new(Duration::from_secs(3600));
            let now = Instant::now();
            let mut reference = hdrhistogram::Histogram::<u64>::new(2).expect("histogram");
            for &s in &samples {
                stats.record(now, Duration::from_micros(s), false);
                reference.record(s).expect("in range");
            }
            let summary = stats.summary(now);
            prop_assert_eq!(summary.requests, samples.len() as u64);
            for (ours, q) in [(summary.p50, 0.5), (summary.p99, 0.99)] {
                let ours = ours.expect("recorded").as_micros() as f64;
                let theirs = reference.value_at_quantile(q) as f64;
                prop_assert!((ours - theirs).abs() <= theirs * 0.01 + 1.0, "q{}: ours {} hdrhistogram {}", q, ours, theirs);
            }
        }
    }

    #[test]
    fn the_window_slides_and_counts_failures() {
        let stats = Stats::new(Duration::from_secs(10));
        let t0 = base();
        for i in 0..100 {
            stats.record(t0, Duration::from_millis(10), i % 10 == 0);
        }
        let now = stats.summary(t0);
        assert_eq!((now.requests, now.failures), (100, 10));
        assert!((now.error_rate() - 10.0).abs() < 1e-9);
        let p99 = now.p99.expect("p99");
        assert!(p99 >= Duration::from_millis(10) && p99 < Duration::from_micros(10_080), "{p99:?}");

        // Half a window on, the old requests still count; then more arrive, slower.
        let t1 = t0 + Duration::from_secs(5);
        for _ in 0..100 {
            stats.record(t1, Duration::from_millis(300), false);
        }
        let later = stats.summary(t1);
        assert_eq!(later.requests, 200);
        assert!(later.p99.expect("p99") >= Duration::from_millis(300));
        assert!(later.p50.expect("p50") < Duration::from_millis(11), "half were fast");

        // A window after the first batch, only the second is left.
        let t2 = t0 + Duration::from_secs(10) + Duration::from_millis(500);
        let slid = stats.summary(t2);
        assert_eq!((slid.requests, slid.failures), (100, 0));
        // Two windows on, nothing.
        let empty = stats.summary(t0 + Duration::from_secs(30));
        assert_eq!(empty.requests, 0);
        assert_eq!(empty.p99, None);
    }

    #[test]
    fn a_reused_slot_starts_from_zero() {
        let stats = Stats::new(Duration::from_secs(1));
        let t0 = base();
        stats.record(t0, Duration::from_millis(1), true);
        let again = t0 + Duration::from_secs(1);
        stats.record(again, Duration::from_millis(1), false);
        let summary = stats.summary(again);
        assert_eq!((summary.requests, summary.failures), (1, 0));
    }
}
