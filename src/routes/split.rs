//! Choosing a backend: the split compiled to cumulative basis points, and the hashing that
//! makes sticky cohorts grow monotonically with the canary's weight.

use crate::config::{BasisPoints, ALL};

/// A route's split, compiled once at swap time: each backend owns a contiguous range of
/// the 10 000 buckets, in the order the split lists them. Backends at 0 % own nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// (index into the table's backends, exclusive end of its bucket range).
    entries: Box<[(usize, BasisPoints)]>,
}

impl Split {
    /// `shares` must sum to [`ALL`]; validation guarantees it for configs, and the control
    /// path for runtime changes.
    pub fn new(shares: impl IntoIterator<Item = (usize, BasisPoints)>) -> Self {
        let mut end = 0;
        let entries = shares
            .into_iter()
            .filter(|&(_, w)| w > 0)
            .map(|(backend, w)| {
                end += w;
                (backend, end)
            })
            .collect();
        Split { entries }
    }

    /// The backend owning `bucket` (0..10 000), or `None` for an empty split.
    #[inline]
    pub fn pick(&self, bucket: u32) -> Option<usize> {
        self.entries.iter().find(|&&(_, end)| bucket < end).or(self.entries.last()).map(|&(b, _)| b)
    }

    /// Like [`pick`](Self::pick), but only among backends for which `usable` holds: the
    /// shares of the others are spread over these in proportion to their own weights.
    pub fn pick_usable(&self, bucket: u32, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let live: BasisPoints = self.weights().filter(|&(b, _)| usable(b)).map(|(_, w)| w).sum();
        if live == 0 {
            return None;
        }
        let scaled = (u64::from(bucket) * u64::from(live) / u64::from(ALL)) as BasisPoints;
        let mut end = 0;
        self.weights()
            .filter(|&(b, _)| usable(b))
            .find(|&(_, w)| {
                end += w;
                scaled < end
            })
            .map(|(b, _)| b)
    }

    /// Each backend with a non-zero share and its weight, in bucket order.
    pub fn weights(&self) -> impl Iterator<Item = (usize, BasisPoints)> + '_ {
        let mut start = 0;
        self.entries.iter().map(move |&(b, end)| {
            let w = end - start;
            start = end;
            (b, w)
        })
    }
}

/// A stable 64-bit hash of a sticky key. Stable across processes and releases, so a
/// conversation keeps its cohort through restarts.
#[inline]
pub fn key_hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}

/// The bucket (0..10 000) a key hash falls in. Uses the high bits by multiplication
/// rather than `%`, which is both unbiased enough and cheaper.
#[inline]
pub fn bucket(hash: u64) -> u32 {
    ((u128::from(hash) * u128::from(ALL)) >> 64) as u32
}

/// The rendezvous score of a key on a server: the server with the highest score wins, so
/// removing one server moves only the keys it held.
#[inline]
pub fn rendezvous_score(hash: u64, server_seed: u64) -> u64 {
    // splitmix64's finaliser: a full avalanche of key and seed in a few instructions.
    let mut z = hash ^ server_seed;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn eighty_twenty_over_100k_picks_is_within_half_a_point() {
        let split = Split::new([(0, 8000), (1, 2000)]);
        let mut rng = fastrand::Rng::with_seed(7);
        let n = 100_000;
        let to_first = (0..n).filter(|_| split.pick(rng.u32(0..ALL)) == Some(0)).count();
        let pct = to_first as f64 * 100.0 / n as f64;
        assert!((pct - 80.0).abs() < 0.5, "80/20 split sent {pct:.2} % to the first backend");
    }

    #[test]
    fn sticky_buckets_spread_evenly() {
        let split = Split::new([(0, 8000), (1, 2000)]);
        let n = 100_000;
        let to_first =
            (0..n).filter(|i| split.pick(bucket(key_hash(format!("conv-{i}").as_bytes()))) == Some(0)).count();
        let pct = to_first as f64 * 100.0 / n as f64;
        assert!((pct - 80.0).abs() < 0.5, "80/20 sticky split sent {pct:.2} % to the first backend");
    }

    #[test]
    fn zero_shares_get_nothing_and_an_empty_split_picks_nothing() {
        let split = Split::new([(0, 0), (1, ALL)]);
        assert!((0..ALL).all(|b| split.pick(b) == Some(1)));
        assert_eq!(Split::new([]).pick(0), None);
    }

    #[test]
    fn an_unusable_backend_gives_its_share_to_the_others() {
        let split = Split::new([(0, 5000), (1, 3000), (2, 2000)]);
        let mut counts = [0u32; 3];
        for b in 0..ALL {
            counts[split.pick_usable(b, |i| i != 0).expect("a usable backend")] += 1;
        }
        assert_eq!(counts, [0, 6000, 4000]);
        assert_eq!(split.pick_usable(0, |_| false), None);
    }

    proptest! {
        /// The heart of sticky canaries: raising the canary's weight only ever moves keys
        /// from stable to canary, never back.
        #[test]
        fn a_key_never_leaves_the_canary_as_its_weight_rises(key in any::<u64>(), w1 in 0u32..=ALL, w2 in 0u32..=ALL) {
            let (low, high) = (w1.min(w2), w1.max(w2));
            // The canary is listed first, so it owns the lowest buckets.
            let before = Split::new([(1, low), (0, ALL - low)]);
            let after = Split::new([(1, high), (0, ALL - high)]);
            let b = bucket(key);
            if before.pick(b) == Some(1) {
                prop_assert_eq!(after.pick(b), Some(1));
            }
        }

        #[test]
        fn every_bucket_has_an_owner(shares in proptest::collection::vec(0u32..2000, 1..8)) {
            let total: u32 = shares.iter().sum();
            prop_assume!(total > 0);
            // Scale to exactly 10 000, the last entry taking the rounding.
            let mut scaled: Vec<(usize, u32)> = shares.iter().enumerate().map(|(i, &w)| (i, w * ALL / total)).collect();
            let sum: u32 = scaled.iter().map(|&(_, w)| w).sum();
            if let Some(last) = scaled.last_mut() { last.1 += ALL - sum; }
            let split = Split::new(scaled.clone());
            let mut counts = vec![0u32; scaled.len()];
            for b in 0..ALL { counts[split.pick(b).expect("owner")] += 1; }
            for (i, w) in scaled { prop_assert_eq!(counts[i], w); }
        }

        #[test]
        fn buckets_stay_in_range(hash in any::<u64>()) {
            prop_assert!(bucket(hash) < ALL);
        }

        /// Removing one server moves only the keys that server held.
        #[test]
        fn rendezvous_moves_only_the_removed_servers_keys(keys in proptest::collection::vec(any::<u64>(), 1..200), removed in 0usize..5) {
            let seeds: Vec<u64> = (0..5u64).map(|i| key_hash(&i.to_le_bytes())).collect();
            let best = |key: u64, skip: Option<usize>| (0..seeds.len()).filter(|&i| Some(i) != skip).max_by_key(|&i| rendezvous_score(key, seeds[i]));
            for key in keys {
                let before = best(key, None);
                let after = best(key, Some(removed));
                if before != Some(removed) {
                    prop_assert_eq!(before, after);
                }
            }
        }
    }
}
