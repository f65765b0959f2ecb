//! The layout of the shared pool: fixed `#[repr(C)]` records at offsets computed from a
//! [`Geometry`] stored in the pool header. Offsets only, never pointers, so every process may
//! map the pool at its own address. See `docs/memory-layout.md` for the diagram.
//!
//! Every record whose readers poll it ends with a `u64` ready word, written last by its
//! single writer and compared by readers with the value they expect (a lap-unique sequence
//! number plus one), so a stale or half-published record is never taken for a fresh one.

use bytemuck::{Pod, Zeroable};

use crate::coherence::CACHE_LINE_BYTES;

/// "EMBRCDRO": the first eight bytes of every pool.
pub const POOL_MAGIC: u64 = u64::from_le_bytes(*b"EMBRCDRO");
/// Version of this layout; a pool of another version is refused on attach.
pub const LAYOUT_VERSION: u32 = 4;
/// Value of the header's ready word once formatting is complete.
pub const POOL_FORMATTED: u64 = u64::from_le_bytes(*b"FORMATED");
/// Alignment of the large regions (rings, GOI, payload logs).
pub const REGION_ALIGN_BYTES: u64 = 4096;
/// Most brokers one pool can serve.
pub const BROKERS_MAX: u32 = 64;
/// Most topics one pool can hold.
pub const TOPICS_MAX: u32 = 256;
/// Longest topic name in bytes.
pub const TOPIC_NAME_BYTES_MAX: usize = 64;
/// Offset of the sequencer lease record (right after the pool header).
pub const LEASE_OFFSET: u64 = std::mem::size_of::<PoolHeader>() as u64;
/// Offset of the lease's epoch word (the one word standbys compare-and-swap).
pub const LEASE_EPOCH_OFFSET: u64 =
    LEASE_OFFSET + std::mem::offset_of!(SequencerLease, epoch) as u64;
/// Offset of the lease's heartbeat word.
pub const LEASE_HEARTBEAT_OFFSET: u64 =
    LEASE_OFFSET + std::mem::offset_of!(SequencerLease, heartbeat) as u64;
/// Where the lease's `lease_ms` is.
pub const LEASE_MS_OFFSET: u64 =
    LEASE_OFFSET + std::mem::offset_of!(SequencerLease, lease_ms) as u64;
/// Where the lease's `taken_over` word is.
pub const LEASE_TAKEN_OVER_OFFSET: u64 =
    LEASE_OFFSET + std::mem::offset_of!(SequencerLease, taken_over) as u64;
/// Offset of the broker claims: one [`BrokerClaim`] per possible broker id
/// ([`BROKERS_MAX`] of them, whatever the geometry), right after the lease.
pub const CLAIMS_OFFSET: u64 = LEASE_OFFSET + std::mem::size_of::<SequencerLease>() as u64;
/// Offset of the claims' end (the topic table follows).
const CLAIMS_END: u64 =
    CLAIMS_OFFSET + BROKERS_MAX as u64 * std::mem::size_of::<BrokerClaim>() as u64;
/// Alignment of each batch's payload in a payload log, so two batches never share a line.
pub const PAYLOAD_ALIGN_BYTES: u64 = CACHE_LINE_BYTES;

/// A record with a ready word in its last eight bytes.
pub trait Record: Pod {
    /// Offset of the ready word inside the record.
    const READY_OFFSET: u64 = std::mem::size_of::<Self>() as u64 - 8;
    /// The record's ready word.
    fn ready(&self) -> u64;
}

/// Pool header at offset 0 (two cache lines). Written once by the process that formats the
/// pool, ready word last.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct PoolHeader {
    /// [`POOL_MAGIC`].
    pub magic: u64,
    /// [`LAYOUT_VERSION`].
    pub layout_version: u32,
    /// `size_of::<PoolHeader>()`, a second check on the version.
    pub header_bytes: u32,
    /// Size of the mapped pool when it was formatted.
    pub pool_bytes: u64,
    /// Creation epoch: nanoseconds since the Unix epoch when the pool was formatted.
    pub creation_epoch_ns: u64,
    /// Brokers the pool has room for.
    pub brokers_max: u32,
    /// Topics the pool has room for.
    pub topics_max: u32,
    /// Batch-header ring slots per broker per topic (a power of two).
    pub ring_slots: u32,
    /// Reserved, zero.
    pub reserved0: u32,
    /// Global order index entries per topic (a power of two).
    pub goi_entries: u64,
    /// Payload log bytes per broker per topic.
    pub blog_bytes: u64,
    /// Bytes the layout needs, recomputed and compared on attach.
    pub layout_bytes: u64,
    /// Reserved, zero.
    pub reserved1: [u64; 6],
    /// [`POOL_FORMATTED`] once every other field and the zeroed regions are visible.
    pub ready: u64,
}

