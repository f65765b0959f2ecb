//! Kafka record batches (magic 2), as the log stores a batch that a Kafka producer sent:
//! the bytes as they came, one or more batches back to back. A checked view of the batch
//! framing and of each record's fields; the broker's Kafka listener adds its own rules
//! (what it takes from a producer) on top.
//!
//! ```text
//! batch   = base_offset:i64 | batch_length:i32 | partition_leader_epoch:i32 | magic:i8
//!           | crc:u32 | attributes:i16 | last_offset_delta:i32 | base_timestamp:i64
//!           | max_timestamp:i64 | producer_id:i64 | producer_epoch:i16 | base_sequence:i32
//!           | record_count:i32 | record*
//! record  = length:varint | attributes:i8 | timestamp_delta:varlong | offset_delta:varint
//!           | key_length:varint | key | value_length:varint | value
//!           | header_count:varint | header*
//! header  = key_length:varint | key | value_length:varint | value
//! ```
//!
//! Integers are big-endian; varints are zigzag LEB128. `batch_length` counts the bytes after
//! it; the CRC-32C covers the bytes from `attributes` to the end, so the base offset and the
//! leader epoch can be set without touching it ([`set_base_offsets`]). Nothing here panics
//! on any input or reads out of bounds.

/// Bytes of a batch up to and including `batch_length`: what `batch_length` does not count.
pub const LOG_OVERHEAD_BYTES: usize = 12;
/// Bytes of a batch's header, up to and including `record_count`.
pub const BATCH_HEADER_BYTES: usize = 61;
/// Where the part the CRC covers begins (`attributes`).
pub const CRC_START: usize = 21;
/// Where a batch's CRC is.
pub const CRC_AT: usize = 17;
/// Where the magic byte is.
pub const MAGIC_AT: usize = 16;
/// Where the attributes are.
pub const ATTRIBUTES_AT: usize = 21;
/// Where the last offset delta is.
pub const LAST_OFFSET_DELTA_AT: usize = 23;
/// Where the base timestamp is.
pub const BASE_TIMESTAMP_AT: usize = 27;
/// Where the max timestamp is.
pub const MAX_TIMESTAMP_AT: usize = 35;
/// Where the producer id is.
pub const PRODUCER_ID_AT: usize = 43;
/// Where the producer epoch is.
pub const PRODUCER_EPOCH_AT: usize = 51;
/// Where the base sequence is.
pub const BASE_SEQUENCE_AT: usize = 53;
/// Where the record count is.
pub const RECORD_COUNT_AT: usize = 57;
const LEADER_EPOCH_AT: usize = 12;

/// Why bytes are not the record batches they should be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordBatchError {
    /// The bytes end inside a batch or a record.
    #[error("record batch {batch}: cut off ({what})")]
    Truncated {
        /// Index of the batch.
        batch: usize,
        /// What was being read.
        what: &'static str,
    },
    /// Not a record batch of magic 2.
    #[error("record batch {batch}: magic {magic}, only 2 is taken")]
    Magic {
        /// Index of the batch.
        batch: usize,
        /// The magic byte found.
        magic: i8,
    },
    /// A length, count, delta or field that contradicts the batch.
    #[error("record batch {batch}: {what}")]
    Invalid {
        /// Index of the batch.
        batch: usize,
        /// What is wrong.
        what: String,
    },
    /// The batches hold another number of records than the log's entry says.
    #[error("the record batches hold {found} records, the entry says {announced}")]
    CountMismatch {
        /// The count the entry announced.
        announced: u64,
        /// The records the batches hold.
        found: u64,
    },
}

/// One batch of a payload, its length and magic checked (its counts by
/// [`BatchView::checked_record_count`], so that a CRC can be checked first).
#[derive(Debug, Clone, Copy)]
pub struct BatchView<'a> {
    /// Index of the batch in its payload.
    pub index: usize,
    /// The whole batch, from its base offset to its last record.
    pub bytes: &'a [u8],
}

impl<'a> BatchView<'a> {
    /// The CRC the batch carries.
    pub fn stored_crc(&self) -> u32 {
        u32::from_be_bytes(self.bytes[CRC_AT..CRC_AT + 4].try_into().expect("4 bytes"))
    }

    /// The CRC-32C of the bytes the batch's CRC covers.
    pub fn computed_crc(&self) -> u32 {
        crate::payload::checksum(&self.bytes[CRC_START..])
    }

    /// The attributes (bits 0-2: compression codec; 4: transactional; 5: control).
    pub fn attributes(&self) -> i16 {
        be_i16(self.bytes, ATTRIBUTES_AT)
    }

