//! [`Subscriber`]: reads Deliveries in global order from one broker, verifies each payload
//! and checks that positions follow each other without gaps or repeats
//! ([`PositionChecker`]).

use std::collections::VecDeque;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use units::Timestamp;
use wire::{
    AckLevel, DeliveryHeaderRepr, Frame, HelloOkRepr, HelloRepr, Limits, Order, Role,
    verify_checksummed_payload, verify_payload,
};

use crate::config::SubscriberConfig;
use crate::error::ClientError;
use crate::net::{FrameReader, Inbound, ReadOutcome, ReadTimeout, connect_and_hello, write_frame};

/// One Delivery: a publisher's batch (or a contiguous slice of it), verified against its
/// header's length and message count, and its CRC-32C unless
/// [`SubscriberConfig::verify_checksums`] is off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveredBatch {
    /// Global position of the first message; `None` for order 0 topics.
    pub global_start: Option<u64>,
    /// Messages in the delivery.
    pub message_count: u32,
    /// Publisher of the batch.
    pub client_id: u64,
    /// Publisher's session epoch.
    pub session_epoch: u32,
    /// Publisher's batch sequence.
    pub batch_seq: u64,
    /// Broker that received the batch.
    pub broker_id: u16,
    /// The CRC-32C of the payload that the delivery's header announced.
    pub checksum: u32,
    payload: Vec<u8>,
}

impl DeliveredBatch {
    /// The messages, in order.
    pub fn messages(&self) -> impl Iterator<Item = &[u8]> {
        // The payload was verified on arrival, so every item is Ok.
        wire::payload::messages(&self.payload).map_while(Result::ok)
    }

    /// The raw payload (length-prefixed messages).
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// Whether the payload matches the CRC-32C its header announced (reads every byte): for a
    /// subscriber with [`SubscriberConfig::verify_checksums`] off that checks some
    /// deliveries after all.
    pub fn checksum_matches(&self) -> bool {
        wire::payload::checksum(&self.payload) == self.checksum
    }

    /// Global position just past the last message, when the topic has positions.
    pub fn global_end(&self) -> Option<u64> {
        self.global_start
            .map(|start| start + u64::from(self.message_count))
    }
}

/// What [`PositionChecker::observe`] concluded about one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PositionCheck {
    /// Starts exactly where the previous one ended (or is the first one).
    InOrder,
    /// Starts after the expected position: `missing` positions were skipped.
    Gap {
        /// Positions skipped.
        missing: u64,
    },
    /// Starts before the expected position: `repeated` positions were delivered again.
    Duplicate {
        /// Positions delivered a second time.
        repeated: u64,
    },
    /// The topic has positions but the delivery carries none.
    Unpositioned,
    /// Order 0: positions are not defined, nothing to check.
    Unchecked,
}

/// Counts of [`PositionChecker`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PositionReport {
    /// Deliveries that started after the expected position.
    pub gaps: u64,
    /// Positions skipped by those gaps.
    pub missing_positions: u64,
    /// Deliveries that started before the expected position.
    pub duplicates: u64,
    /// Positions delivered more than once.
    pub duplicate_positions: u64,
    /// Deliveries without a position on a topic that has positions.
    pub unpositioned: u64,
    /// The position the next delivery should start at, once known.
    pub next_position: Option<u64>,
}

impl PositionReport {
    /// Whether no gap, duplicate or unpositioned delivery was seen.
    pub fn is_clean(&self) -> bool {
        self.gaps == 0 && self.duplicates == 0 && self.unpositioned == 0
    }
}

/// Checks that deliveries of a positioned topic (order > 0) tile the global positions:
/// each `global_start` must equal the previous `global_start + message_count`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PositionChecker {
    positioned: bool,
    report: PositionReport,
}

impl PositionChecker {
    /// A checker for a topic of this order, expecting the first delivery at `first` (or
    /// accepting any first position when `None`).
    pub fn new(order: Order, first: Option<u64>) -> Self {
        PositionChecker {
            positioned: order != Order::Unordered,
            report: PositionReport {
                next_position: first,
                ..PositionReport::default()
            },
        }
    }

