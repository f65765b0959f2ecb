//! A running broker: the network loop (kernel TCP backend), the sequencer thread on the head
//! broker, and the metrics endpoint. The same [`start`] serves the broker binary and the
//! in-process clusters of the tests.

pub mod bypass;
pub mod connection;
pub mod history;
pub mod in_process;
pub mod kafka;
pub mod kernel;
pub mod limits;
pub mod ownership;
pub mod replica;
pub mod sequencing;
pub mod serve;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::metrics::{Metrics, SequencerRole};
use ownership::{ClaimGuard, HeldClaim, LivenessError, PoolInUse};
use sequencing::{SequencerDriver, SequencerPlacement};
use shared_log::claim::ClaimError;
use shared_log::coherence::{CoherenceMode, PoolMemory};
use shared_log::layout::Geometry;
use shared_log::pool::{Pool, PoolError};
use shared_log::sequencer::{LeaseWatch, Sequencer, SequencerConfig, read_lease};
use state::BrokerSettings;
use units::Timestamp;

/// How a polling thread waits when it finds no work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdleStrategy {
    /// Never wait while a connection is open: lowest latency, burns the core (the xdp
    /// backend's default: its loop owns its pinned core). With none open it backs off as
    /// `sleep` does.
    Spin,
    /// Yield the core to other threads between polls.
    Yield,
    /// Spin briefly, then sleep with a backoff up to 200 us (for shared cores).
    #[default]
    Sleep,
}

impl IdleStrategy {
    /// The default of a network backend: a kernel-bypass loop busy-polls its pinned core
    /// (every wake-up from a sleep costs what the bypass path is there to save); kernel
    /// sockets wake the loop through epoll, so it sleeps.
    pub fn default_for(bypass: bool) -> IdleStrategy {
        if bypass {
            IdleStrategy::Spin
        } else {
            IdleStrategy::Sleep
        }
    }
}

/// The backoff of one polling thread.
#[derive(Debug)]
pub struct Idle {
    strategy: IdleStrategy,
    empty_polls: u32,
    /// Whether the thread serves anyone now; `Spin` backs off while nobody is served.
    serving: bool,
}

/// Polls spun before sleeping. Few: brokers, their sequencer and clients often share a
/// core, and every spin takes time from them (64 cost the XDP broker about a fifth of its
/// throughput on the lab, where four brokers share one CPU).
const SPIN_POLLS: u32 = 8;
/// Longest sleep of the backoff.
const SLEEP_MAX: Duration = Duration::from_micros(200);

impl Idle {
    /// A fresh backoff.
    pub fn new(strategy: IdleStrategy) -> Idle {
        Idle {
            strategy,
            empty_polls: 0,
            serving: true,
        }
    }

    /// Tells whether the thread serves anyone (a network loop: a connection is open). A
    /// spinning thread that serves nobody backs off instead of burning its core.
    pub fn set_serving(&mut self, serving: bool) {
        self.serving = serving;
    }

    /// Records whether the last poll found work.
    pub fn record(&mut self, worked: bool) {
        self.empty_polls = if worked {
            0
        } else {
            self.empty_polls.saturating_add(1)
        };
    }

    /// How long the next wait may block (zero: poll again at once).
    pub fn timeout(&self) -> Duration {
        match self.effective() {
            IdleStrategy::Spin | IdleStrategy::Yield => Duration::ZERO,
            IdleStrategy::Sleep if self.empty_polls < SPIN_POLLS => Duration::ZERO,
            IdleStrategy::Sleep => {
                let doublings = (self.empty_polls - SPIN_POLLS).min(5);
                Duration::from_micros(32 << doublings).min(SLEEP_MAX)
            }
        }
    }

    /// The strategy in force: `Spin` serving nobody backs off as `Sleep`.
    fn effective(&self) -> IdleStrategy {
        match self.strategy {
            IdleStrategy::Spin if !self.serving => IdleStrategy::Sleep,
            strategy => strategy,
        }
    }

    /// Waits as the strategy says (for threads without an event source).
    pub fn wait(&self) {
        match self.effective() {
            IdleStrategy::Spin => std::hint::spin_loop(),
            IdleStrategy::Yield => std::thread::yield_now(),
            IdleStrategy::Sleep => match self.timeout() {
                Duration::ZERO => std::hint::spin_loop(),
                timeout => std::thread::sleep(timeout),
            },
        }
    }
}

