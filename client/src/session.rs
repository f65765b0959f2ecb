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
        batch_bytes_max: usize,
        linger_us: u64,
        window: usize,
        ack: AckLevel,
        first_seq: u64,
    }

    impl Default for Setup {
        fn default() -> Self {
            Setup {
                connections: 1,
                batch_bytes_max: ONE,
                linger_us: 1_000_000,
                window: 8,
                ack: AckLevel::Ordered,
                first_seq: 0,
            }
        }
    }

    impl Setup {
        fn core(self) -> PublisherCore {
            PublisherCore::new(CoreParams {
                connections: (0..self.connections).map(addr).collect(),
                batch_bytes_max: self.batch_bytes_max,
                linger: Duration::from_micros(self.linger_us),
                in_flight_batches_max: self.window,
                ack: self.ack,
                first_seq: self.first_seq,
                report_acks: true,
            })
        }
    }

    fn transmitted(core: &mut PublisherCore) -> Vec<SealedBatch> {
        std::iter::from_fn(|| core.take_transmit()).collect()
    }

    fn seqs_and_connections(batches: &[SealedBatch]) -> Vec<(u64, usize)> {
        batches.iter().map(|b| (b.seq, b.connection)).collect()
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
        let counts: Vec<u32> = batches.iter().map(|b| b.message_count).collect();
        assert_eq!(counts, [3, 3, 1]);
        for (index, batch) in batches.iter().enumerate() {
            let mut decoder = FrameDecoder::new(Limits::default());
            let Ok((40, Decoded::Batch(header))) = decoder.decode(&batch.bytes) else {
                panic!("batch {index} does not start with a batch prefix");
            };
            assert_eq!(header.batch_seq, index as u64);
            verify_payload(&header, &batch.bytes[40..]).unwrap();
            assert_eq!(batch.first_message_index, 3 * index as u64);
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
        assert!(core.take_transmit().is_none(), "two messages fit");
        core.publish(MESSAGE, now).unwrap();
        let sealed = transmitted(&mut core);
        assert_eq!(sealed.len(), 1);
        assert_eq!(sealed[0].message_count, 2);
        assert_eq!(sealed[0].message_bytes, 20);
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
        assert!(core.take_transmit().is_none());
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
        assert_eq!(sealed[0].message_count, 2);
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
        let counts: Vec<u32> = transmitted(&mut core)
            .iter()
            .map(|b| b.message_count)
            .collect();
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

    fn failed_after(frames: Vec<(usize, Frame)>) -> ClientError {
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
        let batch = core.take_transmit().unwrap();
        core.on_written(0, batch.seq, batch.message_count, batch.message_bytes);
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
        assert!(core.take_transmit().is_some());
        assert!(core.take_transmit().is_none());
    }

    #[test]
    fn goodbye_and_end_of_stream() {
        // Unrequested Goodbye fails the publisher.
        let mut core = Setup::default().core();
        let now = Instant::now();
        publish_batches(&mut core, 1, now);
        core.on_frame(0, Frame::Goodbye, now);
        assert!(matches!(
            core.failure(),
            Some(ClientError::ConnectionClosed {
                how: "unrequested Goodbye",
                outstanding_batches: 1,
                ..
            })
        ));

        // The answer to our Goodbye, after every ack, finishes the connection cleanly.
        let mut core = Setup::default().core();
        publish_batches(&mut core, 1, now);
        core.on_goodbye_sent(0);
        assert!(!core.connection_finished(0));
        core.on_frame(0, ack(0, vec![entry(0, Some(0), 1)]), now);
        core.on_frame(0, Frame::Goodbye, now);
        core.on_connection_ended(0, None);
        assert!(core.connection_finished(0));
        assert!(core.failure().is_none());

        // End of stream with batches unacknowledged is a failure.
        let mut core = Setup::default().core();
        publish_batches(&mut core, 1, now);
        core.on_connection_ended(0, None);
        assert!(matches!(
            core.failure(),
            Some(ClientError::ConnectionClosed {
                how: "end of stream",
                outstanding_batches: 1,
                ..
            })
        ));
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
}
