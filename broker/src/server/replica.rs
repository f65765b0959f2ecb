//! Replication to local files (ack level 2).
//!
//! A broker started with a replica directory copies every topic whose replication factor
//! is 2 or more from the pool to a file of its own, in global order: one record per batch
//! (a 64-byte header with its own CRC-32C, then the payload), appended, and made durable
//! with `fdatasync` once `sync_bytes` are pending or `sync_interval_us` has passed since the
//! first of them. After each sync it publishes its replicated frontier: batches (ordinals)
//! and messages (positions) on disk. A batch acknowledged at level 2 is on disk at
//! `replication_factor - 1` brokers besides the pool.
//!
//! The replica's read position holds the topic's retention (like a subscriber's), so a
//! payload is never reclaimed before every running replica copied it.
//!
//! Opening a file checks every record and cuts a torn tail (a crash between append and
//! sync), so a restarted broker resumes from its last durable record.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytemuck::{Pod, Zeroable};
use units::Timestamp;

use shared_log::HistoryRetention;
use shared_log::coherence::SharedMemory;
use shared_log::pool::{LogOrigin, Pool, TopicConfig, TopicId};
use shared_log::reader::{LogReader, OrderedBatch, ReadError};

/// Magic of a replica record header.
const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"EMBR");
/// Bytes of a record header.
pub const RECORD_HEADER_BYTES: usize = 64;
/// Batches copied per topic per poll, so one busy topic cannot starve the others and a sync
/// is not held back behind a long copy.
const BATCHES_PER_POLL_MAX: usize = 16;

/// Header of one replicated batch.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable, PartialEq, Eq)]
pub struct RecordHeader {
    /// `b"EMBR"` (little-endian `u32`).
    pub magic: u32,
    /// CRC-32C of the header's bytes after this field.
    pub header_crc: u32,
    /// Place of the batch in the topic's order.
    pub ordinal: u64,
    /// Global position of its first message.
    pub global_start: u64,
    /// Publisher id.
    pub client_id: u64,
    /// Publisher's batch sequence.
    pub batch_seq: u64,
    /// Publisher's session epoch.
    pub session_epoch: u32,
    /// Payload bytes that follow.
    pub payload_bytes: u32,
    /// Messages in the payload.
    pub message_count: u32,
    /// CRC-32C of the payload.
    pub checksum: u32,
    /// Broker whose payload log held the batch.
    pub broker: u16,
    /// The batch's flags (`shared_log::layout::BATCH_SEQ_COUNTS_MESSAGES`: its session numbers
    /// messages; zero in files written before it).
    pub flags: u8,
    /// Reserved, zero.
    pub reserved: [u8; 5],
}

const _: () = assert!(std::mem::size_of::<RecordHeader>() == RECORD_HEADER_BYTES);

impl RecordHeader {
    fn crc(&self) -> u32 {
        wire::payload::checksum(&bytemuck::bytes_of(self)[8..])
    }

    /// The header of `batch`'s record, with its CRC.
    pub(crate) fn for_batch(batch: &OrderedBatch<'_>) -> RecordHeader {
        let mut header = RecordHeader {
            magic: RECORD_MAGIC,
            header_crc: 0,
            ordinal: batch.ordinal,
            global_start: batch.global_start,
            client_id: batch.client_id,
            batch_seq: batch.batch_seq,
            session_epoch: batch.session_epoch,
            payload_bytes: batch.payload.len() as u32,
            message_count: batch.message_count,
            checksum: batch.checksum,
            broker: batch.broker,
            flags: batch.flags,
            reserved: [0; 5],
        };
        header.header_crc = header.crc();
        header
    }

    /// Whether the bytes read are a whole record header (magic and CRC right).
    pub(crate) fn is_valid(&self) -> bool {
        self.magic == RECORD_MAGIC && self.header_crc == self.crc()
    }

    /// The batch this header describes, with `payload` (read from the file: it has no
    /// place in the pool, so its pool offsets are zero and never sent from).
    pub(crate) fn batch<'a>(&self, payload: &'a [u8]) -> OrderedBatch<'a> {
        OrderedBatch {
            pool_offset: 0,
            blog_offset: 0,
            ordinal: self.ordinal,
            global_start: self.global_start,
            message_count: self.message_count,
            broker: self.broker,
            client_id: self.client_id,
            session_epoch: self.session_epoch,
            batch_seq: self.batch_seq,
            flags: self.flags,
            checksum: self.checksum,
            payload,
        }
    }
}

/// Replication settings of one broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaConfig {
    /// Where this broker's replica files live (its own disk).
    pub dir: PathBuf,
    /// Sync once this many bytes are pending.
    pub sync_bytes: u64,
    /// Sync once the oldest pending byte is this old.
    pub sync_interval_us: u64,
    /// A segment closes once a sync leaves it at least this long.
    pub segment_bytes: u64,
}

/// Default size at which a replica segment closes.
pub const SEGMENT_BYTES_DEFAULT: u64 = 256 << 20;

/// Why replication cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// A file operation failed.
    #[error("replica file {path}: {what}: {source}")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The file holds a different log than the pool (another pool, or a re-formatted one).
    #[error(
        "replica file {path} disagrees with the pool at batch {ordinal}: {what}; move the file \
         away to start a fresh replica"
    )]
    Diverged {
        /// The file.
        path: PathBuf,
        /// First batch that differs.
        ordinal: u64,
        /// What differs.
        what: String,
    },
    /// The pool no longer holds a batch the replica needs.
    #[error(
        "replica of topic {topic} cannot continue: {source}; if this broker was down while \
         the log moved on, move its replica file aside to start a fresh replica"
    )]
    Read {
        /// Topic.
        topic: TopicId,
        /// Reader error.
        source: ReadError,
    },
    /// A topic description file cannot be read.
    #[error("topic description {path}: {what}")]
    Meta {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

fn io_error(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> ReplicaError {
    let path = path.to_owned();
    move |source| ReplicaError::Io { path, what, source }
}

/// Path of the segment of `topic` in `dir` whose first batch is `first_ordinal`. The
/// ordinal is zero-padded, so names sort in log order.
pub fn segment_path(dir: &Path, topic: TopicId, first_ordinal: u64) -> PathBuf {
    dir.join(format!("topic-{topic}-{first_ordinal:020}.log"))
}

/// First ordinals of the segments of `topic` in `dir`, oldest first (none when the
/// directory does not exist).
pub fn segment_list(dir: &Path, topic: TopicId) -> Result<Vec<u64>, std::io::Error> {
    let prefix = format!("topic-{topic}-");
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut firsts = Vec::new();
    for entry in entries {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        let first = name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".log"))
            .filter(|digits| digits.len() == 20)
            .and_then(|digits| digits.parse::<u64>().ok());
        firsts.extend(first);
    }
    firsts.sort_unstable();
    Ok(firsts)
}