impl Record for PoolHeader {
    fn ready(&self) -> u64 {
        self.ready
    }
}

/// The sequencer lease: who sequences, under which epoch, and a heartbeat a standby
/// watches. Written only by the sequencer that holds the lease.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct SequencerLease {
    /// Broker id of the holder.
    pub holder_broker: u32,
    /// Reserved, zero.
    pub reserved0: u32,
    /// Epoch of the holder; a higher epoch fences every lower one.
    pub epoch: u64,
    /// Incremented by the holder while it runs.
    pub heartbeat: u64,
    /// How long a standby waits for the heartbeat to move before it may take over.
    pub lease_ms: u64,
    /// The broker this holder took the lease over from and its own first heartbeat, in one
    /// word so that a reader never pairs one takeover's broker with another's heartbeat
    /// ([`TakenOver`]; 0: none, a fresh pool). That broker's subscribed and replicated lines
    /// written before the takeover hold no retention: it is dead or fenced, and waiting for
    /// them to go stale would stall every writer of a full log meanwhile.
    pub taken_over: u64,
    /// Reserved, zero.
    pub reserved1: [u64; 2],
    /// Epoch plus one once the record is published.
    pub ready: u64,
}

/// A takeover of the sequencer lease, as [`SequencerLease::taken_over`] holds it: the
/// broker plus one in the top byte, the heartbeat in the other 56 bits (at a beat every few
/// milliseconds, 2^56 beats take millions of years).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TakenOver {
    /// The broker the lease was taken over from.
    pub broker: u16,
    /// The new holder's first heartbeat.
    pub heartbeat: u64,
}

impl TakenOver {
    const HEARTBEAT_BITS: u32 = 56;

    /// The word for this takeover.
    pub fn encode(self) -> u64 {
        debug_assert!(u32::from(self.broker) < BROKERS_MAX);
        ((u64::from(self.broker) + 1) << Self::HEARTBEAT_BITS)
            | (self.heartbeat & ((1 << Self::HEARTBEAT_BITS) - 1))
    }

    /// The takeover a word records, if any.
    pub fn decode(word: u64) -> Option<TakenOver> {
        let broker_plus_one = word >> Self::HEARTBEAT_BITS;
        let broker = u16::try_from(broker_plus_one.checked_sub(1)?).ok()?;
        Some(TakenOver {
            broker,
            heartbeat: word & ((1 << Self::HEARTBEAT_BITS) - 1),
        })
    }
}

impl Record for SequencerLease {
    fn ready(&self) -> u64 {
        self.ready
    }
}

/// The claim on one broker id: which process runs as that broker, and a heartbeat that
/// says it still does. A process claims the id by compare-and-swap of `owner` (from 0, or
/// from the token of a claim whose heartbeat stayed still for its lease), then publishes
/// the rest, `ready` last; from then on only it writes the line, until it sets `owner` back
/// to 0 on an orderly stop. See [`crate::claim`].
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct BrokerClaim {
    /// The claimant's token (a random nonzero nonce); 0 when the id is free.
    pub owner: u64,
    /// Incremented by the claimant every quarter of its lease while it runs.
    pub heartbeat: u64,
    /// Which kernel the claimant runs on (a hash of its boot id).
    pub host_id: u64,
    /// How long the heartbeat may stay still before the claim counts as dead.
    pub lease_ms: u64,
    /// Wall-clock time of the claim, milliseconds since the Unix epoch.
    pub claimed_unix_ms: u64,
    /// Process id of the claimant (in its own pid namespace).
    pub pid: u32,
    /// The IPv4 address clients reach the claimant at (`u32::from(Ipv4Addr)`), written once
    /// it listens; 0 while not advertised (an IPv6 or unspecified listen address).
    pub listen_ip: u32,
    /// The port of `listen_ip`; 0 while not advertised.
    pub listen_port: u16,
    /// The port of the claimant's Kafka listener; 0 when it has none (or it is not
    /// advertised).
    pub kafka_port: u16,
    /// The IPv4 address Kafka clients reach the claimant at; 0 when not advertised.
    pub kafka_ip: u32,
    /// `owner` once the other fields are published.
    pub ready: u64,
}

