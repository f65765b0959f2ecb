//! Deterministic simulation of the log core on the `simulated` coherence model.
//!
//! [`SimMemory`] is the pool "device"; each agent (broker, sequencer, reader) gets a
//! [`SimAgent`] with a private cache of lines: it reads its own, possibly stale, copy of a
//! line until it invalidates it, and others see its writes only after it flushes them. A run
//! ([`run`]) builds a random world from one seed (brokers, topics with random orders, pool
//! geometry, publisher sessions with random batch sizes, reorders across brokers, resends,
//! lost batches, ring-full and log-full pressure), drives every agent in a seeded random
//! interleaving, and checks the contracts after the run. The same seed reproduces a run
//! exactly. [`Fault`]s remove one half of the discipline inside the model, never in the
//! broker, to show that the checkers catch the bug that stalled the original prototype.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::rc::Rc;
use std::time::Duration;

use crate::Order;
use crate::coherence::{CACHE_LINE_BYTES, SharedMemory, lines};
use crate::layout::CompletionStatus;
use crate::layout::Geometry;
use crate::pool::{Pool, TopicConfig, TopicId};
use crate::reader::{LogReader, ReadError};
use crate::sequencer::{Sequencer, SequencerConfig};
use crate::writer::{AppendError, BatchMeta, Reservation, TopicWriter};
use units::Timestamp;

/// The shared "device" of the simulated pool.
#[derive(Debug)]
pub struct SimMemory {
    bytes: RefCell<Vec<u8>>,
}

impl SimMemory {
    /// A zeroed device of `len_bytes` (a multiple of the cache line).
    pub fn new(len_bytes: u64) -> Rc<SimMemory> {
        Rc::new(SimMemory {
            bytes: RefCell::new(vec![
                0;
                len_bytes.next_multiple_of(CACHE_LINE_BYTES) as usize
            ]),
        })
    }
}

#[derive(Debug, Clone)]
struct CachedLine {
    data: [u8; CACHE_LINE_BYTES as usize],
    dirty: bool,
}

/// Operations a [`Fault`] makes one agent silently skip.
#[derive(Debug, Clone, Default)]
struct Skips {
    invalidate: Vec<Range<u64>>,
    flush: Vec<Range<u64>>,
}

fn covers(ranges: &[Range<u64>], line: u64) -> bool {
    ranges.iter().any(|range| range.contains(&line))
}

/// One agent's view of a [`SimMemory`], with its private cache.
#[derive(Debug, Clone)]
pub struct SimAgent {
    memory: Rc<SimMemory>,
    cache: Rc<RefCell<HashMap<u64, CachedLine>>>,
    skips: Rc<Skips>,
    /// Lines this agent wrote to memory (write-backs and compare-and-swaps).
    written: Rc<std::cell::Cell<u64>>,
}

impl SimAgent {
    /// A new agent with an empty cache.
    pub fn new(memory: &Rc<SimMemory>) -> SimAgent {
        SimAgent {
            memory: Rc::clone(memory),
            cache: Rc::default(),
            skips: Rc::default(),
            written: Rc::default(),
        }
    }

    fn with_skips(memory: &Rc<SimMemory>, skips: Skips) -> SimAgent {
        SimAgent {
            memory: Rc::clone(memory),
            cache: Rc::default(),
            skips: Rc::new(skips),
            written: Rc::default(),
        }
    }

    fn with_line<R>(&self, line: u64, f: impl FnOnce(&mut CachedLine) -> R) -> R {
        let mut cache = self.cache.borrow_mut();
        let cached = cache.entry(line).or_insert_with(|| {
            let bytes = self.memory.bytes.borrow();
            let mut data = [0; CACHE_LINE_BYTES as usize];
            data.copy_from_slice(&bytes[line as usize..(line + CACHE_LINE_BYTES) as usize]);
            CachedLine { data, dirty: false }
        });
        f(cached)
    }

    /// Lines this agent (and its clones) wrote to memory so far.
    pub fn lines_written(&self) -> u64 {
        self.written.get()
    }

    fn write_back(&self, line: u64, cached: &CachedLine) {
        self.written.set(self.written.get() + 1);
        let mut bytes = self.memory.bytes.borrow_mut();
        bytes[line as usize..(line + CACHE_LINE_BYTES) as usize].copy_from_slice(&cached.data);
    }
}

impl SharedMemory for SimAgent {
    fn len_bytes(&self) -> u64 {
        self.memory.bytes.borrow().len() as u64
    }

