//! The sequencer: one polling agent (on the head broker) that gives every complete batch a
//! contiguous range of global positions.
//!
//! Each [`Sequencer::poll`] round, for every topic:
//! 1. reads each broker's `written` frontier (invalidate, fence, load), then invalidates the
//!    ring slots below it, fences, and reads them, checking each slot's ready word;
//! 2. validates each header, then decides it: order it, recognise it as a duplicate, hold it
//!    (order 5, a gap in its session), or reject it with a typed status;
//! 3. resolves gaps whose oldest held batch waited past the hold timeout (the gap rule below);
//! 4. publishes, each step fenced from the next: GOI entry and completion bodies, GOI ready
//!    words, the topic's committed count and next position, completion ready words, and the
//!    per-ring `ordered` frontier (ring slots released, always a gap-free prefix).
//!
//! # Order 5 and the gap rule
//! A session (client id, session epoch) starts at batch sequence 0. A batch whose sequence is
//! ahead of the session's next expected one waits in a hold buffer of at most
//! `hold_batches_max` batches. When the oldest held batch has waited `hold_timeout_ns`, or a
//! newly held batch takes the buffer over its limit, the sequencer gives up on that session's
//! missing sequences: the session's next expected sequence jumps to its lowest held batch,
//! which is then ordered with every held batch that follows without a gap. A skipped
//! sequence that arrives later is never ordered: its completion is
//! [`CompletionStatus::RejectedGap`], which the broker reports to the publisher as an error.
//! Nothing is lost silently: every batch gets exactly one completion.
//!
//! # Deduplication
//! Each session remembers the positions of its last `dedup_window` ordered batches. A batch
//! seen again within the window completes as [`CompletionStatus::Duplicate`] with the
//! original position (a resend of a batch still held for a gap is answered when the held
//! copy is ordered, so no answer runs ahead of the order); one older than the window
//! completes as
//! [`CompletionStatus::RejectedOutsideWindow`]. At most `sessions_max` sessions are tracked;
//! beyond that the least recently active session without held batches is forgotten.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use crate::Order;
use crate::coherence::SharedMemory;
use crate::layout::{
    BATCH_SEQ_COUNTS_MESSAGES, BatchHeader, Completion, CompletionStatus, FRONTIER_ORDERED,
    FRONTIER_WRITTEN, GoiEntry, LEASE_EPOCH_OFFSET, LEASE_HEARTBEAT_OFFSET, PAYLOAD_ALIGN_BYTES,
    Record, SESSION_RECORDS, SequencerLease, SessionRecord, TakenOver,
};
use crate::pool::{
    Pool, PoolError, TopicId, invalidate_and_fence, publish, read_if_ready, set_ready, write_body,
};
use crate::sessions::{GapSkipped, SessionKey, SessionLimits, SessionTable, Verdict};
use bytemuck::Zeroable;
use units::Timestamp;

/// Polls between looks at the subscribers' retention floor.
const FLOOR_REFRESH_POLLS: u32 = 16;

/// Why a batch header was rejected as impossible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidHeader {
    /// No messages, or fewer payload bytes than the messages' length prefixes need.
    #[error("{message_count} messages cannot fit in {payload_bytes} payload bytes")]
    MessageCount {
        /// Messages announced.
        message_count: u32,
        /// Payload bytes announced.
        payload_bytes: u32,
    },
    /// Empty or larger than the pool allows.
    #[error("payload of {payload_bytes} bytes is outside 1..={batch_bytes_max}")]
    PayloadSize {
        /// Payload bytes announced.
        payload_bytes: u32,
        /// The pool's limit.
        batch_bytes_max: u64,
    },
    /// The payload would not lie inside the broker's payload log.
    #[error(
        "payload at log offset {blog_offset} (+{payload_bytes}) is unaligned or crosses the log's end"
    )]
    PayloadPlacement {
        /// Logical offset announced.
        blog_offset: u64,
        /// Payload bytes announced.
        payload_bytes: u32,
    },
    /// The batch sequence is `u64::MAX`, which the wire protocol reserves for "none".
    #[error("batch sequence {} is reserved (it means none)", u64::MAX)]
    BatchSeqReserved,
    /// The batch asks for another order than the topic's.
    #[error("batch asks for order {batch}, the topic has order {topic}")]
    OrderMismatch {
        /// Order in the header.
        batch: u8,
        /// The topic's order.
        topic: u8,
    },
}

/// Sequencer tuning. Every queue has a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequencerConfig {
    /// Most ring slots read per ring per poll (fairness between brokers).
    pub scan_slots_max: u32,
    /// Most batches held for gaps per topic.
    pub hold_batches_max: usize,
    /// How long a gap may stay open before the gap rule resolves it.
    pub hold_timeout_ns: u64,
    /// Ordered batches remembered per session for deduplication.
    pub dedup_window: usize,
    /// Sessions remembered per topic.
    pub sessions_max: usize,
    /// How long a standby waits for the heartbeat to move before it takes the lease over
    /// (published in the lease record). The default, 50 ms, is what a head kill costs before
    /// the first new ack; the heartbeat is a store to one pool line every eighth of it.
    pub lease_ns: u64,
}

impl Default for SequencerConfig {
    fn default() -> Self {
        SequencerConfig {
            scan_slots_max: 256,
            hold_batches_max: 4096,
            hold_timeout_ns: 1_000_000_000,
            dedup_window: 1024,
            sessions_max: 65_536,
            lease_ns: 50_000_000,
        }
    }
}

