//! Kafka record batches (magic 2), as a Kafka producer's Produce carries them and as the log
//! stores them: the framing and record views never panic, agree with each other, and what
//! validates keeps validating once its base offsets are set, with the same checksum where
//! the batches' CRCs hold.
//!
//! Input: the records field of one partition of a Produce (any bytes).

#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::record_batch;

fuzz_target!(|data: &[u8]| {
    let mut framed = 0u64;
    let mut crcs_hold = true;
    let mut whole = true;
    for batch in record_batch::batches(data) {
        let Ok(batch) = batch else {
            whole = false;
            break;
        };
        assert!(batch.bytes.len() >= record_batch::BATCH_HEADER_BYTES);
        crcs_hold &= batch.stored_crc() == batch.computed_crc();
        let _ = (batch.attributes(), batch.producer());
        let counted = batch.checked_record_count();
        let mut walked = 0u64;
        let mut broken = false;
        for record in batch.records() {
            match record {
                Ok(record) => {
                    assert_eq!(i64::from(record.offset_delta), walked as i64);
                    walked += 1;
                }
                Err(_) => broken = true,
            }
        }
        match counted {
            Ok(count) => {
                framed += u64::from(count);
                if !broken {
                    assert_eq!(walked, u64::from(count), "records tile the batch");
                }
            }
            Err(_) => whole = false,
        }
    }
    let count = u32::try_from(framed).unwrap_or(u32::MAX);
    let validated = record_batch::validate(data, count);
    assert_eq!(validated.is_ok(), whole, "{validated:?}");
    if validated.is_err() {
        return;
    }
    let checksum = record_batch::payload_checksum(data).expect("validated framing");
    if crcs_hold {
        assert_eq!(
            checksum,
            crc32c::crc32c(data),
            "combined from the batches' CRCs"
        );
    }
    let mut served = data.to_vec();
    let end = record_batch::set_base_offsets(&mut served, 1 << 40).expect("validated framing");
    assert_eq!(end, (1 << 40) + framed);
    assert_eq!(record_batch::validate(&served, count), Ok(()));
});
