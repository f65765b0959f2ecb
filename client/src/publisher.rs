//! [`Publisher`]: the socket adapter around [`PublisherCore`].
//!
//! A batch of up to 16 KiB, or one that is the only one outstanding, is written by the
//! caller's thread when nothing is queued before it and the socket takes it whole without
//! blocking: no hand-off between threads on the way out. Otherwise (a large batch among
//! others, whose writes the I/O thread overlaps with the caller's work, or a full socket
//! buffer) it goes to the publisher's one I/O thread ([`crate::publisher_io`]), which writes
//! each connection's batches in order without blocking on any socket and decodes what the
//! brokers send (Acks, Errors and Goodbye, timestamped on arrival). Inside
//! [`Publisher::burst`] the batches wait until the burst ends (or something would wait) and
//! go out together, one vectored write per connection. A connection the core
//! asks for is opened by a short-lived connector thread (one round over the candidate
//! brokers). Both report to the publisher over one channel; the publisher's own thread owns
//! the protocol state and is the only one that changes it.

use std::collections::BTreeMap;
use std::io::IoSlice;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use hdrhistogram::Histogram;
use units::Timestamp;
use wire::{AckLevel, Frame, HelloOkRepr, HelloRepr, Role};

use crate::config::PublisherConfig;
use crate::error::ClientError;
use crate::net::{FrameReader, connect_and_hello, detect_dead_peer, write_frame};
use crate::publisher_core::{
    Command, ConnId, ConnectRequest, CoreParams, PublisherCore, PublisherEvent, Transmit,
};
use crate::publisher_io::{ConnectionEvent, IoThread, WriteCommand};
use crate::stats::PublisherStats;

/// A connection that completed its handshake.
struct Opened {
    addr: SocketAddr,
    stream: TcpStream,
    reader: FrameReader,
    hello_ok: HelloOkRepr,
}

enum IoEvent {
    Frame {
        conn: ConnId,
        frame: Frame,
        at: Timestamp,
    },
    Written {
        conn: ConnId,
        seq: u64,
    },
    Ended {
        conn: ConnId,
        error: Option<ClientError>,
    },
    Connected {
        slot: usize,
        attempt: u64,
        result: Result<Box<Opened>, ClientError>,
    },
}

impl From<ConnectionEvent> for IoEvent {
    fn from(event: ConnectionEvent) -> Self {
        match event {
            ConnectionEvent::Frame { conn, frame, at } => IoEvent::Frame { conn, frame, at },
            ConnectionEvent::Written { conn, seq } => IoEvent::Written { conn, seq },
            ConnectionEvent::Ended { conn, error } => IoEvent::Ended { conn, error },
        }
    }
}

#[derive(Debug)]
struct ConnectionIo {
    /// The caller's handle on the socket (the I/O thread holds another): for writes that
    /// go out from the caller's thread, and to shut the connection down.
    stream: TcpStream,
    hello_ok: HelloOkRepr,
    /// False once Goodbye is queued: nothing more is written.
    writable: bool,
    /// Batches handed to the I/O thread whose `Written` the publisher has not handled yet.
    /// While there are any, a new batch queues behind them: batches reach the socket, and
    /// the core hears of them, in order.
    queued_batches: usize,
}

/// How the publisher opens connections.
#[derive(Debug, Clone, Copy)]
struct Dialer {
    hello: HelloRepr,
    connect_timeout: Duration,
    socket_buffer_bytes: usize,
    dead_peer_timeout: Duration,
}

impl Dialer {
    /// Connects, says Hello with `session_epoch`, and arms dead-peer detection.
    fn open(&self, addr: SocketAddr, session_epoch: u32) -> Result<Opened, ClientError> {
        let hello = HelloRepr {
            session_epoch,
            ..self.hello
        };
        let (stream, reader, hello_ok) =
            connect_and_hello(addr, &hello, self.connect_timeout, self.socket_buffer_bytes)?;
        if let Err(error) = detect_dead_peer(&stream, addr, self.dead_peer_timeout) {
            say_goodbye_and_close(addr, &stream);
            return Err(error);
        }
        Ok(Opened {
            addr,
            stream,
            reader,
            hello_ok,
        })
    }