/// Everything a broker needs to start.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// Protocol settings (id, head, limits).
    pub settings: BrokerSettings,
    /// Address to accept clients on.
    pub listen: SocketAddr,
    /// Address to accept Kafka clients on (see [`kafka`]; the kernel backend only, so far).
    pub kafka_listen: Option<SocketAddr>,
    /// Where clients reach this broker, for other brokers' redirects (default: the bound
    /// listen address).
    pub advertise: Option<SocketAddr>,
    /// SO_RCVBUF and SO_SNDBUF set on every accepted socket.
    pub socket_buffer_bytes: usize,
    /// Idle strategy of the network loop and the sequencer.
    pub idle: IdleStrategy,
    /// Where the head runs its sequencer.
    pub sequencer_placement: SequencerPlacement,
    /// Sequencer tuning (used on the head).
    pub sequencer: SequencerConfig,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Connection limit and deadline of the metrics endpoint.
    pub metrics_limits: crate::metrics::EndpointLimits,
    /// Which network backend serves clients.
    pub net: NetBackend,
    /// Replicate topics with a replication factor of 2 or more to files here (ack level 2).
    pub replica: Option<replica::ReplicaConfig>,
    /// Watch the sequencer lease and take it over when its holder goes silent (the head
    /// always does once it has lost the lease, e.g. after a restart).
    pub standby: bool,
    /// How long this broker's claim on its id may go without a heartbeat before another
    /// process may take the id over (the claim is beaten every quarter of it).
    pub claim_lease_ms: u64,
}

/// Default of [`BrokerOptions::claim_lease_ms`].
pub const CLAIM_LEASE_MS_DEFAULT: u64 = 1000;

/// The network backend of a broker.
#[derive(Debug, Clone, Default)]
pub enum NetBackend {
    /// Kernel TCP (epoll).
    #[default]
    Kernel,
    /// XDP + AF_XDP + smoltcp on a pinned core. Never falls back to kernel TCP.
    Xdp(bypass::XdpOptions),
}

/// Why a broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The pool could not be opened, formatted or attached.
    #[error("pool {path}: {reason}")]
    Pool {
        /// The pool path.
        path: String,
        /// Which step failed.
        failure: PoolFailure,
        /// What went wrong, with the fix where there is one.
        reason: String,
    },
    /// `--format` of a pool that live brokers use.
    #[error(transparent)]
    PoolInUse(#[from] PoolInUse),
    /// The broker id is held by a live broker (or outside the pool).
    #[error(transparent)]
    Claim(#[from] ClaimError),
    /// A listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The network loop could not watch its listening socket (epoll).
    #[error("cannot poll the listening socket (epoll): {0}")]
    Poll(std::io::Error),
    /// The metrics endpoint could not start.
    #[error("{0}")]
    Metrics(#[from] crate::metrics::EndpointError),
    /// The sequencer could not start.
    #[error("sequencer: {0}")]
    Sequencer(PoolError),
    /// The kernel-bypass backend could not start (no fallback to kernel TCP).
    #[error("--net xdp: {0}")]
    Bypass(#[from] bypass::BypassError),
    /// A client limit is outside the range the broker can honour.
    #[error(transparent)]
    Limits(#[from] limits::LimitOutOfRange),
    /// `--kafka-listen` on a wildcard address, and no address advertised to name in Metadata.
    #[error(
        "--kafka-listen {addr} takes every address, and this broker advertises none to tell Kafka clients: give --advertise HOST:PORT (its host is named in Metadata), or --kafka-listen a specific address"
    )]
    KafkaHostUnknown {
        /// The Kafka listener's address.
        addr: SocketAddr,
    },
    /// `--kafka-listen` with `--net xdp` on another address than `--listen`'s, or its port.
    #[error(
        "--kafka-listen {kafka} with --net xdp: the Kafka listener must be on the broker's own address ({listen}'s, or 0.0.0.0 for it) with another port, nonzero (the XDP program steers both ports of that address)"
    )]
    KafkaAddressOnBypass {
        /// The Kafka listener's address.
        kafka: SocketAddr,
        /// The broker's own listen address.
        listen: SocketAddr,
    },
}

