//! The kernel TCP backend: one thread, epoll (mio, edge-triggered) over the listening socket
//! and every connection, driving the [`Connection`] state machines and the ACK path.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

use crate::metrics::Metrics;
use crate::server::connection::{Connection, InputState, refusal_frame};
use crate::server::ownership::{ClaimGuard, LoopClaimCheck};
use crate::server::state::{BrokerState, RoutedOutcome};
use crate::server::{BrokerOptions, Idle};
use shared_log::coherence::PoolMemory;
use shared_log::pool::Pool;

const LISTENER: Token = Token(0);
/// Longest block in epoll when nothing at all is pending (bounds the reaction to `stop`).
const IDLE_WAIT: Duration = Duration::from_millis(50);
/// How long a stopping broker waits for batches in flight to be decided.
const DRAIN: Duration = Duration::from_secs(2);
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

struct Client {
    stream: TcpStream,
    /// The peer's address (its connections count against the per-address limit).
    address: IpAddr,
    connection: Connection<PoolMemory>,
    readable: bool,
    writable: bool,
}

/// The network loop of one broker.
pub struct KernelLoop {
    state: BrokerState<PoolMemory>,
    listener: TcpListener,
    socket_buffer_bytes: usize,
    idle: Idle,
    stop: Arc<AtomicBool>,
    crash: Arc<AtomicBool>,
    /// The claim on the broker id, checked before an iteration's writes to the pool.
    claim: LoopClaimCheck,
    clients: HashMap<Token, Client>,
    next_token: usize,
    logged_buffers: bool,
}

impl std::fmt::Debug for KernelLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelLoop")
            .field("broker", &self.state.settings().broker_id)
            .field("clients", &self.clients.len())
            .finish()
    }
}

impl KernelLoop {
    /// A loop over `listener` for the broker described by `options`, holding `claim`. The
    /// claim's stop flag ends it in order (see [`KernelLoop::run`]); its crash flag ends it
    /// at once, as a crash would (see
    /// [`RunningBroker::kill`](crate::server::RunningBroker::kill)).
    pub fn new(
        pool: Pool<PoolMemory>,
        listener: TcpListener,
        options: &BrokerOptions,
        metrics: Arc<Metrics>,
        claim: ClaimGuard,
    ) -> KernelLoop {
        KernelLoop {
            state: BrokerState::new(pool, options.settings.clone(), metrics)
                .with_claim_token(claim.token()),
            listener,
            socket_buffer_bytes: options.socket_buffer_bytes,
            idle: Idle::new(options.idle),
            stop: Arc::clone(claim.stop_flag()),
            crash: Arc::clone(claim.crash_flag()),
            claim: LoopClaimCheck::new(claim),
            clients: HashMap::new(),
            next_token: 1,
            logged_buffers: false,
        }
    }

