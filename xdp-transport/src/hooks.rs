//! What the device does to frames besides moving them: neighbours for smoltcp from the
//! kernel ([`Neighbours`] over a [`NeighbourSocket`]) and the adoption and translation of
//! SYN-cookie connections ([`CookieFlows`], with the XDP program's flow table). A thin
//! adapter: the decisions are in the sans-IO modules.

use std::collections::{HashSet, VecDeque};
use std::net::Ipv4Addr;

use smoltcp::time::{Duration, Instant};

use crate::cookie::{self, CookieCounts, CookieFlows, Remote, Rx, Tx};
use crate::neighbour::{self, ARP_FRAME_BYTES, KernelNeighbour, NeighbourCounts, Neighbours};
use crate::netlink::NeighbourSocket;

/// Least time between two warnings about the same kind of trouble.
const WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// The kinds of trouble the hooks warn about; each is throttled on its own, so that one
/// kind cannot hide another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trouble {
    /// smoltcp asked for more neighbours at a time than are tracked.
    NeighboursWanted,
    /// Sockets use more client hosts than smoltcp's neighbour cache holds.
    NeighbourCache,
    /// Reading the netlink socket failed.
    NetlinkReceive,
    /// Netlink messages came from another process than the kernel.
    NetlinkForeign,
    /// A request to the kernel could not be sent.
    NetlinkSend,
    /// Every adoption was in use.
    Adoptions,
    /// The XDP program's flow table refused a flow.
    FlowOpen,
    /// A flow could not be removed from the XDP program's flow table.
    FlowClose,
}

/// How many kinds of [`Trouble`] there are.
const TROUBLE_KINDS: usize = 8;
const _: () = assert!(Trouble::FlowClose as usize + 1 == TROUBLE_KINDS);

/// When each kind of trouble was last warned about.
#[derive(Debug, Default)]
struct Warnings {
    warned_at: [Option<Instant>; TROUBLE_KINDS],
}

impl Warnings {
    /// Whether a warning about `trouble` may be logged at `now` (then it is counted as
    /// logged).
    fn due(&mut self, trouble: Trouble, now: Instant) -> bool {
        let warned_at = &mut self.warned_at[trouble as usize];
        if warned_at.is_some_and(|at| now - at < WARNING_INTERVAL) {
            return false;
        }
        *warned_at = Some(now);
        true
    }
}

/// The clients that smoltcp's sockets are connected to, handshakes included. The poll loop
/// fills it before each [`Hooks::housekeeping`] (its sets keep their memory).
#[derive(Debug, Default)]
pub struct Peers {
    remotes: HashSet<Remote>,
    hosts: HashSet<Ipv4Addr>,
}

impl Peers {
    /// Forgets every peer.
    pub fn clear(&mut self) {
        self.remotes.clear();
        self.hosts.clear();
    }

    /// A socket is connected to `remote`.
    pub fn insert(&mut self, remote: Remote) {
        self.remotes.insert(remote);
        self.hosts.insert(remote.0);
    }

    /// Whether a socket is connected to `remote`.
    pub fn has_socket(&self, remote: &Remote) -> bool {
        self.remotes.contains(remote)
    }

    /// Whether a socket is connected to a port of `host`.
    pub fn has_host(&self, host: Ipv4Addr) -> bool {
        self.hosts.contains(&host)
    }
}

/// The hooks of one device.
#[derive(Debug)]
pub struct Hooks {
    /// The adoptions of each listening port (the broker's own, and its Kafka listener's).
    cookies: Vec<CookieFlows>,
    neighbours: Neighbours,
    /// smoltcp's neighbour cache size (for the warning when it is full).
    neighbour_cache_entries: usize,
    arp_replies: VecDeque<[u8; ARP_FRAME_BYTES]>,
    netlink: Option<NeighbourSocket>,
    flows: Option<xdp_prog::Flows>,
    ifindex: u32,
    local_ip: Ipv4Addr,
    kernel: Vec<KernelNeighbour>,
    now: Instant,
    warnings: Warnings,
    /// `table_full` of the cookie flows when last looked at.
    table_full_seen: u64,
}

/// Settings of [`Hooks`].
#[derive(Debug, Clone)]
pub struct HookConfig {
    /// The interface's index.
    pub ifindex: u32,
    /// The interface's MAC address.
    pub mac: [u8; 6],
    /// The broker's address.
    pub ip: Ipv4Addr,
    /// The broker's listening ports (its own protocol's, and its Kafka listener's if any).
    pub ports: Vec<u16>,
    /// The interface's MSS (its MTU - 40).
    pub mss: u16,
    /// Most adopted connections (pending and open) at a time, per port.
    pub flows_max: usize,
    /// Most neighbours smoltcp may be looking for at a time.
    pub neighbours_max: usize,
    /// How many neighbours smoltcp's cache holds (`smoltcp::config`).
    pub neighbour_cache_entries: usize,
}

