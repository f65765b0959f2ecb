//! The whole system under one deterministic simulation, in the way of TigerBeetle's VOPR.
//!
//! One seed builds a world: 1 to 3 brokers (the broker's own connection state machine and
//! state, [`BrokerState`]), the sequencer on the head with every broker standing by to take
//! its lease over, publishers (the client's own [`PublisherCore`]) and subscribers, over a
//! simulated network ([`net`]: in-order streams with latency, partial writes and resets) and
//! a simulated clock. While the publishers publish, faults strike at random: connection
//! resets, broker crashes (a restart follows), and pauses, some longer than the sequencer's
//! lease so that a standby takes over and the paused holder must find itself fenced. Then
//! the faults heal and the run must finish: every message acknowledged (or rejected with a
//! reason), every subscriber at the end of the log.
//!
//! Checkers ([`check`]): every acknowledged message is in the log exactly once, at the
//! position its ack named, with its bytes; no message is in the log twice; at order 5 each
//! publisher's messages are in its own order; subscribers saw the log's bytes at every
//! position, without gaps; liveness as above; and, for a replicated topic, every message
//! acknowledged at level 2 survives the loss of the pool. The same seed reproduces the same run:
//! one thread, one random generator, time only from the simulated clock.
//!
//! Half the worlds with two brokers or more replicate the topic to every broker's files
//! (the broker's own `Replicator`, on real files in a temporary directory) and publish at
//! ack level 2. A crashed broker's replica loses what it had not synced (it writes only when
//! it syncs), and a crash may tear a write (garbage after the last record, which reopening
//! must cut). At the end the pool is lost: the log is rebuilt from the replica files
//! (`restore`), and every message acknowledged at level 2 must be in it, in place.
//!
//! Not simulated here: the pool's non-coherent memory model (the core simulation in
//! `shared-log` covers it) and the XDP path (the same connection state machine runs on
//! both backends).

mod check;
mod net;

use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use broker::metrics::Metrics;
use broker::server::connection::Connection;
use broker::server::limits::ClientLimits;
use broker::server::replica::{self, ReplicaConfig, Replicator};
use broker::server::state::{BrokerSettings, BrokerState, RoutedOutcome};
use shared_log::coherence::{CoherenceMode, PoolMemory};
use shared_log::heap::HeapRegion;
use shared_log::layout::Geometry;
use shared_log::pool::{Pool, TopicConfig, TopicId};
use shared_log::sequencer::{LeaseWatch, Sequencer, SequencerConfig, read_lease};
use units::Timestamp;
use wire::{AckLevel, Decoded, Frame, FrameDecoder, HelloOkRepr, HelloRepr, Order, Role, Topic};

use crate::error::ClientError;
use crate::publisher_core::{
    Command, ConnId, CoreParams, InFlightWindow, PublisherCore, PublisherEvent,
};
use net::{BrokerEnd, Link};

/// A bug injected into the simulated clients or network (never into the broker), to show
/// that the checkers catch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SimFault {
    /// The publisher's adapter skips every batch it is asked to send a second time: a
    /// publisher that forgets to resend after a connection was lost.
    ForgetResend,
    /// The network loses part of a chunk of a broker's output: a transport that is not
    /// reliable.
    DropBytes,
    /// When the pool is lost at the end, every replica disk also loses its last synced
    /// record: a disk that acknowledges `fdatasync` without persisting.
    LoseSynced,
}

/// What one run did.
#[derive(Debug, Clone, Default)]
pub struct SimReport {
    /// A digest of the run (its log, its faults, its clock): two runs of one seed agree.
    pub digest: u64,
    /// Brokers in the world.
    pub brokers: usize,
    /// Publishers in the world.
    pub publishers: usize,
    /// Subscribers in the world.
    pub subscribers: usize,
    /// Messages published (all publishers).
    pub messages: u64,
    /// Connections reset.
    pub resets: u64,
    /// Broker crashes (each followed by a restart).
    pub crashes: u64,
    /// Broker pauses.
    pub pauses: u64,
    /// Partitions of a broker from its clients.
    pub partitions: u64,
    /// Crashes that tore a replica write.
    pub torn_writes: u64,
    /// Sequencer lease takeovers.
    pub takeovers: u64,
    /// Batches publishers resent after a connection was lost.
    pub resends: u64,
    /// Whether the topic was replicated (ack level 2), and the pool lost and rebuilt from
    /// the replicas at the end.
    pub replicated: bool,
    /// Simulated time the run took.
    pub sim_ms: u64,
}

/// A small deterministic generator (SplitMix64).
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `1 / n`.
    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    /// A piece size in `1..=max`: often all of it, else a random part.
    fn chunk(&mut self, max: usize) -> usize {
        if max <= 1 || self.one_in(2) {
            return max;
        }
        1 + self.below(max as u64) as usize
    }
}

/// A hold timeout longer than any run: the sequencer then never gives a gap up, so no
/// batch may be rejected (every publisher resends what it lost).
const HOLD_FOREVER_NS: u64 = 3_600_000_000_000;
/// Simulated time a run may take once the faults healed before it counts as stuck.
const LIVENESS_LIMIT_NS: u64 = 20_000_000_000;
/// How long a handshake may take before the client gives up on that broker.
const HANDSHAKE_TIMEOUT_NS: u64 = 500_000_000;
/// The sequencer looks for new topics this often.
const TOPIC_REFRESH_NS: u64 = 5_000_000;
/// Bytes of the identifying header at the start of every simulated message.
const MESSAGE_HEADER_BYTES: usize = 16;

/// The bytes of message `index` of publisher `publisher`: its identity, then filler derived
/// from it, `len` bytes in all.
pub(crate) fn message_bytes(publisher: u32, index: u64, len: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(len);
    bytes.extend_from_slice(&publisher.to_le_bytes());
    bytes.extend_from_slice(&index.to_le_bytes());
    bytes.extend_from_slice(&(len as u32).to_le_bytes());
    let mut x = (u64::from(publisher) << 40) ^ index ^ 0x5EED;
    while bytes.len() < len {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        bytes.push((x >> 56) as u8);
    }
    bytes
}

