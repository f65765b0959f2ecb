//! Kafka record batches (magic 2), the unit Kafka clients produce and fetch: a checked view
//! of the batches in a Produce request, and the encoder that serves the log's batches to a
//! Fetch.
//!
//! ```text
//! batch   = base_offset:i64 | batch_length:i32 | partition_leader_epoch:i32 | magic:i8
//!           | crc:u32 | attributes:i16 | last_offset_delta:i32 | base_timestamp:i64
//!           | max_timestamp:i64 | producer_id:i64 | producer_epoch:i16 | base_sequence:i32
//!           | record_count:i32 | record*
//! record  = length:varint | attributes:i8 | timestamp_delta:varlong | offset_delta:varint
//!           | key_length:varint | key | value_length:varint | value
//!           | header_count:varint | header*
//! ```
//!
//! Integers are big-endian; varints are zigzag LEB128. `batch_length` counts the bytes after
//! it; the CRC-32C covers the bytes from `attributes` to the end, so a server may set the
//! base offset (and the leader epoch) without touching it.
//!
//! What the log stores is a message's bytes: a record's value. A record with a key or
//! headers, a compressed, transactional or control batch is refused with its reason (none
//! is stored yet, and dropping any of it silently would lose what the client sent).

/// Bytes of a batch up to and including `batch_length`: what `batch_length` does not count.
pub const LOG_OVERHEAD_BYTES: usize = 12;
/// Bytes of a batch's header, up to and including `record_count`.
pub const BATCH_HEADER_BYTES: usize = 61;
/// Where the part the CRC covers begins (`attributes`).
const CRC_START: usize = 21;
/// A batch's CRC.
const CRC_AT: usize = 17;
/// The magic byte of record batches.
const MAGIC_AT: usize = 16;
const ATTRIBUTES_AT: usize = 21;
const LAST_OFFSET_DELTA_AT: usize = 23;
const PRODUCER_ID_AT: usize = 43;
const PRODUCER_EPOCH_AT: usize = 51;
const BASE_SEQUENCE_AT: usize = 53;
const RECORD_COUNT_AT: usize = 57;

/// Why produced records cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The bytes end inside a batch or a record.
    #[error("record batch {batch}: cut off ({what})")]
    Truncated {
        /// Index of the batch in the request's records.
        batch: usize,
        /// What was being read.
        what: &'static str,
    },
    /// Not a record batch of magic 2 (the only format of Produce from version 3 on).
    #[error("record batch {batch}: magic {magic}, only 2 is taken")]
    Magic {
        /// Index of the batch.
        batch: usize,
        /// The magic byte found.
        magic: i8,
    },
    /// The CRC-32C does not match the batch.
    #[error("record batch {batch}: CRC {found:#010x}, the batch says {stored:#010x}")]
    Crc {
        /// Index of the batch.
        batch: usize,
        /// CRC of the bytes.
        found: u32,
        /// CRC in the batch.
        stored: u32,
    },
    /// A length, count or delta that contradicts the batch.
    #[error("record batch {batch}: {what}")]
    Invalid {
        /// Index of the batch.
        batch: usize,
        /// What is wrong.
        what: String,
    },
    /// The batch is compressed.
    #[error(
        "record batch {batch}: compression codec {codec} is not taken yet; produce uncompressed"
    )]
    Compressed {
        /// Index of the batch.
        batch: usize,
        /// The codec (1 gzip, 2 snappy, 3 lz4, 4 zstd).
        codec: u8,
    },
    /// A transactional or control batch.
    #[error("record batch {batch}: transactions are not supported")]
    Transactional {
        /// Index of the batch.
        batch: usize,
    },
    /// A record with a key or headers.
    #[error(
        "record batch {batch}, record {record}: keys and headers are not stored; produce values only"
    )]
    KeyOrHeaders {
        /// Index of the batch.
        batch: usize,
        /// Index of the record in its batch.
        record: usize,
    },
    /// A record without a value (a tombstone: nothing to store).
    #[error("record batch {batch}, record {record}: a null value has nothing to store")]
    NullValue {
        /// Index of the batch.
        batch: usize,
        /// Index of the record in its batch.
        record: usize,
    },
    /// No batch at all.
    #[error("no record batch")]
    Empty,
}

