//! Builders and probes for the unit tests of the publisher core.

use std::net::SocketAddr;
use std::time::Duration;

use units::Timestamp;
use wire::{
    AckEntry, AckLevel, AckRepr, AckStatus, Decoded, ErrorCode, ErrorFrameRepr, Frame,
    FrameDecoder, HelloOkRepr, Limits, Order,
};

use super::{Command, ConnId, ConnectRequest, CoreParams, PublisherCore, Transmit};
use crate::error::ClientError;

pub(super) const MESSAGE: &[u8] = b"0123456789";
/// One 10-byte message with its 4-byte prefix.
pub(super) const ONE: usize = 14;
/// The give-up time of every test core.
pub(super) const RECONNECT_TIMEOUT: Duration = Duration::from_secs(1);

pub(super) fn addr(index: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9000 + index as u16))
}

/// A core's settings, with defaults for the tests: one broker, one connection, one-message
/// batches, a window of 8.
pub(super) struct Setup {
    pub(super) connections: usize,
    pub(super) per_broker: usize,
    pub(super) batch_bytes_max: usize,
    pub(super) linger_us: u64,
    pub(super) window: usize,
    pub(super) ack: AckLevel,
    pub(super) first_seq: u64,
    pub(super) session_batches_max: u64,
    pub(super) resends_max: u32,
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

impl Setup {
    /// `connections` brokers (127.0.0.1:9000, 9001, ...) with `per_broker` connections
    /// each; connection (and slot) `i` goes to broker `i % connections`.
    pub(super) fn core(self) -> PublisherCore {
        PublisherCore::new(CoreParams {
            brokers: (0..self.connections).map(addr).collect(),
            connections_per_broker: self.per_broker,
            batch_bytes_max: self.batch_bytes_max,
            linger: Duration::from_micros(self.linger_us),
            in_flight_batches_max: self.window,
            in_flight_window: super::InFlightWindow::Fixed,
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

pub(super) fn commands(core: &mut PublisherCore) -> Vec<Command> {
    std::iter::from_fn(|| core.take_command()).collect()
}

/// The batches among the commands handed out so far (other commands are dropped).
pub(super) fn transmitted(core: &mut PublisherCore) -> Vec<Transmit> {
    transmits(&commands(core))
}

pub(super) fn transmits(commands: &[Command]) -> Vec<Transmit> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Transmit(t) => Some(t.clone()),
            _ => None,
        })
        .collect()
}

pub(super) fn connects(commands: &[Command]) -> Vec<ConnectRequest> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Connect(request) => Some(request.clone()),
            _ => None,
        })
        .collect()
}

pub(super) fn goodbyes(commands: &[Command]) -> Vec<ConnId> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Goodbye(id) => Some(*id),
            _ => None,
        })
        .collect()
}

/// Messages in a transmitted batch, from its header.
pub(super) fn message_count(batch: &Transmit) -> u32 {
    let mut decoder = FrameDecoder::new(Limits::default());
    match decoder.decode(&batch.bytes) {
        Ok((40, Decoded::Batch(header))) => header.message_count,
        other => panic!("not a batch: {other:?}"),
    }
}

pub(super) fn seqs_and_connections(batches: &[Transmit]) -> Vec<(u64, usize)> {
    batches.iter().map(|b| (b.seq, b.conn as usize)).collect()
}

pub(super) fn hello_ok(next_batch_seq: u64) -> HelloOkRepr {
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

pub(super) fn reset() -> ClientError {
    ClientError::io(
        addr(0),
        "reading",
        std::io::Error::from(std::io::ErrorKind::ConnectionReset),
    )
}

pub(super) fn entry(batch_seq: u64, global_start: Option<u64>, message_count: u32) -> AckEntry {
    AckEntry {
        batch_seq,
        global_start,
        message_count,
        status: AckStatus::Ordered,
    }
}

pub(super) fn ack(through: u64, entries: Vec<AckEntry>) -> Frame {
    Frame::Ack(AckRepr::new(through, entries).unwrap())
}

pub(super) fn error(code: ErrorCode, batch_seq: Option<u64>) -> Frame {
    Frame::Error(ErrorFrameRepr::new(code, batch_seq, "test reason"))
}

/// Publishes `count` one-message batches (with the default one-message batch limit)
/// and seals the last one.
pub(super) fn publish_batches(core: &mut PublisherCore, count: usize, now: Timestamp) {
    for _ in 0..count {
        core.publish(MESSAGE, now).unwrap();
    }
    core.seal(now).unwrap();
}

/// A core over two brokers (one connection each) that sent `count` one-message batches:
/// the even ones on connection 0, the odd ones on connection 1.
pub(super) fn two_brokers_with_batches(count: usize, now: Timestamp) -> PublisherCore {
    let mut core = Setup {
        connections: 2,
        ..Setup::default()
    }
    .core();
    publish_batches(&mut core, count, now);
    core
}
