//! Kafka record batches (magic 2) as the Kafka listener takes them from producers: the
//! checks a produced partition's batches pass before the log stores them as they came
//! (`wire::record_batch` reads their framing and records; the log's entry marks the
//! payload as record batches, `shared_log::layout::BATCH_RECORD_BATCHES`).
//!
//! Keys, headers, timestamps, null values and compression are stored with the records and
//! served back to Kafka consumers as they came; our own subscribers read each record's
//! value as a message (a compressed batch decompressed on its way to them, see
//! [`stored_values`]). Transactional and control batches are refused with their reason.

use wire::record_batch::{self, BatchView, RecordBatchError};

use super::compression::{self, DECOMPRESSED_BYTES_MAX, DecompressError};

/// Why produced records cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The batches' framing or a record is broken.
    #[error(transparent)]
    Framing(#[from] RecordBatchError),
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
    /// The batch's compressed records do not read.
    #[error("record batch {batch}: {error}")]
    Compressed {
        /// Index of the batch.
        batch: usize,
        /// Why.
        error: DecompressError,
    },
    /// A transactional or control batch.
    #[error("record batch {batch}: transactions are not supported")]
    Transactional {
        /// Index of the batch.
        batch: usize,
    },
    /// An idempotent producer's batches that do not follow each other.
    #[error("record batch {batch}: its producer or sequence does not follow the batch before it")]
    ProducerBreak {
        /// Index of the batch.
        batch: usize,
    },
    /// No batch at all.
    #[error("no record batch")]
    Empty,
}

impl RecordError {
    /// The Kafka error code a Produce answers with.
    pub fn error_code(&self) -> i16 {
        match self {
            RecordError::Framing(RecordBatchError::Truncated { .. }) | RecordError::Crc { .. } => {
                super::error_code::CORRUPT_MESSAGE
            }
            RecordError::Framing(RecordBatchError::Magic { .. }) => {
                super::error_code::UNSUPPORTED_FOR_MESSAGE_FORMAT
            }
            RecordError::Compressed { error, .. } => match error {
                DecompressError::UnknownCodec(_) => super::error_code::UNSUPPORTED_COMPRESSION_TYPE,
                DecompressError::Corrupt { .. } => super::error_code::CORRUPT_MESSAGE,
                DecompressError::TooLarge { .. } => super::error_code::MESSAGE_TOO_LARGE,
            },
            RecordError::Framing(_)
            | RecordError::Transactional { .. }
            | RecordError::ProducerBreak { .. }
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

/// The record batches of one partition of a Produce request, checked: what the log stores
/// (the bytes as they came) and what it needs to know of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Produced<'a> {
    /// The batches, back to back, as the producer sent them.
    pub bytes: &'a [u8],
    /// Records in all.
    pub record_count: u32,
    /// The first batch's producer fields.
    pub producer: ProducerFields,
    /// CRC-32C of `bytes` (the log's checksum of the batch), from the batches' own CRCs.
    pub checksum: u32,
}

/// How much of a produced partition to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Everything: each batch's CRC, framing and records, compressed ones decompressed
    /// (as they arrive).
    Full,
    /// The framing and the producer fields only, of bytes that passed [`Check::Full`]
    /// before (a second look without a second pass over every byte).
    Again,
}

/// Checks the record batches of one partition of a Produce request.
pub fn check_produced(records: &[u8], check: Check) -> Result<Produced<'_>, RecordError> {
    let mut producer: Option<ProducerFields> = None;
    let mut record_count = 0u32;
    let mut decompressed_bytes = 0;
    for batch in record_batch::batches(records) {
        let batch = batch?;
        let index = batch.index;
        if check == Check::Full {
            let (found, stored) = (batch.computed_crc(), batch.stored_crc());
            if found != stored {
                return Err(RecordError::Crc {
                    batch: index,
                    found,
                    stored,
                });
            }
        }
        let batch_records = batch.checked_record_count()?;
        let attributes = batch.attributes();
        let codec = (attributes & 0x7) as u8;
        if codec > 4 {
            return Err(RecordError::Compressed {
                batch: index,
                error: DecompressError::UnknownCodec(codec),
            });
        }
        // Bit 4: transactional; bit 5: a control batch (transaction markers).
        if attributes & 0x30 != 0 {
            return Err(RecordError::Transactional { batch: index });
        }
        let fields = producer_fields(&batch);
        // An idempotent producer's batches of one partition are written as one batch, so
        // they must follow each other: same producer, sequences without a gap.
        match &producer {
            None => producer = Some(fields),
            Some(first) if first.producer_id < 0 && fields.producer_id < 0 => {}
            Some(first)
                if fields.producer_id == first.producer_id
                    && fields.producer_epoch == first.producer_epoch
                    && i64::from(fields.base_sequence)
                        == i64::from(first.base_sequence) + i64::from(record_count) => {}
            Some(_) => return Err(RecordError::ProducerBreak { batch: index }),
        }
        if check == Check::Full {
            if codec == 0 {
                for record in batch.records() {
                    record?;
                }
            } else {
                let limit = DECOMPRESSED_BYTES_MAX - decompressed_bytes;
                let records = decompress_records(&batch, codec, limit)?;
                decompressed_bytes += records.len();
                for record in record_batch::records_in(&records, batch_records, index) {
                    record?;
                }
            }
        }
        record_count = record_count
            .checked_add(batch_records)
            .ok_or(RecordError::Framing(RecordBatchError::Invalid {
                batch: index,
                what: "more than 2^32 records".into(),
            }))?;
    }
    let producer = producer.ok_or(RecordError::Empty)?;
    Ok(Produced {
        bytes: records,
        record_count,
        producer,
        checksum: record_batch::payload_checksum(records)?,
    })
}