/// Path of the description (name and settings) of `topic` in `dir`.
pub fn meta_path(dir: &Path, topic: TopicId) -> PathBuf {
    dir.join(format!("topic-{topic}.toml"))
}

/// A topic's name and settings, kept beside its replica so a lost pool can be rebuilt.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TopicDescription {
    /// Topic id in the pool.
    pub id: TopicId,
    /// Topic name.
    pub name: String,
    /// Ordering level.
    pub order: u8,
    /// Default ack level.
    pub ack: u8,
    /// Replication factor, counting the pool copy.
    pub replication_factor: u8,
    /// How subscribers hold the log (a `wire::Retention` value; files written before it
    /// existed hold none: 0).
    #[serde(default)]
    pub retention: u8,
    /// Disk history kept, in bytes (0: no limit).
    #[serde(default)]
    pub retention_bytes: u64,
    /// Age of disk history kept, in milliseconds (0: no limit).
    #[serde(default)]
    pub retention_ms: u64,
    /// Ordinal of the topic's first batch in the pool it was replicated from (its origin;
    /// a restore falls back to it when no segment says where the replica starts).
    #[serde(default)]
    pub origin_ordinal: u64,
    /// Position of that batch's first message.
    #[serde(default)]
    pub origin_position: u64,
}

impl TopicDescription {
    /// Reads a description file.
    pub fn load(path: &Path) -> Result<TopicDescription, ReplicaError> {
        let text = std::fs::read_to_string(path).map_err(|e| ReplicaError::Meta {
            path: path.to_owned(),
            what: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| ReplicaError::Meta {
            path: path.to_owned(),
            what: e.to_string(),
        })
    }

    /// The settings as the pool stores them.
    pub fn config(&self) -> Result<TopicConfig, ReplicaError> {
        let invalid = |e: wire::Error| ReplicaError::Meta {
            path: PathBuf::new(),
            what: e.to_string(),
        };
        Ok(TopicConfig {
            order: shared_log::Order::try_from(self.order).map_err(invalid)?,
            ack: self.ack,
            replication_factor: self.replication_factor,
            retention: shared_log::Retention::try_from(self.retention).map_err(invalid)?,
            history: shared_log::HistoryRetention {
                bytes: self.retention_bytes,
                ms: self.retention_ms,
            },
        })
    }
}

/// One batch read back from a replica file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaRecord {
    /// Its header.
    pub header: RecordHeader,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// Reads the valid records of every segment of `topic` in `dir`, oldest first; stops at
/// the first torn or damaged one, or at a gap between segments.
pub fn read_records(dir: &Path, topic: TopicId) -> Result<Vec<ReplicaRecord>, ReplicaError> {
    let mut records = Vec::new();
    scan_log(dir, topic, |record| {
        records.push(record);
        Ok(())
    })?;
    Ok(records)
}

/// What a scan found.
#[derive(Debug, Clone, Copy, Default)]
struct Scanned {
    /// Bytes of the valid prefix.
    bytes: u64,
    /// Records in it.
    records: u64,
    /// Ordinal and position after its last record.
    end_ordinal: u64,
    end_position: u64,
    /// Ordinal and position of its first record.
    first: Option<(u64, u64)>,
}

/// Reads every segment of `topic` in `dir` oldest first, record by record, handing each to
/// `f`; stops at the first torn or damaged record or at a gap between segments. Returns what
/// the readable log holds (`records` counts every segment).
fn scan_log(
    dir: &Path,
    topic: TopicId,
    mut f: impl FnMut(ReplicaRecord) -> Result<(), ReplicaError>,
) -> Result<Scanned, ReplicaError> {
    let segments = segment_list(dir, topic).map_err(io_error(dir, "list"))?;
    let mut log = Scanned::default();
    for first_ordinal in segments {
        if log.first.is_some() && first_ordinal != log.end_ordinal {
            log::warn!(
                "replica {}: topic {topic}'s log stops at batch {}: the next segment begins at \
                 {first_ordinal} (damage or a gap); what follows is not read",
                dir.display(),
                log.end_ordinal
            );
            break;
        }
        let path = segment_path(dir, topic, first_ordinal);
        let segment = scan(&path, first_ordinal, &mut f)?;
        let Some(first) = segment.first else { break };
        log.first.get_or_insert(first);
        log.bytes += segment.bytes;
        log.records += segment.records;
        log.end_ordinal = segment.end_ordinal;
        log.end_position = segment.end_position;
    }
    Ok(log)
}

/// Reads one segment's valid prefix record by record from `first_ordinal`, handing each to
/// `f` (which may stop the scan with an error); returns what the prefix holds.
fn scan(
    path: &Path,
    first_ordinal: u64,
    mut f: impl FnMut(ReplicaRecord) -> Result<(), ReplicaError>,
) -> Result<Scanned, ReplicaError> {
    let mut scanned = Scanned {
        end_ordinal: first_ordinal,
        ..Scanned::default()
    };
    let mut file = match File::open(path) {
        Ok(file) => std::io::BufReader::new(file),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(scanned),
        Err(e) => return Err(io_error(path, "open")(e)),
    };
    loop {
        let mut header = RecordHeader::zeroed();
        if read_full(&mut file, bytemuck::bytes_of_mut(&mut header), path)? {
            break;
        }
        if !header.is_valid() || header.ordinal != scanned.end_ordinal {
            break;
        }
        let mut payload = vec![0; header.payload_bytes as usize];
        if read_full(&mut file, &mut payload, path)?
            || wire::payload::checksum(&payload) != header.checksum
        {
            break;
        }
        scanned.bytes += (RECORD_HEADER_BYTES + payload.len()) as u64;
        scanned.records += 1;
        scanned
            .first
            .get_or_insert((header.ordinal, header.global_start));
        scanned.end_ordinal = header.ordinal + 1;
        scanned.end_position = header.global_start + u64::from(header.message_count);
        f(ReplicaRecord { header, payload })?;
    }
    Ok(scanned)
}

/// Fills `buf`; returns true when the file ended first (a torn or absent record).
fn read_full(file: &mut impl Read, buf: &mut [u8], path: &Path) -> Result<bool, ReplicaError> {
    match file.read_exact(buf) {
        Ok(()) => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(true),
        Err(e) => Err(io_error(path, "read")(e)),
    }
}

/// The first record header of the segment at `path`, when it holds a valid one.
pub(crate) fn first_header(path: &Path) -> Result<Option<RecordHeader>, std::io::Error> {
    use std::os::unix::fs::FileExt;

    let file = File::open(path)?;
    let mut header = RecordHeader::zeroed();
    match file.read_exact_at(bytemuck::bytes_of_mut(&mut header), 0) {
        Ok(()) => Ok(header.is_valid().then_some(header)),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// Makes the directory's entries durable (a created segment must not vanish with a crash
/// once its records are acknowledged).
fn sync_dir(dir: &Path) -> Result<(), ReplicaError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir, "sync directory"))
}

