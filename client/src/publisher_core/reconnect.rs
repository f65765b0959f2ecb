//! Keeping every slot connected: a lost connection's batches go back in line for a resend,
//! a replacement is asked for (other brokers first), an away slot probes its home broker and
//! moves back once drained, and a session that used its sequences rolls over to the next
//! epoch. The timers (connection attempts with backoff, the give-up deadline) run here.

use std::net::SocketAddr;
use std::time::Duration;

use units::Timestamp;
use wire::HelloOkRepr;

use super::PublisherCore;
use super::commands::{Command, ConnId, ConnectRequest};
use super::slot::{Batch, BatchState, Conn, Slot};
use crate::error::{ClientError, whole_ms};

/// First wait before another connection attempt for a slot.
pub(super) const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(20);
/// Longest wait between connection attempts for a slot.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Longest a slot waiting to move home stops taking batches for its away connection to
/// drain. The wait can depend on itself: at order 5 the sequencer holds the other slots'
/// later batches until this slot's next one arrives, a held batch keeps its ring slot, and
/// the broker passes decisions on in ring order, so the away connection's acks can wait for
/// the very batch the slot holds back. Past this the slot stays away (its parked home
/// connection says Goodbye) and probes home again after its backoff.
pub(super) const PARK_DRAIN_MAX: Duration = Duration::from_millis(100);

/// Why a slot wants a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// It has none: its connection failed.
    Replacement,
    /// It has none: a new session epoch started.
    NewSession,
    /// Its connection is on another broker: probe the home broker.
    Home,
}

impl PublisherCore {
    /// Connection `conn`'s stream ended: `None` at a clean end of stream, else the error.
    /// Unless it was finished (Goodbye exchanged) the connection is lost: its unacknowledged
    /// batches go back to their slot for a resend. A broker that broke the protocol (bytes
    /// or frames it must not send) fails the publisher instead.
    pub fn on_connection_ended(
        &mut self,
        conn: ConnId,
        error: Option<ClientError>,
        now: Timestamp,
    ) {
        let how = match error {
            Some(
                violation @ (ClientError::Protocol { .. } | ClientError::UnexpectedFrame { .. }),
            ) if self.conns.contains_key(&conn) => {
                let how = violation.to_string();
                self.fail(violation);
                how
            }
            Some(error) => error.to_string(),
            None => "end of stream".to_owned(),
        };
        self.lose(conn, &how, now);
    }

    /// Forgets connection `id`; its batches not yet done go back to the front of its slot's
    /// queue, and the slot asks for a replacement if it was the slot's current connection.
    pub(super) fn lose(&mut self, id: ConnId, how: &str, now: Timestamp) {
        let Some(conn) = self.conns.remove(&id) else {
            return;
        };
        self.commands
            .retain(|c| !matches!(c, Command::Transmit(t) if t.conn == id));
        if self.closing {
            return;
        }
        let slot = conn.slot;
        let mut back: Vec<Batch> = conn
            .in_flight
            .into_iter()
            .filter(|b| b.state == BatchState::Pending)
            .collect();
        let state = &mut self.slots[slot];
        if state.conn == Some(id) {
            self.counters.connections_lost += 1;
            log::warn!(
                "{}: connection of slot {slot} lost ({how}); {} unacknowledged batches go to another connection",
                conn.addr,
                back.len()
            );
            state.conn = None;
            state.lost = Some(conn.addr);
            state.retry_at = None;
        } else if state.parked == Some(id) {
            state.parked = None;
            state.parked_at = None;
        } else if !conn.goodbye_sent {
            log::debug!("{}: connection {id} ended ({how})", conn.addr);
        }
        if !back.is_empty() {
            back.extend(state.queue.drain(..));
            back.sort_by_key(|b| b.seq);
            state.queue = back.into();
        }
        self.maybe_move_home(slot);
        self.pump(slot);
        self.tick(now);
    }

