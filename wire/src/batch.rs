//! The Batch frame: a fixed 32-byte [`BatchHeader`] followed by `payload_bytes` of
//! [`payload`](crate::payload).
//!
//! ```text
//! offset size field
//!      0    8 batch_seq      per-session sequence, from 0, +1 per batch (not u64::MAX)
//!      8    4 message_count  1..=payload_bytes/4
//!     12    4 payload_bytes  <= batch_bytes_max; frame body_bytes = 32 + payload_bytes
//!     16    4 checksum       CRC-32C of the payload
//!     20   12 reserved       0
//!     32    n payload        received by the caller straight into its destination
//! ```

use crate::bytes::{first_non_zero, set_u32, set_u64, u32_at, u64_at};
use crate::error::Error;
use crate::frame::{FRAME_HEADER_BYTES, FrameHeader, FrameHeaderRepr, FrameKind};
use crate::limits::Limits;
use crate::payload::{self, MESSAGE_PREFIX_BYTES};

/// Size of the batch header.
pub const BATCH_HEADER_BYTES: usize = 32;
/// Size of everything before a batch payload: frame header and batch header.
pub const BATCH_PREFIX_BYTES: usize = FRAME_HEADER_BYTES + BATCH_HEADER_BYTES;

mod field {
    pub const BATCH_SEQ: usize = 0;
    pub const MESSAGE_COUNT: usize = 8;
    pub const PAYLOAD_BYTES: usize = 12;
    pub const CHECKSUM: usize = 16;
    pub const RESERVED: core::ops::Range<usize> = 20..32;
}

/// The fields of a fixed header that describe the payload behind it.
pub trait PayloadHeader {
    /// Messages in the payload.
    fn message_count(&self) -> u32;
    /// Length of the payload.
    fn payload_bytes(&self) -> u32;
    /// CRC-32C of the payload.
    fn checksum(&self) -> u32;
}

/// Checks a received payload against its header: length, CRC-32C, then message framing.
pub fn verify_payload<H: PayloadHeader>(header: &H, payload: &[u8]) -> Result<(), Error> {
    verify_checksummed_payload(header, payload::checksum(payload), payload)
}

/// Checks a received payload whose CRC-32C (`computed`) was taken as it arrived, chunk by
/// chunk while each was in cache: length, CRC-32C, then message framing (which reads only
/// the messages' length prefixes).
pub fn verify_checksummed_payload<H: PayloadHeader>(
    header: &H,
    computed: u32,
    payload: &[u8],
) -> Result<(), Error> {
    if payload.len() != header.payload_bytes() as usize {
        return Err(Error::PayloadLengthMismatch {
            announced: header.payload_bytes(),
            actual: payload.len(),
        });
    }
    if computed != header.checksum() {
        return Err(Error::ChecksumMismatch {
            expected: header.checksum(),
            computed,
        });
    }
    payload::validate(payload, header.message_count())?;
    Ok(())
}

/// Rules shared by batch and delivery headers.
pub(crate) fn check_payload_fields(
    batch_seq: u64,
    message_count: u32,
    payload_bytes: u32,
    body_bytes: u32,
    header_bytes: usize,
    limits: &Limits,
) -> Result<(), Error> {
    if payload_bytes > limits.batch_bytes_max() {
        return Err(Error::BatchTooLarge {
            batch_seq,
            payload_bytes,
            max: limits.batch_bytes_max(),
        });
    }
    if u64::from(body_bytes) != header_bytes as u64 + u64::from(payload_bytes) {
        return Err(Error::BatchLengthMismatch {
            batch_seq,
            body_bytes,
            header_bytes,
            payload_bytes,
        });
    }
    if message_count == 0 {
        return Err(Error::EmptyBatch { batch_seq });
    }
    if message_count > payload_bytes / MESSAGE_PREFIX_BYTES as u32 {
        return Err(Error::TooManyMessages {
            batch_seq,
            message_count,
            payload_bytes,
        });
    }
    Ok(())
}