impl RecordError {
    /// The Kafka error code a Produce answers with.
    pub fn error_code(&self) -> i16 {
        match self {
            RecordError::Truncated { .. } | RecordError::Crc { .. } => {
                super::error_code::CORRUPT_MESSAGE
            }
            RecordError::Magic { .. } => super::error_code::UNSUPPORTED_FOR_MESSAGE_FORMAT,
            RecordError::Compressed { .. } => super::error_code::UNSUPPORTED_COMPRESSION_TYPE,
            RecordError::Transactional { .. }
            | RecordError::Invalid { .. }
            | RecordError::KeyOrHeaders { .. }
            | RecordError::NullValue { .. }
            | RecordError::Empty => super::error_code::INVALID_RECORD,
        }
    }
}

/// The producer fields of a batch (`producer_id` -1: not an idempotent producer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerFields {
    /// Producer id from InitProducerId, or -1.
    pub producer_id: i64,
    /// Its epoch.
    pub producer_epoch: i16,
    /// Sequence of the batch's first record.
    pub base_sequence: i32,
}

/// The records of one partition of a Produce request, checked: their values, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducedValues<'a> {
    /// Each record's value.
    pub values: Vec<&'a [u8]>,
    /// The first batch's producer fields.
    pub producer: ProducerFields,
}

impl ProducedValues<'_> {
    /// Bytes of these values as length-prefixed messages (see `wire::payload`).
    pub fn payload_bytes(&self) -> u64 {
        self.values
            .iter()
            .map(|v| (wire::payload::MESSAGE_PREFIX_BYTES + v.len()) as u64)
            .sum()
    }

    /// Writes the values as length-prefixed messages into `dest`, which is
    /// [`Self::payload_bytes`] long; returns the payload's CRC-32C (`wire::payload::checksum`),
    /// taken as each message is written, while it is in cache.
    pub fn write_payload(&self, dest: &mut [u8]) -> u32 {
        let mut at = 0;
        let mut checksum = 0;
        for value in &self.values {
            let prefix = wire::payload::MESSAGE_PREFIX_BYTES;
            let message = &mut dest[at..at + prefix + value.len()];
            message[..prefix].copy_from_slice(&(value.len() as u32).to_le_bytes());
            message[prefix..].copy_from_slice(value);
            checksum = wire::payload::checksum_append(checksum, message);
            at += prefix + value.len();
        }
        debug_assert_eq!(at, dest.len());
        checksum
    }
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

/// Checks the record batches of one partition of a Produce request and takes out their
/// values, in order.
pub fn produced_values(records: &[u8]) -> Result<ProducedValues<'_>, RecordError> {
    values_of(records, true)
}

/// The values of records [`produced_values`] already checked, without checking their CRC
/// again (a second pass over every byte): the framing is still checked as it is walked.
pub fn checked_values(records: &[u8]) -> Result<ProducedValues<'_>, RecordError> {
    values_of(records, false)
}

