//! Self-checking messages for load tests, and the [`Verifier`] that checks delivered ones
//! for corruption, exactly-once delivery and order, without the sender's memory.
//!
//! A message is a checksum, a deterministic pattern and the message's identity (16 bytes of
//! fields in all):
//!
//! ```text
//! offset   size field
//!      0      4 crc32c     CRC-32C of every byte after this field (pattern and identity)
//!      4      n pattern    bytes that depend on (publisher, seq), to the message length
//!    4+n      4 publisher  index of the publishing thread (0, 1, ...)
//!    8+n      8 seq        the message's sequence within its publisher (0, 1, ...)
//! ```
//!
//! All integers are little endian. The checksum covers the identity too, so a corrupted
//! identity is caught like corrupted content. The identity comes last so that a publisher
//! computes the checksum from the pattern's, kept per pattern, and the 12 identity bytes:
//! a load generator must not spend its core on checksums of bytes it made itself.

use std::collections::HashMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};

/// Bytes of a message's own fields (checksum, publisher index, sequence): the shortest
/// message.
pub const MESSAGE_HEADER_BYTES: usize = 16;
/// Bytes of the identity at the end of a message (publisher index, sequence).
const IDENTITY_BYTES: usize = 12;

/// Largest message sequence the verifier tracks (its bitmap grows with the sequence).
pub const SEQ_LIMIT: u64 = 1 << 32;

/// Why a message does not pass as a self-checking message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// Shorter than the 16-byte header.
    #[error("message of {len} bytes is shorter than the {MESSAGE_HEADER_BYTES}-byte header")]
    TooShort {
        /// Length of the message.
        len: usize,
    },
    /// The checksum does not match the content.
    #[error("message checksum {stored:#010x} does not match the content's {computed:#010x}")]
    Checksum {
        /// Checksum in the header.
        stored: u32,
        /// Checksum of the bytes received.
        computed: u32,
    },
}

/// The identity carried in a message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MessageId {
    /// Index of the publishing thread.
    pub publisher: u32,
    /// Sequence within that publisher.
    pub seq: u64,
}

/// Pattern offsets cycle through a prime number of positions so neighbouring messages
/// differ.
const PATTERN_PERIOD: usize = 251;

/// Builds self-checking messages of one length for one publisher, reusing one buffer.
#[derive(Debug, Clone)]
pub struct MessageFactory {
    publisher: u32,
    pattern: Vec<u8>,
    /// CRC-32C of the pattern as placed in a message, per pattern offset.
    pattern_crcs: Vec<u32>,
    message: Vec<u8>,
}

impl MessageFactory {
    /// A factory for `message_bytes`-long messages (at least [`MESSAGE_HEADER_BYTES`];
    /// `None` when shorter).
    pub fn new(publisher: u32, message_bytes: usize) -> Option<Self> {
        if message_bytes < MESSAGE_HEADER_BYTES {
            return None;
        }
        let body = message_bytes - MESSAGE_HEADER_BYTES;
        let salt = publisher.wrapping_mul(0x9e37_79b9);
        let pattern: Vec<u8> = (0..body + PATTERN_PERIOD)
            .map(|i| ((i as u32).wrapping_mul(131) ^ salt ^ (i as u32 >> 8)) as u8)
            .collect();
        let pattern_crcs = (0..PATTERN_PERIOD)
            .map(|offset| wire::payload::checksum(&pattern[offset..offset + body]))
            .collect();
        Some(MessageFactory {
            publisher,
            pattern,
            pattern_crcs,
            message: vec![0; message_bytes],
        })
    }