/// Which step of opening the pool failed (see [`StartError::Pool`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolFailure {
    /// No pool file appeared within the attach timeout.
    Missing,
    /// The file could not be opened or mapped (the hugepages crate's error says why).
    Region,
    /// The file holds no formatted pool, even after the attach timeout.
    NotFormatted,
    /// The pool is of another layout, or damaged.
    Incompatible,
    /// `--format` could not create or format the pool.
    Format,
}

impl PoolFailure {
    /// A name for machine-readable reports.
    pub fn name(self) -> &'static str {
        match self {
            PoolFailure::Missing => "missing",
            PoolFailure::Region => "region",
            PoolFailure::NotFormatted => "not_formatted",
            PoolFailure::Incompatible => "incompatible",
            PoolFailure::Format => "format",
        }
    }
}

/// A broker running on its threads; [`RunningBroker::stop`] ends them.
#[derive(Debug)]
pub struct RunningBroker {
    stop: Arc<AtomicBool>,
    crash: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// The claim on the broker id, beaten while the broker runs; `None` once it has ended.
    claim: Option<HeldClaim>,
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    kafka_addr: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    /// The XDP program of the bypass backend; dropped (detached) after the threads end.
    xdp: Option<bypass::Attached>,
}

impl RunningBroker {
    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The Kafka listener's address, if one was asked for.
    pub fn kafka_addr(&self) -> Option<SocketAddr> {
        self.kafka_addr
    }

    /// The metrics endpoint's address, if one was asked for.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The broker's counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The XDP program's counters (bypass backend only).
    pub fn xdp_counters(&self) -> Option<Result<xdp_prog::Counters, xdp_prog::XdpError>> {
        self.xdp.as_ref().map(bypass::Attached::counters)
    }

    /// True while every thread runs (false once [`kill`](Self::kill)ed, or once the broker
    /// stopped on its own: see [`failure`](Self::failure)).
    pub fn is_running(&self) -> bool {
        !self.threads.is_empty()
            && self.threads.iter().all(|t| !t.is_finished())
            && self.claim.as_ref().is_some_and(HeldClaim::is_beating)
    }

    /// Why the broker stopped on its own, if it did: its id was taken over (it had been
    /// paused past its claim lease), or its pool file was removed, replaced or truncated.
    /// It then ended as [`kill`](Self::kill) would, without writing more to the pool.
    pub fn failure(&self) -> Option<&LivenessError> {
        self.claim.as_ref().and_then(HeldClaim::failure)
    }

    /// Ends the broker abruptly, the way clients see a crash (`kill -9`): the network loop
    /// returns at once, closing its listener and every connection as they are (reset on the
    /// bypass backend; no
    /// drain of batches in flight, no Goodbye, no ACK owed), and writes nothing more to the
    /// pool; then every thread is joined. What the broker committed to its rings stays in the
    /// pool, where the sequencer still orders it. Its claim on the id stays too, with a
    /// heartbeat that no longer moves: a broker started again with the same id takes it over
    /// after the claim lease and picks its ring up (see `TopicWriter::new`). Metrics and
    /// addresses stay readable.
    ///
    /// Killing twice does nothing.
    pub fn kill(&mut self) {
        self.crash.store(true, Ordering::Relaxed);
        self.end(false);
    }

    /// Asks every thread to stop, then waits for them. The network loop first lets batches
    /// in flight be decided (for at most two seconds) so their ACKs go out. Then the claim
    /// on the id is given back, so a broker started with it next starts at once.
    pub fn stop(mut self) {
        self.shut_down();
    }

    /// Stops as [`stop`](Self::stop) does, keeping the value (its metrics stay readable).
    /// Stopping twice, or after a kill, does nothing.
    pub fn shut_down(&mut self) {
        self.end(true);
    }

    /// Stops and joins every thread, then releases the claim (`release`) or leaves it.
    fn end(&mut self, release: bool) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                log::error!("a broker thread panicked");
            }
        }
        self.xdp = None;
        if let Some(claim) = self.claim.take() {
            if release {
                claim.release();
            } else {
                claim.abandon();
            }
        }
    }
}

