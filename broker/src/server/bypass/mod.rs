//! The kernel-bypass backend: an XDP program (`xdp_prog`) answers SYNs to the broker's port
//! with SYN cookies and steers its established connections into AF_XDP sockets, a smoltcp
//! device runs over them with hooks that adopt the cookie connections and take neighbours
//! from the kernel (`xdp_transport`; ARP stays with the kernel), smoltcp's sockets over it
//! are a [`Transport`](crate::server::serve::Transport) ([`transport`]), and the network
//! loop of both backends ([`ServeLoop`]) runs over it on a pinned thread. This module wires
//! them together. See docs/xdp.md.

pub mod transport;

use std::net::{Ipv4Addr, SocketAddr};
use std::thread::JoinHandle;

use xdp_prog::{AttachMode, SteerConfig, XdpError, XdpSteering};

use crate::server::BrokerOptions;
use transport::{BypassTransport, Endpoint, SocketPoolConfig};

use crate::server::serve::{LoopContext, ServeLoop};
use xdp_transport::cookie;
use xdp_transport::device::{Burst, QueueSocket, XskDevice};
use xdp_transport::faults::FaultConfig;
use xdp_transport::hooks::{HookConfig, Hooks};
use xdp_transport::netlink::NeighbourSocket;
use xdp_transport::xsk::{self, FRAME_BYTES, Xsk, XskError, XskGeometry};

/// Frames taken from the rx ring per loop iteration.
const RX_BURST: u32 = 64;

/// Settings of the bypass backend.
#[derive(Debug, Clone)]
pub struct XdpOptions {
    /// The interface whose queue the broker takes.
    pub iface: String,
    /// Rx queues to serve, one socket each (`None`: all the interface has; another number
    /// than that is refused).
    pub queues: Option<u32>,
    /// Cores for the poll threads (the first one is used); empty: not pinned.
    pub cores: Vec<usize>,
    /// How to attach the XDP program.
    pub mode: AttachMode,
    /// smoltcp TCP sockets (the most connections at a time).
    pub sockets: usize,
    /// Receive and send buffer of each smoltcp socket, in bytes.
    pub socket_buffer_bytes: usize,
    /// UMEM frames and ring sizes.
    pub geometry: XskGeometry,
    /// Put the UMEM on 4 KiB pages (with a warning) when hugepages are short.
    pub allow_small_pages: bool,
    /// Preferred busy polling of the queue's NAPI for up to this many microseconds per call
    /// (see [`Xsk::enable_busy_poll`]); `None`: off.
    pub busy_poll_us: Option<u32>,
    /// Debug only: inject faults into the device (see `--debug-inject-faults`).
    pub faults: Option<FaultConfig>,
}

/// Why the bypass backend could not start. The broker never falls back to kernel TCP.
#[derive(Debug, thiserror::Error)]
pub enum BypassError {
    /// `--queues` does not match the interface's rx queues: frames on a queue without a
    /// socket would miss the broker (the kernel would reset those connections).
    #[error(
        "--queues {asked}: {iface} has {has} rx queue(s), and the broker must take every one (the NIC spreads connections over all of them); use --queues {has}, or change the interface's queues (ethtool -L {iface} combined {asked}; for veth: ip link add ... numrxqueues {asked})"
    )]
    Queues {
        /// The interface.
        iface: String,
        /// Queues asked for.
        asked: u32,
        /// Rx queues the interface has.
        has: u32,
    },
    /// The listen address does not suit the bypass backend.
    #[error(
        "--listen {0}: the xdp backend needs the interface's own IPv4 address (e.g. 10.77.0.2:9100), not a wildcard or IPv6 address"
    )]
    ListenAddress(SocketAddr),
    /// The listen address is not on the interface.
    #[error(
        "{ip} is not an address of {iface} (it has: {existing}); listen on one of them or add it (ip addr add {ip}/24 dev {iface})"
    )]
    AddressNotOnInterface {
        /// The address.
        ip: Ipv4Addr,
        /// The interface.
        iface: String,
        /// Its IPv4 addresses.
        existing: String,
    },
    /// The interface's settings could not be read.
    #[error("cannot read {what} of {iface}: {reason}")]
    Interface {
        /// The interface.
        iface: String,
        /// What was read.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
    /// The MTU does not fit a UMEM frame.
    #[error(
        "{iface} has MTU {mtu}, but a frame of {FRAME_BYTES} bytes holds at most {max}: lower the MTU (ip link set {iface} mtu 3500)"
    )]
    Mtu {
        /// The interface.
        iface: String,
        /// Its MTU.
        mtu: usize,
        /// The largest that fits.
        max: usize,
    },
    /// The XDP program could not be attached or the socket not registered.
    #[error("{0}")]
    Xdp(#[from] XdpError),
    /// The AF_XDP socket could not be set up.
    #[error("{0}")]
    Xsk(#[from] XskError),
    /// The netlink socket for the kernel's neighbour table could not be opened.
    #[error(
        "cannot open a netlink socket for the kernel's neighbour table ({0}); the XDP backend learns its neighbours there: run the broker as root (CAP_NET_ADMIN)"
    )]
    Netlink(std::io::Error),
    /// The busy-poll socket options were refused.
    #[error(
        "--xdp-busy-poll-us: the kernel refused the busy-poll options on the AF_XDP socket of {iface}: {source} (SO_PREFER_BUSY_POLL needs Linux 5.11 or later and SO_BUSY_POLL needs CAP_NET_ADMIN); run without --xdp-busy-poll-us"
    )]
    BusyPoll {
        /// The interface.
        iface: String,
        /// What setsockopt said.
        source: std::io::Error,
    },
}

