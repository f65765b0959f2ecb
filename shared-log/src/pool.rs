//! The shared pool: formatting, attaching (with the layout checks), the topic table, and
//! the two halves of the coherence discipline for fixed records.

use bytemuck::Zeroable;

use crate::coherence::SharedMemory;
use crate::layout::{
    FRONTIER_REPLICATED, FRONTIER_SUBSCRIBED, Geometry, GeometryError, LAYOUT_VERSION,
    POOL_FORMATTED, POOL_MAGIC, PoolHeader, Record, TOPIC_CREATED, TOPIC_NAME_BYTES_MAX, TopicMeta,
};
use crate::{HistoryRetention, Order, Retention};

/// Why a pool cannot be formatted or attached, or a topic not created or found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// Another broker took the sequencer lease first.
    #[error(
        "the sequencer lease moved on: expected epoch {expected}, found {found} (another \
         broker took over)"
    )]
    LeaseTaken {
        /// The epoch this broker expected to replace.
        expected: u64,
        /// The epoch found.
        found: u64,
    },
    /// The geometry is invalid or does not fit.
    #[error(transparent)]
    Geometry(#[from] GeometryError),
    /// The region does not start with the pool magic: it is not an Embarcadero pool.
    #[error(
        "not an Embarcadero pool: magic is {found:#018x}, expected {POOL_MAGIC:#018x} \
         (format it with `broker --format`)"
    )]
    BadMagic {
        /// The first eight bytes found.
        found: u64,
    },
    /// The pool was formatted with another layout version.
    #[error(
        "pool layout version {found} is not supported: this build reads version {expected} \
         only (stop every broker and re-format the pool, or run a matching build)"
    )]
    LayoutVersion {
        /// Version in the pool.
        found: u32,
        /// Version of this build.
        expected: u32,
    },
    /// The header is of another size, so the layout differs despite the version.
    #[error("pool header is {found} bytes, this build expects {expected}")]
    HeaderSize {
        /// Size recorded in the pool.
        found: u32,
        /// Size this build uses.
        expected: u32,
    },
    /// Formatting never completed (the formatter died, or is still running).
    #[error("pool has a valid header but formatting never completed: re-format it")]
    NotFormatted,
    /// The mapping is smaller than the pool it holds.
    #[error("pool was formatted for {formatted_bytes} bytes but only {mapped_bytes} are mapped")]
    Truncated {
        /// Size recorded in the header.
        formatted_bytes: u64,
        /// Size of this mapping.
        mapped_bytes: u64,
    },
    /// The stored layout size does not match the one computed from the stored geometry.
    #[error("pool header says the layout needs {stored} bytes, the geometry gives {computed}")]
    LayoutMismatch {
        /// Size stored in the header.
        stored: u64,
        /// Size computed here.
        computed: u64,
    },
    /// A topic name is empty, too long, or has characters outside `[A-Za-z0-9._-]`.
    #[error("invalid topic name {name:?}: {reason}")]
    TopicNameInvalid {
        /// The name (lossily decoded).
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// Every topic slot is taken.
    #[error("topic table is full ({topics_max} topics): format a pool with more topics")]
    TopicTableFull {
        /// Topics the pool holds.
        topics_max: u32,
    },
    /// The topic exists with another configuration.
    #[error(
        "topic {name:?} exists with order {order}, ack {ack}, rf {replication_factor}, \
         retention {retention:?}, retention_bytes {}, retention_ms {}",
        history.bytes,
        history.ms
    )]
    TopicConflict {
        /// Topic name.
        name: String,
        /// Its order level.
        order: u8,
        /// Its ack level.
        ack: u8,
        /// Its replication factor.
        replication_factor: u8,
        /// Its retention.
        retention: Retention,
        /// How much history its replicas keep.
        history: HistoryRetention,
    },
    /// A topic id beyond the table, or a slot that holds no topic.
    #[error("no topic with id {topic}")]
    NoSuchTopic {
        /// The id asked for.
        topic: u32,
    },
    /// A topic entry holds a value this build does not know.
    #[error("topic {topic} has unknown {field} {value}: the pool is damaged or of a newer build")]
    CorruptTopic {
        /// Topic id.
        topic: u32,
        /// Which setting.
        field: &'static str,
        /// The value found.
        value: u8,
    },
    /// A broker id at or above the pool's broker count.
    #[error("broker id {broker} is outside this pool's {brokers_max} brokers")]
    NoSuchBroker {
        /// Broker id.
        broker: u16,
        /// Brokers the pool holds.
        brokers_max: u32,
    },
}

