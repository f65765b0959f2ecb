//! The 8-byte frame header that starts every frame, and [`Frame`], the owned form of every
//! control frame (all kinds but Batch and Delivery).
//!
//! ```text
//! offset size field
//!      0    1 kind        FrameKind
//!      1    1 flags       must be 0 in version 1
//!      2    2 reserved    must be 0
//!      4    4 body_bytes  length of the body that follows
//! ```

use core::fmt;

use crate::ack::{Ack, AckRepr};
use crate::batch::BATCH_HEADER_BYTES;
use crate::bytes::{set_u16, set_u32, u16_at, u32_at};
use crate::delivery::DELIVERY_HEADER_BYTES;
use crate::error::Error;
use crate::error_frame::{ErrorFrame, ErrorFrameRepr};
use crate::hello::{Hello, HelloOk, HelloOkRepr, HelloRepr};
use crate::limits::Limits;
use crate::redirect::{Redirect, RedirectRepr};
use crate::topic::{CreateTopic, CreateTopicRepr, TopicOk, TopicOkRepr};

/// Size of the frame header.
pub const FRAME_HEADER_BYTES: usize = 8;

mod field {
    pub const KIND: usize = 0;
    pub const FLAGS: usize = 1;
    pub const RESERVED: usize = 2;
    pub const BODY_BYTES: usize = 4;
}

/// The kind byte of a frame.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// Client to broker, first frame of a publish or subscribe connection.
    Hello = 1,
    /// Broker to client, accepts a Hello.
    HelloOk = 2,
    /// Publisher to broker: a batch header followed by its payload.
    Batch = 3,
    /// Broker to publisher: cumulative acknowledgement.
    Ack = 4,
    /// Broker to client: a refused frame or a failure.
    Error = 5,
    /// Broker to subscriber: a delivery header followed by its payload.
    Delivery = 6,
    /// Admin client to broker: create a topic (first frame of an admin connection).
    CreateTopic = 7,
    /// Broker to admin client: the topic exists with these settings.
    TopicOk = 8,
    /// Either side: clean close, empty body.
    Goodbye = 9,
    /// Broker to subscriber, in place of HelloOk: other brokers keep the position asked for.
    Redirect = 10,
}

impl FrameKind {
    /// Every kind, in numeric order.
    pub const ALL: [FrameKind; 10] = [
        FrameKind::Hello,
        FrameKind::HelloOk,
        FrameKind::Batch,
        FrameKind::Ack,
        FrameKind::Error,
        FrameKind::Delivery,
        FrameKind::CreateTopic,
        FrameKind::TopicOk,
        FrameKind::Goodbye,
        FrameKind::Redirect,
    ];

    /// Whether the body is a fixed header followed by a payload the receiver reads itself.
    pub fn carries_payload(self) -> bool {
        matches!(self, FrameKind::Batch | FrameKind::Delivery)
    }

    /// Size of the fixed header at the start of the body of a payload-carrying kind.
    pub fn payload_header_bytes(self) -> Option<usize> {
        match self {
            FrameKind::Batch => Some(BATCH_HEADER_BYTES),
            FrameKind::Delivery => Some(DELIVERY_HEADER_BYTES),
            _ => None,
        }
    }
}

impl TryFrom<u8> for FrameKind {
    type Error = Error;