impl Record for BrokerClaim {
    fn ready(&self) -> u64 {
        self.ready
    }
}

/// Offset of the claim on broker id `broker` (below [`BROKERS_MAX`]).
pub fn claim_offset(broker: u16) -> u64 {
    debug_assert!(u32::from(broker) < BROKERS_MAX);
    CLAIMS_OFFSET + u64::from(broker) * std::mem::size_of::<BrokerClaim>() as u64
}

/// Offset of the claim's owner word (the one word claimants compare-and-swap).
pub const CLAIM_OWNER_OFFSET: u64 = std::mem::offset_of!(BrokerClaim, owner) as u64;
/// Offset of the claim's heartbeat word.
pub const CLAIM_HEARTBEAT_OFFSET: u64 = std::mem::offset_of!(BrokerClaim, heartbeat) as u64;
/// Offset of `listen_ip` in a [`BrokerClaim`] (`listen_port`, `kafka_port` and `kafka_ip`
/// follow it).
pub const CLAIM_LISTEN_OFFSET: u64 = std::mem::offset_of!(BrokerClaim, listen_ip) as u64;
const _: () = assert!(
    std::mem::offset_of!(BrokerClaim, kafka_ip) as u64 == CLAIM_LISTEN_OFFSET + 8,
    "the advertised addresses are one write"
);

/// One entry of the topic table. Written once by the head broker when it creates the topic.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct TopicMeta {
    /// Topic name, `name_bytes` long.
    pub name: [u8; TOPIC_NAME_BYTES_MAX],
    /// Length of the name.
    pub name_bytes: u32,
    /// Ordering level (0, 1, 2 or 5), see [`crate::Order`].
    pub order: u8,
    /// Default acknowledgement level (0, 1 or 2).
    pub ack: u8,
    /// Replication factor, counting the pool copy.
    pub replication_factor: u8,
    /// How subscribers hold the log, a `wire::Retention` value.
    pub retention: u8,
    /// Disk history each replica keeps, in bytes (0: no limit).
    pub retention_bytes: u64,
    /// Age of disk history each replica keeps, in milliseconds (0: no limit).
    pub retention_ms: u64,
    /// Ordinal of the topic's first batch (0, or further on for a topic restored from
    /// replicas whose oldest segments were deleted).
    pub origin_ordinal: u64,
    /// Global position of that batch's first message.
    pub origin_position: u64,
    /// Reserved, zero.
    pub reserved1: [u64; 2],
    /// [`TOPIC_CREATED`] once the entry is published.
    pub ready: u64,
}

/// Ready word of a created topic.
pub const TOPIC_CREATED: u64 = 1;

impl Record for TopicMeta {
    fn ready(&self) -> u64 {
        self.ready
    }
}

/// A batch header in a broker's ring. Single writer: that broker; single reader: the
/// sequencer. The payload sits in the broker's payload log at `blog_offset`.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy, Pod, Zeroable, PartialEq, Eq)]
pub struct BatchHeader {
    /// Logical offset of the payload in the broker's payload log (grows without wrapping;
    /// the physical place is this modulo the log size).
    pub blog_offset: u64,
    /// Publisher id.
    pub client_id: u64,
    /// Publisher's batch sequence within its session.
    pub batch_seq: u64,
    /// Payload bytes (length-prefixed messages, see `wire::payload`).
    pub payload_bytes: u32,
    /// Messages in the payload.
    pub message_count: u32,
    /// Publisher's session epoch.
    pub session_epoch: u32,
    /// CRC-32C of the payload.
    pub checksum: u32,
    /// Ordering level the publisher asked for; must equal the topic's.
    pub order: u8,
    /// [`BATCH_SEQ_COUNTS_MESSAGES`], [`BATCH_RECORD_BATCHES`], both or 0.
    pub flags: u8,
    /// Reserved, zero.
    pub reserved: [u8; 14],
    /// Slot sequence number plus one: lap-unique, so a slot left from the previous lap is
    /// never mistaken for a new one.
    pub ready: u64,
}

impl Record for BatchHeader {
    fn ready(&self) -> u64 {
        self.ready
    }
}

/// Batch flag: the session numbers messages, not batches (a Kafka idempotent producer's
/// sequences): the batch after sequence `s` of `n` messages is `s + n`, not `s + 1`. Zero in
/// pools written before it, which then number batches, as they did.
pub const BATCH_SEQ_COUNTS_MESSAGES: u8 = 1;