    fn read(&self, offset: u64, out: &mut [u8]) {
        let mut done = 0usize;
        for line in lines(offset, out.len() as u64) {
            let from = (offset + done as u64 - line) as usize;
            let n = (CACHE_LINE_BYTES as usize - from).min(out.len() - done);
            self.with_line(line, |cached| {
                out[done..done + n].copy_from_slice(&cached.data[from..from + n]);
            });
            done += n;
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut done = 0usize;
        for line in lines(offset, data.len() as u64) {
            let from = (offset + done as u64 - line) as usize;
            let n = (CACHE_LINE_BYTES as usize - from).min(data.len() - done);
            self.with_line(line, |cached| {
                cached.data[from..from + n].copy_from_slice(&data[done..done + n]);
                cached.dirty = true;
            });
            done += n;
        }
    }

    fn load_u64(&self, offset: u64) -> u64 {
        let mut bytes = [0; 8];
        self.read(offset, &mut bytes);
        u64::from_le_bytes(bytes)
    }

    fn store_u64(&self, offset: u64, value: u64) {
        self.write(offset, &value.to_le_bytes());
    }

    fn compare_exchange_u64(&self, offset: u64, current: u64, new: u64) -> Result<u64, u64> {
        // Straight on memory, as a device atomic would be; this agent's copy is dropped.
        let line = offset - offset % CACHE_LINE_BYTES;
        self.cache.borrow_mut().remove(&line);
        let mut bytes = self.memory.bytes.borrow_mut();
        let word = &mut bytes[offset as usize..offset as usize + 8];
        let found = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        if found != current {
            return Err(found);
        }
        word.copy_from_slice(&new.to_le_bytes());
        self.written.set(self.written.get() + 1);
        Ok(found)
    }

    fn with_bytes<R>(&self, offset: u64, len: u64, f: impl FnOnce(&[u8]) -> R) -> R {
        let mut copy = vec![0; len as usize];
        self.read(offset, &mut copy);
        f(&copy)
    }

    fn fill_bytes<R>(&self, offset: u64, len: u64, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let mut copy = vec![0; len as usize];
        self.read(offset, &mut copy);
        let result = f(&mut copy);
        self.write(offset, &copy);
        result
    }

    fn flush(&self, offset: u64, len: u64) {
        let mut cache = self.cache.borrow_mut();
        for line in lines(offset, len) {
            if covers(&self.skips.flush, line) {
                continue;
            }
            if let Some(cached) = cache.get_mut(&line) {
                if cached.dirty {
                    self.write_back(line, cached);
                    cached.dirty = false;
                }
            }
        }
    }

    fn invalidate(&self, offset: u64, len: u64) {
        let mut cache = self.cache.borrow_mut();
        for line in lines(offset, len) {
            if covers(&self.skips.invalidate, line) {
                continue;
            }
            if let Some(cached) = cache.remove(&line) {
                // clflushopt writes a dirty line back before dropping it.
                if cached.dirty {
                    self.write_back(line, &cached);
                }
            }
        }
    }

    fn fence(&self) {}
}

/// A coherence bug injected into the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The sequencer does not invalidate ring slots before reading them.
    SkipInvalidate,
    /// Brokers do not flush payloads before setting the ready flag.
    SkipFlush,
}

impl std::str::FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "skip-invalidate" => Ok(Fault::SkipInvalidate),
            "skip-flush" => Ok(Fault::SkipFlush),
            other => Err(format!(
                "unknown fault {other:?}: expected skip-invalidate or skip-flush"
            )),
        }
    }
}

/// SplitMix64: small, fast, and the same on every machine.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> SimRng {
        SimRng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `range` (which must not be empty).
    pub fn range(&mut self, range: Range<u64>) -> u64 {
        range.start + self.next_u64() % (range.end - range.start)
    }

    /// True with probability `percent` / 100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.range(0..100) < percent
    }
}

/// What one simulated run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// Steps taken (including the drain).
    pub steps: u64,
    /// Brokers in the world.
    pub brokers: u16,
    /// Orders of the topics.
    pub orders: Vec<u8>,
    /// Batches handed to brokers (including resends).
    pub batches_sent: u64,
    /// Batches the log holds.
    pub batches_in_log: u64,
    /// Completions read by brokers with the batch in the log (ordered or duplicate).
    pub acks: u64,
    /// Completions that were duplicates.
    pub duplicate_acks: u64,
    /// Completions that were explicit rejections (gap, window).
    pub rejections: u64,
    /// Times a broker found its ring or log full.
    pub backpressure_waits: u64,
    /// Gaps resolved by the gap rule.
    pub gaps_resolved: u64,
    /// Errors the slow reader got for falling behind (allowed).
    pub slow_reader_truncations: u64,
    /// Times a standby took the sequencer lease over (the old holder stays, paused).
    pub takeovers: u64,
}

