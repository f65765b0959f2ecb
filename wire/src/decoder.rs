//! [`FrameDecoder`]: a sans-IO stream decoder that hands payloads to the caller.

use crate::batch::{BatchHeader, BatchHeaderRepr};
use crate::delivery::{DeliveryHeader, DeliveryHeaderRepr};
use crate::error::Error;
use crate::frame::{FRAME_HEADER_BYTES, Frame, FrameHeader, FrameHeaderRepr, FrameKind};
use crate::limits::Limits;

/// What one call to [`FrameDecoder::decode`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// All input was consumed; this many more bytes complete the current step.
    NeedMore(usize),
    /// A complete control frame.
    Frame(Frame),
    /// A batch header; the next `payload_bytes` bytes of the stream are its payload.
    Batch(BatchHeaderRepr),
    /// A delivery header; the next `payload_bytes` bytes of the stream are its payload.
    Delivery(DeliveryHeaderRepr),
    /// Payload bytes of the current Batch or Delivery, taken from the input.
    Payload {
        /// The bytes, a slice of the input.
        bytes: &'a [u8],
        /// Payload bytes still to come after these.
        remaining: u32,
    },
}

/// A step of known size whose bytes the decoder gathers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The 8-byte frame header.
    Header,
    /// The body of a control frame.
    Body { kind: FrameKind, body_bytes: u32 },
    /// The fixed header of a Batch or Delivery frame.
    PayloadHeader {
        kind: FrameKind,
        header_bytes: usize,
        body_bytes: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Step(Step),
    Payload { remaining: u32 },
    Failed(Error),
}

fn after_payload(remaining: u32) -> State {
    if remaining == 0 {
        State::Step(Step::Header)
    } else {
        State::Payload { remaining }
    }
}

/// The decoder works in steps of known size: the 8-byte frame header, then either a control
/// frame's body (buffered, at most `frame_bytes_max`) or the fixed header of a Batch (32 B)
/// or Delivery (48 B). After a Batch or Delivery header it reports the header and the payload
/// length; the caller then either receives the payload itself (straight into its destination)
/// and reports it with [`FrameDecoder::payload_received`], or keeps feeding bytes through
/// [`FrameDecoder::decode`], which passes them back as [`Decoded::Payload`] slices.
/// [`FrameDecoder::wanted`] is always the exact number of bytes that completes the current
/// step, so a reader that never reads past a step never reads past a frame.
///
/// ```
/// use wire::{BatchHeaderRepr, Decoded, FrameDecoder, Limits, payload, verify_payload};
///
/// // A publisher's stream: one batch of two messages.
/// let mut body = Vec::new();
/// payload::push_message(&mut body, b"hello");
/// payload::push_message(&mut body, b"world");
/// let header = BatchHeaderRepr::for_payload(0, 2, &body, &Limits::default()).unwrap();
/// let mut stream = header.frame_prefix().to_vec();
/// stream.extend_from_slice(&body);
///
/// // A broker reading exactly what the decoder wants.
/// let mut decoder = FrameDecoder::new(Limits::default());
/// let mut at = 0;
/// let batch = loop {
///     let want = decoder.wanted();
///     match decoder.decode(&stream[at..at + want]).unwrap() {
///         (used, Decoded::NeedMore(_)) => at += used,
///         (used, Decoded::Batch(batch)) => { at += used; break batch }
///         (_, other) => panic!("unexpected {other:?}"),
///     }
/// };
/// // Receive the payload straight into the destination (here: a slice of "shared memory").
/// let mut pool = vec![0u8; 4096];
/// let len = batch.payload_bytes as usize;
/// pool[..len].copy_from_slice(&stream[at..at + len]);
/// decoder.payload_received(len).unwrap();
/// verify_payload(&batch, &pool[..len]).unwrap();
/// assert!(decoder.at_frame_boundary());
/// ```
///
/// After an error the stream is out of step: every later call returns the same error.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    limits: Limits,
    state: State,
    gathered: Vec<u8>,
}

