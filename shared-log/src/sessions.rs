//! The sequencer's memory of publisher sessions in one topic: the deduplication window, the
//! order-5 hold buffer and the gap rule (see the module docs of [`crate::sequencer`]). A pure
//! type: no pool access, time as an argument; the sequencer persists what a standby needs
//! (session records) and decides with what this table says.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use units::Timestamp;
/// A publisher session: (client id, session epoch).
pub type SessionKey = (u64, u32);

/// The table's limits (from the sequencer's configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Sessions tracked at most; beyond, the least recently active one without held
    /// batches is forgotten.
    pub sessions_max: usize,
    /// Batches held for gaps at most; beyond, the oldest gap is given up.
    pub hold_batches_max: usize,
    /// Ordered batches per session whose positions are remembered for duplicates.
    pub dedup_window: usize,
    /// How long a held batch waits for its gap before the gap is given up.
    pub hold_timeout_ns: u64,
}

/// What to do with a batch of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Place it in the order now (then [`SessionTable::ordered`], and drain the session
    /// with [`SessionTable::next_in_order`]).
    Order,
    /// A duplicate of a batch in the log, at this position when known: answer it now.
    Duplicate(Option<u64>),
    /// A duplicate of a batch held for a gap: parked, and handed back by
    /// [`SessionTable::ordered`] when the held copy is placed.
    DuplicateOfHeld,
    /// Older than the session's deduplication window: never written.
    RejectedOutsideWindow,
    /// Order 5: its sequence was given up by the gap rule before it arrived.
    RejectedGap,
    /// Order 5: ahead of a gap; held until the gap closes or is given up.
    Held,
}

/// A gap given up: the session jumped from `from` to `to` (its lowest held batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GapSkipped {
    /// The session.
    pub key: SessionKey,
    /// The first sequence given up.
    pub from: u64,
    /// The sequence the session goes on with.
    pub to: u64,
}

#[derive(Debug, Default)]
struct Session {
    /// Order 5: the next sequence to order.
    next_expected: u64,
    /// Sequence -> global start of recently ordered batches.
    ordered: BTreeMap<u64, u64>,
    /// Sequences below this are outside the dedup window.
    window_floor: u64,
    held: usize,
    last_active: u64,
    /// Highest sequence ordered, plus one.
    next_seq: u64,
}

impl Session {
    /// Remembers that `seq` (moving the sequence `span` on) was ordered at `global_start`:
    /// in the dedup window (the oldest leaves past `window` entries, raising the floor) and
    /// in the highest sequence.
    fn remember(&mut self, seq: u64, span: u64, global_start: u64, window: usize) {
        self.ordered.insert(seq, global_start);
        if self.ordered.len() > window {
            let (oldest, _) = self.ordered.pop_first().expect("non-empty");
            self.window_floor = self.window_floor.max(oldest + 1);
        }
        self.next_seq = self.next_seq.max(seq.saturating_add(span));
    }
}

/// The sessions of one topic, with the batches (of type `T`) held for gaps and the parked
/// duplicates of held batches.
#[derive(Debug)]
pub struct SessionTable<T> {
    limits: SessionLimits,
    /// Order 5: each session's batches are placed in sequence order.
    fifo: bool,
    sessions: HashMap<SessionKey, Session>,
    held: BTreeMap<(SessionKey, u64), T>,
    /// Hold times in arrival order; entries whose batch left the buffer are skipped lazily.
    hold_queue: VecDeque<(Timestamp, SessionKey, u64)>,
    held_duplicates: HashMap<(SessionKey, u64), Vec<T>>,
    held_duplicates_count: usize,
    /// Held batches (and their parked copies) that an ordered batch overlapped: a session
    /// numbering messages whose client sent overlapping sequences. They can never be placed;
    /// the sequencer rejects them ([`Self::take_stranded`]).
    stranded: Vec<T>,
    activity: u64,
    evicted: u64,
}

impl<T> SessionTable<T> {
    /// An empty table; `fifo` for order 5.
    pub fn new(limits: SessionLimits, fifo: bool) -> SessionTable<T> {
        SessionTable {
            limits,
            fifo,
            sessions: HashMap::new(),
            held: BTreeMap::new(),
            hold_queue: VecDeque::new(),
            held_duplicates: HashMap::new(),
            held_duplicates_count: 0,
            stranded: Vec::new(),
            activity: 0,
            evicted: 0,
        }
    }