    /// Opens `per_broker` connections to every broker in slot-major order, so connection
    /// `i` belongs to broker `i % brokers` and round-robin over connections alternates
    /// brokers. If one fails, the ones already open are closed with Goodbye.
    fn open_all(
        &self,
        brokers: &[SocketAddr],
        per_broker: usize,
    ) -> Result<Vec<Opened>, ClientError> {
        let mut opened = Vec::with_capacity(brokers.len() * per_broker);
        for _slot in 0..per_broker {
            for &addr in brokers {
                match self.open(addr, self.hello.session_epoch) {
                    Ok(connection) => opened.push(connection),
                    Err(error) => {
                        for connection in &opened {
                            say_goodbye_and_close(connection.addr, &connection.stream);
                        }
                        return Err(error);
                    }
                }
            }
        }
        Ok(opened)
    }
}

/// The core's settings: the configuration's, with the batch limit capped by every
/// broker's HelloOk and numbering from the largest HelloOk `next_batch_seq`.
fn core_params(config: &PublisherConfig, ack: AckLevel, opened: &[Opened]) -> CoreParams {
    let batch_bytes_max = opened
        .iter()
        .map(|o| o.hello_ok.batch_bytes_max as usize)
        .fold(config.batch_bytes_max, usize::min);
    let first_seq = opened
        .iter()
        .map(|o| o.hello_ok.next_batch_seq)
        .max()
        .unwrap_or(0);
    CoreParams {
        brokers: config.brokers.clone(),
        connections_per_broker: config.connections_per_broker,
        batch_bytes_max,
        linger: config.linger(),
        in_flight_batches_max: config.in_flight_batches_max,
        in_flight_window: config.in_flight_window,
        ack,
        session_epoch: config.session_epoch,
        first_seq,
        session_batches_max: config.session_batches_max,
        reconnect_timeout: config.reconnect_timeout(),
        resends_max: config.resends_max,
        report_acks: config.report_acks,
    }
}

/// A publisher session over `connections_per_broker` connections to each broker.
///
/// Messages are appended to an open batch; sealed batches are numbered 0, 1, 2, ... and
/// sent round-robin over all connection slots (slot `i` belongs to broker `i % brokers`), so
/// consecutive batches land on different brokers. See the [crate docs](crate) for an
/// example and for what happens when a connection fails. Dropping a publisher without
/// [`close`](Publisher::close) still says Goodbye and closes every socket (without waiting
/// for outstanding acks).
#[derive(Debug)]
pub struct Publisher {
    core: PublisherCore,
    connections: BTreeMap<ConnId, ConnectionIo>,
    io: IoThread,
    events: Receiver<IoEvent>,
    event_sender: Sender<IoEvent>,
    dialer: Dialer,
    /// Tells connector threads still running that the publisher is gone.
    closing: Arc<AtomicBool>,
    blocking: bool,
    publish_timeout: Duration,
    flush_timeout: Duration,
    goodbye_timeout: Duration,
    client_id: u64,
    closed: bool,
    /// Inside [`Publisher::burst`]: the batches sent so far, written together when it ends.
    held: Option<Vec<Transmit>>,
    /// Vectored writes of several held batches, and the batches they took.
    burst_writes: u64,
    burst_write_batches: u64,
}