/// Counters, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SequencerStats {
    /// Poll rounds run.
    pub polls: u64,
    /// Batches placed in the order.
    pub batches_ordered: u64,
    /// Messages placed in the order.
    pub messages_ordered: u64,
    /// Batches recognised as duplicates.
    pub duplicates: u64,
    /// Batches rejected because the gap rule skipped their sequence.
    pub rejected_gap: u64,
    /// Batches rejected as older than the dedup window.
    pub rejected_outside_window: u64,
    /// Batches rejected for an impossible header.
    pub rejected_invalid: u64,
    /// Sequences given up on by the gap rule.
    pub sequences_skipped: u64,
    /// Gaps resolved by the gap rule.
    pub gaps_resolved: u64,
    /// Batches held right now.
    pub held: u64,
    /// Slots whose ready word disagreed with the writer's frontier (retried next poll).
    pub stale_slots: u64,
    /// Sessions forgotten to stay within `sessions_max`.
    pub sessions_evicted: u64,
    /// Rounds cut short because a subscriber still needs the GOI entries next in line.
    pub retention_waits: u64,
    /// After a takeover: ring slots found already ordered by the previous holder.
    pub batches_recovered: u64,
}

/// A batch held for a gap (or a parked duplicate of one): its ring slot and header.
#[derive(Debug, Clone, Copy)]
struct Held {
    broker: u16,
    slot: u64,
    header: BatchHeader,
}

#[derive(Debug, Default)]
struct RingState {
    next_read: u64,
    /// End (exclusive) of the slots this poll round reads: the written frontier, capped.
    scan_end: u64,
    released: u64,
    /// Decided flags of slots `released..next_read`.
    decided: VecDeque<bool>,
    ordered_batches: u64,
    frontier_dirty: bool,
}

#[derive(Debug)]
struct TopicState {
    topic: TopicId,
    order: Order,
    next_ordinal: u64,
    next_position: u64,
    rings: Vec<RingState>,
    /// Dedup windows, the order-5 hold buffer and the gap rule.
    sessions: SessionTable<Held>,
    /// GOI ordinals and completions written this round, ready words pending.
    pending_goi: Vec<u64>,
    pending_completions: Vec<(u16, u64)>,
    /// Lowest ordinal a subscriber still needs (cached; refreshed every few polls and
    /// whenever ordering would reach it): GOI entries from it on are never overwritten.
    retention_floor: u64,
    polls_since_floor: u32,
    /// After a takeover: batches the previous holder ordered, by payload place, so that
    /// their ring slots, read again, keep their ordinal and position.
    recovered: HashMap<(u16, u64), Recovered>,
    /// Per ring, the written frontier at the takeover: `recovered` is needed until every
    /// ring has read that far (empty when nothing was recovered).
    recovered_until: Vec<u64>,
    /// Mirror of the pool's session records (this sequencer is their only writer): record
    /// index -> (session, ordinal of its last ordered batch).
    records: HashMap<u64, (SessionKey, u64)>,
    /// Session -> its record index.
    record_of: HashMap<SessionKey, u64>,
}

/// A batch ordered by a previous lease holder (see [`TopicState::recovered`]).
#[derive(Debug, Clone, Copy)]
struct Recovered {
    ordinal: u64,
    global_start: u64,
    key: SessionKey,
    batch_seq: u64,
}

/// The sequencer. See the module docs.
#[derive(Debug)]
pub struct Sequencer<M> {
    pool: Pool<M>,
    config: SequencerConfig,
    broker: u16,
    epoch: u64,
    topics: Vec<TopicState>,
    stats: SequencerStats,
    heartbeat: u64,
    /// The broker this sequencer took the lease over from, and the heartbeat then.
    taken_over: Option<(u16, u64)>,
    last_heartbeat: Timestamp,
    /// Set once a higher epoch took the lease: this sequencer writes nothing any more.
    fenced: bool,
    /// Whether the epoch was read since this poll round began.
    round_checked: bool,
    /// The pause guard's clock, when one is set (see [`Sequencer::set_pause_guard`]).
    guard: Option<PauseGuard>,
}

/// A monotonic clock read before every store of the sequencer.
pub struct PauseGuard {
    clock: Box<dyn FnMut() -> Timestamp + Send>,
    /// When the lease epoch was last read.
    checked_at: Timestamp,
}

impl std::fmt::Debug for PauseGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PauseGuard")
            .field("checked_at", &self.checked_at)
            .finish()
    }
}

pub use crate::layout::LEASE_OFFSET;

