//! The batch payload: the bytes that follow a batch header on the wire and that the broker
//! stores verbatim in its payload log.
//!
//! ```text
//! payload  = message*
//! message  = length:u32 (little endian) | bytes[length]
//! ```
//!
//! A payload is valid when its messages tile it exactly and their number matches the count
//! announced in the batch header. Validation never panics and never reads out of bounds.

use crc_fast::{CrcAlgorithm, Digest};

/// Bytes of the length prefix in front of each message.
pub const MESSAGE_PREFIX_BYTES: usize = 4;

/// Why a payload does not hold the messages its header announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// A message's length prefix was cut off by the end of the payload.
    #[error("message {index}: length prefix cut off at payload byte {offset}")]
    TruncatedPrefix {
        /// Index of the message whose prefix is incomplete.
        index: u32,
        /// Offset of that prefix in the payload.
        offset: usize,
    },
    /// A message claims more bytes than remain in the payload.
    #[error("message {index}: length {length} overruns the payload ({remaining} bytes remain)")]
    MessageOverrun {
        /// Index of the message.
        index: u32,
        /// Length from its prefix.
        length: u32,
        /// Bytes left after the prefix.
        remaining: usize,
    },
    /// The payload holds a different number of messages than announced.
    #[error("payload holds {found} messages but the header announced {announced}")]
    CountMismatch {
        /// Count from the batch header.
        announced: u32,
        /// Messages found (counted up to `announced + 1` at most).
        found: u32,
    },
}

/// Checks that `payload` holds exactly `message_count` length-prefixed messages.
pub fn validate(payload: &[u8], message_count: u32) -> Result<(), PayloadError> {
    let mut found = 0u32;
    for message in messages(payload) {
        message?;
        found += 1;
        if found > message_count {
            return Err(PayloadError::CountMismatch {
                announced: message_count,
                found,
            });
        }
    }
    if found != message_count {
        return Err(PayloadError::CountMismatch {
            announced: message_count,
            found,
        });
    }
    Ok(())
}

/// Iterates over the messages of a payload; yields an error (once) at the first malformed one.
pub fn messages(payload: &[u8]) -> Messages<'_> {
    Messages {
        rest: payload,
        offset: 0,
        index: 0,
        failed: false,
    }
}

/// Iterator over the messages of a payload, see [`messages`].
#[derive(Debug, Clone)]
pub struct Messages<'a> {
    rest: &'a [u8],
    offset: usize,
    index: u32,
    failed: bool,
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<&'a [u8], PayloadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        let Some((prefix, after)) = self.rest.split_first_chunk::<MESSAGE_PREFIX_BYTES>() else {
            self.failed = true;
            return Some(Err(PayloadError::TruncatedPrefix {
                index: self.index,
                offset: self.offset,
            }));
        };
        let length = u32::from_le_bytes(*prefix);
        let Some((message, rest)) = after.split_at_checked(length as usize) else {
            self.failed = true;
            return Some(Err(PayloadError::MessageOverrun {
                index: self.index,
                length,
                remaining: after.len(),
            }));
        };
        self.rest = rest;
        self.offset += MESSAGE_PREFIX_BYTES + message.len();
        self.index += 1;
        Some(Ok(message))
    }
}

/// Bytes a payload needs for messages of these lengths.
pub fn encoded_len<I: IntoIterator<Item = usize>>(message_lengths: I) -> usize {
    message_lengths
        .into_iter()
        .map(|length| MESSAGE_PREFIX_BYTES + length)
        .sum()
}

/// Appends one message to a payload being built.
///
/// # Panics
/// When the message is longer than `u32::MAX` bytes, which no batch limit allows.
pub fn push_message(payload: &mut Vec<u8>, message: &[u8]) {
    let length = u32::try_from(message.len()).expect("message longer than u32::MAX bytes");
    payload.extend_from_slice(&length.to_le_bytes());
    payload.extend_from_slice(message);
}

