//! The load generator's JSON summary ([`Summary`]), shared so that test scripts and the
//! broker's end-to-end tests can read it with the same types.

use serde::{Deserialize, Serialize};

use crate::stats::{LatencySummary, PercentilePoint};

/// Result of one load generator run (`loadgen --json FILE`). Rates use decimal megabytes
/// (10^6 bytes) of message content (length prefixes and headers excluded).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Test mode: `publish`, `subscribe`, `end-to-end` or `latency`.
    pub test: String,
    /// Label of the broker backend under test (`--backend-label`, default `kernel`).
    pub backend: String,
    /// Broker addresses, head broker first.
    pub brokers: Vec<String>,
    /// Topic name.
    pub topic: String,
    /// TCP connections each publisher opened to each broker.
    pub connections_per_broker: usize,
    /// TCP connections opened by all publishers together (publishers x brokers x
    /// connections per broker).
    pub connections: usize,
    /// Publisher threads, each with its own client id.
    pub publishers: usize,
    /// Topic order.
    pub order: u8,
    /// Ack level.
    pub ack: u8,
    /// Size of each message.
    pub message_bytes: usize,
    /// Batch payload limit in effect.
    pub batch_bytes: usize,
    /// Messages per batch asked for (`--messages-per-batch`; 0: as many as `batch_bytes`
    /// holds).
    pub messages_per_batch: usize,
    /// Linger time.
    pub linger_us: u64,
    /// Target rate (0 = unlimited).
    pub rate_msgs_per_s: u64,
    /// Messages written to sockets.
    pub messages_sent: u64,
    /// Messages acknowledged (ack >= 1).
    pub messages_acked: u64,
    /// Message bytes acknowledged (ack >= 1).
    pub bytes_acked: u64,
    /// Batches acknowledged (ack >= 1), duplicates included.
    pub batches_acked: u64,
    /// Message bytes written to sockets.
    pub bytes_sent: u64,
    /// Messages read by the subscriber (subscribe and end-to-end tests).
    pub messages_received: u64,
    /// Message bytes read by the subscriber.
    pub bytes_received: u64,
    /// Wall time of the measured phase.
    pub seconds: f64,
    /// Throughput in 10^6 bytes per second: acknowledged bytes (sent bytes at ack 0;
    /// received bytes in the subscribe test).
    pub mb_per_s: f64,
    /// Throughput in messages per second, counted like `mb_per_s`.
    pub msgs_per_s: f64,
    /// Ack latency percentiles over all publishers, from sealing a batch to its ack.
    pub ack_latency_us: LatencySummary,
    /// Paced runs: each acknowledged message's latency from when the schedule said it was
    /// due to its ack's arrival (a stall of the sender counts; coordinated omission
    /// corrected). Empty when unpaced.
    pub ack_latency_from_intended_us: LatencySummary,
    /// Paced end-to-end and latency runs: each first delivery's latency from when it was
    /// due to the subscriber's receipt (same process, same clock). Empty otherwise.
    pub e2e_latency_from_intended_us: LatencySummary,
    /// The three latencies' percentile distributions.
    pub latency_distributions_us: LatencyDistributions,
    /// User plus system CPU time of the whole loadgen process (publishers, their I/O
    /// threads, the subscriber) over the measured phase, divided by its wall time.
    pub loadgen_cpu_cores: f64,
    /// Messages in batches the brokers reported as not ordered (SessionGapSkipped).
    pub rejected: u64,
    /// Acknowledged (ack 0: written) messages never delivered within the drain timeout.
    pub lost: u64,
    /// Repeated deliveries of a message.
    pub duplicates: u64,
    /// Messages delivered out of the order the topic promises (see `order_check`).
    pub order_violations: u64,
    /// What the order check compared: `none`, `per_connection` or `per_publisher`.
    pub order_check: String,
    /// Delivered messages whose content failed its checksum.
    pub corrupt: u64,
    /// Deliveries that skipped global positions.
    pub position_gaps: u64,
    /// Deliveries that repeated global positions.
    pub position_duplicates: u64,
    /// Redirects the subscriber followed to the broker that keeps its start position.
    #[serde(default)]
    pub subscriber_redirects: u64,
    /// Messages from other runs' publishers on the same topic (ignored).
    pub foreign: u64,
    /// Connections the publishers opened again after one failed (to another broker, or back
    /// to the one that failed once it answered again).
    pub reconnects: u64,
    /// Batches sent again because the connection they were on failed before their ack.
    pub batches_resent: u64,
    /// Acknowledged batches the brokers found already in the log (resends whose first copy
    /// had arrived): acknowledged with the original position, not written twice.
    pub duplicate_acks: u64,
    /// Vectored writes of the publishers' bursts that took two or more batches at once (a
    /// paced publisher sends every message that is due in one burst; see
    /// [`Publisher::burst`](crate::Publisher::burst)).
    pub burst_writes: u64,
    /// Batches those writes took.
    pub burst_write_batches: u64,
    /// The longest a publisher went without a new acknowledgement while it still had
    /// messages to send, in milliseconds, looked at every 1,024 messages (a failover shows
    /// here as the time until the first ack after it).
    pub ack_gap_max_ms: u64,
    /// The publishers' in-flight windows at the end (batches per connection; the largest of
    /// them): with `--in-flight-window adaptive`, where the window settled.
    pub in_flight_window: u64,
    /// How often the publishers' adaptive windows changed, together.
    pub in_flight_window_changes: u64,
    /// How long the publishers took to open their connections (TCP and Hello/HelloOk), from
    /// the start of the publish phase until the last one was connected, in milliseconds.
    pub connect_ms: u64,
    /// Errors that stopped a publisher or the subscriber.
    pub errors: Vec<String>,
    /// Whether the run met its checks (the exit code is 0 exactly when this is true).
    pub passed: bool,
}

