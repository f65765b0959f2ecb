//! Publisher statistics: counters and the ack latency histogram.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Largest latency the histogram records exactly (one minute); larger values are clamped.
pub const LATENCY_US_MAX: u64 = 60_000_000;

/// A histogram of latencies in microseconds, 3 significant digits, 1 us to one minute.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3)
        .expect("constant bounds satisfy hdrhistogram: low >= 1, high >= 2 * low, sigfig <= 5")
}

/// Percentiles of a latency histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Samples recorded.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest sample.
    pub max: u64,
    /// Mean.
    pub mean: f64,
}

impl LatencySummary {
    /// Summarises a histogram (all zero when it is empty).
    pub fn of(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: histogram.len(),
            p50: histogram.value_at_quantile(0.50),
            p90: histogram.value_at_quantile(0.90),
            p99: histogram.value_at_quantile(0.99),
            p999: histogram.value_at_quantile(0.999),
            max: histogram.max(),
            mean: histogram.mean(),
        }
    }
}

/// One point of a percentile distribution: `percentile` percent of the samples were at most
/// `value_us`; `count` samples were at most `value_us`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PercentilePoint {
    /// Percent of samples (0 to 100).
    pub percentile: f64,
    /// Latency at that percentile, in microseconds.
    pub value_us: u64,
    /// Samples at or below `value_us`.
    pub count: u64,
}

/// Ticks per halving of the distance to 100%: HdrHistogram's usual resolution of a
/// percentile distribution (0, 10, 20, ..., 50, 55, ..., 75, 77.5, ... up to the max).
const PERCENTILE_TICKS_PER_HALF: u32 = 5;

/// A histogram's percentile distribution (HdrHistogram's "percentile output": points
/// denser towards the tail, ending at the largest sample), for plotting and for percentiles
/// the summary does not name. Empty for an empty histogram.
pub fn percentile_distribution(histogram: &Histogram<u64>) -> Vec<PercentilePoint> {
    let mut points: Vec<PercentilePoint> = Vec::new();
    for step in histogram.iter_quantiles(PERCENTILE_TICKS_PER_HALF) {
        let point = PercentilePoint {
            percentile: step.quantile_iterated_to() * 100.0,
            value_us: histogram.highest_equivalent(step.value_iterated_to()),
            count: 0,
        };
        // Repeated values at rising percentiles say nothing new; keep the highest.
        match points.last_mut() {
            Some(last) if last.value_us == point.value_us => *last = point,
            _ => points.push(point),
        }
    }
    let mut below = 0;
    for point in &mut points {
        below = histogram.count_between(0, point.value_us).max(below);
        point.count = below;
    }
    points
}

/// What a publisher has done so far. Byte counts are message bytes, without the 4-byte
/// length prefixes and frame headers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PublisherStats {
    /// Messages accepted by `publish` (including those still in the open batch).
    pub messages_published: u64,
    /// Batches sealed and assigned to a connection.
    pub batches_sealed: u64,
    /// Batches sealed per connection slot, in slot order (the round-robin spread).
    pub batches_per_connection: Vec<u64>,
    /// Batches written completely to a socket, each counted once (resends are counted in
    /// `batches_resent`; a batch acknowledged after a resend counts as sent even when only
    /// the resend was written completely).
    pub batches_sent: u64,
    /// Messages in those batches.
    pub messages_sent: u64,
    /// Message bytes in those batches.
    pub bytes_sent: u64,
    /// Batches acknowledged (ack >= 1), duplicates included.
    pub batches_acked: u64,
    /// Messages in acknowledged batches.
    pub messages_acked: u64,
    /// Message bytes in acknowledged batches.
    pub bytes_acked: u64,
    /// Acknowledged batches whose status was `Duplicate` (already in the log: a resend whose
    /// first copy had arrived).
    pub batches_duplicate: u64,
    /// Acknowledged batches whose ack entry carried no global position.
    pub batches_unpositioned: u64,
    /// Batches the broker reported as not ordered (order 5, `SessionGapSkipped`).
    pub batches_rejected: u64,
    /// Messages in those batches (unknown, hence not counted, at ack 0 when the batch was
    /// already written and forgotten).
    pub messages_rejected: u64,
    /// Connections that failed (end of stream, reset, write error, TCP timeout, unrequested
    /// Goodbye) while they carried the publisher's batches.
    pub connections_lost: u64,
    /// Connections opened after the start to replace a failed one or to move back to a
    /// broker that answers again (not those of a new session epoch).
    pub reconnects: u64,
    /// Batches sent again after the connection they were on failed (each resend counts).
    pub batches_resent: u64,
    /// New session epochs started because a session reached `session_batches_max`.
    pub session_rollovers: u64,
    /// Batches each connection may have outstanding, as of now.
    pub in_flight_window: usize,
    /// How often the adaptive window changed.
    pub in_flight_window_changes: u64,
    /// Vectored writes of a burst ([`Publisher::burst`](crate::Publisher::burst)) that took
    /// two or more of its batches whole.
    pub burst_writes: u64,
    /// Batches those writes took whole.
    pub burst_write_batches: u64,
    /// Ack latency, from sealing a batch (the first time) to receiving its acknowledgement.
    pub ack_latency_us: LatencySummary,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_empty_and_filled_histograms() {
        let mut histogram = latency_histogram();
        assert_eq!(LatencySummary::of(&histogram), LatencySummary::default());
        for value in 1..=1000 {
            histogram.saturating_record(value);
        }
        histogram.saturating_record(LATENCY_US_MAX * 10);
        let summary = LatencySummary::of(&histogram);
        assert_eq!(summary.count, 1001);
        assert!((499..=501).contains(&summary.p50), "{summary:?}");
        assert!((989..=991).contains(&summary.p99), "{summary:?}");
        assert!(summary.max >= LATENCY_US_MAX && summary.max < LATENCY_US_MAX * 2);
        assert!((899..=901).contains(&summary.p90), "{summary:?}");
    }

    #[test]
    fn distribution_rises_to_the_max_and_counts_every_sample() {
        let mut histogram = latency_histogram();
        assert!(percentile_distribution(&histogram).is_empty());
        for value in 1..=10_000 {
            histogram.saturating_record(value);
        }
        let points = percentile_distribution(&histogram);
        assert!(points.len() > 20, "{}", points.len());
        for pair in points.windows(2) {
            assert!(pair[0].percentile < pair[1].percentile, "{pair:?}");
            assert!(pair[0].value_us < pair[1].value_us, "{pair:?}");
            assert!(pair[0].count <= pair[1].count, "{pair:?}");
        }
        let last = points.last().unwrap();
        assert_eq!(last.percentile, 100.0);
        assert_eq!(last.count, 10_000);
        assert!((9_995..=10_010).contains(&last.value_us), "{last:?}");
        let median = points.iter().find(|p| p.percentile >= 50.0).unwrap();
        assert!((4_990..=5_010).contains(&median.value_us), "{median:?}");
        assert!((4_990..=5_010).contains(&median.count), "{median:?}");
    }
}
