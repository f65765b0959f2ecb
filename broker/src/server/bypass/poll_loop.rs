//! The bypass network loop: one pinned thread running rx burst -> smoltcp poll -> protocol
//! -> tx burst, with the same [`Connection`] state machine, outcome routing, ACK flushing,
//! deliveries and subscription publishing as the kernel loop (`kernel.rs`).

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant as StdInstant};

use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::Device;
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

use crate::metrics::Metrics;
use crate::server::connection::{ByteStream, Connection, refusal_frame};
use crate::server::ownership::{ClaimGuard, LoopClaimCheck};
use crate::server::state::{BrokerState, RoutedOutcome};
use crate::server::{BrokerOptions, Idle};
use shared_log::coherence::PoolMemory;
use shared_log::pool::Pool;
use xdp_transport::device::Burst;
use xdp_transport::hooks::Peers;
use xdp_transport::tcp::{abort_half_open, listen, new_socket};
use xdp_transport::xsk::{FRAME_BYTES, XskStats};

/// How a stopping broker waits for batches in flight to be decided.
const DRAIN: Duration = Duration::from_secs(2);
/// Loop iterations between clock reads (reading it on every spin cost half the core).
const ITERATIONS_PER_CLOCK_READ: u32 = 32;

/// How often the loop reads the socket's drop counters.
const DROP_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Least time between two warnings about drops.
const DROP_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// Watches the kernel's drop counters of the AF_XDP socket: frames dropped there never
/// reach smoltcp, so TCP sees loss (and backs off, or stalls when every large frame is
/// dropped) without anything else saying why.
#[derive(Debug)]
struct DropWatch {
    seen: XskStats,
    checked_at: StdInstant,
    warned_at: Option<StdInstant>,
}

impl DropWatch {
    fn new(now: StdInstant) -> DropWatch {
        DropWatch {
            seen: XskStats::default(),
            checked_at: now,
            warned_at: None,
        }
    }

    /// Takes the counters read at `now`; returns the new drops and, at most once per
    /// [`DROP_WARNING_INTERVAL`], a warning that names the likely cause.
    fn observe(&mut self, stats: XskStats, now: StdInstant) -> (u64, Option<String>) {
        let dropped = stats.rx_dropped.saturating_sub(self.seen.rx_dropped);
        let ring_full = stats.rx_ring_full.saturating_sub(self.seen.rx_ring_full);
        let fill_empty = stats
            .fill_ring_empty
            .saturating_sub(self.seen.fill_ring_empty);
        let rx_frames = stats.rx_frames.saturating_sub(self.seen.rx_frames);
        self.seen = stats;
        self.checked_at = now;
        let new = dropped + ring_full;
        if new == 0
            || self
                .warned_at
                .is_some_and(|at| now.duration_since(at) < DROP_WARNING_INTERVAL)
        {
            return (new, None);
        }
        self.warned_at = Some(now);
        let mut causes = Vec::new();
        if ring_full > 0 {
            causes.push(format!(
                "{ring_full} with the rx ring full (this loop fell behind: give it a core of its own)"
            ));
        }
        if dropped > 0 && fill_empty > 0 {
            causes.push(format!(
                "{dropped} without a free frame in the fill ring (empty {fill_empty} times: this loop fell behind)"
            ));
        } else if dropped > 0 {
            causes.push(format!(
                "{dropped} larger than a {FRAME_BYTES}-byte UMEM frame (in generic mode GSO/TSO on the sender or GRO on this interface make such packets: turn them off, or use driver mode)"
            ));
        }
        let warning = format!(
            "the kernel dropped {new} frames for the AF_XDP socket since the last check ({rx_frames} received): {}",
            causes.join("; ")
        );
        (new, Some(warning))
    }

    fn due(&self, now: StdInstant) -> bool {
        now.duration_since(self.checked_at) >= DROP_CHECK_INTERVAL
    }
}

/// Where the loop's interface is and what it listens on.
#[derive(Debug, Clone, Copy)]
pub struct Endpoint {
    /// The interface's MAC address.
    pub mac: [u8; 6],
    /// The broker's address and prefix length.
    pub ip: Ipv4Addr,
    /// Prefix length of the interface's subnet.
    pub prefix: u8,
    /// TCP port.
    pub port: u16,
}

/// smoltcp socket pool settings.
#[derive(Debug, Clone, Copy)]
pub struct SocketPoolConfig {
    /// TCP sockets (the most connections at a time).
    pub sockets: usize,
    /// Receive and send buffer of each socket, in bytes.
    pub buffer_bytes: usize,
}

