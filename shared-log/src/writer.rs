//! The broker side of one (topic, broker) ring: reserve payload log space, fill it (straight
//! from the network), commit a batch header, and read the sequencer's completions back.
//!
//! Single writer: the broker that owns the ring. Several reservations may be outstanding at
//! once (one per connection receiving a batch); ring slots are assigned at commit, so a slow
//! connection never holds back the sequencing of others. Payload log space is reclaimed in
//! allocation order once a batch is both committed and completed.

use std::collections::VecDeque;
use std::time::Duration;

use units::Timestamp;

use crate::Order;
use crate::coherence::{CACHE_LINE_BYTES, SharedMemory};
use crate::layout::CompletionStatus;
use crate::layout::{
    BatchHeader, Completion, FRONTIER_ORDERED, FRONTIER_WRITTEN, PAYLOAD_ALIGN_BYTES, Record,
};
use crate::pool::{Pool, PoolError, TopicId, invalidate_and_fence, publish, read_if_ready};

/// After a reclaim, how long [`TopicWriter::reserve_at`] answers [`AppendError::LogFull`]
/// to a reservation short of room instead of reclaiming again. Each reclaim reads every
/// broker's retention lines (the subscribers' floor) afresh; a log short of room waits for
/// subscribers to read on, which takes far longer, and reading the lines on each retry (each
/// pass of a busy-polling loop, for each connection waiting) took the core from the very
/// deliveries that move the floor.
pub const RECLAIM_RETRY_INTERVAL: Duration = Duration::from_micros(50);

/// Why a batch cannot be appended now or ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    /// Every ring slot is in flight: poll completions and retry (backpressure, not loss).
    #[error("ring full: {in_flight} of {ring_slots} slots in flight")]
    RingFull {
        /// Slots reserved or committed and not yet completed.
        in_flight: u64,
        /// Ring size.
        ring_slots: u32,
    },
    /// Not enough free payload log space: poll completions and retry.
    #[error("payload log full: {needed} bytes needed, {free} free")]
    LogFull {
        /// Bytes the batch needs (with alignment and wrap padding).
        needed: u64,
        /// Bytes free now.
        free: u64,
    },
    /// The batch can never fit: it is larger than half the payload log.
    #[error("batch of {payload_bytes} bytes exceeds the pool's limit of {batch_bytes_max}")]
    TooLarge {
        /// Payload size.
        payload_bytes: u64,
        /// Largest payload this pool takes.
        batch_bytes_max: u64,
    },
    /// A batch must hold at least one message.
    #[error("empty batch: a batch holds at least one message")]
    Empty,
    /// The broker's claim on its id moved on: the writer publishes nothing more.
    #[error(transparent)]
    ClaimMoved(#[from] ClaimMoved),
}

/// Another process holds the claim on this writer's broker id now (this one was paused past
/// its claim lease and taken over): the writer refuses to publish, as two writers of one
/// ring would corrupt it. The broker must stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the claim on broker id {broker} is held by another process now (owner word \
     {owner:#018x}): this broker's ring writer publishes nothing more; the broker stops"
)]
pub struct ClaimMoved {
    /// The broker id.
    pub broker: u16,
    /// The owner word found.
    pub owner: u64,
}

/// Why a ring writer cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriterError {
    /// Pool-level problem (unknown topic or broker).
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// A slot the earlier run published is not readable: the pool is damaged.
    #[error(
        "ring of broker {broker} for topic {topic}: slot {slot}, published by an earlier run, \
         is not readable (ready word {ready}, expected {expected}); the pool is damaged"
    )]
    RingDamaged {
        /// Broker id.
        broker: u16,
        /// Topic id.
        topic: TopicId,
        /// Slot sequence number.
        slot: u64,
        /// Ready word found.
        ready: u64,
        /// Ready word expected.
        expected: u64,
    },
}