/// Block size of direct I/O: offsets, lengths and buffers of `O_DIRECT` writes align to it.
const BLOCK_BYTES: usize = 4096;

/// One block of the write buffer (its alignment is what `O_DIRECT` needs).
#[repr(C, align(4096))]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Block([u8; BLOCK_BYTES]);

/// A segment no longer written.
#[derive(Debug, Clone)]
struct ClosedSegment {
    first_ordinal: u64,
    bytes: u64,
    /// When it was last written (retention by age counts from there).
    written: SystemTime,
}

/// The segment being written: created on disk by the first sync that has records for it.
struct ActiveSegment {
    first_ordinal: u64,
    file: Option<File>,
}

/// The append-only replica log of one topic: segment files of about `segment_bytes` each,
/// named by their first batch's ordinal, the last one written.
///
/// Records go to a block-aligned buffer that starts at the active segment's last partial
/// block; a sync writes the buffer's blocks in place with one `O_DIRECT` write (the page
/// cache copy cost more CPU than anything else on the replica path) and then `fdatasync`s.
/// The last block is zero-padded on disk; the padding is cut when the segment closes or is
/// opened again. Where the file system refuses `O_DIRECT` (tmpfs), the same writes go
/// through the page cache. A sync that leaves the active segment at `segment_bytes` or more
/// closes it; the next records start a new one. Retention deletes closed segments only,
/// oldest first.
pub struct ReplicaLog {
    dir: PathBuf,
    topic: TopicId,
    segment_bytes: u64,
    closed: VecDeque<ClosedSegment>,
    active: ActiveSegment,
    /// Ordinal and position after the last record (durable or pending).
    next_ordinal: u64,
    next_position: u64,
    /// Ordinal and position after the last durable record.
    durable_ordinal: u64,
    durable_position: u64,
    /// The active segment's bytes from `buffer_offset` on: its last partial block, then what
    /// is pending; zero beyond `buffer_len`.
    buffer: Vec<Block>,
    buffer_offset: u64,
    buffer_len: usize,
    pending_bytes: usize,
    pending_since: Option<Timestamp>,
    direct: bool,
}

impl std::fmt::Debug for ReplicaLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaLog")
            .field("dir", &self.dir)
            .field("topic", &self.topic)
            .field("segments", &(self.closed.len() + 1))
            .field("next_ordinal", &self.next_ordinal)
            .field("durable_ordinal", &self.durable_ordinal)
            .field("pending_bytes", &self.pending_bytes)
            .field("direct", &self.direct)
            .finish()
    }
}