/// A compressed batch's records, decompressed into at most `limit` bytes.
fn decompress_records(
    batch: &BatchView<'_>,
    codec: u8,
    limit: usize,
) -> Result<Vec<u8>, RecordError> {
    compression::decompress(
        codec,
        &batch.bytes[record_batch::BATCH_HEADER_BYTES..],
        limit,
    )
    .map_err(|error| RecordError::Compressed {
        batch: batch.index,
        error,
    })
}

/// A stored batch's records: read in place, or from `decompressed` once its records are
/// decompressed (within [`DECOMPRESSED_BYTES_MAX`]).
fn records_of<'b>(
    batch: &BatchView<'b>,
    decompressed: &'b mut Vec<u8>,
) -> Result<record_batch::Records<'b>, RecordError> {
    let codec = (batch.attributes() & 0x7) as u8;
    if codec == 0 {
        return Ok(batch.records());
    }
    let count = batch.checked_record_count()?;
    *decompressed = decompress_records(batch, codec, DECOMPRESSED_BYTES_MAX)?;
    let decompressed: &'b [u8] = decompressed;
    Ok(record_batch::records_in(decompressed, count, batch.index))
}

/// Hands each record's value of stored record batches to `each`, in order (a null value as
/// an empty one), decompressing compressed batches; returns how many there were.
pub fn stored_values(payload: &[u8], mut each: impl FnMut(&[u8])) -> Result<u32, RecordError> {
    let mut count = 0;
    for batch in record_batch::batches(payload) {
        let batch = batch?;
        let mut decompressed = Vec::new();
        for record in records_of(&batch, &mut decompressed)? {
            each(record?.value.unwrap_or_default());
            count += 1;
        }
    }
    Ok(count)
}

/// The first record of `payload`'s record batches at offset `from` or later whose timestamp
/// is at or after `target`, as (offset, timestamp): each record's timestamp is its batch's base timestamp plus its
/// delta (the producer's create time), its offset the batch's base offset plus its delta.
/// A compressed batch is decompressed within [`DECOMPRESSED_BYTES_MAX`], and only a batch
/// whose max timestamp reaches `target`.
pub fn first_at_or_after(
    payload: &[u8],
    target: i64,
    from: i64,
) -> Result<Option<(i64, i64)>, RecordError> {
    for batch in record_batch::batches(payload) {
        let batch = batch?;
        let (base_timestamp, max_timestamp) = batch.timestamps();
        if max_timestamp < target {
            continue;
        }
        let mut decompressed = Vec::new();
        for record in records_of(&batch, &mut decompressed)? {
            let record = record?;
            let timestamp = base_timestamp.saturating_add(record.timestamp_delta);
            let offset = batch.base_offset() + i64::from(record.offset_delta);
            if timestamp >= target && offset >= from {
                return Ok(Some((offset, timestamp)));
            }
        }
    }
    Ok(None)
}