/// CRC-32C (Castagnoli) of a payload, the checksum carried in batch headers.
pub fn checksum(payload: &[u8]) -> u32 {
    // A 32-bit CRC in crc-fast's 64-bit result: the upper half is zero.
    crc_fast::checksum(CrcAlgorithm::Crc32Iscsi, payload) as u32
}

/// The checksum of `a` followed by `more`, from `checksum(a)`.
pub fn checksum_append(checksum_so_far: u32, more: &[u8]) -> u32 {
    // The running state is the checksum before its final inversion.
    let mut digest =
        Digest::new_with_init_state(CrcAlgorithm::Crc32Iscsi, u64::from(!checksum_so_far));
    digest.update(more);
    digest.finalize() as u32
}

/// The checksum of `a` followed by `b`, from `checksum(a)`, `checksum(b)` and the length of
/// `b`, without reading either.
pub fn checksum_combine(checksum_a: u32, checksum_b: u32, b_bytes: usize) -> u32 {
    crc_fast::checksum_combine(
        CrcAlgorithm::Crc32Iscsi,
        checksum_a.into(),
        checksum_b.into(),
        b_bytes as u64,
    ) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(messages: &[&[u8]]) -> Vec<u8> {
        let mut payload = Vec::new();
        for message in messages {
            push_message(&mut payload, message);
        }
        payload
    }

    #[test]
    fn round_trip() {
        let payload = build(&[b"a", b"", b"hello"]);
        assert_eq!(payload.len(), encoded_len([1, 0, 5]));
        validate(&payload, 3).unwrap();
        let got: Vec<&[u8]> = messages(&payload).map(Result::unwrap).collect();
        assert_eq!(got, vec![&b"a"[..], b"", b"hello"]);
    }

    #[test]
    fn empty_payload_holds_zero_messages() {
        validate(&[], 0).unwrap();
        assert_eq!(
            validate(&[], 1),
            Err(PayloadError::CountMismatch {
                announced: 1,
                found: 0
            })
        );
    }

    #[test]
    fn count_mismatch_is_reported() {
        let payload = build(&[b"x", b"y"]);
        assert_eq!(
            validate(&payload, 1),
            Err(PayloadError::CountMismatch {
                announced: 1,
                found: 2
            })
        );
    }

    #[test]
    fn truncated_prefix_and_overrun_are_reported() {
        let mut payload = build(&[b"abc"]);
        payload.extend_from_slice(&[1, 0]);
        assert_eq!(
            validate(&payload, 2),
            Err(PayloadError::TruncatedPrefix {
                index: 1,
                offset: 7
            })
        );
        let overrun = [9u8, 0, 0, 0, b'a'];
        assert_eq!(
            validate(&overrun, 1),
            Err(PayloadError::MessageOverrun {
                index: 0,
                length: 9,
                remaining: 1
            })
        );
    }

    #[test]
    fn huge_length_prefix_does_not_panic() {
        let payload = [0xff, 0xff, 0xff, 0xff];
        assert!(validate(&payload, 1).is_err());
    }

    #[test]
    fn checksum_is_crc32c() {
        // The standard CRC-32C check value.
        assert_eq!(checksum(b"123456789"), 0xe306_9283);
        assert_eq!(checksum(b""), 0);
    }

    /// CRC-32C one bit at a time, from its definition (reflected polynomial 0x82f63b78,
    /// initial value and final inversion all ones).
    fn crc32c_bitwise(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in bytes {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0x82f6_3b78
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    proptest::proptest! {
        // Lengths across the folding code's block sizes (16, 64, 256 bytes and more) and
        // splits anywhere in them.
        #[test]
        fn checksum_append_and_combine_agree_with_the_definition(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..5000),
            split in 0usize..5000,
        ) {
            let split = split.min(bytes.len());
            let (a, b) = bytes.split_at(split);
            let whole = crc32c_bitwise(&bytes);
            proptest::prop_assert_eq!(checksum(&bytes), whole);
            proptest::prop_assert_eq!(checksum_append(checksum(a), b), whole);
            proptest::prop_assert_eq!(checksum_combine(checksum(a), checksum(b), b.len()), whole);
        }
    }
}
