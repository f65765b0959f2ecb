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
    crc32c::crc32c(payload)
}

/// The checksum of `a` followed by `more`, from `checksum(a)`.
pub fn checksum_append(checksum_so_far: u32, more: &[u8]) -> u32 {
    crc32c::crc32c_append(checksum_so_far, more)
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
    }
}
