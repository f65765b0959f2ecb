//! The bypass transport of the network loop: smoltcp's TCP sockets over an AF_XDP device,
//! polled by one pinned thread (rx burst -> smoltcp -> protocol -> smoltcp -> tx burst).

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::metrics::Metrics;
use crate::server::connection::ByteStream;
use crate::server::serve::{Ending, PayloadSink, Protocol, Readiness, Serviced, Transport};
use crate::server::state::{ConnId, ConnIdHashing, ConnMap};
use smoltcp::iface::{
    Config, Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet,
};
use smoltcp::phy::Device;
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};
use units::Timestamp;
use xdp_transport::device::Burst;
use xdp_transport::hooks::Peers;
use xdp_transport::tcp::{abort_half_open, listen, new_socket};
use xdp_transport::xsk::{FRAME_BYTES, XskStats};

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
    checked_at: Timestamp,
    warned_at: Option<Timestamp>,
}

impl DropWatch {
    fn new(now: Timestamp) -> DropWatch {
        DropWatch {
            seen: XskStats::default(),
            checked_at: now,
            warned_at: None,
        }
    }

    /// Takes the counters read at `now`; returns the new drops and, at most once per
    /// [`DROP_WARNING_INTERVAL`], a warning that names the likely cause.
    fn observe(&mut self, stats: XskStats, now: Timestamp) -> (u64, Option<String>) {
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
                .is_some_and(|at| now.saturating_duration_since(at) < DROP_WARNING_INTERVAL)
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

    fn due(&self, now: Timestamp) -> bool {
        now.saturating_duration_since(self.checked_at) >= DROP_CHECK_INTERVAL
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
    /// TCP port of our own protocol.
    pub port: u16,
    /// TCP port of the Kafka listener, if the broker has one (on the same address).
    pub kafka_port: Option<u16>,
}

/// smoltcp socket pool settings.
#[derive(Debug, Clone, Copy)]
pub struct SocketPoolConfig {
    /// TCP sockets (the most connections at a time; with a Kafka listener, a quarter of
    /// them, at least one, listen on its port).
    pub sockets: usize,
    /// Receive and send buffer of each socket, in bytes.
    pub buffer_bytes: usize,
}

/// A `ByteStream` over a smoltcp TCP socket: no data is `WouldBlock`, a peer that has
/// closed its side is `Ok(0)`.
#[derive(Debug)]
pub struct SmolStream<'a, 'b>(&'a mut tcp::Socket<'b>);

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Listening (or completing a handshake) on the broker port.
    Listening,
    /// Carrying a connection (`BypassTransport::active` maps its id to this slot).
    Active,
    /// Closed by us; re-armed once smoltcp has finished with it.
    Closing,
}

/// How often the device's hooks (neighbours from the kernel, cookie flows) are served.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(1);

/// smoltcp's TCP sockets over an AF_XDP device: a fixed pool of sockets, each listening on
/// the broker port until a handshake completes.
pub struct BypassTransport<D> {
    device: D,
    iface: Interface,
    sockets: SocketSet<'static>,
    slots: Vec<(SocketHandle, Slot)>,
    /// The port each slot listens on (its connection's local port).
    slot_ports: Vec<u16>,
    /// Where each connection's socket is in `slots`.
    active: ConnMap<usize>,
    kafka_port: Option<u16>,
    /// smoltcp's clock starts here.
    started: Timestamp,
    housekept_at: Timestamp,
    drops: DropWatch,
    /// The sockets' peers, gathered for each housekeeping.
    peers: Peers,
    /// The connections whose sockets hold a receive target during a receive, and how many
    /// bytes landed in each (empty between receives).
    targeted: Vec<(ConnId, SocketHandle, usize)>,
    /// The connections' sockets whose buffers were empty when a receive began and that
    /// took a receive target (empty between receives).
    empty: Vec<SocketHandle>,
    /// ... and those that took none: between batches (empty between receives).
    between: Vec<SocketHandle>,
    /// For logs.
    broker: u16,
}

impl<D> std::fmt::Debug for BypassTransport<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BypassTransport")
            .field("broker", &self.broker)
            .field("sockets", &self.slots.len())
            .field("connections", &self.active.len())
            .finish()
    }
}