impl Drop for RunningBroker {
    fn drop(&mut self) {
        self.end(true);
    }
}

/// Starts a broker on an attached pool: claims its id (see [`HeldClaim::take`]), then runs
/// [`start_claimed`].
pub fn start(pool: Pool<PoolMemory>, options: BrokerOptions) -> Result<RunningBroker, StartError> {
    options.settings.limits.validate()?;
    let claim = HeldClaim::take(&pool, options.settings.broker_id, options.claim_lease_ms)?;
    start_claimed(pool, options, claim)
}

/// Starts a broker whose id is claimed: the network loop, the sequencer (head only), the
/// replica and the metrics endpoint, each on its own thread. On an error the claim is given
/// back.
pub fn start_claimed(
    pool: Pool<PoolMemory>,
    options: BrokerOptions,
    claim: HeldClaim,
) -> Result<RunningBroker, StartError> {
    let stop = Arc::clone(claim.stop_flag());
    let crash = Arc::clone(claim.crash_flag());
    let metrics = Arc::new(Metrics::default());
    let mut threads = Vec::new();
    match launch(pool, &options, claim.guard(), &metrics, &mut threads) {
        Ok(launched) => Ok(RunningBroker {
            stop,
            crash,
            threads,
            claim: Some(claim),
            local_addr: launched.local_addr,
            metrics_addr: launched.metrics_addr,
            kafka_addr: launched.kafka_addr,
            metrics,
            xdp: launched.xdp,
        }),
        Err(e) => {
            // Stop the threads started so far before reporting.
            stop.store(true, Ordering::Relaxed);
            for thread in threads {
                let _ = thread.join();
            }
            claim.release();
            Err(e)
        }
    }
}

/// What [`launch`] started: the client address, the metrics and Kafka addresses, the bypass
/// backend's attached program.
struct Launched {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    kafka_addr: Option<SocketAddr>,
    xdp: Option<bypass::Attached>,
}

/// Starts the broker's threads into `threads`; returns the client, metrics and Kafka
/// addresses.
/// The threads that write this broker's own lines of the pool (the network loop, the
/// replica) check `claim` before they write.
fn launch(
    pool: Pool<PoolMemory>,
    options: &BrokerOptions,
    claim: &ClaimGuard,
    metrics: &Arc<Metrics>,
    threads: &mut Vec<JoinHandle<()>>,
) -> Result<Launched, StartError> {
    let broker_id = options.settings.broker_id;
    let stop = claim.stop_flag();
    let listener = match options.net {
        NetBackend::Kernel => Some(mio::net::TcpListener::bind(options.listen).map_err(
            |source| StartError::Listen {
                addr: options.listen,
                source,
            },
        )?),
        NetBackend::Xdp(_) => None,
    };
    let (kafka_listener, kafka_addr) = match (options.kafka_listen, &options.net) {
        (None, _) => (None, None),
        // The bypass backend's smoltcp sockets listen on the Kafka port too.
        (Some(kafka), NetBackend::Xdp(_)) => {
            let addr = bypass_kafka_address(kafka, options.listen)?;
            (None, Some(addr))
        }
        (Some(addr), NetBackend::Kernel) => {
            let (bound, listener) = mio::net::TcpListener::bind(addr)
                .and_then(|l| Ok((l.local_addr()?, l)))
                .map_err(|source| StartError::Listen { addr, source })?;
            (Some(listener), Some(bound))
        }
    };
    let local_addr = match &listener {
        Some(listener) => listener.local_addr().map_err(|source| StartError::Listen {
            addr: options.listen,
            source,
        })?,
        None => options.listen,
    };
    let advertised = options.advertise.unwrap_or(local_addr);
    let kafka_node = match kafka_addr {
        None => None,
        Some(addr) => {
            // Kafka clients connect to the host that Metadata names: a wildcard bind is
            // named by the address this broker advertises, which must then be one.
            let host = if addr.ip().is_unspecified() {
                advertised.ip()
            } else {
                addr.ip()
            };
            if host.is_unspecified() {
                return Err(StartError::KafkaHostUnknown { addr });
            }
            Some(kafka::KafkaNode {
                id: i32::from(broker_id),
                host: host.to_string(),
                port: addr.port(),
            })
        }
    };
    let kafka_advertised = kafka_node.as_ref().and_then(|node| {
        let ip: std::net::IpAddr = node.host.parse().ok()?;
        Some(SocketAddr::new(ip, node.port))
    });
    claim.advertise(advertised, kafka_advertised);
    let metrics_addr = spawn_metrics(options, metrics, stop, threads)?;
    let sequencer = spawn_sequencer(&pool, options, metrics, stop, threads)?;
    if let Some(config) = options.replica.clone() {
        let (pool, metrics, claim) = (pool.clone(), Arc::clone(metrics), claim.clone());
        threads.push(spawn("replica", move || {
            run_replica(&pool, broker_id, &config, &metrics, &claim)
        }));
    }
    let context = serve::LoopContext {
        pool,
        metrics: Arc::clone(metrics),
        claim: claim.clone(),
        sequencer,
        kafka_node,
    };
    let mut xdp = None;
    if let NetBackend::Xdp(xdp_options) = &options.net {
        let (thread, attached) = bypass::spawn(context, options, xdp_options)?;
        threads.push(thread);
        xdp = Some(attached);
    } else if let Some(listener) = listener {
        let transport = kernel::KernelTransport::new(
            listener,
            kafka_listener,
            options.socket_buffer_bytes,
            broker_id,
        )
        .map_err(StartError::Poll)?;
        let serve = serve::ServeLoop::new(transport, options, context);
        threads.push(spawn("network", move || {
            serve.run();
        }));
    }
    log::info!(
        "broker {broker_id} listening on {local_addr}{}{}{}",
        if options.settings.head {
            " (head, sequencer running)"
        } else {
            ""
        },
        kafka_addr
            .map(|a| format!(", Kafka clients on {a}"))
            .unwrap_or_default(),
        metrics_addr
            .map(|a| format!(", metrics on http://{a}/metrics"))
            .unwrap_or_default()
    );
    Ok(Launched {
        local_addr,
        metrics_addr,
        kafka_addr,
        xdp,
    })
}

