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
use std::io::{self, IoSlice};
use std::sync::atomic::Ordering;
use std::time::Duration;

use units::Timestamp;
use wire::{
    AckEntry, AckLevel, AckRepr, AckStatus, BatchHeaderRepr, Decoded, DeliveryHeaderRepr,
    ErrorCode, ErrorFrameRepr, Frame, FrameDecoder, HelloOkRepr, HelloRepr, Limits, Order,
    TopicOkRepr,
};

use crate::metrics::Metrics;
use crate::server::history::{HistoryError, HistoryReader};
use crate::server::limits::ConnectionRefused;
use crate::server::state::{BrokerState, ConnId, RoutedOutcome};
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

    /// Writes from `bufs` in order (one vectored write where the stream has one); returns
    /// how much was taken. By default, [`Self::send`] of each in turn until one is taken
    /// short.
    fn send_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut taken = 0;
        for buf in bufs {
            match self.send(buf) {
                Ok(n) => {
                    taken += n;
                    if n < buf.len() {
                        break;
                    }
                }
                // What was taken is reported; the error comes back on the next call.
                Err(_) if taken > 0 => break,
                Err(e) => return Err(e),
            }
        }
        Ok(taken)
    }
}

impl<T: io::Read + io::Write> ByteStream for T {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read(buf)
    }

    fn send(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write(buf)
    }

    fn send_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.write_vectored(bufs)
    }
}

/// Bytes of read-ahead for frame headers and small frames.
const INPUT_BUFFER_BYTES: usize = 64 * 1024;
/// Deliveries produced per call, so one subscriber cannot starve the loop.
const DELIVERIES_PER_POLL: usize = 64;
/// Waiting this long for pool room counts as a receive stall in the metrics.
const STALL: Duration = Duration::from_millis(50);

/// What one [`Connection::service`] call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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
enum Peer<M> {
    Handshake,
    Publisher(Box<Publisher>),
    Subscriber(Box<Subscriber<M>>),
    Admin,
}

/// Payload bytes read with a batch's prefix, through the input buffer (see
/// [`Connection::on_readable`]).
const SMALL_PAYLOAD_BYTES: usize = 4 << 10;

/// One client connection. See the module docs.
#[derive(Debug)]
pub struct Connection<M> {
    id: ConnId,
    decoder: FrameDecoder,
    input: Vec<u8>,
    input_start: usize,
    input_end: usize,
    output: Output,
    role: Peer<M>,
    /// Set once the connection must end after its output is sent (error or goodbye).
    closing: bool,
    /// Before Hello (and between an admin connection's frames): the next frame is due then.
    handshake_deadline: Option<Timestamp>,
    /// When the connection started closing: its peer has the close timeout to take the rest.
    closing_since: Option<Timestamp>,
    /// The peer did not take the last bytes within the close timeout: drop the connection.
    abandoned: bool,
    /// A delivery's payload was overwritten while its frame was partly sent: the bytes that
    /// left may be torn, so the connection is reset at once.
    torn: bool,
    /// Input is paused because too much output is queued (counted once per episode).
    output_full: bool,
}

fn limits(settings: &crate::server::state::BrokerSettings) -> Limits {
    Limits::default()
        .with_batch_bytes_max(settings.batch_bytes_max)
        .and_then(|l| l.with_frame_bytes_max(settings.frame_bytes_max))
        .unwrap_or_default()
}

mod control;
mod direct;
mod handshake;
mod output;
mod publish;
mod subscribe;
#[cfg(test)]
mod tests;

pub use direct::PayloadTarget;
use output::{Output, PoolPayload, SendFailure};
use publish::{PayloadRead, Publisher, Receiving, Step};
use subscribe::Subscriber;

