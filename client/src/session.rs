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

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use wire::{
    AckEntry, AckLevel, AckRepr, AckStatus, ErrorCode, ErrorFrameRepr, Frame, FrameKind,
    HelloOkRepr,
};

use crate::batcher::Batcher;
use crate::error::ClientError;
use crate::stats::{LatencySummary, PublisherStats, latency_histogram};

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

/// Identifies one connection of a publisher (never reused).
pub(crate) type ConnId = u64;

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
    /// [`PublisherCore::on_connected`] or [`PublisherCore::on_connect_failed`].
    Connect(ConnectRequest),
    /// Send Goodbye on the connection; it gets nothing more.
    Goodbye(ConnId),
    /// Close the connection now (it has ended for the core).
    Close(ConnId),
}

/// First wait before another connection attempt for a slot.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(20);
/// Longest wait between connection attempts for a slot.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BatchState {
    /// Waiting for its ack (or, at ack 0, for its write).
    Pending,
    /// Reported by `SessionGapSkipped`; waits only for the cumulative ack to pass it.
    Rejected,
}

#[derive(Debug)]
struct Batch {
    seq: u64,
    message_count: u32,
    message_bytes: u64,
    first_message_index: u64,
    sealed_at: Instant,
    bytes: Arc<Vec<u8>>,
    /// Times handed to a connection.
    sends: u32,
    /// Counted in the sent counters (once, at its first complete write, or when it is done).
    counted: bool,
    state: BatchState,
}

#[derive(Debug)]
struct Conn {
    slot: usize,
    addr: SocketAddr,
    /// Batches written to this connection and not yet passed by its cumulative ack, in
    /// increasing sequence.
    in_flight: VecDeque<Batch>,
    /// Highest sequence handed to this connection.
    last_sent: Option<u64>,
    acked_through: Option<u64>,
    goodbye_sent: bool,
    goodbye_received: bool,
}

impl Conn {
    fn new(slot: usize, addr: SocketAddr) -> Self {
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

    fn has_pending(&self) -> bool {
        self.in_flight
            .iter()
            .any(|b| b.state == BatchState::Pending)
    }
}

/// Why a slot wants a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// It has none: its connection failed.
    Replacement,
    /// It has none: a new session epoch started.
    NewSession,
    /// Its connection is on another broker: probe the home broker.
    Home,
}