impl Publisher {
    /// Opens `connections_per_broker` connections to every broker (`TCP_NODELAY`, explicit
    /// socket buffers, keep-alive and `TCP_USER_TIMEOUT`) and performs Hello/HelloOk on each.
    /// If any connection fails, the ones already open are closed with Goodbye and the error
    /// is returned: a publisher starts with every broker reachable.
    ///
    /// The effective batch limit is the smallest of `batch_bytes_max` and every broker's
    /// HelloOk limit. Batch numbering starts at the largest HelloOk `next_batch_seq` (0 for
    /// a new session).
    pub fn connect(config: PublisherConfig) -> Result<Publisher, ClientError> {
        let valid = config.validate()?;
        let dialer = Dialer {
            hello: HelloRepr {
                role: Role::Publish,
                order: valid.order,
                ack: valid.ack,
                client_id: config.client_id,
                session_epoch: config.session_epoch,
                topic: valid.topic,
            },
            connect_timeout: config.connect_timeout(),
            socket_buffer_bytes: config.socket_buffer_bytes,
            dead_peer_timeout: config.reconnect_timeout(),
        };
        let opened = dialer.open_all(&config.brokers, config.connections_per_broker)?;
        let core = PublisherCore::new(core_params(&config, valid.ack, &opened));
        let (event_sender, events) = crossbeam_channel::unbounded();
        let io = match IoThread::start(event_sender.clone()) {
            Ok(io) => io,
            Err(error) => {
                let addr = opened.first().map_or(config.brokers[0], |o| o.addr);
                for connection in &opened {
                    say_goodbye_and_close(connection.addr, &connection.stream);
                }
                return Err(ClientError::io(addr, "starting the I/O thread", error));
            }
        };
        let mut publisher = Publisher {
            core,
            connections: BTreeMap::new(),
            io,
            events,
            event_sender,
            dialer,
            closing: Arc::new(AtomicBool::new(false)),
            blocking: config.blocking,
            publish_timeout: config.publish_timeout(),
            flush_timeout: config.flush_timeout(),
            goodbye_timeout: config.goodbye_timeout(),
            client_id: config.client_id,
            closed: false,
            held: None,
            burst_writes: 0,
            burst_write_batches: 0,
        };
        // On an error, dropping the publisher says Goodbye and joins what was started.
        publisher.install_all(opened)?;
        Ok(publisher)
    }

    /// Number of connection slots: `connections_per_broker` times the number of brokers.
    /// Each slot normally holds one open connection to its broker; after a failure it holds
    /// one to another broker until its own is back.
    pub fn connection_count(&self) -> usize {
        self.core.slot_count()
    }

    /// The effective batch payload limit (after capping by the brokers' HelloOk).
    pub fn batch_bytes_max(&self) -> usize {
        self.core.batch_bytes_max()
    }

    /// The client id sent in Hello.
    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    /// The session epoch of the current session: the configured one, plus one for every
    /// roll-over (see [`PublisherConfig::session_batches_max`]).
    pub fn session_epoch(&self) -> u32 {
        self.core.session_epoch()
    }

    /// The HelloOk of each slot's current connection, in slot order (slots without a
    /// connection at the moment are left out).
    pub fn hello_oks(&self) -> Vec<HelloOkRepr> {
        (0..self.core.slot_count())
            .filter_map(|slot| self.core.slot_connection(slot))
            .filter_map(|id| self.connections.get(&id))
            .map(|c| c.hello_ok)
            .collect()
    }

    /// When the open batch's linger time ends, if it holds messages: a caller that stops
    /// publishing should call [`poll`](Self::poll) by then.
    pub fn linger_deadline(&self) -> Option<Timestamp> {
        self.core.linger_deadline()
    }

    /// Batches of connection slot `connection` not yet acknowledged (in flight, or waiting
    /// for a resend).
    pub fn in_flight(&self, connection: usize) -> usize {
        self.core.in_flight(connection)
    }

    /// Appends a message to the open batch (copying it). Seals the batch when the message
    /// would overflow `batch_bytes_max` or when the linger time has passed.
    ///
    /// When the next connection's window is full: in blocking mode waits for acks (up to
    /// `publish_timeout_ms`); in non-blocking mode returns [`ClientError::WouldBlock`]
    /// without taking the message, so the caller publishes it again later.
    pub fn publish(&mut self, message: &[u8]) -> Result<(), ClientError> {
        self.ensure_open()?;
        self.drain_events();
        let mut deadline = None;
        loop {
            let now = Timestamp::now();
            match self.core.publish(message, now) {
                Ok(()) => {
                    self.dispatch();
                    return Ok(());
                }
                Err(error) if error.is_would_block() && self.blocking => {
                    self.dispatch();
                    let deadline = *deadline.get_or_insert(now + self.publish_timeout);
                    if !self.wait_event(deadline) {
                        return Err(ClientError::timeout(
                            "blocking publish waiting for window space",
                            self.publish_timeout,
                            self.core.outstanding_batches(),
                        ));
                    }
                }
                Err(error) => {
                    self.dispatch();
                    // The caller publishes again once acks make room: by then what a burst
                    // holds must be on its way, or no ack ever comes.
                    if error.is_would_block() && self.write_held() {
                        self.dispatch();
                    }
                    return Err(error);
                }
            }
        }
    }