/// Batch flag: the payload is Kafka record batches (magic 2, `wire::record_batch`) as a
/// Kafka producer sent them, one message per record, instead of length-prefixed messages
/// (`wire::payload`). Zero in pools written before it, whose payloads are all messages.
pub const BATCH_RECORD_BATCHES: u8 = 2;

/// What became of a committed batch; stored as a `u32` code in its completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CompletionStatus {
    /// Placed in the total order.
    Ordered,
    /// Already in the log (or held for ordering) under the same session and sequence.
    Duplicate,
    /// Order 5: the session's sequence was skipped by the gap rule before it arrived.
    RejectedGap,
    /// Older than the session's deduplication window: cannot tell whether it is a duplicate.
    RejectedOutsideWindow,
    /// The batch header is impossible (sizes, offsets, order); see the sequencer's log.
    RejectedInvalid,
    /// A code this build does not know (a pool written by a newer sequencer).
    Unknown(u32),
}

impl CompletionStatus {
    /// The code stored in the pool.
    pub fn code(self) -> u32 {
        match self {
            CompletionStatus::Ordered => 0,
            CompletionStatus::Duplicate => 1,
            CompletionStatus::RejectedGap => 2,
            CompletionStatus::RejectedOutsideWindow => 3,
            CompletionStatus::RejectedInvalid => 4,
            CompletionStatus::Unknown(code) => code,
        }
    }

    /// The status for a stored code.
    pub fn from_code(code: u32) -> CompletionStatus {
        match code {
            0 => CompletionStatus::Ordered,
            1 => CompletionStatus::Duplicate,
            2 => CompletionStatus::RejectedGap,
            3 => CompletionStatus::RejectedOutsideWindow,
            4 => CompletionStatus::RejectedInvalid,
            other => CompletionStatus::Unknown(other),
        }
    }

    /// True when the batch is in the log (ordered now or before).
    pub fn is_in_log(self) -> bool {
        matches!(
            self,
            CompletionStatus::Ordered | CompletionStatus::Duplicate
        )
    }
}

/// The sequencer's answer for one ring slot, read by the broker that owns the ring (to ACK
/// and to free space). Two per cache line, all written by the sequencer.
#[repr(C, align(32))]
#[derive(Debug, Clone, Copy, Pod, Zeroable, PartialEq, Eq)]
pub struct Completion {
    /// First global position of the batch when `status` is ordered (or duplicate with a
    /// known original position), else `u64::MAX`.
    pub global_start: u64,
    /// A [`CompletionStatus`] code.
    pub status: u32,
    /// Reserved, zero.
    pub reserved0: u32,
    /// The batch's ordinal in the GOI when ordered now, else `u64::MAX` (its payload is
    /// then not part of the log and may be reclaimed at once).
    pub ordinal: u64,
    /// Slot sequence number plus one.
    pub ready: u64,
}

impl Record for Completion {
    fn ready(&self) -> u64 {
        self.ready
    }
}

/// One entry of a topic's global order index: the batch at ordinal `ready - 1` of the total
/// order. Written by the sequencer.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy, Pod, Zeroable, PartialEq, Eq)]
pub struct GoiEntry {
    /// Global position of the batch's first message.
    pub global_start: u64,
    /// Logical payload log offset in the owning broker's log.
    pub blog_offset: u64,
    /// Publisher id.
    pub client_id: u64,
    /// Publisher's batch sequence.
    pub batch_seq: u64,
    /// Payload bytes.
    pub payload_bytes: u32,
    /// Messages in the batch.
    pub message_count: u32,
    /// Publisher's session epoch.
    pub session_epoch: u32,
    /// CRC-32C of the payload.
    pub checksum: u32,
    /// Broker whose payload log holds the batch.
    pub broker: u16,
    /// The batch header's flags ([`BATCH_SEQ_COUNTS_MESSAGES`] or 0), for a standby that
    /// rebuilds sessions from the GOI.
    pub flags: u16,
    /// Reserved, zero.
    pub reserved1: u32,
    /// Ordinal of the batch in the total order plus one.
    pub ready: u64,
}

impl Record for GoiEntry {
    fn ready(&self) -> u64 {
        self.ready
    }
}

/// Session records per topic (a power of two): the sequencer's memory of publisher sessions
/// beyond the GOI it keeps, for a standby that takes the lease over.
pub const SESSION_RECORDS: u64 = 4096;