    fn try_from(value: u8) -> Result<Self, Error> {
        FrameKind::ALL
            .into_iter()
            .find(|kind| *kind as u8 == value)
            .ok_or(Error::UnknownKind(value))
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A view over the 8-byte frame header.
#[derive(Debug, Clone, Copy)]
pub struct FrameHeader<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> FrameHeader<T> {
    /// Wraps a buffer without checks; accessors panic if it is shorter than
    /// [`FRAME_HEADER_BYTES`].
    pub fn new_unchecked(buffer: T) -> Self {
        FrameHeader { buffer }
    }

    /// Wraps a buffer of at least [`FRAME_HEADER_BYTES`] (only the first 8 are read).
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let header = Self::new_unchecked(buffer);
        header.check_len()?;
        Ok(header)
    }

    /// Checks that the buffer holds a whole header.
    pub fn check_len(&self) -> Result<(), Error> {
        let got = self.buffer.as_ref().len();
        if got < FRAME_HEADER_BYTES {
            return Err(Error::Truncated {
                what: "frame header",
                needed: FRAME_HEADER_BYTES,
                got,
            });
        }
        Ok(())
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The raw kind byte.
    pub fn kind(&self) -> u8 {
        self.buffer.as_ref()[field::KIND]
    }

    /// The raw flags byte.
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    /// The reserved field.
    pub fn reserved(&self) -> u16 {
        u16_at(self.buffer.as_ref(), field::RESERVED)
    }

    /// Length of the body that follows the header.
    pub fn body_bytes(&self) -> u32 {
        u32_at(self.buffer.as_ref(), field::BODY_BYTES)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> FrameHeader<T> {
    /// Sets the kind byte.
    pub fn set_kind(&mut self, kind: u8) {
        self.buffer.as_mut()[field::KIND] = kind;
    }

    /// Sets the flags byte.
    pub fn set_flags(&mut self, flags: u8) {
        self.buffer.as_mut()[field::FLAGS] = flags;
    }

    /// Sets the reserved field.
    pub fn set_reserved(&mut self, reserved: u16) {
        set_u16(self.buffer.as_mut(), field::RESERVED, reserved);
    }

    /// Sets the body length.
    pub fn set_body_bytes(&mut self, body_bytes: u32) {
        set_u32(self.buffer.as_mut(), field::BODY_BYTES, body_bytes);
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeaderRepr {
    /// Kind of the frame.
    pub kind: FrameKind,
    /// Length of the body that follows.
    pub body_bytes: u32,
}

impl FrameHeaderRepr {
    /// Parses a header: known kind, zero flags and reserved field, and a body length that is
    /// within `limits.frame_bytes_max()` for control frames, or at least the fixed header for
    /// Batch and Delivery (whose payload length is checked against the fixed header).
    pub fn parse<T: AsRef<[u8]>>(header: &FrameHeader<T>, limits: &Limits) -> Result<Self, Error> {
        let kind = FrameKind::try_from(header.kind())?;
        if header.flags() != 0 {
            return Err(Error::NonZeroReserved {
                field: "frame flags",
                value: header.flags().into(),
            });
        }
        if header.reserved() != 0 {
            return Err(Error::NonZeroReserved {
                field: "frame header reserved",
                value: header.reserved().into(),
            });
        }
        let body_bytes = header.body_bytes();
        match kind.payload_header_bytes() {
            Some(fixed) if (body_bytes as usize) < fixed => {
                return Err(if kind == FrameKind::Batch {
                    Error::BatchFrameTooShort { body_bytes }
                } else {
                    Error::Truncated {
                        what: "delivery frame body",
                        needed: fixed,
                        got: body_bytes as usize,
                    }
                });
            }
            Some(_) => {}
            None if body_bytes > limits.frame_bytes_max() => {
                return Err(Error::FrameTooLarge {
                    kind,
                    body_bytes,
                    max: limits.frame_bytes_max(),
                });
            }
            None => {}
        }
        Ok(FrameHeaderRepr { kind, body_bytes })
    }

    /// Bytes needed to emit the header.
    pub const fn buffer_len(&self) -> usize {
        FRAME_HEADER_BYTES
    }

    /// Writes the header.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, header: &mut FrameHeader<T>) {
        header.set_kind(self.kind as u8);
        header.set_flags(0);
        header.set_reserved(0);
        header.set_body_bytes(self.body_bytes);
    }

    /// The header as bytes.
    pub fn to_bytes(&self) -> [u8; FRAME_HEADER_BYTES] {
        let mut bytes = [0u8; FRAME_HEADER_BYTES];
        self.emit(&mut FrameHeader::new_unchecked(&mut bytes[..]));
        bytes
    }
}

/// Any control frame (every kind but Batch and Delivery), in owned typed form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// See [`HelloRepr`].
    Hello(HelloRepr),
    /// See [`HelloOkRepr`].
    HelloOk(HelloOkRepr),
    /// See [`AckRepr`].
    Ack(AckRepr),
    /// See [`ErrorFrameRepr`].
    Error(ErrorFrameRepr),
    /// See [`CreateTopicRepr`].
    CreateTopic(CreateTopicRepr),
    /// See [`TopicOkRepr`].
    TopicOk(TopicOkRepr),
    /// Clean close; empty body.
    Goodbye,
    /// See [`RedirectRepr`].
    Redirect(RedirectRepr),
}

impl Frame {
    /// The frame's kind.
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Hello(_) => FrameKind::Hello,
            Frame::HelloOk(_) => FrameKind::HelloOk,
            Frame::Ack(_) => FrameKind::Ack,
            Frame::Error(_) => FrameKind::Error,
            Frame::CreateTopic(_) => FrameKind::CreateTopic,
            Frame::TopicOk(_) => FrameKind::TopicOk,
            Frame::Goodbye => FrameKind::Goodbye,
            Frame::Redirect(_) => FrameKind::Redirect,
        }
    }

    /// Length of the body (without the frame header).
    pub fn body_len(&self) -> usize {
        match self {
            Frame::Hello(repr) => repr.buffer_len(),
            Frame::HelloOk(repr) => repr.buffer_len(),
            Frame::Ack(repr) => repr.buffer_len(),
            Frame::Error(repr) => repr.buffer_len(),
            Frame::CreateTopic(repr) => repr.buffer_len(),
            Frame::TopicOk(repr) => repr.buffer_len(),
            Frame::Goodbye => 0,
            Frame::Redirect(repr) => repr.buffer_len(),
        }
    }

    /// Length of the whole frame, header included.
    pub fn buffer_len(&self) -> usize {
        FRAME_HEADER_BYTES + self.body_len()
    }

    /// Parses the body of a control frame whose header has been parsed.
    pub fn parse_body(kind: FrameKind, body: &[u8], limits: &Limits) -> Result<Self, Error> {
        if body.len() > limits.frame_bytes_max() as usize && !kind.carries_payload() {
            return Err(Error::FrameTooLarge {
                kind,
                body_bytes: u32::try_from(body.len()).unwrap_or(u32::MAX),
                max: limits.frame_bytes_max(),
            });
        }
        match kind {
            FrameKind::Hello => {
                HelloRepr::parse(&Hello::new_checked(body)?, limits).map(Frame::Hello)
            }
            FrameKind::HelloOk => {
                HelloOkRepr::parse(&HelloOk::new_checked(body)?).map(Frame::HelloOk)
            }
            FrameKind::Ack => AckRepr::parse(&Ack::new_checked(body)?).map(Frame::Ack),
            FrameKind::Error => {
                ErrorFrameRepr::parse(&ErrorFrame::new_checked(body)?, limits).map(Frame::Error)
            }
            FrameKind::CreateTopic => {
                CreateTopicRepr::parse(&CreateTopic::new_checked(body)?, limits)
                    .map(Frame::CreateTopic)
            }
            FrameKind::TopicOk => {
                TopicOkRepr::parse(&TopicOk::new_checked(body)?, limits).map(Frame::TopicOk)
            }
            FrameKind::Redirect => {
                RedirectRepr::parse(&Redirect::new_checked(body)?).map(Frame::Redirect)
            }
            FrameKind::Goodbye if body.is_empty() => Ok(Frame::Goodbye),
            FrameKind::Goodbye => Err(Error::LengthMismatch {
                what: "goodbye body",
                expected: 0,
                actual: body.len(),
            }),
            FrameKind::Batch | FrameKind::Delivery => Err(Error::PayloadFrameKind(kind)),
        }
    }

    /// Writes header and body into `buffer`, which must hold [`Frame::buffer_len`] bytes.
    ///
    /// # Panics
    /// When `buffer` is shorter than [`Frame::buffer_len`].
    pub fn emit(&self, buffer: &mut [u8]) {
        let body_len = self.body_len();
        let header = FrameHeaderRepr {
            kind: self.kind(),
            // Every control repr is bounded well below u32::MAX (largest: a full Ack).
            body_bytes: body_len as u32,
        };
        header.emit(&mut FrameHeader::new_unchecked(
            &mut buffer[..FRAME_HEADER_BYTES],
        ));
        let body = &mut buffer[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + body_len];
        match self {
            Frame::Hello(repr) => repr.emit(&mut Hello::new_unchecked(body)),
            Frame::HelloOk(repr) => repr.emit(&mut HelloOk::new_unchecked(body)),
            Frame::Ack(repr) => repr.emit(&mut Ack::new_unchecked(body)),
            Frame::Error(repr) => repr.emit(&mut ErrorFrame::new_unchecked(body)),
            Frame::CreateTopic(repr) => repr.emit(&mut CreateTopic::new_unchecked(body)),
            Frame::TopicOk(repr) => repr.emit(&mut TopicOk::new_unchecked(body)),
            Frame::Goodbye => {}
            Frame::Redirect(repr) => repr.emit(&mut Redirect::new_unchecked(body)),
        }
    }

    /// Appends the whole frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + self.buffer_len(), 0);
        self.emit(&mut out[start..]);
    }

    /// The whole frame as a new vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.buffer_len());
        self.encode(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_rules() {
        let limits = Limits::default();
        let repr = FrameHeaderRepr {
            kind: FrameKind::Ack,
            body_bytes: 40,
        };
        let bytes = repr.to_bytes();
        assert_eq!(bytes, [4, 0, 0, 0, 40, 0, 0, 0]);
        let view = FrameHeader::new_checked(&bytes[..]).unwrap();
        assert_eq!(FrameHeaderRepr::parse(&view, &limits), Ok(repr));

        let parse = |bytes: [u8; 8]| {
            FrameHeaderRepr::parse(&FrameHeader::new_unchecked(&bytes[..]), &limits)
        };
        assert_eq!(parse([0, 0, 0, 0, 0, 0, 0, 0]), Err(Error::UnknownKind(0)));
        assert_eq!(
            parse([11, 0, 0, 0, 0, 0, 0, 0]),
            Err(Error::UnknownKind(11))
        );
        assert!(matches!(
            parse([9, 1, 0, 0, 0, 0, 0, 0]),
            Err(Error::NonZeroReserved { .. })
        ));
        assert!(matches!(
            parse([9, 0, 0, 1, 0, 0, 0, 0]),
            Err(Error::NonZeroReserved { .. })
        ));
        assert_eq!(
            parse([3, 0, 0, 0, 31, 0, 0, 0]),
            Err(Error::BatchFrameTooShort { body_bytes: 31 })
        );
        let too_large = parse([4, 0, 0, 0, 0x01, 0x00, 0x01, 0x00]).unwrap_err();
        assert_eq!(
            too_large.to_string(),
            "Ack frame body of 65537 bytes exceeds the limit of 65536"
        );
        // Batch bodies are bounded by the batch header, not by frame_bytes_max.
        assert!(parse([3, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).is_ok());
        assert_eq!(
            FrameHeader::new_checked(&bytes[..7]).unwrap_err(),
            Error::Truncated {
                what: "frame header",
                needed: 8,
                got: 7
            }
        );
    }

    #[test]
    fn goodbye_and_payload_kinds() {
        let limits = Limits::default();
        assert_eq!(Frame::Goodbye.to_bytes(), [9, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            Frame::parse_body(FrameKind::Goodbye, &[], &limits),
            Ok(Frame::Goodbye)
        );
        assert!(matches!(
            Frame::parse_body(FrameKind::Goodbye, &[0], &limits),
            Err(Error::LengthMismatch { .. })
        ));
        assert_eq!(
            Frame::parse_body(FrameKind::Batch, &[0; 40], &limits),
            Err(Error::PayloadFrameKind(FrameKind::Batch))
        );
    }
}
