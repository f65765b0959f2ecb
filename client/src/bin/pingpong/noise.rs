//! `pingpong noise`: how much of a CPU a thread that never sleeps actually gets. The thread
//! reads the clock in a loop; an interval between two readings longer than a threshold is
//! time the CPU did something else (an interrupt, another thread, or, on a virtual machine,
//! the hypervisor, which the guest's own accounting may not see as steal). The gaps bound
//! from below what any latency measured on that CPU can be: a message that falls due in a
//! gap waits for its end.
//!
//! [`spin`] is the only part that reads a clock; [`Gaps`] is summarised without I/O.

use std::time::Duration;

use serde::Serialize;
use units::Timestamp;

/// Most gaps kept: a run that sees more (a gap every few microseconds for minutes) counts
/// the rest in [`Gaps::gaps_not_kept`] and its summary says so.
pub const GAPS_KEPT_MAX: usize = 1 << 20;

/// What a spinning thread saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gaps {
    /// Intervals between two clock readings above the threshold, in nanoseconds.
    pub gaps_ns: Vec<u64>,
    /// Gaps beyond [`GAPS_KEPT_MAX`], and their total, not in `gaps_ns`.
    pub gaps_not_kept: u64,
    /// The threshold a gap is above.
    pub threshold_ns: u64,
    /// How long the thread spun.
    pub elapsed_ns: u64,
}

/// Spins on the calling thread for `duration`, keeping every interval between two clock
/// readings longer than `threshold`.
pub fn spin(duration: Duration, threshold: Duration) -> Gaps {
    let threshold_ns = u64::try_from(threshold.as_nanos()).unwrap_or(u64::MAX);
    let start = Timestamp::now();
    let end = start + duration;
    let mut gaps = Gaps {
        gaps_ns: Vec::with_capacity(4096),
        gaps_not_kept: 0,
        threshold_ns,
        elapsed_ns: 0,
    };
    let mut previous = start;
    while previous < end {
        let now = Timestamp::now();
        let gap_ns = now.as_nanos() - previous.as_nanos();
        if gap_ns > threshold_ns {
            gaps.add(gap_ns);
        }
        previous = now;
    }
    gaps.elapsed_ns = previous.as_nanos() - start.as_nanos();
    gaps
}

impl Gaps {
    fn add(&mut self, gap_ns: u64) {
        if self.gaps_ns.len() < GAPS_KEPT_MAX {
            self.gaps_ns.push(gap_ns);
        } else {
            self.gaps_not_kept += 1;
        }
    }

    /// The longest wait that a share `1 - percentile / 100` of all instants of the run
    /// would have had before the thread ran again: for an event at a uniformly random
    /// instant, the `percentile` of the time until this CPU is back. An instant inside a gap
    /// of length g waits the rest of it, so the share of instants that wait longer than x
    /// is the sum of (g - x) over the gaps longer than x, over the run's length.
    pub fn wait_percentile_ns(&self, percentile: f64) -> u64 {
        let share = (1.0 - percentile / 100.0).clamp(0.0, 1.0);
        let budget = share * self.elapsed_ns as f64;
        let longer_than = |x: u64| -> f64 {
            self.gaps_ns
                .iter()
                .map(|&gap| gap.saturating_sub(x) as f64)
                .sum()
        };
        // The share waiting longer than x falls as x grows: find the least x within it.
        let (mut low, mut high) = (0u64, self.gaps_ns.iter().copied().max().unwrap_or(0));
        if longer_than(low) <= budget {
            return 0;
        }
        while high - low > 1 {
            let middle = low + (high - low) / 2;
            if longer_than(middle) <= budget {
                high = middle;
            } else {
                low = middle;
            }
        }
        high
    }