/// What the sequencer knows of one publisher session, kept in the pool so that a standby
/// taking the lease over can rebuild it (with the GOI entries still held). Written only by
/// the sequencer; `next_seq == 0` marks a free record. Placed by a hash of the session,
/// probing a few records; when all are taken, the least recently ordered one gives way.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy, Pod, Zeroable, PartialEq, Eq)]
pub struct SessionRecord {
    /// Publisher id.
    pub client_id: u64,
    /// Publisher's session epoch.
    pub session_epoch: u32,
    /// Reserved, zero.
    pub reserved0: u32,
    /// Highest batch sequence ordered, plus one (0: free record).
    pub next_seq: u64,
    /// Sequences below this are outside the deduplication window.
    pub window_floor: u64,
    /// Ordinal of the session's last ordered batch (for replacement).
    pub last_ordinal: u64,
    /// Reserved, zero.
    pub reserved1: [u64; 3],
}

/// A frontier word on a cache line of its own, with a single writer.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct FrontierLine {
    /// The frontier.
    pub value: u64,
    /// A second value of the same writer, updated together (see each frontier's doc).
    pub aux: u64,
    /// Reserved, zero.
    pub reserved: [u64; 6],
}

const _: () = {
    assert!(std::mem::size_of::<PoolHeader>() == 128);
    assert!(std::mem::align_of::<PoolHeader>() == 64);
    assert!(std::mem::size_of::<SequencerLease>() == 64);
    assert!(std::mem::size_of::<BrokerClaim>() == 64);
    assert!(std::mem::align_of::<BrokerClaim>() == 64);
    assert!(CLAIMS_OFFSET % 64 == 0);
    assert!(std::mem::size_of::<SessionRecord>() == 64);
    assert!(std::mem::size_of::<TopicMeta>() == 128);
    assert!(std::mem::size_of::<BatchHeader>() == 64);
    assert!(std::mem::align_of::<BatchHeader>() == 64);
    assert!(std::mem::size_of::<Completion>() == 32);
    assert!(std::mem::size_of::<GoiEntry>() == 64);
    assert!(std::mem::size_of::<FrontierLine>() == 64);
    assert!(std::mem::align_of::<FrontierLine>() == 64);
};

/// Why a geometry cannot be laid out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    /// A count is zero or above its maximum.
    #[error("{what} is {value}, expected 1..={max}")]
    OutOfRange {
        /// Which parameter.
        what: &'static str,
        /// Its value.
        value: u64,
        /// Its maximum.
        max: u64,
    },
    /// A count that must be a power of two is not.
    #[error("{what} is {value}, expected a power of two")]
    NotPowerOfTwo {
        /// Which parameter.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// The payload log size is not a multiple of the region alignment.
    #[error("payload log of {blog_bytes} bytes is not a multiple of {REGION_ALIGN_BYTES}")]
    BlogUnaligned {
        /// The size asked for.
        blog_bytes: u64,
    },
    /// The layout does not fit in the pool.
    #[error(
        "pool of {pool_bytes} bytes is too small: this geometry needs {layout_bytes} bytes \
         ({brokers_max} brokers x {topics_max} topics, {blog_bytes}-byte payload logs)"
    )]
    PoolTooSmall {
        /// Pool size.
        pool_bytes: u64,
        /// Bytes needed.
        layout_bytes: u64,
        /// Brokers.
        brokers_max: u32,
        /// Topics.
        topics_max: u32,
        /// Payload log size.
        blog_bytes: u64,
    },
}

/// The shape of a pool: how many of each region and how large. Stored in the header, so a
/// process that attaches learns it from the pool itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Brokers the pool has room for.
    pub brokers_max: u32,
    /// Topics the pool has room for.
    pub topics_max: u32,
    /// Ring slots per broker per topic (power of two).
    pub ring_slots: u32,
    /// Global order index entries per topic (power of two).
    pub goi_entries: u64,
    /// Payload log bytes per broker per topic (multiple of [`REGION_ALIGN_BYTES`]).
    pub blog_bytes: u64,
}

/// Offsets within one topic's region, relative to the topic's base.
#[derive(Debug, Clone, Copy)]
struct TopicOffsets {
    seq_state: u64,
    broker_block: u64,
    broker_block_bytes: u64,
    frontiers: u64,
    ring: u64,
    completions: u64,
    goi: u64,
    sessions: u64,
    blogs: u64,
    topic_bytes: u64,
}

