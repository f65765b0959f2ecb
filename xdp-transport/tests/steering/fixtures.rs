//! Fixtures of the steering tests besides the veth pair (xdp-prog's `tests/veth`): raw
//! frames, a capture at the client end, AF_XDP sockets of the transport itself
//! ([`xdp_transport::xsk::Xsk`]), and a logger that keeps what it saw.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, Once};
use std::time::Duration;

use socket2::SockRef;
use xdp_transport::xsk::{Umem, Xsk, XskGeometry};

use crate::common::{in_netns, ip};
use crate::veth::{BROKER_MAC, CLIENT_IP, CLIENT_MAC, Pair};

impl Pair {
    /// `ip -d link show` of the broker end.
    pub fn broker_link(&self) -> String {
        ip(&["-n", &self.broker, "-d", "link", "show", &self.broker_if])
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
                sll_ifindex: xdp_prog::ifindex(&self.client_if).expect("the client end") as i32,
                sll_hatype: 0,
                sll_pkttype: 0,
                sll_halen: 0,
                sll_addr: [0; 8],
            };
            bind(fd.as_raw_fd(), &addr, "a packet socket");
            SockRef::from(&fd)
                .set_read_timeout(Some(Duration::from_secs(1)))
                .expect("SO_RCVTIMEO on a packet socket");
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

fn socket(domain: i32, kind: i32, protocol: i32) -> OwnedFd {
    // SAFETY: socket has no memory preconditions.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
    assert!(fd >= 0, "socket({domain}): {}", io::Error::last_os_error());
    // SAFETY: `fd` was just returned by socket and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn send_raw(ifname: &str, frame: &[u8]) {
    let fd = socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
    let ifindex = xdp_prog::ifindex(ifname).expect("the interface to send on");
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
    SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER on a TCP socket");
    drop(stream);
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

/// Binds `fd` to `address` (a sockaddr of its family), panicking with `what` on failure.
fn bind<T>(fd: RawFd, address: &T, what: &str) {
    // SAFETY: `address` points to a live sockaddr of the size given.
    let ret = unsafe { libc::bind(fd, (address as *const T).cast(), size_of::<T>() as u32) };
    assert_eq!(ret, 0, "binding {what}: {}", io::Error::last_os_error());
}

/// An AF_XDP socket of the transport ([`Xsk::new`]: UMEM, rings, copy mode) bound to a
/// queue. Its fill ring stays empty, so whatever the kernel steers to it is dropped and
/// counted in `XDP_STATISTICS`, which is how the tests see that a packet reached it.
#[derive(Debug)]
pub struct SteeredSocket {
    // Declared before the UMEM so the socket closes before its UMEM is freed.
    xsk: Xsk,
    _umem: Umem,
}

impl SteeredSocket {
    /// A socket bound to queue `queue` of `ifname` (in the calling thread's namespace), with
    /// 32 UMEM frames (on 4 KiB pages when hugepages are short) and rings of 16.
    pub fn bound(ifname: &str, queue: u32) -> SteeredSocket {
        let geometry = XskGeometry {
            frames: 32,
            ring_size: 16,
        };
        let (xsk, umem, _frames) = Xsk::new(ifname, queue, geometry, true)
            .unwrap_or_else(|error| panic!("an AF_XDP socket: {error}"));
        SteeredSocket { xsk, _umem: umem }
    }

    /// The socket's file descriptor.
    pub fn fd(&self) -> RawFd {
        self.xsk.fd()
    }

    /// Packets the kernel steered to this socket but had to drop (no fill-ring frame).
    pub fn dropped(&self) -> u64 {
        self.xsk.stats().rx_dropped
    }
}

/// A bare AF_XDP socket (no UMEM, not bound): enough for the socket map, and one per queue
/// is not a limit (a bound socket takes its queue).
pub fn unbound_xdp_socket() -> OwnedFd {
    socket(libc::AF_XDP, libc::SOCK_RAW, 0)
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
