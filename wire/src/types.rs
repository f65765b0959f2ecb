//! Field types shared by several frames: [`Order`], [`AckLevel`] and [`Topic`].

use core::fmt;

use crate::error::Error;
use crate::limits::TOPIC_BYTES_MAX;

/// A topic's ordering guarantee (docs/protocol.md, "Sequences").
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Order {
    /// 0: no global order; per-broker arrival order. Acks carry no positions.
    Unordered = 0,
    /// 1: per-broker FIFO per publisher.
    PerBrokerFifo = 1,
    /// 2: one total order over all brokers.
    Total = 2,
    /// 5: total order, and each publisher session's batches in the order it sent them.
    TotalSessionFifo = 5,
}

impl TryFrom<u8> for Order {
    type Error = Error;

    fn try_from(value: u8) -> Result<Self, Error> {
        match value {
            0 => Ok(Order::Unordered),
            1 => Ok(Order::PerBrokerFifo),
            2 => Ok(Order::Total),
            5 => Ok(Order::TotalSessionFifo),
            other => Err(Error::InvalidOrder(other)),
        }
    }
}

/// When a publisher is told a batch is done (docs/protocol.md, "Acknowledgements").
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AckLevel {
    /// 0: never acknowledged (fire and forget).
    FireAndForget = 0,
    /// 1: acknowledged once in the pool and ordered (order 0: once in the pool).
    Ordered = 1,
    /// 2: additionally held durably by `replication_factor` replicas.
    Replicated = 2,
}

impl TryFrom<u8> for AckLevel {
    type Error = Error;

    fn try_from(value: u8) -> Result<Self, Error> {
        match value {
            0 => Ok(AckLevel::FireAndForget),
            1 => Ok(AckLevel::Ordered),
            2 => Ok(AckLevel::Replicated),
            other => Err(Error::InvalidAckLevel(other)),
        }
    }
}

/// How a topic's connected subscribers hold its log (the pool is a ring: what nobody holds is
/// overwritten as new batches arrive).
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Retention {
    /// 0: a subscriber holds what it has not read while it keeps reading; one that takes
    /// nothing for the broker's stall limit stops holding, so publishers never wait on it
    /// longer than that (it may then find its next batch overwritten: `PositionTruncated`).
    #[default]
    StallLimited = 0,
    /// 1: publishers wait for every connected subscriber, however long it takes.
    HoldForSubscribers = 1,
}

impl TryFrom<u8> for Retention {
    type Error = Error;

    fn try_from(value: u8) -> Result<Self, Error> {
        match value {
            0 => Ok(Retention::StallLimited),
            1 => Ok(Retention::HoldForSubscribers),
            other => Err(Error::InvalidRetention(other)),
        }
    }
}

/// How much of a replicated topic's history each replica keeps on disk, beyond what the pool
/// holds. The oldest whole segments go first; the segment being written is always kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct HistoryRetention {
    /// Segments are deleted while the rest still holds at least this many bytes (0: no
    /// limit).
    pub bytes: u64,
    /// A segment is deleted once its last write is this old, in milliseconds (0: no limit).
    pub ms: u64,
}

impl HistoryRetention {
    /// Everything is kept.
    pub const UNLIMITED: HistoryRetention = HistoryRetention { bytes: 0, ms: 0 };
}

/// A validated topic name: 1 to 64 bytes of `[A-Za-z0-9._-]` (hence ASCII and UTF-8).
///
/// Stored inline, so it is `Copy` and never allocates.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic {
    len: u8,
    bytes: [u8; TOPIC_BYTES_MAX],
}

impl Topic {
    /// Validates a topic name against the protocol's rules.
    pub fn new(name: &str) -> Result<Self, Error> {
        Self::from_bytes(name.as_bytes(), TOPIC_BYTES_MAX)
    }

    /// Validates topic bytes received from the wire against a length limit (at most
    /// [`TOPIC_BYTES_MAX`]).
    pub fn from_bytes(name: &[u8], max: usize) -> Result<Self, Error> {
        let max = max.min(TOPIC_BYTES_MAX);
        if name.is_empty() {
            return Err(Error::EmptyTopic);
        }
        if name.len() > max {
            return Err(Error::TopicTooLong {
                len: name.len(),
                max,
            });
        }
        if let Some((index, &byte)) = name
            .iter()
            .enumerate()
            .find(|(_, byte)| !(byte.is_ascii_alphanumeric() || b"._-".contains(byte)))
        {
            return Err(Error::InvalidTopicByte { byte, index });
        }
        let mut bytes = [0u8; TOPIC_BYTES_MAX];
        bytes[..name.len()].copy_from_slice(name);
        Ok(Topic {
            // In 1..=64, checked above.
            len: name.len() as u8,
            bytes,
        })
    }

    /// The name's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        // The constructor admits ASCII only, so this conversion always succeeds.
        core::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    /// Length of the name in bytes (1..=64), as carried in the `topic_len` field.
    pub fn wire_len(&self) -> u8 {
        self.len
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Topic({:?})", self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_rules() {
        assert_eq!(
            Topic::new("orders.eu-1_b").unwrap().as_str(),
            "orders.eu-1_b"
        );
        assert_eq!(Topic::new(""), Err(Error::EmptyTopic));
        assert_eq!(
            Topic::new(&"a".repeat(65)),
            Err(Error::TopicTooLong { len: 65, max: 64 })
        );
        assert!(Topic::new(&"a".repeat(64)).is_ok());
        assert_eq!(
            Topic::new("a b"),
            Err(Error::InvalidTopicByte {
                byte: b' ',
                index: 1
            })
        );
        assert_eq!(
            Topic::new("é"),
            Err(Error::InvalidTopicByte {
                byte: 0xc3,
                index: 0
            })
        );
        assert_eq!(
            Topic::from_bytes(b"abcdef", 4),
            Err(Error::TopicTooLong { len: 6, max: 4 })
        );
    }

    #[test]
    fn enum_codes() {
        for value in 0..=u8::MAX {
            match Order::try_from(value) {
                Ok(order) => assert_eq!(order as u8, value),
                Err(error) => {
                    assert!(![0, 1, 2, 5].contains(&value));
                    assert_eq!(error, Error::InvalidOrder(value));
                }
            }
            match AckLevel::try_from(value) {
                Ok(ack) => assert_eq!(ack as u8, value),
                Err(error) => assert_eq!(error, Error::InvalidAckLevel(value)),
            }
        }
    }
}