impl ReplicaLog {
    /// Opens (or starts, at `origin`) the log of `topic` in `dir`: keeps the valid prefix of
    /// its last segment and cuts anything after it. An empty last segment (created by a sync
    /// that a crash cut short) is removed. Segments close at `segment_bytes`.
    pub fn open(
        dir: &Path,
        topic: TopicId,
        origin: LogOrigin,
        segment_bytes: u64,
    ) -> Result<ReplicaLog, ReplicaError> {
        std::fs::create_dir_all(dir).map_err(io_error(dir, "create directory"))?;
        let mut segments = segment_list(dir, topic).map_err(io_error(dir, "list"))?;
        let mut log = ReplicaLog {
            dir: dir.to_owned(),
            topic,
            segment_bytes: segment_bytes.max(1),
            closed: VecDeque::new(),
            active: ActiveSegment {
                first_ordinal: origin.ordinal,
                file: None,
            },
            next_ordinal: origin.ordinal,
            next_position: origin.position,
            durable_ordinal: origin.ordinal,
            durable_position: origin.position,
            buffer: vec![Block([0; BLOCK_BYTES])],
            buffer_offset: 0,
            buffer_len: 0,
            pending_bytes: 0,
            pending_since: None,
            direct: true,
        };
        // The last segment with a valid record is the one written; empty ones after it held
        // nothing durable.
        let last = loop {
            let Some(&first_ordinal) = segments.last() else {
                break None;
            };
            let path = segment_path(dir, topic, first_ordinal);
            let scanned = scan(&path, first_ordinal, |_| Ok(()))?;
            if scanned.records > 0 {
                break Some((first_ordinal, scanned));
            }
            log::info!(
                "replica {}: removing a segment without a complete record",
                path.display()
            );
            std::fs::remove_file(&path).map_err(io_error(&path, "remove"))?;
            sync_dir(dir)?;
            segments.pop();
        };
        let Some((first_ordinal, scanned)) = last else {
            return Ok(log);
        };
        segments.pop();
        for &first in &segments {
            let path = segment_path(dir, topic, first);
            let metadata = std::fs::metadata(&path).map_err(io_error(&path, "stat"))?;
            log.closed.push_back(ClosedSegment {
                first_ordinal: first,
                bytes: metadata.len(),
                written: metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
        log.next_ordinal = scanned.end_ordinal;
        log.next_position = scanned.end_position;
        log.durable_ordinal = scanned.end_ordinal;
        log.durable_position = scanned.end_position;
        log.active.first_ordinal = first_ordinal;
        let path = segment_path(dir, topic, first_ordinal);
        let file = log.open_segment(&path)?;
        let len = file.metadata().map_err(io_error(&path, "stat"))?.len();
        if len != scanned.bytes {
            log::info!(
                "replica {}: cutting {} bytes after the last valid record (batch {}): block \
                 padding, or a write a crash tore",
                path.display(),
                len - scanned.bytes,
                scanned.end_ordinal
            );
            file.set_len(scanned.bytes)
                .map_err(io_error(&path, "truncate"))?;
            file.sync_data().map_err(io_error(&path, "fdatasync"))?;
        }
        log.active.file = Some(file);
        log.buffer_offset = scanned.bytes - scanned.bytes % BLOCK_BYTES as u64;
        log.buffer_len = (scanned.bytes - log.buffer_offset) as usize;
        if log.buffer_len > 0 {
            use std::os::unix::fs::FileExt;
            // The partial last block is read back through the page cache (a plain handle):
            // it is written again, whole, with the next records.
            let plain = File::open(&path).map_err(io_error(&path, "open"))?;
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut log.buffer);
            plain
                .read_exact_at(&mut bytes[..log.buffer_len], log.buffer_offset)
                .map_err(io_error(&path, "read"))?;
        }
        Ok(log)
    }

    /// Opens (creating) a segment file for writing, with `O_DIRECT` where the file system
    /// takes it.
    fn open_segment(&mut self, path: &Path) -> Result<File, ReplicaError> {
        use std::os::unix::fs::OpenOptionsExt;

        let open = |flags: i32| {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .custom_flags(flags)
                .open(path)
        };
        if self.direct {
            match open(libc::O_DIRECT) {
                Ok(file) => return Ok(file),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    log::info!(
                        "replica {}: the file system refuses O_DIRECT; writing through the \
                         page cache",
                        path.display()
                    );
                    self.direct = false;
                }
                Err(e) => return Err(io_error(path, "open")(e)),
            }
        }
        open(0).map_err(io_error(path, "open"))
    }

    /// Ordinal of the next batch it takes (batches before it are in the log, or were).
    pub fn next_ordinal(&self) -> u64 {
        self.next_ordinal
    }

    /// (ordinal, position) after the last durable record.
    pub fn durable(&self) -> (u64, u64) {
        (self.durable_ordinal, self.durable_position)
    }

    /// Segments on disk or about to be (closed ones and the active one).
    pub fn segments(&self) -> usize {
        self.closed.len() + 1
    }

    /// Bytes of the log: closed segments and the active one, pending bytes included.
    pub fn bytes(&self) -> u64 {
        self.closed.iter().map(|s| s.bytes).sum::<u64>()
            + self.buffer_offset
            + self.buffer_len as u64
    }

    fn push(&mut self, data: &[u8]) {
        let end = self.buffer_len + data.len();
        let blocks = end.div_ceil(BLOCK_BYTES);
        if blocks > self.buffer.len() {
            self.buffer.resize(blocks, Block([0; BLOCK_BYTES]));
        }
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut self.buffer);
        bytes[self.buffer_len..end].copy_from_slice(data);
        self.buffer_len = end;
        self.pending_bytes += data.len();
    }

    /// Appends one batch (it must be the next ordinal) to the pending bytes.
    pub fn append(&mut self, batch: &OrderedBatch<'_>, now: Timestamp) -> Result<(), ReplicaError> {
        if batch.ordinal != self.next_ordinal || batch.global_start != self.next_position {
            return Err(ReplicaError::Diverged {
                path: segment_path(&self.dir, self.topic, self.active.first_ordinal),
                ordinal: batch.ordinal,
                what: format!(
                    "the log continues at batch {} position {}, the pool offers batch {} \
                     position {}",
                    self.next_ordinal, self.next_position, batch.ordinal, batch.global_start
                ),
            });
        }
        let header = RecordHeader::for_batch(batch);
        self.push(bytemuck::bytes_of(&header));
        self.push(batch.payload);
        self.next_ordinal = batch.ordinal + 1;
        self.next_position = batch.global_start + u64::from(batch.message_count);
        self.pending_since.get_or_insert(now);
        Ok(())
    }

    /// Bytes appended and not yet synced.
    pub fn pending_bytes(&self) -> u64 {
        self.pending_bytes as u64
    }

    /// Whether the pending bytes are due for a sync under `config` at `now`.
    pub fn sync_due(&self, config: &ReplicaConfig, now: Timestamp) -> bool {
        self.pending_since.is_some_and(|since| {
            self.pending_bytes as u64 >= config.sync_bytes
                || now.saturating_duration_since(since)
                    >= Duration::from_micros(config.sync_interval_us)
        })
    }

    /// Writes the pending bytes (whole blocks, in place) and makes them durable
    /// (`fdatasync`: the file's size changed, and the device may cache writes); then closes
    /// the active segment if it reached `segment_bytes`.
    pub fn sync(&mut self) -> Result<(), ReplicaError> {
        use std::os::unix::fs::FileExt;

        if self.pending_bytes == 0 {
            return Ok(());
        }
        let path = segment_path(&self.dir, self.topic, self.active.first_ordinal);
        if self.active.file.is_none() {
            let file = self.open_segment(&path)?;
            sync_dir(&self.dir)?;
            self.active.file = Some(file);
        }
        let file = self.active.file.as_ref().expect("opened above");
        let blocks = self.buffer_len.div_ceil(BLOCK_BYTES);
        let bytes: &[u8] = bytemuck::cast_slice(&self.buffer[..blocks]);
        file.write_all_at(bytes, self.buffer_offset)
            .map_err(io_error(&path, "write"))?;
        file.sync_data().map_err(io_error(&path, "fdatasync"))?;
        self.pending_bytes = 0;
        self.pending_since = None;
        self.durable_ordinal = self.next_ordinal;
        self.durable_position = self.next_position;
        let segment_end = self.buffer_offset + self.buffer_len as u64;
        if segment_end >= self.segment_bytes {
            // Closed: the padding goes (it is never read: readers move on by ordinal), and
            // the next records start a new segment at block 0.
            file.set_len(segment_end)
                .map_err(io_error(&path, "truncate"))?;
            self.closed.push_back(ClosedSegment {
                first_ordinal: self.active.first_ordinal,
                bytes: segment_end,
                written: SystemTime::now(),
            });
            self.active = ActiveSegment {
                first_ordinal: self.next_ordinal,
                file: None,
            };
            self.buffer.truncate(1);
            self.buffer[0].0.fill(0);
            self.buffer_offset = 0;
            self.buffer_len = 0;
            return Ok(());
        }
        // Keep the last partial block (rewritten with the next records), zero the rest.
        let whole = self.buffer_len / BLOCK_BYTES;
        self.buffer.copy_within(whole..blocks, 0);
        self.buffer.truncate(1);
        let tail = self.buffer_len - whole * BLOCK_BYTES;
        self.buffer[0].0[tail..].fill(0);
        self.buffer_offset += (whole * BLOCK_BYTES) as u64;
        self.buffer_len = tail;
        Ok(())
    }

