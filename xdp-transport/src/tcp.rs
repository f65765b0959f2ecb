//! The smoltcp TCP sockets of the XDP path, set up as the XDP program's SYN cookies need
//! them: TCP timestamps on for every connection (the program's SYN-ACK offers them), and the
//! half-open socket of an adoption that was given up aborted.

use std::time::Instant as StdInstant;

use smoltcp::socket::tcp;
use smoltcp::time::Duration;
use smoltcp::wire::IpAddress;

use crate::cookie::Remote;

/// Idle time after which a connection is probed.
const SOCKET_KEEP_ALIVE: Duration = Duration::from_secs(10);
/// Time without any answer from the peer after which its connection is aborted.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);

/// A socket with receive and send buffers of `buffer_bytes` each.
pub fn new_socket(buffer_bytes: usize) -> tcp::Socket<'static> {
    let mut socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; buffer_bytes]),
        tcp::SocketBuffer::new(vec![0; buffer_bytes]),
    );
    socket.set_nagle_enabled(false);
    socket.set_ack_delay(None);
    socket.set_congestion_control(tcp::CongestionControl::Reno);
    // A peer that vanishes (even mid-close) must not hold a socket of a fixed pool for
    // ever: keep-alive probes an idle connection, the timeout aborts a silent one.
    socket.set_keep_alive(Some(SOCKET_KEEP_ALIVE));
    socket.set_timeout(Some(SOCKET_TIMEOUT));
    socket
}

/// smoltcp's TCP timestamp clock: milliseconds since the first call. Timestamps must be on:
/// the XDP program's SYN-ACK offers them, and once they are agreed on, every segment must
/// carry one (RFC 7323).
fn tsval_ms() -> u32 {
    static START: std::sync::OnceLock<StdInstant> = std::sync::OnceLock::new();
    START.get_or_init(StdInstant::now).elapsed().as_millis() as u32
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
