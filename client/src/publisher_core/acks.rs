//! Reconciling what the brokers answer (Acks, Error frames, Goodbye) with what was sent.

use std::net::SocketAddr;
use units::Timestamp;
use wire::{AckEntry, AckLevel, AckRepr, AckStatus, ErrorCode, ErrorFrameRepr, Frame, FrameKind};

use super::commands::{Command, ConnId};
use super::slot::{Batch, BatchState, Conn};
use super::{PublisherCore, PublisherEvent};
use crate::error::ClientError;

impl PublisherCore {
    /// A control frame received on connection `conn` at `now`.
    pub fn on_frame(&mut self, conn: ConnId, frame: Frame, now: Timestamp) {
        let Some(state) = self.conns.get_mut(&conn) else {
            return;
        };
        let addr = state.addr;
        if let Frame::Goodbye = frame {
            state.goodbye_received = true;
            if !state.goodbye_sent {
                // The broker is leaving: the connection is lost like any other.
                self.commands.push_back(Command::Close(conn));
                self.lose(conn, "unrequested Goodbye", now);
            }
            return;
        }
        if self.failure.is_some() {
            return;
        }
        match frame {
            Frame::Ack(ack) => self.on_ack(conn, &ack, now),
            Frame::Error(error) => self.on_error(conn, error, now),
            other => self.fail(ClientError::UnexpectedFrame {
                addr,
                got: other.kind(),
                expected: "Ack, Error or Goodbye",
            }),
        }
    }