    /// Checks one delivery and advances the expected position.
    pub fn observe(&mut self, global_start: Option<u64>, message_count: u32) -> PositionCheck {
        if !self.positioned {
            return PositionCheck::Unchecked;
        }
        let Some(start) = global_start else {
            self.report.unpositioned += 1;
            return PositionCheck::Unpositioned;
        };
        let end = start.saturating_add(u64::from(message_count));
        let report = &mut self.report;
        let expected = report.next_position.unwrap_or(start);
        let check = if start == expected {
            PositionCheck::InOrder
        } else if start > expected {
            let missing = start - expected;
            report.gaps += 1;
            report.missing_positions += missing;
            PositionCheck::Gap { missing }
        } else {
            let repeated = (expected - start).min(u64::from(message_count));
            report.duplicates += 1;
            report.duplicate_positions += repeated;
            PositionCheck::Duplicate { repeated }
        };
        report.next_position = Some(end.max(expected));
        check
    }

    /// The counts so far.
    pub fn report(&self) -> PositionReport {
        self.report
    }
}

/// What a subscriber has received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriberStats {
    /// Deliveries that passed verification.
    pub batches: u64,
    /// Messages in them.
    pub messages: u64,
    /// Message bytes in them (without length prefixes).
    pub message_bytes: u64,
    /// Deliveries whose payload failed verification.
    pub corrupt_batches: u64,
    /// Redirects followed to reach the broker that serves the subscription.
    #[serde(default)]
    pub redirects: u64,
    /// Position checks.
    pub positions: PositionReport,
}

/// Most redirects [`Subscriber::connect`] follows: a broker redirects only to brokers that
/// keep the topic on disk, so one is enough; the second allows for a replica that was
/// replaced meanwhile.
pub const REDIRECTS_MAX: u64 = 2;

/// Tries `first`; on a redirect, the brokers it names in turn (before those of an earlier
/// redirect still untried, and never one tried already) until one answers. A redirect again
/// counts against [`REDIRECTS_MAX`]. Returns the broker that answered, its answer and the
/// redirects followed.
fn follow_redirects<T>(
    first: SocketAddr,
    mut attempt: impl FnMut(SocketAddr) -> Result<T, ClientError>,
) -> Result<(SocketAddr, T, u64), ClientError> {
    let mut addr = first;
    let mut tried = vec![first];
    let mut candidates = VecDeque::new();
    let mut redirects = 0;
    loop {
        let error = match attempt(addr) {
            Ok(answer) => return Ok((addr, answer, redirects)),
            Err(ClientError::Redirected { addr: by, brokers }) if redirects < REDIRECTS_MAX => {
                log::info!("{by} redirected the subscription to {brokers:?}");
                redirects += 1;
                for broker in brokers.iter().rev() {
                    if !tried.contains(broker) && !candidates.contains(broker) {
                        candidates.push_front(*broker);
                    }
                }
                ClientError::Redirected { addr: by, brokers }
            }
            Err(error) => error,
        };
        match candidates.pop_front() {
            Some(next) => {
                log::debug!("{addr}: {error}; trying {next}");
                tried.push(next);
                addr = next;
            }
            None => return Err(error),
        }
    }
}

/// A subscription to one topic on one broker.
///
/// Dropping a subscriber without [`close`](Subscriber::close) still says Goodbye and
/// closes the socket.
#[derive(Debug)]
pub struct Subscriber {
    addr: SocketAddr,
    stream: TcpStream,
    reader: FrameReader,
    read_timeout: ReadTimeout,
    hello_ok: HelloOkRepr,
    checker: PositionChecker,
    stats: SubscriberStats,
    goodbye_timeout: Duration,
    verify_checksums: bool,
    failure: Option<ClientError>,
    closed: bool,
}

impl Subscriber {
    /// Connects, sends Hello (role subscribe) and checks HelloOk. The broker refuses a
    /// start before the log start (`PositionTruncated`) or after its end
    /// (`PositionBeyondEnd`), reported as [`ClientError::Broker`]. A broker that keeps no
    /// replica of an older start redirects to the brokers that do: they are tried in the
    /// order given, and at most [`REDIRECTS_MAX`] redirects are followed.
    pub fn connect(config: SubscriberConfig) -> Result<Subscriber, ClientError> {
        let (topic, order) = config.validate()?;
        let hello = HelloRepr {
            role: Role::Subscribe {
                from_position: config.from_position,
                batch_bytes_max: config.batch_bytes_max,
            },
            order,
            ack: AckLevel::FireAndForget,
            client_id: config.client_id,
            session_epoch: 0,
            topic,
        };
        let (addr, (stream, mut reader, hello_ok), redirects) =
            follow_redirects(config.broker, |addr| {
                connect_and_hello(
                    addr,
                    &hello,
                    config.connect_timeout(),
                    config.socket_buffer_bytes,
                )
            })?;
        let wanted = match config.batch_bytes_max {
            0 => hello_ok.batch_bytes_max,
            own => own,
        };
        // Both values are within 4..=64 MiB (validated config, parsed HelloOk).
        if let Ok(limits) = Limits::default().with_batch_bytes_max(wanted) {
            reader.set_limits(limits);
        }
        let first = if config.from_end() {
            hello_ok.log_end
        } else {
            config.from_position
        };
        Ok(Subscriber {
            addr,
            stream,
            reader,
            read_timeout: ReadTimeout::default(),
            hello_ok,
            checker: PositionChecker::new(order, Some(first)),
            stats: SubscriberStats {
                redirects,
                ..SubscriberStats::default()
            },
            goodbye_timeout: config.goodbye_timeout(),
            verify_checksums: config.verify_checksums,
            failure: None,
            closed: false,
        })
    }

