//! The Delivery frame (broker to subscriber): a fixed 48-byte [`DeliveryHeader`] followed by
//! `payload_bytes` of [`payload`](crate::payload), one batch (or a contiguous slice of one
//! batch's messages) in global order.
//!
//! ```text
//! offset size field
//!      0    8 global_start   position of the first message; u64::MAX = none (order 0)
//!      8    4 message_count  1..=payload_bytes/4
//!     12    4 payload_bytes  <= the subscriber's batch_bytes_max; body_bytes = 48 + payload_bytes
//!     16    4 checksum       CRC-32C of the payload
//!     20    2 broker_id      broker that received the batch
//!     22    2 reserved       0
//!     24    8 client_id      publisher of the batch
//!     32    8 batch_seq      publisher's batch sequence
//!     40    4 session_epoch  publisher's session epoch
//!     44    4 reserved       0
//!     48    n payload
//! ```

use crate::batch::{PayloadHeader, check_payload_fields};
use crate::bytes::{
    decode_optional, encode_optional, first_non_zero, set_u16, set_u32, set_u64, u16_at, u32_at,
    u64_at,
};
use crate::error::Error;
use crate::frame::{FRAME_HEADER_BYTES, FrameHeader, FrameHeaderRepr, FrameKind};
use crate::limits::Limits;

/// Size of the delivery header.
pub const DELIVERY_HEADER_BYTES: usize = 48;
/// Size of everything before a delivery payload: frame header and delivery header.
pub const DELIVERY_PREFIX_BYTES: usize = FRAME_HEADER_BYTES + DELIVERY_HEADER_BYTES;

mod field {
    pub const GLOBAL_START: usize = 0;
    pub const MESSAGE_COUNT: usize = 8;
    pub const PAYLOAD_BYTES: usize = 12;
    pub const CHECKSUM: usize = 16;
    pub const BROKER_ID: usize = 20;
    pub const RESERVED_A: core::ops::Range<usize> = 22..24;
    pub const CLIENT_ID: usize = 24;
    pub const BATCH_SEQ: usize = 32;
    pub const SESSION_EPOCH: usize = 40;
    pub const RESERVED_B: core::ops::Range<usize> = 44..48;
}

/// Checks that `count` messages from `global_start` fit in `u64` positions (the exclusive end
/// may be `u64::MAX`; no message sits at `u64::MAX`, the "none" value).
pub(crate) fn check_position_range(global_start: Option<u64>, count: u32) -> Result<(), Error> {
    match global_start {
        Some(start) if start.checked_add(count.into()).is_none() => Err(Error::PositionOverflow {
            global_start: start,
            message_count: count,
        }),
        _ => Ok(()),
    }
}

/// A view over a delivery header (only the first [`DELIVERY_HEADER_BYTES`] are read).
#[derive(Debug, Clone, Copy)]
pub struct DeliveryHeader<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> DeliveryHeader<T> {
    /// Wraps a buffer without checks; accessors panic if it is shorter than
    /// [`DELIVERY_HEADER_BYTES`].
    pub fn new_unchecked(buffer: T) -> Self {
        DeliveryHeader { buffer }
    }

