//! One client connection: the protocol of `docs/protocol.md` as a state machine over a byte
//! stream, with no I/O of its own. The network backend hands it a [`ByteStream`] (a kernel
//! socket, or a smoltcp socket on the bypass path) and calls it when the stream is readable
//! or writable; time comes in as an argument.
//!
//! Publishers' payloads are received straight into a reservation in the pool; when the pool
//! is full the connection stops reading (TCP backpressure) and never closes for it. A batch
//! that arrives slowly does not keep its room: after `batch_hold_ms` what has arrived moves
//! to staging outside the pool, and the batch is copied in once complete. Every connection
//! has deadlines (docs/protocol.md, "Deadlines and limits"): Hello in time, every batch at a
//! minimum rate; a subscriber that stops reading stops holding the log.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use wire::{
    AckEntry, AckLevel, AckRepr, AckStatus, BatchHeaderRepr, Decoded, DeliveryHeaderRepr,
    ErrorCode, ErrorFrameRepr, Frame, FrameDecoder, HelloOkRepr, HelloRepr, Limits, Order,
    TopicOkRepr,
};

use crate::metrics::Metrics;
use crate::server::limits::ConnectionRefused;
use crate::server::state::{BrokerState, ConnId, PendingSlot, RoutedOutcome};
use shared_log::Retention;
use shared_log::coherence::SharedMemory;
use shared_log::layout::CompletionStatus;
use shared_log::pool::{PoolError, TopicConfig, TopicId};
use shared_log::reader::{LogReader, ReadError};
use shared_log::writer::{AppendError, BatchMeta, ClaimMoved, Reservation};

/// A byte stream the connection reads and writes (non-blocking: `WouldBlock` means "later").
pub trait ByteStream {
    /// Reads into `buf`; `Ok(0)` is the peer's end of stream.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes from `buf`; returns how much was taken.
    fn send(&mut self, buf: &[u8]) -> io::Result<usize>;
}

impl<T: io::Read + io::Write> ByteStream for T {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read(buf)
    }

    fn send(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write(buf)
    }
}

/// Bytes of read-ahead for frame headers and small frames.
const INPUT_BUFFER_BYTES: usize = 64 * 1024;
/// Subscribers get no more deliveries, and no connection's input is read, while this much
/// output is queued (a peer that does not read its Acks is pushed back like a full pool).
const OUTPUT_HIGH_WATER_BYTES: usize = 4 << 20;
/// Sent output is dropped from the front of the queue once this much of it has piled up, so
/// that a peer that always leaves a remainder unread does not make the queue grow for ever.
const OUTPUT_COMPACT_BYTES: usize = 1 << 20;
/// Deliveries produced per call, so one subscriber cannot starve the loop.
const DELIVERIES_PER_POLL: usize = 64;
/// Waiting this long for pool room counts as a receive stall in the metrics.
const STALL: Duration = Duration::from_millis(50);

/// What one [`Connection::service`] call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Service {
    /// What reading found, when the connection read.
    pub input: Option<InputState>,
    /// Whether it wrote output.
    pub wrote: bool,
    /// Whether decisions that waited for replicas were released.
    pub released: bool,
    /// The connection is over (peer gone, stream failed, or everything owed was sent).
    pub ended: bool,
}

impl Service {
    /// Whether anything happened.
    pub fn worked(&self) -> bool {
        self.input.is_some() || self.wrote || self.released
    }
}

/// What a call to [`Connection::on_readable`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputState {
    /// The stream has no more bytes now.
    Drained,
    /// The connection does not want to read now (pool full, closing): call again later.
    Paused,
    /// The peer closed its end, or the stream failed: drop the connection.
    Ended,
}

#[derive(Debug)]
enum Receiving {
    Idle,
    /// A batch header arrived; the payload (or, when `staged`, the whole payload received
    /// and checked in staging) waits for room in the pool.
    WaitingForRoom {
        header: BatchHeaderRepr,
        /// When the first attempt found the pool full (`None`: not tried yet).
        full_since: Option<Instant>,
        stalled: bool,
        staged: Option<Vec<u8>>,
    },
    /// Receiving a payload into the pool.
    Payload {
        header: BatchHeaderRepr,
        reservation: Reservation,
        received: u64,
        /// The whole payload must have arrived by then.
        deadline: Instant,
        /// Still arriving then, it moves to staging if the payload log has been short of
        /// room since (else it costs nobody anything where it is).
        stage_at: Instant,
        /// The writer's full events when the room was reserved.
        full_events: u64,
        /// Staging had no room for it once already (counted once).
        staging_refused: bool,
    },
    /// Receiving a slow payload into staging (`staged` has the payload's size).
    Staging {
        header: BatchHeaderRepr,
        staged: Vec<u8>,
        received: u64,
        deadline: Instant,
    },
}