/// Frontier lines per broker per topic, in this order.
const FRONTIERS_PER_BROKER: u64 = 4;
/// Broker-written: `value` = ring slots published, `aux` = payload bytes below which the log
/// may already be overwritten (the overwrite limit readers check).
pub const FRONTIER_WRITTEN: u64 = 0;
/// Sequencer-written: `value` = ring slots released (a gap-free prefix of decided slots),
/// `aux` = batches of this ring placed in the order.
pub const FRONTIER_ORDERED: u64 = 1;
/// Replica-written: `value` = ordinals durably replicated.
pub const FRONTIER_REPLICATED: u64 = 2;
/// Broker-written: `value` = 0 when none of this broker's subscribers holds the topic, else
/// one more than the lowest ordinal they still need. Writers keep those payloads and the
/// sequencer keeps those GOI entries (retention follows the slowest connected subscriber).
pub const FRONTIER_SUBSCRIBED: u64 = 3;

fn align_up(value: u64, align: u64) -> u64 {
    value.div_ceil(align) * align
}

impl Geometry {
    /// Checks ranges and powers of two.
    pub fn validate(&self) -> Result<(), GeometryError> {
        let ranges = [
            (
                "brokers_max",
                u64::from(self.brokers_max),
                u64::from(BROKERS_MAX),
            ),
            (
                "topics_max",
                u64::from(self.topics_max),
                u64::from(TOPICS_MAX),
            ),
            ("ring_slots", u64::from(self.ring_slots), 1 << 24),
            ("goi_entries", self.goi_entries, 1 << 40),
            ("blog_bytes", self.blog_bytes, 1 << 50),
        ];
        for (what, value, max) in ranges {
            if value == 0 || value > max {
                return Err(GeometryError::OutOfRange { what, value, max });
            }
        }
        for (what, value) in [
            ("ring_slots", u64::from(self.ring_slots)),
            ("goi_entries", self.goi_entries),
        ] {
            if !value.is_power_of_two() {
                return Err(GeometryError::NotPowerOfTwo { what, value });
            }
        }
        if self.blog_bytes % REGION_ALIGN_BYTES != 0 {
            return Err(GeometryError::BlogUnaligned {
                blog_bytes: self.blog_bytes,
            });
        }
        Ok(())
    }

    fn topic_offsets(&self) -> TopicOffsets {
        let seq_state = 0;
        let broker_block = REGION_ALIGN_BYTES;
        let frontiers = 0;
        let ring = FRONTIERS_PER_BROKER * CACHE_LINE_BYTES;
        let ring_bytes = u64::from(self.ring_slots) * std::mem::size_of::<BatchHeader>() as u64;
        let completions = ring + ring_bytes;
        let completion_bytes =
            u64::from(self.ring_slots) * std::mem::size_of::<Completion>() as u64;
        let broker_block_bytes = align_up(completions + completion_bytes, REGION_ALIGN_BYTES);
        let goi = broker_block + u64::from(self.brokers_max) * broker_block_bytes;
        let goi_bytes = self.goi_entries * std::mem::size_of::<GoiEntry>() as u64;
        let sessions = goi + goi_bytes;
        let session_bytes = SESSION_RECORDS * std::mem::size_of::<SessionRecord>() as u64;
        let blogs = align_up(sessions + session_bytes, REGION_ALIGN_BYTES);
        let topic_bytes = blogs + u64::from(self.brokers_max) * self.blog_bytes;
        TopicOffsets {
            seq_state,
            broker_block,
            broker_block_bytes,
            frontiers,
            ring,
            completions,
            goi,
            sessions,
            blogs,
            topic_bytes,
        }
    }

    /// Offset of the topic table.
    pub fn topic_table_offset(&self) -> u64 {
        CLAIMS_END
    }

    fn topics_offset(&self) -> u64 {
        let table_end = self.topic_table_offset()
            + u64::from(self.topics_max) * std::mem::size_of::<TopicMeta>() as u64;
        align_up(table_end, REGION_ALIGN_BYTES)
    }

    /// Bytes this geometry needs (assumes [`Geometry::validate`] passed).
    pub fn layout_bytes(&self) -> u64 {
        self.topics_offset() + u64::from(self.topics_max) * self.topic_offsets().topic_bytes
    }

