//! The log as Kafka requests reach it: a produced partition written as one batch, and the
//! log's batches read out as record batches. A thin adapter over [`BrokerState`].

use shared_log::coherence::SharedMemory;
use shared_log::layout::{BATCH_RECORD_BATCHES, BATCH_SEQ_COUNTS_MESSAGES};
use shared_log::pool::TopicId;
use shared_log::reader::ReadError;
use shared_log::writer::{AppendError, BatchMeta};

use units::Timestamp;
use wire::record_batch;

use super::admin::{CreateRefused, TopicCreation};
use super::records::Produced;
use super::{FetchRefused, KafkaTopic, ProducerSession, PublishRefused};
use crate::metrics::Metrics;
use crate::server::state::{BrokerState, ConnId};

/// Writes `produced` as `session`'s next batch of `topic`: its record batches as they came,
/// copied once, from the request into the pool, marked as record batches
/// ([`BATCH_RECORD_BATCHES`]), one message per record, with the checksum taken from their
/// own CRCs (no second pass over the bytes). Commits it for connection `conn`, at `now`.
pub fn publish_records<M: SharedMemory + Clone>(
    state: &mut BrokerState<M>,
    topic: TopicId,
    session: ProducerSession,
    produced: &Produced<'_>,
    conn: ConnId,
    now: Timestamp,
) -> Result<u64, PublishRefused> {
    let batch_bytes_max = state
        .open_writer(topic)
        .map_err(|e| PublishRefused::Failed(format!("the topic cannot be written: {e}")))?;
    let payload_bytes = produced.bytes.len() as u64;
    if payload_bytes > batch_bytes_max {
        return Err(PublishRefused::TooLarge {
            payload_bytes,
            batch_bytes_max,
        });
    }
    let reservation = match state.begin_batch(topic, payload_bytes, now) {
        Ok(reservation) => reservation,
        Err(AppendError::RingFull { .. } | AppendError::LogFull { .. }) => {
            return Err(PublishRefused::NoRoom);
        }
        Err(AppendError::ClaimMoved(moved)) => {
            state.record_claim_moved(moved);
            return Err(PublishRefused::Failed(
                "another process took this broker's id over".into(),
            ));
        }
        Err(other) => return Err(PublishRefused::Failed(other.to_string())),
    };
    state.fill_batch(topic, &reservation, |payload| {
        payload.copy_from_slice(produced.bytes);
    });
    let meta = BatchMeta {
        client_id: session.client_id,
        session_epoch: session.session_epoch,
        batch_seq: session.next_seq,
        message_count: produced.record_count,
        checksum: produced.checksum,
        flags: BATCH_RECORD_BATCHES
            | if session.seq_counts_messages {
                BATCH_SEQ_COUNTS_MESSAGES
            } else {
                0
            },
    };
    let slot = state
        .commit_batch(topic, reservation, meta, conn)
        .map_err(|moved| {
            state.record_claim_moved(moved);
            PublishRefused::Failed("another process took this broker's id over".into())
        })?;
    let metrics = state.metrics();
    Metrics::inc(&metrics.batches_received);
    metrics
        .bytes_received
        .fetch_add(payload_bytes, std::sync::atomic::Ordering::Relaxed);
    Ok(slot)
}

/// The first position of `topic` not yet ordered.
pub fn log_end<M: SharedMemory + Clone>(state: &BrokerState<M>, topic: TopicId) -> Option<u64> {
    Some(state.log_end(topic).1)
}

/// Appends `topic`'s batches from the one that holds `position` to `out`, as record
/// batches from each batch's first global position on: a Kafka producer's as stored, with
/// their base offsets set; our own publishers' messages encoded as records. Until
/// `max_bytes` of payload were read (the first batch whole; nothing when `max_bytes` is 0).
pub fn fetch_record_batches<M: SharedMemory + Clone>(
    state: &BrokerState<M>,
    topic: TopicId,
    position: u64,
    max_bytes: u64,
    out: &mut Vec<u8>,
) -> Result<(), FetchRefused> {
    let failed = |e: ReadError| FetchRefused::Failed(e.to_string());
    if max_bytes == 0 {
        return Ok(());
    }
    let mut reader = state.open_reader(topic).map_err(failed)?;
    let out_of_range = |reader: &shared_log::reader::LogReader<M>| FetchRefused::OutOfRange {
        log_start: reader.log_start(),
        log_end: reader.log_end().1,
    };
    match reader.seek(position) {
        Ok(()) => {}
        Err(ReadError::Truncated { .. } | ReadError::BeyondEnd { .. }) => {
            return Err(out_of_range(&reader));
        }
        Err(other) => return Err(failed(other)),
    }
    let start = out.len();
    let mut last_batch_at = start;
    loop {
        let read = (out.len() - start) as u64;
        if read >= max_bytes && read > 0 {
            return Ok(());
        }
        let polled = reader.poll_within(64, max_bytes - read, |batch| {
            last_batch_at = out.len();
            if batch.is_record_batches() {
                out.extend_from_slice(batch.payload);
                // The reader checked the framing; bytes overwritten meanwhile are found by
                // the overwrite check after the copy, and the batch is then dropped.
                if record_batch::set_base_offsets(&mut out[last_batch_at..], batch.global_start)
                    .is_err()
                {
                    out.truncate(last_batch_at);
                }
            } else {
                record_batch::encode(out, batch.global_start, batch.messages());
            }
        });
        match polled {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            // The last batch handed out was overwritten while it was copied: not served.
            Err(ReadError::Overwritten { .. }) => {
                out.truncate(last_batch_at);
                return Ok(());
            }
            Err(ReadError::Truncated { .. }) if out.len() == start => {
                return Err(out_of_range(&reader));
            }
            // What was read before a batch that cannot be read is served; the next Fetch,
            // starting there, gets the error.
            Err(ReadError::Truncated { .. }) => return Ok(()),
            Err(other) if out.len() == start => return Err(failed(other)),
            Err(other) => {
                log::warn!("topic {topic}: a Fetch stops before a batch: {other}");
                return Ok(());
            }
        }
    }
}

