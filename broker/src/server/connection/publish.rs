//! A publisher's side of a connection: batches received straight into the pool (or, when
//! slow and room is short, into staging), their deadlines, the sequencer's decisions, and
//! the Acks (after the replicas, at ack level 2).

use super::*;

#[derive(Debug)]
pub(super) enum Receiving {
    Idle,
    /// A batch header arrived; the payload (or, when `staged`, the whole payload received
    /// and checked in staging) waits for room in the pool.
    WaitingForRoom {
        header: BatchHeaderRepr,
        /// When the first attempt found the pool full (`None`: not tried yet).
        full_since: Option<Timestamp>,
        stalled: bool,
        staged: Option<Vec<u8>>,
    },
    /// Receiving a payload into the pool.
    Payload {
        header: BatchHeaderRepr,
        reservation: Reservation,
        received: u64,
        /// CRC-32C of the `received` bytes, taken chunk by chunk as each arrived (while in
        /// cache), so that the finished batch is not read back to be checked.
        checksum: u32,
        /// The whole payload must have arrived by then.
        deadline: Timestamp,
        /// Still arriving then, it moves to staging if the payload log has been short of
        /// room since (else it costs nobody anything where it is).
        stage_at: Timestamp,
        /// The writer's full events when the room was reserved.
        full_events: u64,
        /// Staging had no room for it once already (counted once).
        staging_refused: bool,
    },
    /// Receiving a slow payload into staging (`staged` has the payload's size).
    Staging {
        header: BatchHeaderRepr,
        staged: Vec<u8>,
        received: u64,
        deadline: Timestamp,
    },
}

impl Receiving {
    /// Staging bytes this state holds (to give back when it ends).
    fn staged_bytes(&self) -> u64 {
        match self {
            Receiving::Staging { staged, .. }
            | Receiving::WaitingForRoom {
                staged: Some(staged),
                ..
            } => staged.len() as u64,
            _ => 0,
        }
    }
}

#[derive(Debug, Clone, Copy)]
/// A batch committed and not yet decided: the one record of it on this broker.
pub(super) struct InFlight {
    /// Its ring slot (the sequencer's decision names it).
    pub(super) slot: u64,
    pub(super) batch_seq: u64,
    pub(super) message_count: u32,
    /// When its payload was complete (for the ACK latency).
    pub(super) received_at: Timestamp,
}

#[derive(Debug)]
pub(super) struct Publisher {
    pub(super) topic: TopicId,
    pub(super) order: Order,
    pub(super) ack: AckLevel,
    pub(super) client_id: u64,
    pub(super) session_epoch: u32,
    pub(super) receiving: Receiving,
    pub(super) in_flight: VecDeque<InFlight>,
    pub(super) last_seq: Option<u64>,
    pub(super) acked_through: Option<u64>,
    pub(super) ack_entries: Vec<AckEntry>,
    pub(super) ack_dirty: bool,
    pub(super) goodbye: bool,
    /// Ack level 2: replica files (besides the pool) that must hold a batch.
    pub(super) replicas: usize,
    /// Ack level 2: decisions waiting for the replicas, in commit order.
    pub(super) durable_wait: VecDeque<(RoutedOutcome, InFlight)>,
}

pub(super) enum Step {
    Continue,
    Stop(InputState),
}

/// Payload bytes taken by [`receive_payload`].
pub(super) struct PayloadRead {
    pub(super) bytes: usize,
    /// Taken from the read-ahead buffer (which the caller then consumes), not the stream.
    pub(super) buffered: bool,
}

/// Takes payload bytes into `dest`: what the read-ahead buffer holds first, else one read
/// straight from the stream (no copy through the buffer).
pub(super) fn receive_payload<S: ByteStream>(
    buffered: &[u8],
    stream: &mut S,
    dest: &mut [u8],
    id: ConnId,
) -> Result<PayloadRead, Step> {
    if !buffered.is_empty() {
        let bytes = buffered.len().min(dest.len());
        dest[..bytes].copy_from_slice(&buffered[..bytes]);
        return Ok(PayloadRead {
            bytes,
            buffered: true,
        });
    }
    match stream.recv(dest) {
        Ok(0) => Err(Step::Stop(InputState::Ended)),
        Ok(bytes) => Ok(PayloadRead {
            bytes,
            buffered: false,
        }),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(Step::Stop(InputState::Drained)),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(Step::Continue),
        Err(e) => {
            log::info!("connection {id}: receive failed mid-batch: {e}");
            Err(Step::Stop(InputState::Ended))
        }
    }
}

