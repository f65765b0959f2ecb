//! What one broker's network loop owns besides its connections: the pool view, one ring
//! writer per topic in use, the slots awaiting the sequencer's decision, and sessions.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use units::Timestamp;

use crate::metrics::{Metrics, SequencerRole};
use crate::server::limits::{ClientLimits, ConnectionRefused, ConnectionTable, StagingBudget};
use shared_log::Order;
use shared_log::coherence::SharedMemory;
use shared_log::layout::CompletionStatus;
use shared_log::pool::{Pool, PoolError, TopicConfig, TopicId};
use shared_log::reader::{LogReader, ReadError};
use shared_log::writer::{
    AppendError, BatchMeta, ClaimMoved, Reservation, SlotOutcome, TopicWriter, WriterError,
};

/// Identifies a connection within one broker.
pub type ConnId = u64;

/// A map keyed by connection. A broker numbers its connections itself, so no peer chooses a
/// key and a multiplicative hash is enough; the loops look connections up on every pass,
/// where the default SipHash took 1-2% of a bypass broker's core.
pub type ConnMap<V> = HashMap<ConnId, V, ConnIdHashing>;

/// The hashing of [`ConnMap`]: one multiplication by an odd constant, whose high bits
/// (those the table's tag uses) and low bits (its bucket) both vary with every key bit
/// below them, and consecutive ids fall in different buckets.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnIdHashing;

impl std::hash::BuildHasher for ConnIdHashing {
    type Hasher = ConnIdHasher;

    fn build_hasher(&self) -> ConnIdHasher {
        ConnIdHasher(0)
    }
}

/// See [`ConnIdHashing`].
#[derive(Debug)]
pub struct ConnIdHasher(u64);

impl std::hash::Hasher for ConnIdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0.rotate_left(29) ^ value).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Broker settings that the protocol handling needs.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// This broker's id (its rings in the pool).
    pub broker_id: u16,
    /// Whether this broker is the head (creates topics, runs the sequencer).
    pub head: bool,
    /// Create a topic on the head when a publisher names one that does not exist.
    pub auto_create_topics: bool,
    /// Largest batch payload accepted (also bounded by the pool).
    pub batch_bytes_max: u32,
    /// Largest control frame body accepted.
    pub frame_bytes_max: u32,
    /// Replication factor (counting the pool copy) of topics created on first use.
    pub replication_factor: u8,
    /// Deadlines and limits for clients.
    pub limits: ClientLimits,
    /// This broker's replica directory: its files serve subscribers the positions older
    /// than the pool holds (`None`: it keeps no replicas).
    pub history_dir: Option<std::path::PathBuf>,
}

/// Publisher clients whose session epochs a broker remembers.
pub const CLIENTS_REMEMBERED: usize = 65_536;

/// Where the decision on a committed ring slot goes: the connection that committed it. The
/// batch itself (sequence, size, arrival) is recorded once, by that connection; both sides
/// check that they pair the same slot (see [`BrokerState::poll_outcomes`] and the
/// connection's `on_outcome`).
#[derive(Debug, Clone, Copy)]
struct PendingRoute {
    slot: u64,
    conn: ConnId,
}

/// A decision for a batch, routed to the connection that sent it.
#[derive(Debug, Clone, Copy)]
pub struct RoutedOutcome {
    /// The connection that committed the batch (it may have closed since).
    pub conn: ConnId,
    /// The topic whose ring holds the batch (a Kafka connection writes several).
    pub topic: TopicId,
    /// The ring slot the batch was committed in (slots count per topic).
    pub slot: u64,
    /// What the sequencer decided.
    pub status: CompletionStatus,
    /// Its first global position, when known.
    pub global_start: Option<u64>,
}

/// One topic this broker writes.
#[derive(Debug)]
struct TopicState<M> {
    /// This broker's ring writer for it.
    writer: TopicWriter<M>,
    /// Committed slots not yet decided, in slot order.
    pending: VecDeque<PendingRoute>,
    /// Undecided slots an earlier run of this broker committed: their completions come
    /// before those of `pending` and have no connection to go to (their publishers resend).
    orphaned: u64,
}