/// The adoptions of the port a segment of `frame` goes to (`destination`) or comes from;
/// with one port, that one without looking (the common case pays no second parse).
fn cookies_of<'c>(
    cookies: &'c mut [CookieFlows],
    frame: &[u8],
    destination: bool,
) -> Option<&'c mut CookieFlows> {
    if let [only] = cookies {
        return Some(only);
    }
    let (source, to) = cookie::segment_ports(frame)?;
    let port = if destination { to } else { source };
    cookies.iter_mut().find(|c| c.port() == port)
}

/// The XDP program's key of the flow from `remote` to `local`.
fn flow_key(remote: Remote, local: (Ipv4Addr, u16)) -> xdp_prog::FlowKey {
    xdp_prog::FlowKey {
        remote_ip: remote.0,
        remote_port: remote.1,
        local_ip: local.0,
        local_port: local.1,
    }
}

impl Hooks {
    /// Hooks over a netlink socket and the XDP program's flow table (`None` in tests: no
    /// kernel to ask, no table to keep).
    pub fn new(
        config: HookConfig,
        netlink: Option<NeighbourSocket>,
        flows: Option<xdp_prog::Flows>,
    ) -> Hooks {
        Hooks {
            cookies: config
                .ports
                .iter()
                .map(|&port| CookieFlows::new(port, config.mss, config.flows_max))
                .collect(),
            neighbours: Neighbours::new(
                config.ifindex,
                config.mac,
                config.ip,
                config.neighbours_max,
                config.neighbour_cache_entries,
            ),
            neighbour_cache_entries: config.neighbour_cache_entries,
            arp_replies: VecDeque::new(),
            netlink,
            flows,
            ifindex: config.ifindex,
            local_ip: config.ip,
            kernel: Vec::new(),
            now: Instant::ZERO,
            warnings: Warnings::default(),
            table_full_seen: 0,
        }
    }

    /// Counts for the metrics.
    pub fn counts(&self) -> (CookieCounts, NeighbourCounts) {
        let cookies = self
            .cookies
            .iter()
            .map(CookieFlows::counts)
            .fold(CookieCounts::default(), CookieCounts::plus);
        (cookies, self.neighbours.counts())
    }

    /// The next frame to hand smoltcp before any received one: neighbours first (so that
    /// a SYN-ACK finds its neighbour), then the frames of adoptions.
    pub fn next_injected(&mut self) -> Option<Vec<u8>> {
        if let Some(reply) = self.arp_replies.pop_front() {
            return Some(reply.to_vec());
        }
        self.cookies.iter_mut().find_map(CookieFlows::next_injected)
    }

    /// A received frame (in place). An adoption opens its flow in the XDP program's table.
    pub fn on_rx(&mut self, frame: &mut [u8], now: Instant) -> Rx {
        self.now = now;
        let flows = &self.flows;
        let mut refused = None;
        let Some(cookies) = cookies_of(&mut self.cookies, frame, true) else {
            return Rx::Deliver;
        };
        let local = (self.local_ip, cookies.port());
        let verdict = cookies.on_rx(frame, now, &mut |remote| {
            let Some(flows) = flows else {
                return true;
            };
            match flows.insert(&flow_key(remote, local)) {
                Ok(()) => true,
                Err(error) => {
                    refused = Some(error);
                    false
                }
            }
        });
        if let Some(error) = refused {
            self.warn(
                Trouble::FlowOpen,
                format!("{error} (the connection was refused with a RST)"),
            );
        }
        verdict
    }

    /// A frame smoltcp wrote (in place). smoltcp's ARP never goes on the wire: its
    /// requests are asked of the kernel instead.
    pub fn on_tx(&mut self, frame: &mut [u8]) -> Tx {
        if neighbour::is_arp(frame) {
            if let Some(target) = neighbour::arp_request_target(frame) {
                if self.neighbours.on_arp_request(target, self.now) {
                    self.warn(
                        Trouble::NeighboursWanted,
                        format!(
                            "the neighbour table is full: ARP request for {target} not tracked (raise --xdp-sockets)"
                        ),
                    );
                }
            }
            return Tx::Swallow;
        }
        match cookies_of(&mut self.cookies, frame, false) {
            Some(cookies) => cookies.on_tx(frame),
            None => Tx::Send,
        }
    }

    /// The connection with `remote` on `local_port` ended: the flow is forgotten here and
    /// in the XDP program.
    pub fn connection_closed(&mut self, remote: Remote, local_port: u16) {
        if let Some(cookies) = self.cookies.iter_mut().find(|c| c.port() == local_port) {
            cookies.close(remote);
        }
        self.forget_closed();
    }