/// A `ByteStream` over a smoltcp TCP socket: no data is `WouldBlock`, a peer that has
/// closed its side is `Ok(0)`.
struct SmolStream<'a, 'b>(&'a mut tcp::Socket<'b>);

impl ByteStream for SmolStream<'_, '_> {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.0.recv_slice(buf) {
            Ok(0) if !self.0.may_recv() => Ok(0),
            Ok(0) => Err(io::ErrorKind::WouldBlock.into()),
            Ok(n) => Ok(n),
            Err(tcp::RecvError::Finished) => Ok(0),
            Err(tcp::RecvError::InvalidState) => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    fn send(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.0.send_slice(buf) {
            Ok(0) if buf.is_empty() => Ok(0),
            Ok(0) => Err(io::ErrorKind::WouldBlock.into()),
            Ok(n) => Ok(n),
            Err(tcp::SendError::InvalidState) => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }
}

/// What one socket of the pool is doing.
enum Slot {
    /// Listening (or completing a handshake) on the broker port.
    Listening,
    /// An established connection, and its peer's address (for the per-address limit).
    Active(Box<Connection<PoolMemory>>, IpAddr),
    /// Closed by us; re-armed once smoltcp has finished with it.
    Closing,
}

/// The bypass network loop of one broker.
pub struct BypassLoop<D> {
    state: BrokerState<PoolMemory>,
    device: D,
    iface: Interface,
    sockets: SocketSet<'static>,
    slots: Vec<(SocketHandle, Slot, u64)>,
    port: u16,
    idle: Idle,
    stop: Arc<AtomicBool>,
    /// The claim on the broker id, checked before an iteration's writes to the pool.
    claim: LoopClaimCheck,
    next_id: u64,
    /// The sockets' peers, gathered for each housekeeping.
    peers: Peers,
}

impl<D> std::fmt::Debug for BypassLoop<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BypassLoop")
            .field("broker", &self.state.settings().broker_id)
            .field("sockets", &self.slots.len())
            .finish()
    }
}

/// How often the device's hooks (neighbours from the kernel, cookie flows) are served.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(1);