    /// The base offset (a stored batch's is set when it is fetched).
    pub fn base_offset(&self) -> i64 {
        be_i64(self.bytes, 0)
    }

    /// The timestamp of the first record, and the greatest of any record (-1: none).
    pub fn timestamps(&self) -> (i64, i64) {
        (
            be_i64(self.bytes, BASE_TIMESTAMP_AT),
            be_i64(self.bytes, MAX_TIMESTAMP_AT),
        )
    }

    /// The producer id (-1: not an idempotent producer's), epoch and base sequence.
    pub fn producer(&self) -> (i64, i16, i32) {
        (
            be_i64(self.bytes, PRODUCER_ID_AT),
            be_i16(self.bytes, PRODUCER_EPOCH_AT),
            be_i32(self.bytes, BASE_SEQUENCE_AT),
        )
    }

    /// The number of records: positive, and the last offset delta + 1.
    pub fn checked_record_count(&self) -> Result<u32, RecordBatchError> {
        let count = be_i32(self.bytes, RECORD_COUNT_AT);
        let last_offset_delta = be_i32(self.bytes, LAST_OFFSET_DELTA_AT);
        if count <= 0 || last_offset_delta != count - 1 {
            return Err(RecordBatchError::Invalid {
                batch: self.index,
                what: format!("{count} records, last offset delta {last_offset_delta}"),
            });
        }
        Ok(count as u32)
    }

    /// The batch's records, each checked as it is walked (an uncompressed batch's; a
    /// compressed batch's records are not readable here).
    pub fn records(&self) -> Records<'a> {
        let count = self.checked_record_count();
        Records {
            bytes: self.bytes,
            batch: self.index,
            at: BATCH_HEADER_BYTES,
            next: 0,
            count: *count.as_ref().unwrap_or(&0),
            failed: false,
            broken: count.err(),
        }
    }
}

/// Iterates over `count` records that fill `bytes` exactly: a compressed batch's records
/// once decompressed (`batch` is the batch's index, for errors).
pub fn records_in(bytes: &[u8], count: u32, batch: usize) -> Records<'_> {
    Records {
        bytes,
        batch,
        at: 0,
        next: 0,
        count,
        failed: false,
        broken: None,
    }
}

/// Iterates over the batches of a payload; yields an error (once) at the first whose
/// framing is broken.
pub fn batches(payload: &[u8]) -> Batches<'_> {
    Batches {
        rest: payload,
        index: 0,
        failed: false,
    }
}

/// Iterator over the batches of a payload, see [`batches`].
#[derive(Debug, Clone)]
pub struct Batches<'a> {
    rest: &'a [u8],
    index: usize,
    failed: bool,
}