/// The Kafka listener's address on the bypass backend: `--listen`'s address (a wildcard
/// Kafka address means it) with the Kafka port, which must differ from `--listen`'s.
fn bypass_kafka_address(kafka: SocketAddr, listen: SocketAddr) -> Result<SocketAddr, StartError> {
    let ip = if kafka.ip().is_unspecified() {
        listen.ip()
    } else {
        kafka.ip()
    };
    if ip != listen.ip() || kafka.port() == 0 || kafka.port() == listen.port() {
        return Err(StartError::KafkaAddressOnBypass { kafka, listen });
    }
    Ok(SocketAddr::new(ip, kafka.port()))
}

/// Serves the metrics endpoint, if asked; returns its address.
fn spawn_metrics(
    options: &BrokerOptions,
    metrics: &Arc<Metrics>,
    stop: &Arc<AtomicBool>,
    threads: &mut Vec<JoinHandle<()>>,
) -> Result<Option<SocketAddr>, StartError> {
    let broker_id = options.settings.broker_id;
    Ok(match options.metrics_listen {
        Some(addr) => {
            let endpoint = crate::metrics::Endpoint::bind(addr, options.metrics_limits)?;
            let bound = endpoint.local_addr();
            let (metrics, stop) = (Arc::clone(metrics), Arc::clone(stop));
            threads.push(spawn("metrics", move || {
                endpoint.serve(metrics, broker_id, stop)
            }));
            bound
        }
        None => None,
    })
}