    /// Runs until the stop flag is set, then drains and closes every connection. When the
    /// crash flag is set it returns at once instead: the listener and every socket are closed
    /// as they are (no drain, no Goodbye, nothing more written to the pool). So it does when
    /// the claim on the broker id is found taken over: once epoll returns (where a pause is
    /// most likely spent; see [`LoopClaimCheck`]), or by a ring writer before it publishes a
    /// slot.
    pub fn run(mut self) {
        let mut poll = match Poll::new() {
            Ok(poll) => poll,
            Err(e) => {
                log::error!(
                    "broker {}: cannot create epoll: {e}",
                    self.state.settings().broker_id
                );
                return;
            }
        };
        if let Err(e) = poll
            .registry()
            .register(&mut self.listener, LISTENER, Interest::READABLE)
        {
            log::error!(
                "broker {}: cannot poll the listener: {e}",
                self.state.settings().broker_id
            );
            return;
        }
        let mut events = Events::with_capacity(1024);
        let mut outcomes = Vec::new();
        let mut stopping_since = None;
        loop {
            if self.crash.load(Ordering::Relaxed) {
                log::warn!(
                    "broker {}: crashed on request ({} connections dropped)",
                    self.state.settings().broker_id,
                    self.clients.len()
                );
                return;
            }
            if self.stop.load(Ordering::Relaxed) {
                let since = *stopping_since.get_or_insert_with(Instant::now);
                if self.state.undecided() == 0 || since.elapsed() > DRAIN {
                    break;
                }
            }
            let pending = self.state.undecided() > 0
                || self.clients.values().any(|c| {
                    c.connection.is_subscriber()
                        || c.connection.waits_for_room()
                        || c.connection.awaits_durability()
                });
            let timeout = if pending {
                self.idle.timeout()
            } else {
                IDLE_WAIT
            };
            if let Err(e) = poll.poll(&mut events, Some(timeout)) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    log::error!(
                        "broker {}: epoll failed: {e}",
                        self.state.settings().broker_id
                    );
                    break;
                }
            }
            // Nothing below writes to the pool before this check.
            let now = Instant::now();
            if !self.claim.holds(now) {
                return;
            }
            let mut worked = !events.is_empty();
            for event in events.iter() {
                if event.token() == LISTENER {
                    self.accept(&poll);
                } else if let Some(client) = self.clients.get_mut(&event.token()) {
                    client.readable |=
                        event.is_readable() || event.is_read_closed() || event.is_error();
                    client.writable |= event.is_writable();
                }
            }
            outcomes.clear();
            worked |= self.state.poll_outcomes(&mut outcomes) > 0;
            for outcome in &outcomes {
                self.route(outcome, now);
            }
            worked |= self.drive_clients(&poll, now);
            if self.state.claim_moved().is_some() {
                self.claim.guard().lost();
                return;
            }
            let subscriptions = self
                .clients
                .values()
                .filter_map(|c| c.connection.subscription());
            self.state.publish_subscriptions(subscriptions);
            self.idle.record(worked);
        }
        let open = self.clients.len();
        for (_, mut client) in self.clients.drain() {
            client.connection.on_closed(&mut self.state);
            let _ = poll.registry().deregister(&mut client.stream);
        }
        self.state.on_loop_stopped("network loop", open);
    }

    fn route(&mut self, outcome: &RoutedOutcome, now: Instant) {
        // A closed connection's batches are in the log all the same; only the ACK is moot.
        if let Some(client) = self.clients.get_mut(&Token(outcome.conn as usize)) {
            client
                .connection
                .on_outcome(outcome, self.state.metrics(), now);
        }
    }

    fn accept(&mut self, poll: &Poll) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, peer)) => {
                    if let Err(refusal) = self.state.admit_connection(peer.ip()) {
                        refuse(stream, &refusal_frame(&refusal));
                        continue;
                    }
                    if let Err(e) = self.configure(&stream) {
                        log::warn!(
                            "broker {}: cannot configure the socket of {peer}: {e}",
                            self.state.settings().broker_id
                        );
                    }
                    let token = Token(self.next_token);
                    self.next_token += 1;
                    if let Err(e) = poll.registry().register(
                        &mut stream,
                        token,
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        log::warn!(
                            "broker {}: cannot poll the connection of {peer}: {e}",
                            self.state.settings().broker_id
                        );
                        self.state.release_connection(peer.ip());
                        continue;
                    }
                    let connection = Connection::new(token.0 as u64, &self.state, Instant::now());
                    self.clients.insert(
                        token,
                        Client {
                            stream,
                            address: peer.ip(),
                            connection,
                            readable: true,
                            writable: true,
                        },
                    );
                    log::debug!(
                        "broker {}: connection {} from {peer}",
                        self.state.settings().broker_id,
                        token.0
                    );
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!(
                        "broker {}: accept failed: {e}",
                        self.state.settings().broker_id
                    );
                    return;
                }
            }
        }
    }

    /// TCP_NODELAY and explicit buffer sizes: accepted sockets do not inherit them (the
    /// prototype ran with a 43 KB window). Verified with getsockopt and logged once. And
    /// dead-peer detection: a client that vanishes (host down, cable cut) must not keep its
    /// place in the connection limits, or a subscriber's, for ever.
    fn configure(&mut self, stream: &TcpStream) -> std::io::Result<()> {
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
                self.state.settings().broker_id,
                self.socket_buffer_bytes
            );
        }
        if receive < self.socket_buffer_bytes {
            log::warn!(
                "broker {}: SO_RCVBUF is {receive} bytes, below the {} asked: raise net.core.rmem_max",
                self.state.settings().broker_id,
                self.socket_buffer_bytes
            );
        }
        Ok(())
    }

    fn drive_clients(&mut self, poll: &Poll, now: Instant) -> bool {
        let mut worked = false;
        let mut finished = Vec::new();
        for (token, client) in &mut self.clients {
            let service = client.connection.service(
                &mut client.stream,
                &mut self.state,
                now,
                client.readable,
                client.writable,
            );
            if service.input == Some(InputState::Drained) {
                client.readable = false;
            }
            if service.wrote {
                // Edge-triggered: writable again only after the next event.
                client.writable = !client.connection.has_output();
            }
            worked |= service.worked();
            if service.ended {
                finished.push(*token);
            }
        }
        for token in finished {
            if let Some(mut client) = self.clients.remove(&token) {
                client.connection.on_closed(&mut self.state);
                let _ = poll.registry().deregister(&mut client.stream);
                let _ = client.stream.shutdown(std::net::Shutdown::Both);
                self.state.release_connection(client.address);
                log::debug!(
                    "broker {}: connection {} closed",
                    self.state.settings().broker_id,
                    token.0
                );
            }
        }
        worked
    }
}