#[derive(Debug)]
struct Slot {
    home: SocketAddr,
    /// The connection that takes the slot's batches.
    conn: Option<ConnId>,
    /// A connection to the home broker waiting for `conn` (on another broker) to drain.
    parked: Option<ConnId>,
    /// Batches of the slot not on any connection, in increasing sequence.
    queue: VecDeque<Batch>,
    /// Batches of the slot not yet done (acknowledged, rejected or, at ack 0, written).
    outstanding: usize,
    /// The connection attempt in progress: its token.
    attempt: Option<u64>,
    /// When the next attempt is due (`None`: now, or not wanted).
    retry_at: Option<Instant>,
    backoff: Duration,
    /// The broker of the connection that failed last (tried last by the replacement).
    lost: Option<SocketAddr>,
    /// The slot waits for its first connection of a new session epoch.
    new_session: bool,
    batches_sealed: u64,
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
    window: usize,
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
    down_since: Option<Instant>,
    /// When [`tick`](PublisherCore::tick) has work next, as of its last run.
    next_timer: Option<Instant>,
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
            .map(|index| Slot {
                home: params.brokers[index % params.brokers.len()],
                conn: Some(index as ConnId),
                parked: None,
                queue: VecDeque::new(),
                outstanding: 0,
                attempt: None,
                retry_at: None,
                backoff: RECONNECT_BACKOFF_MIN,
                lost: None,
                new_session: false,
                batches_sealed: 0,
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
            window: params.in_flight_batches_max,
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
        ((self.next_seq - self.first_seq) % self.slots.len() as u64) as usize
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
    pub fn linger_deadline(&self) -> Option<Instant> {
        self.batcher.deadline()
    }

    /// Appends a message to the open batch, sealing the batch first when the message does
    /// not fit and afterwards when the linger time has passed. Returns
    /// [`ClientError::WouldBlock`] without taking the message when a seal is needed and the
    /// next slot's window is full (or the session is rolling over).
    pub fn publish(&mut self, message: &[u8], now: Instant) -> Result<(), ClientError> {
        self.check_failed()?;
        if !self.batcher.fits_alone(message.len()) {
            return Err(ClientError::MessageTooLarge {
                message_bytes: message.len(),
                batch_bytes_max: self.batcher.batch_bytes_max(),
            });
        }
        if !self.batcher.fits(message.len()) {
            self.seal(now)?;
        }
        self.batcher.push(message, now);
        self.counters.messages_published += 1;
        self.poll(now);
        Ok(())
    }

    /// Seals the open batch if its linger time has passed and the next window has room, and
    /// runs the timers ([`tick`](Self::tick)) when one is due.
    pub fn poll(&mut self, now: Instant) {
        if self.next_timer.is_some_and(|at| at <= now) {
            self.tick(now);
        }
        if self.batcher.linger_expired(now)
            && !self.rolling
            && self.in_flight(self.next_slot()) < self.window
        {
            // With room in the window, seal() fails only on an earlier failure, which every
            // later call reports anyway.
            let _ = self.seal(now);
        }
    }

    /// Seals the open batch now (if it holds messages) and queues it for its slot.
    pub fn seal(&mut self, now: Instant) -> Result<(), ClientError> {
        self.check_failed()?;
        if self.batcher.is_empty() {
            return Ok(());
        }
        if self.next_seq >= self.session_batches_max {
            self.rolling = true;
            self.maybe_roll_over(now);
            self.check_failed()?;
        }
        let slot = self.next_slot();
        let in_flight_batches = self.in_flight(slot);
        if self.rolling || in_flight_batches >= self.window {
            return Err(ClientError::WouldBlock {
                connection: slot,
                in_flight_batches,
                in_flight_batches_max: self.window,
            });
        }
        let Some(sealed) = self.batcher.seal(self.next_seq, slot) else {
            return Ok(());
        };
        self.next_seq += 1;
        self.counters.batches_sealed += 1;
        let state = &mut self.slots[slot];
        state.batches_sealed += 1;
        state.outstanding += 1;
        state.queue.push_back(Batch {
            seq: sealed.seq,
            message_count: sealed.message_count,
            message_bytes: sealed.message_bytes,
            first_message_index: sealed.first_message_index,
            sealed_at: now,
            bytes: Arc::new(sealed.bytes),
            sends: 0,
            counted: false,
            state: BatchState::Pending,
        });
        self.pump(slot);
        Ok(())
    }

    /// The next thing for the adapter to do.
    pub fn take_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// Hands the slot's queue to its connection, unless the slot waits to move home.
    fn pump(&mut self, slot: usize) {
        let state = &mut self.slots[slot];
        let Some(id) = state.conn else {
            return;
        };
        if state.parked.is_some() || state.queue.is_empty() {
            return;
        }
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        while let Some(mut batch) = state.queue.pop_front() {
            if batch.sends > self.resends_max {
                let error = ClientError::ResendLimit {
                    batch_seq: batch.seq,
                    resends_max: self.resends_max,
                };
                state.queue.push_front(batch);
                self.fail(error);
                return;
            }
            self.counters.batches_resent += u64::from(batch.sends > 0);
            batch.sends += 1;
            conn.last_sent = Some(batch.seq);
            self.commands.push_back(Command::Transmit(Transmit {
                conn: id,
                seq: batch.seq,
                bytes: Arc::clone(&batch.bytes),
            }));
            conn.in_flight.push_back(batch);
        }
    }

    /// Counts a batch as sent, the first time it is known to have been written completely.
    fn count_sent(counters: &mut Counters, batch: &mut Batch) {
        if !batch.counted {
            batch.counted = true;
            counters.batches_sent += 1;
            counters.messages_sent += u64::from(batch.message_count);
            counters.bytes_sent += batch.message_bytes;
        }
    }

    /// A batch is done: out of its slot's window, counted as sent (it reached the broker,
    /// whichever write did it), its buffer back for reuse.
    fn finish(&mut self, slot: usize, mut batch: Batch) {
        Self::count_sent(&mut self.counters, &mut batch);
        self.slots[slot].outstanding -= 1;
        if let Ok(buffer) = Arc::try_unwrap(batch.bytes) {
            self.batcher.recycle(buffer);
        }
    }

    /// The writer wrote batch `seq` completely to connection `conn`. At ack 0 this is what
    /// completes the batch.
    pub fn on_written(&mut self, conn: ConnId, seq: u64, now: Instant) {
        let Some(state) = self.conns.get_mut(&conn) else {
            return;
        };
        if self.ack != AckLevel::FireAndForget {
            if let Ok(index) = state.in_flight.binary_search_by_key(&seq, |b| b.seq) {
                Self::count_sent(&mut self.counters, &mut state.in_flight[index]);
            }
            return;
        }
        // Batches reach a connection's socket in the order they were handed to it.
        if state.in_flight.front().is_some_and(|b| b.seq == seq)
            && let Some(batch) = state.in_flight.pop_front()
        {
            let slot = state.slot;
            self.finish(slot, batch);
            self.after_progress(slot, now);
        }
    }

    /// After batches of `slot` completed: move home if waiting for that, roll over if due.
    fn after_progress(&mut self, slot: usize, now: Instant) {
        self.maybe_move_home(slot);
        self.maybe_roll_over(now);
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

    /// A control frame received on connection `conn` at `now`.
    pub fn on_frame(&mut self, conn: ConnId, frame: Frame, now: Instant) {
        let Some(state) = self.conns.get_mut(&conn) else {
            return;
        };
        let addr = state.addr;
        if let Frame::Goodbye = frame {
            state.goodbye_received = true;
            if !state.goodbye_sent {
                // The broker is leaving: the connection is lost like any other.
                self.commands.push_back(Command::Close(conn));
                self.lose(conn, "unrequested Goodbye", now);
            }
            return;
        }
        if self.failure.is_some() {
            return;
        }
        match frame {
            Frame::Ack(ack) => self.on_ack(conn, &ack, now),
            Frame::Error(error) => self.on_error(conn, error, now),
            other => self.fail(ClientError::UnexpectedFrame {
                addr,
                got: other.kind(),
                expected: "Ack, Error or Goodbye",
            }),
        }
    }

    /// Connection `conn`'s stream ended: `None` at a clean end of stream, else the error.
    /// Unless it was finished (Goodbye exchanged) the connection is lost: its unacknowledged
    /// batches go back to their slot for a resend. A broker that broke the protocol (bytes
    /// or frames it must not send) fails the publisher instead.
    pub fn on_connection_ended(&mut self, conn: ConnId, error: Option<ClientError>, now: Instant) {
        let how = match error {
            Some(
                violation @ (ClientError::Protocol { .. } | ClientError::UnexpectedFrame { .. }),
            ) if self.conns.contains_key(&conn) => {
                let how = violation.to_string();
                self.fail(violation);
                how
            }
            Some(error) => error.to_string(),
            None => "end of stream".to_owned(),
        };
        self.lose(conn, &how, now);
    }

    fn lose(&mut self, id: ConnId, how: &str, now: Instant) {
        let Some(conn) = self.conns.remove(&id) else {
            return;
        };
        self.commands
            .retain(|c| !matches!(c, Command::Transmit(t) if t.conn == id));
        if self.closing {
            return;
        }
        let slot = conn.slot;
        let mut back: Vec<Batch> = conn
            .in_flight
            .into_iter()
            .filter(|b| b.state == BatchState::Pending)
            .collect();
        let state = &mut self.slots[slot];
        if state.conn == Some(id) {
            self.counters.connections_lost += 1;
            log::warn!(
                "{}: connection of slot {slot} lost ({how}); {} unacknowledged batches go to another connection",
                conn.addr,
                back.len()
            );
            state.conn = None;
            state.lost = Some(conn.addr);
            state.retry_at = None;
        } else if state.parked == Some(id) {
            state.parked = None;
        } else if !conn.goodbye_sent {
            log::debug!("{}: connection {id} ended ({how})", conn.addr);
        }
        if !back.is_empty() {
            back.extend(state.queue.drain(..));
            back.sort_by_key(|b| b.seq);
            state.queue = back.into();
        }
        self.maybe_move_home(slot);
        self.pump(slot);
        self.tick(now);
    }

    /// The connection attempt `attempt` of `slot` opened a connection to `addr`. Returns the
    /// id it gets, or `None` when it is not wanted (then the adapter says Goodbye and closes
    /// it).
    pub fn on_connected(
        &mut self,
        slot: usize,
        attempt: u64,
        addr: SocketAddr,
        hello_ok: &HelloOkRepr,
        now: Instant,
    ) -> Option<ConnId> {
        if self.closing || self.failure.is_some() {
            return None;
        }
        let state = self.slots.get_mut(slot)?;
        if state.attempt != Some(attempt) {
            return None;
        }
        state.attempt = None;
        state.backoff = RECONNECT_BACKOFF_MIN;
        let wanted = match (state.conn, state.parked) {
            (None, _) => true,
            (Some(current), None) => {
                addr == state.home && self.conns.get(&current).is_some_and(|c| c.addr != addr)
            }
            (Some(_), Some(_)) => false,
        };
        if !wanted {
            return None;
        }
        if hello_ok.next_batch_seq > self.next_seq {
            self.fail(ClientError::HandshakeMismatch {
                addr,
                field: "next_batch_seq (another client uses this client id and epoch)",
                asked: self.next_seq,
                got: hello_ok.next_batch_seq,
            });
            return None;
        }
        if (hello_ok.batch_bytes_max as usize) < self.batcher.batch_bytes_max() {
            self.fail(ClientError::HandshakeMismatch {
                addr,
                field: "batch_bytes_max (below the limit the batches were built for)",
                asked: self.batcher.batch_bytes_max() as u64,
                got: u64::from(hello_ok.batch_bytes_max),
            });
            return None;
        }
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(id, Conn::new(slot, addr));
        let state = &mut self.slots[slot];
        if state.new_session {
            state.new_session = false;
        } else {
            self.counters.reconnects += 1;
        }
        if state.conn.is_none() {
            log::info!("{addr}: slot {slot} connected (connection {id})");
            state.conn = Some(id);
            state.lost = None;
        } else {
            log::info!("{addr}: the home broker of slot {slot} is back (connection {id})");
            state.parked = Some(id);
        }
        self.maybe_move_home(slot);
        self.pump(slot);
        self.tick(now);
        Some(id)
    }

    /// The connection attempt `attempt` of `slot` reached no broker.
    pub fn on_connect_failed(
        &mut self,
        slot: usize,
        attempt: u64,
        error: ClientError,
        now: Instant,
    ) {
        let Some(state) = self.slots.get_mut(slot) else {
            return;
        };
        if state.attempt != Some(attempt) {
            return;
        }
        state.attempt = None;
        state.retry_at = Some(now + state.backoff);
        state.backoff = (state.backoff * 2).min(RECONNECT_BACKOFF_MAX);
        log::debug!("slot {slot}: connection attempt failed: {error}");
        self.last_connect_error = Some(error);
        self.tick(now);
    }

    /// Moves a slot to its parked home connection once the current one has nothing
    /// unacknowledged (or is gone).
    fn maybe_move_home(&mut self, slot: usize) {
        let state = &mut self.slots[slot];
        let Some(home) = state.parked else {
            return;
        };
        if let Some(current) = state.conn {
            if self.conns.get(&current).is_some_and(Conn::has_pending) {
                return;
            }
            if let Some(conn) = self.conns.get_mut(&current) {
                conn.goodbye_sent = true;
                self.commands.push_back(Command::Goodbye(current));
            }
        }
        state.conn = Some(home);
        state.parked = None;
        state.lost = None;
        self.pump(slot);
    }

    /// Starts the next session epoch once the rolling session has nothing outstanding:
    /// every connection says Goodbye and each slot connects again with the new epoch.
    fn maybe_roll_over(&mut self, now: Instant) {
        if !self.rolling || self.outstanding_batches() > 0 || self.failure.is_some() {
            return;
        }
        let Some(epoch) = self.epoch.checked_add(1) else {
            return self.fail(ClientError::EpochExhausted { epoch: self.epoch });
        };
        log::info!(
            "session epoch {} used its {} batch sequences: starting epoch {epoch}",
            self.epoch,
            self.session_batches_max
        );
        self.epoch = epoch;
        self.first_seq = 0;
        self.next_seq = 0;
        self.rolling = false;
        self.rejected.clear();
        self.counters.session_rollovers += 1;
        for (id, conn) in &mut self.conns {
            if !conn.goodbye_sent {
                conn.goodbye_sent = true;
                self.commands.push_back(Command::Goodbye(*id));
            }
        }
        for state in &mut self.slots {
            state.conn = None;
            state.parked = None;
            state.attempt = None;
            state.retry_at = None;
            state.backoff = RECONNECT_BACKOFF_MIN;
            state.lost = None;
            state.new_session = true;
        }
        self.tick(now);
    }

    /// What a slot wants from the network now.
    fn want(&self, slot: &Slot) -> Option<Want> {
        match slot.conn {
            None if slot.new_session => Some(Want::NewSession),
            None => Some(Want::Replacement),
            Some(current) if slot.parked.is_none() => self
                .conns
                .get(&current)
                .is_some_and(|c| c.addr != slot.home)
                .then_some(Want::Home),
            Some(_) => None,
        }
    }

    /// Brokers a slot tries, in order: for its home probe only the home broker; else its
    /// home broker when a connection to it is open, the other brokers with an open connection
    /// (rotated by the slot's turn, so that the slots of a lost broker spread out), the brokers
    /// without one, and the broker just lost last.
    fn candidates(&self, slot: usize, want: Want) -> Vec<SocketAddr> {
        let state = &self.slots[slot];
        if want == Want::Home {
            return vec![state.home];
        }
        let open = |addr: SocketAddr| {
            state.lost != Some(addr) && self.conns.values().any(|c| c.addr == addr)
        };
        let count = self.brokers.len();
        let others = (1..count).map(|i| self.brokers[(slot + i) % count]);
        let mut live: Vec<SocketAddr> = others.clone().filter(|&a| open(a)).collect();
        if !live.is_empty() {
            let turn = (slot / count) % live.len();
            live.rotate_left(turn);
        }
        let mut candidates = Vec::with_capacity(count);
        let first = open(state.home).then_some(state.home);
        let rest = std::iter::once(state.home)
            .chain(others)
            .filter(|&a| !open(a) && state.lost != Some(a));
        for addr in first.into_iter().chain(live).chain(rest).chain(state.lost) {
            if !candidates.contains(&addr) {
                candidates.push(addr);
            }
        }
        candidates
    }

    /// Runs the timers: starts due connection attempts and gives up when no slot has had a
    /// connection for `reconnect_timeout`.
    pub fn tick(&mut self, now: Instant) {
        self.run_timers(now);
        self.next_timer = self.compute_next_timer();
    }

    fn run_timers(&mut self, now: Instant) {
        if self.closing || self.failure.is_some() {
            return;
        }
        for slot in 0..self.slots.len() {
            let state = &self.slots[slot];
            let Some(want) = self.want(state) else {
                continue;
            };
            if state.attempt.is_some() {
                continue;
            }
            let due = match state.retry_at {
                Some(at) => at,
                None if want == Want::Home => now + state.backoff,
                None => now,
            };
            if due > now {
                self.slots[slot].retry_at = Some(due);
                continue;
            }
            let candidates = self.candidates(slot, want);
            let attempt = self.next_attempt;
            self.next_attempt += 1;
            let state = &mut self.slots[slot];
            state.attempt = Some(attempt);
            state.retry_at = None;
            self.commands.push_back(Command::Connect(ConnectRequest {
                slot,
                attempt,
                session_epoch: self.epoch,
                candidates,
            }));
        }
        if self.slots.iter().any(|s| s.conn.is_some()) {
            self.down_since = None;
            return;
        }
        let since = *self.down_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= self.reconnect_timeout {
            let last_error = self
                .last_connect_error
                .as_ref()
                .map_or_else(|| "none yet".to_owned(), ToString::to_string);
            self.fail(ClientError::Unreachable {
                brokers: self.brokers.len(),
                timeout_ms: self.reconnect_timeout.as_millis() as u64,
                outstanding_batches: self.outstanding_batches(),
                last_error,
            });
        }
    }

    /// When [`tick`](Self::tick) has something to do next (a connection attempt due, or the
    /// give-up deadline), if anything.
    pub fn next_wakeup(&self) -> Option<Instant> {
        self.next_timer
    }

    fn compute_next_timer(&self) -> Option<Instant> {
        if self.closing || self.failure.is_some() {
            return None;
        }
        let retries = self
            .slots
            .iter()
            .filter(|s| s.attempt.is_none())
            .filter_map(|s| s.retry_at);
        let give_up = self.down_since.map(|since| since + self.reconnect_timeout);
        retries.chain(give_up).min()
    }

    fn on_ack(&mut self, id: ConnId, ack: &AckRepr, now: Instant) {
        let conn = &self.conns[&id];
        let addr = conn.addr;
        if self.ack == AckLevel::FireAndForget {
            return self.fail(ClientError::UnexpectedFrame {
                addr,
                got: FrameKind::Ack,
                expected: "no Ack at ack level 0",
            });
        }
        let through = ack.acked_through_seq();
        if let Some(previous) = conn.acked_through
            && through < previous
        {
            return self.fail(ClientError::AckRegressed {
                addr,
                previous,
                got: through,
            });
        }
        if conn.last_sent.is_none_or(|last| through > last) {
            return self.fail(ClientError::AckMismatch {
                addr,
                batch_seq: through,
                problem: "was never sent on this connection (acked_through_seq beyond its last batch)",
            });
        }
        let slot = conn.slot;
        let mut entries = ack.entries().iter().peekable();
        loop {
            let Some(conn) = self.conns.get_mut(&id) else {
                return;
            };
            if conn.in_flight.front().is_none_or(|b| b.seq > through) {
                break;
            }
            let Some(batch) = conn.in_flight.pop_front() else {
                break;
            };
            if let Some(stray) = entries.next_if(|e| e.batch_seq < batch.seq) {
                return self.fail(unmatched(addr, stray));
            }
            let entry = entries.next_if(|e| e.batch_seq == batch.seq);
            match (batch.state, entry) {
                (BatchState::Pending, entry) => {
                    if let Err(error) = self.complete(slot, addr, batch, entry, now) {
                        return self.fail(error);
                    }
                }
                (BatchState::Rejected, None) => {}
                (BatchState::Rejected, Some(entry)) => {
                    return self.fail(ClientError::AckMismatch {
                        addr,
                        batch_seq: entry.batch_seq,
                        problem: "was reported as SessionGapSkipped before",
                    });
                }
            }
        }
        if let Some(stray) = entries.next() {
            return self.fail(unmatched(addr, stray));
        }
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.acked_through = Some(through);
        }
        self.after_progress(slot, now);
    }

    fn complete(
        &mut self,
        slot: usize,
        addr: SocketAddr,
        batch: Batch,
        entry: Option<&AckEntry>,
        now: Instant,
    ) -> Result<(), ClientError> {
        if let Some(entry) = entry
            && entry.message_count != batch.message_count
        {
            return Err(ClientError::AckMismatch {
                addr,
                batch_seq: batch.seq,
                problem: "has a different message count in its ack entry than was sent",
            });
        }
        let latency_us = now.saturating_duration_since(batch.sealed_at).as_micros() as u64;
        self.latency_us.saturating_record(latency_us.max(1));
        let counters = &mut self.counters;
        counters.batches_acked += 1;
        counters.messages_acked += u64::from(batch.message_count);
        counters.bytes_acked += batch.message_bytes;
        let duplicate = entry.is_some_and(|e| e.status == AckStatus::Duplicate);
        counters.batches_duplicate += u64::from(duplicate);
        let global_start = entry.and_then(|e| e.global_start);
        counters.batches_unpositioned += u64::from(global_start.is_none());
        if self.report_acks {
            self.events.push_back(PublisherEvent::Acked {
                batch_seq: batch.seq,
                first_message_index: batch.first_message_index,
                message_count: batch.message_count,
                global_start,
                duplicate,
                latency_us,
            });
        }
        self.finish(slot, batch);
        Ok(())
    }

    fn on_error(&mut self, id: ConnId, error: ErrorFrameRepr, now: Instant) {
        let addr = self.conns[&id].addr;
        match error.code {
            ErrorCode::PoolFull => {
                log::info!(
                    "{addr}: pool full, broker applies backpressure: {}",
                    error.reason()
                );
                self.events.push_back(PublisherEvent::PoolFull {
                    broker: addr,
                    reason: error.reason().to_owned(),
                });
            }
            ErrorCode::SessionGapSkipped => match error.batch_seq {
                Some(seq) => self.on_gap_skipped(addr, seq, error.reason(), now),
                None => self.fail(ClientError::broker(addr, &error)),
            },
            _ => self.fail(ClientError::broker(addr, &error)),
        }
    }

    /// `SessionGapSkipped` names a batch of this session, which is looked up in the slot it
    /// was assigned to (on any of the slot's connections, or in its queue).
    fn on_gap_skipped(&mut self, addr: SocketAddr, seq: u64, reason: &str, now: Instant) {
        if seq < self.first_seq || seq >= self.next_seq {
            return self.fail(ClientError::AckMismatch {
                addr,
                batch_seq: seq,
                problem: "was never sent (named by SessionGapSkipped)",
            });
        }
        if !self.rejected.insert(seq) {
            // The protocol repeats the report when the skipped batch arrives late.
            log::debug!("{addr}: batch {seq} reported as SessionGapSkipped again");
            return;
        }
        let slot = ((seq - self.first_seq) % self.slots.len() as u64) as usize;
        let found = match self.take_rejected(slot, seq) {
            Some(found) => Some(found),
            None if self.ack == AckLevel::FireAndForget => None,
            None => {
                return self.fail(ClientError::AckMismatch {
                    addr,
                    batch_seq: seq,
                    problem: "was acknowledged before and is now reported as SessionGapSkipped",
                });
            }
        };
        log::warn!("{addr}: batch {seq} was not ordered (SessionGapSkipped): {reason}");
        let (first_message_index, message_count) = found.unzip();
        self.counters.batches_rejected += 1;
        self.counters.messages_rejected += u64::from(message_count.unwrap_or(0));
        self.events.push_back(PublisherEvent::Rejected {
            batch_seq: seq,
            first_message_index,
            message_count,
            broker: addr,
            reason: reason.to_owned(),
        });
        self.after_progress(slot, now);
    }

    /// Marks pending batch `seq` of `slot` rejected; returns its first message index and
    /// message count.
    fn take_rejected(&mut self, slot: usize, seq: u64) -> Option<(u64, u32)> {
        let on_connection = self
            .conns
            .values_mut()
            .filter(|c| c.slot == slot)
            .find_map(|c| {
                c.in_flight
                    .iter_mut()
                    .find(|b| b.seq == seq && b.state == BatchState::Pending)
            });
        if let Some(batch) = on_connection {
            batch.state = BatchState::Rejected;
            Self::count_sent(&mut self.counters, batch);
            let found = (batch.first_message_index, batch.message_count);
            self.slots[slot].outstanding -= 1;
            return Some(found);
        }
        let queue = &mut self.slots[slot].queue;
        let index = queue.iter().position(|b| b.seq == seq)?;
        let batch = queue.remove(index)?;
        let found = (batch.first_message_index, batch.message_count);
        self.finish(slot, batch);
        Some(found)
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
        }
    }
}

fn unmatched(addr: SocketAddr, entry: &AckEntry) -> ClientError {
    ClientError::AckMismatch {
        addr,
        batch_seq: entry.batch_seq,
        problem: "is not awaiting an ack on this connection",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::{Decoded, FrameDecoder, HelloOkRepr, Limits, Order, verify_payload};

    const MESSAGE: &[u8] = b"0123456789";
    /// One 10-byte message with its 4-byte prefix.
    const ONE: usize = 14;

    fn addr(index: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9000 + index as u16))
    }