    /// Sessions tracked.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether no session is tracked.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Batches held for gaps.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Sessions forgotten to stay within `sessions_max` so far.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// After a takeover: what a session record says of `key` (highest sequence ordered plus
    /// one, and its window floor).
    pub fn restore(&mut self, key: SessionKey, next_seq: u64, window_floor: u64) {
        let session = self.sessions.entry(key).or_default();
        session.next_seq = next_seq;
        session.window_floor = window_floor;
    }

    /// Records that `key`'s batch `seq` was placed at `global_start`; returns the parked
    /// duplicates of it, to be answered with that position. `span` is how far it moves the
    /// session's sequence: 1 where sessions number batches, its message count where they
    /// number messages (a Kafka idempotent producer's).
    pub fn ordered(&mut self, key: SessionKey, seq: u64, span: u64, global_start: u64) -> Vec<T> {
        let window = self.limits.dedup_window;
        let session = self.sessions.entry(key).or_default();
        session.remember(seq, span, global_start, window);
        if self.fifo {
            session.next_expected = seq.saturating_add(span);
        }
        let copies = self.held_duplicates.remove(&(key, seq)).unwrap_or_default();
        self.held_duplicates_count -= copies.len();
        if self.fifo && span > 1 {
            self.strand_below(key);
        }
        copies
    }

    /// Moves `key`'s held batches below its next expected sequence (inside the span of a
    /// batch just placed) to the stranded ones: none can ever be placed, and left held they
    /// would pull the gap rule backwards.
    fn strand_below(&mut self, key: SessionKey) {
        let next = self.sessions[&key].next_expected;
        let below: Vec<u64> = self
            .held
            .range((key, 0)..(key, next))
            .map(|(&(_, seq), _)| seq)
            .collect();
        for seq in below {
            if let Some(item) = self.held.remove(&(key, seq)) {
                self.stranded.push(item);
                if let Some(session) = self.sessions.get_mut(&key) {
                    session.held -= 1;
                }
            }
            let copies = self.held_duplicates.remove(&(key, seq)).unwrap_or_default();
            self.held_duplicates_count -= copies.len();
            self.stranded.extend(copies);
        }
    }

    /// The batches stranded since the last call (see `stranded`): each must be completed
    /// as rejected.
    pub fn take_stranded(&mut self) -> Vec<T> {
        std::mem::take(&mut self.stranded)
    }

    /// After a takeover, once every ordered batch the pool still lists was passed to
    /// [`Self::ordered`]: below the lowest sequence whose position is known, a resend cannot
    /// be told from a new batch, so it is outside the window; order 5 goes on after the
    /// highest.
    pub fn finish_restore(&mut self) {
        for session in self.sessions.values_mut() {
            let lowest_known = session
                .ordered
                .first_key_value()
                .map_or(session.next_seq, |(&seq, _)| seq);
            session.window_floor = session.window_floor.max(lowest_known);
            if self.fifo {
                session.next_expected = session.next_seq;
            }
        }
    }

    /// `key`'s progress for its session record: (highest sequence ordered plus one, window
    /// floor).
    pub fn progress(&self, key: SessionKey) -> Option<(u64, u64)> {
        self.sessions
            .get(&key)
            .map(|session| (session.next_seq, session.window_floor))
    }

