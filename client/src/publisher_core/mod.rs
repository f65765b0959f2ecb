//! [`PublisherCore`]: the publisher's protocol logic without any I/O.
//!
//! The core batches messages, numbers sealed batches with the session-wide `batch_seq`,
//! assigns them round-robin to connection *slots*, bounds the batches outstanding per slot,
//! and reconciles Acks and Error frames with what it sent. It also decides everything about
//! connections: when a connection fails it puts the slot's unacknowledged batches back in
//! line, asks for a replacement connection (to another broker first), resends them on it in
//! `batch_seq` order, probes the lost broker until it is back, and starts a new session epoch
//! when the session's sequence limit is reached. The I/O adapter
//! ([`Publisher`](crate::Publisher)) feeds it frames, write completions, connection results
//! and the time, and carries out the [`Command`]s it hands out.
//!
//! The core is split by concern: `send` seals batches and hands them to connections, `acks`
//! reconciles what the brokers answer with what was sent, and `reconnect` keeps the slots
//! connected (resends, replacements, moving home, session roll-over); `slot` holds the
//! records they share.
//!
//! # Slots
//! A publisher has `connections_per_broker x brokers` slots; slot `i` belongs to broker
//! `i % brokers` (its *home*). Batch `seq` goes to slot `(seq - first) % slots`, always, so
//! the batches of one slot form one FIFO stream whatever happens to its connections. A slot
//! has at most one *current* connection at a time, and every batch of the slot that is not
//! done is either in flight on one of the slot's connections or waiting in the slot's queue.
//! The broker refuses a `batch_seq` that does not increase on a connection, so batches are
//! only ever resent on a fresh connection, before any newer batch of the slot.
//!
//! When the current connection fails (end of stream, reset, write error, TCP timeout, or a
//! Goodbye the publisher did not ask for), its unacknowledged batches go back to the front of
//! the slot's queue and the core asks for a connection for the slot: live brokers other than
//! the lost one first, the lost one last. The new connection takes the queue in `batch_seq`
//! order, then the slot's new batches. While the slot's connection is not on its home broker
//! the core probes the home broker with backoff; once it answers, the slot stops taking new
//! batches until its current connection has nothing unacknowledged, then says Goodbye to it
//! and moves home. The publisher gives up ([`ClientError::Unreachable`]) when no slot has a
//! connection for `reconnect_timeout`, or ([`ClientError::ResendLimit`]) when one batch was
//! resent more than `resends_max` times.

mod acks;
mod commands;
mod event;
mod reconnect;
mod send;
mod slot;
#[cfg(test)]
mod test_support;
mod window;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use hdrhistogram::Histogram;
use units::Timestamp;
use wire::AckLevel;

use crate::batcher::Batcher;
use crate::error::ClientError;
use crate::stats::{LatencySummary, PublisherStats, latency_histogram};

pub(crate) use commands::{Command, ConnId, ConnectRequest, Transmit};
pub use event::PublisherEvent;
use slot::{Conn, Slot};
pub use window::InFlightWindow;
use window::Window;

/// Settings of a [`PublisherCore`].
#[derive(Debug, Clone)]
pub(crate) struct CoreParams {
    /// Every broker, in configuration order; slot `i` belongs to broker `i % brokers.len()`.
    pub brokers: Vec<SocketAddr>,
    /// Slots (and open connections) per broker; connection `i` of the start is slot `i`.
    pub connections_per_broker: usize,
    /// Effective batch payload limit.
    pub batch_bytes_max: usize,
    /// Linger time of an open batch.
    pub linger: Duration,
    /// Batches outstanding allowed per slot.
    pub in_flight_batches_max: usize,
    /// Whether the window below `in_flight_batches_max` adapts to the path.
    pub in_flight_window: InFlightWindow,
    /// The session's ack level.
    pub ack: AckLevel,
    /// The session epoch of the open connections.
    pub session_epoch: u32,
    /// Sequence of the first batch (HelloOk's `next_batch_seq`; 0 for a new session).
    pub first_seq: u64,
    /// Sequences a session may use (`0..session_batches_max`) before the next epoch starts.
    pub session_batches_max: u64,
    /// How long the publisher may be without any connection before it gives up.
    pub reconnect_timeout: Duration,
    /// How often one batch may be resent.
    pub resends_max: u32,
    /// Record an event per acknowledged batch.
    pub report_acks: bool,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    messages_published: u64,
    batches_sealed: u64,
    batches_sent: u64,
    messages_sent: u64,
    bytes_sent: u64,
    batches_acked: u64,
    messages_acked: u64,
    bytes_acked: u64,
    batches_duplicate: u64,
    batches_unpositioned: u64,
    batches_rejected: u64,
    messages_rejected: u64,
    connections_lost: u64,
    reconnects: u64,
    batches_resent: u64,
    session_rollovers: u64,
}