/// Percentile distributions of a run's latencies (lists of points, denser towards the
/// tail; see [`crate::percentile_distribution`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyDistributions {
    /// Of `ack_latency_us`.
    pub ack: Vec<PercentilePoint>,
    /// Of `ack_latency_from_intended_us`.
    pub ack_from_intended: Vec<PercentilePoint>,
    /// Of `e2e_latency_from_intended_us`.
    pub e2e_from_intended: Vec<PercentilePoint>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_the_documented_fields() {
        let summary = Summary {
            test: "end-to-end".into(),
            backend: "kernel".into(),
            brokers: vec!["127.0.0.1:9000".into()],
            connections: 4,
            publishers: 2,
            ack_latency_us: LatencySummary {
                count: 3,
                p50: 10,
                p90: 15,
                p99: 20,
                p999: 30,
                max: 40,
                mean: 15.0,
            },
            passed: true,
            ..Summary::default()
        };
        let value = serde_json::to_value(&summary).unwrap();
        for field in [
            "backend",
            "brokers",
            "connections",
            "order",
            "ack",
            "message_bytes",
            "messages_sent",
            "messages_acked",
            "bytes_acked",
            "seconds",
            "mb_per_s",
            "msgs_per_s",
            "lost",
            "duplicates",
            "order_violations",
            "publishers",
            "rejected",
            "reconnects",
            "batches_resent",
            "duplicate_acks",
            "burst_writes",
            "burst_write_batches",
            "ack_gap_max_ms",
            "connect_ms",
            "in_flight_window",
            "batches_acked",
            "messages_per_batch",
            "ack_latency_from_intended_us",
            "e2e_latency_from_intended_us",
            "loadgen_cpu_cores",
            "passed",
        ] {
            assert!(value.get(field).is_some(), "missing {field}");
        }
        for distribution in ["ack", "ack_from_intended", "e2e_from_intended"] {
            assert!(value["latency_distributions_us"][distribution].is_array());
        }
        for percentile in ["p50", "p90", "p99", "p999", "max"] {
            assert!(value["ack_latency_us"][percentile].is_u64(), "{percentile}");
        }
        assert_eq!(value["ack_latency_us"]["p999"], 30);
        assert_eq!(value["backend"], "kernel");
        let back: Summary = serde_json::from_value(value).unwrap();
        assert_eq!(back, summary);
    }
}
