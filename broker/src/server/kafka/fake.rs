//! A log in memory behind [`KafkaContext`], for the sans-IO tests of the Kafka protocol:
//! batches are ordered when a test says so, room and replicas are what it sets.

use std::collections::HashMap;

use shared_log::layout::CompletionStatus;
use shared_log::pool::TopicId;

use super::groups::Groups;
use super::records::Produced;
use super::{FetchRefused, KafkaContext, KafkaNode, KafkaTopic, ProducerSession, PublishRefused};
use crate::metrics::Metrics;
use crate::server::state::{ConnId, RoutedOutcome};

static METRICS: std::sync::LazyLock<Metrics> = std::sync::LazyLock::new(Metrics::default);

/// An ordered batch: its first position and its messages.
pub type Batch = (u64, Vec<Vec<u8>>);

/// A committed batch the test has not ordered yet.
#[derive(Debug, Clone)]
pub struct Undecided {
    pub slot: u64,
    pub topic: TopicId,
    pub session: ProducerSession,
    pub conn: ConnId,
    pub values: Vec<Vec<u8>>,
    /// Its record batches as produced (Fetch serves them with their offsets set).
    pub records: Vec<u8>,
}

#[derive(Debug)]
pub struct FakeLog {
    /// (id, name, replicas).
    pub topics: Vec<(TopicId, String, usize)>,
    /// Ordered batches per topic.
    pub logs: HashMap<TopicId, Vec<Batch>>,
    /// The record batches of each batch a Kafka client produced, by (topic, first
    /// position); the others are served as our own client's are.
    pub produced: HashMap<(TopicId, u64), Vec<u8>>,
    pub undecided: Vec<Undecided>,
    /// The next ring slot of each topic (slots count per topic, as in the pool).
    pub next_slot: HashMap<TopicId, u64>,
    /// When set, every write finds the pool full.
    pub full: bool,
    /// Position below which the replicas hold each topic.
    pub replicated: HashMap<TopicId, u64>,
    /// First readable position per topic (0 when absent).
    pub log_start: HashMap<TopicId, u64>,
    /// Where each batch of a session that numbers messages was placed, by (topic, client,
    /// epoch, sequence): a resend is answered as a duplicate, as the sequencer does.
    pub placed: HashMap<(TopicId, u64, u32, u64), u64>,
    /// The consumer groups (this broker coordinates them unless `coordinator` says).
    pub groups: Groups,
    /// The other live brokers with a Kafka listener.
    pub peers: Vec<KafkaNode>,
}

impl FakeLog {
    /// Topics "orders" (1, rf 1) and "payments" (2, rf 2), empty.
    pub fn two_topics() -> FakeLog {
        FakeLog {
            topics: vec![(1, "orders".into(), 0), (2, "payments".into(), 1)],
            logs: HashMap::new(),
            produced: HashMap::new(),
            undecided: Vec::new(),
            next_slot: HashMap::new(),
            full: false,
            replicated: HashMap::new(),
            log_start: HashMap::new(),
            placed: HashMap::new(),
            groups: Groups::new(0xfeed),
            peers: Vec::new(),
        }
    }

    fn end(&self, topic: TopicId) -> u64 {
        self.logs
            .get(&topic)
            .and_then(|batches| batches.last())
            .map_or(0, |(start, messages)| start + messages.len() as u64)
    }

    /// Appends a batch to the log as another publisher would.
    pub fn append(&mut self, topic: TopicId, messages: Vec<Vec<u8>>) -> u64 {
        let start = self.end(topic);
        self.logs.entry(topic).or_default().push((start, messages));
        start
    }

    /// Orders every undecided batch, in commit order; returns the decisions.
    pub fn order_all(&mut self) -> Vec<RoutedOutcome> {
        self.order(|_| true)
    }

    /// Orders the undecided batches of `topic` only (each topic's ring is decided on its
    /// own); returns the decisions.
    pub fn order_topic(&mut self, topic: TopicId) -> Vec<RoutedOutcome> {
        self.order(|batch| batch.topic == topic)
    }

    fn order(&mut self, which: impl Fn(&Undecided) -> bool) -> Vec<RoutedOutcome> {
        let (chosen, rest) = std::mem::take(&mut self.undecided)
            .into_iter()
            .partition(|batch| which(batch));
        self.undecided = rest;
        let chosen: Vec<Undecided> = chosen;
        chosen
            .into_iter()
            .map(|batch| {
                let session = batch.session;
                let key = (
                    batch.topic,
                    session.client_id,
                    session.session_epoch,
                    session.next_seq,
                );
                let (status, start) = match self.placed.get(&key) {
                    Some(&start) if session.seq_counts_messages => {
                        (CompletionStatus::Duplicate, start)
                    }
                    _ => {
                        let start = self.append(batch.topic, batch.values);
                        self.produced.insert((batch.topic, start), batch.records);
                        self.placed.insert(key, start);
                        (CompletionStatus::Ordered, start)
                    }
                };
                RoutedOutcome {
                    conn: batch.conn,
                    topic: batch.topic,
                    slot: batch.slot,
                    status,
                    global_start: Some(start),
                }
            })
            .collect()
    }
}