/// The broker-wide state the connections share: the pool, this broker's ring writers, the
/// routes of the decisions they wait for, sessions, limits and counters. Connections reach
/// the pool only through its methods.
#[derive(Debug)]
pub struct BrokerState<M> {
    /// This agent's view of the pool.
    pool: Pool<M>,
    /// Settings.
    settings: BrokerSettings,
    /// Counters.
    metrics: Arc<Metrics>,
    /// Topics this broker writes, by id.
    topics: HashMap<TopicId, TopicState<M>>,
    /// Highest session epoch seen per client (at most [`CLIENTS_REMEMBERED`]).
    epochs: HashMap<u64, u32>,
    /// First batch sequence not yet seen per session (only each client's latest epoch).
    next_batch_seq: HashMap<(u64, u32), u64>,
    /// Per topic, the lowest ordinal this broker's subscribers need, as last published.
    subscribed: HashMap<TopicId, u64>,
    /// Scratch map for [`Self::publish_subscriptions`], reused so the loop does not allocate.
    subscribed_next: HashMap<TopicId, u64>,
    /// Ack level 2: replicated positions read this loop iteration, by (topic, replicas), so
    /// that connections waiting on the same topic share one read of the frontier lines.
    replicated: HashMap<(TopicId, usize), u64>,
    /// When [`Self::publish_subscriptions`] last looked at the lease heartbeat, and the
    /// heartbeat it published then.
    heartbeat_looked_at: Option<Timestamp>,
    heartbeat_published: u64,
    /// Connections open, in all and per address.
    connections: ConnectionTable,
    /// Bytes of slow batches held outside the pool.
    staging: StagingBudget,
    /// The token this broker holds its id's claim with; its ring writers check it before
    /// they publish (`None`: no claim to check, a pool of its own in tests).
    claim_token: Option<u64>,
    /// Set once a ring writer found the claim moved on: the loop must end the broker.
    claim_moved: Option<ClaimMoved>,
}

/// How often [`BrokerState::publish_subscriptions`] looks at the lease heartbeat (to publish
/// its lines again with it, their liveness): well inside a lease (50 ms by default) and the
/// 250 ms for which a subscribed line stays live (`Pool::stale_heartbeats`).
const LIVENESS_INTERVAL: Duration = Duration::from_millis(5);

impl<M: SharedMemory + Clone> BrokerState<M> {
    /// State for broker `settings.broker_id` on `pool`.
    pub fn new(pool: Pool<M>, settings: BrokerSettings, metrics: Arc<Metrics>) -> BrokerState<M> {
        BrokerState {
            pool,
            settings,
            metrics,
            topics: HashMap::new(),
            epochs: HashMap::new(),
            next_batch_seq: HashMap::new(),
            subscribed: HashMap::new(),
            subscribed_next: HashMap::new(),
            replicated: HashMap::new(),
            heartbeat_looked_at: None,
            heartbeat_published: 0,
            connections: ConnectionTable::default(),
            staging: StagingBudget::default(),
            claim_token: None,
            claim_moved: None,
        }
    }

    /// Ring writers publish only while the claim on this broker's id holds `token` (see
    /// [`TopicWriter::with_claim_token`]).
    pub fn with_claim_token(mut self, token: u64) -> BrokerState<M> {
        self.claim_token = Some(token);
        self
    }

    /// Records that a ring writer found the claim moved on (see [`Self::claim_moved`]).
    pub fn record_claim_moved(&mut self, moved: ClaimMoved) {
        self.claim_moved.get_or_insert(moved);
    }

    /// Set once a ring writer refused to publish because another process holds this
    /// broker's id now: the network loop must end the broker at once.
    pub fn claim_moved(&self) -> Option<ClaimMoved> {
        self.claim_moved
    }