    /// The connection attempt `attempt` of `slot` opened a connection to `addr`. Returns the
    /// id it gets, or `None` when it is not wanted (then the adapter says Goodbye and closes
    /// it).
    pub fn on_connected(
        &mut self,
        slot: usize,
        attempt: u64,
        addr: SocketAddr,
        hello_ok: &HelloOkRepr,
        now: Timestamp,
    ) -> Option<ConnId> {
        if !self.end_attempt(slot, attempt) || !self.wants_connection(slot, addr) {
            return None;
        }
        if let Err(error) = self.check_hello_ok(addr, hello_ok) {
            self.fail(error);
            return None;
        }
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(id, Conn::new(slot, addr));
        self.adopt(slot, id, addr, now);
        self.maybe_move_home(slot);
        self.pump(slot);
        self.tick(now);
        Some(id)
    }

    /// Ends attempt `attempt` of `slot` with a connection, if it is the one in progress and
    /// the publisher still takes connections.
    fn end_attempt(&mut self, slot: usize, attempt: u64) -> bool {
        if self.closing || self.failure.is_some() {
            return false;
        }
        let Some(state) = self.slots.get_mut(slot) else {
            return false;
        };
        if state.attempt != Some(attempt) {
            return false;
        }
        state.attempt = None;
        state.backoff = RECONNECT_BACKOFF_MIN;
        true
    }

    /// Whether `slot` takes a new connection to `addr`: it has none, or `addr` is its home
    /// broker while it is away (and not already waiting to move home).
    fn wants_connection(&self, slot: usize, addr: SocketAddr) -> bool {
        let state = &self.slots[slot];
        match (state.conn, state.parked) {
            (None, _) => true,
            (Some(current), None) => {
                addr == state.home && self.conns.get(&current).is_some_and(|c| c.addr != addr)
            }
            (Some(_), Some(_)) => false,
        }
    }

    /// A new connection of this session must not know later batches than were sealed (else
    /// another client uses this client id and epoch) and must take the batches as built.
    fn check_hello_ok(&self, addr: SocketAddr, hello_ok: &HelloOkRepr) -> Result<(), ClientError> {
        if hello_ok.next_batch_seq > self.next_seq {
            return Err(ClientError::HandshakeMismatch {
                addr,
                field: "next_batch_seq (another client uses this client id and epoch)",
                asked: self.next_seq,
                got: hello_ok.next_batch_seq,
            });
        }
        if (hello_ok.batch_bytes_max as usize) < self.batcher.batch_bytes_max() {
            return Err(ClientError::HandshakeMismatch {
                addr,
                field: "batch_bytes_max (below the limit the batches were built for)",
                asked: self.batcher.batch_bytes_max() as u64,
                got: u64::from(hello_ok.batch_bytes_max),
            });
        }
        Ok(())
    }

    /// Gives connection `id` to `slot`: as its current connection when it has none, else
    /// parked until the away connection drains.
    fn adopt(&mut self, slot: usize, id: ConnId, addr: SocketAddr, now: Timestamp) {
        let state = &mut self.slots[slot];
        if state.new_session {
            state.new_session = false;
        } else {
            self.counters.reconnects += 1;
        }
        if state.conn.is_none() {
            log::info!("{addr}: slot {slot} connected (connection {id})");
            state.conn = Some(id);
            state.lost = None;
        } else {
            log::info!("{addr}: the home broker of slot {slot} is back (connection {id})");
            state.parked = Some(id);
            state.parked_at = Some(now);
        }
    }

    /// The connection attempt `attempt` of `slot` reached no broker.
    pub fn on_connect_failed(
        &mut self,
        slot: usize,
        attempt: u64,
        error: ClientError,
        now: Timestamp,
    ) {
        let Some(state) = self.slots.get_mut(slot) else {
            return;
        };
        if state.attempt != Some(attempt) {
            return;
        }
        state.attempt = None;
        state.retry_at = Some(now + state.backoff);
        state.backoff = (state.backoff * 2).min(RECONNECT_BACKOFF_MAX);
        log::debug!("slot {slot}: connection attempt failed: {error}");
        self.last_connect_error = Some(error);
        self.tick(now);
    }