/// A broken contract, with enough detail to debug it from the seed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("seed {seed}: {what}")]
pub struct Violation {
    /// The seed that reproduces it.
    pub seed: u64,
    /// Which contract and where.
    pub what: String,
}

/// Options of one run.
#[derive(Debug, Clone, Copy)]
pub struct SimOptions {
    /// The seed.
    pub seed: u64,
    /// A coherence bug to inject.
    pub fault: Option<Fault>,
    /// Steps of random activity before the drain.
    pub steps: u64,
    /// Steps the drain may take before liveness is declared broken.
    pub drain_steps_max: u64,
}

impl SimOptions {
    /// Defaults for `seed`.
    pub fn new(seed: u64) -> SimOptions {
        SimOptions {
            seed,
            fault: None,
            steps: 4_000,
            drain_steps_max: 20_000,
        }
    }
}

type BatchKey = (u64, u32, u64);

/// Deterministic payload of a batch: its messages depend only on its key and shape.
fn batch_payload(key: BatchKey, message_count: u32, message_bytes_max: u64) -> Vec<u8> {
    let mut rng = SimRng::new(key.0 ^ (u64::from(key.1) << 40) ^ key.2.wrapping_mul(0x1000_0001));
    let mut payload = Vec::new();
    for _ in 0..message_count {
        let len = rng.range(0..message_bytes_max + 1) as usize;
        let message: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        wire::payload::push_message(&mut payload, &message);
    }
    payload
}

#[derive(Debug)]
struct SessionPlan {
    client_id: u64,
    epoch: u32,
    topic: usize,
    next_seq: u64,
    batches: u64,
}

#[derive(Debug, Clone)]
struct Inbound {
    topic: usize,
    key: BatchKey,
    payload: Rc<Vec<u8>>,
    message_count: u32,
}

struct BrokerAgent {
    writers: Vec<TopicWriter<SimAgent>>,
    inbound: VecDeque<Inbound>,
    reservation: Option<(Inbound, Reservation)>,
    /// (topic, slot) -> (key, step appended)
    slots: HashMap<(usize, u64), (BatchKey, u64)>,
    /// Last global start acked per topic: brokers see their ring in order.
    last_ack_start: Vec<Option<u64>>,
}

struct LoggedBatch {
    key: BatchKey,
    global_start: u64,
    message_count: u32,
    checksum: u32,
}

struct World {
    seed: u64,
    rng: SimRng,
    now: Timestamp,
    step: u64,
    topics: Vec<(TopicId, Order)>,
    brokers: Vec<BrokerAgent>,
    sequencer: Sequencer<SimAgent>,
    /// The current holder's view of memory (a clone shares its write count).
    holder_agent: SimAgent,
    /// Sequencers a standby took the lease from, "paused", with their agent and the lines
    /// it had written at the takeover: no later poll of one may write anything.
    fenced: Vec<(Sequencer<SimAgent>, SimAgent, u64)>,
    memory: Rc<SimMemory>,
    sequencer_skips: Skips,
    sequencer_config: SequencerConfig,
    /// Gaps resolved by the sequencers that lost the lease.
    fenced_gaps: u64,
    /// Whether standbys take the lease over now and then.
    takeovers: bool,
    fast_readers: Vec<Vec<LogReader<SimAgent>>>,
    slow_readers: Vec<LogReader<SimAgent>>,
    sessions: Vec<SessionPlan>,
    /// Payload of every batch ever sent, by key.
    sent: HashMap<BatchKey, Rc<Vec<u8>>>,
    /// Batches held back to be sent late (a lost batch that reappears).
    late: Vec<(u64, usize, Inbound)>,
    /// The log as each fast reader of each topic saw it.
    logs: Vec<Vec<Vec<LoggedBatch>>>,
    acks: HashMap<BatchKey, Vec<(CompletionStatus, Option<u64>)>>,
    liveness_steps_max: u64,
    report: SimReport,
}

fn violation(seed: u64, what: impl Into<String>) -> Violation {
    Violation {
        seed,
        what: what.into(),
    }
}

