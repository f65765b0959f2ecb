//! The sequencer against random interleavings: several publisher sessions send batches to
//! several broker rings, and resend some of them (same client id, session epoch and batch
//! sequence) on other rings, while the sequencer polls with a random scan window, hold
//! buffer and clock. For orders 2 and 5:
//!
//! - every committed ring slot gets exactly one completion;
//! - each (client, epoch, seq) is ordered at most once (order 2: exactly once), and its other
//!   copies complete as Duplicate with the original position (order 5: or with none, when
//!   they met the original in the hold buffer); order 5: a batch never ordered was skipped by
//!   the gap rule, and every copy of it says so;
//! - global positions are contiguous from 0, without overlap;
//! - order 5: each session's batches are ordered in increasing sequence;
//! - the GOI read back holds exactly the ordered batches, with their bytes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use shared_log::Order;
use shared_log::coherence::{CoherenceMode, PoolMemory};
use shared_log::heap::HeapRegion;
use shared_log::layout::CompletionStatus;
use shared_log::layout::Geometry;
use shared_log::pool::{Pool, TopicConfig, TopicId};
use shared_log::reader::LogReader;
use shared_log::sequencer::{Sequencer, SequencerConfig};
use shared_log::writer::{AppendError, BatchMeta, SlotOutcome, TopicWriter};
use units::Timestamp;
const BROKERS: u16 = 3;
/// (client id, session epoch): two sessions of client 1, one each of clients 2 and 3.
const SESSIONS: [(u64, u32); 4] = [(1, 1), (1, 2), (2, 1), (3, 7)];
const HOLD_TIMEOUT_NS: u64 = 1_000;

#[derive(Debug, Clone)]
enum Op {
    /// The session's next batch, of `messages` messages, to `broker`.
    Send {
        session: usize,
        broker: u16,
        messages: u32,
    },
    /// A batch the session already sent, again, to `broker`.
    Resend {
        session: usize,
        pick: prop::sample::Index,
        broker: u16,
    },
    /// A sequencer round after the clock advanced.
    Poll { advance_ns: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    let session = 0..SESSIONS.len();
    let broker = 0..BROKERS;
    prop_oneof![
        4 => (session.clone(), broker.clone(), 1u32..4)
            .prop_map(|(session, broker, messages)| Op::Send { session, broker, messages }),
        2 => (session, any::<prop::sample::Index>(), broker)
            .prop_map(|(session, pick, broker)| Op::Resend { session, pick, broker }),
        2 => (0..3 * HOLD_TIMEOUT_NS).prop_map(|advance_ns| Op::Poll { advance_ns }),
    ]
}

type Key = (u64, u32, u64);

/// A batch as committed to a ring.
#[derive(Debug, Clone)]
struct Sent {
    key: Key,
    message_count: u32,
    payload: Vec<u8>,
}

fn payload(key: Key, messages: u32) -> Vec<u8> {
    let mut payload = Vec::new();
    for i in 0..messages {
        let tag = format!("{}/{}/{}#{i}", key.0, key.1, key.2);
        wire::payload::push_message(&mut payload, tag.as_bytes());
    }
    payload
}

struct Harness {
    pool: Pool<PoolMemory>,
    topic: TopicId,
    writers: Vec<TopicWriter<PoolMemory>>,
    sequencer: Sequencer<PoolMemory>,
    now: Timestamp,
    /// Per broker, the batch committed in each slot.
    committed: Vec<Vec<Sent>>,
    /// Per broker, the completions read, in the order read.
    completed: Vec<Vec<SlotOutcome>>,
    _region: Arc<HeapRegion>,
}

impl Harness {
    fn new(order: Order, config: SequencerConfig) -> Harness {
        let geometry = Geometry {
            brokers_max: u32::from(BROKERS),
            topics_max: 1,
            ring_slots: 8,
            goi_entries: 512,
            blog_bytes: 16 * 1024,
        };
        let region = Arc::new(HeapRegion::new(geometry.layout_bytes()));
        let pool = Pool::format(region.memory(CoherenceMode::NonCoherent), geometry, 1).unwrap();
        let topic_config = TopicConfig {
            order,
            ack: 1,
            replication_factor: 1,
            retention: shared_log::Retention::StallLimited,
            history: shared_log::HistoryRetention::UNLIMITED,
        };
        let topic = pool.create_topic("props", topic_config).unwrap();
        let writers = (0..BROKERS)
            .map(|broker| TopicWriter::new(pool.clone(), topic, broker).unwrap())
            .collect();
        let sequencer = Sequencer::new(pool.clone(), 0, 1, config).unwrap();
        Harness {
            pool,
            topic,
            writers,
            sequencer,
            now: Timestamp::ZERO,
            committed: vec![Vec::new(); usize::from(BROKERS)],
            completed: vec![Vec::new(); usize::from(BROKERS)],
            _region: region,
        }
    }