    struct Setup {
        connections: usize,
        per_broker: usize,
        batch_bytes_max: usize,
        linger_us: u64,
        window: usize,
        ack: AckLevel,
        first_seq: u64,
        session_batches_max: u64,
        resends_max: u32,
    }

    impl Default for Setup {
        fn default() -> Self {
            Setup {
                connections: 1,
                per_broker: 1,
                batch_bytes_max: ONE,
                linger_us: 1_000_000,
                window: 8,
                ack: AckLevel::Ordered,
                first_seq: 0,
                session_batches_max: u64::MAX,
                resends_max: 8,
            }
        }
    }

    const RECONNECT_TIMEOUT: Duration = Duration::from_secs(1);

    impl Setup {
        /// `connections` brokers (127.0.0.1:9000, 9001, ...) with `per_broker` connections
        /// each; connection (and slot) `i` goes to broker `i % connections`.
        fn core(self) -> PublisherCore {
            PublisherCore::new(CoreParams {
                brokers: (0..self.connections).map(addr).collect(),
                connections_per_broker: self.per_broker,
                batch_bytes_max: self.batch_bytes_max,
                linger: Duration::from_micros(self.linger_us),
                in_flight_batches_max: self.window,
                ack: self.ack,
                session_epoch: 1,
                first_seq: self.first_seq,
                session_batches_max: self.session_batches_max,
                reconnect_timeout: RECONNECT_TIMEOUT,
                resends_max: self.resends_max,
                report_acks: true,
            })
        }
    }