    /// Moves a slot to its parked home connection once the current one has nothing
    /// unacknowledged (or is gone).
    pub(super) fn maybe_move_home(&mut self, slot: usize) {
        let state = &mut self.slots[slot];
        let Some(home) = state.parked else {
            return;
        };
        if let Some(current) = state.conn {
            if self.conns.get(&current).is_some_and(Conn::has_pending) {
                return;
            }
            if let Some(conn) = self.conns.get_mut(&current) {
                conn.goodbye_sent = true;
                self.commands.push_back(Command::Goodbye(current));
            }
        }
        state.conn = Some(home);
        state.parked = None;
        state.parked_at = None;
        state.lost = None;
        self.pump(slot);
    }

    /// Gives up moving home for slots whose away connection did not drain within
    /// [`PARK_DRAIN_MAX`]: they take batches on it again and probe home after their backoff.
    fn unpark_stale(&mut self, now: Timestamp) {
        for slot in 0..self.slots.len() {
            let state = &mut self.slots[slot];
            let (Some(home), Some(at)) = (state.parked, state.parked_at) else {
                continue;
            };
            if now.saturating_duration_since(at) < PARK_DRAIN_MAX {
                continue;
            }
            state.parked = None;
            state.parked_at = None;
            state.retry_at = Some(now + state.backoff);
            state.backoff = (state.backoff * 2).min(RECONNECT_BACKOFF_MAX);
            if let Some(conn) = self.conns.get_mut(&home) {
                log::info!(
                    "{}: slot {slot} stays away: its connection there did not drain within {} \
                     ms",
                    conn.addr,
                    PARK_DRAIN_MAX.as_millis()
                );
                conn.goodbye_sent = true;
                self.commands.push_back(Command::Goodbye(home));
            }
            self.pump(slot);
        }
    }

    /// Starts the next session epoch once the rolling session has nothing outstanding:
    /// every connection says Goodbye and each slot connects again with the new epoch.
    pub(super) fn maybe_roll_over(&mut self, now: Timestamp) {
        if !self.rolling || self.outstanding_batches() > 0 || self.failure.is_some() {
            return;
        }
        let Some(epoch) = self.epoch.checked_add(1) else {
            return self.fail(ClientError::EpochExhausted { epoch: self.epoch });
        };
        log::info!(
            "session epoch {} used its {} batch sequences: starting epoch {epoch}",
            self.epoch,
            self.session_batches_max
        );
        self.epoch = epoch;
        self.first_seq = 0;
        self.next_seq = 0;
        self.rolling = false;
        self.rejected.clear();
        self.counters.session_rollovers += 1;
        for (id, conn) in &mut self.conns {
            if !conn.goodbye_sent {
                conn.goodbye_sent = true;
                self.commands.push_back(Command::Goodbye(*id));
            }
        }
        for state in &mut self.slots {
            state.start_new_session();
        }
        self.tick(now);
    }

    /// What a slot wants from the network now.
    fn want(&self, slot: &Slot) -> Option<Want> {
        match slot.conn {
            None if slot.new_session => Some(Want::NewSession),
            None => Some(Want::Replacement),
            Some(current) if slot.parked.is_none() => self
                .conns
                .get(&current)
                .is_some_and(|c| c.addr != slot.home)
                .then_some(Want::Home),
            Some(_) => None,
        }
    }