/// The identity a message's header claims: (publisher, index, length).
pub(crate) fn message_identity(bytes: &[u8]) -> Option<(u32, u64, usize)> {
    if bytes.len() < MESSAGE_HEADER_BYTES {
        return None;
    }
    let publisher = u32::from_le_bytes(bytes[0..4].try_into().ok()?);
    let index = u64::from_le_bytes(bytes[4..12].try_into().ok()?);
    let len = u32::from_le_bytes(bytes[12..16].try_into().ok()?) as usize;
    Some((publisher, index, len))
}

fn broker_addr(index: usize) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(10, 0, 0, 1 + index as u8),
        9100,
    ))
}

fn broker_of(addr: SocketAddr) -> usize {
    match addr {
        SocketAddr::V4(v4) => usize::from(v4.ip().octets()[3]) - 1,
        SocketAddr::V6(_) => usize::MAX,
    }
}

/// A running broker process.
struct Running {
    state: BrokerState<PoolMemory>,
    replicator: Option<Replicator<PoolMemory>>,
    metrics: Arc<Metrics>,
    sequencer: Option<Sequencer<PoolMemory>>,
    topics_refreshed_ns: u64,
    connections: BTreeMap<u64, Connection<PoolMemory>>,
    outcomes: Vec<RoutedOutcome>,
    watch: LeaseWatch,
}

struct Broker {
    running: Option<Running>,
    restart_at_ns: Option<u64>,
    paused_until_ns: u64,
    /// Cut off from clients until then: connections stall, new ones get no answer.
    cut_until_ns: u64,
}

/// A client's view of one link: bytes read and not yet decoded.
struct ClientStream {
    link: u64,
    decoder: FrameDecoder,
    input: Vec<u8>,
}

impl ClientStream {
    fn new(link: u64) -> ClientStream {
        let limits = wire::Limits::default()
            .with_batch_bytes_max(wire::BATCH_BYTES_HARD_MAX)
            .expect("the hard maximum is a valid limit");
        ClientStream {
            link,
            decoder: FrameDecoder::new(limits),
            input: Vec::new(),
        }
    }
}

/// What reading a client stream found.
enum Read {
    /// Frames and delivery pieces decoded, in order.
    Items(Vec<Item>),
    /// The stream ended: `true` when reset.
    Ended(bool),
}

/// One decoded piece of a broker's output.
enum Item {
    Frame(Frame),
    Delivery(wire::DeliveryHeaderRepr),
    Payload(Vec<u8>),
    Batch,
}

/// A connection a publisher is opening.
struct Handshake {
    stream: ClientStream,
    broker: usize,
    deadline_ns: u64,
    purpose: Purpose,
}

enum Purpose {
    /// One of the connections the publisher starts with (slot `i`).
    Initial(usize),
    /// A connection the core asked for; the candidates after this one.
    Attempt {
        slot: usize,
        attempt: u64,
        epoch: u32,
        rest: Vec<usize>,
    },
}

struct SimPublisher {
    id: u32,
    client_id: u64,
    core: Option<PublisherCore>,
    params: CoreParams,
    initial: Vec<Option<(usize, HelloOkRepr)>>,
    handshakes: Vec<Handshake>,
    streams: BTreeMap<ConnId, ClientStream>,
    total: u64,
    next_message: u64,
    next_publish_ns: u64,
    message_bytes_max: usize,
    /// Batches handed to a connection, by (session epoch, sequence), and those handed out
    /// more than once.
    sent: HashSet<(u32, u64)>,
    resent: HashSet<(u32, u64)>,
    acked: Vec<(u64, u32, Option<u64>)>,
    rejected: Vec<(u64, u32)>,
    resends: u64,
}

#[derive(Default)]
struct SimSubscriber {
    stream: Option<ClientStream>,
    subscribed: bool,
    deadline_ns: u64,
    reconnect_at_ns: u64,
    next_position: u64,
    delivery: Option<(wire::DeliveryHeaderRepr, Vec<u8>)>,
    received: Vec<(u64, Vec<u8>)>,
}

/// The world of one run.
struct World {
    seed: u64,
    fault: Option<SimFault>,
    rng: Rng,
    clock: Arc<AtomicU64>,
    now_ns: u64,
    _region: Arc<HeapRegion>,
    pool: Pool<PoolMemory>,
    topic: TopicId,
    topic_name: Topic,
    order: Order,
    ack: AckLevel,
    /// Most batches in flight per publisher connection, when the world bounds it.
    in_flight_cap: Option<usize>,
    /// Replica directories, one per broker, when the topic is replicated.
    replica_dirs: Vec<std::path::PathBuf>,
    replica_config: Option<ReplicaConfig>,
    sequencer_config: SequencerConfig,
    brokers: Vec<Broker>,
    links: BTreeMap<u64, Link>,
    next_link: u64,
    publishers: Vec<SimPublisher>,
    subscribers: Vec<SimSubscriber>,
    report: SimReport,
    trace: Vec<String>,
    /// Contracts broken during the run, reported after the round.
    failures: Vec<String>,
    /// Where the replica directories live (removed with the world).
    replica_root: std::path::PathBuf,
}

impl Drop for World {
    fn drop(&mut self) {
        if !self.replica_dirs.is_empty() {
            let _ = std::fs::remove_dir_all(&self.replica_root);
        }
    }
}

/// Runs seed `seed`; `Err` names the first contract the run broke, with the run's trace.
pub fn run(seed: u64, fault: Option<SimFault>) -> Result<SimReport, String> {
    let mut world = World::new(seed, fault);
    let result = world.run();
    match result {
        Ok(()) => Ok(world.finish()),
        Err(why) => {
            let trace = world.trace.join("\n  ");
            Err(format!("seed {seed}: {why}\n  trace:\n  {trace}"))
        }
    }
}

