//! Publishing: messages into the open batch, sealed batches into their slot's queue, and the
//! queue onto the slot's connection.

use std::sync::Arc;
use units::Timestamp;
use wire::AckLevel;

use super::commands::{Command, ConnId, Transmit};
use super::slot::{Batch, BatchState};
use super::{Counters, PublisherCore};
use crate::error::ClientError;

impl PublisherCore {
    /// Appends a message to the open batch, sealing the batch first when the message does
    /// not fit and afterwards when the linger time has passed. Returns
    /// [`ClientError::WouldBlock`] without taking the message when a seal is needed and the
    /// next slot's window is full (or the session is rolling over).
    pub fn publish(&mut self, message: &[u8], now: Timestamp) -> Result<(), ClientError> {
        self.check_failed()?;
        if !self.batcher.fits_alone(message.len()) {
            return Err(ClientError::MessageTooLarge {
                message_bytes: message.len(),
                batch_bytes_max: self.batcher.batch_bytes_max(),
            });
        }
        if !self.batcher.fits(message.len()) {
            self.seal(now)?;
        }
        self.batcher.push(message, now);
        self.counters.messages_published += 1;
        self.poll(now);
        Ok(())
    }

    /// Seals the open batch if its linger time has passed and the next window has room, and
    /// runs the timers ([`tick`](Self::tick)) when one is due.
    pub fn poll(&mut self, now: Timestamp) {
        if self.next_timer.is_some_and(|at| at <= now) {
            self.tick(now);
        }
        if self.batcher.linger_expired(now) && !self.rolling {
            if self.in_flight(self.next_slot()) < self.window.current() {
                // With room in the window, seal() fails only on an earlier failure, which
                // every later call reports anyway.
                let _ = self.seal(now);
            } else {
                self.window.on_held(now);
            }
        }
    }

    /// Seals the open batch now (if it holds messages) and queues it for its slot.
    pub fn seal(&mut self, now: Timestamp) -> Result<(), ClientError> {
        self.check_failed()?;
        if self.batcher.is_empty() {
            return Ok(());
        }
        if self.next_seq >= self.session_batches_max {
            self.rolling = true;
            self.maybe_roll_over(now);
            self.check_failed()?;
        }
        let slot = self.next_slot();
        let in_flight_batches = self.in_flight(slot);
        if self.rolling || in_flight_batches >= self.window.current() {
            if !self.rolling {
                self.window.on_held(now);
            }
            return Err(ClientError::WouldBlock {
                connection: slot,
                in_flight_batches,
                in_flight_batches_max: self.window.current(),
            });
        }
        let Some(sealed) = self.batcher.seal(self.next_seq, slot) else {
            return Ok(());
        };
        self.window.on_sealed(now);
        self.next_seq += 1;
        self.counters.batches_sealed += 1;
        let state = &mut self.slots[slot];
        state.batches_sealed += 1;
        state.outstanding += 1;
        state.queue.push_back(Batch {
            seq: sealed.seq,
            message_count: sealed.message_count,
            message_bytes: sealed.message_bytes,
            first_message_index: sealed.first_message_index,
            sealed_at: now,
            bytes: Arc::new(sealed.bytes),
            sends: 0,
            counted: false,
            state: BatchState::Pending,
        });
        self.pump(slot);
        Ok(())
    }

    /// Hands the slot's queue to its connection, unless the slot waits to move home.
    pub(super) fn pump(&mut self, slot: usize) {
        let state = &mut self.slots[slot];
        let Some(id) = state.conn else {
            return;
        };
        if state.parked.is_some() || state.queue.is_empty() {
            return;
        }
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        while let Some(mut batch) = state.queue.pop_front() {
            if batch.sends > self.resends_max {
                let error = ClientError::ResendLimit {
                    batch_seq: batch.seq,
                    resends_max: self.resends_max,
                };
                state.queue.push_front(batch);
                self.fail(error);
                return;
            }
            self.counters.batches_resent += u64::from(batch.sends > 0);
            batch.sends += 1;
            conn.last_sent = Some(batch.seq);
            self.commands.push_back(Command::Transmit(Transmit {
                conn: id,
                seq: batch.seq,
                bytes: Arc::clone(&batch.bytes),
            }));
            conn.in_flight.push_back(batch);
        }
    }

    /// Counts a batch as sent, the first time it is known to have been written completely.
    pub(super) fn count_sent(counters: &mut Counters, batch: &mut Batch) {
        if !batch.counted {
            batch.counted = true;
            counters.batches_sent += 1;
            counters.messages_sent += u64::from(batch.message_count);
            counters.bytes_sent += batch.message_bytes;
        }
    }