impl<D: Device + Burst> BypassTransport<D> {
    /// smoltcp over `device` at `endpoint`, with the socket pool `sockets`, for broker
    /// `broker`.
    pub fn new(
        mut device: D,
        endpoint: Endpoint,
        sockets: SocketPoolConfig,
        broker: u16,
    ) -> BypassTransport<D> {
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
        let kafka_sockets = endpoint
            .kafka_port
            .map_or(0, |_| (sockets.sockets / 4).max(1));
        let slot_ports: Vec<u16> = (0..sockets.sockets)
            .map(|index| match endpoint.kafka_port {
                Some(kafka) if index < kafka_sockets => kafka,
                _ => endpoint.port,
            })
            .collect();
        for &port in &slot_ports {
            let mut socket = new_socket(sockets.buffer_bytes);
            if Some(port) == endpoint.kafka_port {
                // Kafka clients may keep Nagle on (librdkafka's default) and hold a request's
                // tail until what went before is acknowledged: each such request would wait
                // out the ACK delay. Every segment is acknowledged at once here.
                socket.set_ack_delay(None);
            }
            listen(&mut socket, port);
            slots.push((set.add(socket), Slot::Listening));
        }
        let started = Timestamp::now();
        BypassTransport {
            device,
            iface,
            sockets: set,
            slots,
            slot_ports,
            active: ConnMap::with_capacity_and_hasher(sockets.sockets, ConnIdHashing),
            kafka_port: endpoint.kafka_port,
            started,
            housekept_at: started,
            drops: DropWatch::new(started),
            peers: Peers::default(),
            targeted: Vec::with_capacity(sockets.sockets),
            empty: Vec::with_capacity(sockets.sockets),
            between: Vec::with_capacity(sockets.sockets),
            broker,
        }
    }

    /// The device (its counters are the caller's to report).
    pub fn into_device(self) -> D {
        self.device
    }

    /// smoltcp's clock: microseconds since this transport started.
    fn timestamp(&self, now: Timestamp) -> Instant {
        Instant::from_micros(now.saturating_duration_since(self.started).as_micros() as i64)
    }

    fn poll_iface(&mut self, now: Timestamp) -> bool {
        let timestamp = self.timestamp(now);
        self.iface
            .poll(timestamp, &mut self.device, &mut self.sockets)
            != PollResult::None
    }