    fn poll(&mut self) {
        self.sequencer.poll(self.now);
        for (writer, completed) in self.writers.iter_mut().zip(&mut self.completed) {
            writer.poll_completions(usize::MAX, |outcome| completed.push(outcome));
        }
    }

    /// Commits `sent` to `broker`'s ring; a full ring or log waits for sequencer rounds.
    fn append(&mut self, broker: u16, sent: Sent) {
        let meta = BatchMeta {
            client_id: sent.key.0,
            session_epoch: sent.key.1,
            batch_seq: sent.key.2,
            message_count: sent.message_count,
            checksum: wire::payload::checksum(&sent.payload),
            flags: 0,
        };
        for _ in 0..1_000 {
            match self.writers[usize::from(broker)].append(meta, &sent.payload) {
                Ok(slot) => {
                    let committed = &mut self.committed[usize::from(broker)];
                    assert_eq!(slot, committed.len() as u64, "slots are numbered in order");
                    committed.push(sent);
                    return;
                }
                Err(AppendError::RingFull { .. } | AppendError::LogFull { .. }) => {
                    // Held batches free their slots once the gap rule gives up on the gap.
                    self.now += Duration::from_nanos(HOLD_TIMEOUT_NS);
                    self.poll();
                }
                Err(other) => panic!("append failed: {other}"),
            }
        }
        panic!("broker {broker}'s ring never drained");
    }