impl<M: SharedMemory + Clone> Connection<M> {
    /// True when the connection waits for pool room (the loop should retry soon).
    pub fn waits_for_room(&self) -> bool {
        matches!(&self.role, Peer::Publisher(p) if matches!(p.receiving, Receiving::WaitingForRoom { .. }))
    }

    /// After a publisher's Goodbye nothing more may arrive, yet the stream is still read: the
    /// Acks owed may wait for replicas for a long time (ack 2), and a publisher that gives up
    /// waiting closes its end, which must end the connection here too.
    pub(super) fn watch_after_goodbye<S: ByteStream>(
        &mut self,
        stream: &mut S,
        state: &BrokerState<M>,
    ) -> InputState {
        if self.input_start == self.input_end
            && let Err(input) = self.refill_input(stream, self.input.len())
        {
            return input;
        }
        let reason = format!(
            "{} bytes arrived after the publisher's Goodbye",
            self.input_end - self.input_start
        );
        self.input_start = self.input_end;
        self.send_error(state.metrics(), ErrorCode::UnexpectedFrame, None, &reason);
        InputState::Paused
    }

    /// Advances a batch being received; `None` when no batch is in progress.
    pub(super) fn continue_batch<S: ByteStream>(
        &mut self,
        stream: &mut S,
        state: &mut BrokerState<M>,
        now: Timestamp,
    ) -> Option<Step> {
        let Peer::Publisher(publisher) = &mut self.role else {
            return None;
        };
        let topic = publisher.topic;
        let buffered = &self.input[self.input_start..self.input_end];
        let id = self.id;
        let got = match &mut publisher.receiving {
            Receiving::Idle => return None,
            Receiving::WaitingForRoom { .. } => return Some(self.reserve_room(state, now)),
            Receiving::Payload {
                header,
                reservation,
                received,
                ..
            } => {
                let (at, end) = (*received as usize, header.payload_bytes as usize);
                state.fill_batch(topic, reservation, |payload| {
                    receive_payload(buffered, stream, &mut payload[at..end], id)
                })
            }
            Receiving::Staging {
                staged, received, ..
            } => receive_payload(buffered, stream, &mut staged[*received as usize..], id),
        };
        self.payload_arrived(got, state, now)
    }

    /// A batch's header arrived, or its payload completed in staging: reserves its room in
    /// the pool (a full pool is backpressure: the connection reads nothing until there is
    /// room), and commits a staged payload at once.
    fn reserve_room(&mut self, state: &mut BrokerState<M>, now: Timestamp) -> Step {
        let Peer::Publisher(publisher) = &mut self.role else {
            return Step::Continue;
        };
        let Receiving::WaitingForRoom {
            header,
            full_since,
            stalled,
            staged,
        } = &mut publisher.receiving
        else {
            return Step::Continue;
        };
        let (header, topic) = (*header, publisher.topic);
        match state.begin_batch(topic, u64::from(header.payload_bytes), now) {
            Ok(mut reservation) => {
                if let Some(staged) = staged.take() {
                    // Received and checked in staging: into the pool in one copy.
                    state.write_batch(topic, &mut reservation, &staged);
                    state.give_back_staging(staged.len() as u64);
                    publisher.receiving = Receiving::Idle;
                    self.commit_batch(state, reservation, header, now);
                    return Step::Continue;
                }
                let limits = &state.settings().limits;
                publisher.receiving = Receiving::Payload {
                    header,
                    reservation,
                    received: 0,
                    checksum: 0,
                    deadline: now + limits.batch_deadline(u64::from(header.payload_bytes)),
                    stage_at: now + limits.batch_hold(),
                    full_events: state.room_refusals(topic),
                    staging_refused: false,
                };
                Step::Continue
            }
            Err(AppendError::RingFull { .. } | AppendError::LogFull { .. }) => {
                let metrics = state.metrics();
                match full_since {
                    None => {
                        *full_since = Some(now);
                        Metrics::inc(&metrics.ring_full_waits);
                    }
                    Some(since) if !*stalled && now.saturating_duration_since(*since) > STALL => {
                        *stalled = true;
                        Metrics::inc(&metrics.receive_stalls_over_50ms);
                    }
                    Some(_) => {}
                }
                Step::Stop(InputState::Paused)
            }
            Err(AppendError::ClaimMoved(moved)) => {
                self.end_for_claim_moved(state, moved);
                Step::Stop(InputState::Paused)
            }
            Err(other) => {
                state.give_back_staging(publisher.receiving.staged_bytes());
                publisher.receiving = Receiving::Idle;
                let reason = other.to_string();
                let code = ErrorCode::BatchTooLarge;
                self.send_error(state.metrics(), code, Some(header.batch_seq), &reason);
                Step::Stop(InputState::Paused)
            }
        }
    }