impl World {
    fn new(seed: u64, fault: Option<SimFault>) -> World {
        let mut rng = Rng::new(seed);
        let brokers = 1 + rng.below(3) as usize;
        let publishers = 1 + rng.below(3) as usize;
        // A third of the worlds never give a gap up: then no batch may be rejected. A gap
        // is only sure to fill when every batch in flight fits in a ring: a batch the
        // sequencer holds keeps its ring slot, and a ring full of held batches keeps out
        // the one they wait for (docs/durability.md). Those worlds bound the windows so.
        let hold_forever = rng.one_in(3);
        let ring_slots = if hold_forever {
            64
        } else {
            [2, 8, 64][rng.below(3) as usize]
        };
        let in_flight_cap =
            hold_forever.then(|| ((ring_slots as usize - 1) / (publishers * brokers)).max(1));
        let geometry = Geometry {
            brokers_max: brokers as u32,
            topics_max: 1,
            ring_slots,
            goi_entries: 1 << 14,
            blog_bytes: 2 << 20,
        };
        let region = Arc::new(HeapRegion::new(geometry.layout_bytes()));
        let pool = Pool::format(region.memory(CoherenceMode::Coherent), geometry, 1)
            .expect("the simulation's geometry is valid");
        let order = if rng.one_in(4) {
            Order::Total
        } else {
            Order::TotalSessionFifo
        };
        // Half the worlds replicate the topic to every broker's files (ack level 2); with one
        // broker the pool copy is the only one.
        let replicated = brokers > 1 && rng.one_in(2);
        let config = TopicConfig {
            order,
            ack: if replicated { 2 } else { 1 },
            replication_factor: if replicated { 2 } else { 1 },
            retention: wire::Retention::StallLimited,
            history: wire::HistoryRetention::UNLIMITED,
        };
        let topic = pool
            .create_topic("sim", config)
            .expect("a fresh topic table");
        let sequencer_config = SequencerConfig {
            hold_timeout_ns: if hold_forever {
                HOLD_FOREVER_NS
            } else {
                [5_000_000, 50_000_000][rng.below(2) as usize]
            },
            ..SequencerConfig::default()
        };
        let subscribers = rng.below(3) as usize;
        let replica_root =
            std::env::temp_dir().join(format!("embarcadero-sim-{}-{seed}", std::process::id()));
        let replica_dirs: Vec<std::path::PathBuf> = if replicated {
            (0..brokers)
                .map(|b| replica_root.join(format!("broker-{b}")))
                .collect()
        } else {
            Vec::new()
        };
        let replica_config = replicated.then(|| ReplicaConfig {
            dir: std::path::PathBuf::new(),
            sync_bytes: 1 + rng.below(64 << 10),
            sync_interval_us: rng.below(5000),
            segment_bytes: 1 + rng.below(64 << 10),
        });
        let _ = std::fs::remove_dir_all(&replica_root);
        let mut world = World {
            seed,
            fault,
            rng,
            clock: Arc::new(AtomicU64::new(0)),
            now_ns: 1_000_000_000,
            _region: region,
            pool,
            topic,
            topic_name: Topic::new("sim").expect("a valid name"),
            order,
            in_flight_cap,
            ack: if replicated {
                AckLevel::Replicated
            } else {
                AckLevel::Ordered
            },
            replica_dirs,
            replica_config,
            sequencer_config,
            brokers: Vec::new(),
            links: BTreeMap::new(),
            next_link: 0,
            publishers: Vec::new(),
            subscribers: Vec::new(),
            report: SimReport {
                brokers,
                publishers,
                subscribers,
                replicated,
                ..SimReport::default()
            },
            trace: Vec::new(),
            failures: Vec::new(),
            replica_root,
        };
        world.clock.store(world.now_ns, Ordering::Relaxed);
        for index in 0..brokers {
            let running = world.start_broker(index);
            world.brokers.push(Broker {
                running: Some(running),
                restart_at_ns: None,
                paused_until_ns: 0,
                cut_until_ns: 0,
            });
        }
        let sequencer = world
            .new_sequencer(0, 1)
            .expect("the head takes the lease of a fresh pool");
        world.brokers[0]
            .running
            .as_mut()
            .expect("just started")
            .sequencer = Some(sequencer);
        for id in 0..publishers as u32 {
            let publisher = world.new_publisher(id);
            world.publishers.push(publisher);
        }
        for _ in 0..subscribers {
            world.subscribers.push(SimSubscriber::default());
        }
        world.note(format!(
            "{brokers} brokers, {publishers} publishers, {subscribers} subscribers, order {:?}, \
             ring slots {}",
            order, geometry.ring_slots
        ));
        world
    }

    fn note(&mut self, what: String) {
        let at = (self.now_ns - 1_000_000_000) / 1000;
        self.trace.push(format!("{at:>9} us  {what}"));
    }

    fn settings(&self, index: usize) -> BrokerSettings {
        BrokerSettings {
            broker_id: index as u16,
            head: index == 0,
            auto_create_topics: false,
            batch_bytes_max: 64 << 10,
            frame_bytes_max: wire::FRAME_BYTES_DEFAULT,
            replication_factor: 1,
            limits: ClientLimits {
                subscriber_stall_ms: 10_000,
                ..ClientLimits::default()
            },
            history_dir: None,
        }
    }

    fn start_broker(&mut self, index: usize) -> Running {
        let metrics = Arc::new(Metrics::default());
        let state = BrokerState::new(
            self.pool.clone(),
            self.settings(index),
            Arc::clone(&metrics),
        );
        // A restarted replica goes on from its files: what it had not synced is gone.
        let replicator = self.replica_config.as_ref().map(|config| {
            let config = ReplicaConfig {
                dir: self.replica_dirs[index].clone(),
                ..config.clone()
            };
            Replicator::new(self.pool.clone(), index as u16, config)
                .expect("a replica directory in the temporary directory")
        });
        Running {
            state,
            replicator,
            metrics,
            sequencer: None,
            topics_refreshed_ns: 0,
            connections: BTreeMap::new(),
            outcomes: Vec::new(),
            watch: LeaseWatch::new(),
        }
    }

    fn new_sequencer(&self, broker: u16, epoch: u64) -> Option<Sequencer<PoolMemory>> {
        let mut sequencer =
            Sequencer::new(self.pool.clone(), broker, epoch, self.sequencer_config).ok()?;
        let clock = Arc::clone(&self.clock);
        sequencer.set_pause_guard(Box::new(move || {
            Timestamp::from_nanos(clock.load(Ordering::Relaxed))
        }));
        Some(sequencer)
    }