impl KafkaContext for FakeLog {
    fn node(&self) -> KafkaNode {
        KafkaNode {
            id: 3,
            host: "10.0.0.7".into(),
            port: 9092,
        }
    }

    fn brokers(&mut self) -> Vec<KafkaNode> {
        let mut brokers = self.peers.clone();
        brokers.push(self.node());
        brokers.sort_by_key(|node| node.id);
        brokers
    }

    fn groups(&mut self) -> &mut Groups {
        &mut self.groups
    }

    fn topics(&self) -> Vec<(TopicId, String)> {
        self.topics
            .iter()
            .map(|(id, name, _)| (*id, name.clone()))
            .collect()
    }

    fn metrics(&self) -> &Metrics {
        &METRICS
    }

    fn offsets_topic(&mut self) -> Option<KafkaTopic> {
        let name = super::offsets::OFFSETS_TOPIC;
        if self.find_topic(name).is_none() {
            let id = self.topics.iter().map(|t| t.0).max().unwrap_or(0) + 1;
            self.topics.push((id, name.into(), 0));
        }
        self.find_topic(name)
    }

    fn committed(
        &mut self,
        group: &str,
        topic: &str,
        partition: i32,
    ) -> Option<super::offsets::Committed> {
        let offsets = self.find_topic(super::offsets::OFFSETS_TOPIC)?;
        let mut cache = super::offsets::OffsetsCache::default();
        for (_, messages) in self.logs.get(&offsets.id).into_iter().flatten() {
            for message in messages {
                cache.apply(message);
            }
        }
        cache.committed(group, topic, partition).cloned()
    }

    fn create_topic(
        &mut self,
        creation: &super::admin::TopicCreation,
    ) -> Result<KafkaTopic, super::admin::CreateRefused> {
        if self.find_topic(&creation.name).is_some() {
            return Err(super::admin::CreateRefused::Exists);
        }
        let replicas = usize::from(creation.replication_factor.unwrap_or(1)) - 1;
        let id = self.topics.iter().map(|t| t.0).max().unwrap_or(0) + 1;
        if !creation.validate_only {
            self.topics.push((id, creation.name.clone(), replicas));
        }
        Ok(KafkaTopic { id, replicas })
    }

    fn find_topic(&self, name: &str) -> Option<KafkaTopic> {
        self.topics
            .iter()
            .find(|(_, known, _)| known == name)
            .map(|&(id, _, replicas)| KafkaTopic { id, replicas })
    }

    fn publish(
        &mut self,
        topic: TopicId,
        session: ProducerSession,
        produced: &Produced<'_>,
        conn: ConnId,
    ) -> Result<u64, PublishRefused> {
        if self.full {
            return Err(PublishRefused::NoRoom);
        }
        let next = self.next_slot.entry(topic).or_default();
        let slot = *next;
        *next += 1;
        self.undecided.push(Undecided {
            slot,
            topic,
            session,
            conn,
            values: wire::record_batch::batches(produced.bytes)
                .flat_map(|batch| batch.expect("checked").records())
                .map(|record| record.expect("checked").value.unwrap_or_default().to_vec())
                .collect(),
            records: produced.bytes.to_vec(),
        });
        Ok(slot)
    }

    fn replicated_position(&mut self, topic: TopicId, _replicas: usize) -> u64 {
        self.replicated.get(&topic).copied().unwrap_or(0)
    }

    fn log_end(&self, topic: TopicId) -> Option<u64> {
        Some(self.end(topic))
    }

    fn log_bounds(&self, topic: TopicId) -> Result<(u64, u64), String> {
        Ok((
            self.log_start.get(&topic).copied().unwrap_or(0),
            self.end(topic),
        ))
    }

    fn fetch(
        &self,
        topic: TopicId,
        position: u64,
        max_bytes: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), FetchRefused> {
        let (log_start, log_end) = self.log_bounds(topic).expect("a known topic");
        if position < log_start || position > log_end {
            return Err(FetchRefused::OutOfRange { log_start, log_end });
        }
        let start = out.len();
        for (first, messages) in self.logs.get(&topic).into_iter().flatten() {
            if first + messages.len() as u64 <= position {
                continue;
            }
            if out.len() > start && (out.len() - start) as u64 >= max_bytes {
                break;
            }
            match self.produced.get(&(topic, *first)) {
                Some(records) => {
                    let at = out.len();
                    out.extend_from_slice(records);
                    wire::record_batch::set_base_offsets(&mut out[at..], *first)
                        .expect("checked when produced");
                }
                None => wire::record_batch::encode(out, *first, messages.iter().map(Vec::as_slice)),
            }
        }
        Ok(())
    }
}
