//! The Error frame (broker to client).
//!
//! ```text
//! offset size field
//!      0    2 code        ErrorCode
//!      2    2 reason_len  0..=1024
//!      4    4 reserved    0
//!      8    8 batch_seq   the batch concerned; u64::MAX = not about a batch
//!     16    n reason      UTF-8, human-readable
//! ```

use crate::bytes::{
    decode_optional, encode_optional, put, set_u16, set_u32, set_u64, u16_at, u32_at, u64_at,
};
use crate::error::{Error, ErrorCode};
use crate::hello::check_exact;
use crate::limits::{Limits, REASON_BYTES_MAX};

/// Size of the fixed part of an Error body.
pub const ERROR_FIXED_BYTES: usize = 16;

mod field {
    pub const CODE: usize = 0;
    pub const REASON_LEN: usize = 2;
    pub const RESERVED: usize = 4;
    pub const BATCH_SEQ: usize = 8;
    pub const REASON: usize = 16;
}

/// A view over an Error body.
#[derive(Debug, Clone, Copy)]
pub struct ErrorFrame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> ErrorFrame<T> {
    /// Wraps a buffer without checks; accessors panic if it is too short.
    pub fn new_unchecked(buffer: T) -> Self {
        ErrorFrame { buffer }
    }

    /// Wraps a body after [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let frame = Self::new_unchecked(buffer);
        frame.check_len()?;
        Ok(frame)
    }

    /// Checks that the body is exactly the fixed part plus `reason_len` bytes.
    pub fn check_len(&self) -> Result<(), Error> {
        let body = self.buffer.as_ref();
        check_exact(body.len(), ERROR_FIXED_BYTES, "error body", || {
            usize::from(self.reason_len())
        })
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The raw error code.
    pub fn code(&self) -> u16 {
        u16_at(self.buffer.as_ref(), field::CODE)
    }

    /// Length of the reason.
    pub fn reason_len(&self) -> u16 {
        u16_at(self.buffer.as_ref(), field::REASON_LEN)
    }

    /// The reserved field.
    pub fn reserved(&self) -> u32 {
        u32_at(self.buffer.as_ref(), field::RESERVED)
    }

    /// The raw batch sequence (`u64::MAX` = none).
    pub fn batch_seq(&self) -> u64 {
        u64_at(self.buffer.as_ref(), field::BATCH_SEQ)
    }

    /// The raw reason bytes.
    pub fn reason(&self) -> &[u8] {
        let len = usize::from(self.reason_len());
        &self.buffer.as_ref()[field::REASON..field::REASON + len]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> ErrorFrame<T> {
    /// Sets the error code.
    pub fn set_code(&mut self, code: u16) {
        set_u16(self.buffer.as_mut(), field::CODE, code);
    }

    /// Sets the reserved field.
    pub fn set_reserved(&mut self, reserved: u32) {
        set_u32(self.buffer.as_mut(), field::RESERVED, reserved);
    }

    /// Sets the raw batch sequence.
    pub fn set_batch_seq(&mut self, seq: u64) {
        set_u64(self.buffer.as_mut(), field::BATCH_SEQ, seq);
    }

    /// Sets `reason_len` and the reason bytes (at most `u16::MAX` of them are written; the
    /// repr bounds reasons to [`REASON_BYTES_MAX`]).
    pub fn set_reason(&mut self, reason: &str) {
        let len = u16::try_from(reason.len()).unwrap_or(u16::MAX);
        let buffer = self.buffer.as_mut();
        set_u16(buffer, field::REASON_LEN, len);
        put(
            buffer,
            field::REASON,
            &reason.as_bytes()[..usize::from(len)],
        );
    }
}

/// A parsed Error frame.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ErrorFrameRepr {
    /// What went wrong.
    pub code: ErrorCode,
    /// The batch concerned, if any. `Some(u64::MAX)` is not representable (it encodes `None`).
    pub batch_seq: Option<u64>,
    reason: String,
}

impl ErrorFrameRepr {
    /// Builds an Error frame; a reason longer than [`REASON_BYTES_MAX`] is cut at the last
    /// character boundary that fits.
    pub fn new(code: ErrorCode, batch_seq: Option<u64>, reason: &str) -> Self {
        let mut end = reason.len().min(REASON_BYTES_MAX);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        ErrorFrameRepr {
            code,
            batch_seq,
            reason: reason[..end].to_owned(),
        }
    }

    /// The Error frame a broker sends for a protocol error it detected.
    pub fn from_error(error: &Error) -> Self {
        Self::new(error.code(), error.batch_seq(), &error.to_string())
    }

    /// Parses a checked Error view; the reason must be valid UTF-8 within
    /// `limits.reason_bytes_max()`.
    pub fn parse<T: AsRef<[u8]>>(frame: &ErrorFrame<T>, limits: &Limits) -> Result<Self, Error> {
        let code = ErrorCode::try_from(frame.code())?;
        if frame.reserved() != 0 {
            return Err(Error::NonZeroReserved {
                field: "error reserved",
                value: frame.reserved().into(),
            });
        }
        let reason = frame.reason();
        if reason.len() > limits.reason_bytes_max() {
            return Err(Error::ReasonTooLong {
                len: reason.len(),
                max: limits.reason_bytes_max(),
            });
        }
        let reason = core::str::from_utf8(reason).map_err(|error| Error::ReasonNotUtf8 {
            valid_up_to: error.valid_up_to(),
        })?;
        Ok(ErrorFrameRepr {
            code,
            batch_seq: decode_optional(frame.batch_seq()),
            reason: reason.to_owned(),
        })
    }

    /// The human-readable reason.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// Length of the body.
    pub fn buffer_len(&self) -> usize {
        ERROR_FIXED_BYTES + self.reason.len()
    }

    /// Writes the body; the view must span [`buffer_len`](Self::buffer_len) bytes.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, frame: &mut ErrorFrame<T>) {
        frame.set_code(self.code.as_u16());
        frame.set_reserved(0);
        frame.set_batch_seq(encode_optional(self.batch_seq));
        frame.set_reason(&self.reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(repr: &ErrorFrameRepr) -> Vec<u8> {
        let mut bytes = vec![0u8; repr.buffer_len()];
        repr.emit(&mut ErrorFrame::new_unchecked(&mut bytes[..]));
        bytes
    }

    #[test]
    fn round_trip_and_truncation() {
        let limits = Limits::default();
        let repr = ErrorFrameRepr::new(ErrorCode::ChecksumMismatch, Some(12), "bad crc");
        let parsed = ErrorFrameRepr::parse(
            &ErrorFrame::new_checked(&bytes(&repr)[..]).unwrap(),
            &limits,
        );
        assert_eq!(parsed, Ok(repr));

        let long = "é".repeat(600);
        let cut = ErrorFrameRepr::new(ErrorCode::Internal, None, &long);
        assert_eq!(cut.reason().len(), 1024);
        let parsed =
            ErrorFrameRepr::parse(&ErrorFrame::new_checked(&bytes(&cut)[..]).unwrap(), &limits);
        assert_eq!(parsed, Ok(cut));
    }

    #[test]
    fn from_error_keeps_code_and_batch() {
        let error = Error::BatchTooLarge {
            batch_seq: 4,
            payload_bytes: 70_000_000,
            max: 67_108_864,
        };
        let repr = ErrorFrameRepr::from_error(&error);
        assert_eq!(repr.code, ErrorCode::BatchTooLarge);
        assert_eq!(repr.batch_seq, Some(4));
        assert_eq!(
            repr.reason(),
            "batch 4: batch payload of 70000000 bytes exceeds the limit of 67108864"
        );
    }

    #[test]
    fn wire_rules() {
        let limits = Limits::default();
        let mut bad_utf8 = bytes(&ErrorFrameRepr::new(ErrorCode::Malformed, None, "ab"));
        bad_utf8[17] = 0xff;
        assert_eq!(
            ErrorFrameRepr::parse(&ErrorFrame::new_checked(&bad_utf8[..]).unwrap(), &limits),
            Err(Error::ReasonNotUtf8 { valid_up_to: 1 })
        );
        let mut unknown = bytes(&ErrorFrameRepr::new(ErrorCode::Malformed, None, ""));
        unknown[0] = 0;
        assert_eq!(
            ErrorFrameRepr::parse(&ErrorFrame::new_checked(&unknown[..]).unwrap(), &limits),
            Err(Error::UnknownErrorCode(0))
        );
        let mut long = vec![0u8; 16 + 1025];
        long[0] = 1;
        long[2..4].copy_from_slice(&1025u16.to_le_bytes());
        long[16..].fill(b'x');
        assert_eq!(
            ErrorFrameRepr::parse(&ErrorFrame::new_checked(&long[..]).unwrap(), &limits),
            Err(Error::ReasonTooLong {
                len: 1025,
                max: 1024
            })
        );
    }
}