fn producer_fields(batch: &BatchView<'_>) -> ProducerFields {
    let (producer_id, producer_epoch, base_sequence) = batch.producer();
    ProducerFields {
        producer_id,
        producer_epoch,
        base_sequence,
    }
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

    fn values(produced: &Produced<'_>) -> Vec<Option<Vec<u8>>> {
        record_batch::batches(produced.bytes)
            .flat_map(|b| b.unwrap().records())
            .map(|r| r.unwrap().value.map(<[u8]>::to_vec))
            .collect()
    }

    #[test]
    fn a_lookup_by_time_finds_the_first_record_at_or_after_it() {
        // record(i) has timestamp 1_700_000_000_000 + i; the encoder puts records whose
        // offsets and sequences go up together into one batch: two batches, of 2 and 3.
        let records: Vec<Record> = (0..5)
            .map(|i| Record {
                sequence: i as i32,
                ..record(i, None, Some(b"v"))
            })
            .collect();
        for codec in [0, 1, 4] {
            let batch = |records: &[Record]| {
                let plain = client_batch(records, Compression::None);
                match codec {
                    0 => plain,
                    _ => recompressed(&plain, codec, |data| {
                        compression::tests::compress(codec, data)
                    }),
                }
            };
            let mut payload = batch(&records[..2]);
            payload.extend(batch(&records[2..]));
            assert_eq!(record_batch::set_base_offsets(&mut payload, 40), Ok(45));
            assert_eq!(record_batch::batches(&payload).count(), 2);
            let at = |target| first_at_or_after(&payload, target, 0).unwrap();
            assert_eq!(at(0), Some((40, 1_700_000_000_000)), "codec {codec}");
            assert_eq!(
                at(1_700_000_000_001),
                Some((41, 1_700_000_000_001)),
                "codec {codec}"
            );
            assert_eq!(at(1_700_000_000_003), Some((43, 1_700_000_000_003)));
            assert_eq!(at(1_700_000_000_005), None);
            assert_eq!(
                first_at_or_after(&payload, 0, 42).unwrap(),
                Some((42, 1_700_000_000_002))
            );
        }
        // Our own client's batches carry no timestamps (-1): never at or after a time.
        let mut ours = Vec::new();
        record_batch::encode(&mut ours, 7, [b"a".as_slice()].into_iter());
        assert_eq!(first_at_or_after(&ours, 0, 0).unwrap(), None);
    }

    #[test]
    fn a_client_batch_is_taken_as_it_came_with_its_count_and_checksum() {
        let records = [
            record(0, None, Some(b"first")),
            record(1, Some(b"key"), Some(b"")),
            record(2, None, None),
            record(3, None, Some(&[7u8; 300])),
        ];
        let bytes = client_batch(&records, Compression::None);
        let produced = check_produced(&bytes, Check::Full).unwrap();
        assert_eq!(produced.bytes, &bytes[..]);
        assert_eq!(produced.record_count, 4);
        assert_eq!(produced.producer.producer_id, -1);
        assert_eq!(produced.checksum, wire::payload::checksum(&bytes));
        assert_eq!(
            values(&produced),
            vec![
                Some(b"first".to_vec()),
                Some(vec![]),
                None,
                Some(vec![7u8; 300])
            ]
        );
        assert_eq!(check_produced(&bytes, Check::Again), Ok(produced));
    }

    #[test]
    fn two_batches_in_one_partition_are_one_run_of_records() {
        let mut bytes = client_batch(&[record(0, None, Some(b"a"))], Compression::None);
        bytes.extend(client_batch(
            &[record(0, None, Some(b"b")), record(1, None, Some(b"c"))],
            Compression::None,
        ));
        let produced = check_produced(&bytes, Check::Full).unwrap();
        assert_eq!(produced.record_count, 3);
        assert_eq!(produced.checksum, wire::payload::checksum(&bytes));
    }

    /// One batch of `values` whose records are `compress`ed as codec `codec` (its length
    /// and CRC set to match), as a client that compresses sends it.
    fn compressed_batch(
        values: &[&[u8]],
        codec: u8,
        compress: impl Fn(&[u8]) -> Vec<u8>,
    ) -> Vec<u8> {
        let mut plain = Vec::new();
        record_batch::encode(&mut plain, 0, values.iter().copied());
        recompressed(&plain, codec, compress)
    }

    /// The uncompressed batch `plain` with its records `compress`ed as codec `codec`.
    fn recompressed(plain: &[u8], codec: u8, compress: impl Fn(&[u8]) -> Vec<u8>) -> Vec<u8> {
        let mut batch = plain[..record_batch::BATCH_HEADER_BYTES].to_vec();
        batch.extend(compress(&plain[record_batch::BATCH_HEADER_BYTES..]));
        let length = (batch.len() - record_batch::LOG_OVERHEAD_BYTES) as i32;
        batch[8..12].copy_from_slice(&length.to_be_bytes());
        batch[record_batch::ATTRIBUTES_AT + 1] |= codec;
        let crc = wire::payload::checksum(&batch[record_batch::CRC_START..]);
        batch[record_batch::CRC_AT..record_batch::CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
        batch
    }

    #[test]
    fn compressed_batches_are_taken_as_they_came_and_their_values_read_back() {
        let values: Vec<Vec<u8>> = (0..50)
            .map(|i| format!("value-{i}").repeat(i).into_bytes())
            .collect();
        let values: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
        for codec in 1..=4 {
            let batch = compressed_batch(&values, codec, |data| {
                compression::tests::compress(codec, data)
            });
            let produced = check_produced(&batch, Check::Full).unwrap();
            assert_eq!(produced.record_count, 50, "codec {codec}");
            assert_eq!(produced.checksum, wire::payload::checksum(&batch));
            let mut read = Vec::new();
            assert_eq!(stored_values(&batch, |v| read.push(v.to_vec())), Ok(50));
            assert_eq!(read, values, "codec {codec}");
        }
    }

    #[test]
    fn what_the_log_cannot_hold_is_refused_with_its_reason() {
        // A codec Kafka does not define.
        let unknown = compressed_batch(&[b"v"], 5, <[u8]>::to_vec);
        let refused = check_produced(&unknown, Check::Full).unwrap_err();
        assert_eq!(
            refused,
            RecordError::Compressed {
                batch: 0,
                error: DecompressError::UnknownCodec(5)
            }
        );
        assert_eq!(
            refused.error_code(),
            super::super::error_code::UNSUPPORTED_COMPRESSION_TYPE
        );
        // gzip that is not gzip: corrupt.
        let garbage = compressed_batch(&[b"v"], 1, |data| data.to_vec());
        let refused = check_produced(&garbage, Check::Full).unwrap_err();
        assert_eq!(
            refused.error_code(),
            super::super::error_code::CORRUPT_MESSAGE
        );
        // A bomb: a few KiB that decompress past the bound.
        let zeros = vec![0u8; DECOMPRESSED_BYTES_MAX];
        let bomb = compressed_batch(&[&zeros, &zeros], 4, |data| {
            compression::tests::compress(4, data)
        });
        assert!(bomb.len() < 1 << 20);
        let refused = check_produced(&bomb, Check::Full).unwrap_err();
        assert_eq!(
            refused.error_code(),
            super::super::error_code::MESSAGE_TOO_LARGE
        );
        // Records that do not fill the decompressed bytes as the header says.
        let short = compressed_batch(&[b"a", b"b"], 3, |data| {
            compression::tests::compress(3, &data[..data.len() - 2])
        });
        assert!(matches!(
            check_produced(&short, Check::Full),
            Err(RecordError::Framing(_))
        ));
        assert_eq!(check_produced(&[], Check::Full), Err(RecordError::Empty));
    }

    #[test]
    fn a_flipped_bit_or_a_cut_is_refused() {
        let mut bytes = Vec::new();
        record_batch::encode(&mut bytes, 0, [&b"hello"[..], b"world"].into_iter());
        for at in record_batch::CRC_START..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x10;
            let verdict = check_produced(&flipped, Check::Full);
            assert!(
                matches!(verdict, Err(RecordError::Crc { .. })),
                "flip at {at}: {verdict:?}"
            );
        }
        for cut in 1..bytes.len() {
            assert!(
                check_produced(&bytes[..cut], Check::Full).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn encoded_batches_decode_as_kafka_clients_read_them() {
        let messages: Vec<Vec<u8>> =
            vec![b"one".to_vec(), vec![], vec![9u8; 200], vec![1u8; 70_000]];
        let mut out = Vec::new();
        record_batch::encode(&mut out, 42, messages.iter().map(Vec::as_slice));
        record_batch::encode(&mut out, 46, [&b"next"[..]].into_iter());
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
        assert_eq!(check_produced(&out, Check::Full).unwrap().record_count, 5);
    }

    #[test]
    fn a_client_batch_with_its_offsets_set_decodes_with_keys_and_timestamps() {
        let records = [record(0, Some(b"k0"), Some(b"v0")), record(1, None, None)];
        let mut bytes = client_batch(&records, Compression::None);
        record_batch::set_base_offsets(&mut bytes, 500).unwrap();
        // The crate's encoder starts a batch per timestamp: two batches here.
        let mut buf = bytes::Bytes::from(bytes);
        let mut decoded = Vec::new();
        while !buf.is_empty() {
            decoded.extend(RecordBatchDecoder::decode(&mut buf).unwrap().records);
        }
        type Read<'r> = (i64, Option<&'r [u8]>, Option<&'r [u8]>, i64);
        let read: Vec<Read<'_>> = decoded
            .iter()
            .map(|r| (r.offset, r.key.as_deref(), r.value.as_deref(), r.timestamp))
            .collect();
        assert_eq!(
            read,
            vec![
                (500, Some(&b"k0"[..]), Some(&b"v0"[..]), 1_700_000_000_000),
                (501, None, None, 1_700_000_000_001)
            ]
        );
    }
}