    /// The summary `pingpong noise` reports.
    pub fn summary(&self) -> NoiseSummary {
        let over = |us: u64| self.gaps_ns.iter().filter(|&&gap| gap > us * 1_000).count() as u64;
        let lost_ns: u64 = self.gaps_ns.iter().sum();
        let seconds = self.elapsed_ns as f64 / 1e9;
        let mut largest_us: Vec<u64> = self.gaps_ns.iter().map(|gap| gap / 1_000).collect();
        largest_us.sort_unstable_by(|a, b| b.cmp(a));
        largest_us.truncate(10);
        NoiseSummary {
            backend: "cpu-noise",
            seconds,
            gap_threshold_us: self.threshold_ns / 1_000,
            gaps: self.gaps_ns.len() as u64,
            gaps_not_kept: self.gaps_not_kept,
            gaps_over_100us: over(100),
            gaps_over_1ms: over(1_000),
            lost_pct: 100.0 * lost_ns as f64 / (self.elapsed_ns.max(1) as f64),
            gap_max_us: largest_us.first().copied().unwrap_or(0),
            wait_p99_us: self.wait_percentile_ns(99.0) / 1_000,
            wait_p999_us: self.wait_percentile_ns(99.9) / 1_000,
            largest_gaps_us: largest_us,
        }
    }
}

/// What `pingpong noise` reports (JSON).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NoiseSummary {
    pub backend: &'static str,
    pub seconds: f64,
    pub gap_threshold_us: u64,
    /// Gaps above the threshold (kept ones).
    pub gaps: u64,
    pub gaps_not_kept: u64,
    pub gaps_over_100us: u64,
    pub gaps_over_1ms: u64,
    /// Share of the run inside gaps.
    pub lost_pct: f64,
    pub gap_max_us: u64,
    /// See [`Gaps::wait_percentile_ns`].
    pub wait_p99_us: u64,
    pub wait_p999_us: u64,
    /// The ten longest gaps, longest first.
    pub largest_gaps_us: Vec<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaps(gaps_ns: &[u64], elapsed_ns: u64) -> Gaps {
        Gaps {
            gaps_ns: gaps_ns.to_vec(),
            gaps_not_kept: 0,
            threshold_ns: 10_000,
            elapsed_ns,
        }
    }

    #[test]
    fn a_quiet_cpu_makes_nobody_wait() {
        let quiet = gaps(&[], 1_000_000_000);
        assert_eq!(quiet.wait_percentile_ns(99.9), 0);
        let summary = quiet.summary();
        assert_eq!(
            (summary.gaps, summary.gap_max_us, summary.lost_pct),
            (0, 0, 0.0)
        );
    }

    #[test]
    fn the_wait_percentile_is_the_rest_of_the_gap_an_instant_falls_in() {
        // One 10 ms gap in 1 s: 1% of instants wait, from 10 ms down to 0, evenly. So 0.1%
        // of instants wait at least 9 ms, and no more than 1% wait at all.
        let one = gaps(&[10_000_000], 1_000_000_000);
        assert_eq!(one.wait_percentile_ns(99.0), 0);
        let p999 = one.wait_percentile_ns(99.9);
        assert!((8_999_999..=9_000_001).contains(&p999), "{p999}");
        // Many short gaps cost time but no single long wait: 2% of the time in 20 us gaps.
        let ticks = gaps(&vec![20_000; 1_000], 1_000_000_000);
        let p99 = ticks.wait_percentile_ns(99.0);
        assert!((9_999..=10_001).contains(&p99), "{p99}");
        assert_eq!(ticks.summary().lost_pct, 2.0);
    }

    #[test]
    fn the_summary_counts_long_gaps_and_keeps_the_longest() {
        let mut seen = gaps(&[], 2_000_000_000);
        for gap_ns in [50_000, 150_000, 2_000_000, 15_000, 1_500_000] {
            seen.add(gap_ns);
        }
        let summary = seen.summary();
        assert_eq!(summary.gaps, 5);
        assert_eq!(summary.gaps_over_100us, 3);
        assert_eq!(summary.gaps_over_1ms, 2);
        assert_eq!(summary.gap_max_us, 2_000);
        assert_eq!(summary.largest_gaps_us, vec![2_000, 1_500, 150, 50, 15]);
    }

    #[test]
    fn with_no_threshold_the_gaps_are_the_whole_run() {
        let seen = spin(Duration::from_millis(5), Duration::ZERO);
        assert!(seen.elapsed_ns >= 5_000_000);
        assert_eq!(seen.gaps_not_kept, 0);
        assert_eq!(seen.gaps_ns.iter().sum::<u64>(), seen.elapsed_ns);
        let above = spin(Duration::from_millis(5), Duration::from_micros(10));
        assert!(above.gaps_ns.iter().all(|&gap| gap > 10_000));
    }
}