/// The attached XDP program; dropping it detaches the program (after the loop has ended).
#[derive(Debug)]
pub struct Attached {
    steering: XdpSteering,
}

impl Attached {
    /// The program's counters.
    pub fn counters(&self) -> Result<xdp_prog::Counters, XdpError> {
        self.steering.counters()
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        match self.steering.counters() {
            Ok(c) => log::info!(
                "XDP program on ifindex {}: redirected {}, passed {}, no_socket {}, malformed {}, syn_cookie_sent {}, cookie_valid {}, cookie_invalid {}, syn_dropped {}",
                self.steering.ifindex(),
                c.redirected,
                c.passed,
                c.no_socket,
                c.malformed,
                c.syn_cookie_sent,
                c.cookie_valid,
                c.cookie_invalid,
                c.syn_dropped
            ),
            Err(e) => log::warn!("cannot read the XDP counters: {e}"),
        }
    }
}

fn read_sysfs(iface: &str, what: &'static str) -> Result<String, BypassError> {
    let path = format!("/sys/class/net/{iface}/{what}");
    std::fs::read_to_string(&path)
        .map(|text| text.trim().to_owned())
        .map_err(|e| BypassError::Interface {
            iface: iface.to_owned(),
            what,
            reason: format!("{path}: {e}"),
        })
}

/// The interface's rx queues (`/sys/class/net/IF/queues/rx-N`).
fn rx_queue_count(iface: &str) -> Result<u32, BypassError> {
    let path = format!("/sys/class/net/{iface}/queues");
    let entries = std::fs::read_dir(&path).map_err(|e| BypassError::Interface {
        iface: iface.to_owned(),
        what: "the rx queues",
        reason: format!("{path}: {e}"),
    })?;
    let count = entries
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("rx-"))
        .count();
    Ok(count as u32)
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Attaches the XDP program, binds the AF_XDP socket and starts the poll thread. The
/// returned handle detaches the program when dropped; drop it after joining the thread.
pub fn spawn(
    context: LoopContext,
    options: &BrokerOptions,
    xdp: &XdpOptions,
) -> Result<(JoinHandle<()>, Attached), BypassError> {
    // The Kafka listener's address was checked at start: ours, with its own port.
    let link = inspect(options.listen, options.kafka_listen.map(|a| a.port()), xdp)?;
    let iface = xdp.iface.as_str();
    // Opened here, in the broker's network namespace, before anything is attached.
    let netlink = NeighbourSocket::open().map_err(BypassError::Netlink)?;
    let config = SteerConfig {
        mss: link.mss,
        window_shift: cookie::window_shift(xdp.socket_buffer_bytes),
        window: u16::try_from(xdp.socket_buffer_bytes).unwrap_or(u16::MAX),
        // Userspace opens at most one flow per adoption (`--xdp-sockets` x 2 at a time per
        // port, see the hooks) and closes each; twice that is headroom.
        flows_max: u32::try_from(xdp.sockets * 4 * link.ports().len()).unwrap_or(u32::MAX),
        ..SteerConfig::new(link.ports(), vec![link.ip])
    };
    // A program there already (another broker's, or a crashed one's leftover) is reported
    // as such before any socket is bound to a queue that broker may hold.
    if let Some(program) = xdp_prog::status(iface)? {
        return Err(XdpError::AlreadyAttached {
            ifname: iface.to_owned(),
            prog_id: program.prog_id,
            prog_name: program.name,
            mode: program.mode,
        }
        .into());
    }
    let (queues, registered) = bind_queues(xdp, link.queue_count)?;
    let steering = XdpSteering::attach_with_sockets(iface, xdp.mode, &config, &registered)?;
    let flows = steering.flows()?;
    announce(options.settings.broker_id, &link, xdp, &steering);
    let hooks = Hooks::new(
        HookConfig {
            ifindex: link.ifindex,
            mac: link.mac,
            ip: link.ip,
            ports: link.ports(),
            mss: link.mss,
            flows_max: xdp.sockets * 2,
            neighbours_max: xdp.sockets.max(64),
            neighbour_cache_entries: smoltcp::config::IFACE_NEIGHBOR_CACHE_COUNT,
        },
        Some(netlink),
        Some(flows),
    );
    let device = XskDevice::new(queues, link.mtu, RX_BURST, hooks);
    let thread = spawn_loop(context, device, &link, options, xdp);
    Ok((thread, Attached { steering }))
}