impl<M: SharedMemory + Clone> Connection<M> {
    /// A new connection, opened at `now`, awaiting its first frame.
    pub fn new(id: ConnId, state: &BrokerState<M>, now: Timestamp) -> Connection<M> {
        Connection {
            id,
            decoder: FrameDecoder::new(limits(state.settings())),
            input: vec![0; INPUT_BUFFER_BYTES],
            input_start: 0,
            input_end: 0,
            output: Output::default(),
            role: Peer::Handshake,
            closing: false,
            handshake_deadline: Some(now + state.settings().limits.hello_timeout()),
            closing_since: None,
            abandoned: false,
            torn: false,
            output_full: false,
        }
    }

    /// The connection's id.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// True once everything owed was sent and the connection should be closed.
    pub fn is_finished(&self) -> bool {
        (self.closing && !self.has_output()) || self.abandoned || self.torn
    }

    /// True when the connection must end with a reset rather than a close: bytes it sent may
    /// be torn, and none still queued may follow them.
    pub fn must_reset(&self) -> bool {
        self.torn
    }

    /// True when output is queued.
    pub fn has_output(&self) -> bool {
        !self.output.is_empty()
    }

    fn send_frame(&mut self, frame: &Frame) {
        self.output.push_frame(frame);
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
        now: Timestamp,
    ) -> InputState {
        loop {
            if self.closing {
                return InputState::Paused;
            }
            if self.output.is_full() {
                if !self.output_full {
                    self.output_full = true;
                    Metrics::inc(&state.metrics().output_full_waits);
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
                // Read a batch's prefix and at most a small payload's worth more: a small
                // batch then arrives in one read (a system call less per batch, on the ack's
                // path), while a large payload goes from the socket straight into the pool
                // instead of through this buffer but for its first few KiB.
                let want = self
                    .decoder
                    .wanted()
                    .max(wire::BATCH_PREFIX_BYTES + SMALL_PAYLOAD_BYTES)
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
                    self.protocol_error(state.metrics(), &error);
                    return InputState::Paused;
                }
                Ok((consumed, decoded)) => {
                    self.input_start += consumed;
                    match decoded {
                        Decoded::NeedMore(_) => {}
                        Decoded::Frame(frame) => self.on_frame(frame, state, now),
                        Decoded::Batch(header) => self.on_batch_header(header, state),
                        Decoded::Delivery(_) => self.send_error(
                            state.metrics(),
                            ErrorCode::BadRole,
                            None,
                            "brokers send Delivery frames, they do not receive them",
                        ),
                        Decoded::Payload { .. } => self.send_error(
                            state.metrics(),
                            ErrorCode::Internal,
                            None,
                            "payload bytes reached the frame decoder",
                        ),
                    }
                }
            }
        }
    }

    /// Applies the deadlines: the close deadline of a closing connection, the handshake
    /// deadline before Hello, and a publisher's batch deadline and move to staging. Called on
    /// every turn of the loop, read or not.
    fn check_deadlines(&mut self, state: &mut BrokerState<M>, now: Timestamp) {
        if self.closing {
            self.check_close_deadline(state, now);
            return;
        }
        if let Some(deadline) = self.handshake_deadline
            && now >= deadline
        {
            if let Some(count) = Metrics::inc_logged(&state.metrics().hello_deadlines_expired) {
                log::info!(
                    "connection {}: no Hello in time ({count} such connections closed)",
                    self.id
                );
            }
            let reason = format!(
                "no Hello or CreateTopic within {} ms (--hello-timeout-ms)",
                state.settings().limits.hello_timeout_ms
            );
            self.send_error(state.metrics(), ErrorCode::DeadlineExpired, None, &reason);
            return;
        }
        self.check_batch_deadline(state, now);
    }