/// Takes the lease of a fresh pool on the head (on a pool that already has a holder, a
/// restart, the head waits like any standby), and runs the lease watch of a standby, which
/// becomes the sequencer when the holder goes silent. Returns the held sequencer when the
/// network loop is to run it inline; otherwise a thread runs it.
fn spawn_sequencer(
    pool: &Pool<PoolMemory>,
    options: &BrokerOptions,
    metrics: &Arc<Metrics>,
    stop: &Arc<AtomicBool>,
    threads: &mut Vec<JoinHandle<()>>,
) -> Result<Option<SequencerDriver>, StartError> {
    let broker_id = options.settings.broker_id;
    let holder = if options.settings.head && read_lease(pool).is_none() {
        let sequencer = Sequencer::new(pool.clone(), broker_id, 1, options.sequencer)
            .map_err(StartError::Sequencer)?;
        Some(SequencerDriver::new(sequencer, Arc::clone(metrics)))
    } else {
        // Set before any connection is served: it decides who creates topics.
        metrics.set_sequencer_role(SequencerRole::StandingBy);
        None
    };
    let cpus = sequencing::allowed_cpus().unwrap_or(0);
    let (inline, holder) = match holder {
        Some(driver) if options.sequencer_placement.inline(cpus) => {
            log::info!("broker {broker_id}: the sequencer runs in the network loop");
            (Some(driver), None)
        }
        holder => (None, holder),
    };
    let standby = options.standby || options.settings.head;
    if holder.is_some() || standby {
        let (pool, metrics, stop) = (pool.clone(), Arc::clone(metrics), Arc::clone(stop));
        let (idle, config) = (options.idle, options.sequencer);
        threads.push(spawn("sequencer", move || {
            let mut holder = holder;
            loop {
                if let Some(driver) = holder.take() {
                    run_sequencer(driver, idle, &stop);
                }
                if !standby || stop.load(Ordering::Relaxed) {
                    return;
                }
                holder = watch_lease(&pool, broker_id, config, &metrics, &stop)
                    .map(|sequencer| SequencerDriver::new(sequencer, Arc::clone(&metrics)));
            }
        }));
    }
    Ok(inline)
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(f)
        .expect("spawn a broker thread")
}

/// Polls between clock reads (reading the clock on every spin costs half a core).
const POLLS_PER_CLOCK_READ: u64 = 64;

fn run_sequencer(mut driver: SequencerDriver, idle: IdleStrategy, stop: &AtomicBool) {
    let mut idle = Idle::new(idle);
    let mut now = Timestamp::now();
    let mut polls = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if polls % POLLS_PER_CLOCK_READ == 0 {
            now = Timestamp::now();
        }
        polls += 1;
        let Some(decided) = driver.step(now) else {
            return;
        };
        idle.record(decided > 0);
        if decided == 0 {
            idle.wait();
            // After a sleep the cached clock is stale: read it on the next poll.
            if idle.timeout() > Duration::ZERO {
                polls = polls.next_multiple_of(POLLS_PER_CLOCK_READ);
            }
        }
    }
}

/// A standby: watches the lease's heartbeat and, once it has not moved for the lease time
/// the holder published, takes the lease over (one epoch up; exactly one standby wins).
/// Returns the new sequencer, or `None` when stopped.
fn watch_lease(
    pool: &Pool<PoolMemory>,
    broker_id: u16,
    config: SequencerConfig,
    metrics: &Metrics,
    stop: &AtomicBool,
) -> Option<Sequencer<PoolMemory>> {
    let mut watch = LeaseWatch::new();
    while !stop.load(Ordering::Relaxed) {
        let lease = read_lease(pool);
        let now = Timestamp::now();
        let lease_ms = lease.map_or(config.lease_ns / 1_000_000, |l| l.lease_ms.max(1));
        if let Some(epoch) = watch.observe(lease, now) {
            match Sequencer::new(pool.clone(), broker_id, epoch, config) {
                Ok(sequencer) => {
                    Metrics::inc(&metrics.sequencer_takeovers);
                    log::warn!(
                        "broker {broker_id}: took the sequencer lease over at epoch {epoch} (the \
                         holder's heartbeat was silent for {} ms)",
                        watch.silent(now).as_millis()
                    );
                    return Some(sequencer);
                }
                Err(e) => {
                    log::info!("broker {broker_id}: lease takeover not needed: {e}");
                    watch.restart(now);
                }
            }
        }
        std::thread::sleep(Duration::from_millis((lease_ms / 16).clamp(1, 50)));
    }
    None
}

/// Pause after a replication error before the files are opened again.
const REPLICA_RETRY: Duration = Duration::from_secs(1);

