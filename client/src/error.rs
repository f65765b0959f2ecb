//! [`ClientError`], everything that can go wrong in the publisher, subscriber and admin calls.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use wire::{ErrorCode, FrameKind};

/// An error of the client library.
///
/// It is `Clone` so a publisher that failed can hand the same error to every later call; I/O
/// errors are shared behind an [`Arc`] for that reason.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// A configuration value is outside what the client or the protocol accepts.
    #[error("invalid configuration: {field} = {value}; {expected}")]
    InvalidConfig {
        /// Name of the configuration field.
        field: &'static str,
        /// The value given, as text.
        value: String,
        /// What the field accepts.
        expected: &'static str,
    },
    /// A topic name the protocol refuses (1 to 64 bytes of `[A-Za-z0-9._-]`).
    #[error("invalid topic name {name:?}: {source}")]
    InvalidTopic {
        /// The name given.
        name: String,
        /// Why the wire format refuses it.
        source: wire::Error,
    },
    /// The TCP connection could not be opened or configured.
    #[error("connecting to {addr} failed: {source}")]
    Connect {
        /// The broker.
        addr: SocketAddr,
        /// The operating system's error.
        source: Arc<io::Error>,
    },
    /// Connecting or the Hello/HelloOk (or CreateTopic/TopicOk) exchange took too long.
    #[error("{what} with {addr} did not finish within {timeout_ms} ms")]
    HandshakeTimeout {
        /// The broker.
        addr: SocketAddr,
        /// Which step timed out.
        what: &'static str,
        /// The time allowed.
        timeout_ms: u64,
    },
    /// Reading from or writing to an open connection failed.
    #[error("i/o with {addr} failed while {doing}: {source}")]
    Io {
        /// The broker.
        addr: SocketAddr,
        /// What the client was doing.
        doing: &'static str,
        /// The operating system's error.
        source: Arc<io::Error>,
    },
    /// The broker closed the connection (end of stream, or a Goodbye the client did not ask
    /// for) while it still owed something.
    #[error(
        "{addr} closed the connection ({how}) with {outstanding_batches} batches unacknowledged"
    )]
    ConnectionClosed {
        /// The broker.
        addr: SocketAddr,
        /// `"end of stream"` or `"unrequested Goodbye"`.
        how: &'static str,
        /// Batches sent on the connection and not yet acknowledged.
        outstanding_batches: usize,
    },
    /// The broker sent bytes that violate the wire protocol.
    #[error("{addr} sent bytes that violate the protocol: {source}")]
    Protocol {
        /// The broker.
        addr: SocketAddr,
        /// What the wire crate found wrong.
        source: wire::Error,
    },
    /// The broker sent a well-formed frame that is not allowed at this point.
    #[error("{addr} sent a {got} frame where {expected} was expected")]
    UnexpectedFrame {
        /// The broker.
        addr: SocketAddr,
        /// Kind of the frame received.
        got: FrameKind,
        /// What the client was waiting for.
        expected: &'static str,
    },
    /// The broker refused with an Error frame (a code that closes the connection, or any code
    /// during a handshake).
    #[error("{addr} refused: {code}{}: {reason}", batch_seq.map(|s| format!(" for batch {s}")).unwrap_or_default())]
    Broker {
        /// The broker.
        addr: SocketAddr,
        /// The protocol error code.
        code: ErrorCode,
        /// The batch concerned, if any.
        batch_seq: Option<u64>,
        /// The broker's explanation.
        reason: String,
    },
    /// The broker keeps no replica of the positions a subscriber asked for and named the
    /// brokers that do (a Redirect); [`Subscriber::connect`](crate::Subscriber::connect)
    /// follows it.
    #[error("{addr} does not keep the positions asked for; it redirected to {brokers:?}")]
    Redirected {
        /// The broker that redirected.
        addr: SocketAddr,
        /// Where to subscribe instead, in the order to try.
        brokers: Vec<SocketAddr>,
    },
    /// The broker's HelloOk (or TopicOk) disagrees with what the client asked for.
    #[error("{addr} answered {field} = {got} but the client asked for {asked}")]
    HandshakeMismatch {
        /// The broker.
        addr: SocketAddr,
        /// The field that differs.
        field: &'static str,
        /// The value the client sent.
        asked: u64,
        /// The value the broker answered.
        got: u64,
    },
    /// An Ack (or SessionGapSkipped) the client cannot reconcile with the batches it sent.
    #[error("{addr} acknowledged batch {batch_seq}, which {problem}")]
    AckMismatch {
        /// The broker.
        addr: SocketAddr,
        /// The batch sequence named by the broker.
        batch_seq: u64,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A cumulative acknowledgement went backwards on a connection.
    #[error("{addr} moved acked_through_seq back from {previous} to {got}")]
    AckRegressed {
        /// The broker.
        addr: SocketAddr,
        /// The previous `acked_through_seq` on this connection.
        previous: u64,
        /// The new, smaller one.
        got: u64,
    },
    /// Non-blocking mode: the connection the next batch must go to has its window full (or
    /// the session is draining before it rolls over to a new epoch). The message was **not**
    /// taken: the caller still owns it and publishes it again later
    /// (after [`Publisher::poll`](crate::Publisher::poll)); nothing is lost.
    #[error(
        "connection {connection} has {in_flight_batches} batches in flight, the window is {in_flight_batches_max}; the message was not taken, publish it again later"
    )]
    WouldBlock {
        /// Index of the connection (see [`Publisher::connection_count`](crate::Publisher::connection_count)).
        connection: usize,
        /// Batches in flight on it.
        in_flight_batches: usize,
        /// The configured window.
        in_flight_batches_max: usize,
    },
    /// A message that cannot fit in any batch.
    #[error(
        "message of {message_bytes} bytes plus its 4-byte length prefix exceeds the batch limit of {batch_bytes_max} bytes"
    )]
    MessageTooLarge {
        /// Length of the message.
        message_bytes: usize,
        /// The effective batch payload limit.
        batch_bytes_max: usize,
    },
    /// A bounded wait (blocking publish, flush) ended before its condition held.
    #[error(
        "{what} did not finish within {timeout_ms} ms ({outstanding_batches} batches still unacknowledged)"
    )]
    Timeout {
        /// What was waited for.
        what: &'static str,
        /// The time allowed.
        timeout_ms: u64,
        /// Batches not yet acknowledged.
        outstanding_batches: usize,
    },
    /// No connection to any broker could be established for `reconnect_timeout_ms`: every
    /// connection had failed and every attempt to open one failed.
    #[error(
        "none of the {brokers} brokers could be reached for {timeout_ms} ms ({outstanding_batches} batches still unacknowledged); last attempt: {last_error}"
    )]
    Unreachable {
        /// Brokers configured.
        brokers: usize,
        /// The `reconnect_timeout_ms` that passed.
        timeout_ms: u64,
        /// Batches not yet acknowledged.
        outstanding_batches: usize,
        /// Why the last connection attempt failed.
        last_error: String,
    },
    /// A batch had to be resent more than `resends_max` times (its connections kept failing).
    #[error("batch {batch_seq} is still unacknowledged after {resends_max} resends; giving up")]
    ResendLimit {
        /// The batch.
        batch_seq: u64,
        /// The configured bound.
        resends_max: u32,
    },
    /// The session epoch cannot grow any further, so no new session can start.
    #[error(
        "session epoch {epoch} is the last one there is; no new session can start (use another client id)"
    )]
    EpochExhausted {
        /// The epoch in use.
        epoch: u32,
    },
    /// The publisher or subscriber was closed.
    #[error("the {what} is closed")]
    Closed {
        /// `"publisher"` or `"subscriber"`.
        what: &'static str,
    },
    /// A Delivery whose payload does not match its header (length, CRC-32C or framing).
    #[error(
        "delivery of batch {batch_seq} from client {client_id} (received by broker {broker_id}) failed verification: {source}"
    )]
    CorruptDelivery {
        /// The publisher's batch sequence.
        batch_seq: u64,
        /// The publisher.
        client_id: u64,
        /// The broker that received the batch.
        broker_id: u16,
        /// What is wrong with the payload.
        source: wire::Error,
    },
}