    /// Message `seq` of this publisher.
    pub fn message(&mut self, seq: u64) -> &[u8] {
        let end = self.message.len();
        let body = end - MESSAGE_HEADER_BYTES;
        let offset = (seq % PATTERN_PERIOD as u64) as usize;
        let identity = end - IDENTITY_BYTES;
        self.message[4..identity].copy_from_slice(&self.pattern[offset..offset + body]);
        self.message[identity..identity + 4].copy_from_slice(&self.publisher.to_le_bytes());
        self.message[identity + 4..].copy_from_slice(&seq.to_le_bytes());
        let crc =
            wire::payload::checksum_append(self.pattern_crcs[offset], &self.message[identity..]);
        self.message[..4].copy_from_slice(&crc.to_le_bytes());
        &self.message
    }
}

/// Checks a message's length and checksum and returns its identity.
pub fn decode_message(message: &[u8]) -> Result<MessageId, MessageError> {
    let Some((header, _)) = message.split_first_chunk::<MESSAGE_HEADER_BYTES>() else {
        return Err(MessageError::TooShort { len: message.len() });
    };
    let stored = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let computed = wire::payload::checksum(&message[4..]);
    if stored != computed {
        return Err(MessageError::Checksum { stored, computed });
    }
    let identity = message.len() - IDENTITY_BYTES;
    let mut publisher = [0u8; 4];
    publisher.copy_from_slice(&message[identity..identity + 4]);
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&message[identity + 4..]);
    Ok(MessageId {
        publisher: u32::from_le_bytes(publisher),
        seq: u64::from_le_bytes(seq),
    })
}

/// Which messages of one publisher must be delivered in the order they were sent, by the
/// topic's order (docs/protocol.md, "Sequences").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "scope")]
pub enum OrderCheck {
    /// Order 0: no order is promised; only content and exactly-once are checked.
    None,
    /// Orders 1 and 2: messages a publisher sent over the same connection keep their
    /// order. The connection of a batch is `batch_seq % connections` (the publisher's
    /// round-robin over its connection slots; a connection that replaces a failed one
    /// carries on its slot's stream). With one connection per broker this is exactly
    /// "per-broker FIFO per publisher"; with several, TCP gives no order between two
    /// connections to one broker, so only the per-connection part of the promise is checked.
    PerConnection {
        /// Connections of each publisher (brokers times connections per broker).
        connections: u64,
    },
    /// Order 5: each publisher session's messages in the order it sent them, across all
    /// brokers.
    PerPublisher,
}

impl OrderCheck {
    /// The check that matches a topic order, for publishers with `connections` connections.
    pub fn for_order(order: u8, connections: u64) -> Self {
        match order {
            5 => OrderCheck::PerPublisher,
            1 | 2 => OrderCheck::PerConnection {
                connections: connections.max(1),
            },
            _ => OrderCheck::None,
        }
    }

    fn scope(&self, batch_seq: u64) -> Option<u64> {
        match *self {
            OrderCheck::None => None,
            OrderCheck::PerConnection { connections } => Some(batch_seq % connections),
            OrderCheck::PerPublisher => Some(0),
        }
    }
}

/// Where a delivered message came from (from its Delivery header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryContext {
    /// Publisher's client id.
    pub client_id: u64,
    /// Publisher's batch sequence.
    pub batch_seq: u64,
}

/// The verifier's conclusion about one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// First delivery, in order.
    Ok,
    /// From a client id this run did not start (another run's data on the same topic).
    Foreign,
    /// Fails its checksum, is too short, names another publisher than its client id
    /// maps to, or has a sequence beyond [`SEQ_LIMIT`].
    Corrupt,
    /// Delivered before.
    Duplicate,
    /// First delivery, but after a later message of the same order scope.
    OutOfOrder,
}

/// Counts kept by the [`Verifier`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyCounts {
    /// Messages of this run delivered for the first time.
    pub delivered: u64,
    /// Messages from client ids of other runs (ignored).
    pub foreign: u64,
    /// Corrupt messages.
    pub corrupt: u64,
    /// Repeated deliveries of a message.
    pub duplicates: u64,
    /// First deliveries that came after a later message of the same scope.
    pub order_violations: u64,
}

