//! A subscriber's side of a connection: deliveries in global order, split at message
//! boundaries, queued as references into the pool up to the output high-water mark; a
//! subscriber that stops reading stops holding the log.

use super::*;
use shared_log::reader::OrderedBatch;

#[derive(Debug)]
pub(super) struct Subscriber<M> {
    pub(super) reader: LogReader<M>,
    pub(super) batch_bytes_max: u32,
    /// Order 0 promises no position, so deliveries carry none.
    pub(super) positions: bool,
    /// The topic's retention: whether a stalled subscriber stops holding the log.
    pub(super) retention: Retention,
    /// Last time the subscriber took a delivery or was at the end of the log.
    pub(super) progress_at: Timestamp,
    /// Whether its position holds the log (see [`Connection::subscription`]).
    pub(super) holding: bool,
    /// While it reads positions older than the pool holds: this broker's replica file.
    pub(super) history: Option<HistoryReader>,
    /// The position after the last batch delivered (where a switch to history resumes).
    pub(super) next_position: u64,
}

impl<M: SharedMemory + Clone> Connection<M> {
    /// For a subscriber that holds the log: its topic and the ordinal of the oldest batch it
    /// needs (queued deliveries are sent from the pool, so they count). A subscriber that
    /// took nothing for the stall limit holds nothing (on topics with
    /// [`Retention::StallLimited`]) until it reads again.
    pub fn subscription(&self) -> Option<(TopicId, u64)> {
        match &self.role {
            // Reading from disk, it holds nothing in the pool (its place there is gone).
            Peer::Subscriber(subscriber)
                if !self.closing && subscriber.holding && subscriber.history.is_none() =>
            {
                let oldest = self
                    .output
                    .first_ordinal()
                    .unwrap_or_else(|| subscriber.reader.next_ordinal());
                Some((subscriber.reader.topic(), oldest))
            }
            _ => None,
        }
    }

    /// True for subscribers, which the loop polls for new deliveries.
    pub fn is_subscriber(&self) -> bool {
        matches!(self.role, Peer::Subscriber(_))
    }

