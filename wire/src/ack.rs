//! The Ack frame (broker to publisher, on the publisher's own connection).
//!
//! ```text
//! offset size field
//!      0    8 acked_through_seq  every batch this connection sent with seq <= this is done
//!      8    2 entry_count        0..=1024
//!     10    6 reserved           0
//!     16 24*n entries, in strictly increasing batch_seq, each <= acked_through_seq:
//!             +0  8 batch_seq
//!             +8  8 global_start   u64::MAX = none (order 0, or duplicate of unknown origin)
//!            +16  4 message_count  >= 1
//!            +20  1 status         0 ordered, 1 duplicate
//!            +21  3 reserved       0
//! ```

use crate::bytes::{
    decode_optional, encode_optional, first_non_zero, set_u16, set_u32, set_u64, u16_at, u32_at,
    u64_at,
};
use crate::delivery::check_position_range;
use crate::error::Error;
use crate::hello::check_exact;

/// Size of the fixed part of an Ack body.
pub const ACK_FIXED_BYTES: usize = 16;
/// Size of one ack entry.
pub const ACK_ENTRY_BYTES: usize = 24;
/// Most entries one Ack frame may carry.
pub const ACK_ENTRIES_MAX: usize = 1024;
/// Size of the largest Ack body.
pub const ACK_BODY_BYTES_MAX: usize = ACK_FIXED_BYTES + ACK_ENTRY_BYTES * ACK_ENTRIES_MAX;

mod field {
    pub const ACKED_THROUGH_SEQ: usize = 0;
    pub const ENTRY_COUNT: usize = 8;
    pub const RESERVED: core::ops::Range<usize> = 10..16;
    pub const ENTRIES: usize = 16;

    pub const ENTRY_BATCH_SEQ: usize = 0;
    pub const ENTRY_GLOBAL_START: usize = 8;
    pub const ENTRY_MESSAGE_COUNT: usize = 16;
    pub const ENTRY_STATUS: usize = 20;
    pub const ENTRY_RESERVED: core::ops::Range<usize> = 21..24;
}

/// What happened to an acknowledged batch.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckStatus {
    /// 0: written and given its place (order 0: written to the pool).
    Ordered = 0,
    /// 1: a retry of a batch already in the log; `global_start` is the original one when
    /// known.
    Duplicate = 1,
}

impl TryFrom<u8> for AckStatus {
    type Error = Error;

    fn try_from(value: u8) -> Result<Self, Error> {
        match value {
            0 => Ok(AckStatus::Ordered),
            1 => Ok(AckStatus::Duplicate),
            other => Err(Error::InvalidAckStatus(other)),
        }
    }
}

/// One acknowledged batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AckEntry {
    /// The batch's sequence on this session.
    pub batch_seq: u64,
    /// Global position of its first message; `None` for order 0 or an unknown original.
    /// `Some(u64::MAX)` is not representable (it encodes `None`).
    pub global_start: Option<u64>,
    /// Messages in the batch (at least 1).
    pub message_count: u32,
    /// Ordered now, or a duplicate.
    pub status: AckStatus,
}

impl AckEntry {
    fn parse(bytes: &[u8]) -> Result<Self, Error> {
        let batch_seq = u64_at(bytes, field::ENTRY_BATCH_SEQ);
        let message_count = u32_at(bytes, field::ENTRY_MESSAGE_COUNT);
        let status = AckStatus::try_from(bytes[field::ENTRY_STATUS])?;
        if let Some((_, value)) = first_non_zero(bytes, field::ENTRY_RESERVED) {
            return Err(Error::NonZeroReserved {
                field: "ack entry reserved byte",
                value: value.into(),
            });
        }
        let entry = AckEntry {
            batch_seq,
            global_start: decode_optional(u64_at(bytes, field::ENTRY_GLOBAL_START)),
            message_count,
            status,
        };
        entry.check()?;
        Ok(entry)
    }

    fn check(&self) -> Result<(), Error> {
        if self.message_count == 0 {
            return Err(Error::EmptyBatch {
                batch_seq: self.batch_seq,
            });
        }
        check_position_range(self.global_start, self.message_count)
    }

    fn emit(&self, bytes: &mut [u8]) {
        set_u64(bytes, field::ENTRY_BATCH_SEQ, self.batch_seq);
        set_u64(
            bytes,
            field::ENTRY_GLOBAL_START,
            encode_optional(self.global_start),
        );
        set_u32(bytes, field::ENTRY_MESSAGE_COUNT, self.message_count);
        bytes[field::ENTRY_STATUS] = self.status as u8;
        bytes[field::ENTRY_RESERVED].fill(0);
    }
}