    /// Deletes the oldest closed segments that `retention` no longer keeps at `now`: while
    /// the rest of the log still holds `retention.bytes`, or once a segment's last write is
    /// `retention.ms` old. The active segment always stays. Returns the segments deleted.
    pub fn apply_retention(
        &mut self,
        retention: HistoryRetention,
        now: SystemTime,
    ) -> Result<usize, ReplicaError> {
        let mut total = self.bytes();
        let mut deleted = 0;
        while let Some(oldest) = self.closed.front() {
            let over_bytes = retention.bytes > 0 && total - oldest.bytes >= retention.bytes;
            let over_age = retention.ms > 0
                && now
                    .duration_since(oldest.written)
                    .is_ok_and(|age| age >= Duration::from_millis(retention.ms));
            if !over_bytes && !over_age {
                break;
            }
            let path = segment_path(&self.dir, self.topic, oldest.first_ordinal);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                // Replication goes on; the deletion is tried again at the next check.
                Err(e) => {
                    log::warn!("replica {}: cannot delete: {e}", path.display());
                    break;
                }
            }
            total -= oldest.bytes;
            deleted += 1;
            self.closed.pop_front();
        }
        // Deleted for good: segments that came back after a crash would be harmless, but a
        // file system that reorders unlinks could bring back an old one without the next.
        if deleted > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(deleted)
    }
}

struct TopicReplica<M> {
    topic: TopicId,
    reader: LogReader<M>,
    log: ReplicaLog,
    /// How much history it keeps.
    history: HistoryRetention,
    /// When retention was last applied.
    retention_checked: Option<Timestamp>,
    /// Its frontier is published (and holds retention).
    holding: bool,
}

/// How often retention by age is checked on a topic whose segments do not roll.
const RETENTION_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Copies every replicated topic of the pool to this broker's files. Run
/// [`Replicator::poll`] in a loop (its own thread).
pub struct Replicator<M> {
    pool: Pool<M>,
    broker: u16,
    config: ReplicaConfig,
    topics: Vec<TopicReplica<M>>,
    /// Topics seen that are not replicated (rf 1).
    skipped: Vec<TopicId>,
    /// The sequencer heartbeat last published as this replica's liveness.
    heartbeat_seen: u64,
}

impl<M: SharedMemory> std::fmt::Debug for Replicator<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator")
            .field("broker", &self.broker)
            .field("config", &self.config)
            .field("topics", &self.topics.len())
            .finish()
    }
}

impl<M: SharedMemory + Clone> Replicator<M> {
    /// A replicator for `broker` writing under `config.dir`.
    pub fn new(pool: Pool<M>, broker: u16, config: ReplicaConfig) -> Result<Self, ReplicaError> {
        std::fs::create_dir_all(&config.dir).map_err(io_error(&config.dir, "create directory"))?;
        Ok(Replicator {
            pool,
            broker,
            config,
            topics: Vec::new(),
            skipped: Vec::new(),
            heartbeat_seen: 0,
        })
    }

    fn refresh_topics(&mut self) -> Result<(), ReplicaError> {
        for topic in self.pool.topics() {
            if self.skipped.contains(&topic) || self.topics.iter().any(|t| t.topic == topic) {
                continue;
            }
            let (name, config) = match self.pool.topic_entry(topic) {
                Ok(entry) => entry,
                Err(_) => continue,
            };
            if config.replication_factor < 2 {
                self.skipped.push(topic);
                continue;
            }
            let meta = meta_path(&self.config.dir, topic);
            let origin = self
                .pool
                .topic_origin(topic)
                .map_err(|e| meta_error(&meta, e.to_string()))?;
            let description = TopicDescription {
                id: topic,
                name,
                order: config.order as u8,
                ack: config.ack,
                replication_factor: config.replication_factor,
                retention: config.retention as u8,
                retention_bytes: config.history.bytes,
                retention_ms: config.history.ms,
                origin_ordinal: origin.ordinal,
                origin_position: origin.position,
            };
            let text = toml::to_string(&description).expect("a description serializes");
            std::fs::write(&meta, text).map_err(io_error(&meta, "write"))?;
            let log = ReplicaLog::open(&self.config.dir, topic, origin, self.config.segment_bytes)?;
            let mut reader = LogReader::new(self.pool.clone(), topic, true)
                .map_err(|source| ReplicaError::Read { topic, source })?;
            reader.set_next_ordinal(log.next_ordinal());
            log::info!(
                "broker {}: replicating topic {topic} ({:?}) to {} from batch {} ({} segments)",
                self.broker,
                description.name,
                self.config.dir.display(),
                log.next_ordinal(),
                log.segments()
            );
            // It holds retention only once it has read from the pool: a replica that comes
            // back after its next batch was reclaimed must not pin the log where it is.
            self.topics.push(TopicReplica {
                topic,
                reader,
                log,
                history: config.history,
                retention_checked: None,
                holding: false,
            });
        }
        Ok(())
    }

    fn publish(&self, replica: &TopicReplica<M>, heartbeat: u64) {
        let (ordinal, position) = replica.log.durable();
        self.pool
            .publish_replicated(replica.topic, self.broker, ordinal + 1, position, heartbeat);
        self.pool.mem().fence();
    }

