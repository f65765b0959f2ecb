//! Fixtures of the steering tests: a pair of private network namespaces joined by a veth
//! pair, raw frames, AF_XDP sockets, and a logger that keeps what it saw.
//!
//! Every fixture removes what it created in `Drop`, also when the test fails; a namespace
//! left by a killed test run (its pid is gone) is removed by the next run.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once};
use std::time::Duration;

use crate::common::{in_netns, ip, run};

/// Prefix of every namespace the tests create.
const PREFIX: &str = "xdpt";

/// The client's address on the test veth.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// The broker's steered address on the test veth.
pub const BROKER_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
/// A second broker-side address that is not steered.
pub const OTHER_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 3);
/// MAC of the client end.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0x99, 0, 1];
/// MAC of the broker end.
pub const BROKER_MAC: [u8; 6] = [0x02, 0, 0, 0x99, 0, 2];

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Removes namespaces left by earlier runs of these tests that were killed.
fn remove_stale_namespaces() {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(&format!("{PREFIX}-")) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or_default();
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Two namespaces, `client` and `broker`, joined by a veth pair with one rx/tx queue each:
/// `client_if` (CLIENT_IP/24) and `broker_if` (BROKER_IP/24 and OTHER_IP/24). IPv6 is off
/// and both sides have static neighbour entries, so the only packets on the wire are the
/// ones a test sends (and the ARP it provokes on purpose).
#[derive(Debug)]
pub struct Pair {
    /// The client namespace.
    pub client: String,
    /// The broker namespace.
    pub broker: String,
    /// The client end of the veth.
    pub client_if: String,
    /// The broker end of the veth.
    pub broker_if: String,
}

impl Pair {
    /// Creates the namespaces and the veth, with `mtu` on both ends.
    pub fn new(mtu: u32) -> Pair {
        static CLEAN: Once = Once::new();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        CLEAN.call_once(remove_stale_namespaces);
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pair = Pair {
            client: format!("{PREFIX}-{pid}-{n}-c"),
            broker: format!("{PREFIX}-{pid}-{n}-b"),
            client_if: format!("xc{}-{n}", pid % 1_000_000),
            broker_if: format!("xb{}-{n}", pid % 1_000_000),
        };
        // From here on, a failing step still removes what exists (Drop).
        for ns in [&pair.client, &pair.broker] {
            ip(&["netns", "add", ns]);
            run(Command::new("ip").args([
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ]));
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let mtu = mtu.to_string();
        ip(&[
            "-n",
            &pair.broker,
            "link",
            "add",
            &pair.broker_if,
            "numrxqueues",
            "1",
            "numtxqueues",
            "1",
            "address",
            &mac_text(BROKER_MAC),
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            &pair.client_if,
            "numrxqueues",
            "1",
            "numtxqueues",
            "1",
            "address",
            &mac_text(CLIENT_MAC),
            "mtu",
            &mtu,
            "netns",
            &pair.client,
        ]);
        let configure = |ns: &str, ifname: &str, addresses: &[Ipv4Addr], peer: Ipv4Addr, mac| {
            for address in addresses {
                ip(&[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{address}/24"),
                    "dev",
                    ifname,
                ]);
            }
            ip(&["-n", ns, "link", "set", ifname, "up"]);
            ip(&[
                "-n",
                ns,
                "neigh",
                "replace",
                &peer.to_string(),
                "lladdr",
                &mac_text(mac),
                "dev",
                ifname,
                "nud",
                "permanent",
            ]);
        };
        configure(
            &pair.broker,
            &pair.broker_if,
            &[BROKER_IP, OTHER_IP],
            CLIENT_IP,
            CLIENT_MAC,
        );
        configure(
            &pair.client,
            &pair.client_if,
            &[CLIENT_IP],
            BROKER_IP,
            BROKER_MAC,
        );
        pair
    }

    /// `ip -d link show` of the broker end.
    pub fn broker_link(&self) -> String {
        ip(&["-n", &self.broker, "-d", "link", "show", &self.broker_if])
    }

    /// Connects from the client namespace to `addr`, returning how it ended.
    pub fn connect(&self, addr: SocketAddrV4, timeout: Duration) -> io::ErrorKind {
        in_netns(&self.client, || {
            match TcpStream::connect_timeout(&addr.into(), timeout) {
                Ok(_) => io::ErrorKind::Other,
                Err(error) => error.kind(),
            }
        })
    }

    /// Connects from the client namespace to `addr` within `timeout`.
    pub fn connect_stream(&self, addr: SocketAddrV4, timeout: Duration) -> io::Result<TcpStream> {
        in_netns(&self.client, || {
            TcpStream::connect_timeout(&addr.into(), timeout)
        })
    }

    /// Sends `frame` (starting with the Ethernet header) out of the client end.
    pub fn send_frame(&self, frame: &[u8]) {
        in_netns(&self.client, || send_raw(&self.client_if, frame));
    }

    /// A raw socket that sees every frame of the client end (each `recv` waits at most a
    /// second).
    pub fn client_capture(&self) -> OwnedFd {
        in_netns(&self.client, || {
            let all = (libc::ETH_P_ALL as u16).to_be();
            let fd = socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(all));
            let addr = libc::sockaddr_ll {
                sll_family: libc::AF_PACKET as u16,
                sll_protocol: all,
                sll_ifindex: ifindex(&self.client_if) as i32,
                sll_hatype: 0,
                sll_pkttype: 0,
                sll_halen: 0,
                sll_addr: [0; 8],
            };
            bind(fd.as_raw_fd(), &addr, "a packet socket");
            let timeout = libc::timeval {
                tv_sec: 1,
                tv_usec: 0,
            };
            set_option(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &timeout,
            );
            fd
        })
    }
}

/// The next frame `capture` sees that `wanted` accepts; `None` after a second without one.
pub fn capture_frame(capture: &OwnedFd, wanted: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
    let mut frame = vec![0u8; 2048];
    loop {
        // SAFETY: `frame` is valid for writes of its length.
        let received = unsafe {
            libc::recv(
                capture.as_raw_fd(),
                frame.as_mut_ptr().cast(),
                frame.len(),
                0,
            )
        };
        let Ok(len) = usize::try_from(received) else {
            return None;
        };
        if wanted(&frame[..len]) {
            frame.truncate(len);
            return Some(frame);
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        // Deleting the namespaces destroys the veth pair and any XDP program on it.
        for ns in [&self.client, &self.broker] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn socket(domain: i32, kind: i32, protocol: i32) -> OwnedFd {
    // SAFETY: socket has no memory preconditions.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
    assert!(fd >= 0, "socket({domain}): {}", io::Error::last_os_error());
    // SAFETY: `fd` was just returned by socket and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn send_raw(ifname: &str, frame: &[u8]) {
    let fd = socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
    let ifindex = ifindex(ifname);
    let mut addr = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: 0,
        sll_ifindex: ifindex as i32,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr: [0; 8],
    };
    addr.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: `frame` and `addr` are valid for the lengths given and outlive the call.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(
        sent,
        frame.len() as isize,
        "sending a raw frame on {ifname}: {}",
        io::Error::last_os_error()
    );
}

/// Closes `stream` with a RST (SO_LINGER 0), so that nothing of it lingers on the wire.
pub fn reset(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    set_option(
        stream.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_LINGER,
        &linger,
    );
    drop(stream);
}

/// The index of `ifname` in the calling thread's namespace.
pub fn ifindex(ifname: &str) -> u32 {
    let name = std::ffi::CString::new(ifname).expect("interface names have no NUL");
    // SAFETY: `name` is NUL-terminated and outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "no interface {ifname}");
    index
}

/// An Ethernet header from the client to the broker with `ethertype`.
pub fn ethernet(ethertype: u16) -> Vec<u8> {
    let mut frame = Vec::with_capacity(64);
    frame.extend_from_slice(&BROKER_MAC);
    frame.extend_from_slice(&CLIENT_MAC);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame
}

/// A 20-byte IPv4 header (no checksum: the program does not check it) from the client to
/// `dst` with protocol `protocol`, first byte `version_ihl`.
pub fn ipv4_header(version_ihl: u8, protocol: u8, dst: Ipv4Addr) -> Vec<u8> {
    let mut header = vec![version_ihl, 0, 0, 40, 0, 0, 0x40, 0, 64, protocol, 0, 0];
    header.extend_from_slice(&CLIENT_IP.octets());
    header.extend_from_slice(&dst.octets());
    header
}

/// An AF_XDP socket. With a UMEM and rings it can be bound to an interface queue; its fill
/// ring stays empty, so whatever the kernel steers to it is dropped and counted in
/// `XDP_STATISTICS`, which is how the tests see that a packet reached it.
#[derive(Debug)]
pub struct XskSocket {
    fd: OwnedFd,
    /// The UMEM, kept only to be unmapped after `fd` is closed (fields drop in declaration
    /// order).
    _umem: Option<memmap2::MmapMut>,
}

/// Binds `fd` to `address` (a sockaddr of its family), panicking with `what` on failure.
fn bind<T>(fd: RawFd, address: &T, what: &str) {
    // SAFETY: `address` points to a live sockaddr of the size given.
    let ret = unsafe { libc::bind(fd, (address as *const T).cast(), size_of::<T>() as u32) };
    assert_eq!(ret, 0, "binding {what}: {}", io::Error::last_os_error());
}

/// setsockopt(`fd`, `level`, `option`, `value`), panicking on failure.
fn set_option<T>(fd: RawFd, level: i32, option: i32, value: &T) {
    // SAFETY: `value` points to a live T of the size given.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            level,
            option,
            (value as *const T).cast(),
            size_of::<T>() as u32,
        )
    };
    assert_eq!(
        ret,
        0,
        "setsockopt({level}, {option}): {}",
        io::Error::last_os_error()
    );
}

impl XskSocket {
    /// A bare AF_XDP socket (no UMEM, not bound): enough for the socket map.
    pub fn unbound() -> XskSocket {
        XskSocket {
            fd: socket(libc::AF_XDP, libc::SOCK_RAW, 0),
            _umem: None,
        }
    }

    /// An AF_XDP socket in copy mode bound to queue `queue` of `ifname` (in the calling
    /// thread's namespace), with a 16-frame UMEM and empty rings.
    pub fn bound(ifname: &str, queue: u32) -> XskSocket {
        const FRAME: usize = 4096;
        const FRAMES: usize = 16;
        let len = FRAME * FRAMES;
        let umem = memmap2::MmapMut::map_anon(len).expect("mapping the UMEM");
        let addr = umem.as_ptr() as u64;
        let socket = XskSocket {
            fd: socket(libc::AF_XDP, libc::SOCK_RAW, 0),
            _umem: Some(umem),
        };
        let fd = socket.fd.as_raw_fd();
        let reg = libc::xdp_umem_reg {
            addr,
            len: len as u64,
            chunk_size: FRAME as u32,
            headroom: 0,
            flags: 0,
            tx_metadata_len: 0,
        };
        set_option(fd, libc::SOL_XDP, libc::XDP_UMEM_REG, &reg);
        for ring in [
            libc::XDP_UMEM_FILL_RING,
            libc::XDP_UMEM_COMPLETION_RING,
            libc::XDP_RX_RING,
        ] {
            set_option(fd, libc::SOL_XDP, ring, &(FRAMES as u32));
        }
        let addr = libc::sockaddr_xdp {
            sxdp_family: libc::AF_XDP as u16,
            sxdp_flags: libc::XDP_COPY,
            sxdp_ifindex: ifindex(ifname),
            sxdp_queue_id: queue,
            sxdp_shared_umem_fd: 0,
        };
        bind(
            fd,
            &addr,
            &format!("an AF_XDP socket to {ifname} queue {queue}"),
        );
        socket
    }

    /// The socket's file descriptor.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Packets the kernel steered to this socket but had to drop (no fill-ring frame).
    pub fn dropped(&self) -> u64 {
        let mut stats = libc::xdp_statistics {
            rx_dropped: 0,
            rx_invalid_descs: 0,
            tx_invalid_descs: 0,
            rx_ring_full: 0,
            rx_fill_ring_empty_descs: 0,
            tx_ring_empty_descs: 0,
        };
        let mut len = size_of::<libc::xdp_statistics>() as u32;
        // SAFETY: `stats` and `len` are live and describe a buffer of `len` bytes.
        let ret = unsafe {
            libc::getsockopt(
                self.fd(),
                libc::SOL_XDP,
                libc::XDP_STATISTICS,
                (&raw mut stats).cast(),
                &mut len,
            )
        };
        assert_eq!(ret, 0, "XDP_STATISTICS: {}", io::Error::last_os_error());
        stats.rx_dropped
    }
}

/// A logger that keeps every record, so tests can check what was logged.
pub struct Recorder {
    records: Mutex<Vec<(log::Level, String)>>,
}

static RECORDER: Recorder = Recorder {
    records: Mutex::new(Vec::new()),
};

impl log::Log for Recorder {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        records.push((record.level(), record.args().to_string()));
    }

    fn flush(&self) {}
}

/// Installs the recording logger (once per test binary).
pub fn record_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        log::set_logger(&RECORDER).expect("no other logger in the test binary");
        log::set_max_level(log::LevelFilter::Debug);
    });
}

/// The records logged at `level` that contain `needle`.
pub fn logged(level: log::Level, needle: &str) -> Vec<String> {
    let records = RECORDER.records.lock().unwrap_or_else(|e| e.into_inner());
    records
        .iter()
        .filter(|(l, text)| *l == level && text.contains(needle))
        .map(|(_, text)| text.clone())
        .collect()
}

/// `addr:port` as a socket address.
pub fn at(addr: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr, port)
}