    /// Decides batch `seq` of session `key`, arriving at `now`. A held batch, or a parked
    /// duplicate of one, is kept (as `item`). `record` is asked for what a session record
    /// says of a session this table does not know (forgotten, or ordered before a takeover).
    pub fn classify(
        &mut self,
        key: SessionKey,
        seq: u64,
        now: Timestamp,
        item: T,
        record: impl FnOnce() -> Option<(u64, u64)>,
    ) -> Verdict {
        self.touch(key, record);
        let session = &self.sessions[&key];
        if seq < session.window_floor {
            return Verdict::RejectedOutsideWindow;
        }
        if let Some(&position) = session.ordered.get(&seq) {
            return Verdict::Duplicate(Some(position));
        }
        if !self.fifo {
            return Verdict::Order;
        }
        if seq < session.next_expected {
            return Verdict::RejectedGap;
        }
        if self.held.contains_key(&(key, seq)) {
            // The copy held is not in the order yet: this one is answered when it is (an
            // answer never runs ahead of the order). Bounded: past the limit, at once,
            // without a position.
            if self.held_duplicates_count >= self.limits.hold_batches_max {
                return Verdict::Duplicate(None);
            }
            self.held_duplicates_count += 1;
            self.held_duplicates
                .entry((key, seq))
                .or_default()
                .push(item);
            return Verdict::DuplicateOfHeld;
        }
        if seq == session.next_expected {
            return Verdict::Order;
        }
        self.held.insert((key, seq), item);
        self.hold_queue.push_back((now, key, seq));
        self.sessions.get_mut(&key).expect("touched above").held += 1;
        Verdict::Held
    }

    /// Makes `key` the most recently active session, tracking it (and forgetting another
    /// past `sessions_max`) if it is new.
    fn touch(&mut self, key: SessionKey, record: impl FnOnce() -> Option<(u64, u64)>) {
        self.activity += 1;
        if !self.sessions.contains_key(&key) && self.sessions.len() >= self.limits.sessions_max {
            let victim = self
                .sessions
                .iter()
                .filter(|(_, s)| s.held == 0)
                .min_by_key(|(_, s)| s.last_active)
                .map(|(k, _)| *k);
            if let Some(victim) = victim {
                self.sessions.remove(&victim);
                self.evicted += 1;
            }
        }
        let fifo = self.fifo;
        let session = self.sessions.entry(key).or_insert_with(|| {
            // A session this table forgot (or never saw, before a takeover) goes on from its
            // record, with nothing below its next sequence in the window (their positions
            // are not known here).
            let mut session = Session::default();
            if let Some((next_seq, window_floor)) = record() {
                session.next_seq = next_seq;
                session.window_floor = window_floor.max(next_seq);
                if fifo {
                    session.next_expected = next_seq;
                }
            }
            session
        });
        session.last_active = self.activity;
    }

    /// The held batch of `key` that follows its last placed one without a gap, if any (call
    /// until `None` after each [`Verdict::Order`] and gap given up).
    pub fn next_in_order(&mut self, key: SessionKey) -> Option<T> {
        let next = self.sessions.get(&key)?.next_expected;
        let item = self.held.remove(&(key, next))?;
        self.sessions
            .get_mut(&key)
            .expect("session of a held batch")
            .held -= 1;
        Some(item)
    }

    /// The gap rule on time: gives up the gap of the session whose held batch has waited
    /// longest, if that is `hold_timeout_ns` by `now` (call until `None`).
    pub fn give_up_expired(&mut self, now: Timestamp) -> Option<GapSkipped> {
        let timeout = Duration::from_nanos(self.limits.hold_timeout_ns);
        self.give_up_oldest(|since| now.saturating_duration_since(since) >= timeout)
    }

    /// The gap rule on size: while more batches are held than `hold_batches_max`, gives up
    /// the oldest gap (call until `None`).
    pub fn give_up_over_limit(&mut self) -> Option<GapSkipped> {
        if self.held.len() <= self.limits.hold_batches_max {
            return None;
        }
        self.give_up_oldest(|_| true)
    }