    /// Runs `f`, which publishes, holding back the writes of the batches sent meanwhile
    /// (those its publishes seal, and any resend) until it returns; then writes them
    /// together, the batches of one connection with one vectored write. When many small
    /// batches fall due at once (a paced sender that woke late, one message per batch), this
    /// costs one system call per connection instead of one per batch. What is held is
    /// written before anything waits (a blocking publish waiting for window space, a flush)
    /// and before a non-blocking publish returns `WouldBlock`; a burst inside a burst joins
    /// the outer one. Returns what `f` returns; what it held is written either way, also
    /// when `f` panics.
    pub fn burst<T>(
        &mut self,
        f: impl FnOnce(&mut Publisher) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let outer = self.held.is_none();
        if outer {
            self.held = Some(Vec::new());
        }
        let burst = Burst {
            publisher: self,
            outer,
        };
        f(&mut *burst.publisher)
    }

    /// Processes what the connections reported, runs due reconnection attempts, and seals
    /// the open batch if its linger time has passed. Call it when not publishing for a
    /// while, so lingering messages go out and lost connections get replaced.
    pub fn poll(&mut self) -> Result<(), ClientError> {
        self.ensure_open()?;
        self.drain_events();
        self.core.poll(Timestamp::now());
        self.dispatch();
        self.failure()
    }

