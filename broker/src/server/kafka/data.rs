//! Produce, Fetch and ListOffsets: the requests that move records, and the answers that
//! wait (for the sequencer's decision, for replicas, for room in the pool, for new records).
//!
//! A connection's answers leave in the order of its requests, as Kafka clients expect; a
//! request whose answer waits does not stop the next ones from being read and acted on (a
//! producer keeps several Produce requests in flight), up to [`ANSWERS_MAX`].

use bytes::Bytes;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{
    ApiKey, FetchRequest, FetchResponse, InitProducerIdRequest, InitProducerIdResponse,
    ListOffsetsRequest, ListOffsetsResponse, ProduceRequest, ProduceResponse, ProducerId,
    RequestHeader, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use shared_log::layout::CompletionStatus;
use shared_log::pool::TopicId;
use units::Timestamp;

use super::records::{self, Check};
use super::{KafkaContext, KafkaSession, error_code, respond};
use crate::server::state::RoutedOutcome;

/// Requests of one connection whose answers are not yet written out; more wait unread in
/// the socket (Kafka's own brokers take one at a time).
pub const ANSWERS_MAX: usize = 32;

/// The longest a Fetch waits for records (`max_wait_ms` is capped here), so that a
/// consumer's request cannot hold a connection's answers for longer.
pub const FETCH_WAIT_MAX_MS: u64 = 30_000;

/// The largest answer a Fetch gets (`max_bytes` is capped here; one batch is always
/// served whole, as Kafka does, even when it is larger).
pub const FETCH_BYTES_MAX: u64 = 4 << 20;

/// The longest a written batch waits for the sequencer's decision before its Produce is
/// answered REQUEST_TIMED_OUT (or the request's `timeout_ms`, if longer): the sequencer
/// decides in microseconds, so only a cluster without one waits this long.
pub const UNDECIDED_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// A topic as a Kafka answer needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KafkaTopic {
    /// Its id in the pool.
    pub id: TopicId,
    /// Replica files (besides the pool) that hold a batch before `acks=all` answers.
    pub replicas: usize,
}

/// The session a Kafka producer's batches are numbered in: one per connection and topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerSession {
    /// The publisher id the sequencer sees.
    pub client_id: u64,
    /// Its session epoch.
    pub session_epoch: u32,
    /// The next batch's sequence.
    pub next_seq: u64,
    /// The sequences number records (an idempotent producer's), not batches.
    pub seq_counts_messages: bool,
}

impl ProducerSession {
    /// The session of an idempotent producer's batch: its producer id and epoch (from
    /// InitProducerId), numbered by Kafka's record sequences; `None` for a plain producer.
    fn idempotent(producer: &records::ProducerFields) -> Option<ProducerSession> {
        let client_id = u64::try_from(producer.producer_id).ok()?;
        Some(ProducerSession {
            client_id,
            session_epoch: u32::from(producer.producer_epoch as u16),
            next_seq: u64::try_from(producer.base_sequence).ok()?,
            seq_counts_messages: true,
        })
    }
}

/// Why a batch was not written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishRefused {
    /// The topic's payload log or ring is full now: try again (backpressure, not loss).
    NoRoom,
    /// Larger than the topic ever takes.
    TooLarge {
        /// Its payload bytes.
        payload_bytes: u64,
        /// The most a batch of the topic holds.
        batch_bytes_max: u64,
    },
    /// The broker cannot write (its claim moved on, or the topic cannot be opened).
    Failed(String),
}

/// Why a Fetch cannot be served from a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchRefused {
    /// Outside the log: before its start or past its end.
    OutOfRange {
        /// First position readable.
        log_start: u64,
        /// First position not yet written.
        log_end: u64,
    },
    /// The log cannot be read (a damaged batch, a missing topic).
    Failed(String),
}

/// A request whose answer is ready or waits.
#[derive(Debug)]
pub(super) enum Answer {
    /// The response frame, with its size prefix.
    Ready(Vec<u8>),
    /// A Produce waiting for its batches' outcomes.
    Produce(PendingProduce),
    /// A Fetch waiting for records or for its wait to end.
    Fetch(PendingFetch),
    /// A JoinGroup waiting for its group to form.
    Join(super::groups::PendingJoin),
    /// A follower's SyncGroup waiting for the leader's assignment.
    Sync(super::groups::PendingSync),
}

impl Answer {
    fn waits_for_room(&self) -> bool {
        matches!(self, Answer::Produce(produce) if produce
            .parts
            .iter()
            .any(|part| matches!(part.state, PartState::WaitingForRoom { .. })))
    }
}

#[derive(Debug)]
pub(super) struct PendingProduce {
    header: RequestHeader,
    version: i16,
    /// 0: no answer at all; 1: once ordered; -1 (all): once the replicas hold it too.
    acks: i16,
    /// The request's own deadline (`timeout_ms`): batches not written by then are answered
    /// REQUEST_TIMED_OUT (and are not in the log), as are acks=all ones still waiting for
    /// replicas (which are).
    deadline: Timestamp,
    /// When it arrived, and its `timeout_ms` (see [`UNDECIDED_MAX`]).
    received: Timestamp,
    timeout: std::time::Duration,
    parts: Vec<ProducePart>,
    /// The answer it gets once every part is answered.
    reply: Reply,
}

/// What a write of records answers once they are in the log.
#[derive(Debug)]
pub(super) enum Reply {
    /// A Produce response, a partition per part.
    Produce,
    /// An OffsetCommit response: every partition of the request (`Some`: answered with this
    /// code at once; `None`: committed by the one part, the commit records' batch).
    OffsetCommit(super::offsets::CommitAnswers),
}

#[derive(Debug)]
struct ProducePart {
    topic: TopicName,
    partition: i32,
    state: PartState,
}

#[derive(Debug)]
enum PartState {
    /// Waits for room in the pool, with its records (checked when they arrived).
    WaitingForRoom {
        topic: KafkaTopic,
        records: Bytes,
        /// Its wait was counted in the metrics.
        counted: bool,
    },
    /// Committed in ring slot `slot`, waiting for the sequencer.
    InFlight {
        topic: KafkaTopic,
        slot: u64,
        message_count: u32,
    },
    /// Ordered at `base_offset`, waiting for the replicas (acks=all).
    Replicating {
        topic: KafkaTopic,
        base_offset: u64,
        end: u64,
    },
    Answered {
        error_code: i16,
        error_message: Option<String>,
        base_offset: i64,
    },
}

impl PartState {
    fn refused(error_code: i16, message: impl Into<String>) -> PartState {
        PartState::Answered {
            error_code,
            error_message: Some(message.into()),
            base_offset: -1,
        }
    }
}

#[derive(Debug)]
pub(super) struct PendingFetch {
    header: RequestHeader,
    version: i16,
    request: FetchRequest,
    /// Each requested topic, looked up once when the request came (topics are never
    /// deleted; one that did not exist is answered at once).
    topics: Vec<Option<KafkaTopic>>,
    deadline: Timestamp,
    /// Each partition's log end when the answer was last built and found short of
    /// `min_bytes`: it is built again only once one of them moved (or the wait is over).
    ends_tried: Option<Vec<Option<u64>>>,
}