/// Configuration of a topic, fixed at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicConfig {
    /// Ordering level.
    pub order: Order,
    /// Default acknowledgement level (0, 1 or 2).
    pub ack: u8,
    /// Replication factor, counting the pool copy.
    pub replication_factor: u8,
    /// How connected subscribers hold the topic's log.
    pub retention: Retention,
    /// How much history its replicas keep on disk.
    pub history: HistoryRetention,
}

/// Where a topic's log begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogOrigin {
    /// Ordinal of the first batch.
    pub ordinal: u64,
    /// Global position of its first message.
    pub position: u64,
}

/// Index of a topic in the pool's topic table.
pub type TopicId = u32;

/// One agent's handle on the pool: its memory view plus the geometry read from the header.
#[derive(Debug, Clone)]
pub struct Pool<M> {
    mem: M,
    geometry: Geometry,
    creation_epoch_ns: u64,
}

impl<M: SharedMemory> Pool<M> {
    /// Formats the memory as an empty pool of `geometry`, replacing whatever it held.
    ///
    /// Zeroes every ring, completion array, frontier, GOI and topic entry (so no ready word
    /// of an earlier pool survives), then publishes the header, ready word last.
    pub fn format(
        mem: M,
        geometry: Geometry,
        creation_epoch_ns: u64,
    ) -> Result<Pool<M>, PoolError> {
        geometry.check_fits(mem.len_bytes())?;
        let header_bytes = std::mem::size_of::<PoolHeader>() as u64;
        // Unpublish first, so a concurrent attach fails cleanly instead of reading a half pool.
        mem.store_u64(PoolHeader::READY_OFFSET, 0);
        mem.flush(PoolHeader::READY_OFFSET, 8);
        mem.fence();
        let pool = Pool {
            mem,
            geometry,
            creation_epoch_ns,
        };
        pool.zero(header_bytes, geometry.topic_table_offset() - header_bytes);
        for topic in 0..geometry.topics_max {
            pool.zero(
                geometry.topic_meta_offset(topic),
                std::mem::size_of::<TopicMeta>() as u64,
            );
            let metadata_end = geometry.blog_base(topic, 0);
            let start = geometry.seq_state_offset(topic);
            pool.zero(start, metadata_end - start);
        }
        let header = PoolHeader {
            magic: POOL_MAGIC,
            layout_version: LAYOUT_VERSION,
            header_bytes: header_bytes as u32,
            pool_bytes: pool.mem.len_bytes(),
            creation_epoch_ns,
            brokers_max: geometry.brokers_max,
            topics_max: geometry.topics_max,
            ring_slots: geometry.ring_slots,
            reserved0: 0,
            goi_entries: geometry.goi_entries,
            blog_bytes: geometry.blog_bytes,
            layout_bytes: geometry.layout_bytes(),
            reserved1: [0; 6],
            ready: POOL_FORMATTED,
        };
        pool.mem.fence();
        publish(&pool.mem, 0, &header);
        Ok(pool)
    }

    fn zero(&self, offset: u64, len: u64) {
        const CHUNK_BYTES: u64 = 64 * 1024;
        let zeros = [0u8; CHUNK_BYTES as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK_BYTES.min(len - done);
            self.mem.write(offset + done, &zeros[..n as usize]);
            self.mem.flush(offset + done, n);
            done += n;
        }
    }

