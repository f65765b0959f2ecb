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

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytemuck::{Pod, Zeroable};
use units::Timestamp;

use shared_log::coherence::SharedMemory;
use shared_log::pool::{Pool, TopicConfig, TopicId};
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
    /// Reserved, zero.
    pub reserved: [u8; 6],
}

const _: () = assert!(std::mem::size_of::<RecordHeader>() == RECORD_HEADER_BYTES);

impl RecordHeader {
    fn crc(&self) -> u32 {
        crc32c::crc32c(&bytemuck::bytes_of(self)[8..])
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
            reserved: [0; 6],
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
}

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

/// Path of the replica file of `topic` in `dir`.
pub fn log_path(dir: &Path, topic: TopicId) -> PathBuf {
    dir.join(format!("topic-{topic}.log"))
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

/// Reads the valid records of a replica file from the start; stops at the first torn or
/// damaged one. Returns the records and the byte length of the valid prefix.
pub fn read_records(path: &Path) -> Result<(Vec<ReplicaRecord>, u64), ReplicaError> {
    let mut records = Vec::new();
    let valid = scan(path, |record| {
        records.push(record);
        Ok(())
    })?;
    Ok((records, valid.bytes))
}

#[derive(Debug, Clone, Copy, Default)]
struct Scanned {
    bytes: u64,
    batches: u64,
    next_position: u64,
}

/// Reads the file's valid prefix record by record, handing each to `f` (which may stop the
/// scan with an error); returns what the prefix holds.
fn scan(
    path: &Path,
    mut f: impl FnMut(ReplicaRecord) -> Result<(), ReplicaError>,
) -> Result<Scanned, ReplicaError> {
    let mut file = match File::open(path) {
        Ok(file) => std::io::BufReader::new(file),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Scanned::default()),
        Err(e) => return Err(io_error(path, "open")(e)),
    };
    let mut scanned = Scanned::default();
    loop {
        let mut header = RecordHeader::zeroed();
        if read_full(&mut file, bytemuck::bytes_of_mut(&mut header), path)? {
            break;
        }
        if !header.is_valid() || header.ordinal != scanned.batches {
            break;
        }
        let mut payload = vec![0; header.payload_bytes as usize];
        if read_full(&mut file, &mut payload, path)? || crc32c::crc32c(&payload) != header.checksum
        {
            break;
        }
        scanned.bytes += (RECORD_HEADER_BYTES + payload.len()) as u64;
        scanned.batches += 1;
        scanned.next_position = header.global_start + u64::from(header.message_count);
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

/// Block size of direct I/O: offsets, lengths and buffers of `O_DIRECT` writes align to it.
const BLOCK_BYTES: usize = 4096;

/// One block of the write buffer (its alignment is what `O_DIRECT` needs).
#[repr(C, align(4096))]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Block([u8; BLOCK_BYTES]);

/// An append-only replica file of one topic.
///
/// Records go to a block-aligned buffer that starts at the file's last partial block; a sync
/// writes the buffer's blocks in place with one `O_DIRECT` write (the page cache copy cost
/// more CPU than anything else on the replica path) and then `fdatasync`s. The last block is
/// zero-padded on disk; the padding is cut when the file is opened again. Where the file
/// system refuses `O_DIRECT` (tmpfs), the same writes go through the page cache.
pub struct ReplicaFile {
    path: PathBuf,
    file: File,
    /// Records in the file (durable or pending).
    batches: u64,
    next_position: u64,
    /// Records and positions known durable.
    durable_batches: u64,
    durable_position: u64,
    /// The file's bytes from `buffer_offset` on: its last partial block, then what is
    /// pending; zero beyond `buffer_len`.
    buffer: Vec<Block>,
    buffer_offset: u64,
    buffer_len: usize,
    pending_bytes: usize,
    pending_since: Option<Timestamp>,
    direct: bool,
}

impl std::fmt::Debug for ReplicaFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaFile")
            .field("path", &self.path)
            .field("batches", &self.batches)
            .field("durable_batches", &self.durable_batches)
            .field("pending_bytes", &self.pending_bytes)
            .field("direct", &self.direct)
            .finish()
    }
}

impl ReplicaFile {
    /// Opens (or creates) the file of `topic` in `dir`, keeping its valid prefix and
    /// cutting anything after it.
    pub fn open(dir: &Path, topic: TopicId) -> Result<ReplicaFile, ReplicaError> {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};

