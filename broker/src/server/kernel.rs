//! The kernel TCP transport of the network loop: epoll (mio, edge-triggered) over the
//! listening sockets (ours, and Kafka's when there is one) and every connection.

use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use units::Timestamp;

use crate::metrics::Metrics;
use crate::server::serve::{Ending, PayloadSink, Protocol, Readiness, Serviced, Transport};
use crate::server::state::{ConnId, ConnMap};

/// The listener's token; connections have their ids as tokens, from 1.
const LISTENER: Token = Token(0);
/// The wake timer's token.
const TIMER: Token = Token(usize::MAX);
/// The Kafka listener's token.
const KAFKA_LISTENER: Token = Token(usize::MAX - 1);
/// Keep-alive: an idle connection is probed after this long ...
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// ... then every this long ...
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// ... and dropped after this many unanswered probes (the bypass backend's 30 s, too).
const KEEPALIVE_PROBES: u32 = 4;
/// Sent data left unacknowledged this long fails the connection (TCP_USER_TIMEOUT). A peer
/// that only stops reading still acknowledges, and is handled by the stall and close
/// deadlines instead.
const UNACKNOWLEDGED_TIMEOUT: Duration = Duration::from_secs(30);

/// Tells a refused peer why (best effort: the socket is new, so its send buffer has room),
/// then closes without a reset: what the peer already sent is read and dropped first, since
/// closing a socket with unread input sends RST, and the peer would see a reset instead of
/// the reason.
fn refuse(mut stream: TcpStream, frame: &[u8]) {
    let _ = stream.write(frame);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut sink = [0u8; 4096];
    while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
}

/// Accepts every connection waiting on `listener`, which speaks `protocol` (edge-triggered:
/// until it would block).
fn accept_all(
    listener: &TcpListener,
    broker: u16,
    protocol: Protocol,
) -> Vec<(TcpStream, std::net::SocketAddr, Protocol)> {
    let mut accepted = Vec::new();
    loop {
        match listener.accept() {
            Ok((stream, peer)) => accepted.push((stream, peer, protocol)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => {
                log::warn!("broker {broker}: accept failed: {e}");
                break;
            }
        }
    }
    accepted
}

/// A timerfd in the epoll set, for waits shorter than a millisecond: epoll's own timeout
/// counts whole milliseconds (mio rounds a 32 us backoff up to 1 ms), a timerfd fires when
/// asked.
#[derive(Debug)]
struct WakeTimer {
    fd: OwnedFd,
}

impl WakeTimer {
    fn new() -> io::Result<WakeTimer> {
        // SAFETY: timerfd_create takes two integers and returns a new descriptor or -1.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(WakeTimer { fd })
    }

    /// Fires once, `after` from now (a previous arming is replaced).
    fn arm(&self, after: Duration) -> io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: libc::c_long::from(after.subsec_nanos().max(1)),
            },
        };
        let fd = self.fd.as_raw_fd();
        // SAFETY: `spec` is a valid itimerspec for the call; the old value is not asked for.
        let result = unsafe { libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut()) };
        if result != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Takes the expirations, so that the next one is a new edge for epoll.
    fn clear(&self) {
        let mut expirations = [0u8; 8];
        // SAFETY: reads at most 8 bytes into the 8-byte buffer; the descriptor is
        // non-blocking, and an error (nothing expired) leaves nothing to do.
        let _ = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                expirations.as_mut_ptr().cast(),
                expirations.len(),
            )
        };
    }
}

/// A connection's socket and what epoll last said of it.
#[derive(Debug)]
struct Socket {
    stream: TcpStream,
    ready: Readiness,
}

/// Kernel TCP sockets under epoll.
#[derive(Debug)]
pub struct KernelTransport {
    poll: Poll,
    events: Events,
    listener: TcpListener,
    timer: WakeTimer,
    /// A connection may be waiting to be accepted (edge-triggered: until `accept` would
    /// block).
    listener_ready: bool,
    /// The Kafka listener, when there is one, and whether it may have a connection waiting.
    kafka_listener: Option<(TcpListener, bool)>,
    socket_buffer_bytes: usize,
    sockets: ConnMap<Socket>,
    /// For logs.
    broker: u16,
    logged_buffers: bool,
}