    /// Takes in the burst's frames one at a time, and stops early once a connection that
    /// began the receive with an empty socket has bytes its next payload cannot take
    /// straight: the end of a payload and the next batch's header, on a socket that held a
    /// receive target; or, on one between batches, the start of a large frame (a batch of at
    /// least [`LARGE_FRAME_BYTES`]) that goes on beyond what arrived. The connection must
    /// read those bytes before the payload can go straight to the pool, so the frames left
    /// wait in the rx ring for the next iteration instead of piling up behind them. Whole
    /// small batches do not stop it: stopping after each would pay the loop's whole pass per
    /// message (100,000 one-message batches/s fell to 52,000). Sending is left to `flush`.
    fn ingest(&mut self, now: Timestamp) -> bool {
        let timestamp = self.timestamp(now);
        let mut worked = false;
        while self
            .iface
            .poll_ingress_single(timestamp, &mut self.device, &mut self.sockets)
            != PollIngressSingleResult::None
        {
            worked = true;
            let sockets = &self.sockets;
            let buffered =
                |handle: &SocketHandle| sockets.get::<tcp::Socket<'_>>(*handle).recv_queue() > 0;
            if self.empty.iter().any(buffered) {
                break;
            }
            let sockets = &mut self.sockets;
            let continues = |handle: &SocketHandle| {
                large_frame_continues(sockets.get_mut::<tcp::Socket<'_>>(*handle))
            };
            if self.between.iter().any(continues) {
                break;
            }
        }
        self.empty.clear();
        self.between.clear();
        worked
    }

    /// Serves the device's hooks, aborts the handshakes of adoptions they gave up, and
    /// copies their counts into the metrics.
    fn serve_hooks(&mut self, now: Timestamp, metrics: &Metrics) {
        let timestamp = self.timestamp(now);
        self.peers.clear();
        for (handle, _) in &self.slots {
            let socket = self.sockets.get::<tcp::Socket<'_>>(*handle);
            if let Some(endpoint) = socket.remote_endpoint() {
                let IpAddress::Ipv4(ip) = endpoint.addr;
                self.peers.insert((ip, endpoint.port));
            }
        }
        for remote in self.device.housekeeping(timestamp, &self.peers) {
            for (handle, slot) in &self.slots {
                let socket = self.sockets.get_mut::<tcp::Socket<'_>>(*handle);
                if *slot == Slot::Listening && abort_half_open(socket, remote) {
                    break;
                }
            }
        }
        let (cookies, neighbours) = self.device.hook_counts();
        metrics
            .xdp_cookie_adopted
            .store(cookies.adopted, Ordering::Relaxed);
        metrics.xdp_cookie_refused.store(
            cookies.refused + cookies.table_full + cookies.flow_open_failed,
            Ordering::Relaxed,
        );
        metrics.xdp_cookie_dropped.store(
            cookies.held_dropped
                + cookies.timed_out
                + cookies.dropped_after_refusal
                + cookies.unsound,
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
}

/// A frame at least this long is worth a stop of the ingress when it begins on a socket
/// between batches: most of its payload can still go straight to the pool.
const LARGE_FRAME_BYTES: usize = 16 * 1024;

/// Whether `socket`'s buffered bytes begin a large frame that goes on beyond them.
fn large_frame_continues(socket: &mut tcp::Socket<'_>) -> bool {
    let buffered = socket.recv_queue();
    if buffered < wire::FRAME_HEADER_BYTES {
        return false;
    }
    let mut header = [0u8; wire::FRAME_HEADER_BYTES];
    if socket.peek_slice(&mut header) != Ok(wire::FRAME_HEADER_BYTES) {
        return false;
    }
    let frame_bytes = wire::FRAME_HEADER_BYTES
        + wire::FrameHeader::new_unchecked(&header[..]).body_bytes() as usize;
    frame_bytes >= LARGE_FRAME_BYTES && frame_bytes > buffered
}

impl<D: Device + Burst> Transport for BypassTransport<D> {
    type Stream<'a>
        = SmolStream<'a, 'static>
    where
        Self: 'a;

    const NAME: &'static str = "bypass network loop";
    /// Reading the clock on every spin cost half the core.
    const ITERATIONS_PER_CLOCK_READ: u32 = 32;
    const WAKES_ON_INPUT: bool = false;

    fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        if timeout > Duration::ZERO {
            self.device.wait_for_frames(timeout);
        }
        Ok(())
    }

    /// In-order payload of a connection whose socket has nothing buffered goes straight
    /// into the connection's target (smoltcp's receive target, vendor/README.md): one copy,
    /// frame to pool. The targets are posted and taken back around the ingress.
    fn receive(&mut self, now: Timestamp, sink: &mut dyn PayloadSink) -> bool {
        self.device.begin();
        for (&id, &index) in &self.active {
            let handle = self.slots[index].0;
            let socket = self.sockets.get_mut::<tcp::Socket<'static>>(handle);
            if socket.recv_queue() > 0 {
                continue;
            }
            let Some(target) = sink.target(id) else {
                // Only our own protocol's frames are worth a stop of the ingress.
                if Some(self.slot_ports[index]) != self.kafka_port {
                    self.between.push(handle);
                }
                continue;
            };
            self.empty.push(handle);
            // SAFETY: every target posted here is taken back below, before this receive
            // returns: the poll in between does not service connections.
            let target = unsafe { target.into_slice() };
            socket.set_recv_target(target);
            self.targeted.push((id, handle, 0));
        }
        let mut worked = self.ingest(now);
        // Every target back before any connection books what landed (and maybe finishes
        // its batch).
        for (_, handle, placed) in &mut self.targeted {
            let socket = self.sockets.get_mut::<tcp::Socket<'static>>(*handle);
            *placed = socket.take_recv_target().map_or(0, |(_, filled)| filled);
        }
        for (id, _, placed) in self.targeted.drain(..) {
            if placed > 0 {
                sink.placed(id, placed);
                worked = true;
            }
        }
        worked
    }

    fn accept(
        &mut self,
        admit: &mut dyn FnMut(IpAddr, Protocol) -> Result<ConnId, Vec<u8>>,
    ) -> bool {
        let mut worked = false;
        for (index, (handle, slot)) in self.slots.iter_mut().enumerate() {
            let socket = self.sockets.get_mut::<tcp::Socket<'_>>(*handle);
            let port = self.slot_ports[index];
            let protocol = if Some(port) == self.kafka_port {
                Protocol::Kafka
            } else {
                Protocol::Native
            };
            match *slot {
                Slot::Active => {}
                Slot::Listening => match socket.state() {
                    tcp::State::Established | tcp::State::CloseWait => {
                        let Some(peer) = socket.remote_endpoint() else {
                            continue;
                        };
                        match admit(IpAddr::from(peer.addr), protocol) {
                            Ok(id) => {
                                *slot = Slot::Active;
                                self.active.insert(id, index);
                            }
                            Err(refusal) => {
                                // Best effort: a new socket's send buffer has room.
                                let _ = socket.send_slice(&refusal);
                                socket.close();
                                *slot = Slot::Closing;
                            }
                        }
                        worked = true;
                    }
                    // A handshake that failed (RST): listen again.
                    tcp::State::Closed => listen(socket, port),
                    _ => {}
                },
                Slot::Closing => {
                    if matches!(socket.state(), tcp::State::Closed | tcp::State::TimeWait) {
                        if let Some(endpoint) = socket.remote_endpoint() {
                            let IpAddress::Ipv4(ip) = endpoint.addr;
                            self.device.connection_closed((ip, endpoint.port), port);
                        }
                        socket.abort();
                        listen(socket, port);
                        *slot = Slot::Listening;
                        worked = true;
                    }
                }
            }
        }
        worked
    }

    fn stream(&mut self, id: ConnId) -> Option<(SmolStream<'_, 'static>, Readiness)> {
        let (handle, _) = self.slots[*self.active.get(&id)?];
        let socket = self.sockets.get_mut::<tcp::Socket<'static>>(handle);
        let ready = Readiness {
            readable: socket.can_recv() || !socket.may_recv(),
            writable: socket.can_send(),
        };
        Some((SmolStream(socket), ready))
    }

    fn serviced(&mut self, id: ConnId, _serviced: Serviced) -> bool {
        self.active.get(&id).is_some_and(|&index| {
            self.sockets
                .get::<tcp::Socket<'_>>(self.slots[index].0)
                .is_active()
        })
    }

    fn close(&mut self, id: ConnId) {
        if let Some(index) = self.active.remove(&id) {
            let (handle, slot) = &mut self.slots[index];
            self.sockets.get_mut::<tcp::Socket<'_>>(*handle).close();
            *slot = Slot::Closing;
        }
    }

    fn reset(&mut self, id: ConnId) {
        if let Some(index) = self.active.remove(&id) {
            let (handle, slot) = &mut self.slots[index];
            let socket = self.sockets.get_mut::<tcp::Socket<'_>>(*handle);
            if let Some(endpoint) = socket.remote_endpoint() {
                let IpAddress::Ipv4(ip) = endpoint.addr;
                self.device
                    .connection_closed((ip, endpoint.port), self.slot_ports[index]);
            }
            // smoltcp sends one RST at its next poll and drops the unsent bytes.
            socket.abort();
            *slot = Slot::Closing;
        }
    }

    fn flush(&mut self, now: Timestamp) -> bool {
        // Send what the protocol produced in this iteration at once. Only send: frames that
        // arrived meanwhile wait for the next receive, where in-order payload can go
        // straight to its target (taking them in here put them all in the sockets' buffers).
        let timestamp = self.timestamp(now);
        let worked = self
            .iface
            .poll_egress(timestamp, &mut self.device, &mut self.sockets)
            != PollResult::None;
        self.device.end();
        worked
    }

    fn housekeeping(&mut self, now: Timestamp, metrics: &Metrics) {
        if now.saturating_duration_since(self.housekept_at) >= HOUSEKEEPING_INTERVAL {
            self.housekept_at = now;
            self.serve_hooks(now, metrics);
        }
        if self.drops.due(now) {
            let (new, warning) = self.drops.observe(self.device.stats(), now);
            metrics.xdp_rx_dropped.fetch_add(new, Ordering::Relaxed);
            if let Some(warning) = warning {
                log::warn!("broker {}: {warning}", self.broker);
            }
        }
    }

    fn close_all(&mut self, _ending: Ending, now: Timestamp) {
        // Every connection is reset, and the resets sent before the device goes.
        for (_, index) in self.active.drain() {
            let (handle, slot) = &mut self.slots[index];
            self.sockets.get_mut::<tcp::Socket<'_>>(*handle).abort();
            *slot = Slot::Closing;
        }
        // Let the RSTs out.
        self.device.begin();
        self.poll_iface(now);
        self.device.end();
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
        let start = Timestamp::ZERO;
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