/// Creates a topic for a Kafka client (see [`super::admin`]): order 5, ack 1, the
/// replication factor asked for or the broker's; only where this broker creates topics.
pub fn create_topic<M: SharedMemory + Clone>(
    state: &mut BrokerState<M>,
    creation: &TopicCreation,
) -> Result<KafkaTopic, CreateRefused> {
    if !state.creates_topics() || (creation.on_first_use && !state.settings().auto_create_topics) {
        return Err(CreateRefused::NotCreator);
    }
    wire::Topic::new(&creation.name).map_err(|e| CreateRefused::InvalidName(e.to_string()))?;
    if matches!(state.find_topic(&creation.name), Ok(Some(_))) {
        return Err(CreateRefused::Exists);
    }
    let replication_factor = creation
        .replication_factor
        .unwrap_or(state.settings().replication_factor);
    let replicas = usize::from(replication_factor.saturating_sub(1));
    if creation.validate_only {
        return Ok(KafkaTopic { id: 0, replicas });
    }
    let config = shared_log::pool::TopicConfig {
        order: wire::Order::TotalSessionFifo,
        ack: 1,
        replication_factor,
        retention: shared_log::Retention::StallLimited,
        history: shared_log::HistoryRetention::UNLIMITED,
    };
    match state.create_topic(&creation.name, config) {
        Ok(id) => {
            log::info!(
                "created topic {:?} (order 5, ack 1, replication factor {replication_factor}) for a Kafka client",
                creation.name
            );
            Ok(KafkaTopic { id, replicas })
        }
        Err(e @ shared_log::pool::PoolError::TopicTableFull { .. }) => {
            crate::metrics::Metrics::inc(&state.metrics().topics_refused);
            Err(CreateRefused::TableFull(e.to_string()))
        }
        Err(shared_log::pool::PoolError::TopicConflict { .. }) => Err(CreateRefused::Exists),
        Err(other) => Err(CreateRefused::Failed(other.to_string())),
    }
}

/// The offsets topic ([`super::offsets::OFFSETS_TOPIC`]): found, or created where this
/// broker creates topics (order 5, ack 1, the broker's replication factor).
pub fn offsets_topic<M: SharedMemory + Clone>(state: &mut BrokerState<M>) -> Option<KafkaTopic> {
    let name = super::offsets::OFFSETS_TOPIC;
    if let Ok(Some((id, config))) = state.find_topic(name) {
        let replicas = usize::from(config.replication_factor.saturating_sub(1));
        return Some(KafkaTopic { id, replicas });
    }
    let creation = TopicCreation {
        name: name.to_owned(),
        replication_factor: None,
        validate_only: false,
        on_first_use: false,
    };
    create_topic(state, &creation).ok()
}

/// The committed offsets of Kafka consumers, following the offsets topic in the shared log
/// (every broker's commits, in order).
#[derive(Debug, Default)]
pub struct OffsetsFollower {
    /// The latest commits read.
    pub cache: super::offsets::OffsetsCache,
    reader: Option<shared_log::reader::LogReader<shared_log::coherence::PoolMemory>>,
}

impl OffsetsFollower {
    /// Reads the commits written since the last call.
    pub fn catch_up(&mut self, state: &BrokerState<shared_log::coherence::PoolMemory>) {
        if self.reader.is_none() {
            let Ok(Some((topic, _))) = state.find_topic(super::offsets::OFFSETS_TOPIC) else {
                return;
            };
            self.reader = state.open_reader(topic).ok();
        }
        let Some(reader) = &mut self.reader else {
            return;
        };
        loop {
            let mut batches: Vec<Vec<Vec<u8>>> = Vec::new();
            let polled = reader.poll(256, |batch| {
                batches.push(batch.messages().map(<[u8]>::to_vec).collect());
            });
            // Every batch handed out is good, except the last when it was overwritten while
            // it was read (a poll hands out batches before it meets a truncation or damage).
            let good = match &polled {
                Err(ReadError::Overwritten { .. }) => batches.len().saturating_sub(1),
                _ => batches.len(),
            };
            batches[..good]
                .iter()
                .flatten()
                .for_each(|message| self.cache.apply(message));
            match polled {
                Ok(0) => return,
                Ok(_) => {}
                // The commits overwritten before they were read are gone: go on from the
                // oldest still held.
                Err(ReadError::Truncated { log_start, .. }) => {
                    log::warn!(
                        "kafka offsets: commits before position {log_start} were overwritten before this broker read them"
                    );
                    if reader.seek(log_start).is_err() {
                        return;
                    }
                }
                Err(ReadError::Overwritten { .. }) => {}
                // A damaged batch: its commits are lost; the ones after it are not.
                Err(ReadError::Corrupt { ordinal, what }) => {
                    log::warn!(
                        "kafka offsets: batch {ordinal} of the offsets topic skipped: {what}"
                    );
                    reader.set_next_ordinal(ordinal + 1);
                }
                Err(other) => {
                    log::warn!("kafka offsets: cannot read the offsets topic: {other}");
                    return;
                }
            }
        }
    }
}
