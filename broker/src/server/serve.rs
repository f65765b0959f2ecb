//! The network loop of a broker, once for both backends: it takes in what the transport
//! received, admits new connections, routes the sequencer's decisions to the connections
//! that committed the batches, drives every [`Connection`], and sends what they produced.
//! A [`Transport`] is the only part that differs: epoll over kernel sockets
//! ([`kernel`](super::kernel)) or smoltcp over AF_XDP ([`bypass`](super::bypass)).

use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::metrics::Metrics;
use crate::server::connection::{ByteStream, Connection, InputState, PayloadTarget, Service};
use crate::server::kafka::admin::{CreateRefused, TopicCreation};
use crate::server::kafka::groups::Groups;
use crate::server::kafka::log_io::OffsetsFollower;
use crate::server::kafka::offsets::Committed;
use crate::server::kafka::peers::KafkaPeers;
use crate::server::kafka::records::Produced;
use crate::server::kafka::{
    FetchRefused, KafkaConnection, KafkaContext, KafkaNode, KafkaTopic, ProducerSession,
    PublishRefused,
};
use crate::server::ownership::{ClaimGuard, LoopClaimCheck, host_id};
use crate::server::sequencing::SequencerDriver;
use crate::server::state::{BrokerState, ConnId, ConnMap, RoutedOutcome};
use crate::server::{BrokerOptions, Idle};
use shared_log::claim;
use shared_log::coherence::PoolMemory;
use shared_log::pool::{Pool, TopicId};
use units::Timestamp;

/// How long a stopping broker waits for batches in flight to be decided.
const DRAIN: Duration = Duration::from_secs(2);
/// Longest wait when nothing at all is pending, on a transport that wakes on input
/// (bounds the reaction to `stop`).
const IDLE_WAIT: Duration = Duration::from_millis(50);

/// Whether a connection's stream may have input, and room for output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// Input (or the peer's end of stream) may be waiting.
    pub readable: bool,
    /// Output may be accepted.
    pub writable: bool,
}

/// What a connection left behind after a service, for the transport's readiness tracking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Serviced {
    /// It read everything there was.
    pub input_drained: bool,
    /// It wrote, and this much is still queued (`Some(true)`: it stopped at a full stream).
    pub output_left: Option<bool>,
}

impl Serviced {
    fn of(service: &Service, output_left: bool) -> Serviced {
        Serviced {
            input_drained: service.input == Some(InputState::Drained),
            output_left: service.wrote.then_some(output_left),
        }
    }
}

/// How a loop ended, for what the transport owes its open connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Stopped in order: batches in flight were decided (or the drain timed out).
    Stopped,
    /// Ended at once (a crash on request, or the broker id taken over): nothing more is
    /// written to the pool, nothing is drained.
    Abrupt,
}

/// A network backend as the loop sees it: connections by id, each a byte stream with its
/// readiness.
pub trait Transport {
    /// A connection's stream, borrowed for one service.
    type Stream<'a>: ByteStream
    where
        Self: 'a;

    /// The loop's name in logs.
    const NAME: &'static str;
    /// Loop iterations between two reads of the clock (a busy-polling loop cannot afford
    /// one per iteration). The clock is read after every wait that may have blocked.
    const ITERATIONS_PER_CLOCK_READ: u32;
    /// Whether waiting wakes on a client's input (epoll), so a loop with nothing in flight
    /// may wait long; otherwise the loop polls, within its idle backoff (smoltcp's timers
    /// need it).
    const WAKES_ON_INPUT: bool;

