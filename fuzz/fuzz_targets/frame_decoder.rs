//! `wire::FrameDecoder` on any byte stream, fed whole and in random-sized chunks (sometimes
//! receiving payloads itself, as the broker does): both ways decode the same frames and stop
//! at the same error. Every decoded frame is the exact bytes it came from (one encoding per
//! frame) and re-parses to itself; every payload is checked like a receiver checks it.
//!
//! Input: `chunk_seed:u8 config:u8 stream`; bit 0 of `config` picks tight limits.

#![no_main]

use embarcadero_fuzz::{
    check_control_round_trip, check_error_frame, check_messages, check_payload, limit_variants,
};
use fuzz_input::{Prefixed, Rng};
use libfuzzer_sys::fuzz_target;
use wire::{
    BatchHeader, BatchHeaderRepr, Decoded, DeliveryHeader, DeliveryHeaderRepr, Frame, FrameDecoder,
    Limits,
};

/// One decoded unit, with the stream range it was decoded from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Frame(Frame),
    Batch(BatchHeaderRepr, Vec<u8>),
    Delivery(DeliveryHeaderRepr, Vec<u8>),
}

/// What decoding a whole stream produced.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    events: Vec<(std::ops::Range<usize>, Event)>,
    /// The error the stream stopped at, or the bytes still wanted when it ran out.
    end: Result<usize, wire::Error>,
}

/// Decodes `stream`, in chunks drawn from `rng` when there is one; with a generator the
/// payload of every other Batch or Delivery is "received by the caller" and reported with
/// `payload_received`, as the broker does for batches.
fn decode(stream: &[u8], limits: Limits, mut rng: Option<Rng>) -> Outcome {
    let mut decoder = FrameDecoder::new(limits);
    let mut events = Vec::new();
    let mut start = 0;
    let mut at = 0;
    // A Batch or Delivery whose payload is being gathered.
    let mut open: Option<Event> = None;
    loop {
        // Inside a payload (never empty), with bytes left: sometimes receive it ourselves.
        if let (Some(rng), Some(remaining)) = (rng.as_mut(), decoder.payload_remaining())
            && at < stream.len()
            && rng.below(2) == 0
        {
            let n = rng.chunk_len(stream.len() - at).min(remaining as usize);
            decoder.payload_received(n).expect("within the payload");
            append_payload(open.as_mut(), &stream[at..at + n]);
            at += n;
            assert_eq!(
                decoder.payload_remaining(),
                Some(remaining - n as u32).filter(|r| *r > 0)
            );
            close_if_done(&decoder, &mut open, &mut events, &mut start, at);
            continue;
        }
        let end = match &mut rng {
            Some(rng) if at < stream.len() => at + rng.chunk_len(stream.len() - at),
            _ => stream.len(),
        };
        let result = decoder.decode(&stream[at..end]);
        let (used, decoded) = match result {
            Ok(ok) => ok,
            Err(error) => {
                assert_eq!(decoder.wanted(), 0, "after an error nothing is wanted");
                assert_eq!(decoder.decode(&stream[at..]), Err(error), "errors stick");
                check_error_frame(&error);
                return Outcome {
                    events,
                    end: Err(error),
                };
            }
        };
        assert!(used <= end - at);
        at += used;
        match decoded {
            Decoded::NeedMore(wanted) => {
                assert_eq!(at, end, "NeedMore consumed all the input");
                assert_eq!(wanted, decoder.wanted());
                assert!(wanted > 0);
                if at == stream.len() {
                    return Outcome {
                        events,
                        end: Ok(wanted),
                    };
                }
            }
            Decoded::Frame(frame) => {
                assert!(open.is_none());
                assert!(decoder.at_frame_boundary());
                check_control_round_trip(
                    &frame,
                    &stream[start + wire::FRAME_HEADER_BYTES..at],
                    &limits,
                );
                events.push((start..at, Event::Frame(frame)));
                start = at;
            }
            Decoded::Batch(header) => {
                assert!(open.is_none());
                assert_eq!(&stream[start..at], &header.frame_prefix()[..]);
                let body_bytes = header.payload_bytes + wire::BATCH_HEADER_BYTES as u32;
                let view = BatchHeader::new_checked(&stream[start + wire::FRAME_HEADER_BYTES..at])
                    .expect("a whole batch header");
                assert_eq!(
                    BatchHeaderRepr::parse(&view, body_bytes, &limits),
                    Ok(header)
                );
                assert_eq!(decoder.wanted(), header.payload_bytes as usize);
                open = Some(Event::Batch(header, Vec::new()));
            }
            Decoded::Delivery(header) => {
                assert!(open.is_none());
                assert_eq!(&stream[start..at], &header.frame_prefix()[..]);
                let view =
                    DeliveryHeader::new_checked(&stream[start + wire::FRAME_HEADER_BYTES..at])
                        .expect("a whole delivery header");
                assert_eq!(
                    DeliveryHeaderRepr::parse(&view, header.frame_body_bytes(), &limits),
                    Ok(header)
                );
                assert_eq!(decoder.wanted(), header.payload_bytes as usize);
                open = Some(Event::Delivery(header, Vec::new()));
            }
            Decoded::Payload { bytes, remaining } => {
                assert_eq!(bytes, &stream[at - used..at]);
                assert_eq!(
                    decoder.payload_remaining(),
                    Some(remaining).filter(|r| *r > 0)
                );
                append_payload(open.as_mut(), bytes);
            }
        }
        close_if_done(&decoder, &mut open, &mut events, &mut start, at);
    }
}

fn append_payload(open: Option<&mut Event>, bytes: &[u8]) {
    match open {
        Some(Event::Batch(_, payload) | Event::Delivery(_, payload)) => {
            payload.extend_from_slice(bytes)
        }
        other => panic!("payload bytes outside a Batch or Delivery: {other:?}"),
    }
}

/// Ends the open Batch or Delivery once its payload is complete, checking the payload.
fn close_if_done(
    decoder: &FrameDecoder,
    open: &mut Option<Event>,
    events: &mut Vec<(std::ops::Range<usize>, Event)>,
    start: &mut usize,
    at: usize,
) {
    if open.is_none() || decoder.payload_remaining().is_some() {
        return;
    }
    let event = open.take().expect("checked above");
    let payload = match &event {
        Event::Batch(header, payload) => {
            check_payload(header, payload);
            payload
        }
        Event::Delivery(header, payload) => {
            check_payload(header, payload);
            payload
        }
        Event::Frame(_) => unreachable!("only payload frames are open"),
    };
    check_messages(payload);
    assert!(decoder.at_frame_boundary());
    events.push((*start..at, event));
    *start = at;
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = Prefixed::parse(data) else {
        return;
    };
    let limits = limit_variants()[usize::from(input.config & 1)];
    let whole = decode(input.rest, limits, None);
    let chunked = decode(input.rest, limits, Some(Rng::new(input.chunk_seed)));
    assert_eq!(whole, chunked, "chunking changed what was decoded");
});