/// Runs one simulation and checks every contract.
pub fn run(options: SimOptions) -> Result<SimReport, Violation> {
    let mut world = World::build(options)?;
    for _ in 0..options.steps {
        world.step_random()?;
    }
    world.drain(options.drain_steps_max)?;
    world.check_end()?;
    Ok(world.report)
}

impl World {
    fn build(options: SimOptions) -> Result<World, Violation> {
        let seed = options.seed;
        let mut rng = SimRng::new(seed);
        let brokers = rng.range(1..5) as u16;
        let topic_count = rng.range(1..3) as usize;
        let geometry = Geometry {
            brokers_max: u32::from(brokers),
            topics_max: topic_count as u32 + rng.range(0..2) as u32,
            ring_slots: 1 << rng.range(2..5),
            goi_entries: 1 << rng.range(8..11),
            blog_bytes: rng.range(3..17) * 4096,
        };
        let memory = SimMemory::new(geometry.layout_bytes());
        let admin = SimAgent::new(&memory);
        let pool = Pool::format(admin, geometry, seed)
            .map_err(|e| violation(seed, format!("format: {e}")))?;
        let mut topics = Vec::new();
        for t in 0..topic_count {
            let order = [
                Order::Unordered,
                Order::PerBrokerFifo,
                Order::Total,
                Order::TotalSessionFifo,
            ][rng.range(0..4) as usize];
            let config = TopicConfig {
                order,
                ack: 1,
                replication_factor: 1,
                retention: crate::Retention::StallLimited,
                history: crate::HistoryRetention::UNLIMITED,
            };
            let id = pool
                .create_topic(&format!("topic-{t}"), config)
                .map_err(|e| violation(seed, format!("create topic: {e}")))?;
            topics.push((id, order));
        }
        let attach = |agent: SimAgent| {
            Pool::attach(agent).map_err(|e| violation(seed, format!("attach: {e}")))
        };
        let mut broker_agents = Vec::new();
        for b in 0..brokers {
            let mut skips = Skips::default();
            if options.fault == Some(Fault::SkipFlush) {
                for &(topic, _) in &topics {
                    let base = geometry.blog_base(topic, b);
                    skips.flush.push(base..base + geometry.blog_bytes);
                }
            }
            let pool = attach(SimAgent::with_skips(&memory, skips))?;
            let mut writers = Vec::new();
            for &(topic, _) in &topics {
                writers.push(
                    TopicWriter::new(pool.clone(), topic, b)
                        .map_err(|e| violation(seed, format!("writer: {e}")))?,
                );
            }
            broker_agents.push(BrokerAgent {
                writers,
                inbound: VecDeque::new(),
                reservation: None,
                slots: HashMap::new(),
                last_ack_start: vec![None; topic_count],
            });
        }
        let mut sequencer_skips = Skips::default();
        if options.fault == Some(Fault::SkipInvalidate) {
            for &(topic, _) in &topics {
                for b in 0..brokers {
                    let start = geometry.ring_slot_offset(topic, b, 0);
                    let end = start + u64::from(geometry.ring_slots) * CACHE_LINE_BYTES;
                    sequencer_skips.invalidate.push(start..end);
                }
            }
        }
        let config = SequencerConfig {
            scan_slots_max: rng.range(1..17) as u32,
            hold_batches_max: rng.range(2..33) as usize,
            hold_timeout_ns: rng.range(200_000..2_000_000),
            dedup_window: rng.range(8..65) as usize,
            sessions_max: 64,
            lease_ns: 1_000_000_000,
        };
        let holder_agent = SimAgent::with_skips(&memory, sequencer_skips.clone());
        let sequencer = Sequencer::new(attach(holder_agent.clone())?, 0, 1, config)
            .map_err(|e| violation(seed, format!("sequencer: {e}")))?;
        let mut fast_readers = Vec::new();
        let mut slow_readers = Vec::new();
        for &(topic, _) in &topics {
            let mut pair = Vec::new();
            for _ in 0..2 {
                pair.push(
                    LogReader::new(attach(SimAgent::new(&memory))?, topic, true)
                        .map_err(|e| violation(seed, format!("reader: {e}")))?,
                );
            }
            fast_readers.push(pair);
            slow_readers.push(
                LogReader::new(attach(SimAgent::new(&memory))?, topic, true)
                    .map_err(|e| violation(seed, format!("reader: {e}")))?,
            );
        }
        let session_count = rng.range(1..7);
        let sessions = (0..session_count)
            .map(|s| SessionPlan {
                client_id: 100 + s % 4,
                epoch: (s / 4) as u32 + 1,
                topic: rng.range(0..topic_count as u64) as usize,
                next_seq: 0,
                batches: rng.range(20..150),
            })
            .collect();
        Ok(World {
            seed,
            rng,
            now: Timestamp::ZERO,
            step: 0,
            topics,
            brokers: broker_agents,
            sequencer,
            holder_agent,
            fenced: Vec::new(),
            memory: Rc::clone(&memory),
            sequencer_skips,
            sequencer_config: config,
            fenced_gaps: 0,
            takeovers: options.fault.is_none(),
            fast_readers,
            slow_readers,
            sessions,
            sent: HashMap::new(),
            late: Vec::new(),
            logs: (0..topic_count)
                .map(|_| vec![Vec::new(), Vec::new()])
                .collect(),
            acks: HashMap::new(),
            liveness_steps_max: options.drain_steps_max,
            report: SimReport {
                seed,
                brokers,
                orders: Vec::new(),
                ..SimReport::default()
            },
        })
    }