/// The replica thread: copies and syncs until stopped; on an error it says why, counts it,
/// and starts over from its files after a pause (ack level 2 waits meanwhile).
fn run_replica(
    pool: &Pool<PoolMemory>,
    broker_id: u16,
    config: &replica::ReplicaConfig,
    metrics: &Metrics,
    claim: &ClaimGuard,
) {
    let report = |e: replica::ReplicaError| {
        log::error!("broker {broker_id}: replication stopped: {e}; retrying in 1 s");
        Metrics::inc(&metrics.replica_errors);
    };
    while !claim.stop_flag().load(Ordering::Relaxed) {
        match replicate(pool, broker_id, config, metrics, claim) {
            Ok(()) => return,
            Err(e) => {
                report(e);
                std::thread::sleep(REPLICA_RETRY);
            }
        }
    }
}

/// Replicates until stopped (`Ok`, after a clean stop) or until an error, after which the
/// replica no longer holds retention. Each poll publishes this broker's `replicated` lines:
/// the claim is checked before it, and a broker whose id was taken over writes nothing more.
fn replicate(
    pool: &Pool<PoolMemory>,
    broker_id: u16,
    config: &replica::ReplicaConfig,
    metrics: &Metrics,
    claim: &ClaimGuard,
) -> Result<(), replica::ReplicaError> {
    let mut replicator = replica::Replicator::new(pool.clone(), broker_id, config.clone())?;
    let mut idle = Idle::new(IdleStrategy::Sleep);
    while !claim.stop_flag().load(Ordering::Relaxed) {
        if !claim.holds() {
            return Ok(());
        }
        match replicator.poll(Timestamp::now()) {
            Ok(copied) => {
                metrics
                    .replica_batches
                    .fetch_add(copied as u64, Ordering::Relaxed);
                idle.record(copied > 0);
                idle.wait();
            }
            Err(e) => {
                replicator.release();
                return Err(e);
            }
        }
    }
    // A broker whose id was taken over leaves its lines to the new holder.
    if !claim.holds() {
        return Ok(());
    }
    replicator.stop()
}

/// How to open the pool.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    /// File on hugetlbfs, `/dev/daxX.Y`, or a `/dev/shm` file (with `allow_fallback`).
    pub path: std::path::PathBuf,
    /// Format a new pool of this geometry and size, replacing the file (unless live brokers
    /// use it: see [`ownership::refuse_live_pool`]); else attach.
    pub format: Option<(Geometry, u64)>,
    /// Allow `/dev/shm` when hugepages are missing (announced with a warning).
    pub allow_fallback: bool,
    /// Coherence mode of this process's accesses.
    pub mode: CoherenceMode,
    /// How long to wait for another process to create and format the pool.
    pub attach_timeout: Duration,
}