    fn new_publisher(&mut self, id: u32) -> SimPublisher {
        let rng = &mut self.rng;
        let brokers: Vec<SocketAddr> = (0..self.brokers.len()).map(broker_addr).collect();
        let params = CoreParams {
            brokers,
            connections_per_broker: 1,
            batch_bytes_max: [256, 1024, 4096][rng.below(3) as usize],
            linger: Duration::from_micros(rng.below(2000)),
            in_flight_batches_max: (1 + rng.below(16) as usize)
                .min(self.in_flight_cap.unwrap_or(usize::MAX)),
            in_flight_window: InFlightWindow::Fixed,
            ack: self.ack,
            session_epoch: 1,
            first_seq: 0,
            session_batches_max: if rng.one_in(4) {
                10 + rng.below(40)
            } else {
                1 << 40
            },
            reconnect_timeout: Duration::from_secs(60),
            resends_max: 10_000,
            report_acks: true,
        };
        let total = 20 + rng.below(300);
        let message_bytes_max = MESSAGE_HEADER_BYTES + rng.below(200) as usize;
        let slots = self.brokers.len();
        let mut publisher = SimPublisher {
            id,
            client_id: 1000 + u64::from(id),
            core: None,
            params,
            initial: vec![None; slots],
            handshakes: Vec::new(),
            streams: BTreeMap::new(),
            total,
            next_message: 0,
            next_publish_ns: 0,
            message_bytes_max,
            sent: HashSet::new(),
            resent: HashSet::new(),
            acked: Vec::new(),
            rejected: Vec::new(),
            resends: 0,
        };
        for slot in 0..slots {
            let handshake = self.open_publisher_link(&publisher, slot, Purpose::Initial(slot));
            publisher.handshakes.push(handshake);
        }
        self.report.messages += total;
        publisher
    }

    fn open_link(&mut self, broker: usize) -> u64 {
        let latency_ns = 5_000 + self.rng.below(100_000);
        let id = self.next_link;
        self.next_link += 1;
        let mut link = Link::new(broker, latency_ns);
        link.cut_until_ns = self.brokers.get(broker).map_or(0, |b| b.cut_until_ns);
        self.links.insert(id, link);
        id
    }

    fn send(&mut self, link: u64, bytes: &[u8]) {
        let now = self.now_ns;
        if let Some(link) = self.links.get_mut(&link)
            && !link.reset
        {
            let arrival = now.max(link.cut_until_ns) + link.latency_ns;
            link.to_broker.push(bytes, arrival);
        }
    }

    fn open_publisher_link(
        &mut self,
        publisher: &SimPublisher,
        broker: usize,
        purpose: Purpose,
    ) -> Handshake {
        let link = self.open_link(broker);
        let session_epoch = match &purpose {
            Purpose::Initial(_) => publisher.params.session_epoch,
            Purpose::Attempt { epoch, .. } => *epoch,
        };
        let hello = HelloRepr {
            role: Role::Publish,
            order: self.order,
            ack: self.ack,
            client_id: publisher.client_id,
            session_epoch,
            topic: self.topic_name,
        };
        self.send(link, &Frame::Hello(hello).to_bytes());
        Handshake {
            stream: ClientStream::new(link),
            broker,
            deadline_ns: self.now_ns + HANDSHAKE_TIMEOUT_NS,
            purpose,
        }
    }

    /// Reads what arrived on a client stream.
    fn read(&mut self, stream: &mut ClientStream) -> Result<Read, String> {
        let now = self.now_ns;
        let Some(link) = self.links.get_mut(&stream.link) else {
            return Ok(Read::Ended(true));
        };
        if link.reset {
            return Ok(Read::Ended(true));
        }
        if link.cut_until_ns > now {
            return Ok(Read::Items(Vec::new()));
        }
        let ended = link.to_client.drain_into(&mut stream.input, now);
        let mut items = Vec::new();
        let mut at = 0;
        while at < stream.input.len() {
            let (used, decoded) = stream
                .decoder
                .decode(&stream.input[at..])
                .map_err(|e| format!("a broker sent a malformed stream: {e}"))?;
            at += used;
            match decoded {
                Decoded::NeedMore(_) => {}
                Decoded::Frame(frame) => items.push(Item::Frame(frame)),
                Decoded::Delivery(header) => items.push(Item::Delivery(header)),
                Decoded::Payload { bytes, .. } => items.push(Item::Payload(bytes.to_vec())),
                Decoded::Batch(_) => items.push(Item::Batch),
            }
        }
        stream.input.drain(..at);
        if items.is_empty() && ended {
            return Ok(Read::Ended(false));
        }
        Ok(Read::Items(items))
    }

    fn close_client_end(&mut self, link: u64) {
        let now = self.now_ns;
        if let Some(link) = self.links.get_mut(&link) {
            link.to_broker.close(now);
        }
    }

    fn broker_up(&self, broker: usize) -> bool {
        self.brokers
            .get(broker)
            .is_some_and(|b| b.running.is_some())
    }

    fn run(&mut self) -> Result<(), String> {
        let fault_end_ns = self.now_ns + 100_000_000 + self.rng.below(900_000_000);
        let mut healed_at: Option<u64> = None;
        loop {
            self.clock.store(self.now_ns, Ordering::Relaxed);
            let started = self.publishers.iter().all(|p| p.core.is_some());
            let published = self.publishers.iter().all(|p| p.next_message == p.total);
            if healed_at.is_none() && started {
                if self.now_ns < fault_end_ns && !published {
                    self.maybe_fault();
                } else {
                    self.heal();
                    healed_at = Some(self.now_ns);
                }
            }
            self.restart_due();
            for index in 0..self.brokers.len() {
                self.poll_broker(index);
            }
            for index in 0..self.publishers.len() {
                self.poll_publisher(index)?;
            }
            for index in 0..self.subscribers.len() {
                self.poll_subscriber(index)?;
            }
            if let Some(failure) = self.failures.first() {
                return Err(failure.clone());
            }
            self.links.retain(|_, link| {
                !(link.broker_gone && link.to_client.is_closed() && link.to_broker.is_closed())
            });
            if let Some(healed) = healed_at {
                if self.done() {
                    check::check(self)?;
                    if self.report.replicated {
                        return check::pool_loss(self);
                    }
                    return Ok(());
                }
                if self.now_ns - healed > LIVENESS_LIMIT_NS {
                    return Err(format!(
                        "not done {} s after the faults healed: {}",
                        LIVENESS_LIMIT_NS / 1_000_000_000,
                        self.progress()
                    ));
                }
            }
            self.now_ns += 20_000 + self.rng.below(180_000);
        }
    }

