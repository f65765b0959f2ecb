//! History from disk: a topic's batches older than the pool holds, read back from this
//! broker's replica file in the same global order and with the same bytes.
//!
//! A [`HistoryReader`] does bounded work per call, so that a subscriber starting from an old
//! position cannot hold the network loop: finding the batch that holds the wanted position
//! skips at most [`HEADERS_PER_STEP`] record headers per call, and reading hands out at most
//! the batches and bytes it is given. It reads only what the replica published as durable
//! (its frontier in the pool, after `fdatasync`), never a record still being written, and
//! checks each as the replica's own open does (header CRC, ordinal, payload CRC): a bad one
//! there is damage, reported, never handed out.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytemuck::Zeroable;
use shared_log::pool::TopicId;
use shared_log::reader::OrderedBatch;

use super::replica::{self, RECORD_HEADER_BYTES, RecordHeader};

/// Record headers skipped per [`HistoryReader::poll`] while it looks for its start.
pub const HEADERS_PER_STEP: usize = 4096;

/// Why history cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// This broker keeps no replica of the topic.
    #[error("this broker keeps no replica of topic {topic}")]
    NotReplicated {
        /// The topic.
        topic: TopicId,
    },
    /// The replica starts after the position asked for.
    #[error("position {position} is not on disk either: the replica starts at {start}")]
    BeforeStart {
        /// Position asked for.
        position: u64,
        /// First position the replica holds.
        start: u64,
    },
    /// Retention deleted the segment the reader was to read next (it fell behind the oldest
    /// history kept).
    #[error(
        "batch {ordinal} is no longer on disk: retention deleted it; the log starts at {start}"
    )]
    Deleted {
        /// The batch.
        ordinal: u64,
        /// First position the replica holds now.
        start: u64,
    },
    /// Reading the file failed.
    #[error("replica {path}: {what}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// A record that should be complete is damaged.
    #[error("replica {path}: the record of batch {ordinal} at byte {offset} is damaged")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// Ordinal expected there.
        ordinal: u64,
        /// Its byte offset.
        offset: u64,
    },
}

/// A cursor over one topic's replica segments, from the batch that holds a given position.
#[derive(Debug)]
pub struct HistoryReader {
    dir: PathBuf,
    topic: TopicId,
    /// The segment read now.
    path: PathBuf,
    file: File,
    /// Byte offset of the next record in it.
    offset: u64,
    /// Ordinal of the next record.
    next_ordinal: u64,
    /// First ordinal of the segment after this one, once seen.
    next_segment: Option<u64>,
    /// While looking for the start: the position whose batch comes first.
    seeking: Option<u64>,
    /// The first position the log held when it was opened.
    start_position: u64,
}

/// Opens a segment for reading; `None` when it is gone (deleted by retention).
fn open_segment(path: &Path) -> Result<Option<File>, HistoryError> {
    match File::open(path) {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(HistoryError::Io {
            path: path.to_owned(),
            what: "open",
            source,
        }),
    }
}

/// Where the replica of `topic` in `dir` starts now: the first position of its oldest
/// segment with a record, and the segments' first ordinals with the index of that one.
fn log_start(dir: &Path, topic: TopicId) -> Result<Option<(u64, Vec<u64>, usize)>, HistoryError> {
    let segments = replica::segment_list(dir, topic).map_err(|source| HistoryError::Io {
        path: dir.to_owned(),
        what: "list",
        source,
    })?;
    for (index, &first) in segments.iter().enumerate() {
        let path = replica::segment_path(dir, topic, first);
        match replica::first_header(&path) {
            Ok(Some(header)) => return Ok(Some((header.global_start, segments, index))),
            Ok(None) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(HistoryError::Io {
                    path,
                    what: "read",
                    source,
                });
            }
        }
    }
    Ok(None)
}