    /// Copies what is new, syncs what is due, publishes the frontiers; returns the batches
    /// copied.
    pub fn poll(&mut self, now: Timestamp) -> Result<usize, ReplicaError> {
        // Every poll: a replica must start on a new topic before its first batches can be
        // reclaimed (it holds retention only from then on).
        self.refresh_topics()?;
        // Liveness: the sequencer's heartbeat seen, republished whenever it moves.
        let heartbeat = self.pool.lease_heartbeat();
        let beat = heartbeat != self.heartbeat_seen;
        self.heartbeat_seen = heartbeat;
        let mut copied = 0;
        for index in 0..self.topics.len() {
            let replica = &mut self.topics[index];
            let mut failed = None;
            let room = self
                .config
                .sync_bytes
                .saturating_sub(replica.log.pending_bytes());
            let batches = if room == 0 { 0 } else { BATCHES_PER_POLL_MAX };
            let result = replica.reader.poll(batches, |batch| {
                if failed.is_none()
                    && let Err(e) = replica.log.append(batch, now)
                {
                    failed = Some(e);
                }
            });
            if let Some(e) = failed {
                return Err(e);
            }
            match result {
                Ok(n) => copied += n,
                // Copied from a payload that changed under us: the append is undone by the
                // reader staying on it; this cannot happen while our position holds
                // retention, so it is reported.
                Err(source) => {
                    return Err(ReplicaError::Read {
                        topic: replica.topic,
                        source,
                    });
                }
            }
            let synced = replica.log.sync_due(&self.config, now);
            if synced {
                replica.log.sync()?;
            }
            let retention_due = replica.retention_checked.is_none_or(|checked| {
                now.saturating_duration_since(checked) >= RETENTION_CHECK_INTERVAL
            });
            if (synced || retention_due) && replica.history != HistoryRetention::UNLIMITED {
                replica.retention_checked = Some(now);
                let deleted = replica
                    .log
                    .apply_retention(replica.history, SystemTime::now())?;
                if deleted > 0 {
                    log::info!(
                        "broker {}: topic {}: retention deleted {deleted} segments",
                        self.broker,
                        replica.topic
                    );
                }
            }
            if synced || beat || !replica.holding {
                replica.holding = true;
                self.publish(&self.topics[index], heartbeat);
            }
        }
        Ok(copied)
    }

    /// Syncs everything pending (on a clean stop) and releases retention.
    pub fn stop(&mut self) -> Result<(), ReplicaError> {
        for replica in &mut self.topics {
            replica.log.sync()?;
        }
        self.release();
        Ok(())
    }

    /// Marks every topic's replica as not running, so it no longer holds retention (after
    /// an error, and on a clean stop); what is durable keeps counting for ack level 2.
    pub fn release(&mut self) {
        for replica in &mut self.topics {
            let (_, position) = replica.log.durable();
            self.pool
                .publish_replicated(replica.topic, self.broker, 0, position, 0);
            replica.holding = false;
        }
        self.pool.mem().fence();
    }
}

/// One topic [`restore`] rebuilt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredTopic {
    /// Its name.
    pub name: String,
    /// Where its log begins (past 0 when retention had deleted its oldest segments).
    pub origin: LogOrigin,
    /// Ordinal and position after its last batch.
    pub end_ordinal: u64,
    /// Position after its last message.
    pub end_position: u64,
    /// The replica directory it came from.
    pub dir: PathBuf,
}

/// What [`restore`] rebuilt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// Every topic described in the directories.
    pub topics: Vec<RestoredTopic>,
}