    fn progress(&self) -> String {
        let publishers: Vec<String> = self
            .publishers
            .iter()
            .map(|p| {
                let acked: u64 = p.acked.iter().map(|a| u64::from(a.1)).sum();
                let outstanding = p.core.as_ref().map_or(0, PublisherCore::outstanding_batches);
                let slots = p
                    .core
                    .as_ref()
                    .map_or(String::new(), PublisherCore::describe_slots);
                format!(
                    "publisher {}: published {}/{}, acked {acked}, outstanding batches {outstanding} \
                     [{slots}]",
                    p.id, p.next_message, p.total
                )
            })
            .collect();
        let subscribers: Vec<String> = self
            .subscribers
            .iter()
            .enumerate()
            .map(|(i, s)| format!("subscriber {i} at {}", s.next_position))
            .collect();
        let (_, end) = self
            .pool
            .read_frontier(self.pool.geometry().seq_state_offset(self.topic));
        let geometry = *self.pool.geometry();
        let brokers: Vec<String> = (0..self.brokers.len())
            .map(|b| {
                let (written, _) = self.pool.read_frontier(geometry.frontier_offset(
                    self.topic,
                    b as u16,
                    shared_log::layout::FRONTIER_WRITTEN,
                ));
                let (released, _) = self.pool.read_frontier(geometry.frontier_offset(
                    self.topic,
                    b as u16,
                    shared_log::layout::FRONTIER_ORDERED,
                ));
                let sequencer = self.brokers[b]
                    .running
                    .as_ref()
                    .and_then(|r| r.sequencer.as_ref())
                    .map_or(String::new(), |s| format!(", sequencer {:?}", s.stats()));
                format!("ring {b}: written {written}, released {released}{sequencer}")
            })
            .collect();
        format!(
            "log end {end}; {}; {}; {}",
            publishers.join(", "),
            subscribers.join(", "),
            brokers.join("; ")
        )
    }

    fn done(&self) -> bool {
        let (_, end) = self
            .pool
            .read_frontier(self.pool.geometry().seq_state_offset(self.topic));
        self.publishers.iter().all(|p| {
            p.next_message == p.total && p.core.as_ref().is_some_and(PublisherCore::is_flushed)
        }) && self.subscribers.iter().all(|s| s.next_position == end)
    }

    fn maybe_fault(&mut self) {
        if !self.rng.one_in(400) {
            return;
        }
        let now = self.now_ns;
        match self.rng.below(4) {
            0 => {
                let open: Vec<u64> = self
                    .links
                    .iter()
                    .filter(|(_, l)| !l.reset && !l.broker_gone)
                    .map(|(id, _)| *id)
                    .collect();
                if !open.is_empty() {
                    let id = open[self.rng.below(open.len() as u64) as usize];
                    if let Some(link) = self.links.get_mut(&id) {
                        link.reset = true;
                    }
                    self.report.resets += 1;
                    self.note(format!("reset link {id}"));
                }
            }
            1 => {
                let index = self.rng.below(self.brokers.len() as u64) as usize;
                if self.brokers[index].running.is_some() {
                    self.crash(index);
                    let delay = 1_000_000 + self.rng.below(150_000_000);
                    self.brokers[index].restart_at_ns = Some(now + delay);
                }
            }
            2 => {
                let index = self.rng.below(self.brokers.len() as u64) as usize;
                let until = now + self.rng.below(300_000_000);
                self.brokers[index].cut_until_ns = until;
                for link in self.links.values_mut().filter(|l| l.broker == index) {
                    link.cut_until_ns = until;
                }
                self.report.partitions += 1;
                self.note(format!(
                    "partition broker {index} from its clients for {} us",
                    (until - now) / 1000
                ));
            }
            _ => {
                let index = self.rng.below(self.brokers.len() as u64) as usize;
                let lease_ns = self.sequencer_config.lease_ns;
                let length = self.rng.below(2 * lease_ns);
                if self.brokers[index].running.is_some() {
                    self.brokers[index].paused_until_ns = now + length;
                    self.report.pauses += 1;
                    self.note(format!("pause broker {index} for {} us", length / 1000));
                }
            }
        }
    }

    fn crash(&mut self, index: usize) {
        self.brokers[index].running = None;
        // What its replica had not synced is gone with it (the replica writes only when it
        // syncs); half the time the crash also tears a write: bytes after the last record.
        if let Some(dir) = self.replica_dirs.get(index)
            && self.rng.one_in(2)
            && let Ok(segments) = replica::segment_list(dir, self.topic)
            && let Some(&last) = segments.last()
        {
            let torn: Vec<u8> = (0..1 + self.rng.below(4096))
                .map(|_| self.rng.next_u64() as u8)
                .collect();
            let path = replica::segment_path(dir, self.topic, last);
            if let Ok(mut file) = std::fs::OpenOptions::new().append(true).open(path) {
                let _ = std::io::Write::write_all(&mut file, &torn);
            }
            self.report.torn_writes += 1;
            self.note(format!(
                "broker {index}: a torn write after its replica's last record"
            ));
        }
        self.brokers[index].paused_until_ns = 0;
        for link in self.links.values_mut().filter(|l| l.broker == index) {
            if !link.broker_gone {
                link.reset = true;
                link.broker_gone = true;
            }
        }
        self.report.crashes += 1;
        self.note(format!("crash broker {index}"));
    }

    fn restart_due(&mut self) {
        for index in 0..self.brokers.len() {
            if self.brokers[index]
                .restart_at_ns
                .is_some_and(|at| at <= self.now_ns)
            {
                self.brokers[index].restart_at_ns = None;
                let running = self.start_broker(index);
                self.brokers[index].running = Some(running);
                self.note(format!("restart broker {index}"));
            }
        }
    }