impl KafkaSession {
    /// Takes a Produce request: every partition's batch is checked and written at once
    /// (or waits for room, in order), and the answer waits for the outcomes.
    pub(super) fn on_produce(
        &mut self,
        header: RequestHeader,
        version: i16,
        request: ProduceRequest,
        context: &mut dyn KafkaContext,
        now: Timestamp,
    ) {
        let timeout_ms = u64::try_from(request.timeout_ms).unwrap_or(0);
        let mut parts = Vec::new();
        for topic_data in request.topic_data {
            let topic = context.find_topic(topic_data.name.0.as_str());
            for partition_data in topic_data.partition_data {
                let state = match (topic, partition_data.index, partition_data.records) {
                    _ if !(-1..=1).contains(&request.acks) => PartState::refused(
                        error_code::INVALID_REQUIRED_ACKS,
                        format!("acks {} (0, 1 or -1 are taken)", request.acks),
                    ),
                    // Offered so that clients see the older codecs served (librdkafka compresses
                    // with them only for a broker with Produce 0); message sets are not.
                    _ if version < 3 => PartState::refused(
                        error_code::UNSUPPORTED_FOR_MESSAGE_FORMAT,
                        format!(
                            "Produce version {version} carries message sets of magic 0 or 1; this broker takes record batches (magic 2), from Produce version 3"
                        ),
                    ),
                    (None, _, _) => PartState::refused(
                        error_code::UNKNOWN_TOPIC_OR_PARTITION,
                        "no such topic (topics are created with CreateTopic or the broker's auto-creation)",
                    ),
                    (Some(_), index, _) if index != 0 => PartState::refused(
                        error_code::UNKNOWN_TOPIC_OR_PARTITION,
                        format!("partition {index}: a topic has one partition, 0, its total order"),
                    ),
                    (Some(_), _, None) => {
                        PartState::refused(error_code::INVALID_RECORD, "no records")
                    }
                    (Some(topic), _, Some(records)) => {
                        match records::check_produced(&records, Check::Full) {
                            Err(error) => PartState::refused(error.error_code(), error.to_string()),
                            Ok(produced)
                                if produced.producer.producer_id >= 0
                                    && (produced.producer.producer_epoch < 0
                                        || produced.producer.base_sequence < 0) =>
                            {
                                PartState::refused(
                                    error_code::INVALID_RECORD,
                                    "an idempotent producer's batch needs an epoch and a base sequence",
                                )
                            }
                            Ok(_) => PartState::WaitingForRoom {
                                topic,
                                records,
                                counted: false,
                            },
                        }
                    }
                };
                parts.push(ProducePart {
                    topic: topic_data.name.clone(),
                    partition: partition_data.index,
                    state,
                });
            }
        }
        self.answers.push_back(Answer::Produce(PendingProduce {
            header,
            version,
            acks: request.acks,
            deadline: now + std::time::Duration::from_millis(timeout_ms),
            received: now,
            timeout: std::time::Duration::from_millis(timeout_ms),
            parts,
            reply: Reply::Produce,
        }));
        self.write_waiting(context);
    }

    /// Queues a write of `records` (one record batch) to `topic` whose answer is `reply`,
    /// once ordered (and held by the topic's replicas).
    pub(super) fn write_records(
        &mut self,
        (header, version): (RequestHeader, i16),
        topic: (TopicName, KafkaTopic),
        records: Bytes,
        reply: Reply,
        context: &mut dyn KafkaContext,
        now: Timestamp,
    ) {
        let timeout = UNDECIDED_MAX;
        self.answers.push_back(Answer::Produce(PendingProduce {
            header,
            version,
            acks: -1,
            deadline: now + timeout,
            received: now,
            timeout,
            parts: vec![ProducePart {
                topic: topic.0,
                partition: 0,
                state: PartState::WaitingForRoom {
                    topic: topic.1,
                    records,
                    counted: false,
                },
            }],
            reply,
        }));
        self.write_waiting(context);
    }

    /// Writes the batches that wait for room, in request order, until one still finds none
    /// (the ones after it wait too, so that a session's batches enter the ring in order).
    fn write_waiting(&mut self, context: &mut dyn KafkaContext) {
        let conn = self.conn;
        for answer in &mut self.answers {
            let Answer::Produce(produce) = answer else {
                continue;
            };
            for part in &mut produce.parts {
                let PartState::WaitingForRoom {
                    topic,
                    records,
                    counted,
                } = &mut part.state
                else {
                    continue;
                };
                let topic = *topic;
                // Checked when it arrived (the bytes are shared, never written since): taken
                // apart again only to be written, without a second CRC pass.
                let Ok(produced) = records::check_produced(records, Check::Again) else {
                    part.state = PartState::refused(error_code::INVALID_RECORD, "records changed");
                    continue;
                };
                let message_count = produced.record_count;
                // An idempotent producer's batch is numbered by its own sequence, in the
                // producer's session (shared by its connections, on every broker); a plain
                // producer's in this connection's session of the topic.
                let idempotent = ProducerSession::idempotent(&produced.producer);
                let session = match idempotent {
                    Some(session) => session,
                    None => *self
                        .producers
                        .entry(topic.id)
                        .or_insert_with(|| ProducerSession {
                            client_id: wire::unique_client_id(),
                            session_epoch: 1,
                            next_seq: 0,
                            seq_counts_messages: false,
                        }),
                };
                match context.publish(topic.id, session, &produced, conn) {
                    Ok(slot) => {
                        if idempotent.is_none()
                            && let Some(plain) = self.producers.get_mut(&topic.id)
                        {
                            plain.next_seq += 1;
                        }
                        part.state = PartState::InFlight {
                            topic,
                            slot,
                            message_count,
                        };
                    }
                    Err(PublishRefused::NoRoom) => {
                        if !std::mem::replace(counted, true) {
                            crate::metrics::Metrics::inc(&context.metrics().ring_full_waits);
                        }
                        return;
                    }
                    Err(PublishRefused::TooLarge {
                        payload_bytes,
                        batch_bytes_max,
                    }) => {
                        part.state = PartState::refused(
                            error_code::MESSAGE_TOO_LARGE,
                            format!(
                                "{payload_bytes} bytes of records; a batch of this topic holds at most {batch_bytes_max}"
                            ),
                        );
                    }
                    Err(PublishRefused::Failed(reason)) => {
                        part.state = PartState::refused(error_code::UNKNOWN_SERVER_ERROR, reason);
                    }
                }
            }
        }
    }

    /// The sequencer's decision on one of this connection's batches.
    pub fn on_outcome(&mut self, outcome: &RoutedOutcome) {
        for answer in &mut self.answers {
            let Answer::Produce(produce) = answer else {
                continue;
            };
            let acks = produce.acks;
            for part in &mut produce.parts {
                let PartState::InFlight {
                    topic,
                    slot,
                    message_count,
                } = part.state
                else {
                    continue;
                };
                // Slots count per topic: both must match.
                if slot != outcome.slot || topic.id != outcome.topic {
                    continue;
                }
                part.state = match (outcome.status, outcome.global_start) {
                    (CompletionStatus::Ordered | CompletionStatus::Duplicate, Some(start)) => {
                        if acks == -1 && topic.replicas > 0 {
                            PartState::Replicating {
                                topic,
                                base_offset: start,
                                end: start + u64::from(message_count),
                            }
                        } else {
                            PartState::Answered {
                                error_code: 0,
                                error_message: None,
                                base_offset: start as i64,
                            }
                        }
                    }
                    (CompletionStatus::RejectedGap, _) => PartState::refused(
                        error_code::OUT_OF_ORDER_SEQUENCE_NUMBER,
                        "the producer's earlier sequences were given up before this batch came; it is not in the log",
                    ),
                    // Not written. Clients take DUPLICATE_SEQUENCE_NUMBER for success, so the
                    // answer makes the producer start a new epoch (a new session from 0),
                    // which also recovers from a sequence that wrapped past i32::MAX.
                    (CompletionStatus::RejectedOutsideWindow, _) => PartState::refused(
                        error_code::UNKNOWN_PRODUCER_ID,
                        "older than the producer's deduplication window (or its sequence wrapped): not written; start a new epoch",
                    ),
                    (status, _) => PartState::refused(
                        error_code::UNKNOWN_SERVER_ERROR,
                        format!(
                            "the sequencer did not order the batch ({status:?}); it is not in the log"
                        ),
                    ),
                };
                return;
            }
        }
    }

