//! The open batch: messages appended until the size limit or the linger time seals it.
//!
//! The buffer starts with room for the 40-byte frame prefix (frame header and batch header),
//! filled in when the batch is sealed, so a sealed batch goes to the socket in one write.

use std::time::Duration;

use units::Timestamp;
use wire::payload::MESSAGE_PREFIX_BYTES;
use wire::{BATCH_PREFIX_BYTES, BatchHeaderRepr};

/// A batch ready for the socket: frame prefix and payload in one buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SealedBatch {
    /// Session-wide batch sequence.
    pub seq: u64,
    /// Index of the connection slot it goes to.
    pub connection: usize,
    /// Frame header, batch header and payload.
    pub bytes: Vec<u8>,
    /// Messages in the batch.
    pub message_count: u32,
    /// Message bytes, without the 4-byte length prefixes.
    pub message_bytes: u64,
    /// Index (within this publisher's lifetime) of the batch's first message.
    pub first_message_index: u64,
}

/// The batch being filled.
#[derive(Debug)]
pub(crate) struct Batcher {
    buffer: Vec<u8>,
    message_count: u32,
    message_bytes: u64,
    opened_at: Option<Timestamp>,
    batch_bytes_max: usize,
    linger: Duration,
    messages_before: u64,
    spare: Vec<Vec<u8>>,
}

/// Spare buffers kept for reuse; more than the writers hand back at once is not needed.
const SPARE_BUFFERS_MAX: usize = 16;

impl Batcher {
    /// An empty batcher; `batch_bytes_max` bounds the payload, length prefixes included.
    pub fn new(batch_bytes_max: usize, linger: Duration) -> Self {
        Batcher {
            buffer: prefixed_buffer(Vec::new()),
            message_count: 0,
            message_bytes: 0,
            opened_at: None,
            batch_bytes_max,
            linger,
            messages_before: 0,
            spare: Vec::new(),
        }
    }

    /// The payload limit in force.
    pub fn batch_bytes_max(&self) -> usize {
        self.batch_bytes_max
    }

    /// Payload bytes in the open batch.
    pub fn payload_bytes(&self) -> usize {
        self.buffer.len() - BATCH_PREFIX_BYTES
    }

    /// Whether the open batch holds no message.
    pub fn is_empty(&self) -> bool {
        self.message_count == 0
    }

    /// Whether a message of this length can ever fit in a batch.
    pub fn fits_alone(&self, message_bytes: usize) -> bool {
        MESSAGE_PREFIX_BYTES + message_bytes <= self.batch_bytes_max
    }

    /// Whether a message of this length fits in the open batch.
    pub fn fits(&self, message_bytes: usize) -> bool {
        self.payload_bytes() + MESSAGE_PREFIX_BYTES + message_bytes <= self.batch_bytes_max
    }

    /// Appends a message; the caller checked [`fits`](Self::fits).
    pub fn push(&mut self, message: &[u8], now: Timestamp) {
        if self.opened_at.is_none() {
            self.opened_at = Some(now);
            self.buffer.reserve(
                self.batch_bytes_max
                    .min(MESSAGE_PREFIX_BYTES + message.len()),
            );
        }
        // fits() bounds every message by batch_bytes_max <= 64 MiB, so the length fits a u32.
        self.buffer
            .extend_from_slice(&(message.len() as u32).to_le_bytes());
        self.buffer.extend_from_slice(message);
        self.message_count += 1;
        self.message_bytes += message.len() as u64;
    }

    /// When the open batch must be sealed by linger, if it holds anything.
    pub fn deadline(&self) -> Option<Timestamp> {
        self.opened_at.map(|opened| opened + self.linger)
    }

    /// Whether the open batch has waited its linger time.
    pub fn linger_expired(&self, now: Timestamp) -> bool {
        self.deadline().is_some_and(|deadline| now >= deadline)
    }

    /// Seals the open batch with this sequence for this connection; `None` when empty.
    pub fn seal(&mut self, seq: u64, connection: usize) -> Option<SealedBatch> {
        if self.is_empty() {
            return None;
        }
        let fresh = prefixed_buffer(self.spare.pop().unwrap_or_default());
        let mut bytes = std::mem::replace(&mut self.buffer, fresh);
        let payload = &bytes[BATCH_PREFIX_BYTES..];
        let header = BatchHeaderRepr {
            batch_seq: seq,
            message_count: self.message_count,
            // push() keeps the payload within batch_bytes_max (at most 64 MiB).
            payload_bytes: payload.len() as u32,
            checksum: wire::payload::checksum(payload),
        };
        bytes[..BATCH_PREFIX_BYTES].copy_from_slice(&header.frame_prefix());
        let sealed = SealedBatch {
            seq,
            connection,
            bytes,
            message_count: self.message_count,
            message_bytes: self.message_bytes,
            first_message_index: self.messages_before,
        };
        self.messages_before += u64::from(self.message_count);
        self.message_count = 0;
        self.message_bytes = 0;
        self.opened_at = None;
        Some(sealed)
    }