        std::fs::create_dir_all(dir).map_err(io_error(dir, "create directory"))?;
        let path = log_path(dir, topic);
        let scanned = scan(&path, |_| Ok(()))?;
        let open = |flags: i32| {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .custom_flags(flags)
                .open(&path)
        };
        let (file, direct) = match open(libc::O_DIRECT) {
            Ok(file) => (file, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                log::info!(
                    "replica {}: the file system refuses O_DIRECT; writing through the page cache",
                    path.display()
                );
                (open(0).map_err(io_error(&path, "open"))?, false)
            }
            Err(e) => return Err(io_error(&path, "open")(e)),
        };
        let len = file.metadata().map_err(io_error(&path, "stat"))?.len();
        if len != scanned.bytes {
            log::info!(
                "replica {}: cutting {} bytes after the last valid record (batch {}): block \
                 padding, or a write a crash tore",
                path.display(),
                len - scanned.bytes,
                scanned.batches
            );
            file.set_len(scanned.bytes)
                .map_err(io_error(&path, "truncate"))?;
            file.sync_data().map_err(io_error(&path, "fdatasync"))?;
        }
        let buffer_offset = scanned.bytes - scanned.bytes % BLOCK_BYTES as u64;
        let buffer_len = (scanned.bytes - buffer_offset) as usize;
        let mut replica = ReplicaFile {
            path,
            file,
            batches: scanned.batches,
            next_position: scanned.next_position,
            durable_batches: scanned.batches,
            durable_position: scanned.next_position,
            buffer: vec![Block([0; BLOCK_BYTES])],
            buffer_offset,
            buffer_len,
            pending_bytes: 0,
            pending_since: None,
            direct,
        };
        if buffer_len > 0 {
            // The partial last block is read back through the page cache (a plain handle):
            // it is written again, whole, with the next records.
            let plain = File::open(&replica.path).map_err(io_error(&replica.path, "open"))?;
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut replica.buffer);
            plain
                .read_exact_at(&mut bytes[..buffer_len], buffer_offset)
                .map_err(io_error(&replica.path, "read"))?;
        }
        Ok(replica)
    }

    /// Batches in the file, durable or not.
    pub fn batches(&self) -> u64 {
        self.batches
    }

    /// (batches, next position) known durable.
    pub fn durable(&self) -> (u64, u64) {
        (self.durable_batches, self.durable_position)
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
        if batch.ordinal != self.batches || batch.global_start != self.next_position {
            return Err(ReplicaError::Diverged {
                path: self.path.clone(),
                ordinal: batch.ordinal,
                what: format!(
                    "the file continues at batch {} position {}, the pool offers batch {} \
                     position {}",
                    self.batches, self.next_position, batch.ordinal, batch.global_start
                ),
            });
        }
        let header = RecordHeader::for_batch(batch);
        self.push(bytemuck::bytes_of(&header));
        self.push(batch.payload);
        self.batches += 1;
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
    /// (`fdatasync`: the file's size changed, and the device may cache writes).
    pub fn sync(&mut self) -> Result<(), ReplicaError> {
        use std::os::unix::fs::FileExt;

        if self.pending_bytes == 0 {
            return Ok(());
        }
        let blocks = self.buffer_len.div_ceil(BLOCK_BYTES);
        let bytes: &[u8] = bytemuck::cast_slice(&self.buffer[..blocks]);
        self.file
            .write_all_at(bytes, self.buffer_offset)
            .map_err(io_error(&self.path, "write"))?;
        self.file
            .sync_data()
            .map_err(io_error(&self.path, "fdatasync"))?;
        // Keep the last partial block (rewritten with the next records), zero the rest.
        let whole = self.buffer_len / BLOCK_BYTES;
        self.buffer.copy_within(whole..blocks, 0);
        self.buffer.truncate(1);
        let tail = self.buffer_len - whole * BLOCK_BYTES;
        self.buffer[0].0[tail..].fill(0);
        self.buffer_offset += (whole * BLOCK_BYTES) as u64;
        self.buffer_len = tail;
        self.pending_bytes = 0;
        self.pending_since = None;
        self.durable_batches = self.batches;
        self.durable_position = self.next_position;
        Ok(())
    }
}

struct TopicReplica<M> {
    topic: TopicId,
    reader: LogReader<M>,
    file: ReplicaFile,
    /// Its frontier is published (and holds retention).
    holding: bool,
}

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
            let description = TopicDescription {
                id: topic,
                name,
                order: config.order as u8,
                ack: config.ack,
                replication_factor: config.replication_factor,
                retention: config.retention as u8,
            };
            let meta = meta_path(&self.config.dir, topic);
            let text = toml::to_string(&description).expect("a description serializes");
            std::fs::write(&meta, text).map_err(io_error(&meta, "write"))?;
            let file = ReplicaFile::open(&self.config.dir, topic)?;
            let mut reader = LogReader::new(self.pool.clone(), topic, true)
                .map_err(|source| ReplicaError::Read { topic, source })?;
            reader.set_next_ordinal(file.batches());
            log::info!(
                "broker {}: replicating topic {topic} ({:?}) to {} from batch {}",
                self.broker,
                description.name,
                file.path.display(),
                file.batches()
            );
            // It holds retention only once it has read from the pool: a replica that comes
            // back after its next batch was reclaimed must not pin the log where it is.
            self.topics.push(TopicReplica {
                topic,
                reader,
                file,
                holding: false,
            });
        }
        Ok(())
    }

    fn publish(&self, replica: &TopicReplica<M>, heartbeat: u64) {
        let (batches, position) = replica.file.durable();
        self.pool
            .publish_replicated(replica.topic, self.broker, batches + 1, position, heartbeat);
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
                .saturating_sub(replica.file.pending_bytes());
            let batches = if room == 0 { 0 } else { BATCHES_PER_POLL_MAX };
            let result = replica.reader.poll(batches, |batch| {
                if failed.is_none()
                    && let Err(e) = replica.file.append(batch, now)
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
            let synced = replica.file.sync_due(&self.config, now);
            if synced {
                replica.file.sync()?;
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
            replica.file.sync()?;
        }
        self.release();
        Ok(())
    }

    /// Marks every topic's replica as not running, so it no longer holds retention (after
    /// an error, and on a clean stop); what is durable keeps counting for ack level 2.
    pub fn release(&mut self) {
        for replica in &mut self.topics {
            let (_, position) = replica.file.durable();
            self.pool
                .publish_replicated(replica.topic, self.broker, 0, position, 0);
            replica.holding = false;
        }
        self.pool.mem().fence();
    }
}

/// What [`restore`] rebuilt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// Per topic: name, batches, messages, and the replica file they came from.
    pub topics: Vec<(String, u64, u64, PathBuf)>,
}