    fn tick(&mut self) {
        self.step += 1;
        self.now += Duration::from_nanos(self.rng.range(1_000..20_000));
    }

    fn step_random(&mut self) -> Result<(), Violation> {
        self.tick();
        match self.rng.range(0..100) {
            0..=29 => self.publish_step(),
            30..=64 => {
                let b = self.rng.range(0..self.brokers.len() as u64) as usize;
                self.broker_step(b)?;
            }
            65..=84 => self.sequencer_step()?,
            85..=97 => self.fast_read_step()?,
            _ => self.slow_read_step()?,
        }
        self.release_late();
        Ok(())
    }

    fn enqueue(&mut self, broker: usize, inbound: Inbound) {
        self.brokers[broker].inbound.push_back(inbound);
        self.report.batches_sent += 1;
    }

    fn publish_step(&mut self) {
        let open: Vec<usize> = (0..self.sessions.len())
            .filter(|&s| self.sessions[s].next_seq < self.sessions[s].batches)
            .collect();
        if open.is_empty() {
            return;
        }
        let s = open[self.rng.range(0..open.len() as u64) as usize];
        let broker = self.rng.range(0..self.brokers.len() as u64) as usize;
        if self.brokers[broker].inbound.len() >= 8 {
            return;
        }
        let plan = &mut self.sessions[s];
        let key = (plan.client_id, plan.epoch, plan.next_seq);
        plan.next_seq += 1;
        let topic = plan.topic;
        let message_count = self.rng.range(1..9) as u32;
        let message_bytes_max = [0, 16, 200, 700][self.rng.range(0..4) as usize];
        let payload = Rc::new(batch_payload(key, message_count, message_bytes_max));
        self.sent.insert(key, Rc::clone(&payload));
        let inbound = Inbound {
            topic,
            key,
            payload,
            message_count,
        };
        match self.rng.range(0..100) {
            // Lost on the way: maybe it shows up much later, maybe never.
            0..=2 => {
                if self.rng.percent(50) {
                    let due = self.step + self.rng.range(100..3_000);
                    let broker = self.rng.range(0..self.brokers.len() as u64) as usize;
                    self.late.push((due, broker, inbound));
                }
            }
            // Sent twice: a retry after a lost ACK, possibly to another broker.
            3..=7 => {
                self.enqueue(broker, inbound.clone());
                let due = self.step + self.rng.range(0..500);
                let other = self.rng.range(0..self.brokers.len() as u64) as usize;
                self.late.push((due, other, inbound));
            }
            _ => self.enqueue(broker, inbound),
        }
    }

    fn release_late(&mut self) {
        let step = self.step;
        let mut due = Vec::new();
        self.late.retain(|(at, broker, inbound)| {
            if *at <= step {
                due.push((*broker, inbound.clone()));
                false
            } else {
                true
            }
        });
        for (broker, inbound) in due {
            self.enqueue(broker, inbound);
        }
    }