    /// Moves what waits on: batches waiting for room, acks=all answers waiting for the
    /// replicas, Fetches waiting for records, deadlines.
    ///
    /// Fetch answers are built only while `output_room` (the connection's unsent output is
    /// below its mark), so that a client that does not read holds one built answer at most.
    pub(super) fn poll(
        &mut self,
        context: &mut dyn KafkaContext,
        now: Timestamp,
        output_room: bool,
    ) {
        self.write_waiting(context);
        for answer in &mut self.answers {
            match answer {
                Answer::Ready(_) => {}
                Answer::Produce(produce) => {
                    let expired = now >= produce.deadline;
                    for part in &mut produce.parts {
                        match part.state {
                            PartState::Replicating {
                                topic,
                                base_offset,
                                end,
                            } => {
                                if context.replicated_position(topic.id, topic.replicas) >= end {
                                    part.state = PartState::Answered {
                                        error_code: 0,
                                        error_message: None,
                                        base_offset: base_offset as i64,
                                    };
                                } else if expired {
                                    part.state = PartState::refused(
                                        error_code::REQUEST_TIMED_OUT,
                                        format!(
                                            "ordered at offset {base_offset}, not yet held by {} replicas within timeout_ms",
                                            topic.replicas
                                        ),
                                    );
                                }
                            }
                            PartState::WaitingForRoom { .. } if expired => {
                                part.state = PartState::refused(
                                    error_code::REQUEST_TIMED_OUT,
                                    "no room in the pool within timeout_ms; not written",
                                );
                            }
                            PartState::InFlight { .. }
                                if now.saturating_duration_since(produce.received)
                                    >= UNDECIDED_MAX.max(produce.timeout) =>
                            {
                                // No sequencer decides (none holds the lease): the answer,
                                // and every later one of the connection, must not wait for
                                // ever. A late decision then finds no part and is dropped.
                                part.state = PartState::refused(
                                    error_code::REQUEST_TIMED_OUT,
                                    "written, but the sequencer did not decide it in time; it may yet be in the log",
                                );
                            }
                            _ => {}
                        }
                    }
                    if produce
                        .parts
                        .iter()
                        .all(|p| matches!(p.state, PartState::Answered { .. }))
                    {
                        if produce.acks != 0 {
                            // Kafka answers count with our Acks (received to answered).
                            let latency = now.saturating_duration_since(produce.received);
                            context.metrics().observe_ack_latency(latency);
                        }
                        *answer = Answer::Ready(produce_response(produce));
                    }
                }
                Answer::Fetch(fetch) => {
                    if !output_room {
                        continue;
                    }
                    if let Some(frame) = try_fetch(fetch, &*context, now) {
                        *answer = Answer::Ready(frame);
                    }
                }
                Answer::Join(join) => {
                    if let Some(frame) = super::groups::poll_join(join, context, now) {
                        *answer = Answer::Ready(frame);
                    }
                }
                Answer::Sync(sync) => {
                    if let Some(frame) = super::groups::poll_sync(sync, context, now) {
                        *answer = Answer::Ready(frame);
                    }
                }
            }
        }
    }

    /// Takes a Fetch: answered at once when `min_bytes` are there (or an error is), else
    /// when they arrive or `max_wait_ms` passes.
    pub(super) fn on_fetch(
        &mut self,
        header: RequestHeader,
        version: i16,
        request: FetchRequest,
        context: &dyn KafkaContext,
        now: Timestamp,
    ) {
        let wait_ms = u64::try_from(request.max_wait_ms)
            .unwrap_or(0)
            .min(FETCH_WAIT_MAX_MS);
        let topics = request
            .topics
            .iter()
            .map(|t| context.find_topic(t.topic.0.as_str()))
            .collect();
        let mut fetch = PendingFetch {
            header,
            version,
            request,
            topics,
            deadline: now + std::time::Duration::from_millis(wait_ms),
            ends_tried: None,
        };
        self.answers
            .push_back(match try_fetch(&mut fetch, context, now) {
                Some(frame) => Answer::Ready(frame),
                None => Answer::Fetch(fetch),
            });
    }

    /// Whether an answer waits on something other than the client reading.
    pub fn pending(&self) -> bool {
        self.answers
            .iter()
            .any(|answer| !matches!(answer, Answer::Ready(_)))
    }

    /// Moves the answers that are ready, from the oldest on, to `out`; stops at the first
    /// that waits.
    pub(super) fn take_ready(&mut self, out: &mut Vec<u8>) {
        while let Some(Answer::Ready(frame)) = self.answers.front() {
            out.extend_from_slice(frame);
            self.answers.pop_front();
        }
    }

    /// Whether another request may be taken now: fewer than [`ANSWERS_MAX`] answers wait,
    /// and no batch waits for room in the pool (so a connection holds at most one request
    /// frame's records while the pool is full).
    pub(super) fn has_room(&self) -> bool {
        self.answers.len() < ANSWERS_MAX && !self.answers.iter().any(Answer::waits_for_room)
    }
}

/// Refuses a Fetch that names a partition twice (Kafka keys a Fetch's partitions by topic
/// and partition; here each entry would be read and answered again).
pub(super) fn check_fetch(request: &FetchRequest) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for topic in &request.topics {
        for partition in &topic.partitions {
            if !seen.insert((topic.topic.0.as_str(), partition.partition)) {
                return Err(format!(
                    "topic {:?} partition {} named twice",
                    topic.topic.0.as_str(),
                    partition.partition
                ));
            }
        }
    }
    Ok(())
}

/// The Produce response once every part is answered (nothing for acks=0, which Kafka never
/// answers).
fn produce_response(produce: &PendingProduce) -> Vec<u8> {
    if produce.acks == 0 {
        return Vec::new();
    }
    if let Reply::OffsetCommit(topics) = &produce.reply {
        let written = match produce.parts.first().map(|part| &part.state) {
            Some(PartState::Answered { error_code, .. }) => *error_code,
            _ => error_code::UNKNOWN_SERVER_ERROR,
        };
        return super::offsets::commit_response(&produce.header, produce.version, topics, written);
    }
    let mut responses: Vec<TopicProduceResponse> = Vec::new();
    for part in &produce.parts {
        let PartState::Answered {
            error_code,
            error_message,
            base_offset,
        } = &part.state
        else {
            unreachable!("answered only when every part is");
        };
        let response = PartitionProduceResponse::default()
            .with_index(part.partition)
            .with_error_code(*error_code)
            .with_base_offset(*base_offset)
            .with_log_append_time_ms(-1)
            .with_log_start_offset(-1)
            .with_error_message(error_message.clone().map(StrBytes::from_string));
        match responses.last_mut() {
            Some(last) if last.name == part.topic => last.partition_responses.push(response),
            _ => responses.push(
                TopicProduceResponse::default()
                    .with_name(part.topic.clone())
                    .with_partition_responses(vec![response]),
            ),
        }
    }
    respond(
        &produce.header,
        ApiKey::Produce,
        produce.version,
        &ProduceResponse::default().with_responses(responses),
    )
}