    fn heal(&mut self) {
        for index in 0..self.brokers.len() {
            if self.brokers[index].restart_at_ns.is_some() {
                self.brokers[index].restart_at_ns = Some(self.now_ns);
            }
            self.brokers[index].paused_until_ns = 0;
            self.brokers[index].cut_until_ns = 0;
        }
        for link in self.links.values_mut() {
            link.cut_until_ns = 0;
        }
        self.note("faults healed".to_owned());
    }

    fn poll_broker(&mut self, index: usize) {
        let now_ns = self.now_ns;
        let now = Timestamp::from_nanos(now_ns);
        if self.brokers[index].paused_until_ns > now_ns {
            return;
        }
        let Some(mut running) = self.brokers[index].running.take() else {
            return;
        };
        // Accept what connected meanwhile.
        for (&id, link) in &self.links {
            if link.broker == index && !link.broker_gone && !running.connections.contains_key(&id) {
                running
                    .connections
                    .insert(id, Connection::new(id, &running.state, now));
            }
        }
        match &mut running.sequencer {
            Some(sequencer) => {
                if now_ns - running.topics_refreshed_ns >= TOPIC_REFRESH_NS {
                    running.topics_refreshed_ns = now_ns;
                    let _ = sequencer.refresh_topics();
                }
                sequencer.poll(now);
                if sequencer.is_fenced() {
                    running.sequencer = None;
                    self.note(format!("broker {index}: its sequencer is fenced"));
                }
            }
            None => {
                if let Some(epoch) = running.watch.observe(read_lease(&self.pool), now) {
                    match self.new_sequencer(index as u16, epoch) {
                        Some(sequencer) => {
                            running.sequencer = Some(sequencer);
                            self.report.takeovers += 1;
                            self.note(format!("broker {index} takes the lease, epoch {epoch}"));
                        }
                        None => running.watch.restart(now),
                    }
                }
            }
        }
        if let Some(replicator) = &mut running.replicator
            && let Err(e) = replicator.poll(now)
        {
            // The pool holds every batch a run writes and the files are the replica's own:
            // any error is a bug.
            replicator.release();
            self.failures
                .push(format!("broker {index}: replication failed: {e}"));
        }
        running.outcomes.clear();
        running.state.poll_outcomes(&mut running.outcomes);
        for outcome in &running.outcomes {
            if let Some(connection) = running.connections.get_mut(&outcome.conn) {
                connection.on_outcome(outcome, &running.metrics, now);
            }
        }
        let ids: Vec<u64> = running.connections.keys().copied().collect();
        for id in ids {
            let Some(link) = self.links.get_mut(&id) else {
                running.connections.remove(&id);
                continue;
            };
            let connection = running.connections.get_mut(&id).expect("listed");
            let service = {
                let mut end = BrokerEnd {
                    link,
                    now_ns,
                    rng: &mut self.rng,
                };
                connection.service(&mut end, &mut running.state, now, true, true)
            };
            if self.fault == Some(SimFault::DropBytes) && self.rng.one_in(2000) {
                link_lose(self.links.get_mut(&id), &mut self.rng);
            }
            if service.ended {
                connection.on_closed(&mut running.state);
                running.connections.remove(&id);
                if let Some(link) = self.links.get_mut(&id) {
                    link.to_client.close(now_ns);
                    link.broker_gone = true;
                }
            }
        }
        let subscriptions: Vec<(TopicId, u64)> = running
            .connections
            .values()
            .filter_map(Connection::subscription)
            .collect();
        running
            .state
            .publish_subscriptions(subscriptions.into_iter(), now);
        self.brokers[index].running = Some(running);
    }

    fn poll_publisher(&mut self, index: usize) -> Result<(), String> {
        let mut publisher = std::mem::replace(&mut self.publishers[index], placeholder());
        let result = self.drive_publisher(&mut publisher);
        self.publishers[index] = publisher;
        result
    }

    fn drive_publisher(&mut self, p: &mut SimPublisher) -> Result<(), String> {
        let now = Timestamp::from_nanos(self.now_ns);
        self.poll_handshakes(p)?;
        let Some(mut core) = p.core.take() else {
            return Ok(());
        };
        // Publish on schedule.
        while p.next_message < p.total && self.now_ns >= p.next_publish_ns {
            let len = MESSAGE_HEADER_BYTES
                + self
                    .rng
                    .below((p.message_bytes_max - MESSAGE_HEADER_BYTES + 1) as u64)
                    as usize;
            let message = message_bytes(p.id, p.next_message, len);
            match core.publish(&message, now) {
                Ok(()) => {
                    p.next_message += 1;
                    p.next_publish_ns = self.now_ns + self.rng.below(300_000);
                }
                Err(ClientError::WouldBlock { .. }) => break,
                Err(e) => return Err(format!("publisher {} failed: {e}", p.id)),
            }
        }
        if p.next_message == p.total {
            let _ = core.seal(now);
        }
        core.poll(now);
        // Read what the brokers sent.
        let conns: Vec<ConnId> = p.streams.keys().copied().collect();
        for conn in conns {
            let mut stream = p.streams.remove(&conn).expect("listed");
            match self.read(&mut stream)? {
                Read::Items(items) => {
                    for item in items {
                        match item {
                            Item::Frame(frame) => core.on_frame(conn, frame, now),
                            Item::Delivery(_) | Item::Payload(_) | Item::Batch => {
                                return Err(format!(
                                    "a broker sent publisher {} a data frame",
                                    p.id
                                ));
                            }
                        }
                    }
                    p.streams.insert(conn, stream);
                }
                Read::Ended(reset) => {
                    let error = reset.then(|| ClientError::Io {
                        addr: broker_addr(self.links.get(&stream.link).map_or(0, |l| l.broker)),
                        doing: "reading",
                        source: Arc::new(std::io::ErrorKind::ConnectionReset.into()),
                    });
                    core.on_connection_ended(conn, error, now);
                    self.close_client_end(stream.link);
                }
            }
        }
        self.dispatch(p, &mut core)?;
        for event in core.take_events() {
            match event {
                PublisherEvent::Acked {
                    first_message_index,
                    message_count,
                    global_start,
                    ..
                } => p
                    .acked
                    .push((first_message_index, message_count, global_start)),
                // A sequencer that never gives a gap up rejects only resends (whose first
                // copy it may have ordered: the documented "once or not at all").
                PublisherEvent::Rejected {
                    batch_seq, reason, ..
                } if self.sequencer_config.hold_timeout_ns == HOLD_FOREVER_NS
                    && !p.resent.contains(&(core.session_epoch(), batch_seq)) =>
                {
                    return Err(format!(
                        "publisher {}: batch {batch_seq}, sent once, rejected although the \
                         sequencer never gives a gap up: {reason}",
                        p.id
                    ));
                }
                PublisherEvent::Rejected {
                    first_message_index: Some(first),
                    message_count: Some(count),
                    ..
                } => p.rejected.push((first, count)),
                PublisherEvent::Rejected { .. } | PublisherEvent::PoolFull { .. } => {}
            }
        }
        if let Some(failure) = core.failure() {
            return Err(format!("publisher {} failed: {failure}", p.id));
        }
        p.core = Some(core);
        Ok(())
    }

