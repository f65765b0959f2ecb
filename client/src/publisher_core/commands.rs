//! What [`PublisherCore`](super::PublisherCore) asks its I/O adapter to do.

use std::net::SocketAddr;
use std::sync::Arc;

/// Identifies one connection of a publisher (never reused).
pub(crate) type ConnId = u64;

/// A batch to write to a connection.
#[derive(Debug, Clone)]
pub(crate) struct Transmit {
    /// The connection.
    pub conn: ConnId,
    /// The batch sequence.
    pub seq: u64,
    /// Frame header, batch header and payload: the same bytes on every send.
    pub bytes: Arc<Vec<u8>>,
}

/// A request to open a connection for a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnectRequest {
    /// The slot.
    pub slot: usize,
    /// Token to hand back with the result.
    pub attempt: u64,
    /// Session epoch to say Hello with.
    pub session_epoch: u32,
    /// Brokers to try once each, in this order; the first that completes the handshake wins.
    pub candidates: Vec<SocketAddr>,
}

/// What the core asks the adapter to do.
#[derive(Debug, Clone)]
pub(crate) enum Command {
    /// Write a batch.
    Transmit(Transmit),
    /// Open a connection in the background and report with
    /// [`PublisherCore::on_connected`](super::PublisherCore::on_connected) or
    /// [`PublisherCore::on_connect_failed`](super::PublisherCore::on_connect_failed).
    Connect(ConnectRequest),
    /// Send Goodbye on the connection; it gets nothing more.
    Goodbye(ConnId),
    /// Close the connection now (it has ended for the core).
    Close(ConnId),
}