    /// Brokers a slot tries, in order: for its home probe only the home broker; else its
    /// home broker when a connection to it is open, the other brokers with an open connection
    /// (rotated by the slot's turn, so that the slots of a lost broker spread out), the brokers
    /// without one, and the broker just lost last.
    fn candidates(&self, slot: usize, want: Want) -> Vec<SocketAddr> {
        let state = &self.slots[slot];
        if want == Want::Home {
            return vec![state.home];
        }
        let open = |addr: SocketAddr| {
            state.lost != Some(addr) && self.conns.values().any(|c| c.addr == addr)
        };
        let count = self.brokers.len();
        let others = (1..count).map(|i| self.brokers[(slot + i) % count]);
        let mut live: Vec<SocketAddr> = others.clone().filter(|&a| open(a)).collect();
        if !live.is_empty() {
            let turn = (slot / count) % live.len();
            live.rotate_left(turn);
        }
        let mut candidates = Vec::with_capacity(count);
        let first = open(state.home).then_some(state.home);
        let rest = std::iter::once(state.home)
            .chain(others)
            .filter(|&a| !open(a) && state.lost != Some(a));
        for addr in first.into_iter().chain(live).chain(rest).chain(state.lost) {
            if !candidates.contains(&addr) {
                candidates.push(addr);
            }
        }
        candidates
    }

    /// Runs the timers: starts due connection attempts and gives up when no slot has had a
    /// connection for `reconnect_timeout`.
    pub fn tick(&mut self, now: Timestamp) {
        if !self.closing && self.failure.is_none() {
            self.unpark_stale(now);
            self.start_due_attempts(now);
            self.give_up_if_down(now);
        }
        self.next_timer = self.compute_next_timer();
    }

    /// Asks for a connection for every slot that wants one and whose backoff has passed.
    fn start_due_attempts(&mut self, now: Timestamp) {
        for slot in 0..self.slots.len() {
            let state = &self.slots[slot];
            let Some(want) = self.want(state) else {
                continue;
            };
            if state.attempt.is_some() {
                continue;
            }
            let due = match state.retry_at {
                Some(at) => at,
                None if want == Want::Home => now + state.backoff,
                None => now,
            };
            if due > now {
                self.slots[slot].retry_at = Some(due);
                continue;
            }
            let candidates = self.candidates(slot, want);
            let attempt = self.next_attempt;
            self.next_attempt += 1;
            let state = &mut self.slots[slot];
            state.attempt = Some(attempt);
            state.retry_at = None;
            self.commands.push_back(Command::Connect(ConnectRequest {
                slot,
                attempt,
                session_epoch: self.epoch,
                candidates,
            }));
        }
    }

    /// Fails the publisher once no slot has had a connection for `reconnect_timeout`.
    fn give_up_if_down(&mut self, now: Timestamp) {
        if self.slots.iter().any(|s| s.conn.is_some()) {
            self.down_since = None;
            return;
        }
        let since = *self.down_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= self.reconnect_timeout {
            let last_error = self
                .last_connect_error
                .as_ref()
                .map_or_else(|| "none yet".to_owned(), ToString::to_string);
            self.fail(ClientError::Unreachable {
                brokers: self.brokers.len(),
                timeout_ms: whole_ms(self.reconnect_timeout),
                outstanding_batches: self.outstanding_batches(),
                last_error,
            });
        }
    }

    /// When [`tick`](Self::tick) has something to do next (a connection attempt due, a
    /// waiting slot's [`PARK_DRAIN_MAX`], or the give-up deadline), if anything.
    pub fn next_wakeup(&self) -> Option<Timestamp> {
        // Computed afresh: progress since the last tick (a slot that moved home) may have
        // cancelled the timer it cached.
        self.compute_next_timer()
    }