    /// Admits a new connection from `address` against the connection limits; a refusal is
    /// counted and logged (the caller tells the peer and closes).
    pub fn admit_connection(&mut self, address: IpAddr) -> Result<(), ConnectionRefused> {
        let admitted = self.connections.admit(address, &self.settings.limits);
        match admitted {
            Ok(()) => {
                self.metrics
                    .connections_open
                    .store(u64::from(self.connections.open()), Ordering::Relaxed);
            }
            Err(refusal) => {
                if let Some(refused) = Metrics::inc_logged(&self.metrics.connections_refused) {
                    log::warn!(
                        "broker {}: connection refused: {refusal} ({refused} refused so far)",
                        self.settings.broker_id
                    );
                }
            }
        }
        admitted
    }

    /// A connection admitted by [`Self::admit_connection`] ended.
    pub fn release_connection(&mut self, address: IpAddr) {
        self.connections.release(address);
        self.metrics
            .connections_open
            .store(u64::from(self.connections.open()), Ordering::Relaxed);
    }

    /// A publisher starts (or resumes) session `epoch` of `client`: refused with the epoch
    /// already used when `epoch` is older. A newer epoch ends the older one here (its
    /// sequence bookkeeping is dropped); beyond [`CLIENTS_REMEMBERED`] clients, one other
    /// client is forgotten (its stale epochs are then no longer refused by this broker; the
    /// sequencer still deduplicates).
    pub fn enter_session(&mut self, client: u64, epoch: u32) -> Result<(), u32> {
        match self.epochs.get(&client).copied() {
            Some(seen) if epoch < seen => return Err(seen),
            Some(seen) if epoch > seen => {
                self.next_batch_seq.remove(&(client, seen));
            }
            Some(_) => {}
            None => {
                if self.epochs.len() >= CLIENTS_REMEMBERED {
                    let forgotten = self.epochs.iter().next().map(|(&c, &e)| (c, e));
                    if let Some((other, other_epoch)) = forgotten {
                        self.epochs.remove(&other);
                        self.next_batch_seq.remove(&(other, other_epoch));
                    }
                }
            }
        }
        self.epochs.insert(client, epoch);
        Ok(())
    }

    /// The position below which `topic` is durable in `replicas` replica files, read once
    /// per loop iteration (see [`Pool::replicated_position`]).
    pub fn replicated_position(&mut self, topic: TopicId, replicas: usize) -> u64 {
        *self
            .replicated
            .entry((topic, replicas))
            .or_insert_with(|| self.pool.replicated_position(topic, replicas))
    }

    /// Whether this broker creates topics: while it holds the sequencer lease (so after a
    /// failover the new holder does, and a fenced old head no longer does), or, where no
    /// sequencer agent runs, when it is the head. One creator at a time keeps the topic
    /// table single-writer.
    pub fn creates_topics(&self) -> bool {
        match self.metrics.sequencer_role() {
            SequencerRole::Holding => true,
            SequencerRole::StandingBy => false,
            SequencerRole::Unmanaged => self.settings.head,
        }
    }

    /// Gets ready to write `topic` (its ring writer, created on first use); returns the
    /// largest batch its ring takes.
    pub fn open_writer(&mut self, topic: TopicId) -> Result<u64, WriterError> {
        if !self.topics.contains_key(&topic) {
            let mut writer = TopicWriter::new(self.pool.clone(), topic, self.settings.broker_id)?;
            if let Some(token) = self.claim_token {
                writer = writer.with_claim_token(token);
            }
            let recovered = writer.recovered_in_flight();
            self.topics.insert(
                topic,
                TopicState {
                    writer,
                    pending: VecDeque::new(),
                    orphaned: recovered,
                },
            );
        }
        Ok(self.writer(topic).batch_bytes_max())
    }

    fn writer(&self, topic: TopicId) -> &TopicWriter<M> {
        &self.topics[&topic].writer
    }

    fn writer_mut(&mut self, topic: TopicId) -> &mut TopicWriter<M> {
        &mut self
            .topics
            .get_mut(&topic)
            .expect("a connection writes only topics it opened")
            .writer
    }