    fn commands(core: &mut PublisherCore) -> Vec<Command> {
        std::iter::from_fn(|| core.take_command()).collect()
    }

    /// The batches among the commands handed out so far (other commands are dropped).
    fn transmitted(core: &mut PublisherCore) -> Vec<Transmit> {
        transmits(&commands(core))
    }

    fn transmits(commands: &[Command]) -> Vec<Transmit> {
        commands
            .iter()
            .filter_map(|c| match c {
                Command::Transmit(t) => Some(t.clone()),
                _ => None,
            })
            .collect()
    }

    fn connects(commands: &[Command]) -> Vec<ConnectRequest> {
        commands
            .iter()
            .filter_map(|c| match c {
                Command::Connect(request) => Some(request.clone()),
                _ => None,
            })
            .collect()
    }

    fn goodbyes(commands: &[Command]) -> Vec<ConnId> {
        commands
            .iter()
            .filter_map(|c| match c {
                Command::Goodbye(id) => Some(*id),
                _ => None,
            })
            .collect()
    }

    /// Messages in a transmitted batch, from its header.
    fn message_count(batch: &Transmit) -> u32 {
        let mut decoder = FrameDecoder::new(Limits::default());
        match decoder.decode(&batch.bytes) {
            Ok((40, Decoded::Batch(header))) => header.message_count,
            other => panic!("not a batch: {other:?}"),
        }
    }