    /// Attaches to a formatted pool, checking magic, layout version, sizes and geometry.
    pub fn attach(mem: M) -> Result<Pool<M>, PoolError> {
        let mapped_bytes = mem.len_bytes();
        let header_bytes = std::mem::size_of::<PoolHeader>() as u64;
        if mapped_bytes < header_bytes {
            return Err(PoolError::Truncated {
                formatted_bytes: header_bytes,
                mapped_bytes,
            });
        }
        mem.invalidate(0, header_bytes);
        mem.fence();
        let mut header = PoolHeader::zeroed();
        mem.read(0, bytemuck::bytes_of_mut(&mut header));
        if header.magic != POOL_MAGIC {
            return Err(PoolError::BadMagic {
                found: header.magic,
            });
        }
        if header.layout_version != LAYOUT_VERSION {
            return Err(PoolError::LayoutVersion {
                found: header.layout_version,
                expected: LAYOUT_VERSION,
            });
        }
        if u64::from(header.header_bytes) != header_bytes {
            return Err(PoolError::HeaderSize {
                found: header.header_bytes,
                expected: header_bytes as u32,
            });
        }
        if header.ready != POOL_FORMATTED {
            return Err(PoolError::NotFormatted);
        }
        if header.pool_bytes > mapped_bytes {
            return Err(PoolError::Truncated {
                formatted_bytes: header.pool_bytes,
                mapped_bytes,
            });
        }
        let geometry = Geometry {
            brokers_max: header.brokers_max,
            topics_max: header.topics_max,
            ring_slots: header.ring_slots,
            goi_entries: header.goi_entries,
            blog_bytes: header.blog_bytes,
        };
        geometry.check_fits(header.pool_bytes)?;
        let computed = geometry.layout_bytes();
        if computed != header.layout_bytes {
            return Err(PoolError::LayoutMismatch {
                stored: header.layout_bytes,
                computed,
            });
        }
        Ok(Pool {
            mem,
            geometry,
            creation_epoch_ns: header.creation_epoch_ns,
        })
    }

    /// The pool's geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// This agent's memory view.
    pub fn mem(&self) -> &M {
        &self.mem
    }

    /// When the pool was formatted (nanoseconds since the Unix epoch).
    pub fn creation_epoch_ns(&self) -> u64 {
        self.creation_epoch_ns
    }

    /// Checks that `broker` exists in this pool.
    pub fn check_broker(&self, broker: u16) -> Result<(), PoolError> {
        if u32::from(broker) >= self.geometry.brokers_max {
            return Err(PoolError::NoSuchBroker {
                broker,
                brokers_max: self.geometry.brokers_max,
            });
        }
        Ok(())
    }

    /// Creates a topic, or returns the existing one when its configuration matches.
    ///
    /// Only one agent (the head broker) creates topics: the table has a single writer.
    pub fn create_topic(&self, name: &str, config: TopicConfig) -> Result<TopicId, PoolError> {
        self.create_topic_from(name, config, LogOrigin::default())
    }

    /// Creates a topic whose log begins at `origin` instead of at the start (a topic restored
    /// from replicas whose oldest segments retention had deleted): its first batch gets
    /// `origin.ordinal` and `origin.position`. An existing topic of that name is answered as
    /// by [`Pool::create_topic`], whatever its origin.
    pub fn create_topic_from(
        &self,
        name: &str,
        config: TopicConfig,
        origin: LogOrigin,
    ) -> Result<TopicId, PoolError> {
        validate_topic_name(name)?;
        let mut free = None;
        for topic in 0..self.geometry.topics_max {
            match self.read_topic(topic) {
                Some(meta) if topic_name(&meta) == name.as_bytes() => {
                    let existing = config_of(topic, &meta)?;
                    if existing != config {
                        return Err(PoolError::TopicConflict {
                            name: name.to_owned(),
                            order: existing.order as u8,
                            ack: existing.ack,
                            replication_factor: existing.replication_factor,
                            retention: existing.retention,
                            history: existing.history,
                        });
                    }
                    return Ok(topic);
                }
                Some(_) => {}
                None => {
                    free.get_or_insert(topic);
                }
            }
        }
        let topic = free.ok_or(PoolError::TopicTableFull {
            topics_max: self.geometry.topics_max,
        })?;
        let mut meta = TopicMeta::zeroed();
        meta.name[..name.len()].copy_from_slice(name.as_bytes());
        meta.name_bytes = name.len() as u32;
        meta.order = config.order as u8;
        meta.ack = config.ack;
        meta.replication_factor = config.replication_factor;
        meta.retention = config.retention as u8;
        meta.retention_bytes = config.history.bytes;
        meta.retention_ms = config.history.ms;
        meta.origin_ordinal = origin.ordinal;
        meta.origin_position = origin.position;
        meta.ready = TOPIC_CREATED;
        // The sequencer picks a topic up from its committed frontier: a topic that begins
        // further on starts there. Written before the entry is published, which nobody reads
        // before.
        self.write_frontier(
            self.geometry.seq_state_offset(topic),
            origin.ordinal,
            origin.position,
        );
        self.mem.fence();
        publish(&self.mem, self.geometry.topic_meta_offset(topic), &meta);
        Ok(topic)
    }