/// A view over an Ack body.
#[derive(Debug, Clone, Copy)]
pub struct Ack<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ack<T> {
    /// Wraps a buffer without checks; accessors panic if it is too short.
    pub fn new_unchecked(buffer: T) -> Self {
        Ack { buffer }
    }

    /// Wraps a body after [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let ack = Self::new_unchecked(buffer);
        ack.check_len()?;
        Ok(ack)
    }

    /// Checks that `entry_count` is within [`ACK_ENTRIES_MAX`] and that the body is exactly
    /// the fixed part plus that many entries.
    pub fn check_len(&self) -> Result<(), Error> {
        let body = self.buffer.as_ref();
        if body.len() >= ACK_FIXED_BYTES {
            let count = usize::from(self.entry_count());
            if count > ACK_ENTRIES_MAX {
                return Err(Error::TooManyAckEntries {
                    count,
                    max: ACK_ENTRIES_MAX,
                });
            }
        }
        check_exact(body.len(), ACK_FIXED_BYTES, "ack body", || {
            usize::from(self.entry_count()) * ACK_ENTRY_BYTES
        })
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The cumulative acknowledged sequence.
    pub fn acked_through_seq(&self) -> u64 {
        u64_at(self.buffer.as_ref(), field::ACKED_THROUGH_SEQ)
    }

    /// Number of entries.
    pub fn entry_count(&self) -> u16 {
        u16_at(self.buffer.as_ref(), field::ENTRY_COUNT)
    }

    /// The reserved bytes.
    pub fn reserved(&self) -> &[u8] {
        &self.buffer.as_ref()[field::RESERVED]
    }

    /// The entries, each parsed on the fly (no allocation; no ordering check).
    pub fn entries(&self) -> impl Iterator<Item = Result<AckEntry, Error>> + '_ {
        let count = usize::from(self.entry_count());
        self.buffer.as_ref()[field::ENTRIES..]
            .chunks_exact(ACK_ENTRY_BYTES)
            .take(count)
            .map(AckEntry::parse)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ack<T> {
    /// Sets the cumulative acknowledged sequence.
    pub fn set_acked_through_seq(&mut self, seq: u64) {
        set_u64(self.buffer.as_mut(), field::ACKED_THROUGH_SEQ, seq);
    }

    /// Sets the entry count.
    pub fn set_entry_count(&mut self, count: u16) {
        set_u16(self.buffer.as_mut(), field::ENTRY_COUNT, count);
    }

    /// Zeroes the reserved bytes.
    pub fn clear_reserved(&mut self) {
        self.buffer.as_mut()[field::RESERVED].fill(0);
    }

    /// Writes entry `index`.
    pub fn set_entry(&mut self, index: usize, entry: &AckEntry) {
        let at = field::ENTRIES + index * ACK_ENTRY_BYTES;
        entry.emit(&mut self.buffer.as_mut()[at..at + ACK_ENTRY_BYTES]);
    }
}

/// A parsed, validated Ack: at most [`ACK_ENTRIES_MAX`] entries, in strictly increasing
/// batch sequence, none beyond `acked_through_seq`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AckRepr {
    acked_through_seq: u64,
    entries: Vec<AckEntry>,
}

impl AckRepr {
    /// Builds an Ack, checking the entry rules.
    pub fn new(acked_through_seq: u64, entries: Vec<AckEntry>) -> Result<Self, Error> {
        if entries.len() > ACK_ENTRIES_MAX {
            return Err(Error::TooManyAckEntries {
                count: entries.len(),
                max: ACK_ENTRIES_MAX,
            });
        }
        for (index, entry) in entries.iter().enumerate() {
            entry.check()?;
            if entry.batch_seq > acked_through_seq {
                return Err(Error::AckEntryBeyondCumulative {
                    batch_seq: entry.batch_seq,
                    acked_through_seq,
                });
            }
            if let Some(previous) = index.checked_sub(1).map(|i| entries[i].batch_seq)
                && entry.batch_seq <= previous
            {
                return Err(Error::AckEntriesUnordered {
                    index,
                    batch_seq: entry.batch_seq,
                    previous,
                });
            }
        }
        Ok(AckRepr {
            acked_through_seq,
            entries,
        })
    }

    /// Parses a checked Ack view.
    pub fn parse<T: AsRef<[u8]>>(ack: &Ack<T>) -> Result<Self, Error> {
        if let Some((_, value)) = first_non_zero(ack.buffer.as_ref(), field::RESERVED) {
            return Err(Error::NonZeroReserved {
                field: "ack reserved byte",
                value: value.into(),
            });
        }
        let entries = ack.entries().collect::<Result<Vec<_>, _>>()?;
        AckRepr::new(ack.acked_through_seq(), entries)
    }

