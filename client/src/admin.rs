//! Topic creation: the admin connection (CreateTopic, then TopicOk or Error).

use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use wire::{AckLevel, CreateTopicRepr, Frame, FrameKind, HistoryRetention, Retention, TopicOkRepr};

use crate::config::{SOCKET_BUFFER_BYTES_DEFAULT, invalid, order, topic};
use crate::error::ClientError;
use crate::net::{FrameReader, Inbound, StepDeadline, open_stream, read_before, write_frame};

/// Longest wait for the broker's Goodbye after a TopicOk.
const GOODBYE_WAIT_MAX: Duration = Duration::from_secs(1);

/// A topic to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    /// Topic name: 1 to 64 bytes of `[A-Za-z0-9._-]`.
    pub topic: String,
    /// Order: 0, 1, 2 or 5.
    pub order: u8,
    /// Highest ack level publishers may ask for: 0, 1 or 2.
    pub ack: u8,
    /// Replicas besides the receiving broker; at least 1 when `ack` is 2.
    pub replication_factor: u8,
    /// Publishers wait for every connected subscriber however long it takes (else a
    /// subscriber that stops reading stops holding the log after the broker's stall limit).
    pub hold_for_subscribers: bool,
    /// History each replica keeps on disk, in bytes: the oldest segments are deleted while
    /// the rest holds at least this much (0: no limit).
    pub retention_bytes: u64,
    /// Age of the history each replica keeps on disk, in milliseconds (0: no limit).
    pub retention_ms: u64,
}

/// The broker's answer to a successful CreateTopic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicCreated {
    /// The answering broker.
    pub broker_id: u16,
    /// `true`: created now; `false`: it already existed with exactly these settings.
    pub created: bool,
}

impl TopicSpec {
    fn repr(&self) -> Result<CreateTopicRepr, ClientError> {
        let ack =
            AckLevel::try_from(self.ack).map_err(|_| invalid("ack", self.ack, "0, 1 or 2"))?;
        if ack == AckLevel::Replicated && self.replication_factor == 0 {
            return Err(invalid(
                "replication_factor",
                0,
                "at least 1 when ack is 2 (replicated)",
            ));
        }
        Ok(CreateTopicRepr {
            topic: topic(&self.topic)?,
            order: order(self.order)?,
            ack,
            replication_factor: self.replication_factor,
            retention: if self.hold_for_subscribers {
                Retention::HoldForSubscribers
            } else {
                Retention::StallLimited
            },
            history: HistoryRetention {
                bytes: self.retention_bytes,
                ms: self.retention_ms,
            },
        })
    }
}