    /// Gives up the gap of the session of the oldest held batch, when `due(its hold time)`.
    fn give_up_oldest(&mut self, due: impl Fn(Timestamp) -> bool) -> Option<GapSkipped> {
        loop {
            let &(since, key, seq) = self.hold_queue.front()?;
            if !self.held.contains_key(&(key, seq)) {
                self.hold_queue.pop_front();
                continue;
            }
            if !due(since) {
                return None;
            }
            let (&(_, lowest), _) = self
                .held
                .range((key, 0)..=(key, u64::MAX))
                .next()
                .expect("the session holds this batch");
            let session = self
                .sessions
                .get_mut(&key)
                .expect("session of a held batch");
            let from = session.next_expected;
            session.next_expected = lowest;
            return Some(GapSkipped {
                key,
                from,
                to: lowest,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: SessionKey = (7, 1);

    fn table(fifo: bool) -> SessionTable<u64> {
        SessionTable::new(
            SessionLimits {
                sessions_max: 2,
                hold_batches_max: 3,
                dedup_window: 4,
                hold_timeout_ns: 100,
            },
            fifo,
        )
    }

    fn classify(table: &mut SessionTable<u64>, key: SessionKey, seq: u64, now_ns: u64) -> Verdict {
        table.classify(key, seq, Timestamp::from_nanos(now_ns), seq, || None)
    }

    #[test]
    fn a_session_that_numbers_messages_expects_each_batch_after_the_last_ones_messages() {
        // Sequences 0 (3 messages), 3 (2 messages), 5: a Kafka idempotent producer's.
        let mut table = table(true);
        assert_eq!(classify(&mut table, KEY, 5, 0), Verdict::Held);
        assert_eq!(classify(&mut table, KEY, 0, 0), Verdict::Order);
        table.ordered(KEY, 0, 3, 100);
        assert_eq!(table.next_in_order(KEY), None, "3 is not there yet");
        assert_eq!(classify(&mut table, KEY, 3, 0), Verdict::Order);
        table.ordered(KEY, 3, 2, 103);
        assert_eq!(table.next_in_order(KEY), Some(5));
        table.ordered(KEY, 5, 1, 105);
        // A resent batch is a duplicate at its first position; a sequence inside a batch
        // is none the producer sent.
        assert_eq!(
            classify(&mut table, KEY, 3, 0),
            Verdict::Duplicate(Some(103))
        );
        assert_eq!(classify(&mut table, KEY, 4, 0), Verdict::RejectedGap);
        // What a session record keeps for a standby: the next sequence after the messages.
        assert_eq!(table.progress(KEY).map(|(next, _)| next), Some(6));
    }

    #[test]
    fn a_held_batch_inside_an_ordered_batchs_span_is_stranded_not_left_to_pull_back_the_gap() {
        // Sequence 1 (held) lies inside sequence 0's three messages: a client's overlap.
        let mut table = table(true);
        assert_eq!(classify(&mut table, KEY, 1, 0), Verdict::Held);
        assert_eq!(classify(&mut table, KEY, 0, 0), Verdict::Order);
        table.ordered(KEY, 0, 3, 100);
        assert_eq!(table.take_stranded(), vec![1]);
        assert_eq!(table.held(), 0);
        assert_eq!(table.next_in_order(KEY), None);
        assert_eq!(table.give_up_expired(Timestamp::from_nanos(1_000)), None);
        assert_eq!(classify(&mut table, KEY, 3, 0), Verdict::Order);
    }

    #[test]
    fn order_5_holds_batches_ahead_of_a_gap_and_drains_them_when_it_closes() {
        let mut table = table(true);
        assert_eq!(classify(&mut table, KEY, 1, 0), Verdict::Held);
        assert_eq!(classify(&mut table, KEY, 2, 0), Verdict::Held);
        assert_eq!(classify(&mut table, KEY, 0, 0), Verdict::Order);
        table.ordered(KEY, 0, 1, 10);
        assert_eq!(table.next_in_order(KEY), Some(1));
        table.ordered(KEY, 1, 1, 11);
        assert_eq!(table.next_in_order(KEY), Some(2));
        table.ordered(KEY, 2, 1, 12);
        assert_eq!(table.next_in_order(KEY), None);
        assert_eq!(table.held(), 0);
    }

    #[test]
    fn a_gap_is_given_up_at_its_timeout_and_a_late_arrival_is_rejected() {
        let mut table = table(true);
        assert_eq!(classify(&mut table, KEY, 2, 50), Verdict::Held);
        assert_eq!(
            table.give_up_expired(Timestamp::from_nanos(149)),
            None,
            "not yet"
        );
        assert_eq!(
            table.give_up_expired(Timestamp::from_nanos(150)),
            Some(GapSkipped {
                key: KEY,
                from: 0,
                to: 2
            })
        );
        assert_eq!(table.next_in_order(KEY), Some(2));
        table.ordered(KEY, 2, 1, 0);
        assert_eq!(classify(&mut table, KEY, 1, 200), Verdict::RejectedGap);
        assert_eq!(table.give_up_expired(Timestamp::from_nanos(u64::MAX)), None);
    }

    #[test]
    fn past_the_hold_limit_the_oldest_gap_gives_way() {
        let mut table = table(true);
        let other = (8, 1);
        for (key, seq) in [(KEY, 5), (other, 3), (other, 4), (KEY, 6)] {
            assert_eq!(classify(&mut table, key, seq, 0), Verdict::Held);
        }
        let skipped = table.give_up_over_limit().expect("4 held, 3 allowed");
        assert_eq!(
            (skipped.key, skipped.to),
            (KEY, 5),
            "the oldest held batch's session"
        );
        assert_eq!(table.next_in_order(KEY), Some(5));
        table.ordered(KEY, 5, 1, 0);
        assert_eq!(table.next_in_order(KEY), Some(6));
        assert_eq!(table.give_up_over_limit(), None, "2 held now");
    }

    #[test]
    fn duplicates_within_the_window_get_their_position_and_older_ones_are_refused() {
        let mut table = table(false);
        for seq in 0..6 {
            assert_eq!(classify(&mut table, KEY, seq, 0), Verdict::Order);
            table.ordered(KEY, seq, 1, 100 + seq);
        }
        assert_eq!(
            classify(&mut table, KEY, 5, 0),
            Verdict::Duplicate(Some(105))
        );
        assert_eq!(
            classify(&mut table, KEY, 2, 0),
            Verdict::Duplicate(Some(102))
        );
        assert_eq!(
            classify(&mut table, KEY, 1, 0),
            Verdict::RejectedOutsideWindow,
            "a window of 4 keeps 2..=5"
        );
        assert_eq!(table.progress(KEY), Some((6, 2)));
    }

    #[test]
    fn a_resend_of_a_held_batch_is_answered_when_the_held_copy_is_placed() {
        let mut table = table(true);
        assert_eq!(classify(&mut table, KEY, 1, 0), Verdict::Held);
        assert_eq!(
            table.classify(KEY, 1, Timestamp::ZERO, 99, || None),
            Verdict::DuplicateOfHeld
        );
        assert_eq!(classify(&mut table, KEY, 0, 0), Verdict::Order);
        assert!(table.ordered(KEY, 0, 1, 0).is_empty());
        assert_eq!(table.next_in_order(KEY), Some(1));
        assert_eq!(table.ordered(KEY, 1, 1, 42), vec![99], "the parked resend");
    }

    #[test]
    fn sessions_are_bounded_and_a_forgotten_one_resumes_from_its_record() {
        let mut table = table(true);
        for client in 0..3 {
            assert_eq!(classify(&mut table, (client, 1), 0, 0), Verdict::Order);
            table.ordered((client, 1), 0, 1, client);
        }
        assert_eq!(table.len(), 2, "bounded");
        assert_eq!(table.evicted(), 1);
        // Client 0 was forgotten; its record says it ordered up to 9.
        let verdict = table.classify((0, 1), 10, Timestamp::ZERO, 10, || Some((10, 6)));
        assert_eq!(verdict, Verdict::Order, "order 5 goes on after the record");
        assert_eq!(
            table.classify((0, 1), 9, Timestamp::ZERO, 9, || None),
            Verdict::RejectedOutsideWindow,
            "positions below the record's next sequence are not known"
        );
    }

    #[test]
    fn after_a_restore_the_window_starts_at_the_lowest_known_position() {
        let mut table = table(true);
        table.restore(KEY, 20, 0);
        table.ordered(KEY, 18, 1, 1);
        table.ordered(KEY, 19, 1, 2);
        table.finish_restore();
        assert_eq!(table.progress(KEY), Some((20, 18)));
        assert_eq!(
            classify(&mut table, KEY, 17, 0),
            Verdict::RejectedOutsideWindow
        );
        assert_eq!(
            classify(&mut table, KEY, 19, 0),
            Verdict::Duplicate(Some(2))
        );
        assert_eq!(classify(&mut table, KEY, 20, 0), Verdict::Order);
    }
}