/// The publisher's protocol state machine (see the module docs).
#[derive(Debug)]
pub(crate) struct PublisherCore {
    batcher: Batcher,
    brokers: Vec<SocketAddr>,
    slots: Vec<Slot>,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: ConnId,
    next_attempt: u64,
    window: Window,
    ack: AckLevel,
    epoch: u32,
    first_seq: u64,
    next_seq: u64,
    session_batches_max: u64,
    /// The session reached `session_batches_max`: drain, then start the next epoch.
    rolling: bool,
    reconnect_timeout: Duration,
    resends_max: u32,
    /// Since when no slot has a connection.
    down_since: Option<Timestamp>,
    /// When [`tick`](PublisherCore::tick) has work next, as of its last run.
    next_timer: Option<Timestamp>,
    last_connect_error: Option<ClientError>,
    /// Shutting down: no more connections, failures are final.
    closing: bool,
    commands: VecDeque<Command>,
    events: VecDeque<PublisherEvent>,
    report_acks: bool,
    rejected: HashSet<u64>,
    failure: Option<ClientError>,
    counters: Counters,
    latency_us: Histogram<u64>,
}

impl PublisherCore {
    /// A core whose connections `0..brokers x connections_per_broker` are open, connection
    /// `i` on slot `i`; `params.brokers` must not be empty.
    pub fn new(params: CoreParams) -> Self {
        let slot_count = params.brokers.len() * params.connections_per_broker;
        let slots = (0..slot_count)
            .map(|index| {
                Slot::new(
                    params.brokers[index % params.brokers.len()],
                    index as ConnId,
                )
            })
            .collect::<Vec<_>>();
        let conns = slots
            .iter()
            .enumerate()
            .map(|(index, slot)| (index as ConnId, Conn::new(index, slot.home)))
            .collect();
        PublisherCore {
            batcher: Batcher::new(params.batch_bytes_max, params.linger),
            brokers: params.brokers,
            slots,
            conns,
            next_conn: slot_count as ConnId,
            next_attempt: 0,
            window: Window::new(params.in_flight_window, params.in_flight_batches_max),
            ack: params.ack,
            epoch: params.session_epoch,
            first_seq: params.first_seq,
            next_seq: params.first_seq,
            session_batches_max: params.session_batches_max,
            rolling: false,
            reconnect_timeout: params.reconnect_timeout,
            resends_max: params.resends_max,
            down_since: None,
            next_timer: None,
            last_connect_error: None,
            closing: false,
            commands: VecDeque::new(),
            events: VecDeque::new(),
            report_acks: params.report_acks,
            rejected: HashSet::new(),
            failure: None,
            counters: Counters::default(),
            latency_us: latency_histogram(),
        }
    }

    /// The effective batch payload limit.
    pub fn batch_bytes_max(&self) -> usize {
        self.batcher.batch_bytes_max()
    }

    /// The current session epoch.
    pub fn session_epoch(&self) -> u32 {
        self.epoch
    }

    /// Number of slots.
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// The home broker of slot `slot` (the first broker for a slot that does not exist).
    pub fn slot_home(&self, slot: usize) -> SocketAddr {
        self.slots.get(slot).map_or(self.brokers[0], |s| s.home)
    }

    /// The connection that takes slot `slot`'s batches now, if any.
    pub fn slot_connection(&self, slot: usize) -> Option<ConnId> {
        self.slots.get(slot).and_then(|s| s.conn)
    }

    /// The error that failed the publisher, if any.
    pub fn failure(&self) -> Option<&ClientError> {
        self.failure.as_ref()
    }