    /// Books `got` payload bytes received by [`receive_payload`] into the batch in
    /// progress, and finishes the batch once its payload is complete.
    pub(super) fn payload_arrived(
        &mut self,
        got: Result<PayloadRead, Step>,
        state: &mut BrokerState<M>,
        now: Timestamp,
    ) -> Option<Step> {
        let read = match got {
            Ok(read) => read,
            Err(step) => return Some(step),
        };
        if read.buffered {
            self.input_start += read.bytes;
        }
        let complete = match &mut self.role {
            Peer::Publisher(publisher) => match &mut publisher.receiving {
                Receiving::Payload {
                    header,
                    reservation,
                    received,
                    checksum,
                    ..
                } => {
                    // The bytes were just written: checksummed while still in cache.
                    let at = *received as usize;
                    *checksum = state.fill_batch(publisher.topic, reservation, |payload| {
                        wire::payload::checksum_append(*checksum, &payload[at..at + read.bytes])
                    });
                    *received += read.bytes as u64;
                    *received == u64::from(header.payload_bytes)
                }
                Receiving::Staging {
                    header, received, ..
                } => {
                    *received += read.bytes as u64;
                    *received == u64::from(header.payload_bytes)
                }
                _ => false,
            },
            _ => false,
        };
        if let Err(error) = self.decoder.payload_received(read.bytes) {
            self.protocol_error(state.metrics(), &error);
            return Some(Step::Stop(InputState::Paused));
        }
        if complete {
            self.finish_batch(state, now);
        }
        Some(Step::Continue)
    }

    /// A publisher's batch past its deadline is dropped (DeadlineExpired); one that is merely
    /// slow may move to staging.
    pub(super) fn check_batch_deadline(&mut self, state: &mut BrokerState<M>, now: Timestamp) {
        let Peer::Publisher(publisher) = &mut self.role else {
            return;
        };
        let (header, received, deadline) = match &publisher.receiving {
            Receiving::Payload {
                header,
                received,
                deadline,
                ..
            }
            | Receiving::Staging {
                header,
                received,
                deadline,
                ..
            } => (*header, *received, *deadline),
            _ => return,
        };
        if now >= deadline {
            self.drop_batch(state);
            if let Some(count) = Metrics::inc_logged(&state.metrics().batch_deadlines_expired) {
                log::info!(
                    "connection {}: batch {} arrived slower than the minimum rate ({count} such \
                     batches dropped)",
                    self.id,
                    header.batch_seq
                );
            }
            let limits = &state.settings().limits;
            let reason = format!(
                "batch {}: {received} of {} payload bytes arrived within {} ms; a batch must \
                 arrive within {} ms plus its size at {} bytes/s (--batch-grace-ms, \
                 --batch-min-bytes-per-s)",
                header.batch_seq,
                header.payload_bytes,
                limits
                    .batch_deadline(u64::from(header.payload_bytes))
                    .as_millis(),
                limits.batch_grace_ms,
                limits.batch_min_bytes_per_s
            );
            self.send_error(
                state.metrics(),
                ErrorCode::DeadlineExpired,
                Some(header.batch_seq),
                &reason,
            );
            return;
        }
        self.stage_if_slow(state, now);
    }