fn values_of(records: &[u8], check_crc: bool) -> Result<ProducedValues<'_>, RecordError> {
    let mut values = Vec::new();
    let mut producer = None;
    let mut rest = records;
    let mut batch = 0;
    while !rest.is_empty() {
        let truncated = |what| RecordError::Truncated { batch, what };
        if rest.len() < LOG_OVERHEAD_BYTES {
            return Err(truncated("batch length"));
        }
        let length = be_i32(rest, 8);
        let size = usize::try_from(length)
            .ok()
            .map(|length| length + LOG_OVERHEAD_BYTES)
            .filter(|&size| size >= BATCH_HEADER_BYTES)
            .ok_or_else(|| RecordError::Invalid {
                batch,
                what: format!("batch length {length}"),
            })?;
        let bytes = rest.get(..size).ok_or_else(|| truncated("batch"))?;
        rest = &rest[size..];
        let magic = bytes[MAGIC_AT] as i8;
        if magic != 2 {
            return Err(RecordError::Magic { batch, magic });
        }
        let stored = u32::from_be_bytes(bytes[CRC_AT..CRC_AT + 4].try_into().expect("4 bytes"));
        let found = if check_crc {
            crc32c::crc32c(&bytes[CRC_START..])
        } else {
            stored
        };
        if found != stored {
            return Err(RecordError::Crc {
                batch,
                found,
                stored,
            });
        }
        let attributes = be_i16(bytes, ATTRIBUTES_AT);
        let codec = (attributes & 0x7) as u8;
        if codec != 0 {
            return Err(RecordError::Compressed { batch, codec });
        }
        // Bit 4: transactional; bit 5: a control batch (transaction markers).
        if attributes & 0x30 != 0 {
            return Err(RecordError::Transactional { batch });
        }
        let fields = ProducerFields {
            producer_id: be_i64(bytes, PRODUCER_ID_AT),
            producer_epoch: be_i16(bytes, PRODUCER_EPOCH_AT),
            base_sequence: be_i32(bytes, BASE_SEQUENCE_AT),
        };
        // An idempotent producer's batches of one partition are written as one batch, so
        // they must follow each other: same producer, sequences without a gap.
        match &producer {
            None => producer = Some(fields),
            Some(first) if first.producer_id < 0 && fields.producer_id < 0 => {}
            Some(first)
                if fields.producer_id == first.producer_id
                    && fields.producer_epoch == first.producer_epoch
                    && i64::from(fields.base_sequence)
                        == i64::from(first.base_sequence) + values.len() as i64 => {}
            Some(_) => {
                return Err(RecordError::Invalid {
                    batch,
                    what: "its producer or sequence does not follow the batch before it".into(),
                });
            }
        }
        let count = be_i32(bytes, RECORD_COUNT_AT);
        let last_offset_delta = be_i32(bytes, LAST_OFFSET_DELTA_AT);
        if count <= 0 || last_offset_delta != count - 1 {
            return Err(RecordError::Invalid {
                batch,
                what: format!("{count} records, last offset delta {last_offset_delta}"),
            });
        }
        let mut at = BATCH_HEADER_BYTES;
        for record in 0..count as usize {
            let length = varint32(bytes, &mut at).ok_or_else(|| truncated("record length"))?;
            let end = usize::try_from(length)
                .ok()
                .and_then(|length| at.checked_add(length))
                .filter(|&end| end <= bytes.len())
                .ok_or_else(|| truncated("record"))?;
            let body = &bytes[..end];
            let invalid = |what: String| RecordError::Invalid { batch, what };
            at += 1; // attributes (unused in magic 2)
            varint(body, &mut at, 10)
                .ok_or_else(|| invalid(format!("record {record}: timestamp delta")))?;
            let offset_delta = varint32(body, &mut at)
                .ok_or_else(|| invalid(format!("record {record}: offset delta")))?;
            if offset_delta != record as i32 {
                return Err(invalid(format!(
                    "record {record} has offset delta {offset_delta}"
                )));
            }
            let key_length = varint32(body, &mut at)
                .ok_or_else(|| invalid(format!("record {record}: key length")))?;
            if key_length != -1 {
                return Err(RecordError::KeyOrHeaders { batch, record });
            }
            let value_length = varint32(body, &mut at)
                .ok_or_else(|| invalid(format!("record {record}: value length")))?;
            if value_length == -1 {
                return Err(RecordError::NullValue { batch, record });
            }
            let value_end = usize::try_from(value_length)
                .ok()
                .and_then(|length| at.checked_add(length))
                .filter(|&value_end| value_end <= end)
                .ok_or_else(|| invalid(format!("record {record}: value length {value_length}")))?;
            let value = &body[at..value_end];
            at = value_end;
            let headers = varint32(body, &mut at)
                .ok_or_else(|| invalid(format!("record {record}: header count")))?;
            if headers != 0 {
                return Err(RecordError::KeyOrHeaders { batch, record });
            }
            if at != end {
                return Err(invalid(format!(
                    "record {record}: {} bytes past its fields",
                    end as i64 - at as i64
                )));
            }
            values.push(value);
        }
        if at != bytes.len() {
            return Err(RecordError::Invalid {
                batch,
                what: format!("{} bytes after record {}", bytes.len() - at, count - 1),
            });
        }
        batch += 1;
    }
    let producer = producer.ok_or(RecordError::Empty)?;
    Ok(ProducedValues { values, producer })
}

fn put_varint(out: &mut Vec<u8>, value: i64) {
    let mut raw = ((value << 1) ^ (value >> 63)) as u64;
    while raw >= 0x80 {
        out.push((raw as u8) | 0x80);
        raw >>= 7;
    }
    out.push(raw as u8);
}

fn varint_bytes(value: i64) -> usize {
    let raw = ((value << 1) ^ (value >> 63)) as u64;
    (64 - raw.max(1).leading_zeros() as usize).div_ceil(7)
}