impl<D: Device + Burst> BypassLoop<D> {
    /// A loop over `device` for the broker described by `options`, holding `claim` (whose
    /// stop flag ends the loop).
    pub fn new(
        pool: Pool<PoolMemory>,
        mut device: D,
        endpoint: Endpoint,
        sockets: SocketPoolConfig,
        options: &BrokerOptions,
        metrics: Arc<Metrics>,
        claim: ClaimGuard,
    ) -> BypassLoop<D> {
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(endpoint.mac)));
        config.random_seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let mut iface = Interface::new(config, &mut device, Instant::ZERO);
        iface.update_ip_addrs(|addrs| {
            let cidr = IpCidr::new(endpoint.ip.into(), endpoint.prefix);
            if addrs.push(cidr).is_err() {
                log::error!("smoltcp interface has no room for {cidr}");
            }
        });
        let mut set = SocketSet::new(Vec::with_capacity(sockets.sockets));
        let mut slots = Vec::with_capacity(sockets.sockets);
        for _ in 0..sockets.sockets {
            let mut socket = new_socket(sockets.buffer_bytes);
            listen(&mut socket, endpoint.port);
            slots.push((set.add(socket), Slot::Listening, 0));
        }
        BypassLoop {
            state: BrokerState::new(pool, options.settings.clone(), metrics)
                .with_claim_token(claim.token()),
            device,
            iface,
            sockets: set,
            slots,
            port: endpoint.port,
            idle: Idle::new(options.idle),
            stop: Arc::clone(claim.stop_flag()),
            claim: LoopClaimCheck::new(claim),
            next_id: 1,
            peers: Peers::default(),
        }
    }

    /// Runs until the stop flag is set, then drains and closes every connection. Returns the
    /// device (its counters are the caller's to report). When the claim on the broker id is
    /// found taken over (before an iteration drives its connections, see [`LoopClaimCheck`],
    /// or by a ring writer before it publishes a slot) it ends at once instead: every
    /// connection is reset, with no drain and nothing more written to the pool.
    pub fn run(mut self) -> D {
        let started = StdInstant::now();
        let mut now = started;
        let mut outcomes = Vec::new();
        let mut stopping_since = None;
        let mut iterations = 0u32;
        let mut drops = DropWatch::new(started);
        let mut housekept_at = started;
        let mut claim_lost = false;
        loop {
            if iterations % ITERATIONS_PER_CLOCK_READ == 0 {
                now = StdInstant::now();
                if now.duration_since(housekept_at) >= HOUSEKEEPING_INTERVAL {
                    housekept_at = now;
                    self.housekeeping(started, now);
                }
                if drops.due(now) {
                    let (new, warning) = drops.observe(self.device.stats(), now);
                    self.state
                        .metrics()
                        .xdp_rx_dropped
                        .fetch_add(new, Ordering::Relaxed);
                    if let Some(warning) = warning {
                        log::warn!("broker {}: {warning}", self.state.settings().broker_id);
                    }
                }
                if self.stop.load(Ordering::Relaxed) {
                    let since = *stopping_since.get_or_insert(now);
                    if self.state.undecided() == 0 || now.duration_since(since) > DRAIN {
                        break;
                    }
                }
            }
            iterations = iterations.wrapping_add(1);
            let timestamp = Instant::from_micros(now.duration_since(started).as_micros() as i64);
            self.device.begin();
            let mut worked = self
                .iface
                .poll(timestamp, &mut self.device, &mut self.sockets)
                != PollResult::None;
            outcomes.clear();
            worked |= self.state.poll_outcomes(&mut outcomes) > 0;
            for outcome in &outcomes {
                self.route(outcome, now);
            }
            // Nothing before this check writes to the pool. The clock is the cached one, read
            // every few iterations and after every wait.
            if !self.claim.holds(now) {
                claim_lost = true;
                break;
            }
            worked |= self.drive(now);
            if self.state.claim_moved().is_some() {
                self.claim.guard().lost();
                claim_lost = true;
                break;
            }
            // Send what the protocol produced in this iteration at once.
            worked |= self
                .iface
                .poll(timestamp, &mut self.device, &mut self.sockets)
                != PollResult::None;
            self.device.end();
            let subscriptions = self.slots.iter().filter_map(|(_, slot, _)| match slot {
                Slot::Active(connection, _) => connection.subscription(),
                _ => None,
            });
            self.state.publish_subscriptions(subscriptions);
            self.idle.record(worked);
            if !worked {
                match self.idle.timeout() {
                    Duration::ZERO => self.idle.wait(),
                    timeout => self.device.wait_for_frames(timeout),
                }
                if self.idle.timeout() > Duration::ZERO {
                    // After a sleep the cached clock is stale.
                    iterations = iterations.next_multiple_of(ITERATIONS_PER_CLOCK_READ);
                }
            }
        }
        let mut open = 0;
        for (handle, slot, _) in &mut self.slots {
            if let Slot::Active(connection, _) = slot {
                connection.on_closed(&mut self.state);
                self.sockets.get_mut::<tcp::Socket<'_>>(*handle).abort();
                open += 1;
            }
        }
        // Let the RSTs out.
        let timestamp = Instant::from_micros(started.elapsed().as_micros() as i64);
        self.device.begin();
        self.iface
            .poll(timestamp, &mut self.device, &mut self.sockets);
        self.device.end();
        if claim_lost {
            log::warn!(
                "broker {}: bypass network loop ended at once, its id taken over ({open} \
                 connections reset)",
                self.state.settings().broker_id
            );
            return self.device;
        }
        self.state.on_loop_stopped("bypass network loop", open);
        self.device
    }

    /// Serves the device's hooks, aborts the handshakes of adoptions they gave up, and
    /// copies their counts into the metrics.
    fn housekeeping(&mut self, started: StdInstant, now: StdInstant) {
        let timestamp = Instant::from_micros(now.duration_since(started).as_micros() as i64);
        self.peers.clear();
        for (handle, _, _) in &self.slots {
            let socket = self.sockets.get::<tcp::Socket<'_>>(*handle);
            if let Some(endpoint) = socket.remote_endpoint() {
                let IpAddress::Ipv4(ip) = endpoint.addr;
                self.peers.insert((ip, endpoint.port));
            }
        }
        for remote in self.device.housekeeping(timestamp, &self.peers) {
            for (handle, slot, _) in &self.slots {
                let socket = self.sockets.get_mut::<tcp::Socket<'_>>(*handle);
                if matches!(slot, Slot::Listening) && abort_half_open(socket, remote) {
                    break;
                }
            }
        }
        let (cookies, neighbours) = self.device.hook_counts();
        let metrics = self.state.metrics();
        metrics
            .xdp_cookie_adopted
            .store(cookies.adopted, Ordering::Relaxed);
        metrics.xdp_cookie_refused.store(
            cookies.refused + cookies.table_full + cookies.flow_open_failed,
            Ordering::Relaxed,
        );
        metrics.xdp_cookie_dropped.store(
            cookies.held_dropped + cookies.timed_out + cookies.dropped_after_refusal,
            Ordering::Relaxed,
        );
        metrics
            .xdp_neighbour_replies
            .store(neighbours.replies, Ordering::Relaxed);
        metrics.xdp_neighbour_table_full.store(
            neighbours.table_full + neighbours.cache_full,
            Ordering::Relaxed,
        );
    }

    fn route(&mut self, outcome: &RoutedOutcome, now: StdInstant) {
        // A closed connection's batches are in the log all the same; only the ACK is moot.
        for (_, slot, id) in &mut self.slots {
            if let Slot::Active(connection, _) = slot {
                if *id == outcome.conn {
                    connection.on_outcome(outcome, self.state.metrics(), now);
                    return;
                }
            }
        }
    }

    /// Attaches connections to newly established sockets, drives the active ones, and
    /// re-arms closed ones. Returns whether anything happened.
    fn drive(&mut self, now: StdInstant) -> bool {
        let mut worked = false;
        let broker = self.state.settings().broker_id;
        for (handle, slot, id) in &mut self.slots {
            let socket = self.sockets.get_mut::<tcp::Socket<'_>>(*handle);
            match slot {
                Slot::Listening => {
                    if matches!(
                        socket.state(),
                        tcp::State::Established | tcp::State::CloseWait
                    ) {
                        let Some(peer) = socket.remote_endpoint() else {
                            continue;
                        };
                        let address = IpAddr::from(peer.addr);
                        if let Err(refusal) = self.state.admit_connection(address) {
                            // Best effort: a new socket's send buffer has room.
                            let _ = socket.send_slice(&refusal_frame(&refusal));
                            socket.close();
                            *slot = Slot::Closing;
                            worked = true;
                            continue;
                        }
                        *id = self.next_id;
                        self.next_id += 1;
                        *slot =
                            Slot::Active(Box::new(Connection::new(*id, &self.state, now)), address);
                        log::debug!(
                            "broker {broker}: connection {id} from {:?}",
                            socket.remote_endpoint()
                        );
                        worked = true;
                    } else if socket.state() == tcp::State::Closed {
                        // A handshake that failed (RST): listen again.
                        listen(socket, self.port);
                        continue;
                    } else {
                        continue;
                    }
                }
                Slot::Closing => {
                    if matches!(socket.state(), tcp::State::Closed | tcp::State::TimeWait) {
                        if let Some(endpoint) = socket.remote_endpoint() {
                            let IpAddress::Ipv4(ip) = endpoint.addr;
                            self.device.connection_closed((ip, endpoint.port));
                        }
                        socket.abort();
                        listen(socket, self.port);
                        *slot = Slot::Listening;
                        worked = true;
                    }
                    continue;
                }
                Slot::Active(..) => {}
            }
            let Slot::Active(connection, address) = slot else {
                continue;
            };
            let readable = socket.can_recv() || !socket.may_recv();
            let writable = socket.can_send();
            let service = connection.service(
                &mut SmolStream(socket),
                &mut self.state,
                now,
                readable,
                writable,
            );
            worked |= service.worked();
            if service.ended || !socket.is_active() {
                connection.on_closed(&mut self.state);
                self.state.release_connection(*address);
                socket.close();
                *slot = Slot::Closing;
                log::debug!("broker {broker}: connection {id} closed");
                worked = true;
            }
        }
        worked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(rx_frames: u64, rx_dropped: u64, rx_ring_full: u64, fill_ring_empty: u64) -> XskStats {
        XskStats {
            rx_frames,
            rx_dropped,
            rx_ring_full,
            fill_ring_empty,
            ..XskStats::default()
        }
    }

    #[test]
    fn drops_are_counted_once_and_warned_about_with_their_cause() {
        let start = StdInstant::now();
        let mut watch = DropWatch::new(start);
        assert!(!watch.due(start));
        let at = |s| start + Duration::from_secs(s);
        assert!(watch.due(at(1)));
        assert_eq!(watch.observe(stats(100, 0, 0, 0), at(1)), (0, None));
        let (new, warning) = watch.observe(stats(200, 7, 0, 0), at(2));
        assert_eq!(new, 7);
        let warning = warning.expect("new drops are reported");
        assert!(
            warning.contains("7 larger than a 4096-byte UMEM frame"),
            "{warning}"
        );
        // Within the warning interval: counted, not warned about again.
        assert_eq!(watch.observe(stats(300, 9, 3, 0), at(3)), (5, None));
        let (new, warning) = watch.observe(stats(400, 10, 4, 2), at(13));
        assert_eq!(new, 2);
        let warning = warning.expect("the interval has passed");
        assert!(warning.contains("1 with the rx ring full"), "{warning}");
        assert!(
            warning.contains("1 without a free frame in the fill ring"),
            "{warning}"
        );
    }
}