    /// Seals the open batch and waits until every batch is acknowledged or rejected (at ack
    /// 0: written), up to `flush_timeout_ms`, resending over other connections what a failed
    /// connection left unacknowledged.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.ensure_open()?;
        self.flush_within(self.flush_timeout)
    }

    /// Flushes, sends Goodbye on every connection, waits for the brokers' Goodbye (up to
    /// `goodbye_timeout_ms`) and closes the sockets. Returns the flush's result; the
    /// sockets are closed in any case. Closing twice does nothing.
    pub fn close(&mut self) -> Result<(), ClientError> {
        if self.closed {
            return Ok(());
        }
        let flushed = self.flush_within(self.flush_timeout);
        self.shut_down();
        flushed
    }

    /// A snapshot of the counters and ack latency percentiles.
    pub fn stats(&self) -> PublisherStats {
        PublisherStats {
            burst_writes: self.burst_writes,
            burst_write_batches: self.burst_write_batches,
            ..self.core.stats()
        }
    }

    /// The ack latency histogram (microseconds), for merging across publishers.
    pub fn ack_latency_histogram(&self) -> &Histogram<u64> {
        self.core.latency_histogram()
    }

    /// Messages acknowledged so far: a counter read, cheap enough for progress reporting
    /// (unlike [`Self::stats`], which computes latency percentiles).
    pub fn messages_acked(&self) -> u64 {
        self.core.messages_acked()
    }

    /// Drains the events recorded so far (rejected batches, pool-full notices and, with
    /// `report_acks`, every acknowledged batch).
    pub fn take_events(&mut self) -> Vec<PublisherEvent> {
        self.drain_events();
        self.core.take_events()
    }

    fn ensure_open(&self) -> Result<(), ClientError> {
        if self.closed {
            return Err(ClientError::Closed { what: "publisher" });
        }
        self.failure()
    }

    fn failure(&self) -> Result<(), ClientError> {
        match self.core.failure() {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }

    fn flush_within(&mut self, timeout: Duration) -> Result<(), ClientError> {
        let deadline = Timestamp::now() + timeout;
        self.drain_events();
        loop {
            match self.core.seal(Timestamp::now()) {
                Ok(()) => {}
                Err(error) if error.is_would_block() => {}
                Err(error) => return Err(error),
            }
            self.dispatch();
            if self.core.is_flushed() {
                return self.failure();
            }
            if !self.wait_event(deadline) {
                return Err(ClientError::timeout(
                    "flush",
                    timeout,
                    self.core.outstanding_batches(),
                ));
            }
        }
    }

    /// Carries out what the core asked for.
    fn dispatch(&mut self) {
        while let Some(command) = self.core.take_command() {
            match command {
                Command::Transmit(batch) => match &mut self.held {
                    Some(held) => held.push(batch),
                    None => self.transmit(batch),
                },
                Command::Connect(request) => self.start_connect(request),
                Command::Goodbye(conn) => {
                    // A connection's batches go out before its Goodbye.
                    self.write_held();
                    self.send_goodbye(conn);
                }
                Command::Close(conn) => self.release(conn),
            }
        }
    }

    /// Writes the batches a burst holds: each connection's in order, several at once.
    /// Returns whether there were any (writing them may have finished batches, at ack 0, and
    /// given the core commands to carry out).
    fn write_held(&mut self) -> bool {
        let Some(held) = self.held.as_mut() else {
            return false;
        };
        if held.is_empty() {
            return false;
        }
        let mut batches = std::mem::take(held);
        // By connection: the round-robin interleaves them. The sort is stable, so each
        // connection's batches stay in their order (connections are independent streams;
        // the sequencer puts a session's batches back in order across them).
        batches.sort_by_key(|b| b.conn);
        let mut batches = batches.into_iter().peekable();
        let mut run = Vec::new();
        while let Some(first) = batches.next() {
            let conn = first.conn;
            run.push(first);
            while let Some(next) = batches.next_if(|b| b.conn == conn) {
                run.push(next);
            }
            self.transmit_run(&mut run);
        }
        true
    }

    /// Writes a run of batches of one connection: those that may go out from this thread
    /// with one vectored write, the rest (and what the socket did not take) by the I/O
    /// thread, in order.
    fn transmit_run(&mut self, run: &mut Vec<Transmit>) {
        if run.len() == 1 {
            self.transmit(run.remove(0));
            return;
        }
        let Some(connection) = self.connections.get_mut(&run[0].conn) else {
            run.clear();
            return;
        };
        if !connection.writable {
            run.clear();
            return;
        }
        // The direct part: the small batches in front (with two or more outstanding, a large
        // one goes to the I/O thread, as in `transmit`), written while the socket takes them
        // whole, at most VECTORED_BATCHES_MAX a call.
        let direct = if connection.queued_batches == 0 {
            run.iter()
                .take_while(|b| b.bytes.len() <= DIRECT_WRITE_BYTES_MAX)
                .count()
        } else {
            0
        };
        let (mut whole, mut into_next) = (0, 0);
        while whole < direct {
            let chunk = &run[whole..direct.min(whole + VECTORED_BATCHES_MAX)];
            let mut slices: Vec<IoSlice<'_>> =
                chunk.iter().map(|b| IoSlice::new(&b.bytes)).collect();
            let written = write_without_blocking(&connection.stream, &mut slices);
            let (taken, into) = split_written(chunk.iter().map(|b| b.bytes.len()), written);
            if taken > 1 {
                self.burst_writes += 1;
                self.burst_write_batches += taken as u64;
            }
            whole += taken;
            if taken < chunk.len() {
                into_next = into;
                break;
            }
        }
        let mut batches = run.drain(..);
        let now = Timestamp::now();
        for batch in batches.by_ref().take(whole) {
            self.finish_written(batch, now);
        }
        let mut from = into_next;
        for batch in batches {
            self.queue_for_io(batch, from);
            from = 0;
        }
    }

    /// Tells the core that `batch` went out whole.
    fn finish_written(&mut self, batch: Transmit, now: Timestamp) {
        let (conn, seq) = (batch.conn, batch.seq);
        // The bytes go back to the core's pool only once nobody else holds them.
        drop(batch);
        self.core.on_written(conn, seq, now);
    }

    /// Hands `batch`, of which `from` bytes went out already, to the I/O thread, behind what
    /// its connection has queued there.
    fn queue_for_io(&mut self, batch: Transmit, from: usize) {
        if let Some(connection) = self.connections.get_mut(&batch.conn) {
            connection.queued_batches += 1;
        }
        self.io
            .write(batch.conn, WriteCommand::Batch { batch, from });
    }

    /// Writes `batch` from this thread when it is small or the only one outstanding and the
    /// socket takes it whole at once, else hands it (or what is left of it) to the I/O
    /// thread. A connection that is gone has reported (or is about to report) why; the core
    /// then takes the batch back for a resend.
    fn transmit(&mut self, batch: Transmit) {
        // A large batch among others goes to the I/O thread, whose writes (the kernel's copy
        // of the bytes) overlap this thread's work on another core (throughput); a small or
        // lone batch goes out at once, without a hand-off (latency, and less CPU per batch).
        let direct =
            batch.bytes.len() <= DIRECT_WRITE_BYTES_MAX || self.core.outstanding_batches() <= 1;
        let Some(connection) = self.connections.get_mut(&batch.conn) else {
            return;
        };
        if !connection.writable {
            return;
        }
        let mut from = 0;
        if direct && connection.queued_batches == 0 {
            // An error here is left to the I/O thread, which meets it again and reports it.
            from = write_without_blocking(&connection.stream, &mut [IoSlice::new(&batch.bytes)]);
            if from == batch.bytes.len() {
                self.finish_written(batch, Timestamp::now());
                return;
            }
        }
        self.queue_for_io(batch, from);
    }

    /// Queues Goodbye, the last thing `conn` writes.
    fn send_goodbye(&mut self, conn: ConnId) {
        if let Some(connection) = self.connections.get_mut(&conn)
            && connection.writable
        {
            connection.writable = false;
            self.io.write(conn, WriteCommand::Goodbye);
        }
    }

    /// Opens a connection in the background: one round over the request's candidates.
    fn start_connect(&mut self, request: ConnectRequest) {
        let (slot, attempt) = (request.slot, request.attempt);
        let dialer = self.dialer;
        let closing = Arc::clone(&self.closing);
        let events = self.event_sender.clone();
        let spawned = thread::Builder::new()
            .name(format!("pub-connect-{slot}"))
            .spawn(move || connect_round(&request, &dialer, &closing, &events));
        if let Err(error) = spawned {
            let addr = self.core.slot_home(slot);
            let error = ClientError::io(addr, "starting a connection thread", error);
            self.core
                .on_connect_failed(slot, attempt, error, Timestamp::now());
        }
    }

    /// Hands a connection the core accepted as `id` to the I/O thread.
    fn install(&mut self, id: ConnId, opened: Opened) -> Result<(), ClientError> {
        let Opened {
            addr,
            stream,
            reader,
            hello_ok,
        } = opened;
        let io_stream = match stream.try_clone() {
            Ok(io_stream) => io_stream,
            Err(error) => {
                say_goodbye_and_close(addr, &stream);
                return Err(ClientError::io(addr, "cloning the socket handle", error));
            }
        };
        self.io.add(id, addr, io_stream, reader);
        self.connections.insert(
            id,
            ConnectionIo {
                stream,
                hello_ok,
                writable: true,
                queued_batches: 0,
            },
        );
        Ok(())
    }

    /// Installs the connections opened at the start, connection `i` as id `i`; after a
    /// failure the rest are closed with Goodbye and the error is returned.
    fn install_all(&mut self, opened: Vec<Opened>) -> Result<(), ClientError> {
        let mut spawn_error = None;
        for (index, connection) in opened.into_iter().enumerate() {
            match spawn_error {
                None => spawn_error = self.install(index as ConnId, connection).err(),
                Some(_) => say_goodbye_and_close(connection.addr, &connection.stream),
            }
        }
        spawn_error.map_or(Ok(()), Err)
    }

    fn handle(&mut self, event: IoEvent) {
        match event {
            IoEvent::Frame { conn, frame, at } => self.core.on_frame(conn, frame, at),
            IoEvent::Written { conn, seq } => {
                if let Some(connection) = self.connections.get_mut(&conn) {
                    connection.queued_batches = connection.queued_batches.saturating_sub(1);
                }
                self.core.on_written(conn, seq, Timestamp::now());
            }
            IoEvent::Ended { conn, error } => {
                self.core.on_connection_ended(conn, error, Timestamp::now());
                self.release(conn);
            }
            IoEvent::Connected {
                slot,
                attempt,
                result: Ok(opened),
            } => {
                let now = Timestamp::now();
                let accepted =
                    self.core
                        .on_connected(slot, attempt, opened.addr, &opened.hello_ok, now);
                match accepted {
                    Some(id) => {
                        if let Err(error) = self.install(id, *opened) {
                            self.core.on_connection_ended(id, Some(error), now);
                            self.release(id);
                        }
                    }
                    None => say_goodbye_and_close(opened.addr, &opened.stream),
                }
            }
            IoEvent::Connected {
                slot,
                attempt,
                result: Err(error),
            } => {
                self.core
                    .on_connect_failed(slot, attempt, error, Timestamp::now());
            }
        }
    }

    /// Handles every event that is waiting, then carries out what the core asked for.
    fn drain_events(&mut self) {
        while let Ok(event) = self.events.try_recv() {
            self.handle(event);
        }
        self.dispatch();
    }

    /// Waits for at least one event until `deadline`, running the core's timers (connection
    /// attempts, the give-up deadline) meanwhile; false when the deadline passed without an
    /// event and without the publisher failing.
    fn wait_event(&mut self, deadline: Timestamp) -> bool {
        // Nothing waits on acks for batches a burst still holds. Writing them is progress
        // (at ack 0 it finishes them): the caller looks again before waiting.
        if self.write_held() {
            self.dispatch();
            return true;
        }
        loop {
            let wake = self
                .core
                .next_wakeup()
                .map_or(deadline, |at| at.min(deadline));
            let timeout = wake.saturating_duration_since(Timestamp::now());
            if let Ok(event) = self.events.recv_timeout(timeout) {
                self.handle(event);
                self.drain_events();
                return true;
            }
            let now = Timestamp::now();
            self.core.tick(now);
            self.dispatch();
            if self.core.failure().is_some() {
                return true;
            }
            if now >= deadline {
                return false;
            }
        }
    }

    /// Shuts a connection's socket down and has the I/O thread let go of it.
    fn release(&mut self, conn: ConnId) {
        let Some(connection) = self.connections.remove(&conn) else {
            return;
        };
        // Already closed by the peer is fine: the goal is that nothing stays open.
        let _ = connection.stream.shutdown(Shutdown::Both);
        self.io.remove(conn);
    }

    /// Goodbye on every connection, a bounded wait for the brokers' Goodbye, then close the
    /// sockets and join the threads. Connections still being opened close themselves.
    fn shut_down(&mut self) {
        self.closed = true;
        self.closing.store(true, Ordering::Relaxed);
        for conn in self.core.start_shutdown() {
            self.send_goodbye(conn);
        }
        let deadline = Timestamp::now() + self.goodbye_timeout;
        while !self
            .connections
            .keys()
            .all(|&conn| self.core.connection_finished(conn))
        {
            if !self.wait_event(deadline) {
                log::warn!(
                    "not every broker answered Goodbye within {} ms; closing anyway",
                    self.goodbye_timeout.as_millis()
                );
                break;
            }
        }
        let open: Vec<ConnId> = self.connections.keys().copied().collect();
        for conn in open {
            self.release(conn);
        }
        self.io.stop();
        self.drain_events();
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if !self.closed {
            self.shut_down();
        }
    }
}