    /// The broker's HelloOk (log start and end, broker id, limits).
    pub fn hello_ok(&self) -> &HelloOkRepr {
        &self.hello_ok
    }

    /// What was received so far, with the position checks.
    pub fn stats(&self) -> SubscriberStats {
        SubscriberStats {
            positions: self.checker.report(),
            ..self.stats
        }
    }

    /// Waits up to `timeout` for the next Delivery; `Ok(None)` when none completed in
    /// time. A delivery that fails verification is counted and returned as
    /// [`ClientError::CorruptDelivery`]; the stream stays usable. Connection errors,
    /// closing Error frames and an unexpected end of stream fail the subscriber.
    pub fn next_batch(&mut self, timeout: Duration) -> Result<Option<DeliveredBatch>, ClientError> {
        if self.closed {
            return Err(ClientError::Closed { what: "subscriber" });
        }
        if let Some(error) = &self.failure {
            return Err(error.clone());
        }
        let deadline = Timestamp::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Timestamp::now());
            if let Err(error) = self.read_timeout.ensure(&self.stream, self.addr, remaining) {
                return Err(self.fail(error));
            }
            let outcome = match self.reader.next(&mut &self.stream) {
                Ok(outcome) => outcome,
                Err(error) => return Err(self.fail(error)),
            };
            match outcome {
                ReadOutcome::Item(Inbound::Delivery(header, payload)) => {
                    return self.accept(header, payload).map(Some);
                }
                ReadOutcome::Item(Inbound::Frame(Frame::Error(error)))
                    if !error.code.closes_connection() =>
                {
                    log::info!("{}: {}: {}", self.addr, error.code, error.reason());
                }
                ReadOutcome::Item(Inbound::Frame(Frame::Error(error))) => {
                    return Err(self.fail(ClientError::broker(self.addr, &error)));
                }
                ReadOutcome::Item(Inbound::Frame(Frame::Goodbye)) => {
                    return Err(self.fail(ClientError::ConnectionClosed {
                        addr: self.addr,
                        how: "unrequested Goodbye",
                        outstanding_batches: 0,
                    }));
                }
                ReadOutcome::Item(Inbound::Frame(other)) => {
                    return Err(self.fail(ClientError::UnexpectedFrame {
                        addr: self.addr,
                        got: other.kind(),
                        expected: "Delivery, Error or Goodbye",
                    }));
                }
                ReadOutcome::Eof => {
                    return Err(self.fail(ClientError::ConnectionClosed {
                        addr: self.addr,
                        how: "end of stream",
                        outstanding_batches: 0,
                    }));
                }
                ReadOutcome::TimedOut if Timestamp::now() >= deadline => return Ok(None),
                ReadOutcome::TimedOut => {}
            }
        }
    }

    fn fail(&mut self, error: ClientError) -> ClientError {
        self.failure.get_or_insert(error).clone()
    }

    fn accept(
        &mut self,
        header: DeliveryHeaderRepr,
        payload: Vec<u8>,
    ) -> Result<DeliveredBatch, ClientError> {
        if let Err(source) = check_delivery(&header, &payload, self.verify_checksums) {
            self.stats.corrupt_batches += 1;
            return Err(ClientError::CorruptDelivery {
                batch_seq: header.batch_seq,
                client_id: header.client_id,
                broker_id: header.broker_id,
                source,
            });
        }
        let check = self
            .checker
            .observe(header.global_start, header.message_count);
        if !matches!(check, PositionCheck::InOrder | PositionCheck::Unchecked) {
            log::warn!(
                "{}: delivery of batch {} from client {} at {:?}: {check:?}",
                self.addr,
                header.batch_seq,
                header.client_id,
                header.global_start
            );
        }
        let batch = DeliveredBatch {
            global_start: header.global_start,
            message_count: header.message_count,
            client_id: header.client_id,
            session_epoch: header.session_epoch,
            batch_seq: header.batch_seq,
            broker_id: header.broker_id,
            checksum: header.checksum,
            payload,
        };
        self.stats.batches += 1;
        self.stats.messages += u64::from(header.message_count);
        self.stats.message_bytes += batch.messages().map(|m| m.len() as u64).sum::<u64>();
        Ok(batch)
    }

    /// Sends Goodbye, reads (and drops) what the broker still sends until its Goodbye or
    /// the end of stream, up to `goodbye_timeout_ms`, and closes the socket.
    pub fn close(&mut self) -> Result<(), ClientError> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        let said = write_frame(&self.stream, &Frame::Goodbye, self.addr, "sending Goodbye");
        if said.is_ok() && self.failure.is_none() {
            let deadline = Timestamp::now() + self.goodbye_timeout;
            loop {
                let remaining = deadline.saturating_duration_since(Timestamp::now());
                if remaining.is_zero() {
                    break;
                }
                if self
                    .read_timeout
                    .ensure(&self.stream, self.addr, remaining)
                    .is_err()
                {
                    break;
                }
                match self.reader.next(&mut &self.stream) {
                    Ok(ReadOutcome::Item(Inbound::Frame(Frame::Goodbye)) | ReadOutcome::Eof)
                    | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
        let _ = self.stream.shutdown(Shutdown::Both);
        said
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        if let Err(error) = self.close() {
            log::debug!("closing subscriber: {error}");
        }
    }
}

/// A delivery's length and message framing, and its CRC-32C when `verify_checksums`.
fn check_delivery(
    header: &DeliveryHeaderRepr,
    payload: &[u8],
    verify_checksums: bool,
) -> Result<(), wire::Error> {
    if verify_checksums {
        verify_payload(header, payload)
    } else {
        // The header's own checksum stands in for the computed one.
        verify_checksummed_payload(header, header.checksum, payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivered_batch_checks_its_checksum_on_request() {
        let mut payload = Vec::new();
        wire::payload::push_message(&mut payload, b"one");
        let mut batch = DeliveredBatch {
            global_start: Some(0),
            message_count: 1,
            client_id: 1,
            session_epoch: 1,
            batch_seq: 0,
            broker_id: 0,
            checksum: wire::payload::checksum(&payload),
            payload,
        };
        assert!(batch.checksum_matches());
        batch.payload[5] ^= 1;
        assert!(!batch.checksum_matches());
    }

    #[test]
    fn a_delivery_is_checked_whole_and_without_its_checksum_only_when_asked() {
        let mut payload = Vec::new();
        wire::payload::push_message(&mut payload, b"one");
        wire::payload::push_message(&mut payload, b"two");
        let header = DeliveryHeaderRepr {
            global_start: Some(0),
            message_count: 2,
            payload_bytes: payload.len() as u32,
            checksum: wire::payload::checksum(&payload),
            client_id: 1,
            session_epoch: 1,
            batch_seq: 0,
            broker_id: 0,
        };
        for verify in [true, false] {
            assert_eq!(check_delivery(&header, &payload, verify), Ok(()));
        }
        let mut flipped = payload.clone();
        flipped[5] ^= 1;
        assert!(matches!(
            check_delivery(&header, &flipped, true),
            Err(wire::Error::ChecksumMismatch { .. })
        ));
        assert_eq!(check_delivery(&header, &flipped, false), Ok(()));
        // Length and framing are checked either way.
        let mut bad_prefix = payload.clone();
        bad_prefix[0] = 200;
        let short = &payload[..payload.len() - 1];
        for verify in [true, false] {
            let framing = DeliveryHeaderRepr {
                checksum: wire::payload::checksum(&bad_prefix),
                ..header
            };
            assert!(check_delivery(&framing, &bad_prefix, verify).is_err());
            assert!(matches!(
                check_delivery(&header, short, verify),
                Err(wire::Error::PayloadLengthMismatch { .. })
            ));
        }
    }

    #[test]
    fn in_order_positions_are_clean() {
        let mut checker = PositionChecker::new(Order::Total, Some(100));
        assert_eq!(checker.observe(Some(100), 3), PositionCheck::InOrder);
        assert_eq!(checker.observe(Some(103), 1), PositionCheck::InOrder);
        let report = checker.report();
        assert!(report.is_clean());
        assert_eq!(report.next_position, Some(104));
    }

    #[test]
    fn gaps_and_duplicates_are_counted_with_their_sizes() {
        let mut checker = PositionChecker::new(Order::TotalSessionFifo, Some(0));
        assert_eq!(checker.observe(Some(0), 5), PositionCheck::InOrder);
        assert_eq!(
            checker.observe(Some(8), 2),
            PositionCheck::Gap { missing: 3 }
        );
        // A full repeat of 8..10, then a partial overlap 9..12.
        assert_eq!(
            checker.observe(Some(8), 2),
            PositionCheck::Duplicate { repeated: 2 }
        );
        assert_eq!(
            checker.observe(Some(9), 3),
            PositionCheck::Duplicate { repeated: 1 }
        );
        assert_eq!(checker.observe(None, 1), PositionCheck::Unpositioned);
        assert_eq!(checker.observe(Some(12), 1), PositionCheck::InOrder);
        let report = checker.report();
        assert_eq!(
            report,
            PositionReport {
                gaps: 1,
                missing_positions: 3,
                duplicates: 2,
                duplicate_positions: 3,
                unpositioned: 1,
                next_position: Some(13),
            }
        );
        assert!(!report.is_clean());
    }

    #[test]
    fn first_delivery_is_checked_against_the_start_position() {
        let mut checker = PositionChecker::new(Order::Total, Some(50));
        assert_eq!(
            checker.observe(Some(60), 1),
            PositionCheck::Gap { missing: 10 }
        );
        let mut any_start = PositionChecker::new(Order::Total, None);
        assert_eq!(any_start.observe(Some(60), 1), PositionCheck::InOrder);
    }

    fn redirect(by: u16, to: &[u16]) -> ClientError {
        ClientError::Redirected {
            addr: at(by),
            brokers: to.iter().map(|&port| at(port)).collect(),
        }
    }

    fn at(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn redirects_are_followed_in_order_past_unreachable_brokers_and_bounded() {
        // 1 redirects to 2 (down) and 3; 3 answers.
        let mut tried = Vec::new();
        let answered = follow_redirects(at(1), |addr| {
            tried.push(addr.port());
            match addr.port() {
                1 => Err(redirect(1, &[2, 3])),
                2 => Err(ClientError::io(
                    addr,
                    "connecting",
                    std::io::ErrorKind::ConnectionRefused.into(),
                )),
                _ => Ok("HelloOk"),
            }
        })
        .unwrap();
        assert_eq!(answered, (at(3), "HelloOk", 1));
        assert_eq!(tried, [1, 2, 3]);

        // Brokers redirecting in a circle: each is tried once, then the redirect is the error.
        let mut tried = Vec::new();
        let looped = follow_redirects(at(1), |addr| -> Result<(), _> {
            tried.push(addr.port());
            Err(redirect(addr.port(), &[addr.port() % 2 + 1]))
        })
        .unwrap_err();
        assert!(matches!(looped, ClientError::Redirected { .. }), "{looped}");
        assert_eq!(tried, [1, 2]);

        // A second redirect goes first; the first one's other brokers are still tried.
        let mut tried = Vec::new();
        let answered = follow_redirects(at(1), |addr| {
            tried.push(addr.port());
            match addr.port() {
                1 => Err(redirect(1, &[2, 3])),
                2 => Err(redirect(2, &[4])),
                4 => Err(ClientError::io(
                    addr,
                    "connecting",
                    std::io::ErrorKind::ConnectionRefused.into(),
                )),
                _ => Ok("HelloOk"),
            }
        })
        .unwrap();
        assert_eq!(answered, (at(3), "HelloOk", 2));
        assert_eq!(tried, [1, 2, 4, 3]);

        // Without a redirect, the first broker's error is the answer.
        let refused = follow_redirects(at(1), |addr| -> Result<(), _> {
            Err(ClientError::io(
                addr,
                "connecting",
                std::io::ErrorKind::ConnectionRefused.into(),
            ))
        })
        .unwrap_err();
        assert!(refused.to_string().contains("127.0.0.1:1"), "{refused}");
    }

    #[test]
    fn order_zero_is_not_checked() {
        let mut checker = PositionChecker::new(Order::Unordered, Some(0));
        assert_eq!(checker.observe(None, 4), PositionCheck::Unchecked);
        assert_eq!(checker.observe(Some(99), 4), PositionCheck::Unchecked);
        assert!(checker.report().is_clean());
    }
}