impl KernelTransport {
    /// Epoll over `listener` (and `kafka_listener`, Kafka's protocol), for broker `broker`;
    /// accepted sockets get `socket_buffer_bytes` of SO_RCVBUF and SO_SNDBUF.
    pub fn new(
        mut listener: TcpListener,
        kafka_listener: Option<TcpListener>,
        socket_buffer_bytes: usize,
        broker: u16,
    ) -> io::Result<KernelTransport> {
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let kafka_listener = match kafka_listener {
            Some(mut kafka) => {
                poll.registry()
                    .register(&mut kafka, KAFKA_LISTENER, Interest::READABLE)?;
                Some((kafka, true))
            }
            None => None,
        };
        let timer = WakeTimer::new()?;
        poll.registry().register(
            &mut SourceFd(&timer.fd.as_raw_fd()),
            TIMER,
            Interest::READABLE,
        )?;
        Ok(KernelTransport {
            poll,
            events: Events::with_capacity(1024),
            listener,
            timer,
            listener_ready: true,
            kafka_listener,
            socket_buffer_bytes,
            sockets: ConnMap::default(),
            broker,
            logged_buffers: false,
        })
    }

    /// TCP_NODELAY and explicit buffer sizes: accepted sockets do not inherit them (the
    /// prototype ran with a 43 KB window). Verified with getsockopt and logged once. And
    /// dead-peer detection: a client that vanishes (host down, cable cut) must not keep its
    /// place in the connection limits, or a subscriber's, for ever.
    fn configure(&mut self, stream: &TcpStream) -> io::Result<()> {
        stream.set_nodelay(true)?;
        let socket = socket2::SockRef::from(stream);
        socket.set_tcp_keepalive(
            &socket2::TcpKeepalive::new()
                .with_time(KEEPALIVE_IDLE)
                .with_interval(KEEPALIVE_INTERVAL)
                .with_retries(KEEPALIVE_PROBES),
        )?;
        socket.set_tcp_user_timeout(Some(UNACKNOWLEDGED_TIMEOUT))?;
        socket.set_recv_buffer_size(self.socket_buffer_bytes)?;
        socket.set_send_buffer_size(self.socket_buffer_bytes)?;
        let (receive, send) = (socket.recv_buffer_size()?, socket.send_buffer_size()?);
        if !self.logged_buffers {
            self.logged_buffers = true;
            log::info!(
                "broker {}: accepted sockets get SO_RCVBUF {receive} and SO_SNDBUF {send} bytes (asked {}; the kernel doubles it, and caps it at net.core.rmem_max/wmem_max)",
                self.broker,
                self.socket_buffer_bytes
            );
        }
        if receive < self.socket_buffer_bytes {
            log::warn!(
                "broker {}: SO_RCVBUF is {receive} bytes, below the {} asked: raise net.core.rmem_max",
                self.broker,
                self.socket_buffer_bytes
            );
        }
        Ok(())
    }

    /// Configures and registers an admitted socket as connection `id`. A socket epoll
    /// cannot watch is shut down: its first service then finds it ended.
    fn adopt(&mut self, id: ConnId, mut stream: TcpStream, peer: std::net::SocketAddr) {
        if let Err(e) = self.configure(&stream) {
            log::warn!(
                "broker {}: cannot configure the socket of {peer}: {e}",
                self.broker
            );
        }
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(id as usize),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!(
                "broker {}: cannot poll the connection of {peer}: {e}",
                self.broker
            );
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        let ready = Readiness {
            readable: true,
            writable: true,
        };
        self.sockets.insert(id, Socket { stream, ready });
    }
}

impl Transport for KernelTransport {
    type Stream<'a> = &'a mut TcpStream;

