//! [`PublisherConfig`] and [`SubscriberConfig`], with their defaults and validation.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use wire::{AckLevel, BATCH_BYTES_HARD_MAX, BATCH_BYTES_MIN, FROM_END, Order, Topic};

use crate::error::ClientError;
pub use crate::publisher_core::InFlightWindow;

/// Default batch payload limit asked for by a publisher (the broker's HelloOk may lower it).
pub const BATCH_BYTES_MAX_DEFAULT: usize = 64 << 10;
/// Default time an open batch may wait for more messages before it is sealed.
pub const LINGER_US_DEFAULT: u64 = 500;
/// Default number of unacknowledged batches per connection.
pub const IN_FLIGHT_BATCHES_MAX_DEFAULT: usize = 64;
/// Default `SO_SNDBUF` / `SO_RCVBUF` asked for on every connection (the kernel may cap it at
/// `net.core.wmem_max` / `rmem_max`).
pub const SOCKET_BUFFER_BYTES_DEFAULT: usize = 4 << 20;
/// Default bound on connecting plus the Hello/HelloOk exchange.
pub const CONNECT_TIMEOUT_MS_DEFAULT: u64 = 5_000;
/// Default bound on a blocking publish waiting for window space.
pub const PUBLISH_TIMEOUT_MS_DEFAULT: u64 = 30_000;
/// Default bound on [`Publisher::flush`](crate::Publisher::flush).
pub const FLUSH_TIMEOUT_MS_DEFAULT: u64 = 30_000;
/// Default time to wait for the broker's Goodbye after sending ours.
pub const GOODBYE_TIMEOUT_MS_DEFAULT: u64 = 1_000;
/// Default time a publisher may go without any connection before it gives up.
pub const RECONNECT_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Default bound on how often one batch is resent.
pub const RESENDS_MAX_DEFAULT: u32 = 8;
/// Default number of batch sequences a session uses before the next epoch starts: all of
/// them (`u64::MAX` itself means "none" on the wire and is never used).
pub const SESSION_BATCHES_MAX_DEFAULT: u64 = u64::MAX;

/// Settings of a [`Publisher`](crate::Publisher). Build with [`PublisherConfig::new`] and
/// change the public fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublisherConfig {
    /// Brokers to publish to; the publisher opens `connections_per_broker` connections to
    /// each and spreads batches over all of them round-robin.
    pub brokers: Vec<SocketAddr>,
    /// Topic name: 1 to 64 bytes of `[A-Za-z0-9._-]`.
    pub topic: String,
    /// The order the topic is expected to have: 0, 1, 2 or 5 (the broker refuses a mismatch).
    pub order: u8,
    /// Ack level asked for: 0 (none), 1 (ordered), 2 (replicated).
    pub ack: u8,
    /// Client identity, stable across reconnects; default: derived from the clock and pid.
    pub client_id: u64,
    /// Session epoch; a new epoch starts a new session at batch sequence 0. Default: the
    /// current Unix time in seconds, so a restarted client never reuses an older epoch.
    pub session_epoch: u32,
    /// TCP connections opened to each broker (at least 1).
    pub connections_per_broker: usize,
    /// Largest batch payload (length prefixes included) the publisher builds; capped by the
    /// smallest `batch_bytes_max` in the brokers' HelloOk. Default 64 KiB.
    pub batch_bytes_max: usize,
    /// How long an open batch waits for more messages before it is sealed; 0 seals every
    /// message on its own. Checked by `publish`, `poll` and `flush`. Default 500 us.
    pub linger_us: u64,
    /// Unacknowledged batches allowed per connection (at least 1). Default 64.
    pub in_flight_batches_max: usize,
    /// How the window up to `in_flight_batches_max` is chosen. Default
    /// [`InFlightWindow::Fixed`]: always the maximum. [`InFlightWindow::Adaptive`] starts at
    /// 16 batches (at most the maximum), halves while the acknowledged throughput holds
    /// (within 7%), grows while growing pays (10%), and so settles near the smallest window
    /// that keeps the throughput, which bounds latency at saturation by what the path needs:
    /// for a publisher that sends as fast as it can. A publisher paced near the path's
    /// capacity falls behind its schedule for good when the window costs it a few percent,
    /// so it is not the default.
    pub in_flight_window: InFlightWindow,
    /// When the window of the next connection is full: `true` waits for acks (up to
    /// `publish_timeout_ms`), `false` returns [`ClientError::WouldBlock`].
    pub blocking: bool,
    /// Bound on connecting plus the Hello/HelloOk exchange, per connection.
    pub connect_timeout_ms: u64,
    /// Bound on a blocking publish waiting for window space.
    pub publish_timeout_ms: u64,
    /// Bound on [`Publisher::flush`](crate::Publisher::flush) waiting for acks.
    pub flush_timeout_ms: u64,
    /// Bound on waiting for the broker's Goodbye when closing.
    pub goodbye_timeout_ms: u64,
    /// How long the publisher may go without any connection before it fails with
    /// [`ClientError::Unreachable`]: while at least one connection is up, a lost one is
    /// replaced and its broker probed again in the background, for as long as it takes. It
    /// also bounds how long a silent broker (TCP data or keep-alive probes unacknowledged,
    /// `TCP_USER_TIMEOUT`, at least 1 s) keeps a connection before it counts as failed.
    /// Default 10 s.
    pub reconnect_timeout_ms: u64,
    /// How often one batch may be resent after connection failures before the publisher
    /// fails with [`ClientError::ResendLimit`]. Default 8.
    pub resends_max: u32,
    /// Batch sequences a session uses (`0..session_batches_max`, at least 1). A publisher
    /// that reaches it waits until every batch of the session is acknowledged, then starts
    /// session epoch + 1 at sequence 0 on new connections; `batch_seq` never wraps. Default
    /// `u64::MAX` (no roll-over in practice).
    pub session_batches_max: u64,
    /// `SO_SNDBUF` and `SO_RCVBUF` asked for on each connection.
    pub socket_buffer_bytes: usize,
    /// Record an [`PublisherEvent::Acked`](crate::PublisherEvent::Acked) for every
    /// acknowledged batch (drained with `take_events`); off by default because a caller
    /// that never drains them would grow the queue without bound.
    pub report_acks: bool,
}