/// A view over a batch header (only the first [`BATCH_HEADER_BYTES`] are read).
#[derive(Debug, Clone, Copy)]
pub struct BatchHeader<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> BatchHeader<T> {
    /// Wraps a buffer without checks; accessors panic if it is shorter than
    /// [`BATCH_HEADER_BYTES`].
    pub fn new_unchecked(buffer: T) -> Self {
        BatchHeader { buffer }
    }

    /// Wraps a buffer of at least [`BATCH_HEADER_BYTES`].
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let header = Self::new_unchecked(buffer);
        header.check_len()?;
        Ok(header)
    }

    /// Checks that the buffer holds a whole batch header.
    pub fn check_len(&self) -> Result<(), Error> {
        let got = self.buffer.as_ref().len();
        if got < BATCH_HEADER_BYTES {
            return Err(Error::Truncated {
                what: "batch header",
                needed: BATCH_HEADER_BYTES,
                got,
            });
        }
        Ok(())
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The batch sequence.
    pub fn batch_seq(&self) -> u64 {
        u64_at(self.buffer.as_ref(), field::BATCH_SEQ)
    }

    /// Messages in the payload.
    pub fn message_count(&self) -> u32 {
        u32_at(self.buffer.as_ref(), field::MESSAGE_COUNT)
    }

    /// Length of the payload.
    pub fn payload_bytes(&self) -> u32 {
        u32_at(self.buffer.as_ref(), field::PAYLOAD_BYTES)
    }

    /// CRC-32C of the payload.
    pub fn checksum(&self) -> u32 {
        u32_at(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// The reserved bytes.
    pub fn reserved(&self) -> &[u8] {
        &self.buffer.as_ref()[field::RESERVED]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> BatchHeader<T> {
    /// Sets the batch sequence.
    pub fn set_batch_seq(&mut self, seq: u64) {
        set_u64(self.buffer.as_mut(), field::BATCH_SEQ, seq);
    }

    /// Sets the message count.
    pub fn set_message_count(&mut self, count: u32) {
        set_u32(self.buffer.as_mut(), field::MESSAGE_COUNT, count);
    }

    /// Sets the payload length.
    pub fn set_payload_bytes(&mut self, bytes: u32) {
        set_u32(self.buffer.as_mut(), field::PAYLOAD_BYTES, bytes);
    }

    /// Sets the checksum.
    pub fn set_checksum(&mut self, checksum: u32) {
        set_u32(self.buffer.as_mut(), field::CHECKSUM, checksum);
    }

    /// Zeroes the reserved bytes.
    pub fn clear_reserved(&mut self) {
        self.buffer.as_mut()[field::RESERVED].fill(0);
    }
}

/// A parsed batch header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BatchHeaderRepr {
    /// Per-session batch sequence.
    pub batch_seq: u64,
    /// Messages in the payload (at least 1).
    pub message_count: u32,
    /// Length of the payload.
    pub payload_bytes: u32,
    /// CRC-32C of the payload.
    pub checksum: u32,
}

impl BatchHeaderRepr {
    /// Describes a payload built by the caller: computes its length and checksum, and checks
    /// it against `limits.batch_bytes_max()` (the message count is the caller's word; the
    /// receiver verifies it).
    pub fn for_payload(
        batch_seq: u64,
        message_count: u32,
        payload: &[u8],
        limits: &Limits,
    ) -> Result<Self, Error> {
        let payload_bytes = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        if payload_bytes > limits.batch_bytes_max() {
            return Err(Error::BatchTooLarge {
                batch_seq,
                payload_bytes,
                max: limits.batch_bytes_max(),
            });
        }
        Ok(BatchHeaderRepr {
            batch_seq,
            message_count,
            payload_bytes,
            checksum: payload::checksum(payload),
        })
    }

    /// Parses a checked batch header of a frame whose body is `body_bytes` long.
    pub fn parse<T: AsRef<[u8]>>(
        header: &BatchHeader<T>,
        body_bytes: u32,
        limits: &Limits,
    ) -> Result<Self, Error> {
        let batch_seq = header.batch_seq();
        // Checked first, so that every other header error names a real batch.
        if batch_seq == u64::MAX {
            return Err(Error::BatchSeqReserved);
        }
        check_payload_fields(
            batch_seq,
            header.message_count(),
            header.payload_bytes(),
            body_bytes,
            BATCH_HEADER_BYTES,
            limits,
        )?;
        if let Some((offset, value)) = first_non_zero(header.buffer.as_ref(), field::RESERVED) {
            return Err(Error::BatchReservedNonZero {
                batch_seq,
                offset,
                value,
            });
        }
        Ok(BatchHeaderRepr {
            batch_seq,
            message_count: header.message_count(),
            payload_bytes: header.payload_bytes(),
            checksum: header.checksum(),
        })
    }

    /// Length of the batch header.
    pub const fn buffer_len(&self) -> usize {
        BATCH_HEADER_BYTES
    }

    /// The frame's `body_bytes`: batch header plus payload.
    pub fn frame_body_bytes(&self) -> u32 {
        self.payload_bytes.saturating_add(BATCH_HEADER_BYTES as u32)
    }

    /// Writes the batch header.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, header: &mut BatchHeader<T>) {
        header.set_batch_seq(self.batch_seq);
        header.set_message_count(self.message_count);
        header.set_payload_bytes(self.payload_bytes);
        header.set_checksum(self.checksum);
        header.clear_reserved();
    }

    /// Frame header and batch header, ready to be sent in front of the payload.
    pub fn frame_prefix(&self) -> [u8; BATCH_PREFIX_BYTES] {
        let mut prefix = [0u8; BATCH_PREFIX_BYTES];
        let (frame, batch) = prefix.split_at_mut(FRAME_HEADER_BYTES);
        FrameHeaderRepr {
            kind: FrameKind::Batch,
            body_bytes: self.frame_body_bytes(),
        }
        .emit(&mut FrameHeader::new_unchecked(frame));
        self.emit(&mut BatchHeader::new_unchecked(batch));
        prefix
    }
}

impl PayloadHeader for BatchHeaderRepr {
    fn message_count(&self) -> u32 {
        self.message_count
    }

    fn payload_bytes(&self) -> u32 {
        self.payload_bytes
    }

    fn checksum(&self) -> u32 {
        self.checksum
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use crate::payload::{PayloadError, push_message};

    fn payload(messages: &[&[u8]]) -> Vec<u8> {
        let mut payload = Vec::new();
        for message in messages {
            push_message(&mut payload, message);
        }
        payload
    }

    fn parse(
        repr: &BatchHeaderRepr,
        body_bytes: u32,
        limits: &Limits,
    ) -> Result<BatchHeaderRepr, Error> {
        let mut bytes = [0u8; BATCH_HEADER_BYTES];
        repr.emit(&mut BatchHeader::new_unchecked(&mut bytes[..]));
        BatchHeaderRepr::parse(&BatchHeader::new_checked(&bytes[..])?, body_bytes, limits)
    }

    #[test]
    fn round_trip_and_verify() {
        let limits = Limits::default();
        let payload = payload(&[b"hello", b"", b"world"]);
        let repr = BatchHeaderRepr::for_payload(7, 3, &payload, &limits).unwrap();
        assert_eq!(repr.payload_bytes as usize, payload.len());
        assert_eq!(parse(&repr, repr.frame_body_bytes(), &limits), Ok(repr));
        verify_payload(&repr, &payload).unwrap();

        let prefix = repr.frame_prefix();
        assert_eq!(&prefix[..4], &[3, 0, 0, 0]);
        assert_eq!(u32_at(&prefix, 4), 32 + payload.len() as u32);
        assert_eq!(u64_at(&prefix, 8), 7);
    }

    #[test]
    fn header_rules_carry_numbers() {
        let limits = Limits::default().with_batch_bytes_max(1024).unwrap();
        let mut repr = BatchHeaderRepr {
            batch_seq: 9,
            message_count: 1,
            payload_bytes: 2048,
            checksum: 0,
        };
        assert_eq!(
            parse(&repr, 32 + 2048, &limits).unwrap_err().to_string(),
            "batch 9: batch payload of 2048 bytes exceeds the limit of 1024"
        );
        let default = Limits::default();
        repr.payload_bytes = 70_000_000;
        let error = parse(&repr, 32 + 70_000_000, &default).unwrap_err();
        assert_eq!(
            error.to_string(),
            "batch 9: batch payload of 70000000 bytes exceeds the limit of 16777216"
        );
        assert_eq!(error.batch_seq(), Some(9));
        repr.payload_bytes = 8;
        assert_eq!(
            parse(&repr, 41, &limits),
            Err(Error::BatchLengthMismatch {
                batch_seq: 9,
                body_bytes: 41,
                header_bytes: 32,
                payload_bytes: 8
            })
        );
        repr.message_count = 0;
        assert_eq!(
            parse(&repr, 40, &limits),
            Err(Error::EmptyBatch { batch_seq: 9 })
        );
        repr.message_count = 3;
        assert_eq!(
            parse(&repr, 40, &limits).unwrap_err().to_string(),
            "batch 9: 3 messages cannot fit in 8 payload bytes (at most 2)"
        );
        repr.message_count = 2;
        let mut bytes = [0u8; BATCH_HEADER_BYTES];
        repr.emit(&mut BatchHeader::new_unchecked(&mut bytes[..]));
        bytes[25] = 1;
        assert_eq!(
            BatchHeaderRepr::parse(&BatchHeader::new_unchecked(&bytes[..]), 40, &limits),
            Err(Error::BatchReservedNonZero {
                batch_seq: 9,
                offset: 25,
                value: 1
            })
        );
    }

    #[test]
    fn batch_seq_max_is_refused_as_none() {
        // Found by fuzzing the broker's connection: a batch numbered u64::MAX (the wire's
        // "none") overflowed the broker's next-sequence bookkeeping.
        let limits = Limits::default();
        let good = payload(&[b"abc"]);
        let repr = BatchHeaderRepr::for_payload(u64::MAX, 1, &good, &limits).unwrap();
        let error = parse(&repr, repr.frame_body_bytes(), &limits).unwrap_err();
        assert_eq!(error, Error::BatchSeqReserved);
        assert_eq!(error.code(), ErrorCode::InvalidBatchHeader);
        assert_eq!(error.batch_seq(), None);
        let last = BatchHeaderRepr {
            batch_seq: u64::MAX - 1,
            ..repr
        };
        assert_eq!(parse(&last, last.frame_body_bytes(), &limits), Ok(last));
    }

    #[test]
    fn verify_reports_each_failure() {
        let limits = Limits::default();
        let good = payload(&[b"abc", b"de"]);
        let repr = BatchHeaderRepr::for_payload(1, 2, &good, &limits).unwrap();
        assert_eq!(
            verify_payload(&repr, &good[..good.len() - 1]),
            Err(Error::PayloadLengthMismatch {
                announced: 13,
                actual: 12
            })
        );
        let mut flipped = good.clone();
        flipped[5] ^= 1;
        assert!(matches!(
            verify_payload(&repr, &flipped),
            Err(Error::ChecksumMismatch { expected, .. }) if expected == repr.checksum
        ));
        let wrong_count = BatchHeaderRepr {
            message_count: 1,
            ..repr
        };
        assert_eq!(
            verify_payload(&wrong_count, &good),
            Err(Error::Payload(PayloadError::CountMismatch {
                announced: 1,
                found: 2
            }))
        );
        let too_big = vec![0u8; 2048];
        let small = Limits::default().with_batch_bytes_max(1024).unwrap();
        assert!(matches!(
            BatchHeaderRepr::for_payload(3, 1, &too_big, &small),
            Err(Error::BatchTooLarge {
                payload_bytes: 2048,
                max: 1024,
                ..
            })
        ));
    }
}