impl HistoryReader {
    /// Opens the replica of `topic` in `dir` for reading from the batch that holds
    /// `position`. Errors when there is no replica, or when it starts after `position`.
    pub fn open(dir: &Path, topic: TopicId, position: u64) -> Result<HistoryReader, HistoryError> {
        // A segment deleted between the listing and its opening: list again.
        for _ in 0..3 {
            let Some((start, segments, oldest)) = log_start(dir, topic)? else {
                return Err(HistoryError::NotReplicated { topic });
            };
            if position < start {
                return Err(HistoryError::BeforeStart { position, start });
            }
            // The newest segment whose first record is at or before the position.
            let mut chosen = None;
            for index in (oldest..segments.len()).rev() {
                let path = replica::segment_path(dir, topic, segments[index]);
                match replica::first_header(&path) {
                    Ok(Some(header)) if header.global_start <= position => {
                        chosen = Some((index, header));
                        break;
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(source) => {
                        return Err(HistoryError::Io {
                            path,
                            what: "read",
                            source,
                        });
                    }
                }
            }
            let Some((index, first)) = chosen else {
                continue;
            };
            let path = replica::segment_path(dir, topic, segments[index]);
            let Some(file) = open_segment(&path)? else {
                continue;
            };
            return Ok(HistoryReader {
                dir: dir.to_owned(),
                topic,
                path,
                file,
                offset: 0,
                next_ordinal: first.ordinal,
                next_segment: segments.get(index + 1).copied(),
                seeking: Some(position),
                start_position: start,
            });
        }
        Err(HistoryError::Io {
            path: dir.to_owned(),
            what: "open (segments kept being deleted under the reader)",
            source: std::io::ErrorKind::NotFound.into(),
        })
    }

    /// Ordinal of the next batch it hands out (meaningful once it found its start).
    pub fn next_ordinal(&self) -> u64 {
        self.next_ordinal
    }

    /// The first position the replica held when it was opened (where the log starts on
    /// disk).
    pub fn start_position(&self) -> u64 {
        self.start_position
    }

    /// Whether it is still looking for the batch it starts with.
    pub fn is_seeking(&self) -> bool {
        self.seeking.is_some()
    }

    /// The valid header at `offset`, or `None` where the segment ends or a record is still
    /// being written.
    fn header_at(&self, offset: u64) -> Result<Option<RecordHeader>, HistoryError> {
        let mut header = RecordHeader::zeroed();
        if !self.read_at(bytemuck::bytes_of_mut(&mut header), offset)? {
            return Ok(None);
        }
        Ok(header.is_valid().then_some(header))
    }

    /// Fills `buf` from `offset`; false when the segment ends first.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<bool, HistoryError> {
        match self.file.read_exact_at(buf, offset) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
            Err(source) => Err(HistoryError::Io {
                path: self.path.clone(),
                what: "read",
                source,
            }),
        }
    }

    /// Moves on to the segment that begins with the next ordinal, if there is one; a segment
    /// that retention deleted before the reader got there is [`HistoryError::Deleted`].
    fn next_segment_begins(&mut self) -> Result<bool, HistoryError> {
        if self.next_segment != Some(self.next_ordinal) {
            let segments = replica::segment_list(&self.dir, self.topic).map_err(|source| {
                HistoryError::Io {
                    path: self.dir.clone(),
                    what: "list",
                    source,
                }
            })?;
            self.next_segment = segments
                .into_iter()
                .find(|&first| first >= self.next_ordinal);
            if self.next_segment != Some(self.next_ordinal) {
                // A later segment, and the one read now is gone: retention deleted the
                // segments between (with this file still here, the gap is damage).
                if self.next_segment.is_some() && !self.path.exists() {
                    return Err(self.deleted()?);
                }
                return Ok(false);
            }
        }
        let path = replica::segment_path(&self.dir, self.topic, self.next_ordinal);
        let Some(file) = open_segment(&path)? else {
            return Err(self.deleted()?);
        };
        self.path = path;
        self.file = file;
        self.offset = 0;
        self.next_segment = None;
        Ok(true)
    }

    /// The error for a next batch that retention deleted, naming where the log starts now.
    fn deleted(&self) -> Result<HistoryError, HistoryError> {
        let start = log_start(&self.dir, self.topic)?.map_or(u64::MAX, |(start, ..)| start);
        Ok(HistoryError::Deleted {
            ordinal: self.next_ordinal,
            start,
        })
    }

    /// The header of the next record, which is below the durable end: missing or damaged,
    /// it is an error. At a segment's end it moves on to the next segment.
    fn next_header(&mut self) -> Result<RecordHeader, HistoryError> {
        if self.next_segment == Some(self.next_ordinal) {
            self.next_segment_begins()?;
        }
        match self.header_at(self.offset)? {
            Some(header) if header.ordinal == self.next_ordinal => return Ok(header),
            _ => {}
        }
        // The end of this segment (or its padding): the record is in the next one.
        if self.offset > 0
            && self.next_segment_begins()?
            && let Some(header) = self.header_at(self.offset)?
            && header.ordinal == self.next_ordinal
        {
            return Ok(header);
        }
        Err(self.damaged())
    }

    fn damaged(&self) -> HistoryError {
        HistoryError::Damaged {
            path: self.path.clone(),
            ordinal: self.next_ordinal,
            offset: self.offset,
        }
    }

    /// Skips records before the wanted position, at most [`HEADERS_PER_STEP`] and none at or
    /// past `ordinal_end`; true once the next record is the first to hand out.
    fn seek_step(&mut self, ordinal_end: u64) -> Result<bool, HistoryError> {
        let Some(position) = self.seeking else {
            return Ok(true);
        };
        for _ in 0..HEADERS_PER_STEP {
            if self.next_ordinal >= ordinal_end {
                return Ok(false);
            }
            let header = self.next_header()?;
            if header.global_start + u64::from(header.message_count) > position {
                self.seeking = None;
                return Ok(true);
            }
            self.offset += (RECORD_HEADER_BYTES as u64) + u64::from(header.payload_bytes);
            self.next_ordinal += 1;
        }
        Ok(false)
    }

    /// Hands the next batches in order to `f`: those below `ordinal_end` (the replica's
    /// durable batches), at most `batches_max`, and no more once `bytes_max` payload bytes
    /// went out (the first batch always goes). Returns how many; 0 while it looks for its
    /// start or when it reached `ordinal_end`.
    pub fn poll(
        &mut self,
        batches_max: usize,
        bytes_max: u64,
        ordinal_end: u64,
        mut f: impl FnMut(&OrderedBatch<'_>),
    ) -> Result<usize, HistoryError> {
        if !self.seek_step(ordinal_end)? {
            return Ok(0);
        }
        let (mut handed, mut bytes) = (0, 0u64);
        let mut payload = Vec::new();
        while handed < batches_max
            && (handed == 0 || bytes < bytes_max)
            && self.next_ordinal < ordinal_end
        {
            let header = self.next_header()?;
            payload.resize(header.payload_bytes as usize, 0);
            let payload_offset = self.offset + RECORD_HEADER_BYTES as u64;
            if !self.read_at(&mut payload, payload_offset)?
                || wire::payload::checksum(&payload) != header.checksum
            {
                return Err(self.damaged());
            }
            f(&header.batch(&payload));
            self.offset = payload_offset + payload.len() as u64;
            self.next_ordinal += 1;
            handed += 1;
            bytes += payload.len() as u64;
        }
        Ok(handed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::replica::ReplicaLog;
    use shared_log::HistoryRetention;
    use shared_log::pool::LogOrigin;
    use units::Timestamp;

    /// Batch `ordinal` of a test log: 3 messages each, payloads of varying sizes.
    fn payload(ordinal: u64) -> Vec<u8> {
        let message = vec![ordinal as u8; 100 + (ordinal as usize * 37) % 900];
        let mut payload = Vec::new();
        for _ in 0..3 {
            payload.extend_from_slice(&(message.len() as u32).to_le_bytes());
            payload.extend_from_slice(&message);
        }
        payload
    }

    fn batch(ordinal: u64, payload: &[u8]) -> OrderedBatch<'_> {
        OrderedBatch {
            pool_offset: 0,
            blog_offset: 0,
            ordinal,
            global_start: ordinal * 3,
            message_count: 3,
            broker: 2,
            client_id: 9,
            session_epoch: 1,
            batch_seq: ordinal,
            flags: 0,
            checksum: wire::payload::checksum(payload),
            payload,
        }
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir()
                .join(format!("embarcadero-history-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn write_log(dir: &Path, batches: u64) {
        write_segments(dir, batches, u64::MAX);
    }

    /// Writes batches `0..batches`, syncing after each, in segments of `segment_bytes`.
    fn write_segments(dir: &Path, batches: u64, segment_bytes: u64) -> ReplicaLog {
        let mut log = ReplicaLog::open(dir, 0, LogOrigin::default(), segment_bytes).unwrap();
        for ordinal in 0..batches {
            log.append(&batch(ordinal, &payload(ordinal)), Timestamp::now())
                .unwrap();
            if segment_bytes != u64::MAX {
                log.sync().unwrap();
            }
        }
        log.sync().unwrap();
        log
    }

    /// Every batch from `reader` on below `end`, as (ordinal, global_start, payload),
    /// `per_poll` at a time.
    fn read_all(reader: &mut HistoryReader, per_poll: usize, end: u64) -> Vec<(u64, u64, Vec<u8>)> {
        let mut out = Vec::new();
        let mut idle = 0;
        while idle < 3 {
            let handed = reader
                .poll(per_poll, u64::MAX, end, |b| {
                    out.push((b.ordinal, b.global_start, b.payload.to_vec()))
                })
                .unwrap();
            idle = if handed == 0 { idle + 1 } else { 0 };
        }
        out
    }

    #[test]
    fn reads_from_the_batch_holding_the_position_in_order_with_the_bytes_written() {
        let dir = TempDir::new("order");
        write_log(&dir.0, 50);
        for position in [0, 1, 2, 3, 77, 149] {
            let mut reader = HistoryReader::open(&dir.0, 0, position).unwrap();
            let read = read_all(&mut reader, 7, 50);
            let first = position / 3;
            assert_eq!(read.len() as u64, 50 - first, "from position {position}");
            for (i, (ordinal, global_start, bytes)) in read.into_iter().enumerate() {
                let expected = first + i as u64;
                assert_eq!((ordinal, global_start), (expected, expected * 3));
                assert_eq!(bytes, payload(expected), "batch {expected} intact");
            }
            assert_eq!(reader.next_ordinal(), 50);
        }
    }

    #[test]
    fn seeking_is_bounded_per_call() {
        let dir = TempDir::new("bounded");
        let batches = HEADERS_PER_STEP as u64 + 10;
        write_log(&dir.0, batches);
        let mut reader = HistoryReader::open(&dir.0, 0, (batches - 1) * 3).unwrap();
        assert_eq!(
            reader.poll(1, u64::MAX, batches, |_| {}).unwrap(),
            0,
            "first call only seeks"
        );
        assert!(reader.is_seeking());
        assert_eq!(reader.next_ordinal(), HEADERS_PER_STEP as u64);
        let mut got = Vec::new();
        reader
            .poll(1, u64::MAX, batches, |b| got.push(b.ordinal))
            .unwrap();
        assert_eq!(got, [batches - 1]);
    }

    #[test]
    fn only_durable_batches_are_read_and_the_rest_when_they_become_durable() {
        let dir = TempDir::new("durable");
        write_log(&dir.0, 8);
        let mut reader = HistoryReader::open(&dir.0, 0, 0).unwrap();
        let read = read_all(&mut reader, 100, 5);
        assert_eq!(read.len(), 5, "batches 5.. are not durable yet");
        // A record in progress past the durable end (a torn header) is never looked at.
        let path = replica::segment_path(&dir.0, 0, 0);
        let end5: usize = (0..5).map(|o| RECORD_HEADER_BYTES + payload(o).len()).sum();
        let full = std::fs::read(&path).unwrap();
        let mut torn = full.clone();
        torn[end5 + 3] ^= 0xFF;
        std::fs::write(&path, &torn).unwrap();
        assert_eq!(reader.poll(100, u64::MAX, 5, |_| {}).unwrap(), 0);
        std::fs::write(&path, &full).unwrap();
        let rest: Vec<u64> = read_all(&mut reader, 100, 8).iter().map(|r| r.0).collect();
        assert_eq!(rest, [5, 6, 7], "the rest once durable");
    }

    #[test]
    fn damage_inside_the_file_is_an_error_not_the_end() {
        let dir = TempDir::new("damage");
        write_log(&dir.0, 4);
        let path = replica::segment_path(&dir.0, 0, 0);
        let mut bytes = std::fs::read(&path).unwrap();
        // A payload byte of batch 1, which batches 2 and 3 follow.
        let offset = RECORD_HEADER_BYTES * 2 + payload(0).len() + 5;
        bytes[offset] ^= 0xFF;
        std::fs::write(&path, &bytes).unwrap();
        let mut reader = HistoryReader::open(&dir.0, 0, 0).unwrap();
        let mut got = Vec::new();
        let result = reader.poll(100, u64::MAX, 4, |b| got.push(b.ordinal));
        assert!(
            matches!(result, Err(HistoryError::Damaged { ordinal: 1, .. })),
            "{result:?}"
        );
        assert_eq!(got, [0]);
    }

    #[test]
    fn no_replica_or_one_that_starts_later_is_refused() {
        let dir = TempDir::new("refused");
        assert!(matches!(
            HistoryReader::open(&dir.0, 3, 0),
            Err(HistoryError::NotReplicated { topic: 3 })
        ));
        // A file whose oldest records are gone: it starts at batch 7 (position 21).
        std::fs::create_dir_all(&dir.0).unwrap();
        let mut bytes = Vec::new();
        for ordinal in 7..10 {
            let data = payload(ordinal);
            let header = RecordHeader::for_batch(&batch(ordinal, &data));
            bytes.extend_from_slice(bytemuck::bytes_of(&header));
            bytes.extend_from_slice(&data);
        }
        std::fs::write(replica::segment_path(&dir.0, 0, 7), &bytes).unwrap();
        assert!(matches!(
            HistoryReader::open(&dir.0, 0, 20),
            Err(HistoryError::BeforeStart {
                position: 20,
                start: 21
            })
        ));
        let mut reader = HistoryReader::open(&dir.0, 0, 25).unwrap();
        let read = read_all(&mut reader, 10, 10);
        let ordinals: Vec<u64> = read.iter().map(|r| r.0).collect();
        assert_eq!(ordinals, [8, 9]);
    }

    #[test]
    fn bytes_max_bounds_a_poll_but_one_batch_always_goes() {
        let dir = TempDir::new("bytes");
        write_log(&dir.0, 10);
        let mut reader = HistoryReader::open(&dir.0, 0, 0).unwrap();
        assert_eq!(reader.poll(100, 1, 10, |_| {}).unwrap(), 1);
        let two = (payload(1).len() + payload(2).len()) as u64;
        assert_eq!(reader.poll(100, two, 10, |_| {}).unwrap(), 2);
    }

    #[test]
    fn reads_on_across_segments_from_any_position() {
        let dir = TempDir::new("segments");
        write_segments(&dir.0, 60, 8 << 10);
        let segments = replica::segment_list(&dir.0, 0).unwrap();
        assert!(segments.len() > 5, "{segments:?}");
        for position in [0, 1, 44, 100, 179] {
            for per_poll in [1, 7, 100] {
                let mut reader = HistoryReader::open(&dir.0, 0, position).unwrap();
                let read = read_all(&mut reader, per_poll, 60);
                let first = position / 3;
                let ordinals: Vec<u64> = read.iter().map(|r| r.0).collect();
                assert_eq!(ordinals, (first..60).collect::<Vec<_>>(), "from {position}");
                for (ordinal, _, bytes) in read {
                    assert_eq!(bytes, payload(ordinal), "batch {ordinal} intact");
                }
            }
        }
    }

    /// A reader past its first segment switch (it no longer knows which segment comes
    /// next) is told too, not handed a damage error.
    #[test]
    fn a_reader_deep_in_the_log_that_retention_overtakes_is_told_where_it_starts() {
        let dir = TempDir::new("overtaken");
        let mut log = write_segments(&dir.0, 60, 8 << 10);
        let segments = replica::segment_list(&dir.0, 0).unwrap();
        assert!(segments.len() > 5, "{segments:?}");
        // Into the second segment.
        let mut reader = HistoryReader::open(&dir.0, 0, 0).unwrap();
        let into_second = segments[1] + 1;
        let read = reader
            .poll(into_second as usize, u64::MAX, 60, |_| {})
            .unwrap();
        assert_eq!(read as u64, into_second);
        let keep = HistoryRetention {
            bytes: 20 << 10,
            ms: 0,
        };
        log.apply_retention(keep, std::time::SystemTime::now())
            .unwrap();
        let first = replica::segment_list(&dir.0, 0).unwrap()[0];
        assert!(first > segments[2], "retention went past the next segment");
        let result = loop {
            match reader.poll(1, u64::MAX, 60, |_| {}) {
                Ok(1) => {}
                other => break other,
            }
        };
        assert!(
            matches!(result, Err(HistoryError::Deleted { start, .. }) if start == first * 3),
            "{result:?}"
        );
    }

    #[test]
    fn retention_moves_the_start_and_a_reader_left_behind_is_told_where_it_is() {
        let dir = TempDir::new("retention");
        let mut log = write_segments(&dir.0, 60, 8 << 10);
        // A reader at the start, one batch in.
        let mut behind = HistoryReader::open(&dir.0, 0, 0).unwrap();
        assert_eq!(behind.poll(1, u64::MAX, 60, |_| {}).unwrap(), 1);
        let keep = HistoryRetention {
            bytes: 20 << 10,
            ms: 0,
        };
        assert!(
            log.apply_retention(keep, std::time::SystemTime::now())
                .unwrap()
                > 0
        );
        let first = replica::segment_list(&dir.0, 0).unwrap()[0];
        let start = first * 3;
        assert!(matches!(
            HistoryReader::open(&dir.0, 0, 0),
            Err(HistoryError::BeforeStart { position: 0, start: s }) if s == start
        ));
        let mut reader = HistoryReader::open(&dir.0, 0, start).unwrap();
        assert_eq!(reader.start_position(), start);
        let ordinals: Vec<u64> = read_all(&mut reader, 5, 60).iter().map(|r| r.0).collect();
        assert_eq!(ordinals, (first..60).collect::<Vec<_>>());
        // The reader that was behind finishes the segment it has open, then learns that
        // the next one is gone and where the log starts now.
        let result = loop {
            match behind.poll(1, u64::MAX, 60, |_| {}) {
                Ok(1) => {}
                other => break other,
            }
        };
        assert!(
            matches!(result, Err(HistoryError::Deleted { start: s, .. }) if s == start),
            "{result:?}"
        );
    }
}