impl PublisherConfig {
    /// A configuration with the defaults: order 2, ack 1, one connection per broker, 64 KiB
    /// batches, 500 us linger, 64 batches in flight per connection, blocking.
    pub fn new(brokers: Vec<SocketAddr>, topic: impl Into<String>) -> Self {
        PublisherConfig {
            brokers,
            topic: topic.into(),
            order: 2,
            ack: 1,
            client_id: default_client_id(),
            session_epoch: default_session_epoch(),
            connections_per_broker: 1,
            batch_bytes_max: BATCH_BYTES_MAX_DEFAULT,
            linger_us: LINGER_US_DEFAULT,
            in_flight_batches_max: IN_FLIGHT_BATCHES_MAX_DEFAULT,
            in_flight_window: InFlightWindow::Fixed,
            blocking: true,
            connect_timeout_ms: CONNECT_TIMEOUT_MS_DEFAULT,
            publish_timeout_ms: PUBLISH_TIMEOUT_MS_DEFAULT,
            flush_timeout_ms: FLUSH_TIMEOUT_MS_DEFAULT,
            goodbye_timeout_ms: GOODBYE_TIMEOUT_MS_DEFAULT,
            reconnect_timeout_ms: RECONNECT_TIMEOUT_MS_DEFAULT,
            resends_max: RESENDS_MAX_DEFAULT,
            session_batches_max: SESSION_BATCHES_MAX_DEFAULT,
            socket_buffer_bytes: SOCKET_BUFFER_BYTES_DEFAULT,
            report_acks: false,
        }
    }

    /// [`linger_us`](Self::linger_us) as a [`Duration`].
    pub fn linger(&self) -> Duration {
        Duration::from_micros(self.linger_us)
    }