    /// Waits at most `timeout` (zero: not at all) for something to arrive. An error ends
    /// the loop in order.
    fn wait(&mut self, timeout: Duration) -> io::Result<()>;
    /// Takes in what arrived, at `now`. A transport that can may place payload straight
    /// into the targets `sink` gives; every target is taken back before this returns (the
    /// connections, which may then finish or drop their batches, are not serviced during
    /// it). Returns whether anything arrived.
    fn receive(&mut self, now: Timestamp, sink: &mut dyn PayloadSink) -> bool;
    /// Offers each newly established connection, with the protocol of the listener it came
    /// in on, to `admit`, which gives its id or the bytes to send it before closing it (a
    /// refusal). Returns whether anything happened.
    fn accept(
        &mut self,
        admit: &mut dyn FnMut(IpAddr, Protocol) -> Result<ConnId, Vec<u8>>,
    ) -> bool;
    /// The stream of connection `id` and its readiness.
    fn stream(&mut self, id: ConnId) -> Option<(Self::Stream<'_>, Readiness)>;
    /// Records what a service of `id` left behind. Returns false when the transport found
    /// the connection gone (the loop then closes it).
    fn serviced(&mut self, id: ConnId, serviced: Serviced) -> bool;
    /// Closes connection `id`.
    fn close(&mut self, id: ConnId);
    /// Ends connection `id` with a reset: what it has not sent yet is discarded, so that
    /// nothing follows bytes that may be torn.
    fn reset(&mut self, id: ConnId);
    /// Sends what the connections produced in this iteration. Returns whether anything
    /// happened.
    fn flush(&mut self, now: Timestamp) -> bool;
    /// Periodic work of the transport itself (each time the clock is read).
    fn housekeeping(&mut self, now: Timestamp, metrics: &Metrics);
    /// Ends every connection as `ending` says (the loop has already let the
    /// [`Connection`]s go).
    fn close_all(&mut self, ending: Ending, now: Timestamp);
}

/// Which protocol a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Ours (`wire`).
    Native,
    /// Kafka's (see [`crate::server::kafka`]).
    Kafka,
}

/// The loop's connections as a transport sees them while it takes in what arrived.
pub trait PayloadSink {
    /// Where connection `id`'s next bytes may land without a copy through the transport's
    /// buffers, if they all belong to a payload being received into the pool.
    fn target(&mut self, id: ConnId) -> Option<PayloadTarget>;
    /// `bytes` of connection `id`'s stream landed at the start of the target it gave.
    fn placed(&mut self, id: ConnId, bytes: usize);
}

/// The loop's connections as a [`PayloadSink`], during one receive at `now`.
struct Placement<'a> {
    clients: &'a mut ConnMap<Client>,
    state: &'a mut BrokerState<PoolMemory>,
    now: Timestamp,
}

impl PayloadSink for Placement<'_> {
    fn target(&mut self, id: ConnId) -> Option<PayloadTarget> {
        self.clients.get(&id)?.connection.payload_target(self.state)
    }

    fn placed(&mut self, id: ConnId, bytes: usize) {
        match self
            .clients
            .get_mut(&id)
            .and_then(|c| c.connection.native_mut())
        {
            Some(connection) => connection.payload_placed(bytes, self.state, self.now),
            // Targets are lent to open connections only, for one receive.
            None => log::error!(
                "broker {}: {bytes} payload bytes landed for connection {id}, which is gone",
                self.state.settings().broker_id
            ),
        }
    }
}

/// What a network loop serves besides its transport.
#[derive(Debug)]
pub struct LoopContext {
    /// The shared pool.
    pub pool: Pool<PoolMemory>,
    /// The broker's metrics.
    pub metrics: Arc<Metrics>,
    /// The broker's claim on its id.
    pub claim: ClaimGuard,
    /// The sequencer, when it runs in this loop (see [`SequencerPlacement`]).
    ///
    /// [`SequencerPlacement`]: crate::server::sequencing::SequencerPlacement
    pub sequencer: Option<SequencerDriver>,
    /// This broker as Kafka clients see it, when it has a Kafka listener.
    pub kafka_node: Option<KafkaNode>,
}

/// What Kafka answers need from the loop: the log, and this broker's node, at the loop's
/// time `now`.
struct KafkaView<'a> {
    state: &'a mut BrokerState<PoolMemory>,
    now: Timestamp,
    node: &'a KafkaNode,
    offsets: &'a mut OffsetsFollower,
    groups: &'a mut Groups,
    peers: &'a mut KafkaPeers,
}