/// The Fetch response, when it is due: `min_bytes` of records are there, a partition has
/// an error, or the wait is over. `None` while it waits.
fn try_fetch(
    fetch: &mut PendingFetch,
    context: &dyn KafkaContext,
    now: Timestamp,
) -> Option<Vec<u8>> {
    let request = &fetch.request;
    let due = now >= fetch.deadline;
    let min_bytes = u64::try_from(request.min_bytes).unwrap_or(0);
    let mut total_max = u64::try_from(request.max_bytes)
        .unwrap_or(0)
        .min(FETCH_BYTES_MAX);
    if !due && min_bytes > 0 {
        // Cheap test first (one frontier read a partition): is there anything to answer
        // that was not there when the answer was last found short?
        let ends: Vec<Option<u64>> = request
            .topics
            .iter()
            .zip(&fetch.topics)
            .flat_map(|(t, &topic)| {
                t.partitions.iter().map(move |p| {
                    topic
                        .filter(|_| p.partition == 0)
                        .and_then(|topic| context.log_end(topic.id))
                })
            })
            .collect();
        if fetch.ends_tried.as_ref() == Some(&ends) {
            return None;
        }
        // Records past an offset, an offset outside the log or an unknown partition (both
        // answered at once with their error).
        let answerable = request
            .topics
            .iter()
            .flat_map(|t| t.partitions.iter())
            .zip(&ends)
            .any(|(p, end)| end.is_none_or(|end| u64::try_from(p.fetch_offset) != Ok(end)));
        if !answerable {
            return None;
        }
        fetch.ends_tried = Some(ends);
    }
    let mut bytes = 0u64;
    let mut failed = false;
    let mut responses = Vec::new();
    for (topic_request, &topic) in request.topics.iter().zip(&fetch.topics) {
        let mut partitions = Vec::new();
        for partition in &topic_request.partitions {
            let mut data = PartitionData::default()
                .with_partition_index(partition.partition)
                .with_high_watermark(-1)
                .with_last_stable_offset(-1)
                .with_log_start_offset(-1)
                .with_preferred_read_replica(kafka_protocol::messages::BrokerId(-1));
            let Some(topic) = topic.filter(|_| partition.partition == 0) else {
                failed = true;
                partitions.push(data.with_error_code(error_code::UNKNOWN_TOPIC_OR_PARTITION));
                continue;
            };
            let (log_start, log_end) = match context.log_bounds(topic.id) {
                Ok(bounds) => bounds,
                Err(reason) => {
                    log::warn!("kafka fetch: topic {}: {reason}", topic.id);
                    failed = true;
                    partitions.push(data.with_error_code(error_code::UNKNOWN_SERVER_ERROR));
                    continue;
                }
            };
            data = data
                .with_high_watermark(log_end as i64)
                .with_last_stable_offset(log_end as i64)
                .with_log_start_offset(log_start as i64);
            // Only the answer's first records may exceed what is left of `max_bytes` (one
            // batch whole, as Kafka does); past it, partitions get their offsets only.
            let partition_max = u64::try_from(partition.partition_max_bytes)
                .unwrap_or(0)
                .min(if bytes == 0 {
                    total_max.max(1)
                } else {
                    total_max
                });
            let mut out = Vec::new();
            let position = u64::try_from(partition.fetch_offset).unwrap_or(u64::MAX);
            let fetched = if partition_max == 0 {
                match u64::try_from(partition.fetch_offset) {
                    Ok(offset) if (log_start..=log_end).contains(&offset) => Ok(()),
                    _ => Err(FetchRefused::OutOfRange { log_start, log_end }),
                }
            } else {
                context.fetch(topic.id, position, partition_max, &mut out)
            };
            match fetched {
                Ok(()) => {}
                Err(FetchRefused::OutOfRange { log_start, log_end }) => {
                    failed = true;
                    data = data
                        .with_error_code(error_code::OFFSET_OUT_OF_RANGE)
                        .with_high_watermark(log_end as i64)
                        .with_last_stable_offset(log_end as i64)
                        .with_log_start_offset(log_start as i64);
                }
                Err(FetchRefused::Failed(reason)) => {
                    log::warn!("kafka fetch: topic {}: {reason}", topic.id);
                    failed = true;
                    data = data.with_error_code(error_code::UNKNOWN_SERVER_ERROR);
                }
            }
            bytes += out.len() as u64;
            total_max = total_max.saturating_sub(out.len() as u64);
            partitions.push(data.with_records(Some(Bytes::from(out))));
        }
        responses.push(
            FetchableTopicResponse::default()
                .with_topic(topic_request.topic.clone())
                .with_topic_id(topic_request.topic_id)
                .with_partitions(partitions),
        );
    }
    if !(due || failed || bytes >= min_bytes) {
        return None;
    }
    Some(respond(
        &fetch.header,
        ApiKey::Fetch,
        fetch.version,
        &FetchResponse::default().with_responses(responses),
    ))
}

/// InitProducerId: a producer id for an idempotent producer, new (epoch 0), or the same
/// with its epoch raised when the producer asks for that (KIP-360). Its batches then form
/// one session of the sequencer, numbered by their record sequences, whichever broker and
/// connection they come through. A transactional id is refused: transactions are not
/// served.
pub(super) fn init_producer_id(request: &InitProducerIdRequest) -> InitProducerIdResponse {
    let response = InitProducerIdResponse::default();
    if request.transactional_id.is_some() {
        log::info!("kafka: InitProducerId with a transactional id refused (no transactions)");
        return response
            .with_error_code(error_code::TRANSACTIONAL_ID_AUTHORIZATION_FAILED)
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1);
    }
    if request.producer_id.0 >= 0 && (0..i16::MAX).contains(&request.producer_epoch) {
        return response
            .with_producer_id(request.producer_id)
            .with_producer_epoch(request.producer_epoch + 1);
    }
    // A positive i64: the sequencer's publisher ids of idempotent producers.
    let id = (wire::unique_client_id() >> 1) as i64;
    response
        .with_producer_id(ProducerId(id))
        .with_producer_epoch(0)
}

/// ListOffsets: the earliest (-2) and latest (-1) offsets, and by time the first record
/// whose timestamp is at or after the one asked for ([`offset_for_time`]), with its
/// timestamp (none: -1, Kafka's answer when no record is that new). The lookups of one
/// request share one read budget ([`TIME_LOOKUP_BUDGET_BYTES`]).
pub(super) fn list_offsets(
    request: &ListOffsetsRequest,
    context: &dyn KafkaContext,
) -> ListOffsetsResponse {
    // Shared by every lookup by time of the request: asking for one partition many times
    // does not multiply the work.
    let mut budget = TIME_LOOKUP_BUDGET_BYTES;
    let topics = request
        .topics
        .iter()
        .map(|topic_request| {
            let topic = context.find_topic(topic_request.name.0.as_str());
            let partitions = topic_request
                .partitions
                .iter()
                .map(|partition| {
                    let response = ListOffsetsPartitionResponse::default()
                        .with_partition_index(partition.partition_index)
                        .with_timestamp(-1)
                        .with_offset(-1);
                    let Some(topic) = topic.filter(|_| partition.partition_index == 0) else {
                        return response.with_error_code(error_code::UNKNOWN_TOPIC_OR_PARTITION);
                    };
                    let (start, end) = match context.log_bounds(topic.id) {
                        Ok(bounds) => bounds,
                        Err(_) => {
                            return response.with_error_code(error_code::UNKNOWN_SERVER_ERROR);
                        }
                    };
                    match partition.timestamp {
                        -2 => response.with_offset(start as i64),
                        -1 => response.with_offset(end as i64),
                        target if target >= 0 => {
                            let bounds = (start, end);
                            match offset_for_time(context, topic.id, bounds, target, &mut budget) {
                                Ok(Some((offset, timestamp))) => {
                                    response.with_offset(offset).with_timestamp(timestamp)
                                }
                                Ok(None) => response,
                                Err(error) => {
                                    log::warn!("ListOffsets by time failed: {error}");
                                    response.with_error_code(error_code::UNKNOWN_SERVER_ERROR)
                                }
                            }
                        }
                        _ => response,
                    }
                })
                .collect();
            ListOffsetsTopicResponse::default()
                .with_name(topic_request.name.clone())
                .with_partitions(partitions)
        })
        .collect();
    ListOffsetsResponse::default().with_topics(topics)
}

/// How many bytes of batches a lookup by time asks for at a time while it walks over batches
/// without timestamps (a read returns at least one whole batch of the log, however large).
const TIME_LOOKUP_READ_BYTES: u64 = 256 * 1024;
/// How many bytes all the lookups by time of one ListOffsets request may read together.
const TIME_LOOKUP_BUDGET_BYTES: u64 = 16 * 1024 * 1024;