    /// A batch is done: out of its slot's window, counted as sent (it reached the broker,
    /// whichever write did it), its buffer back for reuse.
    pub(super) fn finish(&mut self, slot: usize, mut batch: Batch) {
        Self::count_sent(&mut self.counters, &mut batch);
        self.slots[slot].outstanding -= 1;
        if let Ok(buffer) = Arc::try_unwrap(batch.bytes) {
            self.batcher.recycle(buffer);
        }
    }

    /// The writer wrote batch `seq` completely to connection `conn`. At ack 0 this is what
    /// completes the batch.
    pub fn on_written(&mut self, conn: ConnId, seq: u64, now: Timestamp) {
        let Some(state) = self.conns.get_mut(&conn) else {
            return;
        };
        if self.ack != AckLevel::FireAndForget {
            if let Ok(index) = state.in_flight.binary_search_by_key(&seq, |b| b.seq) {
                Self::count_sent(&mut self.counters, &mut state.in_flight[index]);
            }
            return;
        }
        // Batches reach a connection's socket in the order they were handed to it.
        if state.in_flight.front().is_some_and(|b| b.seq == seq)
            && let Some(batch) = state.in_flight.pop_front()
        {
            let slot = state.slot;
            self.finish(slot, batch);
            self.after_progress(slot, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use wire::{Decoded, FrameDecoder, FrameKind, Limits, verify_payload};

    use super::super::test_support::*;
    use super::*;

    #[test]
    fn sealed_batches_are_valid_frames_in_sequence() {
        let mut core = Setup {
            batch_bytes_max: 3 * ONE,
            ..Setup::default()
        }
        .core();
        let now = Timestamp::ZERO;
        for _ in 0..7 {
            core.publish(MESSAGE, now).unwrap();
        }
        core.seal(now).unwrap();
        let batches = transmitted(&mut core);
        let counts: Vec<u32> = batches.iter().map(message_count).collect();
        assert_eq!(counts, [3, 3, 1]);
        for (index, batch) in batches.iter().enumerate() {
            let mut decoder = FrameDecoder::new(Limits::default());
            let Ok((40, Decoded::Batch(header))) = decoder.decode(&batch.bytes) else {
                panic!("batch {index} does not start with a batch prefix");
            };
            assert_eq!(header.batch_seq, index as u64);
            verify_payload(&header, &batch.bytes[40..]).unwrap();
        }
    }

    #[test]
    fn size_seals_before_the_message_that_would_overflow() {
        let mut core = Setup {
            batch_bytes_max: 2 * ONE + 3,
            ..Setup::default()
        }
        .core();
        let now = Timestamp::ZERO;
        core.publish(MESSAGE, now).unwrap();
        core.publish(MESSAGE, now).unwrap();
        assert!(transmitted(&mut core).is_empty(), "two messages fit");
        core.publish(MESSAGE, now).unwrap();
        let sealed = transmitted(&mut core);
        assert_eq!(sealed.len(), 1);
        assert_eq!(message_count(&sealed[0]), 2);
        assert_eq!(sealed[0].bytes.len(), 40 + 2 * ONE);
        assert!(
            !core.is_flushed(),
            "the third message waits in the open batch"
        );
    }

    #[test]
    fn linger_seals_on_publish_and_poll_with_injected_time() {
        let mut core = Setup {
            batch_bytes_max: 100 * ONE,
            linger_us: 500,
            ..Setup::default()
        }
        .core();
        let t0 = Timestamp::ZERO;
        core.publish(MESSAGE, t0).unwrap();
        assert_eq!(
            core.linger_deadline(),
            Some(t0 + Duration::from_micros(500))
        );
        core.poll(t0 + Duration::from_micros(499));
        assert!(transmitted(&mut core).is_empty());
        core.poll(t0 + Duration::from_micros(500));
        assert_eq!(transmitted(&mut core).len(), 1);
        assert_eq!(core.linger_deadline(), None);

        // A publish after the linger time seals the batch including that message.
        let t1 = t0 + Duration::from_millis(1);
        core.publish(MESSAGE, t1).unwrap();
        core.publish(MESSAGE, t1 + Duration::from_micros(600))
            .unwrap();
        let sealed = transmitted(&mut core);
        assert_eq!(sealed.len(), 1);
        assert_eq!(message_count(&sealed[0]), 2);
    }

    #[test]
    fn linger_zero_seals_every_message() {
        let mut core = Setup {
            batch_bytes_max: 100 * ONE,
            linger_us: 0,
            ..Setup::default()
        }
        .core();
        publish_batches(&mut core, 3, Timestamp::ZERO);
        let counts: Vec<u32> = transmitted(&mut core).iter().map(message_count).collect();
        assert_eq!(counts, [1, 1, 1]);
    }

    #[test]
    fn batches_go_round_robin_over_all_connections() {
        let mut core = Setup {
            connections: 3,
            ..Setup::default()
        }
        .core();
        publish_batches(&mut core, 8, Timestamp::ZERO);
        let batches = transmitted(&mut core);
        assert_eq!(
            seqs_and_connections(&batches),
            [
                (0, 0),
                (1, 1),
                (2, 2),
                (3, 0),
                (4, 1),
                (5, 2),
                (6, 0),
                (7, 1)
            ]
        );
        assert_eq!(core.stats().batches_per_connection, [3, 3, 2]);
    }

    #[test]
    fn numbering_starts_at_the_resumed_sequence() {
        let mut core = Setup {
            connections: 2,
            first_seq: 10,
            ..Setup::default()
        }
        .core();
        publish_batches(&mut core, 3, Timestamp::ZERO);
        assert_eq!(
            seqs_and_connections(&transmitted(&mut core)),
            [(10, 0), (11, 1), (12, 0)]
        );
    }

    #[test]
    fn full_window_gives_would_block_and_keeps_the_message_out() {
        let mut core = Setup {
            connections: 2,
            window: 2,
            ..Setup::default()
        }
        .core();
        let now = Timestamp::ZERO;
        // Batches 0..3 fill both windows (one message per batch); message 5 opens a batch.
        for _ in 0..5 {
            core.publish(MESSAGE, now).unwrap();
        }
        assert_eq!(transmitted(&mut core).len(), 4);
        assert_eq!((core.in_flight(0), core.in_flight(1)), (2, 2));
        let error = core.publish(MESSAGE, now).unwrap_err();
        assert!(matches!(
            error,
            ClientError::WouldBlock {
                connection: 0,
                in_flight_batches: 2,
                in_flight_batches_max: 2,
            }
        ));
        assert_eq!(
            core.stats().messages_published,
            5,
            "the message was not taken"
        );
        assert!(core.seal(now).unwrap_err().is_would_block());

        // An ack on connection 0 frees one slot: the open batch goes out as seq 4.
        core.on_frame(0, ack(0, vec![entry(0, Some(0), 1)]), now);
        core.publish(MESSAGE, now).unwrap();
        assert_eq!(seqs_and_connections(&transmitted(&mut core)), [(4, 0)]);
        assert_eq!(core.stats().messages_published, 6);
        // The next batch belongs to connection 1, still full.
        assert!(core.seal(now).unwrap_err().is_would_block());
        assert!(core.failure().is_none());
    }

    #[test]
    fn ack_level_zero_completes_on_write_and_refuses_acks() {
        let mut core = Setup {
            ack: AckLevel::FireAndForget,
            window: 1,
            ..Setup::default()
        }
        .core();
        let now = Timestamp::ZERO;
        core.publish(MESSAGE, now).unwrap();
        core.publish(MESSAGE, now).unwrap();
        assert!(core.publish(MESSAGE, now).unwrap_err().is_would_block());
        let batch = transmitted(&mut core).remove(0);
        core.on_written(0, batch.seq, now);
        assert_eq!(core.in_flight(0), 0);
        let stats = core.stats();
        assert_eq!(
            (stats.batches_sent, stats.messages_sent, stats.bytes_sent),
            (1, 1, 10)
        );
        assert_eq!(stats.batches_acked, 0);
        core.publish(MESSAGE, now).unwrap();
        core.on_frame(0, ack(0, vec![]), now);
        assert!(matches!(
            core.failure(),
            Some(ClientError::UnexpectedFrame {
                got: FrameKind::Ack,
                ..
            })
        ));
    }

    #[test]
    fn flush_state_follows_the_open_batch_and_outstanding_acks() {
        let mut core = Setup {
            batch_bytes_max: 10 * ONE,
            ..Setup::default()
        }
        .core();
        let now = Timestamp::ZERO;
        assert!(core.is_flushed());
        core.publish(MESSAGE, now).unwrap();
        assert!(!core.is_flushed(), "a message in the open batch");
        core.seal(now).unwrap();
        assert!(!core.is_flushed(), "a batch awaiting its ack");
        assert_eq!(core.outstanding_batches(), 1);
        core.on_frame(0, ack(0, vec![entry(0, Some(0), 1)]), now);
        assert!(core.is_flushed());
        // Sealing an empty batch is a no-op.
        core.seal(now).unwrap();
        assert_eq!(transmitted(&mut core).len(), 1);
        assert!(core.take_command().is_none());
    }

    #[test]
    fn oversized_messages_are_refused() {
        let mut core = Setup::default().core();
        let error = core.publish(&[0; ONE], Timestamp::ZERO).unwrap_err();
        assert_eq!(
            error.to_string(),
            "message of 14 bytes plus its 4-byte length prefix exceeds the batch limit of 14 bytes"
        );
        assert!(core.failure().is_none());
    }
}