/// Rebuilds a lost pool's log from replica files: for every topic described in `dirs`, the
/// replica that reaches furthest (every batch acknowledged at level 2 is in it) is written
/// back through the ring of the broker that first took each batch and ordered again, by a
/// sequencer on broker `head` that never holds a gap open, so every batch gets the position
/// it had. A replica whose oldest segments retention deleted gives a topic that begins where
/// its first segment does. The pool must be freshly formatted and no other broker attached
/// yet. The files used are moved aside (`DIR/restored-<ns>/`), because the rebuilt pool's
/// replicas start over.
pub fn restore<M: SharedMemory + Clone>(
    pool: &Pool<M>,
    head: u16,
    dirs: &[PathBuf],
) -> Result<Restored, ReplicaError> {
    use shared_log::sequencer::{Sequencer, SequencerConfig};
    use shared_log::writer::{AppendError, BatchMeta, TopicWriter};

    // Per topic: its description, the directory of the replica that reaches furthest (on
    // equal ends, the one that keeps more history), and (end, start) of that replica.
    let mut descriptions: Vec<(TopicDescription, PathBuf, (u64, std::cmp::Reverse<u64>))> =
        Vec::new();
    for dir in dirs {
        let entries = std::fs::read_dir(dir).map_err(io_error(dir, "list"))?;
        for entry in entries {
            let path = entry.map_err(io_error(dir, "list"))?.path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let description = TopicDescription::load(&path)?;
            let end = replica_end(dir, description.id)?;
            match descriptions
                .iter_mut()
                .find(|(d, ..)| d.id == description.id)
            {
                Some(best) if best.2 >= end => {}
                Some(best) => *best = (description, dir.clone(), end),
                None => descriptions.push((description, dir.clone(), end)),
            }
        }
    }
    descriptions.sort_by_key(|(d, ..)| d.id);
    let config = SequencerConfig {
        hold_timeout_ns: 0,
        ..SequencerConfig::default()
    };
    let mut sequencer = Sequencer::new(pool.clone(), head, 1, config)
        .map_err(|e| meta_error(Path::new("(pool)"), e.to_string()))?;
    let mut restored = Restored { topics: Vec::new() };
    for (description, dir, _) in &descriptions {
        let log = &meta_path(dir, description.id);
        let described = LogOrigin {
            ordinal: description.origin_ordinal,
            position: description.origin_position,
        };
        let origin = match segment_list(dir, description.id)
            .map_err(io_error(dir, "list"))?
            .first()
        {
            Some(&first) => match first_header(&segment_path(dir, description.id, first)) {
                Ok(Some(header)) => LogOrigin {
                    ordinal: header.ordinal,
                    position: header.global_start,
                },
                Ok(None) => described,
                Err(e) => return Err(io_error(dir, "read")(e)),
            },
            None => described,
        };
        let topic = pool
            .create_topic_from(&description.name, description.config()?, origin)
            .map_err(|e| meta_error(log, e.to_string()))?;
        // Each batch goes back to the ring of the broker that first took it, so the rebuilt
        // log spreads over the payload logs as the original did; those brokers pick their
        // rings up when they start.
        let brokers = pool.geometry().brokers_max as u16;
        let mut writers = Vec::with_capacity(usize::from(brokers));
        for ring in 0..brokers {
            writers.push(
                TopicWriter::new(pool.clone(), topic, ring)
                    .map_err(|e| meta_error(log, e.to_string()))?,
            );
        }
        sequencer
            .refresh_topics()
            .map_err(|e| meta_error(log, e.to_string()))?;
        // Streamed: the log may be far larger than memory. The sequencer's clock counts
        // appends.
        let mut now = Timestamp::ZERO;
        let scanned = scan_log(dir, description.id, |record| {
            let meta = BatchMeta {
                client_id: record.header.client_id,
                session_epoch: record.header.session_epoch,
                batch_seq: record.header.batch_seq,
                message_count: record.header.message_count,
                checksum: record.header.checksum,
                flags: record.header.flags,
            };
            let writer = &mut writers[usize::from(record.header.broker % brokers)];
            loop {
                now += Duration::from_nanos(1);
                match writer.append(meta, &record.payload) {
                    Ok(_) => break,
                    Err(AppendError::RingFull { .. } | AppendError::LogFull { .. }) => {
                        sequencer.poll(now);
                        writer.poll_completions(usize::MAX, |_| {});
                    }
                    Err(e) => return Err(meta_error(log, e.to_string())),
                }
            }
            sequencer.poll(now);
            let mut placed = None;
            writer.poll_completions(usize::MAX, |outcome| placed = outcome.global_start);
            if placed != Some(record.header.global_start) {
                return Err(ReplicaError::Diverged {
                    path: dir.clone(),
                    ordinal: record.header.ordinal,
                    what: format!(
                        "batch placed at {placed:?} on restore, the replica says {}",
                        record.header.global_start
                    ),
                });
            }
            Ok(())
        })?;
        restored.topics.push(RestoredTopic {
            name: description.name.clone(),
            origin,
            end_ordinal: scanned.end_ordinal.max(origin.ordinal),
            end_position: scanned.end_position.max(origin.position),
            dir: dir.clone(),
        });
    }
    drop(sequencer);
    pool.reset_lease();
    let aside = format!(
        "restored-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    for dir in dirs {
        let target = dir.join(&aside);
        std::fs::create_dir_all(&target).map_err(io_error(&target, "create directory"))?;
        for entry in std::fs::read_dir(dir).map_err(io_error(dir, "list"))? {
            let path = entry.map_err(io_error(dir, "list"))?.path();
            if path.is_file()
                && let Some(name) = path.file_name()
            {
                std::fs::rename(&path, target.join(name)).map_err(io_error(&path, "move aside"))?;
            }
        }
    }
    Ok(restored)
}

/// Where the replica of `topic` in `dir` ends, as the batches it can replay without a gap
/// (ordinal after the last), and where it starts: a damaged or missing segment in the
/// middle ends it there, as the replay would.
fn replica_end(dir: &Path, topic: TopicId) -> Result<(u64, std::cmp::Reverse<u64>), ReplicaError> {
    let scanned = scan_log(dir, topic, |_| Ok(()))?;
    let start = scanned.first.map_or(0, |(ordinal, _)| ordinal);
    Ok((scanned.end_ordinal, std::cmp::Reverse(start)))
}