/// Rebuilds a lost pool's log from replica files: for every topic described in `dirs`, the
/// longest replica (every batch acknowledged at level 2 is in it) is written back through
/// the ring of the broker that first took each batch and ordered again, by a sequencer on
/// broker `head` that never holds a gap open, so every batch gets the position it had. The pool must be freshly formatted and no other
/// broker attached yet. The files used are moved aside (`DIR/restored-<ns>/`), because the
/// rebuilt pool's replicas start over from its first batch.
pub fn restore<M: SharedMemory + Clone>(
    pool: &Pool<M>,
    head: u16,
    dirs: &[PathBuf],
) -> Result<Restored, ReplicaError> {
    use shared_log::sequencer::{Sequencer, SequencerConfig};
    use shared_log::writer::{AppendError, BatchMeta, TopicWriter};

    let mut descriptions: Vec<(TopicDescription, PathBuf, u64)> = Vec::new();
    for dir in dirs {
        let entries = std::fs::read_dir(dir).map_err(io_error(dir, "list"))?;
        for entry in entries {
            let path = entry.map_err(io_error(dir, "list"))?.path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let description = TopicDescription::load(&path)?;
            let log = log_path(dir, description.id);
            let batches = scan(&log, |_| Ok(()))?.batches;
            match descriptions
                .iter_mut()
                .find(|(d, ..)| d.id == description.id)
            {
                Some(best) if best.2 >= batches => {}
                Some(best) => *best = (description, log, batches),
                None => descriptions.push((description, log, batches)),
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
    for (description, log, _) in &descriptions {
        let topic = pool
            .create_topic(&description.name, description.config()?)
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
        let scanned = scan(log, |record| {
            let meta = BatchMeta {
                client_id: record.header.client_id,
                session_epoch: record.header.session_epoch,
                batch_seq: record.header.batch_seq,
                message_count: record.header.message_count,
                checksum: record.header.checksum,
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
                    path: log.clone(),
                    ordinal: record.header.ordinal,
                    what: format!(
                        "batch placed at {placed:?} on restore, the replica says {}",
                        record.header.global_start
                    ),
                });
            }
            Ok(())
        })?;
        restored.topics.push((
            description.name.clone(),
            scanned.batches,
            scanned.next_position,
            log.clone(),
        ));
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
            checksum: crc32c::crc32c(payload),
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

    #[test]
    fn records_survive_syncs_reopens_and_a_torn_tail_across_block_boundaries() {
        let dir = std::env::temp_dir().join(format!("embarcadero-replica-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let now = Timestamp::now();
        // Sizes that straddle 4 KiB blocks, synced at odd points, reopened in between.
        let sizes = [100usize, 5000, 4032, 1, 9000, 4096, 333];
        let payloads: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| payload(i as u64, n))
            .collect();
        let mut file = ReplicaFile::open(&dir, 0).unwrap();
        for (i, data) in payloads.iter().enumerate().take(3) {
            file.append(&batch(i as u64, data), now).unwrap();
        }
        file.sync().unwrap();
        file.append(&batch(3, &payloads[3]), now).unwrap();
        file.sync().unwrap();
        assert_eq!(file.durable(), (4, 8));
        drop(file);
        let mut file = ReplicaFile::open(&dir, 0).unwrap();
        assert_eq!(file.batches(), 4);
        for (i, data) in payloads.iter().enumerate().skip(4) {
            file.append(&batch(i as u64, data), now).unwrap();
            file.sync().unwrap();
        }
        // An append that was never synced is not durable and not in the file.
        file.append(&batch(7, b"lost"), now).unwrap();
        drop(file);
        // A torn write after the last record is cut on open.
        let path = log_path(&dir, 0);
        let mut raw = OpenOptions::new().append(true).open(&path).unwrap();
        std::io::Write::write_all(&mut raw, &[0xEE; 100]).unwrap();
        drop(raw);
        let file = ReplicaFile::open(&dir, 0).unwrap();
        assert_eq!(file.batches(), 7);
        let (records, _) = read_records(&path).unwrap();
        let read: Vec<Vec<u8>> = records.into_iter().map(|r| r.payload).collect();
        assert_eq!(read, payloads, "every synced record, bytes intact");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