impl FrameDecoder {
    /// A decoder at the start of a stream.
    pub fn new(limits: Limits) -> Self {
        FrameDecoder {
            limits,
            state: State::Step(Step::Header),
            gathered: Vec::new(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Exactly how many bytes complete the current step (header, body, fixed header, or the
    /// rest of a payload); 0 after an error.
    pub fn wanted(&self) -> usize {
        match self.state {
            State::Step(step) => self.step_len(step) - self.gathered.len(),
            State::Payload { remaining } => remaining as usize,
            State::Failed(_) => 0,
        }
    }

    /// Payload bytes of the current Batch or Delivery still to come, if inside one.
    pub fn payload_remaining(&self) -> Option<u32> {
        match self.state {
            State::Payload { remaining } => Some(remaining),
            _ => None,
        }
    }

    /// Whether the decoder sits between frames (a clean place for the stream to end).
    pub fn at_frame_boundary(&self) -> bool {
        self.state == State::Step(Step::Header) && self.gathered.is_empty()
    }

    /// Reports `bytes` payload bytes the caller received itself, bypassing [`decode`](Self::decode).
    pub fn payload_received(&mut self, bytes: usize) -> Result<(), Error> {
        let remaining = self.payload_remaining().unwrap_or(0);
        match u32::try_from(bytes) {
            Ok(received) if received <= remaining => {
                if self.payload_remaining().is_some() {
                    self.state = after_payload(remaining - received);
                }
                Ok(())
            }
            _ => Err(Error::PayloadOverrun {
                received: bytes,
                remaining,
            }),
        }
    }

    /// Consumes bytes from `input` until one thing is decoded or the input runs out.
    /// Returns how many bytes were consumed and what was decoded. Never consumes bytes of a
    /// payload without returning them as [`Decoded::Payload`].
    pub fn decode<'a>(&mut self, input: &'a [u8]) -> Result<(usize, Decoded<'a>), Error> {
        let mut consumed = 0;
        loop {
            let rest = &input[consumed..];
            let step = match self.state {
                State::Failed(error) => return Err(error),
                State::Payload { remaining } => {
                    if rest.is_empty() {
                        return Ok((consumed, Decoded::NeedMore(remaining as usize)));
                    }
                    let take = rest.len().min(remaining as usize);
                    // `take` <= `remaining`, a u32.
                    let remaining = remaining - take as u32;
                    self.state = after_payload(remaining);
                    let bytes = &rest[..take];
                    return Ok((consumed + take, Decoded::Payload { bytes, remaining }));
                }
                State::Step(step) => step,
            };
            let step_len = self.step_len(step);
            let outcome = if self.gathered.is_empty() && rest.len() >= step_len {
                consumed += step_len;
                self.complete(step, &rest[..step_len])
            } else {
                let take = rest.len().min(step_len - self.gathered.len());
                self.gathered.extend_from_slice(&rest[..take]);
                consumed += take;
                if self.gathered.len() < step_len {
                    return Ok((consumed, Decoded::NeedMore(step_len - self.gathered.len())));
                }
                let gathered = core::mem::take(&mut self.gathered);
                let outcome = self.complete(step, &gathered);
                self.gathered = gathered;
                self.gathered.clear();
                outcome
            };
            match outcome {
                Ok(Some(decoded)) => return Ok((consumed, decoded)),
                Ok(None) => {}
                Err(error) => {
                    self.state = State::Failed(error);
                    return Err(error);
                }
            }
        }
    }

    fn step_len(&self, step: Step) -> usize {
        match step {
            Step::Header => FRAME_HEADER_BYTES,
            Step::Body { body_bytes, .. } => body_bytes as usize,
            Step::PayloadHeader { header_bytes, .. } => header_bytes,
        }
    }

    /// Handles the complete bytes of `step`; `None` when the next step produces the output.
    fn complete(&mut self, step: Step, bytes: &[u8]) -> Result<Option<Decoded<'static>>, Error> {
        match step {
            Step::Header => {
                let header =
                    FrameHeaderRepr::parse(&FrameHeader::new_checked(bytes)?, &self.limits)?;
                let (kind, body_bytes) = (header.kind, header.body_bytes);
                if let Some(header_bytes) = kind.payload_header_bytes() {
                    self.state = State::Step(Step::PayloadHeader {
                        kind,
                        header_bytes,
                        body_bytes,
                    });
                    Ok(None)
                } else if body_bytes == 0 {
                    Frame::parse_body(kind, &[], &self.limits)
                        .map(|frame| Some(Decoded::Frame(frame)))
                } else {
                    self.state = State::Step(Step::Body { kind, body_bytes });
                    Ok(None)
                }
            }
            Step::Body { kind, .. } => {
                self.state = State::Step(Step::Header);
                Frame::parse_body(kind, bytes, &self.limits)
                    .map(|frame| Some(Decoded::Frame(frame)))
            }
            Step::PayloadHeader {
                kind: FrameKind::Delivery,
                body_bytes,
                ..
            } => {
                let header = DeliveryHeaderRepr::parse(
                    &DeliveryHeader::new_checked(bytes)?,
                    body_bytes,
                    &self.limits,
                )?;
                self.state = after_payload(header.payload_bytes);
                Ok(Some(Decoded::Delivery(header)))
            }
            Step::PayloadHeader { body_bytes, .. } => {
                let header = BatchHeaderRepr::parse(
                    &BatchHeader::new_checked(bytes)?,
                    body_bytes,
                    &self.limits,
                )?;
                self.state = after_payload(header.payload_bytes);
                Ok(Some(Decoded::Batch(header)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use crate::error_frame::ErrorFrameRepr;
    use crate::payload::push_message;

    fn batch(seq: u64) -> (BatchHeaderRepr, Vec<u8>) {
        let mut payload = Vec::new();
        push_message(&mut payload, b"abc");
        push_message(&mut payload, &[7; 40]);
        let header = BatchHeaderRepr::for_payload(seq, 2, &payload, &Limits::default()).unwrap();
        (header, payload)
    }

    #[test]
    fn control_frames_byte_by_byte() {
        let frames = [
            Frame::Error(ErrorFrameRepr::new(
                ErrorCode::PoolFull,
                None,
                "pool is full",
            )),
            Frame::Goodbye,
        ];
        let stream: Vec<u8> = frames.iter().flat_map(Frame::to_bytes).collect();
        let mut decoder = FrameDecoder::new(Limits::default());
        let mut decoded = Vec::new();
        for byte in &stream {
            match decoder.decode(std::slice::from_ref(byte)).unwrap() {
                (1, Decoded::NeedMore(n)) => assert_eq!(n, decoder.wanted()),
                (1, Decoded::Frame(frame)) => decoded.push(frame),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(decoded, frames);
        assert!(decoder.at_frame_boundary());
    }

    #[test]
    fn batch_payload_passes_through_or_is_received_by_the_caller() {
        let (first, first_payload) = batch(0);
        let (second, second_payload) = batch(1);
        let mut stream = first.frame_prefix().to_vec();
        stream.extend_from_slice(&first_payload);
        stream.extend_from_slice(&second.frame_prefix());
        stream.extend_from_slice(&second_payload);
        stream.extend_from_slice(&Frame::Goodbye.to_bytes());

        let mut decoder = FrameDecoder::new(Limits::default());
        // Pass-through: one call for the header, one for the payload.
        let (used, decoded) = decoder.decode(&stream).unwrap();
        assert_eq!((used, decoded), (40, Decoded::Batch(first)));
        assert_eq!(decoder.wanted(), first_payload.len());
        let (used, decoded) = decoder.decode(&stream[40..]).unwrap();
        assert_eq!(used, first_payload.len());
        assert_eq!(
            decoded,
            Decoded::Payload {
                bytes: &first_payload[..],
                remaining: 0
            }
        );
        let mut at = 40 + used;
        // Caller-received payload: take the header, then skip the payload bytes ourselves.
        let (used, decoded) = decoder.decode(&stream[at..]).unwrap();
        assert_eq!(decoded, Decoded::Batch(second));
        at += used;
        assert_eq!(
            decoder.payload_received(second_payload.len() + 1),
            Err(Error::PayloadOverrun {
                received: second_payload.len() + 1,
                remaining: second_payload.len() as u32
            })
        );
        decoder.payload_received(10).unwrap();
        assert_eq!(
            decoder.payload_remaining(),
            Some(second_payload.len() as u32 - 10)
        );
        decoder.payload_received(second_payload.len() - 10).unwrap();
        at += second_payload.len();
        assert_eq!(
            decoder.decode(&stream[at..]).unwrap(),
            (8, Decoded::Frame(Frame::Goodbye))
        );
        assert!(decoder.at_frame_boundary());
        assert_eq!(decoder.decode(&[]).unwrap(), (0, Decoded::NeedMore(8)));
    }

    #[test]
    fn errors_are_sticky_and_nothing_huge_is_buffered() {
        let mut decoder = FrameDecoder::new(Limits::default());
        assert_eq!(
            decoder.decode(&[42, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3]),
            Err(Error::UnknownKind(42))
        );
        assert_eq!(
            decoder.decode(&[9, 0, 0, 0, 0, 0, 0, 0]),
            Err(Error::UnknownKind(42))
        );
        assert_eq!(decoder.wanted(), 0);

        let mut decoder = FrameDecoder::new(Limits::default());
        let huge = [FrameKind::Ack as u8, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f];
        assert!(matches!(
            decoder.decode(&huge),
            Err(Error::FrameTooLarge { .. })
        ));

        // A batch announcing more than the limit is refused at its header, with its sequence.
        let small = Limits::default().with_batch_bytes_max(1024).unwrap();
        let mut decoder = FrameDecoder::new(small);
        let header = BatchHeaderRepr {
            batch_seq: 5,
            message_count: 1,
            payload_bytes: 4096,
            checksum: 0,
        };
        let error = decoder.decode(&header.frame_prefix()).unwrap_err();
        assert_eq!(error.code(), ErrorCode::BatchTooLarge);
        assert_eq!(error.batch_seq(), Some(5));
    }

    #[test]
    fn empty_bodies_are_checked() {
        let mut decoder = FrameDecoder::new(Limits::default());
        let empty_hello = [FrameKind::Hello as u8, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            decoder.decode(&empty_hello),
            Err(Error::Truncated {
                what: "hello body",
                ..
            })
        ));
        let mut decoder = FrameDecoder::new(Limits::default());
        assert_eq!(decoder.payload_received(0), Ok(()));
        assert_eq!(
            decoder.payload_received(1),
            Err(Error::PayloadOverrun {
                received: 1,
                remaining: 0
            })
        );
    }
}
