//! [`PublisherCore`]: the publisher's protocol logic without any I/O.
//!
//! The core batches messages, numbers sealed batches with the session-wide `batch_seq`,
//! assigns them round-robin to connections, bounds the batches in flight per connection, and
//! reconciles Acks and Error frames with what it sent. The I/O adapter
//! ([`Publisher`](crate::Publisher)) feeds it frames, write completions and the time, and
//! sends what [`PublisherCore::take_transmit`] hands out.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use wire::{AckEntry, AckLevel, AckRepr, AckStatus, ErrorCode, ErrorFrameRepr, Frame, FrameKind};

use crate::batcher::{Batcher, SealedBatch};
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
        /// Global position of its first message, when the topic has positions.
        global_start: Option<u64>,
        /// Whether the broker found it already in the log (a retry).
        duplicate: bool,
        /// Time from sealing to acknowledgement, in microseconds.
        latency_us: u64,
    },
    /// Order 5: the sequencer gave up waiting for this batch (`SessionGapSkipped`); it was
    /// not ordered and will not be delivered. Nothing else reports this loss.
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

/// Settings of a [`PublisherCore`].
#[derive(Debug, Clone)]
pub(crate) struct CoreParams {
    /// Peer address of each connection, in round-robin order.
    pub connections: Vec<SocketAddr>,
    /// Effective batch payload limit.
    pub batch_bytes_max: usize,
    /// Linger time of an open batch.
    pub linger: Duration,
    /// Batches in flight allowed per connection.
    pub in_flight_batches_max: usize,
    /// The session's ack level.
    pub ack: AckLevel,
    /// Sequence of the first batch (HelloOk's `next_batch_seq`; 0 for a new session).
    pub first_seq: u64,
    /// Record an event per acknowledged batch.
    pub report_acks: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BatchState {
    /// Waiting for its ack (or, at ack 0, for its write).
    Pending,
    /// Reported by `SessionGapSkipped`; waits only for the cumulative ack to pass it.
    Rejected,
}

#[derive(Debug, Clone)]
struct InFlight {
    seq: u64,
    message_count: u32,
    message_bytes: u64,
    first_message_index: u64,
    sealed_at: Instant,
    state: BatchState,
}

#[derive(Debug)]
struct Connection {
    addr: SocketAddr,
    /// Batches assigned to this connection and not yet passed by its cumulative ack, in
    /// increasing sequence.
    in_flight: VecDeque<InFlight>,
    /// Batches of `in_flight` still `Pending`: the window's occupancy.
    pending: usize,
    acked_through: Option<u64>,
    goodbye_sent: bool,
    goodbye_received: bool,
    ended: bool,
    batches_sealed: u64,
}

impl Connection {
    fn find(&self, seq: u64) -> Option<usize> {
        self.in_flight.binary_search_by_key(&seq, |b| b.seq).ok()
    }
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
}

/// The publisher's protocol state machine (see the module docs).
#[derive(Debug)]
pub(crate) struct PublisherCore {
    batcher: Batcher,
    connections: Vec<Connection>,
    window: usize,
    ack: AckLevel,
    first_seq: u64,
    next_seq: u64,
    transmit: VecDeque<SealedBatch>,
    events: VecDeque<PublisherEvent>,
    report_acks: bool,
    rejected: HashSet<u64>,
    failure: Option<ClientError>,
    counters: Counters,
    latency_us: Histogram<u64>,
}

impl PublisherCore {
    /// A core for these connections; `params.connections` must not be empty.
    pub fn new(params: CoreParams) -> Self {
        PublisherCore {
            batcher: Batcher::new(params.batch_bytes_max, params.linger),
            connections: params
                .connections
                .into_iter()
                .map(|addr| Connection {
                    addr,
                    in_flight: VecDeque::new(),
                    pending: 0,
                    acked_through: None,
                    goodbye_sent: false,
                    goodbye_received: false,
                    ended: false,
                    batches_sealed: 0,
                })
                .collect(),
            window: params.in_flight_batches_max,
            ack: params.ack,
            first_seq: params.first_seq,
            next_seq: params.first_seq,
            transmit: VecDeque::new(),
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

    /// The connection the next sealed batch goes to: strict round-robin by sequence, so
    /// consecutive batches go to consecutive connections (and so to different brokers).
    pub fn next_connection(&self) -> usize {
        ((self.next_seq - self.first_seq) % self.connections.len() as u64) as usize
    }

    /// Batches assigned to a connection and not yet acknowledged (or rejected).
    pub fn in_flight(&self, connection: usize) -> usize {
        self.connections.get(connection).map_or(0, |c| c.pending)
    }

    /// Batches sealed and not yet acknowledged, rejected or (at ack 0) written.
    pub fn outstanding_batches(&self) -> usize {
        self.connections.iter().map(|c| c.pending).sum()
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
    /// next connection's window is full.
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

    /// Seals the open batch if its linger time has passed and the next window has room.
    pub fn poll(&mut self, now: Instant) {
        if self.batcher.linger_expired(now) && self.window_has_room() {
            // With room in the window, seal() fails only on an earlier failure, which every
            // later call reports anyway.
            let _ = self.seal(now);
        }
    }

    fn window_has_room(&self) -> bool {
        self.in_flight(self.next_connection()) < self.window
    }

    /// Seals the open batch now (if it holds messages) and queues it for its connection.
    pub fn seal(&mut self, now: Instant) -> Result<(), ClientError> {
        self.check_failed()?;
        let connection = self.next_connection();
        if self.batcher.is_empty() {
            return Ok(());
        }
        let in_flight_batches = self.in_flight(connection);
        if in_flight_batches >= self.window {
            return Err(ClientError::WouldBlock {
                connection,
                in_flight_batches,
                in_flight_batches_max: self.window,
            });
        }
        let Some(batch) = self.batcher.seal(self.next_seq, connection) else {
            return Ok(());
        };
        self.next_seq += 1;
        self.counters.batches_sealed += 1;
        let conn = &mut self.connections[connection];
        conn.batches_sealed += 1;
        conn.pending += 1;
        conn.in_flight.push_back(InFlight {
            seq: batch.seq,
            message_count: batch.message_count,
            message_bytes: batch.message_bytes,
            first_message_index: batch.first_message_index,
            sealed_at: now,
            state: BatchState::Pending,
        });
        self.transmit.push_back(batch);
        Ok(())
    }

    /// The next sealed batch to write to its connection.
    pub fn take_transmit(&mut self) -> Option<SealedBatch> {
        self.transmit.pop_front()
    }

    /// Gives back the buffer of a written batch for reuse.
    pub fn recycle(&mut self, buffer: Vec<u8>) {
        self.batcher.recycle(buffer);
    }

    /// The writer wrote batch `seq` completely to `connection`'s socket. At ack 0 this is
    /// what completes the batch.
    pub fn on_written(
        &mut self,
        connection: usize,
        seq: u64,
        message_count: u32,
        message_bytes: u64,
    ) {
        self.counters.batches_sent += 1;
        self.counters.messages_sent += u64::from(message_count);
        self.counters.bytes_sent += message_bytes;
        if self.ack != AckLevel::FireAndForget {
            return;
        }
        let Some(conn) = self.connections.get_mut(connection) else {
            return;
        };
        // Batches reach a connection's socket in the order they were assigned to it.
        if conn.in_flight.front().is_some_and(|b| b.seq == seq) {
            conn.in_flight.pop_front();
            conn.pending -= 1;
        }
    }

    /// Marks that the adapter sent Goodbye on this connection.
    pub fn on_goodbye_sent(&mut self, connection: usize) {
        if let Some(conn) = self.connections.get_mut(connection) {
            conn.goodbye_sent = true;
        }
    }

    /// Whether the broker answered our Goodbye (or ended the stream) on this connection.
    pub fn connection_finished(&self, connection: usize) -> bool {
        self.connections
            .get(connection)
            .is_some_and(|c| c.goodbye_received || c.ended)
    }

    /// A control frame received on `connection` at `now`.
    pub fn on_frame(&mut self, connection: usize, frame: Frame, now: Instant) {
        let Some(addr) = self.connections.get(connection).map(|c| c.addr) else {
            return;
        };
        if let Frame::Goodbye = frame {
            let conn = &mut self.connections[connection];
            conn.goodbye_received = true;
            if !conn.goodbye_sent {
                let outstanding_batches = conn.pending;
                self.fail(ClientError::ConnectionClosed {
                    addr,
                    how: "unrequested Goodbye",
                    outstanding_batches,
                });
            }
            return;
        }
        if self.failure.is_some() {
            return;
        }
        match frame {
            Frame::Ack(ack) => self.on_ack(connection, &ack, now),
            Frame::Error(error) => self.on_error(connection, error),
            other => self.fail(ClientError::UnexpectedFrame {
                addr,
                got: other.kind(),
                expected: "Ack, Error or Goodbye",
            }),
        }
    }

    /// The connection's stream ended: `None` at a clean end of stream, else the error.
    pub fn on_connection_ended(&mut self, connection: usize, error: Option<ClientError>) {
        let Some(conn) = self.connections.get_mut(connection) else {
            return;
        };
        conn.ended = true;
        let finished_cleanly = conn.goodbye_sent && conn.pending == 0;
        let answered = conn.goodbye_received;
        let outstanding_batches = conn.pending;
        let addr = conn.addr;
        match error {
            // A reset after the Goodbye exchange loses nothing.
            Some(_) if finished_cleanly && answered => {}
            Some(error) => self.fail(error),
            None if finished_cleanly => {}
            None => self.fail(ClientError::ConnectionClosed {
                addr,
                how: "end of stream",
                outstanding_batches,
            }),
        }
    }

    fn on_ack(&mut self, connection: usize, ack: &AckRepr, now: Instant) {
        let addr = self.connections[connection].addr;
        if self.ack == AckLevel::FireAndForget {
            return self.fail(ClientError::UnexpectedFrame {
                addr,
                got: FrameKind::Ack,
                expected: "no Ack at ack level 0",
            });
        }
        let through = ack.acked_through_seq();
        if let Some(previous) = self.connections[connection].acked_through
            && through < previous
        {
            return self.fail(ClientError::AckRegressed {
                addr,
                previous,
                got: through,
            });
        }
        if through >= self.next_seq {
            return self.fail(ClientError::AckMismatch {
                addr,
                batch_seq: through,
                problem: "was never sent (acked_through_seq beyond the last batch)",
            });
        }
        let mut entries = ack.entries().iter().peekable();
        while let Some(batch) = self.connections[connection]
            .in_flight
            .front()
            .filter(|b| b.seq <= through)
            .cloned()
        {
            self.connections[connection].in_flight.pop_front();
            if let Some(stray) = entries.next_if(|e| e.batch_seq < batch.seq) {
                return self.fail(unmatched(addr, stray));
            }
            let entry = entries.next_if(|e| e.batch_seq == batch.seq);
            match (batch.state, entry) {
                (BatchState::Pending, entry) => {
                    if let Err(error) = self.complete(connection, &batch, entry, now) {
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
        self.connections[connection].acked_through = Some(through);
    }

    fn complete(
        &mut self,
        connection: usize,
        batch: &InFlight,
        entry: Option<&AckEntry>,
        now: Instant,
    ) -> Result<(), ClientError> {
        let conn = &mut self.connections[connection];
        if let Some(entry) = entry
            && entry.message_count != batch.message_count
        {
            return Err(ClientError::AckMismatch {
                addr: conn.addr,
                batch_seq: batch.seq,
                problem: "has a different message count in its ack entry than was sent",
            });
        }
        conn.pending -= 1;
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
        Ok(())
    }

    fn on_error(&mut self, connection: usize, error: ErrorFrameRepr) {
        let addr = self.connections[connection].addr;
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
                Some(seq) => self.on_gap_skipped(addr, seq, error.reason()),
                None => self.fail(ClientError::broker(addr, &error)),
            },
            _ => self.fail(ClientError::broker(addr, &error)),
        }
    }

    /// `SessionGapSkipped` names a batch of this session; it may arrive on any connection
    /// (the sequencer gives up on a batch wherever it was sent), so the batch is looked up
    /// on the connection it was assigned to.
    fn on_gap_skipped(&mut self, addr: SocketAddr, seq: u64, reason: &str) {
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
        let owner = ((seq - self.first_seq) % self.connections.len() as u64) as usize;
        let conn = &mut self.connections[owner];
        let found = conn.find(seq).map(|index| &mut conn.in_flight[index]);
        let (first_message_index, message_count) = match found {
            Some(batch) => {
                batch.state = BatchState::Rejected;
                conn.pending -= 1;
                (Some(batch.first_message_index), Some(batch.message_count))
            }
            None if self.ack == AckLevel::FireAndForget => (None, None),
            None => {
                return self.fail(ClientError::AckMismatch {
                    addr,
                    batch_seq: seq,
                    problem: "was acknowledged before and is now reported as SessionGapSkipped",
                });
            }
        };
        log::warn!("{addr}: batch {seq} was not ordered (SessionGapSkipped): {reason}");
        self.counters.batches_rejected += 1;
        self.counters.messages_rejected += u64::from(message_count.unwrap_or(0));
        self.events.push_back(PublisherEvent::Rejected {
            batch_seq: seq,
            first_message_index,
            message_count,
            broker: addr,
            reason: reason.to_owned(),
        });
    }

    /// Drains the recorded events.
    pub fn take_events(&mut self) -> Vec<PublisherEvent> {
        self.events.drain(..).collect()
    }

    /// The ack latency histogram, in microseconds.
    pub fn latency_histogram(&self) -> &Histogram<u64> {
        &self.latency_us
    }

    /// A snapshot of the counters and latency percentiles.
    pub fn stats(&self) -> PublisherStats {
        let c = self.counters;
        PublisherStats {
            messages_published: c.messages_published,
            batches_sealed: c.batches_sealed,
            batches_per_connection: self.connections.iter().map(|c| c.batches_sealed).collect(),
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