impl<M: SharedMemory> Sequencer<M> {
    /// Takes the lease for `broker` under `epoch` (which must be one above the lease's
    /// current epoch: 1 on a fresh pool), publishes it, and picks up every topic where the
    /// pool says the previous holder stopped (see [`Sequencer::refresh_topics`]).
    pub fn new(
        pool: Pool<M>,
        broker: u16,
        epoch: u64,
        config: SequencerConfig,
    ) -> Result<Sequencer<M>, PoolError> {
        pool.check_broker(broker)?;
        let expected = epoch.saturating_sub(1);
        pool.mem()
            .compare_exchange_u64(LEASE_EPOCH_OFFSET, expected, epoch)
            .map_err(|found| PoolError::LeaseTaken { expected, found })?;
        // The heartbeat goes on from where the previous holder left it (replicas measure
        // their liveness against it), one beat on: a line written from now on shows that
        // its writer saw the takeover.
        let heartbeat = pool.lease_heartbeat() + 1;
        // A holder before this one (not a fresh pool) was taken over: dead or fenced. Not
        // when it is this broker: its lines are this broker's own, written on.
        let taken_over = match epoch {
            0 | 1 => None,
            _ => read_lease(&pool)
                .filter(|lease| lease.holder != broker)
                .map(|lease| (lease.holder, heartbeat)),
        };
        let mut sequencer = Sequencer {
            pool,
            config,
            broker,
            epoch,
            topics: Vec::new(),
            stats: SequencerStats::default(),
            heartbeat,
            taken_over,
            last_heartbeat: Timestamp::ZERO,
            fenced: false,
            round_checked: false,
            guard: None,
        };
        sequencer.publish_lease();
        sequencer.refresh_topics()?;
        Ok(sequencer)
    }

    /// How often the heartbeat moves, and how long a store may follow the last read of the
    /// epoch without reading it again.
    fn lease_eighth(&self) -> Duration {
        Duration::from_nanos(self.config.lease_ns / 8)
    }

    fn publish_lease(&self) {
        let lease = SequencerLease {
            holder_broker: u32::from(self.broker),
            reserved0: 0,
            epoch: self.epoch,
            heartbeat: self.heartbeat,
            lease_ms: self.config.lease_ns / 1_000_000,
            taken_over: self.taken_over.map_or(0, |(broker, heartbeat)| {
                TakenOver { broker, heartbeat }.encode()
            }),
            reserved1: [0; 2],
            ready: self.epoch + 1,
        };
        publish(self.pool.mem(), LEASE_OFFSET, &lease);
    }

    /// The epoch this sequencer holds.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// True once a higher epoch took the lease: this sequencer stopped writing for good.
    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// Reads `clock` (a monotonic clock) before every store to the pool: when more than
    /// an eighth of the lease passed since the epoch was last read (this process was paused
    /// or starved in the middle of a round), the epoch is read again before the store, so a
    /// holder that resumes after a standby took over stops instead of finishing its round.
    /// Without it (the deterministic simulation), the epoch is read twice per round.
    pub fn set_pause_guard(&mut self, mut clock: Box<dyn FnMut() -> Timestamp + Send>) {
        let checked_at = clock();
        let guard = PauseGuard { clock, checked_at };
        self.guard = Some(guard);
    }

    /// Whether the next store may go ahead (see [`Sequencer::set_pause_guard`]).
    fn may_write(&mut self) -> bool {
        if self.fenced {
            return false;
        }
        if !self.round_checked {
            return self.still_holds();
        }
        let Some(guard) = &mut self.guard else {
            return true;
        };
        let now = (guard.clock)();
        if now.saturating_duration_since(guard.checked_at) <= self.lease_eighth() {
            return true;
        }
        self.still_holds()
    }

    /// Re-reads the lease epoch from memory; fences this sequencer when it moved on.
    fn still_holds(&mut self) -> bool {
        if self.fenced {
            return false;
        }
        if let Some(guard) = &mut self.guard {
            guard.checked_at = (guard.clock)();
        }
        self.round_checked = true;
        invalidate_and_fence(self.pool.mem(), LEASE_EPOCH_OFFSET, 8);
        let epoch = self.pool.mem().load_u64(LEASE_EPOCH_OFFSET);
        if epoch != self.epoch {
            log::warn!(
                "sequencer on broker {}: fenced: the lease is at epoch {epoch}, this sequencer \
                 held epoch {}; it stops writing",
                self.broker,
                self.epoch
            );
            self.fenced = true;
            for state in &mut self.topics {
                state.pending_goi.clear();
                state.pending_completions.clear();
            }
        }
        !self.fenced
    }

    /// Adds topics created since the last call.
    pub fn refresh_topics(&mut self) -> Result<(), PoolError> {
        let brokers = self.pool.geometry().brokers_max as usize;
        for topic in self.pool.topics() {
            if self.topics.iter().any(|t| t.topic == topic) {
                continue;
            }
            let config = self.pool.topic_config(topic)?;
            let limits = SessionLimits {
                sessions_max: self.config.sessions_max,
                hold_batches_max: self.config.hold_batches_max,
                dedup_window: self.config.dedup_window,
                hold_timeout_ns: self.config.hold_timeout_ns,
            };
            let mut state = TopicState {
                topic,
                order: config.order,
                next_ordinal: 0,
                next_position: 0,
                rings: (0..brokers).map(|_| RingState::default()).collect(),
                sessions: SessionTable::new(limits, config.order == Order::TotalSessionFifo),
                pending_goi: Vec::new(),
                pending_completions: Vec::new(),
                retention_floor: 0,
                polls_since_floor: u32::MAX,
                recovered: HashMap::new(),
                recovered_until: Vec::new(),
                records: HashMap::new(),
                record_of: HashMap::new(),
            };
            self.recover_topic(&mut state);
            self.topics.push(state);
        }
        Ok(())
    }