    fn on_ack(&mut self, id: ConnId, ack: &AckRepr, now: Timestamp) {
        let conn = &self.conns[&id];
        let slot = conn.slot;
        let through = ack.acked_through_seq();
        let acked = self
            .check_ack(conn, through)
            .and_then(|()| self.complete_through(id, through, ack.entries(), now));
        if let Err(error) = acked {
            return self.fail(error);
        }
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.acked_through = Some(through);
        }
        self.after_progress(slot, now);
    }

    /// Whether a cumulative ack through `through` may arrive on `conn`: acks are expected at
    /// all, do not go backwards, and cover only batches sent on this connection.
    fn check_ack(&self, conn: &Conn, through: u64) -> Result<(), ClientError> {
        let addr = conn.addr;
        if self.ack == AckLevel::FireAndForget {
            return Err(ClientError::UnexpectedFrame {
                addr,
                got: FrameKind::Ack,
                expected: "no Ack at ack level 0",
            });
        }
        if let Some(previous) = conn.acked_through
            && through < previous
        {
            return Err(ClientError::AckRegressed {
                addr,
                previous,
                got: through,
            });
        }
        if conn.last_sent.is_none_or(|last| through > last) {
            return Err(ClientError::AckMismatch {
                addr,
                batch_seq: through,
                problem: "was never sent on this connection (acked_through_seq beyond its last batch)",
            });
        }
        Ok(())
    }

    /// Completes connection `id`'s batches up to `through`, each with its entry of the ack
    /// when it has one; every entry must name a batch that waits on this connection.
    fn complete_through(
        &mut self,
        id: ConnId,
        through: u64,
        entries: &[AckEntry],
        now: Timestamp,
    ) -> Result<(), ClientError> {
        let Some(&Conn { slot, addr, .. }) = self.conns.get(&id) else {
            return Ok(());
        };
        let mut entries = entries.iter().peekable();
        while let Some(batch) = self.conns.get_mut(&id).and_then(|c| c.pop_acked(through)) {
            if let Some(stray) = entries.next_if(|e| e.batch_seq < batch.seq) {
                return Err(unmatched(addr, stray));
            }
            let entry = entries.next_if(|e| e.batch_seq == batch.seq);
            match (batch.state, entry) {
                (BatchState::Pending, entry) => self.complete(slot, addr, batch, entry, now)?,
                (BatchState::Rejected, None) => {}
                (BatchState::Rejected, Some(entry)) => {
                    return Err(ClientError::AckMismatch {
                        addr,
                        batch_seq: entry.batch_seq,
                        problem: "was reported as SessionGapSkipped before",
                    });
                }
            }
        }
        match entries.next() {
            Some(stray) => Err(unmatched(addr, stray)),
            None => Ok(()),
        }
    }

    fn complete(
        &mut self,
        slot: usize,
        addr: SocketAddr,
        batch: Batch,
        entry: Option<&AckEntry>,
        now: Timestamp,
    ) -> Result<(), ClientError> {
        if let Some(entry) = entry
            && entry.message_count != batch.message_count
        {
            return Err(ClientError::AckMismatch {
                addr,
                batch_seq: batch.seq,
                problem: "has a different message count in its ack entry than was sent",
            });
        }
        self.window
            .on_acked(batch.message_bytes, self.slots.len(), now);
        let latency_us = now.saturating_duration_since(batch.sealed_at).as_micros() as u64;
        self.latency_us.saturating_record(latency_us.max(1));
        let counters = &mut self.counters;
        counters.batches_acked += 1;
        counters.messages_acked += u64::from(batch.message_count);
        counters.bytes_acked += batch.message_bytes;
        let duplicate = entry.is_some_and(|e| e.status == AckStatus::Duplicate);
        counters.batches_duplicate += u64::from(duplicate);
        let global_start = entry.and_then(|e| e.global_start);
        counters.batches_unpositioned += u64::from(global_start.is_none());
        if self.report_acks {
            self.events.push_back(PublisherEvent::Acked {
                batch_seq: batch.seq,
                first_message_index: batch.first_message_index,
                message_count: batch.message_count,
                global_start,
                duplicate,
                latency_us,
                acked_at: now,
            });
        }
        self.finish(slot, batch);
        Ok(())
    }

    fn on_error(&mut self, id: ConnId, error: ErrorFrameRepr, now: Timestamp) {
        let addr = self.conns[&id].addr;
        match error.code {
            ErrorCode::PoolFull => {
                log::info!(
                    "{addr}: pool full, broker applies backpressure: {}",
                    error.reason()
                );
                self.events.push_back(PublisherEvent::PoolFull {
                    broker: addr,
                    reason: error.reason().to_owned(),
                });
            }
            ErrorCode::SessionGapSkipped => match error.batch_seq {
                Some(seq) => self.on_gap_skipped(addr, seq, error.reason(), now),
                None => self.fail(ClientError::broker(addr, &error)),
            },
            // A batch slower than the broker's minimum rate (a lossy link can delay one past
            // it): the broker dropped it unwritten and closes the connection. Like a reset,
            // the connection's batches are resent on another (at most `resends_max` times).
            ErrorCode::DeadlineExpired if error.batch_seq.is_some() => {
                let how = ClientError::broker(addr, &error).to_string();
                self.commands.push_back(Command::Close(id));
                self.lose(id, &how, now);
            }
            _ => self.fail(ClientError::broker(addr, &error)),
        }
    }

    /// `SessionGapSkipped` names a batch of this session, which is looked up in the slot it
    /// was assigned to (on any of the slot's connections, or in its queue).
    fn on_gap_skipped(&mut self, addr: SocketAddr, seq: u64, reason: &str, now: Timestamp) {
        if seq < self.first_seq || seq >= self.next_seq {
            return self.fail(ClientError::AckMismatch {
                addr,
                batch_seq: seq,
                problem: "was never sent (named by SessionGapSkipped)",
            });
        }
        if !self.rejected.insert(seq) {
            // The protocol repeats the report when the skipped batch arrives late.
            log::debug!("{addr}: batch {seq} reported as SessionGapSkipped again");
            return;
        }
        let slot = self.slot_of(seq);
        let found = match self.take_rejected(slot, seq) {
            Some(found) => Some(found),
            None if self.ack == AckLevel::FireAndForget => None,
            None => {
                return self.fail(ClientError::AckMismatch {
                    addr,
                    batch_seq: seq,
                    problem: "was acknowledged before and is now reported as SessionGapSkipped",
                });
            }
        };
        log::warn!("{addr}: batch {seq} was not ordered (SessionGapSkipped): {reason}");
        let (first_message_index, message_count) = found.unzip();
        self.counters.batches_rejected += 1;
        self.counters.messages_rejected += u64::from(message_count.unwrap_or(0));
        self.events.push_back(PublisherEvent::Rejected {
            batch_seq: seq,
            first_message_index,
            message_count,
            broker: addr,
            reason: reason.to_owned(),
        });
        self.after_progress(slot, now);
    }

    /// Marks pending batch `seq` of `slot` rejected; returns its first message index and
    /// message count.
    fn take_rejected(&mut self, slot: usize, seq: u64) -> Option<(u64, u32)> {
        let on_connection = self
            .conns
            .values_mut()
            .filter(|c| c.slot == slot)
            .find_map(|c| {
                c.in_flight
                    .iter_mut()
                    .find(|b| b.seq == seq && b.state == BatchState::Pending)
            });
        if let Some(batch) = on_connection {
            batch.state = BatchState::Rejected;
            Self::count_sent(&mut self.counters, batch);
            let found = (batch.first_message_index, batch.message_count);
            self.slots[slot].outstanding -= 1;
            return Some(found);
        }
        let queue = &mut self.slots[slot].queue;
        let index = queue.iter().position(|b| b.seq == seq)?;
        let batch = queue.remove(index)?;
        let found = (batch.first_message_index, batch.message_count);
        self.finish(slot, batch);
        Some(found)
    }
}