/// Sends Goodbye and closes a connection that is not (or no longer) part of a publisher.
fn say_goodbye_and_close(addr: SocketAddr, stream: &TcpStream) {
    if let Err(error) = write_frame(stream, &Frame::Goodbye, addr, "sending Goodbye") {
        log::debug!("{error}");
    }
    let _ = stream.shutdown(Shutdown::Both);
}

/// One connection attempt: each candidate once, in order, until one completes the
/// handshake; the result goes to the publisher (or, when it is gone, the connection is
/// closed again).
fn connect_round(
    request: &ConnectRequest,
    dialer: &Dialer,
    closing: &AtomicBool,
    events: &Sender<IoEvent>,
) {
    let mut last_error = None;
    for &addr in &request.candidates {
        if closing.load(Ordering::Relaxed) {
            return;
        }
        match dialer.open(addr, request.session_epoch) {
            Ok(opened) => {
                let event = IoEvent::Connected {
                    slot: request.slot,
                    attempt: request.attempt,
                    result: Ok(Box::new(opened)),
                };
                if closing.load(Ordering::Relaxed) {
                    return close_unwanted(event);
                }
                if let Err(unsent) = events.send(event) {
                    close_unwanted(unsent.into_inner());
                }
                return;
            }
            Err(error) => {
                log::debug!("slot {}: {error}", request.slot);
                last_error = Some(error);
            }
        }
    }
    if let Some(error) = last_error {
        let _ = events.send(IoEvent::Connected {
            slot: request.slot,
            attempt: request.attempt,
            result: Err(error),
        });
    }
}