    /// A closing connection whose peer does not take the last bytes in time is abandoned.
    fn check_close_deadline(&mut self, state: &mut BrokerState<M>, now: Timestamp) {
        let since = *self.closing_since.get_or_insert(now);
        let timeout = state.settings().limits.close_timeout();
        if !self.abandoned && self.has_output() && now.saturating_duration_since(since) >= timeout {
            self.abandoned = true;
            if let Some(count) = Metrics::inc_logged(&state.metrics().close_deadlines_expired) {
                log::info!(
                    "connection {}: its peer did not take the last {} bytes within {} ms \
                     (--close-timeout-ms): dropped ({count} so far)",
                    self.id,
                    self.output.queued_bytes(),
                    timeout.as_millis()
                );
            }
        }
    }

    fn on_frame(&mut self, frame: Frame, state: &mut BrokerState<M>, now: Timestamp) {
        match (&self.role, frame) {
            (Peer::Handshake, Frame::Hello(hello)) => {
                self.handshake_deadline = None;
                self.on_hello(hello, state, now);
            }
            (Peer::Handshake | Peer::Admin, Frame::CreateTopic(create)) => {
                self.role = Peer::Admin;
                // An admin connection's next frame is due within the same time.
                self.handshake_deadline = Some(now + state.settings().limits.hello_timeout());
                self.on_create_topic(create, state);
            }
            (Peer::Handshake, _) => self.send_error(
                state.metrics(),
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
                self.send_error(state.metrics(), ErrorCode::UnexpectedFrame, None, &reason);
            }
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
        now: Timestamp,
        readable: bool,
        writable: bool,
    ) -> Service {
        let mut service = Service::default();
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
            let queued = self.output.queued_bytes();
            service.ended |= !self.on_writable(stream, state.metrics());
            service.wrote = true;
            let taken = queued.saturating_sub(self.output.queued_bytes());
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

    /// Sends queued output; returns false when the stream failed or the connection must
    /// end at once (see [`Self::must_reset`]).
    pub fn on_writable<S: ByteStream>(&mut self, stream: &mut S, metrics: &Metrics) -> bool {
        while self.has_output() {
            let reader = match &self.role {
                Peer::Subscriber(subscriber) => Some(&subscriber.reader),
                _ => None,
            };
            match self.output.send(stream, reader) {
                Ok(0) => return false,
                Ok(_) => {}
                Err(SendFailure::Stream(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(SendFailure::Stream(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(SendFailure::Stream(e)) => {
                    log::info!("connection {}: send failed: {e}", self.id);
                    return false;
                }
                Err(SendFailure::Overwritten(payload)) => {
                    self.overwritten_in_queue(payload, metrics)
                }
                Err(SendFailure::Torn(payload)) => {
                    self.on_torn(payload, metrics);
                    return false;
                }
            }
        }
        self.keep_started_delivery(metrics)
    }

    /// A subscriber whose hold on the log no longer protects its queue (it was released, or
    /// is closing) keeps the rest of a partly sent delivery in hand (see
    /// `Output::detach_started_front`). Returns false when the connection must be reset.
    fn keep_started_delivery(&mut self, metrics: &Metrics) -> bool {
        if self.subscription().is_some() {
            return true;
        }
        let Peer::Subscriber(subscriber) = &self.role else {
            return true;
        };
        match self.output.detach_started_front(&subscriber.reader) {
            Ok(()) => true,
            Err(payload) => {
                self.on_torn(payload, metrics);
                false
            }
        }
    }

    /// Batch `payload` was overwritten while its delivery was partly sent: the connection is
    /// reset.
    fn on_torn(&mut self, payload: PoolPayload, metrics: &Metrics) {
        self.torn = true;
        if let Some(count) = Metrics::inc_logged(&metrics.deliveries_torn) {
            log::info!(
                "connection {}: batch {} was overwritten while its delivery was being sent: \
                 connection reset ({count} so far)",
                self.id,
                payload.ordinal
            );
        }
    }

    /// Releases what the connection holds (a half-received batch, in the pool or in
    /// staging) when it ends.
    pub fn on_closed(&mut self, state: &mut BrokerState<M>) {
        self.drop_batch(state);
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