impl<'a> Iterator for Batches<'a> {
    type Item = Result<BatchView<'a>, RecordBatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        let batch = self.index;
        let result = frame(self.rest, batch);
        match result {
            Ok(view) => {
                self.rest = &self.rest[view.bytes.len()..];
                self.index += 1;
                Some(Ok(view))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

fn frame(rest: &[u8], batch: usize) -> Result<BatchView<'_>, RecordBatchError> {
    if rest.len() < LOG_OVERHEAD_BYTES {
        return Err(RecordBatchError::Truncated {
            batch,
            what: "batch length",
        });
    }
    let length = be_i32(rest, 8);
    let size = usize::try_from(length)
        .ok()
        .and_then(|length| length.checked_add(LOG_OVERHEAD_BYTES))
        .filter(|&size| size >= BATCH_HEADER_BYTES)
        .ok_or_else(|| RecordBatchError::Invalid {
            batch,
            what: format!("batch length {length}"),
        })?;
    let bytes = rest.get(..size).ok_or(RecordBatchError::Truncated {
        batch,
        what: "batch",
    })?;
    let magic = bytes[MAGIC_AT] as i8;
    if magic != 2 {
        return Err(RecordBatchError::Magic { batch, magic });
    }
    Ok(BatchView {
        index: batch,
        bytes,
    })
}

/// Checks that `payload` is record batches holding `record_count` records in all (their
/// framing: lengths, magic, counts; not their CRCs, nor each record).
pub fn validate(payload: &[u8], record_count: u32) -> Result<(), RecordBatchError> {
    let mut found = 0u64;
    for batch in batches(payload) {
        found += u64::from(batch?.checked_record_count()?);
    }
    if found != u64::from(record_count) {
        return Err(RecordBatchError::CountMismatch {
            announced: u64::from(record_count),
            found,
        });
    }
    Ok(())
}

/// The CRC-32C of the whole payload (the log's checksum of a batch), from each batch's own
/// CRC: only the bytes before each batch's CRC'd part are read. The batches' CRCs must have
/// been checked against their bytes.
pub fn payload_checksum(payload: &[u8]) -> Result<u32, RecordBatchError> {
    let mut checksum = 0;
    for batch in batches(payload) {
        let batch = batch?;
        checksum = crate::payload::checksum_append(checksum, &batch.bytes[..CRC_START]);
        checksum = crate::payload::checksum_combine(
            checksum,
            batch.stored_crc(),
            batch.bytes.len() - CRC_START,
        );
    }
    Ok(checksum)
}

/// Sets each batch's base offset, the first from `first_offset` on and each next one past
/// the records before it, and its partition leader epoch to 0, as a broker serves batches
/// to a Fetch (the CRC does not cover either). Returns the offset after the last record.
pub fn set_base_offsets(payload: &mut [u8], first_offset: u64) -> Result<u64, RecordBatchError> {
    let mut at = 0;
    let mut offset = first_offset;
    let mut index = 0;
    while at < payload.len() {
        let (size, count) = {
            let view = frame(&payload[at..], index)?;
            (view.bytes.len(), view.checked_record_count()?)
        };
        let batch = &mut payload[at..at + size];
        batch[..8].copy_from_slice(&(offset as i64).to_be_bytes());
        batch[LEADER_EPOCH_AT..LEADER_EPOCH_AT + 4].copy_from_slice(&0i32.to_be_bytes());
        offset += u64::from(count);
        at += size;
        index += 1;
    }
    Ok(offset)
}

/// One record of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// Its offset delta (its index in the batch, checked).
    pub offset_delta: i32,
    /// Its timestamp delta from the batch's base timestamp.
    pub timestamp_delta: i64,
    /// Its key (`None`: null).
    pub key: Option<&'a [u8]>,
    /// Its value (`None`: null, a tombstone).
    pub value: Option<&'a [u8]>,
    /// Its headers, as they are on the wire (checked).
    pub headers: &'a [u8],
    /// How many headers.
    pub header_count: i32,
}

/// Iterator over the records of a batch, see [`BatchView::records`].
#[derive(Debug, Clone)]
pub struct Records<'a> {
    bytes: &'a [u8],
    batch: usize,
    at: usize,
    next: u32,
    count: u32,
    failed: bool,
    /// Why the batch's counts do not hold (yielded first).
    broken: Option<RecordBatchError>,
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, RecordBatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        if let Some(broken) = self.broken.take() {
            self.failed = true;
            return Some(Err(broken));
        }
        if self.next == self.count {
            if self.at != self.bytes.len() {
                self.failed = true;
                return Some(Err(RecordBatchError::Invalid {
                    batch: self.batch,
                    what: format!(
                        "{} bytes after record {}",
                        self.bytes.len() - self.at,
                        self.count - 1
                    ),
                }));
            }
            return None;
        }
        let record = self.record();
        match record {
            Ok(record) => {
                self.next += 1;
                Some(Ok(record))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

impl<'a> Records<'a> {
    fn record(&mut self) -> Result<Record<'a>, RecordBatchError> {
        let (batch, index) = (self.batch, self.next);
        let truncated = |what| RecordBatchError::Truncated { batch, what };
        let invalid = |what: &str| RecordBatchError::Invalid {
            batch,
            what: format!("record {index}: {what}"),
        };
        let mut at = self.at;
        let length = varint32(self.bytes, &mut at).ok_or_else(|| truncated("record length"))?;
        let end = usize::try_from(length)
            .ok()
            .and_then(|length| at.checked_add(length))
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| truncated("record"))?;
        let body = &self.bytes[..end];
        if at >= end {
            return Err(invalid("empty"));
        }
        at += 1; // attributes (unused in magic 2)
        let timestamp_delta =
            varint(body, &mut at, 10).ok_or_else(|| invalid("timestamp delta"))?;
        let offset_delta = varint32(body, &mut at).ok_or_else(|| invalid("offset delta"))?;
        if i64::from(offset_delta) != i64::from(index) {
            return Err(invalid(&format!("offset delta {offset_delta}")));
        }
        let key = bytes_field(body, &mut at).ok_or_else(|| invalid("key"))?;
        let value = bytes_field(body, &mut at).ok_or_else(|| invalid("value"))?;
        let header_count = varint32(body, &mut at)
            .filter(|&count| count >= 0)
            .ok_or_else(|| invalid("header count"))?;
        let headers_start = at;
        for _ in 0..header_count {
            bytes_field(body, &mut at)
                .flatten()
                .ok_or_else(|| invalid("header key"))?;
            bytes_field(body, &mut at).ok_or_else(|| invalid("header value"))?;
        }
        if at != end {
            return Err(invalid(&format!("{} bytes past its fields", end - at)));
        }
        self.at = end;
        Ok(Record {
            offset_delta,
            timestamp_delta,
            key,
            value,
            headers: &body[headers_start..end],
            header_count,
        })
    }
}

/// A length-prefixed field (`Some(None)`: length -1, null); `None` when broken.
fn bytes_field<'a>(bytes: &'a [u8], at: &mut usize) -> Option<Option<&'a [u8]>> {
    let length = varint32(bytes, at)?;
    if length == -1 {
        return Some(None);
    }
    let end = at.checked_add(usize::try_from(length).ok()?)?;
    let field = bytes.get(*at..end)?;
    *at = end;
    Some(Some(field))
}