    fn broker_step(&mut self, b: usize) -> Result<(), Violation> {
        let seed = self.seed;
        let step = self.step;
        let agent = &mut self.brokers[b];
        // The ACK path: read completions of every topic's ring.
        for t in 0..agent.writers.len() {
            let mut outcomes = Vec::new();
            agent.writers[t].poll_completions(64, |outcome| outcomes.push(outcome));
            for outcome in outcomes {
                let (key, appended) = agent.slots.remove(&(t, outcome.slot)).ok_or_else(|| {
                    violation(
                        seed,
                        format!("completion for unknown slot {}", outcome.slot),
                    )
                })?;
                if step - appended > self.liveness_steps_max {
                    return Err(violation(
                        seed,
                        format!(
                            "liveness: batch {key:?} completed {} steps after it was written",
                            step - appended
                        ),
                    ));
                }
                // Orders 0-2 keep each ring's arrival order; order 5 orders by session seq.
                let ring_order = self.topics[t].1 != Order::TotalSessionFifo;
                if let (true, CompletionStatus::Ordered, Some(start)) =
                    (ring_order, outcome.status, outcome.global_start)
                {
                    if agent.last_ack_start[t].is_some_and(|last| last >= start) {
                        return Err(violation(
                            seed,
                            format!(
                                "per-broker FIFO: broker {b} topic {t} slot {} ordered at {start} before an earlier slot",
                                outcome.slot
                            ),
                        ));
                    }
                    agent.last_ack_start[t] = Some(start);
                }
                self.acks
                    .entry(key)
                    .or_default()
                    .push((outcome.status, outcome.global_start));
            }
        }
        // The receive path: the front batch, or wait for room (backpressure, never a drop).
        if agent.reservation.is_none() {
            let Some(inbound) = agent.inbound.pop_front() else {
                return Ok(());
            };
            match agent.writers[inbound.topic].reserve_at(inbound.payload.len() as u64, self.now) {
                Ok(reservation) => agent.reservation = Some((inbound, reservation)),
                Err(AppendError::RingFull { .. } | AppendError::LogFull { .. }) => {
                    self.report.backpressure_waits += 1;
                    agent.inbound.push_front(inbound);
                    return Ok(());
                }
                Err(e) => return Err(violation(seed, format!("append refused: {e}"))),
            }
        }
        // Half the time the payload is still "on the wire": commit on a later step.
        if self.rng.percent(50) {
            return Ok(());
        }
        let (inbound, reservation) = agent.reservation.take().expect("checked above");
        let writer = &mut agent.writers[inbound.topic];
        writer.fill(&reservation, |buffer| {
            buffer.copy_from_slice(&inbound.payload)
        });
        let meta = BatchMeta {
            client_id: inbound.key.0,
            session_epoch: inbound.key.1,
            batch_seq: inbound.key.2,
            message_count: inbound.message_count,
            checksum: wire::payload::checksum(&inbound.payload),
            flags: 0,
        };
        let slot = writer
            .commit(reservation, meta)
            .map_err(|e| violation(seed, format!("commit refused: {e}")))?;
        agent
            .slots
            .insert((inbound.topic, slot), (inbound.key, step));
        Ok(())
    }

    fn sequencer_step(&mut self) -> Result<(), Violation> {
        // Not with an injected coherence fault: a fresh sequencer cache would hide it.
        if self.takeovers && self.rng.percent(1) {
            self.take_over()?;
        }
        if !self.fenced.is_empty() && self.rng.percent(20) {
            let at = self.rng.range(0..self.fenced.len() as u64) as usize;
            let (old, agent, written_at_takeover) = &mut self.fenced[at];
            // It may still read and decide in its own memory; it must not write.
            old.poll(self.now);
            let written = agent.lines_written() - *written_at_takeover;
            if written != 0 {
                return Err(violation(
                    self.seed,
                    format!(
                        "the sequencer of epoch {} wrote {written} lines after a standby took \
                         the lease over",
                        old.epoch()
                    ),
                ));
            }
        }
        self.sequencer.poll(self.now);
        Ok(())
    }

    /// A standby (with a cache of its own) takes the lease over from the current holder,
    /// which stays around as if paused.
    fn take_over(&mut self) -> Result<(), Violation> {
        let agent = SimAgent::with_skips(&self.memory, self.sequencer_skips.clone());
        let epoch = self.sequencer.epoch() + 1;
        let old_agent = std::mem::replace(&mut self.holder_agent, agent.clone());
        let written_at_takeover = old_agent.lines_written();
        let standby = Sequencer::new(
            Pool::attach(agent).map_err(|e| violation(self.seed, format!("attach: {e}")))?,
            (epoch % self.brokers.len() as u64) as u16,
            epoch,
            self.sequencer_config,
        )
        .map_err(|e| violation(self.seed, format!("takeover at epoch {epoch}: {e}")))?;
        let old = std::mem::replace(&mut self.sequencer, standby);
        self.fenced_gaps += old.stats().gaps_resolved;
        self.fenced.push((old, old_agent, written_at_takeover));
        if self.fenced.len() > 2 {
            self.fenced.remove(0);
        }
        self.report.takeovers += 1;
        Ok(())
    }