    fn seqs_and_connections(batches: &[Transmit]) -> Vec<(u64, usize)> {
        batches.iter().map(|b| (b.seq, b.conn as usize)).collect()
    }

    fn hello_ok(next_batch_seq: u64) -> HelloOkRepr {
        HelloOkRepr {
            broker_id: 0,
            batch_bytes_max: 1 << 20,
            order: Order::Total,
            ack: AckLevel::Ordered,
            next_batch_seq,
            log_start: 0,
            log_end: 0,
        }
    }

    fn reset() -> ClientError {
        ClientError::io(
            addr(0),
            "reading",
            std::io::Error::from(std::io::ErrorKind::ConnectionReset),
        )
    }

    fn entry(batch_seq: u64, global_start: Option<u64>, message_count: u32) -> AckEntry {
        AckEntry {
            batch_seq,
            global_start,
            message_count,
            status: AckStatus::Ordered,
        }
    }

    fn ack(through: u64, entries: Vec<AckEntry>) -> Frame {
        Frame::Ack(AckRepr::new(through, entries).unwrap())
    }

    fn error(code: ErrorCode, batch_seq: Option<u64>) -> Frame {
        Frame::Error(ErrorFrameRepr::new(code, batch_seq, "test reason"))
    }

    /// Publishes `count` one-message batches (with the default one-message batch limit)
    /// and seals the last one.
    fn publish_batches(core: &mut PublisherCore, count: usize, now: Instant) {
        for _ in 0..count {
            core.publish(MESSAGE, now).unwrap();
        }
        core.seal(now).unwrap();
    }

    #[test]
    fn sealed_batches_are_valid_frames_in_sequence() {
        let mut core = Setup {
            batch_bytes_max: 3 * ONE,
            ..Setup::default()
        }
        .core();
        let now = Instant::now();
        for _ in 0..7 {
            core.publish(MESSAGE, now).unwrap();
        }
        core.seal(now).unwrap();
        let batches = transmitted(&mut core);
        let counts: Vec<u32> = batches.iter().map(message_count).collect();
        assert_eq!(counts, [3, 3, 1]);
        for (index, batch) in batches.iter().enumerate() {
            let mut decoder = FrameDecoder::new(Limits::default());
            let Ok((40, Decoded::Batch(header))) = decoder.decode(&batch.bytes) else {
                panic!("batch {index} does not start with a batch prefix");
            };
            assert_eq!(header.batch_seq, index as u64);
            verify_payload(&header, &batch.bytes[40..]).unwrap();
        }
    }

    #[test]
    fn size_seals_before_the_message_that_would_overflow() {
        let mut core = Setup {
            batch_bytes_max: 2 * ONE + 3,
            ..Setup::default()
        }
        .core();
        let now = Instant::now();
        core.publish(MESSAGE, now).unwrap();
        core.publish(MESSAGE, now).unwrap();
        assert!(transmitted(&mut core).is_empty(), "two messages fit");
        core.publish(MESSAGE, now).unwrap();
        let sealed = transmitted(&mut core);
        assert_eq!(sealed.len(), 1);
        assert_eq!(message_count(&sealed[0]), 2);
        assert_eq!(sealed[0].bytes.len(), 40 + 2 * ONE);
        assert!(
            !core.is_flushed(),
            "the third message waits in the open batch"
        );
    }

    #[test]
    fn linger_seals_on_publish_and_poll_with_injected_time() {
        let mut core = Setup {
            batch_bytes_max: 100 * ONE,
            linger_us: 500,
            ..Setup::default()
        }
        .core();
        let t0 = Instant::now();
        core.publish(MESSAGE, t0).unwrap();
        assert_eq!(
            core.linger_deadline(),
            Some(t0 + Duration::from_micros(500))
        );
        core.poll(t0 + Duration::from_micros(499));
        assert!(transmitted(&mut core).is_empty());
        core.poll(t0 + Duration::from_micros(500));
        assert_eq!(transmitted(&mut core).len(), 1);
        assert_eq!(core.linger_deadline(), None);

        // A publish after the linger time seals the batch including that message.
        let t1 = t0 + Duration::from_millis(1);
        core.publish(MESSAGE, t1).unwrap();
        core.publish(MESSAGE, t1 + Duration::from_micros(600))
            .unwrap();
        let sealed = transmitted(&mut core);
        assert_eq!(sealed.len(), 1);
        assert_eq!(message_count(&sealed[0]), 2);
    }

    #[test]
    fn linger_zero_seals_every_message() {
        let mut core = Setup {
            batch_bytes_max: 100 * ONE,
            linger_us: 0,
            ..Setup::default()
        }
        .core();
        publish_batches(&mut core, 3, Instant::now());
        let counts: Vec<u32> = transmitted(&mut core).iter().map(message_count).collect();
        assert_eq!(counts, [1, 1, 1]);
    }

    #[test]
    fn batches_go_round_robin_over_all_connections() {
        let mut core = Setup {
            connections: 3,
            ..Setup::default()
        }
        .core();
        publish_batches(&mut core, 8, Instant::now());
        let batches = transmitted(&mut core);
        assert_eq!(
            seqs_and_connections(&batches),
            [
                (0, 0),
                (1, 1),
                (2, 2),
                (3, 0),
                (4, 1),
                (5, 2),
                (6, 0),
                (7, 1)
            ]
        );
        assert_eq!(core.stats().batches_per_connection, [3, 3, 2]);
    }

    #[test]
    fn numbering_starts_at_the_resumed_sequence() {
        let mut core = Setup {
            connections: 2,
            first_seq: 10,
            ..Setup::default()
        }
        .core();
        publish_batches(&mut core, 3, Instant::now());
        assert_eq!(
            seqs_and_connections(&transmitted(&mut core)),
            [(10, 0), (11, 1), (12, 0)]
        );
    }

    #[test]
    fn full_window_gives_would_block_and_keeps_the_message_out() {
        let mut core = Setup {
            connections: 2,
            window: 2,
            ..Setup::default()
        }
        .core();
        let now = Instant::now();
        // Batches 0..3 fill both windows (one message per batch); message 5 opens a batch.
        for _ in 0..5 {
            core.publish(MESSAGE, now).unwrap();
        }
        assert_eq!(transmitted(&mut core).len(), 4);
        assert_eq!((core.in_flight(0), core.in_flight(1)), (2, 2));
        let error = core.publish(MESSAGE, now).unwrap_err();
        assert!(matches!(
            error,
            ClientError::WouldBlock {
                connection: 0,
                in_flight_batches: 2,
                in_flight_batches_max: 2,
            }
        ));
        assert_eq!(
            core.stats().messages_published,
            5,
            "the message was not taken"
        );
        assert!(core.seal(now).unwrap_err().is_would_block());

        // An ack on connection 0 frees one slot: the open batch goes out as seq 4.
        core.on_frame(0, ack(0, vec![entry(0, Some(0), 1)]), now);
        core.publish(MESSAGE, now).unwrap();
        assert_eq!(seqs_and_connections(&transmitted(&mut core)), [(4, 0)]);
        assert_eq!(core.stats().messages_published, 6);
        // The next batch belongs to connection 1, still full.
        assert!(core.seal(now).unwrap_err().is_would_block());
        assert!(core.failure().is_none());
    }