fn be_i16(bytes: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn be_i32(bytes: &[u8], at: usize) -> i32 {
    i32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn be_i64(bytes: &[u8], at: usize) -> i64 {
    i64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// A zigzag varint of at most `max_bytes` bytes from `bytes[*at..]`; `None` when cut off or
/// longer.
fn varint(bytes: &[u8], at: &mut usize, max_bytes: usize) -> Option<i64> {
    let mut raw = 0u64;
    for index in 0..max_bytes {
        let byte = *bytes.get(*at)?;
        *at += 1;
        raw |= u64::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            return Some((raw >> 1) as i64 ^ -((raw & 1) as i64));
        }
    }
    None
}

fn varint32(bytes: &[u8], at: &mut usize) -> Option<i32> {
    varint(bytes, at, 5).and_then(|v| i32::try_from(v).ok())
}

fn put_varint(out: &mut Vec<u8>, value: i64) {
    let mut raw = ((value << 1) ^ (value >> 63)) as u64;
    while raw >= 0x80 {
        out.push((raw as u8) | 0x80);
        raw >>= 7;
    }
    out.push(raw as u8);
}

/// Appends one uncompressed record batch to `out` holding `values` as records without keys
/// or headers, offsets from `base_offset` on, timestamps -1 (none), no producer.
/// A batch needs at least one value; `out` is left as it was without.
pub fn encode<'v>(out: &mut Vec<u8>, base_offset: u64, values: impl Iterator<Item = &'v [u8]>) {
    let start = out.len();
    out.extend_from_slice(&(base_offset as i64).to_be_bytes());
    out.extend_from_slice(&0i32.to_be_bytes()); // batch length, set below
    out.extend_from_slice(&0i32.to_be_bytes()); // partition leader epoch
    out.push(2); // magic
    out.extend_from_slice(&0u32.to_be_bytes()); // crc, set below
    out.extend_from_slice(&0i16.to_be_bytes()); // attributes: no compression, create time
    out.extend_from_slice(&0i32.to_be_bytes()); // last offset delta, set below
    out.extend_from_slice(&(-1i64).to_be_bytes()); // base timestamp: none
    out.extend_from_slice(&(-1i64).to_be_bytes()); // max timestamp
    out.extend_from_slice(&(-1i64).to_be_bytes()); // producer id
    out.extend_from_slice(&(-1i16).to_be_bytes()); // producer epoch
    out.extend_from_slice(&(-1i32).to_be_bytes()); // base sequence
    out.extend_from_slice(&0i32.to_be_bytes()); // record count, set below
    let mut count = 0i32;
    let mut record = Vec::new();
    for value in values {
        record.clear();
        record.push(0); // attributes
        put_varint(&mut record, 0); // timestamp delta
        put_varint(&mut record, i64::from(count));
        put_varint(&mut record, -1); // no key
        put_varint(&mut record, value.len() as i64);
        record.extend_from_slice(value);
        put_varint(&mut record, 0); // no headers
        put_varint(out, record.len() as i64);
        out.extend_from_slice(&record);
        count += 1;
    }
    if count == 0 {
        out.truncate(start);
        return;
    }
    let batch = &mut out[start..];
    let length = (batch.len() - LOG_OVERHEAD_BYTES) as i32;
    batch[8..12].copy_from_slice(&length.to_be_bytes());
    batch[LAST_OFFSET_DELTA_AT..LAST_OFFSET_DELTA_AT + 4]
        .copy_from_slice(&(count - 1).to_be_bytes());
    batch[RECORD_COUNT_AT..RECORD_COUNT_AT + 4].copy_from_slice(&count.to_be_bytes());
    let crc = crate::payload::checksum(&batch[CRC_START..]);
    batch[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_batches() -> Vec<u8> {
        let mut payload = Vec::new();
        encode(&mut payload, 0, [&b"alpha"[..], b"beta"].into_iter());
        encode(&mut payload, 2, [&b""[..], b"gamma"].into_iter());
        payload
    }

    #[test]
    fn encoded_batches_validate_and_read_back() {
        let payload = two_batches();
        assert_eq!(validate(&payload, 4), Ok(()));
        assert!(matches!(
            validate(&payload, 3),
            Err(RecordBatchError::CountMismatch { found: 4, .. })
        ));
        let values: Vec<Option<&[u8]>> = batches(&payload)
            .flat_map(|batch| batch.unwrap().records())
            .map(|record| record.unwrap().value)
            .collect();
        assert_eq!(
            values,
            vec![
                Some(&b"alpha"[..]),
                Some(b"beta"),
                Some(b""),
                Some(b"gamma")
            ]
        );
        for batch in batches(&payload) {
            let batch = batch.unwrap();
            assert_eq!(batch.stored_crc(), batch.computed_crc());
            assert_eq!(batch.producer(), (-1, -1, -1));
        }
    }

    #[test]
    fn the_payload_checksum_comes_from_the_batch_crcs() {
        let payload = two_batches();
        assert_eq!(
            payload_checksum(&payload),
            Ok(crate::payload::checksum(&payload))
        );
    }

    #[test]
    fn base_offsets_are_set_without_breaking_the_crcs() {
        let mut payload = two_batches();
        let checksum_before = crate::payload::checksum(&payload[CRC_START..]);
        assert_eq!(set_base_offsets(&mut payload, 1000), Ok(1004));
        let bases: Vec<i64> = batches(&payload)
            .map(|batch| be_i64(batch.unwrap().bytes, 0))
            .collect();
        assert_eq!(bases, vec![1000, 1002]);
        for batch in batches(&payload) {
            let batch = batch.unwrap();
            assert_eq!(batch.stored_crc(), batch.computed_crc());
        }
        assert_ne!(checksum_before, 0);
    }

    #[test]
    fn every_cut_and_every_flipped_length_is_an_error_not_a_panic() {
        let payload = two_batches();
        for cut in 1..payload.len() {
            let cut_payload = &payload[..cut];
            let walked: Result<Vec<_>, _> = batches(cut_payload)
                .map(|b| b.and_then(|b| b.records().collect::<Result<Vec<_>, _>>()))
                .collect();
            assert!(
                walked.is_err() || validate(cut_payload, 4).is_err(),
                "cut at {cut}"
            );
        }
        for at in 0..payload.len() {
            let mut flipped = payload.clone();
            flipped[at] ^= 0xff;
            let _ = validate(&flipped, 4);
            for batch in batches(&flipped).flatten() {
                for record in batch.records() {
                    let _ = record;
                }
            }
            let _ = set_base_offsets(&mut flipped, 7);
        }
    }

    #[test]
    fn keys_headers_and_nulls_are_read() {
        // One record: key "k", null value, one header ("h", "v").
        let mut record = vec![0];
        put_varint(&mut record, 5);
        put_varint(&mut record, 0);
        put_varint(&mut record, 1);
        record.push(b'k');
        put_varint(&mut record, -1);
        put_varint(&mut record, 1);
        put_varint(&mut record, 1);
        record.push(b'h');
        put_varint(&mut record, 1);
        record.push(b'v');
        let mut batch = Vec::new();
        encode(&mut batch, 0, [&b"x"[..]].into_iter());
        batch.truncate(BATCH_HEADER_BYTES);
        put_varint(&mut batch, record.len() as i64);
        batch.extend_from_slice(&record);
        let length = (batch.len() - LOG_OVERHEAD_BYTES) as i32;
        batch[8..12].copy_from_slice(&length.to_be_bytes());
        let view = batches(&batch).next().unwrap().unwrap();
        let read = view.records().next().unwrap().unwrap();
        assert_eq!(read.key, Some(&b"k"[..]));
        assert_eq!(read.value, None);
        assert_eq!(
            (read.header_count, read.headers),
            (1, &[2, b'h', 2, b'v'][..])
        );
        assert_eq!(read.timestamp_delta, 5);
    }
}