/// Creates a topic on the broker at `addr` (idempotent for identical settings). A topic that
/// exists with other settings gives [`ClientError::Broker`] with code `TopicExists`. The
/// whole exchange, Goodbye included, is bounded by `timeout`.
pub fn create_topic(
    addr: SocketAddr,
    spec: &TopicSpec,
    timeout: Duration,
) -> Result<TopicCreated, ClientError> {
    let repr = spec.repr()?;
    let deadline = StepDeadline::after(timeout);
    let stream = open_stream(addr, timeout, SOCKET_BUFFER_BYTES_DEFAULT)?;
    let mut reader = FrameReader::new(addr, wire::Limits::default());
    let result = write_frame(
        &stream,
        &Frame::CreateTopic(repr),
        addr,
        "sending CreateTopic",
    )
    .and_then(|()| read_before(&mut reader, &stream, deadline, addr, "CreateTopic/TopicOk"))
    .and_then(|answer| check_topic_answer(addr, &repr, answer));
    // Goodbye in every case; the broker already closes after a refusal, so only wait for
    // its Goodbye after a TopicOk.
    if write_frame(&stream, &Frame::Goodbye, addr, "sending Goodbye").is_ok() && result.is_ok() {
        let goodbye_deadline = StepDeadline::after(deadline.remaining().min(GOODBYE_WAIT_MAX));
        match read_before(&mut reader, &stream, goodbye_deadline, addr, "Goodbye") {
            Ok(Some(Inbound::Frame(Frame::Goodbye)) | None) => {}
            Ok(Some(other)) => log::debug!("{addr}: unexpected frame after TopicOk: {other:?}"),
            Err(error) => log::debug!("{addr}: no Goodbye after TopicOk: {error}"),
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
    result
}

/// Creates a topic on whichever of `brokers` creates topics (the one holding the sequencer
/// lease: the head, or the standby that took over), trying them in order. Another broker
/// answers `UnknownTopic`, and one that cannot be reached is skipped; any other refusal
/// (`TopicExists`, `TopicLimit`, ...) ends the search. Returns the first success, or the last
/// error.
pub fn create_topic_on_cluster(
    brokers: &[SocketAddr],
    spec: &TopicSpec,
    timeout: Duration,
) -> Result<TopicCreated, ClientError> {
    let mut last = None;
    for &addr in brokers {
        match create_topic(addr, spec, timeout) {
            Ok(created) => return Ok(created),
            Err(error)
                if error.broker_code() == Some(wire::ErrorCode::UnknownTopic)
                    || error.broker_code().is_none() =>
            {
                log::info!(
                    "CreateTopic {}: {error}; trying the next broker",
                    spec.topic
                );
                last = Some(error);
            }
            Err(error) => return Err(error),
        }
    }
    Err(last.unwrap_or_else(|| invalid("brokers", "[]", "at least one broker address")))
}

/// Checks the answer to CreateTopic: a TopicOk naming the same topic and settings, or the
/// broker's Error.
pub(crate) fn check_topic_answer(
    addr: SocketAddr,
    asked: &CreateTopicRepr,
    answer: Option<Inbound>,
) -> Result<TopicCreated, ClientError> {
    let ok: TopicOkRepr = match answer {
        Some(Inbound::Frame(Frame::TopicOk(ok))) => ok,
        Some(Inbound::Frame(Frame::Error(error))) => return Err(ClientError::broker(addr, &error)),
        Some(Inbound::Frame(other)) => {
            return Err(ClientError::UnexpectedFrame {
                addr,
                got: other.kind(),
                expected: "TopicOk or Error",
            });
        }
        Some(Inbound::Delivery(..)) => {
            return Err(ClientError::UnexpectedFrame {
                addr,
                got: FrameKind::Delivery,
                expected: "TopicOk or Error",
            });
        }
        None => {
            return Err(ClientError::ConnectionClosed {
                addr,
                how: "end of stream before TopicOk",
                outstanding_batches: 0,
            });
        }
    };
    for (field, asked, got) in [
        ("order", asked.order as u64, ok.order as u64),
        ("ack", asked.ack as u64, ok.ack as u64),
        (
            "replication_factor",
            asked.replication_factor.into(),
            ok.replication_factor.into(),
        ),
        ("retention", asked.retention as u64, ok.retention as u64),
        ("retention_bytes", asked.history.bytes, ok.history.bytes),
        ("retention_ms", asked.history.ms, ok.history.ms),
    ] {
        if asked != got {
            return Err(ClientError::HandshakeMismatch {
                addr,
                field,
                asked,
                got,
            });
        }
    }
    if ok.topic != asked.topic {
        return Err(ClientError::UnexpectedFrame {
            addr,
            got: FrameKind::TopicOk,
            expected: "TopicOk for the topic asked for",
        });
    }
    Ok(TopicCreated {
        broker_id: ok.broker_id,
        created: ok.created,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::{ErrorCode, ErrorFrameRepr, Order, Topic};

    fn addr() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    fn spec() -> TopicSpec {
        TopicSpec {
            topic: "orders".into(),
            order: 5,
            ack: 1,
            replication_factor: 0,
            hold_for_subscribers: false,
            retention_bytes: 0,
            retention_ms: 0,
        }
    }

    fn ok(created: bool, order: Order) -> Option<Inbound> {
        Some(Inbound::Frame(Frame::TopicOk(TopicOkRepr {
            broker_id: 3,
            topic: Topic::new("orders").unwrap(),
            order,
            ack: AckLevel::Ordered,
            replication_factor: 0,
            created,
            retention: Retention::StallLimited,
            history: HistoryRetention::UNLIMITED,
        })))
    }

    #[test]
    fn topic_ok_created_or_existing() {
        let repr = spec().repr().unwrap();
        let created = check_topic_answer(addr(), &repr, ok(true, Order::TotalSessionFifo));
        assert_eq!(
            created.unwrap(),
            TopicCreated {
                broker_id: 3,
                created: true
            }
        );
        let existing = check_topic_answer(addr(), &repr, ok(false, Order::TotalSessionFifo));
        assert!(!existing.unwrap().created);
        let other = check_topic_answer(addr(), &repr, ok(false, Order::Total));
        assert!(matches!(
            other,
            Err(ClientError::HandshakeMismatch { field: "order", .. })
        ));
    }

    #[test]
    fn topic_exists_is_a_broker_error() {
        let repr = spec().repr().unwrap();
        let refused = Some(Inbound::Frame(Frame::Error(ErrorFrameRepr::new(
            ErrorCode::TopicExists,
            None,
            "orders has order 2",
        ))));
        let error = check_topic_answer(addr(), &repr, refused).unwrap_err();
        assert_eq!(error.broker_code(), Some(ErrorCode::TopicExists));
    }

    #[test]
    fn spec_is_validated() {
        let mut bad = spec();
        bad.ack = 2;
        assert!(
            bad.repr()
                .unwrap_err()
                .to_string()
                .contains("replication_factor = 0")
        );
        let mut bad = spec();
        bad.order = 4;
        assert!(bad.repr().is_err());
    }

    #[test]
    fn a_silent_broker_times_out_with_the_time_allowed() {
        // The kernel completes the handshake for the listener's backlog; nothing answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap();
        let error = create_topic(addr, &spec(), Duration::from_millis(200)).unwrap_err();
        assert!(
            matches!(
                error,
                ClientError::HandshakeTimeout {
                    what: "CreateTopic/TopicOk",
                    timeout_ms: 200,
                    ..
                }
            ),
            "{error}"
        );
    }
}