    /// Every batch with a sequence up to this one is done.
    pub fn acked_through_seq(&self) -> u64 {
        self.acked_through_seq
    }

    /// The acknowledged batches with their positions.
    pub fn entries(&self) -> &[AckEntry] {
        &self.entries
    }

    /// Length of the body.
    pub fn buffer_len(&self) -> usize {
        ACK_FIXED_BYTES + ACK_ENTRY_BYTES * self.entries.len()
    }

    /// Writes the body; the view must span [`buffer_len`](Self::buffer_len) bytes.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, ack: &mut Ack<T>) {
        ack.set_acked_through_seq(self.acked_through_seq);
        // At most ACK_ENTRIES_MAX (1024), checked in `new`.
        ack.set_entry_count(self.entries.len() as u16);
        ack.clear_reserved();
        for (index, entry) in self.entries.iter().enumerate() {
            ack.set_entry(index, entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(batch_seq: u64, global_start: Option<u64>) -> AckEntry {
        AckEntry {
            batch_seq,
            global_start,
            message_count: 10,
            status: AckStatus::Ordered,
        }
    }

    fn bytes(repr: &AckRepr) -> Vec<u8> {
        let mut bytes = vec![0u8; repr.buffer_len()];
        repr.emit(&mut Ack::new_unchecked(&mut bytes[..]));
        bytes
    }

    #[test]
    fn round_trip() {
        let repr = AckRepr::new(
            9,
            vec![
                entry(3, Some(0)),
                AckEntry {
                    status: AckStatus::Duplicate,
                    ..entry(4, None)
                },
                entry(9, Some(u64::MAX - 10)),
            ],
        )
        .unwrap();
        let encoded = bytes(&repr);
        assert_eq!(encoded.len(), 16 + 3 * 24);
        assert_eq!(
            AckRepr::parse(&Ack::new_checked(&encoded[..]).unwrap()),
            Ok(repr)
        );
        let empty = AckRepr::new(5, Vec::new()).unwrap();
        assert_eq!(
            AckRepr::parse(&Ack::new_checked(&bytes(&empty)[..]).unwrap()),
            Ok(empty)
        );
    }

    #[test]
    fn entry_rules() {
        assert_eq!(
            AckRepr::new(5, vec![entry(6, None)]),
            Err(Error::AckEntryBeyondCumulative {
                batch_seq: 6,
                acked_through_seq: 5
            })
        );
        assert_eq!(
            AckRepr::new(5, vec![entry(2, None), entry(2, None)]),
            Err(Error::AckEntriesUnordered {
                index: 1,
                batch_seq: 2,
                previous: 2
            })
        );
        assert_eq!(
            AckRepr::new(
                5,
                vec![AckEntry {
                    message_count: 0,
                    ..entry(1, None)
                }]
            ),
            Err(Error::EmptyBatch { batch_seq: 1 })
        );
        let entries = (0..=ACK_ENTRIES_MAX as u64)
            .map(|seq| entry(seq, None))
            .collect();
        assert_eq!(
            AckRepr::new(u64::MAX, entries),
            Err(Error::TooManyAckEntries {
                count: 1025,
                max: 1024
            })
        );
    }

    #[test]
    fn wire_rules() {
        let repr = AckRepr::new(1, vec![entry(1, Some(7))]).unwrap();
        let good = bytes(&repr);

        let mut bad_status = good.clone();
        bad_status[16 + 20] = 2;
        assert_eq!(
            AckRepr::parse(&Ack::new_checked(&bad_status[..]).unwrap()),
            Err(Error::InvalidAckStatus(2))
        );

        let mut too_many = good.clone();
        too_many[8..10].copy_from_slice(&1025u16.to_le_bytes());
        assert_eq!(
            Ack::new_checked(&too_many[..]).unwrap_err(),
            Error::TooManyAckEntries {
                count: 1025,
                max: 1024
            }
        );

        assert_eq!(
            Ack::new_checked(&good[..good.len() - 1]).unwrap_err(),
            Error::LengthMismatch {
                what: "ack body",
                expected: 40,
                actual: 39
            }
        );

        let mut reserved = good.clone();
        reserved[12] = 1;
        assert!(matches!(
            AckRepr::parse(&Ack::new_checked(&reserved[..]).unwrap()),
            Err(Error::NonZeroReserved { .. })
        ));
    }
}
