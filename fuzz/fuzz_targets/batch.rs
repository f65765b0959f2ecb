//! Batch frames: the 32-byte header and the payload behind it. A header that parses
//! re-encodes to the same bytes and decodes back through `FrameDecoder`; a header error names
//! the batch; the payload check (length, CRC-32C, message framing) agrees with message
//! iteration.
//!
//! Input: a batch header followed by its payload (the frame body).

#![no_main]

use embarcadero_fuzz::{check_error_frame, check_messages, check_payload, limit_variants};
use libfuzzer_sys::fuzz_target;
use wire::{BatchHeader, BatchHeaderRepr, Decoded, FrameDecoder, Limits};

fn check(body: &[u8], limits: Limits) {
    let body_bytes = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let view = match BatchHeader::new_checked(body) {
        Ok(view) => view,
        Err(error) => return check_error_frame(&error),
    };
    let header = match BatchHeaderRepr::parse(&view, body_bytes, &limits) {
        Ok(header) => header,
        Err(error) => {
            // A header error names the batch, unless its number is the wire's "none".
            let named = (view.batch_seq() != u64::MAX).then_some(view.batch_seq());
            assert_eq!(error.batch_seq(), named, "{error:?}");
            return check_error_frame(&error);
        }
    };
    let prefix = header.frame_prefix();
    assert_eq!(
        &prefix[wire::FRAME_HEADER_BYTES..],
        &body[..wire::BATCH_HEADER_BYTES]
    );
    let mut decoder = FrameDecoder::new(limits);
    assert_eq!(
        decoder.decode(&prefix),
        Ok((prefix.len(), Decoded::Batch(header)))
    );
    let payload = &body[wire::BATCH_HEADER_BYTES..];
    assert_eq!(payload.len(), header.payload_bytes as usize);
    assert_eq!(decoder.wanted(), payload.len());
    assert!(header.payload_bytes <= limits.batch_bytes_max());
    assert!(header.message_count >= 1);
    assert!(header.message_count as usize * wire::payload::MESSAGE_PREFIX_BYTES <= payload.len());
    check_payload(&header, payload);
    // The header a publisher would build for this payload: valid exactly when the messages are.
    let own =
        BatchHeaderRepr::for_payload(header.batch_seq, header.message_count, payload, &limits)
            .expect("within the limit");
    assert_eq!(
        wire::verify_payload(&own, payload).is_ok(),
        wire::payload::validate(payload, header.message_count).is_ok()
    );
}

fuzz_target!(|body: &[u8]| {
    for limits in limit_variants() {
        check(body, limits);
    }
    check_messages(body.get(wire::BATCH_HEADER_BYTES..).unwrap_or_default());
});