fn close_unwanted(event: IoEvent) {
    if let IoEvent::Connected {
        result: Ok(opened), ..
    } = event
    {
        say_goodbye_and_close(opened.addr, &opened.stream);
    }
}

/// Batches up to this size (frame included) are written from the caller's thread when nothing
/// is queued before them: at 100,000 one-message batches/s, handing each to the I/O thread
/// cost the load generator more CPU than the write itself, and with it the tail latency.
const DIRECT_WRITE_BYTES_MAX: usize = 16 << 10;

/// A burst in progress ([`Publisher::burst`]): when it ends, also by a panic, the outermost
/// one writes what is held and carries out what that gave the core to do.
struct Burst<'a> {
    publisher: &'a mut Publisher,
    outer: bool,
}

impl Drop for Burst<'_> {
    fn drop(&mut self) {
        if self.outer {
            self.publisher.write_held();
            self.publisher.held = None;
            self.publisher.dispatch();
        }
    }
}

/// Most batches in one vectored write (the kernel takes at most 1,024 buffers, IOV_MAX).
const VECTORED_BATCHES_MAX: usize = 512;

/// How `written` bytes of buffers of lengths `lens`, written in order, fall: the number of
/// buffers written whole, and how far into the next one the write got.
fn split_written(lens: impl IntoIterator<Item = usize>, mut written: usize) -> (usize, usize) {
    let mut whole = 0;
    for len in lens {
        if written < len {
            return (whole, written);
        }
        written -= len;
        whole += 1;
    }
    (whole, 0)
}

/// Writes `slices` in order (one `sendmsg` each time, MSG_DONTWAIT: the socket's own mode
/// does not matter) as far as the socket takes them without blocking; returns how many
/// bytes that was. Stops at the first error: the I/O thread, which writes the rest, meets
/// it again and reports it.
fn write_without_blocking(stream: &TcpStream, slices: &mut [IoSlice<'_>]) -> usize {
    let total: usize = slices.iter().map(|s| s.len()).sum();
    let socket = socket2::SockRef::from(stream);
    let mut remaining = slices;
    let mut written = 0;
    while written < total {
        match socket.send_vectored_with_flags(remaining, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) {
            Ok(0) => break,
            Ok(n) => {
                written += n;
                IoSlice::advance_slices(&mut remaining, n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_falls_on_whole_buffers_then_into_the_next() {
        assert_eq!(split_written([3, 4, 5], 0), (0, 0));
        assert_eq!(split_written([3, 4, 5], 2), (0, 2));
        assert_eq!(split_written([3, 4, 5], 3), (1, 0));
        assert_eq!(split_written([3, 4, 5], 8), (2, 1));
        assert_eq!(split_written([3, 4, 5], 12), (3, 0));
        assert_eq!(split_written([], 0), (0, 0));
    }
}