/// Space reserved in the payload log for one batch, to be filled and then committed.
#[derive(Debug, PartialEq, Eq)]
pub struct Reservation {
    allocation: u64,
    blog_offset: u64,
    payload_bytes: u64,
    /// The payload went to memory with streaming stores: no flush needed before the fence.
    streamed: bool,
}

impl Reservation {
    /// Logical payload log offset of the payload.
    pub fn blog_offset(&self) -> u64 {
        self.blog_offset
    }

    /// Payload bytes reserved.
    pub fn payload_bytes(&self) -> u64 {
        self.payload_bytes
    }
}

/// What the publisher said about a batch, stored in its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchMeta {
    /// Publisher id.
    pub client_id: u64,
    /// Publisher session epoch.
    pub session_epoch: u32,
    /// Batch sequence within the session.
    pub batch_seq: u64,
    /// Messages in the payload.
    pub message_count: u32,
    /// CRC-32C of the payload.
    pub checksum: u32,
    /// [`BATCH_SEQ_COUNTS_MESSAGES`](crate::layout::BATCH_SEQ_COUNTS_MESSAGES) (the session
    /// numbers messages) and [`BATCH_RECORD_BATCHES`](crate::layout::BATCH_RECORD_BATCHES)
    /// (the payload's format), or 0.
    pub flags: u8,
}