    const NAME: &'static str = "network loop";
    const ITERATIONS_PER_CLOCK_READ: u32 = 1;
    const WAKES_ON_INPUT: bool = true;

    fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        if timeout.subsec_nanos() % 1_000_000 != 0 {
            self.timer.arm(timeout)?;
        }
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Err(e) if e.kind() != io::ErrorKind::Interrupted => return Err(e),
            _ => {}
        }
        for event in self.events.iter() {
            if event.token() == TIMER {
                self.timer.clear();
            } else if event.token() == LISTENER {
                self.listener_ready = true;
            } else if event.token() == KAFKA_LISTENER {
                if let Some((_, ready)) = &mut self.kafka_listener {
                    *ready = true;
                }
            } else if let Some(socket) = self.sockets.get_mut(&(event.token().0 as ConnId)) {
                socket.ready.readable |=
                    event.is_readable() || event.is_read_closed() || event.is_error();
                socket.ready.writable |= event.is_writable();
            }
        }
        Ok(())
    }

    /// Kernel sockets copy into the connections' buffers themselves: no targets.
    fn receive(&mut self, _now: Timestamp, _sink: &mut dyn PayloadSink) -> bool {
        self.events.iter().any(|event| event.token() != TIMER)
    }

    fn accept(
        &mut self,
        admit: &mut dyn FnMut(IpAddr, Protocol) -> Result<ConnId, Vec<u8>>,
    ) -> bool {
        let mut accepted = Vec::new();
        let mut worked = std::mem::take(&mut self.listener_ready);
        if worked {
            accepted.extend(accept_all(&self.listener, self.broker, Protocol::Native));
        }
        if let Some((listener, ready)) = &mut self.kafka_listener
            && std::mem::take(ready)
        {
            accepted.extend(accept_all(listener, self.broker, Protocol::Kafka));
            worked = true;
        }
        for (stream, peer, protocol) in accepted {
            match admit(peer.ip(), protocol) {
                Ok(id) => self.adopt(id, stream, peer),
                Err(refusal) => refuse(stream, &refusal),
            }
        }
        worked
    }

    fn stream(&mut self, id: ConnId) -> Option<(&mut TcpStream, Readiness)> {
        let socket = self.sockets.get_mut(&id)?;
        Some((&mut socket.stream, socket.ready))
    }

    fn serviced(&mut self, id: ConnId, serviced: Serviced) -> bool {
        if let Some(socket) = self.sockets.get_mut(&id) {
            if serviced.input_drained {
                socket.ready.readable = false;
            }
            if let Some(output_left) = serviced.output_left {
                // Edge-triggered: writable again only after the next event.
                socket.ready.writable = !output_left;
            }
        }
        true
    }

    fn close(&mut self, id: ConnId) {
        if let Some(mut socket) = self.sockets.remove(&id) {
            let _ = self.poll.registry().deregister(&mut socket.stream);
            let _ = socket.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    fn reset(&mut self, id: ConnId) {
        if let Some(mut socket) = self.sockets.remove(&id) {
            let _ = self.poll.registry().deregister(&mut socket.stream);
            // Lingering for zero seconds makes the close below send RST and drop the unsent
            // bytes, instead of sending them and a FIN.
            if let Err(e) = socket2::SockRef::from(&socket.stream).set_linger(Some(Duration::ZERO))
            {
                log::warn!(
                    "broker {}: cannot reset connection {id} ({e}): it is closed instead",
                    self.broker
                );
                let _ = socket.stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    fn flush(&mut self, _now: Timestamp) -> bool {
        false
    }

    fn housekeeping(&mut self, _now: Timestamp, _metrics: &Metrics) {}

    fn close_all(&mut self, ending: Ending, _now: Timestamp) {
        // Abrupt: the sockets close as they are when the transport is dropped, as a
        // crashed process's would.
        if ending == Ending::Stopped {
            for (_, mut socket) in self.sockets.drain() {
                let _ = self.poll.registry().deregister(&mut socket.stream);
            }
        }
    }
}