impl Receiving {
    /// Staging bytes this state holds (to give back when it ends).
    fn staged_bytes(&self) -> u64 {
        match self {
            Receiving::Staging { staged, .. }
            | Receiving::WaitingForRoom {
                staged: Some(staged),
                ..
            } => staged.len() as u64,
            _ => 0,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    batch_seq: u64,
    message_count: u32,
}

#[derive(Debug)]
struct Publisher {
    topic: TopicId,
    order: Order,
    ack: AckLevel,
    client_id: u64,
    session_epoch: u32,
    receiving: Receiving,
    in_flight: VecDeque<InFlight>,
    last_seq: Option<u64>,
    acked_through: Option<u64>,
    ack_entries: Vec<AckEntry>,
    ack_dirty: bool,
    goodbye: bool,
    /// Ack level 2: replica files (besides the pool) that must hold a batch.
    replicas: usize,
    /// Ack level 2: decisions waiting for the replicas, in commit order.
    durable_wait: VecDeque<(RoutedOutcome, InFlight)>,
}

#[derive(Debug)]
struct Subscriber<M> {
    reader: LogReader<M>,
    batch_bytes_max: u32,
    /// Order 0 promises no position, so deliveries carry none.
    positions: bool,
    /// The topic's retention: whether a stalled subscriber stops holding the log.
    retention: Retention,
    /// Last time the subscriber took a delivery or was at the end of the log.
    progress_at: Instant,
    /// Whether its position holds the log (see [`Connection::subscription`]).
    holding: bool,
}

#[derive(Debug)]
enum Peer<M> {
    Handshake,
    Publisher(Box<Publisher>),
    Subscriber(Box<Subscriber<M>>),
    Admin,
}

/// One client connection. See the module docs.
#[derive(Debug)]
pub struct Connection<M> {
    id: ConnId,
    decoder: FrameDecoder,
    input: Vec<u8>,
    input_start: usize,
    input_end: usize,
    output: Vec<u8>,
    output_start: usize,
    role: Peer<M>,
    /// Set once the connection must end after its output is sent (error or goodbye).
    closing: bool,
    /// Before Hello (and between an admin connection's frames): the next frame is due then.
    handshake_deadline: Option<Instant>,
    /// When the connection started closing: its peer has the close timeout to take the rest.
    closing_since: Option<Instant>,
    /// The peer did not take the last bytes within the close timeout: drop the connection.
    abandoned: bool,
    /// Input is paused because too much output is queued (counted once per episode).
    output_full: bool,
}

/// `now + duration`, or a time that never comes if that is beyond the clock's range.
fn after(now: Instant, duration: Duration) -> Instant {
    now.checked_add(duration)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

fn limits(settings: &crate::server::state::BrokerSettings) -> Limits {
    Limits::default()
        .with_batch_bytes_max(settings.batch_bytes_max)
        .and_then(|l| l.with_frame_bytes_max(settings.frame_bytes_max))
        .unwrap_or_default()
}

impl<M: SharedMemory + Clone> Connection<M> {
    /// A new connection, opened at `now`, awaiting its first frame.
    pub fn new(id: ConnId, state: &BrokerState<M>, now: Instant) -> Connection<M> {
        Connection {
            id,
            decoder: FrameDecoder::new(limits(&state.settings)),
            input: vec![0; INPUT_BUFFER_BYTES],
            input_start: 0,
            input_end: 0,
            output: Vec::new(),
            output_start: 0,
            role: Peer::Handshake,
            closing: false,
            handshake_deadline: Some(after(now, state.settings.limits.hello_timeout())),
            closing_since: None,
            abandoned: false,
            output_full: false,
        }
    }

    /// The connection's id.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// True once everything owed was sent and the connection should be closed.
    pub fn is_finished(&self) -> bool {
        (self.closing && !self.has_output()) || self.abandoned
    }

    /// True when output is queued.
    pub fn has_output(&self) -> bool {
        self.output_start < self.output.len()
    }

    /// True when the connection waits for pool room (the loop should retry soon).
    pub fn waits_for_room(&self) -> bool {
        matches!(&self.role, Peer::Publisher(p) if matches!(p.receiving, Receiving::WaitingForRoom { .. }))
    }

    /// For a subscriber that holds the log: its topic and the ordinal of the next batch it
    /// needs. A subscriber that took nothing for the stall limit holds nothing (on topics
    /// with [`Retention::StallLimited`]) until it reads again.
    pub fn subscription(&self) -> Option<(TopicId, u64)> {
        match &self.role {
            Peer::Subscriber(subscriber) if !self.closing && subscriber.holding => {
                Some((subscriber.reader.topic(), subscriber.reader.next_ordinal()))
            }
            _ => None,
        }
    }

    /// True for subscribers, which the loop polls for new deliveries.
    pub fn is_subscriber(&self) -> bool {
        matches!(self.role, Peer::Subscriber(_))
    }

    fn send_frame(&mut self, frame: &Frame) {
        frame.encode(&mut self.output);
    }

    /// Queues an Error frame; a closing code ends the connection once it is sent.
    fn send_error(
        &mut self,
        metrics: &Metrics,
        code: ErrorCode,
        batch_seq: Option<u64>,
        reason: &str,
    ) {
        match Metrics::inc_logged(&metrics.errors_sent) {
            Some(sent) => log::info!(
                "connection {}: error {code}: {reason} ({sent} errors sent by this broker)",
                self.id
            ),
            None => log::debug!("connection {}: error {code}: {reason}", self.id),
        }
        self.send_frame(&Frame::Error(ErrorFrameRepr::new(code, batch_seq, reason)));
        if code.closes_connection() {
            self.closing = true;
        }
    }

    fn protocol_error(&mut self, metrics: &Metrics, error: &wire::Error) {
        match Metrics::inc_logged(&metrics.errors_sent) {
            Some(sent) => log::info!(
                "connection {}: protocol error: {error} ({sent} errors sent by this broker)",
                self.id
            ),
            None => log::debug!("connection {}: protocol error: {error}", self.id),
        }
        self.send_frame(&Frame::Error(ErrorFrameRepr::from_error(error)));
        self.closing = true;
    }

    /// After a publisher's Goodbye nothing more may arrive, yet the stream is still read: the
    /// Acks owed may wait for replicas for a long time (ack 2), and a publisher that gives up
    /// waiting closes its end, which must end the connection here too.
    fn watch_after_goodbye<S: ByteStream>(
        &mut self,
        stream: &mut S,
        state: &BrokerState<M>,
    ) -> InputState {
        if self.input_start == self.input_end
            && let Err(input) = self.refill_input(stream, self.input.len())
        {
            return input;
        }
        let reason = format!(
            "{} bytes arrived after the publisher's Goodbye",
            self.input_end - self.input_start
        );
        self.input_start = self.input_end;
        self.send_error(&state.metrics, ErrorCode::UnexpectedFrame, None, &reason);
        InputState::Paused
    }

    /// Reads up to `want` bytes into the (consumed) input buffer; `Err` says why nothing
    /// came: the stream has no bytes now, or it ended or failed.
    fn refill_input<S: ByteStream>(
        &mut self,
        stream: &mut S,
        want: usize,
    ) -> Result<(), InputState> {
        self.input_start = 0;
        self.input_end = 0;
        loop {
            match stream.recv(&mut self.input[..want]) {
                Ok(0) => return Err(InputState::Ended),
                Ok(n) => {
                    self.input_end = n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(InputState::Drained),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::info!("connection {}: receive failed: {e}", self.id);
                    return Err(InputState::Ended);
                }
            }
        }
    }

    /// Reads and handles as much input as the stream and the pool allow.
    pub fn on_readable<S: ByteStream>(
        &mut self,
        stream: &mut S,
        state: &mut BrokerState<M>,
        now: Instant,
    ) -> InputState {
        loop {
            if self.closing {
                return InputState::Paused;
            }
            if self.output.len() - self.output_start > OUTPUT_HIGH_WATER_BYTES {
                if !self.output_full {
                    self.output_full = true;
                    Metrics::inc(&state.metrics.output_full_waits);
                }
                return InputState::Paused;
            }
            self.output_full = false;
            if matches!(&self.role, Peer::Publisher(p) if p.goodbye) {
                return self.watch_after_goodbye(stream, state);
            }
            if let Some(result) = self.continue_batch(stream, state, now) {
                match result {
                    Step::Continue => continue,
                    Step::Stop(input) => return input,
                }
            }
            if self.input_start == self.input_end {
                // Read no further than a batch's prefix: its payload then goes from the socket
                // straight into the pool instead of through this buffer.
                let want = self
                    .decoder
                    .wanted()
                    .max(wire::BATCH_PREFIX_BYTES)
                    .min(self.input.len());
                if let Err(input) = self.refill_input(stream, want) {
                    return input;
                }
            }
            let decoded = self
                .decoder
                .decode(&self.input[self.input_start..self.input_end]);
            match decoded {
                Err(error) => {
                    self.protocol_error(&state.metrics, &error);
                    return InputState::Paused;
                }
                Ok((consumed, decoded)) => {
                    self.input_start += consumed;
                    match decoded {
                        Decoded::NeedMore(_) => {}
                        Decoded::Frame(frame) => self.on_frame(frame, state, now),
                        Decoded::Batch(header) => self.on_batch_header(header, state),
                        Decoded::Delivery(_) => self.send_error(
                            &state.metrics,
                            ErrorCode::BadRole,
                            None,
                            "brokers send Delivery frames, they do not receive them",
                        ),
                        Decoded::Payload { .. } => self.send_error(
                            &state.metrics,
                            ErrorCode::Internal,
                            None,
                            "payload bytes reached the frame decoder",
                        ),
                    }
                }
            }
        }
    }

    /// Advances a batch being received; `None` when no batch is in progress.
    fn continue_batch<S: ByteStream>(
        &mut self,
        stream: &mut S,
        state: &mut BrokerState<M>,
        now: Instant,
    ) -> Option<Step> {
        let Peer::Publisher(publisher) = &mut self.role else {
            return None;
        };
        let buffered = &self.input[self.input_start..self.input_end];
        match &mut publisher.receiving {
            Receiving::Idle => None,
            Receiving::WaitingForRoom {
                header,
                full_since,
                stalled,
                staged,
            } => {
                let header = *header;
                let topic = state
                    .topics
                    .get_mut(&publisher.topic)
                    .expect("publisher's topic state");
                match topic.writer.reserve(u64::from(header.payload_bytes)) {
                    Ok(mut reservation) => {
                        if let Some(staged) = staged.take() {
                            // Received and checked in staging: into the pool in one copy.
                            topic.writer.write_payload(&mut reservation, &staged);
                            state.staging.give_back(staged.len() as u64);
                            state
                                .metrics
                                .staging_bytes
                                .store(state.staging.used_bytes(), Ordering::Relaxed);
                            publisher.receiving = Receiving::Idle;
                            self.commit_batch(state, reservation, header, now);
                            return Some(Step::Continue);
                        }
                        let limits = &state.settings.limits;
                        publisher.receiving = Receiving::Payload {
                            header,
                            reservation,
                            received: 0,
                            deadline: after(
                                now,
                                limits.batch_deadline(u64::from(header.payload_bytes)),
                            ),
                            stage_at: after(now, limits.batch_hold()),
                            full_events: topic.writer.full_events(),
                            staging_refused: false,
                        };
                        Some(Step::Continue)
                    }
                    Err(AppendError::RingFull { .. } | AppendError::LogFull { .. }) => {
                        match full_since {
                            None => {
                                *full_since = Some(now);
                                Metrics::inc(&state.metrics.ring_full_waits);
                            }
                            Some(since) if !*stalled && now.duration_since(*since) > STALL => {
                                *stalled = true;
                                Metrics::inc(&state.metrics.receive_stalls_over_50ms);
                            }
                            Some(_) => {}
                        }
                        Some(Step::Stop(InputState::Paused))
                    }
                    Err(AppendError::ClaimMoved(moved)) => {
                        self.end_for_claim_moved(state, moved);
                        Some(Step::Stop(InputState::Paused))
                    }
                    Err(other) => {
                        let staged_bytes = publisher.receiving.staged_bytes();
                        publisher.receiving = Receiving::Idle;
                        self.give_back_staging(state, staged_bytes);
                        let reason = other.to_string();
                        self.send_error(
                            &state.metrics,
                            ErrorCode::BatchTooLarge,
                            Some(header.batch_seq),
                            &reason,
                        );
                        Some(Step::Stop(InputState::Paused))
                    }
                }
            }
            Receiving::Payload {
                header,
                reservation,
                received,
                ..
            } => {
                let total = u64::from(header.payload_bytes);
                let writer = &state
                    .topics
                    .get(&publisher.topic)
                    .expect("publisher's topic state")
                    .writer;
                let at = *received as usize;
                let want = (total - *received) as usize;
                let id = self.id;
                let got = writer.fill(reservation, |payload| {
                    receive_payload(buffered, stream, &mut payload[at..at + want], id)
                });
                self.payload_arrived(got, state, now)
            }
            Receiving::Staging {
                staged, received, ..
            } => {
                let at = *received as usize;
                let got = receive_payload(buffered, stream, &mut staged[at..], self.id);
                self.payload_arrived(got, state, now)
            }
        }
    }

    /// Books `got` payload bytes received by [`receive_payload`] into the batch in
    /// progress, and finishes the batch once its payload is complete.
    fn payload_arrived(
        &mut self,
        got: Result<PayloadRead, Step>,
        state: &mut BrokerState<M>,
        now: Instant,
    ) -> Option<Step> {
        let read = match got {
            Ok(read) => read,
            Err(step) => return Some(step),
        };
        if read.buffered {
            self.input_start += read.bytes;
        }
        let complete = match &mut self.role {
            Peer::Publisher(publisher) => match &mut publisher.receiving {
                Receiving::Payload {
                    header, received, ..
                }
                | Receiving::Staging {
                    header, received, ..
                } => {
                    *received += read.bytes as u64;
                    *received == u64::from(header.payload_bytes)
                }
                _ => false,
            },
            _ => false,
        };
        if let Err(error) = self.decoder.payload_received(read.bytes) {
            self.protocol_error(&state.metrics, &error);
            return Some(Step::Stop(InputState::Paused));
        }
        if complete {
            self.finish_batch(state, now);
        }
        Some(Step::Continue)
    }

    /// Applies the batch deadline and the move to staging to the batch in progress, and the
    /// handshake deadline before Hello. Called on every turn of the loop, read or not.
    fn check_deadlines(&mut self, state: &mut BrokerState<M>, now: Instant) {
        if self.closing {
            let since = *self.closing_since.get_or_insert(now);
            let timeout = state.settings.limits.close_timeout();
            if !self.abandoned
                && self.has_output()
                && now.saturating_duration_since(since) >= timeout
            {
                self.abandoned = true;
                if let Some(count) = Metrics::inc_logged(&state.metrics.close_deadlines_expired) {
                    log::info!(
                        "connection {}: its peer did not take the last {} bytes within {} ms \
                         (--close-timeout-ms): dropped ({count} so far)",
                        self.id,
                        self.output.len() - self.output_start,
                        timeout.as_millis()
                    );
                }
            }
            return;
        }
        if let Some(deadline) = self.handshake_deadline
            && now >= deadline
        {
            if let Some(count) = Metrics::inc_logged(&state.metrics.hello_deadlines_expired) {
                log::info!(
                    "connection {}: no Hello in time ({count} such connections closed)",
                    self.id
                );
            }
            let reason = format!(
                "no Hello or CreateTopic within {} ms (--hello-timeout-ms)",
                state.settings.limits.hello_timeout_ms
            );
            self.send_error(&state.metrics, ErrorCode::DeadlineExpired, None, &reason);
            return;
        }
        let Peer::Publisher(publisher) = &mut self.role else {
            return;
        };
        let (header, received, deadline) = match &publisher.receiving {
            Receiving::Payload {
                header,
                received,
                deadline,
                ..
            }
            | Receiving::Staging {
                header,
                received,
                deadline,
                ..
            } => (*header, *received, *deadline),
            _ => return,
        };
        if now >= deadline {
            self.drop_batch(state);
            if let Some(count) = Metrics::inc_logged(&state.metrics.batch_deadlines_expired) {
                log::info!(
                    "connection {}: batch {} arrived slower than the minimum rate ({count} such \
                     batches dropped)",
                    self.id,
                    header.batch_seq
                );
            }
            let limits = &state.settings.limits;
            let reason = format!(
                "batch {}: {received} of {} payload bytes arrived within {} ms; a batch must \
                 arrive within {} ms plus its size at {} bytes/s (--batch-grace-ms, \
                 --batch-min-bytes-per-s)",
                header.batch_seq,
                header.payload_bytes,
                limits
                    .batch_deadline(u64::from(header.payload_bytes))
                    .as_millis(),
                limits.batch_grace_ms,
                limits.batch_min_bytes_per_s
            );
            self.send_error(
                &state.metrics,
                ErrorCode::DeadlineExpired,
                Some(header.batch_seq),
                &reason,
            );
            return;
        }
        self.stage_if_slow(state, now);
    }

    /// Moves a batch still arriving after `batch_hold_ms` out of the pool: what has arrived
    /// is copied to staging and the reservation given back, so that reclaiming the topic's
    /// payload log never waits on this connection.
    fn stage_if_slow(&mut self, state: &mut BrokerState<M>, now: Instant) {
        let Peer::Publisher(publisher) = &mut self.role else {
            return;
        };
        let Receiving::Payload {
            header,
            stage_at,
            full_events,
            staging_refused,
            ..
        } = &mut publisher.receiving
        else {
            return;
        };
        let under_pressure = state
            .topics
            .get(&publisher.topic)
            .is_some_and(|topic| topic.writer.full_events() > *full_events);
        if now < *stage_at || !under_pressure {
            return;
        }
        let limits = state.settings.limits;
        let payload_bytes = u64::from(header.payload_bytes);
        if !state.staging.take(payload_bytes, &limits) {
            // Staging is full: try again after another hold (the deadline still applies).
            *stage_at = after(now, limits.batch_hold());
            if !*staging_refused {
                *staging_refused = true;
                if let Some(count) = Metrics::inc_logged(&state.metrics.staging_full) {
                    log::warn!(
                        "connection {}: a slow batch keeps its room in the pool: staging is \
                         full (--staging-bytes-max {}; {count} such batches so far)",
                        self.id,
                        limits.staging_bytes_max
                    );
                }
            }
            return;
        }
        let Receiving::Payload {
            header,
            reservation,
            received,
            deadline,
            ..
        } = std::mem::replace(&mut publisher.receiving, Receiving::Idle)
        else {
            unreachable!("matched above");
        };
        let mut staged = vec![0u8; payload_bytes as usize];
        let topic = state
            .topics
            .get_mut(&publisher.topic)
            .expect("publisher's topic state");
        let arrived = received as usize;
        topic.writer.fill(&reservation, |payload| {
            staged[..arrived].copy_from_slice(&payload[..arrived]);
        });
        topic.writer.abort(reservation);
        publisher.receiving = Receiving::Staging {
            header,
            staged,
            received,
            deadline,
        };
        Metrics::inc(&state.metrics.batches_staged);
        state
            .metrics
            .staging_bytes
            .store(state.staging.used_bytes(), Ordering::Relaxed);
    }

    fn give_back_staging(&self, state: &mut BrokerState<M>, bytes: u64) {
        if bytes > 0 {
            state.staging.give_back(bytes);
            state
                .metrics
                .staging_bytes
                .store(state.staging.used_bytes(), Ordering::Relaxed);
        }
    }

    fn on_batch_header(&mut self, header: BatchHeaderRepr, state: &mut BrokerState<M>) {
        let Peer::Publisher(publisher) = &mut self.role else {
            let reason = "Batch frames are only accepted after a publisher Hello";
            self.send_error(
                &state.metrics,
                ErrorCode::UnexpectedFrame,
                Some(header.batch_seq),
                reason,
            );
            return;
        };
        if publisher
            .last_seq
            .is_some_and(|last| header.batch_seq <= last)
        {
            let reason = format!(
                "batch_seq {} does not follow {} on this connection: sequences must increase",
                header.batch_seq,
                publisher.last_seq.unwrap_or_default()
            );
            self.send_error(
                &state.metrics,
                ErrorCode::InvalidBatchHeader,
                Some(header.batch_seq),
                &reason,
            );
            return;
        }
        publisher.last_seq = Some(header.batch_seq);
        // `continue_batch` reserves the room (and counts a wait only if there is none).
        publisher.receiving = Receiving::WaitingForRoom {
            header,
            full_since: None,
            stalled: false,
            staged: None,
        };
    }

    /// A payload is complete: checks it (in the pool, or in staging) and commits it.
    fn finish_batch(&mut self, state: &mut BrokerState<M>, now: Instant) {
        let Peer::Publisher(publisher) = &mut self.role else {
            return;
        };
        match std::mem::replace(&mut publisher.receiving, Receiving::Idle) {
            Receiving::Payload {
                header,
                reservation,
                ..
            } => {
                let topic = state
                    .topics
                    .get_mut(&publisher.topic)
                    .expect("publisher's topic state");
                let verdict = topic.writer.fill(&reservation, |payload| {
                    wire::verify_payload(&header, payload)
                });
                if let Err(error) = verdict {
                    topic.writer.abort(reservation);
                    self.protocol_error(&state.metrics, &error);
                    return;
                }
                self.commit_batch(state, reservation, header, now);
            }
            Receiving::Staging { header, staged, .. } => {
                if let Err(error) = wire::verify_payload(&header, &staged) {
                    self.give_back_staging(state, staged.len() as u64);
                    self.protocol_error(&state.metrics, &error);
                    return;
                }
                // Into the pool as soon as there is room (at once, unless it is full).
                publisher.receiving = Receiving::WaitingForRoom {
                    header,
                    full_since: None,
                    stalled: false,
                    staged: Some(staged),
                };
            }
            other => publisher.receiving = other,
        }
    }

    /// Publishes a filled and checked reservation and books the batch as in flight.
    fn commit_batch(
        &mut self,
        state: &mut BrokerState<M>,
        reservation: Reservation,
        header: BatchHeaderRepr,
        now: Instant,
    ) {
        let Peer::Publisher(publisher) = &mut self.role else {
            return;
        };
        let topic = state
            .topics
            .get_mut(&publisher.topic)
            .expect("publisher's topic state");
        let meta = BatchMeta {
            client_id: publisher.client_id,
            session_epoch: publisher.session_epoch,
            batch_seq: header.batch_seq,
            message_count: header.message_count,
            checksum: header.checksum,
        };
        if let Err(moved) = topic.writer.commit(reservation, meta) {
            self.end_for_claim_moved(state, moved);
            return;
        }
        topic.pending.push_back(PendingSlot {
            conn: self.id,
            batch_seq: header.batch_seq,
            message_count: header.message_count,
            received_at: now,
        });
        publisher.in_flight.push_back(InFlight {
            batch_seq: header.batch_seq,
            message_count: header.message_count,
        });
        let next = state
            .next_batch_seq
            .entry((publisher.client_id, publisher.session_epoch))
            .or_default();
        *next = (*next).max(header.batch_seq + 1);
        Metrics::inc(&state.metrics.batches_received);
        state
            .metrics
            .bytes_received
            .fetch_add(u64::from(header.payload_bytes), Ordering::Relaxed);
    }

    fn on_frame(&mut self, frame: Frame, state: &mut BrokerState<M>, now: Instant) {
        match (&self.role, frame) {
            (Peer::Handshake, Frame::Hello(hello)) => {
                self.handshake_deadline = None;
                self.on_hello(hello, state, now);
            }
            (Peer::Handshake | Peer::Admin, Frame::CreateTopic(create)) => {
                self.role = Peer::Admin;
                // An admin connection's next frame is due within the same time.
                self.handshake_deadline = Some(after(now, state.settings.limits.hello_timeout()));
                self.on_create_topic(create, state);
            }
            (Peer::Handshake, _) => self.send_error(
                &state.metrics,
                ErrorCode::UnexpectedFrame,
                None,
                "the first frame must be Hello or CreateTopic",
            ),
            (Peer::Publisher(_), Frame::Goodbye) => {
                if let Peer::Publisher(p) = &mut self.role {
                    p.goodbye = true;
                }
            }
            (Peer::Subscriber(_) | Peer::Admin, Frame::Goodbye) => {
                self.send_frame(&Frame::Goodbye);
                self.closing = true;
            }
            (_, frame) => {
                let reason = format!(
                    "a {:?} frame is not valid on this connection now",
                    frame.kind()
                );
                self.send_error(&state.metrics, ErrorCode::UnexpectedFrame, None, &reason);
            }
        }
    }

    fn on_create_topic(&mut self, create: wire::CreateTopicRepr, state: &mut BrokerState<M>) {
        if !state.creates_topics() {
            let reason = "topics are created by the broker that holds the sequencer lease (the \
                          head, or the standby that took over): send CreateTopic to it";
            self.send_error(&state.metrics, ErrorCode::UnknownTopic, None, reason);
            return;
        }
        // The wire counts replicas besides the pool copy; the pool counts the pool copy too.
        let Some(replication_factor) = create.replication_factor.checked_add(1) else {
            let reason = "replication factor 255 is more than a pool can hold";
            self.send_error(&state.metrics, ErrorCode::Malformed, None, reason);
            return;
        };
        let config = TopicConfig {
            order: create.order,
            ack: create.ack as u8,
            replication_factor,
            retention: create.retention,
        };
        let existed = matches!(state.pool.find_topic(create.topic.as_str()), Ok(Some(_)));
        match state.pool.create_topic(create.topic.as_str(), config) {
            Ok(_) => self.send_frame(&Frame::TopicOk(TopicOkRepr {
                broker_id: state.settings.broker_id,
                topic: create.topic,
                order: config.order,
                ack: create.ack,
                replication_factor: create.replication_factor,
                created: !existed,
                retention: create.retention,
            })),
            Err(PoolError::TopicConflict { .. }) => {
                let reason = format!(
                    "topic {:?} exists with other settings",
                    create.topic.as_str()
                );
                self.send_error(&state.metrics, ErrorCode::TopicExists, None, &reason);
            }
            Err(e @ PoolError::TopicTableFull { .. }) => {
                Metrics::inc(&state.metrics.topics_refused);
                self.send_error(&state.metrics, ErrorCode::TopicLimit, None, &e.to_string());
            }
            Err(other) => self.send_error(
                &state.metrics,
                ErrorCode::Internal,
                None,
                &other.to_string(),
            ),
        }
    }

    fn on_hello(&mut self, hello: HelloRepr, state: &mut BrokerState<M>, now: Instant) {
        let metrics = std::sync::Arc::clone(&state.metrics);
        let name = hello.topic.as_str().to_owned();
        let resolved = match hello.role {
            wire::Role::Publish => state.resolve_topic(&name, hello.order, hello.ack as u8),
            wire::Role::Subscribe { .. } => state.pool.find_topic(&name),
        };
        let (topic, config) = match resolved {
            Ok(Some(found)) => found,
            Ok(None) => {
                let reason = format!(
                    "topic {name:?} does not exist: create it with CreateTopic (loadgen does, \
                     unless --create-topic false); brokers create topics on first use only \
                     with --auto-create-topics"
                );
                return self.send_error(&metrics, ErrorCode::UnknownTopic, None, &reason);
            }
            Err(e @ PoolError::TopicTableFull { .. }) => {
                Metrics::inc(&metrics.topics_refused);
                return self.send_error(&metrics, ErrorCode::TopicLimit, None, &e.to_string());
            }
            Err(e) => return self.send_error(&metrics, ErrorCode::Internal, None, &e.to_string()),
        };
        if config.order != hello.order {
            let reason = format!(
                "topic {name:?} has order {}, not {}",
                config.order as u8, hello.order as u8
            );
            return self.send_error(&metrics, ErrorCode::OrderMismatch, None, &reason);
        }
        let mut reader = match LogReader::new(state.pool.clone(), topic, false) {
            Ok(reader) => reader,
            Err(e) => return self.send_error(&metrics, ErrorCode::Internal, None, &e.to_string()),
        };
        let (_, log_end) = reader.log_end();
        let log_start = reader.log_start();
        let batch_bytes_max = state.settings.batch_bytes_max;
        match hello.role {
            wire::Role::Publish => {
                if hello.ack as u8 > config.ack
                    || (hello.ack == AckLevel::Replicated && config.replication_factor < 2)
                {
                    let reason = format!(
                        "topic {name:?} offers ack levels up to {} with replication factor \
                         {}, not {} (ack 2 needs a replication factor of 2 or more: \
                         CreateTopic, or the head's --replication-factor for topics created on \
                         first use)",
                        config.ack, config.replication_factor, hello.ack as u8
                    );
                    return self.send_error(
                        &metrics,
                        ErrorCode::AckLevelUnsupported,
                        None,
                        &reason,
                    );
                }
                if let Err(seen) = state.enter_session(hello.client_id, hello.session_epoch) {
                    let reason = format!(
                        "client {} already used session epoch {seen}; epoch {} is stale",
                        hello.client_id, hello.session_epoch
                    );
                    return self.send_error(&metrics, ErrorCode::StaleSession, None, &reason);
                }
                let batch_bytes_max = match state.topic(topic) {
                    Ok(topic_state) => {
                        batch_bytes_max.min(topic_state.writer.batch_bytes_max() as u32)
                    }
                    Err(e) => {
                        return self.send_error(
                            &metrics,
                            ErrorCode::Internal,
                            None,
                            &e.to_string(),
                        );
                    }
                };
                let next_batch_seq = state
                    .next_batch_seq
                    .get(&(hello.client_id, hello.session_epoch))
                    .copied()
                    .unwrap_or(0);
                self.send_frame(&Frame::HelloOk(HelloOkRepr {
                    broker_id: state.settings.broker_id,
                    batch_bytes_max,
                    order: config.order,
                    ack: hello.ack,
                    next_batch_seq,
                    log_start,
                    log_end,
                }));
                self.role = Peer::Publisher(Box::new(Publisher {
                    topic,
                    order: config.order,
                    ack: hello.ack,
                    client_id: hello.client_id,
                    session_epoch: hello.session_epoch,
                    receiving: Receiving::Idle,
                    in_flight: VecDeque::new(),
                    last_seq: None,
                    acked_through: None,
                    ack_entries: Vec::new(),
                    ack_dirty: false,
                    goodbye: false,
                    replicas: usize::from(config.replication_factor.saturating_sub(1)),
                    durable_wait: VecDeque::new(),
                }));
            }
            wire::Role::Subscribe {
                from_position,
                batch_bytes_max: wanted,
            } => {
                let start = if from_position == wire::FROM_END {
                    log_end
                } else {
                    from_position
                };
                if start > log_end {
                    let reason =
                        format!("position {start} is beyond the end of the log ({log_end})");
                    return self.send_error(&metrics, ErrorCode::PositionBeyondEnd, None, &reason);
                }
                if start < log_start {
                    let reason = format!(
                        "position {start} is no longer retained; the log starts at {log_start}"
                    );
                    return self.send_error(&metrics, ErrorCode::PositionTruncated, None, &reason);
                }
                if let Err(e) = reader.seek(start) {
                    let code = match e {
                        ReadError::BeyondEnd { .. } => ErrorCode::PositionBeyondEnd,
                        ReadError::Truncated { .. } => ErrorCode::PositionTruncated,
                        _ => ErrorCode::Internal,
                    };
                    return self.send_error(&metrics, code, None, &e.to_string());
                }
                self.send_frame(&Frame::HelloOk(HelloOkRepr {
                    broker_id: state.settings.broker_id,
                    batch_bytes_max,
                    order: config.order,
                    ack: AckLevel::FireAndForget,
                    next_batch_seq: 0,
                    log_start,
                    log_end,
                }));
                let limit = if wanted == 0 {
                    batch_bytes_max
                } else {
                    wanted.min(batch_bytes_max)
                };
                self.role = Peer::Subscriber(Box::new(Subscriber {
                    reader,
                    batch_bytes_max: limit,
                    positions: config.order != Order::Unordered,
                    retention: config.retention,
                    progress_at: now,
                    holding: true,
                }));
            }
        }
    }

    /// Takes the sequencer's decision on this connection's oldest batch in flight.
    pub fn on_outcome(&mut self, outcome: &RoutedOutcome, metrics: &Metrics, now: Instant) {
        let Peer::Publisher(publisher) = &mut self.role else {
            return;
        };
        let Some(batch) = publisher.in_flight.pop_front() else {
            log::error!(
                "connection {}: outcome for batch {} that is not in flight",
                self.id,
                outcome.slot.batch_seq
            );
            Metrics::inc(&metrics.batches_dropped);
            return;
        };
        debug_assert_eq!(
            batch.batch_seq, outcome.slot.batch_seq,
            "outcomes arrive in commit order"
        );
        if publisher.ack == AckLevel::Replicated {
            // Decisions leave in order, each once the replicas hold it (see release_durable).
            publisher.durable_wait.push_back((*outcome, batch));
            return;
        }
        self.apply_outcome(outcome, batch, metrics, now);
    }

    /// Ack level 2: passes on, in order, the decisions whose batches the replicas now hold
    /// durably (and the rejections queued behind them). Returns whether any left.
    fn release_durable(&mut self, state: &mut BrokerState<M>, now: Instant) -> bool {
        let Peer::Publisher(publisher) = &mut self.role else {
            return false;
        };
        if publisher.durable_wait.is_empty() {
            return false;
        }
        let durable = state.replicated_position(publisher.topic, publisher.replicas);
        let mut released = false;
        while let Peer::Publisher(publisher) = &mut self.role
            && let Some((outcome, batch)) = publisher.durable_wait.front().copied()
        {
            let waits = matches!(
                outcome.status,
                CompletionStatus::Ordered | CompletionStatus::Duplicate
            ) && outcome
                .global_start
                .is_some_and(|start| start + u64::from(batch.message_count) > durable);
            if waits {
                break;
            }
            publisher.durable_wait.pop_front();
            self.apply_outcome(&outcome, batch, &state.metrics, now);
            released = true;
        }
        released
    }

    /// True while decisions wait for replicas (the loop should look again soon).
    pub fn awaits_durability(&self) -> bool {
        matches!(&self.role, Peer::Publisher(p) if !p.durable_wait.is_empty())
    }

    fn apply_outcome(
        &mut self,
        outcome: &RoutedOutcome,
        batch: InFlight,
        metrics: &Metrics,
        now: Instant,
    ) {
        let Peer::Publisher(publisher) = &mut self.role else {
            return;
        };
        if self.closing {
            // A closing Error (or our Goodbye) was the last frame: nothing follows it. The
            // batch is in the log all the same; a resend after reconnecting is deduplicated.
            return;
        }
        let global_start = if publisher.order == Order::Unordered {
            None
        } else {
            outcome.global_start
        };
        match outcome.status {
            CompletionStatus::Ordered | CompletionStatus::Duplicate => {
                Metrics::inc(&metrics.batches_acked);
                metrics
                    .observe_ack_latency(now.saturating_duration_since(outcome.slot.received_at));
                publisher.ack_entries.push(AckEntry {
                    batch_seq: batch.batch_seq,
                    global_start,
                    message_count: batch.message_count,
                    status: if outcome.status == CompletionStatus::Ordered {
                        AckStatus::Ordered
                    } else {
                        AckStatus::Duplicate
                    },
                });
                publisher.acked_through = Some(batch.batch_seq);
                publisher.ack_dirty = true;
            }
            CompletionStatus::RejectedGap | CompletionStatus::RejectedOutsideWindow => {
                Metrics::inc(&metrics.batches_rejected);
                let reason = if outcome.status == CompletionStatus::RejectedGap {
                    "the sequencer gave up waiting for an earlier batch of this session and skipped this one: it is not in the log"
                } else {
                    "this batch is older than the session's deduplication window: an earlier copy may be in the log, and this one was not written"
                };
                // The Error must precede any Ack whose cumulative sequence covers the batch,
                // and the Goodbye owed after the last batch (sent by the next `flush_acks`).
                let batch_seq = batch.batch_seq;
                self.queue_acks();
                self.send_error(
                    metrics,
                    ErrorCode::SessionGapSkipped,
                    Some(batch_seq),
                    reason,
                );
                if let Peer::Publisher(publisher) = &mut self.role {
                    publisher.acked_through = Some(batch_seq);
                    publisher.ack_dirty = true;
                }
            }
            other => {
                let reason = format!(
                    "the sequencer rejected batch {} ({other:?})",
                    batch.batch_seq
                );
                self.send_error(metrics, ErrorCode::Internal, Some(batch.batch_seq), &reason);
            }
        }
    }

    /// Queues an Ack frame for the decisions taken since the last call (none for ack 0),
    /// and the Goodbye owed to a publisher that said goodbye once nothing is in flight.
    pub fn flush_acks(&mut self) {
        self.queue_acks();
        if let Peer::Publisher(publisher) = &self.role {
            if publisher.goodbye
                && publisher.in_flight.is_empty()
                && publisher.durable_wait.is_empty()
                && !self.closing
            {
                self.send_frame(&Frame::Goodbye);
                self.closing = true;
            }
        }
    }

    /// Queues Ack frames for the decisions taken since the last call (none for ack 0).
    fn queue_acks(&mut self) {
        let Peer::Publisher(publisher) = &mut self.role else {
            return;
        };
        if self.closing {
            return;
        }
        if publisher.ack_dirty {
            publisher.ack_dirty = false;
            let entries = std::mem::take(&mut publisher.ack_entries);
            if publisher.ack != AckLevel::FireAndForget {
                let through = publisher.acked_through.expect("set with every entry");
                // At most 1024 entries a frame; every frame but the last acknowledges through
                // its own last entry, the last one through everything decided.
                let chunks: Vec<&[AckEntry]> = entries.chunks(wire::ACK_ENTRIES_MAX).collect();
                let frames = (0..chunks.len().max(1)).map(|i| match chunks.get(i) {
                    Some(chunk) if i + 1 < chunks.len() => {
                        AckRepr::new(chunk[chunk.len() - 1].batch_seq, chunk.to_vec())
                    }
                    Some(chunk) => AckRepr::new(through, chunk.to_vec()),
                    None => AckRepr::new(through, Vec::new()),
                });
                for frame in frames {
                    match frame {
                        Ok(ack) => Frame::Ack(ack).encode(&mut self.output),
                        Err(e) => {
                            log::error!("connection {}: could not build an Ack: {e}", self.id)
                        }
                    }
                }
            }
        }
    }

    /// Queues deliveries for a subscriber while its output has room, and lets a subscriber
    /// that took nothing for the stall limit stop holding the log.
    pub fn produce_deliveries(&mut self, state: &BrokerState<M>, now: Instant) {
        if self.closing {
            return;
        }
        let Peer::Subscriber(subscriber) = &mut self.role else {
            return;
        };
        let stall = state.settings.limits.subscriber_stall();
        if subscriber.holding
            && subscriber.retention == Retention::StallLimited
            && now.saturating_duration_since(subscriber.progress_at) >= stall
        {
            subscriber.holding = false;
            if let Some(count) = Metrics::inc_logged(&state.metrics.subscribers_released) {
                log::info!(
                    "connection {}: the subscriber took nothing for {} ms \
                     (--subscriber-stall-ms): it no longer holds the log at batch {} ({count} \
                     subscribers released so far)",
                    self.id,
                    stall.as_millis(),
                    subscriber.reader.next_ordinal()
                );
            }
        }
        if self.output.len() - self.output_start > OUTPUT_HIGH_WATER_BYTES {
            return;
        }
        if self.output_start > 0 && self.output_start == self.output.len() {
            self.output.clear();
            self.output_start = 0;
        }
        let limit = subscriber.batch_bytes_max as usize;
        let positions = subscriber.positions;
        // Up to the high-water mark: a batch may overshoot it, but no more are added then.
        let room = (OUTPUT_HIGH_WATER_BYTES + self.output_start - self.output.len()) as u64;
        let output = &mut self.output;
        let mut last_batch_start = output.len();
        let mut oversize = None;
        let result = subscriber
            .reader
            .poll_within(DELIVERIES_PER_POLL, room, |batch| {
                last_batch_start = output.len();
                let mut emit = |payload: &[u8], message_count: u32, global_start: u64| {
                    let header = DeliveryHeaderRepr {
                        global_start: positions.then_some(global_start),
                        message_count,
                        payload_bytes: payload.len() as u32,
                        checksum: if payload.len() == batch.payload.len() {
                            batch.checksum
                        } else {
                            wire::payload::checksum(payload)
                        },
                        broker_id: batch.broker,
                        client_id: batch.client_id,
                        batch_seq: batch.batch_seq,
                        session_epoch: batch.session_epoch,
                    };
                    output.extend_from_slice(&header.frame_prefix());
                    output.extend_from_slice(payload);
                };
                if batch.payload.len() <= limit {
                    emit(batch.payload, batch.message_count, batch.global_start);
                    return;
                }
                // Split at message boundaries into deliveries of at most `limit` bytes.
                let (mut from, mut count, mut position, mut start_position) =
                    (0usize, 0u32, batch.global_start, batch.global_start);
                let mut at = 0usize;
                for message in batch.messages() {
                    let size = wire::payload::MESSAGE_PREFIX_BYTES + message.len();
                    if size > limit {
                        oversize = Some(size);
                        return;
                    }
                    if at + size - from > limit {
                        emit(&batch.payload[from..at], count, start_position);
                        from = at;
                        count = 0;
                        start_position = position;
                    }
                    at += size;
                    count += 1;
                    position += 1;
                }
                emit(&batch.payload[from..at], count, start_position);
            });
        let metrics = &state.metrics;
        // Progress: it took deliveries, or has read everything there is.
        if result.is_ok() {
            subscriber.progress_at = now;
            if !subscriber.holding {
                subscriber.holding = true;
                log::info!(
                    "connection {}: the subscriber reads again: it holds the log from batch {}",
                    self.id,
                    subscriber.reader.next_ordinal()
                );
            }
        }
        match result {
            Ok(delivered) => {
                metrics
                    .batches_delivered
                    .fetch_add(delivered as u64, Ordering::Relaxed);
                if let Some(size) = oversize {
                    self.output.truncate(last_batch_start);
                    let reason = format!(
                        "a message of {size} bytes exceeds the subscriber's limit of {limit}"
                    );
                    self.send_error(metrics, ErrorCode::BatchTooLarge, None, &reason);
                }
            }
            Err(e @ (ReadError::Overwritten { .. } | ReadError::Truncated { .. })) => {
                self.output.truncate(last_batch_start);
                let reason = format!("the subscriber fell behind the retained log: {e}");
                self.send_error(metrics, ErrorCode::PositionTruncated, None, &reason);
            }
            Err(e) => self.send_error(metrics, ErrorCode::Internal, None, &e.to_string()),
        }
    }

    /// One turn of a network loop for this connection: read (when the stream is readable,
    /// or to retry a batch waiting for pool room), queue ACKs and deliveries, write (when
    /// the stream is writable), and say whether the connection is over. Both backends drive
    /// connections through this.
    pub fn service<S: ByteStream>(
        &mut self,
        stream: &mut S,
        state: &mut BrokerState<M>,
        now: Instant,
        readable: bool,
        writable: bool,
    ) -> Service {
        let mut service = Service {
            input: None,
            wrote: false,
            released: false,
            ended: false,
        };
        if readable || self.waits_for_room() {
            let input = self.on_readable(stream, state, now);
            service.ended |= input == InputState::Ended;
            service.input = Some(input);
        }
        // After reading: a frame that was waiting in the socket beats its deadline.
        self.check_deadlines(state, now);
        service.released = self.release_durable(state, now);
        self.flush_acks();
        if self.is_subscriber() {
            self.produce_deliveries(state, now);
        }
        if self.has_output() && writable {
            let queued = self.output.len() - self.output_start;
            service.ended |= !self.on_writable(stream);
            service.wrote = true;
            let taken = queued - (self.output.len() - self.output_start);
            if taken > 0
                && let Peer::Subscriber(subscriber) = &mut self.role
            {
                // A subscriber that takes bytes is reading, even while a large batch keeps its
                // queue above the high-water mark.
                subscriber.progress_at = now;
            }
        }
        service.ended |= self.is_finished();
        service
    }

    /// Sends queued output; returns false when the stream failed.
    pub fn on_writable<S: ByteStream>(&mut self, stream: &mut S) -> bool {
        while self.output_start < self.output.len() {
            match stream.send(&self.output[self.output_start..]) {
                Ok(0) => return false,
                Ok(n) => self.output_start += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::info!("connection {}: send failed: {e}", self.id);
                    return false;
                }
            }
        }
        if self.output_start == self.output.len() {
            self.output.clear();
            self.output_start = 0;
        } else if self.output_start >= OUTPUT_COMPACT_BYTES {
            self.output.drain(..self.output_start);
            self.output_start = 0;
        }
        true
    }

    /// Another process holds this broker's id now, so nothing more may be written: the
    /// connection ends without acknowledging the batch it was receiving (its publisher
    /// resends it elsewhere), and the state tells the loop to end the broker.
    fn end_for_claim_moved(&mut self, state: &mut BrokerState<M>, moved: ClaimMoved) {
        self.drop_batch(state);
        self.closing = true;
        state.record_claim_moved(moved);
    }

    /// Releases what the connection holds (a half-received batch, in the pool or in
    /// staging) when it ends.
    pub fn on_closed(&mut self, state: &mut BrokerState<M>) {
        self.drop_batch(state);
    }

    /// Drops the batch being received, if any: its room in the pool or in staging is given
    /// back, and nothing of it is written.
    fn drop_batch(&mut self, state: &mut BrokerState<M>) {
        let Peer::Publisher(publisher) = &mut self.role else {
            return;
        };
        let receiving = std::mem::replace(&mut publisher.receiving, Receiving::Idle);
        let staged_bytes = receiving.staged_bytes();
        if let Receiving::Payload { reservation, .. } = receiving
            && let Some(topic) = state.topics.get_mut(&publisher.topic)
        {
            topic.writer.abort(reservation);
        }
        self.give_back_staging(state, staged_bytes);
    }
}

/// The bytes to send a peer whose connection the limits refuse, before closing it: an
/// Error frame with code `ConnectionLimit` that says which limit.
pub fn refusal_frame(refusal: &ConnectionRefused) -> Vec<u8> {
    Frame::Error(ErrorFrameRepr::new(
        ErrorCode::ConnectionLimit,
        None,
        &refusal.to_string(),
    ))
    .to_bytes()
}

enum Step {
    Continue,
    Stop(InputState),
}

/// Payload bytes taken by [`receive_payload`].
struct PayloadRead {
    bytes: usize,
    /// Taken from the read-ahead buffer (which the caller then consumes), not the stream.
    buffered: bool,
}

/// Takes payload bytes into `dest`: what the read-ahead buffer holds first, else one read
/// straight from the stream (no copy through the buffer).
fn receive_payload<S: ByteStream>(
    buffered: &[u8],
    stream: &mut S,
    dest: &mut [u8],
    id: ConnId,
) -> Result<PayloadRead, Step> {
    if !buffered.is_empty() {
        let bytes = buffered.len().min(dest.len());
        dest[..bytes].copy_from_slice(&buffered[..bytes]);
        return Ok(PayloadRead {
            bytes,
            buffered: true,
        });
    }
    match stream.recv(dest) {
        Ok(0) => Err(Step::Stop(InputState::Ended)),
        Ok(bytes) => Ok(PayloadRead {
            bytes,
            buffered: false,
        }),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(Step::Stop(InputState::Drained)),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(Step::Continue),
        Err(e) => {
            log::info!("connection {id}: receive failed mid-batch: {e}");
            Err(Step::Stop(InputState::Ended))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use wire::{BatchHeaderRepr, HelloRepr, Role, Topic};

    use super::*;
    use crate::server::limits::ClientLimits;
    use crate::server::state::BrokerSettings;
    use shared_log::coherence::PoolMemory;
    use shared_log::sequencer::{Sequencer, SequencerConfig};

    /// Everything to read at once, then `WouldBlock` (end of stream once `closed`); takes
    /// all output, or none while `stalled` (a peer that does not read).
    struct Pipe {
        input: Vec<u8>,
        output: Vec<u8>,
        closed: bool,
        stalled: bool,
    }

    impl Pipe {
        fn new(input: Vec<u8>) -> Pipe {
            Pipe {
                input,
                output: Vec::new(),
                closed: false,
                stalled: false,
            }
        }
    }

    impl ByteStream for Pipe {
        fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.input.is_empty() {
                return if self.closed {
                    Ok(0)
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                };
            }
            let n = buf.len().min(self.input.len());
            buf[..n].copy_from_slice(&self.input[..n]);
            self.input.drain(..n);
            Ok(n)
        }

        fn send(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.stalled {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
    }

    fn publisher_stream(seq: u64, goodbye: bool) -> Vec<u8> {
        publisher_stream_with_ack(seq, goodbye, AckLevel::Ordered)
    }

    fn publisher_stream_with_ack(seq: u64, goodbye: bool, ack: AckLevel) -> Vec<u8> {
        let hello = HelloRepr {
            role: Role::Publish,
            order: Order::TotalSessionFifo,
            ack,
            client_id: 7,
            session_epoch: 1,
            topic: Topic::new("gaps").unwrap(),
        };
        let mut payload = Vec::new();
        wire::payload::push_message(&mut payload, b"message");
        let header = BatchHeaderRepr::for_payload(seq, 1, &payload, &Limits::default()).unwrap();
        let mut bytes = Frame::Hello(hello).to_bytes();
        bytes.extend_from_slice(&header.frame_prefix());
        bytes.extend_from_slice(&payload);
        if goodbye {
            bytes.extend_from_slice(&Frame::Goodbye.to_bytes());
        }
        bytes
    }

    fn frames(bytes: &[u8]) -> Vec<Frame> {
        let mut decoder = FrameDecoder::new(Limits::default());
        let mut at = 0;
        let mut frames = Vec::new();
        while at < bytes.len() {
            let (used, decoded) = decoder.decode(&bytes[at..]).unwrap();
            at += used;
            if let Decoded::Frame(frame) = decoded {
                frames.push(frame);
            }
        }
        frames
    }

    /// A head broker on a fresh one-broker heap pool whose topics are created on first use
    /// with `replication_factor`, and its sequencer (hold timeout 1 us).
    fn head_broker(
        replication_factor: u8,
    ) -> (BrokerState<PoolMemory>, Sequencer<PoolMemory>, Arc<Metrics>) {
        head_broker_with(replication_factor, ClientLimits::default())
    }

    fn head_broker_with(
        replication_factor: u8,
        limits: ClientLimits,
    ) -> (BrokerState<PoolMemory>, Sequencer<PoolMemory>, Arc<Metrics>) {
        let pool = shared_log::heap::small_test_pool();
        let settings = BrokerSettings {
            broker_id: 0,
            head: true,
            auto_create_topics: true,
            batch_bytes_max: 16 * 1024,
            frame_bytes_max: wire::FRAME_BYTES_DEFAULT,
            replication_factor,
            limits,
        };
        let metrics = Arc::new(Metrics::default());
        let state = BrokerState::new(pool.clone(), settings, Arc::clone(&metrics));
        let config = SequencerConfig {
            hold_timeout_ns: 1_000,
            ..SequencerConfig::default()
        };
        let sequencer = Sequencer::new(pool, 0, 1, config).unwrap();
        (state, sequencer, metrics)
    }

    /// A publisher Hello (client `client_id`, order 2, ack 1, topic "gaps") and the frame
    /// prefix of batch `seq` of one message of `message_bytes`, and that batch's payload.
    fn hello_and_batch(client_id: u64, seq: u64, message_bytes: usize) -> (Vec<u8>, Vec<u8>) {
        let hello = HelloRepr {
            role: Role::Publish,
            order: Order::Total,
            ack: AckLevel::Ordered,
            client_id,
            session_epoch: 1,
            topic: Topic::new("gaps").unwrap(),
        };
        let mut payload = Vec::new();
        wire::payload::push_message(&mut payload, &vec![client_id as u8; message_bytes]);
        let header = BatchHeaderRepr::for_payload(seq, 1, &payload, &Limits::default()).unwrap();
        let mut bytes = Frame::Hello(hello).to_bytes();
        bytes.extend_from_slice(&header.frame_prefix());
        (bytes, payload)
    }

    fn error_codes(bytes: &[u8]) -> Vec<(ErrorCode, Option<u64>)> {
        frames(bytes)
            .into_iter()
            .filter_map(|frame| match frame {
                Frame::Error(error) => Some((error.code, error.batch_seq)),
                _ => None,
            })
            .collect()
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_handshake_deadline_fires_at_its_time_and_not_before() {
        let (mut state, _sequencer, metrics) = head_broker(1);
        let start = Instant::now();
        let mut connection = Connection::new(1, &state, start);
        let mut pipe = Pipe::new(Vec::new());
        let service = connection.service(&mut pipe, &mut state, start + 4_999 * MS, true, true);
        assert!(!service.ended && pipe.output.is_empty());
        let service = connection.service(&mut pipe, &mut state, start + 5_000 * MS, true, true);
        assert!(service.ended);
        assert_eq!(
            error_codes(&pipe.output),
            [(ErrorCode::DeadlineExpired, None)]
        );
        assert_eq!(metrics.hello_deadlines_expired.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_batch_slower_than_its_deadline_is_dropped_and_its_room_given_back() {
        let limits = ClientLimits {
            batch_grace_ms: 100,
            batch_min_bytes_per_s: 1 << 20,
            ..ClientLimits::default()
        };
        let (mut state, _sequencer, metrics) = head_broker_with(1, limits);
        let start = Instant::now();
        let (mut bytes, payload) = hello_and_batch(7, 0, 8 * 1024);
        bytes.extend_from_slice(&payload[..100]);
        let mut connection = Connection::new(1, &state, start);
        let mut pipe = Pipe::new(bytes);
        connection.service(&mut pipe, &mut state, start, true, true);
        let writer = |state: &BrokerState<PoolMemory>| state.topics[&0].writer.in_flight();
        assert_eq!(writer(&state), 1, "the batch has its room");
        // 100 ms of grace plus 8 KiB at 1 MiB/s: 107.8 ms.
        let service = connection.service(&mut pipe, &mut state, start + 107 * MS, true, true);
        assert!(!service.ended);
        let service = connection.service(&mut pipe, &mut state, start + 108 * MS, true, true);
        assert!(service.ended);
        assert_eq!(
            error_codes(&pipe.output),
            [(ErrorCode::DeadlineExpired, Some(0))]
        );
        assert_eq!(writer(&state), 0, "the room is given back");
        assert_eq!(metrics.batch_deadlines_expired.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_slow_batch_moves_to_staging_only_when_room_is_short_and_lands_whole() {
        let limits = ClientLimits {
            batch_grace_ms: 60_000,
            batch_hold_ms: 10,
            ..ClientLimits::default()
        };
        let (mut state, mut sequencer, metrics) = head_broker_with(1, limits);
        let start = Instant::now();
        let (mut slow_bytes, slow_payload) = hello_and_batch(7, 0, 8 * 1024);
        slow_bytes.extend_from_slice(&slow_payload[..100]);
        let mut slow = Connection::new(1, &state, start);
        let mut slow_pipe = Pipe::new(slow_bytes);
        slow.service(&mut slow_pipe, &mut state, start, true, true);
        // Slow, but nobody is short of room: it stays where it is.
        slow.service(&mut slow_pipe, &mut state, start + 50 * MS, true, true);
        assert_eq!(metrics.batches_staged.load(Ordering::Relaxed), 0);
        // Another publisher fills the 64 KiB log until it must wait for room.
        let (mut fast_bytes, fast_payload) = hello_and_batch(8, 0, 8 * 1024);
        for seq in 0..8u64 {
            if seq > 0 {
                let header =
                    BatchHeaderRepr::for_payload(seq, 1, &fast_payload, &Limits::default())
                        .unwrap();
                fast_bytes.extend_from_slice(&header.frame_prefix());
            }
            fast_bytes.extend_from_slice(&fast_payload);
        }
        let mut fast = Connection::new(2, &state, start);
        let mut fast_pipe = Pipe::new(fast_bytes);
        fast.service(&mut fast_pipe, &mut state, start + 50 * MS, true, true);
        assert!(fast.waits_for_room(), "the log is full");
        // Now the slow batch gives its room back and goes on arriving in staging.
        slow.service(&mut slow_pipe, &mut state, start + 60 * MS, true, true);
        assert_eq!(metrics.batches_staged.load(Ordering::Relaxed), 1);
        assert_eq!(state.staging.used_bytes(), slow_payload.len() as u64);
        slow_pipe.input.extend_from_slice(&slow_payload[100..]);
        let mut outcomes = Vec::new();
        sequencer.refresh_topics().unwrap();
        for round in 0..20u64 {
            let now = start + (70 + round as u32) * MS;
            for (connection, pipe) in [(&mut fast, &mut fast_pipe), (&mut slow, &mut slow_pipe)] {
                connection.service(pipe, &mut state, now, true, true);
            }
            sequencer.poll(round);
            outcomes.clear();
            state.poll_outcomes(&mut outcomes);
            for outcome in &outcomes {
                let connection = if outcome.slot.conn == 1 {
                    &mut slow
                } else {
                    &mut fast
                };
                connection.on_outcome(outcome, &metrics, now);
            }
        }
        let acks = |bytes: &[u8]| {
            frames(bytes)
                .into_iter()
                .filter_map(|frame| match frame {
                    Frame::Ack(ack) => Some(ack.acked_through_seq()),
                    _ => None,
                })
                .max()
        };
        assert_eq!(
            acks(&slow_pipe.output),
            Some(0),
            "the staged batch is in the log"
        );
        assert_eq!(acks(&fast_pipe.output), Some(7));
        assert_eq!(state.staging.used_bytes(), 0, "staging is given back");
        assert_eq!(metrics.staging_bytes.load(Ordering::Relaxed), 0);
        // The bytes in the log are the publisher's.
        let mut reader = LogReader::new(state.pool.clone(), 0, true).unwrap();
        reader.seek(reader.log_start()).unwrap();
        let mut found = false;
        reader
            .poll(64, |batch| {
                if batch.client_id == 7 {
                    found = batch.payload == &slow_payload[..];
                }
            })
            .unwrap();
        assert!(found, "the staged batch landed whole");
    }

    #[test]
    fn a_closing_connection_whose_peer_takes_nothing_is_dropped_at_the_close_deadline() {
        let (mut state, _sequencer, metrics) = head_broker(1);
        let start = Instant::now();
        let mut connection = Connection::new(1, &state, start);
        let mut pipe = Pipe::new(b"GET / HTTP/1.1\r\n\r\n".to_vec());
        pipe.stalled = true;
        let service = connection.service(&mut pipe, &mut state, start, true, true);
        assert!(!service.ended, "the Error is queued, not sent");
        let service = connection.service(&mut pipe, &mut state, start + 9_999 * MS, true, true);
        assert!(!service.ended);
        let service = connection.service(&mut pipe, &mut state, start + 10_000 * MS, true, true);
        assert!(service.ended, "dropped at the close deadline");
        assert_eq!(metrics.close_deadlines_expired.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_publisher_closing_after_goodbye_ends_a_connection_waiting_for_replicas() {
        // Found by fuzzing: after Goodbye the broker stopped reading, so a publisher whose
        // ack-2 Acks waited for replicas that never came could close its end and the broker
        // kept the connection forever.
        let (mut state, mut sequencer, metrics) = head_broker(2);
        let now = Instant::now();
        let mut connection = Connection::new(1, &state, Instant::now());
        let mut pipe = Pipe::new(publisher_stream_with_ack(0, true, AckLevel::Replicated));
        let service = connection.service(&mut pipe, &mut state, now, true, true);
        assert!(!service.ended);
        sequencer.refresh_topics().unwrap();
        sequencer.poll(0);
        let mut outcomes = Vec::new();
        state.poll_outcomes(&mut outcomes);
        assert_eq!(outcomes.len(), 1, "the batch was ordered");
        connection.on_outcome(&outcomes[0], &metrics, now);
        let service = connection.service(&mut pipe, &mut state, now, true, true);
        assert!(
            !service.ended,
            "no replica holds the batch: the Ack still waits"
        );
        assert!(connection.awaits_durability());
        pipe.closed = true;
        let service = connection.service(&mut pipe, &mut state, now, true, true);
        assert!(service.ended, "the publisher closed its end");
        connection.on_closed(&mut state);
        let frames = frames(&pipe.output);
        assert!(matches!(frames[..], [Frame::HelloOk(_)]), "{frames:?}");
    }

    #[test]
    fn a_batch_completed_after_the_claim_was_taken_over_is_neither_published_nor_acked() {
        use shared_log::claim::{test_claimant as claimant, try_claim};
        let (state, mut sequencer, _metrics) = head_broker(1);
        let pool = state.pool.clone();
        try_claim(&pool, 0, 0, &claimant(0x11)).unwrap();
        let mut state = state.with_claim_token(0x11);
        // This broker was paused past its lease; another process took broker id 0 over.
        try_claim(&pool, 0, 0x11, &claimant(0x22)).unwrap();
        let mut connection = Connection::new(1, &state, Instant::now());
        let mut pipe = Pipe::new(publisher_stream(0, false));
        let service = connection.service(&mut pipe, &mut state, Instant::now(), true, true);
        assert!(service.ended, "the connection ends");
        assert_eq!(
            state.claim_moved(),
            Some(ClaimMoved {
                broker: 0,
                owner: 0x22
            }),
            "the loop is told to end the broker"
        );
        sequencer.refresh_topics().unwrap();
        assert_eq!(sequencer.poll(0), 0, "nothing was published");
        let frames = frames(&pipe.output);
        assert!(
            matches!(frames[..], [Frame::HelloOk(_)]),
            "no Ack: {frames:?}"
        );
    }

    #[test]
    fn bytes_after_a_publishers_goodbye_are_refused() {
        let (mut state, _sequencer, _metrics) = head_broker(2);
        let mut input = publisher_stream_with_ack(0, true, AckLevel::Replicated);
        input.extend_from_slice(&Frame::Goodbye.to_bytes());
        let mut connection = Connection::new(1, &state, Instant::now());
        let mut pipe = Pipe::new(input);
        connection.service(&mut pipe, &mut state, Instant::now(), true, true);
        let frames = frames(&pipe.output);
        assert!(
            matches!(&frames[..], [Frame::HelloOk(_), Frame::Error(e)] if e.code == ErrorCode::UnexpectedFrame),
            "{frames:?}"
        );
    }

    #[test]
    fn a_gap_error_for_the_last_batch_after_goodbye_precedes_the_goodbye() {
        // Found by fuzzing: the Goodbye owed after the last batch went out before the
        // SessionGapSkipped Error for that batch, so the Error followed the Goodbye.
        let (mut state, mut sequencer, metrics) = head_broker(1);
        let now = Instant::now();
        // Batch 1 of the session arrives first and is ordered once the gap rule gives up on 0.
        let mut first = Connection::new(1, &state, Instant::now());
        let mut first_pipe = Pipe::new(publisher_stream(1, false));
        first.service(&mut first_pipe, &mut state, now, true, true);
        sequencer.refresh_topics().unwrap();
        sequencer.poll(0);
        sequencer.poll(10_000);
        // Batch 0 arrives late on another connection that then says goodbye.
        let mut late = Connection::new(2, &state, Instant::now());
        let mut late_pipe = Pipe::new(publisher_stream(0, true));
        late.service(&mut late_pipe, &mut state, now, true, true);
        sequencer.poll(20_000);
        let mut outcomes = Vec::new();
        state.poll_outcomes(&mut outcomes);
        for outcome in &outcomes {
            let connection = if outcome.slot.conn == 1 {
                &mut first
            } else {
                &mut late
            };
            connection.on_outcome(outcome, &metrics, now);
        }
        let service = late.service(&mut late_pipe, &mut state, now, false, true);
        assert!(service.ended);
        let frames = frames(&late_pipe.output);
        assert!(matches!(frames[0], Frame::HelloOk(_)), "{frames:?}");
        assert!(
            matches!(&frames[1], Frame::Error(e) if e.code == ErrorCode::SessionGapSkipped && e.batch_seq == Some(0)),
            "{frames:?}"
        );
        assert!(
            matches!(&frames[2], Frame::Ack(ack) if ack.acked_through_seq() == 0 && ack.entries().is_empty()),
            "{frames:?}"
        );
        assert_eq!(frames[3..], [Frame::Goodbye], "{frames:?}");
    }
}
