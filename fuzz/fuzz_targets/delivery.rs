//! Delivery frames: the 48-byte header and the payload behind it, as a subscriber receives
//! them. A header that parses re-encodes to the same bytes and decodes back through
//! `FrameDecoder`; positions never overflow; the payload check agrees with message iteration.
//!
//! Input: a delivery header followed by its payload (the frame body).

#![no_main]

use embarcadero_fuzz::{check_error_frame, check_messages, check_payload, limit_variants};
use libfuzzer_sys::fuzz_target;
use wire::{Decoded, DeliveryHeader, DeliveryHeaderRepr, FrameDecoder, Limits};

fn check(body: &[u8], limits: Limits) {
    let body_bytes = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let view = match DeliveryHeader::new_checked(body) {
        Ok(view) => view,
        Err(error) => return check_error_frame(&error),
    };
    let header = match DeliveryHeaderRepr::parse(&view, body_bytes, &limits) {
        Ok(header) => header,
        Err(error) => return check_error_frame(&error),
    };
    let prefix = header.frame_prefix();
    assert_eq!(
        &prefix[wire::FRAME_HEADER_BYTES..],
        &body[..wire::DELIVERY_HEADER_BYTES]
    );
    assert_eq!(header.frame_body_bytes(), body_bytes);
    let mut decoder = FrameDecoder::new(limits);
    assert_eq!(
        decoder.decode(&prefix),
        Ok((prefix.len(), Decoded::Delivery(header)))
    );
    if let Some(start) = header.global_start {
        assert!(start.checked_add(u64::from(header.message_count)).is_some());
    }
    assert_eq!(
        (
            header.client_id,
            header.batch_seq,
            header.session_epoch,
            header.broker_id
        ),
        (
            view.client_id(),
            view.batch_seq(),
            view.session_epoch(),
            view.broker_id()
        )
    );
    let payload = &body[wire::DELIVERY_HEADER_BYTES..];
    assert_eq!(payload.len(), header.payload_bytes as usize);
    assert_eq!(decoder.wanted(), payload.len());
    check_payload(&header, payload);
}

fuzz_target!(|body: &[u8]| {
    for limits in limit_variants() {
        check(body, limits);
    }
    check_messages(body.get(wire::DELIVERY_HEADER_BYTES..).unwrap_or_default());
});