fn unmatched(addr: SocketAddr, entry: &AckEntry) -> ClientError {
    ClientError::AckMismatch {
        addr,
        batch_seq: entry.batch_seq,
        problem: "is not awaiting an ack on this connection",
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use wire::{HelloOkRepr, Order};

    use super::super::test_support::*;
    use super::*;

    #[test]
    fn cumulative_acks_with_entries_complete_batches() {
        let mut core = Setup::default().core();
        let t0 = Timestamp::ZERO;
        publish_batches(&mut core, 5, t0);
        transmitted(&mut core);
        let t1 = t0 + Duration::from_micros(250);
        core.on_frame(
            0,
            ack(
                2,
                vec![
                    entry(0, Some(100), 1),
                    entry(1, Some(101), 1),
                    entry(2, Some(102), 1),
                ],
            ),
            t1,
        );
        assert_eq!(core.outstanding_batches(), 2);
        let stats = core.stats();
        assert_eq!(
            (stats.batches_acked, stats.messages_acked, stats.bytes_acked),
            (3, 3, 30)
        );
        assert_eq!(stats.ack_latency_us.count, 3);
        assert!((249..=251).contains(&stats.ack_latency_us.p50), "{stats:?}");
        // Batch 3 without an entry is acknowledged without a position; batch 4 is a duplicate.
        let duplicate = AckEntry {
            status: AckStatus::Duplicate,
            ..entry(4, Some(7), 1)
        };
        core.on_frame(0, ack(4, vec![duplicate]), t1);
        assert!(core.is_flushed());
        let stats = core.stats();
        assert_eq!(stats.batches_acked, 5);
        assert_eq!(stats.batches_unpositioned, 1);
        assert_eq!(stats.batches_duplicate, 1);
        let events = core.take_events();
        assert_eq!(events.len(), 5);
        assert_eq!(
            events[1],
            PublisherEvent::Acked {
                batch_seq: 1,
                first_message_index: 1,
                message_count: 1,
                global_start: Some(101),
                duplicate: false,
                latency_us: 250,
                acked_at: t1,
            }
        );
        assert!(matches!(
            events[4],
            PublisherEvent::Acked {
                duplicate: true,
                ..
            }
        ));
        // A repeated cumulative ack with no entries changes nothing.
        core.on_frame(0, ack(4, vec![]), t1);
        assert!(core.failure().is_none());
    }

    #[test]
    fn acks_are_per_connection() {
        let now = Timestamp::ZERO;
        let mut core = two_brokers_with_batches(4, now);
        // Connection 1 carries batches 1 and 3; "through 3" on it leaves 0 and 2 alone.
        core.on_frame(
            1,
            ack(3, vec![entry(1, Some(0), 1), entry(3, Some(1), 1)]),
            now,
        );
        assert_eq!((core.in_flight(0), core.in_flight(1)), (2, 0));
        core.on_frame(
            0,
            ack(2, vec![entry(0, Some(2), 1), entry(2, Some(3), 1)]),
            now,
        );
        assert!(core.is_flushed());
        assert!(core.failure().is_none());
    }

    fn failed_after(frames: Vec<(ConnId, Frame)>) -> ClientError {
        let now = Timestamp::ZERO;
        let mut core = two_brokers_with_batches(4, now);
        for (connection, frame) in frames {
            core.on_frame(connection, frame, now);
        }
        let failure = core
            .failure()
            .cloned()
            .expect("the core should have failed");
        // Every later call reports the same failure.
        let again = core.publish(MESSAGE, now).unwrap_err();
        assert_eq!(again.to_string(), failure.to_string());
        failure
    }

    #[test]
    fn inconsistent_acks_fail_the_publisher() {
        // Entry for batch 1, which went to connection 1, arriving on connection 0.
        let error = failed_after(vec![(0, ack(1, vec![entry(1, Some(0), 1)]))]);
        assert!(
            matches!(error, ClientError::AckMismatch { batch_seq: 1, .. }),
            "{error}"
        );
        // Cumulative ack beyond the last batch sent.
        let error = failed_after(vec![(0, ack(9, vec![]))]);
        assert!(
            matches!(error, ClientError::AckMismatch { batch_seq: 9, .. }),
            "{error}"
        );
        // Going backwards.
        let error = failed_after(vec![(0, ack(2, vec![])), (0, ack(0, vec![]))]);
        assert!(matches!(
            error,
            ClientError::AckRegressed {
                previous: 2,
                got: 0,
                ..
            }
        ));
        // Message count differing from what was sent.
        let error = failed_after(vec![(0, ack(0, vec![entry(0, Some(0), 2)]))]);
        assert!(
            error.to_string().contains("different message count"),
            "{error}"
        );
        // A frame a broker does not send after the handshake.
        let hello_ok = Frame::HelloOk(HelloOkRepr {
            broker_id: 0,
            batch_bytes_max: 1024,
            order: Order::Total,
            ack: AckLevel::Ordered,
            next_batch_seq: 0,
            log_start: 0,
            log_end: 0,
        });
        let error = failed_after(vec![(0, hello_ok)]);
        assert!(matches!(
            error,
            ClientError::UnexpectedFrame {
                got: FrameKind::HelloOk,
                ..
            }
        ));
    }

    #[test]
    fn closing_error_frames_fail_with_their_code() {
        let error = failed_after(vec![(1, error(ErrorCode::ChecksumMismatch, Some(3)))]);
        assert_eq!(error.broker_code(), Some(ErrorCode::ChecksumMismatch));
        assert_eq!(
            error.to_string(),
            "127.0.0.1:9001 refused: checksum mismatch (7) for batch 3: test reason"
        );
    }

    #[test]
    fn a_batch_past_its_deadline_is_resent_on_a_new_connection() {
        let mut core = Setup::default().core();
        let now = Timestamp::ZERO;
        publish_batches(&mut core, 2, now);
        let sent = transmitted(&mut core);
        core.on_frame(0, error(ErrorCode::DeadlineExpired, Some(1)), now);
        assert!(core.failure().is_none(), "{:?}", core.failure());
        assert_eq!(core.stats().connections_lost, 1);
        let handed_out = commands(&mut core);
        assert!(
            matches!(handed_out[0], Command::Close(0)),
            "the broker's closing connection is closed here too: {handed_out:?}"
        );
        let request = connects(&handed_out).remove(0);
        let id = core
            .on_connected(0, request.attempt, addr(0), &hello_ok(0), now)
            .unwrap();
        let resent = transmitted(&mut core);
        assert_eq!(
            resent.iter().map(|t| t.seq).collect::<Vec<_>>(),
            [0, 1],
            "both unacknowledged batches, in order"
        );
        assert!(resent.iter().zip(&sent).all(|(r, s)| r.bytes == s.bytes));
        core.on_frame(
            id,
            ack(1, vec![entry(0, Some(0), 1), entry(1, Some(1), 1)]),
            now,
        );
        assert!(core.is_flushed() && core.failure().is_none());
        assert_eq!(core.stats().batches_resent, 2);

        // Without a batch (a handshake past its deadline) it still fails the publisher.
        let error = failed_after(vec![(0, error(ErrorCode::DeadlineExpired, None))]);
        assert_eq!(error.broker_code(), Some(ErrorCode::DeadlineExpired));
    }

    #[test]
    fn pool_full_is_only_a_notice() {
        let mut core = Setup::default().core();
        core.on_frame(0, error(ErrorCode::PoolFull, None), Timestamp::ZERO);
        assert!(core.failure().is_none());
        assert!(matches!(
            core.take_events()[..],
            [PublisherEvent::PoolFull { .. }]
        ));
    }

    #[test]
    fn session_gap_skipped_rejects_the_batch_and_keeps_going() {
        let mut core = Setup {
            connections: 2,
            batch_bytes_max: 2 * ONE,
            ..Setup::default()
        }
        .core();
        let now = Timestamp::ZERO;
        // Four batches of two messages: 0 and 2 on connection 0, 1 and 3 on connection 1.
        for _ in 0..8 {
            core.publish(MESSAGE, now).unwrap();
        }
        core.seal(now).unwrap();
        assert_eq!(transmitted(&mut core).len(), 4);
        // Batch 2 (connection 0) is reported on connection 1, where the sequencer noticed.
        core.on_frame(1, error(ErrorCode::SessionGapSkipped, Some(2)), now);
        assert!(core.failure().is_none());
        assert_eq!(core.in_flight(0), 1, "the rejected batch left the window");
        let events = core.take_events();
        assert!(matches!(
            &events[..],
            [PublisherEvent::Rejected {
                batch_seq: 2,
                first_message_index: Some(4),
                message_count: Some(2),
                ..
            }]
        ));
        // The late arrival of batch 2 is reported again: not counted twice.
        core.on_frame(0, error(ErrorCode::SessionGapSkipped, Some(2)), now);
        let stats = core.stats();
        assert_eq!((stats.batches_rejected, stats.messages_rejected), (1, 2));
        // The cumulative ack passes the rejected batch without an entry for it.
        core.on_frame(0, ack(2, vec![entry(0, Some(0), 2)]), now);
        core.on_frame(
            1,
            ack(3, vec![entry(1, Some(2), 2), entry(3, Some(4), 2)]),
            now,
        );
        assert!(core.is_flushed(), "acked or rejected: nothing outstanding");
        assert!(core.failure().is_none());
        assert_eq!(core.stats().messages_acked, 6);
    }

    #[test]
    fn session_gap_skipped_for_impossible_batches_fails() {
        let error = failed_after(vec![(
            0,
            self::error(ErrorCode::SessionGapSkipped, Some(99)),
        )]);
        assert!(error.to_string().contains("never sent"), "{error}");
        let error = failed_after(vec![
            (0, ack(0, vec![entry(0, Some(0), 1)])),
            (0, self::error(ErrorCode::SessionGapSkipped, Some(0))),
        ]);
        assert!(error.to_string().contains("acknowledged before"), "{error}");
        // An entry for a batch reported as skipped.
        let error = failed_after(vec![
            (1, self::error(ErrorCode::SessionGapSkipped, Some(0))),
            (0, ack(0, vec![entry(0, Some(0), 1)])),
        ]);
        assert!(
            error.to_string().contains("SessionGapSkipped before"),
            "{error}"
        );
    }
}