    #[test]
    fn cumulative_acks_with_entries_complete_batches() {
        let mut core = Setup::default().core();
        let t0 = Instant::now();
        publish_batches(&mut core, 5, t0);
        transmitted(&mut core);
        let t1 = t0 + Duration::from_micros(250);
        core.on_frame(
            0,
            ack(
                2,
                vec![
                    entry(0, Some(100), 1),
                    entry(1, Some(101), 1),
                    entry(2, Some(102), 1),
                ],
            ),
            t1,
        );
        assert_eq!(core.outstanding_batches(), 2);
        let stats = core.stats();
        assert_eq!(
            (stats.batches_acked, stats.messages_acked, stats.bytes_acked),
            (3, 3, 30)
        );
        assert_eq!(stats.ack_latency_us.count, 3);
        assert!((249..=251).contains(&stats.ack_latency_us.p50), "{stats:?}");
        // Batch 3 without an entry is acknowledged without a position; batch 4 is a duplicate.
        let duplicate = AckEntry {
            status: AckStatus::Duplicate,
            ..entry(4, Some(7), 1)
        };
        core.on_frame(0, ack(4, vec![duplicate]), t1);
        assert!(core.is_flushed());
        let stats = core.stats();
        assert_eq!(stats.batches_acked, 5);
        assert_eq!(stats.batches_unpositioned, 1);
        assert_eq!(stats.batches_duplicate, 1);
        let events = core.take_events();
        assert_eq!(events.len(), 5);
        assert_eq!(
            events[1],
            PublisherEvent::Acked {
                batch_seq: 1,
                first_message_index: 1,
                message_count: 1,
                global_start: Some(101),
                duplicate: false,
                latency_us: 250,
            }
        );
        assert!(matches!(
            events[4],
            PublisherEvent::Acked {
                duplicate: true,
                ..
            }
        ));
        // A repeated cumulative ack with no entries changes nothing.
        core.on_frame(0, ack(4, vec![]), t1);
        assert!(core.failure().is_none());
    }

    #[test]
    fn acks_are_per_connection() {
        let mut core = Setup {
            connections: 2,
            ..Setup::default()
        }
        .core();
        let now = Instant::now();
        publish_batches(&mut core, 4, now);
        // Connection 1 carries batches 1 and 3; "through 3" on it leaves 0 and 2 alone.
        core.on_frame(
            1,
            ack(3, vec![entry(1, Some(0), 1), entry(3, Some(1), 1)]),
            now,
        );
        assert_eq!((core.in_flight(0), core.in_flight(1)), (2, 0));
        core.on_frame(
            0,
            ack(2, vec![entry(0, Some(2), 1), entry(2, Some(3), 1)]),
            now,
        );
        assert!(core.is_flushed());
        assert!(core.failure().is_none());
    }

    fn failed_after(frames: Vec<(ConnId, Frame)>) -> ClientError {
        let mut core = Setup {
            connections: 2,
            ..Setup::default()
        }
        .core();
        let now = Instant::now();
        publish_batches(&mut core, 4, now);
        for (connection, frame) in frames {
            core.on_frame(connection, frame, now);
        }
        let failure = core
            .failure()
            .cloned()
            .expect("the core should have failed");
        // Every later call reports the same failure.
        let again = core.publish(MESSAGE, now).unwrap_err();
        assert_eq!(again.to_string(), failure.to_string());
        failure
    }

    #[test]
    fn inconsistent_acks_fail_the_publisher() {
        // Entry for batch 1, which went to connection 1, arriving on connection 0.
        let error = failed_after(vec![(0, ack(1, vec![entry(1, Some(0), 1)]))]);
        assert!(
            matches!(error, ClientError::AckMismatch { batch_seq: 1, .. }),
            "{error}"
        );
        // Cumulative ack beyond the last batch sent.
        let error = failed_after(vec![(0, ack(9, vec![]))]);
        assert!(
            matches!(error, ClientError::AckMismatch { batch_seq: 9, .. }),
            "{error}"
        );
        // Going backwards.
        let error = failed_after(vec![(0, ack(2, vec![])), (0, ack(0, vec![]))]);
        assert!(matches!(
            error,
            ClientError::AckRegressed {
                previous: 2,
                got: 0,
                ..
            }
        ));
        // Message count differing from what was sent.
        let error = failed_after(vec![(0, ack(0, vec![entry(0, Some(0), 2)]))]);
        assert!(
            error.to_string().contains("different message count"),
            "{error}"
        );
        // A frame a broker does not send after the handshake.
        let hello_ok = Frame::HelloOk(HelloOkRepr {
            broker_id: 0,
            batch_bytes_max: 1024,
            order: Order::Total,
            ack: AckLevel::Ordered,
            next_batch_seq: 0,
            log_start: 0,
            log_end: 0,
        });
        let error = failed_after(vec![(0, hello_ok)]);
        assert!(matches!(
            error,
            ClientError::UnexpectedFrame {
                got: FrameKind::HelloOk,
                ..
            }
        ));
    }

    #[test]
    fn closing_error_frames_fail_with_their_code() {
        let error = failed_after(vec![(1, error(ErrorCode::ChecksumMismatch, Some(3)))]);
        assert_eq!(error.broker_code(), Some(ErrorCode::ChecksumMismatch));
        assert_eq!(
            error.to_string(),
            "127.0.0.1:9001 refused: checksum mismatch (7) for batch 3: test reason"
        );
    }

    #[test]
    fn pool_full_is_only_a_notice() {
        let mut core = Setup::default().core();
        core.on_frame(0, error(ErrorCode::PoolFull, None), Instant::now());
        assert!(core.failure().is_none());
        assert!(matches!(
            core.take_events()[..],
            [PublisherEvent::PoolFull { .. }]
        ));
    }

    #[test]
    fn session_gap_skipped_rejects_the_batch_and_keeps_going() {
        let mut core = Setup {
            connections: 2,
            batch_bytes_max: 2 * ONE,
            ..Setup::default()
        }
        .core();
        let now = Instant::now();
        // Four batches of two messages: 0 and 2 on connection 0, 1 and 3 on connection 1.
        for _ in 0..8 {
            core.publish(MESSAGE, now).unwrap();
        }
        core.seal(now).unwrap();
        assert_eq!(transmitted(&mut core).len(), 4);
        // Batch 2 (connection 0) is reported on connection 1, where the sequencer noticed.
        core.on_frame(1, error(ErrorCode::SessionGapSkipped, Some(2)), now);
        assert!(core.failure().is_none());
        assert_eq!(core.in_flight(0), 1, "the rejected batch left the window");
        let events = core.take_events();
        assert!(matches!(
            &events[..],
            [PublisherEvent::Rejected {
                batch_seq: 2,
                first_message_index: Some(4),
                message_count: Some(2),
                ..
            }]
        ));
        // The late arrival of batch 2 is reported again: not counted twice.
        core.on_frame(0, error(ErrorCode::SessionGapSkipped, Some(2)), now);
        let stats = core.stats();
        assert_eq!((stats.batches_rejected, stats.messages_rejected), (1, 2));
        // The cumulative ack passes the rejected batch without an entry for it.
        core.on_frame(0, ack(2, vec![entry(0, Some(0), 2)]), now);
        core.on_frame(
            1,
            ack(3, vec![entry(1, Some(2), 2), entry(3, Some(4), 2)]),
            now,
        );
        assert!(core.is_flushed(), "acked or rejected: nothing outstanding");
        assert!(core.failure().is_none());
        assert_eq!(core.stats().messages_acked, 6);
    }

    #[test]
    fn session_gap_skipped_for_impossible_batches_fails() {
        let error = failed_after(vec![(
            0,
            self::error(ErrorCode::SessionGapSkipped, Some(99)),
        )]);
        assert!(error.to_string().contains("never sent"), "{error}");
        let error = failed_after(vec![
            (0, ack(0, vec![entry(0, Some(0), 1)])),
            (0, self::error(ErrorCode::SessionGapSkipped, Some(0))),
        ]);
        assert!(error.to_string().contains("acknowledged before"), "{error}");
        // An entry for a batch reported as skipped.
        let error = failed_after(vec![
            (1, self::error(ErrorCode::SessionGapSkipped, Some(0))),
            (0, ack(0, vec![entry(0, Some(0), 1)])),
        ]);
        assert!(
            error.to_string().contains("SessionGapSkipped before"),
            "{error}"
        );
    }

