//! A subscriber's side of a connection: deliveries in global order, split at message
//! boundaries, up to the output high-water mark; a subscriber that stops reading stops
//! holding the log.

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
    /// For a subscriber that holds the log: its topic and the ordinal of the next batch it
    /// needs. A subscriber that took nothing for the stall limit holds nothing (on topics
    /// with [`Retention::StallLimited`]) until it reads again.
    pub fn subscription(&self) -> Option<(TopicId, u64)> {
        match &self.role {
            // Reading from disk, it holds nothing in the pool (its place there is gone).
            Peer::Subscriber(subscriber)
                if !self.closing && subscriber.holding && subscriber.history.is_none() =>
            {
                Some((subscriber.reader.topic(), subscriber.reader.next_ordinal()))
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
        if self.output.len() - self.output_start > OUTPUT_HIGH_WATER_BYTES {
            return;
        }
        if self.output_start > 0 && self.output_start == self.output.len() {
            self.output.clear();
            self.output_start = 0;
        }
        let limit = subscriber.batch_bytes_max as usize;
        let positions = subscriber.positions;
        // Up to the high-water mark: a batch may overshoot it, but no more are added then.
        let room = (OUTPUT_HIGH_WATER_BYTES + self.output_start - self.output.len()) as u64;
        let output = &mut self.output;
        let mut last_batch_start = output.len();
        let mut oversize = None;
        let next_position = &mut subscriber.next_position;
        let mut last_batch_position = *next_position;
        let mut deliver = |batch: &OrderedBatch<'_>| {
            last_batch_start = output.len();
            last_batch_position = *next_position;
            *next_position = batch.global_start + u64::from(batch.message_count);
            if let Err(size) = encode_deliveries(output, batch, limit, positions) {
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
        // Progress: it took deliveries, or has read everything there is.
        if result.is_ok() {
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

/// Appends the delivery frames of `batch` to `output`: one, or several split at message
/// boundaries when it is larger than the subscriber's `limit`. Err: a single message
/// larger than the limit (its size), which no delivery can carry.
fn encode_deliveries(
    output: &mut Vec<u8>,
    batch: &OrderedBatch<'_>,
    limit: usize,
    positions: bool,
) -> Result<(), usize> {
    let mut emit = |payload: &[u8], message_count: u32, global_start: u64| {
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
        output.extend_from_slice(&header.frame_prefix());
        output.extend_from_slice(payload);
    };
    if batch.payload.len() <= limit {
        emit(batch.payload, batch.message_count, batch.global_start);
        return Ok(());
    }
    let (mut from, mut count, mut position, mut start_position) =
        (0usize, 0u32, batch.global_start, batch.global_start);
    let mut at = 0usize;
    for message in batch.messages() {
        let size = wire::payload::MESSAGE_PREFIX_BYTES + message.len();
        if size > limit {
            return Err(size);
        }
        if at + size - from > limit {
            emit(&batch.payload[from..at], count, start_position);
            from = at;
            count = 0;
            start_position = position;
        }
        at += size;
        count += 1;
        position += 1;
    }
    emit(&batch.payload[from..at], count, start_position);
    Ok(())
}