    /// Polls until every committed slot is decided.
    fn drain(&mut self) {
        for _ in 0..1_000 {
            let undecided = self
                .writers
                .iter()
                .any(|w| w.completed_slots() < w.committed_slots());
            if !undecided {
                return;
            }
            self.now += Duration::from_nanos(HOLD_TIMEOUT_NS);
            self.poll();
        }
        panic!("committed batches were never decided");
    }
}

fn run(order: Order, config: SequencerConfig, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut harness = Harness::new(order, config);
    let mut sent: Vec<Vec<Sent>> = vec![Vec::new(); SESSIONS.len()];
    for op in ops {
        match op {
            Op::Send {
                session,
                broker,
                messages,
            } => {
                let (client, epoch) = SESSIONS[session];
                let key = (client, epoch, sent[session].len() as u64);
                let batch = Sent {
                    key,
                    message_count: messages,
                    payload: payload(key, messages),
                };
                sent[session].push(batch.clone());
                harness.append(broker, batch);
            }
            Op::Resend {
                session,
                pick,
                broker,
            } => {
                if sent[session].is_empty() {
                    continue;
                }
                let batch = pick.get(&sent[session]).clone();
                harness.append(broker, batch);
            }
            Op::Poll { advance_ns } => {
                harness.now += Duration::from_nanos(advance_ns);
                harness.poll();
            }
        }
    }
    harness.drain();
    check(order, &harness)
}

fn check(order: Order, harness: &Harness) -> Result<(), TestCaseError> {
    // Every committed slot: exactly one completion, in slot order.
    let mut by_key: BTreeMap<Key, Vec<(CompletionStatus, Option<u64>)>> = BTreeMap::new();
    let mut messages: HashMap<Key, (u32, &[u8])> = HashMap::new();
    for (committed, completed) in harness.committed.iter().zip(&harness.completed) {
        let slots: Vec<u64> = completed.iter().map(|o| o.slot).collect();
        prop_assert_eq!(slots, (0..committed.len() as u64).collect::<Vec<_>>());
        for (sent, outcome) in committed.iter().zip(completed) {
            by_key
                .entry(sent.key)
                .or_default()
                .push((outcome.status, outcome.global_start));
            messages.insert(sent.key, (sent.message_count, &sent.payload));
        }
    }
    // Each batch ordered at most once; its other copies point at the original.
    let mut ordered: BTreeMap<u64, Key> = BTreeMap::new();
    for (key, outcomes) in &by_key {
        let positions: Vec<u64> = outcomes
            .iter()
            .filter(|(status, _)| *status == CompletionStatus::Ordered)
            .map(|(_, start)| start.expect("an ordered batch has a position"))
            .collect();
        prop_assert!(positions.len() <= 1, "{key:?} ordered twice: {outcomes:?}");
        match positions.first() {
            Some(&position) => {
                ordered.insert(position, *key);
                for &(status, start) in outcomes {
                    let held_copy = order == Order::TotalSessionFifo && start.is_none();
                    prop_assert!(
                        status == CompletionStatus::Ordered
                            || (status == CompletionStatus::Duplicate
                                && (start == Some(position) || held_copy)),
                        "{key:?}: {outcomes:?}"
                    );
                }
            }
            None => {
                prop_assert_eq!(order, Order::TotalSessionFifo, "{:?} never ordered", key);
                prop_assert!(
                    outcomes
                        .iter()
                        .all(|&(status, start)| status == CompletionStatus::RejectedGap
                            && start.is_none()),
                    "{key:?} not ordered: {outcomes:?}"
                );
            }
        }
    }
    // Contiguous positions from 0; order 5: each session in increasing sequence.
    let mut next = 0;
    let mut last_seq: HashMap<(u64, u32), u64> = HashMap::new();
    for (&position, key) in &ordered {
        prop_assert_eq!(position, next, "gap or overlap before {:?}", key);
        next += u64::from(messages[key].0);
        if order == Order::TotalSessionFifo {
            if let Some(&last) = last_seq.get(&(key.0, key.1)) {
                prop_assert!(
                    last < key.2,
                    "session {:?}: {} after {}",
                    (key.0, key.1),
                    key.2,
                    last
                );
            }
            last_seq.insert((key.0, key.1), key.2);
        }
    }
    prop_assert_eq!(harness.sequencer.next_position(harness.topic), Some(next));
    // The GOI holds exactly the ordered batches, bytes intact.
    let mut reader = LogReader::new(harness.pool.clone(), harness.topic, true).unwrap();
    let mut log = Vec::new();
    reader
        .poll(usize::MAX, |batch| {
            log.push((
                batch.global_start,
                (batch.client_id, batch.session_epoch, batch.batch_seq),
                batch.message_count,
                batch.payload.to_vec(),
            ))
        })
        .unwrap();
    let expected: Vec<_> = ordered
        .iter()
        .map(|(&position, key)| (position, *key, messages[key].0, messages[key].1.to_vec()))
        .collect();
    prop_assert_eq!(log, expected);
    Ok(())
}

fn config() -> impl Strategy<Value = SequencerConfig> {
    (1u32..6, 1usize..6).prop_map(|(scan_slots_max, hold_batches_max)| SequencerConfig {
        scan_slots_max,
        hold_batches_max,
        hold_timeout_ns: HOLD_TIMEOUT_NS,
        ..SequencerConfig::default()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn order_2_orders_every_batch_once(config in config(), ops in prop::collection::vec(op(), 1..80)) {
        run(Order::Total, config, ops)?;
    }

    #[test]
    fn order_5_keeps_each_session_in_sequence(config in config(), ops in prop::collection::vec(op(), 1..80)) {
        run(Order::TotalSessionFifo, config, ops)?;
    }
}