    #[test]
    fn ack_level_zero_completes_on_write_and_refuses_acks() {
        let mut core = Setup {
            ack: AckLevel::FireAndForget,
            window: 1,
            ..Setup::default()
        }
        .core();
        let now = Instant::now();
        core.publish(MESSAGE, now).unwrap();
        core.publish(MESSAGE, now).unwrap();
        assert!(core.publish(MESSAGE, now).unwrap_err().is_would_block());
        let batch = transmitted(&mut core).remove(0);
        core.on_written(0, batch.seq, now);
        assert_eq!(core.in_flight(0), 0);
        let stats = core.stats();
        assert_eq!(
            (stats.batches_sent, stats.messages_sent, stats.bytes_sent),
            (1, 1, 10)
        );
        assert_eq!(stats.batches_acked, 0);
        core.publish(MESSAGE, now).unwrap();
        core.on_frame(0, ack(0, vec![]), now);
        assert!(matches!(
            core.failure(),
            Some(ClientError::UnexpectedFrame {
                got: FrameKind::Ack,
                ..
            })
        ));
    }

    #[test]
    fn flush_state_follows_the_open_batch_and_outstanding_acks() {
        let mut core = Setup {
            batch_bytes_max: 10 * ONE,
            ..Setup::default()
        }
        .core();
        let now = Instant::now();
        assert!(core.is_flushed());
        core.publish(MESSAGE, now).unwrap();
        assert!(!core.is_flushed(), "a message in the open batch");
        core.seal(now).unwrap();
        assert!(!core.is_flushed(), "a batch awaiting its ack");
        assert_eq!(core.outstanding_batches(), 1);
        core.on_frame(0, ack(0, vec![entry(0, Some(0), 1)]), now);
        assert!(core.is_flushed());
        // Sealing an empty batch is a no-op.
        core.seal(now).unwrap();
        assert_eq!(transmitted(&mut core).len(), 1);
        assert!(core.take_command().is_none());
    }

    #[test]
    fn goodbye_and_end_of_stream() {
        // The answer to our Goodbye, after every ack, finishes the connection cleanly.
        let mut core = Setup::default().core();
        let now = Instant::now();
        publish_batches(&mut core, 1, now);
        assert_eq!(core.start_shutdown(), [0]);
        assert!(!core.connection_finished(0));
        core.on_frame(0, ack(0, vec![entry(0, Some(0), 1)]), now);
        core.on_frame(0, Frame::Goodbye, now);
        assert!(core.connection_finished(0));
        core.on_connection_ended(0, None, now);
        assert!(core.connection_finished(0));
        assert!(core.failure().is_none());

        // An unrequested Goodbye loses the connection: closed, and a replacement is asked for.
        let mut core = Setup::default().core();
        publish_batches(&mut core, 1, now);
        transmitted(&mut core);
        core.on_frame(0, Frame::Goodbye, now);
        let handed_out = commands(&mut core);
        assert!(matches!(handed_out[0], Command::Close(0)), "{handed_out:?}");
        assert_eq!(connects(&handed_out).len(), 1);
        assert!(core.failure().is_none());
        assert_eq!(core.stats().connections_lost, 1);

        // So does an end of stream with batches unacknowledged.
        let mut core = Setup::default().core();
        publish_batches(&mut core, 1, now);
        transmitted(&mut core);
        core.on_connection_ended(0, None, now);
        assert_eq!(connects(&commands(&mut core)).len(), 1);
        assert_eq!(
            core.outstanding_batches(),
            1,
            "the batch waits for a resend"
        );
        assert!(core.failure().is_none());
    }

    #[test]
    fn oversized_messages_are_refused() {
        let mut core = Setup::default().core();
        let error = core.publish(&[0; ONE], Instant::now()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "message of 14 bytes plus its 4-byte length prefix exceeds the batch limit of 14 bytes"
        );
        assert!(core.failure().is_none());
    }

    /// Batches 0..6 over two brokers (even on connection 0, odd on 1), batch 0 acknowledged,
    /// then connection 0 reset.
    fn core_after_a_reset(now: Instant) -> (PublisherCore, Vec<Transmit>) {
        let mut core = Setup {
            connections: 2,
            ..Setup::default()
        }
        .core();
        publish_batches(&mut core, 6, now);
        let sent = transmitted(&mut core);
        core.on_frame(0, ack(0, vec![entry(0, Some(0), 1)]), now);
        core.on_connection_ended(0, Some(reset()), now);
        (core, sent)
    }

    #[test]
    fn a_lost_connection_resends_its_batches_in_order_with_the_same_bytes() {
        let now = Instant::now();
        let (mut core, sent) = core_after_a_reset(now);
        assert!(core.failure().is_none());
        let handed_out = commands(&mut core);
        // A replacement for slot 0: the live broker first, the lost one last.
        assert_eq!(
            connects(&handed_out),
            [ConnectRequest {
                slot: 0,
                attempt: 0,
                session_epoch: 1,
                candidates: vec![addr(1), addr(0)],
            }]
        );
        assert_eq!(core.in_flight(0), 2, "batches 2 and 4 wait for a resend");
        assert_eq!(core.stats().connections_lost, 1);
        // A new batch of slot 0 waits behind them.
        publish_batches(&mut core, 1, now);
        assert!(transmitted(&mut core).is_empty());

        let id = core.on_connected(0, 0, addr(1), &hello_ok(6), now).unwrap();
        let resent = transmitted(&mut core);
        assert_eq!(seqs_and_connections(&resent), [(2, 2), (4, 2), (6, 2)]);
        assert_eq!(id, 2);
        for batch in &resent[..2] {
            let original = sent.iter().find(|s| s.seq == batch.seq).unwrap();
            assert_eq!(batch.bytes, original.bytes, "identical bytes");
        }
        let stats = core.stats();
        assert_eq!((stats.reconnects, stats.batches_resent), (1, 2));
        // A batch counts as sent once, whichever write completed it first (batch 0 counted
        // when it was acknowledged).
        core.on_written(1, 1, now);
        core.on_written(id, 2, now);
        core.on_written(id, 6, now);
        core.on_written(1, 1, now);
        assert_eq!(core.stats().batches_sent, 4);

        // Batch 2 had reached the log before the reset: a duplicate, at its first position.
        let duplicate = AckEntry {
            status: AckStatus::Duplicate,
            ..entry(2, Some(5), 1)
        };
        core.on_frame(
            id,
            ack(
                6,
                vec![duplicate, entry(4, Some(7), 1), entry(6, Some(8), 1)],
            ),
            now,
        );
        core.on_frame(
            1,
            ack(
                5,
                vec![
                    entry(1, Some(1), 1),
                    entry(3, Some(2), 1),
                    entry(5, Some(3), 1),
                ],
            ),
            now,
        );
        assert!(core.is_flushed());
        assert!(core.failure().is_none());
        let events = core.take_events();
        assert!(
            events.iter().any(|e| matches!(
                e,
                PublisherEvent::Acked {
                    batch_seq: 2,
                    global_start: Some(5),
                    duplicate: true,
                    ..
                }
            )),
            "{events:?}"
        );
        let stats = core.stats();
        assert_eq!((stats.batches_acked, stats.batches_duplicate), (7, 1));
    }