    /// Picks a topic up where the pool says the previous holder stopped: the committed GOI
    /// count and next position, each ring's released slots, and the sessions (dedup window
    /// and, for order 5, the next expected sequence) from the GOI entries still held. Slots
    /// past a ring's released frontier are read again; one the previous holder had already
    /// ordered (found by its payload's place) keeps its ordinal and position. On a fresh
    /// pool this finds nothing.
    fn recover_topic(&mut self, state: &mut TopicState) {
        let geometry = *self.pool.geometry();
        let topic = state.topic;
        let (committed, next_position) = self.pool.read_frontier(geometry.seq_state_offset(topic));
        state.next_ordinal = committed;
        state.next_position = next_position;
        for (broker, ring) in state.rings.iter_mut().enumerate() {
            let (released, ordered_batches) = self.pool.read_frontier(geometry.frontier_offset(
                topic,
                broker as u16,
                FRONTIER_ORDERED,
            ));
            ring.next_read = released;
            ring.scan_end = released;
            ring.released = released;
            ring.ordered_batches = ordered_batches;
        }
        if committed == 0 {
            return;
        }
        for index in 0..SESSION_RECORDS {
            let record = read_session_record(&self.pool, topic, index);
            if record.next_seq == 0 {
                continue;
            }
            let key = (record.client_id, record.session_epoch);
            state.records.insert(index, (key, record.last_ordinal));
            state.record_of.insert(key, index);
            state
                .sessions
                .restore(key, record.next_seq, record.window_floor);
        }
        // Slots written by now and past `released` may hold batches already ordered; the
        // map of those is dropped once every ring has read that far.
        state.recovered_until = (0..geometry.brokers_max as u16)
            .map(|broker| {
                let offset = geometry.frontier_offset(topic, broker, FRONTIER_WRITTEN);
                self.pool.read_frontier(offset).0
            })
            .collect();
        let mem = self.pool.mem();
        for ordinal in committed.saturating_sub(geometry.goi_entries)..committed {
            let offset = geometry.goi_offset(topic, ordinal);
            invalidate_and_fence(mem, offset, std::mem::size_of::<GoiEntry>() as u64);
            let Some(entry) = read_if_ready::<M, GoiEntry>(mem, offset, ordinal + 1) else {
                continue;
            };
            let key = (entry.client_id, entry.session_epoch);
            let span = sequence_span(entry.flags as u8, entry.message_count);
            state
                .sessions
                .ordered(key, entry.batch_seq, span, entry.global_start);
            state.recovered.insert(
                (entry.broker, entry.blog_offset),
                Recovered {
                    ordinal,
                    global_start: entry.global_start,
                    key,
                    batch_seq: entry.batch_seq,
                },
            );
        }
        state.sessions.finish_restore();
        log::info!(
            "sequencer on broker {} (epoch {}): topic {topic} resumes at batch {committed}, \
             position {next_position}, with {} sessions",
            self.broker,
            self.epoch,
            state.sessions.len()
        );
    }

    /// Counters so far.
    pub fn stats(&self) -> SequencerStats {
        let mut stats = self.stats;
        stats.held = self.topics.iter().map(|t| t.sessions.held() as u64).sum();
        stats.sessions_evicted = self.topics.iter().map(|t| t.sessions.evicted()).sum();
        stats
    }

    /// One polling round at time `now` (any monotonic clock). Returns the batches
    /// decided (ordered, duplicate or rejected) in this round.
    ///
    /// Each round re-reads the lease epoch before its first store, and again before it
    /// publishes: once a standby has taken over (a higher epoch), this sequencer writes
    /// nothing more. An idle round stores nothing and reads no epoch.
    pub fn poll(&mut self, now: Timestamp) -> u64 {
        if self.fenced {
            return 0;
        }
        // The epoch is read before the round's first store, not on every (idle) poll.
        self.round_checked = false;
        self.stats.polls += 1;
        if now.saturating_duration_since(self.last_heartbeat) >= self.lease_eighth() {
            if !self.may_write() {
                return 0;
            }
            self.last_heartbeat = now;
            self.heartbeat += 1;
            self.pool
                .mem()
                .store_u64(LEASE_HEARTBEAT_OFFSET, self.heartbeat);
            self.pool.mem().flush(LEASE_HEARTBEAT_OFFSET, 8);
        }
        let mut decided = 0;
        for index in 0..self.topics.len() {
            decided += self.poll_topic(index, now);
        }
        // A holder fenced during the round published none of it.
        if self.fenced { 0 } else { decided }
    }