fn meta_error(path: &Path, what: String) -> ReplicaError {
    ReplicaError::Meta {
        path: path.to_owned(),
        what,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(ordinal: u64, payload: &[u8]) -> OrderedBatch<'_> {
        OrderedBatch {
            ordinal,
            global_start: ordinal * 2,
            message_count: 2,
            broker: 1,
            client_id: 7,
            session_epoch: 3,
            batch_seq: ordinal,
            flags: 0,
            checksum: wire::payload::checksum(payload),
            pool_offset: 0,
            blog_offset: 0,
            payload,
        }
    }

    fn payload(ordinal: u64, bytes: usize) -> Vec<u8> {
        (0..bytes)
            .map(|i| (i as u64 * 31 + ordinal) as u8)
            .collect()
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir()
                .join(format!("embarcadero-replica-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn open(dir: &Path, segment_bytes: u64) -> ReplicaLog {
        ReplicaLog::open(dir, 0, LogOrigin::default(), segment_bytes).unwrap()
    }

    fn payloads_of(records: Vec<ReplicaRecord>) -> Vec<Vec<u8>> {
        records.into_iter().map(|r| r.payload).collect()
    }

    #[test]
    fn records_survive_syncs_reopens_and_a_torn_tail_across_block_boundaries() {
        let dir = TempDir::new("torn");
        let dir = &dir.0;
        let now = Timestamp::now();
        // Sizes that straddle 4 KiB blocks, synced at odd points, reopened in between.
        let sizes = [100usize, 5000, 4032, 1, 9000, 4096, 333];
        let payloads: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| payload(i as u64, n))
            .collect();
        let mut log = open(dir, u64::MAX);
        for (i, data) in payloads.iter().enumerate().take(3) {
            log.append(&batch(i as u64, data), now).unwrap();
        }
        log.sync().unwrap();
        log.append(&batch(3, &payloads[3]), now).unwrap();
        log.sync().unwrap();
        assert_eq!(log.durable(), (4, 8));
        drop(log);
        let mut log = open(dir, u64::MAX);
        assert_eq!(log.next_ordinal(), 4);
        for (i, data) in payloads.iter().enumerate().skip(4) {
            log.append(&batch(i as u64, data), now).unwrap();
            log.sync().unwrap();
        }
        // An append that was never synced is not durable and not in the file.
        log.append(&batch(7, b"lost"), now).unwrap();
        drop(log);
        // A torn write after the last record is cut on open.
        let path = segment_path(dir, 0, 0);
        let mut raw = OpenOptions::new().append(true).open(&path).unwrap();
        std::io::Write::write_all(&mut raw, &[0xEE; 100]).unwrap();
        drop(raw);
        let log = open(dir, u64::MAX);
        assert_eq!(log.next_ordinal(), 7);
        assert_eq!(log.segments(), 1);
        assert_eq!(
            payloads_of(read_records(dir, 0).unwrap()),
            payloads,
            "every synced record, bytes intact"
        );
    }

    #[test]
    fn segments_close_at_their_size_and_the_log_reads_on_across_them() {
        let dir = TempDir::new("segments");
        let dir = &dir.0;
        let now = Timestamp::now();
        let payloads: Vec<Vec<u8>> = (0..40).map(|i| payload(i, 700 + i as usize * 13)).collect();
        let mut log = open(dir, 8 << 10);
        for (i, data) in payloads.iter().enumerate() {
            log.append(&batch(i as u64, data), now).unwrap();
            if i % 3 == 2 {
                log.sync().unwrap();
            }
        }
        log.sync().unwrap();
        let segments = segment_list(dir, 0).unwrap();
        assert!(segments.len() >= 3, "{segments:?}");
        assert_eq!(segments[0], 0);
        // Each closed segment begins with the batch after the previous one's last, and its
        // padding was cut.
        for pair in segments.windows(2) {
            let path = segment_path(dir, 0, pair[0]);
            let scanned = scan(&path, pair[0], |_| Ok(())).unwrap();
            assert_eq!(scanned.end_ordinal, pair[1]);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), scanned.bytes);
        }
        drop(log);
        // A crash right after a new segment was created leaves it empty: removed on open.
        let empty = segment_path(dir, 0, 40);
        File::create(&empty).unwrap();
        let mut log = open(dir, 8 << 10);
        assert!(!empty.exists());
        assert_eq!(log.durable(), (40, 80));
        assert_eq!(log.segments(), segments.len());
        log.append(&batch(40, b"more"), now).unwrap();
        log.sync().unwrap();
        let mut all = payloads.clone();
        all.push(b"more".to_vec());
        assert_eq!(payloads_of(read_records(dir, 0).unwrap()), all);
    }

    #[test]
    fn retention_deletes_the_oldest_closed_segments_by_size_and_by_age() {
        let dir = TempDir::new("retention");
        let dir = &dir.0;
        let now = Timestamp::now();
        let mut log = open(dir, 4096);
        for i in 0..20 {
            // Each batch fills a segment of its own (64 + 4032 bytes).
            log.append(&batch(i, &payload(i, 4032)), now).unwrap();
            log.sync().unwrap();
        }
        assert_eq!(log.segments(), 21, "20 closed and an empty active one");
        let keep = |bytes| HistoryRetention { bytes, ms: 0 };
        // Keeps at least 10 segments' bytes.
        assert_eq!(
            log.apply_retention(keep(10 * 4096), SystemTime::now())
                .unwrap(),
            10
        );
        assert_eq!(segment_list(dir, 0).unwrap(), (10..20).collect::<Vec<_>>());
        assert_eq!(
            log.apply_retention(keep(10 * 4096), SystemTime::now())
                .unwrap(),
            0
        );
        // Unlimited keeps everything; age deletes every closed segment, never the active.
        assert_eq!(
            log.apply_retention(HistoryRetention::UNLIMITED, SystemTime::now())
                .unwrap(),
            0
        );
        let later = SystemTime::now() + Duration::from_secs(3600);
        let by_age = HistoryRetention { bytes: 0, ms: 1000 };
        assert_eq!(log.apply_retention(by_age, later).unwrap(), 10);
        log.append(&batch(20, b"next"), now).unwrap();
        log.sync().unwrap();
        assert_eq!(segment_list(dir, 0).unwrap(), [20]);
        drop(log);
        // Reopened, the log goes on where it was and its start is where retention left it.
        let log = open(dir, 4096);
        assert_eq!(log.durable(), (21, 42));
        let records = read_records(dir, 0).unwrap();
        assert_eq!(records[0].header.ordinal, 20);
    }

    #[test]
    fn a_log_started_at_an_origin_takes_batches_from_there() {
        let dir = TempDir::new("origin");
        let dir = &dir.0;
        let origin = LogOrigin {
            ordinal: 100,
            position: 200,
        };
        let mut log = ReplicaLog::open(dir, 0, origin, u64::MAX).unwrap();
        assert!(log.append(&batch(0, b"first"), Timestamp::now()).is_err());
        log.append(&batch(100, b"first"), Timestamp::now()).unwrap();
        log.sync().unwrap();
        assert_eq!(segment_list(dir, 0).unwrap(), [100]);
        drop(log);
        let log = ReplicaLog::open(dir, 0, LogOrigin::default(), u64::MAX).unwrap();
        assert_eq!(
            log.durable(),
            (101, 202),
            "the files, not the origin, say where it is"
        );
    }

    #[test]
    fn restore_takes_the_replica_that_replays_furthest_without_a_gap() {
        let longer = TempDir::new("restore-longer");
        let intact = TempDir::new("restore-intact");
        let now = Timestamp::now();
        // Two records per segment; the longer replica is damaged in its second segment.
        for (dir, batches) in [(&longer.0, 20), (&intact.0, 19)] {
            let mut log = open(dir, 300);
            for i in 0..batches {
                log.append(&batch(i, &payload(i, 100)), now).unwrap();
                log.sync().unwrap();
            }
            let description = TopicDescription {
                id: 0,
                name: "kept".into(),
                order: 5,
                ack: 2,
                replication_factor: 2,
                retention: 0,
                retention_bytes: 0,
                retention_ms: 0,
                origin_ordinal: 0,
                origin_position: 0,
            };
            let text = toml::to_string(&description).unwrap();
            std::fs::write(meta_path(dir, 0), text).unwrap();
        }
        let segments = segment_list(&longer.0, 0).unwrap();
        let path = segment_path(&longer.0, 0, segments[1]);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[RECORD_HEADER_BYTES + 5] ^= 0xFF;
        std::fs::write(&path, &bytes).unwrap();

        let pool = shared_log::heap::small_test_pool();
        let restored = restore(&pool, 0, &[longer.0.clone(), intact.0.clone()]).unwrap();
        let topic = &restored.topics[0];
        assert_eq!(
            topic.dir, intact.0,
            "the damaged replica replays only 2 batches"
        );
        assert_eq!((topic.end_ordinal, topic.end_position), (19, 38));
    }
}
