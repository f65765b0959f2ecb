//! Checks shared by the fuzz targets in `fuzz_targets/`. Every check panics on a violation,
//! which libFuzzer reports as a crash with the input that caused it.

pub mod connection;

use wire::PayloadHeader;
use wire::payload;
use wire::{Decoded, ErrorFrameRepr, Frame, FrameDecoder, FrameKind, Limits};

/// The limits each body is parsed under: the defaults, and the tightest the protocol allows
/// (so every length limit is reachable by short inputs).
pub fn limit_variants() -> [Limits; 2] {
    let tight = Limits::default()
        .with_batch_bytes_max(64)
        .and_then(|l| l.with_frame_bytes_max(wire::FRAME_BYTES_MIN))
        .and_then(|l| l.with_topic_bytes_max(4))
        .and_then(|l| l.with_reason_bytes_max(8))
        .expect("tight limits are within the protocol's bounds");
    [Limits::default(), tight]
}

/// Every protocol error becomes an Error frame the broker may send: that frame must parse
/// back with the same code, reason and batch (`u64::MAX` is "no batch" on the wire).
pub fn check_error_frame(error: &wire::Error) {
    let repr = ErrorFrameRepr::from_error(error);
    let bytes = Frame::Error(repr.clone()).to_bytes();
    let mut decoder = FrameDecoder::new(Limits::default());
    match decoder.decode(&bytes) {
        Ok((used, Decoded::Frame(Frame::Error(parsed)))) => {
            assert_eq!(used, bytes.len(), "Error frame for {error:?}");
            assert_eq!(parsed.code, repr.code, "Error frame for {error:?}");
            assert_eq!(parsed.reason(), repr.reason(), "Error frame for {error:?}");
            let batch_seq = repr.batch_seq.filter(|&seq| seq != u64::MAX);
            assert_eq!(parsed.batch_seq, batch_seq, "Error frame for {error:?}");
        }
        other => panic!("the Error frame for {error:?} does not parse: {other:?}"),
    }
}

/// A control frame parsed from `body` re-encodes to exactly `body` (every valid frame has one
/// encoding) and parses back to itself, through the body parser and the stream decoder.
pub fn check_control_round_trip(frame: &Frame, body: &[u8], limits: &Limits) {
    let bytes = frame.to_bytes();
    assert_eq!(bytes.len(), frame.buffer_len());
    assert_eq!(
        &bytes[wire::FRAME_HEADER_BYTES..],
        body,
        "{frame:?} re-encodes differently"
    );
    assert_eq!(
        Frame::parse_body(frame.kind(), body, limits).as_ref(),
        Ok(frame)
    );
    let mut decoder = FrameDecoder::new(*limits);
    assert_eq!(
        decoder.decode(&bytes),
        Ok((bytes.len(), Decoded::Frame(frame.clone())))
    );
    assert!(decoder.at_frame_boundary());
}

/// Parses `body` as a `kind` frame under each of [`limit_variants`]: a frame round-trips, an
/// error becomes a parseable Error frame.
pub fn check_body(kind: FrameKind, body: &[u8]) {
    for limits in limit_variants() {
        match Frame::parse_body(kind, body, &limits) {
            Ok(frame) => {
                assert_eq!(frame.kind(), kind);
                check_control_round_trip(&frame, body, &limits);
            }
            Err(error) => check_error_frame(&error),
        }
    }
}

/// Message iteration and validation agree on any payload: messages tile it exactly when
/// iteration ends without an error, and `validate` accepts exactly their count.
pub fn check_messages(bytes: &[u8]) {
    let mut count = 0u32;
    let mut tiled = 0usize;
    let mut failed = false;
    for message in payload::messages(bytes) {
        assert!(!failed, "messages after an error");
        match message {
            Ok(message) => {
                count += 1;
                tiled += payload::MESSAGE_PREFIX_BYTES + message.len();
            }
            Err(_) => failed = true,
        }
    }
    if failed {
        assert!(payload::validate(bytes, count).is_err());
        assert!(payload::validate(bytes, count + 1).is_err());
    } else {
        assert_eq!(tiled, bytes.len(), "messages do not tile the payload");
        assert_eq!(payload::validate(bytes, count), Ok(()));
        assert!(payload::validate(bytes, count + 1).is_err());
        if count > 0 {
            assert!(payload::validate(bytes, count - 1).is_err());
        }
    }
}

/// `verify_payload` accepts a payload exactly when its length and checksum match the header
/// and its messages tile it in the announced count; its errors become Error frames.
pub fn check_payload<H: PayloadHeader>(header: &H, bytes: &[u8]) {
    let verdict = wire::verify_payload(header, bytes);
    let expected = bytes.len() == header.payload_bytes() as usize
        && payload::checksum(bytes) == header.checksum()
        && payload::validate(bytes, header.message_count()).is_ok();
    assert_eq!(verdict.is_ok(), expected, "verify_payload: {verdict:?}");
    if let Err(error) = verdict {
        check_error_frame(&error);
    }
}