    /// Reserves room for a batch of `payload_bytes` in `topic`'s payload log (and a ring
    /// slot, taken at commit) at `now`. A full log or ring is backpressure, never loss; a
    /// full log is looked at again at most every [`RECLAIM_RETRY_INTERVAL`], however often
    /// the caller retries.
    ///
    /// [`RECLAIM_RETRY_INTERVAL`]: shared_log::writer::RECLAIM_RETRY_INTERVAL
    pub fn begin_batch(
        &mut self,
        topic: TopicId,
        payload_bytes: u64,
        now: Timestamp,
    ) -> Result<Reservation, AppendError> {
        self.writer_mut(topic).reserve_at(payload_bytes, now)
    }

    /// Runs `f` over a reservation's payload bytes in the pool (the network receive path).
    pub fn fill_batch<R>(
        &self,
        topic: TopicId,
        reservation: &Reservation,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> R {
        self.writer(topic).fill(reservation, f)
    }

    /// Copies a whole payload (received in staging) into a reservation of its size.
    pub fn write_batch(&mut self, topic: TopicId, reservation: &mut Reservation, payload: &[u8]) {
        self.writer_mut(topic).write_payload(reservation, payload);
    }

    /// Gives a reservation back: nothing of it is written.
    pub fn abort_batch(&mut self, topic: TopicId, reservation: Reservation) {
        self.writer_mut(topic).abort(reservation);
    }

    /// Publishes a filled reservation as `topic`'s next ring slot, for connection `conn`:
    /// the sequencer's decision on it will be routed there. Returns the slot.
    pub fn commit_batch(
        &mut self,
        topic: TopicId,
        reservation: Reservation,
        meta: BatchMeta,
        conn: ConnId,
    ) -> Result<u64, ClaimMoved> {
        let state = self
            .topics
            .get_mut(&topic)
            .expect("a connection writes only topics it opened");
        let slot = state.writer.commit(reservation, meta)?;
        state.pending.push_back(PendingRoute { slot, conn });
        Ok(slot)
    }

    /// How many reservations in `topic` were refused for want of room so far (see
    /// `TopicWriter::full_events`).
    pub fn room_refusals(&self, topic: TopicId) -> u64 {
        self.topics
            .get(&topic)
            .map_or(0, |state| state.writer.full_events())
    }

    /// (batches ordered, next global position): the end of `topic`'s log, one frontier read.
    pub fn log_end(&self, topic: TopicId) -> (u64, u64) {
        self.pool
            .read_frontier(self.pool.geometry().seq_state_offset(topic))
    }

    /// A reader of `topic` from its start.
    pub fn open_reader(&self, topic: TopicId) -> Result<LogReader<M>, ReadError> {
        LogReader::new(self.pool.clone(), topic, false)
    }

    /// Every topic of the pool, by id and name (a topic whose table entry cannot be read is
    /// left out).
    pub fn topic_names(&self) -> Vec<(TopicId, String)> {
        self.pool
            .topics()
            .into_iter()
            .filter_map(|topic| Some((topic, self.pool.topic_entry(topic).ok()?.0)))
            .collect()
    }

    /// Finds a topic by name.
    pub fn find_topic(&self, name: &str) -> Result<Option<(TopicId, TopicConfig)>, PoolError> {
        self.pool.find_topic(name)
    }

    /// Creates a topic (CreateTopic); see [`Self::creates_topics`].
    pub fn create_topic(&self, name: &str, config: TopicConfig) -> Result<TopicId, PoolError> {
        self.pool.create_topic(name, config)
    }

    /// Takes `bytes` of the staging budget, if free.
    pub fn take_staging(&mut self, bytes: u64) -> bool {
        let taken = self.staging.take(bytes, &self.settings.limits);
        self.metrics
            .staging_bytes
            .store(self.staging.used_bytes(), Ordering::Relaxed);
        taken
    }

    /// Gives back `bytes` of the staging budget.
    pub fn give_back_staging(&mut self, bytes: u64) {
        if bytes > 0 {
            self.staging.give_back(bytes);
            self.metrics
                .staging_bytes
                .store(self.staging.used_bytes(), Ordering::Relaxed);
        }
    }

    /// Bytes of staging in use.
    pub fn staging_bytes(&self) -> u64 {
        self.staging.used_bytes()
    }

    /// The first batch sequence of session (`client`, `epoch`) this broker has not seen.
    pub fn next_batch_seq(&self, client: u64, epoch: u32) -> u64 {
        self.next_batch_seq
            .get(&(client, epoch))
            .copied()
            .unwrap_or(0)
    }

    /// Records that session (`client`, `epoch`) sent batch `seq` here.
    pub fn saw_batch_seq(&mut self, client: u64, epoch: u32, seq: u64) {
        let next = self.next_batch_seq.entry((client, epoch)).or_default();
        *next = (*next).max(seq + 1);
    }

    /// The pool (claims are read from it; unit tests read what the connections wrote).
    pub(crate) fn pool(&self) -> &Pool<M> {
        &self.pool
    }

    /// Reservations and committed slots not yet decided in `topic` (for unit tests).
    #[cfg(test)]
    pub(crate) fn in_flight(&self, topic: TopicId) -> u64 {
        self.writer(topic).in_flight()
    }

    /// The broker's settings.
    pub fn settings(&self) -> &BrokerSettings {
        &self.settings
    }

    /// The broker's counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Finds a topic, or creates it when this is the head and auto-creation is on.
    pub fn resolve_topic(
        &mut self,
        name: &str,
        order: Order,
        ack: u8,
    ) -> Result<Option<(TopicId, TopicConfig)>, PoolError> {
        if let Some(found) = self.pool.find_topic(name)? {
            return Ok(Some(found));
        }
        if !(self.creates_topics() && self.settings.auto_create_topics) {
            return Ok(None);
        }
        let config = TopicConfig {
            order,
            ack: ack.max(1),
            replication_factor: self.settings.replication_factor,
            retention: shared_log::Retention::StallLimited,
            history: shared_log::HistoryRetention::UNLIMITED,
        };
        let topic = self.pool.create_topic(name, config)?;
        log::info!(
            "created topic {name:?} (order {}, ack {}) on first use",
            order as u8,
            config.ack
        );
        Ok(Some((topic, config)))
    }

    /// Reads every available decision and routes it; returns how many were read.
    pub fn poll_outcomes(&mut self, out: &mut Vec<RoutedOutcome>) -> usize {
        // A new loop iteration: replicated positions are read afresh.
        self.replicated.clear();
        let mut read = 0;
        let mut lag = 0;
        for (&topic, state) in self.topics.iter_mut() {
            let pending = &mut state.pending;
            let orphaned = &mut state.orphaned;
            let metrics = &self.metrics;
            read += state
                .writer
                .poll_completions(usize::MAX, |outcome: SlotOutcome| {
                    if *orphaned > 0 {
                        *orphaned -= 1;
                        return;
                    }
                    match pending.pop_front() {
                        // Both sides of the boundary check the pairing, in release builds
                        // too: the writer's completions come in slot order, and so do the
                        // routes.
                        Some(route) if route.slot == outcome.slot => out.push(RoutedOutcome {
                            conn: route.conn,
                            topic,
                            slot: outcome.slot,
                            status: outcome.status,
                            global_start: outcome.global_start,
                        }),
                        route => {
                            log::error!(
                                "completion for slot {} paired with {route:?}: the decision \
                                 is lost (a broker bug)",
                                outcome.slot
                            );
                            Metrics::inc(&metrics.batches_dropped);
                        }
                    }
                });
            lag += state.pending.len() as u64;
        }
        self.metrics
            .sequencer_lag_batches
            .store(lag, Ordering::Relaxed);
        read
    }

    /// Publishes, per topic, the lowest ordinal this broker's subscribers still need, so that
    /// no writer reclaims those payloads and the sequencer keeps those GOI entries. Topics no
    /// subscriber reads any more are released. Only changes are written.
    pub fn publish_subscriptions(
        &mut self,
        subscriptions: impl Iterator<Item = (TopicId, u64)>,
        now: Timestamp,
    ) {
        let mut lowest = std::mem::take(&mut self.subscribed_next);
        lowest.clear();
        for (topic, ordinal) in subscriptions {
            let entry = lowest.entry(topic).or_insert(ordinal);
            *entry = (*entry).min(ordinal);
        }
        let broker = self.settings.broker_id;
        // Liveness: every few milliseconds, when the sequencer's heartbeat moved, every line
        // is published again with it (else a crashed broker's subscribers would hold the
        // log).
        let mut refresh = false;
        let due = self
            .heartbeat_looked_at
            .is_none_or(|at| now.saturating_duration_since(at) >= LIVENESS_INTERVAL);
        if due && !lowest.is_empty() {
            self.heartbeat_looked_at = Some(now);
            let heartbeat = self.pool.lease_heartbeat();
            refresh = heartbeat != self.heartbeat_published;
            self.heartbeat_published = heartbeat;
        }
        for (&topic, &ordinal) in &lowest {
            if refresh || self.subscribed.get(&topic) != Some(&ordinal) {
                self.pool.publish_subscribed(topic, broker, Some(ordinal));
            }
        }
        for topic in self.subscribed.keys() {
            if !lowest.contains_key(topic) {
                self.pool.publish_subscribed(*topic, broker, None);
            }
        }
        self.subscribed_next = std::mem::replace(&mut self.subscribed, lowest);
    }

    /// Bookkeeping when a network loop stops: subscriptions released, connections gauge
    /// zeroed, one log line naming the loop and how many connections it closed.
    pub fn on_loop_stopped(&mut self, loop_name: &str, connections_closed: usize) {
        self.publish_subscriptions(std::iter::empty(), Timestamp::now());
        self.metrics.connections_open.store(0, Ordering::Relaxed);
        log::info!(
            "broker {}: {loop_name} stopped ({connections_closed} connections closed)",
            self.settings.broker_id
        );
    }

    /// Batches committed and not yet decided, over all topics.
    pub fn undecided(&self) -> usize {
        self.topics.values().map(|t| t.pending.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_connection_ids_spread_over_buckets_and_tags() {
        use std::hash::BuildHasher;
        let hashes: Vec<u64> = (1..=1024u64).map(|id| ConnIdHashing.hash_one(id)).collect();
        // The low bits pick the bucket of a 1,024-bucket table: no two ids share one.
        let buckets: std::collections::HashSet<u64> = hashes.iter().map(|h| h & 1023).collect();
        assert_eq!(buckets.len(), 1024);
        // The top 7 bits are the tag checked before a key is compared: nearly all occur.
        let tags: std::collections::HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        assert!(tags.len() >= 120, "{} tags", tags.len());
        let mut map = ConnMap::default();
        for id in 1..=1024u64 {
            map.insert(id, id * 2);
        }
        assert!((1..=1024u64).all(|id| map.get(&id) == Some(&(id * 2))));
    }

    #[test]
    fn sessions_refuse_stale_epochs_and_keep_only_the_latest_bookkeeping() {
        let pool = shared_log::heap::small_test_pool();
        let settings = BrokerSettings {
            broker_id: 0,
            head: true,
            auto_create_topics: true,
            batch_bytes_max: 1024,
            frame_bytes_max: wire::FRAME_BYTES_DEFAULT,
            replication_factor: 1,
            limits: ClientLimits::default(),
            history_dir: None,
        };
        let mut state = BrokerState::new(pool, settings, Arc::default());
        assert_eq!(state.enter_session(7, 3), Ok(()));
        state.next_batch_seq.insert((7, 3), 10);
        assert_eq!(state.enter_session(7, 3), Ok(()), "the same epoch again");
        assert_eq!(state.enter_session(7, 4), Ok(()));
        assert!(
            !state.next_batch_seq.contains_key(&(7, 3)),
            "epoch 3 is over"
        );
        assert_eq!(state.enter_session(7, 3), Err(4), "stale");
        for client in 0..CLIENTS_REMEMBERED as u64 + 10 {
            state.enter_session(1000 + client, 1).unwrap();
        }
        assert_eq!(state.epochs.len(), CLIENTS_REMEMBERED, "bounded");
    }
}