    fn fast_read_step(&mut self) -> Result<(), Violation> {
        let seed = self.seed;
        for t in 0..self.topics.len() {
            for r in 0..2 {
                let log = &mut self.logs[t][r];
                let sent = &self.sent;
                let mut mismatch = None;
                let result = self.fast_readers[t][r].poll(usize::MAX, |batch| {
                    let key = (batch.client_id, batch.session_epoch, batch.batch_seq);
                    match sent.get(&key) {
                        Some(payload) if payload.as_slice() == batch.payload => {}
                        Some(_) => {
                            mismatch = Some(format!(
                                "batch {key:?} at ordinal {} has other bytes than were sent",
                                batch.ordinal
                            ))
                        }
                        None => {
                            mismatch = Some(format!(
                                "ordinal {} holds batch {key:?} that nobody sent",
                                batch.ordinal
                            ))
                        }
                    }
                    log.push(LoggedBatch {
                        key,
                        global_start: batch.global_start,
                        message_count: batch.message_count,
                        checksum: batch.checksum,
                    });
                });
                if let Some(what) = mismatch {
                    return Err(violation(seed, what));
                }
                result.map_err(|e| violation(seed, format!("reader {r} of topic {t}: {e}")))?;
            }
            // Both fast readers are registered subscribers (on broker 0's line): writers and
            // the sequencer must keep what they have not read. The slow reader is not.
            let pair = &self.fast_readers[t];
            let lowest = pair[0].next_ordinal().min(pair[1].next_ordinal());
            pair[0]
                .pool()
                .publish_subscribed(self.topics[t].0, 0, Some(lowest));
        }
        Ok(())
    }

    fn slow_read_step(&mut self) -> Result<(), Violation> {
        let seed = self.seed;
        for t in 0..self.topics.len() {
            let reader = &mut self.slow_readers[t];
            let fast = &self.logs[t][0];
            let mut seen = Vec::new();
            match reader.poll(self.rng.range(1..4) as usize, |batch| {
                seen.push((
                    batch.ordinal,
                    (batch.client_id, batch.session_epoch, batch.batch_seq),
                    batch.checksum,
                ));
            }) {
                Ok(_) => {}
                Err(ReadError::Truncated { .. }) => {
                    self.report.slow_reader_truncations += 1;
                    // Fallen a whole ring behind: jump to the end, as a subscriber would.
                    let (_, position_end) = reader.log_end();
                    reader
                        .seek(position_end)
                        .map_err(|e| violation(seed, format!("slow reader seek: {e}")))?;
                    seen.clear();
                }
                Err(ReadError::Overwritten { .. }) => {
                    self.report.slow_reader_truncations += 1;
                    seen.pop();
                }
                Err(e) => return Err(violation(seed, format!("slow reader of topic {t}: {e}"))),
            }
            for (ordinal, key, checksum) in seen {
                match fast.get(ordinal as usize) {
                    Some(batch) if batch.key == key && batch.checksum == checksum => {}
                    Some(batch) => {
                        return Err(violation(
                            seed,
                            format!(
                                "total order: slow reader saw {key:?} at ordinal {ordinal}, fast reader saw {:?}",
                                batch.key
                            ),
                        ));
                    }
                    None => {}
                }
            }
        }
        Ok(())
    }

    fn busy(&self) -> bool {
        !self.late.is_empty()
            || self.brokers.iter().any(|b| {
                !b.inbound.is_empty()
                    || b.reservation.is_some()
                    || b.writers
                        .iter()
                        .any(|w| w.completed_slots() < w.committed_slots())
            })
    }

    fn drain(&mut self, drain_steps_max: u64) -> Result<(), Violation> {
        for s in 0..self.sessions.len() {
            self.sessions[s].batches = self.sessions[s].next_seq;
        }
        let mut steps = 0;
        while self.busy() {
            if steps == drain_steps_max {
                return Err(violation(
                    self.seed,
                    format!(
                        "liveness: {} steps after the publishers stopped, batches are still in flight: {}",
                        drain_steps_max,
                        self.in_flight_summary()
                    ),
                ));
            }
            steps += 1;
            self.tick();
            for b in 0..self.brokers.len() {
                self.broker_step(b)?;
            }
            self.sequencer_step()?;
            self.fast_read_step()?;
            self.release_late();
        }
        self.fast_read_step()?;
        self.report.steps = self.step;
        Ok(())
    }