impl KafkaContext for KafkaView<'_> {
    fn node(&self) -> KafkaNode {
        self.node.clone()
    }

    fn brokers(&mut self) -> Vec<KafkaNode> {
        let now = self.now;
        if self.peers.due(now) {
            let pool = self.state.pool();
            let me = self.state.settings().broker_id;
            let brokers = u16::try_from(pool.geometry().brokers_max).unwrap_or(u16::MAX);
            let host = host_id();
            self.peers.observe(
                (0..brokers).filter(|&b| b != me).map(|broker| {
                    (
                        broker,
                        claim::read_claim(pool, broker),
                        claim::advertised_kafka(pool, broker, host),
                    )
                }),
                now,
            );
        }
        self.peers.live(self.node)
    }

    fn groups(&mut self) -> &mut Groups {
        self.groups
    }

    fn topics(&self) -> Vec<(TopicId, String)> {
        self.state.topic_names()
    }

    fn metrics(&self) -> &Metrics {
        self.state.metrics()
    }

    fn offsets_topic(&mut self) -> Option<KafkaTopic> {
        crate::server::kafka::log_io::offsets_topic(self.state)
    }

    fn committed(&mut self, group: &str, topic: &str, partition: i32) -> Option<Committed> {
        self.offsets.catch_up(self.state);
        self.offsets
            .cache
            .committed(group, topic, partition)
            .cloned()
    }

    fn create_topic(&mut self, creation: &TopicCreation) -> Result<KafkaTopic, CreateRefused> {
        crate::server::kafka::log_io::create_topic(self.state, creation)
    }

    fn find_topic(&self, name: &str) -> Option<KafkaTopic> {
        let (id, config) = self.state.find_topic(name).ok().flatten()?;
        Some(KafkaTopic {
            id,
            replicas: usize::from(config.replication_factor.saturating_sub(1)),
        })
    }

    fn publish(
        &mut self,
        topic: TopicId,
        session: ProducerSession,
        produced: &Produced<'_>,
        conn: ConnId,
    ) -> Result<u64, PublishRefused> {
        crate::server::kafka::log_io::publish_records(
            self.state, topic, session, produced, conn, self.now,
        )
    }

    fn replicated_position(&mut self, topic: TopicId, replicas: usize) -> u64 {
        self.state.replicated_position(topic, replicas)
    }

    fn log_end(&self, topic: TopicId) -> Option<u64> {
        crate::server::kafka::log_io::log_end(self.state, topic)
    }

    fn log_bounds(&self, topic: TopicId) -> Result<(u64, u64), String> {
        let reader = self.state.open_reader(topic).map_err(|e| e.to_string())?;
        Ok((reader.log_start(), reader.log_end().1))
    }

    fn fetch(
        &self,
        topic: TopicId,
        position: u64,
        max_bytes: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), FetchRefused> {
        crate::server::kafka::log_io::fetch_record_batches(
            self.state, topic, position, max_bytes, out,
        )
    }
}

/// A client connection in the protocol of the listener it came in on.
#[derive(Debug)]
enum ClientConnection {
    Native(Box<Connection<PoolMemory>>),
    Kafka(Box<KafkaConnection>),
}

impl ClientConnection {
    fn native(&self) -> Option<&Connection<PoolMemory>> {
        match self {
            ClientConnection::Native(connection) => Some(connection),
            ClientConnection::Kafka(_) => None,
        }
    }

    fn native_mut(&mut self) -> Option<&mut Connection<PoolMemory>> {
        match self {
            ClientConnection::Native(connection) => Some(connection),
            ClientConnection::Kafka(_) => None,
        }
    }

    fn payload_target(&self, state: &BrokerState<PoolMemory>) -> Option<PayloadTarget> {
        self.native()?.payload_target(state)
    }

    fn on_closed(&mut self, state: &mut BrokerState<PoolMemory>) {
        if let Some(connection) = self.native_mut() {
            connection.on_closed(state);
        }
    }

    fn subscription(&self) -> Option<(TopicId, u64)> {
        self.native()?.subscription()
    }

    /// Whether it has work that no input announces.
    fn pending(&self) -> bool {
        match self {
            ClientConnection::Native(c) => {
                c.is_subscriber() || c.waits_for_room() || c.awaits_durability()
            }
            ClientConnection::Kafka(c) => c.pending(),
        }
    }