/// Opens (or creates and formats) the pool a broker runs on.
pub fn open_pool(spec: &PoolSpec) -> Result<Pool<PoolMemory>, StartError> {
    let fail = |failure: PoolFailure, reason: String| StartError::Pool {
        path: spec.path.display().to_string(),
        failure,
        reason,
    };
    let options = hugepages::RegionOptions {
        page_size: hugepages::PageSize::Huge2M,
        allow_fallback: spec.allow_fallback,
        prefault: true,
    };
    if let Some((geometry, pool_bytes)) = spec.format {
        ownership::refuse_live_pool(&spec.path, &options, spec.mode)?;
        // `create` takes the old file's lock again: a broker that attached since is refused.
        let region = hugepages::SharedRegion::create(&spec.path, pool_bytes as usize, &options)
            .map_err(|e| match e {
                hugepages::Error::RegionInUse { holder_pids, .. } => StartError::PoolInUse(
                    ownership::pool_in_use(&spec.path, &options, spec.mode, holder_pids),
                ),
                other => fail(PoolFailure::Format, other.to_string()),
            })?;
        log::info!(
            "pool {}: {} MiB on {}, pre-faulted in {:?}",
            spec.path.display(),
            region.len() >> 20,
            region.backing(),
            region.prefault_time()
        );
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return Pool::format(
            crate::region::pool_memory(region, spec.mode),
            geometry,
            now_ns,
        )
        .map_err(|e| fail(PoolFailure::Format, e.to_string()));
    }
    // The head may not have created or formatted the pool yet: wait for the file, open it
    // once, then wait for the formatted header.
    let deadline = Timestamp::now() + spec.attach_timeout;
    while !spec.path.exists() {
        if Timestamp::now() >= deadline {
            return Err(fail(
                PoolFailure::Missing,
                format!(
                    "no pool file after {:?}: start the head broker with --format on this \
                     path, and give every broker the same --pool",
                    spec.attach_timeout
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // A formatter may be replacing the file right now (removing the old one, creating the
    // new one empty, then sizing it): open the one that is there after.
    let region = loop {
        match hugepages::SharedRegion::open(&spec.path, &options) {
            Ok(region) => break region,
            Err(
                hugepages::Error::RegionBeingReplaced { .. }
                | hugepages::Error::RegionReplaced { .. }
                | hugepages::Error::RegionMissing { .. }
                | hugepages::Error::EmptyRegion { .. },
            ) if Timestamp::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(fail(PoolFailure::Region, e.to_string())),
        }
    };
    let mem = crate::region::pool_memory(region, spec.mode);
    loop {
        match Pool::attach(mem.clone()) {
            Ok(pool) => return Ok(pool),
            Err(PoolError::NotFormatted | PoolError::BadMagic { found: 0 })
                if Timestamp::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(PoolError::NotFormatted | PoolError::BadMagic { found: 0 }) => {
                return Err(fail(
                    PoolFailure::NotFormatted,
                    format!(
                        "not formatted after {:?}: start the head broker with --format",
                        spec.attach_timeout
                    ),
                ));
            }
            Err(other) => return Err(fail(PoolFailure::Incompatible, other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spin_backs_off_while_it_serves_nobody_and_sleep_always_does() {
        let idle_after = |strategy, serving, empty_polls| {
            let mut idle = Idle::new(strategy);
            idle.set_serving(serving);
            for _ in 0..empty_polls {
                idle.record(false);
            }
            idle.timeout()
        };
        let backed_off = Duration::from_micros(32);
        assert_eq!(idle_after(IdleStrategy::Spin, true, 100), Duration::ZERO);
        assert_eq!(
            idle_after(IdleStrategy::Spin, false, SPIN_POLLS),
            backed_off
        );
        assert_eq!(idle_after(IdleStrategy::Spin, false, 100), SLEEP_MAX);
        assert_eq!(
            idle_after(IdleStrategy::Sleep, true, SPIN_POLLS),
            backed_off
        );
        assert_eq!(
            idle_after(IdleStrategy::Sleep, true, SPIN_POLLS - 1),
            Duration::ZERO
        );
        assert_eq!(idle_after(IdleStrategy::Yield, false, 100), Duration::ZERO);
        assert_eq!(IdleStrategy::default_for(true), IdleStrategy::Spin);
        assert_eq!(IdleStrategy::default_for(false), IdleStrategy::Sleep);
    }

    #[test]
    fn attaching_waits_for_a_pool_file_that_is_still_being_created() {
        let path = std::path::PathBuf::from(format!(
            "/dev/shm/embarcadero-attach-test-{}",
            std::process::id()
        ));
        // What a formatter leaves for a moment: the new file, empty, not sized yet.
        let file = std::fs::File::create(&path).unwrap();
        let spec = PoolSpec {
            path: path.clone(),
            format: None,
            allow_fallback: true,
            mode: CoherenceMode::NonCoherent,
            attach_timeout: Duration::from_secs(10),
        };
        let attacher = std::thread::spawn(move || open_pool(&spec).map(|pool| *pool.geometry()));
        std::thread::sleep(Duration::from_millis(300));
        let pool_bytes = 8 << 20;
        let geometry = Geometry::fit(pool_bytes, 2, 1, 16, 1024).unwrap();
        file.set_len(pool_bytes).unwrap();
        let options = hugepages::RegionOptions {
            allow_fallback: true,
            prefault: false,
            ..hugepages::RegionOptions::default()
        };
        let region = hugepages::SharedRegion::open(&path, &options).unwrap();
        Pool::format(
            crate::region::pool_memory(region, CoherenceMode::NonCoherent),
            geometry,
            1,
        )
        .unwrap();
        let attached = attacher.join().unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(attached.unwrap(), geometry);
    }
}