    fn check_failed(&self) -> Result<(), ClientError> {
        match &self.failure {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }

    fn fail(&mut self, error: ClientError) {
        if self.failure.is_none() {
            log::error!("publisher failed: {error}");
            self.failure = Some(error);
        }
    }

    /// The slot the next sealed batch goes to: strict round-robin by sequence, so
    /// consecutive batches go to consecutive slots (and so to different brokers).
    pub fn next_slot(&self) -> usize {
        self.slot_of(self.next_seq)
    }

    /// The slot batch `seq` of the current session belongs to.
    fn slot_of(&self, seq: u64) -> usize {
        ((seq - self.first_seq) % self.slots.len() as u64) as usize
    }

    /// Batches of a slot not yet acknowledged (or rejected, or at ack 0 written).
    pub fn in_flight(&self, slot: usize) -> usize {
        self.slots.get(slot).map_or(0, |s| s.outstanding)
    }

    /// Batches sealed and not yet acknowledged, rejected or (at ack 0) written.
    pub fn outstanding_batches(&self) -> usize {
        self.slots.iter().map(|s| s.outstanding).sum()
    }

    /// Whether every accepted message is in a batch that is done.
    pub fn is_flushed(&self) -> bool {
        self.batcher.is_empty() && self.outstanding_batches() == 0
    }

    /// When the open batch must be sealed, if it holds messages.
    pub fn linger_deadline(&self) -> Option<Timestamp> {
        self.batcher.deadline()
    }

    /// The next thing for the adapter to do.
    pub fn take_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// Starts shutting down: no more connections are made and failures are final. Returns
    /// the connections that still need a Goodbye (marked as sent).
    pub fn start_shutdown(&mut self) -> Vec<ConnId> {
        self.closing = true;
        self.conns
            .iter_mut()
            .filter(|(_, c)| !c.goodbye_sent)
            .map(|(id, c)| {
                c.goodbye_sent = true;
                *id
            })
            .collect()
    }

    /// Whether the broker answered our Goodbye on this connection, or it ended.
    pub fn connection_finished(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_none_or(|c| c.goodbye_received)
    }

    /// After batches of `slot` completed: move home if waiting for that, roll over if due.
    fn after_progress(&mut self, slot: usize, now: Timestamp) {
        self.maybe_move_home(slot);
        self.maybe_roll_over(now);
    }

    /// Each slot's state, for a simulation's report of a run that got stuck.
    #[cfg(feature = "sim")]
    pub fn describe_slots(&self) -> String {
        let mut out = Vec::new();
        for (index, slot) in self.slots.iter().enumerate() {
            let conn = |id: Option<ConnId>| {
                id.and_then(|id| self.conns.get(&id).map(|c| (id, c)))
                    .map_or("none".to_owned(), |(id, c)| {
                        let seqs: Vec<u64> = c.in_flight.iter().map(|b| b.seq).collect();
                        format!(
                            "{id} to {} in flight {seqs:?} acked through {:?}",
                            c.addr, c.acked_through
                        )
                    })
            };
            let queued: Vec<u64> = slot.queue.iter().map(|b| b.seq).collect();
            out.push(format!(
                "slot {index} (home {}): conn {}, parked {}, queue {queued:?}, attempt {:?}, \
                 retry at {:?}",
                slot.home,
                conn(slot.conn),
                conn(slot.parked),
                slot.attempt,
                slot.retry_at
            ));
        }
        out.join("; ")
    }

    /// Drains the recorded events.
    pub fn take_events(&mut self) -> Vec<PublisherEvent> {
        self.events.drain(..).collect()
    }

    /// The ack latency histogram, in microseconds.
    pub fn latency_histogram(&self) -> &Histogram<u64> {
        &self.latency_us
    }

    /// Messages acknowledged so far (cheap, unlike [`Self::stats`]).
    pub fn messages_acked(&self) -> u64 {
        self.counters.messages_acked
    }

    /// A snapshot of the counters and latency percentiles.
    pub fn stats(&self) -> PublisherStats {
        let c = self.counters;
        PublisherStats {
            messages_published: c.messages_published,
            batches_sealed: c.batches_sealed,
            batches_per_connection: self.slots.iter().map(|s| s.batches_sealed).collect(),
            batches_sent: c.batches_sent,
            messages_sent: c.messages_sent,
            bytes_sent: c.bytes_sent,
            batches_acked: c.batches_acked,
            messages_acked: c.messages_acked,
            bytes_acked: c.bytes_acked,
            batches_duplicate: c.batches_duplicate,
            batches_unpositioned: c.batches_unpositioned,
            batches_rejected: c.batches_rejected,
            messages_rejected: c.messages_rejected,
            connections_lost: c.connections_lost,
            reconnects: c.reconnects,
            batches_resent: c.batches_resent,
            session_rollovers: c.session_rollovers,
            ack_latency_us: LatencySummary::of(&self.latency_us),
            // Counted by the socket adapter (the core sees no writes).
            burst_writes: 0,
            burst_write_batches: 0,
            in_flight_window: self.window.current(),
            in_flight_window_changes: self.window.changes(),
        }
    }
}