    fn has_output(&self) -> bool {
        match self {
            ClientConnection::Native(connection) => connection.has_output(),
            ClientConnection::Kafka(connection) => connection.has_output(),
        }
    }

    fn must_reset(&self) -> bool {
        self.native().is_some_and(Connection::must_reset)
    }
}

/// A connection of the loop.
struct Client {
    connection: ClientConnection,
    /// The peer's address (its connections count against the per-address limit).
    address: IpAddr,
}

/// The network loop of one broker over transport `T`.
pub struct ServeLoop<T> {
    state: BrokerState<PoolMemory>,
    transport: T,
    clients: ConnMap<Client>,
    next_id: ConnId,
    idle: Idle,
    stop: Arc<AtomicBool>,
    crash: Arc<AtomicBool>,
    /// The claim on the broker id, checked before an iteration's writes to the pool.
    claim: LoopClaimCheck,
    /// The sequencer, when it runs in this loop: polled once per iteration, after the
    /// connections committed what they received.
    sequencer: Option<SequencerDriver>,
    /// The connections one service round goes over (kept to spare an allocation a pass).
    service_ids: Vec<ConnId>,
    /// This broker as Kafka clients see it, when it has a Kafka listener.
    kafka_node: Option<KafkaNode>,
    /// Kafka consumers' committed offsets, as read from the log so far.
    kafka_offsets: OffsetsFollower,
    /// The consumer groups this broker coordinates.
    kafka_groups: Groups,
    /// The other brokers' Kafka listeners.
    kafka_peers: KafkaPeers,
}

impl<T> std::fmt::Debug for ServeLoop<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeLoop")
            .field("broker", &self.state.settings().broker_id)
            .field("clients", &self.clients.len())
            .finish()
    }
}

impl<T: Transport> ServeLoop<T> {
    /// A loop over `transport` for the broker described by `options`, holding `claim`. The
    /// claim's stop flag ends it in order; its crash flag ends it at once, as a crash would
    /// (see [`RunningBroker::kill`](crate::server::RunningBroker::kill)).
    pub fn new(transport: T, options: &BrokerOptions, context: LoopContext) -> ServeLoop<T> {
        let LoopContext {
            pool,
            metrics,
            claim,
            sequencer,
            kafka_node,
        } = context;
        let mut state = BrokerState::new(pool, options.settings.clone(), metrics)
            .with_claim_token(claim.token());
        if kafka_node.is_some() {
            // Kafka consumers commit through any broker: the broker that creates topics
            // makes the offsets topic at once, so that the others find it.
            crate::server::kafka::log_io::offsets_topic(&mut state);
        }
        ServeLoop {
            state,
            transport,
            clients: ConnMap::default(),
            next_id: 1,
            idle: Idle::new(options.idle),
            stop: Arc::clone(claim.stop_flag()),
            crash: Arc::clone(claim.crash_flag()),
            claim: LoopClaimCheck::new(claim),
            sequencer,
            service_ids: Vec::new(),
            kafka_node,
            kafka_offsets: OffsetsFollower::default(),
            kafka_groups: Groups::new(wire::unique_client_id()),
            kafka_peers: KafkaPeers::default(),
        }
    }

    /// Runs until the stop flag is set, then drains and closes every connection; returns
    /// the transport (its counters are the caller's to report). It ends at once instead
    /// when the crash flag is set or the claim on the broker id is found taken over (once a
    /// wait returns, where a pause is most likely spent, see [`LoopClaimCheck`]; or by a
    /// ring writer before it publishes a slot): no drain, nothing more written to the pool.
    pub fn run(mut self) -> T {
        let ending = self.serve();
        self.sequencer = None;
        let now = Timestamp::now();
        let open = self.clients.len();
        let broker = self.state.settings().broker_id;
        match ending {
            Ending::Stopped => {
                for (_, mut client) in self.clients.drain() {
                    client.connection.on_closed(&mut self.state);
                }
                self.transport.close_all(ending, now);
                self.state.on_loop_stopped(T::NAME, open);
            }
            Ending::Abrupt => {
                self.clients.clear();
                self.transport.close_all(ending, now);
                log::warn!(
                    "broker {broker}: {} ended at once ({open} connections dropped)",
                    T::NAME
                );
            }
        }
        self.transport
    }