    /// Takes back a written batch's buffer for a later batch.
    pub fn recycle(&mut self, buffer: Vec<u8>) {
        if self.spare.len() < SPARE_BUFFERS_MAX {
            self.spare.push(buffer);
        }
    }
}

fn prefixed_buffer(mut buffer: Vec<u8>) -> Vec<u8> {
    buffer.clear();
    buffer.resize(BATCH_PREFIX_BYTES, 0);
    buffer
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::{Decoded, FrameDecoder, Limits, verify_payload};

    fn payload(batch: &SealedBatch) -> &[u8] {
        &batch.bytes[BATCH_PREFIX_BYTES..]
    }

    fn decode(batch: &SealedBatch) -> BatchHeaderRepr {
        let mut decoder = FrameDecoder::new(Limits::default());
        match decoder.decode(&batch.bytes).unwrap() {
            (BATCH_PREFIX_BYTES, Decoded::Batch(header)) => header,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn sealed_batch_is_a_valid_frame() {
        let now = Timestamp::ZERO;
        let mut batcher = Batcher::new(1024, Duration::from_micros(500));
        assert!(batcher.seal(0, 0).is_none());
        batcher.push(b"hello", now);
        batcher.push(b"", now);
        batcher.push(b"world!", now);
        let batch = batcher.seal(7, 2).unwrap();
        assert_eq!((batch.seq, batch.connection), (7, 2));
        assert_eq!((batch.message_count, batch.message_bytes), (3, 11));
        let header = decode(&batch);
        assert_eq!(header.batch_seq, 7);
        assert_eq!(header.message_count, 3);
        verify_payload(&header, payload(&batch)).unwrap();
        let messages: Vec<&[u8]> = wire::payload::messages(payload(&batch))
            .map(Result::unwrap)
            .collect();
        assert_eq!(messages, [&b"hello"[..], b"", b"world!"]);
        assert!(batcher.is_empty());
        assert_eq!(batcher.payload_bytes(), 0);
    }

    #[test]
    fn size_limit_counts_length_prefixes() {
        let now = Timestamp::ZERO;
        let mut batcher = Batcher::new(20, Duration::from_secs(1));
        assert!(batcher.fits_alone(16));
        assert!(!batcher.fits_alone(17));
        assert!(batcher.fits(6));
        batcher.push(&[1; 6], now);
        assert_eq!(batcher.payload_bytes(), 10);
        assert!(batcher.fits(6));
        assert!(!batcher.fits(7));
        batcher.push(&[2; 6], now);
        assert!(!batcher.fits(0));
    }

    #[test]
    fn linger_runs_from_the_first_message() {
        let start = Timestamp::ZERO;
        let linger = Duration::from_micros(500);
        let mut batcher = Batcher::new(1024, linger);
        assert_eq!(batcher.deadline(), None);
        assert!(!batcher.linger_expired(start + Duration::from_secs(10)));
        batcher.push(b"a", start);
        batcher.push(b"b", start + Duration::from_micros(400));
        assert_eq!(batcher.deadline(), Some(start + linger));
        assert!(!batcher.linger_expired(start + Duration::from_micros(499)));
        assert!(batcher.linger_expired(start + linger));
        batcher.seal(0, 0).unwrap();
        assert_eq!(batcher.deadline(), None);
    }

    #[test]
    fn message_indices_continue_across_batches_and_buffers_are_reused() {
        let now = Timestamp::ZERO;
        let mut batcher = Batcher::new(1024, Duration::ZERO);
        batcher.push(b"a", now);
        batcher.push(b"b", now);
        let first = batcher.seal(0, 0).unwrap();
        batcher.recycle(first.bytes);
        batcher.push(b"c", now);
        let second = batcher.seal(1, 1).unwrap();
        assert_eq!(second.first_message_index, 2);
        verify_payload(&decode(&second), payload(&second)).unwrap();
    }
}