    fn dispatch(&mut self, p: &mut SimPublisher, core: &mut PublisherCore) -> Result<(), String> {
        let now = Timestamp::from_nanos(self.now_ns);
        while let Some(command) = core.take_command() {
            match command {
                Command::Transmit(transmit) => {
                    let Some(link) = p.streams.get(&transmit.conn).map(|s| s.link) else {
                        continue;
                    };
                    if self.links.get(&link).is_none_or(|l| l.reset) {
                        continue;
                    }
                    let key = (core.session_epoch(), transmit.seq);
                    let again = !p.sent.insert(key);
                    if again {
                        p.resends += 1;
                        p.resent.insert(key);
                    }
                    if !(again && self.fault == Some(SimFault::ForgetResend)) {
                        self.send(link, &transmit.bytes);
                    }
                    core.on_written(transmit.conn, transmit.seq, now);
                }
                Command::Connect(request) => {
                    let mut candidates: Vec<usize> =
                        request.candidates.iter().map(|&a| broker_of(a)).collect();
                    candidates.reverse();
                    let (slot, attempt, epoch) =
                        (request.slot, request.attempt, request.session_epoch);
                    self.try_connect(p, core, slot, attempt, epoch, candidates);
                }
                Command::Goodbye(conn) => {
                    if let Some(link) = p.streams.get(&conn).map(|s| s.link) {
                        self.send(link, &Frame::Goodbye.to_bytes());
                    }
                }
                Command::Close(conn) => {
                    if let Some(stream) = p.streams.remove(&conn) {
                        self.close_client_end(stream.link);
                    }
                }
            }
        }
        Ok(())
    }

    /// Opens a connection to the next candidate that is up (`rest` is in reverse order); with
    /// none left, the attempt failed.
    fn try_connect(
        &mut self,
        p: &mut SimPublisher,
        core: &mut PublisherCore,
        slot: usize,
        attempt: u64,
        epoch: u32,
        mut rest: Vec<usize>,
    ) {
        while let Some(broker) = rest.pop() {
            if self.broker_up(broker) {
                let purpose = Purpose::Attempt {
                    slot,
                    attempt,
                    epoch,
                    rest,
                };
                let handshake = self.open_publisher_link(p, broker, purpose);
                p.handshakes.push(handshake);
                return;
            }
        }
        let error = ClientError::Connect {
            addr: broker_addr(0),
            source: Arc::new(std::io::ErrorKind::ConnectionRefused.into()),
        };
        core.on_connect_failed(slot, attempt, error, Timestamp::from_nanos(self.now_ns));
    }

    fn poll_handshakes(&mut self, p: &mut SimPublisher) -> Result<(), String> {
        let now = Timestamp::from_nanos(self.now_ns);
        let handshakes = std::mem::take(&mut p.handshakes);
        for mut handshake in handshakes {
            let hello_ok = match self.read(&mut handshake.stream)? {
                Read::Items(items) => match items.into_iter().next() {
                    Some(Item::Frame(Frame::HelloOk(ok))) => Some(Ok(ok)),
                    Some(Item::Frame(other)) => Some(Err(format!("{other:?}"))),
                    Some(_) => Some(Err("a data frame".to_owned())),
                    None if self.now_ns > handshake.deadline_ns => {
                        Some(Err("no HelloOk in time".to_owned()))
                    }
                    None => None,
                },
                Read::Ended(_) => Some(Err("the connection ended".to_owned())),
            };
            let Some(result) = hello_ok else {
                p.handshakes.push(handshake);
                continue;
            };
            let link = handshake.stream.link;
            match (handshake.purpose, result) {
                (Purpose::Initial(slot), Ok(ok)) => {
                    p.streams.insert(slot as ConnId, handshake.stream);
                    p.initial[slot] = Some((handshake.broker, ok));
                    if p.initial.iter().all(Option::is_some) {
                        let first_seq = p
                            .initial
                            .iter()
                            .flatten()
                            .map(|(_, ok)| ok.next_batch_seq)
                            .max()
                            .unwrap_or(0);
                        let params = CoreParams {
                            first_seq,
                            ..p.params.clone()
                        };
                        p.core = Some(PublisherCore::new(params));
                    }
                }
                (Purpose::Initial(slot), Err(why)) => {
                    return Err(format!(
                        "publisher {}: the first connection of slot {slot} failed: {why}",
                        p.id
                    ));
                }
                (Purpose::Attempt { slot, attempt, .. }, Ok(ok)) => {
                    let Some(core) = p.core.as_mut() else {
                        continue;
                    };
                    match core.on_connected(slot, attempt, broker_addr(handshake.broker), &ok, now)
                    {
                        Some(conn) => {
                            p.streams.insert(conn, handshake.stream);
                        }
                        None => {
                            self.send(link, &Frame::Goodbye.to_bytes());
                            self.close_client_end(link);
                        }
                    }
                }
                (
                    Purpose::Attempt {
                        slot,
                        attempt,
                        epoch,
                        rest,
                    },
                    Err(_),
                ) => {
                    self.close_client_end(link);
                    let mut core = p.core.take().expect("attempts come from the core");
                    self.try_connect(p, &mut core, slot, attempt, epoch, rest);
                    p.core = Some(core);
                }
            }
        }
        Ok(())
    }