    fn serve(&mut self) -> Ending {
        let mut outcomes = Vec::new();
        let mut stopping_since = None;
        let mut now = Timestamp::now();
        let mut iterations = 0u32;
        let mut timeout = Duration::ZERO;
        loop {
            if self.crash.load(Ordering::Relaxed) {
                return Ending::Abrupt;
            }
            if let Err(e) = self.transport.wait(timeout) {
                log::error!(
                    "broker {}: {} cannot wait for input: {e}",
                    self.state.settings().broker_id,
                    T::NAME
                );
                return Ending::Stopped;
            }
            if timeout > Duration::ZERO || iterations % T::ITERATIONS_PER_CLOCK_READ == 0 {
                now = Timestamp::now();
                self.transport.housekeeping(now, self.state.metrics());
            }
            iterations = iterations.wrapping_add(1);
            if self.stop.load(Ordering::Relaxed) {
                let since = *stopping_since.get_or_insert(now);
                if self.state.undecided() == 0 || now.saturating_duration_since(since) > DRAIN {
                    return Ending::Stopped;
                }
            }
            // Nothing before this check writes to the pool (receiving may).
            if !self.claim.holds(now) {
                return Ending::Abrupt;
            }
            let mut placement = Placement {
                clients: &mut self.clients,
                state: &mut self.state,
                now,
            };
            let mut worked = self.transport.receive(now, &mut placement);
            worked |= self.accept(now);
            worked |= self.route_outcomes(&mut outcomes, now);
            worked |= self.drive(now);
            worked |= self.sequence(now, &mut outcomes);
            if self.state.claim_moved().is_some() {
                self.claim.guard().lost();
                return Ending::Abrupt;
            }
            worked |= self.transport.flush(now);
            let subscriptions = self
                .clients
                .values()
                .filter_map(|c| c.connection.subscription());
            self.state.publish_subscriptions(subscriptions, now);
            self.idle.record(worked);
            self.idle.set_serving(!self.clients.is_empty());
            timeout = self.next_timeout();
            if !worked && timeout == Duration::ZERO {
                self.idle.wait();
            }
        }
    }

    /// Runs the inline sequencer once, then routes what it decided at once, so that a
    /// batch is received, committed, ordered and acknowledged in one pass. Returns whether
    /// anything happened.
    fn sequence(&mut self, now: Timestamp, outcomes: &mut Vec<RoutedOutcome>) -> bool {
        let Some(driver) = &mut self.sequencer else {
            return false;
        };
        let Some(decided) = driver.step(now) else {
            log::warn!(
                "broker {}: the sequencer in the network loop was fenced by a new holder",
                self.state.settings().broker_id
            );
            self.sequencer = None;
            return true;
        };
        if decided == 0 {
            return false;
        }
        self.route_outcomes(outcomes, now);
        // The acks go out in this pass, before the deliveries the next pass writes: an
        // ack waits for no other connection's output and for no second wait.
        self.service_ids.clear();
        self.service_ids.extend(outcomes.iter().map(|o| o.conn));
        self.service_ids.sort_unstable();
        self.service_ids.dedup();
        self.service_listed(now);
        true
    }

    /// Takes the sequencer's new decisions and hands each to the connection that committed
    /// its batch. Returns whether there were any.
    fn route_outcomes(&mut self, outcomes: &mut Vec<RoutedOutcome>, now: Timestamp) -> bool {
        outcomes.clear();
        let found = self.state.poll_outcomes(outcomes) > 0;
        for outcome in outcomes.iter() {
            self.route(outcome, now);
        }
        found
    }

    /// How long the next wait may block: not at all after work, the idle backoff while
    /// anything is pending, and long when nothing is and input wakes the transport.
    fn next_timeout(&self) -> Duration {
        if !T::WAKES_ON_INPUT || self.pending() {
            self.idle.timeout()
        } else {
            IDLE_WAIT
        }
    }