/// The sequencer's decision on one committed batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotOutcome {
    /// Ring slot sequence number, as returned by [`TopicWriter::commit`].
    pub slot: u64,
    /// What became of the batch.
    pub status: CompletionStatus,
    /// First global position, when known.
    pub global_start: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Allocation {
    /// Start of the space taken (before any skip to the log's start).
    start: u64,
    state: AllocationState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AllocationState {
    /// Reserved or committed, not yet decided.
    InUse,
    /// Decided; `Some(ordinal)` when its payload is part of the log.
    Decided(Option<u64>),
    /// Given back without being committed.
    Aborted,
}

/// The broker's writer for one (topic, broker) ring. See the module docs.
#[derive(Debug)]
pub struct TopicWriter<M> {
    pool: Pool<M>,
    topic: TopicId,
    broker: u16,
    order: Order,
    ring_slots: u64,
    blog_bytes: u64,
    batch_bytes_max: u64,
    next_slot: u64,
    completed_slots: u64,
    uncommitted: u64,
    /// Allocation id of `allocations[0]`.
    first_allocation: u64,
    allocations: VecDeque<Allocation>,
    /// Allocation id of each committed, not yet completed slot, in slot order.
    committed: VecDeque<u64>,
    blog_head: u64,
    overwrite_limit: u64,
    /// Undecided slots of an earlier run (see [`TopicWriter::recovered_in_flight`]).
    recovered: u64,
    /// Reservations refused for want of room so far (see [`TopicWriter::full_events`]).
    full_events: u64,
    /// The claim token the broker holds its id with, checked before every publication (see
    /// [`TopicWriter::with_claim_token`]); `None`: nothing is checked.
    claim_token: Option<u64>,
    /// Set once a check found the claim moved on: nothing is published any more.
    claim_moved: Option<ClaimMoved>,
    /// When [`TopicWriter::reserve_at`] may reclaim again (see [`RECLAIM_RETRY_INTERVAL`]).
    reclaim_not_before: Timestamp,
    /// Reads of the subscribers' floor so far (see [`TopicWriter::reclaims`]).
    reclaims: u64,
}

impl<M: SharedMemory> TopicWriter<M> {
    /// A writer for `broker`'s ring of `topic`. A ring an earlier run of this broker left
    /// (a crash or a restart) is picked up where it stopped; its slots still undecided are
    /// counted by [`TopicWriter::recovered_in_flight`]. It checks no claim: for a broker,
    /// add [`TopicWriter::with_claim_token`].
    pub fn new(pool: Pool<M>, topic: TopicId, broker: u16) -> Result<TopicWriter<M>, WriterError> {
        pool.check_broker(broker)?;
        let config = pool.topic_config(topic)?;
        let geometry = *pool.geometry();
        let mut writer = TopicWriter {
            pool,
            topic,
            broker,
            order: config.order,
            ring_slots: u64::from(geometry.ring_slots),
            blog_bytes: geometry.blog_bytes,
            batch_bytes_max: geometry.batch_bytes_max(),
            next_slot: 0,
            completed_slots: 0,
            uncommitted: 0,
            first_allocation: 0,
            allocations: VecDeque::new(),
            committed: VecDeque::new(),
            blog_head: 0,
            overwrite_limit: 0,
            recovered: 0,
            full_events: 0,
            claim_token: None,
            claim_moved: None,
            reclaim_not_before: Timestamp::ZERO,
            reclaims: 0,
        };
        writer.recover()?;
        Ok(writer)
    }

    /// Publishes only while the claim on the broker id holds `token` (see
    /// [`crate::claim`]): the owner word is read afresh (one line invalidated, a fence, a
    /// load: about 0.25 us) right before every slot is published and before the overwrite
    /// limit is, and once the claim is found moved on, every reservation and commit is
    /// [`ClaimMoved`]. What stays open is a pause of this thread between the check and the
    /// stores that follow it (a header and a frontier line).
    pub fn with_claim_token(mut self, token: u64) -> TopicWriter<M> {
        self.claim_token = Some(token);
        self
    }

    /// Whether this writer may still publish (see [`TopicWriter::with_claim_token`]).
    fn check_claim(&mut self) -> Result<(), ClaimMoved> {
        if let Some(moved) = self.claim_moved {
            return Err(moved);
        }
        let Some(token) = self.claim_token else {
            return Ok(());
        };
        crate::claim::check_owner(&self.pool, self.broker, token).map_err(|owner| {
            let moved = ClaimMoved {
                broker: self.broker,
                owner,
            };
            self.claim_moved = Some(moved);
            moved
        })
    }

    /// Rebuilds the writer's state from what an earlier run published: the `written`
    /// frontier, the sequencer's `ordered` frontier, and the headers and completions of the
    /// slots still in the ring. Slots the sequencer has released are decided (their
    /// completions are read for the payload's ordinal); later ones are still in flight and
    /// their completions arrive as usual (no connection waits for them: their publishers
    /// resend, and the sequencer answers the resend as a duplicate). Payloads of batches
    /// older than one ring lap are not tracked any more and may be overwritten: a subscriber
    /// still reading them gets `Overwritten`, never wrong bytes.
    fn recover(&mut self) -> Result<(), WriterError> {
        let geometry = *self.pool.geometry();
        let (written, overwrite_limit) = self.pool.read_frontier(geometry.frontier_offset(
            self.topic,
            self.broker,
            FRONTIER_WRITTEN,
        ));
        if written == 0 {
            return Ok(());
        }
        let (released, _) = self.pool.read_frontier(geometry.frontier_offset(
            self.topic,
            self.broker,
            FRONTIER_ORDERED,
        ));
        let released = released.min(written);
        let first = written.saturating_sub(self.ring_slots);
        let mem = self.pool.mem();
        let mut slots = Vec::with_capacity((written - first) as usize);
        for slot in first..written {
            let offset = geometry.ring_slot_offset(self.topic, self.broker, slot);
            invalidate_and_fence(mem, offset, std::mem::size_of::<BatchHeader>() as u64);
            let Some(header) = read_if_ready::<M, BatchHeader>(mem, offset, slot + 1) else {
                return Err(WriterError::RingDamaged {
                    broker: self.broker,
                    topic: self.topic,
                    slot,
                    ready: mem.load_u64(offset + BatchHeader::READY_OFFSET),
                    expected: slot + 1,
                });
            };
            let state = if slot < released {
                let offset = geometry.completion_offset(self.topic, self.broker, slot);
                invalidate_and_fence(mem, offset, std::mem::size_of::<Completion>() as u64);
                let ordinal = read_if_ready::<M, Completion>(mem, offset, slot + 1)
                    .map_or(u64::MAX, |completion| completion.ordinal);
                let ordinal = (ordinal != u64::MAX).then_some(ordinal);
                AllocationState::Decided(ordinal)
            } else {
                AllocationState::InUse
            };
            let end = (header.blog_offset + u64::from(header.payload_bytes))
                .next_multiple_of(PAYLOAD_ALIGN_BYTES);
            slots.push((header.blog_offset, end, slot, state));
        }
        // Allocations are kept in payload log order; slots were committed in any order.
        slots.sort_unstable_by_key(|&(start, ..)| start);
        let mut in_flight = Vec::new();
        for (index, &(start, end, slot, state)) in slots.iter().enumerate() {
            self.allocations.push_back(Allocation { start, state });
            self.blog_head = self.blog_head.max(end);
            if state == AllocationState::InUse {
                in_flight.push((slot, index as u64));
            }
        }
        in_flight.sort_unstable();
        self.committed = in_flight.into_iter().map(|(_, id)| id).collect();
        self.next_slot = written;
        self.completed_slots = released;
        self.overwrite_limit = overwrite_limit;
        self.recovered = written - released;
        log::info!(
            "broker {} topic {}: picked up the ring an earlier run left: {written} slots \
             written, {released} decided, payload log at byte {}",
            self.broker,
            self.topic,
            self.blog_head
        );
        Ok(())
    }

    /// Slots an earlier run committed that were still undecided when this writer started:
    /// their completions come first and belong to no connection of this run.
    pub fn recovered_in_flight(&self) -> u64 {
        self.recovered
    }

    /// The topic's ordering level.
    pub fn order(&self) -> Order {
        self.order
    }

    /// Slots committed and not yet completed, plus reservations not yet committed.
    pub fn in_flight(&self) -> u64 {
        self.next_slot - self.completed_slots + self.uncommitted
    }

    /// How many reservations were refused for want of a ring slot or of payload log room:
    /// when it grows, someone waits for room, and a reservation that is slow to fill holds
    /// that room back.
    pub fn full_events(&self) -> u64 {
        self.full_events
    }

    /// Largest payload this ring takes.
    pub fn batch_bytes_max(&self) -> u64 {
        self.batch_bytes_max
    }

    fn blog_tail(&self) -> u64 {
        self.allocations.front().map_or(self.blog_head, |a| a.start)
    }

    /// How many times a reservation reclaimed space (each a read of the subscribers' floor).
    pub fn reclaims(&self) -> u64 {
        self.reclaims
    }

    /// Reserves log space and a ring slot for a payload of `payload_bytes`, reclaiming space
    /// whenever the log is short of it (for callers without a clock: tools and tests).
    pub fn reserve(&mut self, payload_bytes: u64) -> Result<Reservation, AppendError> {
        self.reserve_inner(payload_bytes, None)
    }

    /// [`TopicWriter::reserve`] at `now`, for a caller that retries a refused reservation
    /// soon and often (a network loop): it reclaims at most once per
    /// [`RECLAIM_RETRY_INTERVAL`], and a reservation short of room in between is refused
    /// without reclaiming. Every reclaim reads the subscribers' floor afresh, so a
    /// subscriber is protected from its line's publication on, as with
    /// [`TopicWriter::reserve`].
    pub fn reserve_at(
        &mut self,
        payload_bytes: u64,
        now: Timestamp,
    ) -> Result<Reservation, AppendError> {
        self.reserve_inner(payload_bytes, Some(now))
    }

    fn reserve_inner(
        &mut self,
        payload_bytes: u64,
        now: Option<Timestamp>,
    ) -> Result<Reservation, AppendError> {
        if let Some(moved) = self.claim_moved {
            return Err(moved.into());
        }
        if payload_bytes > self.batch_bytes_max {
            return Err(AppendError::TooLarge {
                payload_bytes,
                batch_bytes_max: self.batch_bytes_max,
            });
        }
        if payload_bytes == 0 {
            return Err(AppendError::Empty);
        }
        if self.in_flight() >= self.ring_slots {
            self.full_events += 1;
            return Err(AppendError::RingFull {
                in_flight: self.in_flight(),
                ring_slots: self.ring_slots as u32,
            });
        }
        let start = self.blog_head;
        let mut payload_start = start;
        if payload_start % self.blog_bytes + payload_bytes > self.blog_bytes {
            payload_start = payload_start.next_multiple_of(self.blog_bytes);
        }
        let end = (payload_start + payload_bytes).next_multiple_of(PAYLOAD_ALIGN_BYTES);
        if end - self.blog_tail() > self.blog_bytes
            && now.is_none_or(|now| now >= self.reclaim_not_before)
        {
            // Space is reclaimed only here, when it is needed, against the subscribers' floor
            // as it is now: a subscriber that just connected is protected too.
            self.reclaim();
            if let Some(now) = now {
                self.reclaim_not_before = now + RECLAIM_RETRY_INTERVAL;
            }
        }
        let tail = self.blog_tail();
        let used = start - tail;
        if end - tail > self.blog_bytes {
            self.full_events += 1;
            return Err(AppendError::LogFull {
                needed: end - start,
                free: self.blog_bytes - used,
            });
        }
        // Readers may still be reading old bytes where this payload goes: tell them first.
        let overwritten = end.saturating_sub(self.blog_bytes);
        if overwritten > self.overwrite_limit {
            self.check_claim()?;
            // Publish in chunks of 1/16 of the log, never past data that is still live.
            self.overwrite_limit = (overwritten + self.blog_bytes / 16)
                .min(tail)
                .max(overwritten);
            let geometry = self.pool.geometry();
            let offset = geometry.frontier_offset(self.topic, self.broker, FRONTIER_WRITTEN);
            self.pool
                .write_frontier(offset, self.next_slot, self.overwrite_limit);
            self.pool.mem().fence();
        }
        self.blog_head = end;
        let allocation = self.first_allocation + self.allocations.len() as u64;
        self.allocations.push_back(Allocation {
            start,
            state: AllocationState::InUse,
        });
        self.uncommitted += 1;
        Ok(Reservation {
            allocation,
            blog_offset: payload_start,
            payload_bytes,
            streamed: false,
        })
    }

    /// Fills a reservation's payload in place with `f` (the network receive path).
    pub fn fill<R>(&self, reservation: &Reservation, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let offset =
            self.pool
                .geometry()
                .blog_offset(self.topic, self.broker, reservation.blog_offset);
        self.pool
            .mem()
            .fill_bytes(offset, reservation.payload_bytes, f)
    }

    /// Copies `payload` into a reservation (which must be exactly its size), with streaming
    /// stores where the memory supports them.
    pub fn write_payload(&self, reservation: &mut Reservation, payload: &[u8]) {
        assert_eq!(payload.len() as u64, reservation.payload_bytes);
        let geometry = self.pool.geometry();
        let offset = geometry.blog_offset(self.topic, self.broker, reservation.blog_offset);
        reservation.streamed = self.pool.mem().write_bulk(offset, payload);
    }

    /// Publishes a filled reservation as the next ring slot: flushes the payload, checks the
    /// claim (right before the first store, so that a pause during the flush is caught),
    /// fences, publishes the header (ready word last), then the `written` frontier that makes
    /// the slot visible to the sequencer. Returns the slot sequence number; when the claim
    /// moved on, nothing is published and the reservation is given back.
    pub fn commit(&mut self, reservation: Reservation, meta: BatchMeta) -> Result<u64, ClaimMoved> {
        let geometry = *self.pool.geometry();
        if !reservation.streamed {
            let payload_offset =
                geometry.blog_offset(self.topic, self.broker, reservation.blog_offset);
            self.pool
                .mem()
                .flush(payload_offset, reservation.payload_bytes);
        }
        if let Err(moved) = self.check_claim() {
            self.abort(reservation);
            return Err(moved);
        }
        let mem = self.pool.mem();
        let slot = self.next_slot;
        let header = BatchHeader {
            blog_offset: reservation.blog_offset,
            client_id: meta.client_id,
            batch_seq: meta.batch_seq,
            payload_bytes: reservation.payload_bytes as u32,
            message_count: meta.message_count,
            session_epoch: meta.session_epoch,
            checksum: meta.checksum,
            order: self.order as u8,
            flags: meta.flags,
            reserved: [0; 14],
            ready: slot + 1,
        };
        publish(
            mem,
            geometry.ring_slot_offset(self.topic, self.broker, slot),
            &header,
        );
        self.next_slot += 1;
        self.uncommitted -= 1;
        self.committed.push_back(reservation.allocation);
        let frontier = geometry.frontier_offset(self.topic, self.broker, FRONTIER_WRITTEN);
        self.pool
            .write_frontier(frontier, self.next_slot, self.overwrite_limit);
        Ok(slot)
    }

    /// Gives a reservation back without publishing it (the connection went away mid-batch).
    pub fn abort(&mut self, reservation: Reservation) {
        self.uncommitted -= 1;
        self.finish_allocation(reservation.allocation, AllocationState::Aborted);
    }

    /// Reserves, copies and commits in one step.
    pub fn append(&mut self, meta: BatchMeta, payload: &[u8]) -> Result<u64, AppendError> {
        let mut reservation = self.reserve(payload.len() as u64)?;
        self.write_payload(&mut reservation, payload);
        Ok(self.commit(reservation, meta)?)
    }

    fn finish_allocation(&mut self, allocation: u64, state: AllocationState) {
        let index = (allocation - self.first_allocation) as usize;
        self.allocations[index].state = state;
    }

    /// Frees, in order, the oldest allocations whose payload nobody needs any more: aborted,
    /// not part of the log, or below the lowest ordinal a connected subscriber still needs.
    fn reclaim(&mut self) {
        self.reclaims += 1;
        let floor = self.pool.retention_floor(self.topic);
        while let Some(front) = self.allocations.front() {
            let reclaimable = match front.state {
                AllocationState::InUse => false,
                AllocationState::Aborted | AllocationState::Decided(None) => true,
                AllocationState::Decided(Some(ordinal)) => ordinal < floor,
            };
            if !reclaimable {
                break;
            }
            self.allocations.pop_front();
            self.first_allocation += 1;
        }
    }

    /// Reads up to `max` completions in slot order (stopping at the first undecided slot),
    /// frees their space, and hands each to `f`. Returns how many it read.
    pub fn poll_completions(&mut self, max: usize, mut f: impl FnMut(SlotOutcome)) -> usize {
        let geometry = *self.pool.geometry();
        let pending = (self.next_slot - self.completed_slots).min(max as u64);
        if pending == 0 {
            return 0;
        }
        let entry_bytes = std::mem::size_of::<Completion>() as u64;
        // Most calls find the oldest slot still undecided: look at its line alone first, and
        // only once it is decided invalidate the whole run (at most up to the ring's end),
        // fence once, and read on (each entry is checked by its own ready word).
        let first = self.completed_slots;
        let run = pending.min(self.ring_slots - first % self.ring_slots);
        let run_offset = geometry.completion_offset(self.topic, self.broker, first);
        invalidate_and_fence(self.pool.mem(), run_offset, entry_bytes);
        if self
            .pool
            .mem()
            .load_u64(run_offset + Completion::READY_OFFSET)
            != first + 1
        {
            return 0;
        }
        if run > 1 {
            invalidate_and_fence(self.pool.mem(), run_offset, run * entry_bytes);
        }
        let mut read = 0;
        for slot in first..first + run {
            let offset = geometry.completion_offset(self.topic, self.broker, slot);
            let Some(completion) =
                read_if_ready::<M, Completion>(self.pool.mem(), offset, slot + 1)
            else {
                break;
            };
            debug_assert_eq!(completion.ready(), slot + 1);
            let status = CompletionStatus::from_code(completion.status);
            self.completed_slots += 1;
            let allocation = self
                .committed
                .pop_front()
                .expect("a committed slot has an allocation");
            let ordinal = (completion.ordinal != u64::MAX).then_some(completion.ordinal);
            self.finish_allocation(allocation, AllocationState::Decided(ordinal));
            f(SlotOutcome {
                slot,
                status,
                global_start: (completion.global_start != u64::MAX)
                    .then_some(completion.global_start),
            });
            read += 1;
        }
        read
    }

    /// Slots committed so far.
    pub fn committed_slots(&self) -> u64 {
        self.next_slot
    }

    /// Slots whose completion has been read.
    pub fn completed_slots(&self) -> u64 {
        self.completed_slots
    }
}

const _: () = assert!(CACHE_LINE_BYTES % std::mem::size_of::<Completion>() as u64 == 0);
const _: () = assert!(BatchHeader::READY_OFFSET == 56);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claim::{test_claimant as claimant, try_claim};
    use crate::layout::Geometry;
    use crate::pool::TopicConfig;
    use crate::sim::{SimAgent, SimMemory};

    fn meta(batch_seq: u64) -> BatchMeta {
        BatchMeta {
            client_id: 7,
            session_epoch: 1,
            batch_seq,
            message_count: 1,
            checksum: 0,
            flags: 0,
        }
    }

    #[test]
    fn a_writer_whose_claim_was_taken_over_publishes_nothing_more() {
        let geometry = Geometry {
            brokers_max: 2,
            topics_max: 1,
            ring_slots: 8,
            goi_entries: 64,
            blog_bytes: 64 * 1024,
        };
        let memory = SimMemory::new(geometry.layout_bytes());
        let formatter = Pool::format(SimAgent::new(&memory), geometry, 1).unwrap();
        let config = TopicConfig {
            order: Order::Total,
            ack: 1,
            replication_factor: 1,
            retention: crate::Retention::StallLimited,
            history: crate::HistoryRetention::UNLIMITED,
        };
        let topic = formatter.create_topic("t", config).unwrap();
        // Two processes with their own caches: the one that gets paused, and its successor.
        let paused = Pool::attach(SimAgent::new(&memory)).unwrap();
        let successor = Pool::attach(SimAgent::new(&memory)).unwrap();
        try_claim(&paused, 1, 0, &claimant(0x11)).unwrap();
        let mut writer = TopicWriter::new(paused.clone(), topic, 1)
            .unwrap()
            .with_claim_token(0x11);
        assert_eq!(writer.append(meta(0), b"before"), Ok(0));
        // A batch was arriving when the process was paused past its lease...
        let mut arriving = writer.reserve(6).unwrap();
        try_claim(&successor, 1, 0x11, &claimant(0x22)).unwrap();
        let next = TopicWriter::new(successor.clone(), topic, 1).unwrap();
        assert_eq!(next.committed_slots(), 1, "the successor picks the ring up");
        // ...and completes when it resumes: refused, and so is everything after it.
        writer.write_payload(&mut arriving, b"during");
        let moved = ClaimMoved {
            broker: 1,
            owner: 0x22,
        };
        assert_eq!(writer.commit(arriving, meta(1)), Err(moved));
        assert_eq!(
            writer.in_flight(),
            1,
            "the refused reservation was given back"
        );
        assert_eq!(
            writer.append(meta(2), b"after"),
            Err(AppendError::ClaimMoved(moved))
        );
        // The successor sees one slot written, and slot 1 still unpublished.
        let frontier = geometry.frontier_offset(topic, 1, FRONTIER_WRITTEN);
        assert_eq!(successor.read_frontier(frontier).0, 1);
        let slot = geometry.ring_slot_offset(topic, 1, 1);
        invalidate_and_fence(successor.mem(), slot, 64);
        assert_eq!(
            successor.mem().load_u64(slot + BatchHeader::READY_OFFSET),
            0
        );
    }
}