impl ClientError {
    /// An I/O error of an open connection.
    pub(crate) fn io(addr: SocketAddr, doing: &'static str, source: io::Error) -> Self {
        ClientError::Io {
            addr,
            doing,
            source: Arc::new(source),
        }
    }

    /// [`ClientError::HandshakeTimeout`] for a step that took longer than `timeout`.
    pub(crate) fn handshake_timeout(
        addr: SocketAddr,
        what: &'static str,
        timeout: Duration,
    ) -> Self {
        ClientError::HandshakeTimeout {
            addr,
            what,
            timeout_ms: whole_ms(timeout),
        }
    }

    /// [`ClientError::Timeout`] for a wait that took longer than `timeout`.
    pub(crate) fn timeout(
        what: &'static str,
        timeout: Duration,
        outstanding_batches: usize,
    ) -> Self {
        ClientError::Timeout {
            what,
            timeout_ms: whole_ms(timeout),
            outstanding_batches,
        }
    }

    /// The error for an Error frame the broker sent.
    pub(crate) fn broker(addr: SocketAddr, frame: &wire::ErrorFrameRepr) -> Self {
        ClientError::Broker {
            addr,
            code: frame.code,
            batch_seq: frame.batch_seq,
            reason: frame.reason().to_owned(),
        }
    }

    /// The broker's error code, when the broker refused with an Error frame.
    pub fn broker_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Broker { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether this is [`ClientError::WouldBlock`].
    pub fn is_would_block(&self) -> bool {
        matches!(self, ClientError::WouldBlock { .. })
    }
}

/// A time as the whole milliseconds the error messages report.
pub(crate) fn whole_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