    /// Moves a batch still arriving after `batch_hold_ms`, while its payload log is short of
    /// room, out of the pool: what has arrived is copied to staging and the reservation given
    /// back, so that reclaiming the topic's payload log never waits on this connection.
    pub(super) fn stage_if_slow(&mut self, state: &mut BrokerState<M>, now: Timestamp) {
        let Peer::Publisher(publisher) = &mut self.role else {
            return;
        };
        let topic = publisher.topic;
        let Receiving::Payload {
            header,
            stage_at,
            full_events,
            staging_refused,
            ..
        } = &mut publisher.receiving
        else {
            return;
        };
        if now < *stage_at || state.room_refusals(topic) <= *full_events {
            return;
        }
        let payload_bytes = u64::from(header.payload_bytes);
        if !state.take_staging(payload_bytes) {
            // Staging is full: try again after another hold (the deadline still applies).
            let limits = &state.settings().limits;
            *stage_at = now + limits.batch_hold();
            if !std::mem::replace(staging_refused, true)
                && let Some(count) = Metrics::inc_logged(&state.metrics().staging_full)
            {
                log::warn!(
                    "connection {}: a slow batch keeps its room in the pool: staging is full \
                     (--staging-bytes-max {}; {count} such batches so far)",
                    self.id,
                    limits.staging_bytes_max
                );
            }
            return;
        }
        let Receiving::Payload {
            header,
            reservation,
            received,
            deadline,
            ..
        } = std::mem::replace(&mut publisher.receiving, Receiving::Idle)
        else {
            unreachable!("matched above");
        };
        let mut staged = vec![0u8; payload_bytes as usize];
        let arrived = received as usize;
        state.fill_batch(topic, &reservation, |payload| {
            staged[..arrived].copy_from_slice(&payload[..arrived]);
        });
        state.abort_batch(topic, reservation);
        publisher.receiving = Receiving::Staging {
            header,
            staged,
            received,
            deadline,
        };
        Metrics::inc(&state.metrics().batches_staged);
    }

    pub(super) fn on_batch_header(&mut self, header: BatchHeaderRepr, state: &mut BrokerState<M>) {
        let Peer::Publisher(publisher) = &mut self.role else {
            let reason = "Batch frames are only accepted after a publisher Hello";
            self.send_error(
                state.metrics(),
                ErrorCode::UnexpectedFrame,
                Some(header.batch_seq),
                reason,
            );
            return;
        };
        if publisher
            .last_seq
            .is_some_and(|last| header.batch_seq <= last)
        {
            let reason = format!(
                "batch_seq {} does not follow {} on this connection: sequences must increase",
                header.batch_seq,
                publisher.last_seq.unwrap_or_default()
            );
            self.send_error(
                state.metrics(),
                ErrorCode::InvalidBatchHeader,
                Some(header.batch_seq),
                &reason,
            );
            return;
        }
        publisher.last_seq = Some(header.batch_seq);
        // `continue_batch` reserves the room (and counts a wait only if there is none).
        publisher.receiving = Receiving::WaitingForRoom {
            header,
            full_since: None,
            stalled: false,
            staged: None,
        };
    }

    /// A payload is complete: checks it (in the pool, or in staging) and commits it.
    pub(super) fn finish_batch(&mut self, state: &mut BrokerState<M>, now: Timestamp) {
        let Peer::Publisher(publisher) = &mut self.role else {
            return;
        };
        let topic = publisher.topic;
        match std::mem::replace(&mut publisher.receiving, Receiving::Idle) {
            Receiving::Payload {
                header,
                reservation,
                checksum,
                ..
            } => {
                let verdict = state.fill_batch(topic, &reservation, |payload| {
                    wire::verify_checksummed_payload(&header, checksum, payload)
                });
                if let Err(error) = verdict {
                    state.abort_batch(topic, reservation);
                    self.protocol_error(state.metrics(), &error);
                    return;
                }
                self.commit_batch(state, reservation, header, now);
            }
            Receiving::Staging { header, staged, .. } => {
                if let Err(error) = wire::verify_payload(&header, &staged) {
                    state.give_back_staging(staged.len() as u64);
                    self.protocol_error(state.metrics(), &error);
                    return;
                }
                // Into the pool as soon as there is room (at once, unless it is full).
                publisher.receiving = Receiving::WaitingForRoom {
                    header,
                    full_since: None,
                    stalled: false,
                    staged: Some(staged),
                };
            }
            other => publisher.receiving = other,
        }
    }

