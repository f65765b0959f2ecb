//! The core's bookkeeping records: a sealed [`Batch`], a [`Conn`] with the batches in flight
//! on it, and a [`Slot`] (one FIFO stream of batches and the connections that carry it).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::commands::ConnId;
use super::reconnect::RECONNECT_BACKOFF_MIN;
use units::Timestamp;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BatchState {
    /// Waiting for its ack (or, at ack 0, for its write).
    Pending,
    /// Reported by `SessionGapSkipped`; waits only for the cumulative ack to pass it.
    Rejected,
}

#[derive(Debug)]
pub(super) struct Batch {
    pub seq: u64,
    pub message_count: u32,
    pub message_bytes: u64,
    pub first_message_index: u64,
    pub sealed_at: Timestamp,
    pub bytes: Arc<Vec<u8>>,
    /// Times handed to a connection.
    pub sends: u32,
    /// Counted in the sent counters (once, at its first complete write, or when it is done).
    pub counted: bool,
    pub state: BatchState,
}

#[derive(Debug)]
pub(super) struct Conn {
    pub slot: usize,
    pub addr: SocketAddr,
    /// Batches written to this connection and not yet passed by its cumulative ack, in
    /// increasing sequence.
    pub in_flight: VecDeque<Batch>,
    /// Highest sequence handed to this connection.
    pub last_sent: Option<u64>,
    pub acked_through: Option<u64>,
    pub goodbye_sent: bool,
    pub goodbye_received: bool,
}

impl Conn {
    pub fn new(slot: usize, addr: SocketAddr) -> Self {
        Conn {
            slot,
            addr,
            in_flight: VecDeque::new(),
            last_sent: None,
            acked_through: None,
            goodbye_sent: false,
            goodbye_received: false,
        }
    }

    pub fn has_pending(&self) -> bool {
        self.in_flight
            .iter()
            .any(|b| b.state == BatchState::Pending)
    }

    /// Takes the oldest batch in flight if a cumulative ack through `through` passes it.
    pub fn pop_acked(&mut self, through: u64) -> Option<Batch> {
        if self.in_flight.front().is_some_and(|b| b.seq <= through) {
            self.in_flight.pop_front()
        } else {
            None
        }
    }
}

#[derive(Debug)]
pub(super) struct Slot {
    pub home: SocketAddr,
    /// The connection that takes the slot's batches.
    pub conn: Option<ConnId>,
    /// A connection to the home broker waiting for `conn` (on another broker) to drain.
    pub parked: Option<ConnId>,
    /// When the slot stopped taking batches to wait for that (see [`PARK_DRAIN_MAX`]).
    ///
    /// [`PARK_DRAIN_MAX`]: super::reconnect::PARK_DRAIN_MAX
    pub parked_at: Option<Timestamp>,
    /// Batches of the slot not on any connection, in increasing sequence.
    pub queue: VecDeque<Batch>,
    /// Batches of the slot not yet done (acknowledged, rejected or, at ack 0, written).
    pub outstanding: usize,
    /// The connection attempt in progress: its token.
    pub attempt: Option<u64>,
    /// When the next attempt is due (`None`: now, or not wanted).
    pub retry_at: Option<Timestamp>,
    pub backoff: Duration,
    /// The broker of the connection that failed last (tried last by the replacement).
    pub lost: Option<SocketAddr>,
    /// The slot waits for its first connection of a new session epoch.
    pub new_session: bool,
    pub batches_sealed: u64,
}

impl Slot {
    /// A slot of broker `home` whose batches go to the open connection `conn`.
    pub fn new(home: SocketAddr, conn: ConnId) -> Self {
        Slot {
            home,
            conn: Some(conn),
            parked: None,
            parked_at: None,
            queue: VecDeque::new(),
            outstanding: 0,
            attempt: None,
            retry_at: None,
            backoff: RECONNECT_BACKOFF_MIN,
            lost: None,
            new_session: false,
            batches_sealed: 0,
        }
    }

    /// Forgets the slot's connections and attempts: it waits for a connection of the next
    /// session epoch.
    pub fn start_new_session(&mut self) {
        self.conn = None;
        self.parked = None;
        self.parked_at = None;
        self.attempt = None;
        self.retry_at = None;
        self.backoff = RECONNECT_BACKOFF_MIN;
        self.lost = None;
        self.new_session = true;
    }
}