/// Appends one record batch to `out` holding `messages` (values without keys or headers,
/// offsets from `base_offset` on, no timestamp: -1), as a Fetch serves a batch of the log.
/// `count` is how many the caller expects; the header says how many there were (a batch
/// overwritten while it is read may yield fewer, and is then discarded by the caller).
pub fn encode_batch<'m>(
    out: &mut Vec<u8>,
    base_offset: u64,
    count: usize,
    messages: impl Iterator<Item = &'m [u8]>,
) {
    let start = out.len();
    out.extend_from_slice(&(base_offset as i64).to_be_bytes());
    out.extend_from_slice(&0i32.to_be_bytes()); // batch length, set below
    out.extend_from_slice(&0i32.to_be_bytes()); // partition leader epoch
    out.push(2); // magic
    out.extend_from_slice(&0u32.to_be_bytes()); // crc, set below
    out.extend_from_slice(&0i16.to_be_bytes()); // attributes: no compression, create time
    out.extend_from_slice(&(count as i32 - 1).to_be_bytes());
    out.extend_from_slice(&(-1i64).to_be_bytes()); // base timestamp: none stored
    out.extend_from_slice(&(-1i64).to_be_bytes()); // max timestamp
    out.extend_from_slice(&(-1i64).to_be_bytes()); // producer id
    out.extend_from_slice(&(-1i16).to_be_bytes()); // producer epoch
    out.extend_from_slice(&(-1i32).to_be_bytes()); // base sequence
    out.extend_from_slice(&(count as i32).to_be_bytes());
    let mut written = 0;
    for (delta, value) in messages.enumerate() {
        written += 1;
        // attributes, timestamp delta 0, offset delta, key -1, value, no headers
        let body_bytes = 1
            + 1
            + varint_bytes(delta as i64)
            + 1
            + varint_bytes(value.len() as i64)
            + value.len()
            + 1;
        put_varint(out, body_bytes as i64);
        out.push(0);
        put_varint(out, 0);
        put_varint(out, delta as i64);
        put_varint(out, -1);
        put_varint(out, value.len() as i64);
        out.extend_from_slice(value);
        put_varint(out, 0);
    }
    if written != count {
        let written = written as i32;
        out[start + LAST_OFFSET_DELTA_AT..start + LAST_OFFSET_DELTA_AT + 4]
            .copy_from_slice(&(written - 1).to_be_bytes());
        out[start + RECORD_COUNT_AT..start + RECORD_COUNT_AT + 4]
            .copy_from_slice(&written.to_be_bytes());
    }
    let length = (out.len() - start - LOG_OVERHEAD_BYTES) as i32;
    out[start + 8..start + 12].copy_from_slice(&length.to_be_bytes());
    let crc = crc32c::crc32c(&out[start + CRC_START..]);
    out[start + CRC_AT..start + CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
}

#[cfg(test)]
pub(super) mod tests {
    use bytes::BytesMut;
    use kafka_protocol::records::{
        Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions,
        TimestampType,
    };

    use super::*;

    pub(crate) fn record(offset: i64, key: Option<&[u8]>, value: Option<&[u8]>) -> Record {
        Record {
            transactional: false,
            control: false,
            partition_leader_epoch: 0,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset,
            sequence: -1,
            timestamp: 1_700_000_000_000 + offset,
            key: key.map(bytes::Bytes::copy_from_slice),
            value: value.map(bytes::Bytes::copy_from_slice),
            headers: Default::default(),
        }
    }

    /// Batches as a client library encodes them (the kafka-protocol crate's encoder).
    pub(crate) fn client_batch(records: &[Record], compression: Compression) -> Vec<u8> {
        let mut out = BytesMut::new();
        let options = RecordEncodeOptions {
            version: 2,
            compression,
        };
        RecordBatchEncoder::encode(&mut out, records.iter(), &options).unwrap();
        out.to_vec()
    }

    #[test]
    fn values_of_a_client_batch_come_out_in_order() {
        let records = [
            record(0, None, Some(b"first")),
            record(1, None, Some(b"")),
            record(2, None, Some(&[7u8; 300])),
        ];
        let bytes = client_batch(&records, Compression::None);
        let produced = produced_values(&bytes).unwrap();
        assert_eq!(
            produced.values,
            vec![&b"first"[..], &b""[..], &[7u8; 300][..]]
        );
        assert_eq!(produced.producer.producer_id, -1);
        let mut payload = vec![0u8; produced.payload_bytes() as usize];
        let checksum = produced.write_payload(&mut payload);
        assert_eq!(checksum, wire::payload::checksum(&payload));
        let messages: Vec<&[u8]> = wire::payload::messages(&payload)
            .map(Result::unwrap)
            .collect();
        assert_eq!(messages, produced.values);
    }

    #[test]
    fn two_batches_in_one_partition_are_one_run_of_values() {
        let mut bytes = client_batch(&[record(0, None, Some(b"a"))], Compression::None);
        bytes.extend(client_batch(
            &[record(0, None, Some(b"b")), record(1, None, Some(b"c"))],
            Compression::None,
        ));
        assert_eq!(
            produced_values(&bytes).unwrap().values,
            vec![&b"a"[..], b"b", b"c"]
        );
    }

    #[test]
    fn what_the_log_cannot_hold_is_refused_with_its_reason() {
        let keyed = client_batch(&[record(0, Some(b"k"), Some(b"v"))], Compression::None);
        assert_eq!(
            produced_values(&keyed),
            Err(RecordError::KeyOrHeaders {
                batch: 0,
                record: 0
            })
        );
        let tombstone = client_batch(&[record(0, None, None)], Compression::None);
        assert!(matches!(
            produced_values(&tombstone),
            Err(RecordError::NullValue { .. })
        ));
        let mut compressed = client_batch(&[record(0, None, Some(b"v"))], Compression::None);
        compressed[ATTRIBUTES_AT + 1] |= 1;
        let crc = crc32c::crc32c(&compressed[CRC_START..]);
        compressed[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(
            produced_values(&compressed),
            Err(RecordError::Compressed { batch: 0, codec: 1 })
        );
        assert_eq!(produced_values(&[]), Err(RecordError::Empty));
    }

    #[test]
    fn a_flipped_bit_or_a_cut_is_refused() {
        // One batch of two records (the crate's encoder starts a batch per timestamp; a
        // batch's base offset is outside its CRC, since a server sets it).
        let mut bytes = Vec::new();
        encode_batch(&mut bytes, 0, 2, [&b"hello"[..], b"world"].into_iter());
        for at in CRC_START..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x10;
            let verdict = produced_values(&flipped);
            assert!(
                matches!(verdict, Err(RecordError::Crc { .. })),
                "flip at {at}: {verdict:?}"
            );
        }
        for cut in 1..bytes.len() {
            assert!(produced_values(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn encoded_batches_decode_as_kafka_clients_read_them() {
        let messages: Vec<Vec<u8>> =
            vec![b"one".to_vec(), vec![], vec![9u8; 200], vec![1u8; 70_000]];
        let mut out = Vec::new();
        encode_batch(
            &mut out,
            42,
            messages.len(),
            messages.iter().map(Vec::as_slice),
        );
        encode_batch(&mut out, 46, 1, [&b"next"[..]].into_iter());
        let mut buf = bytes::Bytes::from(out.clone());
        let first = RecordBatchDecoder::decode(&mut buf).unwrap();
        let offsets: Vec<i64> = first.records.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, vec![42, 43, 44, 45]);
        for (record, message) in first.records.iter().zip(&messages) {
            assert_eq!(record.value.as_deref(), Some(&message[..]));
            assert!(record.key.is_none());
        }
        let second = RecordBatchDecoder::decode(&mut buf).unwrap();
        assert_eq!(second.records[0].offset, 46);
        // Our own view reads them back too.
        let values = produced_values(&out).unwrap().values;
        assert_eq!(values.len(), 5);
        assert_eq!(values[4], b"next");
    }

    #[test]
    fn a_batch_says_how_many_records_it_holds_when_fewer_came() {
        // A payload overwritten while it is read may yield fewer messages than its count.
        let mut out = Vec::new();
        encode_batch(&mut out, 7, 3, [&b"a"[..], b"b"].into_iter());
        let values = produced_values(&out).unwrap().values;
        assert_eq!(values, vec![&b"a"[..], b"b"]);
    }

    #[test]
    fn varints_match_kafkas() {
        for value in [
            0i64,
            -1,
            1,
            63,
            64,
            -65,
            300,
            i32::MAX as i64,
            i32::MIN as i64,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!(out.len(), varint_bytes(value), "{value}");
            let mut at = 0;
            assert_eq!(varint(&out, &mut at, 10), Some(value));
            assert_eq!(at, out.len());
        }
    }
}