    /// [`connect_timeout_ms`](Self::connect_timeout_ms) as a [`Duration`].
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// [`publish_timeout_ms`](Self::publish_timeout_ms) as a [`Duration`].
    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }

    /// [`flush_timeout_ms`](Self::flush_timeout_ms) as a [`Duration`].
    pub fn flush_timeout(&self) -> Duration {
        Duration::from_millis(self.flush_timeout_ms)
    }

    /// [`goodbye_timeout_ms`](Self::goodbye_timeout_ms) as a [`Duration`].
    pub fn goodbye_timeout(&self) -> Duration {
        Duration::from_millis(self.goodbye_timeout_ms)
    }

    /// [`reconnect_timeout_ms`](Self::reconnect_timeout_ms) as a [`Duration`].
    pub fn reconnect_timeout(&self) -> Duration {
        Duration::from_millis(self.reconnect_timeout_ms)
    }

    /// Checks every field and converts the protocol ones to their wire types.
    pub(crate) fn validate(&self) -> Result<ValidPublisher, ClientError> {
        if self.brokers.is_empty() {
            return Err(invalid("brokers", "[]", "at least one broker address"));
        }
        let topic = topic(&self.topic)?;
        let order = order(self.order)?;
        let ack =
            AckLevel::try_from(self.ack).map_err(|_| invalid("ack", self.ack, "0, 1 or 2"))?;
        if self.connections_per_broker == 0 {
            return Err(invalid("connections_per_broker", 0, "at least 1"));
        }
        let batch_range = BATCH_BYTES_MIN as usize..=BATCH_BYTES_HARD_MAX as usize;
        if !batch_range.contains(&self.batch_bytes_max) {
            return Err(invalid(
                "batch_bytes_max",
                self.batch_bytes_max,
                "4..=67108864 (64 MiB)",
            ));
        }
        if self.in_flight_batches_max == 0 {
            return Err(invalid("in_flight_batches_max", 0, "at least 1"));
        }
        if self.session_batches_max == 0 {
            return Err(invalid("session_batches_max", 0, "at least 1"));
        }
        check_timeouts_and_buffer(
            &[
                ("connect_timeout_ms", self.connect_timeout_ms),
                ("publish_timeout_ms", self.publish_timeout_ms),
                ("flush_timeout_ms", self.flush_timeout_ms),
                ("goodbye_timeout_ms", self.goodbye_timeout_ms),
                ("reconnect_timeout_ms", self.reconnect_timeout_ms),
            ],
            self.socket_buffer_bytes,
        )?;
        Ok(ValidPublisher { topic, order, ack })
    }
}

/// The protocol fields of a validated [`PublisherConfig`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct ValidPublisher {
    pub topic: Topic,
    pub order: Order,
    pub ack: AckLevel,
}

/// Settings of a [`Subscriber`](crate::Subscriber).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriberConfig {
    /// The broker to read from.
    pub broker: SocketAddr,
    /// Topic name.
    pub topic: String,
    /// The order the topic is expected to have: 0, 1, 2 or 5.
    pub order: u8,
    /// First global position wanted; `u64::MAX` ([`wire::FROM_END`]) = only new messages.
    pub from_position: u64,
    /// Largest Delivery payload wanted; 0 = the broker's limit, else 4..=64 MiB.
    pub batch_bytes_max: u32,
    /// Client identity sent in Hello (informational for subscribers).
    pub client_id: u64,
    /// Bound on connecting plus the Hello/HelloOk exchange.
    pub connect_timeout_ms: u64,
    /// Bound on waiting for the broker's Goodbye when closing.
    pub goodbye_timeout_ms: u64,
    /// `SO_SNDBUF` and `SO_RCVBUF` asked for.
    pub socket_buffer_bytes: usize,
    /// Check each delivery's CRC-32C against its header (default). A subscriber whose
    /// messages carry checksums of their own that it checks, as the loadgen's self-checking
    /// messages do, may leave it off to read each byte once, as Kafka consumers may with
    /// `check.crcs=false`; each delivery's length and message framing are still checked.
    /// Off, a delivery torn by an overwrite in the broker's log (which the broker answers
    /// by resetting the connection, possibly after the whole frame left) is handed out
    /// when its framing holds: only the caller's own checks can refuse it.
    pub verify_checksums: bool,
}

impl SubscriberConfig {
    /// A configuration with the defaults: order 2, from position 0, the broker's batch limit.
    pub fn new(broker: SocketAddr, topic: impl Into<String>) -> Self {
        SubscriberConfig {
            broker,
            topic: topic.into(),
            order: 2,
            from_position: 0,
            batch_bytes_max: 0,
            client_id: default_client_id(),
            connect_timeout_ms: CONNECT_TIMEOUT_MS_DEFAULT,
            goodbye_timeout_ms: GOODBYE_TIMEOUT_MS_DEFAULT,
            socket_buffer_bytes: SOCKET_BUFFER_BYTES_DEFAULT,
            verify_checksums: true,
        }
    }

    /// [`connect_timeout_ms`](Self::connect_timeout_ms) as a [`Duration`].
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// [`goodbye_timeout_ms`](Self::goodbye_timeout_ms) as a [`Duration`].
    pub fn goodbye_timeout(&self) -> Duration {
        Duration::from_millis(self.goodbye_timeout_ms)
    }

