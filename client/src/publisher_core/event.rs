//! [`PublisherEvent`]: what the brokers reported about a publisher's batches.

use std::net::SocketAddr;
use units::Timestamp;

/// Something the broker reported about the publisher's batches, drained with
/// [`Publisher::take_events`](crate::Publisher::take_events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublisherEvent {
    /// A batch was acknowledged (only recorded with
    /// [`PublisherConfig::report_acks`](crate::PublisherConfig::report_acks)).
    Acked {
        /// The batch.
        batch_seq: u64,
        /// Index of its first message among all messages this publisher accepted.
        first_message_index: u64,
        /// Messages in the batch.
        message_count: u32,
        /// Global position of its first message, when the topic has positions (and, for a
        /// duplicate, when the broker still knew the original position).
        global_start: Option<u64>,
        /// Whether the broker found it already in the log (a resend whose first copy had
        /// arrived): it is in the log once, at `global_start`.
        duplicate: bool,
        /// Time from sealing to acknowledgement, in microseconds (a resent batch keeps the
        /// time of its first sealing, so the latency includes the recovery).
        latency_us: u64,
        /// When the ack arrived (read from its socket): a load generator measures each
        /// message's latency from when it was due to this.
        acked_at: Timestamp,
    },
    /// The broker reported that it did not order this batch (`SessionGapSkipped`): order 5's
    /// gap rule skipped it, or it was a resend that arrived after the session's
    /// deduplication window had moved past it. Nothing else reports this.
    ///
    /// A batch that was never resent is not in the log and will not be delivered. For a
    /// resent batch the broker cannot tell whether its first copy (sent on a connection that
    /// failed) reached the log: it is then in the log once or not at all, never twice.
    Rejected {
        /// The batch.
        batch_seq: u64,
        /// Index of its first message, when the publisher still tracked the batch (at ack 0
        /// a written batch is forgotten, so this is `None`).
        first_message_index: Option<u64>,
        /// Messages in the batch, when known (see `first_message_index`).
        message_count: Option<u32>,
        /// The broker that reported it.
        broker: SocketAddr,
        /// The broker's explanation.
        reason: String,
    },
    /// Informational `PoolFull` Error frame: the broker is applying backpressure.
    PoolFull {
        /// The broker.
        broker: SocketAddr,
        /// The broker's explanation.
        reason: String,
    },
}
