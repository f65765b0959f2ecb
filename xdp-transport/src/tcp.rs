//! The smoltcp TCP sockets of the XDP path, set up as the XDP program's SYN cookies need
//! them: TCP timestamps on for every connection (the program's SYN-ACK offers them), and the
//! half-open socket of an adoption that was given up aborted.

use smoltcp::socket::tcp;
use smoltcp::time::Duration;
use smoltcp::wire::IpAddress;

use crate::cookie::Remote;

/// Idle time after which a connection is probed.
const SOCKET_KEEP_ALIVE: Duration = Duration::from_secs(10);
/// Time without any answer from the peer after which its connection is aborted.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest a pure ACK waits: a second full segment sends it at once (every other segment, as
/// Linux acknowledges), and a reply to the client carries it sooner. Acknowledging every
/// segment doubled the frames the broker sent (31 against 16 per MB received at 300 MB/s),
/// each one paid for on the broker's core and on the client's.
pub(crate) const ACK_DELAY: Duration = Duration::from_millis(1);

/// A socket with receive and send buffers of `buffer_bytes` each.
pub fn new_socket(buffer_bytes: usize) -> tcp::Socket<'static> {
    let mut socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; buffer_bytes]),
        tcp::SocketBuffer::new(vec![0; buffer_bytes]),
    );
    socket.set_nagle_enabled(false);
    socket.set_ack_delay(Some(ACK_DELAY));
    socket.set_congestion_control(tcp::CongestionControl::Reno);
    // A peer that vanishes (even mid-close) must not hold a socket of a fixed pool for
    // ever: keep-alive probes an idle connection, the timeout aborts a silent one.
    socket.set_keep_alive(Some(SOCKET_KEEP_ALIVE));
    socket.set_timeout(Some(SOCKET_TIMEOUT));
    socket
}

/// smoltcp's TCP timestamp clock: milliseconds of the monotonic clock. Timestamps must be
/// on: the XDP program's SYN-ACK offers them, and once they are agreed on, every segment must
/// carry one (RFC 7323). It is read for every segment sent, so it reads the coarse clock
/// (the last tick, a few milliseconds fine: RFC 7323 allows 1 ms to 1 s per tick), which
/// costs a fifth of the precise one here.
fn tsval_ms() -> u32 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec; CLOCK_MONOTONIC_COARSE exists on every
    // Linux since 2.6.32 and the call only writes `now`.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    debug_assert_eq!(status, 0, "CLOCK_MONOTONIC_COARSE");
    (now.tv_sec as u64)
        .wrapping_mul(1000)
        .wrapping_add(now.tv_nsec as u64 / 1_000_000) as u32
}

/// Aborts `socket` if it holds the half-open connection (smoltcp's SYN-RECEIVED) of an
/// adoption given up with `remote`. Returns whether it did.
pub fn abort_half_open(socket: &mut tcp::Socket<'_>, remote: Remote) -> bool {
    let Some(endpoint) = socket.remote_endpoint() else {
        return false;
    };
    let IpAddress::Ipv4(ip) = endpoint.addr;
    if socket.state() != tcp::State::SynReceived || (ip, endpoint.port) != remote {
        return false;
    }
    socket.abort();
    true
}

/// Makes `socket` listen on `port` with TCP timestamps on.
pub fn listen(socket: &mut tcp::Socket<'_>, port: u16) {
    // smoltcp drops the generator when a peer offers no timestamps: set it for every
    // connection.
    socket.set_tsval_generator(Some(tsval_ms));
    if let Err(e) = socket.listen(port) {
        log::error!("cannot listen on port {port} with a smoltcp socket: {e}");
    }
}