/// The first record of `topic` (positions `start` to `end`) whose timestamp is at or after
/// `target`, as (offset, timestamp). The batch is found by bisecting positions on the
/// record batches' max timestamps; like Kafka's time index this takes timestamps that grow
/// with offsets (a batch older than one before it may be passed over). Our own client's
/// batches carry no timestamps: a probe that lands on one walks on to the next record batch
/// that has them (none before the upper bound: the answer lies below). The reads take from
/// `budget` (bytes); when it runs out first, the answer is the first position not yet known
/// to be older, with timestamp -1: a reader starting there misses nothing. Then the found
/// batch's records from `start` on are walked ([`records::first_at_or_after`]).
fn offset_for_time(
    context: &dyn KafkaContext,
    topic: TopicId,
    (start, end): (u64, u64),
    target: i64,
    budget: &mut u64,
) -> Result<Option<(i64, i64)>, String> {
    let mut read = Vec::new();
    let mut found = Vec::new();
    let (mut low, mut high) = (start, end);
    while low < high {
        let probe = low + (high - low) / 2;
        // (end position, max timestamp, bytes in `read`) of the first record batch with
        // timestamps that ends after `probe`, below `high`.
        let mut position = probe;
        let mut timed = None;
        while timed.is_none() && position < high {
            if *budget == 0 {
                log::warn!("topic {topic}: a lookup by time read its limit; answered {low}");
                return Ok(Some((low as i64, -1)));
            }
            read.clear();
            let bytes = if position == probe {
                1
            } else {
                TIME_LOOKUP_READ_BYTES
            };
            context
                .fetch(topic, position, bytes.min(*budget), &mut read)
                .map_err(|refused| format!("{refused:?}"))?;
            *budget = budget.saturating_sub((read.len() as u64).max(1));
            let walked = position;
            // The record batches lie back to back from the start of `read`; a batch of the
            // log may hold several, and it is read whole from its first.
            let mut at = 0;
            for batch in wire::record_batch::batches(&read) {
                let batch = batch.map_err(|e| e.to_string())?;
                let bytes = at..at + batch.bytes.len();
                at = bytes.end;
                let first = u64::try_from(batch.base_offset()).map_err(|_| "negative offset")?;
                let count = batch.checked_record_count().map_err(|e| e.to_string())?;
                let batch_end = first + u64::from(count);
                if batch_end <= position {
                    continue;
                }
                if first >= high {
                    break;
                }
                let max_timestamp = batch.timestamps().1;
                if max_timestamp >= 0 {
                    timed = Some((batch_end, max_timestamp, bytes));
                    break;
                }
                position = batch_end;
            }
            if position == walked {
                break;
            }
        }
        match timed {
            Some((_, max_timestamp, bytes)) if max_timestamp >= target => {
                high = probe;
                found.clear();
                found.extend_from_slice(&read[bytes]);
            }
            Some((batch_end, _, _)) => low = batch_end.max(probe + 1),
            None => high = probe,
        }
    }
    records::first_at_or_after(&found, target, start as i64).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    use kafka_protocol::messages::{ApiVersionsRequest, ApiVersionsResponse};
    use kafka_protocol::protocol::StrBytes;
    use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion};
    use kafka_protocol::records::RecordBatchDecoder;

    use super::super::fake::FakeLog;
    use super::super::records::tests::{client_batch, record};
    use super::super::{request_frame, response_body};
    use super::*;

    fn name(topic: &str) -> TopicName {
        TopicName(StrBytes::from_string(topic.to_owned()))
    }

    fn batch(values: &[&[u8]]) -> Bytes {
        let mut out = Vec::new();
        wire::record_batch::encode(&mut out, 0, values.iter().copied());
        Bytes::from(out)
    }

    fn produce(acks: i16, parts: &[(&str, i32, Bytes)]) -> ProduceRequest {
        let mut topics: Vec<TopicProduceData> = Vec::new();
        for (topic, partition, records) in parts {
            let data = PartitionProduceData::default()
                .with_index(*partition)
                .with_records(Some(records.clone()));
            match topics.last_mut() {
                Some(last) if last.name == name(topic) => last.partition_data.push(data),
                _ => topics.push(
                    TopicProduceData::default()
                        .with_name(name(topic))
                        .with_partition_data(vec![data]),
                ),
            }
        }
        ProduceRequest::default()
            .with_acks(acks)
            .with_timeout_ms(1_000)
            .with_topic_data(topics)
    }

    fn fetch(topic: &str, offset: i64, max_wait_ms: i32) -> FetchRequest {
        FetchRequest::default()
            .with_max_wait_ms(max_wait_ms)
            .with_min_bytes(1)
            .with_max_bytes(1 << 20)
            .with_topics(vec![
                FetchTopic::default()
                    .with_topic(name(topic))
                    .with_partitions(vec![
                        FetchPartition::default()
                            .with_partition(0)
                            .with_fetch_offset(offset)
                            .with_partition_max_bytes(1 << 20),
                    ]),
            ])
    }

    /// A session over a fake log, with a clock the test moves.
    struct Harness {
        session: KafkaSession,
        log: FakeLog,
        now: Timestamp,
        correlation: i32,
    }

    impl Harness {
        fn new() -> Harness {
            Harness {
                session: KafkaSession::new(7),
                log: FakeLog::two_topics(),
                now: Timestamp::now(),
                correlation: 0,
            }
        }

        fn send<R: Encodable + HeaderVersion>(&mut self, key: ApiKey, version: i16, body: &R) {
            self.correlation += 1;
            let frame = request_frame(key, version, self.correlation, body);
            self.session
                .on_request(Bytes::copy_from_slice(&frame[4..]), &mut self.log, self.now)
                .expect("a well-formed request");
        }

        /// Orders what was committed and hands the decisions to the session.
        fn order(&mut self) {
            for outcome in self.log.order_all() {
                assert_eq!(outcome.conn, 7);
                self.session.on_outcome(&outcome);
            }
        }

        fn poll(&mut self) -> Vec<u8> {
            self.session.poll(&mut self.log, self.now, true);
            let mut out = Vec::new();
            self.session.take_ready(&mut out);
            out
        }

        fn advance(&mut self, by: Duration) {
            self.now += by;
        }

        /// Appends `records` (record batches as a client produced them, `count` records in
        /// all) to "orders" as one batch of the log; returns its first position.
        fn append_produced(&mut self, records: Vec<u8>, count: usize) -> u64 {
            let start = self.log.append(1, vec![b"v".to_vec(); count]);
            self.log.produced.insert((1, start), records);
            start
        }

        /// ListOffsets (`version`) of "orders" partition 0 at each of `timestamps`.
        fn list_offsets(
            &mut self,
            version: i16,
            timestamps: &[i64],
        ) -> Vec<ListOffsetsPartitionResponse> {
            let request = ListOffsetsRequest::default().with_topics(vec![
                ListOffsetsTopic::default()
                    .with_name(name("orders"))
                    .with_partitions(
                        timestamps
                            .iter()
                            .map(|&timestamp| {
                                ListOffsetsPartition::default()
                                    .with_partition_index(0)
                                    .with_timestamp(timestamp)
                            })
                            .collect(),
                    ),
            ]);
            self.send(ApiKey::ListOffsets, version, &request);
            let out = self.poll();
            let (_, mut body) = response_body(&out, ApiKey::ListOffsets, version).unwrap();
            let response = ListOffsetsResponse::decode(&mut body, version).unwrap();
            response.topics[0].partitions.clone()
        }
    }

    /// One record batch as a client encodes it, of records with these timestamps.
    fn timed_batch(timestamps: &[i64]) -> Vec<u8> {
        let records: Vec<kafka_protocol::records::Record> = (0..timestamps.len())
            .map(|i| kafka_protocol::records::Record {
                // The encoder puts records whose offsets and sequences go up together into
                // one batch.
                sequence: i as i32,
                timestamp: timestamps[i],
                ..record(i as i64, None, Some(b"v"))
            })
            .collect();
        client_batch(&records, kafka_protocol::records::Compression::None)
    }

    /// Splits concatenated response frames.
    fn frames(mut out: &[u8]) -> Vec<&[u8]> {
        let mut frames = Vec::new();
        while !out.is_empty() {
            let size = i32::from_be_bytes(out[..4].try_into().unwrap()) as usize;
            frames.push(&out[..4 + size]);
            out = &out[4 + size..];
        }
        frames
    }

    fn produce_response(frame: &[u8], version: i16) -> (i32, ProduceResponse) {
        let (correlation, mut body) = response_body(frame, ApiKey::Produce, version).unwrap();
        (
            correlation,
            ProduceResponse::decode(&mut body, version).unwrap(),
        )
    }

    fn fetch_response(frame: &[u8], version: i16) -> FetchResponse {
        let (_, mut body) = response_body(frame, ApiKey::Fetch, version).unwrap();
        FetchResponse::decode(&mut body, version).unwrap()
    }

    /// (offset, value) of every record in a partition's answer.
    fn fetched_records(data: &PartitionData) -> Vec<(i64, Vec<u8>)> {
        let mut bytes = data.records.clone().unwrap_or_default();
        let mut records = Vec::new();
        while !bytes.is_empty() {
            for record in RecordBatchDecoder::decode(&mut bytes).unwrap().records {
                records.push((record.offset, record.value.unwrap().to_vec()));
            }
        }
        records
    }

    #[test]
    fn a_produce_is_answered_once_ordered_with_its_offset_and_each_partitions_error() {
        let mut h = Harness::new();
        h.log.append(1, vec![b"earlier".to_vec()]);
        let request = produce(
            1,
            &[
                ("orders", 0, batch(&[b"a", b"b"])),
                ("orders", 1, batch(&[b"c"])),
                ("nosuch", 0, batch(&[b"d"])),
            ],
        );
        h.send(ApiKey::Produce, 9, &request);
        assert!(
            h.poll().is_empty(),
            "no answer before the sequencer decides"
        );
        assert!(h.session.pending());
        assert_eq!(
            h.log.undecided.len(),
            1,
            "only the valid partition is written"
        );
        h.order();
        let out = h.poll();
        let (correlation, response) = produce_response(&out, 9);
        assert_eq!(correlation, 1);
        let orders = &response.responses[0];
        assert_eq!(orders.name, name("orders"));
        let answered: Vec<(i32, i16, i64)> = orders
            .partition_responses
            .iter()
            .map(|p| (p.index, p.error_code, p.base_offset))
            .collect();
        assert_eq!(
            answered,
            vec![(0, 0, 1), (1, error_code::UNKNOWN_TOPIC_OR_PARTITION, -1)]
        );
        assert_eq!(
            response.responses[1].partition_responses[0].error_code,
            error_code::UNKNOWN_TOPIC_OR_PARTITION
        );
        assert_eq!(
            h.log.logs[&1][1].1,
            vec![b"a".to_vec(), b"b".to_vec()],
            "the values, in order"
        );
        assert!(!h.session.pending());
    }

    #[test]
    fn each_topics_decision_reaches_its_own_partition() {
        // Ring slots count per topic: the first batch of each topic is slot 0 of its ring.
        let mut h = Harness::new();
        h.log.append(1, vec![b"old".to_vec(); 5]);
        let request = produce(
            1,
            &[
                ("orders", 0, batch(&[b"o"])),
                ("payments", 0, batch(&[b"p"])),
            ],
        );
        h.send(ApiKey::Produce, 9, &request);
        for outcome in h.log.order_topic(2) {
            h.session.on_outcome(&outcome);
        }
        assert!(h.poll().is_empty(), "orders is not decided yet");
        h.order();
        let (_, response) = produce_response(&h.poll(), 9);
        let offsets: Vec<(TopicName, i64)> = response
            .responses
            .iter()
            .map(|t| (t.name.clone(), t.partition_responses[0].base_offset))
            .collect();
        assert_eq!(offsets, vec![(name("orders"), 5), (name("payments"), 0)]);
    }

    /// A batch of an idempotent producer: `values` from sequence `base_sequence` on.
    fn idempotent_batch(
        values: &[&[u8]],
        producer_id: i64,
        epoch: i16,
        base_sequence: i32,
    ) -> Bytes {
        let mut out = batch(values).to_vec();
        out[43..51].copy_from_slice(&producer_id.to_be_bytes());
        out[51..53].copy_from_slice(&epoch.to_be_bytes());
        out[53..57].copy_from_slice(&base_sequence.to_be_bytes());
        let crc = wire::payload::checksum(&out[21..]);
        out[17..21].copy_from_slice(&crc.to_be_bytes());
        Bytes::from(out)
    }

    fn init_producer_id(
        h: &mut Harness,
        request: &InitProducerIdRequest,
        version: i16,
    ) -> InitProducerIdResponse {
        h.send(ApiKey::InitProducerId, version, request);
        let out = h.poll();
        let (_, mut body) = response_body(&out, ApiKey::InitProducerId, version).unwrap();
        InitProducerIdResponse::decode(&mut body, version).unwrap()
    }

    #[test]
    fn init_producer_id_gives_an_id_raises_its_epoch_and_refuses_transactions() {
        let mut h = Harness::new();
        let fresh = init_producer_id(
            &mut h,
            &InitProducerIdRequest::default()
                .with_transactional_id(None)
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1),
            4,
        );
        assert_eq!(fresh.error_code, 0);
        assert!(fresh.producer_id.0 >= 0);
        assert_eq!(fresh.producer_epoch, 0);
        let other = init_producer_id(
            &mut h,
            &InitProducerIdRequest::default()
                .with_transactional_id(None)
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1),
            0,
        );
        assert_ne!(other.producer_id, fresh.producer_id);
        let bumped = init_producer_id(
            &mut h,
            &InitProducerIdRequest::default()
                .with_transactional_id(None)
                .with_producer_id(fresh.producer_id)
                .with_producer_epoch(0),
            4,
        );
        assert_eq!(
            (bumped.producer_id, bumped.producer_epoch),
            (fresh.producer_id, 1)
        );
        let transactional = init_producer_id(
            &mut h,
            &InitProducerIdRequest::default()
                .with_transactional_id(Some(kafka_protocol::messages::TransactionalId(
                    StrBytes::from_static_str("tx"),
                )))
                .with_producer_id(ProducerId(-1)),
            4,
        );
        assert_eq!(
            transactional.error_code,
            error_code::TRANSACTIONAL_ID_AUTHORIZATION_FAILED
        );
    }

    #[test]
    fn an_idempotent_producers_resend_is_answered_with_the_first_copys_offset() {
        let mut h = Harness::new();
        h.log.append(1, vec![b"earlier".to_vec()]);
        let first = produce(
            -1,
            &[("orders", 0, idempotent_batch(&[b"a", b"b"], 77, 0, 0))],
        );
        h.send(ApiKey::Produce, 9, &first);
        h.order();
        let (_, response) = produce_response(&h.poll(), 9);
        assert_eq!(response.responses[0].partition_responses[0].base_offset, 1);
        // The same batch again, on another connection (a retry after a reconnect): the
        // same session, so the same offset and no second copy.
        let mut again = KafkaSession::new(8);
        let frame = request_frame(ApiKey::Produce, 9, 5, &first);
        again
            .on_request(Bytes::copy_from_slice(&frame[4..]), &mut h.log, h.now)
            .unwrap();
        for outcome in h.log.order_all() {
            again.on_outcome(&outcome);
        }
        again.poll(&mut h.log, h.now, true);
        let mut out = Vec::new();
        again.take_ready(&mut out);
        let (_, response) = produce_response(&out, 9);
        let part = &response.responses[0].partition_responses[0];
        assert_eq!((part.error_code, part.base_offset), (0, 1));
        assert_eq!(h.log.logs[&1].len(), 2, "one copy");
        let session = h.log.placed.keys().next().copied().unwrap();
        assert_eq!(
            session,
            (1, 77, 0, 0),
            "the producer's id, epoch and first sequence"
        );
        // Two batches in one partition whose sequences do not follow: refused.
        let mut gap = idempotent_batch(&[b"c"], 77, 0, 2).to_vec();
        gap.extend_from_slice(&idempotent_batch(&[b"d"], 77, 0, 9));
        h.send(
            ApiKey::Produce,
            9,
            &produce(-1, &[("orders", 0, Bytes::from(gap))]),
        );
        let (_, response) = produce_response(&h.poll(), 9);
        assert_eq!(
            response.responses[0].partition_responses[0].error_code,
            error_code::INVALID_RECORD
        );
    }

    #[test]
    fn answers_leave_in_request_order() {
        let mut h = Harness::new();
        h.send(
            ApiKey::Produce,
            7,
            &produce(1, &[("orders", 0, batch(&[b"x"]))]),
        );
        h.send(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default());
        h.send(
            ApiKey::Produce,
            7,
            &produce(1, &[("orders", 0, batch(&[b"y"]))]),
        );
        assert!(
            h.poll().is_empty(),
            "the ApiVersions answer waits behind the Produce"
        );
        h.order();
        let out = h.poll();
        let frames = frames(&out);
        assert_eq!(frames.len(), 3);
        let (first, response) = produce_response(frames[0], 7);
        assert_eq!(
            (
                first,
                response.responses[0].partition_responses[0].base_offset
            ),
            (1, 0)
        );
        let (second, mut body) = response_body(frames[1], ApiKey::ApiVersions, 3).unwrap();
        assert_eq!(second, 2);
        assert_eq!(
            ApiVersionsResponse::decode(&mut body, 3)
                .unwrap()
                .error_code,
            0
        );
        let (third, response) = produce_response(frames[2], 7);
        assert_eq!(
            (
                third,
                response.responses[0].partition_responses[0].base_offset
            ),
            (3, 1)
        );
        // One session per connection and topic, numbered from 0 without a gap.
        let seqs: Vec<u64> = h.log.logs[&1].iter().map(|(start, _)| *start).collect();
        assert_eq!(seqs, vec![0, 1]);
    }

    #[test]
    fn acks_all_waits_for_the_replicas_and_acks_zero_is_never_answered() {
        let mut h = Harness::new();
        h.send(
            ApiKey::Produce,
            9,
            &produce(-1, &[("payments", 0, batch(&[b"p"]))]),
        );
        h.order();
        assert!(h.poll().is_empty(), "ordered, not yet in the replica");
        h.log.replicated.insert(2, 1);
        let (_, response) = produce_response(&h.poll(), 9);
        assert_eq!(response.responses[0].partition_responses[0].error_code, 0);
        // acks=0: written, no answer, and the next request's answer is not held behind it.
        h.send(
            ApiKey::Produce,
            9,
            &produce(0, &[("orders", 0, batch(&[b"q"]))]),
        );
        h.send(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default());
        h.order();
        let out = h.poll();
        assert_eq!(frames(&out).len(), 1, "only the ApiVersions answer");
        assert_eq!(h.log.logs[&1][0].1, vec![b"q".to_vec()]);
    }

    #[test]
    fn a_full_pool_holds_batches_in_order_until_room_or_the_timeout() {
        let mut h = Harness::new();
        h.log.full = true;
        h.send(
            ApiKey::Produce,
            9,
            &produce(1, &[("orders", 0, batch(&[b"1"]))]),
        );
        h.send(
            ApiKey::Produce,
            9,
            &produce(1, &[("orders", 0, batch(&[b"2"]))]),
        );
        assert!(h.poll().is_empty());
        h.log.full = false;
        h.poll();
        h.order();
        let out = h.poll();
        assert_eq!(frames(&out).len(), 2);
        let values: Vec<Vec<u8>> = h.log.logs[&1].iter().flat_map(|(_, m)| m.clone()).collect();
        assert_eq!(values, vec![b"1".to_vec(), b"2".to_vec()]);
        // No room within timeout_ms: REQUEST_TIMED_OUT, and nothing written.
        h.log.full = true;
        h.send(
            ApiKey::Produce,
            9,
            &produce(1, &[("orders", 0, batch(&[b"3"]))]),
        );
        h.advance(Duration::from_millis(1_001));
        let (_, response) = produce_response(&h.poll(), 9);
        assert_eq!(
            response.responses[0].partition_responses[0].error_code,
            error_code::REQUEST_TIMED_OUT
        );
        assert!(h.log.undecided.is_empty());
    }

    #[test]
    fn produce_before_version_3_is_answered_that_its_format_is_not_served() {
        let mut h = Harness::new();
        h.send(
            ApiKey::Produce,
            2,
            &produce(1, &[("orders", 0, batch(&[b"v"]))]),
        );
        let (_, response) = produce_response(&h.poll(), 2);
        assert_eq!(
            response.responses[0].partition_responses[0].error_code,
            error_code::UNSUPPORTED_FOR_MESSAGE_FORMAT
        );
        assert!(h.log.undecided.is_empty());
    }

    #[test]
    fn records_with_keys_headers_and_null_values_are_taken() {
        let mut h = Harness::new();
        let keyed = Bytes::from(client_batch(
            &[
                record(0, Some(b"k"), Some(b"v")),
                record(1, Some(b"gone"), None),
            ],
            kafka_protocol::records::Compression::None,
        ));
        h.send(ApiKey::Produce, 9, &produce(1, &[("orders", 0, keyed)]));
        h.order();
        let (_, response) = produce_response(&h.poll(), 9);
        let orders = &response.responses[0].partition_responses[0];
        assert_eq!((orders.error_code, orders.base_offset), (0, 0));
        // The log's messages are the values (a null one empty); the batch is stored whole.
        assert_eq!(h.log.logs[&1][0].1, vec![b"v".to_vec(), Vec::new()]);
    }

    #[test]
    fn records_the_log_cannot_hold_are_refused_with_the_reason() {
        let mut h = Harness::new();
        let mut transactional = batch(&[b"v"]).to_vec();
        transactional[wire::record_batch::ATTRIBUTES_AT + 1] |= 0x10;
        let crc = wire::payload::checksum(&transactional[wire::record_batch::CRC_START..]);
        transactional[wire::record_batch::CRC_AT..wire::record_batch::CRC_AT + 4]
            .copy_from_slice(&crc.to_be_bytes());
        let mut corrupt = batch(&[b"v"]).to_vec();
        let last = corrupt.len() - 2;
        corrupt[last] ^= 1;
        h.send(
            ApiKey::Produce,
            9,
            &produce(
                1,
                &[
                    ("orders", 0, Bytes::from(transactional)),
                    ("payments", 0, Bytes::from(corrupt)),
                ],
            ),
        );
        let (_, response) = produce_response(&h.poll(), 9);
        let orders = &response.responses[0].partition_responses[0];
        assert_eq!(orders.error_code, error_code::INVALID_RECORD);
        assert!(
            orders
                .error_message
                .as_ref()
                .is_some_and(|m| m.contains("transactions are not supported"))
        );
        assert_eq!(
            response.responses[1].partition_responses[0].error_code,
            error_code::CORRUPT_MESSAGE
        );
        assert!(h.log.undecided.is_empty());
    }

    #[test]
    fn a_fetch_serves_records_from_its_offset_and_waits_for_new_ones() {
        let mut h = Harness::new();
        h.log.append(1, vec![b"m0".to_vec(), b"m1".to_vec()]);
        h.log.append(1, vec![b"m2".to_vec()]);
        h.send(ApiKey::Fetch, 12, &fetch("orders", 1, 500));
        let response = fetch_response(&h.poll(), 12);
        let data = &response.responses[0].partitions[0];
        assert_eq!((data.error_code, data.high_watermark), (0, 3));
        // The batch holding offset 1 is served whole; clients skip what precedes their offset.
        assert_eq!(
            fetched_records(data),
            vec![
                (0, b"m0".to_vec()),
                (1, b"m1".to_vec()),
                (2, b"m2".to_vec())
            ]
        );
        // At the end: waits for records, up to max_wait_ms.
        h.send(ApiKey::Fetch, 12, &fetch("orders", 3, 500));
        assert!(h.poll().is_empty());
        h.log.append(1, vec![b"m3".to_vec()]);
        let response = fetch_response(&h.poll(), 12);
        assert_eq!(
            fetched_records(&response.responses[0].partitions[0]),
            vec![(3, b"m3".to_vec())]
        );
        h.send(ApiKey::Fetch, 12, &fetch("orders", 4, 500));
        h.advance(Duration::from_millis(499));
        assert!(h.poll().is_empty());
        h.advance(Duration::from_millis(1));
        let response = fetch_response(&h.poll(), 12);
        assert!(fetched_records(&response.responses[0].partitions[0]).is_empty());
    }

    #[test]
    fn a_fetch_outside_the_log_says_where_the_log_is() {
        let mut h = Harness::new();
        h.log.append(1, vec![b"a".to_vec(); 10]);
        h.log.log_start.insert(1, 4);
        for (offset, version) in [(2, 5), (11, 12), (-1, 12)] {
            h.send(ApiKey::Fetch, version, &fetch("orders", offset, 500));
            let response = fetch_response(&h.poll(), version);
            let data = &response.responses[0].partitions[0];
            assert_eq!(data.error_code, error_code::OFFSET_OUT_OF_RANGE, "{offset}");
            assert_eq!((data.log_start_offset, data.high_watermark), (4, 10));
        }
        h.send(ApiKey::Fetch, 12, &fetch("nosuch", 0, 500));
        let response = fetch_response(&h.poll(), 12);
        assert_eq!(
            response.responses[0].partitions[0].error_code,
            error_code::UNKNOWN_TOPIC_OR_PARTITION
        );
    }

    #[test]
    fn every_offered_version_of_every_answer_encodes() {
        // The schema encoder refuses a field set outside its versions (a broker bug that
        // would end the connection): each answer, with errors and records, in each version.
        let mut h = Harness::new();
        h.log.append(1, vec![b"a".to_vec()]);
        for version in 3..=9 {
            let parts = [
                ("orders", 0, batch(&[b"x"])),
                ("orders", 1, batch(&[b"y"])),
                ("nosuch", 0, batch(&[b"z"])),
            ];
            h.send(ApiKey::Produce, version, &produce(1, &parts));
            h.order();
            let (_, response) = produce_response(&h.poll(), version);
            assert_eq!(response.responses.len(), 2, "version {version}");
        }
        for version in 4..=12 {
            h.send(ApiKey::Fetch, version, &fetch("orders", 0, 0));
            assert!(
                !fetched_records(&fetch_response(&h.poll(), version).responses[0].partitions[0])
                    .is_empty()
            );
            h.send(ApiKey::Fetch, version, &fetch("orders", 1_000, 0));
            fetch_response(&h.poll(), version);
        }
        for version in 1..=7 {
            let request = ListOffsetsRequest::default().with_topics(vec![
                ListOffsetsTopic::default()
                    .with_name(name("nosuch"))
                    .with_partitions(vec![ListOffsetsPartition::default().with_timestamp(-1)]),
            ]);
            h.send(ApiKey::ListOffsets, version, &request);
            assert!(!h.poll().is_empty());
        }
    }

    #[test]
    fn a_fetch_answer_stays_within_max_bytes_past_its_first_batch() {
        let mut h = Harness::new();
        h.log.append(1, vec![vec![1u8; 3_000]]);
        h.log.append(2, vec![vec![2u8; 3_000]]);
        // 1000 bytes asked for: the first partition's batch whole, the second none (its
        // offsets still said).
        let two = FetchRequest::default()
            .with_max_bytes(1_000)
            .with_min_bytes(1)
            .with_topics(
                ["orders", "payments"]
                    .into_iter()
                    .map(|topic| {
                        FetchTopic::default()
                            .with_topic(name(topic))
                            .with_partitions(vec![
                                FetchPartition::default().with_partition_max_bytes(1 << 20),
                            ])
                    })
                    .collect(),
            );
        h.send(ApiKey::Fetch, 12, &two);
        let response = fetch_response(&h.poll(), 12);
        let first = &response.responses[0].partitions[0];
        let second = &response.responses[1].partitions[0];
        assert_eq!(fetched_records(first).len(), 1);
        assert!(fetched_records(second).is_empty());
        assert_eq!((second.error_code, second.high_watermark), (0, 1));
        // min_bytes 0 is answered at once, even with nothing new.
        let mut now = fetch("orders", 1, 30_000);
        now.min_bytes = 0;
        h.send(ApiKey::Fetch, 12, &now);
        assert!(!h.poll().is_empty());
    }

    #[test]
    fn a_fetch_naming_a_partition_twice_is_malformed() {
        let mut h = Harness::new();
        let mut twice = fetch("orders", 0, 0);
        let partition = twice.topics[0].partitions[0].clone();
        twice.topics[0].partitions.push(partition);
        let frame = request_frame(ApiKey::Fetch, 12, 1, &twice);
        assert!(matches!(
            h.session
                .on_request(Bytes::copy_from_slice(&frame[4..]), &mut h.log, h.now),
            Err(super::super::KafkaError::Malformed { .. })
        ));
    }

    #[test]
    fn a_batch_no_sequencer_decides_is_answered_timed_out() {
        let mut h = Harness::new();
        h.send(
            ApiKey::Produce,
            9,
            &produce(1, &[("orders", 0, batch(&[b"x"]))]),
        );
        h.send(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default());
        h.advance(UNDECIDED_MAX - Duration::from_millis(1));
        assert!(h.poll().is_empty());
        h.advance(Duration::from_millis(1));
        let out = h.poll();
        let frames = frames(&out);
        assert_eq!(frames.len(), 2, "the answers behind it leave too");
        let (_, response) = produce_response(frames[0], 9);
        assert_eq!(
            response.responses[0].partition_responses[0].error_code,
            error_code::REQUEST_TIMED_OUT
        );
        // A late decision finds nothing to answer.
        h.order();
        assert!(h.poll().is_empty());
        assert!(!h.session.pending());
    }

    #[test]
    fn while_a_batch_waits_for_room_no_further_request_is_taken() {
        let mut h = Harness::new();
        h.log.full = true;
        h.send(
            ApiKey::Produce,
            9,
            &produce(1, &[("orders", 0, batch(&[b"1"]))]),
        );
        assert!(!h.session.has_room());
        h.log.full = false;
        h.poll();
        assert!(h.session.has_room());
    }

    #[test]
    fn list_offsets_gives_the_start_and_the_end() {
        let mut h = Harness::new();
        h.log.append(1, vec![b"a".to_vec(); 10]);
        h.log.log_start.insert(1, 4);
        for version in [1, 7] {
            let offsets: Vec<(i16, i64)> = h
                .list_offsets(version, &[-2, -1, 1_700_000_000_000])
                .iter()
                .map(|p| (p.error_code, p.offset))
                .collect();
            assert_eq!(offsets, vec![(0, 4), (0, 10), (0, -1)]);
        }
    }

    #[test]
    fn list_offsets_by_time_finds_the_first_record_at_or_after_it() {
        let mut h = Harness::new();
        // Kafka batches of records with these timestamps, between batches of our own client
        // (no timestamps): positions 0-2 ours, 3-4 [1000, 1001], 5-7 [1005, 1006, 1007],
        // 8-9 ours, 10 [2000].
        h.log.append(1, vec![b"ours".to_vec(); 3]);
        h.append_produced(timed_batch(&[1000, 1001]), 2);
        h.append_produced(timed_batch(&[1005, 1006, 1007]), 3);
        h.log.append(1, vec![b"ours".to_vec(); 2]);
        h.append_produced(timed_batch(&[2000]), 1);
        let ask = |h: &mut Harness, targets: &[i64]| -> Vec<(i64, i64)> {
            h.list_offsets(7, targets)
                .iter()
                .inspect(|p| assert_eq!(p.error_code, 0))
                .map(|p| (p.offset, p.timestamp))
                .collect()
        };
        assert_eq!(
            ask(&mut h, &[0, 1001, 1002, 1007, 1008, 2000, 2001]),
            vec![
                (3, 1000),
                (4, 1001),
                (5, 1005),
                (7, 1007),
                (10, 2000),
                (10, 2000),
                (-1, -1)
            ]
        );
        // From the log's start on: what was before it is not found.
        h.log.log_start.insert(1, 6);
        assert_eq!(ask(&mut h, &[0, 1007]), vec![(6, 1006), (7, 1007)]);
        // 400 of our batches of 2 KiB (positions 11-410) take several reads to walk over.
        for _ in 0..400 {
            h.log.append(1, vec![vec![b'o'; 2048]]);
        }
        h.append_produced(timed_batch(&[3000]), 1);
        assert_eq!(
            ask(&mut h, &[2001, 3000, 3001]),
            vec![(411, 3000), (411, 3000), (-1, -1)]
        );
        // One batch of the log holding two record batches (one Produce of both): the
        // lookup reads it whole from its first and still looks at the second.
        let mut both = timed_batch(&[4000, 4001, 4002, 4003, 4004]);
        both.extend(timed_batch(&[5005, 5006, 5007, 5008, 5009]));
        let start = h.append_produced(both, 10);
        assert_eq!(start, 412);
        assert_eq!(
            ask(&mut h, &[4002, 4500, 5009, 5010]),
            vec![(414, 4002), (417, 5005), (421, 5009), (-1, -1)]
        );
    }

    #[test]
    fn list_offsets_by_time_past_its_read_budget_answers_a_position_it_has_not_passed() {
        let mut h = Harness::new();
        // 10,000 of our batches of 2 KiB (20 MiB, more than a request may read), then a
        // Kafka record at 10,000.
        for _ in 0..10_000 {
            h.log.append(1, vec![vec![b'o'; 2048]]);
        }
        h.append_produced(timed_batch(&[7000]), 1);
        let partition = &h.list_offsets(7, &[7000])[0];
        assert_eq!(partition.error_code, 0);
        assert_eq!(partition.timestamp, -1, "not found, only bounded");
        assert!(
            (0..=10_000).contains(&partition.offset),
            "a reader from {} misses nothing",
            partition.offset
        );
    }
}