#[derive(Debug, Clone, Default)]
struct Track {
    seen: Vec<u64>,
    /// Highest sequence delivered so far, per order scope.
    last_seq: HashMap<u64, u64>,
}

impl Track {
    /// Marks `seq` as seen; false when it was already.
    fn mark(&mut self, seq: u64) -> bool {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if self.seen.len() <= word {
            self.seen.resize(word + 1, 0);
        }
        let fresh = self.seen[word] & (1 << bit) == 0;
        self.seen[word] |= 1 << bit;
        fresh
    }

    fn is_seen(&self, seq: u64) -> bool {
        self.seen
            .get((seq / 64) as usize)
            .is_some_and(|word| word & (1 << (seq % 64)) != 0)
    }

    /// Seen sequences in `0..end`.
    fn seen_below(&self, end: u64) -> u64 {
        let full_words = (end / 64) as usize;
        let mut count: u64 = self
            .seen
            .iter()
            .take(full_words)
            .map(|w| u64::from(w.count_ones()))
            .sum();
        if let Some(word) = self.seen.get(full_words) {
            let mask = (1u64 << (end % 64)) - 1;
            count += u64::from((word & mask).count_ones());
        }
        count
    }
}

/// What one publisher's messages should have been delivered: sequences `0..messages`
/// except the `excluded` ranges (batches the broker reported as not ordered).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expectation {
    /// Messages the publisher had acknowledged (or, at ack 0, written).
    pub messages: u64,
    /// Sequence ranges that were rejected and must not be counted as lost.
    pub excluded: Vec<Range<u64>>,
}

/// Checks delivered self-checking messages: content (checksum), exactly-once per
/// (publisher, sequence), and order within the [`OrderCheck`] scope.
#[derive(Debug, Clone)]
pub struct Verifier {
    check: OrderCheck,
    publishers: HashMap<u64, u32>,
    tracks: Vec<Track>,
    counts: VerifyCounts,
}

impl Verifier {
    /// A verifier for this run's publishers: `client_ids[i]` is the client id of publisher
    /// index `i`.
    pub fn new(check: OrderCheck, client_ids: &[u64]) -> Self {
        Verifier {
            check,
            publishers: client_ids
                .iter()
                .enumerate()
                .map(|(index, &id)| (id, index as u32))
                .collect(),
            tracks: vec![Track::default(); client_ids.len()],
            counts: VerifyCounts::default(),
        }
    }

    /// Checks one delivered message.
    pub fn on_message(&mut self, context: &DeliveryContext, message: &[u8]) -> Verdict {
        let Some(&publisher) = self.publishers.get(&context.client_id) else {
            self.counts.foreign += 1;
            return Verdict::Foreign;
        };
        let id = match decode_message(message) {
            Ok(id) if id.publisher == publisher && id.seq < SEQ_LIMIT => id,
            _ => {
                self.counts.corrupt += 1;
                return Verdict::Corrupt;
            }
        };
        let track = &mut self.tracks[publisher as usize];
        if !track.mark(id.seq) {
            self.counts.duplicates += 1;
            return Verdict::Duplicate;
        }
        self.counts.delivered += 1;
        let Some(scope) = self.check.scope(context.batch_seq) else {
            return Verdict::Ok;
        };
        let last = track.last_seq.entry(scope).or_insert(id.seq);
        if id.seq < *last {
            self.counts.order_violations += 1;
            return Verdict::OutOfOrder;
        }
        *last = id.seq;
        Verdict::Ok
    }

    /// Whether `client_id` is one of the publishers whose messages this verifier checks.
    pub fn knows(&self, client_id: u64) -> bool {
        self.publishers.contains_key(&client_id)
    }

    /// The counts so far.
    pub fn counts(&self) -> VerifyCounts {
        self.counts
    }