    fn poll_topic(&mut self, index: usize, now: Timestamp) -> u64 {
        let geometry = *self.pool.geometry();
        let topic = self.topics[index].topic;
        let mut decided = 0;
        let brokers = geometry.brokers_max as u16;
        // Step 1: how far each ring is written.
        let mem = self.pool.mem();
        for broker in 0..brokers {
            mem.invalidate(geometry.frontier_offset(topic, broker, FRONTIER_WRITTEN), 8);
        }
        mem.fence();
        let mut window_total = 0;
        for broker in 0..brokers {
            let written = mem.load_u64(geometry.frontier_offset(topic, broker, FRONTIER_WRITTEN));
            let ring = &mut self.topics[index].rings[broker as usize];
            let end = written.min(ring.next_read + u64::from(self.config.scan_slots_max));
            ring.scan_end = end.max(ring.next_read);
            for slot in ring.next_read..ring.scan_end {
                let offset = geometry.ring_slot_offset(topic, broker, slot);
                mem.invalidate(offset, std::mem::size_of::<BatchHeader>() as u64);
            }
            window_total += ring.scan_end - ring.next_read;
        }
        mem.fence();
        // A subscriber may still need old GOI entries: never order into them.
        let goi_entries = geometry.goi_entries;
        let state = &mut self.topics[index];
        state.polls_since_floor = state.polls_since_floor.saturating_add(1);
        let reach = state.next_ordinal + state.sessions.held() as u64 + window_total;
        if state.polls_since_floor >= FLOOR_REFRESH_POLLS
            || reach >= state.retention_floor.saturating_add(goi_entries)
        {
            state.retention_floor = self.pool.retention_floor(topic);
            state.polls_since_floor = 0;
        }
        let goi_limit = self.topics[index]
            .retention_floor
            .saturating_add(goi_entries);
        // Step 2: read and decide.
        'rings: for broker in 0..brokers as usize {
            loop {
                let ring = &self.topics[index].rings[broker];
                let slot = ring.next_read;
                if slot >= ring.scan_end {
                    break;
                }
                // Each slot read may order itself and every held batch.
                let state = &self.topics[index];
                if state.next_ordinal + state.sessions.held() as u64 + 1 > goi_limit {
                    self.stats.retention_waits += 1;
                    break 'rings;
                }
                let offset = geometry.ring_slot_offset(topic, broker as u16, slot);
                let Some(header) =
                    read_if_ready::<M, BatchHeader>(self.pool.mem(), offset, slot + 1)
                else {
                    self.stats.stale_slots += 1;
                    break;
                };
                let ring = &mut self.topics[index].rings[broker];
                ring.next_read += 1;
                ring.decided.push_back(false);
                if self.decided_before(index, broker as u16, slot) {
                    self.mark_decided(index, broker as u16, slot);
                    decided += 1;
                    continue;
                }
                decided += self.decide(index, broker as u16, slot, header, now);
            }
        }
        let state = &mut self.topics[index];
        if !state.recovered_until.is_empty()
            && state
                .rings
                .iter()
                .zip(&state.recovered_until)
                .all(|(ring, &until)| ring.next_read >= until)
        {
            state.recovered.clear();
            state.recovered_until.clear();
        }
        // Step 3: the gap rule.
        decided += self.give_up_gaps(index, |sessions| sessions.give_up_expired(now));
        // Step 4: publish.
        self.publish_round(index);
        decided
    }

    /// After a takeover: whether the previous holder already published its decision on this
    /// slot (the completion's ready word is this lap's). That decision stands.
    fn decided_before(&self, index: usize, broker: u16, slot: u64) -> bool {
        let state = &self.topics[index];
        if state
            .recovered_until
            .get(usize::from(broker))
            .is_none_or(|&until| slot >= until)
        {
            return false;
        }
        let geometry = self.pool.geometry();
        let offset =
            geometry.completion_offset(state.topic, broker, slot) + Completion::READY_OFFSET;
        invalidate_and_fence(self.pool.mem(), offset, 8);
        self.pool.mem().load_u64(offset) == slot + 1
    }

    fn validate(&self, order: Order, header: &BatchHeader) -> Result<(), InvalidHeader> {
        let geometry = self.pool.geometry();
        let batch_bytes_max = geometry.batch_bytes_max();
        if header.payload_bytes == 0 || u64::from(header.payload_bytes) > batch_bytes_max {
            return Err(InvalidHeader::PayloadSize {
                payload_bytes: header.payload_bytes,
                batch_bytes_max,
            });
        }
        if header.message_count == 0
            || u64::from(header.message_count) * wire::payload::MESSAGE_PREFIX_BYTES as u64
                > u64::from(header.payload_bytes)
        {
            return Err(InvalidHeader::MessageCount {
                message_count: header.message_count,
                payload_bytes: header.payload_bytes,
            });
        }
        let placement = header.blog_offset % geometry.blog_bytes;
        if header.blog_offset % PAYLOAD_ALIGN_BYTES != 0
            || placement + u64::from(header.payload_bytes) > geometry.blog_bytes
        {
            return Err(InvalidHeader::PayloadPlacement {
                blog_offset: header.blog_offset,
                payload_bytes: header.payload_bytes,
            });
        }
        if header.batch_seq == u64::MAX {
            return Err(InvalidHeader::BatchSeqReserved);
        }
        if header.order != order as u8 {
            return Err(InvalidHeader::OrderMismatch {
                batch: header.order,
                topic: order as u8,
            });
        }
        Ok(())
    }

    /// Decides one batch just read from a ring; returns how many batches got decided.
    fn decide(
        &mut self,
        index: usize,
        broker: u16,
        slot: u64,
        header: BatchHeader,
        now: Timestamp,
    ) -> u64 {
        let order = self.topics[index].order;
        if let Err(why) = self.validate(order, &header) {
            log::warn!(
                "sequencer: topic {} broker {broker} slot {slot}: rejected batch: {why}",
                self.topics[index].topic
            );
            self.stats.rejected_invalid += 1;
            self.complete(index, broker, slot, CompletionStatus::RejectedInvalid, None);
            return 1;
        }
        let key = (header.client_id, header.session_epoch);
        let seq = header.batch_seq;
        if let Some(done) = self.topics[index]
            .recovered
            .remove(&(broker, header.blog_offset))
            .filter(|done| done.key == key && done.batch_seq == seq)
        {
            self.stats.batches_recovered += 1;
            self.complete_with_ordinal(
                index,
                broker,
                slot,
                CompletionStatus::Ordered,
                Some(done.global_start),
                done.ordinal,
            );
            return 1;
        }
        let held = Held {
            broker,
            slot,
            header,
        };
        let verdict = self.classify(index, key, seq, now, held);
        match verdict {
            Verdict::Order => {
                self.order_batch(index, broker, slot, header) + self.drain_session(index, key)
            }
            Verdict::Duplicate(position) => {
                self.stats.duplicates += 1;
                self.complete(index, broker, slot, CompletionStatus::Duplicate, position);
                1
            }
            Verdict::DuplicateOfHeld => {
                self.stats.duplicates += 1;
                0
            }
            Verdict::RejectedOutsideWindow => {
                self.stats.rejected_outside_window += 1;
                let status = CompletionStatus::RejectedOutsideWindow;
                self.complete(index, broker, slot, status, None);
                1
            }
            Verdict::RejectedGap => {
                self.stats.rejected_gap += 1;
                self.complete(index, broker, slot, CompletionStatus::RejectedGap, None);
                1
            }
            // Held first, so that a gap given up for the hold limit never skips past it.
            Verdict::Held => self.give_up_gaps(index, |sessions| sessions.give_up_over_limit()),
        }
    }

    /// Asks the topic's session table what to do with a batch; a session it does not know
    /// goes on from its record in the pool, when it has one.
    fn classify(
        &mut self,
        index: usize,
        key: SessionKey,
        seq: u64,
        now: Timestamp,
        held: Held,
    ) -> Verdict {
        let pool = &self.pool;
        let state = &mut self.topics[index];
        let (topic, record_of) = (state.topic, &state.record_of);
        let record = || {
            let index = *record_of.get(&key)?;
            let record = read_session_record(pool, topic, index);
            ((record.client_id, record.session_epoch) == key)
                .then_some((record.next_seq, record.window_floor))
        };
        state.sessions.classify(key, seq, now, held, record)
    }

    /// Records a session's progress in the pool after one of its batches got `ordinal`.
    fn write_session_record(&mut self, index: usize, key: SessionKey, ordinal: u64) {
        const PROBES: u64 = 8;
        let geometry = *self.pool.geometry();
        let state = &mut self.topics[index];
        let slot = match state.record_of.get(&key) {
            Some(&slot) => slot,
            None => {
                let hash = (key.0 ^ (u64::from(key.1) << 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let first = hash >> 40;
                let candidates = (first..first + PROBES).map(|i| i & (SESSION_RECORDS - 1));
                let slot = candidates
                    .clone()
                    .find(|i| !state.records.contains_key(i))
                    .or_else(|| candidates.min_by_key(|i| state.records.get(i).map_or(0, |r| r.1)))
                    .expect("at least one probe");
                if let Some((evicted, _)) = state.records.get(&slot) {
                    state.record_of.remove(evicted);
                }
                state.record_of.insert(key, slot);
                slot
            }
        };
        state.records.insert(slot, (key, ordinal));
        let (next_seq, window_floor) = state
            .sessions
            .progress(key)
            .expect("session of an ordered batch");
        let record = SessionRecord {
            client_id: key.0,
            session_epoch: key.1,
            reserved0: 0,
            next_seq,
            window_floor,
            last_ordinal: ordinal,
            reserved1: [0; 3],
        };
        let offset = geometry.session_record_offset(state.topic, slot);
        self.pool.mem().write(offset, bytemuck::bytes_of(&record));
        self.pool.mem().flush(offset, 64);
    }

    /// Orders the held batches of `key` that now follow without a gap.
    fn drain_session(&mut self, index: usize, key: SessionKey) -> u64 {
        let mut decided = 0;
        while let Some(held) = self.topics[index].sessions.next_in_order(key) {
            decided += self.order_batch(index, held.broker, held.slot, held.header);
        }
        decided
    }

    /// The gap rule: gives up every gap `next` names (on time, or for the hold limit),
    /// ordering what each unblocks. Returns how many batches got decided.
    fn give_up_gaps(
        &mut self,
        index: usize,
        mut next: impl FnMut(&mut SessionTable<Held>) -> Option<GapSkipped>,
    ) -> u64 {
        let mut decided = 0;
        while let Some(gap) = next(&mut self.topics[index].sessions) {
            let skipped = gap.to.saturating_sub(gap.from);
            log::warn!(
                "sequencer: topic {} session {:?}: gap of {skipped} sequences from seq {} \
                 given up; later arrivals of them are rejected",
                self.topics[index].topic,
                gap.key,
                gap.from
            );
            // A publisher chooses its sequences: a skip may be almost 2^64 long.
            self.stats.sequences_skipped = self.stats.sequences_skipped.saturating_add(skipped);
            self.stats.gaps_resolved += 1;
            decided += self.drain_session(index, gap.key);
        }
        decided
    }

    /// Places a batch in the order; returns the batches it decided (itself, and the held
    /// ones its span stranded).
    fn order_batch(&mut self, index: usize, broker: u16, slot: u64, header: BatchHeader) -> u64 {
        if !self.may_write() {
            return 0;
        }
        let geometry = *self.pool.geometry();
        let state = &mut self.topics[index];
        let ordinal = state.next_ordinal;
        let global_start = state.next_position;
        state.next_ordinal += 1;
        state.next_position += u64::from(header.message_count);
        let entry = GoiEntry {
            global_start,
            blog_offset: header.blog_offset,
            client_id: header.client_id,
            batch_seq: header.batch_seq,
            payload_bytes: header.payload_bytes,
            message_count: header.message_count,
            session_epoch: header.session_epoch,
            checksum: header.checksum,
            broker,
            flags: u16::from(header.flags),
            reserved1: 0,
            ready: ordinal + 1,
        };
        write_body(
            self.pool.mem(),
            geometry.goi_offset(state.topic, ordinal),
            &entry,
        );
        state.pending_goi.push(ordinal);
        let key = (header.client_id, header.session_epoch);
        let span = sequence_span(header.flags, header.message_count);
        let copies = state
            .sessions
            .ordered(key, header.batch_seq, span, global_start);
        let stranded = state.sessions.take_stranded();
        state.rings[broker as usize].ordered_batches += 1;
        self.stats.batches_ordered += 1;
        self.stats.messages_ordered += u64::from(header.message_count);
        self.write_session_record(index, key, ordinal);
        self.complete_with_ordinal(
            index,
            broker,
            slot,
            CompletionStatus::Ordered,
            Some(global_start),
            ordinal,
        );
        // Resends of this batch that arrived while it was held, answered with its position.
        for copy in copies {
            let status = CompletionStatus::Duplicate;
            self.complete(index, copy.broker, copy.slot, status, Some(global_start));
        }
        // Held batches inside this one's span (a client that numbers messages sent
        // overlapping sequences): never placed, rejected as a late batch of a gap is.
        let decided = 1 + stranded.len() as u64;
        for held in stranded {
            self.stats.rejected_gap += 1;
            let status = CompletionStatus::RejectedGap;
            self.complete(index, held.broker, held.slot, status, None);
        }
        decided
    }

    fn complete(
        &mut self,
        index: usize,
        broker: u16,
        slot: u64,
        status: CompletionStatus,
        global_start: Option<u64>,
    ) {
        self.complete_with_ordinal(index, broker, slot, status, global_start, u64::MAX);
    }

    fn complete_with_ordinal(
        &mut self,
        index: usize,
        broker: u16,
        slot: u64,
        status: CompletionStatus,
        global_start: Option<u64>,
        ordinal: u64,
    ) {
        if !self.may_write() {
            return;
        }
        let geometry = *self.pool.geometry();
        let state = &mut self.topics[index];
        let completion = Completion {
            global_start: global_start.unwrap_or(u64::MAX),
            status: status.code(),
            reserved0: 0,
            ordinal,
            ready: slot + 1,
        };
        write_body(
            self.pool.mem(),
            geometry.completion_offset(state.topic, broker, slot),
            &completion,
        );
        state.pending_completions.push((broker, slot));
        self.mark_decided(index, broker, slot);
    }

    /// Records that `slot` is decided and releases the gap-free prefix of decided slots.
    fn mark_decided(&mut self, index: usize, broker: u16, slot: u64) {
        let ring = &mut self.topics[index].rings[broker as usize];
        let at = (slot - ring.released) as usize;
        ring.decided[at] = true;
        while ring.decided.front() == Some(&true) {
            ring.decided.pop_front();
            ring.released += 1;
        }
        ring.frontier_dirty = true;
    }

    fn publish_round(&mut self, index: usize) {
        let geometry = *self.pool.geometry();
        let state = &mut self.topics[index];
        if state.pending_goi.is_empty() && state.pending_completions.is_empty() {
            return;
        }
        if !self.still_holds() {
            return;
        }
        let topic = self.topics[index].topic;
        // Bodies were written and flushed as they were decided.
        self.pool.mem().fence();
        let goi = std::mem::take(&mut self.topics[index].pending_goi);
        if !goi.is_empty() {
            for &ordinal in &goi {
                if !self.may_write() {
                    return;
                }
                let offset = geometry.goi_offset(topic, ordinal);
                set_ready::<M, GoiEntry>(self.pool.mem(), offset, ordinal + 1);
            }
            self.pool.mem().fence();
            if !self.may_write() {
                return;
            }
            let state = &self.topics[index];
            self.pool.write_frontier(
                geometry.seq_state_offset(topic),
                state.next_ordinal,
                state.next_position,
            );
            self.pool.mem().fence();
        }
        let completions = std::mem::take(&mut self.topics[index].pending_completions);
        for &(broker, slot) in &completions {
            if !self.may_write() {
                return;
            }
            let offset = geometry.completion_offset(topic, broker, slot);
            set_ready::<M, Completion>(self.pool.mem(), offset, slot + 1);
        }
        if !self.may_write() {
            return;
        }
        let state = &mut self.topics[index];
        for (broker, ring) in state.rings.iter_mut().enumerate() {
            if ring.frontier_dirty {
                ring.frontier_dirty = false;
                self.pool.write_frontier(
                    geometry.frontier_offset(topic, broker as u16, FRONTIER_ORDERED),
                    ring.released,
                    ring.ordered_batches,
                );
            }
        }
        // Keep the allocations for the next round.
        let state = &mut self.topics[index];
        state.pending_goi = goi;
        state.pending_goi.clear();
        state.pending_completions = completions;
        state.pending_completions.clear();
    }

    /// The next global position of `topic` (messages ordered so far).
    pub fn next_position(&self, topic: TopicId) -> Option<u64> {
        self.topics
            .iter()
            .find(|t| t.topic == topic)
            .map(|t| t.next_position)
    }
}

/// Reads session record `index` of `topic` (invalidated first: a previous holder wrote it).
fn read_session_record<M: SharedMemory>(
    pool: &Pool<M>,
    topic: TopicId,
    index: u64,
) -> SessionRecord {
    let offset = pool.geometry().session_record_offset(topic, index);
    let mut record = SessionRecord::zeroed();
    let bytes = bytemuck::bytes_of_mut(&mut record);
    invalidate_and_fence(pool.mem(), offset, bytes.len() as u64);
    pool.mem().read(offset, bytes);
    record
}

/// The published lease record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Broker holding the lease.
    pub holder: u16,
    /// Its epoch.
    pub epoch: u64,
    /// Its heartbeat counter.
    pub heartbeat: u64,
    /// How long the heartbeat may stay still before a standby takes over.
    pub lease_ms: u64,
}