    /// Queues deliveries for a subscriber while its output has room, and lets a subscriber
    /// that took nothing for the stall limit stop holding the log.
    pub fn produce_deliveries(&mut self, state: &BrokerState<M>, now: Timestamp) {
        if self.closing {
            return;
        }
        let Peer::Subscriber(subscriber) = &mut self.role else {
            return;
        };
        subscriber.release_if_stalled(self.id, state, now);
        // Released: the rest of a partly sent delivery is taken in hand before the log may
        // be overwritten under it (the loop publishes the release after this).
        if !self.keep_started_delivery(state.metrics()) || self.output.is_full() {
            return;
        }
        let Peer::Subscriber(subscriber) = &mut self.role else {
            return;
        };
        let limit = subscriber.batch_bytes_max as usize;
        let positions = subscriber.positions;
        // Up to the high-water mark: a batch may overshoot it, but no more are added then.
        let room = self.output.room_bytes() as u64;
        let output = &mut self.output;
        // Whether it had taken everything it was given (its queued deliveries hold the log).
        let caught_up = output.first_ordinal().is_none();
        let mut last_batch_start = output.mark();
        let mut oversize = None;
        let next_position = &mut subscriber.next_position;
        let mut last_batch_position = *next_position;
        // Batches from the pool are queued as references into it; those read from disk
        // are copied into the queue.
        let from_pool = subscriber.history.is_none();
        let mut deliver = |batch: &OrderedBatch<'_>| {
            last_batch_start = output.mark();
            last_batch_position = *next_position;
            // The first batch may begin before the position asked for: it is delivered from
            // that position on.
            let wanted = *next_position;
            *next_position = batch.global_start + u64::from(batch.message_count);
            if let Err(size) = queue_deliveries(output, batch, limit, positions, from_pool, wanted)
            {
                oversize = Some(size);
            }
        };
        let result = match &mut subscriber.history {
            Some(history) => {
                let me = state.settings().broker_id;
                let (durable, _) = subscriber
                    .reader
                    .pool()
                    .replicated_by(subscriber.reader.topic(), me);
                match history.poll(DELIVERIES_PER_POLL, room, durable, &mut deliver) {
                    // Caught up with what is durable on disk: on from the pool (which falls
                    // back here if that batch is gone from it too).
                    Ok(0) if !history.is_seeking() => {
                        subscriber.reader.set_next_ordinal(history.next_ordinal());
                        subscriber.history = None;
                        Ok(0)
                    }
                    Ok(delivered) => {
                        state
                            .metrics()
                            .history_batches_delivered
                            .fetch_add(delivered as u64, Ordering::Relaxed);
                        Ok(delivered)
                    }
                    // Retention deleted what it was to read next: the start it names is
                    // the real one.
                    Err(e @ HistoryError::Deleted { .. }) => {
                        let reason = format!("the subscriber fell behind the retained log: {e}");
                        let metrics = state.metrics();
                        self.send_error(metrics, ErrorCode::PositionTruncated, None, &reason);
                        return;
                    }
                    Err(e) => {
                        let metrics = state.metrics();
                        log::error!("connection {}: history: {e}", self.id);
                        self.send_error(metrics, ErrorCode::Internal, None, &e.to_string());
                        return;
                    }
                }
            }
            None => subscriber
                .reader
                .poll_within(DELIVERIES_PER_POLL, room, &mut deliver),
        };
        let metrics = state.metrics();
        // Progress: it had taken everything queued for it, and reads on. Bytes taken from the
        // queue count too (`service`).
        if result.is_ok() && caught_up {
            subscriber.progress_at = now;
            if !subscriber.holding {
                subscriber.holding = true;
                log::info!(
                    "connection {}: the subscriber reads again: it holds the log from batch {}",
                    self.id,
                    subscriber.reader.next_ordinal()
                );
            }
        }
        match result {
            Ok(delivered) => {
                metrics
                    .batches_delivered
                    .fetch_add(delivered as u64, Ordering::Relaxed);
                if let Some(size) = oversize {
                    self.output.truncate(last_batch_start);
                    let reason = format!(
                        "a message of {size} bytes exceeds the subscriber's limit of {limit}"
                    );
                    self.send_error(metrics, ErrorCode::BatchTooLarge, None, &reason);
                }
            }
            Err(e @ (ReadError::Overwritten { .. } | ReadError::Truncated { .. })) => {
                self.output.truncate(last_batch_start);
                if let Some(history) = subscriber.reopen_history(last_batch_position, state) {
                    subscriber.next_position = last_batch_position;
                    subscriber.history = Some(history);
                    return;
                }
                let reason = format!("the subscriber fell behind the retained log: {e}");
                self.send_error(metrics, ErrorCode::PositionTruncated, None, &reason);
            }
            Err(e) => self.send_error(metrics, ErrorCode::Internal, None, &e.to_string()),
        }
    }

    /// A queued delivery's payload was overwritten before any of its frame left: the
    /// subscriber is told as if its reader had found it so (the queue dropped it and every
    /// delivery after it).
    pub(super) fn overwritten_in_queue(&mut self, payload: PoolPayload, metrics: &Metrics) {
        let Peer::Subscriber(subscriber) = &self.role else {
            return;
        };
        // Already ending: its Error (or Goodbye) is queued.
        if self.closing {
            return;
        }
        let error = ReadError::Truncated {
            ordinal: payload.ordinal,
            global_start: payload.global_start,
            log_start: subscriber.reader.log_start(),
        };
        let reason = format!("the subscriber fell behind the retained log: {error}");
        self.send_error(metrics, ErrorCode::PositionTruncated, None, &reason);
    }
}

impl<M: SharedMemory + Clone> Subscriber<M> {
    /// For a subscriber the pool left behind: this broker's replica file from `position` on,
    /// if it keeps one that holds it.
    fn reopen_history(&self, position: u64, state: &BrokerState<M>) -> Option<HistoryReader> {
        let dir = state.settings().history_dir.as_ref()?;
        HistoryReader::open(dir, self.reader.topic(), position).ok()
    }

