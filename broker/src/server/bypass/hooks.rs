//! What the device does to frames besides moving them: neighbours for smoltcp from the
//! kernel ([`Neighbours`] over a [`NeighbourSocket`]) and the adoption and translation of
//! SYN-cookie connections ([`CookieFlows`], with the XDP program's flow table). A thin
//! adapter: the decisions are in the sans-IO modules.

use std::collections::VecDeque;
use std::net::Ipv4Addr;

use smoltcp::time::{Duration, Instant};

use super::cookie::{CookieCounts, CookieFlows, Remote, Rx, Tx};
use super::neighbour::{self, ARP_FRAME_BYTES, KernelNeighbour, NeighbourCounts, Neighbours};
use super::netlink::NeighbourSocket;

/// Least time between two warnings about the same kind of trouble.
const WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// The hooks of one device.
#[derive(Debug)]
pub struct Hooks {
    cookies: CookieFlows,
    neighbours: Neighbours,
    arp_replies: VecDeque<[u8; ARP_FRAME_BYTES]>,
    netlink: Option<NeighbourSocket>,
    flows: Option<xdp_prog::Flows>,
    ifindex: u32,
    local_ip: Ipv4Addr,
    local_port: u16,
    kernel: Vec<KernelNeighbour>,
    now: Instant,
    warned_at: Option<Instant>,
    /// `table_full` of the cookie flows when last looked at.
    table_full_seen: u64,
}

/// Settings of [`Hooks`].
#[derive(Debug, Clone, Copy)]
pub struct HookConfig {
    /// The interface's index.
    pub ifindex: u32,
    /// The interface's MAC address.
    pub mac: [u8; 6],
    /// The broker's address.
    pub ip: Ipv4Addr,
    /// The broker's port.
    pub port: u16,
    /// The interface's MSS (its MTU - 40).
    pub mss: u16,
    /// Most adopted connections (pending and open) at a time.
    pub flows_max: usize,
    /// Most neighbours tracked (known, wanted).
    pub neighbours_max: usize,
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
            cookies: CookieFlows::new(config.port, config.mss, config.flows_max),
            neighbours: Neighbours::new(
                config.ifindex,
                config.mac,
                config.ip,
                config.neighbours_max,
            ),
            arp_replies: VecDeque::new(),
            netlink,
            flows,
            ifindex: config.ifindex,
            local_ip: config.ip,
            local_port: config.port,
            kernel: Vec::new(),
            now: Instant::ZERO,
            warned_at: None,
            table_full_seen: 0,
        }
    }

    /// Counts for the metrics.
    pub fn counts(&self) -> (CookieCounts, NeighbourCounts) {
        (self.cookies.counts(), self.neighbours.counts())
    }

    /// The next frame to hand smoltcp before any received one: neighbours first (so that
    /// a SYN-ACK finds its neighbour), then the frames of adoptions.
    pub fn next_injected(&mut self) -> Option<Vec<u8>> {
        if let Some(reply) = self.arp_replies.pop_front() {
            return Some(reply.to_vec());
        }
        self.cookies.next_injected()
    }

    /// A received frame (in place). An adoption opens its flow in the XDP program's table.
    pub fn on_rx(&mut self, frame: &mut [u8], now: Instant) -> Rx {
        self.now = now;
        let (flows, local) = (&self.flows, (self.local_ip, self.local_port));
        let mut refused = None;
        let verdict = self.cookies.on_rx(frame, now, &mut |remote| {
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
            self.warn(format!("{error} (the connection was refused with a RST)"));
        }
        verdict
    }

    /// A frame smoltcp wrote (in place). smoltcp's ARP never goes on the wire: its
    /// requests are asked of the kernel instead.
    pub fn on_tx(&mut self, frame: &mut [u8]) -> Tx {
        if neighbour::is_arp(frame) {
            if let Some(target) = neighbour::arp_request_target(frame) {
                if self.neighbours.on_arp_request(target, self.now) {
                    self.warn(format!(
                        "the neighbour table is full: ARP request for {target} not tracked (raise --xdp-sockets)"
                    ));
                }
            }
            return Tx::Swallow;
        }
        self.cookies.on_tx(frame)
    }

    /// The connection with `remote` ended: the flow is forgotten here and in the XDP
    /// program.
    pub fn connection_closed(&mut self, remote: Remote) {
        self.cookies.close(remote);
        self.forget_closed();
    }

    /// Once in a while (every few milliseconds at most): reads the kernel's neighbour news,
    /// asks it what smoltcp needs, and expires adoptions and flows without a socket.
    pub fn housekeeping(&mut self, now: Instant, has_socket: &dyn Fn(&Remote) -> bool) {
        self.now = now;
        if let Some(netlink) = &mut self.netlink {
            if let Err(error) = netlink.receive(&mut self.kernel) {
                // ENOBUFS: notifications were lost; the periodic dump catches up.
                let text = format!("reading the kernel's neighbour table failed: {error}");
                self.warn(text);
            }
        }
        let mut full = false;
        for message in self.kernel.drain(..) {
            match message {
                KernelNeighbour::Error { errno } => log::debug!(
                    "the kernel refused a neighbour request: {}",
                    std::io::Error::from_raw_os_error(errno)
                ),
                other => full |= self.neighbours.on_kernel(other),
            }
        }
        if full {
            self.warn(
                "the neighbour table is full: kernel entries ignored (raise --xdp-sockets)".into(),
            );
        }
        let actions = self.neighbours.poll(now);
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
                self.warn(text);
            }
        }
        self.cookies.expire(now, has_socket);
        self.forget_closed();
        let table_full = self.cookies.counts().table_full;
        if table_full > self.table_full_seen {
            let refused = table_full - self.table_full_seen;
            self.table_full_seen = table_full;
            self.warn(format!(
                "{refused} connection(s) refused with a RST: all {} adoptions in use (raise --xdp-sockets)",
                self.cookies.len()
            ));
        }
    }

    fn forget_closed(&mut self) {
        let local = (self.local_ip, self.local_port);
        for remote in self.cookies.take_closed() {
            let Some(flows) = &self.flows else {
                continue;
            };
            if let Err(error) = flows.remove(&flow_key(remote, local)) {
                log::warn!("{error}");
            }
        }
    }

    fn warn(&mut self, text: String) {
        if self
            .warned_at
            .is_some_and(|at| self.now - at < WARNING_INTERVAL)
        {
            return;
        }
        self.warned_at = Some(self.now);
        log::warn!("{text}");
    }
}