    /// Expected messages not delivered (so far): `expectations[i]` is publisher `i`'s.
    pub fn lost(&self, expectations: &[Expectation]) -> u64 {
        expectations
            .iter()
            .zip(&self.tracks)
            .map(|(expected, track)| {
                let end = expected.messages;
                let (mut wanted, mut seen) = (end, track.seen_below(end));
                for range in &expected.excluded {
                    for seq in range.start..range.end.min(end) {
                        wanted -= 1;
                        seen -= u64::from(track.is_seen(seq));
                    }
                }
                wanted - seen
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: u64 = 0xaaaa;
    const B: u64 = 0xbbbb;

    fn context(client_id: u64, batch_seq: u64) -> DeliveryContext {
        DeliveryContext {
            client_id,
            batch_seq,
        }
    }

    fn message(publisher: u32, seq: u64) -> Vec<u8> {
        MessageFactory::new(publisher, 64)
            .unwrap()
            .message(seq)
            .to_vec()
    }

    #[test]
    fn a_verifier_knows_only_its_publishers() {
        let verifier = Verifier::new(OrderCheck::None, &[A, B]);
        assert!(verifier.knows(A) && verifier.knows(B));
        assert!(!verifier.knows(A + B + 1));
    }

    #[test]
    fn messages_round_trip_and_differ() {
        let mut factory = MessageFactory::new(3, 100).unwrap();
        let first = factory.message(0).to_vec();
        let second = factory.message(1).to_vec();
        assert_eq!(first.len(), 100);
        assert_ne!(first[16..], second[16..]);
        assert_eq!(
            decode_message(&first),
            Ok(MessageId {
                publisher: 3,
                seq: 0
            })
        );
        assert_eq!(
            decode_message(&second),
            Ok(MessageId {
                publisher: 3,
                seq: 1
            })
        );
        // Deterministic: another factory builds the same bytes.
        assert_eq!(MessageFactory::new(3, 100).unwrap().message(1), &second[..]);
        assert!(MessageFactory::new(0, 15).is_none());
        assert_eq!(MessageFactory::new(0, 16).unwrap().message(9).len(), 16);
    }

    #[test]
    fn every_pattern_offset_gives_a_message_whose_checksum_holds() {
        for bytes in [16, 17, 100, 1024] {
            let mut factory = MessageFactory::new(7, bytes).unwrap();
            for seq in 0..(2 * PATTERN_PERIOD as u64 + 3) {
                let message = factory.message(seq);
                assert_eq!(
                    decode_message(message),
                    Ok(MessageId { publisher: 7, seq }),
                    "{bytes}-byte message {seq}"
                );
            }
        }
    }

    #[test]
    fn corrupt_content_and_header_are_detected() {
        let good = message(0, 5);
        for index in [0, 4, 9, 16, 63] {
            let mut bad = good.clone();
            bad[index] ^= 0x40;
            assert!(
                matches!(decode_message(&bad), Err(MessageError::Checksum { .. })),
                "flip at {index}"
            );
        }
        assert_eq!(
            decode_message(&good[..10]),
            Err(MessageError::TooShort { len: 10 })
        );
        let mut verifier = Verifier::new(OrderCheck::PerPublisher, &[A]);
        let mut bad = good.clone();
        bad[40] ^= 1;
        assert_eq!(verifier.on_message(&context(A, 0), &bad), Verdict::Corrupt);
        // A valid message of publisher 1 delivered under publisher 0's client id.
        assert_eq!(
            verifier.on_message(&context(A, 0), &message(1, 0)),
            Verdict::Corrupt
        );
        assert_eq!(verifier.counts().corrupt, 2);
    }

    #[test]
    fn duplicates_and_foreign_messages() {
        let mut verifier = Verifier::new(OrderCheck::None, &[A, B]);
        assert_eq!(
            verifier.on_message(&context(A, 0), &message(0, 0)),
            Verdict::Ok
        );
        assert_eq!(
            verifier.on_message(&context(A, 0), &message(0, 0)),
            Verdict::Duplicate
        );
        assert_eq!(
            verifier.on_message(&context(B, 0), &message(1, 0)),
            Verdict::Ok
        );
        assert_eq!(
            verifier.on_message(&context(7, 0), &message(0, 0)),
            Verdict::Foreign
        );
        let counts = verifier.counts();
        assert_eq!(
            counts,
            VerifyCounts {
                delivered: 2,
                foreign: 1,
                corrupt: 0,
                duplicates: 1,
                order_violations: 0,
            }
        );
    }

    #[test]
    fn order_five_checks_the_whole_session() {
        let mut verifier = Verifier::new(OrderCheck::PerPublisher, &[A, B]);
        assert_eq!(
            verifier.on_message(&context(A, 0), &message(0, 0)),
            Verdict::Ok
        );
        // A gap is not an order violation (the batch may have been rejected).
        assert_eq!(
            verifier.on_message(&context(A, 2), &message(0, 5)),
            Verdict::Ok
        );
        assert_eq!(
            verifier.on_message(&context(A, 1), &message(0, 3)),
            Verdict::OutOfOrder
        );
        // Publishers are independent.
        assert_eq!(
            verifier.on_message(&context(B, 0), &message(1, 0)),
            Verdict::Ok
        );
        assert_eq!(verifier.counts().order_violations, 1);
    }

    #[test]
    fn orders_one_and_two_check_per_connection_only() {
        // Two connections: even batches on connection 0, odd ones on connection 1.
        let mut verifier = Verifier::new(OrderCheck::for_order(1, 2), &[A]);
        assert_eq!(
            verifier.on_message(&context(A, 1), &message(0, 10)),
            Verdict::Ok
        );
        // Batch 0 (connection 0) after batch 1 (connection 1): allowed.
        assert_eq!(
            verifier.on_message(&context(A, 0), &message(0, 0)),
            Verdict::Ok
        );
        assert_eq!(
            verifier.on_message(&context(A, 2), &message(0, 20)),
            Verdict::Ok
        );
        // Batch 3 on connection 1 is fine, but connection 0 going back is a violation.
        assert_eq!(
            verifier.on_message(&context(A, 3), &message(0, 30)),
            Verdict::Ok
        );
        assert_eq!(
            verifier.on_message(&context(A, 0), &message(0, 1)),
            Verdict::OutOfOrder
        );
        assert_eq!(
            OrderCheck::for_order(2, 3),
            OrderCheck::PerConnection { connections: 3 }
        );
        assert_eq!(OrderCheck::for_order(0, 3), OrderCheck::None);
        assert_eq!(OrderCheck::for_order(5, 3), OrderCheck::PerPublisher);
    }

    #[test]
    fn lost_counts_expected_messages_never_delivered() {
        let mut verifier = Verifier::new(OrderCheck::None, &[A, B]);
        for seq in (0..200).filter(|s| s % 50 != 7) {
            verifier.on_message(&context(A, 0), &message(0, seq));
        }
        // Publisher A: 200 expected, 4 never delivered (7, 57, 107, 157).
        // Publisher B: 10 expected, 3..6 rejected (excluded), nothing delivered.
        let expectations = [
            Expectation {
                messages: 200,
                excluded: vec![],
            },
            Expectation {
                messages: 10,
                excluded: vec![Range { start: 3, end: 6 }],
            },
        ];
        assert_eq!(verifier.lost(&expectations), 4 + 7);
        // Excluding a range that holds a lost message and a delivered one.
        let expectations = [Expectation {
            messages: 200,
            excluded: vec![Range { start: 5, end: 9 }],
        }];
        assert_eq!(verifier.lost(&expectations), 3);
        // Messages delivered beyond what was acknowledged do not make `lost` negative.
        let expectations = [Expectation {
            messages: 64,
            excluded: vec![],
        }];
        assert_eq!(verifier.lost(&expectations), 2);
    }
}