    /// Once in a while (every few milliseconds at most): reads the kernel's neighbour news,
    /// asks it what smoltcp needs, and expires adoptions and flows without a socket
    /// (`peers` says which clients have one). Returns the adoptions given up: abort the
    /// half-open smoltcp socket of each.
    pub fn housekeeping(&mut self, now: Instant, peers: &Peers) -> Vec<Remote> {
        self.now = now;
        if let Some(netlink) = &mut self.netlink {
            match netlink.receive(&mut self.kernel) {
                Ok(0) => {}
                Ok(foreign) => self.warn(
                    Trouble::NetlinkForeign,
                    format!(
                        "dropped {foreign} netlink message(s) sent to the broker's neighbour socket by another process than the kernel"
                    ),
                ),
                // ENOBUFS: notifications were lost; the periodic dump catches up.
                Err(error) => self.warn(
                    Trouble::NetlinkReceive,
                    format!("reading the kernel's neighbour table failed: {error}"),
                ),
            }
        }
        for message in self.kernel.drain(..) {
            match message {
                KernelNeighbour::Error { errno } => log::debug!(
                    "the kernel refused a neighbour request: {}",
                    std::io::Error::from_raw_os_error(errno)
                ),
                other => self.neighbours.on_kernel(other),
            }
        }
        let (actions, cache_full) = self.neighbours.poll(now, |ip| peers.has_host(ip));
        if cache_full {
            self.warn(
                Trouble::NeighbourCache,
                format!(
                    "sockets use more client hosts than smoltcp's neighbour cache holds ({}): segments to some are dropped until smoltcp asks for their address again (build the broker with a larger SMOLTCP_IFACE_NEIGHBOR_CACHE_COUNT)",
                    self.neighbour_cache_entries
                ),
            );
        }
        self.arp_replies.extend(actions.replies);
        if let Some(netlink) = &mut self.netlink {
            let mut failed = None;
            for ip in actions.resolve {
                if let Err(error) = netlink.request_resolve(self.ifindex, ip) {
                    failed = Some(format!("asking the kernel to resolve {ip} failed: {error}"));
                }
            }
            if actions.dump {
                if let Err(error) = netlink.request_dump() {
                    failed = Some(format!(
                        "asking for the kernel's neighbour table failed: {error}"
                    ));
                }
            }
            if let Some(text) = failed {
                self.warn(Trouble::NetlinkSend, text);
            }
        }
        for cookies in &mut self.cookies {
            cookies.expire(now, |remote| peers.has_socket(remote));
        }
        self.forget_closed();
        let table_full = self.counts().0.table_full;
        if table_full > self.table_full_seen {
            let refused = table_full - self.table_full_seen;
            self.table_full_seen = table_full;
            self.warn(
                Trouble::Adoptions,
                format!(
                    "{refused} connection(s) refused with a RST: all {} adoptions in use (raise --xdp-sockets)",
                    self.cookies.iter().map(CookieFlows::len).sum::<usize>()
                ),
            );
        }
        self.cookies
            .iter_mut()
            .flat_map(CookieFlows::take_aborted)
            .collect()
    }

    fn forget_closed(&mut self) {
        let mut failed = None;
        for cookies in &mut self.cookies {
            let local = (self.local_ip, cookies.port());
            for remote in cookies.take_closed() {
                let Some(flows) = &self.flows else {
                    continue;
                };
                if let Err(error) = flows.remove(&flow_key(remote, local)) {
                    failed = Some(error.to_string());
                }
            }
        }
        if let Some(error) = failed {
            self.warn(Trouble::FlowClose, error);
        }
    }

    fn warn(&mut self, trouble: Trouble, text: String) {
        if self.warnings.due(trouble, self.now) {
            log::warn!("{text}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_trouble_is_throttled_on_its_own() {
        let mut warnings = Warnings::default();
        let at = Instant::from_millis;
        assert!(warnings.due(Trouble::NeighboursWanted, at(0)));
        assert!(
            warnings.due(Trouble::FlowOpen, at(1)),
            "another kind is not hidden behind the first"
        );
        assert!(!warnings.due(Trouble::NeighboursWanted, at(2)));
        assert!(!warnings.due(Trouble::FlowOpen, at(9_999)));
        assert!(warnings.due(Trouble::NeighboursWanted, at(10_000)));
        assert!(warnings.due(Trouble::FlowOpen, at(10_001)));
        assert!(warnings.due(Trouble::FlowClose, at(10_001)));
    }

    #[test]
    fn peers_answer_by_connection_and_by_host() {
        let mut peers = Peers::default();
        let client = Ipv4Addr::new(10, 77, 0, 1);
        peers.insert((client, 40_000));
        assert!(peers.has_socket(&(client, 40_000)));
        assert!(!peers.has_socket(&(client, 40_001)));
        assert!(peers.has_host(client));
        assert!(!peers.has_host(Ipv4Addr::new(10, 77, 0, 9)));
        peers.clear();
        assert!(!peers.has_socket(&(client, 40_000)) && !peers.has_host(client));
    }
}