    /// A subscriber that took nothing for the stall limit stops holding the log (on topics
    /// with [`Retention::StallLimited`]).
    fn release_if_stalled(&mut self, connection: ConnId, state: &BrokerState<M>, now: Timestamp) {
        let stall = state.settings().limits.subscriber_stall();
        if self.holding
            && self.retention == Retention::StallLimited
            && now.saturating_duration_since(self.progress_at) >= stall
        {
            self.holding = false;
            if let Some(count) = Metrics::inc_logged(&state.metrics().subscribers_released) {
                log::info!(
                    "connection {}: the subscriber took nothing for {} ms \
                     (--subscriber-stall-ms): it no longer holds the log at batch {} ({count} \
                     subscribers released so far)",
                    connection,
                    stall.as_millis(),
                    self.reader.next_ordinal()
                );
            }
        }
    }
}

/// Queues the deliveries of `batch` on `output`, their payloads left in the pool (copied
/// into the queue when the batch was read from disk, not `from_pool`): one, or several
/// split at message boundaries when it is larger than the subscriber's `limit`, and none of
/// its messages before position `wanted` (on a topic with positions). Err: a single message
/// larger than the limit (its size), which no delivery can carry.
fn queue_deliveries(
    output: &mut Output,
    batch: &OrderedBatch<'_>,
    limit: usize,
    positions: bool,
    from_pool: bool,
    wanted: u64,
) -> Result<(), usize> {
    if batch.is_record_batches() {
        // A Kafka producer's batch: its records' values, as messages (a copy; the reader's
        // overwrite check after this callback still covers the bytes read).
        let mut payload = Vec::with_capacity(batch.payload.len());
        let mut message_count = 0u32;
        let read = crate::server::kafka::records::stored_values(batch.payload, |value| {
            wire::payload::push_message(&mut payload, value);
            message_count += 1;
        });
        if read.as_ref().ok() != Some(&batch.message_count) {
            log::error!(
                "batch {}: its record batches read as {message_count} records ({read:?}), its entry says {}",
                batch.ordinal,
                batch.message_count
            );
        }
        let messages = OrderedBatch {
            message_count,
            flags: batch.flags & !shared_log::layout::BATCH_RECORD_BATCHES,
            checksum: wire::payload::checksum(&payload),
            payload: &payload,
            ..*batch
        };
        return queue_deliveries(output, &messages, limit, positions, false, wanted);
    }
    let skip = if positions {
        wanted.saturating_sub(batch.global_start)
    } else {
        0
    };
    let mut emit = |range: std::ops::Range<usize>, message_count: u32, global_start: u64| {
        let payload = &batch.payload[range.clone()];
        let header = DeliveryHeaderRepr {
            global_start: positions.then_some(global_start),
            message_count,
            payload_bytes: payload.len() as u32,
            checksum: if payload.len() == batch.payload.len() {
                batch.checksum
            } else {
                wire::payload::checksum(payload)
            },
            broker_id: batch.broker,
            client_id: batch.client_id,
            batch_seq: batch.batch_seq,
            session_epoch: batch.session_epoch,
        };
        if !from_pool {
            output.push_owned_delivery(header.frame_prefix(), payload);
            return;
        }
        let payload = PoolPayload {
            ordinal: batch.ordinal,
            global_start: batch.global_start,
            broker: batch.broker,
            blog_offset: batch.blog_offset,
            pool_offset: batch.pool_offset + range.start as u64,
            len: payload.len() as u64,
        };
        output.push_delivery(header.frame_prefix(), payload);
    };
    if skip == 0 && batch.payload.len() <= limit {
        emit(
            0..batch.payload.len(),
            batch.message_count,
            batch.global_start,
        );
        return Ok(());
    }
    let (mut from, mut count, mut position, mut start_position) =
        (0usize, 0u32, batch.global_start, batch.global_start);
    let mut at = 0usize;
    for message in batch.messages() {
        let size = wire::payload::MESSAGE_PREFIX_BYTES + message.len();
        if position < batch.global_start + skip {
            at += size;
            from = at;
            position += 1;
            start_position = position;
            continue;
        }
        if size > limit {
            return Err(size);
        }
        if at + size - from > limit {
            emit(from..at, count, start_position);
            from = at;
            count = 0;
            start_position = position;
        }
        at += size;
        count += 1;
        position += 1;
    }
    if count > 0 {
        emit(from..at, count, start_position);
    }
    Ok(())
}