    fn compute_next_timer(&self) -> Option<Timestamp> {
        if self.closing || self.failure.is_some() {
            return None;
        }
        let retries = self
            .slots
            .iter()
            .filter(|s| s.attempt.is_none())
            .filter_map(|s| s.retry_at);
        let give_up = self.down_since.map(|since| since + self.reconnect_timeout);
        let unpark = self
            .slots
            .iter()
            .filter_map(|s| s.parked_at)
            .map(|at| at + PARK_DRAIN_MAX);
        retries.chain(give_up).chain(unpark).min()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use wire::{AckEntry, AckStatus, Frame};

    use super::super::test_support::*;
    use super::super::{ConnectRequest, PublisherEvent, Transmit};
    use super::*;

    #[test]
    fn goodbye_and_end_of_stream() {
        // The answer to our Goodbye, after every ack, finishes the connection cleanly.
        let mut core = Setup::default().core();
        let now = Timestamp::ZERO;
        publish_batches(&mut core, 1, now);
        assert_eq!(core.start_shutdown(), [0]);
        assert!(!core.connection_finished(0));
        core.on_frame(0, ack(0, vec![entry(0, Some(0), 1)]), now);
        core.on_frame(0, Frame::Goodbye, now);
        assert!(core.connection_finished(0));
        core.on_connection_ended(0, None, now);
        assert!(core.connection_finished(0));
        assert!(core.failure().is_none());

        // An unrequested Goodbye loses the connection: closed, and a replacement is asked for.
        let mut core = Setup::default().core();
        publish_batches(&mut core, 1, now);
        transmitted(&mut core);
        core.on_frame(0, Frame::Goodbye, now);
        let handed_out = commands(&mut core);
        assert!(matches!(handed_out[0], Command::Close(0)), "{handed_out:?}");
        assert_eq!(connects(&handed_out).len(), 1);
        assert!(core.failure().is_none());
        assert_eq!(core.stats().connections_lost, 1);

        // So does an end of stream with batches unacknowledged.
        let mut core = Setup::default().core();
        publish_batches(&mut core, 1, now);
        transmitted(&mut core);
        core.on_connection_ended(0, None, now);
        assert_eq!(connects(&commands(&mut core)).len(), 1);
        assert_eq!(
            core.outstanding_batches(),
            1,
            "the batch waits for a resend"
        );
        assert!(core.failure().is_none());
    }

    /// Batches 0..6 over two brokers (even on connection 0, odd on 1), batch 0 acknowledged,
    /// then connection 0 reset.
    fn core_after_a_reset(now: Timestamp) -> (PublisherCore, Vec<Transmit>) {
        let mut core = two_brokers_with_batches(6, now);
        let sent = transmitted(&mut core);
        core.on_frame(0, ack(0, vec![entry(0, Some(0), 1)]), now);
        core.on_connection_ended(0, Some(reset()), now);
        (core, sent)
    }

    #[test]
    fn a_lost_connection_resends_its_batches_in_order_with_the_same_bytes() {
        let now = Timestamp::ZERO;
        let (mut core, sent) = core_after_a_reset(now);
        assert!(core.failure().is_none());
        let handed_out = commands(&mut core);
        // A replacement for slot 0: the live broker first, the lost one last.
        assert_eq!(
            connects(&handed_out),
            [ConnectRequest {
                slot: 0,
                attempt: 0,
                session_epoch: 1,
                candidates: vec![addr(1), addr(0)],
            }]
        );
        assert_eq!(core.in_flight(0), 2, "batches 2 and 4 wait for a resend");
        assert_eq!(core.stats().connections_lost, 1);
        // A new batch of slot 0 waits behind them.
        publish_batches(&mut core, 1, now);
        assert!(transmitted(&mut core).is_empty());

        let id = core.on_connected(0, 0, addr(1), &hello_ok(6), now).unwrap();
        let resent = transmitted(&mut core);
        assert_eq!(seqs_and_connections(&resent), [(2, 2), (4, 2), (6, 2)]);
        assert_eq!(id, 2);
        for batch in &resent[..2] {
            let original = sent.iter().find(|s| s.seq == batch.seq).unwrap();
            assert_eq!(batch.bytes, original.bytes, "identical bytes");
        }
        let stats = core.stats();
        assert_eq!((stats.reconnects, stats.batches_resent), (1, 2));
        // A batch counts as sent once, whichever write completed it first (batch 0 counted
        // when it was acknowledged).
        core.on_written(1, 1, now);
        core.on_written(id, 2, now);
        core.on_written(id, 6, now);
        core.on_written(1, 1, now);
        assert_eq!(core.stats().batches_sent, 4);

        // Batch 2 had reached the log before the reset: a duplicate, at its first position.
        let duplicate = AckEntry {
            status: AckStatus::Duplicate,
            ..entry(2, Some(5), 1)
        };
        core.on_frame(
            id,
            ack(
                6,
                vec![duplicate, entry(4, Some(7), 1), entry(6, Some(8), 1)],
            ),
            now,
        );
        core.on_frame(
            1,
            ack(
                5,
                vec![
                    entry(1, Some(1), 1),
                    entry(3, Some(2), 1),
                    entry(5, Some(3), 1),
                ],
            ),
            now,
        );
        assert!(core.is_flushed());
        assert!(core.failure().is_none());
        let events = core.take_events();
        assert!(
            events.iter().any(|e| matches!(
                e,
                PublisherEvent::Acked {
                    batch_seq: 2,
                    global_start: Some(5),
                    duplicate: true,
                    ..
                }
            )),
            "{events:?}"
        );
        let stats = core.stats();
        assert_eq!((stats.batches_acked, stats.batches_duplicate), (7, 1));
    }

    #[test]
    fn an_away_slot_probes_its_home_and_moves_back_once_drained() {
        let now = Timestamp::ZERO;
        let (mut core, _) = core_after_a_reset(now);
        commands(&mut core);
        let away = core.on_connected(0, 0, addr(1), &hello_ok(0), now).unwrap();
        assert_eq!(transmitted(&mut core).len(), 2);
        // The home broker is probed after a backoff, alone.
        assert!(connects(&commands(&mut core)).is_empty());
        let due = core.next_wakeup().expect("a probe is scheduled");
        assert!(due > now && due <= now + RECONNECT_BACKOFF_MIN);
        core.poll(due);
        let probe = connects(&commands(&mut core));
        assert_eq!(probe.len(), 1);
        assert_eq!(probe[0].candidates, [addr(0)]);
        // A failed probe is retried later, each time after a longer backoff.
        core.on_connect_failed(0, probe[0].attempt, reset(), due);
        let retry = due + RECONNECT_BACKOFF_MIN;
        assert_eq!(core.next_wakeup(), Some(retry));
        core.tick(retry);
        let probe = connects(&commands(&mut core));
        core.on_connect_failed(0, probe[0].attempt, reset(), retry);
        assert_eq!(core.next_wakeup(), Some(retry + 2 * RECONNECT_BACKOFF_MIN));
        core.tick(due + Duration::from_secs(1));
        let probe = connects(&commands(&mut core));
        let later = due + Duration::from_secs(1);

        // The home broker answers while batches 2 and 4 are unacknowledged away: the slot
        // holds its new batches until they are.
        let home = core
            .on_connected(0, probe[0].attempt, addr(0), &hello_ok(0), later)
            .unwrap();
        publish_batches(&mut core, 2, later);
        assert_eq!(seqs_and_connections(&transmitted(&mut core)), [(7, 1)]);
        assert!(goodbyes(&commands(&mut core)).is_empty());
        core.on_frame(
            away,
            ack(4, vec![entry(2, Some(6), 1), entry(4, Some(7), 1)]),
            later,
        );
        let handed_out = commands(&mut core);
        assert_eq!(goodbyes(&handed_out), [away]);
        assert_eq!(seqs_and_connections(&transmits(&handed_out)), [(6, 3)]);
        assert_eq!(home, 3);
        assert_eq!(core.slot_connection(0), Some(home));
        assert_eq!(core.stats().reconnects, 2);
        assert!(core.next_wakeup().is_none(), "every slot is home");
        assert!(core.failure().is_none());
    }

    /// The away connection's acks may wait for the very batch the parked slot holds back
    /// (order 5 holds the other slots' later batches, and their ring slots hold back the
    /// broker's decisions): the slot waits at most `PARK_DRAIN_MAX`, then stays away.
    #[test]
    fn a_slot_that_cannot_drain_away_stays_there_and_probes_home_later() {
        let now = Timestamp::ZERO;
        let (mut core, _) = core_after_a_reset(now);
        commands(&mut core);
        let away = core.on_connected(0, 0, addr(1), &hello_ok(0), now).unwrap();
        assert_eq!(transmitted(&mut core).len(), 2);
        let due = core.next_wakeup().expect("a probe is scheduled");
        core.poll(due);
        let probe = connects(&commands(&mut core));
        let home = core
            .on_connected(0, probe[0].attempt, addr(0), &hello_ok(0), due)
            .unwrap();
        publish_batches(&mut core, 2, due);
        assert_eq!(seqs_and_connections(&transmitted(&mut core)), [(7, 1)]);
        // Batches 2 and 4 stay unacknowledged away: at the deadline the slot gives up moving.
        let deadline = due + PARK_DRAIN_MAX;
        assert_eq!(core.next_wakeup(), Some(deadline));
        core.poll(due + (PARK_DRAIN_MAX - Duration::from_millis(1)));
        assert!(commands(&mut core).is_empty(), "still waiting");
        core.poll(deadline);
        let handed_out = commands(&mut core);
        assert_eq!(goodbyes(&handed_out), [home], "the parked connection goes");
        assert_eq!(
            seqs_and_connections(&transmits(&handed_out)),
            [(6, away as usize)],
            "the held batch goes away"
        );
        assert_eq!(core.slot_connection(0), Some(away));
        let probe_at = core.next_wakeup().expect("home is probed again");
        assert!(probe_at > deadline);
        assert!(core.failure().is_none());
    }

    #[test]
    fn the_slots_of_a_lost_broker_spread_over_the_others() {
        let mut core = Setup {
            connections: 4,
            per_broker: 2,
            ..Setup::default()
        }
        .core();
        let now = Timestamp::ZERO;
        // Slots 1 and 5 belong to broker 1.
        core.on_connection_ended(1, None, now);
        core.on_connection_ended(5, None, now);
        let requests = connects(&commands(&mut core));
        assert_eq!(requests.len(), 2);
        assert_eq!(requests[0].candidates, [addr(2), addr(3), addr(0), addr(1)]);
        assert_eq!(requests[1].candidates, [addr(3), addr(0), addr(2), addr(1)]);
    }

    #[test]
    fn with_no_connection_for_the_reconnect_timeout_the_publisher_gives_up() {
        let mut core = Setup::default().core();
        let t0 = Timestamp::ZERO;
        publish_batches(&mut core, 2, t0);
        core.on_connection_ended(0, Some(reset()), t0);
        let mut now = t0;
        while core.failure().is_none() {
            for request in connects(&commands(&mut core)) {
                assert_eq!(request.candidates, [addr(0)]);
                let refused = ClientError::Connect {
                    addr: addr(0),
                    source: Arc::new(std::io::ErrorKind::ConnectionRefused.into()),
                };
                core.on_connect_failed(request.slot, request.attempt, refused, now);
            }
            now = core
                .next_wakeup()
                .expect("a timer is always armed while down");
            assert!(now <= t0 + RECONNECT_TIMEOUT, "never past the give-up time");
            core.tick(now);
        }
        assert_eq!(now, t0 + RECONNECT_TIMEOUT);
        let error = core.failure().unwrap().to_string();
        assert!(
            matches!(
                core.failure(),
                Some(ClientError::Unreachable {
                    brokers: 1,
                    timeout_ms: 1000,
                    outstanding_batches: 2,
                    ..
                })
            ),
            "{error}"
        );
        assert!(error.contains("refused"), "{error}");
        assert!(core.next_wakeup().is_none());
    }

    #[test]
    fn a_batch_resent_too_often_fails_the_publisher() {
        let mut core = Setup {
            resends_max: 1,
            ..Setup::default()
        }
        .core();
        let now = Timestamp::ZERO;
        publish_batches(&mut core, 1, now);
        // The first resend is within the bound.
        core.on_connection_ended(0, Some(reset()), now);
        let request = connects(&commands(&mut core)).remove(0);
        let connection = core
            .on_connected(0, request.attempt, addr(0), &hello_ok(0), now)
            .unwrap();
        assert!(core.failure().is_none());
        assert_eq!(core.stats().batches_resent, 1);
        core.on_connection_ended(connection, Some(reset()), now);
        let request = connects(&commands(&mut core)).remove(0);
        core.on_connected(0, request.attempt, addr(0), &hello_ok(0), now);
        assert!(matches!(
            core.failure(),
            Some(ClientError::ResendLimit {
                batch_seq: 0,
                resends_max: 1
            })
        ));
    }

    #[test]
    fn a_full_session_drains_then_starts_the_next_epoch_at_zero() {
        let mut core = Setup {
            connections: 2,
            session_batches_max: 3,
            ..Setup::default()
        }
        .core();
        let now = Timestamp::ZERO;
        publish_batches(&mut core, 3, now);
        assert_eq!(transmitted(&mut core).len(), 3);
        // Batch 3 would be sequence 3: the session drains first.
        core.publish(MESSAGE, now).unwrap();
        assert!(core.seal(now).unwrap_err().is_would_block());
        assert!(core.take_command().is_none());
        core.on_frame(
            0,
            ack(2, vec![entry(0, Some(0), 1), entry(2, Some(2), 1)]),
            now,
        );
        assert_eq!(core.session_epoch(), 1, "batch 1 is still unacknowledged");
        core.on_frame(1, ack(1, vec![entry(1, Some(1), 1)]), now);
        assert_eq!(core.session_epoch(), 2);
        let handed_out = commands(&mut core);
        assert_eq!(goodbyes(&handed_out), [0, 1]);
        let requests = connects(&handed_out);
        assert_eq!(
            requests
                .iter()
                .map(|r| (r.slot, r.session_epoch, r.candidates[0]))
                .collect::<Vec<_>>(),
            [(0, 2, addr(0)), (1, 2, addr(1))]
        );
        // The new session numbers from 0 again, on the new connections.
        core.seal(now).unwrap();
        let first = core
            .on_connected(0, requests[0].attempt, addr(0), &hello_ok(0), now)
            .unwrap();
        assert_eq!(seqs_and_connections(&transmitted(&mut core)), [(0, 2)]);
        assert_eq!(first, 2);
        // A broker that already knows later sequences of this epoch: someone else uses it.
        core.on_connected(1, requests[1].attempt, addr(1), &hello_ok(5), now);
        assert!(matches!(
            core.failure(),
            Some(ClientError::HandshakeMismatch { got: 5, .. })
        ));
        let stats = core.stats();
        assert_eq!((stats.session_rollovers, stats.reconnects), (1, 0));
    }

    #[test]
    fn results_of_outdated_attempts_are_refused() {
        let now = Timestamp::ZERO;
        let (mut core, _) = core_after_a_reset(now);
        commands(&mut core);
        assert_eq!(core.on_connected(0, 99, addr(1), &hello_ok(0), now), None);
        assert_eq!(core.on_connected(1, 0, addr(1), &hello_ok(0), now), None);
        assert!(
            core.on_connected(0, 0, addr(1), &hello_ok(0), now)
                .is_some()
        );
        assert_eq!(core.on_connected(0, 0, addr(1), &hello_ok(0), now), None);
        // Shutting down: no connection is wanted and losses are final.
        assert_eq!(core.start_shutdown(), [1, 2]);
        core.on_connection_ended(1, Some(reset()), now);
        assert!(connects(&commands(&mut core)).is_empty());
        assert!(core.connection_finished(1));
        assert!(!core.connection_finished(2));
    }
}
