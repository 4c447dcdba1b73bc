//! Lock-free latency histograms for the daemon's metrics lines: power-of-two buckets, so
//! recording is one atomic add and percentiles are exact to within a factor of two.

use std::sync::atomic::{AtomicU64, Ordering};

const BUCKETS: usize = 40;

/// Counts of values by power-of-two bucket: bucket `i` holds values in `[2^(i-1), 2^i)`
/// (bucket 0 holds 0).
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    total: AtomicU64,
    max: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            total: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }
}

fn bucket_of(value: u64) -> usize {
    ((u64::BITS - value.leading_zeros()) as usize).min(BUCKETS - 1)
}

impl Histogram {
    pub fn record(&self, value: u64) {
        self.buckets[bucket_of(value)].fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        self.max.fetch_max(value, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    pub fn max(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }

    /// An upper bound of the `q` quantile (0 < q <= 1): the top of the bucket holding it,
    /// capped by the largest value seen. 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let rank = ((total as f64 * q).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= rank {
                let top = match i {
                    0 => 0,
                    i if i == BUCKETS - 1 => u64::MAX, // open-ended
                    i => (1u64 << i) - 1,
                };
                return top.min(self.max());
            }
        }
        self.max()
    }

    /// "p50 <= A, p99 <= B, max C UNIT" (or "none").
    pub fn summary(&self, unit: &str) -> String {
        if self.count() == 0 {
            return "none".into();
        }
        format!(
            "p50 <= {}, p99 <= {}, max {} {unit}",
            self.quantile(0.5),
            self.quantile(0.99),
            self.max()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_bound_the_values_within_a_factor_of_two() {
        let h = Histogram::default();
        assert_eq!(h.quantile(0.5), 0);
        assert_eq!(h.summary("us"), "none");
        for v in 1..=100u64 {
            h.record(v);
        }
        let p50 = h.quantile(0.5);
        assert!((50..100).contains(&p50), "p50 bound {p50}");
        assert_eq!(h.quantile(0.99), 100, "capped by the maximum");
        h.record(0);
        assert_eq!(h.count(), 101);
        assert_eq!(h.max(), 100);
    }

    #[test]
    fn huge_values_land_in_the_last_bucket() {
        let h = Histogram::default();
        h.record(u64::MAX);
        assert_eq!(h.quantile(1.0), u64::MAX);
    }
}