/// A standby's watch on the lease, without I/O: fed the lease as read and the time, it says
/// when the holder's heartbeat stayed still for the lease time the holder published, and
/// which epoch to take then (one above). Exactly one standby wins the takeover: the epoch
/// moves by compare-and-swap in [`Sequencer::new`].
#[derive(Debug, Clone, Default)]
pub struct LeaseWatch {
    /// The (epoch, heartbeat) last seen, and when it last changed.
    seen: Option<(u64, u64)>,
    moved_at: Timestamp,
}

impl LeaseWatch {
    /// A watch that has seen nothing yet.
    pub fn new() -> LeaseWatch {
        LeaseWatch::default()
    }

    /// Looks at `lease` at `now`; returns the epoch to take over with, once due. With no
    /// lease published yet (the head has not started) nothing is due.
    pub fn observe(&mut self, lease: Option<Lease>, now: Timestamp) -> Option<u64> {
        let Some(lease) = lease else {
            self.seen = None;
            self.moved_at = now;
            return None;
        };
        let heard = (lease.epoch, lease.heartbeat);
        if self.seen != Some(heard) {
            self.seen = Some(heard);
            self.moved_at = now;
        }
        let silent = now.saturating_duration_since(self.moved_at);
        (lease.epoch > 0 && silent >= Duration::from_millis(lease.lease_ms.max(1)))
            .then_some(lease.epoch + 1)
    }