    #[test]
    fn an_away_slot_probes_its_home_and_moves_back_once_drained() {
        let now = Instant::now();
        let (mut core, _) = core_after_a_reset(now);
        commands(&mut core);
        let away = core.on_connected(0, 0, addr(1), &hello_ok(0), now).unwrap();
        assert_eq!(transmitted(&mut core).len(), 2);
        // The home broker is probed after a backoff, alone.
        assert!(connects(&commands(&mut core)).is_empty());
        let due = core.next_wakeup().expect("a probe is scheduled");
        assert!(due > now && due <= now + RECONNECT_BACKOFF_MIN);
        core.poll(due);
        let probe = connects(&commands(&mut core));
        assert_eq!(probe.len(), 1);
        assert_eq!(probe[0].candidates, [addr(0)]);
        // A failed probe is retried later, each time after a longer backoff.
        core.on_connect_failed(0, probe[0].attempt, reset(), due);
        let retry = due + RECONNECT_BACKOFF_MIN;
        assert_eq!(core.next_wakeup(), Some(retry));
        core.tick(retry);
        let probe = connects(&commands(&mut core));
        core.on_connect_failed(0, probe[0].attempt, reset(), retry);
        assert_eq!(core.next_wakeup(), Some(retry + 2 * RECONNECT_BACKOFF_MIN));
        core.tick(due + Duration::from_secs(1));
        let probe = connects(&commands(&mut core));
        let later = due + Duration::from_secs(1);

        // The home broker answers while batches 2 and 4 are unacknowledged away: the slot
        // holds its new batches until they are.
        let home = core
            .on_connected(0, probe[0].attempt, addr(0), &hello_ok(0), later)
            .unwrap();
        publish_batches(&mut core, 2, later);
        assert_eq!(seqs_and_connections(&transmitted(&mut core)), [(7, 1)]);
        assert!(goodbyes(&commands(&mut core)).is_empty());
        core.on_frame(
            away,
            ack(4, vec![entry(2, Some(6), 1), entry(4, Some(7), 1)]),
            later,
        );
        let handed_out = commands(&mut core);
        assert_eq!(goodbyes(&handed_out), [away]);
        assert_eq!(seqs_and_connections(&transmits(&handed_out)), [(6, 3)]);
        assert_eq!(home, 3);
        assert_eq!(core.slot_connection(0), Some(home));
        assert_eq!(core.stats().reconnects, 2);
        assert!(core.next_wakeup().is_none(), "every slot is home");
        assert!(core.failure().is_none());
    }

    #[test]
    fn the_slots_of_a_lost_broker_spread_over_the_others() {
        let mut core = Setup {
            connections: 4,
            per_broker: 2,
            ..Setup::default()
        }
        .core();
        let now = Instant::now();
        // Slots 1 and 5 belong to broker 1.
        core.on_connection_ended(1, None, now);
        core.on_connection_ended(5, None, now);
        let requests = connects(&commands(&mut core));
        assert_eq!(requests.len(), 2);
        assert_eq!(requests[0].candidates, [addr(2), addr(3), addr(0), addr(1)]);
        assert_eq!(requests[1].candidates, [addr(3), addr(0), addr(2), addr(1)]);
    }

    #[test]
    fn with_no_connection_for_the_reconnect_timeout_the_publisher_gives_up() {
        let mut core = Setup::default().core();
        let t0 = Instant::now();
        publish_batches(&mut core, 2, t0);
        core.on_connection_ended(0, Some(reset()), t0);
        let mut now = t0;
        while core.failure().is_none() {
            for request in connects(&commands(&mut core)) {
                assert_eq!(request.candidates, [addr(0)]);
                let refused = ClientError::Connect {
                    addr: addr(0),
                    source: Arc::new(std::io::ErrorKind::ConnectionRefused.into()),
                };
                core.on_connect_failed(request.slot, request.attempt, refused, now);
            }
            now = core
                .next_wakeup()
                .expect("a timer is always armed while down");
            assert!(now <= t0 + RECONNECT_TIMEOUT, "never past the give-up time");
            core.tick(now);
        }
        assert_eq!(now, t0 + RECONNECT_TIMEOUT);
        let error = core.failure().unwrap().to_string();
        assert!(
            matches!(
                core.failure(),
                Some(ClientError::Unreachable {
                    brokers: 1,
                    timeout_ms: 1000,
                    outstanding_batches: 2,
                    ..
                })
            ),
            "{error}"
        );
        assert!(error.contains("refused"), "{error}");
        assert!(core.next_wakeup().is_none());
    }

    #[test]
    fn a_batch_resent_too_often_fails_the_publisher() {
        let mut core = Setup {
            resends_max: 1,
            ..Setup::default()
        }
        .core();
        let now = Instant::now();
        publish_batches(&mut core, 1, now);
        // The first resend is within the bound.
        core.on_connection_ended(0, Some(reset()), now);
        let request = connects(&commands(&mut core)).remove(0);
        let connection = core
            .on_connected(0, request.attempt, addr(0), &hello_ok(0), now)
            .unwrap();
        assert!(core.failure().is_none());
        assert_eq!(core.stats().batches_resent, 1);
        core.on_connection_ended(connection, Some(reset()), now);
        let request = connects(&commands(&mut core)).remove(0);
        core.on_connected(0, request.attempt, addr(0), &hello_ok(0), now);
        assert!(matches!(
            core.failure(),
            Some(ClientError::ResendLimit {
                batch_seq: 0,
                resends_max: 1
            })
        ));
    }

    #[test]
    fn a_full_session_drains_then_starts_the_next_epoch_at_zero() {
        let mut core = Setup {
            connections: 2,
            session_batches_max: 3,
            ..Setup::default()
        }
        .core();
        let now = Instant::now();
        publish_batches(&mut core, 3, now);
        assert_eq!(transmitted(&mut core).len(), 3);
        // Batch 3 would be sequence 3: the session drains first.
        core.publish(MESSAGE, now).unwrap();
        assert!(core.seal(now).unwrap_err().is_would_block());
        assert!(core.take_command().is_none());
        core.on_frame(
            0,
            ack(2, vec![entry(0, Some(0), 1), entry(2, Some(2), 1)]),
            now,
        );
        assert_eq!(core.session_epoch(), 1, "batch 1 is still unacknowledged");
        core.on_frame(1, ack(1, vec![entry(1, Some(1), 1)]), now);
        assert_eq!(core.session_epoch(), 2);
        let handed_out = commands(&mut core);
        assert_eq!(goodbyes(&handed_out), [0, 1]);
        let requests = connects(&handed_out);
        assert_eq!(
            requests
                .iter()
                .map(|r| (r.slot, r.session_epoch, r.candidates[0]))
                .collect::<Vec<_>>(),
            [(0, 2, addr(0)), (1, 2, addr(1))]
        );
        // The new session numbers from 0 again, on the new connections.
        core.seal(now).unwrap();
        let first = core
            .on_connected(0, requests[0].attempt, addr(0), &hello_ok(0), now)
            .unwrap();
        assert_eq!(seqs_and_connections(&transmitted(&mut core)), [(0, 2)]);
        assert_eq!(first, 2);
        // A broker that already knows later sequences of this epoch: someone else uses it.
        core.on_connected(1, requests[1].attempt, addr(1), &hello_ok(5), now);
        assert!(matches!(
            core.failure(),
            Some(ClientError::HandshakeMismatch { got: 5, .. })
        ));
        let stats = core.stats();
        assert_eq!((stats.session_rollovers, stats.reconnects), (1, 0));
    }

    #[test]
    fn results_of_outdated_attempts_are_refused() {
        let now = Instant::now();
        let (mut core, _) = core_after_a_reset(now);
        commands(&mut core);
        assert_eq!(core.on_connected(0, 99, addr(1), &hello_ok(0), now), None);
        assert_eq!(core.on_connected(1, 0, addr(1), &hello_ok(0), now), None);
        assert!(
            core.on_connected(0, 0, addr(1), &hello_ok(0), now)
                .is_some()
        );
        assert_eq!(core.on_connected(0, 0, addr(1), &hello_ok(0), now), None);
        // Shutting down: no connection is wanted and losses are final.
        assert_eq!(core.start_shutdown(), [1, 2]);
        core.on_connection_ended(1, Some(reset()), now);
        assert!(connects(&commands(&mut core)).is_empty());
        assert!(core.connection_finished(1));
        assert!(!core.connection_finished(2));
    }
}