    fn in_flight_summary(&self) -> String {
        self.brokers
            .iter()
            .enumerate()
            .map(|(b, agent)| {
                let in_flight: Vec<String> = agent
                    .writers
                    .iter()
                    .map(|w| format!("{}/{}", w.completed_slots(), w.committed_slots()))
                    .collect();
                format!(
                    "broker {b}: queued {}, completed/committed {}",
                    agent.inbound.len(),
                    in_flight.join(" ")
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn check_end(&mut self) -> Result<(), Violation> {
        let seed = self.seed;
        self.report.orders = self.topics.iter().map(|&(_, order)| order as u8).collect();
        let mut in_log: HashMap<BatchKey, u64> = HashMap::new();
        for (t, &(_, order)) in self.topics.iter().enumerate() {
            let [first, second] = [&self.logs[t][0], &self.logs[t][1]];
            if first.len() != second.len()
                || first
                    .iter()
                    .zip(second)
                    .any(|(a, b)| a.key != b.key || a.global_start != b.global_start)
            {
                return Err(violation(
                    seed,
                    format!("total order: the two readers of topic {t} disagree"),
                ));
            }
            let mut next_position = 0;
            let mut last_seq: HashMap<(u64, u32), u64> = HashMap::new();
            for (ordinal, batch) in first.iter().enumerate() {
                if batch.global_start != next_position {
                    return Err(violation(
                        seed,
                        format!(
                            "gap: topic {t} ordinal {ordinal} starts at {} instead of {next_position}",
                            batch.global_start
                        ),
                    ));
                }
                next_position += u64::from(batch.message_count);
                if in_log.insert(batch.key, batch.global_start).is_some() {
                    return Err(violation(
                        seed,
                        format!("duplicate: batch {:?} is in the log twice", batch.key),
                    ));
                }
                if order == Order::TotalSessionFifo {
                    let session = (batch.key.0, batch.key.1);
                    if let Some(&last) = last_seq.get(&session) {
                        if batch.key.2 <= last {
                            return Err(violation(
                                seed,
                                format!(
                                    "session FIFO: {session:?} seq {} ordered after seq {last}",
                                    batch.key.2
                                ),
                            ));
                        }
                    }
                    last_seq.insert(session, batch.key.2);
                }
            }
            self.report.batches_in_log += first.len() as u64;
        }
        for (key, outcomes) in &self.acks {
            for &(status, global_start) in outcomes {
                match status {
                    CompletionStatus::Ordered | CompletionStatus::Duplicate => {
                        self.report.acks += 1;
                        if status == CompletionStatus::Duplicate {
                            self.report.duplicate_acks += 1;
                        }
                        let Some(&position) = in_log.get(key) else {
                            return Err(violation(
                                seed,
                                format!("acknowledged batch {key:?} is not in the log"),
                            ));
                        };
                        if global_start.is_some_and(|g| g != position) {
                            return Err(violation(
                                seed,
                                format!(
                                    "batch {key:?} was acknowledged at {global_start:?} but is at {position}"
                                ),
                            ));
                        }
                    }
                    CompletionStatus::RejectedGap | CompletionStatus::RejectedOutsideWindow => {
                        self.report.rejections += 1;
                    }
                    other => {
                        return Err(violation(
                            seed,
                            format!("batch {key:?} completed as {other:?}"),
                        ));
                    }
                }
            }
            let ordered = outcomes
                .iter()
                .filter(|(s, _)| *s == CompletionStatus::Ordered)
                .count();
            if ordered > 1 {
                return Err(violation(
                    seed,
                    format!("batch {key:?} was ordered {ordered} times"),
                ));
            }
        }
        for key in in_log.keys() {
            if !self
                .acks
                .get(key)
                .is_some_and(|o| o.iter().any(|(s, _)| *s == CompletionStatus::Ordered))
            {
                return Err(violation(
                    seed,
                    format!(
                        "batch {key:?} is in the log but no broker was told it was ordered \
                         (told: {:?})",
                        self.acks.get(key)
                    ),
                ));
            }
        }
        let stats = self.sequencer.stats();
        self.report.gaps_resolved = self.fenced_gaps + stats.gaps_resolved;
        let sent_keys: HashSet<&BatchKey> = self.sent.keys().collect();
        if let Some(phantom) = in_log.keys().find(|k| !sent_keys.contains(k)) {
            return Err(violation(
                seed,
                format!("batch {phantom:?} is in the log but was never sent"),
            ));
        }
        Ok(())
    }
}