    fn poll_subscriber(&mut self, index: usize) -> Result<(), String> {
        let mut subscriber = std::mem::take(&mut self.subscribers[index]);
        let result = self.drive_subscriber(index, &mut subscriber);
        self.subscribers[index] = subscriber;
        result
    }

    fn drive_subscriber(&mut self, index: usize, s: &mut SimSubscriber) -> Result<(), String> {
        let Some(mut stream) = s.stream.take() else {
            if self.now_ns >= s.reconnect_at_ns {
                let up: Vec<usize> = (0..self.brokers.len())
                    .filter(|&b| self.broker_up(b))
                    .collect();
                if !up.is_empty() {
                    let broker = up[self.rng.below(up.len() as u64) as usize];
                    let link = self.open_link(broker);
                    let hello = HelloRepr {
                        role: Role::Subscribe {
                            from_position: s.next_position,
                            batch_bytes_max: 0,
                        },
                        order: self.order,
                        ack: AckLevel::FireAndForget,
                        client_id: 9000 + index as u64,
                        session_epoch: 1,
                        topic: self.topic_name,
                    };
                    self.send(link, &Frame::Hello(hello).to_bytes());
                    s.stream = Some(ClientStream::new(link));
                    s.subscribed = false;
                    s.delivery = None;
                    s.deadline_ns = self.now_ns + HANDSHAKE_TIMEOUT_NS;
                }
            }
            return Ok(());
        };
        let lost = |s: &mut SimSubscriber, world: &mut World, link: u64| {
            world.close_client_end(link);
            s.stream = None;
            s.delivery = None;
            s.reconnect_at_ns = world.now_ns + 1_000_000 + world.rng.below(20_000_000);
        };
        match self.read(&mut stream)? {
            Read::Ended(_) => lost(s, self, stream.link),
            Read::Items(items) => {
                if items.is_empty() && !s.subscribed && self.now_ns > s.deadline_ns {
                    lost(s, self, stream.link);
                    return Ok(());
                }
                for item in items {
                    match item {
                        Item::Frame(Frame::HelloOk(_)) if !s.subscribed => s.subscribed = true,
                        Item::Frame(Frame::Error(e))
                            if e.code == wire::ErrorCode::PositionTruncated =>
                        {
                            return Err(format!(
                                "subscriber {index}: position {} truncated: {}",
                                s.next_position,
                                e.reason()
                            ));
                        }
                        Item::Frame(_) => {
                            lost(s, self, stream.link);
                            return Ok(());
                        }
                        Item::Delivery(header) => {
                            if header.global_start != Some(s.next_position) {
                                return Err(format!(
                                    "subscriber {index}: a delivery at {:?} where {} was next",
                                    header.global_start, s.next_position
                                ));
                            }
                            s.delivery = Some((header, Vec::new()));
                            self.end_delivery(index, s)?;
                        }
                        Item::Payload(bytes) => {
                            let Some((_, payload)) = s.delivery.as_mut() else {
                                return Err(format!(
                                    "subscriber {index}: payload without a delivery"
                                ));
                            };
                            payload.extend_from_slice(&bytes);
                            self.end_delivery(index, s)?;
                        }
                        Item::Batch => {
                            return Err(format!("subscriber {index} got a Batch frame"));
                        }
                    }
                }
                s.stream = Some(stream);
            }
        }
        Ok(())
    }

    fn end_delivery(&mut self, index: usize, s: &mut SimSubscriber) -> Result<(), String> {
        let complete = s
            .delivery
            .as_ref()
            .is_some_and(|(header, payload)| payload.len() == header.payload_bytes as usize);
        if !complete {
            return Ok(());
        }
        let (header, payload) = s.delivery.take().expect("complete");
        wire::verify_payload(&header, &payload)
            .map_err(|e| format!("subscriber {index}: a bad delivery: {e}"))?;
        for message in wire::payload::messages(&payload) {
            let message = message.map_err(|e| format!("subscriber {index}: a bad message: {e}"))?;
            s.received.push((s.next_position, message.to_vec()));
            s.next_position += 1;
        }
        Ok(())
    }

    fn finish(&mut self) -> SimReport {
        self.report.sim_ms = (self.now_ns - 1_000_000_000) / 1_000_000;
        self.report.resends = self.publishers.iter().map(|p| p.resends).sum();
        let mut digest = Fnv::new();
        digest.add(self.seed);
        digest.add(self.now_ns);
        for line in &self.trace {
            digest.add_bytes(line.as_bytes());
        }
        for publisher in &self.publishers {
            for &(first, count, start) in &publisher.acked {
                digest.add(first);
                digest.add(u64::from(count));
                digest.add(start.unwrap_or(u64::MAX));
            }
        }
        self.report.digest = digest.0;
        self.report.clone()
    }
}

fn link_lose(link: Option<&mut Link>, rng: &mut Rng) {
    if let Some(link) = link {
        link.to_client.lose_some(rng);
    }
}

fn placeholder() -> SimPublisher {
    SimPublisher {
        id: u32::MAX,
        client_id: 0,
        core: None,
        params: CoreParams {
            brokers: Vec::new(),
            connections_per_broker: 0,
            batch_bytes_max: 0,
            linger: Duration::ZERO,
            in_flight_batches_max: 0,
            in_flight_window: InFlightWindow::Fixed,
            ack: AckLevel::Ordered,
            session_epoch: 0,
            first_seq: 0,
            session_batches_max: 0,
            reconnect_timeout: Duration::ZERO,
            resends_max: 0,
            report_acks: false,
        },
        initial: Vec::new(),
        handshakes: Vec::new(),
        streams: BTreeMap::new(),
        total: 0,
        next_message: 0,
        next_publish_ns: 0,
        message_bytes_max: 0,
        sent: HashSet::new(),
        resent: HashSet::new(),
        acked: Vec::new(),
        rejected: Vec::new(),
        resends: 0,
    }
}

/// FNV-1a, for the run digest.
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn add_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn add(&mut self, value: u64) {
        self.add_bytes(&value.to_le_bytes());
    }
}