    /// The takeover was not needed (another standby won, or the holder came back): watch
    /// afresh from `now`.
    pub fn restart(&mut self, now: Timestamp) {
        self.moved_at = now;
    }

    /// How long the heartbeat has been still, as of `now`.
    pub fn silent(&self, now: Timestamp) -> Duration {
        now.saturating_duration_since(self.moved_at)
    }
}

/// Reads the lease record, when one is published.
pub fn read_lease<M: SharedMemory>(pool: &Pool<M>) -> Option<Lease> {
    let mem = pool.mem();
    invalidate_and_fence(
        mem,
        LEASE_OFFSET,
        std::mem::size_of::<SequencerLease>() as u64,
    );
    let ready = mem.load_u64(LEASE_OFFSET + SequencerLease::READY_OFFSET);
    if ready == 0 {
        return None;
    }
    let lease = read_if_ready::<M, SequencerLease>(mem, LEASE_OFFSET, ready)?;
    Some(Lease {
        holder: lease.holder_broker as u16,
        epoch: lease.epoch,
        heartbeat: lease.heartbeat,
        lease_ms: lease.lease_ms,
    })
}

/// How far a batch moves its session's sequence: 1 (a batch), or its message count when
/// the session numbers messages ([`BATCH_SEQ_COUNTS_MESSAGES`]; at least 1).
fn sequence_span(flags: u8, message_count: u32) -> u64 {
    if flags & BATCH_SEQ_COUNTS_MESSAGES != 0 {
        u64::from(message_count.max(1))
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(epoch: u64, heartbeat: u64) -> Option<Lease> {
        Some(Lease {
            holder: 0,
            epoch,
            heartbeat,
            lease_ms: 50,
        })
    }

    #[test]
    fn a_lease_watch_takes_over_once_the_heartbeat_stayed_still_for_the_lease() {
        let at = |ms: u64| Timestamp::from_nanos(1_000_000_000 + ms * 1_000_000);
        let mut watch = LeaseWatch::new();
        assert_eq!(watch.observe(None, at(0)), None, "no holder yet");
        assert_eq!(watch.observe(lease(1, 10), at(10)), None);
        // A heartbeat that moves keeps the holder.
        assert_eq!(watch.observe(lease(1, 11), at(55)), None);
        assert_eq!(watch.observe(lease(1, 11), at(104)), None, "49 ms still");
        assert_eq!(watch.observe(lease(1, 11), at(105)), Some(2), "50 ms still");
        // Another standby won: watch afresh, and the new holder's epoch counts.
        watch.restart(at(105));
        assert_eq!(watch.observe(lease(2, 12), at(106)), None);
        assert_eq!(watch.observe(lease(2, 12), at(156)), Some(3));
    }
}