    /// Publishes a filled and checked reservation and records the batch as in flight (the one
    /// record of it: the state keeps only where the decision on its slot goes).
    pub(super) fn commit_batch(
        &mut self,
        state: &mut BrokerState<M>,
        reservation: Reservation,
        header: BatchHeaderRepr,
        now: Timestamp,
    ) {
        let Peer::Publisher(publisher) = &mut self.role else {
            return;
        };
        let meta = BatchMeta {
            client_id: publisher.client_id,
            session_epoch: publisher.session_epoch,
            batch_seq: header.batch_seq,
            message_count: header.message_count,
            checksum: header.checksum,
            flags: 0,
        };
        let slot = match state.commit_batch(publisher.topic, reservation, meta, self.id) {
            Ok(slot) => slot,
            Err(moved) => return self.end_for_claim_moved(state, moved),
        };
        publisher.in_flight.push_back(InFlight {
            slot,
            batch_seq: header.batch_seq,
            message_count: header.message_count,
            received_at: now,
        });
        state.saw_batch_seq(
            publisher.client_id,
            publisher.session_epoch,
            header.batch_seq,
        );
        let metrics = state.metrics();
        Metrics::inc(&metrics.batches_received);
        metrics
            .bytes_received
            .fetch_add(u64::from(header.payload_bytes), Ordering::Relaxed);
    }

    /// Takes the sequencer's decision on this connection's oldest batch in flight. The
    /// pairing is checked in release builds too: a decision for another slot is a broker bug,
    /// reported (Internal) and counted, never applied to the wrong batch.
    pub fn on_outcome(&mut self, outcome: &RoutedOutcome, metrics: &Metrics, now: Timestamp) {
        let Peer::Publisher(publisher) = &mut self.role else {
            return;
        };
        let batch = match publisher.in_flight.pop_front() {
            Some(batch) if batch.slot == outcome.slot => batch,
            other => {
                log::error!(
                    "connection {}: the decision on slot {} paired with {other:?}",
                    self.id,
                    outcome.slot
                );
                Metrics::inc(&metrics.batches_dropped);
                let reason = "the broker lost track of a batch in flight";
                self.send_error(metrics, ErrorCode::Internal, None, reason);
                return;
            }
        };
        if publisher.ack == AckLevel::Replicated {
            // Decisions leave in order, each once the replicas hold it (see release_durable).
            publisher.durable_wait.push_back((*outcome, batch));
            return;
        }
        self.apply_outcome(outcome, batch, metrics, now);
    }

    /// Ack level 2: passes on, in order, the decisions whose batches the replicas now hold
    /// durably (and the rejections queued behind them). Returns whether any left.
    pub(super) fn release_durable(&mut self, state: &mut BrokerState<M>, now: Timestamp) -> bool {
        let Peer::Publisher(publisher) = &mut self.role else {
            return false;
        };
        if publisher.durable_wait.is_empty() {
            return false;
        }
        let durable = state.replicated_position(publisher.topic, publisher.replicas);
        let mut released = false;
        while let Peer::Publisher(publisher) = &mut self.role
            && let Some((outcome, batch)) = publisher.durable_wait.front().copied()
        {
            let waits = matches!(
                outcome.status,
                CompletionStatus::Ordered | CompletionStatus::Duplicate
            ) && outcome
                .global_start
                .is_some_and(|start| start + u64::from(batch.message_count) > durable);
            if waits {
                break;
            }
            publisher.durable_wait.pop_front();
            self.apply_outcome(&outcome, batch, state.metrics(), now);
            released = true;
        }
        released
    }

    /// True while decisions wait for replicas (the loop should look again soon).
    pub fn awaits_durability(&self) -> bool {
        matches!(&self.role, Peer::Publisher(p) if !p.durable_wait.is_empty())
    }