    /// Checks the geometry and that it fits in `pool_bytes`.
    pub fn check_fits(&self, pool_bytes: u64) -> Result<(), GeometryError> {
        self.validate()?;
        let layout_bytes = self.layout_bytes();
        if layout_bytes > pool_bytes {
            return Err(GeometryError::PoolTooSmall {
                pool_bytes,
                layout_bytes,
                brokers_max: self.brokers_max,
                topics_max: self.topics_max,
                blog_bytes: self.blog_bytes,
            });
        }
        Ok(())
    }

    /// The largest payload logs that fit `pool_bytes` with the other parameters given.
    pub fn fit(
        pool_bytes: u64,
        brokers_max: u32,
        topics_max: u32,
        ring_slots: u32,
        goi_entries: u64,
    ) -> Result<Geometry, GeometryError> {
        let mut geometry = Geometry {
            brokers_max,
            topics_max,
            ring_slots,
            goi_entries,
            blog_bytes: REGION_ALIGN_BYTES,
        };
        geometry.check_fits(pool_bytes)?;
        let fixed = geometry.layout_bytes()
            - u64::from(topics_max) * u64::from(brokers_max) * REGION_ALIGN_BYTES;
        let per_blog = (pool_bytes - fixed) / (u64::from(topics_max) * u64::from(brokers_max));
        geometry.blog_bytes = per_blog / REGION_ALIGN_BYTES * REGION_ALIGN_BYTES;
        geometry.check_fits(pool_bytes)?;
        Ok(geometry)
    }

    fn topic_base(&self, topic: u32) -> u64 {
        debug_assert!(topic < self.topics_max);
        self.topics_offset() + u64::from(topic) * self.topic_offsets().topic_bytes
    }

    fn broker_base(&self, topic: u32, broker: u16) -> u64 {
        debug_assert!(u32::from(broker) < self.brokers_max);
        let offsets = self.topic_offsets();
        self.topic_base(topic)
            + offsets.broker_block
            + u64::from(broker) * offsets.broker_block_bytes
    }

    /// Offset of a topic's table entry.
    pub fn topic_meta_offset(&self, topic: u32) -> u64 {
        debug_assert!(topic < self.topics_max);
        self.topic_table_offset() + u64::from(topic) * std::mem::size_of::<TopicMeta>() as u64
    }

    /// Offset of a topic's sequencer state line (`value` = GOI entries committed, `aux` =
    /// next global position).
    pub fn seq_state_offset(&self, topic: u32) -> u64 {
        self.topic_base(topic) + self.topic_offsets().seq_state
    }

    /// Offset of one of a broker's frontier lines (`FRONTIER_*`).
    pub fn frontier_offset(&self, topic: u32, broker: u16, frontier: u64) -> u64 {
        debug_assert!(frontier < FRONTIERS_PER_BROKER);
        self.broker_base(topic, broker)
            + self.topic_offsets().frontiers
            + frontier * CACHE_LINE_BYTES
    }

    /// Offset of the ring slot that holds slot sequence number `slot`.
    pub fn ring_slot_offset(&self, topic: u32, broker: u16, slot: u64) -> u64 {
        let index = slot & u64::from(self.ring_slots - 1);
        self.broker_base(topic, broker)
            + self.topic_offsets().ring
            + index * std::mem::size_of::<BatchHeader>() as u64
    }

    /// Offset of the completion for slot sequence number `slot`.
    pub fn completion_offset(&self, topic: u32, broker: u16, slot: u64) -> u64 {
        let index = slot & u64::from(self.ring_slots - 1);
        self.broker_base(topic, broker)
            + self.topic_offsets().completions
            + index * std::mem::size_of::<Completion>() as u64
    }

    /// Offset of the GOI entry that holds ordinal `ordinal`.
    pub fn goi_offset(&self, topic: u32, ordinal: u64) -> u64 {
        let index = ordinal & (self.goi_entries - 1);
        self.topic_base(topic)
            + self.topic_offsets().goi
            + index * std::mem::size_of::<GoiEntry>() as u64
    }

    /// Offset of session record `index` (taken modulo [`SESSION_RECORDS`]).
    pub fn session_record_offset(&self, topic: u32, index: u64) -> u64 {
        self.topic_base(topic)
            + self.topic_offsets().sessions
            + (index & (SESSION_RECORDS - 1)) * std::mem::size_of::<SessionRecord>() as u64
    }

    /// Offset of the first byte of a broker's payload log.
    pub fn blog_base(&self, topic: u32, broker: u16) -> u64 {
        self.topic_base(topic) + self.topic_offsets().blogs + u64::from(broker) * self.blog_bytes
    }