    /// Finds a topic by name.
    pub fn find_topic(&self, name: &str) -> Result<Option<(TopicId, TopicConfig)>, PoolError> {
        for topic in 0..self.geometry.topics_max {
            if let Some(meta) = self.read_topic(topic) {
                if topic_name(&meta) == name.as_bytes() {
                    return Ok(Some((topic, config_of(topic, &meta)?)));
                }
            }
        }
        Ok(None)
    }

    /// Where topic `topic`'s log begins.
    pub fn topic_origin(&self, topic: TopicId) -> Result<LogOrigin, PoolError> {
        let meta = self.created_topic(topic)?;
        Ok(LogOrigin {
            ordinal: meta.origin_ordinal,
            position: meta.origin_position,
        })
    }

    /// The configuration of topic `topic`.
    pub fn topic_config(&self, topic: TopicId) -> Result<TopicConfig, PoolError> {
        config_of(topic, &self.created_topic(topic)?)
    }

    /// The table entry of a created topic.
    fn created_topic(&self, topic: TopicId) -> Result<TopicMeta, PoolError> {
        if topic >= self.geometry.topics_max {
            return Err(PoolError::NoSuchTopic { topic });
        }
        self.read_topic(topic)
            .ok_or(PoolError::NoSuchTopic { topic })
    }

    /// Ids of every created topic.
    pub fn topics(&self) -> Vec<TopicId> {
        (0..self.geometry.topics_max)
            .filter(|&topic| self.read_topic(topic).is_some())
            .collect()
    }

    fn read_topic(&self, topic: TopicId) -> Option<TopicMeta> {
        let offset = self.geometry.topic_meta_offset(topic);
        invalidate_and_fence(&self.mem, offset, std::mem::size_of::<TopicMeta>() as u64);
        read_if_ready::<M, TopicMeta>(&self.mem, offset, TOPIC_CREATED)
    }

    /// Reads a frontier word pair (`value`, `aux`) written by another agent.
    pub fn read_frontier(&self, offset: u64) -> (u64, u64) {
        invalidate_and_fence(&self.mem, offset, 16);
        (self.mem.load_u64(offset), self.mem.load_u64(offset + 8))
    }

    /// The lowest ordinal any live broker's subscribers or replica still need in `topic`
    /// (`u64::MAX` when none holds anything): payloads and GOI entries from it on must be
    /// kept. A line is live while the sequencer heartbeat its writer last saw is at most
    /// [`Self::stale_heartbeats`] behind the lease's: a crashed broker or replica stops
    /// holding retention after that (its subscribers, or the replica when it comes back, may
    /// then find their next batch gone: an explicit error, never wrong bytes). The lines of
    /// the head the lease holder took over from stop at the takeover, unless written since.
    pub fn retention_floor(&self, topic: TopicId) -> u64 {
        let clock = self.lease_clock();
        (0..self.geometry.brokers_max as u16)
            .flat_map(|broker| [FRONTIER_SUBSCRIBED, FRONTIER_REPLICATED].map(|f| (broker, f)))
            .filter_map(|(broker, frontier)| self.held(&clock, topic, broker, frontier))
            .min()
            .unwrap_or(u64::MAX)
    }

    /// The lowest ordinal `frontier` (subscribed or replicated) of `broker` holds in
    /// `topic`, if it holds anything and is live by `clock`.
    fn held(&self, clock: &LeaseClock, topic: TopicId, broker: u16, frontier: u64) -> Option<u64> {
        let offset = self.geometry.frontier_offset(topic, broker, frontier);
        let (needed_plus_one, _) = self.read_frontier(offset);
        let seen = self.mem.load_u64(offset + HEARTBEAT_SEEN_OFFSET);
        let needed = needed_plus_one.checked_sub(1)?;
        clock.holds(broker, frontier, seen).then_some(needed)
    }