    pub(super) fn apply_outcome(
        &mut self,
        outcome: &RoutedOutcome,
        batch: InFlight,
        metrics: &Metrics,
        now: Timestamp,
    ) {
        let Peer::Publisher(publisher) = &mut self.role else {
            return;
        };
        if self.closing {
            // A closing Error (or our Goodbye) was the last frame: nothing follows it. The
            // batch is in the log all the same; a resend after reconnecting is deduplicated.
            return;
        }
        let global_start = if publisher.order == Order::Unordered {
            None
        } else {
            outcome.global_start
        };
        match outcome.status {
            CompletionStatus::Ordered | CompletionStatus::Duplicate => {
                Metrics::inc(&metrics.batches_acked);
                metrics.observe_ack_latency(now.saturating_duration_since(batch.received_at));
                publisher.ack_entries.push(AckEntry {
                    batch_seq: batch.batch_seq,
                    global_start,
                    message_count: batch.message_count,
                    status: if outcome.status == CompletionStatus::Ordered {
                        AckStatus::Ordered
                    } else {
                        AckStatus::Duplicate
                    },
                });
                publisher.acked_through = Some(batch.batch_seq);
                publisher.ack_dirty = true;
            }
            CompletionStatus::RejectedGap | CompletionStatus::RejectedOutsideWindow => {
                Metrics::inc(&metrics.batches_rejected);
                let reason = if outcome.status == CompletionStatus::RejectedGap {
                    "the sequencer gave up waiting for an earlier batch of this session and skipped this one: it is not in the log"
                } else {
                    "this batch is older than the session's deduplication window: an earlier copy may be in the log, and this one was not written"
                };
                // The Error must precede any Ack whose cumulative sequence covers the batch,
                // and the Goodbye owed after the last batch (sent by the next `flush_acks`).
                let batch_seq = batch.batch_seq;
                self.queue_acks();
                self.send_error(
                    metrics,
                    ErrorCode::SessionGapSkipped,
                    Some(batch_seq),
                    reason,
                );
                if let Peer::Publisher(publisher) = &mut self.role {
                    publisher.acked_through = Some(batch_seq);
                    publisher.ack_dirty = true;
                }
            }
            other => {
                let reason = format!(
                    "the sequencer rejected batch {} ({other:?})",
                    batch.batch_seq
                );
                self.send_error(metrics, ErrorCode::Internal, Some(batch.batch_seq), &reason);
            }
        }
    }

    /// Queues an Ack frame for the decisions taken since the last call (none for ack 0),
    /// and the Goodbye owed to a publisher that said goodbye once nothing is in flight.
    pub fn flush_acks(&mut self) {
        self.queue_acks();
        if let Peer::Publisher(publisher) = &self.role {
            if publisher.goodbye
                && publisher.in_flight.is_empty()
                && publisher.durable_wait.is_empty()
                && !self.closing
            {
                self.send_frame(&Frame::Goodbye);
                self.closing = true;
            }
        }
    }

    /// Queues Ack frames for the decisions taken since the last call (none for ack 0).
    pub(super) fn queue_acks(&mut self) {
        let Peer::Publisher(publisher) = &mut self.role else {
            return;
        };
        if self.closing {
            return;
        }
        if publisher.ack_dirty {
            publisher.ack_dirty = false;
            let entries = std::mem::take(&mut publisher.ack_entries);
            if publisher.ack != AckLevel::FireAndForget {
                let through = publisher.acked_through.expect("set with every entry");
                // At most 1024 entries a frame; every frame but the last acknowledges through
                // its own last entry, the last one through everything decided.
                let chunks: Vec<&[AckEntry]> = entries.chunks(wire::ACK_ENTRIES_MAX).collect();
                let frames = (0..chunks.len().max(1)).map(|i| match chunks.get(i) {
                    Some(chunk) if i + 1 < chunks.len() => {
                        AckRepr::new(chunk[chunk.len() - 1].batch_seq, chunk.to_vec())
                    }
                    Some(chunk) => AckRepr::new(through, chunk.to_vec()),
                    None => AckRepr::new(through, Vec::new()),
                });
                for frame in frames {
                    match frame {
                        Ok(ack) => self.output.push_frame(&Frame::Ack(ack)),
                        Err(e) => {
                            log::error!("connection {}: could not build an Ack: {e}", self.id)
                        }
                    }
                }
            }
        }
    }

    /// Another process holds this broker's id now, so nothing more may be written: the
    /// connection ends without acknowledging the batch it was receiving (its publisher
    /// resends it elsewhere), and the state tells the loop to end the broker.
    pub(super) fn end_for_claim_moved(&mut self, state: &mut BrokerState<M>, moved: ClaimMoved) {
        self.drop_batch(state);
        self.closing = true;
        state.record_claim_moved(moved);
    }

    /// Drops the batch being received, if any: its room in the pool or in staging is given
    /// back, and nothing of it is written.
    pub(super) fn drop_batch(&mut self, state: &mut BrokerState<M>) {
        let Peer::Publisher(publisher) = &mut self.role else {
            return;
        };
        let receiving = std::mem::replace(&mut publisher.receiving, Receiving::Idle);
        state.give_back_staging(receiving.staged_bytes());
        if let Receiving::Payload { reservation, .. } = receiving {
            state.abort_batch(publisher.topic, reservation);
        }
    }
}