    /// Offset of logical payload log byte `logical` (callers never span the log's end).
    pub fn blog_offset(&self, topic: u32, broker: u16, logical: u64) -> u64 {
        self.blog_base(topic, broker) + logical % self.blog_bytes
    }

    /// Largest payload one batch may carry: half the log, so that skipping to the start of
    /// the log at its end never blocks a batch forever.
    pub fn batch_bytes_max(&self) -> u64 {
        self.blog_bytes / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Geometry {
        Geometry {
            brokers_max: 4,
            topics_max: 2,
            ring_slots: 16,
            goi_entries: 64,
            blog_bytes: 64 * 1024,
        }
    }

    #[test]
    fn regions_do_not_overlap_and_fit() {
        let g = small();
        g.validate().unwrap();
        let mut regions: Vec<(u64, u64, String)> = vec![(0, 128, "header".into())];
        regions.push((128, 64, "lease".into()));
        regions.push((
            claim_offset(0),
            u64::from(BROKERS_MAX) * 64,
            "claims".into(),
        ));
        for t in 0..g.topics_max {
            regions.push((g.topic_meta_offset(t), 128, format!("meta {t}")));
            regions.push((g.seq_state_offset(t), 64, format!("seq {t}")));
            regions.push((g.goi_offset(t, 0), g.goi_entries * 64, format!("goi {t}")));
            regions.push((
                g.session_record_offset(t, 0),
                SESSION_RECORDS * 64,
                format!("sessions {t}"),
            ));
            for b in 0..g.brokers_max as u16 {
                for f in 0..FRONTIERS_PER_BROKER {
                    regions.push((
                        g.frontier_offset(t, b, f),
                        64,
                        format!("frontier {t}/{b}/{f}"),
                    ));
                }
                regions.push((
                    g.ring_slot_offset(t, b, 0),
                    16 * 64,
                    format!("ring {t}/{b}"),
                ));
                regions.push((
                    g.completion_offset(t, b, 0),
                    16 * 32,
                    format!("compl {t}/{b}"),
                ));
                regions.push((g.blog_base(t, b), g.blog_bytes, format!("blog {t}/{b}")));
            }
        }
        regions.sort();
        for pair in regions.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            assert!(a.0 + a.1 <= b.0, "{} overlaps {}", a.2, b.2);
        }
        let last = regions.last().unwrap();
        assert!(last.0 + last.1 <= g.layout_bytes());
        assert_eq!(claim_offset(0), 192);
        assert_eq!(claim_offset(1) - claim_offset(0), 64);
        assert_eq!(claim_offset(63) + 64, g.topic_table_offset());
    }

    #[test]
    fn slots_and_ordinals_wrap() {
        let g = small();
        assert_eq!(
            g.ring_slot_offset(1, 2, 3),
            g.ring_slot_offset(1, 2, 3 + 16)
        );
        assert_eq!(g.goi_offset(0, 5), g.goi_offset(0, 5 + 64));
        assert_eq!(
            g.blog_offset(0, 1, 100),
            g.blog_offset(0, 1, 100 + g.blog_bytes)
        );
        assert_eq!(g.frontier_offset(0, 0, 0) % 64, 0);
        assert_eq!(
            g.completion_offset(0, 0, 1) - g.completion_offset(0, 0, 0),
            32
        );
    }

    #[test]
    fn bad_geometries_are_named() {
        let mut g = small();
        g.ring_slots = 12;
        assert_eq!(
            g.validate(),
            Err(GeometryError::NotPowerOfTwo {
                what: "ring_slots",
                value: 12
            })
        );
        let mut g = small();
        g.brokers_max = 0;
        assert!(matches!(
            g.validate(),
            Err(GeometryError::OutOfRange {
                what: "brokers_max",
                ..
            })
        ));
        let mut g = small();
        g.blog_bytes = 1000;
        assert!(matches!(
            g.validate(),
            Err(GeometryError::BlogUnaligned { .. })
        ));
        assert!(matches!(
            small().check_fits(4096),
            Err(GeometryError::PoolTooSmall { .. })
        ));
    }

    #[test]
    fn fit_fills_the_pool() {
        let pool_bytes = 64 << 20;
        let g = Geometry::fit(pool_bytes, 4, 2, 1024, 1 << 14).unwrap();
        assert!(g.layout_bytes() <= pool_bytes);
        assert!(g.layout_bytes() + 4 * 2 * REGION_ALIGN_BYTES > pool_bytes);
        assert!(g.blog_bytes > 4 << 20);
    }
}