    /// Sequencer heartbeats a broker's subscribed line may miss before it stops holding
    /// retention: [`STALE_WINDOW_MS`] worth at the lease in force, and at least one lease
    /// ([`STALE_HEARTBEATS_MIN`]). Not one lease alone: with a lease of tens of
    /// milliseconds a live broker that the scheduler leaves aside for a moment would drop
    /// its subscribers' hold, and their deliveries would be overwritten under them. Not
    /// much longer: a crashed broker's hold stalls every writer of a full log meanwhile.
    pub fn stale_heartbeats(&self) -> u64 {
        self.lease_clock().stale_heartbeats
    }

    /// The same for a replica's line: [`REPLICA_STALE_WINDOW_MS`] worth, at least one lease.
    pub fn replica_stale_heartbeats(&self) -> u64 {
        self.lease_clock().replica_stale_heartbeats
    }

    /// Whether `broker`'s replica of `topic` holds retention: it replicates the topic, and
    /// its line is live (see [`Pool::retention_floor`]).
    pub fn replica_live(&self, topic: TopicId, broker: u16) -> bool {
        self.held(&self.lease_clock(), topic, broker, FRONTIER_REPLICATED)
            .is_some()
    }

    /// The lease's heartbeat, [`Self::stale_heartbeats`] and the takeover it records, from
    /// one look at the lease line (the words sit side by side in it).
    fn lease_clock(&self) -> LeaseClock {
        use crate::layout::{LEASE_HEARTBEAT_OFFSET, LEASE_MS_OFFSET, LEASE_TAKEN_OVER_OFFSET};
        const _: () = assert!(
            LEASE_HEARTBEAT_OFFSET < LEASE_MS_OFFSET && LEASE_MS_OFFSET < LEASE_TAKEN_OVER_OFFSET
        );
        let span = LEASE_TAKEN_OVER_OFFSET + 8 - LEASE_HEARTBEAT_OFFSET;
        invalidate_and_fence(&self.mem, LEASE_HEARTBEAT_OFFSET, span);
        let heartbeat = self.mem.load_u64(LEASE_HEARTBEAT_OFFSET);
        let lease_ms = self.mem.load_u64(LEASE_MS_OFFSET);
        let beats = |window_ms: u64| {
            (STALE_HEARTBEATS_MIN * window_ms)
                .checked_div(lease_ms)
                .unwrap_or(0)
                .max(STALE_HEARTBEATS_MIN)
        };
        LeaseClock {
            heartbeat,
            stale_heartbeats: beats(STALE_WINDOW_MS),
            replica_stale_heartbeats: beats(REPLICA_STALE_WINDOW_MS),
            taken_over: crate::layout::TakenOver::decode(
                self.mem.load_u64(LEASE_TAKEN_OVER_OFFSET),
            ),
        }
    }

    /// The sequencer lease's heartbeat counter as memory holds it now (the cluster's clock
    /// for replica liveness; a new holder continues it).
    pub fn lease_heartbeat(&self) -> u64 {
        let offset = crate::layout::LEASE_HEARTBEAT_OFFSET;
        invalidate_and_fence(&self.mem, offset, 8);
        self.mem.load_u64(offset)
    }

    /// Publishes a replica's frontier: batches durable plus one (0: not replicating),
    /// positions durable, and the lease heartbeat it saw (its liveness).
    pub fn publish_replicated(
        &self,
        topic: TopicId,
        broker: u16,
        batches_plus_one: u64,
        position: u64,
        heartbeat_seen: u64,
    ) {
        let offset = self
            .geometry
            .frontier_offset(topic, broker, FRONTIER_REPLICATED);
        self.write_live_frontier(offset, batches_plus_one, position, heartbeat_seen);
    }

    /// Publishes a frontier that holds retention, with the lease heartbeat its writer saw.
    fn write_live_frontier(&self, offset: u64, value: u64, aux: u64, heartbeat_seen: u64) {
        self.mem
            .store_u64(offset + HEARTBEAT_SEEN_OFFSET, heartbeat_seen);
        self.write_frontier(offset, value, aux);
        self.mem.flush(offset + HEARTBEAT_SEEN_OFFSET, 8);
    }