    /// Checks every field and converts the protocol ones to their wire types.
    pub(crate) fn validate(&self) -> Result<(Topic, Order), ClientError> {
        let topic = topic(&self.topic)?;
        let order = order(self.order)?;
        if self.batch_bytes_max != 0
            && !(BATCH_BYTES_MIN..=BATCH_BYTES_HARD_MAX).contains(&self.batch_bytes_max)
        {
            return Err(invalid(
                "batch_bytes_max",
                self.batch_bytes_max,
                "0 (the broker's limit) or 4..=67108864",
            ));
        }
        check_timeouts_and_buffer(
            &[
                ("connect_timeout_ms", self.connect_timeout_ms),
                ("goodbye_timeout_ms", self.goodbye_timeout_ms),
            ],
            self.socket_buffer_bytes,
        )?;
        Ok((topic, order))
    }

    /// Whether the subscription starts at the end of the log.
    pub fn from_end(&self) -> bool {
        self.from_position == FROM_END
    }
}

/// Every timeout at least 1 ms, and a socket buffer size the kernel takes (an `int`).
fn check_timeouts_and_buffer(
    timeouts: &[(&'static str, u64)],
    socket_buffer_bytes: usize,
) -> Result<(), ClientError> {
    for &(field, value) in timeouts {
        if value == 0 {
            return Err(invalid(field, 0, "at least 1 ms"));
        }
    }
    if socket_buffer_bytes == 0 || socket_buffer_bytes > i32::MAX as usize {
        return Err(invalid(
            "socket_buffer_bytes",
            socket_buffer_bytes,
            "1..=2147483647",
        ));
    }
    Ok(())
}

pub(crate) fn invalid(
    field: &'static str,
    value: impl ToString,
    expected: &'static str,
) -> ClientError {
    ClientError::InvalidConfig {
        field,
        value: value.to_string(),
        expected,
    }
}

pub(crate) fn topic(name: &str) -> Result<Topic, ClientError> {
    Topic::new(name).map_err(|source| ClientError::InvalidTopic {
        name: name.to_owned(),
        source,
    })
}

pub(crate) fn order(order: u8) -> Result<Order, ClientError> {
    Order::try_from(order).map_err(|_| invalid("order", order, "0, 1, 2 or 5"))
}

/// A client id unlikely to collide with another process's (see
/// [`wire::unique_client_id`]).
pub fn default_client_id() -> u64 {
    wire::unique_client_id()
}

/// The current Unix time in seconds (wrapping into u32), a session epoch that grows with
/// every restart of a client.
pub fn default_session_epoch() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_secs() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PublisherConfig {
        PublisherConfig::new(vec!["127.0.0.1:9000".parse().unwrap()], "orders")
    }

    #[test]
    fn defaults_are_valid() {
        let valid = config().validate().unwrap();
        assert_eq!(valid.order, Order::Total);
        assert_eq!(valid.ack, AckLevel::Ordered);
        let sub = SubscriberConfig::new("127.0.0.1:9000".parse().unwrap(), "orders");
        assert!(sub.validate().is_ok());
        assert!(!sub.from_end());
    }

    #[test]
    fn bad_values_name_the_field_and_the_number() {
        let mut c = config();
        c.order = 3;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "invalid configuration: order = 3; 0, 1, 2 or 5"
        );
        let mut c = config();
        c.connections_per_broker = 0;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("connections_per_broker = 0")
        );
        let mut c = config();
        c.batch_bytes_max = 70 << 20;
        assert!(c.validate().unwrap_err().to_string().contains("73400320"));
        let mut c = config();
        c.topic = "bad topic".into();
        assert!(matches!(
            c.validate(),
            Err(ClientError::InvalidTopic { .. })
        ));
        let mut c = config();
        c.brokers.clear();
        assert!(c.validate().is_err());
        let mut c = config();
        c.in_flight_batches_max = 0;
        assert!(c.validate().is_err());
        let mut c = config();
        c.session_batches_max = 0;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("session_batches_max = 0")
        );
        let mut c = config();
        c.reconnect_timeout_ms = 0;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("reconnect_timeout_ms = 0")
        );
        let mut sub = SubscriberConfig::new("127.0.0.1:9000".parse().unwrap(), "orders");
        sub.batch_bytes_max = 2;
        assert!(
            sub.validate()
                .unwrap_err()
                .to_string()
                .contains("batch_bytes_max = 2")
        );
    }

    #[test]
    fn client_ids_differ() {
        assert_ne!(default_client_id(), default_client_id());
    }
}