/// Says what was attached, and warns when smoltcp's neighbour cache is smaller than the
/// socket pool.
fn announce(broker: u16, link: &Link, xdp: &XdpOptions, steering: &XdpSteering) {
    let busy_poll = match xdp.busy_poll_us {
        Some(us) => format!(", preferred busy polling for {us} us"),
        None => String::new(),
    };
    let Link {
        ip,
        prefix,
        port,
        kafka_port,
        mtu,
        queue_count,
        ..
    } = link;
    let kafka = match kafka_port {
        Some(kafka) => format!(" (Kafka clients on port {kafka})"),
        None => String::new(),
    };
    log::info!(
        "broker {broker}: XDP program on {} in {} mode, {queue_count} AF_XDP socket(s) on queue(s) 0..{} (copy mode, {} frames of {FRAME_BYTES} B each{busy_poll}), {ip}/{prefix} port {port}{kafka}, MTU {mtu}",
        xdp.iface,
        steering.mode(),
        queue_count - 1,
        xdp.geometry.frames
    );
    let cache_entries = smoltcp::config::IFACE_NEIGHBOR_CACHE_COUNT;
    if xdp.sockets > cache_entries {
        log::warn!(
            "broker {broker}: --xdp-sockets {} is more than smoltcp's neighbour cache holds ({cache_entries}): with more client hosts than that at a time, segments to some are dropped while smoltcp looks their address up again (build the broker with SMOLTCP_IFACE_NEIGHBOR_CACHE_COUNT={} or more)",
            xdp.sockets,
            xdp.sockets
        );
    }
}

/// What the broker needs to know of its interface, checked.
struct Link {
    ifindex: u32,
    ip: Ipv4Addr,
    prefix: u8,
    port: u16,
    /// The Kafka listener's port (on the same address), if any.
    kafka_port: Option<u16>,
    mac: [u8; 6],
    mtu: usize,
    /// The MTU less the IPv4 and TCP headers.
    mss: u16,
    queue_count: u32,
}

impl Link {
    /// The ports the XDP program steers: ours, and the Kafka listener's.
    fn ports(&self) -> Vec<u16> {
        std::iter::once(self.port).chain(self.kafka_port).collect()
    }
}