    /// What `broker`'s replica of `topic` holds durably: (batches, positions), both zero
    /// when it does not replicate the topic.
    pub fn replicated_by(&self, topic: TopicId, broker: u16) -> (u64, u64) {
        let offset = self
            .geometry
            .frontier_offset(topic, broker, FRONTIER_REPLICATED);
        let (batches_plus_one, position) = self.read_frontier(offset);
        (batches_plus_one.saturating_sub(1), position)
    }

    /// The global position below which every message of `topic` is durable in at least
    /// `replicas` brokers' replica files (the ack level 2 frontier): the `replicas`-th
    /// largest replicated position over all brokers, 0 when fewer brokers replicate.
    pub fn replicated_position(&self, topic: TopicId, replicas: usize) -> u64 {
        if replicas == 0 {
            return u64::MAX;
        }
        let mut positions = [0u64; crate::layout::BROKERS_MAX as usize];
        let brokers = self.geometry.brokers_max as usize;
        for (broker, position) in positions.iter_mut().enumerate().take(brokers) {
            *position = self.replicated_by(topic, broker as u16).1;
        }
        let positions = &mut positions[..brokers];
        positions.sort_unstable_by(|a, b| b.cmp(a));
        positions.get(replicas - 1).copied().unwrap_or(0)
    }

    /// The name and configuration of topic `topic`.
    pub fn topic_entry(&self, topic: TopicId) -> Result<(String, TopicConfig), PoolError> {
        let meta = self.created_topic(topic)?;
        let name = String::from_utf8_lossy(topic_name(&meta)).into_owned();
        Ok((name, config_of(topic, &meta)?))
    }

    /// Publishes the lowest ordinal `broker`'s subscribers still need in `topic` (`None`:
    /// they hold nothing), with the lease heartbeat seen now (its liveness: republish when
    /// the heartbeat moves, see [`Pool::retention_floor`]). Only that broker calls this
    /// (single writer of the line).
    pub fn publish_subscribed(&self, topic: TopicId, broker: u16, lowest_needed: Option<u64>) {
        let offset = self
            .geometry
            .frontier_offset(topic, broker, FRONTIER_SUBSCRIBED);
        let value = lowest_needed.map_or(0, |ordinal| ordinal + 1);
        self.write_live_frontier(offset, value, 0, self.lease_heartbeat());
    }

    /// Clears the sequencer lease, so the head takes epoch 1 as on a fresh pool. Only for a
    /// pool no other broker has attached yet (after a restore from replicas).
    pub fn reset_lease(&self) {
        self.zero(
            crate::layout::LEASE_OFFSET,
            std::mem::size_of::<crate::layout::SequencerLease>() as u64,
        );
        self.mem.fence();
    }

    /// Publishes a frontier word pair this agent owns.
    pub fn write_frontier(&self, offset: u64, value: u64, aux: u64) {
        self.mem.store_u64(offset + 8, aux);
        self.mem.store_u64(offset, value);
        self.mem.flush(offset, 16);
    }
}

/// What decides whether a subscribed or replicated line holds retention.
#[derive(Debug, Clone, Copy)]
struct LeaseClock {
    heartbeat: u64,
    stale_heartbeats: u64,
    replica_stale_heartbeats: u64,
    /// The broker the lease holder took over from, and its first heartbeat.
    taken_over: Option<crate::layout::TakenOver>,
}

impl LeaseClock {
    /// Whether `frontier` (subscribed or replicated) of `broker`, last written when the
    /// lease heartbeat was `seen`, holds retention: not stale, and not a line the
    /// taken-over holder left behind.
    fn holds(&self, broker: u16, frontier: u64, seen: u64) -> bool {
        let left_behind = self
            .taken_over
            .is_some_and(|t| t.broker == broker && seen < t.heartbeat);
        let stale = match frontier {
            FRONTIER_REPLICATED => self.replica_stale_heartbeats,
            _ => self.stale_heartbeats,
        };
        !left_behind && self.heartbeat.saturating_sub(seen) <= stale
    }
}