    /// Wraps a buffer of at least [`DELIVERY_HEADER_BYTES`].
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let header = Self::new_unchecked(buffer);
        header.check_len()?;
        Ok(header)
    }

    /// Checks that the buffer holds a whole delivery header.
    pub fn check_len(&self) -> Result<(), Error> {
        let got = self.buffer.as_ref().len();
        if got < DELIVERY_HEADER_BYTES {
            return Err(Error::Truncated {
                what: "delivery header",
                needed: DELIVERY_HEADER_BYTES,
                got,
            });
        }
        Ok(())
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The raw global start (`u64::MAX` = none).
    pub fn global_start(&self) -> u64 {
        u64_at(self.buffer.as_ref(), field::GLOBAL_START)
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

    /// Broker that received the batch.
    pub fn broker_id(&self) -> u16 {
        u16_at(self.buffer.as_ref(), field::BROKER_ID)
    }

    /// Publisher of the batch.
    pub fn client_id(&self) -> u64 {
        u64_at(self.buffer.as_ref(), field::CLIENT_ID)
    }

    /// Publisher's batch sequence.
    pub fn batch_seq(&self) -> u64 {
        u64_at(self.buffer.as_ref(), field::BATCH_SEQ)
    }

    /// Publisher's session epoch.
    pub fn session_epoch(&self) -> u32 {
        u32_at(self.buffer.as_ref(), field::SESSION_EPOCH)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> DeliveryHeader<T> {
    /// Sets the raw global start.
    pub fn set_global_start(&mut self, position: u64) {
        set_u64(self.buffer.as_mut(), field::GLOBAL_START, position);
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

    /// Sets the broker id.
    pub fn set_broker_id(&mut self, broker_id: u16) {
        set_u16(self.buffer.as_mut(), field::BROKER_ID, broker_id);
    }

    /// Sets the client id.
    pub fn set_client_id(&mut self, client_id: u64) {
        set_u64(self.buffer.as_mut(), field::CLIENT_ID, client_id);
    }

    /// Sets the batch sequence.
    pub fn set_batch_seq(&mut self, seq: u64) {
        set_u64(self.buffer.as_mut(), field::BATCH_SEQ, seq);
    }

    /// Sets the session epoch.
    pub fn set_session_epoch(&mut self, epoch: u32) {
        set_u32(self.buffer.as_mut(), field::SESSION_EPOCH, epoch);
    }

    /// Zeroes the reserved bytes.
    pub fn clear_reserved(&mut self) {
        let buffer = self.buffer.as_mut();
        buffer[field::RESERVED_A].fill(0);
        buffer[field::RESERVED_B].fill(0);
    }
}

/// A parsed delivery header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeliveryHeaderRepr {
    /// Global position of the first message; `None` for order 0 topics. `Some(u64::MAX)` is
    /// not representable (it encodes `None`).
    pub global_start: Option<u64>,
    /// Messages in the payload (at least 1).
    pub message_count: u32,
    /// Length of the payload.
    pub payload_bytes: u32,
    /// CRC-32C of the payload.
    pub checksum: u32,
    /// Broker that received the batch.
    pub broker_id: u16,
    /// Publisher of the batch.
    pub client_id: u64,
    /// Publisher's session epoch.
    pub session_epoch: u32,
    /// Publisher's batch sequence.
    pub batch_seq: u64,
}

impl DeliveryHeaderRepr {
    /// Parses a checked delivery header of a frame whose body is `body_bytes` long; the
    /// payload limit is `limits.batch_bytes_max()`.
    pub fn parse<T: AsRef<[u8]>>(
        header: &DeliveryHeader<T>,
        body_bytes: u32,
        limits: &Limits,
    ) -> Result<Self, Error> {
        let batch_seq = header.batch_seq();
        let (message_count, payload_bytes) = (header.message_count(), header.payload_bytes());
        check_payload_fields(
            batch_seq,
            message_count,
            payload_bytes,
            body_bytes,
            DELIVERY_HEADER_BYTES,
            limits,
        )?;
        let buffer = header.buffer.as_ref();
        if let Some((offset, value)) = first_non_zero(buffer, field::RESERVED_A)
            .or_else(|| first_non_zero(buffer, field::RESERVED_B))
        {
            return Err(Error::BatchReservedNonZero {
                batch_seq,
                offset,
                value,
            });
        }
        let global_start = decode_optional(header.global_start());
        check_position_range(global_start, message_count)?;
        Ok(DeliveryHeaderRepr {
            global_start,
            message_count,
            payload_bytes,
            checksum: header.checksum(),
            broker_id: header.broker_id(),
            client_id: header.client_id(),
            session_epoch: header.session_epoch(),
            batch_seq,
        })
    }

    /// Length of the delivery header.
    pub const fn buffer_len(&self) -> usize {
        DELIVERY_HEADER_BYTES
    }

    /// The frame's `body_bytes`: delivery header plus payload.
    pub fn frame_body_bytes(&self) -> u32 {
        self.payload_bytes
            .saturating_add(DELIVERY_HEADER_BYTES as u32)
    }

    /// Writes the delivery header.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, header: &mut DeliveryHeader<T>) {
        header.set_global_start(encode_optional(self.global_start));
        header.set_message_count(self.message_count);
        header.set_payload_bytes(self.payload_bytes);
        header.set_checksum(self.checksum);
        header.set_broker_id(self.broker_id);
        header.set_client_id(self.client_id);
        header.set_batch_seq(self.batch_seq);
        header.set_session_epoch(self.session_epoch);
        header.clear_reserved();
    }

    /// Frame header and delivery header, ready to be sent in front of the payload.
    pub fn frame_prefix(&self) -> [u8; DELIVERY_PREFIX_BYTES] {
        let mut prefix = [0u8; DELIVERY_PREFIX_BYTES];
        let (frame, delivery) = prefix.split_at_mut(FRAME_HEADER_BYTES);
        FrameHeaderRepr {
            kind: FrameKind::Delivery,
            body_bytes: self.frame_body_bytes(),
        }
        .emit(&mut FrameHeader::new_unchecked(frame));
        self.emit(&mut DeliveryHeader::new_unchecked(delivery));
        prefix
    }
}

impl PayloadHeader for DeliveryHeaderRepr {
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
    use crate::batch::verify_payload;
    use crate::payload::{checksum, push_message};

    #[test]
    fn round_trip_and_rules() {
        let limits = Limits::default();
        let mut payload = Vec::new();
        push_message(&mut payload, b"m1");
        push_message(&mut payload, b"m2");
        let repr = DeliveryHeaderRepr {
            global_start: Some(100),
            message_count: 2,
            payload_bytes: payload.len() as u32,
            checksum: checksum(&payload),
            broker_id: 3,
            client_id: 42,
            session_epoch: 5,
            batch_seq: 17,
        };
        let prefix = repr.frame_prefix();
        assert_eq!(prefix[0], FrameKind::Delivery as u8);
        let header = DeliveryHeader::new_checked(&prefix[FRAME_HEADER_BYTES..]).unwrap();
        assert_eq!(
            DeliveryHeaderRepr::parse(&header, repr.frame_body_bytes(), &limits),
            Ok(repr)
        );
        verify_payload(&repr, &payload).unwrap();

        let none = DeliveryHeaderRepr {
            global_start: None,
            ..repr
        };
        let prefix = none.frame_prefix();
        let header = DeliveryHeader::new_checked(&prefix[FRAME_HEADER_BYTES..]).unwrap();
        assert_eq!(header.global_start(), u64::MAX);
        assert_eq!(
            DeliveryHeaderRepr::parse(&header, none.frame_body_bytes(), &limits),
            Ok(none)
        );

        let overflowing = DeliveryHeaderRepr {
            global_start: Some(u64::MAX - 1),
            ..repr
        };
        let prefix = overflowing.frame_prefix();
        let header = DeliveryHeader::new_checked(&prefix[FRAME_HEADER_BYTES..]).unwrap();
        assert_eq!(
            DeliveryHeaderRepr::parse(&header, overflowing.frame_body_bytes(), &limits),
            Err(Error::PositionOverflow {
                global_start: u64::MAX - 1,
                message_count: 2
            })
        );

        let mut bytes = repr.frame_prefix();
        bytes[FRAME_HEADER_BYTES + 45] = 7;
        let header = DeliveryHeader::new_checked(&bytes[FRAME_HEADER_BYTES..]).unwrap();
        assert_eq!(
            DeliveryHeaderRepr::parse(&header, repr.frame_body_bytes(), &limits),
            Err(Error::BatchReservedNonZero {
                batch_seq: 17,
                offset: 45,
                value: 7
            })
        );
    }
}