    /// Whether something is pending that no input announces: the inline sequencer's rings,
    /// outcomes, subscribers' new batches, room in the pool, durability.
    fn pending(&self) -> bool {
        self.sequencer.is_some()
            || self.state.undecided() > 0
            || self.clients.values().any(|c| c.connection.pending())
    }

    fn accept(&mut self, now: Timestamp) -> bool {
        let state = &mut self.state;
        let clients = &mut self.clients;
        let next_id = &mut self.next_id;
        let kafka = self.kafka_node.is_some();
        self.transport.accept(&mut |address, protocol| {
            if let Err(refusal) = state.admit_connection(address) {
                // A Kafka client has no frame for a refusal outside a response: it is closed.
                return Err(match protocol {
                    Protocol::Native => crate::server::connection::refusal_frame(&refusal),
                    Protocol::Kafka => Vec::new(),
                });
            }
            let id = *next_id;
            *next_id += 1;
            let connection = match protocol {
                Protocol::Kafka if kafka => {
                    ClientConnection::Kafka(Box::new(KafkaConnection::new(id).with_peer(address)))
                }
                _ => ClientConnection::Native(Box::new(Connection::new(id, state, now))),
            };
            clients.insert(
                id,
                Client {
                    connection,
                    address,
                },
            );
            log::debug!(
                "broker {}: connection {id} from {address}",
                state.settings().broker_id
            );
            Ok(id)
        })
    }

    fn route(&mut self, outcome: &RoutedOutcome, now: Timestamp) {
        // A closed connection's batches are in the log all the same; only the ACK is moot.
        match self
            .clients
            .get_mut(&outcome.conn)
            .map(|c| &mut c.connection)
        {
            Some(ClientConnection::Native(connection)) => {
                connection.on_outcome(outcome, self.state.metrics(), now);
            }
            Some(ClientConnection::Kafka(connection)) => connection.on_outcome(outcome),
            None => {}
        }
    }

    /// Services every connection; closes those that ended. Returns whether anything
    /// happened.
    fn drive(&mut self, now: Timestamp) -> bool {
        self.service_ids.clear();
        self.service_ids.extend(self.clients.keys().copied());
        self.service_listed(now)
    }

    /// Services the connections listed in `service_ids` (those still open); closes those
    /// that ended. Returns whether anything happened.
    fn service_listed(&mut self, now: Timestamp) -> bool {
        let ids = std::mem::take(&mut self.service_ids);
        let mut worked = false;
        let mut ended = Vec::new();
        for &id in &ids {
            let Some(client) = self.clients.get_mut(&id) else {
                continue;
            };
            let Some((mut stream, ready)) = self.transport.stream(id) else {
                ended.push(id);
                continue;
            };
            let service = match &mut client.connection {
                ClientConnection::Native(connection) => connection.service(
                    &mut stream,
                    &mut self.state,
                    now,
                    ready.readable,
                    ready.writable,
                ),
                ClientConnection::Kafka(connection) => {
                    let Some(node) = &self.kafka_node else {
                        ended.push(id);
                        continue;
                    };
                    let mut view = KafkaView {
                        state: &mut self.state,
                        now,
                        node,
                        offsets: &mut self.kafka_offsets,
                        groups: &mut self.kafka_groups,
                        peers: &mut self.kafka_peers,
                    };
                    connection.service(&mut stream, &mut view, now, ready.readable, ready.writable)
                }
            };
            drop(stream);
            worked |= service.worked();
            let serviced = Serviced::of(&service, client.connection.has_output());
            if !self.transport.serviced(id, serviced) || service.ended {
                ended.push(id);
            }
        }
        for id in ended {
            if let Some(mut client) = self.clients.remove(&id) {
                client.connection.on_closed(&mut self.state);
                self.state.release_connection(client.address);
                if client.connection.must_reset() {
                    self.transport.reset(id);
                } else {
                    self.transport.close(id);
                }
                log::debug!(
                    "broker {}: connection {id} closed",
                    self.state.settings().broker_id
                );
                worked = true;
            }
        }
        // The list's buffer is kept for the next round.
        self.service_ids = ids;
        worked
    }
}