fn topic_name(meta: &TopicMeta) -> &[u8] {
    let len = (meta.name_bytes as usize).min(TOPIC_NAME_BYTES_MAX);
    &meta.name[..len]
}

fn config_of(topic: TopicId, meta: &TopicMeta) -> Result<TopicConfig, PoolError> {
    let corrupt = |field, value| PoolError::CorruptTopic {
        topic,
        field,
        value,
    };
    let order = Order::try_from(meta.order).map_err(|_| corrupt("order level", meta.order))?;
    let retention =
        Retention::try_from(meta.retention).map_err(|_| corrupt("retention", meta.retention))?;
    Ok(TopicConfig {
        order,
        ack: meta.ack,
        replication_factor: meta.replication_factor,
        retention,
        history: HistoryRetention {
            bytes: meta.retention_bytes,
            ms: meta.retention_ms,
        },
    })
}

/// Sequencer heartbeats in one lease (each is an eighth of it): the least a broker's
/// subscribed line or a replica may miss before it stops holding retention.
pub const STALE_HEARTBEATS_MIN: u64 = 8;

/// How long, in heartbeats' time, a broker's subscribed line that is not written any more
/// keeps holding retention (see [`Pool::stale_heartbeats`]): 50 times the 5 ms at which
/// live brokers write it (their network loops, which never wait on a disk).
pub const STALE_WINDOW_MS: u64 = 250;

/// The same for a replica's line. Longer: a replica writes its line between writes and
/// `fdatasync`s of its file, which a busy disk can hold for hundreds of milliseconds, and
/// a live replica that lost its hold may find its next batch gone. The price: a dead
/// replica (not a taken-over head's) holds a full log for up to this long.
pub const REPLICA_STALE_WINDOW_MS: u64 = 1000;

/// Offset, in a subscribed or replicated frontier line, of the lease heartbeat its writer
/// last saw.
const HEARTBEAT_SEEN_OFFSET: u64 = 16;

/// Checks a topic name: 1 to 64 bytes of `[A-Za-z0-9._-]`.
pub fn validate_topic_name(name: &str) -> Result<(), PoolError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > TOPIC_NAME_BYTES_MAX {
        Some("longer than 64 bytes")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("only A-Z, a-z, 0-9, '.', '_' and '-' are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(PoolError::TopicNameInvalid {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Reader half of the discipline: drop cached copies of the lines, then fence.
pub fn invalidate_and_fence<M: SharedMemory>(mem: &M, offset: u64, len: u64) {
    mem.invalidate(offset, len);
    mem.fence();
}

/// Reads the record at `offset` if its ready word equals `expected`. The caller has
/// invalidated the record's lines and fenced.
pub fn read_if_ready<M: SharedMemory, R: Record>(mem: &M, offset: u64, expected: u64) -> Option<R> {
    if mem.load_u64(offset + R::READY_OFFSET) != expected {
        return None;
    }
    let mut record = R::zeroed();
    let bytes = bytemuck::bytes_of_mut(&mut record);
    mem.read(offset, &mut bytes[..R::READY_OFFSET as usize]);
    let ready = &mut bytes[R::READY_OFFSET as usize..];
    ready.copy_from_slice(&expected.to_le_bytes());
    Some(record)
}

/// Writer half, step 1: store everything but the ready word, and flush it.
pub fn write_body<M: SharedMemory, R: Record>(mem: &M, offset: u64, record: &R) {
    let body = &bytemuck::bytes_of(record)[..R::READY_OFFSET as usize];
    mem.write(offset, body);
    mem.flush(offset, body.len() as u64);
}

/// Writer half, step 2 (after a fence): store the ready word last, and flush it.
pub fn set_ready<M: SharedMemory, R: Record>(mem: &M, offset: u64, ready: u64) {
    mem.store_u64(offset + R::READY_OFFSET, ready);
    mem.flush(offset + R::READY_OFFSET, 8);
}

/// The whole writer half for one record: body, flush, fence, ready word, flush.
pub fn publish<M: SharedMemory, R: Record>(mem: &M, offset: u64, record: &R) {
    write_body(mem, offset, record);
    mem.fence();
    set_ready::<M, R>(mem, offset, record.ready());
}