/// Checks the interface against the listen address and the options: the address is on
/// it, the broker takes every rx queue, and a packet fits a UMEM frame.
fn inspect(
    listen: SocketAddr,
    kafka_port: Option<u16>,
    xdp: &XdpOptions,
) -> Result<Link, BypassError> {
    let (ip, port) = match listen {
        SocketAddr::V4(v4) if !v4.ip().is_unspecified() => (*v4.ip(), v4.port()),
        other => return Err(BypassError::ListenAddress(other)),
    };
    let iface = xdp.iface.as_str();
    let ifindex = xdp_prog::ifindex(iface)?;
    let addresses = xsk::interface_ipv4(iface).map_err(|e| BypassError::Interface {
        iface: iface.to_owned(),
        what: "the addresses",
        reason: e.to_string(),
    })?;
    let Some(&(_, prefix)) = addresses.iter().find(|(a, _)| *a == ip) else {
        return Err(BypassError::AddressNotOnInterface {
            ip,
            iface: iface.to_owned(),
            existing: addresses
                .iter()
                .map(|(a, p)| format!("{a}/{p}"))
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    let rx_queues = rx_queue_count(iface)?;
    let queue_count = xdp.queues.unwrap_or(rx_queues);
    if queue_count != rx_queues || queue_count == 0 {
        return Err(BypassError::Queues {
            iface: iface.to_owned(),
            asked: queue_count,
            has: rx_queues,
        });
    }
    let mac_text = read_sysfs(iface, "address")?;
    let mac = parse_mac(&mac_text).ok_or_else(|| BypassError::Interface {
        iface: iface.to_owned(),
        what: "the MAC address",
        reason: format!("{mac_text:?} is not a MAC address"),
    })?;
    let mtu_text = read_sysfs(iface, "mtu")?;
    let mtu: usize = mtu_text.parse().map_err(|_| BypassError::Interface {
        iface: iface.to_owned(),
        what: "the MTU",
        reason: format!("{mtu_text:?} is not a number"),
    })?;
    // The kernel puts a packet in a frame after up to 256 bytes of headroom.
    let max = FRAME_BYTES - 256 - 14;
    if mtu > max {
        return Err(BypassError::Mtu {
            iface: iface.to_owned(),
            mtu,
            max,
        });
    }
    Ok(Link {
        ifindex,
        ip,
        prefix,
        port,
        kafka_port,
        mac,
        mtu,
        mss: u16::try_from(mtu.saturating_sub(40)).unwrap_or(u16::MAX),
        queue_count,
    })
}

/// An rx queue and the AF_XDP socket bound to it, for the program's socket map.
type QueueFd = (u32, std::os::fd::RawFd);

/// One AF_XDP socket on each rx queue, and the (queue, socket) pairs to register with the
/// program.
fn bind_queues(
    xdp: &XdpOptions,
    queue_count: u32,
) -> Result<(Vec<QueueSocket>, Vec<QueueFd>), BypassError> {
    let iface = xdp.iface.as_str();
    // The sockets first: the program is attached with every queue's socket registered, so
    // no early SYN finds a queue without one (the kernel would answer it with a RST).
    let mut queues = Vec::with_capacity(queue_count as usize);
    let mut registered = Vec::with_capacity(queue_count as usize);
    for queue in 0..queue_count {
        let (mut socket, umem, frames) =
            Xsk::new(iface, queue, xdp.geometry, xdp.allow_small_pages)?;
        if let Some(timeout_us) = xdp.busy_poll_us {
            socket
                .enable_busy_poll(timeout_us, RX_BURST)
                .map_err(|source| BypassError::BusyPoll {
                    iface: iface.to_owned(),
                    source,
                })?;
        }
        registered.push((queue, socket.fd()));
        queues.push(QueueSocket::new(socket, umem, frames));
    }
    Ok((queues, registered))
}

/// Starts the pinned thread of the network loop over `device`.
fn spawn_loop(
    context: LoopContext,
    device: XskDevice,
    link: &Link,
    options: &BrokerOptions,
    xdp: &XdpOptions,
) -> JoinHandle<()> {
    let endpoint = Endpoint {
        mac: link.mac,
        ip: link.ip,
        prefix: link.prefix,
        port: link.port,
        kafka_port: link.kafka_port,
    };
    let sockets = SocketPoolConfig {
        sockets: xdp.sockets,
        buffer_bytes: xdp.socket_buffer_bytes,
    };
    let core = xdp.cores.first().copied();
    let broker = options.settings.broker_id;
    let device = match xdp.faults {
        None => device,
        Some(faults) => {
            log::warn!(
                "broker {broker}: DEBUG fault injection on (--debug-inject-faults {faults:?}): frames are dropped, duplicated, reordered and corrupted on purpose; never use this in production"
            );
            device.with_faults(faults)
        }
    };
    let transport = BypassTransport::new(device, endpoint, sockets, broker);
    let poll = ServeLoop::new(transport, options, context);
    super::spawn("network-xdp", move || {
        pin(core, broker);
        let device = poll.run().into_device();
        if let Some(counts) = device.fault_counts() {
            log::info!("broker {broker}: faults injected: {counts:?}");
            // A JSON summary on stdout, for the tests that must prove faults happened.
            println!(
                "{{\"debug_faults\":{{\"broker\":{broker},\"dropped\":{},\"duplicated\":{},\"reordered\":{},\"corrupted\":{}}}}}",
                counts.dropped, counts.duplicated, counts.reordered, counts.corrupted
            );
        }
        report(broker, &device);
    })
}

fn pin(core: Option<usize>, broker: u16) {
    if let Some(id) = core {
        if core_affinity::set_for_current(core_affinity::CoreId { id }) {
            log::info!("broker {broker}: network loop pinned to core {id}");
        } else {
            log::warn!("broker {broker}: cannot pin the network loop to core {id}");
        }
    }
}

fn report(broker: u16, device: &impl Burst) {
    log::info!("broker {broker}: AF_XDP socket: {:?}", device.stats());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_garbage_does_not() {
        assert_eq!(
            parse_mac("02:aa:0b:cc:0d:ff"),
            Some([2, 0xaa, 0x0b, 0xcc, 0x0d, 0xff])
        );
        assert_eq!(parse_mac("02:aa:0b:cc:0d"), None);
        assert_eq!(parse_mac("02:aa:0b:cc:0d:ff:00"), None);
        assert_eq!(parse_mac("zz:aa:0b:cc:0d:ff"), None);
    }
}
